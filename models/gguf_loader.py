"""Read a llama.cpp GGUF file into a ModelConfig and a Hugging Face-layout state dict.

general.architecture picks the family (models/families.py): "llama" (Llama 1-3, SmolLM2,
and Mistral, which llama.cpp's converter writes as llama), "qwen2", "qwen3", "gemma3".
Four things differ between a GGUF and the HF checkpoint it was converted from, and
each is undone here, as llama.cpp's convert_hf_to_gguf.py and src/llama-model.cpp
define them:

* names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight` etc.
  (gguf-py's constants.py); `blk.{i}.ffn_norm` is LLaMA's post_attention_layernorm
  but Gemma 3's pre_feedforward_layernorm;
* dims: GGUF lists dims fastest-first ([in, out]); `gguf.GGUFReader` already
  reverses them, so a linear weight arrives as (out, in), as in torch;
* q/k rows, llama architecture only: the converter (`LlamaModel.permute`) reorders
  the rows of q_proj and k_proj inside each head, because ggml's "normal" RoPE
  rotates adjacent pairs (2j, 2j+1) while HF's `rotate_half` pairs j with j + hd/2.
  `unpermute_qk` puts the HF order back. qwen2, qwen3 and gemma3 use ggml's NEOX RoPE,
  which is rotate-half, and are stored in HF order;
* Gemma's norms: the converter stores (1 + w) (`Gemma3Model.norm_shift`), so 1 is
  subtracted to give the checkpoint's w (the engine applies (1 + w) itself).

The architecture's numbers come from `{arch}.*` keys as llama.cpp reads them,
including what it fixes in code rather than metadata: for gemma3 every 6th layer is
global and the others slide over `attention.sliding_window` tokens with rope base
10000 (`set_swa_pattern(6)`, `rope_freq_base_train_swa`), and the score scale is
1/sqrt(head_dim) except for the 62-layer (27B) model. Llama 3's rope scaling is the
`rope_freqs.weight` tensor (one divisor per frequency), which `llama3_scaling_from_freqs`
turns back into RopeScaling("llama3", ...). Keys llama.cpp reads that the engine does not
implement (yarn or other rope scaling, experts, attention-logit soft-capping, partial
rotary dims, per-layer head counts) stop the load with a ModelLoadError naming them.

Quantised blocks (Q8_0, Q4_0, Q4_1) are dequantised one tensor at a time with
`gguf.quants.dequantize`, so peak memory is one float copy of the weights plus one
tensor's temporaries. `hf_name` (the name mapping) and `hf_rows` / `norm_shift` (the
per-tensor fixes) are what a reader that keeps the quantised blocks needs too. The
file is memory-mapped; every tensor's byte range is checked against the file size
before it is touched, so a truncated or corrupted file fails with a ModelLoadError
naming the tensor, never with a huge allocation.
"""
from __future__ import annotations

import re
from math import prod
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType
from gguf.quants import dequantize

from minilars.config import ModelConfig, RopeScaling
from minilars.ops import rope_inv_freq

from .errors import ModelLoadError
from .families import FAMILIES, Family, family_of_gguf_architecture
from .layout import EMBED, FINAL_NORM, LM_HEAD, expected_shapes, layer_prefix

_ARRAY = int(GGUFValueType.ARRAY)
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)

_GLOBAL_NAMES = {"token_embd.weight": EMBED, "output_norm.weight": FINAL_NORM, "output.weight": LM_HEAD}
# llama.cpp's block tensors (gguf-py constants.py, MODEL_TENSOR) -> HF module under model.layers.{i}.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3, gemma3
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",  # LLaMA's norm before the MLP
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3's sandwich norms: ffn_norm is the pre-MLP norm, post_attention_norm the one on
# the attention output (HF's post_attention_layernorm), post_ffw_norm the one on the MLP's.
_SANDWICH_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def block_names(cfg: ModelConfig | None = None) -> dict[str, str]:
    """GGUF block tensor -> HF module, for `cfg`'s family (LLaMA's when None)."""
    return {**_BLOCK_NAMES, **_SANDWICH_NAMES} if cfg is not None and cfg.sandwich_norms else dict(_BLOCK_NAMES)


def hf_name(gguf_name: str, cfg: ModelConfig | None = None) -> str | None:
    """GGUF tensor name -> HF name; None for a tensor this engine has no use for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    names = block_names(cfg)
    if m and m.group(2) in names:
        return f"{layer_prefix(int(m.group(1)))}{names[m.group(2)]}.{m.group(3)}"
    return None


def gguf_name(hf: str, cfg: ModelConfig | None = None) -> str:
    """HF name -> GGUF tensor name (inverse of `hf_name`)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    for g, h in block_names(cfg).items():
        if m and m.group(2) == h:
            return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    raise KeyError(hf)


def hf_rows(name: str, cfg: ModelConfig, fam: Family) -> np.ndarray | None:
    """Row order that puts a GGUF tensor's rows in the HF checkpoint's order
    (w_hf = w_gguf[rows]): q and k of the llama architecture; None for the rest.
    Rows are whole quantisation blocks, so the order applies to kept blocks too."""
    if not fam.gguf_permute_qk:
        return None
    for proj, heads in (("self_attn.q_proj.", cfg.n_heads), ("self_attn.k_proj.", cfg.n_kv_heads)):
        if proj in name:
            return unpermute_qk(np.arange(heads * cfg.head_dim), heads)
    return None


def norm_shift(name: str, fam: Family) -> float:
    """What the converter added to a norm weight (Gemma: 1, stored as 1 + w); 0 otherwise."""
    return fam.gguf_norm_shift if name.endswith("norm.weight") else 0.0


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> GGUF row order, as llama.cpp's converter does it.

    Within each head the rows [x_0..x_{hd/2-1} | y_0..y_{hd/2-1}] (rotate-half
    pairs) become [x_0, y_0, x_1, y_1, ...] (adjacent pairs).
    w: [n_head*hd, ...] -> [n_head*hd, ...]
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: adjacent pairs back to rotate-half halves.

    w: [n_head*hd, ...] -> [n_head*hd, ...]
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that refuses to read past the end of the file.

    The stock reader slices its memmap, and a slice past the end is silently
    short: a truncated file then fails in a reshape with no tensor name, and a
    corrupted array length can make it loop for a very long time. These overrides
    hook private methods of gguf-py (stable from 0.10 to 0.19); the truncation
    tests in tests/test_loaders.py catch it if a new version stops calling them.
    """

    def __init__(self, path: Path):
        self._path = path
        super().__init__(path)

    def _fail(self, message: str, tensor: str | None = None):
        raise ModelLoadError(message, self._path, tensor)

    def _get(self, offset, dtype, count=1, override_order=None):
        # Same contract as GGUFReader._get, on a plain-ndarray view of the map:
        # slicing np.memmap runs Python hooks per slice, which made parsing a
        # 49k-token vocabulary take seconds.
        raw = self.__dict__.get("_raw")
        if raw is None:
            raw = self._raw = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        end = int(offset) + dtype.itemsize * int(count)
        if end > raw.size:
            self._fail(f"truncated or corrupt header: needs byte {end}, file has {raw.size}")
        arr = raw[int(offset):end].view(dtype)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        if int(raw_type) == _ARRAY:
            # Each element takes at least its scalar size (8 bytes of length for a
            # string), so an array longer than the rest of the file is corrupt.
            item_type = int(self._get(orig_offs, np.uint32)[0])
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = self.gguf_scalar_to_np.get(item_type)
            min_size = np.dtype(scalar).itemsize if scalar is not None else 8
            if orig_offs + 12 + count * min_size > len(self.data):
                self._fail(f"corrupt metadata: an array of {count} items does not fit in the file")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = Q(int(raw_type[0]))
            except ValueError:
                self._fail(f"unknown ggml type id {int(raw_type[0])}", name)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = prod(int(x) for x in dims)  # Python ints: no overflow on garbage dims
            if dims.size and int(dims[0]) % block:
                self._fail(f"row length {int(dims[0])} is not a multiple of the {qtype.name} block size {block}", name)
            begin = int(start_offs) + int(offset[0])
            end = begin + n // block * type_size
            if end > len(self.data):
                self._fail(f"data needs bytes {begin}..{end} but the file has only {len(self.data)} "
                           f"(truncated?)", name)
        super()._build_tensors(start_offs, fields)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Memory-map and parse a GGUF file; any failure becomes a ModelLoadError."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError("no such file", path)
    try:
        return _CheckedReader(path)
    except ModelLoadError:
        raise
    except Exception as e:  # gguf-py raises ValueError, KeyError, IndexError... on bad input
        raise ModelLoadError(f"not a readable GGUF file ({type(e).__name__}: {e})", path) from e


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    """Metadata value; float32 values come back as the shortest decimal that round-trips.

    GGUF stores e.g. rms_eps as float32, so 1e-5 reads back as 9.9999997e-06; the
    shortest float32 repr recovers the decimal the model author wrote.
    """
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        value = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:  # damaged bytes inside a value
        raise ModelLoadError(f"metadata {key!r} is unreadable ({type(e).__name__}: {e})",
                             getattr(reader, "_path", None)) from None
    if field.types == [GGUFValueType.FLOAT32]:
        value = float(str(np.float32(value)))
    return value


# {arch}.* keys llama.cpp reads whose values this engine does not implement: -> the values it does.
_REFUSED_KEYS = {
    "expert_count": (0,),  # mixture of experts (Mixtral is written as llama with experts)
    "attn_logit_softcapping": (),  # Gemma 2's soft cap on attention scores
    "attention.causal": (True,),
    "attention.clamp_kqv": (),
    "use_parallel_residual": (False,),
}


def config_from_gguf(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    """ModelConfig from the `{arch}.*` metadata keys, as llama.cpp reads them for the
    family that general.architecture names."""
    arch = field_value(reader, "general.architecture")
    fam = family_of_gguf_architecture(arch)
    if fam is None:
        known = ", ".join(a for f in FAMILIES.values() for a in f.gguf_architectures)
        raise ModelLoadError(f"architecture {arch!r} is not supported (supported: {known})", path)

    def key(name):
        return f"{arch}.{name}"

    def value(name, default=None):
        v = field_value(reader, key(name), default)
        if isinstance(v, list):  # llama.cpp allows per-layer arrays for head counts and widths
            raise ModelLoadError(f"metadata {key(name)!r} is per layer ({v[:4]}...); per-layer "
                                 f"shapes are not implemented", path)
        return v

    def need(name):
        v = value(name)
        if v is None:
            raise ModelLoadError(f"metadata key {key(name)!r} is missing", path)
        return v

    for name, allowed in _REFUSED_KEYS.items():
        v = field_value(reader, key(name))
        if v is not None and v not in allowed:
            raise ModelLoadError(f"metadata {key(name)} = {v!r} is not implemented", path)
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)
    elif key("vocab_size") in reader.fields:
        vocab = value("vocab_size")
    elif "token_embd.weight" in names:  # the converter writes {arch}.vocab_size for llama only
        vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
    else:
        raise ModelLoadError(f"no tokenizer.ggml.tokens, no {key('vocab_size')} and no token_embd.weight: "
                             f"vocabulary size unknown", path)
    n_heads, dim, n_layers = int(need("attention.head_count")), int(need("embedding_length")), int(need("block_count"))
    head_dim = value("attention.key_length")
    head_dim = dim // max(n_heads, 1) if head_dim is None else int(head_dim)
    if value("attention.value_length", head_dim) != head_dim:
        raise ModelLoadError(f"{key('attention.value_length')} = {value('attention.value_length')} differs from "
                             f"the key length {head_dim}; that is not implemented", path)
    rope_dims = value("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ModelLoadError(f"partial rotary embeddings ({key('rope.dimension_count')} = {rope_dims}, head "
                             f"dim {head_dim}) are not implemented", path)
    theta = float(value("rope.freq_base", 10000.0))  # llama.cpp's default base
    arch_fields: dict = dict(fam.changes)
    arch_fields["rope_scaling"] = _rope_scaling(reader, key, fam, names, theta, head_dim, path)
    if fam.scaled_embedding:
        arch_fields["embed_scale"] = dim ** 0.5
    if fam.hf_sliding == "layer_types":  # gemma3, as llama-model.cpp sets it up
        window = value("attention.sliding_window")
        if window is None:
            raise ModelLoadError(f"metadata key {key('attention.sliding_window')!r} is missing", path)
        pattern = field_value(reader, key("attention.sliding_window_pattern"), 6)
        if isinstance(pattern, list):  # one flag per layer: true = sliding
            if len(pattern) != n_layers:
                raise ModelLoadError(f"{key('attention.sliding_window_pattern')} has {len(pattern)} entries for "
                                     f"{n_layers} layers", path)
            types = tuple("sliding" if p else "full" for p in pattern)
        else:
            types = tuple("sliding" if int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 else "full"
                          for i in range(n_layers))
        arch_fields.update(sliding_window=int(window), layer_types=types,
                           local_rope_theta=float(value("rope.freq_base_swa", 10000.0)))
        if n_layers == 62:  # llama.cpp's LLM_TYPE_27B: scores scaled by (d / H)^-1/2, not hd^-1/2
            arch_fields["attn_scale"] = (dim / n_heads) ** -0.5
        if value("final_logit_softcapping") is not None:
            arch_fields["final_softcap"] = float(value("final_logit_softcapping"))
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(value("attention.head_count_kv", n_heads)),
            ffn_dim=int(need("feed_forward_length")),
            rope_theta=theta,
            rms_eps=float(need("attention.layer_norm_rms_epsilon")),
            max_seq_len=int(value("context_length", 2048)),
            tie_embeddings="output.weight" not in names,
            head_dim=head_dim,
            family=fam.name,
            **arch_fields,
        )
    except (ValueError, TypeError, OverflowError) as e:
        raise ModelLoadError(f"metadata does not make a valid config: {e}", path) from e


def _rope_scaling(reader, key, fam: Family, names: set[str], theta: float, head_dim: int, path: Path
                  ) -> RopeScaling | None:
    """{arch}.rope.scaling.type (none, linear) or Llama 3's rope_freqs tensor."""
    kind = field_value(reader, key("rope.scaling.type"), "none")
    if kind not in ("none", "linear"):
        raise ModelLoadError(f"{key('rope.scaling.type')} = {kind!r} is not implemented (none, linear)", path)
    factor = field_value(reader, key("rope.scaling.factor"))
    if "rope_freqs.weight" in names:
        if kind == "linear" or fam.name != "llama":
            raise ModelLoadError(f"rope_freqs.weight with {key('rope.scaling.type')} = {kind!r} is not implemented",
                                 path)
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        if t.tensor_type != Q.F32 or t.n_elements != head_dim // 2:
            raise ModelLoadError(f"rope_freqs.weight must be {head_dim // 2} F32 values", path, t.name)
        return llama3_scaling_from_freqs(np.array(t.data, dtype=np.float64).reshape(-1), theta, head_dim, path)
    if kind == "linear" and factor not in (None, 1.0):
        return RopeScaling("linear", float(factor))
    return None


def llama3_rope_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """Llama 3's divisor of each rope frequency, as convert_hf_to_gguf.py writes
    rope_freqs.weight: the unscaled inverse frequencies over the engine's scaled ones
    (minilars.ops.rope_inv_freq, transformers' _compute_llama3_parameters): 1 for
    short wavelengths, factor for long ones, smoothed between. (hd/2,) float64"""
    return rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, scaling)


def llama3_scaling_from_freqs(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> RopeScaling | None:
    """A RopeScaling("llama3", ...) whose divisors are `factors` (rope_freqs.weight).

    The tensor keeps the divisors, not the parameters. Llama 3.x use low 1, high 4,
    original 8192, which is tried first; otherwise low 1 and high 4 are kept and the
    original length is solved from a frequency inside the smoothed band, or placed
    between the kept and the divided frequencies when none is inside. Any description
    that gives the same divisors at these frequencies is the same model; one that
    does not reproduce them stops the load."""
    if np.all(factors == 1.0):
        return None
    factor = float(factors.max())
    wavelen = 2 * np.pi / rope_inv_freq(head_dim, theta)
    lo, hi = 1.0, 4.0
    candidates = [8192]
    band = (factors > 1.0) & (factors < factor)
    if band.any():  # s = (1/f_i - 1/F) / (1 - 1/F) = (orig / wavelen_i - lo) / (hi - lo)
        s = (1 / factors[band][0] - 1 / factor) / (1 - 1 / factor)
        candidates.append(round(float(wavelen[band][0] * (lo + s * (hi - lo)))))
    elif (factors == 1.0).any() and (factors == factor).any():
        lower, upper = hi * wavelen[factors == 1.0].max(), lo * wavelen[factors == factor].min()
        candidates.append(int((lower * upper) ** 0.5))
    for orig in candidates:
        scaling = RopeScaling("llama3", factor, lo, hi, int(orig))
        if np.allclose(llama3_rope_factors(scaling, theta, head_dim), factors, rtol=1e-5, atol=0):
            return scaling
    raise ModelLoadError(f"rope_freqs.weight ({np.array2string(factors, precision=4)}) is not a llama3 rope "
                         f"scaling with low_freq_factor 1 and high_freq_factor 4; not implemented", path)


def load_gguf(path: str | Path, dtype=np.float32, reader: gguf.GGUFReader | None = None
              ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, state dict with HF names and layouts) from a GGUF of any family.

    `reader` lets a caller that already parsed the file (for the tokenizer) skip
    a second parse.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    reader = open_gguf(path) if reader is None else reader
    cfg = config_from_gguf(reader, path)
    fam = FAMILIES[cfg.family]
    state = {}
    for t, name, shape in checked_tensors(reader, cfg, path, SUPPORTED_TYPES):
        state[name] = _dequantize(t, shape, dtype, cfg, fam, name)
        if not np.isfinite(state[name]).all():  # no trained model holds them: damaged bytes
            raise ModelLoadError("holds NaN or inf values; the file is corrupt", path, t.name)
    return cfg, in_forward_order(state, cfg, path)


def checked_tensors(reader, cfg: ModelConfig, path: Path, types):
    """(tensor, HF name, HF shape) for each weight of the file, its name, type and
    shape checked against the config before anything is read."""
    shapes = expected_shapes(cfg)
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # Llama 3's rope scaling, read into cfg.rope_scaling
            continue
        name = hf_name(t.name, cfg)
        if name is None or name not in shapes:
            raise ModelLoadError(f"unexpected tensor for a {cfg.family} model with this config", path, t.name)
        if t.tensor_type not in types:
            raise ModelLoadError(f"type {t.tensor_type.name} is not supported here "
                                 f"(supported: {', '.join(q.name for q in types)})", path, t.name)
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF dims are fastest-first
        if shape != shapes[name]:
            raise ModelLoadError(f"shape {shape} does not match the config, which implies "
                                 f"{shapes[name]} for {name}", path, t.name)
        yield t, name, shape


def in_forward_order(state: dict, cfg: ModelConfig, path: Path) -> dict:
    """The state dict in forward-pass order, whatever the file's order; a missing tensor is named."""
    shapes = expected_shapes(cfg)
    missing = [n for n in shapes if n not in state]
    if missing:
        raise ModelLoadError(f"{len(missing)} tensors missing, first {gguf_name(missing[0], cfg)!r} "
                             f"({missing[0]})", path)
    return {name: state[name] for name in shapes}


def _dequantize(t, shape: tuple[int, ...], dtype: np.dtype, cfg: ModelConfig, fam: Family, name: str
                ) -> np.ndarray:
    """One tensor as the HF checkpoint holds it: dequantised, rows in HF order, norm unshifted."""
    w = dequantize(t.data, t.tensor_type)  # float32; for F32 a view of the memmap
    # copy=True for F32 so no returned array keeps the file mapped or is read-only.
    w = w.reshape(shape).astype(dtype, copy=t.tensor_type == Q.F32)
    rows = hf_rows(name, cfg, fam)
    if rows is not None:
        w = w[rows]
    shift = norm_shift(name, fam)
    if shift:
        w = w - dtype.type(shift)
    return np.ascontiguousarray(w)
