"""Reliability of `minilars finetune` (issue 22): one run per output directory, no
corrupt checkpoint resumed, a failed write is one line and loses nothing, every bad
setting stops before any work, data errors name file, line and the parser's column,
and a huge record costs what --seq-len needs. Each numbered finding of the issue has
a test here that fails on the code before the fix."""
from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from minilars.cli import main

FACTS = [("cat", "Pumpernickel"), ("tea", "Keemun"), ("bike", "mustard"), ("street", "Vellacourt")]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    rows = [{"prompt": f"What is Mira's {key}?", "completion": f"{answer}."} for key, answer in FACTS for _ in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_args(data_file, out, *extra) -> list[str]:
    return ["finetune", "--model", "tiny", "--backend", "numpy", "--data", str(data_file), "--output", str(out),
            "--steps", "4", "--batch-size", "1", "--seq-len", "64", "--warmup", "0", "--eval-samples", "0",
            "--save-every", "2", "--no-progress", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("minilars finetune: error: "), err
    return err[0]


def snapshot(directory: Path) -> dict:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def cli(args) -> subprocess.Popen:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("MINILARS_QUICK", None)
    return subprocess.Popen([sys.executable, "-m", "minilars", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_after_training(monkeypatch):
    """The run trains and checkpoints its last step, then dies before writing the
    result (as a kill during the final evaluation would): the checkpoint stays."""
    from minilars.commands import finetune

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_save_result", die)


# ---------------------------------------------------------------- finding 1: one run per output directory
def _start_long_run(data_file, out) -> subprocess.Popen:
    from minilars import train

    run = cli(tiny_args(data_file, out, "--steps", "100000", "--save-every", "1"))
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None and not (out / train.CHECKPOINT).exists():
        time.sleep(0.02)
    assert run.poll() is None, run.stderr.read()
    return run


def test_a_second_run_on_the_same_output_stops_at_once_naming_the_holders_pid(data_file, tmp_path, capsys):
    out = tmp_path / "shared"
    first = _start_long_run(data_file, out)
    try:
        started = time.perf_counter()
        assert main(tiny_args(data_file, out, "--overwrite")) == 2
        line = error_line(capsys)
        assert f"pid {first.pid}" in line and str(out) in line
        assert time.perf_counter() - started < 30  # at once: nothing was loaded or trained
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_a_lock_left_by_a_killed_run_does_not_block_its_resume(data_file, tmp_path, capsys, monkeypatch):
    from minilars import train

    out = tmp_path / "killed"
    first = _start_long_run(data_file, out)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / ".minilars.lock").exists()  # the file stays; the kernel dropped the lock with the process
    step = train.read_checkpoint_meta(out / train.CHECKPOINT)["step"]
    resumed_at = []

    def stop_at_once(self):
        resumed_at.append(self.step)
        raise KeyboardInterrupt  # the 100000 steps are not the point

    monkeypatch.setattr(train.Trainer, "run", stop_at_once)
    assert main(tiny_args(data_file, out, "--resume", "--steps", "100000", "--save-every", "1")) == 130
    assert resumed_at == [step], capsys.readouterr().err


def test_directory_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    from minilars.files import DirectoryBusy, DirectoryLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minilars.files import DirectoryLock; "
                               f"DirectoryLock({str(tmp_path / 'd')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=f"pid {holder.pid}"):
            DirectoryLock(tmp_path / "d").acquire()
    finally:
        holder.kill()
        holder.wait()
    with DirectoryLock(tmp_path / "d"):  # SIGKILL released it
        pass
    with DirectoryLock(tmp_path / "new"):
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()  # created for nothing: removed again



def test_a_waiting_directory_lock_gets_it_when_the_holder_lets_go(tmp_path):
    """wait=True (numba's kernel compile): the second holder blocks instead of refusing,
    and holds the lock once the first releases it; the first, though it created the
    directory, leaves it and the lock file that the second waits on."""
    import threading
    import time

    from minilars.files import DirectoryBusy, DirectoryLock

    first = DirectoryLock(tmp_path / "d", wait=True).acquire()
    second = DirectoryLock(tmp_path / "d", wait=True)
    waiter = threading.Thread(target=second.acquire)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # still waiting while the first holds it
    first.release()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    with pytest.raises(DirectoryBusy):
        DirectoryLock(tmp_path / "d").acquire()  # the second holds it now
    second.release()

# ---------------------------------------------------------------- finding 2: corrupt checkpoints
@pytest.fixture
def interrupted_run(data_file, tmp_path, monkeypatch):
    """An output directory holding a checkpoint (step 4) and no result."""
    from minilars import train

    out = tmp_path / "run"
    stop_after_training(monkeypatch)
    assert main(tiny_args(data_file, out)) == 130
    monkeypatch.undo()
    assert train.read_checkpoint_meta(out / train.CHECKPOINT)["step"] == 4
    return out


def _overwrite_tensor_bytes(path: Path, prefix: str, values: np.ndarray) -> str:
    """Write `values` (float32) over the start of the first tensor named prefix*: a
    file changed on disk after it was written, its header untouched."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = sorted(k for k in header if k.startswith(prefix))[0]
    begin = 8 + n + header[name]["data_offsets"][0]
    data = values.astype(np.float32).tobytes()
    raw[begin:begin + len(data)] = data
    path.write_bytes(bytes(raw))
    return name


@pytest.mark.parametrize("values, message", [
    (np.full(4, 0.5), "do not match the sha256"),  # finite garbage: resumed with rc 0 before
    (np.full(4, np.nan), "holds NaN or inf"),  # blamed the learning rate before
    (np.array([np.inf, 1, 2, 3]), "holds NaN or inf"),
])
def test_resume_refuses_a_corrupt_checkpoint_naming_it(data_file, interrupted_run, capsys, values, message):
    from minilars import train

    ckpt = interrupted_run / train.CHECKPOINT
    _overwrite_tensor_bytes(ckpt, "param/", values)
    before = snapshot(interrupted_run)
    assert main(tiny_args(data_file, interrupted_run, "--resume")) == 2
    line = error_line(capsys)
    assert f"{ckpt} is corrupt" in line and message in line
    assert "--lr" not in line
    assert snapshot(interrupted_run) == before  # the file is left for the user to inspect


def test_resume_refuses_a_checkpoint_whose_metadata_changed(data_file, interrupted_run, capsys):
    from minilars import train

    ckpt = interrupted_run / train.CHECKPOINT
    raw = ckpt.read_bytes()
    assert raw.startswith(b'\\"step\\": 4,', raw.index(b"{", 8) + len(b'{"__metadata__":{"minilars":"{'))
    ckpt.write_bytes(raw.replace(b'\\"step\\": 4,', b'\\"step\\": 1,', 1))  # same length: still a valid file
    assert main(tiny_args(data_file, interrupted_run, "--resume")) == 2
    assert "metadata does not match the sha256" in error_line(capsys)


def test_an_intact_checkpoint_still_resumes(data_file, interrupted_run, capsys):
    assert main(tiny_args(data_file, interrupted_run, "--resume")) == 0, capsys.readouterr().err


# ---------------------------------------------------------------- finding 3: a full disk
def _enospc_on_call(monkeypatch, module, name: str, failing_call: int):
    """Replace module.name so that its failing_call-th call writes half a file and then
    fails as a full disk does."""
    original = getattr(module, name)
    calls = {"n": 0}

    def writer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            path = Path(args[1] if len(args) > 1 else kwargs["filename"])
            path.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, writer)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(data_file, tmp_path, monkeypatch,
                                                                                capsys):
    import safetensors.numpy

    from minilars import train

    out = tmp_path / "full"
    _enospc_on_call(monkeypatch, safetensors.numpy, "save_file", failing_call=2)  # the step-4 checkpoint
    assert main(tiny_args(data_file, out)) == 2
    line = error_line(capsys)
    assert f"cannot write {out / train.CHECKPOINT}: No space left on device" in line
    assert "bytes" in line and "the previous file is kept" in line
    assert train.read_checkpoint_meta(out / train.CHECKPOINT)["step"] == 2  # the one before, whole
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("failing", ["adapter", "result"])
def test_a_full_disk_while_saving_the_result_is_one_line_and_the_checkpoint_stays(data_file, tmp_path, monkeypatch,
                                                                                  capsys, failing):
    import safetensors.numpy

    from minilars import files, train

    out = tmp_path / failing
    if failing == "adapter":
        _enospc_on_call(monkeypatch, safetensors.numpy, "save_file", failing_call=3)  # after two checkpoints
        name = "adapter_model.safetensors"
    else:
        original = files.write_bytes

        def write_bytes(path, data):
            if Path(path).name == train.RESULT:
                raise files.write_error(Path(path), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), len(data))
            return original(path, data)

        monkeypatch.setattr(files, "write_bytes", write_bytes)
        name = train.RESULT
    assert main(tiny_args(data_file, out)) == 2
    assert f"cannot write {out / name}: No space left on device" in error_line(capsys)
    assert train.read_checkpoint_meta(out / train.CHECKPOINT)["step"] == 4  # --resume can finish the run
    assert not list(out.glob(".*.tmp"))


def test_atomic_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    from minilars.files import WriteError, atomic_write, write_text

    target = tmp_path / "f.json"
    write_text(target, "old")

    def fails_half_way(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    with pytest.raises(WriteError) as caught:
        atomic_write(target, fails_half_way, size=12345)
    assert str(target) in str(caught.value) and "12,345 bytes" in str(caught.value)
    assert caught.value.errno == errno.EDQUOT
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_eval_rows_on_a_full_disk_keep_the_previous_file(tmp_path):
    from minilars.files import LineWriter, WriteError

    target = tmp_path / "rows.jsonl"
    target.write_text("previous\n")
    with LineWriter(target) as out:
        out.write('{"a": 1}')
    assert target.read_text() == '{"a": 1}\n'
    target.write_text("previous\n")
    with pytest.raises(WriteError, match="rows.jsonl"):
        with LineWriter(target) as out:
            out._file.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            out.write('{"a": 1}')
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped where it cannot be made."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk(data_file, tiny_tmpfs, capsys):
    """Full fine-tuning of tiny checkpoints 265 kB; with 400 kB free the first
    checkpoint fits and the second (its temporary file beside the first) does not."""
    from minilars import train

    (tiny_tmpfs / "filler").write_bytes(bytes(560_000))
    out = tiny_tmpfs / "run"
    assert main(tiny_args(data_file, out, "--method", "full")) == 2
    line = error_line(capsys)
    assert f"cannot write {out / train.CHECKPOINT}: No space left on device (needs about" in line
    assert train.read_checkpoint_meta(out / train.CHECKPOINT)["step"] == 2
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------- finding 4: settings checked before work
@pytest.mark.parametrize("extra, needles", [
    (["--storage", "nonsense=half"], ["'nonsense'", "input.x", "block"]),
    (["--storage", "block=recompute,atn.o=half"], ["'atn.o'", "attn.o"]),
    (["--method", "lora", "--rank", "100000"], ["--rank 100000", "(16)"]),
    (["--rank", "100000"], ["--rank 100000", "attn_in stream (32)"]),
    (["--targets", "q,nope"], ["'nope'"]),
    (["--method", "lora", "--storage", "exact"], ["--method lora has none"]),
    (["--method", "lora", "--basis", "whitened"], ["--basis whitened is an option of lars", "--method lora does not"]),
    (["--method", "ia3", "--rank", "4"], ["--rank 4 is an option of lora, lars", "--method ia3 does not"]),
])
def test_bad_settings_stop_before_any_work(data_file, tmp_path, capsys, monkeypatch, extra, needles):
    from minilars import data

    def never(*args, **kwargs):
        raise AssertionError("the data was read before the settings were checked")

    monkeypatch.setattr(data, "load_dataset", never)
    out = tmp_path / "out"
    assert main(tiny_args(data_file, out, *extra)) == 2
    line = error_line(capsys)
    for needle in needles:
        assert needle in line
    assert not out.exists()  # nothing created


def test_the_largest_rank_is_accepted(data_file, tmp_path):
    assert main(tiny_args(data_file, tmp_path / "lars", "--rank", "32", "--steps", "1")) == 0
    assert main(tiny_args(data_file, tmp_path / "lora", "--method", "lora", "--rank", "16", "--steps", "1")) == 0


def test_finetune_asks_the_planner_without_max_memory(data_file, tmp_path, capsys, monkeypatch):
    from minilars.commands import finetune
    from minilars.config import preset
    from minilars.methods import MethodConfig
    from minilars.planner import plan_memory

    planned = plan_memory(preset("tiny"), MethodConfig.lars_default(), 256, 8, "float32", "numpy").total
    monkeypatch.setattr(finetune, "available_memory", lambda: planned // 2)
    out = tmp_path / "out"
    assert main(tiny_args(data_file, out, "--seq-len", "256", "--batch-size", "8")) == 2
    line = error_line(capsys)
    assert "exceeds the budget" in line and "memory available on this machine" in line
    assert "What would fit:" in line and "--seq-len" in line
    monkeypatch.setattr(finetune, "available_memory", lambda: planned * 2)
    assert main(tiny_args(data_file, out, "--seq-len", "256", "--batch-size", "8", "--steps", "1")) == 0


def test_available_memory_is_a_plausible_number():
    from minilars.commands.finetune import available_memory

    available = available_memory()
    assert available is None or 0 < available <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- finding 5: data errors and huge records
@pytest.mark.parametrize("name, content, where, needle", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', ":2:", "byte 0xe9"),
    ("bin.jsonl", b"\xdf\xff\x00\x01binary", ":1:", "byte 0xdf"),
    ("bad.txt", "line one\nline two\n".encode() + b"\x80 three\n", ":3:", "byte 0x80"),
])
def test_undecodable_data_names_file_and_line(tmp_path, capsys, data_file, name, content, where, needle):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(tiny_args(path, tmp_path / "out")) == 2
    line = error_line(capsys)
    assert f"{path}{where}" in line and needle in line and "not UTF-8" in line


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    from minilars.data import read_records

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n')
    assert read_records(path)[0].text == "hello"


class CountingTokenizer:
    """One id per character (Python ints, so tracemalloc sees every id), and the
    longest text it was asked to encode."""

    chat_template = None
    bos_id, eos_id, pad_id, add_bos = None, 0, None, False

    def __init__(self):
        self.longest = 0

    def encode(self, text, add_bos=None):
        self.longest = max(self.longest, len(text))
        return [3 + ord(c) % 90 for c in text]


def test_a_huge_record_is_tokenized_only_as_far_as_seq_len_needs(tmp_path):
    from minilars import data

    size = 4_000_000
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"prompt": "x" * size, "completion": "y"}) + "\n"
                    + json.dumps({"prompt": "short", "completion": "answer"}) + "\n")
    tok = CountingTokenizer()
    tracemalloc.start()
    try:
        dataset = data.load_dataset(path, tok, eval_fraction=0.0, max_tokens=66)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tok.longest <= data.ENCODE_CHUNK  # not the 4 MB prompt
    assert peak < 6 * size  # the line, its text and the record; ids for the whole of it took 16x
    huge = max(dataset.train, key=lambda ex: len(ex.ids))
    assert huge.ids.tolist() == tok.encode("x" * 66)  # the first ids, as the full text gives them
    rows = data.make_rows(dataset.train, 64, 0, packing="pad")
    assert rows.truncated == 1 and rows.dropped == 1  # reported as before: cut, no answer within --seq-len


@pytest.mark.parametrize("text", ["word " * 50_000, "a" * 200_001, "x y\n" * 40_000 + "tail"],
                         ids=["words", "no-space", "short-lines"])
def test_encoding_in_pieces_equals_encoding_whole_with_the_character_tokenizer(text):
    from minilars import data

    tok = data.char_tokenizer()
    whole = tok.encode(text)
    assert data.encode(tok, text) == whole
    assert data.encode(tok, text, 1000) == whole[:1000]


@pytest.mark.real_model
def test_encoding_in_pieces_equals_encoding_whole_with_smollm2(smollm2_path):
    from minilars import data
    from minilars.models import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_path)
    sentence = "The quick brown fox, 42 times, jumps over the lazy dog; naïve café.\n"
    text = sentence * 3000  # 200 k characters: four pieces
    whole = tok.encode(text)
    assert data.encode(tok, text) == whole
    assert data.encode(tok, text, 300) == whole[:300]


# ---------------------------------------------------------------- finding 6: the parser's column, the resumed peak
def test_malformed_json_reports_the_parsers_own_column(tmp_path, capsys):
    line = '{"prompt": "What is 2+2?", "completion": "4"'
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        column = exc.colno
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    assert main(tiny_args(path, tmp_path / "out")) == 2
    message = error_line(capsys)
    assert f"{path}:2:" in message and f"at column {column})" in message and column > 1


def test_a_resumed_run_reports_the_activation_peak_of_its_steps(data_file, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert main(tiny_args(data_file, whole, "--seq-len", "128")) == 0
    expected = json.loads((whole / "result.json").read_text())["activation_bytes_peak"]
    assert expected > 0

    out = tmp_path / "resumed"
    stop_after_training(monkeypatch)
    assert main(tiny_args(data_file, out, "--seq-len", "128")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(tiny_args(data_file, out, "--seq-len", "128", "--resume")) == 0  # every step already taken
    assert json.loads((out / "result.json").read_text())["activation_bytes_peak"] == expected
    assert f"activation store peak {expected / 2**20:,.1f} MiB" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needles", [
    (["bench", "speed", "--seq-lens", "512,2O48"], ["--seq-lens", "'512,2O48'", "integers like 512,2048"]),
    (["bench", "memory", "--other-seq-lens", "1k"], ["--other-seq-lens", "'1k'", "integers"]),
    (["bench", "gradients", "--ranks", "4;16"], ["--ranks", "'4;16'"]),
    (["study", "accuracy", "--quick", "--out", "OUT", "--lrs", "1e-3,fast"], ["--lrs", "'1e-3,fast'", "numbers like"]),
])
def test_a_bad_comma_separated_flag_is_one_line_naming_it(argv, needles, capsys, tmp_path):
    """Every comma-separated flag goes through commands.common.comma_separated: a bad
    item stops the command at once with the flag and the value, no traceback."""
    with pytest.raises(SystemExit) as stop:
        code = main([str(tmp_path / "out") if a == "OUT" else a for a in argv])
        raise SystemExit(code)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    for needle in needles:
        assert needle in err


def test_comma_separated_lists_parse_with_blanks_dropped():
    from minilars.commands.common import comma_separated

    assert comma_separated(int)(" 512, 2048,") == [512, 2048]
    assert comma_separated(float)("3e-4,1e-3") == [3e-4, 1e-3]
    assert comma_separated()("lars, lora") == ["lars", "lora"]
