"""Text generation with a KV cache: greedy, temperature and top-p (nucleus) sampling."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .model import Model


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature == 0; else sample from softmax(logits / temperature)
    restricted to the smallest set of tokens whose probability reaches top_p
    (Holtzman et al. 2020)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p  # tokens before the mass reaches top_p, plus that one
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate_ids(model: Model, prompt: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: set[int] | None = None, seed: int = 0) -> Iterator[int]:
    """Yield new token ids one at a time (prompt prefilled once, then one token per
    step against the KV cache); stops at a stop id or after max_new_tokens."""
    if not prompt:
        raise ValueError("the prompt is empty")
    total = len(prompt) + max_new_tokens
    if len(prompt) >= model.cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's context ({model.cfg.max_seq_len})")
    rng = np.random.default_rng(seed)
    kv = model.new_kv_cache(1, min(total, model.cfg.max_seq_len))
    logits = model.logits(np.asarray([prompt]), kv, last_only=True)
    for _ in range(max_new_tokens):
        token = sample_next(model.be.to_numpy(logits)[0], temperature, top_p, rng)
        if stop_ids and token in stop_ids:
            return
        yield token
        if kv.length >= model.cfg.max_seq_len:
            return
        logits = model.logits(np.asarray([[token]]), kv, last_only=True)


def generate_text(model: Model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, chat: bool = True, seed: int = 0,
                  on_text: Callable[[str], None] | None = None) -> str:
    """Generate a reply to `prompt` (through the chat template when chat and the
    tokenizer has one); on_text receives each new piece of text as it is decoded."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tokenizer.encode(text, add_bos=False)
    else:
        ids = tokenizer.encode(prompt)
    stop = {i for i in (tokenizer.eos_id, tokenizer.tok.token_to_id("<|im_end|>")) if i is not None}
    out: list[int] = []
    shown = ""
    for token in generate_ids(model, ids, max_new_tokens, temperature, top_p, stop, seed):
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if on_text is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            on_text(text[len(shown):])
            shown = text
    final = tokenizer.decode(out, skip_special_tokens=True)
    if on_text is not None and len(final) > len(shown):
        on_text(final[len(shown):])
    return final
