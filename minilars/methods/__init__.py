"""Training methods: which arrays train and what each linear site keeps.

`apply_method(model, MethodConfig(...), calibration_tokens)` swaps the model's linear
sites (from_linear) and sets which embeddings and norms train:

    full    every weight (embeddings, norms, all projections)      methods/full.py
    lora    rank-r A, B on the target projections (PEFT defaults)  methods/lora.py
    ia3     learned scales on k, v outputs and the down input      methods/ia3.py
    lars    LARS subspace adapters + activation-storage plan       methods/lars.py
    frozen  nothing (inference)                                    methods/frozen.py

Each method is one Method subclass (methods/base.py) in its own module, registered
by name (methods/registry.py). Adding one: write its module, import it below.
"""
from __future__ import annotations

from ..weights import STREAMS
from .base import Method, MethodOption, StudyRun
from .method_config import (ALL_PROJECTIONS, DEFAULT_METHOD, MethodConfig, SiteContext, apply_frozen, apply_full,
                            apply_method, parse_targets)
from .registry import (method_class, method_for_adapter, method_options, register, registered, study_runs,
                       unregister)
from .storage import LARS_DEFAULT_STORAGE, LARS_FAST_STORAGE, NAMED_STORAGE, parse_storage

# The registered methods, in the order commands list them.
from . import full, lora, ia3, lars, frozen  # noqa: E402,F401  isort: skip

IA3_DEFAULT = ia3.IA3.default_targets


def __getattr__(name: str):
    if name == "METHODS":  # every registered name, toy methods registered later included
        return registered()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ALL_PROJECTIONS", "DEFAULT_METHOD", "IA3_DEFAULT", "LARS_DEFAULT_STORAGE", "LARS_FAST_STORAGE", "METHODS",
           "Method", "MethodConfig", "MethodOption", "NAMED_STORAGE", "STREAMS", "SiteContext", "StudyRun",
           "apply_frozen", "apply_full", "apply_method", "method_class", "method_for_adapter", "method_options",
           "parse_storage", "parse_targets", "register", "registered", "study_runs", "unregister"]
