"""Memory planner: a training step's peak memory, predicted from the engine's own memory model.

`plan_memory(cfg, method, seq_len, batch_size, weight_dtype, backend_name)` walks one
training step (forward, loss, backward, AdamW) the way minilars/model.py runs it and
adds up what is alive at each moment:

    baseline          Python + numpy + the backend's libraries + the tokenizer (measured)
    weights           every parameter (frozen or trained in place), LARS bases, RoPE tables
    trainable         adapter parameters (LoRA A/B, IA3 scales, LARS M); 0 for full
    optimizer         AdamW m and v: 2 x the trainable parameters
    gradients         the gradients formed so far at that moment
    activation_store  what the ActivationStore holds at that moment
    transient         work arrays alive at that moment that the store does not count:
                      gradients flowing back, a taken cache being consumed, the
                      (chunk, V) logits block, attention tiles, float16 upcast blocks

The store part is exact: a simulated store replays model.py's keep/take sequence
field by field with the same policies (exact, half, subspace, recompute) and the same
buffer sharing as minilars/store.py, so `MemoryPlan.store_peak` equals the real
store's `bytes_peak` (tests/test_planner.py checks it byte for byte on the tiny
preset). The transient part lists, per moment, which arrays of the code are alive
(the comments below name them); it is checked against tracemalloc in the tests and
against peak RSS in `minilars bench memory` (docs/memory.md).

Letters: B batch, T tokens, N = B*T, d hidden, f MLP width, q = H*hd query width,
k = Hkv*hd key/value width, H heads, hd head dim, V vocabulary, r rank, c loss chunk.
"""
from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig
from .methods import LARS_DEFAULT_STORAGE, MethodConfig
from .store import Half, StoragePlan, Subspace
from .weights import STREAMS, expected_shapes, stream_inputs, stream_outputs

MIB = 2**20

# Resident memory of a process that has imported minilars and its backend, before any
# weight is loaded, and what the tokenizer adds. Measured on the reference machine
# (x86-64, Python 3.11.7, numpy 2.4, glibc, MALLOC_ARENA_MAX=2) with
# `python -m minilars.bench.memory_worker --baseline --backend NAME`: numpy 27.8 MiB,
# numba 174 MiB (LLVM and the jitted kernels loaded from numba's on-disk cache), torch
# 219 MiB (libtorch); SmolLM2's 49,152-token BPE tokenizer (rebuilt from the GGUF)
# 34-40 MiB, which the planner scales with the vocabulary.
RUNTIME_BASELINE = {"numpy": 28 * MIB, "numba": 174 * MIB, "torch": 219 * MIB}
TOKENIZER_BYTES_PER_TOKEN = 37 * MIB // 49152

# numpy's array allocator: the engine's float16 weights are upcast in blocks of this
# many elements (backends/numpy_backend.py, NumpyBackend.UPCAST_BLOCK).
UPCAST_BLOCK = 1 << 22
NUMBA_THREADS = None  # None: numba's default (one per core); the attention backward kernel keeps per-thread rows


# ---------------------------------------------------------------- sizes
from .units import format_size, parse_size  # noqa: E402  (the one size parser; re-exported)


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak memory of one training step (bytes). The component fields
    describe the peak moment (`peak_phase`) and add up to `total`."""

    model: str
    method: str
    seq_len: int
    batch_size: int
    weight_dtype: str
    backend: str
    baseline: int  # Python + libraries + tokenizer (RUNTIME_BASELINE)
    weights: int  # parameters as stored, LARS bases, RoPE tables
    trainable: int  # adapter parameters (0 for full: they are the weights)
    optimizer: int  # AdamW m and v
    gradients: int  # gradients alive at the peak moment
    activation_store: int  # ActivationStore bytes at the peak moment
    transient: int  # work arrays alive at the peak moment
    total: int
    peak_phase: str  # the moment the total is reached, e.g. "block 29 backward: SwiGLU"
    store_peak: int  # the store's own peak (ActivationStore.bytes_peak), at whatever moment
    store_peak_by_kind: dict = field(default_factory=dict)  # as ActivationStore.peak_by_kind()
    n_trainable: int = 0
    phases: tuple = ()  # (moment, total bytes) for every moment modelled, in step order

    @property
    def persistent(self) -> int:
        """What a step does not free: baseline, weights, adapters, optimizer state."""
        return self.baseline + self.weights + self.trainable + self.optimizer

    def rows(self) -> list[tuple[str, int]]:
        return [("runtime baseline (Python, numpy, backend, tokenizer)", self.baseline),
                ("weights (+ LARS bases, RoPE tables)", self.weights),
                (f"trainable parameters ({self.n_trainable:,})", self.trainable),
                ("AdamW state (m, v)", self.optimizer),
                ("gradients alive at the peak", self.gradients),
                ("activation store at the peak", self.activation_store),
                ("transient work at the peak", self.transient),
                ("total", self.total)]

    def describe(self) -> str:
        lines = [f"{self.model}, {self.method}, T={self.seq_len}, batch {self.batch_size}, "
                 f"{self.weight_dtype} weights, {self.backend} backend",
                 f"peak at: {self.peak_phase}"]
        width = max(len(name) for name, _ in self.rows())
        for name, value in self.rows():
            lines.append(f"  {name.ljust(width)}  {format_size(value):>12}")
        lines.append(f"  {'activation store peak (its own)'.ljust(width)}  {format_size(self.store_peak):>12}")
        return "\n".join(lines)


# ---------------------------------------------------------------- what each cache holds
@dataclass(frozen=True)
class _Field:
    name: str
    shape: tuple  # the array's shape
    dtype: np.dtype
    alias: str | None = None  # arrays with one alias in a block are one buffer (attn.o, attn_out.x)


def _targets_by_stream(method: MethodConfig) -> dict[str, list[str]]:
    """Projections an adapter method trains on each stream, in column order."""
    targets = method.resolved_targets
    return {stream: [p for p, _ in projs if p in targets] for stream, projs in STREAMS.items()}


def _lars_rank(method: MethodConfig, d_in: int) -> int:
    """Columns of a LARS basis: calibrate() asks for `rank` directions; at rank >= d_in
    the range finder returns a whole (d_in, d_in) rotation. (Assumes the calibration
    batch has at least `rank` tokens, as the default 512 do.)"""
    return min(method.rank, d_in)


def _site_fields(cfg: ModelConfig, method: MethodConfig, stream: str, n: int, dt) -> list[_Field]:
    """The cache a stream's site keeps (minilars/sites.py, minilars/adapters.py)."""
    d_in = stream_inputs(cfg)[stream]
    alias = "o" if stream == "attn_out" else None  # the attention output, reshaped (N, H*hd)
    if method.name == "full":  # FullSite: LinearCache(x)
        return [_Field("x", (n, d_in), dt, alias)]
    mine = _targets_by_stream(method)[stream]
    if method.name == "frozen" or not mine:  # FrozenSite keeps nothing
        return []
    if method.name == "lora":  # LoRACache(x, xa)
        return [_Field("x", (n, d_in), dt, alias), _Field("xa", (n, method.rank * len(mine)), dt)]
    if method.name == "ia3":
        if stream == "mlp_out":  # IA3InputCache(x): the scaled input
            return [_Field("x", (n, d_in), dt)]
        widths = stream_outputs(cfg)[stream]
        return [_Field("y0", (n, sum(widths[s] for s in mine)), dt)]  # IA3OutputCache: a concat
    return [_Field("z", (n, _lars_rank(method, d_in)), dt)]  # LARSCache(z)


def _block_caches(cfg: ModelConfig, method: MethodConfig, b: int, t: int, dt) -> list[tuple[str, list[_Field]]]:
    """Every cache one block keeps, in the order _block_forward keeps them."""
    n = b * t
    out = [("attn_norm", [_Field("x", (n, cfg.dim), dt), _Field("rstd", (n, 1), dt)]),
           ("attn_in", _site_fields(cfg, method, "attn_in", n, dt)),
           ("attn", [_Field("q", (b, t, cfg.n_heads, cfg.head_dim), dt),
                     _Field("k", (b, t, cfg.n_kv_heads, cfg.head_dim), dt),
                     _Field("v", (b, t, cfg.n_kv_heads, cfg.head_dim), dt),
                     _Field("o", (b, t, cfg.n_heads, cfg.head_dim), dt, "o"),
                     _Field("lse", (b, t, cfg.n_heads), dt)]),
           ("attn_out", _site_fields(cfg, method, "attn_out", n, dt)),
           ("mlp_norm", [_Field("x", (n, cfg.dim), dt), _Field("rstd", (n, 1), dt)]),
           ("mlp_in", _site_fields(cfg, method, "mlp_in", n, dt)),
           ("mlp", [_Field("gate_up", (n, 2 * cfg.ffn_dim), dt)]),
           ("mlp_out", _site_fields(cfg, method, "mlp_out", n, dt))]
    return [(site, fields) for site, fields in out if fields]


# ---------------------------------------------------------------- the simulated store
class _SimStore:
    """minilars/store.py's accounting without the arrays: keep(site, fields) and
    take(site) move the same byte counts, with the same policies and buffer sharing."""

    def __init__(self, plan: StoragePlan, n_tokens: int):
        self.plan = plan
        self.n_tokens = n_tokens
        self.caches: dict[str, list[tuple]] = {}
        self.buffers: dict[tuple, list] = {}  # key -> [nbytes, refcount, full_key]
        self.bytes_now = self.bytes_peak = 0
        self.site_now: dict[str, int] = {}
        self.site_peak: dict[str, int] = {}
        self.shared_basis_bytes = 0  # calibrated storage bases, held by the model, not the store
        self._serial = 0

    def _hold(self, key: tuple, nbytes: int, full_key: str) -> tuple:
        entry = self.buffers.get(key)
        if entry is not None:
            entry[1] += 1
            return key
        self.buffers[key] = [nbytes, 1, full_key]
        self.bytes_now += nbytes
        self.site_now[full_key] = self.site_now.get(full_key, 0) + nbytes
        self.site_peak[full_key] = max(self.site_peak.get(full_key, 0), self.site_now[full_key])
        self.bytes_peak = max(self.bytes_peak, self.bytes_now)
        return key

    def _release(self, key: tuple) -> None:
        entry = self.buffers[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes_now -= entry[0]
            self.site_now[entry[2]] -= entry[0]
            del self.buffers[key]

    def _unique(self) -> tuple:
        self._serial += 1
        return ("unique", self._serial)

    def keep(self, site: str, fields: list[_Field]) -> None:
        kind = re.sub(r"^blocks\.\d+\.", "", site)
        block = site.split(".")[1] if site.startswith("blocks.") else ""
        held = []
        for f in fields:
            full_key = f"{site}.{f.name}"
            policy = self.plan.policy_for(f"{kind}.{f.name}")
            size = math.prod(f.shape)
            if isinstance(policy, Half) and f.dtype != np.float16:  # a float16 copy
                held.append(self._hold(self._unique(), 2 * size, full_key))
                continue
            if (isinstance(policy, Subspace) and len(f.shape) >= 2 and self.n_tokens
                    and size % self.n_tokens == 0 and size // self.n_tokens > 1):
                width = size // self.n_tokens
                # orthonormal_range: the whole rotation at rank >= width; otherwise the
                # top `rank` of a sketch, no more columns than the matrix has rows.
                rank = width if policy.rank >= width else min(policy.rank, self.n_tokens)
                held.append(self._hold(self._unique(), self.n_tokens * rank * f.dtype.itemsize, full_key))
                if policy.source == "batch":
                    held.append(self._hold(self._unique(), width * rank * f.dtype.itemsize, full_key))
                else:
                    self.shared_basis_bytes += width * min(policy.rank, width) * f.dtype.itemsize
                continue
            key = ("alias", block, f.alias) if f.alias else self._unique()
            held.append(self._hold(key, size * f.dtype.itemsize, full_key))
        self.caches[site] = held

    def take(self, site: str) -> None:
        for key in self.caches.pop(site):
            self._release(key)

    def __contains__(self, site: str) -> bool:
        return site in self.caches

    def exact(self, kind_field: str, dtype) -> bool:
        """Whether a field is held as the very array the code computed (so that array
        is counted by the store, not as transient work)."""
        policy = self.plan.policy_for(kind_field)
        return not (isinstance(policy, Subspace) or (isinstance(policy, Half) and dtype != np.float16))

    def peak_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for full_key, nbytes in self.site_peak.items():
            kind = re.sub(r"^blocks\.\d+\.", "", full_key.rsplit(".", 1)[0])
            out[kind] = out.get(kind, 0) + nbytes
        return out


# ---------------------------------------------------------------- the step, moment by moment
@dataclass
class _Moment:
    name: str
    store: int
    transient: int
    gradients: int


def _default_backend_name() -> str:
    """numba where it is installed (backends.default_backend_name without importing it)."""
    return "numba" if importlib.util.find_spec("numba") is not None else "numpy"


def _numba_threads() -> int:
    if NUMBA_THREADS:
        return NUMBA_THREADS
    import os

    return int(os.environ.get("NUMBA_NUM_THREADS", 0)) or os.cpu_count() or 1


def _param_bytes(cfg: ModelConfig, weight_dtype: str) -> tuple[int, dict[str, tuple]]:
    """Bytes of every parameter as load_pretrained keeps them (norm weights float32),
    and the shapes."""
    wb = np.dtype(weight_dtype).itemsize
    shapes = expected_shapes(cfg)
    total = sum(math.prod(s) * (4 if name.endswith("norm.weight") else wb) for name, s in shapes.items())
    return total, shapes


def _trainable_arrays(cfg: ModelConfig, method: MethodConfig) -> dict[str, list[int]]:
    """Element counts of the trainable arrays of one block, per stream (what
    Model.trainable() returns), and under "model" those outside the blocks."""
    shapes = expected_shapes(cfg)
    if method.name == "frozen":
        return {}
    if method.name == "full":  # every parameter
        out = {s: [math.prod(shapes[f"blocks.0.{s}.weight"])] for s in STREAMS}
        out["norms"] = [cfg.dim, cfg.dim]
        out["model"] = [math.prod(s) for name, s in shapes.items() if not name.startswith("blocks.")]
        return out
    ins, outs = stream_inputs(cfg), stream_outputs(cfg)
    out = {}
    for stream, mine in _targets_by_stream(method).items():
        if not mine:
            continue
        if method.name == "lora":  # A (d_in, r), B (r, d_out_s) per target
            out[stream] = [n for s in mine for n in (ins[stream] * method.rank, method.rank * outs[stream][s])]
        elif method.name == "ia3":  # one scale per output (k, v) or per input (down)
            out[stream] = [ins[stream]] if stream == "mlp_out" else [outs[stream][s] for s in mine]
        else:  # LARS M (r, d_out_s)
            out[stream] = [_lars_rank(method, ins[stream]) * outs[stream][s] for s in mine]
    return out


def plan_memory(cfg: ModelConfig, method: MethodConfig | str, seq_len: int, batch_size: int = 1,
                weight_dtype: str = "float32", backend_name: str | None = None, *,
                compute_dtype: str = "float32", loss_chunk: int = 256, attention_tile: int = 256,
                mlp_chunk: int = 512, inference: bool | None = None, model_name: str | None = None,
                tokenizer: bool | None = None) -> MemoryPlan:
    """Predicted peak memory of one training step of `method` at (batch_size, seq_len).
    method "frozen" (or inference=True) plans the no-grad forward (the inference floor).
    tokenizer: whether the process holds the model's tokenizer (default: yes, except
    for the random-weight `tiny` preset)."""
    if isinstance(method, str):
        method = MethodConfig.lars_default() if method == "lars" else MethodConfig(method)
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context ({cfg.max_seq_len})")
    backend = backend_name or _default_backend_name()
    if backend not in RUNTIME_BASELINE:
        raise ValueError(f"unknown backend {backend!r}; choose numpy, numba or torch")
    if weight_dtype not in ("float32", "float16"):
        raise ValueError(f"weight dtype must be float32 or float16, got {weight_dtype!r}")
    inference = method.name == "frozen" if inference is None else inference
    dt = np.dtype(compute_dtype)
    s = dt.itemsize
    b, t = batch_size, seq_len
    n = b * t
    d, f, q, k, heads, hd, vocab = (cfg.dim, cfg.ffn_dim, cfg.q_dim, cfg.kv_dim, cfg.n_heads, cfg.head_dim,
                                    cfg.vocab_size)
    f16_weights = weight_dtype == "float16" and compute_dtype != "float16"
    plan = StoragePlan.from_mapping(dict(method.storage)) if method.name == "lars" else StoragePlan()
    recompute = plan.recompute_blocks
    keeps_o = plan.keeps_attention_output  # recompute keeps each block's O and lse as well
    train_embeddings = method.name == "full"
    ins = stream_inputs(cfg)

    # ---- persistent: weights, adapters, optimizer state
    weights, shapes = _param_bytes(cfg, weight_dtype)
    rope_rows = max(t, min(cfg.max_seq_len, 4096))
    weights += 2 * rope_rows * hd * 8  # cos, sin (rows, hd) float64, Model._rope
    if method.name == "lars":
        weights += cfg.n_layers * sum(ins[st] * _lars_rank(method, ins[st]) * s
                                      for st, mine in _targets_by_stream(method).items() if mine)
    arrays = _trainable_arrays(cfg, method)
    n_train = sum(sum(v) * (1 if key == "model" else cfg.n_layers) for key, v in arrays.items())
    largest_train = max((n for v in arrays.values() for n in v), default=0)
    if method.name == "full":
        trainable_bytes, grad_item, opt_item = 0, s, np.dtype(weight_dtype).itemsize
        optimizer = 2 * sum(math.prod(sh) * (4 if nm.endswith("norm.weight") else opt_item)
                            for nm, sh in shapes.items())
    else:
        trainable_bytes, grad_item = n_train * s, s
        optimizer = 2 * trainable_bytes
    block_grad = {key: sum(v) * grad_item for key, v in arrays.items() if key != "model"}

    # ---- transient pieces (bytes), named after the arrays of the code they stand for
    upcast = 0  # the float16 -> compute block of the largest weight a matmul upcasts at once
    if f16_weights:
        upcast = max(min(math.prod(shapes[f"blocks.0.{st}.weight"]), UPCAST_BLOCK) * s for st in STREAMS)
    chunk = min(loss_chunk, n)
    tile = min(attention_tile, t)
    numba = backend == "numba"

    def site_backward(stream: str) -> int:
        """Per-token floats alive inside one site's backward besides its dy: the taken
        cache and the products that form dx (N, d_in)."""
        d_in = ins[stream]
        mine = _targets_by_stream(method)[stream] if method.name not in ("full", "frozen") else []
        extra = d_in if f16_weights else 0  # matmul_nt with a float16 W: out + one upcast product
        if method.name == "full":
            return d_in + d_in + extra  # cache x, dx = dy W^T
        if not mine:
            return d_in + extra  # dx = dy W^T
        if method.name == "lora":  # x, xa, dxa, then dy W^T + dxa A^T
            return d_in + 2 * method.rank * len(mine) + 2 * d_in
        if method.name == "ia3":
            if stream == "mlp_out":  # x, dxs = dy W^T, dxs * x (then dxs * l)
                return 3 * d_in + extra
            widths = stream_outputs(cfg)[stream]
            y0 = sum(widths[p] for p in mine)  # y0, dy.copy(), then dy W^T
            return y0 + sum(widths.values()) + max(max(widths[p] for p in mine), d_in + extra)
        return _lars_rank(method, d_in) + d_in  # z, then dx = dy W_eff^T (the block's sites are merged)

    def kept_input(stream: str) -> str | None:
        """The field under which a stream's site keeps its input array itself (FullSite,
        LoRA, IA3 scaling the down input), if it does."""
        if method.name == "full":
            return f"{stream}.x"
        trains = method.name != "frozen" and bool(_targets_by_stream(method)[stream])
        keeps_x = method.name == "lora" or (method.name == "ia3" and stream == "mlp_out")
        return f"{stream}.x" if trains and keeps_x else None

    def local(arrays: list, keep: bool, sim: _SimStore) -> int:
        """Floats of (field key or None, width) arrays that the store does not hold."""
        return sum(w for key, w in arrays if not (keep and key is not None and sim.exact(key, dt)))

    def attention_locals(keep: bool, sim: _SimStore) -> int:
        """Per-token floats at the end of Model._attention_half outside the store: x_in,
        h, qkv (v is a view of it), q, k (RoPE'd), o, a and x1 = x + a."""
        return local([("attn_norm.x", d), (kept_input("attn_in"), d), (None, q + 2 * k), ("attn.q", q),
                      ("attn.k", k), ("attn.o", q), (None, d), (None, d)], keep, sim)

    swiglu_work = f if numba else 2 * f  # numba writes m; numpy holds -g and exp(-g) before m forms

    def mlp_locals(keep: bool, sim: _SimStore) -> int:
        """Per-token floats of Model._mlp_half over all N rows outside the store, at its
        largest: x_in (the caller's), x1, h2, gate_up, then the SwiGLU's work or, at
        the end, m, down and the output."""
        before = [("attn_norm.x", d), ("mlp_norm.x", d), (kept_input("mlp_in"), d), ("mlp.gate_up", 2 * f)]
        return local(before, keep, sim) + max(swiglu_work, local([(kept_input("mlp_out"), f), (None, d), (None, d)],
                                                                 keep, sim))

    # With nothing kept (the no-grad forward, recompute's first pass) and N > mlp_chunk,
    # Model._mlp_chunked runs the MLP `rows` tokens at a time into a zeroed output.
    sliced = n > mlp_chunk
    rows = min(mlp_chunk, n)
    # h2, gate_up of one slice, then the SwiGLU's work or m, down and x + down
    mlp_slice_work = (d + 2 * f + max(swiglu_work, f + d + d)) * rows * s

    def attention_forward_work() -> int:
        """Bytes the attention forward kernel allocates besides o and lse."""
        group_rows = (heads // cfg.n_kv_heads) * tile
        if numba:  # per thread: the stacked query rows, acc, P V (rows, hd), K/V tiles, S (rows, tile)
            threads = min(_numba_threads(), b * cfg.n_kv_heads * -(-t // tile))
            return threads * (3 * group_rows * hd + 2 * tile * hd + group_rows * tile) * s
        # numpy: keys, values (contiguous copies); at exp(s - m): s, s - m, the new and the
        # previous p (B*H, tile, tile), with the query tile and acc (tile, q)
        return (2 * k * n + 4 * b * heads * tile * tile + 2 * b * tile * q) * s

    def attention_kernel_locals(keep: bool, sim: _SimStore) -> int:
        """Per-token floats alive outside the store while the attention forward kernel
        runs: x_in, h, qkv, q, k (RoPE'd), o, lse (kept only after the kernel returns)."""
        return local([("attn_norm.x", d), (kept_input("attn_in"), d), (None, q + 2 * k), (None, q), (None, k),
                      (None, q), (None, heads)], keep, sim)

    def attention_backward_work() -> tuple[int, int]:
        """(per-token floats, fixed bytes) the attention backward kernel allocates."""
        if numba:  # dq, per-query-head dk/dv when grouped, dk, dv; per thread: D (T,)
            grouped = cfg.n_kv_heads != heads  # and (tile, tile), (tile, hd) buffers
            threads = min(_numba_threads(), b * heads)
            work = (q + (2 * q if grouped else 0) + 2 * k) * n * s + threads * t * s
            return 0, work + threads * (2 * tile * tile + 8 * tile * hd) * s
        # numpy, inside the tile loop: keys, values (contiguous copies), delta, dq, dkeys,
        # dvalues; five (B*Hkv, g*tile, tile) score tiles (the previous pair's p and dS
        # are still bound while the next s and exp(s - lse) form) and the (tile, q) rows
        # of q, do, dq. After the loop: dk, dv copies instead of the tiles.
        in_loop = (q + 4 * k + heads) * n * s + 5 * b * heads * tile * tile * s + 3 * b * tile * q * s
        after = (q + 6 * k + heads) * n * s
        return 0, max(in_loop, after)

    def loss_work(need_dx: bool) -> int:
        """Fixed bytes of the chunked cross-entropy: logits (chunk, V)."""
        logits = chunk * vocab * s
        dhead = vocab * d * s if train_embeddings and not inference else 0
        if numba:  # one preallocated logits block; the head cast once; dhead and dhead_chunk
            return logits + (vocab * d * s if f16_weights else 0) + 2 * dhead
        # numpy: the next chunk's logits are formed while the previous one is still bound
        # to z (with float16 weights matmul_nt upcasts the head a block of rows at a time
        # meanwhile); with a trained head, dhead and one chunk's z^T x may outweigh that
        forming = (2 if n > chunk else 1) * logits
        if f16_weights:
            rows = min(max(1, UPCAST_BLOCK // d), vocab)
            forming += rows * d * s + chunk * rows * s
        return max(forming, logits + dhead) + dhead

    moments: list[_Moment] = []
    sim = _SimStore(plan, n)
    grads = 0

    # Model._merged_block: while a block runs, its LARS sites hold W_eff = W + P M (d_in, d_out)
    # in the compute dtype.
    merged = 0
    if method.name == "lars":
        merged = sum(math.prod(shapes[f"blocks.0.{stream}.weight"]) * s
                     for stream, mine in _targets_by_stream(method).items() if mine)

    def moment(name: str, per_token: float, fixed: int = 0) -> None:
        fixed += merged if name.startswith("block") else 0
        moments.append(_Moment(name, sim.bytes_now, int(per_token * n * s + fixed), grads))

    last = cfg.n_layers - 1
    if inference:
        # no store: one block's locals; the loss needs no dx.
        moment(f"block {last} forward (no grad): attention kernel", attention_kernel_locals(False, sim),
               attention_forward_work() + upcast)
        moment(f"block {last} forward (no grad): attention", attention_locals(False, sim), upcast)
        if sliced:  # x_in, x1, the output
            moment(f"block {last} forward (no grad): MLP slices", 3 * d, mlp_slice_work + upcast)
        else:
            moment(f"block {last} forward (no grad): MLP", mlp_locals(False, sim), upcast)
        moment("loss (no grad)", d + d, loss_work(False))
    else:
        # ---- forward
        if train_embeddings:
            sim.keep("embed", [_Field("tokens", (n,), np.dtype(np.int64))])
        caches = _block_caches(cfg, method, b, t, dt)
        attention_caches = [(site, fields) for site, fields in caches if not site.startswith("mlp")]
        kept_o = [fl for fl in dict(caches)["attn"] if fl.name in ("o", "lse")]  # model.AttentionOutput
        for i in range(cfg.n_layers):
            if recompute:
                sim.keep(f"blocks.{i}.input", [_Field("x", (n, d), dt)])
                if keeps_o and i < last:
                    sim.keep(f"blocks.{i}.attn", kept_o)
            elif i < last:
                for site, fields in caches:
                    sim.keep(f"blocks.{i}.{site}", fields)
        pre = f"blocks.{last}."
        if recompute:  # nothing kept but the input: the no-grad block, less x_in if the store holds it
            input_held = d if sim.exact("input.x", dt) else 0
            moment(f"block {last} forward: attention kernel", attention_kernel_locals(False, sim) - input_held,
                   attention_forward_work())
            o_held = 0
            if keeps_o:
                sim.keep(f"blocks.{last}.attn", kept_o)
                o_held = q if sim.exact("attn.o", dt) else 0
            moment(f"block {last} forward: attention", attention_locals(False, sim) - input_held - o_held, upcast)
            if sliced:
                moment(f"block {last} forward: MLP slices", 3 * d - input_held, mlp_slice_work + upcast)
            else:
                moment(f"block {last} forward: MLP", mlp_locals(False, sim) - input_held, upcast)
        else:  # the last block keeps its caches one by one, as _block_forward runs
            for site, fields in caches:
                if site == "attn":
                    moment(f"block {last} forward: attention kernel", attention_kernel_locals(True, sim),
                           attention_forward_work())
                sim.keep(pre + site, fields)
                if site == "attn_out" or (site == "attn" and "attn_out" not in dict(caches)):
                    moment(f"block {last} forward: attention", attention_locals(True, sim), upcast)
            moment(f"block {last} forward: MLP", mlp_locals(True, sim), upcast)
        sim.keep("final_norm", [_Field("x", (n, d), dt), _Field("rstd", (n, 1), dt)])
        last_x = 0 if sim.exact("final_norm.x", dt) else d
        # h (final-normed), dx being filled (it becomes the head cache), logits chunk
        moment("loss and head gradient", d + last_x + d, loss_work(True))
        head_fields = [_Field("dx", (n, d), dt)]
        if train_embeddings:
            head_fields.append(_Field("dhead", (vocab, d), dt))
        sim.keep("head", head_fields)
        sim.take("head")
        sim.take("final_norm")
        # ---- backward: Model.backward keeps dh (N, d) from the head alive to its end,
        # and for full the head gradient dhead (V, d).
        dhead = vocab * d * s if train_embeddings else 0
        slice_caches = _block_caches(cfg, method, 1, rows, dt)
        slice_caches = [(site, fields) for site, fields in slice_caches if site.startswith("mlp")]
        for i in reversed(range(cfg.n_layers)):
            pre = f"blocks.{i}."
            common = d + d  # the head's dh, this block's incoming dx
            if recompute:
                # Model._block_backward: the attention half rerun whole (its caches kept),
                # then the MLP half one slice of `rows` tokens at a time: forward (caches
                # kept) and backward, while x1 and (when sliced) the output stay alive.
                sim.take(pre + "input")
                if keeps_o:  # O and lse come from the store: no attention forward
                    sim.take(pre + "attn")
                for site, fields in attention_caches:
                    if site == "attn" and not keeps_o:
                        moment(f"block {i} recompute: attention kernel", common + attention_kernel_locals(True, sim),
                               attention_forward_work() + dhead)
                    sim.keep(pre + site, fields)
                moment(f"block {i} recompute: attention", common + attention_locals(True, sim), upcast + dhead)
                sim.n_tokens = rows
                for site, fields in slice_caches:
                    sim.keep(pre + site, fields)
                sim.n_tokens = n
                # x1 (the store holds it itself as mlp_norm.x when unsliced), the output
                per_token = common + (d if sliced or not sim.exact("mlp_norm.x", dt) else 0) + (d if sliced else 0)
                width = rows
            else:
                per_token, width = common, n

            def mlp_moment(what: str, floats: int) -> None:
                moment(f"block {i} backward: {what}", per_token, floats * width * s + upcast + dhead)

            if pre + "mlp_out" in sim:
                sim.take(pre + "mlp_out")
            mlp_moment("down", site_backward("mlp_out"))
            grads += block_grad.get("mlp_out", 0)
            sim.take(pre + "mlp")
            # dm (rows, f), gate_up taken (rows, 2f), then numba writes [d(gate) | d(up)]
            # (2f); numpy's expression for d(gate) holds sig, silu and three (rows, f)
            # temporaries before d(gate), d(up) are concatenated (5f)
            mlp_moment("SwiGLU", f + 2 * f + (2 * f if numba else 5 * f))
            if pre + "mlp_in" in sim:
                sim.take(pre + "mlp_in")
            mlp_moment("gate/up", 2 * f + site_backward("mlp_in"))  # dgate_up, the site's work
            grads += block_grad.get("mlp_in", 0)
            sim.take(pre + "mlp_norm")
            grads += block_grad.get("norms", 0) // 2
            if pre + "attn_out" in sim:
                sim.take(pre + "attn_out")
            grads += block_grad.get("attn_out", 0)
            sim.take(pre + "attn")
            work, fixed = attention_backward_work()
            # dx, do (N, q), the taken attention cache (q, k, v, o, lse)
            moment(f"block {i} backward: attention", common + q + (2 * q + 2 * k + heads) + work,
                   fixed + dhead)
            if pre + "attn_in" in sim:
                sim.take(pre + "attn_in")
            # RoPE'd dq, dk, dv and their concat dqkv (N, q + 2k); then dqkv and the site's work
            moment(f"block {i} backward: q/k/v", common + max(2 * (q + 2 * k), (q + 2 * k) + site_backward("attn_in")),
                   upcast + dhead)
            grads += block_grad.get("attn_in", 0)
            sim.take(pre + "attn_norm")
            grads += block_grad.get("norms", 0) // 2
        if train_embeddings:
            sim.take("embed")
            grads += sum(arrays["model"]) * grad_item  # dembed, final norm
            moment("embedding backward", d + d, dhead)
        # ---- AdamW: numpy forms denom = sqrt(v) / sqrt(1 - b2^t) + eps and m / denom
        # for one array at a time, in float64 (np.sqrt of a Python float is a float64
        # scalar, which promotes under NEP 50); numba updates in place.
        grads = n_train * grad_item
        adam_work = 0 if numba and grad_item in (4, 8) else 2 * largest_train * 8
        moments.append(_Moment("optimizer step", 0, adam_work, grads))

    peak = max(moments, key=lambda m: m.store + m.transient + m.gradients)
    name = model_name or _model_name(cfg)
    if tokenizer is None:
        tokenizer = name != "tiny"
    baseline = RUNTIME_BASELINE[backend] + (vocab * TOKENIZER_BYTES_PER_TOKEN if tokenizer else 0)
    persistent = baseline + weights + trainable_bytes + optimizer
    return MemoryPlan(
        model=name, method=method.describe(), seq_len=t, batch_size=b,
        weight_dtype=weight_dtype, backend=backend, baseline=baseline, weights=weights,
        trainable=trainable_bytes, optimizer=optimizer, gradients=peak.gradients, activation_store=peak.store,
        transient=peak.transient, total=persistent + peak.store + peak.transient + peak.gradients,
        peak_phase=peak.name, store_peak=sim.bytes_peak, store_peak_by_kind=sim.peak_by_kind(),
        n_trainable=n_train,
        phases=tuple((m.name, persistent + m.store + m.transient + m.gradients) for m in moments))


def _model_name(cfg: ModelConfig) -> str:
    from .config import PRESETS

    return next((name for name, preset in PRESETS.items() if preset == cfg), "model")


def store_bytes_per_token(cfg: ModelConfig, method: MethodConfig, compute_dtype: str = "float32") -> dict[str, float]:
    """Bytes one block keeps per token under `method`'s policies, by site kind (what
    docs/memory.md tabulates), from the same simulated store at a large N."""
    n = 1 << 16
    plan = StoragePlan.from_mapping(dict(method.storage)) if method.name == "lars" else StoragePlan()
    sim = _SimStore(plan, n)
    out = {}
    for site, fields in _block_caches(cfg, method, 1, n, np.dtype(compute_dtype)):
        before = sim.bytes_now
        sim.keep(f"blocks.0.{site}", fields)
        out[site] = (sim.bytes_now - before) / n
    return out


# ---------------------------------------------------------------- budgets
def check_budget(cfg: ModelConfig, method: MethodConfig | str, seq_len: int, batch_size: int, weight_dtype: str,
                 budget_bytes: int | str, backend_name: str | None = None, **options) -> MemoryPlan:
    """The plan when it fits in `budget_bytes`; otherwise ValueError saying what would
    fit: the longest sequence, a lower rank, another storage policy or method, float16
    weights, a smaller batch."""
    if isinstance(method, str):
        method = MethodConfig.lars_default() if method == "lars" else MethodConfig(method)
    budget = parse_size(budget_bytes)
    plan = plan_memory(cfg, method, seq_len, batch_size, weight_dtype, backend_name, **options)
    if plan.total <= budget:
        return plan

    def fits(m: MethodConfig, t: int = seq_len, bsz: int = batch_size, wd: str = weight_dtype) -> bool:
        return plan_memory(cfg, m, t, bsz, wd, backend_name, **options).total <= budget

    advice = []
    longest = largest_fitting_seq_len(cfg, method, batch_size, weight_dtype, budget, backend_name, **options)
    if longest:
        advice.append(f"--seq-len {longest} (the longest that fits)")
    else:
        advice.append("no sequence length fits with this method")
    if method.name in ("lora", "lars") and method.rank > 1:
        rank = next((r for r in _lower_ranks(method.rank) if fits(_with(method, rank=r))), None)
        if rank is not None:
            advice.append(f"--rank {rank}")
    if method.name == "lars":
        for storage in (LARS_DEFAULT_STORAGE, (("block", "recompute"), ("input.x", "half"), ("*", "half"))):
            if tuple(method.storage) != storage and fits(_with(method, storage=storage)):
                advice.append("--storage " + ",".join(f"{k}={v}" for k, v in storage))
                break
    elif method.name in ("full", "lora", "ia3"):
        lars = MethodConfig.lars_default()
        if fits(lars):
            advice.append("--method lars (default storage: blocks recomputed, inputs kept in float16)")
    if weight_dtype == "float32" and fits(method, wd="float16"):
        advice.append("--weight-dtype float16")
    if batch_size > 1:
        smaller = next((bs for bs in range(batch_size - 1, 0, -1) if fits(method, bsz=bs)), None)
        if smaller:
            advice.append(f"--batch-size {smaller}")
    raise ValueError(
        f"planned peak {format_size(plan.total)} exceeds the budget of {format_size(budget)} for {plan.method} "
        f"at T={seq_len}, batch {batch_size} (weights {format_size(plan.weights)}, activation store "
        f"{format_size(plan.activation_store)}, work {format_size(plan.transient)}, peak at {plan.peak_phase}). "
        f"What would fit: " + "; ".join(advice) + ".")


def largest_fitting_seq_len(cfg: ModelConfig, method: MethodConfig, batch_size: int, weight_dtype: str,
                            budget_bytes: int, backend_name: str | None = None, **options) -> int:
    """The longest T (<= the model's context) whose planned peak fits; 0 if none.
    The plan grows with T, so a binary search finds it."""
    def total(t: int) -> int:
        return plan_memory(cfg, method, t, batch_size, weight_dtype, backend_name, **options).total

    if total(1) > budget_bytes:
        return 0
    lo, hi = 1, cfg.max_seq_len
    if total(hi) <= budget_bytes:
        return hi
    while hi - lo > 1:  # total(lo) fits, total(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget_bytes else (lo, mid)
    return lo


def _lower_ranks(rank: int) -> list[int]:
    """Ranks to try below `rank`, largest first: powers of two, then 1."""
    out, r = [], 1 << (rank - 1).bit_length() - 1
    while r >= 1:
        if r < rank:
            out.append(r)
        r //= 2
    return out


def _with(method: MethodConfig, **changes) -> MethodConfig:
    from dataclasses import replace

    return replace(method, **changes)


__all__ = ["MemoryPlan", "RUNTIME_BASELINE", "TOKENIZER_BYTES_PER_TOKEN", "check_budget", "format_size", "largest_fitting_seq_len",
           "parse_size", "plan_memory", "store_bytes_per_token"]
