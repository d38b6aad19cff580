"""The LARS linear layer for torch (docs/lars.md Part 1): a frozen nn.Linear plus P M.

    y  = x W^T + b + (x P) M       x (..., d_in), W (d_out, d_in), P (d_in, r), M (r, d_out)
    dM = z^T dy                    z = x P (N, r): the only activation kept, never x
    dx = dy W + (dy M^T) P^T

P M is the LoRA update lora_A = P^T, lora_B = M^T at scaling 1 (docs/lars.md Part 1.5), so
a LARS layer equals a peft LoRA layer with A frozen at P^T and B = M^T.

After refresh() (docs/lars.md Part 1.6) the layer also holds a frozen low-rank delta
P_f M_f (P_f (d_in, R_f) the earlier bases, M_f (R_f, d_out) their M), and
    y  = x W^T + b + (x P_f) M_f + (x P) M,   dx = dy W + (dy M_f^T) P_f^T + (dy M^T) P^T
with z = x P still the only activation kept. A float32 or float64 base weight takes
P_f M_f into itself at the refresh (W <- W + (P M)^T, rounding at the weight's own
precision), so the step costs what it did before; a 16-bit one would round the delta
away, so there the two thin products run instead. P_f and M_f are kept either way:
the PEFT export is the whole delta from the original W.

Letters: N tokens (all leading dimensions flattened), d_in, d_out, r the rank.
"""
from __future__ import annotations

import torch
from torch import nn


class LarsLinearFunction(torch.autograd.Function):
    """y = x W^T + b + (x P) M [+ (x P_f) M_f], keeping z = x P for dM = z^T dy (exact for
    every r). P, M (and P_f, M_f) may be float32 while x and W are 16-bit: z and the
    adapter terms are then formed in float32 and cast to y's dtype, as peft casts
    LoRA's input. folded_basis, folded_m: the frozen delta of refresh(), or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, basis, m, folded_basis=None, folded_m=None):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in): leading dimensions flattened (a copy only if x is strided)
        xa = x2.to(basis.dtype)  # in the adapter's dtype (x2 itself when they agree)
        z = xa @ basis  # (N, r)
        y = nn.functional.linear(x2, weight, bias)  # (N, d_out)
        _add_low_rank_(y, z, m)  # y += z M
        if folded_basis is not None:
            _add_low_rank_(y, xa @ folded_basis, folded_m)  # y += (x P_f) M_f, not kept
        ctx.save_for_backward(z, weight, basis, m, folded_basis, folded_m)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        z, weight, basis, m, folded_basis, folded_m = ctx.saved_tensors
        # (N, d_out) in rows: a gradient that arrives strided (through attention's head
        # transpose) is copied once here, not multiplied as a batch of broadcast weights
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dm = None
        dya = dy2.to(m.dtype)  # in the adapter's dtype (dy2 itself when they agree)
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight  # (N, d_in)
            _add_low_rank_(dx, dya @ m.T, basis.T)  # dx += (dy M^T) P^T
            if folded_basis is not None:
                _add_low_rank_(dx, dya @ folded_m.T, folded_basis.T)  # dx += (dy M_f^T) P_f^T
            dx = dx.reshape(*dy.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[4]:
            dm = z.T @ dya  # (r, d_out)
        return dx, None, None, None, dm, None, None


def _add_low_rank_(out, a, b):
    """out += a b in place: (N, k) (k, d) in the factors' dtype, cast to out's if it differs."""
    if b.dtype == out.dtype:
        out.addmm_(a, b)  # in one call
    else:
        out += (a @ b).to(out.dtype)


class LarsLinear(nn.Module):
    """A frozen nn.Linear (`base_layer`) with a LARS update: basis `lars_P` (d_in, r),
    a buffer shared by the stream's projections, and trainable `lars_M` (r, d_out),
    zero at start, so the model starts exactly at the base model. After refresh(),
    the frozen `lars_P_folded` (d_in, R_f; shared by the stream too) and
    `lars_M_folded` (R_f, d_out) hold what earlier bases learned."""

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
        self.register_buffer("lars_P_folded", None)  # (d_in, R_f) after refresh()
        self.register_buffer("lars_M_folded", None)  # (R_f, d_out) after refresh()
        self.folded_in_weight = False  # whether base_layer.weight already holds (P_f M_f)^T

    @property
    def r(self) -> int:
        return self.lars_P.shape[1]

    def forward(self, x):
        if self.base_layer.weight.requires_grad:
            raise RuntimeError("LarsLinear: the base weight requires grad, but LARS keeps only z = x P, which "
                               "cannot form its gradient; freeze it or do not target this layer")
        folded = (None, None) if self.folded_in_weight else (self.lars_P_folded, self.lars_M_folded)
        return LarsLinearFunction.apply(x, self.base_layer.weight, self.base_layer.bias, self.lars_P, self.lars_M,
                                        *folded)

    @torch.no_grad()
    def refresh(self, basis: torch.Tensor, folded_basis: torch.Tensor, into_weight: bool | None = None) -> None:
        """docs/lars.md Part 1.6: M_f <- [M_f; M], P_f <- folded_basis (= [P_f P], built
        once per stream by LarsModel.refresh), P <- basis (d_in, r), M <- 0 in place (an
        optimizer holds it). The layer's output is unchanged. into_weight: add P M into
        the base weight as well, so forward skips the P_f M_f term (default: when the
        weight is float32 or wider; a first refresh decides for the later ones)."""
        if basis.shape != self.lars_P.shape:
            raise ValueError(f"a refreshed basis must have shape {tuple(self.lars_P.shape)}, got {tuple(basis.shape)}")
        if into_weight is None:
            into_weight = self.folded_in_weight or (
                self.lars_P_folded is None and self.base_layer.weight.dtype.itemsize >= 4)
        if into_weight != self.folded_in_weight and self.lars_P_folded is not None:
            raise ValueError("a layer keeps its folded delta one way: in the weight or beside it")
        if into_weight:
            self.base_layer.weight += self._pending_delta()  # (P M)^T: the weight held P_f M_f already, or none
        self.folded_in_weight = into_weight
        m = self.lars_M.detach().clone()
        self.lars_M_folded = m if self.lars_M_folded is None else torch.cat([self.lars_M_folded, m])
        self.lars_P_folded = folded_basis
        self.lars_P = basis.to(self.lars_P)
        self.lars_M.zero_()

    def stacked_basis(self) -> torch.Tensor:
        """[P_f P] (d_in, R_f + r): every basis this layer has had (P before refresh())."""
        return self.lars_P if self.lars_P_folded is None else torch.cat([self.lars_P_folded, self.lars_P], 1)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([P_f P] (d_in, R_f + r), [M_f; M] (R_f + r, d_out)): the whole update as one
        low-rank product (P and M before refresh())."""
        m = self.lars_M.detach()
        return self.stacked_basis(), (m if self.lars_M_folded is None else torch.cat([self.lars_M_folded, m]))

    def delta_weight(self) -> torch.Tensor:
        """(P_f M_f + P M)^T (d_out, d_in), in the base weight's dtype: the whole update
        from the original W (what merge() adds, unless refresh() put P_f M_f there)."""
        basis, m = self.stacked()
        return (basis @ m).T.to(self.base_layer.weight.dtype)

    def _pending_delta(self) -> torch.Tensor:
        """What base_layer.weight does not hold yet: (P M)^T where refresh() put P_f M_f
        there, else the whole delta_weight()."""
        if self.folded_in_weight:
            return (self.lars_P @ self.lars_M).T.to(self.base_layer.weight.dtype)
        return self.delta_weight()

    def lora_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A (R, d_in), lora_B (d_out, R)) = ([P_f P]^T, [M_f; M]^T): the LoRA this
        layer equals, of rank R = r before refresh(), R_f + r after."""
        basis, m = self.stacked()
        return basis.T.contiguous(), m.T.contiguous()

    def merge(self) -> nn.Linear:
        """The base layer with the update folded into its weight (W + (P_f M_f + P M)^T;
        P M alone where refresh() put P_f M_f there already)."""
        with torch.no_grad():
            self.base_layer.weight += self._pending_delta()
        return self.base_layer

    def extra_repr(self) -> str:
        folded = "" if self.lars_P_folded is None else (
            f", folded={self.lars_P_folded.shape[1]}{' (in the weight)' if self.folded_in_weight else ''}")
        return f"r={self.r}{folded}"
