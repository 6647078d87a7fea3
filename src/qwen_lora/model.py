"""The Qwen2 decoder in MLX, with Hugging Face's module names so weights load without renaming."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from qwen_lora.cache import KVCache, StaticKVCache, make_cache, make_static_cache
from qwen_lora.config import ModelConfig

Mask = mx.array | str | None


class Attention(nn.Module):
    """Grouped-query attention with q/k/v biases and rotary position embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, head_dim = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)

    def __call__(self, x: mx.array, mask: Mask = None, cache: KVCache | None = None) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        if isinstance(cache, StaticKVCache):
            mask = cache.mask(length)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta,
                         scale=1.0, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta,
                         scale=1.0, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Mask = None, cache: KVCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False

    def __call__(self, inputs: mx.array, mask: Mask = None,
                 cache: list[KVCache] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        if mask is None and h.shape[1] > 1:
            mask = "causal"
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if self.gradient_checkpointing and cache is None:
                h = _checkpointed(layer, h, mask)
            else:
                h = layer(h, mask, layer_cache)
        return h


def _checkpointed(layer: DecoderLayer, h: mx.array, mask: Mask) -> mx.array:
    """Run `layer` so that its activations are recomputed, not stored, for the backward pass."""
    def run(params, x):
        layer.update(params)
        return layer(x, mask)
    return mx.checkpoint(run)(layer.trainable_parameters(), h)


class Model(nn.Module):
    """Qwen2 causal language model: token ids (batch, length) to logits (batch, length, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, mask: Mask = None,
                 last_only: bool = False) -> mx.array:
        """Logits for every position, or for the last one only (`last_only`, as generation needs).

        `mask` defaults to causal; pass an additive or boolean (length x keys) array for padding.
        """
        h = self.model(inputs, mask, cache)
        if last_only:
            h = h[:, -1:, :]
        return self.head(self.model.norm(h))

    def head(self, h: mx.array) -> mx.array:
        """The output projection: tied to the embedding, or a separate `lm_head`."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self, capacity: int | None = None) -> list[KVCache]:
        """A fresh KV cache with one entry per layer."""
        return make_cache(len(self.layers), capacity=capacity)

    def make_static_cache(self, capacity: int, batch: int = 1) -> list[StaticKVCache]:
        """A fixed-shape cache for compiled decoding (see `StaticKVCache`)."""
        c = self.config
        dtype = self.model.embed_tokens.weight.dtype
        return make_static_cache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim,
                                 capacity, dtype)
