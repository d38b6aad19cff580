"""Write GGUF files as llama.cpp's convert_hf_to_gguf.py writes them (tests only).

From a ModelConfig and a Hugging Face-named state dict, with gguf-py's GGUFWriter:
the architecture name and `{arch}.*` keys the converter writes for the family
(LlamaModel for llama and Mistral, Qwen2Model, Qwen3Model, Gemma3Model), llama.cpp's
tensor names, q/k rows permuted for the llama architecture only (LlamaModel.permute),
Gemma's norms stored as 1 + w (Gemma3Model.norm_shift), Llama 3's rope scaling as the
rope_freqs.weight tensor of per-frequency divisors. The converter computes those
divisors with original_max_position_embeddings read from the top level of config.json
(8192 when absent, which is what every Llama 3 uses); here they come from the config's
rope scaling, so a tiny model with another original length is written as it means.

A config that llama.cpp would read back as a different model is refused with a
ValueError instead of being written: Mistral's sliding window (the converter drops
it; llama.cpp's llama architecture attends to everything), and a Gemma 3 whose layer
pattern, sliding-layer rope base or score scale is not the one llama.cpp fixes in code.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import tokenizers
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from minilars.config import ModelConfig
from minilars.models.families import FAMILIES, family_of_gguf_architecture
from minilars.models.gguf_loader import gguf_name, llama3_rope_factors, permute_qk

# Worst error of one block quantiser relative to the block's max |w|: a full
# step (half a step of rounding plus the f16 rounding of the scale, with margin).
QUANT_STEP = {Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 15}

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_vocab(extra_merges: tuple[str, ...] = ()) -> tuple[list[str], list[str], list[int]]:
    """A small byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, a few merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "Ġ t", "Ġt he",
              *extra_merges]
    merged = [m.replace(" ", "") for m in merges]
    tokens = specials + alphabet + merged
    types = [3] * len(specials) + [1] * (len(alphabet) + len(merged))
    return tokens, merges, types


def gguf_architecture(cfg: ModelConfig | None) -> str:
    """The general.architecture the converter writes for cfg's family (Mistral: llama)."""
    if cfg is None or cfg.family == "mistral":
        return "llama"
    return FAMILIES[cfg.family].gguf_architectures[0]


def gemma3_layer_types(n_layers: int) -> tuple[str, ...]:
    """llama.cpp's gemma3 layers (set_swa_pattern(6)): every 6th global, the rest sliding."""
    return tuple("sliding" if i % 6 < 5 else "full" for i in range(n_layers))


def _check_writable(cfg: ModelConfig) -> None:
    if cfg.family == "mistral" and cfg.sliding_window is not None:
        raise ValueError("the converter drops Mistral's sliding_window: llama.cpp would attend to every token")
    if cfg.family == "gemma3":
        types = cfg.layer_types or ("full",) * cfg.n_layers
        if "sliding" in types and types != gemma3_layer_types(cfg.n_layers):
            raise ValueError(f"llama.cpp fixes gemma3's layers to {gemma3_layer_types(cfg.n_layers)}, not {types}")
        if cfg.local_rope_theta not in (None, 10000.0) or cfg.attn_scale is not None:
            raise ValueError("llama.cpp fixes gemma3's sliding rope base to 10000 and its score scale to hd^-1/2")
    if cfg.rope_scaling is not None and cfg.family in ("qwen2", "qwen3", "gemma3") and cfg.rope_scaling.kind != "linear":
        raise ValueError(f"the converter writes no {cfg.rope_scaling.kind} scaling for {cfg.family}")


def _write_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, arch: str) -> None:
    """TextModel.set_gguf_parameters and the family's own keys."""
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.head_dim != cfg.dim // cfg.n_heads or arch in ("qwen3", "gemma3"):  # config.json has head_dim
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
    if arch == "gemma3" and cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)


def write_gguf(path: Path, cfg: ModelConfig | None, state: dict[str, np.ndarray] | None = None,
               qtype: Q = Q.F32, types: dict[str, Q] | None = None, vocab: bool | str = False,
               pre: str = "smollm", template: str | None = CHATML, extra_merges: tuple[str, ...] = (),
               add_space_prefix: bool | None = None, add_bos: bool | None = None) -> Path:
    """A GGUF of cfg's family: HF names -> GGUF names, the converter's per-tensor changes,
    2-D weights stored as `qtype` (or `types[name]`), 1-D ones as F32, as llama.cpp's
    quantisations keep norms and biases.

    vocab: False (none), True (byte_vocab, "gpt2", with the pre-tokenizer `pre`), or
    "gemma" / "llama" (spm_vocab's SentencePiece layout, tokenizer.ggml.model "llama",
    with add_space_prefix and add_bos_token as the converter writes them for the layout
    unless given: Gemma3Model writes add_space_prefix false)."""
    arch = gguf_architecture(cfg)
    fam = family_of_gguf_architecture(arch)  # Mistral is written as llama, q/k permuted
    if cfg is not None:
        _check_writable(cfg)
    w = gguf.GGUFWriter(str(path), arch)
    if cfg is not None:
        _write_metadata(w, cfg, arch)
    if vocab in ("gemma", "llama"):
        _write_spm_vocab(w, vocab, add_space_prefix, add_bos, template)
    elif vocab:
        tokens, merges, token_types = byte_vocab(tuple(extra_merges))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        if template is not None:
            w.add_chat_template(template)
    if cfg is not None and cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3" and state:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg.rope_scaling, cfg.rope_theta,
                                                              cfg.head_dim).astype(np.float32))
    for name, arr in (state or {}).items():
        arr = np.asarray(arr, dtype=np.float32)
        if fam.gguf_permute_qk and ".self_attn.q_proj." in name:
            arr = permute_qk(arr, cfg.n_heads)
        elif fam.gguf_permute_qk and ".self_attn.k_proj." in name:
            arr = permute_qk(arr, cfg.n_kv_heads)
        if name.endswith("norm.weight"):
            arr = arr + np.float32(fam.gguf_norm_shift)
        t = (types or {}).get(name, Q.F32 if arr.ndim == 1 else qtype)
        g = gguf_name(name, cfg)
        if t == Q.F32:
            w.add_tensor(g, arr)
        elif t == Q.F16:
            w.add_tensor(g, arr.astype(np.float16))
        elif t in QUANT_STEP:
            w.add_tensor(g, quantize(arr, t), raw_dtype=t)
        else:  # a type the loader must refuse; the bytes only need the right length
            raw = np.zeros(gguf.quant_shape_to_byte_shape(arr.shape, t), np.uint8)
            w.add_tensor(g, raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- SentencePiece vocabularies

# The text a tiny SentencePiece BPE is trained on (spm_vocab): English with repeats, so
# that words and their parts become pieces and merges compete ("▁th" + "e" vs "▁t" + "he").
SPM_CORPUS = ("the quick brown fox jumps over the lazy dog . the other dog sleeps there , "
              "hello world ! hello there , world of the words . she sells sea shells by the sea shore ; "
              "then they thought the thing through . 12 34 567 1234 ? it's their theory : "
              "café naïve résumé über straße\n\nnew lines\n and tabs\t here")
# Gemma 3's leading tokens (ids 0-5 as in its tokenizer.model), two of its <unusedN>,
# and the chat turn markers; control (3) except [multimodal], user-defined (4) in Gemma's file.
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<unused0>", "<unused1>",
                  "<start_of_turn>", "<end_of_turn>"]


def spm_pieces(corpus: str = SPM_CORPUS, n_merges: int = 260) -> list[str]:
    """A SentencePiece-style BPE learned on `corpus`: spaces become "▁" and start each word
    (a newline or tab is a character of its own word), the most frequent adjacent pair is
    merged `n_merges` times (ties: the pair that sorts first). Returns the merged pieces,
    best first, then every other 2- or 3-character part of the corpus's words (so that
    merges overlap and their order decides: "▁t|he|re" or "▁th|er|e"), then the corpus's
    characters, as sentencepiece orders a BPE model's pieces."""
    from collections import Counter

    words = Counter("▁" + w for w in corpus.split(" ") if w)
    chars = sorted({c for w in words for c in w})
    split = {w: list(w) for w in words}
    pieces: list[str] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, count in words.items():
            for a, b in zip(split[w], split[w][1:]):
                pairs[a, b] += count
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        pieces.append(a + b)
        for w in words:
            s, out, i = split[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            split[w] = out
    parts = sorted({w[i:i + n] for w in words for n in (2, 3) for i in range(len(w) - n + 1)} - set(pieces))
    return pieces + parts + [c for c in chars if c not in pieces]


def spm_vocab(layout: str = "gemma", seed: int = 0) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """(tokens, scores, token types, special ids) of a SentencePiece vocabulary laid out as
    llama.cpp's converter writes one (`_create_vocab_sentencepiece`).

    "gemma": Gemma 3's order (GEMMA_SPECIALS, the 256 byte tokens <0xNN> (type 6), the
    pieces best first, then runs of spaces "  " "   " stored as user-defined text, as in
    Gemma's tokenizer.model), and scores that do *not* follow that order (random), as
    transformers says Gemma's do not: only the file order ranks Gemma's merges.
    "llama": Llama 2's order (<unk> (type 2), <s>, </s>, the byte tokens, the pieces) with the
    pieces shuffled and their rank kept in the scores (-rank), so that only the scores rank
    the merges."""
    rng = np.random.default_rng(seed)
    pieces = spm_pieces()
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    if layout == "gemma":
        spaces = ["  ", "   "]
        tokens = GEMMA_SPECIALS + byte_tokens + pieces + spaces
        types = [3] * 5 + [4] + [5, 5] + [3, 3] + [6] * 256 + [1] * len(pieces) + [4, 4]
        scores = [0.0] * (len(GEMMA_SPECIALS) + 256) + [float(s) for s in rng.uniform(-1000, 0, len(pieces) + 2)]
        return tokens, scores, types, {"bos": 2, "eos": 1, "unk": 3, "pad": 0}
    if layout == "llama":
        order = rng.permutation(len(pieces))
        tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + [pieces[i] for i in order]
        types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
        scores = [0.0] * 259 + [-float(i) for i in order]
        return tokens, scores, types, {"bos": 1, "eos": 2, "unk": 0}
    raise ValueError(f"unknown SentencePiece layout {layout!r}")


def _write_spm_vocab(w: gguf.GGUFWriter, layout: str, add_space_prefix: bool | None, add_bos: bool | None,
                     template: str | None) -> None:
    """The tokenizer.* keys `_set_vocab_sentencepiece` writes (Gemma3Model: no space prefix)."""
    tokens, scores, token_types, ids = spm_vocab(layout)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(token_types)
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_unk_token_id(ids["unk"])
    if "pad" in ids:
        w.add_pad_token_id(ids["pad"])
    w.add_add_bos_token(True if add_bos is None else add_bos)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(layout != "gemma" if add_space_prefix is None else add_space_prefix)
    if template is not None:
        w.add_chat_template(template)
