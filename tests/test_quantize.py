"""Quantized inference: which layers turn into integers, how close the logits stay."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen_lora import generate, load
from qwen_lora.cli import main


def _bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


def test_quantized_logits_stay_close(tiny_dir):
    """Relative RMS error of the logits: about 1% at 8 bits, 15% at 4 (16x coarser steps)."""
    ids = [3, 14, 15, 92, 65, 35]
    exact = _logits(load(tiny_dir), ids)
    errors = {}
    for bits in (8, 4):
        approx = _logits(load(tiny_dir, quantize=bits), ids)
        errors[bits] = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert 0 < errors[8] < 0.03, errors
    assert 4 * errors[8] < errors[4] < 0.4, errors


def test_which_layers_are_quantized(learnable_dir):
    plain = load(learnable_dir, fuse_projections=True)
    model = load(learnable_dir, fuse_projections=True, quantize=4)
    layer = model.layers[0]
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)  # also the tied head
    assert isinstance(layer.self_attn.qkv_proj, nn.QuantizedLinear)
    assert isinstance(layer.mlp.gate_up_proj, nn.QuantizedLinear)
    # The tiny preset's intermediate size (176) is no multiple of 64: down_proj stays float.
    assert type(layer.mlp.down_proj) is nn.Linear
    assert _bytes(model) < 0.5 * _bytes(plain)
    assert len(generate(model, [1, 2, 3], 5, stop_tokens=())) == 5


def test_bad_quantization_settings(learnable_dir):
    model = load(learnable_dir)
    with pytest.raises(ValueError, match="bits must be one of"):
        model.quantize(bits=7)
    with pytest.raises(ValueError, match="group_size must be one of"):
        model.quantize(bits=8, group_size=48)
    model.quantize(bits=8)
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize(bits=8)


def test_cli_generates_quantized(learnable_dir, capsys):
    assert main(["generate", "--model", str(learnable_dir), "--prompt-ids", "1,2,3",
                 "--max-tokens", "4", "--quantize", "8"]) == 0
    assert "tok/s" in capsys.readouterr().err
