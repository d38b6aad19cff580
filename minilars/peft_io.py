"""Adapters on disk in the PEFT format, and merged-model export.

A directory holds `adapter_config.json` + `adapter_model.safetensors` with PEFT's
key names, which are the same for every family minilars loads (LLaMA, Mistral, Qwen2,
Qwen3, Gemma 3 all name their projections model.layers.{i}.self_attn.q_proj, ...,
mlp.down_proj), so PEFT (and the tests' independent torch reference) load it onto the
family's transformers model as they load any adapter:

    LoRA: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  (r, d_in)
          base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  (d_out, r)
          scaling lora_alpha / r
    IA3:  base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l  (d_out, 1)
          base_model.model.model.layers.{i}.mlp.down_proj.ia3_l     (1, d_in)  (feed-forward: input scaling)
    LARS: saved as the LoRA it equals (docs/lars.md Part 1.5): lora_A = P^T, lora_B = M^T,
          lora_alpha = r so the scaling is 1.

Each method's module (minilars/methods/<name>.py) names and shapes its own tensors
(peft_tensors, load_site) and config fields (peft_config); this module reads and
writes the files. `minilars_adapter.json` beside them records the method (so minilars reloads a LARS
adapter as LARS) and a fingerprint of the base model, so an adapter is never loaded
onto a model it was not trained for.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import numpy as np

from .backends.base import is_quantized
from .files import atomic_write, write_text
from .methods import method_for_adapter
from .model import Model
from .weights import HF_MODULE

PEFT_PREFIX = "base_model.model.model.layers"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MINILARS_FILE = "minilars_adapter.json"


class AdapterError(ValueError):
    """An adapter directory that cannot be used with this model."""


def model_fingerprint(model: Model) -> str:
    """sha256 over the config and a sample of the frozen weights: equal fingerprints
    mean the same base model."""
    digest = hashlib.sha256(json.dumps(model.cfg.identity(), sort_keys=True, default=str).encode())
    for name in ("embed.weight", "final_norm.weight", "blocks.0.attn_in.weight"):
        p = model.params[name]
        if is_quantized(p):  # GGUF blocks: the same values, dequantised (a few rows, not the table)
            sample = p.first_values(4096, model.be.decode_tile)
        else:
            sample = np.ascontiguousarray(model.be.to_numpy(p).reshape(-1)[:4096], dtype=np.float32)
        digest.update(np.round(sample, 4).tobytes())
    return digest.hexdigest()[:16]


def _key(layer: int, proj: str, suffix: str) -> str:
    return f"{PEFT_PREFIX}.{layer}.{HF_MODULE[proj]}.{suffix}"


def adapter_tensors(model: Model) -> tuple[dict[str, np.ndarray], dict]:
    """(PEFT-named tensors, adapter_config) for the model's current adapters."""
    method = model.method
    if method is None or not method.kind.saves_adapter:
        raise AdapterError(f"method {getattr(method, 'name', None)!r} has no adapter to save; "
                           "full fine-tuning is exported as merged weights")
    kind = method.kind
    tensors: dict[str, np.ndarray] = {}
    for i, block in enumerate(model.sites):
        for site in block.values():
            if isinstance(site, kind.site_class):
                tensors.update(kind.peft_tensors(site, partial(_key, i), model.be))
    modules = [HF_MODULE[t].split(".")[-1] for t in method.resolved_targets]
    common = {"base_model_name_or_path": getattr(model, "source", None), "task_type": "CAUSAL_LM",
              "inference_mode": True, "target_modules": modules, "fan_in_fan_out": False}
    config = kind.peft_config(common, tensors)
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}, config  # the adapter's own dtype


def save_adapter(model: Model, directory: str | os.PathLike) -> Path:
    """Write the model's adapter in PEFT format (atomically, file by file)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, config = adapter_tensors(model)
    method = model.method
    info = {"method": method.name, "rank": method.rank, "alpha": method.lora_alpha,
            "targets": list(method.resolved_targets), "storage": [list(r) for r in method.storage],
            "base_fingerprint": model_fingerprint(model), "config": model.cfg.__dict__}
    size = sum(a.nbytes for a in tensors.values()) + 256 * (len(tensors) + 1)
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}), size)
    write_text(directory / CONFIG_FILE, json.dumps(config, indent=2))
    write_text(directory / MINILARS_FILE, json.dumps(info, indent=2, default=str))
    return directory


def load_adapter(model: Model, directory: str | os.PathLike, calibration_tokens=None) -> Model:
    """Attach the adapter saved in `directory` to `model` (frozen base weights).
    A LARS adapter comes back as LARS (basis P = lora_A^T); any other LoRA as LoRA."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise AdapterError(f"{directory}: no {name}; is this a PEFT adapter directory?")
    config = _read_json(directory / CONFIG_FILE)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{directory / WEIGHTS_FILE}: unreadable adapter weights ({exc})") from None
    for key, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise AdapterError(f"{directory / WEIGHTS_FILE}: tensor {key} holds NaN or inf; the file is corrupt")
    info = _read_json(directory / MINILARS_FILE) if (directory / MINILARS_FILE).is_file() else {}
    expected = info.get("base_fingerprint")
    if expected and expected != model_fingerprint(model):
        raise AdapterError(f"{directory}: adapter was trained on a different base model "
                           f"(fingerprint {expected}, this model {model_fingerprint(model)})")
    try:
        method = _method_of(config, info)
    except (KeyError, TypeError, ValueError) as exc:  # a field missing, of the wrong type or out of range
        raise AdapterError(f"{directory / CONFIG_FILE}: unusable adapter config ({type(exc).__name__}: "
                           f"{exc})") from None
    if method.kind.has_rank:  # before anything of rank r is allocated
        wrong = [k for k, v in tensors.items() if k.endswith("lora_A.weight") and v.shape[:1] != (method.rank,)]
        if wrong:
            raise AdapterError(f"{directory}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, but "
                               f"adapter_config.json says r = {method.rank}")

    def tensors_of(layer: int):
        return lambda proj, suffix, shape: _get(tensors, _key(layer, proj, suffix), shape, directory)

    method.kind.attach(model, tensors_of)
    return model


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; AdapterError naming it otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise AdapterError(f"{path}: unreadable ({exc})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _method_of(config: dict, info: dict):
    """The MethodConfig an adapter_config.json (+ minilars_adapter.json) describes:
    the registered method that reads this peft_type builds it."""
    kind = method_for_adapter(config.get("peft_type"), info.get("method"))
    module_to_proj = {module.split(".")[-1]: proj for proj, module in HF_MODULE.items()}
    modules = config["target_modules"]
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TypeError(f"target_modules must be a list of names, got {modules!r}")
    unknown = [m for m in modules if m not in module_to_proj]
    if unknown:
        raise ValueError(f"target module {unknown[0]!r} is not a projection minilars adapts "
                         f"({', '.join(module_to_proj)})")
    return kind.config_from_peft(config, info, tuple(module_to_proj[m] for m in modules))


def _get(tensors: dict, key: str, shape: tuple, directory: Path) -> np.ndarray:
    if key not in tensors:
        raise AdapterError(f"{directory}: tensor {key} is missing")
    value = tensors[key]
    if tuple(value.shape) != tuple(shape):
        raise AdapterError(f"{directory}: tensor {key} has shape {tuple(value.shape)}, this model needs {tuple(shape)}")
    return value


def export_merged(model: Model, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Fold every adapter into its weight and save a Hugging Face model directory of the
    model's family (transformers loads it as that family's CausalLM class)."""
    from .models import hf_loader
    from .weights import to_hf

    state = to_hf(model.cfg, model.merged_params())
    return hf_loader.save_hf_dir(directory, model.cfg, state, tokenizer=tokenizer)
