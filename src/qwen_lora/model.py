"""The Qwen2 decoder in MLX, with Hugging Face's module names so weights load without renaming."""

from __future__ import annotations

import math
from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn

from qwen_lora.backend import is_gpu
from qwen_lora.cache import KVCache, make_cache
from qwen_lora.config import ModelConfig

Mask = mx.array | str | None
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZE_GROUPS = (32, 64, 128)
# The projections that `fuse` concatenates, in their order in the fused weight.
QKV_PARTS = ("q_proj", "k_proj", "v_proj")
GATE_UP_PARTS = ("gate_proj", "up_proj")


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
        q, k, v = self.project(x, cache.offset if cache is not None else 0)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.output(self.attend(q, k, v, mask))

    def project(self, x: mx.array, offset: int | mx.array = 0
                ) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values (batch, heads, length, head_dim), queries and keys rotated
        for positions offset, offset + 1, ..."""
        batch, length, _ = x.shape
        if length == 1 and not self.training and not is_gpu():
            rope = partial(rope_one_position, base=self.rope_theta, offset=offset)
        else:
            rope = partial(mx.fast.rope, dims=self.head_dim, traditional=False,
                           base=self.rope_theta, scale=1.0, offset=offset)
        if "qkv_proj" not in self:
            q, k, v = (_biased(self[name], x) for name in QKV_PARTS)
        elif self.training or any(name in self for name in QKV_PARTS):
            # Adapters add to the split (in the fused layout q/k/v hold only LoRA adapters);
            # mx.split's gradient is one concatenation, where slicing heads (below) would
            # make a zeroed copy of the whole output per slice.
            queries = self.n_heads * self.head_dim
            parts = mx.split(_biased(self.qkv_proj, x),
                             [queries, queries + self.n_kv_heads * self.head_dim], axis=-1)
            q, k, v = _adapted(self, QKV_PARTS, parts, x)
        else:  # one rotation of queries and keys together, no copies
            heads = _biased(self.qkv_proj, x).reshape(batch, length, -1, self.head_dim)
            heads = heads.transpose(0, 2, 1, 3)
            rotated = self.n_heads + self.n_kv_heads
            qk = rope(heads[:, :rotated])
            return qk[:, :self.n_heads], qk[:, self.n_heads:], heads[:, rotated:]
        q, k, v = (t.reshape(batch, length, n, -1).transpose(0, 2, 1, 3)
                   for t, n in ((q, self.n_heads), (k, self.n_kv_heads), (v, self.n_kv_heads)))
        return rope(q), rope(k), v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Mask = None) -> mx.array:
        """Scaled dot-product attention of the queries over the keys (all cached ones)."""
        if not is_gpu():
            if self.training:
                return attention_cpu(q, k, v, self.scale, mask)
            if q.shape[2] > 1:  # a prompt; one decoded token keeps MLX's call
                return attention_cpu_blocks(q, k, v, self.scale, mask)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)

    def output(self, out: mx.array) -> mx.array:
        """The output projection of attend's result (batch, heads, length, head_dim)."""
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    def fuse(self) -> None:
        """Replace q/k/v by one `qkv_proj`: one matmul instead of three (`lora.apply_lora`
        then adds adapters to its slices)."""
        if "qkv_proj" not in self:
            parts = [self.pop(name) for name in QKV_PARTS]
            self.qkv_proj = _concat_linears(parts)


@cache
def rope_frequencies(head_dim: int, base: float) -> mx.array:
    """RoPE's rotation speeds base^(-i / half) of a head's first half (i < head_dim / 2, not
    traditional), as exp(-i / half log(base)): the rounding of mx.fast.rope's on a CPU,
    whose rotations these then equal. One array for the CPU's decoding rotation and the
    CUDA decoding kernels; evaluated, so that traces take it as a constant."""
    half = head_dim // 2
    freqs = mx.exp(-mx.arange(half, dtype=mx.float32) / half * math.log(base))
    mx.eval(freqs)
    return freqs


def rope_one_position(x: mx.array, base: float, offset: int | mx.array) -> mx.array:
    """`mx.fast.rope` (not traditional, all dims) of x (..., 1, head_dim) at position
    `offset`, in elementwise operations: on a CPU MLX's rope is a separate call of ~50 us
    (2-core EPYC, MLX 0.32), where these fuse into the decoding step's compiled kernels."""
    half = x.shape[-1] // 2
    angle = offset * rope_frequencies(x.shape[-1], base)
    cos, sin = mx.cos(angle), mx.sin(angle)
    first, second = x[..., :half], x[..., half:]
    return mx.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _adapted(parent: nn.Module, names: tuple[str, ...], parts: list[mx.array],
             x: mx.array) -> list[mx.array]:
    """The fused matmul's `parts`, each plus the output of the LoRA adapter that `parent` holds
    under its name (`lora.LoRAAdapter`), if any."""
    return [part if name not in parent else part + parent[name](x).astype(part.dtype)
            for name, part in zip(names, parts, strict=True)]


def _biased(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x); when decoding on a GPU (one position, inference), a plain linear layer with
    bias as a matmul and an addition: nn.Linear's `mx.addmm` costs ~20 us more host time a
    call there than both together (H200 host, MLX 0.32 CUDA), and decoding is host-bound.
    Longer inputs keep addmm: a plain matmul over 512 positions raised the H100's forward
    peak by ~30 MB (cuBLAS's workspace, we think), and training is bound by the device."""
    if (type(layer) is nn.Linear and "bias" in layer and x.shape[-2] == 1
            and not layer.training and is_gpu()):
        return x @ layer.weight.T + layer.bias
    return layer(x)


TRAIN_BLOCK = 128  # queries per block of `attention_cpu` under a causal mask
PROMPT_BLOCK = 64  # queries per block of `attention_cpu_blocks`


def attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask,
                  block: int = TRAIN_BLOCK) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` for training on a CPU, where MLX has no fused
    kernel and falls back to separate ops whose softmax evaluates each exponential in a scalar
    loop. Here the softmax is compiled into elementwise kernels with its own gradient (34 ->
    13 ms a layer forward, Qwen2.5-0.5B at 512 positions, 2-core EPYC), and under a causal
    mask the queries go in blocks of `block`, each reading only the keys up to its last query,
    which skips most of the masked half's products and exponentials: forward and backward,
    compiled, 43.2 -> 32.2 ms a layer on a 2-core Zen 2 EPYC (blocks of 64: 33.8, of 256:
    35.4). Other masks read every key, in one block. q (batch, heads, length, head_dim); k
    and v (batch, kv_heads, keys, head_dim); `mask` as the fast version takes it (None,
    "causal", boolean or additive, broadcastable to (batch, heads, length, keys)); every query
    must be allowed at least one key.
    """
    block = block if _is_causal(mask) else q.shape[2]
    return _attend_in_blocks(q, k, v, scale, mask, block, differentiable=True)


def attention_cpu_blocks(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask,
                         block: int = PROMPT_BLOCK) -> mx.array:
    """`attention_cpu` for inference over a prompt, `block` queries at a time under every
    mask: a block's scores and compiled softmax live only while it is computed, and under a
    causal mask a block reads only the keys up to its last query (half the products of the
    whole square). At Qwen2.5-0.5B, 512 positions, on a 2-core Zen 2 EPYC: a forward pass
    4.67 -> 3.45 s against MLX's call, its peak 4 MB lower (the whole square at once,
    compiled: 3.57 s, 28 MB higher). Without a gradient function of its own: inference takes
    none."""
    return _attend_in_blocks(q, k, v, scale, mask, block, differentiable=False)


def _attend_in_blocks(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask,
                      block: int, differentiable: bool) -> mx.array:
    """Attention `block` queries at a time; `differentiable`: the softmax with its own
    gradient (training), else the forward alone."""
    length, keys = q.shape[2], k.shape[2]
    causal = _is_causal(mask)
    past = keys - length  # cached keys before the first query
    outputs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        part_q, part_k, part_v, part_mask = q, k, v, mask
        if end - start < length:  # unsliced otherwise: a slice's gradient is one more copy
            part_q = q[:, :, start:end]
        if causal:
            stop = past + end  # the block's last query sees keys up to here
            if stop < keys:
                part_k, part_v = k[:, :, :stop], v[:, :, :stop]
            part_mask = mx.arange(past + start, stop)[:, None] >= mx.arange(stop)[None]
        elif mask is not None and mask.ndim >= 2 and mask.shape[-2] == length:
            part_mask = mask[..., start:end, :]
        scores, part_mask = _grouped_scores(part_q, part_k, scale, part_mask)
        if differentiable:
            probs = _softmax(scores) if part_mask is None else _masked_softmax(scores, part_mask)
        else:
            if part_mask is not None:
                scores = mx.where(part_mask, scores, mx.finfo(scores.dtype).min)
            probs = _softmax_forward(scores)
        outputs.append(_grouped_output(probs, part_v, (*q.shape[:2], end - start, q.shape[3])))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)


def _is_causal(mask: Mask) -> bool:
    """Whether `mask` names the causal mask; any other name is an error."""
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"mask must be 'causal' or an array, not {mask!r}")
    return isinstance(mask, str)


def _grouped_scores(q: mx.array, k: mx.array, scale: float, mask: mx.array | None
                    ) -> tuple[mx.array, mx.array | None]:
    """Scores (batch, kv_heads, group, length, keys) with the query heads of each key/value
    head side by side in one matmul, an additive mask added, and a boolean mask in that
    layout (None otherwise)."""
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = q.reshape(batch, kv_heads, group, length, head_dim)
    scores = (q * scale) @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    if mask is not None:
        if mask.ndim == 4:  # (batch, 1 or heads, length, keys) into the grouped layout
            mask = mask.reshape(mask.shape[0], *((1, 1) if mask.shape[1] == 1
                                                 else (kv_heads, group)), *mask.shape[2:])
        if mask.dtype != mx.bool_:
            scores = scores + mask
            mask = None
    return scores, mask


def _grouped_output(probs: mx.array, v: mx.array, shape: tuple[int, ...]) -> mx.array:
    """probs @ v back in the (batch, heads, length, head_dim) layout of the queries."""
    return (probs @ mx.expand_dims(v, 2)).reshape(shape)


@mx.custom_function
def _softmax(scores: mx.array) -> mx.array:
    return _softmax_forward(scores)


@_softmax.vjp
def _softmax_vjp(primals: tuple[mx.array], cotangent: mx.array, output: mx.array) -> mx.array:
    return _softmax_backward(output, cotangent)


@mx.custom_function
def _masked_softmax(scores: mx.array, allowed: mx.array) -> mx.array:
    # The masked scores live only inside this call: the gradient needs the probabilities.
    return _softmax_forward(mx.where(allowed, scores, mx.finfo(scores.dtype).min))


@_masked_softmax.vjp
def _masked_softmax_vjp(primals: tuple[mx.array, mx.array], cotangent: mx.array,
                        output: mx.array) -> tuple[mx.array, mx.array]:
    return _softmax_backward(output, cotangent), mx.zeros_like(primals[1])


@partial(mx.compile, shapeless=True)
def _softmax_forward(scores: mx.array) -> mx.array:
    exps = mx.exp(scores - scores.max(axis=-1, keepdims=True))
    return exps / exps.sum(axis=-1, keepdims=True)


@partial(mx.compile, shapeless=True)
def _softmax_backward(probs: mx.array, cotangent: mx.array) -> mx.array:
    return probs * (cotangent - (cotangent * probs).sum(axis=-1, keepdims=True))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = _adapted(self, GATE_UP_PARTS, mx.split(self.gate_up_proj(x), 2, axis=-1), x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        # In training mode, backward recomputes silu from gate/up instead of storing two more
        # (length x intermediate) arrays per layer: ~0.5 GB at Qwen2.5-0.5B, sequence 512.
        # Inference skips the checkpoint, whose bookkeeping holds one such array more.
        if not self.training:
            act = _swiglu
        elif not is_gpu():
            act = _swiglu_own_gradient
        else:  # the own gradient raised the H100 training-step peak: 1.82 GB -> 1.97 (with
            # one shared sigmoid) and 2.06 (with three spellings), at no speed gain
            act = _swiglu_checkpointed
        return self.down_proj(act(gate, up))

    def fuse(self) -> None:
        """Replace gate/up by one `gate_up_proj`."""
        if "gate_up_proj" not in self:
            self.gate_up_proj = _concat_linears([self.pop(name) for name in GATE_UP_PARTS])


@partial(mx.compile, shapeless=True)
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up  # one fused kernel, no temporary for silu(gate)


_swiglu_checkpointed = mx.checkpoint(_swiglu)


@mx.custom_function
def _swiglu_own_gradient(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu(gate, up)


@_swiglu_own_gradient.vjp
def _swiglu_vjp(primals: tuple[mx.array, mx.array], cotangent: mx.array,
                output: mx.array) -> tuple[mx.array, mx.array]:
    # Keeps only gate and up for the backward pass, as mx.checkpoint does, but computes the
    # gradients in compiled kernels instead of a recomputed forward and MLX's sigmoid, a
    # scalar loop on CPUs.
    return _swiglu_grads(*primals, cotangent)


@partial(mx.compile, shapeless=True)
def _swiglu_grads(gate: mx.array, up: mx.array, cotangent: mx.array) -> tuple[mx.array, mx.array]:
    # Three different spellings of sigmoid(gate): here, in d_up and in the forward pass.
    # compile merges equal expressions, and a sigmoid shared by two kernels is not fused
    # into either: it was computed apart (by MLX's scalar op on CPUs) and kept from the
    # forward pass to this one, 10 MB a layer at Qwen2.5-0.5B, sequence 512, float32.
    sig = 1 / (1 + mx.exp(gate * -1.0))
    d_gate = cotangent * up * sig * (1 + gate * (1 - sig))
    return d_gate, cotangent * gate / (1 + mx.exp(-gate))


def _concat_linears(parts: list[nn.Module]) -> nn.Linear:
    if not all(type(p) is nn.Linear for p in parts):
        raise ValueError("cannot fuse projections that carry LoRA adapters: fuse_lora first")
    bias = mx.concatenate([p.bias for p in parts], axis=0) if "bias" in parts[0] else None
    return linear_of(mx.concatenate([p.weight for p in parts], axis=0), bias)


def linear_of(weight: mx.array, bias: mx.array | None = None) -> nn.Linear:
    """An nn.Linear with these weights, made without nn.Linear's random initial weights: they
    would advance MLX's global random state, and adapters added after fusing (or tokens
    sampled after merging) would draw other values than with the same seed before."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def fused_splits(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], list[int]]]:
    """For each fused projection (`qkv_proj`, `gate_up_proj`): the projections it concatenates,
    in order, and the rows of its weight where the second and later ones start."""
    queries = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return {"qkv_proj": (QKV_PARTS, [queries, queries + kv]),
            "gate_up_proj": (GATE_UP_PARTS, [config.intermediate_size])}


def unfused_weights(weights: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
    """Map fused `qkv_proj` / `gate_up_proj` tensors back to Hugging Face's names."""
    splits = fused_splits(config)
    out = {}
    for name, array in weights.items():
        module, _, leaf = name.rpartition(".")
        prefix, _, fused = module.rpartition(".")
        if fused not in splits:
            out[name] = array
            continue
        parts, points = splits[fused]
        for part, piece in zip(parts, mx.split(array, points, axis=0), strict=True):
            out[f"{prefix}.{part}.{leaf}"] = piece
    return out


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Mask = None, cache: KVCache | None = None) -> mx.array:
        return self.feed_forward(x + self.self_attn(self.input_layernorm(x), mask, cache))

    def feed_forward(self, h: mx.array) -> mx.array:
        """The block's second half: h + mlp(norm(h))."""
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
    def head_module(self) -> nn.Module:
        """The module holding the output projection's weights (the embedding when tied)."""
        return self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self, capacity: int | None = None) -> list[KVCache]:
        """A fresh KV cache with one entry per layer."""
        return make_cache(len(self.layers), capacity=capacity)

    def quantize(self, bits: int = 8, group_size: int = 64) -> Model:
        """Store the linear layers and the (tied) embedding as `bits`-bit integers with a
        scale and offset per `group_size` weights (`mx.quantize`), for inference: decoding
        reads every weight once per token, so it reads bits/16 of the float16 bytes.

        Layers whose input size is not a multiple of `group_size` stay in floating point.
        Merge LoRA adapters first (`qwen_lora.fuse_lora`); `save` does not write quantized
        weights.
        """
        if bits not in QUANTIZE_BITS:
            raise ValueError(f"bits must be one of {QUANTIZE_BITS}, got {bits!r}")
        if group_size not in QUANTIZE_GROUPS:
            raise ValueError(f"group_size must be one of {QUANTIZE_GROUPS}, got {group_size!r}")
        if any(isinstance(m, nn.QuantizedLinear) for m in self.modules()):
            raise ValueError("the model is already quantized")

        def fits(_path: str, module: nn.Module) -> bool:
            return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

        nn.quantize(self, group_size=group_size, bits=bits, class_predicate=fits)
        return self

    def fuse_projections(self) -> Model:
        """Fuse q/k/v and gate/up into single matmuls: fewer, larger GEMVs when decoding, and
        fewer operations in a training step (`lora.apply_lora` fuses on GPUs).

        Opt-in for inference (`qwen_lora.load(..., fuse_projections=True)`); adapters on these
        projections must be merged first (`fuse_lora`). `save` writes HF names either way.
        """
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self
