"""The LoRA training step: masked next-token loss, gradients of the adapters, AdamW update.

Kept apart from the trainer loop (train.py) so benchmarks time exactly what training runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

Batch = tuple[mx.array, mx.array, mx.array]  # inputs, targets (batch, length) and loss mask


LOSS_CHUNK = 128  # positions per slice of half-precision logits (128 x 151,936 = 39 MB)


@partial(mx.compile, shapeless=True)
def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position `logsumexp(logits) - logits[target]`, written out for float32 logits.

    One exponential per logit, as an elementwise op that `mx.compile` fuses with the
    subtraction: MLX's CPU `logsumexp` is a scalar loop that evaluates two per logit, and its
    gradient a third. Compiled here too, so that a forward pass outside `mx.compile` gets
    the fused, vectorized kernel (under an uncompiled value_and_grad MLX traces through
    it). The maximum is a constant of the gradient (the result does not depend on it), so
    no gradient flows through it.
    """
    peak = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = mx.log(mx.exp(logits - peak).sum(axis=-1)) + peak.squeeze(-1)
    return lse - mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array,
            mask: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the positions where `mask` is 1; also returns their count.
    `targets` are token ids in [0, vocabulary), as the data pipeline makes them (unchecked:
    a check would wait for the values).

    float32 (CPUs): the logits of the whole sequence at once, no recomputation; at Qwen2.5-0.5B,
    sequence 512, a training step took 9.5 s instead of 11.8 s on a 2-core CPU, and its peak
    memory fell by 30 MB. Half precision (GPUs): the output head and MLX's loss run over slices
    of `LOSS_CHUNK` positions, recomputed in the backward pass, so that the full (length x
    vocabulary) logits, their softmax and gradient are never alive at once.
    """
    hidden = model.model.norm(model.model(inputs))
    if hidden.dtype == mx.float32:
        total = (cross_entropy(model.head(hidden), targets) * mask).sum()
    else:
        total = _sliced_head_loss(model, hidden, targets, mask)
    ntoks = mask.sum()
    return total / mx.maximum(ntoks, 1), ntoks


def _sliced_head_loss(model: nn.Module, hidden: mx.array, targets: mx.array,
                      mask: mx.array) -> mx.array:
    """The masked sum of the losses, head and loss computed `LOSS_CHUNK` positions at a time
    and again in the backward pass, one slice after the other (`_chained_head_loss`);
    checkpointed per slice where the head itself trains (`_checkpointed_head_loss`)."""
    if tree_flatten(model.head_module.trainable_parameters()):
        return _checkpointed_head_loss(model.head, model.head_module, hidden, targets, mask)
    return _chained_head_loss(model.head, hidden, targets, mask)


def _masked_loss(head: Callable, hidden: mx.array, targets: mx.array,
                 mask: mx.array) -> mx.array:
    # Logits stay in the compute dtype: a float32 copy of every slice (and of its gradient)
    # cost 0.8 GB at the step's peak on an H100 in float16. Losses are summed in float32.
    return (nn.losses.cross_entropy(head(hidden), targets).astype(mx.float32) * mask).sum()


def _bounds(length: int) -> list[tuple[int, int]]:
    return [(start, min(start + LOSS_CHUNK, length)) for start in range(0, length, LOSS_CHUNK)]


def _checkpointed_head_loss(head: Callable, head_module: nn.Module, hidden: mx.array,
                            targets: mx.array, mask: mx.array) -> mx.array:
    """Each slice checkpointed with the head's trainable parameters as inputs, so that
    gradients reach them (`mx.checkpoint` alone would hold them as constants)."""
    total = mx.array(0.0, dtype=mx.float32)
    for start, end in _bounds(hidden.shape[1]):
        def head_loss(h, t=targets[:, start:end], m=mask[:, start:end]):
            return _masked_loss(head, h, t, m)

        total = total + nn.utils.checkpoint(head_module, head_loss)(hidden[:, start:end])
    return total


def _chained_head_loss(head: Callable, hidden: mx.array, targets: mx.array,
                       mask: mx.array) -> mx.array:
    """Gradients for `hidden` only (a frozen head), with a backward pass of our own that
    recomputes the slices in order, each after the previous one's gradient (`mx.depends`):
    MLX otherwise schedules the independent slices' logits, softmax and gradients together,
    and they made the peak of the whole training step."""
    bounds = _bounds(hidden.shape[1])
    if not bounds:  # no positions
        return mx.array(0.0, dtype=mx.float32)

    @mx.custom_function
    def total(hidden: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
        out = mx.array(0.0, dtype=mx.float32)
        for start, end in bounds:
            h = mx.depends(hidden[:, start:end], out)
            out = out + _masked_loss(head, h, targets[:, start:end], mask[:, start:end])
        return out

    @total.vjp
    def total_vjp(primals: tuple[mx.array, ...], cotangent: mx.array,
                  output: mx.array) -> tuple[mx.array, ...]:
        hidden, targets, mask = primals
        vocab = None
        grads: list[mx.array] = []
        for start, end in bounds:
            h = hidden[:, start:end]
            if grads:
                h = mx.depends(h, grads[-1])
            logits = head(h)
            if vocab is None:
                vocab = mx.arange(logits.shape[-1])
            # The gradient of logsumexp(logits) - logits[target]: softmax minus one-hot; under
            # mx.compile (TrainStep) one softmax kernel and one fused element-wise kernel,
            # where autodiff's takes ~4x more operations, each microseconds of host time on
            # a GPU. The cotangent (1 / tokens) scales the hidden gradient, not the logits':
            # probabilities times it fall below half precision's smallest values.
            weight = mask[:, start:end].astype(logits.dtype)[..., None]
            target = vocab == targets[:, start:end, None]
            grad_logits = weight * (mx.softmax(logits, axis=-1, precise=True) - target)
            grads.append(mx.vjp(head, [h], [grad_logits])[1][0])
        grad = mx.concatenate(grads, axis=1)
        return (grad * cotangent.astype(grad.dtype), mx.zeros_like(targets), mx.zeros_like(mask))

    return total(hidden, targets, mask)


def make_optimizer(learning_rate: float = 1e-4, weight_decay: float = 0.01) -> optim.AdamW:
    """AdamW with the seed's defaults (lr 1e-4, weight decay 0.01)."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    return optim.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)


def make_grad_fn(model: nn.Module, grad_checkpoint: bool = False) -> Callable:
    """(model, inputs, targets, mask) -> ((loss, ntoks), grads of the trainable parameters).

    `grad_checkpoint` recomputes each layer's activations in the backward pass instead of
    keeping them: less memory, about one more forward pass of time.
    """
    model.model.gradient_checkpointing = grad_checkpoint
    return nn.value_and_grad(model, loss_fn)


class TrainStep:
    """One optimizer step over a batch: forward, backward, AdamW update, compiled by default.

    `accumulate` micro-batches add their gradients before a single update.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, compile: bool = True,
                 grad_checkpoint: bool = False) -> None:
        model.train()  # LoRA dropout and the activation checkpoints act in training mode
        self.model = model
        self.optimizer = optimizer
        self.grad_fn = make_grad_fn(model, grad_checkpoint)
        state = [model.state, optimizer.state, mx.random.state]

        def step(inputs, targets, mask):
            (loss, ntoks), grads = self.grad_fn(model, inputs, targets, mask)
            optimizer.update(model, grads)
            return loss, ntoks

        def grads_only(inputs, targets, mask):
            (loss, ntoks), grads = self.grad_fn(model, inputs, targets, mask)
            return loss, ntoks, grads

        wrap = partial(mx.compile, inputs=state, outputs=state) if compile else (lambda f: f)
        self._step = wrap(step)
        self._grads = wrap(grads_only)

    def __call__(self, *batches: Batch) -> tuple[float, int]:
        """Train on one batch, or accumulate over several micro-batches; returns (loss, tokens)."""
        if len(batches) == 1:
            loss, ntoks = self._step(*batches[0])
            mx.eval(loss, ntoks, self.model.state, self.optimizer.state)
            return loss.item(), int(ntoks.item())
        total_loss, total_toks, summed = 0.0, 0, None
        for batch in batches:
            loss, ntoks, grads = self._grads(*batch)
            n = ntoks
            weighted = nn.utils.tree_map(lambda g, n=n: g * n, grads)
            summed = weighted if summed is None else nn.utils.tree_map(mx.add, summed, weighted)
            mx.eval(summed, loss, ntoks)
            total_loss += loss.item() * ntoks.item()
            total_toks += int(ntoks.item())
        grads = nn.utils.tree_map(lambda g: g / max(total_toks, 1), summed)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.state, self.optimizer.state)
        return total_loss / max(total_toks, 1), total_toks
