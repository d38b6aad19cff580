"""Backends behind the kernel interface (backends/base.py), chosen by name.

numpy: the reference, always available. numba and torch are imported only when
asked for, so the NumPy path runs on a machine that has neither.
"""
from __future__ import annotations

from .base import Array, Backend

BACKENDS = ("numpy", "numba", "torch")
_INSTANCES: dict[str, Backend] = {}


def available() -> list[str]:
    """Names of the backends that import on this machine."""
    return [name for name in BACKENDS if installed(name)]


def installed(name: str) -> bool:
    """Whether backend `name` imports here (numpy always does)."""
    if name == "numpy":
        return True
    try:
        get_backend(name)
    except ImportError:
        return False
    return True


# Fastest first for one LARS training step on a CPU, measured side by side
# (docs/speed.md, "Which backend auto picks"): numba, then torch, then numpy.
CPU_FASTEST_FIRST = ("numba", "torch", "numpy")


def default_backend_name(device: str = "cpu") -> str:
    """What `--backend auto` means in every command: the fastest backend installed for
    the device. On a CPU the first of CPU_FASTEST_FIRST that imports; on any other
    device (cuda) torch, the one backend that runs there."""
    if device != "cpu":
        if not installed("torch"):
            raise ImportError(f"device {device!r} needs the torch backend, and torch is not installed")
        return "torch"
    return next(name for name in CPU_FASTEST_FIRST if installed(name))


def backend_name(name: str | None = "auto", device: str = "cpu") -> str:
    """A command's --backend as a name: "auto" (or None) is `default_backend_name(device)`."""
    return default_backend_name(device) if name in (None, "auto") else name


def resolve_backend(name: str | None = "auto", device: str = "cpu") -> Backend:
    """The backend a command's --backend/--device ask for ("auto": see `backend_name`).
    The device reaches the torch backend only (the others run on the CPU). Raises
    ImportError naming the missing package."""
    name = backend_name(name, device)
    return get_backend(name, **({"device": device} if name == "torch" else {}))


def get_backend(name: str | Backend | None = None, **options) -> Backend:
    """The backend called `name` ("numpy", "numba", "torch"; None or "auto": the
    CPU default, `default_backend_name()`).
    Raises ImportError naming the missing package when it is not installed."""
    if isinstance(name, Backend):
        return name
    if name in (None, "auto"):
        name = default_backend_name()
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


__all__ = ["BACKENDS", "CPU_FASTEST_FIRST", "Array", "Backend", "available", "backend_name", "default_backend_name", "get_backend", "installed",
           "resolve_backend"]
