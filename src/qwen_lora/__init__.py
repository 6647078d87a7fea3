"""Qwen2.5 in MLX: Hugging Face weights, LoRA fine-tuning and KV-cache generation."""

__version__ = "0.1.0"

# The optimized BLAS must be loaded before anything imports mlx.core (see backend.py); the
# flags of MLX's compiled CPU kernels must be in place before the first one is built.
from qwen_lora.backend import load_fast_blas as _load_fast_blas
from qwen_lora.cpu_jit import use_cpu_jit_flags as _use_cpu_jit_flags

_load_fast_blas()
_use_cpu_jit_flags()

from qwen_lora.heap import keep_freed_memory as _keep_freed_memory  # noqa: E402

_keep_freed_memory()  # after the BLAS: it imports mlx.core to see the device

from qwen_lora.cache import KVCache, make_cache  # noqa: E402
from qwen_lora.config import ModelConfig, preset  # noqa: E402
from qwen_lora.errors import AdapterError, DataError, ModelLoadError, TrainingError  # noqa: E402
from qwen_lora.generate import (  # noqa: E402
    GenerationStep,
    generate,
    generate_batch,
    stream_generate,
    stream_generate_batch,
)
from qwen_lora.lora import apply_lora, fuse_lora, load_adapter, save_adapter  # noqa: E402
from qwen_lora.model import Model  # noqa: E402
from qwen_lora.sampling import Sampler, make_sampler  # noqa: E402
from qwen_lora.weights import init_model_dir, load, save  # noqa: E402

__all__ = [
    "AdapterError", "DataError", "GenerationStep", "KVCache", "Model", "ModelConfig",
    "ModelLoadError", "Sampler", "TrainingError", "__version__", "apply_lora", "fuse_lora",
    "generate", "generate_batch", "init_model_dir", "load", "load_adapter", "make_cache",
    "make_sampler", "preset",
    "save", "save_adapter", "stream_generate", "stream_generate_batch",
]
