"""Training data: JSONL formats, tokenization, prompt masking, batching and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwen_lora.data import (
    PAD_MULTIPLE,
    BatchOrder,
    Example,
    count_truncated,
    data_files,
    eval_batches,
    load_dataset,
    make_batch,
    read_jsonl,
    synthetic_batches,
)
from qwen_lora.errors import DataError
from qwen_lora.tokenizer import load_tokenizer


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def test_three_formats_tokenize(tmp_path, tok):
    eos = tok.token_to_id("<|endoftext|>")
    file = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "The quick brown fox.", "id": 7},  # extra keys are ignored
        "",  # blank lines are skipped
        {"prompt": "Question: capital of France? Answer:", "completion": " Paris."},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ])
    text, completion, chat = load_dataset(file, tok, eos)
    assert text == Example(tuple(tok.encode("The quick brown fox.").ids + [eos]), 0)
    prompt = tok.encode("Question: capital of France? Answer:").ids
    assert completion.prompt_len == len(prompt)
    assert completion.ids == tuple(prompt + tok.encode(" Paris.").ids + [eos])
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert chat.ids.count(start) == 3 and chat.ids.count(end) == 3
    # Prompt masking trains on the last message only: "hello<|im_end|>\n".
    assert tok.decode(list(chat.ids[chat.prompt_len:]), skip_special_tokens=False) == \
        "hello<|im_end|>\n"


def test_prompt_masking_and_padding(tok):
    a = Example((1, 2, 3, 4, 5), prompt_len=3)
    b = Example((6, 7, 8), prompt_len=1)
    inputs, targets, mask = make_batch([a, b], seq_len=64)
    assert inputs.shape == (2, PAD_MULTIPLE) and targets.shape == (2, PAD_MULTIPLE)
    assert inputs[0, :4].tolist() == [1, 2, 3, 4] and targets[0, :4].tolist() == [2, 3, 4, 5]
    assert mask[0].tolist()[:5] == [1, 1, 1, 1, 0] and mask[1].tolist()[:3] == [1, 1, 0]
    _, targets, mask = make_batch([a, b], seq_len=64, mask_prompt=True)
    # Only targets that are completion tokens (index >= prompt_len) count.
    assert mask[0].tolist()[:5] == [0, 0, 1, 1, 0] and targets[0, 2:4].tolist() == [4, 5]
    assert mask[1].tolist()[:3] == [1, 1, 0]
    assert float(mask.sum()) == 4


def test_truncation_to_seq_len():
    long = Example(tuple(range(1, 101)))
    inputs, targets, mask = make_batch([long, Example((1, 2))], seq_len=40)
    assert inputs.shape == (2, 40)
    assert targets[0].tolist() == list(range(2, 42)) and float(mask[0].sum()) == 40
    assert count_truncated([long, Example((1, 2))], 40) == 1
    assert count_truncated([long], 99) == 0


def test_batch_order_is_a_function_of_seed_and_index():
    order = BatchOrder(10, 4, seed=3)
    first = [order(k) for k in range(5)]
    again = BatchOrder(10, 4, seed=3)
    assert [again(k) for k in (4, 0, 2, 1, 3)] == [first[k] for k in (4, 0, 2, 1, 3)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # each epoch is shuffled afresh
    assert [BatchOrder(10, 4, seed=4)(k) for k in range(3)] != first[:3]


def test_eval_batches_cover_the_set_in_order():
    examples = [Example((i, i + 1, i + 2)) for i in range(5)]
    batches = list(eval_batches(examples, 2, 8))
    assert len(batches) == 3 and batches[-1][0].shape[0] == 1
    assert [int(b[0][0, 0]) for b in batches] == [0, 2, 4]
    assert len(list(eval_batches(examples, 2, 8, max_batches=2))) == 2


def test_synthetic_batches_are_deterministic():
    a = synthetic_batches(100, 2, 16, seed=5)
    b = synthetic_batches(100, 2, 16, seed=5)
    for _ in range(3):
        (xa, ya, ma), (xb, _, _) = next(a), next(b)
        assert xa.shape == (2, 16) and ma.shape == (2, 16) and float(ma.sum()) == 32
        assert np.array_equal(np.array(xa), np.array(xb))
        assert np.array_equal(np.array(xa)[:, 1:], np.array(ya)[:, :-1])
        assert 0 <= int(xa.min()) and int(xa.max()) < 100


def test_data_directory_like_mlx_lm(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    assert data_files(tmp_path) == (tmp_path / "train.jsonl", None)
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "b"}])
    assert data_files(tmp_path) == (tmp_path / "train.jsonl", tmp_path / "valid.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train.jsonl"):
        data_files(tmp_path / "empty")
    with pytest.raises(DataError, match="no such data file"):
        data_files(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"text": "fine"', "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"prompt": "only a prompt"}', "has 'prompt' but no 'completion'"),
    ('{"completion": "only a completion"}', "has 'completion' but no 'prompt'"),
    ('{"text": 3}', "'text' must be a string, got int"),
    ('{"text": ""}', "'text' is empty"),
    ('{"prompt": "p", "completion": ["x"]}', "'completion' must be a string"),
    ('{"text": "a", "messages": []}', "ambiguous record"),
    ('{"input": "x", "output": "y"}', "found keys \\['input', 'output'\\]"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', "messages\\[0\\] must be an object"),
    ('{"messages": [{"role": "user"}]}', "messages\\[0\\] has no 'content'"),
    ('{"messages": [{"role": 1, "content": "x"}]}', "'role' must be a string"),
])
def test_malformed_line_names_file_and_line(tmp_path, tok, line, message):
    file = write_jsonl(tmp_path / "bad.jsonl", [{"text": "good"}, "", line])
    with pytest.raises(DataError, match=message) as err:
        load_dataset(file, tok)
    assert str(err.value).startswith(f"{file}:3:")


def test_empty_and_unreadable_files(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(empty)
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(empty)
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "nope.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=f"{binary}:2: not UTF-8"):
        read_jsonl(binary)


def test_tokenizer_that_does_not_fit_the_model(tmp_path, tok):
    file = write_jsonl(tmp_path / "d.jsonl", [{"text": "The quick brown fox jumps."}])
    with pytest.raises(DataError, match=f"{file}:1: token id .* outside the model's vocabulary"):
        load_dataset(file, tok, vocab_size=10)
    file = write_jsonl(tmp_path / "short.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="too short"):
        load_dataset(file, tok, eos_id=None)
