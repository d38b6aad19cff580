"""Gradient error of each activation-storage policy against exact storage.

For a LARS model (subspace adapters of the given adapter rank), one batch is run
with every cache kept exact, then again under each storage policy; the adapter
gradients (all of them, concatenated) are compared:
    relative error = ||g - g_exact|| / ||g_exact||,   cosine = <g, g_exact> / (|g| |g_exact|).
Policies: half, subspace(r) from the batch and from calibration (on the large frozen-
path fields), recompute (exact), recompute with the block input in float16.
"""
from __future__ import annotations

import math

import numpy as np

from minilars.commands.common import comma_separated

from .common import load_model, print_table, random_batch, write_csv

FROZEN_FIELDS = ("attn_norm.x", "attn.q", "attn.k", "attn.v", "attn.o", "mlp_norm.x", "mlp.gate_up")


def policies(ranks: list[int]) -> list[tuple[str, tuple]]:
    out = [("exact", ()), ("half", (("*", "half"),)), ("recompute", (("block", "recompute"),)),
           ("recompute + half input", (("block", "recompute"), ("input.x", "half")))]
    for r in ranks:
        out.append((f"subspace({r})", tuple((f, f"subspace({r})") for f in FROZEN_FIELDS)))
        out.append((f"subspace({r}, calibration)", tuple((f, f"subspace({r}, calibration)") for f in FROZEN_FIELDS)))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="tiny and/or a pretrained model (repeatable; default: tiny and smollm2-135m)")
    parser.add_argument("--ranks", default="4,16,64,256", type=comma_separated(int, "4,16"), help="subspace ranks, comma separated (default: %(default)s)")
    parser.add_argument("--adapter-rank", type=int, default=16, help="LARS adapter rank (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--backend", default="numpy", help="kernel backend (default: %(default)s)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")


def gradient_errors(model, tokens, targets, adapter_rank: int, ranks: list[int], seed: int = 0) -> list[dict]:
    from minilars.methods import MethodConfig, apply_method

    be = model.be
    rows, reference = [], None
    for label, storage in policies(ranks):
        method = MethodConfig("lars", rank=adapter_rank, storage=storage, seed=seed)
        apply_method(model, method, calibration_tokens=tokens)
        rng = np.random.default_rng(seed)  # same adapter values for every policy: off zero so every term counts
        for p in model.trainable().values():
            p += be.asarray((0.01 * rng.standard_normal(p.shape)).astype(np.float32))
        tape = model.forward(tokens, targets)
        grads = model.backward(tape)
        flat = np.concatenate([be.to_numpy(grads[k]).ravel().astype(np.float64) for k in sorted(grads)])
        if reference is None:
            reference = flat
        err = float(np.linalg.norm(flat - reference) / np.linalg.norm(reference))
        cosine = float(flat @ reference / (np.linalg.norm(flat) * np.linalg.norm(reference)))
        rows.append({"policy": label, "store peak MiB": tape.store.bytes_peak / 2**20,
                     "relative error": err, "cosine": cosine})
    return rows


def run(args) -> int:
    ranks = args.ranks
    all_rows = []
    for name in args.model or ["tiny", "smollm2-135m"]:
        model = load_model(name, backend=args.backend)
        tokens, targets = random_batch(model.cfg.vocab_size, 1, min(args.seq_len, model.cfg.max_seq_len))
        if name != "tiny":  # real text statistics matter for subspaces: use the model's own greedy text
            tokens, targets = _natural_batch(model, args.seq_len)
        usable = [r for r in ranks if r < model.cfg.dim]
        rows = gradient_errors(model, tokens, targets, args.adapter_rank, usable)
        print(f"\n{name}: LARS r={args.adapter_rank}, T={tokens.shape[1]}, gradients vs exact storage")
        print_table(rows)
        all_rows += [{"model": name, **row} for row in rows]
    if args.csv:
        write_csv(all_rows, args.csv)
    return 0


def _natural_batch(model, seq_len: int, seed: int = 0):
    """A sequence of real text: the model continues a short prompt greedily (cheap
    with the KV cache) until seq_len + 1 tokens exist."""
    from minilars.generate import generate_ids

    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(1000, 20000, 8)]
    ids = prompt + list(generate_ids(model, prompt, max_new_tokens=seq_len + 1 - len(prompt), temperature=0.8,
                                     top_p=0.95, seed=seed))
    ids = (ids * math.ceil((seq_len + 1) / len(ids)))[:seq_len + 1]
    seq = np.asarray([ids])
    return seq[:, :-1], seq[:, 1:]
