"""Adapters on disk in the PEFT format, and merged-model export.

A directory holds `adapter_config.json` + `adapter_model.safetensors` with PEFT's
key names for LLaMA models, so PEFT (and the tests' independent torch reference) load
it as they load any adapter:

    LoRA: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  (r, d_in)
          base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  (d_out, r)
          scaling lora_alpha / r
    IA3:  base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l  (d_out, 1)
          base_model.model.model.layers.{i}.mlp.down_proj.ia3_l     (1, d_in)  (feed-forward: input scaling)
    LARS: saved as the LoRA it equals (LARS.md Part 1.5): lora_A = P^T, lora_B = M^T,
          lora_alpha = r so the scaling is 1.

`minilars_adapter.json` beside them records the method (so minilars reloads a LARS
adapter as LARS) and a fingerprint of the base model, so an adapter is never loaded
onto a model it was not trained for.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .files import atomic_write, write_text
from .adapters import IA3Site, LARSSite, LoRASite
from .methods import MethodConfig, apply_method
from .model import Model
from .weights import HF_MODULE, PROJECTION_STREAM

PEFT_PREFIX = "base_model.model.model.layers"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MINILARS_FILE = "minilars_adapter.json"


class AdapterError(ValueError):
    """An adapter directory that cannot be used with this model."""


def model_fingerprint(model: Model) -> str:
    """sha256 over the config and a sample of the frozen weights: equal fingerprints
    mean the same base model."""
    digest = hashlib.sha256(json.dumps(model.cfg.__dict__, sort_keys=True, default=str).encode())
    for name in ("embed.weight", "final_norm.weight", "blocks.0.attn_in.weight"):
        sample = np.ascontiguousarray(model.be.to_numpy(model.params[name]).reshape(-1)[:4096], dtype=np.float32)
        digest.update(np.round(sample, 4).tobytes())
    return digest.hexdigest()[:16]


def _key(layer: int, proj: str, suffix: str) -> str:
    return f"{PEFT_PREFIX}.{layer}.{HF_MODULE[proj]}.{suffix}"


def adapter_tensors(model: Model) -> tuple[dict[str, np.ndarray], dict]:
    """(PEFT-named tensors, adapter_config) for the model's current adapters."""
    method = model.method
    if method is None or method.name not in ("lora", "ia3", "lars"):
        raise AdapterError(f"method {getattr(method, 'name', None)!r} has no adapter to save; "
                           "full fine-tuning is exported as merged weights")
    be = model.be
    tensors: dict[str, np.ndarray] = {}
    for i, block in enumerate(model.sites):
        for site in block.values():
            if isinstance(site, LoRASite):
                for s in site.targets:
                    tensors[_key(i, s, "lora_A.weight")] = be.to_numpy(site.A[s]).T
                    tensors[_key(i, s, "lora_B.weight")] = be.to_numpy(site.B[s]).T
            elif isinstance(site, LARSSite):
                for s, (a, b) in site.as_lora().items():
                    tensors[_key(i, s, "lora_A.weight")] = be.to_numpy(a)
                    tensors[_key(i, s, "lora_B.weight")] = be.to_numpy(b)
            elif isinstance(site, IA3Site):
                for s in site.targets:
                    if site.scale_input:
                        tensors[_key(i, s, "ia3_l")] = be.to_numpy(site.scales["input"])[None, :]
                    else:
                        tensors[_key(i, s, "ia3_l")] = be.to_numpy(site.scales[s])[:, None]
    modules = [HF_MODULE[t].split(".")[-1] for t in method.resolved_targets]
    common = {"base_model_name_or_path": getattr(model, "source", None), "task_type": "CAUSAL_LM",
              "inference_mode": True, "target_modules": modules, "fan_in_fan_out": False}
    if method.name == "ia3":
        config = {"peft_type": "IA3", **common, "init_ia3_weights": True,
                  "feedforward_modules": [m for m in modules if m == "down_proj"]}
    else:
        r = method.rank
        alpha = method.lora_alpha if method.name == "lora" else r  # LARS: scaling 1
        config = {"peft_type": "LORA", **common, "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                  "bias": "none", "use_rslora": False, "init_lora_weights": True}
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
    if method.name in ("lora", "lars"):  # before anything of rank r is allocated
        wrong = [k for k, v in tensors.items() if k.endswith("lora_A.weight") and v.shape[:1] != (method.rank,)]
        if wrong:
            raise AdapterError(f"{directory}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, but "
                               f"adapter_config.json says r = {method.rank}")
    _attach(model, method, tensors, directory)
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


def _method_of(config: dict, info: dict) -> MethodConfig:
    """The MethodConfig an adapter_config.json (+ minilars_adapter.json) describes."""
    peft_type = config.get("peft_type")
    module_to_proj = {module.split(".")[-1]: proj for proj, module in HF_MODULE.items()}
    modules = config["target_modules"]
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TypeError(f"target_modules must be a list of names, got {modules!r}")
    unknown = [m for m in modules if m not in module_to_proj]
    if unknown:
        raise ValueError(f"target module {unknown[0]!r} is not a LLaMA projection")
    targets = tuple(module_to_proj[m] for m in modules)
    if peft_type == "IA3":
        return MethodConfig("ia3", targets=targets)
    if peft_type == "LORA":
        name = "lars" if info.get("method") == "lars" else "lora"
        storage = tuple(tuple(r) for r in info.get("storage", [])) if name == "lars" else ()
        return MethodConfig(name, rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=targets,
                            storage=storage)
    raise ValueError(f"peft_type {peft_type!r} is not supported (LORA, IA3)")


def _attach(model: Model, method: MethodConfig, tensors: dict[str, np.ndarray], directory: Path) -> None:
    be = model.be
    dtype = model.compute_dtype
    if method.name == "lars":
        # The basis is stored: rebuild LARS sites around it without calibrating.
        apply_method(model, MethodConfig("frozen"))
        from .store import StoragePlan
        model.plan = StoragePlan.from_mapping(dict(method.storage))
        for i, block in enumerate(model.sites):
            for stream, site in block.items():
                mine = [t for t in method.resolved_targets if PROJECTION_STREAM[t] == stream]
                if not mine:
                    continue
                basis = _get(tensors, _key(i, mine[0], "lora_A.weight"), (method.rank, site.d_in), directory).T
                block[stream] = LARSSite(site.weight, site.outputs, mine, be.asarray(np.ascontiguousarray(basis)), be, dtype)
        model.method = method
    else:
        apply_method(model, method)
    for i, block in enumerate(model.sites):
        for site in block.values():
            if isinstance(site, LARSSite):
                for s in site.targets:
                    m = _get(tensors, _key(i, s, "lora_B.weight"), (site.outputs[s], site.rank), directory).T
                    site.M[s][...] = be.asarray(np.ascontiguousarray(m, dtype=np.dtype(str(dtype).replace("torch.", ""))))
            elif isinstance(site, LoRASite):
                for s in site.targets:
                    a = _get(tensors, _key(i, s, "lora_A.weight"), (site.rank, site.d_in), directory).T
                    b = _get(tensors, _key(i, s, "lora_B.weight"), (site.outputs[s], site.rank), directory).T
                    site.A[s][...] = be.asarray(np.ascontiguousarray(a))
                    site.B[s][...] = be.asarray(np.ascontiguousarray(b))
            elif isinstance(site, IA3Site):
                for s in site.targets:
                    if site.scale_input:
                        vec = _get(tensors, _key(i, s, "ia3_l"), (1, site.d_in), directory)[0]
                        site.scales["input"][...] = be.asarray(vec)
                    else:
                        vec = _get(tensors, _key(i, s, "ia3_l"), (site.outputs[s], 1), directory)[:, 0]
                        site.scales[s][...] = be.asarray(vec)


def _get(tensors: dict, key: str, shape: tuple, directory: Path) -> np.ndarray:
    if key not in tensors:
        raise AdapterError(f"{directory}: tensor {key} is missing")
    value = tensors[key]
    if tuple(value.shape) != tuple(shape):
        raise AdapterError(f"{directory}: tensor {key} has shape {tuple(value.shape)}, this model needs {tuple(shape)}")
    return value


def export_merged(model: Model, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Fold every adapter into its weight and save a Hugging Face model directory."""
    from .models import hf_loader
    from .weights import to_hf

    state = to_hf(model.cfg, model.merged_params())
    return hf_loader.save_hf_dir(directory, model.cfg, state, tokenizer=tokenizer)
