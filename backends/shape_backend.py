"""Shape-only backend: arrays that carry a shape and a dtype and no values, whose
allocations and frees are counted. The memory planner (minilars/planner.py) runs
the real Model, its sites and its ActivationStore for one training step on it, so
the prediction follows the code by construction.

Three pieces:

    MemoryLedger  live bytes now and at peak, which arrays were alive at the peak,
                  and the largest total reached under each label (the "moments")
    ShapeArray    numpy's memory semantics without the data: slicing, reshape and
                  transpose give views of the same buffer (numpy's no-copy rules),
                  arithmetic gives a new buffer, or reuses a temporary operand as
                  numpy does (temporary elision); a buffer is freed when its last
                  view is dropped (CPython's reference counting frees at that moment)
    ShapeBackend  the Backend interface (backends/base.py) on ShapeArrays. Each
                  kernel allocates the outputs the real kernel returns and, for a
                  moment, the work arrays it holds inside ("flavour": the numpy,
                  numba or torch backend whose kernels it stands for)

What a kernel holds inside is written down per kernel below, from reading the
kernel in backends/numpy_backend.py and backends/numba_backend.py; the torch
flavour uses the numpy figures (the planner has no measurement of torch's
allocator) and no temporary elision. tests/test_shape_backend.py checks every
kernel's figure against tracemalloc around the real kernel.

Letters as in backends/base.py.
"""
from __future__ import annotations

import functools
import math
import re
import sys
from typing import Callable

import numpy as np

from .base import Backend, is_quantized
from .numpy_backend import GELU_C as _GELU_C, GELU_K as _GELU_K, NumpyBackend

# numpy reuses a temporary operand of a binary operation as its output when it owns
# at least this many bytes (NPY_MIN_ELIDE_BYTES in numpy/_core/src/multiarray/temp_elide.c).
ELIDE_MIN_BYTES = 256 * 1024
_JIT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------- the ledger
class MemoryLedger:
    """Live bytes of the ShapeArrays of one run, by buffer; the peak and what was
    alive then; and per label (set by the backend as kernels run) the largest
    total reached while it was current."""

    def __init__(self):
        self.live: dict[int, int] = {}  # buffer serial -> bytes
        self.bytes_now = 0
        self.bytes_peak = 0
        self.peak_live: dict[int, int] = {}
        self.peak_label = ""
        self.peak_notes: dict = {}  # what on_peak() returned at the peak
        self.on_peak: Callable[[], dict] | None = None
        self.label = ""
        self.moments: dict[str, int] = {}  # label -> largest bytes_now, in the order first seen
        self._serial = 0

    def allocate(self, nbytes: int) -> int:
        self._serial += 1
        self.live[self._serial] = nbytes
        self.bytes_now += nbytes
        if self.label and self.bytes_now > self.moments.get(self.label, 0):
            self.moments[self.label] = self.bytes_now
        if self.bytes_now > self.bytes_peak:
            self.bytes_peak = self.bytes_now
            self.peak_live = dict(self.live)
            self.peak_label = self.label
            self.peak_notes = self.on_peak() if self.on_peak else {}
        return self._serial

    def release(self, serial: int) -> None:
        self.bytes_now -= self.live.pop(serial)

    def spike(self, nbytes: int) -> None:
        """Work arrays a kernel holds for a moment: allocated and freed at once."""
        if nbytes > 0:
            self.release(self.allocate(int(nbytes)))

    def set_label(self, label: str) -> None:
        self.label = label
        self.moments.setdefault(label, self.bytes_now)
        self.moments[label] = max(self.moments[label], self.bytes_now)

    def reset(self) -> None:
        """Forget the peak and the moments (what is alive stays counted)."""
        self.bytes_peak = self.bytes_now
        self.peak_live = dict(self.live)
        self.peak_label = self.label = ""
        self.peak_notes = {}
        self.moments = {}


# ---------------------------------------------------------------- arrays
def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _nocopy_strides(shape: tuple, strides: tuple, new_shape: tuple) -> tuple | None:
    """Strides of `new_shape` viewing the same elements, or None when only a copy
    can (numpy's _attempt_nocopy_reshape, numpy/_core/src/multiarray/shape.c)."""
    old = [(n, s) for n, s in zip(shape, strides) if n != 1]
    out = [0] * len(new_shape)
    oi = oj = ni = nj = 0
    oj, nj = 1, 1
    while ni < len(new_shape) and oi < len(old):
        np_, op = new_shape[ni], old[oi][0]
        while np_ != op:
            if np_ < op:
                np_ *= new_shape[nj]
                nj += 1
            else:
                op *= old[oj][0]
                oj += 1
        for ok in range(oi, oj - 1):  # the old axes merged here must be contiguous
            if old[ok][1] != old[ok + 1][0] * old[ok + 1][1]:
                return None
        out[nj - 1] = old[oj - 1][1]
        for nk in range(nj - 1, ni, -1):
            out[nk - 1] = out[nk] * new_shape[nk]
        ni, nj, oi, oj = nj, nj + 1, oj, oj + 1
    last = out[ni - 1] if ni >= 1 else 1
    for nk in range(ni, len(new_shape)):
        out[nk] = last
    return tuple(out)




def _casts_into(other, temporary: "ShapeArray") -> bool:
    """numpy elides into `temporary` only when the other operand is an array of its
    shape or a scalar whose dtype casts to its dtype safely (a Python float is a
    float64 there, so it never elides into a float32 temporary)."""
    if isinstance(other, ShapeArray):
        return other.shape == temporary.shape and np.can_cast(other.dtype, temporary.dtype, "safe")
    return np.can_cast(np.asarray(other).dtype, temporary.dtype, "safe")


class ShapeArray:
    """An array's shape, dtype and memory layout, without values. A view (base is
    not None) shares its base's buffer and keeps it alive; only a base is counted
    in the ledger. `tag` names the parameter an array is (or was computed from),
    so the backend can tell which block and projection a kernel is working on."""

    __slots__ = ("shape", "dtype", "strides", "offset", "base", "ledger", "serial", "tag", "elide")
    __array_ufunc__ = None  # numpy operators defer to ours: np.float32(2) * a is a ShapeArray

    def __init__(self, shape, dtype, ledger: MemoryLedger, *, base: "ShapeArray | None" = None,
                 strides: tuple | None = None, offset: int = 0, tag: str | None = None, elide: bool = True):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.strides = strides if strides is not None else _c_strides(self.shape, self.dtype.itemsize)
        self.offset = offset
        self.base = base
        self.ledger = ledger
        self.tag = tag
        self.elide = elide
        self.serial = ledger.allocate(self.nbytes) if base is None else base.serial

    def __del__(self):
        """CPython calls this the moment the last reference goes: a buffer is freed
        with its last view (a view holds its base), as numpy's is."""
        if self.base is None and self.ledger is not None:
            self.ledger.release(self.serial)

    # ---------------------------------------------------------------- what numpy and torch both have
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShapeArray({self.shape}, {self.dtype}{', view' if self.base is not None else ''})"

    @property
    def contiguous(self) -> bool:
        return all(n == 1 or s == c for n, s, c in zip(self.shape, self.strides,
                                                       _c_strides(self.shape, self.itemsize)))

    # the store's buffer key (store._buffer_key reads these, as on a torch tensor)
    def data_ptr(self) -> int:
        return (self.serial << 40) + self.offset

    def element_size(self) -> int:
        return self.itemsize

    def numel(self) -> int:
        return self.size

    def _like(self, shape, dtype=None, tag=None) -> "ShapeArray":
        return ShapeArray(shape, dtype or self.dtype, self.ledger, tag=tag, elide=self.elide)

    def _view(self, shape, strides, offset) -> "ShapeArray":
        return ShapeArray(shape, self.dtype, self.ledger, base=self.base or self, strides=tuple(strides),
                          offset=offset, tag=self.tag, elide=self.elide)

    # ---------------------------------------------------------------- views and copies
    def copy(self) -> "ShapeArray":
        return self._like(self.shape)

    clone = copy

    def astype(self, dtype, copy: bool = True) -> "ShapeArray":
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return self._like(self.shape, dtype, self.tag)

    def reshape(self, *shape) -> "ShapeArray":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in shape:
            known = math.prod(n for n in shape if n != -1)
            shape = tuple(self.size // known if n == -1 else n for n in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} into {shape}")
        strides = _nocopy_strides(self.shape, self.strides, shape)
        if strides is None:  # numpy copies silently
            return self._like(shape)
        return self._view(shape, strides, self.offset)

    def transpose(self, *axes) -> "ShapeArray":
        axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        axes = axes or tuple(reversed(range(self.ndim)))
        return self._view([self.shape[a] for a in axes], [self.strides[a] for a in axes], self.offset)

    @property
    def T(self) -> "ShapeArray":
        return self.transpose()

    def __getitem__(self, key) -> "ShapeArray":
        key = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, (ShapeArray, np.ndarray, list)) for k in key):
            return self._gather(key)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            filled = self.ndim - sum(k is not None and k is not Ellipsis for k in key)
            key = key[:i] + (slice(None),) * filled + key[i + 1:]
        key = key + (slice(None),) * (self.ndim - sum(k is not None for k in key))
        shape, strides, offset, axis = [], [], self.offset, 0
        for k in key:
            if k is None:
                shape.append(1)
                strides.append(0)
                continue
            if isinstance(k, slice):
                start, stop, step = k.indices(self.shape[axis])
                shape.append(len(range(start, stop, step)))
                strides.append(self.strides[axis] * step)
            else:
                start = int(k) + (self.shape[axis] if int(k) < 0 else 0)
            offset += start * self.strides[axis]
            axis += 1
        return self._view(shape, strides, offset)

    def _gather(self, key: tuple) -> "ShapeArray":
        """Integer-array indexing of the first axis (a copy)."""
        index = key[0]
        rest = self[(slice(None),) + tuple(key[1:])] if len(key) > 1 else self
        return self._like(tuple(np.shape(index) if not isinstance(index, ShapeArray) else index.shape)
                          + rest.shape[1:])

    def __setitem__(self, key, value) -> None:
        """Writing into a buffer allocates nothing."""

    # ---------------------------------------------------------------- arithmetic
    def _binary(self, other, refs_self: int, refs_other: int, commutative: bool, reflected: bool = False):
        """The result of an elementwise operation: a new buffer, or, as numpy does, a
        temporary array operand's own (temp_elide.c: the left operand, or for + and *
        the right one; never with a Python scalar on the left; only when the other
        operand is a scalar or has the same shape and casts safely, and the
        temporary owns at least ELIDE_MIN_BYTES)."""
        if isinstance(other, ShapeArray):
            shape = np.broadcast_shapes(self.shape, other.shape)
            dtype = np.result_type(self.dtype, other.dtype)
        elif isinstance(other, (int, float, np.generic)):
            shape, dtype = self.shape, np.result_type(self.dtype, other)
        else:
            return NotImplemented
        candidates = [] if reflected else [(self, refs_self, other)]
        if commutative and not reflected and isinstance(other, ShapeArray):
            candidates.append((other, refs_other, self))
        for operand, refs, rest in candidates:
            if (operand.elide and refs <= _TEMPORARY_REFS and operand.base is None
                    and operand.nbytes >= ELIDE_MIN_BYTES and operand.shape == shape and operand.dtype == dtype
                    and _casts_into(rest, operand)):
                return operand
        tag = self.tag if self.shape == shape else getattr(other, "tag", None)
        return self._like(shape, dtype, tag)

    def __add__(self, other):
        return self._binary(other, sys.getrefcount(self), sys.getrefcount(other), True)

    def __radd__(self, other):
        return self._binary(other, sys.getrefcount(self), 0, True, reflected=True)

    def __sub__(self, other):
        return self._binary(other, sys.getrefcount(self), sys.getrefcount(other), False)

    def __rsub__(self, other):
        return self._binary(other, sys.getrefcount(self), 0, False, reflected=True)

    def __mul__(self, other):
        return self._binary(other, sys.getrefcount(self), sys.getrefcount(other), True)

    def __rmul__(self, other):
        return self._binary(other, sys.getrefcount(self), 0, True, reflected=True)

    def __truediv__(self, other):
        return self._binary(other, sys.getrefcount(self), sys.getrefcount(other), False)

    def __rtruediv__(self, other):
        return self._binary(other, sys.getrefcount(self), 0, False, reflected=True)

    def __neg__(self):
        return self._binary(-1, sys.getrefcount(self), 0, True)

    def __pow__(self, other):
        """A new buffer: numpy reuses a temporary only for x ** 2 (its fast square),
        which the kernels counted here do not write."""
        return self._like(self.shape, np.result_type(self.dtype, other))

    def __matmul__(self, other):
        return self._like(self.shape[:-1] + other.shape[-1:], np.result_type(self.dtype, other.dtype))

    def _inplace(self, other):
        return self

    __iadd__ = __isub__ = __imul__ = __itruediv__ = _inplace


def _refcount_of_a_temporary() -> int:
    """sys.getrefcount(self) inside ShapeArray's operator methods when the operand is
    an expression's temporary (numpy elides exactly those); a named one has more.
    -1 when this interpreter cannot tell them apart (then nothing is elided)."""
    class Probe(ShapeArray):
        __slots__ = ()

        def _binary(self, other, refs_self, *rest, **options):
            return refs_self

    ledger = MemoryLedger()
    named = Probe((1,), np.float32, ledger)
    temporary, bound = Probe((1,), np.float32, ledger) + 0, named + 0
    return temporary if temporary < bound else -1


_TEMPORARY_REFS = _refcount_of_a_temporary()


# ---------------------------------------------------------------- the backend
_STREAM_WORDS = {"attn_in": "q/k/v", "attn_out": "o projection", "mlp_in": "gate/up", "mlp_out": "down"}
_TAG_RE = re.compile(r"^blocks\.(\d+)\.(\w+?)(?:\.weight)?$")


def _moment(what: str | None, forward: bool = False, outside_blocks: bool = False):
    """Name the moment a kernel runs in: 'block 3 backward: SwiGLU' (see ShapeBackend.phase)."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            if outside_blocks:
                self._block = None
            self._enter(what, forward, args)
            return method(self, *args, **kwargs)
        return run
    return wrap


def _copies(*arrays) -> int:
    """Bytes of the contiguous copies np.ascontiguousarray makes of the arrays that
    are not contiguous (numba's attention and RoPE kernels compile for one layout)."""
    return sum(a.nbytes for a in arrays if not a.contiguous)


def _unary_result(argument: ShapeArray) -> ShapeArray:
    """A numpy function of one array (np.tanh) on an expression: its output, a new
    array, forms while the argument is alive; the argument, a temporary, goes when
    the caller's expression is done with it."""
    return argument._like(argument.shape)


def _jittable(*arrays) -> bool:
    """numba_backend._jittable: all float32 or all float64."""
    return arrays[0].dtype in _JIT_DTYPES and all(a.dtype == arrays[0].dtype for a in arrays)


class _ShapeOffload:
    """OffloadFile's stand-in on shapes: the reused read buffer, no file."""

    def __init__(self):
        self.buffer = None
        self.bytes_now = 0

    def free(self, spilled) -> None:
        self.bytes_now -= spilled.nbytes
        if self.bytes_now == 0:
            self.buffer = None  # OffloadFile drops its buffer with its last bytes


class ShapeBackend(Backend):
    """The Backend interface on ShapeArrays. `flavour` names the backend whose
    kernels' work arrays are counted ("numpy", "numba", "torch"); `threads`, the
    threads numba's kernels run (each keeps its own tile buffers); `phase`, set by
    the caller, names the step's phase in the moments ("forward", "backward", ...)."""

    name = "shape"
    UPCAST_BLOCK = NumpyBackend.UPCAST_BLOCK  # a float16 weight is upcast this many elements at a time

    def __init__(self, flavour: str = "numpy", threads: int = 1, ledger: MemoryLedger | None = None):
        if flavour not in ("numpy", "numba", "torch"):
            raise ValueError(f"unknown flavour {flavour!r}; choose numpy, numba or torch")
        self.flavour = flavour
        self.threads = threads
        self.ledger = ledger or MemoryLedger()
        self.phase = ""
        self._block: int | None = None
        self._what = ""

    # ---------------------------------------------------------------- moments
    def _enter(self, what: str | None, forward: bool, args) -> None:
        for a in args:
            match = _TAG_RE.match(a.tag) if isinstance(a, ShapeArray) and a.tag else None
            if match:
                self._block = int(match.group(1))
                what = what or _STREAM_WORDS.get(match.group(2))
            elif isinstance(a, ShapeArray) and a.tag:
                self._block = None  # the embedding, the final norm: outside the blocks
        self._what = what or self._what
        phase = "recompute" if forward and self.phase == "backward" else self.phase
        if phase.startswith("optimizer") or self._block is None:
            label = phase if phase.startswith("optimizer") else f"{phase}: {self._what}"
        else:
            label = f"block {self._block} {phase}: {self._what}"
        self.ledger.set_label(label)

    # ---------------------------------------------------------------- arrays
    def new(self, shape, dtype, tag: str | None = None) -> ShapeArray:
        """A fresh buffer (what np.empty would give)."""
        return ShapeArray(shape, self.dtype(dtype), self.ledger, tag=tag, elide=self.flavour != "torch")

    def _spike(self, nbytes: float) -> None:
        self.ledger.spike(int(nbytes))

    def asarray(self, x, dtype=None):
        if is_quantized(x):  # blocks on ShapeArrays (planner._shape_model)
            return x
        if isinstance(x, ShapeArray):
            return x if dtype is None else self.cast(x, self.dtype(dtype))
        x = np.asarray(x)
        return self.new(x.shape, x.dtype if dtype is None else dtype)

    def to_numpy(self, x):
        raise TypeError("a ShapeArray holds no values (the shape backend plans memory, it computes nothing)")

    def labelled_rows(self, targets, ignore_index):
        """Targets carry no values here: plan the worst case, every row labelled."""
        return None

    def zeros(self, shape, dtype):
        return self.new(shape, dtype)

    def zeros_like(self, x):
        return self.new(x.shape, x.dtype)

    def cast(self, x, dtype):
        dtype = self.dtype(dtype)
        return x if x.dtype == dtype else ShapeArray(x.shape, dtype, self.ledger, tag=x.tag, elide=x.elide)

    def dtype(self, name):
        return np.dtype(name)

    def concat(self, xs, axis):
        shape = list(xs[0].shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        return self.new(shape, np.result_type(*(x.dtype for x in xs)))

    def permute(self, x, axes):
        return self.new([x.shape[a] for a in axes], x.dtype)

    def sum(self, x, axis=None, keepdims=False):
        if axis is None:
            shape = (1,) * x.ndim if keepdims else ()
        else:
            axis %= x.ndim
            shape = tuple(1 if i == axis else n for i, n in enumerate(x.shape) if keepdims or i != axis)
        return self.new(shape, x.dtype)

    @_moment(None)
    def norm_sq(self, x):
        """numpy: x.ravel() copies a non-contiguous gradient (a LoRA A, a view of dA)."""
        if not x.contiguous:
            self._spike(x.nbytes)
        return 0.0

    def isfinite(self, x):
        return True

    def nbytes(self, x):
        return x.nbytes

    # ---------------------------------------------------------------- offloaded activations
    def open_offload(self, directory):
        """No file: the plan counts the bytes written (ActivationStore.disk_peak) and
        models the one read buffer that OffloadFile reuses."""
        return _ShapeOffload()

    def offload(self, x, file):
        from minilars.offload import Spilled

        file.bytes_now += x.nbytes
        return Spilled(0, x.shape, x.dtype)

    def reload(self, spilled, file, dtype):
        if file.buffer is None or file.buffer.nbytes < spilled.nbytes:
            file.buffer = None  # freed before the larger one is allocated, as np.empty's rebinding
            file.buffer = self.new((spilled.nbytes,), np.uint8)
        return self.new(spilled.shape, dtype)

    # ---------------------------------------------------------------- linear algebra
    def _upcast_rows(self, a, b, cols: int) -> int:
        """Rows of a float16 b that numpy_backend upcasts at once, 0 when b has a's dtype."""
        if b.dtype == a.dtype:
            return 0
        return max(1, self.UPCAST_BLOCK // max(1, cols))

    # ---------------------------------------------------------------- weights kept as GGUF blocks
    # A QuantizedWeight (minilars/quant.py) whose parts hold ShapeArrays of uint8: its
    # bytes are counted as the blocks are. A product holds, besides its output, the one
    # float32 tile buffer it refills (decoded_tiles) and, one after the other, what
    # gguf-py's decoder makes while it fills the tile (outside numba: 2.2-2.3 tiles on
    # every format, by tracemalloc) and the tile's product before it is added or copied
    # into the output.
    def _tile_work(self, rows: int, n: int, product: int) -> int:
        tile = rows * n * 4
        return tile + max(0 if self.flavour == "numba" else 23 * tile // 10, product)

    def _quantized_product(self, a, w, forward: bool, stored_t: bool):
        """x S^T (stored_t, out (N, m)) or x S (out (N, n)), one tile of S at a time."""
        from minilars.quant import TILE_ELEMENTS

        self._enter(None, forward, (a, w.parts[0].data))
        m, n = w.stored_shape
        rows = min(max(1, TILE_ELEMENTS // n), max(p.n_rows for p in w.parts))
        out = self.new((a.shape[0], m if stored_t else n), a.dtype)
        self._spike(self._tile_work(rows, n, a.shape[0] * (rows if stored_t else n) * a.itemsize))
        return out

    @_moment(None, forward=True)
    def matmul(self, a, b):
        """out (M, C). A float16 b (K, C): numpy_backend upcasts it whole when it
        fits UPCAST_BLOCK, else accumulates a[:, k-block] b[k-block] into a zeroed out."""
        if is_quantized(b):
            return self._quantized_product(a, b, True, b.transposed)
        s = a.itemsize
        rows = self._upcast_rows(a, b, b.shape[1])
        out_shape = a.shape[:-1] + (b.shape[1],)
        if rows and rows >= b.shape[0]:
            self._spike(b.size * s + math.prod(out_shape) * s)  # b upcast, then the product
        out = self.new(out_shape, a.dtype if rows else np.result_type(a.dtype, b.dtype))
        if rows and rows < b.shape[0]:
            self._spike(rows * b.shape[1] * s + math.prod(out_shape) * s)  # an upcast block, its product
        return out

    @_moment(None)
    def matmul_tn(self, a, b):
        return self.new((a.shape[1], b.shape[1]), np.result_type(a.dtype, b.dtype))

    @_moment(None)
    def matmul_nt(self, a, b):
        """out (M, C). A float16 b (C, K): out's columns block by block, each block
        of b upcast and its product formed before it is copied in."""
        if is_quantized(b):
            return self._quantized_product(a, b, False, not b.transposed)
        rows = self._upcast_rows(a, b, b.shape[1])
        out = self.new((a.shape[0], b.shape[0]), a.dtype if rows else np.result_type(a.dtype, b.dtype))
        if rows:
            rows = min(rows, b.shape[0])
            self._spike(rows * b.shape[1] * a.itemsize + a.shape[0] * rows * a.itemsize)
        return out

    @_moment("subspace basis")
    def orthonormal_range(self, x, rank, seed, oversample=8, power_iters=2):
        """Q (width, r): the whole rotation at rank >= width; else the top r of a
        sketch of rank + oversample columns, no more than x has rows. Work: the
        sketch products (N, sketch) and bases (width, sketch), two of each."""
        n, width = x.shape
        if rank >= width:
            return self.new((width, width), x.dtype)
        sketch = min(width, rank + oversample)
        self._spike(2 * (n + width) * sketch * x.itemsize)
        return self.new((width, min(rank, sketch, n)), x.dtype)

    # ---------------------------------------------------------------- ops
    @_moment("embedding", outside_blocks=True)
    def whiten_columns(self, x, basis):
        """z = x P (N, r) is made and dropped; the scaled basis is a new (width, r) array."""
        self.matmul(x, basis)
        return basis.copy()

    def embedding_forward(self, table, tokens):
        """A table kept as blocks: the rows of each part, decoded into a buffer
        (at most every token's) before they are copied into place."""
        if is_quantized(table):
            out = self.new((tokens.shape[0], table.shape[1]), np.float32)
            self._spike(self._tile_work(tokens.shape[0], table.shape[1], 0))
            return out
        return self.new((tokens.shape[0], table.shape[1]), table.dtype)

    @_moment("embedding", outside_blocks=True)
    def embedding_backward(self, dy, tokens, vocab_size):
        return self.new((vocab_size, dy.shape[1]), dy.dtype)

    @_moment("norm", forward=True)
    def rmsnorm_forward(self, x, w, eps):
        """y (N, d), rstd (N, 1). numpy: x*rstd (N, d) is alive while y = (x*rstd)*w
        forms (w broadcasts, so numpy cannot reuse the temporary)."""
        y, rstd = self.new(x.shape, x.dtype), self.new((x.shape[0], 1), x.dtype)
        if not (self.flavour == "numba" and _jittable(x)):
            self._spike(x.nbytes)
        return y, rstd

    @_moment("norm")
    def rmsnorm_backward(self, dy, x, w, rstd):
        """dx (N, d), dw (d,). numpy: x_hat, g = dy*w and g - x_hat*mean(g*x_hat) (N, d)
        alive while rstd * (...) forms dx (rstd broadcasts: no temporary is reused);
        numba: per-64-row partial sums of dw in float64."""
        n, d = x.shape
        dx = self.new(x.shape, x.dtype)
        if self.flavour == "numba" and _jittable(dy, x, rstd):
            self._spike((-(-n // 64) + 1) * d * 8)
        else:
            self._spike(3 * x.nbytes)
        return dx, self.new((d,), x.dtype)

    def _rope(self, x, cos, negate: bool):
        """y like x. numpy: the table halves cast to x's dtype and the two products of
        one half (B, T, heads, hd/2) at once; rope_backward first negates sin (float64).
        numba: the table halves, contiguous, in x's dtype (x read in place)."""
        y = self.new(x.shape, x.dtype)
        tables = 2 * cos.shape[0] * (x.shape[-1] // 2) * x.itemsize
        if self.flavour == "numba" and _jittable(x):
            self._spike(tables)
        else:
            self._spike(tables + x.nbytes + (cos.nbytes if negate else 0))
        return y

    @_moment("RoPE", forward=True)
    def rope_forward(self, x, cos, sin):
        return self._rope(x, cos, negate=False)

    @_moment("RoPE")
    def rope_backward(self, dy, cos, sin):
        return self._rope(dy, cos, negate=True)

    @_moment("attention kernel", forward=True)
    def attention_forward(self, q, k, v, tile, q_offset=0, window=None, scale=None):
        """o (B, T, H, hd), lse (B, T, H). numpy: keys and values as contiguous copies
        (B*Hkv, T, hd); at exp(s - m) the scores s, s - m, the new and the previous p
        (B*H, tile, tile), with the query tile and acc (tile, H*hd). numba: per thread
        the stacked query rows, acc, P V (g*tile, hd), a K and a V tile and S (g*tile, tile).
        A window or a scale changes what is computed, not what is held (numpy's
        (tile, tile) boolean mask and (B*H, tile) shift are below the planner's grain)."""
        b, t, heads, hd = q.shape
        n_kv = k.shape[2]
        tile = min(tile, max(t, k.shape[1]))
        s = q.itemsize
        o, lse = self.new(q.shape, q.dtype), self.new(q.shape[:3], q.dtype)
        if self.flavour == "numba" and _jittable(q, k, v):
            group_rows = (heads // n_kv) * tile
            threads = min(self.threads, b * n_kv * -(-t // tile))
            self._spike(_copies(q, k, v) + threads * (3 * group_rows * hd + 2 * tile * hd + group_rows * tile) * s)
        else:
            self._spike((2 * k.size + 4 * b * heads * tile * tile + 2 * b * tile * heads * hd) * s)
        return o, lse

    @_moment("attention")
    def attention_backward(self, do, q, k, v, o, lse, tile, window=None, scale=None):
        """dq (B, T, H, hd), dk, dv (B, T, Hkv, hd). numpy, inside the tile loop: keys,
        values, dkeys, dvalues (B*Hkv, T, hd), delta (B, T, H), five score tiles (the
        previous pair's p and dS are still bound while the next s and exp(s - lse)
        form) and the (tile, H*hd) rows of q, do, dq; after it, dk and dv copied out
        while the loop's arrays are still alive. numba: per query head dk, dv when
        heads are grouped; per thread D (T,), two (tile, tile) and eight (tile, hd).
        The same with a window or a scale."""
        b, t, heads, hd = q.shape
        n_kv = k.shape[2]
        tile = min(tile, t)
        s = q.itemsize
        if self.flavour == "numba" and _jittable(do, q, k, v, o, lse):
            dq, dk, dv = self.new(q.shape, q.dtype), self.new(k.shape, q.dtype), self.new(k.shape, q.dtype)
            threads = min(self.threads, b * heads)
            grouped = 2 * q.size if n_kv != heads else 0
            per_thread = t + 2 * tile * tile + 8 * tile * hd
            self._spike(_copies(do, q, k, v, o, lse) + (grouped + threads * per_thread) * s)
            return dq, dk, dv
        dq = self.new(q.shape, q.dtype)
        loop_arrays = (4 * k.size + lse.size) * s
        self._spike(loop_arrays + (5 * b * heads * tile * tile + 3 * b * tile * heads * hd) * s)
        dk, dv = self.new(k.shape, q.dtype), self.new(k.shape, q.dtype)
        self._spike(loop_arrays)
        return dq, dk, dv

    @_moment("SwiGLU", forward=True)
    def swiglu_forward_fused(self, gate_up):
        """h (N, f). numpy: -g and exp(-g) (N, f) alive before h forms."""
        h = self.new((gate_up.shape[0], gate_up.shape[1] // 2), gate_up.dtype)
        if not (self.flavour == "numba" and _jittable(gate_up) and gate_up.contiguous):
            self._spike(h.nbytes)
        return h

    @_moment("SwiGLU")
    def swiglu_backward_fused(self, dh, gate_up):
        """d(gate_up) (N, 2f). numpy: sig, silu and three (N, f) temporaries of d(gate)
        (a Python float operand never lets numpy reuse a float32 temporary), then
        d(gate), d(up) and their concatenation."""
        n, f = dh.shape
        if not (self.flavour == "numba" and _jittable(dh, gate_up) and gate_up.contiguous):
            self._spike(5 * n * f * dh.itemsize)
            out = self.new(gate_up.shape, gate_up.dtype)
            self._spike(2 * n * f * dh.itemsize)
            return out
        return self.new(gate_up.shape, gate_up.dtype)

    @staticmethod
    def _tanh_gelu_of(g):
        """np.tanh(c (g + 0.044715 g^3)) as numpy_backend forms it: its temporaries, then
        np.tanh's output."""
        return _unary_result(_GELU_C * (g + _GELU_K * g ** 3))

    @_moment("GeGLU", forward=True)
    def geglu_forward_fused(self, gate_up):
        """h (N, f). numba: h alone. numpy: numpy_backend's expression run on these
        arrays (its temporaries and numpy's reuse of them are ShapeArray's): g^3, the
        tanh's argument and t, then 0.5 g and 1 + t beside t as h forms."""
        n, f = gate_up.shape[0], gate_up.shape[1] // 2
        if self.flavour == "numba" and _jittable(gate_up) and gate_up.contiguous:
            return self.new((n, f), gate_up.dtype)
        g, u = gate_up[:, :f], gate_up[:, f:]
        t = self._tanh_gelu_of(g)
        return 0.5 * g * (1.0 + t) * u

    @_moment("GeGLU")
    def geglu_backward_fused(self, dh, gate_up):
        """d(gate_up) (N, 2f). numba: the output alone. numpy: numpy_backend's
        expression run on these arrays: t, gelu and gelu' (N, f) and their
        temporaries, then [dg | du] written into a new (N, 2f)."""
        if self.flavour == "numba" and _jittable(dh, gate_up) and gate_up.contiguous:
            return self.new(gate_up.shape, gate_up.dtype)
        f = dh.shape[1]
        g, u = gate_up[:, :f], gate_up[:, f:]
        t = self._tanh_gelu_of(g)
        gelu = 0.5 * g * (1.0 + t)
        dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_K * g * g)
        dgate_up = self.new(gate_up.shape, gate_up.dtype)
        dgate_up[:, :f] = dh * u * dgelu
        dgate_up[:, f:] = dh * gelu
        return dgate_up

    @_moment("soft cap", outside_blocks=True)
    def softcap(self, x, cap):
        """cap tanh(x / cap), like x. numba (contiguous float32/float64): the output
        alone. numpy: x / cap, then np.tanh's output beside it, then the product."""
        if self.flavour == "numba" and _jittable(x) and x.contiguous:
            return self.new(x.shape, x.dtype)
        return cap * _unary_result(x / cap)

    def swiglu_forward(self, g, u):
        return self.swiglu_forward_fused(self.new((g.shape[0], 2 * g.shape[1]), g.dtype))

    def swiglu_backward(self, dh, g, u):
        out = self.swiglu_backward_fused(dh, self.new((g.shape[0], 2 * g.shape[1]), g.dtype))
        return out[:, :g.shape[1]], out[:, g.shape[1]:]

    @_moment("loss and head gradient", outside_blocks=True)
    def cross_entropy_head(self, x, head, targets, chunk, ignore_index, need_dx, need_dhead, softcap=None):
        """dx (N, d), dhead (V, d) as asked. numpy: the next chunk's logits (c, V) form
        while the previous are still bound (with a float16 head, matmul_nt's upcast
        block and its product meanwhile); dhead += z^T x_c forms a (V, d) product.
        With a soft cap, tanh(z / cap) (c, V) stays bound beside z across the loop, and
        np.tanh's argument, cap * tanh and 1 - tanh^2 are (c, V) temporaries: four
        (c, V) at once. numba: one preallocated logits block, the head cast once, a
        (V, d) chunk dhead; the soft cap is applied in place in that block."""
        n, d = x.shape
        if is_quantized(head):
            return self._quantized_loss(x, head, need_dx)
        vocab = head.shape[0]
        s = x.itemsize
        chunk = max(1, min(chunk, n))
        dx = self.new(x.shape, x.dtype) if need_dx else None
        dhead = self.new(head.shape, x.dtype) if need_dhead else None
        logits = chunk * vocab * s
        dhead_work = vocab * d * s if need_dhead else 0
        if self.flavour == "numba" and _jittable(x):
            self._spike(logits + chunk * 8 + (head.size * s if head.dtype != x.dtype else 0) + dhead_work)
            return 0.0, n, dx, dhead
        bound = 1 if softcap is None else 2  # (c, V) arrays bound from one chunk to the next
        forming = (bound + 1 if n > chunk else 1) * logits
        rows = self._upcast_rows(x, head, d)
        if rows:
            rows = min(rows, vocab)
            forming += rows * d * s + chunk * rows * s
        work = [forming, bound * logits + chunk * d * s, bound * logits + dhead_work]
        if softcap is not None:  # np.tanh(z / cap) forming; 1 - capped^2 forming for the gradient
            work += [(4 if n > chunk else 3) * logits, 4 * logits if need_dx or need_dhead else 0]
        self._spike(max(work))
        return 0.0, n, dx, dhead

    def _quantized_loss(self, x, head, need_dx):
        """minilars.quant.cross_entropy_head: dx (N, d) is its running sum a; besides it
        E[t] (N, d), the tile buffer of E's rows, and then either the decoder's work or
        a tile's logits (N, tile) with the product p E (N, d); the running statistics
        m, s, z_t and the rescaling c are (N,) float64."""
        from minilars.quant import LOSS_TILE_ELEMENTS

        n, d = x.shape
        rows = min(max(1, LOSS_TILE_ELEMENTS // max(n, 1)), head.stored_shape[0])
        dx = self.new(x.shape, x.dtype) if need_dx else None
        product = n * rows * x.itemsize + (x.nbytes if need_dx else 0)
        self._spike(self._tile_work(rows, d, product) + 4 * n * 8 + (x.nbytes if need_dx else 0))
        return 0.0, n, dx, None

    @_moment("optimizer step")
    def adamw_update(self, p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
        """In place. numpy: sqrt(v) / sqrt(1 - b2^t) is float64 (np.sqrt of a Python
        float is a float64 scalar, which promotes under NEP 50), so denom and
        m / denom are two float64 arrays of p's size; numba updates in place when
        every array is contiguous float32/float64 (not a view such as LoRA's dA slices)."""
        arrays = (p, g, m, v)
        if (self.flavour == "numba" and _jittable(p) and all(a.contiguous and a.dtype in _JIT_DTYPES
                                                             for a in arrays)):
            return
        self._spike(2 * p.size * 8)

    def scale_(self, x, s):
        pass


__all__ = ["ELIDE_MIN_BYTES", "MemoryLedger", "ShapeArray", "ShapeBackend"]
