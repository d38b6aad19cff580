"""The study's cost cutters: `--jobs` (several processes at once, minilars/commands/jobs.py)
and the base model's score cache (minilars/score_cache.py).

Concurrency is checked by counting live processes, never by timing them."""
import subprocess
import sys
import threading
import time

import pytest

from minilars import evaluate, score_cache
from minilars.commands import study
from minilars.commands.jobs import Jobs

SLEEP = [sys.executable, "-c", "import time; time.sleep(0.3)"]


def _sleeper(jobs: Jobs) -> int:
    with jobs.process(lambda: subprocess.Popen(SLEEP)) as proc:
        return proc.wait()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_at_most_n_processes_are_alive_and_n_are_reached(n):
    jobs = Jobs(n)
    assert jobs.map(lambda _: _sleeper(jobs), range(6)) == [0] * 6
    assert jobs.most_alive == n


def test_nested_maps_share_one_bound_and_keep_item_order():
    jobs = Jobs(2)

    def outer(i):
        return jobs.map(lambda j: (i, j, _sleeper(jobs)), range(3))

    assert jobs.map(outer, range(3)) == [[(i, j, 0) for j in range(3)] for i in range(3)]
    assert jobs.most_alive == 2


def test_map_raises_the_first_error_after_every_call_ended():
    jobs = Jobs(2)
    ended = []

    def fn(i):
        if i in (1, 3):
            raise ValueError(f"item {i}")
        _sleeper(jobs)
        ended.append(i)

    with pytest.raises(ValueError, match="item 1"):
        jobs.map(fn, range(5))
    assert sorted(ended) == [0, 2, 4]


def test_a_chain_holds_its_slot_so_begun_chains_finish_before_others_begin():
    """Three train-then-score chains on 2 slots: at most 2 chains are ever begun and
    unfinished. (With a slot per process, the slot a training frees goes to the third
    chain's training while the first chain does its work between processes, and all
    three are open at once.)"""
    jobs = Jobs(2)
    lock, open_chains, most_open = threading.Lock(), set(), [0]

    def chain(name):
        with jobs.chain():
            with jobs.process(lambda: subprocess.Popen(SLEEP)) as training:
                with lock:
                    open_chains.add(name)
                    most_open[0] = max(most_open[0], len(open_chains))
                training.wait()
            time.sleep(0.05)  # the study reads the training's results here
            _sleeper(jobs)  # the scoring
        with lock:
            open_chains.discard(name)

    jobs.map(chain, "abc")
    assert most_open[0] == 2 and jobs.most_alive == 2
    with pytest.raises(RuntimeError, match="do not nest"):
        with jobs.chain(), jobs.chain():
            pass


def test_stop_kills_live_processes_and_refuses_new_ones():
    jobs = Jobs(2)
    codes = []
    started = threading.Event()

    def long_one():
        with jobs.process(lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])) as proc:
            started.set()
            codes.append(proc.wait())

    thread = threading.Thread(target=long_one)
    thread.start()
    assert started.wait(30)
    jobs.stop()
    thread.join(30)
    assert not thread.is_alive() and codes and codes[0] < 0  # killed by a signal
    with pytest.raises(KeyboardInterrupt):
        with jobs.process(lambda: subprocess.Popen(SLEEP)):
            pass
    with pytest.raises(ValueError):
        Jobs(0)


def test_seeds_run_as_jobs_give_the_same_row_as_one_at_a_time(monkeypatch, tmp_path):
    """study_method with 2 jobs: each seed's train-then-score chain on its own thread,
    the row (means, per-seed column, seed order) the same as with 1 job."""
    right = {0: 0.25, 1: 0.5, 2: 1.0, 3: 0.0}

    def fake_train(s, p, method, lr, steps, role, out, counter, seed=None):
        _sleeper(study._jobs)
        return study.Run(p.task, method, lr, steps, role, str(tmp_path / f"{lr}-{role}-{seed}"), [], returncode=0,
                         final_train_loss=0.1, eval_loss=1.0, peak_rss_mib=100.0 + seed, wall_s=1.0, seed=seed)

    def fake_eval(s, p, run, out_file, weights=None):
        return {"summary": evaluate.Summary(4, 0.0, right[run.seed], None), "by": {}}

    monkeypatch.setattr(study, "train_run", fake_train)
    monkeypatch.setattr(study, "evaluate_run", fake_eval)
    prepared = study.Prepared("personal", tmp_path, tmp_path, 64, 8, None)
    s = study.Settings("tiny", "numpy", "cpu", 1, ["personal"], ["lora"], 20, 2, {"lora": (1e-3,)},
                       20, None, 4, 0, None, 0, False, seeds=(3, 1, 2, 0))
    base = {"summary": evaluate.Summary(4, 0.0, 0.0, None), "by": {}}
    rows = {}
    for n in (1, 2):
        monkeypatch.setattr(study, "_jobs", Jobs(n))
        rows[n], runs = study.study_method(s, prepared, "lora", lambda: base, tmp_path, [0, 4], keep_weights=True)
        assert [r.seed for r in runs] == [3, 1, 2, 0] and study._jobs.most_alive == n
    assert rows[1] == rows[2]
    assert rows[2]["contains_after_per_seed"] == "0% 50% 100% 25%"
    assert rows[2]["contains_after"] == pytest.approx(1.75 / 4)


# ---------------------------------------------------------------- the score cache
@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILARS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _base_setup(tmp_path, monkeypatch):
    """A passkey Prepared with a question file, and a fake `minilars eval` that
    writes rows (right on the first question only) and counts its calls."""
    held = tmp_path / "heldout.jsonl"
    evaluate.write_rows(held, [{"prompt": "q0", "completion": "a", "tokens": 512},
                               {"prompt": "q1", "completion": "b", "tokens": 1024}])
    prepared = study.Prepared("passkey", tmp_path, held, 64, 16, "tokens")
    calls = []

    def fake_eval(s, p, run, out_file, weights=None):
        calls.append(out_file)
        evaluate.write_rows(out_file, [{"prompt": "q0", "tokens": 512, "exact": True, "contains": True},
                                       {"prompt": "q1", "tokens": 1024, "exact": False, "contains": False}])
        return study._scores(p, out_file)

    monkeypatch.setattr(study, "evaluate_run", fake_eval)
    s = study.Settings("tiny", "numpy", "cpu", 1, ["passkey"], ["lars"], 2, 2, {"lars": (1e-3,)},
                       2, None, 4, 0, None, 0, False)
    return s, prepared, calls


def test_base_scores_come_from_the_cache_the_second_time(cache, monkeypatch, tmp_path, capsys):
    s, prepared, calls = _base_setup(tmp_path, monkeypatch)
    first = study.score_base(s, prepared, tmp_path / "a.jsonl")
    assert len(calls) == 1 and "(scored)" in capsys.readouterr().out
    second = study.score_base(s, prepared, tmp_path / "b.jsonl")
    assert len(calls) == 1, "scored again although the cache held the rows"
    assert "score cache" in capsys.readouterr().out
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert second["summary"] == first["summary"] and second["summary"].contains == 0.5
    assert second["by"][512].contains == 1.0 and second["by"][1024].contains == 0.0
    study.score_base(s, prepared, tmp_path / "c.jsonl", rescore=True)
    assert len(calls) == 2


@pytest.mark.parametrize("change", ["questions", "weights", "backend", "max_new_tokens"])
def test_anything_that_decides_the_answers_misses_the_cache(change, cache, monkeypatch, tmp_path):
    s, prepared, calls = _base_setup(tmp_path, monkeypatch)
    study.score_base(s, prepared, tmp_path / "a.jsonl")
    if change == "questions":
        with open(prepared.heldout_file, "a") as f:
            f.write('{"prompt": "q2", "completion": "c", "tokens": 2048}\n')
    elif change == "weights":
        s.weights = "float16"
    elif change == "backend":
        s.backend = "numba"
    else:
        prepared.max_new_tokens = 8
    study.score_base(s, prepared, tmp_path / "b.jsonl")
    assert len(calls) == 2


def test_an_unwritable_cache_costs_the_saving_not_the_run(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MINILARS_CACHE", str(blocker))
    s, prepared, calls = _base_setup(tmp_path, monkeypatch)
    for name in ("a.jsonl", "b.jsonl"):
        assert study.score_base(s, prepared, tmp_path / name)["summary"].contains == 0.5
    assert len(calls) == 2


def test_the_engine_source_is_in_the_key(tmp_path):
    packages = [tmp_path / name for name in ("minilars", "backends", "models")]
    for package in packages:
        (package / "sub").mkdir(parents=True)
        (package / "sub" / "kernel.py").write_text("x = 1\n")
    (packages[0] / "notes.txt").write_text("not source")
    before = score_cache.engine_source_digest(packages)
    (packages[0] / "notes.txt").write_text("changed, still not source")
    assert score_cache.engine_source_digest(packages) == before
    (packages[0] / "commands").mkdir()
    (packages[0] / "commands" / "study.py").write_text("print('the study schedules differently')\n")
    assert score_cache.engine_source_digest(packages) == before  # orchestration only
    (packages[0] / "commands" / "eval.py").write_text("print('the eval command changed')\n")
    changed = score_cache.engine_source_digest(packages)
    assert changed != before
    (packages[1] / "sub" / "kernel.py").write_text("x = 2\n")
    assert score_cache.engine_source_digest(packages) not in (before, changed)


def test_the_installed_engine_is_hashed_and_the_real_model_keyed(tmp_path):
    """From outside the repository (no `models` on sys.path), the default packages are
    the installed ones and the key of a registered model reads its file."""
    import os

    code = ("from pathlib import Path; from minilars import score_cache; "
            "print(score_cache.engine_source_digest()); "
            "print(score_cache.scores_key('hf', Path('q.jsonl'), {}))")
    (tmp_path / "q.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    (tmp_path / "hf").mkdir()  # a Hugging Face directory: its files are what the key reads
    (tmp_path / "hf" / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    digest, key = out.stdout.split()
    assert digest == score_cache.engine_source_digest() and len(key) == 32
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"weights")
    again = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.stdout.split()[1] != key  # another file in the model directory, another key


# ---------------------------------------------------------------- interrupting a study
def _finetunes_of(out) -> list[int]:
    """pids of live `minilars finetune` processes writing under `out` (from /proc)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"finetune" in args and any(str(out).encode() in a for a in args):
                pids.append(int(entry))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_ends_the_study_and_every_process_it_runs(tmp_path):
    """A study of two methods at 2 jobs, each training 100,000 steps, stopped by SIGTERM
    once a finetune runs: the study exits and leaves no finetune process behind."""
    import os
    import signal
    import time

    out = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "minilars", "study", "accuracy", "--quick", "--out", str(out),
                             "--tasks", "personal", "--methods", "lora,lars", "--steps", "100000", "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MINILARS_CACHE": str(tmp_path / "cache")})
    try:
        deadline = time.monotonic() + 300
        while not _finetunes_of(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _finetunes_of(out), "no finetune process started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        deadline = time.monotonic() + 30
        while _finetunes_of(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.returncode != 0 and not _finetunes_of(out)
    finally:
        proc.kill()
        for pid in _finetunes_of(out):
            os.kill(pid, signal.SIGKILL)
