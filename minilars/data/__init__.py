"""Fine-tuning data: records from JSONL or text files -> token rows with loss masks.

Record shapes, one JSON object per line:

    {"prompt": ..., "completion": ...}            loss on the completion only
    {"messages": [{"role": ..., "content": ...}]}  loss on the assistant turns only
    {"text": ...}                                 loss on every token
    a plain .txt file                             one text document

Optional fields: "answer" (a short answer for the contains-answer accuracy) and
"split" ("train" or "eval": when any record has one, the file decides the held-out
split instead of --eval-fraction).

With a chat template (instruct models) prompt/completion becomes a user and an
assistant turn. A conversation is rendered turn by turn and each piece tokenized on
its own, so the labelled tokens are exactly the assistant pieces: the content and the
template's end-of-turn (the model must learn to stop), never the header before it.

Rows hold T + 1 tokens; a row gives tokens = row[:-1] and next-token targets
row[1:], with -100 (ignored) wherever the target token is not labelled or is padding.

    pack  whole examples are laid into rows one after another (first fit in a seeded
          order), the rest of a row is padding; an example longer than a row is
          truncated (text is split into row-sized pieces instead)
    pad   one example per row, truncated to T + 1 tokens, padded to it

The batch for optimizer step s is a pure function of (seed, s): rows are drawn
without replacement from a fresh seeded permutation each epoch, so a resumed run
sees exactly the batches the uninterrupted run would.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IGNORE = -100
BUILTIN = Path(__file__).with_name("personal_notes.jsonl")
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "eval")
PACK_LOOKBACK = 64  # rows still open to first-fit packing (bounds the packing cost)


class DataError(ValueError):
    """Unusable training data; the message starts with file:line where there is one."""


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One example as it stands in the file, before tokenization."""

    where: str  # "file.jsonl:12"
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content); prompt/completion -> user, assistant
    text: str | None = None
    answer: str | None = None
    split: str | None = None
    from_prompt: bool = False  # written as {"prompt", "completion"} (raw concatenation without a template)


def read_records(path: str | Path) -> list[Record]:
    """Every record of a .jsonl or .txt file, or of the *.jsonl / *.txt files in a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".txt"))
        if not files:
            raise DataError(f"{path}: no .jsonl or .txt files in this directory")
        return [r for f in files for r in read_records(f)]
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".txt":
        text = decode_text(_read_bytes(path), path)
        return [Record(f"{path}:1", text=text)] if text.strip() else []
    return [parse_record(obj, where) for where, obj in iter_jsonl(path)]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def decode_text(raw: bytes, path: str | Path, first_line: int = 1) -> str:
    """UTF-8 bytes -> str (a leading byte-order mark dropped); DataError naming file,
    line and column of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte column {column}); "
                        "is this a binary file? Data files must be UTF-8 text") from None


def iter_jsonl(path: str | Path):
    """(where, object) for each non-blank line of a JSONL file, where = "file:line";
    a line that is not UTF-8 or not JSON is a DataError naming file and line (and the
    column the JSON parser stopped at)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        for number, raw in enumerate(f, 1):
            line = decode_text(raw, path, number).rstrip("\r\n")  # the end of line is not part of the JSON
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: not usable JSON (nested too deeply)") from None


def parse_record(obj, where: str) -> Record:
    """A JSON object in one of the three shapes -> Record; DataError naming `where` otherwise."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    answer = _optional_str(obj, "answer", where)
    split = _optional_str(obj, "split", where)
    if split is not None and split not in SPLITS:
        raise DataError(f"{where}: split must be 'train' or 'eval', got {split!r}")
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise DataError(f"{where}: a prompt/completion record needs a string {name!r}")
        if not completion:
            raise DataError(f"{where}: the completion is empty")
        return Record(where, messages=(("user", prompt), ("assistant", completion)), answer=answer, split=split,
                      from_prompt=True)
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
            turns.append((m["role"], m["content"]))
        if not any(role == "assistant" for role, _ in turns):
            raise DataError(f"{where}: the conversation has no assistant turn to learn from")
        return Record(where, messages=tuple(turns), answer=answer, split=split)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Record(where, text=obj["text"], answer=answer, split=split)
    keys = ", ".join(sorted(obj)) or "none"
    raise DataError(f"{where}: record has none of the fields prompt+completion, messages, text (its keys: {keys})")


def _optional_str(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string")
    return value


def split_records(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, eval). A file that marks splits decides; otherwise a seeded shuffle puts
    round(eval_fraction * n) records (at least one when n >= 2) in eval."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if any(r.split is not None for r in records):
        return ([r for r in records if r.split != "eval"], [r for r in records if r.split == "eval"])
    n_eval = 0
    if eval_fraction > 0 and len(records) >= 2:
        n_eval = min(len(records) - 1, max(1, round(eval_fraction * len(records))))
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(records))
    held = set(order[:n_eval].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ---------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Example:
    """A tokenized record: ids and which of them are prediction targets."""

    where: str
    ids: np.ndarray  # (L,) int64
    labelled: np.ndarray  # (L,) bool: True where ids[t] is a target (predicted from ids[:t])
    prompt_ids: tuple[int, ...] | None = None  # everything before the last assistant turn (generation prompt)
    question: str | None = None  # the last user turn before it (for showing answers)
    reference: str | None = None  # the last assistant turn / completion
    answer: str | None = None
    is_text: bool = False


ENCODE_CHUNK = 1 << 16  # characters handed to the tokenizer at once (its memory grows with the text)
CUT_MARGIN = 8  # ids beyond a limit tokenized before a cut: those near the cut may differ from the full text's


def encode(tokenizer, text: str, limit: int | None = None, add_bos: bool | None = None) -> list[int]:
    """tokenizer.encode(text, add_bos), tokenizing no more of `text` than `limit` ids
    need: a prefix of the text that grows fourfold until it yields CUT_MARGIN ids more
    than the limit; the first `limit` ids are kept. With no limit, a text longer than
    ENCODE_CHUNK is tokenized in pieces cut before a space between words (where a
    byte-level BPE pre-tokenizer would split anyway), so the tokenizer's memory stays
    bounded whatever the length."""
    if limit == 0:
        return []
    if limit is not None:
        size = ENCODE_CHUNK
        while size < len(text):
            ids = tokenizer.encode(text[:size], add_bos=add_bos)
            if len(ids) >= limit + CUT_MARGIN:
                return ids[:limit]
            size *= 4
        return tokenizer.encode(text, add_bos=add_bos)[:limit]
    if len(text) <= ENCODE_CHUNK:
        return tokenizer.encode(text, add_bos=add_bos)
    ids, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= ENCODE_CHUNK else _cut_point(text, start + ENCODE_CHUNK)
        ids += tokenizer.encode(text[start:end], add_bos=add_bos if start == 0 else False)
        start = end
    return ids


def _cut_point(text: str, end: int) -> int:
    """The last space in text[end // 2 .. end] with a non-space on each side, else `end`."""
    lo = max(1, end - ENCODE_CHUNK // 2)
    at = text.rfind(" ", lo, end)
    while at > lo and (text[at - 1].isspace() or text[at + 1].isspace()):
        at = text.rfind(" ", lo, at)
    return at if at > lo else end


def tokenize(record: Record, tokenizer, max_tokens: int | None = None) -> Example:
    """Record -> Example. Chat records go through the tokenizer's chat template when it
    has one; a prompt/completion record without a template is prompt + completion + eos.
    max_tokens: a chat or prompt/completion record is tokenized only as far as its first
    max_tokens ids (the rest would be truncated away), so a huge record costs what the
    row needs; a {text} record is used whole (it becomes several rows)."""
    if record.text is not None:
        ids = encode(tokenizer, record.text)
        if tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        labelled = np.ones(len(ids), dtype=bool)
        labelled[0] = False  # nothing to predict the first token from
        return Example(record.where, np.asarray(ids, np.int64), labelled, answer=record.answer, is_text=True)
    if tokenizer.chat_template:
        pieces = chat_pieces(record.messages, tokenizer, record.where)
        bos = tokenizer.bos_id
        prepend = tokenizer.add_bos and bos is not None
        if prepend and pieces and encode(tokenizer, pieces[0][0], 1, add_bos=False) == [bos]:
            prepend = False  # the template wrote it
        encoded = [([bos], False)] if prepend else []
        for text, is_target in pieces:
            encoded.append((encode(tokenizer, text, _left(encoded, max_tokens), add_bos=False), is_target))
    elif record.from_prompt:
        (_, prompt), (_, completion) = record.messages
        end = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        encoded = [(encode(tokenizer, prompt, max_tokens), False)]
        encoded.append((encode(tokenizer, completion, _left(encoded, max_tokens), add_bos=False) + end, True))
    else:
        raise DataError(f"{record.where}: a 'messages' record needs a tokenizer with a chat template; "
                        "use {\"prompt\", \"completion\"} or {\"text\"} records with this model")
    ids, labelled = [], []
    last_target_start = 0
    for piece, is_target in encoded:
        if is_target:
            last_target_start = len(ids)
        ids += piece
        labelled += [is_target] * len(piece)
    cut = max_tokens is not None and len(ids) >= max_tokens
    if cut:
        ids, labelled = ids[:max_tokens], labelled[:max_tokens]
    elif not any(labelled):
        raise DataError(f"{record.where}: the assistant turn encodes to no tokens")
    last = max(i for i, (role, _) in enumerate(record.messages) if role == "assistant")
    question = next((content for role, content in reversed(record.messages[:last]) if role == "user"), None)
    return Example(record.where, np.asarray(ids, np.int64), np.asarray(labelled, bool),
                   prompt_ids=tuple(ids[:last_target_start]), question=question,
                   reference=record.messages[last][1], answer=record.answer)


def _left(encoded: list, max_tokens: int | None) -> int | None:
    """Ids still wanted after the pieces encoded so far (at least 0)."""
    return None if max_tokens is None else max(0, max_tokens - sum(len(p) for p, _ in encoded))


def chat_pieces(messages, tokenizer, where: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces whose concatenation is
    the full rendering. An assistant piece runs from after the generation prompt
    (render(turns before it, add_generation_prompt=True)) to the end of its turn."""
    msgs = [{"role": role, "content": content} for role, content in messages]
    full = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    pieces, cursor = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(msgs[:i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(f"{where}: the chat template does not render turn by turn, so the assistant "
                            "tokens cannot be located; use {\"text\"} records")
        pieces += [(full[cursor:len(before)], False), (full[len(before):len(through)], True)]
        cursor = len(through)
    pieces.append((full[cursor:], False))
    return [(text, target) for text, target in pieces if text]


# ---------------------------------------------------------------- rows
@dataclass
class Rows:
    """Training rows: tokens and next-token targets, (R, T) each."""

    tokens: np.ndarray  # (R, T) int64
    targets: np.ndarray  # (R, T) int64, IGNORE where not labelled
    truncated: int = 0  # examples cut to fit a row
    dropped: int = 0  # examples left with no labelled token after truncation
    real: np.ndarray | None = None  # (R, T) bool: True at an example's token, False at padding

    def __len__(self) -> int:
        return len(self.tokens)

    def digest(self) -> str:
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(self.targets.tobytes())
        return h.hexdigest()[:16]


def make_rows(examples: list[Example], seq_len: int, pad_id: int, packing: str = "pack", seed: int = 0) -> Rows:
    """Lay examples into rows of seq_len + 1 tokens (see the module docstring)."""
    if packing not in ("pack", "pad"):
        raise DataError(f"packing must be 'pack' or 'pad', got {packing!r}")
    width = seq_len + 1
    pieces, truncated, dropped = [], 0, 0
    for ex in examples:
        if ex.is_text:  # a long document becomes several rows; nothing is thrown away
            for start in range(0, len(ex.ids), width):
                ids, lab = ex.ids[start:start + width], ex.labelled[start:start + width].copy()
                lab[0] = False
                if lab.any():
                    pieces.append((ids, lab))
            continue
        ids, lab = ex.ids, ex.labelled
        if len(ids) > width:
            truncated += 1
            ids, lab = ids[:width], lab[:width]
        if not lab[1:].any():
            dropped += 1
            continue
        pieces.append((ids, lab))
    if not pieces:
        raise DataError("no example has a labelled token within --seq-len; raise --seq-len")
    if packing == "pack":
        order = np.random.default_rng([seed, 0xBAC]).permutation(len(pieces))
        rows: list[list] = []
        fill: list[int] = []
        for i in order:  # first fit among the last PACK_LOOKBACK rows, else a new row
            n = len(pieces[i][0])
            first = max(0, len(rows) - PACK_LOOKBACK)
            slot = next((r for r in range(first, len(rows)) if fill[r] + n <= width), None)
            if slot is None:
                rows.append([])
                fill.append(0)
                slot = len(rows) - 1
            rows[slot].append(pieces[i])
            fill[slot] += n
    else:
        rows = [[p] for p in pieces]
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.zeros((len(rows), width), dtype=bool)
    real = np.zeros((len(rows), width), dtype=bool)
    for r, row in enumerate(rows):
        at = 0
        for ids, lab in row:
            tokens[r, at:at + len(ids)] = ids
            labels[r, at:at + len(ids)] = lab
            at += len(ids)
        real[r, :at] = True
    targets = np.where(labels[:, 1:], tokens[:, 1:], IGNORE)
    return Rows(np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(targets), truncated, dropped,
                np.ascontiguousarray(real[:, :-1]))


def batch_indices(n_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of optimizer step `step`: sample s = step * B + j is position s mod R
    of epoch s div R's permutation, drawn from default_rng([seed, epoch])."""
    out = np.empty(batch_size, dtype=np.int64)
    perms: dict[int, np.ndarray] = {}
    for j in range(batch_size):
        epoch, pos = divmod(step * batch_size + j, n_rows)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_rows)
        out[j] = perms[epoch][pos]
    return out


def first_rows(rows: Rows, n: int, seed: int) -> Rows:
    """The first n rows the sampler draws (step 0's batch when n is the batch size),
    with their padding mask: what LARS calibrates on."""
    idx = batch_indices(len(rows), n, seed, 0)
    return Rows(rows.tokens[idx], rows.targets[idx], real=rows.real[idx])


def calibration_rows(path: str | Path, tokenizer, seq_len: int, n: int, seed: int = 0, packing: str = "pad") -> Rows:
    """first_rows of a whole data file (every record, split marks ignored) laid into
    rows of seq_len tokens."""
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: empty calibration data (no records)")
    rows = make_rows([tokenize(r, tokenizer, seq_len + 2) for r in records], seq_len, pad_id_of(tokenizer), packing,
                     seed)
    return first_rows(rows, n, seed)


def pad_id_of(tokenizer) -> int:
    """The pad token, else eos, else 0 (padding is never a target, so its id only
    has to exist)."""
    for value in (tokenizer.pad_id, tokenizer.eos_id):
        if value is not None:
            return int(value)
    return 0


def stop_ids_of(tokenizer) -> set[int]:
    """Tokens that end a generated answer: eos and the chat end-of-turn tokens of the families."""
    ids = {tokenizer.eos_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):  # Qwen, Llama 3, Phi, Gemma
        ids.add(tokenizer.tok.token_to_id(token))
    return {int(i) for i in ids if i is not None}


# ---------------------------------------------------------------- a whole dataset
@dataclass
class Dataset:
    """Train and eval examples of one data source, tokenized."""

    source: str
    train: list[Example]
    eval: list[Example]
    split_from_file: bool = False
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        kinds = "held-out split from the file" if self.split_from_file else "held-out split by seed"
        return f"{self.source}: {len(self.train)} train / {len(self.eval)} eval examples ({kinds})"


def load_dataset(path: str | Path | None, tokenizer, eval_fraction: float = 0.1, seed: int = 0,
                 max_tokens: int | None = None, eval_max_tokens: int | None = None) -> Dataset:
    """Read, split and tokenize a data file (None: the built-in personal_notes.jsonl);
    train records are tokenized up to max_tokens ids, held-out ones up to
    eval_max_tokens (see tokenize)."""
    path = Path(path) if path is not None else BUILTIN
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: empty dataset (no records)")
    train, held = split_records(records, eval_fraction, seed)
    if not train:
        raise DataError(f"{path}: every record is in the eval split; nothing to train on")
    return Dataset(path.name if path == BUILTIN else str(path), [tokenize(r, tokenizer, max_tokens) for r in train],
                   [tokenize(r, tokenizer, eval_max_tokens) for r in held], any(r.split is not None for r in records))


# ---------------------------------------------------------------- a tokenizer for the tiny preset
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer(vocab_size: int = 97):
    """A character-level tokenizer for the randomly initialised tiny preset (tests and
    dry runs): <|im_end|> (eos, id 0), <|im_start|> (1), newline (2), then printable
    ASCII from the space on, as many as fit; any other character encodes as '?'.
    It carries a ChatML template, so chat records work as they do on an instruct model."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ..models.tokenizer import Tokenizer

    chars = [chr(c) for c in range(32, 127)][:vocab_size - 3]
    if "?" not in chars:
        raise ValueError(f"a character tokenizer needs a vocabulary of at least 35 ids, got {vocab_size}")
    vocab = {"<|im_end|>": 0, "<|im_start|>": 1, "\n": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_end|>", "<|im_start|>")])
    return Tokenizer(tok, bos_id=None, eos_id=0, pad_id=None, chat_template=CHATML_TEMPLATE)


# ---------------------------------------------------------------- scoring
def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation and quotes removed."""
    return " ".join(text.lower().split()).strip(" .,!?;:\"'")


def exact_match(output: str, reference: str) -> bool:
    return normalize(output) == normalize(reference)


def contains_answer(output: str, answer: str) -> bool:
    return normalize(answer) in normalize(output)


__all__ = ["BUILTIN", "DataError", "Dataset", "Example", "IGNORE", "Record", "Rows", "batch_indices",
           "char_tokenizer", "chat_pieces", "contains_answer", "exact_match", "load_dataset", "make_rows", "normalize",
           "pad_id_of", "parse_record", "read_records", "split_records", "stop_ids_of", "tokenize"]
