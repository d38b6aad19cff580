"""Data-parallel speed on one machine: 1 process x 1 thread against 2 processes x 1 thread.

The issue's setting (docs/distributed.md): SmolLM2-135M-Instruct, LARS (the default
recipe, r = 16), T = 512 tokens a row, a global batch of 4 rows. The script runs
`minilars finetune` twice in one go, once as one process and once under torchrun
as two, every process held to one thread, and reads each run's log.jsonl:

    tokens/s   the global batch's tokens (B T) over a step's wall time on rank 0
    all-reduce the seconds of the gradient all-reduce, waiting for the slower rank
               included, and its share of the step

Both are medians over the steps after the first (which pays one-off start costs).
Targets (issue 25): 2 processes >= 1.7x the tokens/s of 1; all-reduce < 5 % of a step.
Print `uptime` beside the figures: on a shared machine the ratio drops when other
work takes a core.

    python benchmarks/distributed_speed.py                    # 4 steps each, torch backend
    python benchmarks/distributed_speed.py --steps 6 --backend numba
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="lars")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="global batch (rows per optimizer step)")
    p.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed")
    p.add_argument("--processes", type=int, default=2, help="processes of the data-parallel run")
    p.add_argument("--backend", default="torch", choices=("numpy", "numba", "torch"))
    return p.parse_args(argv)


def finetune_args(args, out: Path) -> list[str]:
    return ["finetune", "--model", args.model, "--method", args.method, "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", "0",
            "--backend", args.backend, "--threads", "1", "--eval-samples", "0", "--save-every", "0",
            "--no-progress", "--overwrite", "--output", str(out)]


def run(processes: int, args, out: Path) -> dict:
    """One finetune run; the medians of its log."""
    if processes == 1:
        command = [sys.executable, "-m", "minilars", *finetune_args(args, out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), "-m", "minilars", *finetune_args(args, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    steps = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e][1:]
    step_s = [args.batch_size * args.seq_len / e["tokens_per_s"] for e in steps]
    reduce_s = [e.get("allreduce_s", 0.0) for e in steps]
    return {"processes": processes, "tokens_per_s": statistics.median(e["tokens_per_s"] for e in steps),
            "step_s": statistics.median(step_s), "allreduce_s": statistics.median(reduce_s),
            "allreduce_share": statistics.median(r / s for r, s in zip(reduce_s, step_s)),
            "losses": [e["loss"] for e in steps], "wall_s": time.perf_counter() - started}


def main(argv=None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    print(f"{args.model}, {args.method}, T = {args.seq_len}, global batch {args.batch_size}, {args.backend} backend, "
          f"{args.steps} steps a run (medians of the last {args.steps - 1}); load average before "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="minilars-dist-bench-") as tmp:
        rows = [run(n, args, Path(tmp) / f"p{n}") for n in (1, args.processes)]
    load = os.getloadavg()
    base = rows[0]["tokens_per_s"]
    print(f"{'processes x threads':>20s} {'tokens/s':>9s} {'vs 1':>6s} {'step s':>7s} {'all-reduce s':>13s} "
          f"{'share':>6s} {'run s':>6s}")
    for r in rows:
        print(f"{r['processes']:>16d} x 1 {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / base:5.2f}x "
              f"{r['step_s']:7.2f} {r['allreduce_s']:13.4f} {100 * r['allreduce_share']:5.2f}% {r['wall_s']:6.0f}")
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("targets: >= 1.70x tokens/s with 2 processes; all-reduce < 5 % of a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
