// Token-level divergence on Hopper (sm_90), version 9: persistent clusters whose blocks stage
// each row's slice in shared memory, the next row's slice copying while the current one is
// computed (cuda/DIVERGENCE.md, version 9; opt-in: DK_DIVERGENCE_CLUSTER=staged).
//
// Why. Every earlier kernel loses on one of two counts. The one-block kernel (version 1)
// streams at the copy rate but reads each row two or three times from DRAM (hundreds of rows in
// flight do not fit L2): 59 % of the floor for KL, 41 % for JSD. The cluster kernels keep the
// re-reads on chip but leave DRAM idle while they reduce: the smem kernel (version 2) copies a
// slice, waits for it, computes, and exits; the persistent one (version 6) re-reads from L2
// and pays each iteration's barrier and reductions with no load in flight but the next
// row's prefetch (H200: 45.5 % of the floor, DRAM 60 % busy, issue 54 %).
//
// Here a cluster of C blocks (one per SM: 512 threads of 80–110 registers) stays resident and
// walks the rows q, q + Q, q + 2Q, ... (Q clusters). A block holds its slice (cluster_slice
// elements of both inputs) of two rows in shared memory: while it computes every pass of row i
// from buffer i & 1, the cp.async copies of row i + 1 fill the other buffer, and when it is
// done with row i it queues row i + 2 into the buffer it just left. So each logit leaves DRAM
// once (the floor's traffic, whatever the passes), and DRAM has a whole slice of loads in
// flight per block at all times, through the reductions and cluster barriers too. The kernel
// is memory-bound as long as a row's passes, reductions and barriers take less time than its
// slice takes to arrive.
//
// Each thread copies the 8-element chunks it will compute (c = threadIdx.x, + blockDim.x, ...;
// the partial last chunk of a row by its owner, zero-filled past the row) and waits only for
// its own copies (cp.async.wait_group): no block barrier guards the buffers, and the refill of
// a buffer by a thread follows that thread's own last read of it. (That read has completed
// when the refill issues: instructions issue in order, and every value a pass reads is used
// by a store, a shuffle or a block barrier before the refill in program order; compiler_fence
// keeps the compiler from reordering around the copies.)
//
// Per row: statistics pass → block_stats → slot → cluster barrier → merge_slots (JSD: mixture
// pass → block sums → slot → barrier → sum_slots) → gradient pass from shared memory, 16-byte
// stores. JSD with a gradient (DK_ARGS_STASH_JSD; version 10): the mixture pass keeps each
// entry's log2(q/m) and the gradient pass reads it instead of forming it again, bitwise the
// same values for one exponential per element instead of three transcendental operations.
// DK_ARGS_STASH_JSD_EXP (versions 11 and 12, with a gradient or forward only): the statistics
// pass keeps the exponentials, so that the mixture pass forms no p or q and the gradient pass
// spends no MUFU operation.
// Slots are double-buffered by barrier phase: slot[p & 1] is written before barrier p and read
// by every block after it; its next write comes before barrier p + 2, after barrier
// p + 1, which no block passes before every block has arrived there, i.e. has consumed its
// reads of barrier p's slots (each read's value is used before the thread arrives again).
// Ignored rows skip the passes and the barriers in every block of the cluster alike (labels
// are per row), so the phases stay in step.
//
// The gradient may go in place over the student logits: a block writes only its own slice of
// row i, which is in its shared memory since before the statistics pass, and the copies in
// flight are of later rows.
//
// The fused linear divergence's variant (dk_divcq_fused_*: f32 logits S and T, G in the GEMMs'
// dtype with the softcap's slope; cuda/FUSED.md, version 4) writes row i's G over S's row i
// itself, with S's row bytes as G's row stride. A 16-bit G row covers the first half of the f32
// row's bytes, i.e. other blocks' slices; but no block reads S's row i from global memory after
// it has waited for its own copies of it, and every block has done that before it arrives at
// row i's first cluster barrier, which comes before any gradient pass of row i. (An ignored
// row is never copied, and its zero G has no reader either.)
//
// tests/kernel_sim replays the per-chunk arithmetic and the reductions (version 6's: only the
// scalar tail's thread and the masked-chunk path's operands differ);
// tests/divergence_persistent_sim runs this file on the host emulator with clusters and
// cp.async (both copy timing models), against the CPU backend.

#include "dk_cluster.cuh"
#include "dk_divergence_args.h"
#include "dk_divergence_cluster.cuh"
#include "dk_divergence_math.cuh"
#include "dk_divergence_passes.cuh"
#include "dk_mma.cuh"
#include "dk_reduce.cuh"
#include "dk_vec.cuh"

namespace dk {
namespace divergence {

// Threads per staged block (src/divergence/cluster.rs: Variant::Staged).
constexpr int kStagedThreads = 512;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

// Keeps the compiler from moving memory accesses across this point. cp_async_16 and
// cp_async_wait (dk_mma.cuh) are volatile asm without a memory clobber, and the kernels that
// share them follow each wait with __syncthreads(); here a thread's own wait is the only
// synchronisation of a buffer, so the plain shared-memory reads of a row must not be hoisted
// above it, nor sunk below the refill of the same buffer (a review's point).
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }

// A slice of one input in a row buffer (`slice` elements, a multiple of 8). An 8-element chunk
// of a 16-bit type is one 16-byte piece, stored at the chunk's place. An f32 chunk is two
// pieces, and they are stored apart: piece p of chunk c at byte p · (slice / 8) · 16 + c · 16.
// So when a warp's 32 threads read the same piece of 32 consecutive chunks, the 512 bytes are
// contiguous and the 16-byte loads are free of bank conflicts; with the chunks in place, a
// 32-byte stride between threads would make each load take twice the shared-memory cycles.
template <typename T>
struct SlicePieces {
  static constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));  // elements per piece
  static constexpr int kPieces = kVec / kPer16;                     // pieces per chunk
  // The byte offset of piece p of chunk c.
  static __device__ __forceinline__ int offset(int c, int p, int slice) {
    return p * (slice / kVec) * 16 + c * 16;
  }
  // The 8 elements of chunk c, widened.
  static __device__ __forceinline__ void load(const T* buf, int c, int slice, float (&out)[kVec]) {
    const unsigned char* b = reinterpret_cast<const unsigned char*>(buf);
    Raw8<T> r;
#pragma unroll
    for (int p = 0; p < kPieces; ++p) r.w[p] = *reinterpret_cast<const uint4*>(b + offset(c, p, slice));
    unpack8(r, out);
  }
  // Element e of the slice.
  static __device__ __forceinline__ float element(const T* buf, int e, int slice) {
    return to_float(*at(buf, e, slice));
  }
  // Where element e of the slice is.
  static __device__ __forceinline__ T* at(const T* buf, int e, int slice) {
    const unsigned char* b = reinterpret_cast<const unsigned char*>(buf);
    const int c = e / kVec, r = e % kVec;
    return const_cast<T*>(reinterpret_cast<const T*>(b + offset(c, r / kPer16, slice)) + r % kPer16);
  }
};

// Stores the N values of the chunk at element i (a whole chunk when N is 8: two 16-byte stores)
// into an f32 slice laid out as SlicePieces<float> says: the JSD stash.
template <int N>
__device__ __forceinline__ void store_f32_chunk(float* buf, int i, int slice, const float (&v)[N]) {
  using P = SlicePieces<float>;
  if constexpr (N == kVec) {
    unsigned char* b = reinterpret_cast<unsigned char*>(buf);
#pragma unroll
    for (int p = 0; p < P::kPieces; ++p) {
      *reinterpret_cast<float4*>(b + P::offset(i / kVec, p, slice)) =
          make_float4(v[4 * p], v[4 * p + 1], v[4 * p + 2], v[4 * p + 3]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) *P::at(buf, i + k, slice) = v[k];
  }
}

// Queues the copy of this thread's chunks of `len` elements at `src` (16-byte aligned) into
// `dst` (a slice of `slice` elements, laid out as SlicePieces says): the chunks c = threadIdx.x +
// j · blockDim.x, 16 bytes per cp.async, the partial last chunk with cp.async's zero-fill (only
// its valid bytes are read).
template <typename T>
__device__ __forceinline__ void stage_chunks(T* dst, const T* src, int len, int slice) {
  using P = SlicePieces<T>;
  unsigned char* d = reinterpret_cast<unsigned char*>(dst);
  const int chunks = (len + kVec - 1) / kVec;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
#pragma unroll
    for (int p = 0; p < P::kPieces; ++p) {
      const int e = c * kVec + p * P::kPer16;
      const int valid = max(0, min(P::kPer16, len - e));
      cp_async_16(smem_addr(d + P::offset(c, p, slice)), valid > 0 ? src + e : src,
                  valid * static_cast<int>(sizeof(T)));
    }
  }
}

// Runs pass `f` over the staged slice (`len` elements at ss / ts in shared memory, slices of
// `slice`), each thread over the chunks it copied: whole chunks by 16-byte loads, the partial
// last chunk element by element by its owner.
template <typename TS, typename TT, typename F>
__device__ __forceinline__ void staged_pass(const TS* ss, const TT* ts, int len, int slice,
                                            F& f) {
  const int full = len / kVec;
  for (int c = threadIdx.x; c < full; c += blockDim.x) {
    float sv[kVec], tv[kVec];
    SlicePieces<TS>::load(ss, c, slice, sv);
    SlicePieces<TT>::load(ts, c, slice, tv);
    f.template chunk<kVec>(c * kVec, sv, tv);
  }
  if (full * kVec < len && static_cast<int>(threadIdx.x) == full % static_cast<int>(blockDim.x)) {
    for (int i = full * kVec; i < len; ++i) {
      const float sv[1] = {SlicePieces<TS>::element(ss, i, slice)};
      const float tv[1] = {SlicePieces<TT>::element(ts, i, slice)};
      f.template chunk<1>(i, sv, tv);
    }
  }
}

// The statistics pass over a staged slice: StatsPass's arithmetic, but a chunk holding a masked
// logit is summed again from the values in hand (StatsPass reads it again from memory so that
// they need not stay live in the register-bound kernels; here registers are not the limit, and
// an f32 chunk does not lie contiguously in the buffer).
template <Kind K>
struct StagedStatsPass {
  float k;
  RowStats<K> stats;
  template <int N>
  __device__ __forceinline__ void chunk(int, const float (&sv)[N], const float (&tv)[N]) {
    if (stats.add(tv, sv, k)) stats.add_masked(tv, sv);
  }
};

// Loads the N values of the chunk at element i of a slice laid out as SlicePieces<T> says (a
// whole chunk when N is 8), widened.
template <typename T, int N>
__device__ __forceinline__ void load_chunk_at(const T* buf, int i, int slice, float (&v)[N]) {
  if constexpr (N == kVec) {
    SlicePieces<T>::load(buf, i / kVec, slice, v);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = SlicePieces<T>::element(buf, i + k, slice);
  }
}

// The JSD mixture pass (JsdPass's sums, the same terms) that also keeps each entry's log2(q/m)
// in `stash` (an f32 slice, SlicePieces<float>'s layout) for the gradient pass: there it saves
// an exponential and a logarithm per element (cuda/DIVERGENCE.md, version 10). Each entry's
// value goes where its chunk's owner reads it, so the stash needs no synchronisation either;
// it may be the teacher's own f32 slice, each chunk overwritten after it is read.
template <bool kSeries>
struct StashJsdPass {
  Row row;
  float* stash;
  int slice;
  float kl_pm = 0.f, kl_qm = 0.f;
  template <int N>
  __device__ __forceinline__ void chunk(int i, const float (&s)[N], const float (&t)[N]) {
    float lq[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float2 terms = jsd_terms<kSeries>(row, s[k], t[k], &lq[k]);
      kl_pm += terms.x;
      kl_qm += terms.y;
    }
    store_f32_chunk(stash, i, slice, lq);
  }
};

// Version 11 (DK_ARGS_STASH_JSD_EXP; cuda/DIVERGENCE.md): the JSD statistics pass keeps each
// entry's exponentials, so that the mixture pass spends no MUFU operation on p and q and the
// gradient pass none at all. It takes two passes over the staged slice: first the thread's
// maxima of its entries (no exponential; fmaxf drops NaN as RowStats::add does) ...
struct MaxPass {
  float mt = -INFINITY, ms = -INFINITY;
  template <int N>
  __device__ __forceinline__ void chunk(int, const float (&s)[N], const float (&t)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      mt = fmaxf(mt, t[j]);
      ms = fmaxf(ms, s[j]);
    }
  }
};

// ... then 2^X and 2^Y relative to those maxima (nt, ns: RowStats::shift_of them), summed in
// the order RowStats::add sums them and kept in `et` and `es` (f32 slices, SlicePieces<float>'s
// layout): the thread's RowStats with no rebase.
struct KeepExpStatsPass {
  float k, nt, ns;
  float* et;
  float* es;
  int slice;
  float st = 0.f, ss = 0.f;
  template <int N>
  __device__ __forceinline__ void chunk(int i, const float (&s)[N], const float (&t)[N]) {
    float a[N], b[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      a[j] = fast_exp2(mul_rn(t[j] + nt, k));
      b[j] = fast_exp2(mul_rn(s[j] + ns, k));
      st += a[j];
      ss += b[j];
    }
    store_f32_chunk(et, i, slice, a);
    store_f32_chunk(es, i, slice, b);
  }
};

// The mixture pass from the kept exponentials. With pt = 2^((Mt_thread − Mt)·k) / St, the
// thread's factor to the row's maxima and sums (qt likewise), p = 2^X_thread · pt and
// q = 2^Y_thread · qt, so the thread's Σ p·log2(p/m) is pt · Σ 2^X_thread · log2(p/m): the pass
// sums the kept exponentials against the log ratios (one FFMA each) and the caller applies pt
// and qt once (`sums`). The log ratios come from w = ((s − Ms) − (t − Mt))·k + c2
// (Row::mixture_w_of, version 12: no X or Y is formed). log2(q/m) is kept over 2^X_thread (read
// first). Identical rows still give log ratios of exactly 0, hence a loss and gradient of
// exactly 0.
template <bool kSeries>
struct KeptJsdPass {
  Row row;
  float* et;
  const float* es;
  int slice;
  float sum_p = 0.f, sum_q = 0.f;  // Σ 2^X_thread · log2(p/m), Σ 2^Y_thread · log2(q/m)
  template <int N>
  __device__ __forceinline__ void chunk(int i, const float (&s)[N], const float (&t)[N]) {
    float a[N], b[N], lq[N];
    load_chunk_at(static_cast<const float*>(et), i, slice, a);
    load_chunk_at(es, i, slice, b);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float2 lr = row.log2_ratios_of_w<kSeries>(row.mixture_w_of(s[j], t[j]));
      lq[j] = lr.y;
      sum_p = fmaf(a[j], lr.x, sum_p);
      sum_q = fmaf(b[j], lr.y, sum_q);
    }
    store_f32_chunk(et, i, slice, lq);
  }
  // The thread's (Σ p·log2(p/m), Σ q·log2(q/m)) from the factors pt and qt.
  __device__ __forceinline__ float2 sums(float pt, float qt) const {
    return make_float2(sum_p * pt, sum_q * qt);
  }
};

// The gradient pass from the kept 2^Y_thread and log2(q/m) (its two operands): `row.gq`
// already carries the thread's factor 2^((Ms_thread − Ms)·k). The fused variant's softcap slope
// needs the student logit, read from the row buffer `ss` only then.
template <typename TS, typename Out, bool kFused>
struct KeptJsdGradPass {
  GradRow row;
  Out* g;
  float inv_cap;
  const TS* ss;
  int slice;
  template <int N>
  __device__ __forceinline__ void chunk(int i, const float (&es)[N], const float (&lq)[N]) {
    float out[N];
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = jsd_grad_of(row, es[j], lq[j]);
    if (kFused && inv_cap != 0.f) {
      float sv[N];
      load_chunk_at(ss, i, slice, sv);
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] *= softcap_slope(sv[j], inv_cap);
    }
    store_chunk(g + i, out);
  }
};

// kSeries: Row's JSD mode (the `jsdx` kernels, for extreme β). kFused: the fused linear
// divergence's variant (f32 logits S and T; G, the gradient times the softcap's slope
// inv_cap, in TO over S's own row: see the top).
template <Kind K, typename TS, typename TT, bool kSeries, bool kFused = false, typename TO = TS>
__device__ __forceinline__ void staged_rows(const DkDivergenceArgs& a, float inv_cap = 0.f) {
  static_assert(kFused || sizeof(TO) == sizeof(TS), "TO is TS outside the fused variant");
  constexpr bool kJsd = K == Kind::Jsd;
  using GradFn = GradStageOf<K, TS, TO, kFused, kSeries>;
  using StashedGradFn = GradStageOf<K, TS, TO, kFused, kSeries, kJsd>;
  using GradOut = typename GradFn::Out;
  extern __shared__ __align__(16) unsigned char dk_divcq_smem[];
  // Scratch and slots (slots by barrier phase), then the two row buffers
  // (src/divergence/cluster.rs staged_smem_bytes sizes the launch).
  ClusterScratch<K>& sm = *reinterpret_cast<ClusterScratch<K>*>(dk_divcq_smem);

  const ClusterWalk walk(a);
  const int c = walk.c, slice = walk.slice, start = walk.start, len = walk.len;
  // Buffer b: the student slice, then the teacher slice (slice is a multiple of 8 elements,
  // so both start 16-byte aligned).
  const size_t buffer_bytes = static_cast<size_t>(slice) * (sizeof(TS) + sizeof(TT));
  auto student_buf = [&](int64_t i) {
    return reinterpret_cast<TS*>(dk_divcq_smem + kClusterScratchBytes + (i & 1) * buffer_bytes);
  };
  auto teacher_buf = [&](int64_t i) {
    return reinterpret_cast<TT*>(dk_divcq_smem + kClusterScratchBytes + (i & 1) * buffer_bytes +
                                 static_cast<size_t>(slice) * sizeof(TS));
  };
  // JSD with a gradient and DK_ARGS_STASH_JSD: the mixture pass keeps each entry's log2(q/m)
  // for the gradient pass, over the teacher's slice of the row when it is f32 (the gradient
  // pass reads only the student's), else in a slice of its own after the two row buffers
  // (one for every row: a thread's entries of row i + 1 are written after it has read row i's).
  const bool stash = kJsd && (a.options & DK_ARGS_STASH_JSD) != 0 && a.grad != 0;
  // The f32 slices after the two row buffers (version 10's stash, or version 11's two).
  float* const extra =
      reinterpret_cast<float*>(dk_divcq_smem + kClusterScratchBytes + 2 * buffer_bytes);
  auto stash_buf = [&](int64_t i) {
    if constexpr (sizeof(TT) == sizeof(float)) {
      return reinterpret_cast<float*>(teacher_buf(i));
    } else {
      (void)i;
      return extra;
    }
  };
  // DK_ARGS_STASH_JSD_EXP (version 11; forward only too since version 12): the statistics pass
  // keeps 2^X and 2^Y relative to the thread's own maxima in two f32 slices after the row
  // buffers (log2(q/m) then goes over 2^X).
  const bool keep_exp = kJsd && (a.options & DK_ARGS_STASH_JSD_EXP) != 0;
  float* const kept_t = extra;
  float* const kept_s = extra + slice;
  const int lane = threadIdx.x & 31;
  const float k = exp2_scale(a.inv_temperature), beta = a.beta;

  // Queues this thread's chunks of the i-th row of the walk into buffer i & 1 (nothing for an
  // ignored row or past the walk's end) and closes a copy group either way, so that group i is
  // always row i's.
  auto stage = [&](int64_t i) {
    if (i < walk.mine) {
      const int64_t row = walk.row_at(i);
      if (!walk.ignored(row)) {
        stage_chunks(student_buf(i),
                     reinterpret_cast<const TS*>(a.student) + row * a.student_stride + start, len,
                     slice);
        stage_chunks(teacher_buf(i),
                     reinterpret_cast<const TT*>(a.teacher) + row * a.teacher_stride + start, len,
                     slice);
      }
    }
    cp_async_commit();
  };

  stage(0);
  stage(1);
  int phase = 0;  // cluster barriers passed: slot parity
  for (int64_t i = 0; i < walk.mine; ++i) {
    const int64_t row = walk.row_at(i);
    GradOut* g =
        a.grad == 0 ? nullptr : reinterpret_cast<GradOut*>(a.grad) + row * a.grad_stride + start;
    cp_async_wait<1>();  // group i (this row) has landed; group i + 1 may be in flight
    compiler_fence();    // no read of the buffer moves above the wait
    if (walk.ignored(row)) {  // the same branch in every block of the cluster
      if (walk.writer) walk.per_row[row] = 0.f;
      if (g) zero_row(g, len, true);
    } else {
      const TS* ss = student_buf(i);
      const TT* ts = teacher_buf(i);
      RowStats<K> mine;  // keep_exp: its maxima are the thread's own, kept's reference
      if (keep_exp) {
        MaxPass mp;
        staged_pass(ss, ts, len, slice, mp);
        KeepExpStatsPass kp{k,      RowStats<K>::shift_of(mp.mt), RowStats<K>::shift_of(mp.ms),
                            kept_t, kept_s,                       slice};
        staged_pass(ss, ts, len, slice, kp);
        mine.mt = mp.mt;
        mine.ms = mp.ms;
        mine.st = kp.st;
        mine.ss = kp.ss;
        mine.k = k;
      } else {
        StagedStatsPass<K> sp{k};
        staged_pass(ss, ts, len, slice, sp);
        mine = sp.stats;
      }
      const RowStats<K> block = block_stats(mine, k, sm.stats);
      if (threadIdx.x == 0) {
        sm.slot_stats[phase & 1] = block;
        cluster_fence();  // publish the slot
      }
      cluster_arrive_relaxed();
      cluster_wait();
      const RowStats<K> st = merge_slots(&sm.slot_stats[phase & 1], c, lane, k);
      ++phase;
      // A side with no finite entry has no distribution: loss 0, gradient 0.
      const bool live = !st.empty();
      const Row r = row_of<K, kSeries>(st, a.inv_temperature, beta);
      // keep_exp: the thread's factors from its own maxima to the row's (mixture and gradient).
      const float to_row_t = rescale2(mine.mt, st.mt, k), to_row_s = rescale2(mine.ms, st.ms, k);
      float loss = 0.f, center = 0.f;
      if (!kJsd && live) loss = kl_loss(st, r, &center);
      if (kJsd) {
        // Every block takes this branch (live is the same everywhere): the barrier is uniform.
        // The thread's sums of the mixture pass run by `jp` (0 for a row that is not live).
        float pm = 0.f, qm = 0.f;
        auto mixture = [&](auto&& jp) {
          staged_pass(ss, ts, len, slice, jp);
          pm = jp.kl_pm;
          qm = jp.kl_qm;
        };
        if (live && keep_exp) {
          KeptJsdPass<kSeries> jp{r, kept_t, kept_s, slice};
          staged_pass(ss, ts, len, slice, jp);
          const float2 t = jp.sums(to_row_t * r.inv_st, to_row_s * r.inv_ss);
          pm = t.x;
          qm = t.y;
        } else if (live && stash) {
          mixture(StashJsdPass<kSeries>{r, stash_buf(i), slice});
        } else if (live) {
          mixture(JsdPass<kSeries>{r});
        }
        pm = block_sum(pm, sm.sums);
        qm = block_sum(qm, sm.sums);
        if (threadIdx.x == 0) {
          sm.slot_kl[phase & 1] = make_float2(pm, qm);
          cluster_fence();
        }
        cluster_arrive_relaxed();
        cluster_wait();
        const float2 sums = sum_slots(&sm.slot_kl[phase & 1], c, lane);
        ++phase;
        center = sums.y;
        loss = live ? jsd_loss(beta, sums.x, center) : 0.f;
      }
      if (walk.writer) walk.per_row[row] = clamp_loss(loss);
      if (g) {
        if (!live) {
          zero_row(g, len, true);
        } else {
          const GradRow gr =
              grad_row_of<K, kSeries>(r, center, beta, grad_scale(walk.gfactor, loss));
          if (keep_exp) {  // from the kept 2^Y_thread and log2(q/m)
            GradRow gk = gr;
            gk.gq = mul_rn(gr.gq, to_row_s);
            KeptJsdGradPass<TS, GradOut, kFused> gp{gk, g, inv_cap, ss, slice};
            staged_pass(static_cast<const float*>(kept_s), static_cast<const float*>(kept_t), len,
                        slice, gp);
          } else if (stash) {  // from the student's slice and the kept log2(q/m)
            typename StashedGradFn::Type gp = StashedGradFn::make(gr, g, inv_cap);
            staged_pass(ss, static_cast<const float*>(stash_buf(i)), len, slice, gp);
          } else {
            typename GradFn::Type gp = GradFn::make(gr, g, inv_cap);
            staged_pass(ss, ts, len, slice, gp);
          }
        }
      }
    }
    compiler_fence();  // no read of the buffer moves below its refill
    stage(i + 2);      // into the buffer this thread has just finished reading
  }
  cp_async_wait<0>();
  // No block leaves while another may still read its slots (the last barrier's reads).
  cluster_arrive_release();
  cluster_wait();
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace divergence
}  // namespace dk

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DK_DIVQ_BODY(KIND, SERIES, TS, TT) dk::divergence::staged_rows<KIND, TS, TT, SERIES>(args);
#define DK_DIVQ_FUSED_BODY(KIND, SERIES, TO) \
  dk::divergence::staged_rows<KIND, float, float, SERIES, true, TO>(args, inv_cap);
#else
#define DK_DIVQ_BODY(KIND, SERIES, TS, TT) (void)args;
#define DK_DIVQ_FUSED_BODY(KIND, SERIES, TO) \
  (void)args;                                \
  (void)inv_cap;
#endif

// One block shape: 512 threads, one block per SM (its registers take more than half of the
// register file; the launcher sizes C and the grid).
#define DK_DIVQ_KERNEL(kname, KIND, SERIES, sname, TS, tname, TT)                           \
  extern "C" __global__ void __launch_bounds__(dk::divergence::kStagedThreads, 1)           \
      dk_divcq_##kname##_##sname##_##tname(const DkDivergenceArgs args) {                   \
    DK_DIVQ_BODY(KIND, SERIES, TS, TT)                                                      \
  }

#define DK_DIVQ_KERNELS_FOR_KIND(kname, KIND, SERIES) \
  DK_DIV_DTYPE_PAIRS(DK_DIVQ_KERNEL, kname, KIND, SERIES)

// jsdx: JSD at extreme β (the series tails; see cuda/divergence.cu).
DK_DIVQ_KERNELS_FOR_KIND(fkl, dk::divergence::Kind::ForwardKl, false)
DK_DIVQ_KERNELS_FOR_KIND(rkl, dk::divergence::Kind::ReverseKl, false)
DK_DIVQ_KERNELS_FOR_KIND(jsd, dk::divergence::Kind::Jsd, false)
DK_DIVQ_KERNELS_FOR_KIND(jsdx, dk::divergence::Kind::Jsd, true)

// The fused linear divergence's chunk kernels (src/divergence/cuda.rs, fused_rows): f32 logits
// S (student) and T (teacher); G (softcap slope applied when inv_cap ≠ 0, loss scale as in
// `scale`) in the GEMMs' dtype TO at args.grad = S, row stride args.grad_stride (TO elements:
// S's row bytes), i.e. over S's own rows; or args.grad = 0 for forward only.
#define DK_DIVQ_FUSED_KERNEL(kname, KIND, SERIES, oname, TO)                                \
  extern "C" __global__ void __launch_bounds__(dk::divergence::kStagedThreads, 1)           \
      dk_divcq_fused_##kname##_##oname(const DkDivergenceArgs args, float inv_cap) {        \
    DK_DIVQ_FUSED_BODY(KIND, SERIES, TO)                                                    \
  }

#define DK_DIVQ_FUSED_KERNELS_FOR_KIND(kname, KIND, SERIES)      \
  DK_DIVQ_FUSED_KERNEL(kname, KIND, SERIES, f32, float)          \
  DK_DIVQ_FUSED_KERNEL(kname, KIND, SERIES, bf16, __nv_bfloat16) \
  DK_DIVQ_FUSED_KERNEL(kname, KIND, SERIES, f16, __half)

DK_DIVQ_FUSED_KERNELS_FOR_KIND(fkl, dk::divergence::Kind::ForwardKl, false)
DK_DIVQ_FUSED_KERNELS_FOR_KIND(rkl, dk::divergence::Kind::ReverseKl, false)
DK_DIVQ_FUSED_KERNELS_FOR_KIND(jsd, dk::divergence::Kind::Jsd, false)
DK_DIVQ_FUSED_KERNELS_FOR_KIND(jsdx, dk::divergence::Kind::Jsd, true)
