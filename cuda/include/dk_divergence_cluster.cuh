// Merging the C blocks' partial results of a row through distributed shared memory: shared by
// the persistent cluster kernels (divergence_persistent.cu, version 6) and the staged ones
// (divergence_staged.cu, version 9). Each block publishes its statistics (or JSD sums) in a
// slot of its own shared memory, fences, and arrives at the cluster barrier; after the wait,
// every block reads the C slots and combines them in the same fixed order, so all blocks hold
// the same bits and nothing depends on scheduling. tests/kernel_sim replays the order.
#pragma once

#include "dk_cluster.cuh"
#include "dk_divergence_args.h"
#include "dk_divergence_passes.cuh"
#include "dk_reduce.cuh"

namespace dk {
namespace divergence {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// The head of a persistent cluster kernel's dynamic shared memory (all of it for version 6, the
// scratch before the row buffers for version 9): the reduction scratch and this block's slots,
// which the cluster reads after a barrier, by parity. Dynamic rather than static __shared__ so
// that a host emulator can give each block of a cluster its own. kClusterScratchBytes is
// PERSISTENT_SMEM_BYTES in src/divergence/cluster.rs.
template <Kind K>
struct ClusterScratch {
  RowStats<K> stats[32];      // block_stats scratch
  float sums[32];             // block_sum scratch
  RowStats<K> slot_stats[2];  // this block's statistics of a row, by parity
  float2 slot_kl[2];          // JSD: this block's mixture sums of a row, by parity
};
constexpr int kClusterScratchBytes = 1024;
static_assert(sizeof(ClusterScratch<Kind::ForwardKl>) <= kClusterScratchBytes, "smem");
static_assert(sizeof(ClusterScratch<Kind::Jsd>) <= kClusterScratchBytes, "smem");

// A persistent cluster kernel's share of a call (versions 6 and 9): this block's slice of every
// row (cluster_slice elements from `start`; `len` may be short or 0 at the row's end), the rows
// its cluster walks (first, first + clusters, ...: `mine` of them), and the per-row bookkeeping.
struct ClusterWalk {
  int c;     // blocks per cluster
  int rank;  // this block's rank in it
  int slice, start, len;
  int64_t first, clusters, mine;
  const int64_t* labels;
  int64_t ignore_index;
  float* per_row;
  bool writer;    // rank 0, thread 0: writes the per-row losses
  float gfactor;  // d(reduced loss)/d(row loss) · 1/T, the gradient's scale before the row's own

  __device__ __forceinline__ explicit ClusterWalk(const DkDivergenceArgs& a)
      : c(cluster_blocks()), rank(cluster_rank()) {
    const int v = static_cast<int>(a.v);
    slice = cluster_slice(v, c);
    start = min(v, rank * slice);
    len = min(v, start + slice) - start;
    first = blockIdx.x / c;
    clusters = gridDim.x / c;
    mine = first < a.n ? (a.n - first + clusters - 1) / clusters : 0;
    labels = reinterpret_cast<const int64_t*>(a.labels);
    ignore_index = a.ignore_index;
    per_row = reinterpret_cast<float*>(a.per_row);
    writer = rank == 0 && threadIdx.x == 0;
    gfactor = *reinterpret_cast<const float*>(a.scale) * a.inv_temperature;
  }
  // The row of the walk's i-th step.
  __device__ __forceinline__ int64_t row_at(int64_t i) const { return first + i * clusters; }
  // Whether `row`'s label is ignore_index (the same answer in every block of the cluster).
  __device__ __forceinline__ bool ignored(int64_t row) const {
    return labels != nullptr && labels[row] == ignore_index;
  }
};

// The statistics of the cluster from its C slots (C a power of two, at most 16), the same bits
// in every thread: lane r of each warp reads block r's slot (C remote loads per warp, not per
// thread), warp_stats combines groups of C lanes (maxima, one rebase, sums by butterflies with
// offsets C/2 .. 1), and lane 0's result is broadcast. (The stream cluster kernel merges the
// slots in rank order with RowStats::merge, C − 1 dependent steps of ~84 instructions.)
template <Kind K>
__device__ __forceinline__ RowStats<K> merge_slots(RowStats<K>* slot, int c, int lane, float k) {
  RowStats<K> x;
  if (lane < c) x = *cluster_map(slot, lane);
  return warp_stats(x, k, c).shfl(0);
}

// The sums of the cluster's C float2 slots (JSD's Σ p log(p/m), Σ q log(q/m)), the same bits in
// every thread: lane r reads block r's slot, a butterfly over groups of C lanes adds them, lane
// 0's result is broadcast.
__device__ __forceinline__ float2 sum_slots(const float2* slot, int c, int lane) {
  float2 part = make_float2(0.f, 0.f);
  if (lane < c) part = *cluster_map(slot, lane);
  for (int o = c >> 1; o > 0; o >>= 1) {
    part.x += __shfl_xor_sync(kFullMask, part.x, o);
    part.y += __shfl_xor_sync(kFullMask, part.y, o);
  }
  return make_float2(__shfl_sync(kFullMask, part.x, 0), __shfl_sync(kFullMask, part.y, 0));
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace divergence
}  // namespace dk
