"""LARS against transformers + peft LoRA, step for step in one run: the speed targets.

Issue 21 asks for a LARS training step (minilars's default recipe, the backend
`--backend auto` picks) in at most 0.7x the time of Hugging Face transformers + peft
LoRA r 8 where every token is labelled, at most 0.5x on chat data (prompt tokens
unlabelled), and for the LARS step's achieved GFLOP/s to be at least 0.8x this
machine's float32 matmul GFLOP/s, at T = 512 and 2048. Step times on a shared
machine drift by more than those margins within minutes, so both steps are timed in
the same run, interleaved:

- two worker processes hold the models, one each: transformers + peft LoRA r 8 on
  q, k, v, o, gate, up, down (torch CPU, `sdpa` attention, AdamW, `--threads`
  threads; the weights minilars loads, hf_peft_accuracy.build_model) and minilars
  LARS (MethodConfig.lars_default(), AdamW); each warms up with one step;
- for each T and each dataset the main process asks for steps in the order
  HF LARS LARS HF, LARS HF HF LARS, ... (`--rounds` rounds), so a drift in the
  machine's speed hits both alike, and times the machine's matmul (2048 x 576 x
  1536, minilars/bench/speed.py: matmul_gflops) before each round;
- datasets: "labelled", random tokens with every target labelled; "chat", one
  row of minilars's built-in chat data (minilars/data/personal_notes.jsonl, the
  model's chat template) packed to T tokens, only the assistant turns labelled.
  Both workers train on the same row (HF's labels are the targets shifted by one,
  as its loss shifts them back).

Printed per (T, dataset): the median step of each; LARS / peft, the ratio of the
medians and the range of the per-round ratios (one round = one step of each, taken
back to back); the LARS step's achieved GFLOP/s (bench/speed.py: step_flops, its
head counted on the labelled rows only, as the loss computes it) against the
median matmul GFLOP/s of the run; and each target, met or not.

    python benchmarks/hf_peft_speed.py              # T = 512 and 2048, ~10 min on 2 cores
    python benchmarks/hf_peft_speed.py --quick      # T = 512 only, ~2 min

Needs `pip install transformers peft` beside minilars (not minilars dependencies).
Weights come from the local model cache (`minilars models pull smollm2-135m`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import minilars  # noqa: F401  before numpy: OPENBLAS_THREAD_TIMEOUT (docs/speed.md)
from minilars.commands.common import comma_separated
import numpy as np

TARGET_RATIO = {"labelled": 0.7, "chat": 0.5}  # LARS step / peft LoRA step, at most
TARGET_GFLOPS_SHARE = 0.8  # LARS step GFLOP/s over the machine's matmul GFLOP/s, at least
DATASETS = ("labelled", "chat")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model (default: %(default)s)")
    p.add_argument("--seq-lens", default="512,2048", type=comma_separated(int, "512,2048"), help="T values, comma separated (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="T = 512 only (overrides --seq-lens)")
    p.add_argument("--datasets", default=",".join(DATASETS), type=comma_separated(str, "labelled,chat"),
                   help="comma separated from labelled, chat (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds per (T, dataset); a round is one step of each, in alternating order (default: "
                        "%(default)s)")
    p.add_argument("--rank", type=int, default=8, help="peft LoRA rank (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the HF worker (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="minilars backend (default: %(default)s, as finetune)")
    p.add_argument("--checkpointing", action="store_true", help="HF with gradient checkpointing (recompute each block)")
    p.add_argument("--worker", choices=["hf", "lars"], help=argparse.SUPPRESS)
    p.add_argument("--batch", help=argparse.SUPPRESS)  # .npz of tokens, targets: the lars worker writes it
    p.add_argument("--data", choices=DATASETS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------- the batches
def make_batch(kind: str, vocab_size: int, tokenizer, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens, targets (1, T) int64; targets[t] is the label of position t, -100 where none."""
    if kind == "labelled":
        from minilars.bench.common import random_batch

        return random_batch(vocab_size, 1, seq_len, seed)
    from minilars.data import load_dataset, make_rows, pad_id_of

    data = load_dataset(None, tokenizer, eval_fraction=0.0, seed=seed, max_tokens=seq_len + 1)
    rows = make_rows(data.train, seq_len, pad_id_of(tokenizer), "pack", seed)
    best = int(np.argmax(rows.real.sum(axis=1)))  # the fullest row: least padding
    return rows.tokens[best:best + 1], rows.targets[best:best + 1]


# ---------------------------------------------------------------- workers
def hf_worker(args, tokens: np.ndarray, targets: np.ndarray):
    """A step function for transformers + peft LoRA on this batch."""
    import warnings

    import peft
    import torch
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per step
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_peft_accuracy import build_model

    torch.set_num_threads(args.threads)
    args.recipe = "minilars"  # alpha = 2r; the scaling does not change the step's cost
    model = build_model(args, torch, transformers, peft)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    input_ids = torch.from_numpy(tokens)
    # HF's loss compares the logits at t with labels[t + 1]: labels are the targets one to the right
    labels = torch.from_numpy(np.concatenate([np.full((1, 1), -100), targets[:, :-1]], axis=1))

    def step():
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, {"version": f"transformers {transformers.__version__} + peft {peft.__version__}, "
                             f"torch {torch.__version__}, {args.threads} threads"}


def lars_worker(args):
    """A step function for minilars LARS (default recipe) on a new batch (written to
    args.batch for the HF worker), and its FLOPs."""
    from minilars.bench.speed import step_flops
    from minilars.methods import MethodConfig, apply_method
    from minilars.optim import AdamW
    from minilars.pretrained import load_model

    model, tokenizer = load_model(args.model, args.backend)
    tokens, targets = make_batch(args.data, model.cfg.vocab_size, tokenizer, args.seq_lens[0], args.seed)
    np.savez(args.batch, tokens=tokens, targets=targets)
    if model.be.name == "numba":
        from minilars.backends.numba_backend import warmup
        warmup((str(model.compute_dtype),))
    config = MethodConfig.lars_default()
    apply_method(model, config, calibration_tokens=tokens[:, :512])
    config.kind.refresh_all(model, tokens[:, :512])  # a step after the last refresh: the most it holds
    opt = AdamW(model.trainable(), model.be)
    labelled = int((targets != -100).sum())

    def step():
        opt.step(model.backward(model.forward(tokens, targets)))
    flops = step_flops(model.cfg, tokens.shape[1], config, model.plan.recompute_blocks,
                       recompute_attention=not model.plan.keeps_attention_output, labelled=labelled)
    return step, {"flops": flops, "labelled": labelled, "backend": model.be.name}


def serve(args) -> int:
    """Worker loop: build, warm up with one step, say 'ready' with the facts, then one
    timed step per 'step' line on stdin (its seconds on stdout)."""
    if args.worker == "lars":
        step, facts = lars_worker(args)
    else:
        batch = np.load(args.batch)
        step, facts = hf_worker(args, batch["tokens"], batch["targets"])
    step()
    print("ready " + repr(facts), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        started = time.perf_counter()
        step()
        print(f"{time.perf_counter() - started:.6f}", flush=True)
    return 0


class Worker:
    def __init__(self, kind: str, args, batch_path: str, seq_len: int, data: str):
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--batch", batch_path,
                   "--model", args.model, "--rank", str(args.rank), "--threads", str(args.threads),
                   "--backend", args.backend, "--seed", str(args.seed), "--seq-lens", str(seq_len), "--data", data]
        if args.checkpointing:
            command.append("--checkpointing")
        self.kind = kind
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self.proc.kill()
            raise SystemExit(f"hf_peft_speed: the {kind} worker failed to start (see its output above)")
        import ast
        self.facts = ast.literal_eval(line[len("ready "):])

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


# ---------------------------------------------------------------- the comparison
def compare(args, seq_len: int, kind: str, workdir: str) -> dict:
    from minilars.bench.speed import matmul_gflops

    path = os.path.join(workdir, f"batch-{kind}-{seq_len}.npz")
    lars = Worker("lars", args, path, seq_len, kind)  # builds the batch and writes it to path
    hf = Worker("hf", args, path, seq_len, kind)
    times = {"hf": [], "lars": []}
    ratios, machine = [], []
    try:
        for r in range(args.rounds):
            machine.append(matmul_gflops())
            order = (hf, lars, lars, hf) if r % 2 == 0 else (lars, hf, hf, lars)
            got = {"hf": [], "lars": []}
            for w in order:
                got[w.kind].append(w.step())
            for k in got:
                times[k] += got[k]
            ratios += [got["lars"][0] / got["hf"][1], got["lars"][1] / got["hf"][0]]  # steps taken back to back
    finally:
        hf.close()
        lars.close()
    hf_s, lars_s = statistics.median(times["hf"]), statistics.median(times["lars"])
    gflops, matmul = lars.facts["flops"] / lars_s / 1e9, statistics.median(machine)
    ratio = lars_s / hf_s
    return {"T": seq_len, "data": kind, "labelled": f"{lars.facts['labelled']}/{seq_len}",
            "peft LoRA s": hf_s, "LARS s": lars_s, "LARS / peft": ratio,
            "per-round ratios": f"{min(ratios):.2f}-{max(ratios):.2f}",
            "LARS GFLOP/s": gflops, "matmul GFLOP/s": matmul, "share": gflops / matmul,
            "ratio target": f"<= {TARGET_RATIO[kind]}: {'met' if ratio <= TARGET_RATIO[kind] else 'not met'}",
            "GFLOP/s target": f">= {TARGET_GFLOPS_SHARE}: {'met' if gflops >= TARGET_GFLOPS_SHARE * matmul else 'not met'}",
            "_facts": (hf.facts, lars.facts, f"{min(machine):.0f}-{max(machine):.0f}")}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve(args)
    from minilars.bench.common import print_table

    seq_lens = [512] if args.quick else args.seq_lens
    kinds = args.datasets
    unknown = [k for k in kinds if k not in DATASETS]
    if unknown:
        raise SystemExit(f"hf_peft_speed: unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for seq_len in seq_lens:
            for kind in kinds:
                started = time.perf_counter()
                row = compare(args, seq_len, kind, workdir)
                hf_facts, lars_facts, machine = row.pop("_facts")
                print(f"T = {seq_len}, {kind}: {hf_facts['version']}; minilars LARS on {lars_facts['backend']}; "
                      f"matmul {machine} GFLOP/s over the rounds; {time.perf_counter() - started:.0f} s", flush=True)
                rows.append(row)
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
