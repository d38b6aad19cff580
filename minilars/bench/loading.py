"""Peak RSS of loading a model and generating 32 tokens, float32 vs float16 weights.

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
spec, weight_dtype, backend, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
t0 = time.perf_counter()
model, tok = load_model(spec, "auto" if backend == "default" else backend, weight_dtype)
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


def run(args) -> int:
    rows = []
    for weight_dtype in ("float32", "float16"):
        proc = subprocess.run([sys.executable, "-c", CHILD, args.model, weight_dtype, args.backend, str(args.tokens)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"weights": weight_dtype, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append({"weights": weight_dtype, **json.loads(proc.stdout.strip().splitlines()[-1])})
    print(f"{args.model}: load + generate {args.tokens} tokens, one fresh process per row (peak = ru_maxrss)")
    print_table(rows)
    return 0
