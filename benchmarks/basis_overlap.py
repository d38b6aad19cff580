"""How much do LARS's bases depend on the calibration data? Overlap of two calibrations.

LARS's adapter at a stream reads x P, P (d_in, r) the top-r directions of that
stream's calibration activations (docs/lars.md Part 1.1). This script calibrates the
same model twice, on rows from two data files (each at its own row length), and
prints, for each stream, how much of one basis lies in the other:

    overlap(P_a, P_b) = ||P_a^T P_b||_F^2 / r

the mean squared cosine of the principal angles between the two subspaces: 1 when
they are the same subspace, r / d_in on average for two random ones. It also prints
how much of stream b's activation energy each basis captures,

    captured(P) = ||X_b P||_F^2 / ||X_b||_F^2   (X_b: stream b's kept activations)

so a basis calibrated on a that misses directions b needs shows up as
captured(P_a) < captured(P_b).

    python benchmarks/basis_overlap.py --a train.jsonl --a-seq-len 512 --b long.jsonl --b-seq-len 2048

Records are tokenized and laid into rows as `minilars finetune --packing pad` does;
each side calibrates on its first --rows rows (the sampler's step-0 draw), padding
left out.
"""
from __future__ import annotations

import argparse

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--a", required=True, help="data file of the first calibration")
    p.add_argument("--a-seq-len", type=int, default=512)
    p.add_argument("--b", required=True, help="data file of the second calibration")
    p.add_argument("--b-seq-len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=2, help="rows calibrated on, per side")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--backend", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the rows drawn from --a")
    p.add_argument("--b-seed", type=int, default=None, help="seed of the rows drawn from --b (default: --seed); "
                   "with --b the same file as --a, another seed gives the overlap of two draws of one data set")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from minilars.calibrate import stream_inputs
    from minilars.data import calibration_rows
    from minilars.evaluate import load_model

    model, tokenizer = load_model(args.model, backend=args.backend)
    forwards = []
    b_seed = args.seed if args.b_seed is None else args.b_seed
    for side, path, seq_len, seed in (("a", args.a, args.a_seq_len, args.seed), ("b", args.b, args.b_seq_len, b_seed)):
        rows = calibration_rows(path, tokenizer, seq_len, args.rows, seed)
        tokens, mask = rows.tokens, rows.real
        forwards.append(stream_inputs(model, tokens, token_mask=mask))
        print(f"{side}: {path}, {tokens.shape[0]} rows of {seq_len} tokens, {int(mask.sum()):,} kept", flush=True)
    table: dict[str, list[tuple[float, float, float]]] = {}
    widths: dict[str, int] = {}
    for (i, inputs_a), (_, inputs_b) in zip(*forwards):  # both forwards advance one block at a time
        for stream, x_a in inputs_a.items():
            x_a, x_b = np.asarray(x_a, dtype=np.float64), np.asarray(inputs_b[stream], dtype=np.float64)
            p_a, p_b = top_directions(x_a, args.rank), top_directions(x_b, args.rank)
            energy = float((x_b * x_b).sum())
            table.setdefault(stream, []).append((float(((p_a.T @ p_b) ** 2).sum()) / args.rank,
                                                 float(((x_b @ p_a) ** 2).sum()) / energy,
                                                 float(((x_b @ p_b) ** 2).sum()) / energy))
            widths[stream] = x_a.shape[1]
    print(f"\nrank {args.rank}, {len(table[next(iter(table))])} blocks; overlap = ||P_a^T P_b||_F^2 / r "
          f"(random subspaces: r / d_in); captured = share of b's activation energy in the basis")
    print("| stream | d_in | overlap: mean (min over blocks) | b's energy captured by P_a | by P_b |")
    print("|---|---|---|---|---|")
    for stream, values in table.items():
        v = np.array(values)
        print(f"| {stream} | {widths[stream]} | {v[:, 0].mean():.3f} ({v[:, 0].min():.3f}) | {v[:, 1].mean():.3f} "
              f"| {v[:, 2].mean():.3f} |")
    return 0


def top_directions(x: np.ndarray, rank: int) -> np.ndarray:
    """The top-`rank` right singular vectors of x (N, d), exactly (the reference that
    calibration's randomized range finder approximates): the top eigenvectors of
    x^T x, in float64."""
    _, vectors = np.linalg.eigh(x.T @ x)  # eigenvalues ascending
    return vectors[:, ::-1][:, :rank]


if __name__ == "__main__":
    raise SystemExit(main())
