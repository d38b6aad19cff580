"""The `offload` storage policy: block inputs written to a file, read back in backward.

Offloading keeps the same float16 values as `half`, so a step's gradients must be the
same bytes; the planner must count the offloaded bytes as disk, not RAM; a full disk
must stop with a message naming the file and the bytes needed."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from minilars.backends import get_backend
from minilars.config import preset
from minilars.files import WriteError
from minilars.methods import MethodConfig, apply_method
from minilars.model import Model
from minilars.offload import OffloadFile
from minilars.planner import plan_memory
from minilars.store import Half, Offload, StoragePlan, parse_policy

TINY = preset("tiny")
DEFAULT = (("block", "recompute"), ("input.x", "half"))


def _offload(directory=None):
    return (("block", "recompute"), ("input.x", f"offload({directory})" if directory else "offload"))


def _step(storage, backend="numpy", seed=0, t=13):
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, TINY.vocab_size, (2, t)), rng.integers(0, TINY.vocab_size, (2, t))
    model = Model.random(TINY, seed=1, backend=backend, attention_tile=4)
    apply_method(model, MethodConfig("lars", rank=4, storage=storage), calibration_tokens=tokens)
    for p in model.trainable().values():
        p += model.be.asarray(0.3 * np.random.default_rng(2).standard_normal(p.shape), "float32")
    tape = model.forward(tokens, targets)
    store = tape.store
    kept = (store.bytes_peak, store.disk_peak)  # after the forward
    grads = model.backward(tape)
    assert store.bytes_now == 0 and store.disk_now == 0
    return tape.loss, grads, kept, store.bytes_peak


def test_policy_parses_with_and_without_a_directory():
    assert parse_policy("offload") == Offload()
    assert parse_policy(" offload( /mnt/sd card ) ") == Offload("/mnt/sd card")
    assert str(Offload("/x")) == "offload(/x)" and parse_policy(str(Offload("/x"))) == Offload("/x")
    assert StoragePlan.from_mapping(dict(_offload())).recompute_blocks


@pytest.mark.parametrize("backend", ["numpy", "numba", "torch"])
def test_offloaded_step_gives_the_same_gradients_bit_for_bit(backend, tmp_path):
    if backend != "numpy":
        pytest.importorskip(backend)
    loss_half, half, (ram_half, disk_half), _ = _step(DEFAULT, backend)
    loss_off, off, (ram_off, disk_off), _ = _step(_offload(tmp_path), backend)
    assert float(loss_off) == float(loss_half)
    assert set(off) == set(half)
    to_numpy = get_backend(backend).to_numpy
    for name in half:
        a, b = to_numpy(half[name]), to_numpy(off[name])
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), name
    # the float16 block inputs moved from the store's RAM to the file: N d 2 bytes per block
    per_block = 2 * 13 * TINY.dim * 2
    assert disk_half == 0 and disk_off == TINY.n_layers * per_block
    assert ram_half - ram_off == disk_off
    assert os.listdir(tmp_path) == []  # the file is unlinked from the start


def test_planner_counts_offloaded_bytes_as_disk_not_ram():
    cfg = preset("smollm2-135m")
    t = 2048
    half = plan_memory(cfg, MethodConfig("lars", storage=DEFAULT), t, 1, "float32", "numpy")
    off = plan_memory(cfg, MethodConfig("lars", storage=_offload()), t, 1, "float32", "numpy")
    inputs = cfg.n_layers * t * cfg.dim * 2  # the 30 blocks' float16 inputs (N, d)
    assert half.disk == 0 and off.disk == inputs
    assert half.store_peak - off.store_peak == inputs - t * cfg.dim * 2  # the last block's is never written
    # the RSS estimate drops by the store, less the one read buffer the file reuses
    assert half.total - off.total >= inputs - 2 * t * cfg.dim * 2
    assert "offloaded to disk" in off.describe()


def test_store_peak_on_shapes_equals_the_real_store():
    _, _, (_, disk), ram = _step(_offload(), "numpy")
    plan = plan_memory(TINY, MethodConfig("lars", rank=4, storage=_offload()), 13, 2, "float32", "numpy",
                       attention_tile=4, inference=False)
    assert (plan.store_peak, plan.disk) == (ram, disk)


def test_full_disk_names_the_file_and_the_bytes(tmp_path, monkeypatch):
    file = OffloadFile(tmp_path)
    file.write(np.zeros(10, dtype=np.float16))

    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)
    with pytest.raises(WriteError) as info:
        file.write(np.zeros(100, dtype=np.float16))
    message = str(info.value)
    assert str(file.path) in message and "No space left on device" in message
    assert "220 bytes" in message  # the 20 already written and the 200 asked for
    assert info.value.errno == errno.ENOSPC


def test_full_disk_stops_the_step_with_that_message(tmp_path, monkeypatch):
    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)
    with pytest.raises(WriteError, match=r"cannot write .*minilars-offload-.*No space left on device"):
        _step(_offload(tmp_path))


def test_reads_come_back_in_any_order_and_the_file_starts_over(tmp_path):
    file = OffloadFile(tmp_path)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, n)).astype(np.float16) for n in (5, 1, 8)]
    spilled = [file.write(a) for a in arrays]
    for a, s in reversed(list(zip(arrays, spilled))):
        back = file.read(s)
        assert back.dtype == a.dtype and back.shape == a.shape
        np.testing.assert_array_equal(back, a)
        file.free(s)
    assert file.end == 0 and os.fstat(file.fd).st_size == 0


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="offload directory .*nowhere.* does not exist"):
        OffloadFile(tmp_path / "nowhere")
    assert Half() != Offload()
