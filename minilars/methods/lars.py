"""LARS subspace adapters (docs/lars.md): y_s = x W_s + (x P) M_s on the target
projections, P (d_in, r) an orthonormal basis of the stream's calibrated activation
subspace, M_s trainable; plus an activation-storage recipe (minilars/methods/storage.py).

Calibration (minilars/calibrate.py) finds P for every stream, and a basis for every
storage field kept as subspace(r). Sites are LARSSite (minilars/adapters.py); saved
as the LoRA it equals: lora_A = P^T, lora_B = M^T, lora_alpha = r (scaling 1), with
minilars_adapter.json recording the method so it reloads as LARS.
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from ..adapters import LARSSite
from ..calibrate import calibrate
from ..store import StoragePlan
from ..weights import PROJECTION_STREAM, STREAMS
from .base import RANK_HELP, TARGETS_HELP, Method, MethodOption, StudyRun, non_negative_int, positive_int
from .lora import lora_peft_config
from .method_config import MethodConfig, apply_frozen
from .registry import register
from .storage import LARS_DEFAULT_STORAGE, LARS_OFFLOAD_STORAGE


BASIS_KINDS = ("orthonormal", "whitened")


def _basis_kind(text) -> str:
    if text not in BASIS_KINDS:
        raise argparse.ArgumentTypeError(f"basis {text!r}: choose one of {', '.join(BASIS_KINDS)}")
    return text


def stream_scales(text: str | None) -> dict[str, float]:
    """'attn_in=0.5, attn_out=0.5' -> {'attn_in': 0.5, 'attn_out': 0.5}: a factor c_s per
    stream of minilars.weights.STREAMS, each finite and > 0; None or '' -> {}. Raises
    argparse.ArgumentTypeError naming the bad part."""
    scales = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        stream, sep, value = (piece.strip() for piece in part.partition("="))
        try:
            factor = float(value) if sep else math.nan
        except ValueError:
            factor = math.nan
        if stream not in STREAMS or not (math.isfinite(factor) and factor > 0):
            raise argparse.ArgumentTypeError(f"stream scale {part.strip()!r}: write STREAM=FACTOR with STREAM one of "
                                             f"{', '.join(STREAMS)} and FACTOR > 0, e.g. attn_in=0.5")
        scales[stream] = factor
    return scales


def _stream_scale_text(text) -> str:
    """The --stream-scale value, checked (stream_scales) and written back as 'stream=factor,...'."""
    return ",".join(f"{stream}={factor:g}" for stream, factor in stream_scales(text).items())


@register
class LARS(Method):
    name = "lars"
    summary = "subspace adapters"
    options = (
        MethodOption("rank", positive_int, 16, RANK_HELP, note="the basis rank"),
        MethodOption("targets", str, None, TARGETS_HELP, note="default all"),
        MethodOption("storage", str, "default", "activation-storage rules",
                     note="e.g. 'block=recompute,input.x=half' (the default recipe), 'fast' (the default plus "
                          "attn.o=half: attention outputs kept, not recomputed), 'offload' (the default "
                          "with the block inputs in a file in the temp dir, not in RAM; "
                          "'block=recompute,input.x=offload(DIR)' picks the directory), 'exact', or "
                          "'attn.*=subspace(32),mlp.*=half'"),
        MethodOption("basis", _basis_kind, "orthonormal", "how the calibrated basis is scaled",
                     note="'orthonormal' (P as calibrated) or 'whitened' (each column of P divided by the "
                          "rms of z = x P over the calibration tokens, so every z column has unit variance)"),
        MethodOption("stream_scale", _stream_scale_text, "", "per-stream factors on the calibrated basis",
                     note="e.g. 'attn_in=0.5,attn_out=0.5': P_s becomes c_s P_s, so an optimiser step on M_s "
                          "moves that stream's output c_s times as far (Adam's step on M does not depend on the "
                          "gradient's scale); the span, and the PEFT export's equality, are unchanged"),
        MethodOption("refreshes", non_negative_int, 2, "basis refreshes, evenly spaced over the run (0: none)",
                     note="after steps k * steps / (N + 1), k = 1..N, P M is folded into a frozen low-rank delta, "
                          "P is calibrated again on the next batch through the trained model, M and the optimizer "
                          "restart at zero; the PEFT export is then a LoRA of rank r (N + 1)"),
    )
    needs_calibration = True
    saves_adapter = True
    typical_rank = 16
    storage_to_try = (LARS_DEFAULT_STORAGE, (*LARS_DEFAULT_STORAGE, ("*", "half")), LARS_OFFLOAD_STORAGE)
    study_lrs = (3e-4, 1e-3, 3e-3)
    peft_type = "LORA"
    site_class = LARSSite

    @classmethod
    def study_runs(cls):
        flags = ("--method", cls.name, "--rank", str(cls.typical_rank), "--storage")
        return {cls.name: StudyRun((*flags, "default"), cls.study_lrs, cls),  # lars_default()
                f"{cls.name}-exact": StudyRun((*flags, "exact"), cls.study_lrs, cls),  # every activation exact
                f"{cls.name}-whitened": StudyRun((*flags, "default", "--basis", "whitened"), cls.study_lrs, cls),
                f"{cls.name}-unrefreshed": StudyRun((*flags, "default", "--refreshes", "0"), cls.study_lrs, cls)}

    @classmethod
    def rank_limit(cls, d_in, d_out):
        return d_in, "the width of the {stream} stream"  # P (d_in, r) has orthonormal columns: r <= d_in

    def describe(self):
        c = self.config
        changes = {"basis": c.option("basis") != "orthonormal", "stream_scale": bool(c.option("stream_scale")),
                   "refreshes": self.refreshes > 0}  # what departs from one calibrated basis, as calibrated
        basis = "".join(f", {name.replace('_', ' ')} {c.option(name)}" for name, shown in changes.items() if shown)
        return (f"lars(r={c.rank}, targets={','.join(c.resolved_targets)}{basis}, "
                f"storage: {self.storage_plan().describe()})")

    def storage_plan(self):
        return StoragePlan.from_mapping(dict(self.config.storage))

    def prepare(self, model, calibration_tokens, calibration_mask, bases=None):
        """Calibrate: P per stream (self.stream_bases) and the storage bases (model.bases);
        or take them from `bases` = (stream_bases, storage_bases), calibrated elsewhere."""
        if calibration_tokens is None and bases is None:
            raise ValueError("LARS needs calibration tokens to find its activation subspaces")
        apply_frozen(model)
        c = self.config
        if bases is not None:
            self.stream_bases, model.bases = bases
        else:
            self.stream_bases, model.bases = self._calibrate(model, calibration_tokens, calibration_mask)

    def _calibrate(self, model, tokens, mask):
        c = self.config
        return calibrate(model, tokens, c.rank, seed=c.seed, token_mask=mask, whiten=c.option("basis") == "whitened",
                         stream_scale=stream_scales(c.option("stream_scale")))

    # ---------------------------------------------------------------- refresh (Part 1.6)
    @property
    def refreshes(self):
        return self.config.option("refreshes")

    def calibrated_bases(self, model, tokens, mask):
        """The stream bases calibrated again, through the adapted model (the storage bases stay)."""
        return self._calibrate(model, tokens, mask)[0]

    def refresh(self, model, bases):
        """Every LARS site folds P M and takes its stream's new basis (LARSSite.refresh)."""
        for i, block in enumerate(model.sites):
            for stream, site in block.items():
                if isinstance(site, LARSSite) and site.targets:
                    site.refresh(model.be.asarray(bases[f"blocks.{i}.{stream}"]), model.be)

    def adapter(self, weight, where):
        basis = self.stream_bases[f"blocks.{where.block}.{where.stream}"]
        return LARSSite(weight, where.outputs, where.targets, basis, where.be, where.dtype, bias=where.bias)

    # ---------------------------------------------------------------- PEFT: the LoRA it equals
    def peft_config(self, common, tensors):
        """The LoRA it equals; its rank is lora_A's (r, or r (refreshes + 1) after refreshes)."""
        rank = next((t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")), self.config.rank)
        return lora_peft_config(common, rank, rank)  # alpha = rank: scaling 1

    def peft_tensors(self, site, key, be):
        tensors = {}
        for s, (a, b) in site.as_lora(be).items():
            tensors[key(s, "lora_A.weight")] = be.to_numpy(a)
            tensors[key(s, "lora_B.weight")] = be.to_numpy(b)
        return tensors

    @classmethod
    def config_from_peft(cls, peft_config, recorded, targets):
        storage = tuple(tuple(rule) for rule in recorded.get("storage", []))
        # trained on (--init-adapter) as saved: its basis, of rank r (N + 1) after N refreshes, is not refreshed again
        return MethodConfig(cls.name, rank=int(peft_config["r"]), alpha=float(peft_config["lora_alpha"]),
                            targets=targets, storage=storage, extra=(("refreshes", 0),))

    def attach(self, model, get):
        """The basis is stored (lora_A = P^T): rebuild LARS sites around it without calibrating."""
        c = self.config
        model.plan, model.bases = self.storage_plan(), {}
        apply_frozen(model)
        be, dtype = model.be, model.compute_dtype
        for i, block in enumerate(model.sites):
            for stream, site in block.items():
                mine = [t for t in c.resolved_targets if PROJECTION_STREAM[t] == stream]
                if not mine:
                    continue
                basis = get(i)(mine[0], "lora_A.weight", (c.rank, site.d_in)).T
                block[stream] = LARSSite(site.weight, site.outputs, mine, be.asarray(np.ascontiguousarray(basis)),
                                         be, dtype, bias=site.bias)
        model.method = c
        self.load_sites(model, get)

    def load_site(self, site, get, be, dtype):
        numpy_dtype = np.dtype(str(dtype).replace("torch.", ""))
        for s in site.targets:
            m = get(s, "lora_B.weight", (site.outputs[s], site.rank)).T
            site.M[s][...] = be.asarray(np.ascontiguousarray(m, dtype=numpy_dtype))
