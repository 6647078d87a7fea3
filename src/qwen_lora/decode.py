"""The decoding step: one new token per sequence through the model, compiled between the
attention calls.

Decoding runs the whole model for a single token, so its cost is the number of operations,
not their size: on an H100 each of the ~30 MLX operations a layer costs microseconds of host
time, more than the kernels take. `mx.compile` builds the graph once and fuses element-wise
work, but a compiled function has fixed shapes, and attention reads a cache that grows by a
token every step. So the step is cut at attention: everything from one attention call to the
next (output projection, residuals, feed-forward, norm, the next layer's projections and
rotations) is one compiled function, and attention with its cache update runs as usual
between them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from qwen_lora.cache import KVCache
from qwen_lora.model import Mask, Model

Heads = tuple[mx.array, mx.array, mx.array]


class DecodeStep:
    """Logits (batch, vocab) of the next token after `tokens` (batch, 1), which it appends to
    `cache`: what `model(tokens, cache=cache, last_only=True)[:, -1, :]` computes.

    Built for one model structure (see `decode_step`); reads the weights at every call, so
    updates of their values (training, loading adapters) are seen.
    """

    def __init__(self, model: Model) -> None:
        self.key = structure_key(model)
        self.model = model
        layers = model.layers
        embed = model.model.embed_tokens
        head = embed if model.config.tie_word_embeddings else model.lm_head
        self._first = _compiled(self._embed_and_project, [embed, layers[0]])
        self._between = [_compiled(self._layer_boundary(i), [layers[i], layers[i + 1]])
                         for i in range(len(layers) - 1)]
        self._last = _compiled(self._finish, [layers[-1], model.model.norm, head])

    def __call__(self, tokens: mx.array, cache: Sequence[KVCache],
                 mask: Mask = None) -> mx.array:
        offset = mx.array(cache[0].offset, dtype=mx.int32)
        x, q, k, v = self._first(tokens, offset)
        layers = self.model.layers
        for i, layer in enumerate(layers):
            k, v = cache[i].update_and_fetch(k, v)
            out = layer.self_attn.attend(q, k, v, mask)
            if i + 1 == len(layers):
                return self._last(x, out)
            x, q, k, v = self._between[i](x, out, offset)
        raise ValueError("the model has no layers")

    def _embed_and_project(self, tokens: mx.array, offset: mx.array
                           ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        x = self.model.model.embed_tokens(tokens)
        return (x, *_project(self.model.layers[0], x, offset))

    def _layer_boundary(self, i: int) -> Callable[..., tuple[mx.array, ...]]:
        """Layer i after its attention, then layer i + 1 up to its attention."""
        this, following = self.model.layers[i], self.model.layers[i + 1]

        def boundary(x: mx.array, out: mx.array, offset: mx.array
                     ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
            h = this.feed_forward(x + this.self_attn.output(out))
            return (h, *_project(following, h, offset))

        return boundary

    def _finish(self, x: mx.array, out: mx.array) -> mx.array:
        last = self.model.layers[-1]
        h = last.feed_forward(x + last.self_attn.output(out))
        return self.model.head(self.model.model.norm(h[:, -1:, :]))[:, -1, :]


def _project(layer: nn.Module, x: mx.array, offset: mx.array) -> Heads:
    return layer.self_attn.project(layer.input_layernorm(x), offset)


def _compiled(fn: Callable, modules: list[nn.Module]) -> Callable:
    # The modules' arrays are inputs, read at each call, not constants of the trace.
    return mx.compile(fn, inputs=[m.state for m in modules])


def structure_key(model: Model) -> tuple[int, ...]:
    """Identifies the model's modules: applying or fusing LoRA, fusing projections and
    quantizing replace modules, and so change the key."""
    return tuple(id(m) for m in _modules(model))


def _modules(module: nn.Module) -> Iterator[nn.Module]:
    # What `module.modules()` lists, in a sixth of its time (0.06 against 0.35 ms at 24
    # layers here): generation calls it before every decoding loop.
    yield module
    for value in module.values():
        if isinstance(value, nn.Module):
            yield from _modules(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, nn.Module):
                    yield from _modules(item)


def decode_step(model: Model) -> Callable[..., mx.array]:
    """The model's compiled `DecodeStep`, built on first use and again after the model's
    modules changed; the plain forward pass while any module is in training mode (dropout
    draws random numbers, which a compiled function would repeat)."""
    modules = list(_modules(model))
    if any(m.training for m in modules):
        return lambda tokens, cache, mask=None: model(tokens, cache=cache, mask=mask,
                                                      last_only=True)[:, -1, :]
    step = getattr(model, "_decode_step", None)
    if step is None or step.key != tuple(map(id, modules)):
        step = DecodeStep(model)
        model._decode_step = step
    return step
