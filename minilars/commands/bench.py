"""`minilars bench NAME`: benchmarks that print figures (one module each in minilars/bench/)."""
from __future__ import annotations

import importlib

BENCHES = {
    "memory": "peak RSS, kept activations and step time per method, policy and sequence length (fresh processes)",
    "speed": "tokens/s of a training step, numpy vs numba backend, with GFLOP/s",
    "gradients": "gradient error of each storage policy vs exact storage, as a function of rank",
    "store": "activation bytes the store holds at peak for full, LoRA, IA3 and LARS",
    "loading": "peak RSS of loading a model and generating 32 tokens, per weight format",
    "quant": "step time with weights kept as GGUF blocks vs float32, paired and interleaved",
}


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks that print figures")
    actions = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, help_text in BENCHES.items():
        try:
            module = importlib.import_module(f"minilars.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"minilars.bench.{name}":
                continue
            raise
        bench = actions.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(bench)
        bench.set_defaults(func=module.run)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
