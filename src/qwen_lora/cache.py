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

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append this step's keys/values; return everything cached so far."""
        length = keys.shape[2]
        if self.keys is None or self.offset + length > self.keys.shape[2]:
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


class StaticKVCache:
    """A fixed-capacity cache whose shapes never change, so a decode step can be compiled.

    The write position is an array, not a Python int: `mx.compile` then traces one graph for
    every step. Attention spans the whole buffer with a mask hiding unwritten slots, so pick
    `capacity` close to prompt + new tokens. All state lives in `self.state`, mutated in place,
    which is what `mx.compile(..., inputs=state, outputs=state)` tracks.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: mx.Dtype) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        shape = (batch, kv_heads, capacity, head_dim)
        self.capacity = capacity
        self.state = [mx.zeros(shape, dtype), mx.zeros(shape, dtype), mx.array(0, mx.int32)]

    @property
    def offset(self) -> mx.array:
        return self.state[2]

    def mask(self, length: int) -> mx.array:
        """(length, capacity) booleans: query i sees keys up to its own position."""
        queries = self.offset + mx.arange(length)
        return mx.arange(self.capacity)[None, :] <= queries[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start = self.offset.reshape(1)
        self.state[0] = mx.slice_update(self.state[0], keys, start, axes=(2,))
        self.state[1] = mx.slice_update(self.state[1], values, start, axes=(2,))
        self.state[2] = self.offset + keys.shape[2]
        return self.state[0], self.state[1]

    @property
    def nbytes(self) -> int:
        return self.state[0].nbytes + self.state[1].nbytes


def make_static_cache(num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                      dtype: mx.Dtype) -> list[StaticKVCache]:
    """One `StaticKVCache` per decoder layer."""
    return [StaticKVCache(batch, kv_heads, head_dim, capacity, dtype) for _ in range(num_layers)]
