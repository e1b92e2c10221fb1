/*
 * A C99 client of grouped-query attention (dk_attention_*), built and run by capi/tests/c_abi.rs.
 *
 * On a CPU context:
 *  - dk_attention_params_default() has the documented values;
 *  - forward (out, lse) against the double-precision reference below, on padded GQA batches
 *    (Sq < Sk and Sq > Sk, causal and not, groups of 1, 2 and 3 query heads per KV head, D 64 and
 *    128, bf16 and f32, row strides wider than the rows) and on a varlen batch whose offsets
 *    include an empty query sequence and an empty key sequence: ||out - ref|| / ||ref|| <= 1e-2
 *    for bf16 (1e-5 for f32), the lse (natural log, [B, Hq, Sq] padded / [Hq, Tq] varlen) within
 *    1e-5, rows that see no key exactly 0 with lse -inf;
 *  - backward (dq, dk, dv) against the reference P = exp(scale q.k - lse), dV = P^T dO,
 *    dP = dO V^T, Delta = rowsum(dO * O), dS = P (dP - Delta), dQ = scale dS K,
 *    dK = scale dS^T Q summed over each KV head's query group, fed with the library's own out and
 *    lse; gradients of rows that see nothing (or are seen by nothing) exactly 0; a second
 *    deterministic call gives the same bits; the workspace query returns 0 bytes;
 *  - every output element written (outputs are poisoned before each call) and the gaps of
 *    strided rows left alone;
 *  - softmax_scale 0 is 1/sqrt(head_dim) (bitwise the same as passing 0.125 for D = 64);
 *  - bad input: the documented status, a non-empty dk_last_error(), and nothing written.
 * With argv[2] = "1" (a device and compiled kernels are present) it checks that host pointers are
 * refused by a CUDA context; the numerical CUDA checks live in the Rust and Python tests.
 *
 * Usage: attention_test SEED CUDA_EXPECTED
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill_kernels.h"
#include "dk_check.h"

static double rng_normal(void) {
  double u1 = 1.0 - rng_uniform(), u2 = rng_uniform();
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---- typed buffers ----------------------------------------------------------------------------- */

static const uint16_t POISON16 = 0xFFBAu;     /* a bf16 NaN */
static const uint32_t POISON32 = 0xFFBADBADu; /* an f32 NaN */

/* 16-byte aligned storage (the library requires 16-byte aligned token rows). */
typedef struct {
  void* raw;
  unsigned char* p;
} buf;

static buf buf_new(size_t bytes) {
  buf b;
  b.raw = malloc(bytes + 16);
  b.p = (unsigned char*)(((uintptr_t)b.raw + 15u) & ~(uintptr_t)15u);
  return b;
}

static size_t esize(int dtype) { return dtype == DK_DTYPE_F32 ? 4 : 2; }

static double get(const void* base, int dtype, size_t i) {
  if (dtype == DK_DTYPE_F32) return (double)((const float*)base)[i];
  return bf16_to_double(((const uint16_t*)base)[i]);
}

static void set(void* base, int dtype, size_t i, double x) {
  if (dtype == DK_DTYPE_F32)
    ((float*)base)[i] = (float)x;
  else
    ((uint16_t*)base)[i] = f32_to_bf16((float)x);
}

static void poison(void* base, int dtype, size_t n) {
  size_t i;
  for (i = 0; i < n; ++i) {
    if (dtype == DK_DTYPE_F32)
      memcpy((unsigned char*)base + 4 * i, &POISON32, 4);
    else
      ((uint16_t*)base)[i] = POISON16;
  }
}

static int poisoned(const void* base, int dtype, size_t i) {
  if (dtype == DK_DTYPE_F32) return memcmp((const unsigned char*)base + 4 * i, &POISON32, 4) == 0;
  return ((const uint16_t*)base)[i] == POISON16;
}

/* ---- one problem ------------------------------------------------------------------------------- */

typedef struct {
  const char* name;
  int dtype;
  int batch;            /* B */
  int sq, sk;           /* padded: per sequence; varlen: bounds on the longest */
  const int32_t* cu_q;  /* [B + 1] or NULL (padded) */
  const int32_t* cu_k;  /* [B + 1] or NULL (padded) */
  int hq, hkv, d;
  int causal;
  float scale;          /* 0: the default 1 / sqrt(d) */
  int pad;              /* extra elements in every row stride (a multiple of 8) */
} attn_case;

typedef struct {
  attn_case c;
  int rows_q, rows_k;   /* Tq, Tk */
  int qc, kc;           /* row lengths hq * d and hkv * d */
  int qs, ks;           /* row strides qc + pad and kc + pad */
  size_t lse_len;       /* hq * Tq */
  buf q, k, v, out, lse, dout, dq, dk, dv;
} problem;

static int q_start(const problem* p, int b) { return p->c.cu_q ? p->c.cu_q[b] : b * p->c.sq; }
static int q_len(const problem* p, int b) {
  return p->c.cu_q ? p->c.cu_q[b + 1] - p->c.cu_q[b] : p->c.sq;
}
static int k_start(const problem* p, int b) { return p->c.cu_k ? p->c.cu_k[b] : b * p->c.sk; }
static int k_len(const problem* p, int b) {
  return p->c.cu_k ? p->c.cu_k[b + 1] - p->c.cu_k[b] : p->c.sk;
}

/* Index of (sequence b, head h, query i of the sequence) in the lse. */
static size_t lse_index(const problem* p, int b, int h, int i) {
  if (p->c.cu_q) return (size_t)h * p->rows_q + q_start(p, b) + i;
  return ((size_t)b * p->c.hq + h) * p->c.sq + i;
}

/* Query i of a sequence with nq queries and nk keys sees key j? (bottom-right causal) */
static int visible(const problem* p, int i, int j, int nq, int nk) {
  return !p->c.causal || j <= i + nk - nq;
}

static double scale_of(const attn_case* c) {
  return c->scale != 0.0f ? (double)c->scale : 1.0 / sqrt((double)c->d);
}

static void fill(void* base, int dtype, int rows, int cols, int stride) {
  int r, j;
  poison(base, dtype, (size_t)rows * stride); /* the gaps: never read */
  for (r = 0; r < rows; ++r)
    for (j = 0; j < cols; ++j) set(base, dtype, (size_t)r * stride + j, rng_normal());
}

static problem problem_new(const attn_case* c) {
  problem p;
  size_t es = esize(c->dtype);
  memset(&p, 0, sizeof p);
  p.c = *c;
  p.rows_q = c->cu_q ? c->cu_q[c->batch] : c->batch * c->sq;
  p.rows_k = c->cu_k ? c->cu_k[c->batch] : c->batch * c->sk;
  p.qc = c->hq * c->d;
  p.kc = c->hkv * c->d;
  p.qs = p.qc + c->pad;
  p.ks = p.kc + c->pad;
  p.lse_len = (size_t)c->hq * p.rows_q;
  /* +1 row so that empty tensors still get a real pointer */
  p.q = buf_new(es * (p.rows_q + 1) * p.qs);
  p.out = buf_new(es * (p.rows_q + 1) * p.qs);
  p.dout = buf_new(es * (p.rows_q + 1) * p.qs);
  p.dq = buf_new(es * (p.rows_q + 1) * p.qs);
  p.k = buf_new(es * (p.rows_k + 1) * p.ks);
  p.v = buf_new(es * (p.rows_k + 1) * p.ks);
  p.dk = buf_new(es * (p.rows_k + 1) * p.ks);
  p.dv = buf_new(es * (p.rows_k + 1) * p.ks);
  p.lse = buf_new(4 * (p.lse_len + 1));
  fill(p.q.p, c->dtype, p.rows_q, p.qc, p.qs);
  fill(p.k.p, c->dtype, p.rows_k, p.kc, p.ks);
  fill(p.v.p, c->dtype, p.rows_k, p.kc, p.ks);
  fill(p.dout.p, c->dtype, p.rows_q, p.qc, p.qs);
  return p;
}

static void problem_free(problem* p) {
  free(p->q.raw);
  free(p->k.raw);
  free(p->v.raw);
  free(p->out.raw);
  free(p->lse.raw);
  free(p->dout.raw);
  free(p->dq.raw);
  free(p->dk.raw);
  free(p->dv.raw);
}

static dk_attention_params params_of(const attn_case* c) {
  dk_attention_params a = dk_attention_params_default();
  a.heads_q = c->hq;
  a.heads_kv = c->hkv;
  a.head_dim = c->d;
  a.causal = c->causal;
  a.softmax_scale = c->scale;
  a.deterministic = 1;
  return a;
}

static dk_attention_batch batch_of(const problem* p) {
  dk_attention_batch b;
  memset(&b, 0, sizeof b);
  b.batch = p->c.batch;
  b.seqlen_q = p->c.sq;
  b.seqlen_k = p->c.sk;
  b.cu_seqlens_q = p->c.cu_q;
  b.cu_seqlens_k = p->c.cu_k;
  if (p->c.cu_q) {
    b.rows_q = p->rows_q;
    b.rows_k = p->rows_k;
  } else {
    b.rows_q = -7; /* ignored for padded batches */
    b.rows_k = -7;
  }
  return b;
}

static dk_attention_args forward_args(problem* p) {
  dk_attention_args a;
  memset(&a, 0, sizeof a);
  a.batch = batch_of(p);
  a.dtype = p->c.dtype;
  a.q = p->q.p;
  a.q_stride = p->qs;
  a.k = p->k.p;
  a.k_stride = p->ks;
  a.v = p->v.p;
  a.v_stride = p->ks;
  a.out = p->out.p;
  a.out_stride = p->qs;
  a.lse = (float*)p->lse.p;
  return a;
}

static dk_attention_backward_args backward_args(problem* p) {
  dk_attention_backward_args a;
  memset(&a, 0, sizeof a);
  a.batch = batch_of(p);
  a.dtype = p->c.dtype;
  a.dout = p->dout.p;
  a.dout_stride = p->qs;
  a.q = p->q.p;
  a.q_stride = p->qs;
  a.k = p->k.p;
  a.k_stride = p->ks;
  a.v = p->v.p;
  a.v_stride = p->ks;
  a.out = p->out.p;
  a.out_stride = p->qs;
  a.lse = (const float*)p->lse.p;
  a.dq = p->dq.p;
  a.dq_stride = p->qs;
  a.dk = p->dk.p;
  a.dk_stride = p->ks;
  a.dv = p->dv.p;
  a.dv_stride = p->ks;
  return a;
}

/* ---- the reference, in double ------------------------------------------------------------------ */

/* out [Tq, qc] dense and lse [hq * Tq] in the library's lse layout. */
static void ref_forward(const problem* p, double* out, double* lse) {
  const attn_case* c = &p->c;
  int group = c->hq / c->hkv, b, h, i, j, e;
  double scale = scale_of(c);
  double* s = malloc(sizeof(double) * ((size_t)p->rows_k + 1));
  memset(out, 0, sizeof(double) * (size_t)p->rows_q * p->qc);
  for (b = 0; b < c->batch; ++b) {
    int q0 = q_start(p, b), nq = q_len(p, b), k0 = k_start(p, b), nk = k_len(p, b);
    for (h = 0; h < c->hq; ++h) {
      int kh = h / group;
      for (i = 0; i < nq; ++i) {
        double m = -INFINITY, sum = 0.0;
        int seen = 0;
        const size_t qrow = (size_t)(q0 + i) * p->qs + (size_t)h * c->d;
        for (j = 0; j < nk; ++j) {
          const size_t krow = (size_t)(k0 + j) * p->ks + (size_t)kh * c->d;
          double dot = 0.0;
          if (!visible(p, i, j, nq, nk)) continue;
          for (e = 0; e < c->d; ++e)
            dot += get(p->q.p, c->dtype, qrow + e) * get(p->k.p, c->dtype, krow + e);
          s[j] = scale * dot;
          if (s[j] > m) m = s[j];
          ++seen;
        }
        if (!seen) {
          lse[lse_index(p, b, h, i)] = -INFINITY;
          continue;
        }
        for (j = 0; j < nk; ++j)
          if (visible(p, i, j, nq, nk)) sum += exp(s[j] - m);
        for (j = 0; j < nk; ++j) {
          const size_t vrow = (size_t)(k0 + j) * p->ks + (size_t)kh * c->d;
          double w;
          if (!visible(p, i, j, nq, nk)) continue;
          w = exp(s[j] - m) / sum;
          for (e = 0; e < c->d; ++e)
            out[(size_t)(q0 + i) * p->qc + (size_t)h * c->d + e] +=
                w * get(p->v.p, c->dtype, vrow + e);
        }
        lse[lse_index(p, b, h, i)] = m + log(sum);
      }
    }
  }
  free(s);
}

/* dq [Tq, qc], dk and dv [Tk, kc], dense, from the out and lse held in the problem. */
static void ref_backward(const problem* p, double* dq, double* dk, double* dv) {
  const attn_case* c = &p->c;
  int group = c->hq / c->hkv, b, h, i, j, e;
  double scale = scale_of(c);
  int dt = c->dtype;
  memset(dq, 0, sizeof(double) * (size_t)p->rows_q * p->qc);
  memset(dk, 0, sizeof(double) * (size_t)p->rows_k * p->kc);
  memset(dv, 0, sizeof(double) * (size_t)p->rows_k * p->kc);
  for (b = 0; b < c->batch; ++b) {
    int q0 = q_start(p, b), nq = q_len(p, b), k0 = k_start(p, b), nk = k_len(p, b);
    for (h = 0; h < c->hq; ++h) {
      int kh = h / group;
      for (i = 0; i < nq; ++i) {
        const size_t qrow = (size_t)(q0 + i) * p->qs + (size_t)h * c->d;
        double lse = (double)((const float*)p->lse.p)[lse_index(p, b, h, i)];
        double delta = 0.0;
        if (isinf(lse) && lse < 0) continue; /* sees no key: P = 0 */
        for (e = 0; e < c->d; ++e)
          delta += get(p->dout.p, dt, qrow + e) * get(p->out.p, dt, qrow + e);
        for (j = 0; j < nk; ++j) {
          const size_t krow = (size_t)(k0 + j) * p->ks + (size_t)kh * c->d;
          const size_t kdense = (size_t)(k0 + j) * p->kc + (size_t)kh * c->d;
          const size_t qdense = (size_t)(q0 + i) * p->qc + (size_t)h * c->d;
          double dot = 0.0, dp = 0.0, pij, ds;
          if (!visible(p, i, j, nq, nk)) continue;
          for (e = 0; e < c->d; ++e) {
            dot += get(p->q.p, dt, qrow + e) * get(p->k.p, dt, krow + e);
            dp += get(p->dout.p, dt, qrow + e) * get(p->v.p, dt, krow + e);
          }
          pij = exp(scale * dot - lse);
          ds = pij * (dp - delta);
          for (e = 0; e < c->d; ++e) {
            dq[qdense + e] += scale * ds * get(p->k.p, dt, krow + e);
            dk[kdense + e] += scale * ds * get(p->q.p, dt, qrow + e);
            dv[kdense + e] += pij * get(p->dout.p, dt, qrow + e);
          }
        }
      }
    }
  }
}

/* ---- comparisons ------------------------------------------------------------------------------- */

/* ||got - ref|| / ||ref|| over a strided matrix (NaN or poison: infinity). */
static double rel_err(const void* got, int dtype, int rows, int cols, int stride,
                      const double* ref) {
  double d = 0.0, r = 0.0;
  int i, j;
  for (i = 0; i < rows; ++i)
    for (j = 0; j < cols; ++j) {
      double x = get(got, dtype, (size_t)i * stride + j), y = ref[(size_t)i * cols + j];
      if (x != x) return INFINITY;
      d += (x - y) * (x - y);
      r += y * y;
    }
  if (d == 0.0) return 0.0;
  return sqrt(d) / (sqrt(r) > 1e-6 ? sqrt(r) : 1e-6);
}

/* Elements of a strided matrix not written (still poison), and gap elements that were. */
static void count_writes(const void* m, int dtype, int rows, int cols, int stride, int* unwritten,
                         int* gap_written) {
  int i, j;
  for (i = 0; i < rows; ++i)
    for (j = 0; j < stride; ++j) {
      int pz = poisoned(m, dtype, (size_t)i * stride + j);
      if (j < cols && pz) ++*unwritten;
      if (j >= cols && !pz) ++*gap_written;
    }
}

/* Rows of a strided matrix that must be exactly zero: count the nonzero elements. */
static int nonzero_in_row(const void* m, int dtype, int row, int col0, int n, int stride) {
  int j, bad = 0;
  for (j = 0; j < n; ++j) bad += get(m, dtype, (size_t)row * stride + col0 + j) != 0.0;
  return bad;
}

/* ---- one numerical case ------------------------------------------------------------------------ */

static void run_case(dk_context* ctx, const attn_case* c) {
  problem p = problem_new(c);
  const char* name = c->name;
  int dt = c->dtype;
  double tol = dt == DK_DTYPE_F32 ? 1e-5 : 1e-2;
  double* ref_out = malloc(sizeof(double) * ((size_t)p.rows_q * p.qc + 1));
  double* ref_lse = malloc(sizeof(double) * (p.lse_len + 1));
  double* ref_dq = malloc(sizeof(double) * ((size_t)p.rows_q * p.qc + 1));
  double* ref_dk = malloc(sizeof(double) * ((size_t)p.rows_k * p.kc + 1));
  double* ref_dv = malloc(sizeof(double) * ((size_t)p.rows_k * p.kc + 1));
  size_t qn = (size_t)(p.rows_q + 1) * p.qs, kn = (size_t)(p.rows_k + 1) * p.ks, i;
  dk_attention_params prm = params_of(c);
  dk_attention_args fa = forward_args(&p);
  dk_attention_backward_args ba = backward_args(&p);
  buf dq2 = buf_new(esize(dt) * qn), dk2 = buf_new(esize(dt) * kn), dv2 = buf_new(esize(dt) * kn);
  int unwritten = 0, gap = 0, bad = 0, lse_bad = 0, b, h, r, j;
  double e, ld = 0.0, lr = 0.0;
  size_t ws = 12345;
  dk_status st;

  /* Forward. */
  poison(p.out.p, dt, qn);
  poison(p.lse.p, DK_DTYPE_F32, p.lse_len + 1);
  ref_forward(&p, ref_out, ref_lse);
  st = dk_attention_forward(ctx, &fa, &prm, NULL);
  CHECK(st == DK_OK && strlen(dk_last_error()) == 0, "%s: forward status %d (%s)", name, st,
        dk_last_error());
  count_writes(p.out.p, dt, p.rows_q, p.qc, p.qs, &unwritten, &gap);
  for (i = 0; i < p.lse_len; ++i) unwritten += poisoned(p.lse.p, DK_DTYPE_F32, i);
  CHECK(unwritten == 0 && gap == 0, "%s: forward: %d elements not written, %d gap elements written",
        name, unwritten, gap);
  CHECK(poisoned(p.lse.p, DK_DTYPE_F32, p.lse_len), "%s: wrote past the lse", name);
  e = rel_err(p.out.p, dt, p.rows_q, p.qc, p.qs, ref_out);
  CHECK(e <= tol, "%s: out error %g (tolerance %g)", name, e, tol);
  for (i = 0; i < p.lse_len; ++i) {
    double x = (double)((const float*)p.lse.p)[i];
    if (isinf(ref_lse[i])) {
      lse_bad += !(isinf(x) && x < 0);
    } else if (!isfinite(x)) {
      ++lse_bad;
    } else {
      ld += (x - ref_lse[i]) * (x - ref_lse[i]);
      lr += ref_lse[i] * ref_lse[i];
    }
  }
  CHECK(lse_bad == 0, "%s: %d lse entries wrongly (non-)infinite", name, lse_bad);
  e = ld == 0.0 ? 0.0 : sqrt(ld) / (sqrt(lr) > 1e-6 ? sqrt(lr) : 1e-6);
  CHECK(e <= 1e-5, "%s: lse error %g", name, e);
  /* Query rows that see no key: out exactly 0. */
  for (b = 0; b < c->batch; ++b)
    for (h = 0; h < c->hq; ++h)
      for (r = 0; r < q_len(&p, b); ++r)
        if (isinf(ref_lse[lse_index(&p, b, h, r)]))
          bad += nonzero_in_row(p.out.p, dt, q_start(&p, b) + r, h * c->d, c->d, p.qs);
  CHECK(bad == 0, "%s: %d output elements of rows that see no key are not 0", name, bad);

  /* Backward, from the library's own out and lse. */
  poison(p.dq.p, dt, qn);
  poison(p.dk.p, dt, kn);
  poison(p.dv.p, dt, kn);
  ref_backward(&p, ref_dq, ref_dk, ref_dv);
  st = dk_attention_backward_workspace_size(ctx, &ba, &prm, &ws);
  CHECK(st == DK_OK && ws == 0, "%s: workspace query %d, %zu bytes (%s)", name, st, ws,
        dk_last_error());
  st = dk_attention_backward(ctx, &ba, &prm, NULL, 0, NULL);
  CHECK(st == DK_OK && strlen(dk_last_error()) == 0, "%s: backward status %d (%s)", name, st,
        dk_last_error());
  unwritten = gap = 0;
  count_writes(p.dq.p, dt, p.rows_q, p.qc, p.qs, &unwritten, &gap);
  count_writes(p.dk.p, dt, p.rows_k, p.kc, p.ks, &unwritten, &gap);
  count_writes(p.dv.p, dt, p.rows_k, p.kc, p.ks, &unwritten, &gap);
  CHECK(unwritten == 0 && gap == 0,
        "%s: backward: %d elements not written, %d gap elements written", name, unwritten, gap);
  e = rel_err(p.dq.p, dt, p.rows_q, p.qc, p.qs, ref_dq);
  CHECK(e <= tol, "%s: dq error %g (tolerance %g)", name, e, tol);
  e = rel_err(p.dk.p, dt, p.rows_k, p.kc, p.ks, ref_dk);
  CHECK(e <= tol, "%s: dk error %g (tolerance %g)", name, e, tol);
  e = rel_err(p.dv.p, dt, p.rows_k, p.kc, p.ks, ref_dv);
  CHECK(e <= tol, "%s: dv error %g (tolerance %g)", name, e, tol);
  /* Exact zeros: dq of rows that see no key, dk / dv of keys that no query sees. */
  bad = 0;
  for (b = 0; b < c->batch; ++b) {
    int nq = q_len(&p, b), nk = k_len(&p, b);
    for (h = 0; h < c->hq; ++h)
      for (r = 0; r < nq; ++r)
        if (isinf(ref_lse[lse_index(&p, b, h, r)]))
          bad += nonzero_in_row(p.dq.p, dt, q_start(&p, b) + r, h * c->d, c->d, p.qs);
    for (j = 0; j < nk; ++j) {
      int seen = 0;
      for (r = 0; r < nq; ++r) seen |= visible(&p, r, j, nq, nk);
      if (!seen) {
        bad += nonzero_in_row(p.dk.p, dt, k_start(&p, b) + j, 0, p.kc, p.ks);
        bad += nonzero_in_row(p.dv.p, dt, k_start(&p, b) + j, 0, p.kc, p.ks);
      }
    }
  }
  CHECK(bad == 0, "%s: %d gradient elements that must be 0 are not", name, bad);

  /* Deterministic: the same bits again. */
  ba.dq = dq2.p;
  ba.dk = dk2.p;
  ba.dv = dv2.p;
  poison(dq2.p, dt, qn);
  poison(dk2.p, dt, kn);
  poison(dv2.p, dt, kn);
  st = dk_attention_backward(ctx, &ba, &prm, NULL, 0, NULL);
  CHECK(st == DK_OK, "%s: second backward status %d (%s)", name, st, dk_last_error());
  CHECK(memcmp(dq2.p, p.dq.p, esize(dt) * qn) == 0 && memcmp(dk2.p, p.dk.p, esize(dt) * kn) == 0 &&
            memcmp(dv2.p, p.dv.p, esize(dt) * kn) == 0,
        "%s: deterministic backward differs between two runs", name);
  /* deterministic = 0 (on CUDA: dq summed by f32 atomics) is accepted; the CPU backend stays
   * reproducible, so the same bits again. */
  prm.deterministic = 0;
  poison(dq2.p, dt, qn);
  poison(dk2.p, dt, kn);
  poison(dv2.p, dt, kn);
  st = dk_attention_backward(ctx, &ba, &prm, NULL, 0, NULL);
  prm.deterministic = 1;
  CHECK(st == DK_OK, "%s: backward (deterministic = 0) status %d (%s)", name, st, dk_last_error());
  CHECK(memcmp(dq2.p, p.dq.p, esize(dt) * qn) == 0 && memcmp(dk2.p, p.dk.p, esize(dt) * kn) == 0 &&
            memcmp(dv2.p, p.dv.p, esize(dt) * kn) == 0,
        "%s: backward with deterministic = 0 differs from the deterministic one on the CPU", name);

  free(dq2.raw);
  free(dk2.raw);
  free(dv2.raw);
  free(ref_out);
  free(ref_lse);
  free(ref_dq);
  free(ref_dk);
  free(ref_dv);
  problem_free(&p);
}

/* softmax_scale 0 is 1 / sqrt(D): bitwise the same as 0.125 for D = 64. */
static void default_scale(dk_context* ctx) {
  attn_case c = {"default scale", DK_DTYPE_BF16, 2, 3, 4, NULL, NULL, 2, 1, 64, 1, 0.0f, 0};
  problem p = problem_new(&c);
  size_t qn = (size_t)(p.rows_q + 1) * p.qs;
  buf out2 = buf_new(2 * qn), lse2 = buf_new(4 * (p.lse_len + 1));
  dk_attention_params prm = params_of(&c);
  dk_attention_args a = forward_args(&p);
  dk_status st;
  poison(p.out.p, c.dtype, qn);
  poison(out2.p, c.dtype, qn);
  poison(p.lse.p, DK_DTYPE_F32, p.lse_len + 1);
  poison(lse2.p, DK_DTYPE_F32, p.lse_len + 1);
  st = dk_attention_forward(ctx, &a, &prm, NULL);
  CHECK(st == DK_OK, "default scale: status %d (%s)", st, dk_last_error());
  prm.softmax_scale = 0.125f;
  a.out = out2.p;
  a.lse = (float*)lse2.p;
  st = dk_attention_forward(ctx, &a, &prm, NULL);
  CHECK(st == DK_OK, "scale 0.125: status %d (%s)", st, dk_last_error());
  CHECK(memcmp(p.out.p, out2.p, 2 * qn) == 0 &&
            memcmp(p.lse.p, lse2.p, 4 * (p.lse_len + 1)) == 0,
        "softmax_scale 0 differs from 1/sqrt(64) = 0.125");
  free(out2.raw);
  free(lse2.raw);
  problem_free(&p);
}

/* ---- error paths ------------------------------------------------------------------------------- */

static void expect(dk_status st, dk_status want, const char* what) {
  CHECK(st == want && strlen(dk_last_error()) > 0, "%s: status %d, want %d (\"%s\")", what, st,
        want, dk_last_error());
}

static void error_paths(dk_context* ctx) {
  /* B = 2, Sq = 3, Sk = 4, Hq = 4, Hkv = 2, D = 64, bf16, strides of row + 8. */
  attn_case c = {"errors", DK_DTYPE_BF16, 2, 3, 4, NULL, NULL, 4, 2, 64, 1, 0.0f, 8};
  static const int32_t cu_q[3] = {0, 3, 6}, cu_k[3] = {0, 4, 8};
  static const int32_t cu_k_short[3] = {0, 4, 7}, cu_k_down[3] = {0, 3, 2};
  problem p = problem_new(&c);
  size_t qn = (size_t)(p.rows_q + 1) * p.qs, kn = (size_t)(p.rows_k + 1) * p.ks, i;
  dk_attention_params prm = params_of(&c), bp;
  dk_attention_args fa = forward_args(&p), f;
  dk_attention_backward_args ba, b;
  size_t ws = 777;
  int untouched = 1;
  dk_status st;

  /* A valid out and lse for the backward calls, then everything poisoned. */
  poison(p.out.p, c.dtype, qn);
  st = dk_attention_forward(ctx, &fa, &prm, NULL);
  CHECK(st == DK_OK, "errors: setup forward %d (%s)", st, dk_last_error());
  ba = backward_args(&p);
  poison(p.dq.p, c.dtype, qn);
  poison(p.dk.p, c.dtype, kn);
  poison(p.dv.p, c.dtype, kn);
  {
    /* A separate, poisoned forward output. */
    buf out = buf_new(2 * qn), lse = buf_new(4 * (p.lse_len + 1));
    poison(out.p, c.dtype, qn);
    poison(lse.p, DK_DTYPE_F32, p.lse_len + 1);
    fa.out = out.p;
    fa.lse = (float*)lse.p;

    /* NULL pointers. */
    expect(dk_attention_forward(NULL, &fa, &prm, NULL), DK_ERR_NULL_POINTER, "forward, NULL ctx");
    expect(dk_attention_forward(ctx, NULL, &prm, NULL), DK_ERR_NULL_POINTER, "forward, NULL args");
    expect(dk_attention_forward(ctx, &fa, NULL, NULL), DK_ERR_NULL_POINTER,
           "forward, NULL params");
    expect(dk_attention_backward(NULL, &ba, &prm, NULL, 0, NULL), DK_ERR_NULL_POINTER,
           "backward, NULL ctx");
    expect(dk_attention_backward(ctx, NULL, &prm, NULL, 0, NULL), DK_ERR_NULL_POINTER,
           "backward, NULL args");
    expect(dk_attention_backward(ctx, &ba, NULL, NULL, 0, NULL), DK_ERR_NULL_POINTER,
           "backward, NULL params");
    expect(dk_attention_backward_workspace_size(NULL, &ba, &prm, &ws), DK_ERR_NULL_POINTER,
           "workspace query, NULL ctx");
    expect(dk_attention_backward_workspace_size(ctx, NULL, &prm, &ws), DK_ERR_NULL_POINTER,
           "workspace query, NULL args");
    expect(dk_attention_backward_workspace_size(ctx, &ba, NULL, &ws), DK_ERR_NULL_POINTER,
           "workspace query, NULL params");
    expect(dk_attention_backward_workspace_size(ctx, &ba, &prm, NULL), DK_ERR_NULL_POINTER,
           "workspace query, NULL bytes");
    f = fa;
    f.q = NULL;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_NULL_POINTER, "forward, NULL q");
    f = fa;
    f.lse = NULL;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_NULL_POINTER, "forward, NULL lse");
    b = ba;
    b.dk = NULL;
    expect(dk_attention_backward(ctx, &b, &prm, NULL, 0, NULL), DK_ERR_NULL_POINTER,
           "backward, NULL dk");

    /* Parameters. */
    bp = prm;
    bp.heads_kv = 3;
    expect(dk_attention_forward(ctx, &fa, &bp, NULL), DK_ERR_SHAPE,
           "heads_q 4 not a multiple of heads_kv 3");
    expect(dk_attention_backward(ctx, &ba, &bp, NULL, 0, NULL), DK_ERR_SHAPE,
           "backward, heads_q 4 not a multiple of heads_kv 3");
    expect(dk_attention_backward_workspace_size(ctx, &ba, &bp, &ws), DK_ERR_SHAPE,
           "workspace query, heads_q 4 not a multiple of heads_kv 3");
    bp = prm;
    bp.heads_q = 0;
    expect(dk_attention_forward(ctx, &fa, &bp, NULL), DK_ERR_SHAPE, "heads_q 0");
    bp = prm;
    bp.heads_kv = -2;
    expect(dk_attention_forward(ctx, &fa, &bp, NULL), DK_ERR_SHAPE, "heads_kv -2");
    bp = prm;
    bp.head_dim = 96;
    expect(dk_attention_forward(ctx, &fa, &bp, NULL), DK_ERR_SHAPE, "head_dim 96");
    expect(dk_attention_backward(ctx, &ba, &bp, NULL, 0, NULL), DK_ERR_SHAPE,
           "backward, head_dim 96");
    bp = prm;
    bp.softmax_scale = -0.5f;
    expect(dk_attention_forward(ctx, &fa, &bp, NULL), DK_ERR_INVALID_ARGUMENT,
           "softmax_scale -0.5");
    bp.softmax_scale = (float)NAN;
    expect(dk_attention_forward(ctx, &fa, &bp, NULL), DK_ERR_INVALID_ARGUMENT,
           "softmax_scale NaN");
    expect(dk_attention_backward(ctx, &ba, &bp, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
           "backward, softmax_scale NaN");
    bp.softmax_scale = (float)INFINITY;
    expect(dk_attention_forward(ctx, &fa, &bp, NULL), DK_ERR_INVALID_ARGUMENT,
           "softmax_scale inf");
    bp = prm;
    bp.causal = 2;
    expect(dk_attention_forward(ctx, &fa, &bp, NULL), DK_ERR_INVALID_ARGUMENT, "causal 2");
    bp = prm;
    bp.deterministic = -1;
    expect(dk_attention_backward(ctx, &ba, &bp, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
           "deterministic -1");

    /* dtype, shapes, strides, alignment. */
    f = fa;
    f.dtype = 9;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_UNSUPPORTED_DTYPE, "dtype 9");
    f = fa;
    f.batch.batch = -1;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_SHAPE, "batch -1");
    f = fa;
    f.batch.seqlen_k = -4;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_SHAPE, "seqlen_k -4");
    f = fa;
    f.q_stride = -(int64_t)p.qs;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_SHAPE, "q_stride negative");
    f = fa;
    f.k_stride = p.kc - 8;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_SHAPE, "k_stride < row length");
    f = fa;
    f.v_stride = p.kc + 1;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_INVALID_ARGUMENT,
           "v_stride * 2 bytes not a multiple of 16");
    f = fa;
    f.q = p.q.p + 2;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_INVALID_ARGUMENT,
           "q not 16-byte aligned");
    b = ba;
    b.dv_stride = p.kc + 4;
    expect(dk_attention_backward(ctx, &b, &prm, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
           "backward, dv_stride * 2 bytes not a multiple of 16");
    b = ba;
    b.dout = p.dout.p + 8;
    expect(dk_attention_backward(ctx, &b, &prm, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
           "backward, dout not 16-byte aligned");

    /* Varlen batches: only one offset array, negative rows, offsets that do not fit. */
    f = fa;
    f.batch.cu_seqlens_q = cu_q;
    f.batch.rows_q = 6;
    f.batch.rows_k = 8;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_INVALID_ARGUMENT,
           "varlen with only cu_seqlens_q");
    b = ba;
    b.batch.cu_seqlens_k = cu_k;
    b.batch.rows_q = 6;
    b.batch.rows_k = 8;
    expect(dk_attention_backward(ctx, &b, &prm, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
           "backward, varlen with only cu_seqlens_k");
    f.batch.cu_seqlens_k = cu_k;
    f.batch.rows_q = -6;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_SHAPE, "varlen, rows_q -6");
    f.batch.rows_q = 6;
    f.batch.cu_seqlens_k = cu_k_short;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_SHAPE,
           "varlen, cu_seqlens_k ends at 7 but rows_k = 8");
    f.batch.cu_seqlens_k = cu_k_down;
    f.batch.rows_k = 2;
    expect(dk_attention_forward(ctx, &f, &prm, NULL), DK_ERR_SHAPE,
           "varlen, decreasing cu_seqlens_k");

    for (i = 0; i < qn; ++i) untouched &= poisoned(out.p, c.dtype, i);
    for (i = 0; i < p.lse_len + 1; ++i) untouched &= poisoned(lse.p, DK_DTYPE_F32, i);
    for (i = 0; i < qn; ++i) untouched &= poisoned(p.dq.p, c.dtype, i);
    for (i = 0; i < kn; ++i) untouched &= poisoned(p.dk.p, c.dtype, i);
    for (i = 0; i < kn; ++i) untouched &= poisoned(p.dv.p, c.dtype, i);
    CHECK(untouched, "a failed call wrote its outputs");
    CHECK(ws == 777, "a failed workspace query wrote its output");

    /* And the same calls, corrected, succeed. */
    st = dk_attention_forward(ctx, &fa, &prm, NULL);
    CHECK(st == DK_OK && strlen(dk_last_error()) == 0, "valid forward: %d (%s)", st,
          dk_last_error());
    CHECK(!poisoned(out.p, c.dtype, 0), "valid forward did not write");
    st = dk_attention_backward(ctx, &ba, &prm, NULL, 0, NULL);
    CHECK(st == DK_OK && strlen(dk_last_error()) == 0, "valid backward: %d (%s)", st,
          dk_last_error());
    CHECK(!poisoned(p.dq.p, c.dtype, 0), "valid backward did not write");
    free(out.raw);
    free(lse.raw);
  }
  problem_free(&p);
}

/* A batch of 2^31 - 1 sequences with no rows is a valid call with nothing to compute: it must
   return DK_OK (at once: the CPU backend does not build a table of the sequences, which would take
   64 GiB) and write nothing. Forward and backward, padded and varlen (2^20 empty sequences). */
static void empty_sequences(dk_context* ctx) {
  /* Rows of 64 bf16 (128 bytes: 16-byte aligned inside the arrays' 16-byte aligned start). */
  static uint16_t rows[5][64] __attribute__((aligned(16)));
  static float lse[4];
  static int32_t zeros[(1 << 20) + 1];
  dk_attention_params p = dk_attention_params_default();
  dk_attention_batch padded = {INT32_MAX, 0, 0, NULL, NULL, 0, 0};
  dk_attention_batch varlen = {1 << 20, 0, 0, zeros, zeros, 0, 0};
  const dk_attention_batch* batches[2] = {&padded, &varlen};
  int b;
  p.head_dim = 64;
  for (b = 0; b < 2; ++b) {
    dk_attention_args a;
    dk_attention_backward_args g;
    dk_status st;
    size_t i;
    memset(&a, 0, sizeof a);
    memset(&g, 0, sizeof g);
    for (i = 0; i < 5 * 64; ++i) rows[i / 64][i % 64] = POISON16;
    lse[0] = 7.0f;
    a.batch = g.batch = *batches[b];
    a.dtype = g.dtype = DK_DTYPE_BF16;
    a.q = a.k = a.v = g.dout = g.q = g.k = g.v = g.out = rows[0];
    a.out = rows[1];
    g.dq = rows[2];
    g.dk = rows[3];
    g.dv = rows[4];
    a.q_stride = a.k_stride = a.v_stride = a.out_stride = 64;
    g.dout_stride = g.q_stride = g.k_stride = g.v_stride = g.out_stride = 64;
    g.dq_stride = g.dk_stride = g.dv_stride = 64;
    a.lse = lse;
    g.lse = lse;
    st = dk_attention_forward(ctx, &a, &p, NULL);
    CHECK(st == DK_OK, "forward over %s empty sequences: %d (%s)", b ? "2^20 varlen" : "2^31 - 1",
          st, dk_last_error());
    st = dk_attention_backward(ctx, &g, &p, NULL, 0, NULL);
    CHECK(st == DK_OK, "backward over %s empty sequences: %d (%s)", b ? "2^20 varlen" : "2^31 - 1",
          st, dk_last_error());
    for (i = 0; i < 5 * 64; ++i) CHECK(rows[i / 64][i % 64] == POISON16, "element %zu written", i);
    CHECK(lse[0] == 7.0f, "an empty batch wrote the lse");
  }
}

int main(int argc, char** argv) {
  /* Varlen: sequence 1 has no queries, sequence 2 no keys; uneven lengths. */
  static const int32_t cu_q[5] = {0, 3, 3, 8, 9}, cu_k[5] = {0, 4, 6, 6, 13};
  const attn_case cases[] = {
      /* name, dtype, B, Sq, Sk, cu_q, cu_k, Hq, Hkv, D, causal, scale, pad */
      {"padded GQA 4/2, Sq 5 < Sk 7", DK_DTYPE_BF16, 2, 5, 7, NULL, NULL, 4, 2, 64, 0, 0.0f, 0},
      {"padded GQA 4/2, Sq 5 < Sk 7, causal", DK_DTYPE_BF16, 2, 5, 7, NULL, NULL, 4, 2, 64, 1, 0.0f,
       0},
      {"padded GQA 3/1, Sq 7 > Sk 5, causal (masked rows), D 128, strided", DK_DTYPE_BF16, 2, 7, 5,
       NULL, NULL, 3, 1, 128, 1, 0.0f, 8},
      {"padded MHA 2/2, Sq 1, Sk 6, causal, scale 0.3", DK_DTYPE_BF16, 3, 1, 6, NULL, NULL, 2, 2,
       64, 1, 0.3f, 0},
      {"padded GQA 4/2, f32, causal, strided", DK_DTYPE_F32, 2, 6, 6, NULL, NULL, 4, 2, 64, 1, 0.0f,
       8},
      {"varlen GQA 4/2, empty sequences", DK_DTYPE_BF16, 4, 5, 7, cu_q, cu_k, 4, 2, 64, 0, 0.0f, 0},
      {"varlen GQA 4/2, empty sequences, causal, D 128, strided", DK_DTYPE_BF16, 4, 5, 7, cu_q, cu_k,
       4, 2, 128, 1, 0.0f, 8},
      {"varlen GQA 4/1, f32, causal, loose bounds", DK_DTYPE_F32, 4, 9, 9, cu_q, cu_k, 4, 1, 64, 1,
       0.0f, 0},
  };
  dk_context* ctx = NULL;
  dk_attention_params d = dk_attention_params_default();
  int cuda_expected = argc > 2 && strcmp(argv[2], "1") == 0;
  size_t n;
  dk_status st;
  if (argc > 1) rng_state = strtoull(argv[1], NULL, 0) | 1u;

  CHECK(d.heads_q == 1 && d.heads_kv == 1 && d.head_dim == 128 && d.causal == 0 &&
            d.softmax_scale == 0.0f && d.deterministic == 1,
        "defaults: heads %lld / %lld, head_dim %lld, causal %d, scale %g, deterministic %d",
        (long long)d.heads_q, (long long)d.heads_kv, (long long)d.head_dim, d.causal,
        (double)d.softmax_scale, d.deterministic);

  st = dk_context_create(-1, &ctx);
  CHECK(st == DK_OK && ctx != NULL, "CPU context: %d", st);
  for (n = 0; n < sizeof cases / sizeof cases[0]; ++n) run_case(ctx, &cases[n]);
  default_scale(ctx);
  empty_sequences(ctx);
  error_paths(ctx);
  dk_context_destroy(ctx);

  if (cuda_expected) {
    attn_case c = {"cuda", DK_DTYPE_BF16, 1, 2, 2, NULL, NULL, 1, 1, 64, 0, 0.0f, 0};
    problem p = problem_new(&c);
    dk_attention_args a = forward_args(&p);
    dk_attention_params prm = params_of(&c);
    dk_context* cctx = NULL;
    st = dk_context_create(0, &cctx);
    CHECK(st == DK_OK, "CUDA context: %d (%s)", st, dk_last_error());
    poison(p.out.p, c.dtype, (size_t)(p.rows_q + 1) * p.qs);
    st = dk_attention_forward(cctx, &a, &prm, NULL);
    CHECK(st == DK_ERR_WRONG_DEVICE, "host pointers on a CUDA context: %d", st);
    CHECK(poisoned(p.out.p, c.dtype, 0), "a refused CUDA call wrote host memory");
    dk_context_destroy(cctx);
    problem_free(&p);
  }

  printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
