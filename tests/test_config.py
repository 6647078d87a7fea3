"""Configuration: Hugging Face field names, both RoPE forms, presets and errors."""

from __future__ import annotations

import pytest

from qwen_lora import ModelConfig, preset
from qwen_lora.config import PRESETS


def test_classic_and_rope_parameters_forms():
    base = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert ModelConfig.from_dict({**base, "rope_theta": 5000.0}).rope_theta == 5000.0
    newer = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7000.0}}
    assert ModelConfig.from_dict(newer).rope_theta == 7000.0


def test_qwen25_05b_preset_is_the_published_architecture():
    c = preset("qwen2.5-0.5b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.vocab_size) == (896, 24, 14, 2, 64, 4864, 151936)
    assert c.tie_word_embeddings and c.rms_norm_eps == 1e-6 and c.rope_theta == 1e6
    # 24 layers x 2 x 2 KV heads x 2048 x 64 x 2 bytes
    assert c.kv_cache_bytes(2048, 2) == 24 * 2 * 2 * 2048 * 64 * 2


def test_every_preset_builds():
    for name in PRESETS:
        assert preset(name).head_dim > 0


def test_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("qwen9")
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=65, num_attention_heads=4)
    with pytest.raises(ValueError, match="RoPE scaling"):
        ModelConfig.from_dict({"model_type": "qwen2", "rope_scaling": {"type": "yarn"}})


def test_to_dict_round_trips():
    c = preset("qwen2.5-7b")
    assert ModelConfig.from_dict(c.to_dict()) == c
