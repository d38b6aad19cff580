"""One path for each job (issue 18): one loader, one size parser, one decoding loop,
and one meaning of `--backend auto` in every command (issue 21).

The expected tokens and fingerprints below were recorded by running the code as it
was before these paths were joined (minilars at 0a09540: `generate.generate_ids`,
`train.generate_answers`, `evaluate.load_model`, `bench.common.load_model`), in a
separate checkout with its own interpreter, not the code under test.
"""
from __future__ import annotations

import argparse
import sys
import types

import numpy as np
import pytest

from minilars import backends
from minilars.cli import build_parser, main


# ---------------------------------------------------------------- --backend auto
# What auto must pick, from the measurement in docs/speed.md ("Which backend auto
# picks"): on a CPU numba, else torch, else numpy; on cuda torch.
AUTO = [  # (installed besides numpy, device, expected backend or None for "cannot run")
    ((), "cpu", "numpy"),
    (("torch",), "cpu", "torch"),
    (("numba",), "cpu", "numba"),
    (("numba", "torch"), "cpu", "numba"),
    (("numba", "torch"), "cuda", "torch"),
    (("torch",), "cuda", "torch"),
    (("numba",), "cuda", None),
]


@pytest.fixture
def installed(monkeypatch):
    """install(names): pretend only numpy and `names` import; the backends made are
    stand-ins (through get_backend's instance cache), so nothing real is built."""
    def install(names):
        monkeypatch.setattr(backends, "installed", lambda name: name == "numpy" or name in names)
        stand_ins = {}
        for name in backends.BACKENDS:
            for options in ({}, {"device": "cpu"}, {"device": "cuda"}):
                stand_ins[name + repr(sorted(options.items()))] = types.SimpleNamespace(name=name, options=options)
        monkeypatch.setattr(backends, "_INSTANCES", stand_ins)
        # finetune sets torch's thread count when it runs on torch
        monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(set_num_threads=lambda n: None))

    return install


def _generate(device):
    from minilars.commands.common import backend_from_args

    return backend_from_args(build_parser().parse_args(["generate", "--device", device, "hi"])).name


def _eval(device):
    from minilars.commands.common import backend_from_args

    return backend_from_args(build_parser().parse_args(["eval", "--device", device, "--data", "x.jsonl"])).name


def _finetune(device):
    from minilars.commands.finetune import _backend, resolve_options

    return _backend(resolve_options(build_parser().parse_args(["finetune", "--device", device]))).name


COMMANDS = {"generate": _generate, "eval": _eval, "finetune": _finetune}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("others, device, expected", AUTO)
def test_auto_picks_the_measured_fastest_backend_in_every_command(installed, command, others, device, expected):
    installed(others)
    if expected is None:
        with pytest.raises(Exception, match="torch"):
            COMMANDS[command](device)
    else:
        assert COMMANDS[command](device) == expected


def test_auto_is_the_default_of_every_command():
    parser = build_parser()
    for argv in (["generate", "hi"], ["eval", "--data", "x.jsonl"], ["plan"]):
        assert parser.parse_args(argv).backend == "auto", argv
    from minilars.commands.finetune import options_by_name

    assert options_by_name()["backend"].default == "auto"


@pytest.mark.parametrize("others, device, expected", [a for a in AUTO if a[1] == "cpu"])
def test_plan_auto_plans_for_the_backend_finetune_runs_on(installed, capsys, others, device, expected):
    installed(others)
    assert main(["plan", "--model", "tiny", "--seq-len", "64"]) == 0
    assert f"{expected} backend" in capsys.readouterr().out


# ---------------------------------------------------------------- one loader
TINY_FINGERPRINT = "3a12d146e5e55e91"  # old evaluate.load_model("tiny") and bench.common.load_model("tiny")
TINY_FLOAT16_FINGERPRINT = "1d6a6514a63693dc"  # old evaluate.load_model("tiny", weight_dtype="float16")
TINY_SEED5_FINGERPRINT = "79079945667e35bd"  # old bench.common.load_model("tiny", seed=5)


def _tiny_by_every_loader(weight_dtype="float32"):
    from minilars import evaluate
    from minilars.bench.common import load_model as bench_load
    from minilars.commands.common import load_model_from_args
    from minilars.commands.finetune import _load_model
    from minilars.pretrained import load_model, load_pretrained

    args = argparse.Namespace(model="tiny", backend="numpy", device="cpu", weights=weight_dtype, threads=0)
    return {"pretrained.load_model": load_model("tiny", "numpy", weight_dtype)[0],
            "pretrained.load_pretrained": load_pretrained("tiny", weights=weight_dtype)[0],
            "evaluate.load_model": evaluate.load_model("tiny", "numpy", weight_dtype)[0],
            "bench.common.load_model": bench_load("tiny", "numpy", weight_dtype),
            "commands.common.load_model_from_args": load_model_from_args(args)[0],
            "finetune._load_model": _load_model(args)[0]}


@pytest.mark.parametrize("weight_dtype, fingerprint", [("float32", TINY_FINGERPRINT),
                                                       ("float16", TINY_FLOAT16_FINGERPRINT)])
def test_every_loader_builds_the_model_the_old_loaders_built(weight_dtype, fingerprint):
    from minilars.peft_io import model_fingerprint

    for where, model in _tiny_by_every_loader(weight_dtype).items():
        assert model_fingerprint(model) == fingerprint, where
        assert model.source == "tiny" and model.be.name == "numpy", where
        for name, p in model.params.items():
            assert p.dtype == (np.float32 if name.endswith("norm.weight") else np.dtype(weight_dtype)), (where, name)


def test_the_tiny_seed_reaches_the_weights():
    from minilars.bench.common import load_model as bench_load
    from minilars.peft_io import model_fingerprint

    assert model_fingerprint(bench_load("tiny", "numpy", seed=5)) == TINY_SEED5_FINGERPRINT


def test_loader_rejects_an_unknown_weight_dtype():
    from minilars.pretrained import load_model

    with pytest.raises(ValueError, match="weight dtype must be one of"):
        load_model("tiny", "numpy", "int8")


def test_generate_runs_on_the_tiny_model(capsys):
    assert main(["generate", "--model", "tiny", "--backend", "numpy", "--max-new-tokens", "4", "hello"]) == 0
    assert capsys.readouterr().out.endswith("\n")


# ---------------------------------------------------------------- one size parser
@pytest.mark.parametrize("text, value", [("1GiB", 2**30), ("512M", 512 * 2**20), ("1.5GB", int(1.5 * 2**30)),
                                         ("64KiB", 64 * 1024), ("1e9", 10**9), ("4096", 4096)])
def test_every_size_flag_reads_sizes_alike(text, value):
    from minilars import planner, units
    from minilars.commands.finetune import _size

    assert units.parse_size(text) == planner.parse_size(text) == _size(text) == value


def test_a_bad_size_is_an_argparse_error_naming_it():
    from minilars.commands.finetune import _size

    with pytest.raises(argparse.ArgumentTypeError, match="cannot read size 'lots'"):
        _size("lots")


# ---------------------------------------------------------------- one decoding loop
def _tiny():
    from minilars.config import preset
    from minilars.model import Model

    return Model.random(preset("tiny"), seed=3)


def test_a_batch_row_stops_at_its_own_stop_id_and_the_others_go_on():
    from minilars.generate import generate_batch, generate_ids

    model = _tiny()
    prompts = [[40, 50, 60], [8, 9, 10]]
    first = list(generate_ids(model, prompts[0], 8))
    second = list(generate_ids(model, prompts[1], 8))
    k = next((i for i in range(1, len(first)) if first[i] not in first[:i] + second), None)
    assert k is not None, "pick prompts whose answers differ"
    stop = {first[k]}  # row 0 stops after k tokens; row 1 never meets it
    alone = [list(generate_ids(model, p, 8, stop_ids=stop)) for p in prompts]
    assert alone[0] == first[:k] and len(alone[0]) > 0 and alone[1] == second
    assert generate_batch(model, prompts, 8, stop_ids=stop) == alone


def test_decoding_ends_when_the_context_is_full():
    from minilars.generate import generate_ids

    model = _tiny()  # context 256: a 250-token prompt, then 6 fed-back tokens fill it; the 7th is the last
    assert len(list(generate_ids(model, [3] * 250, 20))) == 7


def test_sampling_in_a_batch_of_one_is_the_single_prompt_stream():
    from minilars.generate import generate_batch, generate_ids

    model = _tiny()
    alone = list(generate_ids(model, [4, 5], 10, temperature=1.0, top_p=0.9, seed=7))
    assert generate_batch(model, [[4, 5]], 10, temperature=1.0, top_p=0.9, seed=7) == [alone]
    assert alone != list(generate_ids(model, [4, 5], 10))  # sampling differs from greedy here


# Recorded with the old code (see the module docstring) on SmolLM2-135M-Instruct, numpy
# backend: greedy ids of generate_ids(model, prompt, 24, stop_ids=stop_ids_of(tok)),
# the questions through the chat template, the last prompt raw.
PROMPTS = [("chat", "What is the capital of France?"), ("chat", "Name three colours of the rainbow."),
           ("raw", "The three largest planets are")]
CHAT_PROMPT_HEAD = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                    19712, 8182, 2, 198, 1, 4093, 198]
OLD_GREEDY = [[504, 3575, 282, 4649, 314, 7042, 30],
              [504, 24594, 314, 253, 3953, 6968, 28, 564, 357, 506, 441, 915, 563, 260, 4683, 282, 260, 24594, 30,
               1385, 359, 2390, 1296, 3003],
              [14713, 28, 16440, 28, 284, 36985, 30, 198, 198, 504, 3995, 3925, 314, 441, 253, 2811, 8455, 28, 564,
               2161, 253, 17335, 3925, 30]]
# old train.generate_answers on the three prompts and the first again (the two chat
# prompts have one length, so they ran as a batch of three)
OLD_BATCHED_TEXT = ["The capital of France is Paris.",
                    "The rainbow is a beautiful sight, but it's not just about the colors of the rainbow. There are "
                    "actually three primary",
                    " Jupiter, Saturn, and Uranus.\n\nThe largest planet is not a gas giant, but rather a terrestrial "
                    "planet.",
                    "The capital of France is Paris."]
# old generate_ids(model, raw prompt, 12, temperature=0.8, top_p=0.9, seed=3)
OLD_SAMPLED = [260, 2591, 284, 7621, 28, 527, 359, 1062, 4723, 216, 33, 36]


@pytest.fixture(scope="module")
def smollm():
    from minilars.pretrained import load_model

    return load_model("smollm2-135m", "numpy")


def _prompts(tok):
    prompts = []
    for kind, text in PROMPTS:
        if kind == "chat":
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            prompts.append(tok.encode(text, add_bos=False))
        else:
            prompts.append(tok.encode(text))
    return prompts


@pytest.mark.real_model
def test_the_loop_gives_the_old_paths_tokens_on_the_real_model(smollm):
    from minilars.data import stop_ids_of
    from minilars.generate import generate_batch, generate_ids
    from minilars.train import generate_answers

    model, tok = smollm
    assert model.source == "smollm2-135m" and tok.chat_template
    stop = stop_ids_of(tok)
    prompts = _prompts(tok)
    assert prompts[0][:24] == CHAT_PROMPT_HEAD
    expected = OLD_GREEDY
    assert [list(generate_ids(model, p, 24, stop_ids=stop)) for p in prompts] == expected
    assert generate_batch(model, prompts + prompts[:1], 24, stop_ids=stop) == expected + expected[:1]
    assert generate_answers(model, tok, prompts + prompts[:1], 24, stop) == OLD_BATCHED_TEXT
    assert list(generate_ids(model, prompts[2], 12, temperature=0.8, top_p=0.9, stop_ids=stop, seed=3)) == OLD_SAMPLED


@pytest.mark.real_model
def test_generate_text_and_eval_answer_as_before_on_the_real_model(smollm):
    from minilars.evaluate import EvalItem, model_answerer
    from minilars.generate import generate_text

    model, tok = smollm
    question, other = PROMPTS[0][1], PROMPTS[1][1]
    assert generate_text(model, tok, question, 24) == OLD_BATCHED_TEXT[0]  # old generate_text, the same
    answer = model_answerer(model, tok, 24)  # old model_answerer gave these two answers
    assert answer(EvalItem("x:1", question, "Paris", "Paris", {"prompt": question, "completion": "Paris"})) \
        == OLD_BATCHED_TEXT[0]
    messages = [{"role": "user", "content": other}, {"role": "assistant", "content": "red"}]
    assert answer(EvalItem("x:2", other, "red", "red", {"messages": messages})) == OLD_BATCHED_TEXT[1]
