"""Loading every family of models/families.py, from config.json to logits and gradients.

What is checked:
* config.json -> ModelConfig: the published configs of SmolLM2-135M-Instruct,
  Llama-3.2-1B, Qwen2.5-0.5B-Instruct, Qwen3-0.6B, Mistral-7B-v0.3, gemma-3-270m and
  gemma-3-1b-it (tests/fixtures/configs/; the expected values are written from those
  files), both rope layouts (transformers 5's rope_parameters, per layer type for
  Gemma 3, and the older top-level rope_theta / rope_scaling / rope_local_base_freq),
  and a ModelLoadError naming the field for every field the engine does not implement.
* GGUF: the converter's changes (llama.cpp's names, q/k rows permuted for the llama
  architecture only, Gemma's norms stored as 1 + w, Llama 3's rope_freqs) undone exactly.
* Against transformers (test-only): a tiny random model of each family saved with
  save_pretrained (transformers 5's layout, the old rope layout, sharded, bf16) and
  as a GGUF (tests/gguf_writer.py) gives transformers' logits in float32 within 1e-4
  of their scale on the numpy, numba and torch backends; LoRA gradients equal peft's
  autograd through the transformers model, LARS gradients equal autograd with the
  transformers weights W + (P M)^T of a leaf M; the PEFT export (LoRA, IA3, LARS as
  LoRA) loads with peft onto the family's transformers model and gives minilars's logits.
"""
from __future__ import annotations

import copy
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


# ---------------------------------------------------------------- against transformers
# A tiny random transformers model of each family (the shapes of tiny_config: window 8
# on a sliding layer, llama3 scaling with an untied head for llama, head_dim 16 != d/H
# for qwen3 and gemma3), saved with save_pretrained, loaded by minilars from the
# directory and from a GGUF written as llama.cpp's converter writes it; logits in
# float32 within 1e-4 of transformers' relative to the logits' scale, on every backend.
# The transformers configs are written out here, not derived from minilars.

BACKENDS = ("numpy", "numba", "torch")
TOKENS_T = 13  # longer than the window of 8


def hf_config_kwargs(family: str, gguf_compatible: bool = False) -> dict:
    """transformers config arguments of the tiny model (a GGUF-compatible variant where
    llama.cpp fixes what config.json says: Gemma 3's layer pattern, Mistral's window)."""
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True)
    if family == "llama":
        return dict(common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "mistral":
        return dict(common, sliding_window=None if gguf_compatible else 8)
    if family == "qwen2":
        return common
    if family == "qwen3":
        return dict(common, head_dim=16)
    if family == "gemma3":
        kw = dict(common, head_dim=16, rms_norm_eps=1e-6, sliding_window=8, final_logit_softcapping=5.0,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
        if gguf_compatible:  # llama.cpp: every 6th layer global, scores scaled by hd^-1/2, no soft cap key
            return dict(kw, num_hidden_layers=6, query_pre_attn_scalar=16, final_logit_softcapping=None)
        return dict(kw, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=12)
    raise ValueError(family)


def hf_model(family: str, seed: int = 0, gguf_compatible: bool = False, **changes):
    """The transformers model with every parameter random and O(1) in effect: projections
    N(0, 1/in), embeddings N(0, 1/d), norms 1 + 0.2 N(0, 1) as they act (Gemma stores
    w of (1 + w)), biases 0.2 N(0, 1)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fam = FAMILIES[family]
    config_class = type(transformers.AutoConfig.for_model(fam.hf_model_types[0]))
    config = config_class(**dict(hf_config_kwargs(family, gguf_compatible), **changes))
    model = getattr(transformers, fam.hf_architecture)._from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif p.ndim == 1:
                p.copy_((0.0 if family == "gemma3" else 1.0) + 0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model.eval()


def tokens_targets(seed: int = 1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 97, (2, TOKENS_T))
    targets = rng.integers(0, 97, (2, TOKENS_T))
    targets[0, :3] = -100
    return tokens, targets


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def assert_logits_close(actual, reference, name=""):
    """Within 1e-4 of the reference relative to the logits' scale (issue 19's target)."""
    from tolerances import assert_close

    assert_close(actual, reference, tol=(1e-4 * float(np.abs(reference).max()), 0.0), name=name)


def backend(name: str) -> str:
    if name != "numpy":
        pytest.importorskip(name)
    return name


def load(path, backend_name="numpy"):
    from minilars.pretrained import load_model

    model, _ = load_model(str(path), backend=backend(backend_name))
    return model


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_from_the_hf_directory(family, backend_name, tmp_path):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())  # transformers 5's layout
    model = load(tmp_path, backend_name)
    assert model.cfg == tiny_config(family, rms_eps=model.cfg.rms_eps, final_softcap=model.cfg.final_softcap)
    tokens, _ = tokens_targets()
    assert_logits_close(model.logits(tokens), hf_logits(ref, tokens), name=f"{family} {backend_name}")


def to_old_layout(directory: Path) -> None:
    """Rewrite config.json with the rope in the top-level keys older transformers wrote."""
    conf = json.loads((directory / "config.json").read_text())
    params = conf.pop("rope_parameters")
    if "full_attention" in params:  # Gemma 3
        full, sliding = params["full_attention"], params["sliding_attention"]
        conf["rope_local_base_freq"] = sliding["rope_theta"]
        params = full
    conf["rope_theta"] = params.pop("rope_theta")
    conf["rope_scaling"] = None if params.get("rope_type", "default") == "default" else params
    (directory / "config.json").write_text(json.dumps(conf))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_old_layout_sharded_and_bf16(family, tmp_path):
    """The older rope layout, a sharded checkpoint with its index, and bf16 weights."""
    torch = pytest.importorskip("torch")

    tokens, _ = tokens_targets()
    ref = hf_model(family)
    ref.save_pretrained(tmp_path / "old")
    to_old_layout(tmp_path / "old")
    new_cfg = load_model_cfg(tmp_path / "old")
    assert new_cfg.rope_theta == (1e6 if family == "gemma3" else 10000.0)
    assert_logits_close(load(tmp_path / "old").logits(tokens), hf_logits(ref, tokens), name="old layout")

    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert_logits_close(load(tmp_path / "sharded").logits(tokens), hf_logits(ref, tokens), name="sharded")

    with torch.no_grad():  # the reference: bf16-rounded weights, computed in float32 (buffers as they were)
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_logits_close(load(tmp_path / "bf16").logits(tokens), hf_logits(ref, tokens), name="bf16")


def load_model_cfg(directory: Path) -> ModelConfig:
    from minilars.models.hf_loader import load_hf_dir

    return load_hf_dir(directory)[0]


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    return {n: p.detach().float().numpy().copy() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_from_a_gguf(family, backend_name, tmp_path):
    """The same model through a GGUF written as llama.cpp's converter writes it
    (F32 tensors; Mistral as llama, Gemma 3 with llama.cpp's fixed layer pattern)."""
    from gguf_writer import write_gguf

    ref = hf_model(family, gguf_compatible=True)
    ref.save_pretrained(tmp_path / "hf")
    cfg = load_model_cfg(tmp_path / "hf")
    state = hf_state_numpy(ref)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    path = write_gguf(tmp_path / "m.gguf", cfg, state)
    model = load(path, backend_name)
    assert model.cfg == (cfg.with_(family="llama") if family == "mistral" else cfg)
    tokens, _ = tokens_targets()
    assert_logits_close(model.logits(tokens), hf_logits(ref, tokens), name=f"{family} gguf {backend_name}")


def test_smollm2_rope_parameters_regression_end_to_end(tmp_path):
    """Issue 19: a tiny llama saved by transformers 5 with rope_parameters rope_theta 100000
    (as SmolLM2's directory is) loads with 100000, and gives transformers' logits."""
    ref = hf_model("llama", tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    ref.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"} and "rope_theta" not in conf
    model = load(tmp_path)
    assert model.cfg.rope_theta == 100000.0 and model.cfg.rope_scaling is None
    tokens, _ = tokens_targets()
    assert_logits_close(model.logits(tokens), hf_logits(ref, tokens))


def test_qwen2_sliding_layers_match_transformers(tmp_path):
    """use_sliding_window: the layers from max_window_layers on slide (transformers 5)."""
    ref = hf_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ref.save_pretrained(tmp_path)
    model = load(tmp_path)
    assert model.cfg.layer_types == ("full", "sliding") and model.cfg.sliding_window == 8
    tokens, _ = tokens_targets()
    assert_logits_close(model.logits(tokens), hf_logits(ref, tokens))


# ---------------------------------------------------------------- adapters against torch autograd
ALL_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def adapted(family: str, method: str, backend_name: str, tmp_path: Path):
    """(minilars model from the saved HF directory under `method`, every trainable array
    moved off its initial value, the transformers model it came from)."""
    from minilars.methods import MethodConfig, apply_method

    ref = hf_model(family)
    ref.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf", backend_name)
    storage = (("block", "recompute"),) if method == "lars" else ()
    apply_method(model, MethodConfig(method, rank=4, targets=ALL_PROJECTIONS, storage=storage),
                 calibration_tokens=tokens_targets(seed=7)[0])
    rng = np.random.default_rng(3)
    be = model.be
    for _, p in sorted(model.trainable().items()):
        p[...] = be.asarray(be.to_numpy(p) + 0.1 * rng.standard_normal(tuple(p.shape)))
    return model, ref


def torch_loss(logits, targets):
    import torch
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets).reshape(-1),
                           ignore_index=-100)


def assert_grad_close(actual, reference, name):
    """Within 1e-4 of the autograd gradient relative to its scale (issue 19's target)."""
    from tolerances import assert_close

    reference = reference.detach().numpy() if hasattr(reference, "detach") else reference
    assert_close(np.asarray(actual, dtype=np.float32), reference,
                 tol=(1e-4 * float(np.abs(reference).max()), 0.0), name=name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_gradients_match_peft_autograd(family, backend_name, tmp_path):
    """LoRA on every projection, exported in PEFT's format, injected by peft into the
    transformers model: same logits, loss, and every lora_A / lora_B gradient."""
    peft = pytest.importorskip("peft")
    import torch

    from minilars.peft_io import save_adapter
    from minilars.weights import HF_MODULE

    model, ref = adapted(family, "lora", backend_name, tmp_path)
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter", is_trainable=True).eval()
    tokens, targets = tokens_targets(seed=5)
    logits = peft_model(input_ids=torch.as_tensor(tokens)).logits
    assert_logits_close(model.logits(tokens), logits.detach().numpy(), name="logits")
    loss = torch_loss(logits, targets)
    loss.backward()
    tape = model.forward(tokens, targets)
    grads = model.backward(tape)
    assert abs(float(tape.loss) - loss.item()) <= 1e-5 * abs(loss.item())
    params = dict(peft_model.named_parameters())
    assert len(grads) == 2 * 7 * model.cfg.n_layers
    for name, g in grads.items():
        _, layer, _, proj, kind = name.split(".")
        ref_name = f"base_model.model.model.layers.{layer}.{HF_MODULE[proj]}.{kind}.default.weight"
        assert_grad_close(model.be.to_numpy(g).T, params[ref_name].grad, name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lars_gradients_match_autograd_through_transformers(family, backend_name, tmp_path):
    """LARS: the transformers weights become W + (P M)^T with M a torch leaf per
    projection (P the calibrated basis of its stream); the gradient of the same loss
    with respect to M is minilars's dM."""
    torch = pytest.importorskip("torch")
    from torch.func import functional_call

    from minilars.weights import HF_MODULE, PROJECTION_STREAM

    model, ref = adapted(family, "lars", backend_name, tmp_path)
    be = model.be
    leaves, weights = {}, dict(ref.named_parameters())
    for i, block in enumerate(model.sites):
        for proj in ALL_PROJECTIONS:
            site = block[PROJECTION_STREAM[proj]]
            P = torch.as_tensor(be.to_numpy(site.basis), dtype=torch.float32)
            M = torch.tensor(be.to_numpy(site.M[proj]), dtype=torch.float32, requires_grad=True)
            leaves[f"blocks.{i}.{PROJECTION_STREAM[proj]}.{proj}.lars_M"] = M
            name = f"model.layers.{i}.{HF_MODULE[proj]}.weight"
            weights[name] = weights[name].detach() + (P @ M).T  # (out, in)
    tokens, targets = tokens_targets(seed=5)
    logits = functional_call(ref, weights, args=(torch.as_tensor(tokens),)).logits
    assert_logits_close(model.logits(tokens), logits.detach().numpy(), name="logits")
    loss = torch_loss(logits, targets)
    loss.backward()
    tape = model.forward(tokens, targets)
    grads = model.backward(tape)
    assert abs(float(tape.loss) - loss.item()) <= 1e-5 * abs(loss.item())
    assert sorted(grads) == sorted(leaves)
    for name, g in grads.items():
        assert_grad_close(be.to_numpy(g), leaves[name].grad, name)


@pytest.mark.parametrize("method", ["lora", "ia3", "lars"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_export_loads_onto_the_transformers_model(family, method, tmp_path):
    """What minilars saves (LARS as the LoRA it equals) is an adapter peft loads onto the
    family's transformers model by its module names, giving minilars's logits."""
    peft = pytest.importorskip("peft")
    import torch

    from minilars.peft_io import save_adapter

    model, ref = adapted(family, method, "numpy", tmp_path)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA")
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    tokens, _ = tokens_targets(seed=5)
    with torch.no_grad():
        got = peft_model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    assert_logits_close(model.logits(tokens), got, name=f"{family} {method}")
    with peft_model.disable_adapter(), torch.no_grad():
        base = peft_model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(got - base).max() > 1e-2  # the adapter changes the model


# ---------------------------------------------------------------- chat templates
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# template file -> (family, bos, eos, extra template variables)
CHAT = {
    "smollm2-135m-instruct.jinja": ("llama", "<|im_start|>", "<|im_end|>", {}),
    "llama-3.2-instruct.jinja": ("llama", "<|begin_of_text|>", "<|eot_id|>", {"date_string": "26 Jul 2024"}),
    "qwen2.5-0.5b-instruct.jinja": ("qwen2", None, "<|im_end|>", {}),
    "qwen3-0.6b.jinja": ("qwen3", None, "<|im_end|>", {"enable_thinking": False}),
    "gemma-3-it.jinja": ("gemma3", "<bos>", "<eos>", {}),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "the world"}, {"role": "user", "content": "  hello again  "}]


def test_every_template_fixture_is_checked():
    assert sorted(p.name for p in TEMPLATES.glob("*.jinja")) == sorted(CHAT)


@pytest.mark.parametrize("name", sorted(CHAT))
def test_chat_templates_render_as_transformers_does(name, tmp_path):
    """Each family's published template through minilars's jinja2 path (the tokenizer an
    HF directory loads with) gives the text transformers' apply_chat_template gives."""
    transformers = pytest.importorskip("transformers")
    from gguf_writer import byte_vocab
    from minilars.models import Tokenizer, load_model_weights
    from minilars.models.tokenizer import build_bpe

    family, bos, eos, extra = CHAT[name]
    tokens, merges, types = byte_vocab()
    tokens, types = SPECIALS + tokens[3:], [3] * len(SPECIALS) + types[3:]
    build_bpe(tokens, merges, types, split_digits=True).save(str(tmp_path / "tokenizer.json"))
    template = (TEMPLATES / name).read_text()
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    ours = Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt,
                                              **extra)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, **extra) == expected
    # and an HF model directory of the family loads the same tokenizer and template
    hf_model(family).save_pretrained(tmp_path)
    _, _, tok = load_model_weights(tmp_path)
    assert tok.chat_template == template and tok.eos_token == eos
    assert "hello again" in tok.apply_chat_template(MESSAGES, **extra)


def test_models_command_lists_the_families(capsys):
    from minilars.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for fam in FAMILIES.values():
        assert f"  {fam.name} " in out and fam.hf_model_types[0] in out
    assert "smollm2-135m" in out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_merged_loads_in_transformers(family, tmp_path):
    """minilars's merged export (config_to_hf + to_hf) is a directory transformers loads
    as the family's model, computing minilars's logits; and minilars reads it back."""
    transformers = pytest.importorskip("transformers")
    from minilars.methods import MethodConfig, apply_method
    from minilars.model import Model
    from minilars.peft_io import export_merged

    cfg = tiny_config(family, final_softcap=5.0) if family == "gemma3" else tiny_config(family)
    model = Model.random(cfg, seed=3)
    apply_method(model, MethodConfig("lora", rank=4, targets=ALL_PROJECTIONS))
    rng = np.random.default_rng(4)
    for p in model.trainable().values():
        p[...] += 0.1 * rng.standard_normal(p.shape)
    export_merged(model, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(ref).__name__ == FAMILIES[family].hf_architecture
    tokens, _ = tokens_targets()
    assert_logits_close(model.logits(tokens), hf_logits(ref, tokens))
    assert load(tmp_path).cfg == cfg


@pytest.mark.real_model
def test_smollm2_directory_in_the_transformers_5_layout(smollm2_path, tmp_path):
    """Issue 19 on the real weights: SmolLM2-135M saved as a Hugging Face directory with
    the rope under rope_parameters (as transformers 5 writes it) gives the logits of
    its GGUF in minilars, and transformers computes the same from that directory."""
    transformers = pytest.importorskip("transformers")
    from minilars.models import load_model_weights
    from minilars.models.hf_loader import save_hf_dir

    cfg, state, tok = load_model_weights(smollm2_path)
    save_hf_dir(tmp_path, cfg, state, tokenizer=tok)
    del state
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["rope_parameters"] = {"rope_theta": conf.pop("rope_theta"), "rope_type": "default"}
    del conf["rope_scaling"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    tokens = np.array([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    from_gguf = load(smollm2_path).logits(tokens)
    model = load(tmp_path)
    assert model.cfg.rope_theta == 100000.0
    assert_logits_close(model.logits(tokens), from_gguf, name="hf directory vs gguf")
    del model
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_logits_close(from_gguf, hf_logits(ref, tokens), name="minilars vs transformers")
