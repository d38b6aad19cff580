"""The causal-LM loss in slices of tokens: never the whole (T, V) logits at once.

    loss = sum_n [lse(h_n W^T + b) - (h_n W^T + b)[y_n]] / n_items      over labels != -100
    dh_n = (softmax(h_n W^T + b) - onehot(y_n)) W / n_items

The loss is the last node of the graph, so its gradient with respect to the hidden
states is formed slice by slice during the forward (as the engine's `head.dx` field):
what is kept for backward is dh (N, d), not the logits (N, V). Labels follow
transformers: position t predicts labels[t + 1]; -100 is ignored.

Letters: B rows, T tokens, N = B*T, d hidden size, V vocabulary, c the slice.
"""
from __future__ import annotations

import torch

IGNORE = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, n_items):
        # hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) already shifted
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # logits and sums
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]  # (c, d)
            y = targets[start:start + chunk]  # (c,)
            logits = torch.nn.functional.linear(h, weight, bias).to(acc)  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            valid = y != IGNORE
            safe = torch.where(valid, y, 0)
            total += ((lse - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
            if need_dh or need_dw:
                dlogits = torch.exp_(logits.sub_(lse[:, None]))  # softmax, in place: (c, V)
                dlogits[torch.arange(len(y), device=y.device), safe] -= 1.0
                dlogits *= valid[:, None] / n_items
                if need_dh:
                    dh[start:start + chunk] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)  # (c, d)
                if need_dw:
                    dw += dlogits.T @ h.to(acc)  # (V, d)
            del logits
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total / n_items

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * dloss.to(dh.dtype)
        dw = None if dw is None else (dw * dloss).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def lars_causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear, chunk: int = 256,
                        num_items_in_batch=None) -> torch.Tensor:
    """The mean next-token cross-entropy of `head(hidden)` against `labels` (B, T),
    in slices of `chunk` tokens, as transformers' causal-LM loss computes it
    (position t predicts labels[t+1]; divided by num_items_in_batch when given, else
    by the number of labels that are not -100). hidden (B, T, d) is the decoder's
    last hidden state (after its final norm)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, the hidden states {tuple(hidden.shape[:-1])}")
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]  # (B, T): the label each position predicts
    targets = targets.reshape(-1).to(hidden.device)
    n_items = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n_items = torch.as_tensor(n_items, device=hidden.device).to(acc).clamp_min(1)
    if head.bias is not None and head.bias.requires_grad:
        raise ValueError("lars_causal_lm_loss: a trainable head bias is not supported")
    return _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets,
                                      chunk, n_items)
