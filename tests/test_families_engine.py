"""The one Model computing every family (issue 19) from its architecture description.

For each family's tiny model (models/families.py: tiny_config), on every backend,
in float64: the loss gradient of every trainable array, by name, for full, LoRA,
IA3 and LARS, against centred finite differences of the loss along random
directions (a random dloss); merged adapters give the logits of the adapted model;
generation with a KV cache gives the logits of one full forward when the sequence
is longer than the sliding window; the storage plans that recompute blocks give
the gradients of the plain plan; and logits, loss and every gradient by name agree
with tests/torch_reference.py's autograd (full, and LoRA, IA3 and LARS exported in
PEFT's format). The ops themselves are checked one by one in
tests/test_ops_gradients.py, the families against transformers in the loaders' tests.
"""
from __future__ import annotations

import numpy as np
import pytest

from backend_pairs import family_batch
from gradcheck import check_gradients
from minilars.methods import Method, MethodConfig, apply_method, register, unregister
from minilars.model import Model
from minilars.models.families import FAMILIES, tiny_config
from minilars.sites import FullSite
from minilars.weights import expected_shapes, from_hf, to_hf
from tolerances import assert_close

BACKENDS = ("numpy", "numba", "torch")
METHODS = ("full", "lora", "ia3", "lars")
SLIDING = ("mistral", "gemma3")  # families whose tiny model has sliding-window layers (window 8)


def backend_name(name: str) -> str:
    if name != "numpy":
        pytest.importorskip(name)
    return name


def family_cfg(family: str):
    """tiny_config, with Gemma's final soft cap on so the capped loss is in the graph."""
    return tiny_config(family, final_softcap=5.0) if family == "gemma3" else tiny_config(family)


def method_config(method: str) -> MethodConfig:
    """LARS recomputes blocks, as its default recipe does, but keeps their inputs
    exact (the default's input.x=half is a float16 approximation, checked in
    test_recomputed_blocks_give_the_plain_gradients)."""
    if method == "lars":
        return MethodConfig("lars", rank=4, storage=(("block", "recompute"),))
    return MethodConfig(method, rank=4)


def trained(family: str, method: str, backend: str = "numpy", **model_options) -> Model:
    """The family's tiny float64 model under `method`, every trainable array moved off
    its initial value (a fresh LoRA B or LARS M is zero, an IA3 scale one: their
    partners' gradients would be trivially zero)."""
    cfg = family_cfg(family)
    model = Model.random(cfg, 0, dtype=np.float64, backend=backend, attention_tile=3, loss_chunk=5,
                         **model_options)
    apply_method(model, method_config(method), calibration_tokens=family_batch(cfg, seed=7)[0])
    rng = np.random.default_rng(2)
    be = model.be
    for name, p in sorted(model.trainable().items()):
        p[...] = be.asarray(be.to_numpy(p) + 0.05 * rng.standard_normal(tuple(p.shape)))
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_gradient_by_finite_differences(family, method, backend):
    model = trained(family, method, backend_name(backend))
    be = model.be
    tokens, targets = family_batch(model.cfg)
    dloss = float(np.random.default_rng(3).uniform(0.5, 2.0))
    grads = model.backward(model.forward(tokens, targets), dloss=dloss)
    trainable = model.trainable()
    assert sorted(grads) == sorted(trainable)
    if method == "full":  # every parameter trains: biases, q/k norms and sandwich norms included
        assert sorted(trainable) == sorted(expected_shapes(model.cfg))
    # For numpy and for torch on cpu, to_numpy is a view: the finite differences
    # perturb the model's own arrays.
    inputs = {name: be.to_numpy(p) for name, p in trainable.items()}
    assert all(np.shares_memory(inputs[name], be.to_numpy(p)) for name, p in trainable.items())
    check_gradients(lambda: dloss * model.forward(tokens, targets, need_grad=False).loss,
                    {name: be.to_numpy(g) for name, g in grads.items()}, inputs, np.random.default_rng(4),
                    n_directions=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_adapters_give_the_same_logits(family, method, backend):
    """The adapter folded into plain weights (and, for IA3 on Qwen2's biased k and v,
    into the bias: (x W + b) l = x (W l) + b l) computes the adapted model; both
    differ from the base model."""
    model = trained(family, method, backend_name(backend))
    be = model.be
    tokens, _ = family_batch(model.cfg)
    logits = be.to_numpy(model.logits(tokens))
    merged = Model(model.cfg, model.merged_params(), backend=backend, compute_dtype="float64")
    assert_close(be.to_numpy(merged.logits(tokens)), logits, name="merged logits")
    base = Model(model.cfg, {name: be.to_numpy(p) for name, p in model.params.items()}, compute_dtype="float64")
    if method != "full":  # full trains the parameters themselves
        assert np.abs(base.logits(tokens) - logits).max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", SLIDING)
def test_kv_cache_generation_equals_one_forward_past_the_window(family, backend):
    """Prefill 5 tokens, then 3 at once, then one at a time up to 20 (> window 8):
    every step's logits equal those of one forward over the whole sequence."""
    model = trained(family, "lora", backend_name(backend))
    be = model.be
    assert model.cfg.sliding_window == 8
    tokens = np.random.default_rng(5).integers(0, model.cfg.vocab_size, (2, 20))
    whole = be.to_numpy(model.logits(tokens))
    kv = model.new_kv_cache(batch=2, max_len=24)
    steps = [slice(0, 5), slice(5, 8)] + [slice(t, t + 1) for t in range(8, 20)]
    pieces = [be.to_numpy(model.logits(tokens[:, s], kv)) for s in steps]
    assert kv.length == 20
    assert_close(np.concatenate(pieces, axis=1), whole, name="cached logits")
    assert_close(be.to_numpy(model.logits(tokens[:, :20], model.new_kv_cache(2), last_only=True)), whole[:, -1],
                 name="last")


@pytest.mark.parametrize("plan, mlp_chunk", [({"block": "recompute"}, 512), ({"block": "recompute"}, 5),
                                             ({"block": "recompute", "attn.o": "exact"}, 5),
                                             ({"block": "recompute", "input.x": "half"}, 512)],
                         ids=["recompute", "recompute-in-mlp-slices", "fast", "default-lars"])
@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_recomputed_blocks_give_the_plain_gradients(family, plan, mlp_chunk):
    """Recompute reruns the q/k norms, the windowed attention (or rebuilds its cache
    from the kept O and lse, keeping window and scale) and the sandwich norms, MLP
    slice by slice: the gradients of the plain plan, exactly (half: to float16's
    tolerance)."""
    from minilars.store import StoragePlan

    plain = trained(family, "full")
    recomputed = trained(family, "full", mlp_chunk=mlp_chunk)
    recomputed.plan = StoragePlan.from_mapping(plan)
    tokens, targets = family_batch(plain.cfg)
    grads = plain.backward(plain.forward(tokens, targets))
    tape = recomputed.forward(tokens, targets)
    grads_recomputed = recomputed.backward(tape)
    assert sorted(grads) == sorted(grads_recomputed)
    dtype = "float16" if "half" in plan.values() else "float64"
    for name, g in grads.items():
        assert_close(grads_recomputed[name], g, dtype=dtype, name=name)
    assert tape.store.bytes_now == 0


def test_the_store_keeps_what_the_description_adds_and_llama_keeps_nothing_new():
    """Gemma's q/k norm and sandwich-norm caches go through the store (counted); the
    LLaMA description keeps exactly the sites it kept before issue 19, and builds one
    pair of RoPE tables where Gemma's two rope bases build two."""
    kept = {}
    for family in ("llama", "gemma3"):
        model = trained(family, "lora")
        tape = model.forward(*family_batch(model.cfg))
        kept[family] = {key.split(".", 2)[2].rsplit(".", 1)[0] for key in tape.store.site_peak
                        if key.startswith("blocks.0.")}
        assert len(model._rope_cache) == (2 if family == "gemma3" else 1)
    assert kept["llama"] == {"attn_norm", "attn_in", "attn", "attn_out", "mlp_norm", "mlp_in", "mlp", "mlp_out"}
    assert kept["gemma3"] == kept["llama"] | {"q_norm", "k_norm", "attn_post_norm", "mlp_post_norm"}


def test_a_method_that_drops_the_bias_is_refused():
    class Unbiased(Method):
        name = "toy-unbiased"
        default_targets = ("q",)

        def adapter(self, weight, where):
            return FullSite(weight, where.outputs)  # forgets where.bias

    register(Unbiased)
    try:
        model = Model.random(tiny_config("qwen2"), 0)
        with pytest.raises(ValueError, match="dropped the bias of blocks.0.attn_in"):
            apply_method(model, MethodConfig(Unbiased.name))
        apply_method(Model.random(tiny_config("llama"), 0), MethodConfig(Unbiased.name))  # no bias to drop
    finally:
        unregister(Unbiased.name)


def test_lora_ia3_and_lars_leave_the_bias_frozen_and_full_trains_it():
    """PEFT's bias="none": the adapters' trainables hold no bias; full trains it."""
    for method in METHODS:
        names = trained("qwen2", method).trainable()
        assert any(n.endswith("attn_in.bias") for n in names) == (method == "full"), method


# ---------------------------------------------------------------- against the torch autograd reference
# tests/torch_reference.py restates each family from its transformers modeling file
# with HF names; weights.from_hf / to_hf carry parameters and gradients across.
def reference_pair(family: str, seed: int = 0):
    torch = pytest.importorskip("torch", reason="the independent reference model is written in torch")
    from torch_reference import ReferenceLlama, random_state

    cfg = family_cfg(family)
    state = random_state(cfg, seed=seed)
    model = Model(cfg, from_hf(cfg, dict(state), np.float64), compute_dtype="float64", attention_tile=3,
                  loss_chunk=5)
    return model, ReferenceLlama(cfg, state, dtype=torch.float64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_gradients_match_the_torch_reference(family):
    """Logits, loss and the gradient of every parameter by its HF name: the sandwich
    norms' places, q/k norms before RoPE, biases, (1 + w), GeGLU, the embedding
    scale, per-layer rope bases and scaling, windows and the soft cap, as the
    reference's autograd sees them."""
    model, ref = reference_pair(family)
    apply_method(model, "full")
    tokens, targets = family_batch(model.cfg)
    assert_close(model.logits(tokens), ref.forward(tokens).detach().numpy(), name="logits")
    tape = model.forward(tokens, targets)
    grads = to_hf(model.cfg, {name: np.asarray(g) for name, g in model.backward(tape).items()})
    ref_loss, ref_grads = ref.loss_and_grads(tokens, targets)
    assert_close(np.array(tape.loss), np.array(ref_loss), name="loss")
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        assert_close(grads[name], g, name=name)


@pytest.mark.parametrize("method", ["lora", "ia3", "lars"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_gradients_match_the_torch_reference(family, method, tmp_path):
    """The adapter, exported in PEFT's format and loaded onto the reference (LARS as
    the LoRA it equals), gives the same logits, loss and adapter gradients."""
    from minilars.peft_io import save_adapter
    from minilars.weights import HF_MODULE

    model, ref = reference_pair(family, seed=5)
    tokens, targets = family_batch(model.cfg, seed=6)
    apply_method(model, method_config(method), calibration_tokens=tokens)
    rng = np.random.default_rng(7)
    for p in model.trainable().values():
        p += 0.2 * rng.standard_normal(p.shape)
    save_adapter(model, tmp_path)
    ref.freeze_base()
    ref.load_peft_adapter(tmp_path)
    assert_close(model.logits(tokens), ref.forward(tokens).detach().numpy(), name="logits")
    tape = model.forward(tokens, targets)
    grads = model.backward(tape)
    ref_loss, ref_grads = ref.loss_and_grads(tokens, targets)
    assert_close(np.array(tape.loss), np.array(ref_loss), name="loss")
    suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lars_M": "lora_B.weight", "ia3_l": "ia3_l"}
    compared = set()
    for name, g in grads.items():
        _, layer, _, proj, kind = name.split(".")
        ref_name = f"model.layers.{layer}.{HF_MODULE[proj]}.{suffix[kind]}"
        g_ref = ref_grads[ref_name]
        assert_close(np.asarray(g).T if kind != "ia3_l" else np.asarray(g).reshape(g_ref.shape), g_ref, name=name)
        compared.add(ref_name)
    # LARS trains M alone: the reference's lora_A = P^T is the fixed basis
    assert compared == {n for n in ref_grads if method != "lars" or n.endswith("lora_B.weight")}
