"""Batched generation: left padding is invisible, each row stops on its own."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest

from qwen_lora import Sampler, generate, generate_batch, load, stream_generate_batch
from qwen_lora.cache import KVCache


@pytest.fixture(scope="module")
def model(learnable_dir):
    return load(learnable_dir)


def test_equal_length_prompts_generate_what_each_would_alone(model):
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6], [5, 5, 5, 5]]
    batched = generate_batch(model, prompts, 8, stop_tokens=())
    assert batched == [generate(model, p, 8, stop_tokens=()) for p in prompts]


def test_left_padding_is_masked_out(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4, 11, 30, 2]]
    batched = generate_batch(model, prompts, 8, stop_tokens=())
    assert batched == [generate(model, p, 8, stop_tokens=()) for p in prompts]


def test_padding_across_prefill_chunks(model):
    """Prompts longer than one prefill chunk: the mask spans chunk boundaries."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, size=n).tolist() for n in (21, 9)]
    steps = list(stream_generate_batch(model, prompts, 5, stop_tokens=(), prefill_chunk=4))
    got = [[s[b] for s in steps] for b in range(2)]
    assert got == [generate(model, p, 5, stop_tokens=()) for p in prompts]


def test_rows_stop_independently(model):
    prompts = [[1, 2, 3], [7, 7, 7]]
    free = [generate(model, p, 10, stop_tokens=()) for p in prompts]
    stop = free[0][2]
    assert stop not in free[1]
    steps = list(stream_generate_batch(model, prompts, 10, stop_tokens=[stop]))
    assert len(steps) == 10
    first = [s[0] for s in steps]
    end = free[0].index(stop) + 1
    assert first[:end] == free[0][:end] and all(t is None for t in first[end:])
    assert [s[1] for s in steps] == free[1]


def test_bad_batch_input(model):
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_batch(model, [], 3)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate_batch(model, [[1], []], 3)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 99999"):
        generate_batch(model, [[99999]], 3)
    with pytest.raises(ValueError, match="max_tokens"):
        generate_batch(model, [[1]], -1)
    assert generate_batch(model, [[1], [2]], 0) == [[], []]


def test_pipelined_decoding_gives_the_same_tokens(model, monkeypatch):
    """GPUs queue the next pass before reading a token; the tokens must not change."""
    generation = importlib.import_module("qwen_lora.generate")  # the package exports a
    # function of the same name
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    sampler_args = dict(temperature=0.8, top_p=0.9)
    plain_batch = generate_batch(model, prompts, 6, Sampler(seed=1, **sampler_args), ())
    plain_one = generate(model, prompts[0], 6, Sampler(seed=1, **sampler_args), stop_tokens=())
    monkeypatch.setattr(generation, "_pipelines", lambda: True)
    assert generate_batch(model, prompts, 6, Sampler(seed=1, **sampler_args), ()) == plain_batch
    assert generate(model, prompts[0], 6, Sampler(seed=1, **sampler_args),
                    stop_tokens=()) == plain_one


def test_decoding_does_not_grow_the_cache(model, monkeypatch):
    """The cache has room for the prompt and the new tokens from the prefill on (up to
    PREALLOCATED_TOKENS of them), so that decoding never stops to copy it into a larger one."""
    grown = []
    grow = KVCache._grow

    def counted(self, keys, values):
        grown.append(self.offset)
        grow(self, keys, values)

    monkeypatch.setattr(KVCache, "_grow", counted)
    layers = len(model.layers)
    prompt = list(range(1, 251))  # 250 + 20 tokens: past a 256-token growth step
    generate(model, prompt, 20, stop_tokens=())
    assert grown == [0] * layers
    grown.clear()
    list(stream_generate_batch(model, [prompt, [4, 5]], 20, stop_tokens=()))
    assert grown == [0] * layers
    grown.clear()
    generate_module = importlib.import_module("qwen_lora.generate")
    monkeypatch.setattr(generate_module, "PREALLOCATED_TOKENS", 8)
    generate(model, prompt, 20, stop_tokens=())
    assert grown == [0] * layers + [258] * layers  # then in steps, as before
    grown.clear()
    monkeypatch.setattr(generate_module, "PREALLOCATED_TOKENS", 4096)
    config = model.config
    cache = model.make_cache()
    model(mx.array([[1]]), cache=cache)
    token_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                   * cache[0].keys.dtype.size)  # float32 on CPUs, float16 on GPUs
    grown.clear()
    monkeypatch.setattr(generate_module, "PREALLOCATED_BYTES", 5 * token_bytes)
    generate(model, prompt, 20, stop_tokens=())
    # room for 5 new tokens, then the usual steps (to 256, the next multiple, then 512)
    assert grown == [0] * layers + [255] * layers + [256] * layers
