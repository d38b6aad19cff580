"""Numba kernels behind backends/numba_backend.py: a flat module of @njit functions.

Each kernel mirrors a method of the NumPy reference (backends/numpy_backend.py) and
states its maths in its docstring; tests/test_backend_numba.py checks one against
the other, and a run with NUMBA_DISABLE_JIT=1 executes these same functions as
plain Python, so what is read here is what runs.

Conventions:
- outputs are preallocated by the caller and passed last; kernels return nothing
  unless they say so (the wrappers in numba_backend.py own allocation);
- arithmetic runs in the arrays' dtype (float32 or float64); row reductions
  (sums of squares, softmax denominators, losses) accumulate in float64;
- `parallel=True` kernels split work with `prange` over rows or independent
  (batch, head, tile) items, never over a reduction, so results do not depend on
  the thread count;
- no fastmath: masked scores are -inf and must stay -inf; loops are written so
  LLVM vectorises them without reassociation (the innermost loop is an axpy along
  a contiguous axis, never a dot-product reduction).

Letters as in backends/base.py: B batch, T tokens, N = B*T, d hidden, f MLP width,
H query heads, Hkv kv heads, g = H/Hkv, hd head dim, V vocabulary.
"""
from __future__ import annotations

import math
import time

import numpy as np
from numba import njit, prange


# ---------------------------------------------------------------- attention
@njit(cache=True)
def _attention_tile_forward(q, k, v, b, h, kvh, i0, i1, q_offset, scale,
                            qs, kt, vt, s, m, l, acc, tile):
    """One (query tile, all its key tiles) item of the FlashAttention forward
    (Dao et al. 2022, Alg. 1) for query head h reading kv head kvh.

    For query row i at position p = q_offset + i0 + i, over key tiles j:
        s_j    = (q_i * scale) . k_j        for keys j <= p (causal)
        m'     = max(m, max_j s_j)
        l      = l * exp(m - m') + sum_j exp(s_j - m')
        acc    = acc * exp(m - m') + sum_j exp(s_j - m') v_j,    m = m'
    and finally o_i = acc / l, lse_i = m + log(l).
    Buffers: qs (tile, hd), kt (hd, tile) = K_j^T, vt (tile, hd), s (tile,),
    m/l (tile,), acc (tile, hd)."""
    hd = q.shape[3]
    tk_total = k.shape[1]
    tq = i1 - i0
    for i in range(tq):
        for d in range(hd):
            qs[i, d] = q[b, i0 + i, h, d] * scale
        m[i] = -np.inf
        l[i] = 0.0
        acc[i, :] = 0.0
    last_key = min(tk_total, q_offset + i1)  # keys after the tile's last query are masked
    for j0 in range(0, last_key, tile):
        tk = min(tile, last_key - j0)
        for jj in range(tk):  # K_j^T and V_j as contiguous tiles
            for d in range(hd):
                kt[d, jj] = k[b, j0 + jj, kvh, d]
                vt[jj, d] = v[b, j0 + jj, kvh, d]
        for i in range(tq):
            nv = min(tk, q_offset + i0 + i - j0 + 1)  # keys j0 .. j0+nv-1 are visible
            if nv <= 0:
                continue
            # s = qs_i K_j^T as axpys along the key axis: s += qs[i, d] * K^T[d, :]
            for jj in range(nv):
                s[jj] = 0.0
            for d in range(hd):
                qd = qs[i, d]
                for jj in range(nv):
                    s[jj] += qd * kt[d, jj]
            m_new = m[i]
            for jj in range(nv):
                m_new = max(m_new, s[jj])
            correction = math.exp(m[i] - m_new)  # exp(-inf) = 0 on the first tile
            row_sum = 0.0
            for jj in range(nv):
                p = math.exp(s[jj] - m_new)
                s[jj] = p
                row_sum += p
            l[i] = l[i] * correction + row_sum
            m[i] = m_new
            if correction != 1.0:
                for d in range(hd):
                    acc[i, d] *= correction
            for jj in range(nv):  # acc += p V_j, axpys along hd
                pj = s[jj]
                for d in range(hd):
                    acc[i, d] += pj * vt[jj, d]


@njit(parallel=True, cache=True)
def attention_forward(q, k, v, tile, q_offset, o, lse):
    """Causal grouped-query attention with an online softmax, no (T, T) array:
        o_i = sum_{j <= q_offset + i} softmax_j(q_i . k_j / sqrt(hd)) v_j,
        lse_i = log sum_{j <= q_offset + i} exp(q_i . k_j / sqrt(hd)).
    q (B, Tq, H, hd), k/v (B, Tk, Hkv, hd) -> o (B, Tq, H, hd), lse (B, Tq, H).
    Query head h reads kv head h // g. Work items are (batch, query head, query
    tile); tiles are taken in the order 0, n-1, 1, n-2, ... so that contiguous
    blocks of items (as prange hands them to threads) carry equal causal work."""
    n_b, tq_total, n_heads, hd = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    n_tiles = (tq_total + tile - 1) // tile
    scale = 1.0 / math.sqrt(hd)
    for item in prange(n_b * n_heads * n_tiles):
        bh, w = divmod(np.int64(item), n_tiles)
        b, h = divmod(bh, n_heads)
        t = w // 2 if w % 2 == 0 else n_tiles - 1 - w // 2
        i0 = t * tile
        i1 = min(i0 + tile, tq_total)
        qs = np.empty((tile, hd), dtype=q.dtype)
        kt = np.empty((hd, tile), dtype=q.dtype)
        vt = np.empty((tile, hd), dtype=q.dtype)
        s = np.empty(tile, dtype=q.dtype)
        m = np.empty(tile, dtype=q.dtype)
        l = np.empty(tile, dtype=np.float64)
        acc = np.empty((tile, hd), dtype=q.dtype)
        _attention_tile_forward(q, k, v, b, h, h // group, i0, i1, q_offset, scale,
                                qs, kt, vt, s, m, l, acc, tile)
        for i in range(i1 - i0):
            inv = 1.0 / l[i]
            for d in range(hd):
                o[b, i0 + i, h, d] = acc[i, d] * inv
            lse[b, i0 + i, h] = m[i] + math.log(l[i])


@njit(parallel=True, cache=True)
def attention_backward(do, q, k, v, o, lse, tile, dq, dk_heads, dv_heads):
    """FlashAttention backward (Dao et al. 2022, Alg. 2; Dao 2023, Alg. 2) for causal
    attention with Tq = Tk = T. With s_ij = q_i . k_j * scale, P_ij = exp(s_ij - lse_i)
    recomputed tile by tile and D_i = do_i . o_i:
        dv_j = sum_i P_ij do_i
        dS_ij = P_ij (do_i . v_j - D_i)
        dq_i = scale * sum_j dS_ij k_j
        dk_j = scale * sum_i dS_ij q_i.
    Work items are (batch, query head); each owns dq[b, :, h] and writes its
    dk, dv contributions to dk_heads/dv_heads[b, :, h] (B, T, H, hd), which
    reduce_kv_heads then sums over the g query heads of each kv head."""
    n_b, t_total, n_heads, hd = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(hd)
    for item in prange(n_b * n_heads):
        b, h = divmod(np.int64(item), n_heads)
        kvh = h // group
        delta = np.empty(t_total, dtype=np.float64)  # D_i = do_i . o_i
        for i in range(t_total):
            acc = 0.0
            for d in range(hd):
                acc += do[b, i, h, d] * o[b, i, h, d]
            delta[i] = acc
            dq[b, i, h, :] = 0.0
        kj = np.empty((tile, hd), dtype=q.dtype)
        kt = np.empty((hd, tile), dtype=q.dtype)
        vt = np.empty((hd, tile), dtype=q.dtype)
        dkj = np.empty((tile, hd), dtype=q.dtype)
        dvj = np.empty((tile, hd), dtype=q.dtype)
        qs = np.empty(hd, dtype=q.dtype)
        doi = np.empty(hd, dtype=q.dtype)
        dqi = np.empty(hd, dtype=q.dtype)
        p = np.empty(tile, dtype=q.dtype)
        dp = np.empty(tile, dtype=q.dtype)
        for j0 in range(0, t_total, tile):
            tk = min(tile, t_total - j0)
            for jj in range(tk):
                for d in range(hd):
                    kj[jj, d] = k[b, j0 + jj, kvh, d]
                    kt[d, jj] = k[b, j0 + jj, kvh, d]
                    vt[d, jj] = v[b, j0 + jj, kvh, d]
            dkj[:tk] = 0.0
            dvj[:tk] = 0.0
            for i in range(j0, t_total):  # causal: queries before j0 see no key of the tile
                nv = min(tk, i - j0 + 1)
                for d in range(hd):
                    qs[d] = q[b, i, h, d] * scale
                    doi[d] = do[b, i, h, d]
                # p = exp(qs K^T - lse_i), dp = do_i V^T, both as axpys along keys
                for jj in range(nv):
                    p[jj] = 0.0
                    dp[jj] = 0.0
                for d in range(hd):
                    qd = qs[d]
                    gd = doi[d]
                    for jj in range(nv):
                        p[jj] += qd * kt[d, jj]
                        dp[jj] += gd * vt[d, jj]
                lse_i = lse[b, i, h]
                delta_i = delta[i]
                for jj in range(nv):
                    pj = math.exp(p[jj] - lse_i)
                    p[jj] = pj
                    dp[jj] = pj * (dp[jj] - delta_i)  # dS_ij
                dqi[:] = 0.0
                for jj in range(nv):
                    pj = p[jj]
                    dsj = dp[jj]
                    for d in range(hd):
                        dvj[jj, d] += pj * doi[d]
                        dkj[jj, d] += dsj * qs[d]
                        dqi[d] += dsj * kj[jj, d]
                for d in range(hd):
                    dq[b, i, h, d] += dqi[d] * scale
            for jj in range(tk):
                for d in range(hd):
                    dk_heads[b, j0 + jj, h, d] = dkj[jj, d]
                    dv_heads[b, j0 + jj, h, d] = dvj[jj, d]


@njit(parallel=True, cache=True)
def reduce_kv_heads(x_heads, out):
    """out[b, t, c] = sum_{h = c*g}^{c*g + g - 1} x_heads[b, t, h]:
    (B, T, H, hd) -> (B, T, Hkv, hd), summing each kv head's g query heads."""
    n_b, t_total, n_heads, hd = x_heads.shape
    n_kv = out.shape[2]
    group = n_heads // n_kv
    for bt in prange(n_b * t_total):
        b, t = divmod(np.int64(bt), t_total)
        for c in range(n_kv):
            for d in range(hd):
                out[b, t, c, d] = x_heads[b, t, c * group, d]
            for hh in range(1, group):
                for d in range(hd):
                    out[b, t, c, d] += x_heads[b, t, c * group + hh, d]


# ---------------------------------------------------------------- RMSNorm
@njit(parallel=True, cache=True)
def rmsnorm_forward(x, w, eps, y, rstd):
    """rstd_n = 1 / sqrt(mean_c x_nc^2 + eps), y_nc = x_nc * rstd_n * w_c
    (Zhang & Sennrich 2019). x (N, d), w (d,) -> y (N, d), rstd (N, 1)."""
    n, d = x.shape
    for r in prange(n):
        ss = 0.0
        for c in range(d):
            ss += x[r, c] * x[r, c]
        rs = 1.0 / math.sqrt(ss / d + eps)
        rstd[r, 0] = rs
        rs = rstd[r, 0]  # in x's dtype, as kept for backward
        for c in range(d):
            y[r, c] = x[r, c] * rs * w[c]


@njit(parallel=True, cache=True)
def rmsnorm_backward(dy, x, w, rstd, dx, dw_parts, rows_per_part):
    """With x_hat = x * rstd and g = dy * w:
        dx_n = rstd_n * (g_n - x_hat_n * mean_c(g_nc x_hat_nc)),
        dw   = sum_n dy_n * x_hat_n.
    dw is summed in fixed row blocks of rows_per_part into dw_parts (P, d), which
    the caller adds up, so the sum order does not depend on the thread count."""
    n, d = x.shape
    n_parts = dw_parts.shape[0]
    for part in prange(n_parts):
        dw_parts[part, :] = 0.0
        for r in range(part * rows_per_part, min(n, (part + 1) * rows_per_part)):
            rs = rstd[r, 0]
            dot = 0.0
            for c in range(d):
                x_hat = x[r, c] * rs
                dw_parts[part, c] += dy[r, c] * x_hat
                dot += dy[r, c] * w[c] * x_hat
            mean = dot / d
            for c in range(d):
                dx[r, c] = rs * (dy[r, c] * w[c] - x[r, c] * rs * mean)


# ---------------------------------------------------------------- RoPE
@njit(parallel=True, cache=True)
def rope(x, cos, sin, sign, y):
    """Rotate-half RoPE (Su et al. 2021) with angle sign: for c < hd/2,
        y_c        = x_c cos_c - sign * x_{c+hd/2} sin_c
        y_{c+hd/2} = x_{c+hd/2} cos_c + sign * x_c sin_c.
    sign = +1 is the forward rotation, -1 its transpose (the backward).
    x (B, T, heads, hd), cos/sin (T, hd) -> y (B, T, heads, hd)."""
    n_b, t_total, n_heads, hd = x.shape
    half = hd // 2
    for bt in prange(n_b * t_total):
        b, t = divmod(np.int64(bt), t_total)
        for h in range(n_heads):
            for c in range(half):
                co = cos[t, c]
                si = sin[t, c] * sign
                x1 = x[b, t, h, c]
                x2 = x[b, t, h, c + half]
                y[b, t, h, c] = x1 * co - x2 * si
                y[b, t, h, c + half] = x2 * co + x1 * si


# ---------------------------------------------------------------- SwiGLU
@njit(parallel=True, cache=True)
def swiglu_forward(g, u, h):
    """h = silu(g) * u = g / (1 + exp(-g)) * u (Shazeer 2020). (N, f) each."""
    n, f = g.shape
    for r in prange(n):
        for c in range(f):
            gc = g[r, c]
            h[r, c] = gc / (1.0 + math.exp(-gc)) * u[r, c]


@njit(parallel=True, cache=True)
def swiglu_backward(dh, g, u, dg, du):
    """With sig = 1 / (1 + exp(-g)) and silu = g * sig:
        dg = dh * u * sig * (1 + g (1 - sig)),   du = dh * silu."""
    n, f = g.shape
    for r in prange(n):
        for c in range(f):
            gc = g[r, c]
            sig = 1.0 / (1.0 + math.exp(-gc))
            dg[r, c] = dh[r, c] * u[r, c] * sig * (1.0 + gc * (1.0 - sig))
            du[r, c] = dh[r, c] * (gc * sig)


# ---------------------------------------------------------------- cross-entropy rows
@njit(parallel=True, cache=True)
def softmax_xent_rows(z, targets, valid, weight, need_grad, losses):
    """Row work of the chunked cross-entropy, in place on a logits chunk z (c, V):
        loss_n = logsumexp(z_n) - z_n[t_n]                     (0 where not valid)
        z_n   <- weight * (softmax(z_n) - onehot(t_n))         (0 where not valid)
    the second only when need_grad; weight = 1 / n_valid over the whole batch.
    logsumexp is taken after shifting by the row max, so exp never overflows."""
    c, n_vocab = z.shape
    for r in prange(c):
        if not valid[r]:
            losses[r] = 0.0
            if need_grad:
                z[r, :] = 0.0
            continue
        shift = z[r, 0]
        for col in range(1, n_vocab):
            shift = max(shift, z[r, col])
        target = targets[r]
        z_target = z[r, target] - shift
        row_sum = 0.0
        if need_grad:
            for col in range(n_vocab):
                e = math.exp(z[r, col] - shift)
                z[r, col] = e
                row_sum += e
        else:
            for col in range(n_vocab):
                row_sum += math.exp(z[r, col] - shift)
        losses[r] = math.log(row_sum) - z_target
        if need_grad:
            factor = weight / row_sum
            for col in range(n_vocab):
                z[r, col] *= factor
            z[r, target] -= weight


# ---------------------------------------------------------------- embedding
@njit(parallel=True, cache=True)
def embedding_backward(dy, tokens, dtable, cols_per_part):
    """dtable[v] += sum_{n: tokens[n] = v} dy[n]: (N, d), (N,) -> (V, d), in token
    order. Threads split the columns, so no two write the same element."""
    n, d = dy.shape
    n_parts = (d + cols_per_part - 1) // cols_per_part
    for part in prange(n_parts):
        c0 = part * cols_per_part
        c1 = min(d, c0 + cols_per_part)
        for r in range(n):
            t = tokens[r]
            for c in range(c0, c1):
                dtable[t, c] += dy[r, c]


# ---------------------------------------------------------------- AdamW
@njit(parallel=True, cache=True)
def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2):
    """In place on flat arrays, as torch.optim.AdamW (Loshchilov & Hutter 2019):
        p <- p (1 - lr wd)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps)
    with bias1 = 1 - b1^t, bias2 = 1 - b2^t."""
    decay = 1.0 - lr * weight_decay
    step_size = lr / bias1
    sqrt_bias2 = math.sqrt(bias2)
    for i in prange(p.size):
        gi = g[i]
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi
        v[i] = beta2 * v[i] + (1.0 - beta2) * (gi * gi)
        p[i] = p[i] * decay - step_size * (m[i] / (math.sqrt(v[i]) / sqrt_bias2 + eps))
