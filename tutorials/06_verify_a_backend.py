# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 06 · Verifying a backend
#
# Every number minilars computes goes through a `Backend` (`minilars.backends`):
# `numpy` (the reference, always there), `numba` (the hot kernels jitted) and
# `torch` (the same kernels as torch ops, for GPUs). A new backend, or a faster
# kernel in an old one, is trusted only after three checks, the ones
# `tests/test_ops_gradients.py`, `tests/test_backend_numba.py` and
# `tests/test_backend_torch.py` run:
#
# 1. **The reference is right**: each NumPy backward agrees with finite differences
#    of its own forward, in float64, under a random upstream gradient (tutorial 01).
# 2. **The candidate equals the reference**, kernel by kernel, on shapes chosen to
#    break tiled and threaded code (T = 1, T not a multiple of the tile, one head,
#    grouped-query ratios), in each dtype, within one tolerance table keyed by dtype:
#    `|candidate - reference| <= atol + rtol * |reference|`, shape and dtype checked
#    first.
# 3. **The whole model agrees**: forward loss and every gradient, by name, on the
#    tiny preset.
#
# This tutorial runs the three checks on the backends installed here, then plants
# two bugs in a "new" backend and watches which check catches each.
#
# Letters: N rows, d width, f MLP width, B batch, T tokens, H / Hkv heads, hd head dim.

# %%
import time

import numpy as np

from minilars import ops
from minilars.backends import available, get_backend
from minilars.backends.numpy_backend import NumpyBackend
from minilars.config import preset
from minilars.methods import MethodConfig, apply_method
from minilars.model import Model

REF = get_backend("numpy")
rng = np.random.default_rng(0)
print("backends installed here:", available())

# %% [markdown]
# ## The tolerance table and the comparison
#
# One table for everything. A test that needs a looser bound for one case is
# usually hiding a bug; the table is per dtype, not per test. `compare` returns
# the worst `|error| / bound` (it passes when that is at most 1).

# %%
TOLERANCES = {"float64": (1e-9, 1e-7), "float32": (1e-4, 1e-3)}  # dtype: (atol, rtol)


def compare(candidate, reference, dtype):
    """max |candidate - reference| / (atol + rtol |reference|), after shape and dtype."""
    candidate, reference = np.asarray(candidate), np.asarray(reference)
    assert candidate.shape == reference.shape, f"shape {candidate.shape} != {reference.shape}"
    assert candidate.dtype == reference.dtype, f"dtype {candidate.dtype} != {reference.dtype}"
    atol, rtol = TOLERANCES[dtype]
    err = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    return float(np.max(err / (atol + rtol * np.abs(reference.astype(np.float64)))))

# %% [markdown]
# ## Kernel by kernel
#
# `kernel_cases` draws inputs for four kernels at one awkward shape: 7 tokens with
# tile 3 (a partial last tile), 6 query heads on 2 kv heads, and the q/k/v and
# gate/up inputs as column slices of one fused projection, as the model passes them
# (non-contiguous views trip up kernels that assume contiguity). Each case runs on
# the candidate (inputs converted with `be.asarray`, results back with
# `be.to_numpy`) and on the reference.

# %%
def kernel_cases(dtype, n_tokens=7, tile=3):
    b, t, h, n_kv, hd, f, vocab = 1, n_tokens, 6, 2, 8, 5, 13
    d = h * hd

    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    qkv = randn(b * t, (h + 2 * n_kv) * hd)  # one fused projection output, sliced
    q = qkv[:, :h * hd].reshape(b, t, h, hd)
    k = qkv[:, h * hd:(h + n_kv) * hd].reshape(b, t, n_kv, hd)
    v = qkv[:, (h + n_kv) * hd:].reshape(b, t, n_kv, hd)
    x, w, dy = randn(b * t, d), randn(d), randn(b * t, d)
    gate_up, dh = randn(b * t, 2 * f), randn(b * t, f)
    do = randn(b, t, h, hd)
    head, targets = randn(vocab, d), rng.integers(0, vocab, b * t)
    rstd = REF.rmsnorm_forward(x, w, 1e-5)[1]  # (N, 1)
    o, lse = REF.attention_forward(q, k, v, tile)
    return {
        "rmsnorm_forward": lambda be: be.rmsnorm_forward(be.asarray(x), be.asarray(w), 1e-5),
        "rmsnorm_backward": lambda be: be.rmsnorm_backward(*map(be.asarray, (dy, x, w, rstd))),
        "attention_forward": lambda be: be.attention_forward(*map(be.asarray, (q, k, v)), tile),
        "attention_backward": lambda be: be.attention_backward(*map(be.asarray, (do, q, k, v, o, lse)), tile),
        "swiglu_backward": lambda be: be.swiglu_backward(*map(be.asarray, (dh, gate_up[:, :f], gate_up[:, f:]))),
        "cross_entropy_head": lambda be: be.cross_entropy_head(be.asarray(x), be.asarray(head), be.asarray(targets),
                                                               2, -100, True, True),
    }


def kernel_report(be, dtype, **shape):
    """{kernel: worst error/bound over its outputs} for backend `be` against numpy."""
    report = {}
    for name, run in kernel_cases(dtype, **shape).items():
        outputs, reference = run(be), run(REF)
        if not isinstance(reference, tuple):
            outputs, reference = (outputs,), (reference,)
        report[name] = max(compare(be.to_numpy(out), ref, dtype) for out, ref in zip(outputs, reference)
                           if isinstance(ref, np.ndarray))
    return report


candidates = {}
for name in available():
    if name == "numpy":
        continue
    start = time.perf_counter()
    be = get_backend(name)
    kernel_report(be, "float64")  # the first call compiles (numba) or warms up (torch)
    warm = time.perf_counter() - start
    candidates[name] = {dtype: kernel_report(be, dtype) for dtype in ("float64", "float32")}
    print(f"{name} (first call {warm:.1f} s):")
    for dtype, report in candidates[name].items():
        print(f"   {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))

# %% [markdown]
# Every ratio is below 1: the kernels agree with the reference within the table.
# Numbers well below 1 in float64 mean the same arithmetic in a different order;
# in float32 they are larger because reordering a float32 sum moves it by
# ~1e-7 relative per term.
#
# ## Gradients, not just values: finite differences
#
# Check 2 can only show that two implementations agree. Check 1 shows that the
# reference is *right*: the backward kernels against finite differences of the
# forward kernels, float64, random upstream. Here for SwiGLU, whose derivative is
# the easiest to get wrong:
#
#     h = silu(g) * u,  silu(g) = g * sigmoid(g)
#     dh/dg = u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),   dh/du = silu(g)

# %%
def fd_error(be, n=6, f=5, h=1e-6):
    """Worst relative error of be.swiglu_backward against centred finite differences."""
    g, u, dh = (rng.standard_normal((n, f)) for _ in range(3))  # dh: random upstream
    dg, du = (be.to_numpy(a) for a in be.swiglu_backward(*map(be.asarray, (dh, g, u))))
    loss = lambda: float(np.sum(be.to_numpy(be.swiglu_forward(be.asarray(g), be.asarray(u))) * dh))  # noqa: E731
    worst = 0.0
    for x, dx in ((g, dg), (u, du)):
        direction = rng.standard_normal(x.shape)
        x += h * direction
        up = loss()
        x -= 2 * h * direction
        down = loss()
        x += h * direction
        numeric = (up - down) / (2 * h)
        worst = max(worst, abs(numeric - np.sum(dx * direction)) / max(1.0, abs(numeric)))
    return worst


fd_reference = fd_error(REF)
print(f"numpy swiglu backward vs finite differences: {fd_reference:.1e}")

# %% [markdown]
# ## The whole model
#
# Kernels can all agree and the model still differ (a layout, a stride, a dtype
# cast between kernels). So the last check runs the tiny preset with LoRA, in
# float64, and compares the loss and every gradient by name.

# %%
TINY = preset("tiny")
tokens = rng.integers(0, TINY.vocab_size, (3, 8))  # T = 7 with attention tile 4, N = 21: partial tile and rows


def model_gradients(backend):
    model = Model.random(TINY, seed=0, dtype=np.float64, backend=backend, attention_tile=4)
    apply_method(model, MethodConfig("lora", rank=4, seed=0))
    init = np.random.default_rng(1)
    for p in model.trainable().values():  # B = 0 at start: give every adapter a value
        p[...] = model.be.asarray(0.1 * init.standard_normal(tuple(p.shape)))
    tape = model.forward(tokens[:, :-1], tokens[:, 1:])
    return tape.loss, {name: model.be.to_numpy(g) for name, g in model.backward(tape).items()}


ref_loss, ref_grads = model_gradients(REF)
model_errors = {}
for name in candidates:
    loss, grads = model_gradients(get_backend(name))
    assert set(grads) == set(ref_grads), "every gradient, by name"
    model_errors[name] = max(abs(loss - ref_loss) / 1e-7, max(compare(grads[n], ref_grads[n], "float64") for n in grads))
    print(f"{name}: tiny model, loss and {len(grads)} gradients: worst error/bound {model_errors[name]:.1e}")

# %% [markdown]
# ## A new backend with two planted bugs
#
# Suppose we write a faster backend, starting from the NumPy one and replacing two
# kernels:
#
# * `swiglu_backward` with the sigmoid's derivative forgotten: `dg = dh * u * sigmoid(g)`.
#   It looks plausible and is wrong everywhere.
# * `rmsnorm_backward` processing rows in blocks of 4 (as a threaded kernel splits
#   its rows), with an off-by-one that drops the last partial block. Correct whenever
#   N is a multiple of 4.

# %%
class NewBackend(NumpyBackend):
    name = "new"
    ROWS = 4

    def swiglu_backward(self, dh, g, u):
        sig = 1.0 / (1.0 + np.exp(-g))
        return dh * u * sig, dh * g * sig  # BUG: dg lacks (1 + g (1 - sig))

    def rmsnorm_backward(self, dy, x, w, rstd):
        n = x.shape[0]
        dx = np.zeros_like(x)
        dw = np.zeros(x.shape[1], dtype=x.dtype)
        for r0 in range(0, n - n % self.ROWS, self.ROWS):  # BUG: the remainder rows are skipped
            part_dx, part_dw = super().rmsnorm_backward(dy[r0:r0 + self.ROWS], x[r0:r0 + self.ROWS], w,
                                                        rstd[r0:r0 + self.ROWS])
            dx[r0:r0 + self.ROWS] = part_dx
            dw += part_dw
        return dx, dw


new = NewBackend()
caught = {}
for n_tokens in (8, 7):
    report = kernel_report(new, "float64", n_tokens=n_tokens, tile=4)
    caught[n_tokens] = {k: v > 1 for k, v in report.items()}
    print(f"N = {n_tokens}: kernels failing the comparison: {[k for k, bad in caught[n_tokens].items() if bad]}")
fd_new = fd_error(new)
print(f"new swiglu backward vs finite differences: {fd_new:.1e}")
new_loss, new_grads = model_gradients(new)
new_model_error = max(compare(new_grads[n], ref_grads[n], "float64") for n in ref_grads)
print(f"tiny model on the new backend: loss equal ({new_loss == ref_loss}), worst gradient error/bound {new_model_error:.1e}")

# %% [markdown]
# The SwiGLU bug fails every check, including finite differences, which need no
# reference at all: that is how the reference itself is trusted. The row-block bug
# passes at N = 8 and fails at N = 7; the loss is identical (forward is untouched),
# only gradients reveal it. Shapes like T = 1 and N = 7 are in the tests for this
# reason; a test at one round shape would have shipped it.
#
# ## Checking a new kernel, step by step
#
# 1. Add it as a method of a `Backend` subclass (`backends/base.py` lists what each
#    kernel receives and returns); fall back to the reference for inputs it does not
#    take (as `NumbaBackend` does for float16).
# 2. Compare it with `NumpyBackend` on Hypothesis-drawn shapes that include T = 1, a
#    partial tile, one head, kv-group ratios 1, 3 and 9, rank 1 and rank = width, in
#    float64 and float32, through the one tolerance table (`tests/tolerances.py`).
# 3. If it is a backward, also check it against finite differences of its own
#    forward in float64 with a random upstream (`tests/gradcheck.py`).
# 4. Run the tiny model on it: loss and every gradient by name, against numpy.
# 5. For a JIT backend run the kernel tests once more with the JIT off
#    (`NUMBA_DISABLE_JIT=1`), so the Python reading of the kernel is tested too.
#
# ## Check

# %%
for name, reports in candidates.items():
    for dtype, report in reports.items():
        assert all(v <= 1 for v in report.values()), (name, dtype, report)
    assert model_errors[name] <= 1, (name, model_errors[name])
assert fd_reference < 1e-6
assert caught[8] == {k: k == "swiglu_backward" for k in caught[8]}, "at N = 8 only the SwiGLU bug shows"
assert caught[7]["rmsnorm_backward"] and caught[7]["swiglu_backward"], "at N = 7 both bugs show"
assert fd_new > 1e-2, "finite differences catch the SwiGLU bug without any reference"
assert new_loss == ref_loss and new_model_error > 1, "the model check catches it through the gradients"
print("06: all checks passed")
