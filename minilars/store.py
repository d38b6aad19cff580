"""The activation store: every tensor that any backward keeps goes through here.

A forward op returns `(y, cache)`; the model hands the cache to `store.keep(site,
cache)` and gets it back in backward with `store.take(site)`. Each array field of a
cache is kept under the policy that the StoragePlan names for it (docs/lars.md, Part 2):

    exact        the array as it is
    half         a float16 copy
    offload      a float16 copy written to a file (minilars/offload.py), not held in
                 RAM; `offload(DIR)` names the directory (default: the system temp
                 dir). Counted as disk bytes (disk_now, disk_peak), not in bytes_now
    subspace(r)  coefficients C = X Q (N, r) of the token-major matrix X (N, width),
                 Q (width, r) orthonormal, from the current batch (randomized range
                 finder) or from calibration; backward sees X_hat = C Q^T
    recompute    (block level) nothing of the block but its input; see model.py. With
                 an attn.o rule of its own, also the attention output O (under that
                 rule) and log-sum-exp, so backward skips the attention forward

The store counts the bytes it holds, now and at peak, per site and in total, so the
engine knows its own activation memory exactly. An array kept `exact` under two
sites (the attention output read by the o projection's adapter, say) is one
buffer and counted once.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Mapping

from .backends import Array, Backend


# ---------------------------------------------------------------- policies
@dataclass(frozen=True)
class Exact:
    """Keep the array as it is."""

    def __str__(self) -> str:
        return "exact"


@dataclass(frozen=True)
class Half:
    """Keep a float16 copy (relative error ~ 2^-11 per element)."""

    def __str__(self) -> str:
        return "half"


@dataclass(frozen=True)
class Offload:
    """Write a float16 copy to an unlinked file in `directory` (None: the system temp
    dir) and read it back in backward: the same values as Half, on disk, not in RAM."""

    directory: str | None = None

    def __str__(self) -> str:
        return f"offload({self.directory})" if self.directory else "offload"


@dataclass(frozen=True)
class Subspace:
    """Keep C = X Q with Q (width, rank) orthonormal. source: 'batch' computes Q from
    the array being stored; 'calibration' uses the basis calibrated for this site."""

    rank: int
    source: str = "batch"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"subspace rank must be >= 1, got {self.rank}")
        if self.source not in ("batch", "calibration"):
            raise ValueError(f"subspace source must be 'batch' or 'calibration', got {self.source!r}")

    def __str__(self) -> str:
        return f"subspace({self.rank}{', calibration' if self.source == 'calibration' else ''})"


@dataclass(frozen=True)
class Recompute:
    """Block level: keep only the block's input; backward reruns the block forward."""

    def __str__(self) -> str:
        return "recompute"


Policy = Exact | Half | Offload | Subspace | Recompute

_POLICY_RE = re.compile(r"^\s*(exact|half|recompute|subspace)\s*(?:\(\s*(\d+)\s*(?:,\s*(batch|calibration)\s*)?\))?\s*$")


_OFFLOAD_RE = re.compile(r"^\s*offload\s*(?:\(\s*([^()]*?)\s*\))?\s*$")


def parse_policy(text: str | Policy) -> Policy:
    """'exact', 'half', 'offload', 'offload(/a/dir)', 'recompute', 'subspace(32)',
    'subspace(32, calibration)'."""
    if not isinstance(text, str):
        return text
    offload = _OFFLOAD_RE.match(text)
    if offload:
        return Offload(offload.group(1) or None)
    match = _POLICY_RE.match(text)
    if not match:
        raise ValueError(f"cannot read storage policy {text!r}; expected exact, half, offload, offload(DIR), "
                         "recompute, subspace(R) or subspace(R, calibration)")
    kind, rank, source = match.groups()
    if kind == "subspace":
        if rank is None:
            raise ValueError(f"subspace policy needs a rank, e.g. 'subspace(32)', got {text!r}")
        return Subspace(int(rank), source or "batch")
    if rank is not None:
        raise ValueError(f"policy {kind!r} takes no rank, got {text!r}")
    return {"exact": Exact(), "half": Half(), "recompute": Recompute()}[kind]


@dataclass(frozen=True)
class StoragePlan:
    """Which policy each kept field gets. Keys are field keys without the block index
    ("attn.q", "mlp.gate", "attn_norm.x"), group wildcards ("attn.*"), "block" (for
    recompute) or "*" (everything else). Unnamed fields are kept exact."""

    rules: tuple[tuple[str, Policy], ...] = ()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str | Policy] | None) -> "StoragePlan":
        rules = tuple((key, parse_policy(value)) for key, value in (mapping or {}).items())
        for key, policy in rules:
            if isinstance(policy, Recompute) and key != "block":
                raise ValueError(f"recompute is a block-level policy: use {{'block': 'recompute'}}, not {key!r}")
        plan = cls(rules)
        approximate = [f for f in ("attn.q", "attn.k") if isinstance(plan.policy_for(f), Subspace)]
        if approximate:
            warnings.warn(f"subspace storage of {' and '.join(approximate)}: attention backward recomputes "
                          "exp(S - lse) from the approximate scores and the exact log-sum-exp, so small errors "
                          "in q or k become large gradient errors (docs/lars.md measured a relative error of 1e5 "
                          "at rank 16 on SmolLM2-135M); keep them exact or half", UserWarning, stacklevel=2)
        return plan

    def policy_for(self, field_key: str) -> Policy:
        table = dict(self.rules)
        group = field_key.split(".", 1)[0] + ".*"
        for key in (field_key, group, "*"):
            if key in table and not (key == "*" and field_key == "block"):
                return table[key]
        return Exact()

    @property
    def recompute_blocks(self) -> bool:
        return isinstance(self.policy_for("block"), Recompute)

    @property
    def keeps_attention_output(self) -> bool:
        """block=recompute with an attn.o rule of its own: the forward keeps each block's
        attention output O (under that policy) and log-sum-exp besides its input, and
        backward rebuilds the attention cache without rerunning the attention kernel.
        Costs H hd + H floats per token per block; saves a T^2 forward per block."""
        return self.recompute_blocks and "attn.o" in dict(self.rules)

    def describe(self) -> str:
        return ", ".join(f"{k}={p}" for k, p in self.rules) or "exact"


# ---------------------------------------------------------------- kept forms
@dataclass
class _KeptSubspace:
    coeffs: Array  # C (rows, r)
    basis: Array  # Q (width, r)
    shape: tuple  # original shape
    dtype: Any
    basis_shared: bool  # a calibrated basis belongs to the plan, not to this step


def _site_kind(site: str) -> str:
    """'blocks.3.attn' -> 'attn'; 'head' -> 'head'."""
    return re.sub(r"^blocks\.\d+\.", "", site)


class ActivationStore:
    """Holds the caches between forward and backward and counts their bytes."""

    def __init__(self, backend: Backend, plan: StoragePlan | None = None,
                 bases: Mapping[str, Array] | None = None, seed: int = 0):
        self.backend = backend
        self.plan = plan or StoragePlan()
        self.bases = bases or {}  # calibrated Q per site field key ("blocks.3.attn.q")
        self.seed = seed
        self.n_tokens = 0
        self._caches: dict[str, tuple[type, dict[str, Any]]] = {}
        self._buffers: dict[tuple, list] = {}  # buffer key -> [array, refcount, site]
        self.bytes_now = 0
        self.bytes_peak = 0
        self.site_now: dict[str, int] = defaultdict(int)
        self.site_peak: dict[str, int] = defaultdict(int)
        self.disk_now = 0  # bytes the offload policy holds in its file
        self.disk_peak = 0
        self._offload_files: dict[str | None, Any] = {}  # directory -> the backend's open_offload

    # ---------------------------------------------------------------- accounting
    def _hold(self, array: Array, site: str) -> Array:
        entry = self._buffers.get(_buffer_key(array))
        if entry is not None:
            entry[1] += 1
            return array
        nbytes = self.backend.nbytes(array)
        self._buffers[_buffer_key(array)] = [array, 1, site]
        self.bytes_now += nbytes
        self.site_now[site] += nbytes
        self.site_peak[site] = max(self.site_peak[site], self.site_now[site])
        self.bytes_peak = max(self.bytes_peak, self.bytes_now)
        return array

    def _release(self, array: Array) -> None:
        key = _buffer_key(array)
        entry = self._buffers[key]
        entry[1] -= 1
        if entry[1] == 0:
            nbytes = self.backend.nbytes(array)
            self.bytes_now -= nbytes
            self.site_now[entry[2]] -= nbytes
            del self._buffers[key]

    def reset_peak(self) -> None:
        self.bytes_peak = self.bytes_now
        self.site_peak = defaultdict(int, self.site_now)

    def held_arrays(self) -> list[Array]:
        """Every distinct buffer held now (their nbytes sum to bytes_now)."""
        return [entry[0] for entry in self._buffers.values()]

    def peak_by_kind(self) -> dict[str, int]:
        """Peak bytes summed over blocks per site kind ('attn', 'mlp_in', ...)."""
        out: dict[str, int] = defaultdict(int)
        for site, nbytes in self.site_peak.items():
            out[_site_kind(site.rsplit(".", 1)[0])] += nbytes
        return dict(out)

    @contextmanager
    def token_rows(self, n_tokens: int):
        """Within the block, kept arrays have n_tokens rows (a slice of the batch's
        tokens): subspace policies read (n_tokens, width) matrices from them."""
        saved, self.n_tokens = self.n_tokens, n_tokens
        try:
            yield
        finally:
            self.n_tokens = saved

    # ---------------------------------------------------------------- keep / take
    def keep(self, site: str, cache: Any) -> None:
        """Hold `cache` (a dataclass of arrays) until take(site)."""
        if site in self._caches:
            raise KeyError(f"activation store already holds {site!r}: forward ran twice without backward")
        kind = _site_kind(site)
        fields = {}
        for field in dataclasses.fields(cache):
            value = getattr(cache, field.name)
            if _is_array(value):
                fields[field.name] = self._store_field(f"{site}.{field.name}", f"{kind}.{field.name}", value)
            else:
                fields[field.name] = value
        self._caches[site] = (type(cache), fields)

    def take(self, site: str) -> Any:
        """Give back the cache kept under `site` (reconstructed) and free its bytes."""
        try:
            cache_type, fields = self._caches.pop(site)
        except KeyError:
            raise KeyError(f"activation store holds nothing for {site!r}: backward without forward?") from None
        values = {}
        for name, kept in fields.items():
            values[name] = self._load_field(kept)
        return cache_type(**values)

    def drop(self, site: str) -> None:
        """Free a kept cache without reconstructing it."""
        _, fields = self._caches.pop(site)
        for kept in fields.values():
            self._free_field(kept)

    def clear(self) -> None:
        for site in list(self._caches):
            self.drop(site)

    def __contains__(self, site: str) -> bool:
        return site in self._caches

    # ---------------------------------------------------------------- policies
    def _store_field(self, full_key: str, field_key: str, array: Array):
        be = self.backend
        policy = self.plan.policy_for(field_key)
        if isinstance(policy, Offload):
            half = be.cast(array, be.dtype("float16"))
            file = self._offload_files.get(policy.directory)
            if file is None:
                file = self._offload_files[policy.directory] = be.open_offload(policy.directory)
            spilled = be.offload(half, file)
            del half
            self.disk_now += spilled.nbytes
            self.disk_peak = max(self.disk_peak, self.disk_now)
            return ("offload", spilled, array.dtype, file)
        if isinstance(policy, Half) and array.dtype != be.dtype("float16"):
            return ("half", self._hold(be.cast(array, be.dtype("float16")), full_key), array.dtype)
        size = math.prod(array.shape)
        if isinstance(policy, Subspace) and array.ndim >= 2 and self.n_tokens and size % self.n_tokens == 0:
            width = size // self.n_tokens
            if width > 1:  # rank >= width stores a rotation of X: no saving, but exact
                matrix = array.reshape(self.n_tokens, width)
                if policy.source == "calibration":
                    basis = self.bases.get(full_key)
                    if basis is None:
                        raise KeyError(f"no calibrated basis for {full_key!r}: run calibration first "
                                       "or use subspace(R) from the batch")
                    shared = True
                else:
                    basis = be.orthonormal_range(matrix, min(policy.rank, width), seed=self.seed)
                    shared = False
                basis = be.cast(basis, array.dtype)
                coeffs = be.matmul(matrix, basis)  # C = X Q: (N, r)
                kept = _KeptSubspace(self._hold(coeffs, full_key),
                                     basis if shared else self._hold(basis, full_key),
                                     tuple(array.shape), array.dtype, shared)
                return ("subspace", kept)
        return ("exact", self._hold(self._own(array), full_key))

    def _own(self, array: Array) -> Array:
        """A view into a larger buffer keeps the whole buffer alive: copy it out so
        the bytes counted are the bytes held."""
        base = getattr(array, "base", None)
        if base is not None and hasattr(base, "nbytes") and base.nbytes > array.nbytes:
            return array.copy()
        storage_bytes = getattr(array, "untyped_storage", None)
        if storage_bytes is not None and array.untyped_storage().nbytes() > array.nbytes:
            return array.clone()
        return array

    def _load_field(self, kept):
        if not isinstance(kept, tuple):
            return kept
        be = self.backend
        if kept[0] == "offload":  # read before freeing: the last free truncates the file
            value = be.reload(kept[1], kept[3], kept[2])
            self._free_field(kept)
            return value
        self._free_field(kept)
        if kept[0] == "exact":
            return kept[1]
        if kept[0] == "half":
            return be.cast(kept[1], kept[2])
        sub: _KeptSubspace = kept[1]
        x_hat = be.matmul_nt(sub.coeffs, sub.basis)  # X_hat = C Q^T: (N, width)
        return be.cast(x_hat, sub.dtype).reshape(sub.shape)

    def _free_field(self, kept) -> None:
        if not isinstance(kept, tuple):
            return
        if kept[0] == "offload":
            kept[3].free(kept[1])
            self.disk_now -= kept[1].nbytes
        elif kept[0] in ("exact", "half"):
            self._release(kept[1])
        else:
            self._release(kept[1].coeffs)
            if not kept[1].basis_shared:
                self._release(kept[1].basis)


def _buffer_key(array: Array) -> tuple:
    """Arrays that start at the same address with the same size are one buffer (the
    attention output o and its (N, H*hd) reshape read by the o projection, say)."""
    if hasattr(array, "data_ptr"):
        return (array.data_ptr(), array.element_size() * array.numel(), str(array.dtype))
    return (array.__array_interface__["data"][0], array.nbytes, str(array.dtype))


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and getattr(value, "ndim", 0) >= 1
