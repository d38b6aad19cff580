"""The shape-only backend (backends/shape_backend.py) against numpy itself.

1. ShapeArray's views and copies are numpy's: a slice, a reshape, a transpose share
   the buffer exactly when numpy's do; a buffer is freed with its last view.
2. Temporary elision: an expression allocates what tracemalloc sees numpy allocate.
3. Each kernel's counted memory (its peak inside, what it returns) matches
   tracemalloc around the real numpy and numba kernels on SmolLM2's widths.
4. Planning stays shape-only: T = 8192 on SmolLM2-135M plans without data.
"""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from minilars.backends import available, get_backend
from minilars.backends.shape_backend import ELIDE_MIN_BYTES, MemoryLedger, ShapeArray, ShapeBackend


def _mirror(x: np.ndarray, ledger: MemoryLedger) -> ShapeArray:
    """A ShapeArray with x's shape, dtype and layout (a view of its base's buffer)."""
    if x.base is None:
        return ShapeArray(x.shape, x.dtype, ledger)
    base = x.base
    while isinstance(base.base, np.ndarray):
        base = base.base
    owner = ShapeArray(base.shape, base.dtype, ledger)
    offset = x.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    return ShapeArray(x.shape, x.dtype, ledger, base=owner, strides=x.strides, offset=offset)


# ---------------------------------------------------------------- 1. views and copies
VIEWS = {
    "row slice": lambda a: a[3:7],
    "column slice": lambda a: a[:, 5:20],
    "column slice split into heads": lambda a: a[:, 8:24].reshape(2, 6, 4, 4),
    "column slice merged": lambda a: a[:, 8:24].reshape(2, 6, 4, 4).reshape(12, 16),
    "transpose": lambda a: a.T,
    "transposed reshape": lambda a: a.T.reshape(-1),
    "ellipsis and new axis": lambda a: a[None, ..., :4],
    "negative index": lambda a: a[-1],
    "strided": lambda a: a[::2, 1::3],
    "strided reshape": lambda a: a[::2].reshape(3, 2, 32),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_views_are_numpys(name):
    real = np.zeros((12, 32), dtype=np.float32)
    ledger = MemoryLedger()
    shaped = ShapeArray(real.shape, real.dtype, ledger)
    out_real, out_shape = VIEWS[name](real), VIEWS[name](shaped)
    assert out_shape.shape == out_real.shape
    shares = np.shares_memory(out_real, real)
    assert (out_shape.base is not None) == shares
    if shares:
        assert out_shape.strides == out_real.strides
        offset = out_real.__array_interface__["data"][0] - real.__array_interface__["data"][0]
        assert out_shape.offset == offset
        assert out_shape.contiguous == out_real.flags.c_contiguous


def test_a_buffer_is_freed_with_its_last_view():
    ledger = MemoryLedger()
    a = ShapeArray((100, 10), np.float32, ledger)
    view = a[:, :5]
    del a
    assert ledger.bytes_now == 4000  # the view keeps the buffer
    del view
    assert ledger.bytes_now == 0 and ledger.bytes_peak == 4000


# ---------------------------------------------------------------- 2. temporary elision
EXPRESSIONS = {
    "temp * named": lambda a, b, c: (a * b) * b,
    "named * temp": lambda a, b, c: b * (a * b),
    "broadcast * temp": lambda a, b, c: c * (a * b),
    "scalar * temp": lambda a, b, c: 2.0 * (a * b),
    "temp * scalar": lambda a, b, c: (a * b) * 2.0,
    "scalar - temp": lambda a, b, c: 1.0 - (a * b),
    "temp - named": lambda a, b, c: (a * b) - b,
    "named - temp": lambda a, b, c: b - (a * b),
    "chain": lambda a, b, c: a * b * c * (1.0 + a * (1.0 - b)),
    "view * temp": lambda a, b, c: a[:, :64] * (b[:, 64:] * 2.0),
    "float64 scalar": lambda a, b, c: (a * b) / np.sqrt(2.0),
}


def _traced(fn) -> tuple[int, int]:
    """(peak, retained) bytes fn allocates, by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del out
    return peak - base, now - base


@pytest.mark.parametrize("name", list(EXPRESSIONS))
def test_elision_is_numpys(name):
    shape = (ELIDE_MIN_BYTES // 4 // 128 * 2, 128)  # 512 KiB float32 arrays
    a, b, c = (np.ones(s, dtype=np.float32) for s in (shape, shape, (shape[0], 1)))
    peak, retained = _traced(lambda: EXPRESSIONS[name](a, b, c))
    ledger = MemoryLedger()
    sa, sb, sc = (ShapeArray(x.shape, x.dtype, ledger) for x in (a, b, c))
    base = ledger.bytes_now
    ledger.reset()
    out = EXPRESSIONS[name](sa, sb, sc)
    assert out.shape == EXPRESSIONS[name](a, b, c).shape
    assert ledger.bytes_peak - base == pytest.approx(peak, abs=128 * 1024)
    assert ledger.bytes_now - base == pytest.approx(retained, abs=128 * 1024)


# ---------------------------------------------------------------- 3. kernels against tracemalloc
B, T, H, HKV, HD, D, F, V = 1, 512, 9, 3, 64, 576, 1536, 4096
Q, K = H * HD, HKV * HD


def _inputs(rng, dtype=np.float32) -> dict:
    """Arrays as the model hands them to the kernels: q, k contiguous (RoPE's
    outputs), v a column slice of the fused projection, gate_up whole."""
    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    qkv = randn(B * T, Q + 2 * K)
    x = randn(B * T, D)
    return {"x": x, "w": 1 + randn(D), "dy": randn(B * T, D), "rstd": randn(B * T, 1),
            "q": randn(B, T, H, HD), "k": randn(B, T, HKV, HD), "v": qkv[:, Q + K:].reshape(B, T, HKV, HD),
            "v_kept": randn(B, T, HKV, HD),  # the store's own copy of v
            "o": randn(B, T, H, HD), "lse": randn(B, T, H), "do": randn(B, T, H, HD),
            "cos": randn(2048, HD).astype(np.float64), "sin": randn(2048, HD).astype(np.float64),
            "gate_up": randn(B * T, 2 * F), "dh": randn(B * T, F), "head": randn(V, D) / 10,
            "gate_up64": randn(B * T, 2 * F).astype(np.float64), "dh64": randn(B * T, F).astype(np.float64),
            "logits": randn(B * T, V),
            "head16": (randn(V, D) / 10).astype(np.float16), "targets": rng.integers(0, V, B * T),
            "w_in": randn(D, Q + 2 * K), "w16": randn(D, 3 * F).astype(np.float16),
            "p": randn(D, 3 * F), "g": randn(D, 3 * F), "m": randn(D, 3 * F), "v2": np.abs(randn(D, 3 * F)),
            "da": randn(D, 4 * 16)[:, :16],
            "basis": randn(D, 16), "lars_m": randn(16, Q + 2 * K), "lars_m3f": randn(16, 3 * F)}


KERNELS = {
    "matmul": lambda be, a: be.matmul(a["x"], a["w_in"]),
    "matmul float16 weight": lambda be, a: be.matmul(a["x"], a["w16"]),
    "matmul_nt": lambda be, a: be.matmul_nt(a["dy"], a["head"]),
    "matmul_nt float16 weight": lambda be, a: be.matmul_nt(a["dy"], a["head16"]),
    "matmul_tn": lambda be, a: be.matmul_tn(a["x"], a["dy"]),
    "add_low_rank": lambda be, a: be.add_low_rank(a["w_in"], a["basis"], a["lars_m"]),
    "add_low_rank float16 weight": lambda be, a: be.add_low_rank(a["w16"], a["basis"], a["lars_m3f"]),
    "rmsnorm_forward": lambda be, a: be.rmsnorm_forward(a["x"], a["w"], 1e-5),
    "rmsnorm_backward": lambda be, a: be.rmsnorm_backward(a["dy"], a["x"], a["w"], a["rstd"]),
    "rope_forward": lambda be, a: be.rope_forward(a["q"], a["cos"][:T], a["sin"][:T]),
    "rope_backward": lambda be, a: be.rope_backward(a["q"], a["cos"][:T], a["sin"][:T]),
    "attention_forward": lambda be, a: be.attention_forward(a["q"], a["k"], a["v"], 128),
    "attention_backward": lambda be, a: be.attention_backward(a["do"], a["q"], a["k"], a["v_kept"], a["o"],
                                                              a["lse"], 128),
    "swiglu_forward_fused": lambda be, a: be.swiglu_forward_fused(a["gate_up"]),
    "swiglu_backward_fused": lambda be, a: be.swiglu_backward_fused(a["dh"], a["gate_up"]),
    "cross_entropy_head": lambda be, a: be.cross_entropy_head(a["x"], a["head"], a["targets"], 128, -100,
                                                              True, False),
    "cross_entropy_head float16": lambda be, a: be.cross_entropy_head(a["x"], a["head16"], a["targets"], 128,
                                                                      -100, True, False),
    "cross_entropy_head with dhead": lambda be, a: be.cross_entropy_head(a["x"], a["head"], a["targets"], 128,
                                                                         -100, True, True),
    "adamw_update": lambda be, a: be.adamw_update(a["p"], a["g"], a["m"], a["v2"], lr=1e-3, beta1=0.9,
                                                  beta2=0.999, eps=1e-8, weight_decay=0.0, step=2),
    "norm_sq of a view": lambda be, a: be.norm_sq(a["da"]),
}
# the kernels issue #19's model families add (Gemma's GeGLU and soft caps, sliding and
# scaled attention): (call, the numpy reference's method and keyword it needs); the
# "of a column slice" / "of a view" inputs are ones the numba kernels leave to numpy
FAMILY_KERNELS = {
    "attention_forward window": (lambda be, a: be.attention_forward(a["q"], a["k"], a["v"], 128, window=200,
                                                                    scale=0.1), "attention_forward", "window"),
    "attention_backward window": (lambda be, a: be.attention_backward(a["do"], a["q"], a["k"], a["v_kept"], a["o"],
                                                                      a["lse"], 128, window=200, scale=0.1),
                                  "attention_backward", "window"),
    "geglu_forward_fused": (lambda be, a: be.geglu_forward_fused(a["gate_up"]), "geglu_forward_fused", None),
    "geglu_backward_fused": (lambda be, a: be.geglu_backward_fused(a["dh"], a["gate_up"]), "geglu_backward_fused",
                             None),
    "geglu_backward_fused float64": (lambda be, a: be.geglu_backward_fused(a["dh64"], a["gate_up64"]),
                                     "geglu_backward_fused", None),
    "geglu of a column slice": (lambda be, a: be.geglu_forward_fused(a["gate_up"][:, :2 * F - 2]),
                                "geglu_forward_fused", None),
    "cross_entropy_head softcap": (lambda be, a: be.cross_entropy_head(a["x"], a["head"], a["targets"], 128, -100,
                                                                       True, False, softcap=30.0),
                                   "cross_entropy_head", "softcap"),
    "cross_entropy_head softcap with dhead": (lambda be, a: be.cross_entropy_head(
        a["x"], a["head"], a["targets"], 128, -100, True, True, softcap=30.0), "cross_entropy_head", "softcap"),
    "cross_entropy_head softcap float16": (lambda be, a: be.cross_entropy_head(
        a["x"], a["head16"], a["targets"], 128, -100, True, False, softcap=30.0), "cross_entropy_head", "softcap"),
    "cross_entropy_head softcap loss only": (lambda be, a: be.cross_entropy_head(
        a["x"], a["head"], a["targets"], 128, -100, False, False, softcap=30.0), "cross_entropy_head", "softcap"),
    "cross_entropy_head softcap one chunk": (lambda be, a: be.cross_entropy_head(
        a["x"], a["head"], a["targets"], B * T, -100, True, False, softcap=30.0), "cross_entropy_head", "softcap"),
    "softcap": (lambda be, a: be.softcap(a["logits"], 30.0), "softcap", None),
    "softcap of a view": (lambda be, a: be.softcap(a["logits"][:, :V - 96], 30.0), "softcap", None),
}
KERNELS.update({name: call for name, (call, _, _) in FAMILY_KERNELS.items()})


def _numpy_reference_lacks(kernel: str, flavour: str) -> str | None:
    """Why the numpy reference cannot run this kernel yet (backends/numpy_backend.py
    gets the #19 methods on another branch), or None. The numba backend needs it only
    for the inputs its kernels do not take."""
    if kernel not in FAMILY_KERNELS or (flavour == "numba" and not kernel.endswith(("column slice", "a view"))):
        return None
    import inspect

    from minilars.backends.numpy_backend import NumpyBackend

    _, method, option = FAMILY_KERNELS[kernel]
    function = getattr(NumpyBackend, method, None)
    if function is None or (option and option not in inspect.signature(function).parameters):
        return f"NumpyBackend has no {method}({option or ''}) yet"
    return None


@pytest.mark.parametrize("flavour", [b for b in ("numpy", "numba") if b in available()])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_memory_matches_tracemalloc(kernel, flavour):
    """What a shape kernel counts (its peak inside, what it returns) is what
    tracemalloc sees the real kernel allocate, within 2 % or 128 KiB (numpy's
    ufunc buffers, 8192 elements per operand, are not modelled). numba runs one
    thread here: per-thread buffers peak together only when the threads overlap."""
    if _numpy_reference_lacks(kernel, flavour):
        pytest.skip(_numpy_reference_lacks(kernel, flavour))
    real = get_backend(flavour)
    arrays = _inputs(np.random.default_rng(0))
    if flavour == "numba":
        from minilars.backends.numba_backend import warmup

        import numba

        warmup(("float32",))
        KERNELS[kernel](real, arrays)  # compile this layout outside the measurement
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            peak, retained = _traced(lambda: KERNELS[kernel](real, arrays))
        finally:
            numba.set_num_threads(threads)
    else:
        peak, retained = _traced(lambda: KERNELS[kernel](real, arrays))

    be = ShapeBackend(flavour, threads=1)
    shaped = {name: _mirror(a, be.ledger) if isinstance(a, np.ndarray) else a for name, a in arrays.items()}
    base = be.ledger.bytes_now
    be.ledger.reset()
    out = KERNELS[kernel](be, shaped)
    assert (be.ledger.bytes_peak - base, be.ledger.bytes_now - base) == \
        (pytest.approx(peak, rel=0.02, abs=128 * 1024), pytest.approx(retained, rel=0.02, abs=128 * 1024))
    del out


def _outputs(result) -> list:
    """A kernel's results as a flat list: arrays, None, Python numbers."""
    return [x for r in (result if isinstance(result, tuple) else (result,)) for x in _outputs(r)] \
        if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("flavour", [b for b in ("numpy", "numba") if b in available()])
@pytest.mark.parametrize("kernel", list(FAMILY_KERNELS))
def test_family_kernels_return_the_real_kernels_shapes_and_dtypes(kernel, flavour):
    """The shape kernel returns what the real one does, output by output: an array
    of the same shape and dtype, None where it returns None, a number where a number."""
    if _numpy_reference_lacks(kernel, flavour):
        pytest.skip(_numpy_reference_lacks(kernel, flavour))
    arrays = _inputs(np.random.default_rng(0))
    real = _outputs(FAMILY_KERNELS[kernel][0](get_backend(flavour), arrays))
    be = ShapeBackend(flavour, threads=1)
    shaped = _outputs(FAMILY_KERNELS[kernel][0](be, {name: _mirror(a, be.ledger) if isinstance(a, np.ndarray) else a
                                                     for name, a in arrays.items()}))
    assert len(shaped) == len(real)
    for i, (got, want) in enumerate(zip(shaped, real)):
        if isinstance(want, np.ndarray):
            assert isinstance(got, ShapeArray) and (got.shape, got.dtype) == (want.shape, want.dtype), (i, got, want)
        else:
            assert type(got) is type(want) or (want is not None and isinstance(got, (int, float))), (i, got, want)

