"""Per-layer key/value cache for incremental decoding, grown in steps (or preallocated)."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, shape (batch, kv_heads, tokens, head_dim).

    Storage grows in blocks of `step` tokens, so decoding writes in place instead of
    concatenating each token; `capacity` preallocates a known maximum once.
    """

    def __init__(self, step: int = 256, capacity: int | None = None) -> None:
        if step <= 0:
            raise ValueError(f"step must be positive, got {step}")
        self.step = step
        self.capacity = capacity
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def _grow(self, new_keys: mx.array, new_values: mx.array) -> None:
        batch, heads, length, k_dim = new_keys.shape
        v_dim = new_values.shape[3]
        needed = self.offset + length
        if self.capacity is not None and self.keys is None and needed <= self.capacity:
            size = self.capacity
        else:
            size = ((needed + self.step - 1) // self.step) * self.step
        keys = mx.zeros((batch, heads, size, k_dim), new_keys.dtype)
        values = mx.zeros((batch, heads, size, v_dim), new_values.dtype)
        if self.keys is not None:
            keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            values[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = keys, values

    def has_room(self, length: int = 1) -> bool:
        """Whether the buffers take `length` more positions without growing."""
        return self.keys is not None and self.offset + length <= self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append this step's keys/values; return everything cached so far."""
        length = keys.shape[2]
        if not self.has_room(length):
            self._grow(keys, values)
        end = self.offset + length
        self.keys[..., self.offset:end, :] = keys
        self.values[..., self.offset:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (e.g. to re-run a suffix); returns how many were dropped."""
        n = max(0, min(n, self.offset))
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (allocated, not only the used part)."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


def make_cache(num_layers: int, step: int = 256, capacity: int | None = None) -> list[KVCache]:
    """One `KVCache` per decoder layer."""
    return [KVCache(step=step, capacity=capacity) for _ in range(num_layers)]


def cache_nbytes(cache: list[KVCache]) -> int:
    """Total bytes of a model's cache."""
    return sum(c.nbytes for c in cache)

