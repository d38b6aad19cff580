"""`minilars plan`: the memory a training step will need, from the engine's memory model.

Prints the planner's breakdown (minilars/planner.py) for a model, method and sequence
length, without loading any weights: runtime baseline, weights, adapters, AdamW
state, gradients, the activation store and the transient work at the peak moment.
With --max-memory it says whether the run fits and, if not, what would, and which
weight formats (--weights) fit the budget. --weights keep on a GGUF plans its block
formats as the file stores them (read from its header).
"""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser("plan", help="predict a training step's peak memory (no weights are loaded)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a preset name (smollm2-135m, tiny), a .gguf file or a Hugging Face directory "
                             "(only its config is read) (default: %(default)s)")
    from minilars.methods import DEFAULT_METHOD, method_class, method_options, registered

    parser.add_argument("--method", default=DEFAULT_METHOD, choices=registered(),
                        help="training method: " + ", ".join(f"{name} ({method_class(name).summary})"
                                                             for name in registered())
                             + "; frozen plans the no-grad forward (default: %(default)s)")
    for option in method_options():
        default = option.default
        if option.name == "rank":  # each method's typical rank when none is given
            default = None
            option = option.with_help(option.help + "; default: " + ", ".join(
                f"{name} {method_class(name).typical_rank}" for name in registered() if method_class(name).has_rank))
        parser.add_argument("--" + option.name.replace("_", "-"), type=option.type, default=default,
                            help=option.help + ("" if default is None else " (default: %(default)s)"))
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row T (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step B (default: %(default)s)")
    from .common import add_weights_option

    add_weights_option(parser)
    parser.add_argument("--backend", default="auto", choices=("auto", "numpy", "numba", "torch"),
                        help="kernel backend whose work arrays to plan for; auto: the one `minilars finetune "
                             "--backend auto` runs on (on a CPU numba, else torch, else numpy) (default: %(default)s)")
    parser.add_argument("--max-memory", default=None,
                        help="a budget such as 1GiB or 800MiB: exit status 1 and advice when the plan exceeds it")
    parser.add_argument("--phases", action="store_true", help="also list every modelled moment of the step")
    parser.set_defaults(func=run)


def _config(spec: str):
    from minilars.config import PRESETS

    if spec in PRESETS:
        return PRESETS[spec]
    from pathlib import Path

    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from minilars.models.gguf_loader import config_from_gguf, open_gguf

        return config_from_gguf(open_gguf(path), path)
    if path.is_dir():
        from minilars.models import load_model_weights

        cfg, _, _ = load_model_weights(path)
        return cfg
    raise ValueError(f"unknown model {spec!r}: give a preset ({', '.join(sorted(PRESETS))}), a .gguf file or an "
                     "HF directory")


def _has_tokenizer(spec: str) -> bool | None:
    """Whether loading `spec` builds a tokenizer the process then holds: a GGUF with
    tokenizer.ggml.tokens, an HF directory with tokenizer.json; None (the planner's
    default) for a preset name."""
    from pathlib import Path

    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from minilars.models.gguf_loader import open_gguf

        return "tokenizer.ggml.tokens" in open_gguf(path).fields
    if path.is_dir():
        return (path / "tokenizer.json").is_file()
    return None


def method_from_args(args):
    """The MethodConfig of --method, at the method's typical rank when --rank is not given."""
    from minilars.methods import MethodConfig, method_class

    values = dict(vars(args))
    values["rank"] = args.rank or method_class(args.method).typical_rank
    return MethodConfig.from_options(args.method, values)


def run(args) -> int:
    from minilars.backends import backend_name
    from minilars.planner import check_budget, fitting_weight_formats, plan_memory
    from minilars.pretrained import planned_weights
    from minilars.units import format_size, parse_size

    cfg = _config(args.model)
    method = method_from_args(args)
    backend = backend_name(args.backend)
    weights = planned_weights(args.model, args.weights)
    tokenizer = _has_tokenizer(args.model)
    plan = plan_memory(cfg, method, args.seq_len, args.batch_size, weights, backend, model_name=args.model,
                       tokenizer=tokenizer)
    print(plan.describe())
    if args.phases:
        print("moments (total at each):")
        for name, total in plan.phases:
            print(f"  {name:45s} {format_size(total):>12}")
    if args.max_memory is not None:
        budget = parse_size(args.max_memory)
        kept = planned_weights(args.model, "keep")
        formats = fitting_weight_formats(cfg, method, args.seq_len, args.batch_size, budget, backend,
                                         kept=kept if isinstance(kept, dict) else None, tokenizer=tokenizer)
        print(f"weight formats in {format_size(budget)}: " + ", ".join(
            f"{name} {format_size(total)} ({'fits' if fits else 'does not fit'})" for name, total, fits in formats))
        try:
            check_budget(cfg, method, args.seq_len, args.batch_size, weights, budget, backend, tokenizer=tokenizer)
        except ValueError as exc:
            print(f"does not fit in {format_size(budget)}: {exc}")
            return 1
        print(f"fits in {format_size(budget)} ({format_size(budget - plan.total)} to spare)")
    return 0
