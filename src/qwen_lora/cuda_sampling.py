"""Temperature, top-k and top-p sampling in one CUDA kernel of our own, for MLX's CUDA backend.

MLX's top-p sorts the vocabulary (151,936 logits) and runs a dozen operations around the
sort: ~0.46 ms a token on an H100, 17% of a decoding forward pass, where each evaluated
operation costs microseconds of host time. Here one thread-block cluster per row (`CLUSTER`
blocks, which read each other's shared memory) does it all in a few passes over the row,
without sorting; each thread reads groups of 8 logits (16-byte loads) and owns every
4,096th group of its row:

- one pass: the row's maximum and each thread's sum of weights 2^((x - max) log2(e) / T),
  online (a thread rescales its sum when its maximum grows), then a prefix sum over the row's
  threads;
- a draw (inverse transform): the thread whose prefix holds it is found by a reduction, and
  its warp walks that thread's groups, 32 at a time, with a warp prefix sum;
- top-k: the k-th largest logit by a radix select (four passes of 256-bin histograms, one
  shared-memory atomic per distinct bin of a warp, the blocks' histograms summed);
- top-p by rejection: a drawn token is in the nucleus exactly when the tokens likelier than
  it hold less than top_p of the mass (one more pass), so a draw is kept with probability
  >= top_p. After `TRIES` misses (a tiny top_p over a flat distribution) a radix select over
  the weights finds the nucleus' smallest logit and the draw is made inside it.

Every block of a row computes the same reductions in the same order, so all take the same
decisions. Tokens tied with the nucleus' (or the k-th) last token belong to it, as in
`Sampler`'s other implementations. Random numbers come from a counter-based hash of the
sampler's key, row and draw; the kernel also returns the next key, so a call is one kernel and
nothing else. One block a row (no cluster) took 13.5 us for temperature, 30 for top-p and
47.5 + 32 (two kernels) for top-k at 151,936 float32 logits on an H100.

`Sampler`'s default on MLX's CUDA backend (`backend="cuda"`). Also tested without a GPU by
tests/test_cuda_sampling_emulated.py (this source run on the CPU with emulated threads and
clusters).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from qwen_lora.cuda_decode import VECTOR_LOADS, hashed_kernel

THREADS = 512  # per block
CLUSTER = 8  # blocks a row: a thread-block cluster (8 is the most every GPU with them allows)
TRIES = 8  # rejection draws of top-p before the exact selection

_HEADER = VECTOR_LOADS + """
#define QS_THREADS THREADS
#define QS_CLUSTER CLUSTER
#define QS_TRIES TRIES
#define QS_WARPS (QS_THREADS / 32)
#define QS_ROW_THREADS (QS_CLUSTER * QS_THREADS)  // a row's threads: its cluster's blocks'
#define QS_VEC 8  // a thread's elements come in groups of 8 (ql_load8): 16-byte loads
#define QS_FULL 0xffffffffu

#if QS_CLUSTER > 1
// MLX declares the kernel after this header: its blocks come in clusters of QS_CLUSTER, a
// size fixed at compile time, which an ordinary launch honours.
#undef __global__
#define __global__ __location__(global) __cluster_dims__(QS_CLUSTER, 1, 1)
#endif

__device__ inline int qs_rank() { return blockIdx.x % QS_CLUSTER; }  // the block in its row
__device__ inline int qs_row() { return blockIdx.x / QS_CLUSTER; }
__device__ inline int qs_tid() { return qs_rank() * QS_THREADS + threadIdx.x; }  // in the row

// A barrier of every thread of the row's blocks: the shared memory they wrote before it is
// visible to all of them after it.
__device__ inline void qs_row_sync() {
#if QS_CLUSTER > 1
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// The shared variable p of block `rank` of the row.
template <typename P>
__device__ inline P* qs_block(P* p, int rank) {
#if QS_CLUSTER > 1
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

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

// Reduces v over the row's threads; every thread gets the result (the blocks' results are
// combined in the same order in every block).
template <typename Op>
__device__ inline float qs_reduce(float v, Op op) {
  __shared__ float part[QS_WARPS];
  __shared__ float result;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(QS_FULL, v, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = part[0];
    for (int w = 1; w < QS_WARPS; ++w) r = op(r, part[w]);
    result = r;
  }
  qs_row_sync();
  float r = *qs_block(&result, 0);
  for (int b = 1; b < QS_CLUSTER; ++b) r = op(r, *qs_block(&result, b));
  qs_row_sync();  // every block has read `result` before any writes it again
  return r;
}

// The sum of v over the lanes up to this one (inclusive), within the warp.
__device__ inline float qs_warp_scan(float v) {
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    float n = __shfl_up_sync(QS_FULL, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// The sum of v over the row's threads before this one (in qs_tid order), and over all.
__device__ inline float qs_exclusive_scan(float v, float* total) {
  __shared__ float part[QS_WARPS];
  __shared__ float block_sum;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float incl = qs_warp_scan(v);
  if (lane == 31) part[warp] = incl;
  __syncthreads();
  float before = 0.f, all = 0.f;
  for (int w = 0; w < QS_WARPS; ++w) {
    if (w == warp) before = all;
    all += part[w];
  }
  if (threadIdx.x == 0) block_sum = all;
  qs_row_sync();
  float earlier = 0.f, row = 0.f;  // the blocks before this one, and all
  for (int b = 0; b < QS_CLUSTER; ++b) {
    if (b == qs_rank()) earlier = row;
    row += *qs_block(&block_sum, b);
  }
  qs_row_sync();
  *total = row;
  return earlier + before + incl - v;
}

// Thread t of the row owns the groups t, t + QS_ROW_THREADS, t + 2 QS_ROW_THREADS, ... of
// QS_VEC elements: each load of a warp is 512 contiguous bytes. Loads group g as floats,
// -inf past the row's end.
template <typename T, int V>
__device__ inline void qs_load(const T* x, int g, bool aligned, float* v) {
  int base = g * QS_VEC;
  if (base + QS_VEC <= V) {
    ql_load8(x + base, aligned, v);
  } else {
#pragma unroll
    for (int j = 0; j < QS_VEC; ++j) {
      v[j] = base + j < V ? static_cast<float>(x[base + j]) : __int_as_float(0xff800000);
    }
  }
}

#define QS_GROUPS(V) (((V) + QS_VEC - 1) / QS_VEC)
// A pass loads QS_UNROLL of a thread's groups before it uses any, so that more loads are in
// flight (about 10% less time a draw on an H100, with one block a row).
#define QS_UNROLL 4

// Groups g0, g0 + QS_ROW_THREADS, ... (QS_UNROLL of them) as floats; -inf past the row's
// end.
template <typename T, int V>
__device__ inline void qs_load_batch(const T* x, int g0, bool aligned,
                                     float (*v)[QS_VEC]) {
#pragma unroll
  for (int u = 0; u < QS_UNROLL; ++u) {
    int g = g0 + u * QS_ROW_THREADS;
    if (g < QS_GROUPS(V)) {
      qs_load<T, V>(x, g, aligned, v[u]);
    } else {
#pragma unroll
      for (int j = 0; j < QS_VEC; ++j) v[u][j] = __int_as_float(0xff800000);
    }
  }
}

// The weight of logit v: 2^((v - m) c) (c: log2(e) / temperature) where its key is >= kmin.
__device__ inline float qs_weight(float v, float m, float c, unsigned kmin) {
  return qs_key(v) >= kmin ? exp2f((v - m) * c) : 0.f;
}

// hist[bins[j]] += vals[j] for the bits j of `pending`, over the warp: one shared-memory
// atomic per distinct bin of the warp's elements, not one per element (logits crowd into a
// few bins of their top byte, where atomics on one address serialize: 4 ms a top-k over
// 151,936 logits on an H100 with one atomic per element).
__device__ inline void qs_hist_add(float* hist, unsigned pending, const unsigned* bins,
                                   const float* vals) {
  int lane = threadIdx.x & 31;
  unsigned todo = __ballot_sync(QS_FULL, pending != 0u);
  while (todo) {
    int leader = __ffs(todo) - 1;
    unsigned first = 0u;  // the bin of this lane's first pending element
#pragma unroll
    for (int j = QS_VEC - 1; j >= 0; --j) {
      if (pending & (1u << j)) first = bins[j];
    }
    unsigned b = __shfl_sync(QS_FULL, first, leader);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < QS_VEC; ++j) {
      if ((pending & (1u << j)) && bins[j] == b) {
        s += vals[j];
        pending &= ~(1u << j);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(QS_FULL, s, o);
    if (lane == leader) atomicAdd(&hist[b], s);
    todo = __ballot_sync(QS_FULL, pending != 0u);
  }
}

// The largest key t such that the weight of the keys >= t (of those >= kmin) reaches goal:
// the count of them with COUNT, else their weights. Four passes of 256-bin histograms, one
// a block, which every block sums.
template <typename T, int V, bool COUNT>
__device__ unsigned qs_select(const T* x, bool aligned, float m, float c, unsigned kmin,
                              float goal) {
  __shared__ float hist[256];
  __shared__ unsigned chosen_prefix;
  __shared__ float chosen_above;
  unsigned prefix = 0;
  float above = 0.f;  // weight of the keys above the prefix's subtree
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int j = threadIdx.x; j < 256; j += QS_THREADS) hist[j] = 0.f;
    __syncthreads();
    unsigned high = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    // the same trips for all lanes (qs_hist_add is a warp's)
    for (int g0 = 0; g0 < QS_GROUPS(V); g0 += QS_UNROLL * QS_ROW_THREADS) {
      float v[QS_UNROLL][QS_VEC];
      qs_load_batch<T, V>(x, g0 + qs_tid(), aligned, v);
#pragma unroll
      for (int u = 0; u < QS_UNROLL; ++u) {
        int g = g0 + qs_tid() + u * QS_ROW_THREADS;
        unsigned bins[QS_VEC], pending = 0u;
#pragma unroll
        for (int j = 0; j < QS_VEC; ++j) {
          unsigned k = g < QS_GROUPS(V) ? qs_key(v[u][j]) : 0u;
          bins[j] = (k >> shift) & 255u;
          if (g * QS_VEC + j < V && k >= kmin && (k & high) == prefix) {
            pending |= 1u << j;
            v[u][j] = COUNT ? 1.f : exp2f((v[u][j] - m) * c);
          }
        }
        qs_hist_add(hist, pending, bins, v[u]);
      }
    }
    qs_row_sync();
    if (threadIdx.x < 32) {
      int lane = threadIdx.x;
      float bins[8], sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        bins[j] = 0.f;
        for (int b = 0; b < QS_CLUSTER; ++b) bins[j] += qs_block(hist, b)[8 * lane + j];
        sum += bins[j];
      }
      float suffix = sum;  // the weight of this lane's bins and all higher ones
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        float n = __shfl_down_sync(QS_FULL, suffix, o);
        if (lane + o < 32) suffix += n;
      }
      unsigned ok = __ballot_sync(QS_FULL, above + suffix >= goal);
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
    qs_row_sync();  // every block has read the histograms before the next pass clears them
  }
  return prefix;
}

// One pass over the row: its maximum (of the keys >= kmin), returned, and this thread's sum
// of weights relative to it (`mine`), its exclusive prefix over the threads (`before`) and
// the row's total. An online maximum: each thread rescales its sum when its maximum
// grows.
template <typename T, int V>
__device__ inline float qs_sums(const T* x, bool aligned, float c, unsigned kmin,
                                float* mine, float* before, float* total) {
  const float ninf = __int_as_float(0xff800000);
  float m = ninf, s = 0.f;
  for (int g0 = qs_tid(); g0 < QS_GROUPS(V); g0 += QS_UNROLL * QS_ROW_THREADS) {
    float v[QS_UNROLL][QS_VEC];
    qs_load_batch<T, V>(x, g0, aligned, v);
    float gm = ninf;
#pragma unroll
    for (int u = 0; u < QS_UNROLL; ++u) {
#pragma unroll
      for (int j = 0; j < QS_VEC; ++j) {
        if (qs_key(v[u][j]) < kmin) v[u][j] = ninf;
        gm = fmaxf(gm, v[u][j]);
      }
    }
    if (gm == ninf) continue;
    if (gm > m) {
      s = m == ninf ? 0.f : s * exp2f((m - gm) * c);
      m = gm;
    }
#pragma unroll
    for (int u = 0; u < QS_UNROLL; ++u) {
#pragma unroll
      for (int j = 0; j < QS_VEC; ++j) s += exp2f((v[u][j] - m) * c);
    }
  }
  float row_max = qs_reduce(m, QsMax());
  s = m == ninf ? 0.f : s * exp2f((m - row_max) * c);
  *mine = s;
  *before = qs_exclusive_scan(s, total);
  return row_max;
}

// The index where the running sum of weights (keys >= kmin, in the threads' order) passes
// target: the warp of the thread whose range holds target walks that thread's groups, 32
// at a time, and its block tells the others.
template <typename T, int V>
__device__ int qs_pick(const T* x, bool aligned, float m, float c, unsigned kmin, float mine,
                       float before, float target) {
  __shared__ int picked;
  float owner_f = qs_reduce(mine > 0.f && before <= target ? static_cast<float>(qs_tid())
                                                            : -1.f, QsMax());
  if (owner_f < 0.f) return 0;  // no positive weight (NaN logits): a valid index all the same
  int owner = static_cast<int>(owner_f), lane = threadIdx.x & 31;
  const int owner_block = owner / QS_THREADS;
  if (qs_rank() == owner_block && (threadIdx.x >> 5) == ((owner % QS_THREADS) >> 5)) {
    float run = __shfl_sync(QS_FULL, before, owner & 31);
    int last = -1;  // the last positive weight, if rounding keeps run from passing target
    bool done = false;
    for (int k0 = 0; !done && owner + k0 * QS_ROW_THREADS < QS_GROUPS(V); k0 += 32) {
      int g = owner + (k0 + lane) * QS_ROW_THREADS;
      float w[QS_VEC], gs = 0.f;
      if (g < QS_GROUPS(V)) {
        qs_load<T, V>(x, g, aligned, w);
#pragma unroll
        for (int j = 0; j < QS_VEC; ++j) {
          w[j] = qs_weight(w[j], m, c, kmin);
          gs += w[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < QS_VEC; ++j) w[j] = 0.f;
      }
      float incl = qs_warp_scan(gs);
      unsigned cross = __ballot_sync(QS_FULL, gs > 0.f && run + incl > target);
      unsigned positive = __ballot_sync(QS_FULL, gs > 0.f);
      int at = cross ? __ffs(cross) - 1 : (positive ? 31 - __clz(positive) : -1);
      if (lane == at) {
        float r = run + incl - gs;
        for (int j = 0; j < QS_VEC; ++j) {
          if (w[j] > 0.f) {
            last = g * QS_VEC + j;
            r += w[j];
            if (cross && r > target) break;
          }
        }
      }
      last = __shfl_sync(QS_FULL, last, at < 0 ? 0 : at);
      done = cross != 0;
      run += __shfl_sync(QS_FULL, incl, 31);
    }
    if (lane == 0) picked = last;
  }
  qs_row_sync();
  int r = *qs_block(&picked, owner_block);
  qs_row_sync();
  return r < 0 ? 0 : r;
}

// The weight of the keys above kp (of those >= kmin): one pass over the row.
template <typename T, int V>
__device__ float qs_likelier(const T* x, bool aligned, float m, float c, unsigned kmin,
                             unsigned kp) {
  float likelier = 0.f;
  for (int g0 = qs_tid(); g0 < QS_GROUPS(V); g0 += QS_UNROLL * QS_ROW_THREADS) {
    float v[QS_UNROLL][QS_VEC];
    qs_load_batch<T, V>(x, g0, aligned, v);
#pragma unroll
    for (int u = 0; u < QS_UNROLL; ++u) {
#pragma unroll
      for (int j = 0; j < QS_VEC; ++j) {
        // -inf past the row's end: its key is below every other
        if (qs_key(v[u][j]) > kp) likelier += qs_weight(v[u][j], m, c, kmin);
      }
    }
  }
  return qs_reduce(likelier, QsAdd());
}

// A draw from the nucleus: the exact selection, for when QS_TRIES rejection draws missed.
template <typename T, int V>
__device__ int qs_nucleus_pick(const T* x, bool aligned, float m, float c, unsigned kmin,
                               float top_p, float total, unsigned long long seed) {
  float mine, before;
  kmin = qs_select<T, V, false>(x, aligned, m, c, kmin, fmaxf(top_p * total, 1e-30f));
  m = qs_sums<T, V>(x, aligned, c, kmin, &mine, &before, &total);
  return qs_pick<T, V>(x, aligned, m, c, kmin, mine, before,
                       qs_uniform(seed, qs_row(), QS_TRIES) * total);
}

// A token of row x (its index) drawn by the row's blocks: from the TOPK largest logits where
// TOPK > 0, from the nucleus of top_p where top_p < 1; c is log2(e) / temperature.
template <typename T, int V, int TOPK>
__device__ int qs_sample_row(const T* x, float c, float top_p, unsigned long long seed) {
  bool aligned = ql_aligned(x);
  unsigned kmin = 0u;
  if (TOPK > 0) kmin = qs_select<T, V, true>(x, aligned, 0.f, c, 0u, static_cast<float>(TOPK));
  float mine, before, total;
  float m = qs_sums<T, V>(x, aligned, c, kmin, &mine, &before, &total);
  if (top_p >= 1.f) {
    return qs_pick<T, V>(x, aligned, m, c, kmin, mine, before,
                         qs_uniform(seed, qs_row(), 0) * total);
  }
  for (int t = 0; t < QS_TRIES; ++t) {
    int pick = qs_pick<T, V>(x, aligned, m, c, kmin, mine, before,
                             qs_uniform(seed, qs_row(), t) * total);
    float likelier = qs_likelier<T, V>(x, aligned, m, c, kmin,
                                       qs_key(static_cast<float>(x[pick])));
    // the most likely tokens always belong (a top_p that rounds to 0 keeps them)
    if (likelier < top_p * total || likelier == 0.f) return pick;
  }
  return qs_nucleus_pick<T, V>(x, aligned, m, c, kmin, top_p, total, seed);
}

// The row's key and next key: the first block writes the next one.
__device__ inline unsigned long long qs_seed(const uint32_t* key, uint32_t* next_key) {
  unsigned long long seed = (static_cast<unsigned long long>(key[0]) << 32) | key[1];
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    unsigned long long next = qs_mix(seed ^ 0xD1B54A32D192ED03ull);
    next_key[0] = static_cast<unsigned>(next >> 32);
    next_key[1] = static_cast<unsigned>(next);
  }
  return seed;
}
"""

# token (B,) from logits (B, V); params = [1 / temperature, top_p]; key (2,) uint32 -> next_key.
# One cluster of blocks a row.
_SAMPLE = """
  unsigned long long seed = qs_seed(key, next_key);
  const T* x = logits + static_cast<size_t>(qs_row()) * V;
  int token = qs_sample_row<T, V, TOPK>(x, params[0] * 1.4426950408889634f, params[1], seed);
  if (qs_rank() == 0 && threadIdx.x == 0) tokens[qs_row()] = token;
"""


DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def header(threads: int = THREADS, cluster: int = CLUSTER) -> str:
    """The kernel's shared source at these sizes (the emulated tests take smaller ones)."""
    return (_HEADER.replace("QS_THREADS THREADS", f"QS_THREADS {threads}")
            .replace("QS_CLUSTER CLUSTER", f"QS_CLUSTER {cluster}")
            .replace("QS_TRIES TRIES", f"QS_TRIES {TRIES}"))


@functools.cache
def _kernel() -> object:
    return hashed_kernel("sample", ["logits", "key", "params"], ["tokens", "next_key"],
                         _SAMPLE, header())


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
    return tuple(_kernel()(
        inputs=[logits, key, params],
        template=[("T", logits.dtype), ("V", vocab), ("TOPK", top_k)],
        grid=(batch * CLUSTER * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(batch,), (2,)], output_dtypes=[mx.int32, mx.uint32]))
