"""Where a step's time goes: every backend call timed, by kernel name.

    with timed_backend(model.be) as profile:
        opt.step(model.backward(model.forward(tokens, targets)))
    print_table(profile.rows(step_seconds, top=15))   # minilars/bench/common.py

Each public method of the backend object is wrapped (on the instance, undone on
exit). A call made from inside another backend call (the numba backend's casts
inside a fallback, say) counts toward the outer one, so the seconds add up to at
most the step's wall time; the rest is Python and numpy outside the backend."""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Profile:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # kernel -> s
    calls: Counter = field(default_factory=Counter)  # kernel -> number of outermost calls

    def total(self) -> float:
        return sum(self.seconds.values())

    def rows(self, step_seconds: float, top: int | None = None) -> list[dict]:
        """One row per kernel, slowest first, with its share of the step."""
        ranked = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]
        return [{"kernel": name, "s": s, "calls": self.calls[name], "ms per call": 1e3 * s / self.calls[name],
                 "% of step": 100 * s / step_seconds} for name, s in ranked]


@contextmanager
def timed_backend(be):
    """Time every public method call of `be` (outermost calls only) into a Profile."""
    profile = Profile()
    depth = [0]
    names = [n for n in dir(be) if not n.startswith("_") and callable(getattr(be, n))
             and not isinstance(getattr(be, n), type)]

    def wrap(name, method):
        def timed(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    profile.seconds[name] += time.perf_counter() - start
                    profile.calls[name] += 1
        return timed

    for name in names:
        setattr(be, name, wrap(name, getattr(be, name)))
    try:
        yield profile
    finally:
        for name in names:
            delattr(be, name)  # the class's method shows through again
