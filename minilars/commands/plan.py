"""`minilars plan`: the memory a training step will need, from the engine's memory model.

Prints the planner's breakdown (minilars/planner.py) for a model, method and sequence
length, without loading any weights: runtime baseline, weights, adapters, AdamW
state, gradients, the activation store and the transient work at the peak moment.
With --max-memory it says whether the run fits and, if not, what would.
"""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser("plan", help="predict a training step's peak memory (no weights are loaded)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a preset name (smollm2-135m, tiny), a .gguf file or a Hugging Face directory "
                             "(only its config is read) (default: %(default)s)")
    parser.add_argument("--method", default="lars", choices=("lars", "lora", "ia3", "full", "frozen"),
                        help="training method; frozen plans the no-grad forward (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=None, help="LARS basis rank (default 16) or LoRA rank (default 8)")
    parser.add_argument("--targets", default=None,
                        help="comma-separated projections for LoRA/IA3/LARS, e.g. q,v (default: the method's)")
    parser.add_argument("--storage", default="default",
                        help="LARS activation storage: default (block=recompute,input.x=half), fast (the "
                             "default plus attn.o=half), exact, or rules "
                             "like 'attn.*=subspace(32),mlp.*=half' (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row T (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step B (default: %(default)s)")
    parser.add_argument("--weight-dtype", default="float32", choices=("float32", "float16"),
                        help="dtype the frozen weights are kept in (default: %(default)s)")
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


def method_from_args(args):
    from minilars.methods import MethodConfig, parse_storage

    targets = tuple(t.strip() for t in args.targets.split(",")) if args.targets else None
    if args.method == "lars":
        return MethodConfig("lars", rank=args.rank or 16, targets=targets, storage=parse_storage(args.storage))
    if args.method == "lora":
        return MethodConfig("lora", rank=args.rank or 8, targets=targets)
    return MethodConfig(args.method, targets=targets)


def run(args) -> int:
    from minilars.backends import backend_name
    from minilars.planner import check_budget, plan_memory
    from minilars.units import format_size, parse_size

    cfg = _config(args.model)
    method = method_from_args(args)
    backend = backend_name(args.backend)
    plan = plan_memory(cfg, method, args.seq_len, args.batch_size, args.weight_dtype, backend, model_name=args.model)
    print(plan.describe())
    if args.phases:
        print("moments (total at each):")
        for name, total in plan.phases:
            print(f"  {name:45s} {format_size(total):>12}")
    if args.max_memory is not None:
        budget = parse_size(args.max_memory)
        try:
            check_budget(cfg, method, args.seq_len, args.batch_size, args.weight_dtype, budget, backend)
        except ValueError as exc:
            print(f"does not fit in {format_size(budget)}: {exc}")
            return 1
        print(f"fits in {format_size(budget)} ({format_size(budget - plan.total)} to spare)")
    return 0
