"""Load and save Hugging Face model directories (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from qwen_lora import backend
from qwen_lora.config import ModelConfig, preset
from qwen_lora.errors import ModelLoadError
from qwen_lora.model import Model, unfused_weights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1}


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """'float32' / 'float16' / 'bfloat16' / an mx.Dtype; None means the device's default."""
    if dtype is None:
        return backend.default_dtype()
    if isinstance(dtype, mx.Dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).replace("mlx.core.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}") from None


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def resolve_model_path(path_or_repo: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub repo id, fetched (or found cached) locally."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists():
        raise ModelLoadError(f"{path}: not a model directory")
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise ModelLoadError(f"{path}: no such model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"]))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else "it is neither cached nor reachable on the Hub")
        raise ModelLoadError(f"{text}: cannot load the model: {why}") from None
    except HFValidationError as err:
        raise ModelLoadError(f"{text}: not a directory nor a Hub repo id ({err})") from None
    except Exception as err:  # network and HTTP errors of every kind
        raise ModelLoadError(f"{text}: cannot download the model: {err}") from None


def check_safetensors(file: Path) -> dict[str, dict[str, Any]]:
    """Read a safetensors header and check every tensor's bytes are present in the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{file}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ModelLoadError(f"{file}: truncated or corrupt safetensors header")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelLoadError(f"{file}: weight file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"{file}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            width = _SAFETENSORS_BYTES.get(entry["dtype"], 0)
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * width
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{file}: tensor {name!r} has a corrupt header entry") from None
        if end > data_size:
            raise ModelLoadError(f"{file}: tensor {name!r} is truncated "
                                 f"(needs bytes up to {end}, file holds {data_size})")
        if width and end - start != expected:
            raise ModelLoadError(f"{file}: tensor {name!r} has {end - start} bytes for shape "
                                 f"{entry['shape']} of {entry['dtype']}")
    return header


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: one file, or the shards its index names."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{index}: invalid index ({err})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / SINGLE_FILE).exists():
        return [model_dir / SINGLE_FILE]
    shards = sorted(model_dir.glob("model-*.safetensors"))
    if shards:
        return shards
    raise ModelLoadError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_weights(model_dir: Path) -> dict[str, tuple[mx.array, Path]]:
    """Every tensor of the directory with the file it came from, validated before loading."""
    tensors: dict[str, tuple[mx.array, Path]] = {}
    for file in weight_files(model_dir):
        check_safetensors(file)
        try:
            arrays = mx.load(str(file))
        except Exception as err:  # mx.load raises RuntimeError/ValueError with terse text
            raise ModelLoadError(f"{file}: cannot read safetensors: {err}") from None
        for name, array in arrays.items():
            tensors[name] = (array, file)
    return tensors


def build_model(config: ModelConfig, weights: dict[str, tuple[mx.array, Path]],
                dtype: mx.Dtype, source: Path | str = "weights") -> Model:
    """A model holding exactly `weights`, checked by name and shape; nothing is half-loaded.

    Consumes `weights`: each tensor is converted to `dtype` and its source dropped in turn,
    so loading float32 files as float16 never holds both copies of the whole model.
    """
    model = Model(config)  # its random initial values stay lazy and are never computed
    expected = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    where = {name: file for name, (_, file) in weights.items()}
    unknown = [n for n in weights if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
               and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unknown:
        raise ModelLoadError(f"{where[unknown[0]]}: unexpected tensor {unknown[0]!r}"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for name, shape in expected.items():
        if name not in weights:
            raise ModelLoadError(f"{source}: missing tensor {name!r}")
        array, file = weights[name]
        if tuple(array.shape) != shape:
            raise ModelLoadError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, "
                                 f"expected {shape}")
    # The lazy conversions replace the initial values first (those and their random keys
    # are freed before any weight is read), then are computed one tensor at a time.
    converted = [(name, weights.pop(name)[0].astype(dtype)) for name in expected]
    weights.clear()
    model.update(tree_unflatten(converted))
    for _, array in converted:
        mx.eval(array)
    return model


def load(path_or_repo: str | os.PathLike, dtype: str | mx.Dtype | None = None,
         adapter_path: str | os.PathLike | None = None, fuse_projections: bool = False,
         quantize: int | None = None) -> Model:
    """Load a Qwen2 model from a local Hugging Face directory or a Hub repo id.

    `dtype` defaults to the device's (float32 on CPU, float16 on GPU). With `adapter_path`, the
    LoRA adapter saved there is applied on top of the base weights. `fuse_projections` prepares
    the model for inference only: adapters are merged and q/k/v and gate/up become single
    matmuls (see `Model.fuse_projections`). `quantize` (bits: 8, 4, ...) stores the weights
    as integers for inference (see `Model.quantize`); adapters are merged first.
    """
    model_dir = resolve_model_path(path_or_repo)
    config = ModelConfig.from_dir(model_dir)
    files = weight_files(model_dir)
    source = model_dir / INDEX_FILE if (model_dir / INDEX_FILE).exists() else files[0]
    model = build_model(config, read_weights(model_dir), parse_dtype(dtype), source)
    model.path = model_dir
    if adapter_path is not None:
        from qwen_lora.lora import load_adapter

        load_adapter(model, adapter_path)
        if fuse_projections or quantize:
            from qwen_lora.lora import fuse_lora

            fuse_lora(model)
    if fuse_projections:
        model.fuse_projections()
    if quantize:
        model.quantize(bits=quantize)
    model.eval()  # inference mode, as loaded; training sets model.train()
    return model


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shared model files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array],
                            metadata: dict[str, str] | None = None) -> None:
    """`mx.save_safetensors` through a temporary file and a rename."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            mx.save_safetensors(f, arrays, metadata={"format": "pt", **(metadata or {})})
    _atomic_write(path, write)


def save_weights(directory: Path, weights: dict[str, mx.array],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards and their index."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        array = weights[name]
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        atomic_save_safetensors(directory / SINGLE_FILE, shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_safetensors(directory / name, shard)
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for a in weights.values())
    atomic_write_text(directory / INDEX_FILE, json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save(model: Model, path: str | os.PathLike, dtype: str | mx.Dtype | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` as a Hugging Face directory that `transformers` and `qwen_lora.load` read."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    weights = unfused_weights(dict(tree_flatten(model.parameters())), model.config)
    if dtype is not None:
        weights = {k: v.astype(parse_dtype(dtype)) for k, v in weights.items()}
    save_weights(directory, weights, max_shard_bytes)
    config = model.config.to_dict()
    config["torch_dtype"] = dtype_name(next(iter(weights.values())).dtype)
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2))
    return directory


def random_weights(config: ModelConfig, seed: int = 0,
                   dtype: mx.Dtype = mx.float32) -> dict[str, mx.array]:
    """Random weights for every parameter (normal(0, initializer_range); norms near 1).

    Generated with numpy, which is much faster than MLX's CPU random for half a billion values.
    """
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in tree_flatten(Model(config).parameters())}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = rng.standard_normal(shape, dtype=np.float32)
            values *= config.initializer_range
        out[name] = mx.array(values).astype(dtype)
        del values
    return out


def init_model_dir(out: str | os.PathLike, preset_name: str = "qwen2.5-0.5b", seed: int = 0,
                   dtype: str | mx.Dtype = "bfloat16", tokenizer_vocab: int = 1024,
                   **overrides: Any) -> Path:
    """Write a complete model directory with random weights and a small working tokenizer."""
    from qwen_lora.tokenizer import build_tokenizer, write_tokenizer

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    base = preset(preset_name, **overrides)
    tok = build_tokenizer(min(tokenizer_vocab, base.vocab_size))
    ids = write_tokenizer(tok, directory)
    config = preset(preset_name, **{"bos_token_id": None,
                                    "eos_token_id": ids["<|endoftext|>"], **overrides})
    weights = random_weights(config, seed, parse_dtype(dtype))
    save_weights(directory, weights)
    data = config.to_dict()
    data["torch_dtype"] = dtype_name(parse_dtype(dtype))
    atomic_write_text(directory / "config.json", json.dumps(data, indent=2))
    atomic_write_text(directory / "generation_config.json", json.dumps(
        {"eos_token_id": config.eos_token_id, "do_sample": False}, indent=2))
    return directory
