# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 08 · Fine-tuning over quantised weights
#
# A GGUF file stores SmolLM2-135M in 94 MiB of 4-bit blocks; in float32 the same
# weights take 515 MiB, most of a LARS run's peak. The weights are frozen, and a
# frozen weight is only ever *multiplied*: so it can stay in its blocks, and each
# product dequantises one tile of rows at a time (`minilars/quant.py`,
# `backends/quant_kernels.py`, `--weights keep`).
#
# This tutorial
# 1. takes a Q4_0 block and a Q4_K block apart byte by byte;
# 2. dequantises one tile of rows and forms the two frozen products from tiles;
# 3. shows why the frozen path's backward needs no weight gradient;
# 4. ends in a check that fails if a layout is read wrong.
#
# Letters: S (m, n) the stored rows (a projection's (d_out, d_in), as GGUF and torch
# store it; the engine's W is S^T), N tokens.

# %%
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from minilars.quant import QuantizedRows, QuantizedWeight, dequantize_rows_reference, times_stored, times_stored_t

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. A Q4_0 block: 32 values in 18 bytes
#
# `block_q4_0` (llama.cpp ggml-common.h) is a float16 scale `d` and 16 bytes of
# nibbles. Byte j holds value j in its low nibble and value j + 16 in its high one,
# each stored as q + 8 (so 0..15 means -8..7): x = d (q - 8).

# %%
values = rng.standard_normal(32).astype(np.float32)
block = quantize(values[None, :], Q.Q4_0)[0]  # gguf-py's quantiser: (18,) uint8
print("block size, bytes:", GGML_QUANT_SIZES[Q.Q4_0])
d = block[:2].view(np.float16)[0].astype(np.float32)
nibbles = block[2:]
low, high = (nibbles & 0xF).astype(np.int32), (nibbles >> 4).astype(np.int32)
by_hand = np.concatenate([d * (low - 8), d * (high - 8)]).astype(np.float32)
print(f"d = {d:.5f};  first bytes {nibbles[:4]} -> values {by_hand[:2]} ... and {by_hand[16:18]}")
print("max |x - dequantised| =", np.abs(values - by_hand).max(), " (at most about one step d)")
assert np.array_equal(by_hand, dequantize(block[None, :], Q.Q4_0)[0])

# %% [markdown]
# ## 2. A Q4_K block: 256 values in 144 bytes, scales of scales
#
# `block_q4_K` is a super-block: float16 `d` and `dmin`, then 12 bytes that pack
# eight 6-bit scales `sc` and eight 6-bit mins `mn` (one pair per sub-block of 32),
# then 128 bytes of nibbles. Value l of sub-block g is
#     x = (d sc_g) q - (dmin mn_g),
# where sub-blocks 2c and 2c + 1 share bytes 32c..32c+31 of the nibbles (low, high).
# The packing (get_scale_min_k4): bytes 0-3 hold sc_0..3 in their low 6 bits and
# bytes 4-7 hold mn_0..3; sc_4..7 and mn_4..7 take their low 4 bits from bytes 8-11
# (low and high nibble) and their top 2 bits from the top 2 bits of bytes 0-3 and 4-7.

# %%
k_block = rng.integers(0, 256, 144, dtype=np.uint8)
k_block[:4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # d, dmin


def scale_min_k4(packed: np.ndarray, g: int) -> tuple[int, int]:
    """Sub-block g's (scale, min), 6 bits each, from the 12 packed bytes."""
    if g < 4:
        return int(packed[g] & 63), int(packed[g + 4] & 63)
    sc = (packed[g + 4] & 0xF) | ((packed[g - 4] >> 6) << 4)
    mn = (packed[g + 4] >> 4) | ((packed[g] >> 6) << 4)
    return int(sc), int(mn)


def q4_k_by_hand(blk: np.ndarray) -> np.ndarray:
    d, dmin = blk[:4].view(np.float16).astype(np.float32)
    packed, qs = blk[4:16], blk[16:]
    out = np.empty(256, dtype=np.float32)
    for g in range(8):
        sc, mn = scale_min_k4(packed, g)
        q = (qs[32 * (g // 2):32 * (g // 2) + 32] >> (4 * (g % 2))) & 0xF
        out[32 * g:32 * g + 32] = (d * np.float32(sc)) * q.astype(np.float32) - dmin * np.float32(mn)
    return out


print("sub-block (scale, min):", [scale_min_k4(k_block[4:16], g) for g in range(8)])
assert np.array_equal(q4_k_by_hand(k_block), dequantize(k_block[None, :], Q.Q4_K)[0])

# %% [markdown]
# ## 3. The two frozen products, a tile at a time
#
# A linear site computes y = x W with W = S^T, so forward is y = x S^T: the output
# columns of a tile of S's rows are x tile^T, and no more than one tile is ever
# dequantised. Backward needs dx = dy W^T = dy S, a sum over the same tiles:
# dx = sum_tiles dy[:, tile] S[tile]. The weight gradient dW = x^T dy is never
# formed: the weight is frozen, so nothing asks for it, and so the forward keeps
# nothing for it either (x is kept only where an adapter needs it, e.g. LoRA's
# x or LARS's z = x P). The gradient that flows on is dx, and for dx the weight
# is just another matrix to multiply by.

# %%
m, n, tokens = 40, 64, 5  # S (40, 64): 40 output rows of two Q4_0 blocks
dense = (rng.standard_normal((m, n)) * 0.1).astype(np.float32)
s_blocks = QuantizedRows(quantize(dense, Q.Q4_0), Q.Q4_0, n)
w = QuantizedWeight([s_blocks], transposed=True)  # the engine's W (64, 40)
print(w, "- float32 would be", dense.nbytes, "bytes")

tile_rows = 16  # 40 rows = 16 + 16 + 8: the last tile is short
tile = np.empty((tile_rows, n), dtype=np.float32)
dequantize_rows_reference(s_blocks, np.arange(16, 32), tile)  # rows 16..31 of S, alone
print("tile of rows 16..31:", tile.shape, "- the only float copy of S that exists")

x = rng.standard_normal((tokens, n)).astype(np.float32)
dy = rng.standard_normal((tokens, m)).astype(np.float32)
y = times_stored_t(x, w, tile_elements=tile_rows * n)  # forward  x W = x S^T
dx = times_stored(dy, w, tile_elements=tile_rows * n)  # backward dy W^T = dy S
s = dequantize(s_blocks.data, Q.Q4_0).reshape(m, n)  # the whole matrix, for the check only
print("forward max error vs x S^T:", np.abs(y - x @ s.T).max(), "; backward vs dy S:", np.abs(dx - dy @ s).max())

# %% [markdown]
# ## 4. In the engine
#
# A QuantizedWeight goes wherever a frozen weight goes: the backends see one as the
# weight of `matmul` (forward) and `matmul_nt` (backward), as the table of the
# embedding lookup (rows gathered and dequantised) and as the tied head of the loss
# (vocabulary tiles with an online log-sum-exp). `load_model(spec, weights="keep")`
# keeps a GGUF's blocks as a memory map (`--weights keep`, the default of every
# command); `q8_0` and `q4_0` quantise a float model at load. Adapters (LoRA, IA3,
# LARS) train over the blocks in float32; LARS runs unmerged, y = x W + (x P) M.

# %%
from minilars.model import Model
from minilars.pretrained import load_model

tiny, _ = load_model("tiny", "numpy", "q4_0")
print(tiny.params["blocks.0.attn_in.weight"])
floats = Model(tiny.cfg, {k: v.dequantize() if isinstance(v, QuantizedWeight) else v
                          for k, v in tiny.params.items()}, backend="numpy")
ids = np.arange(16)[None, :]

# %% [markdown]
# ## Check
#
# The by-hand decoders above agree with gguf-py on random blocks; a decoder that
# reads a layout wrong (here: Q4_0's nibbles taken as interleaved pairs, and
# Q4_K's high scale bits ignored) disagrees; and the tiled products equal the
# dequantised matrix's to float32 rounding.

# %%
for seed in range(5):
    r = np.random.default_rng(seed)
    blk = r.integers(0, 256, 144, dtype=np.uint8)
    blk[:4] = (r.standard_normal(2) * 0.01).astype(np.float16).view(np.uint8)
    assert np.array_equal(q4_k_by_hand(blk), dequantize(blk[None, :], Q.Q4_K)[0])


def q4_0_interleaved(blk: np.ndarray) -> np.ndarray:  # wrong: value 2j low, 2j + 1 high
    d = blk[:2].view(np.float16)[0].astype(np.float32)
    q = np.stack([blk[2:] & 0xF, blk[2:] >> 4], axis=1).reshape(32).astype(np.int32)
    return (d * (q - 8)).astype(np.float32)


def q4_k_low_bits_only(blk: np.ndarray) -> np.ndarray:  # wrong: scales 4-7 without their top 2 bits
    wrong = blk.copy()
    wrong[4:12] &= 63
    return q4_k_by_hand(wrong)


assert not np.array_equal(q4_0_interleaved(block), dequantize(block[None, :], Q.Q4_0)[0])
assert not np.array_equal(q4_k_low_bits_only(k_block), dequantize(k_block[None, :], Q.Q4_K)[0])
bound = (n + 2) * 2.0 ** -24 * (np.abs(x) @ np.abs(s.T))  # float32 dot-product rounding
assert np.all(np.abs(y - (x.astype(np.float64) @ s.T.astype(np.float64))) <= bound)
assert np.allclose(dx, dy @ s, rtol=1e-5, atol=1e-6)
assert np.allclose(tiny.logits(ids), floats.logits(ids), rtol=1e-4, atol=1e-5)  # blocks = their floats
print("08: all checks passed")
