# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 07 · LARS on a transformers model
#
# Tutorials 01-06 use minilars's own engine. Most people fine-tune with
# `transformers` + `peft`; `minilars.hf` brings LARS there, in the shape of peft's
# `get_peft_model` (`pip install "minilars[hf]"`):
#
# * every target `nn.Linear` becomes `y = x W^T + (x P) M`: `P (d_in, r)` is a fixed
#   basis of the activations its input stream carries (calibrated once, the engine's
#   algorithm), `M (r, d_out)` is trained; backward keeps only `z = x P` and forms the
#   exact `dM = z^T dy`;
# * each decoder layer keeps only its input, in float16, and reruns itself in
#   backward (the engine's default recipe);
# * the loss is computed in slices of tokens, so the `(T, V)` logits never exist.
#
# `P M` is a LoRA update (`lora_A = P^T`, `lora_B = M^T`, scaling 1), so the result
# is saved as a standard peft LoRA adapter.
#
# Here: a tiny random LLaMA (no download), trained for a few steps on a pattern it
# can learn (each token has one successor), then the three promises checked: what backward keeps, the saved adapter
# in peft, the merged model.
#
# Letters: B rows, T tokens, d hidden size, V vocabulary, r rank.

# %%
import copy
import os
import tempfile
from pathlib import Path

try:
    import peft
    import torch
    import transformers
except ImportError as missing:  # the tutorial needs minilars[hf]
    raise SystemExit(f"07 needs torch, transformers and peft (pip install 'minilars[hf]'): {missing}")

from minilars.hf import LarsConfig, get_lars_model

QUICK = os.environ.get("MINILARS_QUICK") == "1"
torch.manual_seed(0)
V, T = 128, 64
config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)
base = transformers.LlamaForCausalLM(config)


NEXT = torch.randperm(V, generator=torch.Generator().manual_seed(1))  # a fixed random successor per token


def batch(rows=4, seq_len=T, seed=0):
    """Random rows of a language with one rule: token t is followed by NEXT[t]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(rows, seq_len, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (rows,), generator=gen)
    for t in range(1, seq_len):
        ids[:, t] = NEXT[ids[:, t - 1]]
    return ids


# %% [markdown]
# ## LARS in a dozen lines
#
# `calibration` is token ids (or an iterable of batches, or of dicts with
# `input_ids` and `attention_mask`); padding is left out of the bases.
#
# The engine's default recipe refreshes each basis twice in a run (docs/lars.md
# Part 1.6): before a third and two thirds of the steps, `model.refresh(batch,
# optimizer)` folds `P M` into a frozen delta, calibrates `P` again on the batch
# through the trained model, and restarts `M` and Adam's moments for it.
# `model.refresh_steps(steps)` names those steps (`LarsConfig.refreshes`, 2);
# `LarsTrainer` does this by itself.

# %%
model = get_lars_model(copy.deepcopy(base), LarsConfig(r=8), calibration=batch(seed=100))
model.print_trainable_parameters()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
model.train()
losses = []
steps = 20 if QUICK else 60
refresh_at = model.refresh_steps(steps)
for step in range(steps):
    ids = batch(seed=step)
    if step in refresh_at:  # the model's outputs are unchanged; the adapter's rank grows by r
        model.refresh(ids, optimizer)
    loss = model(input_ids=ids, labels=ids).loss  # chunked loss; layers recomputed in backward
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
adapter_dir = Path(tempfile.mkdtemp()) / "adapter"
model.save_pretrained(adapter_dir)  # a peft LoRA adapter of rank 3r: lora_A = [P_f P]^T, lora_B = [M_f; M]^T
print(sorted(p.name for p in adapter_dir.iterdir()))

# %% [markdown]
# ## What backward keeps
#
# `torch.autograd.graph.saved_tensors_hooks` sees every tensor the forward saves for
# backward. We add up their bytes (each storage once) for LARS and for peft LoRA r 8
# on the same model, at two lengths. LoRA keeps every layer's inputs, attention and
# MLP activations and the `(T, V)` logits; LARS keeps one float16 `(T, d)` per layer
# and `dh (T, d)` from the loss.

# %%
def kept_bytes(model, seq_len):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = batch(rows=1, seq_len=seq_len, seed=7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        b.untyped_storage().data_ptr() for b in model.buffers()}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
lora.train()
kept = {name: [kept_bytes(m, t) for t in (256, 512)] for name, m in (("LARS", model), ("LoRA", lora))}
for name, (short, long) in kept.items():
    print(f"{name}: kept for backward {short / 2**10:7.0f} KiB at T = 256, {long / 2**10:7.0f} KiB at T = 512, "
          f"{(long - short) / 256:.0f} bytes per token")
lars_per_token = (kept["LARS"][1] - kept["LARS"][0]) / 256
d, L = config.hidden_size, config.num_hidden_layers
print(f"LARS per token: {lars_per_token:.0f} bytes = L*d*2 (float16 layer inputs) + d*4 (dh) + d*4 + 4 "
      f"(final norm input, rstd) = {L * d * 2 + d * 4 + d * 4 + 4}")

# %% [markdown]
# ## The adapter in peft, and the merged model
#
# peft loads the saved directory as any LoRA adapter and gives the LARS model's
# logits; `merge_and_unload()` folds the whole update (`P_f M_f + P M`) into each
# weight and returns the plain `LlamaForCausalLM`.

# %%
ids = batch(rows=2, seed=999)
model.eval()
with torch.no_grad():
    lars_logits = model(input_ids=ids).logits
    peft_logits = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)(input_ids=ids).logits
    base_logits = base(input_ids=ids).logits
merged = model.merge_and_unload()
with torch.no_grad():
    merged_logits = merged(input_ids=ids).logits
print(type(merged).__name__, "max |peft - LARS| =", float((peft_logits - lars_logits).abs().max()),
      " max |merged - LARS| =", float((merged_logits - lars_logits).abs().max()))

# %% [markdown]
# ## Check

# %%
assert losses[-1] < 0.5 * losses[0], "LARS learned the successor rule"
assert kept["LARS"][1] < 0.2 * kept["LoRA"][1], "LARS keeps a fraction of what LoRA keeps"
assert lars_per_token <= L * d * 2 + 2 * d * 4 + 8, "LARS keeps a float16 (T, d) per layer, and only that grows in T"
assert float((peft_logits - lars_logits).abs().max()) < 1e-4, "peft reloads the adapter LARS equals"
assert float((merged_logits - lars_logits).abs().max()) < 1e-4, "merged equals unmerged"
assert float((lars_logits - base_logits).abs().max()) > 1e-2, "and both differ from the base model"
print("07: all checks passed")
