"""Frozen: nothing trains (inference; `plan --method frozen` plans the no-grad forward).

Each linear site becomes a FrozenSite (minilars/sites.py), which keeps nothing.
"""
from __future__ import annotations

from ..sites import FrozenSite
from .base import Method
from .registry import register


@register
class Frozen(Method):
    name = "frozen"
    summary = "nothing trains"
    trains = False

    def wrap(self, site, where):
        return FrozenSite(site.weight, where.outputs, where.bias)
