"""The `minilars` command line: one subcommand per module in minilars/commands/."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module defines add_parser(subparsers) and sets `func` on its parser.
COMMAND_MODULES = ("models", "generate", "finetune", "plan", "bench", "eval", "study")


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilars",
        description="Fine-tune language models in little memory (LARS, LoRA, IA3, full) with an explicit engine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"minilars.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"minilars.commands.{name}":
                continue  # command not written yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["finetune"]  # the built-in default job
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .files import WriteError
    from .models.errors import ModelLoadError
    from .peft_io import AdapterError
    try:
        return int(args.func(args) or 0)
    except (CommandError, ModelLoadError, AdapterError, ValueError, FileNotFoundError, WriteError) as exc:
        print(f"minilars {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minilars {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minilars ... | head`: the reader has gone, so stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
