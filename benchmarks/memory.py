"""Memory: bytes, from MLX's own counters, so the two MLX implementations are measured alike.

Peak memory (`mx.reset_peak_memory` before, `mx.get_peak_memory` after) of loading the model,
of a forward pass and of a LoRA training step, each counting the weights already resident;
and the bytes a KV cache holds once 2048 tokens went through the model. Allocations are
deterministic, so any increase is a real regression.
"""

from __future__ import annotations

import gc

from .common import (
    MLX_IMPLEMENTATIONS,
    QWEN_LORA,
    ModelBenchmark,
    W,
    load_model,
    mx,
    require,
    settle,
    token_ids,
)
from .inference import _quantized_model
from .training import trainer

PREFILL_CHUNK = 512


def _clean() -> None:
    settle()
    mx.clear_cache()


def fill_cache(impl: str, model: object, prompt: mx.array) -> list:
    """A fresh KV cache after `prompt` went through the model in chunks of 512 tokens."""
    if impl == QWEN_LORA:
        cache = model.make_cache()
        prefill = require("qwen_lora.generate", "prefill").prefill
        mx.eval(prefill(model, prompt, cache, PREFILL_CHUNK))
    else:
        cache = require("mlx_lm.models.cache", "make_prompt_cache").make_prompt_cache(model)
        for start in range(0, prompt.shape[1], PREFILL_CHUNK):
            mx.eval(model(prompt[:, start:start + PREFILL_CHUNK], cache=cache))
    mx.eval([c.state for c in cache])
    return cache


class PeakMemory(ModelBenchmark):
    """Peak bytes of the model's main operations at batch 1."""

    params = [MLX_IMPLEMENTATIONS]
    param_names = ["implementation"]
    unit = "bytes"

    def setup(self, model_dir: str, impl: str) -> None:
        require("mlx.core", "reset_peak_memory", "get_peak_memory", "get_active_memory",
                "clear_cache")
        if impl == QWEN_LORA:
            require("qwen_lora", "load")
        else:
            require("mlx_lm.utils", "load_model")
        _clean()

    def track_model_load(self, model_dir: str, impl: str) -> int:
        """Peak bytes while loading the model: weights and any temporary copies."""
        mx.reset_peak_memory()
        model = load_model(impl, model_dir)
        peak = mx.get_peak_memory()
        del model
        return peak

    def track_forward(self, model_dir: str, impl: str) -> int:
        """Peak bytes of a forward pass over the training sequence (512 tokens), all logits."""
        model = load_model(impl, model_dir)
        inputs = mx.array([token_ids(W.train_seq, W.vocab, seed=1)])
        mx.eval(inputs)
        _clean()
        mx.reset_peak_memory()
        mx.eval(model(inputs))
        return mx.get_peak_memory()

    def track_train_step(self, model_dir: str, impl: str) -> int:
        """Peak bytes of a LoRA training step after the first, compiling one (a compiled
        step can hold more than the traced first one: ~200 MB more on an H100)."""
        step = trainer(impl, model_dir)
        _clean()
        mx.reset_peak_memory()
        step()
        return mx.get_peak_memory()

    def track_kv_cache(self, model_dir: str, impl: str) -> int:
        """Bytes held by the KV cache after a 2048-token prompt: compare with
        layers x 2 x KV heads x tokens x head_dim x bytes per element."""
        model = load_model(impl, model_dir)
        prompt = mx.array([token_ids(W.kv_tokens, W.vocab, seed=5)])
        mx.eval(prompt)
        _clean()
        before = mx.get_active_memory()
        cache = fill_cache(impl, model, prompt)
        gc.collect()
        held = mx.get_active_memory() - before
        del cache
        return held



class QuantizedWeights(ModelBenchmark):
    """Bytes of the model's parameters quantized to 8 and 4 bits in groups of 64."""

    params = [MLX_IMPLEMENTATIONS, list(W.quantized_bits)]
    param_names = ["implementation", "bits"]
    unit = "bytes"

    def setup(self, model_dir: str, impl: str, bits: int) -> None:
        self.model = _quantized_model(impl, model_dir, bits)

    def track_weights(self, model_dir: str, impl: str, bits: int) -> int:
        """Bytes of the parameters: integers, and a scale and offset per group."""
        flatten = require("mlx.utils", "tree_flatten").tree_flatten
        return sum(v.nbytes for _, v in flatten(self.model.parameters()))
