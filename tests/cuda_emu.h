// Runs a CUDA kernel's source on the CPU, for tests on machines without a GPU: each thread of
// a block is a fiber (ucontext) of one OS thread, blocks run one after another. Barriers
// (__syncthreads, and the warp-wide ones inside shuffles and ballots) switch fibers, so a
// kernel whose threads do not all reach a barrier is reported as a deadlock, not hung.
// __shared__ variables are statics (one block at a time); atomics need no locking (fibers
// switch only at barriers). Covers what qwen_lora's sampling and decoding kernels use, nothing
// more.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __device__
#define __global__
#define __shared__ static

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmuDim3 threadIdx, blockIdx, blockDim;

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int waiting_on = -1;  // a barrier id while blocked on it
  unsigned generation = 0;
};

struct Barrier {
  int size = 0, count = 0;
  unsigned generation = 0;
};

inline std::vector<Fiber> fibers;
inline std::vector<Barrier> barriers;  // 0: the block; 1 + w: warp w
inline std::vector<uint64_t> exchange;  // one slot per thread, for shuffles and ballots
inline ucontext_t scheduler;
inline int current = 0;
inline const std::function<void()>* body = nullptr;

inline void to_scheduler() { swapcontext(&fibers[current].ctx, &scheduler); }

inline void arrive(int id) {
  Barrier& b = barriers[id];
  unsigned generation = b.generation;
  if (++b.count == b.size) {  // the last one releases the others
    b.count = 0;
    ++b.generation;
    return;
  }
  fibers[current].waiting_on = id;
  fibers[current].generation = generation;
  while (barriers[id].generation == generation) to_scheduler();
  fibers[current].waiting_on = -1;
}

inline void entry() {
  (*body)();
  fibers[current].done = true;
  to_scheduler();
}

// Runs `kernel` on `blocks` blocks of `threads` threads (a multiple of 32). Returns false
// (after printing why) on a deadlock: threads waiting at a barrier that others never reach.
inline bool launch(unsigned blocks, unsigned threads, const std::function<void()>& kernel) {
  if (threads % 32 != 0) {
    std::fprintf(stderr, "emu: %u threads is not a multiple of 32\n", threads);
    return false;
  }
  body = &kernel;
  blockDim.x = threads;
  for (unsigned block = 0; block < blocks; ++block) {
    blockIdx.x = block;
    fibers.assign(threads, Fiber());
    barriers.assign(1 + threads / 32, Barrier());
    barriers[0].size = static_cast<int>(threads);
    for (unsigned w = 0; w < threads / 32; ++w) barriers[1 + w].size = 32;
    exchange.assign(threads, 0);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      f.stack.resize(256 * 1024);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, entry, 0);
    }
    unsigned finished = 0;
    while (finished < threads) {
      bool progressed = false;
      finished = 0;
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        if (f.done) {
          ++finished;
          continue;
        }
        if (f.waiting_on >= 0 && barriers[f.waiting_on].generation == f.generation) continue;
        current = static_cast<int>(t);
        threadIdx.x = t;
        swapcontext(&scheduler, &f.ctx);
        progressed = true;
      }
      if (!progressed && finished < threads) {
        std::fprintf(stderr, "emu: deadlock in block %u: %u of %u threads finished\n", block,
                     finished, threads);
        return false;
      }
    }
  }
  return true;
}

template <typename V>
inline uint64_t bits(V v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(V));
  return b;
}

template <typename V>
inline V from_bits(uint64_t b) {
  V v;
  std::memcpy(&v, &b, sizeof(V));
  return v;
}

// The value of lane `src` of this warp (the caller's own where src is outside the warp).
template <typename V>
inline V shuffle(V v, int src) {
  int warp = threadIdx.x >> 5;
  exchange[threadIdx.x] = bits(v);
  arrive(1 + warp);
  V got = (src >= 0 && src < 32) ? from_bits<V>(exchange[warp * 32 + src]) : v;
  arrive(1 + warp);
  return got;
}

}  // namespace emu

inline void __syncthreads() { emu::arrive(0); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int o) {
  return emu::shuffle(v, static_cast<int>(threadIdx.x & 31) ^ o);
}
template <typename V>
inline V __shfl_sync(unsigned, V v, int src) {
  return emu::shuffle(v, src);
}
template <typename V>
inline V __shfl_up_sync(unsigned, V v, int o) {
  return emu::shuffle(v, static_cast<int>(threadIdx.x & 31) - o);
}
template <typename V>
inline V __shfl_down_sync(unsigned, V v, int o) {
  return emu::shuffle(v, static_cast<int>(threadIdx.x & 31) + o);
}

inline unsigned __ballot_sync(unsigned, bool pred) {
  int warp = threadIdx.x >> 5;
  emu::exchange[threadIdx.x] = pred ? 1 : 0;
  emu::arrive(1 + warp);
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) mask |= static_cast<unsigned>(emu::exchange[warp * 32 + l]) << l;
  emu::arrive(1 + warp);
  return mask;
}

// The lanes of this warp whose v equals this lane's.
inline unsigned __match_any_sync(unsigned, unsigned v) {
  int warp = threadIdx.x >> 5;
  emu::exchange[threadIdx.x] = v;
  emu::arrive(1 + warp);
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) {
    if (static_cast<unsigned>(emu::exchange[warp * 32 + l]) == v) mask |= 1u << l;
  }
  emu::arrive(1 + warp);
  return mask;
}
inline float atomicAdd(float* p, float v) {
  float old = *p;
  *p = old + v;
  return old;
}

inline unsigned __float_as_uint(float f) { return emu::from_bits<unsigned>(emu::bits(f)); }
inline float __int_as_float(int i) { return emu::from_bits<float>(emu::bits(i)); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }  // CUDA's integer min
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

struct alignas(16) uint4 {  // as CUDA's (__align__(16)): a misaligned 16-byte load traps
  unsigned x, y, z, w;
};
