"""Helpers shared by the benchmarks: models, batches and tables."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, (batch, seq_len)), rng.integers(0, vocab_size, (batch, seq_len))


def load_model(name: str, backend=None, weights: str = "float32", seed: int = 0, **options):
    """The Model alone (minilars.pretrained.load_model): 'tiny' has random weights from `seed`."""
    from minilars.pretrained import load_model as load

    return load(name, backend, weights, seed=seed, **options)[0]


def random_lars_step(seq_len: int, backend: str = "numba", preset_name: str = "smollm2-135m"):
    """(model, tokens, targets) for timing a LARS default step: a preset's shapes with random
    weights, the default recipe applied and every refresh done (the step of a run's last
    third, which `bench speed` times), random tokens and targets (1, seq_len)."""
    from minilars.config import preset
    from minilars.methods import MethodConfig, apply_method
    from minilars.model import Model

    cfg = preset(preset_name)
    tokens, targets = random_batch(cfg.vocab_size, 1, seq_len)
    model = Model.random(cfg, seed=0, backend=backend)
    config = MethodConfig.lars_default()
    apply_method(model, config, tokens[:, :256])
    config.kind.refresh_all(model, tokens[:, :256])
    return model, tokens, targets


def print_table(rows: list[dict], columns: list[str] | None = None, file=None) -> None:
    """A plain aligned table (Markdown pipe syntax, so it pastes into docs/)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |", file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for r in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |", file=file)


def write_csv(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
