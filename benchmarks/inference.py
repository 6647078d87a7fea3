"""Inference: token generation, the KV cache against recomputation, sampling overhead, and
beyond the seed: prefill at two prompt lengths, batched generation and quantized weights.

Generation runs each library's own streaming loop: `qwen_lora.stream_generate`, mlx-lm's
`generate_step` and transformers' `generate` (float32, with a streamer for per-token times),
with temperature 0.7 and top-p 0.9, never stopping early (random weights, no EOS).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

from .common import (
    ALL_IMPLEMENTATIONS,
    MLX_IMPLEMENTATIONS,
    MLX_LM,
    QWEN_LORA,
    TORCH,
    WARMUP,
    ModelBenchmark,
    ReportedTimer,
    SlowBenchmark,
    W,
    cached_model,
    load_model,
    mx,
    require,
    token_ids,
)


class _TimestampStreamer:
    """A transformers streamer that notes when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:  # the first call passes the prompt
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def token_times(impl: str, model: Any, prompt: list[int], max_tokens: int,
                sample: bool = True) -> Iterator[float]:
    """Generate `max_tokens` tokens after `prompt` with the library's own loop, yielding the
    moment each token is available; sampling at the workload's temperature and top-p, or
    greedy."""
    temperature = W.temperature if sample else 0.0
    top_p = W.top_p if sample else 1.0
    if impl == QWEN_LORA:
        ql = require("qwen_lora", "stream_generate", "Sampler")
        sampler = ql.Sampler(temperature=temperature, top_p=top_p, seed=0)
        for _ in ql.stream_generate(model, prompt, max_tokens, sampler=sampler, stop_tokens=()):
            yield time.perf_counter()
    elif impl == MLX_LM:
        generate = require("mlx_lm.generate", "generate_step")
        sampler = require("mlx_lm.sample_utils", "make_sampler").make_sampler(
            temp=temperature, top_p=top_p if sample else 0.0)
        for _ in generate.generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                        sampler=sampler):
            yield time.perf_counter()
    else:
        torch = require("torch")
        streamer = _TimestampStreamer()
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) \
            if sample else dict(do_sample=False)
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0,
                           streamer=streamer, **options)
        yield from streamer.times


@functools.cache
def _generation_model(impl: str, model_dir: str) -> Any:
    model = cached_model(impl, model_dir)
    for _ in token_times(impl, model, token_ids(8, W.vocab, seed=3), 2):  # first-call costs
        pass
    return model


DECODE_CLOCK = ReportedTimer()


class Generation(SlowBenchmark):
    """A prompt of 128 tokens, then 100 new ones at temperature 0.7, top-p 0.9."""

    params = [ALL_IMPLEMENTATIONS]
    param_names = ["implementation"]

    def setup(self, model_dir: str, impl: str) -> None:
        self.model = _generation_model(impl, model_dir)
        self.prompt = token_ids(W.prompt, W.vocab, seed=2)

    def time_first_token(self, model_dir: str, impl: str) -> None:
        """Seconds from the call to the first new token: prefill and one sample."""
        for _ in token_times(impl, self.model, self.prompt, 1):
            pass

    time_first_token.repeat = W.fast_repeat

    def time_per_token(self, model_dir: str, impl: str) -> None:
        """Seconds per token of the decoding phase, after the first token."""
        times = list(token_times(impl, self.model, self.prompt, W.new_tokens))
        DECODE_CLOCK.report((times[-1] - times[0]) / (len(times) - 1))

    time_per_token.timer = DECODE_CLOCK
    # Two processes (rounds), which asv interleaves between the commits it compares: one
    # process decodes at its own pace, more different from the next process's than its
    # samples are from each other (qwen_lora's forward pass, measured here: +-12%).
    time_per_token.rounds = 2
    time_per_token.repeat = max(1, W.slow_repeat // 2)

    def time_total(self, model_dir: str, impl: str) -> None:
        """Seconds for the whole generation, prompt to last token."""
        for _ in token_times(impl, self.model, self.prompt, W.new_tokens):
            pass

    # The time budget: PyTorch decodes slowest; its first token and per-token times suffice.
    time_total.skip_params = [(TORCH,)]


@functools.cache
def _warm_prompt(impl: str, model_dir: str, tokens: int) -> None:
    """Run a prompt of this length once per process: the first use of a length compiles
    kernels (MLX's on a CPU with g++, a GPU's), which the samples should not time."""
    for _ in token_times(impl, _generation_model(impl, model_dir),
                         token_ids(tokens, W.vocab, seed=5), 1, sample=False):
        pass


class Prefill(SlowBenchmark):
    """Prompts of 128 and 512 tokens to the first new token, greedy: the prompt's pass."""

    params = [ALL_IMPLEMENTATIONS, [128, 512]]  # both workloads: asv keys results by params
    param_names = ["implementation", "tokens"]

    def setup(self, model_dir: str, impl: str, tokens: int) -> None:
        _warm_prompt(impl, model_dir, tokens)
        self.model = cached_model(impl, model_dir)
        self.prompt = token_ids(tokens, W.vocab, seed=4)

    def time_first_token(self, model_dir: str, impl: str, tokens: int) -> None:
        """Seconds from the call to the first new token (each library's own loop)."""
        for _ in token_times(impl, self.model, self.prompt, 1, sample=False):
            pass


def _recompute_times(impl: str, model: Any, prompt: list[int], max_tokens: int
                     ) -> Iterator[float]:
    """Greedy generation without a cache: every token runs the whole sequence again."""
    if impl == QWEN_LORA:
        ql = require("qwen_lora", "stream_generate")
        for _ in ql.stream_generate(model, prompt, max_tokens, use_cache=False, stop_tokens=()):
            yield time.perf_counter()
        return
    # mlx-lm has no cache-less mode: the plain loop a user would write, logits of the last
    # position only (as qwen_lora computes them), so that the comparison is about the cache.
    tokens = list(prompt)
    for _ in range(max_tokens):
        hidden = model.model(mx.array([tokens]))[:, -1:, :]
        token = mx.argmax(model.model.embed_tokens.as_linear(hidden)[0, -1]).item()
        tokens.append(token)
        yield time.perf_counter()


@functools.cache
def _warm_long_context(impl: str, model_dir: str, prompt: tuple[int, ...] | list[int]) -> None:
    """Decode once at the context length before the samples: on a GPU, the first tokens
    there compile kernels for the longer keys (~350 ms on an H100, once per process)."""
    for _ in token_times(impl, _generation_model(impl, model_dir), list(prompt), 3,
                         sample=False):
        pass


CONTEXT_CLOCK = ReportedTimer()


class KVCacheVsRecompute(SlowBenchmark):
    """Time per generated token at a 512-token sequence: with the KV cache, and recomputing
    the whole sequence for each token (greedy)."""

    params = [MLX_IMPLEMENTATIONS, ["kv_cache", "recompute"]]
    param_names = ["implementation", "mode"]

    def setup(self, model_dir: str, impl: str, mode: str) -> None:
        self.model = _generation_model(impl, model_dir)
        self.prompt = token_ids(W.context - 1, W.vocab, seed=4)
        _warm_long_context(impl, model_dir, tuple(self.prompt))

    def time_token(self, model_dir: str, impl: str, mode: str) -> None:
        """Seconds per token once the sequence reaches the context length (the prompt's
        prefill excluded): averaged over a few tokens with the cache, one without."""
        if mode == "kv_cache":
            times = list(token_times(impl, self.model, self.prompt, 1 + W.cached_tokens,
                                     sample=False))
        else:
            times = list(_recompute_times(impl, self.model, self.prompt, 2))
        CONTEXT_CLOCK.report((times[-1] - times[0]) / (len(times) - 1))

    time_token.timer = CONTEXT_CLOCK


STRATEGIES = ["greedy", "top_k", "top_p", "temperature"]


def make_sampler(impl: str, strategy: str) -> Callable[[mx.array], mx.array]:
    """Greedy; top-k 50, top-p 0.9 and plain sampling, all at temperature 0.7."""
    settings = {"greedy": dict(temperature=0.0),
                "top_k": dict(temperature=W.temperature, top_k=W.top_k),
                "top_p": dict(temperature=W.temperature, top_p=W.top_p),
                "temperature": dict(temperature=W.temperature)}[strategy]
    if impl == QWEN_LORA:
        return require("qwen_lora", "Sampler").Sampler(seed=0, **settings)
    utils = require("mlx_lm.sample_utils", "make_sampler")
    return utils.make_sampler(temp=settings["temperature"], top_k=settings.get("top_k", 0),
                              top_p=settings.get("top_p", 0.0))


# Draws evaluated together by Sampling.time_overhead. One evaluation costs a GPU a fixed
# synchronization (an H100 with MLX 0.32: 31 us for a one-element addition, 71 for the argmax
# of 151,936 logits) that a decoding step pays once whether it samples or not; shared by 16
# draws, the argmax's cost per draw was 5-15 us. On a CPU the two measures agree.
SHARED_DRAWS = 16
SAMPLING_CLOCK = ReportedTimer()


class Sampling:
    """Picking one token from one row of logits (log-probabilities, as generation passes)."""

    params = [MLX_IMPLEMENTATIONS, STRATEGIES, list(W.sample_vocabularies)]
    param_names = ["implementation", "strategy", "vocabulary"]
    number = 1
    rounds = 1
    warmup_time = 0.05
    repeat = W.fast_repeat

    def setup(self, impl: str, strategy: str, vocab: int) -> None:
        self.sampler = make_sampler(impl, strategy)
        logits = mx.random.normal((1, vocab), key=mx.random.key(vocab)) * 3.0
        self.logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(self.logprobs, self.sampler(self.logprobs))

    def time_sample(self, impl: str, strategy: str, vocab: int) -> None:
        """Seconds per sampled token, one evaluation each (its synchronization included)."""
        mx.eval(self.sampler(self.logprobs))

    def time_overhead(self, impl: str, strategy: str, vocab: int) -> None:
        """Seconds a draw adds to an evaluation it shares, as a decoding step's draw shares
        the step's: `SHARED_DRAWS` draws evaluated together, per draw."""
        start = time.perf_counter()
        mx.eval([self.sampler(self.logprobs) for _ in range(SHARED_DRAWS)])
        SAMPLING_CLOCK.report((time.perf_counter() - start) / SHARED_DRAWS)

    time_overhead.timer = SAMPLING_CLOCK


@functools.cache
def _decode_state(impl: str, model_dir: str) -> tuple[Any, list, mx.array]:
    """A model, its KV cache holding the prompt, and the next token."""
    model = cached_model(impl, model_dir)
    prompt = mx.array([token_ids(W.prompt, W.vocab, seed=2)])
    if impl == QWEN_LORA:
        if not hasattr(model, "make_cache"):
            raise NotImplementedError("qwen_lora's model has no make_cache")
        cache = model.make_cache()
        require("qwen_lora.generate", "prefill").prefill(model, prompt, cache)
    else:
        cache = require("mlx_lm.models.cache", "make_prompt_cache").make_prompt_cache(model)
        model(prompt, cache=cache)
    mx.eval([c.state for c in cache])
    if not all(hasattr(c, "trim") for c in cache):
        raise NotImplementedError("the KV cache cannot be trimmed back after a step")
    return model, cache, mx.array([[1]])


class ForwardPass(ModelBenchmark):
    """One decoding forward pass: a token through the model with a 128-token KV cache, as
    each library's generation runs it (qwen_lora's `decode_step`, mlx-lm's model call)."""

    params = [MLX_IMPLEMENTATIONS]
    param_names = ["implementation"]
    number = 1
    rounds = 1
    warmup_time = WARMUP
    repeat = W.fast_repeat

    def setup(self, model_dir: str, impl: str) -> None:
        self.model, self.cache, self.token = _decode_state(impl, model_dir)
        self.call = self.model
        if impl == QWEN_LORA:
            try:
                self.call = require("qwen_lora.decode", "decode_step").decode_step(self.model)
            except NotImplementedError:  # a commit before the decoding step: the model call
                self.call = functools.partial(self.model, last_only=True)
            # the step's first call traces and compiles it (g++ on a CPU): not in a sample
            mx.eval(self.call(self.token, cache=self.cache))
            for c in self.cache:
                c.trim(1)

    def teardown(self, model_dir: str, impl: str) -> None:
        # back to the prompt, so that every sample sees 128 tokens; asv also tears down
        # where setup skipped (no cache then)
        for c in getattr(self, "cache", ()):
            c.trim(1)

    def time_forward(self, model_dir: str, impl: str) -> None:
        """Seconds per forward pass (the denominator of the sampling overhead)."""
        mx.eval(self.call(self.token, cache=self.cache))



BATCH_CLOCK = ReportedTimer()


def _batch_times(impl: str, model: Any, prompts: list[list[int]], max_tokens: int
                 ) -> Iterator[float]:
    """Generate `max_tokens` for every prompt at once with the library's batched loop
    (qwen_lora's `stream_generate_batch`, mlx-lm's `BatchGenerator`), yielding the moment
    each step's tokens are available."""
    sampler_args = dict(temperature=W.temperature, top_p=W.top_p)
    if impl == QWEN_LORA:
        ql = require("qwen_lora", "stream_generate_batch", "Sampler")
        for _ in ql.stream_generate_batch(model, prompts, max_tokens,
                                          sampler=ql.Sampler(seed=0, **sampler_args),
                                          stop_tokens=()):
            yield time.perf_counter()
        return
    batch = len(prompts)
    gen_mod = require("mlx_lm.generate", "BatchGenerator")
    sampler = require("mlx_lm.sample_utils", "make_sampler").make_sampler(
        temp=W.temperature, top_p=W.top_p)
    generator = gen_mod.BatchGenerator(model, max_tokens=max_tokens, sampler=sampler,
                                       completion_batch_size=batch, prefill_batch_size=batch)
    try:
        generator.insert(prompts, [max_tokens] * batch)
        while generator.next_generated():
            yield time.perf_counter()
    finally:
        generator.close()


class BatchGeneration(SlowBenchmark):
    """Several sequences decoded together (32-token prompts, 8 new tokens each, temperature
    0.7, top-p 0.9): one forward pass per step serves the whole batch."""

    params = [MLX_IMPLEMENTATIONS, list(W.batch_sizes)]
    param_names = ["implementation", "batch"]

    def setup(self, model_dir: str, impl: str, batch: int) -> None:
        self.model = _generation_model(impl, model_dir)
        self.prompts = [token_ids(W.batch_prompt, W.vocab, seed=10 + i) for i in range(batch)]
        for _ in _batch_times(impl, self.model, self.prompts[:1], 2):  # first-call costs
            pass

    def time_per_token(self, model_dir: str, impl: str, batch: int) -> None:
        """Seconds per generated token in the decoding phase: a step's time over the batch
        size (the inverse of the throughput in tokens/s)."""
        times = list(_batch_times(impl, self.model, self.prompts, W.batch_tokens))
        BATCH_CLOCK.report((times[-1] - times[0]) / (len(times) - 1) / batch)

    time_per_token.timer = BATCH_CLOCK


@functools.cache
def _quantized_model(impl: str, model_dir: str, bits: int) -> Any:
    """The inference model with its linear layers and embedding quantized to `bits` bits
    in groups of 64, each library's own way; first-call costs paid."""
    if impl == QWEN_LORA:
        if not hasattr(require("qwen_lora.model", "Model").Model, "quantize"):
            raise NotImplementedError("qwen_lora's model has no quantize")
        model = load_model(impl, model_dir, inference=True).quantize(bits=bits, group_size=64)
    else:
        # What mlx_lm.convert does: every layer whose input size 64 divides.
        nn = require("mlx.nn", "quantize")
        model = load_model(impl, model_dir, inference=True)
        nn.quantize(model, group_size=64, bits=bits, class_predicate=lambda _, m: (
            hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0))
    mx.eval(model.parameters())
    for _ in token_times(impl, model, token_ids(8, W.vocab, seed=3), 2):
        pass
    return model


QUANTIZED_CLOCK = ReportedTimer()


class QuantizedGeneration(SlowBenchmark):
    """Decoding with 8- and 4-bit weights (32-token prompt, 8 new tokens, temperature 0.7,
    top-p 0.9): decoding reads every weight once per token, so fewer bytes go faster where
    a quantized matmul kernel keeps up (GPUs; MLX's CPU kernels do not)."""

    params = [MLX_IMPLEMENTATIONS, list(W.quantized_bits)]
    param_names = ["implementation", "bits"]

    def setup(self, model_dir: str, impl: str, bits: int) -> None:
        self.model = _quantized_model(impl, model_dir, bits)
        self.prompt = token_ids(W.batch_prompt, W.vocab, seed=2)

    def time_per_token(self, model_dir: str, impl: str, bits: int) -> None:
        """Seconds per token of the decoding phase, after the first token."""
        times = list(token_times(impl, self.model, self.prompt, W.batch_tokens))
        QUANTIZED_CLOCK.report((times[-1] - times[0]) / (len(times) - 1))

    time_per_token.timer = QUANTIZED_CLOCK
