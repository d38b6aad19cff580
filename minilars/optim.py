"""AdamW with global-norm gradient clipping, as torch.optim.AdamW + clip_grad_norm_."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .backends import Array, Backend


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self) -> None:
        if self.lr < 0 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1 or self.eps <= 0:
            raise ValueError(f"invalid AdamW settings: {self}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")


class NonFiniteGradient(FloatingPointError):
    """A gradient holds NaN or Inf: the step is refused and nothing is updated."""


class AdamW:
    """Decoupled weight decay (Loshchilov & Hutter 2019), bias-corrected moments
    (Kingma & Ba 2015, Alg. 1). State: m, v per parameter (2x trainable floats)."""

    def __init__(self, params: dict[str, Array], backend: Backend, config: AdamWConfig = AdamWConfig()):
        self.params = params
        self.be = backend
        self.config = config
        self.step_count = 0
        self.m = {name: backend.zeros_like(p) for name, p in params.items()}
        self.v = {name: backend.zeros_like(p) for name, p in params.items()}

    def clip(self, grads: dict[str, Array]) -> float:
        """Scale grads in place so their global L2 norm is at most max_grad_norm;
        returns the norm before clipping. Raises NonFiniteGradient on NaN/Inf."""
        norm = math.sqrt(sum(self.be.norm_sq(g) for g in grads.values()))
        if not math.isfinite(norm):
            bad = [name for name, g in grads.items() if not self.be.isfinite(g)]
            raise NonFiniteGradient(f"non-finite gradient in {', '.join(bad[:3]) or 'the global norm'}")
        limit = self.config.max_grad_norm
        if limit is not None and norm > limit:
            scale = limit / (norm + 1e-6)  # torch's clip_grad_norm_ formula
            for g in grads.values():
                self.be.scale_(g, scale)
        return norm

    def step(self, grads: dict[str, Array], lr: float | None = None) -> float:
        """Clip, then update every parameter in place. Returns the pre-clip norm."""
        missing = set(self.params) - set(grads)
        if missing:
            raise KeyError(f"no gradient for {sorted(missing)[:3]}")
        norm = self.clip(grads)
        self.step_count += 1
        c = self.config
        for name, p in self.params.items():
            self.be.adamw_update(p, grads[name], self.m[name], self.v[name], lr=c.lr if lr is None else lr,
                                 beta1=c.beta1, beta2=c.beta2, eps=c.eps, weight_decay=c.weight_decay,
                                 step=self.step_count)
        return norm

    def reset(self) -> None:
        """Forget the moments and the step count, as for a new run (bias correction restarts)."""
        self.step_count = 0
        for state in (self.m, self.v):
            for moment in state.values():
                self.be.scale_(moment, 0.0)

    def state_dict(self) -> dict:
        out = {"step": self.step_count}
        for name in self.params:
            out[f"m.{name}"] = self.be.to_numpy(self.m[name])
            out[f"v.{name}"] = self.be.to_numpy(self.v[name])
        return out

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        for name in self.params:
            self.m[name] = self.be.asarray(state[f"m.{name}"].copy())
            self.v[name] = self.be.asarray(state[f"v.{name}"].copy())
