# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 01 · Backprop by hand: linear, RMSNorm, softmax
#
# minilars has no autograd. Each op is a pair written by hand: `<op>_forward(...)`
# returns the output and a small *cache*, and `<op>_backward(dy, cache, ...)` turns
# the gradient of the loss with respect to the output, `dy = dL/dy` (the *upstream*
# gradient), into gradients with respect to the inputs. Backward is a
# vector-Jacobian product: `dx = J^T dy`. It never builds `J`.
#
# If you write backward by hand you have to check it. The check used everywhere in
# minilars (`tests/gradcheck.py`) is the one CS231n teaches, and this tutorial builds
# it from scratch:
#
# 1. Pick a **random** upstream gradient `G` with the shape of `y`, and define the scalar
#    `L(x) = sum(f(x) * G)`. Then `dL/dx` is exactly what `backward(G)` should return.
# 2. Pick a random direction `D` with the shape of `x`. The centred finite difference
#    `(L(x + hD) - L(x - hD)) / 2h` estimates `<dL/dx, D>` with error `O(h^2)`.
# 3. Compare it with `sum(dx * D)` from backward.
#
# All of this runs in float64: in float32 the rounding error of `L` divided by `h` is
# larger than most bugs.
#
# At the end we see why step 1 says *random*: seeding backward with all ones (the same
# as checking `y.sum()`) lets a softmax backward that returns zeros pass.
#
# Letters: N rows (tokens), d width, d_in / d_out for a linear layer.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # PNGs only, no window
import matplotlib.pyplot as plt
import numpy as np

from minilars import ops
from minilars.backends import get_backend

OUT = Path(os.environ.get("MINILARS_TUTORIAL_OUT")
           or Path(globals().get("__file__", "tutorials/01.py")).resolve().parent / "out")
OUT.mkdir(parents=True, exist_ok=True)

be = get_backend("numpy")  # the reference backend: plain NumPy, any dtype
rng = np.random.default_rng(0)

# %% [markdown]
# ## The check
#
# `directional_derivative` is step 2. `max_check_error` runs steps 1-3 for every
# input along a few random directions and returns the worst error, relative to the
# size of the derivative. It mutates each input in place and restores it, so the
# forward closure always reads the current arrays.

# %%
def directional_derivative(loss, x, direction, h=1e-6):
    """(L(x + hD) - L(x - hD)) / 2h, x modified in place and restored."""
    x += h * direction
    up = loss()
    x -= 2 * h * direction
    down = loss()
    x += h * direction
    return (up - down) / (2 * h)


def max_check_error(forward, upstream, inputs, grads, n_directions=4, h=1e-6):
    """Worst |finite difference - <grad, D>| / max(1, |finite difference|) over
    every input and n_directions random directions D.
    forward() reads the arrays in `inputs`; L = sum(forward() * upstream)."""
    loss = lambda: float(np.sum(forward() * upstream))  # noqa: E731
    worst = 0.0
    for name, x in inputs.items():
        assert grads[name].shape == x.shape, f"d{name} has shape {grads[name].shape}, {name} has {x.shape}"
        for _ in range(n_directions):
            direction = rng.standard_normal(x.shape)
            numeric = directional_derivative(loss, x, direction, h)
            claimed = float(np.sum(grads[name] * direction))
            worst = max(worst, abs(numeric - claimed) / max(1.0, abs(numeric)))
    return worst


N, d_in, d_out = 5, 7, 4

# %% [markdown]
# ## Linear: `y = x W`
#
# `y_nj = sum_i x_ni W_ij`, so `dL/dx_ni = sum_j dy_nj W_ij` and
# `dL/dW_ij = sum_n x_ni dy_nj`:
#
#     dx = dy W^T    (N, d_out) (d_out, d_in) -> (N, d_in)
#     dW = x^T dy    (d_in, N) (N, d_out)     -> (d_in, d_out)
#
# `dW` needs the input `x`, `dx` does not. That one line is why frozen layers are
# cheap in memory: `ops.linear_forward(..., keep_input=False)` keeps nothing, and
# this is the lever that LoRA and LARS pull (tutorials 03 and 04).

# %%
x = rng.standard_normal((N, d_in))  # (N, d_in)
W = rng.standard_normal((d_in, d_out))  # (d_in, d_out)
G = rng.standard_normal((N, d_out))  # random upstream dL/dy

y, cache = ops.linear_forward(x, W, be)  # cache holds x
dx, dW = ops.linear_backward(G, cache, W, be)
linear_error = max_check_error(lambda: ops.linear_forward(x, W, be)[0], G, {"x": x, "W": W}, {"x": dx, "W": dW})
print(f"linear   worst relative error {linear_error:.1e}")

_, frozen_cache = ops.linear_forward(x, W, be, keep_input=False)
print("frozen linear keeps:", frozen_cache)  # None: dx = dy W^T needs no activation

# %% [markdown]
# ## RMSNorm: `y = x * rstd * w`, `rstd = 1 / sqrt(mean(x^2) + eps)`
#
# Write `x_hat = x * rstd` and `g = dy * w` (the gradient with respect to `x_hat`).
# Row by row, `x_hat` is `x` divided by its own RMS, so moving `x` along itself does
# not change `x_hat` (up to `eps`); the Jacobian of `x -> x_hat` is `rstd (I - x_hat x_hat^T / d)`,
# and it is symmetric, so
#
#     dx = rstd * (g - x_hat * mean(g * x_hat))     (N, d)
#     dw = sum_n dy * x_hat                         (d,)
#
# Backward needs `x` and `rstd`: exactly the two fields of `ops.RMSNormCache`.
# A common bug is to forget the second term (treat `rstd` as a constant); the check
# below catches it.

# %%
d = 6
x = rng.standard_normal((N, d))  # (N, d)
w = rng.standard_normal(d)  # (d,)
G = rng.standard_normal((N, d))
eps = 1e-5

y, cache = ops.rmsnorm_forward(x, w, eps, be)
print("RMSNormCache fields:", {k: v.shape for k, v in vars(cache).items()})
dx, dw = ops.rmsnorm_backward(G, cache, w, be)
rmsnorm_forward = lambda: ops.rmsnorm_forward(x, w, eps, be)[0]  # noqa: E731
rmsnorm_error = max_check_error(rmsnorm_forward, G, {"x": x, "w": w}, {"x": dx, "w": dw})
print(f"rmsnorm  worst relative error {rmsnorm_error:.1e}")

dx_forgot_rstd = cache.rstd * (G * w)  # the bug: rstd treated as a constant
rmsnorm_bug_error = max_check_error(rmsnorm_forward, G, {"x": x}, {"x": dx_forgot_rstd})
print(f"rmsnorm without the mean term: {rmsnorm_bug_error:.1e}  (caught)")

# %% [markdown]
# ### How small should `h` be?
#
# The finite difference has two errors: truncation, which shrinks as `h^2`, and
# rounding, which grows as `eps_machine * |L| / h`. In float64 the sweet spot is
# near `h = 1e-5`; the tests use `1e-6`. The plot shows the V.

# %%
steps = np.logspace(-12, -1, 23)
direction = rng.standard_normal(x.shape)
claimed = float(np.sum(dx * direction))
loss = lambda: float(np.sum(rmsnorm_forward() * G))  # noqa: E731
fd_errors = [abs(directional_derivative(loss, x, direction, h) - claimed) for h in steps]
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(steps, fd_errors, "o-")
ax.set_xlabel("step h")
ax.set_ylabel("|finite difference - backward|")
ax.set_title("RMSNorm, float64: truncation vs rounding")
fig.tight_layout()
fig.savefig(OUT / "01_fd_step.png", dpi=120)
print("best h:", steps[int(np.argmin(fd_errors))], "->", OUT / "01_fd_step.png")

# %% [markdown]
# ## Softmax, and why the upstream gradient must be random
#
# The library has no standalone softmax (attention and the loss fuse it, see
# tutorial 02), so here it is written out. With `p = softmax(x)` row by row,
# `dp_i/dx_j = p_i (delta_ij - p_j)`, hence
#
#     dx = p * (dy - sum(dy * p))     (per row)
#
# Now the trap. Every row of `p` sums to one whatever `x` is, so `L = p.sum()` is
# a constant and its true gradient is **zero**. Checking a backward with an all-ones
# upstream gradient is checking `p.sum()`; a backward that returns zeros is "right".
# A random `G` has no such blind spot.

# %%
def softmax_forward(x):
    """p = exp(x - max) / sum(exp(x - max)), row by row: (N, d) -> (N, d).
    The cache is p itself: backward needs nothing else."""
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    p = z / z.sum(axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp, p):
    """dx = p * (dp - rowsum(dp * p)): (N, d) -> (N, d)."""
    return p * (dp - np.sum(dp * p, axis=-1, keepdims=True))


def softmax_backward_zeros(dp, p):
    """A broken backward: forgets everything."""
    return np.zeros_like(p)


x = rng.standard_normal((N, d))
_, p = softmax_forward(x)
fwd = lambda: softmax_forward(x)[0]  # noqa: E731
ones, G = np.ones((N, d)), rng.standard_normal((N, d))

checks = {}
for name, backward in [("correct", softmax_backward), ("zeros", softmax_backward_zeros)]:
    for upstream_name, upstream in [("all-ones", ones), ("random", G)]:
        err = max_check_error(fwd, upstream, {"x": x}, {"x": backward(upstream, p)})
        checks[name, upstream_name] = err
        print(f"softmax backward {name:8s} upstream {upstream_name:9s} error {err:.1e}")

# %% [markdown]
# The zeros backward passes the all-ones check with an error below `1e-8`: the
# finite difference of a constant is zero too, up to rounding. With a random `G` it is off by order
# one.
#
# The library's loss fuses softmax with the log and the head matmul:
# `ops.cross_entropy_forward` returns the loss and keeps `dx` (its backward just
# scales it by the upstream `dloss`, a scalar, so here a random scalar stands in for
# the random upstream). Same check:

# %%
V = 11
x = rng.standard_normal((N, d))  # (N, d) final hidden states
head = rng.standard_normal((V, d))  # (V, d) tied embedding
targets = rng.integers(0, V, N)
dloss = float(rng.standard_normal())
loss, n_labelled, cache = ops.cross_entropy_forward(x, head, targets, be, chunk=2, need_dhead=True)
dx, dhead = ops.cross_entropy_backward(dloss, cache, be)
ce_error = max_check_error(lambda: np.asarray(ops.cross_entropy_forward(x, head, targets, be, chunk=2)[0]),
                           dloss, {"x": x, "head": head}, {"x": dx, "head": dhead})
print(f"cross-entropy (chunked, tied head) worst relative error {ce_error:.1e}")

# %% [markdown]
# ## The same three against torch autograd (when torch is installed)
#
# Finite differences check along a few directions; autograd gives the whole
# gradient. Same rule: float64 and a random upstream gradient (`grad_outputs`).

# %%
try:
    import torch
except ImportError:
    torch = None
    print("torch is not installed: skipping the autograd comparison")

autograd_errors = {}
if torch is not None:
    x = rng.standard_normal((N, d))
    w = rng.standard_normal(d)
    W = rng.standard_normal((d, d_out))
    G_norm, G_lin = rng.standard_normal((N, d)), rng.standard_normal((N, d_out))
    xt, wt, Wt = (torch.tensor(a, requires_grad=True) for a in (x, w, W))

    # RMSNorm, then linear, then softmax, each with its own random upstream gradient
    yt = xt * torch.rsqrt((xt * xt).mean(-1, keepdim=True) + eps) * wt
    ref_dx, ref_dw = torch.autograd.grad(yt, (xt, wt), torch.tensor(G_norm))
    _, cache = ops.rmsnorm_forward(x, w, eps, be)
    dx, dw = ops.rmsnorm_backward(G_norm, cache, w, be)
    autograd_errors["rmsnorm"] = max(np.abs(dx - ref_dx.numpy()).max(), np.abs(dw - ref_dw.numpy()).max())

    ref_dx, ref_dW = torch.autograd.grad(xt @ Wt, (xt, Wt), torch.tensor(G_lin))
    _, cache = ops.linear_forward(x, W, be)
    dx, dW = ops.linear_backward(G_lin, cache, W, be)
    autograd_errors["linear"] = max(np.abs(dx - ref_dx.numpy()).max(), np.abs(dW - ref_dW.numpy()).max())

    (ref_dx,) = torch.autograd.grad(torch.softmax(xt, -1), xt, torch.tensor(G_norm))
    autograd_errors["softmax"] = np.abs(softmax_backward(G_norm, softmax_forward(x)[1]) - ref_dx.numpy()).max()
    for name, err in autograd_errors.items():
        print(f"{name:8s} max |ours - autograd| = {err:.1e}")

# %% [markdown]
# ## Check
#
# The tutorial's claims, as asserts: every backward agrees with finite differences
# under a random upstream gradient; the dropped-term RMSNorm and the zeros softmax
# are caught by a random upstream; and the zeros softmax is *not* caught by an
# all-ones upstream, which is why minilars never seeds a check with ones.

# %%
TOL = 1e-6  # float64, h = 1e-6: truncation ~1e-12, rounding ~1e-10
assert linear_error < TOL, linear_error
assert rmsnorm_error < TOL, rmsnorm_error
assert ce_error < TOL, ce_error
assert checks["correct", "random"] < TOL and checks["correct", "all-ones"] < TOL
assert rmsnorm_bug_error > 1e-2, "dropping the mean term of RMSNorm's backward must be caught"
assert checks["zeros", "random"] > 1e-2, "a zeros softmax backward must fail a random-upstream check"
assert checks["zeros", "all-ones"] < TOL, "the all-ones check is blind to a zeros softmax backward"
assert all(err < 1e-12 for err in autograd_errors.values()), autograd_errors
print("01: all checks passed")
