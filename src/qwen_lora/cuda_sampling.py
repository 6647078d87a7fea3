"""Temperature, top-k and top-p sampling in CUDA kernels of our own, for MLX's CUDA backend.

MLX's top-p sorts the vocabulary (151,936 logits) and runs a dozen operations around the
sort: ~0.46 ms a token on an H100, 17% of a decoding forward pass, where each evaluated
operation costs microseconds of host time. Here one block of threads per row does it all
in a few passes over the row, without sorting; each thread reads groups of 8 logits (16-byte
loads) and owns every 512th group:

- one pass: the row's maximum and each thread's sum of weights 2^((x - max) log2(e) / T),
  online (a thread rescales its sum when its maximum grows), then a block-wide prefix sum;
- a draw (inverse transform): the thread whose prefix holds it is found by a reduction, and
  its warp walks that thread's groups, 32 at a time, with a warp prefix sum;
- top-k: the k-th largest logit by a radix select (four passes of 256-bin histograms, one
  shared-memory atomic per distinct bin of a warp);
- top-p by rejection: a drawn token is in the nucleus exactly when the tokens likelier than
  it hold less than top_p of the mass (one more pass), so a draw is kept with probability
  >= top_p. After `TRIES` misses (a tiny top_p over a flat distribution) a radix select over
  the weights finds the nucleus' smallest logit and the draw is made inside it.

Tokens tied with the nucleus' (or the k-th) last token belong to it, as in `Sampler`'s other
implementations. Random numbers come from a counter-based hash of the sampler's key, row and
draw; the kernel also returns the next key, so a call is one or two kernels and nothing
else.

Top-k over a long row (more than one chunk of `CHUNK_GROUPS` groups: 2,048 logits; k up to
`CANDIDATES`) goes in two kernels instead, so that its selection spreads over the GPU rather
than one block's four passes over the row: one block a chunk keeps the chunk's `CANDIDATES`
largest logits and their ties (a radix select, then a prefix sum), then one block a row runs
the steps above over the kept ones, which hold every token of the top k. A chunk whose ties
outnumber its `SLOTS` sends the row back to the steps above.

Not thread-block clusters: one cluster of 8 blocks a row, reading each other's shared memory,
cut the kernels to 12.0 / 18.8 / 47.7 us (temperature / top-p / top-k in one kernel) on an
H100, but MLX (0.32) launches kernels through cached CUDA graphs that it updates in place, and
an update keeps the cluster shape the graph was instantiated with: a plain kernel updated into
a graph first run with the cluster kernel did not run at all (stale outputs), and the cluster
kernel drew wrong tokens in a test process after other graphs of its shape. A compile-time
cluster size (`__cluster_dims__`) is invisible to MLX's check for clusters, which looks only
at captured graphs' launch attributes (8e4ff0b, reverted).

Not one kernel of one block a chunk for every strategy either (branch exp/grid-sampling):
each block left its chunk's maximum, weight, a token drawn from it and a top set of it, and
the row's last block to finish (a counter in a scratch input) drew from those. Correct, but
on an H100 (chained draws of 151,936 logits, same process) 0.79x / 0.90x / 0.97x the speed of
these kernels (temperature / top-p / top-k). A draw's time there is mostly MLX's cost of a
kernel call: an empty kernel of the same signature took 18 us a chained draw on an H200's
host, this one 30-68. Padding the key, params and tokens past MLX's pool of arrays of up to
8 bytes (unified memory, which moves between host and GPU) changed these kernels' draws by
2-4.5% on the H100 (within the probe's noise); an atomic counter in that pool cost 80 us a
draw on the H200.

`Sampler`'s default on MLX's CUDA backend (`backend="cuda"`). Also tested without a GPU by
tests/test_cuda_sampling_emulated.py (this source run on the CPU with emulated threads).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from qwen_lora.cuda_decode import VECTOR_LOADS, hashed_kernel

THREADS = 512  # per block: one block a row (or a chunk of one)
TRIES = 8  # rejection draws of top-p before the exact selection
GROUP = 8  # logits a thread reads at once (QS_VEC)
CHUNK_GROUPS = 256  # groups of 8 logits a chunk of a long row (2,048 logits), for top-k
CANDIDATES = 64  # the largest logits a chunk keeps: top-k up to this k reads only them
SLOTS = 128  # room a chunk has for them and the ties of the last

_HEADER = VECTOR_LOADS + """
#define QS_THREADS THREADS
#define QS_TRIES TRIES
#define QS_CHUNK_GROUPS CHUNK_GROUPS
#define QS_CANDIDATES CANDIDATES
#define QS_SLOTS SLOTS
#define QS_WARPS (QS_THREADS / 32)
#define QS_VEC 8  // a thread's elements come in groups of 8 (ql_load8): 16-byte loads
#define QS_FULL 0xffffffffu

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
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(QS_FULL, v, o));
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

// The sum of v over the threads before this one (in thread order), and over all of them.
__device__ inline float qs_exclusive_scan(float v, float* total) {
  __shared__ float part[QS_WARPS];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float incl = qs_warp_scan(v);
  if (lane == 31) part[warp] = incl;
  __syncthreads();
  float before = 0.f, all = 0.f;
  for (int w = 0; w < QS_WARPS; ++w) {
    if (w == warp) before = all;
    all += part[w];
  }
  __syncthreads();
  *total = all;
  return before + incl - v;
}

// Thread t owns the groups t, t + QS_THREADS, t + 2 QS_THREADS, ... of QS_VEC elements: each
// load of a warp is 512 contiguous bytes. Loads group g as floats, -inf past the row's end.
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
// Counting selects over rows up to this long (a chunk, the chunks' candidates) finish their
// histograms' spread-out bins with __match_any_sync; longer rows' with the warp's loop alone.
// On an H100 (151,936 logits): top-k's chunks 45 -> 16 us, its draw over the candidates
// 32 -> 28 us, but a whole row's select (k above the candidates) 99 -> 112 us.
#define QS_SPREAD_MAX (8 * QS_CHUNK_GROUPS * QS_VEC)
// A pass loads QS_UNROLL of a thread's groups before it uses any, so that more loads are in
// flight for the one block of a row (about 10% less time a draw on an H100).
#define QS_UNROLL 4

// Groups g0, g0 + QS_THREADS, ... (QS_UNROLL of them) as floats; -inf past the row's end.
template <typename T, int V>
__device__ inline void qs_load_batch(const T* x, int g0, bool aligned,
                                     float (*v)[QS_VEC]) {
#pragma unroll
  for (int u = 0; u < QS_UNROLL; ++u) {
    int g = g0 + u * QS_THREADS;
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

// hist[bins[j]] += 1 for the bits j of `pending`, over the warp: for each j, the lanes with
// the same bin found at once (__match_any_sync), one shared-memory atomic per distinct bin.
__device__ inline void qs_hist_count(float* hist, unsigned pending, const unsigned* bins) {
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < QS_VEC; ++j) {
    unsigned b = (pending >> j) & 1u ? bins[j] : 0xffffffffu;  // not a bin: not pending
    unsigned same = __match_any_sync(QS_FULL, b);
    if (b != 0xffffffffu && lane == __ffs(same) - 1) {
      atomicAdd(&hist[b], static_cast<float>(__popc(same)));
    }
  }
}

// hist[bins[j]] += vals[j] for the bits j of `pending`, over the warp, a distinct bin of
// the warp's elements at a time (at most `rounds` of them, where rounds >= 0): one
// shared-memory atomic per bin, its lanes summed by shuffles, not one per element (logits
// crowd into a few bins of their top byte, where atomics on one address serialize: 4 ms a
// top-k over 151,936 logits on an H100 with one atomic per element). Returns what is left.
__device__ inline unsigned qs_hist_add(float* hist, unsigned pending, const unsigned* bins,
                                       const float* vals, int rounds = -1) {
  int lane = threadIdx.x & 31;
  unsigned todo = __ballot_sync(QS_FULL, pending != 0u);
  for (; todo && rounds != 0; --rounds) {
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
  return pending;
}

// The largest key t such that the weight of the keys >= t (of those >= kmin) reaches goal:
// the count of them with COUNT, else their weights. Four passes of 256-bin histograms.
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
    for (int g0 = 0; g0 < QS_GROUPS(V); g0 += QS_UNROLL * QS_THREADS) {
      float v[QS_UNROLL][QS_VEC];
      qs_load_batch<T, V>(x, g0 + threadIdx.x, aligned, v);
#pragma unroll
      for (int u = 0; u < QS_UNROLL; ++u) {
        int g = g0 + threadIdx.x + u * QS_THREADS;
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
        if (COUNT && V <= QS_SPREAD_MAX) {
          // a few distinct bins (crowded logits) one at a time; where more are left (the
          // later digits, spread out), an element at a time
          pending = qs_hist_add(hist, pending, bins, v[u], 4);
          if (__ballot_sync(QS_FULL, pending != 0u)) qs_hist_count(hist, pending, bins);
        } else {
          qs_hist_add(hist, pending, bins, v[u]);
        }
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
    __syncthreads();
  }
  return prefix;
}

// One pass over the row: its maximum (of the keys >= kmin), returned, and this thread's sum
// of weights relative to it (`mine`), its exclusive prefix over the threads (`before`) and
// the row's total. An online maximum: each thread rescales its sum when its maximum grows.
template <typename T, int V>
__device__ inline float qs_sums(const T* x, bool aligned, float c, unsigned kmin,
                                float* mine, float* before, float* total) {
  const float ninf = __int_as_float(0xff800000);
  float m = ninf, s = 0.f;
  for (int g0 = threadIdx.x; g0 < QS_GROUPS(V); g0 += QS_UNROLL * QS_THREADS) {
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
// at a time.
template <typename T, int V>
__device__ int qs_pick(const T* x, bool aligned, float m, float c, unsigned kmin, float mine,
                       float before, float target) {
  __shared__ int picked;
  float owner_f = qs_reduce(mine > 0.f && before <= target ? static_cast<float>(threadIdx.x)
                                                            : -1.f, QsMax());
  if (owner_f < 0.f) return 0;  // no positive weight (NaN logits): a valid index all the same
  int owner = static_cast<int>(owner_f), lane = threadIdx.x & 31;
  if ((threadIdx.x >> 5) == (owner >> 5)) {
    float run = __shfl_sync(QS_FULL, before, owner & 31);
    int last = -1;  // the last positive weight, if rounding keeps run from passing target
    bool done = false;
    for (int k0 = 0; !done && owner + k0 * QS_THREADS < QS_GROUPS(V); k0 += 32) {
      int g = owner + (k0 + lane) * QS_THREADS;
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
  __syncthreads();
  int r = picked;
  __syncthreads();
  return r < 0 ? 0 : r;
}

// The weight of the keys above kp (of those >= kmin), over the block: one pass over the row.
template <typename T, int V>
__device__ float qs_likelier(const T* x, bool aligned, float m, float c, unsigned kmin,
                             unsigned kp) {
  float likelier = 0.f;
  for (int g0 = threadIdx.x; g0 < QS_GROUPS(V); g0 += QS_UNROLL * QS_THREADS) {
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
                       qs_uniform(seed, blockIdx.x, QS_TRIES) * total);
}

// A token of row x (its index) drawn by the whole block: from the TOPK largest logits where
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
                         qs_uniform(seed, blockIdx.x, 0) * total);
  }
  for (int t = 0; t < QS_TRIES; ++t) {
    int pick = qs_pick<T, V>(x, aligned, m, c, kmin, mine, before,
                             qs_uniform(seed, blockIdx.x, t) * total);
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

// ---- Top-k over a long row in two kernels: chunks of QS_CHUNK_GROUPS groups, one block
// each, then one block a row over what the chunks kept.
#define QS_CHUNK (QS_CHUNK_GROUPS * QS_VEC)  // elements a chunk (a power of two)
#define QS_CHUNKS(V) ((QS_GROUPS(V) + QS_CHUNK_GROUPS - 1) / QS_CHUNK_GROUPS)

// The QS_CANDIDATES largest of the LEN logits at x (a chunk; the first of them is element
// `first` of its row) and every one tied with the last, in cand (their indices in the row in
// cand_idx; -inf and -1 in the slots left), and their count in *count (above QS_SLOTS: too
// many ties to keep, and the slots stay empty). The least key kept by a radix select (four
// passes of 256-bin histograms), then one group of 8 logits a thread, compacted by a prefix
// sum of the kept per thread.
template <typename T, int LEN>
__device__ void qs_keep(const T* x, int first, unsigned* count, float* cand, int* cand_idx) {
  static_assert(QS_CHUNK_GROUPS <= QS_THREADS, "a thread reads one group of a chunk");
  const bool aligned = ql_aligned(x);
  // the QS_CANDIDATES-th largest key (0, keeping all, where there are fewer)
  const unsigned least = qs_select<T, LEN, true>(x, aligned, 0.f, 1.f, 0u,
                                                 static_cast<float>(QS_CANDIDATES));
  float v[QS_VEC];
  unsigned kept = 0u;
  if (threadIdx.x < QS_GROUPS(LEN)) {
    qs_load<T, LEN>(x, threadIdx.x, aligned, v);
#pragma unroll
    for (int j = 0; j < QS_VEC; ++j) {
      if (threadIdx.x * QS_VEC + j < LEN && qs_key(v[j]) >= least) kept |= 1u << j;
    }
  }
  float all;
  int at = static_cast<int>(qs_exclusive_scan(static_cast<float>(__popc(kept)), &all));
  const int n = static_cast<int>(all);
  if (threadIdx.x == 0) *count = static_cast<unsigned>(n);
  if (n <= QS_SLOTS) {
#pragma unroll
    for (int j = 0; j < QS_VEC; ++j) {
      if (kept & (1u << j)) {
        cand[at] = v[j];
        cand_idx[at] = first + threadIdx.x * QS_VEC + j;
        ++at;
      }
    }
  }
  for (int i = (n <= QS_SLOTS ? n : 0) + threadIdx.x; i < QS_SLOTS; i += QS_THREADS) {
    cand[i] = __int_as_float(0xff800000);
    cand_idx[i] = -1;
  }
}

// One chunk of a row (block b of the row: chunk b): qs_keep's candidates of the chunk, in
// the chunk's QS_SLOTS slots of cand and cand_idx, their count in counts.
template <typename T, int V>
__device__ void qs_chunk(const T* logits, unsigned* counts, float* cand, int* cand_idx) {
  const int chunks = QS_CHUNKS(V);
  const int row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int first = chunk * QS_CHUNK;  // the chunk's first element
  const T* x = logits + static_cast<size_t>(row) * V + first;
  const int out = row * chunks + chunk;
  constexpr int LAST = V - (QS_CHUNKS(V) - 1) * QS_CHUNK;  // the last chunk's length
  if (chunk == chunks - 1) {
    qs_keep<T, LAST>(x, first, counts + out, cand + out * QS_SLOTS, cand_idx + out * QS_SLOTS);
  } else {
    qs_keep<T, QS_CHUNK>(x, first, counts + out, cand + out * QS_SLOTS,
                         cand_idx + out * QS_SLOTS);
  }
}

// A token of the row whose chunks qs_chunk kept candidates of (the block's row), drawn by
// the block with qs_sample_row over the candidates, which hold every token of the top k
// (TOPK <= QS_CANDIDATES) and its ties; over the row where a chunk had too many ties.
template <typename T, int V, int TOPK>
__device__ int qs_chunked_row(const T* x, float c, float top_p, unsigned long long seed,
                              const unsigned* counts, const float* cand, const int* cand_idx) {
  const int chunks = QS_CHUNKS(V);
  const int base = blockIdx.x * chunks;
  float overflow = 0.f;
  for (int i = threadIdx.x; i < chunks; i += QS_THREADS) {
    overflow = fmaxf(overflow, counts[base + i] > QS_SLOTS ? 1.f : 0.f);
  }
  if (qs_reduce(overflow, QsMax()) > 0.f) return qs_sample_row<T, V, TOPK>(x, c, top_p, seed);
  const float* row = cand + static_cast<size_t>(base) * QS_SLOTS;
  int slot = qs_sample_row<float, QS_CHUNKS(V) * QS_SLOTS, TOPK>(row, c, top_p, seed);
  return cand_idx[base * QS_SLOTS + slot];
}
"""

# A row's draw, one block a row: the token (B,) from logits (B, V), params = [1 /
# temperature, top_p], key (2,) uint32 -> next_key; DRAW names the row's drawing function.
_ROW = """
  unsigned long long seed = qs_seed(key, next_key);
  const T* x = logits + static_cast<size_t>(blockIdx.x) * V;
  const float c = params[0] * 1.4426950408889634f;  // log2(e) / temperature
  int token = DRAW;
  if (threadIdx.x == 0) tokens[blockIdx.x] = token;
"""

_SAMPLE = _ROW.replace("DRAW", "qs_sample_row<T, V, TOPK>(x, c, params[1], seed)")

# counts (B * chunks,), cand and cand_idx (B * chunks, SLOTS) from logits (B, V); one
# block a chunk.
_CHUNK = """
  qs_chunk<T, V>(logits, counts, cand, cand_idx);
"""

# _ROW over _CHUNK's outputs (inputs here).
_CHUNKED = _ROW.replace("DRAW", "qs_chunked_row<T, V, TOPK>(x, c, params[1], seed, counts, "
                                "cand, cand_idx)")

DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def header(threads: int = THREADS, chunk_groups: int = CHUNK_GROUPS,
           candidates: int = CANDIDATES, slots: int = SLOTS) -> str:
    """The kernels' shared source at these sizes (the emulated tests take smaller ones)."""
    return (_HEADER.replace("QS_THREADS THREADS", f"QS_THREADS {threads}")
            .replace("QS_TRIES TRIES", f"QS_TRIES {TRIES}")
            .replace("QS_CHUNK_GROUPS CHUNK_GROUPS", f"QS_CHUNK_GROUPS {chunk_groups}")
            .replace("QS_CANDIDATES CANDIDATES", f"QS_CANDIDATES {candidates}")
            .replace("QS_SLOTS SLOTS", f"QS_SLOTS {slots}"))


@functools.cache
def _kernels() -> dict[str, object]:
    source = header()
    return {
        "sample": hashed_kernel("sample", ["logits", "key", "params"], ["tokens", "next_key"],
                                _SAMPLE, source),
        "chunk": hashed_kernel("sample_chunk", ["logits"], ["counts", "cand", "cand_idx"],
                               _CHUNK, source),
        "chunked": hashed_kernel("sample_chunked",
                                 ["logits", "key", "params", "counts", "cand", "cand_idx"],
                                 ["tokens", "next_key"], _CHUNKED, source),
    }


def chunks(vocab: int, chunk_groups: int = CHUNK_GROUPS) -> int:
    """Chunks of a row of `vocab` logits."""
    groups = -(-vocab // GROUP)
    return -(-groups // chunk_groups)


def takes_chunks(vocab: int, top_k: int, chunk_groups: int = CHUNK_GROUPS,
                 candidates: int = CANDIDATES) -> bool:
    """Whether top-k over a row goes in chunks (two kernels): the row longer than one
    chunk and k within the candidates a chunk keeps. Temperature and top-p alone stay in
    one kernel: a second launch cost an H100 more than the chunks saved (temperature at
    151,936 logits: 27-41 us a draw in one kernel, 41-52 in two)."""
    return 0 < top_k <= candidates and chunks(vocab, chunk_groups) >= 2


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
    kernels = _kernels()
    inputs, chunked = [logits, key, params], takes_chunks(vocab, top_k)
    if chunked:
        n = batch * chunks(vocab)
        inputs += kernels["chunk"](
            inputs=[logits], template=[("T", logits.dtype), ("V", vocab)],
            grid=(n * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[(n,), (n * SLOTS,), (n * SLOTS,)],
            output_dtypes=[mx.uint32, mx.float32, mx.int32])
    draw = kernels["chunked" if chunked else "sample"]
    return tuple(draw(
        inputs=inputs, template=[("T", logits.dtype), ("V", vocab), ("TOPK", top_k)],
        grid=(batch * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(batch,), (2,)], output_dtypes=[mx.int32, mx.uint32]))
