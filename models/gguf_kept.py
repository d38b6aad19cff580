"""Read a GGUF file keeping its weights as stored: block formats, memory-mapped.

`load_gguf_kept` returns what `gguf_loader.load_gguf` returns (a ModelConfig and a
state dict with Hugging Face names), except that every matrix (the projections,
the token embedding, an untied head) is a `minilars.quant.QuantizedRows`: the
tensor's blocks as a view of the file's memory map, in its own format (Q8_0, Q4_0,
Q4_1, Q4_K, Q5_K, Q6_K, or F16/F32 rows). Nothing is dequantised and nothing is
read from disk until a product needs a tile (the bytes are then page cache, which
the kernel can drop and read again under memory pressure). Vectors (norm weights)
are float32 copies, as the float loader gives them.

Of the three things gguf_loader undoes, the names and dims are undone the same way
(`hf_name`, reversed dims). llama.cpp's q/k row order (`gguf_loader.permute_qk`)
is undone by reading whole stored rows in another order: the permutation moves
rows of the (out, in) matrix and never splits one, so q's and k's QuantizedRows
carry the order (`QuantizedRows.order`) and the decoders read row i from stored row
order[i]; no block is copied (a copy of q's and k's blocks would be 8.1 MiB for
SmolLM2 in Q4_1).
`weights.from_hf` then fuses the streams' rows (q|k|v, gate|up) into one
`QuantizedWeight` each (`quant.kept_weight`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from minilars.config import ModelConfig
from minilars.quant import KEPT_TYPES, QuantizedRows

from .errors import ModelLoadError
from .gguf_loader import config_from_gguf, gguf_name, hf_name, open_gguf, unpermute_qk
from .layout import expected_shapes


def load_gguf_kept(path: str | Path, reader=None) -> tuple[ModelConfig, dict]:
    """(config, HF-named state) with matrices as QuantizedRows over the file's memory
    map and vectors as float32 arrays. `reader`: an already parsed file (open_gguf)."""
    path = Path(path)
    reader = open_gguf(path) if reader is None else reader
    cfg = config_from_gguf(reader, path)
    shapes = expected_shapes(cfg)
    state: dict = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in shapes:
            raise ModelLoadError("unexpected tensor for a llama model with this config", path, t.name)
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF dims are fastest-first
        if shape != shapes[name]:
            raise ModelLoadError(f"shape {shape} does not match the config, which implies "
                                 f"{shapes[name]} for {name}", path, t.name)
        state[name] = _kept_tensor(t, shape, cfg, name, path)
    missing = [n for n in shapes if n not in state]
    if missing:
        raise ModelLoadError(f"{len(missing)} tensors missing, first {gguf_name(missing[0])!r} ({missing[0]})", path)
    return cfg, {name: state[name] for name in shapes}  # forward-pass order


def _kept_tensor(t, shape: tuple[int, ...], cfg: ModelConfig, name: str, path: Path):
    if t.tensor_type not in KEPT_TYPES:
        raise ModelLoadError(f"type {t.tensor_type.name} cannot be kept as blocks (kept: "
                             f"{', '.join(q.name for q in KEPT_TYPES)}); load it with --weights float32", path, t.name)
    if len(shape) == 1:  # a norm's weight: float32, checked as the float loader checks it
        w = np.array(t.data, dtype=np.float32).reshape(shape)
        if not np.isfinite(w).all():
            raise ModelLoadError("holds NaN or inf values; the file is corrupt", path, t.name)
        return w
    rows = t.data.reshape(shape[0], -1)  # (out, bytes per row) uint8, or float rows
    if t.tensor_type in (Q.F32, Q.F16):
        rows = rows.view(np.uint8)
    return QuantizedRows(rows, t.tensor_type, shape[1], order=_row_order(name, shape[0], cfg))


def _row_order(name: str, n_rows: int, cfg: ModelConfig) -> np.ndarray | None:
    """The stored row each HF row comes from, for q_proj and k_proj (unpermute_qk on
    row indices); None for every other tensor."""
    if name.endswith("self_attn.q_proj.weight"):
        heads = cfg.n_heads
    elif name.endswith("self_attn.k_proj.weight"):
        heads = cfg.n_kv_heads
    else:
        return None
    return unpermute_qk(np.arange(n_rows), heads)


__all__ = ["load_gguf_kept"]
