// Thread-block cluster primitives (sm_90) used by the persistent divergence kernel, in one
// header of inline PTX so that a host emulator can stand in for it (tests/divergence_sim
// replaces this file, as tests/attention_sim replaces dk_mma.cuh).
#pragma once

#include <stdint.h>

namespace dk {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// This block's rank in its cluster, and the cluster's number of blocks (a 1-D cluster).
__device__ __forceinline__ int cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return static_cast<int>(r);
}
__device__ __forceinline__ int cluster_blocks() {
  uint32_t n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return static_cast<int>(n);
}

// The address of `p` (this block's shared memory) in the shared memory of block `rank` of the
// cluster, as a generic pointer (distributed shared memory).
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, int rank) {
  const uint64_t local = reinterpret_cast<uint64_t>(p);
  uint64_t remote;
  asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(remote) : "l"(local), "r"(rank));
  return reinterpret_cast<T*>(remote);
}

// The two halves of a cluster barrier. arrive carries no memory ordering: with release
// semantics every thread executes a GPU-scope MEMBAR before it arrives, which waits for its
// global stores to drain; a thread that has something to publish fences once itself
// (cluster_fence). wait returns once every block of the cluster has arrived, with acquire
// semantics, so what was written before a fence is visible after it.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
// The last arrive of a kernel: release orders each thread's reads of other blocks' shared
// memory before it, so that no block can exit (its shared memory gone) while a read of it is
// pending, formally too (one GPU-scope MEMBAR per thread, once per kernel).
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
// Publishes this thread's earlier writes of its own block's shared memory (the slots) to the
// cluster: a release fence restricted to shared::cta at cluster scope. It compiles to a
// CTA-level MEMBAR and FENCE.VIEW.ASYNC.S, where fence.acq_rel.cluster was a GPU-scope MEMBAR
// that made thread 0 wait for its gradient stores to drain, every iteration, before the arrive
// that the whole cluster waits for (review of version 6).
__device__ __forceinline__ void cluster_fence() {
  asm volatile("fence.release.sync_restrict::shared::cta.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// Asks L2 for `bytes` bytes from p on (p 16-byte aligned, bytes a multiple of 16), through the
// bulk copy engine: one instruction for the whole range, no register waits for it.
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes));
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace dk
