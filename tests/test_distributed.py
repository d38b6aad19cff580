"""Data-parallel training (minilars/distributed.py) on CPU over gloo, two processes
started here: after 3 steps the 2-process parameters equal the 1-process ones on the
same global batches (float64, 1e-6) for LARS, LoRA and full fine-tuning, with ranks
holding very different numbers of labelled tokens; a rank killed mid-run stops the
other within a bounded time with a clear error and leaves a loadable checkpoint, from
which one process resumes to the parameters of a run never stopped.

This file is also the worker: `python test_distributed.py worker SPEC.json` runs one
rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minilars import distributed
from minilars.config import preset
from minilars.data import Rows, batch_indices, first_rows
from minilars.methods import MethodConfig
from minilars.model import Model
from minilars.optim import AdamW, AdamWConfig
from minilars.train import CHECKPOINT, TrainConfig, Trainer, TrainingInterrupted, read_checkpoint_meta

IGNORE = -100
ROWS, SEQ_LEN, BATCH = 8, 16, 4
# labelled targets per row: ranks' shares of a batch hold very different counts
LABELLED = (1, 16, 3, 12, 0, 9, 16, 2)
MAX_GRAD_NORM = 0.5  # small enough that steps are clipped: the clip must see the global gradient


def make_rows() -> Rows:
    rng = np.random.default_rng(7)
    vocab = preset("tiny").vocab_size
    tokens = rng.integers(0, vocab, (ROWS, SEQ_LEN))
    targets = rng.integers(0, vocab, (ROWS, SEQ_LEN))
    for row, n in enumerate(LABELLED):
        targets[row, :SEQ_LEN - n] = IGNORE  # the last n positions are labelled
    return Rows(tokens, targets, real=np.ones((ROWS, SEQ_LEN), dtype=bool))


def run_config(method: str, backend: str) -> dict:
    return {"test": "distributed", "method": method, "backend": backend}


def make_trainer(method: str, backend: str, steps: int, out: Path, group=None, save_every: int = 0) -> Trainer:
    """A tiny float64 model with `method` applied, in a Trainer on make_rows()."""
    model = Model.random(preset("tiny"), seed=0, dtype=np.float64, backend=backend)
    rows = make_rows()
    if method.startswith("lars"):  # lars-refresh: bases refreshed after step 1 of 3, by rank 0; lars: never
        extra = (("refreshes", 1 if method == "lars-refresh" else 0),)
        config = MethodConfig.lars_default(rank=4, seed=0, extra=extra)
    else:
        config = MethodConfig(method, rank=4, seed=0)
    calibration = first_rows(rows, BATCH, seed=0)
    distributed.apply_method(group, model, config, calibration.tokens, calibration.real)
    opt = AdamW(model.trainable(), model.be, AdamWConfig(lr=1e-2, max_grad_norm=MAX_GRAD_NORM))
    train_config = TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ_LEN, lr=1e-2, warmup=0, seed=0)
    return Trainer(model, opt, rows, train_config, out, run_config(method, backend), save_every=save_every,
                   progress=False, group=group)


def checkpoint_params(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("param/")}


def assert_same_params(expected_checkpoint: Path, got_checkpoint: Path, what: str = "") -> dict[str, np.ndarray]:
    """Every trainable array of two checkpoints equal to 1e-6 (float64); the expected ones."""
    expected, got = checkpoint_params(expected_checkpoint), checkpoint_params(got_checkpoint)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape and got[name].dtype == np.float64, name
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=f"{what}{name}")
    return expected


# ---------------------------------------------------------------- the worker (one rank)
# what a rank does to itself at the start of a step's forward (job["act"] = [rank, step, what])
ACTIONS = {"kill": signal.SIGKILL,  # as the OOM killer would
           "hang": signal.SIGSTOP,  # alive but silent: only the timeout can tell
           "interrupt": signal.SIGINT}  # Ctrl-C reaching one rank only


def worker(spec: dict) -> int:
    group = distributed.join()
    try:
        for job in spec["jobs"]:
            trainer = make_trainer(job["method"], job["backend"], job["steps"], Path(job["out"]), group,
                                   save_every=job.get("save_every", 0))
            if "check_run" in job:  # rank 1 read other data
                config = {**trainer.run_config, **(job["check_run"] if group.rank == 1 else {})}
                distributed.check_same_run(group, config)
            if job.get("resume"):  # rank 0 alone reads the checkpoint, as finetune does
                if group.is_main:
                    trainer.resume()
                distributed.broadcast_state(group, trainer)
            rank, at_step, what = job.get("act") or (None, None, None)
            if group.rank == rank:
                forward = trainer.model.forward

                def forward_and_act(*args, _forward=forward, _trainer=trainer, **kwargs):
                    if _trainer.step + 1 == at_step:
                        os.kill(os.getpid(), ACTIONS[what])
                    return _forward(*args, **kwargs)

                trainer.model.forward = forward_and_act
            trainer.run()
    except distributed.DistributedError as exc:
        print(f"DistributedError: {exc}", file=sys.stderr, flush=True)
        return 3
    except TrainingInterrupted as exc:
        print(f"TrainingInterrupted: {exc}", file=sys.stderr, flush=True)
        return 130
    finally:
        distributed.leave()
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, tmp_path: Path, world_size: int = 2, timeout_s: float = 20,
           command: list[str] | None = None) -> list[subprocess.Popen]:
    """world_size worker processes on this machine (or `python COMMAND...`), as torchrun
    would start them."""
    spec_file = tmp_path / f"spec-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    command = command or [__file__, "worker", str(spec_file)]
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: str(timeout_s)}
        procs.append(subprocess.Popen([sys.executable, *command], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


# ---------------------------------------------------------------- the tests
def _has_torch_distributed() -> bool:
    try:
        import torch.distributed
    except ImportError:
        return False
    return torch.distributed.is_available()


needs_torch = pytest.mark.skipif(not _has_torch_distributed(), reason="torch.distributed is not installed")


def test_ranks_hold_uneven_labelled_tokens_in_every_step():
    """The premise of the equality test: an unweighted mean of the ranks' gradients
    would differ from the whole batch's."""
    rows = make_rows()
    for step in range(3):
        idx = batch_indices(ROWS, BATCH, 0, step)
        counts = [int((rows.targets[idx[r * 2:(r + 1) * 2]] != IGNORE).sum()) for r in range(2)]
        assert counts[0] != counts[1], (step, counts)


JOBS = [("lars", "numpy"), ("lora", "numpy"), ("full", "numpy"), ("lars", "torch"), ("lars-refresh", "numpy")]


@needs_torch
def test_two_processes_take_the_steps_of_one(tmp_path):
    jobs = [{"method": m, "backend": b, "steps": 3, "out": str(tmp_path / f"two-{m}-{b}")} for m, b in JOBS]
    results = wait_all(launch({"jobs": jobs}, tmp_path), timeout=120)
    assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    for (method, backend), job in zip(JOBS, jobs):
        one = make_trainer(method, backend, 3, tmp_path / f"one-{method}-{backend}")
        one.run()
        two = Path(job["out"])
        expected = assert_same_params(one.checkpoint_path, two / CHECKPOINT, f"{method}/{backend}: ")
        start = make_trainer(method, backend, 3, tmp_path / "unused").model.trainable()
        moved = max(float(np.abs(value - np.asarray(start[name[len("param/"):]])).max())
                    for name, value in expected.items())
        assert moved > 1e-3, f"{method}: the parameters barely moved, so equality says little"
        logged = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in logged] == [1, 2, 3]  # rank 0 alone wrote the log
        assert any(e["grad_norm"] > MAX_GRAD_NORM for e in logged), "no step was clipped"
        np.testing.assert_allclose([e["loss"] for e in logged], one.losses, rtol=1e-9)


@needs_torch
def test_a_killed_rank_stops_the_other_with_a_clear_error_and_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "killed"
    job = {"method": "lars", "backend": "numpy", "steps": 6, "out": str(out), "save_every": 1,
           "act": [1, 3, "kill"]}
    started = time.monotonic()
    (rc0, err0), (rc1, _) = wait_all(launch({"jobs": [job]}, tmp_path, timeout_s=20), timeout=60)
    assert rc1 == -signal.SIGKILL
    assert rc0 == 3, err0[-2000:]
    assert time.monotonic() - started < 60
    assert "rank 0 of 2" in err0 and "--resume" in err0, err0[-2000:]
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 2  # steps 1 and 2 finished and were saved

    # one process resumes the two-process run and ends where one uninterrupted process does
    resumed = make_trainer("lars", "numpy", 6, out)
    resumed.resume()
    assert resumed.step == 2
    resumed.run()
    straight = make_trainer("lars", "numpy", 6, tmp_path / "straight")
    straight.run()
    assert_same_params(straight.checkpoint_path, resumed.checkpoint_path)


@needs_torch
def test_two_processes_resume_a_one_process_checkpoint(tmp_path):
    out = tmp_path / "resumed"
    first = make_trainer("lora", "numpy", 5, out)
    for _ in range(2):  # two of five steps, then a checkpoint, as a stopped run leaves it
        first.history.append(first.train_step())
    first.save()
    job = {"method": "lora", "backend": "numpy", "steps": 5, "out": str(out), "resume": True}
    results = wait_all(launch({"jobs": [job]}, tmp_path), timeout=60)
    assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    straight = make_trainer("lora", "numpy", 5, tmp_path / "straight")
    straight.run()
    assert_same_params(straight.checkpoint_path, out / CHECKPOINT)
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 5


@needs_torch
def test_finetune_command_on_two_processes(tmp_path):
    """`minilars finetune` as torchrun starts it: rank 0 alone prints, evaluates and
    saves; the losses are one process's (float32 tiny model)."""
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Mira's {k}?", "completion": f"{v}."}) + "\n"
                            for k, v in [("cat", "Pumpernickel"), ("tea", "Keemun"), ("bike", "mustard"),
                                         ("street", "Vellacourt"), ("car", "teal"), ("dog", "Biscuit")]))
    args = ["finetune", "--model", "tiny", "--backend", "numpy", "--data", str(data), "--steps", "3",
            "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup", "0", "--eval-fraction", "0.34",
            "--eval-samples", "2", "--show", "1", "--max-new-tokens", "4", "--save-every", "1", "--no-progress"]
    from minilars.cli import main

    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    procs = launch({}, tmp_path, command=["-m", "minilars", *args, "--output", str(tmp_path / "two")])
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "2 processes, 2 rows each" in outputs[0][0] and outputs[1][0] == ""  # rank 1 prints nothing
    one, two = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()
    assert two["after"]["n"] == 2 and two["run_config"] == one["run_config"]


@needs_torch
def test_processes_that_read_different_data_refuse_to_start(tmp_path):
    job = {"method": "lora", "backend": "numpy", "steps": 2, "out": str(tmp_path / "differ"),
           "check_run": {"data_rows": "0123abcd", "threads": 7}}  # threads may differ, data may not
    results = wait_all(launch({"jobs": [job]}, tmp_path), timeout=60)
    assert [rc for rc, _ in results] == [3, 3], [err[-2000:] for _, err in results]
    for _, err in results:
        assert "not running the same job (data_rows: None on rank 0, '0123abcd' on rank 1)" in err, err[-2000:]
    assert not (tmp_path / "differ" / CHECKPOINT).exists()


@needs_torch
def test_a_silent_rank_stops_the_other_at_the_timeout(tmp_path):
    out = tmp_path / "hung"
    job = {"method": "lora", "backend": "numpy", "steps": 4, "out": str(out), "save_every": 1,
           "act": [1, 2, "hang"]}
    started = time.monotonic()
    procs = launch({"jobs": [job]}, tmp_path, timeout_s=4)
    try:
        _, err0 = procs[0].communicate(timeout=60)
        waited = time.monotonic() - started
    finally:
        procs[1].kill()  # SIGKILL ends a stopped process too
        procs[1].wait()
    assert procs[0].returncode == 3, err0[-2000:]
    assert "did not answer within 4 s" in err0, err0[-2000:]
    assert waited < 45
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 1


@needs_torch
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    out = tmp_path / "interrupted"
    job = {"method": "full", "backend": "numpy", "steps": 6, "out": str(out), "act": [1, 3, "interrupt"]}
    results = wait_all(launch({"jobs": [job]}, tmp_path), timeout=60)
    assert [rc for rc, _ in results] == [130, 130], [err[-2000:] for _, err in results]
    assert "after step 3" in results[0][1] and "after step 3" in results[1][1]
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 3  # rank 0 saved the step every rank finished


def test_without_torch_asking_for_several_processes_says_what_to_install(monkeypatch, capsys):
    from minilars.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    assert main(["finetune", "--model", "tiny", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install torch" in err[0] and "torchrun" in err[0], err


def test_a_batch_that_does_not_divide_among_the_processes_is_refused():
    group = distributed.Group(rank=0, world_size=2, local_rank=0, timeout_s=1)
    with pytest.raises(distributed.DistributedError, match="--batch-size 3 does not divide among 2 processes"):
        distributed.local_batch_size(group, 3)
    assert distributed.local_batch_size(group, 4) == 2
    assert distributed.local_batch_size(None, 3) == 3


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.exit(worker(json.loads(Path(sys.argv[2]).read_text())))
