"""Sampling cost on the device, qwen_lora's MLX path beside mlx-lm's (and beside the
sampling.py given as an argument, e.g. an older one from git), per strategy, at vocabularies
32,000 and 151,936: the median of many calls, each evaluated, as asv's Sampling benchmark
times them."""
# ruff: noqa: I001  (qwen_lora loads its BLAS before mlx.core)

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

from qwen_lora import Sampler
import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

baseline = None
if len(sys.argv) > 1:  # a sampling.py to compare with, e.g. the sort-based one of git history
    spec = importlib.util.spec_from_file_location("baseline_sampling", Path(sys.argv[1]))
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)


def median_us(fn, logprobs, calls=200) -> float:
    for _ in range(10):
        mx.eval(fn(logprobs))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        mx.eval(fn(logprobs))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


settings = {"top_k": dict(top_k=50), "top_p": dict(top_p=0.9), "temperature": {}}
for vocab in (32000, 151936):
    logits = mx.random.normal((1, vocab), key=mx.random.key(vocab)) * 3.0
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for name, extra in settings.items():
        row = {"qwen_lora": median_us(Sampler(0.7, seed=0, **extra), logprobs)}
        if baseline is not None:
            row["sort-based"] = median_us(baseline.Sampler(0.7, seed=0, **extra), logprobs)
        row["mlx_lm"] = median_us(make_sampler(temp=0.7, top_k=extra.get("top_k", 0),
                                               top_p=extra.get("top_p", 0.0)), logprobs)
        print(f"vocab {vocab:6d} {name:12s} " +
              "  ".join(f"{k} {v:7.1f} us" for k, v in row.items()), flush=True)
