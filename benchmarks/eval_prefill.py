"""finetune's held-out scoring: one prefill per prompt against the two passes it replaced.

`minilars finetune --eval-samples N` (and so every curve point of `minilars study
accuracy`) scores N held-out questions: their loss and their greedy answers. It used to
run the prompts twice, once inside the loss's forward over packed rows
(train.eval_loss) and once as the answers' prefill (train.generate_answers).
train.evaluate now prefills each prompt once and takes both from it
(train.loss_and_answers). This times the two in one process, interleaved (old new new
old, new old old new, ...), on SmolLM2-135M and the passkey questions at the training
length, and prints the median seconds of each and their ratio per round.

    python benchmarks/eval_prefill.py --questions 8 --rounds 2 --backend numba

The questions come from `minilars study make-tasks` (written to a temporary folder
unless --tasks-dir names one).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8, help="passkey questions at T = 512 (default: 8)")
    parser.add_argument("--batch-size", type=int, default=2, help="finetune's --batch-size (default: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of old, new (default: 2)")
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--tasks-dir", default=None, help="make-tasks output with passkey/heldout.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    from minilars import tasks
    from minilars.data import parse_record, stop_ids_of, tokenize
    from minilars.evaluate import load_model, load_tokenizer
    from minilars.train import eval_loss, evaluate, generate_answers

    tokenizer = load_tokenizer("smollm2-135m")
    task_dir = Path(args.tasks_dir) if args.tasks_dir else Path(tempfile.mkdtemp()) / "tasks"
    if not (task_dir / "passkey" / "heldout.jsonl").is_file():
        tasks.write_tasks(task_dir, ("passkey",), 0, tasks.TaskSizes(),
                          lambda text: len(tokenizer.encode(text)), "the smollm2-135m tokenizer")
    records = [r for r in tasks.read_jsonl(task_dir / "passkey" / "heldout.jsonl") if r["tokens"] == 512]
    examples = [tokenize(parse_record(r, f"q{i}"), tokenizer) for i, r in enumerate(records[:args.questions])]
    seq_len = 16 * -(-max(len(ex.ids) for ex in examples) // 16)
    model, _ = load_model("smollm2-135m", backend=args.backend)
    stop, pad = stop_ids_of(tokenizer), 0

    def old():
        loss = eval_loss(model, examples, seq_len, args.batch_size, pad)
        return loss, generate_answers(model, tokenizer, [ex.prompt_ids for ex in examples], args.max_new_tokens, stop)

    def new():
        result = evaluate(model, tokenizer, examples, 0, seq_len, args.batch_size, pad, stop, args.max_new_tokens)
        return result.loss, [a.output for a in result.answers]

    times: dict[str, list[float]] = {"old": [], "new": []}
    outputs = {}
    for r in range(args.rounds):
        for name in (("old", "new", "new", "old") if r % 2 == 0 else ("new", "old", "old", "new")):
            started = time.perf_counter()
            outputs[name] = (old if name == "old" else new)()
            times[name].append(time.perf_counter() - started)
    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    print(f"{len(examples)} passkey questions, prompts {min(len(ex.prompt_ids) for ex in examples)}-"
          f"{max(len(ex.prompt_ids) for ex in examples)} tokens, rows of T = {seq_len}, batch {args.batch_size}, "
          f"{args.backend}, {args.rounds} rounds")
    print(f"two passes (eval_loss + generate_answers): median {statistics.median(times['old']):.2f} s")
    print(f"one prefill (evaluate):                   median {statistics.median(times['new']):.2f} s")
    print(f"one / two: {statistics.median(ratios):.3f} (per pair {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"loss: two passes {outputs['old'][0]:.4f} (packed rows), one prefill {outputs['new'][0]:.4f} "
          f"(each example alone); answers the same: {outputs['old'][1] == outputs['new'][1]}")


if __name__ == "__main__":
    main()
