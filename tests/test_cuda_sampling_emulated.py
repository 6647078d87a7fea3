"""The CUDA sampling kernel's own source, run on the CPU (tests/cuda_emu.h: each thread a
fiber, barriers and warp shuffles emulated), against the brute-force distribution: what
tests/test_sampling.py checks on a GPU, checked everywhere g++ is. Blocks of 64 threads
(two warps) instead of 512, so that the block-wide scans and reductions still cross warps.
The distributions are slow tests (`make test-slow`, CI); one batch of rows is a fast one."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from emulated_cuda import CTYPES, build_library
from test_sampling import KERNEL_CASES, assert_drawn_from, expected_distribution

from qwen_lora import cuda_sampling
from qwen_lora.cuda_decode import compact

THREADS = 64
# Chunks of 64 logits keeping 16 candidates (24 slots): top-k over rows of more than 64
# logits goes in chunks, as over 151,936 in chunks of 2,048 on a GPU; shorter rows, top-k
# above 16 and the other strategies take the one-kernel path.
SIZES = dict(threads=THREADS, chunk_groups=8, candidates=16, slots=24)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def chunked(vocab: int, top_k: int) -> bool:
    return cuda_sampling.takes_chunks(vocab, top_k, SIZES["chunk_groups"], SIZES["candidates"])


def kernel_source(vocab: int, top_k: int, dtype: type = np.float32) -> str:
    """The kernels, compacted as MLX gets them, and a `run` that launches them as
    `cuda_sampling.sample` does: in chunks (two kernels) where the row takes them, else one."""
    ctype = CTYPES[dtype]
    if not chunked(vocab, top_k):
        return f"""#include "cuda_emu.h"
{compact(cuda_sampling.header(**SIZES))}
template <typename T, int V, int TOPK>
void qs_kernel(const T* logits, const uint32_t* key, const float* params, int32_t* tokens,
               uint32_t* next_key) {{
{compact(cuda_sampling._SAMPLE)}
}}

extern "C" int run(const void* logits, unsigned batch, const uint32_t* key,
                   const float* params, int32_t* tokens, uint32_t* next_key) {{
  bool ok = emu::launch(batch, {THREADS}, [&] {{
    qs_kernel<{ctype}, {vocab}, {top_k}>(static_cast<const {ctype}*>(logits), key, params,
                                         tokens, next_key);
  }});
  return ok ? 0 : 1;
}}
"""
    n = cuda_sampling.chunks(vocab, SIZES["chunk_groups"])
    return f"""#include "cuda_emu.h"
{compact(cuda_sampling.header(**SIZES))}
template <typename T, int V>
void chunk_kernel(const T* logits, unsigned* counts, float* cand, int* cand_idx) {{
{compact(cuda_sampling._CHUNK)}
}}

template <typename T, int V, int TOPK>
void chunked_kernel(const T* logits, const uint32_t* key, const float* params,
                    const unsigned* counts, const float* cand, const int* cand_idx,
                    int32_t* tokens, uint32_t* next_key) {{
{compact(cuda_sampling._CHUNKED)}
}}

extern "C" int run(const void* logits, unsigned batch, const uint32_t* key,
                   const float* params, int32_t* tokens, uint32_t* next_key) {{
  unsigned n = batch * {n};
  std::vector<unsigned> counts(n);
  std::vector<float> cand(n * {SIZES["slots"]});
  std::vector<int> cand_idx(n * {SIZES["slots"]});
  const {ctype}* x = static_cast<const {ctype}*>(logits);
  bool ok = emu::launch(n, {THREADS}, [&] {{
    chunk_kernel<{ctype}, {vocab}>(x, counts.data(), cand.data(), cand_idx.data());
  }});
  ok = ok && emu::launch(batch, {THREADS}, [&] {{
    chunked_kernel<{ctype}, {vocab}, {top_k}>(x, key, params, counts.data(), cand.data(),
                                             cand_idx.data(), tokens, next_key);
  }});
  return ok ? 0 : 1;
}}
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compiles (once per vocabulary size and top-k) the kernel into a shared library."""
    root = tmp_path_factory.mktemp("cuda-emu")
    libraries: dict[tuple, ctypes.CDLL] = {}

    def get(vocab: int, top_k: int, dtype: type = np.float32) -> ctypes.CDLL:
        at = (vocab, top_k, dtype)
        if at not in libraries:
            libraries[at] = build_library(kernel_source(*at), root)
        return libraries[at]

    return get


def run_kernel(lib: ctypes.CDLL, logits: np.ndarray, key: tuple[int, int],
               temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    if logits.dtype != np.float16:
        logits = logits.astype(np.float32)
    logits = np.ascontiguousarray(logits)
    batch = logits.shape[0]
    key_arr = np.array(key, dtype=np.uint32)
    params = np.array([1.0 / temperature, top_p], dtype=np.float32)
    tokens = np.full(batch, -7, dtype=np.int32)
    next_key = np.zeros(2, dtype=np.uint32)
    ptr = np.ctypeslib.as_ctypes
    status = lib.run(ctypes.c_void_p(logits.ctypes.data), ctypes.c_uint(batch), ptr(key_arr),
                     ptr(params), ptr(tokens), ptr(next_key))
    assert status == 0, "the kernel deadlocked: threads wait at a barrier others never reach"
    return tokens, next_key


HALF_CASES = ["top-p", "top-k-top-p", "temperature"]  # the 16-byte loads of half logits


@pytest.mark.slow  # 4-40 s a case: fibers switch thousands of times a row
@pytest.mark.parametrize("name, dtype", [(name, np.float32) for name in KERNEL_CASES]
                         + [(name, np.float16) for name in HALF_CASES])
def test_emulated_kernel_draws_from_the_expected_distribution(build, name, dtype):
    case = KERNEL_CASES[name]
    x = case["x"].astype(dtype)
    want = expected_distribution(x.astype(np.float32), case["temperature"], case["top_k"],
                                 case["top_p"])
    lib = build(len(x), case["top_k"], dtype)
    rows, calls = 300, 3
    counts = np.zeros(len(x), dtype=np.int64)
    key = (1, 2)
    for _ in range(calls):
        tokens, next_key = run_kernel(lib, np.tile(x, (rows, 1)), key, case["temperature"],
                                      case["top_p"])
        assert ((tokens >= 0) & (tokens < len(x))).all()
        counts += np.bincount(tokens, minlength=len(x))
        key = tuple(int(k) for k in next_key)
    assert_drawn_from(counts, want)


def test_emulated_cases_take_both_paths():
    """Top-k over rows in chunks (two kernels) and rows in one block each, among the cases."""
    paths = {name: chunked(len(case["x"]), case["top_k"]) for name, case in KERNEL_CASES.items()}
    assert paths["top-k"] and paths["top-k-top-p"] and paths["tied-chunks"]
    assert paths["k-at-candidates"] and paths["masked-chunks"]
    assert not paths["temperature"] and not paths["tied-k"] and not paths["wide-k"]


def test_emulated_kernel_rows_and_keys(build):
    """Rows are independent draws, a key repeats its draws, the next key differs."""
    x = np.random.default_rng(6).normal(size=(6, 130)).astype(np.float32)
    x[3] = -np.inf
    x[3, 17] = 0.0  # one finite logit: always that token
    lib = build(130, 0)
    a, next_a = run_kernel(lib, x, (5, 6), 0.8, 0.9)
    b, next_b = run_kernel(lib, x, (5, 6), 0.8, 0.9)
    c, _ = run_kernel(lib, x, (5, 7), 0.8, 0.9)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(next_a, next_b)
    assert not np.array_equal(a, c)
    assert tuple(next_a) != (5, 6)
    assert a[3] == 17
    for row, token in zip(x, a, strict=True):
        assert expected_distribution(row, 0.8, 0, 0.9)[token] > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernel_compiles_for_an_h100(tmp_path):
    """The kernel as MLX wraps it (its `inf` macro included), for each logits type, compiled
    by nvcc for sm_90: what a GPU would compile at the first call, checked without one
    (ptxas: 40-64 registers a thread, no spills; 512-thread blocks allow 128)."""
    source = f"""#include <cstdint>
#include <cooperative_groups.h>
#include <cuda/std/limits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define inf cuda::std::numeric_limits<float>::infinity()
{compact(cuda_sampling.header())}
template <typename T, int V, int TOPK>
__global__ void qs_kernel(const T* logits, const uint32_t* key, const float* params,
                          int32_t* tokens, uint32_t* next_key) {{
{compact(cuda_sampling._SAMPLE)}
}}
template <typename T, int V>
__global__ void chunk_kernel(const T* logits, unsigned* counts, float* cand, int* cand_idx) {{
{compact(cuda_sampling._CHUNK)}
}}
template <typename T, int V, int TOPK>
__global__ void chunked_kernel(const T* logits, const uint32_t* key, const float* params,
                               const unsigned* counts, const float* cand,
                               const int* cand_idx, int32_t* tokens, uint32_t* next_key) {{
{compact(cuda_sampling._CHUNKED)}
}}
template __global__ void qs_kernel<float, 151936, 0>(const float*, const uint32_t*,
    const float*, int32_t*, uint32_t*);
template __global__ void qs_kernel<__nv_bfloat16, 1000, 0>(const __nv_bfloat16*,
    const uint32_t*, const float*, int32_t*, uint32_t*);
template __global__ void chunk_kernel<__half, 151936>(const __half*, unsigned*, float*, int*);
template __global__ void chunked_kernel<__half, 151936, 50>(const __half*, const uint32_t*,
    const float*, const unsigned*, const float*, const int*, int32_t*, uint32_t*);
"""
    (tmp_path / "kernel.cu").write_text(source)
    proc = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "--Werror",
                           "all-warnings", "kernel.cu", "-o", "kernel.cubin"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
