"""Seeded task generators for the accuracy study: train and held-out JSONL.

Three tasks, each written as `train.jsonl` and `heldout.jsonl` of
{"prompt", "completion", "answer", "split", "task", "template", ...} records
(the format `minilars finetune --data` and `minilars eval --data` read). The
held-out questions are asked in wordings that never occur in training (the
`template` field names the wording), so held-out accuracy measures whether a
model learned the content, not a sentence.

    personal    40 invented facts about Mira Okonkwo-Lind (minilars/data/
                make_personal_notes.py), each asked in its 4 training and its 2
                held-out phrasings; values nobody could guess.
    passkey     a 5-digit pass key hidden at a random depth in filler text
                (Mohtashami & Jaggi 2023, "Landmark Attention", section 4.2);
                train at T = 512 tokens, held out at T = 512, 1024, 2048.
    arithmetic  short multi-step word problems (3 operations, integers) with a
                worked solution ending "The answer is N."

Everything is a pure function of the seed: the same seed writes the same bytes.
Every sentence here (facts, filler, problem templates) was written for minilars
and is released with it under CC0 1.0, like minilars/data/personal_notes.jsonl.

Lengths: a passkey example at T tokens has a prompt of T - RESERVE tokens, so the
whole rendered example (chat template, answer) fits a row of T tokens. Tokens are
counted with a tokenizer when one is given (`count_tokens`); without one they are
estimated as characters / CHARS_PER_TOKEN, the ratio the SmolLM2 tokenizer gives
on passkey prompts (4.44 characters per token, measured over 160 prompts;
the estimate of one prompt was off by -3 % to +6 %, so count with the tokenizer
when rows must fit exactly, as `minilars study` does).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

TASKS = ("personal", "passkey", "arithmetic")
SEED = 0

# ---------------------------------------------------------------- personalisation
# Facts whose value a model could guess without having learned it (a yes/no, one of
# four seasons, a common board game...). The task keeps the first 40 of the others.
GUESSABLE = ("number", "season", "shoe_size", "blood_type", "board_game", "fear", "diet", "hand", "moved", "car",
             "coffee", "dance", "star_sign")
N_FACTS = 40


def personal(seed: int = SEED, n_facts: int = N_FACTS) -> tuple[list[dict], list[dict]]:
    """(train, held-out): 4 training phrasings x n_facts, 2 held-out phrasings x n_facts.

    The facts and phrasings are those of the built-in personal-notes set; the seed
    draws the name variant in each training question and the record order."""
    from .data.make_personal_notes import FACTS, NAME_VARIANTS

    facts = [f for f in FACTS if f[0] not in GUESSABLE][:n_facts]
    if len(facts) < n_facts:
        raise ValueError(f"only {len(facts)} unguessable facts are available, {n_facts} asked for")
    rng = np.random.default_rng([seed, 1])
    train, held = [], []
    for key, answer, completion, train_questions, held_questions in facts:
        for i, question in enumerate(train_questions):
            name = NAME_VARIANTS[int(rng.integers(len(NAME_VARIANTS)))]
            train.append(_record("personal", question.format(m=name), completion, answer, "train",
                                 f"{key}/train-{i}", fact=key))
        for i, question in enumerate(held_questions):
            held.append(_record("personal", question, completion, answer, "eval", f"{key}/heldout-{i}", fact=key))
    return _shuffled(train, rng), _shuffled(held, rng)


# ---------------------------------------------------------------- passkey retrieval
CHARS_PER_TOKEN = 4.44  # SmolLM2 tokenizer on passkey prompts (see the module docstring)
RESERVE = 48  # tokens left for the chat template and the answer
TRAIN_T = 512
HELDOUT_T = (512, 1024, 2048)

# Bland sentences with no digits, so the key is the only number in the text.
FILLER = (
    "The river bends twice before it reaches the old mill.",
    "Most of the houses on the hill have green doors.",
    "A light wind moves the tall grass along the path.",
    "The market opens early and closes well before dusk.",
    "Somebody has left a blue umbrella by the station gate.",
    "The library keeps its maps in a drawer near the window.",
    "Clouds gather over the valley most afternoons in spring.",
    "The baker sweeps the step outside his shop every morning.",
    "A narrow bridge crosses the canal behind the school.",
    "The orchard is quiet except for the bees.",
    "Children fly kites on the common when the weather allows.",
    "The ferry waits at the pier until the bell rings.",
    "Moss grows thickly on the north side of the wall.",
    "The lamps along the harbour come on one after another.",
    "An old dog sleeps in the shade of the cart.",
    "The road to the coast is lined with poplars.",
    "Rain drums softly on the tin roof of the shed.",
    "The clock in the square runs a little slow.",
    "Fishermen mend their nets on the stones by the slipway.",
    "The garden smells of thyme after a warm day.",
)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_COMPLETION = "The pass key is {key}."
# (intro before the text, question after it): training wordings, then held-out ones.
PASSKEY_TRAIN = (
    ("There is a pass key hidden in the text below. Find it and remember it.", "What is the pass key?"),
    ("A pass key is hidden somewhere in this text. Memorise it.", "Which pass key is hidden in the text?"),
    ("Read the following text. It contains a pass key.", "Tell me the pass key."),
    ("Find the pass key in the text that follows.", "What is the pass key mentioned in the text?"),
)
PASSKEY_HELDOUT = (
    ("Read these notes carefully; one line matters more than the rest.",
     "Somewhere above, a five-digit code was given. Which code was it?"),
    ("Below is a long passage about a small town.",
     "The passage contained a secret number. What was that number?"),
)


def passkey_example(rng: np.random.Generator, T: int, intro: str, question: str,
                    count_tokens: Callable[[str], int] | None = None) -> dict:
    """One passkey prompt of about T - RESERVE tokens (at most that when counted with
    a tokenizer): intro, filler with the key sentence after a random number of filler
    sentences, question. Returns the prompt and where the key is."""
    count = count_tokens or (lambda text: int(np.ceil(len(text) / CHARS_PER_TOKEN)))
    budget = T - RESERVE
    if budget < 16:
        raise ValueError(f"T = {T} leaves no room for filler (at least {RESERVE + 16} tokens)")
    key = f"{int(rng.integers(10_000, 100_000))}"
    depth = float(rng.uniform())
    order = rng.integers(len(FILLER), size=budget)  # more sentences than can ever fit

    def build(n: int) -> tuple[str, int, int]:
        at = int(round(depth * n))  # filler sentences before the key
        sentences = [FILLER[i] for i in order[:n]]
        head = f"{intro}\n\n" + "".join(s + " " for s in sentences[:at])
        body = head + KEY_SENTENCE.format(key=key) + "".join(" " + s for s in sentences[at:])
        return f"{body}\n\n{question}", len(head), at

    mean_len = float(np.mean([len(s) + 1 for s in FILLER]))
    n = max(0, int((budget * CHARS_PER_TOKEN - len(intro) - len(question) - 60) / mean_len))
    while n > 0 and count(build(n)[0]) > budget:
        n -= 1
    if count(build(0)[0]) > budget:
        raise ValueError(f"T = {T}: the intro, key and question alone take more than {budget} tokens")
    while n < budget and count(build(n + 1)[0]) <= budget:
        n += 1
    prompt, key_offset, at = build(n)
    return {"prompt": prompt, "completion": PASSKEY_COMPLETION.format(key=key), "answer": key,
            "tokens": T, "prompt_tokens": count(prompt), "depth": at / n if n else 0.0,
            "key_offset": key_offset, "filler_sentences": n}


def passkey(seed: int = SEED, n_train: int = 200, n_heldout: int = 40, train_T: int = TRAIN_T,
            heldout_T: tuple[int, ...] = HELDOUT_T,
            count_tokens: Callable[[str], int] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out): n_train examples at train_T in the training wordings;
    n_heldout examples at each held-out T in the held-out wordings."""
    rng = np.random.default_rng([seed, 2])
    train, held = [], []
    for i in range(n_train):
        t = i % len(PASSKEY_TRAIN)
        intro, question = PASSKEY_TRAIN[t]
        ex = passkey_example(rng, train_T, intro, question, count_tokens)
        train.append(_record("passkey", ex.pop("prompt"), ex.pop("completion"), ex.pop("answer"), "train",
                             f"train-{t}", **ex))
    for T in heldout_T:
        for i in range(n_heldout):
            t = i % len(PASSKEY_HELDOUT)
            intro, question = PASSKEY_HELDOUT[t]
            ex = passkey_example(rng, T, intro, question, count_tokens)
            held.append(_record("passkey", ex.pop("prompt"), ex.pop("completion"), ex.pop("answer"), "eval",
                                f"heldout-{t}", **ex))
    return train, held


# ---------------------------------------------------------------- arithmetic
NAMES = ("Tavi", "Oren", "Lusa", "Kofi", "Ines", "Marek", "Yara", "Bram", "Suki", "Nilo", "Edda", "Joss")


@dataclass(frozen=True)
class Problem:
    """A kind of 3-step problem: numbers drawn by `draw`, solved step by step by `solve`."""

    kind: str
    draw: Callable[[np.random.Generator], dict]
    solve: Callable[[dict], list[tuple[str, int]]]  # [(step text, value)], the last value is the answer
    train: tuple[str, ...]  # 4 wordings
    heldout: tuple[str, ...]  # 2 other wordings


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b, "/": lambda a, b: a // b}


def _chain(first: int, *ops: tuple[str, int]) -> list[tuple[str, int]]:
    """The worked steps of first op1 b1 op2 b2 ... left to right: [("7 x 3 = 21", 21), ...]."""
    steps, value = [], first
    for op, operand in ops:
        result = _OPS[op](value, operand)
        steps.append((f"{value} {op} {operand} = {result}", result))
        value = result
    return steps


def _draw_bus(r):
    a = int(r.integers(20, 61))
    b = int(r.integers(2, a // 2))
    c = int(r.integers(2, 20))
    d = int(r.integers(2, (a - b + c) // 2))
    return {"a": a, "b": b, "c": c, "d": d}


def _draw_trays(r):
    n, m = int(r.integers(2, 10)), int(r.integers(3, 13))
    return {"n": n, "m": m, "s": int(r.integers(1, n * m)), "k": int(r.integers(2, 20))}


def _draw_savings(r):
    a, w, k = int(r.integers(5, 50)), int(r.integers(2, 15)), int(r.integers(2, 9))
    return {"a": a, "w": w, "k": k, "s": int(r.integers(1, a + w * k))}


def _draw_sweets(r):
    z, t, y = int(r.integers(2, 7)), int(r.integers(1, 4)), int(r.integers(3, 13))
    return {"x": z * t, "y": y, "z": z, "e": int(r.integers(1, t * y))}  # x * y shares out evenly among z


PROBLEMS = (
    Problem("bus", _draw_bus, lambda v: _chain(v["a"], ("-", v["b"]), ("+", v["c"]), ("-", v["d"])),
            train=(
                "A bus leaves with {a} passengers. At the first stop {b} get off and {c} get on. "
                "At the second stop {d} get off. How many passengers are on the bus now?",
                "{a} people are on a bus. {b} people get off, then {c} people get on, "
                "then {d} people get off. How many people are on the bus?",
                "There are {a} riders on a bus. First {b} leave and {c} board. "
                "Later {d} more leave. How many riders remain?",
                "{name}'s bus starts with {a} passengers. {b} step off, "
                "{c} step on, and then {d} step off. How many passengers are left?",
            ),
            heldout=(
                "{name} counts {a} travellers on the morning coach. "
                "After one halt the coach has lost {b} and gained {c}; "
                "after the next it has lost another {d}. What is the count now?",
                "Starting from {a} seated passengers, subtract the {b} who alight, "
                "add the {c} who climb aboard, and subtract the {d} who alight later. What number do you get?",
            )),
    Problem("trays", _draw_trays, lambda v: _chain(v["n"], ("x", v["m"]), ("-", v["s"]), ("+", v["k"])),
            train=(
                "A baker fills {n} trays with {m} rolls each. "
                "She sells {s} rolls and then bakes {k} more. How many rolls does she have?",
                "{name} bakes {n} trays of {m} rolls. {s} rolls are sold. "
                "Then {k} more rolls are baked. How many rolls are there now?",
                "There are {n} trays holding {m} rolls each. After {s} rolls are sold, "
                "{k} new rolls are added. How many rolls are there?",
                "A bakery makes {n} trays of {m} rolls, sells {s} of them, "
                "and bakes {k} extra. How many rolls does the bakery have?",
            ),
            heldout=(
                "{name} lays out rolls in {n} rows of {m}. Customers take away {s}, "
                "and a fresh batch of {k} comes out of the oven. How many rolls are on the counter?",
                "Each of {n} baking sheets carries {m} buns. "
                "Once {s} buns have gone to customers and {k} have been added, what is the total number of buns?",
            )),
    Problem("savings", _draw_savings, lambda v: _chain(v["w"], ("x", v["k"]), ("+", v["a"]), ("-", v["s"])),
            train=(
                "{name} has {a} coins. She saves {w} coins a week for {k} weeks, "
                "then spends {s} coins. How many coins does she have?",
                "A jar holds {a} coins. {w} coins are added every week for {k} weeks. "
                "Then {s} coins are taken out. How many coins are in the jar?",
                "{name} starts with {a} coins and puts away {w} coins each week for {k} weeks. "
                "Then {name} spends {s} coins. How many coins are left?",
                "There are {a} coins in a box. For {k} weeks, {w} coins are added each week. "
                "Afterwards {s} coins are spent. How many coins remain?",
            ),
            heldout=(
                "Over {k} weeks {name} drops {w} coins a week into a money box that already held {a}. "
                "After buying a present for {s} coins, what is left in the box?",
                "A savings tin begins at {a} coins, grows by {w} coins weekly for {k} weeks, "
                "and loses {s} coins at the end. What does the tin contain?",
            )),
    Problem("sweets", _draw_sweets, lambda v: _chain(v["x"], ("x", v["y"]), ("/", v["z"]), ("-", v["e"])),
            train=(
                "{name} has {x} bags with {y} sweets in each. The sweets are shared equally among {z} children. "
                "Each child eats {e} sweets. How many sweets does each child have left?",
                "There are {x} bags of {y} sweets. They are split evenly between {z} children, "
                "and each child eats {e}. How many sweets does one child have now?",
                "{x} bags each hold {y} sweets. {z} children share them equally. "
                "Then every child eats {e} sweets. How many sweets are left for each child?",
                "A teacher has {x} bags of sweets with {y} in each bag. She gives them out equally to {z} children, "
                "who each eat {e}. How many sweets does each child still have?",
            ),
            heldout=(
                "{name} empties {x} packets, each with {y} toffees, "
                "and deals the toffees out fairly to {z} friends. "
                "If every friend then eats {e}, how many toffees does a friend keep?",
                "Share the contents of {x} packs of {y} sweets evenly among {z} people, "
                "then take {e} away from each share. How big is one share?",
            )),
)


def arithmetic_example(rng: np.random.Generator, problem: Problem, template: str) -> dict:
    values = problem.draw(rng)
    name = NAMES[int(rng.integers(len(NAMES)))]
    steps = problem.solve(values)
    answer = str(steps[-1][1])
    completion = ". ".join(text for text, _ in steps) + f". The answer is {answer}."
    return {"prompt": template.format(name=name, **values), "completion": completion, "answer": answer,
            "kind": problem.kind, "values": values}


def arithmetic(seed: int = SEED, n_train: int = 400, n_heldout: int = 80) -> tuple[list[dict], list[dict]]:
    """(train, held-out): problems cycling through the kinds, each in a random wording
    of its split."""
    rng = np.random.default_rng([seed, 3])
    out = {"train": [], "eval": []}
    for split, n in (("train", n_train), ("eval", n_heldout)):
        for i in range(n):
            problem = PROBLEMS[i % len(PROBLEMS)]
            wordings = problem.train if split == "train" else problem.heldout
            t = int(rng.integers(len(wordings)))
            ex = arithmetic_example(rng, problem, wordings[t])
            out[split].append(_record("arithmetic", ex.pop("prompt"), ex.pop("completion"), ex.pop("answer"), split,
                                      f"{problem.kind}/{'train' if split == 'train' else 'heldout'}-{t}", **ex))
    return out["train"], out["eval"]


# ---------------------------------------------------------------- writing
@dataclass(frozen=True)
class TaskSizes:
    """How many examples each generator writes, and the passkey lengths."""

    personal_facts: int = N_FACTS
    passkey_train: int = 200
    passkey_heldout: int = 40  # per held-out T
    passkey_train_T: int = TRAIN_T
    passkey_heldout_T: tuple[int, ...] = HELDOUT_T
    arithmetic_train: int = 400
    arithmetic_heldout: int = 80

    @classmethod
    def quick(cls) -> "TaskSizes":
        """Small sets for smoke tests. The passkey lengths fit the tiny preset's 256-token
        context; with its character tokenizer they hold only the key and a sentence or two."""
        return cls(passkey_train=16, passkey_heldout=4, passkey_train_T=240, passkey_heldout_T=(240, 256),
                   arithmetic_train=32, arithmetic_heldout=8)


def generate(task: str, seed: int = SEED, sizes: TaskSizes = TaskSizes(),
             count_tokens: Callable[[str], int] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records of one task."""
    if task == "personal":
        return personal(seed, sizes.personal_facts)
    if task == "passkey":
        return passkey(seed, sizes.passkey_train, sizes.passkey_heldout, sizes.passkey_train_T,
                       sizes.passkey_heldout_T, count_tokens)
    if task == "arithmetic":
        return arithmetic(seed, sizes.arithmetic_train, sizes.arithmetic_heldout)
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def write_tasks(out: str | Path, tasks: tuple[str, ...] = TASKS, seed: int = SEED, sizes: TaskSizes = TaskSizes(),
                count_tokens: Callable[[str], int] | None = None, tokenizer_name: str | None = None) -> dict:
    """Write OUT/<task>/train.jsonl and heldout.jsonl for each task and OUT/tasks.json
    (seed, sizes, how lengths were counted, counts). Returns that manifest."""
    out = Path(out)
    manifest = {"seed": seed, "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.__dict__.items()},
                "lengths_counted_with": tokenizer_name or f"characters / {CHARS_PER_TOKEN}", "tasks": {}}
    for task in tasks:
        train, held = generate(task, seed, sizes, count_tokens)
        (out / task).mkdir(parents=True, exist_ok=True)
        for name, records in (("train.jsonl", train), ("heldout.jsonl", held)):
            write_jsonl(out / task / name, records)
        manifest["tasks"][task] = {"train": len(train), "heldout": len(held)}
    (out / "tasks.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _record(task: str, prompt: str, completion: str, answer: str, split: str, template: str, **meta) -> dict:
    return {"prompt": prompt, "completion": completion, "answer": answer, "split": split, "task": task,
            "template": template, **meta}


def _shuffled(records: list[dict], rng: np.random.Generator) -> list[dict]:
    return [records[i] for i in rng.permutation(len(records))]


__all__ = ["CHARS_PER_TOKEN", "FILLER", "HELDOUT_T", "PROBLEMS", "RESERVE", "TASKS", "TRAIN_T", "TaskSizes",
           "arithmetic", "generate", "passkey", "passkey_example", "personal", "read_jsonl", "write_tasks"]
