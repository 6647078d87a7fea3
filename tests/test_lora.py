"""LoRA layers: parameter count, fusing, adapter files, gradients and mlx-lm interop."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen_lora import AdapterError, Model, apply_lora, load, preset, save
from qwen_lora.lora import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    LoRAAdapter,
    LoRALinear,
    adapter_weights,
    fuse_lora,
    load_adapter,
    read_adapter_config,
    save_adapter,
    trainable_parameters,
)
from qwen_lora.train_step import loss_fn, make_grad_fn
from qwen_lora.weights import init_model_dir

# float32 on every device: the tests compare with float32 references and mlx-lm.
load32 = partial(load, dtype="float32")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give B (zero when fresh) random values so that adapters change the output."""
    rng = np.random.default_rng(seed)
    model.update(nn.utils.tree_unflatten([
        (k, mx.array(rng.normal(0, std, v.shape).astype(np.float32)))
        for k, v in adapter_weights(model).items() if k.endswith("lora_b")]))


def tokens(seed: int = 0, shape=(2, 12), vocab: int = 512) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, shape), dtype=mx.int32)


def test_trainable_parameters_of_the_seed_setup():
    model = Model(preset("qwen2.5-0.5b"))  # lazy: nothing is computed or allocated
    apply_lora(model, rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    assert trainable_parameters(model) == 540_672
    assert model.layers[0].self_attn.q_proj.scale == 2.0


def test_apply_lora_targets_layers_and_errors(tiny_dir):
    model = load32(tiny_dir)
    x = tokens()
    before = model(x)
    apply_lora(model, rank=4, alpha=8.0, targets="o_proj,gate_proj", layers=[1])
    assert isinstance(model.layers[1].self_attn.o_proj, LoRAAdapter)
    assert isinstance(model.layers[1].mlp.gate_proj, LoRAAdapter)
    assert not isinstance(model.layers[0].self_attn.o_proj, LoRAAdapter)
    # A fresh adapter (B = 0) changes nothing; only A and B train, in float32.
    assert mx.allclose(model(x), before, atol=1e-6)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert len(names) == 4 and all(k.endswith(("lora_a", "lora_b")) for k in names)
    assert all(v.dtype == mx.float32 for v in adapter_weights(model).values())
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, targets=["o_proj"], layers=[1])
    fresh = load32(tiny_dir)
    with pytest.raises(ValueError, match="unknown LoRA target 'x_proj'"):
        apply_lora(fresh, targets=["q_proj", "x_proj"])
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        apply_lora(fresh, layers=[5])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        apply_lora(fresh, rank=0)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        apply_lora(fresh, alpha=-1.0)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(fresh, dropout=1.0)


def test_apply_lora_adds_every_adapter_in_one_call_or_changes_nothing(tiny_dir):
    """A second call would freeze the first call's adapters and describe only its own in the
    adapter config (a save that does not load): refused. A missing target is found before
    anything changes."""
    model = load32(tiny_dir)
    apply_lora(model, rank=4, targets="o_proj", layers=[1])
    before = dict(tree_flatten(model.trainable_parameters()))
    with pytest.raises(ValueError, match="layers.1.self_attn.o_proj already has a LoRA "
                                         "adapter: apply_lora adds every adapter in one call"):
        apply_lora(model, rank=4, targets="q_proj", layers=[0])
    assert dict(tree_flatten(model.trainable_parameters())).keys() == before.keys()
    assert model.lora_config["targets"] == ["o_proj"]
    assert not any(isinstance(m, LoRAAdapter) for _, m in model.layers[0].named_modules())

    for fuse in (False, True):  # a target named twice is adapted once
        twice = apply_lora(load32(tiny_dir), targets="v_proj,self_attn.v_proj", fuse=fuse)
        assert twice.lora_config["targets"] == ["v_proj"]
        assert type(twice.layers[0].self_attn.v_proj) is (LoRAAdapter if fuse else LoRALinear)
        assert len(adapter_weights(twice)) == 2 * len(twice.layers)

        fresh = load32(tiny_dir)
        del fresh.layers[1].mlp["gate_proj"]
        total = len(tree_flatten(fresh.trainable_parameters()))
        with pytest.raises(ValueError, match="layer 1 has no mlp.gate_proj to adapt"):
            apply_lora(fresh, targets="q_proj,gate_proj", fuse=fuse)
        assert len(tree_flatten(fresh.trainable_parameters())) == total  # not frozen
        assert type(fresh.layers[0].self_attn.q_proj) is nn.Linear  # not adapted, not fused
        assert "qkv_proj" not in fresh.layers[0].self_attn


def test_fused_model_equals_base_plus_adapter(tiny_dir):
    model = load32(tiny_dir)
    apply_lora(model, rank=4, alpha=8.0, targets=ALL)
    randomize_adapters(model)
    x = tokens(1)
    adapted = model(x)
    assert not mx.allclose(adapted, load32(tiny_dir)(x), atol=1e-3)
    fuse_lora(model)
    assert not any(isinstance(m, LoRAAdapter) for _, m in model.named_modules())
    assert not hasattr(model, "lora_config")
    assert mx.allclose(model(x), adapted, atol=1e-5)


def test_fused_layout_adapts_slices_of_the_fused_matmuls(tiny_dir, tmp_path):
    """apply_lora(fuse=True), the default on GPUs: frozen q/k/v and gate/up fused, adapters on
    their slices under the Hugging Face names; same function, parameters and adapter file."""
    plain, fused = load32(tiny_dir), load32(tiny_dir)
    for model, fuse in ((plain, False), (fused, True)):
        mx.random.seed(3)  # fusing draws no random numbers: the adapters start alike
        apply_lora(model, rank=4, alpha=8.0, targets=ALL, fuse=fuse)
    for name, value in adapter_weights(plain).items():
        assert mx.array_equal(adapter_weights(fused)[name], value), name
    randomize_adapters(plain)
    fused.update(nn.utils.tree_unflatten(list(adapter_weights(plain).items())))
    attn, mlp = fused.layers[1].self_attn, fused.layers[1].mlp
    assert "qkv_proj" in attn and "gate_up_proj" in mlp
    assert type(attn.q_proj) is LoRAAdapter and type(mlp.up_proj) is LoRAAdapter
    assert isinstance(attn.o_proj, LoRALinear) and isinstance(mlp.down_proj, LoRALinear)
    assert dict(tree_flatten(fused.trainable_parameters())).keys() == \
        dict(tree_flatten(plain.trainable_parameters())).keys()
    x = tokens(8)
    for mode in ("eval", "train"):
        getattr(plain, mode)()
        getattr(fused, mode)()
        assert mx.allclose(fused(x), plain(x), atol=1e-5), mode
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj already has a LoRA"):
        apply_lora(fused, targets=["q_proj"], fuse=True)
    save_adapter(fused, tmp_path / "a")
    assert mx.allclose(load32(tiny_dir, adapter_path=tmp_path / "a")(x), plain(x), atol=1e-5)
    expected = plain(x)
    mx.random.seed(4)
    draw = mx.random.uniform().item()
    mx.random.seed(4)
    fuse_lora(fused)  # draws no random numbers either
    assert mx.random.uniform().item() == draw
    assert not any(isinstance(m, LoRAAdapter) for _, m in fused.named_modules())
    assert "q_proj" not in fused.layers[0].self_attn and "up_proj" not in fused.layers[0].mlp
    assert mx.allclose(fused(x), expected, atol=1e-5)
    assert mx.allclose(load32(save(fused, tmp_path / "merged"))(x), expected, atol=1e-5)


def test_adapter_round_trip(tiny_dir, tmp_path):
    model = load32(tiny_dir)
    apply_lora(model, rank=4, alpha=12.0, targets=["q_proj", "down_proj"], layers=[0])
    randomize_adapters(model)
    x = tokens(2)
    expected = model(x)
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_CONFIG, ADAPTER_FILE]
    cfg = read_adapter_config(tmp_path / "a")
    assert (cfg["rank"], cfg["alpha"], cfg["targets"], cfg["layers"]) == \
        (4, 12.0, ["q_proj", "down_proj"], [0])
    loaded = load32(tiny_dir, adapter_path=tmp_path / "a")
    assert not loaded.training  # no dropout when generating
    assert mx.allclose(loaded(x), expected, atol=1e-6)
    save_adapter(model, tmp_path / "a")  # overwriting leaves no temporary files behind
    assert len(list((tmp_path / "a").iterdir())) == 2


def _saved_adapter(tiny_dir: Path, path: Path) -> Path:
    model = load32(tiny_dir)
    apply_lora(model, rank=4, targets=["q_proj", "v_proj"])
    return save_adapter(model, path)


def test_bad_adapters_leave_the_model_untouched(tiny_dir, tmp_path):
    good = _saved_adapter(tiny_dir, tmp_path / "good")
    weights = mx.load(str(good / ADAPTER_FILE))
    config = json.loads((good / ADAPTER_CONFIG).read_text())
    name = "model.layers.1.self_attn.v_proj.lora_b"

    def variant(label: str, tensors: dict | None = None, cfg: dict | None = None,
                raw_config: str | None = None) -> Path:
        d = tmp_path / label
        d.mkdir()
        mx.save_safetensors(str(d / ADAPTER_FILE), weights if tensors is None else tensors)
        (d / ADAPTER_CONFIG).write_text(raw_config or json.dumps(cfg or config))
        return d

    cases = [
        (variant("missing", {k: v for k, v in weights.items() if k != name}),
         f"missing tensor '{name}'"),
        (variant("misshaped", {**weights, name: mx.zeros((4, 7))}),
         f"tensor '{name}' has shape \\(4, 7\\), expected \\(4, 32\\)"),
        (variant("extra", {**weights, "model.layers.0.mlp.up_proj.lora_a": mx.zeros((64, 4))}),
         "is not an adapter of this model"),
        (variant("dora", cfg={**config, "fine_tune_type": "dora"}), "is not 'lora'"),
        (variant("badjson", raw_config="{not json"), "invalid JSON"),
        (variant("target", cfg={**config, "targets": ["x_proj"]}), "unknown LoRA target"),
        (variant("rank", cfg={**config, "rank": 8}), "has shape"),
        (tmp_path / "nowhere", "no such adapter directory"),
    ]
    (tmp_path / "noconfig").mkdir()
    cases.append((tmp_path / "noconfig", "no adapter_config.json"))
    truncated = variant("truncated")
    data = (truncated / ADAPTER_FILE).read_bytes()
    (truncated / ADAPTER_FILE).write_bytes(data[:-10])
    cases.append((truncated, "truncated"))
    for path, message in cases:
        model = load32(tiny_dir)
        with pytest.raises(AdapterError, match=message):
            load_adapter(model, path)
        assert not any(isinstance(m, LoRAAdapter) for _, m in model.named_modules()), path


def test_adapter_for_another_model(tiny_dir, tmp_path):
    adapter = _saved_adapter(tiny_dir, tmp_path / "a")
    other = load32(init_model_dir(tmp_path / "other", "tiny", dtype="float32", hidden_size=32))
    with pytest.raises(AdapterError, match="trained on a model with hidden_size 64, this model "
                                           "has 32"):
        load_adapter(other, adapter)
    # Without our `base_model` record (an mlx-lm adapter), the shape check still catches it.
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    del config["base_model"]
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="has shape .* another model"):
        load_adapter(other, adapter)


def test_lora_gradients_match_finite_differences(tiny_dir):
    model = load32(tiny_dir)
    apply_lora(model, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    randomize_adapters(model, std=0.5)
    x = tokens(3, (2, 17))
    inputs, targets, mask = x[:, :-1], x[:, 1:], mx.ones((2, 16))
    _, grads = make_grad_fn(model)(model, inputs, targets, mask)
    grads = dict(tree_flatten(grads))
    eps = 1e-2
    checked = 0
    for name in ("model.layers.0.self_attn.q_proj.lora_a", "model.layers.1.self_attn.v_proj.lora_b",
                 "model.layers.1.mlp.down_proj.lora_a"):
        grad = np.array(grads[name])
        param = np.array(adapter_weights(model)[name])
        for index in np.argsort(-np.abs(grad).ravel())[:3]:
            where = np.unravel_index(index, grad.shape)
            values = []
            for sign in (1, -1):
                moved = param.copy()
                moved[where] += sign * eps
                model.update(nn.utils.tree_unflatten([(name, mx.array(moved))]))
                values.append(loss_fn(model, inputs, targets, mask)[0].item())
            model.update(nn.utils.tree_unflatten([(name, mx.array(param))]))
            numeric = (values[0] - values[1]) / (2 * eps)
            assert numeric == pytest.approx(grad[where], rel=3e-2, abs=1e-4), (name, where)
            checked += 1
    assert checked == 9


# mlx-lm interop ---------------------------------------------------------------------------------

mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
from mlx_lm.lora import CONFIG_DEFAULTS  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402


def mlx_lm_model(model_dir: Path) -> nn.Module:
    model, _ = mlx_lm_utils.load_model(Path(model_dir))
    model.freeze()
    return model


@pytest.mark.parametrize("fuse", [False, True])
def test_gradients_match_mlx_lm(tiny_dir, fuse):
    ours = load32(tiny_dir)
    apply_lora(ours, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"], fuse=fuse)
    randomize_adapters(ours, std=0.5)
    theirs = mlx_lm_model(tiny_dir)
    linear_to_lora_layers(theirs, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": [
        "self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]})
    theirs.load_weights(list(adapter_weights(ours).items()), strict=False)
    batch = tokens(4, (2, 17))
    lengths = mx.array([[0, 16], [0, 16]])  # mlx-lm: train on every target token
    (their_loss, their_n), their_grads = nn.value_and_grad(theirs, default_loss)(
        theirs, batch, lengths)
    (our_loss, our_n), our_grads = make_grad_fn(ours)(
        ours, batch[:, :-1], batch[:, 1:], mx.ones((2, 16)))
    assert int(our_n) == int(their_n) == 32
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-5)
    theirs_flat = dict(tree_flatten(their_grads))
    ours_flat = dict(tree_flatten(our_grads))
    assert set(ours_flat) == set(theirs_flat) and len(ours_flat) == 12
    for name, grad in ours_flat.items():
        assert mx.allclose(grad, theirs_flat[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("layers, fuse", [(None, False), ([0], False), (None, True)])
def test_our_adapter_loads_in_mlx_lm(tiny_dir, tmp_path, layers, fuse):
    ours = load32(tiny_dir)
    apply_lora(ours, rank=4, alpha=6.0, targets=["q_proj", "k_proj", "up_proj"], layers=layers,
               fuse=fuse)
    randomize_adapters(ours, seed=5)
    save_adapter(ours, tmp_path / "a")
    theirs = load_adapters(mlx_lm_model(tiny_dir), str(tmp_path / "a"))
    x = tokens(5)
    assert mx.allclose(theirs(x), ours(x), atol=1e-4)


@pytest.mark.parametrize("keys, num_layers, fused", [
    (["self_attn.k_proj", "mlp.up_proj"], 1, False),
    (None, 16, False),  # mlx-lm's defaults: every linear layer, more layers than the model has
    (None, 16, True),  # into a model with fused projections
])
def test_mlx_lm_adapter_loads_in_ours(tiny_dir, tmp_path, keys, num_layers, fused):
    theirs = mlx_lm_model(tiny_dir)
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0, **({"keys": keys} if keys else {})}
    linear_to_lora_layers(theirs, num_layers, params)
    rng = np.random.default_rng(6)
    theirs.update(nn.utils.tree_unflatten([
        (k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
        for k, v in tree_flatten(theirs.trainable_parameters()) if k.endswith("lora_b")]))
    out = tmp_path / "mlx_lm_adapter"
    out.mkdir()
    mx.save_safetensors(str(out / ADAPTER_FILE), dict(tree_flatten(theirs.trainable_parameters())))
    config = {**CONFIG_DEFAULTS, "model": str(tiny_dir), "num_layers": num_layers,
              "lora_parameters": params, "adapter_path": str(out)}
    mlx_lm_utils.save_config(config, out / ADAPTER_CONFIG)
    ours = load_adapter(load32(tiny_dir).fuse_projections(), out) if fused else \
        load32(tiny_dir, adapter_path=out)
    assert "qkv_proj" in ours.layers[0].self_attn or not fused
    cfg = ours.lora_config
    assert cfg["rank"] == 4 and cfg["alpha"] == 40.0
    assert cfg["targets"] == (["k_proj", "up_proj"] if keys else list(ALL))
    assert cfg["layers"] == ([1] if num_layers == 1 else [0, 1])
    x = tokens(7)
    assert mx.allclose(ours(x), theirs(x), atol=1e-4)
