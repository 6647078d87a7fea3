"""Low-rank adapters (LoRA): wrap frozen projections, save/load adapters, fuse them back.

The adapter format is mlx-lm's: `adapters.safetensors` with `...q_proj.lora_a` (in, rank) and
`...q_proj.lora_b` (rank, out), and `adapter_config.json` with `lora_parameters` {rank, scale,
dropout, keys} and `num_layers`; we add `alpha`, `targets`, `layers` and `base_model` (the
shapes of the model it was trained on). Either tool loads adapters trained by the other.

Adapter matrices are float32 whatever the base dtype (as in mlx-lm): AdamW's small updates
would be lost in float16/bfloat16 weights.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from qwen_lora.backend import is_gpu
from qwen_lora.config import ModelConfig
from qwen_lora.errors import AdapterError, ModelLoadError, read_json_object
from qwen_lora.model import GATE_UP_PARTS, QKV_PARTS, fused_splits, linear_of
from qwen_lora.weights import atomic_save_safetensors, atomic_write_text, check_safetensors

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Short target names and where they live inside a decoder layer (HF names).
TARGETS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
# Targets whose projection `Model.fuse_projections` makes a slice of a fused matmul, and it.
FUSED_INTO = {**dict.fromkeys(QKV_PARTS, "qkv_proj"),
              **dict.fromkeys(GATE_UP_PARTS, "gate_up_proj")}


class LoRAAdapter(nn.Module):
    """The trainable low-rank update alone: scale * dropout(x) @ A @ B, in float32.

    Attached at a projection's Hugging Face name (`self_attn.q_proj`) where the frozen
    projection is a slice of a fused matmul (`qkv_proj`, `gate_up_proj`); the model adds it
    to that slice. B starts at zero, so a fresh adapter changes nothing; dropout acts only in
    training mode.
    """

    def __init__(self, in_dims: int, out_dims: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), dtype=mx.float32)
        self.lora_b = mx.zeros((rank, out_dims), dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        z = self.dropout(x) if self.dropout is not None else x
        return self.scale * ((z @ self.lora_a) @ self.lora_b)

    def weight_delta(self) -> mx.array:
        """The update as a float32 (out, in) matrix, to add to the frozen weight."""
        return (self.scale * self.lora_b.T.astype(mx.float32)) @ self.lora_a.T.astype(mx.float32)


class LoRALinear(LoRAAdapter):
    """y = linear(x) + scale * dropout(x) @ A @ B, with the base `linear` frozen.

    A and B are float32 (the update is cast to the layer's dtype).
    """

    def __init__(self, linear: nn.Linear, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0) -> None:
        out_dims, in_dims = linear.weight.shape
        super().__init__(in_dims, out_dims, rank, alpha, dropout)
        self.linear = linear

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        return y + super().__call__(x).astype(y.dtype)

    def fused(self) -> nn.Linear:
        """A plain linear layer whose weight includes the adapter's update."""
        weight = self.linear.weight
        merged = (weight.astype(mx.float32) + self.weight_delta()).astype(weight.dtype)
        return linear_of(merged, self.linear.get("bias"))


def _check(rank: int, alpha: float, dropout: float, targets: Sequence[str] | str) -> list[str]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str):
        targets = targets.split(",")
    # short names, each once ("q_proj,self_attn.q_proj" adapts q_proj once)
    names = list(dict.fromkeys(t.strip().split(".")[-1] for t in targets))
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown LoRA target {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {', '.join(TARGETS)}")
    return names


def _layer_indices(model: nn.Module, layers: Iterable[int] | None) -> list[int]:
    count = len(model.layers)
    if layers is None:
        return list(range(count))
    indices = sorted(set(int(i) for i in layers))
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist: the model has layers 0..{count - 1}")
    return indices


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               targets: Sequence[str] = ("q_proj", "v_proj"), layers: Iterable[int] | None = None,
               dropout: float = 0.0, fuse: bool | None = None) -> nn.Module:
    """Freeze `model` and add adapters to the named projections of the chosen layers (default:
    all).

    `targets` are short names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)
    or one comma-separated string. Returns the model; `trainable_parameters(model)` counts
    what training will update (540,672 for the defaults on Qwen2.5-0.5B).

    `fuse` first fuses every layer's frozen q/k/v and gate/up projections into one matmul each
    (`Model.fuse_projections`); adapters on them then add to their slice of it (`LoRAAdapter`),
    and keep their Hugging Face names. The default fuses on a GPU, where a training step is
    bound by the host's time per operation: three matmuls become one forward and one plus a
    copy backward (H100, Qwen2.5-0.5B, sequence 512, q+v rank 8, compiled step, interleaved in
    one process: 41.5 -> 37.7 ms). On a CPU, where the matmuls themselves bound the step, the
    layout stays as loaded.
    """
    names = _check(rank, alpha, dropout, targets)
    indices = _layer_indices(model, layers)
    _check_adaptable(model, indices, names)  # before anything changes
    if fuse if fuse is not None else is_gpu():
        _fuse_frozen_projections(model)
    model.freeze()
    for _, name, parent, leaf in _target_slots(model, indices, names):
        if FUSED_INTO.get(name) in parent:  # a slice of a fused, frozen matmul
            in_dims, out_dims = projection_dims(model.config, name)
            setattr(parent, leaf, LoRAAdapter(in_dims, out_dims, rank, alpha, dropout))
        else:
            setattr(parent, leaf, LoRALinear(parent[leaf], rank, alpha, dropout))
    # A plain attribute, not a module child: it must stay out of the parameter tree.
    object.__setattr__(model, "lora_config", {
        "rank": rank, "alpha": float(alpha), "dropout": float(dropout), "targets": names,
        "layers": indices})
    return model


def _check_adaptable(model: nn.Module, indices: list[int], names: list[str]) -> None:
    """Raise unless every target of the chosen layers exists (alone or as a slice of a fused
    projection) and the model has no adapters yet: one apply_lora call adds them all, since
    one adapter config (rank, alpha, targets, layers) describes them, and a second call's
    freeze would stop the first call's adapters from training."""
    adapted = [path for path, module in model.named_modules() if isinstance(module, LoRAAdapter)]
    if adapted:
        raise ValueError(f"{min(adapted)} already has a LoRA adapter: apply_lora adds every "
                         f"adapter in one call, to a model without any")
    for i, name, parent, leaf in _target_slots(model, indices, names):
        if parent is None or (leaf not in parent and FUSED_INTO.get(name) not in parent):
            raise ValueError(f"layer {i} has no {TARGETS[name]} to adapt")


def _target_slots(model: nn.Module, indices: list[int], names: list[str]
                  ) -> Iterator[tuple[int, str, nn.Module | None, str]]:
    """(layer index, target name, the module that holds the target (None where the layer
    has no such module), the target's attribute there) for each target of the chosen
    layers."""
    for i in indices:
        layer = model.layers[i]
        for name in names:
            parent_name, leaf = TARGETS[name].split(".")
            parent = layer.get(parent_name)
            yield i, name, parent if isinstance(parent, nn.Module) else None, leaf


def _fuse_frozen_projections(model: nn.Module) -> None:
    """Fuse q/k/v and gate/up of every layer where they are plain linear layers (not adapted
    or quantized yet), evaluating each fused weight so the separate ones are freed at once."""
    splits = fused_splits(model.config)
    for layer in model.layers:
        for parent, fused in _fusable(layer):
            if all(type(parent.get(name)) is nn.Linear for name in splits[fused][0]):
                parent.fuse()
                mx.eval(parent.parameters())


def _fusable(layer: nn.Module) -> tuple[tuple[nn.Module, str], ...]:
    """(module, the fused projection its `fuse` makes) for attention and the MLP."""
    return (layer.self_attn, "qkv_proj"), (layer.mlp, "gate_up_proj")


def projection_dims(config: ModelConfig, target: str) -> tuple[int, int]:
    """(input, output) sizes of the projection `target` (a short name) in `config`'s layers."""
    hidden, inter = config.hidden_size, config.intermediate_size
    queries = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return {"q_proj": (hidden, queries), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (queries, hidden), "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter), "down_proj": (inter, hidden)}[target]


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (the LoRA matrices once `apply_lora` froze the rest)."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA matrices by their mlx-lm names."""
    return {k: v for k, v in tree_flatten(model.parameters())
            if k.endswith((".lora_a", ".lora_b"))}


BASE_MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads")


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """`adapter_config.json` content, readable by qwen_lora and by mlx-lm."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise AdapterError("the model has no LoRA adapters (call apply_lora first)")
    count = len(model.layers)
    layers = cfg["layers"]
    # mlx-lm adapts the last `num_layers` layers; exact when ours are a suffix.
    suffix = layers == list(range(count - len(layers), count))
    return {
        "fine_tune_type": "lora",
        "num_layers": len(layers) if suffix else count,
        "lora_parameters": {"rank": cfg["rank"], "scale": cfg["alpha"] / cfg["rank"],
                            "dropout": cfg["dropout"],
                            "keys": [TARGETS[t] for t in cfg["targets"]]},
        "rank": cfg["rank"], "alpha": cfg["alpha"], "targets": cfg["targets"],
        "layers": layers,
        "base_model": {k: getattr(model.config, k) for k in BASE_MODEL_KEYS},
    }


def save_adapter(model: nn.Module, path: str | os.PathLike,
                 extra_config: dict[str, Any] | None = None) -> Path:
    """Write `adapters.safetensors` and `adapter_config.json` atomically into `path`."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**adapter_config(model), **(extra_config or {})}
    atomic_save_safetensors(directory / ADAPTER_FILE, adapter_weights(model))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2))
    return directory


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse an adapter directory's config into rank/alpha/dropout/targets/layers."""
    file = Path(path) / ADAPTER_CONFIG
    raw = read_json_object(file, AdapterError, "no adapter_config.json in the adapter directory")
    if raw.get("fine_tune_type", "lora") != "lora":
        raise AdapterError(f"{file}: fine_tune_type {raw['fine_tune_type']!r} is not 'lora'")
    params = raw.get("lora_parameters") or {}
    try:
        rank = int(raw.get("rank", params["rank"]))
        alpha = float(raw.get("alpha", params["scale"] * rank))
        dropout = float(raw.get("dropout", params.get("dropout", 0.0)))
        keys = raw.get("targets") or params.get("keys")
        # mlx-lm without `keys` adapts every linear layer of the chosen blocks.
        targets = [k.split(".")[-1] for k in keys] if keys else list(TARGETS)
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterError(f"{file}: incomplete LoRA parameters ({err})") from None
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets,
            "layers": raw.get("layers"), "num_layers": raw.get("num_layers"),
            "base_model": raw.get("base_model")}


def _read_tensors(file: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, mx.array]:
    """The adapter tensors of `file`, checked against `expected` names and shapes."""
    try:
        check_safetensors(file)
        weights = mx.load(str(file))
    except ModelLoadError as err:
        raise AdapterError(str(err)) from None
    except (RuntimeError, ValueError) as err:
        raise AdapterError(f"{file}: cannot read safetensors: {err}") from None
    for name, array in weights.items():
        if name not in expected:
            raise AdapterError(f"{file}: tensor {name!r} is not an adapter of this model")
        if tuple(array.shape) != expected[name]:
            raise AdapterError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, "
                               f"expected {expected[name]} (an adapter for another model?)")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise AdapterError(f"{file}: missing tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return {k: v.astype(mx.float32) for k, v in weights.items()}


def _check_base_model(model: nn.Module, base: Any, config_file: Path) -> None:
    if not isinstance(base, dict):
        return
    for key in BASE_MODEL_KEYS:
        if key in base and base[key] != getattr(model.config, key):
            raise AdapterError(f"{config_file}: the adapter was trained on a model with {key} "
                               f"{base[key]}, this model has {getattr(model.config, key)}")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply the adapter saved in `path` to a base model, checking every name and shape first:
    on any error the model is left untouched. The model is left in eval mode (no dropout)."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    cfg = read_adapter_config(directory)
    config_file = directory / ADAPTER_CONFIG
    _check_base_model(model, cfg["base_model"], config_file)
    count = len(model.layers)
    layers = cfg["layers"]
    if layers is None:
        n = cfg["num_layers"] if cfg["num_layers"] is not None else count
        if not isinstance(n, int):
            raise AdapterError(f"{config_file}: num_layers must be an integer, got {n!r}")
        # mlx-lm adapts the last n blocks; -1 (or more than the model has) means all of them.
        n = count if n < 0 else min(n, count)
        layers = list(range(count - n, count))
    try:
        targets = _check(cfg["rank"], cfg["alpha"], cfg["dropout"], cfg["targets"])
        layers = _layer_indices(model, layers)
    except ValueError as err:
        raise AdapterError(f"{config_file}: {err}") from None
    expected = {}
    for i in layers:
        for target in targets:
            in_dims, out_dims = projection_dims(model.config, target)
            prefix = f"model.layers.{i}.{TARGETS[target]}"
            expected[f"{prefix}.lora_a"] = (in_dims, cfg["rank"])
            expected[f"{prefix}.lora_b"] = (cfg["rank"], out_dims)
    weights = _read_tensors(directory / ADAPTER_FILE, expected)
    apply_lora(model, cfg["rank"], cfg["alpha"], targets, layers, cfg["dropout"])
    model.update(tree_unflatten(list(weights.items())))
    model.eval()
    mx.eval(model.parameters())
    return model


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the adapter matrices saved in directory `path` into a model that already has
    adapters of the same structure (resuming training); names and shapes are checked first."""
    directory = Path(path)
    expected = {k: tuple(v.shape) for k, v in adapter_weights(model).items()}
    if not expected:
        raise AdapterError("the model has no LoRA adapters (call apply_lora first)")
    weights = _read_tensors(directory / ADAPTER_FILE, expected)
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return model


def fuse_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight, leaving a plain model (for saving/speed)."""
    splits = fused_splits(model.config)
    for layer in model.layers:
        fused = [(name, module.fused()) for name, module in layer.named_modules()
                 if isinstance(module, LoRALinear)]
        if fused:
            layer.update_modules(tree_unflatten(fused))
        for parent, fused_name in _fusable(layer):
            _merge_into_fused(parent, fused_name, *splits[fused_name])
    if hasattr(model, "lora_config"):
        object.__delattr__(model, "lora_config")
    model.unfreeze()
    mx.eval(model.parameters())
    return model


def _merge_into_fused(parent: nn.Module, fused_name: str, parts: Sequence[str],
                      points: list[int]) -> None:
    """Add the `LoRAAdapter`s of `parts` (the projections that `parent`'s `fused_name`
    concatenates, split at rows `points`) to their slices of its weight, and remove them."""
    adapters = [parent.get(name) for name in parts]
    if not any(isinstance(a, LoRAAdapter) for a in adapters):
        return
    linear = parent[fused_name]
    if type(linear) is not nn.Linear:
        raise ValueError(f"cannot merge adapters into a {type(linear).__name__} (quantized?): "
                         "merge them before quantizing")
    dtype = linear.weight.dtype
    blocks = mx.split(linear.weight, points, axis=0)
    for j, adapter in enumerate(adapters):
        if adapter is not None:
            blocks[j] = (blocks[j].astype(mx.float32) + adapter.weight_delta()).astype(dtype)
            parent.pop(parts[j])
    linear.weight = mx.concatenate(blocks, axis=0)
