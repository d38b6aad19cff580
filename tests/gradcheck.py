"""Finite-difference gradient checks (CS231n style), float64, random upstream gradient.

check_gradients(f, inputs, grads_of) contracts the op's output with a random
upstream gradient G, L(inputs) = sum(f(inputs) * G), and compares the analytic
gradient dL/dX against centred differences (L(X + hD) - L(X - hD)) / 2h along random
directions D for every input X: a backward that drops a term, or returns zeros,
fails unless it is right along every direction."""
from __future__ import annotations

import numpy as np

from tolerances import FINITE_DIFFERENCE


def directional_fd(loss, x: np.ndarray, direction: np.ndarray, h: float = 1e-6) -> float:
    x += h * direction
    up = loss()
    x -= 2 * h * direction
    down = loss()
    x += h * direction
    return (up - down) / (2 * h)


def check_gradients(loss, analytic: dict[str, np.ndarray], inputs: dict[str, np.ndarray], rng,
                    n_directions: int = 3) -> None:
    """loss() reads the arrays in `inputs` (mutated in place and restored);
    analytic[name] is the claimed dL/d(inputs[name])."""
    atol, rtol = FINITE_DIFFERENCE
    for name, x in inputs.items():
        assert x.dtype == np.float64, f"{name}: finite differences need float64"
        grad = np.asarray(analytic[name])
        assert grad.shape == x.shape, f"{name}: gradient shape {grad.shape} != input shape {x.shape}"
        for _ in range(n_directions):
            direction = rng.standard_normal(x.shape)
            numeric = directional_fd(loss, x, direction)
            claimed = float(np.sum(grad * direction))
            scale = max(1.0, abs(numeric))
            assert abs(numeric - claimed) <= atol * scale + rtol * abs(numeric), (
                f"d/d{name}: finite difference {numeric:.10g} vs backward {claimed:.10g}")


def autograd(formula, inputs: dict[str, np.ndarray], upstream: np.ndarray, constants: dict | None = None
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The torch autograd reference of an op: y = formula(**tensors, **constants) with
    every array of `inputs` a float64 leaf tensor, then backward of sum(y * upstream).
    Returns (y, {name: dL/d(input)}) as numpy. Needs torch (callers importorskip it)."""
    import torch

    leaves = {name: torch.tensor(x, dtype=torch.float64, requires_grad=True) for name, x in inputs.items()}
    y = formula(**leaves, **(constants or {}))
    (y * torch.as_tensor(upstream, dtype=torch.float64)).sum().backward()
    return y.detach().numpy(), {name: t.grad.numpy() for name, t in leaves.items()}
