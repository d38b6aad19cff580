"""Sanity checks of the torch reference itself, independent of the engine.

If the reference were wrong, every engine test compared against it would be
meaningless, so these tests pin its maths with invariants that need no engine:
causality, GQA == MHA with repeated kv weights, RoPE identity and relativity,
adapter no-op initialisations, merged == unmerged, and a PEFT-format round trip.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402

from minilars.config import preset  # noqa: E402
from torch_reference import (  # noqa: E402
    ReferenceLlama, apply_rope, hf_param_shapes, random_state, reference_adamw_steps, rope_cos_sin,
)

CFG = preset("tiny")  # V 97, d 32, 2 layers, H 4, Hkv 2, f 64
ATOL = 1e-10  # float64 throughout


@pytest.fixture(scope="module")
def state():
    return random_state(CFG, seed=0)


def tokens(B=2, T=9, seed=1, cfg=CFG):
    return torch.as_tensor(np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T)))


def assert_close(a, b, atol=ATOL):
    # numpy, not torch.testing: its first call costs a second of imports.
    a, b = (v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in (a, b))
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_names_are_hf(tie):
    cfg = CFG.with_(tie_embeddings=tie)
    model = ReferenceLlama(cfg, random_state(cfg, seed=0))
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == hf_param_shapes(cfg)
    assert ("lm_head.weight" in model.params()) == (not tie)
    logits = model(tokens())
    assert logits.shape == (2, 9, cfg.vocab_size) and logits.dtype == torch.float64
    assert 0.1 < logits.std().item() < 10  # random_state keeps activations O(1)


def test_causal(state):
    model = ReferenceLlama(CFG, state)
    x = tokens()
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % CFG.vocab_size
    lx, ly = model(x).detach(), model(y).detach()
    assert_close(lx[:, :5], ly[:, :5])
    assert (lx[:, 5:] - ly[:, 5:]).abs().amax(dim=-1).min() > 1e-6  # every later position sees the change


def test_gqa_equals_mha_with_repeated_kv(state):
    group = CFG.n_heads // CFG.n_kv_heads
    mha_cfg = CFG.with_(n_kv_heads=CFG.n_heads)
    mha_state = dict(state)
    for i in range(CFG.n_layers):
        for m in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{m}.weight"
            w = state[name].reshape(CFG.n_kv_heads, CFG.head_dim, CFG.dim)  # rows grouped by kv head
            mha_state[name] = np.repeat(w, group, axis=0).reshape(CFG.q_dim, CFG.dim)  # head h gets kv head h // group
    x = tokens()
    assert_close(ReferenceLlama(CFG, state)(x), ReferenceLlama(mha_cfg, mha_state)(x))


def test_rope_position_zero_is_identity_and_attention_is_relative(state):
    x = torch.randn(3, 1, CFG.head_dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(1, CFG.head_dim, CFG.rope_theta)
    assert_close(apply_rope(x, cos, sin), x)
    # RoPE only encodes offsets between positions, so shifting every position changes nothing.
    model = ReferenceLlama(CFG, state)
    assert_close(model(tokens()), model(tokens(), position_offset=7), atol=1e-9)


def test_rope_pairs_halves_with_hf_frequencies():
    hd, theta = CFG.head_dim, 500.0
    cos, sin = rope_cos_sin(4, hd, theta)
    x = torch.zeros(4, hd, dtype=torch.float64)
    x[:, 1] = 1.0  # unit vector in pair (1, 1 + hd/2), frequency theta^(-2/hd)
    y = apply_rope(x, cos, sin)
    angle = torch.arange(4, dtype=torch.float64) * theta ** (-2 / hd)
    assert_close(y[:, 1], angle.cos())
    assert_close(y[:, 1 + hd // 2], angle.sin())


def test_loss_matches_cross_entropy_with_ignored_targets(state):
    model = ReferenceLlama(CFG, state)
    x = tokens()
    t = tokens(seed=2)
    t[0, :3] = -100
    ref = torch.nn.functional.cross_entropy(model(x).reshape(-1, CFG.vocab_size), t.reshape(-1), ignore_index=-100)
    assert_close(model.loss(x, t), ref)


def random_lora(rng, lin, r):
    return rng.standard_normal((r, lin.in_features)) * 0.3, rng.standard_normal((lin.out_features, r)) * 0.3


def test_fresh_adapters_leave_logits_unchanged(state):
    x = tokens()
    base = ReferenceLlama(CFG, state)(x)
    model = ReferenceLlama(CFG, state)
    rng = np.random.default_rng(3)
    for i in range(CFG.n_layers):
        for m in ("q", "v", "o", "gate"):
            A, B = random_lora(rng, model.linear(i, m), r=2)
            model.add_lora(i, m, A, np.zeros_like(B), scaling=2.0)
        for m in ("k", "up", "down"):
            lin = model.linear(i, m)
            model.add_ia3(i, m, np.ones(lin.in_features if m == "down" else lin.out_features))
    assert_close(model(x), base)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(0.1)
    assert (model(x) - base).abs().max() > 1e-4


def adapted_model(state, cfg=CFG, seed=4, r=3):
    """LoRA on q, v, o, gate and IA3 on k, up (output scaling) and down (input scaling), all non-trivial."""
    model = ReferenceLlama(cfg, state)
    rng = np.random.default_rng(seed)
    for i in range(cfg.n_layers):
        for m in ("q", "v", "o", "gate"):
            lin = model.linear(i, m)
            A, B = random_lora(rng, lin, r=min(r, lin.in_features, lin.out_features))
            model.add_lora(i, m, A, B, scaling=1.5)
        for m in ("k", "up", "down"):
            lin = model.linear(i, m)
            n = lin.in_features if m == "down" else lin.out_features
            model.add_ia3(i, m, 1 + 0.3 * rng.standard_normal(n))
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_merged_equals_unmerged(tie):
    cfg = CFG.with_(tie_embeddings=tie)
    state = random_state(cfg, seed=0)
    model = adapted_model(state, cfg)
    x = tokens()
    merged = model.merge_adapters()
    assert set(merged) == set(hf_param_shapes(cfg))
    assert_close(ReferenceLlama(cfg, merged)(x), model(x))
    assert (ReferenceLlama(cfg, state)(x) - model(x)).abs().max() > 1e-3  # the adapters do something


@pytest.mark.parametrize("changes", [dict(n_heads=1, n_kv_heads=1), dict(n_kv_heads=1),
                                     dict(head_dim=12, n_layers=1)], ids=["one-head", "mqa", "head_dim!=d/H"])
@pytest.mark.parametrize("T", [1, 5])
def test_edge_shapes_merge_and_prefix(changes, T):
    cfg = CFG.with_(**changes)
    state = random_state(cfg, seed=0)
    model = adapted_model(state, cfg, r=10**6)  # rank = full width of each adapted projection
    x = tokens(B=1, T=T)
    logits = model(x)
    assert logits.shape == (1, T, cfg.vocab_size) and torch.isfinite(logits).all()
    assert_close(ReferenceLlama(cfg, model.merge_adapters())(x), logits)
    assert_close(model(x[:, : T - 1]), logits[:, : T - 1])  # a prefix sees nothing of what follows


def test_ia3_shapes_follow_peft(state):
    model = adapted_model(state)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["model.layers.0.self_attn.k_proj.ia3_l"] == (CFG.kv_dim, 1)
    assert shapes["model.layers.0.mlp.up_proj.ia3_l"] == (CFG.ffn_dim, 1)
    assert shapes["model.layers.0.mlp.down_proj.ia3_l"] == (1, CFG.ffn_dim)
    assert shapes["model.layers.1.self_attn.q_proj.lora_A.weight"] == (3, CFG.dim)
    assert shapes["model.layers.1.self_attn.q_proj.lora_B.weight"] == (CFG.q_dim, 3)


def test_freeze_base_only_adapters_get_gradients(state):
    model = adapted_model(state)
    model.freeze_base()
    total, trainable = model.parameter_counts()
    print(f"reference adapters: {trainable} trainable of {total} parameters")
    loss, grads = model.loss_and_grads(tokens(), tokens(seed=2))
    adapter_names = {n for n in model.params() if "lora_" in n or n.endswith("ia3_l")}
    assert set(grads) == adapter_names and sum(g.size for g in grads.values()) == trainable
    assert all(p.grad is None for n, p in model.params().items() if n not in adapter_names)
    assert all(np.abs(g).max() > 0 for g in grads.values())
    model.unfreeze_base()  # full fine-tuning: every parameter is trainable again
    _, grads = model.loss_and_grads(tokens(), tokens(seed=2))
    assert set(grads) == set(model.params())


def write_peft_adapter(path, peft_type, config_fields, tensors):
    """A minimal PEFT writer, by hand from PEFT's documented format (not via the reference)."""
    config = {"peft_type": peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
              "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
              "layers_to_transform": None, **config_fields}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))


def test_peft_lora_round_trip(state, tmp_path):
    r, alpha = 2, 8.0  # scaling alpha / r = 4
    rng = np.random.default_rng(5)
    expected = ReferenceLlama(CFG, state)
    tensors = {}
    for i in range(CFG.n_layers):
        for m in ("q", "v", "down"):
            A, B = random_lora(rng, expected.linear(i, m), r)
            A, B = A.astype(np.float32), B.astype(np.float32)  # what the file holds
            expected.add_lora(i, m, A, B, scaling=alpha / r)
            path = "self_attn" if m in ("q", "v") else "mlp"
            tensors[f"base_model.model.model.layers.{i}.{path}.{m}_proj.lora_A.weight"] = A
            tensors[f"base_model.model.model.layers.{i}.{path}.{m}_proj.lora_B.weight"] = B
    write_peft_adapter(tmp_path, "LORA", {"r": r, "lora_alpha": alpha, "use_rslora": False, "use_dora": False,
                                          "bias": "none", "lora_dropout": 0.0,
                                          "target_modules": ["q_proj", "v_proj", "down_proj"]}, tensors)
    loaded = ReferenceLlama(CFG, state)
    loaded.load_peft_adapter(tmp_path)
    assert loaded.adapter_sites() == expected.adapter_sites()
    assert_close(loaded(tokens()), expected(tokens()))


def test_peft_ia3_round_trip(state, tmp_path):
    rng = np.random.default_rng(6)
    expected = ReferenceLlama(CFG, state)
    tensors = {}
    for i in range(CFG.n_layers):
        k = (1 + 0.3 * rng.standard_normal((CFG.kv_dim, 1))).astype(np.float32)  # output scaling (out, 1)
        down = (1 + 0.3 * rng.standard_normal((1, CFG.ffn_dim))).astype(np.float32)  # input scaling (1, in)
        expected.add_ia3(i, "k", k)
        expected.add_ia3(i, "down", down)
        tensors[f"base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l"] = k
        tensors[f"base_model.model.model.layers.{i}.mlp.down_proj.ia3_l"] = down
    write_peft_adapter(tmp_path, "IA3", {"target_modules": ["k_proj", "down_proj"],
                                         "feedforward_modules": ["down_proj"]}, tensors)
    loaded = ReferenceLlama(CFG, state)
    loaded.load_peft_adapter(tmp_path)
    assert_close(loaded(tokens()), expected(tokens()))
    # A wrongly shaped vector (output shape on a feed-forward module) is refused.
    tensors["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] = np.ones((CFG.dim, 1), np.float32)
    write_peft_adapter(tmp_path, "IA3", {"target_modules": ["k_proj", "down_proj"],
                                         "feedforward_modules": ["down_proj"]}, tensors)
    with pytest.raises(ValueError, match="PEFT stores"):
        ReferenceLlama(CFG, state).load_peft_adapter(tmp_path)


def test_adamw_steps_reduce_the_loss(state):
    x, t = tokens(), tokens(seed=2)
    model = adapted_model(state)
    model.freeze_base()
    losses = reference_adamw_steps(model, x, t, n_steps=5, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert losses[0] == pytest.approx(adapted_model(state).loss(x, t).item(), abs=1e-12)
