"""A Model (and its tokenizer) from a spec: a registered name, a .gguf file, a Hugging
Face directory, or "tiny" (the random tiny preset with a character tokenizer).

`load_model` is the one loader: `minilars generate`, `eval`, `finetune`, the study's
runs and the benchmarks all load through it, so a model records the same things
about where it came from whichever command loaded it (`model.source`, the spec,
which PEFT exports write as base_model_name_or_path).
"""
from __future__ import annotations

import numpy as np

from .backends import Backend, resolve_backend
from .model import Model
from .weights import from_hf

WEIGHT_DTYPES = ("float32", "float16")
TINY = "tiny"  # the preset with random weights (seeded) and a character tokenizer, for tests and dry runs


def load_model(spec: str, backend: str | Backend | None = "auto", weight_dtype: str = "float32",
               compute_dtype: str = "float32", device: str = "cpu", seed: int = 0, **model_options):
    """(Model, Tokenizer | None) for `spec`.

    backend: a name, "auto" (the fastest installed for `device`,
    backends.default_backend_name) or a Backend. weight_dtype float16 keeps the frozen
    projections and embeddings in half precision (half the weight memory); compute
    upcasts one weight at a time. Norm weights and biases (the 1-D parameters) stay
    float32 (the kernels cast them to the compute dtype). seed: the tiny preset's weights (pretrained specs ignore it).
    model_options go to Model (loss_chunk, attention_tile, ...)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if not isinstance(backend, Backend):
        backend = resolve_backend(backend, device)
    spec = str(spec)
    cfg, params, tokenizer = _tiny(seed) if spec == TINY else _pretrained(spec, weight_dtype)
    for name in params:
        if params[name].ndim == 1:  # norms and biases: small, and kept exact
            params[name] = params[name].astype(np.float32)
        else:
            params[name] = params[name].astype(weight_dtype, copy=False)
    model = Model(cfg, params, backend=backend, compute_dtype=compute_dtype, **model_options)
    model.source = spec
    return model, tokenizer


def load_pretrained(spec: str, backend: str | Backend | None = "numpy", weight_dtype: str = "float32",
                    compute_dtype: str = "float32", **model_options):
    """`load_model` with the numpy backend by default (the tutorials' reading path)."""
    return load_model(spec, backend, weight_dtype, compute_dtype, **model_options)


def _pretrained(spec: str, weight_dtype: str):
    """(config, engine params in weight_dtype, Tokenizer | None) from a name, .gguf or HF directory."""
    from .models import load_model_weights

    cfg, state, tokenizer = load_model_weights(spec, np.dtype(weight_dtype))  # dequantised tensor by tensor
    return cfg, from_hf(cfg, state, np.dtype(weight_dtype)), tokenizer  # from_hf empties `state` as it goes


def _tiny(seed: int):
    """(tiny config, float32 random params from `seed`, character tokenizer)."""
    from .config import preset
    from .data import char_tokenizer
    from .weights import random_params

    cfg = preset(TINY)
    return cfg, random_params(cfg, seed, np.float32), char_tokenizer(cfg.vocab_size)


__all__ = ["TINY", "WEIGHT_DTYPES", "load_model", "load_pretrained"]
