"""`minilars generate`: stream a model's reply to a prompt."""
from __future__ import annotations

import sys

from .common import add_model_options, load_model_from_args


def add_parser(sub) -> None:
    parser = sub.add_parser("generate", help="generate text from a prompt (KV cache, streamed)")
    add_model_options(parser)
    parser.add_argument("prompt", help="the prompt (sent through the chat template unless --raw)")
    parser.add_argument("--adapter", default=None, help="a PEFT adapter directory saved by minilars finetune")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.set_defaults(func=run)


def run(args) -> int:
    from minilars.generate import generate_text
    from minilars.peft_io import load_adapter

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    model, tokenizer = load_model_from_args(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer")
    if args.adapter:
        load_adapter(model, args.adapter)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                  chat=not args.raw, seed=args.seed, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    print()
    return 0
