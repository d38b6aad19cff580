"""Tokenizer: a `tokenizers.Tokenizer` plus the special ids and the chat template.

Two sources give the same object:

* `from_file`: a Hugging Face `tokenizer.json` (+ optional `tokenizer_config.json`
  for the special tokens and the chat template);
* `from_gguf`: the `tokenizer.ggml.*` metadata of a llama.cpp GGUF. For a byte-level
  BPE ("gpt2") vocabulary the GGUF keeps the HF token strings and merges verbatim,
  so rebuilding the HF pipeline from them only needs the pre-tokenizer that
  `tokenizer.ggml.pre` names. llama.cpp's "smollm" (like "starcoder") splits every
  `\\p{N}` code point on its own, then applies the GPT-2 regex; HF's tokenizer.json
  for SmolLM2 says the same as `Sequence[Digits(individual_digits=True),
  ByteLevel(add_prefix_space=False, use_regex=True)]`, which is what we build.
  "llama-bpe" (Llama 3) and "qwen2" split with their own regex first
  (`Sequence[Split(regex, isolated), ByteLevel(use_regex=False)]`, as their
  tokenizer.json files do; Qwen2's also NFC-normalises). A SentencePiece vocabulary
  (tokenizer.ggml.model "llama": Gemma 3, Llama 2, Mistral) has pieces and scores but
  no merges; models/spm_tokenizer.py rebuilds its BPE as transformers does.

Chat templates are rendered as `transformers` does (`apply_chat_template`): a
sandboxed Jinja environment with trim_blocks/lstrip_blocks, loop controls,
`raise_exception`, and `bos_token`/`eos_token` in scope.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import ModelLoadError
from .spm_tokenizer import GEMMA_ARCHITECTURES, build_sentencepiece_bpe

# llama.cpp's llama_token_type values (gguf.TokenType).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# The regexes Llama 3's and Qwen2's tokenizer.json split with before byte-level BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre values whose llama.cpp pre-tokenizers we reproduce ->
# (split regex or None for GPT-2's, split digits singly, NFC-normalise).
_PRE_TOKENIZERS = {
    "gpt-2": (None, False, False),
    "smollm": (None, True, False),
    "starcoder": (None, True, False),
    "refact": (None, True, False),
    "codeshell": (None, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, False),
    "llama3": (_LLAMA3_SPLIT, False, False),
    "llama-v3": (_LLAMA3_SPLIT, False, False),
    "qwen2": (_QWEN2_SPLIT, False, True),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, True),
}


class Tokenizer:
    """Text <-> token ids, special ids, and chat formatting."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, chat_template: str | None = None, add_bos: bool = False):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.chat_template = chat_template
        self.add_bos = add_bos  # prepend bos in encode(); False for SmolLM2

    # ---- constructors -------------------------------------------------------------

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, tokenizer_config: str | Path | None = None) -> "Tokenizer":
        """From HF files; special tokens and template come from tokenizer_config.json if given."""
        tokenizer_json = Path(tokenizer_json)
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(f"not a readable tokenizer.json ({e})", tokenizer_json) from e
        conf: dict = {}
        if tokenizer_config is not None:
            try:
                conf = json.loads(Path(tokenizer_config).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"not a readable tokenizer_config.json ({e})", tokenizer_config) from e

        def special_id(key):
            token = conf.get(key)
            if isinstance(token, dict):  # {"content": "<|im_end|>", ...} in older configs
                token = token.get("content")
            return None if token is None else tok.token_to_id(token)

        template = conf.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        return cls(tok, special_id("bos_token"), special_id("eos_token"), special_id("pad_token"),
                   template, bool(conf.get("add_bos_token", False)))

    @classmethod
    def from_gguf(cls, path: str | Path, reader=None) -> "Tokenizer":
        """Rebuild the HF tokenizer (byte-level or SentencePiece BPE) from a GGUF's `tokenizer.ggml.*` keys."""
        from .gguf_loader import field_value, open_gguf  # gguf_loader is heavy; only GGUF users need it

        path = Path(path)
        reader = open_gguf(path) if reader is None else reader
        model = field_value(reader, "tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ModelLoadError(f"tokenizer.ggml.model {model!r} is not supported (byte-level BPE 'gpt2' and "
                                 f"SentencePiece BPE 'llama' are); load the model's Hugging Face directory, "
                                 f"whose tokenizer.json minilars reads", path)
        tokens = field_value(reader, "tokenizer.ggml.tokens")
        types = field_value(reader, "tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens or []))
        if not tokens or len(types) != len(tokens):
            raise ModelLoadError("tokenizer.ggml.tokens is missing or does not match tokenizer.ggml.token_type", path)

        def special_id(key):
            value = field_value(reader, f"tokenizer.ggml.{key}_token_id")
            if value is not None and not 0 <= int(value) < len(tokens):
                raise ModelLoadError(f"tokenizer.ggml.{key}_token_id {value} is outside the {len(tokens)} tokens", path)
            return None if value is None else int(value)

        if model == "gpt2":
            pre = field_value(reader, "tokenizer.ggml.pre", "gpt-2")
            if pre not in _PRE_TOKENIZERS:
                raise ModelLoadError(f"tokenizer.ggml.pre {pre!r} is not supported "
                                     f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})", path)
            split, digits, nfc = _PRE_TOKENIZERS[pre]
            tok = build_bpe(tokens, field_value(reader, "tokenizer.ggml.merges", []), types, split_digits=digits,
                            path=path, split_regex=split, nfc=nfc)
            add_bos = False
        else:  # SentencePiece; llama.cpp adds bos and a space prefix unless the file says not to
            scores = field_value(reader, "tokenizer.ggml.scores")
            gemma = field_value(reader, "general.architecture") in GEMMA_ARCHITECTURES
            if not gemma and (scores is None or len(scores) != len(tokens)):
                raise ModelLoadError("tokenizer.ggml.scores is missing or does not match tokenizer.ggml.tokens", path)
            named = [i for i in map(special_id, ("bos", "eos", "unknown", "padding")) if i is not None]
            prefix = bool(field_value(reader, "tokenizer.ggml.add_space_prefix", True))
            tok = build_sentencepiece_bpe(tokens, scores, types, named, unk_id=special_id("unknown"),
                                          add_space_prefix=prefix, rank_by_position=gemma)
            add_bos = True
        add_bos = bool(field_value(reader, "tokenizer.ggml.add_bos_token", add_bos))
        bos = special_id("bos")
        if add_bos and bos is not None:
            add_bos_step(tok, bos)
        return cls(tok, bos, special_id("eos"), special_id("padding"), field_value(reader, "tokenizer.chat_template"),
                   add_bos)

    # ---- text <-> ids ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids; special tokens written in the text (e.g. "<|im_end|>") become one id."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> str | None:
        return self.tok.id_to_token(int(i))

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.token(self.eos_id)

    @property
    def pad_token(self) -> str | None:
        return None if self.pad_id is None else self.token(self.pad_id)

    # ---- chat -------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self):
        import jinja2.ext
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers overrides Jinja's tojson, which would HTML-escape quotes.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render [{"role": ..., "content": ...}, ...] with the model's template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            pad_token=self.pad_token or "", **kwargs)

    # ---- export -----------------------------------------------------------------------

    def to_tokenizer_json(self) -> str:
        """The HF tokenizer.json text; `tokenizers.Tokenizer.from_str` reads it back."""
        return self.tok.to_str()

    def tokenizer_config(self) -> dict:
        """The fields of an HF tokenizer_config.json that `from_file` reads back."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token,
                "add_bos_token": self.add_bos, "chat_template": self.chat_template}

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory`."""
        from minilars.files import write_text

        directory = Path(directory)
        write_text(directory / "tokenizer.json", self.to_tokenizer_json())
        write_text(directory / "tokenizer_config.json", json.dumps(self.tokenizer_config(), indent=2,
                                                                   ensure_ascii=False))


def add_bos_step(tok: tokenizers.Tokenizer, bos: int) -> None:
    """Append "bos $A" to tok's post-processor. Tokenizer.encode prepends bos itself (it
    encodes without the post-processor); this is for the tokenizer.json that save() writes,
    from which transformers adds bos only if the post-processor says so (tokenizer_config's
    add_bos_token alone does not make it)."""
    token = tok.id_to_token(bos)
    step = processors.TemplateProcessing(single=[token, "$A"], pair=[token, "$A", token, "$B"],
                                         special_tokens=[(token, bos)])
    tok.post_processor = step if tok.post_processor is None else processors.Sequence([tok.post_processor, step])


def build_bpe(tokens: list[str], merges: list[str], types: list[int], split_digits: bool,
              path: Path | None = None, split_regex: str | None = None, nfc: bool = False) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` laid out like HF's GPT-2-family tokenizer.json
    (or, with `split_regex`, like Llama 3's / Qwen2's: that regex splits, then bytes map)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated string keeps its first id, as in llama.cpp
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")  # byte-level tokens never hold a literal space
        if not sep:
            raise ModelLoadError(f"malformed merge {m!r} in tokenizer.ggml.merges", path)
        pairs.append((left, right))
    tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if split_regex is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens must never come out of BPE merges of their characters, and must
    # encode as one id when they appear in text (a chat template writes them).
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok
