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
from .backends.base import is_quantized
from .backends.resident import return_freed_heap  # noqa: F401  (re-exported: finetune and the bench call it from here)
from .model import Model
from .weights import from_hf

# What --weights may ask for: keep the source's own formats (a GGUF's blocks; float32
# for a float source), a float dtype, or blocks quantised at load (minilars/quant.py).
WEIGHT_FORMATS = ("keep", "float32", "float16", "q8_0", "q4_0")
WEIGHTS_HELP = ("how the frozen weights are held: keep (a GGUF's block formats as stored, memory-mapped and "
                "dequantised a tile at a time; float32 for a Hugging Face directory or tiny), float32, float16 "
                "(half the memory), or q8_0 / q4_0 (quantised at load, about 1/4 and 1/7 of float32); norms stay "
                "float32")
TINY = "tiny"  # the preset with random weights (seeded) and a character tokenizer, for tests and dry runs


def load_model(spec: str, backend: str | Backend | None = "auto", weights: str = "float32",
               compute_dtype: str = "float32", device: str = "cpu", seed: int = 0, **model_options):
    """(Model, Tokenizer | None) for `spec`.

    backend: a name, "auto" (the fastest installed for `device`,
    backends.default_backend_name) or a Backend. weights (WEIGHT_FORMATS): float32;
    float16 keeps the frozen projections and embeddings in half precision (half the
    weight memory), compute upcasts one weight at a time; keep leaves a GGUF's
    matrices in their block formats (models/gguf_kept.py), q8_0 and q4_0 quantise
    them at load (quant.quantize_weight); the products then dequantise a tile at a
    time (minilars/quant.py). Norm weights and biases (the 1-D parameters) stay float32 (the kernels cast
    them to the compute dtype). seed: the tiny preset's weights (pretrained specs ignore it).
    model_options go to Model (loss_chunk, attention_tile, ...)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weight dtype must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if not isinstance(backend, Backend):
        backend = resolve_backend(backend, device)
    spec = str(spec)
    cfg, params, tokenizer = _tiny(seed) if spec == TINY else _pretrained(spec, weights)
    dtype = "float16" if weights == "float16" else "float32"
    if weights in ("q8_0", "q4_0"):
        from .quant import quantize_weight
    for name in list(params):
        p = params[name]
        if is_quantized(p):
            continue
        if p.ndim == 1:  # norms and biases: small, and kept exact
            params[name] = p.astype(np.float32)
        elif weights in ("q8_0", "q4_0") and p.ndim == 2:
            # the table is stored as it is used (E), a projection as GGUF stores it (W^T)
            params[name] = quantize_weight(p, weights, transposed=name not in ("embed.weight", "head.weight"))
            del p
        else:
            params[name] = p.astype(dtype, copy=False)
    model = Model(cfg, params, backend=backend, compute_dtype=compute_dtype, **model_options)
    model.source = spec
    del params
    return_freed_heap()
    return model, tokenizer


def load_pretrained(spec: str, backend: str | Backend | None = "numpy", weights: str = "float32",
                    compute_dtype: str = "float32", **model_options):
    """`load_model` with the numpy backend by default (the tutorials' reading path)."""
    return load_model(spec, backend, weights, compute_dtype, **model_options)


def weight_summary(model: Model) -> str:
    """How the frozen weights are held, for a run's header: 'float32', or the block
    formats and their size, e.g. 'Q4_1+Q8_0 blocks, 94.4 MiB'."""
    kept = [p for p in model.params.values() if is_quantized(p)]
    if not kept:
        dtypes = {str(p.dtype).replace("torch.", "") for name, p in model.params.items()
                  if not name.endswith("norm.weight")}
        return "+".join(sorted(dtypes))
    formats = "+".join(dict.fromkeys(f for p in kept for f in p.formats.split("+")))
    return f"{formats} blocks, {sum(p.nbytes for p in kept) / 2**20:,.1f} MiB"


def planned_weights(spec: str, weights: str):
    """What the memory planner needs to know of `weights` for `spec` (its weight_format):
    the format itself, float32 for keep on a float source, and for keep on a GGUF the
    formats of each engine weight's parts, read from the file (its header, and q's and
    k's rows, which are reordered; no other tensor is read)."""
    if weights != "keep":
        return weights
    return weight_format_of_params(_kept_params(spec)) if spec != TINY else "float32"


def weight_format_of(model: Model):
    """The planner's weight_format of a loaded model: its kept formats, or its float dtype."""
    return weight_format_of_params(model.params)


def weight_format_of_params(params: dict):
    from .quant import formats_of

    if any(is_quantized(p) for p in params.values()):
        return formats_of(params)
    dtypes = {str(p.dtype).replace("torch.", "") for name, p in params.items() if p.ndim == 2}
    return "float16" if dtypes == {"float16"} else "float32"


def _kept_params(spec: str) -> dict:
    """Engine params of a GGUF spec kept as blocks (no tokenizer); {} for other sources."""
    from .models import resolve_model

    path = resolve_model(spec)
    if path.is_dir():
        return {}
    from .models.gguf_kept import load_gguf_kept

    cfg, state = load_gguf_kept(path)
    return from_hf(cfg, state)


def _pretrained(spec: str, weights: str):
    """(config, engine params, Tokenizer | None) from a name, .gguf or HF directory:
    floats in the asked dtype, or, with keep, a GGUF's matrices as blocks."""
    from .models import load_model_weights

    dtype = np.dtype("float16" if weights == "float16" else "float32")
    cfg, state, tokenizer = load_model_weights(spec, dtype, keep=weights == "keep")  # tensor by tensor
    return cfg, from_hf(cfg, state, dtype), tokenizer  # from_hf empties `state` as it goes


def _tiny(seed: int):
    """(tiny config, float32 random params from `seed`, character tokenizer)."""
    from .config import preset
    from .data import char_tokenizer
    from .weights import random_params

    cfg = preset(TINY)
    return cfg, random_params(cfg, seed, np.float32), char_tokenizer(cfg.vocab_size)


__all__ = ["TINY", "WEIGHTS_HELP", "WEIGHT_FORMATS", "load_model", "load_pretrained", "planned_weights",
           "weight_format_of", "weight_summary"]
