"""LARS on a transformers model (minilars.hf) against peft LoRA: memory and step time.

SmolLM2-135M as a transformers LlamaForCausalLM (float32, CPU, weights from the
local GGUF cache, no model hub), batch 1, random tokens, AdamW; three systems:

    lars      minilars.hf.get_lars_model, r 16 on all seven projections, default
              recipe (each layer's input kept in float16 and the layer recomputed in
              backward, loss in slices of 256 tokens, glibc's mmap threshold fixed at
              1 MiB: backends/resident.py); calibrated on 512 other tokens, then
              refreshed LarsConfig.refreshes times (2) on 512 more each, so the timed
              steps hold the folded factors of a run's last third
    lora      peft LoRA r 8 on the same seven projections
    lora-gc   the same with transformers' gradient checkpointing (non-reentrant)

Each (system, T) runs in a fresh process (peak RSS belongs to a whole process): it
builds the model, sets up the adapter, frees the loader's copies, resets the
kernel's high-water mark (/proc/self/clear_refs) and runs --warmup untimed and
--steps timed steps. Printed per point: RSS after setup ("weights": torch, the weights,
the adapter), the step peak RSS, peak minus weights, median step seconds. Points
whose memory, extrapolated from the system's last point, would not fit in the
machine's available memory are skipped with the reason.

    python benchmarks/hf_lars_memory.py --seq-lens 512,1024,2048,4096,8192

--malloc-mmap-threshold BYTES runs every system's worker with MALLOC_MMAP_THRESHOLD_
set (the baselines under the allocator setting LARS makes itself);
--lars-cpu-mmap-threshold none runs LARS with glibc's allocator left as it is;
--lars-mlp-chunk-tokens none runs each layer's MLP whole (LarsConfig.mlp_chunk_tokens=None);
--lars-refreshes N sets LarsConfig.refreshes (0: one basis, no folded factors).

Needs minilars[hf] (torch, transformers, peft) and `minilars models pull smollm2-135m`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SYSTEMS = ("lars", "lora-gc", "lora")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    from minilars.commands.common import comma_separated

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-lens", default="512,1024,2048,4096,8192", type=comma_separated(int, "512,2048"), help="comma-separated T")
    p.add_argument("--systems", default=",".join(SYSTEMS), type=comma_separated(str, "lars,peft-lora"), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (their memory counts in the peak)")
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lars-rank", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc-mmap-threshold", type=int,
                   help="set MALLOC_MMAP_THRESHOLD_ (bytes) for every worker: glibc's mmap threshold fixed")
    p.add_argument("--lars-cpu-mmap-threshold", default=str(1 << 20),
                   help="LarsConfig.cpu_mmap_threshold in bytes, or 'none' (allocator left alone)")
    p.add_argument("--lars-mlp-chunk-tokens", default="512",
                   help="LarsConfig.mlp_chunk_tokens, or 'none' (each layer's MLP run whole)")
    p.add_argument("--lars-refreshes", type=int, default=2, help="LarsConfig.refreshes (default: %(default)s)")
    p.add_argument("--json", help="append each point's result as one JSON line to this file")
    p.add_argument("--worker", metavar="SYSTEM", help=argparse.SUPPRESS)  # one point, in this process
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- one point (worker)
def build_llama(name: str, torch, transformers):
    """LlamaForCausalLM with the weights minilars loads from its GGUF cache (the
    builder benchmarks/hf_peft_accuracy.py uses for its peft baseline)."""
    from hf_peft_accuracy import build_llama as build

    return build(name, torch, transformers)


def worker(args) -> dict:
    import gc

    import numpy as np
    import peft
    import torch
    import transformers

    from minilars.backends.resident import return_freed_heap
    from minilars.bench.memory_worker import hwm_mib, reset_hwm, rss_mib

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_llama(args.model, torch, transformers)
    vocab = model.config.vocab_size
    if args.worker == "lars":
        from minilars.hf import LarsConfig, get_lars_model

        calibration = torch.from_numpy(np.random.default_rng(args.seed + 1).integers(0, vocab, (1, 512)))
        threshold = None if args.lars_cpu_mmap_threshold == "none" else int(args.lars_cpu_mmap_threshold)
        chunk = None if args.lars_mlp_chunk_tokens == "none" else int(args.lars_mlp_chunk_tokens)
        config = LarsConfig(r=args.lars_rank, cpu_mmap_threshold=threshold, mlp_chunk_tokens=chunk,
                            refreshes=args.lars_refreshes)
        model = get_lars_model(model, config, calibration)
        for k in range(config.refreshes):  # a step after the last refresh, as the engine's benches: the most it holds
            model.refresh(torch.from_numpy(np.random.default_rng(args.seed + 2 + k).integers(0, vocab, (1, 512))))
    else:
        if args.worker == "lora-gc":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                           lora_dropout=0.0, target_modules=PROJECTIONS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gc.collect()
    return_freed_heap()  # the loader's freed copies leave RSS
    setup_mib = rss_mib()
    reset_hwm()
    rng = np.random.default_rng(args.seed)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        tokens = torch.from_numpy(rng.integers(0, vocab, (1, args.seq_len)))
        started = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = hwm_mib()
    return {"system": args.worker, "seq_len": args.seq_len, "status": "ok", "setup_mib": setup_mib,
            "peak_mib": peak, "extra_mib": peak - setup_mib, "step_s": statistics.median(times),
            "steps_s": times, "first_loss": losses[0], "trainable": sum(p.numel() for p in params),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "lars_cpu_mmap_threshold": args.lars_cpu_mmap_threshold if args.worker == "lars" else None,
            "lars_mlp_chunk_tokens": args.lars_mlp_chunk_tokens if args.worker == "lars" else None,
            "lars_refreshes": args.lars_refreshes if args.worker == "lars" else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


# ---------------------------------------------------------------- driver
def available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_point(args, system: str, seq_len: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, "--seq-len", str(seq_len),
           "--model", args.model, "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
           "--lars-rank", str(args.lars_rank), "--lora-rank", str(args.lora_rank), "--seed", str(args.seed),
           "--lars-cpu-mmap-threshold", args.lars_cpu_mmap_threshold, "--lars-mlp-chunk-tokens", args.lars_mlp_chunk_tokens,
           "--lars-refreshes", str(args.lars_refreshes)]
    # Passive OpenMP waits: on a shared machine, threads spinning for a busy core multiply step times.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"system": system, "seq_len": seq_len, "status": f"failed (rc {proc.returncode}): {tail[:100]}"}
    return json.loads(lines[-1])


def label(system: str, args) -> str:
    return {"lars": f"minilars.hf LARS r {args.lars_rank}", "lora": f"peft LoRA r {args.lora_rank}",
            "lora-gc": f"peft LoRA r {args.lora_rank} + grad. checkpointing"}[system]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    seq_lens, systems = args.seq_lens, args.systems
    print(f"uptime: {open('/proc/loadavg').read().split()[:3]} (1, 5, 15 min load), "
          f"{args.threads} threads; one process per point; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}, "
          f"LARS cpu_mmap_threshold={args.lars_cpu_mmap_threshold}, mlp_chunk_tokens={args.lars_mlp_chunk_tokens}, "
          f"refreshes={args.lars_refreshes}",
          flush=True)
    last: dict[str, dict] = {}
    rows = []
    for seq_len in seq_lens:
        for system in systems:
            prev, free = last.get(system), available_mib()
            if prev and free is not None:
                need = prev["setup_mib"] + prev["extra_mib"] * seq_len / prev["seq_len"] * 1.1
                if need > 0.9 * free:
                    row = {"system": system, "seq_len": seq_len,
                           "status": f"skipped: needs ~{need:.0f} MiB (extrapolated), {free:.0f} MiB available"}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
            row = run_point(args, system, seq_len)
            rows.append(row)
            if row["status"] == "ok":
                last[system] = row
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print()
    print(table(rows, args))
    print(f"uptime after: {open('/proc/loadavg').read().split()[:3]}")
    return 0


def table(rows: list[dict], args) -> str:
    out = ["| system | T | weights MiB | peak RSS MiB | peak - weights MiB | step s | first loss |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {label(r['system'], args)} | {r['seq_len']} | | | | | {r['status']} |")
            continue
        out.append(f"| {label(r['system'], args)} | {r['seq_len']} | {r['setup_mib']:.0f} | {r['peak_mib']:.0f} | "
                   f"{r['extra_mib']:.0f} | {r['step_s']:.1f} | {r['first_loss']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
