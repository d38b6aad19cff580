"""Fuzz tests of every reader that takes a user's file (issue 22): GGUF header and
metadata, safetensors header (HF directories), tokenizer.json, JSONL data, the
finetune TOML config, adapter directories and checkpoints.

Each test starts from a valid file written here, damages it the way disks and
people do (bytes overwritten, a 64-bit count or length replaced by a random or huge
number, the file cut short, text edited), and reads it. The property: the reader
returns a correct result or raises its own error type (ModelLoadError, DataError,
CommandError, AdapterError, CheckpointError) with a message; never another
exception, never a hang (a 30 s alarm per example), never memory far beyond the
file's size (the process's peak RSS may not grow by more than MAX_GROWTH).

Reproducible in CI: derandomized, no example database, a fixed number of examples
(MINILARS_FUZZ_EXAMPLES=2000 searches longer, by hand).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilars.models import ModelLoadError, load_model_weights

EXAMPLES = int(os.environ.get("MINILARS_FUZZ_EXAMPLES", "60"))  # more for a longer search by hand
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
MAX_GROWTH = 256 << 20  # bytes of peak RSS one damaged example may add (the files are a few kB to 100 kB)
HANG_SECONDS = 30


class Hang(Exception):
    pass


@contextmanager
def guarded():
    """Fail on a hang or on a peak-RSS jump: the reader must not try to allocate what a
    damaged length field claims."""
    def alarm(signum, frame):
        raise Hang(f"the reader took more than {HANG_SECONDS} s")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MAX_GROWTH, f"peak memory grew by {grown / 2**20:.0f} MiB reading a damaged file"


@st.composite
def damaged(draw, original: bytes, focus: int | None = None):
    """`original` with one kind of damage, positions drawn mostly from its first
    `focus` bytes (the header, where lengths and counts live)."""
    data = bytearray(original)
    end = min(len(data), focus or len(data))
    kind = draw(st.sampled_from(["bytes", "number", "truncate", "text"]))
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    elif kind == "number":  # a length, count, offset or dimension gone wrong
        at = draw(st.integers(0, max(0, end - 8)))
        value = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])))
        data[at:at + 8] = struct.pack("<Q", value)
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    else:  # a text edit: a run of bytes replaced by printable junk or quotes and brackets
        at = draw(st.integers(0, end - 1))
        junk = draw(st.binary(min_size=0, max_size=16) | st.sampled_from([b'"', b"{", b"]", b"\\", b"\x00", b"1e999"]))
        data[at:at + draw(st.integers(0, 16))] = junk
    return bytes(data)


def fuzz(original: bytes, path: Path, read, error: type[Exception], check=None, focus: int | None = None,
         named: object = None) -> None:
    """Write damaged copies of `original` to `path` and call read(): it must return a
    result that check(result) accepts or raise `error` naming `named` (default: path)."""
    named = str(path if named is None else named)

    @FUZZ
    @given(damaged(original, focus=focus))
    def one(data):
        path.write_bytes(data)
        with guarded():
            try:
                result = read()
            except error as exc:
                assert named in str(exc), str(exc)
                return
            if check is not None:
                check(result)

    one()


def _copy(source: Path, destination: Path) -> Path:
    import shutil

    shutil.copytree(source, destination)
    return destination


def _finite_weights_of_their_shapes(loaded) -> None:
    from minilars.models.layout import expected_shapes

    cfg, state, tok = loaded
    assert {n: a.shape for n, a in state.items()} == expected_shapes(cfg)
    assert all(np.isfinite(a).all() for a in state.values())
    if tok is not None:
        assert all(0 <= i < tok.vocab_size for i in tok.encode("hello world"))


# ---------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    from test_loaders import TINY, random_state, write_gguf

    cfg = TINY.with_(vocab_size=270)  # the byte vocabulary's size
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", cfg, random_state(cfg, np.random.default_rng(0)),
                      vocab=True)
    return path.read_bytes()


def test_fuzz_gguf(tiny_gguf, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_gguf)
    _finite_weights_of_their_shapes(load_model_weights(path))  # the original loads
    fuzz(tiny_gguf, path, lambda: load_model_weights(path), ModelLoadError, _finite_weights_of_their_shapes,
         focus=6000)


# ---------------------------------------------------------------- safetensors (HF directory)
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from test_loaders import TINY, random_state

    from minilars.models.hf_loader import save_hf_dir

    directory = tmp_path_factory.mktemp("hf") / "model"
    save_hf_dir(directory, TINY, random_state(TINY, np.random.default_rng(0)))
    return directory


@pytest.mark.parametrize("name, focus", [("model.safetensors", 4096), ("config.json", None)])
def test_fuzz_hf_directory(tiny_hf, tmp_path, name, focus):
    directory = _copy(tiny_hf, tmp_path / "hf")
    fuzz((tiny_hf / name).read_bytes(), directory / name, lambda: load_model_weights(directory), ModelLoadError,
         _finite_weights_of_their_shapes, focus=focus, named=directory)


# ---------------------------------------------------------------- tokenizer.json
@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    from test_loaders import gguf_tokenizer

    directory = tmp_path_factory.mktemp("tok") / "tok"
    directory.mkdir()
    gguf_tokenizer(directory).save(directory)
    return directory


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_fuzz_tokenizer_files(tokenizer_files, tmp_path, name):
    from minilars.models import Tokenizer

    directory = _copy(tokenizer_files, tmp_path / "tok")

    def encodes(tok) -> None:
        assert all(0 <= i < tok.vocab_size for i in tok.encode("hello world <|im_end|>"))

    fuzz((tokenizer_files / name).read_bytes(), directory / name,
         lambda: Tokenizer.from_file(directory / "tokenizer.json", directory / "tokenizer_config.json"),
         ModelLoadError, encodes)


# ---------------------------------------------------------------- JSONL data
JSONL = "".join(json.dumps(r) + "\n" for r in [
    {"prompt": "What is Mira's cat called?", "completion": "Pumpernickel.", "answer": "Pumpernickel"},
    {"messages": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Keemun."}],
     "split": "eval"},
    {"text": "Mira rides a mustard bike down Vellacourt street."},
]).encode()


def test_fuzz_jsonl_data(tmp_path):
    from minilars import data

    tok = data.char_tokenizer()
    path = tmp_path / "d.jsonl"

    def examples_of_matching_shapes(examples) -> None:
        assert all(ex.ids.ndim == 1 and ex.ids.shape == ex.labelled.shape for ex in examples)

    fuzz(JSONL, path, lambda: [data.tokenize(r, tok, 66) for r in data.read_records(path)], data.DataError,
         examples_of_matching_shapes, named=f"{path}:")


# ---------------------------------------------------------------- the finetune TOML config
TOML = b'model = "tiny"\nmethod = "lora"\nrank = 4\nseq-len = 64\nlr = 1e-3\nstorage = "exact"\nmerge = true\n'


def test_fuzz_finetune_config(tmp_path):
    from minilars.cli import CommandError
    from minilars.commands.finetune import options_by_name, read_config_file

    path = tmp_path / "c.toml"

    def options_of_their_types(options) -> None:
        for key, value in options.items():
            option = options_by_name()[key]
            assert option.choices is None or value in option.choices
            assert isinstance(value, bool) if option.type is bool else not isinstance(value, (dict, list))

    fuzz(TOML, path, lambda: read_config_file(str(path)), CommandError, options_of_their_types)


# ---------------------------------------------------------------- adapter directories
def _tiny_model():
    from minilars.config import preset
    from minilars.model import Model

    return Model.random(preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    from minilars.methods import MethodConfig, apply_method
    from minilars.peft_io import save_adapter

    model = apply_method(_tiny_model(), MethodConfig("lora", rank=2))
    for block in model.sites:
        for site in block.values():
            for b in getattr(site, "B", {}).values():
                b[...] = np.random.default_rng(0).standard_normal(b.shape)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a")


@pytest.mark.parametrize("name, focus", [("adapter_model.safetensors", 4096), ("adapter_config.json", None),
                                         ("minilars_adapter.json", None)])
def test_fuzz_adapter_directory(adapter_dir, tmp_path, name, focus):
    from minilars.peft_io import AdapterError, load_adapter

    directory = _copy(adapter_dir, tmp_path / "a")

    def attached_and_finite(model) -> None:
        assert model.method is not None
        assert all(np.isfinite(model.be.to_numpy(p)).all() for p in model.trainable().values())

    fuzz((adapter_dir / name).read_bytes(), directory / name, lambda: load_adapter(_tiny_model(), directory),
         AdapterError, attached_and_finite, focus=focus, named=directory)


# ---------------------------------------------------------------- checkpoints
def _lora_run():
    from minilars.methods import MethodConfig, apply_method
    from minilars.optim import AdamW

    model = apply_method(_tiny_model(), MethodConfig("lora", rank=2))
    return model, AdamW(model.trainable(), model.be)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[bytes, dict]:
    from minilars import train

    model, opt = _lora_run()
    rng = np.random.default_rng(0)
    for p in model.trainable().values():
        p[...] = rng.standard_normal(p.shape)
    path = tmp_path_factory.mktemp("ckpt") / train.CHECKPOINT
    train.save_checkpoint(path, model, opt, {"step": 3, "config_hash": "h", "run_config": {}, "history": []})
    return path.read_bytes(), {k: model.be.to_numpy(v).copy() for k, v in model.trainable().items()}


def test_fuzz_checkpoint(checkpoint, tmp_path):
    from minilars import train

    original, params = checkpoint
    path = tmp_path / train.CHECKPOINT

    def restore():
        model, opt = _lora_run()
        train.read_checkpoint_meta(path)
        return train.restore_checkpoint(path, model, opt), model

    def bitwise_the_saved_one(restored) -> None:
        # the checksums cover every tensor and the metadata: what loads is what was saved
        meta, model = restored
        assert meta["step"] == 3
        for name, value in model.trainable().items():
            np.testing.assert_array_equal(model.be.to_numpy(value), params[name])

    fuzz(original, path, restore, train.CheckpointError, bitwise_the_saved_one, focus=4096)
