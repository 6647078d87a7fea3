"""Fused CUDA kernels for one decoding step on MLX's CUDA backend.

Decoding a token on a GPU is bound by host time: MLX spends microseconds of CPU per
operation, more than the kernels take (H100: ~2.3 ms a token, of which ~0.4 ms on the
device). Between two attention calls a layer runs ~10 kernels (norms, matmuls, bias, rope,
residual adds, SwiGLU) even compiled; here it runs four, of three kinds, each a
matrix-vector product with its neighbours folded in:

- `rms_qkv_rope`: RMSNorm, the fused q/k/v projection with its bias, rope of queries and keys;
- `matvec_add`: a projection plus the residual (attention output and down projection);
- `rms_swiglu`: RMSNorm, the fused gate/up projection and silu(gate) * up.

One block of threads computes two output rows (a rope pair, a gate/up pair) for every
sequence of the batch, its threads splitting the dot products, accumulating in float32;
weights are read once per step. Used by `DecodeStep` for models
whose projections are fused (`Model.fuse_projections`), plain (not LoRA, not quantized) and
in half precision; anything else keeps the compiled MLX operations, as does
`QWEN_LORA_CUDA_KERNELS=off`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re

import mlx.core as mx
import mlx.nn as nn

from qwen_lora.backend import OFF_VALUES
from qwen_lora.model import GATE_UP_PARTS, QKV_PARTS

MAX_BATCH = 8  # sequences per kernel call; larger batches keep MLX's matmuls
THREADS = 128  # per block (QL_THREADS in the kernels)
HALF_TYPES = (mx.float16, mx.bfloat16)

# Eight values at p as floats; `vec` (p 16-byte aligned): with one 16-byte load of half-
# precision values, two of floats. Shared with qwen_lora.cuda_sampling's kernel.
VECTOR_LOADS = """
template <typename T>
__device__ inline void ql_load8(const T* p, bool vec, float* out) {
  if (vec) {
    uint4 raw[sizeof(T) / 2];
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(T) / 2); ++i) {
      raw[i] = reinterpret_cast<const uint4*>(p)[i];
    }
    const T* v = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = static_cast<float>(v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = static_cast<float>(p[j]);
  }
}

__device__ inline bool ql_aligned(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}
"""

_HEADER = VECTOR_LOADS + """
#define QL_THREADS THREADS  // a block: its threads split the dot products' K between them

// This thread's share, over K, of three sums per sequence b of x (B, K):
// acc[b] = sum x^2, acc[B + b] = dot(w0, x * nw), acc[2B + b] = dot(w1, x * nw)
// (x alone without NORM).
template <typename T, int B, int K, bool NORM>
__device__ inline void ql_partials(const T* w0, const T* w1, const T* x, const T* nw,
                                   bool vec, float* acc) {
#pragma unroll
  for (int i = 0; i < 3 * B; ++i) acc[i] = 0.f;
  for (int k = threadIdx.x * 8; k < K; k += QL_THREADS * 8) {
    float u[8], v[8], n[8];
    ql_load8(w0 + k, vec, u);
    ql_load8(w1 + k, vec, v);
    if (NORM) ql_load8(nw + k, vec, n);
#pragma unroll
    for (int b = 0; b < B; ++b) {
      float xs[8];
      ql_load8(x + b * K + k, vec, xs);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (NORM) acc[b] += xs[j] * xs[j];
        float xj = NORM ? xs[j] * n[j] : xs[j];
        acc[B + b] += u[j] * xj;
        acc[2 * B + b] += v[j] * xj;
      }
    }
  }
}

// The maximum of v over the block's threads; every thread gets it.
__device__ inline float ql_block_max(float v) {
  __shared__ float part[QL_THREADS / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  v = part[0];
#pragma unroll
  for (int w = 1; w < QL_THREADS / 32; ++w) v = fmaxf(v, part[w]);
  return v;
}

// Sums each of the N values over the block's threads; every thread gets the totals.
template <int N>
__device__ inline void ql_block_sum(float* v) {
  __shared__ float part[QL_THREADS / 32][N];
  int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = v[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) part[warp][i] = s;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < QL_THREADS / 32; ++w) s += part[w][i];
    v[i] = s;
  }
}
"""

# y (B, N) = res + x (B, K) @ w (N, K)^T; one block per pair of rows.
_MATVEC_ADD = """
  int r0 = 2 * blockIdx.x, r1 = min(r0 + 1, N - 1);
  bool vec = ql_aligned(x) && ql_aligned(w);
  float acc[3 * B];
  ql_partials<T, B, K, false>(w + (size_t)r0 * K, w + (size_t)r1 * K, x, x, vec, acc);
  ql_block_sum<2 * B>(acc + B);  // no norm: the sums of squares stay unused
  int b = threadIdx.x;
  if (b < B) {
    y[b * N + r0] = static_cast<T>(acc[B + b] + static_cast<float>(res[b * N + r0]));
    if (r1 != r0) {
      y[b * N + r1] = static_cast<T>(acc[2 * B + b] + static_cast<float>(res[b * N + r1]));
    }
  }
"""

# act (B, I) = silu(g) * u with [g | u] = rmsnorm(x) @ w^T, w (2I, K); one block per i.
_RMS_SWIGLU = """
  int i = blockIdx.x;
  bool vec = ql_aligned(x) && ql_aligned(w) && ql_aligned(nw);
  float acc[3 * B];
  ql_partials<T, B, K, true>(w + (size_t)i * K, w + (size_t)(i + I) * K, x, nw, vec, acc);
  ql_block_sum<3 * B>(acc);
  int b = threadIdx.x;
  if (b < B) {
    float rinv = rsqrtf(acc[b] / K + eps[0]);
    float gate = acc[B + b] * rinv, up = acc[2 * B + b] * rinv;
    act[b * I + i] = static_cast<T>(gate / (1.f + expf(-gate)) * up);
  }
"""

# q, k, v (B, heads, 1, HD) = rmsnorm(x) @ w^T + bias, queries and keys rotated for position
# offset[0] (rope over the whole head, halves paired); one block per pair (p, p + HD / 2).
_RMS_QKV_ROPE = """
  constexpr int HALF = HD / 2;
  int head = blockIdx.x / HALF, p = blockIdx.x % HALF;
  int r0 = head * HD + p, r1 = r0 + HALF;
  bool vec = ql_aligned(x) && ql_aligned(w) && ql_aligned(nw);
  float acc[3 * B];
  ql_partials<T, B, K, true>(w + (size_t)r0 * K, w + (size_t)r1 * K, x, nw, vec, acc);
  ql_block_sum<3 * B>(acc);
  int b = threadIdx.x;
  if (b >= B) return;
  float c = 1.f, s = 0.f;
  if (head < NQ + NKV) sincosf(static_cast<float>(offset[0]) * inv_freq[p], &s, &c);
  float rinv = rsqrtf(acc[b] / K + eps[0]);
  float y0 = acc[B + b] * rinv + static_cast<float>(bias[r0]);
  float y1 = acc[2 * B + b] * rinv + static_cast<float>(bias[r1]);
  T* out;
  if (head < NQ) out = q + (b * NQ + head) * HD;
  else if (head < NQ + NKV) out = k + (b * NKV + head - NQ) * HD;
  else out = v + (b * NKV + head - NQ - NKV) * HD;
  out[p] = static_cast<T>(y0 * c - y1 * s);
  out[p + HALF] = static_cast<T>(y1 * c + y0 * s);
"""

# out (B, NQ, 1, HD) = softmax(scale * q k^T) v over the keys and values at positions
# 0..offset[0] of the caches k, v (B, NKV, cache_size[0], HD): the size is read at run time, so
# that caches of every size share one compiled kernel; one block per (sequence, query head). Each
# thread keeps a running softmax (max, sum, weighted values) over the positions
# threadIdx.x + j * QL_THREADS; the block then rescales the threads' sums to the common
# maximum and adds them.
_ATTEND = """
  int b = blockIdx.x / NQ, h = blockIdx.x % NQ;
  int length = offset[0] + 1;
  size_t cache = (static_cast<size_t>(b) * NKV + h / (NQ / NKV)) * cache_size[0] * HD;
  const T* kb = k + cache;
  const T* vb = v + cache;
  __shared__ float qs[HD];
  for (int d = threadIdx.x; d < HD; d += QL_THREADS) {
    qs[d] = static_cast<float>(q[(b * NQ + h) * HD + d]) * scale[0];
  }
  __syncthreads();
  bool vec = ql_aligned(kb) && ql_aligned(vb);
  float peak = -3.0e38f, acc[HD + 1];  // acc[HD]: the sum of the exponentials
#pragma unroll
  for (int d = 0; d <= HD; ++d) acc[d] = 0.f;
  for (int t = threadIdx.x; t < length; t += QL_THREADS) {
    float score = 0.f, part[8];
#pragma unroll
    for (int d = 0; d < HD; d += 8) {
      ql_load8(kb + static_cast<size_t>(t) * HD + d, vec, part);
#pragma unroll
      for (int j = 0; j < 8; ++j) score += qs[d + j] * part[j];
    }
    float now = fmaxf(peak, score);
    float shrink = expf(peak - now), p = expf(score - now);
    peak = now;
#pragma unroll
    for (int d = 0; d < HD; d += 8) {
      ql_load8(vb + static_cast<size_t>(t) * HD + d, vec, part);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[d + j] = acc[d + j] * shrink + p * part[j];
    }
    acc[HD] = acc[HD] * shrink + p;
  }
  float shrink = expf(peak - ql_block_max(peak));
#pragma unroll
  for (int d = 0; d <= HD; ++d) acc[d] *= shrink;
  ql_block_sum<HD + 1>(acc);
  if (threadIdx.x == 0) {
    T* o = out + (b * NQ + h) * HD;
#pragma unroll
    for (int d = 0; d < HD; ++d) o[d] = static_cast<T>(acc[d] / acc[HD]);
  }
"""


def compact(source: str) -> str:
    """CUDA source without its comments, indentation and blank lines. MLX copies a custom
    kernel's source into every call's operation: on an H100 (MLX 0.32.4) a trivial kernel
    with a 19 kB header took 14.9 us a call, 8.8 us without one. Our kernels' sources hold
    no string literals and no block comments, which this does not parse."""
    lines = (re.sub(r"//.*", "", line).strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def hashed_kernel(name: str, inputs: list[str], outputs: list[str], source: str,
                  header: str) -> object:
    """`mx.fast.cuda_kernel` of the compacted source, named after a hash of it: MLX caches
    compiled kernels on disk by name (the name plus the template values; MLX_PTX_CACHE_DIR,
    else under the temporary directory), not by code, so an edited kernel must not reuse
    the name."""
    source, header = compact(source), compact(header)
    digest = hashlib.sha256((header + source).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"qwen_lora_{name}_{digest}", input_names=inputs,
                               output_names=outputs, source=source, header=header)


@functools.cache
def _kernels() -> dict[str, object]:
    header = _HEADER.replace("QL_THREADS THREADS", f"QL_THREADS {THREADS}")

    def make(name: str, inputs: list[str], outputs: list[str], source: str) -> object:
        return hashed_kernel(name, inputs, outputs, source, header)

    return {
        "matvec_add": make("matvec_add", ["x", "w", "res"], ["y"], _MATVEC_ADD),
        "rms_swiglu": make("rms_swiglu", ["x", "nw", "eps", "w"], ["act"], _RMS_SWIGLU),
        "rms_qkv_rope": make("rms_qkv_rope",
                             ["x", "nw", "eps", "w", "bias", "offset", "inv_freq"],
                             ["q", "k", "v"], _RMS_QKV_ROPE),
        "attend": make("attend", ["q", "k", "v", "offset", "scale", "cache_size"], ["out"],
                       _ATTEND),
    }


def _launch(name: str, inputs: list[mx.array], blocks: int, outputs: list[tuple],
            dtype: mx.Dtype, **constants: int) -> list[mx.array]:
    return _kernels()[name](
        inputs=inputs, template=[("T", dtype), *constants.items()],
        grid=(blocks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=outputs, output_dtypes=[dtype] * len(outputs))


def available() -> bool:
    """Whether MLX computes on a CUDA GPU here and QWEN_LORA_CUDA_KERNELS does not turn the
    kernels off."""
    return _cuda_backend() and _off_reason() is None  # no CUDA: no environment lookup


def status() -> str:
    """Whether the kernels are available, or why they are off (`qwen-lora info`)."""
    reason = _off_reason()
    if reason:
        return f"off ({reason})"
    return f"available (fused half-precision models, batches up to {MAX_BATCH})"


def _off_reason() -> str | None:
    if os.environ.get("QWEN_LORA_CUDA_KERNELS", "").lower() in OFF_VALUES:
        return "QWEN_LORA_CUDA_KERNELS"
    if not _cuda_backend() or mx.default_device().type != mx.DeviceType.gpu:
        return "MLX does not compute on a CUDA GPU here"
    return None


@functools.cache
def _cuda_backend() -> bool:
    """Whether MLX has its CUDA backend and a GPU (fixed for the process; asked once, since
    samplers ask on every token)."""
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available()


def supports(layer: nn.Module) -> bool:
    """Whether the kernels can run `layer`: fused, plain projections in half precision, with
    input sizes that are multiples of 8 (the kernels read 8 values at a time, unchecked)."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = [attn.get("qkv_proj"), attn.get("o_proj"), mlp.get("gate_up_proj"),
               mlp.get("down_proj")]
    # Beside a fused matmul, q/k/v or gate/up are LoRA adapters on its slices.
    adapted = any(n in attn for n in QKV_PARTS) or any(n in mlp for n in GATE_UP_PARTS)
    if adapted or not all(type(p) is nn.Linear for p in linears):
        return False
    qkv, o_proj, gate_up, down = linears
    dtype = qkv.weight.dtype
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return (dtype in HALF_TYPES
            and all(p.weight.dtype == dtype for p in linears)
            and all(type(n) is nn.RMSNorm and n.weight.dtype == dtype for n in norms)
            and "bias" in qkv and "bias" not in o_proj and "bias" not in gate_up
            and "bias" not in down
            and attn.head_dim % 2 == 0
            and qkv.bias.dtype == dtype
            and all(p.weight.shape[1] % 8 == 0 for p in linears))


def _rows(x: mx.array, batch: int, features: int, dtype: mx.Dtype) -> mx.array:
    """x, read by a kernel as (batch, features) rows, in the kernels' type.

    Not reshaped: the kernels take a row-contiguous input's memory as it is (MLX copies
    others first), and each reshape would be one more node of the graph for MLX to
    dispatch, at microseconds of host time, where decoding is bound by host time.
    """
    if batch > MAX_BATCH:
        raise ValueError(f"the kernels take at most {MAX_BATCH} sequences, got {batch}")
    if x.shape[0] != batch or x.size != batch * features:
        raise ValueError(f"expected {batch} rows of {features} values, got shape "
                         f"{tuple(x.shape)}")
    return x.astype(dtype)  # no graph node where x already has the type


def matvec_add(x: mx.array, linear: nn.Linear, res: mx.array) -> mx.array:
    """res + linear(x) for one position per sequence: x (batch, 1, K) or attention's output
    (batch, heads, 1, head_dim), res (batch, 1, N)."""
    batch, (n, k) = x.shape[0], linear.weight.shape
    dtype = linear.weight.dtype
    (y,) = _launch("matvec_add", [_rows(x, batch, k, dtype), linear.weight,
                                  _rows(res, batch, n, dtype)],
                   (n + 1) // 2, [(batch, 1, n)], dtype, B=batch, K=k, N=n)
    return y


def _norm_inputs(norm: nn.RMSNorm, features: int) -> tuple[mx.array, mx.array]:
    if norm.weight.size != features:
        raise ValueError(f"the norm has {norm.weight.size} weights, the projection takes "
                         f"{features} features")
    return norm.weight, mx.array([norm.eps], dtype=mx.float32)


def rms_swiglu(x: mx.array, norm: nn.RMSNorm, gate_up: nn.Linear) -> mx.array:
    """silu(gate) * up of `gate_up(norm(x))` for x (batch, 1, K)."""
    batch, (rows, dim) = x.shape[0], gate_up.weight.shape
    hidden = rows // 2
    dtype = gate_up.weight.dtype
    (act,) = _launch("rms_swiglu", [_rows(x, batch, dim, dtype), *_norm_inputs(norm, dim),
                                    gate_up.weight],
                     hidden, [(batch, 1, hidden)], dtype, B=batch, K=dim, I=hidden)
    return act


def rms_qkv_rope(x: mx.array, norm: nn.RMSNorm, attn: nn.Module, offset: mx.array,
                 inv_freq: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Queries, keys and values (batch, heads, 1, head_dim) of `attn.qkv_proj(norm(x))`,
    queries and keys rotated for position `offset` (an int32 array of one value)."""
    if offset.size != 1:
        raise ValueError(f"offset must hold one position, got shape {tuple(offset.shape)}")
    batch, dim = x.shape[0], attn.qkv_proj.weight.shape[1]
    hd, nq, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    dtype = attn.qkv_proj.weight.dtype
    inputs = [_rows(x, batch, dim, dtype), *_norm_inputs(norm, dim), attn.qkv_proj.weight,
              attn.qkv_proj.bias, offset.astype(mx.int32), inv_freq]
    shapes = [(batch, nq, 1, hd), (batch, nkv, 1, hd), (batch, nkv, 1, hd)]
    q, k, v = _launch("rms_qkv_rope", inputs, (nq + 2 * nkv) * hd // 2, shapes, dtype,
                      B=batch, K=dim, HD=hd, NQ=nq, NKV=nkv)
    return q, k, v


def attend(q: mx.array, keys: mx.array, values: mx.array, offset: mx.array,
           scale: float) -> mx.array:
    """Attention of one query position per sequence, q (batch, heads, 1, head_dim), over the
    cache positions 0..offset (an int32 array of one value) of keys and values (batch,
    kv_heads, size, head_dim): `mx.fast.scaled_dot_product_attention(q, keys[..., :offset + 1,
    :], values[..., :offset + 1, :], scale=scale)`, with the length read on the device, so
    that a compiled function takes the whole preallocated cache (fixed shapes) as it grows."""
    batch, nq, length, hd = q.shape
    _, nkv, size, _ = keys.shape
    if length != 1 or values.shape != keys.shape or keys.shape[::3] != (batch, hd):
        raise ValueError(f"expected one query position and caches of its batch and head size, "
                         f"got q {tuple(q.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}")
    if nq % nkv or hd % 8:
        raise ValueError(f"query heads ({nq}) must be a multiple of key/value heads ({nkv}), "
                         f"and head_dim ({hd}) of 8")
    if offset.size != 1:
        raise ValueError(f"offset must hold one position, got shape {tuple(offset.shape)}")
    dtype = keys.dtype
    inputs = [q.astype(dtype), keys, values.astype(dtype), offset.astype(mx.int32),
              mx.array([scale], dtype=mx.float32), mx.array([size], dtype=mx.int32)]
    (out,) = _launch("attend", inputs, batch * nq, [(batch, nq, 1, hd)], dtype,
                     NQ=nq, NKV=nkv, HD=hd)
    return out
