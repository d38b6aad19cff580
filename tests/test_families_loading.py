"""Loading every family of models/families.py, from config.json to logits and gradients.

What is checked:
* config.json -> ModelConfig: the published configs of SmolLM2-135M-Instruct,
  Llama-3.2-1B, Qwen2.5-0.5B-Instruct, Qwen3-0.6B, Mistral-7B-v0.3, gemma-3-270m and
  gemma-3-1b-it (tests/fixtures/configs/; the expected values are written from those
  files), both rope layouts (transformers 5's rope_parameters, per layer type for
  Gemma 3, and the older top-level rope_theta / rope_scaling / rope_local_base_freq),
  and a ModelLoadError naming the field for every field the engine does not implement.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minilars.config import ModelConfig, RopeScaling
from minilars.models import ModelLoadError
from minilars.models.families import FAMILIES, tiny_config
from minilars.models.hf_loader import config_from_hf, config_to_hf

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def published(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def read(conf: dict) -> ModelConfig:
    return config_from_hf(conf, Path("config.json"))


# ---------------------------------------------------------------- published configs

GEMMA_270M_TYPES = ("sliding",) * 5 + ("full",) + ("sliding",) * 5 + ("full",) + ("sliding",) * 5 + ("full",)
# gemma-3-1b-it says sliding_window_pattern 6 (no layer_types): layers 6, 12, 18, 24 (1-based) are full
GEMMA_1B_TYPES = tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(26))

EXPECTED = {
    "smollm2-135m-instruct.json": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, rope_theta=100000.0,
        rms_eps=1e-5, max_seq_len=8192, tie_embeddings=True, family="llama"),
    "llama-3.2-1b.json": ModelConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, rope_theta=500000.0,
        rms_eps=1e-5, max_seq_len=131072, tie_embeddings=True, head_dim=64, family="llama",
        rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_seq_len=8192)),
    "qwen2.5-0.5b-instruct.json": ModelConfig(  # use_sliding_window false: no window despite sliding_window 32768
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, rope_theta=1e6,
        rms_eps=1e-6, max_seq_len=32768, tie_embeddings=True, family="qwen2", attn_bias=True),
    "qwen3-0.6b.json": ModelConfig(  # head_dim 128 while dim / heads = 64
        vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072, rope_theta=1e6,
        rms_eps=1e-6, max_seq_len=40960, tie_embeddings=True, head_dim=128, family="qwen3", qk_norm=True),
    "mistral-7b-instruct-v0.3.json": ModelConfig(  # sliding_window null: every layer full
        vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, rope_theta=1e6,
        rms_eps=1e-5, max_seq_len=32768, tie_embeddings=False, family="mistral"),
    "gemma-3-270m.json": ModelConfig(  # query_pre_attn_scalar 256 = head_dim: the default score scale
        vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, ffn_dim=2048, rope_theta=1e6,
        rms_eps=1e-6, max_seq_len=32768, tie_embeddings=True, head_dim=256, family="gemma3", qk_norm=True,
        norm_offset=1.0, sandwich_norms=True, activation="gelu_tanh", embed_scale=640 ** 0.5,
        local_rope_theta=10000.0, sliding_window=512, layer_types=GEMMA_270M_TYPES),
    "gemma-3-1b-it.json": ModelConfig(
        vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, ffn_dim=6912, rope_theta=1e6,
        rms_eps=1e-6, max_seq_len=32768, tie_embeddings=True, head_dim=256, family="gemma3", qk_norm=True,
        norm_offset=1.0, sandwich_norms=True, activation="gelu_tanh", embed_scale=1152 ** 0.5,
        local_rope_theta=10000.0, sliding_window=512, layer_types=GEMMA_1B_TYPES),
}


def test_every_published_config_has_a_fixture():
    assert sorted(p.name for p in CONFIGS.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_config(name):
    assert read(published(name)) == EXPECTED[name]


def to_rope_parameters(conf: dict) -> dict:
    """The config as transformers 5 writes it: rope base and scaling under rope_parameters
    (per layer type for Gemma 3), no top-level rope_theta / rope_scaling."""
    conf = dict(conf)
    theta, scaling = conf.pop("rope_theta", None), conf.pop("rope_scaling", None)
    local = conf.pop("rope_local_base_freq", None)
    params = {"rope_type": "default", **(scaling or {})}
    if theta is not None:
        params["rope_theta"] = theta
    if conf["model_type"] == "gemma3_text":
        sliding = {"rope_type": "default"} if local is None else {"rope_type": "default", "rope_theta": local}
        params = {"full_attention": params, "sliding_attention": sliding}
    conf["rope_parameters"] = params
    return conf


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_config_in_the_transformers_5_layout(name):
    conf = to_rope_parameters(published(name))
    assert "rope_theta" not in conf and "rope_scaling" not in conf
    assert read(conf) == EXPECTED[name]


def test_smollm2_rope_parameters_regression():
    """Issue 19: a SmolLM2 directory saved by transformers 5 loaded with rope_theta 10000."""
    conf = published("smollm2-135m-instruct.json")
    del conf["rope_theta"], conf["rope_scaling"]
    conf["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    assert read(conf).rope_theta == 100000.0
    # and the rope_parameters of Llama 3 carry its llama3 scaling
    conf = to_rope_parameters(published("llama-3.2-1b.json"))
    assert read(conf).rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def test_gemma3_rope_per_layer_type():
    conf = to_rope_parameters(published("gemma-3-270m.json"))
    conf["rope_parameters"]["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 2e6}
    conf["rope_parameters"]["sliding_attention"]["rope_theta"] = 5000.0
    cfg = read(conf)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.local_rope_theta) == (2e6, RopeScaling("linear", 8.0), 5000.0)
    assert cfg.rope_of_layer(0) == (5000.0, None) and cfg.rope_of_layer(5) == (2e6, RopeScaling("linear", 8.0))
    # the same in the old layout: rope_scaling is the full layers'
    old = dict(published("gemma-3-270m.json"), rope_theta=2e6, rope_local_base_freq=5000.0,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert read(old) == cfg


def test_sliding_layers_as_transformers_derives_them():
    # Mistral: sliding_window applies to every layer; absent, transformers' default 4096
    mistral = published("mistral-7b-instruct-v0.3.json")
    assert read(dict(mistral, sliding_window=4096)).layer_types == ("sliding",) * 32
    del mistral["sliding_window"]
    assert read(mistral).sliding_window == 4096
    # Qwen: use_sliding_window turns it on for the layers from max_window_layers on
    qwen = dict(published("qwen2.5-0.5b-instruct.json"), use_sliding_window=True, sliding_window=64)
    cfg = read(qwen)
    assert cfg.sliding_window == 64 and cfg.layer_types == ("full",) * 21 + ("sliding",) * 3
    # Gemma 3 without layer_types or pattern: every 6th layer full
    gemma = {k: v for k, v in published("gemma-3-1b-it.json").items() if k != "sliding_window_pattern"}
    assert read(gemma).layer_types == GEMMA_1B_TYPES
    assert read(dict(gemma, sliding_window_pattern=2)).layer_types == ("sliding", "full") * 13


# ---------------------------------------------------------------- fields the engine does not implement

REFUSED = [
    ("llama-3.2-1b.json", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ("llama-3.2-1b.json", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ("llama-3.2-1b.json", {"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_type 'longrope'"),
    ("llama-3.2-1b.json", {"mlp_bias": True}, "mlp_bias = True"),
    ("llama-3.2-1b.json", {"attention_bias": True}, "attention_bias = True"),
    ("llama-3.2-1b.json", {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ("llama-3.2-1b.json", {"attention_dropout": 0.1}, "attention_dropout = 0.1"),
    ("smollm2-135m-instruct.json", {"rope_interleaved": True}, "rope_interleaved = True"),
    ("smollm2-135m-instruct.json", {"partial_rotary_factor": 0.5}, "'partial_rotary_factor'"),
    ("smollm2-135m-instruct.json", {"sliding_window": 128}, "'sliding_window'"),
    ("smollm2-135m-instruct.json", {"quantization_config": {"quant_method": "gptq"}}, "'quantization_config'"),
    ("smollm2-135m-instruct.json", {"model_type": "phi3"}, "model_type 'phi3'"),
    ("smollm2-135m-instruct.json", {"architectures": ["LlamaForSequenceClassification"]},
     "LlamaForSequenceClassification"),
    ("smollm2-135m-instruct.json", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e5,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192, "mscale": 1.0}},
     "'mscale'"),
    ("smollm2-135m-instruct.json", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e4}},
     "rope_theta = 100000 disagrees"),
    ("qwen2.5-0.5b-instruct.json", {"use_mrope": True}, "use_mrope = True"),
    ("qwen2.5-0.5b-instruct.json", {"layer_types": ["sliding_attention"] * 24}, "use_sliding_window is false"),
    ("qwen3-0.6b.json", {"attention_bias": True}, "attention_bias = True"),
    ("qwen3-0.6b.json", {"use_sliding_window": True, "sliding_window": None}, "sliding_window is null"),
    ("gemma-3-270m.json", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping = 50.0"),
    ("gemma-3-270m.json", {"use_bidirectional_attention": True}, "use_bidirectional_attention = True"),
    ("gemma-3-270m.json", {"hidden_activation": "gelu"}, "hidden_activation = 'gelu'"),
    ("gemma-3-270m.json", {"layer_types": ["chunked_attention"] * 18}, "'chunked_attention'"),
    ("gemma-3-270m.json", {"layer_types": ["full_attention"] * 3}, "one type per layer"),
    ("gemma-3-270m.json", {"rope_scaling": None, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope scaling \\(linear\\) on the sliding layers"),
    ("mistral-7b-instruct-v0.3.json", {"layer_types": ["full_attention"] * 32}, "'layer_types'"),
]


@pytest.mark.parametrize("name, change, message", REFUSED)
def test_unimplemented_fields_stop_the_load_by_name(name, change, message):
    conf = dict(published(name), **change)
    with pytest.raises(ModelLoadError, match=message):
        read(conf)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_to_hf_reads_back_and_transformers_agrees(family):
    """What minilars writes (export_merged) reads back to the same config, in both
    rope layouts, and transformers' config class reads the same numbers from it."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(family)
    conf = config_to_hf(cfg)
    assert read(conf) == cfg and read(to_rope_parameters(conf)) == cfg
    hf = transformers.AutoConfig.for_model(**conf)
    assert type(hf).__name__ == type(transformers.AutoConfig.for_model(FAMILIES[family].hf_model_types[0])).__name__
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads, hf.head_dim) == (
        cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    assert read(hf.to_dict()) == cfg  # transformers 5 writes rope_parameters: the reader takes either


# ---------------------------------------------------------------- GGUF: names, rows, norms, metadata

def gguf_config(family: str) -> ModelConfig:
    """tiny_config as a GGUF can say it: Gemma 3 with llama.cpp's fixed layer pattern
    (6 layers: 5 sliding, 1 global), sliding rope base 10000 and score scale hd^-1/2;
    Mistral without its window (the converter drops it)."""
    from gguf_writer import gemma3_layer_types

    if family == "gemma3":
        return tiny_config("gemma3", n_layers=6, layer_types=gemma3_layer_types(6), attn_scale=None)
    if family == "mistral":
        return tiny_config("mistral", sliding_window=None, layer_types=())
    return tiny_config(family)


def random_hf_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    from minilars.models.layout import expected_shapes

    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * (0.3 if len(s) == 1 else 1 / np.sqrt(s[-1]))).astype(np.float32)
            for n, s in expected_shapes(cfg).items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_round_trip_per_family(family, tmp_path):
    """The converter's changes (names, q/k rows for llama only, Gemma's 1 + w, rope_freqs)
    are undone exactly; the config comes back (Mistral as the llama architecture)."""
    import gguf
    from gguf_writer import write_gguf
    from minilars.models.gguf_loader import load_gguf

    cfg = gguf_config(family)
    state = random_hf_state(cfg)
    path = write_gguf(tmp_path / "m.gguf", cfg, state)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    got_cfg, loaded = load_gguf(path)
    assert got_cfg == (cfg.with_(family="llama") if family == "mistral" else cfg)
    assert sorted(loaded) == sorted(state)
    for name, ref in state.items():
        if family == "gemma3" and name.endswith("norm.weight"):  # the file holds float32(1 + w)
            ref = (ref + np.float32(1)) - np.float32(1)
        np.testing.assert_array_equal(loaded[name], ref, err_msg=name)
    if family == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    if family in ("qwen3", "gemma3"):
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    if family == "gemma3":
        assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
    assert ("rope_freqs.weight" in names) == (family == "llama")
    assert ("output.weight" in names) == (not cfg.tie_embeddings)


def test_gguf_stores_what_the_converter_stores(tmp_path):
    """Independent of the loader: Gemma's norms are 1 + w in the file, llama's q rows
    are permuted and Qwen's are not."""
    import gguf
    from gguf_writer import write_gguf
    from minilars.models.gguf_loader import permute_qk

    for family in ("gemma3", "llama", "qwen3"):
        cfg = gguf_config(family)
        state = random_hf_state(cfg)
        tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(
            write_gguf(tmp_path / f"{family}.gguf", cfg, state)).tensors}
        q = state["model.layers.0.self_attn.q_proj.weight"]
        stored_q = tensors["blk.0.attn_q.weight"].reshape(q.shape)
        np.testing.assert_array_equal(stored_q, permute_qk(q, cfg.n_heads) if family == "llama" else q)
        shift = 1.0 if family == "gemma3" else 0.0
        np.testing.assert_array_equal(tensors["blk.0.attn_norm.weight"],
                                      state["model.layers.0.input_layernorm.weight"] + np.float32(shift))


def test_llama3_rope_freqs_give_back_the_scaling():
    """Llama 3.2's own scaling (factor 32, 1, 4, 8192) comes back exactly from its divisors."""
    from minilars.models.gguf_loader import llama3_rope_factors, llama3_scaling_from_freqs

    scaling = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    factors = llama3_rope_factors(scaling, 500000.0, 64).astype(np.float32).astype(np.float64)
    assert 1.0 < factors[16] < 32.0  # some frequencies lie in the smoothed band
    assert llama3_scaling_from_freqs(factors, 500000.0, 64, Path("m.gguf")) == scaling
    with pytest.raises(ModelLoadError, match="rope_freqs.weight"):
        llama3_scaling_from_freqs(factors[::-1].copy(), 500000.0, 64, Path("m.gguf"))


@pytest.mark.parametrize("key, value, message", [
    ("rope.scaling.type", "yarn", "rope.scaling.type = 'yarn'"),
    ("expert_count", 8, "expert_count = 8"),
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping"),
])
def test_gguf_keys_the_engine_does_not_implement(tmp_path, key, value, message):
    import gguf
    from gguf_writer import write_gguf
    from minilars.models.gguf_loader import load_gguf

    cfg = gguf_config("qwen2")
    path = write_gguf(tmp_path / "m.gguf", cfg, random_hf_state(cfg))
    # rewrite the file with one more key
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "qwen2")
    for name, field in reader.fields.items():
        if name.startswith("qwen2."):
            kind = field.types[0]
            w.add_key_value(name, field.contents(), kind)
    full = f"qwen2.{key}"
    if isinstance(value, str):
        w.add_string(full, value)
    elif isinstance(value, float):
        w.add_float32(full, value)
    else:
        w.add_uint32(full, value)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=message):
        load_gguf(tmp_path / "bad.gguf")


def test_gguf_unknown_architecture(tmp_path):
    import gguf
    from minilars.models.gguf_loader import load_gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "phi3")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture 'phi3' is not supported.*qwen2"):
        load_gguf(tmp_path / "m.gguf")
