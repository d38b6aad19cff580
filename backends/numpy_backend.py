"""NumPy reference backend: the readable definition of every kernel.

Other backends are tested against this one. Letters as in backends/base.py.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Backend, check_quantized_head, is_quantized

GELU_C = math.sqrt(2.0 / math.pi)  # tanh-GELU: 0.5 g (1 + tanh(GELU_C (g + GELU_K g^3)))
GELU_K = 0.044715

_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "int64": np.int64}


def _hidden_keys(q_pos0: int, tq: int, k_pos0: int, tk: int, window: int | None = None) -> np.ndarray | None:
    """(tq, tk) boolean, True where the query may not see the key: the key is in its
    future (k > q) or, with a sliding window, too far back (q - k >= window). None
    when every query of the tile sees every key of the tile."""
    future = k_pos0 + tk - 1 > q_pos0  # the last key after the first query
    too_far = window is not None and (q_pos0 + tq - 1) - k_pos0 >= window  # the first key before the last window
    if not future and not too_far:
        return None
    q_pos = q_pos0 + np.arange(tq)[:, None]
    k_pos = k_pos0 + np.arange(tk)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= q_pos - k_pos >= window
    return hidden


def _first_key(q_pos0: int, window: int | None) -> int:
    """The first key any query at position >= q_pos0 sees: 0, or with a window the
    start of the first query's window. Key tiles before it are skipped."""
    return 0 if window is None else max(0, q_pos0 - window + 1)


def _group_rows(x: np.ndarray, n_kv: int) -> np.ndarray:
    """(B, t, H, hd) -> (B*Hkv, g*t, hd): the g = H/Hkv query heads that read one kv
    head (head h reads kv head h // g) stacked as rows, so one matmul per kv head
    serves the whole group and sums over it in the kv gradients."""
    b, t, h, hd = x.shape
    g = h // n_kv
    return x.reshape(b, t, n_kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b * n_kv, g * t, hd)


def _ungroup_rows(x: np.ndarray, b: int, t: int, n_kv: int) -> np.ndarray:
    """(B*Hkv, g*t, w) -> (B, t, H, w), the inverse of _group_rows."""
    w = x.shape[-1]
    g = x.shape[1] // t
    return x.reshape(b, n_kv, g, t, w).transpose(0, 3, 1, 2, 4).reshape(b, t, n_kv * g, w)


def _kv_heads(x: np.ndarray) -> np.ndarray:
    """(B, t, Hkv, hd) -> (B*Hkv, t, hd), contiguous."""
    b, t, n_kv, hd = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(b * n_kv, t, hd)


class NumpyBackend(Backend):
    name = "numpy"

    # ---------------------------------------------------------------- arrays
    def asarray(self, x, dtype=None):
        if is_quantized(x):  # GGUF blocks stay blocks (minilars/quant.py)
            return x
        return np.asarray(x, dtype=_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)

    def to_numpy(self, x):
        return np.asarray(x)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def zeros_like(self, x):
        return np.zeros_like(x)

    def cast(self, x, dtype):
        return x if x.dtype == dtype else x.astype(dtype)

    def dtype(self, name):
        return np.dtype(_DTYPES[name])

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def permute(self, x, axes):
        return np.ascontiguousarray(x.transpose(axes))

    def sum(self, x, axis=None, keepdims=False):
        return x.sum(axis=axis, keepdims=keepdims)

    def norm_sq(self, x):
        x = x.ravel()
        return float(np.dot(x, x))

    def isfinite(self, x):
        return bool(np.isfinite(x).all())

    def nbytes(self, x):
        return int(x.nbytes)

    # ---------------------------------------------------------------- linear algebra
    # A weight stored in lower precision is upcast a block of rows at a time, so the
    # transient copy stays small even for the (V, d) embedding.
    UPCAST_BLOCK = 1 << 22  # elements per upcast block (16 MiB in float32)

    def matmul(self, a, b):
        if is_quantized(b):  # GGUF blocks, a tile at a time (minilars/quant.py)
            from minilars import quant
            return quant.matmul(a, b, self.decode_tile)
        if b.dtype == a.dtype:
            return a @ b
        rows = max(1, self.UPCAST_BLOCK // max(1, b.shape[1]))
        if rows >= b.shape[0]:
            return a @ b.astype(a.dtype)
        out = np.zeros((a.shape[0], b.shape[1]), dtype=a.dtype)
        for k0 in range(0, b.shape[0], rows):  # a b = sum_k a[:, k] b[k, :]
            out += a[:, k0:k0 + rows] @ b[k0:k0 + rows].astype(a.dtype)
        return out

    def matmul_tn(self, a, b):
        return a.T @ b

    def matmul_nt(self, a, b):
        if is_quantized(b):
            from minilars import quant
            return quant.matmul_nt(a, b, self.decode_tile)
        if b.dtype == a.dtype:
            return a @ b.T
        rows = max(1, self.UPCAST_BLOCK // max(1, b.shape[1]))
        out = np.empty((a.shape[0], b.shape[0]), dtype=a.dtype)
        for m0 in range(0, b.shape[0], rows):  # output columns block by block
            out[:, m0:m0 + rows] = a @ b[m0:m0 + rows].astype(a.dtype).T
        return out

    def orthonormal_range(self, x, rank, seed, oversample=8, power_iters=2):
        n, width = x.shape
        rng = np.random.default_rng(seed)
        if rank >= width:  # the whole space: any orthogonal matrix is exact
            basis, _ = np.linalg.qr(rng.standard_normal((width, width)))
            return basis.astype(x.dtype)
        sketch = min(width, rank + oversample)
        omega = rng.standard_normal((width, sketch)).astype(x.dtype)
        basis, _ = np.linalg.qr(x.T @ (x @ omega))  # (width, sketch), range of x^T x
        for _ in range(power_iters):
            basis, _ = np.linalg.qr(x.T @ (x @ basis))
        # Rotate inside the sketch so the first r columns are the top-r directions.
        _, _, vt = np.linalg.svd(x @ basis, full_matrices=False)  # (sketch, sketch)
        return np.ascontiguousarray(basis @ vt[:rank].T)  # (width, r)

    # ---------------------------------------------------------------- ops
    def embedding_forward(self, table, tokens):
        if is_quantized(table):
            return table.gather_rows(tokens, self.decode_tile)
        return table[tokens]

    def embedding_backward(self, dy, tokens, vocab_size):
        dtable = np.zeros((vocab_size, dy.shape[1]), dtype=dy.dtype)
        np.add.at(dtable, tokens, dy)
        return dtable

    def rmsnorm_forward(self, x, w, eps):
        rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # (N, 1)
        return x * rstd * self.cast(w, x.dtype), rstd.astype(x.dtype)

    def rmsnorm_backward(self, dy, x, w, rstd):
        w = self.cast(w, dy.dtype)
        x_hat = x * rstd  # (N, d)
        dw = np.sum(dy * x_hat, axis=0)  # (d,)
        g = dy * w  # gradient w.r.t. x_hat
        dx = rstd * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
        return dx, dw

    def rope_forward(self, x, cos, sin):
        half = x.shape[-1] // 2
        c = cos[None, :, None, :half].astype(x.dtype, copy=False)  # (1, T, 1, hd/2)
        s = sin[None, :, None, :half].astype(x.dtype, copy=False)
        x1, x2 = x[..., :half], x[..., half:]
        y = np.empty_like(x)
        y[..., :half] = x1 * c - x2 * s
        y[..., half:] = x2 * c + x1 * s
        return y

    def rope_backward(self, dy, cos, sin):
        return self.rope_forward(dy, cos, -sin)

    def attention_forward(self, q, k, v, tile, q_offset=0, window=None, scale=None):
        b, tq_total, n_heads, hd = q.shape
        n_kv = k.shape[2]
        g = n_heads // n_kv
        scale = q.dtype.type(1.0 / np.sqrt(hd) if scale is None else scale)
        keys, values = _kv_heads(k), _kv_heads(v)  # (B*Hkv, Tk, hd)
        o = np.empty_like(q)
        lse = np.empty((b, tq_total, n_heads), dtype=q.dtype)
        for i0 in range(0, tq_total, tile):
            i1 = min(i0 + tile, tq_total)
            qt = _group_rows(q[:, i0:i1], n_kv) * scale  # (B*Hkv, g*tq, hd)
            m = np.full(qt.shape[:-1], -np.inf, dtype=q.dtype)  # running row max
            denom = np.zeros_like(m)  # running sum of exp(s - m)
            acc = np.zeros_like(qt)  # running sum of exp(s - m) @ v
            last_key = min(keys.shape[1], q_offset + i1)  # causal: keys up to the last query
            for j0 in range(_first_key(q_offset + i0, window), last_key, tile):
                j1 = min(j0 + tile, last_key)
                s = qt @ keys[:, j0:j1].transpose(0, 2, 1)  # (B*Hkv, g*tq, tk)
                mask = _hidden_keys(q_offset + i0, i1 - i0, j0, j1 - j0, window)
                if mask is not None:
                    s[:, np.tile(mask, (g, 1))] = -np.inf
                m_new = np.maximum(m, s.max(axis=-1))
                shift = m_new
                if window is not None:  # a row may see no key yet: exp(-inf - -inf) must be 0, not nan
                    shift = np.where(m_new == -np.inf, 0.0, m_new).astype(q.dtype)
                correction = np.exp(m - shift)
                p = np.exp(s - shift[..., None])
                denom = denom * correction + p.sum(axis=-1)
                acc = acc * correction[..., None] + p @ values[:, j0:j1]
                m = m_new
            o[:, i0:i1] = _ungroup_rows(acc / denom[..., None], b, i1 - i0, n_kv)
            lse[:, i0:i1] = _ungroup_rows((m + np.log(denom))[..., None], b, i1 - i0, n_kv)[..., 0]
        return o, lse

    def attention_backward(self, do, q, k, v, o, lse, tile, window=None, scale=None):
        b, t_total, n_heads, hd = q.shape
        n_kv = k.shape[2]
        g = n_heads // n_kv
        scale = q.dtype.type(1.0 / np.sqrt(hd) if scale is None else scale)
        keys, values = _kv_heads(k), _kv_heads(v)  # (B*Hkv, T, hd)
        delta = np.sum(do * o, axis=-1)  # D = rowsum(dO * O): (B, T, H)
        dq = np.empty_like(q)
        dkeys, dvalues = np.zeros_like(keys), np.zeros_like(values)
        for i0 in range(0, t_total, tile):
            i1 = min(i0 + tile, t_total)
            qt = _group_rows(q[:, i0:i1], n_kv) * scale  # (B*Hkv, g*tq, hd)
            dot = _group_rows(do[:, i0:i1], n_kv)
            lse_t = _group_rows(lse[:, i0:i1, :, None], n_kv)  # (B*Hkv, g*tq, 1)
            delta_t = _group_rows(delta[:, i0:i1, :, None], n_kv)
            dqt = np.zeros_like(qt)
            for j0 in range(_first_key(i0, window), i1, tile):
                j1 = min(j0 + tile, i1)
                kt, vt = keys[:, j0:j1], values[:, j0:j1]  # (B*Hkv, tk, hd)
                s = qt @ kt.transpose(0, 2, 1)  # (B*Hkv, g*tq, tk)
                mask = _hidden_keys(i0, i1 - i0, j0, j1 - j0, window)
                if mask is not None:
                    s[:, np.tile(mask, (g, 1))] = -np.inf
                p = np.exp(s - lse_t)  # probabilities recomputed from the kept lse
                dvalues[:, j0:j1] += p.transpose(0, 2, 1) @ dot  # sums over the group's rows
                ds = p * (dot @ vt.transpose(0, 2, 1) - delta_t)  # dS = P * (dP - D)
                dqt += ds @ kt
                dkeys[:, j0:j1] += ds.transpose(0, 2, 1) @ qt  # qt is scaled: dk = scale dS^T Q
            dq[:, i0:i1] = _ungroup_rows(dqt * scale, b, i1 - i0, n_kv)
        dk = dkeys.reshape(b, n_kv, t_total, hd).transpose(0, 2, 1, 3).copy()
        dv = dvalues.reshape(b, n_kv, t_total, hd).transpose(0, 2, 1, 3).copy()
        return dq, dk, dv

    def swiglu_forward(self, g, u):
        return g / (1.0 + np.exp(-g)) * u

    def swiglu_backward(self, dh, g, u):
        sig = 1.0 / (1.0 + np.exp(-g))
        silu = g * sig
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        return dg, dh * silu

    def geglu_forward_fused(self, gate_up):
        f = gate_up.shape[1] // 2
        g, u = gate_up[:, :f], gate_up[:, f:]
        t = np.tanh(GELU_C * (g + GELU_K * g ** 3))
        return 0.5 * g * (1.0 + t) * u

    def geglu_backward_fused(self, dh, gate_up):
        f = gate_up.shape[1] // 2
        g, u = gate_up[:, :f], gate_up[:, f:]
        t = np.tanh(GELU_C * (g + GELU_K * g ** 3))
        gelu = 0.5 * g * (1.0 + t)
        dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_K * g * g)
        dgate_up = np.empty_like(gate_up)  # (N, 2f)
        dgate_up[:, :f] = dh * u * dgelu
        dgate_up[:, f:] = dh * gelu
        return dgate_up

    def softcap(self, x, cap):
        return cap * np.tanh(x / cap)

    def cross_entropy_head(self, x, head, targets, chunk, ignore_index, need_dx, need_dhead, softcap=None):
        if is_quantized(head):  # a vocabulary tile at a time; the frozen table has no dhead
            check_quantized_head(softcap, need_dhead)
            from minilars import quant
            return (*quant.cross_entropy_head(x, head, targets, ignore_index, need_dx, self.decode_tile), None)
        n = x.shape[0]
        valid = targets != ignore_index
        n_valid = int(valid.sum())
        dx = np.zeros_like(x) if need_dx else None
        dhead = np.zeros(head.shape, dtype=x.dtype) if need_dhead else None
        if n_valid == 0:
            return 0.0, 0, dx, dhead
        total = 0.0
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            xc, ok = x[c0:c1], valid[c0:c1]
            tc = np.where(ok, targets[c0:c1], 0)
            z = self.matmul_nt(xc, head)  # logits chunk (c, V), the only one alive
            if softcap is not None:  # z = c tanh(z_raw / c)
                capped = np.tanh(z / softcap)  # (c, V)
                z = softcap * capped
            rows = np.arange(c1 - c0)
            z -= z.max(axis=1, keepdims=True)  # shift for a stable exp
            z_target = z[rows, tc].copy()
            np.exp(z, out=z)
            row_sum = z.sum(axis=1)
            total += float(np.sum((np.log(row_sum) - z_target)[ok]))
            if need_dx or need_dhead:
                z /= row_sum[:, None]  # softmax p
                z[rows, tc] -= 1.0  # p - onehot(t)
                z *= (ok / n_valid).astype(x.dtype)[:, None]
                if softcap is not None:
                    z *= 1.0 - capped * capped  # dz_raw = dz (1 - tanh^2)
                if need_dx:
                    dx[c0:c1] = self.matmul(z, head)
                if need_dhead:
                    dhead += z.T @ xc
        return total / n_valid, n_valid, dx, dhead

    def adamw_update(self, p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
        p *= 1.0 - lr * weight_decay
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        v += (1.0 - beta2) * (g * g)
        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        denom = np.sqrt(v) / np.sqrt(bias2) + eps
        p -= (lr / bias1) * (m / denom)

    def scale_(self, x, s):
        x *= s
