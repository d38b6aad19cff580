"""Calibration for torch models: each input stream's basis P, by the engine's algorithm.

As `minilars.calibrate` does for the engine (docs/lars.md Part 1.1): one no-grad pass
over the calibration tokens, decoder layer by decoder layer; while layer i runs, the
inputs of its target projections are captured, grouped into streams (projections
that read the same tensor share one basis: q/k/v, gate/up; o and down each read
their own) and turned into P (d_in, r) by the same randomized range finder
(`NumpyBackend.orthonormal_range`, seed + i), then dropped before layer i+1 runs.
Padding (attention_mask == 0) is left out, as `calibrate(..., token_mask=...)` does.

A first pass records each layer's call (its arguments besides the hidden state:
masks, rotary tables, which differ between layer types in some models) and layer
0's input; the second runs the layers one at a time on those inputs. A model without
a list of decoder layers is calibrated in one pass that captures every stream at once.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..backends.numpy_backend import NumpyBackend
from .recompute import split_hidden


def calibration_batches(calibration) -> list[dict]:
    """[{"input_ids": (B, T) LongTensor, "attention_mask": optional (B, T)}] from a
    LongTensor (B, T) or (T,), or an iterable of such tensors or of dicts with input_ids."""
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(f"calibration must be a LongTensor of token ids or an iterable of batches, "
                        f"got {type(calibration).__name__}")
    batches = []
    for item in calibration:
        batch = dict(item) if isinstance(item, dict) else {"input_ids": item}
        if "input_ids" not in batch:
            raise ValueError("a calibration batch given as a dict needs 'input_ids'")
        ids = torch.as_tensor(batch["input_ids"])
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"calibration input_ids must be integer token ids, got {ids.dtype}")
        ids = ids.long()[None] if ids.dim() == 1 else ids.long()
        out = {"input_ids": ids}
        if batch.get("attention_mask") is not None:
            out["attention_mask"] = torch.as_tensor(batch["attention_mask"])
        batches.append(out)
    if not batches:
        raise ValueError("calibration has no batch")
    return batches


def orthonormal_basis(inputs: list[torch.Tensor], rank: int, seed: int) -> torch.Tensor:
    """P (d_in, r): the top-r directions of the rows of `inputs` (each (N_i, d_in)),
    by the engine's randomized range finder on the CPU in float32 (float64 stays)."""
    x = torch.cat([t.detach().reshape(-1, t.shape[-1]) for t in inputs])  # (N, d_in)
    if x.shape[0] < rank:
        raise ValueError(f"calibration has {x.shape[0]} tokens for a stream of width {x.shape[1]}, fewer than "
                         f"r = {rank}; give more calibration tokens")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    basis = NumpyBackend().orthonormal_range(x.to("cpu", dtype).numpy(), rank, seed=seed)
    return torch.from_numpy(np.ascontiguousarray(basis))


def _kept_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, d_in) at the positions mask (B, T) keeps -> (N_kept, d_in)."""
    if mask is None or x.shape[:-1] != mask.shape:
        return x.reshape(-1, x.shape[-1])
    return x[mask.to(x.device).bool()]


def _streams(seen: dict[str, list[torch.Tensor]]) -> list[list[str]]:
    """Group module names by the tensor they read at their first call: one stream each."""
    groups: dict[int, list[str]] = {}
    for name, inputs in seen.items():
        groups.setdefault(id(inputs[0]), []).append(name)
    return list(groups.values())


class _Capture:
    """Forward hooks on target modules that keep each call's input (at the kept rows)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.rows: dict[int, torch.Tensor] = {}  # id(input) -> its kept rows, computed once per tensor
        self.mask = None
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0]
            self.seen[name].append(x)
            if id(x) not in self.rows:
                self.rows[id(x)] = _kept_rows(x, self.mask)
        return hook

    def bases(self, rank: int, seed: int) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
        """{module name: P}, modules of one stream sharing one tensor, and the streams."""
        missing = [name for name, inputs in self.seen.items() if not inputs]
        if missing:
            raise RuntimeError(f"calibration never called {missing[0]}: is it used in the model's forward?")
        streams = _streams(self.seen)
        bases = {}
        for stream in streams:
            inputs = [self.rows[id(x)] for x in self.seen[stream[0]]]
            basis = orthonormal_basis(inputs, rank, seed)
            bases.update({name: basis for name in stream})
        return bases, streams

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def calibrate_bases(model: nn.Module, targets: dict[str, nn.Module], layers: nn.ModuleList | None,
                    layers_prefix: str, calibration, rank: int, seed: int = 0):
    """({target name: P (d_in, r)}, [stream: [target names]]) for every target."""
    batches = calibration_batches(calibration)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if layers is None:
            return _calibrate_whole(model, targets, batches, rank, seed, device)
        return _calibrate_by_layer(model, targets, layers, layers_prefix, batches, rank, seed, device)
    finally:
        model.train(was_training)


def _call(model: nn.Module, batch: dict, device):
    kwargs = {k: v.to(device) for k, v in batch.items()}
    if not hasattr(model, "config"):  # any nn.Module: called on the token ids alone
        return model(kwargs["input_ids"])
    return model(**kwargs, use_cache=False)  # a transformers model: no KV cache while calibrating


def _calibrate_whole(model, targets, batches, rank, seed, device):
    capture = _Capture(targets)
    try:
        for batch in batches:
            capture.mask = batch.get("attention_mask")
            _call(model, batch, device)
        return capture.bases(rank, seed)
    finally:
        capture.close()


def _calibrate_by_layer(model, targets, layers, prefix, batches, rank, seed, device):
    # calls[i][b]: rebuild(h) -> (args, kwargs) of layer i's call on batch b, its hidden
    # state left out (kept only for layer 0, in `hidden`), so one hidden state per batch is alive.
    calls: list[list] = [[] for _ in layers]
    hidden: list[torch.Tensor] = []

    def recorder(i):
        def hook(module, args, kwargs):
            h, rebuild = split_hidden(args, kwargs)
            calls[i].append(rebuild)
            if i == 0:
                hidden.append(h)
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    backbone = getattr(model, "base_model", model)  # transformers: the decoder without the LM head
    try:
        for batch in batches:
            _call(backbone, batch, device)
    finally:
        for handle in handles:
            handle.remove()
    bases, streams = {}, []
    for i, layer in enumerate(layers):
        mine = {name: m for name, m in targets.items() if name.startswith(f"{prefix}.{i}.")}
        capture = _Capture(mine)
        try:
            for b, batch in enumerate(batches):
                capture.mask = batch.get("attention_mask")
                args, kwargs = calls[i][b](hidden[b])
                out = layer(*args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                calls[i][b] = None  # this layer's call is no longer needed
            if mine:
                layer_bases, layer_streams = capture.bases(rank, seed + i)
                bases.update(layer_bases)
                streams.extend(layer_streams)
        finally:
            capture.close()
    outside = set(targets) - set(bases)
    if outside:  # targets outside the decoder layers: one whole-model pass for them
        more, more_streams = _calibrate_whole(model, {n: targets[n] for n in sorted(outside)}, batches, rank,
                                              seed + len(layers), device)
        bases.update(more)
        streams.extend(more_streams)
    return bases, streams
