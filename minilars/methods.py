"""Training methods: which arrays train and what each linear site keeps.

`apply_method(model, MethodConfig(...), calibration_tokens)` swaps the model's linear
sites (from_linear) and sets which embeddings and norms train:

    full    every weight (embeddings, norms, all projections)
    lora    rank-r A, B on the target projections (PEFT defaults)
    ia3     learned scales on k, v outputs and the down input (PEFT's LLaMA defaults)
    lars    LARS subspace adapters on the target projections + activation-storage plan
    frozen  nothing (inference)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .adapters import IA3Site, LARSSite, LoRASite
from .model import Model
from .sites import FrozenSite, FullSite
from .store import StoragePlan, parse_policy
from .weights import PROJECTION_STREAM, STREAMS, stream_outputs

ALL_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
IA3_DEFAULT = ("k", "v", "down")
METHODS = ("full", "lora", "ia3", "lars", "frozen")

# The default LARS recipe (docs/lars.md says why): subspace adapters of rank 16 on
# every projection; blocks recomputed in backward from their input, kept in float16.
LARS_DEFAULT_STORAGE = (("block", "recompute"), ("input.x", "half"))
# The same, keeping each block's attention output (float16) and log-sum-exp as well, so
# backward does not rerun the attention kernel: 2 H hd + 4 H more bytes per token per
# block, one T^2 attention forward per block less (docs/speed.md measures both).
LARS_FAST_STORAGE = (*LARS_DEFAULT_STORAGE, ("attn.o", "half"))
NAMED_STORAGE = {"default": LARS_DEFAULT_STORAGE, "fast": LARS_FAST_STORAGE, "exact": ()}


def parse_storage(text: str | None) -> tuple[tuple[str, str], ...]:
    """'block=recompute,input.x=half' -> (('block', 'recompute'), ('input.x', 'half'));
    a name of NAMED_STORAGE: 'default' (the default LARS recipe), 'fast' (the same
    keeping attention outputs too), 'exact' (everything exact)."""
    if text is None:
        return LARS_DEFAULT_STORAGE
    if text.strip() in NAMED_STORAGE:
        return NAMED_STORAGE[text.strip()]
    rules = []
    for part in _split_top_level(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"storage rule {part!r} must look like FIELD=POLICY, e.g. mlp.*=subspace(32)")
        parse_policy(value.strip())
        rules.append((key.strip(), value.strip()))
    return tuple(rules)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in (parts + [current]) if p.strip()]


@dataclass(frozen=True)
class MethodConfig:
    """How to train. Fields that a method does not use are ignored by it."""

    name: str = "lars"  # full | lora | ia3 | lars | frozen
    rank: int = 16  # lora: r; lars: basis rank r
    alpha: float | None = None  # lora: scaling alpha / r (default alpha = 2r)
    targets: tuple[str, ...] | None = None  # projections (default: all; ia3: k, v, down)
    storage: tuple[tuple[str, str], ...] = field(default=())  # lars: activation-storage rules
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for target in self.targets or ():
            if target not in ALL_PROJECTIONS:
                raise ValueError(f"unknown target {target!r}; projections are {', '.join(ALL_PROJECTIONS)}")
        StoragePlan.from_mapping(dict(self.storage))  # validates

    @classmethod
    def lars_default(cls, rank: int = 16, **kwargs) -> "MethodConfig":
        return cls("lars", rank=rank, storage=LARS_DEFAULT_STORAGE, **kwargs)

    @property
    def resolved_targets(self) -> tuple[str, ...]:
        if self.targets is not None:
            return tuple(self.targets)
        return IA3_DEFAULT if self.name == "ia3" else ALL_PROJECTIONS

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)

    def describe(self) -> str:
        if self.name == "lora":
            return f"lora(r={self.rank}, alpha={self.lora_alpha:g}, targets={','.join(self.resolved_targets)})"
        if self.name == "ia3":
            return f"ia3(targets={','.join(self.resolved_targets)})"
        if self.name == "lars":
            plan = StoragePlan.from_mapping(dict(self.storage)).describe()
            return f"lars(r={self.rank}, targets={','.join(self.resolved_targets)}, storage: {plan})"
        return self.name


def apply_method(model: Model, method: MethodConfig | str, calibration_tokens=None, calibration_mask=None,
                 bases=None) -> Model:
    """Make `model` train with `method`. LARS needs calibration tokens (B, T);
    calibration_mask (B, T) bool, optional, names the positions whose activations
    count (the real tokens of padded rows; see calibrate). bases, optional: LARS's
    (stream_bases, storage_bases) as calibrate returns them, calibrated elsewhere (by
    rank 0 of a data-parallel run, minilars/distributed.py); no calibration runs."""
    if isinstance(method, str):
        method = MethodConfig(method)
    be = model.be
    dtype = model.compute_dtype
    model.plan = StoragePlan.from_mapping(dict(method.storage)) if method.name == "lars" else StoragePlan()
    model.bases = {}
    model.train_embeddings = model.train_norms = method.name == "full"
    targets = method.resolved_targets
    outputs = stream_outputs(model.cfg)
    rng = np.random.default_rng(method.seed)
    stream_bases = {}
    if method.name == "lars":
        if calibration_tokens is None and bases is None:
            raise ValueError("LARS needs calibration tokens to find its activation subspaces")
        apply_frozen(model)
        if bases is not None:
            stream_bases, model.bases = bases
        else:
            from .calibrate import calibrate
            stream_bases, model.bases = calibrate(model, calibration_tokens, method.rank, seed=method.seed,
                                                  token_mask=calibration_mask)
    for i, block in enumerate(model.sites):
        for stream, site in block.items():
            weight = site.to_linear(be) if method.name == "full" else site.weight
            mine = [t for t in targets if PROJECTION_STREAM[t] == stream]
            if method.name == "full":
                block[stream] = FullSite(weight, outputs[stream])
            elif method.name == "frozen" or not mine:
                block[stream] = FrozenSite(weight, outputs[stream])
            elif method.name == "lora":
                block[stream] = LoRASite(weight, outputs[stream], mine, method.rank, method.lora_alpha, rng, be, dtype)
            elif method.name == "ia3":
                block[stream] = IA3Site(weight, outputs[stream], mine, be, scale_input=stream == "mlp_out", dtype=dtype)
            else:
                block[stream] = LARSSite(weight, outputs[stream], mine, stream_bases[f"blocks.{i}.{stream}"], be, dtype)
    model.method = method
    return model


def apply_full(model: Model) -> Model:
    """Full fine-tuning: every weight trains (embeddings, norms, all projections)."""
    return apply_method(model, MethodConfig("full"))


def apply_frozen(model: Model) -> Model:
    """Nothing trains; linear sites keep nothing."""
    for block in model.sites:
        for stream, site in block.items():
            block[stream] = FrozenSite(site.weight, site.outputs)
    model.train_embeddings = model.train_norms = False
    return model


__all__ = ["ALL_PROJECTIONS", "METHODS", "MethodConfig", "apply_frozen", "apply_full", "apply_method",
           "parse_storage", "STREAMS", "LARS_FAST_STORAGE", "NAMED_STORAGE"]
