"""The LoRA trainer: batches, the compiled AdamW step, validation, checkpoints and resume.

Checkpoints live under the adapter path:

    OUT/adapters.safetensors, OUT/adapter_config.json     the latest adapter (mlx-lm format)
    OUT/checkpoints/step-000100/adapters.safetensors      adapter at step 100
                               /adapter_config.json
                               /optimizer.safetensors     AdamW state: m, v, step, learning_rate
                               /trainer_state.json        step, seed, config, data size

A checkpoint is written into a hidden temporary directory and renamed into place, so a
`step-*` directory is always complete. Resuming is exact: the examples of batch k are a pure
function of (seed, k) (`data.BatchOrder`) and the random key of step s (dropout) is derived
from (seed, s), so N steps in one go equal N/2 steps, a resume and N/2 more.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from qwen_lora.data import BatchOrder, Example, eval_batches, make_batch
from qwen_lora.errors import AdapterError, ModelLoadError, TrainingError, read_json_object
from qwen_lora.lora import load_adapter_weights, read_adapter_config, save_adapter
from qwen_lora.train_step import TrainStep, loss_fn, make_optimizer
from qwen_lora.weights import atomic_save_safetensors, atomic_write_text, check_safetensors

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_CHECKPOINT_FILES = ("adapters.safetensors", "adapter_config.json", OPTIMIZER_FILE, STATE_FILE)


@dataclass
class TrainConfig:
    """Training hyperparameters (the seed's defaults: AdamW, lr 1e-4, weight decay 0.01).

    `grad_accum` micro-batches of `batch_size` make one optimizer step; `val_batches` <= 0
    evaluates the whole validation set.
    """

    iters: int = 100
    batch_size: int = 4
    seq_len: int = 512
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    grad_accum: int = 1
    grad_checkpoint: bool = False
    mask_prompt: bool = False
    seed: int = 0
    save_every: int = 100
    report_every: int = 10
    val_every: int = 100
    val_batches: int = 25
    compile: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        for name in ("iters", "batch_size", "seq_len", "grad_accum", "save_every",
                     "report_every", "val_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.val_batches, bool) or not isinstance(self.val_batches, int):
            raise ValueError(f"val_batches must be an integer, got {self.val_batches!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The known fields of `data` (e.g. a checkpoint's saved config); others are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class StepReport:
    """The figures of one optimizer step."""

    step: int  # 1-based
    iters: int
    loss: float  # mean cross-entropy over the step's trained tokens
    tokens: int  # trained (unmasked) target tokens in the step
    step_time: float  # seconds: forward, backward and update, evaluated
    tokens_per_sec: float
    peak_memory: int  # bytes, MLX's peak since training started
    learning_rate: float


@dataclass
class TrainResult:
    """What `train` did: per-step reports, validation losses by step, the last checkpoint."""

    start_step: int
    steps: list[StepReport] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    checkpoint: Path | None = None


# Checkpoints ----------------------------------------------------------------------------------

def checkpoint_dir(adapter_path: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return Path(adapter_path) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(adapter_path: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under the adapter path as (step, directory), oldest first."""
    root = Path(adapter_path) / CHECKPOINTS
    found = []
    for path in root.glob("step-*") if root.is_dir() else ():
        try:
            step = int(path.name[len("step-"):])
        except ValueError:
            continue
        if path.is_dir() and all((path / name).is_file() for name in _CHECKPOINT_FILES):
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(adapter_path: str | os.PathLike) -> Path | None:
    """The most recent complete checkpoint, or None."""
    found = list_checkpoints(adapter_path)
    return found[-1][1] if found else None


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's trainer_state.json."""
    file = Path(checkpoint) / STATE_FILE
    state = read_json_object(file, TrainingError, "missing; the checkpoint is incomplete")
    if not isinstance(state.get("step"), int):
        raise TrainingError(f"{file}: no integer 'step'")
    return state


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory to `final`, replacing an older one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from others
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}.", dir=final.parent))
        os.rename(final, old / final.name)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def save_checkpoint(model: nn.Module, optimizer: optim.Optimizer,
                    adapter_path: str | os.PathLike, step: int,
                    state: dict[str, Any]) -> Path:
    """Write checkpoint `step` (adapter, optimizer state, trainer state) atomically, then
    update the latest adapter at the top of `adapter_path`. Returns the checkpoint directory."""
    final = checkpoint_dir(adapter_path, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_adapter(model, tmp)
        atomic_save_safetensors(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
        atomic_write_text(tmp / STATE_FILE, json.dumps({**state, "step": step}, indent=2))
        _publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, adapter_path)
    return final


def restore_checkpoint(model: nn.Module, optimizer: optim.Optimizer,
                       checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's adapter and optimizer state into a model with the same adapter
    structure (and its optimizer); returns the trainer state. Everything is checked first."""
    directory = Path(checkpoint)
    saved = read_adapter_config(directory)
    current = model.lora_config
    for key in ("rank", "alpha", "targets", "layers"):
        if saved[key] != current[key]:
            raise AdapterError(f"{directory / 'adapter_config.json'}: checkpoint has {key} "
                               f"{saved[key]}, the model's adapters have {current[key]}")
    state = read_trainer_state(directory)
    file = directory / OPTIMIZER_FILE
    try:
        check_safetensors(file)
        arrays = mx.load(str(file))
    except ModelLoadError as err:
        raise TrainingError(str(err)) from None
    except (RuntimeError, ValueError) as err:
        raise TrainingError(f"{file}: cannot read safetensors: {err}") from None
    load_adapter_weights(model, directory)
    optimizer.init(model.trainable_parameters())
    expected = dict(tree_flatten(optimizer.state))
    for name, array in expected.items():
        if name not in arrays or arrays[name].shape != array.shape:
            raise TrainingError(f"{file}: optimizer state {name!r} is missing or misshaped")
    restored = tree_map_with_path(lambda path, _: arrays[path], optimizer.state)
    optimizer.state.clear()  # in place: a compiled step may already hold this dict
    optimizer.state.update(restored)
    mx.eval(optimizer.state)
    return state


def _remove_stale_temporaries(adapter_path: Path) -> None:
    root = adapter_path / CHECKPOINTS
    for path in root.glob(".*step-*") if root.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True)


# Training -------------------------------------------------------------------------------------

def step_seed(seed: int, step: int) -> int:
    """The random seed of `step` (dropout), a function of (seed, step) only."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def evaluate(model: nn.Module, examples: Sequence[Example], batch_size: int, seq_len: int,
             mask_prompt: bool = False, max_batches: int | None = None) -> float:
    """Token-weighted mean loss over `examples` in file order (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets, mask in eval_batches(examples, batch_size, seq_len, mask_prompt,
                                                  max_batches):
            loss, ntoks = loss_fn(model, inputs, targets, mask)
            mx.eval(loss, ntoks)
            total += loss.item() * ntoks.item()
            count += int(ntoks.item())
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def train(model: nn.Module, train_set: Sequence[Example], config: TrainConfig,
          adapter_path: str | os.PathLike, val_set: Sequence[Example] | None = None,
          resume: bool = False, on_step: Callable[[StepReport], None] | None = None,
          on_eval: Callable[[int, float], None] | None = None,
          metadata: dict[str, Any] | None = None) -> TrainResult:
    """Train the LoRA adapters of `model` (see `lora.apply_lora`) for `config.iters` steps.

    Checkpoints go to `adapter_path` every `save_every` steps and at the end. With `resume`,
    training continues from the latest checkpoint there (or starts, if there is none); without
    it, existing checkpoints are an error rather than silently mixed with a new run. A NaN or
    infinite loss raises TrainingError before anything is saved for that step.
    """
    config.validate()
    if getattr(model, "lora_config", None) is None:
        raise AdapterError("the model has no LoRA adapters (call apply_lora first)")
    if not train_set:
        raise ValueError("the training set is empty")
    out = Path(adapter_path)
    optimizer = make_optimizer(config.learning_rate, config.weight_decay)
    latest = latest_checkpoint(out)
    result = TrainResult(start_step=0, checkpoint=latest if resume else None)
    if latest is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints (latest {latest.name}): pass "
                         "--resume to continue from it, or choose another adapter path")
    if resume and latest is not None:
        state = restore_checkpoint(model, optimizer, latest)
        optimizer.learning_rate = config.learning_rate
        result.start_step = state["step"]
        if state.get("num_examples", len(train_set)) != len(train_set):
            print(f"warning: the training set has {len(train_set)} examples, checkpoint "
                  f"{latest.name} was trained on {state['num_examples']}: the data order "
                  "differs from an uninterrupted run", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)

    model.train()
    step_fn = TrainStep(model, optimizer, compile=config.compile,
                        grad_checkpoint=config.grad_checkpoint)
    order = BatchOrder(len(train_set), config.batch_size, config.seed)
    base_state = {"seed": config.seed, "num_examples": len(train_set),
                  "config": dataclasses.asdict(config), "lora": model.lora_config,
                  "metadata": metadata or {}}
    mx.reset_peak_memory()
    try:
        for step in range(result.start_step + 1, config.iters + 1):
            first = (step - 1) * config.grad_accum
            batches = [make_batch([train_set[i] for i in order(first + j)], config.seq_len,
                                  config.mask_prompt) for j in range(config.grad_accum)]
            mx.random.seed(step_seed(config.seed, step))
            start = time.perf_counter()
            loss, ntoks = step_fn(*batches)
            elapsed = time.perf_counter() - start
            if not math.isfinite(loss):
                where = (f"the last good checkpoint {result.checkpoint} is kept"
                         if result.checkpoint else "no checkpoint had been written yet")
                raise TrainingError(f"step {step}: the loss is {loss} (not finite); training "
                                    f"stopped and step {step} was not saved; {where}. Try a "
                                    "lower learning rate.")
            report = StepReport(step, config.iters, loss, ntoks, elapsed,
                                ntoks / elapsed if elapsed > 0 else 0.0, mx.get_peak_memory(),
                                float(optimizer.learning_rate.item()))
            result.steps.append(report)
            if on_step is not None:
                on_step(report)
            last = step == config.iters
            if val_set and (step % config.val_every == 0 or last):
                val = evaluate(model, val_set, config.batch_size, config.seq_len,
                               config.mask_prompt, config.val_batches)
                result.val_losses[step] = val
                if on_eval is not None:
                    on_eval(step, val)
            if step % config.save_every == 0 or last:
                result.checkpoint = save_checkpoint(
                    model, optimizer, out, step,
                    {**base_state, "loss": loss, "examples_seen": step * config.batch_size
                     * config.grad_accum})
    finally:
        model.model.gradient_checkpointing = False
        model.eval()
    return result


# Progress -------------------------------------------------------------------------------------

def format_bytes(n: int) -> str:
    """'1.25 GiB', or MiB below one GiB (tiny models would read '0.00 GiB')."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressPrinter:
    """A plain progress bar: one line to `stream` every `every` steps (and at the last) with
    the interval's mean loss, time per step, tokens/s, peak memory and the time left."""

    def __init__(self, every: int = 10, stream: TextIO | None = None, width: int = 20) -> None:
        self.every, self.width = every, width
        self.stream = stream if stream is not None else sys.stderr
        self._losses: list[float] = []
        self._tokens = 0
        self._time = 0.0

    def __call__(self, r: StepReport) -> None:
        self._losses.append(r.loss)
        self._tokens += r.tokens
        self._time += r.step_time
        if r.step % self.every and r.step != r.iters:
            return
        n = len(self._losses)
        done = int(self.width * r.step / r.iters)
        per_step = self._time / n
        print(f"step {r.step:>{len(str(r.iters))}}/{r.iters} "
              f"[{'#' * done}{'-' * (self.width - done)}] {100 * r.step // r.iters:3d}% | "
              f"loss {sum(self._losses) / n:.4f} | {per_step:.3f} s/step | "
              f"{self._tokens / self._time if self._time else 0:.0f} tok/s | "
              f"peak {format_bytes(r.peak_memory)} | "
              f"eta {_duration(per_step * (r.iters - r.step))}",
              file=self.stream, flush=True)
        self._losses, self._tokens, self._time = [], 0, 0.0

    def validation(self, step: int, loss: float) -> None:
        print(f"step {step}: validation loss {loss:.4f}", file=self.stream, flush=True)
