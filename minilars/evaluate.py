"""Held-out accuracy: greedy answers to prompts, scored by exact match and contains-answer.

For each record of an eval file ({"prompt", "completion"} or {"messages"} per line,
as `minilars finetune` reads them) the model answers the prompt greedily, through
the same chat template the fine-tuning used, and the answer is scored three ways:

    exact      normalise(output) == normalise(reference completion)
    contains   normalise(answer) is a substring of normalise(output), where answer is
               the record's "answer" field if it has one, else the completion
    number     (records whose answer is an integer) the last number in the output
               equals it: `contains` would also credit "120" for the answer 20

normalise = lower case, whitespace collapsed, surrounding punctuation and quotes
removed (minilars.data.normalize, the same scoring `minilars finetune` prints).

The generation is a function `answer(item) -> str` handed to `evaluate_items`, so
the scoring can be checked against a fake model; `model_answerer` builds the real one.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data import contains_answer, exact_match, normalize
from .pretrained import load_model  # re-exported: the one loader ('tiny' is the model finetune --model tiny trains)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class EvalItem:
    """One held-out question: what is asked, what the reference says, and the rest of
    its record (task fields such as "tokens" for passkey lengths)."""

    where: str  # "file.jsonl:12"
    prompt: str  # the last user turn
    reference: str  # the completion / last assistant turn
    answer: str  # what contains-answer looks for ("answer" field, else the reference)
    record: dict = field(default_factory=dict)  # the JSON object as read


@dataclass
class Scored:
    item: EvalItem
    output: str
    exact: bool
    contains: bool
    number: bool | None  # None when the answer is not an integer

    def row(self) -> dict:
        """The JSONL row: the record's fields, then the output and its scores."""
        row = {k: v for k, v in self.item.record.items() if k not in ("messages",)}
        row.update(prompt=self.item.prompt, reference=self.item.reference, answer=self.item.answer,
                   output=self.output, exact=self.exact, contains=self.contains)
        if self.number is not None:
            row["number"] = self.number
        return row


@dataclass
class Summary:
    n: int
    exact: float
    contains: float
    number: float | None  # over the items with an integer answer
    n_number: int = 0

    def text(self) -> str:
        if not self.n:
            return "no examples"
        parts = [f"exact match {self.exact:.1%} ({round(self.exact * self.n)}/{self.n})",
                 f"contains answer {self.contains:.1%} ({round(self.contains * self.n)}/{self.n})"]
        if self.number is not None:
            parts.append(f"final number {self.number:.1%} ({round(self.number * self.n_number)}/{self.n_number})")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------- scoring
def is_integer(text: str) -> bool:
    return bool(_INTEGER.fullmatch(text.strip()))


def final_number(output: str, answer: str) -> bool:
    """The last number written in `output` equals the integer `answer`."""
    numbers = _NUMBER.findall(output.replace(",", ""))
    return bool(numbers) and numbers[-1] == answer.strip()


def score(item: EvalItem, output: str) -> Scored:
    return Scored(item, output, exact_match(output, item.reference), contains_answer(output, item.answer),
                  final_number(output, item.answer) if is_integer(item.answer) else None)


def summarize(scored: list[Scored] | list[dict]) -> Summary:
    """Rates over Scored results or over JSONL rows written by `Scored.row`."""
    rows = [s.row() if isinstance(s, Scored) else s for s in scored]
    n = len(rows)
    numeric = [r["number"] for r in rows if r.get("number") is not None]
    rate = lambda key: sum(r[key] for r in rows) / n if n else 0.0
    return Summary(n, rate("exact"), rate("contains"), sum(numeric) / len(numeric) if numeric else None, len(numeric))


def summarize_by(rows: list[dict], key: str) -> dict:
    """{value of `key`: Summary} over the rows that have the key, in sorted order."""
    groups: dict = {}
    for r in rows:
        if key in r:
            groups.setdefault(r[key], []).append(r)
    return {k: summarize(groups[k]) for k in sorted(groups)}


@dataclass(frozen=True)
class Paired:
    """Two runs scored on the same questions, one metric: how many each got right, how
    many only one of them did, and the exact McNemar p-value of those discordant
    counts (two-sided binomial test of only_a vs only_b at 1/2)."""

    metric: str
    n: int
    right_a: int
    right_b: int
    only_a: int
    only_b: int

    @property
    def p_value(self) -> float:
        """2 * P[X <= min(only_a, only_b)], X ~ Binomial(only_a + only_b, 1/2), capped at 1."""
        m, k = self.only_a + self.only_b, min(self.only_a, self.only_b)
        if m == 0:
            return 1.0
        return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)

    def text(self) -> str:
        return (f"{self.metric}: A {self.right_a}/{self.n}, B {self.right_b}/{self.n}; only A right {self.only_a}, "
                f"only B right {self.only_b}; exact McNemar p = {self.p_value:.2g}")


def paired(rows_a: list[dict], rows_b: list[dict], metric: str) -> Paired:
    """Compare two eval outputs (rows written by `Scored.row`) question by question;
    both must hold the same prompts in the same order."""
    if [r["prompt"] for r in rows_a] != [r["prompt"] for r in rows_b]:
        raise ValueError("the two eval files do not hold the same questions in the same order")
    pairs = [(bool(a[metric]), bool(b[metric])) for a, b in zip(rows_a, rows_b)
             if a.get(metric) is not None and b.get(metric) is not None]
    return Paired(metric, len(pairs), sum(a for a, _ in pairs), sum(b for _, b in pairs),
                  sum(a and not b for a, b in pairs), sum(b and not a for a, b in pairs))


def evaluate_items(items: list[EvalItem], answer: Callable[[EvalItem], str], progress: bool = True,
                   on_result: Callable[[Scored], None] | None = None) -> list[Scored]:
    """Answer and score every item in order (tqdm bar on stderr when progress)."""
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="q", desc="eval", file=sys.stderr, dynamic_ncols=True)
    results, right = [], 0
    try:
        for item in items:
            result = score(item, answer(item))
            results.append(result)
            right += result.contains
            if on_result is not None:
                on_result(result)
            if bar is not None:
                bar.set_postfix_str(f"contains answer {right}/{len(results)}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


# ---------------------------------------------------------------- reading
def read_items(path: str | Path, split: str = "auto", limit: int | None = None) -> list[EvalItem]:
    """EvalItems from a JSONL file. split "auto": when records mark a split, only the
    "eval" ones (a combined train/held-out file scores its held-out part); "all":
    every record. limit keeps the first N."""
    from .data import DataError, iter_jsonl, parse_record

    if split not in ("auto", "all"):
        raise ValueError(f"split must be 'auto' or 'all', got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such eval file")
    pairs = []
    for where, obj in iter_jsonl(path):
        record = parse_record(obj, where)
        if record.messages is None:
            raise DataError(f"{where}: a {{\"text\"}} record has no question to answer; eval needs "
                            "{\"prompt\", \"completion\"} or {\"messages\"} records")
        pairs.append((obj, record))
    if split == "auto" and any(r.split is not None for _, r in pairs):
        pairs = [(o, r) for o, r in pairs if r.split == "eval"]
    items = []
    for obj, record in pairs[:limit]:
        last = max(i for i, (role, _) in enumerate(record.messages) if role == "assistant")
        prompt = next((c for role, c in reversed(record.messages[:last]) if role == "user"), "")
        reference = record.messages[last][1]
        items.append(EvalItem(record.where, prompt, reference, record.answer or reference, obj))
    if not items:
        raise ValueError(f"{path}: no records to evaluate")
    return items


# ---------------------------------------------------------------- the model
def model_answerer(model, tokenizer, max_new_tokens: int = 32) -> Callable[[EvalItem], str]:
    """answer(item): greedy generation from the item's prompt, rendered and tokenized as
    fine-tuning renders it (minilars.data.tokenize: chat template for instruct models,
    prompt + completion for base models), stopped at eos / end of turn."""
    from .data import parse_record, stop_ids_of, tokenize
    from .generate import generate_ids

    stop = stop_ids_of(tokenizer)

    def answer(item: EvalItem) -> str:
        example = tokenize(parse_record(item.record, item.where), tokenizer)
        out = list(generate_ids(model, list(example.prompt_ids), max_new_tokens, temperature=0.0, stop_ids=stop))
        return tokenizer.decode(out, skip_special_tokens=True)

    return answer


def load_tokenizer(spec: str):
    """The tokenizer of a model spec without loading its weights (for counting tokens)."""
    if spec == "tiny":
        from .config import preset
        from .data import char_tokenizer

        return char_tokenizer(preset("tiny").vocab_size)
    from .models import Tokenizer, resolve_model

    path = resolve_model(spec)
    if path.is_dir():
        conf = path / "tokenizer_config.json"
        return Tokenizer.from_file(path / "tokenizer.json", conf if conf.is_file() else None)
    return Tokenizer.from_gguf(path)


# Per-example results are JSONL rows, written and read like the task files.
from .tasks import read_jsonl as read_rows  # noqa: E402
from .tasks import write_jsonl as write_rows  # noqa: E402


__all__ = ["EvalItem", "Paired", "Scored", "Summary", "evaluate_items", "final_number", "load_model", "load_tokenizer",
           "model_answerer", "normalize", "paired", "read_items", "read_rows", "score", "summarize", "summarize_by",
           "write_rows"]
