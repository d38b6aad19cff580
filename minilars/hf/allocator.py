"""glibc's malloc on the CPU: keep freed tensors from staying resident.

torch's CPU tensors come from malloc. glibc serves a block from its heap below the
mmap threshold and with its own mmap above it, and it raises the threshold to the
size of each mmapped block freed (up to 32 MiB). After the first few frees, every
tensor under 32 MiB comes from the heap, and a heap keeps its freed blocks resident
(it returns memory only from its top). A step that recomputes decoder layers frees
and allocates each layer's activations in a new order, so the heap grows layer
after layer while the bytes in use stay flat: at T = 2048 on SmolLM2-135M, 283 MiB
in use against 1,121 MiB of free heap held after backward (docs/hf.md, "Where the
memory went").

Fixing the threshold (mallopt M_MMAP_THRESHOLD) stops the raising: every block at
or above it is mmapped and unmapped when freed, so resident memory follows the
live tensors. The setting is the process's, as the MALLOC_MMAP_THRESHOLD_
environment variable's is.
"""
from __future__ import annotations

import ctypes
import platform
import sys

M_MMAP_THRESHOLD = -3  # glibc malloc.h


def fix_mmap_threshold(nbytes: int) -> bool:
    """Set glibc's mmap threshold to `nbytes` for this process (and stop glibc raising
    it). True when set; False where the C library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))
