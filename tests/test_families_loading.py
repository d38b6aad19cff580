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
