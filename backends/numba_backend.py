"""Numba backend: the NumPy reference with its hot kernels jitted.

What is jitted (backends/numba_kernels.py): attention forward and backward (tiled,
causal with an optional sliding window, grouped-query, online softmax fused with
masking, no (T, T) array, work items spread over threads with prange), RMSNorm,
RoPE, SwiGLU and GeGLU forward and backward, the softmax rows of the chunked loss
(with or without a logit soft cap), the soft cap of inference logits, the
embedding scatter, the AdamW update and the float32 <-> float16 casts of the
activation store. What
stays with BLAS: the model's projections (matmul, matmul_tn,
matmul_nt: numpy's multithreaded BLAS, except products through a rank-r factor,
which run on one thread, NumbaBackend), the logits chunk and its two
gradient products in the loss, the LARS range finder (QR, SVD); inside the
attention kernels the tile products are BLAS calls too (np.dot, one thread per
call, since each thread makes its own). Every method falls back to the NumPy
reference on inputs a kernel does not take (float16, mixed dtypes, shapes the
reference rejects), so the two backends are interchangeable everywhere.

Warming up: numba compiles each kernel on its first call for the dtypes and array
layouts it meets (seconds per kernel) and caches the machine code on disk
(`cache=True`), so only the first run on a machine pays. Call `warmup()` before
timing anything; it returns the seconds it took:

    from minilars.backends.numba_backend import warmup
    print(f"numba compile: {warmup(('float32',)):.1f} s")

Letters as in backends/base.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np

from . import numba_kernels as K  # imports numba: this module is loaded only on request
from .base import is_quantized
from .numpy_backend import NumpyBackend

_JIT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_ROWS_PER_PART = 64  # rmsnorm dw: rows summed per partial (fixed, so sums are reproducible)
_COLS_PER_PART = 32  # embedding backward: columns per thread-owned slice
_CAST_MIN_ELEMENTS = 1 << 15  # smaller casts: NumPy's loop beats starting the kernel's threads
_HALF = np.dtype(np.float16)
_SINGLE = np.dtype(np.float32)


def half_to_single_table() -> np.ndarray:
    """The float32 bit pattern of each of the 65536 float16 patterns, (65536,) uint32
    (256 KiB), by the exact IEEE 754 widening binary16 -> binary32, built from the
    bits so that it reads the same on every CPU. With s the sign, e the 5-bit
    exponent and m the 10-bit significand of h:
    - e = 0, m = 0: signed zero, s << 31;
    - e = 0, m > 0: the subnormal m 2^-24 = 2^(p-24) (m / 2^p), p = floor(log2 m), is
      a normal float32: exponent p - 24 + 127, significand m << (23 - p) without
      its leading bit;
    - 0 < e < 31: exponent rebiased, e - 15 + 127, significand m << 13;
    - e = 31: inf (m = 0) or NaN keeping its payload, 0x7F800000 | m << 13, a
      signalling NaN left signalling, as NumPy's cast gives on x86.
    NumPy's own cast goes through the CPU's conversion instruction on ARM, which
    quiets signalling NaNs and raises the invalid flag ("RuntimeWarning: invalid
    value encountered in cast")."""
    h = np.arange(1 << 16, dtype=np.uint32)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    p = np.zeros_like(m)  # floor(log2 m) for m > 0 (0 for m = 0, masked below)
    for bit in range(1, 10):
        p += (m >> bit) > 0
    subnormal = np.where(m == 0, 0, ((p + 103) << 23) | ((m << (23 - p)) & 0x7FFFFF))
    normal = ((e + 112) << 23) | (m << 13)
    inf_nan = 0x7F800000 | (m << 13)
    return (sign | np.where(e == 0, subnormal, np.where(e == 31, inf_nan, normal))).astype(np.uint32)


_HALF_TO_SINGLE = half_to_single_table()


def _jittable(*arrays) -> bool:
    """All float32 or all float64: the kernels compute in their inputs' dtype."""
    dtype = arrays[0].dtype
    return dtype in _JIT_DTYPES and all(a.dtype == dtype for a in arrays)


def _check_window(window) -> None:
    if window is not None and int(window) < 1:
        raise ValueError(f"attention window must be at least 1 (the query itself), got {window}")


def _check_cap(cap) -> None:
    if cap is not None and not float(cap) > 0:
        raise ValueError(f"logit soft cap must be positive, got {cap}")


def _window_or_all(window, last_position: int) -> int:
    """The kernels' window: the given one, or for None one that masks nothing,
    last_position = q_offset + Tq (query p sees keys j > p - window, and p < last_position)."""
    return last_position if window is None else int(window)


def _score_scale(scale, hd: int) -> float:
    """s_ij = scale * q_i . k_j: the given scale, or 1/sqrt(hd) (Vaswani et al. 2017)."""
    return 1.0 / math.sqrt(hd) if scale is None else float(scale)


THIN_RANK = 64  # a product whose inner dimension is this small or smaller is thin (a rank-r factor's, r <= 64)
THIN_WORK = 1 << 25  # multiply-adds up to which a thin product runs on one thread (33.5 M)


def _thin(a, b) -> bool:
    """Whether a b, (M, K)(K, C), is a product through a rank-r factor (K <= THIN_RANK:
    LARS's P M, LoRA's (x A) B) that dot_one_thread takes: M K C at most THIN_WORK,
    one float dtype, both operands C- or F-contiguous (a column slice is neither:
    numpy takes it). Products with a thin output (x P, z^T dy) stay with numpy's
    BLAS, which on idle cores runs them faster (docs/speed.md)."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.ndim == 2 and b.ndim == 2
            and _jittable(a, b)):
        return False
    (m, k), c = a.shape, b.shape[1]
    return (k <= THIN_RANK and m * k * c <= THIN_WORK and b.shape[0] == k
            and all(x.flags.c_contiguous or x.flags.f_contiguous for x in (a, b)))


class NumbaBackend(NumpyBackend):
    """The NumPy reference with its hot kernels jitted. A product through a rank-r
    factor (LARS's P M, LoRA's (x A) B) runs on one thread (K.dot_one_thread): numpy's
    multithreaded BLAS took 6-8 ms for a P M one thread does in 0.25-1 ms, waiting
    for its second thread on a busy machine (docs/speed.md)."""

    name = "numba"

    def _product(self, a, b):
        """a b on one thread when it is thin, else None."""
        if not _thin(a, b):
            return None
        out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        K.dot_one_thread(a, b, out)
        return out

    def matmul(self, a, b):
        out = self._product(a, b)
        return super().matmul(a, b) if out is None else out

    def matmul_tn(self, a, b):
        out = self._product(a.T, b) if isinstance(a, np.ndarray) else None
        return super().matmul_tn(a, b) if out is None else out

    def matmul_nt(self, a, b):
        out = self._product(a, b.T) if isinstance(b, np.ndarray) else None  # not a weight kept as blocks
        return super().matmul_nt(a, b) if out is None else out

    def cast(self, x, dtype):
        """float32 <-> float16 of contiguous arrays by the jitted bit-pattern kernels
        (NumPy's results on x86, bit for bit, several times faster); other casts as
        NumPy, except float16 -> float32 of small or strided arrays, which reads the
        same table (NumPy's cast quiets NaN payloads on ARM)."""
        dtype = np.dtype(dtype)
        pair = (x.dtype, dtype) if isinstance(x, np.ndarray) else None
        if pair == (_HALF, _SINGLE) and (not x.flags.c_contiguous or x.size < _CAST_MIN_ELEMENTS):
            return _HALF_TO_SINGLE[x.view(np.uint16)].view(np.float32)
        if (pair not in ((_SINGLE, _HALF), (_HALF, _SINGLE)) or not x.flags.c_contiguous
                or x.size < _CAST_MIN_ELEMENTS):
            return super().cast(x, dtype)
        out = np.empty(x.shape, dtype=dtype)
        if pair == (_SINGLE, _HALF):
            K.single_to_half(x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16))
        else:
            K.half_to_single(x.reshape(-1).view(np.uint16), _HALF_TO_SINGLE, out.reshape(-1).view(np.uint32))
        return out

    # ---------------------------------------------------------------- ops
    def embedding_backward(self, dy, tokens, vocab_size):
        tokens = np.asarray(tokens)
        if (not _jittable(dy) or dy.ndim != 2 or tokens.ndim != 1 or tokens.size != dy.shape[0]
                or tokens.dtype.kind not in "iu"
                or (tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size))):
            return super().embedding_backward(dy, tokens, vocab_size)  # numpy's indexing rules
        dtable = np.zeros((vocab_size, dy.shape[1]), dtype=dy.dtype)
        K.embedding_backward(dy, tokens, dtable, _COLS_PER_PART)
        return dtable

    def rmsnorm_forward(self, x, w, eps):
        if not _jittable(x) or x.ndim != 2 or w.shape != (x.shape[1],):
            return super().rmsnorm_forward(x, w, eps)
        y = np.empty(x.shape, dtype=x.dtype)  # (N, d)
        rstd = np.empty((x.shape[0], 1), dtype=x.dtype)  # (N, 1)
        K.rmsnorm_forward(x, self.cast(w, x.dtype), float(eps), y, rstd)
        return y, rstd

    def rmsnorm_backward(self, dy, x, w, rstd):
        if (not _jittable(dy, x, rstd) or x.ndim != 2 or dy.shape != x.shape
                or w.shape != (x.shape[1],) or rstd.shape != (x.shape[0], 1)):
            return super().rmsnorm_backward(dy, x, w, rstd)
        n, d = x.shape
        dx = np.empty((n, d), dtype=x.dtype)
        dw_parts = np.empty((max(1, -(-n // _ROWS_PER_PART)), d), dtype=np.float64)  # (P, d)
        K.rmsnorm_backward(dy, x, self.cast(w, x.dtype), rstd, dx, dw_parts, _ROWS_PER_PART)
        return dx, dw_parts.sum(axis=0).astype(x.dtype)

    def _rope(self, x, cos, sin, sign):
        if (not _jittable(x) or x.ndim != 4 or x.shape[-1] % 2 or cos.shape != sin.shape
                or cos.shape != (x.shape[1], x.shape[3])):
            return None
        half = x.shape[-1] // 2
        # q/k arrive as column slices of the fused projection, dq/dk contiguous: the kernel
        # compiles for both layouts and reads q/k in place (a contiguous copy and its fresh
        # pages took 1.7 ms a call at T = 2048 against 1.0 ms for the strided reads)
        # the reference rotates by the first half of the tables, cast to x's dtype
        c = np.ascontiguousarray(cos[:, :half], dtype=x.dtype)  # (T, hd/2)
        s = np.ascontiguousarray(sin[:, :half], dtype=x.dtype)
        y = np.empty(x.shape, dtype=x.dtype)
        K.rope(x, c, s, sign, y)
        return y

    def rope_forward(self, x, cos, sin):
        y = self._rope(x, cos, sin, 1.0)
        return super().rope_forward(x, cos, sin) if y is None else y

    def rope_backward(self, dy, cos, sin):
        y = self._rope(dy, cos, sin, -1.0)
        return super().rope_backward(dy, cos, sin) if y is None else y

    @staticmethod
    def _attention_shapes_ok(q, k, v) -> bool:
        return (q.ndim == 4 and k.ndim == 4 and k.shape == v.shape and q.shape[0] == k.shape[0]
                and q.shape[3] == k.shape[3] and k.shape[2] > 0 and q.shape[2] % k.shape[2] == 0)

    def attention_forward(self, q, k, v, tile, q_offset=0, window=None, scale=None):
        _check_window(window)
        if not _jittable(q, k, v) or not self._attention_shapes_ok(q, k, v) or k.shape[1] == 0:
            return super().attention_forward(q, k, v, tile, q_offset, window=window, scale=scale)
        b, tq, n_heads, hd = q.shape
        o = np.empty((b, tq, n_heads, hd), dtype=q.dtype)
        lse = np.empty((b, tq, n_heads), dtype=q.dtype)
        if q.size:
            tile = max(1, min(int(tile), max(tq, k.shape[1])))  # a tile past T changes nothing
            # one compiled layout (C) for training, where v is a column slice of the fused
            # projection, and decoding, where k/v are a KV-cache prefix: a second layout
            # is a second compile of the costliest kernel; the copy is O(T) against
            # attention's O(T^2), and only made for the arrays that are not contiguous
            q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
            K.attention_forward(q, k, v, tile, int(q_offset), _window_or_all(window, int(q_offset) + tq),
                                _score_scale(scale, hd), o, lse)
        return o, lse

    def attention_backward(self, do, q, k, v, o, lse, tile, window=None, scale=None):
        _check_window(window)
        if (not _jittable(do, q, k, v, o, lse) or not self._attention_shapes_ok(q, k, v)
                or k.shape[1] != q.shape[1] or do.shape != q.shape or o.shape != q.shape
                or lse.shape != q.shape[:3]):
            return super().attention_backward(do, q, k, v, o, lse, tile, window=window, scale=scale)
        b, t, n_heads, hd = q.shape
        n_kv = k.shape[2]
        dq = np.empty(q.shape, dtype=q.dtype)  # (B, T, H, hd)
        dk = np.empty(k.shape, dtype=q.dtype)  # (B, T, Hkv, hd)
        dv = np.empty(k.shape, dtype=q.dtype)
        if q.size == 0:
            return dq, dk, dv
        tile = max(1, min(int(tile), t))
        window, scale = _window_or_all(window, t), _score_scale(scale, hd)
        # one compiled layout (C), as in attention_forward: v is a column slice when the
        # block is recomputed, contiguous when it comes from the activation store
        do, q, k, v, o, lse = (np.ascontiguousarray(a) for a in (do, q, k, v, o, lse))
        if n_kv == n_heads:  # one query head per kv head: its contributions are the gradient
            K.attention_backward(do, q, k, v, o, lse, tile, window, scale, dq, dk, dv)
            return dq, dk, dv
        dk_heads = np.empty(q.shape, dtype=q.dtype)  # per query head, summed per group below
        dv_heads = np.empty(q.shape, dtype=q.dtype)
        K.attention_backward(do, q, k, v, o, lse, tile, window, scale, dq, dk_heads, dv_heads)
        K.reduce_kv_heads(dk_heads, dk)
        K.reduce_kv_heads(dv_heads, dv)
        return dq, dk, dv

    # The kernels read the fused projection output [g | u] whole (see numba_kernels);
    # g and u passed apart are joined first, a copy the model never needs.
    @staticmethod
    def _fused_ok(gate_up) -> bool:
        return _jittable(gate_up) and gate_up.ndim == 2 and gate_up.shape[1] % 2 == 0 and gate_up.flags.c_contiguous

    def swiglu_forward_fused(self, gate_up):
        if not self._fused_ok(gate_up):
            return super().swiglu_forward_fused(gate_up)
        h = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype)  # (N, f)
        K.swiglu_forward(gate_up, h)
        return h

    def swiglu_backward_fused(self, dh, gate_up):
        if (not self._fused_ok(gate_up) or not _jittable(dh, gate_up)
                or dh.shape != (gate_up.shape[0], gate_up.shape[1] // 2)):
            return super().swiglu_backward_fused(dh, gate_up)
        dgate_up = np.empty(gate_up.shape, dtype=gate_up.dtype)  # (N, 2f)
        K.swiglu_backward(dh, gate_up, dgate_up)
        return dgate_up

    def geglu_forward_fused(self, gate_up):
        if not self._fused_ok(gate_up):
            return super().geglu_forward_fused(gate_up)
        h = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype)  # (N, f)
        K.geglu_forward(gate_up, h)
        return h

    def geglu_backward_fused(self, dh, gate_up):
        if (not self._fused_ok(gate_up) or not _jittable(dh, gate_up)
                or dh.shape != (gate_up.shape[0], gate_up.shape[1] // 2)):
            return super().geglu_backward_fused(dh, gate_up)
        dgate_up = np.empty(gate_up.shape, dtype=gate_up.dtype)  # (N, 2f)
        K.geglu_backward(dh, gate_up, dgate_up)
        return dgate_up

    def swiglu_forward(self, g, u):
        if not _jittable(g, u) or g.ndim != 2 or g.shape != u.shape:
            return super().swiglu_forward(g, u)
        return self.swiglu_forward_fused(np.concatenate([g, u], axis=1))

    def swiglu_backward(self, dh, g, u):
        if not _jittable(dh, g, u) or g.ndim != 2 or g.shape != u.shape or dh.shape != g.shape:
            return super().swiglu_backward(dh, g, u)
        dgate_up = self.swiglu_backward_fused(dh, np.concatenate([g, u], axis=1))
        return dgate_up[:, :g.shape[1]], dgate_up[:, g.shape[1]:]

    def cross_entropy_head(self, x, head, targets, chunk, ignore_index, need_dx, need_dhead, softcap=None):
        _check_cap(softcap)
        targets = np.asarray(targets)
        if (is_quantized(head) or not _jittable(x) or x.ndim != 2 or targets.shape != (x.shape[0],)
                or targets.dtype.kind not in "iu"):
            return super().cross_entropy_head(x, head, targets, chunk, ignore_index, need_dx, need_dhead,
                                              softcap=softcap)
        n = x.shape[0]
        n_vocab = head.shape[0]
        valid = targets != ignore_index  # (N,)
        n_valid = int(valid.sum())
        if n_valid and (targets[valid].min() < 0 or targets[valid].max() >= n_vocab):
            return super().cross_entropy_head(x, head, targets, chunk, ignore_index, need_dx, need_dhead,
                                              softcap=softcap)
        dx = np.zeros_like(x) if need_dx else None
        dhead = np.zeros(head.shape, dtype=x.dtype) if need_dhead else None
        if n_valid == 0:
            return 0.0, 0, dx, dhead
        need_grad = need_dx or need_dhead
        head = self.cast(head, x.dtype)  # once, not once per chunk
        chunk = max(1, min(int(chunk), n))
        logits = np.empty((chunk, n_vocab), dtype=x.dtype)  # the only (rows, V) array alive
        losses = np.empty(chunk, dtype=np.float64)
        dhead_chunk = np.empty(head.shape, dtype=x.dtype) if need_dhead else None
        weight = 1.0 / n_valid
        total = 0.0
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            ok = valid[c0:c1]
            if not ok.any():  # no loss, and a zero gradient: dx rows stay 0, dhead unchanged
                continue
            xc = x[c0:c1]
            z = logits[:c1 - c0]
            np.matmul(xc, head.T, out=z)  # BLAS: z = x_c head^T (c, V)
            if softcap is None:
                K.softmax_xent_rows(z, targets[c0:c1], ok, weight, need_grad, losses)
            else:  # logits cap tanh(z / cap); dz through the cap, in the same pass
                K.softcap_xent_rows(z, float(softcap), targets[c0:c1], ok, weight, need_grad, losses)
            total += float(losses[:c1 - c0].sum())
            if need_dx:
                np.matmul(z, head, out=dx[c0:c1])  # dx_c = dz head (c, d)
            if need_dhead:
                np.matmul(z.T, xc, out=dhead_chunk)  # dz^T x_c (V, d)
                dhead += dhead_chunk
        return total / n_valid, n_valid, dx, dhead

    def softcap(self, x, cap):
        _check_cap(cap)
        if not _jittable(x) or not x.flags.c_contiguous:
            return super().softcap(x, cap)
        y = np.empty(x.shape, dtype=x.dtype)
        K.softcap(x.reshape(-1), float(cap), y.reshape(-1))
        return y

    def decode_tile(self, part, rows, out):
        """GGUF blocks dequantised by the numba kernels (backends/quant_kernels.py), equal
        to gguf-py's bit for bit."""
        from .quant_kernels import decode_tile

        decode_tile(part, rows, out)

    def adamw_update(self, p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
        arrays = (p, g, m, v)
        if (not _jittable(p) or any(a.shape != p.shape or not a.flags.c_contiguous for a in arrays)
                or any(a.dtype not in _JIT_DTYPES for a in arrays) or not p.flags.writeable):
            return super().adamw_update(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                        weight_decay=weight_decay, step=step)
        K.adamw_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), float(lr),
                       float(beta1), float(beta2), float(eps), float(weight_decay),
                       1.0 - beta1 ** step, 1.0 - beta2 ** step)


_WARM_CHILD = ("from minilars.backends.numba_backend import warmup; "
               "from minilars.backends.quant_kernels import warmup as warmup_decoders; warmup(); warmup_decoders()")


def cache_marker(cache_dir: str | None = None) -> str:
    """The file that says numba's kernel cache in cache_dir (default: the one the kernels
    use, numba_kernels.CACHE_LOCATION) was filled by warm_cache_in_child,
    named by a hash of what decides the compiled code: the kernel sources, numba's and
    Python's versions and the machine."""
    import hashlib
    import platform
    import sys

    import numba

    from . import quant_kernels

    key = hashlib.sha256()
    for module in (K, quant_kernels, sys.modules[__name__]):
        with open(module.__file__, "rb") as f:
            key.update(f.read())
    key.update(f"{numba.__version__} {sys.version} {platform.machine()}".encode())
    return os.path.join(cache_dir or K.CACHE_LOCATION, f"minilars-warm-{key.hexdigest()[:16]}")


def warm_cache_in_child(cache_dir: str | None = None) -> bool:
    """On the first run of these kernels on this machine, compile them (warmup() and
    the GGUF decoders) in a child process, which fills numba's on-disk cache, then
    leave a marker (cache_marker). The caller then only loads kernels from the cache:
    compiled in the caller instead, LLVM's memory stays in its peak (measured with
    finetune, LARS at T = 1024, one thread, side by side from empty caches: 626.6 MiB
    compiling in-process, 440.9 MiB with this child; docs/memory.md). Processes that
    start together wait on one lock, so one of them compiles. Returns whether a child
    ran; one that fails is said on stderr and the kernels compile in the caller as
    before."""
    import subprocess
    import sys

    import numba

    from minilars.files import DirectoryLock, WriteError

    marker = cache_marker(cache_dir)
    if numba.config.DISABLE_JIT or os.path.exists(marker):  # nothing to compile, or already compiled
        return False
    lock = DirectoryLock(os.path.dirname(marker), wait=True)
    with contextlib.suppress(WriteError):  # a cache directory that cannot be written: compiled unlocked
        lock.acquire()  # processes started together (a study's --jobs) compile once
    try:
        if os.path.exists(marker):  # another process filled the cache while this one waited
            return False
        code = subprocess.run([sys.executable, "-c", _WARM_CHILD]).returncode
        if code != 0:
            print(f"minilars: filling numba's kernel cache in a child process failed (exit status {code}); "
                  "the kernels compile in this process instead", file=sys.stderr)
            return True
        try:
            with open(marker, "w") as f:
                f.write("filled by minilars.backends.numba_backend.warm_cache_in_child\n")
        except OSError:
            pass  # a cache that cannot be marked is warmed again next run: time, not memory
        return True
    finally:
        lock.release()  # a no-op when it was never acquired


def warmup(dtypes=("float32",)) -> float:
    """Compile (or load from the on-disk cache) every kernel for each dtype, with
    the array layouts model.py passes, on tiny inputs: q/k from RoPE (contiguous),
    v, gate and up as column slices of a fused projection, a decoding step, and
    the contiguous arrays backward gets from the activation store. Other layouts
    compile on first use, as do the GeGLU and soft-cap kernels (Gemma's), so that a
    LLaMA-family run never pays for them; a sliding window or a score scale runs
    the same attention kernels. Returns the seconds it took."""
    be = NumbaBackend()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for name in dtypes:
        dt = np.dtype(name)
        b, t, n_heads, n_kv, hd, d, f, vocab, tile = 1, 5, 4, 2, 4, 6, 3, 7, 2

        def randn(*shape):
            return rng.standard_normal(shape).astype(dt)

        x, w = randn(b * t, d), randn(d)
        y, rstd = be.rmsnorm_forward(x, w, 1e-5)
        be.rmsnorm_backward(y, x, w, rstd)
        qkv = randn(b * t, (n_heads + 2 * n_kv) * hd)  # fused projection, sliced as model.py does
        q = qkv[:, :n_heads * hd].reshape(b, t, n_heads, hd)
        k = qkv[:, n_heads * hd:(n_heads + n_kv) * hd].reshape(b, t, n_kv, hd)
        v = qkv[:, (n_heads + n_kv) * hd:].reshape(b, t, n_kv, hd)
        cos, sin = randn(t, hd), randn(t, hd)
        q, k = be.rope_forward(q, cos, sin), be.rope_forward(k, cos, sin)
        o, lse = be.attention_forward(q, k, v, tile)
        be.attention_forward(q[:, -1:], k, v.copy(), tile, q_offset=t - 1)  # decoding from a KV cache
        dq, _, _ = be.attention_backward(randn(b, t, n_heads, hd), q, k, v.copy(), o, lse, tile)
        be.rope_backward(dq, cos, sin)
        gate_up = randn(b * t, 2 * f)
        be.swiglu_backward_fused(be.swiglu_forward_fused(gate_up), gate_up)
        targets = np.array([1, -100, 3, 0, 6], dtype=np.int64)
        be.cross_entropy_head(x, randn(vocab, d), targets, 2, -100, True, True)
        be.embedding_backward(x, targets.clip(0), vocab)
        if dt == np.float32:  # the activation store's float16 copies (the kernels: small casts skip them)
            half = np.empty(x.size, dtype=np.uint16)
            K.single_to_half(x.reshape(-1).view(np.uint32), half)
            K.half_to_single(half, _HALF_TO_SINGLE, np.empty(x.size, dtype=np.uint32))
        for a, b in ((x, w[:, None]), (x.T, x), (x, x.T)):  # the thin products' layouts: C C, F C, C F
            K.dot_one_thread(a, b, np.empty((a.shape[0], b.shape[1]), dtype=dt))
        p = randn(3, 2)
        be.adamw_update(p, randn(3, 2), np.zeros_like(p), np.zeros_like(p), lr=1e-3, beta1=0.9,
                        beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    return time.perf_counter() - start
