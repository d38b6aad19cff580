"""Training-step speed: tokens/s for LARS, LoRA and full, numpy vs numba, side by side.

Every (backend, method, T) runs in one process here, alternating backends so a
drift in the machine's speed hits both alike. The achieved GFLOP/s counts the
step's matmul and attention work (forward, backward, and the recomputed forward
for LARS's default recipe) and is printed next to this machine's matmul GFLOP/s,
measured in the same run. The numba backend's first-run compile time (empty on-disk
cache) or cache-load time is printed first."""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from minilars.commands.common import comma_separated

from .common import load_model, print_table, random_batch, write_csv
from .profile import timed_backend


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model (default: %(default)s)")
    parser.add_argument("--seq-lens", default="512,2048", type=comma_separated(int, "512,2048"),
                        help="T values, comma separated (default: %(default)s)")
    parser.add_argument("--methods", default="lars,lora,full", type=comma_separated(str, "lars,lora"),
                        help="comma separated from lars (default recipe), lars-fast (--storage fast), lars-unrefreshed "
                             "(the default without --refreshes), lora, full "
                             "(default: %(default)s)")
    parser.add_argument("--backends", default="numpy,numba", type=comma_separated(str, "numpy,numba"), help="comma separated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (default: %(default)s)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, run one more with every backend call timed and print "
                             "where its time went (minilars/bench/profile.py)")


REFERENCE = "lora"  # the configuration whose step time the "step time / LoRA's" column divides by


def matmul_gflops(seconds: float = 1.0) -> float:
    """This machine's float32 GEMM rate for an engine-shaped product (2048x576 @ 576x1536)."""
    a = np.random.default_rng(0).standard_normal((2048, 576)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((576, 1536)).astype(np.float32)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 2048 * 576 * 1536 * count / (time.perf_counter() - start) / 1e9


def paired_steps(label: str, first: tuple[str, Callable[[], float]], second: tuple[str, Callable[[], float]],
                 repeats: int) -> None:
    """Time two ways of one step in one process, in the order AB BA AB ... (after a warm-up
    of each), so a drift in the machine's load hits both; each callable returns its
    seconds. Prints every pair, then the medians, the per-pair ratio first / second,
    the machine's matmul GFLOP/s and the load (benchmarks/thin_products.py,
    benchmarks/refreshed_merge.py)."""
    (name_a, run_a), (name_b, run_b) = first, second
    run_a(), run_b()  # warm-up
    times: dict[str, list[float]] = {name_a: [], name_b: []}
    for i in range(repeats):
        for name, run in (first, second) if i % 2 == 0 else (second, first):
            times[name].append(run())
        print(f"pair {i}: {name_a} {times[name_a][-1]:.2f} s, {name_b} {times[name_b][-1]:.2f} s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    a, b = np.array(times[name_a]), np.array(times[name_b])
    ratio = a / b
    print(f"{label}: median {name_a} {np.median(a):.3f} s, {name_b} {np.median(b):.3f} s; per-pair ratio median "
          f"{np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f}); matmul {matmul_gflops():.0f} GFLOP/s; "
          f"load {os.getloadavg()[0]:.1f}")


def step_flops(cfg, seq_len: int, method, recompute: bool, recompute_attention: bool = True,
               labelled: int | None = None) -> float:
    """Matmul + attention FLOPs of one step at batch 1 (2 per multiply-add) under
    `method` (a MethodConfig or a method's name). recompute: backward reruns each
    block's forward (but the down projection); recompute_attention False: except the
    attention kernel as well (the attention output was kept). labelled: the tokens
    with a label (default all); the head runs on those rows only (ops.cross_entropy_forward)."""
    from minilars.methods import method_class

    kind = method_class(method if isinstance(method, str) else method.name)
    n = seq_len
    proj = cfg.dim * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim
    attention = 2 * n * n * cfg.n_heads * cfg.head_dim  # causal half of QK^T and PV: 2 * (n^2/2) * 2
    forward = 2 * n * proj + attention
    backward = (2 * n * proj) * (2 if kind.weight_gradients else 1) + 2.5 * attention  # dx (+ dW)
    rows = n if labelled is None else labelled
    head = 2 * rows * cfg.dim * cfg.vocab_size * (3 if kind.trains_embeddings else 2)  # logits, dx (+ dE)
    recomputed = forward - 2 * n * cfg.ffn_dim * cfg.dim  # the recompute skips the frozen down projection
    if not recompute_attention:
        recomputed -= attention
    return cfg.n_layers * (forward + (recomputed if recompute else 0) + backward) + head


def _print_step_profile(model, opt, tokens, targets, title: str) -> None:
    with timed_backend(model.be) as profile:
        started = time.perf_counter()
        opt.step(model.backward(model.forward(tokens, targets)))
        step = time.perf_counter() - started
    print(f"\nprofiled step ({title}): {step:.2f} s, {profile.total():.2f} s of it in backend calls")
    print_table(profile.rows(step, top=15))
    print()


def run(args) -> int:
    from minilars.backends import get_backend
    from minilars.methods import LARS_FAST_STORAGE, MethodConfig, apply_method
    from minilars.optim import AdamW

    rows = []
    backends = list(args.backends)
    if "numba" in backends:
        started = time.perf_counter()
        try:
            from minilars.backends.numba_backend import warmup
            warmup(("float32",))
            print(f"numba: kernels compiled or loaded from the cache in {time.perf_counter() - started:.1f} s")
        except ImportError as exc:
            print(f"numba backend unavailable ({exc}); skipping it")
            backends.remove("numba")
    gflops_machine = matmul_gflops()
    print(f"this machine's float32 matmul: {gflops_machine:.1f} GFLOP/s")
    models = {name: load_model(args.model, backend=get_backend(name)) for name in backends}
    configs = {"lars": MethodConfig.lars_default(), "lars-fast": MethodConfig("lars", storage=LARS_FAST_STORAGE),
               "lars-unrefreshed": MethodConfig.lars_default(extra=(("refreshes", 0),)),
               "lora": MethodConfig("lora", rank=8), "full": MethodConfig("full")}
    methods = args.methods
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise SystemExit(f"bench speed: unknown method {unknown[0]!r}; choose from {', '.join(configs)}")
    for seq_len in args.seq_lens:
        tokens, targets = random_batch(models[backends[0]].cfg.vocab_size, 1, seq_len)
        for method in methods:
            for name in backends:
                model = models[name]
                apply_method(model, configs[method], calibration_tokens=tokens[:, :512])
                configs[method].kind.refresh_all(model, tokens[:, :512])  # a step after the last refresh
                opt = AdamW(model.trainable(), model.be)
                times = []
                for step in range(args.steps + 1):
                    started = time.perf_counter()
                    tape = model.forward(tokens, targets)
                    opt.step(model.backward(tape))
                    if step:
                        times.append(time.perf_counter() - started)
                seconds = float(np.median(times))
                if args.profile:
                    _print_step_profile(model, opt, tokens, targets, f"T = {seq_len}, {method}, {name}")
                flops = step_flops(model.cfg, seq_len, configs[method], model.plan.recompute_blocks,
                                   recompute_attention=not model.plan.keeps_attention_output)
                rows.append({"T": seq_len, "method": method, "backend": name, "step s": seconds,
                             "tokens/s": seq_len / seconds, "GFLOP/s": flops / seconds / 1e9,
                             "machine GFLOP/s": gflops_machine})
                if configs[method].kind.weight_gradients:  # it rewrote the weights: reload for the next method
                    models[name] = load_model(args.model, backend=get_backend(name))
        base = {(r["T"], r["method"]): r["step s"] for r in rows if r["backend"] == "numpy"}
        lora = {(r["T"], r["backend"]): r["step s"] for r in rows if r["method"] == REFERENCE}
        for r in rows:
            if (r["T"], r["method"]) in base:
                r["speed-up vs numpy"] = base[(r["T"], r["method"])] / r["step s"]
            if (r["T"], r["backend"]) in lora:
                r["step time / LoRA's"] = r["step s"] / lora[(r["T"], r["backend"])]
    print_table(rows)
    if args.csv:
        write_csv(rows, args.csv)
    return 0
