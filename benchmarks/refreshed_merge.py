"""The refreshed LARS site's effective weight: one low-rank product or two.

After refresh() a LARS site's effective weight is W + P_f M_f + P M (docs/lars.md
Part 1.6), formed each time its block runs, forward and in the recompute.
`LARSSite.to_linear` forms it as one product over the stacked factors,
W + [P_f P] [M_f; M]; before, it was two be.add_low_rank calls, (W + P M) + P_f M_f,
whose second call makes one more pass over the (d_in, d_out) weight and runs a
thinner product. This script times the two, paired so that a drift in the
machine's load hits both:

- `--merges`: one block's four merges (SmolLM2-135M's streams, rank 16, two
  refreshes), median and min ms over --repeats pairs, the two forms alternating;
- `--steps T`: a LARS default step (SmolLM2-135M shapes, random weights, AdamW,
  both refreshes done) on numba, in the order AB BA ..., --repeats pairs; the
  per-pair ratio, the machine's matmul GFLOP/s and the load.

    python benchmarks/refreshed_merge.py --merges
    python benchmarks/refreshed_merge.py --steps 512 --repeats 6
"""
from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import minilars  # noqa: F401  before numpy: OPENBLAS_THREAD_TIMEOUT (docs/speed.md)
import numpy as np

from minilars.adapters import LARSSite
from minilars.bench.common import random_lars_step
from minilars.bench.speed import paired_steps
from minilars.optim import AdamW
from minilars.sites import dense_weight

STACKED = LARSSite.to_linear


def two_products(site: LARSSite, be):
    """The form before: W + P M, then + P_f M_f, two be.add_low_rank calls."""
    w = be.add_low_rank(dense_weight(site.weight, be), site.basis, site._columns(site.M, be))
    if site.folded_basis is not None:
        w = be.add_low_rank(w, site.folded_basis, site._columns(site.folded_M, be))
    return w


@contextmanager
def merging_with(form):
    LARSSite.to_linear = form
    try:
        yield
    finally:
        LARSSite.to_linear = STACKED


def time_merges(repeats: int) -> None:
    model, _, _ = random_lars_step(256)
    be = model.be
    sites = [site for site in model.sites[0].values() if isinstance(site, LARSSite)]
    for site in sites:  # the same sums in another order
        np.testing.assert_allclose(be.to_numpy(site.to_linear(be)), be.to_numpy(two_products(site, be)),
                                   rtol=1e-5, atol=1e-6)
    runs = {"stacked": [], "two": []}
    forms = {"stacked": STACKED, "two": two_products}
    for i in range(repeats):
        for name in (("stacked", "two") if i % 2 == 0 else ("two", "stacked")):
            start = time.perf_counter()
            for site in sites:
                forms[name](site, be)
            runs[name].append(time.perf_counter() - start)
    cells = {k: f"{np.median(v) * 1e3:.2f} ({min(v) * 1e3:.2f})" for k, v in runs.items()}
    print(f"one block's merges (rank 16, two refreshes), median (min) ms over {repeats} pairs: "
          f"one product {cells['stacked']}, two products {cells['two']}; load {os.getloadavg()[0]:.1f}")


def time_steps(seq_len: int, repeats: int) -> None:
    model, tokens, targets = random_lars_step(seq_len)
    optimizer = AdamW(model.trainable(), model.be)

    def step(form) -> float:
        with merging_with(form):
            start = time.perf_counter()
            optimizer.step(model.backward(model.forward(tokens, targets)))
            return time.perf_counter() - start

    paired_steps(f"T = {seq_len}", ("one product", lambda: step(STACKED)), ("two", lambda: step(two_products)),
                 repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--merges", action="store_true", help="time one block's merges alone")
    p.add_argument("--steps", type=int, metavar="T", help="time LARS default steps at sequence length T")
    p.add_argument("--repeats", type=int, default=30, help="pairs (default: %(default)s)")
    args = p.parse_args(argv)
    if not (args.merges or args.steps):
        p.error("give --merges or --steps T")
    if args.merges:
        time_merges(args.repeats)
    if args.steps:
        time_steps(args.steps, args.repeats)


if __name__ == "__main__":
    main()
