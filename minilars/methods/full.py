"""Full fine-tuning: every weight trains (embeddings, norms, all projections and biases).

Each linear site becomes a FullSite (minilars/sites.py): dW = x^T dy, so the input x
is kept. The result is saved as merged weights: no adapter is smaller than the model.
"""
from __future__ import annotations

from ..backends.base import is_quantized
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

    def prepare(self, model, calibration_tokens, calibration_mask, bases=None):
        kept = [name for name, p in model.params.items() if is_quantized(p)]
        if kept:
            raise ValueError(f"full fine-tuning trains every weight, and {len(kept)} of this model's weights are "
                             f"kept as GGUF blocks ({kept[0]}: {model.params[kept[0]].formats}), which do not "
                             "train; pass --weights float32 (or float16) to load them as floats, or train an "
                             "adapter over the blocks (--method lars, lora or ia3)")

    def wrap(self, site, where):
        # an adapter, if any, folded into the weight and bias
        return FullSite(site.to_linear(where.be), where.outputs, site.merged_bias(where.be))
