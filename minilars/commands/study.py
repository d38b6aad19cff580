"""`minilars study`: the accuracy study (docs/accuracy.md says how to run and read it).

    minilars study make-tasks --out tasks/            # seeded train / held-out JSONL (minilars/tasks.py)
    minilars study accuracy --out study/              # every task x method, with an lr sweep
    minilars study accuracy --quick --out /tmp/s      # smoke run: tiny preset, 2 steps, 1 lr, 4 questions
    minilars study compare A/eval.jsonl B/eval.jsonl  # two runs, question by question (McNemar)
    minilars study compare A0 B0 A1 B1 --group-by tokens  # pooled over two seeds, and per passkey length
    minilars study accuracy --jobs 2 --out study/    # two processes at a time

`accuracy` trains each method on each task with the same step budget and batch,
every training run a fresh `minilars finetune` process (so its peak RSS, the
process's VmHWM, is its own), after a learning-rate sweep on a shorter budget
that picks the lr with the lowest held-out loss. Then `minilars eval`, a fresh
process too, scores the held-out questions with the trained adapter (or merged weights for
full fine-tuning). The held-out accuracy before training is that of the base
model, which every method starts from exactly (LoRA B = 0, IA3 scales 1, LARS M = 0).

Outputs in --out: results.md and results.csv (one row per task and method),
accuracy_vs_step.png, study.json (everything, including each run's command),
runs/<task>/<method>/lr-<lr>[-sweep]/ (finetune output, finetune.log, eval.jsonl).

What costs less: the base model's rows come from the score cache when this model,
question set, scoring settings and engine source were scored before
(minilars/score_cache.py; --rescore-base scores again), and --jobs N runs the
independent processes N at a time (minilars/commands/jobs.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from minilars.cli import CommandError
from minilars.methods import study_runs

from .common import comma_separated
from .jobs import Jobs

# name -> StudyRun(finetune flags, lr grid, method class), from each registered method
# (its study_lrs and study_runs, minilars/methods/). The grids bracket each method's
# usual range: full fine-tuning moves every weight and wants ~100x smaller steps than adapters.
METHODS = study_runs()
MAX_NEW_TOKENS = {"personal": 24, "passkey": 16, "arithmetic": 64}
_jobs = Jobs(1)  # the processes of the study in flight; run_accuracy gives it --jobs slots
_print_lock = threading.Lock()


def add_parser(sub) -> None:
    parser = sub.add_parser("study", help="task generators and the accuracy study (full, LoRA, IA3, LARS)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="study", metavar="STUDY")

    make = actions.add_parser("make-tasks", help="write the seeded train / held-out JSONL of every task")
    make.add_argument("--out", required=True,
                      help="directory; gets <task>/train.jsonl, <task>/heldout.jsonl and tasks.json")
    make.add_argument("--tasks", default="personal,passkey,arithmetic", help="comma-separated (default: %(default)s)")
    make.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    make.add_argument("--tokenizer", default=None, metavar="MODEL",
                      help="count passkey lengths with this model's tokenizer (e.g. smollm2-135m); default: "
                           "characters / 4.44, the SmolLM2 ratio")
    make.add_argument("--quick", action="store_true", help="small sets with passkey T = 128, 192 (smoke tests)")
    from minilars.tasks import TaskSizes

    sizes = TaskSizes()
    make.add_argument("--passkey-train-T", type=int, default=None, metavar="T",
                      help=f"tokens of each passkey training row (default: {sizes.passkey_train_T})")
    make.add_argument("--passkey-heldout-T", default=None, metavar="T,T,...",
                      help=f"held-out passkey lengths (default: {','.join(map(str, sizes.passkey_heldout_T))}); "
                           "long-context training: --passkey-train-T 4096 --passkey-heldout-T 4096,8192")
    make.add_argument("--passkey-train", type=int, default=None, metavar="N",
                      help=f"passkey training examples (default: {sizes.passkey_train})")
    make.add_argument("--passkey-heldout", type=int, default=None, metavar="N",
                      help=f"held-out passkey examples per length (default: {sizes.passkey_heldout})")
    make.set_defaults(func=run_make_tasks)

    cmp = actions.add_parser("compare", help="two eval outputs on the same questions, question by question")
    cmp.add_argument("a", help="eval.jsonl of run A (minilars eval --out, or a study run's eval.jsonl)")
    cmp.add_argument("b", help="eval.jsonl of run B, the same questions in the same order")
    cmp.add_argument("more", nargs="*", metavar="A B",
                     help="more pairs of runs, pooled with the first (e.g. one pair per seed: the counts add up)")
    cmp.add_argument("--group-by", default=None, metavar="FIELD",
                     help="also compare within each value of a record field (e.g. tokens: each passkey length)")
    cmp.set_defaults(func=run_compare)

    acc = actions.add_parser("accuracy", help="train every method on every task, held-out accuracy before/after",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    acc.add_argument("--out", required=True, help="output directory")
    acc.add_argument("--model", default=None, help="model to fine-tune (default: smollm2-135m; --quick: tiny)")
    acc.add_argument("--backend", default="numpy", choices=("auto", "numpy", "numba", "torch"),
                     help="kernel backend of every process (default: %(default)s: on one free core of a 2-core CPU "
                          "it decoded 2x faster than torch and trained as fast; use torch --device cuda on a GPU)")
    acc.add_argument("--device", default="cpu", help="torch backend only: cpu or cuda (default: %(default)s)")
    from .common import add_weights_option

    # float32 by default: every method (full included, which cannot train blocks) starts from the same weights
    add_weights_option(acc, default="float32")
    acc.add_argument("--threads", type=int, default=0,
                     help="BLAS / torch threads per process (0: the cores idle at start, shared out over --jobs; "
                          "more threads than free cores made greedy decoding 8x slower on a loaded 2-core machine)")
    acc.add_argument("--jobs", type=int, default=1,
                     help="training and scoring processes run at once (default: %(default)s): the lr sweep's runs, "
                          "the seeds' final runs, the methods and the base model's scoring are independent")
    acc.add_argument("--tasks", default="personal,passkey,arithmetic", help="comma-separated (default: %(default)s)")
    acc.add_argument("--methods", default=",".join(METHODS),
                     help=f"comma-separated from {', '.join(METHODS)} (default: all)")
    acc.add_argument("--tasks-dir", default=None, help="task files written by make-tasks (default: write them "
                     "into OUT/tasks, passkey lengths counted with the model's tokenizer)")
    acc.add_argument("--steps", type=int, default=None, help="optimizer steps of every final run (default: 100; "
                     "--quick: 2)")
    acc.add_argument("--batch-size", type=int, default=None, help="examples per step, one per row (default: 8; "
                     "--quick: 2)")
    grids: dict[str, list[str]] = {}  # lr grid -> the study runs that sweep it
    for name, run in METHODS.items():
        grids.setdefault(",".join(_lr_text(lr) for lr in run.lrs), []).append(name)
    defaults = "; ".join(f"{', '.join(names)} {grid}" for grid, names in grids.items())
    acc.add_argument("--lrs", default=None, help="comma-separated learning rates swept for every method "
                     f"(default per method: {defaults}; --quick: the middle one)")
    acc.add_argument("--sweep-steps", type=int, default=None, help="steps of each sweep run (default: steps / 4; "
                     "equal to --steps: the best sweep run is the final run)")
    acc.add_argument("--eval-questions", type=int, default=None, help="held-out questions scored after training, "
                     "per passkey length (default: all; --quick: 4)")
    acc.add_argument("--curve-questions", type=int, default=None, help="held-out questions scored during "
                     "training for the accuracy-vs-step curve and the lr choice (default: 16; --quick: 4; 0: none, "
                     "the sweep then picks by training loss)")
    acc.add_argument("--eval-every", type=int, default=None, help="curve points every N steps, besides before and "
                     "after (default: steps / 5; --quick: 0, before and after only)")
    acc.add_argument("--max-new-tokens", type=int, default=None,
                     help="longest generated answer (default per task: personal 24, passkey 16, arithmetic 64)")
    acc.add_argument("--seed", type=int, default=0,
                     help="seed of tasks, data order and adapters (default: %(default)s)")
    acc.add_argument("--seeds", default=None, metavar="S,S,...",
                     help="training seeds: every method's final run is repeated with each (the order of the "
                          "training rows, the adapter's initialisation, LARS's calibration rows) and the table "
                          "gives the mean accuracy and each seed's; the lr sweep uses the first, the task files "
                          "--seed (default: --seed alone)")
    acc.add_argument("--rescore-base", action="store_true", help="score the base model again even when the "
                     "score cache holds its rows for this model, question set, scoring settings and engine "
                     "source (minilars/score_cache.py)")
    acc.add_argument("--keep-weights", action="store_true", help="keep the merged weights full fine-tuning exports "
                     "(deleted after scoring otherwise: 540 MB each for SmolLM2-135M)")
    acc.add_argument("--quick", action="store_true", help="smoke mode: tiny preset (unless --model), 2 steps, "
                     "batch 2, 1 lr, 4 questions, small task files")
    acc.set_defaults(func=run_accuracy)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _names(text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise CommandError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


# ---------------------------------------------------------------- compare
def run_compare(args) -> int:
    """Right answers of each run, the questions only one of them got right, and the
    exact McNemar p-value, for every metric both files score; with more pairs, over
    all their questions together; with --group-by, also within each value of the field."""
    from minilars.evaluate import paired, read_rows

    files = [args.a, args.b, *args.more]
    if len(files) % 2:
        print(f"study compare: give the files in pairs, A B [A B ...]; got {len(files)}", file=sys.stderr)
        return 2
    try:
        rows_a = [row for path in files[0::2] for row in read_rows(path)]
        rows_b = [row for path in files[1::2] for row in read_rows(path)]
        groups = [("", rows_a, rows_b)]
        if args.group_by:
            values = sorted({r[args.group_by] for r in rows_a if args.group_by in r})
            if not values:
                raise KeyError(f"no row of {args.a} has the field {args.group_by!r}")
            for value in values:  # pairs whose A row has the value; "all" above checks A and B pair up
                kept = [(a, b) for a, b in zip(rows_a, rows_b) if a.get(args.group_by) == value]
                groups.append((f"{args.group_by} = {value}, ", [a for a, _ in kept], [b for _, b in kept]))
        for label, a, b in groups:
            for metric in ("contains", "exact", "number"):
                result = paired(a, b, metric)
                if result.n:
                    print(label + result.text())
    except (ValueError, KeyError) as e:
        print(f"study compare: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- make-tasks
def run_make_tasks(args) -> int:
    from minilars import tasks

    names = _names(args.tasks, tasks.TASKS, "task")
    count, label = None, None
    if args.tokenizer:
        count, label = _token_counter(args.tokenizer)
    sizes = _passkey_sizes(tasks.TaskSizes.quick() if args.quick else tasks.TaskSizes(), args)
    manifest = tasks.write_tasks(args.out, tuple(names), args.seed, sizes, count, label)
    for task, counts in manifest["tasks"].items():
        print(f"{args.out}/{task}: {counts['train']} train, {counts['heldout']} held-out records")
    print(f"passkey lengths counted with {manifest['lengths_counted_with']}")
    return 0


def _passkey_sizes(sizes, args):
    """sizes with the passkey lengths and counts the make-tasks flags give."""
    changes = {}
    for flag in ("passkey_train_T", "passkey_train", "passkey_heldout"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise CommandError(f"--{flag.replace('_', '-')} must be >= 1")
            changes[flag] = value
    if args.passkey_heldout_T is not None:
        lengths = _numbers("--passkey-heldout-T", args.passkey_heldout_T, int, "4096,8192")
        if not lengths or min(lengths) < 1:
            raise CommandError(f"--passkey-heldout-T {args.passkey_heldout_T!r}: give one or more lengths >= 1")
        changes["passkey_heldout_T"] = lengths
    return replace(sizes, **changes)


def _token_counter(model: str):
    from minilars.evaluate import load_tokenizer

    tokenizer = load_tokenizer(model)
    return (lambda text: len(tokenizer.encode(text))), f"the {model} tokenizer"


# ---------------------------------------------------------------- accuracy
@dataclass
class Settings:
    model: str
    backend: str
    device: str
    threads: int
    tasks: list[str]
    methods: list[str]
    steps: int
    batch_size: int
    lrs: dict[str, tuple[float, ...]]
    sweep_steps: int
    eval_questions: int | None
    curve_questions: int
    eval_every: int
    max_new_tokens: int | None
    seed: int
    quick: bool
    seeds: tuple[int, ...] = ()  # training seeds of the final runs; () means (seed,)
    weights: str = "float32"  # --weights of every finetune and eval process
    jobs: int = 1  # processes at once (Jobs)

    @property
    def train_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)


def _numbers(flag: str, text: str, kind: type, example: str) -> tuple:
    """A comma-separated list of kind given to `flag` (commands.common.comma_separated),
    its error a CommandError that names the flag and shows the example."""
    try:
        return tuple(comma_separated(kind, example)(text))
    except argparse.ArgumentTypeError as e:
        raise CommandError(f"{flag} {e}") from None


def _seeds(text: str | None) -> tuple[int, ...]:
    if text is None:
        return ()
    seeds = _numbers("--seeds", text, int, "0,1,2")
    if not seeds or len(set(seeds)) != len(seeds):
        raise CommandError(f"--seeds {text!r}: give one or more different seeds")
    return seeds


def _lr_text(lr: float) -> str:
    """3e-4 -> '3e-4' (where f'{lr:g}' gives 0.0003)."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def settings_from(args) -> Settings:
    from minilars import tasks

    quick = args.quick
    steps = args.steps if args.steps is not None else (2 if quick else 100)
    if steps < 1:
        raise CommandError("--steps must be >= 1")
    methods = _names(args.methods, METHODS, "method")
    if args.lrs:
        grid = _numbers("--lrs", args.lrs, float, "1e-3,3e-3")
        lrs = {m: grid for m in methods}
    else:
        lrs = {m: (METHODS[m][1][1],) if quick else METHODS[m][1] for m in methods}
    sweep = args.sweep_steps if args.sweep_steps is not None else max(1, steps // 4)
    if not 1 <= sweep <= steps:
        raise CommandError(f"--sweep-steps must be in [1, --steps], got {sweep}")
    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        raise CommandError("--jobs must be >= 1")
    for flag in ("threads", "eval_questions", "curve_questions", "eval_every"):
        if (getattr(args, flag) or 0) < 0:
            raise CommandError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.eval_questions == 0:
        raise CommandError("--eval-questions must be >= 1 (leave it out to score every held-out question)")
    from .finetune import idle_cores

    return Settings(
        model=args.model or ("tiny" if quick else "smollm2-135m"),
        backend=args.backend, device=args.device, threads=args.threads or max(1, idle_cores() // jobs),
        tasks=_names(args.tasks, tasks.TASKS, "task"), methods=methods, steps=steps,
        batch_size=args.batch_size or (2 if quick else 8), lrs=lrs, sweep_steps=sweep,
        eval_questions=args.eval_questions if args.eval_questions is not None else (4 if quick else None),
        curve_questions=args.curve_questions if args.curve_questions is not None else (4 if quick else 16),
        eval_every=args.eval_every if args.eval_every is not None else (0 if quick else max(1, steps // 5)),
        max_new_tokens=args.max_new_tokens or (8 if quick else None),
        seed=args.seed, quick=quick, seeds=_seeds(getattr(args, "seeds", None)),
        weights=getattr(args, "weights", "float32"), jobs=jobs)


@dataclass
class Run:
    """One `minilars finetune` process."""

    task: str
    method: str
    lr: float
    steps: int
    role: str  # "sweep" or "final"
    out: str
    command: list[str]
    returncode: int | None = None
    wall_s: float | None = None
    peak_rss_mib: float | None = None  # peak resident set of the finetune process (VmHWM)
    final_train_loss: float | None = None
    eval_loss: float | None = None  # held-out loss after training (curve questions)
    s_per_step: float | None = None  # median over steps, from log.jsonl
    curve: list[dict] = field(default_factory=list)  # [{step, loss, exact, contains}]
    error: str | None = None
    seed: int | None = None  # training seed

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_accuracy(args) -> int:
    """The study; SIGTERM stops it like Ctrl-C, so the training process in flight is ended too."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run_accuracy(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_accuracy(args) -> int:
    s = settings_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    task_dir = Path(args.tasks_dir) if args.tasks_dir else out / "tasks"
    if not args.tasks_dir:
        from minilars import tasks

        count, label = _token_counter(s.model)
        sizes = tasks.TaskSizes.quick() if s.quick else tasks.TaskSizes()
        tasks.write_tasks(task_dir, tuple(s.tasks), s.seed, sizes, count, label)
        print(f"wrote task files to {task_dir} (lengths counted with {label})", flush=True)
    n_runs = sum(runs_per_method(s, m) for m in s.methods) * len(s.tasks)
    print(f"study: {len(s.tasks)} tasks x {len(s.methods)} methods, {s.steps} steps of batch {s.batch_size}, "
          f"model {s.model}, {s.threads} thread{'s' if s.threads > 1 else ''} per process; {n_runs} training runs",
          flush=True)
    rows, runs = [], []
    counter = [0, n_runs]
    global _jobs
    _jobs = Jobs(s.jobs)
    try:
        for task in s.tasks:
            prepared = prepare_task(task, task_dir, out / "runs" / task, s)
            base = _jobs.start(score_base, s, prepared, out / "runs" / task / "base.jsonl", args.rescore_base)
            done: dict[str, tuple[dict, list[Run]]] = {}

            def method_row(method: str) -> None:
                row_and_runs = study_method(s, prepared, method, base.result, out, counter, args.keep_weights)
                with _print_lock:  # the rows so far, in --methods order, written as each method ends
                    done[method] = row_and_runs
                    finished = [done[m] for m in s.methods if m in done]
                    write_outputs(out, s, rows + [r for r, _ in finished], runs + [x for _, rs in finished for x in rs],
                                  time.perf_counter() - started)

            _jobs.map(method_row, s.methods)
            base.result()
            rows += [done[m][0] for m in s.methods]
            runs += [r for m in s.methods for r in done[m][1]]
    finally:  # an interrupt anywhere (the base model's wait included) ends every process in flight
        _jobs.stop()
        _jobs = Jobs(1)
    write_outputs(out, s, rows, runs, time.perf_counter() - started)
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'accuracy_vs_step.png'} "
          f"({time.perf_counter() - started:.0f} s)")
    print((out / "results.md").read_text())
    return 0


def runs_per_method(s: Settings, method: str) -> int:
    """Training runs for one method on one task: the sweep, then the final run unless
    the sweep already ran the full budget, then the final run for every other seed."""
    grid = len(s.lrs[method])
    repeats = len(s.train_seeds) - 1  # the final run again with every other seed
    if grid == 1:
        return 1 + repeats
    return grid + (s.sweep_steps != s.steps) + repeats


@dataclass
class Prepared:
    task: str
    train_file: Path  # train + held-out at the training length, splits marked (finetune --data)
    heldout_file: Path  # the held-out questions scored after training
    seq_len: int
    max_new_tokens: int
    group_by: str | None  # "tokens" for passkey


def prepare_task(task: str, task_dir: Path, run_dir: Path, s: Settings) -> Prepared:
    """The finetune data file, the held-out subset, and a row length every example fits."""
    from minilars import data as datasets
    from minilars.evaluate import load_tokenizer
    from minilars.tasks import read_jsonl, write_jsonl

    if not (task_dir / task / "train.jsonl").is_file():
        raise CommandError(f"{task_dir / task}/train.jsonl is missing; "
                           f"run `minilars study make-tasks --out {task_dir}`")
    train = read_jsonl(task_dir / task / "train.jsonl")
    held = read_jsonl(task_dir / task / "heldout.jsonl")
    group_by = "tokens" if task == "passkey" else None
    train_T = train[0].get("tokens") if group_by else None
    in_training_eval = [r for r in held if r.get("tokens") == train_T] if group_by else held
    subset = []
    for value in _sorted({r.get(group_by) for r in held}) if group_by else [None]:
        group = [r for r in held if group_by is None or r.get(group_by) == value]
        subset += group[:s.eval_questions]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(run_dir / "finetune.jsonl", [{**r, "split": "train"} for r in train]
                + [{**r, "split": "eval"} for r in in_training_eval])
    write_jsonl(run_dir / "heldout.jsonl", subset)
    tokenizer = load_tokenizer(s.model)
    longest = max(len(datasets.tokenize(datasets.parse_record(r, task), tokenizer).ids)
                  for r in train + in_training_eval)
    seq_len = 16 * math.ceil(longest / 16)
    if s.model == "tiny":
        from minilars.config import preset

        seq_len = min(seq_len, preset("tiny").max_seq_len)
    return Prepared(task, run_dir / "finetune.jsonl", run_dir / "heldout.jsonl", seq_len,
                    s.max_new_tokens or MAX_NEW_TOKENS[task], group_by)


def _sorted(values) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types
        return sorted(values, key=str)


def study_method(s: Settings, p: Prepared, method: str, base, out: Path, counter, keep_weights: bool):
    """Sweep the lr grid (first training seed), train the final run with every
    training seed, score each; one results row (means over the seeds). base: the
    base model's scores, or a function that waits for them (scored alongside).
    The sweep's runs, and the seeds' train-then-score chains, run as jobs (_jobs)."""
    grid = s.lrs[method]
    runs: list[Run] = []
    if len(grid) > 1:
        sweep = _jobs.map(lambda lr: train_run(s, p, method, lr, s.sweep_steps, "sweep", out, counter), grid)
        runs += sweep
        for r in sweep:
            if METHODS[method].method.saves_merged and not keep_weights:
                shutil.rmtree(Path(r.out) / "merged", ignore_errors=True)
        good = [r for r in sweep if r.ok]
        if not good:
            return _row(s, p, method, None, _ready(base), None, "every lr of the sweep failed"), runs
        key = (lambda r: r.eval_loss) if all(r.eval_loss is not None for r in good) else (lambda r: r.final_train_loss)
        best = min(good, key=key)
        final = best if s.sweep_steps == s.steps else None
        chosen = best.lr
    else:
        final, chosen = None, grid[0]
    seeds = s.train_seeds
    if final is not None:
        final.role = "final"

    def train_and_score(seed: int) -> tuple[Run, dict | None]:
        with _jobs.chain():  # a seed's scoring goes before the next seed's training
            run = final if final is not None and seed == seeds[0] else \
                train_run(s, p, method, chosen, s.steps, "final", out, counter, seed=seed)
            if not run.ok:
                return run, None
            weights = Path(run.out) / "merged" if METHODS[method].method.saves_merged else None
            after = evaluate_run(s, p, run, Path(run.out) / "eval.jsonl", weights)
        if weights is not None and not keep_weights:
            shutil.rmtree(weights, ignore_errors=True)
        label = f" seed {seed}" if len(seeds) > 1 else ""
        with _print_lock:
            print(f"[{p.task}] {method} lr {chosen:g}{label}: after {run.steps} steps {after['summary'].text()}",
                  flush=True)
        return run, after

    scored = _jobs.map(train_and_score, seeds)
    finals = [run for run, _ in scored]
    runs += [run for run in finals if run is not final]
    failed = next((r for r in finals if not r.ok), None)
    if failed is not None:
        return _row(s, p, method, failed, _ready(base), None, failed.error), runs
    return _row(s, p, method, finals, _ready(base), [after for _, after in scored], None), runs


def _ready(base) -> dict:
    """The base scores, waiting for them when they are scored alongside (Jobs.start)."""
    return base() if callable(base) else base


def _mean_over_seeds(afters: list[dict]) -> dict:
    """Several seeds' scores of the same questions as one score: each rate averaged."""
    from minilars.evaluate import Summary

    def mean(summaries: list) -> Summary:
        numbers = [x.number for x in summaries]
        average = lambda values: sum(values) / len(values)  # noqa: E731
        return Summary(summaries[0].n, average([x.exact for x in summaries]), average([x.contains for x in summaries]),
                       None if None in numbers else average(numbers), summaries[0].n_number)

    return {"summary": mean([a["summary"] for a in afters]),
            "by": {key: mean([a["by"][key] for a in afters]) for key in afters[0]["by"]}}


def _finetune_command(s: Settings, p: Prepared, method: str, lr: float, steps: int, out_dir: Path,
                      curve: bool = True, seed: int | None = None) -> list[str]:
    """The finetune process of one run; a sweep run (curve False) is scored only
    before and after, which is all the lr choice reads."""
    cmd = minilars_command(
        "finetune", "--model", s.model, "--data", str(p.train_file), "--output", str(out_dir), "--overwrite",
        *METHODS[method][0], "--steps", str(steps), "--batch-size", str(s.batch_size), "--seq-len", str(p.seq_len),
        "--packing", "pad", "--lr", f"{lr:g}", "--warmup", str(min(4, steps // 10)),
        "--eval-samples", str(s.curve_questions), "--eval-every", str(s.eval_every if curve else 0),
        "--max-new-tokens", str(p.max_new_tokens), "--save-every", "0", "--show", "0",
        "--seed", str(s.train_seeds[0] if seed is None else seed),
        "--no-progress")
    return cmd + ["--backend", s.backend, "--device", s.device, "--threads", str(s.threads), "--weights", s.weights]


def train_run(s: Settings, p: Prepared, method: str, lr: float, steps: int, role: str, out: Path, counter,
              seed: int | None = None) -> Run:
    """One fresh finetune process, with its wall time and peak RSS; seed: the
    training seed (default: the first of the study's)."""
    seed = s.train_seeds[0] if seed is None else seed
    several = len(s.train_seeds) > 1
    name = f"lr-{lr:g}" + ("-sweep" if role == "sweep" else "") + (f"-seed{seed}" if several else "")
    out_dir = out / "runs" / p.task / method / name
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(p.task, method, lr, steps, role, str(out_dir),
              _finetune_command(s, p, method, lr, steps, out_dir, curve=role == "final" or steps == s.steps,
                                seed=seed), seed=seed)
    with _print_lock:
        counter[0] += 1
        label = f"[{counter[0]}/{counter[1]}] {p.task} {method} lr {lr:g}, {steps} steps ({role})" \
            + (f", seed {seed}" if several else "")
    started = [0.0]

    def on_start() -> None:  # once a job slot is free, so the wall time is the process's own
        started[0] = time.perf_counter()
        with _print_lock:
            print(f"{label} ...", flush=True)

    run.returncode, run.peak_rss_mib = _spawn(run.command, out_dir / "finetune.log", s.threads, on_start)
    run.wall_s = time.perf_counter() - started[0]
    if run.ok:
        result = json.loads((out_dir / "result.json").read_text())
        run.final_train_loss = result["losses"][-1]
        run.eval_loss = (result.get("after") or {}).get("loss")
        run.curve, run.s_per_step = _read_log(out_dir / "log.jsonl", s.batch_size * p.seq_len)
        outcome = (f"{run.wall_s:.0f} s, final train loss {run.final_train_loss:.4f}, eval loss "
                   f"{'-' if run.eval_loss is None else f'{run.eval_loss:.4f}'}, peak RSS {run.peak_rss_mib:.0f} MiB")
    else:
        log = (out_dir / "finetune.log").read_text(errors="replace").strip().splitlines()
        run.error = log[-1] if log else f"exit status {run.returncode}"
        outcome = f"failed: {run.error}"
    with _print_lock:
        print(f"{label}: {outcome}", flush=True)
    return run


# Runs `minilars <argv[2:]>` and writes the process's VmHWM (peak resident set of its
# own address space, KiB) to argv[1]. ru_maxrss would not do: Linux carries the
# parent's peak RSS across fork + exec into the child's ru_maxrss, so every child
# of a study that has grown to 300 MiB would report at least 300 MiB.
_PEAK_WRAPPER = """\
import sys
from minilars.cli import main
try:
    code = main(sys.argv[2:])
finally:
    try:
        with open("/proc/self/status") as f:
            peak = next((line.split()[1] for line in f if line.startswith("VmHWM:")), "")
    except OSError:
        peak = ""
    with open(sys.argv[1], "w") as f:
        f.write(peak)
sys.exit(code)
"""


def minilars_command(*args: str) -> list[str]:
    """A fresh Python process running `minilars ARGS`; see _spawn for its peak RSS."""
    return [sys.executable, "-c", _PEAK_WRAPPER, "PEAK_FILE", *args]


def _spawn(command: list[str], log_path: Path, threads: int, on_start=None) -> tuple[int, float]:
    """Run a minilars_command with `threads` BLAS threads once a job slot is free
    (on_start() is called then); (exit status, its peak RSS in MiB). Where /proc is
    missing the peak falls back to ru_maxrss from os.wait4 (an upper bound: see
    _PEAK_WRAPPER)."""
    peak_file = log_path.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    command = [str(peak_file) if c == "PEAK_FILE" else c for c in command]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    def start() -> subprocess.Popen:
        if on_start is not None:
            on_start()
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    with open(log_path, "w") as log, _jobs.process(start) as proc:
        try:
            _, status, rusage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    text = peak_file.read_text().strip() if peak_file.is_file() else ""
    peak_kib = int(text) if text else rusage.ru_maxrss * (1 / 1024 if sys.platform == "darwin" else 1)
    return proc.returncode, peak_kib / 1024


def _read_log(path: Path, tokens_per_step: int) -> tuple[list[dict], float | None]:
    """The eval points (step, loss, exact, contains) and the median seconds per step."""
    curve, step_times = [], []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "eval" in entry:
            e = entry["eval"]
            curve.append({"step": entry["step"], "loss": e.get("loss"), "exact": e.get("exact"),
                          "contains": e.get("contains")})
        elif entry.get("tokens_per_s"):
            step_times.append(tokens_per_step / entry["tokens_per_s"])
    step_times.sort()
    return curve, step_times[len(step_times) // 2] if step_times else None


def evaluate_run(s: Settings, p: Prepared, run: Run | None, out_file: Path, weights: Path | None = None) -> dict:
    """`minilars eval` on the held-out subset: the base model (run None), a run's
    adapter, or merged weights; {"summary", "by"} from its rows."""
    model = str(weights) if weights is not None else s.model
    cmd = minilars_command("eval", "--model", model, "--data", str(p.heldout_file), "--out", str(out_file),
                           "--max-new-tokens", str(p.max_new_tokens), "--show", "0", "--no-progress")
    if run is not None and weights is None:
        cmd += ["--adapter", run.out]
    code, _ = _spawn(cmd + ["--backend", s.backend, "--device", s.device, "--weights", s.weights],
                     out_file.with_suffix(".log"), s.threads)
    if code != 0:
        log = out_file.with_suffix(".log").read_text(errors="replace").strip().splitlines()
        raise CommandError(f"eval of {run.out if run else 'the base model'} failed: {log[-1] if log else code}")
    return _scores(p, out_file)


def _scores(p: Prepared, rows_file: Path) -> dict:
    """{"summary", "by"} of the rows `minilars eval --out` wrote."""
    from minilars.evaluate import read_rows, summarize, summarize_by

    rows = read_rows(rows_file)
    return {"summary": summarize(rows), "by": summarize_by(rows, p.group_by) if p.group_by else {}}


def score_base(s: Settings, p: Prepared, out_file: Path, rescore: bool = False) -> dict:
    """The base model's scores (evaluate_run with no run), copied from the score cache
    when this model, question set, scoring settings and engine source were scored
    before (minilars/score_cache.py), and kept there after scoring otherwise."""
    from minilars import score_cache

    key = score_cache.scores_key(s.model, p.heldout_file, {"backend": s.backend, "device": s.device,
                                                           "weights": s.weights,
                                                           "max_new_tokens": p.max_new_tokens})
    if not rescore and score_cache.fetch(key, out_file):
        scores, source = _scores(p, out_file), f"rows from the score cache, {score_cache.entry(key)}"
    else:
        scores, source = evaluate_run(s, p, None, out_file), "scored"
        score_cache.store(key, out_file)
    with _print_lock:
        print(f"[{p.task}] base model ({source}): {scores['summary'].text()}", flush=True)
    return scores


def _row(s: Settings, p: Prepared, method: str, runs: Run | list[Run] | None, base: dict,
         afters: dict | list[dict] | None, error) -> dict:
    """One results row; with several seeds' final runs (and their scores) the
    accuracies and losses are their means, the peak RSS their largest."""
    runs = [runs] if isinstance(runs, Run) else runs or []
    afters = [afters] if isinstance(afters, dict) else afters or []
    after = afters[0] if len(afters) == 1 else _mean_over_seeds(afters) if afters else None
    run = _mean_run(runs) if runs else None
    row = {"task": p.task, "method": method, "lr": run.lr if run else None, "steps": s.steps,
           "batch": s.batch_size, "seq_len": p.seq_len, "lr_grid": " ".join(f"{x:g}" for x in s.lrs[method]),
           "sweep_steps": s.sweep_steps if len(s.lrs[method]) > 1 else None,
           "contains_before": base["summary"].contains, "exact_before": base["summary"].exact,
           "contains_after": after["summary"].contains if after else None,
           "exact_after": after["summary"].exact if after else None,
           "number_before": base["summary"].number, "number_after": after["summary"].number if after else None,
           "n_questions": base["summary"].n,
           "final_train_loss": run.final_train_loss if run else None,
           "eval_loss": run.eval_loss if run else None,
           "peak_rss_mib": run.peak_rss_mib if run else None, "wall_s": run.wall_s if run else None,
           "s_per_step": run.s_per_step if run else None, "error": error,
           "seeds": " ".join(str(r.seed) for r in runs) if len(runs) > 1 else None,
           "contains_after_per_seed": " ".join(_pct(a["summary"].contains) for a in afters) if len(afters) > 1 else None}
    for T, summary in base["by"].items():
        row[f"contains_before@{T}"] = summary.contains
    for T, summary in (after["by"] if after else {}).items():
        row[f"contains_after@{T}"] = summary.contains
    return row


def _mean_run(runs: list[Run]) -> Run:
    """The first run with its losses, wall time and s/step averaged over runs (None
    if any is missing) and its peak RSS the largest."""
    if len(runs) == 1:
        return runs[0]

    def mean(key: str):
        values = [getattr(r, key) for r in runs]
        return None if None in values else sum(values) / len(values)

    peaks = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    return replace(runs[0], final_train_loss=mean("final_train_loss"), eval_loss=mean("eval_loss"),
                   wall_s=mean("wall_s"), s_per_step=mean("s_per_step"), peak_rss_mib=max(peaks) if peaks else None)


# ---------------------------------------------------------------- outputs
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def write_outputs(out: Path, s: Settings, rows: list[dict], runs: list[Run], wall: float) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / "study.json").write_text(json.dumps({"settings": asdict(s), "rows": rows,
                                                "runs": [asdict(r) for r in runs], "wall_s": wall},
                                               indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(s, rows, wall))
    try:
        plot(out / "accuracy_vs_step.png", s, runs)
    except ImportError as e:  # the plot is an extra; the tables above are the results
        print(f"accuracy_vs_step.png not written ({e}); pip install 'minilars[plot]' for it", flush=True)


def markdown(s: Settings, rows: list[dict], wall: float) -> str:
    lines = [f"# Accuracy study: {s.model}, {s.steps} steps of batch {s.batch_size}" + (" [quick]" if s.quick else ""),
             "",
             "Accuracy = contains-answer rate on held-out questions worded differently from training "
             "(exact match in brackets). Before = the base model. "
             + (f"lr chosen by held-out loss after {s.sweep_steps} sweep steps from the grid in brackets. "
                if any(len(g) > 1 for g in s.lrs.values()) else "One lr per method, no sweep. ")
             + "T = tokens per row. Peak RSS (VmHWM), wall time and s/step are the final training process's. "
             + (f"Each final run was trained with seeds {', '.join(map(str, s.train_seeds))}: accuracies, losses, "
                "wall time and s/step are means over them, peak RSS the largest, and the last column is each "
                "seed's accuracy. " if len(s.train_seeds) > 1 else "")
             + (f"Processes ran {s.jobs} at a time ({s.threads} thread{'s' if s.threads > 1 else ''} each), so "
                "wall times and s/step include their sharing of the machine. " if s.jobs > 1 else "")
             + f"Study wall time {wall:.0f} s.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        lengths = sorted({int(k.split("@")[1]) for r in mine for k in r if k.startswith("contains_after@")})
        head = ["method", "lr (grid)", "T", "questions", "before", "after"] + [f"after @T={T}" for T in lengths] \
            + ["final train loss", "peak RSS MiB", "wall s", "s/step"] \
            + (["after, per seed"] if len(s.train_seeds) > 1 else [])
        lines += [f"## {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in mine:
            cells = [r["method"], f"{_num(r['lr'], 'g')} ({r['lr_grid']})", str(r["seq_len"]), str(r["n_questions"]),
                     f"{_pct(r['contains_before'])} ({_pct(r['exact_before'])})",
                     f"{_pct(r['contains_after'])} ({_pct(r['exact_after'])})"]
            cells += [_pct(r.get(f"contains_after@{T}")) for T in lengths]
            cells += [_num(r["final_train_loss"], ".4f"), _num(r["peak_rss_mib"], ".0f"), _num(r["wall_s"], ".0f"),
                      _num(r["s_per_step"], ".2f")]
            if len(s.train_seeds) > 1:
                cells.append(r.get("contains_after_per_seed") or "-")
            if r["error"]:
                cells[5] = f"failed: {r['error']}"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, s: Settings, runs: list[Run]) -> None:
    """Held-out contains-answer accuracy (curve questions) vs step, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    final = [r for r in runs if r.role == "final" and r.ok]
    tasks = list(dict.fromkeys(r.task for r in final)) or s.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in final if r.task == task):
            points = [(c["step"], c["contains"]) for c in r.curve if c["contains"] is not None]
            if points:
                seed = f", seed {r.seed}" if len(s.train_seeds) > 1 else ""
                ax.plot(*zip(*points), marker="o", label=f"{r.method} (lr {r.lr:g}{seed})")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"held-out accuracy ({s.curve_questions} questions)")
    fig.suptitle(f"{s.model}: accuracy vs step, batch {s.batch_size}" + (" [quick]" if s.quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
