"""Adapters on a linear stream: LoRA, IA3 and LARS subspace adapters.

Each is a LinearSite (minilars/sites.py): built around a frozen weight W (d_in, d_out)
whose columns hold one or more projections (`outputs`), trainable on the projections
named in `targets`, and folded back into a plain weight by to_linear().

    LoRA (Hu et al. 2021):  y_s = x W_s + (alpha/r) (x A_s) B_s      keeps x, xA
    IA3  (Liu et al. 2022): y_s = (x W_s) * l_s   (k, v: outputs)     keeps x W_s
                            y   = (x * l) W       (down: its input)   keeps x
    LARS (docs/lars.md Part 1):  y_s = x W_s + (x P) M_s                   keeps z = x P

A LARS basis P (d_in, r) is shared by every projection of the stream, so z is kept
once per stream: r floats per token where LoRA keeps d_in + r per site.

On a stream with a bias b (minilars/sites.py) x W_s reads x W_s + b_s throughout:
LoRA and LARS add to it, IA3 on an output scales it, (x W_s + b_s) * l_s, as PEFT's
IA3 does for a module that is not feed-forward; b stays frozen.

Letters: N tokens, d_in, d_out, r rank; s a projection of the stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backends import Array, Backend
from .backends.base import is_quantized
from .sites import LinearSite, dense_weight


class _AdapterSite(LinearSite):
    """Shared plumbing: the frozen matmul and per-projection column slices."""

    def __init__(self, weight: Array, outputs: dict[str, int], targets: list[str], bias: Array | None = None):
        super().__init__(weight, outputs, bias)
        unknown = [t for t in targets if t not in outputs]
        if unknown:
            raise ValueError(f"targets {unknown} are not projections of this stream ({list(outputs)})")
        self.targets = [name for name in outputs if name in targets]  # column order

    def _frozen(self, x: Array, be: Backend) -> Array:
        return self._affine(x, be)  # x W + b: (N, d_out)


# ---------------------------------------------------------------- LoRA
@dataclass
class LoRACache:
    x: Array  # (N, d_in) site input, for dA = x^T (dy B^T)
    xa: Array  # (N, r * targets) x A for every target, for dB = (xA)^T dy


class LoRASite(_AdapterSite):
    """LoRA with PEFT's defaults: A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)),
    B = 0, scaling alpha / r. Engine layout: A (d_in, r), B (r, d_out_s)."""

    method = "lora"

    def __init__(self, weight, outputs, targets, rank: int, alpha: float, rng: np.random.Generator, backend: Backend,
                 dtype=None, bias: Array | None = None):
        super().__init__(weight, outputs, targets, bias)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dtype = dtype or weight.dtype
        bound = 1.0 / math.sqrt(self.d_in)
        self.A = {s: backend.asarray(rng.uniform(-bound, bound, (self.d_in, rank)), dtype) for s in self.targets}
        self.B = {s: backend.zeros((rank, outputs[s]), dtype) for s in self.targets}

    def trainable(self):
        out = {}
        for s in self.targets:
            out[f"{s}.lora_A"] = self.A[s]
            out[f"{s}.lora_B"] = self.B[s]
        return out

    def forward(self, x, be):
        y = self._frozen(x, be)
        if not self.targets:
            return y, None
        xa = self._xa(x, be)  # (N, r * targets)
        r = self.rank
        for j, s in enumerate(self.targets):
            y[:, self.slices[s]] += self.scaling * be.matmul(xa[:, j * r:(j + 1) * r], self.B[s])
        return y, LoRACache(x, xa)

    def backward_cache(self, x, be):
        return LoRACache(x, self._xa(x, be)) if self.targets else None

    def _xa(self, x, be) -> Array:
        """x A for every target at once: (N, d_in) -> (N, r * targets)."""
        return be.matmul(x, be.concat([self.A[s] for s in self.targets], axis=1))

    def backward(self, dy, cache: LoRACache, be, need_dx=True):
        r, grads, dxa = self.rank, {}, []
        for j, s in enumerate(self.targets):
            dy_s = dy[:, self.slices[s]]
            grads[f"{s}.lora_B"] = self.scaling * be.matmul_tn(cache.xa[:, j * r:(j + 1) * r], dy_s)
            dxa.append(self.scaling * be.matmul_nt(dy_s, self.B[s]))  # (N, r)
        dxa = be.concat(dxa, axis=1)  # (N, r * targets)
        da = be.matmul_tn(cache.x, dxa)  # (d_in, r * targets)
        for j, s in enumerate(self.targets):
            grads[f"{s}.lora_A"] = da[:, j * r:(j + 1) * r]
        dx = None
        if need_dx:
            dx = be.matmul_nt(dy, self.weight) + be.matmul_nt(dxa, be.concat([self.A[s] for s in self.targets], axis=1))
        return dx, grads

    def delta(self, be) -> Array:
        """(alpha/r) A B placed in the target columns: (d_in, d_out)."""
        delta = be.zeros(tuple(self.weight.shape), be.dtype("float32") if self.weight.dtype == be.dtype("float16")
                         else self.weight.dtype)
        for s in self.targets:
            delta[:, self.slices[s]] = self.scaling * be.matmul(be.cast(self.A[s], delta.dtype), self.B[s])
        return delta

    def to_linear(self, be):
        delta = self.delta(be)
        return be.cast(dense_weight(self.weight, be), delta.dtype) + delta


# ---------------------------------------------------------------- IA3
@dataclass
class IA3OutputCache:
    y0: Array  # (N, sum of target widths) unscaled outputs x W_s (+ b_s) of the targets


@dataclass
class IA3InputCache:
    x: Array  # (N, d_in) unscaled input


class IA3Site(_AdapterSite):
    """IA3 learned rescaling, initialised to ones (an identity). On an output stream
    (k, v) it scales the targets' outputs; with scale_input (down, a feed-forward
    module in PEFT's terms) it scales the input."""

    method = "ia3"

    def __init__(self, weight, outputs, targets, backend: Backend, scale_input: bool = False, dtype=None,
                 bias: Array | None = None):
        super().__init__(weight, outputs, targets, bias)
        dtype = dtype or weight.dtype
        self.scale_input = scale_input
        if scale_input:
            self.scales = {"input": backend.asarray(np.ones(self.d_in), dtype)}
        else:
            self.scales = {s: backend.asarray(np.ones(outputs[s]), dtype) for s in self.targets}

    def trainable(self):
        if self.scale_input:
            return {f"{self.targets[0]}.ia3_l": self.scales["input"]} if self.targets else {}
        return {f"{s}.ia3_l": self.scales[s] for s in self.targets}

    def forward(self, x, be):
        if self.scale_input:
            if not self.targets:
                return self._frozen(x, be), None
            return self._affine(x * self.scales["input"], be), IA3InputCache(x)
        y = self._frozen(x, be)
        if not self.targets:
            return y, None
        y0 = be.concat([y[:, self.slices[s]] for s in self.targets], axis=1)
        for s in self.targets:
            y[:, self.slices[s]] *= self.scales[s]
        return y, IA3OutputCache(y0)

    def backward_cache(self, x, be):
        if self.scale_input:  # the unscaled input itself
            return IA3InputCache(x) if self.targets else None
        return super().backward_cache(x, be)  # y0 needs the targets' outputs

    def backward(self, dy, cache, be, need_dx=True):
        if cache is None:
            return (be.matmul_nt(dy, self.weight) if need_dx else None), {}
        if self.scale_input:
            dxs = be.matmul_nt(dy, self.weight)  # d(x * l): (N, d_in)
            grads = {f"{self.targets[0]}.ia3_l": be.sum(dxs * cache.x, axis=0)}
            return (dxs * self.scales["input"] if need_dx else None), grads
        grads, start = {}, 0
        dy = dy.copy() if hasattr(dy, "copy") else dy.clone()
        for s in self.targets:
            width = self.outputs[s]
            grads[f"{s}.ia3_l"] = be.sum(dy[:, self.slices[s]] * cache.y0[:, start:start + width], axis=0)
            dy[:, self.slices[s]] *= self.scales[s]  # d(x W_s) = dy_s * l_s
            start += width
        return (be.matmul_nt(dy, self.weight) if need_dx else None), grads

    def to_linear(self, be):
        w = be.cast(dense_weight(self.weight, be), self.scales[next(iter(self.scales))].dtype)
        if self.scale_input:
            return w * self.scales["input"][:, None] if self.targets else w
        w = w + 0  # a copy
        for s in self.targets:
            w[:, self.slices[s]] *= self.scales[s]
        return w

    def merged_bias(self, be):
        """(x W_s + b_s) l_s = x (W_s l_s) + b_s l_s: an output scale folds into the bias
        too (PEFT's IA3 merge); an input scale leaves it alone."""
        if self.bias is None or self.scale_input or not self.targets:
            return self.bias
        b = be.cast(self.bias, self.scales[self.targets[0]].dtype) + 0  # a copy
        for s in self.targets:
            b[self.slices[s]] *= self.scales[s]
        return b


# ---------------------------------------------------------------- LARS
@dataclass
class LARSCache:
    z: Array  # (N, r) = x P, the stream's activation coordinates in the basis


class LARSSite(_AdapterSite):
    """LARS subspace adapter (docs/lars.md Part 1): W_eff = W + P M, P (d_in, r) a fixed
    orthonormal basis of the stream's calibrated activation subspace, M (r, d_out)
    trainable, zero at start. Backward (exact for any r):
        dM_s = z^T dy_s,   dx = dy W^T + (sum_s dy_s M_s^T) P^T.

    Between merge() and unmerge() (Model holds one block's sites merged while that
    block runs forward or backward) the site computes with W_eff itself (except over
    a weight kept as GGUF blocks, which is never merged: W_eff would be a float copy
    of the block's weights; the site then runs y = x W + z M over the blocks):
        y = x W_eff,   dx = dy W_eff^T
    the same quantities, one (N, d_in) x (d_in, d_out) product each instead of the
    frozen product plus the rank-r products z M and (dy M^T) P^T, which are thin and
    run far below BLAS's peak (18-37 GFLOP/s against ~120 at T = 2048,
    docs/speed.md). Forming W_eff costs d_in r d_out, independent of N.

    refresh() (docs/lars.md Part 1.6) folds P M into a frozen low-rank delta
    P_f M_f (P_f (d_in, R_f) the earlier bases side by side, M_f (R_f, d_out) their M
    stacked), takes a new basis and restarts M at zero:
        W_eff = W + P_f M_f + P M,   dx = dy W^T + (dy M_f^T) P_f^T + (dy M^T) P^T
    (backward keeps nothing more: z = x P is still all it reads)."""

    method = "lars"

    def __init__(self, weight, outputs, targets, basis: Array, backend: Backend, dtype=None,
                 bias: Array | None = None):
        super().__init__(weight, outputs, targets, bias)
        if basis.shape[0] != self.d_in:
            raise ValueError(f"basis has {basis.shape[0]} rows, the stream's input has {self.d_in}")
        dtype = dtype or weight.dtype
        self.basis = backend.cast(basis, dtype)  # P (d_in, r), frozen
        self.rank = basis.shape[1]
        self.M = {s: backend.zeros((self.rank, outputs[s]), dtype) for s in self.targets}
        self.folded_basis: Array | None = None  # P_f (d_in, R_f): the bases before refresh(), side by side
        self.folded_M: dict[str, Array] = {}  # M_f,s (R_f, d_out_s): their M, stacked, frozen
        self.merged: Array | None = None  # W_eff (d_in, d_out) between merge() and unmerge()

    def trainable(self):
        return {f"{s}.lars_M": self.M[s] for s in self.targets}

    def refresh(self, basis: Array, be) -> None:
        """Part 1.6: P_f <- [P_f P], M_f,s <- [M_f,s; M_s], P <- basis (d_in, r), M_s <- 0
        (in place: the optimizer holds M). W_eff is unchanged."""
        if basis.shape != self.basis.shape:
            raise ValueError(f"a refreshed basis must have shape {tuple(self.basis.shape)}, got {tuple(basis.shape)}")
        self.folded_basis = self.basis if self.folded_basis is None else be.concat([self.folded_basis, self.basis], 1)
        for s in self.targets:
            kept = self.M[s] + 0  # a copy: M restarts at zero below
            self.folded_M[s] = kept if s not in self.folded_M else be.concat([self.folded_M[s], kept], 0)
            be.scale_(self.M[s], 0.0)
        self.basis = be.cast(basis, self.basis.dtype)

    def frozen_arrays(self, be) -> dict[str, np.ndarray]:
        """What does not train but a resumed run needs: the basis, and after refresh()
        the folded factors ({"basis", "folded_basis", "folded_M.{s}"})."""
        out = {"basis": be.to_numpy(self.basis)}
        if self.folded_basis is not None:
            out["folded_basis"] = be.to_numpy(self.folded_basis)
            out.update({f"folded_M.{s}": be.to_numpy(m) for s, m in self.folded_M.items()})
        return out

    def set_frozen(self, name: str, value: np.ndarray, be) -> None:
        """Restore one of frozen_arrays()."""
        array = be.cast(be.asarray(np.ascontiguousarray(value)), self.basis.dtype)
        if name == "basis":
            self.basis = array
        elif name == "folded_basis":
            self.folded_basis = array
        elif name.startswith("folded_M.") and name[len("folded_M."):] in self.targets:
            self.folded_M[name[len("folded_M."):]] = array
        else:
            raise ValueError(f"a LARS site has no frozen array {name!r}")

    def merge(self, be) -> None:
        """Form W_eff = W + P M for the products that follow, until unmerge(); M must
        not change in between (the optimizer steps after the whole backward). A weight
        kept as blocks stays unmerged."""
        if self.targets and not is_quantized(self.weight):
            self.merged = self.to_linear(be)

    def unmerge(self) -> None:
        self.merged = None

    def forward(self, x, be):
        if not self.targets:
            return self._frozen(x, be), None
        z = be.matmul(x, self.basis)  # (N, r)
        if self.merged is not None:
            return self._affine(x, be, self.merged), LARSCache(z)  # x W_eff + b
        y = self._frozen(x, be)
        z_folded = None if self.folded_basis is None else be.matmul(x, self.folded_basis)  # (N, R_f)
        for s in self.targets:
            y[:, self.slices[s]] += be.matmul(z, self.M[s])
            if z_folded is not None:
                y[:, self.slices[s]] += be.matmul(z_folded, self.folded_M[s])
        return y, LARSCache(z)

    def apply(self, x, be):
        """y without z = x P, which only backward reads."""
        if self.merged is not None:
            return self._affine(x, be, self.merged)  # x W_eff + b
        return self.forward(x, be)[0]  # unmerged, y needs z M

    def backward_cache(self, x, be):
        return LARSCache(be.matmul(x, self.basis)) if self.targets else None  # z = x P: (N, r)

    def backward(self, dy, cache: LARSCache, be, need_dx=True):
        if cache is None:
            return (be.matmul_nt(dy, self.weight) if need_dx else None), {}
        grads, dz = {}, None
        unmerged = need_dx and self.merged is None
        whole = None
        if len(self.targets) > 1 and list(self.targets) == list(self.outputs):
            whole = be.matmul_tn(cache.z, dy)  # z^T dy for every projection at once: (r, d_out)
        for s in self.targets:
            dy_s = dy[:, self.slices[s]]
            if whole is None:
                grads[f"{s}.lars_M"] = be.matmul_tn(cache.z, dy_s)  # dM = z^T dy: (r, d_out_s)
            else:
                grads[f"{s}.lars_M"] = whole[:, self.slices[s]] + 0  # its columns, contiguous
            if unmerged:
                term = be.matmul_nt(dy_s, self.M[s])  # (N, r)
                dz = term if dz is None else dz + term
        dx = None
        if unmerged:
            dx = be.matmul_nt(dy, self.weight) + be.matmul_nt(dz, self.basis)  # dy W^T + dz P^T
            if self.folded_basis is not None:  # + (sum_s dy_s M_f,s^T) P_f^T
                dz_folded = sum(be.matmul_nt(dy[:, self.slices[s]], self.folded_M[s]) for s in self.targets)
                dx = dx + be.matmul_nt(dz_folded, self.folded_basis)
        elif need_dx:
            dx = be.matmul_nt(dy, self.merged)  # dy W_eff^T
        return dx, grads

    def to_linear(self, be):
        """W + P M in one backend call (be.add_low_rank: one product and one sum),
        with M (r, d_out) the targets' M_s in their columns, zero in the others; after
        refresh() W + [P_f P] [M_f; M], the whole delta in the same one call (two
        calls, r then R_f, cost a second sum over W and a thinner product: docs/speed.md).
        A weight kept as GGUF blocks is dequantised first (export only: merge() never
        folds a kept weight)."""
        basis, ms = self._stacked(be)
        return be.add_low_rank(dense_weight(self.weight, be), basis, self._columns(ms, be))

    def _stacked(self, be) -> tuple[Array, dict[str, Array]]:
        """The delta P_f M_f + P M as one low-rank product: [P_f P] (d_in, R_f + r) and
        each target's [M_f,s; M_s] (R_f + r, d_out_s); P and M before refresh()."""
        if self.folded_basis is None:
            return self.basis, self.M
        return (be.concat([self.folded_basis, self.basis], 1),
                {s: be.concat([self.folded_M[s], self.M[s]], 0) for s in self.targets})

    def _columns(self, ms: dict[str, Array], be) -> Array:
        """The targets' (R, d_out_s) matrices in their columns of one (R, d_out), zero in the others."""
        if list(self.targets) == list(self.outputs):  # every projection of the stream: side by side
            return be.concat([ms[s] for s in self.outputs], axis=1)
        rank = ms[self.targets[0]].shape[0]
        m = be.zeros((rank, sum(self.outputs.values())), self.basis.dtype)
        for s in self.targets:
            m[:, self.slices[s]] = ms[s]
        return m

    def as_lora(self, be) -> dict[str, tuple[Array, Array]]:
        """PEFT LoRA factors with scaling 1: lora_A = P^T (r, d_in), lora_B = M_s^T (d_out_s, r);
        after refresh() [P_f P]^T and [M_f,s; M_s]^T, of rank R_f + r."""
        basis, ms = self._stacked(be)
        return {s: (basis.T, ms[s].T) for s in self.targets}
