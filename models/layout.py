"""The state-dict layout every loader returns: Hugging Face LLaMA names and shapes.

Both loaders check what they read against this table *before* they allocate a
float copy, so a file whose shapes disagree with its own config fails with a
message naming the tensor instead of a broadcasting error deep in a forward pass.
Linear weights are (out, in), as in `torch.nn.Linear`.
"""
from __future__ import annotations

from minilars.config import ModelConfig

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, in the order the tensors are used by a forward pass."""
    V, d, f, q, k = cfg.vocab_size, cfg.dim, cfg.ffn_dim, cfg.q_dim, cfg.kv_dim
    shapes: dict[str, tuple[int, ...]] = {EMBED: (V, d)}
    for i in range(cfg.n_layers):
        p = layer_prefix(i)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q, d)  # H*hd rows
        shapes[p + "self_attn.k_proj.weight"] = (k, d)  # Hkv*hd rows
        shapes[p + "self_attn.v_proj.weight"] = (k, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes[FINAL_NORM] = (d,)
    if not cfg.tie_embeddings:
        shapes[LM_HEAD] = (V, d)
    return shapes
