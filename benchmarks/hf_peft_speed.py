"""The training step people use today, timed: transformers + peft LoRA on torch CPU.

The numba issue's step-time target is set against Hugging Face transformers + peft
LoRA r 8 on this machine (../shared/PEERS.md: 18.5 s at T = 2048, 25.8 s with
gradient checkpointing). Step times on a shared machine drift by more than 10 %
from day to day, so that figure is only comparable with a minilars step timed
the same hour. This script times the HF step as PEERS.md describes it (batch 1,
random tokens, `sdpa` attention, LoRA r 8 on q, k, v, o, gate, up, down, AdamW)
and prints the median; run it next to `minilars bench speed`:

    python benchmarks/hf_peft_speed.py --seq-len 2048
    python benchmarks/hf_peft_speed.py --seq-len 2048 --checkpointing
    minilars bench speed --seq-lens 2048 --methods lars,lora --backends numba

Needs `pip install transformers peft` beside minilars (not minilars dependencies).
Weights come from the local model cache (`minilars models pull smollm2-135m`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (recompute each block)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import peft
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_peft_accuracy import build_model

    torch.set_num_threads(args.threads)
    args.recipe = "minilars"  # alpha = 2r; the scaling does not change the step's cost
    model = build_model(args, torch, transformers, peft)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(args.seed)
    vocab = model.config.vocab_size
    times = []
    for step in range(1 + args.steps):
        tokens = torch.from_numpy(rng.integers(0, vocab, size=(1, args.seq_len)))
        started = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
    label = "LoRA r %d%s" % (args.rank, " + gradient checkpointing" if args.checkpointing else "")
    print(f"transformers {transformers.__version__} + peft {peft.__version__}, torch {torch.__version__}, "
          f"{args.threads} threads: {label}, T = {args.seq_len}: median step {statistics.median(times):.2f} s "
          f"(steps: {', '.join(f'{t:.2f}' for t in times)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
