"""The compiled decoding step computes what the model's forward pass computes."""

from __future__ import annotations

import gc
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import qwen_lora
from qwen_lora.cache import make_cache
from qwen_lora.decode import (
    WHOLE_STEP_POSITIONS,
    DecodeStep,
    _takes_whole_step,
    cache_capacity,
    decode_step,
    structure_key,
)
from qwen_lora.generate import prefill
from qwen_lora.lora import apply_lora
from qwen_lora.weights import init_model_dir

PROMPT = [[5, 17, 42, 9, 250, 3, 77]]


def _decode_both(model, tokens: list[int], prompt=PROMPT, mask_fn=None, cache_step=256):
    """Logits of each step, and the final caches, from the plain forward pass and from the
    compiled step, fed the same tokens."""
    results = []
    for use_step in (False, True):
        cache = make_cache(len(model.layers), step=cache_step)
        prefill(model, mx.array(prompt), cache)
        step = DecodeStep(model) if use_step else None
        logits = []
        for i, t in enumerate(tokens):
            x = mx.array([[t]] * len(prompt))
            mask = mask_fn(i) if mask_fn else None
            out = (step(x, cache, mask) if step else
                   model(x, cache=cache, mask=mask, last_only=True)[:, -1, :])
            logits.append(np.array(out))
        results.append((logits, [np.array(a) for c in cache for a in c.state]))
    return results


def _assert_same(results) -> None:
    (plain, plain_cache), (compiled, compiled_cache) = results
    for a, b in zip(plain, compiled, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    for a, b in zip(plain_cache, compiled_cache, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "fused", "lora", "lora_on_fused", "quantized",
                                     "untied"])
def test_step_equals_forward(tiny_dir, hf_untied, variant):
    # float32 on every device: the step matches the forward pass to rounding there (the
    # half-precision CUDA kernels of fused models are checked in test_cuda_decode.py)
    model = qwen_lora.load(hf_untied if variant == "untied" else tiny_dir, dtype="float32",
                           fuse_projections=variant == "fused")
    if variant.startswith("lora"):  # on the separate projections, or on fused ones' slices
        apply_lora(model, rank=4, targets=["q_proj", "v_proj", "o_proj", "down_proj"],
                   fuse=variant == "lora_on_fused")
        for layer in model.layers:  # B starts at zero: make the adapters count
            for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.lora_b = mx.random.normal(proj.lora_b.shape, key=mx.random.key(1)) * 0.1
        model.eval()
    if variant == "quantized":
        model.quantize(bits=8, group_size=32)
    _assert_same(_decode_both(model, [11, 200, 7, 7, 31]))


def test_step_with_padding_mask(tiny_dir):
    model = qwen_lora.load(tiny_dir)
    prompt = [[0, 0, 4, 8, 15, 16, 23], [1, 2, 3, 4, 5, 6, 7]]
    valid = np.ones((2, len(prompt[0]) + 3), dtype=bool)
    valid[0, :2] = False

    def mask(i):
        return mx.array(valid[:, None, None, :len(prompt[0]) + i + 1])

    _assert_same(_decode_both(model, [9, 10, 11], prompt=prompt, mask_fn=mask))


def test_step_reads_current_weights(tiny_dir):
    """Weights are inputs of the compiled functions, not constants: new values count."""
    model = qwen_lora.load(tiny_dir)
    step = decode_step(model)
    cache = model.make_cache()
    prefill(model, mx.array(PROMPT), cache)
    before = np.array(step(mx.array([[3]]), cache))
    for c in cache:
        c.trim(1)
    mlp = model.layers[1].mlp
    mlp.down_proj.weight = mlp.down_proj.weight * 3.0
    after = np.array(step(mx.array([[3]]), cache))
    for c in cache:
        c.trim(1)
    expected = np.array(model(mx.array([[3]]), cache=cache, last_only=True)[:, -1, :])
    assert not np.allclose(after, before, atol=1e-3)
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-4)


def test_step_is_rebuilt_when_modules_change(tiny_dir):
    model = qwen_lora.load(tiny_dir)
    first = decode_step(model)
    assert decode_step(model) is first
    apply_lora(model, rank=4)
    model.eval()
    with_lora = decode_step(model)
    assert with_lora is not first
    assert decode_step(model) is with_lora
    qwen_lora.fuse_lora(model)
    assert decode_step(model) is not with_lora


def test_training_mode_uses_the_plain_forward(tiny_dir):
    model = qwen_lora.load(tiny_dir)
    apply_lora(model, rank=4, dropout=0.5)  # new modules start in training mode: dropout
    step = decode_step(model)
    assert not isinstance(step, DecodeStep)
    assert getattr(model, "_decode_step", None) is None


@pytest.mark.parametrize("gpu", [False, True])
def test_biased_projection_equals_linear(monkeypatch, gpu):
    """The GPU spelling of a biased projection (matmul, then add) computes nn.Linear's."""
    from qwen_lora import model as model_module

    monkeypatch.setattr(model_module, "is_gpu", lambda: gpu)
    layer = nn.Linear(16, 24, bias=True)
    layer.bias = mx.random.normal((24,), key=mx.random.key(3))
    layer.eval()
    x = mx.random.normal((2, 1, 16), key=mx.random.key(4))  # one position: decoding
    np.testing.assert_allclose(np.array(model_module._biased(layer, x)), np.array(layer(x)),
                               rtol=1e-5, atol=1e-5)


def test_structure_key_lists_every_module(tiny_dir):
    model = qwen_lora.load(tiny_dir)
    apply_lora(model, rank=2)
    assert sorted(structure_key(model)) == sorted(id(m) for m in model.modules())


def test_one_layer_and_cache_growth(tmp_path):
    """No layer boundary to compile; the cache grows (steps of 4) while decoding."""
    directory = init_model_dir(tmp_path, "tiny", dtype="float32", num_hidden_layers=1)
    model = qwen_lora.load(directory)
    _assert_same(_decode_both(model, [11, 200, 7, 7, 31, 2, 9, 4, 1, 5], cache_step=4))


def test_batch_sizes_and_rebuild_after_quantize(tiny_dir):
    model = qwen_lora.load(tiny_dir)
    _assert_same(_decode_both(model, [3, 4]))
    _assert_same(_decode_both(model, [3, 4], prompt=PROMPT * 2))  # a retrace for batch 2
    step = decode_step(model)
    model.quantize(bits=8, group_size=32)
    assert decode_step(model) is not step
    cache = model.make_cache()
    prefill(model, mx.array(PROMPT), cache)
    got = np.array(decode_step(model)(mx.array([[3]]), cache))
    for c in cache:
        c.trim(1)
    expected = np.array(model(mx.array([[3]]), cache=cache, last_only=True)[:, -1, :])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_dropped_model_is_freed_without_the_collector(tiny_dir):
    """The cached step holds the model's modules, not the model: no reference cycle."""
    model = qwen_lora.load(tiny_dir)
    qwen_lora.generate(model, PROMPT[0], 3)
    assert isinstance(model._decode_step, DecodeStep)
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_bad_input(tiny_dir):
    model = qwen_lora.load(tiny_dir)
    step = decode_step(model)
    cache = model.make_cache()
    prefill(model, mx.array(PROMPT), cache)
    with pytest.raises(ValueError, match=r"shape \(batch, 1\)"):
        step(mx.array([3, 4]), cache)
    with pytest.raises(ValueError, match="cache has 1 layers"):
        step(mx.array([[3]]), cache[:1])
    np.testing.assert_allclose(  # the model is intact after the refused calls
        np.array(step(mx.array([[3]]), cache)),
        np.array(DecodeStep(model)(mx.array([[3]]), _prefilled(model))), rtol=1e-5, atol=1e-5)


def _prefilled(model):
    cache = model.make_cache()
    prefill(model, mx.array(PROMPT), cache)
    return cache


def test_whole_step_only_where_it_is_faster_and_the_cache_has_room():
    """The whole step (CUDA) writes into the preallocated buffers and attends with a kernel
    slower than MLX's past WHOLE_STEP_POSITIONS; anything else takes the per-layer path."""
    def cache(offset: int, size: int, layers: int = 3, batch: int = 2) -> list:
        cache = make_cache(layers, capacity=size)
        for c in cache:
            new = mx.zeros((batch, 2, offset, 8))
            c.update_and_fetch(new, new)
        return cache

    assert _takes_whole_step(cache(5, 8), 2, None)
    assert _takes_whole_step(cache(7, 8), 2, None)
    assert not _takes_whole_step(cache(8, 8), 2, None)  # full: the per-layer path grows it
    assert not _takes_whole_step(cache(5, 8), 3, None)  # another batch
    assert not _takes_whole_step(cache(5, 8), 2, mx.ones((2, 1, 1, 6), dtype=mx.bool_))
    assert not _takes_whole_step(make_cache(3), 2, None)  # nothing cached yet
    uneven = cache(5, 8)
    uneven[1].trim(1)
    assert not _takes_whole_step(uneven, 2, None)
    limit = WHOLE_STEP_POSITIONS
    assert _takes_whole_step(cache(limit - 1, limit + 8, layers=1), 2, None)
    assert not _takes_whole_step(cache(limit, limit + 8, layers=1), 2, None)


def test_cache_capacity_in_steps_only_for_the_whole_step(tiny_dir, monkeypatch):
    """Prompts of different lengths share the whole step's compiled shapes; elsewhere the
    cache is allocated as asked."""
    model = qwen_lora.load(tiny_dir, dtype="float32", fuse_projections=True)
    step = decode_step(model)
    if step._whole is not None:
        pytest.skip("the whole step runs here (a CUDA device)")
    assert [cache_capacity(model, n) for n in (1, 228, 256, 257)] == [1, 228, 256, 257]
    monkeypatch.setattr(step, "_whole", lambda *args: None)  # as on a CUDA device
    assert [cache_capacity(model, n) for n in (1, 228, 256, 257)] == [256, 256, 256, 512]
