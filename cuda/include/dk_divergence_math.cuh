// The arithmetic of the divergence kernels, free of memory access and of the thread layout, so
// that tests/kernel_sim can run it on the host against the f64 reference (no GPU needed).
#pragma once

#include "dk_math.cuh"

#ifndef __CUDACC__
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
#endif

namespace dk {
namespace divergence {

enum class Kind { ForwardKl, ReverseKl, Jsd };

// Online statistics of a row pair: running maxima and sums of e^(x - max) of both sides and,
// for the KL kinds, acc = Σ e^(x_w - m_w) d with d = (x_w - m_w) - (x_o - m_o), where w is the
// side that weights the KL sum (teacher for forward KL, student for reverse KL) and o the
// other. Keeping every quantity relative to the row maxima avoids subtracting two log
// normalisers of size ~log V + max: KL = acc / S_w + log(S_o / S_w) is accurate in f32.
template <Kind K>
struct RowStats {
  static constexpr bool kAcc = K != Kind::Jsd;
  static constexpr bool kTeacherWeights = K == Kind::ForwardKl;
  float mt = -INFINITY, st = 0.f, ms = -INFINITY, ss = 0.f, acc = 0.f;

  // Re-expresses the state relative to new maxima (each no smaller than the old one).
  DK_HD void rebase(float mt2, float ms2) {
    if (kAcc) {
      const float mw = kTeacherWeights ? mt : ms, mw2 = kTeacherWeights ? mt2 : ms2;
      const float mo = kTeacherWeights ? ms : mt, mo2 = kTeacherWeights ? ms2 : mt2;
      const float sw = kTeacherWeights ? st : ss;
      // Every d shifts by -(mw2 - mw) + (mo2 - mo). An unseen other side (mo = -inf) means all
      // accumulated d were +inf already, and they stay +inf.
      const float shift = (mw2 - mw) - (mo2 == mo ? 0.f : mo2 - mo);
      // +inf (mass against a masked entry) stays +inf, also when the rescale underflows to 0.
      acc = mw == -INFINITY ? 0.f
                            : (acc == INFINITY ? acc : (acc - sw * shift) * rescale(mw, mw2));
    }
    st *= rescale(mt, mt2);
    ss *= rescale(ms, ms2);
    mt = mt2;
    ms = ms2;
  }

  template <int N>
  DK_HD void add(const float (&a)[N], const float (&b)[N]) {
    // fmaxf drops NaN (one FMNMX where a NaN-propagating max takes three instructions): a NaN
    // logit poisons the sums instead, e^(NaN - m) = NaN, and `empty` below keeps such a row.
    float mt2 = mt, ms2 = ms;
DK_UNROLL
    for (int k = 0; k < N; ++k) {
      mt2 = fmaxf(mt2, a[k]);
      ms2 = fmaxf(ms2, b[k]);
    }
    if (!(mt2 == mt && ms2 == ms)) rebase(mt2, ms2);  // one rescale per 8 elements at most
DK_UNROLL
    for (int k = 0; k < N; ++k) {
      // Masked entries (-inf) add nothing; testing them first avoids -inf - (-inf).
      const float A = a[k] - mt, B = b[k] - ms;
      const float et = a[k] == -INFINITY ? 0.f : fast_exp(A);
      const float es = b[k] == -INFINITY ? 0.f : fast_exp(B);
      st += et;
      ss += es;
      if (kAcc) {
        const float ew = kTeacherWeights ? et : es, dw = kTeacherWeights ? A : B;
        const float xw = kTeacherWeights ? a[k] : b[k];
        const float xo = kTeacherWeights ? b[k] : a[k], dox = kTeacherWeights ? B : A;
        // Mass where the other side is masked makes the KL +inf, as it should: any finite
        // logit has mass, even one whose e^(x - max) is below f32's range (fast_exp flushes it
        // to 0), as in the f64 reference. A masked weighting entry adds nothing.
        acc += xw == -INFINITY ? 0.f : (xo == -INFINITY ? INFINITY : ew * (dw - dox));
      }
    }
  }

  // A side with no finite entry has no distribution: the row's loss and gradient are 0. Not
  // when a sum is NaN: a NaN logit (which the maxima skip) makes the row NaN, as on the CPU.
  DK_HD bool empty() const {
    return (mt == -INFINITY || ms == -INFINITY) && st == st && ss == ss;
  }

  DK_HD void merge(const RowStats& o) {
    const float mt2 = nan_max(mt, o.mt), ms2 = nan_max(ms, o.ms);
    RowStats other = o;
    other.rebase(mt2, ms2);
    rebase(mt2, ms2);
    st += other.st;
    ss += other.ss;
    acc += other.acc;
  }

#ifdef __CUDACC__
  __device__ __forceinline__ RowStats shfl_xor(int offset) const {
    RowStats o;
    o.mt = __shfl_xor_sync(0xffffffffu, mt, offset);
    o.st = __shfl_xor_sync(0xffffffffu, st, offset);
    o.ms = __shfl_xor_sync(0xffffffffu, ms, offset);
    o.ss = __shfl_xor_sync(0xffffffffu, ss, offset);
    o.acc = __shfl_xor_sync(0xffffffffu, acc, offset);
    return o;
  }
#endif
};

// Per-row constants of the later passes. For entry i with A = a - mt, B = b - ms:
//   p = e^A / St, q = e^B / Ss, delta = log q - log p = (B - A) - log(Ss / St),
//   log p - log m = -(log β + softplus(u)), log q - log m = -(log(1-β) + softplus(-u)),
//   u = delta + log(1-β) - log β (both softplus share one exp and one log1p).
// Masked entries give delta = ±inf and stay finite where their probability is non-zero.
struct Row {
  float inv_t, mt, ms, inv_st, inv_ss, log_ratio, log_beta, log_1mbeta;

  struct Entry {
    float p, q;
    float diff;   // (b - ms) - (a - mt) = log q - log p + log(Ss / St)
    float delta;  // log q - log p
  };

  DK_HD Entry entry(float s, float t) const {
    const float a = t * inv_t, b = s * inv_t;
    const float A = a - mt, B = b - ms;
    Entry e;
    e.p = a == -INFINITY ? 0.f : fast_exp(A) * inv_st;
    e.q = b == -INFINITY ? 0.f : fast_exp(B) * inv_ss;
    e.diff = B - A;
    e.delta = e.diff - log_ratio;
    return e;
  }

  // (log p - log m, log q - log m) for the JSD mixture.
  DK_HD float2 log_ratios_to_mixture(float delta) const {
    const float u = delta + log_1mbeta - log_beta;
    const float l = fast_log1p_unit(fast_exp(-fabsf(u)));
    return make_float2(-(log_beta + fmaxf(u, 0.f) + l), -(log_1mbeta + fmaxf(-u, 0.f) + l));
  }
};

// The later passes' row constants from the merged statistics.
template <Kind K>
DK_HD Row row_of(const RowStats<K>& st, float inv_t, float beta) {
  return Row{inv_t, st.mt, st.ms, 1.f / st.st, 1.f / st.ss, logf(st.ss / st.st), logf(beta),
             log1pf(-beta)};
}

// Loss of the KL kinds from the statistics alone, and the gradient's row constant `center`
// (reverse KL: Σ q · diff; forward KL: unused, 0). JSD needs its mixture pass: jsd_loss.
template <Kind K>
DK_HD float kl_loss(const RowStats<K>& st, const Row& r, float* center) {
  if (K == Kind::ForwardKl) {
    *center = 0.f;
    return st.acc * r.inv_st + r.log_ratio;
  }
  *center = st.acc * r.inv_ss;
  return *center - r.log_ratio;
}

// JSD from the mixture pass's sums KL(p || m) and KL(q || m).
DK_HD float jsd_loss(float beta, float kl_pm, float kl_qm) {
  return beta * kl_pm + (1.f - beta) * kl_qm;
}

// The gradient pass's per-row factor (reduction scale / T): NaN for a NaN row (NaN or +inf
// logit on either side; its loss is then NaN), so that the whole gradient row is NaN as in the
// CPU reference, masked entries included, whose per-entry gradient is a clean 0 otherwise.
DK_HD float grad_scale(float scale, float loss) { return loss != loss ? NAN : scale; }

// A divergence is >= 0; rounding of near-equal rows may give -1e-9 (NaN passes through).
DK_HD float clamp_loss(float loss) { return loss < 0.f ? 0.f : loss; }

// Per-entry gradient dL/db of the passes after the statistics. `center` is the row constant the
// gradient subtracts: for reverse KL Σ q · diff (= L + log(Ss/St), so the log ratio cancels
// exactly instead of being subtracted twice), for JSD KL(q || m); unused by forward KL.
template <Kind K>
DK_HD float grad_entry(const Row& row, float s, float t, float center, float one_m_beta) {
  const Row::Entry e = row.entry(s, t);
  if (K == Kind::ForwardKl) return e.q - e.p;
  if (K == Kind::ReverseKl) return xlog(e.q, e.diff - center);
  return one_m_beta * xlog(e.q, row.log_ratios_to_mixture(e.delta).y - center);
}

// (p (log p - log m), q (log q - log m)) of one entry, summed by the JSD pass.
DK_HD float2 jsd_terms(const Row& row, float s, float t) {
  const Row::Entry e = row.entry(s, t);
  const float2 lr = row.log_ratios_to_mixture(e.delta);
  return make_float2(xlog(e.p, lr.x), xlog(e.q, lr.y));
}


// Hopper cluster path: block `rank` of a cluster of `c` blocks owns the elements
// [rank · slice, min(v, (rank + 1) · slice)) of the row, slice a multiple of 8 so every block's
// share starts 16-byte aligned. The last blocks' shares may be short or empty.
DK_HD int cluster_slice(int v, int c) { return ((v + c - 1) / c + 7) / 8 * 8; }

}  // namespace divergence
}  // namespace dk
