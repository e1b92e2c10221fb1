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

// 2^x on the special-function unit: one MUFU.EX2 (ex2.approx.ftz, ≈ 2 ulp). The divergence
// kernels keep their exponents in base 2 (x = (logit − maximum) · log2(e) / T), so the
// statistics and gradient passes spend two instructions per exponential on top of it.
// Results below 2^-126 flush to 0; -inf gives 0, NaN stays NaN. The host version
// (tests/kernel_sim) takes an exact exp2 and flushes the same way.
DK_HD float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.f : y;
#endif
}

constexpr float kLn2 = 0.6931471805599453f;

// e^x on the special-function unit: ex2.approx.ftz(x · log2 e), one FMUL and one MUFU.EX2
// where libm's expf spends 8 instructions on an exact range reduction (cuda/DIVERGENCE.md,
// "Instruction budget"). Relative error ≈ 2 ulp from MUFU plus |x| · 6e-8 from rounding the
// product: the divergence kernels pass a logit minus its row maximum, so the entries that carry
// the mass have small |x|. Results below 2^-126 flush to 0; -inf gives 0, NaN stays NaN. The
// host version (tests/kernel_sim) rounds the same product, takes an exact exp2 and flushes.
DK_HD float fast_exp(float x) { return fast_exp2(x * 1.4426950408889634f); }

// log(1 + e) for e in [0, 1] (the JSD softplus tail): one FADD, one MUFU.LG2 and one FMUL on the
// device (lg2.approx: absolute error ~2^-22 on [1, 2]) instead of libm's ~25-instruction log1pf
// with its range reduction, which the JSD passes run once per element (cuda/DIVERGENCE.md,
// "Instruction budget"). The host version (tests/kernel_sim) rounds 1 + e the same way (small e
// lose their low bits, as on the device) and takes an exact log2.
DK_HD float fast_log1p_unit(float e) {
#ifdef __CUDA_ARCH__
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(1.f + e));
  return y * 0.6931471805599453f;
#else
  return log2f(1.f + e) * 0.6931471805599453f;
#endif
}

// 2^((m_old - m_new)·k) for raw maxima and k = log2(e) / T, with 0 when nothing has been
// accumulated yet (m_old = -inf).
DK_HD float rescale2(float m_old, float m_new, float k) {
  return m_old == -INFINITY ? 0.f : fast_exp2((m_old - m_new) * k);
}

// x * d with 0 * anything = 0: entries of probability 0 contribute nothing, even where d is inf.
DK_HD float xlog(float x, float d) { return x == 0.f ? 0.f : x * d; }

}  // namespace dk
