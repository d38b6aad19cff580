"""`minilars finetune`: fine-tune a model on a JSONL or text dataset, end to end.

    minilars finetune --model smollm2-135m --data my.jsonl --method lars --seq-len 512 --steps 200 --output out/

With no arguments it runs the built-in job: SmolLM2-135M-Instruct learns facts about
an invented person from minilars/data/personal_notes.jsonl with the default LARS
recipe, and prints its answers to held-out questions before and after.

Options come from, in rising priority: the defaults below, --quick (or MINILARS_QUICK=1),
a TOML file (--config), and the flags given on the command line.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from minilars.cli import CommandError
from minilars.methods.base import non_negative_int as _count
from minilars.methods.base import positive_int as _positive_int  # the methods' --rank reads the same

from minilars.pretrained import WEIGHT_FORMATS, WEIGHTS_HELP

from .common import BACKEND_HELP


def _size(text) -> int:
    """--max-memory: '1GiB', '512MiB', '2G', '1e9' -> bytes (minilars.units.parse_size)."""
    from minilars.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class Option:
    name: str  # the flag without dashes, underscores for dashes (also the TOML key)
    type: object  # str, int, float, bool or a converter
    default: object
    help: str
    choices: tuple | None = None
    quick: object = None  # the value under --quick, when it differs


# The defaults are the built-in job, measured to finish in under 10 minutes on a
# 2-core CPU (see minilars/data/README.md for the timing).
OPTIONS = (
    Option("model", str, "smollm2-135m", "a model name (smollm2-135m is SmolLM2-135M-Instruct, pulled on first "
           "use), a .gguf file, a Hugging Face model directory, or 'tiny' (random tiny preset with a character "
           "tokenizer, for tests)"),
    Option("data", str, None, "training data: a .jsonl file ({prompt, completion}, {messages}, {text} per line), "
           "a .txt file, or a directory of them (default: the built-in personal_notes.jsonl)"),
    # --method and the methods' own options (rank, alpha, targets, storage, ...) come from the
    # method registry: see all_options().
    Option("steps", _positive_int, 20, "optimizer steps", quick=3),
    Option("batch_size", _positive_int, 2, "rows per step", quick=1),
    Option("seq_len", _positive_int, 256, "tokens per row; longer examples are truncated, shorter ones packed "
           "or padded", quick=128),  # quick: half the work per step, for a slow board (docs/raspberry-pi.md)
    Option("packing", str, "pack", "pack: several whole examples per row; pad: one example per row",
           choices=("pack", "pad")),
    Option("lr", float, 4e-3, "peak learning rate (cosine decay to a tenth of it)"),
    Option("warmup", _count, 2, "steps of linear learning-rate warm-up", quick=0),
    Option("weight_decay", float, 0.0, "AdamW decoupled weight decay"),
    Option("seed", int, 0, "seed of the eval split, data order and adapter initialisation"),
    Option("calibration_rows", _count, 0, "LARS: rows its bases are calibrated on, padding left out "
           "(0: as many as a batch)"),
    Option("calibration_data", str, None, "LARS: calibrate the bases on this data file (formats as --data; "
           "every record, split marks ignored) instead of the training rows, e.g. text of the length the "
           "model will be used at"),
    Option("calibration_seq_len", _positive_int, None, "LARS: tokens per --calibration-data row (default: "
           "--seq-len)"),
    Option("backend", str, "auto", BACKEND_HELP,
           choices=("auto", "numpy", "numba", "torch")),
    Option("device", str, "cpu", "torch backend only: cpu or cuda"),
    Option("threads", _count, 0, "torch backend only: intra-op threads; 0 picks the cores that are idle at start "
           "(more threads than free cores slow every op down: 5x measured on 2 busy cores)"),
    Option("weights", str, "keep", WEIGHTS_HELP, choices=WEIGHT_FORMATS),
    Option("eval_fraction", float, 0.1, "share of the records held out for evaluation (ignored when the data "
           "file marks a split)"),
    Option("eval_samples", _count, 24, "held-out examples scored (eval loss and greedy answers) at each "
           "evaluation; 0 turns evaluation off", quick=2),
    Option("eval_every", _count, 0, "evaluate every N steps as well as before and after training (0: only "
           "before and after)"),
    Option("show", _count, 5, "held-out questions whose answers are printed before and after", quick=2),
    Option("max_new_tokens", _positive_int, 16, "longest generated answer when scoring"),
    Option("save_every", _count, 10, "write a checkpoint every N steps (also at the end and on Ctrl-C); 0: "
           "only then"),
    Option("max_memory", _size, None, "memory budget, e.g. 1GiB: refuse to start when the planner says the "
           "run needs more (default: the memory available when the command starts, MemAvailable)"),
    Option("init_adapter", str, None, "start from a saved adapter directory (its method and rank are used)"),
    Option("output", str, None, "output directory (default: runs/finetune-<date>-<time>)"),
    Option("resume", bool, False, "continue the run in --output from its last checkpoint"),
    Option("overwrite", bool, False, "start over in an --output that holds a run"),
    Option("merge", bool, False, "also export the merged model (adapter folded in) to OUTPUT/merged"),
    Option("quick", bool, False, "a short run for CI: a few steps, two held-out questions (also MINILARS_QUICK=1)"),
    Option("progress", bool, True, "show the progress bar (--no-progress to hide it)"),
)


def all_options() -> tuple[Option, ...]:
    """OPTIONS with --method and every registered method's options after --data."""
    from minilars.methods import DEFAULT_METHOD, method_class, method_options, registered

    names = registered(trains=True)
    method = Option("method", str, DEFAULT_METHOD, "what trains: " + ", ".join(
        f"{name} ({method_class(name).summary})" for name in names), choices=names)
    own = tuple(Option(o.name, o.type, o.default, o.help) for o in method_options(names))
    at = next(i for i, o in enumerate(OPTIONS) if o.name == "data") + 1
    return (*OPTIONS[:at], method, *own, *OPTIONS[at:])


def options_by_name() -> dict[str, Option]:
    return {o.name: o for o in all_options()}


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "finetune", help="fine-tune a model (LARS, LoRA, IA3, full); no arguments: the built-in demo job",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for o in all_options():
        flag = "--" + o.name.replace("_", "-")
        shown = "" if o.default in (None, False) else f" (default: {o.default}"
        if shown and o.quick is not None:
            shown += f"; --quick: {o.quick}"
        shown += ")" if shown else ""
        if o.type is bool:
            parser.add_argument(flag, dest=o.name, default=None, action=argparse.BooleanOptionalAction
                                if o.default else "store_true", help=o.help + shown)
        else:
            parser.add_argument(flag, dest=o.name, default=None, type=o.type, choices=o.choices,
                                metavar=o.name.upper() if o.choices is None else None, help=o.help + shown)
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="read options from a TOML file (keys as the flags, e.g. seq-len = 512); flags win")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------- options
def read_config_file(path: str) -> dict:
    """TOML keys -> option values, checked against OPTIONS."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise CommandError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML is UTF-8 text
        raise CommandError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise CommandError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    out = {}
    by_name = options_by_name()
    unknown = [k for k in raw if k.replace("-", "_") not in by_name]
    if unknown:
        raise CommandError(f"{path}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                           f"(known: {', '.join(o.replace('_', '-') for o in by_name)})")
    for key, value in raw.items():
        o = by_name[key.replace("-", "_")]
        if o.type is bool:
            if not isinstance(value, bool):
                raise CommandError(f"{path}: {key} must be true or false, got {value!r}")
        else:
            if isinstance(value, bool) or isinstance(value, (dict, list)):
                raise CommandError(f"{path}: {key} has an unusable value {value!r}")
            try:
                value = o.type(value) if o.type is not str else str(value)
            except (ValueError, TypeError, OverflowError, argparse.ArgumentTypeError) as exc:
                raise CommandError(f"{path}: {key} = {value!r}: {exc}") from None
            if o.choices and value not in o.choices:
                raise CommandError(f"{path}: {key} must be one of {', '.join(o.choices)}, got {value!r}")
        out[o.name] = value
    return out


def resolve_options(args) -> argparse.Namespace:
    """defaults < --quick < TOML < flags."""
    from_file = read_config_file(args.config) if args.config else {}
    options = all_options()
    given = {o.name: getattr(args, o.name) for o in options if getattr(args, o.name, None) is not None}
    quick = given.get("quick", from_file.get("quick", os.environ.get("MINILARS_QUICK", "") not in ("", "0")))
    values = {o.name: o.default for o in options}
    if quick:
        values.update({o.name: o.quick for o in options if o.quick is not None})
    values.update(from_file)
    values.update(given)
    values["quick"] = bool(quick)
    return argparse.Namespace(**values)


# ---------------------------------------------------------------- the job
def run(args) -> int:
    """The command; torch's process-wide thread count is put back afterwards. Under
    torchrun (WORLD_SIZE > 1) this process is one rank of a data-parallel run
    (minilars/distributed.py, docs/distributed.md)."""
    from minilars import distributed

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        with distributed.session() as group:
            return _run(args, group)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def _run(args, group=None) -> int:
    started = time.perf_counter()
    available = available_memory()  # before this process loads anything
    opts = resolve_options(args)
    _check_settings(opts)  # every setting that needs no model, before any work
    out = Path(opts.output) if opts.output else Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S")
    from minilars import distributed

    main = group is None or group.is_main  # rank 0 alone reads and writes --output, evaluates and prints
    local_batch = distributed.local_batch_size(group, opts.batch_size)  # a clear error when it does not divide
    if not main:
        return _run_owning(opts, out, started, available, group, local_batch)
    with _own_output(out):  # one run per output directory, for the run's whole life
        _check_output(out, opts)
        return _run_owning(opts, out, started, available, group, local_batch)


def _run_owning(opts, out: Path, started: float, available: int | None, group=None, local_batch: int = 0) -> int:
    from minilars import data as datasets
    from minilars import distributed, train

    main = group is None or group.is_main  # rank 0 alone reads and writes --output, evaluates and prints

    if opts.resume and opts.threads == 0 and main:  # the thread count can change float sums: keep the run's
        opts.threads = train.read_checkpoint_meta(out / train.CHECKPOINT).get("run_config", {}).get("threads") or 0

    if opts.calibration_data is not None and not _method_class(opts).needs_calibration:
        raise CommandError(f"--calibration-data calibrates LARS's bases; --method {opts.method} has none")
    model, tokenizer, model_name = _load_model(opts)
    cfg = model.cfg
    if opts.seq_len > cfg.max_seq_len:
        raise CommandError(f"--seq-len {opts.seq_len} is longer than the model's context ({cfg.max_seq_len} tokens)")
    if tokenizer is None:
        raise CommandError(f"{opts.model} has no tokenizer, so text cannot be turned into tokens")
    method = _method(opts)
    _check_rank(cfg, method, opts)
    _check_kept(model, method, opts)
    _check_budget(cfg, method, opts, model, available)  # before the data is read and tokenized
    dataset = datasets.load_dataset(opts.data, tokenizer, opts.eval_fraction, opts.seed,
                                    max_tokens=opts.seq_len + 2, eval_max_tokens=max(opts.seq_len, cfg.max_seq_len) + 2)
    pad_id = datasets.pad_id_of(tokenizer)
    rows = datasets.make_rows(dataset.train, opts.seq_len, pad_id, opts.packing, opts.seed)

    from minilars.optim import AdamW, AdamWConfig

    config = train.TrainConfig(steps=opts.steps, batch_size=opts.batch_size, seq_len=opts.seq_len, lr=opts.lr,
                               warmup=opts.warmup, seed=opts.seed)
    optimizer = AdamWConfig(lr=opts.lr, weight_decay=opts.weight_decay)
    calibration = _calibration_rows(opts, rows, tokenizer, cfg.max_seq_len)
    _prepare_model(model, method, opts, calibration.tokens, calibration.real, group)
    method = model.method
    from minilars.pretrained import return_freed_heap

    return_freed_heap()  # calibration's work arrays, freed: not resident while training

    from minilars.peft_io import model_fingerprint

    opt = AdamW(model.trainable(), model.be, optimizer)
    run_config = {  # everything that shapes the loss trajectory; its hash guards --resume
        "model": opts.model, "model_fingerprint": model_fingerprint(model), "method": method.describe(),
        "method_seed": method.seed, "init_adapter": opts.init_adapter, "data": dataset.source,
        "data_rows": rows.digest(), "packing": opts.packing, "backend": model.be.name,
        "threads": _threads(model.be), "weights": opts.weights, **config.__dict__,
        "weight_decay": optimizer.weight_decay, "max_grad_norm": optimizer.max_grad_norm}
    distributed.check_same_run(group, run_config)  # every machine read the same model and data
    eval_set = _eval_subset(dataset.eval, opts) if main else []
    stop_ids = datasets.stop_ids_of(tokenizer)

    def evaluate(step: int):
        return train.evaluate(model, tokenizer, eval_set, step, opts.seq_len, opts.batch_size, pad_id, stop_ids,
                              opts.max_new_tokens)

    trainer = train.Trainer(model, opt, rows, config, out, run_config, save_every=opts.save_every,
                            eval_every=opts.eval_every, evaluate_fn=evaluate if eval_set else None,
                            progress=opts.progress, group=group)
    if opts.resume and main:
        trainer.resume()  # CheckpointError when the configuration differs
    distributed.broadcast_state(group, trainer)  # the other ranks start from rank 0's state
    note = f"resuming at step {trainer.step} of {opts.steps}" if opts.resume else f"starting at step 0 of {opts.steps}"
    if group is not None:
        note += f"; {group.world_size} processes, {local_batch} row{'s' if local_batch > 1 else ''} each"
    expected = train.expected_activation_bytes(model, local_batch, opts.seq_len)
    _print_header(opts, model_name, model, method, dataset, rows, expected, out, note, calibration)

    if main:
        out.mkdir(parents=True, exist_ok=True)
    if not opts.resume and main:
        _clear_run_files(out)
    before = _history_eval(trainer.history, 0)
    if before is None and eval_set:
        print(f"evaluating {len(eval_set)} held-out examples before training ...", flush=True)
        t = time.perf_counter()
        before = evaluate(0)
        trainer.record_eval(before)
        print(f"before: {before.summary()} ({time.perf_counter() - t:.0f} s)", flush=True)

    try:
        losses = trainer.run()
    except train.TrainingDiverged as exc:
        raise CommandError(str(exc)) from None
    except train.TrainingInterrupted as exc:
        if main:
            print(f"minilars finetune: {exc.signal_name} after step {exc.step}; checkpoint written to "
                  f"{out / train.CHECKPOINT}; continue with the same options and --resume", file=sys.stderr)
        return 130
    if not main:
        return 0  # rank 0 evaluates and saves the result

    after = _history_eval(trainer.history, opts.steps)
    if after is None and eval_set:
        print(f"evaluating {len(eval_set)} held-out examples after training ...", flush=True)
        t = time.perf_counter()
        after = evaluate(opts.steps)
        trainer.record_eval(after)
        print(f"after: {after.summary()} ({time.perf_counter() - t:.0f} s)", flush=True)
    saved = _save_result(model, tokenizer, method, opts, out)
    wall = time.perf_counter() - started
    _report(before, after, opts.show, losses, trainer.peak_bytes, expected, wall)
    train.write_json_atomic(out / train.RESULT, {
        "finished": True, "steps": opts.steps, "losses": losses, "run_config": trainer.run_config,
        "config_hash": trainer.hash, "before": _as_dict(before), "after": _as_dict(after),
        "activation_bytes_expected": expected, "activation_bytes_peak": trainer.peak_bytes,
        "wall_seconds_this_session": wall, "saved": saved})
    (out / train.CHECKPOINT).unlink(missing_ok=True)  # the result replaces it
    _print_try_it(opts, out, saved)
    return 0


def _as_dict(result):
    from dataclasses import asdict

    return None if result is None else asdict(result)


def _history_eval(history: list[dict], step: int):
    """The evaluation recorded at `step` (a resumed run does not redo it)."""
    from minilars.train import Answer, EvalResult

    for entry in history:
        if "eval" in entry and entry["step"] == step:
            e = dict(entry["eval"])
            e["answers"] = [Answer(**a) for a in e.get("answers", [])]
            return EvalResult(step=step, **e)
    return None


def _eval_subset(examples, opts):
    """The first --eval-samples held-out examples in a seeded order (the same at every evaluation)."""
    import numpy as np

    order = np.random.default_rng([opts.seed, 0xE7A1]).permutation(len(examples))
    return [examples[i] for i in order[:opts.eval_samples]]


# ---------------------------------------------------------------- output directory
RUN_FILES = ("checkpoint.safetensors", "log.jsonl", "result.json", "adapter_config.json", "adapter_model.safetensors",
             "minilars_adapter.json")


@contextmanager
def _own_output(out: Path):
    """Hold the output directory's lock (minilars/files.py) while the run lives: a
    second run on it stops at once, naming this one's pid."""
    from minilars.files import DirectoryBusy, DirectoryLock

    if out.exists() and not out.is_dir():
        raise CommandError(f"--output {out} is a file, not a directory")
    try:
        lock = DirectoryLock(out, what="minilars finetune").acquire()
    except DirectoryBusy as exc:
        raise CommandError(str(exc)) from None
    try:
        yield lock
    finally:
        lock.release()


def _check_output(out: Path, opts) -> None:
    """Refuse to write over a finished run, or to start over an unfinished one, unless asked."""
    from minilars.train import CHECKPOINT, RESULT

    if opts.resume and opts.overwrite:
        raise CommandError("--resume and --overwrite contradict each other; choose one")
    finished = (out / RESULT).is_file()
    checkpoint = (out / CHECKPOINT).is_file()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--output {out} is a file, not a directory")
    if opts.resume:
        if finished:
            raise CommandError(f"{out} holds a finished run; nothing to resume")
        if not checkpoint:
            raise CommandError(f"{out} holds no checkpoint to resume ({CHECKPOINT} is missing)")
    elif not opts.overwrite:
        if finished:
            raise CommandError(f"{out} already holds a finished run; pass --overwrite to replace it or choose "
                               "another --output")
        if (out / "adapter_config.json").is_file() and not checkpoint:
            raise CommandError(f"{out} already holds an adapter; pass --overwrite to replace it or choose "
                               "another --output")
        if checkpoint:
            raise CommandError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to "
                               "start again")


def _clear_run_files(out: Path) -> None:
    """--overwrite: remove the files a previous run wrote (and nothing else)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    if (out / "merged").is_dir():
        shutil.rmtree(out / "merged")


# ---------------------------------------------------------------- model and method
def _backend(opts):
    """--backend/--device (auto: backends.default_backend_name, as in every command)."""
    from .common import backend_from_args

    try:
        backend = backend_from_args(opts)
    except ImportError as exc:
        raise CommandError(f"the {opts.backend} backend is not available here ({exc})") from None
    if backend.name == "torch":
        import torch

        from minilars.distributed import threads_per_process

        torch.set_num_threads(opts.threads or threads_per_process(idle_cores()))
    return backend


def idle_cores() -> int:
    """CPUs minus the one-minute load average (at least 1)."""
    count = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return count
    return max(1, min(count, count - int(load + 0.5)))


def _threads(backend) -> int | None:
    """torch's intra-op thread count (None for the other backends)."""
    if backend.name != "torch":
        return None
    import torch

    return torch.get_num_threads()


def _threads_text(backend) -> str:
    n = _threads(backend)
    return "" if n is None else f", {n} thread{'s' if n > 1 else ''}"


def _load_model(opts):
    """(Model, Tokenizer, a name to print)."""
    from minilars.pretrained import load_model

    model, tokenizer = load_model(opts.model, _backend(opts), opts.weights)
    name = {"tiny": "tiny (random weights, character tokenizer)",
            "smollm2-135m": "smollm2-135m (SmolLM2-135M-Instruct)"}.get(opts.model, opts.model)
    return model, tokenizer, name


def _method_class(opts):
    from minilars.methods import method_class

    return method_class(opts.method)


def _method(opts):
    """The MethodConfig of --method from the options it reads (minilars/methods/<name>.py)."""
    from minilars.methods import MethodConfig

    return MethodConfig.from_options(opts.method, vars(opts), seed=opts.seed)


def _calibration_rows(opts, rows, tokenizer, max_seq_len: int):
    """The rows LARS calibrates on: the first --calibration-rows (default: a batch's
    worth) that the sampler draws from the training rows (step 0's batch), or from
    --calibration-data's rows of --calibration-seq-len tokens. Rows.real keeps padding
    out of the bases."""
    from minilars import data as datasets

    n = opts.calibration_rows or opts.batch_size
    if opts.calibration_data is None:
        return datasets.first_rows(rows, n, opts.seed)
    seq_len = opts.calibration_seq_len or opts.seq_len
    if seq_len > max_seq_len:
        raise CommandError(f"--calibration-seq-len {seq_len} is longer than the model's context "
                           f"({max_seq_len} tokens)")
    return datasets.calibration_rows(opts.calibration_data, tokenizer, seq_len, n, opts.seed, opts.packing)


def _prepare_model(model, method, opts, calibration, calibration_mask, group=None) -> None:
    """Apply the method (LARS calibrates on `calibration`, the first batch, at the
    positions `calibration_mask` keeps; in a data-parallel run on rank 0 only) or load
    --init-adapter."""
    from minilars.distributed import apply_method

    if opts.init_adapter:
        from minilars.peft_io import load_adapter

        load_adapter(model, opts.init_adapter)  # AdapterError for another base model
        return
    apply_method(group, model, method, calibration, calibration_mask)  # only LARS reads the calibration


def _check_kept(model, method, opts) -> None:
    """A method that trains the weights themselves cannot train blocks: say what to pass."""
    if not opts.init_adapter and method.kind.trains_embeddings:
        from minilars.backends.base import is_quantized

        if any(is_quantized(p) for p in model.params.values()):
            raise CommandError(f"--method {opts.method} trains every weight, and --weights {opts.weights} keeps "
                               "them as GGUF blocks, which do not train; pass --weights float32 (or float16), or "
                               "train an adapter over the blocks (--method lars, lora or ia3)")


def _check_budget(cfg, method, opts, model, available: int | None) -> None:
    """Ask the planner before training: stop when the planned peak exceeds --max-memory,
    or, without it, the memory this machine had available when the command started."""
    from minilars.planner import check_budget, format_size
    from minilars.pretrained import weight_format_of

    budget = opts.max_memory if opts.max_memory is not None else available
    if budget is None:
        return  # neither given nor known: nothing to compare with
    try:
        check_budget(cfg, method, opts.seq_len, opts.batch_size, weight_format_of(model), budget,
                     backend_name=model.be.name)
    except ValueError as exc:  # the planned peak, and what would fit
        where = ("--max-memory" if opts.max_memory is not None else
                 f"the memory available on this machine ({format_size(available)}; --max-memory sets another "
                 "budget)")
        raise CommandError(f"not starting: {exc} The budget is {where}.") from None


def available_memory() -> int | None:
    """Bytes this machine can give a new process: MemAvailable from /proc/meminfo
    (Linux), else free pages x page size; None when neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------- settings checked before any work
def _check_settings(opts) -> None:
    """CommandError for a setting that cannot work, found before anything is loaded:
    storage rules naming fields that do not exist, targets that do not exist, and
    another method's option set away from its default (it would do nothing)."""
    if opts.targets is not None:
        from minilars.methods import ALL_PROJECTIONS

        targets = [t.strip() for t in opts.targets.split(",")]
        unknown = [t for t in targets if t not in ALL_PROJECTIONS]
        if unknown:
            raise CommandError(f"--targets {opts.targets!r}: unknown target {unknown[0]!r}; projections are "
                               f"{', '.join(ALL_PROJECTIONS)}")
    if _method_class(opts).reads("storage"):
        from minilars.methods import parse_storage

        try:
            rules = parse_storage(opts.storage)
        except ValueError as exc:
            raise CommandError(f"--storage {opts.storage!r}: {exc}") from None
        fields = storage_fields()
        unknown = [key for key, _ in rules if key not in fields]
        if unknown:
            raise CommandError(f"--storage {opts.storage!r}: no kept field is called {unknown[0]!r}; fields are "
                               f"{', '.join(sorted(fields))} (or a named recipe: default, fast, offload, exact)")
        from minilars.offload import offload_directory
        from minilars.store import Offload, parse_policy

        for key, text in rules:  # before calibration, not at the first step
            policy = parse_policy(text)
            if isinstance(policy, Offload):
                try:
                    offload_directory(policy.directory)
                except ValueError as exc:
                    raise CommandError(f"--storage {opts.storage!r}: {exc}") from None
    elif opts.storage != options_by_name()["storage"].default:
        raise CommandError(f"--storage sets LARS's activation storage; --method {opts.method} has none")
    from minilars.methods import method_class, method_options, registered

    kind = _method_class(opts)
    for option in method_options():
        value = getattr(opts, option.name)
        if not kind.reads(option.name) and value != option.default:
            readers = [name for name in registered() if method_class(name).reads(option.name)]
            raise CommandError(f"--{option.name.replace('_', '-')} {value} is an option of "
                               f"{', '.join(readers)}; --method {opts.method} does not read it")


def storage_fields() -> set[str]:
    """The keys a LARS storage rule may name: every field a training step keeps
    (site kind . cache field, read from the cache dataclasses), each kind's wildcard
    'kind.*', 'block' (recompute) and '*'."""
    from dataclasses import fields

    from minilars.adapters import LARSCache
    from minilars.model import BlockInput
    from minilars.ops import AttentionCache, CrossEntropyCache, EmbeddingCache, RMSNormCache, SwiGLUCache

    caches = {"embed": EmbeddingCache, "input": BlockInput, "attn_norm": RMSNormCache, "attn": AttentionCache,
              "mlp_norm": RMSNormCache, "mlp": SwiGLUCache, "final_norm": RMSNormCache, "head": CrossEntropyCache,
              **{stream: LARSCache for stream in ("attn_in", "attn_out", "mlp_in", "mlp_out")}}
    keys = {"block", "*"}
    for kind, cache in caches.items():
        keys |= {f"{kind}.*", *(f"{kind}.{f.name}" for f in fields(cache))}
    return keys


def _check_rank(cfg, method, opts) -> None:
    """A rank above the width it is a rank of cannot be used (the method's rank_limit:
    LARS's basis spans at most the stream's width d_in, LoRA's A B at most
    min(d_in, d_out) of its projection)."""
    if opts.init_adapter or method.kind.rank_limit(1, 1) is None:
        return
    from minilars.weights import PROJECTION_STREAM, stream_inputs, stream_outputs

    ins, outs = stream_inputs(cfg), stream_outputs(cfg)
    limits = {}
    for target in method.resolved_targets:
        stream = PROJECTION_STREAM[target]
        limit, what = method.kind.rank_limit(ins[stream], outs[stream][target])
        limits[target] = (limit, what.format(target=target, stream=stream))
    target = min(limits, key=lambda t: limits[t][0])
    limit, what = limits[target]
    if method.rank > limit:
        raise CommandError(f"--rank {method.rank} is above {what} ({limit}); the largest rank "
                           f"{opts.method} can use on these targets of this model is {limit}")


def _planned_peak(cfg, method, opts, model) -> str:
    """The planner's whole-step peak, for the start report."""
    try:
        from minilars.planner import format_size, plan_memory
    except ImportError:
        return "the planner (minilars.planner) is not installed"
    try:
        from minilars.pretrained import weight_format_of

        plan = plan_memory(cfg, method, opts.seq_len, opts.batch_size, weight_format_of(model), model.be.name)
    except ValueError as exc:
        return f"the planner cannot plan this run ({exc})"
    return f"{format_size(plan.total)} planned peak for the whole step (weights, optimizer, activations, work)"


# ---------------------------------------------------------------- printing
def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_header(opts, model_name, model, method, dataset, rows, expected, out, note, calibration) -> None:
    from minilars.pretrained import weight_summary

    cfg = model.cfg
    total, trainable = model.n_params(), model.n_trainable()
    tokens = rows.targets.size
    labelled = int((rows.targets != -100).sum())
    lines = [
        ("model", f"{model_name}: {cfg.n_layers} layers, d {cfg.dim}, vocab {cfg.vocab_size}, "
                  f"context {cfg.max_seq_len}"),
        ("backend", f"{model.be.name}{_threads_text(model.be)}, weights {weight_summary(model)}"),
        ("method", method.describe() + (f" (from {opts.init_adapter})" if opts.init_adapter else "")),
        ("parameters", f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)"),
        ("data", dataset.describe()),
        ("rows", f"{len(rows)} rows of {opts.seq_len} tokens ({opts.packing}), {labelled:,} of {tokens:,} "
                 f"targets labelled" + (f"; {rows.truncated} examples truncated" if rows.truncated else "")
                 + (f"; {rows.dropped} dropped (no answer token within --seq-len)" if rows.dropped else "")),
        *([("calibration", f"{len(calibration)} rows of {calibration.tokens.shape[1]} tokens from "
                           f"{opts.calibration_data or 'the training rows'}, {int(calibration.real.sum()):,} "
                           f"tokens without padding")] if method.kind.needs_calibration and not opts.init_adapter
          else []),
        ("activations", f"{_mib(expected)} expected in the activation store per step "
                        f"(batch {opts.batch_size} x {opts.seq_len} tokens)"),
        ("memory", _planned_peak(cfg, method, opts, model)),
        ("training", f"{opts.steps} step{'s' if opts.steps != 1 else ''}, lr {opts.lr:g} "
                     f"(warm-up {opts.warmup}, cosine), seed {opts.seed}; "
                     f"{note}" + (" [quick]" if opts.quick else "")),
        ("output", str(out)),
    ]
    print("minilars finetune")
    for key, value in lines:
        print(f"  {key:12s}{value}")
    sys.stdout.flush()


def _report(before, after, show, losses, peak, expected, wall) -> None:
    if losses:
        head = sum(losses[:3]) / len(losses[:3])
        tail = sum(losses[-3:]) / len(losses[-3:])
        print(f"training loss: {head:.4f} (first steps) -> {tail:.4f} (last steps); activation store peak "
              f"{_mib(peak)} (expected {_mib(expected)})")
    if before is not None and after is not None and before.answers:
        print("held-out answers (greedy), before -> after training:")
        for b, a in list(zip(before.answers, after.answers))[:show]:
            print(f"  Q: {b.question}")
            print(f"     reference: {b.reference}")
            print(f"     before:    {b.output!r}{_marks(b)}")
            print(f"     after:     {a.output!r}{_marks(a)}")
    if before is not None and after is not None:
        print(f"held-out, before: {before.summary()}")
        print(f"held-out, after:  {after.summary()}")
    print(f"wall time {wall:.0f} s")


def _marks(answer) -> str:
    return "  [exact]" if answer.exact else "  [contains answer]" if answer.contains else ""


def _save_result(model, tokenizer, method, opts, out: Path) -> dict:
    from minilars.peft_io import export_merged, save_adapter

    saved = {}
    if model.method is not None and model.method.kind.saves_adapter:
        save_adapter(model, out)
        saved["adapter"] = str(out)
    if opts.merge or model.method is None or model.method.kind.saves_merged:
        export_merged(model, out / "merged", tokenizer=tokenizer)
        saved["merged"] = str(out / "merged")
    return saved


def _print_try_it(opts, out: Path, saved: dict) -> None:
    if opts.model == "tiny":
        print(f"saved {', '.join(saved.values())}")
        return
    model = "" if opts.model == "smollm2-135m" else f" --model {opts.model}"
    if "adapter" in saved:
        print(f"saved the adapter to {out}; try it: minilars generate{model} --adapter {out} \"your question\"")
    if "merged" in saved:
        print(f"saved merged weights to {saved['merged']}; try them: minilars generate --model {saved['merged']} "
              "\"your question\"")
