"""Run a benchmark process inside a memory limit: a memory cgroup of its own (v2 or v1).

`minilars bench memory --memory-limit 512MiB` starts each run in a fresh cgroup
below the one this process is in, with the limit on memory and none on swap (a
512 MB board has no swap worth the name), and reads back whether the kernel's OOM
killer ran and the cgroup's peak charge. The charge is more than RSS: it counts the
page cache the process faults in (the GGUF file's blocks, memory-mapped) and kernel
memory, and under the limit the kernel reclaims clean file pages (the blocks, the
libraries' code) before it kills anything, so a run can finish in a limit below
its unconstrained peak RSS.

Creating a cgroup needs root (or a delegated subtree). `MemoryLimit.create` raises
CgroupUnavailable with the reason when it cannot: no memory controller mounted, not
root, a cgroup v2 parent that cannot enable the memory controller for children
(the "no internal processes" rule), a read-only /sys/fs/cgroup.

    v2: <mount>/<own path>/minilars-<pid>-<n>/  memory.max, memory.swap.max = 0;
        peak: memory.peak (Linux >= 5.19); OOM kills: memory.events "oom_kill"
    v1: <memory mount>/<own path>/minilars-<pid>-<n>/  memory.limit_in_bytes,
        memory.memsw.limit_in_bytes = the same (when swap accounting is on);
        peak: memory.max_usage_in_bytes; OOM kills: memory.oom_control "oom_kill"
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

_COUNTER = itertools.count()


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be made here; the message says why."""


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount point, root of the mount in its hierarchy, fstype, options) of the cgroup
    mounts in /proc/self/mountinfo."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and rest and rest[0] in ("cgroup", "cgroup2"):
            out.append((fields[4], fields[3], rest[0], set(rest[-1].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """controller (or '' for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _below(mount: str, root: str, own: str) -> Path:
    """This process's cgroup directory under a mount whose root is `root` in the hierarchy."""
    relative = os.path.relpath(own, root) if own.startswith(root) else own.lstrip("/")
    return Path(mount) / ("" if relative == "." else relative)


class MemoryLimit:
    """A fresh memory cgroup with a limit; `enter` (for subprocess's preexec_fn) moves
    the calling process into it. Use as a context manager: the cgroup is removed after."""

    def __init__(self, path: Path, version: int, limit: int, swap_limited: bool):
        self.path, self.version, self.limit, self.swap_limited = path, version, limit, swap_limited

    def __repr__(self) -> str:
        return f"MemoryLimit({str(self.path)!r}, v{self.version}, {self.limit} bytes)"

    @classmethod
    def create(cls, limit_bytes: int) -> "MemoryLimit":
        if os.geteuid() != 0:
            raise CgroupUnavailable("making a memory cgroup needs root (run as root, or give the limit another way)")
        own = _own_paths()
        errors = []
        for mount, root, fstype, options in _mounts():
            try:
                if fstype == "cgroup2":
                    return cls._create_v2(_below(mount, root, own.get("", "/")), limit_bytes)
                if "memory" in options:
                    return cls._create_v1(_below(mount, root, own.get("memory", "/")), limit_bytes)
            except (OSError, CgroupUnavailable) as exc:
                errors.append(f"{mount} ({fstype}): {exc}")
        if not errors:
            raise CgroupUnavailable("no cgroup v2 mount and no cgroup v1 memory controller is mounted")
        raise CgroupUnavailable("; ".join(errors))

    @classmethod
    def _new_dir(cls, parent: Path) -> Path:
        path = parent / f"minilars-{os.getpid()}-{next(_COUNTER)}"
        path.mkdir()
        return path

    @classmethod
    def _create_v2(cls, parent: Path, limit: int) -> "MemoryLimit":
        if "memory" not in (parent / "cgroup.controllers").read_text().split():
            raise CgroupUnavailable("the memory controller is not available in this cgroup v2 subtree")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            try:
                (parent / "cgroup.subtree_control").write_text("+memory")
            except OSError as exc:  # EBUSY: the parent holds processes (no internal processes rule)
                raise CgroupUnavailable(f"cannot enable the memory controller for children of {parent} "
                                        f"({exc.strerror})") from None
        path = cls._new_dir(parent)
        try:
            (path / "memory.max").write_text(str(limit))
            swap = path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        except OSError:
            path.rmdir()
            raise
        return cls(path, 2, limit, swap_limited=(path / "memory.swap.max").exists())

    @classmethod
    def _create_v1(cls, parent: Path, limit: int) -> "MemoryLimit":
        path = cls._new_dir(parent)
        try:
            (path / "memory.limit_in_bytes").write_text(str(limit))
            memsw = path / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # only with swap accounting on; memory + swap <= limit: no swap
                memsw.write_text(str(limit))
        except OSError:
            path.rmdir()
            raise
        return cls(path, 1, limit, swap_limited=(path / "memory.memsw.limit_in_bytes").exists())

    # ---------------------------------------------------------------- use
    def enter(self) -> None:
        """Move the calling process into the cgroup (a child, before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        """The cgroup's largest charge so far (memory and page cache); None when the kernel does not say."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in the cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass

    def __enter__(self) -> "MemoryLimit":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def has_swap() -> bool:
    """Whether the machine has any swap space (/proc/swaps lists a device or file)."""
    try:
        return len(Path("/proc/swaps").read_text().strip().splitlines()) > 1
    except OSError:
        return False


def evict_from_page_cache(path: str | os.PathLike) -> bool:
    """Drop a file's clean pages from the page cache (posix_fadvise DONTNEED), so the
    next process that reads it faults them in and is charged for them: a cgroup is
    charged for page cache only by the process that first brings a page in."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


__all__ = ["CgroupUnavailable", "MemoryLimit", "evict_from_page_cache", "has_swap"]
