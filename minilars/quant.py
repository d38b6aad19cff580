"""Quantised frozen weights: GGUF blocks kept as they are, dequantised a tile at a time.

A GGUF file stores a weight as rows of blocks (ggml-quants.c): each stored row holds
n values in n / block_size blocks of `type_size` bytes, each block a float16 scale
(and offset) and packed low-bit integers. A frozen weight never needs more than
its products, so it can stay in that form:

    forward   y  = x S^T   one tile of rows of S dequantised at a time, y[:, tile] = x tile^T
    backward  dx = dy S    dx += dy[:, tile] tile, summed over the tiles
    no dS: the weight is frozen (the gradient of a frozen matmul is dx alone)

with S (m, n) the stored rows. A linear site's engine weight W (d_in, d_out) is S^T
(GGUF stores a projection (d_out, d_in), torch's layout), the embedding table E (V, d)
is S itself; `QuantizedWeight.transposed` says which, and `matmul` / `matmul_nt`
below turn the engine's x W and dy W^T into the two products above.

A fused site (q, k, v in one W) is several GGUF tensors stacked along S's rows,
possibly in different formats (a Q4_K_M file mixes Q4_K and Q6_K), so a
QuantizedWeight is a tuple of parts. Parts that come straight from the file are
views of its memory map: the bytes are read from disk when a tile needs them and
belong to the page cache, which the kernel may drop under memory pressure.

This module is the NumPy reference: tiles are dequantised by `gguf.quants.dequantize`.
backends/quant_kernels.py decodes the same blocks in numba; the backends pass their
tile decoder to `matmul` / `matmul_nt`.

Letters: N rows of x, m stored rows (outputs of a projection, V for the table),
n stored columns (d_in, d for the table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

# The formats a frozen weight can be kept in; F32 and F16 occur beside the others in
# quantised files (norms, and tensors whose rows do not split into K-quant blocks).
KEPT_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# The formats --weights can quantise a float weight into at load (gguf-py has a quantiser for these).
LOAD_QUANTISERS = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
# A tile of dequantised rows holds at most this many float32 values (4 MiB).
TILE_ELEMENTS = 1 << 20

# decode(part, stored rows, out): out[i] = stored row rows[i] of the part, in float32
TileDecoder = Callable[["QuantizedRows", np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class QuantizedRows:
    """One GGUF tensor's rows, as stored: data (m, n / block_size * type_size) uint8.
    order, when given, says which stored row is row i (llama.cpp stores q's and k's
    rows permuted within each head, models/gguf_kept.py): the rows are read in that
    order instead of copied into it, so the blocks stay a view of the file."""

    data: np.ndarray  # (m, row_bytes) uint8 blocks; may be a view of the file's memory map
    qtype: Q
    n_cols: int  # n values per row
    order: np.ndarray | None = None  # (m,) int64: row i is stored row order[i]; None: in order

    def __post_init__(self):
        if self.qtype not in KEPT_TYPES:
            raise ValueError(f"ggml type {self.qtype.name} cannot be kept "
                             f"(kept: {', '.join(q.name for q in KEPT_TYPES)})")
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        # numpy's uint8, or the same bytes as a torch tensor on a device (the torch
        # backend decodes there) or as a shape-only array (the planner)
        if str(self.data.dtype) not in ("uint8", "torch.uint8") or len(self.data.shape) != 2:
            raise ValueError(f"blocks must be a 2-D uint8 array, got {self.data.dtype} {self.data.shape}")
        if self.n_cols % block or self.data.shape[1] != self.n_cols // block * type_size:
            raise ValueError(f"{self.data.shape[1]} bytes per row do not hold {self.n_cols} "
                             f"{self.qtype.name} values ({block} per {type_size}-byte block)")
        if self.order is not None and sorted(self.order.tolist()) != list(range(self.data.shape[0])):
            raise ValueError("order must be a permutation of the stored rows")

    def stored(self, rows: np.ndarray) -> np.ndarray:
        """The stored rows that hold rows `rows` (what a decoder reads)."""
        return rows if self.order is None else self.order[rows]

    @property
    def n_rows(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def with_data(self, data) -> "QuantizedRows":
        """The same rows held in another array (a device's copy of the bytes)."""
        return QuantizedRows(data, self.qtype, self.n_cols, self.order)


def dequantize_rows_reference(part: QuantizedRows, rows: np.ndarray, out: np.ndarray) -> None:
    """out[i] = row rows[i] of the part, dequantised by gguf-py: (len(rows),) -> (len(rows), n)."""
    out[:] = dequantize(np.ascontiguousarray(part.data[rows]), part.qtype).reshape(len(rows), part.n_cols)


class QuantizedWeight:
    """A frozen weight kept as GGUF blocks: the stored rows S (m, n) are `parts`
    stacked in order. The engine sees W = S^T when `transposed` (a linear site's
    (d_in, d_out) weight), else W = S (the embedding table). `dtype` is what it
    dequantises to; `nbytes` counts the blocks, which is what it holds."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, parts: list[QuantizedRows] | tuple[QuantizedRows, ...], transposed: bool):
        parts = tuple(parts)
        if not parts:
            raise ValueError("a quantised weight needs at least one part")
        if len({p.n_cols for p in parts}) != 1:
            raise ValueError(f"parts have different row lengths {[p.n_cols for p in parts]}")
        self.parts = parts
        self.transposed = transposed
        self.stored_shape = (sum(p.n_rows for p in parts), parts[0].n_cols)  # S (m, n)

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.stored_shape
        return (n, m) if self.transposed else (m, n)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def formats(self) -> str:
        return "+".join(dict.fromkeys(p.qtype.name for p in self.parts))

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.formats}, shape={self.shape}, {self.nbytes} bytes)"

    def tiles(self, tile_elements: int = TILE_ELEMENTS):
        """(part, first row of the tile in S, the part's stored rows that hold it) for
        consecutive tiles of at most tile_elements values: the unit one kernel call
        dequantises."""
        per_tile = max(1, tile_elements // self.stored_shape[1])
        offset = 0
        for part in self.parts:
            for r0 in range(0, part.n_rows, per_tile):
                r1 = min(r0 + per_tile, part.n_rows)
                yield part, offset + r0, part.stored(np.arange(r0, r1))
            offset += part.n_rows

    def gather_rows(self, rows: np.ndarray, decode: TileDecoder = dequantize_rows_reference) -> np.ndarray:
        """S[rows] dequantised: (k,) -> (k, n) float32 (the embedding lookup E[tokens])."""
        rows = np.asarray(rows).reshape(-1)
        m, n = self.stored_shape
        if rows.size and (rows.min() < 0 or rows.max() >= m):
            raise IndexError(f"row index out of range for {m} stored rows")
        out = np.empty((rows.size, n), dtype=np.float32)
        offset = 0
        for part in self.parts:
            mine = (rows >= offset) & (rows < offset + part.n_rows)
            if mine.any():
                buf = np.empty((int(mine.sum()), n), dtype=np.float32)
                decode(part, part.stored((rows[mine] - offset).astype(np.int64)), buf)
                out[mine] = buf
            offset += part.n_rows
        return out

    def leading_rows(self, k: int, decode: TileDecoder = dequantize_rows_reference) -> np.ndarray:
        """W[:k] in float32, engine layout, without a whole float copy: (k, W's columns).
        For W = S^T these are S's first k columns, read tile by tile."""
        if not self.transposed:
            return self.gather_rows(np.arange(min(k, self.stored_shape[0])), decode)
        k = min(k, self.stored_shape[1])
        out = np.empty((k, self.stored_shape[0]), dtype=np.float32)
        for start, tile in decoded_tiles(self, decode):
            out[:, start:start + tile.shape[0]] = tile[:, :k].T
        return out

    def first_values(self, count: int, decode: TileDecoder = dequantize_rows_reference) -> np.ndarray:
        """The first `count` values of W flattened row by row, float32 (a fingerprint's sample)."""
        width = self.shape[1]
        return self.leading_rows(-(-count // width), decode).reshape(-1)[:count]

    def with_parts(self, convert) -> "QuantizedWeight":
        """This weight with every part's bytes passed through convert (to a device, say)."""
        return QuantizedWeight([p.with_data(convert(p.data)) for p in self.parts], self.transposed)

    def dequantize(self, decode: TileDecoder = dequantize_rows_reference) -> np.ndarray:
        """The whole weight in float32, engine layout (for export and tests; a training
        step never calls it)."""
        s = np.concatenate([_decode_all(p, decode) for p in self.parts], axis=0)  # (m, n)
        return np.ascontiguousarray(s.T) if self.transposed else s


def _decode_all(part: QuantizedRows, decode: TileDecoder) -> np.ndarray:
    out = np.empty((part.n_rows, part.n_cols), dtype=np.float32)
    decode(part, part.stored(np.arange(part.n_rows)), out)
    return out


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


# ---------------------------------------------------------------- the two frozen products
def decoded_tiles(w: QuantizedWeight, decode: TileDecoder = dequantize_rows_reference,
                  tile_elements: int = TILE_ELEMENTS):
    """(first stored row, tile (rows, n) float32) for consecutive tiles of S: one
    buffer, refilled for each tile, is the only float copy of the weight."""
    n = w.stored_shape[1]
    buf = np.empty(max(1, tile_elements // n) * n, dtype=np.float32)
    for part, start, rows in w.tiles(tile_elements):
        tile = buf[:rows.size * n].reshape(rows.size, n)
        decode(part, rows, tile)
        yield start, tile


def times_stored_t(x: np.ndarray, w: QuantizedWeight, decode: TileDecoder = dequantize_rows_reference,
                   tile_elements: int = TILE_ELEMENTS) -> np.ndarray:
    """y = x S^T: (N, n) -> (N, m), one tile of S's rows dequantised at a time."""
    m, n = w.stored_shape
    if x.shape[-1] != n:
        raise ValueError(f"x has {x.shape[-1]} columns, the stored rows have {n}")
    y = np.empty((x.shape[0], m), dtype=x.dtype)
    for start, tile in decoded_tiles(w, decode, tile_elements):
        y[:, start:start + tile.shape[0]] = x @ tile.T.astype(x.dtype, copy=False)  # (N, tile)
    return y


def times_stored(x: np.ndarray, w: QuantizedWeight, decode: TileDecoder = dequantize_rows_reference,
                 tile_elements: int = TILE_ELEMENTS) -> np.ndarray:
    """y = x S = sum over tiles of x[:, tile] S[tile]: (N, m) -> (N, n)."""
    m, n = w.stored_shape
    if x.shape[-1] != m:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight has {m} stored rows")
    y = np.zeros((x.shape[0], n), dtype=x.dtype)
    for start, tile in decoded_tiles(w, decode, tile_elements):
        y += x[:, start:start + tile.shape[0]] @ tile.astype(x.dtype, copy=False)  # (N, n)
    return y


def matmul(x: np.ndarray, w: QuantizedWeight, decode: TileDecoder = dequantize_rows_reference) -> np.ndarray:
    """x W for the engine's W: x S^T when W = S^T (a site's forward), x S when W = S."""
    return times_stored_t(x, w, decode) if w.transposed else times_stored(x, w, decode)


def matmul_nt(x: np.ndarray, w: QuantizedWeight, decode: TileDecoder = dequantize_rows_reference) -> np.ndarray:
    """x W^T: x S when W = S^T (a site's backward dx = dy W^T), x S^T when W = S (the tied head's logits)."""
    return times_stored(x, w, decode) if w.transposed else times_stored_t(x, w, decode)


# ---------------------------------------------------------------- the tied head's loss
LOSS_TILE_ELEMENTS = 1 << 20  # logits per (N, tile) work array in the loss (4 MiB in float32)


def cross_entropy_head(x: np.ndarray, head: QuantizedWeight, targets: np.ndarray, ignore_index: int,
                       need_dx: bool, decode: TileDecoder = dequantize_rows_reference,
                       tile_elements: int = LOSS_TILE_ELEMENTS) -> tuple[float, int, np.ndarray | None]:
    """Mean cross-entropy of z = x E^T over a table kept as blocks, one pass over the
    vocabulary a tile at a time with an online log-sum-exp (FlashAttention's softmax,
    Dao et al. 2022, Alg. 1), so E is dequantised once per call and no (N, V) or
    (chunk, V) array exists. Per tile of E's rows (with m the running row max, s the
    running sum of e^(z - m), a = sum_v e^(z_v - m) E_v):

        z = x E_tile^T,  m' = max(m, max_v z),  c = e^(m - m'),  p = e^(z - m')
        s = s c + sum_v p,   a = a c + p E_tile,   z_t and E[t] picked up in their tile
    then
        loss = mean_n (m + log s - z_t),   dx_n = (a_n / s_n - E[t_n]) / n_valid

    since dz = softmax(z) - onehot(t) and dx = dz E: softmax(z) E = a / s. The
    products are the float path's (2 N V d FLOPs each for z and dz E); the head's
    gradient is never formed (the table is frozen).

    x (N, d) float, head E (V, d) with transposed=False, targets (N,) ->
    (loss, n_valid, dx (N, d) or None)."""
    n, d = x.shape
    v_total = head.stored_shape[0]
    valid = targets != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return 0.0, 0, (np.zeros_like(x) if need_dx else None)
    t = np.where(valid, targets, 0)
    if t.min() < 0 or t.max() >= v_total:
        raise IndexError(f"target out of range for a vocabulary of {v_total}")
    vocab_tile = max(1, tile_elements // max(n, 1)) * d  # values per tile of E
    m = np.full(n, -np.inf, dtype=np.float64)  # running row max
    s = np.zeros(n, dtype=np.float64)  # running sum of e^(z - m)
    z_target = np.zeros(n, dtype=np.float64)
    acc = np.zeros_like(x) if need_dx else None  # (N, d) running sum of e^(z - m) E
    e_target = np.zeros_like(x) if need_dx else None  # (N, d) E[t]

    for v0, e in decoded_tiles(head, decode, vocab_tile):
        e = e.astype(x.dtype, copy=False)  # E's rows v0.. (tile, d)
        z = x @ e.T  # (N, tile)
        mine = np.nonzero((t >= v0) & (t < v0 + e.shape[0]))[0]
        z_target[mine] = z[mine, t[mine] - v0]
        m_new = np.maximum(m, z.max(axis=1))
        c = np.exp(m - m_new)  # (N,) rescales what earlier tiles added
        z -= m_new[:, None].astype(x.dtype)
        np.exp(z, out=z)  # p, (N, tile)
        s = s * c + z.sum(axis=1, dtype=np.float64)
        m = m_new
        if need_dx:
            acc *= c[:, None].astype(x.dtype)
            acc += z @ e  # (N, d)
            e_target[mine] = e[t[mine] - v0]
        del z  # before the next tile's logits form: one (N, tile) array at a time
    lse = m + np.log(s)  # (N,)
    loss = float(np.sum((lse - z_target)[valid])) / n_valid
    dx = None
    if need_dx:
        acc /= s[:, None].astype(x.dtype)  # softmax(z) E
        acc -= e_target
        acc *= (valid / n_valid).astype(x.dtype)[:, None]
        dx = acc
    return loss, n_valid, dx


# ---------------------------------------------------------------- building from a loaded state dict
def kept_weight(tensors: list, transposed: bool) -> QuantizedWeight | None:
    """One engine weight from HF-layout tensors ((out, in) each, stacked as rows) when
    any of them was kept as blocks; float ones among them become F32 rows. None when
    all are floats (the caller concatenates them as before)."""
    if not any(isinstance(t, QuantizedRows) for t in tensors):
        return None
    parts = []
    for t in tensors:
        if not isinstance(t, QuantizedRows):
            t = np.ascontiguousarray(t, dtype=np.float32)
            t = QuantizedRows(t.view(np.uint8).reshape(t.shape[0], -1), Q.F32, t.shape[1])
        parts.append(t)
    return QuantizedWeight(parts, transposed)


# ---------------------------------------------------------------- formats, for the memory planner
# A weight's formats as the planner takes them: ((ggml type name, stored rows), ...) per part.
Formats = tuple[tuple[str, int], ...]


def formats_of(params: dict) -> dict[str, Formats]:
    """name -> the formats of each weight kept as blocks, e.g. (("Q4_1", 576), ("Q8_0", 192), ...)."""
    return {name: tuple((p.qtype.name, p.n_rows) for p in w.parts)
            for name, w in params.items() if isinstance(w, QuantizedWeight)}


def weight_of_formats(formats: Formats, n_cols: int, transposed: bool, new_bytes) -> QuantizedWeight:
    """A QuantizedWeight of these formats whose bytes are new_bytes((rows, bytes per row))
    (the planner passes the shape backend's allocator: the blocks are counted, not made)."""
    parts = []
    for name, rows in formats:
        qtype = Q[name]
        block, type_size = GGML_QUANT_SIZES[qtype]
        parts.append(QuantizedRows(new_bytes((rows, n_cols // block * type_size)), qtype, n_cols))
    return QuantizedWeight(parts, transposed)


# ---------------------------------------------------------------- quantising at load
def quantize_weight(w: np.ndarray, fmt: str, transposed: bool) -> QuantizedWeight | np.ndarray:
    """A float engine weight quantised with gguf-py into `fmt` (q8_0 or q4_0). The
    stored rows are W^T for a site (transposed) and W for the table. A weight whose
    rows do not split into 32-value blocks stays as it is, in float32."""
    if fmt not in LOAD_QUANTISERS:
        raise ValueError(f"cannot quantise to {fmt!r}; choose one of {', '.join(LOAD_QUANTISERS)}")
    qtype = LOAD_QUANTISERS[fmt]
    stored = np.ascontiguousarray(w.T if transposed else w, dtype=np.float32)  # S (m, n)
    if stored.shape[1] % GGML_QUANT_SIZES[qtype][0]:
        return np.ascontiguousarray(w, dtype=np.float32)
    return QuantizedWeight([QuantizedRows(quantize(stored, qtype), qtype, stored.shape[1])], transposed)


__all__ = ["KEPT_TYPES", "LOAD_QUANTISERS", "Formats", "QuantizedRows", "QuantizedWeight", "cross_entropy_head",
           "dequantize_rows_reference", "formats_of", "weight_of_formats",
           "is_quantized", "kept_weight", "matmul", "matmul_nt", "quantize_weight", "times_stored", "times_stored_t"]
