"""Keep freed memory in the process (glibc's malloc), so MLX's CPU arrays reuse warm pages.

MLX's CPU backend allocates every array with `malloc` and frees it when the last reference
goes. glibc serves requests above its mmap threshold (at most 32 MB) with a fresh `mmap` and
returns them with `munmap`, and gives the top of its heap back to the system once more than
the trim threshold is free there. A training step of Qwen2.5-0.5B at sequence 512 allocates
over a gigabyte of such buffers (311 MB of logits, their exponentials and gradient), so every
step faulted its pages in again and the kernel zeroed each one: 8% of the step's samples in
`clear_page` on a 2-core EPYC. With mmap and trimming off (`mallopt`), freed blocks stay in
the heap and are reused: the step took 3.5 s instead of 4.3 s there, and the process's peak
resident memory grew by 1% (4.01 -> 4.06 GB; MLX's own peak is unchanged). The cost is that
the process keeps its high-water mark of memory until it exits, as caching allocators do.

Applied on Linux with glibc where MLX's default device is the CPU; `QWEN_LORA_MALLOC=default`
leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

MALLOC_ENV = "QWEN_LORA_MALLOC"
# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB at the top are free


@dataclass(frozen=True)
class HeapInfo:
    """Whether freed memory stays in the process, and why (not)."""

    keeps_freed: bool
    reason: str


_heap: HeapInfo | None = None


def _skip(reason: str) -> HeapInfo:
    global _heap
    _heap = HeapInfo(False, reason)
    return _heap


def keep_freed_memory() -> HeapInfo:
    """Turn off glibc's mmap for large blocks and its heap trimming; idempotent."""
    global _heap
    if _heap is not None:
        return _heap
    from qwen_lora.backend import OFF_VALUES, is_gpu

    setting = os.environ.get(MALLOC_ENV, "").strip().lower()
    if setting in ("default", *OFF_VALUES):
        return _skip(f"{MALLOC_ENV}={setting}")
    if sys.platform != "linux":
        return _skip("not Linux")
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return _skip("the C library is not glibc")
    if is_gpu():
        return _skip("MLX's default device is a GPU (its allocator keeps its own cache)")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if not libc.mallopt(M_MMAP_MAX, 0):
        return _skip("mallopt refused M_MMAP_MAX")
    if not libc.mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER):  # half applied: say which half
        _heap = HeapInfo(True, "glibc mallopt: no mmap for large blocks (M_TRIM_THRESHOLD "
                               "refused: the heap is still trimmed)")
        return _heap
    _heap = HeapInfo(True, "glibc mallopt: no mmap for large blocks, no heap trimming")
    return _heap


def heap_info() -> HeapInfo:
    """What `keep_freed_memory` did (or `HeapInfo(False, 'not set up')` before it ran)."""
    return _heap if _heap is not None else HeapInfo(False, "not set up")
