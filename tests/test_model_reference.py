"""The whole engine against the independent torch autograd reference (float64):
logits, loss and every trainable gradient by name, for full, LoRA, IA3 and LARS;
three AdamW steps for full fine-tuning; adapter invariants; PEFT export."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the independent reference model is written in torch")

from tolerances import assert_close  # noqa: E402
from torch_reference import ReferenceLlama, random_state, reference_adamw_steps  # noqa: E402

from minilars.config import preset  # noqa: E402
from minilars.methods import MethodConfig, apply_method  # noqa: E402
from minilars.model import Model  # noqa: E402
from minilars.optim import AdamW, AdamWConfig  # noqa: E402
from minilars.peft_io import save_adapter  # noqa: E402
from minilars.weights import HF_MODULE, from_hf, to_hf  # noqa: E402

CONFIGS = {"tiny": preset("tiny"), "tiny-untied-mha": preset("tiny").with_(tie_embeddings=False, n_kv_heads=4)}


def make_pair(cfg, seed=0):
    state = random_state(cfg, seed=seed)
    model = Model(cfg, from_hf(cfg, dict(state), np.float64), compute_dtype="float64", attention_tile=5, loss_chunk=7)
    return model, ReferenceLlama(cfg, state)


def batch(cfg, seed=1, b=2, t=13):
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, cfg.vocab_size, (b, t)), rng.integers(0, cfg.vocab_size, (b, t))
    targets[0, :4] = -100  # unlabelled prompt tokens
    return tokens, targets


def peft_name(engine_name: str) -> tuple[str, str]:
    """'blocks.1.attn_in.q.lora_A' -> ('model.layers.1.self_attn.q_proj.lora_A.weight', 'lora_A')."""
    _, layer, _, proj, kind = engine_name.split(".")
    suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lars_M": "lora_B.weight", "ia3_l": "ia3_l"}[kind]
    return f"model.layers.{layer}.{HF_MODULE[proj]}.{suffix}", kind


def as_reference_layout(kind: str, grad: np.ndarray, ref_shape) -> np.ndarray:
    return grad.T if kind in ("lora_A", "lora_B", "lars_M") else grad.reshape(ref_shape)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_model_logits_loss_and_every_gradient(name):
    cfg = CONFIGS[name]
    model, ref = make_pair(cfg)
    apply_method(model, "full")
    tokens, targets = batch(cfg)
    assert_close(model.logits(tokens), ref.forward(tokens).detach().numpy(), name="logits")
    tape = model.forward(tokens, targets)
    grads = model.backward(tape)
    ref_loss, ref_grads = ref.loss_and_grads(tokens, targets)
    assert_close(np.array(tape.loss), np.array(ref_loss), name="loss")
    engine_grads = to_hf(cfg, {k: np.asarray(v) for k, v in grads.items()})
    assert set(engine_grads) == set(ref_grads)
    for param, ref_grad in ref_grads.items():
        assert_close(engine_grads[param], ref_grad, name=param)


def test_three_adamw_steps_match_torch():
    cfg = CONFIGS["tiny"]
    model, ref = make_pair(cfg, seed=3)
    apply_method(model, "full")
    tokens, targets = batch(cfg, seed=4)
    settings = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=0.5)
    ref_losses = reference_adamw_steps(ref, tokens, targets, n_steps=3, **settings)
    opt = AdamW(model.trainable(), model.be, AdamWConfig(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                                                          weight_decay=0.1, max_grad_norm=0.5))
    losses = []
    for _ in range(3):
        tape = model.forward(tokens, targets)
        losses.append(tape.loss)
        opt.step(model.backward(tape))
    assert_close(np.array(losses), np.array(ref_losses), name="losses")
    final = to_hf(cfg, {k: np.asarray(v) for k, v in model.params.items()})
    for param, value in ref.params().items():
        assert_close(final[param], value.detach().numpy(), name=param)


ADAPTERS = [MethodConfig("lora", rank=3, alpha=5.0), MethodConfig("lora", rank=2, targets=("q", "v")),
            MethodConfig("ia3"), MethodConfig("lars", rank=4),
            MethodConfig("lars", rank=6, targets=("k", "o", "down")),
            MethodConfig("lars", rank=4, storage=(("block", "recompute"),))]


def _perturb(model, seed):
    rng = np.random.default_rng(seed)
    for p in model.trainable().values():
        p += 0.2 * rng.standard_normal(p.shape)


@pytest.mark.parametrize("method", ADAPTERS, ids=lambda m: m.describe())
def test_adapter_gradients_match_reference(method, tmp_path):
    cfg = CONFIGS["tiny"]
    model, ref = make_pair(cfg, seed=5)
    tokens, targets = batch(cfg, seed=6)
    apply_method(model, method, calibration_tokens=tokens)
    base_logits = ref.forward(tokens).detach().numpy()
    assert_close(model.logits(tokens), base_logits, name="fresh adapter leaves logits unchanged")
    _perturb(model, seed=7)
    save_adapter(model, tmp_path)  # PEFT format: LARS goes out as the LoRA it equals
    ref.freeze_base()
    ref.load_peft_adapter(tmp_path)
    logits = model.logits(tokens)
    assert_close(logits, ref.forward(tokens).detach().numpy(), name="exported adapter logits")
    assert np.abs(logits - base_logits).max() > 1e-3  # the perturbed adapter does something
    tape = model.forward(tokens, targets)
    grads = model.backward(tape)
    ref_loss, ref_grads = ref.loss_and_grads(tokens, targets)
    assert_close(np.array(tape.loss), np.array(ref_loss), name="loss")
    assert set(grads) == set(model.trainable())  # frozen weights receive no gradient
    assert not any(name.endswith(".weight") for name in grads)
    for name, grad in grads.items():
        ref_key, kind = peft_name(name)
        assert_close(as_reference_layout(kind, grad, ref_grads[ref_key].shape), ref_grads[ref_key], name=name)
    # merged == unmerged
    merged = Model(cfg, model.merged_params(), compute_dtype="float64")
    assert_close(merged.logits(tokens), logits, name="merged logits")
