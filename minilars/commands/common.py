"""Options shared by several subcommands."""
from __future__ import annotations

import argparse


def add_model_options(parser: argparse.ArgumentParser, default_model: str | None = "smollm2-135m") -> None:
    parser.add_argument("--model", default=default_model,
                        help="a model name (smollm2-135m, pulled into the cache on first use), a .gguf file "
                             "or a Hugging Face model directory (default: %(default)s)")
    parser.add_argument("--backend", default=None, choices=("numpy", "numba", "torch"),
                        help="kernel backend (default: numba where it imports, else numpy)")
    parser.add_argument("--device", default="cpu", help="torch backend only: cpu or cuda (default: %(default)s)")
    parser.add_argument("--weight-dtype", default="float32", choices=("float32", "float16"),
                        help="dtype the frozen weights are kept in; float16 halves their memory (default: %(default)s)")


def backend_from_args(args):
    from minilars.backends import get_backend

    if args.backend == "torch":
        return get_backend("torch", device=args.device)
    return get_backend(args.backend)


def load_model_from_args(args, **model_options):
    """(Model, Tokenizer) for --model/--backend/--weight-dtype."""
    from minilars.pretrained import load_pretrained

    return load_pretrained(args.model, backend=backend_from_args(args), weight_dtype=args.weight_dtype,
                           **model_options)
