"""Data-parallel speed on one machine: 1 process x 1 thread against 2 processes x 1 thread.

The issue's setting (docs/distributed.md): SmolLM2-135M-Instruct, LARS (the default
recipe, r = 16), T = 512 tokens a row, a global batch of 4 rows. The script runs
`minilars finetune` twice in one go, once as one process and once under torchrun
as two, every process held to one thread, and reads each run's log.jsonl:

    tokens/s   the global batch's tokens (B T) over a step's wall time on rank 0
    all-reduce the seconds of the gradient all-reduce in those steps, waiting for
               the slower rank included, and its share of the step

and then times the all-reduce alone: the same processes after a barrier, summing
gradients of the method's shapes (Group.sum_gradients, flattening and views
included), so a rank's wait for a slower one (load imbalance, not communication)
is left out.

Both are medians over the steps after the first (which pays one-off start costs).
Targets (issue 25): 2 processes >= 1.7x the tokens/s of 1; all-reduce < 5 % of a step.
Print `uptime` beside the figures: on a shared machine the ratio drops when other
work takes a core.

    python benchmarks/distributed_speed.py                    # 4 steps each, torch backend
    python benchmarks/distributed_speed.py --steps 6 --backend numba
    python benchmarks/distributed_speed.py --sizes    # bytes each method all-reduces a step
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
    p.add_argument("--probe-allreduce", action="store_true", help=argparse.SUPPRESS)  # one rank of the probe
    p.add_argument("--sizes", action="store_true", help="only print the gradient buffer each method all-reduces "
                   "in a step, from the trainable parameters of a model of --model's preset shapes")
    return p.parse_args(argv)


def trainable_shapes(preset_name: str, method_name: str) -> dict[str, tuple]:
    """Shapes of the trainable arrays (= gradients) of a method on a model of the preset's shapes."""
    import numpy as np

    from minilars.config import preset
    from minilars.methods import MethodConfig, apply_method
    from minilars.model import Model

    cfg = preset(preset_name)
    calibration = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64))  # shapes only: random weights
    method = MethodConfig.from_options(method_name, {})  # the method's defaults (LARS: the default recipe)
    model = apply_method(Model.random(cfg, seed=0), method, calibration)
    return {name: tuple(a.shape) for name, a in model.trainable().items()}


def probe_allreduce(args, repeats: int = 10) -> None:
    """One rank of the all-reduce probe (started by torchrun): rank 0 prints the median seconds."""
    import numpy as np

    from minilars import distributed
    from minilars.backends import get_backend

    grads_shapes = trainable_shapes(args.model, args.method)
    backend = get_backend(args.backend)
    with distributed.session() as group:
        import torch.distributed as dist

        times = []
        for _ in range(repeats):
            grads = {name: backend.asarray(np.ones(shape, dtype=np.float32)) for name, shape in grads_shapes.items()}
            dist.barrier()
            group.sum_gradients(grads, backend, 0.5)
            times.append(group.last_reduce_s)
        if group.is_main:
            n = sum(int(np.prod(s)) for s in grads_shapes.values())
            print(json.dumps({"allreduce_s": statistics.median(times), "elements": n}), flush=True)


def allreduce_alone(args) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(args.processes), __file__, "--probe-allreduce", "--model", args.model, "--method", args.method,
               "--backend", args.backend]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def allreduce_sizes(preset_name: str) -> None:
    """Trainable parameters = float32 gradient elements in the all-reduced buffer.
    A ring all-reduce (gloo's and NCCL's) sends 2 (W - 1) / W times the buffer from
    each process: the buffer once for W = 2, twice as W grows."""
    import numpy as np

    print(f"{preset_name} (random weights of its shapes): gradient buffer all-reduced per step, float32")
    print(f"{'method':>22s} {'trainable':>13s} {'buffer':>12s} {'sent per process, W=2':>22s} {'W->inf':>10s}")
    for method, label in (("lars", "lars r=16"), ("lora", "lora r=16"), ("ia3", "ia3"), ("full", "full")):
        n = sum(int(np.prod(shape)) for shape in trainable_shapes(preset_name, method).values())
        mib = 4 * n / 2**20
        print(f"{label:>22s} {n:>13,} {mib:>8.2f} MiB {mib:>18.2f} MiB {2 * mib:>6.2f} MiB")


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
    if args.sizes:
        allreduce_sizes(args.model)
        return 0
    if args.probe_allreduce:
        probe_allreduce(args)
        return 0
    load = os.getloadavg()
    print(f"{args.model}, {args.method}, T = {args.seq_len}, global batch {args.batch_size}, {args.backend} backend, "
          f"{args.steps} steps a run (medians of the last {args.steps - 1}); load average before "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="minilars-dist-bench-") as tmp:
        rows = [run(n, args, Path(tmp) / f"p{n}") for n in (1, args.processes)]
    alone = allreduce_alone(args)
    load = os.getloadavg()
    base = rows[0]["tokens_per_s"]
    print(f"{'processes x threads':>20s} {'tokens/s':>9s} {'vs 1':>6s} {'step s':>7s} {'all-reduce s':>13s} "
          f"{'share':>6s} {'run s':>6s}")
    for r in rows:
        print(f"{r['processes']:>16d} x 1 {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / base:5.2f}x "
              f"{r['step_s']:7.2f} {r['allreduce_s']:13.4f} {100 * r['allreduce_share']:5.2f}% {r['wall_s']:6.0f}")
    step_s = rows[-1]["step_s"]
    print(f"all-reduce alone ({args.processes} processes after a barrier, {alone['elements']:,} float32 gradients, "
          f"median of 10): {alone['allreduce_s']:.4f} s = {100 * alone['allreduce_s'] / step_s:.2f} % of the "
          f"{args.processes}-process step")
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("targets: >= 1.70x tokens/s with 2 processes; all-reduce < 5 % of a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
