"""Pretrained weights in: GGUF files, Hugging Face directories, named presets.

Every loader returns the same thing: a `ModelConfig` (its family from the file) and a
state dict with the family's Hugging Face names and (out, in) linear layouts, plus a
`Tokenizer` when the source has one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from minilars.config import ModelConfig

from .cache import cache_dir
from .errors import ModelLoadError
from .registry import MODELS, pull, resolve_model
from .tokenizer import Tokenizer

__all__ = ["load_model_weights", "pull", "resolve_model", "cache_dir", "Tokenizer", "ModelLoadError", "MODELS"]


def load_model_weights(spec: str | Path, dtype=np.float32, keep: bool = False
                       ) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer | None]:
    """(config, HF-layout state dict, tokenizer or None) for a name, a .gguf or an HF directory.
    keep: a GGUF's matrices stay in their block formats (models/gguf_kept.py); an HF
    directory's tensors are floats either way."""
    path = resolve_model(spec)
    if path.is_dir():
        from .hf_loader import load_hf_dir

        cfg, state = load_hf_dir(path, dtype)
        tok = None
        if (path / "tokenizer.json").is_file():
            conf = path / "tokenizer_config.json"
            tok = Tokenizer.from_file(path / "tokenizer.json", conf if conf.is_file() else None)
        return cfg, state, tok
    from .gguf_loader import load_gguf, open_gguf

    reader = open_gguf(path)  # parsed once, for the weights and for the vocabulary
    if keep:
        from .gguf_kept import load_gguf_kept

        cfg, state = load_gguf_kept(path, reader)
    else:
        cfg, state = load_gguf(path, dtype, reader=reader)
    tok = Tokenizer.from_gguf(path, reader=reader) if "tokenizer.ggml.tokens" in reader.fields else None
    return cfg, state, tok
