"""Peak RSS of loading a model and generating 32 tokens, per weight format (--weights).

Each configuration runs in a fresh process (so one run's freed memory cannot hide
another's peak); the child reports ru_maxrss after loading and after generating."""
from __future__ import annotations

import json
import subprocess
import sys

from .common import print_table

CHILD = r"""
import json, resource, sys, time
from minilars.pretrained import load_model
from minilars.generate import generate_text
spec, weights, backend, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
t0 = time.perf_counter()
model, tok = load_model(spec, "auto" if backend == "default" else backend, weights)
t1 = time.perf_counter()
loaded = rss()
text = generate_text(model, tok, "What is the capital of France?", max_new_tokens=tokens)
t2 = time.perf_counter()
print(json.dumps({"python MiB": base, "after load MiB": loaded, "peak MiB": rss(), "load s": t1 - t0,
                  "generate s": t2 - t1, "text": text[:60]}))
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model (default: %(default)s)")
    parser.add_argument("--backend", default="default", help="kernel backend (default: auto, as every command picks it)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--weights", default="keep,float32,float16,q8_0,q4_0",
                        help="comma-separated weight formats, one process each (default: %(default)s)")


def run(args) -> int:
    rows = []
    for weights in (w.strip() for w in args.weights.split(",") if w.strip()):
        proc = subprocess.run([sys.executable, "-c", CHILD, args.model, weights, args.backend, str(args.tokens)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"weights": weights, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append({"weights": weights, **json.loads(proc.stdout.strip().splitlines()[-1])})
    print(f"{args.model}: load + generate {args.tokens} tokens, one fresh process per row (peak = ru_maxrss)")
    print_table(rows)
    return 0
