"""Task generators (minilars/tasks.py), held-out scoring (minilars/evaluate.py,
`minilars eval`) and the accuracy study (`minilars study`).

The generators must be pure functions of their seed, ask held-out questions in
wordings training never uses, hide the pass key where they say, and get their sums
right. Scoring is checked against a fake answerer with known outputs, so the rates
are known by hand. The study runs end to end in --quick mode on the tiny preset."""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from minilars import evaluate, tasks
from minilars.cli import main

QUICK = tasks.TaskSizes.quick()


# ---------------------------------------------------------------- generators
@pytest.mark.parametrize("task", tasks.TASKS)
def test_generators_are_deterministic_per_seed(task):
    first = tasks.generate(task, seed=7, sizes=QUICK)
    assert tasks.generate(task, seed=7, sizes=QUICK) == first
    assert tasks.generate(task, seed=8, sizes=QUICK) != first


def test_make_tasks_writes_the_same_bytes_for_the_same_seed(tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(["study", "make-tasks", "--out", str(out), "--quick", "--seed", "3"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jsonl"))
    assert len(files) == 2 * len(tasks.TASKS)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    for record in tasks.read_jsonl(tmp_path / "a" / "arithmetic" / "train.jsonl"):
        assert {"prompt", "completion", "answer", "split", "template"} <= set(record)


def test_make_tasks_passkey_lengths_and_counts_from_flags(tmp_path):
    """Long-context training: --passkey-train-T and --passkey-heldout-T set the lengths
    (counted here as characters / 4.44), --passkey-train and --passkey-heldout the counts."""
    argv = ["study", "make-tasks", "--out", str(tmp_path), "--tasks", "passkey", "--passkey-train-T", "300",
            "--passkey-heldout-T", "200,400", "--passkey-train", "5", "--passkey-heldout", "3"]
    assert main(argv) == 0
    train = tasks.read_jsonl(tmp_path / "passkey" / "train.jsonl")
    held = tasks.read_jsonl(tmp_path / "passkey" / "heldout.jsonl")
    assert [r["tokens"] for r in train] == [300] * 5
    assert [r["tokens"] for r in held] == [200] * 3 + [400] * 3
    sentence = max(len(f) + 1 for f in tasks.FILLER) / tasks.CHARS_PER_TOKEN  # the filling's granularity
    for r in train + held:  # filled to within one filler sentence of T - RESERVE tokens
        assert r["tokens"] - tasks.RESERVE - sentence <= np.ceil(len(r["prompt"]) / tasks.CHARS_PER_TOKEN) \
            <= r["tokens"] - tasks.RESERVE
    manifest = json.loads((tmp_path / "tasks.json").read_text())
    assert manifest["sizes"]["passkey_heldout_T"] == [200, 400] and manifest["sizes"]["passkey_train_T"] == 300


@pytest.mark.parametrize("flags", [["--passkey-heldout-T", "4k"], ["--passkey-heldout-T", ","],
                                   ["--passkey-train", "0"]])
def test_make_tasks_refuses_bad_passkey_flags(flags, tmp_path, capsys):
    assert main(["study", "make-tasks", "--out", str(tmp_path), "--tasks", "passkey", *flags]) == 2
    assert flags[0] in capsys.readouterr().err
    assert not (tmp_path / "passkey").exists()


def _skeleton(prompt: str) -> str:
    """The wording of a question with its numbers and names taken out."""
    prompt = re.sub(r"\d+", "#", prompt)
    return re.sub(r"\b(" + "|".join(tasks.NAMES) + r")\b", "NAME", prompt)


def test_heldout_questions_are_worded_differently_from_training():
    train, held = tasks.personal()
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert not {r["template"] for r in train} & {r["template"] for r in held}

    train, held = tasks.passkey(n_train=8, n_heldout=4, heldout_T=(512,))
    intro = lambda r: r["prompt"].split("\n\n")[0]
    question = lambda r: r["prompt"].split("\n\n")[-1]
    assert not {intro(r) for r in train} & {intro(r) for r in held}
    assert not {question(r) for r in train} & {question(r) for r in held}

    train, held = tasks.arithmetic(n_train=200, n_heldout=40)
    assert not {_skeleton(r["prompt"]) for r in train} & {_skeleton(r["prompt"]) for r in held}
    assert len({_skeleton(r["prompt"]) for r in held}) == 2 * len(tasks.PROBLEMS)  # every held-out wording used


def test_personal_task_has_40_unguessable_facts_4_train_and_2_heldout_phrasings_each():
    train, held = tasks.personal()
    facts = {r["fact"] for r in train}
    assert len(facts) == 40 and not facts & set(tasks.GUESSABLE)
    for fact in facts:
        assert sum(r["fact"] == fact for r in train) == 4
        assert sum(r["fact"] == fact for r in held) == 2
    for r in train + held:
        assert r["answer"] in r["completion"]


def _sentences_before(prompt: str, offset: int) -> int:
    return sum(prompt[:offset].count(s) for s in tasks.FILLER)


@pytest.mark.parametrize("count", [None, lambda text: len(text.split())], ids=["chars", "words"])
def test_passkey_is_in_the_text_at_the_recorded_depth(count):
    train, held = tasks.passkey(seed=5, n_train=6, n_heldout=6, train_T=512, heldout_T=(512, 1024),
                                count_tokens=count)
    measure = count or (lambda text: int(np.ceil(len(text) / tasks.CHARS_PER_TOKEN)))
    depths = []
    for r in train + held:
        key, prompt = r["answer"], r["prompt"]
        assert re.fullmatch(r"\d{5}", key)
        assert prompt[r["key_offset"]:].startswith(tasks.KEY_SENTENCE.format(key=key))
        assert re.findall(r"\d+", prompt) == [key, key]  # the filler holds no other number
        n = r["filler_sentences"]
        assert n > 0
        assert _sentences_before(prompt, r["key_offset"]) == round(r["depth"] * n)
        assert r["completion"] == f"The pass key is {key}."
        # as long as the budget allows, and no longer
        budget = r["tokens"] - tasks.RESERVE
        assert r["prompt_tokens"] == measure(prompt) <= budget
        longest = max(measure(s) for s in tasks.FILLER) + 1
        assert measure(prompt) > budget - longest
        depths.append(r["depth"])
    assert min(depths) < 0.35 and max(depths) > 0.65  # the key moves through the text
    assert sorted({r["tokens"] for r in held}) == [512, 1024]


def test_passkey_refuses_a_length_that_cannot_hold_the_key():
    with pytest.raises(ValueError, match="T = 64"):
        tasks.passkey(n_train=1, n_heldout=0, train_T=64)


def _solve(kind: str, v: dict) -> int:
    """The problem kinds, solved independently of tasks.py."""
    if kind == "bus":
        return v["a"] - v["b"] + v["c"] - v["d"]
    if kind == "trays":
        return v["n"] * v["m"] - v["s"] + v["k"]
    if kind == "savings":
        return v["a"] + v["w"] * v["k"] - v["s"]
    assert (v["x"] * v["y"]) % v["z"] == 0, "the sweets must share out evenly"
    return v["x"] * v["y"] // v["z"] - v["e"]


def test_arithmetic_answers_are_right():
    train, held = tasks.arithmetic(seed=11, n_train=120, n_heldout=40)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b, "/": lambda a, b: a / b}
    for r in train + held:
        answer = _solve(r["kind"], r["values"])
        assert answer > 0 and r["answer"] == str(answer)
        assert re.findall(r"\d+", r["prompt"]) and all(str(x) in r["prompt"] for x in r["values"].values())
        steps = r["completion"].removesuffix(f" The answer is {answer}.").rstrip(".").split(". ")
        assert len(steps) == 3
        previous = None
        for step in steps:  # every worked step is true and uses the result before it
            a, op, b, eq, c = step.split()
            assert eq == "=" and ops[op](int(a), int(b)) == int(c)
            assert previous is None or previous in (a, b)
            previous = c
        assert previous == r["answer"]
    assert {r["kind"] for r in held} == {p.kind for p in tasks.PROBLEMS}


# ---------------------------------------------------------------- scoring
def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


EVAL_RECORDS = [
    {"prompt": "Cat?", "completion": "Her cat is called Pumpernickel.", "answer": "Pumpernickel", "fact": "cat"},
    {"prompt": "Tea?", "completion": "Her favourite tea is Keemun.", "answer": "Keemun", "fact": "tea"},
    {"prompt": "Street?", "completion": "She lives on Vellacourt Lane.", "answer": "Vellacourt Lane", "fact": "street"},
    {"prompt": "Sum?", "completion": "3 + 17 = 20. The answer is 20.", "answer": "20", "fact": "sum"},
    {"prompt": "Sum again?", "completion": "3 + 17 = 20. The answer is 20.", "answer": "20", "fact": "sum"},
    {"messages": [{"role": "user", "content": "Van?"}, {"role": "assistant", "content": "Biscuit."}], "fact": "van"},
]
FAKE_OUTPUTS = {
    "Cat?": "  her CAT is called   pumpernickel!",  # exact after normalising case, spaces, trailing punctuation
    "Tea?": "She likes Keemun best, I think.",  # contains the answer, not exact
    "Street?": "She lives on Vellacourt Road.",  # neither
    "Sum?": "3 + 17 = 120",  # contains "20" as a substring, but the final number is wrong
    "Sum again?": "3 + 17 = 20. The answer is 20.",  # exact, contains, final number
    "Van?": "It is called Biscuit",  # no "answer" field: contains looks for the whole completion "biscuit"
}


def test_eval_metrics_on_a_fake_answerer(tmp_path):
    items = evaluate.read_items(_write(tmp_path / "eval.jsonl", EVAL_RECORDS))
    assert [i.prompt for i in items] == list(FAKE_OUTPUTS)
    results = evaluate.evaluate_items(items, lambda item: FAKE_OUTPUTS[item.prompt], progress=False)
    assert [r.exact for r in results] == [True, False, False, False, True, False]
    assert [r.contains for r in results] == [True, True, False, True, True, True]
    assert [r.number for r in results] == [None, None, None, False, True, None]
    summary = evaluate.summarize(results)
    assert (summary.n, summary.exact, summary.contains) == (6, 2 / 6, 5 / 6)
    assert (summary.number, summary.n_number) == (0.5, 2)
    by_fact = evaluate.summarize_by([r.row() for r in results], "fact")
    assert by_fact["sum"].contains == 1.0 and by_fact["sum"].number == 0.5 and by_fact["street"].contains == 0.0
    assert "exact match 33.3% (2/6)" in summary.text()


def test_read_items_scores_only_the_heldout_split_of_a_combined_file(tmp_path):
    records = [{**r, "split": "train" if i < 4 else "eval"} for i, r in enumerate(EVAL_RECORDS)]
    path = _write(tmp_path / "combined.jsonl", records)
    assert [i.prompt for i in evaluate.read_items(path)] == ["Sum again?", "Van?"]
    assert len(evaluate.read_items(path, split="all")) == 6
    assert [i.prompt for i in evaluate.read_items(path, split="all", limit=2)] == ["Cat?", "Tea?"]
    with pytest.raises(ValueError, match="text"):
        evaluate.read_items(_write(tmp_path / "text.jsonl", [{"text": "no question here"}]))


def test_eval_command_writes_one_scored_row_per_example(tmp_path, capsys):
    data = _write(tmp_path / "eval.jsonl", EVAL_RECORDS)
    out = tmp_path / "results.jsonl"
    assert main(["eval", "--model", "tiny", "--backend", "numpy", "--data", str(data), "--out", str(out),
                 "--limit", "3", "--max-new-tokens", "3", "--group-by", "fact", "--no-progress"]) == 0
    rows = evaluate.read_rows(out)
    assert len(rows) == 3
    for row, record in zip(rows, EVAL_RECORDS):
        assert row["fact"] == record["fact"] and row["reference"] == record["completion"]
        assert isinstance(row["output"], str) and isinstance(row["exact"], bool) and isinstance(row["contains"], bool)
    printed = capsys.readouterr().out
    assert "exact match" in printed and "fact = cat" in printed


# ---------------------------------------------------------------- the study
def test_lr_sweep_picks_the_lowest_heldout_loss(monkeypatch, tmp_path):
    """The sweep's best lr (by held-out loss) is trained for the full budget; when the
    sweep already ran the full budget its best run is the final run."""
    from minilars.commands import study

    loss_at = {1e-4: 2.0, 1e-3: 1.0, 1e-2: float("nan")}
    trained = []

    def fake_train(s, p, method, lr, steps, role, out, counter, seed=None):
        trained.append((lr, steps, role))
        ok = lr != 1e-2  # the largest lr diverges
        return study.Run(p.task, method, lr, steps, role, str(tmp_path / f"{lr}-{role}"), [],
                         returncode=0 if ok else 2, final_train_loss=loss_at[lr], eval_loss=loss_at[lr],
                         error=None if ok else "diverged")

    summary = evaluate.Summary(4, 0.25, 0.5, None)
    monkeypatch.setattr(study, "train_run", fake_train)
    monkeypatch.setattr(study, "evaluate_run", lambda *a, **k: {"summary": summary, "by": {}})
    prepared = study.Prepared("personal", tmp_path, tmp_path, 64, 8, None)
    base = {"summary": evaluate.Summary(4, 0.0, 0.0, None), "by": {}}
    short = [(1e-4, 5, "sweep"), (1e-3, 5, "sweep"), (1e-2, 5, "sweep"), (1e-3, 20, "final")]
    full_budget = [(1e-4, 20, "sweep"), (1e-3, 20, "sweep"), (1e-2, 20, "sweep")]
    for sweep_steps, expected in ((5, short), (20, full_budget)):
        trained.clear()
        s = study.Settings("tiny", "numpy", "cpu", 1, ["personal"], ["lora"], 20, 2, {"lora": (1e-4, 1e-3, 1e-2)},
                           sweep_steps, None, 4, 0, None, 0, False)
        row, runs = study.study_method(s, prepared, "lora", base, tmp_path, [0, 4], keep_weights=True)
        assert trained == expected
        assert row["lr"] == 1e-3 and row["contains_before"] == 0.0 and row["contains_after"] == 0.5
        assert [r.role for r in runs].count("final") == 1 and runs[-1 if sweep_steps == 5 else 1].role == "final"


def test_final_runs_repeat_over_seeds_and_the_row_averages_them(monkeypatch, tmp_path):
    """--seeds: the sweep runs with the first seed, the chosen lr is trained once per
    seed, and the row's accuracy (overall and per length) is the seeds' mean, with
    each seed's kept beside it; run directories and labels name the seed."""
    from minilars.commands import study

    trained = []

    def fake_train(s, p, method, lr, steps, role, out, counter, seed=None):
        seed = s.train_seeds[0] if seed is None else seed
        trained.append((lr, steps, role, seed))
        return study.Run(p.task, method, lr, steps, role, str(tmp_path / f"{lr}-{role}-{seed}"), [], returncode=0,
                         final_train_loss=0.1 * (seed + 1), eval_loss=1.0 / lr if role == "sweep" else 0.5,
                         peak_rss_mib=100.0 + seed, wall_s=10.0, s_per_step=1.0, seed=seed)

    right = {0: 0.25, 1: 0.5, 2: 1.0}  # contains-answer of each seed's final run
    def fake_eval(s, p, run, out_file, weights=None):
        rate = right[run.seed]
        return {"summary": evaluate.Summary(4, rate / 2, rate, None),
                "by": {512: evaluate.Summary(2, 0.0, rate, None), 2048: evaluate.Summary(2, 0.0, 1 - rate, None)}}

    monkeypatch.setattr(study, "train_run", fake_train)
    monkeypatch.setattr(study, "evaluate_run", fake_eval)
    prepared = study.Prepared("passkey", tmp_path, tmp_path, 64, 8, "tokens")
    base = {"summary": evaluate.Summary(4, 0.0, 0.0, None), "by": {}}
    s = study.Settings("tiny", "numpy", "cpu", 1, ["passkey"], ["lora"], 20, 2, {"lora": (1e-4, 1e-3)},
                       5, None, 4, 0, None, 7, False, seeds=(2, 0, 1))
    assert study.runs_per_method(s, "lora") == 2 + 1 + 2  # sweep, final, the final again for two more seeds
    row, runs = study.study_method(s, prepared, "lora", base, tmp_path, [0, 5], keep_weights=True)
    assert trained == [(1e-4, 5, "sweep", 2), (1e-3, 5, "sweep", 2), (1e-3, 20, "final", 2),
                       (1e-3, 20, "final", 0), (1e-3, 20, "final", 1)]  # lr 1e-3: the lower held-out loss
    assert row["lr"] == 1e-3 and row["seeds"] == "2 0 1"
    assert row["contains_after"] == pytest.approx((1.0 + 0.25 + 0.5) / 3)
    assert row["exact_after"] == pytest.approx((1.0 + 0.25 + 0.5) / 6)
    assert row["contains_after@512"] == pytest.approx((1.0 + 0.25 + 0.5) / 3)
    assert row["contains_after@2048"] == pytest.approx((0.0 + 0.75 + 0.5) / 3)
    assert row["contains_after_per_seed"] == "100% 25% 50%"
    assert row["final_train_loss"] == pytest.approx((0.3 + 0.1 + 0.2) / 3) and row["peak_rss_mib"] == 102.0
    text = study.markdown(s, [row], 1.0)
    assert "seeds 2, 0, 1" in text and "| 100% 25% 50% |" in text
    with pytest.raises(study.CommandError, match="different seeds"):
        study._seeds("1,1")
    with pytest.raises(study.CommandError, match="integers"):
        study._seeds("0,x")


@pytest.mark.slow
def test_study_quick_runs_end_to_end(tmp_path, monkeypatch):
    """--quick on the tiny preset, two processes at a time: every output written, per-length
    accuracy for passkey, a peak RSS and a finite final loss for every run, rows in --methods
    order (seconds: the tiny preset trains 2 steps)."""
    out = tmp_path / "study"
    monkeypatch.setenv("MINILARS_CACHE", str(tmp_path / "cache"))
    assert main(["study", "accuracy", "--quick", "--out", str(out), "--tasks", "personal,passkey",
                 "--methods", "full,lars", "--jobs", "2"]) == 0
    for task in ("personal", "passkey"):  # the base model's rows, kept for the next study
        kept = [p.read_bytes() for p in (tmp_path / "cache" / "scores").glob("*.jsonl")]
        assert (out / "runs" / task / "base.jsonl").read_bytes() in kept
    for name in ("results.md", "results.csv", "accuracy_vs_step.png", "study.json"):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["task"], r["method"]) for r in rows] == [("personal", "full"), ("personal", "lars"),
                                                        ("passkey", "full"), ("passkey", "lars")]
    for r in rows:
        assert not r["error"]
        assert np.isfinite(float(r["final_train_loss"])) and float(r["peak_rss_mib"]) > 10
        assert 0 <= float(r["contains_after"]) <= 1 and r["steps"] == "2" and r["batch"] == "2"
        assert int(r["n_questions"]) == (8 if r["task"] == "passkey" else 4)  # 4 per passkey length
    passkey = [r for r in rows if r["task"] == "passkey"]
    assert all(r["contains_after@240"] != "" and r["contains_after@256"] != "" for r in passkey)
    assert "after @T=256" in (out / "results.md").read_text()
    study = json.loads((out / "study.json").read_text())
    assert study["settings"]["jobs"] == 2 and "2 at a time" in (out / "results.md").read_text()
    assert all(len(run["curve"]) == 2 for run in study["runs"])  # before and after
    assert not (out / "runs" / "personal" / "full" / "lr-3e-05" / "merged").exists()  # weights deleted once scored


def test_study_writes_its_tables_without_matplotlib(monkeypatch, tmp_path, capsys):
    """matplotlib is an extra: without it the tables are written and the plot is skipped
    with a message (a study once died there after its first run)."""
    from minilars.commands import study

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    s = study.Settings("tiny", "numpy", "cpu", 1, ["personal"], ["lora"], 20, 2, {"lora": (1e-3,)},
                       5, None, 4, 0, None, 0, False)
    study.write_outputs(tmp_path, s, [], [], 1.0)
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.csv").is_file()
    assert not (tmp_path / "accuracy_vs_step.png").exists()
    assert "minilars[plot]" in capsys.readouterr().out


def _rows(flags, metric="contains"):
    return [{"prompt": f"q{i}", metric: f, "exact": False} for i, f in enumerate(flags)]


def test_paired_counts_and_exact_mcnemar_p():
    a = _rows([True] * 5 + [False] * 3 + [True, False])
    b = _rows([True] * 5 + [True] * 3 + [False, False])
    result = evaluate.paired(a, b, "contains")
    assert (result.n, result.right_a, result.right_b, result.only_a, result.only_b) == (10, 6, 8, 1, 3)
    # 1 vs 3 discordant: 2 * P[X <= 1], X ~ Bin(4, 1/2) = 2 * (1 + 4) / 16
    assert result.p_value == pytest.approx(10 / 16)
    assert evaluate.paired(a, a, "contains").p_value == 1.0  # no discordant pair
    with pytest.raises(ValueError, match="same questions"):
        evaluate.paired(a, b[::-1], "contains")


@pytest.mark.parametrize("only_a, only_b", [(8, 6), (0, 7), (14, 10), (3, 30)])
def test_mcnemar_p_matches_scipy_binomtest(only_a, only_b):
    stats = pytest.importorskip("scipy.stats")
    result = evaluate.Paired("contains", 80, 50, 50, only_a, only_b)
    assert result.p_value == pytest.approx(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)


def test_study_compare_prints_each_metric_and_refuses_other_questions(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    evaluate.write_rows(a, _rows([True, False, True]))
    evaluate.write_rows(b, _rows([True, True, False]))
    assert main(["study", "compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "contains: A 2/3, B 2/3; only A right 1, only B right 1" in out and "exact: A 0/3" in out
    evaluate.write_rows(b, _rows([True, True]))
    assert main(["study", "compare", str(a), str(b)]) == 2


def test_study_compare_pools_pairs_and_splits_by_a_field(tmp_path, capsys):
    """Two seeds' pairs pooled (their counts add up) and split by passkey length: the
    counts are worked out by hand from the rows below."""
    def rows(flags):
        return [{"prompt": f"q{i}", "tokens": 512 if i < 2 else 2048, "contains": f, "exact": False}
                for i, f in enumerate(flags)]

    files = {}
    for name, flags in {"a0": [True, True, True, False], "b0": [True, False, False, False],
                        "a1": [False, True, True, True], "b1": [True, True, False, False]}.items():
        files[name] = tmp_path / f"{name}.jsonl"
        evaluate.write_rows(files[name], rows(flags))
    pairs = [str(files[n]) for n in ("a0", "b0", "a1", "b1")]
    assert main(["study", "compare", *pairs, "--group-by", "tokens"]) == 0
    out = capsys.readouterr().out.splitlines()
    # all 8: A 6, B 3; only A: seed 0 q1, q2; seed 1 q2, q3 -> 4; only B: seed 1 q0 -> 1; p = 2 * 6/32
    assert "contains: A 6/8, B 3/8; only A right 4, only B right 1; exact McNemar p = 0.38" in out
    assert "tokens = 512, contains: A 3/4, B 3/4; only A right 1, only B right 1; exact McNemar p = 1" in out
    assert "tokens = 2048, contains: A 3/4, B 0/4; only A right 3, only B right 0; exact McNemar p = 0.25" in out
    assert main(["study", "compare", *pairs[:3]]) == 2  # an odd number of files
    assert "in pairs" in capsys.readouterr().err
    assert main(["study", "compare", *pairs, "--group-by", "depth"]) == 2
    assert "'depth'" in capsys.readouterr().err


def test_paired_text_keeps_small_p_values_readable():
    """13 vs 0 discordant questions: p = 2 / 2^13, printed as 0.00024, not rounded to 0."""
    text = evaluate.Paired("contains", 120, 117, 104, 13, 0).text()
    assert text.endswith("only A right 13, only B right 0; exact McNemar p = 0.00024")
    assert evaluate.Paired("contains", 80, 50, 50, 8, 9).text().endswith("p = 1")
