"""Method: what one way of training is, in one class (a model: peft's tuner classes).

A method says, as class attributes, what the commands need to know without a config
(its options with help text, whether something trains, what it saves, its study lr
grid, ...), and, bound to a MethodConfig (`config.kind`), does its part of
apply_method (storage plan, calibration, wrapping each linear site) and of PEFT
export and import. A new method is a subclass in its own module, decorated with
@register (minilars/methods/registry.py) and imported by minilars/methods/__init__.py.

Letters: d_in, d_out, r rank; s a projection of a stream.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import numpy as np

from ..model import Model
from ..sites import FrozenSite, LinearSite
from ..store import StoragePlan
from .method_config import ALL_PROJECTIONS, MethodConfig, SiteContext, apply_method


def refresh_steps(refreshes: int, steps: int) -> frozenset[int]:
    """The steps before which a run of `steps` steps refreshes its bases (docs/lars.md
    Part 1.6): k * steps // (N + 1) for k = 1..N, evenly spaced, never before the first
    step or after the last (minilars/train.py's Trainer and minilars.hf's LarsTrainer)."""
    return frozenset(k * steps // (refreshes + 1) for k in range(1, refreshes + 1)) - {0, steps}


# key(proj, suffix) -> the PEFT tensor name of projection `proj` in the current layer
PeftKey = Callable[[str, str], str]
# get(proj, suffix, shape) -> that tensor (numpy), checked to have `shape`
PeftGet = Callable[[str, str, tuple], np.ndarray]


def positive_int(text) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class MethodOption:
    """A setting a method reads from its MethodConfig (a field of it, or one of its
    `extra`), as the CLI offers it: --NAME of `type`, `help` saying what it is and
    `note` what it means for this method (several methods may read one option)."""

    name: str  # the flag without dashes, underscores for dashes
    type: object  # str, int, float or a converter
    default: object
    help: str
    note: str = ""

    def with_help(self, help: str) -> "MethodOption":
        return replace(self, help=help, note="")


RANK_HELP = "adapter rank r"
TARGETS_HELP = "projections to adapt, comma-separated from " + ",".join(ALL_PROJECTIONS)


class StudyRun(NamedTuple):
    """One configuration `minilars study accuracy` trains: finetune flags and an lr grid."""

    flags: tuple[str, ...]
    lrs: tuple[float, ...]
    method: type["Method"]


class Method:
    """One way to train. Subclasses set the class attributes and override the
    steps that differ; the defaults describe an adapter that wraps the projections
    named by its targets and leaves every other site frozen."""

    name: ClassVar[str] = ""  # the --method value and the registry key
    summary: ClassVar[str] = ""  # a few words for --method's help
    options: ClassVar[tuple[MethodOption, ...]] = ()  # the settings it reads
    default_targets: ClassVar[tuple[str, ...]] = ALL_PROJECTIONS
    trains: ClassVar[bool] = True  # False: nothing trains (inference only; not a finetune choice)
    trains_embeddings: ClassVar[bool] = False  # embeddings and norms train as well
    weight_gradients: ClassVar[bool] = False  # backward forms dW of every projection (bench speed's FLOPs)
    needs_calibration: ClassVar[bool] = False  # prepare() reads calibration tokens
    saves_adapter: ClassVar[bool] = False  # finetune saves a PEFT adapter directory
    saves_merged: ClassVar[bool] = False  # finetune saves merged weights (nothing smaller holds the result)
    typical_rank: ClassVar[int | None] = None  # rank `plan` and the benches assume when none is given
    storage_to_try: ClassVar[tuple] = ()  # leaner storage recipes the planner suggests when a run does not fit
    study_lrs: ClassVar[tuple[float, ...]] = ()  # `minilars study` lr grid; empty: not studied
    peft_type: ClassVar[str | None] = None  # PEFT's name for the adapter format it saves as
    peft_default: ClassVar[bool] = False  # loads adapters of peft_type that minilars did not write
    site_class: ClassVar[type[LinearSite] | None] = None  # the site it wraps trained projections in
    has_rank: ClassVar[bool] = False  # set from `options`

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.has_rank = any(o.name == "rank" for o in cls.options)

    def __init__(self, config: MethodConfig):
        self.config = config

    # ---------------------------------------------------------------- what it is
    @classmethod
    def reads(cls, option: str) -> bool:
        return any(o.name == option for o in cls.options)

    @classmethod
    def rank_limit(cls, d_in: int, d_out: int) -> tuple[int, str] | None:
        """(the largest rank this method can use on a projection d_in -> d_out, what
        bounds it), for finetune to refuse a larger --rank before any work; None: no
        rank, or no bound."""
        return None

    @classmethod
    def study_runs(cls) -> dict[str, StudyRun]:
        """name -> StudyRun: by default one run, at typical_rank when it has a rank."""
        if not cls.study_lrs:
            return {}
        rank = ("--rank", str(cls.typical_rank)) if cls.has_rank and cls.typical_rank else ()
        return {cls.name: StudyRun(("--method", cls.name, *rank), cls.study_lrs, cls)}

    def validate(self) -> None:
        """Raise ValueError for a config this method cannot train with."""

    def describe(self) -> str:
        return self.name

    # ---------------------------------------------------------------- apply_method's steps
    def storage_plan(self) -> StoragePlan:
        """How the activation store keeps what backward needs (exact by default)."""
        return StoragePlan()

    def prepare(self, model: Model, calibration_tokens, calibration_mask, bases=None) -> None:
        """Anything to do before the sites are wrapped (LARS calibrates here, or takes
        `bases`, what a calibration elsewhere found)."""

    @property
    def refreshes(self) -> int:
        """How often what prepare() calibrated is found again during a run, evenly spaced
        (0: never; LARS's --refreshes); the trainer then calls calibrated_bases and refresh."""
        return 0

    def calibrated_bases(self, model: Model, tokens, mask) -> dict:
        """What prepare() would calibrate, found again on `tokens` through the model as it now is
        (backend arrays by name)."""
        raise NotImplementedError(f"method {self.name!r} calibrates nothing to refresh")

    def refresh(self, model: Model, bases: dict) -> None:
        """Take `bases` (calibrated_bases' result, or its arrays as numpy) in place of the current ones."""
        raise NotImplementedError(f"method {self.name!r} calibrates nothing to refresh")

    def refresh_all(self, model: Model, tokens, mask=None) -> None:
        """Every refresh of a run, done now on `tokens`: the model as it is in the steps after
        the last one, which hold the most (the planner and the benches measure that step)."""
        for _ in range(self.refreshes):
            self.refresh(model, self.calibrated_bases(model, tokens, mask))

    def wrap(self, site: LinearSite, where: SiteContext) -> LinearSite:
        """The site that replaces `site`: an adapter where the stream has targets."""
        if not where.targets:
            return FrozenSite(site.weight, where.outputs, where.bias)
        return self.adapter(site.weight, where)

    def adapter(self, weight, where: SiteContext) -> LinearSite:
        raise NotImplementedError(f"{type(self).__name__} wraps no adapter")

    # ---------------------------------------------------------------- PEFT
    def peft_config(self, common: dict, tensors: dict[str, np.ndarray]) -> dict:
        """adapter_config.json: `common` (target modules, task type, ...) + this format's fields,
        for the PEFT-named `tensors` (peft_tensors' of every site)."""
        raise NotImplementedError(f"method {self.name!r} has no PEFT format")

    def peft_tensors(self, site: LinearSite, key: PeftKey, be) -> dict[str, np.ndarray]:
        """PEFT-named tensors of one trained site (numpy, the adapter's own dtype)."""
        raise NotImplementedError(f"method {self.name!r} has no PEFT format")

    @classmethod
    def config_from_peft(cls, peft_config: dict, recorded: dict, targets: tuple[str, ...]) -> MethodConfig:
        """The MethodConfig of a saved adapter (`recorded`: minilars_adapter.json, or {})."""
        raise NotImplementedError(f"method {cls.name!r} has no PEFT format")

    def attach(self, model: Model, get: Callable[[int], PeftGet]) -> None:
        """Build the sites (apply_method, no calibration needed) and load every trained
        site's tensors; get(layer) reads that layer's tensors."""
        apply_method(model, self.config)
        self.load_sites(model, get)

    def load_sites(self, model: Model, get: Callable[[int], PeftGet]) -> None:
        for i, block in enumerate(model.sites):
            for site in block.values():
                if isinstance(site, self.site_class):
                    self.load_site(site, get(i), model.be, model.compute_dtype)

    def load_site(self, site: LinearSite, get: PeftGet, be, dtype) -> None:
        raise NotImplementedError(f"method {self.name!r} has no PEFT format")
