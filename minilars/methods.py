"""Training methods: which arrays train and what each linear site keeps.

`apply_method(model, spec)` swaps the model's linear sites (from_linear) and sets
which embeddings and norms train. Methods: full (every weight), frozen (nothing;
for inference), and the adapters of minilars/adapters.py.
"""
from __future__ import annotations

from .model import Model
from .sites import FrozenSite, FullSite


def apply_full(model: Model) -> Model:
    """Full fine-tuning: every weight trains (embeddings, norms, all projections)."""
    for block in model.sites:
        for stream, site in block.items():
            block[stream] = FullSite(site.to_linear(model.be), site.outputs)
    model.train_embeddings = True
    model.train_norms = True
    return model


def apply_frozen(model: Model) -> Model:
    for block in model.sites:
        for stream, site in block.items():
            block[stream] = FrozenSite(site.to_linear(model.be), site.outputs)
    model.train_embeddings = False
    model.train_norms = False
    return model
