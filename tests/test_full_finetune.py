"""Full fine-tuning of the tiny preset learns a synthetic sequence task."""
from __future__ import annotations

import numpy as np

from minilars.config import preset
from minilars.methods import apply_full
from minilars.model import Model
from minilars.optim import AdamW, AdamWConfig


def affine_sequences(rng, vocab: int, batch: int, seq_len: int):
    """Each next token is a fixed function of the current one: t' = (5 t + 3) mod V,
    from a random start. Unlearnable loss would be log V; learnable: ~0."""
    start = rng.integers(0, vocab, (batch, 1))
    seq = [start]
    for _ in range(seq_len):
        seq.append((5 * seq[-1] + 3) % vocab)
    seq = np.concatenate(seq, axis=1)
    return seq[:, :-1], seq[:, 1:]


def test_full_finetuning_lowers_loss_by_90_percent_in_120_steps():
    cfg = preset("tiny")
    model = apply_full(Model.random(cfg, seed=0))
    opt = AdamW(model.trainable(), model.be, AdamWConfig(lr=1e-2, weight_decay=0.01))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(120):
        tokens, targets = affine_sequences(rng, cfg.vocab_size, 8, 32)
        tape = model.forward(tokens, targets)
        losses.append(tape.loss)
        opt.step(model.backward(tape))
    assert losses[0] > 0.9 * np.log(cfg.vocab_size)
    assert np.mean(losses[-5:]) < 0.1 * losses[0], losses[-5:]
