"""Ops as forward/backward pairs (CS231n style).

`<op>_forward(..., be) -> (y, cache)` and `<op>_backward(dy, cache, ..., be) -> (dx, grads)`.
A cache is a small dataclass that holds only what its backward needs; the model
puts it through the activation store (minilars/store.py) so its bytes are counted.
Weights are passed to backward explicitly: a cache holds activations only.

Letters: B batch, T tokens, N = B*T, d hidden, f MLP width, H query heads, Hkv kv
heads, hd head dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends import Array, Backend


# ---------------------------------------------------------------- embedding
@dataclass
class EmbeddingCache:
    tokens: Array  # (N,) int


def embedding_forward(table: Array, tokens: Array, be: Backend) -> tuple[Array, EmbeddingCache]:
    """x_n = E[t_n]: (V, d), (N,) -> (N, d)."""
    return be.embedding_forward(table, tokens), EmbeddingCache(tokens)


def embedding_backward(dy: Array, cache: EmbeddingCache, vocab_size: int, be: Backend) -> Array:
    """dE[v] = sum_{n: t_n = v} dy_n. Returns dE (V, d); tokens have no gradient."""
    return be.embedding_backward(dy, cache.tokens, vocab_size)


# ---------------------------------------------------------------- RMSNorm
@dataclass
class RMSNormCache:
    x: Array  # (N, d) input
    rstd: Array  # (N, 1) 1/sqrt(mean(x^2) + eps)


def rmsnorm_forward(x: Array, w: Array, eps: float, be: Backend) -> tuple[Array, RMSNormCache]:
    """y = x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019, eq. 4)."""
    y, rstd = be.rmsnorm_forward(x, w, eps)
    return y, RMSNormCache(x, rstd)


def rmsnorm_backward(dy: Array, cache: RMSNormCache, w: Array, be: Backend) -> tuple[Array, Array]:
    """Returns dx (N, d), dw (d,)."""
    return be.rmsnorm_backward(dy, cache.x, w, cache.rstd)


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


# ---------------------------------------------------------------- RoPE
def rope_tables(positions: int, head_dim: int, theta: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, hd) for rotate-half RoPE: angle(t, i) = t * theta^(-2i/hd),
    i < hd/2, repeated for both halves (HF LLaMA convention)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
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


def attention_forward(q: Array, k: Array, v: Array, tile: int, be: Backend) -> tuple[Array, AttentionCache]:
    """O = softmax(Q K^T / sqrt(hd) + causal mask) V, grouped-query, tile by tile with
    an online softmax: the kept state grows as T (lse), never as T^2."""
    o, lse = be.attention_forward(q, k, v, tile)
    return o, AttentionCache(q, k, v, o, lse)


def attention_backward(do: Array, cache: AttentionCache, tile: int, be: Backend) -> tuple[Array, Array, Array]:
    """Returns dq (B, T, H, hd), dk, dv (B, T, Hkv, hd); tile probabilities are
    recomputed from the kept lse."""
    return be.attention_backward(do, cache.q, cache.k, cache.v, cache.o, cache.lse, tile)


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


# ---------------------------------------------------------------- cross-entropy with the tied head
@dataclass
class CrossEntropyCache:
    dx: Array | None  # (n, d) d(loss)/dx of the rows sent through the head, for dloss = 1
    dhead: Array | None  # (V, d) d(loss)/dhead for dloss = 1, only when the head trains
    rows: Array | None = None  # (n,) indices of the labelled rows of x; None: every row (n = N)
    n_rows: int = 0  # N, the rows of x


def cross_entropy_forward(x: Array, head: Array, targets: Array, be: Backend, *, chunk: int = 256,
                          ignore_index: int = -100, need_dx: bool = True, need_dhead: bool = False
                          ) -> tuple[float, int, CrossEntropyCache]:
    """loss = mean over labelled n of logsumexp(x_n E^T) - x_n E[t_n]^T.

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
    loss, n_valid, dx, dhead = be.cross_entropy_head(x, head, targets, chunk, ignore_index, need_dx, need_dhead)
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
