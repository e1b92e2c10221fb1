// Deterministic warp and block reductions, and the online (max, sum-exp) statistics of a row.
// Every reduction combines values in a fixed tree, so results are bitwise reproducible.
#pragma once

#include <math.h>

namespace dk {

constexpr unsigned kFullMask = 0xffffffffu;

// max that propagates NaN (fmaxf drops it): a NaN logit must poison its row.
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// e^(m_old - m_new), with 0 when nothing has been accumulated yet (m_old = -inf).
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Sum over the block; every thread gets the result. `smem` holds at least 32 floats and may be
// reused after the call returns.
__device__ __forceinline__ float block_sum(float x, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  x = lane < warps ? smem[lane] : 0.f;
  return warp_sum(x);
}

// Running softmax statistics of one side of a row: max m and sum of e^(x - m), plus `acc`, a
// sum of e^(x - m) * d used for the KL terms, rescaled with the same max.
struct Online {
  float m = -INFINITY;
  float s = 0.f;
  float acc = 0.f;

  // Adds 8 values x[k] with KL weights d[k] (ignored unless WithAcc); one rescale per 8.
  template <bool WithAcc, int K>
  __device__ __forceinline__ void add(const float (&x)[K], const float (&d)[K]) {
    float mx = m;
#pragma unroll
    for (int k = 0; k < K; ++k) mx = nan_max(mx, x[k]);
    if (mx == -INFINITY) return;  // all masked so far
    const float r = rescale(m, mx);
    float s_new = s * r, acc_new = acc * r;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float e = __expf(x[k] - mx);
      s_new += e;
      // A masked entry (e == 0) contributes nothing even where d is infinite.
      if (WithAcc) acc_new += e == 0.f ? 0.f : e * d[k];
    }
    m = mx;
    s = s_new;
    acc = acc_new;
  }

  __device__ __forceinline__ void merge(const Online& o) {
    const float mx = nan_max(m, o.m);
    if (mx == -INFINITY) return;
    const float r1 = rescale(m, mx), r2 = rescale(o.m, mx);
    s = s * r1 + o.s * r2;
    acc = acc * r1 + o.acc * r2;
    m = mx;
  }

  __device__ __forceinline__ Online shfl_xor(int offset) const {
    Online o;
    o.m = __shfl_xor_sync(kFullMask, m, offset);
    o.s = __shfl_xor_sync(kFullMask, s, offset);
    o.acc = __shfl_xor_sync(kFullMask, acc, offset);
    return o;
  }

  // log of the normaliser, log Σ e^x (−inf for a fully masked row, NaN for a NaN row).
  __device__ __forceinline__ float log_z() const { return m == -INFINITY ? -INFINITY : m + logf(s); }
};

// Merges `x` over the block in a fixed order; every thread gets the result. `smem` holds at
// least 32 Online values.
__device__ __forceinline__ Online block_merge(Online x, Online* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x.merge(x.shfl_xor(o));
  __syncthreads();
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  Online y;
  if (lane < warps) y = smem[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) y.merge(y.shfl_xor(o));
  return y;
}

}  // namespace dk
