"""Numba kernels that dequantise GGUF blocks, a tile of rows at a time.

Each kernel decodes rows `rows` of a tensor's blocks data (m, row_bytes) uint8 into
out (len(rows), n) float32, the rows spread over threads. The arithmetic is
gguf-py's (gguf/quants.py), operation for operation in float32, so a tile equals
`gguf.quants.dequantize` bit for bit (tests/test_quant.py). Block layouts, from
llama.cpp's ggml-common.h (all little-endian, scales float16):

    Q8_0  34 B / 32 values:  d, qs[32] int8                     x = d q
    Q4_0  18 B / 32 values:  d, qs[16]                          x_j = d (lo(qs_j) - 8), x_{j+16} = d (hi(qs_j) - 8)
    Q4_1  20 B / 32 values:  d, m, qs[16]                       x = d q + m (q as Q4_0, no -8)
    Q4_K 144 B / 256 values: d, dmin, scales[12], qs[128]       8 sub-blocks of 32, each with a 6-bit
                             scale sc and min mn:  x = (d sc) q - (dmin mn); sub-block 2c reads the low
                             nibbles of qs[32c:32c+32], 2c+1 the high ones
    Q5_K 176 B / 256 values: d, dmin, scales[12], qh[32], qs[128]  as Q4_K, q's 5th bit of sub-block g
                             is bit g of qh[l]
    Q6_K 210 B / 256 values: ql[128], qh[64], scales[16] int8, d   16 groups of 16, x = (d sc) (q - 32);
                             q = 4 low bits from ql, 2 high bits from qh (see _q6_k_row)

The K-quants' 6-bit scales and mins are packed 8 + 8 into 12 bytes (`_scale_min_k4`).
The matmul around a tile (BLAS) is in minilars/quant.py.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit, prange

from ..quant import dequantize_rows_reference
from .numba_backend import half_to_single_table

# float32 value of each float16 bit pattern, built from the bits (exact, and no
# invalid-cast warning on ARM, where NumPy's cast flags the NaN patterns): 256 KiB
HALF_TO_FLOAT = half_to_single_table().view(np.float32)


@njit(inline="always")
def _half(row, at, table):
    """The float16 at bytes row[at], row[at+1] (little-endian), as float32."""
    return table[np.int64(row[at]) | (np.int64(row[at + 1]) << 8)]


@njit(inline="always")
def _scale_min_k4(scales, base, j):
    """Sub-block j's 6-bit (scale, min) from the 12 packed bytes at scales[base:]
    (ggml-quants.c get_scale_min_k4): bytes 0-3 hold scales 0-3 in their low 6 bits,
    bytes 4-7 mins 0-3; scales and mins 4-7 take their low 4 bits from bytes 8-11
    and their top 2 bits from the top 2 bits of bytes 0-3 (scales) and 4-7 (mins)."""
    if j < 4:
        return scales[base + j] & 63, scales[base + j + 4] & 63
    sc = (scales[base + j + 4] & 0xF) | ((scales[base + j - 4] >> 6) << 4)
    mn = (scales[base + j + 4] >> 4) | ((scales[base + j] >> 6) << 4)
    return sc, mn


@njit(parallel=True, cache=True)
def dequantize_q8_0(data, rows, out, table):
    for i in prange(rows.size):
        row = data[rows[i]]
        for b in range(out.shape[1] // 32):
            o = b * 34
            d = _half(row, o, table)
            for j in range(32):
                q = row[o + 2 + j]
                out[i, b * 32 + j] = np.float32(np.int8(q)) * d


@njit(parallel=True, cache=True)
def dequantize_q4_0(data, rows, out, table):
    for i in prange(rows.size):
        row = data[rows[i]]
        for b in range(out.shape[1] // 32):
            o = b * 18
            d = _half(row, o, table)
            for j in range(16):
                q = row[o + 2 + j]
                out[i, b * 32 + j] = d * np.float32(np.int32(q & 0xF) - 8)
                out[i, b * 32 + j + 16] = d * np.float32(np.int32(q >> 4) - 8)


@njit(parallel=True, cache=True)
def dequantize_q4_1(data, rows, out, table):
    for i in prange(rows.size):
        row = data[rows[i]]
        for b in range(out.shape[1] // 32):
            o = b * 20
            d = _half(row, o, table)
            m = _half(row, o + 2, table)
            for j in range(16):
                q = row[o + 4 + j]
                out[i, b * 32 + j] = d * np.float32(q & 0xF) + m
                out[i, b * 32 + j + 16] = d * np.float32(q >> 4) + m


@njit(parallel=True, cache=True)
def dequantize_q4_k(data, rows, out, table):
    for i in prange(rows.size):
        row = data[rows[i]]
        for b in range(out.shape[1] // 256):
            o = b * 144
            d = _half(row, o, table)
            dmin = _half(row, o + 2, table)
            for g in range(8):  # sub-block of 32 values
                sc, mn = _scale_min_k4(row, o + 4, g)
                scale = d * np.float32(sc)
                shift = dmin * np.float32(mn)
                qs = o + 16 + 32 * (g // 2)
                bits = 4 * (g % 2)
                for l in range(32):
                    q = (row[qs + l] >> bits) & 0xF
                    out[i, b * 256 + g * 32 + l] = scale * np.float32(q) - shift


@njit(parallel=True, cache=True)
def dequantize_q5_k(data, rows, out, table):
    for i in prange(rows.size):
        row = data[rows[i]]
        for b in range(out.shape[1] // 256):
            o = b * 176
            d = _half(row, o, table)
            dmin = _half(row, o + 2, table)
            for g in range(8):
                sc, mn = _scale_min_k4(row, o + 4, g)
                scale = d * np.float32(sc)
                shift = dmin * np.float32(mn)
                qs = o + 48 + 32 * (g // 2)
                bits = 4 * (g % 2)
                for l in range(32):
                    q = ((row[qs + l] >> bits) & 0xF) | (((row[o + 16 + l] >> g) & 1) << 4)
                    out[i, b * 256 + g * 32 + l] = scale * np.float32(q) - shift


@njit(parallel=True, cache=True)
def dequantize_q6_k(data, rows, out, table):
    """Each half h of 128 values: value 32 k + l (k < 4, l < 32) takes its low 4 bits
    from ql[64 h + 32 (k % 2) + l] (low nibble for k < 2, high for k >= 2) and its
    high 2 bits from qh[32 h + l] >> 2 k; its scale is scales[(128 h + 32 k + l) // 16]."""
    for i in prange(rows.size):
        row = data[rows[i]]
        for b in range(out.shape[1] // 256):
            o = b * 210
            d = _half(row, o + 208, table)
            for h in range(2):
                for k in range(4):
                    for l in range(32):
                        low = (row[o + 64 * h + 32 * (k % 2) + l] >> (4 * (k // 2))) & 0xF
                        high = (row[o + 128 + 32 * h + l] >> (2 * k)) & 3
                        q = np.int32(low | (high << 4)) - 32
                        v = 128 * h + 32 * k + l
                        scale = d * np.float32(np.int8(row[o + 192 + v // 16]))
                        out[i, b * 256 + v] = scale * np.float32(q)


def decode_tile(part, rows, out) -> None:
    """out[i] = stored row rows[i] of `part` (a minilars.quant.QuantizedRows) in float32,
    by the kernel for its format; F32 and F16 rows are plain casts (NumPy's)."""
    kernel = _KERNELS.get(part.qtype)
    if kernel is None:
        return dequantize_rows_reference(part, rows, out)
    kernel(part.data, np.asarray(rows, dtype=np.int64), out, HALF_TO_FLOAT)


_KERNELS = {Q.Q8_0: dequantize_q8_0, Q.Q4_0: dequantize_q4_0, Q.Q4_1: dequantize_q4_1,
            Q.Q4_K: dequantize_q4_k, Q.Q5_K: dequantize_q5_k, Q.Q6_K: dequantize_q6_k}


def warmup() -> None:
    """Compile (or load from numba's on-disk cache) every decoder for the layouts the
    engine passes: blocks read-only (a view of the file's memory map) and writable
    (quantised at load, or tests), rows int64, out float32. `minilars bench memory`
    runs this in its cache-warming process, so no measured run pays LLVM's compile
    memory."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES

    rows = np.zeros(1, dtype=np.int64)
    for qtype, kernel in _KERNELS.items():
        block, type_size = GGML_QUANT_SIZES[qtype]
        data = np.zeros((1, type_size), dtype=np.uint8)
        out = np.empty((1, block), dtype=np.float32)
        kernel(data, rows, out, HALF_TO_FLOAT)
        data.flags.writeable = False
        kernel(data, rows, out, HALF_TO_FLOAT)
