"""Temperature, top-k and top-p sampling in one CUDA kernel, for MLX's CUDA backend.

MLX's top-p sorts the vocabulary (151,936 logits) and runs a dozen operations around the
sort: ~0.46 ms a token on an H100, 17% of a decoding forward pass, where each evaluated
operation costs microseconds of host time. Here one block of threads per row does it all
in a few passes over the row, without sorting:

- the row's maximum, then each thread's sum of weights exp((x - max) / temperature);
- top-k: the k-th largest logit by a radix select (four passes of 256-bin histograms);
- top-p by rejection: a token drawn from the whole distribution (inverse transform over
  the threads' prefix sums) is in the nucleus exactly when the tokens likelier than it hold
  less than top_p of the mass, so a draw is kept with probability >= top_p. After `TRIES`
  misses (a tiny top_p over a flat distribution) a radix select over the weights finds the
  nucleus' smallest logit and the draw is made inside it.

Tokens tied with the nucleus' (or the k-th) last token belong to it, as in `Sampler`'s other
implementations. Random numbers come from a counter-based hash of the sampler's key, row and
draw; the kernel also returns the next key, so a call is one kernel and nothing else.

`Sampler`'s default on MLX's CUDA backend (`backend="cuda"`). Also tested without a GPU by
tests/test_cuda_sampling_emulated.py (this source run on the CPU with emulated threads).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from qwen_lora.cuda_decode import hashed_kernel

THREADS = 512  # per block: one block per row
TRIES = 8  # rejection draws of top-p before the exact selection

_HEADER = """
#define QS_THREADS THREADS
#define QS_WARPS (QS_THREADS / 32)

// Float order as unsigned order (negative numbers reversed), for radix selection.
__device__ inline unsigned qs_key(float f) {
  unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ inline unsigned long long qs_mix(unsigned long long z) {  // splitmix64
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A uniform number in [0, 1) for draw `idx` of `row`, from the 64-bit key.
__device__ inline float qs_uniform(unsigned long long key, unsigned row, unsigned idx) {
  unsigned long long h = qs_mix(qs_mix(key) ^ ((static_cast<unsigned long long>(row) << 32) | idx));
  return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
}

struct QsAdd { __device__ float operator()(float a, float b) const { return a + b; } };
struct QsMax { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// Reduces v over the block; every thread gets the result.
template <typename Op>
__device__ inline float qs_reduce(float v, Op op) {
  __shared__ float part[QS_WARPS];
  __shared__ float result;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = part[0];
    for (int w = 1; w < QS_WARPS; ++w) r = op(r, part[w]);
    result = r;
  }
  __syncthreads();
  float r = result;
  __syncthreads();
  return r;
}

// The sum of v over the threads before this one (in thread order), and over all of them.
__device__ inline float qs_exclusive_scan(float v, float* total) {
  __shared__ float part[QS_WARPS];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    float n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  float excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.f;
  if (lane == 31) part[warp] = incl;
  __syncthreads();
  float before = 0.f, all = 0.f;
  for (int w = 0; w < QS_WARPS; ++w) {
    if (w == warp) before = all;
    all += part[w];
  }
  __syncthreads();
  *total = all;
  return before + excl;
}

// The weight of logit v: exp((v - m) * scale) where its key is >= kmin, else 0.
__device__ inline float qs_weight(float v, float m, float scale, unsigned kmin) {
  return qs_key(v) >= kmin ? expf((v - m) * scale) : 0.f;
}

// The largest key t such that the weight of the keys >= t (of those >= kmin) reaches goal:
// the count of them with COUNT, else their exp weights. Four passes of 256-bin histograms.
template <typename T, int V, bool COUNT>
__device__ unsigned qs_select(const T* x, float m, float scale, unsigned kmin, float goal) {
  __shared__ float hist[256];
  __shared__ unsigned chosen_prefix;
  __shared__ float chosen_above;
  unsigned prefix = 0;
  float above = 0.f;  // weight of the keys above the prefix's subtree
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int j = threadIdx.x; j < 256; j += QS_THREADS) hist[j] = 0.f;
    __syncthreads();
    unsigned high = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (int i = threadIdx.x; i < V; i += QS_THREADS) {
      float v = static_cast<float>(x[i]);
      unsigned k = qs_key(v);
      if (k >= kmin && (k & high) == prefix) {
        atomicAdd(&hist[(k >> shift) & 255u], COUNT ? 1.f : expf((v - m) * scale));
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      int lane = threadIdx.x;
      float bins[8], sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        bins[j] = hist[8 * lane + j];
        sum += bins[j];
      }
      float suffix = sum;  // the weight of this lane's bins and all higher ones
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        float n = __shfl_down_sync(0xffffffffu, suffix, o);
        if (lane + o < 32) suffix += n;
      }
      unsigned ok = __ballot_sync(0xffffffffu, above + suffix >= goal);
      int top = ok ? 31 - __clz(ok) : 0;  // rounding left nothing: keep everything below
      if (lane == top) {
        float run = above + suffix - sum;  // the weight of the higher lanes' bins
        int j = 7;
        for (; j > 0 && run + bins[j] < goal; --j) run += bins[j];
        chosen_prefix = prefix | (static_cast<unsigned>(8 * lane + j) << shift);
        chosen_above = run;
      }
    }
    __syncthreads();
    prefix = chosen_prefix;
    above = chosen_above;
    __syncthreads();
  }
  return prefix;
}

// This thread's sum of weights (keys >= kmin), its exclusive prefix and the row's total.
template <typename T, int V>
__device__ inline float qs_sums(const T* x, float m, float scale, unsigned kmin, float* mine,
                                float* total) {
  float s = 0.f;
  for (int i = threadIdx.x; i < V; i += QS_THREADS) {
    s += qs_weight(static_cast<float>(x[i]), m, scale, kmin);
  }
  *mine = s;
  return qs_exclusive_scan(s, total);
}

// The index where the running sum of weights (keys >= kmin, in the threads' order) passes
// target: the thread whose range holds target walks its elements.
template <typename T, int V>
__device__ int qs_pick(const T* x, float m, float scale, unsigned kmin, float mine,
                       float before, float target) {
  __shared__ int picked;
  float owner = qs_reduce(mine > 0.f && before <= target ? static_cast<float>(threadIdx.x)
                                                          : -1.f, QsMax());
  if (owner < 0.f) return 0;  // no positive weight (NaN logits): a valid index all the same
  if (threadIdx.x == static_cast<int>(owner)) {
    float run = before;
    int pick = -1;
    for (int i = threadIdx.x; i < V; i += QS_THREADS) {
      float e = qs_weight(static_cast<float>(x[i]), m, scale, kmin);
      if (e > 0.f) {
        pick = i;  // the last positive weight, if rounding keeps run from passing target
        run += e;
        if (run > target) break;
      }
    }
    picked = pick;
  }
  __syncthreads();
  int r = picked;
  __syncthreads();
  return r;
}
"""

# token (B,) from logits (B, V); params = [1 / temperature, top_p]; key (2,) uint32 -> next_key.
_SAMPLE = """
  const T* x = logits + static_cast<size_t>(blockIdx.x) * V;
  unsigned long long seed = (static_cast<unsigned long long>(key[0]) << 32) | key[1];
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    unsigned long long next = qs_mix(seed ^ 0xD1B54A32D192ED03ull);
    next_key[0] = static_cast<unsigned>(next >> 32);
    next_key[1] = static_cast<unsigned>(next);
  }
  float scale = params[0], top_p = params[1];
  float m = __int_as_float(0xff800000);  // -inf
  for (int i = threadIdx.x; i < V; i += QS_THREADS) m = fmaxf(m, static_cast<float>(x[i]));
  m = qs_reduce(m, QsMax());
  unsigned kmin = 0u;
  if (TOPK > 0) kmin = qs_select<T, V, true>(x, m, scale, 0u, static_cast<float>(TOPK));
  float mine, total;
  float before = qs_sums<T, V>(x, m, scale, kmin, &mine, &total);
  int token = -1;
  if (top_p >= 1.f) {
    token = qs_pick<T, V>(x, m, scale, kmin, mine, before,
                          qs_uniform(seed, blockIdx.x, 0) * total);
  } else {
    for (int t = 0; t < TRIES && token < 0; ++t) {
      int c = qs_pick<T, V>(x, m, scale, kmin, mine, before,
                            qs_uniform(seed, blockIdx.x, t) * total);
      unsigned kc = qs_key(static_cast<float>(x[c]));
      float likelier = 0.f;
      for (int i = threadIdx.x; i < V; i += QS_THREADS) {
        float v = static_cast<float>(x[i]);
        if (qs_key(v) > kc) likelier += qs_weight(v, m, scale, kmin);
      }
      likelier = qs_reduce(likelier, QsAdd());
      // the most likely tokens always belong (a top_p that rounds to 0 keeps them)
      if (likelier < top_p * total || likelier == 0.f) token = c;
    }
    if (token < 0) {
      kmin = qs_select<T, V, false>(x, m, scale, kmin, fmaxf(top_p * total, 1e-30f));
      before = qs_sums<T, V>(x, m, scale, kmin, &mine, &total);
      token = qs_pick<T, V>(x, m, scale, kmin, mine, before,
                            qs_uniform(seed, blockIdx.x, TRIES) * total);
    }
  }
  if (threadIdx.x == 0) tokens[blockIdx.x] = token;
"""

DTYPES = (mx.float16, mx.bfloat16, mx.float32)


@functools.cache
def _kernel() -> object:
    header = _HEADER.replace("QS_THREADS THREADS", f"QS_THREADS {THREADS}")
    return hashed_kernel("sample", ["logits", "key", "params"], ["tokens", "next_key"],
                         _SAMPLE, header)


def sample(logits: mx.array, key: mx.array, params: mx.array, top_k: int = 0
           ) -> tuple[mx.array, mx.array]:
    """(tokens (batch,) int32, next key) for logits (batch, vocab); `params` holds
    [1 / temperature, top_p] in float32, `key` is an MLX random key (2 uint32 values)."""
    if logits.ndim != 2 or logits.dtype not in DTYPES:
        raise ValueError(f"expected float logits of shape (batch, vocab), got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if key.shape != (2,) or key.dtype != mx.uint32:
        raise ValueError(f"expected a random key of 2 uint32 values, got {key.dtype} "
                         f"{tuple(key.shape)}")
    batch, vocab = logits.shape
    top_k = top_k if 0 < top_k < vocab else 0
    tokens, next_key = _kernel()(
        inputs=[logits, key, params],
        template=[("T", logits.dtype), ("V", vocab), ("TOPK", top_k), ("TRIES", TRIES)],
        grid=(batch * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(batch,), (2,)], output_dtypes=[mx.int32, mx.uint32])
    return tokens, next_key
