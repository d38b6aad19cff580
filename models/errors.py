"""The one error type the model loaders raise.

Loading touches the network, the disk and third-party parsers, each with its own
exceptions; callers (the CLI, tests) want one type whose message says which file
and, where it applies, which tensor is at fault.
"""
from __future__ import annotations

from pathlib import Path


class ModelLoadError(Exception):
    """A model could not be found, fetched, verified or read."""

    def __init__(self, message: str, path: str | Path | None = None, tensor: str | None = None):
        self.path = None if path is None else Path(path)
        self.tensor = tensor
        where = []
        if path is not None:
            where.append(str(path))
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
