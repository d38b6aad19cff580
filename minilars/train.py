"""The fine-tuning loop: deterministic batches, AdamW, checkpoints, resume, NaN guard.

One optimizer step s:

    tokens, targets = rows[batch_indices(R, B, seed, s)]     # a pure function of (seed, s)
    tape = model.forward(tokens, targets); grads = model.backward(tape)
    opt.step(grads, lr=config.lr_at(s))                       # AdamW, clipped to max_grad_norm

Because the batch depends on (seed, s) only, and a checkpoint holds every array that
changes (the trainable arrays, AdamW's m and v and its step count) plus the frozen
arrays that calibration chose (LARS bases), a run resumed from a checkpoint takes
bitwise the same steps as the run that was never stopped.

A checkpoint is one safetensors file; its metadata holds the step, the loss history,
the run's configuration and its hash (which covers the data rows' digest), and the
sha256 of its tensors, checked before a resume (a file changed on disk is refused,
named, as is one holding NaN or inf). It is written to a temporary file, flushed to
disk, then renamed over the old one (minilars/files.py), so a kill at any moment
leaves either the old checkpoint or the new one, never half of one, and a full disk
stops the run with one line naming the file while the old checkpoint stays.
"""
from __future__ import annotations

import hashlib
import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .files import append_line, atomic_write, write_text
from .data import Example, Rows, batch_indices, contains_answer, exact_match, make_rows
from .methods.base import refresh_steps
from .model import Model
from .optim import AdamW, NonFiniteGradient

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"
RESULT = "result.json"
CHECKPOINT_FORMAT = 2  # 2: the metadata carries tensors_sha256 and meta_sha256


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter: training stopped, checkpoint kept."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM: the current step finished and a checkpoint was written."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"{signal_name} after step {step}")
        self.step = step
        self.signal_name = signal_name


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run."""


@dataclass(frozen=True)
class TrainConfig:
    """The schedule and the batches; every field shapes the loss trajectory, so every
    field goes into the run's config hash. The optimiser's own settings (weight decay,
    gradient clipping) are AdamWConfig's (minilars/optim.py), the one place they act."""

    steps: int = 60  # optimizer steps
    batch_size: int = 4  # rows per step (B)
    seq_len: int = 256  # tokens per row (T)
    lr: float = 2e-3  # peak learning rate
    warmup: int = 0  # steps of linear warm-up from lr / warmup to lr
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio at the last step
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup must be >= 0 and min_lr_ratio in [0, 1]")

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup` steps, then cosine from lr to lr * min_lr_ratio."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - 1 - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def config_hash(run_config: dict) -> str:
    return hashlib.sha256(json.dumps(run_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- checkpoints
def frozen_arrays(model: Model) -> dict[str, np.ndarray]:
    """Arrays that do not train but were chosen at start (LARS bases from calibration),
    so a resumed run does not depend on recalibrating to the same bits."""
    out = {}
    for i, block in enumerate(model.sites):
        for stream, site in block.items():
            if hasattr(site, "frozen_arrays"):  # LARSSite: its basis, and what refresh() folded
                out.update({f"blocks.{i}.{stream}.{k}": v for k, v in site.frozen_arrays(model.be).items()})
    for name, basis in model.bases.items():
        out[f"storage.{name}"] = model.be.to_numpy(basis)
    return out


def _set_frozen(model: Model, name: str, value: np.ndarray) -> None:
    be = model.be
    if name.startswith("storage."):
        model.bases[name[len("storage."):]] = be.asarray(np.ascontiguousarray(value))
        return
    _, i, stream, field = name.split(".", 3)  # "blocks.{i}.{stream}.{basis | folded_basis | folded_M.s}"
    model.sites[int(i)][stream].set_frozen(field, value, be)


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: the
    checksum a checkpoint carries, so a file changed after it was written is refused."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def save_checkpoint(path: Path, model: Model, opt: AdamW, meta: dict) -> None:
    """Trainable arrays, AdamW state and frozen arrays in one safetensors file, with
    the sha256 of its tensors in the metadata; written with files.atomic_write
    (temporary file, fsync, os.replace), so a failed write keeps the old checkpoint."""
    from safetensors.numpy import save_file

    tensors = {f"param/{k}": np.ascontiguousarray(model.be.to_numpy(v)) for k, v in model.trainable().items()}
    state = opt.state_dict()
    for name in opt.params:
        tensors[f"adam_m/{name}"] = np.ascontiguousarray(state[f"m.{name}"])
        tensors[f"adam_v/{name}"] = np.ascontiguousarray(state[f"v.{name}"])
    tensors.update({f"frozen/{k}": np.ascontiguousarray(v) for k, v in frozen_arrays(model).items()})
    meta = {**meta, "format": CHECKPOINT_FORMAT, "adam_step": opt.step_count, "tensors_sha256": tensors_sha256(tensors)}
    meta["meta_sha256"] = meta_sha256(meta)
    header = json.dumps(meta)
    size = sum(a.nbytes for a in tensors.values()) + len(header) + 128 * (len(tensors) + 1)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"minilars": header}), size)


def meta_sha256(meta: dict) -> str:
    """sha256 of the metadata without its own checksum (canonical JSON)."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def read_checkpoint_meta(path: Path) -> dict:
    """The metadata of a checkpoint, without reading its tensors; CheckpointError
    naming the file when it is unreadable, of another format or changed on disk."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["minilars"])
    except Exception as exc:  # safetensors raises several types for a damaged file
        reason = f"no minilars metadata {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: unreadable checkpoint (its metadata is not a JSON object)")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, "
                              f"this version reads {CHECKPOINT_FORMAT}")
    if meta.get("meta_sha256") != meta_sha256(meta):
        raise CheckpointError(f"{path} is corrupt: its metadata does not match the sha256 recorded when it was "
                              "written; it cannot be resumed. Restore a copy, or start over with --overwrite")
    return meta


def check_resumable(meta: dict, run_config: dict, path: Path) -> None:
    """CheckpointError naming what differs when the checkpoint came from another configuration."""
    if meta.get("config_hash") == config_hash(run_config):
        return
    theirs = meta.get("run_config", {})
    keys = sorted(set(theirs) | set(run_config))
    diffs = [f"{k} ({theirs.get(k)!r} there, {run_config.get(k)!r} now)"
             for k in keys if theirs.get(k) != run_config.get(k)]
    raise CheckpointError(f"{path} was written by a run with a different configuration; differs in: "
                          f"{'; '.join(diffs) or 'the config hash'}. Resume with the same options, "
                          "or start over with --overwrite")


def verify_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """CheckpointError naming the file when its tensors are not the ones it was written
    with (the sha256 in its metadata), or hold a NaN or inf: a checkpoint is written only
    after every parameter was checked finite, so either means a damaged file."""
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"{path} is corrupt: tensor {name} holds NaN or inf, which training never "
                                  "saves; it cannot be resumed. Restore a copy, or start over with --overwrite")
    if tensors_sha256(tensors) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the sha256 recorded when it was "
                              "written (changed on disk after the run saved it); it cannot be resumed. Restore a "
                              "copy, or start over with --overwrite")


def restore_checkpoint(path: Path, model: Model, opt: AdamW) -> dict:
    """Load every array of the checkpoint into model and optimizer; returns its metadata."""
    from safetensors.numpy import load_file

    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: a damaged file
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    verify_tensors(path, tensors, meta)
    be = model.be
    trainable = model.trainable()
    missing = [k for k in trainable if f"param/{k}" not in tensors]
    if missing:
        raise CheckpointError(f"{path}: no array for {missing[0]} (and {len(missing) - 1} more)")
    for name, array in trainable.items():
        value = tensors[f"param/{name}"]
        if tuple(value.shape) != tuple(array.shape):
            raise CheckpointError(f"{path}: {name} has shape {value.shape}, the model needs {tuple(array.shape)}")
        array[...] = be.asarray(value)
    for key, value in tensors.items():
        if key.startswith("frozen/"):
            _set_frozen(model, key[len("frozen/"):], value)
    state = {"step": meta["adam_step"]}
    for name in opt.params:
        state[f"m.{name}"] = tensors[f"adam_m/{name}"]
        state[f"v.{name}"] = tensors[f"adam_v/{name}"]
    opt.load_state_dict(state)
    return meta


def write_json_atomic(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- evaluation
@dataclass
class Answer:
    question: str
    output: str
    reference: str
    exact: bool
    contains: bool


@dataclass
class EvalResult:
    """Held-out loss and generation accuracy at one step."""

    step: int
    loss: float | None = None  # mean over labelled eval tokens
    exact: float | None = None  # exact-match rate (normalised case and whitespace)
    contains: float | None = None  # rate of outputs containing the answer (or the whole reference)
    n: int = 0  # examples scored by generation
    answers: list[Answer] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"eval loss {self.loss:.4f}")
        if self.exact is not None:
            parts.append(f"exact match {self.exact:.0%} ({round(self.exact * self.n)}/{self.n})")
            parts.append(f"contains answer {self.contains:.0%} ({round(self.contains * self.n)}/{self.n})")
        return ", ".join(parts) or "nothing to evaluate"


def eval_loss(model: Model, examples: list[Example], seq_len: int, batch_size: int, pad_id: int) -> float | None:
    """Mean loss over the labelled tokens of `examples`, forward only."""
    total, count = _loss_sum(model, examples, seq_len, batch_size, pad_id)
    return total / count if count else None


def _loss_sum(model: Model, examples: list[Example], seq_len: int, batch_size: int, pad_id: int) -> tuple[float, int]:
    """(sum of the losses, labelled tokens) over `examples` packed into rows."""
    if not examples:
        return 0.0, 0
    rows = make_rows(examples, seq_len, pad_id, packing="pack", seed=0)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        tokens, targets = rows.tokens[start:start + batch_size], rows.targets[start:start + batch_size]
        tape = model.forward(tokens, targets, need_grad=False)
        total += tape.loss * tape.n_labelled
        count += tape.n_labelled
    return total, count


def generate_answers(model: Model, tokenizer, prompts: list, max_new_tokens: int, stop_ids: set[int]) -> list[str]:
    """Greedy answers to token-id prompts, prompts of one length batched
    (minilars.generate.generate_batch, the decoding loop every command uses)."""
    from .generate import generate_batch

    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate_batch(model, prompts, max_new_tokens, stop_ids=stop_ids)]


def shares_its_prompt(ex: Example, seq_len: int) -> bool:
    """The example's loss can come from its answer's prefill: it has a generation
    prompt, nothing labelled inside it (a prompt/completion record, or a chat whose
    last assistant turn is its only labelled one), and it fits a row of seq_len + 1."""
    n = len(ex.prompt_ids or ())
    return 0 < n < len(ex.ids) <= seq_len + 1 and tuple(ex.ids[:n]) == tuple(ex.prompt_ids) \
        and not ex.labelled[:n].any()


def loss_and_answers(model: Model, examples: list[Example], max_new_tokens: int, stop_ids: set[int],
                     ignore_index: int = -100) -> tuple[float, int, list[list[int]]]:
    """Held-out loss and greedy answers of prompts of one length L, from one prefill.

    The (B, L) prompts are prefilled once into a KV cache; the hidden state at the
    prompt's last position, h_{L-1}, gives both the first answer token (greedy) and
    the loss's first term. The completions, fed against the cache as one (B, C - 1)
    chunk (right-padded; causal attention keeps the padding out of every real
    position), give the other terms:

        loss = sum over labelled t >= L of -log softmax(h_{t-1} E^T)[ids[t]]

    (positions 0-based, the head soft-capped where the model has one), what the
    example alone in a padded row gives `forward`. Then the cache is cut back to L
    and the answers decode from h_{L-1}'s logits (minilars.generate.decode_from), as
    `decode` would after its own prefill: the prompt's forward serves the loss and
    the answer instead of running once for each. Returns (sum of the losses, labelled
    tokens, each example's new token ids, the stop id left out)."""
    from .generate import decode_from

    be, d = model.be, model.cfg.dim
    L = len(examples[0].prompt_ids)
    completion = max(len(ex.ids) for ex in examples) - L  # C: the longest completion, in tokens
    prompts = np.asarray([ex.prompt_ids for ex in examples], dtype=np.int64)  # (B, L)
    chunk = np.zeros((len(examples), max(completion - 1, 1)), dtype=np.int64)  # (B, C - 1), inputs after L
    targets = np.full((len(examples), completion), ignore_index, dtype=np.int64)  # (B, C), the targets from L - 1
    for b, ex in enumerate(examples):
        ids, labelled = np.asarray(ex.ids), np.asarray(ex.labelled)
        chunk[b, :len(ids) - L - 1] = ids[L:-1]
        targets[b, :len(ids) - L] = np.where(labelled[L:], ids[L:], ignore_index)
    kv = model.new_kv_cache(len(examples), min(L + max(completion - 1, max_new_tokens), model.cfg.max_seq_len))
    h_last = model.hidden(prompts, kv)[:, -1]  # (B, d)
    first_logits = model.head_logits(h_last)  # (B, V)
    h = [h_last[:, None]]
    if completion > 1:
        h.append(model.hidden(chunk, kv))  # (B, C - 1, d)
    h = be.concat(h, axis=1).reshape(len(examples) * completion, d)  # (B C, d)
    loss, count = model.loss_of_hidden(h, targets.reshape(-1), ignore_index)
    kv.length = L
    answers: list[list[int]] = [[] for _ in examples]
    for step in decode_from(model, kv, first_logits, max_new_tokens, stop_ids=stop_ids):
        for b, token in enumerate(step):
            if token is not None:
                answers[b].append(token)
    return loss * count, count, answers


def evaluate(model: Model, tokenizer, examples: list[Example], step: int, seq_len: int, batch_size: int,
             pad_id: int, stop_ids: set[int], max_new_tokens: int = 32) -> EvalResult:
    """Eval loss on `examples`, and greedy answers to those that have a prompt.

    Examples whose prompt holds no label (shares_its_prompt) get both from one
    prefill, prompts of one length batched up to batch_size (loss_and_answers);
    the rest (text records, chats with earlier labelled turns, examples longer than a
    row) keep the packed rows of eval_loss for the loss and generate_answers for
    the answer."""
    shared = [ex for ex in examples if shares_its_prompt(ex, seq_len)]
    total, count = _loss_sum(model, [ex for ex in examples if not shares_its_prompt(ex, seq_len)], seq_len,
                             batch_size, pad_id)
    outputs: dict[int, str] = {}  # id(example) -> answer
    groups: dict[int, list[Example]] = {}
    for ex in shared:
        groups.setdefault(len(ex.prompt_ids), []).append(ex)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            part = group[start:start + batch_size]
            loss_sum, n, answers = loss_and_answers(model, part, max_new_tokens, stop_ids)
            total, count = total + loss_sum, count + n
            outputs.update((id(ex), tokenizer.decode(ids, skip_special_tokens=True)) for ex, ids in zip(part, answers))
    unshared = [ex for ex in examples if ex.prompt_ids and id(ex) not in outputs]
    outputs.update(zip(map(id, unshared), generate_answers(model, tokenizer, [ex.prompt_ids for ex in unshared],
                                                           max_new_tokens, stop_ids)))
    result = EvalResult(step, loss=total / count if count else None)
    scored = [ex for ex in examples if ex.prompt_ids]
    for ex in scored:
        output = outputs[id(ex)]
        result.answers.append(Answer(ex.question or "", output, ex.reference, exact_match(output, ex.reference),
                                     contains_answer(output, ex.answer or ex.reference)))
    if scored:
        result.n = len(scored)
        result.exact = sum(a.exact for a in result.answers) / len(scored)
        result.contains = sum(a.contains for a in result.answers) / len(scored)
    return result


# ---------------------------------------------------------------- signals
@contextmanager
def stop_requests():
    """Inside, the first SIGINT or SIGTERM sets flag["signal"] (the step in flight
    finishes and a checkpoint is written); a second one acts as usual."""
    flag: dict[str, str | None] = {"signal": None}
    previous = {}

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name
        for sig, old in previous.items():
            signal.signal(sig, old)
        print(f"\n{flag['signal']}: stopping after this step and writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handlers, Ctrl-C acts as usual
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- the loop
class Trainer:
    """Runs steps [start, config.steps) of one run and keeps its output directory:
    checkpoint.safetensors (every save_every steps, at the end, on SIGINT/SIGTERM) and
    log.jsonl (one line per step and per evaluation).

    With `group` (minilars/distributed.py) this process is one rank of a data-parallel
    run: it trains on its share of every batch, gradients are summed across ranks
    before the optimizer step, and only rank 0 writes files or shows progress."""

    def __init__(self, model: Model, opt: AdamW, rows: Rows, config: TrainConfig, out_dir: Path,
                 run_config: dict, save_every: int = 0, eval_every: int = 0,
                 evaluate_fn: Callable[[int], EvalResult] | None = None, progress: bool = True, group=None):
        self.model, self.opt, self.rows, self.config = model, opt, rows, config
        self.group = group  # minilars.distributed.Group, or None for one process
        self.writes = group is None or group.is_main  # this process keeps the output directory
        self.out_dir = Path(out_dir)
        if self.writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)  # the checkpoint and log go here
        self.run_config = run_config
        self.hash = config_hash(run_config)
        self.save_every, self.eval_every = save_every, eval_every
        self.evaluate_fn = evaluate_fn
        self.progress = progress and self.writes
        self.step = 0  # steps done
        self.history: list[dict] = []  # one entry per step and per evaluation
        self.peak_bytes = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history if "loss" in h]

    def resume(self) -> dict:
        for stale in self.out_dir.glob(f".{CHECKPOINT}.*.tmp"):  # left by a run killed mid-write
            stale.unlink()
        meta = read_checkpoint_meta(self.checkpoint_path)
        check_resumable(meta, self.run_config, self.checkpoint_path)
        meta = restore_checkpoint(self.checkpoint_path, self.model, self.opt)
        self.step = int(meta["step"])
        self.history = list(meta["history"])
        # the steps already taken count towards the peak, or a resumed run that has
        # nothing left to do would report a peak of 0
        self.peak_bytes = max((h.get("activation_bytes", 0) for h in self.history), default=0)
        self._rewrite_log()
        return meta

    def batch_rows(self, step: int) -> np.ndarray:
        """Indices of step's rows (a pure function of the seed and the step)."""
        return batch_indices(len(self.rows), self.config.batch_size, self.config.seed, step)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.batch_rows(step)
        return self.rows.tokens[idx], self.rows.targets[idx]

    def save(self) -> None:
        self._check_params_finite()  # on every rank: each holds the same parameters
        if not self.writes:
            return
        save_checkpoint(self.checkpoint_path, self.model, self.opt,
                        {"step": self.step, "config_hash": self.hash, "run_config": self.run_config,
                         "history": self.history})

    def record_eval(self, result: EvalResult) -> None:
        entry = {"step": result.step, "eval": {k: v for k, v in asdict(result).items() if k != "step"}}
        self.history.append(entry)
        self._append_log(entry)

    def train_step(self) -> dict:
        """One optimizer step on batch(step); the log entry. TrainingDiverged on a
        non-finite loss or gradient, before anything is updated."""
        s, cfg = self.step, self.config
        started = time.perf_counter()
        tokens, targets = self.batch(s)
        if self.group is not None:
            tokens, targets = self.group.shard(tokens, targets)  # this rank's rows of the batch
        tape = self.model.forward(tokens, targets)
        loss = float(tape.loss)
        if self.group is not None:  # the whole batch's loss; this rank's weight n_r / N in it
            loss, weight = self.group.global_loss(loss, tape.n_labelled)
        if not math.isfinite(loss):
            tape.store.clear()
            self._diverged(f"loss is {loss} at step {s + 1}")
        grads = self.model.backward(tape)
        if self.group is not None:
            grads = self.group.sum_gradients(grads, self.model.be, weight)  # the whole batch's gradient
        lr = cfg.lr_at(s)
        try:
            norm = self.opt.step(grads, lr=lr)
        except NonFiniteGradient as exc:
            self._diverged(f"{exc} at step {s + 1}")
        self.step = s + 1
        self._refresh_if_due()
        self.peak_bytes = max(self.peak_bytes, tape.store.bytes_peak)
        entry = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": float(norm),
                 "tokens_per_s": cfg.batch_size * cfg.seq_len / (time.perf_counter() - started),
                 "activation_bytes": tape.store.bytes_peak}
        if self.group is not None:
            entry["allreduce_s"] = self.group.last_reduce_s
        return entry

    def _refresh_if_due(self) -> None:
        """A method that refreshes what it calibrated N times (LARS's --refreshes, docs/lars.md
        Part 1.6) does so after steps k * steps // (N + 1), k = 1..N, on the next step's batch (the
        whole batch, found by rank 0 and broadcast, so every rank takes the same bases);
        the optimizer restarts with it, as the parameters it held restart at zero."""
        method = self.model.method
        kind = None if method is None else method.kind
        n, steps = (0 if kind is None else kind.refreshes), self.config.steps
        if self.step not in refresh_steps(n, steps):
            return
        idx = self.batch_rows(self.step)
        mask = None if self.rows.real is None else self.rows.real[idx]
        bases = kind.calibrated_bases(self.model, self.rows.tokens[idx], mask) if self.writes else None
        if self.group is not None:
            be = self.model.be
            bases = self.group.broadcast_arrays({k: be.to_numpy(v) for k, v in bases.items()} if self.writes else None)
        kind.refresh(self.model, bases)
        self.opt.reset()

    def run(self) -> list[float]:
        """Train to config.steps; returns every step's loss (resumed steps included)."""
        cfg = self.config
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc="finetune", file=sys.stderr,
                       dynamic_ncols=True, smoothing=0.3)
        say = bar.write if bar is not None else print
        last_saved = self.step
        try:
            # overflow is caught as a non-finite loss or gradient; numpy's warnings would only repeat it
            with stop_requests() as stop, np.errstate(over="ignore", invalid="ignore"):
                while self.step < cfg.steps:
                    entry = self.train_step()
                    self.history.append(entry)
                    self._append_log(entry)
                    if bar is not None:
                        bar.set_postfix_str(f"loss {entry['loss']:.4f}, {entry['tokens_per_s']:,.0f} tok/s, "
                                            f"activations {entry['activation_bytes'] / 2**20:.1f} MiB", refresh=False)
                        bar.update(1)
                    if (self.eval_every and self.evaluate_fn and self.step % self.eval_every == 0
                            and self.step < cfg.steps):  # the command evaluates the last step itself
                        result = self.evaluate_fn(self.step)
                        self.record_eval(result)
                        say(f"step {self.step}: {result.summary()}")
                    if self._stop_agreed(stop["signal"]):
                        self.save()
                        raise TrainingInterrupted(self.step, stop["signal"] or "a signal to another rank")
                    if self.save_every and self.step % self.save_every == 0:
                        self.save()
                        last_saved = self.step
                if last_saved != self.step or not self.checkpoint_path.exists():
                    self.save()  # the final state, so the result can be rebuilt from it
        finally:
            if bar is not None:
                bar.close()
        return self.losses

    def _diverged(self, what: str) -> None:
        if self.checkpoint_path.exists():
            step = read_checkpoint_meta(self.checkpoint_path)["step"]
            kept, again = f"the last good checkpoint ({CHECKPOINT}, step {step}) is untouched", " with --overwrite"
        else:
            kept, again = "no checkpoint was written", ""
        raise TrainingDiverged(f"{what} (lr {self.config.lr:g}): training stopped; {kept}. "
                               f"Lower --lr and start again{again}")

    def _check_params_finite(self) -> None:
        bad = [name for name, p in self.model.trainable().items() if not self.model.be.isfinite(p)]
        if bad:
            self._diverged(f"parameter {bad[0]} is not finite after step {self.step}")

    def _stop_agreed(self, requested) -> bool:
        """Stop after this step: every rank stops at the same step when any was signalled."""
        return self.group.any(bool(requested)) if self.group is not None else bool(requested)

    def _append_log(self, entry: dict) -> None:
        if self.writes:
            append_line(self.out_dir / LOG, json.dumps(entry))

    def _rewrite_log(self) -> None:
        if self.writes:
            write_text(self.out_dir / LOG, "".join(json.dumps(e) + "\n" for e in self.history))


def expected_activation_bytes(model: Model, batch_size: int, seq_len: int, probe: tuple[int, int] = (8, 16)) -> int:
    """Peak activation-store bytes of one training step at (batch_size, seq_len), from
    two probe steps: every kept tensor is (N, width) or fixed-size (subspace bases),
    so the peak is affine in N = B*T and two points fix it."""
    peaks = []
    for n in probe:
        tokens = np.zeros((1, n), dtype=np.int64)
        tape = model.forward(tokens, tokens)
        model.backward(tape)
        peaks.append(tape.store.bytes_peak)
    slope = (peaks[1] - peaks[0]) / (probe[1] - probe[0])
    return int(round(peaks[0] + slope * (batch_size * seq_len - probe[0])))
