# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 02 · Attention tile by tile: online softmax and a backward from the log-sum-exp
#
# Causal attention for one head is
#
#     S = Q K^T / sqrt(hd) + mask      (T, T)   mask: -inf where key j > query i
#     P = softmax(S) row by row        (T, T)
#     O = P V                          (T, hd)
#
# Written like that, `S` and `P` are `T x T` per head. For SmolLM2-135M (9 heads) at
# T = 4096 one float32 `P` is 576 MiB per block, and a textbook backward keeps it
# for every block until backward reaches it. That is most of the memory
# of a naive fine-tuning step beyond a few hundred tokens.
#
# FlashAttention (Dao et al. 2022) never forms `P`. Forward walks over the keys a
# tile at a time and keeps a *running* softmax; backward recomputes each tile of `P`
# from `Q`, `K` and one number per row, the log-sum-exp `lse_i = log sum_j exp(S_ij)`.
# What is kept between forward and backward is `Q, K, V, O` and `lse`: linear in T.
#
# This tutorial writes the online softmax out for one head, checks the library's
# grouped-query kernel (`ops.attention_forward` / `ops.attention_backward`) against
# it, against finite differences and against torch autograd, and then measures that
# no `(T, T)` array is kept (nor, with tracemalloc, ever allocated).
#
# Letters: B batch, T tokens, H query heads, Hkv key/value heads (GQA: query head h
# reads kv head h // (H / Hkv)), hd head dim.

# %%
import os
import tracemalloc
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minilars import ops
from minilars.backends import get_backend
from minilars.config import preset
from minilars.model import Model

OUT = Path(os.environ.get("MINILARS_TUTORIAL_OUT")
           or Path(globals().get("__file__", "tutorials/02.py")).resolve().parent / "out")
OUT.mkdir(parents=True, exist_ok=True)
QUICK = os.environ.get("MINILARS_QUICK") == "1"

be = get_backend("numpy")
rng = np.random.default_rng(0)

# %% [markdown]
# ## The textbook version, one head
#
# It returns `P` so that we can compare against it; a training step that kept it
# would pay `T^2` floats per head per block.

# %%
def naive_attention(q, k, v):
    """q, k, v (T, hd) -> O (T, hd), P (T, T), lse (T,)."""
    t, hd = q.shape
    s = q @ k.T / np.sqrt(hd)  # (T, T)
    s[np.triu_indices(t, 1)] = -np.inf  # causal: query i sees keys j <= i
    lse = np.log(np.sum(np.exp(s - s.max(1, keepdims=True)), axis=1)) + s.max(1)  # (T,)
    p = np.exp(s - lse[:, None])  # (T, T), rows sum to 1
    return p @ v, p, lse

# %% [markdown]
# ## Online softmax
#
# For one query row, visit the keys in tiles. Keep three running quantities:
# `m`, the largest score seen so far; `l = sum exp(s_j - m)` over the keys seen;
# `acc = sum exp(s_j - m) v_j`. When a new tile raises the maximum from `m` to
# `m'`, everything accumulated so far was scaled by `exp(-m)` and must now be scaled
# by `exp(-m')`: multiply `l` and `acc` by `exp(m - m')`. After the last tile
#
#     O_i = acc / l,      lse_i = m + log l
#
# exactly, with no approximation and with every `exp` of a number `<= 0` (no
# overflow). A whole tile of query rows goes through at once; keys after the last
# query of the tile are skipped (causality), so about half of the tile pairs never
# run.

# %%
def online_attention(q, k, v, tile):
    """Tiled causal attention for one head: q, k, v (T, hd) -> O (T, hd), lse (T,).
    The largest temporary is one (tile, tile) block of scores."""
    t, hd = q.shape
    o, lse = np.empty_like(q), np.empty(t)
    for i0 in range(0, t, tile):
        i1 = min(i0 + tile, t)
        qt = q[i0:i1] / np.sqrt(hd)  # (tq, hd)
        m = np.full(i1 - i0, -np.inf)  # running max per row
        l = np.zeros(i1 - i0)  # running denominator
        acc = np.zeros((i1 - i0, hd))  # running numerator @ V
        for j0 in range(0, i1, tile):  # keys up to the tile's last query
            j1 = min(j0 + tile, i1)
            s = qt @ k[j0:j1].T  # (tq, tk) the only score block alive
            future = np.arange(j0, j1)[None, :] > np.arange(i0, i1)[:, None]
            s[future] = -np.inf
            m_new = np.maximum(m, s.max(axis=1))
            rescale = np.exp(m - m_new)  # old terms were relative to m
            p = np.exp(s - m_new[:, None])
            l = l * rescale + p.sum(axis=1)
            acc = acc * rescale[:, None] + p @ v[j0:j1]
            m = m_new
        o[i0:i1] = acc / l[:, None]
        lse[i0:i1] = m + np.log(l)
    return o, lse


T, hd, tile = 13, 8, 4  # T not a multiple of the tile: the last tile is partial
q, k, v = (rng.standard_normal((T, hd)) for _ in range(3))
o_ref, p_ref, lse_ref = naive_attention(q, k, v)
o_online, lse_online = online_attention(q, k, v, tile)
online_error = max(np.abs(o_online - o_ref).max(), np.abs(lse_online - lse_ref).max())
print(f"online softmax vs textbook: max error {online_error:.1e}")

# %% [markdown]
# ## The library kernel: grouped-query, batched, same numbers
#
# `ops.attention_forward(q, k, v, tile, be)` takes token-major arrays
# `(B, T, H, hd)` and `(B, T, Hkv, hd)` (SmolLM2 has 9 query heads reading 3 kv
# heads) and returns `O` and an `AttentionCache` with `q, k, v, o, lse`. Each head
# should match the textbook on the kv head it reads.

# %%
B, H, Hkv = 2, 4, 2
group = H // Hkv
Q = rng.standard_normal((B, T, H, hd))
K = rng.standard_normal((B, T, Hkv, hd))
Vv = rng.standard_normal((B, T, Hkv, hd))
O, cache = ops.attention_forward(Q, K, Vv, tile, be)
print("AttentionCache:", {name: value.shape for name, value in vars(cache).items()})

library_error = 0.0
for b in range(B):
    for h in range(H):
        o_h, _, lse_h = naive_attention(Q[b, :, h], K[b, :, h // group], Vv[b, :, h // group])
        library_error = max(library_error, np.abs(O[b, :, h] - o_h).max(), np.abs(cache.lse[b, :, h] - lse_h).max())
print(f"ops.attention_forward vs textbook, every head: max error {library_error:.1e}")

# %% [markdown]
# ## Backward from the log-sum-exp
#
# With `dO` the upstream gradient, the textbook backward is
#
#     dV = P^T dO
#     dP = dO V^T
#     dS = P * (dP - D),   D_i = sum_j P_ij dP_ij        (softmax backward, tutorial 01)
#     dQ = dS K / sqrt(hd),   dK = dS^T Q / sqrt(hd)
#
# Two facts remove every `(T, T)` array from what is kept:
#
# * `P_ij = exp(S_ij - lse_i)`: one tile of `P` is recomputed from a tile of `Q K^T`
#   and the kept `lse`. It costs one more matmul per tile, not memory.
# * `D_i = sum_j P_ij (dO_i . V_j) = dO_i . (sum_j P_ij V_j) = dO_i . O_i`: a row sum
#   of `dO * O`. That is why `O` is kept.
#
# First the first fact, on the one-head example:

# %%
s = q @ k.T / np.sqrt(hd)
s[np.triu_indices(T, 1)] = -np.inf
p_from_lse = np.exp(s - lse_online[:, None])
recompute_error = np.abs(p_from_lse - p_ref).max()
print(f"P recomputed from lse vs P kept by the textbook forward: {recompute_error:.1e}")

# %% [markdown]
# Then the library backward, which does this tile by tile, against finite
# differences of `L = sum(O * dO)` with a **random** `dO` (tutorial 01 says why).

# %%
def directional_derivative(loss, x, direction, h=1e-6):
    x += h * direction
    up = loss()
    x -= 2 * h * direction
    down = loss()
    x += h * direction
    return (up - down) / (2 * h)


dO = rng.standard_normal(O.shape)  # random upstream gradient
dQ, dK, dV = ops.attention_backward(dO, cache, tile, be)
loss = lambda: float(np.sum(ops.attention_forward(Q, K, Vv, tile, be)[0] * dO))  # noqa: E731
fd_error = 0.0
for x, dx in ((Q, dQ), (K, dK), (Vv, dV)):
    for _ in range(3):
        direction = rng.standard_normal(x.shape)
        numeric = directional_derivative(loss, x, direction)
        fd_error = max(fd_error, abs(numeric - np.sum(dx * direction)) / max(1.0, abs(numeric)))
print(f"attention backward vs finite differences: worst relative error {fd_error:.1e}")

# %% [markdown]
# And against torch autograd through `scaled_dot_product_attention`, when torch is
# installed (kv heads repeated for the groups: autograd sums the group's gradients
# back into each kv head, as the kernel does).

# %%
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None
    print("torch is not installed: skipping the autograd comparison")

autograd_error = 0.0
if torch is not None:
    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (Q, K, Vv))
    heads_first = lambda a: a.transpose(1, 2)  # (B, T, H, hd) -> (B, H, T, hd)  # noqa: E731
    ot = F.scaled_dot_product_attention(heads_first(qt), heads_first(kt).repeat_interleave(group, 1),
                                        heads_first(vt).repeat_interleave(group, 1), is_causal=True)
    grads = torch.autograd.grad(ot, (qt, kt, vt), heads_first(torch.tensor(dO)))
    autograd_error = max(np.abs(ours - ref.numpy()).max() for ours, ref in zip((dQ, dK, dV), grads))
    print(f"attention backward vs torch autograd: max error {autograd_error:.1e}")

# %% [markdown]
# ## Nothing `(T, T)` is kept, and nothing `(T, T)` is allocated
#
# What is kept is the `AttentionCache`: `q, o` are `T * H * hd` floats each, `k, v`
# `T * Hkv * hd`, `lse` `T * H`. Linear in `T`.
#
# To show that no `(T, T)` array exists even *transiently*, trace every allocation
# with `tracemalloc` (NumPy reports its buffers to it) while forward and backward
# run, and compare the peak with the size of one `(H, T, T)` probability array. The
# textbook version, run head by head, is traced the same way for contrast.

# %%
def traced_peak(fn):
    """Peak bytes allocated while fn() runs, beyond what was allocated before."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def tiled_step(q, k, v, do, tile):
    o, cache = ops.attention_forward(q, k, v, tile, be)
    ops.attention_backward(do, cache, tile, be)


def textbook_forward(q, k, v):
    """All heads at once, P kept: what a framework without a fused kernel keeps."""
    t, hd_ = q.shape[1], q.shape[-1]
    kk, vv = np.repeat(k[0], group, axis=1), np.repeat(v[0], group, axis=1)  # (T, H, hd)
    s = np.einsum("thd,shd->hts", q[0], kk) / np.sqrt(hd_)  # (H, T, T)
    s[:, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vv), p


H_mem, hd_mem, tile_mem = 4, 32, 128
lengths = [256, 512, 1024, 2048]
textbook_lengths = lengths[:3] if QUICK else lengths  # the textbook needs ~400 MiB at T = 2048
peaks_tiled, peaks_textbook, cache_elements = [], [], []
for t in lengths:
    qm = rng.standard_normal((1, t, H_mem, hd_mem)).astype(np.float32)
    km, vm = (rng.standard_normal((1, t, H_mem // group, hd_mem)).astype(np.float32) for _ in range(2))
    dom = rng.standard_normal(qm.shape).astype(np.float32)
    peaks_tiled.append(traced_peak(lambda: tiled_step(qm, km, vm, dom, tile_mem)))
    if t in textbook_lengths:
        peaks_textbook.append(traced_peak(lambda: textbook_forward(qm, km, vm)))
    _, kept = ops.attention_forward(qm, km, vm, tile_mem, be)
    cache_elements.append(sum(a.size for a in vars(kept).values()))
    textbook = f"{peaks_textbook[-1] / 2**20:7.1f}" if t in textbook_lengths else "      -"
    print(f"T={t:5d}  one (H,T,T) float32 array {H_mem * t * t * 4 / 2**20:5.1f} MiB | traced peak: "
          f"tiled fwd+bwd {peaks_tiled[-1] / 2**20:5.2f} MiB, textbook fwd {textbook} MiB | "
          f"kept {cache_elements[-1] * 4 / 2**20:5.2f} MiB")

lengths_arr = np.array(lengths)
fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.loglog(textbook_lengths, np.array(peaks_textbook) / 2**20, "s-", label="textbook forward (P formed)")
ax.loglog(lengths, np.array(peaks_tiled) / 2**20, "o-", label=f"tiled forward + backward (tile {tile_mem})")
ax.loglog(lengths, np.array(cache_elements) * 4 / 2**20, "^-", label="kept for backward (q k v o lse)")
ax.loglog(lengths, H_mem * lengths_arr**2 * 4 / 2**20, "k:", label="one (H, T, T) float32 array")
ax.set_xlabel("sequence length T")
ax.set_ylabel("MiB")
ax.set_title(f"attention memory, H={H_mem}, hd={hd_mem}")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "02_attention_memory.png", dpi=120)
print("plot:", OUT / "02_attention_memory.png")

# %% [markdown]
# ## The same inside a model: the activation store
#
# In a model the cache goes through the activation store (`minilars.store`), which
# counts what it holds per site. Run the tiny preset at two lengths: the bytes kept
# for attention (`peak_by_kind()["attn"]`) grow by exactly the length ratio, and
# each kept field is `(B, T, ...)`, never `(T, T)`.

# %%
cfg = preset("tiny")
model = Model.random(cfg, seed=0, attention_tile=16)
store_attn = {}
for t in (64, 256):
    tokens = rng.integers(0, cfg.vocab_size, (1, t))
    tape = model.forward(tokens, np.roll(tokens, -1, axis=1))
    store_attn[t] = tape.store.peak_by_kind()["attn"]
    fields = {key.rsplit(".", 1)[1]: nbytes for key, nbytes in tape.store.site_peak.items()
              if key.startswith("blocks.0.attn.")}
    print(f"T={t}: block 0 keeps for attention (bytes) {fields}; all blocks {store_attn[t]} bytes")
    tape.store.clear()
per_token = (2 * cfg.q_dim + 2 * cfg.kv_dim + cfg.n_heads) * 4 * cfg.n_layers  # q o, k v, lse; float32
print(f"expected {per_token} bytes per token over {cfg.n_layers} blocks")

# %% [markdown]
# ## Check
#
# The online softmax and the library kernel equal the textbook; `P` recomputed
# from `lse` equals the kept `P`; the backward passes finite differences and
# autograd with a random upstream; the kept bytes are exactly linear in `T`; the
# tiled peak grows about linearly, and at T = 2048 the whole forward + backward
# allocates less than a quarter of one `(H, T, T)` array, while the textbook forward
# allocates several.

# %%
assert online_error < 1e-12 and library_error < 1e-12, (online_error, library_error)
assert recompute_error < 1e-12, recompute_error
assert fd_error < 1e-6 and autograd_error < 1e-10, (fd_error, autograd_error)
for t, kept in zip(lengths, cache_elements):
    assert kept == t * (2 * H_mem * hd_mem + 2 * (H_mem // group) * hd_mem + H_mem), "kept state must be linear in T"
for t, peak_textbook in zip(textbook_lengths, peaks_textbook):
    assert peak_textbook >= H_mem * t * t * 4, "the textbook forward forms P"
t_max = lengths[-1]
assert peaks_tiled[-1] < H_mem * t_max * t_max * 4 / 4, f"T={t_max}: tiled attention allocated {peaks_tiled[-1]} bytes"
assert peaks_tiled[-1] / peaks_tiled[0] < 1.5 * lengths[-1] / lengths[0], "tiled peak must grow about linearly"
assert store_attn[256] == 4 * store_attn[64] == 256 * per_token, store_attn
print("02: all checks passed")
