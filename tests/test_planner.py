"""The memory planner (minilars/planner.py) against what the engine really holds.

1. The activation store's peak is predicted exactly, byte for byte and per site kind,
   for every method and storage policy (tiny preset, a few batch shapes).
2. The whole step's live bytes (weights, adapters, AdamW state, gradients, store and
   work arrays) match tracemalloc's peak per phase (forward, backward, AdamW) on a
   small model with SmolLM2's widths.
3. check_budget refuses what does not fit and its advice fits.
4. `minilars plan` and `minilars bench memory --quick` run end to end.
5. The plan is one step of the real model on shapes: T = 8192 needs no data, the
   persistent parts are the arrays a step keeps, the moments are the step's own,
   calibration is planned apart.
"""
from __future__ import annotations

import csv
import math
import re
import tracemalloc

import numpy as np
import pytest

from minilars.backends import available
from minilars.cli import main
from minilars.config import preset
from minilars.methods import LARS_DEFAULT_STORAGE, MethodConfig, apply_method
from minilars.model import Model
from minilars.optim import AdamW
from minilars.planner import (MemoryPlan, check_budget, format_size, largest_fitting_seq_len, parse_size,
                              plan_memory)
from minilars.store import Half, StoragePlan
from minilars.weights import expected_shapes

STORAGES = {
    "exact": (),
    "default": LARS_DEFAULT_STORAGE,  # block=recompute, input.x=half
    "recompute": (("block", "recompute"),),
    "half": (("*", "half"),),
    "subspace": (("*", "subspace(4)"),),
    "subspace-full-rank": (("*", "subspace(100)"),),  # rank >= every width: a rotation
    "calibrated-attn-half-mlp": (("attn.*", "subspace(4, calibration)"), ("mlp.*", "half")),
    "recompute-half-everything": (("block", "recompute"), ("*", "half")),
    "recompute-subspace-input": (("block", "recompute"), ("input.x", "subspace(8)"), ("attn.o", "half")),
    "recompute-keep-o-half": (*LARS_DEFAULT_STORAGE, ("attn.o", "half")),  # O and lse kept from the forward
    "recompute-keep-o-exact": (("block", "recompute"), ("attn.o", "exact")),
    "o-half": (("attn.o", "half"),),  # splits the buffer attn.o shares with attn_out's input
}

METHODS = {
    "frozen": MethodConfig("frozen"),
    "full": MethodConfig("full"),
    "lora": MethodConfig("lora", rank=4),
    "lora-q-o-down": MethodConfig("lora", rank=3, targets=("q", "o", "down")),
    "ia3": MethodConfig("ia3"),
    "ia3-q-o-gate-down": MethodConfig("ia3", targets=("q", "o", "gate", "down")),
    **{f"lars-{name}": MethodConfig("lars", rank=4, storage=storage) for name, storage in STORAGES.items()},
    "lars-rank-above-width": MethodConfig("lars", rank=64, storage=LARS_DEFAULT_STORAGE),
}


def _batch(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (b, t)), rng.integers(0, cfg.vocab_size, (b, t))


# ---------------------------------------------------------------- 1. the store, exactly
@pytest.mark.parametrize("shape", [(1, 24), (2, 17), (1, 5)], ids=lambda s: f"B{s[0]}T{s[1]}")
@pytest.mark.parametrize("name", list(METHODS))
def test_store_peak_is_predicted_exactly(name, shape):
    cfg, method = preset("tiny"), METHODS[name]
    b, t = shape
    model = Model.random(cfg, seed=0, attention_tile=8)
    tokens, targets = _batch(cfg, b, t)
    apply_method(model, method, tokens if method.name == "lars" else None)
    tape = model.forward(tokens, targets)
    model.backward(tape)
    plan = plan_memory(cfg, method, t, b, "float32", "numpy", inference=False)
    assert plan.store_peak == tape.store.bytes_peak
    assert plan.store_peak_by_kind == tape.store.peak_by_kind()


def test_frozen_means_the_no_grad_forward():
    plan = plan_memory(preset("tiny"), MethodConfig("frozen"), 64, 1, "float32", "numpy")
    assert plan.store_peak == 0 and plan.gradients == 0 and plan.optimizer == 0


# ---------------------------------------------------------------- 2. live bytes vs tracemalloc
def _phase_peaks(plan: MemoryPlan) -> dict[str, int]:
    """The planner's largest total per phase, without the runtime baseline."""
    out = {"forward": 0, "backward": 0, "optimizer": 0}
    for name, total in plan.phases:
        phase = ("optimizer" if name.startswith("optimizer") else
                 "backward" if ("backward" in name or "recompute" in name) else "forward")
        out[phase] = max(out[phase], total - plan.baseline)
    return out


LIVE_BYTE_METHODS = {"frozen": MethodConfig("frozen"), "lars": MethodConfig.lars_default(),
                     "lars-exact": MethodConfig("lars", rank=16), "lora": MethodConfig("lora", rank=8),
                     "ia3": MethodConfig("ia3"), "full": MethodConfig("full"),
                     "lars-mlp-slices": MethodConfig.lars_default(), "frozen-mlp-slices": MethodConfig("frozen"),
                     "lars-keep-o": MethodConfig("lars", rank=16, storage=(*LARS_DEFAULT_STORAGE, ("attn.o", "half")))}
MLP_SLICES = {"lars-mlp-slices": 128, "frozen-mlp-slices": 128}  # tokens per MLP slice (default 512 = T)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("numpy", "numba") if b in available()])
@pytest.mark.parametrize("name", list(LIVE_BYTE_METHODS))
def test_live_bytes_match_tracemalloc(name, backend):
    """numpy (and numba's np.empty outputs and kernel buffers) report their buffers
    to tracemalloc, so its peak is the bytes the step really holds, without the C
    allocator's slack; the planner must land within 2 % in every phase."""
    method = LIVE_BYTE_METHODS[name]
    cfg = preset("smollm2-135m").with_(n_layers=2, vocab_size=4096, max_seq_len=1024)
    t = 512
    tokens, targets = _batch(cfg, 1, t)

    def steps() -> dict:
        """The phases' traced peaks: the second forward (and step) of a fresh model."""
        model = Model.random(cfg, seed=0, backend=backend, mlp_chunk=MLP_SLICES.get(name, 512))
        apply_method(model, method, tokens[:, :256] if method.name == "lars" else None)
        method.kind.refresh_all(model, tokens[:, :256])  # as planned: the steps after the last refresh (LARS)
        measured = {}
        if method.name == "frozen":
            for _ in range(2):  # the second forward's peak: a kernel layout warmup() missed compiles in the first
                tracemalloc.reset_peak()
                model.forward(tokens, targets, need_grad=False)
                measured["forward"] = tracemalloc.get_traced_memory()[1]
        else:
            optimizer = AdamW(model.trainable(), model.be)
            for _ in range(2):  # the second step has m and v written, as every later one
                tracemalloc.reset_peak()
                tape = model.forward(tokens, targets)
                measured["forward"] = tracemalloc.get_traced_memory()[1]
                tracemalloc.reset_peak()
                grads = model.backward(tape)
                measured["backward"] = tracemalloc.get_traced_memory()[1]
                tracemalloc.reset_peak()
                optimizer.step(grads)
                measured["optimizer"] = tracemalloc.get_traced_memory()[1]
                del tape, grads
        return measured

    if backend == "numba":
        # numba allocates Python objects once per process that stay alive: compiling or
        # loading a kernel layout, and at two threads 1.0 MiB more on the first run of
        # frozen-mlp-slices (warmup() does not prevent it; its source is not traced down).
        # tracemalloc would count them, so the same steps run once before tracing starts
        steps()
    tracemalloc.start()
    try:
        measured = steps()
    finally:
        tracemalloc.stop()
    planned = _phase_peaks(plan_memory(cfg, method, t, 1, "float32", backend, inference=method.name == "frozen",
                                       mlp_chunk=MLP_SLICES.get(name, 512)))
    # numba at two threads, frozen forward in MLP slices: the traced peak of the same
    # forward moves by about one (T, d) float32 array from run to run (63.49 against
    # 64.78 MB in a probe of 2026-12-05, nothing kept between runs), with how the
    # kernels' threads interleave; the plan does not yet take the worse case, so the
    # check allows that one array where it is more than the 2 % (approx takes the larger)
    interleave = t * cfg.dim * 4 if (backend, name) == ("numba", "frozen-mlp-slices") else 0
    for phase, value in measured.items():
        assert planned[phase] == pytest.approx(value, rel=0.02, abs=interleave), phase


def test_plan_grows_with_seq_len_and_adds_up():
    cfg = preset("smollm2-135m")
    for method in (MethodConfig.lars_default(), MethodConfig("lora", rank=8), MethodConfig("full")):
        totals = [plan_memory(cfg, method, t, 1, "float32", "numpy").total for t in (256, 512, 1024, 2048)]
        assert totals == sorted(totals)
        plan = plan_memory(cfg, method, 1024, 1, "float32", "numpy")
        assert plan.total == (plan.baseline + plan.weights + plan.trainable + plan.optimizer + plan.gradients
                              + plan.activation_store + plan.transient)
        assert max(total for _, total in plan.phases) == plan.total


def test_lars_default_recipe_keeps_less_than_lora():
    cfg = preset("smollm2-135m")
    lars = plan_memory(cfg, MethodConfig.lars_default(), 2048, 1, "float32", "numpy")
    lora = plan_memory(cfg, MethodConfig("lora", rank=8), 2048, 1, "float32", "numpy")
    assert lars.store_peak < lora.store_peak / 10
    # 29 block inputs in float16 plus one block's attention caches in float32 per token
    # (attn_norm x and rstd, q, o, k, v, lse, two z), and the MLP caches of one slice
    # of 512 tokens (mlp_norm x and rstd, gate_up, two z)
    attention = (577 + 2 * 576 + 2 * 192 + 9 + 2 * 16) * 4
    mlp_slice = 512 * (577 + 2 * 1536 + 2 * 16) * 4
    assert lars.store_peak == 2048 * (29 * 576 * 2 + attention) + mlp_slice


def test_lars_default_at_8192_tokens_plans_on_shapes():
    """T = 8192 on SmolLM2-135M: the shape backend holds no values, so this runs in
    the planner's memory, not the step's; the store holds what the recipe says
    (the formula of the test above at T = 8192; the MLP slice is still 512 rows)."""
    cfg = preset("smollm2-135m")
    plan = plan_memory(cfg, MethodConfig.lars_default(), 8192, 1, "float32", "numpy")
    attention = (577 + 2 * 576 + 2 * 192 + 9 + 2 * 16) * 4
    mlp_slice = 512 * (577 + 2 * 1536 + 2 * 16) * 4
    assert plan.store_peak == 8192 * (29 * 576 * 2 + attention) + mlp_slice


def test_persistent_parts_are_the_arrays_a_step_keeps():
    """Weights, adapters and AdamW state from the shapes alone: full fine-tuning
    trains every parameter in place (no separate trainable bytes, m and v as large
    as the weights); LoRA r on every projection adds A (d_in, r) and B (r, d_out)."""
    cfg = preset("smollm2-135m")
    params = sum(math.prod(shape) for shape in expected_shapes(cfg).values())
    rope = 2 * 4096 * cfg.head_dim * 8  # cos, sin (4096, hd) float64: Model._rope
    full = plan_memory(cfg, MethodConfig("full"), 512, 1, "float32", "numpy")
    assert (full.weights, full.trainable, full.optimizer) == (4 * params + rope, 0, 2 * 4 * params)
    assert full.n_trainable == params

    r = 8
    lora = plan_memory(cfg, MethodConfig("lora", rank=r), 512, 1, "float32", "numpy")
    d, q, k, f = cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.ffn_dim
    per_block = r * ((d + q) + 2 * (d + k) + (q + d) + 2 * (d + f) + (f + d))  # q k v o gate up down
    assert lora.n_trainable == cfg.n_layers * per_block
    assert (lora.weights, lora.trainable, lora.optimizer) == (4 * params + rope, 4 * lora.n_trainable,
                                                              8 * lora.n_trainable)


def test_calibration_is_planned_apart():
    """LARS's calibration forward (512 tokens, no grad, one block's inputs at a time)
    is planned on shapes before the step: above the weights, below a step at T = 256.
    LoRA applies no forward: its peak there is the weights (without the RoPE tables,
    built by the first forward) and the new adapters."""
    cfg = preset("smollm2-135m")
    lars = plan_memory(cfg, MethodConfig.lars_default(), 256, 1, "float32", "numpy")
    assert lars.baseline + lars.weights < lars.calibration_peak < lars.total
    lora = plan_memory(cfg, MethodConfig("lora", rank=8), 256, 1, "float32", "numpy")
    rope = 2 * 4096 * cfg.head_dim * 8
    assert lora.calibration_peak == lora.baseline + lora.weights - rope + lora.trainable


def test_moments_name_the_block_and_the_kernel():
    """The plan's moments come from the step as it runs: every block's forward and
    backward, in step order, and the peak is one of them."""
    cfg = preset("smollm2-135m").with_(n_layers=3, vocab_size=4096)
    plan = plan_memory(cfg, MethodConfig("lora", rank=4), 256, 1, "float32", "numpy")
    names = [name for name, _ in plan.phases]
    for i in range(3):
        assert f"block {i} forward: attention kernel" in names and f"block {i} backward: attention" in names
    assert names.index("block 2 forward: SwiGLU") < names.index("block 2 backward: SwiGLU") \
        < names.index("block 0 backward: SwiGLU") < names.index("optimizer step")
    assert plan.peak_phase in names


def test_float16_weights_halve_the_weights():
    cfg = preset("smollm2-135m")
    f32 = plan_memory(cfg, MethodConfig.lars_default(), 1024, 1, "float32", "numpy")
    f16 = plan_memory(cfg, MethodConfig.lars_default(), 1024, 1, "float16", "numpy")
    assert f16.weights < 0.55 * f32.weights


# ---------------------------------------------------------------- 3. budgets
def test_check_budget_returns_the_plan_when_it_fits():
    cfg = preset("smollm2-135m")
    plan = check_budget(cfg, MethodConfig.lars_default(), 1024, 1, "float32", "4GiB", "numpy")
    assert plan.total <= 4 * 2**30


def _advice(message: str, flag: str) -> str | None:
    match = re.search(rf"{flag} (\S+?)[ ;.]", message)
    return match.group(1) if match else None


def test_check_budget_advice_fits():
    cfg = preset("smollm2-135m")
    method = MethodConfig("lora", rank=64)
    budget = plan_memory(cfg, method, 700, 1, "float32", "numpy").total  # 700 tokens fit, 2048 do not
    with pytest.raises(ValueError) as info:
        check_budget(cfg, method, 2048, 1, "float32", budget, "numpy")
    message = str(info.value)
    assert format_size(budget) in message
    longest = int(_advice(message, "--seq-len"))
    assert 700 <= longest < 2048
    assert plan_memory(cfg, method, longest, 1, "float32", "numpy").total <= budget
    assert plan_memory(cfg, method, longest + 1, 1, "float32", "numpy").total > budget
    assert "--method lars" in message  # the default LARS recipe fits 2048 tokens here
    assert plan_memory(cfg, MethodConfig.lars_default(), 2048, 1, "float32", "numpy").total <= budget


def test_check_budget_suggests_a_policy_and_a_rank_that_fit():
    cfg = preset("smollm2-135m")
    exact = MethodConfig("lars", rank=16)
    budget = plan_memory(cfg, MethodConfig.lars_default(), 2048, 1, "float32", "numpy").total
    with pytest.raises(ValueError) as info:
        check_budget(cfg, exact, 2048, 1, "float32", budget, "numpy")
    assert "--storage block=recompute,input.x=half" in str(info.value)

    big = MethodConfig("lars", rank=512, storage=LARS_DEFAULT_STORAGE)
    budget = plan_memory(cfg, MethodConfig("lars", rank=64, storage=LARS_DEFAULT_STORAGE), 1024, 1, "float32",
                         "numpy").total
    with pytest.raises(ValueError) as info:
        check_budget(cfg, big, 1024, 1, "float32", budget, "numpy")
    rank = int(_advice(str(info.value), "--rank"))
    assert rank < 512
    fitting = MethodConfig("lars", rank=rank, storage=LARS_DEFAULT_STORAGE)
    assert plan_memory(cfg, fitting, 1024, 1, "float32", "numpy").total <= budget


def test_no_sequence_fits_below_the_weights():
    cfg = preset("smollm2-135m")
    assert largest_fitting_seq_len(cfg, MethodConfig.lars_default(), 1, "float32", 100 * 2**20, "numpy") == 0
    with pytest.raises(ValueError, match="no sequence length fits"):
        check_budget(cfg, MethodConfig.lars_default(), 256, 1, "float32", "100MiB", "numpy")


@pytest.mark.parametrize("text, value", [("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2G", 2 * 2**30),
                                         ("1.5GB", int(1.5 * 2**30)), ("300k", 300 * 1024), ("1000", 1000),
                                         ("1e9", 10**9), (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "1 XB", "-1GiB", "one gig"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


# ---------------------------------------------------------------- 4. the commands
def test_plan_command(capsys):
    assert main(["plan", "--model", "tiny", "--method", "lars", "--seq-len", "64", "--backend", "numpy",
                 "--phases"]) == 0
    out = capsys.readouterr().out
    assert "activation store peak" in out and "total" in out and "block 1 backward: SwiGLU" in out
    assert main(["plan", "--model", "smollm2-135m", "--method", "lora", "--seq-len", "2048", "--backend", "numpy",
                 "--max-memory", "1GiB"]) == 1
    assert "What would fit" in capsys.readouterr().out
    assert main(["plan", "--model", "tiny", "--seq-len", "64", "--backend", "numpy", "--max-memory", "1GiB"]) == 0
    assert "fits in" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_memory_quick(tmp_path, capsys):
    """Fresh worker processes on the tiny preset; a run that fails (T beyond the
    context) is a row with its error, and the others still report."""
    out = tmp_path / "bench"
    status = main(["bench", "memory", "--quick", "--backend", "numpy", "--methods", "inference,lars,lora",
                   "--seq-lens", "16,512", "--out", str(out)])
    assert status == 1  # one row per method failed
    with open(out / "memory.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    for row in rows:
        if row["T"] == "512":
            assert row["status"] == "error" and "context" in row["error"]
        else:
            assert row["status"] == "ok", row["error"]
            assert float(row["peak_rss_mib"]) > 0 and float(row["step_s"]) >= 0
            assert row["store_peak_mib"] == row["planned_store_mib"]  # the planner's store is exact
    assert (out / "memory.png").stat().st_size > 0
    assert "| label" in capsys.readouterr().out


def test_bench_speed_table(tmp_path, capsys):
    """`minilars bench speed` on the tiny preset: one row per (T, method, backend),
    each row's ratios taken from the rows it names."""
    path = tmp_path / "speed.csv"
    backends = "numpy,numba" if "numba" in available() else "numpy"
    assert main(["bench", "speed", "--model", "tiny", "--seq-lens", "16,32", "--methods", "lars,lars-fast,lora",
                 "--backends", backends, "--steps", "1", "--csv", str(path)]) == 0
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3 * len(backends.split(","))
    step = {(r["T"], r["method"], r["backend"]): float(r["step s"]) for r in rows}
    for r in rows:
        key = (r["T"], r["method"], r["backend"])
        assert float(r["tokens/s"]) == pytest.approx(int(r["T"]) / step[key])
        assert float(r["speed-up vs numpy"]) == pytest.approx(step[(r["T"], r["method"], "numpy")] / step[key])
        assert float(r["step time / LoRA's"]) == pytest.approx(step[key] / step[(r["T"], "lora", r["backend"])])
    assert "machine GFLOP/s" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown method 'lars-slow'"):
        main(["bench", "speed", "--model", "tiny", "--methods", "lars-slow"])


def test_profile_times_each_outermost_backend_call_and_unwraps():
    """bench speed --profile's timer: one entry per kernel the step calls, as many
    calls as the model makes (a block's attention once forward, once backward with
    exact storage; the loss once), nested calls (the base class's fused SwiGLU
    calling the per-half method) counted once, under the outer name; seconds within
    the step's wall time; and the backend unwrapped afterwards."""
    import time

    from minilars.bench.profile import timed_backend

    model = apply_method(Model.random(preset("tiny"), 0, backend="numpy"), MethodConfig("lora", rank=4))
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 12))
    opt = AdamW(model.trainable(), model.be)
    with timed_backend(model.be) as profile:
        started = time.perf_counter()
        opt.step(model.backward(model.forward(tokens, tokens)))
        wall = time.perf_counter() - started
    n = model.cfg.n_layers
    assert profile.calls["attention_forward"] == n and profile.calls["attention_backward"] == n
    assert profile.calls["cross_entropy_head"] == 1
    assert profile.calls["swiglu_forward_fused"] == n and "swiglu_forward" not in profile.calls
    assert 0 < profile.total() <= wall
    rows = profile.rows(wall, top=3)
    assert len(rows) == 3 and rows[0]["s"] >= rows[1]["s"] >= rows[2]["s"]
    assert not any(not name.startswith("_") for name in vars(model.be)), "a timer wrapper was left on the backend"
    model.forward(tokens, tokens)
    assert profile.calls["attention_forward"] == n  # no longer counting


def test_bench_speed_profile_prints_the_kernels(capsys):
    assert main(["bench", "speed", "--model", "tiny", "--seq-lens", "16", "--methods", "lars", "--backends", "numpy",
                 "--steps", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"profiled step \(T = 16, lars, numpy\): [0-9.]+ s", out)
    assert "| attention_backward" in out and "% of step" in out


def test_step_flops_counts_the_recomputed_attention():
    """The fast recipe skips one causal attention forward per block: QK^T and PV over
    the T^2/2 causal pairs, 2 FLOPs per multiply-add, each head."""
    from minilars.bench.speed import step_flops

    cfg, t = preset("smollm2-135m"), 2048
    skipped = step_flops(cfg, t, "lars", True) - step_flops(cfg, t, "lars", True, recompute_attention=False)
    assert skipped == cfg.n_layers * 2 * (2 * t * t / 2 * cfg.head_dim) * cfg.n_heads
    # and the recompute itself: every projection but down, again
    rerun = step_flops(cfg, t, "lars", True, recompute_attention=False) - step_flops(cfg, t, "lars", False)
    assert rerun == cfg.n_layers * 2 * t * cfg.dim * (cfg.q_dim + 2 * cfg.kv_dim + cfg.q_dim + 2 * cfg.ffn_dim)


def test_named_storage_recipes():
    from minilars.methods import parse_storage

    default, fast = (StoragePlan.from_mapping(dict(parse_storage(name))) for name in ("default", "fast"))
    assert default.recompute_blocks and not default.keeps_attention_output
    assert fast.recompute_blocks and fast.keeps_attention_output
    assert fast.policy_for("attn.o") == fast.policy_for("input.x") == Half()
    assert parse_storage("exact") == () and parse_storage(None) == parse_storage("default")
    # attn.o alone does not keep anything from the forward when nothing is recomputed
    assert not StoragePlan.from_mapping({"attn.o": "half"}).keeps_attention_output
