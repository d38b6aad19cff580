"""LarsTrainer: transformers.Trainer whose saves write the LARS adapter.

transformers.Trainer trains a LarsModel as it is (its forward takes input_ids,
attention_mask, labels and num_items_in_batch), but saves a model that is not a
PreTrainedModel or PeftModel as a raw state dict, which safetensors refuses when
tensors are shared (tied embeddings, one P per stream). This subclass saves what
LarsModel.save_pretrained writes: the peft LoRA adapter LARS equals; and it refreshes
the bases LarsConfig.refreshes times, evenly spaced (LarsModel.refresh_steps), on the
batch of the step about to run, the optimizer's state for M dropped with them.
"""
from __future__ import annotations

import os

import torch
import transformers


class LarsTrainer(transformers.Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        lars = self.accelerator.unwrap_model(self.model)
        step = self.state.global_step
        if step in lars.refresh_steps(self.state.max_steps) and step != getattr(self, "_refreshed_at", None):
            self._refreshed_at = step  # once a step, however many micro-batches it accumulates
            batch = {k: inputs[k] for k in ("input_ids", "attention_mask") if inputs.get(k) is not None}
            lars.refresh(batch, self.optimizer)
        return super().training_step(model, inputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
