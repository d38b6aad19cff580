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
from .families import FAMILIES
from .gguf_loader import _dequantize, checked_tensors, config_from_gguf, hf_rows, in_forward_order, open_gguf


def load_gguf_kept(path: str | Path, reader=None) -> tuple[ModelConfig, dict]:
    """(config, HF-named state) with matrices as QuantizedRows over the file's memory
    map and vectors as float32 arrays. `reader`: an already parsed file (open_gguf)."""
    path = Path(path)
    reader = open_gguf(path) if reader is None else reader
    cfg = config_from_gguf(reader, path)
    fam = FAMILIES[cfg.family]
    state: dict = {}
    for t, name, shape in checked_tensors(reader, cfg, path, KEPT_TYPES):
        if len(shape) == 1:  # a norm's weight or a bias: float32, unshifted, as the float loader gives it
            state[name] = _dequantize(t, shape, np.dtype(np.float32), cfg, fam, name)
            if not np.isfinite(state[name]).all():
                raise ModelLoadError("holds NaN or inf values; the file is corrupt", path, t.name)
            continue
        rows = t.data.reshape(shape[0], -1)  # (out, bytes per row) uint8, or float rows
        if t.tensor_type in (Q.F32, Q.F16):
            rows = rows.view(np.uint8)
        # llama.cpp's q/k row order (llama only) read through QuantizedRows.order: w_hf[i] = stored row order[i]
        state[name] = QuantizedRows(rows, t.tensor_type, shape[1], order=hf_rows(name, cfg, fam))
    return cfg, in_forward_order(state, cfg, path)


__all__ = ["load_gguf_kept"]
