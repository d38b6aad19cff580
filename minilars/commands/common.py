"""Options shared by several subcommands."""
from __future__ import annotations

import argparse
from typing import Callable

BACKEND_HELP = ("kernel backend; auto: the fastest installed for the device (on a CPU numba, else torch, else "
                "numpy; with --device cuda torch), as measured in docs/speed.md")


def comma_separated(kind: type = str, example: str = "a,b") -> Callable[[str], list]:
    """An argparse type: "512, 2048" -> [512, 2048] for kind int (blank items dropped).
    A bad item is argparse's clear error naming the flag; called directly it raises
    argparse.ArgumentTypeError. The one parser of every comma-separated flag."""
    what = {int: "integers", float: "numbers"}.get(kind, "names")

    def parse(text: str) -> list:
        try:
            return [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: write {what} like {example}") from None

    parse.__name__ = f"comma-separated {what}"
    return parse


def add_model_options(parser: argparse.ArgumentParser, default_model: str | None = "smollm2-135m") -> None:
    parser.add_argument("--model", default=default_model,
                        help="a model name (smollm2-135m, pulled into the cache on first use), a .gguf file "
                             "or a Hugging Face model directory, or 'tiny' (random tiny preset with a character tokenizer) "
                             "(default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=("auto", "numpy", "numba", "torch"),
                        help=BACKEND_HELP + " (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch backend only: cpu or cuda (default: %(default)s)")
    add_weights_option(parser)


def add_weights_option(parser: argparse.ArgumentParser, default: str = "keep") -> None:
    """--weights, the one declaration every command that loads or plans a model uses."""
    from minilars.pretrained import WEIGHT_FORMATS, WEIGHTS_HELP

    parser.add_argument("--weights", default=default, choices=WEIGHT_FORMATS,
                        help=WEIGHTS_HELP + " (default: %(default)s)")


def backend_from_args(args):
    """The Backend for --backend/--device ("auto": backends.default_backend_name). On
    numba, the first run fills numba's kernel cache from a child process before any
    weight is read (numba_backend.warm_cache_in_child), so that this process only loads
    kernels: compiled here, LLVM's memory would stay in its peak (docs/memory.md)."""
    from minilars.backends import resolve_backend

    backend = resolve_backend(args.backend, args.device)
    if backend.name == "numba":
        from minilars.backends.numba_backend import warm_cache_in_child

        warm_cache_in_child()
    return backend


def load_model_from_args(args, **model_options):
    """(Model, Tokenizer) for --model/--backend/--device/--weights (minilars.pretrained.load_model)."""
    from minilars.pretrained import load_model

    return load_model(args.model, backend_from_args(args), args.weights, **model_options)
