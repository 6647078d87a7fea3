"""The decoding step: one new token per sequence through the model, compiled between the
attention calls.

Decoding runs the whole model for a single token, so its cost is the number of operations,
not their size: on an H100 each of the ~30 MLX operations a layer costs microseconds of host
time, more than the kernels take. `mx.compile` builds the graph once and fuses element-wise
work, but a compiled function has fixed shapes, and attention reads a cache that grows by a
token every step. So the step is cut at attention: everything from one attention call to the
next (output projection, residuals, feed-forward, norm, the next layer's projections and
rotations) is one compiled function, and attention with its cache update runs as usual
between them. On MLX's CUDA backend those functions use the fused kernels of
`qwen_lora.cuda_decode` where the model allows (four kernel calls a layer instead of ~10).

There, attention has a kernel of its own too (`cuda_decode.attend`), which reads the
cache's length on the device: the whole step, cache writes included, is then one compiled
function of fixed shapes over the cache's preallocated buffers, one call a token instead of
three Python calls a layer. It takes over while the cache has room, holds fewer than
`WHOLE_STEP_POSITIONS` positions and no mask is given; otherwise (a cache to grow, long
contexts, left-padded batches) the per-layer path runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from qwen_lora import cuda_decode
from qwen_lora.cache import KVCache
from qwen_lora.model import Mask, Model, rope_frequencies

Heads = tuple[mx.array, mx.array, mx.array]
# The whole step's attention kernel runs one block per query head, its threads walking the
# positions: on an H100 (Qwen2.5-0.5B, float16, medians of 3 runs) it decoded at 2.72 ms a
# token after 128 positions against the per-layer path's 3.56 (MLX's attention), 8% ahead
# after 1,000 (2.80 against 3.05; minima 2.44 and 2.48), and behind after 3,000 (3.69
# against 2.80).
WHOLE_STEP_POSITIONS = 1024
# The whole step is compiled for the shape of the cache's buffers: each new shape traces the
# model again (milliseconds of host time) and MLX keeps every trace. Generation allocates
# them in multiples of this (`cache_capacity`), so that prompts of any length share a few.
WHOLE_STEP_CAPACITY_STEP = 256


class DecodeStep:
    """Logits (batch, vocab) of the next token after `tokens` (batch, 1), which it appends to
    `cache`: what `model(tokens, cache=cache, last_only=True)[:, -1, :]` computes.

    Built for one model structure (see `decode_step`); reads the weights at every call, so
    updates of their values (training, loading adapters) are seen. Plain attributes (a LoRA
    layer's `scale`) are fixed when a function is first traced. Holds the model's modules,
    not the model: no reference cycle keeps a dropped model alive.
    """

    def __init__(self, model: Model) -> None:
        self.key = structure_key(model)
        self.layers = list(model.layers)
        if not self.layers:
            raise ValueError("the model has no layers")
        embed, norm = model.model.embed_tokens, model.model.norm
        head_module = model.head_module
        # as Model.head, without holding the model
        head = embed.as_linear if head_module is embed else head_module
        self.kernels_available = cuda_decode.available()  # decode_step rebuilds if it changes
        self.fused = (self.kernels_available
                      and all(cuda_decode.supports(layer) for layer in self.layers))
        attn = self.layers[0].self_attn
        inv_freq = rope_frequencies(attn.head_dim, attn.rope_theta) if self.fused else None
        parts = _Parts(self.fused, inv_freq)
        first = _embed_and_project(embed, self.layers[0], parts)
        between = [_layer_boundary(this, following, parts)
                   for this, following in itertools.pairwise(self.layers)]
        last = _finish(self.layers[-1], norm, head, parts)
        self._first = _compiled(first, [embed, self.layers[0]])
        self._between = [_compiled(fn, list(pair)) for fn, pair
                         in zip(between, itertools.pairwise(self.layers), strict=True)]
        self._last = _compiled(last, [self.layers[-1], norm, head_module])
        self._whole = None
        if self.fused and attn.head_dim % 8 == 0:  # cuda_decode.attend reads 8 at a time
            modules = [embed, *self.layers, norm, head_module]
            unique = list({id(m): m for m in modules}.values())  # a tied head is the embedding
            self._whole = _compiled(_whole_step(first, between, last, self.layers), unique)

    def __call__(self, tokens: mx.array, cache: Sequence[KVCache],
                 mask: Mask = None) -> mx.array:
        if tokens.ndim != 2 or tokens.shape[1] != 1:
            raise ValueError(f"tokens must have shape (batch, 1), got {tuple(tokens.shape)}")
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        offset = mx.array(cache[0].offset, dtype=mx.int32)
        if self._whole is not None and _takes_whole_step(cache, tokens.shape[0], mask):
            logits, keys, values = self._whole(tokens, offset, [c.keys for c in cache],
                                               [c.values for c in cache])
            for c, k, v in zip(cache, keys, values, strict=True):
                c.keys, c.values, c.offset = k, v, c.offset + 1
            return logits
        x, q, k, v = self._first(tokens, offset)
        for i, layer in enumerate(self.layers):
            k, v = cache[i].update_and_fetch(k, v)
            out = layer.self_attn.attend(q, k, v, mask)
            if i < len(self._between):
                x, q, k, v = self._between[i](x, out, offset)
        return self._last(x, out)


class _Parts:
    """The two halves of a layer's decoding step: MLX operations, or the fused CUDA kernels."""

    def __init__(self, fused: bool, inv_freq: mx.array | None) -> None:
        self.fused = fused
        self.inv_freq = inv_freq

    def kernels(self, x: mx.array) -> bool:
        return self.fused and x.shape[0] <= cuda_decode.MAX_BATCH

    def project(self, layer: nn.Module, x: mx.array, offset: mx.array) -> Heads:
        """The layer up to its attention: norm, q/k/v projections, rope."""
        if self.kernels(x):
            return cuda_decode.rms_qkv_rope(x, layer.input_layernorm, layer.self_attn, offset,
                                            self.inv_freq)
        return layer.self_attn.project(layer.input_layernorm(x), offset)

    def finish(self, layer: nn.Module, x: mx.array, out: mx.array) -> mx.array:
        """The layer after its attention: output projection, residual, feed-forward."""
        if self.kernels(x):
            h = cuda_decode.matvec_add(out, layer.self_attn.o_proj, x)
            act = cuda_decode.rms_swiglu(h, layer.post_attention_layernorm,
                                         layer.mlp.gate_up_proj)
            return cuda_decode.matvec_add(act, layer.mlp.down_proj, h)
        return layer.feed_forward(x + layer.self_attn.output(out))


def _embed_and_project(embed: nn.Module, first: nn.Module, parts: _Parts
                       ) -> Callable[..., tuple]:
    """Token embedding, then the first layer up to its attention."""
    def run(tokens: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
        x = embed(tokens)
        return (x, *parts.project(first, x, offset))
    return run


def _layer_boundary(this: nn.Module, following: nn.Module, parts: _Parts
                    ) -> Callable[..., tuple]:
    """Layer `this` after its attention, then layer `following` up to its attention."""
    def run(x: mx.array, out: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
        h = parts.finish(this, x, out)
        return (h, *parts.project(following, h, offset))
    return run


def _finish(last: nn.Module, norm: nn.Module, head: Callable, parts: _Parts
            ) -> Callable[..., mx.array]:
    """The last layer after its attention, the final norm and the output head."""
    def run(x: mx.array, out: mx.array) -> mx.array:
        h = parts.finish(last, x, out)
        return head(norm(h[:, -1:, :]))[:, -1, :]
    return run


def _whole_step(first: Callable, between: list[Callable], last: Callable,
                layers: list[nn.Module]) -> Callable[..., tuple]:
    """The step as one function of fixed shapes, for one compiled call a token: each layer
    writes its key and value into the cache's preallocated buffers at `position` and attends
    over positions 0..position with `cuda_decode.attend`, which reads the length on the
    device. Returns the logits and the updated buffers."""
    def run(tokens: mx.array, position: mx.array, keys: list[mx.array],
            values: list[mx.array]) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        x, q, k, v = first(tokens, position)
        new_keys, new_values = [], []
        for i, layer in enumerate(layers):
            new_keys.append(mx.slice_update(keys[i], k, position, axes=(2,)))
            new_values.append(mx.slice_update(values[i], v, position, axes=(2,)))
            out = cuda_decode.attend(q, new_keys[-1], new_values[-1], position,
                                     layer.self_attn.scale)
            if i < len(between):
                x, q, k, v = between[i](x, out, position)
        return last(x, out), new_keys, new_values
    return run


def _takes_whole_step(cache: Sequence[KVCache], batch: int, mask: Mask) -> bool:
    """Whether the whole step runs: no mask, fewer than `WHOLE_STEP_POSITIONS` cached, and
    every layer's cache holding this batch's keys at one common offset with room for one more
    position (else the per-layer path runs, which grows them)."""
    offset = cache[0].offset
    return (mask is None and offset < WHOLE_STEP_POSITIONS
            and all(type(c) is KVCache and c.offset == offset and c.has_room()
                    and c.keys.shape[0] == batch for c in cache))


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


def cache_capacity(model: Model, positions: int) -> int:
    """The KV cache capacity to allocate for `positions`: rounded up to a multiple of
    `WHOLE_STEP_CAPACITY_STEP` where the model decodes with the whole step, `positions`
    elsewhere."""
    if getattr(decode_step(model), "_whole", None) is None:
        return positions
    return -(-positions // WHOLE_STEP_CAPACITY_STEP) * WHOLE_STEP_CAPACITY_STEP


def decode_step(model: Model) -> Callable[..., mx.array]:
    """The model's compiled `DecodeStep`, built on first use and again after the model's
    modules changed (or the CUDA kernels' availability: device, QWEN_LORA_CUDA_KERNELS); the
    plain forward pass while any module is in training mode (dropout
    draws random numbers, which a compiled function would repeat)."""
    modules = list(_modules(model))
    if any(m.training for m in modules):
        return lambda tokens, cache, mask=None: model(tokens, cache=cache, mask=mask,
                                                      last_only=True)[:, -1, :]
    step = getattr(model, "_decode_step", None)
    if (step is None or step.key != tuple(map(id, modules))
            or step.kernels_available != cuda_decode.available()):
        step = DecodeStep(model)
        model._decode_step = step
    return step
