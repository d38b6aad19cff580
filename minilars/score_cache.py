"""Held-out scores kept between runs, keyed by everything that decides them.

The accuracy study scores the base model on the held-out questions before it trains
anything, and that scoring is the same in every study run of one model and question
set: greedy decoding is deterministic. On passkey it is ~7 minutes of this 2-core
machine per run (120 prefills of up to 2,048 tokens), a third of a one-method seed
screen. So the study keeps the rows it wrote and reuses them when the key matches:

    key = sha256(model files' bytes, question file's bytes, scoring settings,
                 the source of minilars/, backends/ and models/)

The engine's source is in the key so that a change to any kernel, the tokenizer
path or the scoring means scoring again; a stale entry can only miss, never be read.
Left out are the files that only run the study (ORCHESTRATION: this file, the
study command and its job runner): what they hand the scoring process is in the
key already (the question file, the settings), and leaving them out lets a study
reuse its base scores across changes to how it schedules and prints. Entries
live in cache_dir()/scores/<key>.jsonl (minilars.models.cache_dir: $MINILARS_CACHE, else
$XDG_CACHE_HOME/minilars, else ~/.cache/minilars), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

SUBDIR = "scores"
ORCHESTRATION = ("score_cache.py", "commands/study.py", "commands/jobs.py")  # in minilars/, not hashed


def engine_source_digest(packages: list[Path] | None = None) -> str:
    """sha256 over every .py file under the engine's package folders (default: where
    minilars, minilars.backends and minilars.models are installed), in path order,
    but the first folder's ORCHESTRATION files."""
    if packages is None:
        from . import backends, models

        packages = [Path(__file__).parent, Path(backends.__file__).parent, Path(models.__file__).parent]
    digest = hashlib.sha256()
    for i, folder in enumerate(packages):
        for path in sorted(Path(folder).rglob("*.py")):
            if i == 0 and path.relative_to(folder).as_posix() in ORCHESTRATION:
                continue
            digest.update(f"{i}/{path.relative_to(folder)}".encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _model_files(spec: str) -> list[Path]:
    """The files a model spec loads: the GGUF, or every file of a Hugging Face
    directory; [] for the built-in tiny preset (its weights come from its seed)."""
    if spec == "tiny":
        return []
    from .models import resolve_model

    path = resolve_model(spec)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def scores_key(model: str, questions: Path, settings: dict) -> str:
    """The cache key of scoring `model` on the question file with `settings`
    (backend, device, weights, max_new_tokens: whatever the answers depend on)."""
    from .models.cache import sha256_file

    digest = hashlib.sha256()
    parts = {"engine": engine_source_digest(), "settings": settings,
             "model": model if model == "tiny" else [[p.name, sha256_file(p)] for p in _model_files(model)],
             "questions": sha256_file(Path(questions))}
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def entry(key: str) -> Path:
    from .models.cache import cache_dir

    return cache_dir() / SUBDIR / f"{key}.jsonl"


def fetch(key: str, dest: Path) -> bool:
    """Copy the cached rows of `key` to dest; False when there are none."""
    cached = entry(key)
    if not cached.is_file():
        return False
    shutil.copyfile(cached, dest)
    return True


def store(key: str, rows_file: Path) -> Path | None:
    """Keep a copy of rows_file under `key`; None (and nothing changed) when the
    cache cannot be written: a cache is a saving, never a reason to fail a run."""
    from .files import WriteError, atomic_write

    target = entry(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: shutil.copyfile(rows_file, tmp))
    except (OSError, WriteError):
        return None
    return target


__all__ = ["engine_source_digest", "entry", "fetch", "scores_key", "store"]
