"""GGUF blocks dequantised by torch on the backend's device, a tile at a time.

The torch backend keeps a QuantizedWeight's bytes on its device (on a CPU they are
the file's memory map itself, wrapped without a copy) and dequantises one tile of
stored rows there for each frozen product, so the float32 weight never crosses to
or lives on the device. The decoders below are gguf-py's `dequantize_blocks`
(gguf/quants.py) written with torch ops, operation for operation in float32, so a
tile equals `gguf.quants.dequantize` bit for bit (tests/test_quant.py checks every
format on random blocks). The products, the embedding gather and the tied head's
loss are minilars/quant.py's, on tensors: forward y = x S^T and backward dx = dy S
tile by tile, and the loss's online log-sum-exp over vocabulary tiles.

Letters as in minilars/quant.py: N rows of x, S (m, n) the stored rows.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from minilars.quant import LOSS_TILE_ELEMENTS, TILE_ELEMENTS, QuantizedRows, QuantizedWeight


def bytes_on(data, device: torch.device) -> torch.Tensor:
    """A part's bytes as a uint8 tensor on `device`. A numpy array (the file's memory
    map, read-only) is wrapped, not copied, on a CPU: torch warns that it cannot
    write to it, and nothing here writes."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(data)).to(device)


# ---------------------------------------------------------------- decoders: (k, type_size) uint8 -> (k, block) float32
def _half(b: torch.Tensor) -> torch.Tensor:
    """(k, 2) bytes -> (k, 1) float32: the block's float16 scale."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifts(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _half(b[:, :2])


def _nibbles_q4(qs):
    """(k, 16) -> (k, 32) uint8: low nibbles are values 0-15, high nibbles 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _q4_0(b):
    q = _nibbles_q4(b[:, 2:]).to(torch.int8) - 8
    return _half(b[:, :2]) * q.to(torch.float32)


def _q4_1(b):
    return _half(b[:, :2]) * _nibbles_q4(b[:, 4:]).to(torch.float32) + _half(b[:, 2:4])


def _scale_min_k4(scales):
    """(k, 12) packed bytes -> 6-bit scales and mins (k, 8) each (gguf's Q4_K.get_scale_min)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _k_low_nibbles(qs):
    """(k, 128) -> (k, 8, 32): sub-block 2c reads the low nibbles of qs[32c:32c+32], 2c+1 the high."""
    k = qs.shape[0]
    q = qs.reshape(k, 4, 1, 32) >> _shifts([0, 4], qs.device).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(k, 8, 32)


def _k_scaled(b, q):
    """(d sc) q - (dmin mn) per sub-block of 32, for Q4_K and Q5_K: (k, 8, 32) -> (k, 256)."""
    k = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_half(b[:, :2]) * sc.to(torch.float32)).reshape(k, 8, 1)
    dm = (_half(b[:, 2:4]) * mn.to(torch.float32)).reshape(k, 8, 1)
    return (d * q.to(torch.float32) - dm).reshape(k, 256)


def _q4_k(b):
    return _k_scaled(b, _k_low_nibbles(b[:, 16:]))


def _q5_k(b):
    k = b.shape[0]
    qh = b[:, 16:48].reshape(k, 1, 1, 32) >> _shifts(list(range(8)), b.device).reshape(1, 1, 8, 1)
    qh = (qh & 0x01).reshape(k, 8, 32)
    return _k_scaled(b, _k_low_nibbles(b[:, 48:]) | (qh << 4))


def _q6_k(b):
    k = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_half(b[:, 208:210]) * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(k, 16, 1)
    ql = ql.reshape(k, 2, 1, 64) >> _shifts([0, 4], b.device).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(k, 8, 32)
    qh = qh.reshape(k, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(k, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.reshape(k, 16, 16).to(torch.float32)).reshape(k, 256)


_DECODERS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


def decode_rows(part: QuantizedRows, rows) -> torch.Tensor:
    """Stored rows `rows` (a slice, or an int64 tensor on the part's device; part.order
    already applied) of a part whose bytes are a tensor: (len(rows), n) float32 there."""
    data = part.data[rows]  # (k, row_bytes)
    if part.qtype == Q.F32:
        return data.contiguous().view(torch.float32)
    if part.qtype == Q.F16:
        return data.contiguous().view(torch.float16).to(torch.float32)
    type_size = GGML_QUANT_SIZES[part.qtype][1]
    return _DECODERS[part.qtype](data.reshape(-1, type_size)).reshape(data.shape[0], part.n_cols)


def decoded_tiles(w: QuantizedWeight, tile_elements: int = TILE_ELEMENTS):
    """(first row, tile (rows, n) float32 on the device) for consecutive tiles of S."""
    for part, start, rows in w.tiles(tile_elements):
        if part.order is None:  # consecutive stored rows: a slice, no index tensor
            yield start, decode_rows(part, slice(int(rows[0]), int(rows[-1]) + 1))
        else:
            yield start, decode_rows(part, torch.as_tensor(rows, device=part.data.device))


# ---------------------------------------------------------------- the frozen products
def times_stored_t(x: torch.Tensor, w: QuantizedWeight, tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """y = x S^T: (N, n) -> (N, m), one tile of S's rows dequantised at a time."""
    y = torch.empty((x.shape[0], w.stored_shape[0]), dtype=x.dtype, device=x.device)
    for start, tile in decoded_tiles(w, tile_elements):
        y[:, start:start + tile.shape[0]] = x @ tile.to(x.dtype).T  # (N, tile)
    return y


def times_stored(x: torch.Tensor, w: QuantizedWeight, tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """y = x S = sum over tiles of x[:, tile] S[tile]: (N, m) -> (N, n)."""
    y = torch.zeros((x.shape[0], w.stored_shape[1]), dtype=x.dtype, device=x.device)
    for start, tile in decoded_tiles(w, tile_elements):
        y += x[:, start:start + tile.shape[0]] @ tile.to(x.dtype)
    return y


def matmul(x, w: QuantizedWeight):
    """x W for the engine's W (minilars.quant.matmul)."""
    return times_stored_t(x, w) if w.transposed else times_stored(x, w)


def matmul_nt(x, w: QuantizedWeight):
    """x W^T (minilars.quant.matmul_nt)."""
    return times_stored(x, w) if w.transposed else times_stored_t(x, w)


def gather_rows(w: QuantizedWeight, rows: torch.Tensor) -> torch.Tensor:
    """S[rows] dequantised: (k,) -> (k, n) float32 (the embedding lookup E[tokens])."""
    rows = rows.reshape(-1)
    m, n = w.stored_shape
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= m):
        raise IndexError(f"row index out of range for {m} stored rows")
    out = torch.empty((rows.numel(), n), dtype=torch.float32, device=rows.device)
    offset = 0
    for part in w.parts:
        mine = torch.nonzero((rows >= offset) & (rows < offset + part.n_rows)).reshape(-1)
        if mine.numel():
            local = rows[mine] - offset
            if part.order is not None:
                local = torch.as_tensor(part.order, device=rows.device)[local]
            out[mine] = decode_rows(part, local)
        offset += part.n_rows
    return out


def cross_entropy_head(x: torch.Tensor, head: QuantizedWeight, targets: torch.Tensor, ignore_index: int,
                       need_dx: bool, tile_elements: int = LOSS_TILE_ELEMENTS):
    """minilars.quant.cross_entropy_head on tensors: the same online log-sum-exp over
    tiles of E's rows, with a = sum_v e^(z_v - m) E_v giving dx = (a / s - E[t]) / n_valid.
    Returns (loss, n_valid, dx (N, d) or None)."""
    n, d = x.shape
    v_total = head.stored_shape[0]
    valid = targets != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return 0.0, 0, (torch.zeros_like(x) if need_dx else None)
    t = torch.where(valid, targets, 0)
    if int(t.min()) < 0 or int(t.max()) >= v_total:
        raise IndexError(f"target out of range for a vocabulary of {v_total}")
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32  # running statistics
    m = torch.full((n,), -float("inf"), dtype=stat, device=x.device)
    s = torch.zeros(n, dtype=stat, device=x.device)
    z_target = torch.zeros(n, dtype=stat, device=x.device)
    acc = torch.zeros_like(x) if need_dx else None
    e_target = torch.zeros_like(x) if need_dx else None
    for v0, e in decoded_tiles(head, max(1, tile_elements // max(n, 1)) * d):
        e = e.to(x.dtype)  # E's rows v0.. (tile, d)
        z = x @ e.T  # (N, tile)
        mine = torch.nonzero((t >= v0) & (t < v0 + e.shape[0])).reshape(-1)
        z_target[mine] = z[mine, t[mine] - v0].to(stat)
        m_new = torch.maximum(m, z.amax(dim=1).to(stat))
        c = torch.exp(m - m_new)  # rescales what earlier tiles added
        z = torch.exp(z - m_new[:, None].to(x.dtype))  # p, (N, tile)
        s = s * c + z.sum(dim=1, dtype=stat)
        m = m_new
        if need_dx:
            acc = acc * c[:, None].to(x.dtype) + z @ e
            e_target[mine] = e[t[mine] - v0]
        del z, e  # before the next tile's: one tile and its logits at a time
    lse = m + torch.log(s)
    loss = float(torch.where(valid, lse - z_target, 0.0).sum()) / n_valid
    dx = None
    if need_dx:
        dx = (acc / s[:, None].to(x.dtype) - e_target) * (valid.to(x.dtype) / n_valid)[:, None]
    return loss, n_valid, dx
