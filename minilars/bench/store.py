"""Activation bytes the store holds at peak, per method, side by side.

One forward + backward per method on the same batch; the store's peak is the most
activation memory the step ever kept (for LARS with recompute, that includes the one
block whose caches are refilled during its backward). Also printed per site kind."""
from __future__ import annotations

from minilars.commands.common import comma_separated

from .common import load_model, print_table, random_batch, write_csv

METHODS = ("full", "lora", "ia3", "lars")
REFERENCE = "lora"  # the configuration the "vs LoRA" column divides by


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank is 8 (PEFT default); LARS rank (default: %(default)s)")
    parser.add_argument("--backend", default="numpy", help="kernel backend (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS), type=comma_separated(str, "lars,lora"), help="comma separated (default: %(default)s)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")


def measure(model, tokens, targets, method) -> tuple[int, dict]:
    from minilars.methods import apply_method

    apply_method(model, method, calibration_tokens=tokens[:, :512])
    tape = model.forward(tokens, targets)
    model.backward(tape)
    return tape.store.bytes_peak, tape.store.peak_by_kind()


def run(args) -> int:
    from minilars.methods import MethodConfig

    model = load_model(args.model, backend=args.backend)
    tokens, targets = random_batch(model.cfg.vocab_size, 1, args.seq_len)
    configs = {"full": MethodConfig("full"), "lora": MethodConfig("lora", rank=8),
               "ia3": MethodConfig("ia3"), "lars": MethodConfig.lars_default(rank=args.rank)}
    rows, kinds = [], {}
    lora_peak = None
    for name in args.methods:
        method = configs[name]
        peak, by_kind = measure(model, tokens, targets, method)
        if name == REFERENCE:
            lora_peak = peak
        kinds[name] = by_kind
        rows.append({"method": method.describe(), "trainable params": model.n_trainable(),
                     "store peak MiB": peak / 2**20, "bytes/token/block": peak / args.seq_len / model.cfg.n_layers})
    if lora_peak:
        for row in rows:
            row["vs LoRA"] = row["store peak MiB"] * 2**20 / lora_peak
    print(f"{args.model}, T={args.seq_len}, batch 1: activation store peak")
    print_table(rows)
    if args.csv:
        write_csv(rows, args.csv)
    return 0
