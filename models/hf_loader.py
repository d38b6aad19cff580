"""Read and write Hugging Face LLaMA model directories (config.json + *.safetensors).

Reading goes through the `safetensors` package with its NumPy front end. NumPy has
no bfloat16, which is how most HF checkpoints are stored, so BF16 tensors are
memory-mapped as uint16 and widened by hand: a bf16 value is the top half of a
float32, so `u16 << 16` reinterpreted as float32 is exact.

Every file's header is parsed and checked (offsets inside the file, byte count ==
prod(shape) * itemsize, shape == what the config implies) before a tensor is
read, so a truncated or mismatched checkpoint fails with a ModelLoadError that
names the file and tensor instead of allocating or broadcasting garbage.
"""
from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

import numpy as np

from minilars.config import ModelConfig
from minilars.files import atomic_write, write_text

from .errors import ModelLoadError
from .layout import LM_HEAD, expected_shapes

# safetensors dtype -> numpy dtype it is read as (BF16 is widened from uint16).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_MAX_HEADER = 100 << 20  # the safetensors spec caps the JSON header at 100 MB
_INDEX = "model.safetensors.index.json"


def config_from_hf(conf: dict, path: Path) -> ModelConfig:
    """ModelConfig from LlamaConfig keys, with LlamaConfig's defaults."""
    if conf.get("model_type", "llama") != "llama":
        raise ModelLoadError(f"model_type {conf.get('model_type')!r} is not supported (only 'llama')", path)
    if conf.get("rope_scaling"):
        raise ModelLoadError(f"rope_scaling {conf['rope_scaling']!r} is not supported", path)
    if conf.get("attention_bias") or conf.get("mlp_bias"):
        raise ModelLoadError("attention_bias / mlp_bias are not supported", path)
    if conf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {conf['hidden_act']!r} is not supported (only 'silu')", path)
    try:
        heads = int(conf["num_attention_heads"])
        return ModelConfig(
            vocab_size=int(conf["vocab_size"]),
            dim=int(conf["hidden_size"]),
            n_layers=int(conf["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(conf.get("num_key_value_heads") or heads),
            ffn_dim=int(conf["intermediate_size"]),
            rope_theta=float(conf.get("rope_theta", 10000.0)),
            rms_eps=float(conf.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(conf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
            head_dim=None if conf.get("head_dim") is None else int(conf["head_dim"]),
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks {e.args[0]!r}", path) from None
    except (TypeError, ValueError, OverflowError) as e:
        raise ModelLoadError(f"config.json does not make a valid config: {e}", path) from e


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """LlamaConfig keys for `cfg` (what `config_from_hf` reads back)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
    }


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte where the data starts), validated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError("file too short for a safetensors header", path)
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ModelLoadError(f"header length {n} does not fit in a {size}-byte file (truncated?)", path)
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"cannot read: {e}", path) from e
    except ValueError as e:
        raise ModelLoadError(f"corrupt safetensors header: {e}", path) from e
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"malformed header entry {info!r}", path, name) from None
        if dtype in _DTYPES and end - begin != prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
            raise ModelLoadError(f"byte range {begin}..{end} does not hold {dtype} {shape}", path, name)
        if not 0 <= begin <= end <= size - start:
            raise ModelLoadError(f"data needs bytes {start + begin}..{start + end} of a {size}-byte file "
                                 f"(truncated?)", path, name)
    return header, start


def _shards(directory: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file that holds it."""
    index = directory / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"unreadable index ({e})", index) from e
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError("no *.safetensors files", directory)
    where: dict[str, Path] = {}
    for file in files:
        for name in read_header(file)[0]:
            if name in where:
                raise ModelLoadError(f"tensor is in both {where[name].name} and {file.name}", file, name)
            where[name] = file
    return where


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    # Old checkpoints saved RoPE's inverse frequencies; tied ones sometimes also
    # save lm_head, which is the embedding by definition.
    return name.endswith("rotary_emb.inv_freq") or (name == LM_HEAD and cfg.tie_embeddings)


def load_hf_dir(path: str | Path, dtype=np.float32) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, state dict) from a Hugging Face LLaMA directory, one tensor at a time."""
    from safetensors import safe_open

    path = Path(path)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    conf_path = path / "config.json"
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError("no such file", conf_path) from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"unreadable config.json ({e})", conf_path) from e
    cfg = config_from_hf(conf, conf_path)
    shapes = expected_shapes(cfg)
    where = _shards(path)
    for name, file in where.items():
        if name not in shapes and not _ignorable(name, cfg):
            raise ModelLoadError("unexpected tensor for a llama model with this config", file, name)
    missing = [n for n in shapes if n not in where]
    if missing:
        raise ModelLoadError(f"{len(missing)} tensors missing, first {missing[0]!r}", path)

    state: dict[str, np.ndarray] = {}
    for file in sorted(set(where[n] for n in shapes)):
        if not file.is_file():
            raise ModelLoadError("shard named in the index does not exist", file)
        header, start = read_header(file)
        names = [n for n in shapes if where[n] == file]
        for name in names:
            if name not in header:
                raise ModelLoadError("the index places the tensor in this file, but it is not there", file, name)
            info = header[name]
            if info["dtype"] not in _DTYPES:
                raise ModelLoadError(f"dtype {info['dtype']} is not supported "
                                     f"(supported: {', '.join(_DTYPES)})", file, name)
            if tuple(info["shape"]) != shapes[name]:
                raise ModelLoadError(f"shape {tuple(info['shape'])} does not match the config, "
                                     f"which implies {shapes[name]}", file, name)
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in names:
                    info = header[name]
                    if info["dtype"] == "BF16":
                        state[name] = _read_bf16(file, start + info["data_offsets"][0], shapes[name], dtype)
                    else:
                        state[name] = f.get_tensor(name).astype(dtype, copy=False)
                    if not np.isfinite(state[name]).all():  # no trained model holds them: damaged bytes
                        raise ModelLoadError("holds NaN or inf values; the file is corrupt", file, name)
        except ModelLoadError:
            raise
        except Exception as e:  # SafetensorError and friends
            raise ModelLoadError(f"cannot read safetensors data ({e})", file) from e
    return cfg, state


def _read_bf16(file: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    raw = np.memmap(file, dtype="<u2", mode="r", offset=offset, shape=shape)
    wide = (raw.astype(np.uint32) << 16).view(np.float32)  # bf16 is the high half of f32
    del raw
    return wide.astype(dtype, copy=False)


def save_hf_dir(path: str | Path, cfg: ModelConfig, state_dict: dict[str, np.ndarray], tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) that `load_hf_dir` reads back, each
    atomically (minilars/files.py: a failed write is one WriteError, the old file kept)."""
    from safetensors.numpy import save_file

    path = Path(path)
    shapes = expected_shapes(cfg)
    extra = sorted(set(state_dict) - set(shapes))
    missing = [n for n in shapes if n not in state_dict]
    if extra or missing:
        raise ValueError(f"state dict does not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(state_dict[name].shape)}, config implies {shape}")
    dtypes = {np.dtype(a.dtype) for a in state_dict.values()}
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: np.ascontiguousarray(state_dict[n]) for n in shapes}
    size = sum(t.nbytes for t in tensors.values()) + 256 * (len(tensors) + 1)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                 size)  # "pt" so transformers accepts the file
    conf = config_to_hf(cfg, dtype=dtypes.pop().name if len(dtypes) == 1 else "float32")
    if tokenizer is not None:
        conf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        tokenizer.save(path)
    write_text(path / "config.json", json.dumps(conf, indent=2) + "\n")
    return path
