"""IA3 (Liu et al. 2022) with PEFT's LLaMA defaults: learned scales on the k and v
outputs, y_s = (x W_s) * l_s, and on the down projection's input, y = (x * l) W.

Sites are IA3Site (minilars/adapters.py); saved in PEFT's IA3 format:
    ia3_l (d_out_s, 1) for k, v;  (1, d_in) for down (a feed-forward module).
"""
from __future__ import annotations

from ..adapters import IA3Site
from .base import TARGETS_HELP, Method, MethodOption
from .method_config import MethodConfig
from .registry import register


@register
class IA3(Method):
    name = "ia3"
    summary = "learned scales on k, v and the down input"
    options = (MethodOption("targets", str, None, TARGETS_HELP, note="default k,v,down"),)
    default_targets = ("k", "v", "down")
    saves_adapter = True
    study_lrs = (1e-3, 3e-3, 1e-2)
    peft_type = "IA3"
    peft_default = True
    site_class = IA3Site

    def describe(self):
        return f"ia3(targets={','.join(self.config.resolved_targets)})"

    def adapter(self, weight, where):
        # The down projection reads the SwiGLU output: PEFT scales a feed-forward module's input.
        return IA3Site(weight, where.outputs, where.targets, where.be, scale_input=where.stream == "mlp_out",
                       dtype=where.dtype, bias=where.bias)

    def peft_config(self, common, tensors):
        feedforward = [m for m in common["target_modules"] if m == "down_proj"]
        return {"peft_type": "IA3", **common, "init_ia3_weights": True, "feedforward_modules": feedforward}

    def peft_tensors(self, site, key, be):
        tensors = {}
        for s in site.targets:
            if site.scale_input:
                tensors[key(s, "ia3_l")] = be.to_numpy(site.scales["input"])[None, :]
            else:
                tensors[key(s, "ia3_l")] = be.to_numpy(site.scales[s])[:, None]
        return tensors

    @classmethod
    def config_from_peft(cls, peft_config, recorded, targets):
        return MethodConfig(cls.name, targets=targets)

    def load_site(self, site, get, be, dtype):
        for s in site.targets:
            if site.scale_input:
                site.scales["input"][...] = be.asarray(get(s, "ia3_l", (1, site.d_in))[0])
            else:
                site.scales[s][...] = be.asarray(get(s, "ia3_l", (site.outputs[s], 1))[:, 0])
