"""A Model (and its tokenizer) from a preset name, a GGUF file or a Hugging Face directory."""
from __future__ import annotations

import numpy as np

from .backends import Backend
from .model import Model
from .weights import from_hf

WEIGHT_DTYPES = ("float32", "float16")


def load_pretrained(spec: str, backend: str | Backend | None = "numpy", weight_dtype: str = "float32",
                    compute_dtype: str = "float32", **model_options):
    """(Model, Tokenizer | None). weight_dtype float16 keeps the frozen projections
    and embeddings in half precision (half the weight memory); compute upcasts one
    weight at a time. Norm weights stay in the compute dtype."""
    from .models import load_model_weights

    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    cfg, state, tokenizer = load_model_weights(spec, np.dtype(weight_dtype))  # dequantised tensor by tensor
    params = from_hf(cfg, state, np.dtype(weight_dtype))  # empties `state` as it goes
    for name in params:  # norm weights are tiny: keep them in float32 (the kernels cast to the compute dtype)
        if name.endswith("norm.weight"):
            params[name] = params[name].astype(np.float32)
    model = Model(cfg, params, backend=backend, compute_dtype=compute_dtype, **model_options)
    model.source = str(spec)
    return model, tokenizer
