// The per-chunk work of each divergence pass (statistics, JSD sums, gradient) as functors over
// 8-element (or 1-element tail) chunks, and the loop that feeds them, shared by the
// one-block-per-row kernel (divergence.cu) and the Hopper cluster kernels
// (divergence_cluster.cu).
#pragma once

#include "dk_divergence_math.cuh"
#include "dk_reduce.cuh"
#include "dk_vec.cuh"

// Every (student, teacher) dtype pair the divergence kernels are compiled for: expands to
// M(args..., sname, TS, tname, TT) once per pair (the kernel files' instantiation lists).
#define DK_DIV_DTYPE_PAIRS(M, ...)                         \
  M(__VA_ARGS__, f32, float, f32, float)                   \
  M(__VA_ARGS__, f32, float, bf16, __nv_bfloat16)          \
  M(__VA_ARGS__, f32, float, f16, __half)                  \
  M(__VA_ARGS__, bf16, __nv_bfloat16, f32, float)          \
  M(__VA_ARGS__, bf16, __nv_bfloat16, bf16, __nv_bfloat16) \
  M(__VA_ARGS__, bf16, __nv_bfloat16, f16, __half)         \
  M(__VA_ARGS__, f16, __half, f32, float)                  \
  M(__VA_ARGS__, f16, __half, bf16, __nv_bfloat16)         \
  M(__VA_ARGS__, f16, __half, f16, __half)

namespace dk {
namespace divergence {

// Calls f(i, s_i, t_i) for the thread's share of the row, 8 elements per 16-byte step when
// both rows are aligned, then the tail (and everything, when unaligned) one element at a time.
// With kSteps = 2 the vector loop issues the loads of two steps before it computes either, so
// each thread keeps twice the bytes in flight (the stream cluster kernel, with few blocks per
// SM); chunks still reach f in the same order (c, c + blockDim, ...). kSteps = 1 keeps the
// one-block kernel at 32 registers (eight blocks of 256 threads per SM; at 40, before the vector
// reload of masked chunks, six; two steps took it to 47).
template <int kSteps = 1, typename TS, typename TT, typename F>
__device__ __forceinline__ void for_each(const TS* s, const TT* t, int v, bool vec, F&& f) {
  static_assert(kSteps == 1 || kSteps == 2, "one or two steps in flight");
  int start = 0;
  if (vec) {
    const int chunks = v / kVec;
    const int step = blockDim.x;
    int c = threadIdx.x;
    if (kSteps == 2) {
      for (; c + step < chunks; c += 2 * step) {
        const Raw8<TS> s0 = load_raw8(s + c * kVec), s1 = load_raw8(s + (c + step) * kVec);
        const Raw8<TT> t0 = load_raw8(t + c * kVec), t1 = load_raw8(t + (c + step) * kVec);
        float sv[kVec], tv[kVec];
        unpack8(s0, sv);
        unpack8(t0, tv);
        f.template chunk<kVec>(c * kVec, sv, tv);
        unpack8(s1, sv);
        unpack8(t1, tv);
        f.template chunk<kVec>((c + step) * kVec, sv, tv);
      }
    }
    for (; c < chunks; c += step) {
      float sv[kVec], tv[kVec];
      load8(s + c * kVec, sv);
      load8(t + c * kVec, tv);
      f.template chunk<kVec>(c * kVec, sv, tv);
    }
    start = chunks * kVec;
  }
  for (int i = start + threadIdx.x; i < v; i += blockDim.x) {
    const float sv[1] = {to_float(s[i])}, tv[1] = {to_float(t[i])};
    f.template chunk<1>(i, sv, tv);
  }
}

// Pass 1: the row statistics, from the raw logits (RowStats scales them by k = log2(e) / T).
// `s` and `t` are the pointers the pass walks (global or shared memory): a chunk holding a
// masked logit is read again from there for RowStats::add_masked, with vector loads when
// kVectorReload (scalar ones keep fewer registers live: the shared-memory cluster kernel, at
// its 40-register bound, spilled with vector reloads).
template <Kind K, typename TS, typename TT, bool kVectorReload = true>
struct StatsPass {
  float k;
  const TS* s;
  const TT* t;
  RowStats<K> stats;
  template <int N>
  __device__ __forceinline__ void chunk(int i, const float (&sv)[N], const float (&tv)[N]) {
    if (stats.add(tv, sv, k)) {
      float s2[N], t2[N];
      if constexpr (kVectorReload && N == kVec) {  // 16-byte aligned (a vector loop's chunk)
        reload_chunk(s + i, s2);
        reload_chunk(t + i, t2);
      } else {
        reload(s + i, s2);
        reload(t + i, t2);
      }
      stats.add_masked(t2, s2);
    }
  }
};

// Pass 2 of JSD: Σ p (log p - log m) and Σ q (log q - log m) (kSeries: Row's JSD mode).
template <bool kSeries = false>
struct JsdPass {
  Row row;
  float kl_pm = 0.f, kl_qm = 0.f;
  template <int N>
  __device__ __forceinline__ void chunk(int, const float (&s)[N], const float (&t)[N]) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float2 terms = jsd_terms<kSeries>(row, s[k], t[k]);
      kl_pm += terms.x;
      kl_qm += terms.y;
    }
  }
};

// A chunk's N values to p: one 16-byte store of 8 when N is the vector width, else one by one.
template <int N, typename T>
__device__ __forceinline__ void store_chunk(T* p, const float (&out)[N]) {
  if (N == kVec) {
    store8(p, reinterpret_cast<const float(&)[kVec]>(out));
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = from_float<T>(out[k]);
  }
}

// Final pass: the gradient, stored 8 at a time when aligned (kSeries: Row's JSD mode;
// kStashed: the second operand is each entry's log2(q/m) kept by the mixture pass, not the
// teacher logit: grad_entry_from).
template <Kind K, typename TS, bool kSeries = false, bool kStashed = false>
struct GradPass {
  GradRow row;  // grad_row_of<K>(row constants, center, β, gscale)
  TS* g;
  template <int N>
  __device__ __forceinline__ void chunk(int i, const float (&s)[N], const float (&t)[N]) {
    float out[N];
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = grad_entry_from<K, kSeries, kStashed>(row, s[k], t[k]);
    store_chunk(g + i, out);
  }
};

// The fused variant's gradient stage: G = the gradient w.r.t. the capped logits times the
// softcap's slope (softcap_slope of the capped student logit), in TO. Without a
// softcap (inv_cap = 0, uniform) it is GradPass's store. Same entries as FusedGradSink
// (cuda/divergence.cu), the one-block kernel's. Used by the persistent and staged cluster
// kernels' fused variants (divergence_persistent.cu, divergence_staged.cu). kStashed: as
// GradPass's.
template <Kind K, typename TO, bool kSeries, bool kStashed = false>
struct FusedGradPass {
  GradRow row;
  TO* g;
  float inv_cap;
  template <int N>
  __device__ __forceinline__ void chunk(int i, const float (&s)[N], const float (&t)[N]) {
    float out[N];
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = grad_entry_from<K, kSeries, kStashed>(row, s[k], t[k]);
    if (inv_cap != 0.f) {
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] *= softcap_slope(s[k], inv_cap);
    }
    store_chunk(g + i, out);
  }
};

// The gradient stage's functor: GradPass over TS for the divergence kernels, FusedGradPass
// over TO for the fused linear divergence's (kFused); kSeries: Row's JSD mode; kStashed: the
// passes' second operand is the kept log2(q/m) (GradPass).
template <Kind K, typename TS, typename TO, bool kFused, bool kSeries, bool kStashed = false>
struct GradStageOf {
  using Out = TS;
  using Type = GradPass<K, TS, kSeries, kStashed>;
  static __device__ __forceinline__ Type make(const GradRow& r, TS* g, float) { return {r, g}; }
};
template <Kind K, typename TS, typename TO, bool kSeries, bool kStashed>
struct GradStageOf<K, TS, TO, true, kSeries, kStashed> {
  using Out = TO;
  using Type = FusedGradPass<K, TO, kSeries, kStashed>;
  static __device__ __forceinline__ Type make(const GradRow& r, TO* g, float inv_cap) {
    return {r, g, inv_cap};
  }
};

// The statistics of a warp in two phases, every lane ending with the same bits: the maxima
// by a butterfly of fmaxf (exact, so the order does not matter), one rebase of each lane's
// state to them, then the three sums by a butterfly of additions (commutative, so the lanes of
// a pair agree). A butterfly of RowStats::merge (block_merge) rebases at every level instead:
// ~84 instructions per level and state against ~12 here (sm_90a SASS), which matters where a
// block has only a few chunks per thread between reductions (the persistent cluster kernel).
// Lanes with nothing accumulated (maxima -inf, sums 0) add 0. k = log2(e) / T of the row.
// tests/kernel_sim replays this order (block_reduce_stats in divergence_sim.cpp).
// With `lanes` < 32 (a power of two), only groups of that many lanes are combined (the
// persistent kernel's merge of its C cluster slots).
template <Kind K>
__device__ __forceinline__ RowStats<K> warp_stats(RowStats<K> x, float k, int lanes = 32) {
  float mt = x.mt, ms = x.ms;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    if (o >= lanes) continue;
    mt = fmaxf(mt, __shfl_xor_sync(kFullMask, mt, o));
    ms = fmaxf(ms, __shfl_xor_sync(kFullMask, ms, o));
  }
  x.k = k;
  x.rebase(mt, ms);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    if (o >= lanes) continue;
    x.st += __shfl_xor_sync(kFullMask, x.st, o);
    x.ss += __shfl_xor_sync(kFullMask, x.ss, o);
    if (RowStats<K>::kAcc) x.acc += __shfl_xor_sync(kFullMask, x.acc, o);
  }
  return x;
}

// The statistics of the block: warp_stats within each warp, then over the warps' results
// (dk_reduce.cuh's block_reduce). `smem` holds at least 32 states.
template <Kind K>
__device__ __forceinline__ RowStats<K> block_stats(const RowStats<K>& x, float k,
                                                   RowStats<K>* smem) {
  return block_reduce(x, smem, [k](const RowStats<K>& s) { return warp_stats(s, k); });
}

// Zeroes a gradient row (ignored or fully masked rows).
template <typename TS>
__device__ __forceinline__ void zero_row(TS* g, int v, bool vec) {
  int start = 0;
  if (vec) {
    const float z[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const int chunks = v / kVec;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) store8(g + c * kVec, z);
    start = chunks * kVec;
  }
  for (int i = start + threadIdx.x; i < v; i += blockDim.x) g[i] = from_float<TS>(0.f);
}

}  // namespace divergence
}  // namespace dk
