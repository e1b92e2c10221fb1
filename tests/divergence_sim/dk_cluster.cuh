// Host-emulator replacement of cuda/include/dk_cluster.cuh: the same functions with the inline
// PTX replaced by the emulated cluster of tests/attention_sim/sim_core.h (the C blocks of a
// cluster run together as fibers; split barrier as warp collectives with per-thread
// arrive / wait bookkeeping; distributed shared memory reads through each block's published
// copy, which the cluster fence refreshes). tests/divergence_persistent_sim.rs stages the
// kernel source with this file in place of the real header, since divergence_persistent.cu
// includes "dk_cluster.cuh" from its own directory. Keep the function list in step with the
// real header.
#pragma once

#include <stdint.h>

#include "sim_core.h"

#define DK_DIVERGENCE_SIM_CLUSTER_SHIM 1

namespace dk {

// %cluster_ctarank, %cluster_nctarank (a 1-D cluster along x).
inline int cluster_rank() { return static_cast<int>(sim::cluster_rank()); }
inline int cluster_blocks() { return static_cast<int>(sim::cluster_blocks()); }

// mapa.u64: the same offset in block `rank`'s shared memory (its published copy: reads only).
template <typename T>
inline T* cluster_map(T* p, int rank) {
  return static_cast<T*>(const_cast<void*>(sim::cluster_map(p, rank, sizeof(T), alignof(T))));
}

// barrier.cluster.arrive.relaxed.aligned / fence.release.sync_restrict::shared::cta.cluster /
// barrier.cluster.wait.acquire.aligned.
inline void cluster_arrive_relaxed() { sim::cluster_arrive(); }
// Release: as a fence of this block's shared memory followed by the arrive.
inline void cluster_arrive_release() {
  sim::cluster_fence();
  sim::cluster_arrive();
}
inline void cluster_fence() { sim::cluster_fence(); }
inline void cluster_wait() { sim::cluster_wait(); }

// cp.async.bulk.prefetch.L2.global: no effect on the data; p 16-byte aligned, bytes a nonzero
// multiple of 16, and the whole range inside one row of an operand.
inline void prefetch_l2_bulk(const void* p, unsigned bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || bytes == 0 || bytes % 16 != 0)
    sim::fail("cp.async.bulk.prefetch.L2: %p, %u bytes (16-byte aligned, a nonzero multiple "
              "of 16 required)",
              p, bytes);
  sim::check_global(p, bytes, false, "cp.async.bulk.prefetch.L2");
}

}  // namespace dk
