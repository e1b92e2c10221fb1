// Token-level divergence on Hopper (sm_90): one thread-block cluster of C blocks per row, block
// `rank` owning the slice [rank · slice, (rank + 1) · slice) of the student and teacher rows, so
// that a row's later passes re-read its logits while they are still on chip. Two variants:
//
//   dk_divc_*  (smem):   every block holds its slice in shared memory (cp.async, all in flight
//                        at once), the passes read it from there: each logit leaves DRAM once
//                        whatever the passes, but a 76 KB slice allows two blocks per SM and a
//                        block computes only once its whole slice has landed.
//   dk_divcs_* (stream): the passes stream the slice from global memory like the one-block
//                        kernel, 16-byte loads overlapping the math; the later passes hit L2
//                        because the slices in flight (blocks per SM x slice x SMs, ~20 MB)
//                        fit in it, where the one-block kernel's rows in flight (hundreds of
//                        whole rows) do not. No shared memory to limit the blocks per SM.
//
// Measured on an H100 (cuda/DIVERGENCE.md, versions 2-4): both variants ran at 47-53 % of the
// floor (forward KL, fwd+bwd, N 4096, V 151936) against the one-block kernel's 58 %, so they
// now serve only short batches (fewer than 512 rows), on the stream variant; the smem variant is
// kept for A/B runs (DK_DIVERGENCE_CLUSTER=smem).
//
//   1. smem variant: every block copies its slice (cluster_slice(v, C) elements of each input)
//      into shared memory with cp.async;
//   2. statistics of the slice (max, sum-exp of both sides, KL sum) from shared memory, merged
//      over the block, published in a shared slot; cluster barrier; every block merges the C
//      slots through distributed shared memory in rank order (so all blocks hold bitwise the
//      same row statistics, and the result does not depend on scheduling);
//   3. JSD only: Σ p log(p/m), Σ q log(q/m) of the slice, merged the same way;
//   4. the gradient from shared memory, 16-byte stores to global;
//   5. a last cluster barrier: no block may leave while another still reads its slots.
//
// The per-chunk arithmetic is the one of the single-block kernel (dk_divergence_passes.cuh);
// only the partition of the row and the merge order differ (replayed on the host by
// tests/kernel_sim). Launched with a runtime cluster size (cuLaunchKernelEx) by
// src/divergence/cuda.rs, only on Hopper (sm_90) with 16-byte aligned rows; elsewhere the kernel body is
// empty and never launched.

#include <cooperative_groups.h>

#include "dk_divergence_args.h"
#include "dk_divergence_math.cuh"
#include "dk_divergence_passes.cuh"
#include "dk_mma.cuh"
#include "dk_reduce.cuh"
#include "dk_vec.cuh"

namespace dk {
namespace divergence {

// Threads per cluster block: one or two blocks share an SM, so each needs many warps to keep
// the special-function unit and the shared-memory pipe busy.
constexpr int kClusterThreads = 512;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// Queues the copy of `len` elements at `g` (16-byte aligned) into `s`: whole 16-byte pieces with
// cp.async, a partial last piece with cp.async's zero-fill (only the valid bytes are read).
template <typename T>
__device__ __forceinline__ void copy_slice_async(T* s, const T* g, int len) {
  constexpr int kPer16 = 16 / sizeof(T);
  const int pieces = (len + kPer16 - 1) / kPer16;
  for (int i = threadIdx.x; i < pieces; i += blockDim.x) {
    const int valid = min(kPer16, len - i * kPer16);
    cp_async_16(smem_addr(s + i * kPer16), g + i * kPer16, valid * static_cast<int>(sizeof(T)));
  }
}

// Runs pass `f` over the block's slice: from shared memory (smem variant) or global memory
// (stream variant; the rows are 16-byte aligned, which the launcher checks), with kSteps
// 16-byte steps of loads in flight in the stream variant (1 for the JSD passes of the series
// mode, whose tails need the registers of the second step: 64 at two blocks per SM).
template <bool kStream, int kSteps = 2, typename TS, typename TT, typename F>
__device__ __forceinline__ void slice_pass(const TS* ss, const TT* ts, const TS* s, const TT* t,
                                           int len, F&& f) {
  // for_each inlined over pointers into the shared-memory array compiles to shared loads.
  if (kStream) {
    for_each<kSteps>(s, t, len, true, f);
  } else {
    for_each(ss, ts, len, true, f);
  }
}

template <Kind K, typename TS, typename TT, bool kStream, bool kSeries>
__device__ __forceinline__ void cluster_rows(const DkDivergenceArgs& a) {
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) unsigned char dk_divc_smem[];
  __shared__ RowStats<K> smem_stats[32];
  __shared__ float smem_sum[32];
  __shared__ RowStats<K> slot_stats;  // this block's statistics, read by the whole cluster
  __shared__ float2 slot_kl;          // this block's JSD sums

  const cg::cluster_group cluster = cg::this_cluster();
  const int c = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t row = blockIdx.x / c;
  const int v = static_cast<int>(a.v);
  const int slice = cluster_slice(v, c);
  const int start = min(v, rank * slice);
  const int len = min(v, start + slice) - start;

  const TS* s = reinterpret_cast<const TS*>(a.student) + row * a.student_stride + start;
  const TT* t = reinterpret_cast<const TT*>(a.teacher) + row * a.teacher_stride + start;
  TS* g = a.grad ? reinterpret_cast<TS*>(a.grad) + row * a.grad_stride + start : nullptr;
  float* per_row = reinterpret_cast<float*>(a.per_row);
  const bool writer = rank == 0 && threadIdx.x == 0;

  // Ignored rows: the same branch in every block of the cluster, no shared slot is touched.
  if (a.labels != 0 && reinterpret_cast<const int64_t*>(a.labels)[row] == a.ignore_index) {
    if (writer) per_row[row] = 0.f;
    if (g) zero_row(g, len, true);
    return;
  }

  TS* ss = reinterpret_cast<TS*>(dk_divc_smem);
  TT* ts = reinterpret_cast<TT*>(dk_divc_smem + static_cast<size_t>(slice) * sizeof(TS));
  if (!kStream) {
    copy_slice_async(ss, s, len);
    copy_slice_async(ts, t, len);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }

  StatsPass<K, TS, TT, kStream> pass1{exp2_scale(a.inv_temperature), kStream ? s : ss,
                                          kStream ? t : ts};
  slice_pass<kStream>(ss, ts, s, t, len, pass1);
  const RowStats<K> mine = block_merge(pass1.stats, smem_stats);
  if (threadIdx.x == 0) slot_stats = mine;
  cluster.sync();
  RowStats<K> st = *cluster.map_shared_rank(&slot_stats, 0);
  for (int r = 1; r < c; ++r) st.merge(*cluster.map_shared_rank(&slot_stats, r));

  // A side with no finite entry has no distribution: loss 0, gradient 0 (NaN rows go on).
  const bool empty = st.empty();
  const float beta = a.beta;
  const Row r = row_of<K, kSeries>(st, a.inv_temperature, beta);
  float loss = 0.f, center = 0.f;
  if (K != Kind::Jsd && !empty) loss = kl_loss(st, r, &center);
  if (K == Kind::Jsd) {
    // Every block takes this branch (empty is the same everywhere), so the barrier is uniform.
    JsdPass<kSeries> jp{r};
    if (!empty) slice_pass<kStream, kSeries ? 1 : 2>(ss, ts, s, t, len, jp);
    const float pm = block_sum(jp.kl_pm, smem_sum);
    const float qm = block_sum(jp.kl_qm, smem_sum);
    if (threadIdx.x == 0) slot_kl = make_float2(pm, qm);
    cluster.sync();
    float kl_pm = 0.f;
    for (int q = 0; q < c; ++q) {
      const float2 part = *cluster.map_shared_rank(&slot_kl, q);
      kl_pm += part.x;
      center += part.y;
    }
    loss = empty ? 0.f : jsd_loss(beta, kl_pm, center);
  }
  if (writer) per_row[row] = clamp_loss(loss);

  if (g) {
    if (empty) {
      zero_row(g, len, true);
    } else {
      const float gscale =
          grad_scale(*reinterpret_cast<const float*>(a.scale) * a.inv_temperature, loss);
      // In place over the student row is safe: the smem variant reads its copy; the stream
      // variant's thread reads each chunk before it writes that chunk's gradient, and no other
      // thread or block touches the chunk.
      GradPass<K, TS, kSeries> gp{grad_row_of<K, kSeries>(r, center, beta, gscale), g};
      slice_pass<kStream, kSeries ? 1 : 2>(ss, ts, s, t, len, gp);
    }
  }
  cluster.sync();  // the other blocks may still be reading this block's slots
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace divergence
}  // namespace dk

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DK_DIVC_BODY(KIND, SERIES, TS, TT, STREAM) \
  dk::divergence::cluster_rows<KIND, TS, TT, STREAM, SERIES>(args);
#else
#define DK_DIVC_BODY(KIND, SERIES, TS, TT, STREAM) (void)args;
#endif

#define DK_DIVC_KERNEL(kname, KIND, SERIES, sname, TS, tname, TT)                             \
  extern "C" __global__ void __launch_bounds__(dk::divergence::kClusterThreads)               \
      dk_divc_##kname##_##sname##_##tname(const DkDivergenceArgs args) {                      \
    DK_DIVC_BODY(KIND, SERIES, TS, TT, false)                                                 \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(dk::divergence::kClusterThreads, 2)            \
      dk_divcs_##kname##_##sname##_##tname(const DkDivergenceArgs args) {                     \
    DK_DIVC_BODY(KIND, SERIES, TS, TT, true)                                                  \
  }

#define DK_DIVC_KERNELS_FOR_KIND(kname, KIND, SERIES) \
  DK_DIV_DTYPE_PAIRS(DK_DIVC_KERNEL, kname, KIND, SERIES)

// jsdx: JSD at extreme β (the series tails; see cuda/divergence.cu).
DK_DIVC_KERNELS_FOR_KIND(fkl, dk::divergence::Kind::ForwardKl, false)
DK_DIVC_KERNELS_FOR_KIND(rkl, dk::divergence::Kind::ReverseKl, false)
DK_DIVC_KERNELS_FOR_KIND(jsd, dk::divergence::Kind::Jsd, false)
DK_DIVC_KERNELS_FOR_KIND(jsdx, dk::divergence::Kind::Jsd, true)
