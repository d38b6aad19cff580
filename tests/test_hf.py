"""minilars.hf: LARS on transformers models (issue 24).

Tiny random LlamaForCausalLM and Qwen2ForCausalLM built from their configs, float64
where the comparison is exact. References are computed by other routes: torch
autograd of the unfactored weight W + (P M)^T, peft's own LoRA with A = P^T frozen
and B = M^T, and the engine's calibrate() for the bases.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from minilars.hf import LarsConfig, LarsLinear, LarsLinearFunction, get_lars_model  # noqa: E402
from minilars.hf.loss import lars_causal_lm_loss  # noqa: E402
from minilars.hf.tokenwise import find_mlp  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 61
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def tiny_model(kind: str, dtype=torch.float64, seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True))
    else:  # qwen2: biases on q, k, v and an untied head
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))
    return model.to(dtype).eval()


def tokens(rows=2, seq_len=12, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, (rows, seq_len)))


def randomize_m(lars_model, seed=2):
    """M off zero, so every term of the adapter counts in the comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lars_model.lars_layers().values():
            layer.lars_M.copy_(0.3 * torch.randn(layer.lars_M.shape, generator=gen, dtype=layer.lars_M.dtype))


def reference_loss(logits, labels):
    """transformers' causal-LM loss, in the logits' own dtype (HF upcasts to float32)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def equivalent_lora(base, lars_model):
    """peft LoRA on `base` with lora_A = P^T (frozen), lora_B = M^T, scaling 1."""
    r = lars_model.lars_config.r
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0,
                                                      target_modules=PROJECTIONS))
    modules = dict(model.named_modules())
    for name, layer in lars_model.lars_layers().items():
        lora = modules[f"base_model.model.{name}"]
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(layer.lars_P.T)
            lora.lora_B["default"].weight.copy_(layer.lars_M.T)
        lora.lora_A["default"].weight.requires_grad_(False)
    return model


# ---------------------------------------------------------------- the LARS linear
@pytest.mark.parametrize("bias", [False, True])
def test_lars_linear_dm_and_dx_match_autograd_of_the_unfactored_weight(bias):
    gen = torch.Generator().manual_seed(0)
    B, T, d_in, d_out, r = 2, 5, 7, 6, 3
    x = torch.randn(B, T, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, generator=gen, dtype=torch.float64) if bias else None
    p, _ = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))
    m = torch.randn(r, d_out, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(B, T, d_out, generator=gen, dtype=torch.float64)  # random upstream gradient

    y = LarsLinearFunction.apply(x, w, b, p, m)
    saved = y.grad_fn.saved_tensors
    dx, dm = torch.autograd.grad(y, (x, m), dy)

    x_ref = x.detach().clone().requires_grad_(True)
    m_ref = m.detach().clone().requires_grad_(True)
    w_eff = w + (p @ m_ref).T  # the unfactored weight (d_out, d_in)
    y_ref = torch.nn.functional.linear(x_ref, w_eff, b)
    dx_ref, dm_ref = torch.autograd.grad(y_ref, (x_ref, m_ref), dy)

    assert y.shape == y_ref.shape and dm.shape == (r, d_out)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(dm, dm_ref, **TOL[torch.float64])
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float64])
    activations = [t for t in saved if t is not None and t.shape[0] in (B, B * T)]  # kept per token: (B, T, ...) or (B T, ...)
    assert [tuple(t.shape) for t in activations] == [(B * T, r)], "only z = x P (N, r) is kept, never x"
    # the same values laid out strided (T-major, as a gradient through a transpose arrives)
    x_strided = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    y_strided = LarsLinearFunction.apply(x_strided, w, b, p, m)
    dx_strided, dm_strided = torch.autograd.grad(y_strided, (x_strided, m), dy.transpose(0, 1).contiguous().transpose(0, 1))
    torch.testing.assert_close(y_strided, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(dx_strided, dx_ref, **TOL[torch.float64])
    torch.testing.assert_close(dm_strided, dm_ref, **TOL[torch.float64])


# ---------------------------------------------------------------- whole model against peft LoRA
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("storage", ["exact", "none"])
def test_whole_model_equals_peft_lora_with_a_fixed_at_p(kind, storage):
    base = tiny_model(kind)
    ids = tokens()
    lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4, layer_storage=storage), ids)
    randomize_m(lars)
    lora = equivalent_lora(copy.deepcopy(base), lars)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions count in neither

    lars.train()
    loss = lars(input_ids=ids, labels=labels).loss
    loss.backward()
    logits = lora(input_ids=ids).logits
    loss_ref = reference_loss(logits, labels)
    loss_ref.backward()

    torch.testing.assert_close(loss, loss_ref, **TOL[torch.float64])
    peft_modules = dict(lora.named_modules())
    for name, layer in lars.lars_layers().items():
        b_grad = peft_modules[f"base_model.model.{name}"].lora_B["default"].weight.grad  # (d_out, r)
        assert layer.lars_M.grad.shape == b_grad.T.shape
        torch.testing.assert_close(layer.lars_M.grad, b_grad.T, **TOL[torch.float64], msg=name)
    frozen = [n for n, p in lars.named_parameters() if p.grad is not None and "lars_M" not in n]
    assert not frozen, f"frozen weights got gradients: {frozen[:3]}"


def test_half_layer_storage_keeps_float16_layer_inputs_and_nothing_that_grows_with_width():
    """The default recipe's graph: per decoder layer its float16 input; no (T, f), (T, V) tensor."""
    base = tiny_model("llama", torch.float32)
    ids = tokens(rows=1, seq_len=16)
    lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4), ids)  # layer_storage="half"
    randomize_m(lars)
    lars.train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = lars(input_ids=ids, labels=ids).loss
    per_token = [t for t in saved if t.dim() >= 2 and t.shape[-2] == 16 or t.dim() >= 1 and t.shape[0] == 16]
    d = base.config.hidden_size
    assert max(t.numel() for t in per_token) <= 16 * d, [tuple(t.shape) for t in per_token]
    halves = [t for t in per_token if t.dtype == torch.float16]
    assert len(halves) == base.config.num_hidden_layers

    loss.backward()
    grads = {n: layer.lars_M.grad.clone() for n, layer in lars.lars_layers().items()}
    exact = get_lars_model(copy.deepcopy(base), LarsConfig(r=4, layer_storage="exact"), ids)
    randomize_m(exact)
    exact.train()
    exact(input_ids=ids, labels=ids).loss.backward()
    for name, layer in exact.lars_layers().items():
        err = (grads[name] - layer.lars_M.grad).norm() / layer.lars_M.grad.norm()
        assert err < 1e-2, (name, float(err))  # float16 rounding of the kept input, as the engine's `half`


# ---------------------------------------------------------------- the MLP in token chunks
def lars_step(base, ids, **config):
    """(loss, {name: dM}) of one LARS step with M randomized, layers recomputed."""
    lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4, layer_storage="exact", **config), ids)
    randomize_m(lars)
    lars.train()
    loss = lars(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: layer.lars_M.grad for name, layer in lars.lars_layers().items()}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlp_in_token_chunks_gives_the_loss_and_every_dm_of_the_whole_mlp(kind, dtype):
    base = tiny_model(kind, dtype)
    ids = tokens(rows=2, seq_len=13)  # 13 = 5 + 5 + 3: the last chunk is short
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else TOL[torch.float32]
    loss, grads = lars_step(base, ids, mlp_chunk_tokens=5)
    loss_ref, grads_ref = lars_step(base, ids, mlp_chunk_tokens=None)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert grads.keys() == grads_ref.keys() and any("mlp" in name for name in grads)
    for name, dm_ref in grads_ref.items():
        assert dm_ref.abs().max() > 0, name
        torch.testing.assert_close(grads[name], dm_ref, **tol, msg=name)


@pytest.mark.parametrize("chunk", [5, None])
def test_mlp_in_token_chunks_keeps_no_t_by_f_tensor(chunk):
    """Every tensor autograd saves in the step (forward, recompute, each chunk's
    backward): none has T = 16 rows of width f = 48 when chunked; the whole MLP has."""
    base = tiny_model("llama", torch.float32)
    T, f = 16, base.config.intermediate_size
    ids = tokens(rows=1, seq_len=T)
    lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4, mlp_chunk_tokens=chunk), ids)
    randomize_m(lars)
    lars.train()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        lars(input_ids=ids, labels=ids).loss.backward()
    rows = {s[1] for s in shapes if len(s) == 3 and s[2] == f}  # (B, rows, f) activations; weights are 2-d
    assert rows == ({T} if chunk is None else {5, T % 5}), shapes


def test_find_mlp_takes_the_layers_mlp_and_skips_token_mixing_ones():
    base = tiny_model("llama")
    layer = base.model.layers[0]
    assert find_mlp(layer) is layer.mlp
    assert find_mlp(base.model.layers) is None  # no MLP attribute: left whole, no error
    shifting = torch.nn.Module()
    shifting.feed_forward = torch.nn.Module()
    shifting.feed_forward.time_shift = torch.nn.ZeroPad2d((0, 0, 1, -1))  # RWKV's token shift
    assert find_mlp(shifting) is None


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_saved_adapter_reloads_in_peft_with_the_same_logits(kind, tmp_path):
    base = tiny_model(kind)
    ids = tokens()
    lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4), ids)
    randomize_m(lars)
    with torch.no_grad():
        logits = lars(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    lars.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        peft_logits = reloaded(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, logits, **TOL[torch.float64])
    assert (logits - base_logits).abs().max() > 1e-3, "the adapter changes the model"


def test_merge_and_unload_gives_a_plain_model_with_the_same_logits():
    base = tiny_model("llama")
    ids = tokens()
    lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4), ids)
    with torch.no_grad():
        torch.testing.assert_close(lars(input_ids=ids).logits, base(input_ids=ids).logits, **TOL[torch.float64])
    randomize_m(lars)
    with torch.no_grad():
        logits = lars(input_ids=ids).logits
    merged = lars.merge_and_unload()
    assert not any(isinstance(m, LarsLinear) for m in merged.modules())
    assert type(merged) is type(base) and "forward" not in merged.model.layers[0].__dict__
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, **TOL[torch.float64])


# ---------------------------------------------------------------- calibration
def test_bases_equal_the_engines_calibration():
    """Same tokens, same weights: minilars.hf's P spans what minilars.calibrate's does."""
    from minilars.calibrate import calibrate
    from minilars.config import preset
    from minilars.model import Model
    from minilars.weights import random_params, to_hf

    cfg = preset("tiny")
    params = random_params(cfg, seed=0, dtype=np.float32)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 16))
    engine_bases, _ = calibrate(Model(cfg, {k: v.copy() for k, v in params.items()}), ids, rank=4)

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=64, attn_implementation="eager"))
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_hf(cfg, params).items()},
                       strict=False)
    hf.tie_weights()
    lars = get_lars_model(hf, LarsConfig(r=4), torch.from_numpy(ids))
    layers = lars.lars_layers()
    module = {"attn_in": "self_attn.q_proj", "attn_out": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
              "mlp_out": "mlp.down_proj"}
    for key, engine_p in engine_bases.items():
        _, i, stream = key.split(".")
        p = layers[f"model.layers.{i}.{module[stream]}"].lars_P.double().numpy()
        overlap = np.linalg.norm(p.T @ engine_p.astype(np.float64)) ** 2 / 4
        assert overlap > 1 - 1e-4, (key, overlap)
    assert layers["model.layers.0.self_attn.q_proj"].lars_P is layers["model.layers.0.self_attn.v_proj"].lars_P
    assert len(lars.streams) == 4 * cfg.n_layers


def test_padding_is_left_out_of_calibration():
    base = tiny_model("llama")
    ids = tokens(rows=2, seq_len=12)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = ids.clone()
    padded[1, 6:] = 0  # pad token repeated: would pull directions if it counted
    a = get_lars_model(copy.deepcopy(base), LarsConfig(r=4), [{"input_ids": padded, "attention_mask": mask}])
    b = get_lars_model(copy.deepcopy(base), LarsConfig(r=4), [ids[:1], ids[1:, :6]])
    for name, layer in a.lars_layers().items():
        other = b.lars_layers()[name].lars_P
        overlap = float(torch.linalg.matrix_norm(layer.lars_P.T @ other) ** 2 / 4)
        assert overlap > 1 - 1e-6, (name, overlap)


def test_any_module_whose_targets_are_linear():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + self.out(torch.tanh(self.a(x)) * self.b(x))

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    toy = Toy().double()
    ids = tokens()
    lars = get_lars_model(copy.deepcopy(toy), LarsConfig(r=3, layer_storage="exact"), ids)
    assert sorted(map(sorted, lars.streams)) == [["blocks.0.a", "blocks.0.b"], ["blocks.0.out"],
                                                 ["blocks.1.a", "blocks.1.b"], ["blocks.1.out"]]
    randomize_m(lars)
    dy = torch.randn(2, 12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    lars.train()
    torch.autograd.backward(lars.base_model(ids), dy)
    merged = copy.deepcopy(lars).merge_and_unload()  # the unfactored reference: W + (P M)^T as leaves
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), lars.base_model(ids), **TOL[torch.float64])
    layers = lars.lars_layers()
    for name, layer in layers.items():
        linear = merged.get_submodule(name)
        linear.weight.requires_grad_(True)
    torch.autograd.backward(merged(ids), dy)
    for name, layer in layers.items():
        dw = merged.get_submodule(name).weight.grad  # (d_out, d_in)
        torch.testing.assert_close(layer.lars_M.grad, layer.lars_P.T @ dw.T, **TOL[torch.float64], msg=name)


# ---------------------------------------------------------------- loss, dtypes, Trainer
def test_chunked_loss_equals_the_whole_logits_loss():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, VOCAB, bias=False).double()
    hidden = torch.randn(2, 13, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = tokens(2, 13)
    labels[1, 4:] = -100
    dloss = 0.7
    loss = lars_causal_lm_loss(hidden, labels, head, chunk=5)
    (dh,) = torch.autograd.grad(loss * dloss, hidden)
    ref = reference_loss(head(hidden), labels)
    (dh_ref,) = torch.autograd.grad(ref * dloss, hidden)
    torch.testing.assert_close(loss, ref, **TOL[torch.float64])
    torch.testing.assert_close(dh, dh_ref, **TOL[torch.float64])


def test_bfloat16_trains_with_float32_adapters():
    base = tiny_model("qwen2", torch.float32)
    ids = tokens()
    ref = get_lars_model(copy.deepcopy(base), LarsConfig(r=4), ids)
    randomize_m(ref)
    low = get_lars_model(copy.deepcopy(base).to(torch.bfloat16), LarsConfig(r=4), ids)
    with torch.no_grad():
        for (_, a), (_, b) in zip(sorted(low.lars_layers().items()), sorted(ref.lars_layers().items())):
            assert a.lars_M.dtype == torch.float32 and a.lars_P.dtype == torch.float32
            a.lars_M.copy_(b.lars_M)
    for model in (ref, low):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    loss_ref = ref(input_ids=ids, labels=ids).loss
    loss_low = low(input_ids=ids, labels=ids).loss
    assert abs(float(loss_low.detach()) - float(loss_ref.detach())) < 0.05
    g_ref = torch.cat([m.lars_M.grad.reshape(-1) for _, m in sorted(ref.lars_layers().items())])
    g_low = torch.cat([m.lars_M.grad.reshape(-1) for _, m in sorted(low.lars_layers().items())])
    assert torch.nn.functional.cosine_similarity(g_ref, g_low, dim=0) > 0.99


def test_a_bfloat16_model_keeps_its_folded_delta_beside_the_weight():
    """bfloat16 would round P M away if added into W: refresh leaves W bit for bit and runs P_f M_f beside it."""
    base = tiny_model("qwen2", torch.float32).to(torch.bfloat16)
    ids = tokens()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
    lars = get_lars_model(base, LarsConfig(r=4), ids)
    randomize_m(lars)
    weights = {name: layer.base_layer.weight.clone() for name, layer in lars.lars_layers().items()}
    with torch.no_grad():
        before = lars(input_ids=ids).logits.float()
    lars.refresh(tokens(seed=5))
    with torch.no_grad():
        after = lars(input_ids=ids).logits.float()
    for name, layer in lars.lars_layers().items():
        assert not layer.folded_in_weight and torch.equal(layer.base_layer.weight, weights[name]), name
        assert layer.lars_M_folded.dtype == torch.float32
    assert (before - base_logits).abs().max() > 0.05, "the adapter counts"
    torch.testing.assert_close(after, before, rtol=0, atol=0.05)

def test_trainer_runs_steps_and_saves_the_adapter(tmp_path):
    base = tiny_model("llama", torch.float32)
    ids = tokens(rows=8, seq_len=12)
    lars = get_lars_model(base, LarsConfig(r=4), ids[:2])
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    from minilars.hf.trainer import LarsTrainer

    trainer = LarsTrainer(model=lars, args=args, train_dataset=data)  # transformers.Trainer, saving the adapter
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert all(float(m.lars_M.abs().max()) > 0 for m in lars.lars_layers().values()), "every M moved"
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama", torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, lars(input_ids=ids).logits, **TOL[torch.float32])



# ---------------------------------------------------------------- basis refresh (docs/lars.md Part 1.6)
@pytest.mark.parametrize("into_weight", [True, False])
def test_a_refreshed_layer_keeps_its_output_and_matches_autograd_of_the_summed_weight(into_weight):
    """P_f M_f added into the weight (float32 and wider, the default) or run beside it (16-bit)."""
    gen = torch.Generator().manual_seed(0)
    B, T, d_in, d_out, r = 2, 5, 7, 6, 3
    x = torch.randn(B, T, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    base = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
    p1, _ = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))
    p2, _ = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))
    m1 = torch.randn(r, d_out, generator=gen, dtype=torch.float64)
    m2 = torch.randn(r, d_out, generator=gen, dtype=torch.float64)
    dy = torch.randn(B, T, d_out, generator=gen, dtype=torch.float64)
    w0 = base.weight.detach().clone()
    layer = LarsLinear(base, p1, torch.float64)
    with torch.no_grad():
        layer.lars_M.copy_(m1)
        before = layer(x)
    layer.refresh(p2, layer.lars_P, into_weight=into_weight)  # the first refresh: P_f = P1
    assert layer.folded_in_weight is into_weight
    with pytest.raises(ValueError, match="one way"):
        layer.refresh(p2, layer.lars_P_folded, into_weight=not into_weight)
    assert float(layer.lars_M.abs().max()) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before, **TOL[torch.float64])
        layer.lars_M.copy_(m2)

    y = layer(x)
    kept = [t for t in y.grad_fn.saved_tensors if t is not None and t.shape[0] in (B, B * T)]
    dx, dm = torch.autograd.grad(y, (x, layer.lars_M), dy)
    x_ref = x.detach().clone().requires_grad_(True)
    m2_ref = m2.clone().requires_grad_(True)
    w_eff = w0 + (p1 @ m1 + p2 @ m2_ref).T  # W + (P1 M1 + P2 M2)^T, unfactored, from the original W
    y_ref = torch.nn.functional.linear(x_ref, w_eff, base.bias)
    dx_ref, dm_ref = torch.autograd.grad(y_ref, (x_ref, m2_ref), dy)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float64])
    torch.testing.assert_close(dm, dm_ref, **TOL[torch.float64])
    assert [tuple(t.shape) for t in kept] == [(B * T, r)], "still only z = x P is kept"
    a, b = layer.lora_tensors()
    torch.testing.assert_close(a, torch.cat([p1, p2], 1).T)
    torch.testing.assert_close(b, torch.cat([m1, m2]).T)
    merged = layer.merge()
    torch.testing.assert_close(merged.weight, w_eff.detach(), **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_refresh_keeps_the_logits_and_the_adapter_of_rank_2r_reloads_in_peft(kind, tmp_path):
    base = tiny_model(kind)
    ids = tokens()
    lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4), ids)
    randomize_m(lars)
    layers = lars.lars_layers()
    optimizer = torch.optim.AdamW([layer.lars_M for layer in layers.values()], lr=1e-3)
    lars.train()
    lars(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(layer.lars_M in optimizer.state for layer in layers.values())
    lars.eval()
    with torch.no_grad():
        before = lars(input_ids=ids).logits
    old_q = layers["model.layers.0.self_attn.q_proj"].lars_P

    lars.refresh(tokens(seed=5), optimizer)  # calibrated again on other tokens, through the trained model

    assert not any(layer.lars_M in optimizer.state for layer in layers.values()), "Adam's moments restart"
    assert all(float(layer.lars_M.abs().max()) == 0.0 for layer in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(lars(input_ids=ids).logits, before, **TOL[torch.float64])
    q, k = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.k_proj"]
    assert q.lars_P is k.lars_P and q.lars_P_folded is k.lars_P_folded, "one basis per stream, shared"
    assert q.lars_P_folded is old_q and not torch.allclose(q.lars_P, old_q)
    randomize_m(lars, seed=3)
    with torch.no_grad():
        logits = lars(input_ids=ids).logits
    lars.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 8)
    assert json.loads((tmp_path / "minilars_adapter.json").read_text())["refreshes"] == 1
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, **TOL[torch.float64])
        torch.testing.assert_close(lars.merge_and_unload()(input_ids=ids).logits, logits, **TOL[torch.float64])


def test_trainer_refreshes_at_the_engines_steps_once_per_accumulated_step(tmp_path, monkeypatch):
    from minilars.hf.model import LarsModel
    from minilars.hf.trainer import LarsTrainer

    base = tiny_model("llama", torch.float32)
    ids = tokens(rows=24, seq_len=12)
    lars = get_lars_model(base, LarsConfig(r=4), ids[:2])
    assert lars.refresh_steps(6) == {2, 4}  # k * 6 // 3, as the engine's --refreshes 2
    seen = []
    refresh = LarsModel.refresh

    def spy(self, calibration, optimizer=None):
        seen.append((trainer.state.global_step, tuple(calibration["input_ids"].shape)))
        return refresh(self, calibration, optimizer)

    monkeypatch.setattr(LarsModel, "refresh", spy)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = LarsTrainer(model=lars, args=args, train_dataset=data)
    trainer.train()
    assert seen == [(2, (2, 12)), (4, (2, 12))], "before steps 2 and 4, once each, on the step's batch"
    trainer.save_model(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 12  # r (2 + 1)
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama", torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, lars(input_ids=ids).logits, **TOL[torch.float32])

def test_bad_input_is_named():
    base = tiny_model("llama")
    with pytest.raises(TypeError, match="integer token ids"):
        get_lars_model(copy.deepcopy(base), LarsConfig(r=4), torch.rand(2, 8))
    with pytest.raises(ValueError, match="no module matches"):
        get_lars_model(copy.deepcopy(base), LarsConfig(r=4, target_modules=["nope"]), tokens())
    with pytest.raises(ValueError, match="larger than"):
        get_lars_model(copy.deepcopy(base), LarsConfig(r=33), tokens())
    with pytest.raises(ValueError, match="fewer than"):
        get_lars_model(copy.deepcopy(base), LarsConfig(r=8), tokens(rows=1, seq_len=4))
    with pytest.raises(ValueError, match="layer_storage"):
        LarsConfig(layer_storage="quarter")
    with pytest.raises(ValueError, match="cpu_mmap_threshold"):
        LarsConfig(cpu_mmap_threshold=0)
    with pytest.raises(ValueError, match="mlp_chunk_tokens"):
        LarsConfig(mlp_chunk_tokens=0)
    with pytest.raises(ValueError, match="refreshes"):
        LarsConfig(refreshes=-1)
    merged = get_lars_model(copy.deepcopy(base), LarsConfig(r=4), tokens())
    merged.merge_and_unload()
    with pytest.raises(RuntimeError, match="no LARS layers"):
        merged.refresh(tokens())


# ---------------------------------------------------------------- memory on the CPU
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_unpadded_training_step_runs_causal_sdpa_without_a_t_by_t_mask(kind, monkeypatch):
    """Forward and the layers' recompute call SDPA with attn_mask=None, is_causal=True (torch's
    flash CPU kernel, no (H, T, T) scores); a padded batch does pass a mask, so the spy sees masks."""
    base = tiny_model(kind, torch.float32, attn="sdpa")
    ids = tokens(rows=2, seq_len=12)
    lars = get_lars_model(base, LarsConfig(r=4), ids)
    randomize_m(lars)
    lars.train()
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal, torch.is_grad_enabled()))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lars(input_ids=ids, labels=ids).loss.backward()
    layers = base.config.num_hidden_layers
    assert calls == [(True, True, False)] * layers + [(True, True, True)] * layers  # forward, then recompute
    calls.clear()
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    lars(input_ids=ids, attention_mask=padded, labels=ids).loss.backward()
    assert calls and not any(no_mask for no_mask, _, _ in calls)


def test_cpu_model_fixes_the_glibc_mmap_threshold_unless_told_not_to(monkeypatch):
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module("minilars.hf.model"), "fix_mmap_threshold", seen.append)
    get_lars_model(tiny_model("llama"), LarsConfig(r=4), tokens())
    get_lars_model(tiny_model("llama"), LarsConfig(r=4, cpu_mmap_threshold=None), tokens())
    get_lars_model(tiny_model("llama"), LarsConfig(r=4, cpu_mmap_threshold=4096), tokens())
    assert seen == [1 << 20, 4096]


_MMAP_PROBE = """
import ctypes, sys, torch
from minilars.backends.resident import fix_mmap_threshold
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                "fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(1 << 20)
torch.empty(16 << 20, dtype=torch.uint8)  # made and freed: glibc raises its threshold to 16 MiB
before = libc.mallinfo2().hblkhd
kept = torch.empty(4 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)  # bytes of the 4 MiB tensor that are mmapped
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux")
                    or __import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_fixed_mmap_threshold_maps_blocks_that_glibc_would_put_on_its_heap():
    """The mechanism docs/hf.md measures: after a 16 MiB tensor is freed, glibc serves a 4 MiB one
    from its heap (where a freed block stays resident); with the threshold fixed, from mmap."""
    import subprocess
    import sys

    mapped = {arm: int(subprocess.run([sys.executable, "-c", _MMAP_PROBE, arm], capture_output=True, text=True,
                                      check=True).stdout.split()[-1]) for arm in ("default", "fixed")}
    assert mapped["default"] == 0, mapped
    assert mapped["fixed"] >= 4 << 20, mapped


def test_recomputed_layers_replay_the_dropout_masks_of_their_forward():
    """Attention dropout (p = 0.3, train mode) draws random masks: a layer rerun in
    backward must draw the same ones (minilars/hf/replay.py), or its dM would be taken
    through other masks than the loss. Recomputed ('exact') against plain autograd
    ('none'), the same seed before each forward: the same loss and every dM."""
    base = tiny_model("llama")
    base.config.attention_dropout = 0.3
    for layer in base.model.layers:
        layer.self_attn.attention_dropout = 0.3
    ids = tokens(rows=2, seq_len=12)
    results = []
    for storage in ("exact", "none"):
        lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4, layer_storage=storage), ids)
        randomize_m(lars)
        lars.train()
        torch.manual_seed(123)
        loss = lars(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {name: layer.lars_M.grad for name, layer in lars.lars_layers().items()}))
    (loss, grads), (loss_ref, grads_ref) = results
    torch.manual_seed(123)
    base.train()
    assert not torch.allclose(base(input_ids=ids, labels=ids).loss, base.eval()(input_ids=ids, labels=ids).loss)
    torch.testing.assert_close(loss, loss_ref, **TOL[torch.float64])
    for name, dm_ref in grads_ref.items():
        torch.testing.assert_close(grads[name], dm_ref, **TOL[torch.float64], msg=name)


def count_mlp_runs(lars_model) -> list:
    """A counter of the token positions the decoder layers' MLPs compute, chunks
    included: the rows each down_proj call sees (a module call fires its hooks; the
    MLP's own forward is called directly by the chunking)."""
    rows = [0]
    for layer in lars_model.base_model.model.layers:
        layer.mlp.down_proj.register_forward_hook(
            lambda module, args, out: rows.__setitem__(0, rows[0] + args[0].shape[-2]))
    return rows


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_a_layer_rerun_skips_the_mlp_values_only_when_nothing_after_it_keeps_them(kind):
    """llama's MLP output goes into a residual add (which keeps nothing): from the
    second step on, each layer's rerun gives its place zeros and the MLP runs twice per
    step (forward, the chunks' rerun), as under gradient checkpointing, not three
    times. Gemma 2 normalises the MLP output (post_feedforward_layernorm keeps it):
    the values are computed. Both: the loss and every dM of the whole MLP."""
    if kind == "llama":
        base = tiny_model("llama")
    else:
        torch.manual_seed(0)
        base = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_implementation="eager",
            sliding_window=8)).to(torch.float64).eval()
    ids = tokens(rows=2, seq_len=13)
    lars = get_lars_model(copy.deepcopy(base), LarsConfig(r=4, layer_storage="exact", mlp_chunk_tokens=5), ids)
    whole = get_lars_model(copy.deepcopy(base), LarsConfig(r=4, layer_storage="exact", mlp_chunk_tokens=None), ids)
    rows = count_mlp_runs(lars)
    for model in (lars, whole):
        randomize_m(model)
        model.train()
    for step in range(2):
        rows[0] = 0
        results = []
        for model in (lars, whole):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            results.append((loss.detach(), {n: layer.lars_M.grad for n, layer in model.lars_layers().items()}))
        (loss, grads), (loss_ref, grads_ref) = results
        torch.testing.assert_close(loss, loss_ref, **TOL[torch.float64])
        for name, dm_ref in grads_ref.items():
            torch.testing.assert_close(grads[name], dm_ref, **TOL[torch.float64], msg=f"step {step} {name}")
    skipped = [layer.mlp._lars_values_unused for layer in lars.base_model.model.layers]
    assert skipped == [kind == "llama"] * 2
    runs = 2 if kind == "llama" else 3  # the forward, [the layer's rerun,] the chunks' reruns
    assert rows[0] == runs * 13 * 2  # in the second step: 13 positions, 2 layers
