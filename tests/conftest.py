"""Shared fixtures: tiny Qwen2 model directories written by the tests themselves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# float32 matmuls in full float32 on CUDA too (MLX runs them at TF32 precision by default),
# for the tests that compare float32 results to 1e-5; read by MLX at its first matmul.
os.environ["MLX_ENABLE_TF32"] = "0"

import qwen_lora  # noqa: E402, F401 - loads the fast BLAS before mlx.core
from qwen_lora.weights import init_model_dir

TINY_HF = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
               max_position_embeddings=1024, rms_norm_eps=1e-6)


def write_hf_model(path: Path, tied: bool, seed: int = 0, **overrides) -> Path:
    """A random Qwen2 written by Hugging Face `save_pretrained`, with randomised biases and
    norm weights so that parity tests exercise every parameter."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**{**TINY_HF, "tie_word_embeddings": tied, **overrides})
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    model.eval()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_tied(tmp_path_factory) -> Path:
    return write_hf_model(tmp_path_factory.mktemp("hf_tied"), tied=True, seed=1)


@pytest.fixture(scope="session")
def hf_untied(tmp_path_factory) -> Path:
    return write_hf_model(tmp_path_factory.mktemp("hf_untied"), tied=False, seed=2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """`qwen-lora init --preset tiny`: random weights plus a working tokenizer."""
    return init_model_dir(tmp_path_factory.mktemp("tiny"), "tiny", seed=0, dtype="float32")


@pytest.fixture(scope="session")
def learnable_dir(tmp_path_factory) -> Path:
    """A tiny model whose weights (std 0.2, not 0.02) give logits large enough to overfit:
    with std 0.02 tied embeddings cap the logits near 1.3, so the loss cannot fall far."""
    return init_model_dir(tmp_path_factory.mktemp("learnable"), "tiny", seed=0, dtype="float32",
                          initializer_range=0.2)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
