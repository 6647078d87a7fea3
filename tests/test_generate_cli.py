"""Generation streaming, KV cache bookkeeping and the command line."""

from __future__ import annotations

import mlx.core as mx
import pytest

from qwen_lora import KVCache, Sampler, generate, load, stream_generate
from qwen_lora.cli import main


def test_stream_reports_figures(tiny_dir):
    model = load(tiny_dir)
    steps = list(stream_generate(model, [1, 2, 3, 4], 6, stop_tokens=()))
    assert [s.index for s in steps] == list(range(6))
    assert steps[-1].finish_reason == "length"
    assert all(s.prompt_tokens == 4 for s in steps)
    assert steps[0].time_to_first_token > 0 and steps[-1].generation_tps > 0
    assert steps[-1].peak_memory > 0


def test_stop_tokens_end_generation(tiny_dir):
    model = load(tiny_dir)
    free = generate(model, [1, 2, 3], 10, stop_tokens=())
    stop = free[3]
    stopped = generate(model, [1, 2, 3], 10, stop_tokens=[stop])
    assert stopped == free[: free.index(stop) + 1]


def test_bad_generation_input(tiny_dir):
    model = load(tiny_dir)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [1, 10_000], 3)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, [1], -1)


def test_seeded_sampling_repeats(tiny_dir):
    model = load(tiny_dir)
    a = generate(model, [1, 2], 12, Sampler(0.7, top_p=0.9, seed=3), stop_tokens=())
    b = generate(model, [1, 2], 12, Sampler(0.7, top_p=0.9, seed=3), stop_tokens=())
    assert a == b


def test_kv_cache_grows_in_steps_and_trims():
    cache = KVCache(step=8)
    k = mx.ones((2, 3, 5, 4))
    keys, _ = cache.update_and_fetch(k, k)
    assert keys.shape == (2, 3, 5, 4) and cache.keys.shape[2] == 8
    cache.update_and_fetch(k, k)
    assert cache.offset == 10 and cache.keys.shape[2] == 16
    assert cache.nbytes == 2 * 2 * 3 * 16 * 4 * 4
    assert cache.trim(4) == 4 and cache.offset == 6
    keys, _ = cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert keys.shape[2] == 7


def test_kv_cache_capacity_preallocates():
    cache = KVCache(capacity=2048)
    k = mx.zeros((1, 2, 10, 64), dtype=mx.float16)
    cache.update_and_fetch(k, k)
    assert cache.nbytes == 2 * 1 * 2 * 2048 * 64 * 2


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "blas" in out and "device" in out


def test_cli_init_and_generate(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "The quick brown",
                 "--max-tokens", "5", "--temp", "0.7", "--top-p", "0.9", "--seed", "1"]) == 0
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", "1,2,3",
                 "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "tok/s" in captured.err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", "1",
                 "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
