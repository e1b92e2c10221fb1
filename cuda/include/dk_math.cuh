// Scalar helpers shared by the kernels and by the host-side simulation of their arithmetic
// (tests/kernel_sim): compiled as __host__ __device__ under nvcc, as plain inline C++ otherwise.
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define DK_HD __host__ __device__ __forceinline__
#define DK_UNROLL _Pragma("unroll")
#else
#define DK_HD inline
#define DK_UNROLL
#endif

namespace dk {

// max that propagates NaN (fmaxf drops it): a NaN logit must poison its row.
DK_HD float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// e^(m_old - m_new), with 0 when nothing has been accumulated yet (m_old = -inf).
DK_HD float rescale(float m_old, float m_new) { return m_old == -INFINITY ? 0.f : expf(m_old - m_new); }

// x * d with 0 * anything = 0: entries of probability 0 contribute nothing, even where d is inf.
DK_HD float xlog(float x, float d) { return x == 0.f ? 0.f : x * d; }

}  // namespace dk
