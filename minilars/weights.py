"""Weight naming: the engine's fused layout <-> Hugging Face names of every family.

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
Hugging Face stores each projection separately as (d_out, d_in), q/k/v biases
separately (Qwen2), and names the norms by family (`hf_block_names`): LLaMA's
post_attention_layernorm is the norm before the MLP, Gemma 3's the one on the
attention output (its MLP norm is pre_feedforward_layernorm).
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


# The streams whose projections carry a bias when the architecture says so.
BIASED_STREAMS = {"attn_in": "attn_bias"}


def hf_block_names(cfg: ModelConfig) -> dict[str, str]:
    """Engine tensor under blocks.{i}. -> HF tensor under model.layers.{i}., for the
    per-block tensors that are not projections (the norms)."""
    names = {"attn_norm.weight": "input_layernorm.weight"}
    if cfg.qk_norm:
        names["q_norm.weight"] = "self_attn.q_norm.weight"
        names["k_norm.weight"] = "self_attn.k_norm.weight"
    if cfg.sandwich_norms:  # Gemma 3: a norm before and after each sub-block
        names["attn_post_norm.weight"] = "post_attention_layernorm.weight"
        names["mlp_norm.weight"] = "pre_feedforward_layernorm.weight"
        names["mlp_post_norm.weight"] = "post_feedforward_layernorm.weight"
    else:
        names["mlp_norm.weight"] = "post_attention_layernorm.weight"
    return names


def has_bias(cfg: ModelConfig, stream: str) -> bool:
    return stream in BIASED_STREAMS and getattr(cfg, BIASED_STREAMS[stream])


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
    """Engine parameters from a Hugging Face state dict of `cfg`'s family. The dict is
    consumed: each HF array is popped once converted, so the peak stays near one copy
    of the weights plus one block."""
    embed = state.pop("model.embed_tokens.weight")
    out = {"embed.weight": _kept([embed], False) or np.ascontiguousarray(embed, dtype=dtype),
           "final_norm.weight": np.asarray(state.pop("model.norm.weight"), dtype=dtype)}
    if not cfg.tie_embeddings:
        head = state.pop("lm_head.weight")
        out["head.weight"] = _kept([head], False) or np.ascontiguousarray(head, dtype=dtype)
    norms = hf_block_names(cfg)
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        for engine, hf in norms.items():
            out[f"blocks.{i}.{engine}"] = np.asarray(state.pop(pre + hf), dtype=dtype)
        for stream, projs in STREAMS.items():
            tensors = [state.pop(f"{pre}{module}.weight") for _, module in projs]
            out[f"blocks.{i}.{stream}.weight"] = _kept(tensors, True) or np.ascontiguousarray(
                np.concatenate([np.asarray(t, dtype=dtype).T for t in tensors], axis=1))
            if has_bias(cfg, stream):
                biases = [np.asarray(state.pop(f"{pre}{module}.bias"), dtype=dtype) for _, module in projs]
                out[f"blocks.{i}.{stream}.bias"] = np.concatenate(biases)
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
    """Hugging Face state dict of `cfg`'s family from engine parameters (numpy arrays)."""
    outs = stream_outputs(cfg)
    out = {"model.embed_tokens.weight": params["embed.weight"], "model.norm.weight": params["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["head.weight"]
    norms = hf_block_names(cfg)
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        for engine, hf in norms.items():
            out[pre + hf] = params[f"blocks.{i}.{engine}"]
        for stream, projs in STREAMS.items():
            w = params[f"blocks.{i}.{stream}.weight"]
            b = params[f"blocks.{i}.{stream}.bias"] if has_bias(cfg, stream) else None
            start = 0
            for proj, module in projs:
                width = outs[stream][proj]
                out[f"{pre}{module}.weight"] = np.ascontiguousarray(w[:, start:start + width].T)
                if b is not None:
                    out[f"{pre}{module}.bias"] = np.ascontiguousarray(b[start:start + width])
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
