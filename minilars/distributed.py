"""Data-parallel fine-tuning over torch.distributed (gloo on CPUs, NCCL on GPUs).

minilars has no collective layer of its own: `torchrun` starts the processes and
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; this module joins
the process group they describe and does the few collectives one step needs.

One step with W processes on a global batch of B rows (docs/distributed.md):

    rank r takes rows [r B/W, (r+1) B/W) of the global batch (the sampler's batch,
    a pure function of (seed, step), so every rank computes the same one)
    n_r = its labelled tokens,  S_r = the sum of their token losses,  L_r = S_r / n_r
    N = sum_r n_r  and  sum_r S_r    <- all-reduce of two float64 numbers
    L = sum_r S_r / N = sum_r (n_r / N) L_r      (the loss one process takes on all B rows)
    dL/dθ = sum_r (n_r / N) dL_r/dθ             <- each rank's gradient times n_r / N, in one
                                                   flat buffer, summed by one all-reduce

so every rank holds the gradient of the whole batch, clips it by its global norm and
takes the same AdamW step: the ranks' parameters stay equal without being sent.

Collectives run on torch tensors: the torch backend's gradients directly (CPU or
CUDA), numpy and numba gradients through torch.from_numpy, which shares their
memory. torch is imported here only, and only when WORLD_SIZE > 1.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from .cli import CommandError

TIMEOUT_ENV = "MINILARS_DIST_TIMEOUT"  # seconds a collective waits for a peer before failing
DEFAULT_TIMEOUT_S = 1800.0  # long enough for rank 0's evaluations, which the others wait out


class DistributedError(CommandError):
    """A peer was lost or a collective failed: this rank stops (printed as one line)."""


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _import_torch_distributed():
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise DistributedError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for data-parallel training, which runs on PyTorch's "
            "torch.distributed; install it (pip install torch, or pip install 'minilars[torch]') and start the "
            "processes with torchrun") from None
    if not dist.is_available():
        raise DistributedError(f"this PyTorch ({torch.__version__}) was built without torch.distributed")
    return torch, dist


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def local_batch_size(group: "Group | None", batch_size: int) -> int:
    """Rows per process: B / W, or a clear error when W does not divide B."""
    if group is None:
        return batch_size
    if batch_size % group.world_size:
        raise DistributedError(f"--batch-size {batch_size} does not divide among {group.world_size} processes; "
                               f"choose a multiple of {group.world_size} (each process takes an equal share of "
                               "every batch)")
    return batch_size // group.world_size


def threads_per_process(cores: int) -> int:
    """The cores left to each of the LOCAL_WORLD_SIZE processes on this machine."""
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@dataclass
class Group:
    """This process's place in the run and the collectives one step needs."""

    rank: int
    world_size: int
    local_rank: int
    timeout_s: float
    last_reduce_s: float = 0.0  # seconds the last gradient all-reduce took

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints; the others only train."""
        return self.rank == 0

    # ---------------------------------------------------------------- a step
    def shard(self, tokens: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This rank's contiguous share of the global batch: (B, T) -> (B/W, T)."""
        share = local_batch_size(self, tokens.shape[0])
        rows = slice(self.rank * share, (self.rank + 1) * share)
        return tokens[rows], targets[rows]

    def global_loss(self, loss: float, n_labelled: int) -> tuple[float, float]:
        """(L, w): the whole batch's mean loss over its N labelled tokens and this
        rank's gradient weight w = n_r / N (0 when the batch has no labelled token: one
        process then gets a zero gradient)."""
        torch, dist = self._torch()
        totals = torch.tensor([float(n_labelled), float(loss) * n_labelled], dtype=torch.float64)  # [n_r, S_r]
        self._collective("summing the batch's labelled tokens", dist.all_reduce, totals)
        n_global, loss_sum = float(totals[0]), float(totals[1])
        if n_global == 0:
            return 0.0, 0.0
        return loss_sum / n_global, n_labelled / n_global

    def sum_gradients(self, grads: dict, backend, weight: float) -> dict:
        """sum_r weight_r * grads_r over the ranks, weight = n_r / N from global_loss:
        the whole batch's gradient. One flat buffer per dtype (one in practice) is
        scaled and all-reduced (SUM); the gradients come back as views of it."""
        torch, dist = self._torch()
        started = time.perf_counter()
        out = {}
        for names in _by_dtype(grads).values():
            flat = _flatten([grads[name] for name in names], torch, backend.name == "torch")  # (P,)
            flat *= weight
            self._collective("summing gradients", dist.all_reduce, flat if backend.name == "torch"
                             else torch.from_numpy(flat))
            offset = 0
            for name in names:
                shape, size = tuple(grads[name].shape), _size(grads[name])
                out[name] = flat[offset:offset + size].reshape(shape)
                offset += size
        self.last_reduce_s = time.perf_counter() - started
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. a stop request)."""
        torch, dist = self._torch()
        value = torch.tensor([1 if flag else 0], dtype=torch.int64)
        self._collective("agreeing to stop", dist.all_reduce, value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    # ---------------------------------------------------------------- start of a run
    def broadcast_arrays(self, arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Rank 0's arrays on every rank (the others pass None): names, shapes and
        dtypes as one object, then one flat buffer per dtype."""
        torch, dist = self._torch()
        layout = [{name: (tuple(a.shape), np.dtype(a.dtype).str) for name, a in arrays.items()}
                  if self.is_main else None]
        self._collective("receiving rank 0's arrays", dist.broadcast_object_list, layout, src=0)
        by_dtype: dict[str, list[str]] = {}
        for name, (_, dtype) in layout[0].items():
            by_dtype.setdefault(dtype, []).append(name)
        out = {}
        for dtype, names in by_dtype.items():
            sizes = [int(np.prod(layout[0][name][0])) for name in names]
            if self.is_main:
                flat = np.concatenate([np.ascontiguousarray(arrays[name]).reshape(-1) for name in names])
            else:
                flat = np.empty(sum(sizes), dtype=np.dtype(dtype))
            self._collective("receiving rank 0's arrays", dist.broadcast, torch.from_numpy(flat), src=0)
            offset = 0
            for name, size in zip(names, sizes):
                out[name] = flat[offset:offset + size].reshape(layout[0][name][0])
                offset += size
        return out

    def broadcast_object(self, obj):
        """Rank 0's picklable object on every rank."""
        _, dist = self._torch()
        box = [obj if self.is_main else None]
        self._collective("receiving rank 0's state", dist.broadcast_object_list, box, src=0)
        return box[0]

    # ---------------------------------------------------------------- plumbing
    def _torch(self):
        import torch
        import torch.distributed as dist

        return torch, dist

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # torch.distributed.DistBackendError and gloo's errors are RuntimeErrors
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed, a process of the run has stopped or did "
                f"not answer within {self.timeout_s:g} s ({detail[:200]}); stopping this one too. The last "
                "checkpoint in the output directory is intact: start again with --resume (any number of "
                "processes)") from None


def _by_dtype(grads: dict) -> dict[str, list[str]]:
    """Gradient names grouped by dtype, each group in sorted order (the same on every rank)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(grads):
        groups.setdefault(str(grads[name].dtype), []).append(name)
    return groups


def _size(array) -> int:
    return int(np.prod(tuple(array.shape)))


def _flatten(arrays: list, torch, is_torch: bool):
    """One contiguous 1-D buffer holding every array: a torch tensor for the torch
    backend (on its device), else a numpy array that torch.from_numpy can share."""
    if is_torch:
        return torch.cat([a.reshape(-1) for a in arrays])
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays])


# ---------------------------------------------------------------- joining and leaving
def join() -> Group | None:
    """Join the process group torchrun describes (None when WORLD_SIZE is 1 or unset).
    gloo carries CPU tensors; where CUDA is available NCCL carries CUDA tensors and
    this process uses GPU LOCAL_RANK."""
    world_size = world_size_from_env()
    if world_size <= 1:
        return None
    torch, dist = _import_torch_distributed()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: start the processes with "
                               "torchrun (it sets them), e.g. torchrun --nproc-per-node 2 -m minilars finetune ...")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timeout_seconds()
    # numba reads its thread count on import (after this): share the cores, as torch's threads are (finetune)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads_per_process(os.cpu_count() or 1)))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {rank} of {world_size} could not join the process group at "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({exc})") from None
    return Group(rank, world_size, local_rank, timeout)


def leave() -> None:
    """Leave the process group, if this process joined one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session():
    """join() for the length of a command; ranks other than 0 print nothing to
    stdout (their errors still reach stderr)."""
    group = join()
    try:
        if group is not None and not group.is_main:
            with contextlib.redirect_stdout(io.StringIO()):
                yield group
        else:
            yield group
    finally:
        if group is not None:
            leave()


# ---------------------------------------------------------------- the same model on every rank
def apply_method(group: Group | None, model, method, calibration_tokens, calibration_mask) -> None:
    """methods.apply_method on every rank, with a method that calibrates (LARS)
    calibrated once, on rank 0: its bases are broadcast and the other ranks build
    their sites on them (the same P)."""
    from .methods import apply_method as apply

    if group is None or not method.kind.needs_calibration:
        apply(model, method, calibration_tokens, calibration_mask)
        return
    if group.is_main:
        apply(model, method, calibration_tokens, calibration_mask)
    be = model.be
    arrays = group.broadcast_arrays(_calibrated(model) if group.is_main else None)
    if not group.is_main:
        streams = {name[:-len(".basis")]: be.asarray(a.copy()) for name, a in arrays.items() if name.endswith(".basis")}
        storage = {name[len("storage."):]: be.asarray(a.copy()) for name, a in arrays.items()
                   if name.startswith("storage.")}
        apply(model, method, bases=(streams, storage))


def _calibrated(model) -> dict[str, np.ndarray]:
    from .train import frozen_arrays

    return frozen_arrays(model)


def check_same_run(group: Group | None, run_config: dict, may_differ: tuple[str, ...] = ("threads",)) -> None:
    """DistributedError on every rank unless every rank runs the same job: the same
    model, data rows, method and options (run_config, as the checkpoint hash sees it;
    the thread count may differ between machines). Each machine reads its own model
    and data files, so a stale copy on one of them would otherwise train silently on
    other rows."""
    if group is None:
        return
    _, dist = group._torch()
    mine = {k: v for k, v in run_config.items() if k not in may_differ}
    everyone: list = [None] * group.world_size
    group._collective("comparing the processes' configurations", dist.all_gather_object, everyone, mine)
    for rank, theirs in enumerate(everyone[1:], start=1):
        keys = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
        if keys:
            shown = "; ".join(f"{k}: {everyone[0].get(k)!r} on rank 0, {theirs.get(k)!r} on rank {rank}"
                              for k in keys[:3])
            raise DistributedError(f"the processes are not running the same job ({shown}); every machine needs "
                                   "the same model and data files and the same options")


def broadcast_state(group: Group | None, trainer) -> None:
    """Make every rank's trainable arrays, AdamW state, frozen bases, step and history
    rank 0's: after rank 0 alone read a checkpoint (so a resumed run may use any
    number of processes, and no rank but 0 reads the output directory)."""
    if group is None:
        return
    from .train import _set_frozen, frozen_arrays

    model, opt = trainer.model, trainer.opt
    arrays = None
    if group.is_main:
        state = opt.state_dict()
        arrays = {f"param/{k}": model.be.to_numpy(v) for k, v in model.trainable().items()}
        arrays.update({f"adam_{m}/{k}": state[f"{m}.{k}"] for k in opt.params for m in ("m", "v")})
        arrays.update({f"frozen/{k}": v for k, v in frozen_arrays(model).items()})
    arrays = group.broadcast_arrays(arrays)
    step, adam_step, history = group.broadcast_object(
        (trainer.step, opt.step_count, trainer.history) if group.is_main else None)
    if group.is_main:
        return
    for name, param in model.trainable().items():
        param[...] = model.be.asarray(arrays[f"param/{name}"].copy())
    opt.load_state_dict({"step": adam_step, **{f"{m}.{k}": arrays[f"adam_{m}/{k}"]
                                               for k in opt.params for m in ("m", "v")}})
    for name, value in arrays.items():
        if name.startswith("frozen/"):
            _set_frozen(model, name[len("frozen/"):], value)
    trainer.step, trainer.history = step, list(history)
