"""A decoder layer's MLP run in token chunks, so that one chunk's (chunk, f)
intermediates exist at a time instead of the whole (T, f) ones.

The MLP of a transformers causal LM is token-wise: row t of mlp(x) depends on row t
of x only (the gated MLP  down(act(gate(x)) * up(x)),  and top-k routed mixtures of
such MLPs). So for any split of the T rows into chunks c,

    y_c  = mlp(x_c)                        x_c (..., c, d) -> y_c (..., c, d)
    dx_c = (d y_c / d x_c)^T dy_c          from the chunk alone
    dM   = sum_c z_c^T dy'_c               each LARS linear's dM, summed over chunks

which is the unchunked result up to the order of the sums. _TokenChunked keeps only
x (..., T, d) and recomputes each chunk in backward, backpropagating it before the
next: at most one chunk's (c, f) tensors are alive.

Inside a layer rerun in backward (recompute.py) the MLP would then run three times
(the forward, the layer's rerun, each chunk's rerun) where gradient checkpointing
runs it twice. Its output's values are needed in the layer's rerun only when an op
after it keeps tensors for backward (a norm of the output, as Gemma 2's
post_feedforward_layernorm); a residual add keeps none. The first rerun of each
layer watches what is saved after its MLP returns (a saved-tensors hook); when
nothing is, later reruns give the MLP's place a zero tensor of its output's shape
instead of computing it, and the chunks' own reruns in backward stay exact.

A module that mixes tokens (a token shift as RWKV's feed_forward has,
capacity-limited routing) must not be chunked: set LarsConfig.mlp_chunk_tokens=None
for such a model.
"""
from __future__ import annotations

import contextlib
import types

import torch

from .replay import ForwardState

MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")


def find_mlp(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The layer's token-wise MLP submodule: its first attribute named in MLP_NAMES
    that is a module; None when it has none or it shifts tokens (a `time_shift`, RWKV)."""
    for name in MLP_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, torch.nn.Module):
            return None if hasattr(module, "time_shift") else module
    return None


class _NotATensor(Exception):
    """The module returned something else than one tensor: it is run whole."""


def _spans(tokens: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, tokens)) for s in range(0, tokens, chunk)]


def _run_chunks(run, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """cat_c run(x_c) along the token axis (-2)."""
    outs = []
    for s, e in _spans(x.shape[-2], chunk):
        y = run(x[..., s:e, :])
        if not isinstance(y, torch.Tensor):
            raise _NotATensor
        outs.append(y)
    return torch.cat(outs, dim=-2)


class _TokenChunked(torch.autograd.Function):
    """y = cat_c run(x_c), keeping x and the RNG state only; backward restores the
    RNG state, reruns the chunks in the forward's order (so dropout draws the same)
    and backpropagates each before the next. Returns dx and the gradients of
    `params` (the MLP's trainable parameters, summed over the chunks). With
    `zeros_like` (width, dtype) given, the forward returns zeros of y's shape instead
    of computing y: a layer rerun whose later ops keep nothing of y (see the top)."""

    @staticmethod
    def forward(ctx, run, chunk, zeros_like, x, *params):
        ctx.save_for_backward(x)
        ctx.run, ctx.chunk, ctx.params = run, chunk, params
        ctx.state = ForwardState(x)
        if zeros_like is not None:
            width, dtype = zeros_like
            return x.new_zeros((*x.shape[:-1], width), dtype=dtype)
        return _run_chunks(run, x, chunk)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        params = [p for p, need in zip(ctx.params, need_params) if need]
        dx = torch.empty_like(x) if need_x else None
        dparams = [None] * len(params)
        with ctx.state.rng():  # one replay for all chunks: they draw in the forward's order
            for s, e in _spans(x.shape[-2], ctx.chunk):
                xc = x[..., s:e, :].detach().requires_grad_(need_x)
                with ctx.state.rerun():
                    yc = ctx.run(xc)  # (..., c, d): this chunk's (c, f) tensors live until its grad is taken
                inputs = ([xc] if need_x else []) + params
                grads = list(torch.autograd.grad(yc, inputs, dy[..., s:e, :], allow_unused=True))
                if need_x:
                    dx[..., s:e, :] = grads.pop(0)
                dparams = [g if acc is None else acc if g is None else acc + g for acc, g in zip(dparams, grads)]
                del yc, grads
        out = iter(dparams)
        return (None, None, None, dx, *[next(out) if need else None for need in need_params])


def chunked_forward(module: torch.nn.Module, run, chunk: int, x, *args, values_unused: bool = False, **kwargs):
    """module's forward on x in chunks of `chunk` tokens: plain when x is not one
    (..., T, d) tensor with T > chunk, when other arguments are passed, or when the
    module once returned something other than one tensor. values_unused: the caller
    reads only the graph of the output, not its values (a layer rerun, see the top)."""
    if (args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2] <= chunk
            or getattr(module, "_lars_whole", False)):
        return run(x, *args, **kwargs)
    params = [p for p in module.parameters() if p.requires_grad]
    try:
        if torch.is_grad_enabled() and (x.requires_grad or params):
            zeros_like = getattr(module, "_lars_output", None) if values_unused else None
            y = _TokenChunked.apply(run, chunk, zeros_like, x, *params)
            module._lars_output = (y.shape[-1], y.dtype)  # noqa: SLF001
            return y
        return _run_chunks(run, x, chunk)
    except _NotATensor:
        module._lars_whole = True  # noqa: SLF001 (a tuple-returning MoE block: never chunk it again)
        return run(x)


@contextlib.contextmanager
def mlp_in_chunks(layer: torch.nn.Module, chunk: int | None, rerun: bool = False):
    """Within the block, the layer's MLP (find_mlp) runs through chunked_forward;
    nothing changes when chunk is None or the layer has no MLP found. rerun: the
    block is the layer's rerun in backward; the first one records whether any
    tensor is saved after the MLP returns (mlp._lars_values_unused), later ones
    skip the MLP's values when none was."""
    mlp = find_mlp(layer) if chunk is not None else None
    if mlp is None:
        yield
        return
    own = mlp.__dict__.get("forward")  # an instance-level forward (a hook library's) is kept and restored
    run = mlp.forward
    watch = rerun and not hasattr(mlp, "_lars_values_unused")
    unused = rerun and getattr(mlp, "_lars_values_unused", False)
    seen = {"calls": 0, "saved_after": 0}

    def forward(self, x, *a, **k):
        y = chunked_forward(self, run, chunk, x, *a, values_unused=unused, **k)
        seen["calls"] += 1
        return y

    def pack(t):
        seen["saved_after"] += seen["calls"] > 0
        return t

    mlp.forward = types.MethodType(forward, mlp)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if watch else contextlib.nullcontext():
            yield
        if watch:
            mlp._lars_values_unused = seen["calls"] == 1 and seen["saved_after"] == 0  # noqa: SLF001
    finally:
        if own is None:
            mlp.__dict__.pop("forward", None)
        else:
            mlp.forward = own
