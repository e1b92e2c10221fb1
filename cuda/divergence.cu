// Token-level divergence kernels: forward KL, reverse KL and generalized JSD between student
// and teacher logits, loss and gradient w.r.t. the student logits.
//
// One block per row. Passes over the row (each a stream of 16-byte loads):
//   forward / reverse KL: 1) online max + sum-exp of both sides and the KL sum, 2) gradient;
//   JSD:                  1) online max + sum-exp, 2) KL(p||m) and KL(q||m), 3) gradient.
// Forward-only skips the gradient pass. Reductions are fixed trees: results are bitwise
// reproducible. dk_div_prepare computes the loss scale on the device (no host sync) and
// dk_div_finish reduces the per-row losses in a fixed order.
//
// The math (a = t/T, b = s/T, p = softmax(a), q = softmax(b)):
//   forward KL = Σ p (log p - log q),               dL/db = q - p
//   reverse KL = Σ q (log q - log p),               dL/db = q (log q - log p - L)
//   JSD        = β KL(p||m) + (1-β) KL(q||m),       dL/db = (1-β) q (log q - log m - KL(q||m))
// and dL/ds = scale / T · dL/db. Everything is computed relative to the row maxima (see
// RowStats and Row) so f32 keeps the loss accurate to ~1e-6 relative.

#include "dk_divergence_args.h"
#include "dk_divergence_math.cuh"
#include "dk_divergence_passes.cuh"
#include "dk_reduce.cuh"
#include "dk_vec.cuh"

namespace dk {
namespace divergence {

constexpr int kThreads = 256;

// This block's row of a [n, ·] buffer with the given row stride (elements), or null for none.
template <typename T>
__device__ __forceinline__ T* block_row(uint64_t base, int64_t stride) {
  return base == 0 ? nullptr : reinterpret_cast<T*>(base) + static_cast<int64_t>(blockIdx.x) * stride;
}

// Where the final pass puts the gradient: a TS row of the caller (separate or in place over the
// student logits, 8 elements per 16-byte step by the thread that read them).
template <Kind K, typename TS>
struct GradSink {
  TS* g;  // this row of the gradient, or null for forward only
  __device__ __forceinline__ bool wanted() const { return g != nullptr; }
  __device__ __forceinline__ bool aligned() const { return g == nullptr || aligned16(g); }
  __device__ __forceinline__ void zero(int v, bool vec) const { zero_row(g, v, vec); }
  template <bool kSeries, typename TT>
  __device__ __forceinline__ void write(const TS* s, const TT* t, int v, bool vec,
                                        const GradRow& gr) const {
    GradPass<K, TS, kSeries> gp{gr, g};
    for_each(s, t, v, vec, gp);
  }
};

// The fused linear divergence's final pass (src/fused/cuda.rs): over a chunk's f32 logits, the
// gradient w.r.t. the raw logits, G = dL/ds · (1 − (s / cap)²) (the softcap's slope from the
// capped logit s; factor 1 without a softcap), converted to TO and written over the student
// row itself with the same row byte stride, so no separate conversion kernel reads the f32
// gradient back (cuda/FUSED.md, lever 2).
//
// Why the stores never clobber an unread logit: a step j of the loop covers the elements
// [jE, (j+1)E) (E = 8 · blockDim); TO is no wider than f32, so the stores of step j land in
// the bytes of f32 elements [j·E·w/4, (j+1)·E·w/4) with w = sizeof(TO): for 2-byte TO inside
// step ⌊j/2⌋'s elements, for f32 on the thread's own elements. So a store of step j is safe once
// every thread has loaded step ⌊j/2⌋. A barrier after the loads of steps 0, 2, 4, 8, … gives
// that: a thread storing in step j ∈ [b, 2b) (b ≥ 2 a power of two) has passed the barrier of
// step b, after every thread's loads of steps ≤ b, and ⌊j/2⌋ < b; steps 0 and 1 store into step
// 0's elements, loaded before the barrier of step 0. So ≈ log2(steps) barriers per row (7 at
// V = 200064: 98 steps), not one per step; tests/divergence_fused_sim.rs plays the stores against the
// loads in both thread orders. The v mod 8 tail: loads, a barrier, stores. Rows must be
// 16-byte aligned (the `vec` the earlier passes test is ignored here): RowKernels::fused_rows
// launches the kernel only then.
template <Kind K, typename TO>
struct FusedGradSink {
  TO* out;  // this row of G (aliases the student row), or null for forward only
  float inv_cap;  // 1 / softcap, 0 without one: the slope is then exactly 1
  __device__ __forceinline__ bool wanted() const { return out != nullptr; }
  __device__ __forceinline__ bool aligned() const { return out == nullptr || aligned16(out); }
  __device__ __forceinline__ void zero(int v, bool vec) const { zero_row(out, v, vec); }

  template <bool kSeries>
  __device__ __forceinline__ void write(const float* s, const float* t, int v, bool,
                                        const GradRow& gr) const {
    if (inv_cap != 0.f) {
      write_steps<true, kSeries>(s, t, v, gr);
    } else {
      write_steps<false, kSeries>(s, t, v, gr);
    }
  }

  // Entry i's G: the gradient times the softcap's slope (kCap) or as it is.
  template <bool kCap, bool kSeries>
  __device__ __forceinline__ float entry(const GradRow& gr, float s, float t) const {
    const float g = grad_entry<K, kSeries>(gr, s, t);
    return kCap ? g * softcap_slope(s, inv_cap) : g;
  }

  template <bool kCap, bool kSeries>
  __device__ __forceinline__ void write_steps(const float* s, const float* t, int v,
                                              const GradRow& gr) const {
    const int chunks = v / kVec;
    const int steps = (chunks + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
    for (int j = 0; j < steps; ++j) {
      const int c = j * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
      const bool active = c < chunks;
      float o[kVec];
      if (active) {
        float sv[kVec], tv[kVec];
        load8(s + c * kVec, sv);
        load8(t + c * kVec, tv);
#pragma unroll
        for (int k = 0; k < kVec; ++k) o[k] = entry<kCap, kSeries>(gr, sv[k], tv[k]);
      }
      if (j != 1 && (j & (j - 1)) == 0) __syncthreads();  // j = 0, 2, 4, 8, … (see above)
      if (active) store8(out + c * kVec, o);
    }
    const int i = chunks * kVec + static_cast<int>(threadIdx.x);
    const bool active = i < v;  // v mod 8 < blockDim
    float o = 0.f;
    if (active) o = entry<kCap, kSeries>(gr, s[i], t[i]);
    __syncthreads();
    if (active) out[i] = from_float<TO>(o);
  }
};

// One block per row; kSeries: Row's JSD mode (the `jsdx` kernels, for extreme β).
template <Kind K, typename TS, typename TT, bool kSeries, typename Sink>
__device__ __forceinline__ void rows(const DkDivergenceArgs& a, const Sink& sink) {
  __shared__ RowStats<K> smem_stats[32];
  __shared__ float smem_sum[32];
  const int64_t row = blockIdx.x;
  const int v = static_cast<int>(a.v);
  const TS* s = reinterpret_cast<const TS*>(a.student) + row * a.student_stride;
  const TT* t = reinterpret_cast<const TT*>(a.teacher) + row * a.teacher_stride;
  float* per_row = reinterpret_cast<float*>(a.per_row);
  const bool vec = aligned16(s) && aligned16(t) && sink.aligned();

  const bool ignored =
      a.labels != 0 && reinterpret_cast<const int64_t*>(a.labels)[row] == a.ignore_index;
  if (ignored) {
    if (threadIdx.x == 0) per_row[row] = 0.f;
    if (sink.wanted()) sink.zero(v, vec);
    return;
  }

  StatsPass<K, TS, TT> pass1{exp2_scale(a.inv_temperature), s, t};
  for_each(s, t, v, vec, pass1);
  const RowStats<K> st = block_merge(pass1.stats, smem_stats);

  // A side with no finite entry has no distribution: loss 0, gradient 0 (NaN rows go on).
  // (Every thread is past the statistics pass here: block_merge ends with a barrier.)
  if (st.empty()) {
    if (threadIdx.x == 0) per_row[row] = 0.f;
    if (sink.wanted()) sink.zero(v, vec);
    return;
  }

  const float beta = a.beta;
  const Row r = row_of<K, kSeries>(st, a.inv_temperature, beta);
  float loss, center;
  if (K != Kind::Jsd) {
    loss = kl_loss(st, r, &center);
  } else {
    JsdPass<kSeries> jp{r};
    for_each(s, t, v, vec, jp);
    const float kl_pm = block_sum(jp.kl_pm, smem_sum);
    center = block_sum(jp.kl_qm, smem_sum);
    loss = jsd_loss(beta, kl_pm, center);
  }
  if (threadIdx.x == 0) per_row[row] = clamp_loss(loss);
  if (!sink.wanted()) return;

  const float gscale =
      grad_scale(*reinterpret_cast<const float*>(a.scale) * a.inv_temperature, loss);
  sink.template write<kSeries>(s, t, v, vec, grad_row_of<K, kSeries>(r, center, beta, gscale));
}

}  // namespace divergence
}  // namespace dk

using dk::divergence::Kind;

#define DK_DIV_KERNEL(kname, KIND, SERIES, sname, TS, tname, TT)                              \
  extern "C" __global__ void __launch_bounds__(dk::divergence::kThreads)                      \
      dk_div_##kname##_##sname##_##tname(const DkDivergenceArgs args) {                       \
    using Sink = dk::divergence::GradSink<KIND, TS>;                                          \
    const Sink sink{dk::divergence::block_row<TS>(args.grad, args.grad_stride)};              \
    dk::divergence::rows<KIND, TS, TT, SERIES>(args, sink);                                   \
  }

#define DK_DIV_KERNELS_FOR_KIND(kname, KIND, SERIES) \
  DK_DIV_DTYPE_PAIRS(DK_DIV_KERNEL, kname, KIND, SERIES)

// jsdx: JSD at extreme β, min(β, 1 − β) < 2^-5, with the series tails (Row in
// dk_divergence_math.cuh); kernels of their own so that the others' code and registers do not
// change for it.
DK_DIV_KERNELS_FOR_KIND(fkl, Kind::ForwardKl, false)
DK_DIV_KERNELS_FOR_KIND(rkl, Kind::ReverseKl, false)
DK_DIV_KERNELS_FOR_KIND(jsd, Kind::Jsd, false)
DK_DIV_KERNELS_FOR_KIND(jsdx, Kind::Jsd, true)

// The fused linear divergence's chunk kernels: f32 logits S (student) and T (teacher); G, the
// gradient w.r.t. the raw logits (softcap slope applied when inv_cap ≠ 0, loss scale as in
// `scale`), in the GEMMs' dtype over S (args.grad = S, args.grad_stride = the S row stride in
// TO elements), or null for forward only. See FusedGradSink.
#define DK_DIV_FUSED_KERNEL(kname, KIND, SERIES, oname, TO)                                   \
  extern "C" __global__ void __launch_bounds__(dk::divergence::kThreads)                      \
      dk_div_fused_##kname##_##oname(const DkDivergenceArgs args, float inv_cap) {            \
    using Sink = dk::divergence::FusedGradSink<KIND, TO>;                                     \
    const Sink sink{dk::divergence::block_row<TO>(args.grad, args.grad_stride), inv_cap};     \
    dk::divergence::rows<KIND, float, float, SERIES>(args, sink);                             \
  }

#define DK_DIV_FUSED_KERNELS_FOR_KIND(kname, KIND, SERIES)      \
  DK_DIV_FUSED_KERNEL(kname, KIND, SERIES, f32, float)          \
  DK_DIV_FUSED_KERNEL(kname, KIND, SERIES, bf16, __nv_bfloat16) \
  DK_DIV_FUSED_KERNEL(kname, KIND, SERIES, f16, __half)

DK_DIV_FUSED_KERNELS_FOR_KIND(fkl, Kind::ForwardKl, false)
DK_DIV_FUSED_KERNELS_FOR_KIND(rkl, Kind::ReverseKl, false)
DK_DIV_FUSED_KERNELS_FOR_KIND(jsd, Kind::Jsd, false)
DK_DIV_FUSED_KERNELS_FOR_KIND(jsdx, Kind::Jsd, true)

// One block: the factor d(reduced loss)/d(row loss), from the labels when batchmean has no
// num_items. Runs on the device so the trainer's stream never waits on the host.
// `num_items_mem` (or null): batchmean's divisor in device memory, written by the trainer's
// earlier work on the stream (a token count); read here, so the host never waits for it. A value
// that is not finite and >= 2^-126 gives the sum (divisor 1): nothing could report it without a
// sync (a subnormal's reciprocal overflows to inf).
extern "C" __global__ void __launch_bounds__(1024)
    dk_div_prepare(const int64_t* labels, int64_t n, int64_t ignore_index, int reduction,
                   float num_items, const float* num_items_mem, float* scale_out) {
  __shared__ unsigned long long counts[32];
  if (reduction != DK_ARGS_REDUCTION_BATCHMEAN) {
    if (threadIdx.x == 0) *scale_out = 1.f;
    return;
  }
  if (num_items_mem != nullptr) {
    if (threadIdx.x == 0) {
      const float d = *num_items_mem;
      // 2^-126: float's smallest normal. NaN fails both compares.
      *scale_out = (d >= 0x1p-126f && d < INFINITY) ? 1.f / d : 1.f;
    }
    return;
  }
  if (num_items > 0.f) {
    if (threadIdx.x == 0) *scale_out = 1.f / num_items;
    return;
  }
  // Counted in integers (a float count is inexact past 2^24 rows) and divided in f64, as the
  // CPU reference does: the scale is 1 / #valid correctly rounded to f32.
  unsigned long long valid = 0;
  if (labels == nullptr) {
    valid = threadIdx.x == 0 ? static_cast<unsigned long long>(n) : 0ull;
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) valid += labels[i] != ignore_index;
  }
  const unsigned long long total = dk::block_sum_to_thread0(valid, counts);
  if (threadIdx.x == 0) {
    *scale_out = static_cast<float>(1.0 / static_cast<double>(total > 0 ? total : 1ull));
  }
}

// One block: loss = scale * Σ per_row, summed in f64 in a fixed order.
extern "C" __global__ void __launch_bounds__(1024)
    dk_div_finish(const float* per_row, int64_t n, const float* scale, float* loss) {
  __shared__ double smem[32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += per_row[i];
  const double total = dk::block_sum_to_thread0(acc, smem);
  if (threadIdx.x == 0) *loss = static_cast<float>(total * static_cast<double>(*scale));
}
