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

from minilars.config import ModelConfig, RopeScaling
from minilars.files import atomic_write, write_text

from .errors import ModelLoadError
from .families import FAMILIES, Family, family, family_of_hf_model_type
from .layout import LM_HEAD, expected_shapes

# safetensors dtype -> numpy dtype it is read as (BF16 is widened from uint16).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_MAX_HEADER = 100 << 20  # the safetensors spec caps the JSON header at 100 MB
_INDEX = "model.safetensors.index.json"


# config.json keys that do not change the maths: identity, dtype of the file, generation
# defaults and bookkeeping written by transformers, nanotron or transformers.js.
METADATA_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "task_specific_params", "finetuning_task", "tokenizer_class", "prefix", "transformers.js_config",
    "is_llama_config", "pretraining_tp", "cache_implementation", "_sliding_window_pattern",
    # generation defaults old configs carry
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
# Keys every family reads that have no sensible default: a config.json without them is broken.
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# The two rope layouts: transformers 5 writes rope_parameters, older versions rope_theta +
# rope_scaling (+ rope_local_base_freq for Gemma 3).
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq")
# rope_type -> the keys its parameters may hold (anything else changes the maths: refused).
_ROPE_TYPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
}
_HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def config_from_hf(conf: dict, path: Path) -> ModelConfig:
    """ModelConfig from a config.json of any family in models/families.py.

    The family (from model_type) says which keys exist, their transformers defaults
    and which values the engine implements; every key of the file must be one the
    family reads, one whose value it implements, or metadata (METADATA_KEYS), so a
    field the engine does not implement stops the load with its name and value."""
    if not isinstance(conf, dict):
        raise ModelLoadError(f"config.json must hold a JSON object, not {type(conf).__name__}", path)
    fam = family_of_hf_model_type(conf.get("model_type", "llama"))
    if fam is None:
        known = ", ".join(t for f in FAMILIES.values() for t in f.hf_model_types)
        raise ModelLoadError(f"model_type {conf.get('model_type')!r} is not supported (supported: {known})", path)
    _check_keys(conf, fam, path)

    def get(key):
        return conf[key] if key in conf else fam.hf_defaults[key]

    try:
        missing = next((k for k in _REQUIRED if k not in conf), None)
        if missing:
            raise ModelLoadError(f"config.json lacks {missing!r}", path)
        heads, n_layers, dim = int(conf["num_attention_heads"]), int(conf["num_hidden_layers"]), int(conf["hidden_size"])
        head_dim = get("head_dim")
        window, layer_types = _sliding_layers(conf, fam, n_layers, path)
        rope = _rope(conf, fam, path)
        theta, scaling = rope["full"]
        local_theta, local_scaling = rope.get("sliding", (None, None))
        if local_scaling is not None:
            raise ModelLoadError(f"rope scaling ({local_scaling.kind}) on the sliding layers is not implemented", path)
        arch = dict(fam.changes)
        if fam.scaled_embedding:
            arch["embed_scale"] = dim ** 0.5
        if "query_pre_attn_scalar" in fam.hf_defaults:  # scores scaled by query_pre_attn_scalar^-1/2
            scalar = float(get("query_pre_attn_scalar"))
            hd = int(head_dim) if head_dim is not None else dim // heads
            arch["attn_scale"] = None if scalar == hd else scalar ** -0.5
        if "final_logit_softcapping" in fam.hf_defaults and get("final_logit_softcapping") is not None:
            arch["final_softcap"] = float(get("final_logit_softcapping"))
        return ModelConfig(
            vocab_size=int(conf["vocab_size"]),
            dim=dim,
            n_layers=n_layers,
            n_heads=heads,
            n_kv_heads=int(get("num_key_value_heads") or heads),
            ffn_dim=int(conf["intermediate_size"]),
            rope_theta=theta,
            rms_eps=float(get("rms_norm_eps")),
            max_seq_len=int(get("max_position_embeddings")),
            tie_embeddings=bool(get("tie_word_embeddings")),
            head_dim=None if head_dim is None else int(head_dim),
            family=fam.name,
            rope_scaling=scaling,
            local_rope_theta=local_theta,
            sliding_window=window,
            layer_types=layer_types,
            **arch,
        )
    except ModelLoadError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise ModelLoadError(f"config.json does not make a valid config: {e}", path) from e


def _check_keys(conf: dict, fam: Family, path: Path) -> None:
    """Every key is read, fixed to a value the engine implements, or metadata."""
    arch = conf.get("architectures")
    if arch is not None and arch != [fam.hf_architecture]:
        raise ModelLoadError(f"architectures {arch!r} is not supported for model_type {conf.get('model_type')!r} "
                             f"(only [{fam.hf_architecture!r}])", path)
    for key, value in conf.items():
        if key in fam.hf_fixed:
            if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in fam.hf_fixed[key]):
                allowed = " or ".join(repr(v) for v in fam.hf_fixed[key])
                raise ModelLoadError(f"{key} = {value!r} is not implemented (the engine implements {key} = "
                                     f"{allowed} for {fam.name})", path)
        elif key not in fam.hf_defaults and key not in _REQUIRED and key not in _ROPE_KEYS and key not in METADATA_KEYS:
            raise ModelLoadError(f"config field {key!r} (= {value!r}) is not one minilars knows for {fam.name}; "
                                 f"it may change the model, so the load stops here", path)
    if "rope_local_base_freq" in conf and "rope_local_base_freq" not in fam.hf_defaults:
        raise ModelLoadError(f"rope_local_base_freq is not a {fam.name} field", path)


def _sliding_layers(conf: dict, fam: Family, n_layers: int, path: Path) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers' config class derives them."""
    def window(value):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"sliding_window must be a positive integer, got {value!r}", path)
        return value

    def listed_types(value):
        if not isinstance(value, list) or len(value) != n_layers:
            raise ModelLoadError(f"layer_types must list one type per layer ({n_layers}), got {value!r}", path)
        unknown = [t for t in value if t not in _HF_LAYER_TYPES]
        if unknown:
            raise ModelLoadError(f"layer_types holds {unknown[0]!r}, which is not implemented "
                                 f"({', '.join(_HF_LAYER_TYPES)})", path)
        return tuple(_HF_LAYER_TYPES[t] for t in value)

    get = lambda key: conf[key] if key in conf else fam.hf_defaults[key]  # noqa: E731
    if fam.hf_sliding == "none":
        return None, ()
    if fam.hf_sliding == "every_layer":
        w = window(get("sliding_window"))
        return (w, ("sliding",) * n_layers) if w else (None, ())
    if fam.hf_sliding == "qwen":
        if not get("use_sliding_window"):
            types = listed_types(conf["layer_types"]) if conf.get("layer_types") is not None else ()
            if "sliding" in types:
                raise ModelLoadError("layer_types lists sliding layers but use_sliding_window is false", path)
            return None, ()
        w = window(get("sliding_window"))
        if w is None:
            raise ModelLoadError("use_sliding_window is true but sliding_window is null", path)
        if conf.get("layer_types") is not None:
            types = listed_types(conf["layer_types"])
        else:
            first = int(get("max_window_layers"))
            types = tuple("sliding" if i >= first else "full" for i in range(n_layers))
        return _canonical(w, types)
    # layer_types, or every sliding_window_pattern-th layer full (Gemma 3)
    w = window(get("sliding_window"))
    if conf.get("layer_types") is not None:
        types = listed_types(conf["layer_types"])
    else:
        pattern = get("sliding_window_pattern")
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise ModelLoadError(f"sliding_window_pattern must be a positive integer, got {pattern!r}", path)
        if conf.get("_sliding_window_pattern", pattern) != pattern:
            raise ModelLoadError(f"_sliding_window_pattern = {conf['_sliding_window_pattern']!r} disagrees with the "
                                 f"sliding_window_pattern = {pattern!r} transformers uses; add layer_types", path)
        types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(n_layers))
    if "sliding" in types and w is None:
        raise ModelLoadError("layer_types lists sliding layers but sliding_window is null", path)
    return _canonical(w, types)


def _canonical(window: int | None, types: tuple[str, ...]) -> tuple[int | None, tuple[str, ...]]:
    """() and no window when no layer slides: ModelConfig's one way to say "all full"."""
    return (window, types) if "sliding" in types else (None, ())


def _rope(conf: dict, fam: Family, path: Path) -> dict[str, tuple[float, RopeScaling | None]]:
    """{"full": (theta, scaling)[, "sliding": (theta, scaling)]} from either rope layout.

    transformers 5: rope_parameters {"rope_theta", "rope_type", ...}, or for Gemma 3 one
    such dict per layer type {"full_attention": ..., "sliding_attention": ...}.
    Before: rope_theta, rope_scaling {"rope_type" or "type", "factor", ...} (of the full
    layers) and, for Gemma 3, rope_local_base_freq (of the sliding layers)."""
    per_type = "rope_local_base_freq" in fam.hf_defaults
    new, old = conf.get("rope_parameters"), conf.get("rope_scaling")
    if new is not None and old is not None and new != old:
        raise ModelLoadError(f"both rope_parameters ({new!r}) and rope_scaling ({old!r}) are set; "
                             f"they disagree, so the rope is ambiguous", path)
    params = new if new is not None else old
    if params is not None and not isinstance(params, dict):
        raise ModelLoadError(f"rope parameters must be an object, got {params!r}", path)
    nested = params is not None and set(params) <= {"full_attention", "sliding_attention"} and bool(params)
    if nested and not per_type:
        raise ModelLoadError(f"per-layer-type rope parameters are not implemented for {fam.name}", path)
    if per_type:
        full = (params.get("full_attention") if nested else params) or {}
        sliding = (params.get("sliding_attention") if nested else None) or {}
        out = {"full": _rope_of(full, _theta(conf, fam, "rope_theta", full, path), "full_attention", path),
               "sliding": _rope_of(sliding, _theta(conf, fam, "rope_local_base_freq", sliding, path),
                                   "sliding_attention", path)}
        return out
    params = params or {}
    return {"full": _rope_of(params, _theta(conf, fam, "rope_theta", params, path), "rope", path)}


def _theta(conf: dict, fam: Family, key: str, params: dict, path: Path) -> float:
    """The rope base: inside the parameters (new layout), or the top-level key (old)."""
    if "rope_theta" in params:
        if key in conf and float(conf[key]) != float(params["rope_theta"]):
            raise ModelLoadError(f"{key} = {conf[key]!r} disagrees with the rope parameters' rope_theta = "
                                 f"{params['rope_theta']!r}", path)
        return float(params["rope_theta"])
    return float(conf.get(key, fam.hf_defaults[key]))


def _rope_of(params: dict, theta: float, where: str, path: Path) -> tuple[float, RopeScaling | None]:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPE_KEYS:
        raise ModelLoadError(f"rope_type {kind!r} ({where}) is not implemented "
                             f"(implemented: {', '.join(_ROPE_TYPE_KEYS)})", path)
    extra = sorted(set(params) - _ROPE_TYPE_KEYS[kind])
    if extra:
        raise ModelLoadError(f"rope parameter {extra[0]!r} = {params[extra[0]]!r} ({where}, rope_type {kind!r}) "
                             f"is not implemented", path)
    if kind == "default":
        return theta, None
    try:
        if kind == "linear":
            return theta, RopeScaling("linear", float(params["factor"]))
        return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                                  float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ModelLoadError(f"rope_type {kind!r} ({where}) needs {e.args[0]!r}", path) from None


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The config.json of `cfg`'s family that `config_from_hf` reads back (and
    transformers 4.4x-5.x read): rope in the top-level layout both understand."""
    fam = family(cfg.family)
    conf = {
        "architectures": [fam.hf_architecture],
        "model_type": fam.hf_model_types[0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling_to_hf(cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
    }
    if fam.name == "gemma3":
        conf["hidden_activation"] = "gelu_pytorch_tanh"
        conf["rope_local_base_freq"] = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta
        scalar = cfg.head_dim if cfg.attn_scale is None else cfg.attn_scale ** -2
        conf["query_pre_attn_scalar"] = round(scalar) if abs(scalar - round(scalar)) < 1e-9 else scalar
        conf["final_logit_softcapping"] = cfg.final_softcap
        conf["attn_logit_softcapping"] = None
        conf["layer_types"] = [t + "_attention" for t in (cfg.layer_types or ("full",) * cfg.n_layers)]
        conf["sliding_window"] = cfg.sliding_window
    else:
        conf["hidden_act"] = "silu"
        if fam.hf_sliding == "every_layer":
            conf["sliding_window"] = cfg.sliding_window
        elif fam.hf_sliding == "qwen":
            conf["use_sliding_window"] = cfg.sliding_window is not None
            conf["sliding_window"] = cfg.sliding_window
            conf["max_window_layers"] = cfg.n_layers
            if cfg.layer_types:
                conf["layer_types"] = [t + "_attention" for t in cfg.layer_types]
    if fam.name in ("llama", "qwen3"):
        conf["attention_bias"] = False
    if fam.name == "llama":
        conf["mlp_bias"] = False
    _check_describable(cfg, conf)
    return conf


def _rope_scaling_to_hf(scaling: RopeScaling | None) -> dict | None:
    if scaling is None:
        return None
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len}


def _check_describable(cfg: ModelConfig, conf: dict) -> None:
    """A config the family's config.json cannot say (e.g. a q/k norm on a llama) must not
    be saved as if it could: reading the file back has to give `cfg`."""
    back = config_from_hf(json.loads(json.dumps(conf)), Path("config.json"))
    if back != cfg:
        diff = [f"{k}: {getattr(cfg, k)!r} -> {getattr(back, k)!r}" for k in cfg.__dataclass_fields__
                if getattr(cfg, k) != getattr(back, k)]
        raise ValueError(f"the {cfg.family} config.json cannot describe this config ({'; '.join(diff)})")


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
            raise ModelLoadError(f"unexpected tensor for a {cfg.family} model with this config", file, name)
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
