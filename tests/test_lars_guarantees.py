"""The guarantees of docs/lars.md, as property tests over shapes and ranks.

1. Adapter gradients are exact for every r.
2. subspace(r) at r = width gives full-backprop gradients; exact (and exact
   recompute) give them bit for bit.
3. A stored activation that lies in span(Q) comes back exactly.
4. Linear site: ||dW_hat - dW||_F <= ||X - X Q Q^T||_F * ||dY||_2.
5. The exported LoRA reproduces the LARS model's logits: test_model_reference.py
   (test_adapter_gradients_match_reference, LARS cases) loads the saved adapter in
   the independent torch reference.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tolerances import assert_close
from minilars.adapters import LARSSite
from minilars.backends import get_backend
from minilars.config import ModelConfig
from minilars.methods import MethodConfig, apply_method
from minilars.model import Model
from minilars.ops import LinearCache
from minilars.sites import FullSite
from minilars.store import ActivationStore, StoragePlan

be = get_backend("numpy")
seeds = st.integers(0, 2**31 - 1)


def orthonormal(rng, rows, cols):
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


@st.composite
def site_shapes(draw):
    d_in = draw(st.integers(1, 24))
    rank = draw(st.one_of(st.just(1), st.just(d_in), st.integers(1, d_in)))
    return draw(st.integers(1, 12)), d_in, rank, [draw(st.integers(1, 9)) for _ in range(draw(st.integers(1, 3)))]


@given(shapes=site_shapes(), seed=seeds)
def test_1_lars_adapter_gradient_is_exact_for_every_rank(shapes, seed):
    """dM from the kept z = xP equals P^T dW_eff, the gradient of W_eff = W + P M by
    full backprop with x stored (a FullSite on W_eff)."""
    n, d_in, rank, widths = shapes
    rng = np.random.default_rng(seed)
    outputs = {f"s{j}": w for j, w in enumerate(widths)}
    weight = rng.standard_normal((d_in, sum(widths)))
    site = LARSSite(weight, outputs, list(outputs), orthonormal(rng, d_in, rank), be)
    for m in site.M.values():
        m[...] = rng.standard_normal(m.shape)
    x, dy = rng.standard_normal((n, d_in)), rng.standard_normal((n, sum(widths)))
    y, cache = site.forward(x, be)
    assert cache.z.shape == (n, rank)  # all LARS keeps
    dx, grads = site.backward(dy, cache, be)
    full = FullSite(site.to_linear(be), outputs)
    y_full, full_cache = full.forward(x, be)
    dx_full, full_grads = full.backward(dy, full_cache, be)
    assert_close(y, y_full, name="y")
    assert_close(dx, dx_full, name="dx")
    for s in outputs:
        assert_close(grads[f"{s}.lars_M"], site.basis.T @ full_grads["weight"][:, site.slices[s]], name=s)


@given(shapes=site_shapes(), seed=seeds)
def test_merged_lars_site_computes_the_same_as_unmerged(shapes, seed):
    """merge() folds P M into W_eff for speed: y, dx and dM must not change (they are
    the same sums in another order), and unmerge() restores the rank-r path."""
    n, d_in, rank, widths = shapes
    rng = np.random.default_rng(seed)
    outputs = {f"s{j}": w for j, w in enumerate(widths)}
    targets = list(outputs)[:max(1, len(outputs) - 1)]  # a projection left frozen when there are several
    site = LARSSite(rng.standard_normal((d_in, sum(widths))), outputs, targets, orthonormal(rng, d_in, rank), be)
    for m in site.M.values():
        m[...] = rng.standard_normal(m.shape)
    x, dy = rng.standard_normal((n, d_in)), rng.standard_normal((n, sum(widths)))
    y, cache = site.forward(x, be)
    dx, grads = site.backward(dy, cache, be)
    site.merge(be)
    y_m, cache_m = site.forward(x, be)
    dx_m, grads_m = site.backward(dy, cache_m, be)
    y_applied_m = site.apply(x, be)
    site.unmerge()
    assert site.merged is None
    assert_close(y_m, y, name="y")
    assert_close(y_applied_m, y, name="apply (merged)")  # the keep-nothing forward: y without z
    assert_close(site.apply(x, be), y, name="apply")
    assert_close(dx_m, dx, name="dx")
    assert set(grads_m) == set(grads) == {f"{s}.lars_M" for s in targets}
    for name in grads:
        assert_close(grads_m[name], grads[name], name=name)


def test_a_stand_in_site_with_forward_alone_runs_in_a_keep_nothing_forward():
    """Forwards that keep nothing call site.apply; an object standing in for a site
    with only forward (tutorial 04's input recorder) must still run, and see the input."""

    class Recorder:
        def __init__(self, site):
            self.site, self.seen = site, None

        def forward(self, x, be):
            self.seen = x
            return self.site.forward(x, be)

    model = Model.random(TINY, seed=1, dtype=np.float64)
    tokens = np.arange(6)[None, :] % TINY.vocab_size
    reference = model.hidden(tokens)
    recorder = Recorder(model.sites[1]["mlp_out"])
    model.sites[1]["mlp_out"] = recorder
    np.testing.assert_array_equal(model.hidden(tokens), reference)
    assert recorder.seen.shape == (6, TINY.ffn_dim)


TINY = ModelConfig(vocab_size=31, dim=12, n_layers=2, n_heads=3, n_kv_heads=1, ffn_dim=20, max_seq_len=64)


@pytest.mark.parametrize("storage", [(), (("block", "recompute"), ("input.x", "half"))], ids=["exact", "default"])
def test_model_step_is_the_same_with_and_without_merged_blocks(storage, monkeypatch):
    """Model runs each block with its LARS sites merged; with merging switched off
    the loss and every gradient agree to float64 rounding, and no site stays merged."""
    import contextlib

    merges, original = [], LARSSite.merge
    monkeypatch.setattr(LARSSite, "merge", lambda site, be: (merges.append(site), original(site, be)))
    loss, grads = _grads(storage, mlp_chunk=4)  # the recomputed MLP runs in slices, all under one merge
    assert len(merges) == 2 * 4 * TINY.n_layers  # each block's 4 sites, in forward and in backward
    assert all(site.merged is None for site in merges)
    monkeypatch.setattr(Model, "_merged_block", lambda self, i: contextlib.nullcontext())
    loss_plain, grads_plain = _grads(storage, mlp_chunk=4)
    assert loss == pytest.approx(loss_plain, rel=1e-12)
    assert set(grads) == set(grads_plain)
    for name in grads:
        np.testing.assert_allclose(grads[name], grads_plain[name], rtol=1e-10, atol=1e-12, err_msg=name)


def _grads(storage, rank=4, seed=0, mlp_chunk=512):
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, TINY.vocab_size, (2, 9)), rng.integers(0, TINY.vocab_size, (2, 9))
    model = Model.random(TINY, seed=1, dtype=np.float64, attention_tile=4, mlp_chunk=mlp_chunk)
    apply_method(model, MethodConfig("lars", rank=rank, storage=storage), calibration_tokens=tokens)
    for p in model.trainable().values():
        p += 0.3 * np.random.default_rng(2).standard_normal(p.shape)
    tape = model.forward(tokens, targets)
    return tape.loss, model.backward(tape)


FULL_WIDTH = ("attn_norm.x", "attn.q", "attn.k", "attn.v", "attn.o", "mlp_norm.x", "mlp.gate_up",
              "attn_in.z", "attn_out.z", "mlp_in.z", "mlp_out.z", "head.dx")


def test_2_subspace_at_full_width_equals_full_backprop():
    loss_exact, exact = _grads(())
    # rank 64 >= every width: each field is kept as C = X Q with Q a random rotation
    loss_sub, sub = _grads(tuple((key, "subspace(64)") for key in FULL_WIDTH))
    assert loss_sub == loss_exact
    for name in exact:
        assert_close(sub[name], exact[name], name=name)


def test_2_exact_recompute_is_bit_identical_to_exact_storage():
    _, exact = _grads(())
    _, recompute = _grads((("block", "recompute"),))
    for name in exact:
        assert np.array_equal(recompute[name], exact[name]), name


def test_2_recompute_keeping_the_attention_output_skips_the_attention_forward(monkeypatch):
    """block=recompute with an attn.o rule keeps O and lse from the forward: backward
    runs the attention kernel's forward once per block, not twice, and with O kept
    exact the gradients are bit-identical to exact storage. Kept in float16, O's
    rounding reaches the gradients as the float16 block input's does."""
    from minilars import model as model_module

    calls = []
    original = model_module.attention_forward
    monkeypatch.setattr(model_module, "attention_forward", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    per_step = {}
    for name, storage in [("exact", ()), ("recompute", (("block", "recompute"),)),
                          ("kept", (("block", "recompute"), ("attn.o", "exact")))]:
        calls.clear()
        _grads(storage)
        per_step[name] = len(calls) - TINY.n_layers  # less calibration's forward, once per block
    assert per_step == {"exact": TINY.n_layers, "recompute": 2 * TINY.n_layers, "kept": TINY.n_layers}
    _, exact = _grads(())
    _, kept = _grads((("block", "recompute"), ("attn.o", "exact")), mlp_chunk=4)
    _, kept_unsliced = _grads((("block", "recompute"), ("attn.o", "exact")))
    for name in exact:
        assert np.array_equal(kept_unsliced[name], exact[name]), name
        assert_close(kept[name], exact[name], name=name)
    _, half_input = _grads((("block", "recompute"), ("input.x", "half")))
    _, half_both = _grads((("block", "recompute"), ("input.x", "half"), ("attn.o", "half")))
    for name in exact:
        assert_close(half_both[name], half_input[name], dtype="float16", name=name)
    assert any(not np.array_equal(half_both[name], half_input[name]) for name in exact)  # O was kept rounded


def test_2_recompute_in_token_slices_equals_exact_storage():
    """The recomputed MLP runs mlp_chunk tokens at a time (18 tokens in slices of 4, 4,
    4, 4, 2); the weight gradients are sums over the slices, equal up to rounding."""
    loss_exact, exact = _grads(())
    loss_sliced, sliced = _grads((("block", "recompute"), ("input.x", "half")), mlp_chunk=4)
    loss_half, half = _grads((("block", "recompute"), ("input.x", "half")))
    assert loss_sliced == pytest.approx(loss_exact, rel=1e-12)  # the loss's forward keeps nothing: sliced
    assert sorted(sliced) == sorted(exact)
    for name in exact:
        assert_close(sliced[name], half[name], name=name)


@given(n=st.integers(2, 30), width=st.integers(2, 20), data=st.data(), source=st.sampled_from(["batch", "calibration"]),
       seed=seeds)
def test_3_activation_in_span_is_stored_exactly(n, width, data, source, seed):
    rank = data.draw(st.integers(1, min(n, width)))
    rng = np.random.default_rng(seed)
    basis = orthonormal(rng, width, rank)
    x = rng.standard_normal((n, rank)) @ basis.T  # rows in span(basis)
    policy = f"subspace({rank}{', calibration' if source == 'calibration' else ''})"
    store = ActivationStore(be, StoragePlan.from_mapping({"site.x": policy}), bases={"site.x": basis})
    store.n_tokens = n
    store.keep("site", LinearCache(x))
    assert_close(store.take("site").x, x, tol=(1e-10, 1e-8), name="x_hat")


@given(n=st.integers(1, 30), width=st.integers(2, 20), d_out=st.integers(1, 10), data=st.data(), seed=seeds)
def test_4_weight_gradient_error_bound(n, width, d_out, data, seed):
    rank = data.draw(st.integers(1, width))
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((n, width)), rng.standard_normal((n, d_out))
    store = ActivationStore(be, StoragePlan.from_mapping({"site.x": f"subspace({rank})"}), seed=seed)
    store.n_tokens = n
    store.keep("site", LinearCache(x))
    x_hat = store.take("site").x  # X Q Q^T
    dw, dw_hat = x.T @ dy, x_hat.T @ dy
    bound = np.linalg.norm(x - x_hat) * np.linalg.norm(dy, 2)
    assert np.linalg.norm(dw_hat - dw) <= bound * (1 + 1e-9) + 1e-12


def test_backward_cache_is_the_cache_forward_keeps():
    """Recompute asks the down projection's site for its cache alone (no output);
    every kind of site must give exactly what its forward keeps."""
    from dataclasses import fields

    from minilars.adapters import IA3Site, LoRASite
    from minilars.sites import FrozenSite

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((7, 5))
    outputs = {"down": 5}
    sites = [FrozenSite(weight, outputs), FullSite(weight, outputs),
             LoRASite(weight, outputs, ["down"], 2, 4.0, rng, be), LoRASite(weight, outputs, [], 2, 4.0, rng, be),
             IA3Site(weight, outputs, ["down"], be, scale_input=True), IA3Site(weight, outputs, ["down"], be),
             LARSSite(weight, outputs, ["down"], orthonormal(rng, 7, 3), be), LARSSite(weight, outputs, [],
                                                                                         orthonormal(rng, 7, 3), be)]
    x = rng.standard_normal((6, 7))
    for site in sites:
        _, kept = site.forward(x, be)
        alone = site.backward_cache(x, be)
        assert (kept is None) == (alone is None), type(site).__name__
        if kept is not None:
            assert type(alone) is type(kept)
            for field in fields(kept):
                assert np.array_equal(getattr(alone, field.name), getattr(kept, field.name)), field.name
