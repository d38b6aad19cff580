"""The one tolerance table, keyed by dtype: |a - ref| <= atol + rtol * |ref|.

Every comparison in the tests goes through assert_close, which checks shape and
dtype before values."""
from __future__ import annotations

import numpy as np

TOLERANCES = {
    # dtype: (atol, rtol)
    "float64": (1e-9, 1e-7),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
# centred finite differences in float64 with step 1e-6: truncation ~ h^2, rounding ~ eps/h
FINITE_DIFFERENCE = (1e-6, 1e-5)


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def assert_close(actual, reference, dtype: str | None = None, tol: tuple[float, float] | None = None,
                 name: str = "") -> None:
    actual, reference = to_numpy(actual), to_numpy(reference)
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != {reference.shape}"
    dtype = dtype or str(reference.dtype)
    atol, rtol = tol or TOLERANCES[dtype]
    err = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    bound = atol + rtol * np.abs(reference.astype(np.float64))
    worst = np.argmax(err - bound) if err.size else 0
    assert np.all(err <= bound), (
        f"{name}: max excess at {np.unravel_index(worst, err.shape)}: |{actual.flat[worst]} - "
        f"{reference.flat[worst]}| = {err.flat[worst]:.3g} > {bound.flat[worst]:.3g} ({dtype})")
