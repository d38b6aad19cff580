"""The model families minilars loads, and what each changes from LLaMA.

Every family is the one decoder of minilars/model.py with some fields of its
architecture description (minilars/config.py, after head_dim) set: this table is
the one place that says which. A loader picks the family from the checkpoint
(config.json's model_type, or the GGUF's general.architecture), applies the
family's fixed changes, and reads the numbers that vary per checkpoint (rope base
and scaling, sliding window, layer types, head_dim) from the file.

Adding a family: one row here, its tensor names where they differ from LLaMA's
(models/layout.py), and the ops for any field it needs that the model does not
have yet. docs/models.md walks through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minilars.config import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]  # config.json "model_type" values read as this family
    hf_architecture: str  # the transformers class that holds the same model
    gguf_architectures: tuple[str, ...]  # GGUF general.architecture values (llama.cpp's names)
    changes: dict = field(default_factory=dict)  # ModelConfig fields every checkpoint of the family sets
    adds: str = ""  # what the family adds to LLaMA, in a line


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), "LlamaForCausalLM", ("llama",),
           adds="the base: RMSNorm, RoPE (default or llama3 scaling), GQA, SwiGLU, tied or separate head"),
    Family("mistral", ("mistral",), "MistralForCausalLM", (),
           adds="sliding-window attention on every layer when the config sets sliding_window"),
    Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", ("qwen2",), changes={"attn_bias": True},
           adds="a bias on q, k and v"),
    Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", ("qwen3",), changes={"qk_norm": True},
           adds="RMSNorm on each query and key head; head_dim apart from dim / heads"),
    Family("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", ("gemma3",),
           changes={"qk_norm": True, "norm_offset": 1.0, "sandwich_norms": True, "activation": "gelu_tanh"},
           adds="(1 + w) RMSNorm, sandwich norms, GeGLU (tanh-GELU), q/k norm, embedding x sqrt(d), "
                "sliding-window and global layers with their own rope bases"),
)}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def tiny_config(name: str, **changes) -> ModelConfig:
    """A few-thousand-parameter model of family `name` that exercises every field
    the family sets (tests, tutorials): 2 layers, GQA ratio 2, and for the families
    with sliding windows a window of 8 tokens on the first layer."""
    fam = family(name)
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, rope_theta=10000.0,
                rms_eps=1e-5, max_seq_len=256, family=name, **fam.changes)
    if name == "llama":
        from minilars.config import RopeScaling
        base.update(tie_embeddings=False, rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                                                    high_freq_factor=4.0, original_max_seq_len=64))
    elif name == "mistral":
        base.update(sliding_window=8, layer_types=("sliding", "sliding"))
    elif name == "qwen3":
        base.update(head_dim=16)  # q_dim 64 != dim 32
    elif name == "gemma3":
        base.update(head_dim=16, embed_scale=32 ** 0.5, sliding_window=8, layer_types=("sliding", "full"),
                    local_rope_theta=10000.0, rope_theta=1e6, attn_scale=12 ** -0.5, rms_eps=1e-6)
    base.update(changes)
    return ModelConfig(**base)
