"""Loading and saving model directories, and every kind of bad input."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from qwen_lora import ModelLoadError, load, save
from qwen_lora.weights import INDEX_FILE, read_weights


def copy_dir(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_roundtrip_single_and_sharded(hf_untied, tmp_path):
    model = load(hf_untied, dtype="float32")
    ids = mx.array([[1, 2, 3, 4]])
    expected = np.array(model(ids))
    save(model, tmp_path / "single")
    save(model, tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / INDEX_FILE).exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    for name in ("single", "sharded"):
        np.testing.assert_array_equal(np.array(load(tmp_path / name, dtype="float32")(ids)),
                                      expected)


def test_dtype_default_and_explicit(hf_tied):
    assert load(hf_tied).model.embed_tokens.weight.dtype == mx.float32  # CPU default
    assert load(hf_tied, dtype="bfloat16").model.embed_tokens.weight.dtype == mx.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load(hf_tied, dtype="float8")


def test_init_dir_has_config_weights_and_tokenizer(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    model = load(tiny_dir)
    assert model.config.num_hidden_layers == 2


def test_missing_directory():
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load("/nonexistent/dir/for/sure")


def test_hub_offline_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load("Qwen/Qwen2.5-0.5B")


def test_missing_config(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load(path)


def test_config_with_bad_json_names_line(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    text = (path / "config.json").read_text().replace('"hidden_size": 64,', '"hidden_size": ,')
    (path / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=r"config\.json:\d+: invalid JSON"):
        load(path)


def test_unknown_model_type(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        load(path)


def test_missing_weights_file(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load(path)


def test_truncated_safetensors_names_file_and_tensor(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor '.+' is truncated"):
        load(path)


def test_corrupt_header(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"not json!!!!"
    file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt safetensors header"):
        load(path)


def test_empty_file(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="truncated safetensors file"):
        load(path)


def _rewrite(path, change):
    file = path / "model.safetensors"
    arrays = mx.load(str(file))
    change(arrays)
    mx.save_safetensors(str(file), arrays)


def test_missing_tensor_is_named(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    _rewrite(path, lambda a: a.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        load(path)


def test_misshaped_tensor_is_named(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)

    def change(arrays):
        arrays["model.layers.0.self_attn.k_proj.weight"] = mx.zeros((8, 64))
    _rewrite(path, change)
    with pytest.raises(ModelLoadError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\."
                             r"weight' has shape \(8, 64\), expected \(32, 64\)"):
        load(path)


def test_unexpected_tensor_is_named(hf_tied, tmp_path):
    path = copy_dir(hf_tied, tmp_path)
    _rewrite(path, lambda a: a.__setitem__("model.extra.weight", mx.zeros((2,))))
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.extra.weight'"):
        load(path)


def test_sharded_missing_shard(hf_untied, tmp_path):
    save(load(hf_untied, dtype="float32"), tmp_path / "m", max_shard_bytes=40_000)
    next((tmp_path / "m").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-.*weight file is missing"):
        read_weights(tmp_path / "m")
