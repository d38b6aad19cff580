"""The model families minilars loads, and what each changes from LLaMA.

Every family is the one decoder of minilars/model.py with some fields of its
architecture description (minilars/config.py, after head_dim) set: this table is
the one place that says which. A loader picks the family from the checkpoint
(config.json's model_type, or the GGUF's general.architecture), applies the
family's fixed changes, and reads the numbers that vary per checkpoint (rope base
and scaling, sliding window, layer types, head_dim) from the file.

Each row also says how the family's files differ, so the two readers
(models/hf_loader.py, models/gguf_loader.py) stay one reader each:

* `hf_defaults`: the config.json keys the family's transformers config class has
  that change the maths, with the class's default for a key the file leaves out
  (Mistral's sliding_window is 4096 when absent, Qwen3's head_dim 128, ...);
* `hf_fixed`: keys whose value must be one the engine implements (hidden_act silu,
  no attention bias on o_proj, no attention-logit soft cap, ...): any other value
  stops the load with a ModelLoadError naming the key;
* `hf_sliding`: how the file says which layers slide (see SLIDING_RULES);
* `gguf_permute_qk`: llama.cpp reorders q/k rows for its adjacent-pair RoPE only for
  the "llama" architecture; qwen2, qwen3 and gemma3 use NEOX (rotate-half) RoPE;
* `gguf_norm_shift`: convert_hf_to_gguf.py stores Gemma's norms as (1 + w).

Adding a family: one row here, its tensor names where they differ from LLaMA's
(minilars/weights.py: hf_block_names; models/gguf_loader.py: _BLOCK_NAMES), and the
ops for any field it needs that the model does not have yet. docs/models.md walks
through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minilars.config import ModelConfig

# How a family's config.json says which layers use sliding-window attention:
#   none:           no key for it; every layer attends to every earlier token (LLaMA)
#   every_layer:    sliding_window: int | null applies to every layer (Mistral)
#   qwen:           use_sliding_window: true turns it on for layers >= max_window_layers,
#                   or as layer_types says (transformers' Qwen2Config / Qwen3Config)
#   layer_types:    layer_types lists "sliding_attention" / "full_attention" per layer,
#                   or sliding_window_pattern n makes every n-th layer full (Gemma 3)
SLIDING_RULES = ("none", "every_layer", "qwen", "layer_types")


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]  # config.json "model_type" values read as this family
    hf_architecture: str  # the transformers class that holds the same model
    gguf_architectures: tuple[str, ...]  # GGUF general.architecture values (llama.cpp's names)
    changes: dict = field(default_factory=dict)  # ModelConfig fields every checkpoint of the family sets
    adds: str = ""  # what the family adds to LLaMA, in a line
    hf_defaults: dict = field(default_factory=dict)  # config.json key -> transformers' default when absent
    hf_fixed: dict = field(default_factory=dict)  # config.json key -> the values the engine implements
    hf_sliding: str = "none"  # SLIDING_RULES
    scaled_embedding: bool = False  # x = E[t] * sqrt(d) (Gemma)
    gguf_permute_qk: bool = False  # llama.cpp permuted q/k rows (adjacent-pair RoPE)
    gguf_norm_shift: float = 0.0  # GGUF norm weights = checkpoint weights + shift

    def __post_init__(self) -> None:
        if self.hf_sliding not in SLIDING_RULES:
            raise ValueError(f"family {self.name}: hf_sliding {self.hf_sliding!r} is not one of {SLIDING_RULES}")


# Defaults of transformers' config classes (5.x; the 4.4x-4.5x ones agree) for the keys
# every family reads; None for num_key_value_heads / head_dim means "= heads" / "= d / heads".
_LLAMA_DEFAULTS = {"num_key_value_heads": None, "head_dim": None, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 2048, "tie_word_embeddings": False, "rope_theta": 10000.0}
_LLAMA_FIXED = {"hidden_act": ("silu",), "attention_dropout": (0, 0.0)}  # the engine trains without dropout
_QWEN_SLIDING = {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), "LlamaForCausalLM", ("llama",),
           adds="the base: RMSNorm, RoPE (default, linear or llama3 scaling), GQA, SwiGLU, tied or separate head",
           hf_defaults=_LLAMA_DEFAULTS,
           # rope_interleaved: nanotron's flag (SmolLM2 writes it); transformers always rotates halves
           hf_fixed={**_LLAMA_FIXED, "attention_bias": (False,), "mlp_bias": (False,), "rope_interleaved": (False,)},
           gguf_permute_qk=True),
    Family("mistral", ("mistral",), "MistralForCausalLM", (),
           adds="sliding-window attention on every layer when the config sets sliding_window",
           hf_defaults={**_LLAMA_DEFAULTS, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                        "sliding_window": 4096},
           hf_fixed=_LLAMA_FIXED, hf_sliding="every_layer"),
    Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", ("qwen2",), changes={"attn_bias": True},
           adds="a bias on q, k and v",
           hf_defaults={**_LLAMA_DEFAULTS, "num_key_value_heads": 32, "max_position_embeddings": 32768,
                        **_QWEN_SLIDING},
           hf_fixed={**_LLAMA_FIXED, "use_mrope": (False,)}, hf_sliding="qwen"),
    Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", ("qwen3",), changes={"qk_norm": True},
           adds="RMSNorm on each query and key head; head_dim apart from dim / heads",
           hf_defaults={**_LLAMA_DEFAULTS, "num_key_value_heads": 32, "head_dim": 128,
                        "max_position_embeddings": 32768, **_QWEN_SLIDING},
           hf_fixed={**_LLAMA_FIXED, "attention_bias": (False,)}, hf_sliding="qwen"),
    Family("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", ("gemma3",),
           changes={"qk_norm": True, "norm_offset": 1.0, "sandwich_norms": True, "activation": "gelu_tanh"},
           adds="(1 + w) RMSNorm, sandwich norms, GeGLU (tanh-GELU), q/k norm, embedding x sqrt(d), "
                "sliding-window and global layers with their own rope bases",
           hf_defaults={**_LLAMA_DEFAULTS, "num_key_value_heads": 4, "head_dim": 256,
                        "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_theta": 1e6,
                        "rope_local_base_freq": 1e4, "sliding_window": 4096, "layer_types": None,
                        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "final_logit_softcapping": None},
           hf_fixed={"hidden_activation": ("gelu_pytorch_tanh",), "attention_dropout": (0, 0.0),
                     "attention_bias": (False,), "attn_logit_softcapping": (None,),
                     "use_bidirectional_attention": (False, None)},
           hf_sliding="layer_types", scaled_embedding=True, gguf_norm_shift=1.0),
)}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_hf_model_type(model_type: str | None) -> Family | None:
    """The family that reads config.json's model_type, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)


def family_of_gguf_architecture(arch: str | None) -> Family | None:
    """The family that reads a GGUF's general.architecture, or None."""
    return next((f for f in FAMILIES.values() if arch in f.gguf_architectures), None)


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
