"""The method registry (minilars/methods/): a method registered here, in the test,
is usable by apply_method and by finetune's options with nothing else edited; the
built-in methods answer the questions the commands ask; weight decay acts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from minilars.backends import get_backend
from minilars.cli import build_parser, main
from minilars.commands import finetune
from minilars.config import preset
from minilars.methods import (Method, MethodConfig, MethodOption, apply_method, method_class, method_for_adapter,
                              method_options, register, registered, study_runs, unregister)
from minilars.model import Model
from minilars.optim import AdamW, AdamWConfig
from minilars.sites import FrozenSite, FullSite


class OutputOnly(Method):
    """A toy method: the o projection's weight trains, starting from W * init_scale."""

    name = "toy-output-only"
    summary = "the o projection's weight (a test's toy)"
    options = (MethodOption("toy_init_scale", float, 1.0, "the o weight starts at W times this"),)
    default_targets = ("o",)
    saves_merged = True

    def adapter(self, weight, where):
        return FullSite(weight * self.config.option("toy_init_scale"), where.outputs)


@pytest.fixture
def toy():
    register(OutputOnly)
    yield OutputOnly
    unregister(OutputOnly.name)


def test_a_registered_toy_method_is_applied(toy):
    model = Model.random(preset("tiny"), seed=0)
    before = {i: np.array(block["attn_out"].weight) for i, block in enumerate(model.sites)}
    apply_method(model, MethodConfig(toy.name, extra=(("toy_init_scale", 2.0),)))
    for i, block in enumerate(model.sites):
        assert isinstance(block["attn_out"], FullSite)
        np.testing.assert_array_equal(block["attn_out"].weight, 2.0 * before[i])
        assert all(isinstance(block[s], FrozenSite) for s in ("attn_in", "mlp_in", "mlp_out"))
    assert sorted(model.trainable()) == [f"blocks.{i}.attn_out.weight" for i in range(model.cfg.n_layers)]
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, 8))
    grads = model.backward(model.forward(tokens[:, :-1], tokens[:, 1:]))
    assert sorted(grads) == sorted(model.trainable())
    assert model.method.describe() == toy.name


def test_a_registered_toy_method_is_a_finetune_option(toy, tmp_path):
    """--method accepts it, its own option becomes a flag and a TOML key, and the
    MethodConfig finetune builds carries the value."""
    assert toy.name in registered(trains=True)
    args = build_parser().parse_args(["finetune", "--method", toy.name, "--toy-init-scale", "3"])
    config = finetune._method(finetune.resolve_options(args))
    assert config.name == toy.name and config.option("toy_init_scale") == 3.0
    toml = tmp_path / "run.toml"
    toml.write_text(f'method = "{toy.name}"\ntoy-init-scale = 0.5\n')
    args = build_parser().parse_args(["finetune", "--config", str(toml)])
    assert finetune._method(finetune.resolve_options(args)).option("toy_init_scale") == 0.5


def test_a_registered_toy_method_runs_a_finetune_job(toy, tmp_path):
    """End to end: it trains and, as it says (saves_merged), is saved as merged weights."""
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    assert main(["finetune", "--model", "tiny", "--backend", "numpy", "--data", str(data), "--output", str(out),
                 "--method", toy.name, "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-samples", "0",
                 "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["saved"] == {"merged": str(out / "merged")} and len(result["losses"]) == 2


def test_an_unregistered_name_is_refused(toy):
    unregister(toy.name)
    with pytest.raises(ValueError, match=f"unknown method '{toy.name}'; choose one of full, lora, ia3, lars"):
        MethodConfig(toy.name)
    register(toy)  # the fixture unregisters it


def test_registering_a_second_method_under_a_taken_name_is_refused():
    class Impostor(Method):
        name = "lora"

    with pytest.raises(ValueError, match="registered already"):
        register(Impostor)
    assert method_class("lora").__name__ == "LoRA"


def test_the_built_in_methods_answer_what_the_commands_ask():
    """Written from what each method is (docs/lars.md, PEFT), not read off the classes."""
    assert registered() == ("full", "lora", "ia3", "lars", "frozen")
    assert registered(trains=True) == ("full", "lora", "ia3", "lars")
    assert [n for n in registered() if method_class(n).has_rank] == ["lora", "lars"]
    assert [n for n in registered() if method_class(n).saves_adapter] == ["lora", "ia3", "lars"]
    assert [n for n in registered() if method_class(n).saves_merged] == ["full"]
    assert [n for n in registered() if method_class(n).needs_calibration] == ["lars"]
    assert MethodConfig("ia3").resolved_targets == ("k", "v", "down")
    assert MethodConfig("lora").resolved_targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert [o.name for o in method_options()] == ["rank", "alpha", "targets", "storage", "basis", "stream_scale",
                                                     "refreshes"]
    assert list(study_runs()) == ["full", "lora", "ia3", "lars", "lars-exact", "lars-whitened", "lars-unrefreshed"]
    assert study_runs()["lars-exact"].flags == ("--method", "lars", "--rank", "16", "--storage", "exact")
    assert method_for_adapter("LORA", None).name == "lora"  # a LoRA minilars did not write
    assert method_for_adapter("LORA", "lars").name == "lars"
    assert method_for_adapter("IA3", None).name == "ia3"
    with pytest.raises(ValueError, match="'PREFIX_TUNING' is not supported"):
        method_for_adapter("PREFIX_TUNING", None)


@pytest.mark.parametrize("text, rank, storage", [(None, 8, ()), ("4", 4, ())])
def test_plan_takes_each_methods_typical_rank(text, rank, storage):
    from minilars.commands.plan import method_from_args

    args = argparse.Namespace(method="lora", rank=None if text is None else int(text), alpha=None, targets="q,v",
                              storage="default")
    config = method_from_args(args)
    assert (config.rank, config.targets, config.storage) == (rank, ("q", "v"), storage)


# ---------------------------------------------------------------- weight decay
def test_weight_decay_is_decoupled_and_acts():
    """AdamW (Loshchilov & Hutter 2019): p <- p (1 - lr wd) - lr Adam(g), so one step
    with decay differs from one without by exactly -lr wd p0."""
    be = get_backend("numpy")
    rng = np.random.default_rng(0)
    p0, g = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    lr, wd = 1e-2, 0.3
    after = {}
    for decay in (0.0, wd):
        p = {"w": p0.copy()}
        AdamW(p, be, AdamWConfig(lr=lr, weight_decay=decay, max_grad_norm=None)).step({"w": g.copy()})
        after[decay] = p["w"]
    np.testing.assert_allclose(after[wd] - after[0.0], -lr * wd * p0, rtol=1e-12, atol=1e-15)


def test_negative_weight_decay_is_refused():
    with pytest.raises(ValueError, match="weight decay must be >= 0"):
        AdamWConfig(weight_decay=-0.1)


def test_finetune_weight_decay_reaches_the_optimizer(tmp_path):
    """LoRA's first step: B = 0, so dA = 0 and A moves by the decay alone,
    A1 = A0 (1 - lr wd) (lr_at(0) = lr without warm-up)."""
    from safetensors.numpy import load_file

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) + "\n" for i in range(8)))
    lr, wd, saved = 1e-2, 0.5, {}
    for decay in (0.0, wd):
        out = tmp_path / f"wd{decay}"
        assert main(["finetune", "--model", "tiny", "--backend", "numpy", "--data", str(data), "--output", str(out),
                     "--method", "lora", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--lr", str(lr),
                     "--warmup", "0", "--weight-decay", str(decay), "--eval-samples", "0", "--no-progress"]) == 0
        saved[decay] = load_file(str(Path(out) / "adapter_model.safetensors"))
    a_keys = [k for k in saved[0.0] if k.endswith("lora_A.weight")]
    assert a_keys
    for key in a_keys:
        np.testing.assert_allclose(saved[wd][key], saved[0.0][key] * (1 - lr * wd), rtol=1e-6, atol=1e-9)


def test_lars_takes_bases_calibrated_elsewhere():
    """apply_method(..., bases=calibrate(...)) builds the same sites as calibrating
    in place (a data-parallel run's ranks take rank 0's bases this way)."""
    from minilars.calibrate import calibrate
    from minilars.methods import apply_frozen

    method = MethodConfig("lars", rank=4, storage=(("mlp.*", "subspace(3, calibration)"),), seed=1)
    tokens = np.random.default_rng(2).integers(0, preset("tiny").vocab_size, (2, 12))
    here = apply_method(Model.random(preset("tiny"), seed=0), method, tokens)
    elsewhere = apply_frozen(Model.random(preset("tiny"), seed=0))
    elsewhere.plan = method.kind.storage_plan()  # which storage fields calibration finds bases for
    bases = calibrate(elsewhere, tokens, method.rank, seed=method.seed)
    there = apply_method(Model.random(preset("tiny"), seed=0), method, bases=bases)
    assert sorted(here.bases) == sorted(there.bases) and here.bases
    for key in here.bases:
        np.testing.assert_array_equal(here.bases[key], there.bases[key])
    for a, b in zip(here.sites, there.sites):
        for stream in a:
            np.testing.assert_array_equal(a[stream].basis, b[stream].basis)


def test_bench_memory_runs_take_ranks_and_storage_from_the_registry():
    """`minilars bench memory`'s menu: each method at its typical rank (LARS 16,
    LoRA 8), storage recipes for the method that reads them, labels as the tables
    in docs/memory.md print them; --rank overrides every method that has a rank."""
    import argparse

    from minilars.bench.memory import add_arguments, build_runs, label_of
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--methods", "inference,lars,lora,ia3,full", "--seq-lens", "64",
                              "--storage", "default", "--storage", "exact"])
    runs = build_runs(args)
    assert [(r["method"], r["rank"], r["storage"]) for r in runs] == [
        ("frozen", None, None), ("lars", 16, "default"), ("lars", 16, "exact"), ("lora", 8, None),
        ("ia3", None, None), ("full", None, None)]
    assert [label_of(r) for r in runs] == ["inference (no grad)", "lars r16 [default]", "lars r16 [exact]",
                                           "lora r8", "ia3", "full"]
    args.rank = 4
    assert [r["rank"] for r in build_runs(args)] == [None, 4, 4, 4, None, None]
