"""What the backend conformance tests (test_backend_numba.py, test_backend_torch.py)
share: Hypothesis strategies, random inputs, the tiny model's batch, and the checks
whose bodies do not depend on the backend under test. Each check takes that file's
`both(kernel, *args)` (the kernel on the backend and on numpy) and
`check(actual, reference, name)` (same dtype, then same values within the one
tolerance table)."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from minilars.config import preset

DTYPES = st.sampled_from(["float32", "float64"])
SEEDS = st.integers(0, 2**32 - 1)
CFG = preset("tiny")  # V 97, d 32, 2 layers, H 4, Hkv 2 (GQA 2), f 64


def normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def batch(seed=1, b=2, t=9):
    """Tokens and targets (b, t) for the tiny model, two labels ignored."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (b, t))
    targets = rng.integers(0, CFG.vocab_size, (b, t))
    targets[0, :2] = -100  # ignored labels
    return tokens, targets


def check_rmsnorm(both, check, n, d, dtype, seed):
    """RMSNorm forward (y, rstd) and backward (dx, dw) under a random upstream gradient."""
    rng = np.random.default_rng(seed)
    x, w = normal(rng, (n, d), dtype, 3.0), (1 + normal(rng, (d,), dtype, 0.1)).astype(dtype)
    (y, rstd), (y_ref, rstd_ref) = both("rmsnorm_forward", x, w, 1e-5)
    check(y, y_ref, "y")
    check(rstd, rstd_ref, "rstd")
    dy = normal(rng, (n, d), dtype)
    (dx, dw), (dx_ref, dw_ref) = both("rmsnorm_backward", dy, x, w, rstd_ref)
    check(dx, dx_ref, "dx")
    check(dw, dw_ref, "dw")


def check_kv_cache_decoding(check, model, reference):
    """Prefill 6 tokens into a KV cache, then decode the 7th (attention with q_offset
    = 6): the next-token logits agree."""
    tokens, _ = batch()
    out = []
    for m in (model, reference):
        kv = m.new_kv_cache(batch=2, max_len=16)
        m.logits(tokens[:, :6], kv)
        out.append(m.logits(tokens[:, 6:7], kv, last_only=True))
    check(out[0], out[1], "next-token logits")


def check_cross_entropy_head(both, check, x, head, targets, chunk, need_dx, need_dhead, dtype, softcap=None):
    """The chunked loss with the tied head: loss, valid count, dx and dhead; with a
    soft cap c the logits are c tanh(x head^T / c)."""
    from tolerances import assert_close

    capped = {} if softcap is None else {"softcap": softcap}
    (loss, n_valid, dx, dhead), (loss_ref, n_ref, dx_ref, dhead_ref) = both(
        "cross_entropy_head", x, head, targets, chunk, -100, need_dx, need_dhead, **capped)
    assert isinstance(loss, float) and n_valid == n_ref
    assert_close(np.float64(loss), np.float64(loss_ref), dtype=dtype, name="loss")
    check(dx, dx_ref, "dx")
    check(dhead, dhead_ref, "dhead")


def check_geglu(both, check, n, f, dtype, seed):
    """GeGLU on the fused [g | u]: h, then d[g | u] under a random upstream gradient."""
    rng = np.random.default_rng(seed)
    gate_up, dh = normal(rng, (n, 2 * f), dtype, 3.0), normal(rng, (n, f), dtype)
    check(*both("geglu_forward_fused", gate_up), "h")
    check(*both("geglu_backward_fused", dh, gate_up), "d(gate_up)")


def family_batch(cfg, seed=1, b=2, t=13):
    """Tokens and targets (b, t) for a family's tiny model: t = 13 > the sliding window 8."""
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, cfg.vocab_size, (b, t)), rng.integers(0, cfg.vocab_size, (b, t))
    targets[0, :3] = -100
    return tokens, targets
