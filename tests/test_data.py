"""Datasets: record shapes, loss masks exactly on completion tokens, rows, errors with file:line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from minilars.data import (BUILTIN, IGNORE, DataError, batch_indices, char_tokenizer, chat_pieces, contains_answer,
                           exact_match, load_dataset, make_rows, parse_record, read_records, split_records, tokenize)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def raw_tok():
    """The same characters without a chat template (a base model)."""
    t = char_tokenizer()
    t.chat_template = None
    return t


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labelled_text(tok, ex) -> str:
    return tok.decode(ex.ids[ex.labelled])


# ---------------------------------------------------------------- formats and masks
def test_prompt_completion_with_template_labels_exactly_the_completion_and_end_of_turn(tok):
    ex = tokenize(parse_record({"prompt": "Who?", "completion": "Mira."}, "f:1"), tok)
    assert tok.decode(ex.ids) == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\nMira.<|im_end|>\n"
    assert labelled_text(tok, ex) == "Mira.<|im_end|>\n"
    # the labelled tokens are one contiguous run at the end
    first = int(np.argmax(ex.labelled))
    assert ex.labelled[first:].all() and not ex.labelled[:first].any()
    assert tok.decode(list(ex.prompt_ids)) == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    assert (ex.question, ex.reference) == ("Who?", "Mira.")


def test_prompt_completion_without_template_is_prompt_then_completion_and_eos(raw_tok):
    ex = tokenize(parse_record({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, "f:1"), raw_tok)
    assert raw_tok.decode(ex.ids) == "Q: 2+2?\nA: 4<|im_end|>"
    assert labelled_text(raw_tok, ex) == " 4<|im_end|>"


def test_chat_labels_every_assistant_turn_and_nothing_else(tok):
    record = parse_record({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Cat?"},
        {"role": "assistant", "content": "Pumpernickel."}]}, "f:1")
    ex = tokenize(record, tok)
    assert labelled_text(tok, ex) == "Hello.<|im_end|>\nPumpernickel.<|im_end|>\n"
    pieces = chat_pieces(record.messages, tok)
    assert "".join(text for text, _ in pieces) == tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in record.messages], add_generation_prompt=False)
    assert ex.reference == "Pumpernickel." and ex.question == "Cat?"
    assert tok.decode(list(ex.prompt_ids)).endswith("<|im_start|>user\nCat?<|im_end|>\n<|im_start|>assistant\n")


def test_text_records_and_txt_files_label_every_token_but_the_first(tok, tmp_path):
    ex = tokenize(parse_record({"text": "abc"}, "f:1"), tok)
    assert tok.decode(ex.ids) == "abc<|im_end|>"
    assert ex.labelled.tolist() == [False, True, True, True]
    (tmp_path / "notes.txt").write_text("Mira likes quince.\n")
    records = read_records(tmp_path / "notes.txt")
    assert len(records) == 1 and records[0].text == "Mira likes quince.\n"
    assert records[0].where.endswith("notes.txt:1")


def test_a_directory_reads_its_jsonl_and_txt_files_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "two"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    (tmp_path / "c.txt").write_text("three")
    (tmp_path / "ignored.csv").write_text("x")
    assert [r.text for r in read_records(tmp_path)] == ["one", "two", "three"]


def test_targets_are_shifted_labels_and_minus_100_elsewhere(tok):
    ex = tokenize(parse_record({"prompt": "Q", "completion": "AB"}, "f:1"), tok)
    rows = make_rows([ex], seq_len=40, pad_id=0, packing="pad")
    tokens, targets = rows.tokens[0], rows.targets[0]
    n = len(ex.ids)
    assert tokens[:n - 1].tolist() == ex.ids[:-1].tolist()
    for t in range(40):
        if t + 1 < n and ex.labelled[t + 1]:
            assert targets[t] == ex.ids[t + 1]  # position t predicts token t + 1
        else:
            assert targets[t] == IGNORE
    assert (targets != IGNORE).sum() == ex.labelled[1:].sum()
    assert (tokens[n:] == 0).all()  # padding after the example, never a target


def test_packing_keeps_examples_whole_and_every_label(tok):
    examples = [tokenize(parse_record({"prompt": f"q{i}", "completion": "a" * (i + 1)}, f"f:{i}"), tok)
                for i in range(12)]
    rows = make_rows(examples, seq_len=64, pad_id=0, packing="pack", seed=3)
    assert rows.tokens.shape[1] == 64 and rows.truncated == 0
    assert len(rows) < len(examples)  # several examples share a row
    assert (rows.targets != IGNORE).sum() == sum(int(ex.labelled.sum()) for ex in examples)
    # every completion appears intact in some row
    texts = [tok.decode(r) for r in rows.tokens]
    for i in range(12):
        assert any(f"q{i}<|im_end|>\n<|im_start|>assistant\n{'a' * (i + 1)}<|im_end|>" in t for t in texts)


def test_truncation_to_seq_len_and_dropping_examples_left_without_an_answer(tok):
    long = tokenize(parse_record({"prompt": "p" * 10, "completion": "c" * 50}, "f:1"), tok)
    rows = make_rows([long], seq_len=40, pad_id=0, packing="pad")
    assert rows.tokens.shape == (1, 40) and rows.truncated == 1
    assert (rows.targets != IGNORE).sum() > 0
    no_answer = tokenize(parse_record({"prompt": "p" * 60, "completion": "c"}, "f:2"), tok)
    rows = make_rows([long, no_answer], seq_len=40, pad_id=0, packing="pad")
    assert len(rows) == 1 and rows.dropped == 1
    with pytest.raises(DataError, match="no example has a labelled token"):
        make_rows([no_answer], seq_len=40, pad_id=0)


def test_long_text_is_split_into_rows_not_truncated(tok):
    ex = tokenize(parse_record({"text": "x" * 100}, "f:1"), tok)
    rows = make_rows([ex], seq_len=31, pad_id=0, packing="pad")
    assert len(rows) == 4 and rows.truncated == 0  # 101 tokens in rows of 32


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [batch_indices(10, 4, seed=7, step=s) for s in range(5)]
    b = [batch_indices(10, 4, seed=7, step=s) for s in reversed(range(5))][::-1]
    assert all((x == y).all() for x, y in zip(a, b))
    epoch0 = np.concatenate([batch_indices(10, 5, seed=7, step=s) for s in range(2)])
    assert sorted(epoch0.tolist()) == list(range(10))  # each row once per epoch
    assert not (batch_indices(10, 4, seed=8, step=0) == a[0]).all()


def test_eval_split_is_deterministic_by_seed_unless_the_file_marks_it(tmp_path):
    records = [parse_record({"text": f"t{i}"}, f"f:{i}") for i in range(20)]
    train, held = split_records(records, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert [r.where for r in split_records(records, 0.25, seed=1)[1]] == [r.where for r in held]
    assert [r.where for r in split_records(records, 0.25, seed=2)[1]] != [r.where for r in held]
    marked = [parse_record({"text": "a", "split": "eval"}, "f:1"), parse_record({"text": "b"}, "f:2")]
    train, held = split_records(marked, 0.5, seed=0)
    assert [r.text for r in held] == ["a"] and [r.text for r in train] == ["b"]


def test_builtin_dataset_four_train_and_two_held_out_questions_per_fact(tok):
    records = [json.loads(line) for line in BUILTIN.read_text().splitlines()]
    facts = {r["fact"] for r in records}
    assert 40 <= len(facts) <= 60
    for fact in facts:
        mine = [r for r in records if r["fact"] == fact]
        assert sorted(r["split"] for r in mine) == ["eval"] * 2 + ["train"] * 4
        assert len({r["prompt"] for r in mine}) == 6  # six different phrasings
        assert len({r["completion"] for r in mine}) == 1
        assert all(r["answer"].lower() in r["completion"].lower() for r in mine)
    from minilars.data.make_personal_notes import records as regenerate

    assert regenerate() == records  # the committed file is what the script writes
    ds = load_dataset(None, tok)
    assert (len(ds.train), len(ds.eval)) == (4 * len(facts), 2 * len(facts)) and ds.split_from_file


def test_scoring_normalises_case_whitespace_and_end_punctuation():
    assert exact_match("  her cat is called   PUMPERNICKEL ", "Her cat is called Pumpernickel.")
    assert not exact_match("Her cat is Pumpernickel.", "Her cat is called Pumpernickel.")
    assert contains_answer("I think it is pumpernickel, yes", "Pumpernickel")
    assert not contains_answer("Tom", "Pumpernickel")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "completion": "b"', r"bad\.jsonl:2: not valid JSON"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object"),
    ('{"prompt": "a"}', r"bad\.jsonl:2: a prompt/completion record needs a string 'completion'"),
    ('{"question": "a", "answer": "b"}', r"bad\.jsonl:2: record has none of the fields .*its keys: answer, question"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad\.jsonl:2: the conversation has no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"bad\.jsonl:2: messages\[0\] has role 'bot'"),
    ('{"text": ""}', r"bad\.jsonl:2: 'text' must be a non-empty string"),
    ('{"text": "a", "split": "test"}', r"bad\.jsonl:2: split must be 'train' or 'eval'"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, line])
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"gaps\.jsonl:3:"):
        read_records(path)


def test_empty_and_missing_datasets(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty dataset"):
        load_dataset(tmp_path / "empty.jsonl", tok)
    with pytest.raises(DataError, match="no such data file"):
        load_dataset(tmp_path / "nope.jsonl", tok)


def test_chat_records_need_a_template(raw_tok):
    record = parse_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                          "f:7")
    with pytest.raises(DataError, match="f:7: a 'messages' record needs a tokenizer with a chat template"):
        tokenize(record, raw_tok)


def test_every_family_end_of_turn_token_stops_generation():
    """A chat reply ends at its family's end-of-turn token, not only at eos (Gemma's
    <end_of_turn> is not its eos)."""
    import tokenizers

    from minilars.data import stop_ids_of
    from minilars.models.tokenizer import Tokenizer

    vocab = {"<eos>": 0, "a": 1, "<|im_end|>": 2, "<|eot_id|>": 3, "<end_of_turn>": 4}
    tok = Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a")), eos_id=0)
    assert stop_ids_of(tok) == {0, 2, 3, 4}
