"""The trainer: overfitting, exact resume, accumulation, checkpoints and a diverging loss."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from qwen_lora import TrainingError, apply_lora, load
from qwen_lora.data import Example, load_dataset, make_batch, synthetic_batches
from qwen_lora.lora import adapter_weights
from qwen_lora.tokenizer import load_tokenizer
from qwen_lora.train import (
    OPTIMIZER_FILE,
    STATE_FILE,
    ProgressPrinter,
    TrainConfig,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    train,
)
from qwen_lora.train_step import TrainStep, make_optimizer

RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Question: what is the capital of France? Answer:", "completion": " Paris."},
    {"messages": [{"role": "user", "content": "Say hello."},
                  {"role": "assistant", "content": "Hello there!"}]},
    {"text": "def fibonacci(n):\n    a, b = 0, 1\n    return a"},
]


@pytest.fixture(scope="module")
def examples(learnable_dir, tmp_path_factory):
    file = tmp_path_factory.mktemp("data") / "train.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    model = load(learnable_dir)
    return load_dataset(file, load_tokenizer(learnable_dir), model.config.eos_token_id,
                        model.config.vocab_size)


def lora_model(model_dir, targets=("q_proj", "v_proj", "down_proj"), dropout=0.0, seed=0):
    # float32 on every device: runs that should agree are compared to 1e-5.
    model = load(model_dir, dtype="float32")
    mx.random.seed(seed)
    return apply_lora(model, rank=8, alpha=16.0, targets=targets, dropout=dropout)


def test_tiny_model_overfits_tiny_dataset(learnable_dir, examples, tmp_path):
    model = lora_model(learnable_dir)
    config = TrainConfig(iters=60, batch_size=4, seq_len=64, learning_rate=1e-2,
                         save_every=1000)
    result = train(model, examples, config, tmp_path / "out")
    first = result.steps[0].loss
    last = np.mean([s.loss for s in result.steps[-5:]])
    assert last < first / 10, (first, last)
    # Every step reports its figures.
    for s in result.steps:
        assert s.step_time > 0 and s.tokens > 0 and s.tokens_per_sec > 0
        assert s.peak_memory > 0 and s.learning_rate == pytest.approx(1e-2)
    assert [s.step for s in result.steps] == list(range(1, 61))
    assert result.checkpoint == checkpoint_dir(tmp_path / "out", 60)
    # The adapter at the top of the output directory is the trained one.
    reloaded = load(learnable_dir, dtype="float32", adapter_path=tmp_path / "out")
    x = make_batch(examples, 64)[0]
    assert mx.allclose(reloaded(x), model(x), atol=1e-5)


def run(model_dir, examples, out, iters, resume=False, dropout=0.1, **overrides):
    model = lora_model(model_dir, dropout=dropout)
    config = TrainConfig(**{**dict(iters=iters, batch_size=2, seq_len=64, learning_rate=5e-3,
                                   save_every=3, grad_accum=2), **overrides})
    return model, train(model, examples, config, out, val_set=examples[:2], resume=resume)


def test_resume_equals_one_run(learnable_dir, examples, tmp_path):
    # Dropout and gradient accumulation on: the data order and the random keys must both be
    # restored exactly, along with the adapter and AdamW's moments and step.
    whole, one_go = run(learnable_dir, examples, tmp_path / "whole", 8)
    half, first = run(learnable_dir, examples, tmp_path / "half", 4)
    assert first.checkpoint.name == "step-000004"
    resumed, second = run(learnable_dir, examples, tmp_path / "half", 8, resume=True)
    assert second.start_step == 4 and [s.step for s in second.steps] == [5, 6, 7, 8]
    losses = [s.loss for s in one_go.steps]
    assert [s.loss for s in first.steps + second.steps] == pytest.approx(losses, rel=1e-5)
    a, b = adapter_weights(whole), adapter_weights(resumed)
    assert all(mx.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    opt_a = mx.load(str(checkpoint_dir(tmp_path / "whole", 8) / OPTIMIZER_FILE))
    opt_b = mx.load(str(checkpoint_dir(tmp_path / "half", 8) / OPTIMIZER_FILE))
    assert set(opt_a) == set(opt_b) and int(opt_b["step"]) == 8
    assert all(mx.allclose(opt_a[k], opt_b[k], rtol=1e-5, atol=1e-9) for k in opt_a)
    assert one_go.val_losses.keys() == {8} and second.val_losses[8] == \
        pytest.approx(one_go.val_losses[8], rel=1e-5)


def test_checkpoint_layout_and_stale_temporaries(learnable_dir, examples, tmp_path):
    out = tmp_path / "out"
    run(learnable_dir, examples, out, 4)
    assert [s for s, _ in list_checkpoints(out)] == [3, 4]
    ckpt = latest_checkpoint(out)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter_config.json", "adapters.safetensors", OPTIMIZER_FILE, STATE_FILE]
    state = read_trainer_state(ckpt)
    assert state["step"] == 4 and state["examples_seen"] == 16 and state["seed"] == 0
    assert state["config"]["batch_size"] == 2 and state["lora"]["rank"] == 8
    assert (out / "adapters.safetensors").read_bytes() == \
        (ckpt / "adapters.safetensors").read_bytes()
    # What a crash mid-write leaves: a hidden temporary directory, or a step directory that is
    # incomplete. Neither is taken for a checkpoint; resuming cleans the temporary up.
    (out / "checkpoints" / ".step-000006.abc").mkdir()
    (out / "checkpoints" / "step-000005").mkdir()
    (out / "checkpoints" / "step-000005" / "adapters.safetensors").write_bytes(b"")
    assert latest_checkpoint(out) == ckpt
    _, result = run(learnable_dir, examples, out, 5, resume=True)
    assert result.start_step == 4 and latest_checkpoint(out).name == "step-000005"
    assert not (out / "checkpoints" / ".step-000006.abc").exists()
    # Without resume, existing checkpoints are not silently mixed with a new run.
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        run(learnable_dir, examples, out, 5)


def test_resume_checks_the_adapter_structure(learnable_dir, examples, tmp_path):
    run(learnable_dir, examples, tmp_path / "out", 3)
    model = load(learnable_dir)
    apply_lora(model, rank=4, targets=("q_proj", "v_proj", "down_proj"))
    with pytest.raises(ValueError, match="checkpoint has rank 8, the model's adapters have 4"):
        train(model, examples, TrainConfig(iters=6, batch_size=2, seq_len=64),
              tmp_path / "out", resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(learnable_dir, examples, tmp_path):
    out = tmp_path / "out"
    model = lora_model(learnable_dir)
    # A learning rate of 1e30 makes step 1's update overflow, so step 2's loss is not finite.
    config = TrainConfig(iters=5, batch_size=2, seq_len=64, learning_rate=1e30, save_every=1)
    steps = []
    with pytest.raises(TrainingError, match="step 2: the loss is nan.*step 2 was not saved.*"
                                            "last good checkpoint .*step-000001 is kept"):
        train(model, examples, config, out, on_step=steps.append)
    assert [s.step for s in steps] == [1]
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert (out / "adapters.safetensors").read_bytes() == \
        (checkpoint_dir(out, 1) / "adapters.safetensors").read_bytes()


def test_gradient_accumulation_equals_a_bigger_batch(learnable_dir, examples, tmp_path):
    # Micro-batches of 2 cover the same examples as batches of 4 (see BatchOrder), and their
    # gradients are token-weighted, so both runs take the same steps (without dropout, whose
    # random masks depend on the batch shape).
    _, big = run(learnable_dir, examples, tmp_path / "a", 4, dropout=0.0, batch_size=4,
                 grad_accum=1)
    _, small = run(learnable_dir, examples, tmp_path / "b", 4, dropout=0.0, batch_size=2,
                   grad_accum=2)
    assert [s.loss for s in small.steps] == pytest.approx([s.loss for s in big.steps], rel=1e-5)
    assert [s.tokens for s in small.steps] == [s.tokens for s in big.steps]


@pytest.mark.parametrize("compile, grad_checkpoint", [(False, False), (True, True)])
def test_step_variants_agree(learnable_dir, compile, grad_checkpoint):
    batches = synthetic_batches(512, 2, 16, seed=1)
    reference = lora_model(learnable_dir)
    variant = lora_model(learnable_dir)
    ref_step = TrainStep(reference, make_optimizer(1e-3), compile=True)
    var_step = TrainStep(variant, make_optimizer(1e-3), compile=compile,
                         grad_checkpoint=grad_checkpoint)
    for _ in range(3):
        batch = next(batches)
        assert var_step(batch)[0] == pytest.approx(ref_step(batch)[0], rel=1e-5)


def test_bad_training_parameters(learnable_dir, examples, tmp_path):
    model = lora_model(learnable_dir)
    for field, value in [("iters", 0), ("batch_size", -1), ("seq_len", 0), ("grad_accum", 0),
                         ("learning_rate", 0.0), ("weight_decay", -0.1), ("seed", -1)]:
        with pytest.raises(ValueError, match=f"{field} must be"):
            train(model, examples, TrainConfig(**{field: value}), tmp_path / "x")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        train(load(learnable_dir), examples, TrainConfig(), tmp_path / "x")
    with pytest.raises(ValueError, match="empty"):
        train(model, [], TrainConfig(), tmp_path / "x")


def test_progress_printer_writes_one_line_per_interval(capsys):
    from qwen_lora.train import StepReport

    printer = ProgressPrinter(every=2)
    for step in range(1, 6):
        printer(StepReport(step, 5, 2.0 + step, 100, 0.5, 200.0, 2**30, 1e-4))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("step 2/5 [########------------]  40%")
    assert "loss 3.5000" in lines[0] and "0.500 s/step" in lines[0] and "200 tok/s" in lines[0]
    assert "peak 1.00 GiB" in lines[0] and lines[-1].startswith("step 5/5")
    printer(StepReport(1, 1, 1.0, 1, 0.1, 10.0, 3 * 2**20, 1e-4))
    assert "peak 3.0 MiB" in capsys.readouterr().err


def test_examples_longer_than_seq_len_still_train(learnable_dir, tmp_path):
    model = lora_model(learnable_dir)
    long = [Example(tuple(range(1, 200)), prompt_len=0)] * 2
    result = train(model, long, TrainConfig(iters=2, batch_size=2, seq_len=32), tmp_path / "o")
    assert [s.tokens for s in result.steps] == [64, 64]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_base_trains_float32_adapters(learnable_dir, examples, tmp_path, dtype):
    # GPUs default to float16 weights: the adapters and AdamW stay float32 (small updates would
    # vanish in half precision) while the model's outputs keep the base dtype.
    model = load(learnable_dir, dtype=dtype)
    mx.random.seed(0)
    apply_lora(model, targets=("q_proj", "v_proj", "down_proj"))
    result = train(model, examples, TrainConfig(iters=12, batch_size=4, seq_len=64,
                                                learning_rate=1e-2), tmp_path / "out")
    assert result.steps[-1].loss < 0.7 * result.steps[0].loss
    assert {v.dtype for v in adapter_weights(model).values()} == {mx.float32}
    x = make_batch(examples, 64)[0]
    assert model(x).dtype == getattr(mx, dtype)
    reloaded = load(learnable_dir, dtype=dtype, adapter_path=tmp_path / "out")
    assert mx.allclose(reloaded(x), model(x), atol=1e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_loss_matches_float32(learnable_dir, dtype):
    """The head's logits stay in the compute dtype (GPU memory); the loss and its sum are
    float32 and agree with a float32 model's to the half type's precision."""
    from qwen_lora.train_step import loss_fn

    inputs, targets, mask = next(synthetic_batches(512, 2, 40, seed=3))
    exact, ntoks = loss_fn(load(learnable_dir, dtype="float32"), inputs, targets, mask)
    half, _ = loss_fn(load(learnable_dir, dtype=dtype), inputs, targets, mask)
    assert half.dtype == mx.float32
    assert half.item() == pytest.approx(exact.item(), rel=2e-2)
    assert ntoks.item() == mask.sum().item()


def test_cross_entropy_equals_mlx_loss_and_gradient():
    """The written-out float32 loss (one exponential per logit) is MLX's cross-entropy, with
    the same gradient, also where logits are large enough to overflow a naive exp."""
    import mlx.nn as nn

    from qwen_lora.train_step import cross_entropy

    logits = mx.random.normal((2, 7, 300), key=mx.random.key(0)) * 4
    logits = logits.at[0, 0, 5].add(500.0).at[1, 3, :].add(-300.0)
    targets = mx.random.randint(0, 300, (2, 7), key=mx.random.key(1))
    weights = mx.random.uniform(shape=(2, 7), key=mx.random.key(2))

    def ours(x):
        return (cross_entropy(x, targets) * weights).sum()

    def theirs(x):
        return (nn.losses.cross_entropy(x, targets) * weights).sum()

    assert mx.allclose(cross_entropy(logits, targets),
                       nn.losses.cross_entropy(logits, targets), rtol=1e-5, atol=1e-4)
    assert mx.allclose(mx.grad(ours)(logits), mx.grad(theirs)(logits), atol=1e-6)
    assert mx.allclose(mx.compile(mx.grad(ours))(logits), mx.grad(theirs)(logits), atol=1e-6)
    # Compiled without shapes: another batch, length and vocabulary give their own values.
    other = mx.random.normal((3, 4, 50), key=mx.random.key(3))
    other_targets = mx.random.randint(0, 50, (3, 4), key=mx.random.key(4))
    assert mx.allclose(cross_entropy(other, other_targets),
                       nn.losses.cross_entropy(other, other_targets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["_swiglu_own_gradient", "_swiglu_checkpointed"])
def test_swiglu_training_gradients_equal_autodiff(name):
    """The training-mode SwiGLUs (CPU: its own gradient in compiled kernels; GPU: the
    checkpointed one) compute autodiff's values and gradients."""
    import qwen_lora.model as model_module

    swiglu, training_swiglu = model_module._swiglu, getattr(model_module, name)
    keys = mx.random.split(mx.random.key(0), 3)
    gate, up, weights = (mx.random.normal((3, 40), key=k) * 4 for k in keys)

    def grads(fn):
        return mx.grad(lambda g, u: (fn(g, u) * weights).sum(), argnums=(0, 1))(gate, up)

    assert mx.allclose(training_swiglu(gate, up), swiglu(gate, up))
    for ours, theirs in zip(grads(training_swiglu), grads(swiglu), strict=True):
        assert mx.allclose(ours, theirs, atol=1e-5)


@pytest.mark.skipif(mx.default_device() != mx.cpu,
                    reason="CPUs use the own gradient; GPUs keep mx.checkpoint (model.MLP)")
def test_swiglu_gradient_keeps_no_sigmoid_from_the_forward_pass():
    """Compiled with its forward pass, the own gradient holds no more memory than the
    checkpointed SwiGLU: a sigmoid spelled alike in both passes is merged by compile and kept
    alive between them (10 MB a layer at Qwen2.5-0.5B, sequence 512)."""
    import qwen_lora.model as model_module

    keys = mx.random.split(mx.random.key(1), 4)
    x = mx.random.normal((256, 64), key=keys[0])
    layers = [(mx.random.normal((64, 1024), key=k) * 0.1,) * 2 for k in keys[1:]]

    def peak(swiglu) -> int:
        def loss(x):
            return sum(swiglu(x @ wg, x @ (wu * 0.5)).sum() for wg, wu in layers)
        step = mx.compile(mx.value_and_grad(loss))
        mx.eval(step(x))
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(step(x))
        return mx.get_peak_memory()

    assert peak(model_module._swiglu_own_gradient) <= peak(model_module._swiglu_checkpointed)


@pytest.mark.parametrize("head", ["untied", "tied", "trainable"])
def test_sliced_head_loss_equals_the_whole_sequence_loss(monkeypatch, head):
    """Half precision computes the head's loss in slices, recomputed in the backward pass
    (one slice after another where the head is frozen, checkpointed where it trains): the
    loss and gradients are those of the whole sequence at once, uneven last slice, weighted
    and masked positions, a scaled loss (as the mean is) and compiled included."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    import qwen_lora.train_step as train_step

    monkeypatch.setattr(train_step, "LOSS_CHUNK", 3)
    model = nn.Module()
    model.model = nn.Module()
    if head == "tied":
        model.model.embed_tokens = nn.Embedding(50, 16)
        head_module = model.model.embed_tokens
        model.head = head_module.as_linear
    else:
        model.lm_head = head_module = nn.Linear(16, 50, bias=False)
        model.head = head_module
    object.__setattr__(model, "head_module", head_module)  # as Model's property
    head_module.set_dtype(mx.float16)
    if head != "trainable":
        head_module.freeze()
    keys = mx.random.split(mx.random.key(7), 2)
    hidden = mx.random.normal((2, 8, 16), key=keys[0]).astype(mx.float16)
    targets = mx.random.randint(0, 50, (2, 8), key=keys[1])
    mask = mx.array([[1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0] * 5 + [0.0] * 3])
    calls = []
    for name in ("_checkpointed_head_loss", "_chained_head_loss"):
        real = getattr(train_step, name)
        monkeypatch.setattr(train_step, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))

    def sliced(h):
        return train_step._sliced_head_loss(model, h, targets, mask) / 37

    def whole(h):
        return train_step._masked_loss(model.head, h, targets, mask) / 37

    if head == "trainable":  # gradients reach the head's own weight
        (_, got), (_, want) = (tree_flatten(nn.value_and_grad(head_module, fn)(hidden)[1])[0]
                               for fn in (sliced, whole))
        assert mx.allclose(got, want, rtol=1e-2, atol=1e-4).item()
        assert got.abs().max().item() > 0
    expected, expected_grad = mx.value_and_grad(whole)(hidden)
    for fn in (mx.value_and_grad(sliced), mx.compile(mx.value_and_grad(sliced))):
        value, grad = fn(hidden)
        assert value.dtype == mx.float32
        assert value.item() == pytest.approx(expected.item(), rel=1e-4)
        assert mx.allclose(grad, expected_grad, rtol=1e-2, atol=1e-4).item()
        assert grad[1, 5:].abs().max().item() == 0  # masked positions
    assert set(calls) == {"_checkpointed_head_loss" if head == "trainable"
                          else "_chained_head_loss"}


def test_chained_head_loss_keeps_small_half_precision_gradients(monkeypatch):
    """With a flat distribution over a large vocabulary, each probability times the mean's
    1 / tokens falls below float16's smallest values; the gradient of the hidden states
    must still be float32's to within half precision's rounding."""
    import mlx.nn as nn

    import qwen_lora.train_step as train_step

    keys = mx.random.split(mx.random.key(3), 3)
    weight = mx.random.normal((30000, 32), key=keys[0]) * 0.02
    hidden = mx.random.normal((1, 256, 32), key=keys[1])
    targets = mx.random.randint(0, 30000, (1, 256), key=keys[2])
    mask = mx.ones((1, 256))

    def mean_loss(h, w):
        return train_step._chained_head_loss(lambda x: x @ w.T, h, targets, mask) / 256

    def reference(h):
        return (nn.losses.cross_entropy(h @ weight.T, targets) * mask).sum() / 256

    want = mx.grad(reference)(hidden)
    got = mx.grad(mean_loss)(hidden.astype(mx.float16), weight.astype(mx.float16))
    error = (got.astype(mx.float32) - want).abs().sum() / want.abs().sum()
    assert error.item() < 1e-3  # 5.5e-3 with the cotangent in the logits' gradient
