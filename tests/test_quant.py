"""Quantised frozen weights (minilars/quant.py, backends/quant_kernels.py).

Per format, on random blocks (random bytes, with finite float16 scales written where
the format keeps them, so the K-quants' packed 6-bit scales take every bit pattern):
the numba kernel's dequantisation equals gguf-py's `dequantize` bit for bit; the
tiled products x S^T and dy S with kept blocks equal the products with the
dequantised float32 matrix to float32 rounding (bounded against float64); the
embedding gather returns the dequantised rows. Then the tiny model with quantised
weights against the same model with those weights dequantised.

Run it also as `NUMBA_DISABLE_JIT=1 pytest tests/test_quant.py`: the kernels then run
as plain Python (the shapes here are small enough for that).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize
from hypothesis import example, given, strategies as st

from minilars.quant import (QuantizedRows, QuantizedWeight, dequantize_rows_reference, matmul, matmul_nt,
                            quantize_weight)
from tolerances import assert_close

FORMATS = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Byte ranges of each block's float16 scales (ggml-common.h): d (and m / dmin), or Q6_K's trailing d.
SCALE_BYTES = {Q.Q8_0: (0, 2), Q.Q4_0: (0, 2), Q.Q4_1: (0, 4), Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (208, 210)}


def random_rows(qtype: Q, m: int, blocks_per_row: int, seed: int, scale: float = 0.05) -> QuantizedRows:
    """m rows of random blocks whose float16 scales are finite: normal, std `scale`."""
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (m, blocks_per_row, type_size), dtype=np.uint8)
    lo, hi = SCALE_BYTES[qtype]
    scales = (rng.standard_normal((m, blocks_per_row, (hi - lo) // 2)) * scale).astype(np.float16)
    data[:, :, lo:hi] = scales.view(np.uint8)
    return QuantizedRows(data.reshape(m, blocks_per_row * type_size), qtype, blocks_per_row * block)


def numba_decoder():
    pytest.importorskip("numba")
    from minilars.backends.quant_kernels import decode_tile

    return decode_tile


def torch_decoder():
    pytest.importorskip("torch")
    from minilars.backends import get_backend

    return get_backend("torch").decode_tile  # backends/quant_torch.py, on the CPU here


DECODERS = {"numpy": lambda: dequantize_rows_reference, "numba": numba_decoder, "torch": torch_decoder}


# ---------------------------------------------------------------- dequantisation
@pytest.mark.parametrize("decoder", ["numba", "torch"])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@given(m=st.integers(1, 5), blocks=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
@example(m=1, blocks=1, seed=0)
def test_kernel_dequantisation_equals_gguf(decoder, qtype, m, blocks, seed):
    """numba's kernels (backends/quant_kernels.py) and torch's (backends/quant_torch.py)."""
    decode = DECODERS[decoder]()
    part = random_rows(qtype, m, blocks, seed)
    reference = dequantize(part.data, qtype).reshape(m, part.n_cols)
    rows = np.random.default_rng(seed).permutation(m)  # any order, as a gather asks for them
    out = np.empty((m, part.n_cols), dtype=np.float32)
    decode(part, rows, out)
    assert out.dtype == np.float32 and out.shape == (m, part.n_cols)
    np.testing.assert_array_equal(out, reference[rows])


def test_random_blocks_cover_the_packed_scale_bits():
    """The K-quant tests above mean something only if the 12 packed scale bytes take
    high bits too (scales and mins 4-7 read the top 2 bits of bytes 0-7)."""
    part = random_rows(Q.Q4_K, 4, 3, seed=1)
    scale_bytes = part.data.reshape(4, 3, 144)[:, :, 4:16]
    assert (scale_bytes >> 6).max() == 3 and (scale_bytes & 0xF).max() == 15


# ---------------------------------------------------------------- the two frozen products
def within_float32_rounding(actual: np.ndarray, x: np.ndarray, w: np.ndarray, name: str):
    """|actual - x w| <= (k + 2) u (|x| |w|) + tiny, the float32 dot-product error bound
    (Higham, Thm 3.5) against the float64 product: k terms, unit roundoff u = 2^-24."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    exact = x64 @ w64
    bound = (x.shape[1] + 2) * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64)) + 1e-30
    assert actual.shape == exact.shape and actual.dtype == np.float32, name
    excess = np.abs(actual - exact) - bound
    assert np.all(excess <= 0), f"{name}: exceeds float32 rounding by {excess.max():.3g}"


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@given(n_rows=st.integers(1, 3), parts=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       blocks=st.integers(1, 2), tile_rows=st.integers(1, 5), transposed=st.booleans(), ordered=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(n_rows=1, parts=[1], blocks=1, tile_rows=1, transposed=True, ordered=False, seed=0)  # one block per row
def test_tiled_products_equal_the_dequantised_matrix(decoder, qtype, n_rows, parts, blocks, tile_rows,
                                                      transposed, ordered, seed):
    """x W and dy W^T with W kept as blocks, tiles of tile_rows stored rows (parts of
    7 rows with tiles of 2 or 5: tiles that do not divide the rows), parts mixing
    this format with Q8_0 as a Q4_K_M file mixes Q4_K with Q6_K; ordered: the rows
    are read in a permuted order (QuantizedRows.order, as q and k of a llama GGUF)."""
    import minilars.quant as quant

    decode = DECODERS[decoder]()
    rng = np.random.default_rng(seed)
    n = blocks * GGML_QUANT_SIZES[qtype][0]
    formats = [qtype if j % 2 == 0 else Q.Q8_0 for j in range(len(parts))]
    pieces = [random_rows(f, m, n // GGML_QUANT_SIZES[f][0], seed + j) for j, (f, m) in enumerate(zip(formats, parts))]
    if ordered:
        pieces = [QuantizedRows(p.data, p.qtype, p.n_cols, rng.permutation(p.n_rows)) for p in pieces]
    w = QuantizedWeight(pieces, transposed)
    s = np.concatenate([dequantize(p.data, p.qtype).reshape(p.n_rows, n)[p.order if ordered else slice(None)]
                        for p in pieces])  # S (m, n) float32, row i of a part its stored row order[i]
    dense = s.T if transposed else s  # the engine's W
    x = rng.standard_normal((n_rows, dense.shape[0])).astype(np.float32)
    dy = rng.standard_normal((n_rows, dense.shape[1])).astype(np.float32)
    tile = tile_rows * n
    if transposed:
        y = quant.times_stored_t(x, w, decode, tile)
        dx = quant.times_stored(dy, w, decode, tile)
    else:
        y = quant.times_stored(x, w, decode, tile)
        dx = quant.times_stored_t(dy, w, decode, tile)
    within_float32_rounding(y, x, dense, "x W")
    within_float32_rounding(dx, dy, dense.T, "dy W^T")
    assert_close(matmul(x, w, decode), x @ dense, name="matmul")
    assert_close(matmul_nt(dy, w, decode), dy @ dense.T, name="matmul_nt")


@pytest.mark.parametrize("decoder", DECODERS)
def test_gather_rows_is_the_embedding_lookup(decoder):
    decode = DECODERS[decoder]()
    first, second = random_rows(Q.Q4_1, 5, 2, 3), random_rows(Q.Q8_0, 4, 2, 5)
    order = np.array([3, 0, 4, 1, 2])
    table = QuantizedWeight([QuantizedRows(first.data, first.qtype, first.n_cols, order), second], transposed=False)
    dense = np.concatenate([dequantize(first.data, Q.Q4_1).reshape(5, 64)[order],
                            dequantize(second.data, Q.Q8_0).reshape(4, 64)])
    tokens = np.array([8, 0, 4, 5, 4, 8, 2])  # repeats, both parts, the last row
    np.testing.assert_array_equal(table.gather_rows(tokens, decode), dense[tokens])
    np.testing.assert_array_equal(table.dequantize(decode), dense)
    with pytest.raises(IndexError):
        table.gather_rows(np.array([9]), decode)


def test_weight_shapes_and_bytes():
    part = random_rows(Q.Q4_0, 6, 2, 0)  # S (6, 64): 6 rows of 2 blocks of 18 bytes
    w = QuantizedWeight([part], transposed=True)
    assert w.shape == (64, 6) and w.stored_shape == (6, 64) and w.nbytes == 6 * 2 * 18
    assert QuantizedWeight([part], transposed=False).shape == (6, 64)
    with pytest.raises(ValueError, match="bytes per row"):
        QuantizedRows(part.data[:, :20], Q.Q4_0, 64)
    with pytest.raises(ValueError, match="cannot be kept"):
        QuantizedRows(part.data, Q.IQ2_XXS, 64)
    with pytest.raises(ValueError, match="permutation"):
        QuantizedRows(part.data, Q.Q4_0, 64, np.array([0, 0, 1, 2, 3, 4]))


# ---------------------------------------------------------------- quantising at load
@pytest.mark.parametrize("fmt, levels, steps", [("q8_0", 127, 0.5), ("q4_0", 8, 1.0)])
def test_quantize_weight_round_trips_within_a_step(fmt, levels, steps):
    """gguf-py's q8_0 / q4_0 round x to the nearest multiple of d = max|block| / levels:
    error <= |d| / 2; q4_0 maps the largest magnitude to -8 d, so +8 d (the opposite
    sign) clips to 7 d: error <= |d| there. Plus levels times the float16 rounding of
    d (relative 2^-11)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 5)).astype(np.float32)  # engine W (d_in, d_out); stored rows W^T (5, 96)
    q = quantize_weight(w, fmt, transposed=True)
    assert isinstance(q, QuantizedWeight) and q.shape == w.shape
    back = q.dequantize()
    step = np.abs(w.T.reshape(5, 3, 32)).max(axis=-1, keepdims=True) / levels  # d per block
    err = np.abs(back.T - w.T).reshape(5, 3, 32)
    assert np.all(err <= step * (steps + levels * 2.0 ** -11) + 1e-7)
    assert q.nbytes < w.nbytes / (3 if fmt == "q8_0" else 6)


def test_quantize_weight_leaves_rows_that_do_not_split_into_blocks():
    w = np.ones((40, 3), dtype=np.float32)  # stored rows of 40 values: not a multiple of 32
    assert isinstance(quantize_weight(w, "q4_0", transposed=True), np.ndarray)
    with pytest.raises(ValueError, match="q4_0"):
        quantize_weight(w, "q3_k", transposed=True)


@pytest.mark.parametrize("backend_name", ["numpy", "numba", "torch"])
def test_a_head_kept_as_blocks_refuses_a_soft_cap_and_a_head_gradient(backend_name):
    """cross_entropy_head over a GGUF-block head: a soft cap, or a gradient for the table,
    is a ValueError that names the flag loading float weights (--weights float32)."""
    pytest.importorskip({"numpy": "numpy", "numba": "numba", "torch": "torch"}[backend_name])
    from minilars.backends import get_backend

    be = get_backend(backend_name)
    head = QuantizedWeight([random_rows(Q.Q8_0, 12, 1, seed=0)], transposed=False)  # (12, 32)
    x = be.asarray(np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32))
    targets = be.asarray(np.array([1, 2, -100]), "int64")
    with pytest.raises(ValueError, match="soft-capped.*--weights float32"):
        be.cross_entropy_head(x, head, targets, 128, -100, need_dx=True, need_dhead=False, softcap=30.0)
    with pytest.raises(ValueError, match="do not train"):
        be.cross_entropy_head(x, head, targets, 128, -100, need_dx=True, need_dhead=True)
