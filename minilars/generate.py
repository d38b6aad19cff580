"""Text generation with a KV cache: greedy, temperature and top-p (nucleus) sampling.

`decode` is the one decoding loop; `generate_ids` (one prompt, streamed),
`generate_batch` (many prompts, batched by length) and `generate_text` (a chat
reply, decoded to text as it grows) are views of it."""
from __future__ import annotations

from typing import Callable, Collection, Iterator, Sequence

import numpy as np

from .data import stop_ids_of
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


def decode(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, stop_ids: Collection[int] | None = None, seed: int = 0) -> Iterator[list[int | None]]:
    """The decoding loop of every command: `minilars generate` and `eval` (one prompt at
    a time), the finetune report's held-out answers (prompts of one length batched),
    and the study, which runs those commands.

    prompts: B token-id lists of one length L, run as one batch: the (B, L) prompt is
    prefilled once, then each step feeds every row's last token against the KV cache.
    Yields each step's new token per row, None for a row that has met a stop id (it
    stays stopped); ends when every row has stopped, after max_new_tokens steps, or
    when the context is full. Greedy when temperature is 0, else `sample_next` row by
    row with one generator seeded by `seed`. No padding is involved, so a row is what
    it would be alone (up to float summation order)."""
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"decode runs prompts of one length as a batch; got lengths {sorted(lengths)}")
    length = lengths.pop()
    if length == 0:
        raise ValueError("the prompt is empty")
    if length >= model.cfg.max_seq_len:
        raise ValueError(f"prompt of {length} tokens does not fit the model's context ({model.cfg.max_seq_len})")
    tokens = np.asarray([list(p) for p in prompts], dtype=np.int64)  # (B, L)
    kv = model.new_kv_cache(len(prompts), min(length + max_new_tokens, model.cfg.max_seq_len))
    logits = model.logits(tokens, kv, last_only=True)  # (B, V)
    yield from decode_from(model, kv, logits, max_new_tokens, temperature, top_p, stop_ids, seed)


def decode_from(model: Model, kv, logits, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                stop_ids: Collection[int] | None = None, seed: int = 0) -> Iterator[list[int | None]]:
    """`decode` after its prefill: kv holds the B prompts (kv.length = L) and logits
    (B, V) are their last positions' logits; the steps and their stopping as there."""
    stop = set(stop_ids or ())
    rng = np.random.default_rng(seed)
    stopped = [False] * logits.shape[0]
    for _ in range(max_new_tokens):
        rows = model.be.to_numpy(logits)  # (B, V)
        picked = [sample_next(row, temperature, top_p, rng) for row in rows]
        new: list[int | None] = []
        for b, token in enumerate(picked):
            stopped[b] = stopped[b] or token in stop
            new.append(None if stopped[b] else token)
        if all(stopped):
            return
        yield new
        if kv.length >= model.cfg.max_seq_len:
            return
        logits = model.logits(np.asarray(picked, dtype=np.int64)[:, None], kv, last_only=True)  # (B, 1) -> (B, V)


def generate_ids(model: Model, prompt: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: Collection[int] | None = None, seed: int = 0) -> Iterator[int]:
    """Yield new token ids one at a time for one prompt (`decode` with a batch of one);
    stops at a stop id or after max_new_tokens."""
    for (token,) in decode(model, [prompt], max_new_tokens, temperature, top_p, stop_ids, seed):
        yield token


def generate_batch(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, stop_ids: Collection[int] | None = None, seed: int = 0) -> list[list[int]]:
    """The new token ids of every prompt, the stop id left out. Prompts of the same
    length run as one batch through `decode`: a decode step reads every weight once
    whatever the batch, so a batch of B answers costs little more than one."""
    answers: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for members in groups.values():
        for step in decode(model, [prompts[i] for i in members], max_new_tokens, temperature, top_p, stop_ids, seed):
            for i, token in zip(members, step):
                if token is not None:
                    answers[i].append(token)
    return answers


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
    out: list[int] = []
    shown = ""
    for token in generate_ids(model, ids, max_new_tokens, temperature, top_p, stop_ids_of(tokenizer), seed):
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if on_text is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            on_text(text[len(shown):])
            shown = text
    final = tokenizer.decode(out, skip_special_tokens=True)
    if on_text is not None and len(final) > len(shown):
        on_text(final[len(shown):])
    return final
