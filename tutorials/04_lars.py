# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 04 · LARS: train and store in the activation subspace
#
# Tutorial 03 showed that a fine-tuning step's memory is the activations kept for
# backward, not the parameters. LARS (see docs/lars.md) attacks
# that in two parts:
#
# 1. **Subspace adapters.** A linear site `y = x W` gets the update
#    `W_eff = W + P M`, where `P` (d_in, r) is a fixed orthonormal basis of the top-r
#    directions of the site's *inputs*, found once from calibration tokens, and
#    `M` (r, d_out) trains (zero at start). Backward needs only `z = x P`, `r` floats
#    per token, where LoRA keeps the whole `x`. The gradient of `M` is still exact.
# 2. **Activation storage.** Everything else backward needs goes through the
#    activation store under a policy: `exact`, `half` (float16), `subspace(r)` (keep
#    `C = X Q`, rebuild `X Q Q^T`), or `recompute` (keep only the block's input and
#    rerun the block in backward).
#
# Both parts bet on the same thing: that the activations of a trained model live,
# mostly, in a low-dimensional subspace. So first we look at a real one.
#
# This tutorial loads SmolLM2-135M (`minilars.pretrained.load_pretrained`, cached
# locally after the first pull; about 8 s).
#
# Letters: N = B*T tokens, d = 576 hidden, f = 1536 MLP width, r rank, d_in / d_out
# of a site.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minilars.calibrate import calibrate
from minilars.config import preset
from minilars.methods import MethodConfig, apply_method
from minilars.model import Model
from minilars.pretrained import load_pretrained
from minilars.sites import FullSite
from minilars.store import StoragePlan

OUT = Path(os.environ.get("MINILARS_TUTORIAL_OUT")
           or Path(globals().get("__file__", "tutorials/04.py")).resolve().parent / "out")
OUT.mkdir(parents=True, exist_ok=True)
QUICK = os.environ.get("MINILARS_QUICK") == "1"
rng = np.random.default_rng(0)

start = time.perf_counter()
model, tokenizer = load_pretrained("smollm2-135m", backend="numpy")
be = model.be
print(f"loaded SmolLM2-135M in {time.perf_counter() - start:.1f} s: {model.n_params() / 1e6:.1f} M parameters")

# %% [markdown]
# Some ordinary English text to run through it (any text will do; this is what the
# calibration and the training batch are cut from).

# %%
TEXT = """\
The first bakers of sourdough did not know that they were farming. A jar of flour and water left
on a warm shelf fills within days with wild yeasts and lactic bacteria, and a baker who feeds it
every morning keeps the ones that thrive on that schedule. Over months the jar settles into a
stable community, sour enough to keep other microbes out and lively enough to raise a loaf.
Bakers give their starters names, carry them across oceans and hand them to their children, and
a good starter can outlive the bakery that made it. The bread itself is slow. A dough made with a
starter needs hours to rise, and during those hours the bacteria break down part of the starch
and the proteins, which is why the crumb tastes of more than flour. The crust darkens because
sugars and amino acids react in the heat of the oven, a set of reactions that chemists describe
with long equations and that bakers judge by colour and smell. Most of the skill is in watching:
the dough should double but not collapse, the surface should spring back slowly when pressed,
and the oven should be hotter than seems reasonable. Recipes give times and temperatures, but
flour changes from one harvest to the next and kitchens are warm in summer and cold in winter,
so the numbers are only a place to start. A baker who has made the same loaf for twenty years
still checks it every time, because the jar on the shelf is alive and never quite the same.
Many towns once had a public oven, lit every morning, where families brought their loaves to
bake, and the baker marked each one with a sign so that it went home to the right table. Some of
those ovens still stand, and a few are still lit on holidays, when the queue stretches down the
street and the smell of bread fills the square long before the doors open.
"""
ids = np.asarray(tokenizer.encode(TEXT))
T = 128  # calibration tokens; the spectrum looks at 2T tokens
T_STEP = 64  # tokens of the training batch (kept short: every policy below runs a full step)
calibration_tokens = ids[None, :T]  # (1, T): finds the subspaces
batch = ids[None, T:T + T_STEP + 1]  # (1, T_STEP + 1): a different stretch of text to train on
print(f"{len(ids)} tokens of text; calibration {calibration_tokens.shape}, batch {batch.shape}")

# %% [markdown]
# ## 1. The activation subspace of a real layer
#
# Each block has four input streams (`minilars.sites`): the normed attention input
# read by q, k, v (`attn_in`, d = 576 wide), the attention output read by o
# (`attn_out`, 576), the normed MLP input read by gate and up (`mlp_in`, 576) and
# the SwiGLU output read by down (`mlp_out`, 1536). To see a stream's inputs we wrap
# its site in a recorder for one no-grad forward (`model.hidden`).
#
# For each stream, the singular values of its inputs `X` (N, d_in) say how much of
# `||X||_F^2` the top-r directions hold. The fair question for LARS is harder: does
# a basis found on *calibration* text hold the energy of *other* text? So `P` comes
# from the first 128 tokens and we measure `||X_new P||^2 / ||X_new||^2` on the next
# 128. A Gaussian matrix of the same shape is the no-structure baseline.

# %%
class Recorder:
    """Stands in for a site for one forward, keeping a copy of its input."""

    def __init__(self, site):
        self.site, self.inputs = site, None

    def forward(self, x, be):
        self.inputs = be.to_numpy(x).copy()  # (N, d_in)
        return self.site.forward(x, be)


def stream_inputs(model, layer, tokens):
    """{stream: X (N, d_in)} for one block, from one no-grad forward."""
    sites = model.sites[layer]
    recorders = {stream: Recorder(site) for stream, site in sites.items()}
    sites.update(recorders)
    try:
        model.hidden(tokens)
    finally:
        sites.update({stream: rec.site for stream, rec in recorders.items()})
    return {stream: rec.inputs for stream, rec in recorders.items()}


def top_directions(x, r):
    """P (d_in, r): the top-r right singular vectors of x."""
    return np.linalg.svd(x, full_matrices=False)[2][:r].T


LAYER = model.cfg.n_layers // 2
inputs = stream_inputs(model, LAYER, ids[None, :2 * T])
ranks = np.arange(1, T + 1)
held_out = {}
fig, (ax_sv, ax_energy) = plt.subplots(1, 2, figsize=(11, 4))
for stream, x in list(inputs.items()) + [("gaussian", rng.standard_normal(inputs["mlp_out"].shape))]:
    sv = np.linalg.svd(x, compute_uv=False)
    ax_sv.semilogy(sv / sv[0], label=f"{stream} ({x.shape[1]} wide)")
    calib, new = x[:T], x[T:]
    basis = top_directions(calib, T)  # columns ordered by singular value
    captured = np.cumsum(np.sum((new @ basis) ** 2, axis=0)) / np.sum(new ** 2)  # for r = 1..T
    held_out[stream] = captured
    ax_energy.plot(ranks, captured, label=stream)
    print(f"{stream:9s} held-out energy in the top r calibrated directions: "
          + ", ".join(f"r={r}: {captured[r - 1]:.2f}" for r in (1, 16, 64)))
ax_sv.set_xlabel("index")
ax_sv.set_ylabel("singular value / largest")
ax_sv.set_title(f"block {LAYER} stream inputs, {2 * T} tokens")
ax_sv.legend(fontsize=7)
ax_energy.set_xlabel("rank r of the calibrated basis P")
ax_energy.set_ylabel("||X_new P||^2 / ||X_new||^2")
ax_energy.set_title("energy of new tokens inside the calibrated subspace")
ax_energy.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "04_activation_subspace.png", dpi=120)
print("plot:", OUT / "04_activation_subspace.png")

# %% [markdown]
# The normed attention input is the most concentrated: on new text a single
# calibrated direction holds about three quarters of its energy. The SwiGLU output
# (`mlp_out`) is the least: rank 64 holds about a third. All four real streams hold
# many times what a structureless matrix does at the same rank, on text the basis
# never saw. That is what makes a rank-16 adapter on the input subspace a
# reasonable thing to train.
#
# ## 2. Subspace adapters have exact gradients
#
# With `W_eff = W + P M` and `y = x W_eff`, the chain rule gives
# `dL/dM = P^T dL/dW_eff = P^T x^T dy = (x P)^T dy = z^T dy`. So the `r`-wide `z` is
# all backward needs, and the gradient is the true gradient of the loss with
# respect to `M`, for any `P` and any `r`: nothing is approximated.
#
# `apply_method(model, MethodConfig("lars", rank=16), calibration_tokens)` calibrates
# `P` for every stream of every block (one no-grad pass, block by block) and swaps in
# `LARSSite`s. We give `M` random values (so the check is not at the special point
# `M = 0`), take the gradients, then replace block `LAYER`'s four sites with
# `FullSite(W + P M)` (the same function, with `x` stored and `W_eff` trained) and
# compare `P^T dW_eff` with `dM`.

# %%
R = 16
apply_method(model, MethodConfig("lars", rank=R), calibration_tokens)  # storage: everything exact
for m in model.trainable().values():
    m[...] = 1e-2 * rng.standard_normal(m.shape)
print(f"LARS r={R}: {model.n_trainable() / 1e6:.2f} M trainable parameters "
      f"({100 * model.n_trainable() / model.n_params():.1f} %)")

tokens, targets = batch[:, :-1], batch[:, 1:]
tape = model.forward(tokens, targets)
lars_loss, lars_grads = tape.loss, model.backward(tape)
lars_bytes = {"exact": tape.store.bytes_peak}

lars_sites = dict(model.sites[LAYER])
for stream, site in lars_sites.items():
    model.sites[LAYER][stream] = FullSite(site.to_linear(be), site.outputs)  # W_eff = W + P M
tape = model.forward(tokens, targets)
full_loss, full_grads = tape.loss, model.backward(tape)
model.sites[LAYER].update(lars_sites)  # back to LARS

exact_errors = {}
for stream, site in lars_sites.items():
    dw_eff = be.to_numpy(full_grads[f"blocks.{LAYER}.{stream}.weight"])  # (d_in, d_out)
    for proj in site.targets:
        dm = be.to_numpy(lars_grads[f"blocks.{LAYER}.{stream}.{proj}.lars_M"])  # (r, d_out_s)
        from_full = site.basis.T @ dw_eff[:, site.slices[proj]]  # P^T dW_eff
        exact_errors[proj] = np.linalg.norm(dm - from_full) / np.linalg.norm(from_full)
print(f"loss: LARS {lars_loss:.6f}, full backprop of W + P M {full_loss:.6f}")
print("relative error of dM vs P^T dW_eff (float32):", {p: f"{e:.1e}" for p, e in exact_errors.items()})

# %% [markdown]
# Float32 rounding is all that separates them. The identity holds for every rank; in
# float64 on the tiny preset it holds to machine precision at r = 1, 8 and r = d
# (where `P` is a rotation and `P M` can be any update):

# %%
tiny = preset("tiny")
tiny_tokens = rng.integers(0, tiny.vocab_size, (2, 17))
tiny_errors = {}
for r in (1, 8, tiny.dim):
    small = Model.random(tiny, seed=1, dtype=np.float64)
    apply_method(small, MethodConfig("lars", rank=r), tiny_tokens[:, :-1])
    for m in small.trainable().values():
        m[...] = rng.standard_normal(m.shape)
    grads = small.backward(small.forward(tiny_tokens[:, :-1], tiny_tokens[:, 1:]))
    sites = dict(small.sites[1])
    for stream, site in sites.items():
        small.sites[1][stream] = FullSite(site.to_linear(small.be), site.outputs)
    full = small.backward(small.forward(tiny_tokens[:, :-1], tiny_tokens[:, 1:]))
    tiny_errors[r] = max(
        np.abs(grads[f"blocks.1.{stream}.{p}.lars_M"] - site.basis.T @ full[f"blocks.1.{stream}.weight"][:, site.slices[p]]).max()
        for stream, site in sites.items() for p in site.targets)
print("tiny preset, float64, max |dM - P^T dW_eff| by rank:", {r: f"{e:.1e}" for r, e in tiny_errors.items()})

# %% [markdown]
# ## 3. Storage policies: bytes against gradient error
#
# The adapters keep `r` floats per token per stream; the frozen path around them
# (norms, attention, SwiGLU, tutorial 03) keeps ~5.8k floats per token per block if
# stored exactly. The storage plan (`model.plan`, a `StoragePlan`) decides how, field
# by field; it is independent of the adapters, so we can swap plans on the same
# model and compare every `dM` with the exact-storage gradients from above:
#
# * `half`: float16 copies. Half the bytes, ~1e-3 relative error.
# * `recompute`: keep each block's input only; backward reruns the block first.
#   One more forward of compute, and *exact*: the same arithmetic runs twice.
# * the LARS default, `recompute` with the block input in `half`.
# * `subspace(r)`: keep `C = X Q`. `Q` from the **batch** itself (a randomized range
#   finder on the array being stored) or from **calibration** (a fixed basis per
#   field, computed by `minilars.calibrate.calibrate` from the calibration tokens).
#   We apply it to the norms' inputs and the SwiGLU pre-activations, the largest
#   fields of the frozen path.
#
# (Attention's `q, k, v, o` are left exact here: its backward rebuilds
# `P = exp(S - lse)`, so an error in `q . k` is exponentiated.)

# %%
def gradient_error(rules):
    """(relative error of all dM against exact storage, store peak bytes) under a plan."""
    model.plan = StoragePlan.from_mapping(rules)
    if any("calibration" in policy for policy in rules.values()):
        _, model.bases = calibrate(model, calibration_tokens, None)  # storage bases only (rank None: no P)
    tape = model.forward(tokens, targets)
    grads = model.backward(tape)
    err = np.sqrt(sum(np.sum((be.to_numpy(grads[n]) - be.to_numpy(lars_grads[n])) ** 2) for n in lars_grads)
                  / sum(np.sum(be.to_numpy(g) ** 2) for g in lars_grads.values()))
    return float(err), tape.store.bytes_peak


policies = {"half": {"*": "half"}, "recompute": {"block": "recompute"},
            "default": {"block": "recompute", "input.x": "half"}}
policy_results = {name: gradient_error(rules) for name, rules in policies.items()}
for name, (err, nbytes) in policy_results.items():
    print(f"{name:10s} gradient error {err:.1e}   store peak {nbytes / 2**20:6.2f} MiB  (exact: {lars_bytes['exact'] / 2**20:.2f})")

LARGE_FIELDS = ("attn_norm.x", "mlp_norm.x", "mlp.gate_up")
sweep_ranks = [8, 32] if QUICK else [4, 8, 16, 32, 48]  # below T_STEP: from the batch, r >= N is exact
subspace_results = {}
for source in ("batch", "calibration"):
    for r in sweep_ranks:
        policy = f"subspace({r}, {source})"
        subspace_results[source, r] = gradient_error({field: policy for field in LARGE_FIELDS})
        print(f"{policy:26s} gradient error {subspace_results[source, r][0]:.1e}   "
              f"store peak {subspace_results[source, r][1] / 2**20:6.2f} MiB")
model.plan = StoragePlan()

fig, (ax_err, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
for source, marker in (("batch", "o-"), ("calibration", "s-")):
    ax_err.semilogy(sweep_ranks, [subspace_results[source, r][0] for r in sweep_ranks], marker, label=f"subspace(r, {source})")
    ax_bytes.plot(sweep_ranks, [subspace_results[source, r][1] / 2**20 for r in sweep_ranks], marker, label=f"subspace(r, {source})")
for (name, (err, nbytes)), style in zip(policy_results.items(), (":", "--", "-.")):
    if err > 0:
        ax_err.axhline(err, color="k", ls=style, label=name)
    ax_bytes.axhline(nbytes / 2**20, color="k", ls=style, label=f"{name}{' (exact)' if err == 0 else ''}")
ax_bytes.axhline(lars_bytes["exact"] / 2**20, color="gray", label="everything exact")
ax_err.set_xlabel("rank r")
ax_err.set_ylabel("||dM - dM_exact|| / ||dM_exact||")
ax_err.set_title(f"gradient error, subspace on {', '.join(LARGE_FIELDS)}")
ax_err.legend(fontsize=7)
ax_bytes.set_xlabel("rank r")
ax_bytes.set_ylabel("store peak, MiB")
ax_bytes.set_title(f"bytes kept, T={T_STEP}")
ax_bytes.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "04_storage_policies.png", dpi=120)
print("plot:", OUT / "04_storage_policies.png")

# %% [markdown]
# Reading the plots: on a real model subspace storage is expensive in accuracy.
# The gradient error falls with the rank, but slowly: the norms' inputs and the
# SwiGLU pre-activations are far from low-rank *per token*, and a basis calibrated
# on other text fits a new batch worse than the batch's own (which in turn costs a
# range finder per field per step, and keeps `Q`, width x r per field per block,
# next to `C`: at 64 tokens the bases outweigh the coefficients). `recompute` is exact
# and keeps the fewest bytes; it costs one more forward per block. That is why the
# LARS default is `recompute` with the block input in `half`: about 1e-3 relative
# error, a few percent of exact storage. The subspace bet pays off in the
# *adapters* (section 2), where it is exact, more than in storage.
#
# ## Check
#
# The real streams hold far more held-out energy than a Gaussian at rank 16; `dM`
# equals `P^T dW_eff` (float32 rounding on the real model, machine precision in
# float64 at every rank); `recompute` is bit-exact and keeps less than a fifth of
# exact storage; and the subspace errors shrink as the rank grows while keeping
# fewer bytes than exact storage.

# %%
for stream in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
    assert held_out[stream][15] > 2 * held_out["gaussian"][15], (stream, held_out[stream][15])
assert abs(lars_loss - full_loss) < 1e-4 * abs(full_loss)
assert max(exact_errors.values()) < 1e-4, exact_errors
assert max(tiny_errors.values()) < 1e-12, tiny_errors
assert policy_results["recompute"][0] == 0.0, "recompute reruns the same arithmetic: bit-exact"
assert policy_results["half"][0] < 1e-2 and policy_results["default"][0] < 1e-2
assert policy_results["default"][1] * 5 < lars_bytes["exact"]
for source in ("batch", "calibration"):
    errors = [subspace_results[source, r][0] for r in sweep_ranks]
    assert all(a > b for a, b in zip(errors, errors[1:])), (source, errors)
    assert all(nbytes < lars_bytes["exact"] for _, nbytes in (subspace_results[source, r] for r in sweep_ranks))
print(f"04: all checks passed ({time.perf_counter() - start:.0f} s)")
