# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 03 · Where LoRA's memory goes
#
# LoRA trains a few million parameters instead of a hundred million, so it is
# often called memory-efficient. The parameters are not where the memory goes.
# A training step keeps, between forward and backward, every activation that some
# backward needs, and that grows with the number of tokens `T`. The parameters do
# not grow at all.
#
# minilars puts every kept tensor through one **activation store**
# (`minilars.store.ActivationStore`), which counts bytes per site: `store.site_peak`
# by field (`"blocks.3.attn.q"`), `store.peak_by_kind()` summed over blocks
# (`"attn"`, `"mlp_in"`, ...), `store.bytes_peak` in total. So we can read off
# exactly what LoRA keeps, per site, as `T` grows, and set it against the parameter
# count.
#
# Plan: (1) measure a mid-size random model at several `T` for the frozen path,
# LoRA and LARS; (2) write down the per-token formula, check that it equals the
# measurement *to the byte*; (3) evaluate the formula with SmolLM2-135M's shape
# (checked on one of its blocks) and see where activations overtake the
# parameters.
#
# Letters: T tokens, N = B*T, d hidden, f MLP width, H query heads, k = kv width,
# r rank, L blocks, V vocabulary.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minilars.config import ModelConfig, preset
from minilars.methods import ALL_PROJECTIONS, MethodConfig, apply_method
from minilars.model import Model
from minilars.weights import PROJECTION_STREAM, expected_shapes, stream_inputs, stream_outputs

OUT = Path(os.environ.get("MINILARS_TUTORIAL_OUT")
           or Path(globals().get("__file__", "tutorials/03.py")).resolve().parent / "out")
OUT.mkdir(parents=True, exist_ok=True)
QUICK = os.environ.get("MINILARS_QUICK") == "1"
rng = np.random.default_rng(0)
F32 = 4  # bytes per float32

# %% [markdown]
# ## 1. Measure
#
# A mid-size LLaMA-style config (GQA 2:1, head dim 32) that runs a training step in
# well under a second. For each method we run one forward + backward and read the
# store. `lora` is PEFT's recipe (rank 8 on every projection, alpha 16); `lars` is
# `MethodConfig.lars_default()`: rank-16 subspace adapters, blocks recomputed in
# backward from an input kept in float16 (tutorial 04 explains it).

# %%
cfg = ModelConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=2048)
lengths = [64, 128, 256] if QUICK else [64, 128, 256, 512, 1024]
R_LORA = 8
methods = {"frozen": MethodConfig("frozen"), "lora": MethodConfig("lora", rank=R_LORA),
           "lars": MethodConfig.lars_default(rank=16)}

peaks = {name: [] for name in methods}  # store.bytes_peak per T
lora_kinds = []  # LoRA: store.peak_by_kind() per T
trainable = {}
for name, method in methods.items():
    model = Model.random(cfg, seed=0)
    calibration = rng.integers(0, cfg.vocab_size, (1, 128))
    apply_method(model, method, calibration if name == "lars" else None)
    trainable[name] = model.n_trainable()
    for t in lengths:
        tokens = rng.integers(0, cfg.vocab_size, (1, t + 1))
        tape = model.forward(tokens[:, :-1], tokens[:, 1:])
        model.backward(tape)
        assert tape.store.bytes_now == 0, "backward takes back everything forward kept"
        peaks[name].append(tape.store.bytes_peak)
        if name == "lora":
            lora_kinds.append(tape.store.peak_by_kind())
n_params = model.n_params()
print(f"model: {n_params / 1e6:.2f} M parameters; trainable: " +
      ", ".join(f"{name} {count / 1e3:.1f} k" for name, count in trainable.items()))
for i, t in enumerate(lengths):
    print(f"T={t:5d}  store peak  " + "  ".join(f"{name} {peaks[name][i] / 2**20:6.2f} MiB" for name in methods))
print("LoRA at the largest T, by site kind (KiB):",
      {kind: round(nbytes / 1024) for kind, nbytes in sorted(lora_kinds[-1].items(), key=lambda kv: -kv[1])})

# %% [markdown]
# ## 2. The formula, per token
#
# Frozen weights keep nothing for themselves (`dx = dy W^T`, tutorial 01). What is
# kept, per token per block, is what the *nonlinear* steps need:
#
# | site | kept | floats per token |
# |---|---|---|
# | `attn_norm`, `mlp_norm` | input `x`, `rstd` | `d + 1` each |
# | `attn` | RoPE'd `q k v`, output `o`, `lse` (tutorial 02) | `2 H*hd + 2k + H` |
# | `mlp` | SwiGLU pre-activations `gate`, `up` | `2f` |
#
# and once per sequence the final norm (`d + 1`) and the loss's `dx` (`d`: the loss
# is computed chunk by chunk, so no `(T, V)` logits are kept; with V = 49152 a single
# float32 logits row would be 192 KiB).
#
# LoRA adds, at every adapted site, the site input `x` (for `dA = x^T (dy B^T)`) and
# `x A` (for `dB`): the normed input for q/k/v (`d`) and again for gate/up (`d`), the
# SwiGLU output for down (`f`), `r` per projection; the o projection reads the
# attention output, which attention already keeps, and the store counts that buffer
# once.

# %%
def frozen_floats_per_block(c: ModelConfig) -> int:
    return 2 * (c.dim + 1) + (2 * c.q_dim + 2 * c.kv_dim + c.n_heads) + 2 * c.ffn_dim


def lora_extra_floats_per_block(c: ModelConfig, r: int) -> int:
    return 2 * c.dim + c.ffn_dim + r * len(ALL_PROJECTIONS)


def once_floats(c: ModelConfig) -> int:
    return (c.dim + 1) + c.dim  # final norm x, rstd; loss dx


def lora_bytes(c: ModelConfig, t: int, r: int) -> int:
    per_token = c.n_layers * (frozen_floats_per_block(c) + lora_extra_floats_per_block(c, r)) + once_floats(c)
    return F32 * t * per_token


def lora_trainable(c: ModelConfig, r: int) -> int:
    """r (d_in + d_out) per adapted projection per block."""
    ins, outs = stream_inputs(c), stream_outputs(c)
    return c.n_layers * sum(r * (ins[PROJECTION_STREAM[p]] + outs[PROJECTION_STREAM[p]][p]) for p in ALL_PROJECTIONS)


formula = [lora_bytes(cfg, t, R_LORA) for t in lengths]
for t, measured, predicted in zip(lengths, peaks["lora"], formula):
    print(f"T={t:5d}  LoRA store {measured:>10,d} B   formula {predicted:>10,d} B")
print(f"LoRA trainable parameters: counted {trainable['lora']:,d}, formula {lora_trainable(cfg, R_LORA):,d}")

# %% [markdown]
# ## 3. The picture
#
# Left: LoRA's kept bytes on the mid-size model, stacked by site kind, against its
# trainable parameters (with AdamW's two moments: 3x) and against the whole model's
# weights. Already at the smallest `T` the activations outweigh the trainable
# parameters many times over, and they grow linearly with `T`.

# %%
kinds = sorted(lora_kinds[-1], key=lambda kind: -lora_kinds[-1][kind])
stack = np.array([[per_t.get(kind, 0) for per_t in lora_kinds] for kind in kinds]) / 2**20
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
left.stackplot(lengths, stack, labels=kinds)
left.axhline(trainable["lora"] * F32 * 3 / 2**20, color="k", ls="--", label="LoRA params + AdamW m, v")
left.axhline(n_params * F32 / 2**20, color="k", ls=":", label="all weights (float32)")
left.set_xlabel("T (tokens, batch 1)")
left.set_ylabel("MiB")
left.set_title(f"LoRA r={R_LORA}, d={cfg.dim}, {cfg.n_layers} blocks: kept per site")
left.legend(fontsize=7, loc="upper left")

# %% [markdown]
# ## 4. SmolLM2-135M
#
# The formula only needs the config. First check it on the real shape: one block of
# SmolLM2-135M (`preset("smollm2-135m")` with one layer and a small vocabulary, random
# weights; the vocabulary does not enter the formula) must match the store to the
# byte. The LARS default keeps, per block, only the block input in float16 (`2d`
# bytes), and in backward rebuilds one block at a time: the frozen-path caches plus
# `z = x P` for the four streams (`4r` floats). Its peak is therefore the inputs of
# the other `L - 1` blocks plus one block's caches, which is checked on two blocks.

# %%
smol = preset("smollm2-135m")
R_LARS = 16


def lars_default_bytes(c: ModelConfig, t: int, r: int) -> int:
    """Peak under block=recompute, input.x=half: backward of the last block."""
    return t * ((c.n_layers - 1) * 2 * c.dim + F32 * (frozen_floats_per_block(c) + 4 * r))


one_block = smol.with_(n_layers=1, vocab_size=256, max_seq_len=512)
two_blocks = smol.with_(n_layers=2, vocab_size=256, max_seq_len=512)
shape_checks = {}
for label, c, method, predicted in [
        ("lora, 1 block", one_block, MethodConfig("lora", rank=R_LORA), lora_bytes(one_block, 64, R_LORA)),
        ("lars, 2 blocks", two_blocks, MethodConfig.lars_default(rank=R_LARS), lars_default_bytes(two_blocks, 64, R_LARS))]:
    model = Model.random(c, seed=0)
    apply_method(model, method, rng.integers(0, c.vocab_size, (1, 64)))
    tokens = rng.integers(0, c.vocab_size, (1, 65))
    tape = model.forward(tokens[:, :-1], tokens[:, 1:])
    model.backward(tape)
    shape_checks[label] = (tape.store.bytes_peak, predicted)
    print(f"SmolLM2 shape, {label}, T=64: store peak {tape.store.bytes_peak:,d} B, formula {predicted:,d} B")

smol_params = sum(int(np.prod(shape)) for shape in expected_shapes(smol).values())
smol_lora_trainable = lora_trainable(smol, R_LORA)
frozen_block, lora_block = frozen_floats_per_block(smol), lora_extra_floats_per_block(smol, R_LORA)
print(f"SmolLM2-135M: {smol_params / 1e6:.1f} M parameters, LoRA r={R_LORA} trains {smol_lora_trainable / 1e6:.2f} M")
print(f"per token per block: frozen path {frozen_block} floats, LoRA adds {lora_block} "
      f"-> LoRA keeps {lora_bytes(smol, 1, R_LORA) / 2**20:.2f} MiB per token, "
      f"LARS default {lars_default_bytes(smol, 1, R_LARS) / 2**10:.0f} KiB per token")
crossover_params = smol_lora_trainable * F32 * 3 / lora_bytes(smol, 1, R_LORA)
crossover_weights = smol_params * F32 / lora_bytes(smol, 1, R_LORA)
print(f"LoRA's activations pass its parameters + optimizer state at T = {crossover_params:.0f}, "
      f"the whole float32 model at T = {crossover_weights:.0f}")

smol_t = np.array([128, 256, 512, 1024, 2048, 4096, 8192])
right.plot(smol_t, [lora_bytes(smol, t, R_LORA) / 2**20 for t in smol_t], "o-", label=f"LoRA r={R_LORA}")
right.plot(smol_t, [F32 * t * (smol.n_layers * frozen_block + once_floats(smol)) / 2**20 for t in smol_t], "s-",
           label="frozen path only")
right.plot(smol_t, [lars_default_bytes(smol, t, R_LARS) / 2**20 for t in smol_t], "^-", label=f"LARS default r={R_LARS}")
right.axhline(smol_params * F32 / 2**20, color="k", ls=":", label="all weights (float32)")
right.axhline(smol_lora_trainable * F32 * 3 / 2**20, color="k", ls="--", label="LoRA params + AdamW m, v")
right.set_xscale("log", base=2)
right.set_yscale("log")
right.set_xlabel("T (tokens, batch 1)")
right.set_ylabel("MiB kept for backward")
right.set_title("SmolLM2-135M, from the formula")
right.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "03_where_lora_memory_goes.png", dpi=120)
print("plot:", OUT / "03_where_lora_memory_goes.png")

# %% [markdown]
# ## Check
#
# The formula is exact (on the mid-size model at every `T`, and on SmolLM2's block
# shape); LoRA's kept bytes are linear in `T` and exceed its parameters and optimizer
# state from the first length measured; and the LARS default keeps several times
# less than LoRA at every `T` on both models.

# %%
assert peaks["lora"] == formula, (peaks["lora"], formula)
assert trainable["lora"] == lora_trainable(cfg, R_LORA)
assert all(measured == predicted for measured, predicted in shape_checks.values()), shape_checks
per_token = [peak / t for peak, t in zip(peaks["lora"], lengths)]
assert max(per_token) == min(per_token), "LoRA's kept bytes must be linear in T"
assert peaks["lora"][0] > 3 * F32 * trainable["lora"], "activations outweigh LoRA's parameters + AdamW state"
assert all(lars * 3 < lora for lars, lora in zip(peaks["lars"], peaks["lora"])), (peaks["lars"], peaks["lora"])
assert lars_default_bytes(smol, 1, R_LARS) * 10 < lora_bytes(smol, 1, R_LORA)
assert 400 < crossover_weights < 700  # SmolLM2: LoRA's activations pass the weights near T = 530
print("03: all checks passed")
