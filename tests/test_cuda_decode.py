"""The fused CUDA decoding kernels compute what MLX's operations compute (GPU tests skip
where MLX has no CUDA device; which layers qualify is checked everywhere)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import qwen_lora
from qwen_lora import cuda_decode
from qwen_lora.cache import make_cache
from qwen_lora.config import preset
from qwen_lora.decode import DecodeStep, decode_step
from qwen_lora.generate import prefill
from qwen_lora.lora import apply_lora
from qwen_lora.model import DecoderLayer, rope_frequencies
from qwen_lora.weights import init_model_dir

needs_cuda = pytest.mark.skipif(not cuda_decode.available(),
                                reason="needs MLX's CUDA backend")
TOLERANCE = {mx.float16: 1e-2, mx.bfloat16: 3e-2}  # of the largest value compared


def _close(got: mx.array, want: mx.array, dtype: mx.Dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= TOLERANCE[dtype] * np.abs(want).max()


def _random_layer(name: str, dtype: mx.Dtype) -> DecoderLayer:
    """One fused decoder layer of the preset's sizes, every parameter random."""
    layer = DecoderLayer(preset(name))
    params = nn.utils.tree_flatten(layer.parameters())
    for i, (path, p) in enumerate(params):
        noise = mx.random.normal(p.shape, key=mx.random.key(i))
        scale = 1.0 if path.endswith("bias") else 0.3 if "norm" in path else 0.05
        value = (1.0 + noise * scale) if "norm" in path else noise * scale
        layer.update(nn.utils.tree_unflatten([(path, value.astype(dtype))]))
    layer.self_attn.fuse()
    layer.mlp.fuse()
    layer.eval()
    return layer


def test_supports_only_fused_plain_half_precision_layers(tiny_dir):
    model = qwen_lora.load(tiny_dir, dtype="float16")
    assert not any(cuda_decode.supports(layer) for layer in model.layers)  # not fused
    assert all(cuda_decode.supports(layer) for layer in model.fuse_projections().layers)
    float32 = qwen_lora.load(tiny_dir, dtype="float32", fuse_projections=True)
    assert not cuda_decode.supports(float32.layers[0])
    quantized = qwen_lora.load(tiny_dir, dtype="float16", fuse_projections=True).quantize(8)
    assert not cuda_decode.supports(quantized.layers[0])
    adapted = qwen_lora.load(tiny_dir, dtype="float16", fuse_projections=True)
    assert cuda_decode.supports(adapted.layers[0])
    apply_lora(adapted, rank=4, targets=["o_proj"])
    assert not cuda_decode.supports(adapted.layers[0])
    on_slices = qwen_lora.load(tiny_dir, dtype="float16", fuse_projections=True)
    apply_lora(on_slices, rank=4, targets=["up_proj"], layers=[0])  # beside gate_up_proj
    assert not cuda_decode.supports(on_slices.layers[0])
    assert cuda_decode.supports(on_slices.layers[1])


def test_kernels_refuse_batches_over_the_limit():
    rows = cuda_decode.MAX_BATCH + 1
    x = mx.zeros((rows, 1, 64), dtype=mx.float16)
    with pytest.raises(ValueError, match="at most"):
        cuda_decode.matvec_add(x, nn.Linear(64, 64), x)


def test_kernels_refuse_inputs_of_the_wrong_size():
    """The kernels read their inputs' memory as rows, unchecked: a wrong size must not get
    that far."""
    x = mx.zeros((2, 1, 64), dtype=mx.float16)
    with pytest.raises(ValueError, match=r"2 rows of 32 values, got shape \(2, 1, 64\)"):
        cuda_decode.matvec_add(x, nn.Linear(64, 32), x)  # the residual
    with pytest.raises(ValueError, match=r"2 rows of 64 values, got shape \(2, 2, 64\)"):
        cuda_decode.matvec_add(mx.zeros((2, 2, 64)), nn.Linear(64, 64), x)  # two positions
    with pytest.raises(ValueError, match=r"2 rows of 32 values, got shape \(2, 1, 64\)"):
        cuda_decode.rms_swiglu(x, nn.RMSNorm(32), nn.Linear(32, 16))  # the projection's K
    with pytest.raises(ValueError, match="the norm has 32 weights, the projection takes 64"):
        cuda_decode.rms_swiglu(x, nn.RMSNorm(32), nn.Linear(64, 16))
    q, cache = mx.zeros((2, 4, 1, 16)), mx.zeros((2, 2, 8, 16))
    with pytest.raises(ValueError, match="one query position"):
        cuda_decode.attend(mx.zeros((2, 4, 3, 16)), cache, cache, mx.array([0]), 0.25)
    with pytest.raises(ValueError, match=r"keys \(1, 2, 8, 16\)"):
        cuda_decode.attend(q, cache[:1], cache[:1], mx.array([0]), 0.25)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple"):
        cuda_decode.attend(q, mx.zeros((2, 3, 8, 16)), mx.zeros((2, 3, 8, 16)),
                           mx.array([0]), 0.25)
    with pytest.raises(ValueError, match="one position"):
        cuda_decode.attend(q, cache, cache, mx.array([0, 1]), 0.25)
    with pytest.raises(ValueError, match="one position"):
        cuda_decode.rms_qkv_rope(x, nn.RMSNorm(64), None, mx.array([1, 2]), mx.zeros(32))


def test_step_is_rebuilt_when_the_kernels_become_available(tiny_dir, monkeypatch):
    model = qwen_lora.load(tiny_dir, dtype="float32", fuse_projections=True)
    step = decode_step(model)
    assert decode_step(model) is step
    available = cuda_decode.available()
    monkeypatch.setattr(cuda_decode, "available", lambda: not available)
    rebuilt = decode_step(model)
    assert rebuilt is not step and rebuilt.kernels_available is not available
    assert not rebuilt.fused  # float32: the kernels do not apply


def test_off_switch(monkeypatch):
    monkeypatch.setenv("QWEN_LORA_CUDA_KERNELS", "off")
    assert not cuda_decode.available()


def test_unused_without_a_cuda_device(tiny_dir):
    if cuda_decode.available():
        pytest.skip("a CUDA device is present")
    model = qwen_lora.load(tiny_dir, dtype="float16", fuse_projections=True)
    assert not DecodeStep(model).fused


@needs_cuda
@pytest.mark.parametrize("sizes", ["tiny", "qwen2.5-0.5b"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, cuda_decode.MAX_BATCH])
@pytest.mark.parametrize("position", [4000, 32000])  # rotations of up to 32,000 radians
def test_kernels_equal_mlx_operations(sizes, dtype, batch, position):
    layer = _random_layer(sizes, dtype)
    attn, mlp = layer.self_attn, layer.mlp
    dim = layer.input_layernorm.weight.shape[0]
    key = mx.random.key(batch)
    x = mx.random.normal((batch, 1, dim), key=key).astype(dtype)
    offset = mx.array(position + batch, dtype=mx.int32)

    inv_freq = rope_frequencies(attn.head_dim, attn.rope_theta)
    got = cuda_decode.rms_qkv_rope(x, layer.input_layernorm, attn, offset, inv_freq)
    want = attn.project(layer.input_layernorm(x), offset)
    for g, w in zip(got, want, strict=True):
        _close(g, w, dtype)

    gate, up = mx.split(mlp.gate_up_proj(layer.post_attention_layernorm(x)), 2, axis=-1)
    act = cuda_decode.rms_swiglu(x, layer.post_attention_layernorm, mlp.gate_up_proj)
    _close(act, nn.silu(gate) * up, dtype)

    out = mx.random.normal((batch, attn.n_heads, 1, attn.head_dim),
                           key=mx.random.key(batch + 100)).astype(dtype)
    _close(cuda_decode.matvec_add(out, attn.o_proj, x), x + attn.output(out), dtype)
    _close(cuda_decode.matvec_add(act, mlp.down_proj, x), x + mlp.down_proj(act), dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("batch, nq, nkv", [(1, 14, 2), (3, 4, 4)])
def test_attend_equals_mlx_attention(dtype, batch, nq, nkv):
    size, hd = 300, 64
    q, k, v = (mx.random.normal(shape, key=mx.random.key(i)).astype(dtype) for i, shape in
               enumerate([(batch, nq, 1, hd), (batch, nkv, size, hd), (batch, nkv, size, hd)]))
    for offset in (0, 1, 127, 128, 200, size - 1):
        got = cuda_decode.attend(q, k, v, mx.array([offset], dtype=mx.int32), hd**-0.5)
        want = mx.fast.scaled_dot_product_attention(
            q, k[..., :offset + 1, :], v[..., :offset + 1, :], scale=hd**-0.5)
        _close(got, want, dtype)


@needs_cuda
def test_odd_rows_and_unaligned_inputs():
    """matvec_add's last block holds one row; an input 2 bytes off 16-byte alignment takes
    the kernels' element-wise loads."""
    linear = nn.Linear(64, 63, bias=False)
    linear.set_dtype(mx.float16)
    flat = mx.random.normal((3 * 64 + 1,), key=mx.random.key(5)).astype(mx.float16)
    x = flat[1:].reshape(3, 1, 64)
    res = mx.random.normal((3, 1, 63), key=mx.random.key(6)).astype(mx.float16)
    _close(cuda_decode.matvec_add(x, linear, res), res + linear(x), mx.float16)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 2, cuda_decode.MAX_BATCH + 1])  # the last: MLX's ops
def test_fused_step_equals_forward(tiny_dir, dtype, batch):
    model = qwen_lora.load(tiny_dir, dtype=dtype, fuse_projections=True)
    step = DecodeStep(model)
    assert step.fused
    whole_calls = []
    whole = step._whole

    def counted(*args):
        whole_calls.append(args[1].item())
        return whole(*args)

    step._whole = counted
    prompt = mx.array([[5, 17, 42, 9, 250, 3, 77]] * batch)
    # buffers of 8 positions: the first new token fills them, the second grows them (the
    # per-layer path), the others take the whole step again
    caches = [make_cache(len(model.layers), step=8) for _ in range(2)]
    for cache in caches:
        prefill(model, prompt, cache)
    for token in (7, 300, 12, 12, 99):
        tokens = mx.array([[token]] * batch)
        _close(step(tokens, caches[0]),
               model(tokens, cache=caches[1], last_only=True)[:, -1, :], dtype)
    assert whole_calls == [7, 9, 10, 11]
    for fused, plain in zip(caches[0], caches[1], strict=True):
        for a, b in zip(fused.state, plain.state, strict=True):
            _close(a[..., :fused.offset, :], b[..., :plain.offset, :], dtype)


@needs_cuda
def test_fused_step_graph_holds_only_kernels_and_attention(tmp_path):
    """Every node of a decoding step's graph costs host time (decoding is bound by it): a
    layer is five kernels and the cache's two writes (on the per-layer path: four kernels, the
    cache's two writes and two reads, and MLX's attention); no reshapes,
    no rope frequencies computed again (the graph of 3d4ddcb held 488 nodes at Qwen2.5-0.5B,
    216 of them reshapes and 48 the frequencies)."""
    import collections
    import re

    # Heads of 64 dimensions, as Qwen2.5's: MLX's fused attention kernel takes them.
    model_dir = init_model_dir(tmp_path / "model", "tiny", dtype="float16", hidden_size=128,
                               num_attention_heads=2, num_key_value_heads=1)
    model = qwen_lora.load(model_dir, dtype=mx.float16, fuse_projections=True)
    step = DecodeStep(model)
    assert step.fused
    cache = make_cache(len(model.layers), capacity=16)
    mx.eval(step(mx.array([[1]]), cache))

    def kinds() -> collections.Counter:
        dot = tmp_path / "step.dot"
        logits = step(mx.array([[2]]), cache)
        mx.export_to_dot(str(dot), logits)
        mx.eval(logits, [c.state for c in cache])  # the next graph starts from values
        return collections.Counter(re.findall(r'label ="([^" ]+)', dot.read_text()))

    layers = len(model.layers)
    whole = kinds()  # one compiled function: the kernels and the cache's writes
    assert whole["CustomKernel"] == 5 * layers and whole["DynamicSliceUpdate"] == 2 * layers
    assert not {"Reshape", "Arange", "Slice", "SliceUpdate",
                "ScaledDotProductAttention"} & set(whole), whole
    step._whole = None  # the path of masks and caches to grow
    per_layer = kinds()
    assert per_layer["CustomKernel"] == 4 * layers
    assert per_layer["ScaledDotProductAttention"] == layers
    assert per_layer["SliceUpdate"] == per_layer["Slice"] == 2 * layers
    assert not {"Reshape", "Arange"} & set(per_layer), per_layer
