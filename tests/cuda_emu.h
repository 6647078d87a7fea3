// Runs a CUDA kernel's source on the CPU, for tests on machines without a GPU: each thread of
// a block is a fiber (ucontext) of one OS thread, blocks run one after another, except that
// the blocks of a thread-block cluster run at once, one OS thread each. Barriers
// (__syncthreads, the warp-wide ones inside shuffles and ballots, and a cluster's sync)
// switch fibers, so a kernel whose threads do not all reach a barrier is reported as a
// deadlock, not hung. __shared__ variables are thread-local statics (each block its own, and
// a cluster's blocks read each other's through map_shared_rank); atomics need no locking
// (fibers switch only at barriers, and only a block's own threads write its shared memory).
// Covers what qwen_lora's sampling and decoding kernels use, nothing more.
#pragma once
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __shared__ static thread_local
#define __location__(where)
#define __cluster_dims__(...)

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim;

namespace emu {

constexpr int CLUSTER_BARRIER = -2;  // Fiber::waiting_on for the cluster's barrier

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int waiting_on = -1;  // a barrier id (or CLUSTER_BARRIER) while blocked on it
  unsigned generation = 0;
};

struct Barrier {
  int size = 0, count = 0;
  unsigned generation = 0;
};

// The blocks of one cluster, each run by its own OS thread.
struct Cluster {
  std::mutex m;
  std::condition_variable cv;
  int size = 0, count = 0;  // threads of the cluster, and those at its barrier
  std::atomic<unsigned> generation{0};
  int finished = 0, stalled = 0;  // blocks done, and blocks waiting on this barrier only
  bool broken = false;  // a deadlock: every block gives up
  std::vector<const char*> anchors;  // each block's thread-local storage (its shared memory)
};

// Per OS thread, so per block of a cluster.
inline thread_local std::vector<Fiber> fibers;
inline thread_local std::vector<Barrier> barriers;  // 0: the block; 1 + w: warp w
inline thread_local std::vector<uint64_t> exchange;  // one slot per thread, for shuffles, ballots
inline thread_local ucontext_t scheduler;
inline thread_local int current = 0;
inline thread_local char anchor;  // a fixed place in this block's thread-local storage
inline std::function<void()> body;  // the running kernel
inline Cluster* cluster = nullptr;  // the running cluster, where blocks run in clusters
inline unsigned cluster_dim = 1;

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

// The cluster's barrier: every thread of every block of the cluster.
inline void cluster_arrive() {
  unsigned generation;
  {
    std::lock_guard<std::mutex> lock(cluster->m);
    generation = cluster->generation;
    if (++cluster->count == cluster->size) {
      cluster->count = 0;
      cluster->stalled = 0;  // blocks stalled on this barrier go on
      ++cluster->generation;
      cluster->cv.notify_all();
      return;
    }
  }
  fibers[current].waiting_on = CLUSTER_BARRIER;
  fibers[current].generation = generation;
  while (cluster->generation == generation) to_scheduler();
  fibers[current].waiting_on = -1;
}

// Where `p` (in this block's shared memory) lies in block `rank`'s of the cluster: thread-local
// storage is one copy per OS thread of the same layout.
template <typename P>
inline P* remote(P* p, unsigned rank) {
  auto offset = reinterpret_cast<const char*>(p) - &anchor;
  return reinterpret_cast<P*>(const_cast<char*>(cluster->anchors[rank]) + offset);
}

inline void entry() {
  body();
  fibers[current].done = true;
  to_scheduler();
}

// Waits, its fibers all blocked and some at the cluster's barrier, for the barrier to open.
// False on a deadlock: every other block also finished or waits only for it.
inline bool wait_for_cluster(unsigned generation) {
  std::unique_lock<std::mutex> lock(cluster->m);
  if (cluster->generation != generation) return true;  // opened since this block looked
  ++cluster->stalled;
  cluster->cv.notify_all();
  cluster->cv.wait(lock, [&] {
    return cluster->generation != generation || cluster->broken ||
           cluster->stalled + cluster->finished == static_cast<int>(cluster_dim);
  });
  bool opened = cluster->generation != generation;
  if (!opened && !cluster->broken) {
    std::fprintf(stderr, "emu: deadlock in the cluster of block %u: %d of %d threads at its "
                 "barrier, %d blocks finished\n", blockIdx.x, cluster->count, cluster->size,
                 cluster->finished);
  }
  if (!opened) {
    cluster->broken = true;
    cluster->cv.notify_all();
  }
  return opened;
}

// Runs block `block` of `threads` threads on this OS thread.
inline bool run_block(unsigned block, unsigned threads) {
  blockIdx.x = block;
  if (cluster) {
    std::lock_guard<std::mutex> lock(cluster->m);
    cluster->anchors[block % cluster_dim] = &anchor;
  }
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
    bool progressed = false, at_cluster = false;
    unsigned generation = cluster ? cluster->generation.load() : 0u;
    finished = 0;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      if (f.done) {
        ++finished;
        continue;
      }
      if (f.waiting_on == CLUSTER_BARRIER && cluster->generation == f.generation) {
        at_cluster = true;
        continue;
      }
      if (f.waiting_on >= 0 && barriers[f.waiting_on].generation == f.generation) continue;
      current = static_cast<int>(t);
      threadIdx.x = t;
      swapcontext(&scheduler, &f.ctx);
      progressed = true;
    }
    if (!progressed && finished < threads && !(at_cluster && wait_for_cluster(generation))) {
      if (!cluster || !cluster->broken) {
        std::fprintf(stderr, "emu: deadlock in block %u: %u of %u threads finished\n", block,
                     finished, threads);
      }
      if (cluster) {
        std::lock_guard<std::mutex> lock(cluster->m);
        cluster->broken = true;
        cluster->cv.notify_all();
      }
      return false;
    }
  }
  if (cluster) {
    std::lock_guard<std::mutex> lock(cluster->m);
    ++cluster->finished;
    cluster->cv.notify_all();
  }
  return true;
}

// Runs `kernel` on `blocks` blocks of `threads` threads (a multiple of 32), in clusters of
// `cluster_size` blocks (which divides `blocks`). Returns false (after printing why) on a
// deadlock: threads waiting at a barrier that others never reach.
inline bool launch(unsigned blocks, unsigned threads, const std::function<void()>& kernel,
                   unsigned cluster_size = 1) {
  if (threads % 32 != 0 || cluster_size == 0 || blocks % cluster_size != 0) {
    std::fprintf(stderr, "emu: %u blocks of %u threads in clusters of %u\n", blocks, threads,
                 cluster_size);
    return false;
  }
  body = kernel;
  blockDim.x = threads;
  cluster_dim = cluster_size;
  for (unsigned first = 0; first < blocks; first += cluster_size) {
    if (cluster_size == 1) {
      if (!run_block(first, threads)) return false;
      continue;
    }
    Cluster c;
    c.size = static_cast<int>(cluster_size * threads);
    c.anchors.assign(cluster_size, nullptr);
    cluster = &c;
    std::vector<char> ok(cluster_size, 0);
    std::vector<std::thread> workers;
    for (unsigned r = 0; r < cluster_size; ++r) {
      workers.emplace_back([&, r] { ok[r] = run_block(first + r, threads); });
    }
    for (auto& w : workers) w.join();
    cluster = nullptr;
    for (char k : ok) {
      if (!k) return false;
    }
  }
  cluster_dim = 1;
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

// The thread-block cluster of the running block (a cluster of one where blocks run alone).
namespace cooperative_groups {
struct cluster_group {
  void sync() const {
    if (emu::cluster) {
      emu::cluster_arrive();
    } else {
      __syncthreads();
    }
  }
  unsigned block_rank() const { return blockIdx.x % emu::cluster_dim; }
  template <typename P>
  P* map_shared_rank(P* p, unsigned rank) const {
    return emu::cluster ? emu::remote(p, rank) : p;
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

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

struct uint4 {
  unsigned x, y, z, w;
};
