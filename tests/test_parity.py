"""qwen_lora against Hugging Face transformers and mlx-lm on the same weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen_lora import generate, load
from qwen_lora.generate import prefill

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 99, 3, 250, 41, 7, 120, 64, 300, 11, 2]


def hf_logits(path, ids):
    model = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy(), model


@pytest.mark.parametrize("which", ["hf_tied", "hf_untied"])
def test_logits_match_transformers(which, request):
    path = request.getfixturevalue(which)
    batch = [PROMPT, PROMPT[::-1]]
    expected, _ = hf_logits(path, batch)
    model = load(path, dtype="float32")
    got = np.array(model(mx.array(batch)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["hf_tied", "hf_untied"])
def test_greedy_generation_matches_transformers(which, request):
    path = request.getfixturevalue(which)
    _, hf = hf_logits(path, [PROMPT])
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=24, min_new_tokens=24,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(PROMPT):].tolist()
    model = load(path, dtype="float32")
    assert generate(model, PROMPT, 24, stop_tokens=()) == expected
    assert generate(model, PROMPT, 24, stop_tokens=(), use_cache=False) == expected


def test_cached_and_uncached_generation_are_identical(hf_untied):
    model = load(hf_untied, dtype="float32")
    assert (generate(model, PROMPT, 40, stop_tokens=())
            == generate(model, PROMPT, 40, stop_tokens=(), use_cache=False))


def test_fused_projections_match_and_save_hf_names(hf_untied, tmp_path):
    from qwen_lora import save

    model = load(hf_untied, dtype="float32")
    ids = mx.array([PROMPT])
    expected = np.array(model(ids))
    fused = load(hf_untied, dtype="float32", fuse_projections=True)
    assert "qkv_proj" in fused.layers[0].self_attn and "gate_up_proj" in fused.layers[0].mlp
    np.testing.assert_allclose(np.array(fused(ids)), expected, atol=1e-5)
    assert generate(fused, PROMPT, 16, stop_tokens=()) == generate(model, PROMPT, 16,
                                                                   stop_tokens=())
    save(fused, tmp_path / "copy")
    np.testing.assert_allclose(np.array(load(tmp_path / "copy", dtype="float32")(ids)),
                               expected, atol=1e-5)


def test_chunked_prefill_equals_one_pass(hf_tied):
    model = load(hf_tied, dtype="float32")
    prompt = mx.array([list(range(1, 300))])
    whole = prefill(model, prompt, model.make_cache(), chunk=1000)
    chunked = prefill(model, prompt, model.make_cache(), chunk=64)
    np.testing.assert_allclose(np.array(chunked), np.array(whole), atol=1e-4)


@pytest.mark.parametrize("which", ["hf_tied", "hf_untied"])
def test_logits_match_mlx_lm(which, request, tmp_path):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    ours = load(request.getfixturevalue(which), dtype="float32")
    # mlx-lm reads only the classic top-level rope_theta, which `save` writes
    from qwen_lora import save

    theirs, _ = mlx_lm_utils.load_model(save(ours, tmp_path / "copy"))
    theirs.set_dtype(mx.float32)
    ids = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(ours(ids)), np.array(theirs(ids)), atol=1e-4, rtol=0)


def test_saved_model_loads_in_transformers(hf_untied, tmp_path):
    from qwen_lora import save

    model = load(hf_untied, dtype="float32")
    save(model, tmp_path / "copy")
    expected, _ = hf_logits(hf_untied, [PROMPT])
    got, _ = hf_logits(tmp_path / "copy", [PROMPT])
    np.testing.assert_allclose(got, expected, atol=1e-5)
