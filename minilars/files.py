"""Writing files safely: one atomic write for everything minilars saves, and a lock
that gives an output directory to one run at a time.

    atomic_write(path, write, size)   write(tmp) into a temporary file beside `path`,
                                      fsync, os.replace over `path`, fsync the directory;
                                      a kill at any moment leaves the old file or the new
                                      one, never half of one. Any OSError (a full disk,
                                      no permission) becomes one WriteError naming the
                                      path and the bytes needed; the old file stays and
                                      the temporary file is removed.
    DirectoryLock(directory)          an fcntl.flock on DIRECTORY/.minilars.lock, held
                                      while the run lives; a second run stops at once
                                      naming the holder's pid. The kernel drops the lock
                                      when its process dies, so a killed run leaves no
                                      stale lock behind (the file stays; its lock does not).
                                      wait=True: the second one waits for the first instead.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

LOCK_FILE = ".minilars.lock"


class WriteError(OSError):
    """A file could not be written; the message names the path and the bytes needed."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] None: path"
        return str(self.args[0])


class DirectoryBusy(RuntimeError):
    """Another live process holds the directory's lock."""


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def write_error(path: Path, exc: BaseException, size: int | None) -> WriteError:
    """One line: the path, why, the bytes needed and free, and that the old file is kept."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    wrapped = re.search(r"([^:]+) \(os error (\d+)\)", reason)  # safetensors: "...: No space left on device (os error 28)"
    if wrapped:
        reason = wrapped.group(1).strip()
    free = _free_bytes(path.parent)
    needs = [f"needs about {size:,} bytes" if size is not None else None,
             f"{free:,} free on that disk" if free is not None else None]
    needs = ", ".join(n for n in needs if n)
    kept = "the previous file is kept" if path.exists() else "nothing was written"
    err = WriteError(f"cannot write {path}: {reason}" + (f" ({needs})" if needs else "") + f"; {kept}")
    err.errno = getattr(exc, "errno", None) or (int(wrapped.group(2)) if wrapped else None)
    err.filename = str(path)
    return err


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], size: int | None = None) -> Path:
    """write(tmp_path) then rename over `path`; WriteError on any failure to write
    (see the module docstring). `size` is the expected size in bytes, for the message."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if not _is_write_failure(exc):
            raise
        raise write_error(path, exc, size) from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a directory we cannot write to; nothing of ours is left in it
    fsync_dir(path.parent)
    return path


def _is_write_failure(exc: BaseException) -> bool:
    """OSError, or safetensors' SafetensorError carrying the OS error as text (it
    reports a full disk as 'No space left on device (os error 28)')."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__name__ == "SafetensorError" and "os error" in str(exc).lower()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """atomic_write of bytes."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write, len(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """atomic_write of UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a log entry); WriteError when it cannot be written. An append
    cannot be atomic: a full disk may leave a partial last line, which readers skip."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        with open(path, "ab") as f:
            f.write(data)
    except OSError as exc:
        raise write_error(path, exc, len(data)) from None


class LineWriter:
    """Rows written one by one into a temporary file beside `path`, renamed over it when
    the block ends (also on Ctrl-C, so an interrupted run keeps the rows it wrote). A
    failed write is one WriteError: the previous file stays, the temporary file goes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.written = 0
        self._file = None

    def __enter__(self) -> "LineWriter":
        try:
            self._file = open(self.tmp, "w", encoding="utf-8")
        except OSError as exc:
            raise write_error(self.path, exc, None) from None
        return self

    def write(self, line: str) -> None:
        data = line.rstrip("\n") + "\n"
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            raise write_error(self.path, exc, self.written + len(data.encode())) from None
        self.written += len(data.encode())

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self._file.close()
            if kind is None or issubclass(kind, KeyboardInterrupt):
                os.replace(self.tmp, self.path)
        except OSError as error:
            if kind is None:
                raise write_error(self.path, error, self.written) from None
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- directory ownership
class DirectoryLock:
    """Holds DIRECTORY/.minilars.lock with fcntl.flock(LOCK_EX | LOCK_NB) from
    acquire() to release() (or the with block). The file holds the holder's pid, so the
    refusal can name it. Creates the directory; release() removes it again when this
    lock created it and nothing else was written there. wait: acquire() blocks until
    the holder lets go, instead of refusing; such a lock leaves the directory and its
    lock file on release, since others may be waiting on that file."""

    def __init__(self, directory: str | os.PathLike, what: str = "run", wait: bool = False):
        self.directory = Path(directory)
        self.what = what
        self.wait = wait
        self._fd: int | None = None
        self._created = False

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self) -> "DirectoryLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks, the run goes unguarded
            return self
        self._created = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc, None) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise DirectoryBusy(f"{self.directory} is in use by another {self.what} (pid {holder or 'unknown'}); "
                                f"wait for it to finish or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self._created and not self.wait and [p.name for p in self.directory.iterdir()] == [LOCK_FILE]:
            self.path.unlink()  # still locked by us: nobody else can be using it
            self.directory.rmdir()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
