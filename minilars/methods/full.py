"""Full fine-tuning: every weight trains (embeddings, norms, all projections and biases).

Each linear site becomes a FullSite (minilars/sites.py): dW = x^T dy, so the input x
is kept. The result is saved as merged weights: no adapter is smaller than the model.
"""
from __future__ import annotations

from ..sites import FullSite
from .base import Method
from .registry import register


@register
class Full(Method):
    name = "full"
    summary = "every weight"
    trains_embeddings = True
    weight_gradients = True
    saves_merged = True
    # Full fine-tuning moves every weight and wants ~100x smaller steps than adapters.
    study_lrs = (1e-5, 3e-5, 1e-4)

    def wrap(self, site, where):
        # an adapter, if any, folded into the weight and bias
        return FullSite(site.to_linear(where.be), where.outputs, site.merged_bias(where.be))
