"""The CUDA decoding attention kernel's own source (qwen_lora.cuda_decode.attend), run on the
CPU (tests/cuda_emu.h), against attention computed in NumPy: what tests/test_cuda_decode.py
checks on a GPU, checked everywhere g++ is. Blocks of 64 threads (two warps), so that the
block-wide maximum and sums still cross warps, and lengths below, at and past a block's
threads, so that threads without a position, and threads with several, both occur."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
from emulated_cuda import CTYPES, build_library

from qwen_lora import cuda_decode

THREADS = 64

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def kernel_source(nq: int, nkv: int, head_dim: int, dtype: type) -> str:
    header = cuda_decode._HEADER.replace("QL_THREADS THREADS", f"QL_THREADS {THREADS}")
    ctype = CTYPES[dtype]
    return f"""#include "cuda_emu.h"
{header}
template <typename T, int NQ, int NKV, int HD>
void attend(const T* q, const T* k, const T* v, const int32_t* offset, const float* scale,
            const int32_t* cache_size, T* out) {{
{cuda_decode._ATTEND}
}}

extern "C" int run(unsigned batch, const void* q, const void* k, const void* v,
                   const int32_t* offset, const float* scale, const int32_t* cache_size,
                   void* out) {{
  bool ok = emu::launch(batch * {nq}, {THREADS}, [&] {{
    attend<{ctype}, {nq}, {nkv}, {head_dim}>(
        static_cast<const {ctype}*>(q), static_cast<const {ctype}*>(k),
        static_cast<const {ctype}*>(v), offset, scale, cache_size, static_cast<{ctype}*>(out));
  }});
  return ok ? 0 : 1;
}}
"""


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, length: int,
                    scale: float) -> np.ndarray:
    """(batch, nq, 1, hd) attention over the first `length` positions, in float64."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k[:, :, :length], group, axis=1)
    v = np.repeat(v[:, :, :length], group, axis=1)
    scores = scale * q @ k.swapaxes(-1, -2)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda-emu-attend")


def run_attend(lib: ctypes.CDLL, q: np.ndarray, k: np.ndarray, v: np.ndarray, offset: int,
               scale: float) -> np.ndarray:
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    out = np.full(q.shape, np.nan, dtype=q.dtype)
    status = lib.run(ctypes.c_uint(q.shape[0]), ctypes.c_void_p(q.ctypes.data),
                     ctypes.c_void_p(k.ctypes.data), ctypes.c_void_p(v.ctypes.data),
                     np.ctypeslib.as_ctypes(np.array([offset], dtype=np.int32)),
                     np.ctypeslib.as_ctypes(np.array([scale], dtype=np.float32)),
                     np.ctypeslib.as_ctypes(np.array([k.shape[2]], dtype=np.int32)),
                     ctypes.c_void_p(out.ctypes.data))
    assert status == 0, "the kernel deadlocked: threads wait at a barrier others never reach"
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("batch, nq, nkv, head_dim, size",
                         [(1, 14, 2, 64, 3 * THREADS + 8), (3, 4, 4, 16, 3 * THREADS + 8),
                          (2, 4, 2, 16, 2 * THREADS + 40)])
def test_emulated_attention_equals_numpy(root, dtype, batch, nq, nkv, head_dim, size):
    """The last case: a batch of grouped heads, at another cache size than the others'."""
    lib = build_library(kernel_source(nq, nkv, head_dim, dtype), root)
    rng = np.random.default_rng(nq + head_dim)
    q = rng.normal(size=(batch, nq, 1, head_dim)).astype(dtype)
    k = (2 * rng.normal(size=(batch, nkv, size, head_dim))).astype(dtype)
    v = rng.normal(size=(batch, nkv, size, head_dim)).astype(dtype)
    scale = head_dim**-0.5
    tolerance = 1e-5 if dtype == np.float32 else 2e-3
    for offset in (0, 1, THREADS - 1, THREADS, 2 * THREADS + 5, size - 1):
        got = run_attend(lib, q, k, v, offset, scale)
        want = numpy_attention(q, k, v, offset + 1, scale)
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tolerance,
                                   atol=tolerance, err_msg=f"offset {offset}")
    # one build serves caches of any size (read at run time)
    half = size // 2
    got = run_attend(lib, q, k[:, :, :half], v[:, :, :half], half - 1, scale)
    np.testing.assert_allclose(got.astype(np.float64), numpy_attention(q, k, v, half, scale),
                               rtol=tolerance, atol=tolerance)
    # positions past the offset are never read: NaN there changes nothing
    k[:, :, 10:] = np.nan
    v[:, :, 10:] = np.nan
    got = run_attend(lib, q, k, v, 9, scale)
    np.testing.assert_allclose(got.astype(np.float64), numpy_attention(q, k, v, 10, scale),
                               rtol=tolerance, atol=tolerance)


def test_emulated_attention_of_one_position_is_its_value(root):
    """Softmax over one key is 1 whatever the score: the output is that value (large scores
    included, where a softmax without its maximum subtracted would overflow)."""
    lib = build_library(kernel_source(2, 1, 8, np.float32), root)
    q = np.full((1, 2, 1, 8), 100.0, dtype=np.float32)
    k = np.full((1, 1, 8, 8), 100.0, dtype=np.float32)
    v = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    got = run_attend(lib, q, k, v, 0, 1.0)
    np.testing.assert_array_equal(got[0, :, 0], np.stack([v[0, 0, 0]] * 2))
