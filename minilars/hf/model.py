"""get_lars_model / LarsModel: LARS on any torch model whose targets are nn.Linear,
in the shape of peft's get_peft_model / PeftModel.

    model = get_lars_model(model, LarsConfig(r=16), calibration=token_ids)
    loss = model(input_ids=ids, labels=ids).loss     # chunked loss, layers recomputed
    loss.backward()                                  # grads on the lars_M only
    model.refresh(next_ids, optimizer)               # before each step of model.refresh_steps(total)
    model.save_pretrained("adapter")                 # a peft LoRA adapter (A = [P_f P]^T, B = [M_f; M]^T)
    plain = model.merge_and_unload()                 # the base model with P M folded in
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_write, write_text
from ..methods.base import refresh_steps
from ..peft_io import CONFIG_FILE, MINILARS_FILE, WEIGHTS_FILE
from ..backends.resident import fix_mmap_threshold
from .calibrate import calibrate_bases
from .config import LarsConfig
from .linear import LarsLinear
from .loss import lars_causal_lm_loss
from .recompute import disable_recompute, enable_recompute


def find_targets(model: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """{qualified name: nn.Linear} that the config targets. 'all-linear' is every
    nn.Linear except the output head (model.get_output_embeddings() or `lm_head`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if target_modules == "all-linear":
            hit = isinstance(module, nn.Linear) and module is not head and name.split(".")[-1] != "lm_head"
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
            if hit and not isinstance(module, nn.Linear):
                raise TypeError(f"target {name} is a {type(module).__name__}; LARS adapts nn.Linear only")
        if hit:
            found[name] = module
    if not found:
        raise ValueError(f"no module matches target_modules={target_modules!r}")
    return found


def find_layers(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, nn.ModuleList | None]:
    """(qualified name, list) of the model's decoder layers: the nn.ModuleList whose
    every entry holds a target and that holds the most targets; ("", None) if none."""
    best, best_count = ("", None), 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        counts = [sum(1 for t in targets if t.startswith(f"{name}.{i}.")) for i in range(len(module))]
        if all(counts) and sum(counts) > best_count:
            best, best_count = (name, module), sum(counts)
    return best


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def get_lars_model(model: nn.Module, config: LarsConfig, calibration) -> LarsModel:
    """Freeze `model`, calibrate each input stream's basis on `calibration` (token ids
    (B, T), or an iterable of such batches or of dicts with input_ids and an optional
    attention_mask), replace every target with a LarsLinear and route each decoder
    layer through the recompute policy of config.layer_storage. On the CPU, fix
    glibc's mmap threshold at config.cpu_mmap_threshold (backends/resident.py)."""
    if not isinstance(config, LarsConfig):
        raise TypeError(f"config must be a LarsConfig, got {type(config).__name__}")
    if any(isinstance(m, LarsLinear) for m in model.modules()):
        raise ValueError("the model already has LARS layers")
    targets = find_targets(model, config.target_modules)
    narrow = min(t.in_features for t in targets.values())
    if config.r > narrow:
        raise ValueError(f"r = {config.r} is larger than the narrowest target's input width ({narrow})")
    prefix, layers = find_layers(model, targets)
    model.requires_grad_(False)
    bases, streams = calibrate_bases(model, targets, layers, prefix, calibration, config.r, config.calibration_seed)
    weight_dtype = next(iter(targets.values())).weight.dtype
    adapter_dtype = torch.float32 if config.autocast_adapter_dtype and weight_dtype.itemsize < 4 else weight_dtype
    shared = {}  # one P tensor per stream, however many projections read it
    for name, linear in targets.items():
        basis = shared.setdefault(id(bases[name]), bases[name].to(linear.weight.device, adapter_dtype))
        lars = LarsLinear(linear, basis, adapter_dtype)
        _set_module(model, name, lars)
    if layers is not None and config.layer_storage != "none":
        for layer in layers:
            enable_recompute(layer, config.layer_storage, config.mlp_chunk_tokens)
    if config.cpu_mmap_threshold is not None and any(t.weight.device.type == "cpu" for t in targets.values()):
        fix_mmap_threshold(config.cpu_mmap_threshold)
    return LarsModel(model, config, streams, layers)


class LarsModel(nn.Module):
    """The adapted model: forward as the base model's (labels -> chunked loss),
    save_pretrained (a peft LoRA adapter), merge_and_unload. Unknown attributes
    are looked up on the base model, as peft's PeftModel does."""

    def __init__(self, model: nn.Module, config: LarsConfig, streams: list[list[str]], layers):
        super().__init__()
        self.base_model = model
        self.lars_config = config
        self.streams = streams  # [[target names reading one input]]: q/k/v, o, gate/up, down per layer
        self._layers = [layers] if layers is not None else []  # a list: not a registered submodule

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------ forward
    def _split_head(self):
        """(decoder, head) when the loss can be chunked: a transformers causal LM whose
        logits are head(decoder(...).last_hidden_state) with nothing in between."""
        model = self.base_model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        decoder = getattr(model, "base_model", model)
        config = getattr(model, "config", None)
        reshaping = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        if not isinstance(head, nn.Linear) or decoder is model or reshaping:
            return None
        return decoder, head

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        """As the base model's forward. With labels, on a causal LM: the loss in slices
        of config.loss_chunk tokens (lars_causal_lm_loss) and logits=None: the (B, T, V)
        logits are never formed. Training calls run without a KV cache."""
        if self.training and torch.is_grad_enabled():
            kwargs.setdefault("use_cache", False)
        split = self._split_head() if labels is not None else None
        if split is None:
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        decoder, head = split
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        loss = lars_causal_lm_loss(hidden, labels, head, self.lars_config.loss_chunk, num_items_in_batch)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=None)

    # ------------------------------------------------------------ parameters
    def lars_layers(self) -> dict[str, LarsLinear]:
        return {name: m for name, m in self.base_model.named_modules() if isinstance(m, LarsLinear)}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------ refresh (docs/lars.md Part 1.6)
    @property
    def refreshes_done(self) -> int:
        """How often refresh() has run: the folded bases' columns over r."""
        first = next(iter(self.lars_layers().values()), None)
        folded = None if first is None else first.lars_P_folded
        return 0 if folded is None else folded.shape[1] // self.lars_config.r

    def refresh_steps(self, steps: int) -> frozenset[int]:
        """The steps (counted from 0) before which a run of `steps` steps calls refresh():
        lars_config.refreshes of them, evenly spaced, as the engine's --refreshes."""
        return refresh_steps(self.lars_config.refreshes, steps)

    @torch.no_grad()
    def refresh(self, calibration, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every stream folds P M into its frozen delta and takes a basis calibrated again
        on `calibration` (as get_lars_model's: token ids or batches) through the model as
        it now is; every M restarts at zero, and `optimizer`'s state for them (Adam's
        moments) is dropped, as the engine restarts AdamW. The outputs are unchanged;
        the saved adapter's rank grows by r."""
        layers = self.lars_layers()
        if not layers:
            raise RuntimeError("refresh: the model has no LARS layers left (merge_and_unload() took them out)")
        prefix, decoder_layers = find_layers(self.base_model, layers)
        config = self.lars_config
        bases, streams = calibrate_bases(self.base_model, layers, decoder_layers, prefix, calibration, config.r,
                                         config.calibration_seed)
        for stream in streams:
            first = layers[stream[0]]
            basis = bases[stream[0]].to(first.lars_P)  # one tensor per stream, as get_lars_model shares P
            old = first.stacked_basis()  # the stream's P_f to be, one tensor for its layers
            for name in stream:
                layers[name].refresh(basis, old)
        if optimizer is not None:
            for layer in layers.values():
                optimizer.state.pop(layer.lars_M, None)

    # ------------------------------------------------------------ export
    def adapter_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(peft-named tensors, adapter_config) of the LoRA this model equals:
        lora_A = P^T, lora_B = M^T, lora_alpha = r (scaling 1), docs/lars.md Part 1.5;
        after refresh() [P_f P]^T and [M_f; M]^T, of rank r (refreshes + 1)."""
        layers = self.lars_layers()
        tensors = {}
        for name, layer in layers.items():
            a, b = layer.lora_tensors()
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu()
        leaves = sorted({name.split(".")[-1] for name in layers})
        linears = [n for n, m in self.base_model.named_modules() if isinstance(m, (nn.Linear, LarsLinear))
                   and n.split(".")[-1] in leaves and not n.endswith(".base_layer")]
        # Leaf names when they select exactly the adapted modules, else every name in full.
        targets = leaves if sorted(linears) == sorted(layers) else sorted(layers)
        r = next(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))  # r (refreshes + 1)
        config = getattr(self.base_model, "config", None)
        adapter_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM" if self._split_head() else None,
            "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
            "r": r, "lora_alpha": r, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True}
        return tensors, adapter_config

    def save_pretrained(self, save_directory: str | os.PathLike, **_ignored) -> Path:
        """Write the PEFT LoRA adapter LARS equals (adapter_config.json +
        adapter_model.safetensors; peft.PeftModel.from_pretrained loads it), and
        minilars_adapter.json naming the method and its streams. Files are written
        atomically, one by one. Extra keyword arguments (Trainer's) are ignored."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, adapter_config = self.adapter_state()
        info = {"method": "lars", "rank": self.lars_config.r, "refreshes": self.refreshes_done,
                "streams": self.streams, "layer_storage": self.lars_config.layer_storage}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}),
                     sum(t.numel() * t.element_size() for t in tensors.values()))
        write_text(directory / CONFIG_FILE, json.dumps(adapter_config, indent=2))
        write_text(directory / MINILARS_FILE, json.dumps(info, indent=2))
        return directory

    def merge_and_unload(self) -> nn.Module:
        """The base model with every update folded into its weight (W + (P_f M_f + P M)^T), the
        LarsLinear layers replaced by plain nn.Linear and the layers' forward restored."""
        model = self.base_model
        for name, layer in self.lars_layers().items():
            _set_module(model, name, layer.merge())
        for layers in self._layers:
            for layer in layers:
                disable_recompute(layer)
        self._layers = []
        return model
