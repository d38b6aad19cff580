"""Model configuration: one frozen dataclass with named presets.

Dimension letters used across minilars (stated once, used in every shape comment):
    B batch, T sequence length, N = B*T tokens, d hidden size, f MLP width,
    H query heads, Hkv key/value heads, hd head dim, k = Hkv*hd key/value width,
    V vocabulary, r adapter / subspace rank.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

ACTIVATIONS = ("silu", "gelu_tanh")  # the MLP gate: SwiGLU (silu) or GeGLU with tanh-GELU
LAYER_TYPES = ("full", "sliding")  # causal attention over every earlier token, or the last `sliding_window`


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's inverse frequencies are rescaled for long context (HF `rope_type`).

    linear: inv_freq / factor (position interpolation, Chen et al. 2023).
    llama3: wavelengths longer than original_max_seq_len / low_freq_factor are divided
    by factor, those shorter than original_max_seq_len / high_freq_factor are kept,
    and the band between is interpolated smoothly (Llama 3.1, Meta 2024)."""

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_seq_len: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling {self.kind!r} is not implemented (linear, llama3)")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """A pre-norm decoder: RMSNorm, RoPE, grouped-query attention, a gated MLP.

    The fields after head_dim are the architecture's description: each family
    (models/families.py) is LLaMA with some of them changed, and the one Model in
    minilars/model.py reads them. Their defaults are LLaMA's (and SmolLM2's)."""

    vocab_size: int  # V
    dim: int  # d
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # Hkv; H must be a multiple of it
    ffn_dim: int  # f
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    head_dim: int | None = None  # hd; defaults to d // H
    # ---- architecture description (defaults: LLaMA)
    family: str = "llama"  # models/families.py: names for loading, saving and PEFT export
    attn_bias: bool = False  # q, k and v carry a bias (Qwen2): blocks.{i}.attn_in.bias
    qk_norm: bool = False  # RMSNorm over each head's hd on q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # every RMSNorm scales by (norm_offset + w): 1.0 for Gemma
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add (Gemma 3)
    activation: str = "silu"  # ACTIVATIONS: silu(gate) * up, or gelu_tanh(gate) * up
    embed_scale: float = 1.0  # x = E[t] * embed_scale (Gemma 3: sqrt(d)); the tied head reads E unscaled
    rope_scaling: RopeScaling | None = None  # of the full-attention layers
    local_rope_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta
    sliding_window: int | None = None  # tokens a sliding layer sees, itself included
    layer_types: tuple[str, ...] = ()  # LAYER_TYPES per layer; () means every layer "full"
    attn_scale: float | None = None  # score scale; None: 1/sqrt(hd) (Gemma 3: query_pre_attn_scalar^-1/2)
    final_softcap: float | None = None  # logits = c * tanh(logits / c) (Gemma 2 style soft-capping)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ValueError("rope_theta and rms_eps must be positive")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not implemented ({', '.join(ACTIVATIONS)})")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(f"layer type {unknown[0]!r} is not implemented ({', '.join(LAYER_TYPES)})")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need sliding_window >= 1")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        for name in ("attn_scale", "final_softcap", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def q_dim(self) -> int:
        """H*hd: width of the query projection."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """k = Hkv*hd: width of the key and of the value projection."""
        return self.n_kv_heads * self.head_dim

    def layer_type(self, i: int) -> str:
        """"full" or "sliding" for layer i."""
        return self.layer_types[i] if self.layer_types else "full"

    def window(self, i: int) -> int | None:
        """How many tokens layer i's queries see (themselves included); None: all earlier ones."""
        return self.sliding_window if self.layer_type(i) == "sliding" else None

    def rope_of_layer(self, i: int) -> tuple[float, RopeScaling | None]:
        """(theta, scaling) of layer i's RoPE: sliding layers may have their own base."""
        if self.layer_type(i) == "sliding" and self.local_rope_theta is not None:
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

    def identity(self) -> dict:
        """The fields that say which model this is, for fingerprints: every field, except
        architecture-description fields left at their LLaMA default, so a LLaMA model's
        fingerprint is the one it had before the description existed."""
        out = {}
        architecture = False
        for f in fields(self):
            value = getattr(self, f.name)
            if not architecture or value != f.default:
                out[f.name] = value
            architecture = architecture or f.name == "head_dim"
        return out

    def with_(self, **changes) -> "ModelConfig":
        """A copy with `changes`; a head_dim that was derived is derived again."""
        if "head_dim" not in changes and self.head_dim == self.dim // self.n_heads:
            changes["head_dim"] = None
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Small enough for whole-model gradient checks in float64; GQA ratio 2.
    "tiny": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        rope_theta=10000.0, rms_eps=1e-5, max_seq_len=256),
    # HuggingFaceTB/SmolLM2-135M(-Instruct).
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                ffn_dim=1536, rope_theta=100000.0, rms_eps=1e-5, max_seq_len=8192),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
