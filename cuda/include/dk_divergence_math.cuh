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

// Online statistics of a row pair, in base-2 units: with k = log2(e) / T, a raw logit x and its
// side's raw running maximum M, every exponent is X = (x − M)·k (one FADD, one FMUL), exactly
// 0 at the maximum. An FFMA x·k − round(M·k) would save the FADD, but its exponent at the
// maximum is the rounding residual of M·k, and on the GPU ex2.approx of that residual does not
// cancel against the log ratio of the sums: one-element rows then had losses of ~1e-7 instead of
// 0, and small KL losses (~1e-5) errors of 1e-2 relative (H200, 2026-11-26). The state holds
// both raw maxima, the sums of 2^X of both sides and, for the KL kinds,
// acc = Σ 2^(X_w) (X_w − X_o), where w is the side that weights the KL sum (teacher for forward
// KL, student for reverse KL) and o the other. Keeping every quantity relative to the row
// maxima avoids subtracting two log normalisers of size ~log V + max:
// KL = ln 2 · acc / S_w + log(S_o / S_w) is accurate in f32. k is part of the state (0 in a
// default-constructed, empty one) because merging rescales by 2^((M_old − M_new)·k).
template <Kind K>
struct RowStats {
  static constexpr bool kAcc = K != Kind::Jsd;
  static constexpr bool kTeacherWeights = K == Kind::ForwardKl;
  float mt = -INFINITY, st = 0.f, ms = -INFINITY, ss = 0.f, acc = 0.f, k = 0.f;

  // Re-expresses the state relative to new maxima (each no smaller than the old one).
  DK_HD void rebase(float mt2, float ms2) {
    if (kAcc) {
      const float mw = kTeacherWeights ? mt : ms, mw2 = kTeacherWeights ? mt2 : ms2;
      const float mo = kTeacherWeights ? ms : mt, mo2 = kTeacherWeights ? ms2 : mt2;
      const float sw = kTeacherWeights ? st : ss;
      // Every d shifts by (-(mw2 - mw) + (mo2 - mo))·k. An unseen other side (mo = -inf) means
      // all accumulated d were +inf already, and they stay +inf.
      const float shift = ((mw2 - mw) - (mo2 == mo ? 0.f : mo2 - mo)) * k;
      // +inf (mass against a masked entry) stays +inf, also when the rescale underflows to 0,
      // while that mass is within f64's range: the old entries' exponents are at most
      // lift = (mw − mw2)·k, and the f64 reference's exp underflows to 0 below 2^-1075.
      // Otherwise a rescale of 0 leaves 0 (xlog): the old entries have no mass next to the new
      // maximum. That includes entries at a finite mask, torch.finfo(dtype).min, which were
      // their side's maximum until now; there mw2 − mw and mo2 − mo overflow to +inf and the
      // shift is NaN; and their +inf against the other side's finite mask (H200, 2026-11-28:
      // forward KL rows with teacher-only and two-sided finfo.min masks gave +inf).
      const bool keep_inf = acc == INFINITY && (mw - mw2) * k >= -1075.f;
      acc = mw == -INFINITY
                ? 0.f
                : (keep_inf ? acc : xlog(rescale2(mw, mw2, k), acc - sw * shift));
    }
    // Each product rounded on its own: merge adds the other state's rescaled sum next, and nvcc
    // contracted one side's st·r + o.st·r' into an FFMA but not the other's, so identical rows
    // got sums an ulp apart, nonzero gradients and losses ~1e-7 (H200, 2026-11-28).
    st = mul_rn(st, rescale2(mt, mt2, k));
    ss = mul_rn(ss, rescale2(ms, ms2, k));
    mt = mt2;
    ms = ms2;
  }

  // Adds a chunk of raw teacher (t) and student (s) logits; kk = log2(e) / T. Returns true when
  // the chunk's KL sum still has to be added with add_masked (a masked or NaN logit in it).
  template <int N>
  DK_HD bool add(const float (&t)[N], const float (&s)[N], float kk) {
    k = kk;
    // fmaxf drops NaN (one FMNMX where a NaN-propagating max takes three instructions): a NaN
    // logit poisons the sums instead, 2^(NaN) = NaN, and `empty` below keeps such a row.
    float mt2 = mt, ms2 = ms;
DK_UNROLL
    for (int j = 0; j < N; ++j) {
      mt2 = fmaxf(mt2, t[j]);
      ms2 = fmaxf(ms2, s[j]);
    }
    if (!(mt2 == mt && ms2 == ms)) rebase(mt2, ms2);  // one rescale per chunk at most
    const float nt = shift_of(mt), ns = shift_of(ms);
    float chunk_acc = 0.f;
DK_UNROLL
    for (int j = 0; j < N; ++j) {
      const float X = mul_rn(t[j] + nt, k), Y = mul_rn(s[j] + ns, k);
      const float et = fast_exp2(X), es = fast_exp2(Y);
      st += et;
      ss += es;
      if (kAcc) {
        chunk_acc = kTeacherWeights ? fmaf(et, X - Y, chunk_acc) : fmaf(es, Y - X, chunk_acc);
      }
    }
    // A masked entry (-inf) on either side makes the fast sum NaN (0 · ∞ or ∞ − ∞); so does a
    // NaN logit. Only then does the chunk's KL sum go through add_masked. The caller reloads
    // the chunk for it rather than keeping 16 logits live in registers across this loop.
    if (kAcc && chunk_acc != chunk_acc) return true;
    acc += chunk_acc;
    return false;
  }

  // The KL sum of a chunk that `add` has already counted in the maxima and sums, entry by
  // entry with the rules for masked logits: a masked weighting entry adds nothing; mass where
  // the other side is masked makes the KL +inf, as it should: any finite logit has mass, even
  // one whose 2^X is below f32's range (fast_exp2 flushes it to 0), as in the f64 reference.
  // A finite mask (torch.finfo(dtype).min) overflows X or Y to -inf here; its weight 2^X is 0,
  // and xlog keeps 0 · ∞ at 0 (no mass, as the f64 reference has) instead of NaN. Against a
  // masked (-inf) other side such an entry has no mass either: +inf only while its exponent is
  // within f64's range, the rule rebase applies when the maximum moves.
  template <int N>
  DK_HD void add_masked(const float (&t)[N], const float (&s)[N]) {
    const float nt = shift_of(mt), ns = shift_of(ms);
DK_UNROLL
    for (int j = 0; j < N; ++j) {
      const float X = mul_rn(t[j] + nt, k), Y = mul_rn(s[j] + ns, k);
      const float xw = kTeacherWeights ? t[j] : s[j], xo = kTeacherWeights ? s[j] : t[j];
      const float Xw = kTeacherWeights ? X : Y;
      const float ew = fast_exp2(Xw);
      const float d = kTeacherWeights ? X - Y : Y - X;
      const float mass_vs_mask = Xw >= -1075.f ? INFINITY : 0.f;
      acc += xw == -INFINITY ? 0.f : (xo == -INFINITY ? mass_vs_mask : xlog(ew, d));
    }
  }

  // The exponent offset of a side: minus its maximum, or 0 while it has nothing finite (its
  // entries are then all -inf and give 2^-inf = 0, where subtracting -inf would give NaN).
  static DK_HD float shift_of(float m) { return m == -INFINITY ? 0.f : -m; }

  // A side with no finite entry has no distribution: the row's loss and gradient are 0. Not
  // when a sum is NaN: a NaN logit (which the maxima skip) makes the row NaN, as on the CPU.
  DK_HD bool empty() const {
    return (mt == -INFINITY || ms == -INFINITY) && st == st && ss == ss;
  }

  DK_HD void merge(const RowStats& o) {
    const float mt2 = nan_max(mt, o.mt), ms2 = nan_max(ms, o.ms);
    k = fmaxf(k, o.k);  // an empty default state has k = 0; every real one the row's k
    RowStats other = o;
    other.k = k;
    other.rebase(mt2, ms2);
    rebase(mt2, ms2);
    st += other.st;
    ss += other.ss;
    acc += other.acc;
  }

#ifdef __CUDACC__
  // Every field passed through the warp shuffle `f` (float -> float).
  template <typename F>
  __device__ __forceinline__ RowStats shuffled(F f) const {
    RowStats o;
    o.mt = f(mt);
    o.st = f(st);
    o.ms = f(ms);
    o.ss = f(ss);
    o.acc = f(acc);
    o.k = f(k);
    return o;
  }

  __device__ __forceinline__ RowStats shfl_xor(int offset) const {
    return shuffled([offset](float x) { return __shfl_xor_sync(0xffffffffu, x, offset); });
  }

  // Lane `src`'s state (the persistent kernel broadcasts the merged cluster slots this way).
  __device__ __forceinline__ RowStats shfl(int src) const {
    return shuffled([src](float x) { return __shfl_sync(0xffffffffu, x, src); });
  }
#endif
};

// Per-row constants of the later passes. For entry i with X = (t − Mt)·k, Y = (s − Ms)·k
// (base-2 exponents relative to the raw maxima, as in RowStats; k = log2(e) / T), d = Y − X:
//   p = 2^X / St, q = 2^Y / Ss, log2 q − log2 p = d − R2, R2 = log2(Ss / St).
// The JSD mixture m = βp + (1−β)q, in base 2 with B2 = log2((1−β)/β) and w = d − R2 + B2
// (so that (1−β)q / (βp) = 2^w), sp2(w) = log2(1 + 2^w) = max(w, 0) + tail(w), tail(w) =
// log2(1 + 2^−|w|) (one MUFU.EX2 and one MUFU.LG2):
//   log2 p − log2 m = −log2 β − sp2(w)         = (max(B2, 0) − max(w, 0)) + (tail(B2) − tail(w)),
//   log2 q − log2 m = −log2(1−β) − sp2(w) + w  = (max(−B2, 0) + min(w, 0)) + (tail(B2) − tail(w)),
// using −log2 β = sp2(B2) and −log2(1−β) = sp2(−B2). Each bracket is exactly 0 where the rows
// agree (d = 0 and R2 = 0 exactly, so w = B2), whatever β: a self-distillation of identical
// models gives exactly 0 (the fused tests' bound is 1e-7 absolute; a β-dependent rounding of
// −log2 β came within 6 % of it on the H200). Neither form subtracts two large numbers, for
// any w (forming the second ratio as the first plus w − B2 would, at large w: 4e-5 relative).
// w is clamped to ±kWClamp: a masked entry (d = ±inf, or NaN when both sides are masked) then
// gives finite log ratios, which its zero probability multiplies to 0 without a test, and the
// clamped values give the right limits (p = 0: log2(q/m) = −log2(1−β); q = 0: log2(p/m) =
// −log2 β). Unmasked entries have |w| < 300 (p, q ≥ 2^-126 and β a normal f32), far inside.
//
// Extreme β (kSeries, min(β, 1 − β) < 2^-5: jsd_series_tails). The loss then scales with
// min(β, 1 − β) and, as β → 0, the gradient's log2 q − log2 m is the tail difference alone,
// of size ~β. Three f32 effects that are negligible at β = 0.5 then dominate: 1 + u rounds u
// to 2^-24 absolute; lg2.approx is off by up to 2^-22 absolute near 1; and w ≈ B2 ≈ ±23 is
// rounded to 2^-19, which the bracket B2 − w passes on. The host replay measured, before this
// mode, gradients 3e-4 (β = 0.01), 5e-2 (1e-4) and 100 % (1e-7) off, relative, and losses of
// near-identical rows at β → 1 off by orders of magnitude. So with kSeries a tail below 2^-4
// is the series u·log2(e)·(1 − u/2 + u²/3 − u³/4 + u⁴/5) (relative error u⁵/6 ≤ 1.6e-7,
// nothing rounded against 1), and the brackets are formed from z = d − R2 (= w − B2, clamped
// like w), never from w:
//   max(B2, 0) − max(w, 0) = min(neg − z, pos),   neg + min(w, 0) = min(z + pos, neg),
// with w = z + B2 used only inside the tail, where its rounding moves the tail by a relative
// ulp(w) · ln 2 (2^-19 · ln 2 for |w| < 32). Identical rows still give exactly 0 (z = 0: both
// minima are 0, w = B2 exactly, and the tail's last product is rounded on its own, so tail0
// and the entry's tail are the same number; checked in the host replay, not yet on a GPU).
// The mode is a template parameter, compiled into kernels of its own (`dk_div*_jsdx_*`,
// launched for such β), so the kernels for ordinary β keep their instructions and registers
// and pay nothing for it.
struct Row {
  float k, nmt, nms, inv_st, inv_ss, log_ratio;
  // JSD: c2 = B2 − R2 (w = d + c2; kSeries: c2 = −R2, z = d + c2), pos = max(B2, 0),
  // neg = max(−B2, 0) (B2 = pos − neg exactly), tail0 = tail(B2).
  float c2, pos, neg, tail0;

  static constexpr float kWClamp = 1024.f;

  struct Entry {
    float p, q;
    float d;  // Y - X: log2 q − log2 p + R2
  };

  DK_HD Entry entry(float s, float t) const {
    const float X = mul_rn(t + nmt, k), Y = mul_rn(s + nms, k);
    Entry e;
    e.p = fast_exp2(X) * inv_st;  // 2^-inf = 0 for a masked entry
    e.q = fast_exp2(Y) * inv_ss;
    e.d = Y - X;
    return e;
  }

  // w of an entry, clamped (see above; fminf / fmaxf also turn a NaN d into a finite w).
  DK_HD float mixture_w(float d) const { return clamp_w(d + c2); }

  // mixture_w(d) from the entry's logits alone, as ((s − Ms) − (t − Mt))·k + c2 with one FFMA:
  // three FADDs and an FFMA where d + c2 takes two rounded products and three additions. For
  // the staged kernels' kept exponentials (cuda/DIVERGENCE.md, version 12), which need neither
  // X nor Y otherwise. Not bitwise d + c2, and as accurate: the shifted logits are exact near
  // their maxima, where the probability is, and one rounding of their difference replaces the
  // two of X and Y. The shifts come first because the rows' maxima may lie far apart: k·(s − t)
  // plus a row constant k·(Mt − Ms) + c2 would round both to the size of Mt − Ms (a gradient
  // off by 1e-4 relative at an offset of 1e3), and overflow where a whole side sits at a
  // finite mask (torch.finfo.min: Mt = −FLT_MAX), losing the student's logits from w
  // altogether (a review's finding). Exactly B2 (kSeries: z = 0) where an entry's shifted
  // logits agree: identical rows, and one-entry rows. Masked entries (±inf or NaN, or a
  // finite mask against a finite logit) are clamped as mixture_w clamps d.
  DK_HD float mixture_w_of(float s, float t) const {
    return clamp_w(fmaf((s + nms) - (t + nmt), k, c2));
  }

  // Clamps w to ±kWClamp; fminf / fmaxf also turn a NaN into −kWClamp.
  static DK_HD float clamp_w(float w) { return fminf(fmaxf(w, -kWClamp), kWClamp); }

  // tail(w) = log2(1 + 2^−|w|); with kSeries, below u = 2^-4 by its series (see above).
  template <bool kSeries = false>
  static DK_HD float softplus2_tail(float w) {
    const float u = fast_exp2(-fabsf(w));
    if (kSeries && u < 0x1p-4f) {
      // log2(e) · (1, −1/2, 1/3, −1/4, 1/5), by Horner.
      float c = fmaf(u, 0.28853900817779268f, -0.36067376022224085f);
      c = fmaf(u, c, 0.48089834696298783f);
      c = fmaf(u, c, -0.72134752044448170f);
      c = fmaf(u, c, 1.4426950408889634f);
      // Rounded on its own: contracted into the caller's tail0 − u·c (one FFMA), identical
      // rows would get that product's rounding residual instead of exactly 0 (as mul_rn notes).
      return mul_rn(u, c);
    }
    return fast_log2(1.f + u);
  }

  // (log2 p − log2 m, log2 q − log2 m) for the JSD mixture, from an entry's d.
  template <bool kSeries = false>
  DK_HD float2 log2_ratios_to_mixture(float d) const {
    return log2_ratios_of_w<kSeries>(mixture_w(d));
  }

  // The same from the entry's clamped w (mixture_w or mixture_w_of; kSeries: z = w − B2).
  template <bool kSeries = false>
  DK_HD float2 log2_ratios_of_w(float w) const {
    if (kSeries) {
      const float z = w;  // c2 = −R2 here: z = w − B2
      const float dt = tail0 - softplus2_tail<true>(z + (pos - neg));  // w, from B2 = pos − neg
      return make_float2(fminf(neg - z, pos) + dt, fminf(z + pos, neg) + dt);
    }
    const float dt = tail0 - softplus2_tail(w);
    return make_float2((pos - fmaxf(w, 0.f)) + dt, (neg + fminf(w, 0.f)) + dt);
  }
};

// Whether a JSD launch takes the series tails (Row, "Extreme β"): min(β, 1 − β) < 2^-5 (1 − β
// is exact for β ≥ 1/2). The host makes the same choice (jsd_series_tails in
// src/divergence/cuda.rs) and launches the `jsdx` kernels for it.
DK_HD bool jsd_series_tails(float beta) { return fminf(beta, 1.f - beta) < 0x1p-5f; }

// log2(e) / T: the factor of every base-2 exponent of the divergence kernels.
DK_HD float exp2_scale(float inv_t) { return inv_t * 1.4426950408889634f; }

// The later passes' row constants from the merged statistics (kSeries: the JSD mode of Row).
template <Kind K, bool kSeries = false>
DK_HD Row row_of(const RowStats<K>& st, float inv_t, float beta) {
  Row r{exp2_scale(inv_t), -st.mt, -st.ms, 1.f / st.st, 1.f / st.ss, logf(st.ss / st.st),
        0.f, 0.f, 0.f, 0.f};
  if (K == Kind::Jsd) {
    // β in (0, 1): the launchers run β = 0 and 1 as the KL kinds (Params::effective_kind).
    const float b2 = log2f(1.f - beta) - log2f(beta);
    const float r2 = log2f(st.ss / st.st);
    r.c2 = kSeries ? -r2 : b2 - r2;
    r.pos = fmaxf(b2, 0.f);
    r.neg = fmaxf(-b2, 0.f);
    r.tail0 = Row::softplus2_tail<kSeries>(b2);
  }
  return r;
}

// Loss of the KL kinds from the statistics alone, and the gradient's row constant `center`
// (reverse KL: Σ q · d ln 2; forward KL: unused, 0). JSD needs its mixture pass: jsd_loss.
template <Kind K>
DK_HD float kl_loss(const RowStats<K>& st, const Row& r, float* center) {
  if (K == Kind::ForwardKl) {
    *center = 0.f;
    return st.acc * r.inv_st * kLn2 + r.log_ratio;
  }
  *center = st.acc * r.inv_ss * kLn2;
  return *center - r.log_ratio;
}

// JSD from the mixture pass's sums KL(p || m) and KL(q || m), both in base 2 (bits).
DK_HD float jsd_loss(float beta, float kl_pm2, float kl_qm2) {
  return (beta * kl_pm2 + (1.f - beta) * kl_qm2) * kLn2;
}

// The gradient pass's per-row factor (reduction scale / T): NaN for a NaN row (NaN or +inf
// logit on either side; its loss is then NaN), so that the whole gradient row is NaN as in the
// CPU reference, masked entries included, whose per-entry gradient is a clean 0 otherwise.
DK_HD float grad_scale(float scale, float loss) { return loss != loss ? NAN : scale; }

// A divergence is >= 0; rounding of near-equal rows may give -1e-9 (NaN passes through).
DK_HD float clamp_loss(float loss) { return loss < 0.f ? 0.f : loss; }

// The gradient pass's row constants, folded so that each entry spends as few instructions as
// possible: the exponentials are multiplied by gq = gscale / Ss (and gp = gscale / St) instead
// of forming p and q first. `center` is the row constant the gradient subtracts: for reverse KL
// Σ q · d ln 2 (= L + log(Ss/St), so the log ratio cancels exactly instead of being subtracted
// twice), for JSD KL(q || m) in bits; unused by forward KL. A NaN gscale (NaN row) makes gq and
// gp NaN, and with them every entry of the row, masked ones included.
struct GradRow {
  Row row;
  float gq, gp, center;
};

// kSeries: Row's JSD mode (the same values; see below).
template <Kind K, bool kSeries = false>
DK_HD GradRow grad_row_of(const Row& row, float center, float beta, float gscale) {
  GradRow g{row, row.inv_ss * gscale, row.inv_st * gscale, center};
  if (K == Kind::Jsd) {
    // dL/db = (1−β) ln 2 · q (log2 q − log2 m − center), with log2 q − log2 m formed exactly
    // as the mixture pass formed it for `center`: in a near one-hot row the gradient at the
    // peak is the small difference of the two, and a cheaper but differently rounded form
    // (a row constant + min(w, 0) − tail(w), three instructions fewer) put such rows' gradients 1e-3
    // off in the host replay.
    // (kSeries: 1 − β formed here again, not taken from row_of's log2f(1 − β): held over the
    // mixture pass, it was the one spill of dk_div_fused_jsdx_f32 on sm_90a.)
    g.gq *= (kSeries ? sub_rn(1.f, beta) : 1.f - beta) * kLn2;
  }
  return g;
}

// JSD's gradient entry (1 − β) ln 2 · gscale · q · (log2 q − log2 m − center) from 2^Y and the
// log ratio: one expression for grad_entry and jsd_grad_stashed, so that they round alike.
DK_HD float jsd_grad_of(const GradRow& g, float eq, float log2_qm) {
  return eq * g.gq * (log2_qm - g.center);
}

// Per-entry gradient dL/ds (scaled) of the passes after the statistics (kSeries: Row's JSD
// mode, the row's).
template <Kind K, bool kSeries = false>
DK_HD float grad_entry(const GradRow& g, float s, float t) {
  const Row& row = g.row;
  const float X = mul_rn(t + row.nmt, row.k), Y = mul_rn(s + row.nms, row.k);
  const float eq = fast_exp2(Y);
  // (Both products rounded: a contracted FFMA(eq, gq, −ex·gp) is not 0 for identical rows.)
  if (K == Kind::ForwardKl) return mul_rn(eq, g.gq) - mul_rn(fast_exp2(X), g.gp);
  if (K == Kind::ReverseKl) return xlog(eq, fmaf(Y - X, kLn2, -g.center)) * g.gq;
  return jsd_grad_of(g, eq, row.log2_ratios_to_mixture<kSeries>(Y - X).y);
}

// (p (log2 p − log2 m), q (log2 q − log2 m)) of one entry, summed by the JSD pass. Both log
// ratios are finite (clamped w), so masked entries (probability 0) add exactly 0. With
// `log2_qm`, also the entry's log2 q − log2 m (the staged kernels keep it for the gradient).
template <bool kSeries = false>
DK_HD float2 jsd_terms(const Row& row, float s, float t, float* log2_qm = nullptr) {
  const Row::Entry e = row.entry(s, t);
  const float2 lr = row.log2_ratios_to_mixture<kSeries>(e.d);
  if (log2_qm) *log2_qm = lr.y;
  return make_float2(e.p * lr.x, e.q * lr.y);
}

// JSD's gradient entry from the student logit s and the entry's log2 q − log2 m as the mixture
// pass formed it (jsd_terms' log2_qm): grad_entry's value, bitwise (the same Y, the same
// jsd_grad_of), with one exponential instead of three transcendental operations.
DK_HD float jsd_grad_stashed(const GradRow& g, float s, float log2_qm) {
  const float Y = mul_rn(s + g.row.nms, g.row.k);
  return jsd_grad_of(g, fast_exp2(Y), log2_qm);
}

// A gradient entry from s and x: the teacher logit (grad_entry), or with kStashed (JSD only)
// the entry's log2 q − log2 m kept by the mixture pass (jsd_grad_stashed).
template <Kind K, bool kSeries, bool kStashed>
DK_HD float grad_entry_from(const GradRow& g, float s, float x) {
  if constexpr (kStashed) {
    static_assert(K == Kind::Jsd, "only JSD keeps a per-entry value");
    return jsd_grad_stashed(g, s, x);
  } else {
    return grad_entry<K, kSeries>(g, s, x);
  }
}


// Hopper cluster path: block `rank` of a cluster of `c` blocks owns the elements
// [rank · slice, min(v, (rank + 1) · slice)) of the row, slice a multiple of 8 so every block's
// share starts 16-byte aligned. The last blocks' shares may be short or empty.
DK_HD int cluster_slice(int v, int c) { return ((v + c - 1) / c + 7) / 8 * 8; }

}  // namespace divergence
}  // namespace dk
