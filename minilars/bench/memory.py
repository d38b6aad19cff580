"""Peak memory vs sequence length, per method and storage policy, measured in fresh processes.

Each (method, storage policy, T) runs in its own process (minilars/bench/memory_worker.py)
so that its peak RSS is its own: the process loads the model, applies the method,
runs warm-up and timed training steps at batch 1 on random tokens and reports peak
RSS (whole process, and the step phase alone via /proc/self/clear_refs), the
activation store's peak, the median step time, and the planner's prediction
(minilars/planner.py). An inference row (no-grad forward) is the floor. A run that
fails or is killed (out of memory, --max-rss, --timeout) becomes a row with its error.

With --memory-limit each run starts inside a memory cgroup of its own with that limit
and no swap (minilars/bench/cgroup.py; needs root): the row says whether it finished,
and the cgroup's peak charge (page cache of the memory-mapped weights included). The
model file is dropped from the page cache before each such run, so the run is charged
for the weights it reads. Where no cgroup can be made the command says why and stops.

Output: a table on the terminal, OUT/memory.csv, OUT/memory.json (every field) and
OUT/memory.png (peak RSS vs T per method, log2 axis). docs/memory.md explains the
columns and the memory model behind the predictions.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minilars.commands.common import comma_separated
from minilars.methods import method_class

MIB = 2**20
ALL_METHODS = ("inference", "lars", "lora", "ia3", "full")
LARS_SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_SEQ_LENS = (16, 32, 64)

COLUMNS = ("label", "T", "status", "peak_rss_mib", "step_peak_mib", "steady_peak_mib", "planned_mib", "plan_err_pct",
           "store_peak_mib", "planned_store_mib", "load_peak_mib", "rss_loaded_mib", "step_s", "tokens_per_s",
           "memory_limit_mib", "cgroup_peak_mib", "method", "storage", "rank", "backend", "weights", "weights_held",
           "malloc", "n_trainable", "peak_phase", "error")
TABLE_COLUMNS = ("label", "T", "peak_rss_mib", "steady_peak_mib", "planned_mib", "plan_err_pct", "store_peak_mib",
                 "step_s", "tokens_per_s", "status")
LIMIT_COLUMNS = ("memory_limit_mib", "cgroup_peak_mib")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="model name, .gguf or HF directory; 'tiny' uses random weights (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), type=comma_separated(str, "lars,lora"),
                        help="comma-separated from inference, lars, lora, ia3, full (default: %(default)s)")
    parser.add_argument("--seq-lens", default=None, type=comma_separated(int, "256,512"),
                        help="comma-separated T for LARS (default: 256,...,8192; --quick: 16,32,64)")
    parser.add_argument("--max-seq-len-others", type=int, default=2048,
                        help="the other methods (and inference) run only the T up to this (default: %(default)s)")
    parser.add_argument("--other-seq-lens", default=None, type=comma_separated(int, "256,512"),
                        help="comma-separated T for the non-LARS methods, overriding --max-seq-len-others")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of every method that has one (default: each method's typical rank, "
                             "LARS 16, LoRA 8 as PEFT)")
    parser.add_argument("--storage", action="append", default=None,
                        help="LARS storage policy; repeat to compare several, e.g. --storage default --storage exact "
                             "(default: default = block=recompute,input.x=half)")
    parser.add_argument("--backend", default=None, choices=("numpy", "numba", "torch"),
                        help="kernel backend (default: numba where it imports, else numpy)")
    from minilars.commands.common import add_weights_option

    add_weights_option(parser)
    parser.add_argument("--memory-limit", default=None, metavar="SIZE",
                        help="run each point inside a memory cgroup with this limit and no swap, e.g. 512MiB "
                             "(cgroup v2 or v1, as root); the row says whether it finished")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--out", default="runs/bench-memory", help="output directory (default: %(default)s)")
    parser.add_argument("--arena-max", type=int, default=2,
                        help="MALLOC_ARENA_MAX for the runs; 0 leaves glibc's default (default: %(default)s)")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ in bytes for the runs, e.g. 131072 so freed large buffers go "
                             "back to the OS; 0 leaves glibc's dynamic threshold (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds before a run is killed and reported as timed out (default: %(default)s)")
    parser.add_argument("--max-rss", default=None,
                        help="kill a run whose RSS passes this, e.g. 8GiB (default: 80%% of the memory available "
                             "at start)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: the tiny preset, T 16/32/64, one step, no warm-up")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


# ---------------------------------------------------------------- the sweep
def build_runs(args) -> list[dict]:
    """One dict of worker arguments per run, in the order they run."""
    methods = args.methods
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    lars_lens = args.seq_lens if args.seq_lens else list(QUICK_SEQ_LENS if args.quick else LARS_SEQ_LENS)
    if args.other_seq_lens:
        other_lens = args.other_seq_lens
    else:
        other_lens = [t for t in lars_lens if t <= args.max_seq_len_others]
    storages = args.storage or ["default"]
    runs = []
    for method in methods:
        worker_method = "frozen" if method == "inference" else method
        kind = method_class(worker_method)
        rank = (args.rank or kind.typical_rank) if kind.has_rank else None
        if kind.reads("storage"):
            for storage in storages:
                runs += [{"method": worker_method, "rank": rank, "storage": storage, "seq_len": t} for t in lars_lens]
        else:
            runs += [{"method": worker_method, "rank": rank, "storage": None, "seq_len": t} for t in other_lens]
    # shortest T first, across methods: a long sweep has every method's short rows early
    return sorted(runs, key=lambda run: run["seq_len"])


def label_of(run: dict) -> str:
    if not method_class(run["method"]).trains:
        return "inference (no grad)"
    label = run["method"] + (f" r{run['rank']}" if run["rank"] else "")
    return label + (f" [{run['storage']}]" if run["storage"] else "")


def child_env(args) -> dict:
    env = dict(os.environ)
    if args.arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.arena_max)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    return env


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_worker(run: dict, args, model: str, max_rss: int | None, workdir: Path, limit: int | None = None) -> dict:
    """Start one worker process, watch its RSS, and return its JSON result (or an
    error record when it fails, is killed, or passes --max-rss / --timeout). With
    `limit` (bytes) it runs in a memory cgroup of its own (minilars/bench/cgroup.py)."""
    if limit is None:
        return _run_worker(run, args, model, max_rss, workdir)
    from .cgroup import MemoryLimit, evict_from_page_cache

    path = _model_file(model)
    if path is not None:
        evict_from_page_cache(path)
    with MemoryLimit.create(limit) as cgroup:
        result = _run_worker(run, args, model, max_rss, workdir, preexec=cgroup.enter)
        peak, kills = cgroup.peak_bytes(), cgroup.oom_kills()
    result["memory_limit_mib"] = limit / MIB
    result["cgroup_peak_mib"] = None if peak is None else peak / MIB
    if kills:
        result["error"] = f"killed by the OOM killer in the {limit / MIB:,.0f} MiB cgroup"
    return result


def _model_file(model: str) -> Path | None:
    """The GGUF file behind a model spec, when it is one and already on disk."""
    if model == "tiny":
        return None
    try:
        from minilars.models import resolve_model

        path = resolve_model(model)
    except Exception:  # noqa: BLE001 (the worker reports a bad spec itself)
        return None
    return path if path.is_file() else None


def _run_worker(run: dict, args, model: str, max_rss: int | None, workdir: Path, preexec=None) -> dict:
    out = workdir / f"run-{os.getpid()}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "minilars.bench.memory_worker", "--model", model, "--method", run["method"],
           "--seq-len", str(run["seq_len"]), "--weights", args.weights,
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--out", str(out)]
    if run["rank"]:
        cmd += ["--rank", str(run["rank"])]
    if run["storage"]:
        cmd += ["--storage", run["storage"]]
    if args.backend:
        cmd += ["--backend", args.backend]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=child_env(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec)
    killed = None
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        rss = _rss_of(proc.pid)
        if max_rss and rss and rss > max_rss:
            killed = f"killed: RSS {rss / MIB:,.0f} MiB passed --max-rss {max_rss / MIB:,.0f} MiB"
        elif time.monotonic() - start > args.timeout:
            killed = f"killed: still running after --timeout {args.timeout:g} s"
        if killed:
            proc.kill()
            stdout, stderr = proc.communicate()
            break
    result = None
    if out.is_file():
        try:
            result = json.loads(out.read_text())
        except json.JSONDecodeError:
            result = None
        out.unlink()
    if killed:
        return {"error": killed}
    if result is None:
        if proc.returncode is not None and proc.returncode < 0:
            sig = -proc.returncode
            why = " (the kernel's OOM killer?)" if sig == 9 else ""
            return {"error": f"killed by signal {sig}{why}"}
        tail = (stderr or stdout or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit status {proc.returncode}: {tail[0][:300]}"}
    return result


def warm_caches(args, workdir: Path) -> None:
    """Run one unrecorded baseline worker first, so that numba's on-disk kernel cache
    is filled before the first measured run: compiling the kernels takes LLVM
    memory a cached run never needs (measured: 339 MiB after imports while
    compiling, 170 MiB with the cache)."""
    if args.quick or (args.backend or "") not in ("", "numba"):
        return
    out = workdir / "warm-caches.json"
    cmd = [sys.executable, "-m", "minilars.bench.memory_worker", "--baseline", "--out", str(out)]
    if args.backend:
        cmd += ["--backend", args.backend]
    subprocess.run(cmd, env=child_env(args), capture_output=True, text=True, timeout=args.timeout)


def to_row(run: dict, result: dict, args) -> dict:
    plan = result.get("plan") or {}
    row = {"label": label_of(run), "T": run["seq_len"], "method": run["method"], "storage": run["storage"] or "",
           "rank": run["rank"] or "", "backend": result.get("backend", args.backend or ""),
           "weights": args.weights, "weights_held": result.get("weights_held", ""), "malloc": result.get("malloc", ""),
           "memory_limit_mib": result.get("memory_limit_mib"), "cgroup_peak_mib": result.get("cgroup_peak_mib"),
           "status": "error" if "error" in result else "ok", "error": result.get("error", "")}
    if "error" in result:
        return row
    steady = result.get("steady_peak_mib")
    planned = plan.get("total", 0) / MIB if plan else None
    row.update({
        "peak_rss_mib": result.get("peak_rss_mib"), "step_peak_mib": result.get("step_peak_mib"),
        "steady_peak_mib": steady, "planned_mib": planned,
        "plan_err_pct": (planned / steady - 1) * 100 if planned and steady else None,
        "store_peak_mib": result.get("store_peak_bytes", 0) / MIB,
        "planned_store_mib": plan.get("store_peak", 0) / MIB,
        "load_peak_mib": result.get("load_peak_mib"), "rss_loaded_mib": result.get("rss_loaded_mib"),
        "step_s": result.get("median_step_seconds"), "tokens_per_s": result.get("tokens_per_second"),
        "n_trainable": result.get("n_trainable"), "peak_phase": plan.get("peak_phase", "")})
    return row


def run(args) -> int:
    from tqdm import tqdm

    if args.quick:
        args.warmup, args.steps = 0, 1
    model = "tiny" if args.quick else args.model
    runs = build_runs(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.max_rss:
        from minilars.units import parse_size

        max_rss = parse_size(args.max_rss)
    else:
        available = _available_bytes()
        max_rss = int(0.8 * available) if available else None
    limit = _memory_limit(args)
    env = child_env(args)
    malloc = " ".join(f"{k}={env[k]}" for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_") if k in env)
    print(f"bench memory: {len(runs)} runs of {model}, {args.warmup} warm-up + {args.steps} timed steps each, "
          f"--weights {args.weights}, backend {args.backend or 'default'}, {malloc or 'glibc malloc defaults'}"
          + (f", each in a {limit / MIB:,.0f} MiB memory cgroup" if limit else "") + f"; output in {out_dir}",
          flush=True)
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="minilars-bench-memory-") as tmp:
        warm_caches(args, Path(tmp))
        bar = tqdm(runs, unit="run", dynamic_ncols=True)
        for spec in bar:
            bar.set_description(f"{label_of(spec)} T={spec['seq_len']}")
            result = run_worker(spec, args, model, max_rss, Path(tmp), limit)
            row = to_row(spec, result, args)
            rows.append(row)
            records.append({"run": spec, "result": result})
            bar.write(_one_line(row))
            _write_outputs(rows, records, out_dir)  # after each run: a long sweep leaves partial results
    print()
    print_table(rows, TABLE_COLUMNS + (LIMIT_COLUMNS if limit else ()))
    if not args.no_plot:
        path = plot(rows, out_dir / "memory.png", title=f"{model}, batch 1, --weights {args.weights}, "
                                                        f"backend {rows[0].get('backend') if rows else ''}")
        if path:
            print(f"plot: {path}")
    print(f"table: {out_dir / 'memory.csv'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _memory_limit(args) -> int | None:
    """--memory-limit in bytes, after checking that a cgroup can be made here (else
    a CommandError saying why: the runs must not silently go unlimited)."""
    if not args.memory_limit:
        return None
    from minilars.cli import CommandError
    from minilars.units import parse_size

    from .cgroup import CgroupUnavailable, MemoryLimit, has_swap

    limit = parse_size(args.memory_limit)
    try:
        with MemoryLimit.create(limit) as probe:
            swap_limited = probe.swap_limited
    except CgroupUnavailable as exc:
        raise CommandError(f"--memory-limit: cannot run inside a memory limit here: {exc}") from None
    if not swap_limited and has_swap():
        print("note: swap is not limited in the cgroup (no swap accounting): a run may swap instead of failing")
    return limit


def _one_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['label']:>34} T={row['T']:<5} {row['error']}"
    limit = (f", cgroup peak {row['cgroup_peak_mib']:,.1f} of {row['memory_limit_mib']:,.0f} MiB"
             if row.get("memory_limit_mib") and row.get("cgroup_peak_mib") is not None else "")
    return (f"{row['label']:>34} T={row['T']:<5} peak RSS {row['peak_rss_mib']:8.1f} MiB, steps "
            f"{row['steady_peak_mib']:8.1f} (planned {row['planned_mib']:8.1f}, {row['plan_err_pct']:+.1f} %), "
            f"store {row['store_peak_mib']:7.1f} MiB, {row['step_s']:.2f} s/step" + limit)


def print_table(rows: list[dict], columns, file=None) -> None:
    """Markdown pipe table (it pastes into docs/memory.md)."""
    def fmt(v):
        if v is None or v == "":
            return ""
        return f"{v:,.1f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |", file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for row in cells:
        print("| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
              + " |", file=file)


def _write_outputs(rows: list[dict], records: list[dict], out_dir: Path) -> None:
    with open(out_dir / "memory.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "memory.json").write_text(json.dumps(records, indent=1))


def plot(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Peak RSS vs T per method (left: training steps measured and planned, whole
    process dotted; grey line at 1 GiB) and the activation store's peak (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, (ax, ax_store) = plt.subplots(1, 2, figsize=(13, 5))
    for i, label in enumerate(labels):
        mine = sorted((r for r in rows if r["label"] == label and r["status"] == "ok"), key=lambda r: r["T"])
        if not mine:
            continue
        color = f"C{i}"
        ts = [r["T"] for r in mine]
        ax.plot(ts, [r["steady_peak_mib"] for r in mine], "o-", color=color, label=label)
        ax.plot(ts, [r["planned_mib"] for r in mine], "x--", color=color, alpha=0.6)
        ax.plot(ts, [r["peak_rss_mib"] for r in mine], ":", color=color, alpha=0.5)
        ax_store.plot(ts, [r["store_peak_mib"] for r in mine], "o-", color=color, label=label)
        for r in rows:
            if r["label"] == label and r["status"] != "ok":
                ax.axvline(r["T"], color=color, linestyle=":", alpha=0.5)
    ax.axhline(1024, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("peak RSS (MiB)")
    ax.text(0.01, 0.99, "solid: measured, training steps\ndashed: planned (minilars.planner)\n"
            "dotted: measured, whole process (loading too)", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_title(title or "peak memory vs sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax_store.set_xscale("log", base=2)
    ax_store.set_yscale("log", base=2)
    ax_store.set_xlabel("sequence length T (tokens)")
    ax_store.set_ylabel("activation store peak (MiB)")
    ax_store.set_title("what backward keeps (ActivationStore.bytes_peak)")
    ax_store.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
