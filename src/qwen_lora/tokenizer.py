"""Tokenizers: load a model directory's `tokenizer.json`, or build a small working one.

No pretrained tokenizer can be downloaded here, so `qwen-lora init` writes a byte-level BPE
trained on a short built-in text: every string encodes (bytes are the fallback), decoding
round-trips, and the chat special tokens of Qwen2.5 exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen_lora.errors import ModelLoadError

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token of a text.
Low-rank adaptation trains two small matrices beside each frozen weight, so fine-tuning is cheap.
def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a
import numpy as np\nx = np.arange(10)\nprint(x.sum())
Question: what is the capital of France? Answer: Paris is the capital of France.
Benchmarks measure time per token, time to first token, peak memory and training throughput.
for i in range(100): total += i * i  # squares
The cache keeps keys and values of earlier tokens so that each new token costs one step.
"""


def build_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE with Qwen2.5's special tokens, at most `vocab_size` entries."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (>= 259)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


def write_tokenizer(tok: Tokenizer, directory: Path) -> dict[str, int]:
    """Write `tokenizer.json` and `tokenizer_config.json`; return the special token ids."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 32768,
        "chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The `tokenizer.json` of a model directory; a clear error when it is missing or broken."""
    file = Path(model_dir) / "tokenizer.json"
    if not file.exists():
        raise ModelLoadError(f"{file}: no tokenizer.json in the model directory "
                             "(pass token ids instead, e.g. --prompt-ids 1,2,3)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises a bare Exception
        raise ModelLoadError(f"{file}: cannot read tokenizer: {err}") from None
