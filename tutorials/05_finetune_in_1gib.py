# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 05 · Fine-tune SmolLM2-135M in 1 GiB of RAM (long)
#
# **Long tutorial.** The full run measures four sequence lengths per method and
# trains for 30 steps: several minutes on a 2-core CPU. `MINILARS_QUICK=1` measures
# two lengths and trains for a few steps (what CI runs).
#
# Tutorials 03 and 04 counted bytes in the activation store. Here we measure the
# whole process: resident memory (RSS) of a real fine-tuning step of SmolLM2-135M on
# the CPU, weights, optimizer state, allocator and all, against a budget of
# **1 GiB**, for LARS (the default recipe) and for LoRA, and ask how many tokens per
# sequence each can afford. Then we fine-tune with LARS, inside the budget, on the
# built-in `personal_notes` data (facts about a person who does not exist, so
# whatever the model learns, it learned here).
#
# Letters: T tokens per sequence, B sequences per step.

# %%
import ctypes
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minilars.data import load_dataset, make_rows, pad_id_of
from minilars.generate import generate_text
from minilars.methods import MethodConfig, apply_method
from minilars.optim import AdamW, AdamWConfig
from minilars.pretrained import load_pretrained
from minilars.train import TrainConfig, Trainer

OUT = Path(os.environ.get("MINILARS_TUTORIAL_OUT")
           or Path(globals().get("__file__", "tutorials/05.py")).resolve().parent / "out")
OUT.mkdir(parents=True, exist_ok=True)
QUICK = os.environ.get("MINILARS_QUICK") == "1"
BUDGET = 1 << 30  # 1 GiB
MiB = 1 << 20
started = time.perf_counter()

# %% [markdown]
# ## Measuring RSS honestly
#
# Two things make RSS misleading if ignored:
#
# * **The allocator keeps freed memory.** glibc serves large blocks from its heap
#   once its dynamic mmap threshold has grown, and a freed heap block stays in RSS.
#   A program that frees its activations after each step then *looks* as big as its
#   worst step forever. We fix the mmap threshold at 128 KiB (`mallopt`), so every
#   array larger than that is mapped on allocation and unmapped on free. This is a
#   setting a memory-bound deployment would use too (`MALLOC_MMAP_THRESHOLD_`).
# * **The peak is what matters, and it is per phase.** Linux keeps the high-water
#   mark `VmHWM`; writing `5` to `/proc/self/clear_refs` resets it to the current
#   RSS, so each phase (loading, a step at some T, training) gets its own peak.
#
# Both are Linux (glibc) facilities: this tutorial reads `/proc/self/status` and
# runs on Linux only.

# %%
M_MMAP_THRESHOLD = -3
try:
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
except OSError:
    print("not glibc: RSS will include memory the allocator keeps after free")


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak():
    """Start a new phase: VmHWM := VmRSS (returns False where the kernel refuses)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes():
    return status_kib("VmHWM") * 1024


def rss_bytes():
    return status_kib("VmRSS") * 1024


per_phase = reset_peak()
print(f"Python + numpy + matplotlib: RSS {rss_bytes() / MiB:.0f} MiB; per-phase peaks: {per_phase}")

# %% [markdown]
# ## The model
#
# The frozen weights are 134.5 M float32 numbers, 513 MiB: half the budget before
# anything trains. (`load_pretrained(..., weight_dtype="float16")` halves that, but
# on the CPU each matmul then converts its weight back to float32 block by block,
# which makes every step slower, most of all at short T; here we keep float32 and
# fit the budget anyway.)
#
# One more knob: the loss is computed `loss_chunk` rows at a time, and a
# `(loss_chunk, V)` block of logits is the only vocabulary-sized array that ever
# exists. With V = 49152 a row of float32 logits is 192 KiB; the default chunk of
# 256 rows is 48 MiB, 64 rows is 12 MiB. We take 64.

# %%
reset_peak()
model, tokenizer = load_pretrained("smollm2-135m", backend="numpy", loss_chunk=64)
load_peak, base_rss = peak_bytes(), rss_bytes()
print(f"loaded in {time.perf_counter() - started:.1f} s: peak while loading {load_peak / MiB:.0f} MiB, "
      f"RSS after {base_rss / MiB:.0f} MiB")

# %% [markdown]
# ## Data
#
# `minilars.data` reads the records, renders each question/answer through the
# model's chat template and labels only the answer tokens (the loss ignores the
# rest); `make_rows` packs examples into rows of `T + 1` tokens.

# %%
data = load_dataset(None, tokenizer)
print(data.describe())
pad = pad_id_of(tokenizer)


def rows_of(t):
    return make_rows(data.train, t, pad, seed=0)


# %% [markdown]
# ## One step's memory at several lengths
#
# For each method: build it, make its optimizer, then for each `T` reset the peak,
# run one training step (forward, backward, AdamW) on one row, and read the peak.
# We also keep `store.bytes_peak`, the activation bytes the engine itself counted.
#
# * LoRA: rank 8 on every projection, PEFT's defaults.
# * LARS: `MethodConfig.lars_default()`: rank-16 subspace adapters on every
#   projection, calibrated on the first training row (one no-grad pass, block by
#   block); blocks recomputed in backward from their float16 input (tutorial 04).
#
# LARS goes second, so anything the allocator kept from LoRA's larger steps counts
# against LARS, not for it. The optimizer's learning rate is 0 here: the steps are
# real, the weights do not move.

# %%
LENGTHS = [128, 256] if QUICK else [128, 256, 512, 1024]
methods = {"lora": MethodConfig("lora", rank=8), "lars": MethodConfig.lars_default()}
measured = {name: {"rss": [], "store": [], "seconds": []} for name in methods}


def train_step(model, opt, tokens, targets):
    tape = model.forward(tokens, targets)
    grads = model.backward(tape)
    opt.step(grads)
    return tape


T_TRAIN, STEPS = (64, 3) if QUICK else (256, 30)
train_rows = rows_of(T_TRAIN)
for name, method in methods.items():
    reset_peak()
    if name == "lars":  # calibrated on the first row's example tokens (padding left out)
        apply_method(model, method, train_rows.tokens[:1], train_rows.real[:1])
    else:
        apply_method(model, method)
    setup_peak = peak_bytes()  # LARS: calibration included
    opt = AdamW(model.trainable(), model.be, AdamWConfig(lr=0.0))
    for t in LENGTHS:
        rows = rows_of(t)
        reset_peak()
        step_start = time.perf_counter()
        tape = train_step(model, opt, rows.tokens[:1], rows.targets[:1])
        measured[name]["seconds"].append(time.perf_counter() - step_start)
        measured[name]["rss"].append(peak_bytes())
        measured[name]["store"].append(tape.store.bytes_peak)
        print(f"{name}  T={t:5d}: peak RSS {peak_bytes() / MiB:6.0f} MiB, activations {tape.store.bytes_peak / MiB:7.1f} MiB, "
              f"{measured[name]['seconds'][-1]:.1f} s")
    print(f"{name}: {model.n_trainable() / 1e6:.2f} M trainable parameters; peak while setting up {setup_peak / MiB:.0f} MiB")
    del opt, tape

# %% [markdown]
# ## What T can each afford?
#
# Peak RSS is a fixed part (weights, optimizer state, the loss's logits chunk, the
# interpreter) plus a part that grows with `T`. For LoRA the growing part is already
# plain at these lengths: a megabyte per token of kept activations. LARS's peak
# hardly moves here: its fixed-size working buffers (the logits chunk, the 512-token
# MLP slices of the recompute) outweigh its few kept activations until T is in the
# thousands. A line through such flat points would promise the whole context, which
# is wrong: docs/memory.md measures LARS at 1,026 MiB for T = 4096.
#
# So the per-token slope we solve with is the larger of two: the line through the
# measured peaks, and the activation bytes per token the engine counted (memory
# that must be resident, whatever the allocator does). Solved for 1 GiB, it gives
# the longest sequence each method can train on within the budget (capped at the
# model's context, 8192). It is an extrapolation beyond the lengths measured, and
# it says nothing of time: attention's cost still grows as `T^2`. For LARS it is
# still optimistic (attention's per-block working set grows with `T` too); read it
# as an upper bound.

# %%
affordable, lines = {}, {}
for name, m in measured.items():
    rss_slope, intercept = np.polyfit(LENGTHS, m["rss"], 1)
    store_slope = np.polyfit(LENGTHS, m["store"], 1)[0]  # kept activation bytes per token
    slope = max(rss_slope, store_slope)
    lines[name] = (slope, intercept)
    affordable[name] = int(min(model.cfg.max_seq_len, (BUDGET - intercept) / max(slope, 1.0)))
    print(f"{name}: RSS ~ {intercept / MiB:.0f} MiB + {slope / 1024:.1f} KiB x T  ->  affordable T in 1 GiB: "
          f"{affordable[name]}{' (the whole context)' if affordable[name] == model.cfg.max_seq_len else ''}")

fig, (ax_rss, ax_store) = plt.subplots(1, 2, figsize=(11, 4))
t_line = np.linspace(0, 1.1 * max(affordable.values()), 100)
for name, marker in (("lars", "o"), ("lora", "s")):
    m = measured[name]
    ax_rss.plot(LENGTHS, np.array(m["rss"]) / MiB, marker, label=f"{name}, measured")
    color = ax_rss.lines[-1].get_color()
    ax_rss.plot(t_line, np.polyval(lines[name], t_line) / MiB, "--", color=color,
                label=f"{name}, fit: T = {affordable[name]} in 1 GiB")
    ax_rss.axvline(affordable[name], color=color, ls=":", lw=0.8)
    ax_store.plot(LENGTHS, np.array(m["store"]) / MiB, marker + "-", label=name)
ax_rss.axhline(BUDGET / MiB, color="k", ls=":", label="1 GiB budget")
ax_rss.axhline(base_rss / MiB, color="gray", ls=":", label="after loading (float32 weights)")
ax_rss.set_ylim(0.8 * base_rss / MiB, 1.5 * BUDGET / MiB)
ax_rss.set_xlabel("T (tokens, batch 1)")
ax_rss.set_ylabel("peak RSS of one training step, MiB")
ax_rss.set_title("SmolLM2-135M on the CPU, numpy backend")
ax_rss.legend(fontsize=7)
ax_store.set_xlabel("T (tokens, batch 1)")
ax_store.set_ylabel("activation store peak, MiB")
ax_store.set_title("what the engine kept for backward")
ax_store.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "05_memory_vs_T.png", dpi=120)
print("plot:", OUT / "05_memory_vs_T.png")

# %% [markdown]
# ## Fine-tune with LARS inside the budget
#
# The model is still the LARS model from the measurements, its adapters at zero.
# `minilars.train.Trainer` runs the loop: the batch of step `s` is a pure function
# of `(seed, s)`, AdamW with gradient clipping and a cosine learning rate, a
# checkpoint at the end. We train at `T = 256` (quick: 64), one row per step, after
# resetting the peak, so what we read afterwards is the training run's own
# high-water mark.

# %%
question = data.train[0].question
answer_before = None if QUICK else generate_text(model, tokenizer, question, max_new_tokens=24)
config = TrainConfig(steps=STEPS, batch_size=1, seq_len=T_TRAIN, lr=2e-3, seed=0)
opt = AdamW(model.trainable(), model.be, AdamWConfig(lr=config.lr))  # clips to max_grad_norm 1.0 by default
run_dir = OUT / "05_run"
run_dir.mkdir(exist_ok=True)
trainer = Trainer(model, opt, train_rows, config, run_dir, run_config={"tutorial": "05", "T": T_TRAIN},
                  progress=False)
seen_tokens, seen_targets = map(np.concatenate, zip(*(trainer.batch(s) for s in range(STEPS))))  # (STEPS, T)
loss_before = model.forward(seen_tokens, seen_targets, need_grad=False).loss

reset_peak()
train_start = time.perf_counter()
losses = trainer.run()
train_seconds = time.perf_counter() - train_start
train_peak = peak_bytes()
loss_after = model.forward(seen_tokens, seen_targets, need_grad=False).loss
print(f"{STEPS} LARS steps at T={T_TRAIN} in {train_seconds:.0f} s; peak RSS while training "
      f"{train_peak / MiB:.0f} MiB (budget {BUDGET / MiB:.0f}); activations {trainer.peak_bytes / MiB:.1f} MiB")
print(f"loss on the rows trained on: {loss_before:.3f} before, {loss_after:.3f} after")
if not QUICK:
    print(f"Q: {question}\nbefore: {answer_before}\nafter:  {generate_text(model, tokenizer, question, max_new_tokens=24)}")

# %% [markdown]
# Thirty single-row steps change how the model answers (short, in the data's
# style) long before they teach it 53 facts; `minilars finetune` runs the whole job
# on this data. The point here is the memory: the training run's peak sits a
# little above the weights, far inside the budget.

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(range(1, len(losses) + 1), losses, "o-")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title(f"LARS on personal_notes, T={T_TRAIN}")
fig.tight_layout()
fig.savefig(OUT / "05_lars_loss.png", dpi=120)

# %% [markdown]
# ## Check
#
# Loading, LARS's calibration, every LARS step measured and the whole training run
# stay under 1 GiB of RSS;
# LARS keeps several times fewer activation bytes than LoRA at every length; it can
# afford at least four times LoRA's sequence length in the same budget; and training
# lowered the loss on the rows it trained on.

# %%
assert per_phase, "these checks need per-phase peaks (/proc/self/clear_refs)"
assert load_peak < BUDGET, load_peak
assert setup_peak < BUDGET, f"LARS calibration peaked at {setup_peak / MiB:.0f} MiB"
assert train_peak < BUDGET, f"LARS training peaked at {train_peak / MiB:.0f} MiB"
assert all(rss < BUDGET for rss in measured["lars"]["rss"]), measured["lars"]["rss"]
assert all(5 * a < b for a, b in zip(measured["lars"]["store"], measured["lora"]["store"])), measured
assert affordable["lars"] >= 4 * affordable["lora"], affordable
assert loss_after < loss_before, (loss_before, loss_after)
print(f"05: all checks passed ({time.perf_counter() - started:.0f} s)")
