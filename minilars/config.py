"""Model configuration: one frozen dataclass with named presets.

Dimension letters used across minilars (stated once, used in every shape comment):
    B batch, T sequence length, N = B*T tokens, d hidden size, f MLP width,
    H query heads, Hkv key/value heads, hd head dim, k = Hkv*hd key/value width,
    V vocabulary, r adapter / subspace rank.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

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

    @property
    def q_dim(self) -> int:
        """H*hd: width of the query projection."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """k = Hkv*hd: width of the key and of the value projection."""
        return self.n_kv_heads * self.head_dim

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
