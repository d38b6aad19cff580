"""LARS's whitened basis (`--basis whitened`, Backend.whiten_columns): P D^-1 with D the rms of each
column of z = x P over the calibration tokens. A change of basis of the same
subspace: every z column has unit rms, the span is P's, and the PEFT export still
equals the trained model."""
from __future__ import annotations

import numpy as np
import pytest

from minilars.backends import get_backend
from minilars.methods import MethodConfig


def anisotropic(n: int, width: int, seed: int) -> np.ndarray:
    """(n, width) rows whose directions carry energies 10^3 ... 10^-1, as a stream's do."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((width, width)))
    return (rng.standard_normal((n, width)) * np.logspace(3, -1, width)) @ q.T


@pytest.mark.parametrize("backend_name", ["numpy", "numba", "torch"])
def test_whitened_columns_have_unit_rms_and_the_same_span(backend_name):
    if backend_name == "torch":
        pytest.importorskip("torch")
    if backend_name == "numba":
        pytest.importorskip("numba")
    be = get_backend(backend_name)
    x = anisotropic(400, 24, seed=0)
    basis = be.orthonormal_range(be.asarray(x), 6, seed=1)
    white = be.to_numpy(be.whiten_columns(be.asarray(x), basis))
    p = be.to_numpy(basis)
    z = x @ white  # computed here in numpy from the returned basis
    np.testing.assert_allclose(np.sqrt((z ** 2).mean(axis=0)), 1.0, rtol=1e-10)
    # same span: the projector onto white's columns is P P^T
    projector = white @ np.linalg.pinv(white)
    np.testing.assert_allclose(projector, p @ p.T, atol=1e-10)
    # the calibrated columns come in falling energy, so their scales rise
    assert np.all(np.diff(np.linalg.norm(white, axis=0)) > 0)


def test_a_column_without_energy_keeps_its_scale():
    be = get_backend("numpy")
    x = np.zeros((10, 4))
    x[:, 0] = np.arange(10.0)  # energy along the first axis only
    basis = np.eye(4)[:, :2]
    white = be.whiten_columns(x, basis)
    assert np.isfinite(white).all()
    np.testing.assert_array_equal(white[:, 1], basis[:, 1])
    assert white[0, 0] == pytest.approx(1 / np.sqrt((np.arange(10.0) ** 2).mean()))


def test_the_option_is_recorded_only_when_it_is_not_the_default():
    assert MethodConfig.from_options("lars", {}) == MethodConfig("lars", rank=16, storage=MethodConfig.from_options(
        "lars", {}).storage)
    assert MethodConfig.from_options("lars", {}).extra == ()  # the default is not recorded: read as declared
    assert MethodConfig.from_options("lars", {}).option("basis") == "orthonormal"
    assert MethodConfig.from_options("lars", {"basis": "whitened"}).option("basis") == "whitened"


def test_an_unknown_basis_is_named(capsys):
    from minilars.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--method", "lars", "--basis", "round"])
    assert "basis 'round'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [(("basis", "whitened"),), (("stream_scale", "attn_in=0.5,mlp_out=3"),)],
                         ids=["whitened", "stream-scale"])
def test_a_rescaled_lars_basis_exports_the_lora_it_equals(tmp_path, extra):
    """Trained on the whitened basis (A = (P D^-1)^T) or on per-stream scaled ones (A =
    c_s P_s^T), saved as LoRA: peft's logits on the transformers model equal minilars's,
    and a saved A is not orthonormal (the rescaled basis was saved, not P)."""
    peft = pytest.importorskip("peft")
    import torch
    from test_families_loading import ALL_PROJECTIONS, assert_logits_close, hf_model, load, tokens_targets

    from minilars.methods import apply_method
    from minilars.peft_io import save_adapter

    ref = hf_model("llama")
    ref.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf", "numpy")
    config = MethodConfig("lars", rank=4, targets=ALL_PROJECTIONS, storage=(("block", "recompute"),),
                          extra=extra)
    apply_method(model, config, calibration_tokens=tokens_targets(seed=7)[0])
    rng = np.random.default_rng(3)
    for _, p in sorted(model.trainable().items()):
        p[...] = p + 0.1 * rng.standard_normal(p.shape)
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    tokens, _ = tokens_targets(seed=5)
    with torch.no_grad():
        got = peft_model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    assert_logits_close(model.logits(tokens), got, name=f"lars {extra}")
    from safetensors.numpy import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a = next(v for k, v in saved.items() if "lora_A" in k and ".q_proj." in k)  # attn_in: scaled in both
    assert not np.allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-3)


def test_the_planner_plans_a_whitened_run_like_an_orthonormal_one():
    """The shape backend runs the whitening (no values): the step's plan is the
    default's, and calibration adds at most one (N, r) product and one scaled basis."""
    from minilars.config import preset
    from minilars.planner import plan_memory

    cfg = preset("tiny")
    plain = plan_memory(cfg, MethodConfig.from_options("lars", {}), 128, 1, "float32", "numpy")
    white = plan_memory(cfg, MethodConfig.from_options("lars", {"basis": "whitened"}), 128, 1, "float32", "numpy")
    assert white.total == plain.total
    assert white.calibration_peak >= plain.calibration_peak


# ---------------------------------------------------------------- --stream-scale: c_s P_s per stream
def test_stream_scales_parse_and_name_a_bad_part():
    import argparse

    from minilars.methods.lars import stream_scales

    assert stream_scales(" attn_in=0.5, mlp_out = 2 ,") == {"attn_in": 0.5, "mlp_out": 2.0}
    assert stream_scales(None) == {} == stream_scales("")
    for bad in ("attn=0.5", "attn_in", "attn_in=0", "attn_in=-1", "attn_in=nan", "attn_in=half"):
        with pytest.raises(argparse.ArgumentTypeError, match="stream scale"):
            stream_scales(bad)
    config = MethodConfig.from_options("lars", {"stream_scale": "attn_in=0.5"})
    assert config.option("stream_scale") == "attn_in=0.5"
    assert MethodConfig.from_options("lars", {}).option("stream_scale") == ""  # the default: no stream scaled


def test_a_bad_stream_scale_is_one_argparse_line(capsys):
    from minilars.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--method", "lars", "--stream-scale", "attn_in=0.5,heads=2"])
    assert exit_.value.code == 2
    assert "stream scale 'heads=2'" in capsys.readouterr().err


def test_a_scaled_stream_gets_c_times_the_basis_and_the_others_keep_theirs():
    """calibrate with {attn_in: 0.5, mlp_out: 3} against calibrate without, same seed and
    tokens: those streams' bases are 0.5 P and 3 P, the other two are P itself."""
    from minilars.calibrate import calibrate
    from minilars.config import preset
    from minilars.model import Model

    model = Model.random(preset("tiny"), seed=0)
    tokens = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 24))
    plain, _ = calibrate(model, tokens, 4, seed=3)
    scaled, _ = calibrate(model, tokens, 4, seed=3, stream_scale={"attn_in": 0.5, "mlp_out": 3.0})
    factor = {"attn_in": 0.5, "attn_out": 1.0, "mlp_in": 1.0, "mlp_out": 3.0}
    assert plain.keys() == scaled.keys()
    for name, basis in plain.items():
        np.testing.assert_allclose(scaled[name], factor[name.split(".")[-1]] * basis, rtol=1e-12)
