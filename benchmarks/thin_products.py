"""Thin (rank-r) products on one thread against numpy's multithreaded BLAS.

NumbaBackend runs an adapter's rank-r products (a side of at most THIN_RANK, at
most THIN_WORK multiply-adds) on one thread (numba_kernels.dot_one_thread); numpy's
BLAS splits them over every thread, and on a busy machine waits for them
(docs/speed.md, "Thin products on one thread"). Two measurements, each pairing the
two ways call by call or step by step, so a drift in the machine's load hits both:

- `--products`: the LARS products of SmolLM2-135M (z^T dy, x P, P M), median and
  min milliseconds over --repeats pairs;
- `--steps T`: a LARS default step (SmolLM2-135M shapes, random weights, AdamW) on
  numba with the routing on (THIN_RANK = 64) and off (0), in the order AB BA ...,
  --repeats pairs; the per-pair ratio, the machine's matmul GFLOP/s and the load.

    python benchmarks/thin_products.py --products
    python benchmarks/thin_products.py --steps 512 --repeats 6
"""
from __future__ import annotations

import argparse
import os
import time

import minilars  # noqa: F401  before numpy: OPENBLAS_THREAD_TIMEOUT (docs/speed.md)
import numpy as np

from minilars.backends import numba_backend
from minilars.backends import numba_kernels as K
from minilars.bench.common import random_lars_step
from minilars.bench.speed import paired_steps
from minilars.optim import AdamW

RANK = 16


def product_cases(rng) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, a, b) with a b the product: LARS's at SmolLM2-135M's widths."""
    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    cases = []
    for n in (512, 2048):
        for width in (576, 960, 3072):
            cases.append((f"z^T dy, N = {n}, d_out = {width}", normal(n, RANK).T, normal(n, width)))
        for d_in in (576, 1536):
            cases.append((f"x P, N = {n}, d_in = {d_in}", normal(n, d_in), normal(d_in, RANK)))
    for d_in, d_out in ((576, 960), (576, 3072), (1536, 576)):
        cases.append((f"P M, {d_in} x {d_out}", normal(d_in, RANK), normal(RANK, d_out)))
    return cases


def time_products(repeats: int) -> None:
    print(f"| product | numpy, median (min) ms | one thread, median (min) ms |  load {os.getloadavg()[0]:.1f}")
    print("|---|---|---|")
    for name, a, b in product_cases(np.random.default_rng(0)):
        out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        runs = {"numpy": [], "one": []}
        a @ b, K.dot_one_thread(a, b, out)
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            t1 = time.perf_counter()
            K.dot_one_thread(a, b, out)
            runs["numpy"].append(t1 - t0)
            runs["one"].append(time.perf_counter() - t1)
        cells = [f"{np.median(v) * 1e3:.2f} ({min(v) * 1e3:.2f})" for v in runs.values()]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def time_steps(seq_len: int, repeats: int) -> None:
    model, tokens, targets = random_lars_step(seq_len)
    optimizer = AdamW(model.trainable(), model.be)
    rank = numba_backend.THIN_RANK

    def step(one_thread: bool) -> float:
        numba_backend.THIN_RANK = rank if one_thread else 0
        start = time.perf_counter()
        optimizer.step(model.backward(model.forward(tokens, targets)))
        return time.perf_counter() - start

    try:
        paired_steps(f"T = {seq_len}", ("one thread", lambda: step(True)), ("numpy", lambda: step(False)), repeats)
    finally:
        numba_backend.THIN_RANK = rank


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", action="store_true", help="time the LARS products alone")
    p.add_argument("--steps", type=int, metavar="T", help="time LARS default steps at sequence length T")
    p.add_argument("--repeats", type=int, default=30, help="pairs (default: %(default)s)")
    args = p.parse_args(argv)
    if not (args.products or args.steps):
        p.error("give --products or --steps T")
    if args.products:
        time_products(args.repeats)
    if args.steps:
        time_steps(args.steps, args.repeats)


if __name__ == "__main__":
    main()
