"""SentencePiece vocabularies from GGUF files (tokenizer.ggml.model "llama"): Gemma 3's, Llama 2's.

The vocabularies are the ones tests/gguf_writer.py writes as llama.cpp's converter does
(`spm_vocab`: a few hundred BPE pieces learned on a small corpus, the 256 byte tokens,
control and user-defined tokens in Gemma's or Llama's layout). transformers, a test-only
reference, reads the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`);
minilars's Tokenizer.from_gguf must encode and decode as it does, render the Gemma 3 chat
template to the same text and ids, and a tiny Gemma 3 GGUF carrying the vocabulary must
load and generate through the CLI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_writer import gemma3_layer_types, spm_vocab, write_gguf
from minilars.models import ModelLoadError, Tokenizer
from minilars.models.families import tiny_config

GEMMA_TEMPLATE = (Path(__file__).parent / "fixtures" / "chat_templates" / "gemma-3-it.jinja").read_text()
# Each layout's GGUF architecture (transformers picks Gemma's builder by it) and its special tokens.
LAYOUTS = {"gemma": ("gemma3", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
           "llama": ("llama", "<s>", "</s>", "<s>", "</s>")}
TEXTS = [
    "", "hello world", "the quick brown fox jumps over the lazy dog.", " leading space", "  two leading spaces",
    "trailing spaces  ", "a   b    c     d", "line one\nline two\n\n\nthree\n", "tabs\tand\t\ttabs", "\n",
    "café naïve résumé über straße", "日本語 😀 ∑ 𝔘 – ok", "ЖЖЖ x", "12345 1234 it's their theory: sea shells?",
    "theirs thereby shellsea worldhello", "otherworldly seashells, thoroughly rethought",  # unseen words
    "▁literal▁pieces", "<0x41> is text, not a byte", "<unk> and <pad> and <mask> and [multimodal]", " ",
]


def special_texts(layout: str) -> list[str]:
    _, bos, eos, start, end = LAYOUTS[layout]
    return [f"{start}user\nhello there{end}\n{start}model\n", f"{bos}hello{eos}", f"x {start} the{end}{end}",
            f"  {bos}  ", f"hi{start}"]


def tiny_cfg(layout: str, vocab_size: int):
    """The tiny model of the layout's family as a GGUF can say it (gguf_writer's rules)."""
    if layout == "gemma":
        return tiny_config("gemma3", n_layers=6, layer_types=gemma3_layer_types(6), attn_scale=None,
                           vocab_size=vocab_size)
    return tiny_config("mistral", sliding_window=None, layer_types=(), vocab_size=vocab_size)


def write_vocab(tmp_path: Path, layout: str, **options) -> Path:
    """A GGUF of the layout's architecture with metadata and vocabulary only."""
    return write_gguf(tmp_path / "t.gguf", tiny_cfg(layout, len(spm_vocab(layout)[0])), None, vocab=layout,
                      **options)


def reference(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_encode_decode_as_transformers(layout, tmp_path):
    path = write_vocab(tmp_path, layout, template=GEMMA_TEMPLATE)
    theirs = reference(path)
    ours = Tokenizer.from_gguf(path)
    assert ours.vocab_size == len(theirs)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    assert ours.add_bos and ours.chat_template == GEMMA_TEMPLATE
    for text in TEXTS + special_texts(layout):
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text  # bos first: the file says add_bos_token
        assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    pieces = [ours.token(i) for i in ours.encode("日本語", add_bos=False)]  # no piece has these: their bytes
    assert pieces == ["▁"] * (layout == "llama") + [f"<0x{b:02X}>" for b in "日本語".encode()]
    if layout == "gemma":  # no space prefix: decoding gives the text back, whatever its spaces
        for text in (t for t in TEXTS if "▁" not in t):  # a "▁" written in the text decodes as a space
            assert ours.decode(ours.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_merge_ranking_matters(layout, tmp_path):
    """The texts above can tell the two rankings apart: Gemma's file order and Llama's
    scores, swapped, give other ids than transformers on some of them."""
    from minilars.models.spm_tokenizer import build_sentencepiece_bpe

    path = write_vocab(tmp_path, layout)
    theirs = reference(path)
    tokens, scores, types, ids = spm_vocab(layout)
    swapped = build_sentencepiece_bpe(tokens, scores, types, list(ids.values()), unk_id=ids["unk"],
                                      add_space_prefix=layout == "llama", rank_by_position=layout != "gemma")
    differ = [t for t in TEXTS if swapped.encode(t, add_special_tokens=False).ids
              != theirs.encode(t, add_special_tokens=False)]
    assert len(differ) >= 3, differ


def test_gemma_chat_template_renders_and_encodes_as_transformers(tmp_path):
    path = write_vocab(tmp_path, "gemma", template=GEMMA_TEMPLATE)
    theirs = reference(path)
    ours = Tokenizer.from_gguf(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo  there\nworld 😀"},
                {"role": "assistant", "content": " the  sea shore "}, {"role": "user", "content": "and then?"}]
    for add_generation_prompt in (True, False):
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        assert ours.encode(text, add_bos=False) == expected["input_ids"]  # the template writes <bos> itself
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\n")


def test_file_flags(tmp_path):
    """add_bos_token false is honoured (as transformers does); add_space_prefix puts one "▁"
    before the text, as llama.cpp does (transformers' Llama builder always does: checked above)."""
    path = write_vocab(tmp_path, "llama", add_bos=False)
    ours, theirs = Tokenizer.from_gguf(path), reference(path)
    assert ours.encode("hello world") == theirs.encode("hello world") and ours.bos_id not in ours.encode("hello")
    (tmp_path / "off").mkdir()
    off = Tokenizer.from_gguf(write_vocab(tmp_path / "off", "llama", add_space_prefix=False))
    assert ours.encode("hello world") == off.encode(" hello world", add_bos=False)
    assert off.encode("hello world", add_bos=False) != ours.encode("hello world")
    assert off.decode(off.encode("hello", add_bos=False)) == "hello"


def _rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """src's metadata (no tensors) with keys dropped or changed: (value, GGUFValueType)."""
    import gguf

    from minilars.models.gguf_loader import field_value

    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), field_value(reader, "general.architecture"))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        if key in changes:
            w.add_key_value(key, *changes[key])
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("drop, changes, message", [
    ((), {"tokenizer.ggml.model": ("t5", "STRING")}, "'t5' is not supported"),
    (("tokenizer.ggml.scores",), {}, "tokenizer.ggml.scores is missing"),
    ((), {"tokenizer.ggml.bos_token_id": (100000, "UINT32")}, "bos_token_id 100000 is outside"),
])
def test_bad_vocabularies_are_refused(drop, changes, message, tmp_path):
    import gguf

    src = write_vocab(tmp_path, "llama")
    changes = {k: (v, getattr(gguf.GGUFValueType, t)) for k, (v, t) in changes.items()}
    with pytest.raises(ModelLoadError, match=message):
        Tokenizer.from_gguf(_rewrite(src, tmp_path / "bad.gguf", drop, **changes))


def test_gemma3_gguf_loads_and_generates(tmp_path, capsys):
    """The whole path: a tiny Gemma 3 GGUF with weights and this vocabulary loads with
    pretrained.load_model, and `minilars generate` streams the greedy continuation of the
    chat-formatted prompt (computed here from the model's logits, without a KV cache)."""
    from minilars.cli import main
    from minilars.data import stop_ids_of
    from minilars.model import Model
    from minilars.pretrained import load_model
    from test_families_loading import random_hf_state

    cfg = tiny_cfg("gemma", len(spm_vocab("gemma")[0]))
    path = write_gguf(tmp_path / "gemma.gguf", cfg, random_hf_state(cfg, seed=1), vocab="gemma",
                      template=GEMMA_TEMPLATE)
    model, tok = load_model(str(path), backend="numpy")
    assert isinstance(model, Model) and model.cfg == cfg and tok.vocab_size == cfg.vocab_size
    prompt = "hello  world"
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)
    assert ids[:2] == [tok.bos_id, tok.tok.token_to_id("<start_of_turn>")]
    new: list[int] = []
    for _ in range(3):
        token = int(np.argmax(model.logits(np.array([ids + new]))[0, -1]))
        if token in stop_ids_of(tok):
            break
        new.append(token)
    assert new, "the random model stopped at once: pick another seed"
    assert main(["generate", "--model", str(path), "--backend", "numpy", "--max-new-tokens", "3", prompt]) == 0
    assert capsys.readouterr().out == tok.decode(new, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_saved_tokenizer_json_reads_back(layout, tmp_path):
    """Tokenizer.save (what an exported model directory carries) gives a tokenizer.json that
    minilars and transformers read back to the same ids and text."""
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_gguf(write_vocab(tmp_path, layout, template=GEMMA_TEMPLATE))
    (tmp_path / "saved").mkdir()
    ours.save(tmp_path / "saved")
    again = Tokenizer.from_file(tmp_path / "saved" / "tokenizer.json", tmp_path / "saved" / "tokenizer_config.json")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (ours.bos_id, ours.eos_id, ours.pad_id, True)
    for text in TEXTS + special_texts(layout):
        ids = ours.encode(text)
        assert again.encode(text) == ids == theirs.encode(text), text
        assert again.decode(ids) == ours.decode(ids) == theirs.decode(ids), text
