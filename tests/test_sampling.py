"""Sampler properties, on both the numpy (CPU) and MLX (GPU) implementations."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen_lora import Sampler, make_sampler

BACKENDS = ["numpy", "mlx"]


def logits_for(probs):
    return mx.array(np.log(np.asarray(probs, dtype=np.float32))[None])


def draws(sampler, logits, n=400):
    return [int(sampler(logits)[0].item()) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_argmax(backend):
    x = mx.array(np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32))
    got = np.array(Sampler(backend=backend)(x))
    np.testing.assert_array_equal(got, np.array(x).argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_zero_equals_greedy(backend):
    x = mx.array(np.random.default_rng(1).normal(size=(1, 5000)).astype(np.float32))
    sampler = Sampler(temperature=0.0, top_k=5, top_p=0.5, backend=backend, seed=3)
    assert int(sampler(x)[0].item()) == int(np.array(x).argmax())


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_never_leaves_the_k_best(backend):
    x = mx.array(np.random.default_rng(2).normal(size=(1, 2000)).astype(np.float32))
    best = set(np.argsort(-np.array(x)[0])[:5].tolist())
    sampler = Sampler(temperature=5.0, top_k=5, backend=backend, seed=0)
    seen = set(draws(sampler, x))
    assert seen <= best
    assert len(seen) == 5  # a high temperature visits all of them


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_keeps_smallest_set_reaching_p(backend):
    probs = [0.5, 0.2, 0.15, 0.1, 0.05]
    # mass 0.5+0.2 = 0.7 < 0.8 <= 0.85: the nucleus is the three most likely tokens
    sampler = Sampler(temperature=1.0, top_p=0.8, backend=backend, seed=0)
    seen = draws(sampler, logits_for(probs), 1000)
    assert set(seen) == {0, 1, 2}
    freq = np.bincount(seen, minlength=5)[:3] / len(seen)
    np.testing.assert_allclose(freq, np.array([0.5, 0.2, 0.15]) / 0.85, atol=0.06)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_exact_boundary(backend):
    # mass of the first two is exactly 0.75: they alone reach p = 0.75
    sampler = Sampler(temperature=1.0, top_p=0.75, backend=backend, seed=0)
    assert set(draws(sampler, logits_for([0.5, 0.25, 0.125, 0.125]), 300)) == {0, 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_sampling_follows_the_distribution(backend):
    probs = [0.6, 0.3, 0.1]
    seen = draws(Sampler(temperature=1.0, backend=backend, seed=5), logits_for(probs), 2000)
    np.testing.assert_allclose(np.bincount(seen, minlength=3) / 2000, probs, atol=0.04)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_runs_repeat(backend):
    x = mx.array(np.random.default_rng(4).normal(size=(1, 151936)).astype(np.float32))
    a = draws(Sampler(0.7, top_p=0.9, seed=42, backend=backend), x, 20)
    b = draws(Sampler(0.7, top_p=0.9, seed=42, backend=backend), x, 20)
    c = draws(Sampler(0.7, top_p=0.9, seed=43, backend=backend), x, 20)
    assert a == b
    assert a != c


@pytest.mark.parametrize("backend", BACKENDS)
def test_composed_top_k_and_top_p(backend):
    probs = [0.4, 0.3, 0.2, 0.05, 0.05]
    # top-k 4 renormalises to [0.42, 0.32, 0.21, 0.05]; top-p 0.7 then keeps the first two
    sampler = Sampler(temperature=1.0, top_k=4, top_p=0.7, seed=1, backend=backend)
    assert set(draws(sampler, logits_for(probs), 300)) == {0, 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_keeps_tokens_tied_with_the_last_of_the_nucleus(backend):
    """Four equally likely tokens and top-p 0.5: the two that reach p are no likelier than
    the other two, so all four are drawn, about equally often."""
    seen = draws(Sampler(temperature=1.0, top_p=0.5, backend=backend, seed=0),
                 logits_for([0.25] * 4), 1000)
    np.testing.assert_allclose(np.bincount(seen, minlength=4) / 1000, [0.25] * 4, atol=0.06)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tiny_top_p_keeps_the_most_likely_token(backend):
    sampler = Sampler(temperature=1.0, top_p=1e-50, backend=backend, seed=0)  # 0 in float32
    assert set(draws(sampler, logits_for([0.2, 0.7, 0.1]), 50)) == {1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_over_a_batch(backend):
    x = mx.concatenate([logits_for([0.5, 0.3, 0.2]), logits_for([0.1, 0.1, 0.8])])
    sampler = Sampler(temperature=1.0, top_p=0.6, backend=backend, seed=0)
    seen = np.array([np.array(sampler(x)) for _ in range(300)])
    assert set(seen[:, 0].tolist()) == {0, 1}  # nucleus of row 0: 0.5 + 0.3
    assert set(seen[:, 1].tolist()) == {2}


def test_top_p_falls_back_to_the_exact_search(monkeypatch):
    """A tiny top_p over a flat distribution: rejection draws almost never land in the
    one-token nucleus, so after NUCLEUS_TRIES misses the exact search decides."""
    searched = []
    search = Sampler._search_nucleus
    monkeypatch.setattr(Sampler, "_search_nucleus",
                        lambda self, probs: searched.append(1) or search(self, probs))
    logits = np.zeros((1, 10_000), dtype=np.float32)
    logits[0, 123] = 0.01
    sampler = Sampler(temperature=1.0, top_p=1e-6, seed=0, backend="numpy")
    assert set(draws(sampler, mx.array(logits), 20)) == {123}
    assert len(searched) >= 19


def test_batch_rows_are_sampled_independently():
    x = mx.array(np.log(np.array([[0.999, 0.001], [0.001, 0.999]], dtype=np.float32)))
    out = np.array(Sampler(temperature=0.5, seed=0)(x))
    np.testing.assert_array_equal(out, [0, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_invalid_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(**kwargs)


def test_prefix_search_matches_cumsum_across_blocks():
    from qwen_lora.sampling import _Prefix

    values = np.random.default_rng(7).random(5 * _Prefix.BLOCK + 37).astype(np.float32)
    prefix = _Prefix(values)
    cumulative = np.cumsum(values, dtype=np.float64)
    for target in (0.0, 0.3, cumulative[511], cumulative[512] + 1e-9, cumulative[-1] * 0.77,
                   cumulative[-1] + 1.0):
        assert prefix.count_at_most(target) == np.searchsorted(cumulative, target, "right")
    for count in (0, 1, 512, 513, len(values)):
        assert np.isclose(prefix.sum_first(count), cumulative[count - 1] if count else 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_nucleus_over_a_large_vocabulary(backend):
    """Against a brute-force nucleus (argsort + cumsum) spanning many prefix blocks."""
    x = np.random.default_rng(8).normal(size=20_000).astype(np.float32)
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), 0.6)) + 1
    nucleus = set(order[:n].tolist())
    assert n > 2000
    seen = draws(Sampler(temperature=1.0, top_p=0.6, backend=backend, seed=2), mx.array(x[None]),
                 300)
    assert set(seen) <= nucleus


def test_top_k_keeps_exactly_k_when_the_kth_logit_is_tied():
    """One clear best and four tied for second: top-k 2 keeps the best and one of the four."""
    logits = mx.array([[5.0, 1.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    seen = draws(Sampler(temperature=100.0, top_k=2, seed=0, backend="numpy"), logits, 2000)
    assert set(seen) == {0, 1, 2, 3, 4}
    # With two candidates at nearly equal weight, the best wins about half the draws (a tie
    # kept whole would make it one fifth).
    assert 0.45 < seen.count(0) / len(seen) < 0.57
