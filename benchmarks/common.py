"""What every benchmark module shares: the workloads, the model directory, the implementations
under comparison and asv timers that report per token or per step.

asv runs each benchmark (and each parameter combination) in a fresh process, and re-runs
`setup` before every sample, so expensive state (loaded models, compiled steps) lives in
per-process caches filled by the first `setup` call, outside the timed region.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOAD_ENV = "QWEN_LORA_WORKLOAD"
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

if os.environ.get(WORKLOAD_ENV) == "small":
    # The small workload computes on one thread (BLAS, OpenMP for PyTorch): another process
    # on this machine then slows it in proportion, instead of stalling every multi-threaded
    # kernel for a scheduler slice. Set before the libraries load, which is when they read it.
    for _name in THREAD_ENV:
        os.environ.setdefault(_name, "1")

try:
    # First, before mlx.core: qwen_lora loads its fast BLAS, which every MLX line then shares.
    import qwen_lora  # noqa: F401
except ImportError:  # a commit without the package: only the benchmarks that need it skip
    qwen_lora = None

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

# The implementations that stand side by side in each graph.
QWEN_LORA, MLX_LM, TORCH = "qwen_lora", "mlx_lm", "torch"
MLX_IMPLEMENTATIONS = [QWEN_LORA, MLX_LM]
ALL_IMPLEMENTATIONS = [QWEN_LORA, MLX_LM, TORCH]

# Qwen2.5-Coder-0.5B (494M parameters), as in its Hugging Face config.json.
QWEN25_CODER_05B = {
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# The same architecture, scaled down: head_dim 64 and 7 query heads per KV head as in the
# 0.5B, a 32,000-token vocabulary, 4 layers (about 23M parameters).
SMALL_QWEN2 = dict(QWEN25_CODER_05B, vocab_size=32000, hidden_size=448, intermediate_size=1216,
                   num_hidden_layers=4, num_attention_heads=7, num_key_value_heads=1)


@dataclass(frozen=True)
class Workload:
    """The sizes every benchmark runs at, and how many samples it takes of each."""

    name: str
    model: dict[str, Any]  # Hugging Face Qwen2 config fields
    train_seq: int  # LoRA training sequence length (batch 1)
    prompt: int  # prompt tokens for generation
    new_tokens: int  # tokens generated after the prompt
    context: int  # sequence length where KV-cache decoding meets recomputation
    cached_tokens: int  # tokens timed (and averaged) on the KV-cache side of that comparison
    kv_tokens: int  # tokens held by the KV cache whose memory is tracked
    op_size: int  # square tensors of the tensor-operation microbenchmarks
    component_seq: int  # sequence length of the model-component microbenchmarks
    # Samples. asv calls a change significant by a Mann-Whitney test at p < 0.002, which
    # needs at least 7 samples on each side; with fewer, only non-overlapping confidence
    # intervals count. The small workload takes 10 (it gates pull requests); the seed's sizes
    # take 2 or 3 (each sample is seconds: the time budget).
    slow_repeat: int  # samples of benchmarks whose call takes seconds at the seed's sizes
    step_repeat: int  # samples (consecutive steps) of the training-step run
    fast_repeat: tuple[int, int, float]  # (min, max, seconds) for millisecond benchmarks
    batch_prompt: int = 32  # prompt tokens per sequence of the batched and quantized runs
    batch_tokens: int = 8  # tokens generated per sequence there
    sample_vocabularies: tuple[int, ...] = (32000, 151936)
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    quantized_bits: tuple[int, ...] = (8, 4)
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    lora: dict[str, Any] = field(default_factory=lambda: {
        "rank": 8, "alpha": 16.0, "targets": ("q_proj", "v_proj")})
    learning_rate: float = 1e-4
    weight_decay: float = 0.01

    @property
    def vocab(self) -> int:
        return self.model["vocab_size"]

    @property
    def head_dim(self) -> int:
        return self.model["hidden_size"] // self.model["num_attention_heads"]

    def kv_cache_bytes(self, tokens: int, bytes_per_element: int) -> int:
        """layers x 2 (keys, values) x batch 1 x KV heads x tokens x head_dim x bytes."""
        m = self.model
        return (m["num_hidden_layers"] * 2 * m["num_key_value_heads"] * tokens * self.head_dim
                * bytes_per_element)


WORKLOADS = {
    # The benchmark plan's sizes (docs/BENCHMARKS.md).
    "default": Workload(
        name="default", model=QWEN25_CODER_05B, train_seq=512, prompt=128, new_tokens=100,
        context=512, cached_tokens=8, kv_tokens=2048, op_size=1024, component_seq=512,
        slow_repeat=2, step_repeat=3, fast_repeat=(5, 50, 3.0)),
    # Same code paths on a small model and short sequences: long histories and tests.
    "small": Workload(
        name="small", model=SMALL_QWEN2, train_seq=64, prompt=32, new_tokens=32,
        context=128, cached_tokens=8, kv_tokens=256, op_size=256, component_seq=128,
        slow_repeat=10, step_repeat=10, fast_repeat=(10, 50, 0.25)),
}


def current_workload() -> Workload:
    """The workload named by $QWEN_LORA_WORKLOAD (asv's matrix sets it); 'default' if unset."""
    name = os.environ.get(WORKLOAD_ENV, "default") or "default"
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"{WORKLOAD_ENV}={name!r}: choose one of {', '.join(WORKLOADS)}") from None


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def for_device(workload: Workload) -> Workload:
    """On a GPU the seed's sizes take milliseconds, not seconds: ten samples of each
    benchmark (a CPU's time budget allows two or three)."""
    if on_cpu():
        return workload
    return dataclasses.replace(workload, slow_repeat=max(workload.slow_repeat, 10),
                               step_repeat=max(workload.step_repeat, 10))


W = for_device(current_workload())
# Seconds of calls before the samples of benchmarks that take seconds on a CPU (none there:
# their setup makes a first call). A GPU compiles kernels at the first use of each shape and
# path (a first long-context token: ~350 ms on an H100), which the warm-up keeps out.
WARMUP = 0.0 if on_cpu() else 1.0


def require(module: str, *names: str) -> Any:
    """Import `module` and check it has `names`; otherwise raise NotImplementedError, which
    asv reports as a skipped benchmark (an old commit, or a comparator not installed)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise NotImplementedError(f"{module} is not available: {err}") from None
    missing = [name for name in names if not hasattr(mod, name)]
    if missing:
        raise NotImplementedError(f"{module} has no {', '.join(missing)}")
    return mod


def mlx_dtype() -> mx.Dtype:
    """float32 on CPUs (MLX's half-precision CPU matmul is ~40x slower), float16 on GPUs."""
    return mx.float32 if on_cpu() else mx.float16


def settle() -> None:
    """Wait for MLX work still queued (generators pipeline a step ahead) and free memory, so
    that nothing of one sample runs during the next."""
    mx.synchronize()
    mlx_lm_generate = sys.modules.get("mlx_lm.generate")  # mlx-lm decodes on its own stream
    if mlx_lm_generate is not None:
        mx.synchronize(mlx_lm_generate.generation_stream)
    gc.collect()


def token_ids(count: int, vocab: int, seed: int = 0) -> list[int]:
    """Reproducible random token ids (random weights make any text equally good)."""
    return np.random.default_rng(seed).integers(0, vocab, size=count).tolist()


# -- the model directory -----------------------------------------------------------------

def qwen2_config(model: dict[str, Any]) -> dict[str, Any]:
    """A complete Hugging Face `config.json` for Qwen2ForCausalLM."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "torch_dtype": "float32", "initializer_range": 0.02, "use_cache": True,
        "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
        "max_window_layers": model["num_hidden_layers"], "bos_token_id": None,
        "eos_token_id": None, **model,
    }


def qwen2_shapes(model: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a tied-embedding Qwen2 checkpoint, by its Hugging Face name."""
    hidden, inter = model["hidden_size"], model["intermediate_size"]
    kv = model["num_key_value_heads"] * hidden // model["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (model["vocab_size"], hidden),
              "model.norm.weight": (hidden,)}
    for i in range(model["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    return shapes


def write_model_dir(path: Path, model: dict[str, Any], seed: int = 0) -> Path:
    """Write a Qwen2 checkpoint with random float32 weights into `path`.

    Written by the benchmark suite itself (numpy and safetensors), not by the commit under
    test, so that every commit of a history reads the same bytes.
    """
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in qwen2_shapes(model).items():
        values = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * values
        else:
            values *= 0.02
        tensors[name] = values
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(qwen2_config(model), indent=2))
    tmp.rename(path)
    return path


class ModelBenchmark:
    """Base of the benchmarks that need the workload's model.

    asv runs `setup_cache` once per run for all subclasses (its key is where this function
    is defined) in the run's cache directory, and passes the model directory to `setup` and
    to each benchmark as the first argument.
    """

    # Seconds before asv gives up on one benchmark: the same for every workload, because
    # asv takes it from the discovery run, whichever workload that imported.
    timeout = 1800

    def setup_cache(self) -> str:
        return str(write_model_dir(Path("model").resolve(), W.model))

    setup_cache.timeout = 900


class SlowBenchmark(ModelBenchmark):
    """A model benchmark whose call takes seconds on a CPU at the seed's sizes: one call a
    sample, `W.slow_repeat` samples in one process, the device's warm-up, and the process
    settled between samples."""

    number = 1
    rounds = 1
    warmup_time = WARMUP
    repeat = W.slow_repeat

    def teardown(self, *args: Any) -> None:
        settle()


# -- loading each implementation ---------------------------------------------------------

def load_model(impl: str, model_dir: str, inference: bool = False) -> Any:
    """A fresh model of `impl` with the directory's weights, in the device's compute dtype.

    `inference`: prepared as the implementation's own generation path loads it (qwen_lora
    fuses its projections there, as `qwen-lora generate` does, at commits that can).
    """
    if impl == QWEN_LORA:
        ql = require("qwen_lora", "load")
        if inference:
            try:
                return ql.load(model_dir, dtype=mlx_dtype(), fuse_projections=True)
            except TypeError:  # a commit before fused projections
                pass
        return ql.load(model_dir, dtype=mlx_dtype())
    if impl == MLX_LM:
        utils = require("mlx_lm.utils", "load_model")
        model, _ = utils.load_model(Path(model_dir))
        model.set_dtype(mlx_dtype())
        mx.eval(model.parameters())
        return model
    if impl == TORCH:
        if not on_cpu():
            raise NotImplementedError("the torch line is PyTorch on the CPU; MLX is on a GPU")
        torch = require("torch")
        transformers = require("transformers", "Qwen2ForCausalLM")
        transformers.utils.logging.disable_progress_bar()
        model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return model.eval()
    raise ValueError(f"unknown implementation {impl!r}")


@functools.cache
def cached_model(impl: str, model_dir: str) -> Any:
    """`load_model` for inference, once per process: `setup` runs before every sample."""
    return load_model(impl, model_dir, inference=True)


# -- timers -------------------------------------------------------------------------------

class PerUnitTimer:
    """An asv `timer` whose seconds are `units` times longer than the wall clock's: a call
    that processes `units` tokens (or steps) is then reported per token (or per step)."""

    def __init__(self, units: int) -> None:
        self.units = units

    def __call__(self) -> float:
        return time.perf_counter() / self.units


class ReportedTimer:
    """An asv `timer` that advances only by what the benchmark `report`s: for a quantity
    that is one part of a call, such as the decoding phase of a generation (the prompt's
    prefill excluded), measured by the benchmark between two events of the call."""

    def __init__(self) -> None:
        self.elapsed = 0.0

    def __call__(self) -> float:
        return self.elapsed

    def report(self, seconds: float) -> None:
        self.elapsed += seconds
