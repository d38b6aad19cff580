"""Every op's backward against float64 finite differences with a random upstream
gradient, over shapes that break code (Hypothesis)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradcheck import check_gradients
from minilars import ops
from minilars.backends import available, get_backend

be = get_backend("numpy")
seeds = st.integers(0, 2**31 - 1)


def contracted(fn, upstream):
    return lambda: float(np.sum(fn() * upstream))


@given(n=st.integers(1, 9), d=st.integers(1, 24), seed=seeds)
def test_rmsnorm(n, d, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((n, d)), rng.standard_normal(d)
    g = rng.standard_normal((n, d))
    y, cache = ops.rmsnorm_forward(x, w, 1e-5, be)
    dx, dw = ops.rmsnorm_backward(g, cache, w, be)
    check_gradients(contracted(lambda: ops.rmsnorm_forward(x, w, 1e-5, be)[0], g), {"x": dx, "w": dw},
                    {"x": x, "w": w}, rng)


@given(n=st.integers(1, 9), d_in=st.integers(1, 16), d_out=st.integers(1, 16), seed=seeds)
def test_linear(n, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    x, w, g = rng.standard_normal((n, d_in)), rng.standard_normal((d_in, d_out)), rng.standard_normal((n, d_out))
    _, cache = ops.linear_forward(x, w, be)
    dx, dw = ops.linear_backward(g, cache, w, be)
    check_gradients(contracted(lambda: ops.linear_forward(x, w, be)[0], g), {"x": dx, "w": dw},
                    {"x": x, "w": w}, rng)


@given(n=st.integers(1, 9), vocab=st.integers(1, 12), d=st.integers(1, 8), seed=seeds)
def test_embedding(n, vocab, d, seed):
    rng = np.random.default_rng(seed)
    table, tokens = rng.standard_normal((vocab, d)), rng.integers(0, vocab, n)
    g = rng.standard_normal((n, d))
    _, cache = ops.embedding_forward(table, tokens, be)
    dtable = ops.embedding_backward(g, cache, vocab, be)
    check_gradients(contracted(lambda: ops.embedding_forward(table, tokens, be)[0], g), {"table": dtable},
                    {"table": table}, rng)


@given(b=st.integers(1, 2), t=st.integers(1, 7), heads=st.integers(1, 3), half=st.integers(1, 32),
       theta=st.sampled_from([10000.0, 1e5, 500.0]), seed=seeds)
def test_rope(b, t, heads, half, theta, seed):
    rng = np.random.default_rng(seed)
    cos, sin = ops.rope_tables(t, 2 * half, theta, np.float64)
    x, g = rng.standard_normal((b, t, heads, 2 * half)), rng.standard_normal((b, t, heads, 2 * half))
    dx = ops.rope_backward(g, cos, sin, be)
    check_gradients(contracted(lambda: ops.rope_forward(x, cos, sin, be), g), {"x": dx}, {"x": x}, rng)


def test_rope_matches_rotate_half_definition(rng):
    """y = x cos + rotate_half(x) sin with rotate_half([x1, x2]) = [-x2, x1], written out."""
    t, hd = 5, 8
    cos, sin = ops.rope_tables(t, hd, 10000.0, np.float64)
    x = rng.standard_normal((1, t, 1, hd))
    rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    expected = x * cos[None, :, None] + rotated * sin[None, :, None]
    np.testing.assert_allclose(ops.rope_forward(x, cos, sin, be), expected, rtol=1e-12, atol=1e-12)
    assert np.allclose(cos[0], 1.0) and np.allclose(sin[0], 0.0)  # position 0 is the identity
    # angle(t=1, i=1) = theta^(-2/hd)
    assert np.isclose(np.arccos(cos[1, 1]), 10000.0 ** (-2 / hd))


@given(b=st.integers(1, 2), t=st.integers(1, 19), n_kv=st.integers(1, 3), group=st.sampled_from([1, 3, 9]),
       hd=st.sampled_from([2, 4, 8, 64]), tile=st.integers(1, 8), seed=seeds)
def test_attention(b, t, n_kv, group, hd, tile, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n_kv * group, hd))
    k, v = rng.standard_normal((b, t, n_kv, hd)), rng.standard_normal((b, t, n_kv, hd))
    g = rng.standard_normal(q.shape)
    _, cache = ops.attention_forward(q, k, v, tile, be)
    dq, dk, dv = ops.attention_backward(g, cache, tile, be)
    check_gradients(contracted(lambda: ops.attention_forward(q, k, v, tile, be)[0], g),
                    {"q": dq, "k": dk, "v": dv}, {"q": q, "k": k, "v": v}, rng, n_directions=2)


@given(t=st.integers(1, 20), tile=st.integers(1, 9), seed=seeds)
def test_attention_equals_naive_softmax(t, tile, seed):
    """The tiled online softmax gives the textbook causal softmax(QK^T/sqrt(hd))V, and
    lse = log sum_j exp(s_ij), whatever the tile."""
    rng = np.random.default_rng(seed)
    h, n_kv, hd = 6, 2, 4
    q, k, v = rng.standard_normal((1, t, h, hd)), rng.standard_normal((1, t, n_kv, hd)), rng.standard_normal((1, t, n_kv, hd))
    o, cache = ops.attention_forward(q, k, v, tile, be)
    for head in range(h):
        kv = head // (h // n_kv)
        s = q[0, :, head] @ k[0, :, kv].T / np.sqrt(hd)
        s[np.triu_indices(t, 1)] = -np.inf
        lse = np.log(np.exp(s).sum(1))
        np.testing.assert_allclose(cache.lse[0, :, head], lse, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(o[0, :, head], np.exp(s - lse[:, None]) @ v[0, :, kv], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in ("numpy", "numba") if b in available()])
@given(n=st.integers(1, 9), f=st.integers(1, 16), seed=seeds)
def test_swiglu(backend, n, f, seed):
    """numba reads [g | u] whole and writes [dg | du] in its own kernels
    (swiglu_*_fused): checked against finite differences too, not only against numpy."""
    sw = get_backend(backend)
    rng = np.random.default_rng(seed)
    gate_up, g = 2 * rng.standard_normal((n, 2 * f)), rng.standard_normal((n, f))
    _, cache = ops.swiglu_forward(gate_up, sw)
    dgu = ops.swiglu_backward(g, cache, sw)
    check_gradients(contracted(lambda: ops.swiglu_forward(gate_up, sw)[0], g), {"gate_up": dgu},
                    {"gate_up": gate_up}, rng)


@given(n=st.integers(1, 13), d=st.integers(1, 8), vocab=st.integers(2, 30), chunk=st.integers(1, 6),
       n_ignored=st.integers(0, 3), dloss=st.floats(-3, 3).filter(lambda s: abs(s) > 0.1), seed=seeds)
def test_cross_entropy_head(n, d, vocab, chunk, n_ignored, dloss, seed):
    rng = np.random.default_rng(seed)
    x, head = rng.standard_normal((n, d)), rng.standard_normal((vocab, d))
    targets = rng.integers(0, vocab, n)
    targets[rng.permutation(n)[:n_ignored]] = -100
    loss, n_valid, cache = ops.cross_entropy_forward(x, head, targets, be, chunk=chunk, need_dhead=True)
    dx, dhead = ops.cross_entropy_backward(dloss, cache, be)

    def reference_loss():
        logits = x @ head.T
        m = logits.max(1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
        ok = targets != -100
        return float(np.mean((lse - logits[np.arange(n), np.where(ok, targets, 0)])[ok])) if ok.any() else 0.0

    assert n_valid == int(np.sum(targets != -100))
    np.testing.assert_allclose(loss, reference_loss(), rtol=1e-12, atol=1e-12)
    check_gradients(lambda: dloss * reference_loss(), {"x": dx, "head": dhead}, {"x": x, "head": head}, rng)


@pytest.mark.parametrize("backend", available())
def test_cross_entropy_head_sees_only_labelled_rows(backend):
    """Prompt rows (target ignore_index) never reach the head: cross_entropy_head is
    handed the n_l labelled rows alone, and the result (loss, dx with zero rows where
    there is no label, dhead) equals the plain formula over all N rows."""
    real = get_backend(backend)
    seen = []

    class Spy(type(real)):
        def cross_entropy_head(self, x, head, targets, *args):
            seen.append(tuple(x.shape))
            return super().cross_entropy_head(x, head, targets, *args)

    spy = Spy()
    rng = np.random.default_rng(7)
    n, d, vocab = 40, 6, 23
    x, head = rng.standard_normal((n, d)), rng.standard_normal((vocab, d))
    targets = np.full(n, -100)
    labelled = np.sort(rng.permutation(n)[:9])
    targets[labelled] = rng.integers(0, vocab, labelled.size)
    dloss = 1.7
    loss, n_valid, cache = ops.cross_entropy_forward(spy.asarray(x), spy.asarray(head), spy.asarray(targets),
                                                     spy, chunk=4, need_dhead=True)
    dx, dhead = (spy.to_numpy(g) for g in ops.cross_entropy_backward(dloss, cache, spy))
    assert seen == [(labelled.size, d)]
    assert n_valid == labelled.size

    logits = x @ head.T  # reference over every row, by the formula
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = p.copy()
    dz[labelled, targets[labelled]] -= 1.0
    dz[targets == -100] = 0.0
    dz *= dloss / labelled.size
    ref_loss = float(np.mean(-np.log(p[labelled, targets[labelled]])))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
    assert dx.shape == (n, d) and np.all(dx[targets == -100] == 0.0)
    np.testing.assert_allclose(dx, dz @ head, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dhead, dz.T @ x, rtol=1e-9, atol=1e-12)
