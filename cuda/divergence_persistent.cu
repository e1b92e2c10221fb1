// Token-level divergence on Hopper (sm_90), version 6: persistent clusters that pipeline rows.
//
// Why (cuda/DIVERGENCE.md, version 5): the stream cluster kernel (divergence_cluster.cu) keeps
// a row's re-read in L2, so its DRAM traffic is the floor's, but each block lives for one row:
// load phase, block merge, cluster barrier, remote merge, next pass, barrier, exit. With ~19 K
// elements per block and pass, those phases leave the memory system idle (H200: 33.6 % of the
// floor, issue 50 %, no pipe saturated). Here a cluster of C blocks stays resident and walks the
// rows q, q + Q, q + 2Q, ... (Q clusters in the grid), and each iteration runs the passes of
// successive rows side by side in ONE loop over the block's slice:
//
//   forward / reverse KL: statistics of row i, gradient of row i − 1;
//   JSD:                  statistics of row i, mixture sums of row i − 1, gradient of row i − 2.
//
// so every iteration streams the new row from DRAM while it re-reads the previous ones from L2
// (written to L2 one or two iterations before: Q is chosen so that those iterations' bytes fit
// in it, src/divergence/cluster.rs), and there is one block merge and ONE cluster barrier per
// iteration instead of two or three per row. The barrier is split: a block arrives as soon as
// it has published its slot and waits only at the start of the next iteration, after asking
// L2 for its whole slice of the next row (one bulk prefetch per input).
//
// Slots are double-buffered by iteration parity. A block writes slot[i & 1] at the end of
// iteration i and every block reads it after the barrier, at the start of iteration i + 1;
// the next write of that slot, at the end of iteration i + 2, comes after the barrier of
// iteration i + 1, which every block passes only once all have arrived, i.e. finished reading.
//
// The per-chunk arithmetic is the stream cluster kernel's, on the same slices (cluster_slice).
// The reductions are cheaper, because a block has only a few chunks per thread per row: the
// block statistics in two phases (maxima, one rebase, sums: block_stats) instead of a butterfly
// of merges, and the C block results combined the same way over C lanes (merge_slots in
// dk_divergence_cluster.cuh) instead of merged in rank order. tests/kernel_sim replays that arithmetic;
// tests/divergence_persistent_sim runs this file on a host emulator with clusters (the
// pipeline, slots, barriers). Gradient in place over the student logits stays safe: an iteration writes the
// gradient of an older row than any it reads, and each thread reads a chunk before it writes
// that chunk's gradient.
//
// The fused linear divergence's variant (dk_divcp_fused_*, dk_divcp256_fused_*: f32 logits S
// and T, G in the GEMMs' dtype with the softcap slope; cuda/FUSED.md, version 3) writes row r's
// G over the logits of row r − Q, the row its cluster walked before (Q = gridDim.x / C). That
// row is dead: its last reads (its gradient stage) ran an iteration earlier, in every block of
// the cluster, and this iteration's cluster_wait has seen every block arrive after them. A
// bf16 G row could not go over its own row: its bytes are the first half of the f32 row, which
// other blocks of the cluster are still reading in the same iteration. So the launcher points
// `args.grad` Q rows before S (rows r < Q land in a pad it reserves) with G's row stride the
// same bytes as S's, and the GEMMs read G from there. (The order this relies on is the
// hardware's: the arrives are relaxed, so the PTX model does not order another block's loads
// of row r − Q before these stores; on sm_90 each load's value is consumed before its thread
// arrives, and issue is in order. The slots' reuse stands on the same ground. cuda/FUSED.md,
// version 3, has the cost of a formal release.)

#include "dk_cluster.cuh"
#include "dk_divergence_args.h"
#include "dk_divergence_cluster.cuh"
#include "dk_divergence_math.cuh"
#include "dk_divergence_passes.cuh"
#include "dk_reduce.cuh"
#include "dk_vec.cuh"

namespace dk {
namespace divergence {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// A pass that does nothing: the missing third stage of the KL pipeline.
struct NoPass {
  template <int N>
  __device__ __forceinline__ void chunk(int, const float (&)[N], const float (&)[N]) {}
};

// One pass of the pipeline over its row's slice: the functor and the row's pointers (off when
// `s` is null; the test is uniform over the block).
template <typename TS, typename TT, typename F>
struct Stage {
  const TS* s;
  const TT* t;
  F& f;
};

// The raw 16-byte words of one step of every active stage.
template <typename TS, typename TT>
struct StepWords {
  Raw8<TS> s[3];
  Raw8<TT> t[3];
};

template <typename TS, typename TT, typename F0, typename F1, typename F2>
__device__ __forceinline__ StepWords<TS, TT> load_step(const Stage<TS, TT, F0>& a,
                                                       const Stage<TS, TT, F1>& b,
                                                       const Stage<TS, TT, F2>& c, int o) {
  StepWords<TS, TT> w{};
  if (a.s) {
    w.s[0] = load_raw8(a.s + o);
    w.t[0] = load_raw8(a.t + o);
  }
  if (b.s) {
    w.s[1] = load_raw8(b.s + o);
    w.t[1] = load_raw8(b.t + o);
  }
  if (c.s) {
    w.s[2] = load_raw8(c.s + o);
    w.t[2] = load_raw8(c.t + o);
  }
  return w;
}

template <typename TS, typename TT, typename F>
__device__ __forceinline__ void run_chunk(const Stage<TS, TT, F>& st, const Raw8<TS>& rs,
                                          const Raw8<TT>& rt, int o) {
  if (!st.s) return;
  float sv[kVec], tv[kVec];
  unpack8(rs, sv);
  unpack8(rt, tv);
  st.f.template chunk<kVec>(o, sv, tv);
}

template <typename TS, typename TT, typename F>
__device__ __forceinline__ void run_tail(const Stage<TS, TT, F>& st, int i) {
  if (!st.s) return;
  const float sv[1] = {to_float(st.s[i])}, tv[1] = {to_float(st.t[i])};
  st.f.template chunk<1>(i, sv, tv);
}

// Runs up to three passes over the same slice positions of three rows in one loop: the 16-byte
// loads of every active stage, for kSteps chunk steps, are issued before any is converted, so
// each thread keeps up to kSteps × 6 × 16 bytes in flight. Each stage sees its chunks in
// for_each's order (c, c + blockDim, ...), so it accumulates what it would alone.
template <int kSteps, typename TS, typename TT, typename F0, typename F1, typename F2>
__device__ __forceinline__ void for_each_rows(int len, const Stage<TS, TT, F0>& a,
                                              const Stage<TS, TT, F1>& b,
                                              const Stage<TS, TT, F2>& c) {
  static_assert(kSteps == 1 || kSteps == 2, "one or two steps in flight");
  const int chunks = len / kVec, step = blockDim.x;
  int ch = threadIdx.x;
  if (kSteps == 2) {
    for (; ch + step < chunks; ch += 2 * step) {
      const int o0 = ch * kVec, o1 = (ch + step) * kVec;
      const StepWords<TS, TT> w0 = load_step(a, b, c, o0), w1 = load_step(a, b, c, o1);
      run_chunk(a, w0.s[0], w0.t[0], o0);
      run_chunk(a, w1.s[0], w1.t[0], o1);
      run_chunk(b, w0.s[1], w0.t[1], o0);
      run_chunk(b, w1.s[1], w1.t[1], o1);
      run_chunk(c, w0.s[2], w0.t[2], o0);
      run_chunk(c, w1.s[2], w1.t[2], o1);
    }
  }
  for (; ch < chunks; ch += step) {
    const int o = ch * kVec;
    const StepWords<TS, TT> w = load_step(a, b, c, o);
    run_chunk(a, w.s[0], w.t[0], o);
    run_chunk(b, w.s[1], w.t[1], o);
    run_chunk(c, w.s[2], w.t[2], o);
  }
  for (int i = chunks * kVec + threadIdx.x; i < len; i += blockDim.x) {
    run_tail(a, i);
    run_tail(b, i);
    run_tail(c, i);
  }
}

// What the gradient stage does with its row this iteration.
enum class GradMode { None, Zero, Grad };

// kSteps: chunk steps whose loads are issued together (for_each_rows). kFused: the fused
// linear divergence's variant, G in TO with the softcap slope (inv_cap; see the top). kSeries:
// Row's JSD mode (the `jsdx` kernels, for extreme β).
template <Kind K, typename TS, typename TT, int kSteps, bool kSeries, bool kFused = false,
          typename TO = TS>
__device__ __forceinline__ void persistent_rows(const DkDivergenceArgs& a, float inv_cap = 0.f) {
  static_assert(kFused || sizeof(TO) == sizeof(TS), "TO is TS outside the fused variant");
  constexpr bool kJsd = K == Kind::Jsd;
  extern __shared__ __align__(16) unsigned char dk_divcp_smem[];
  // Its whole dynamic shared memory (kClusterScratchBytes; slots by iteration parity).
  ClusterScratch<K>& sm = *reinterpret_cast<ClusterScratch<K>*>(dk_divcp_smem);
  RowStats<K>* const smem_stats = sm.stats;
  float* const smem_sum = sm.sums;
  RowStats<K>* const slot_stats = sm.slot_stats;
  float2* const slot_kl = sm.slot_kl;

  const ClusterWalk walk(a);
  const int c = walk.c, start = walk.start, len = walk.len;
  const int64_t mine = walk.mine;
  // The pipeline needs one iteration more per pass after the statistics (the last ones only
  // finish the rows still in flight).
  const int64_t iters = mine + (kJsd ? 2 : 1);
  const int lane = threadIdx.x & 31;
  const float k = exp2_scale(a.inv_temperature), beta = a.beta;
  auto student = [&](int64_t row) {
    return reinterpret_cast<const TS*>(a.student) + row * a.student_stride + start;
  };
  auto teacher = [&](int64_t row) {
    return reinterpret_cast<const TT*>(a.teacher) + row * a.teacher_stride + start;
  };

  // The rows in the later stages: their constants from the merged statistics.
  Row mix_row{};      // JSD: the row of the mixture stage
  bool mix_live = false;
  Row grad_row{};
  int64_t grad_at = 0;  // row index of the gradient stage
  float grad_center = 0.f, grad_gscale = 0.f;
  GradMode grad_mode = GradMode::None;

  // Whether the rows of the statistics stage (this iteration's, and the next one's, read one
  // iteration ahead so that its latency hides behind the loop) and of the merge are ignored.
  bool ignored_now = mine > 0 && walk.ignored(walk.row_at(0)), ignored_merge = false;
  for (int64_t i = 0; i < iters; ++i) {
    const bool ignored_next = i + 1 < mine && walk.ignored(walk.row_at(i + 1));
    const int64_t stats_at = walk.row_at(i);
    const bool stats_on = i < mine && !ignored_now;
    if (stats_on && threadIdx.x == 0) {
      // The block's whole slice of the new row, asked of L2 before the barrier wait, so the
      // DRAM stream runs through the wait and the reductions before the loop (a prefetch of
      // each thread's first 16 bytes covered a fifth of an 8-block cluster's slice). The
      // slice starts 16-byte aligned (rows_aligned, slices of whole 8-element chunks); a tail
      // short of 16 bytes is left to the loads.
      const unsigned sbytes = static_cast<unsigned>(len * sizeof(TS)) & ~15u;
      const unsigned tbytes = static_cast<unsigned>(len * sizeof(TT)) & ~15u;
      if (sbytes != 0) prefetch_l2_bulk(student(stats_at), sbytes);
      if (tbytes != 0) prefetch_l2_bulk(teacher(stats_at), tbytes);
    }
    bool mix_on = false;
    if (i > 0) {
      cluster_wait();
      const int p = static_cast<int>((i - 1) & 1);
      grad_mode = GradMode::None;
      if (kJsd && i >= 2 && i - 2 < mine) {
        // Row i − 2 finished its mixture pass in iteration i − 1: its loss, then its gradient.
        float loss = 0.f, center = 0.f;
        if (mix_live) {
          const float2 sums = sum_slots(&slot_kl[p], c, lane);
          center = sums.y;
          loss = jsd_loss(beta, sums.x, center);
        }
        grad_at = walk.row_at(i - 2);
        if (walk.writer) walk.per_row[grad_at] = clamp_loss(loss);
        grad_row = mix_row;
        grad_center = center;
        grad_gscale = grad_scale(walk.gfactor, loss);
        grad_mode = a.grad == 0 ? GradMode::None : (mix_live ? GradMode::Grad : GradMode::Zero);
      }
      if (i - 1 < mine) {
        // Row i − 1 finished its statistics in iteration i − 1.
        const int64_t row = walk.row_at(i - 1);
        bool live = false;
        Row r{};
        float loss = 0.f, center = 0.f;
        if (!ignored_merge) {
          const RowStats<K> st = merge_slots(&slot_stats[p], c, lane, k);
          // A side with no finite entry has no distribution: loss 0, gradient 0.
          live = !st.empty();
          r = row_of<K, kSeries>(st, a.inv_temperature, beta);
          if (!kJsd && live) loss = kl_loss(st, r, &center);
        }
        if (kJsd) {
          mix_row = r;
          mix_live = live;
          mix_on = live;
        } else {
          grad_at = row;
          if (walk.writer) walk.per_row[row] = clamp_loss(loss);
          grad_row = r;
          grad_center = center;
          grad_gscale = grad_scale(walk.gfactor, loss);
          grad_mode = a.grad == 0 ? GradMode::None : (live ? GradMode::Grad : GradMode::Zero);
        }
      }
    }

    using GradFn = GradStageOf<K, TS, TO, kFused, kSeries>;
    using GradOut = typename GradFn::Out;
    GradOut* g = grad_mode == GradMode::None
                     ? nullptr
                     : reinterpret_cast<GradOut*>(a.grad) + grad_at * a.grad_stride + start;
    if (grad_mode == GradMode::Zero) zero_row(g, len, true);
    const bool grad_on = grad_mode == GradMode::Grad;

    StatsPass<K, TS, TT> sp{k, student(stats_at), teacher(stats_at)};
    typename GradFn::Type gp =
        GradFn::make(grad_row_of<K, kSeries>(grad_row, grad_center, beta, grad_gscale), g, inv_cap);
    const TS* ss = stats_on ? sp.s : nullptr;
    const TS* gs = grad_on ? student(grad_at) : nullptr;
    const Stage<TS, TT, StatsPass<K, TS, TT>> stats_stage{ss, sp.t, sp};
    const Stage<TS, TT, typename GradFn::Type> grad_stage{gs, grad_on ? teacher(grad_at) : nullptr,
                                                          gp};
    if (kJsd) {
      JsdPass<kSeries> jp{mix_row};
      const int64_t mix_at = walk.row_at(i - 1);
      const Stage<TS, TT, JsdPass<kSeries>> mix_stage{mix_on ? student(mix_at) : nullptr,
                                             mix_on ? teacher(mix_at) : nullptr, jp};
      for_each_rows<kSteps>(len, stats_stage, mix_stage, grad_stage);
      if (mix_on) {
        const float pm = block_sum(jp.kl_pm, smem_sum);
        const float qm = block_sum(jp.kl_qm, smem_sum);
        if (threadIdx.x == 0) slot_kl[i & 1] = make_float2(pm, qm);
      }
    } else {
      NoPass none;
      const Stage<TS, TT, NoPass> no_stage{nullptr, nullptr, none};
      for_each_rows<kSteps>(len, stats_stage, grad_stage, no_stage);
    }
    if (stats_on) {
      const RowStats<K> m = block_stats(sp.stats, k, smem_stats);
      if (threadIdx.x == 0) slot_stats[i & 1] = m;
    }
    if (threadIdx.x == 0 && (stats_on || mix_on)) cluster_fence();  // publish the slots
    if (i + 1 < iters) {
      cluster_arrive_relaxed();
    } else {
      cluster_arrive_release();  // iters is uniform over the cluster: every thread takes this
    }
    ignored_merge = ignored_now;
    ignored_now = ignored_next;
  }
  cluster_wait();  // no block leaves while another may still read its slots
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace divergence
}  // namespace dk

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DK_DIVP_BODY(KIND, SERIES, TS, TT, STEPS) \
  dk::divergence::persistent_rows<KIND, TS, TT, STEPS, SERIES>(args);
#define DK_DIVP_FUSED_BODY(KIND, SERIES, TO, STEPS) \
  dk::divergence::persistent_rows<KIND, float, float, STEPS, SERIES, true, TO>(args, inv_cap);
#else
#define DK_DIVP_BODY(KIND, SERIES, TS, TT, STEPS) (void)args;
#define DK_DIVP_FUSED_BODY(KIND, SERIES, TO, STEPS) \
  (void)args;                                       \
  (void)inv_cap;
#endif

// Two block shapes (A/B until measured: cuda/DIVERGENCE.md, version 6):
//   dk_divcp_*:    512 threads, one step of loads in flight; two blocks per SM for the KL kinds
//                  (64 registers), one for JSD (three rows' constants);
//   dk_divcp256_*: 256 threads, two steps in flight (twice the bytes per thread), two blocks
//                  per SM: half the threads per row, so each thread has twice the chunks between
//                  two row reductions, whose cost per thread is fixed.
#define DK_DIVP_KERNEL(kname, KIND, SERIES, BLOCKS, sname, TS, tname, TT)                     \
  extern "C" __global__ void __launch_bounds__(512, BLOCKS)                                   \
      dk_divcp_##kname##_##sname##_##tname(const DkDivergenceArgs args) {                     \
    DK_DIVP_BODY(KIND, SERIES, TS, TT, 1)                                                     \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(256, 2)                                        \
      dk_divcp256_##kname##_##sname##_##tname(const DkDivergenceArgs args) {                  \
    DK_DIVP_BODY(KIND, SERIES, TS, TT, 2)                                                     \
  }

#define DK_DIVP_KERNELS_FOR_KIND(kname, KIND, SERIES, BLOCKS) \
  DK_DIV_DTYPE_PAIRS(DK_DIVP_KERNEL, kname, KIND, SERIES, BLOCKS)

// jsdx: JSD at extreme β (the series tails; see cuda/divergence.cu).
DK_DIVP_KERNELS_FOR_KIND(fkl, dk::divergence::Kind::ForwardKl, false, 2)
DK_DIVP_KERNELS_FOR_KIND(rkl, dk::divergence::Kind::ReverseKl, false, 2)
DK_DIVP_KERNELS_FOR_KIND(jsd, dk::divergence::Kind::Jsd, false, 1)
DK_DIVP_KERNELS_FOR_KIND(jsdx, dk::divergence::Kind::Jsd, true, 1)

// The fused linear divergence's chunk kernels (src/fused/cuda.rs): f32 logits S (student) and
// T (teacher); G (softcap slope applied when inv_cap ≠ 0, loss scale as in `scale`) in the
// GEMMs' dtype TO at args.grad with row stride args.grad_stride (TO elements), which may alias
// the logits of row r − Q for row r (see the top), or null for forward only.
#define DK_DIVP_FUSED_KERNEL(kname, KIND, SERIES, BLOCKS, oname, TO)                      \
  extern "C" __global__ void __launch_bounds__(512, BLOCKS)                               \
      dk_divcp_fused_##kname##_##oname(const DkDivergenceArgs args, float inv_cap) {      \
    DK_DIVP_FUSED_BODY(KIND, SERIES, TO, 1)                                               \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(256, 2)                                    \
      dk_divcp256_fused_##kname##_##oname(const DkDivergenceArgs args, float inv_cap) {   \
    DK_DIVP_FUSED_BODY(KIND, SERIES, TO, 2)                                               \
  }

#define DK_DIVP_FUSED_KERNELS_FOR_KIND(kname, KIND, SERIES, BLOCKS)      \
  DK_DIVP_FUSED_KERNEL(kname, KIND, SERIES, BLOCKS, f32, float)          \
  DK_DIVP_FUSED_KERNEL(kname, KIND, SERIES, BLOCKS, bf16, __nv_bfloat16) \
  DK_DIVP_FUSED_KERNEL(kname, KIND, SERIES, BLOCKS, f16, __half)

DK_DIVP_FUSED_KERNELS_FOR_KIND(fkl, dk::divergence::Kind::ForwardKl, false, 2)
DK_DIVP_FUSED_KERNELS_FOR_KIND(rkl, dk::divergence::Kind::ReverseKl, false, 2)
DK_DIVP_FUSED_KERNELS_FOR_KIND(jsd, dk::divergence::Kind::Jsd, false, 1)
DK_DIVP_FUSED_KERNELS_FOR_KIND(jsdx, dk::divergence::Kind::Jsd, true, 1)
