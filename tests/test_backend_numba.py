"""The numba backend against the NumPy reference, kernel by kernel, then the tiny model.

Every jitted kernel of NumbaBackend runs on Hypothesis shapes chosen to break tiled
and threaded code (T = 1, T not a multiple of the tile, one head, kv-group ratios
1/3/9, head dims 2..64, decoding with q_offset > 0 and Tq < Tk, loss chunks that do
not divide N, ignored and all-ignored rows), in float32 and float64, on the array
layouts the model passes (column slices of a fused projection, a KV-cache prefix),
and is compared with NumpyBackend's result through the one tolerance table.
The ops of the model families (sliding-window and scaled attention, GeGLU, logit
soft caps) are compared with dense float64 references written here from their
definitions, forward and backward (torch autograd, finite differences), over the
shapes that break a window: T = 1, T < window, T > window over several tiles,
window 1, decoding past the window.

Run it also as `NUMBA_DISABLE_JIT=1 pytest tests/test_backend_numba.py`: the same
kernels then execute as plain Python, which keeps what they say honest.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba: pip install numba")
pytest.importorskip("scipy", reason="the numba backend needs scipy: numba's np.dot calls its BLAS")
JIT_OFF = os.environ.get("NUMBA_DISABLE_JIT") == "1"  # the second CI run: kernels as plain Python

from hypothesis import example, given, strategies as st  # noqa: E402

from minilars.backends import get_backend  # noqa: E402
from minilars.backends.numba_backend import NumbaBackend, warmup  # noqa: E402
from minilars.methods import MethodConfig, apply_method  # noqa: E402
from minilars.model import Model  # noqa: E402
from minilars.ops import rope_tables  # noqa: E402
from minilars.optim import AdamW, AdamWConfig  # noqa: E402
from backend_pairs import (CFG, DTYPES, SEEDS, batch, check_cross_entropy_head, check_kv_cache_decoding,  # noqa: E402
                           check_rmsnorm, normal)
from gradcheck import check_gradients  # noqa: E402
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


@given(m=st.integers(1, 40), c=st.integers(1, 40), k=st.integers(1, 8), a_f=st.booleans(), b_f=st.booleans(),
       dtype=DTYPES, seed=SEEDS)
def test_thin_products_on_one_thread_match_numpy(m, c, k, a_f, b_f, dtype, seed):
    """matmul, matmul_tn and matmul_nt through a rank-k factor (LARS's P M),
    operands C- or F-contiguous: numba's one-thread product gives numpy's result."""
    from minilars.backends.numba_backend import _thin

    rng = np.random.default_rng(seed)
    a = normal(rng, (k, m), dtype).T if a_f else normal(rng, (m, k), dtype)  # (M, K)
    b = normal(rng, (c, k), dtype).T if b_f else normal(rng, (k, c), dtype)  # (K, C)
    assert _thin(a, b)
    check(*both("matmul", a, b), "a b")
    check(*both("matmul_tn", a.T, b), "(a^T)^T b")
    check(*both("matmul_nt", a, b.T), "a (b^T)^T")


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


# ---------------------------------------------------------------- sliding window, score scale, GeGLU, soft cap
# The ops the model families of issue #19 add, against dense float64 references
# written here from their definitions (a masked (T, T) softmax, the tanh GELU, the
# capped logits): forward values with numpy, gradients with torch autograd under a
# random upstream gradient where torch is installed, and with float64 finite
# differences of the same references where it is not.
def visible_keys(tq, tk, q_offset, window):
    """(Tq, Tk) boolean: query i (position p = q_offset + i) sees key j iff j <= p and
    p - j < window (transformers' sliding_window mask; window None: causal only)."""
    p = q_offset + np.arange(tq)[:, None]
    j = np.arange(tk)[None, :]
    return (j <= p) & (p - j < (window if window is not None else tk + q_offset + tq))


def dense_attention(q, k, v, q_offset=0, window=None, scale=None):
    """o (B, Tq, H, hd) and lse (B, Tq, H) in float64 from the whole score matrix
    s_ij = scale * q_i . k_j (scale None: 1/sqrt(hd)), -inf where not visible;
    query head h reads kv head h // g."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else scale
    s = scale * np.einsum("bihd,bjhd->bhij", q, np.repeat(k, g, axis=2))
    s = np.where(visible_keys(q.shape[1], k.shape[1], q_offset, window), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bihd", e / total, np.repeat(v, g, axis=2))
    return o, (m + np.log(total))[..., 0].transpose(0, 2, 1)


def torch_attention(q, k, v, window, scale):
    """dense_attention's o in torch (float64 tensors), for autograd."""
    import torch

    g = q.shape[2] // k.shape[2]
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else scale
    s = scale * torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(g, dim=2))
    s = s.masked_fill(~torch.from_numpy(visible_keys(q.shape[1], k.shape[1], 0, window)), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(dim=-1), v.repeat_interleave(g, dim=2))


GELU_C = np.sqrt(2.0 / np.pi)


def dense_geglu(gate_up):
    """h = gelu_tanh(g) * u, gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))."""
    gate_up = np.asarray(gate_up, dtype=np.float64)
    g, u = np.split(gate_up, 2, axis=1)
    return 0.5 * g * (1.0 + np.tanh(GELU_C * (g + 0.044715 * g ** 3))) * u


def dense_capped_loss(x, head, targets, ignore_index, cap):
    """Mean over labelled rows of logsumexp(y_n) - y_n[t_n], y = cap tanh(x head^T / cap)
    (no cap when cap is None), in float64 from the whole (N, V) logits."""
    y = np.asarray(x, dtype=np.float64) @ np.asarray(head, dtype=np.float64).T
    if cap is not None:
        y = cap * np.tanh(y / cap)
    labelled = targets != ignore_index
    if not labelled.any():
        return 0.0
    y = y[labelled]
    m = y.max(axis=1)
    lse = m + np.log(np.exp(y - m[:, None]).sum(axis=1))
    return float(np.mean(lse - y[np.arange(len(y)), targets[labelled]]))


def close(actual, reference, dtype, name):
    """actual has dtype, and its values are within dtype's tolerance of a float64 reference."""
    assert isinstance(actual, np.ndarray) and actual.dtype == np.dtype(dtype), \
        f"{name}: {getattr(actual, 'dtype', type(actual))} is not {dtype}"
    assert_close(actual, np.asarray(reference, dtype=np.float64), dtype=dtype, name=name)


WINDOWS = st.one_of(st.none(), st.integers(1, 24))
SCALES = st.sampled_from([None, 0.0625, 1.0])  # Gemma 3 scales scores by query_pre_attn_scalar^-0.5, not hd^-0.5
SLIDING = dict(b=st.integers(1, 2), t=st.integers(1, 20), n_kv=st.integers(1, 2), group=st.sampled_from([1, 2, 3, 9]),
               hd=st.integers(2, 24), tile=st.integers(1, 9), window=WINDOWS, scale=SCALES, fused=st.booleans(),
               dtype=DTYPES, seed=SEEDS)


@given(q_offset=st.integers(0, 12), future=st.integers(0, 3), **SLIDING)
@example(q_offset=0, future=0, b=1, t=1, n_kv=1, group=1, hd=2, tile=1, window=1, scale=None, fused=False,
         dtype="float64", seed=0)  # T = 1, window 1
@example(q_offset=0, future=0, b=1, t=6, n_kv=1, group=3, hd=4, tile=4, window=9, scale=1.0, fused=True,
         dtype="float64", seed=1)  # T < window: causal
@example(q_offset=0, future=0, b=2, t=19, n_kv=2, group=2, hd=8, tile=3, window=5, scale=0.0625, fused=True,
         dtype="float32", seed=2)  # T > window over several tiles, tile not dividing T
@example(q_offset=0, future=0, b=1, t=17, n_kv=1, group=9, hd=64, tile=4, window=1, scale=None, fused=False,
         dtype="float32", seed=3)  # window 1: each query sees itself only
@example(q_offset=11, future=0, b=2, t=1, n_kv=1, group=3, hd=8, tile=4, window=4, scale=None, fused=True,
         dtype="float64", seed=4)  # generation: one new token, keys before its window left out
@example(q_offset=7, future=2, b=1, t=5, n_kv=2, group=1, hd=6, tile=2, window=3, scale=1.0, fused=False,
         dtype="float32", seed=5)  # a prefill chunk after a cached prefix, future keys masked
def test_sliding_window_attention_forward_matches_dense_softmax(q_offset, future, b, t, n_kv, group, hd, tile,
                                                                 window, scale, fused, dtype, seed):
    tk = q_offset + t + future
    q, k, v = attention_inputs(np.random.default_rng(seed), b, t, tk, n_kv, group, hd, dtype, fused and future == 0)
    o, lse = NB.attention_forward(q, k, v, tile, q_offset=q_offset, window=window, scale=scale)
    o_ref, lse_ref = dense_attention(q, k, v, q_offset, window, scale)
    close(o, o_ref, dtype, "o")
    close(lse, lse_ref, dtype, "lse")


def attention_backward_case(b, t, n_kv, group, hd, window, scale, fused, dtype, seed):
    """Inputs of attention_backward: q, k, v, a random upstream gradient do, and o, lse
    from the dense reference (so the backward is checked apart from the forward)."""
    rng = np.random.default_rng(seed)
    q, k, v = attention_inputs(rng, b, t, t, n_kv, group, hd, dtype, fused)
    o, lse = (a.astype(dtype) for a in dense_attention(q, k, v, 0, window, scale))
    return q, k, v, normal(rng, o.shape, dtype), o, lse


@given(**SLIDING)
@example(b=1, t=1, n_kv=1, group=1, hd=2, tile=1, window=1, scale=None, fused=False, dtype="float64", seed=0)
@example(b=1, t=6, n_kv=1, group=3, hd=4, tile=4, window=9, scale=1.0, fused=True, dtype="float64", seed=1)
@example(b=2, t=19, n_kv=2, group=2, hd=8, tile=3, window=5, scale=0.0625, fused=True, dtype="float32", seed=2)
@example(b=1, t=17, n_kv=1, group=9, hd=16, tile=4, window=1, scale=None, fused=False, dtype="float32", seed=3)
@example(b=1, t=20, n_kv=1, group=1, hd=3, tile=7, window=2, scale=1.0, fused=False, dtype="float64", seed=4)
def test_sliding_window_attention_backward_matches_torch_autograd(b, t, n_kv, group, hd, tile, window, scale, fused,
                                                                  dtype, seed):
    torch = pytest.importorskip("torch")
    q, k, v, do, o, lse = attention_backward_case(b, t, n_kv, group, hd, window, scale, fused, dtype, seed)
    leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v)]
    torch_attention(*leaves, window, scale).backward(torch.tensor(do, dtype=torch.float64))
    grads = NB.attention_backward(do, q, k, v, o, lse, tile, window=window, scale=scale)
    for name, g, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        close(g, leaf.grad.numpy(), dtype, name)


@pytest.mark.parametrize("t, tile, window, group", [(1, 1, 1, 1), (9, 4, 3, 3), (11, 3, 20, 1), (13, 5, 1, 2)])
def test_sliding_window_attention_backward_matches_finite_differences(t, tile, window, group):
    """Without torch: d/d(q, k, v) of sum(o * do), o the dense reference's, in float64."""
    q, k, v, do, o, lse = attention_backward_case(1, t, 2, group, 5, window, 0.7, False, "float64", t)
    dq, dk, dv = NB.attention_backward(do, q, k, v, o, lse, tile, window=window, scale=0.7)
    check_gradients(lambda: float(np.sum(dense_attention(q, k, v, 0, window, 0.7)[0] * do)),
                    {"q": dq, "k": dk, "v": dv}, {"q": q, "k": k, "v": v}, np.random.default_rng(t))


@pytest.mark.parametrize("t, tile", [(1, 1), (7, 3), (12, 4)])
def test_a_window_that_covers_every_key_is_the_causal_kernel_bit_for_bit(t, tile):
    """window >= T and the default scale 1/sqrt(hd) given explicitly run the same
    arithmetic as window=None, scale=None (the SmolLM2 path)."""
    rng = np.random.default_rng(t)
    q, k, v = attention_inputs(rng, 2, t, t, 1, 3, 8, "float32", True)
    o, lse = NB.attention_forward(q, k, v, tile)
    o_w, lse_w = NB.attention_forward(q, k, v, tile, window=t, scale=1 / np.sqrt(8))
    do = normal(rng, o.shape, "float32")
    grads = NB.attention_backward(do, q, k, v, o, lse, tile)
    grads_w = NB.attention_backward(do, q, k, v, o, lse, tile, window=t + 5, scale=1 / np.sqrt(8))
    for a, b_ in zip((o, lse, *grads), (o_w, lse_w, *grads_w)):
        np.testing.assert_array_equal(a, b_)


def test_decoding_never_reads_keys_outside_the_window():
    """One new token at position 40 with window 4 sees keys 37..40; the cache's other
    rows hold NaN, which would reach o through 0 * NaN in P V if a tile of them were
    read."""
    rng = np.random.default_rng(0)
    q, k, v = attention_inputs(rng, 1, 1, 41, 1, 3, 8, "float32", False)
    k[:, :37], v[:, :37] = np.nan, np.nan
    o, lse = NB.attention_forward(q, k, v, 4, q_offset=40, window=4)
    o_ref, lse_ref = dense_attention(q, k[:, 37:], v[:, 37:], 3, None)
    close(o, o_ref, "float32", "o")
    close(lse, lse_ref, "float32", "lse")


class _CountingProducts:
    """numpy as the kernels see it, counting the multiply-adds of the tile products
    (np.dot calls): a (m, k) by (k, n) product counts m k n."""

    def __init__(self):
        self.work = 0

    def dot(self, a, b, *out):
        self.work += a.shape[0] * a.shape[1] * b.shape[1]
        return np.dot(a, b, *out)

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.skipif(not JIT_OFF,
                    reason="counts the kernels' tile products as plain Python (the NUMBA_DISABLE_JIT run)")
def test_a_sliding_layer_does_work_linear_in_t_times_window(monkeypatch):
    """Tile pairs (query tile, key tile) visited: causal grows as T^2 / 2 tile^2; with a
    window w, at most ceil((w - 1) / tile) + 1 key tiles per query tile (forward, 2
    products a pair) and as many query tiles per key tile (backward, 5 a pair). A
    diagonal pair is done in _DIAGONAL_PARTS row blocks, block s against the keys
    up to its last row: its causal half and a little more, not the whole pair."""
    from minilars.backends import numba_kernels as K

    counter = _CountingProducts()
    monkeypatch.setattr(K, "np", counter)
    tile, window, hd = 4, 6, 4
    pair = tile * tile * hd  # multiply-adds of one tile x tile x hd product
    per_tile = -(-(window - 1) // tile) + 1
    parts = min(K._DIAGONAL_PARTS, tile)
    bounds = [s * tile // parts for s in range(parts + 1)]
    diagonal = sum((r1 - r0) * r1 for r0, r1 in zip(bounds[:-1], bounds[1:])) * hd  # one diagonal product
    assert diagonal < pair
    for t in (24, 48):
        q, k, v, do, o, lse = attention_backward_case(1, t, 1, 1, hd, window, None, False, "float64", t)
        n_tiles = t // tile
        counter.work = 0
        NB.attention_forward(q, k, v, tile, window=window)
        assert counter.work <= 2 * n_tiles * per_tile * pair
        counter.work = 0
        NB.attention_backward(do, q, k, v, o, lse, tile, window=window)
        assert counter.work <= 5 * n_tiles * per_tile * pair
        counter.work = 0
        NB.attention_forward(q, k, v, tile)
        # causal: every key tile below the diagonal whole, the diagonal in blocks
        assert counter.work == 2 * (n_tiles * (n_tiles - 1) // 2 * pair + n_tiles * diagonal)
        counter.work = 0
        NB.attention_backward(do, q, k, v, o, lse, tile)
        assert counter.work == 5 * (n_tiles * (n_tiles - 1) // 2 * pair + n_tiles * diagonal)


def test_bad_window_and_cap_are_named():
    q = np.zeros((1, 2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="window"):
        NB.attention_forward(q, q, q, 2, window=0)
    with pytest.raises(ValueError, match="window"):
        NB.attention_backward(q, q, q, q, q, np.zeros((1, 2, 1), np.float32), 2, window=-3)
    with pytest.raises(ValueError, match="soft cap"):
        NB.softcap(q, 0.0)
    with pytest.raises(ValueError, match="soft cap"):
        NB.cross_entropy_head(q[0, :, 0], q[0, :, 0], np.array([0, 1]), 2, -100, True, True, softcap=-1.0)


@given(n=st.integers(1, 20), f=st.integers(1, 40), scale=st.sampled_from([1.0, 4.0, 60.0]), dtype=DTYPES,
       seed=SEEDS)
@example(n=3, f=257, scale=4.0, dtype="float32", seed=0)  # a row over two exp blocks of 256
@example(n=1, f=1, scale=60.0, dtype="float64", seed=1)
def test_geglu_matches_dense_gelu_tanh(n, f, scale, dtype, seed):
    """scale 60: tanh saturates (exp(-2a) past float32's range on the negative side),
    gelu(g) must be g * 0 or g * 1, not NaN."""
    rng = np.random.default_rng(seed)
    gate_up = normal(rng, (n, 2 * f), dtype)
    gate_up[:, :f] *= scale
    with np.errstate(over="ignore"):
        close(NB.geglu_forward_fused(gate_up), dense_geglu(gate_up), dtype, "h")
        dh = normal(rng, (n, f), dtype)
        dgate_up = NB.geglu_backward_fused(dh, gate_up)
    torch = pytest.importorskip("torch")
    leaf = torch.tensor(gate_up, dtype=torch.float64, requires_grad=True)
    g, u = leaf.chunk(2, dim=1)
    (torch.nn.functional.gelu(g, approximate="tanh") * u).backward(torch.tensor(dh, dtype=torch.float64))
    close(dgate_up, leaf.grad.numpy(), dtype, "[dg | du]")


@pytest.mark.parametrize("n, f", [(1, 1), (4, 7), (2, 260)])
def test_geglu_backward_matches_finite_differences(n, f):
    rng = np.random.default_rng(f)
    gate_up, dh = normal(rng, (n, 2 * f), np.float64, 2.0), normal(rng, (n, f), np.float64)
    check_gradients(lambda: float(np.sum(dense_geglu(gate_up) * dh)),
                    {"gate_up": NB.geglu_backward_fused(dh, gate_up)}, {"gate_up": gate_up}, rng)


CAPS = st.sampled_from([0.5, 5.0, 30.0])  # 0.5: tanh saturates; 30: Gemma 2's final_logit_softcapping


@given(n=st.integers(1, 30), d=st.integers(1, 8), vocab=st.integers(2, 40), chunk=st.integers(1, 33), cap=CAPS,
       ignored=st.sampled_from([0.0, 0.3, 0.8, 1.0]), need_dx=st.booleans(), need_dhead=st.booleans(),
       half_head=st.booleans(), dtype=DTYPES, seed=SEEDS)
@example(n=7, d=3, vocab=300, chunk=3, cap=5.0, ignored=0.3, need_dx=True, need_dhead=True, half_head=False,
         dtype="float64", seed=0)  # rows over two exp blocks of 256
@example(n=6, d=2, vocab=3, chunk=4, cap=0.5, ignored=1.0, need_dx=True, need_dhead=True, half_head=False,
         dtype="float32", seed=0)
def test_soft_capped_cross_entropy_matches_dense_logits(n, d, vocab, chunk, cap, ignored, need_dx, need_dhead,
                                                        half_head, dtype, seed):
    rng = np.random.default_rng(seed)
    x = normal(rng, (n, d), dtype, 2.0)
    head = normal(rng, (vocab, d), np.float16 if half_head else dtype)
    targets = np.where(rng.random(n) < ignored, -100, rng.integers(0, vocab, n))
    loss, n_valid, dx, dhead = NB.cross_entropy_head(x, head, targets, chunk, -100, need_dx, need_dhead, softcap=cap)
    assert isinstance(loss, float) and n_valid == int((targets != -100).sum())
    assert_close(np.float64(loss), np.float64(dense_capped_loss(x, head, targets, -100, cap)), dtype=dtype,
                 name="loss")
    assert (dx is None) == (not need_dx) and (dhead is None) == (not need_dhead)
    torch = pytest.importorskip("torch")
    xt, ht = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, head))
    y = cap * torch.tanh(xt @ ht.T / cap)
    labelled = torch.from_numpy(targets != -100)
    if labelled.any():
        torch.nn.functional.cross_entropy(y[labelled], torch.from_numpy(targets[targets != -100])).backward()
    for name, got, leaf in (("dx", dx, xt), ("dhead", dhead, ht)):
        if got is not None:
            close(got, leaf.grad.numpy() if leaf.grad is not None else np.zeros(leaf.shape), dtype, name)


def test_soft_capped_cross_entropy_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, head = normal(rng, (9, 4), np.float64, 2.0), normal(rng, (11, 4), np.float64)
    targets = np.array([3, -100, 0, 10, 10, 2, -100, 7, 1])
    _, _, dx, dhead = NB.cross_entropy_head(x, head, targets, 4, -100, True, True, softcap=1.5)
    check_gradients(lambda: dense_capped_loss(x, head, targets, -100, 1.5), {"x": dx, "head": dhead},
                    {"x": x, "head": head}, rng)


@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple), cap=CAPS,
       scale=st.sampled_from([1.0, 40.0]), dtype=DTYPES, seed=SEEDS)
@example(shape=(2, 4097), cap=30.0, scale=40.0, dtype="float32", seed=0)  # two work items of 4096
def test_softcap_matches_dense_tanh(shape, cap, scale, dtype, seed):
    x = normal(np.random.default_rng(seed), shape, dtype, scale)
    y = NB.softcap(x, cap)
    assert y is not x
    close(y, cap * np.tanh(x.astype(np.float64) / cap), dtype, "cap tanh(x / cap)")


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
    got = kernel_cast(every_half, np.float32)
    with np.errstate(invalid="ignore"):  # ARM's cast flags NaN inputs as invalid
        ref = every_half.astype(np.float32)
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


@pytest.mark.skipif(JIT_OFF, reason="no compiled signatures")
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


@pytest.mark.skipif(JIT_OFF, reason="nothing compiled")
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
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "MINILARS_CACHE": str(tmp_path)})
    cached = [p.name for p in (tmp_path / "numba").rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert any(name.startswith("numba_kernels.reduce_kv_heads") for name in cached), cached


@pytest.mark.skipif(JIT_OFF, reason="no threads without the JIT")
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
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "NUMBA_NUM_THREADS": "2"})


def test_numpy_path_does_not_import_numba():
    code = ("import sys, minilars, minilars.model, minilars.backends\n"
            "from minilars.backends import get_backend\n"
            "get_backend('numpy')\n"
            "assert 'numba' not in sys.modules, 'numba was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", ["finetune", "generate"])
@pytest.mark.parametrize("backend_name, expected", [("numba", ["warm cache", "model"]), ("numpy", ["model"])])
def test_commands_fill_numbas_cache_before_the_model(monkeypatch, tmp_path, backend_name, expected, command):
    """On numba, finetune and generate (and eval, which loads its model as generate
    does) have the kernel cache filled (by a child on the first run) before any weight
    is read, so that their own process only loads kernels."""
    from minilars import pretrained
    from minilars.backends import numba_backend
    from minilars.cli import main

    calls = []

    class Loaded(Exception):
        pass

    def load_model(*args, **kwargs):
        calls.append("model")
        raise Loaded

    monkeypatch.setattr(numba_backend, "warm_cache_in_child", lambda: calls.append("warm cache"))
    monkeypatch.setattr(pretrained, "load_model", load_model)
    with pytest.raises(Loaded):
        if command == "finetune":
            main(["finetune", "--model", "tiny", "--backend", backend_name, "--output", str(tmp_path / "out")])
        else:
            main(["generate", "--model", "tiny", "--backend", backend_name, "hello"])
    assert calls == expected


@pytest.mark.skipif(JIT_OFF, reason="nothing to compile")
def test_the_cache_is_warmed_in_a_child_once_and_marked(tmp_path):
    """A real child (the kernels load from, or compile into, numba's cache): the first
    call runs it and leaves the marker, the next one finds the marker and runs nothing."""
    from minilars.backends.numba_backend import cache_marker, warm_cache_in_child

    marker = cache_marker(str(tmp_path))
    assert not os.path.exists(marker)
    assert warm_cache_in_child(str(tmp_path)) is True
    assert os.path.exists(marker)
    assert warm_cache_in_child(str(tmp_path)) is False


@pytest.mark.skipif(JIT_OFF, reason="nothing to compile")
def test_a_failed_warm_child_is_said_and_leaves_no_marker(tmp_path, monkeypatch, capsys):
    import subprocess as subprocess_module

    from minilars.backends.numba_backend import cache_marker, warm_cache_in_child

    ran = []
    monkeypatch.setattr(subprocess_module, "run",
                        lambda cmd, **kw: ran.append(cmd) or subprocess_module.CompletedProcess(cmd, 3))
    assert warm_cache_in_child(str(tmp_path)) is True
    assert len(ran) == 1 and ran[0][1] == "-c"
    assert "failed (exit status 3)" in capsys.readouterr().err
    assert not os.path.exists(cache_marker(str(tmp_path)))  # tried again next run


@pytest.mark.skipif(JIT_OFF, reason="nothing to compile")
def test_processes_started_together_fill_the_cache_once(tmp_path, monkeypatch):
    """Two callers at once (a study's --jobs 2 starts two finetunes together): the one
    that gets the lock runs the child, the other waits for it and finds the marker."""
    import subprocess as subprocess_module
    import threading
    import time

    from minilars.backends.numba_backend import cache_marker, warm_cache_in_child

    ran = []

    def slow_child(cmd, **kw):
        ran.append(cmd)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one compiles
        return subprocess_module.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess_module, "run", slow_child)
    results = []
    callers = [threading.Thread(target=lambda: results.append(warm_cache_in_child(str(tmp_path))))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(ran) == 1
    assert sorted(results) == [False, True]
    assert os.path.exists(cache_marker(str(tmp_path)))
