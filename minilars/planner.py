"""Memory planner: a training step's peak memory, predicted by running the engine on shapes.

`plan_memory(cfg, method, seq_len, batch_size, weight_format, backend_name)` builds the
real Model on the shape-only backend (backends/shape_backend.py: arrays with a shape
and a dtype and no values, whose buffers are counted as they are allocated and
freed), applies the method with minilars.methods.apply_method, and runs one training
step: Model.forward into a real ActivationStore, Model.backward, AdamW.step. What the
code holds at every moment is what the shape backend counts, so the prediction
follows the code: a change to the model, a site, the store or the optimizer changes
the plan with no edit here. The plan reports the moment of the peak by category:

    baseline          Python + numpy + the backend's libraries + the tokenizer (measured)
    weights           what outlives the step and is not trained or optimizer state:
                      parameters (float arrays, or GGUF blocks: see weight_format),
                      LARS bases, RoPE tables
    trainable         adapter parameters (LoRA A/B, IA3 scales, LARS M); 0 for full,
                      whose trained arrays are the weights
    optimizer         AdamW m and v
    gradients         the arrays Model.backward returns, those alive at the peak
    activation_store  the ActivationStore's bytes_now at the peak
    transient         everything else alive at the peak: activations flowing through
                      a block, gradients flowing back, the kernels' work arrays

The kernels' work arrays (attention tiles, the loss's logits block, numpy's
expression temporaries) are the one part the shape backend states rather than
runs: each shape kernel allocates what the real kernel of the chosen backend holds
inside (its docstrings say what), checked kernel by kernel against tracemalloc in
tests/test_shape_backend.py. The whole plan is checked against tracemalloc per
phase in tests/test_planner.py and against peak RSS in `minilars bench memory`
(docs/memory.md). This module adds only what is not the model: the runtime
baseline, the tokenizer.

LARS calibration runs too, on shapes (minilars/calibrate.py on the shape backend: a
no-grad forward over CALIBRATION_TOKENS tokens, the range finder giving each basis
its real shape). Its own peak is reported apart (`calibration_peak`): its work is
freed before the first step, and it stays below the step's (`minilars plan --model
smollm2-135m --method lars --seq-len 256 --backend numpy`: 611.9 MiB while applying
the method, 675.3 MiB for the step).
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field, replace

import numpy as np

from .backends.shape_backend import ShapeBackend
from .config import ModelConfig
from .methods import DEFAULT_METHOD, MethodConfig, apply_method, method_class
from .model import Model
from .optim import AdamW
from .store import ActivationStore
from .weights import expected_shapes

MIB = 2**20

# Resident memory of a process that has imported minilars and its backend, before any
# weight is loaded, and what the tokenizer adds. Measured on the reference machine
# (x86-64, Python 3.11.7, numpy 2.4, glibc) with
# `python -m minilars.bench.memory_worker --baseline --backend NAME`: numpy 30.1 MiB,
# numba 102.0 MiB (numba and the jitted kernels loaded from its on-disk cache; LLVM's
# code pages, 69 MiB more, are handed back after each load: backends/resident.py,
# numba_kernels._ReleaseCompiler), torch 219 MiB (libtorch, measured before
# the GGUF blocks were wired in); SmolLM2's 49,152-token BPE tokenizer (rebuilt from the
# GGUF) 17.9-22.4 MiB once the reader's parse is freed and the heap trimmed
# (pretrained.return_freed_heap; 34-40 MiB before), which the planner scales with the
# vocabulary.
RUNTIME_BASELINE = {"numpy": 30 * MIB, "numba": 102 * MIB, "torch": 219 * MIB}
TOKENIZER_BYTES_PER_TOKEN = 20 * MIB // 49152

NUMBA_THREADS = None  # None: numba's default (one per core); the attention kernels keep per-thread buffers
# Tokens LARS calibrates on in the plan (the bench's and finetune's default batch
# has at least this many; a basis has min(rank, d_in) columns from `rank` tokens on).
CALIBRATION_TOKENS = 512


# How the frozen weights are held (--weights): a float dtype, a format every matrix is
# quantised into at load, or, for weights kept as a file stores them, a mapping
# engine name -> ((ggml type, stored rows), ...) per part (minilars.quant.formats_of;
# pretrained.planned_weights reads it from a GGUF's header). Norms are float32 always.
WEIGHT_FORMATS = ("float32", "float16", "q8_0", "q4_0")
# What check_budget tries, from the most precise down, when the weights do not fit.
SMALLER_FORMATS = ("float16", "q8_0", "q4_0")


def describe_weights(weight_format) -> str:
    """'float32', 'q4_0', or 'kept Q4_1+Q8_0' for a mapping of kept formats."""
    if isinstance(weight_format, str):
        return weight_format
    names = dict.fromkeys(name for parts in weight_format.values() for name, _ in parts)
    return "kept " + "+".join(names) if names else "float32"


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
    weight_format: str  # describe_weights of what was planned
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
    calibration_peak: int = 0  # peak while the method was applied (LARS: its calibration forward), baseline included
    disk: int = 0  # bytes the `offload` storage policy writes to its file at the peak (not RAM; not in total)

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
                 f"{self.weight_format} weights, {self.backend} backend",
                 f"peak at: {self.peak_phase}"]
        width = max(len(name) for name, _ in self.rows())
        for name, value in self.rows():
            lines.append(f"  {name.ljust(width)}  {format_size(value):>12}")
        lines.append(f"  {'activation store peak (its own)'.ljust(width)}  {format_size(self.store_peak):>12}")
        lines.append(f"  {'peak while applying the method'.ljust(width)}  {format_size(self.calibration_peak):>12}")
        if self.disk:
            lines.append(f"  {'offloaded to disk (not in RAM)'.ljust(width)}  {format_size(self.disk):>12}")
        return "\n".join(lines)


# ---------------------------------------------------------------- the step, on shapes
def _default_backend_name() -> str:
    """numba where it is installed (backends.default_backend_name without importing it)."""
    return "numba" if importlib.util.find_spec("numba") is not None else "numpy"


def _numba_threads() -> int:
    if NUMBA_THREADS:
        return NUMBA_THREADS
    return int(os.environ.get("NUMBA_NUM_THREADS", 0)) or os.cpu_count() or 1


def _shape_model(cfg: ModelConfig, weight_format, be: ShapeBackend, **model_options) -> Model:
    """The Model on shape-only parameters as load_model keeps them (WEIGHT_FORMATS):
    norm weights float32; the matrices in the float dtype, or as blocks whose bytes
    are shape-only arrays (a site's stored rows are W^T, the table's E itself); a
    matrix whose rows do not split into 32-value blocks stays float32 under q8_0 /
    q4_0, as quant.quantize_weight leaves it. Each is tagged with its name (the
    backend reads block and projection from it to name the moments)."""
    from .quant import weight_of_formats

    params = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) != 2:  # norms (and biases): float32
            params[name] = be.new(shape, "float32", tag=name)
            continue
        transposed = name not in ("embed.weight", "head.weight")
        rows, n_cols = (shape[1], shape[0]) if transposed else shape  # the stored rows S
        formats = None
        if isinstance(weight_format, dict):
            formats = weight_format.get(name)
        elif weight_format in ("q8_0", "q4_0") and n_cols % 32 == 0:
            formats = ((weight_format.upper(), rows),)
        if formats:
            params[name] = weight_of_formats(formats, n_cols, transposed,
                                             lambda bytes_shape, name=name: be.new(bytes_shape, "uint8", tag=name))
        else:
            params[name] = be.new(shape, "float16" if weight_format == "float16" else "float32", tag=name)
    return Model(cfg, params, backend=be, **model_options)


def _serials(array) -> set:
    """The ledger buffers of a parameter: its own, or its blocks' (one per part)."""
    parts = getattr(array, "parts", None)
    return {p.data.serial for p in parts} if parts is not None else {array.serial}


@dataclass
class _Step:
    """What one step on shapes left to classify."""

    persistent: set  # buffers alive after the step: weights, adapters, optimizer state
    trainable: set  # buffers the optimizer updates that are not model parameters
    optimizer: set  # AdamW m and v
    gradients: set  # the arrays Model.backward returned
    store: ActivationStore


def _run_step(model: Model, be: ShapeBackend, batch_size: int, seq_len: int, inference: bool) -> _Step:
    """One training step (or, with inference, the no-grad forward) on shapes."""
    trainable = model.trainable()
    optimizer = None if inference else AdamW(trainable, be)
    store = ActivationStore(be, model.plan, model.bases)
    be.ledger.reset()
    be.ledger.on_peak = lambda: {"store": store.bytes_now}
    tokens = np.zeros((batch_size, seq_len), dtype=np.int64)
    gradients: set = set()
    if inference:
        be.phase = "forward (no grad)"
        model.forward(tokens, tokens, store=store, need_grad=False)
    else:
        be.phase = "forward"
        tape = model.forward(tokens, tokens, store=store)
        be.phase = "backward"
        grads = model.backward(tape)
        del tape
        gradients = {g.serial for g in grads.values()}
        be.phase = "optimizer step"
        optimizer.step(grads)
        del grads
    be.ledger.on_peak = None
    params = set().union(*(_serials(p) for p in model.params.values()))
    return _Step(persistent=set(be.ledger.live), trainable={a.serial for a in trainable.values()} - params,
                 optimizer={a.serial for a in (*optimizer.m.values(), *optimizer.v.values())} if optimizer else set(),
                 gradients=gradients, store=store)


def plan_memory(cfg: ModelConfig, method: MethodConfig | str, seq_len: int, batch_size: int = 1,
                weight_format="float32", backend_name: str | None = None, *,
                compute_dtype: str = "float32", loss_chunk: int = 256, attention_tile: int = 256,
                mlp_chunk: int = 512, inference: bool | None = None, model_name: str | None = None,
                tokenizer: bool | None = None) -> MemoryPlan:
    """Predicted peak memory of one training step of `method` at (batch_size, seq_len),
    on `backend_name`'s kernels. A method that trains nothing ("frozen"), or
    inference=True, plans the no-grad forward (the inference floor). tokenizer:
    whether the process holds the model's tokenizer (default: yes, except for the
    random-weight `tiny` preset). weight_format: WEIGHT_FORMATS or a mapping of kept
    formats (see there)."""
    method = _method_config(method)
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context ({cfg.max_seq_len})")
    backend = backend_name or _default_backend_name()
    if backend not in RUNTIME_BASELINE:
        raise ValueError(f"unknown backend {backend!r}; choose numpy, numba or torch")
    if not isinstance(weight_format, dict) and weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)} or the formats of kept "
                         f"weights, got {weight_format!r}")

    be = ShapeBackend(backend, threads=_numba_threads() if backend == "numba" else 1)
    model = _shape_model(cfg, weight_format, be, compute_dtype=compute_dtype, attention_tile=attention_tile,
                         loss_chunk=loss_chunk, mlp_chunk=mlp_chunk)
    calibration = np.zeros((1, min(cfg.max_seq_len, max(CALIBRATION_TOKENS, method.rank))), dtype=np.int64)
    be.phase = "calibration"
    apply_method(model, method, calibration)
    method.kind.refresh_all(model, calibration)  # the steps after the last refresh hold every factor it folded
    calibration_peak = be.ledger.bytes_peak
    if inference is None:
        inference = not model.trainable()
    step = _run_step(model, be, batch_size, seq_len, inference)

    ledger = be.ledger
    at_peak = ledger.peak_live

    def held(serials: set) -> int:
        return sum(at_peak.get(serial, 0) for serial in serials)

    trainable, optimizer = held(step.trainable), held(step.optimizer)
    weights = held(step.persistent - step.trainable - step.optimizer)
    gradients = held(step.gradients)
    store_now = ledger.peak_notes.get("store", 0)
    transient = ledger.bytes_peak - weights - trainable - optimizer - gradients - store_now

    name = model_name or _model_name(cfg)
    if tokenizer is None:
        tokenizer = name != "tiny"
    baseline = RUNTIME_BASELINE[backend] + (cfg.vocab_size * TOKENIZER_BYTES_PER_TOKEN if tokenizer else 0)
    return MemoryPlan(
        model=name, method=method.describe(), seq_len=seq_len, batch_size=batch_size,
        weight_format=describe_weights(weight_format), backend=backend, baseline=baseline, weights=weights,
        trainable=trainable, optimizer=optimizer, gradients=gradients, activation_store=store_now,
        transient=transient, total=baseline + ledger.bytes_peak, peak_phase=ledger.peak_label,
        store_peak=step.store.bytes_peak, store_peak_by_kind=step.store.peak_by_kind(),
        n_trainable=model.n_trainable(),
        phases=tuple((moment, baseline + total) for moment, total in ledger.moments.items()),
        calibration_peak=baseline + calibration_peak, disk=step.store.disk_peak)


def _model_name(cfg: ModelConfig) -> str:
    from .config import PRESETS

    return next((name for name, preset in PRESETS.items() if preset == cfg), "model")


def store_bytes_per_token(cfg: ModelConfig, method: MethodConfig, compute_dtype: str = "float32") -> dict[str, float]:
    """Bytes the activation store keeps per token per block under `method`'s policies,
    by site kind: the store's own peak per site (ActivationStore.peak_by_kind) over one
    planned step, divided by the blocks and the tokens (a recomputed block's caches
    are kept during its backward; the MLP's, one slice of tokens at a time)."""
    seq_len = min(cfg.max_seq_len, 4096)
    batch = -(-4096 // seq_len)
    plan = plan_memory(cfg, method, seq_len, batch, "float32", "numpy", compute_dtype=compute_dtype,
                       inference=False)
    n = batch * seq_len
    return {kind: nbytes / (cfg.n_layers * n) for kind, nbytes in plan.store_peak_by_kind.items()
            if kind not in ("final_norm", "head", "embed")}


# ---------------------------------------------------------------- budgets
def check_budget(cfg: ModelConfig, method: MethodConfig | str, seq_len: int, batch_size: int, weight_format,
                 budget_bytes: int | str, backend_name: str | None = None, **options) -> MemoryPlan:
    """The plan when it fits in `budget_bytes`; otherwise ValueError saying what would
    fit: the longest sequence, a lower rank, another storage policy or method, a
    smaller weight format (float16, q8_0, q4_0: the most precise that fits), a
    smaller batch."""
    method = _method_config(method)
    budget = parse_size(budget_bytes)
    plan = plan_memory(cfg, method, seq_len, batch_size, weight_format, backend_name, **options)
    if plan.total <= budget:
        return plan

    def fits(m: MethodConfig, t: int = seq_len, bsz: int = batch_size, wd=weight_format) -> bool:
        return plan_memory(cfg, m, t, bsz, wd, backend_name, **options).total <= budget

    advice = []
    longest = largest_fitting_seq_len(cfg, method, batch_size, weight_format, budget, backend_name, **options)
    if longest:
        advice.append(f"--seq-len {longest} (the longest that fits)")
    else:
        advice.append("no sequence length fits with this method")
    for group in _alternatives(method):  # the first that fits in each group
        flag = next((flag for flag, other in group if fits(other)), None)
        if flag:
            advice.append(flag)
    smaller = next((f for f in _smaller_formats(weight_format) if fits(method, wd=f)), None)
    if smaller:
        advice.append(f"--weights {smaller}")
    if batch_size > 1:
        smaller = next((bs for bs in range(batch_size - 1, 0, -1) if fits(method, bsz=bs)), None)
        if smaller:
            advice.append(f"--batch-size {smaller}")
    raise ValueError(
        f"planned peak {format_size(plan.total)} exceeds the budget of {format_size(budget)} for {plan.method} "
        f"at T={seq_len}, batch {batch_size} (weights {format_size(plan.weights)}, activation store "
        f"{format_size(plan.activation_store)}, work {format_size(plan.transient)}, peak at {plan.peak_phase}). "
        f"What would fit: " + "; ".join(advice) + ".")


def _smaller_formats(weight_format) -> list[str]:
    """The formats of SMALLER_FORMATS to suggest instead of weight_format: those after
    it; for kept blocks (4 to 8 bits already), q4_0."""
    if isinstance(weight_format, dict):
        return ["q4_0"]
    return list(SMALLER_FORMATS[SMALLER_FORMATS.index(weight_format) + 1:] if weight_format in SMALLER_FORMATS
                else SMALLER_FORMATS)


def fitting_weight_formats(cfg: ModelConfig, method: MethodConfig | str, seq_len: int, batch_size: int,
                           budget_bytes: int, backend_name: str | None = None, kept=None,
                           **options) -> list[tuple[str, int, bool]]:
    """(format, planned total, fits) for every weight format a run could load with:
    `kept` (a mapping of kept formats, for a GGUF) first as "keep", then WEIGHT_FORMATS."""
    method = _method_config(method)
    formats = ([("keep", kept)] if kept else []) + [(f, f) for f in WEIGHT_FORMATS]
    out = []
    for name, weight_format in formats:
        total = plan_memory(cfg, method, seq_len, batch_size, weight_format, backend_name, **options).total
        out.append((name, total, total <= budget_bytes))
    return out


def largest_fitting_seq_len(cfg: ModelConfig, method: MethodConfig, batch_size: int, weight_format,
                            budget_bytes: int, backend_name: str | None = None, **options) -> int:
    """The longest T (<= the model's context) whose planned peak fits; 0 if none.
    The plan grows with T, so a binary search finds it."""
    def total(t: int) -> int:
        return plan_memory(cfg, method, t, batch_size, weight_format, backend_name, **options).total

    if total(1) > budget_bytes:
        return 0
    lo, hi = 1, cfg.max_seq_len
    if total(hi) <= budget_bytes:
        return hi
    while hi - lo > 1:  # total(lo) fits, total(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget_bytes else (lo, mid)
    return lo


# ---------------------------------------------------------------- methods
# What a method is and what to try instead comes from its class in the registry
# (minilars/methods/): this module names no method.
def _method_config(method: MethodConfig | str) -> MethodConfig:
    """A method given by name: its default configuration (LARS: the default recipe)."""
    return MethodConfig.from_options(method, {}) if isinstance(method, str) else method


def _alternatives(method: MethodConfig) -> list[list[tuple[str, MethodConfig]]]:
    """Configurations to suggest when `method` does not fit, as groups of (flag,
    configuration) in order of preference: lower ranks; the method's leaner storage
    recipes; the default method (LARS) for a method that keeps its activations."""
    kind, groups = method.kind, []
    if kind.has_rank and method.rank > 1:
        groups.append([(f"--rank {r}", replace(method, rank=r)) for r in _lower_ranks(method.rank)])
    if kind.storage_to_try:
        groups.append([("--storage " + ",".join(f"{k}={v}" for k, v in storage), replace(method, storage=storage))
                       for storage in kind.storage_to_try if tuple(method.storage) != storage])
    elif kind.trains:
        default = MethodConfig.from_options(DEFAULT_METHOD, {})
        groups.append([(f"--method {DEFAULT_METHOD} ({method_class(DEFAULT_METHOD).summary}, default storage: "
                        "blocks recomputed, inputs kept in float16)", default)])
    return groups


def _lower_ranks(rank: int) -> list[int]:
    """Ranks to try below `rank`, largest first: powers of two, then 1."""
    out, r = [], 1 << (rank - 1).bit_length() - 1
    while r >= 1:
        if r < rank:
            out.append(r)
        r //= 2
    return out


__all__ = ["MemoryPlan", "RUNTIME_BASELINE", "SMALLER_FORMATS", "TOKENIZER_BYTES_PER_TOKEN", "WEIGHT_FORMATS",
           "check_budget", "describe_weights", "fitting_weight_formats", "format_size", "largest_fitting_seq_len",
           "parse_size", "plan_memory", "store_bytes_per_token"]
