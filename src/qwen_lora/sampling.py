"""Token samplers: greedy, temperature, top-k and top-p (nucleus), composable and seedable.

Two equivalent implementations: numpy on CPUs, where MLX's element-wise ops and sort are slow
(top-p over 151,936 logits costs ~0.5 ms here instead of ~20 ms), and MLX on GPUs, where the
logits stay on the device and sampling remains part of the lazy graph.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np


class Sampler:
    """Pick the next token from logits of shape (batch, vocab); returns int32 ids (batch,).

    temperature 0 is greedy (top_k and top_p are then irrelevant); top_k 0 and top_p 1 are off.
    top-p keeps the smallest set of most likely tokens whose probability mass reaches `top_p`.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, backend: str | None = None) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
        if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
        if backend not in (None, "numpy", "mlx"):
            raise ValueError(f"backend must be 'numpy' or 'mlx', got {backend!r}")
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.seed = seed
        self.backend = backend
        self._rng = np.random.default_rng(seed)
        self._key = mx.random.key(seed if seed is not None else int(self._rng.integers(2**31)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __repr__(self) -> str:
        return (f"Sampler(temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p}, seed={self.seed})")

    def __call__(self, logits: mx.array) -> mx.array:
        backend = self.backend or ("numpy" if mx.default_device() == mx.cpu else "mlx")
        if logits.ndim == 1:
            logits = logits[None]
        if backend == "numpy":
            return mx.array(self.sample_numpy(np.asarray(logits.astype(mx.float32))))
        return self.sample_mlx(logits)

    # numpy ------------------------------------------------------------------------------
    def sample_numpy(self, logits: np.ndarray) -> np.ndarray:
        """Sample each row of a (batch, vocab) float array."""
        if self.greedy:
            return logits.argmax(axis=-1).astype(np.int32)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int32)

    def _sample_row(self, row: np.ndarray) -> int:
        x = row * np.float32(1.0 / self.temperature)
        vocab = x.shape[0]
        if 0 < self.top_k < vocab:
            keep = np.argpartition(x, vocab - self.top_k)[vocab - self.top_k:]
            masked = np.full_like(x, -np.inf)
            masked[keep] = x[keep]
            x = masked
        probs = np.exp(x - x.max())
        if self.top_p < 1.0:
            ordered = np.sort(probs)[::-1]
            cumulative = np.cumsum(ordered)
            n = int(np.searchsorted(cumulative, self.top_p * cumulative[-1])) + 1
            n = min(n, vocab)
            # Draw a position in the sorted nucleus, then find a token of that probability
            # (ties are exchangeable): no argsort of the whole vocabulary is needed.
            pick = int(np.searchsorted(cumulative[:n], self._rng.random() * cumulative[n - 1],
                                       side="right"))
            value = ordered[min(pick, n - 1)]
            candidates = np.flatnonzero(probs == value)
            return int(candidates[0] if len(candidates) == 1 else self._rng.choice(candidates))
        cumulative = np.cumsum(probs)
        pick = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return min(pick, vocab - 1)

    # mlx --------------------------------------------------------------------------------
    def sample_mlx(self, logits: mx.array) -> mx.array:
        """Sample on MLX's default device, lazily."""
        if self.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        x = logits.astype(mx.float32) * (1.0 / self.temperature)
        vocab = x.shape[-1]
        if 0 < self.top_k < vocab:
            kth = mx.topk(x, self.top_k, axis=-1).min(axis=-1, keepdims=True)
            x = mx.where(x >= kth, x, -mx.inf)
        if self.top_p < 1.0:
            probs = mx.softmax(x, axis=-1)
            order = mx.argsort(-probs, axis=-1)
            ordered = mx.take_along_axis(probs, order, axis=-1)
            before = mx.cumsum(ordered, axis=-1) - ordered
            threshold = mx.min(mx.where(before < self.top_p, ordered, mx.inf), axis=-1,
                               keepdims=True)
            x = mx.where(probs >= threshold, x, -mx.inf)
        self._key, key = mx.random.split(self._key)
        return mx.random.categorical(x, axis=-1, key=key).astype(mx.int32)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> Sampler:
    """The seed's default is `make_sampler(0.7, top_p=0.9)`; all zeros/ones mean greedy."""
    return Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
