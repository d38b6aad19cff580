"""LoRA (Hu et al. 2021) with PEFT's defaults: y_s = x W_s + (alpha/r) (x A_s) B_s.

Sites are LoRASite (minilars/adapters.py); saved in PEFT's LORA format:
    lora_A.weight = A^T (r, d_in),  lora_B.weight = B^T (d_out_s, r),  scaling lora_alpha / r.
"""
from __future__ import annotations

import numpy as np

from ..adapters import LoRASite
from .base import RANK_HELP, TARGETS_HELP, Method, MethodOption, positive_int
from .method_config import MethodConfig
from .registry import register


def lora_peft_config(common: dict, rank: int, alpha: float) -> dict:
    """adapter_config.json of a PEFT LoRA adapter (LARS saves as one too)."""
    return {"peft_type": "LORA", **common, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "init_lora_weights": True}


@register
class LoRA(Method):
    name = "lora"
    summary = "low-rank A, B beside each weight"
    options = (
        MethodOption("rank", positive_int, 16, RANK_HELP, note="the rank of A (d_in, r) and B (r, d_out)"),
        MethodOption("alpha", float, None, "scaling alpha", note="the update is scaled by alpha/r; default 2r"),
        MethodOption("targets", str, None, TARGETS_HELP, note="default all"),
    )
    saves_adapter = True
    typical_rank = 8
    study_lrs = (3e-4, 1e-3, 3e-3)
    peft_type = "LORA"
    peft_default = True
    site_class = LoRASite

    @classmethod
    def rank_limit(cls, d_in, d_out):
        return min(d_in, d_out), "min(d_in, d_out) of the {target} projection"  # A B has rank <= both

    def describe(self):
        c = self.config
        return f"lora(r={c.rank}, alpha={c.lora_alpha:g}, targets={','.join(c.resolved_targets)})"

    def adapter(self, weight, where):
        c = self.config
        return LoRASite(weight, where.outputs, where.targets, c.rank, c.lora_alpha, where.rng, where.be, where.dtype,
                        bias=where.bias)

    def peft_config(self, common, tensors):
        return lora_peft_config(common, self.config.rank, self.config.lora_alpha)

    def peft_tensors(self, site, key, be):
        tensors = {}
        for s in site.targets:
            tensors[key(s, "lora_A.weight")] = be.to_numpy(site.A[s]).T
            tensors[key(s, "lora_B.weight")] = be.to_numpy(site.B[s]).T
        return tensors

    @classmethod
    def config_from_peft(cls, peft_config, recorded, targets):
        return MethodConfig(cls.name, rank=int(peft_config["r"]), alpha=float(peft_config["lora_alpha"]),
                            targets=targets)

    def load_site(self, site, get, be, dtype):
        for s in site.targets:
            a = get(s, "lora_A.weight", (site.rank, site.d_in)).T
            b = get(s, "lora_B.weight", (site.outputs[s], site.rank)).T
            site.A[s][...] = be.asarray(np.ascontiguousarray(a))
            site.B[s][...] = be.asarray(np.ascontiguousarray(b))
