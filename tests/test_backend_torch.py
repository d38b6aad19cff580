"""The torch backend against the NumPy reference (docs/lars.md guarantee 6).

First every kernel of TorchBackend (device cpu) on Hypothesis shapes, float32 and
float64, compared with NumpyBackend's on the same inputs through the one tolerance
table; then the whole tiny model: loss, logits and the gradient of every trainable
parameter by name, for each training method, and a few AdamW steps.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs PyTorch: pip install 'minilars[torch]'")

from hypothesis import example, given, strategies as st  # noqa: E402

from minilars.backends import get_backend  # noqa: E402
from minilars.methods import MethodConfig, apply_method  # noqa: E402
from minilars.model import Model  # noqa: E402
from minilars.ops import attention_options, rope_tables  # noqa: E402
from minilars.optim import AdamW, AdamWConfig  # noqa: E402
from minilars.store import StoragePlan  # noqa: E402
from backend_pairs import (CFG, DTYPES, SEEDS, batch, check_cross_entropy_head, check_geglu,  # noqa: E402
                           check_kv_cache_decoding, check_rmsnorm, family_batch, normal)
from minilars.models.families import FAMILIES, tiny_config  # noqa: E402
from tolerances import assert_close  # noqa: E402

NP = get_backend("numpy")
TB = get_backend("torch", device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These kernels are tiny: split over threads on a busy shared machine, each op
    would wait on OpenMP barriers far longer than it computes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def both(kernel: str, *args, **kwargs):
    """Run one kernel on both backends: numpy arrays as given, torch on copies."""
    ref = getattr(NP, kernel)(*args, **kwargs)
    out = getattr(TB, kernel)(*[TB.asarray(a.copy()) if isinstance(a, np.ndarray) else a for a in args], **kwargs)
    return out, ref


def check(actual, reference, name: str) -> None:
    """Same dtype and device, then same values within the dtype's tolerance."""
    if reference is None:
        assert actual is None, f"{name}: expected None"
        return
    assert isinstance(actual, torch.Tensor) and actual.device.type == "cpu", f"{name}: not a cpu tensor"
    assert str(actual.dtype) == f"torch.{reference.dtype.name}", f"{name}: dtype {actual.dtype} != {reference.dtype}"
    assert_close(actual, reference, name=name)


# ---------------------------------------------------------------- arrays and dtypes
def test_arrays_dtypes_and_conversions():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = TB.asarray(x)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device == TB.device
    assert TB.asarray([1, 2]).dtype == torch.int64  # lists follow numpy's dtype rules
    assert TB.asarray(x, "float64").dtype == torch.float64
    assert TB.asarray(x, np.float16).dtype == torch.float16
    assert TB.asarray(t, TB.dtype("bfloat16")).dtype == torch.bfloat16
    readonly = x.copy()
    readonly.flags.writeable = False
    assert torch.equal(TB.asarray(readonly), t)
    assert torch.equal(TB.asarray(x[:, ::-1]), TB.asarray(x[:, ::-1].copy()))
    assert TB.dtype("bfloat16") == torch.bfloat16 and TB.dtype("int64") == torch.int64
    bf = TB.cast(t, TB.dtype("bfloat16"))
    assert TB.to_numpy(bf).dtype == np.float32 and np.array_equal(TB.to_numpy(bf), x)  # small ints are exact in bf16
    assert TB.nbytes(bf) == 12 and TB.nbytes(t) == 24
    assert TB.cast(t, torch.float32) is t
    assert TB.zeros((2, 3), TB.dtype("float64")).dtype == torch.float64
    assert TB.sum(t, axis=None, keepdims=True).shape == (1, 1)
    check(TB.sum(t, axis=0), x.sum(axis=0), "sum")
    check(TB.permute(TB.asarray(x.reshape(1, 2, 3)), (2, 0, 1)), x.reshape(1, 2, 3).transpose(2, 0, 1), "permute")
    check(TB.concat([t, t], axis=1), np.concatenate([x, x], axis=1), "concat")
    assert TB.norm_sq(t) == NP.norm_sq(x) == 55.0
    assert TB.norm_sq(bf) == 55.0  # low precision squares are summed in float32
    assert TB.isfinite(t) and not TB.isfinite(TB.asarray(np.array([1.0, np.inf])))
    assert TB.max_memory_allocated() is None and TB.memory_allocated() is None  # cpu: torch keeps no count
    TB.reset_peak_memory()
    TB.synchronize()


def test_kernels_never_record_autograd():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y, rstd = TB.rmsnorm_forward(x, w, 1e-5)
    dx, dw = TB.rmsnorm_backward(torch.randn(5, 4, dtype=torch.float64), x, w, rstd)
    for out in (y, rstd, dx, dw, TB.matmul(x, x.T), TB.swiglu_forward(x, x)):
        assert not out.requires_grad and out.grad_fn is None
    assert not TB.asarray(x).requires_grad


# ---------------------------------------------------------------- linear algebra
@given(n=st.integers(1, 20), m=st.integers(1, 20), k=st.integers(1, 20), low_weight=st.booleans(), dtype=DTYPES,
       seed=SEEDS)
def test_matmuls(n, m, k, low_weight, dtype, seed):
    rng = np.random.default_rng(seed)
    a, w = normal(rng, (n, m), dtype), normal(rng, (m, k), np.float16 if low_weight else dtype)  # float16 frozen weight
    check(*both("matmul", a, w), "matmul")
    check(*both("matmul_nt", normal(rng, (n, k), dtype), w), "matmul_nt")
    check(*both("matmul_tn", a, normal(rng, (n, k), dtype)), "matmul_tn")


@given(rank=st.integers(1, 8), extra_width=st.integers(1, 24), extra_rows=st.integers(0, 12), dtype=DTYPES, seed=SEEDS)
@example(rank=1, extra_width=1, extra_rows=0, dtype="float64", seed=0)
def test_orthonormal_range_spans_the_same_subspace(rank, extra_width, extra_rows, dtype, seed):
    """x of exact rank r with singular values in [1, 2]: both backends find its row
    space. Their random sketches differ, so the bases Q differ by a rotation; the
    projectors Q Q^T must agree."""
    rng = np.random.default_rng(seed)
    width, n = rank + extra_width, rank + extra_rows
    u = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((width, rank)))[0]
    x = (u * rng.uniform(1, 2, rank) @ v.T).astype(dtype)  # (n, width), rank r
    q, q_ref = both("orthonormal_range", x, rank, seed=3)
    assert q.shape == (width, rank) and str(q.dtype) == f"torch.{dtype}"
    check(q.T @ q, np.eye(rank, dtype=dtype), "Q^T Q")
    check(q @ q.T, q_ref @ q_ref.T, "projector")
    assert torch.equal(q, TB.orthonormal_range(TB.asarray(x), rank, seed=3))  # seeded: reproducible
    q, q_ref = both("orthonormal_range", x, width, seed=3)  # the whole space: an orthogonal matrix
    check(q @ q.T, np.eye(width, dtype=dtype), "Q Q^T at rank = width")
    check(q.T @ q, q_ref.T @ q_ref, "Q^T Q at rank = width")


# ---------------------------------------------------------------- ops
@given(vocab=st.integers(1, 12), n=st.integers(1, 30), d=st.integers(1, 8), dtype=DTYPES, seed=SEEDS)
def test_embedding(vocab, n, d, dtype, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n)  # repeats are likely: backward must accumulate them
    check(*both("embedding_forward", normal(rng, (vocab, d), dtype), tokens), "embedding")
    check(*both("embedding_backward", normal(rng, (n, d), dtype), tokens, vocab), "dtable")


@given(n=st.integers(1, 20), d=st.integers(1, 64), dtype=DTYPES, seed=SEEDS)
def test_rmsnorm(n, d, dtype, seed):
    check_rmsnorm(both, check, n, d, dtype, seed)


@given(b=st.integers(1, 2), t=st.integers(1, 12), heads=st.integers(1, 4), half=st.integers(1, 32), dtype=DTYPES,
       seed=SEEDS)
def test_rope(b, t, heads, half, dtype, seed):
    rng = np.random.default_rng(seed)
    cos, sin = rope_tables(t, 2 * half, 10000.0, np.float64)  # float64 tables, as the model keeps them
    x = normal(rng, (b, t, heads, 2 * half), dtype)
    check(*both("rope_forward", x, cos, sin), "rope")
    check(*both("rope_backward", x, cos, sin), "rope backward")


@given(n=st.integers(1, 20), f=st.integers(1, 40), dtype=DTYPES, seed=SEEDS)
def test_swiglu(n, f, dtype, seed):
    rng = np.random.default_rng(seed)
    g, u, dh = normal(rng, (n, f), dtype, 4.0), normal(rng, (n, f), dtype), normal(rng, (n, f), dtype)
    check(*both("swiglu_forward", g, u), "h")
    (dg, du), (dg_ref, du_ref) = both("swiglu_backward", dh, g, u)
    check(dg, dg_ref, "dg")
    check(du, du_ref, "du")


@given(n=st.integers(1, 20), f=st.integers(1, 40), dtype=DTYPES, seed=SEEDS)
def test_geglu(n, f, dtype, seed):
    check_geglu(both, check, n, f, dtype, seed)


ATTENTION = dict(b=st.integers(1, 2), t=st.integers(1, 24), n_kv=st.integers(1, 2), group=st.sampled_from([1, 3, 9]),
                 half=st.integers(1, 32), tile=st.integers(2, 9), window=st.one_of(st.none(), st.integers(1, 12)),
                 scale=st.sampled_from([None, 0.3]), dtype=DTYPES, seed=SEEDS)


def attention_inputs(rng, b, tq, tk, n_kv, group, hd, dtype):
    return (normal(rng, (b, tq, n_kv * group, hd), dtype), normal(rng, (b, tk, n_kv, hd), dtype),
            normal(rng, (b, tk, n_kv, hd), dtype))


@given(q_offset=st.integers(0, 10), **ATTENTION)
@example(q_offset=0, b=1, t=1, n_kv=1, group=1, half=1, tile=2, window=None, scale=None, dtype="float64",
         seed=0)  # T = 1, one head
@example(q_offset=0, b=1, t=23, n_kv=1, group=9, half=32, tile=5, window=None, scale=None, dtype="float32",
         seed=1)  # GQA 9, hd 64
@example(q_offset=7, b=2, t=3, n_kv=2, group=3, half=4, tile=4, window=None, scale=None, dtype="float64",
         seed=2)  # decode-like: Tq < Tk
@example(q_offset=5, b=1, t=19, n_kv=2, group=3, half=8, tile=4, window=6, scale=0.3, dtype="float32",
         seed=3)  # a sliding window shorter than T, several key tiles skipped
def test_attention_forward(q_offset, b, t, n_kv, group, half, tile, window, scale, dtype, seed):
    """Query i sits at position q_offset + i of Tk = q_offset + Tq keys."""
    q, k, v = attention_inputs(np.random.default_rng(seed), b, t, q_offset + t, n_kv, group, 2 * half, dtype)
    (o, lse), (o_ref, lse_ref) = both("attention_forward", q, k, v, tile, q_offset=q_offset,
                                      **attention_options(window, scale))
    check(o, o_ref, "o")
    check(lse, lse_ref, "lse")


@given(**ATTENTION)
@example(b=1, t=1, n_kv=1, group=1, half=1, tile=2, window=None, scale=None, dtype="float64", seed=0)
@example(b=1, t=23, n_kv=1, group=9, half=32, tile=5, window=None, scale=None, dtype="float32", seed=1)
@example(b=2, t=21, n_kv=2, group=3, half=8, tile=4, window=5, scale=0.3, dtype="float64", seed=2)
def test_attention_backward(b, t, n_kv, group, half, tile, window, scale, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v = attention_inputs(rng, b, t, t, n_kv, group, 2 * half, dtype)
    options = attention_options(window, scale)
    o, lse = NP.attention_forward(q, k, v, tile, **options)
    do = normal(rng, o.shape, dtype)  # a random upstream gradient
    grads, refs = both("attention_backward", do, q, k, v, o, lse, tile, **options)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, refs):
        check(g, ref, name)


@given(n=st.integers(1, 30), d=st.integers(1, 8), vocab=st.integers(2, 40), chunk=st.integers(1, 13),
       ignored=st.sampled_from([0.0, 0.3, 1.0]), need_dx=st.booleans(), need_dhead=st.booleans(),
       softcap=st.sampled_from([None, 2.0]), dtype=DTYPES, seed=SEEDS)
@example(n=7, d=3, vocab=5, chunk=3, ignored=0.3, need_dx=True, need_dhead=True, softcap=None, dtype="float64", seed=0)
@example(n=9, d=4, vocab=6, chunk=4, ignored=0.3, need_dx=True, need_dhead=True, softcap=2.0, dtype="float64", seed=0)
def test_cross_entropy_head(n, d, vocab, chunk, ignored, need_dx, need_dhead, softcap, dtype, seed):
    rng = np.random.default_rng(seed)
    x, head = normal(rng, (n, d), dtype, 2.0), normal(rng, (vocab, d), dtype)
    targets = np.where(rng.random(n) < ignored, -100, rng.integers(0, vocab, n))
    check_cross_entropy_head(both, check, x, head, targets, chunk, need_dx, need_dhead, dtype, softcap)


@given(n=st.integers(1, 12), vocab=st.integers(1, 30), cap=st.sampled_from([0.5, 30.0]), dtype=DTYPES, seed=SEEDS)
def test_softcap(n, vocab, cap, dtype, seed):
    check(*both("softcap", normal(np.random.default_rng(seed), (n, vocab), dtype, 10.0), cap), "softcap")


@given(shape=st.sampled_from([(1,), (7,), (3, 5)]), weight_decay=st.sampled_from([0.0, 0.1]), dtype=DTYPES, seed=SEEDS)
def test_adamw_matches_numpy_and_torch_optim(shape, weight_decay, dtype, seed):
    rng = np.random.default_rng(seed)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
    p_ref = normal(rng, shape, dtype)
    p = TB.asarray(p_ref.copy())
    state_ref = [np.zeros_like(p_ref), np.zeros_like(p_ref)]
    state = [TB.zeros_like(p), TB.zeros_like(p)]
    p_optim = torch.tensor(p_ref.copy(), requires_grad=True)
    optim = torch.optim.AdamW([p_optim], lr=hyper["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                              foreach=False)
    for step in range(1, 4):
        g = normal(rng, shape, dtype)
        NP.adamw_update(p_ref, g, *state_ref, step=step, **hyper)
        TB.adamw_update(p, TB.asarray(g.copy()), *state, step=step, **hyper)
        p_optim.grad = torch.tensor(g)
        optim.step()
    check(p, p_ref, "p vs numpy")
    check(state[0], state_ref[0], "m")
    check(state[1], state_ref[1], "v")
    assert_close(p, p_optim.detach(), name="p vs torch.optim.AdamW")


# ---------------------------------------------------------------- the whole model
# Methods compared across backends; add a name here when a method lands in minilars/methods.py.
METHODS = ["full", "frozen", "lora", "ia3", "lars"]


def model_pair(method: str, plan: dict | None = None, seed: int = 0, cfg=CFG):
    """The same float64 tiny model on numpy and on torch, trained by `method`, every
    trainable array moved off its initial value (a fresh LoRA B or LARS M is zero,
    which would make their partner's gradient trivially zero on both backends)."""
    reference = Model.random(cfg, seed, dtype=np.float64, backend="numpy", attention_tile=4, loss_chunk=5)
    params = {name: NP.to_numpy(p).copy() for name, p in reference.params.items()}
    model = Model(cfg, params, backend="torch", compute_dtype="float64", attention_tile=4, loss_chunk=5)
    config = MethodConfig.lars_default(rank=4) if method == "lars" else MethodConfig(method, rank=4)
    calibration = family_batch(cfg, seed=7)[0]
    for m in (reference, model):
        apply_method(m, config, calibration_tokens=calibration)
    if method == "lars":  # the randomized range finder sketches differently per backend: share numpy's bases
        for block, block_ref in zip(model.sites, reference.sites):
            for stream, site in block.items():
                if hasattr(site, "basis"):
                    site.basis = TB.asarray(NP.to_numpy(block_ref[stream].basis).copy())
    rng = np.random.default_rng(seed + 1)
    trainable = model.trainable()
    for name, p_ref in sorted(reference.trainable().items()):
        p_ref += 0.05 * rng.standard_normal(p_ref.shape)
        trainable[name].copy_(torch.from_numpy(p_ref))
    if plan is not None:
        model.plan = reference.plan = StoragePlan.from_mapping(plan)
    return model, reference


def assert_same_gradients(grads, grads_ref):
    assert sorted(grads) == sorted(grads_ref)
    for name, g in grads_ref.items():
        check(grads[name], g, name)


@pytest.mark.parametrize("method", METHODS)
def test_whole_model_loss_and_gradients_match_numpy(method):
    model, reference = model_pair(method)
    tokens, targets = batch()
    tape, tape_ref = model.forward(tokens, targets), reference.forward(tokens, targets)
    assert tape.n_labelled == tape_ref.n_labelled == 16
    assert_close(np.float64(tape.loss), np.float64(tape_ref.loss), name="loss")
    assert tape.store.bytes_peak == tape_ref.store.bytes_peak  # the store counts the same bytes
    grads, grads_ref = model.backward(tape, dloss=0.7), reference.backward(tape_ref, dloss=0.7)
    assert len(grads_ref) > 0 or method == "frozen"
    assert_same_gradients(grads, grads_ref)
    check(model.logits(tokens), reference.logits(tokens), "logits")


def test_kv_cache_decoding_matches_numpy():
    check_kv_cache_decoding(check, *model_pair("frozen"))


@pytest.mark.parametrize("method", ["full", "lora", "ia3", "lars"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_models_match_numpy(family, method):
    """Each family's tiny model (biases, q/k norm, (1 + w) and sandwich norms, GeGLU,
    sliding windows shorter than T, rope scaling): loss, store bytes, every gradient
    by name and the (soft-capped) logits agree with the NumPy reference."""
    cfg = tiny_config(family, final_softcap=20.0) if family == "gemma3" else tiny_config(family)
    model, reference = model_pair(method, cfg=cfg)
    tokens, targets = family_batch(cfg)
    tape, tape_ref = model.forward(tokens, targets), reference.forward(tokens, targets)
    assert_close(np.float64(tape.loss), np.float64(tape_ref.loss), name="loss")
    assert tape.store.bytes_peak == tape_ref.store.bytes_peak
    assert_same_gradients(model.backward(tape, dloss=0.7), reference.backward(tape_ref, dloss=0.7))
    check(model.logits(tokens), reference.logits(tokens), "logits")


@pytest.mark.parametrize("plan, mlp_chunk", [({"*": "half"}, 512), ({"block": "recompute"}, 512),
                                             ({"block": "recompute"}, 5), ({"attn.q": "subspace(18)"}, 512),
                                             ({"block": "recompute", "input.x": "half", "attn.o": "half"}, 5)],
                         ids=["half", "recompute", "recompute-in-mlp-slices", "subspace", "fast"])
def test_storage_policies_match_numpy(plan, mlp_chunk):
    """subspace(18) on 18 tokens spans every stored q exactly, so the two backends'
    different bases reconstruct the same activations. mlp_chunk 5 runs the
    recomputed MLP in slices of 5, 5, 5, 3 tokens (torch slices are views)."""
    model, reference = model_pair("full", plan)
    model.mlp_chunk = reference.mlp_chunk = mlp_chunk
    tokens, targets = batch()
    tape, tape_ref = model.forward(tokens, targets), reference.forward(tokens, targets)
    assert_close(np.float64(tape.loss), np.float64(tape_ref.loss), name="loss")
    assert tape.store.bytes_peak == tape_ref.store.bytes_peak
    assert_same_gradients(model.backward(tape), reference.backward(tape_ref))


def test_adamw_training_steps_match_numpy():
    model, reference = model_pair("full")
    config = AdamWConfig(lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)
    opt, opt_ref = AdamW(model.trainable(), model.be, config), AdamW(reference.trainable(), reference.be, config)
    for step in range(3):
        tokens, targets = batch(seed=10 + step)
        tape, tape_ref = model.forward(tokens, targets), reference.forward(tokens, targets)
        assert_close(np.float64(tape.loss), np.float64(tape_ref.loss), name=f"loss at step {step}")
        norm, norm_ref = opt.step(model.backward(tape)), opt_ref.step(reference.backward(tape_ref))
        assert_close(np.float64(norm), np.float64(norm_ref), name=f"grad norm at step {step}")
    for name, p in reference.trainable().items():
        check(model.trainable()[name], p, name)


@pytest.mark.parametrize("method", ["full", "lora", "lars"])
def test_bfloat16_model_tracks_float32(method):
    """Weights and compute in bfloat16 (what benchmarks/gpu_check.py runs): the loss
    and gradients stay within the bfloat16 tolerance of the float32 reference, and
    an optimizer step runs in place."""
    reference = Model.random(CFG, 0, dtype=np.float32, backend="numpy")
    params = {name: torch.from_numpy(NP.to_numpy(p)).to(torch.bfloat16) for name, p in reference.params.items()}
    model = Model(CFG, params, backend="torch", compute_dtype="bfloat16")
    config = MethodConfig(method, rank=4)
    calibration = batch(seed=7)[0]
    for m in (reference, model):
        apply_method(m, config, calibration_tokens=calibration)
    tokens, targets = batch()
    tape, tape_ref = model.forward(tokens, targets), reference.forward(tokens, targets)
    assert_close(np.float64(tape.loss), np.float64(tape_ref.loss), dtype="bfloat16", name="loss")
    grads, grads_ref = model.backward(tape), reference.backward(tape_ref)
    assert sorted(grads) == sorted(grads_ref)
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16, name
        if method != "lars":  # LARS bases come from different sketches: compare only dtypes and finiteness
            assert_close(g, grads_ref[name], dtype="bfloat16", name=name)
        assert TB.isfinite(g), name
    AdamW(model.trainable(), model.be).step(grads)


def test_importing_minilars_does_not_import_torch():
    code = ("import sys, minilars, minilars.model, minilars.methods, minilars.optim, minilars.backends\n"
            "from minilars.backends import get_backend\n"
            "get_backend('numpy')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
