"""The state-dict layout every loader returns: Hugging Face names and shapes of the
model's family (LLaMA's, plus Qwen2's q/k/v biases, Qwen3's and Gemma 3's q/k norms,
Gemma 3's four norms per block).

Both loaders check what they read against this table *before* they allocate a
float copy, so a file whose shapes disagree with its own config fails with a
message naming the tensor instead of a broadcasting error deep in a forward pass.
Linear weights are (out, in), as in `torch.nn.Linear`. The names come from
minilars/weights.py (STREAMS, hf_block_names), the one table of engine <-> HF names.
"""
from __future__ import annotations

from minilars.config import ModelConfig
from minilars.weights import STREAMS, has_bias, hf_block_names, stream_inputs, stream_outputs

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape: the embedding, each block (its norms, then every projection's
    weight and bias), the final norm and an untied head."""
    d, hd = cfg.dim, cfg.head_dim
    ins, outs = stream_inputs(cfg), stream_outputs(cfg)
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = layer_prefix(i)
        for engine, hf in hf_block_names(cfg).items():
            shapes[p + hf] = (hd,) if engine in ("q_norm.weight", "k_norm.weight") else (d,)
        for stream, projs in STREAMS.items():
            for proj, module in projs:
                shapes[f"{p}{module}.weight"] = (outs[stream][proj], ins[stream])
                if has_bias(cfg, stream):
                    shapes[f"{p}{module}.bias"] = (outs[stream][proj],)
    shapes[FINAL_NORM] = (d,)
    if not cfg.tie_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, d)
    return shapes
