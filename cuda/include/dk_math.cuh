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

#ifndef __CUDACC__
// Host replay only (tests/kernel_sim): a model of the special-function unit's error, so that
// the f32 math is also checked with results that are not the exact ones. 0: exact; 1 / -1: every
// result off by the documented bound (ex2: 2^-22 relative, lg2: 2^-22 absolute) upwards /
// downwards; 2: the sign of the error taken from a hash of the argument's bits (errors that do
// not cancel between nearby arguments). Set from DK_SIM_MUFU by the replay's main().
inline int sim_mufu_error = 0;

inline float sim_mufu_sign(float x) {
  if (sim_mufu_error != 2) return static_cast<float>(sim_mufu_error);
  unsigned bits;
  static_assert(sizeof(bits) == sizeof(x), "32-bit float");
  __builtin_memcpy(&bits, &x, sizeof(x));
  bits *= 0x9E3779B1u;
  return (bits >> 31) ? 1.f : -1.f;
}
#endif

// 2^x on the special-function unit: one MUFU.EX2 (ex2.approx.ftz, ≈ 2 ulp). The divergence
// kernels keep their exponents in base 2 (x = (logit − maximum) · log2(e) / T), so the
// statistics and gradient passes spend two instructions per exponential on top of it.
// Results below 2^-126 flush to 0; -inf gives 0, NaN stays NaN. The host version
// (tests/kernel_sim) takes an exact exp2, applies the error model above and flushes the same way.
DK_HD float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  float y = exp2f(x);
#ifndef __CUDACC__
  y *= 1.f + sim_mufu_sign(x) * 2.38418579e-7f;  // 2^-22
#endif
  return y < 1.17549435e-38f ? 0.f : y;
#endif
}

constexpr float kLn2 = 0.6931471805599453f;

// a · b rounded on its own. nvcc contracts a product feeding an addition into one FFMA by
// default, which skips the product's rounding: the divergence kernels' d = Y − X with X = a · k
// used only there became FFMA(a, −k, Y), the rounding residual of a · k instead of exactly 0
// for identical logits (found by reading the SASS of the gradient loops; the host replay, whose
// compiler does not contract, cannot show it). __fmul_rn is never contracted.
DK_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// a − b rounded on its own, as an operation the compiler does not merge with an equal `a − b`
// elsewhere (__fsub_rn): a value recomputed where it is used instead of held in a register.
DK_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// log2(x) on the special-function unit: one MUFU.LG2 (lg2.approx.ftz, absolute error ≈ 2^-22).
// The JSD passes take it of 1 + e, e in [0, 1] (their base-2 softplus): three instructions
// with the FADD where libm's log1pf spends ≈ 25 on its range reduction (cuda/DIVERGENCE.md,
// "Instruction budget"). The host version takes an exact log2 of the same rounded argument and
// applies the error model above.
DK_HD float fast_log2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  float y = log2f(x);
#ifndef __CUDACC__
  y += sim_mufu_sign(x) * 2.38418579e-7f;
#endif
  return y;
#endif
}

// 2^((m_old - m_new)·k) for raw maxima and k = log2(e) / T, with 0 when nothing has been
// accumulated yet (m_old = -inf).
DK_HD float rescale2(float m_old, float m_new, float k) {
  return m_old == -INFINITY ? 0.f : fast_exp2((m_old - m_new) * k);
}

// x * d with 0 * anything = 0: entries of probability 0 contribute nothing, even where d is inf.
DK_HD float xlog(float x, float d) { return x == 0.f ? 0.f : x * d; }

// The softcap's factor d(capped)/d(raw) = 1 − tanh² recovered from the capped value,
// t = capped / cap: (1 − t)(1 + t) keeps the relative accuracy where t is close to ±1. Exactly
// 1 with inv_cap = 0 (no softcap).
DK_HD float softcap_slope(float capped, float inv_cap) {
  const float t = capped * inv_cap;
  return (1.f - t) * (1.f + t);
}

}  // namespace dk
