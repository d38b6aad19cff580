"""The numba backend against the NumPy reference, kernel by kernel, then the tiny model.

Every jitted kernel of NumbaBackend runs on Hypothesis shapes chosen to break tiled
and threaded code (T = 1, T not a multiple of the tile, one head, kv-group ratios
1/3/9, head dims 2..64, decoding with q_offset > 0 and Tq < Tk, loss chunks that do
not divide N, ignored and all-ignored rows), in float32 and float64, on the array
layouts the model passes (column slices of a fused projection, a KV-cache prefix),
and is compared with NumpyBackend's result through the one tolerance table.

Run it also as `NUMBA_DISABLE_JIT=1 pytest tests/test_backend_numba.py`: the same
kernels then execute as plain Python, which keeps what they say honest.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba: pip install numba")
pytest.importorskip("scipy", reason="the numba backend needs scipy: numba's np.dot calls its BLAS")

from hypothesis import example, given, strategies as st  # noqa: E402

from minilars.backends import get_backend  # noqa: E402
from minilars.backends.numba_backend import NumbaBackend, warmup  # noqa: E402
from minilars.methods import MethodConfig, apply_method  # noqa: E402
from minilars.model import Model  # noqa: E402
from minilars.ops import rope_tables  # noqa: E402
from minilars.optim import AdamW, AdamWConfig  # noqa: E402
from backend_pairs import (CFG, DTYPES, SEEDS, batch, check_cross_entropy_head, check_kv_cache_decoding,  # noqa: E402
                           check_rmsnorm, normal)
from tolerances import assert_close  # noqa: E402

NP = get_backend("numpy")
NB = get_backend("numba")


def both(kernel: str, *args, **kwargs):
    """Run one kernel on both backends, each on its own copies of the array inputs
    (AdamW updates in place); returns (numba's result, numpy's)."""
    def copies():
        return [a.copy() if isinstance(a, np.ndarray) and a.flags.owndata else a for a in args]
    return getattr(NB, kernel)(*copies(), **kwargs), getattr(NP, kernel)(*copies(), **kwargs)


def check(actual, reference, name: str) -> None:
    """None where the reference is None; else a numpy array of the same dtype whose
    values are within the dtype's tolerance (assert_close checks the shape first)."""
    if reference is None:
        assert actual is None, f"{name}: expected None"
        return
    assert isinstance(actual, np.ndarray), f"{name}: {type(actual)} is not a numpy array"
    assert actual.dtype == reference.dtype, f"{name}: dtype {actual.dtype} != {reference.dtype}"
    assert_close(actual, reference, name=name)


def fused_columns(rng, n, widths, dtype, scale=1.0):
    """Column blocks of one (n, sum(widths)) array, as the model slices its fused
    q|k|v and gate|up projections: views that are not contiguous."""
    whole = normal(rng, (n, sum(widths)), dtype, scale)
    bounds = np.cumsum([0, *widths])
    return [whole[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------- attention
ATTENTION = dict(b=st.integers(1, 2), t=st.integers(1, 20), n_kv=st.integers(1, 2), group=st.sampled_from([1, 3, 9]),
                 hd=st.integers(2, 64), tile=st.integers(1, 9), fused=st.booleans(), dtype=DTYPES, seed=SEEDS)


def attention_inputs(rng, b, tq, tk, n_kv, group, hd, dtype, fused):
    """q (B, Tq, H, hd), k/v (B, Tk, Hkv, hd); fused: slices of one projection output
    (Tq = Tk) or, when Tq < Tk, k/v the prefix of a longer KV cache."""
    n_heads = n_kv * group
    if not fused:
        return (normal(rng, (b, tq, n_heads, hd), dtype), normal(rng, (b, tk, n_kv, hd), dtype),
                normal(rng, (b, tk, n_kv, hd), dtype))
    if tq == tk:
        q, k, v = fused_columns(rng, b * tq, [n_heads * hd, n_kv * hd, n_kv * hd], dtype)
        return q.reshape(b, tq, n_heads, hd), k.reshape(b, tk, n_kv, hd), v.reshape(b, tk, n_kv, hd)
    cache = normal(rng, (2, b, tk + 3, n_kv, hd), dtype)  # room for 3 more tokens
    return normal(rng, (b, tq, n_heads, hd), dtype), cache[0, :, :tk], cache[1, :, :tk]


@given(q_offset=st.integers(0, 10), future=st.integers(0, 3), **ATTENTION)
@example(q_offset=0, future=0, b=1, t=1, n_kv=1, group=1, hd=2, tile=2, fused=False, dtype="float64", seed=0)
@example(q_offset=0, future=0, b=1, t=19, n_kv=1, group=9, hd=64, tile=4, fused=True, dtype="float32", seed=1)
@example(q_offset=9, future=0, b=2, t=1, n_kv=2, group=3, hd=8, tile=4, fused=True, dtype="float32", seed=2)
def test_attention_forward(q_offset, future, b, t, n_kv, group, hd, tile, fused, dtype, seed):
    """Query i sits at position q_offset + i of Tk = q_offset + Tq + future keys;
    keys past a query's position are masked (future > 0 checks the mask, not only
    the key count)."""
    tk = q_offset + t + future
    q, k, v = attention_inputs(np.random.default_rng(seed), b, t, tk, n_kv, group, hd, dtype,
                               fused and future == 0)
    (o, lse), (o_ref, lse_ref) = both("attention_forward", q, k, v, tile, q_offset=q_offset)
    check(o, o_ref, "o")
    check(lse, lse_ref, "lse")


@given(**ATTENTION)
@example(b=1, t=1, n_kv=1, group=1, hd=2, tile=2, fused=False, dtype="float64", seed=0)
@example(b=1, t=19, n_kv=1, group=9, hd=64, tile=4, fused=True, dtype="float32", seed=1)
@example(b=2, t=10, n_kv=2, group=3, hd=5, tile=3, fused=False, dtype="float64", seed=2)
def test_attention_backward(b, t, n_kv, group, hd, tile, fused, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v = attention_inputs(rng, b, t, t, n_kv, group, hd, dtype, fused)
    o, lse = NP.attention_forward(q, k, v, tile)
    do = normal(rng, o.shape, dtype)  # a random upstream gradient
    grads, refs = both("attention_backward", do, q, k, v, o, lse, tile)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, refs):
        check(g, ref, name)


def test_attention_tile_larger_than_sequence_and_empty_batch():
    rng = np.random.default_rng(0)
    q, k, v = attention_inputs(rng, 1, 3, 3, 1, 3, 4, "float32", False)
    (o, lse), (o_ref, lse_ref) = both("attention_forward", q, k, v, 128)
    check(o, o_ref, "o, tile > T")
    check(lse, lse_ref, "lse, tile > T")
    (o, lse), (o_ref, lse_ref) = both("attention_forward", q[:0], k[:0], v[:0], 4)
    assert o.shape == o_ref.shape == (0, 3, 3, 4) and lse.shape == lse_ref.shape == (0, 3, 3)


# ---------------------------------------------------------------- row kernels
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (-1.0, 0.25)])
def test_vectorised_exp_matches_numpy_with_overflow_underflow_and_nan(dtype, scale, shift):
    """The polynomial exp behind attention, swiglu and the loss, in place, as the
    kernels call it (exp(scale * x - shift)), across both ends of the float range."""
    from minilars.backends.numba_kernels import _EXP_BLOCK, _exp_inplace

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-800, 800, 700), rng.uniform(-3, 3, 700),
                        [0.0, -0.0, np.inf, -np.inf, np.nan, 88.5, -87.5, 88.8, 709.5, -745.0]]).astype(dtype)
    got = x.copy()
    _exp_inplace(got, got.size, scale, shift, np.empty(_EXP_BLOCK, np.int64))
    with np.errstate(over="ignore", invalid="ignore"):
        ref = np.exp(scale * x - x.dtype.type(shift))
    assert got.dtype == ref.dtype
    assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.array_equal(np.isposinf(got), np.isposinf(ref))
    finite = np.isfinite(ref)
    assert_close(got[finite], ref[finite], name="exp")


@given(n=st.integers(1, 140), d=st.integers(1, 48), dtype=DTYPES, seed=SEEDS)
@example(n=129, d=7, dtype="float32", seed=0)  # dw summed over three row blocks of 64
def test_rmsnorm(n, d, dtype, seed):
    check_rmsnorm(both, check, n, d, dtype, seed)


@given(b=st.integers(1, 2), t=st.integers(1, 12), heads=st.integers(1, 4), half=st.integers(1, 32),
       fused=st.booleans(), tables=st.sampled_from(["float64", "same"]), dtype=DTYPES, seed=SEEDS)
def test_rope(b, t, heads, half, fused, tables, dtype, seed):
    rng = np.random.default_rng(seed)
    hd = 2 * half
    cos, sin = rope_tables(t, hd, 10000.0, np.float64 if tables == "float64" else dtype)
    if fused:  # the q columns of a fused q|k|v output
        x = fused_columns(rng, b * t, [heads * hd, hd], dtype)[0].reshape(b, t, heads, hd)
    else:
        x = normal(rng, (b, t, heads, hd), dtype)
    check(*both("rope_forward", x, cos, sin), "rope")
    check(*both("rope_backward", x, cos, sin), "rope backward")


@given(n=st.integers(1, 20), f=st.integers(1, 40), scale=st.sampled_from([1.0, 4.0, 60.0]), fused=st.booleans(),
       dtype=DTYPES, seed=SEEDS)
def test_swiglu(n, f, scale, fused, dtype, seed):
    """scale 60 sends exp(-g) past float32's range: silu(g) must still be g*0 or g*1."""
    rng = np.random.default_rng(seed)
    if fused:  # the gate and up halves of one (N, 2f) projection output, as the model has them
        g, u = fused_columns(rng, n, [f, f], dtype)
        g *= scale
    else:
        g, u = normal(rng, (n, f), dtype, scale), normal(rng, (n, f), dtype)
    dh = normal(rng, (n, f), dtype)
    with np.errstate(over="ignore"):
        check(*both("swiglu_forward", g, u), "h")
        (dg, du), (dg_ref, du_ref) = both("swiglu_backward", dh, g, u)
        check(dg, dg_ref, "dg")
        check(du, du_ref, "du")
        gate_up = np.concatenate([g, u], axis=1)  # what ops.swiglu_forward/backward pass: [g | u] whole
        check(*both("swiglu_forward_fused", gate_up), "h from [g | u]")
        check(*both("swiglu_backward_fused", dh, gate_up), "[dg | du]")


# ---------------------------------------------------------------- loss, embedding, optimizer
@given(n=st.integers(1, 30), d=st.integers(1, 8), vocab=st.integers(2, 40), chunk=st.integers(1, 33),
       ignored=st.sampled_from([0.0, 0.3, 0.8, 1.0]), need_dx=st.booleans(), need_dhead=st.booleans(),
       half_head=st.booleans(), dtype=DTYPES, seed=SEEDS)
@example(n=7, d=3, vocab=5, chunk=3, ignored=0.3, need_dx=True, need_dhead=True, half_head=False, dtype="float64",
         seed=0)
@example(n=6, d=2, vocab=3, chunk=4, ignored=1.0, need_dx=True, need_dhead=True, half_head=False, dtype="float32",
         seed=0)
def test_cross_entropy_head(n, d, vocab, chunk, ignored, need_dx, need_dhead, half_head, dtype, seed):
    """ignored 0.8 leaves whole chunks without a label; 1.0 leaves none at all.
    half_head: a float16 frozen head, upcast by the kernel."""
    rng = np.random.default_rng(seed)
    x = normal(rng, (n, d), dtype, 2.0)
    head = normal(rng, (vocab, d), np.float16 if half_head else dtype)
    targets = np.where(rng.random(n) < ignored, -100, rng.integers(0, vocab, n))
    check_cross_entropy_head(both, check, x, head, targets, chunk, need_dx, need_dhead, dtype)


@given(vocab=st.integers(1, 12), n=st.integers(1, 30), d=st.integers(1, 70), dtype=DTYPES, seed=SEEDS)
def test_embedding_backward(vocab, n, d, dtype, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n)  # repeats are likely: backward must accumulate them
    check(*both("embedding_backward", normal(rng, (n, d), dtype), tokens, vocab), "dtable")


@given(shape=st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4)]), weight_decay=st.sampled_from([0.0, 0.1]), dtype=DTYPES,
       seed=SEEDS)
def test_adamw_update(shape, weight_decay, dtype, seed):
    rng = np.random.default_rng(seed)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
    p, m, v = normal(rng, shape, dtype), np.zeros(shape, dtype), np.zeros(shape, dtype)
    p_ref, m_ref, v_ref = p.copy(), m.copy(), v.copy()
    for step in range(1, 4):
        g = normal(rng, shape, dtype)
        assert NB.adamw_update(p, g, m, v, step=step, **hyper) is None  # in place
        NP.adamw_update(p_ref, g, m_ref, v_ref, step=step, **hyper)
    check(p, p_ref, "p")
    check(m, m_ref, "m")
    check(v, v_ref, "v")


def test_inputs_the_kernels_do_not_take_fall_back_to_numpy():
    """float16 and mixed dtypes go to the reference, so results are identical."""
    rng = np.random.default_rng(0)
    q, k, v = attention_inputs(rng, 1, 5, 5, 1, 3, 4, "float16", False)
    for got, ref in zip(*both("attention_forward", q, k, v, 2)):
        np.testing.assert_array_equal(got, ref)
    g, u = normal(rng, (3, 4), np.float32), normal(rng, (3, 4), np.float64)
    np.testing.assert_array_equal(*both("swiglu_forward", g, u))
    x = normal(rng, (4, 3), np.float16)
    np.testing.assert_array_equal(*both("embedding_backward", x, np.array([0, 2, 2, -1]), 3))  # numpy wraps -1


# ---------------------------------------------------------------- float16 casts
def float16_edge_cases() -> np.ndarray:
    """float32 values on every branch and rounding boundary of float32 -> float16,
    each with both signs: zeros and float32 subnormals; around 2^-25, where a
    float16 subnormal's rounding starts (a tie there goes to 0, above it to 2^-24);
    ties between subnormals onto even and odd last bits; the top of the subnormal
    range, which rounds into 2^-14; ties in the normal range; 65504 (the largest
    float16), 65520 (the tie that rounds to inf), 65536 (past the exponent range);
    inf and NaNs, with payload only in the low bits (must stay NaN) and signalling."""
    s = 2.0 ** -24  # the smallest float16 subnormal
    values = [0.0, 1e-45, 1e-40, 2.0 ** -26, 2.0 ** -25, s, 1.5 * s, 2.5 * s, 3.5 * s, 1023.5 * s,
              2.0 ** -14 - s, 2.0 ** -14 - s / 2, 2.0 ** -14, 1.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
              1 + 2.0 ** -12, 2048 + 1, 2048 + 3, 65504.0, 65519.0, 65520.0, 65535.99, 65536.0, 1e10]
    x = np.array(values, dtype=np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(0.0))])
    bits = np.array([0x7F800000, 0x7F800001, 0x7F801FFF, 0x7FA00000, 0x7FC00000, 0x7FFFFFFF], dtype=np.uint32)
    x = np.concatenate([x, bits.view(np.float32)])
    return np.concatenate([x, -x])


def kernel_cast(x, dtype):
    """NB.cast with the jitted kernels whatever the size (small casts go to NumPy)."""
    from minilars.backends import numba_backend

    saved, numba_backend._CAST_MIN_ELEMENTS = numba_backend._CAST_MIN_ELEMENTS, 0
    try:
        return NB.cast(x, dtype)
    finally:
        numba_backend._CAST_MIN_ELEMENTS = saved


def assert_same_half_bits(got, x):
    """got == x.astype(float16) bit for bit, but that NaN payloads may differ (NaN stays NaN)."""
    with np.errstate(over="ignore", invalid="ignore"):  # ARM's cast flags NaN inputs as invalid
        ref = x.astype(np.float16)
    assert got.dtype == np.float16 and got.shape == ref.shape
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan), "a NaN lost, or one made"
    g, r = got[~nan].view(np.uint16), ref[~nan].view(np.uint16)
    wrong = np.flatnonzero(g != r)
    assert wrong.size == 0, [(float(x[~nan][i]), hex(int(g[i])), hex(int(r[i]))) for i in wrong[:5]]


def test_float16_casts_match_numpy_on_every_rounding_boundary():
    x = float16_edge_cases()
    assert_same_half_bits(kernel_cast(x, np.float16), x)


def test_float16_casts_match_numpy_across_the_float32_bit_patterns():
    """A stride through all 2^32 float32 bit patterns (65,551 of them, every exponent
    and significand region), and back: every float16 pattern to float32, exactly."""
    x = np.arange(12345, 2 ** 32, 65521, dtype=np.uint64).astype(np.uint32).view(np.float32)
    assert_same_half_bits(kernel_cast(x, np.float16), x)
    every_half = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got, ref = kernel_cast(every_half, np.float32), every_half.astype(np.float32)
    assert got.dtype == np.float32
    nan = np.isnan(ref)  # NumPy's NaN payloads differ by CPU (see the test below)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


# float16 -> float32 bits by class, written out by hand: (float16 bits, float32 bits)
WIDENED_BY_HAND = [
    (0x0000, 0x00000000), (0x8000, 0x80000000),  # signed zeros
    (0x0001, 0x33800000), (0x8001, 0xB3800000),  # smallest subnormal, 2^-24
    (0x0003, 0x34400000), (0x0200, 0x38000000),  # 3 * 2^-24; 2^-15
    (0x03FF, 0x387FC000),  # largest subnormal, 1023 * 2^-24
    (0x0400, 0x38800000), (0x3C00, 0x3F800000), (0xC000, 0xC0000000),  # 2^-14, 1, -2
    (0x7BFF, 0x477FE000),  # 65504, the largest float16
    (0x7C00, 0x7F800000), (0xFC00, 0xFF800000),  # infinities
    (0x7C01, 0x7F802000), (0x7D00, 0x7FA00000),  # signalling NaNs: payload kept, not quieted
    (0x7E00, 0x7FC00000), (0xFE01, 0xFFC02000), (0x7FFF, 0x7FFFE000),  # quiet NaNs with payloads
]


def widened_bits(h: int) -> int:
    """The float32 bits of float16 pattern h by the IEEE 754 widening, worked out
    apart from the code under test: for numbers, CPython's own binary16 decoding and
    binary32 encoding (struct 'e' and 'f'; exact, every float16 is a float32); for
    NaN, the sign, an all-ones exponent and the 10 payload bits on top of the 23
    (what NumPy's cast gives on x86; Python floats do not keep NaN payloads)."""
    import struct

    if h & 0x7C00 == 0x7C00 and h & 0x3FF:
        return (h & 0x8000) << 16 | 0x7F800000 | (h & 0x3FF) << 13
    return struct.unpack("<I", struct.pack("<f", struct.unpack("<e", struct.pack("<H", h))[0]))[0]


def test_float16_to_float32_reads_the_same_bits_on_every_cpu_with_no_warning():
    """The table behind the numba backend's float16 -> float32 cast, and the cast on
    every path (kernel, small array, strided view), against the widening worked
    out above, all 65536 patterns, NaN payloads included; no warning on the way
    (NumPy's cast raises "invalid value encountered in cast" on ARM for them)."""
    import warnings

    from minilars.backends.numba_backend import half_to_single_table

    assert [widened_bits(h) for h, _ in WIDENED_BY_HAND] == [f for _, f in WIDENED_BY_HAND]
    expected = np.array([widened_bits(h) for h in range(1 << 16)], dtype=np.uint32)
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = half_to_single_table()
        casts = {"kernel": kernel_cast(every_half, np.float32), "whole": NB.cast(every_half, np.float32),
                 "small": np.concatenate([NB.cast(part, np.float32) for part in np.split(every_half, 64)]),
                 "strided": NB.cast(every_half.reshape(256, 256).T, np.float32).T.reshape(-1)}
    assert table.dtype == np.uint32
    wrong = np.flatnonzero(table != expected)
    assert wrong.size == 0, [(hex(h), hex(int(table[h])), hex(int(expected[h]))) for h in wrong[:5]]
    for path, got in casts.items():
        assert got.dtype == np.float32, path
        assert np.array_equal(got.view(np.uint32), expected), path


@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=3), scale=st.sampled_from([1e-6, 1.0, 3e4]),
       seed=SEEDS)
def test_float16_round_trip_matches_numpy(shape, scale, seed):
    """Random arrays of any shape (empty and 0-d too) there and back, as the
    activation store keeps and loads them; layouts the kernels do not take (a
    transposed view) fall back to NumPy with the same result."""
    x = normal(np.random.default_rng(seed), tuple(shape), np.float32, scale)
    half = kernel_cast(x, np.float16)
    assert_same_half_bits(half, x)
    np.testing.assert_array_equal(kernel_cast(half, np.float32), half.astype(np.float32))
    if x.ndim == 2:
        assert_same_half_bits(kernel_cast(x.T, np.float16), x.T)


# ---------------------------------------------------------------- the whole model


def model_pair(dtype=np.float64):
    """The same tiny model, fully trainable, on numpy and on numba."""
    reference = Model.random(CFG, 0, dtype=dtype, backend="numpy", attention_tile=4, loss_chunk=5)
    params = {name: p.copy() for name, p in reference.params.items()}
    model = Model(CFG, params, backend="numba", compute_dtype=np.dtype(dtype).name, attention_tile=4, loss_chunk=5)
    for m in (reference, model):
        apply_method(m, MethodConfig("full"))
    return model, reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whole_model_loss_gradients_and_steps_match_numpy(dtype):
    model, reference = model_pair(dtype)
    config = AdamWConfig(lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)
    opt, opt_ref = AdamW(model.trainable(), model.be, config), AdamW(reference.trainable(), reference.be, config)
    for step in range(2):
        tokens, targets = batch(seed=10 + step)
        tape, tape_ref = model.forward(tokens, targets), reference.forward(tokens, targets)
        assert_close(np.float64(tape.loss), np.float64(tape_ref.loss), dtype=np.dtype(dtype).name,
                     name=f"loss at step {step}")
        grads, grads_ref = model.backward(tape, dloss=0.7), reference.backward(tape_ref, dloss=0.7)
        assert sorted(grads) == sorted(grads_ref)
        for name, g in grads_ref.items():
            check(grads[name], g, f"{name} at step {step}")
        opt.step(grads)
        opt_ref.step(grads_ref)
    for name, p in reference.trainable().items():
        check(model.trainable()[name], p, name)


def test_kv_cache_decoding_matches_numpy():
    check_kv_cache_decoding(check, *model_pair())


# ---------------------------------------------------------------- packaging
def test_warmup_compiles_every_kernel_and_reports_seconds():
    seconds = warmup(("float64",))
    assert isinstance(seconds, float) and seconds >= 0.0
    assert isinstance(NB, NumbaBackend) and NB.name == "numba"


@pytest.mark.skipif(__import__("os").environ.get("NUMBA_DISABLE_JIT") == "1", reason="no compiled signatures")
def test_warmup_covers_what_the_model_compiles():
    """After warmup, a float32 training step and a decoding step of the tiny model
    compile nothing more (in a fresh process, so earlier tests' signatures do not count)."""
    code = """
import numba, numpy as np
from minilars.backends import numba_kernels as K
from minilars.backends.numba_backend import warmup
from minilars.config import preset
from minilars.methods import MethodConfig, apply_method
from minilars.model import Model
from minilars.optim import AdamW

def signatures():
    return {n: len(f.signatures) for n, f in vars(K).items() if isinstance(f, numba.core.registry.CPUDispatcher)}

warmup(("float32",))
before = signatures()
model = apply_method(Model.random(preset("tiny"), 0, backend="numba", attention_tile=4, loss_chunk=5), MethodConfig("full"))
tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 9))
AdamW(model.trainable(), model.be).step(model.backward(model.forward(tokens, tokens)))
kv = model.new_kv_cache(batch=1, max_len=12)
model.logits(tokens[:1, :6], kv)
model.logits(tokens[:1, 6:7], kv, last_only=True)
after = signatures()
assert after == before, {n: (before[n], after[n]) for n in after if after[n] != before[n]}
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_cache_goes_to_the_user_cache_when_the_package_is_read_only(tmp_path, monkeypatch):
    """NUMBA_CACHE_DIR wins; else beside the source when writable (numba's default);
    else the user's cache, $MINILARS_CACHE or $XDG_CACHE_HOME/minilars, + /numba."""
    from minilars.backends.numba_kernels import kernel_cache_dir

    source = tmp_path / "site-packages" / "backends"
    source.mkdir(parents=True)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.delenv("MINILARS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_cache_dir(str(source)) is None
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as for a user who may not write there
    assert kernel_cache_dir(str(source)) == str(tmp_path / "xdg" / "minilars" / "numba")
    monkeypatch.setenv("MINILARS_CACHE", str(tmp_path / "mine"))
    assert kernel_cache_dir(str(source)) == str(tmp_path / "mine" / "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba-own"))
    assert kernel_cache_dir(str(source)) == str(tmp_path / "numba-own")


@pytest.mark.skipif(__import__("os").environ.get("NUMBA_DISABLE_JIT") == "1", reason="nothing compiled")
def test_a_read_only_package_compiles_into_the_user_cache(tmp_path):
    """In a fresh process where the package directory may not be written, a kernel's
    machine code lands under $MINILARS_CACHE/numba, and numba was told before it
    compiled anything."""
    code = f"""
import os
real_access = os.access
os.access = lambda path, mode: False if "backends" in str(path) else real_access(path, mode)
import numpy as np
from minilars.backends import numba_kernels as K
os.access = real_access
import numba
assert K.CACHE_DIR == numba.config.CACHE_DIR == os.environ["NUMBA_CACHE_DIR"] == {str(tmp_path / "numba")!r}
x = np.ones((1, 2, 4, 3), np.float32)
out = np.empty((1, 2, 2, 3), np.float32)
K.reduce_kv_heads(x, out)
assert (out == 2).all()
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_CACHE_DIR"}
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "MINILARS_CACHE": str(tmp_path)})
    cached = [p.name for p in (tmp_path / "numba").rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert any(name.startswith("numba_kernels.reduce_kv_heads") for name in cached), cached


@pytest.mark.skipif(__import__("os").environ.get("NUMBA_DISABLE_JIT") == "1", reason="no threads without the JIT")
def test_kernels_run_threaded_without_openmp_and_say_what_to_install():
    """A minimal image without libgomp.so.1 (OpenMP) and without TBB, simulated by
    making both pool modules fail to import: numba falls back to its workqueue
    layer, the project's threads_note says so and names the package, and threaded
    kernels give the reference's results with 1 and 2 threads."""
    code = """
import sys
sys.modules["numba.np.ufunc.omppool"] = None  # import fails, as with libgomp.so.1 missing
sys.modules["numba.np.ufunc.tbbpool"] = None
import numba, numpy as np
from minilars.backends import numba_kernels as K
from minilars.backends.numba_backend import NumbaBackend
from minilars.backends.numpy_backend import NumpyBackend
assert K.threading_layer() == "workqueue"
assert "sudo apt install libgomp1" in K.threads_note(), K.threads_note()
x = np.random.default_rng(0).standard_normal((70, 9)).astype(np.float32)
w = np.linspace(0.5, 1.5, 9, dtype=np.float32)
reference = NumpyBackend().rmsnorm_forward(x, w, 1e-5)[0]
for threads in (1, 2):
    numba.set_num_threads(threads)
    assert np.allclose(NumbaBackend().rmsnorm_forward(x, w, 1e-5)[0], reference, rtol=1e-6, atol=1e-6)
assert numba.threading_layer() == "workqueue", numba.threading_layer()
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_THREADING_LAYER"}
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "NUMBA_NUM_THREADS": "2"})


def test_numpy_path_does_not_import_numba():
    code = ("import sys, minilars, minilars.model, minilars.backends\n"
            "from minilars.backends import get_backend\n"
            "get_backend('numpy')\n"
            "assert 'numba' not in sys.modules, 'numba was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
