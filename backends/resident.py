"""What a process keeps resident that it need not: pages handed back to the OS.

Two kinds of pages stay in a process's RSS after their work is done
(docs/memory.md, "Where the peak goes"), and one allocator setting keeps freed
blocks from staying:

- freed C heap: glibc keeps freed memory in its arenas for the next malloc, and
  returns only the top of the heap past a threshold. `return_freed_heap()` is
  malloc_trim(0): every free page of every arena goes back to the OS.
- library code that is read once: numba's LLVM (libllvmlite.so, about 70 MiB of
  code and read-only data on x86-64) is only run while numba compiles a kernel or
  loads one from its on-disk cache; afterwards its pages stay mapped and counted.
  `release_library_pages("libllvmlite.so")` drops them from this process with
  madvise(MADV_DONTNEED). They are clean file pages (the mapping has no private,
  written copy of any page), so nothing is lost: the next compile faults them
  back in from the page cache, or from the file.
- glibc's dynamic mmap threshold: it rises to the size of each mmapped block freed
  (up to 32 MiB), after which those blocks come from the heap and stay resident when
  freed. `fix_mmap_threshold(nbytes)` (mallopt M_MMAP_THRESHOLD, as the
  MALLOC_MMAP_THRESHOLD_ environment variable) stops the rising: every block at or
  above nbytes is mmapped and unmapped when freed. minilars.hf sets it for torch's
  CPU tensors (docs/hf.md, "Where the memory went"); the setting is the process's.

All are Linux (glibc) only and do nothing elsewhere; none changes a value the
process computes.
"""
from __future__ import annotations

import ctypes
import platform
import sys

MADV_DONTNEED = 4  # linux/mman.h
M_MMAP_THRESHOLD = -3  # glibc malloc.h


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the operating system (glibc's malloc_trim).
    Parsing a GGUF's metadata makes a small numpy array per vocabulary string and
    merge (gguf-py's reader: 71 MiB for SmolLM2's 49,152 tokens), all freed once the
    tokenizer is built; freed small objects stay resident otherwise (measured: 16 MiB
    of them after loading SmolLM2, docs/memory.md). A no-op where there is no glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def clean_mappings(library: str) -> list[tuple[int, int]]:
    """(start, end) of each mapping of a file whose name ends with `library` that holds
    no anonymous page, read from /proc/self/smaps. A mapping with anonymous pages has
    private copies the process wrote (relocations, then made read-only: RELRO; the
    data segment): dropping those would bring back the file's unrelocated bytes, so
    they are left alone."""
    found, current = [], None
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split(None, 6)
                if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                    current = None
                    if len(head) == 6 and head[5].rstrip().endswith(library) and "w" not in head[1]:
                        start, end = (int(x, 16) for x in head[0].split("-"))
                        current = [start, end]
                elif current is not None and head[0] == "Anonymous:":
                    if int(head[1]) == 0:
                        found.append(tuple(current))
                    current = None
    except OSError:
        return []
    return found


def release_library_pages(library: str) -> int:
    """Drop this process's resident pages of `library`'s clean mappings (see the
    module docstring); returns the bytes of address space advised (0 where this is
    not Linux or the library is not loaded)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    for start, end in clean_mappings(library):
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
    return advised


def fix_mmap_threshold(nbytes: int) -> bool:
    """Set glibc's mmap threshold to `nbytes` for this process (and stop glibc raising
    it; see the module docstring). True when set; False where the C library is not
    glibc (nothing changed)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))
