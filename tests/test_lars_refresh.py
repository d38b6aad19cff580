"""LARS's basis refresh (docs/lars.md Part 1.6): N times in a run P M is folded into a
frozen low-rank delta P_f M_f, P is calibrated again through the trained model, M and
AdamW restart at zero. What must hold: the model does not change at a refresh, the
gradient stays exact (dM = P^T dW_eff with W_eff = W + P_f M_f + P M), the PEFT
export is the LoRA [P_f P]^T, [M_f; M]^T and reproduces the trained model, and a run
resumed across a refresh matches one that was not interrupted."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tolerances import assert_close
from minilars.adapters import LARSSite
from minilars.backends import get_backend
from minilars.sites import FullSite

be = get_backend("numpy")


def orthonormal(rng, rows, cols):
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


@st.composite
def site_shapes(draw):
    d_in = draw(st.integers(2, 24))
    rank = draw(st.integers(1, d_in // 2))
    widths = [draw(st.integers(1, 9)) for _ in range(draw(st.integers(1, 3)))]
    return draw(st.integers(1, 12)), d_in, rank, widths, draw(st.booleans())


@given(shapes=site_shapes(), seed=st.integers(0, 2**31 - 1))
def test_a_refresh_keeps_the_model_and_the_gradient_stays_exact(shapes, seed):
    n, d_in, rank, widths, merged = shapes
    rng = np.random.default_rng(seed)
    outputs = {f"s{j}": w for j, w in enumerate(widths)}
    targets = list(outputs)[:max(1, len(outputs) - 1)]  # a frozen projection when there are several
    weight = rng.standard_normal((d_in, sum(widths)))
    first, second = orthonormal(rng, d_in, rank), orthonormal(rng, d_in, rank)
    site = LARSSite(weight, outputs, targets, first, be)
    m_first = {s: rng.standard_normal(m.shape) for s, m in site.M.items()}
    for s, m in site.M.items():
        m[...] = m_first[s]
    x, dy = rng.standard_normal((n, d_in)), rng.standard_normal((n, sum(widths)))
    y_before = site.forward(x, be)[0]

    site.refresh(second, be)
    assert all((m == 0).all() for m in site.M.values())  # M restarts at zero
    assert_close(site.forward(x, be)[0], y_before, name="y across the refresh")

    m_second = {s: rng.standard_normal(m.shape) for s, m in site.M.items()}
    for s, m in site.M.items():
        m[...] = m_second[s]
    w_eff = weight.copy()  # W + P_1 M_1 + P_2 M_2, written out here
    for s in targets:
        w_eff[:, site.slices[s]] += first @ m_first[s] + second @ m_second[s]
    if merged:
        site.merge(be)
    y, cache = site.forward(x, be)
    dx, grads = site.backward(dy, cache, be)
    site.unmerge()
    full = FullSite(w_eff, outputs)
    y_full, full_cache = full.forward(x, be)
    dx_full, full_grads = full.backward(dy, full_cache, be)
    assert cache.z.shape == (n, rank)  # still all it keeps
    assert_close(y, y_full, name="y")
    assert_close(dx, dx_full, name="dx")
    for s in targets:
        assert_close(grads[f"{s}.lars_M"], second.T @ full_grads["weight"][:, site.slices[s]], name=s)
    a, b = site.as_lora(be)[targets[0]]
    assert a.shape == (2 * rank, d_in) and b.shape == (outputs[targets[0]], 2 * rank)
    assert_close(a.T @ b.T, w_eff[:, site.slices[targets[0]]] - weight[:, site.slices[targets[0]]], name="export")


def test_a_refreshed_basis_of_another_shape_is_refused():
    rng = np.random.default_rng(0)
    site = LARSSite(rng.standard_normal((8, 4)), {"q": 4}, ["q"], orthonormal(rng, 8, 2), be)
    with pytest.raises(ValueError, match="shape"):
        site.refresh(orthonormal(rng, 8, 3), be)


def test_reset_adamw_steps_as_a_new_one():
    from minilars.optim import AdamW

    rng = np.random.default_rng(0)
    p = rng.standard_normal((3, 4))
    grads = [{"p": rng.standard_normal((3, 4))} for _ in range(3)]
    used = AdamW({"p": p.copy()}, be)
    for g in grads[:2]:
        used.step({"p": g["p"].copy()})
    start = used.params["p"].copy()
    used.reset()
    fresh = AdamW({"p": start.copy()}, be)
    used.step({"p": grads[2]["p"].copy()})
    fresh.step({"p": grads[2]["p"].copy()})
    assert used.step_count == fresh.step_count == 1
    np.testing.assert_array_equal(used.params["p"], fresh.params["p"])


def _tiny_rows():
    from minilars import data

    tok = data.char_tokenizer()
    examples = [data.tokenize(data.parse_record({"prompt": f"q{i}", "completion": f"answer {i}"}, f"f:{i}"), tok)
                for i in range(8)]
    return data.make_rows(examples, 32, 0, packing="pad")


def _train(out, steps, refreshes, rows, stop_after=None):
    from minilars import train
    from minilars.config import preset
    from minilars.methods import MethodConfig, apply_method
    from minilars.model import Model
    from minilars.optim import AdamW

    method = MethodConfig("lars", rank=2, extra=(("refreshes", refreshes),))
    model = apply_method(Model.random(preset("tiny"), seed=0), method, calibration_tokens=rows.tokens[:2],
                         calibration_mask=rows.real[:2])
    trainer = train.Trainer(model, AdamW(model.trainable(), model.be), rows,
                            train.TrainConfig(steps=steps, batch_size=2, seq_len=32, lr=1e-2), out,
                            {"refreshes": refreshes}, save_every=1, progress=False)
    if (out / train.CHECKPOINT).exists():
        trainer.resume()
    while trainer.step < (stop_after or steps):
        trainer.train_step()
        trainer.save()
    return model, trainer


def test_a_refreshed_run_exports_the_lora_it_trained_and_resumes_bitwise(tmp_path):
    from minilars.config import preset
    from minilars.model import Model
    from minilars.peft_io import adapter_tensors, load_adapter, save_adapter

    rows = _tiny_rows()
    model, trainer = _train(tmp_path / "whole", 6, 2, rows)  # refreshes after steps 2 and 4
    tensors, config = adapter_tensors(model)
    assert config["r"] == config["lora_alpha"] == 3 * 2
    assert trainer.opt.step_count == 2  # the optimizer restarted at the refresh after step 4
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(Model.random(preset("tiny"), seed=0), tmp_path / "adapter")
    tokens = rows.tokens[:2, :-1]
    assert_close(reloaded.logits(tokens), model.logits(tokens), name="logits of the reloaded adapter")

    _train(tmp_path / "split", 6, 2, rows, stop_after=3)  # stopped between the two refreshes
    resumed, _ = _train(tmp_path / "split", 6, 2, rows)
    for name, value in model.trainable().items():
        np.testing.assert_array_equal(resumed.trainable()[name], value)
    np.testing.assert_array_equal(resumed.logits(tokens), model.logits(tokens))


def test_without_refresh_the_export_keeps_rank_r(tmp_path):
    from minilars.peft_io import adapter_tensors

    model, _ = _train(tmp_path / "plain", 3, 0, _tiny_rows())
    assert adapter_tensors(model)[1]["r"] == 2


def test_peft_loads_a_refreshed_adapter_with_the_logits_minilars_trained(tmp_path):
    """After two refreshes the adapter is a LoRA of rank 3 r; transformers + peft
    reproduce the minilars model's logits from it."""
    peft = pytest.importorskip("peft")
    import torch
    from test_families_loading import ALL_PROJECTIONS, assert_logits_close, hf_model, load, tokens_targets

    from minilars.methods import MethodConfig, apply_method
    from minilars.peft_io import save_adapter

    ref = hf_model("llama")
    ref.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf", "numpy")
    config = MethodConfig("lars", rank=4, targets=ALL_PROJECTIONS, extra=(("refreshes", 2),))
    apply_method(model, config, calibration_tokens=tokens_targets(seed=7)[0])
    kind, rng = config.kind, np.random.default_rng(3)
    for calibration_seed in (8, 9, None):
        for _, p in sorted(model.trainable().items()):
            p[...] = p + 0.1 * rng.standard_normal(p.shape)
        if calibration_seed is not None:
            kind.refresh(model, kind.calibrated_bases(model, tokens_targets(seed=calibration_seed)[0], None))
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].r == 12
    tokens, _ = tokens_targets(seed=5)
    with torch.no_grad():
        got = peft_model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    assert_logits_close(model.logits(tokens), got, name="lars after two refreshes")


def test_the_planner_counts_the_folded_factors_as_weights():
    """After N refreshes every LARS stream holds P_f (d_in, N r) and, per target, M_f
    (N r, d_out_s): N r (d_in + d_out) floats a stream, written out from the config."""
    from minilars.config import preset
    from minilars.methods import MethodConfig
    from minilars.planner import plan_memory

    cfg, rank, n = preset("tiny"), 4, 3
    plain, refreshed = (plan_memory(cfg, MethodConfig.lars_default(rank=rank, extra=(("refreshes", count),)), 32, 1,
                                    "float32", "numpy") for count in (0, n))
    q_k_v = cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
    streams = [(cfg.dim, q_k_v), (cfg.n_heads * cfg.head_dim, cfg.dim), (cfg.dim, 2 * cfg.ffn_dim),
               (cfg.ffn_dim, cfg.dim)]  # (d_in, d_out): attention in and out, MLP in and out
    folded = cfg.n_layers * sum(n * rank * (d_in + d_out) for d_in, d_out in streams) * 4
    assert refreshed.weights - plain.weights == folded
    assert refreshed.trainable == plain.trainable and refreshed.activation_store == plain.activation_store


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_refreshed_site_computes_the_same_on_torch(merged):
    """The torch backend's refreshed site (forward, backward with a random upstream
    gradient, export) against numpy's, merged and unmerged (the path over GGUF blocks)."""
    pytest.importorskip("torch")
    tb = get_backend("torch")
    rng = np.random.default_rng(5)
    outputs, d_in, rank = {"q": 6, "k": 3, "v": 3}, 10, 3
    weight, bases = rng.standard_normal((d_in, 12)), [orthonormal(rng, d_in, rank) for _ in range(2)]
    ms = [{s: rng.standard_normal((rank, w)) for s, w in outputs.items() if s != "k"} for _ in range(2)]
    x, dy = rng.standard_normal((7, d_in)), rng.standard_normal((7, 12))
    results = []
    for b in (be, tb):
        site = LARSSite(b.asarray(weight, "float64"), outputs, ["q", "v"], b.asarray(bases[0], "float64"), b)
        for step, m in enumerate(ms):
            for s, value in m.items():
                site.M[s][...] = b.asarray(value, "float64")
            if step == 0:
                site.refresh(b.asarray(bases[1], "float64"), b)
        if merged:
            site.merge(b)
        y, cache = site.forward(x if b is be else b.asarray(x, "float64"), b)
        dx, grads = site.backward(dy if b is be else b.asarray(dy, "float64"), cache, b)
        site.unmerge()
        a, m = site.as_lora(b)["q"]
        results.append([b.to_numpy(t) for t in (y, dx, grads["q.lars_M"], grads["v.lars_M"], a, m)])
    for name, got, want in zip(("y", "dx", "dM_q", "dM_v", "lora_A", "lora_B"), results[1], results[0]):
        assert_close(got, want, name=name)
