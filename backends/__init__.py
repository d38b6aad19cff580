"""Backends behind the kernel interface (backends/base.py), chosen by name.

numpy: the reference, always available. numba and torch are imported only when
asked for, so the NumPy path runs on a machine that has neither.
"""
from __future__ import annotations

from .base import Array, Backend

_INSTANCES: dict[str, Backend] = {}


def available() -> list[str]:
    """Names of the backends that import on this machine."""
    names = ["numpy"]
    for name in ("numba", "torch"):
        try:
            get_backend(name)
        except ImportError:
            continue
        names.append(name)
    return names


def default_backend_name() -> str:
    """numba where it imports, else numpy."""
    try:
        get_backend("numba")
        return "numba"
    except ImportError:
        return "numpy"


def get_backend(name: str | Backend | None = None, **options) -> Backend:
    """The backend called `name` ("numpy", "numba", "torch"; None = default).
    Raises ImportError naming the missing package when it is not installed."""
    if isinstance(name, Backend):
        return name
    name = name or default_backend_name()
    key = name + repr(sorted(options.items()))
    if key in _INSTANCES:
        return _INSTANCES[key]
    if name == "numpy":
        from .numpy_backend import NumpyBackend
        backend = NumpyBackend()
    elif name == "numba":
        from .numba_backend import NumbaBackend  # raises ImportError without numba
        backend = NumbaBackend()
    elif name == "torch":
        from .torch_backend import TorchBackend  # raises ImportError without torch
        backend = TorchBackend(**options)
    else:
        raise ValueError(f"unknown backend {name!r}; choose numpy, numba or torch")
    _INSTANCES[key] = backend
    return backend


__all__ = ["Array", "Backend", "available", "default_backend_name", "get_backend"]
