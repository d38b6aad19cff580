"""MethodConfig (how to train, as a frozen dataclass users build) and apply_method.

`apply_method(model, MethodConfig(...), calibration_tokens)` swaps the model's linear
sites (from_linear) and sets which embeddings and norms train. What each method does
at each step is its registered class's business (minilars/methods/base.py); this
module only runs the steps in order:

    storage plan -> which embeddings and norms train -> calibration (if any)
    -> every linear site wrapped -> model.method = the config
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..model import Model
from ..sites import FrozenSite
from ..store import StoragePlan
from ..weights import PROJECTION_STREAM, stream_outputs
from .registry import method_class
from .storage import LARS_DEFAULT_STORAGE, parse_storage

if TYPE_CHECKING:
    from .base import Method

ALL_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_METHOD = "lars"  # what trains when nobody says (docs/lars.md)


@dataclass(frozen=True)
class MethodConfig:
    """How to train. Fields that a method does not use are ignored by it; which it
    uses are its class's `options` (minilars/methods/<name>.py)."""

    name: str = DEFAULT_METHOD  # a registered method: full | lora | ia3 | lars | frozen | ...
    rank: int = 16  # lora: r; lars: basis rank r
    alpha: float | None = None  # lora: scaling alpha / r (default alpha = 2r)
    targets: tuple[str, ...] | None = None  # projections (default: the method's default_targets)
    storage: tuple[tuple[str, str], ...] = field(default=())  # lars: activation-storage rules
    seed: int = 0
    extra: tuple[tuple[str, object], ...] = ()  # (option, value) of options that are not fields above

    def __post_init__(self) -> None:
        method_class(self.name)  # ValueError naming the registered methods
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for target in self.targets or ():
            if target not in ALL_PROJECTIONS:
                raise ValueError(f"unknown target {target!r}; projections are {', '.join(ALL_PROJECTIONS)}")
        StoragePlan.from_mapping(dict(self.storage))  # validates
        self.kind.validate()

    @classmethod
    def lars_default(cls, rank: int = 16, **kwargs) -> "MethodConfig":
        return cls("lars", rank=rank, storage=LARS_DEFAULT_STORAGE, **kwargs)

    @classmethod
    def from_options(cls, name: str, values: dict, seed: int = 0) -> "MethodConfig":
        """The config of method `name` from option values as the CLI reads them
        (targets 'q,v', storage rules as text): only the options the method reads
        are taken, each method's others keep their defaults."""
        kind = method_class(name)
        fields, extra = {}, []
        for option in kind.options:
            value = values.get(option.name, option.default)
            if option.name == "targets":
                fields["targets"] = parse_targets(value)
            elif option.name == "storage":
                fields["storage"] = parse_storage(value)
            elif option.name in ("rank", "alpha"):
                fields[option.name] = value
            elif value != option.default:  # a default is not recorded: equal to the config built in code
                extra.append((option.name, value))
        return cls(name, seed=seed, extra=tuple(extra), **fields)

    @property
    def kind(self) -> "Method":
        """The registered method this config describes, bound to it."""
        return method_class(self.name)(self)

    def option(self, name: str):
        """The value of one of the method's own options: kept in `extra` when set, else
        the default its class declares (from_options records only values that differ)."""
        extra = dict(self.extra)
        if name in extra:
            return extra[name]
        return next((o.default for o in self.kind.options if o.name == name), None)

    @property
    def resolved_targets(self) -> tuple[str, ...]:
        return tuple(self.targets) if self.targets is not None else tuple(self.kind.default_targets)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)

    def describe(self) -> str:
        return self.kind.describe()


def parse_targets(text: str | None) -> tuple[str, ...] | None:
    """'q, v' -> ('q', 'v'); None or '' -> None (the method's default)."""
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None


@dataclass(frozen=True)
class SiteContext:
    """Where a site being wrapped sits, and what wrapping it may use."""

    block: int  # layer index
    stream: str  # attn_in | attn_out | mlp_in | mlp_out
    outputs: dict[str, int]  # projection -> width, the columns of the stream's weight
    targets: list[str]  # the method's projections on this stream (may be empty)
    be: object  # Backend
    dtype: object  # the model's compute dtype
    rng: np.random.Generator  # seeded by the config; shared by every site, in order
    bias: object = None  # the stream's bias b (d_out,), or None; frozen unless the method trains it


def apply_method(model: Model, method: MethodConfig | str, calibration_tokens=None, calibration_mask=None,
                 bases=None) -> Model:
    """Make `model` train with `method`. A method that calibrates (LARS) needs
    calibration tokens (B, T); calibration_mask (B, T) bool, optional, names the
    positions whose activations count (the real tokens of padded rows; see calibrate).
    bases, optional: what calibration found, found elsewhere (LARS: (stream_bases,
    storage_bases) as calibrate returns them, e.g. by rank 0 of a data-parallel run);
    no calibration runs."""
    if isinstance(method, str):
        method = MethodConfig(method)
    kind = method.kind
    model.plan = kind.storage_plan()
    model.bases = {}
    model.train_embeddings = model.train_norms = kind.trains_embeddings
    targets = method.resolved_targets
    outputs = stream_outputs(model.cfg)
    rng = np.random.default_rng(method.seed)
    kind.prepare(model, calibration_tokens, calibration_mask, bases)
    for i, block in enumerate(model.sites):
        for stream, site in block.items():
            mine = [t for t in targets if PROJECTION_STREAM[t] == stream]
            where = SiteContext(i, stream, outputs[stream], mine, model.be, model.compute_dtype, rng, site.bias)
            block[stream] = kind.wrap(site, where)
            if site.bias is not None and getattr(block[stream], "bias", None) is None:
                raise ValueError(f"method {method.name!r} dropped the bias of blocks.{i}.{stream}: its sites "
                                 "must carry SiteContext.bias")
    model.method = method
    return model


def apply_full(model: Model) -> Model:
    """Full fine-tuning: every weight trains (embeddings, norms, all projections)."""
    return apply_method(model, MethodConfig("full"))


def apply_frozen(model: Model) -> Model:
    """Nothing trains; linear sites keep nothing."""
    for block in model.sites:
        for stream, site in block.items():
            block[stream] = FrozenSite(site.weight, site.outputs, site.bias)
    model.train_embeddings = model.train_norms = False
    return model
