"""Step time with the frozen weights kept as GGUF blocks vs float32, paired and interleaved.

Both models live in one process, loaded from the same file (`--weights keep` and
`--weights float32`), with the same LARS bases (calibrated once, on the floats) and
method. Each round times one training step of each (forward, backward, AdamW), the
order alternating from round to round, so a drift in the machine's speed (other
jobs on a shared machine) falls on both alike; the ratio is taken within each round.
Printed per T: the median step times, the median ratio kept / float32 and its
spread over the rounds (min, max). One untimed warm-up step of each comes first
(numba's decoders load from its cache there).

    minilars bench quant --model smollm2-135m --seq-lens 512,2048 --rounds 5
"""
from __future__ import annotations

import time

import numpy as np

from minilars.commands.common import comma_separated

from .common import print_table, random_batch, write_csv


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="a GGUF model (default: %(default)s)")
    parser.add_argument("--seq-lens", default="512,2048", type=comma_separated(int, "512,2048"),
                        help="T values, comma separated (default: %(default)s)")
    parser.add_argument("--backend", default="numba", choices=("numpy", "numba", "torch"),
                        help="kernel backend of both models (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, one step of each model per round "
                        "(default: %(default)s)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")


def run(args) -> int:
    from minilars.backends import get_backend
    from minilars.calibrate import calibrate
    from minilars.methods import MethodConfig, apply_method
    from minilars.optim import AdamW
    from minilars.pretrained import load_model, weight_summary

    be = get_backend(args.backend)
    if args.backend == "numba":
        from minilars.backends.numba_backend import warmup

        warmup(("float32",))
    models = {w: load_model(args.model, be, w)[0] for w in ("keep", "float32")}
    print(f"{args.model} on {args.backend}: kept {weight_summary(models['keep'])} vs "
          f"{weight_summary(models['float32'])}; {args.rounds} rounds per T, order alternating")
    method = MethodConfig.lars_default()
    rows = []
    for seq_len in args.seq_lens:
        tokens, targets = random_batch(models["keep"].cfg.vocab_size, 1, seq_len)
        bases = calibrate(models["float32"], tokens[:, :512], method.rank, seed=method.seed)
        optimizers = {}
        for name, model in models.items():
            apply_method(model, method, bases=bases)
            optimizers[name] = AdamW(model.trainable(), model.be)

        def step(name: str) -> float:
            started = time.perf_counter()
            tape = models[name].forward(tokens, targets)
            optimizers[name].step(models[name].backward(tape))
            return time.perf_counter() - started

        step("keep"), step("float32")  # warm-up
        times = {"keep": [], "float32": []}
        for r in range(args.rounds):
            for name in (("keep", "float32") if r % 2 == 0 else ("float32", "keep")):
                times[name].append(step(name))
            print(f"  T={seq_len} round {r + 1}: kept {times['keep'][-1]:.2f} s, float32 {times['float32'][-1]:.2f} s",
                  flush=True)
        ratios = np.array(times["keep"]) / np.array(times["float32"])
        rows.append({"T": seq_len, "kept s": float(np.median(times["keep"])),
                     "float32 s": float(np.median(times["float32"])), "ratio (median)": float(np.median(ratios)),
                     "ratio min": float(ratios.min()), "ratio max": float(ratios.max()), "rounds": args.rounds})
    print_table(rows)
    if args.csv:
        write_csv(rows, args.csv)
    return 0
