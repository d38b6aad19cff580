"""`minilars eval`: held-out accuracy of a model (and adapter) on a JSONL file.

    minilars eval --model smollm2-135m --adapter runs/notes --data heldout.jsonl --out results.jsonl

Each prompt is answered greedily (through the chat template for instruct models,
as fine-tuning renders it) and scored by exact match and contains-answer
(minilars/evaluate.py says how); one JSON row per example goes to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

from minilars.files import LineWriter

from .common import add_model_options


def add_parser(sub) -> None:
    parser = sub.add_parser("eval", help="held-out accuracy (exact match, contains answer) of greedy answers",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--adapter", default=None, help="a PEFT adapter directory saved by minilars finetune")
    parser.add_argument("--data", required=True, help="eval file: JSONL of {prompt, completion[, answer]} or "
                        "{messages[, answer]} records")
    parser.add_argument("--split", default="auto", choices=("auto", "all"),
                        help="auto: when records mark a split, score only the 'eval' ones; all: every record "
                             "(default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="longest answer generated (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write one JSON row per example here (prompt, reference, "
                        "answer, output, exact, contains; the record's other fields kept)")
    parser.add_argument("--group-by", default=None, metavar="FIELD",
                        help="also print accuracy per value of this record field (e.g. tokens for passkey lengths)")
    parser.add_argument("--show", type=int, default=3, help="print this many answers (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from minilars import evaluate
    from minilars.peft_io import load_adapter

    from .common import load_model_from_args

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    items = evaluate.read_items(args.data, args.split, args.limit)
    model, tokenizer = load_model_from_args(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer")
    if args.adapter:
        load_adapter(model, args.adapter)
    with LineWriter(args.out) if args.out else nullcontext() as out:  # a failed write: one line, old file kept
        def write(result):  # row by row, so an interrupted run keeps what it scored
            if out is not None:
                out.write(json.dumps(result.row(), ensure_ascii=False))

        results = evaluate.evaluate_items(items, evaluate.model_answerer(model, tokenizer, args.max_new_tokens),
                                          progress=args.progress, on_result=write)
    for r in results[:args.show]:
        print(f"Q: {_short(r.item.prompt)}")
        print(f"   reference: {r.item.reference}")
        print(f"   output:    {r.output!r}" + ("  [exact]" if r.exact else "  [contains answer]" if r.contains else ""))
    what = args.model + (f" + {args.adapter}" if args.adapter else "")
    print(f"{what} on {args.data}: {evaluate.summarize(results).text()}")
    if args.group_by:
        rows = [r.row() for r in results]
        for value, summary in evaluate.summarize_by(rows, args.group_by).items():
            print(f"  {args.group_by} = {value}: {summary.text()}")
    if args.out:
        print(f"wrote {len(results)} rows to {args.out}")
    sys.stdout.flush()
    return 0


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else f"{text[:width // 2 - 2]} ... {text[-(width // 2 - 3):]}"
