"""The kernel interface: every numeric step the engine takes goes through a Backend.

The model code (minilars/model.py, minilars/ops.py, minilars/adapters.py) never calls
numpy or torch directly for arithmetic; it calls these methods, so a new backend
(numba, torch) slots in by implementing this class and nothing else changes.

Arrays are whatever the backend holds: numpy.ndarray for numpy and numba,
torch.Tensor for torch. The methods that model code may use on arrays directly are
the ones numpy and torch share: `.shape`, `.dtype`, `.reshape`, `.ndim`,
indexing, slicing, `@`, `+ - * /` and in-place `+=` (element count: math.prod(x.shape);
`.size` is a method on torch tensors).

Letters: B batch, T tokens per sequence, N = B*T, d hidden, f MLP width, H query
heads, Hkv kv heads, hd head dim, V vocabulary, r rank. Attention tensors are kept
token-major, (B, T, heads, hd), so every kept activation is (N, width) in memory.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor, depending on the backend


def is_quantized(x) -> bool:
    """Whether x is a frozen weight kept as GGUF blocks (minilars.quant.QuantizedWeight).
    The backends' matmul, matmul_nt, embedding_forward and cross_entropy_head take one
    as their weight; no such weight exists before minilars.quant is imported, so the
    check imports nothing."""
    quant = sys.modules.get("minilars.quant")
    return quant is not None and isinstance(x, quant.QuantizedWeight)


def check_quantized_head(softcap, need_dhead: bool) -> None:
    """What cross_entropy_head cannot do with a head kept as GGUF blocks, refused with
    the flag that avoids it: a soft cap (Gemma 2's), and a gradient for the table."""
    if softcap is not None:
        raise ValueError("a soft-capped loss over a head kept as GGUF blocks is not implemented "
                         "(load float weights: --weights float32)")
    if need_dhead:
        raise ValueError("the head is kept as GGUF blocks, which do not train (load float weights)")


class Backend(ABC):
    """Kernel interface. Forward kernels return what their backward needs."""

    name: str = "abstract"

    # ---------------------------------------------------------------- arrays
    @abstractmethod
    def asarray(self, x, dtype=None) -> Array:
        """Convert a numpy array (or nested list) to a backend array."""

    @abstractmethod
    def to_numpy(self, x: Array):
        """Convert a backend array to a numpy array (a copy when it must be)."""

    @abstractmethod
    def zeros(self, shape, dtype) -> Array: ...

    @abstractmethod
    def zeros_like(self, x: Array) -> Array: ...

    @abstractmethod
    def cast(self, x: Array, dtype) -> Array:
        """x converted to dtype (a no-op when it already has it)."""

    @abstractmethod
    def dtype(self, name: str):
        """The backend's dtype object for 'float16', 'float32', 'float64', 'int64'."""

    @abstractmethod
    def concat(self, xs: list, axis: int) -> Array: ...

    @abstractmethod
    def permute(self, x: Array, axes: tuple) -> Array:
        """x with its axes reordered (contiguous copy)."""

    @abstractmethod
    def sum(self, x: Array, axis=None, keepdims: bool = False) -> Array: ...

    @abstractmethod
    def norm_sq(self, x: Array) -> float:
        """sum(x**2) as a Python float (for global-norm gradient clipping)."""

    @abstractmethod
    def isfinite(self, x: Array) -> bool:
        """True when every element is finite."""

    @abstractmethod
    def nbytes(self, x: Array) -> int: ...

    def labelled_rows(self, targets: Array, ignore_index: int) -> Array | None:
        """Indices (n_l,) int64 of the targets that carry a label (!= ignore_index);
        None when every one does. The loss sends only these rows through the head."""
        labels = np.asarray(self.to_numpy(targets)) != ignore_index
        return None if labels.all() else self.asarray(np.flatnonzero(labels), "int64")

    # ---------------------------------------------------------------- linear algebra
    @abstractmethod
    def matmul(self, a: Array, b: Array) -> Array:
        """a @ b in a's dtype; b may be stored in a lower precision (float16 frozen
        weights) and is upcast here, one operand at a time."""

    @abstractmethod
    def matmul_tn(self, a: Array, b: Array) -> Array:
        """a^T @ b for 2-D a (N, m), b (N, n) -> (m, n): weight gradients dW = x^T dy."""

    @abstractmethod
    def matmul_nt(self, a: Array, b: Array) -> Array:
        """a @ b^T for 2-D a (N, n), b (m, n) -> (N, m): input gradients dx = dy W^T."""

    @abstractmethod
    def orthonormal_range(self, x: Array, rank: int, seed: int, oversample: int = 8,
                          power_iters: int = 2) -> Array:
        """Q (width, r) with orthonormal columns spanning the top-r right singular
        directions of x (N, width): randomized range finder (Halko et al. 2011,
        Alg. 4.4 with subspace iteration) on x^T. Exact span when rank >= rank(x)."""

    def whiten_columns(self, x: Array, basis: Array) -> Array:
        """P D^-1 with D = diag(rms_n (x P)_{n,j}): x (N, width), P (width, r) -> (width, r).
        Every column of z = x (P D^-1) has unit rms over x's rows; the span is P's. A
        column with no energy in x (a rank above x's) keeps its scale."""
        z = self.matmul(x, basis)  # (N, r)
        mean_sq = self.to_numpy(self.sum(z * z, axis=0)).astype(np.float64) / max(x.shape[0], 1)
        rms = np.sqrt(mean_sq)
        scale = np.where(rms > 0, 1.0 / np.where(rms > 0, rms, 1.0), 1.0)  # (r,)
        return basis * self.asarray(scale, dtype=basis.dtype)

    def add_low_rank(self, w: Array, p: Array, m: Array) -> Array:
        """w + p m in p's dtype: (d_in, d_out) + (d_in, r)(r, d_out) -> a new
        (d_in, d_out) array (LARS's effective weight W + P M, minilars/adapters.py);
        w may be stored in a lower precision. One product and one sum, which numpy
        forms in the product's buffer (a jitted row-by-row kernel measured slower
        than BLAS's rank-r product, docs/speed.md)."""
        return self.cast(w, p.dtype) + self.matmul(p, m)

    # ---------------------------------------------------------------- ops
    @abstractmethod
    def embedding_forward(self, table: Array, tokens: Array) -> Array:
        """y[n] = table[tokens[n]]: (V, d), (N,) -> (N, d)."""

    @abstractmethod
    def embedding_backward(self, dy: Array, tokens: Array, vocab_size: int) -> Array:
        """dtable = sum over n of one_hot(tokens[n]) dy[n]: (N, d) -> (V, d)."""

    @abstractmethod
    def rmsnorm_forward(self, x: Array, w: Array, eps: float) -> tuple[Array, Array]:
        """y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019).
        (N, d), (d,) -> y (N, d), rstd (N, 1)."""

    @abstractmethod
    def rmsnorm_backward(self, dy: Array, x: Array, w: Array, rstd: Array) -> tuple[Array, Array]:
        """dx = rstd * (dy*w) - x * rstd^3 * mean(dy*w*x), dw = sum_n dy*x*rstd."""

    @abstractmethod
    def rope_forward(self, x: Array, cos: Array, sin: Array) -> Array:
        """Rotate-half RoPE (Su et al. 2021, HF LLaMA convention):
        y = x*cos + rotate_half(x)*sin, rotate_half([x1, x2]) = [-x2, x1].
        x (B, T, heads, hd), cos/sin (T, hd) -> (B, T, heads, hd)."""

    @abstractmethod
    def rope_backward(self, dy: Array, cos: Array, sin: Array) -> Array:
        """The transpose of a rotation: rope_forward with sin negated."""

    @abstractmethod
    def attention_forward(self, q: Array, k: Array, v: Array, tile: int, q_offset: int = 0,
                          window: int | None = None, scale: float | None = None) -> tuple[Array, Array]:
        """Causal grouped-query attention, tile by tile with an online softmax
        (Dao et al. 2022, FlashAttention Alg. 1): no (T, T) array is formed.
        q (B, Tq, H, hd), k/v (B, Tk, Hkv, hd); query i sits at position p = q_offset+i.
        s_ij = scale * q_i . k_j with scale None meaning 1/sqrt(hd); query i sees key j
        iff j <= p and (window is None or p - j < window): a sliding window counts the
        query itself (transformers' sliding mask, kv_idx > q_idx - sliding_window).
        Key tiles that no query of a query tile sees are skipped, so a sliding layer
        costs O(T * window). Returns o (B, Tq, H, hd) and lse (B, Tq, H) =
        log sum_j exp(s_ij) over the visible keys. A backend keeps its plain fast path
        when window and scale are None (the LLaMA path)."""

    @abstractmethod
    def attention_backward(self, do: Array, q: Array, k: Array, v: Array, o: Array,
                           lse: Array, tile: int, window: int | None = None,
                           scale: float | None = None) -> tuple[Array, Array, Array]:
        """FlashAttention backward (Alg. 2) of attention_forward with q_offset 0 and the
        same window and scale: tile probabilities P = exp(S - lse) recomputed,
        D = rowsum(dO * O), dS = P * (dO V^T - D), dq = scale dS K, dk = scale dS^T Q.
        Returns dq (B, T, H, hd), dk, dv (B, T, Hkv, hd)."""

    @abstractmethod
    def swiglu_forward(self, g: Array, u: Array) -> Array:
        """h = silu(g) * u, silu(g) = g * sigmoid(g) (Shazeer 2020). (N, f) each."""

    @abstractmethod
    def swiglu_backward(self, dh: Array, g: Array, u: Array) -> tuple[Array, Array]:
        """dg = dh * u * sig(g) * (1 + g*(1 - sig(g))), du = dh * silu(g)."""

    def swiglu_forward_fused(self, gate_up: Array) -> Array:
        """swiglu_forward of the halves of one projection output gate_up = [g | u]:
        (N, 2f) -> (N, f). A backend may override it to read gate_up in place."""
        f = gate_up.shape[1] // 2
        return self.swiglu_forward(gate_up[:, :f], gate_up[:, f:])

    def swiglu_backward_fused(self, dh: Array, gate_up: Array) -> Array:
        """[dg | du] (N, 2f) of swiglu_backward for gate_up = [g | u]; a backend may
        override it to write both halves into one array instead of concatenating."""
        f = gate_up.shape[1] // 2
        dg, du = self.swiglu_backward(dh, gate_up[:, :f], gate_up[:, f:])
        return self.concat([dg, du], axis=1)

    # GeGLU and the soft cap are not abstract so that a backend written before them
    # still loads and runs every model that does not use them.
    def geglu_forward_fused(self, gate_up: Array) -> Array:
        """h = gelu_tanh(g) * u for gate_up = [g | u] (N, 2f) -> (N, f) (Shazeer 2020,
        FFN_GEGLU), with the tanh approximation of GELU (Hendrycks & Gimpel 2016;
        transformers' gelu_pytorch_tanh):
            gelu_tanh(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3))),  c = sqrt(2/pi)."""
        raise NotImplementedError(f"the {self.name} backend has no GeGLU kernel")

    def geglu_backward_fused(self, dh: Array, gate_up: Array) -> Array:
        """[dg | du] (N, 2f) of geglu_forward_fused: du = dh * gelu_tanh(g),
        dg = dh * u * gelu_tanh'(g) with t = tanh(c (g + 0.044715 g^3)),
        gelu_tanh'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 * 0.044715 g^2)."""
        raise NotImplementedError(f"the {self.name} backend has no GeGLU kernel")

    def softcap(self, x: Array, cap: float) -> Array:
        """cap * tanh(x / cap), a new array (Gemma 2's logit soft-capping; inference logits)."""
        raise NotImplementedError(f"the {self.name} backend has no soft cap")

    @abstractmethod
    def cross_entropy_head(self, x: Array, head: Array, targets: Array, chunk: int,
                           ignore_index: int, need_dx: bool, need_dhead: bool, softcap: float | None = None
                           ) -> tuple[float, int, Array | None, Array | None]:
        """Mean cross-entropy of logits z = x @ head^T against targets, chunk rows at a
        time so no (N, V) array is formed. With p = softmax(z):
        loss = (1/n) sum_valid (logsumexp(z_n) - z_n[t_n]), dz = (p - onehot(t)) / n.
        With softcap c the logits are z = c tanh((x head^T) / c) (Gemma 2 / 3) and the
        chain rule gives d(x head^T) = dz (1 - tanh^2) in the same chunk loop.
        x (N, d), head (V, d), targets (N,) -> (loss, n_valid, dx (N, d), dhead (V, d))."""

    @abstractmethod
    def adamw_update(self, p: Array, g: Array, m: Array, v: Array, *, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, step: int) -> None:
        """In place, as torch.optim.AdamW (Loshchilov & Hutter 2019):
        p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
        p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""

    @abstractmethod
    def scale_(self, x: Array, s: float) -> None:
        """x *= s in place."""

    # ---------------------------------------------------------------- offloaded activations
    def open_offload(self, directory):
        """The file the store's `offload` policy writes to (minilars/offload.py)."""
        from minilars.offload import OffloadFile

        return OffloadFile(directory)

    def offload(self, x: Array, file):
        """Write x's bytes to `file` (host memory first, for a device array); returns
        where they went (offload.Spilled)."""
        return file.write(self.to_numpy(x))

    def reload(self, spilled, file, dtype) -> Array:
        """A new array of dtype from the bytes `offload` wrote: read into the file's
        reused buffer, then cast (or copied) out of it."""
        host = file.read(spilled)
        if dtype == self.dtype(str(host.dtype)):
            host = host.copy()  # no cast to make the copy: the buffer is reused by the next read
        return self.cast(self.asarray(host), dtype)

    # ---------------------------------------------------------------- quantised frozen weights
    def decode_tile(self, part, rows, out) -> None:
        """out[i] = stored row rows[i] of `part` (minilars.quant.QuantizedRows) dequantised
        to float32: the tile decoder the frozen products over a QuantizedWeight use
        (minilars/quant.py). The reference is gguf-py's dequantize."""
        from minilars.quant import dequantize_rows_reference

        dequantize_rows_reference(part, rows, out)
