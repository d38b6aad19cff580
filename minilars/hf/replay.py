"""What a forward rerun in backward must see again to compute what the first run
computed: the RNG state (dropout draws the same masks) and the autocast setting
(the same ops in the same dtypes). recompute.py reruns a decoder layer, tokenwise.py
its MLP chunk by chunk; both capture a ForwardState in their autograd Function's
forward and replay it in backward.
"""
from __future__ import annotations

import contextlib

import torch


class ForwardState:
    """The CPU RNG state (and the device's, for a CUDA tensor) and autocast setting
    at the moment the forward ran on `x`'s device."""

    def __init__(self, x: torch.Tensor):
        self.device = x.device
        self.device_type = x.device.type
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self.autocast = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))

    @contextlib.contextmanager
    def rng(self):
        """Inside: the RNG as the forward found it; outside it is left as it was."""
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device_type if devices else "cuda"):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            yield

    @contextlib.contextmanager
    def rerun(self):
        """Inside: autograd on and the forward's autocast setting, for the rerun itself."""
        enabled, dtype = self.autocast
        with torch.enable_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled):
            yield
