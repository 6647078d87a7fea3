"""Autoregressive generation with a KV cache (or full recomputation), streamed token by token."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from qwen_lora.backend import is_gpu
from qwen_lora.cache import KVCache
from qwen_lora.decode import cache_capacity, decode_step
from qwen_lora.model import Model
from qwen_lora.sampling import Sampler

SamplerFn = Callable[[mx.array], mx.array]
GREEDY = Sampler()
# Room for new tokens allocated in the KV cache with the prompt's, so that decoding does not
# stop to grow (copy) it: up to this many tokens and bytes; beyond, it grows in steps as usual.
PREALLOCATED_TOKENS = 4096
PREALLOCATED_BYTES = 256 * 2**20


def _cache_for(model: Model, batch: int, prompt_length: int, max_tokens: int
               ) -> list[KVCache]:
    config = model.config
    token_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                   * model.model.norm.weight.dtype.size * batch)  # keys and values
    room = min(max_tokens, PREALLOCATED_TOKENS, PREALLOCATED_BYTES // token_bytes)
    return model.make_cache(capacity=cache_capacity(model, prompt_length + room))


@dataclass
class GenerationStep:
    """One generated token and the running statistics of the generation."""

    token: int
    index: int  # 0 for the first generated token
    prompt_tokens: int
    time_to_first_token: float  # seconds from the call to the first token (prefill + sample)
    prompt_tps: float  # prompt tokens per second of prefill
    token_latency: float  # seconds spent producing this token
    generation_tps: float  # generated tokens per second so far, after the first
    peak_memory: int  # bytes, MLX's peak since the generation started
    finish_reason: str | None = None  # "stop", "length" or None while going on


def _eval_cache(cache) -> None:
    mx.eval([c.state for c in cache])


def _pipelines() -> bool:
    """Whether to queue the next decoding step before reading the current token."""
    return is_gpu()


def _padded_prefill_mask(valid: np.ndarray, start: int, end: int) -> mx.array:
    """Boolean mask (batch, 1, end - start, end) for prompt positions start..end-1: causal,
    and blind to left padding. A padding position sees itself only, which keeps its softmax
    finite; no real position ever attends to it."""
    queries = np.arange(start, end)[:, None]
    keys = np.arange(end)[None, :]
    allowed = (keys <= queries) & (valid[:, None, :end] | (keys == queries))
    return mx.array(allowed[:, None])


def prefill(model: Model, prompt: mx.array, cache, chunk: int = 512,
            valid: np.ndarray | None = None) -> mx.array:
    """Run the prompt (batch, length) through the model in chunks; return the last logits.

    `valid` (batch, >= length), where rows are left-padded, marks the real tokens: attention
    then masks the padding out.
    """
    length = prompt.shape[1]

    def mask(start: int, end: int) -> mx.array | None:
        return None if valid is None else _padded_prefill_mask(valid, start, end)

    start = 0
    while length - start > chunk:
        model.model(prompt[:, start:start + chunk], mask=mask(start, start + chunk), cache=cache)
        _eval_cache(cache)
        start += chunk
    return model(prompt[:, start:], cache=cache, mask=mask(start, length),
                 last_only=True)[:, -1, :]


def stream_generate(model: Model, prompt_ids: Sequence[int], max_tokens: int,
                    sampler: SamplerFn | None = None, use_cache: bool = True,
                    stop_tokens: Iterable[int] | None = None,
                    prefill_chunk: int = 512) -> Iterator[GenerationStep]:
    """Yield generated tokens one at a time with timing and memory figures.

    `use_cache=False` recomputes the whole sequence for every token (what a KV cache saves).
    `stop_tokens` defaults to the model's EOS ids; pass `()` to always produce `max_tokens`.
    With the cache, each new token goes through the model's decoding step (`decode_step`:
    compiled between the attention calls; the plain forward pass while a module is in
    training mode). On GPUs the next forward pass is queued before the current
    token is read (`mx.async_eval`), so graph building overlaps the device's work. Not on
    CPUs: there MLX computes most of a queued pass before returning, which would hold back
    every token, the first included, by one pass.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    tokens = [int(t) for t in prompt_ids]
    n_prompt = len(tokens)
    _check_prompt(tokens, model.config.vocab_size, "prompt_ids")
    if prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
    sampler = sampler or GREEDY
    stops = set(model.config.eos_token_ids if stop_tokens is None else stop_tokens)
    if max_tokens == 0:
        return

    mx.reset_peak_memory()
    pipeline = _pipelines()
    start = time.perf_counter()
    prompt = mx.array(tokens, dtype=mx.int32)[None]
    cache = _cache_for(model, 1, n_prompt, max_tokens) if use_cache else None
    if use_cache:
        logits = prefill(model, prompt, cache, prefill_chunk)
    else:
        logits = model(prompt, last_only=True)[:, -1, :]
    y = sampler(logits)
    mx.async_eval(y)
    if use_cache and max_tokens > 1:  # while the device computes the first token
        decode = decode_step(model)
    generated = 0
    ttft = first_done = previous = 0.0
    while True:
        last = generated + 1 >= max_tokens
        if pipeline and use_cache and not last:
            next_logits = decode(y.reshape(1, 1), cache)
            mx.async_eval(next_logits)
        token = int(y.item())
        now = time.perf_counter()
        generated += 1
        if generated == 1:
            ttft = now - start
            first_done = previous = now
        done = token in stops or last
        yield GenerationStep(
            token=token, index=generated - 1, prompt_tokens=n_prompt,
            time_to_first_token=ttft, prompt_tps=n_prompt / ttft,
            token_latency=now - previous if generated > 1 else ttft,
            generation_tps=(generated - 1) / (now - first_done) if generated > 1 else 0.0,
            peak_memory=mx.get_peak_memory(),
            finish_reason=("stop" if token in stops else "length") if done else None)
        if done:
            return
        previous = now
        tokens.append(token)
        if use_cache:
            if not pipeline:
                next_logits = decode(y.reshape(1, 1), cache)
            y = sampler(next_logits)  # after the yield: a numpy sampler evaluates at once
            mx.async_eval(y)
        else:
            y = sampler(model(mx.array(tokens, dtype=mx.int32)[None], last_only=True)[:, -1, :])


def generate(model: Model, prompt_ids: Sequence[int], max_tokens: int,
             sampler: SamplerFn | None = None, use_cache: bool = True,
             stop_tokens: Iterable[int] | None = None) -> list[int]:
    """The generated token ids (greedy when no sampler), stopping at EOS or `max_tokens`."""
    return [step.token for step in stream_generate(
        model, prompt_ids, max_tokens, sampler=sampler, use_cache=use_cache,
        stop_tokens=stop_tokens)]


def _check_prompt(tokens: list[int], vocab: int, where: str) -> None:
    if not tokens:
        raise ValueError(f"{where} is empty: generation needs at least one prompt token")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab})")


def stream_generate_batch(model: Model, prompts: Sequence[Sequence[int]], max_tokens: int,
                          sampler: SamplerFn | None = None,
                          stop_tokens: Iterable[int] | None = None,
                          prefill_chunk: int = 512) -> Iterator[list[int | None]]:
    """Generate for several prompts at once, one forward pass per step for the whole batch.

    Yields, per step, the new token of every prompt (None once that prompt has stopped, at a
    stop token or after `max_tokens`). Prompts of different lengths are left-padded to the
    longest, and attention masks the padding out, so each row generates what it would alone
    (rotary embeddings depend only on relative positions). Batching trades latency for
    throughput: the weights are read once per step for all rows.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
    rows = [[int(t) for t in p] for p in prompts]
    if not rows:
        raise ValueError("prompts is empty: pass at least one prompt")
    vocab = model.config.vocab_size
    for i, row in enumerate(rows):
        _check_prompt(row, vocab, f"prompts[{i}]")
    sampler = sampler or GREEDY
    stops = set(model.config.eos_token_ids if stop_tokens is None else stop_tokens)
    if max_tokens == 0:
        return

    batch, length = len(rows), max(len(r) for r in rows)
    pads = [length - len(r) for r in rows]
    padded = mx.array([[0] * pad + row for pad, row in zip(pads, rows, strict=True)],
                      dtype=mx.int32)
    # valid[b, j]: position j of row b holds a real token (prompt or generated).
    valid = np.ones((batch, length + max_tokens), dtype=bool)
    for b, pad in enumerate(pads):
        valid[b, :pad] = False
    padding = any(pads)

    cache = _cache_for(model, batch, length, max_tokens)
    y = sampler(prefill(model, padded, cache, prefill_chunk, valid if padding else None))
    mx.async_eval(y)
    decode = decode_step(model)  # while the device computes the first tokens
    finished = [False] * batch
    pipeline = _pipelines()

    def forward(step: int, y: mx.array) -> mx.array:
        position = length + step  # where this step's tokens go
        mask = mx.array(valid[:, None, None, :position + 1]) if padding else None
        return decode(y[:, None], cache, mask)

    for step in range(max_tokens):
        last = step + 1 == max_tokens
        if pipeline and not last:  # see stream_generate
            next_logits = forward(step, y)
            mx.async_eval(next_logits)
        out: list[int | None] = []
        for b, token in enumerate(y.tolist()):
            if finished[b]:
                out.append(None)
                continue
            out.append(token)
            finished[b] = token in stops
        yield out
        if last or all(finished):
            return
        if not pipeline:
            next_logits = forward(step, y)
        y = sampler(next_logits)
        mx.async_eval(y)


def generate_batch(model: Model, prompts: Sequence[Sequence[int]], max_tokens: int,
                   sampler: SamplerFn | None = None,
                   stop_tokens: Iterable[int] | None = None) -> list[list[int]]:
    """The generated token ids of every prompt (see `stream_generate_batch`)."""
    out: list[list[int]] = [[] for _ in prompts]
    for tokens in stream_generate_batch(model, prompts, max_tokens, sampler, stop_tokens):
        for row, token in zip(out, tokens, strict=True):
            if token is not None:
                row.append(token)
    return out
