"""Ops as forward/backward pairs (CS231n style).

`<op>_forward(..., be) -> (y, cache)` and `<op>_backward(dy, cache, ..., be) -> (dx, grads)`.
A cache is a small dataclass that holds only what its backward needs; the model
puts it through the activation store (minilars/store.py) so its bytes are counted.
Weights, and the numbers that say which function forward computed (a norm's
offset, a sliding window), are passed to backward explicitly: a cache holds
activations only.

Letters: B batch, T tokens, N = B*T, d hidden, f MLP width, H query heads, Hkv kv
heads, hd head dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .backends import Array, Backend

if TYPE_CHECKING:
    from .config import RopeScaling


# ---------------------------------------------------------------- embedding
@dataclass
class EmbeddingCache:
    tokens: Array  # (N,) int


def embedding_forward(table: Array, tokens: Array, be: Backend, scale: float = 1.0) -> tuple[Array, EmbeddingCache]:
    """x_n = s E[t_n]: (V, d), (N,) -> (N, d). s = 1 for LLaMA; Gemma scales by
    sqrt(d) (Gemma3TextScaledWordEmbedding). The gathered rows are a new array, so
    they are scaled in place."""
    x = be.embedding_forward(table, tokens)
    if scale != 1.0:
        be.scale_(x, scale)
    return x, EmbeddingCache(tokens)


def embedding_backward(dy: Array, cache: EmbeddingCache, vocab_size: int, be: Backend, scale: float = 1.0) -> Array:
    """dE[v] = s sum_{n: t_n = v} dy_n. Returns dE (V, d); tokens have no gradient."""
    dtable = be.embedding_backward(dy, cache.tokens, vocab_size)
    if scale != 1.0:
        be.scale_(dtable, scale)
    return dtable


# ---------------------------------------------------------------- RMSNorm
@dataclass
class RMSNormCache:
    x: Array  # (N, d) input
    rstd: Array  # (N, 1) 1/sqrt(mean(x^2) + eps)


def rmsnorm_forward(x: Array, w: Array, eps: float, be: Backend, offset: float = 0.0) -> tuple[Array, RMSNormCache]:
    """y = x / sqrt(mean(x^2) + eps) * (offset + w) (Zhang & Sennrich 2019, eq. 4).
    offset 0 for LLaMA; Gemma stores w around 0 and scales by (1 + w) (Gemma3RMSNorm).
    (N, d), (d,) -> (N, d)."""
    y, rstd = be.rmsnorm_forward(x, _norm_scale(w, offset, x.dtype, be), eps)
    return y, RMSNormCache(x, rstd)


def rmsnorm_backward(dy: Array, cache: RMSNormCache, w: Array, be: Backend, offset: float = 0.0
                     ) -> tuple[Array, Array]:
    """Returns dx (N, d), dw (d,). d(offset + w)/dw = 1, so dw is the gradient of the scale."""
    return be.rmsnorm_backward(dy, cache.x, _norm_scale(w, offset, dy.dtype, be), cache.rstd)


def _norm_scale(w: Array, offset: float, dtype, be: Backend) -> Array:
    """offset + w: w itself when the offset is 0 (no copy on the LLaMA path)."""
    return w if offset == 0.0 else be.cast(w, dtype) + offset


def head_rmsnorm_forward(x: Array, w: Array, eps: float, be: Backend, offset: float = 0.0
                         ) -> tuple[Array, RMSNormCache]:
    """RMSNorm over each head's hd (Qwen3 and Gemma 3 q_norm / k_norm, after the
    projection and its bias, before RoPE):
        y[b, t, h] = x[b, t, h] / sqrt(mean(x[b, t, h]^2) + eps) * (offset + w).
    x (B, T, heads, hd), w (hd,) -> y (B, T, heads, hd); the cache holds x as
    (N*heads, hd) rows and rstd (N*heads, 1)."""
    rows = x.reshape(-1, x.shape[-1])  # (N*heads, hd)
    y, cache = rmsnorm_forward(rows, w, eps, be, offset)
    return y.reshape(x.shape), cache


def head_rmsnorm_backward(dy: Array, cache: RMSNormCache, w: Array, be: Backend, offset: float = 0.0
                          ) -> tuple[Array, Array]:
    """Returns dx (B, T, heads, hd), dw (hd,) summed over every token and head."""
    dx, dw = rmsnorm_backward(dy.reshape(-1, dy.shape[-1]), cache, w, be, offset)
    return dx.reshape(dy.shape), dw


# ---------------------------------------------------------------- linear
@dataclass
class LinearCache:
    x: Array  # (N, d_in), kept only when W needs a gradient


def linear_forward(x: Array, w: Array, be: Backend, keep_input: bool = True) -> tuple[Array, LinearCache | None]:
    """y = x W: (N, d_in), (d_in, d_out) -> (N, d_out). A frozen W needs no input
    for backward (dx = dy W^T), so nothing is kept unless keep_input."""
    return be.matmul(x, w), (LinearCache(x) if keep_input else None)


def linear_backward(dy: Array, cache: LinearCache | None, w: Array, be: Backend,
                    need_dx: bool = True) -> tuple[Array | None, Array | None]:
    """dx = dy W^T, dW = x^T dy (None when the cache holds no input)."""
    dx = be.matmul_nt(dy, w) if need_dx else None
    dw = be.matmul_tn(cache.x, dy) if cache is not None else None
    return dx, dw


# ---------------------------------------------------------------- bias
def bias_forward(y: Array, b: Array, be: Backend) -> Array:
    """y + b for y = x W (N, d_out), b (d_out,): the affine map y = x W + b (Qwen2's
    q, k, v). Adds in place: y is the matmul's new output. No cache: it is linear."""
    y += b
    return y


def bias_backward(dy: Array, be: Backend) -> Array:
    """db = sum_n dy_n: (N, d_out) -> (d_out,)."""
    return be.sum(dy, axis=0)


# ---------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies (hd/2,) float64: w_i = theta^(-2i/hd) (Su et al. 2021),
    rescaled as transformers' rope init functions do (modeling_rope_utils.py):
      linear: w_i / factor (position interpolation, Chen et al. 2023);
      llama3 (_compute_llama3_parameters), with wavelength l_i = 2 pi / w_i,
        L = original_max_seq_len, lo = L / low_freq_factor, hi = L / high_freq_factor:
        l_i > lo: w_i / factor;  l_i < hi: w_i;  otherwise (1 - a) w_i / factor + a w_i,
        a = (L / l_i - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    context = scaling.original_max_seq_len
    wavelen = 2 * np.pi / inv_freq
    smooth = (context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    medium = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return np.where(wavelen > context / scaling.low_freq_factor, inv_freq / scaling.factor,
                    np.where(wavelen < context / scaling.high_freq_factor, inv_freq, medium))


def rope_tables(positions: int, head_dim: int, theta: float, dtype, scaling: RopeScaling | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, hd) for rotate-half RoPE: angle(t, i) = t * w_i with w_i from
    rope_inv_freq, i < hd/2, repeated for both halves (HF LLaMA convention)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)  # (hd/2,)
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = np.concatenate([angles, angles], axis=1)  # (T, hd)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope_forward(x: Array, cos: Array, sin: Array, be: Backend) -> Array:
    """y = x cos + rotate_half(x) sin: (B, T, heads, hd). No cache: it is linear."""
    return be.rope_forward(x, cos, sin)


def rope_backward(dy: Array, cos: Array, sin: Array, be: Backend) -> Array:
    """dx = R^T dy: the rotation by the opposite angle."""
    return be.rope_backward(dy, cos, sin)


# ---------------------------------------------------------------- attention
@dataclass
class AttentionCache:
    q: Array  # (B, T, H, hd) after RoPE
    k: Array  # (B, T, Hkv, hd) after RoPE
    v: Array  # (B, T, Hkv, hd)
    o: Array  # (B, T, H, hd) output
    lse: Array  # (B, T, H) log-sum-exp of each score row


def attention_options(window: int | None, scale: float | None) -> dict:
    """The backend's keyword arguments for a sliding window or a score scale; none
    for plain causal attention, which keeps every backend on its plain path."""
    options = {}
    if window is not None:
        options["window"] = window
    if scale is not None:
        options["scale"] = scale
    return options


def attention_forward(q: Array, k: Array, v: Array, tile: int, be: Backend, window: int | None = None,
                      scale: float | None = None) -> tuple[Array, AttentionCache]:
    """O = softmax(scale Q K^T + mask) V, grouped-query, tile by tile with an online
    softmax: the kept state grows as T (lse), never as T^2. scale None is 1/sqrt(hd);
    the mask hides the future and, with a window w, keys w or more positions back
    (Mistral, Gemma 3 sliding layers: query p sees keys p - w + 1 .. p)."""
    o, lse = be.attention_forward(q, k, v, tile, **attention_options(window, scale))
    return o, AttentionCache(q, k, v, o, lse)


def attention_backward(do: Array, cache: AttentionCache, tile: int, be: Backend, window: int | None = None,
                       scale: float | None = None) -> tuple[Array, Array, Array]:
    """Returns dq (B, T, H, hd), dk, dv (B, T, Hkv, hd) of attention_forward with the
    same window and scale; tile probabilities are recomputed from the kept lse."""
    return be.attention_backward(do, cache.q, cache.k, cache.v, cache.o, cache.lse, tile,
                                 **attention_options(window, scale))


# ---------------------------------------------------------------- SwiGLU
@dataclass
class SwiGLUCache:
    gate_up: Array  # (N, 2f) pre-activations: gate in the first f columns, up in the rest


def swiglu_forward(gate_up: Array, be: Backend) -> tuple[Array, SwiGLUCache]:
    """h = silu(gate) * up (Shazeer 2020, FFN_SwiGLU without the projections).
    (N, 2f) -> (N, f); the fused input is kept whole, so no copy is made."""
    return be.swiglu_forward_fused(gate_up), SwiGLUCache(gate_up)


def swiglu_backward(dh: Array, cache: SwiGLUCache, be: Backend) -> Array:
    """Returns d(gate_up) (N, 2f)."""
    return be.swiglu_backward_fused(dh, cache.gate_up)


# ---------------------------------------------------------------- GeGLU
@dataclass
class GeGLUCache:
    gate_up: Array  # (N, 2f) pre-activations: gate in the first f columns, up in the rest


def geglu_forward(gate_up: Array, be: Backend) -> tuple[Array, GeGLUCache]:
    """h = gelu_tanh(gate) * up (Shazeer 2020, FFN_GEGLU without the projections;
    Gemma's MLP), gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
    (Hendrycks & Gimpel 2016). (N, 2f) -> (N, f); the fused input is kept whole."""
    return be.geglu_forward_fused(gate_up), GeGLUCache(gate_up)


def geglu_backward(dh: Array, cache: GeGLUCache, be: Backend) -> Array:
    """Returns d(gate_up) (N, 2f): dgate = dh * up * gelu_tanh'(gate), dup = dh * gelu_tanh(gate)."""
    return be.geglu_backward_fused(dh, cache.gate_up)


# ---------------------------------------------------------------- cross-entropy with the tied head
@dataclass
class CrossEntropyCache:
    dx: Array | None  # (n, d) d(loss)/dx of the rows sent through the head, for dloss = 1
    dhead: Array | None  # (V, d) d(loss)/dhead for dloss = 1, only when the head trains
    rows: Array | None = None  # (n,) indices of the labelled rows of x; None: every row (n = N)
    n_rows: int = 0  # N, the rows of x


def cross_entropy_forward(x: Array, head: Array, targets: Array, be: Backend, *, chunk: int = 256,
                          ignore_index: int = -100, need_dx: bool = True, need_dhead: bool = False,
                          softcap: float | None = None) -> tuple[float, int, CrossEntropyCache]:
    """loss = mean over labelled n of logsumexp(z_n) - z_n[t_n], z_n = x_n E^T, or with
    a soft cap c, z_n = c tanh(x_n E^T / c) (Gemma 2 / 3 final_logit_softcapping).

    A row without a label (targets[n] == ignore_index: a prompt token, padding) adds
    nothing to the loss and gets a zero gradient, so the labelled rows are gathered
    first, x_l = x[rows] (n_l, d), and only they go through the head: its cost follows
    the labelled tokens, not N (prompt-heavy chat data labels a small share of rows).
    The head is the loss's only consumer, so its gradient is formed here, chunk by
    chunk: a (chunk, V) logits block is the only vocabulary-sized array ever alive,
    and the cache keeps dx_l (n_l, d), at most the bytes of keeping x, with one
    vocabulary matmul fewer than recomputing the logits in backward.
    Returns (loss, n_labelled, cache)."""
    n = x.shape[0]
    rows = be.labelled_rows(targets, ignore_index)
    if rows is not None:
        x = be.embedding_forward(x, rows)  # gather: x_l = x[rows] (n_l, d)
        targets = be.embedding_forward(targets, rows)  # t_l = t[rows] (n_l,)
    capped = {} if softcap is None else {"softcap": softcap}  # none: every backend's plain path
    loss, n_valid, dx, dhead = be.cross_entropy_head(x, head, targets, chunk, ignore_index, need_dx, need_dhead,
                                                     **capped)
    return loss, n_valid, CrossEntropyCache(dx, dhead, rows, n)


def cross_entropy_backward(dloss: float, cache: CrossEntropyCache, be: Backend) -> tuple[Array | None, Array | None]:
    """Returns dx (N, d), dhead (V, d) scaled by the upstream dloss; the rows of dx
    that had no label are zero (the labelled rows are scattered back into place)."""
    if dloss != 1.0:
        for grad in (cache.dx, cache.dhead):
            if grad is not None:
                be.scale_(grad, dloss)
    dx = cache.dx
    if dx is not None and cache.rows is not None:
        dx = be.embedding_backward(dx, cache.rows, cache.n_rows)  # scatter: dx[rows] = dx_l, 0 elsewhere
    return dx, cache.dhead
