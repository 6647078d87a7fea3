"""Training: LoRA fine-tuning throughput and gradient computation, batch 1.

LoRA rank 8, alpha 16 on the query and value projections of every layer; AdamW with learning
rate 1e-4 and weight decay 0.01; one random sequence of the workload's length, every position
a target. qwen_lora's compiled `TrainStep`, mlx-lm's trainer step (compiled the way
`mlx_lm.tuner.trainer.train` compiles it) and PyTorch (transformers + peft, float32) run the
same step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from .common import (
    ALL_IMPLEMENTATIONS,
    MLX_IMPLEMENTATIONS,
    MLX_LM,
    QWEN_LORA,
    TORCH,
    PerUnitTimer,
    ReportedTimer,
    SlowBenchmark,
    W,
    load_model,
    mx,
    on_cpu,
    require,
    token_ids,
)

GPU_ROUNDS = 1 if on_cpu() else 3


def _sequence() -> list[int]:
    return token_ids(W.train_seq + 1, W.vocab, seed=1)


def _lora_model(impl: str, model_dir: str) -> Any:
    """A freshly loaded model with LoRA adapters on q and v, the rest frozen."""
    model = load_model(impl, model_dir)
    rank, alpha, targets = W.lora["rank"], W.lora["alpha"], W.lora["targets"]
    if impl == QWEN_LORA:
        require("qwen_lora.lora", "apply_lora").apply_lora(
            model, rank=rank, alpha=alpha, targets=targets)
    elif impl == MLX_LM:
        tuner = require("mlx_lm.tuner.utils", "linear_to_lora_layers")
        model.freeze()
        tuner.linear_to_lora_layers(model, len(model.layers), {
            "rank": rank, "scale": alpha / rank, "dropout": 0.0,
            "keys": [f"self_attn.{t}" for t in targets]})
    else:
        peft = require("peft", "LoraConfig", "get_peft_model")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    model.train()  # the mode each library trains in (qwen_lora and transformers load in eval)
    return model


def _mlx_batch(impl: str) -> tuple:
    """The training batch in the form each MLX implementation's loss takes."""
    seq = mx.array([_sequence()])
    if impl == QWEN_LORA:
        return (seq[:, :-1], seq[:, 1:], mx.ones((1, W.train_seq), dtype=mx.float32))
    return (seq, mx.array([[0, W.train_seq + 1]]))


@functools.cache
def trainer(impl: str, model_dir: str, warm: bool = True) -> Callable[[], Any]:
    """One optimizer step as a call that returns when the step is computed; `warm`: after
    a first step (compilation, first-call costs), which the samples then leave out."""
    model = _lora_model(impl, model_dir)
    if impl == QWEN_LORA:
        ts = require("qwen_lora.train_step", "TrainStep", "make_optimizer")
        step_fn = ts.TrainStep(model, ts.make_optimizer(W.learning_rate, W.weight_decay),
                               compile=True)
        batch = _mlx_batch(impl)

        def step() -> Any:
            return step_fn(batch)
    elif impl == MLX_LM:
        trainer_mod = require("mlx_lm.tuner.trainer", "default_loss")
        nn = require("mlx.nn")
        optim = require("mlx.optimizers", "AdamW")
        optimizer = optim.AdamW(learning_rate=W.learning_rate, weight_decay=W.weight_decay)
        grad_fn = nn.value_and_grad(model, trainer_mod.default_loss)
        state = [model.state, optimizer.state, mx.random.state]

        @functools.partial(mx.compile, inputs=state, outputs=state)
        def compiled(batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
            (loss, ntoks), grads = grad_fn(model, batch, lengths)
            optimizer.update(model, grads)
            return loss, ntoks

        batch = _mlx_batch(impl)

        def step() -> Any:
            loss, ntoks = compiled(*batch)
            mx.eval(state, loss, ntoks)
            return loss.item()
    else:
        torch = require("torch")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=W.learning_rate, weight_decay=W.weight_decay)
        seq = torch.tensor([_sequence()])
        inputs, targets = seq[:, :-1], seq[:, 1:]

        def step() -> Any:
            logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
    if warm:
        step()
    return step


class LoRATraining(SlowBenchmark):
    """LoRA fine-tuning steps (forward, backward, AdamW) on one sequence."""

    params = [ALL_IMPLEMENTATIONS]
    param_names = ["implementation"]

    def setup(self, model_dir: str, impl: str) -> None:
        self.step = trainer(impl, model_dir)

    def time_step(self, model_dir: str, impl: str) -> None:
        """Seconds per step: the plan's 100-step run, shortened, each sample one step of it."""
        self.step()

    time_step.repeat = W.step_repeat
    # On a GPU a step takes milliseconds and one process steps at its own pace: the medians of
    # three processes, one after another on an H100, were 22.5, 26.6 and 34.4 ms (mlx-lm's
    # 23.6-38.7). Three processes there; a CPU's steps take seconds and its budget one.
    time_step.rounds = GPU_ROUNDS

    def time_token(self, model_dir: str, impl: str) -> None:
        """Seconds per trained token: the inverse of the plan's tokens/sec."""
        self.step()

    time_token.timer = PerUnitTimer(W.train_seq)
    time_token.rounds = GPU_ROUNDS

    def time_step_cpu(self, model_dir: str, impl: str) -> None:
        """CPU seconds per step over all threads: over time_step and the core count, the
        device utilization."""
        self.step()

    time_step_cpu.timer = time.process_time
    time_step_cpu.skip_params = [(TORCH,)]  # the time budget of the seed's sizes


@functools.cache
def _mlx_gradients(impl: str, model_dir: str) -> tuple[Callable, Callable]:
    """(loss, value-and-grad) of an MLX implementation over the training batch, uncompiled:
    autodiff as the libraries' gradient APIs provide it. Both build a lazy graph."""
    model = _lora_model(impl, model_dir)
    batch = _mlx_batch(impl)
    if impl == QWEN_LORA:
        ts = require("qwen_lora.train_step", "loss_fn", "make_grad_fn")
        loss_fn, grad_fn = ts.loss_fn, ts.make_grad_fn(model)
    else:
        nn = require("mlx.nn")
        loss_fn = require("mlx_lm.tuner.trainer", "default_loss").default_loss
        grad_fn = nn.value_and_grad(model, loss_fn)

    def forward() -> tuple:
        return loss_fn(model, *batch)

    def value_and_grad() -> tuple:
        return grad_fn(model, *batch)

    return forward, value_and_grad


BACKWARD_CLOCK = ReportedTimer()


class GradientComputation(SlowBenchmark):
    """Forward and backward pass over one sequence, gradients of the LoRA parameters only."""

    params = [MLX_IMPLEMENTATIONS]
    param_names = ["implementation"]
    # Processes on a GPU run at their own pace, as LoRATraining's steps do: on an H100 the
    # uncompiled forward pass took 11.0 ms (mlx-lm 14.1) at 6a3ace84 and 15.8 (12.3) at
    # d884d4ca, one process each, with no change to its code between them.
    rounds = GPU_ROUNDS

    def setup(self, model_dir: str, impl: str) -> None:
        self.forward, self.value_and_grad = _mlx_gradients(impl, model_dir)

    def time_forward(self, model_dir: str, impl: str) -> None:
        """Seconds of the forward pass to the loss."""
        mx.eval(self.forward())

    def time_backward(self, model_dir: str, impl: str) -> None:
        """Seconds of the backward pass alone: from the loss computed to the gradients
        computed, in one value_and_grad graph."""
        (loss, _), grads = self.value_and_grad()
        mx.eval(loss)
        start = time.perf_counter()
        mx.eval(grads)
        BACKWARD_CLOCK.report(time.perf_counter() - start)

    time_backward.timer = BACKWARD_CLOCK

    def time_total(self, model_dir: str, impl: str) -> None:
        """Seconds of forward and backward together (value_and_grad)."""
        mx.eval(self.value_and_grad())
