"""PyTorch backend: the kernels of backends/numpy_backend.py as torch ops on a device.

Same maths, same tiling, no autograd: every kernel runs under torch.no_grad() and
every gradient is the explicit formula of the NumPy reference. It exists so the
engine runs on a GPU (CUDA) and so the NumPy reference can be checked against a
second implementation (tests/test_backend_torch.py).

Arrays are torch.Tensor on `device`. Compute dtypes float32, float64 and bfloat16
(float16 storage works too). In low precision (bfloat16/float16) the statistics
that cannot afford 8 mantissa bits are formed in float32, as FlashAttention and
torch's fused kernels do: RMSNorm's mean square, the attention tiles (scores,
online-softmax max/sum/accumulator, and the kept log-sum-exp), and the
cross-entropy logits chunk. In float32/float64 every kernel is the reference's
arithmetic in the reference's order, up to rounding.

This module is the only place that imports torch, and backends/__init__.py imports
it only when get_backend("torch") is called.

Letters as in backends/base.py: B batch, T tokens, N = B*T, d hidden, f MLP width,
H query heads, Hkv kv heads, g = H/Hkv, hd head dim, V vocabulary, r rank.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .base import Backend, check_quantized_head, is_quantized
from .numpy_backend import GELU_C, GELU_K

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _no_grad(method):
    """Run a kernel with autograd off: the engine's backward is explicit, and a
    tensor that required grad must never make torch record a graph."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return method(*args, **kwargs)
    return wrapper


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions and softmax statistics are formed in."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _hidden_keys(q_pos0: int, tq: int, k_pos0: int, tk: int, device, window: int | None = None
                 ) -> torch.Tensor | None:
    """(tq, tk) bool, True where the query may not see the key: the key is in its
    future (k > q) or, with a sliding window, too far back (q - k >= window). None
    when every query of the tile sees every key of the tile."""
    future = k_pos0 + tk - 1 > q_pos0  # the last key after the first query
    too_far = window is not None and (q_pos0 + tq - 1) - k_pos0 >= window  # the first key before the last window
    if not future and not too_far:
        return None
    q_pos = q_pos0 + torch.arange(tq, device=device)[:, None]
    k_pos = k_pos0 + torch.arange(tk, device=device)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= q_pos - k_pos >= window
    return hidden


def _first_key(q_pos0: int, window: int | None) -> int:
    """The first key any query at position >= q_pos0 sees (key tiles before it are skipped)."""
    return 0 if window is None else max(0, q_pos0 - window + 1)


def _heads_first(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, t, H, hd) -> (B, Hkv, g*t, hd): query heads grouped under the kv head they
    read (head h reads kv head h // g), and the g heads of a group stacked as rows,
    so one batched matmul against (B, Hkv, hd, tk) serves the whole group and
    sums over the group come out of the matmul (no repeat of k or v)."""
    b, t, h, hd = x.shape
    g = h // n_kv
    return x.reshape(b, t, n_kv, g, hd).permute(0, 2, 3, 1, 4).reshape(b, n_kv, g * t, hd)


def _tokens_first(x: torch.Tensor, t: int) -> torch.Tensor:
    """(B, Hkv, g*t, hd) -> (B, t, H, hd), the inverse of _heads_first."""
    b, n_kv, gt, hd = x.shape
    g = gt // t
    return x.reshape(b, n_kv, g, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, n_kv * g, hd)


class TorchBackend(Backend):
    """Kernels as torch ops on one device ("cpu", "cuda", "cuda:1", ...)."""

    name = "torch"

    def __init__(self, device: str = "cpu", threads: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device")
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: torch has one intra-op pool

    def __repr__(self) -> str:
        return f"TorchBackend(device={str(self.device)!r})"

    # ---------------------------------------------------------------- arrays
    def _dt(self, dtype) -> torch.dtype | None:
        """A torch dtype from a torch dtype, a name, or a numpy dtype."""
        if dtype is None or isinstance(dtype, torch.dtype):
            return dtype
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        try:
            return _DTYPES[name]
        except KeyError:
            raise TypeError(f"torch backend has no dtype {name!r}; known: {', '.join(_DTYPES)}") from None

    def asarray(self, x, dtype=None):
        """A tensor on this backend's device. On cpu a writable numpy array of the
        same dtype is wrapped, not copied (as NumpyBackend.asarray does). A weight kept
        as GGUF blocks stays one, its bytes moved to the device (backends/quant_torch.py)."""
        if is_quantized(x):
            from .quant_torch import bytes_on
            return x.with_parts(lambda data: bytes_on(data, self.device))
        dtype = self._dt(dtype)
        if isinstance(x, torch.Tensor):
            return x.detach().to(device=self.device, dtype=dtype)
        x = np.asarray(x)  # lists become numpy first, so dtypes follow numpy's rules
        if not x.flags.writeable or any(s < 0 for s in x.strides):
            x = x.copy()  # torch cannot wrap read-only memory or negative strides
        return torch.as_tensor(x, device=self.device).to(dtype=dtype)

    def to_numpy(self, x):
        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()  # numpy has no bfloat16; float32 holds every bf16 value exactly
        return x.numpy()

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=self._dt(dtype), device=self.device)

    def zeros_like(self, x):
        return torch.zeros_like(x)

    def cast(self, x, dtype):
        if x.dtype == dtype:
            return x
        return x.to(self._dt(dtype))

    def dtype(self, name):
        return _DTYPES[name]

    def concat(self, xs, axis):
        return torch.cat(xs, dim=axis)

    def permute(self, x, axes):
        return x.permute(*axes).contiguous()

    def sum(self, x, axis=None, keepdims=False):
        if axis is None:
            total = x.sum()
            return total.reshape((1,) * x.ndim) if keepdims else total
        return x.sum(dim=axis, keepdim=keepdims)

    @_no_grad
    def norm_sq(self, x):
        x = x.reshape(-1).to(_acc_dtype(x.dtype))
        return float(torch.dot(x, x))

    def isfinite(self, x):
        return bool(torch.isfinite(x).all())

    def nbytes(self, x):
        return int(x.element_size() * x.numel())

    # ---------------------------------------------------------------- device
    def synchronize(self) -> None:
        """Wait for queued device work (for wall-clock timing); a no-op on CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def max_memory_allocated(self) -> int | None:
        """Peak bytes the caching allocator handed out on this CUDA device since the
        last reset_peak_memory(); None on CPU, where torch keeps no such count."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def memory_allocated(self) -> int | None:
        """Bytes held in tensors on this CUDA device now; None on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return None

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    # ---------------------------------------------------------------- linear algebra
    @_no_grad
    def matmul(self, a, b):
        if is_quantized(b):  # dequantised a tile at a time on the device
            from . import quant_torch
            return quant_torch.matmul(a, b)
        return a @ self.cast(b, a.dtype)

    @_no_grad
    def matmul_tn(self, a, b):
        return a.T @ self.cast(b, a.dtype)

    @_no_grad
    def matmul_nt(self, a, b):
        if is_quantized(b):
            from . import quant_torch
            return quant_torch.matmul_nt(a, b)
        return a @ self.cast(b, a.dtype).T

    @_no_grad
    def orthonormal_range(self, x, rank, seed, oversample=8, power_iters=2):
        n, width = x.shape
        # torch.linalg has no bf16/fp16 QR or SVD: the sketch is formed in float32.
        xa = x.to(_acc_dtype(x.dtype))
        gen = torch.Generator(device=x.device).manual_seed(seed)
        if rank >= width:  # the whole space: any orthogonal matrix is exact
            basis, _ = torch.linalg.qr(torch.randn((width, width), generator=gen, dtype=xa.dtype, device=x.device))
            return basis.to(x.dtype)
        sketch = min(width, rank + oversample)
        omega = torch.randn((width, sketch), generator=gen, dtype=xa.dtype, device=x.device)
        basis, _ = torch.linalg.qr(xa.T @ (xa @ omega))  # (width, sketch), range of x^T x
        for _ in range(power_iters):
            basis, _ = torch.linalg.qr(xa.T @ (xa @ basis))
        # Rotate inside the sketch so the first r columns are the top-r directions.
        _, _, vt = torch.linalg.svd(xa @ basis, full_matrices=False)  # (sketch, sketch)
        return (basis @ vt[:rank].T).to(x.dtype).contiguous()  # (width, r)

    # ---------------------------------------------------------------- ops
    @_no_grad
    def embedding_forward(self, table, tokens):
        if is_quantized(table):
            from . import quant_torch
            return quant_torch.gather_rows(table, tokens)
        return table[tokens]

    @_no_grad
    def embedding_backward(self, dy, tokens, vocab_size):
        dtable = torch.zeros((vocab_size, dy.shape[1]), dtype=dy.dtype, device=dy.device)
        dtable.index_add_(0, tokens, dy)  # repeated tokens accumulate, as np.add.at
        return dtable

    @_no_grad
    def rmsnorm_forward(self, x, w, eps):
        mean_sq = (x * x).mean(dim=-1, keepdim=True, dtype=_acc_dtype(x.dtype))  # (N, 1)
        rstd = (1.0 / torch.sqrt(mean_sq + eps)).to(x.dtype)
        return x * rstd * self.cast(w, x.dtype), rstd

    @_no_grad
    def rmsnorm_backward(self, dy, x, w, rstd):
        w = self.cast(w, dy.dtype)
        x_hat = x * rstd  # (N, d)
        dw = (dy * x_hat).sum(dim=0)  # (d,)
        g = dy * w  # gradient w.r.t. x_hat
        proj = (g * x_hat).mean(dim=-1, keepdim=True, dtype=_acc_dtype(dy.dtype)).to(dy.dtype)  # (N, 1)
        dx = rstd * (g - x_hat * proj)
        return dx, dw

    @_no_grad
    def rope_forward(self, x, cos, sin):
        half = x.shape[-1] // 2
        c = cos[None, :, None, :half].to(x.dtype)  # (1, T, 1, hd/2)
        s = sin[None, :, None, :half].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        y[..., :half] = x1 * c - x2 * s
        y[..., half:] = x2 * c + x1 * s
        return y

    def rope_backward(self, dy, cos, sin):
        return self.rope_forward(dy, cos, -sin)

    @_no_grad
    def attention_forward(self, q, k, v, tile, q_offset=0, window=None, scale=None):
        b, tq_total, n_heads, hd = q.shape
        n_kv, tk_total = k.shape[2], k.shape[1]
        acc_dt = _acc_dtype(q.dtype)
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        k_all = k.to(acc_dt).permute(0, 2, 3, 1)  # (B, Hkv, hd, Tk), cast once, not per tile
        v_all = v.to(acc_dt).permute(0, 2, 1, 3)  # (B, Hkv, Tk, hd)
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((b, tq_total, n_heads), dtype=acc_dt, device=q.device)  # kept in float32 for bf16
        for i0 in range(0, tq_total, tile):
            i1 = min(i0 + tile, tq_total)
            tq = i1 - i0
            qt = _heads_first(q[:, i0:i1].to(acc_dt), n_kv) * scale  # (B, Hkv, g*tq, hd)
            m = torch.full(qt.shape[:-1], -math.inf, dtype=acc_dt, device=q.device)  # running max
            denom = torch.zeros_like(m)  # running sum of exp
            acc = torch.zeros_like(qt)  # running sum of p @ v
            last_key = min(tk_total, q_offset + i1)  # causal: keys up to the last query
            for j0 in range(_first_key(q_offset + i0, window), last_key, tile):
                j1 = min(j0 + tile, last_key)
                s = qt @ k_all[..., j0:j1]  # (B, Hkv, g*tq, tk)
                mask = _hidden_keys(q_offset + i0, tq, j0, j1 - j0, q.device, window)
                if mask is not None:
                    s.view(b, n_kv, -1, tq, j1 - j0).masked_fill_(mask, -math.inf)
                m_new = torch.maximum(m, s.amax(dim=-1))
                shift = m_new
                if window is not None:  # a row may see no key yet: exp(-inf - -inf) must be 0, not nan
                    shift = m_new.masked_fill(m_new == -math.inf, 0.0)
                correction = torch.exp(m - shift)
                p = torch.exp(s - shift[..., None])
                denom = denom * correction + p.sum(dim=-1)
                acc = acc * correction[..., None] + p @ v_all[:, :, j0:j1]
                m = m_new
            o[:, i0:i1] = _tokens_first(acc / denom[..., None], tq).to(q.dtype)
            lse[:, i0:i1] = _tokens_first((m + torch.log(denom))[..., None], tq)[..., 0]
        return o, lse

    @_no_grad
    def attention_backward(self, do, q, k, v, o, lse, tile, window=None, scale=None):
        b, t_total, n_heads, hd = q.shape
        n_kv = k.shape[2]
        acc_dt = _acc_dtype(q.dtype)
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        delta = (do.to(acc_dt) * o.to(acc_dt)).sum(dim=-1)  # D = rowsum(dO * O): (B, T, H)
        k_all = k.to(acc_dt).permute(0, 2, 1, 3)  # (B, Hkv, T, hd)
        v_all = v.to(acc_dt).permute(0, 2, 1, 3)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.zeros((b, n_kv, t_total, hd), dtype=acc_dt, device=q.device)
        dv = torch.zeros_like(dk)
        for i0 in range(0, t_total, tile):
            i1 = min(i0 + tile, t_total)
            tq = i1 - i0
            qt = _heads_first(q[:, i0:i1].to(acc_dt), n_kv) * scale  # (B, Hkv, g*tq, hd)
            dot = _heads_first(do[:, i0:i1].to(acc_dt), n_kv)
            lse_t = _heads_first(lse[:, i0:i1, :, None].to(acc_dt), n_kv)  # (B, Hkv, g*tq, 1)
            delta_t = _heads_first(delta[:, i0:i1, :, None], n_kv)
            dqt = torch.zeros_like(qt)
            for j0 in range(_first_key(i0, window), i1, tile):
                j1 = min(j0 + tile, i1)
                kt = k_all[:, :, j0:j1]  # (B, Hkv, tk, hd)
                vt = v_all[:, :, j0:j1]
                s = qt @ kt.transpose(-1, -2)  # (B, Hkv, g*tq, tk)
                mask = _hidden_keys(i0, tq, j0, j1 - j0, q.device, window)
                if mask is not None:
                    s.view(b, n_kv, -1, tq, j1 - j0).masked_fill_(mask, -math.inf)
                p = torch.exp(s - lse_t)  # probabilities recomputed from the kept lse
                dv[:, :, j0:j1] += p.transpose(-1, -2) @ dot  # the matmul sums over the group
                ds = p * (dot @ vt.transpose(-1, -2) - delta_t)  # dS = P * (dP - D)
                dqt += ds @ kt
                dk[:, :, j0:j1] += ds.transpose(-1, -2) @ qt  # qt is scaled: dk = scale dS^T Q
            dq[:, i0:i1] = _tokens_first(dqt * scale, tq).to(q.dtype)
        dk = dk.permute(0, 2, 1, 3).contiguous().to(q.dtype)  # (B, T, Hkv, hd)
        dv = dv.permute(0, 2, 1, 3).contiguous().to(q.dtype)
        return dq, dk, dv

    @_no_grad
    def swiglu_forward(self, g, u):
        return torch.nn.functional.silu(g) * u

    @_no_grad
    def swiglu_backward(self, dh, g, u):
        sig = torch.sigmoid(g)
        silu = g * sig
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        return dg, dh * silu

    @_no_grad
    def geglu_forward_fused(self, gate_up):
        f = gate_up.shape[1] // 2
        g, u = gate_up[:, :f], gate_up[:, f:]
        return torch.nn.functional.gelu(g, approximate="tanh") * u  # 0.5 g (1 + tanh(c (g + 0.044715 g^3))) u

    @_no_grad
    def geglu_backward_fused(self, dh, gate_up):
        f = gate_up.shape[1] // 2
        g, u = gate_up[:, :f], gate_up[:, f:]
        t = torch.tanh(GELU_C * (g + GELU_K * g ** 3))
        gelu = 0.5 * g * (1.0 + t)
        dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_K * g * g)
        dgate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)  # (N, 2f)
        dgate_up[:, :f] = dh * u * dgelu
        dgate_up[:, f:] = dh * gelu
        return dgate_up

    @_no_grad
    def softcap(self, x, cap):
        return cap * torch.tanh(x / cap)

    @_no_grad
    def cross_entropy_head(self, x, head, targets, chunk, ignore_index, need_dx, need_dhead, softcap=None):
        if is_quantized(head):  # a vocabulary tile at a time; the frozen table has no dhead
            check_quantized_head(softcap, need_dhead)
            from . import quant_torch
            return (*quant_torch.cross_entropy_head(x, head, targets, ignore_index, need_dx), None)
        n = x.shape[0]
        acc_dt = _acc_dtype(x.dtype)
        valid = targets != ignore_index
        n_valid = int(valid.sum())
        dx = torch.zeros_like(x) if need_dx else None
        dhead = torch.zeros(head.shape, dtype=acc_dt, device=x.device) if need_dhead else None
        if n_valid == 0:
            return 0.0, 0, dx, (None if dhead is None else dhead.to(x.dtype))
        total = torch.zeros((), dtype=torch.float64 if acc_dt == torch.float64 else torch.float32, device=x.device)
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            xc, ok = x[c0:c1], valid[c0:c1]
            tc = torch.where(ok, targets[c0:c1], 0)[:, None]  # (c, 1)
            z = self.matmul_nt(xc, head).to(acc_dt)  # logits chunk (c, V), the only one alive
            if softcap is not None:  # z = c tanh(z_raw / c)
                capped = torch.tanh(z / softcap)  # (c, V)
                z = softcap * capped
            z -= z.amax(dim=1, keepdim=True)  # shift for a stable exp
            z_target = z.gather(1, tc)[:, 0]
            z.exp_()
            row_sum = z.sum(dim=1)
            total += torch.where(ok, torch.log(row_sum) - z_target, 0.0).sum()
            if need_dx or need_dhead:
                z /= row_sum[:, None]  # softmax p
                z.scatter_add_(1, tc, torch.full_like(z_target[:, None], -1.0))  # p - onehot(t)
                z *= (ok.to(acc_dt) / n_valid)[:, None]
                if softcap is not None:
                    z *= 1.0 - capped * capped  # dz_raw = dz (1 - tanh^2)
                if need_dx:
                    dx[c0:c1] = self.matmul(z.to(x.dtype), head)
                if need_dhead:
                    dhead += z.T @ xc.to(acc_dt)
        return float(total) / n_valid, n_valid, dx, (None if dhead is None else dhead.to(x.dtype))

    @_no_grad
    def adamw_update(self, p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
        # The operations of torch.optim.adam._single_tensor_adam, in its order.
        g = self.cast(g, p.dtype)  # bf16 gradients of float32 master weights (numpy promotes implicitly)
        if weight_decay != 0:
            p.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        denom = (v.sqrt() / bias2 ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-(lr / bias1))

    @_no_grad
    def scale_(self, x, s):
        x.mul_(s)

    @_no_grad
    def decode_tile(self, part, rows, out):
        """Rows of a part decoded on the device (its bytes moved there if they are not)
        and copied into the numpy array out (for export, fingerprints and tests; the
        products never copy a tile back)."""
        from .quant_torch import bytes_on, decode_rows

        if not isinstance(part.data, torch.Tensor):
            part = part.with_data(bytes_on(part.data, self.device))
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        out[:] = decode_rows(part, index).cpu().numpy()
