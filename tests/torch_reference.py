"""An independent PyTorch autograd reference of the LLaMA maths, for the tests only.

The numpy engine (explicit forward/backward) is checked against this module's
logits, losses, gradients by name and AdamW steps, so this file is written from
the published maths and the Hugging Face / PEFT conventions, never from the
engine's code, and it lets autograd do every backward:

- LLaMA (Touvron et al. 2023, arXiv 2302.13971) as HF `modeling_llama.py` runs it:
  RMSNorm (Zhang & Sennrich 2019) y = x / sqrt(mean(x^2) + eps) * w;
  RoPE (Su et al. 2021, arXiv 2104.09864) in HF's rotate-half layout with
  inv_freq_i = theta^(-2i/hd); causal grouped-query attention (Ainslie et al. 2023,
  arXiv 2305.13245) where query head h reads key/value head h // (H/Hkv);
  SwiGLU (Shazeer 2020) down(silu(gate(x)) * up(x)); pre-norm residual blocks;
  final norm; tied head logits = h E^T.
- What the other families change (issue 19), as their HF modeling files
  (modeling_qwen2.py, modeling_qwen3.py, modeling_mistral.py, modeling_gemma3.py)
  run it, read from the config's architecture fields: q/k/v biases (Qwen2);
  RMSNorm of each query and key head over hd before RoPE (Qwen3, Gemma 3);
  norms scaling by (1 + w) (Gemma3RMSNorm); Gemma 3's sandwich
  h = x + post_attention_layernorm(attn(input_layernorm(x))),
  out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)));
  GeGLU down(gelu_tanh(gate(x)) * up(x)); embeddings times sqrt(d); sliding-window
  layers whose query i sees keys j with i - window < j <= i (transformers'
  sliding_window_overlay) and, in Gemma 3, their own rope base; the score scale
  query_pre_attn_scalar^-1/2; logits c tanh(logits / c); Llama 3.1's rope
  frequency scaling (Meta's `apply_scaling`, llama-models) and linear scaling.
- LoRA (Hu et al. 2021, arXiv 2106.09685) and (IA)^3 (Liu et al. 2022,
  arXiv 2205.05638) exactly as huggingface/peft computes and saves them; on a
  biased module PEFT's bias="none" leaves the bias frozen, IA3 scales a
  non-feed-forward module's output bias included, and merging folds l into b.

Attention is computed naively with the full (T, T) score matrix: this is a
reference, so clarity wins over memory.

Dimension letters (as in minilars/config.py): B batch, T sequence length,
d hidden size, f MLP width, H query heads, Hkv key/value heads, hd head dim,
k = Hkv*hd, V vocabulary, r adapter rank.

PEFT format, checked against huggingface/peft sources:
- Saved keys (`utils/save_and_load.py`, `get_peft_model_state_dict`): the
  PeftModel's state-dict keys with the adapter name removed. A LLaMA
  `LlamaForCausalLM` sits at `base_model.model`, so
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out, r)
  (`lora_A` / `lora_B` are ModuleDicts of bias-free nn.Linear, `tuners/lora/layer.py`),
    base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l            (out, 1)
    base_model.model.model.layers.{i}.mlp.down_proj.ia3_l               (1, in)
  (`ia3_l` is a ParameterDict, so no `.weight` suffix, `tuners/ia3/layer.py`).
- LoRA scaling (`LoraLayer.update_layer`): lora_alpha / r, or lora_alpha / sqrt(r)
  when use_rslora. Forward: y = base(x) + scaling * lora_B(lora_A(x)).
- IA3 (`tuners/ia3/layer.py`): ia3_l has shape (1, in) when the module is a
  feed-forward module (input scaling: y = (x * l) W^T) and (out, 1) otherwise
  (output scaling: y = (x W^T) * l); initialised to ones. Merging is W * ia3_l
  with broadcasting. A module is feed-forward when its name ends with an entry of
  `feedforward_modules` (a str is matched with re.fullmatch) (`tuners/ia3/model.py`);
  PEFT's LLaMA defaults are target_modules [k_proj, v_proj, down_proj] and
  feedforward_modules [down_proj] (`utils/constants.py`).
- target_modules: a list matches a module name equal to an entry or ending in
  "." + entry; a str is matched with re.fullmatch against the full module name
  (e.g. "model.layers.0.self_attn.q_proj").
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Short adapter-site names used across minilars -> path inside a decoder layer.
MODULE_PATHS: dict[str, str] = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
PEFT_PREFIX = "base_model.model."
# PEFT's default feed-forward modules for LLaMA (IA3 input scaling).
LLAMA_IA3_FEEDFORWARD = ("down_proj",)


def module_path(module: str) -> str:
    """'q', 'q_proj' or 'self_attn.q_proj' -> 'self_attn.q_proj'."""
    for short, path in MODULE_PATHS.items():
        if module in (short, path, path.split(".")[1]):
            return path
    raise ValueError(f"unknown module {module!r}; known: {', '.join(MODULE_PATHS)}")


def is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith(".ia3_l")


def hf_param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every base parameter of the model, Hugging Face names and (out, in) layouts."""
    d, f, V = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.q_dim, d)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_dim, d)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_dim, d)
        if cfg.attn_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.kv_dim,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.q_dim)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if cfg.sandwich_norms:
            shapes[p + "pre_feedforward_layernorm.weight"] = (d,)
            shapes[p + "post_feedforward_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def random_state(cfg, seed: int = 0, scale: float | None = None, norm_noise: float = 0.1,
                 dtype=np.float64) -> dict[str, np.ndarray]:
    """A random HF-named state dict whose activations stay O(1).

    Norms scale by 1 + norm_noise * N(0, 1) (their weight is that, or for Gemma's
    (1 + w) norms the noise alone); biases are 0.1 N(0, 1). Projection weights are
    N(0, std) with std = 1/sqrt(in) (so x W^T keeps unit scale); the embedding and
    an untied head use std = 1/sqrt(d) (so logits = h E^T are O(1) for a normed h).
    A given `scale` replaces all of these standard deviations.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in hf_param_shapes(cfg).items():
        if name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            w = 1.0 - cfg.norm_offset + norm_noise * rng.standard_normal(shape)
        else:
            std = scale if scale is not None else 1.0 / math.sqrt(shape[1])
            w = std * rng.standard_normal(shape)
        state[name] = w.astype(dtype)
    return state


# ---------------------------------------------------------------- the maths


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * (offset + w) over the last axis (Gemma: offset 1)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * (offset + w)


def scaled_inv_freq(inv_freq: list[float], scaling) -> list[float]:
    """Rope frequencies for long context: linear divides each by the factor; llama3
    is Meta's `apply_scaling` (llama-models, Llama 3.1), frequency by frequency."""
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return [freq / scaling.factor for freq in inv_freq]
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    out = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / scaling.factor)
        else:
            smooth = ((scaling.original_max_seq_len / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            out.append((1 - smooth) * freq / scaling.factor + smooth * freq)
    return out


def rope_cos_sin(T: int, hd: int, theta: float, position_offset: int = 0,
                 dtype=torch.float64, scaling=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, hd] for positions offset..offset+T-1 (HF layout).

    inv_freq_i = theta^(-2i/hd) for i < hd/2 (rescaled by `scaling`, a
    minilars.config.RopeScaling); HF repeats the hd/2 angles twice (cat, not
    interleave) so that they pair x[j] with x[j + hd/2].
    """
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # [hd/2]
    inv_freq = torch.tensor(scaled_inv_freq(inv_freq.tolist(), scaling), dtype=torch.float64)
    pos = torch.arange(position_offset, position_offset + T, dtype=torch.float64)  # [T]
    angles = pos[:, None] * inv_freq[None, :]  # [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, hd]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] with x1, x2 the two halves of the last axis."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, hd] rotated by position: x cos + rotate_half(x) sin."""
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------- modules (HF names)


class _Weight(nn.Module):
    """Holds one tensor as `.weight`, so parameter names follow HF / PEFT."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class RMSNorm(_Weight):
    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__(weight)
        self.eps = eps
        self.offset = offset

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset)


class AdaptedLinear(nn.Module):
    """y = x W^T (+ b), W (out, in), with at most one PEFT adapter.

    LoRA: y = x W^T + b + s (x A^T) B^T with A (r, in), B (out, r), s the scaling.
    IA3:  y = (x W^T + b) * l with l (out, 1), or, for a feed-forward module,
          y = (x * l) W^T + b with l (1, in).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.register_module("lora_A", None)
        self.register_module("lora_B", None)
        self.register_parameter("ia3_l", None)
        self.lora_scaling = 0.0
        self.ia3_feedforward = False

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def _check_free(self):
        if self.lora_A is not None or self.ia3_l is not None:
            raise ValueError("this reference holds at most one adapter per module")

    def add_lora(self, A: torch.Tensor, B: torch.Tensor, scaling: float):
        self._check_free()
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(f"LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit W "
                             f"{tuple(self.weight.shape)}: want A (r, {self.in_features}), B ({self.out_features}, r)")
        self.lora_A = _Weight(A)
        self.lora_B = _Weight(B)
        self.lora_scaling = float(scaling)

    def add_ia3(self, vector: torch.Tensor, feedforward: bool):
        self._check_free()
        n = self.in_features if feedforward else self.out_features
        if vector.numel() != n:
            raise ValueError(f"IA3 vector has {vector.numel()} entries, module needs {n} "
                             f"({'input' if feedforward else 'output'} scaling)")
        shape = (1, n) if feedforward else (n, 1)  # PEFT's ia3_l shapes
        self.ia3_l = nn.Parameter(vector.reshape(shape).clone())
        self.ia3_feedforward = feedforward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.ia3_l is not None and self.ia3_feedforward:
            y = (x * self.ia3_l.flatten()) @ self.weight.T
        else:
            y = x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        if self.ia3_l is not None and not self.ia3_feedforward:
            y = y * self.ia3_l.flatten()
        if self.lora_A is not None:
            y = y + self.lora_scaling * ((x @ self.lora_A.weight.T) @ self.lora_B.weight.T)  # [..., r] -> [..., out]
        return y

    def merged_weight(self) -> torch.Tensor:
        """W with the adapter folded in: W * ia3_l (broadcast) or W + s B A."""
        w = self.weight
        if self.ia3_l is not None:
            w = w * self.ia3_l
        if self.lora_A is not None:
            w = w + self.lora_scaling * (self.lora_B.weight @ self.lora_A.weight)
        return w

    def merged_bias(self) -> torch.Tensor | None:
        """b, or b * l where IA3 scales the module's output (PEFT's IA3 merge)."""
        if self.bias is not None and self.ia3_l is not None and not self.ia3_feedforward:
            return self.bias * self.ia3_l.flatten()
        return self.bias


class Attention(nn.Module):
    def __init__(self, cfg, get, layer: int):
        super().__init__()
        self.cfg = cfg
        sliding = bool(cfg.layer_types) and cfg.layer_types[layer] == "sliding"
        self.window = cfg.sliding_window if sliding else None
        bias = (lambda name: get(name, "bias")) if cfg.attn_bias else (lambda name: None)
        self.q_proj = AdaptedLinear(get("q_proj"), bias("q_proj"))
        self.k_proj = AdaptedLinear(get("k_proj"), bias("k_proj"))
        self.v_proj = AdaptedLinear(get("v_proj"), bias("v_proj"))
        self.o_proj = AdaptedLinear(get("o_proj"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(get("q_norm"), cfg.rms_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(get("k_norm"), cfg.rms_eps, cfg.norm_offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int = 0
                ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, hd)
        k = self.k_proj(x).view(B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)  # [B, Hkv, T, hd]
        if self.cfg.qk_norm:  # per head, over hd, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Query head h reads key/value head h // group: repeat each kv head `group` times in a row.
        group = H // Hkv
        k = k.repeat_interleave(group, dim=1)  # [B, H, T, hd]
        v = v.repeat_interleave(group, dim=1)  # [B, H, T, hd]
        scale = self.cfg.attn_scale if self.cfg.attn_scale is not None else 1 / math.sqrt(hd)
        scores = q @ k.transpose(-1, -2) * scale  # [B, H, T, T]
        query = position_offset + torch.arange(T, device=x.device)[:, None]
        key = position_offset + torch.arange(T, device=x.device)[None, :]
        hidden = key > query  # the future
        if self.window is not None:
            hidden |= key <= query - self.window  # further back than the window
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)  # [B, H, T, T]
        out = (probs @ v).transpose(1, 2).reshape(B, T, H * hd)  # [B, T, H*hd]
        return self.o_proj(out)  # [B, T, d]


class MLP(nn.Module):
    def __init__(self, get, activation: str = "silu"):
        super().__init__()
        self.gate_proj = AdaptedLinear(get("gate_proj"))
        self.up_proj = AdaptedLinear(get("up_proj"))
        self.down_proj = AdaptedLinear(get("down_proj"))
        self.act = F.silu if activation == "silu" else (lambda g: F.gelu(g, approximate="tanh"))

    def forward(self, x):  # [B, T, d] -> [B, T, f] -> [B, T, d]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, get, layer: int = 0):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.input_layernorm = RMSNorm(get("input_layernorm"), cfg.rms_eps, cfg.norm_offset)
        self.self_attn = Attention(cfg, lambda n, kind="weight": get("self_attn." + n, kind), layer)
        self.post_attention_layernorm = RMSNorm(get("post_attention_layernorm"), cfg.rms_eps, cfg.norm_offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(get("pre_feedforward_layernorm"), cfg.rms_eps, cfg.norm_offset)
            self.post_feedforward_layernorm = RMSNorm(get("post_feedforward_layernorm"), cfg.rms_eps,
                                                      cfg.norm_offset)
        self.mlp = MLP(lambda n: get("mlp." + n), cfg.activation)

    def forward(self, x, cos, sin, position_offset: int = 0):
        if self.sandwich:  # Gemma 3
            h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, position_offset))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, position_offset)
        return h + self.mlp(self.post_attention_layernorm(h))


class _LlamaModel(nn.Module):
    def __init__(self, cfg, get):
        super().__init__()
        self.embed_tokens = _Weight(get("model.embed_tokens"))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, lambda n, kind="weight", i=i: get(f"model.layers.{i}.{n}", kind), i)
            for i in range(cfg.n_layers))
        self.norm = RMSNorm(get("model.norm"), cfg.rms_eps, cfg.norm_offset)


def _to_tensor(x, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype).clone()
    return torch.tensor(np.asarray(x), dtype=dtype)


def _to_tokens(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(torch.long)


class ReferenceLlama(nn.Module):
    """LLaMA-style decoder whose `named_parameters()` are exactly the HF names.

    Base weights start trainable (full fine-tuning); `freeze_base()` leaves only
    adapters trainable. Adapter parameters follow PEFT's names without the
    `base_model.model.` prefix, e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`
    and `model.layers.0.self_attn.k_proj.ia3_l`.
    """

    def __init__(self, cfg, state: dict, dtype=torch.float64):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        shapes = hf_param_shapes(cfg)
        missing = sorted(set(shapes) - set(state))
        unexpected = sorted(set(state) - set(shapes))
        if missing or unexpected:
            raise KeyError(f"state dict does not match the config: missing {missing}, unexpected {unexpected}")

        def get(prefix: str, kind: str = "weight") -> torch.Tensor:
            name = f"{prefix}.{kind}"
            w = _to_tensor(state[name], dtype)
            if tuple(w.shape) != shapes[name]:
                raise ValueError(f"{name}: shape {tuple(w.shape)}, config wants {shapes[name]}")
            return w

        self.model = _LlamaModel(cfg, get)
        if not cfg.tie_embeddings:
            self.lm_head = _Weight(get("lm_head"))

    # ---------------------------------------------------------- forward and loss

    def forward(self, tokens, position_offset: int = 0) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V)."""
        tokens = _to_tokens(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        cfg = self.cfg
        T = tokens.shape[1]
        x = self.model.embed_tokens.weight[tokens] * cfg.embed_scale  # [B, T, d]
        for i, layer in enumerate(self.model.layers):
            # Gemma 3's sliding layers turn with their own base and no scaling
            local = bool(cfg.layer_types) and cfg.layer_types[i] == "sliding" and cfg.local_rope_theta is not None
            theta, scaling = (cfg.local_rope_theta, None) if local else (cfg.rope_theta, cfg.rope_scaling)
            cos, sin = rope_cos_sin(T, cfg.head_dim, theta, position_offset, self.dtype, scaling)
            x = layer(x, cos, sin, position_offset)
        h = self.model.norm(x)  # [B, T, d]
        head = self.model.embed_tokens.weight if cfg.tie_embeddings else self.lm_head.weight  # [V, d]
        logits = h @ head.T  # [B, T, V]
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
        return logits

    def loss(self, tokens, targets, ignore_index: int = -100, position_offset: int = 0) -> torch.Tensor:
        """Mean cross-entropy over positions whose target != ignore_index.

        Targets are already shifted: targets[b, t] labels the logits at position t.
        """
        logits = self.forward(tokens, position_offset)  # [B, T, V]
        targets = _to_tokens(targets)
        keep = targets != ignore_index  # [B, T]
        logp = torch.log_softmax(logits, dim=-1)  # [B, T, V]
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
        return -(picked * keep).sum() / keep.sum()

    def loss_and_grads(self, tokens, targets, ignore_index: int = -100) -> tuple[float, dict[str, np.ndarray]]:
        """Clears old gradients, backpropagates the loss, returns (loss, grads())."""
        self.zero_grad(set_to_none=True)
        loss = self.loss(tokens, targets, ignore_index)
        loss.backward()
        return loss.item(), self.grads()

    # ---------------------------------------------------------- parameters

    def params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def trainable_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def grads(self) -> dict[str, np.ndarray]:
        """HF-named gradients of the trainable parameters (zeros where none was accumulated)."""
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().numpy().copy()
                for n, p in self.trainable_params().items()}

    def freeze_base(self):
        """Base weights stop receiving gradients; adapters (also ones added later) stay trainable."""
        for n, p in self.named_parameters():
            if not is_adapter_name(n):
                p.requires_grad_(False)

    def unfreeze_base(self):
        for n, p in self.named_parameters():
            if not is_adapter_name(n):
                p.requires_grad_(True)

    def parameter_counts(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        ps = list(self.parameters())
        return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)

    # ---------------------------------------------------------- adapters

    def linear(self, layer: int, module: str) -> AdaptedLinear:
        parent, child = module_path(module).split(".")
        return getattr(getattr(self.model.layers[layer], parent), child)

    def add_lora(self, layer: int, module: str, A, B, scaling: float):
        """y = x W^T + scaling (x A^T) B^T on one projection; A (r, in), B (out, r) become trainable."""
        self.linear(layer, module).add_lora(_to_tensor(A, self.dtype), _to_tensor(B, self.dtype), scaling)

    def add_ia3(self, layer: int, module: str, vector, feedforward: bool | None = None):
        """PEFT IA3 on one projection. feedforward=None follows PEFT's LLaMA default:
        input scaling for down_proj, output scaling for every other module."""
        if feedforward is None:
            feedforward = module_path(module).split(".")[1] in LLAMA_IA3_FEEDFORWARD
        self.linear(layer, module).add_ia3(_to_tensor(vector, self.dtype), feedforward)

    def adapter_sites(self) -> dict[str, str]:
        """{'model.layers.0.self_attn.q_proj': 'lora' | 'ia3'} for every adapted projection."""
        sites = {}
        for name, m in self.named_modules():
            if isinstance(m, AdaptedLinear) and (m.lora_A is not None or m.ia3_l is not None):
                sites[name] = "lora" if m.lora_A is not None else "ia3"
        return sites

    @torch.no_grad()
    def merge_adapters(self) -> dict[str, np.ndarray]:
        """HF-named base state dict with every adapter folded into its weight (the model is unchanged)."""
        merged = {n: p.detach().cpu().numpy().copy() for n, p in self.named_parameters() if not is_adapter_name(n)}
        for name, m in self.named_modules():
            if isinstance(m, AdaptedLinear):
                merged[name + ".weight"] = m.merged_weight().cpu().numpy().copy()
                if m.bias is not None:
                    merged[name + ".bias"] = m.merged_bias().cpu().numpy().copy()
        return merged

    def load_peft_adapter(self, path) -> dict:
        """Attach the LoRA or IA3 adapter saved by PEFT in directory `path`; returns its config.

        Reads adapter_config.json and adapter_model.safetensors with PEFT's key format
        (see the module docstring). Anything this reference does not model (DoRA,
        fan_in_fan_out, biases, rank/alpha patterns, layer selection, modules_to_save)
        is refused rather than silently ignored.
        """
        from safetensors.numpy import load_file

        path = Path(path)
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(str(path / "adapter_model.safetensors"))
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type not in ("LORA", "IA3"):
            raise ValueError(f"unsupported peft_type {config.get('peft_type')!r}")
        if config.get("fan_in_fan_out", False):
            raise ValueError("fan_in_fan_out=True does not apply to LLaMA's nn.Linear layers")
        for field in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
            if config.get(field):
                raise NotImplementedError(f"adapter_config {field}={config[field]!r} is not modelled here")
        if peft_type == "LORA":
            if config.get("use_dora", False) or config.get("bias", "none") != "none":
                raise NotImplementedError("only plain LoRA (no DoRA, bias='none') is modelled here")

        key_re = re.compile(r"model\.layers\.(\d+)\.((?:self_attn\.[qkvo]|mlp\.(?:gate|up|down))_proj)"
                            r"\.(lora_A\.weight|lora_B\.weight|ia3_l)")
        sites: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            m = key_re.fullmatch(key.removeprefix(PEFT_PREFIX)) if key.startswith(PEFT_PREFIX) else None
            if m is None:
                raise KeyError(f"unexpected key in adapter_model.safetensors: {key!r}")
            kind = m.group(3)
            if (kind == "ia3_l") != (peft_type == "IA3"):
                raise KeyError(f"key {key!r} does not belong to a {peft_type} adapter")
            sites.setdefault(f"model.layers.{m.group(1)}.{m.group(2)}", {})[kind] = value

        targets = config.get("target_modules")
        for site, weights in sorted(sites.items()):
            if not _peft_name_matches(site, targets):
                raise ValueError(f"{site} has adapter weights but is not in target_modules {targets!r}")
            layer, module = int(site.split(".")[2]), site.split(".", 3)[3]
            if layer >= self.cfg.n_layers:
                raise ValueError(f"{site}: the model has only {self.cfg.n_layers} layers")
            if peft_type == "LORA":
                if set(weights) != {"lora_A.weight", "lora_B.weight"}:
                    raise KeyError(f"{site}: needs both lora_A.weight and lora_B.weight, got {sorted(weights)}")
                r = int(config["r"])
                if weights["lora_A.weight"].shape[0] != r:
                    raise ValueError(f"{site}: lora_A rank {weights['lora_A.weight'].shape[0]} != config r {r}")
                alpha = float(config["lora_alpha"])
                scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
                self.add_lora(layer, module, weights["lora_A.weight"], weights["lora_B.weight"], scaling)
            else:
                ff_modules = config.get("feedforward_modules") or list(LLAMA_IA3_FEEDFORWARD)
                if isinstance(ff_modules, str):
                    feedforward = re.fullmatch(ff_modules, site) is not None
                else:
                    feedforward = any(site.endswith(t) for t in ff_modules)
                lin = self.linear(layer, module)
                want = (1, lin.in_features) if feedforward else (lin.out_features, 1)
                if weights["ia3_l"].shape != want:
                    raise ValueError(f"{site}.ia3_l: shape {weights['ia3_l'].shape}, PEFT stores {want}")
                self.add_ia3(layer, module, weights["ia3_l"], feedforward=feedforward)

        # Every targeted projection must have been saved: a missing one is an exporter bug.
        targeted = [f"model.layers.{i}.{p}" for i in range(self.cfg.n_layers) for p in MODULE_PATHS.values()
                    if _peft_name_matches(f"model.layers.{i}.{p}", targets)]
        absent = sorted(set(targeted) - set(sites))
        if absent:
            raise KeyError(f"target_modules {targets!r} select modules with no saved weights: {absent}")
        return config


def _peft_name_matches(name: str, targets) -> bool:
    """PEFT's target_modules rule: a str is a full regex match, a list matches by module-name suffix."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# ---------------------------------------------------------------- optimizer reference


def reference_adamw_steps(model: ReferenceLlama, tokens, targets, n_steps: int, lr: float,
                          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                          weight_decay: float = 0.0, max_grad_norm: float | None = None,
                          ignore_index: int = -100) -> list[float]:
    """Run n_steps of torch.optim.AdamW on the same batch; returns the loss before each step.

    Only trainable parameters are optimised; decoupled weight decay (p -= lr*wd*p)
    applies to all of them alike. When max_grad_norm is set, the global L2 norm of
    their gradients is clipped with torch.nn.utils.clip_grad_norm_ before each step.
    The model is updated in place, so model.params() holds the final weights.
    """
    params = list(model.trainable_params().values())
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    losses = []
    for _ in range(n_steps):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(tokens, targets, ignore_index)
        loss.backward()
        if max_grad_norm is not None and max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(loss.item())
    return losses
