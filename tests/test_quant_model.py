"""The engine over weights kept as GGUF blocks (minilars/quant.py wired into the model).

A model whose matrices are QuantizedWeights (every kept format, fused streams mixing
formats as a Q4_K_M file mixes Q4_K and Q6_K, a table in two parts) against the same
model with those weights dequantised to float32 arrays: the loss, the logits and
every LoRA, IA3 and LARS gradient by name, on the numpy, numba and torch backends, to
float32 rounding (the tolerance table), and in float64 to float64 rounding. LARS
runs unmerged over blocks and merged over the floats, so equal gradients also check
the unmerged path. Then: the tiny preset quantised at load, full fine-tuning refused
with the message, GGUF files loaded kept (q/k rows reordered) against the float
loader, the planner's count of block bytes, and, on the real model, SmolLM2 kept
against float32.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from minilars.backends import get_backend
from minilars.calibrate import calibrate
from minilars.config import ModelConfig, preset
from minilars.methods import MethodConfig, apply_method
from minilars.model import Model
from minilars.quant import QuantizedRows, QuantizedWeight
from minilars.weights import expected_shapes
from test_quant import random_rows
from tolerances import assert_close, to_numpy

# Every width a multiple of 256, so the K-quants (256 values per block) fit every matrix.
CFG = ModelConfig(vocab_size=300, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512,
                  rope_theta=10000.0, rms_eps=1e-5, max_seq_len=64)
# Scale of the float16 scales per format, so a weight's values have std ~ 1/sqrt(256):
# the scale times the spread of what it multiplies (q, and the K-quants' 6-bit or int8 sub-scales).
SCALE = {Q.Q8_0: 1 / (74 * 16), Q.Q4_0: 1 / (4.6 * 16), Q.Q4_1: 1 / (8 * 16), Q.Q4_K: 1 / (232 * 16),
         Q.Q5_K: 1 / (465 * 16), Q.Q6_K: 1 / (1370 * 16)}
# (stream or table) -> its parts' formats, per block: all six kept formats and F16 appear.
FORMATS = [{"attn_in": (Q.Q4_K, Q.Q6_K, Q.Q8_0), "attn_out": (Q.Q4_0,), "mlp_in": (Q.Q5_K, Q.Q4_1),
            "mlp_out": (Q.Q6_K,)},
           {"attn_in": (Q.Q8_0, Q.Q4_1, Q.F16), "attn_out": (Q.Q6_K,), "mlp_in": (Q.Q4_0, Q.Q4_K),
            "mlp_out": (Q.Q5_K,)}]


def rows_of(qtype: Q, m: int, n: int, seed: int) -> QuantizedRows:
    if qtype == Q.F16:
        values = (np.random.default_rng(seed).standard_normal((m, n)) / 16).astype(np.float16)
        return QuantizedRows(values.view(np.uint8), Q.F16, n)
    return random_rows(qtype, m, n // GGML_QUANT_SIZES[qtype][0], seed, scale=SCALE[qtype])


def reordered(part: QuantizedRows, rng) -> QuantizedRows:
    return QuantizedRows(part.data, part.qtype, part.n_cols, rng.permutation(part.n_rows))


def kept_params(seed: int = 0) -> dict:
    """Engine params of CFG: matrices as blocks, norms float32."""
    rng = np.random.default_rng(seed)
    outs = {"attn_in": (CFG.q_dim, CFG.kv_dim, CFG.kv_dim), "attn_out": (CFG.dim,),
            "mlp_in": (CFG.ffn_dim, CFG.ffn_dim), "mlp_out": (CFG.dim,)}
    params = {}
    for name, shape in expected_shapes(CFG).items():
        if len(shape) == 1:
            params[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name == "embed.weight":  # the table in two parts, as kept_weight stacks them
            params[name] = QuantizedWeight([reordered(rows_of(Q.Q8_0, 200, CFG.dim, seed + 1), rng),
                                            rows_of(Q.Q4_1, CFG.vocab_size - 200, CFG.dim, seed + 2)], False)
        else:
            i, stream = int(name.split(".")[1]), name.split(".")[2]
            parts = [rows_of(q, m, shape[0], seed + 10 * i + j)
                     for j, (q, m) in enumerate(zip(FORMATS[i][stream], outs[stream]))]
            if stream == "attn_in":  # q and k read in llama.cpp's order, as the kept loader reads them
                parts[:2] = [reordered(p, rng) for p in parts[:2]]
            params[name] = QuantizedWeight(parts, transposed=True)
    return params


def dense_params(params: dict) -> dict:
    return {name: p.dequantize() if isinstance(p, QuantizedWeight) else p.copy() for name, p in params.items()}


def backend(name: str):
    if name == "numba":
        pytest.importorskip("numba")
    if name == "torch":
        pytest.importorskip("torch")
    return get_backend(name)


METHODS = {
    "frozen": None,
    "lora": MethodConfig("lora", rank=4),
    "ia3": MethodConfig("ia3"),
    "lars-default": MethodConfig.lars_default(rank=8),  # recompute, inputs kept in float16
    "lars-exact": MethodConfig("lars", rank=8, storage=(("block", "recompute"),)),
}


def _perturb(model: Model, seed: int) -> None:
    """Give every trainable array random values (LoRA's B, LARS's M, IA3's scales
    start at zero or one), the same for both models: the adapters then change the
    outputs, so their terms of dx are checked too."""
    rng = np.random.default_rng(seed)
    for name, array in sorted(model.trainable().items()):
        values = 1.0 + 0.3 * rng.standard_normal(array.shape) if "ia3" in name else 0.1 * rng.standard_normal(array.shape)
        array[...] = model.be.asarray(values.astype(to_numpy(array).dtype))


def _pair(method: str, be, dtype: str, tokens):
    params = kept_params()
    models = {"kept": Model(CFG, params, backend=be, compute_dtype=dtype),
              "dense": Model(CFG, dense_params(params), backend=be, compute_dtype=dtype)}
    config = METHODS[method]
    if config is not None:
        bases = None
        if config.kind.needs_calibration:  # one calibration, on the floats, for both
            bases = calibrate(models["dense"], tokens, config.rank, seed=0)
        for model in models.values():
            apply_method(model, config, tokens, bases=bases)
            _perturb(model, 7)
    return models


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend_name, dtype", [("numpy", "float32"), ("numba", "float32"), ("torch", "float32"),
                                                 ("numpy", "float64")])
def test_kept_blocks_train_as_the_dequantised_model(backend_name, dtype, method):
    if dtype == "float64" and method == "lars-default":
        pytest.skip("float16 storage of the inputs rounds beyond float64's tolerance by construction")
    be = backend(backend_name)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, CFG.vocab_size, (2, 24))
    targets = rng.integers(0, CFG.vocab_size, (2, 24))
    targets[0, :5] = -100  # unlabelled prompt rows: the loss gathers the labelled ones
    models = _pair(method, be, dtype, tokens)
    assert models["kept"].params["blocks.0.attn_in.weight"].formats == "Q4_K+Q6_K+Q8_0"

    logits = {k: to_numpy(m.logits(tokens)) for k, m in models.items()}
    assert_close(logits["kept"], logits["dense"], dtype, name="logits")
    tapes = {k: m.forward(tokens, targets) for k, m in models.items()}
    assert np.isfinite(tapes["dense"].loss)
    assert_close(np.float64(tapes["kept"].loss), np.float64(tapes["dense"].loss), dtype, name="loss")
    grads = {k: models[k].backward(tapes[k]) for k in models}
    assert grads["kept"].keys() == grads["dense"].keys() == models["dense"].trainable().keys()
    if method != "frozen":
        assert grads["kept"], "the method trains something"
    for name in grads["dense"]:
        reference = to_numpy(grads["dense"][name])
        assert np.abs(reference).max() > 0, name  # a gradient that is zero checks nothing
        assert_close(to_numpy(grads["kept"][name]), reference, dtype, name=name)


def test_lars_stays_unmerged_over_blocks():
    """Over blocks a LARS site never forms W + P M (a float copy of the block's
    weights); over floats it folds while its block runs."""
    be = get_backend("numpy")
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 16))
    models = _pair("lars-default", be, "float32", tokens)
    merged = {}
    for key, model in models.items():
        site = model.sites[0]["mlp_in"]
        with model._merged_block(0):
            merged[key] = site.merged is not None
    assert merged == {"kept": False, "dense": True}


# ---------------------------------------------------------------- loading
def test_tiny_preset_quantised_at_load_computes_with_its_blocks():
    from minilars.pretrained import load_model, weight_summary

    model, _ = load_model("tiny", "numpy", "q4_0")
    kept = {n: p for n, p in model.params.items() if isinstance(p, QuantizedWeight)}
    assert set(kept) == {n for n, s in expected_shapes(preset("tiny")).items() if len(s) == 2}
    assert weight_summary(model).startswith("Q4_0 blocks")
    float_model, _ = load_model("tiny", "numpy", "float32")
    for name, p in kept.items():  # quantising moved the values by at most a step of each block
        assert p.nbytes < to_numpy(float_model.params[name]).nbytes / 6
        assert np.abs(p.dequantize() - float_model.params[name]).max() < 0.5
    dense = Model(model.cfg, dense_params(model.params), backend="numpy")
    tokens = np.arange(12)[None] % model.cfg.vocab_size
    assert_close(model.logits(tokens), dense.logits(tokens), name="logits")


def test_full_fine_tuning_over_blocks_is_refused_with_what_to_pass():
    from minilars.pretrained import load_model

    model, _ = load_model("tiny", "numpy", "q8_0")
    with pytest.raises(ValueError, match="--weights float32"):
        apply_method(model, "full")


def test_finetune_full_over_blocks_stops_before_training(tmp_path, capsys):
    from minilars.cli import main

    code = main(["finetune", "--model", "tiny", "--backend", "numpy", "--method", "full", "--weights", "q8_0",
                 "--steps", "1", "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--weights float32" in err and "GGUF blocks" in err


def _write_gguf(path: Path, fmt: str, **shape) -> Path:
    script = Path(__file__).parent.parent / "benchmarks" / "random_quantised_gguf.py"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    subprocess.run([sys.executable, str(script), *args, "--format", fmt, "--out", str(path)], check=True,
                   capture_output=True)
    return path


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_a_gguf_kept_as_blocks_equals_the_float_loader(tmp_path, fmt):
    """The kept loader reorders q's and k's rows of blocks as the float loader
    reorders the dequantised rows (gguf_loader.unpermute_qk), with grouped kv heads."""
    from minilars.pretrained import load_model

    path = _write_gguf(tmp_path / "m.gguf", fmt, layers=2, dim=64, ffn=96, heads=4, kv_heads=2, vocab=70)
    kept, tokenizer = load_model(str(path), "numpy", "keep")
    floats, _ = load_model(str(path), "numpy", "float32")
    assert tokenizer is None and kept.params["blocks.1.attn_in.weight"].formats == fmt.upper()
    for name, p in kept.params.items():
        dense = p.dequantize() if isinstance(p, QuantizedWeight) else p
        np.testing.assert_array_equal(dense, floats.params[name], err_msg=name)  # the same values, in place
    data = kept.params["embed.weight"].parts[0].data
    assert isinstance(data.base, np.memmap) or isinstance(getattr(data.base, "base", None), np.memmap)
    tokens = np.arange(20)[None] % 70
    assert_close(kept.logits(tokens), floats.logits(tokens), name="logits")


def test_kept_weights_fingerprint_as_their_floats(tmp_path):
    """An adapter trained over kept blocks belongs to the same base model as one trained
    over the dequantised floats (peft_io.model_fingerprint samples dequantised values)."""
    from minilars.peft_io import model_fingerprint
    from minilars.pretrained import load_model

    path = _write_gguf(tmp_path / "m.gguf", "q4_0", layers=1, dim=64, ffn=64, heads=2, kv_heads=1, vocab=40)
    assert model_fingerprint(load_model(str(path), "numpy", "keep")[0]) == \
        model_fingerprint(load_model(str(path), "numpy", "float32")[0])


# ---------------------------------------------------------------- the planner
@pytest.mark.parametrize("fmt, block, block_bytes", [("q8_0", 32, 34), ("q4_0", 32, 18)])
def test_planner_counts_the_blocks_bytes(fmt, block, block_bytes):
    """weights(fmt) - weights(float32) = the blocks' bytes - the float32 bytes of every
    matrix whose rows split into 32-value blocks, counted here from the shapes."""
    from minilars.planner import plan_memory

    cfg = preset("smollm2-135m")
    delta = 0
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 2:
            n_cols = shape[1] if name in ("embed.weight", "head.weight") else shape[0]
            assert n_cols % block == 0
            delta += shape[0] * shape[1] // block * block_bytes - 4 * shape[0] * shape[1]
    plans = {w: plan_memory(cfg, MethodConfig.lars_default(), 256, 1, w, "numba") for w in ("float32", fmt)}
    assert plans[fmt].weights - plans["float32"].weights == delta
    assert plans[fmt].weight_format == fmt


def test_planner_plans_a_models_kept_formats():
    """The formats of a loaded model (pretrained.weight_format_of) plan its blocks' bytes."""
    from minilars.planner import plan_memory
    from minilars.pretrained import weight_format_of

    params = kept_params()
    model = Model(CFG, params, backend="numpy")
    blocks = sum(p.nbytes for p in params.values() if isinstance(p, QuantizedWeight))
    floats = plan_memory(CFG, "frozen", 16, 1, "float32", "numpy", tokenizer=False)
    kept = plan_memory(CFG, "frozen", 16, 1, weight_format_of(model), "numpy", tokenizer=False)
    matrices = sum(4 * int(np.prod(s)) for s in expected_shapes(CFG).values() if len(s) == 2)
    assert floats.weights - kept.weights == matrices - blocks
    assert kept.weight_format == "kept Q8_0+Q4_1+Q4_K+Q6_K+Q4_0+Q5_K+F16"


def test_check_budget_names_the_weight_format_that_fits():
    from minilars.planner import check_budget, plan_memory

    cfg = preset("smollm2-135m")
    method = MethodConfig.lars_default()
    q8 = plan_memory(cfg, method, 512, 1, "q8_0", "numba").total
    with pytest.raises(ValueError, match="--weights q8_0"):
        check_budget(cfg, method, 512, 1, "float32", q8 + 2**20, "numba")


# ---------------------------------------------------------------- the real model
@pytest.mark.real_model
def test_smollm2_kept_generates_as_float32(smollm2_path):
    """SmolLM2-135M from its Q4_1 GGUF, kept as blocks on numba, against the same file
    dequantised to float32: the same greedy tokens (and logits to float32 rounding)."""
    pytest.importorskip("numba")
    from minilars.generate import generate_ids
    from minilars.pretrained import load_model

    kept, tok = load_model(str(smollm2_path), "numba", "keep")
    floats, _ = load_model(str(smollm2_path), "numba", "float32")
    assert kept.params["embed.weight"].formats == "Q8_0" and kept.params["blocks.0.mlp_in.weight"].formats == "Q4_1"
    prompt = tok.encode("The capital of France is")
    assert list(generate_ids(kept, prompt, 8)) == list(generate_ids(floats, prompt, 8))
    tokens = np.array([prompt])
    assert_close(kept.logits(tokens), floats.logits(tokens), name="logits")


# ---------------------------------------------------------------- the shape backend
def _shape_kernels():
    x_rows, d, f, vocab = 512, 576, 1536, 4096
    return {
        "matmul (x S^T)": (lambda be, a: be.matmul(a["x"], a["w_in"])),
        "matmul_nt (dy S)": (lambda be, a: be.matmul_nt(a["dy"], a["w_in"])),
        "matmul_nt of the table (x E^T)": (lambda be, a: be.matmul_nt(a["x"], a["table"])),
        "embedding_forward": (lambda be, a: be.embedding_forward(a["table"], a["tokens"])),
        "cross_entropy_head": (lambda be, a: be.cross_entropy_head(a["x"], a["table"], a["tokens"], 128, -100,
                                                                   True, False)),
    }, {"x": (x_rows, d), "dy": (x_rows, 2 * f), "w_in": ((("Q4_1", 2 * f),), d, True), "table": ((("Q8_0", vocab),), d, False),
        "vocab": vocab, "rows": x_rows}


@pytest.mark.parametrize("flavour", ["numpy", "numba"])
@pytest.mark.parametrize("kernel", list(_shape_kernels()[0]))
def test_shape_backend_counts_blocks_and_one_tile(kernel, flavour):
    """A frozen product over blocks on the shape backend (backends/shape_backend.py)
    counts what tracemalloc sees the real kernel hold: its output, the one tile
    buffer, the tile's product, and (numpy) gguf-py's decoding temporaries; within
    10 % or 128 KiB (the decoder's temporaries are stated as 2.3 tiles)."""
    import tracemalloc

    from minilars.backends.shape_backend import ShapeBackend
    from minilars.quant import weight_of_formats

    kernels, spec = _shape_kernels()
    real = backend(flavour)
    rng = np.random.default_rng(0)

    def random_weight(formats, n, transposed):
        (name, rows), = formats
        return QuantizedWeight([random_rows(Q[name], rows, n // 32, 1, SCALE[Q[name]])], transposed)

    arrays = {"x": rng.standard_normal(spec["x"]).astype(np.float32),
              "dy": rng.standard_normal(spec["dy"]).astype(np.float32),
              "w_in": random_weight(*spec["w_in"]), "table": random_weight(*spec["table"]),
              "tokens": rng.integers(0, spec["vocab"], spec["rows"])}
    kernels[kernel](real, arrays)  # numba: load this layout's decoder outside the measurement
    if flavour == "numba":
        import numba

        threads = numba.get_num_threads()
        numba.set_num_threads(1)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = kernels[kernel](real, arrays)
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        if flavour == "numba":
            numba.set_num_threads(threads)
    del out
    be = ShapeBackend(flavour, threads=1)
    shaped = {"x": be.new(spec["x"], "float32"), "dy": be.new(spec["dy"], "float32"), "tokens": be.new((spec["rows"],), "int64"),
              **{k: weight_of_formats(*spec[k], lambda shape: be.new(shape, "uint8")) for k in ("w_in", "table")}}
    start = be.ledger.bytes_now
    be.ledger.reset()
    shaped_out = kernels[kernel](be, shaped)
    assert (be.ledger.bytes_peak - start, be.ledger.bytes_now - start) == \
        (pytest.approx(peak - base, rel=0.1, abs=128 * 1024), pytest.approx(now - base, rel=0.1, abs=128 * 1024))
    del shaped_out


# ---------------------------------------------------------------- calibration and bench memory's cgroups
def test_lars_calibrates_over_blocks_as_over_their_floats():
    """The bases found over kept blocks span what the floats' bases span (P P^T equal
    to float32 rounding: the range finder sees the same activations up to rounding)."""
    be = get_backend("numpy")
    params = kept_params()
    kept, dense = Model(CFG, params, backend=be), Model(CFG, dense_params(params), backend=be)
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 32))
    ours, _ = calibrate(kept, tokens, 8, seed=0)
    theirs, _ = calibrate(dense, tokens, 8, seed=0)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert_close(ours[name] @ ours[name].T, theirs[name] @ theirs[name].T, tol=(1e-3, 1e-3), name=name)


def test_memory_limit_says_why_it_cannot(monkeypatch, capsys):
    """Without root no memory cgroup can be made: bench memory --memory-limit stops
    with the reason instead of running unlimited."""
    import os

    from minilars.bench.cgroup import CgroupUnavailable, MemoryLimit
    from minilars.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CgroupUnavailable, match="root"):
        MemoryLimit.create(512 << 20)
    assert main(["bench", "memory", "--quick", "--memory-limit", "512MiB", "--out", "unused"]) == 2
    assert "cannot run inside a memory limit here" in capsys.readouterr().err
