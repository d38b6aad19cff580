"""One memory-benchmark run in a fresh process: `python -m minilars.bench.memory_worker ...`.

Peak RSS is a property of a whole process (the C allocator keeps freed buffers, the
loader peaks before training starts), so `minilars bench memory` starts one of these
per (method, storage policy, T). It loads the model, applies the method (LARS
calibrates on the first --calibration-tokens tokens of the batch, then refreshes its
basis as often as a run does, so the steps hold what a run's last third holds), runs warm-up and
timed training steps (forward, backward, AdamW) at batch --batch-size on random
tokens, and prints one JSON object. AdamW's m and v are written once before the
steps, so they are resident as in any step after the first.

    rss_*_mib          VmRSS after start, imports (+ numba warm-up), loading, method set-up
    rss_*_parts        the same split into RssAnon and RssFile (file pages: libraries, the GGUF map)
    load_peak_mib      VmHWM after loading (the loader's peak)
    step_peak_mib      VmHWM over all steps: the kernel's high-water mark is reset
                       (`echo 5 > /proc/self/clear_refs`) just before the first step
    steady_peak_mib    the same over the timed steps only (reset after warm-up)
    peak_rss_mib       the whole process, loading included (the largest of the high-water
                       mark read before the reset, the warm-up steps' and ru_maxrss after)
    store_peak_bytes   the ActivationStore's own peak (bytes_peak) and per site kind
    step_seconds       each timed step; median, tokens/s
    plan               minilars.planner's prediction for the same run

--baseline measures the runtime baseline the planner adds (imports, backend,
tokenizer; no weights). Method "frozen" runs the no-grad forward (the inference floor).
A run does not keep the model's tokenizer (its steps read random ids), and gives the
freed heap back after loading and after calibration, as `minilars finetune` does; the
plan it reports leaves the tokenizer out accordingly.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time

MIB = 2**20


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def hwm_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def anon_file_mib() -> dict:
    """RSS split into anonymous memory (the heap, arrays) and file-backed pages (the
    libraries' code, the memory-mapped GGUF's blocks), which the kernel can drop and
    read again under memory pressure."""
    return {key: (None if (kib := _status_kib(key)) is None else kib / 1024) for key in ("RssAnon", "RssFile")}


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_hwm() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current RSS, so
    the next read is the peak of what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


RSS_START = rss_mib()  # before numpy and minilars are imported


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m minilars.bench.memory_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name, .gguf, HF directory, or 'tiny' (random weights)")
    # Not imported to list the choices: --baseline measures RSS without minilars.methods loaded.
    p.add_argument("--method", default="lars",
                   help="a registered training method (minilars/methods/); frozen = no-grad forward "
                        "(default: %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="LARS basis rank or LoRA rank (default: %(default)s)")
    p.add_argument("--storage", default="default",
                   help="LARS activation storage, e.g. default, exact, block=recompute,input.x=half (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row T (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per step B (default: %(default)s)")
    p.add_argument("--backend", default=None, choices=("numpy", "numba", "torch"),
                   help="kernel backend (default: numba where it imports, else numpy)")
    from minilars.pretrained import WEIGHT_FORMATS, WEIGHTS_HELP

    p.add_argument("--weights", default="keep", choices=WEIGHT_FORMATS, help=WEIGHTS_HELP + " (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (default: %(default)s)")
    p.add_argument("--calibration-tokens", type=int, default=512,
                   help="LARS calibrates on the first this many tokens of the batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random tokens and adapter init (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the JSON result here as well as to stdout")
    p.add_argument("--baseline", action="store_true",
                   help="only measure the runtime baseline: imports, backend, tokenizer (no weights)")
    return p.parse_args(argv)


def _backend(name):
    from minilars.backends import default_backend_name, get_backend

    name = name or default_backend_name()
    backend = get_backend(name)
    if name == "numba":  # compile, or load from numba's cache, before anything is measured
        from minilars.backends.numba_backend import warmup

        warmup(("float32",))
    return name, backend


def _load(args, backend):
    """The Model with --weights weights ('tiny': random, from --seed)."""
    from minilars.pretrained import load_model

    model, _tokenizer = load_model(args.model, backend, args.weights, seed=args.seed)
    return model


def _method(args):
    from minilars.methods import MethodConfig

    return MethodConfig.from_options(args.method, {"rank": args.rank, "storage": args.storage}, seed=args.seed)


def measure_baseline(args) -> dict:
    """RSS with minilars, the backend and the tokenizer loaded, no weights. On numba the
    GGUF block decoders are compiled afterwards (into numba's on-disk cache, so that the
    measured runs that follow only load those they use: compiling takes LLVM memory)."""
    backend_name, _ = _backend(args.backend)
    rss_imports = rss_mib()
    tokenizer_mib = None
    if args.model != "tiny":
        from minilars.models import resolve_model

        path = resolve_model(args.model)
        if path.suffix == ".gguf":
            from minilars.models import Tokenizer
            from minilars.models.gguf_loader import open_gguf
            from minilars.pretrained import return_freed_heap

            reader = open_gguf(path)
            tok = Tokenizer.from_gguf(path, reader=reader)
            del reader
            gc.collect()
            return_freed_heap()  # as load_model does: the reader's parse is freed memory
            tokenizer_mib = rss_mib() - rss_imports
            del tok
    gc.collect()
    result = {"mode": "baseline", "backend": backend_name, "rss_start_mib": RSS_START, "rss_imports_mib": rss_imports,
              "tokenizer_mib": tokenizer_mib, "baseline_mib": rss_imports + (tokenizer_mib or 0),
              "malloc": _malloc_env()}
    if backend_name == "numba":
        from minilars.backends.quant_kernels import warmup

        warmup()
    return result


def _malloc_env() -> str:
    keys = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    return " ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ) or "glibc default"


def run(args) -> dict:
    import numpy as np

    from minilars.methods import apply_method
    from minilars.optim import AdamW
    from minilars.planner import plan_memory
    from minilars.pretrained import return_freed_heap

    result = {"mode": "run", "model": args.model, "method": args.method, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "weights": args.weights, "malloc": _malloc_env(),
              "rss_start_mib": RSS_START}
    backend_name, backend = _backend(args.backend)
    result["backend"] = backend_name
    result["rss_imports_mib"] = rss_mib()
    result["rss_imports_parts"] = anon_file_mib()
    t0 = time.perf_counter()
    model = _load(args, backend)  # the tokenizer is not kept: the steps run on random ids
    gc.collect()
    return_freed_heap()
    result["load_seconds"] = time.perf_counter() - t0
    result["rss_loaded_mib"] = rss_mib()
    result["rss_loaded_parts"] = anon_file_mib()
    result["load_peak_mib"] = hwm_mib()

    method = _method(args)
    rng = np.random.default_rng(args.seed)
    vocab = model.cfg.vocab_size
    tokens = rng.integers(0, vocab, (args.batch_size, args.seq_len))
    targets = rng.integers(0, vocab, (args.batch_size, args.seq_len))
    calibration = tokens[:, :args.calibration_tokens] if method.kind.needs_calibration else None
    apply_method(model, method, calibration)
    method.kind.refresh_all(model, calibration)  # as in a run's steps after its last refresh (LARS: folded factors)
    gc.collect()
    return_freed_heap()  # the calibration forward's work, freed (finetune does the same)
    result["method_described"] = method.describe()
    result["storage"] = args.storage if method.kind.reads("storage") else ""
    result["rank"] = args.rank if method.kind.has_rank else None
    result["n_trainable"] = model.n_trainable()
    training = method.kind.trains
    optimizer = AdamW(model.trainable(), model.be) if training else None
    if optimizer is not None:  # zeros_like leaves m and v unmapped until the first update
        for state in (*optimizer.m.values(), *optimizer.v.values()):  # writes: resident, as
            state[...] = 0  # in every step after the first, even with --warmup 0
    gc.collect()
    result["rss_ready_mib"] = rss_mib()
    result["rss_ready_parts"] = anon_file_mib()

    from minilars.pretrained import weight_format_of, weight_summary

    result["weights_held"] = weight_summary(model)
    plan = plan_memory(model.cfg, method, args.seq_len, args.batch_size, weight_format_of(model), backend_name,
                       inference=not training, model_name=args.model, tokenizer=False)
    result["plan"] = {"total": plan.total, "baseline": plan.baseline, "weights": plan.weights,
                      "trainable": plan.trainable, "optimizer": plan.optimizer, "gradients": plan.gradients,
                      "activation_store": plan.activation_store, "transient": plan.transient,
                      "store_peak": plan.store_peak, "peak_phase": plan.peak_phase}

    def step() -> float:
        if not training:
            return float(model.forward(tokens, targets, need_grad=False).loss)
        tape = model.forward(tokens, targets)
        grads = model.backward(tape)
        optimizer.step(grads)
        store_peaks.append((tape.store.bytes_peak, tape.store.peak_by_kind()))
        loss = float(tape.loss)
        del tape, grads  # nothing of this step is alive when the next one starts
        return loss

    store_peaks: list = []
    # clear_refs resets the counter ru_maxrss reads too: keep the peak so far
    result["pre_step_peak_mib"] = hwm_mib()
    result["hwm_reset"] = reset_hwm()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            result["step_peak_warmup_mib"] = hwm_mib() if args.warmup else None
            reset_hwm()
        start = time.perf_counter()
        losses.append(step())
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result["steady_peak_mib"] = hwm_mib()
    result["rss_after_steps_parts"] = anon_file_mib()
    warm = result.get("step_peak_warmup_mib")
    result["step_peak_mib"] = max(result["steady_peak_mib"], warm) if warm else result["steady_peak_mib"]
    # the warm-up step's peak too: the reset before the timed steps cleared it from ru_maxrss
    result["peak_rss_mib"] = max(result["pre_step_peak_mib"] or 0, warm or 0, maxrss_mib())
    if store_peaks:
        result["store_peak_bytes"] = max(p for p, _ in store_peaks)
        result["store_peak_by_kind"] = store_peaks[-1][1]
    else:
        result["store_peak_bytes"] = 0
    result["step_seconds"] = times
    result["median_step_seconds"] = float(np.median(times)) if times else None
    result["tokens_per_second"] = (args.batch_size * args.seq_len / result["median_step_seconds"]
                                   if times else None)
    result["loss"] = losses[-1] if losses else None
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = measure_baseline(args) if args.baseline else run(args)
        status = 0
    except MemoryError as exc:
        result, status = {"error": f"MemoryError: {exc}"}, 3
    except Exception as exc:  # reported as a row of the table, not a crash of the sweep
        result, status = {"error": f"{type(exc).__name__}: {exc}"}, 1
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
