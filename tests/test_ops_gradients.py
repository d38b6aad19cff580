"""Every op's backward against float64 finite differences with a random upstream
gradient, over shapes that break code (Hypothesis); the model families' ops
(issue 19) also against torch autograd, on every backend."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradcheck import autograd, check_gradients
from minilars import ops
from minilars.backends import available, get_backend
from minilars.config import RopeScaling
from tolerances import TOLERANCES, assert_close

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


# ---------------------------------------------------------------- the model families' ops (issue 19)
# Each op below is checked twice on every backend: its backward against float64
# finite differences of its own forward (a random upstream gradient), and its
# forward and backward against the same formula written in torch and
# differentiated by autograd. A case names the op's float64 inputs, its forward and
# backward through minilars.ops on a backend, and the torch formula.
BACKENDS = ("numpy", "numba", "torch")


def on(backend: str):
    """The backend `name`: numba and torch are optional installs."""
    if backend != "numpy":
        pytest.importorskip(backend)
    return get_backend(backend)


def as_numpy(be, x) -> np.ndarray:
    return np.asarray(x) if isinstance(x, float) else np.asarray(be.to_numpy(x))


@dataclass(frozen=True)
class OpCase:
    inputs: Callable  # rng -> ({name: float64 array the op is differentiated in}, {name: constant array})
    forward: Callable  # (be, **arrays) -> the op's output (backend array, or a float loss)
    backward: Callable  # (be, upstream, **arrays) -> {name: gradient of sum(output * upstream)}
    reference: Callable  # (**torch tensors) -> output: the op's formula in torch


def rmsnorm_case(n, d, offset, eps=1e-6):
    """Gemma's (1 + w) RMSNorm (offset 1) and LLaMA's (offset 0)."""
    return OpCase(
        lambda rng: ({"x": 3 * rng.standard_normal((n, d)), "w": 0.1 * rng.standard_normal(d)}, {}),
        lambda be, x, w: ops.rmsnorm_forward(x, w, eps, be, offset)[0],
        lambda be, g, x, w: dict(zip("xw", ops.rmsnorm_backward(g, ops.rmsnorm_forward(x, w, eps, be, offset)[1], w,
                                                                 be, offset))),
        lambda x, w: x * torch_module().rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w))


def head_norm_case(b, t, heads, hd, offset, eps=1e-6):
    """q/k norm: RMSNorm over each head's hd of (B, T, heads, hd)."""
    return OpCase(
        lambda rng: ({"x": 2 * rng.standard_normal((b, t, heads, hd)), "w": 0.3 * rng.standard_normal(hd)}, {}),
        lambda be, x, w: ops.head_rmsnorm_forward(x, w, eps, be, offset)[0],
        lambda be, g, x, w: dict(zip("xw", ops.head_rmsnorm_backward(
            g, ops.head_rmsnorm_forward(x, w, eps, be, offset)[1], w, be, offset))),
        lambda x, w: x * torch_module().rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w))


def _affine_grads(be, g, x, w, b):
    dx, dw = ops.linear_backward(g, ops.LinearCache(x), w, be)
    return {"x": dx, "w": dw, "b": ops.bias_backward(g, be)}


def bias_case(n, d_in, d_out):
    """y = x W + b (the biased q, k, v of Qwen2)."""
    return OpCase(
        lambda rng: ({"x": rng.standard_normal((n, d_in)), "w": rng.standard_normal((d_in, d_out)),
                      "b": rng.standard_normal(d_out)}, {}),
        lambda be, x, w, b: ops.bias_forward(ops.linear_forward(x, w, be)[0], b, be),
        _affine_grads,
        lambda x, w, b: x @ w + b)


def geglu_case(n, f):
    def reference(gate_up):
        import torch.nn.functional as F
        return F.gelu(gate_up[:, :f], approximate="tanh") * gate_up[:, f:]  # transformers' gelu_pytorch_tanh
    return OpCase(
        lambda rng: ({"gate_up": 2 * rng.standard_normal((n, 2 * f))}, {}),
        lambda be, gate_up: ops.geglu_forward(gate_up, be)[0],
        lambda be, g, gate_up: {"gate_up": ops.geglu_backward(g, ops.geglu_forward(gate_up, be)[1], be)},
        reference)


def embedding_case(vocab, n, d, scale):
    """x = E[t] * s (Gemma: s = sqrt(d)); repeated tokens accumulate in dE."""
    return OpCase(
        lambda rng: ({"table": rng.standard_normal((vocab, d))}, {"tokens": rng.integers(0, vocab, n)}),
        lambda be, table, tokens: ops.embedding_forward(table, tokens, be, scale)[0],
        lambda be, g, table, tokens: {"table": ops.embedding_backward(
            g, ops.embedding_forward(table, tokens, be, scale)[1], vocab, be, scale)},
        lambda table, tokens: table[torch_module().as_tensor(tokens)] * scale)


def attention_reference(q, k, v, window=None, scale=None, q_offset=0):
    """softmax(scale Q K^T + mask) V with the whole (Tq, Tk) score matrix and
    transformers' masks: key j is visible from query i (at position q_offset + i)
    when j <= q_offset + i and, for a sliding window, j > q_offset + i - window."""
    torch = torch_module()
    tq, heads, hd = q.shape[1], q.shape[2], q.shape[3]
    group = heads // k.shape[2]
    qh = q.transpose(1, 2)  # (B, H, Tq, hd)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = qh @ kh.transpose(-1, -2) * (hd ** -0.5 if scale is None else scale)  # (B, H, Tq, Tk)
    pos = q_offset + torch.arange(tq)[:, None]
    key = torch.arange(k.shape[1])[None, :]
    visible = key <= pos
    if window is not None:
        visible &= key > pos - window
    return (torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ vh).transpose(1, 2)


def attention_case(b, t, heads, n_kv, hd, tile, window, scale):
    def inputs(rng):
        return ({"q": rng.standard_normal((b, t, heads, hd)), "k": rng.standard_normal((b, t, n_kv, hd)),
                 "v": rng.standard_normal((b, t, n_kv, hd))}, {})

    def backward(be, g, q, k, v):
        cache = ops.attention_forward(q, k, v, tile, be, window, scale)[1]
        return dict(zip("qkv", ops.attention_backward(g, cache, tile, be, window, scale)))
    return OpCase(inputs, lambda be, q, k, v: ops.attention_forward(q, k, v, tile, be, window, scale)[0], backward,
                  lambda q, k, v: attention_reference(q, k, v, window, scale))


def softcap_loss_case(n, d, vocab, chunk, softcap, n_ignored):
    """Gemma's soft-capped cross-entropy: z = c tanh(x E^T / c); the upstream is dloss."""
    def inputs(rng):
        targets = rng.integers(0, vocab, n)
        targets[rng.permutation(n)[:n_ignored]] = -100
        return {"x": 2 * rng.standard_normal((n, d)), "head": rng.standard_normal((vocab, d))}, {"targets": targets}

    def forward(be, x, head, targets):
        return ops.cross_entropy_forward(x, head, targets, be, chunk=chunk, softcap=softcap)[0]

    def backward(be, g, x, head, targets):
        cache = ops.cross_entropy_forward(x, head, targets, be, chunk=chunk, need_dhead=True, softcap=softcap)[2]
        return dict(zip(("x", "head"), ops.cross_entropy_backward(float(g), cache, be)))

    def reference(x, head, targets):
        import torch.nn.functional as F
        torch = torch_module()
        logits = softcap * torch.tanh(x @ head.T / softcap)
        return F.cross_entropy(logits, torch.as_tensor(targets), ignore_index=-100)
    return OpCase(inputs, forward, backward, reference)


OP_CASES = {
    "rmsnorm (1 + w)": rmsnorm_case(7, 12, 1.0),
    "rmsnorm (1 + w), one row": rmsnorm_case(1, 5, 1.0),
    "q/k norm": head_norm_case(2, 5, 3, 8, 0.0),
    "q/k norm (1 + w)": head_norm_case(1, 4, 2, 16, 1.0),
    "bias": bias_case(6, 5, 7),
    "bias, one token": bias_case(1, 3, 4),
    "geglu": geglu_case(9, 6),
    "embedding x sqrt(d)": embedding_case(11, 15, 4, 2.0),
    "attention, window < T": attention_case(2, 13, 4, 2, 8, 3, 4, None),
    "attention, window 1": attention_case(1, 6, 2, 1, 4, 2, 1, None),
    "attention, T = 1": attention_case(2, 1, 3, 1, 4, 2, 3, None),
    "attention, GQA 3, window > T": attention_case(1, 7, 6, 2, 4, 4, 10, None),
    "attention, scale": attention_case(2, 9, 4, 2, 8, 4, None, 0.3),
    "attention, window and scale, tile > T": attention_case(1, 11, 2, 2, 6, 16, 5, 0.7),
    "softcap loss": softcap_loss_case(13, 6, 17, 4, 3.0, 3),
    "softcap loss, one chunk": softcap_loss_case(5, 3, 9, 8, 0.5, 0),
}


def torch_module():
    import torch
    return torch


def run_op(case: OpCase, be, seed: int = 0):
    """(numpy inputs, constants, backend output, upstream, backend gradients)."""
    rng = np.random.default_rng(seed)
    inputs, constants = case.inputs(rng)
    arrays = {name: be.asarray(x) for name, x in {**inputs, **constants}.items()}
    y = as_numpy(be, case.forward(be, **arrays))
    upstream = rng.standard_normal(y.shape)
    grads = {name: as_numpy(be, g) for name, g in case.backward(be, be.asarray(upstream), **arrays).items()}
    return inputs, constants, y, upstream, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_family_op_finite_differences(name, backend):
    be, case = on(backend), OP_CASES[name]
    inputs, constants, _, upstream, grads = run_op(case, be)
    consts = {k: be.asarray(v) for k, v in constants.items()}

    def loss():
        y = case.forward(be, **{k: be.asarray(x) for k, x in inputs.items()}, **consts)
        return float(np.sum(as_numpy(be, y) * upstream))
    check_gradients(loss, grads, inputs, np.random.default_rng(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_family_op_matches_torch_autograd(name, backend):
    pytest.importorskip("torch")
    be, case = on(backend), OP_CASES[name]
    inputs, constants, y, upstream, grads = run_op(case, be)
    y_ref, grads_ref = autograd(case.reference, inputs, upstream, constants)
    assert_close(y, y_ref, name="output")
    assert sorted(grads) == sorted(grads_ref)
    for input_name, g in grads_ref.items():
        assert_close(grads[input_name], g, name=f"d{input_name}")


@pytest.mark.parametrize("backend", BACKENDS)
@given(t=st.integers(1, 20), tile=st.integers(1, 9), window=st.integers(1, 12), q_offset=st.integers(0, 9),
       scale=st.sampled_from([None, 0.25]), seed=seeds)
def test_windowed_attention_equals_naive_softmax(backend, t, tile, window, q_offset, scale, seed):
    """Tiled online softmax with a sliding window (and a KV-cache offset) gives the
    masked softmax of the whole score matrix, and lse = log sum_j exp(s_ij) over the
    visible keys, whatever the tile."""
    torch = pytest.importorskip("torch")
    be = on(backend)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, t, 4, 4))
    k, v = rng.standard_normal((1, q_offset + t, 2, 4)), rng.standard_normal((1, q_offset + t, 2, 4))
    o, lse = be.attention_forward(*(be.asarray(a) for a in (q, k, v)), tile, q_offset=q_offset, window=window,
                                  **({} if scale is None else {"scale": scale}))
    tq, tk = (torch.as_tensor(a) for a in (q, k))
    scores = (tq.transpose(1, 2) @ tk.transpose(1, 2).repeat_interleave(2, dim=1).transpose(-1, -2)
              * (0.5 if scale is None else scale))  # (1, H, Tq, Tk), hd = 4
    pos, key = q_offset + torch.arange(t)[:, None], torch.arange(q_offset + t)[None, :]
    lse_ref = torch.logsumexp(scores.masked_fill((key > pos) | (key <= pos - window), float("-inf")), dim=-1)
    assert_close(as_numpy(be, lse), lse_ref.transpose(1, 2).numpy(), name="lse")
    o_ref = attention_reference(*(torch.as_tensor(a) for a in (q, k, v)), window, scale, q_offset)
    assert_close(as_numpy(be, o), o_ref.numpy(), name="o")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_of_logits(backend):
    be = on(backend)
    x = np.random.default_rng(0).standard_normal((5, 7)) * 30
    assert_close(as_numpy(be, be.softcap(be.asarray(x), 15.0)), 15.0 * np.tanh(x / 15.0), name="softcap")


ROPE_SCALINGS = {
    "linear": RopeScaling("linear", factor=4.0),
    "llama3 (Llama 3.1 8B)": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_seq_len=8192),
    "llama3, short context": RopeScaling("llama3", factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                         original_max_seq_len=64),
}


@pytest.mark.parametrize("head_dim, theta", [(64, 500000.0), (16, 10000.0)])
@pytest.mark.parametrize("name", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(name, head_dim, theta):
    """Inverse frequencies and cos/sin tables against transformers' rope init
    functions (modeling_rope_utils.ROPE_INIT_FUNCTIONS) and its rotary embedding,
    which compute in float32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = ROPE_SCALINGS[name]
    params = {"rope_type": scaling.kind, "rope_theta": theta, "factor": scaling.factor}
    if scaling.kind == "llama3":
        params.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                      original_max_position_embeddings=scaling.original_max_seq_len)
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=4096, rope_parameters=params)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[scaling.kind](config)
    ours = ops.rope_inv_freq(head_dim, theta, scaling)
    assert_close(ours.astype(np.float32), inv_freq.numpy(), tol=(0.0, TOLERANCES["float32"][1]), name="inv_freq")
    assert not np.allclose(ours, ops.rope_inv_freq(head_dim, theta))  # the scaling changes something

    positions = 300
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, positions, head_dim), torch.arange(positions)[None])
    cos_ours, sin_ours = ops.rope_tables(positions, head_dim, theta, np.float32, scaling)
    assert_close(cos_ours, cos[0].numpy(), name="cos")
    assert_close(sin_ours, sin[0].numpy(), name="sin")
