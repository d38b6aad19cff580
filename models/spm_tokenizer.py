"""A SentencePiece BPE vocabulary from a GGUF (tokenizer.ggml.model "llama") as a `tokenizers` BPE.

llama.cpp's converter (`_create_vocab_sentencepiece`) keeps a SentencePiece model's pieces,
their scores and types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
<0xNN>), but no merges: SentencePiece BPE merges the adjacent pair whose concatenation
is the best piece. A BPE with one merge per way of cutting each piece in two, ranked by
that piece, encodes the same; the rank is what transformers uses to rebuild the same
file (transformers/integrations/gguf/gguf_tokenizer_mapping.py, `generate_merges`),
whose encoding and decoding this module reproduces (tests/test_gguf_tokenizer.py):

* rank: the piece's score, except for Gemma (general.architecture gemma, gemma2, gemma3),
  whose scores do not follow its merge order; there the file order ranks the pieces
  (earlier is better);
* Gemma stores its runs of spaces ("  ", user-defined) as spaces, while the text they
  must match has its spaces replaced by "▁": they are respelled "▁▁";
* text: every space becomes "▁" (Metaspace, no split into words); with
  tokenizer.ggml.add_space_prefix (llama.cpp's default; Gemma writes false) a "▁" is
  put before the text unless it begins with one, or with a special token;
* a character with no piece is encoded as its UTF-8 bytes, the tokens <0xNN>
  (byte fallback), and decoded back; the unknown token only if those are missing;
* control and unknown tokens, and the bos / eos / unk / padding tokens the file names,
  are special tokens: written in the text they are one id, never cut into pieces;
  user-defined ones are matched whole too, without being special.
"""
from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.models import BPE

# llama.cpp's llama_token_type values (gguf.TokenType).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
SPACE = "▁"  # U+2581, SentencePiece's visible space


def respell_spaces(token: str) -> str:
    """Gemma's runs of spaces ("  ") as the normalised text spells them ("▁▁")."""
    return SPACE * len(token) if token and set(token) == {" "} else token


def sentencepiece_merges(tokens: list[str], rank: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    Every cut of a piece p into two pieces (l, r) of the vocabulary is a merge l + r -> p,
    ranked by rank[p] (higher merges first); merges of the same piece go longer left part
    first, then longer right part, then by the ids of (l, r). Pieces are visited in `rank`'s
    order, which breaks the remaining ties (as transformers' `generate_merges` does).
    """
    ids = {t: i for i, t in enumerate(tokens)}  # a repeated string keeps its last id
    candidates = []  # (rank of the merged piece, len(l), len(r), l, r)
    for piece, key in rank.items():
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        cuts.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        candidates += [(key, len(left), len(right), left, right) for left, right in cuts]
    candidates.sort(key=lambda c: c[:3], reverse=True)  # stable: equal keys keep the visiting order
    return [(left, right) for _, _, _, left, right in candidates]


def build_sentencepiece_bpe(tokens: list[str], scores: list[float] | None, types: list[int],
                            named_specials: list[int], unk_id: int | None = None, add_space_prefix: bool = True,
                            rank_by_position: bool = False) -> tokenizers.Tokenizer:
    """The `tokenizers` BPE of a GGUF's SentencePiece vocabulary (see the module docstring).

    named_specials: the ids the file names as bos, eos, unk and padding tokens.
    rank_by_position: rank merges by file order (Gemma) instead of by `scores`.
    """
    stored = tokens
    if rank_by_position:
        tokens = [respell_spaces(t) for t in tokens]
        rank = {t: -float(i) for i, t in enumerate(tokens)}
    else:
        rank = dict(zip(tokens, scores))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[unk_id] if unk_id is not None else None
    tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=sentencepiece_merges(tokens, rank), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
    # Spaces -> "▁" without splitting: SentencePiece merges across what were words.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=(
        "first" if add_space_prefix else "never"), split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] if add_space_prefix else steps)
    specials = set(named_specials)
    special = [AddedToken(t, special=True, normalized=False) for i, (t, ty) in enumerate(zip(tokens, types))
               if ty in (_CONTROL, _UNKNOWN) or i in specials]
    # A respelled run of spaces is left to BPE: the text it matches has no "▁" before normalising.
    user = [AddedToken(t, special=False, normalized=False) for i, (t, ty) in enumerate(zip(tokens, types))
            if ty == _USER_DEFINED and i not in specials and t == stored[i]]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok
