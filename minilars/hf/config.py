"""LarsConfig: what `get_lars_model` adapts and how (a dataclass with a help text per
field, in the shape of peft's LoraConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field

LAYER_STORAGE = ("half", "exact", "none")


@dataclass(frozen=True)
class LarsConfig:
    r: int = field(default=16, metadata={"help": "LARS rank: columns of each stream's basis P (d_in, r) and rows of "
                                                 "each target's trainable M (r, d_out)."})
    target_modules: str | tuple[str, ...] = field(
        default="all-linear",
        metadata={"help": "'all-linear' (every nn.Linear but the output head) or module names; a name matches a "
                          "module whose qualified name equals it or ends in '.' + name, as in peft."})
    layer_storage: str = field(
        default="half",
        metadata={"help": "What each decoder layer keeps for backward. 'half': its input only, in float16 (as is "
                          "when already 16-bit), the layer rerun in backward (minilars's default recipe, "
                          "docs/lars.md); 'exact': its input in its own dtype, rerun in backward; 'none': plain "
                          "autograd (every frozen activation kept)."})
    mlp_chunk_tokens: int | None = field(
        default=512,
        metadata={"help": "With layer_storage 'half' or 'exact': each decoder layer's MLP (its `mlp`, "
                          "`feed_forward` or `block_sparse_moe` submodule; none found: left whole) runs in slices "
                          "of this many tokens in the forward and in the recompute, keeping only its input and "
                          "backpropagating one slice at a time, so at most (mlp_chunk_tokens, f) intermediates "
                          "exist at once instead of (T, f) ones. Exact because the MLP is token-wise (row t of "
                          "its output depends on row t of its input only, minilars/hf/tokenwise.py); None runs "
                          "it whole (needed for a feed-forward that mixes tokens)."})
    refreshes: int = field(
        default=2,
        metadata={"help": "Basis refreshes in a run, evenly spaced (docs/lars.md Part 1.6; the engine's default "
                          "recipe, --refreshes 2): before each, every stream folds P M into a frozen delta and "
                          "takes a basis calibrated again on the next batch, and M and the optimizer restart. "
                          "LarsTrainer does it; a loop of your own calls model.refresh(batch, optimizer) before "
                          "each step of model.refresh_steps(total_steps). 0: one basis."})
    loss_chunk: int = field(default=256, metadata={"help": "Tokens per slice of the chunked logits and loss: at most "
                                                           "(loss_chunk, V) float32 logits exist at once."})
    calibration_seed: int = field(default=0, metadata={"help": "Seed of the randomized range finder; layer i uses "
                                                               "seed + i, as the engine's calibrate() does."})
    autocast_adapter_dtype: bool = field(
        default=True,
        metadata={"help": "Keep P and M in float32 when the base weights are 16-bit (as peft does for LoRA), so "
                          "the optimizer updates M in full precision."})
    cpu_mmap_threshold: int | None = field(
        default=1 << 20,
        metadata={"help": "On the CPU with glibc: fix malloc's mmap threshold at this many bytes (process-wide, "
                          "as MALLOC_MMAP_THRESHOLD_ does), so each freed tensor at or above it leaves resident "
                          "memory. glibc otherwise raises the threshold as blocks are freed and the recomputed "
                          "layers' freed tensors stay in its heap (peak RSS above the weights 969 "
                          "instead of 310 MiB at T = 2048, docs/hf.md). None leaves the allocator as it is."})

    def __post_init__(self):
        if isinstance(self.target_modules, list):  # frozen: normalise lists to tuples
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LarsConfig.r must be a positive integer, got {self.r!r}")
        if self.target_modules != "all-linear" and (
                isinstance(self.target_modules, str) or not self.target_modules
                or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise ValueError("LarsConfig.target_modules must be 'all-linear' or a non-empty list of module names, "
                             f"got {self.target_modules!r}")
        if self.layer_storage not in LAYER_STORAGE:
            raise ValueError(f"LarsConfig.layer_storage must be one of {LAYER_STORAGE}, got {self.layer_storage!r}")
        if self.mlp_chunk_tokens is not None and (
                not isinstance(self.mlp_chunk_tokens, int) or self.mlp_chunk_tokens < 1):
            raise ValueError("LarsConfig.mlp_chunk_tokens must be a positive integer or None, "
                             f"got {self.mlp_chunk_tokens!r}")
        if not isinstance(self.refreshes, int) or self.refreshes < 0:
            raise ValueError(f"LarsConfig.refreshes must be a non-negative integer, got {self.refreshes!r}")
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 1:
            raise ValueError(f"LarsConfig.loss_chunk must be a positive integer, got {self.loss_chunk!r}")
        if self.cpu_mmap_threshold is not None and (
                not isinstance(self.cpu_mmap_threshold, int) or self.cpu_mmap_threshold < 1):
            raise ValueError("LarsConfig.cpu_mmap_threshold must be a positive number of bytes or None, "
                             f"got {self.cpu_mmap_threshold!r}")
