"""Sampler properties, on both the numpy (CPU) and MLX (GPU) implementations."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen_lora import Sampler, cuda_decode, cuda_sampling, make_sampler

needs_cuda = pytest.mark.skipif(not cuda_decode.available(), reason="needs MLX's CUDA backend")
BACKENDS = ["numpy", "mlx", pytest.param("cuda", marks=needs_cuda)]


def logits_for(probs):
    return mx.array(np.log(np.asarray(probs, dtype=np.float32))[None])


def draws(sampler, logits, n=400):
    return [int(sampler(logits)[0].item()) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_argmax(backend):
    x = mx.array(np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32))
    got = Sampler(backend=backend)(x)
    assert got.dtype == mx.int32
    np.testing.assert_array_equal(np.array(got), np.array(x).argmax(-1))


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


# -- the CUDA kernel (qwen_lora.cuda_sampling) -----------------------------------------------

def expected_distribution(x: np.ndarray, temperature: float, top_k: int, top_p: float
                          ) -> np.ndarray:
    """The distribution `Sampler` draws from, by brute force in float64: the top-k logits
    (ties with the k-th kept), then the nucleus of their softmax (ties with its last kept)."""
    x = x.astype(np.float64)
    keep = np.ones(len(x), dtype=bool)
    if 0 < top_k < len(x):
        keep &= x >= np.sort(x)[-top_k]
    w = np.where(keep, np.exp((x - x.max()) / temperature), 0.0)
    if top_p < 1.0:
        values, which = np.unique(x, return_inverse=True)  # ascending
        mass = np.bincount(which, weights=w, minlength=len(values))
        likelier = (np.cumsum(mass[::-1])[::-1] - mass)[which]  # mass of greater values
        keep &= likelier < top_p * w.sum()
        w = np.where(keep, w, 0.0)
    return w / w.sum()


def assert_drawn_from(counts: np.ndarray, want: np.ndarray) -> None:
    """Token counts against a distribution: none outside its support, and each token's share
    within 5 standard deviations (plus 2 draws) of its probability."""
    n = counts.sum()
    assert counts[want == 0].sum() == 0, "a token outside the top-k / nucleus was drawn"
    got = counts / n
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(got - want) <= 5 * sigma + 2 / n), np.abs(got - want).max()


def kernel_draws(x: np.ndarray, temperature: float, top_k: int, top_p: float,
                 dtype=mx.float32, rows: int = 2048, calls: int = 10) -> np.ndarray:
    """Token counts of rows x calls draws (each row of a call is an independent draw)."""
    logits = mx.broadcast_to(mx.array(x).astype(dtype)[None], (rows, len(x)))
    key = mx.random.key(0)
    params = mx.array([1.0 / temperature, top_p], dtype=mx.float32)
    counts = np.zeros(len(x), dtype=np.int64)
    for _ in range(calls):
        tokens, key = cuda_sampling.sample(logits, key, params, top_k)
        counts += np.bincount(np.array(tokens), minlength=len(x))
    return counts


KERNEL_CASES = {  # the kernel's distribution tests, here on a GPU and on the CPU (emulated)
    "top-p": dict(x=np.random.default_rng(0).normal(size=50) * 2, temperature=1.0, top_k=0,
                  top_p=0.8),
    # a flat distribution and a tiny top_p: the draws miss, the radix selection decides
    "top-p-fallback": dict(x=np.random.default_rng(1).normal(size=1000) * 0.01,
                           temperature=1.0, top_k=0, top_p=0.02),
    "top-k": dict(x=np.random.default_rng(2).normal(size=300), temperature=0.7, top_k=10,
                  top_p=1.0),
    "top-k-top-p": dict(x=np.random.default_rng(3).normal(size=300), temperature=0.7,
                        top_k=10, top_p=0.5),
    "temperature": dict(x=np.random.default_rng(4).normal(size=3000), temperature=2.0,
                        top_k=0, top_p=1.0),
    "tied-p": dict(x=np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0]), temperature=1.0,
                   top_k=0, top_p=0.3),  # ties with the nucleus' last token belong to it
    "tied-k": dict(x=np.array([3.0, 1.0, 1.0, 1.0, 0.0, -2.0]), temperature=1.0, top_k=2,
                   top_p=1.0),  # and with the k-th
    "negative": dict(x=-5.0 - np.abs(np.random.default_rng(5).normal(size=97)) * 3,
                     temperature=0.5, top_k=7, top_p=0.6),  # keys of negative floats
    # consecutive floats: the top-k boundary falls between neighbouring bins of the last
    # radix digit, where an off-by-one in the selection keeps a fourth token
    "adjacent-k": dict(x=1.0 + np.arange(20) * 2.0**-23, temperature=1.0, top_k=3,
                       top_p=1.0),
    "tiny-p": dict(x=np.array([0.2, 0.9, 0.1, 0.9]), temperature=1.0, top_k=0,
                   top_p=1e-45),  # rounds to 0: the most likely (tied) tokens only
    # top-k over a row in chunks (tests/test_cuda_sampling_emulated.py's chunks of 64
    # logits keeping 16): k at the candidates a chunk keeps, a last chunk of 8 logits
    "k-at-candidates": dict(x=np.random.default_rng(8).normal(size=200), temperature=1.0,
                            top_k=16, top_p=1.0),
    # masked tokens (-inf) in every chunk, each with more finite logits than candidates
    "masked-chunks": dict(x=np.where(np.arange(320) % 3 == 0,
                                     np.random.default_rng(9).normal(size=320), -np.inf),
                          temperature=1.0, top_k=12, top_p=0.9),
    # the whole top k in one chunk, the k-th its last candidate
    "k-in-one-chunk": dict(x=np.arange(256) * 0.02, temperature=1.0, top_k=16, top_p=1.0),
    # a chunk's ties outnumber its slots: the whole row decides
    "tied-chunks": dict(x=np.where(np.arange(256) % 50 == 0, 1.0, 0.0), temperature=1.0,
                        top_k=3, top_p=0.8),
    # top-k above the candidates a chunk keeps, over a row longer than the selects that
    # finish with __match_any_sync (QS_SPREAD_MAX; 512 at the emulated tests' sizes)
    "wide-k": dict(x=np.random.default_rng(12).normal(size=600), temperature=1.0, top_k=20,
                   top_p=1.0),
}


@needs_cuda
@pytest.mark.parametrize("name", list(KERNEL_CASES))
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_cuda_kernel_draws_from_the_expected_distribution(name, dtype):
    case = KERNEL_CASES[name]
    x = np.array(mx.array(case["x"].astype(np.float32)).astype(dtype).astype(mx.float32))
    want = expected_distribution(x, case["temperature"], case["top_k"], case["top_p"])
    counts = kernel_draws(x, case["temperature"], case["top_k"], case["top_p"], dtype)
    assert_drawn_from(counts, want)


# Rows of several chunks of 2,048 logits (9,000): top-k in chunks (two kernels), the other
# strategies over the whole row by one block, a flat row with a tiny top_p by the exact
# selection after the rejection draws miss.
LONG_CASES = {
    "temperature": dict(seed=20, scale=2.0, temperature=1.5, top_k=0, top_p=1.0),
    "top-p": dict(seed=21, scale=3.0, temperature=0.7, top_k=0, top_p=0.9),
    "top-k": dict(seed=22, scale=2.0, temperature=1.0, top_k=40, top_p=1.0),
    "top-k-top-p": dict(seed=23, scale=2.0, temperature=1.0, top_k=30, top_p=0.5),
    "flat-top-p": dict(seed=24, scale=0.01, temperature=1.0, top_k=0, top_p=0.02),
}


@needs_cuda
@pytest.mark.parametrize("name", list(LONG_CASES))
def test_cuda_kernel_draws_long_rows_from_the_expected_distribution(name):
    case = LONG_CASES[name]
    x = (np.random.default_rng(case["seed"]).normal(size=9000) * case["scale"]).astype(
        np.float32)
    assert cuda_sampling.chunks(len(x)) > 2
    want = expected_distribution(x, case["temperature"], case["top_k"], case["top_p"])
    counts = kernel_draws(x, case["temperature"], case["top_k"], case["top_p"])
    assert_drawn_from(counts, want)


@needs_cuda
@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (50, 1.0), (50, 0.9)])
def test_cuda_kernel_over_qwens_vocabulary(top_k, top_p):
    """151,936 half-precision logits, 64 rows: every draw in the brute-force support."""
    rows = np.random.default_rng(5).normal(size=(64, 151936)).astype(np.float32) * 3
    logits = mx.array(rows).astype(mx.float16)
    params = mx.array([1 / 0.7, top_p], dtype=mx.float32)
    tokens, _ = cuda_sampling.sample(logits, mx.random.key(1), params, top_k)
    x = np.array(logits.astype(mx.float32))
    for row, token in zip(x, np.array(tokens).tolist(), strict=True):
        assert expected_distribution(row, 0.7, top_k, top_p)[token] > 0


@needs_cuda
def test_cuda_kernel_returns_a_new_key_and_odd_sizes_work():
    key = mx.random.key(3)
    params = mx.array([1.0, 0.9], dtype=mx.float32)
    for vocab in (1, 7, 511, 513, 5000):
        x = mx.random.normal((3, vocab), key=mx.random.key(vocab))
        tokens, next_key = cuda_sampling.sample(x, key, params)
        assert tokens.shape == (3,) and tokens.dtype == mx.int32
        assert ((np.array(tokens) >= 0) & (np.array(tokens) < vocab)).all()
        assert next_key.dtype == mx.uint32 and next_key.shape == (2,)
        assert not np.array_equal(np.array(next_key), np.array(key))


def test_default_backend_follows_the_device(monkeypatch):
    if mx.default_device() == mx.cpu:
        assert Sampler.default_backend() == "numpy"
        return
    assert Sampler.default_backend() == ("cuda" if cuda_decode.available() else "mlx")
    monkeypatch.setenv("QWEN_LORA_CUDA_KERNELS", "off")
    assert Sampler.default_backend() == "mlx"


def test_cuda_backend_says_what_it_needs(monkeypatch):
    monkeypatch.setenv("QWEN_LORA_CUDA_KERNELS", "off")
    with pytest.raises(RuntimeError, match="CUDA"):
        Sampler(temperature=1.0, backend="cuda")(mx.zeros((1, 4)))


def test_cuda_sample_checks_its_inputs():
    params = mx.array([1.0, 0.9], dtype=mx.float32)
    with pytest.raises(ValueError, match="batch, vocab"):
        cuda_sampling.sample(mx.zeros((4,)), mx.random.key(0), params)
    with pytest.raises(ValueError, match="random key"):
        cuda_sampling.sample(mx.zeros((1, 4)), mx.zeros((2,)), params)
