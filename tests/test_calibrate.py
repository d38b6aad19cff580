"""LARS calibration on padded rows: only the real tokens shape the bases.

A row padded to T holds its example, then repeats of the pad token, which carry no
loss. calibrate(..., token_mask) must build each basis from the kept positions
alone, and with causal attention those positions do not see the padding, so a
padded row masked to its example gives the bases of the example by itself.
"""
from __future__ import annotations

import numpy as np
import pytest

from minilars.calibrate import calibrate
from minilars.config import ModelConfig
from minilars.data import char_tokenizer, make_rows, parse_record, tokenize
from minilars.methods import MethodConfig, apply_method
from minilars.model import Model

TINY = ModelConfig(vocab_size=97, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=64)
RANK = 3


def projector(basis):
    return basis @ basis.T


def bases(tokens, mask=None):
    model = Model.random(TINY, seed=1, dtype=np.float64, attention_tile=4)
    streams, _ = calibrate(model, tokens, RANK, seed=0, token_mask=mask)
    return streams


def test_masked_padded_row_gives_the_bases_of_the_example_alone():
    rng = np.random.default_rng(0)
    n, t, pad = 11, 20, 0
    example = rng.integers(1, TINY.vocab_size, (1, n))
    padded = np.concatenate([example, np.full((1, t - n), pad)], axis=1)
    mask = np.arange(t)[None, :] < n
    alone, masked, unmasked = bases(example), bases(padded, mask), bases(padded)
    assert alone.keys() == masked.keys() and len(alone) == 4 * TINY.n_layers
    for key in alone:
        # the same subspace (a basis is defined up to rotation): compare projectors
        np.testing.assert_allclose(projector(masked[key]), projector(alone[key]), atol=1e-8, err_msg=key)
    # without the mask the 9 pad positions pull the bases elsewhere
    moved = [np.abs(projector(unmasked[k]) - projector(alone[k])).max() for k in alone]
    assert max(moved) > 1e-2


def test_mask_must_match_the_tokens_and_keep_something():
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 6))
    with pytest.raises(ValueError, match="shape"):
        bases(tokens, np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="keeps no token"):
        bases(tokens, np.zeros((2, 6), bool))
    keep_all = bases(tokens, np.ones((2, 6), bool))
    for key, basis in bases(tokens).items():
        np.testing.assert_array_equal(keep_all[key], basis)


def test_rows_mark_real_tokens_and_apply_method_passes_the_mask():
    tok = char_tokenizer(TINY.vocab_size)
    examples = [tokenize(parse_record({"prompt": "ab", "completion": "c" * k}, f"f:{k}"), tok) for k in (1, 4)]
    rows = make_rows(examples, seq_len=40, pad_id=0, packing="pad")
    for r, ex in enumerate(examples):
        assert rows.real[r].tolist() == [True] * len(ex.ids) + [False] * (40 - len(ex.ids))
    model = Model.random(TINY, seed=1, dtype=np.float64, attention_tile=4)
    apply_method(model, MethodConfig("lars", rank=RANK), rows.tokens, rows.real)
    expected, _ = calibrate(Model.random(TINY, seed=1, dtype=np.float64, attention_tile=4), rows.tokens, RANK,
                            seed=0, token_mask=rows.real)
    p = model.sites[0]["attn_in"].basis
    np.testing.assert_allclose(projector(p), projector(expected["blocks.0.attn_in"]), atol=1e-10)


def test_basis_overlap_script_compares_two_calibrations(tmp_path, capsys):
    """benchmarks/basis_overlap.py: one file against itself gives the same bases
    (overlap 1, equal captured energy); against other text, less than 1."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "basis_overlap", Path(__file__).resolve().parents[1] / "benchmarks" / "basis_overlap.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"prompt": "Where is the key?", "completion": "Under the blue pot by the door."}) + "\n")
    b.write_text(json.dumps({"text": "hello world, " * 40}) + "\n")

    def table(other: Path, seq_len: int) -> dict[str, list[float]]:
        assert script.main(["--model", "tiny", "--backend", "numpy", "--a", str(a), "--a-seq-len", "128",
                            "--b", str(other), "--b-seq-len", str(seq_len), "--rows", "1", "--rank", "4"]) == 0
        rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()
                if line.startswith("| attn") or line.startswith("| mlp")]
        return {cells[0].strip(): [float(c.split()[0]) for c in cells[2:]] for cells in rows}

    same = table(a, 128)
    assert set(same) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    for overlap, by_a, by_b in same.values():
        assert overlap == pytest.approx(1.0, abs=1e-3) and by_a == pytest.approx(by_b, abs=1e-3)
    other = table(b, 256)
    assert all(overlap < 0.9 and by_a < by_b for overlap, by_a, by_b in other.values())
