"""Microbenchmarks: tensor operations on 1024x1024 tensors, the model's components at
batch 1, sequence 512, and the machine's own limits (matmul rate, memory bandwidth).

Each implementation runs the piece as its own model code does: qwen_lora's modules and calls
against mlx-lm's (`mlx_lm.models.qwen2`, `mlx_lm.models.base`). Both run on MLX with the
same BLAS, so equal times are the expected answer; a gap points at the code around MLX.
Weights are random (MLX's initializers): the values do not change the time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .common import (
    MLX_IMPLEMENTATIONS,
    QWEN_LORA,
    W,
    mlx_dtype,
    mx,
    on_cpu,
    qwen2_config,
    require,
)

OPS = ["matmul", "softmax", "layer_norm", "rms_norm", "attention"]
COMPONENTS = ["embedding", "rope", "attention", "mlp", "layer"]
HEAD_DIM = 64


def _model(impl: str, model: dict[str, Any]) -> Any:
    """An unevaluated model of `impl` with the given architecture: its parameters are lazy
    and cost nothing until a piece of it is used."""
    config = qwen2_config(model)
    if impl == QWEN_LORA:
        qwen = require("qwen_lora.model", "Model")
        return qwen.Model(require("qwen_lora.config", "ModelConfig").ModelConfig.from_dict(config))
    qwen2 = require("mlx_lm.models.qwen2", "Model", "ModelArgs")
    return qwen2.Model(qwen2.ModelArgs.from_dict(config))


def _ready(module: Any) -> Any:
    module.set_dtype(mlx_dtype())
    mx.eval(module.parameters())
    return module


def _normal(*shape: int, seed: int = 0) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(mlx_dtype())


@functools.cache
def tensor_op(impl: str, op: str) -> Callable[[], mx.array]:
    """The operation on n x n inputs (attention: n tokens of width n in 64-wide heads)."""
    n = W.op_size
    x = _normal(n, n)
    if op == "matmul":
        y = _normal(n, n, seed=1)
        mx.eval(x, y)
        return lambda: x @ y
    if op == "softmax":
        mx.eval(x)
        return lambda: mx.softmax(x, axis=-1)
    if op in ("layer_norm", "rms_norm"):
        if op == "layer_norm":
            norm = require("mlx.nn", "LayerNorm").LayerNorm(n)
        else:  # the normalization layer of each implementation's decoder block
            layer = _model(impl, dict(W.model, hidden_size=n, num_attention_heads=n // HEAD_DIM,
                                      num_key_value_heads=1, num_hidden_layers=1)).layers[0]
            norm = layer.input_layernorm
        _ready(norm)
        mx.eval(x)
        return lambda: norm(x)
    heads = n // HEAD_DIM
    q, k, v = (_normal(1, heads, n, HEAD_DIM, seed=s) for s in (2, 3, 4))
    mx.eval(q, k, v)
    scale = HEAD_DIM**-0.5
    if impl == QWEN_LORA:  # what qwen_lora's Attention calls
        sdpa = mx.fast.scaled_dot_product_attention
        return lambda: sdpa(q, k, v, scale=scale, mask="causal")
    base = require("mlx_lm.models.base", "scaled_dot_product_attention")
    return lambda: base.scaled_dot_product_attention(q, k, v, cache=None, scale=scale,
                                                     mask="causal")


class TensorOps:
    """Core tensor operations on 1024x1024 float tensors."""

    params = [MLX_IMPLEMENTATIONS, OPS]
    param_names = ["implementation", "op"]
    number = 1
    rounds = 1
    warmup_time = 0.1
    repeat = W.fast_repeat

    def setup(self, impl: str, op: str) -> None:
        self.op = tensor_op(impl, op)

    def time_op(self, impl: str, op: str) -> None:
        """Seconds per operation."""
        mx.eval(self.op())


@functools.cache
def component(impl: str, name: str) -> Callable[[], Any]:
    """A piece of the workload's model, applied to batch 1 at the component sequence."""
    model = _model(impl, W.model)
    seq, hidden = W.component_seq, W.model["hidden_size"]
    if name == "embedding":
        embed = _ready(model.model.embed_tokens)
        ids = mx.array([list(range(seq))]) % W.vocab
        mx.eval(ids)
        return lambda: embed(ids)
    layer = model.layers[0]
    attn = layer.self_attn
    if name == "rope":
        heads, kv_heads = W.model["num_attention_heads"], W.model["num_key_value_heads"]
        q, k = _normal(1, heads, seq, W.head_dim), _normal(1, kv_heads, seq, W.head_dim, seed=1)
        mx.eval(q, k)
        if impl == QWEN_LORA:  # qwen_lora's Attention applies RoPE inline
            def rope(t: mx.array) -> mx.array:
                return mx.fast.rope(t, attn.head_dim, traditional=False, base=attn.rope_theta,
                                    scale=1.0, offset=0)
        else:
            rope = attn.rope
        return lambda: (rope(q), rope(k))
    x = _normal(1, seq, hidden)
    mx.eval(x)
    if name == "attention":
        _ready(attn)
        return lambda: attn(x, mask="causal")
    if name == "mlp":
        mlp = _ready(layer.mlp)
        return lambda: mlp(x)
    _ready(layer)
    return lambda: layer(x, mask="causal")


class ModelComponents:
    """The model's pieces at batch 1, sequence 512: one decoder layer's parts."""

    params = [MLX_IMPLEMENTATIONS, COMPONENTS]
    param_names = ["implementation", "component"]
    number = 1
    rounds = 1
    warmup_time = 0.1
    repeat = W.fast_repeat

    def setup(self, impl: str, name: str) -> None:
        self.forward = component(impl, name)

    def time_forward(self, impl: str, name: str) -> None:
        """Seconds per forward call."""
        mx.eval(self.forward())


# The machine's attainable rates, which the report sets the model's work against (its distance
# to the physical limit). The product is large enough to run at the BLAS's or cuBLAS's full
# rate: 17 GFLOP on a CPU (~0.1 s), 1.1 TFLOP on a GPU (where a smaller one measures launches).
DTYPE_NAME = str(mlx_dtype()).rsplit(".", 1)[-1]
MATMUL_SIZE = 2048 if on_cpu() else 8192


@functools.cache
def _square_operands(size: int) -> tuple[mx.array, mx.array]:
    x, y = _normal(size, size), _normal(size, size, seed=1)
    mx.eval(x, y)
    return x, y


class _MachineLimit:
    """Run attributes of the machine's limits: calls of milliseconds, many samples."""

    number = 1
    rounds = 1
    warmup_time = 0.1
    repeat = W.fast_repeat


class MatmulRate(_MachineLimit):
    """One size x size matrix product in the compute dtype: the machine's matmul FLOP/s
    (2 size^3 a call), the limit of prefill and training."""

    params = [[DTYPE_NAME], [MATMUL_SIZE]]
    param_names = ["dtype", "size"]

    def setup(self, dtype: str, size: int) -> None:
        self.x, self.y = _square_operands(size)

    def time_matmul(self, dtype: str, size: int) -> None:
        """Seconds per product."""
        mx.eval(self.x @ self.y)


@functools.cache
def _head_operands() -> tuple[mx.array, mx.array]:
    weight = _normal(W.vocab, W.model["hidden_size"])
    x = _normal(1, W.model["hidden_size"], seed=1)
    mx.eval(weight, x)
    return weight, x


class HeadMatvec(_MachineLimit):
    """One token through a weight of the output head's shape (vocab x hidden), as decoding
    computes it (x @ W.T): the weight's bytes streamed once a call, the machine's memory
    bandwidth as decoding attains it."""

    params = [[DTYPE_NAME]]
    param_names = ["dtype"]

    def setup(self, dtype: str) -> None:
        self.weight, self.x = _head_operands()

    def time_matvec(self, dtype: str) -> None:
        """Seconds per matrix-vector product."""
        mx.eval(self.x @ self.weight.T)
