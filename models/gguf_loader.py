"""Read a llama.cpp GGUF file into a ModelConfig and a Hugging Face-layout state dict.

Three things differ between a GGUF and the HF checkpoint it was converted from,
and each is undone here:

* names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight` etc.;
* dims: GGUF lists dims fastest-first ([in, out]); `gguf.GGUFReader` already
  reverses them, so a linear weight arrives as (out, in), as in torch;
* q/k rows: llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) reorders the
  rows of q_proj and k_proj inside each head, because ggml's RoPE rotates adjacent
  pairs (2j, 2j+1) while HF's `rotate_half` pairs j with j + hd/2. `unpermute_qk`
  puts the HF order back, so the engine's rotate-half RoPE sees HF weights.

Quantised blocks (Q8_0, Q4_0, Q4_1) are dequantised one tensor at a time with
`gguf.quants.dequantize`, so peak memory is one float copy of the weights plus one
tensor's temporaries. The file is memory-mapped; every tensor's byte range is
checked against the file size before it is touched, so a truncated or corrupted
file fails with a ModelLoadError naming the tensor, never with a huge allocation.
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

from minilars.config import ModelConfig

from .errors import ModelLoadError
from .layout import EMBED, FINAL_NORM, LM_HEAD, expected_shapes, layer_prefix

_ARRAY = int(GGUFValueType.ARRAY)
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)

_GLOBAL_NAMES = {"token_embd.weight": EMBED, "output_norm.weight": FINAL_NORM, "output.weight": LM_HEAD}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF name; None for a tensor this engine has no use for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"{layer_prefix(int(m.group(1)))}{_BLOCK_NAMES[m.group(2)]}.weight"
    return None


def gguf_name(hf: str) -> str:
    """HF name -> GGUF tensor name (inverse of `hf_name`)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
    for g, h in _BLOCK_NAMES.items():
        if m and m.group(2) == h:
            return f"blk.{m.group(1)}.{g}.weight"
    raise KeyError(hf)


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


def config_from_gguf(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    """ModelConfig from the `llama.*` metadata keys."""
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"architecture {arch!r} is not supported (only 'llama')", path)

    def need(key):
        value = field_value(reader, key)
        if value is None:
            raise ModelLoadError(f"metadata key {key!r} is missing", path)
        return value

    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)
    elif "llama.vocab_size" in reader.fields:
        vocab = field_value(reader, "llama.vocab_size")
    else:
        raise ModelLoadError("no tokenizer.ggml.tokens and no llama.vocab_size: vocabulary size unknown", path)
    n_heads = need("llama.attention.head_count")
    dim = need("llama.embedding_length")
    head_dim = field_value(reader, "llama.attention.key_length")
    rope_dims = field_value(reader, "llama.rope.dimension_count")
    if rope_dims is not None and rope_dims != (head_dim or dim // max(n_heads, 1)):
        raise ModelLoadError(f"partial rotary embeddings (rope.dimension_count={rope_dims}) are not supported", path)
    scaling = field_value(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in names:
        raise ModelLoadError(f"RoPE scaling ({scaling or 'rope_freqs.weight'}) is not supported", path)
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            dim=int(dim),
            n_layers=int(need("llama.block_count")),
            n_heads=int(n_heads),
            n_kv_heads=int(field_value(reader, "llama.attention.head_count_kv", n_heads)),
            ffn_dim=int(need("llama.feed_forward_length")),
            rope_theta=float(field_value(reader, "llama.rope.freq_base", 10000.0)),
            rms_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
            max_seq_len=int(field_value(reader, "llama.context_length", 2048)),
            tie_embeddings="output.weight" not in names,
            head_dim=None if head_dim is None else int(head_dim),
        )
    except (ValueError, TypeError, OverflowError) as e:
        raise ModelLoadError(f"metadata does not make a valid config: {e}", path) from e


def load_gguf(path: str | Path, dtype=np.float32, reader: gguf.GGUFReader | None = None
              ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, state dict with HF names and layouts) from a llama-architecture GGUF.

    `reader` lets a caller that already parsed the file (for the tokenizer) skip
    a second parse.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    reader = open_gguf(path) if reader is None else reader
    cfg = config_from_gguf(reader, path)
    shapes = expected_shapes(cfg)
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in shapes:
            raise ModelLoadError("unexpected tensor for a llama model with this config", path, t.name)
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(f"type {t.tensor_type.name} is not supported "
                                 f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})", path, t.name)
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF dims are fastest-first
        if shape != shapes[name]:
            raise ModelLoadError(f"shape {shape} does not match the config, which implies "
                                 f"{shapes[name]} for {name}", path, t.name)
        state[name] = _dequantize(t, shape, dtype, cfg, name)
        if not np.isfinite(state[name]).all():  # no trained model holds them: damaged bytes
            raise ModelLoadError("holds NaN or inf values; the file is corrupt", path, t.name)
    missing = [n for n in shapes if n not in state]
    if missing:
        raise ModelLoadError(f"{len(missing)} tensors missing, first {gguf_name(missing[0])!r} ({missing[0]})", path)
    return cfg, {name: state[name] for name in shapes}  # forward-pass order, whatever the file's order


def _dequantize(t, shape: tuple[int, ...], dtype: np.dtype, cfg: ModelConfig, name: str) -> np.ndarray:
    w = dequantize(t.data, t.tensor_type)  # float32; for F32 a view of the memmap
    # copy=True for F32 so no returned array keeps the file mapped or is read-only.
    w = w.reshape(shape).astype(dtype, copy=t.tensor_type == Q.F32)
    if name.endswith("self_attn.q_proj.weight"):
        w = unpermute_qk(w, cfg.n_heads)
    elif name.endswith("self_attn.k_proj.weight"):
        w = unpermute_qk(w, cfg.n_kv_heads)
    return np.ascontiguousarray(w)
