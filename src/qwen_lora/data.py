"""Training data: JSONL records tokenized into examples, padded batches, a synthetic source.

A JSONL file holds one JSON object per line, in one of three forms (other keys are ignored):

- `{"text": "..."}`: plain text, trained on every token;
- `{"prompt": "...", "completion": "..."}`: with prompt masking, only the completion is trained;
- `{"messages": [{"role": "user", "content": "..."}, ...]}`: a chat in Qwen's ChatML
  (`<|im_start|>role\\ncontent<|im_end|>\\n`); with prompt masking only the last message is
  trained, as in mlx-lm.

Batches are right-padded; their loss mask is 1 exactly on the target tokens to train. Which
examples form the batch of a step is a pure function of (seed, step), so a resumed run sees
the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from qwen_lora.errors import DataError

Batch = tuple[mx.array, mx.array, mx.array]  # inputs, targets (batch, length), loss mask
PAD_MULTIPLE = 32  # batches are padded to a multiple of this: fewer shapes to compile
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Example:
    """One tokenized record: `ids` to train on; the first `prompt_len` are prompt tokens."""

    ids: tuple[int, ...]
    prompt_len: int = 0


def _where(file: Path, line: int) -> str:
    return f"{file}:{line}"


def _string(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise DataError(f"{where}: {key!r} is empty")
    return value


def _messages(record: dict, where: str) -> list[tuple[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, "
                            f"got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: messages[{i}] has no {key!r}")
        role = _string(message, "role", f"{where}: messages[{i}]")
        content = _string(message, "content", f"{where}: messages[{i}]", allow_empty=True)
        out.append((role, content))
    return out


def parse_record(record: Any, where: str) -> tuple[str, Any]:
    """Check one decoded JSONL record; returns ("text", str), ("completion", (prompt,
    completion)) or ("chat", [(role, content), ...]). Errors name `where` (file:line)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kinds = [k for k in ("text", "prompt", "completion", "messages") if k in record]
    if "text" in record and len(kinds) == 1:
        return "text", _string(record, "text", where)
    if "messages" in record and len(kinds) == 1:
        return "chat", _messages(record, where)
    if kinds and set(kinds) <= {"prompt", "completion"}:
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f"{where}: has {kinds[0]!r} but no {key!r}")
        return "completion", (_string(record, "prompt", where, allow_empty=True),
                              _string(record, "completion", where))
    if kinds:
        raise DataError(f"{where}: ambiguous record with keys {kinds}: use exactly one of "
                        "'text', 'prompt'+'completion' or 'messages'")
    raise DataError(f"{where}: expected a 'text', 'prompt'/'completion' or 'messages' record, "
                    f"found keys {sorted(record)}")


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, str, Any]]:
    """Every record of a JSONL file as (line number, kind, content); blank lines are skipped.

    Bad JSON, unknown shapes, wrong types and empty files raise DataError naming file and line.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{file}: no such data file") from None
    except IsADirectoryError:
        raise DataError(f"{file}: is a directory, expected a .jsonl file") from None
    records = []
    for number, line in enumerate(raw.splitlines(), 1):
        where = _where(file, number)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
        kind, content = parse_record(record, where)
        records.append((number, kind, content))
    if not records:
        raise DataError(f"{file}: no records (the file is empty)")
    return records


def _chat_text(messages: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{CHAT_START}{role}\n{content}{CHAT_END}\n" for role, content in messages)


def encode_record(tokenizer: Tokenizer, kind: str, content: Any,
                  eos_id: int | None) -> Example:
    """Tokenize one parsed record. Prompt and completion are encoded separately, so the prompt
    boundary is exact and matches how `generate` encodes a prompt."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids if text else []

    eos = [eos_id] if eos_id is not None else []
    if kind == "text":
        return Example(tuple(encode(content) + eos), 0)
    if kind == "completion":
        prompt = encode(content[0])
        return Example(tuple(prompt + encode(content[1]) + eos), len(prompt))
    *history, (role, last) = content
    prompt = encode(_chat_text(history) + f"{CHAT_START}{role}\n")
    return Example(tuple(prompt + encode(f"{last}{CHAT_END}\n")), len(prompt))


def load_dataset(path: str | os.PathLike, tokenizer: Tokenizer, eos_id: int | None = None,
                 vocab_size: int | None = None) -> list[Example]:
    """Read and tokenize a JSONL file. `vocab_size` checks that every token id fits the model
    (a tokenizer from another model would otherwise index past the embedding silently)."""
    file = Path(path)
    records = read_jsonl(file)
    if any(kind == "chat" for _, kind, _ in records):
        missing = [t for t in (CHAT_START, CHAT_END) if tokenizer.token_to_id(t) is None]
        if missing:
            raise DataError(f"{file}: chat records need the special token {missing[0]} "
                            "in the model's tokenizer.json")
    examples = []
    for number, kind, content in records:
        example = encode_record(tokenizer, kind, content, eos_id)
        if len(example.ids) < 2:
            raise DataError(f"{_where(file, number)}: too short to train on "
                            f"({len(example.ids)} token)")
        if vocab_size is not None and max(example.ids) >= vocab_size:
            raise DataError(f"{_where(file, number)}: token id {max(example.ids)} is outside the "
                            f"model's vocabulary of {vocab_size}: tokenizer and model differ")
        examples.append(example)
    return examples


def data_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """`--data` as a .jsonl file, or (like mlx-lm) a directory with train.jsonl and optionally
    valid.jsonl; returns (train file, validation file or None)."""
    p = Path(path)
    if p.is_dir():
        train = p / "train.jsonl"
        if not train.exists():
            raise DataError(f"{p}: data directory has no train.jsonl")
        valid = p / "valid.jsonl"
        return train, valid if valid.exists() else None
    if not p.exists():
        raise DataError(f"{p}: no such data file or directory")
    return p, None


def count_truncated(examples: Sequence[Example], seq_len: int) -> int:
    """How many examples are longer than a batch row holds (seq_len inputs + 1 target)."""
    return sum(len(e.ids) > seq_len + 1 for e in examples)


def make_batch(examples: Sequence[Example], seq_len: int, mask_prompt: bool = False,
               pad_id: int = 0) -> Batch:
    """Right-padded (inputs, targets, mask): row i trains on example i truncated to
    seq_len + 1 tokens; mask is 1.0 on real target tokens (not prompt ones with
    `mask_prompt`). Rows are padded to the longest, rounded up to PAD_MULTIPLE (max seq_len)."""
    if not examples:
        raise ValueError("make_batch needs at least one example")
    rows = [e.ids[:seq_len + 1] for e in examples]
    longest = max(len(r) for r in rows) - 1
    width = min(seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    tokens = np.full((len(rows), width + 1), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    for i, (row, example) in enumerate(zip(rows, examples, strict=True)):
        tokens[i, :len(row)] = row
        start = max(example.prompt_len - 1, 0) if mask_prompt else 0
        mask[i, start:len(row) - 1] = 1.0
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask)


class BatchOrder:
    """Which examples form each batch: epoch after epoch of seeded shuffles.

    Batch k holds the examples at positions k*batch_size ... (k+1)*batch_size - 1 of the
    endless sequence perm(seed, 0) + perm(seed, 1) + ...: a pure function of (seed, k).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0) -> None:
        if num_examples <= 0:
            raise ValueError("the dataset has no examples")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._epoch, self._perm = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.n)
        return self._perm

    def __call__(self, index: int) -> list[int]:
        """Example indices of batch number `index` (0-based)."""
        start = index * self.batch_size
        return [int(self._permutation(p // self.n)[p % self.n])
                for p in range(start, start + self.batch_size)]


def eval_batches(examples: Sequence[Example], batch_size: int, seq_len: int,
                 mask_prompt: bool = False, max_batches: int | None = None) -> Iterator[Batch]:
    """Batches over `examples` in file order (for a validation loss); all when max_batches
    is None or <= 0."""
    count = -(-len(examples) // batch_size)
    if max_batches is not None and max_batches > 0:
        count = min(count, max_batches)
    for k in range(count):
        yield make_batch(examples[k * batch_size:(k + 1) * batch_size], seq_len, mask_prompt)


def synthetic_batches(vocab_size: int, batch_size: int, seq_len: int,
                      seed: int = 0) -> Iterator[Batch]:
    """An endless, deterministic stream of uniformly random token batches (mask all ones):
    for benchmarks and tests that need data of an exact shape, not meaning."""
    rng = np.random.default_rng(seed)
    mask = mx.ones((batch_size, seq_len), dtype=mx.float32)
    while True:
        tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        yield mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mask
