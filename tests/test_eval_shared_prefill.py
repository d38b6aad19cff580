"""finetune's held-out scoring prefills each prompt once for both the loss and the
greedy answer (train.loss_and_answers). Checked against the two paths it replaces,
which share no code with it past the blocks: the loss of `forward` on each example
alone in a padded row, and the answers of generate_batch."""
import numpy as np
import pytest

from minilars.config import preset
from minilars.data import char_tokenizer, make_rows, parse_record, tokenize
from minilars.methods import MethodConfig, apply_method
from minilars.model import Model
from minilars.train import evaluate, generate_answers, shares_its_prompt

RECORDS = [{"prompt": "What is the code?", "completion": "It is 12345."},
           {"prompt": "What is the name?", "completion": "Ada."},  # the same prompt length as the first
           {"prompt": "Where?", "completion": "At home, by the sea."},
           {"prompt": "And when was that?", "completion": "Late."},
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Bo."}]},
           {"text": "A plain text record has no prompt at all."}]


def _model(method: str, backend: str = "numpy") -> Model:
    """The tiny preset in float64 with `method` applied and every trainable moved
    off its start (LoRA's B and LARS's M start at zero)."""
    model = Model.random(preset("tiny"), seed=3, dtype=np.float64, backend=backend)
    if method != "none":
        config = MethodConfig.lars_default(rank=4) if method == "lars" else MethodConfig(method, rank=4)
        apply_method(model, config, calibration_tokens=np.arange(64, dtype=np.int64).reshape(2, 32) % 90 + 3)
        rng = np.random.default_rng(5)
        for p in model.trainable().values():
            noise = 0.05 * rng.standard_normal(tuple(p.shape))
            if backend == "torch":
                import torch

                p.add_(torch.from_numpy(noise))
            else:
                p += noise
    return model


def _examples(tok):
    return [tokenize(parse_record(r, f"r{i}"), tok) for i, r in enumerate(RECORDS)]


@pytest.mark.parametrize("backend", ["numpy", "numba", "torch"])
@pytest.mark.parametrize("method", ["none", "lora", "lars"])
def test_one_prefill_gives_the_padded_forward_loss_and_the_batched_answers(method, backend):
    pytest.importorskip(backend)
    model, tok = _model(method, backend), char_tokenizer()
    examples = _examples(tok)
    seq_len, stop = 64, {0}
    shared = [shares_its_prompt(ex, seq_len) for ex in examples]
    assert shared == [True, True, True, True, False, False]  # the chat labels an earlier turn; text has no prompt
    result = evaluate(model, tok, examples, 0, seq_len, 2, 0, stop, max_new_tokens=10)
    # the reference: each shared example alone in a padded row through forward, the
    # rest packed as before (they are in rows of their own here too: two short examples)
    total = count = 0
    for ex in [ex for ex, s in zip(examples, shared) if s]:
        rows = make_rows([ex], seq_len, 0, packing="pad")
        tape = model.forward(rows.tokens, rows.targets, need_grad=False)
        total, count = total + tape.loss * tape.n_labelled, count + tape.n_labelled
    rows = make_rows([ex for ex, s in zip(examples, shared) if not s], seq_len, 0, packing="pack", seed=0)
    tape = model.forward(rows.tokens, rows.targets, need_grad=False)
    total, count = total + tape.loss * tape.n_labelled, count + tape.n_labelled
    assert result.loss == pytest.approx(total / count, rel=1e-10)
    prompted = [ex for ex in examples if ex.prompt_ids]
    assert [a.output for a in result.answers] == generate_answers(model, tok, [ex.prompt_ids for ex in prompted],
                                                                  10, stop)
    assert result.n == 5


def test_an_example_longer_than_a_row_keeps_the_packed_path():
    tok = char_tokenizer()
    ex = _examples(tok)[2]
    assert shares_its_prompt(ex, len(ex.ids) - 1) and not shares_its_prompt(ex, len(ex.ids) - 2)
