"""Token samplers: greedy, temperature, top-k and top-p (nucleus), composable and seedable.

Three equivalent implementations: numpy on CPUs, where MLX's element-wise ops and sort are
slow (top-p over 151,936 logits costs ~0.2 ms here instead of ~20 ms); on MLX's CUDA backend,
one CUDA kernel of our own (`qwen_lora.cuda_sampling`: no sort, one launch); MLX operations on
other GPUs (Metal), where the logits stay on the device and sampling remains part of the
lazy graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from qwen_lora import cuda_decode, cuda_sampling


class Sampler:
    """Pick the next token from logits of shape (batch, vocab); returns int32 ids (batch,).

    temperature 0 is greedy (top_k and top_p are then irrelevant); top_k 0 and top_p 1 are off.
    top-p keeps the smallest set of most likely tokens whose probability mass reaches `top_p`.
    `backend`: 'numpy', 'mlx' or 'cuda' (one kernel, on MLX's CUDA backend); by default
    numpy on CPUs, the kernel on CUDA (unless QWEN_LORA_CUDA_KERNELS is off), MLX
    operations on other GPUs.
    """

    NUCLEUS_TRIES = 8  # rejection draws of top-p on the numpy path before the exact search
    NUCLEUS_GUESS = 1024  # the exact search's first guess of the nucleus size

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, backend: str | None = None) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
        if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
        if backend not in (None, "numpy", "mlx", "cuda"):
            raise ValueError(f"backend must be 'numpy', 'mlx' or 'cuda', got {backend!r}")
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.seed = seed
        self.backend = backend
        self._rng = np.random.default_rng(seed)
        self._buffers: dict[tuple[int, int, type], np.ndarray] = {}
        self._compiled: Callable[[mx.array, mx.array], tuple[mx.array, mx.array]] | None = None
        self._key = mx.random.key(seed if seed is not None else int(self._rng.integers(2**31)))
        self._params: mx.array | None = None  # the CUDA kernel's [1 / temperature, top_p]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __repr__(self) -> str:
        return (f"Sampler(temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p}, seed={self.seed})")

    def __call__(self, logits: mx.array) -> mx.array:
        backend = self.backend or self.default_backend()
        if logits.ndim == 1:
            logits = logits[None]
        if backend == "numpy":
            return mx.array(self.sample_numpy(np.asarray(logits.astype(mx.float32))))
        if backend == "cuda":
            # default_backend() just checked the kernels' availability (an environment
            # lookup and a device query): not again
            return self._draw_cuda(logits) if self.backend is None else self.sample_cuda(logits)
        return self.sample_mlx(logits)

    @staticmethod
    def default_backend() -> str:
        """The backend a Sampler without one uses on MLX's default device."""
        if mx.default_device() == mx.cpu:
            return "numpy"
        return "cuda" if cuda_decode.available() else "mlx"

    # numpy ------------------------------------------------------------------------------
    def sample_numpy(self, logits: np.ndarray) -> np.ndarray:
        """Sample each row of a (batch, vocab) float array."""
        if self.greedy:
            return logits.argmax(axis=-1).astype(np.int32)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int32)

    def _sample_row(self, row: np.ndarray) -> int:
        vocab = row.shape[0]
        if 0 < self.top_k < vocab:
            ids = self._top_k_ids(row)
            return int(ids[self._sample_few(row[ids])])
        probs = self._weights(row, out=self._buffer(vocab, 0))
        if self.top_p >= 1.0:
            prefix = _Prefix(probs)
            return min(prefix.count_at_most(self._rng.random() * prefix.total), vocab - 1)
        return self._sample_nucleus(probs)

    def _buffer(self, size: int, which: int, dtype: type = np.float32) -> np.ndarray:
        """A work array kept between calls: a fresh 600 kB array a call costs more in
        page faults than the arithmetic (0.65 ms against 0.25 ms a token at 151,936)."""
        key = (size, which, dtype)
        if key not in self._buffers:
            self._buffers[key] = np.empty(size, dtype=dtype)
        return self._buffers[key]

    def _weights(self, logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Unnormalized probabilities exp((logits - max) / temperature), in `out` or a new
        array."""
        x = np.subtract(logits, logits.max(), out=out)
        x *= np.float32(1.0 / self.temperature)
        return np.exp(x, out=x)

    def _top_k_ids(self, row: np.ndarray) -> np.ndarray:
        """Indices of the top_k largest logits (`np.argpartition` would allocate and fill
        a 1.2 MB index array at 151,936; partitioning a copy of the values does not)."""
        vocab, k = len(row), self.top_k
        scratch = self._buffer(vocab, 1)
        np.copyto(scratch, row)
        scratch.partition(vocab - k)
        kth = scratch[vocab - k]
        ids = np.flatnonzero(row >= kth)
        if len(ids) > k:  # ties at the k-th value: keep a random subset of them
            above, tied = ids[row[ids] > kth], ids[row[ids] == kth]
            ids = np.concatenate([above, self._rng.choice(tied, k - len(above), replace=False)])
        return ids

    def _nucleus_size(self, cumulative: np.ndarray, total: float) -> int:
        """How many of the most likely tokens (`cumulative` sums them, most likely first) form
        the nucleus: the smallest count whose mass reaches top_p of `total`."""
        if self.top_p >= 1.0:
            return len(cumulative)
        count = int(np.searchsorted(cumulative, self.top_p * total, side="left")) + 1
        return min(count, len(cumulative))

    def _draw(self, cumulative: np.ndarray, total: float) -> int:
        """A position drawn from the nucleus of the most likely tokens that `cumulative` sums
        (most likely first), in proportion to their probabilities."""
        n = self._nucleus_size(cumulative, total)
        pick = int(np.searchsorted(cumulative[:n], self._rng.random() * cumulative[n - 1],
                                   side="right"))
        return min(pick, n - 1)

    def _sample_few(self, logits: np.ndarray) -> int:
        """Index into a short candidate list (the top-k), which is cheap to sort whole."""
        probs = self._weights(logits)
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order], dtype=np.float64)
        return int(order[self._draw(cumulative, float(cumulative[-1]))])

    def _sample_nucleus(self, probs: np.ndarray) -> int:
        """Top-p over the whole vocabulary by rejection, without sorting: a token drawn from
        the whole distribution is in the nucleus exactly when the tokens likelier than it hold
        less than top_p of the mass (tokens tied with the nucleus' last one belong to it), so
        keeping only such draws samples the nucleus' distribution. A try is a draw and one
        masked sum (~0.1 ms at 151,936 here) and is kept with probability >= top_p; sorting a
        flat distribution's nucleus cost ~2 ms. After NUCLEUS_TRIES misses (a tiny top_p over
        a flat distribution) the exact search decides."""
        vocab = len(probs)
        prefix = _Prefix(probs)
        likelier, masked = self._buffer(vocab, 0, bool), self._buffer(vocab, 1)
        for _ in range(self.NUCLEUS_TRIES):
            token = min(prefix.count_at_most(self._rng.random() * prefix.total), vocab - 1)
            np.greater(probs, probs[token], out=likelier)
            np.multiply(probs, likelier, out=masked)  # 10x faster than a sum with where=
            if masked.sum(dtype=np.float64) < self.top_p * prefix.total:
                return token
        return self._search_nucleus(probs)

    def _search_nucleus(self, probs: np.ndarray) -> int:
        """Top-p by finding the nucleus: it lies among the m most likely tokens as soon as
        their mass reaches top_p, and `np.partition` finds those in linear time (0.09 ms at
        151,936 here). m grows 8x per try, so a flat distribution ends in one full sort."""
        vocab = len(probs)
        total = float(probs.sum(dtype=np.float64))
        m = min(self.NUCLEUS_GUESS, vocab)
        scratch = self._buffer(vocab, 1)
        while True:
            np.copyto(scratch, probs)
            if m < vocab:
                scratch.partition(vocab - m)
            top = np.sort(scratch[vocab - m:])[::-1]
            cumulative = np.cumsum(top, dtype=np.float64)
            if m == vocab or cumulative[-1] >= self.top_p * total:
                break
            m = min(m * 8, vocab)
        value = top[self._draw(cumulative, total)]
        # Find a token of the drawn probability (ties are exchangeable): no argsort needed.
        candidates = np.flatnonzero(probs == value)
        return int(candidates[0] if len(candidates) == 1 else self._rng.choice(candidates))

    # mlx --------------------------------------------------------------------------------
    def sample_mlx(self, logits: mx.array) -> mx.array:
        """Sample on MLX's default device, lazily, with one compiled function: fused
        element-wise kernels instead of one launch per operation."""
        if self.greedy:
            # argmax gives uint32; viewing its bits as int32 (ids < 2**31) launches no copy
            return mx.view(mx.argmax(logits, axis=-1), mx.int32)
        if self._compiled is None:
            self._compiled = mx.compile(_mlx_sampler(self.temperature, self.top_k, self.top_p))
        tokens, self._key = self._compiled(logits, self._key)
        return tokens

    # cuda -------------------------------------------------------------------------------
    def sample_cuda(self, logits: mx.array) -> mx.array:
        """Sample with one CUDA kernel (`qwen_lora.cuda_sampling`), lazily."""
        if not cuda_decode.available():
            raise RuntimeError("Sampler(backend='cuda') needs MLX's CUDA backend and "
                               "QWEN_LORA_CUDA_KERNELS not off")
        return self._draw_cuda(logits)

    def _draw_cuda(self, logits: mx.array) -> mx.array:
        if self.greedy:
            return self.sample_mlx(logits)  # an argmax
        if self._params is None:
            self._params = mx.array([1.0 / self.temperature, self.top_p], dtype=mx.float32)
        if logits.dtype not in cuda_sampling.DTYPES:
            logits = logits.astype(mx.float32)
        tokens, self._key = cuda_sampling.sample(logits, self._key, self._params, self.top_k)
        return tokens


def _mlx_sampler(temperature: float, top_k: int, top_p: float
                 ) -> Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]:
    """(logits, key) -> (tokens, next key) for the MLX path of `Sampler`."""
    def sample(logits: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        x = logits.astype(mx.float32) * (1.0 / temperature)
        vocab = x.shape[-1]
        next_key, key = mx.random.split(key)
        if 0 < top_k < vocab:
            kth = mx.topk(x, top_k, axis=-1).min(axis=-1, keepdims=True)
            x = mx.where(x >= kth, x, -mx.inf)
        if top_p < 1.0:
            return _nucleus_draw(x, top_p, key), next_key
        return mx.random.categorical(x, axis=-1, key=key).astype(mx.int32), next_key

    return sample


def _nucleus_draw(x: mx.array, top_p: float, key: mx.array) -> mx.array:
    """A token from the nucleus of softmax(x) by inverse transform: one uniform number per row
    against the sorted probabilities' prefix sums, which top-p computes anyway, instead of a
    Gumbel draw over the whole vocabulary (151,936 random numbers and an argmax)."""
    probs = mx.softmax(x, axis=-1)
    order = mx.argsort(-x, axis=-1)
    ordered = mx.take_along_axis(probs, order, axis=-1)
    # float32 prefix sums: tokens below ~1e-7 of the mass are mis-weighted, as in a sum
    cumulative = mx.cumsum(ordered, axis=-1)
    size = mx.maximum(((cumulative - ordered) < top_p).sum(axis=-1, keepdims=True), 1)
    # tokens tied with the last one of the nucleus belong to it too (their order is arbitrary)
    edge = mx.take_along_axis(ordered, size - 1, axis=-1)
    size = (ordered >= edge).sum(axis=-1, keepdims=True)
    mass = mx.take_along_axis(cumulative, size - 1, axis=-1)
    target = mx.random.uniform(shape=mass.shape, key=key) * mass
    pick = mx.minimum((cumulative <= target).sum(axis=-1, keepdims=True), size - 1)
    return mx.take_along_axis(order, pick, axis=-1)[:, 0].astype(mx.int32)


class _Prefix:
    """Prefix sums of a float vector, searched in blocks: a full float32 `np.cumsum` over
    151,936 values costs ~0.4 ms, block sums plus one block's cumsum ~0.04 ms."""

    BLOCK = 512

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        n, b = len(values), self.BLOCK
        whole = n // b * b
        sums = values[:whole].reshape(-1, b).sum(axis=1, dtype=np.float64)
        if whole < n:
            sums = np.append(sums, values[whole:].sum(dtype=np.float64))
        self.block_ends = np.cumsum(sums)
        self.total = float(self.block_ends[-1])

    def count_at_most(self, target: float) -> int:
        """How many leading prefix sums are <= target (the index of the first one above)."""
        block = int(np.searchsorted(self.block_ends, target, side="right"))
        if block == len(self.block_ends):
            return len(self.values)
        base = self.block_ends[block - 1] if block else 0.0
        start = block * self.BLOCK
        inner = np.cumsum(self.values[start:start + self.BLOCK], dtype=np.float64) + base
        return start + int(np.searchsorted(inner, target, side="right"))

    def sum_first(self, count: int) -> float:
        """Sum of the first `count` values."""
        block, rest = divmod(count, self.BLOCK)
        base = self.block_ends[block - 1] if block else 0.0
        start = block * self.BLOCK
        return float(base + self.values[start:start + rest].sum(dtype=np.float64))


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> Sampler:
    """The seed's default is `make_sampler(0.7, top_p=0.9)`; all zeros/ones mean greedy."""
    return Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
