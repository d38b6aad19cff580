"""Weight naming: the engine's fused layout <-> Hugging Face LLaMA names.

Engine names (W is (d_in, d_out), y = x W):
    embed.weight (V, d)               head.weight (V, d), only when untied
    blocks.{i}.attn_norm.weight (d,)  blocks.{i}.attn_in.weight (d, H*hd + 2k)  [q | k | v]
    blocks.{i}.attn_out.weight (H*hd, d)
    blocks.{i}.mlp_norm.weight (d,)   blocks.{i}.mlp_in.weight (d, 2f)  [gate | up]
    blocks.{i}.mlp_out.weight (f, d)  final_norm.weight (d,)
and, where the architecture has them (minilars/config.py):
    blocks.{i}.attn_in.bias (H*hd + 2k,)    attn_bias: [q | k | v] biases
    blocks.{i}.q_norm.weight (hd,)          qk_norm: RMSNorm of each query head
    blocks.{i}.k_norm.weight (hd,)          qk_norm: RMSNorm of each key head
    blocks.{i}.attn_post_norm.weight (d,)   sandwich_norms: on the attention output
    blocks.{i}.mlp_post_norm.weight (d,)    sandwich_norms: on the MLP output
Norm weights are stored as the checkpoint stores them; Gemma's apply as (1 + w).
Hugging Face stores each projection separately as (d_out, d_in).
"""
from __future__ import annotations

import sys

import numpy as np

from .config import ModelConfig

# stream -> its projections in column order, as HF module paths under model.layers.{i}.
STREAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "attn_in": (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj")),
    "attn_out": (("o", "self_attn.o_proj"),),
    "mlp_in": (("gate", "mlp.gate_proj"), ("up", "mlp.up_proj")),
    "mlp_out": (("down", "mlp.down_proj"),),
}
PROJECTION_STREAM = {proj: stream for stream, projs in STREAMS.items() for proj, _ in projs}
HF_MODULE = {proj: module for projs in STREAMS.values() for proj, module in projs}


def stream_outputs(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """Output width of every projection, per stream."""
    return {
        "attn_in": {"q": cfg.q_dim, "k": cfg.kv_dim, "v": cfg.kv_dim},
        "attn_out": {"o": cfg.dim},
        "mlp_in": {"gate": cfg.ffn_dim, "up": cfg.ffn_dim},
        "mlp_out": {"down": cfg.dim},
    }


def stream_inputs(cfg: ModelConfig) -> dict[str, int]:
    return {"attn_in": cfg.dim, "attn_out": cfg.q_dim, "mlp_in": cfg.dim, "mlp_out": cfg.ffn_dim}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every engine parameter's shape."""
    shapes = {"embed.weight": (cfg.vocab_size, cfg.dim), "final_norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        shapes["head.weight"] = (cfg.vocab_size, cfg.dim)
    ins, outs = stream_inputs(cfg), stream_outputs(cfg)
    for i in range(cfg.n_layers):
        shapes[f"blocks.{i}.attn_norm.weight"] = (cfg.dim,)
        shapes[f"blocks.{i}.mlp_norm.weight"] = (cfg.dim,)
        for stream in STREAMS:
            shapes[f"blocks.{i}.{stream}.weight"] = (ins[stream], sum(outs[stream].values()))
        if cfg.attn_bias:
            shapes[f"blocks.{i}.attn_in.bias"] = (sum(outs["attn_in"].values()),)
        if cfg.qk_norm:
            shapes[f"blocks.{i}.q_norm.weight"] = (cfg.head_dim,)
            shapes[f"blocks.{i}.k_norm.weight"] = (cfg.head_dim,)
        if cfg.sandwich_norms:
            shapes[f"blocks.{i}.attn_post_norm.weight"] = (cfg.dim,)
            shapes[f"blocks.{i}.mlp_post_norm.weight"] = (cfg.dim,)
    return shapes


def from_hf(cfg: ModelConfig, state: dict[str, np.ndarray], dtype=np.float32) -> dict[str, np.ndarray]:
    """Engine parameters from a Hugging Face LLaMA state dict. The dict is consumed:
    each HF array is popped once converted, so the peak stays near one copy of the
    weights plus one block."""
    embed = state.pop("model.embed_tokens.weight")
    out = {"embed.weight": _kept([embed], False) or np.ascontiguousarray(embed, dtype=dtype),
           "final_norm.weight": np.asarray(state.pop("model.norm.weight"), dtype=dtype)}
    if not cfg.tie_embeddings:
        head = state.pop("lm_head.weight")
        out["head.weight"] = _kept([head], False) or np.ascontiguousarray(head, dtype=dtype)
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        out[f"blocks.{i}.attn_norm.weight"] = np.asarray(state.pop(pre + "input_layernorm.weight"), dtype=dtype)
        out[f"blocks.{i}.mlp_norm.weight"] = np.asarray(state.pop(pre + "post_attention_layernorm.weight"), dtype=dtype)
        for stream, projs in STREAMS.items():
            tensors = [state.pop(f"{pre}{module}.weight") for _, module in projs]
            out[f"blocks.{i}.{stream}.weight"] = _kept(tensors, True) or np.ascontiguousarray(
                np.concatenate([np.asarray(t, dtype=dtype).T for t in tensors], axis=1))
    state.pop("lm_head.weight", None)  # tied checkpoints sometimes store a copy
    check_shapes(cfg, out)
    return out


def _kept(tensors: list, transposed: bool):
    """One engine weight kept as GGUF blocks when any of the HF tensors is
    (minilars.quant.kept_weight: their stored rows stacked); None when all are floats.
    No blocks exist before minilars.quant is imported, so the check imports nothing."""
    quant = sys.modules.get("minilars.quant")
    return quant.kept_weight(tensors, transposed) if quant is not None else None


def to_hf(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face LLaMA state dict from engine parameters (numpy arrays)."""
    outs = stream_outputs(cfg)
    out = {"model.embed_tokens.weight": params["embed.weight"], "model.norm.weight": params["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["head.weight"]
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = params[f"blocks.{i}.attn_norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = params[f"blocks.{i}.mlp_norm.weight"]
        for stream, projs in STREAMS.items():
            w = params[f"blocks.{i}.{stream}.weight"]
            start = 0
            for proj, module in projs:
                width = outs[stream][proj]
                out[f"{pre}{module}.weight"] = np.ascontiguousarray(w[:, start:start + width].T)
                start += width
    return out


def check_shapes(cfg: ModelConfig, params: dict) -> None:
    """Raise ValueError naming the first parameter that is missing or misshapen."""
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"parameter {name!r} is missing")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(params[name].shape)}, config expects {shape}")
    extra = sorted(set(params) - set(expected))
    if extra:
        raise ValueError(f"unexpected parameters: {', '.join(extra[:5])}")


def random_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random engine parameters with O(1) activations: projections ~ N(0, 1/d_in),
    norm weights near 1, embeddings ~ N(0, 1/d)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(".bias"):
            params[name] = (0.1 * rng.standard_normal(shape)).astype(dtype)
        elif len(shape) == 1:  # a norm's weight: near 1 as it acts, (norm_offset + w)
            params[name] = (1.0 - cfg.norm_offset + 0.1 * rng.standard_normal(shape)).astype(dtype)
        elif name in ("embed.weight", "head.weight"):
            params[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(dtype)
        else:
            params[name] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype)
    return params
