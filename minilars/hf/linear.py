"""The LARS linear layer for torch (docs/lars.md Part 1): a frozen nn.Linear plus P M.

    y  = x W^T + b + (x P) M       x (..., d_in), W (d_out, d_in), P (d_in, r), M (r, d_out)
    dM = z^T dy                    z = x P (N, r): the only activation kept, never x
    dx = dy W + (dy M^T) P^T

P M is the LoRA update lora_A = P^T, lora_B = M^T at scaling 1 (docs/lars.md Part 1.5), so
a LARS layer equals a peft LoRA layer with A frozen at P^T and B = M^T.

Letters: N tokens (all leading dimensions flattened), d_in, d_out, r the rank.
"""
from __future__ import annotations

import torch
from torch import nn


class LarsLinearFunction(torch.autograd.Function):
    """y = x W^T + b + (x P) M, keeping z = x P for dM = z^T dy (exact for every r).
    P and M may be float32 while x and W are 16-bit: z and the adapter term are then
    formed in float32 and the term is cast to y's dtype, as peft casts LoRA's input."""

    @staticmethod
    def forward(ctx, x, weight, bias, basis, m):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in): leading dimensions flattened (a copy only if x is strided)
        z = x2.to(basis.dtype) @ basis  # (N, r)
        y = nn.functional.linear(x2, weight, bias)  # (N, d_out)
        if m.dtype == y.dtype:
            y.addmm_(z, m)  # y += z M, in one call
        else:
            y += (z @ m).to(y.dtype)
        ctx.save_for_backward(z, weight, basis, m)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        z, weight, basis, m = ctx.saved_tensors
        # (N, d_out) in rows: a gradient that arrives strided (through attention's head
        # transpose) is copied once here, not multiplied as a batch of broadcast weights
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dm = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight  # (N, d_in)
            dz = dy2.to(m.dtype) @ m.T  # (N, r)
            if basis.dtype == dx.dtype:
                dx.addmm_(dz, basis.T)  # dx += (dy M^T) P^T
            else:
                dx += (dz @ basis.T).to(dx.dtype)
            dx = dx.reshape(*dy.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[4]:
            dm = z.T @ dy2.to(m.dtype)  # (r, d_out)
        return dx, None, None, None, dm


class LarsLinear(nn.Module):
    """A frozen nn.Linear (`base_layer`) with a LARS update: basis `lars_P` (d_in, r),
    a buffer shared by the stream's projections, and trainable `lars_M` (r, d_out),
    zero at start, so the model starts exactly at the base model."""

    def __init__(self, base_layer: nn.Linear, basis: torch.Tensor, adapter_dtype: torch.dtype):
        super().__init__()
        if basis.shape[0] != base_layer.in_features:
            raise ValueError(f"basis has {basis.shape[0]} rows, the layer {base_layer.in_features} inputs")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        device = base_layer.weight.device
        self.register_buffer("lars_P", basis.to(device=device, dtype=adapter_dtype))  # (d_in, r)
        self.lars_M = nn.Parameter(torch.zeros(basis.shape[1], base_layer.out_features, dtype=adapter_dtype,
                                               device=device))  # (r, d_out)

    @property
    def r(self) -> int:
        return self.lars_P.shape[1]

    def forward(self, x):
        if self.base_layer.weight.requires_grad:
            raise RuntimeError("LarsLinear: the base weight requires grad, but LARS keeps only z = x P, which "
                               "cannot form its gradient; freeze it or do not target this layer")
        return LarsLinearFunction.apply(x, self.base_layer.weight, self.base_layer.bias, self.lars_P, self.lars_M)

    def delta_weight(self) -> torch.Tensor:
        """(P M)^T (d_out, d_in), in the base weight's dtype: what merging adds to W."""
        return (self.lars_P @ self.lars_M).T.to(self.base_layer.weight.dtype)

    def lora_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A (r, d_in), lora_B (d_out, r)) = (P^T, M^T): the LoRA this layer equals."""
        return self.lars_P.T.contiguous(), self.lars_M.detach().T.contiguous()

    def merge(self) -> nn.Linear:
        """The base layer with P M folded into its weight (W + (P M)^T)."""
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}"
