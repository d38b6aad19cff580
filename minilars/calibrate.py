"""Calibration: the activation subspaces LARS trains and stores in (docs/lars.md Part 1.1).

One no-grad forward over calibration tokens, block by block: while block i runs,
its four stream inputs (and any cache field whose storage policy is
`subspace(r, calibration)`) are captured, turned into orthonormal bases with the
randomized range finder, and dropped before block i+1 runs. So calibration needs
one block's activations at a time, never the whole model's.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from .backends import Array
from .model import Model
from .sites import LinearSite
from .store import Subspace, _is_array, _site_kind
from .weights import STREAMS


class _Recorder(LinearSite):
    """Wraps a site: passes its forward through and remembers the input."""

    def __init__(self, inner: LinearSite):
        self.inner = inner
        self.seen: Array | None = None

    def forward(self, x, be):
        self.seen = x
        return self.inner.forward(x, be)


def calibrate(model: Model, tokens, rank: int | None, seed: int = 0,
              streams: tuple[str, ...] = tuple(STREAMS), token_mask=None,
              whiten: bool = False, stream_scale: dict[str, float] | None = None
              ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Returns (stream_bases, storage_bases):
    stream_bases["blocks.{i}.{stream}"] = P (d_in, rank), the top-`rank` directions of
    that stream's inputs (none when rank is None);
    storage_bases["blocks.{i}.{site}.{field}"] = Q (width, r) for every field that
    model.plan keeps as subspace(r, calibration).

    token_mask (B, T) bool, optional: only the positions where it is True count
    (padding excluded: its activations carry no loss, and a row padded to T would
    otherwise spend directions of the basis on repeats of the pad token). The
    forward still runs over every position, so with causal attention the kept
    positions see exactly what they see in training.

    whiten: each stream basis's columns are divided by the rms of z = x P over the
    kept tokens (Backend.whiten_columns), so an optimiser step on M moves every direction's
    output alike instead of most along the high-energy ones.

    stream_scale {stream: c}: that stream's basis (after any whitening) is c P, so a
    step of Adam on M (whose size does not follow the gradient's) changes the
    stream's output c times as much: a per-stream step size that is a change of basis."""
    be = model.be
    stream_bases: dict[str, Array] = {}
    storage_bases: dict[str, Array] = {}

    def capture(site: str, cache, kept, n_tokens: int) -> None:
        kind = _site_kind(site)
        for field in dataclasses.fields(cache):
            value = getattr(cache, field.name)
            policy = model.plan.policy_for(f"{kind}.{field.name}")
            size = math.prod(value.shape) if _is_array(value) else 0
            if isinstance(policy, Subspace) and policy.source == "calibration" and size and size % n_tokens == 0:
                matrix = value.reshape(n_tokens, size // n_tokens)
                storage_bases[f"{site}.{field.name}"] = be.orthonormal_range(kept(matrix), policy.rank, seed=seed)

    for i, inputs in stream_inputs(model, tokens, token_mask, streams, capture):
        if rank is not None:
            for stream, x in inputs.items():
                basis = be.orthonormal_range(x, rank, seed=seed + i)
                basis = be.whiten_columns(x, basis) if whiten else basis
                if stream in (stream_scale or {}):
                    be.scale_(basis, stream_scale[stream])
                stream_bases[f"blocks.{i}.{stream}"] = basis
    return stream_bases, storage_bases


def stream_inputs(model: Model, tokens, token_mask=None, streams: tuple[str, ...] = tuple(STREAMS),
                  on_cache: Callable | None = None) -> Iterator[tuple[int, dict[str, Array]]]:
    """One no-grad forward over tokens (B, T), block by block: yields (i, {stream: X})
    after block i ran, X (N_kept, d_in) the input that stream's sites read at the
    positions token_mask keeps (all when None). A block's inputs are dropped when the
    next block runs, so a caller that keeps nothing holds one block's activations.
    on_cache(site, cache, kept, n_tokens), optional, sees every site's backward cache
    (kept(matrix) selects a (N, width) matrix's kept rows)."""
    be, cfg = model.be, model.cfg
    tokens = be.asarray(tokens if hasattr(tokens, "device") else np.asarray(tokens), "int64")
    batch, seq_len = model._check_tokens(tokens)
    n_tokens = batch * seq_len
    keep = _kept_rows(token_mask, batch, seq_len, be)

    def kept(matrix):  # (N, width) -> (N_kept, width)
        return matrix if keep is None else matrix[keep]

    def capture(site: str, cache) -> None:
        if on_cache is not None:
            on_cache(site, cache, kept, n_tokens)

    x, _ = model._embed(tokens)
    for i in range(cfg.n_layers):
        block = model.sites[i]
        recorders = {stream: _Recorder(block[stream]) for stream in streams}
        block.update(recorders)
        try:
            x = model._block_forward(i, x, batch, seq_len, capture)
        finally:
            block.update({stream: rec.inner for stream, rec in recorders.items()})
        yield i, {stream: kept(rec.seen) for stream, rec in recorders.items()}


def _kept_rows(token_mask, batch: int, seq_len: int, be):
    """Flat row indices (into N = B*T) of the positions token_mask keeps; None keeps all."""
    if token_mask is None:
        return None
    mask = np.asarray(token_mask, dtype=bool)
    if mask.shape != (batch, seq_len):
        raise ValueError(f"calibration mask has shape {mask.shape}, the tokens {(batch, seq_len)}")
    if not mask.any():
        raise ValueError("calibration mask keeps no token")
    return None if mask.all() else be.asarray(np.flatnonzero(mask.reshape(-1)), "int64")
