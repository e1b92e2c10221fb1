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

template <Kind K, typename TS, typename TT>
__device__ __forceinline__ void rows(const DkDivergenceArgs& a) {
  __shared__ RowStats<K> smem_stats[32];
  __shared__ float smem_sum[32];
  const int64_t row = blockIdx.x;
  const int v = static_cast<int>(a.v);
  const TS* s = reinterpret_cast<const TS*>(a.student) + row * a.student_stride;
  const TT* t = reinterpret_cast<const TT*>(a.teacher) + row * a.teacher_stride;
  TS* g = a.grad ? reinterpret_cast<TS*>(a.grad) + row * a.grad_stride : nullptr;
  float* per_row = reinterpret_cast<float*>(a.per_row);
  const bool vec = aligned16(s) && aligned16(t) && (g == nullptr || aligned16(g));

  const bool ignored =
      a.labels != 0 && reinterpret_cast<const int64_t*>(a.labels)[row] == a.ignore_index;
  if (ignored) {
    if (threadIdx.x == 0) per_row[row] = 0.f;
    if (g) zero_row(g, v, vec);
    return;
  }

  StatsPass<K, TS, TT> pass1{exp2_scale(a.inv_temperature), s, t};
  for_each(s, t, v, vec, pass1);
  const RowStats<K> st = block_merge(pass1.stats, smem_stats);

  // A side with no finite entry has no distribution: loss 0, gradient 0 (NaN rows go on).
  if (st.empty()) {
    if (threadIdx.x == 0) per_row[row] = 0.f;
    if (g) zero_row(g, v, vec);
    return;
  }

  const float beta = a.beta;
  const Row r = row_of(st, a.inv_temperature, beta);
  float loss, center;
  if (K != Kind::Jsd) {
    loss = kl_loss(st, r, &center);
  } else {
    JsdPass jp{r};
    for_each(s, t, v, vec, jp);
    const float kl_pm = block_sum(jp.kl_pm, smem_sum);
    center = block_sum(jp.kl_qm, smem_sum);
    loss = jsd_loss(beta, kl_pm, center);
  }
  if (threadIdx.x == 0) per_row[row] = clamp_loss(loss);
  if (!g) return;

  const float gscale = grad_scale(*reinterpret_cast<const float*>(a.scale) * a.inv_temperature, loss);
  GradPass<K, TS> gp{grad_row_of<K>(r, center, beta, gscale), g};
  for_each(s, t, v, vec, gp);
}

}  // namespace divergence
}  // namespace dk

using dk::divergence::Kind;

#define DK_DIV_KERNEL(kname, KIND, sname, TS, tname, TT)                                     \
  extern "C" __global__ void __launch_bounds__(dk::divergence::kThreads)                    \
      dk_div_##kname##_##sname##_##tname(const DkDivergenceArgs args) {                     \
    dk::divergence::rows<KIND, TS, TT>(args);                                               \
  }

#define DK_DIV_KERNELS_FOR_KIND(kname, KIND)                                   \
  DK_DIV_KERNEL(kname, KIND, f32, float, f32, float)                           \
  DK_DIV_KERNEL(kname, KIND, f32, float, bf16, __nv_bfloat16)                  \
  DK_DIV_KERNEL(kname, KIND, f32, float, f16, __half)                          \
  DK_DIV_KERNEL(kname, KIND, bf16, __nv_bfloat16, f32, float)                  \
  DK_DIV_KERNEL(kname, KIND, bf16, __nv_bfloat16, bf16, __nv_bfloat16)         \
  DK_DIV_KERNEL(kname, KIND, bf16, __nv_bfloat16, f16, __half)                 \
  DK_DIV_KERNEL(kname, KIND, f16, __half, f32, float)                          \
  DK_DIV_KERNEL(kname, KIND, f16, __half, bf16, __nv_bfloat16)                 \
  DK_DIV_KERNEL(kname, KIND, f16, __half, f16, __half)

DK_DIV_KERNELS_FOR_KIND(fkl, Kind::ForwardKl)
DK_DIV_KERNELS_FOR_KIND(rkl, Kind::ReverseKl)
DK_DIV_KERNELS_FOR_KIND(jsd, Kind::Jsd)

// One block: the factor d(reduced loss)/d(row loss), from the labels when batchmean has no
// num_items. Runs on the device so the trainer's stream never waits on the host.
extern "C" __global__ void __launch_bounds__(1024)
    dk_div_prepare(const int64_t* labels, int64_t n, int64_t ignore_index, int reduction,
                   float num_items, float* scale_out) {
  __shared__ float smem[32];
  if (reduction != DK_ARGS_REDUCTION_BATCHMEAN) {
    if (threadIdx.x == 0) *scale_out = 1.f;
    return;
  }
  if (num_items > 0.f) {
    if (threadIdx.x == 0) *scale_out = 1.f / num_items;
    return;
  }
  float valid = 0.f;  // exact: counts below 2^24 per thread
  if (labels == nullptr) {
    valid = threadIdx.x == 0 ? static_cast<float>(n) : 0.f;
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) valid += labels[i] != ignore_index ? 1.f : 0.f;
  }
  const float total = dk::block_sum(valid, smem);
  if (threadIdx.x == 0) *scale_out = 1.f / fmaxf(total, 1.f);
}

// One block: loss = scale * Σ per_row, summed in f64 in a fixed order.
extern "C" __global__ void __launch_bounds__(1024)
    dk_div_finish(const float* per_row, int64_t n, const float* scale, float* loss) {
  __shared__ double smem[32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += per_row[i];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(dk::kFullMask, acc, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < (blockDim.x >> 5); ++w) total += smem[w];
    *loss = static_cast<float>(total * static_cast<double>(*scale));
  }
}
