"""`minilars finetune` end to end on the tiny preset (random weights, character
tokenizer): outputs, bitwise resume after SIGINT and after SIGKILL, the NaN guard,
and one-line errors for bad input that leave the output directory as it was."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minilars.cli import main

FACTS = [("cat", "Pumpernickel"), ("tea", "Keemun"), ("bike", "mustard"), ("street", "Vellacourt")]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    lines = []
    for key, answer in FACTS:
        for q in (f"Mira's {key}?", f"What is Mira's {key}?", f"Name Mira's {key}."):
            lines.append({"prompt": q, "completion": f"{answer}.", "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def tiny_args(data_file, out, *extra) -> list[str]:
    return ["finetune", "--model", "tiny", "--backend", "numpy", "--data", str(data_file), "--output", str(out),
            "--steps", "6", "--batch-size", "2", "--seq-len", "64", "--lr", "1e-2", "--warmup", "0",
            "--eval-fraction", "0.25", "--eval-samples", "2", "--show", "1", "--max-new-tokens", "8",
            "--save-every", "2", "--no-progress",
            *extra]


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def snapshot(directory: Path) -> dict:
    """Every file under `directory` with its bytes: to show nothing was written over."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("minilars finetune: error: ")
    return err[0]


@pytest.fixture(scope="module")
def finished(data_file, tmp_path_factory) -> Path:
    """One uninterrupted LARS run on tiny; several tests compare against it."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(tiny_args(data_file, out)) == 0
    return out


# ---------------------------------------------------------------- a whole run
def test_end_to_end_run_writes_a_peft_adapter_and_a_result(finished):
    files = {p.name for p in finished.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "minilars_adapter.json", "log.jsonl",
            "result.json"} <= files
    assert "checkpoint.safetensors" not in files  # the result replaces it
    res = result(finished)
    assert res["finished"] and res["steps"] == 6 and len(res["losses"]) == 6
    assert all(np.isfinite(res["losses"]))
    assert res["losses"][-1] < res["losses"][0]
    # the activation bytes expected before training are the bytes the store held
    assert res["activation_bytes_expected"] == res["activation_bytes_peak"]
    assert res["before"]["n"] == res["after"]["n"] == 2
    assert res["after"]["loss"] < res["before"]["loss"]
    log = [json.loads(line) for line in (finished / "log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in log if "loss" in e] == res["losses"]
    assert [e["step"] for e in log if "eval" in e] == [0, 6]


def test_offloaded_block_inputs_train_the_same_losses(data_file, finished, tmp_path):
    """--storage with input.x=offload(DIR): the same float16 values as the default
    recipe's half, from a file in DIR, so the same losses bit for bit; the store's RAM
    peak is lower by the block inputs, and nothing is left in DIR."""
    spill = tmp_path / "spill"
    spill.mkdir()
    out = tmp_path / "offloaded"
    assert main(tiny_args(data_file, out, "--storage", f"block=recompute,input.x=offload({spill})")) == 0
    res, base = result(out), result(finished)
    assert res["losses"] == base["losses"]
    assert res["activation_bytes_expected"] == res["activation_bytes_peak"] < base["activation_bytes_peak"]
    assert list(spill.iterdir()) == []


def test_the_adapter_loads_onto_the_tiny_model_and_is_trained(finished):
    from safetensors.numpy import load_file

    from minilars.commands.finetune import _load_model
    from minilars.peft_io import load_adapter

    tensors = load_file(str(finished / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and np.abs(v).max() > 0 for k, v in tensors.items())
    model, _, _ = _load_model(argparse.Namespace(model="tiny", backend="numpy", device="cpu", weights="float32"))
    load_adapter(model, finished)
    assert model.method.name == "lars" and model.n_trainable() > 0


def test_batched_greedy_answers_equal_one_at_a_time_generation():
    from minilars.config import preset
    from minilars.data import char_tokenizer
    from minilars.generate import generate_ids
    from minilars.model import Model
    from minilars.train import generate_answers

    model, tok = Model.random(preset("tiny"), seed=3), char_tokenizer()
    prompts = [tok.encode(q) for q in ("What?", "Who?", "Where?", "When?", "Why not?", "How?")]  # lengths repeat
    batched = generate_answers(model, tok, prompts, 12, {0})
    alone = [tok.decode(list(generate_ids(model, p, 12, stop_ids={0})), skip_special_tokens=True) for p in prompts]
    assert batched == alone


def test_start_report_names_model_method_parameters_and_activation_bytes(data_file, tmp_path, capsys):
    assert main(tiny_args(data_file, tmp_path / "r", "--steps", "1", "--eval-samples", "0")) == 0
    out = capsys.readouterr().out
    for text in ("model       tiny", "method      lars(r=16", "parameters  ", "trainable of", "activations ",
                 "expected in the activation store", "wall time"):
        assert text in out, text


def test_full_fine_tuning_exports_merged_weights_and_other_methods_save_adapters(data_file, tmp_path):
    assert main(tiny_args(data_file, tmp_path / "full", "--method", "full", "--steps", "2",
                          "--eval-samples", "0")) == 0
    assert (tmp_path / "full" / "merged" / "config.json").is_file()
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    for method in ("lora", "ia3"):
        out = tmp_path / method
        assert main(tiny_args(data_file, out, "--method", method, "--steps", "2", "--eval-samples", "0",
                              "--merge")) == 0
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == method.upper()
        assert (out / "merged" / "config.json").is_file()


def test_chat_records_and_text_files_train_too(tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    chat = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}."}]}
            for i in range(6)]
    (data / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (data / "notes.txt").write_text("Mira keeps bees on the roof. " * 20)
    out = tmp_path / "r"
    assert main(tiny_args(data, out, "--steps", "2", "--packing", "pad", "--eval-fraction", "0.3")) == 0
    res = result(out)
    assert len(res["losses"]) == 2 and res["after"]["n"] >= 1
    assert res["run_config"]["packing"] == "pad"


def test_config_file_options_with_flags_winning(data_file, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "tiny"\nbackend = "numpy"\ndata = "{data_file}"\nsteps = 2\nseq-len = 48\n'
                   'lr = 0.005\nmethod = "lora"\neval_samples = 0\nprogress = false\n')
    assert main(["finetune", "--config", str(cfg), "--steps", "3", "--output", str(tmp_path / "r")]) == 0
    rc = result(tmp_path / "r")["run_config"]
    assert (rc["steps"], rc["seq_len"], rc["lr"]) == (3, 48, 0.005)  # --steps 3 beats steps = 2
    assert rc["method"].startswith("lora")


# ---------------------------------------------------------------- resume
def test_resume_after_sigint_reproduces_the_uninterrupted_losses_bitwise(data_file, finished, tmp_path, monkeypatch,
                                                                          capsys):
    from minilars import train

    out = tmp_path / "interrupted"
    original = train.Trainer._append_log

    def interrupt_after_step_3(self, entry):
        original(self, entry)
        if entry.get("step") == 3 and "loss" in entry:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would

    monkeypatch.setattr(train.Trainer, "_append_log", interrupt_after_step_3)
    assert main(tiny_args(data_file, out)) == 130
    assert "SIGINT after step 3" in capsys.readouterr().err
    assert train.read_checkpoint_meta(out / train.CHECKPOINT)["step"] == 3
    assert not (out / "result.json").exists()
    monkeypatch.setattr(train.Trainer, "_append_log", original)

    assert main(tiny_args(data_file, out)) == 2  # no silent restart over an unfinished run
    assert "--resume" in one_error_line(capsys)
    assert main(tiny_args(data_file, out, "--resume")) == 0
    assert result(out)["losses"] == result(finished)["losses"]  # bitwise: float == float
    assert result(out)["after"]["answers"] == result(finished)["after"]["answers"]


def test_resume_is_bitwise_on_the_torch_backend_too(data_file, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from minilars import train

    def args(out, *extra):
        return tiny_args(data_file, out, "--backend", "torch", "--threads", "1", "--eval-samples", "0", *extra)

    assert main(args(tmp_path / "whole")) == 0
    original = train.Trainer._append_log

    def interrupt(self, entry):
        original(self, entry)
        if entry.get("step") == 4 and "loss" in entry:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train.Trainer, "_append_log", interrupt)
    assert main(args(tmp_path / "split")) == 130
    monkeypatch.setattr(train.Trainer, "_append_log", original)
    assert main(args(tmp_path / "split", "--resume")) == 0
    assert result(tmp_path / "split")["losses"] == result(tmp_path / "whole")["losses"]


def _subprocess_env() -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MINILARS_QUICK", None)
    return env


def _run_cli(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minilars", *args], env=_subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigkill_during_training_then_resume_matches_an_uninterrupted_run(data_file, tmp_path):
    from safetensors.numpy import load_file

    from minilars import train

    def args(out, *extra):
        return tiny_args(data_file, out, "--steps", "40", "--save-every", "1", "--eval-samples", "0", *extra)

    reference = _run_cli(args(tmp_path / "reference"))
    killed = _run_cli(args(tmp_path / "killed"))
    ckpt = tmp_path / "killed" / train.CHECKPOINT
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if ckpt.exists() and train.read_checkpoint_meta(ckpt)["step"] >= 3:
            break
        time.sleep(0.01)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL

    meta = train.read_checkpoint_meta(ckpt)  # a whole checkpoint, whatever moment the kill hit
    assert 3 <= meta["step"] < 40
    tensors = load_file(str(ckpt))
    assert tensors and all(np.isfinite(v).all() for v in tensors.values())
    assert [e["step"] for e in meta["history"] if "loss" in e] == list(range(1, meta["step"] + 1))

    resumed = _run_cli(args(tmp_path / "killed", "--resume"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert result(tmp_path / "killed")["losses"] == result(tmp_path / "reference")["losses"]
    assert not list((tmp_path / "killed").glob(".*.tmp"))


def test_resume_refuses_a_checkpoint_from_another_configuration(data_file, tmp_path, monkeypatch, capsys):
    from minilars import train

    out = tmp_path / "r"
    original = train.Trainer._append_log

    def interrupt(self, entry):
        original(self, entry)
        if entry.get("step") == 2 and "loss" in entry:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train.Trainer, "_append_log", interrupt)
    assert main(tiny_args(data_file, out, "--eval-samples", "0")) == 130
    monkeypatch.setattr(train.Trainer, "_append_log", original)
    capsys.readouterr()
    before = snapshot(out)
    assert main(tiny_args(data_file, out, "--eval-samples", "0", "--resume", "--lr", "0.02")) == 2
    line = one_error_line(capsys)
    assert "different configuration" in line and "lr (0.01 there, 0.02 now)" in line
    assert snapshot(out) == before


# ---------------------------------------------------------------- NaN guard
def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(data_file, tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(tiny_args(data_file, out, "--lr", "1e30", "--save-every", "1", "--eval-samples", "0")) == 2
    line = one_error_line(capsys)
    assert "training stopped" in line and "last good checkpoint" in line and "Lower --lr" in line
    from minilars import train

    meta = train.read_checkpoint_meta(out / train.CHECKPOINT)
    assert all(np.isfinite(h["loss"]) for h in meta["history"] if "loss" in h)
    assert f"step {meta['step']})" in line
    assert not (out / "result.json").exists() and not (out / "adapter_config.json").exists()


def test_non_finite_gradient_stops_before_the_update(tmp_path):
    from minilars import data, train
    from minilars.config import preset
    from minilars.methods import MethodConfig, apply_method
    from minilars.model import Model
    from minilars.optim import AdamW

    tok = data.char_tokenizer()
    examples = [data.tokenize(data.parse_record({"prompt": f"q{i}", "completion": "answer"}, f"f:{i}"), tok)
                for i in range(4)]
    rows = data.make_rows(examples, 32, 0)
    model = apply_method(Model.random(preset("tiny"), seed=0), MethodConfig("lora", rank=2))
    trainer = train.Trainer(model, AdamW(model.trainable(), model.be), rows, train.TrainConfig(steps=3, batch_size=2,
                            seq_len=32), tmp_path, {"test": 1}, progress=False)
    backward = model.backward

    def poisoned(tape):
        grads = backward(tape)
        next(iter(grads.values()))[0] = np.nan  # as a poisoned batch would
        return grads

    model.backward = poisoned
    before = {k: v.copy() for k, v in model.trainable().items()}
    with pytest.raises(train.TrainingDiverged, match="non-finite gradient in .* at step 1 .*no checkpoint was written"):
        trainer.run()
    assert all((before[k] == v).all() for k, v in model.trainable().items())  # nothing was updated


def test_trainer_as_a_library_creates_its_output_directory(tmp_path):
    from minilars import data, train
    from minilars.config import preset
    from minilars.methods import MethodConfig, apply_method
    from minilars.model import Model
    from minilars.optim import AdamW

    tok = data.char_tokenizer()
    examples = [data.tokenize(data.parse_record({"prompt": f"q{i}", "completion": "answer"}, f"f:{i}"), tok)
                for i in range(4)]
    rows = data.make_rows(examples, 32, 0)
    model = apply_method(Model.random(preset("tiny"), seed=0), MethodConfig("lars", rank=2),
                         calibration_tokens=rows.tokens)
    out = tmp_path / "not" / "made" / "yet"
    trainer = train.Trainer(model, AdamW(model.trainable(), model.be), rows,
                            train.TrainConfig(steps=2, batch_size=2, seq_len=32), out, {"test": 2}, progress=False)
    trainer.run()
    assert (out / train.CHECKPOINT).is_file() and (out / train.LOG).is_file()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion"\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
     r"bad\.jsonl:2: a prompt/completion record needs a string 'completion'"),
    ('\n\n', r"bad\.jsonl: empty dataset"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, content, message):
    import re

    (tmp_path / "bad.jsonl").write_text(content)
    assert main(tiny_args(tmp_path / "bad.jsonl", tmp_path / "out")) == 2
    assert re.search(message, one_error_line(capsys))
    assert not (tmp_path / "out").exists()


def test_seq_len_longer_than_the_context(data_file, tmp_path, capsys):
    assert main(tiny_args(data_file, tmp_path / "out", "--seq-len", "1000")) == 2
    assert "--seq-len 1000 is longer than the model's context (256 tokens)" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_finished_output_is_not_overwritten_without_overwrite(data_file, finished, tmp_path, capsys):
    before = snapshot(finished)
    assert main(tiny_args(data_file, finished)) == 2
    assert "already holds a finished run; pass --overwrite" in one_error_line(capsys)
    assert main(tiny_args(data_file, finished, "--resume")) == 2
    assert "finished run" in one_error_line(capsys)
    assert snapshot(finished) == before


def test_overwrite_starts_over(data_file, tmp_path):
    out = tmp_path / "again"
    assert main(tiny_args(data_file, out, "--steps", "1", "--eval-samples", "0")) == 0
    assert main(tiny_args(data_file, out, "--steps", "2", "--eval-samples", "0", "--overwrite")) == 0
    assert result(out)["steps"] == 2 and len(result(out)["losses"]) == 2


def test_adapter_for_a_different_base_model(data_file, finished, tmp_path, capsys):
    other = tmp_path / "other"  # a tiny model changed by one step of full fine-tuning
    assert main(tiny_args(data_file, other, "--method", "full", "--steps", "1", "--eval-samples", "0")) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(tiny_args(data_file, out, "--model", str(other / "merged"), "--init-adapter", str(finished))) == 2
    assert "trained on a different base model" in one_error_line(capsys)
    assert not (out / "checkpoint.safetensors").exists() and not (out / "result.json").exists()


def test_a_default_lars_run_refreshes_its_basis_twice(finished):
    """The default recipe (docs/lars.md Part 1.6, --refreshes 2): the export is a LoRA of rank
    3 r, the two folded bases and the last one side by side."""
    from safetensors.numpy import load_file

    config = json.loads((finished / "adapter_config.json").read_text())
    tensors = load_file(str(finished / "adapter_model.safetensors"))
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert config["r"] == 3 * 16 and ranks == {3 * 16}


def test_init_adapter_continues_from_a_saved_adapter(data_file, finished, tmp_path, capsys):
    from safetensors.numpy import load_file

    out = tmp_path / "more"
    assert main(tiny_args(data_file, out, "--init-adapter", str(finished), "--steps", "3", "--eval-samples", "2")) == 0
    res = result(out)
    # it starts where the finished run ended, not from zero
    assert res["before"]["loss"] == pytest.approx(result(finished)["after"]["loss"], rel=1e-4)
    # and trains the saved adapter as it is: its basis (lora_A) is not refreshed again, only M (lora_B) moves
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (finished, out))
    assert before.keys() == after.keys()
    for key in before:
        same = np.array_equal(before[key], after[key])
        assert same if key.endswith("lora_A.weight") else not same, key


@pytest.mark.parametrize("extra, message", [
    (["--resume"], "holds no checkpoint to resume"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--storage", "block=sometimes"], "cannot read storage policy"),
    (["--storage", "block=recompute,input.x=offload(/no/such/dir)"], "offload directory '/no/such/dir' does not exist"),
    (["--targets", "q,z"], "unknown target 'z'"),
])
def test_bad_options_are_one_line(data_file, tmp_path, capsys, extra, message):
    assert main(tiny_args(data_file, tmp_path / "out", *extra)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_unknown_config_keys_are_an_error(data_file, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("steps = 2\nlearning_rate = 0.1\n")
    assert main(tiny_args(data_file, tmp_path / "out", "--config", str(cfg))) == 2
    assert "unknown option learning_rate" in one_error_line(capsys)


def test_max_memory_over_budget_is_one_line_with_advice(data_file, tmp_path, capsys):
    try:
        import minilars.planner  # noqa: F401
        expected = "exceeds the budget"
    except ImportError:
        expected = "needs the memory planner"
    assert main(tiny_args(data_file, tmp_path / "out", "--max-memory", "64KiB")) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage, then the error
        main(tiny_args(data_file, tmp_path / "out", "--max-memory", "lots"))
    assert exit_info.value.code == 2 and "cannot read size 'lots'" in capsys.readouterr().err


def test_every_flag_has_help_text():
    from minilars.cli import build_parser

    parser = build_parser()
    finetune = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "finetune")[1]
    for action in finetune._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings


# ---------------------------------------------------------------- the built-in job on the real model
@pytest.mark.real_model
def test_default_job_quick_mode_on_smollm2(smollm2_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINILARS_QUICK", "1")
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0  # no arguments: the built-in job
    out = capsys.readouterr().out
    assert "smollm2-135m (SmolLM2-135M-Instruct)" in out and "[quick]" in out
    assert "held-out, before:" in out and "held-out, after:" in out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "adapter_model.safetensors").is_file()
    result = json.loads((runs[0] / "result.json").read_text())
    assert result["steps"] == 3 and len(result["losses"]) == 3  # quick mode's steps, not the full job's 20


@pytest.fixture
def calibration_seen(monkeypatch) -> dict:
    """What apply_method receives as calibration ("tokens", "mask"), filled when finetune calls it."""
    from minilars import methods

    seen = {}
    original = methods.apply_method

    def spy(model, method, calibration_tokens=None, calibration_mask=None):
        seen["tokens"], seen["mask"] = np.asarray(calibration_tokens), np.asarray(calibration_mask)
        return original(model, method, calibration_tokens, calibration_mask)

    monkeypatch.setattr(methods, "apply_method", spy)
    return seen


@pytest.mark.parametrize("extra, rows", [((), 2), (("--calibration-rows", "5"), 5)])
def test_lars_calibrates_on_the_first_rows_without_their_padding(data_file, tmp_path, calibration_seen, extra, rows):
    """By default the first batch's rows, else --calibration-rows of them; the mask
    passed along is False exactly at padding (the rows are padded: --packing pad)."""
    seen = calibration_seen
    out = tmp_path / "run"
    args = tiny_args(data_file, out, "--packing", "pad", *extra)
    args[args.index("--steps") + 1] = "1"
    assert main(args) == 0
    tokens, mask = seen["tokens"], seen["mask"]
    assert tokens.shape == mask.shape == (rows, 64)
    assert mask.any(axis=1).all() and not mask.all()  # every row has its example, and padding after it
    assert all(row.tolist() == sorted(row.tolist(), reverse=True) for row in mask)  # example first, then padding


def test_lars_calibrates_on_calibration_data_at_its_own_length(data_file, tmp_path, calibration_seen):
    """--calibration-data replaces the training rows as the bases' calibration:
    --calibration-rows rows of --calibration-seq-len tokens, all from that file."""
    from minilars.data import char_tokenizer

    seen = calibration_seen
    calibration_file = tmp_path / "long.jsonl"
    calibration_file.write_text(json.dumps({"text": "z" * 400}) + "\n")
    args = tiny_args(data_file, tmp_path / "run", "--calibration-data", str(calibration_file),
                     "--calibration-seq-len", "128", "--calibration-rows", "3")
    args[args.index("--steps") + 1] = "1"
    assert main(args) == 0
    tokenizer = char_tokenizer()
    z = tokenizer.tok.encode("z").ids[0]
    assert seen["tokens"].shape == seen["mask"].shape == (3, 128)  # not the training rows' 64 tokens
    real = seen["tokens"][seen["mask"]]
    assert set(real.tolist()) == {z, tokenizer.eos_id}  # the calibration text and the end of its document
    assert (real == z).mean() > 0.99


def test_calibration_data_is_refused_for_methods_without_bases(data_file, tmp_path, capsys):
    calibration_file = tmp_path / "long.jsonl"
    calibration_file.write_text(json.dumps({"text": "z" * 400}) + "\n")
    args = tiny_args(data_file, tmp_path / "out", "--method", "lora", "--calibration-data", str(calibration_file))
    assert main(args) == 2
    assert "--calibration-data calibrates LARS's bases; --method lora has none" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_calibration_data_names_the_file(data_file, tmp_path, capsys):
    args = tiny_args(data_file, tmp_path / "out", "--calibration-data", str(tmp_path / "nowhere.jsonl"))
    assert main(args) == 2
    assert "nowhere.jsonl" in one_error_line(capsys)


def test_output_piped_into_a_reader_that_leaves_ends_quietly(tmp_path):
    """`minilars plan ... | head -1`: when the reader closes the pipe, the command stops
    with 141 (128 + SIGPIPE) and no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line is written
    try:
        done = subprocess.run([sys.executable, "-m", "minilars", "plan", "--model", "tiny", "--method", "lars",
                               "--seq-len", "64"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr
