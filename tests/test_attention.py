"""The CPU attention (compiled softmax) equals MLX's fused attention, values and gradients."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen_lora.model import attention_cpu, attention_cpu_blocks, rope_one_position

KEYS = mx.random.split(mx.random.key(0), 4)
Q = mx.random.normal((2, 14, 9, 64), key=KEYS[0]) * 2
K = mx.random.normal((2, 2, 12, 64), key=KEYS[1]) * 2
V = mx.random.normal((2, 2, 12, 64), key=KEYS[2])
# Left-padding style: random holes, but every query keeps its last key.
ALLOWED = (mx.random.uniform(shape=(2, 1, 9, 12), key=KEYS[3]) > 0.3) | (mx.arange(12) == 11)
MASKS = {
    "none": None,
    "causal": "causal",
    "boolean": ALLOWED,
    "additive": mx.where(ALLOWED, 0.0, -1e9).astype(mx.float32),
    "one-query-row": ALLOWED[:, :, :1],
    "per-head": mx.broadcast_to(ALLOWED, (2, 14, 9, 12)),
}


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("block", [1, 4, 128])
def test_cpu_attention_equals_fused_attention(name, block):
    """Values and gradients, with the causal mask's queries in blocks of any size (3 cached
    keys before the 9 queries here)."""
    mask = MASKS[name]

    def ours(q, k, v):
        return attention_cpu(q, k, v, 0.125, mask, block=block)

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)

    weights = mx.random.normal((2, 14, 9, 64), key=mx.random.key(5))
    assert mx.allclose(ours(Q, K, V), fused(Q, K, V), atol=1e-5)
    for fn_ours, fn_fused in [(ours, fused), (mx.compile(ours), fused)]:
        got = mx.grad(lambda *a, f=fn_ours: (f(*a) * weights).sum(), argnums=(0, 1, 2))(Q, K, V)
        want = mx.grad(lambda *a, f=fn_fused: (f(*a) * weights).sum(), argnums=(0, 1, 2))(Q, K, V)
        for g, w in zip(got, want, strict=True):
            assert mx.allclose(g, w, atol=1e-4), mx.abs(g - w).max().item()


def test_cpu_attention_rejects_unknown_mask_names():
    with pytest.raises(ValueError, match="causal"):
        attention_cpu(Q, K, V, 0.125, "upper")


def test_training_mode_computes_what_inference_does(hf_tied):
    """Training mode (CPU attention, compiled softmax) and eval mode (MLX's attention) give
    the model the same logits."""
    from qwen_lora import load

    model = load(hf_tied, dtype="float32")
    tokens = mx.array([[1, 5, 9, 2, 7, 3, 8, 4]])
    inference = model(tokens)
    model.train()
    assert model.layers[0].self_attn.training
    assert mx.allclose(model(tokens), inference, atol=1e-5)


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("block", [1, 4, 64])
def test_blocked_inference_attention_equals_fused_attention(name, block):
    """Query blocks of any size, under every kind of mask, compute MLX's attention; under a
    causal mask each block reads only the keys up to its last query (3 cached keys before
    the 9 queries here)."""
    mask = MASKS[name]
    got = attention_cpu_blocks(Q, K, V, 0.125, mask, block=block)
    want = mx.fast.scaled_dot_product_attention(Q, K, V, scale=0.125, mask=mask)
    assert mx.allclose(got, want, atol=1e-5), mx.abs(got - want).max().item()


def test_blocked_attention_rejects_unknown_mask_names():
    with pytest.raises(ValueError, match="causal"):
        attention_cpu_blocks(Q, K, V, 0.125, "upper")


def test_prompt_attention_on_the_cpu_takes_blocks(monkeypatch, hf_tied):
    """An inference forward pass over a prompt goes through the blocked attention on the
    CPU, and one decoded token through MLX's call."""
    from qwen_lora import load
    from qwen_lora import model as model_module

    calls = []
    blocked = model_module.attention_cpu_blocks
    monkeypatch.setattr(model_module, "attention_cpu_blocks",
                        lambda q, *a, **kw: calls.append(q.shape[2]) or blocked(q, *a, **kw))
    model = load(hf_tied, dtype="float32")
    cache = model.make_cache()
    mx.eval(model(mx.array([[1, 5, 9, 2, 7]]), cache=cache))
    mx.eval(model(mx.array([[3]]), cache=cache))
    assert calls == [5] * len(model.layers)


@pytest.mark.parametrize("offset", [0, 7, 1000, 32767])
def test_rope_one_position_equals_mlx_rope(offset):
    """The decoding step's elementwise rotation against mx.fast.rope, at an int offset and at
    the array offset the compiled step passes."""
    x = mx.random.normal((2, 16, 1, 64), key=mx.random.key(offset))
    want = mx.fast.rope(x, 64, traditional=False, base=1e6, scale=1.0, offset=offset)
    for at in (offset, mx.array(offset, dtype=mx.int32)):
        np.testing.assert_allclose(np.array(rope_one_position(x, 1e6, at)), np.array(want),
                                   atol=1e-6, rtol=1e-6)
