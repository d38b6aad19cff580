"""Activation offloading: kept arrays written to a temporary file instead of RAM.

The `offload` storage policy (store.py) keeps a float16 copy of an array, as `half`
does, in a file rather than in memory: the default LARS recipe keeps only each
block's input (34.6 KB per token on SmolLM2-135M, 270 MiB at T = 8192), and those
bytes are written in the forward and read back one block at a time in backward.
The file is unlinked as soon as it is created (its pages go when the process does,
however it ends) and read with os.preadv into one reused buffer, not memory-mapped,
so the kept bytes never count in the process's resident memory; the kernel's page
cache may hold them, and hands them back under memory pressure (clean pages once
written back, as any file's).

    OffloadFile(directory)   an unlinked file in `directory` (None: the system temp dir)
    .write(array) -> Spilled  the array's bytes appended (os.pwrite); a full disk raises
                              files.WriteError naming the file and the bytes needed
    .read(spilled) -> array   the bytes back into the reused buffer (a view of it: the
                              caller copies or casts before the next read)
    .free(spilled)            the bytes no longer needed; when none are, the file is
                              truncated, the buffer dropped, and the next step writes
                              from offset 0
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import write_error


def offload_directory(directory: str | os.PathLike | None) -> Path:
    """The directory an offload file goes in (None: the system temp dir), checked to
    exist: ValueError naming it otherwise."""
    path = Path(directory) if directory else Path(tempfile.gettempdir())
    if not path.is_dir():
        raise ValueError(f"offload directory {str(path)!r} does not exist or is not a directory")
    return path


@dataclass(frozen=True)
class Spilled:
    """Where an array went: its bytes at `offset`, and how to view them again."""

    offset: int
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class OffloadFile:
    """An unlinked temporary file holding spilled arrays back to back (see the module
    docstring). One per ActivationStore; closed when the store is dropped."""

    fd = -1  # until the file is open (a missing directory fails before)

    def __init__(self, directory: str | os.PathLike | None = None):
        self.fd, name = tempfile.mkstemp(prefix="minilars-offload-", dir=offload_directory(directory))
        self.path = Path(name)  # for messages: the name is gone once unlinked
        os.unlink(name)  # on Linux and macOS the pages live until the fd is closed
        self.end = 0  # bytes written (the next write's offset)
        self.bytes_now = 0  # bytes still to be read back
        self._buffer = np.empty(0, dtype=np.uint8)  # reused by every read

    def write(self, array: np.ndarray) -> Spilled:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        offset, done = self.end, 0
        try:
            while done < len(data):  # pwrite may write less than asked (a signal, a pipe)
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as exc:
            raise write_error(self.path, exc, offset + len(data)) from None
        self.end += len(data)
        self.bytes_now += len(data)
        return Spilled(offset, tuple(array.shape), array.dtype)

    def read(self, spilled: Spilled) -> np.ndarray:
        if self._buffer.nbytes < spilled.nbytes:
            self._buffer = np.empty(spilled.nbytes, dtype=np.uint8)
        out = self._buffer[:spilled.nbytes]
        done = 0
        while done < spilled.nbytes:
            n = os.preadv(self.fd, [out[done:]], spilled.offset + done)
            if n == 0:
                raise OSError(f"offload file {self.path} ended at byte {spilled.offset + done} of "
                              f"{spilled.offset + spilled.nbytes}: it was truncated by something else")
            done += n
        return out.view(spilled.dtype).reshape(spilled.shape)

    def free(self, spilled: Spilled) -> None:
        self.bytes_now -= spilled.nbytes
        if self.bytes_now == 0:  # nothing left to read: start over, give the disk and the buffer back
            os.ftruncate(self.fd, 0)
            self.end = 0
            self._buffer = np.empty(0, dtype=np.uint8)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()
