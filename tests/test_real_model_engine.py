"""The engine on SmolLM2-135M-Instruct: logits against the independent torch
reference loading the same weights, and a greedy answer through the chat template."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from minilars.pretrained import load_pretrained

    return load_pretrained("smollm2-135m")


def test_greedy_answer_through_chat_template_mentions_paris(smollm2):
    from minilars.generate import generate_text

    model, tokenizer = smollm2
    answer = generate_text(model, tokenizer, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer, answer


def test_logits_match_independent_torch_implementation(smollm2):
    torch = pytest.importorskip("torch", reason="the reference implementation is torch")
    from torch_reference import ReferenceLlama

    from minilars.models import load_model_weights

    model, tokenizer = smollm2
    cfg, state, _ = load_model_weights("smollm2-135m", np.float32)
    reference = ReferenceLlama(cfg, state, dtype=torch.float32)
    tokens = np.asarray([tokenizer.encode("The quick brown fox jumps over the lazy dog. def f(x):\n    return x")])
    with torch.no_grad():
        expected = reference.forward(tokens).numpy()
    actual = model.logits(tokens)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    relative = np.abs(actual - expected).max() / np.abs(expected).max()
    assert relative <= 1e-4, relative
