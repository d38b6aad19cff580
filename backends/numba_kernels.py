"""Numba kernels behind backends/numba_backend.py: a flat module of @njit functions.

Each kernel mirrors a method of the NumPy reference (backends/numpy_backend.py) and
states its maths in its docstring; tests/test_backend_numba.py checks one against
the other, and a run with NUMBA_DISABLE_JIT=1 executes these same functions as
plain Python, so what is read here is what runs.

Conventions:
- outputs are preallocated by the caller and passed last; kernels return nothing
  unless they say so (the wrappers in numba_backend.py own allocation);
- arithmetic runs in the arrays' dtype (float32 or float64); row reductions
  (sums of squares, softmax denominators, losses) accumulate in float64;
- `parallel=True` kernels split work with `prange` over rows or independent
  (batch, head, tile) items, never over a reduction, so results do not depend on
  the thread count;
- matrix products of tiles call np.dot, which numba lowers to BLAS gemm: loops
  written here reach half of BLAS's speed at best (measured on 128 x 64 tiles);
- no fastmath, but `reassoc` on the float64 row sums (_row_sum, _row_dot): results
  must not depend on flags that drop the handling of -inf (masked scores), inf
  (exp overflow in silu) or NaN;
- error_model="numpy" where a kernel divides: x / 0 gives inf or NaN as in
  NumPy, and the loop has no zero check that keeps LLVM from vectorising it;
- elementwise arithmetic in the arrays' dtype, as NumPy's: constants are float32
  (_F32), which a float64 kernel widens exactly; a Python float literal would
  widen a float32 kernel's arithmetic to float64 (half the vector width).

Letters as in backends/base.py: B batch, T tokens, N = B*T, d hidden, f MLP width,
H query heads, Hkv kv heads, g = H/Hkv, hd head dim, V vocabulary.
"""
from __future__ import annotations

import ctypes
import glob
import math
import os
import sys
import time
import warnings

# numba's OpenMP threads spin after each parallel kernel by default; between the
# model's numpy matmuls and on a shared machine that spinning starves the next
# kernel's threads (measured on 2 busy cores: rmsnorm forward 16 ms instead of 0.8).
# Read when libgomp loads, so this only acts if nothing loaded it before numba, and
# only on the OpenMP layer (threading_layer below); the workqueue layer's threads
# sleep on a condition variable between kernels, with nothing to set. The thread
# count (NUMBA_NUM_THREADS, numba.set_num_threads) works on every layer.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def threading_layer() -> str:
    """The threading layer numba will load for the prange kernels, found as numba
    finds it (NUMBA_THREADING_LAYER, else the first of tbb, omp, workqueue whose
    library loads) without starting any thread: "tbb", "omp" or "workqueue". A
    minimal image has no libgomp.so.1 (OpenMP) and gets workqueue, which runs the
    kernels as well on this project's coarse work items."""
    import importlib

    wanted = os.environ.get("NUMBA_THREADING_LAYER", "default").lower()
    names = {"default": ("tbb", "omp", "workqueue"), "safe": ("tbb",), "threadsafe": ("tbb", "omp"),
             "forksafe": ("tbb", "omp", "workqueue")}.get(wanted, (wanted,))
    for name in names:
        try:
            importlib.import_module(f"numba.np.ufunc.{name}pool" if name != "workqueue" else "numba.np.ufunc.workqueue")
        except ImportError:
            continue
        return name
    return "workqueue"


def threads_note() -> str:
    """One line on the kernels' threads: how many, by which layer, and what to
    install when OpenMP is missing."""
    import numba as nb

    layer = threading_layer()
    note = f"{nb.config.NUMBA_NUM_THREADS} threads ({layer} layer"
    if layer == "workqueue" and os.environ.get("NUMBA_THREADING_LAYER", "default") == "default":
        note += "; OpenMP's libgomp.so.1 was not found: `sudo apt install libgomp1` for the omp layer"
    return note + ")"


def kernel_cache_dir(source_dir: str = os.path.dirname(os.path.abspath(__file__))) -> str | None:
    """Where numba keeps the compiled kernels: $NUMBA_CACHE_DIR when set (numba's
    own variable wins); None, numba's default, beside the source
    (backends/__pycache__) when that is writable; else the user's cache,
    models.cache.cache_dir()/numba (~/.cache/minilars/numba), as for a package
    installed read-only (system site-packages, a shared venv)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    pycache = os.path.join(source_dir, "__pycache__")
    if os.access(pycache if os.path.isdir(pycache) else source_dir, os.W_OK):
        return None
    from minilars.models.cache import cache_dir

    return str(cache_dir() / "numba")


# numba reads the directory when a @njit(cache=True) function is decorated (below),
# and its environment variable when it is first imported: set both, so that child
# processes agree and an earlier import of numba does not matter.
CACHE_DIR = kernel_cache_dir()
if CACHE_DIR is not None:
    os.environ["NUMBA_CACHE_DIR"] = CACHE_DIR
CACHE_LOCATION = CACHE_DIR or os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")  # either way

import numpy as np  # noqa: E402
import scipy.linalg.cython_blas  # noqa: E402, F401  the BLAS numba's np.dot calls: no scipy, no numba backend
import numba  # noqa: E402
import numba.extending  # noqa: E402
from numba import njit, prange  # noqa: E402

from .numpy_backend import GELU_C as _GELU_C, GELU_K as _GELU_K  # noqa: E402  the tanh GELU's constants, one definition
from .resident import release_library_pages, return_freed_heap  # noqa: E402

if CACHE_DIR is not None:
    numba.config.CACHE_DIR = CACHE_DIR


# ---------------------------------------------------------------- first-run notice
# CPU seconds to compile every float32 kernel from an empty cache on this project's
# x86 machine (benchmarks/arm64_check.sh's docs/raspberry-pi.md gives the figures),
# and how much slower a machine compiles: LLVM runs on one core, and a Raspberry Pi
# 4's core is several times slower than a desktop's.
_COMPILE_SECONDS_X86 = 40.0
_COMPILE_SLOWDOWN = {"aarch64": 5.0, "arm64": 5.0, "armv7l": 8.0}


class _CompileNotice(numba.core.event.Listener):
    """On the first kernel numba compiles (a cache miss, not a load from the cache),
    says once on stderr what is happening and for about how long, then one line per
    kernel with its seconds: a first run on a slow board otherwise sits silent for
    minutes. Callees compile inside their kernel (nested events) and are not listed."""

    def __init__(self):
        self.depth = 0
        self.count = 0
        self.started = 0.0

    @staticmethod
    def _ours(event) -> bool:
        return getattr(event.data["dispatcher"], "py_func", None) in _KERNELS

    def on_start(self, event):
        self.depth += 1
        if self.depth != 1 or not self._ours(event):
            return
        if self.count == 0:
            import platform

            minutes = _COMPILE_SECONDS_X86 * _COMPILE_SLOWDOWN.get(platform.machine(), 1.0) / 60
            print(f"minilars: compiling kernels for this CPU (one time, about {max(1, round(minutes))} min at most; "
                  f"cached in {CACHE_LOCATION}; {threads_note()})", file=sys.stderr, flush=True)
        self.count += 1
        dtypes = sorted({str(a.dtype) for a in event.data["args"] if isinstance(a, numba.types.Array)})
        print(f"  [{self.count}] {event.data['dispatcher'].py_func.__name__} ({', '.join(dtypes)}) ...",
              end="", file=sys.stderr, flush=True)
        self.started = time.perf_counter()

    def on_end(self, event):
        self.depth -= 1
        if self.depth == 0 and self._ours(event):
            print(f" {time.perf_counter() - self.started:.0f} s", file=sys.stderr, flush=True)


class _ReleaseCompiler(numba.core.event.Listener):
    """Each time numba lets go of its compiler (the outermost release of its global
    compiler lock: after compiling a kernel, or loading one from the on-disk cache,
    which is when LLVM's code runs), hands LLVM's code pages and the compile's freed
    heap back to the OS (backends/resident.py): 69 MiB of libllvmlite.so's pages
    and the heap LLVM freed, measured on x86-64 (docs/memory.md). A later compile
    faults the pages back in. The lock is not taken when a compiled kernel is called."""

    def __init__(self):
        self.depth = 0
        self.releases = 0  # how many times it ran (tests read it)

    def on_start(self, event):
        self.depth += 1

    def on_end(self, event):
        self.depth -= 1
        if self.depth == 0:
            release_library_pages("libllvmlite.so")
            return_freed_heap()
            self.releases += 1


_KERNELS: set = set()  # the Python functions of the kernels below (filled at the end of the module)
numba.core.event.register("numba:compile", _CompileNotice())
RELEASE_COMPILER = _ReleaseCompiler()
numba.core.event.register("numba:compiler_lock", RELEASE_COMPILER)


def _one_thread_for_kernel_blas() -> str | None:
    """Make the BLAS that numba's np.dot calls (scipy's) run each call on one thread;
    returns the library's path, or None where it could not.

    The attention kernels call np.dot from every prange thread at once. A BLAS that
    also splits each of those calls over its own threads oversubscribes the cores:
    on 2 cores the T = 2048 attention forward took 13 s instead of 0.24 s. Pip
    wheels of scipy carry their own OpenBLAS, separate from numpy's, so limiting it
    leaves numpy's matmuls (the model's projections) multithreaded."""
    import scipy

    root = os.path.dirname(scipy.__file__)
    for path in (glob.glob(os.path.join(root, os.pardir, "scipy.libs", "*openblas*"))
                 + glob.glob(os.path.join(root, ".dylibs", "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, setter):
                getattr(lib, setter)(1)
                return path
    warnings.warn("numba backend: scipy's BLAS is not a bundled OpenBLAS, so it could not be limited to one "
                  "thread; if attention is slow, set OPENBLAS_NUM_THREADS/MKL_NUM_THREADS=1 for the kernels",
                  RuntimeWarning, stacklevel=2)
    return None


KERNEL_BLAS = _one_thread_for_kernel_blas()  # path of the library limited, or None


# ---------------------------------------------------------------- row primitives
# exp and row reductions written so that LLVM vectorises them: a scalar math.exp is
# a libm call per element, and a running max or sum is a chain of dependent
# operations; either costs more than the tile products. Without fastmath LLVM
# vectorises neither a float max nor a float sum (both change with the order), so
# the max runs on integer keys, which order as the floats do, and the float64 sums
# alone carry the one fastmath flag used here, `reassoc`: their order is then the
# compiler's (fixed for a build and CPU), as a BLAS dot's is.
_F32 = np.float32
_EXP32_LO, _EXP32_HI = _F32(-87.0), _F32(88.72284)  # below: 0 (exp < 2^-125); above ln(FLT_MAX): inf
_EXP32_LOG2E, _EXP32_HALF, _EXP32_ONE = _F32(1.4426950408889634), _F32(0.5), _F32(1.0)
_EXP32_LN2_HI, _EXP32_LN2_LO = _F32(0.693359375), _F32(-2.12194440e-4)
_EXP32_P = (_F32(1.9875691500e-4), _F32(1.3981999507e-3), _F32(8.3334519073e-3), _F32(4.1665795894e-2),
            _F32(1.6666665459e-1), _F32(5.0000001201e-1))
_EXP64_LO, _EXP64_HI = -708.0, 709.782712893384  # 0 below (exp < 2^-1021), inf above ln(DBL_MAX)
_EXP64_LN2_HI, _EXP64_LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_EXP_BLOCK = 256  # elements per pass of _exp_inplace: its int64 scratch holds this many


@njit(cache=True)
def _exp_block_f32(x, n, scale, shift, bits):
    """x[c] <- exp(scale * x[c] - shift) for c < n <= len(bits), in float32, as Cephes
    expf: a = k ln2 + r with k = round(a / ln2), |r| <= ln2/2 (ln2 split in two so
    k ln2 is exact), exp(r) = 1 + r + r^2 P(r) (degree-5 P, error ~1 ulp), times
    2^k = 2 * 2^(k-1) with 2^(k-1) built from its bits, (k - 1 + 127) << 23, written
    to the scratch as int32 and read back as float32 (k reaches 128 just below the
    overflow threshold). Below -87 the factor's bits are those of 0 (exp < 2^-125),
    above ln(FLT_MAX) those of inf, for NaN those of NaN. One pass: the factor is
    written and read back in the same iteration. In place: separate input and output
    arrays would make LLVM check them for overlap and fall back to scalar code when
    they are one array."""
    two_k = bits.view(np.int32)
    factor = bits.view(np.float32)  # the same bytes
    for c in range(n):
        a = scale * x[c] - shift
        a_in = _EXP32_LO if not a >= _EXP32_LO else (_EXP32_HI if a > _EXP32_HI else a)  # NaN -> LO
        k = np.floor(a_in * _EXP32_LOG2E + _EXP32_HALF)
        r = (a_in - k * _EXP32_LN2_HI) - k * _EXP32_LN2_LO
        p = _EXP32_P[0]
        p = p * r + _EXP32_P[1]
        p = p * r + _EXP32_P[2]
        p = p * r + _EXP32_P[3]
        p = p * r + _EXP32_P[4]
        p = p * r + _EXP32_P[5]
        two_k[c] = (0x7FC00000 if a != a else 0 if a < _EXP32_LO else 0x7F800000 if a > _EXP32_HI
                    else (np.int32(k) + 126) << 23)  # NaN, 0, inf or 2^(k-1)
        x[c] = (p * (r * r) + r + _EXP32_ONE) * factor[c] * _F32(2.0)


@njit(cache=True)
def _exp_block_f64(x, n, scale, shift, bits):
    """x[c] <- exp(scale * x[c] - shift) for c < n <= len(bits), in float64, as
    _exp_block_f32 with exp(r) by its Taylor series to r^12/12! (truncation < 3e-16
    relative for |r| <= ln2/2) and 2^(k-1) from (k - 1 + 1023) << 52. Below -708 the
    result is 0 (exp < 2^-1021), above ln(DBL_MAX) inf; NaN stays NaN."""
    factor = bits.view(np.float64)  # the same bytes
    for c in range(n):
        a = scale * x[c] - shift
        a_in = _EXP64_LO if not a >= _EXP64_LO else (_EXP64_HI if a > _EXP64_HI else a)  # NaN -> LO
        k = np.floor(a_in * 1.4426950408889634 + 0.5)
        r = (a_in - k * _EXP64_LN2_HI) - k * _EXP64_LN2_LO
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        bits[c] = (0x7FF8000000000000 if a != a else 0 if a < _EXP64_LO else 0x7FF0000000000000 if a > _EXP64_HI
                   else (np.int64(np.int32(k)) + 1022) << 52)  # NaN, 0, inf or 2^(k-1)
        x[c] = (p * r + 1.0) * factor[c] * 2.0


def _exp_block(x, n, scale, shift, bits):
    """_exp_block_f32 or _exp_block_f64 by x's dtype. As plain Python (NUMBA_DISABLE_JIT)
    this runs; compiled, the overload below picks the one for the dtype while typing,
    so a float32 kernel does not also compile (and optimise) the float64 code."""
    if x.itemsize == 4:
        _exp_block_f32(x, n, np.float32(scale), np.float32(shift), bits)
    else:
        _exp_block_f64(x, n, scale, shift, bits)


@numba.extending.overload(_exp_block)
def _exp_block_typed(x, n, scale, shift, bits):
    if x.dtype == numba.types.float32:
        return lambda x, n, scale, shift, bits: _exp_block_f32(x, n, np.float32(scale), np.float32(shift), bits)
    return lambda x, n, scale, shift, bits: _exp_block_f64(x, n, scale, shift, bits)


@njit(cache=True)
def _exp_inplace(x, n, scale, shift, bits):
    """x[c] <- exp(scale * x[c] - shift) for c < n, in x's dtype, in blocks of
    len(bits) (an int64 scratch)."""
    block = bits.shape[0]
    for c0 in range(0, n, block):
        _exp_block(x[c0:], min(block, n - c0), scale, shift, bits)


@njit(cache=True)
def _row_max_f32(x, n, start, bits):
    """max(start, x[0], ..., x[n-1]) for float32 x, by integer keys: a float's bits
    v as int32, with the 31 value bits flipped when the sign is set,
    key = v ^ ((v >> 31) & 0x7FFFFFFF), order as the floats do (-0 just below +0;
    a NaN with the sign clear above +inf, so it wins and propagates). The map is its
    own inverse: the largest key, written to the scratch `bits`, is read back as the
    float. n >= 1."""
    keys = x[:n].view(np.int32)
    top = np.int32(-2147483648)
    for c in range(n):
        v = keys[c]
        top = max(top, v ^ ((v >> np.int32(31)) & np.int32(0x7FFFFFFF)))
    out = bits.view(np.int32)
    out[0] = top ^ ((top >> np.int32(31)) & np.int32(0x7FFFFFFF))
    top_x = bits.view(np.float32)[0]
    return start if start > top_x else top_x


@njit(cache=True)
def _row_max_f64(x, n, start, bits):
    """_row_max_f32 for float64 x, with int64 keys."""
    keys = x[:n].view(np.int64)
    top = np.int64(-9223372036854775808)
    for c in range(n):
        v = keys[c]
        top = max(top, v ^ ((v >> np.int64(63)) & np.int64(0x7FFFFFFFFFFFFFFF)))
    bits[0] = top ^ ((top >> np.int64(63)) & np.int64(0x7FFFFFFFFFFFFFFF))
    top_x = bits.view(np.float64)[0]
    return start if start > top_x else top_x


def _row_max(x, n, start, bits):
    """max(start, x[0], ..., x[n-1]), exact (a max is the same in any order), n >= 1;
    bits: an int64 scratch. _row_max_f32 or _row_max_f64 by x's dtype, picked as
    _exp_block picks its kernel."""
    if x.itemsize == 4:
        return _row_max_f32(x, n, np.float32(start), bits)
    return _row_max_f64(x, n, start, bits)


@numba.extending.overload(_row_max)
def _row_max_typed(x, n, start, bits):
    if x.dtype == numba.types.float32:
        return lambda x, n, start, bits: _row_max_f32(x, n, np.float32(start), bits)
    return lambda x, n, start, bits: _row_max_f64(x, n, start, bits)


@njit(cache=True, fastmath={"reassoc"})
def _row_sum(x, n):
    """sum(x[0], ..., x[n-1]) in float64, in the vectorised order LLVM picks."""
    s = 0.0
    for c in range(n):
        s += x[c]
    return s


def _like(x, value):
    """value in x's dtype: a float32 constant for a float32 array (an inexact constant,
    such as the GELU's, rounded once), float64 for a float64 one."""
    return x.dtype.type(value)


@numba.extending.overload(_like)
def _like_typed(x, value):
    if x.dtype == numba.types.float32:
        return lambda x, value: np.float32(value)
    return lambda x, value: np.float64(value)


@njit(cache=True, fastmath={"reassoc"})
def _row_dot(x, y, n):
    """sum(x[c] * y[c] for c < n) in float64 (each product in the inputs' dtype), in
    the vectorised order LLVM picks."""
    s = 0.0
    for c in range(n):
        s += x[c] * y[c]
    return s


# ---------------------------------------------------------------- attention
# Tile products go to BLAS through np.dot (numba calls the BLAS behind
# scipy.linalg.cython_blas, limited to one thread above, since every prange thread
# calls it at once). Products write into preallocated tiles:
# `_tile(buffer, rows, cols)` is a contiguous (rows, cols) view of a flat buffer,
# so the ragged last tile needs no allocation and BLAS sees no strides.
@njit(cache=True)
def _tile(buffer, rows, cols):
    """The first rows*cols elements of a flat buffer as a C-contiguous (rows, cols) array."""
    return buffer[:rows * cols].reshape((rows, cols))


_DIAGONAL_PARTS = 4  # a diagonal tile pair is done as this many row blocks (attention forward, backward)


@njit(cache=True)
def _online_softmax_rows(s, group, first_query, first_key, window, m, l, acc, bits):
    """The online-softmax step of the FlashAttention forward (Dao et al. 2022, Alg. 1,
    lines 9-12) for one score tile s (R, tk), in place. Row r is query position
    p = first_query + r // group (the g query heads of a kv head, query-major); key
    column c is position first_key + c and is visible when p - window < first_key + c
    <= p, i.e. for lo <= c < nv with lo = max(0, p - window + 1 - first_key),
    nv = min(tk, p - first_key + 1) (causal, and inside the sliding window; a window
    >= p + 1 masks nothing before p). With m the running row max and l the running
    sum of exponentials:
        m'  = max(m, max_c s_rc),   s_rc <- exp(s_rc - m')  (0 where masked)
        l  <- l exp(m - m') + sum_c s_rc,   acc_r <- acc_r exp(m - m'),   m <- m'
    so that acc + s V is the next accumulator. bits: scratch for _exp_inplace."""
    n_rows, tk = s.shape
    hd = acc.shape[1]
    for r in range(n_rows):
        row = s[r]
        p = first_query + r // group
        lo = max(0, p - window + 1 - first_key)  # first visible key column
        nv = min(tk, p - first_key + 1)  # one past the last
        if nv <= lo:
            row[:] = 0.0
            continue
        seen = row[lo:nv]
        m_new = _row_max(seen, nv - lo, m[r], bits)
        correction = math.exp(m[r] - m_new)  # exp(-inf) = 0 on the first tile
        _exp_inplace(seen, nv - lo, 1.0, m_new, bits)
        row[:lo] = 0.0
        row[nv:] = 0.0
        l[r] = l[r] * correction + _row_sum(seen, nv - lo)
        m[r] = m_new
        if correction != 1.0:
            for d in range(hd):
                acc[r, d] *= correction


@njit(parallel=True, cache=True)
def attention_forward(q, k, v, tile, q_offset, window, scale, o, lse):
    """Causal grouped-query attention with an optional sliding window, tile by tile
    with an online softmax (Dao et al. 2022, Alg. 1), no (T, T) array. Query i sits
    at position p = q_offset + i and sees the keys J_i = {j : p - window < j <= p}
    (the window counts the query itself; window >= q_offset + Tq is plain causal
    attention); with s_ij = scale * q_i . k_j:
        o_i   = sum_{j in J_i} softmax_j(s_ij) v_j
        lse_i = log sum_{j in J_i} exp(s_ij).
    q (B, Tq, H, hd), k/v (B, Tk, Hkv, hd) -> o (B, Tq, H, hd), lse (B, Tq, H);
    query head h reads kv head h // g. Key tiles start at the first key the tile's
    first query sees and end after its last query, so a sliding layer costs
    O(Tq * (window + tile)), not O(Tq * Tk).

    Work items are (batch, kv head, query tile); an item stacks the g query heads
    of its kv head into one (tq*g, hd) block Q, query-major (row i*g + hh is query
    i of head kvh*g + hh), so each key tile feeds one product S = Q K_j^T
    (tq*g, tk) and one P V_j. A key tile that reaches past the first query (the
    diagonal one) goes as _DIAGONAL_PARTS row blocks, each against the keys up to
    its last query only, as in attention_backward. Query tiles are visited 0, n-1,
    1, n-2, ... so the contiguous blocks of items that prange gives each thread
    carry equal causal work."""
    n_b, tq_total, n_heads, hd = q.shape
    tk_total, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    n_tiles = (tq_total + tile - 1) // tile
    for item in prange(n_b * n_kv * n_tiles):
        bk, w = divmod(np.int64(item), n_tiles)
        b, kvh = divmod(bk, n_kv)
        t = w // 2 if w % 2 == 0 else n_tiles - 1 - w // 2
        i0 = t * tile
        tq = min(tile, tq_total - i0)
        rows = group * tq
        qg = np.empty((rows, hd), dtype=q.dtype)
        for i in range(tq):
            for hh in range(group):
                for d in range(hd):
                    qg[i * group + hh, d] = q[b, i0 + i, kvh * group + hh, d] * scale
        m = np.full(rows, -np.inf, dtype=q.dtype)  # running max
        l = np.zeros(rows, dtype=np.float64)  # running sum of exponentials
        acc = np.zeros((rows, hd), dtype=q.dtype)  # running sum of p v
        k_buf = np.empty(tile * hd, dtype=q.dtype)
        v_buf = np.empty(tile * hd, dtype=q.dtype)
        s_buf = np.empty(rows * tile, dtype=q.dtype)
        pv_buf = np.empty(rows * hd, dtype=q.dtype)
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        first_query = q_offset + i0
        first_key = max(0, first_query - window + 1)  # keys before it are outside every window
        last_key = min(tk_total, first_query + tq)  # keys after the tile's last query are masked
        for j0 in range(first_key, last_key, tile):
            tk = min(tile, last_key - j0)
            kj, vj = _tile(k_buf, tk, hd), _tile(v_buf, tk, hd)
            for c in range(tk):
                for d in range(hd):
                    kj[c, d] = k[b, j0 + c, kvh, d]
                    vj[c, d] = v[b, j0 + c, kvh, d]
            parts = 1 if j0 + tk <= first_query + 1 else min(_DIAGONAL_PARTS, tq)  # keys past the first query?
            for s_ in range(parts):
                i_a, i_b = s_ * tq // parts, (s_ + 1) * tq // parts  # queries i_a .. i_b - 1 of the tile
                keys = min(tk, first_query + i_b - j0)  # the keys up to the block's last query
                if keys <= 0 or i_b == i_a:
                    continue
                r0, r1 = i_a * group, i_b * group
                s = _tile(s_buf, r1 - r0, keys)
                pv = _tile(pv_buf, r1 - r0, hd)
                np.dot(qg[r0:r1], kj[:keys].T, s)  # S = Q K_j^T (rows, keys)
                _online_softmax_rows(s, group, first_query + i_a, j0, window, m[r0:r1], l[r0:r1], acc[r0:r1], bits)
                np.dot(s, vj[:keys], pv)  # P V_j (rows, hd)
                acc[r0:r1] += pv
        for i in range(tq):
            for hh in range(group):
                r = i * group + hh
                inv = 1.0 / l[r]
                for d in range(hd):
                    o[b, i0 + i, kvh * group + hh, d] = acc[r, d] * inv
                lse[b, i0 + i, kvh * group + hh] = m[r] + math.log(l[r])


@njit(cache=True)
def _backward_pair(do, q, lse, delta, b, h, i0, tq, j0, kj, vj, dkj, dvj, window, scale, dq,
                   q_buf, do_buf, p_buf, ds_buf, kv_buf, dq_buf, bits):
    """attention_backward's work for query rows i0 .. i0 + tq - 1 of head h against
    the tk = len(kj) keys from j0 (kj, vj (tk, hd) gathered; dkj, dvj (tk, hd) their
    gradients so far, added to): five (tq x tk x hd) BLAS products and the row work
    between them; dq rows i0.. are added to."""
    tk, hd = kj.shape
    qi, doi, dq_out = _tile(q_buf, tq, hd), _tile(do_buf, tq, hd), _tile(dq_buf, tq, hd)
    kv_out = _tile(kv_buf, tk, hd)
    for i in range(tq):
        for d in range(hd):
            qi[i, d] = q[b, i0 + i, h, d] * scale
            doi[i, d] = do[b, i0 + i, h, d]
    p, ds = _tile(p_buf, tq, tk), _tile(ds_buf, tq, tk)
    np.dot(qi, kj.T, p)  # S (tq, tk)
    np.dot(doi, vj.T, ds)  # dP = dO V^T
    for i in range(tq):
        p_row, ds_row = p[i], ds[i]
        lo = max(0, i0 + i - window + 1 - j0)  # visible key columns of row i: lo <= c < nv
        nv = min(tk, i0 + i - j0 + 1)
        if nv <= lo:  # the row's window ends before these keys
            p_row[:] = 0.0
            ds_row[:] = 0.0
            continue
        p_seen, ds_seen = p_row[lo:nv], ds_row[lo:nv]
        _exp_inplace(p_seen, nv - lo, 1.0, lse[b, i0 + i, h], bits)  # P = exp(S - lse)
        delta_i = delta[i0 + i]
        for c in range(nv - lo):
            ds_seen[c] = p_seen[c] * (ds_seen[c] - delta_i)  # dS = P (dP - D)
        if lo > 0:  # masked: at the window's edge
            p_row[:lo] = 0.0
            ds_row[:lo] = 0.0
        p_row[nv:] = 0.0  # masked: on the diagonal
        ds_row[nv:] = 0.0
    np.dot(p.T, doi, kv_out)  # dV_j += P^T dO
    dvj += kv_out
    np.dot(ds.T, qi, kv_out)  # dK_j += dS^T Q
    dkj += kv_out
    np.dot(ds, kj, dq_out)  # dQ_i += dS K_j
    for i in range(tq):
        for d in range(hd):
            dq[b, i0 + i, h, d] += dq_out[i, d] * scale


@njit(parallel=True, cache=True)
def attention_backward(do, q, k, v, o, lse, tile, window, scale, dq, dk_heads, dv_heads):
    """FlashAttention backward (Dao et al. 2022, Alg. 2; Dao 2023, Alg. 2) for causal
    attention with Tq = Tk = T and the forward's window (query i sees keys
    i - window < j <= i; window >= T: none). With s_ij = scale * q_i . k_j,
    P_ij = exp(s_ij - lse_i) recomputed tile by tile (0 where masked) and
    D_i = do_i . o_i:
        dv_j = sum_i P_ij do_i
        dS_ij = P_ij (do_i . v_j - D_i)
        dq_i = scale * sum_j dS_ij k_j
        dk_j = scale * sum_i dS_ij q_i
    Work items are (batch, query head): an item owns dq[b, :, h] and writes its own
    contributions to dk_heads/dv_heads[b, :, h] (B, T, H, hd), which reduce_kv_heads
    sums over the g query heads of each kv head (with g = 1 they are dk, dv).
    An item loops over key tiles j and, inside, over the query tiles i >= j that
    reach into the window of a key of tile j (_backward_pair: five tile x tile x hd
    BLAS products per pair); what it holds is O(tile^2), never O(T). The diagonal
    pair (i = j), half of it masked, goes as _DIAGONAL_PARTS row blocks, block s
    against the keys up to its last row only: with 4, 5/8 of the pair's products
    (T = 512, tile 256, one thread: 16.7 -> 13.2 ms; docs/speed.md)."""
    n_b, t_total, n_heads, hd = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    for item in prange(n_b * n_heads):
        b, h = divmod(np.int64(item), n_heads)
        kvh = h // group
        delta = np.empty(t_total, dtype=q.dtype)  # D_i = do_i . o_i
        for i in range(t_total):
            acc = 0.0
            for d in range(hd):
                acc += do[b, i, h, d] * o[b, i, h, d]
                dq[b, i, h, d] = 0.0
            delta[i] = acc
        k_buf, v_buf = np.empty(tile * hd, dtype=q.dtype), np.empty(tile * hd, dtype=q.dtype)
        q_buf, do_buf = np.empty(tile * hd, dtype=q.dtype), np.empty(tile * hd, dtype=q.dtype)
        p_buf, ds_buf = np.empty(tile * tile, dtype=q.dtype), np.empty(tile * tile, dtype=q.dtype)
        dk_buf, dv_buf = np.empty(tile * hd, dtype=q.dtype), np.empty(tile * hd, dtype=q.dtype)
        kv_buf, dq_buf = np.empty(tile * hd, dtype=q.dtype), np.empty(tile * hd, dtype=q.dtype)
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        for j0 in range(0, t_total, tile):
            tk = min(tile, t_total - j0)
            kj, vj = _tile(k_buf, tk, hd), _tile(v_buf, tk, hd)
            dkj, dvj = _tile(dk_buf, tk, hd), _tile(dv_buf, tk, hd)
            for c in range(tk):
                for d in range(hd):
                    kj[c, d] = k[b, j0 + c, kvh, d]
                    vj[c, d] = v[b, j0 + c, kvh, d]
            dkj[:] = 0.0
            dvj[:] = 0.0
            last_query = min(t_total, j0 + tk - 1 + window)  # later queries' windows end after the tile
            for i0 in range(j0, last_query, tile):  # causal: query tiles before j0 see no key of it
                tq = min(tile, t_total - i0)
                if i0 != j0:
                    _backward_pair(do, q, lse, delta, b, h, i0, tq, j0, kj, vj, dkj, dvj, window, scale, dq,
                                   q_buf, do_buf, p_buf, ds_buf, kv_buf, dq_buf, bits)
                    continue
                parts = min(_DIAGONAL_PARTS, tq)  # on the diagonal tq = tk: rows of block s see keys < its end
                for s in range(parts):
                    r0, r1 = s * tq // parts, (s + 1) * tq // parts
                    _backward_pair(do, q, lse, delta, b, h, i0 + r0, r1 - r0, j0, kj[:r1], vj[:r1], dkj[:r1],
                                   dvj[:r1], window, scale, dq, q_buf, do_buf, p_buf, ds_buf, kv_buf, dq_buf, bits)
            for c in range(tk):
                for d in range(hd):
                    dk_heads[b, j0 + c, h, d] = dkj[c, d]
                    dv_heads[b, j0 + c, h, d] = dvj[c, d]


@njit(parallel=True, cache=True)
def reduce_kv_heads(x_heads, out):
    """out[b, t, c] = sum_{h = c*g}^{c*g + g - 1} x_heads[b, t, h]:
    (B, T, H, hd) -> (B, T, Hkv, hd), summing each kv head's g query heads."""
    n_b, t_total, n_heads, hd = x_heads.shape
    n_kv = out.shape[2]
    group = n_heads // n_kv
    for bt in prange(n_b * t_total):
        b, t = divmod(np.int64(bt), t_total)
        for c in range(n_kv):
            for d in range(hd):
                out[b, t, c, d] = x_heads[b, t, c * group, d]
            for hh in range(1, group):
                for d in range(hd):
                    out[b, t, c, d] += x_heads[b, t, c * group + hh, d]


# ---------------------------------------------------------------- thin products
@njit(cache=True)
def dot_one_thread(a, b, out):
    """out = a b, (M, K)(K, C) -> (M, C), on the calling thread: np.dot calls the
    kernels' BLAS, limited to one thread (KERNEL_BLAS). a and b may be C- or
    F-contiguous (a transposed view is passed as BLAS's transpose flag, no copy).
    For the rank-r products of an adapter (NumbaBackend.matmul: thin), which on a
    multithreaded BLAS wait for the second thread longer than they compute when
    the cores are busy (docs/speed.md)."""
    np.dot(a, b, out)


# ---------------------------------------------------------------- RMSNorm
@njit(parallel=True, cache=True)
def rmsnorm_forward(x, w, eps, y, rstd):
    """rstd_n = 1 / sqrt(mean_c x_nc^2 + eps), y_nc = x_nc * rstd_n * w_c
    (Zhang & Sennrich 2019). x (N, d), w (d,) -> y (N, d), rstd (N, 1)."""
    n, d = x.shape
    for r in prange(n):
        rs = 1.0 / math.sqrt(_row_dot(x[r], x[r], d) / d + eps)
        rstd[r, 0] = rs
        rs = rstd[r, 0]  # in x's dtype, as kept for backward
        for c in range(d):
            y[r, c] = x[r, c] * rs * w[c]


@njit(parallel=True, cache=True)
def rmsnorm_backward(dy, x, w, rstd, dx, dw_parts, rows_per_part):
    """With x_hat = x * rstd and g = dy * w:
        dx_n = rstd_n * (g_n - x_hat_n * mean_c(g_nc x_hat_nc)),
        dw   = sum_n dy_n * x_hat_n.
    dw is summed in fixed row blocks of rows_per_part into dw_parts (P, d), which
    the caller adds up, so the sum order does not depend on the thread count."""
    n, d = x.shape
    n_parts = dw_parts.shape[0]
    for part in prange(n_parts):
        dw = dw_parts[part]
        dw[:] = 0.0
        g = np.empty(d, dtype=dx.dtype)
        x_hat = np.empty(d, dtype=dx.dtype)
        for r in range(part * rows_per_part, min(n, (part + 1) * rows_per_part)):
            rs = rstd[r, 0]
            for c in range(d):
                x_hat[c] = x[r, c] * rs
                g[c] = dy[r, c] * w[c]
                dw[c] += dy[r, c] * x_hat[c]
            mean = _like(dx, _row_dot(g, x_hat, d) / d)
            for c in range(d):
                dx[r, c] = rs * (g[c] - x_hat[c] * mean)


# ---------------------------------------------------------------- RoPE
@njit(parallel=True, cache=True)
def rope(x, cos, sin, sign, y):
    """Rotate-half RoPE (Su et al. 2021) with angle sign: for c < hd/2,
        y_c        = x_c cos_c - sign * x_{c+hd/2} sin_c
        y_{c+hd/2} = x_{c+hd/2} cos_c + sign * x_c sin_c.
    sign = +1 is the forward rotation, -1 its transpose (the backward).
    x (B, T, heads, hd), cos/sin (T, hd) -> y (B, T, heads, hd)."""
    n_b, t_total, n_heads, hd = x.shape
    half = hd // 2
    for bt in prange(n_b * t_total):
        b, t = divmod(np.int64(bt), t_total)
        for h in range(n_heads):
            for c in range(half):
                co = cos[t, c]
                si = sin[t, c] * sign
                x1 = x[b, t, h, c]
                x2 = x[b, t, h, c + half]
                y[b, t, h, c] = x1 * co - x2 * si
                y[b, t, h, c + half] = x2 * co + x1 * si


# ---------------------------------------------------------------- SwiGLU
# Both read the projection output gate_up = [g | u] (N, 2f) whole: with the gate
# and up halves passed as column slices, numba cannot know their rows are
# contiguous and its loops ran at half the speed (SwiGLU at T = 2048: 0.8 s a step).
# Inside, each row's g, u and output are taken as 1-D slices, a block at a time,
# so that the loops index contiguous vectors (with 2-D indexing LLVM left the
# division scalar), and error_model="numpy" lets a division by zero give inf as
# NumPy's does, with no check that would keep the loop scalar.
@njit(parallel=True, cache=True, error_model="numpy")
def swiglu_forward(gate_up, h):
    """h = silu(g) * u = g / (1 + exp(-g)) * u (Shazeer 2020), with g = gate_up[:, :f],
    u = gate_up[:, f:]. (N, 2f) -> h (N, f)."""
    n, f = h.shape
    for r in prange(n):
        e = np.empty(_EXP_BLOCK, dtype=h.dtype)
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        for c0 in range(0, f, _EXP_BLOCK):
            m = min(_EXP_BLOCK, f - c0)
            g, u, out = gate_up[r, c0:c0 + m], gate_up[r, f + c0:f + c0 + m], h[r, c0:c0 + m]
            e[:m] = g
            _exp_inplace(e, m, -1.0, 0.0, bits)  # e = exp(-g), inf past float range
            for c in range(m):
                out[c] = g[c] / (_F32(1.0) + e[c]) * u[c]


@njit(parallel=True, cache=True, error_model="numpy")
def swiglu_backward(dh, gate_up, dgate_up):
    """With sig = 1 / (1 + exp(-g)) and silu = g * sig, g and u the halves of gate_up:
        dg = dh * u * sig * (1 + g (1 - sig)),   du = dh * silu,
    written as dgate_up = [dg | du]. dh (N, f), gate_up (N, 2f) -> dgate_up (N, 2f)."""
    n, f = dh.shape
    for r in prange(n):
        e = np.empty(_EXP_BLOCK, dtype=dh.dtype)
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        for c0 in range(0, f, _EXP_BLOCK):
            m = min(_EXP_BLOCK, f - c0)
            g, u, dhr = gate_up[r, c0:c0 + m], gate_up[r, f + c0:f + c0 + m], dh[r, c0:c0 + m]
            dg, du = dgate_up[r, c0:c0 + m], dgate_up[r, f + c0:f + c0 + m]
            e[:m] = g
            _exp_inplace(e, m, -1.0, 0.0, bits)
            for c in range(m):
                sig = _F32(1.0) / (_F32(1.0) + e[c])
                dg[c] = dhr[c] * u[c] * sig * (_F32(1.0) + g[c] * (_F32(1.0) - sig))
                du[c] = dhr[c] * (g[c] * sig)


# ---------------------------------------------------------------- GeGLU (tanh GELU)
# gelu_tanh(g) = 0.5 g (1 + tanh(a)), a = c (g + 0.044715 g^3), c = sqrt(2/pi)
# (Hendrycks & Gimpel 2016; transformers' gelu_pytorch_tanh). Since
# 0.5 (1 + tanh(a)) = sigmoid(2a), it is g / (1 + exp(-2a)): the vectorised exp of
# the SwiGLU kernels, no tanh call (a libm call per element, not vectorised).
# Row slices and error_model as in SwiGLU.


@njit(parallel=True, cache=True, error_model="numpy")
def geglu_forward(gate_up, h):
    """h = gelu_tanh(g) * u = g sig * u with sig = sigmoid(2a) = 1 / (1 + exp(-2a)),
    a = c (g + 0.044715 g^3), g = gate_up[:, :f], u = gate_up[:, f:] (Shazeer 2020's
    GeGLU with the tanh GELU). (N, 2f) -> h (N, f)."""
    n, f = h.shape
    gelu_k = _like(h, _GELU_K)
    for r in prange(n):
        e = np.empty(_EXP_BLOCK, dtype=h.dtype)
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        for c0 in range(0, f, _EXP_BLOCK):
            m = min(_EXP_BLOCK, f - c0)
            g, u, out = gate_up[r, c0:c0 + m], gate_up[r, f + c0:f + c0 + m], h[r, c0:c0 + m]
            for c in range(m):
                e[c] = g[c] + gelu_k * g[c] * g[c] * g[c]  # a / c
            _exp_inplace(e, m, -2.0 * _GELU_C, 0.0, bits)  # e = exp(-2a), inf past float range
            for c in range(m):
                out[c] = g[c] / (_F32(1.0) + e[c]) * u[c]


@njit(parallel=True, cache=True, error_model="numpy")
def geglu_backward(dh, gate_up, dgate_up):
    """With sig = sigmoid(2a) as in geglu_forward and t = tanh(a) = 2 sig - 1:
        gelu_tanh'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 * 0.044715 g^2)
                      = sig + 2 g sig (1 - sig) c (1 + 3 * 0.044715 g^2),
        dg = dh * u * gelu_tanh'(g),   du = dh * gelu_tanh(g),
    written as dgate_up = [dg | du]. dh (N, f), gate_up (N, 2f) -> dgate_up (N, 2f)."""
    n, f = dh.shape
    gelu_k, gelu_c = _like(dh, _GELU_K), _like(dh, _GELU_C)
    for r in prange(n):
        e = np.empty(_EXP_BLOCK, dtype=dh.dtype)
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        for c0 in range(0, f, _EXP_BLOCK):
            m = min(_EXP_BLOCK, f - c0)
            g, u, dhr = gate_up[r, c0:c0 + m], gate_up[r, f + c0:f + c0 + m], dh[r, c0:c0 + m]
            dg, du = dgate_up[r, c0:c0 + m], dgate_up[r, f + c0:f + c0 + m]
            for c in range(m):
                e[c] = g[c] + gelu_k * g[c] * g[c] * g[c]
            _exp_inplace(e, m, -2.0 * _GELU_C, 0.0, bits)
            for c in range(m):
                gc = g[c]
                sig = _F32(1.0) / (_F32(1.0) + e[c])
                slope = (sig + _F32(2.0) * gc * sig * (_F32(1.0) - sig) * gelu_c
                         * (_F32(1.0) + _F32(3.0) * gelu_k * gc * gc))
                dg[c] = dhr[c] * u[c] * slope
                du[c] = dhr[c] * (gc * sig)


# ---------------------------------------------------------------- cross-entropy rows
@njit(parallel=True, cache=True)
def softmax_xent_rows(z, targets, valid, weight, need_grad, losses):
    """Row work of the chunked cross-entropy, in place on a logits chunk z (c, V):
        loss_n = logsumexp(z_n) - z_n[t_n]                     (0 where not valid)
        z_n   <- weight * (softmax(z_n) - onehot(t_n))         (0 where not valid)
    the second only when need_grad; weight = 1 / n_valid over the whole batch.
    logsumexp is taken after shifting by the row max, so exp never overflows."""
    c, n_vocab = z.shape
    for r in prange(c):
        row = z[r]
        if not valid[r]:
            losses[r] = 0.0
            if need_grad:
                row[:] = 0.0
            continue
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        shift = _row_max(row, n_vocab, row[0], bits)
        target = targets[r]
        z_target = row[target] - shift
        _exp_inplace(row, n_vocab, 1.0, shift, bits)  # the logits are not needed again
        row_sum = _row_sum(row, n_vocab)
        losses[r] = math.log(row_sum) - z_target
        if need_grad:
            factor = _like(row, weight / row_sum)
            for col in range(n_vocab):
                row[col] *= factor
            row[target] -= weight


# ---------------------------------------------------------------- logit soft cap
# y = cap tanh(z / cap) (Gemma 2; Bello et al. 2017): logits bounded by cap. tanh is
# formed as 2 / (1 + exp(-2x)) - 1 with the vectorised exp: exact at both ends
# (exp -> inf gives -1, exp -> 0 gives 1), absolute error about one ulp of 1.
@njit(cache=True, error_model="numpy")
def _tanh_inplace(x, n, scale, bits):
    """x[c] <- tanh(scale * x[c]) for c < n, in x's dtype, as 2 / (1 + exp(-2 scale x)) - 1."""
    _exp_inplace(x, n, -2.0 * scale, 0.0, bits)
    for c in range(n):
        x[c] = _F32(2.0) / (_F32(1.0) + x[c]) - _F32(1.0)


@njit(parallel=True, cache=True)
def softcap_xent_rows(z, cap, targets, valid, weight, need_grad, losses):
    """softmax_xent_rows for soft-capped logits y = cap tanh(z / cap), in place on a
    raw logits chunk z (c, V):
        loss_n = logsumexp(y_n) - y_n[t_n]                                   (0 where not valid)
        z_n   <- weight * (softmax(y_n) - onehot(t_n)) * (1 - tanh^2(z_n / cap))   (0 where not valid)
    the second (the chain rule through the cap) only when need_grad. With no second
    (c, V) array: the row first becomes t = tanh(z / cap), the shift is cap max(t),
    and exp(cap t - shift) is formed a block at a time, once for the sum and, when
    need_grad, once more for the gradient."""
    c, n_vocab = z.shape
    for r in prange(c):
        row = z[r]
        if not valid[r]:
            losses[r] = 0.0
            if need_grad:
                row[:] = 0.0
            continue
        e = np.empty(_EXP_BLOCK, dtype=z.dtype)
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        _tanh_inplace(row, n_vocab, 1.0 / cap, bits)  # t = y / cap
        shift = cap * _row_max(row, n_vocab, row[0], bits)  # max_c y_c
        target = targets[r]
        t_target = row[target]
        row_sum = 0.0
        for c0 in range(0, n_vocab, _EXP_BLOCK):
            m = min(_EXP_BLOCK, n_vocab - c0)
            e[:m] = row[c0:c0 + m]
            _exp_inplace(e, m, cap, shift, bits)  # exp(y - shift)
            row_sum += _row_sum(e, m)
        losses[r] = math.log(row_sum) - (cap * t_target - shift)
        if need_grad:
            factor = _like(row, weight / row_sum)
            for c0 in range(0, n_vocab, _EXP_BLOCK):
                m = min(_EXP_BLOCK, n_vocab - c0)
                e[:m] = row[c0:c0 + m]
                _exp_inplace(e, m, cap, shift, bits)
                t = row[c0:c0 + m]
                for col in range(m):
                    t[col] = factor * e[col] * (_F32(1.0) - t[col] * t[col])
            row[target] -= weight * (1.0 - t_target * t_target)


_SOFTCAP_CHUNK = 4096  # elements per work item of softcap


@njit(parallel=True, cache=True)
def softcap(x, cap, y):
    """y = cap tanh(x / cap), elementwise: x, y (n,) flat."""
    n = x.size
    for chunk in prange((n + _SOFTCAP_CHUNK - 1) // _SOFTCAP_CHUNK):
        c0 = chunk * _SOFTCAP_CHUNK
        c1 = min(n, c0 + _SOFTCAP_CHUNK)
        bits = np.empty(_EXP_BLOCK, dtype=np.int64)
        out = y[c0:c1]
        out[:] = x[c0:c1]
        _tanh_inplace(out, c1 - c0, 1.0 / cap, bits)
        cap_x = _like(out, cap)
        for i in range(c1 - c0):
            out[i] *= cap_x


# ---------------------------------------------------------------- embedding
@njit(parallel=True, cache=True)
def embedding_backward(dy, tokens, dtable, cols_per_part):
    """dtable[v] += sum_{n: tokens[n] = v} dy[n]: (N, d), (N,) -> (V, d), in token
    order. Threads split the columns, so no two write the same element."""
    n, d = dy.shape
    n_parts = (d + cols_per_part - 1) // cols_per_part
    for part in prange(n_parts):
        c0 = part * cols_per_part
        c1 = min(d, c0 + cols_per_part)
        for r in range(n):
            t = tokens[r]
            for c in range(c0, c1):
                dtable[t, c] += dy[r, c]


# ---------------------------------------------------------------- float16 storage
# The activation store keeps block inputs (and, in the `fast` recipe, attention
# outputs) in float16. NumPy converts element by element (about 6.5 ns per
# element here, 7 ms for one (2048, 576) array); these kernels work on the bit
# patterns (uint32 / uint16 views), since numba has no float16 type on the CPU,
# and give NumPy's results bit for bit.
_U32 = np.uint32


@njit(cache=True, inline="always")
def _half_bits(f):
    """The float16 bit pattern of the float32 with bit pattern f (both as uint32),
    rounded to nearest, ties to even (IEEE 754), as NumPy's float32 -> float16 cast
    (npy_floatbits_to_halfbits):
    - normal halves (2^-14 <= |x| < 65520): the exponent is rebiased (127 -> 15)
      and the 23-bit significand is cut to 10 bits after adding half an ulp
      (0x1000), except on an exact tie onto an even last bit (low 14 bits 0x1000);
      a carry out of the significand moves the exponent up, to inf past 65504;
    - |x| < 2^-14: the significand with its implicit bit is shifted right by
      113 - e (e the float32 exponent) into a subnormal half, rounded the same way
      (the tie test also looks at the bits the shift dropped); below 2^-25 this
      leaves a signed zero;
    - |x| >= 65536 and inf: signed inf; NaN: a NaN that keeps the top 10
      significand bits (0x7C01 if those are all 0, so that it stays a NaN).
    All three are computed and one is selected, so LLVM vectorises the loop."""
    sign = (f >> _U32(16)) & _U32(0x8000)
    f_exp = f & _U32(0x7F800000)
    f_sig = f & _U32(0x007FFFFF)
    normal = f_sig + (_U32(0x1000) if (f_sig & _U32(0x3FFF)) != _U32(0x1000) else _U32(0))
    normal = (normal >> _U32(13)) + ((f_exp - _U32(0x38000000)) >> _U32(13))
    e = f_exp >> _U32(23)
    shift = _U32(113) - e if e > _U32(82) else _U32(31)  # e <= 82: the shift empties it anyway
    sig = (_U32(0x00800000) + f_sig) >> shift
    tie = (sig & _U32(0x3FFF)) == _U32(0x1000) and (f & _U32(0x7FF)) == _U32(0)
    subnormal = (sig + (_U32(0) if tie else _U32(0x1000))) >> _U32(13)
    nan = _U32(0x7C00) + (f_sig >> _U32(13))
    nan = _U32(0x7C01) if nan == _U32(0x7C00) else nan
    big = nan if f_exp == _U32(0x7F800000) and f_sig != _U32(0) else _U32(0x7C00)
    return sign + (big if f_exp >= _U32(0x47800000) else subnormal if f_exp <= _U32(0x38000000) else normal)


_CAST_CHUNK = 4096  # elements per work item of the casts


@njit(parallel=True, cache=True)
def single_to_half(x_bits, out_bits):
    """out = float16(x), elementwise, by _half_bits: x_bits (n,) uint32 (a float32
    array's bits) -> out_bits (n,) uint16."""
    n = x_bits.size
    for chunk in prange((n + _CAST_CHUNK - 1) // _CAST_CHUNK):
        for i in range(chunk * _CAST_CHUNK, min(n, (chunk + 1) * _CAST_CHUNK)):
            out_bits[i] = np.uint16(_half_bits(x_bits[i]))


@njit(parallel=True, cache=True)
def half_to_single(h_bits, table, out_bits):
    """out = float32(h), elementwise, exact (every float16 is a float32): out_bits[i]
    = table[h_bits[i]], with table (65536,) uint32 the float32 bits of every float16
    pattern (numba_backend.half_to_single_table). (n,) uint16 -> (n,) uint32."""
    n = h_bits.size
    for chunk in prange((n + _CAST_CHUNK - 1) // _CAST_CHUNK):
        for i in range(chunk * _CAST_CHUNK, min(n, (chunk + 1) * _CAST_CHUNK)):
            out_bits[i] = table[h_bits[i]]


# ---------------------------------------------------------------- AdamW
@njit(parallel=True, cache=True, error_model="numpy")
def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2):
    """In place on flat arrays, as torch.optim.AdamW (Loshchilov & Hutter 2019):
        p <- p (1 - lr wd)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps)
    with bias1 = 1 - b1^t, bias2 = 1 - b2^t."""
    decay = 1.0 - lr * weight_decay
    step_size = lr / bias1
    sqrt_bias2 = math.sqrt(bias2)
    for i in prange(p.size):
        gi = g[i]
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi
        v[i] = beta2 * v[i] + (1.0 - beta2) * (gi * gi)
        p[i] = p[i] * decay - step_size * (m[i] / (math.sqrt(v[i]) / sqrt_bias2 + eps))


_KERNELS.update(f.py_func for f in list(globals().values()) if isinstance(f, numba.core.registry.CPUDispatcher))
