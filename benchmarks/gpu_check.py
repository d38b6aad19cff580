"""GPU check: peak memory and step time of one training step vs sequence length.

The claim under test (docs/lars.md): LoRA's memory grows linearly with T, LARS's growth
is flattened. This script trains SmolLM2-135M with the minilars engine on the torch
backend in bfloat16 (weights, compute, gradients and AdamW state) for the methods
full, lora and lars at T = 1k, 2k, 4k, 8k and 16k tokens (batch 1), and, when
transformers and peft import, the same LoRA with Hugging Face (with and without
gradient checkpointing) as the baseline people use. Per case it measures:

    peak      torch.cuda.max_memory_allocated over the timed steps (weights,
              optimizer state, kept activations and transient work together)
    step      peak minus what was allocated before the step (what the step adds)
    kept      the engine's own count of kept activations (ActivationStore.bytes_peak)
    time      mean wall-clock of a forward + backward + AdamW step, after warm-up

and prints a markdown table, also written to --out (and a plot to --plot).

    python benchmarks/gpu_check.py --device cuda --out gpu_check.md --plot gpu_check.png
    python benchmarks/gpu_check.py --device cpu --quick  # tiny preset, T = 64: checks the script

Weights come from minilars.models.load_model_weights('smollm2-135m') when that
works (cached or downloadable) and are random otherwise (same shapes, so the same
memory and time). A method that minilars does not provide yet is skipped with its
reason; an out-of-memory case is recorded as OOM and longer T for that method are
skipped. --budget-s stops starting new cases so the whole run stays under 5 minutes.
Runs from a bare checkout too: without `pip install -e .` it maps backends/ and
models/ to minilars.backends and minilars.models itself.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HF_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ensure_minilars_importable() -> None:
    """Without `pip install -e .` the top-level backends/ and models/ folders are not
    yet minilars.backends / minilars.models (pyproject maps them): map them here."""
    try:
        import minilars.backends  # noqa: F401
        return
    except ModuleNotFoundError:
        pass
    sys.path.insert(0, str(ROOT))
    for sub in ("backends", "models"):
        spec = importlib.util.spec_from_file_location(f"minilars.{sub}", ROOT / sub / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"minilars.{sub}"] = module
        try:
            spec.loader.exec_module(module)
        except ImportError:
            del sys.modules[f"minilars.{sub}"]
            if sub == "backends":
                raise
            # models/ needs gguf and tokenizers; without them the weights are random


def parse_args(argv=None) -> argparse.Namespace:
    from minilars.commands.common import comma_separated

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device: cuda, cuda:1 or cpu (default cuda)")
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, T = 64, random weights: a smoke run of this script")
    p.add_argument("--seq-lens", default=None, type=comma_separated(int, "2048,8192"),
                   help="comma-separated sequence lengths (default 1024,...,16384; quick: 64)")
    p.add_argument("--methods", default="full,lora,lars", type=comma_separated(str, "lora,lars"), help="engine methods to run (default full,lora,lars)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="weights, compute, gradients and optimizer state (default bfloat16; CPUs without native "
                        "bf16 matmul want float32)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank and LARS basis rank (default 16; LoRA alpha = 2r)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--tile", type=int, default=None,
                   help="attention tile; the tile loop runs in Python, so a GPU wants large tiles "
                        "(default 1024 on cuda, 64 on cpu)")
    p.add_argument("--loss-chunk", type=int, default=None, help="rows of logits alive at once (default 1024; cpu 64)")
    p.add_argument("--weights", default="auto", choices=["auto", "random"],
                   help="auto: SmolLM2-135M via minilars.models when it loads, random otherwise (default auto)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers + peft baseline")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="start no new case after this many seconds (default 270)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--plot", default=None, help="draw peak memory vs T to this image (needs matplotlib)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; --quick on cpu: 1, its ops are too small to split)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and tokens (default 0)")
    return p.parse_args(argv)


@dataclass
class Row:
    system: str  # "minilars full", "hf+peft lora", ...
    seq_len: int
    status: str = "ok"  # ok | OOM | skipped: ... | error: ...
    peak: int | None = None  # bytes, CUDA only
    step_extra: int | None = None  # bytes
    kept: int | None = None  # bytes the engine's store held at peak
    seconds: float | None = None  # per step
    loss: float | None = None  # at the first step: every system starts from the same base model


# ---------------------------------------------------------------- weights
def load_params(args, cfg_name: str):
    """(cfg, engine params as float32 numpy, where they came from)."""
    from minilars.config import preset
    from minilars.weights import from_hf, random_params

    cfg = preset(cfg_name)
    if args.weights == "auto" and not args.quick:
        os.environ.setdefault("PIP_RETRIES", "0")  # an offline machine fails fast instead of retrying
        os.environ.setdefault("PIP_TIMEOUT", "5")
        try:
            from minilars.models import load_model_weights
            loaded_cfg, state, _ = load_model_weights(cfg_name, np.float32)
            return loaded_cfg, from_hf(loaded_cfg, state, np.float32), f"{cfg_name} (pretrained)"
        except Exception as e:  # noqa: BLE001 - any failure falls back to random weights
            print(f"[weights] {cfg_name} did not load ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                  "using random weights", file=sys.stderr)
    return cfg, random_params(cfg, args.seed, np.float32), f"{cfg_name} (random weights)"


# ---------------------------------------------------------------- minilars
def run_engine(args, be, cfg, params_np, method: str, seq_lens, started: float) -> list[Row]:
    import torch

    from minilars import methods
    from minilars.model import Model
    from minilars.optim import AdamW, AdamWConfig

    name = f"minilars {method}"
    if method not in getattr(methods, "METHODS", ("full", "frozen")):
        return [Row(name, t, f"skipped: method {method!r} not in minilars.methods yet") for t in seq_lens]
    # A copy per method: full fine-tuning updates its weights in place.
    params = {k: torch.from_numpy(v).to(be.device, be.dtype(args.dtype), copy=True) for k, v in params_np.items()}
    model = Model(cfg, params, backend=be, compute_dtype=args.dtype, attention_tile=args.tile,
                  loss_chunk=args.loss_chunk)
    try:
        config = methods.MethodConfig.from_options(method, {"rank": args.rank})  # LARS: the default storage
        calibration = None
        if config.kind.needs_calibration:
            calibration_rng = np.random.default_rng(args.seed + 1)  # not the tokens' stream: same tokens for all
            calibration = calibration_rng.integers(0, cfg.vocab_size, (1, min(512, max(seq_lens))))
        methods.apply_method(model, config, calibration_tokens=calibration)
        if calibration is not None:
            config.kind.refresh_all(model, calibration)  # a step after the last refresh: the most it holds
        opt = AdamW(model.trainable(), be, AdamWConfig(lr=1e-4))
    except Exception as e:  # noqa: BLE001 - a method that is not ready is skipped, not fatal
        return [Row(name, t, f"skipped: {type(e).__name__}: {str(e)[:80]}") for t in seq_lens]
    name = f"minilars {config.describe()}"
    print(f"[{name}] trainable {model.n_trainable():,} of {model.n_params():,} parameters", file=sys.stderr)

    def step(tokens, targets, row: Row):
        tape = model.forward(tokens, targets)
        grads = model.backward(tape)
        opt.step(grads)
        row.kept = tape.store.bytes_peak
        if row.loss is None:
            row.loss = tape.loss

    rows = run_cases(args, be, name, seq_lens, started, np.random.default_rng(args.seed), cfg.vocab_size, step)
    del model, opt, params
    return rows


# ---------------------------------------------------------------- Hugging Face baseline
def run_hf(args, be, cfg, params_np, seq_lens, started: float, checkpointing: bool) -> list[Row]:
    name = "hf+peft lora" + (" +checkpointing" if checkpointing else "")
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        return [Row(name, t, f"skipped: {e.name} not importable") for t in seq_lens]
    from minilars.weights import to_hf

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=max(max(seq_lens), cfg.max_seq_len), rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings)
    try:
        model = transformers.LlamaForCausalLM(hf_cfg)
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_hf(cfg, params_np).items()},
                              strict=False)
        model = model.to(device=be.device, dtype=be.dtype(args.dtype))
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=HF_PROJECTIONS)
        model = peft.get_peft_model(model, lora)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    except Exception as e:  # noqa: BLE001
        return [Row(name, t, f"skipped: {type(e).__name__}: {str(e)[:80]}") for t in seq_lens]

    def step(tokens, targets, row: Row):
        ids = torch.as_tensor(tokens, device=be.device)
        loss = model(input_ids=ids, labels=ids).loss  # labels are shifted inside HF
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if row.loss is None:
            row.loss = float(loss.detach())

    rows = run_cases(args, be, name, seq_lens, started, np.random.default_rng(args.seed), cfg.vocab_size, step)
    del model, opt
    return rows


# ---------------------------------------------------------------- measuring
def run_cases(args, be, name, seq_lens, started, rng, vocab, step) -> list[Row]:
    import torch

    rows, failed = [], None
    for seq_len in seq_lens:
        row = Row(name, seq_len)
        rows.append(row)
        if failed:
            row.status = f"skipped: {failed} at a shorter T"
            continue
        if time.perf_counter() - started > args.budget_s:
            row.status = "skipped: time budget"
            continue
        tokens = rng.integers(0, vocab, (1, seq_len))
        targets = np.full_like(tokens, -100)
        targets[:, :-1] = tokens[:, 1:]  # next-token labels, as HF forms them from labels=input_ids
        release(be)
        before = be.memory_allocated()
        be.reset_peak_memory()
        times = []
        try:
            for i in range(args.warmup + args.steps):
                be.synchronize()
                t0 = time.perf_counter()
                step(tokens, targets, row)
                be.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            row.status = failed = "OOM"
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            row.status = failed = f"error: {type(e).__name__}: {str(e)[:80]}"
        if times:
            row.seconds = float(np.mean(times))
        peak = be.max_memory_allocated()
        if peak is not None:
            row.peak, row.step_extra = peak, peak - before
        print(f"[{name}] T={seq_len}: {row.status}, peak {mib(row.peak)} MiB, kept {mib(row.kept)} MiB, "
              f"{fmt(row.seconds and 1e3 * row.seconds, '.0f')} ms/step", file=sys.stderr, flush=True)
    return rows


def release(be) -> None:
    gc.collect()
    if be.device.type == "cuda":
        import torch
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- report
def mib(nbytes) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**20:,.0f}" if nbytes >= 100 * 2**20 else f"{nbytes / 2**20:.2f}"


def fmt(x, spec) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[Row], header: list[str]) -> str:
    lines = header + ["", "| system | T | peak MiB | step adds MiB | kept activations MiB | ms / step | tokens / s | "
                          "first loss | status |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        tps = r.seq_len / r.seconds if r.seconds else None
        lines.append(f"| {r.system} | {r.seq_len} | {mib(r.peak)} | {mib(r.step_extra)} | {mib(r.kept)} | "
                     f"{fmt(r.seconds and 1e3 * r.seconds, '.0f')} | {fmt(tps, ',.0f')} | {fmt(r.loss, '.3f')} | "
                     f"{r.status} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str, cuda: bool) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[plot] matplotlib not importable; no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(r.system for r in rows):
        pts = [(r.seq_len, (r.peak if cuda else r.kept) / 2**30) for r in rows
               if r.system == system and r.status == "ok" and (r.peak if cuda else r.kept) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T (tokens, batch 1)")
    ax.set_ylabel("peak GPU memory (GiB)" if cuda else "kept activations (GiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    ensure_minilars_importable()
    import torch

    from minilars.backends import get_backend

    started = time.perf_counter()
    if args.quick and args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    be = get_backend("torch", device=args.device, threads=args.threads)
    cuda = be.device.type == "cuda"
    if args.quick:
        seq_lens, cfg_name = [64], "tiny"
    else:
        seq_lens, cfg_name = [1024, 2048, 4096, 8192, 16384], "smollm2-135m"
    if args.seq_lens:
        seq_lens = args.seq_lens
    args.tile = args.tile or (1024 if cuda else 64)
    args.loss_chunk = args.loss_chunk or (1024 if cuda else 64)
    cfg, params_np, source = load_params(args, cfg_name)
    if max(seq_lens) > cfg.max_seq_len:  # RoPE extends to any length; the check only guards misuse
        cfg = cfg.with_(max_seq_len=max(seq_lens))

    rows: list[Row] = []
    for method in args.methods:
        rows += run_engine(args, be, cfg, params_np, method, seq_lens, started)
        release(be)
    if not args.no_hf:
        for checkpointing in (False, True):
            rows += run_hf(args, be, cfg, params_np, seq_lens, started, checkpointing)
            release(be)

    device = torch.cuda.get_device_name(be.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    header = [f"# minilars GPU check: {source}, {args.dtype}, batch 1",
              "",
              f"device {device}; torch {torch.__version__}; attention tile {args.tile}; loss chunk {args.loss_chunk}; "
              f"rank {args.rank}; {args.warmup} warm-up + {args.steps} timed steps per case; "
              f"total {time.perf_counter() - started:.0f} s.",
              "peak = torch.cuda.max_memory_allocated (weights + optimizer state + activations + transients; "
              "'-' on cpu); step adds = peak minus memory allocated before the step; kept activations = the "
              "engine's ActivationStore peak; first loss = loss of the first (warm-up) step, the same base model "
              "and tokens for every system, so the column cross-checks the systems."]
    text = table(rows, header)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.plot:
        plot(rows, args.plot, cuda)
    return 0 if all(r.status == "ok" or r.status.startswith("skipped") or r.status == "OOM" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
