"""The frozen path as the engine's default recipe stores it (docs/lars.md,
`block=recompute, input.x=half`): each decoder layer keeps only its input, in
float16, and reruns its forward in backward, so one layer's activations exist at a
time and what is kept grows by d halves per token per layer.

torch.utils.checkpoint keeps the layer input as it is (float32); rounding it before
the checkpoint would change the forward too. Here the forward runs on the exact
input and only the kept copy is rounded: backward sees x rounded to float16, as the
engine's `half` policy does (a relative gradient error near 1e-3, docs/lars.md).
"""
from __future__ import annotations

import types

import torch

from .replay import ForwardState
from .tokenwise import mlp_in_chunks

KEEP_DTYPE = {"half": torch.float16, "exact": None}


def split_hidden(args: tuple, kwargs: dict):
    """(hidden, rebuild) for a decoder layer's call: hidden is its first positional
    argument (or `hidden_states=`); rebuild(h) gives back (args, kwargs) with h in
    its place."""
    if args:  # the closure holds args[1:] only, never the hidden state itself
        rest_args = args[1:]
        return args[0], lambda h: ((h, *rest_args), kwargs)
    if "hidden_states" in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], lambda h: (args, {**rest, "hidden_states": h})
    raise TypeError("decoder layer called without a hidden-state argument")


class _Recomputed(torch.autograd.Function):
    """out = run(hidden), keeping only `hidden` cast to keep_dtype (and the RNG state);
    backward reruns run() on the kept input with autograd on and returns d hidden and
    the gradients of `params` (the layer's trainable parameters, inputs here so that the
    output requires grad even when hidden does not)."""

    @staticmethod
    def forward(ctx, run, keep_dtype, hidden, *params):
        kept = hidden.detach() if keep_dtype is None or hidden.dtype.itemsize <= 2 else hidden.detach().to(keep_dtype)
        if kept is not hidden and not torch.isfinite(kept).all():
            kept = hidden.detach()  # beyond float16's range: keep it exact rather than inf
        ctx.save_for_backward(kept)
        ctx.run, ctx.dtype = run, hidden.dtype
        ctx.params = params  # leaf parameters, not activations: held by reference
        ctx.state = ForwardState(hidden)
        return run(hidden)

    @staticmethod
    def backward(ctx, dout):
        (kept,) = ctx.saved_tensors
        params = ctx.params
        x = kept.to(ctx.dtype).requires_grad_(ctx.needs_input_grad[2])
        with ctx.state.rng(), ctx.state.rerun():
            out = ctx.run(x)
        inputs = ([x] if x.requires_grad else []) + [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        grads = list(torch.autograd.grad(out, inputs, dout, allow_unused=True)) if inputs else []
        dx = grads.pop(0) if x.requires_grad else None
        dparams = [grads.pop(0) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, dx, *dparams)


def recomputed_forward(layer: torch.nn.Module, keep_dtype, mlp_chunk: int | None, *args, **kwargs):
    """The layer's forward under the recompute policy: plain when nothing needs a
    gradient (inference, calibration), recomputed otherwise, its MLP then run in
    chunks of mlp_chunk tokens (tokenwise.py; None: whole) in the forward and in the
    recompute."""
    forward = type(layer).forward.__get__(layer)
    params = [p for p in layer.parameters() if p.requires_grad]
    hidden, rebuild = split_hidden(args, kwargs)
    if not torch.is_grad_enabled() or not (params or hidden.requires_grad):
        return forward(*args, **kwargs)
    outputs = {}

    def run(h):  # the layer on a given input; its first output is the hidden state
        a, k = rebuild(h)
        with mlp_in_chunks(layer, mlp_chunk):
            out = forward(*a, **k)
        outputs["rest"] = out[1:] if isinstance(out, tuple) else None
        return out[0] if isinstance(out, tuple) else out

    result = _Recomputed.apply(run, keep_dtype, hidden, *params)
    rest = outputs.pop("rest")
    return result if rest is None else (result, *rest)


def enable_recompute(layer: torch.nn.Module, layer_storage: str, mlp_chunk: int | None = None) -> None:
    """Route the layer's forward through recomputed_forward (undone by disable_recompute)."""
    keep = KEEP_DTYPE[layer_storage]
    layer.forward = types.MethodType(lambda self, *a, **k: recomputed_forward(self, keep, mlp_chunk, *a, **k), layer)


def disable_recompute(layer: torch.nn.Module) -> None:
    layer.__dict__.pop("forward", None)
