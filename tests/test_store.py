"""The activation store counts exactly what it holds, and attention memory is linear in T."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from minilars import ops
from minilars.backends import get_backend
from minilars.config import preset
from minilars.methods import apply_full
from minilars.model import Model
from minilars.store import ActivationStore, Exact, Half, StoragePlan, Subspace, parse_policy

be = get_backend("numpy")


def _batch(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (b, t)), rng.integers(0, cfg.vocab_size, (b, t))


@pytest.mark.parametrize("method", ["frozen", "full"])
def test_store_bytes_equal_sum_of_held_arrays(method):
    cfg = preset("tiny")
    model = Model.random(cfg, seed=0)
    if method == "full":
        apply_full(model)
    tokens, targets = _batch(cfg, 2, 24)
    tape = model.forward(tokens, targets)
    held = tape.store.held_arrays()
    assert tape.store.bytes_now == sum(a.nbytes for a in held) > 0
    assert len({id(a) for a in held}) == len(held)
    # every kept cache field is among the held buffers (nothing kept behind the store's back)
    assert tape.store.bytes_peak >= tape.store.bytes_now
    model.backward(tape)
    assert tape.store.bytes_now == 0 and tape.store.held_arrays() == []


def test_frozen_store_holds_exactly_the_lars_md_table():
    """Frozen path per token per block: RMSNorm x + rstd twice (2d + 2), attention
    q k v o lse (2 H*hd + 2k + H), SwiGLU gate|up (2f); plus final norm (d + 1) and
    the head's dx (d) once. float32 = 4 bytes."""
    cfg = preset("tiny")
    model = Model.random(cfg, seed=0)
    b, t = 2, 24
    tape = model.forward(*_batch(cfg, b, t))
    per_block = (2 * cfg.dim + 2) + (2 * cfg.q_dim + 2 * cfg.kv_dim + cfg.n_heads) + 2 * cfg.ffn_dim
    expected = b * t * 4 * (cfg.n_layers * per_block + (cfg.dim + 1) + cfg.dim)
    assert tape.store.bytes_now == expected


def test_attention_store_peak_is_linear_in_t():
    cfg = preset("tiny")
    model = Model.random(cfg, seed=0, attention_tile=16)
    peaks = {}
    for t in (32, 128):
        tape = model.forward(*_batch(cfg, 1, t))
        peaks[t] = tape.store.peak_by_kind()["attn"]
        model.backward(tape)
    assert peaks[128] == 4 * peaks[32]  # exactly linear: q, k, v, o, lse per token


def test_attention_kernel_transient_memory_is_not_quadratic():
    """tracemalloc sees numpy's buffers: forward + backward at 4x the tokens must
    need far less than 16x the memory (a (T, T) score matrix would)."""
    rng = np.random.default_rng(0)
    h, n_kv, hd, tile = 4, 2, 8, 32
    peak = {}
    for t in (256, 1024):
        q, k, v = (rng.standard_normal((1, t, n, hd)).astype(np.float32) for n in (h, n_kv, n_kv))
        do = rng.standard_normal(q.shape).astype(np.float32)
        tracemalloc.start()
        o, cache = ops.attention_forward(q, k, v, tile, be)
        ops.attention_backward(do, cache, tile, be)
        peak[t] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        scores = h * t * t * 4
        assert peak[t] < scores or t == 256
    assert peak[1024] < 6 * peak[256]


def test_policies_parse_and_plan_lookup():
    assert parse_policy("exact") == Exact()
    assert parse_policy(" subspace( 8 ) ") == Subspace(8)
    assert parse_policy("subspace(4, calibration)") == Subspace(4, "calibration")
    for bad in ("subspace", "half(3)", "bogus", "subspace(0)"):
        with pytest.raises(ValueError):
            parse_policy(bad)
    plan = StoragePlan.from_mapping({"attn.q": "half", "mlp.*": "subspace(4)", "*": "exact"})
    assert plan.policy_for("attn.q") == Half()
    assert plan.policy_for("attn.k") == Exact()
    assert plan.policy_for("mlp.gate_up") == Subspace(4)
    with pytest.raises(ValueError, match="block-level"):
        StoragePlan.from_mapping({"attn.q": "recompute"})


def test_half_and_subspace_fields_are_counted_at_their_stored_size():
    n, width, r = 40, 16, 3
    x = np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)
    from minilars.ops import LinearCache
    for policy, nbytes in (("half", n * width * 2), ("subspace(3)", (n * r + width * r) * 4)):
        store = ActivationStore(be, StoragePlan.from_mapping({"site.x": policy}))
        store.n_tokens = n
        store.keep("site", LinearCache(x))
        assert store.bytes_now == nbytes == sum(a.nbytes for a in store.held_arrays())
        back = store.take("site").x
        assert back.shape == x.shape and back.dtype == x.dtype and store.bytes_now == 0


def test_taking_twice_or_keeping_twice_is_an_error():
    from minilars.ops import LinearCache
    store = ActivationStore(be)
    store.keep("a", LinearCache(np.ones((2, 2))))
    with pytest.raises(KeyError, match="already holds"):
        store.keep("a", LinearCache(np.ones((2, 2))))
    store.take("a")
    with pytest.raises(KeyError, match="holds nothing"):
        store.take("a")


@pytest.mark.parametrize("rules, warned", [({"*": "subspace(8)"}, True), ({"attn.*": "subspace(8, calibration)"}, True),
                                           ({"attn.k": "subspace(8)"}, True), ({"mlp.*": "subspace(8)"}, False),
                                           ({"attn.v": "subspace(8)", "attn.q": "half"}, False)])
def test_subspace_storage_of_attention_scores_inputs_warns(rules, warned):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StoragePlan.from_mapping(rules)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert bool(messages) == warned
    if warned:
        assert "exp(S - lse)" in messages[0]
