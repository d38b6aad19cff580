"""Linear sites: the fused projections of one input stream, and what trains there.

A transformer block has four input streams (docs/lars.md): the normed attention input
read by q, k and v ("attn_in"), the attention output read by o ("attn_out"), the
normed MLP input read by gate and up ("mlp_in") and the SwiGLU output read by down
("mlp_out"). Each is one site y = x W with W (d_in, d_out) the concatenation of its
projections, so one matmul serves q, k and v, and an adapter on a stream keeps one
copy of what it needs.

A site is built from a frozen weight (`from_linear`) and folds back into a plain
weight (`to_linear`). Subclasses: FrozenSite (nothing trains, nothing is kept),
FullSite (W trains, x is kept); minilars/adapters.py adds LoRA, IA3 and LARS.

A stream may carry a bias b (d_out,) (Qwen2's q, k, v): every site computes the
affine map y = x W + b, with b shared with the model's parameters. It trains only
under FullSite; the adapters leave it frozen, as PEFT does with bias="none", and
fold into it only where they scale it (IA3 on an output: merged_bias).

Letters: N tokens, d_in, d_out, r rank.
"""
from __future__ import annotations

from .backends import Array, Backend
from .backends.base import is_quantized
from .ops import LinearCache, bias_backward, bias_forward, linear_backward, linear_forward


def dense_weight(weight: Array, be: Backend) -> Array:
    """The weight as a float array: a weight kept as GGUF blocks (minilars/quant.py)
    dequantised whole, by the backend's tile decoder. Only folding an adapter into
    its weight for export needs this; a training step multiplies by the blocks."""
    if is_quantized(weight):
        return be.asarray(weight.dequantize(be.decode_tile))
    return weight


class LinearSite:
    """y = x W (+ b) for one stream; `outputs` names the projections in W's columns."""

    method = "abstract"

    def __init__(self, weight: Array, outputs: dict[str, int], bias: Array | None = None):
        if sum(outputs.values()) != weight.shape[1]:
            raise ValueError(f"outputs {outputs} do not add up to the weight's {weight.shape[1]} columns")
        if bias is not None and tuple(bias.shape) != (weight.shape[1],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, the weight's outputs need ({weight.shape[1]},)")
        self.weight = weight  # W (d_in, d_out), shared with the model's params
        self.bias = bias  # b (d_out,) or None, shared with the model's params
        self.outputs = dict(outputs)
        self.slices: dict[str, slice] = {}
        start = 0
        for name, width in outputs.items():
            self.slices[name] = slice(start, start + width)
            start += width

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    def trainable(self) -> dict[str, Array]:
        """Trainable arrays by local name (updated in place by the optimizer)."""
        return {}

    def forward(self, x: Array, be: Backend) -> tuple[Array, object | None]:
        raise NotImplementedError

    def backward(self, dy: Array, cache, be: Backend, need_dx: bool = True) -> tuple[Array | None, dict[str, Array]]:
        raise NotImplementedError

    def _affine(self, x: Array, be: Backend, weight: Array | None = None) -> Array:
        """x W + b (the bias only where the stream has one): (N, d_in) -> (N, d_out).
        `weight` replaces W (an adapter's merged W_eff)."""
        y = be.matmul(x, self.weight if weight is None else weight)
        return y if self.bias is None else bias_forward(y, self.bias, be)

    def apply(self, x: Array, be: Backend) -> Array:
        """y = forward(x)[0], for a forward that keeps nothing (inference, and the first
        pass of a recomputed block). Subclasses whose cache costs work that y does not
        need override this to skip it."""
        return self.forward(x, be)[0]

    def backward_cache(self, x: Array, be: Backend):
        """The cache forward(x) would keep, without forming y (a recomputed block's
        last projection, whose output backward never reads). Subclasses whose cache
        does not need y override this to skip the frozen product."""
        return self.forward(x, be)[1]

    def to_linear(self, be: Backend) -> Array:
        """The plain weight this site computes with (adapter merged in)."""
        return self.weight

    def merged_bias(self, be: Backend) -> Array | None:
        """The bias of the plain affine map this site computes (adapter merged in):
        y = x to_linear() + merged_bias()."""
        return self.bias


class FrozenSite(LinearSite):
    """W frozen: backward needs dx = dy W^T only, so nothing is kept."""

    method = "frozen"

    def forward(self, x, be):
        return self._affine(x, be), None

    def backward(self, dy, cache, be, need_dx=True):
        dx, _ = linear_backward(dy, None, self.weight, be, need_dx)
        return dx, {}

    def backward_cache(self, x, be):
        return None


class FullSite(LinearSite):
    """W (and b) train: dW = x^T dy needs the input x (N, d_in) kept; db = sum_n dy_n."""

    method = "full"

    def trainable(self):
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}

    def forward(self, x, be):
        y, cache = linear_forward(x, self.weight, be, keep_input=True)
        return (y if self.bias is None else bias_forward(y, self.bias, be)), cache

    def backward(self, dy, cache: LinearCache, be, need_dx=True):
        dx, dw = linear_backward(dy, cache, self.weight, be, need_dx)
        if self.bias is None:
            return dx, {"weight": dw}
        return dx, {"weight": dw, "bias": bias_backward(dy, be)}

    def backward_cache(self, x, be):
        return LinearCache(x)
