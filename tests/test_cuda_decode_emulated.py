"""The CUDA decoding kernels' own source (qwen_lora.cuda_decode), run on the CPU
(tests/cuda_emu.h), against NumPy: what tests/test_cuda_decode.py checks on a GPU, checked
everywhere g++ is. Blocks of 64 threads (two warps), so that the block-wide maximum and sums
still cross warps; for attention, lengths below, at and past a block's threads, so that
threads without a position, and threads with several, both occur; for the projections, 640
inputs, so that some threads take two stretches of 8 and others one."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys

import numpy as np
import pytest
from emulated_cuda import CTYPES, build_library

from qwen_lora import cuda_decode
from qwen_lora.model import rope_frequencies

THREADS = 64

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def kernel_source(body: str, params: str, args: str, template: str, dtype: type) -> str:
    """cuda_decode's kernel `body` (a name) as a function of `params` (inputs, then outputs,
    as MLX declares them; TYPE for the element type), launched by `run(void** buffers,
    unsigned blocks)` with the buffers in that order as `args`; compacted as MLX gets it."""
    header = cuda_decode._HEADER.replace("QL_THREADS THREADS", f"QL_THREADS {THREADS}")
    return f"""#include "cuda_emu.h"
{cuda_decode.compact(header)}
template <typename T, {template}>
void kernel({params.replace("TYPE", "T")}) {{
{cuda_decode.compact(getattr(cuda_decode, body))}
}}

extern "C" int run(void** p, unsigned blocks) {{
  using T = {CTYPES[dtype]};
  bool ok = emu::launch(blocks, {THREADS}, [&] {{ kernel<T>({args}); }});
  return ok ? 0 : 1;
}}
"""


def run_kernel(lib: ctypes.CDLL, blocks: int, *arrays: np.ndarray) -> None:
    pointers = (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))
    status = lib.run(pointers, ctypes.c_uint(blocks))
    assert status == 0, "the kernel deadlocked: threads wait at a barrier others never reach"


def attend_source(nq: int, nkv: int, head_dim: int, dtype: type) -> str:
    return kernel_source(
        "_ATTEND", "const TYPE* q, const TYPE* k, const TYPE* v, const int32_t* offset, "
        "const float* scale, const int32_t* cache_size, TYPE* out",
        "(T*)p[0], (T*)p[1], (T*)p[2], (int32_t*)p[3], (float*)p[4], (int32_t*)p[5], (T*)p[6]",
        f"int NQ = {nq}, int NKV = {nkv}, int HD = {head_dim}", dtype)


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
    run_kernel(lib, q.shape[0] * q.shape[1], q, k, v, np.array([offset], dtype=np.int32),
               np.array([scale], dtype=np.float32), np.array([k.shape[2]], dtype=np.int32),
               out)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("batch, nq, nkv, head_dim, size",
                         [(1, 14, 2, 64, 3 * THREADS + 8), (3, 4, 4, 16, 3 * THREADS + 8),
                          (2, 4, 2, 16, 2 * THREADS + 40)])
def test_emulated_attention_equals_numpy(root, dtype, batch, nq, nkv, head_dim, size):
    """The last case: a batch of grouped heads, at another cache size than the others'."""
    lib = build_library(attend_source(nq, nkv, head_dim, dtype), root)
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
    lib = build_library(attend_source(2, 1, 8, np.float32), root)
    q = np.full((1, 2, 1, 8), 100.0, dtype=np.float32)
    k = np.full((1, 1, 8, 8), 100.0, dtype=np.float32)
    v = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    got = run_attend(lib, q, k, v, 0, 1.0)
    np.testing.assert_array_equal(got[0, :, 0], np.stack([v[0, 0, 0]] * 2))


K = 640  # inputs of the projections: threads 0-15 take two stretches of 8, the others one


def _rms(x: np.ndarray, nw: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * nw.astype(np.float64)


def _close(got: np.ndarray, want: np.ndarray, dtype: type) -> None:
    tolerance = 1e-5 if dtype == np.float32 else 3e-3
    scale = np.abs(want).max()
    np.testing.assert_allclose(got.astype(np.float64), want, atol=tolerance * scale, rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_emulated_matvec_add(root, dtype):
    """y = res + x @ w.T; 7 rows: the last block holds one."""
    batch, n = 3, 7
    rng = np.random.default_rng(1)
    x, w, res = (rng.normal(size=shape).astype(dtype)
                 for shape in [(batch, K), (n, K), (batch, n)])
    y = np.full((batch, n), np.nan, dtype=dtype)
    lib = build_library(kernel_source(
        "_MATVEC_ADD", "const TYPE* x, const TYPE* w, const TYPE* res, TYPE* y",
        "(T*)p[0], (T*)p[1], (T*)p[2], (T*)p[3]", f"int B = {batch}, int K = {K}, int N = {n}",
        dtype), root)
    run_kernel(lib, (n + 1) // 2, x, w, res, y)
    _close(y, res.astype(np.float64) + x.astype(np.float64) @ w.astype(np.float64).T, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_emulated_rms_swiglu(root, dtype):
    """silu(gate) * up of [gate | up] = rmsnorm(x) @ w.T."""
    batch, inter, eps = 2, 5, 1e-6
    rng = np.random.default_rng(2)
    x = rng.normal(size=(batch, K)).astype(dtype)
    nw = (1 + 0.3 * rng.normal(size=K)).astype(dtype)
    w = (0.05 * rng.normal(size=(2 * inter, K))).astype(dtype)
    act = np.full((batch, inter), np.nan, dtype=dtype)
    lib = build_library(kernel_source(
        "_RMS_SWIGLU", "const TYPE* x, const TYPE* nw, const float* eps, const TYPE* w, "
        "TYPE* act", "(T*)p[0], (T*)p[1], (float*)p[2], (T*)p[3], (T*)p[4]",
        f"int B = {batch}, int K = {K}, int I = {inter}", dtype), root)
    run_kernel(lib, inter, x, nw, np.array([eps], dtype=np.float32), w, act)
    gate, up = np.split(_rms(x, nw, eps) @ w.astype(np.float64).T, 2, axis=-1)
    _close(act, gate / (1 + np.exp(-gate)) * up, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_emulated_rms_qkv_rope(root, dtype):
    """Queries, keys and values of rmsnorm(x) @ w.T + bias, queries and keys rotated for the
    position (rope over the whole head, its halves paired); values not rotated."""
    batch, hd, nq, nkv, eps, offset, base = 2, 16, 4, 2, 1e-6, 37, 10000.0
    rng = np.random.default_rng(3)
    rows = (nq + 2 * nkv) * hd
    x = rng.normal(size=(batch, K)).astype(dtype)
    nw = (1 + 0.3 * rng.normal(size=K)).astype(dtype)
    w = (0.05 * rng.normal(size=(rows, K))).astype(dtype)
    bias = rng.normal(size=rows).astype(dtype)
    inv_freq = np.array(rope_frequencies(hd, base))  # what the decoding step passes
    q, k, v = (np.full((batch, heads, hd), np.nan, dtype=dtype) for heads in (nq, nkv, nkv))
    lib = build_library(kernel_source(
        "_RMS_QKV_ROPE", "const TYPE* x, const TYPE* nw, const float* eps, const TYPE* w, "
        "const TYPE* bias, const int32_t* offset, const float* inv_freq, TYPE* q, TYPE* k, "
        "TYPE* v", "(T*)p[0], (T*)p[1], (float*)p[2], (T*)p[3], (T*)p[4], (int32_t*)p[5], "
        "(float*)p[6], (T*)p[7], (T*)p[8], (T*)p[9]",
        f"int B = {batch}, int K = {K}, int HD = {hd}, int NQ = {nq}, int NKV = {nkv}",
        dtype), root)
    run_kernel(lib, rows // 2, x, nw, np.array([eps], dtype=np.float32), w, bias,
               np.array([offset], dtype=np.int32), inv_freq, q, k, v)
    heads = _rms(x, nw, eps) @ w.astype(np.float64).T + bias.astype(np.float64)
    heads = heads.reshape(batch, nq + 2 * nkv, hd)
    angle = offset * inv_freq.astype(np.float64)
    first, second = heads[..., : hd // 2], heads[..., hd // 2:]
    cos, sin = np.cos(angle), np.sin(angle)
    rotated = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    _close(q, rotated[:, :nq], dtype)
    _close(k, rotated[:, nq:nq + nkv], dtype)
    _close(v, heads[:, nq + nkv:], dtype)


def test_compact_drops_comments_indentation_and_blank_lines():
    """What MLX gets of a kernel's source (the emulated kernels above are compacted too)."""
    source = "#define A 8  // eight\n\n  // a comment line\n  int a = A;   \n    a += 1;\n"
    assert cuda_decode.compact(source) == "#define A 8\nint a = A;\na += 1;\n"


@pytest.mark.parametrize("offset, fails", [(0, False), (4, True)])
def test_emulator_stops_at_a_misaligned_vector_load(tmp_path, offset, fails):
    """A 16-byte load (ql_load8's) from an address that is not a multiple of 16 faults on a
    GPU; the emulated kernels stop there too (UBSan's alignment check), in a process of their
    own here: a float's offset from an aligned buffer fails, none passes."""
    source = f"""#include "cuda_emu.h"
{cuda_decode.compact(cuda_decode.VECTOR_LOADS)}
extern "C" float run() {{
  alignas(16) static float x[12] = {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}};
  float out[8];
  ql_load8(reinterpret_cast<const float*>(reinterpret_cast<const char*>(x) + {offset}), true,
           out);
  return out[0];
}}
"""
    lib = build_library(source, tmp_path)
    script = (f"import ctypes; lib = ctypes.CDLL({lib._name!r}); "
              "lib.run.restype = ctypes.c_float; print(lib.run())")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (proc.returncode != 0) == fails, proc.stderr[-2000:]
    if fails:
        assert "misaligned" in proc.stderr
    else:
        assert proc.stdout.strip() == "0.0"
