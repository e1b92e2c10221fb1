/*
 * A C99 client of the fused linear divergence (dk_fused_linear_*), built and run by
 * capi/tests/c_abi.rs.
 *
 * On a CPU context: the default parameters, the workspace query (0 on the CPU), calls (forward
 * KL / reverse KL / JSD, logit_scale, softcap, labels, chunk sizes, self-distillation, f32
 * gradients accumulated into the buffers) against its own double-precision implementation
 * below, every output element written, and the error paths (NULL arguments, bad codes, bad
 * shapes, overlapping outputs: status, dk_last_error, nothing written). With argv[2] = "1" (a
 * device and compiled kernels are present) it checks that host pointers are refused by a CUDA
 * context; the numerical CUDA checks live in the Rust tests.
 *
 * Usage: fused_test SEED CUDA_EXPECTED
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

static const uint32_t POISON = 0xFFBADBADu;

static float poison_f32(void) {
  float f;
  memcpy(&f, &POISON, 4);
  return f;
}

static int is_poison(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u == POISON;
}

static double rel_err(const float* out, const double* ref, int len) {
  double d = 0.0, r = 0.0;
  int i;
  for (i = 0; i < len; ++i) {
    if (out[i] != out[i]) return INFINITY; /* NaN */
    d += ((double)out[i] - ref[i]) * ((double)out[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  if (d == 0.0) return 0.0;
  return sqrt(d) / (sqrt(r) > 1e-6 ? sqrt(r) : 1e-6);
}

/* ---- the reference, in double ---------------------------------------------------------------- */

static void log_softmax(const double* x, int v, double* out) {
  double m = -INFINITY, s = 0.0;
  int i;
  for (i = 0; i < v; ++i)
    if (x[i] > m) m = x[i];
  for (i = 0; i < v; ++i) s += exp(x[i] - m);
  for (i = 0; i < v; ++i) out[i] = x[i] - m - log(s);
}

/* Loss of one row and dL/db (b = logits / T). */
static double ref_row(int kind, double beta, const double* lq, const double* lp, int v,
                      double* g) {
  double loss = 0.0, acc = 0.0;
  int i;
  if (kind == DK_JSD && beta == 0.0) kind = DK_FORWARD_KL;
  if (kind == DK_JSD && beta == 1.0) kind = DK_REVERSE_KL;
  if (kind == DK_FORWARD_KL) {
    for (i = 0; i < v; ++i) {
      double p = exp(lp[i]), q = exp(lq[i]);
      loss += p * (lp[i] - lq[i]);
      g[i] = q - p;
    }
  } else if (kind == DK_REVERSE_KL) {
    for (i = 0; i < v; ++i) loss += exp(lq[i]) * (lq[i] - lp[i]);
    for (i = 0; i < v; ++i) g[i] = exp(lq[i]) * (lq[i] - lp[i] - loss);
  } else {
    for (i = 0; i < v; ++i) {
      double p = exp(lp[i]), q = exp(lq[i]);
      double m = beta * p + (1.0 - beta) * q;
      loss += beta * p * log(p / m);
      acc += q * log(q / m);
    }
    loss += (1.0 - beta) * acc;
    for (i = 0; i < v; ++i) {
      double p = exp(lp[i]), q = exp(lq[i]);
      double m = beta * p + (1.0 - beta) * q;
      g[i] = (1.0 - beta) * q * (log(q / m) - acc);
    }
  }
  return loss;
}

/* Logits of row r: cap(scale * x[r] . w[j]) into z, and d(capped)/d(x.w) into dz. */
static void ref_logits(const float* x, const float* w, int r, int v, int h, double scale,
                       double cap, double* z, double* dz) {
  int j, k;
  for (j = 0; j < v; ++j) {
    double raw = 0.0, s;
    for (k = 0; k < h; ++k) raw += (double)x[r * h + k] * (double)w[j * h + k];
    s = scale * raw;
    if (cap > 0.0) {
      double t = tanh(s / cap);
      z[j] = cap * t;
      dz[j] = (1.0 - t * t) * scale;
    } else {
      z[j] = s;
      dz[j] = scale;
    }
  }
}

/* ---- one numerical case ---------------------------------------------------------------------- */

static void run_case(dk_context* ctx, const char* name, int n, int v, int h, int ht,
                     int self_distill, int use_labels, int accumulate, dk_fused_linear_params p) {
  float* sh = malloc(sizeof(float) * (size_t)n * h);
  float* sw = malloc(sizeof(float) * (size_t)v * h);
  float* th = malloc(sizeof(float) * (size_t)n * ht);
  float* tw = malloc(sizeof(float) * (size_t)v * ht);
  int64_t* labels = malloc(sizeof(int64_t) * (size_t)n);
  float* per_token = malloc(sizeof(float) * (size_t)n);
  float* gh = malloc(sizeof(float) * (size_t)n * h);
  float* gw = malloc(sizeof(float) * (size_t)v * h);
  double* prev_gh = malloc(sizeof(double) * (size_t)n * h);
  double* prev_gw = malloc(sizeof(double) * (size_t)v * h);
  double* ref_pt = malloc(sizeof(double) * (size_t)n);
  double* ref_gh = calloc((size_t)n * h, sizeof(double));
  double* ref_gw = calloc((size_t)v * h, sizeof(double));
  double* zs = malloc(sizeof(double) * (size_t)v);
  double* dzs = malloc(sizeof(double) * (size_t)v);
  double* zt = malloc(sizeof(double) * (size_t)v);
  double* dzt = malloc(sizeof(double) * (size_t)v);
  double* lq = malloc(sizeof(double) * (size_t)v);
  double* lp = malloc(sizeof(double) * (size_t)v);
  double* g = malloc(sizeof(double) * (size_t)v);
  const float* teacher_w = self_distill ? sw : tw;
  float loss = poison_f32();
  double total = 0.0, divisor = 1.0, ref_loss, e;
  double inv_t = 1.0 / (double)p.divergence.temperature;
  int i, j, k, r, valid = 0, unwritten = 0;
  dk_fused_linear_args a;
  dk_status st;
  size_t ws = 123;

  if (self_distill) ht = h;
  for (i = 0; i < n * h; ++i) sh[i] = (float)rng_normal();
  for (i = 0; i < v * h; ++i) sw[i] = (float)(rng_normal() * 2.0 / sqrt((double)h));
  for (i = 0; i < n * ht; ++i) th[i] = (float)rng_normal();
  for (i = 0; i < v * ht; ++i) tw[i] = (float)(rng_normal() * 2.0 / sqrt((double)ht));
  for (r = 0; r < n; ++r) labels[r] = (rng_uniform() < 0.3) ? p.divergence.ignore_index : 5;
  for (i = 0; i < n; ++i) per_token[i] = poison_f32();
  for (i = 0; i < n * h; ++i) {
    prev_gh[i] = accumulate ? (double)(float)(0.1 * rng_normal()) : 0.0;
    gh[i] = accumulate ? (float)prev_gh[i] : poison_f32();
  }
  for (i = 0; i < v * h; ++i) {
    prev_gw[i] = accumulate ? (double)(float)(0.1 * rng_normal()) : 0.0;
    gw[i] = accumulate ? (float)prev_gw[i] : poison_f32();
  }

  /* The reference. */
  for (r = 0; r < n; ++r) {
    ref_pt[r] = 0.0;
    if (use_labels && labels[r] == p.divergence.ignore_index) continue;
    ++valid;
    ref_logits(sh, sw, r, v, h, p.logit_scale, p.softcap, zs, dzs);
    ref_logits(th, teacher_w, r, v, ht, p.logit_scale, p.softcap, zt, dzt);
    for (j = 0; j < v; ++j) {
      zs[j] *= inv_t;
      zt[j] *= inv_t;
    }
    log_softmax(zs, v, lq);
    log_softmax(zt, v, lp);
    ref_pt[r] = ref_row(p.divergence.kind, p.divergence.beta, lq, lp, v, g);
    total += ref_pt[r];
    for (j = 0; j < v; ++j) {
      double grj = g[j] * inv_t * dzs[j];
      for (k = 0; k < h; ++k) {
        ref_gh[r * h + k] += grj * sw[j * h + k];
        ref_gw[j * h + k] += grj * sh[r * h + k];
      }
    }
  }
  if (p.divergence.reduction == DK_REDUCTION_BATCHMEAN)
    divisor = p.divergence.num_items != 0.0f ? (double)p.divergence.num_items
                                             : (valid > 0 ? valid : 1);
  ref_loss = total / divisor;
  for (i = 0; i < n * h; ++i) ref_gh[i] = prev_gh[i] + ref_gh[i] / divisor;
  for (i = 0; i < v * h; ++i) ref_gw[i] = prev_gw[i] + ref_gw[i] / divisor;

  memset(&a, 0, sizeof a);
  a.n = n;
  a.v = v;
  a.h = h;
  a.ht = ht;
  a.dtype = DK_DTYPE_F32;
  a.student_hidden = sh;
  a.student_hidden_stride = h;
  a.student_weight = sw;
  a.student_weight_stride = h;
  a.teacher_hidden = th;
  a.teacher_hidden_stride = ht;
  a.teacher_weight = teacher_w;
  a.teacher_weight_stride = ht;
  a.labels = use_labels ? labels : NULL;
  a.loss = &loss;
  a.per_token = per_token;
  a.grad_hidden = gh;
  a.grad_hidden_dtype = DK_DTYPE_F32;
  a.grad_hidden_stride = h;
  a.grad_weight = gw;
  a.grad_weight_dtype = DK_DTYPE_F32;
  a.grad_weight_stride = h;
  p.accumulate = accumulate;

  st = dk_fused_linear_workspace_size(ctx, &a, &p, &ws);
  CHECK(st == DK_OK && ws == 0, "%s: workspace size %d %zu (%s)", name, st, ws, dk_last_error());
  st = dk_fused_linear_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_OK, "%s: status %d (%s)", name, st, dk_last_error());
  for (i = 0; i < n; ++i) unwritten += is_poison(per_token[i]);
  for (i = 0; i < n * h; ++i) unwritten += is_poison(gh[i]);
  for (i = 0; i < v * h; ++i) unwritten += is_poison(gw[i]);
  CHECK(unwritten == 0, "%s: %d output elements not written", name, unwritten);
  e = fabs((double)loss - ref_loss) / (fabs(ref_loss) > 1e-6 ? fabs(ref_loss) : 1e-6);
  CHECK(e < 1e-5, "%s: loss %g vs %g", name, (double)loss, ref_loss);
  e = rel_err(per_token, ref_pt, n);
  CHECK(e < 1e-5, "%s: per-token error %g", name, e);
  e = rel_err(gh, ref_gh, n * h);
  CHECK(e < 1e-5, "%s: grad_hidden error %g", name, e);
  e = rel_err(gw, ref_gw, v * h);
  CHECK(e < 1e-5, "%s: grad_weight error %g", name, e);

  free(sh);
  free(sw);
  free(th);
  free(tw);
  free(labels);
  free(per_token);
  free(gh);
  free(gw);
  free(prev_gh);
  free(prev_gw);
  free(ref_pt);
  free(ref_gh);
  free(ref_gw);
  free(zs);
  free(dzs);
  free(zt);
  free(dzt);
  free(lq);
  free(lp);
  free(g);
}

/* ---- error paths ----------------------------------------------------------------------------- */

static void error_paths(dk_context* ctx) {
  float sh[12], sw[15], th[8], tw[10], gh[12], gw[15], loss = poison_f32();
  dk_fused_linear_args a;
  dk_fused_linear_params p = dk_fused_linear_params_default();
  dk_fused_linear_params bad;
  dk_status st;
  size_t bytes;
  int i, untouched = 1;
  for (i = 0; i < 12; ++i) sh[i] = (float)rng_normal();
  for (i = 0; i < 15; ++i) sw[i] = (float)rng_normal();
  for (i = 0; i < 8; ++i) th[i] = (float)rng_normal();
  for (i = 0; i < 10; ++i) tw[i] = (float)rng_normal();
  for (i = 0; i < 12; ++i) gh[i] = poison_f32();
  for (i = 0; i < 15; ++i) gw[i] = poison_f32();
  memset(&a, 0, sizeof a);
  a.n = 4;
  a.v = 5;
  a.h = 3;
  a.ht = 2;
  a.dtype = DK_DTYPE_F32;
  a.student_hidden = sh;
  a.student_hidden_stride = 3;
  a.student_weight = sw;
  a.student_weight_stride = 3;
  a.teacher_hidden = th;
  a.teacher_hidden_stride = 2;
  a.teacher_weight = tw;
  a.teacher_weight_stride = 2;
  a.loss = &loss;
  a.grad_hidden = gh;
  a.grad_hidden_dtype = DK_DTYPE_F32;
  a.grad_hidden_stride = 3;
  a.grad_weight = gw;
  a.grad_weight_dtype = DK_DTYPE_F32;
  a.grad_weight_stride = 3;

  st = dk_fused_linear_divergence(NULL, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_NULL_POINTER && strlen(dk_last_error()) > 0, "NULL context: %d", st);
  st = dk_fused_linear_divergence(ctx, NULL, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_NULL_POINTER, "NULL args: %d", st);
  st = dk_fused_linear_divergence(ctx, &a, NULL, NULL, 0, NULL);
  CHECK(st == DK_ERR_NULL_POINTER, "NULL params: %d", st);
  st = dk_fused_linear_workspace_size(ctx, &a, &p, NULL);
  CHECK(st == DK_ERR_NULL_POINTER, "NULL bytes: %d", st);
  st = dk_fused_linear_workspace_size(ctx, &a, NULL, &bytes);
  CHECK(st == DK_ERR_NULL_POINTER, "workspace query with NULL params: %d", st);

  bad = p;
  bad.chunk_rows = -1;
  st = dk_fused_linear_divergence(ctx, &a, &bad, NULL, 0, NULL);
  CHECK(st == DK_ERR_INVALID_ARGUMENT, "chunk_rows -1: %d", st);
  bad = p;
  bad.accumulate = 2;
  st = dk_fused_linear_divergence(ctx, &a, &bad, NULL, 0, NULL);
  CHECK(st == DK_ERR_INVALID_ARGUMENT, "accumulate 2: %d", st);
  bad = p;
  bad.softcap = -1.0f;
  st = dk_fused_linear_divergence(ctx, &a, &bad, NULL, 0, NULL);
  CHECK(st == DK_ERR_INVALID_ARGUMENT, "softcap -1: %d", st);
  bad = p;
  bad.logit_scale = 0.0f;
  st = dk_fused_linear_divergence(ctx, &a, &bad, NULL, 0, NULL);
  CHECK(st == DK_ERR_INVALID_ARGUMENT, "logit_scale 0: %d", st);
  bad = p;
  bad.divergence.kind = 7;
  st = dk_fused_linear_divergence(ctx, &a, &bad, NULL, 0, NULL);
  CHECK(st == DK_ERR_INVALID_ARGUMENT, "kind 7: %d", st);

  a.dtype = 9;
  st = dk_fused_linear_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_UNSUPPORTED_DTYPE, "dtype 9: %d", st);
  a.dtype = DK_DTYPE_F32;
  a.grad_weight_dtype = DK_DTYPE_BF16;
  st = dk_fused_linear_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_UNSUPPORTED_DTYPE, "bf16 grad_weight of f32 inputs: %d", st);
  a.grad_weight_dtype = DK_DTYPE_F32;
  a.h = -3;
  st = dk_fused_linear_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_SHAPE, "h = -3: %d", st);
  a.h = 3;
  a.student_weight_stride = 2;
  st = dk_fused_linear_workspace_size(ctx, &a, &p, &bytes);
  CHECK(st == DK_ERR_SHAPE, "workspace query, stride < h: %d", st);
  st = dk_fused_linear_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_SHAPE, "student weight stride < h: %d", st);
  a.student_weight_stride = 3;
  a.grad_hidden = sh;
  st = dk_fused_linear_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_SHAPE, "grad_hidden over the student hidden: %d", st);
  a.grad_hidden = gh;
  a.teacher_hidden = NULL;
  st = dk_fused_linear_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_NULL_POINTER, "NULL teacher hidden: %d", st);
  a.teacher_hidden = th;

  for (i = 0; i < 12; ++i) untouched &= is_poison(gh[i]);
  for (i = 0; i < 15; ++i) untouched &= is_poison(gw[i]);
  CHECK(untouched && is_poison(loss), "a failed call wrote its outputs");

  /* And the same call, corrected, succeeds. */
  st = dk_fused_linear_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_OK && strlen(dk_last_error()) == 0, "valid call: %d (%s)", st, dk_last_error());
  CHECK(!is_poison(loss) && loss >= 0.0f, "loss not written: %g", (double)loss);
}

/* Field by field: the struct has trailing padding, whose bytes memcmp would compare too. */
static int same_divergence_params(const dk_divergence_params* x, const dk_divergence_params* y) {
  return x->kind == y->kind && x->beta == y->beta && x->temperature == y->temperature &&
         x->reduction == y->reduction && x->ignore_index == y->ignore_index &&
         x->num_items == y->num_items;
}

int main(int argc, char** argv) {
  dk_context* ctx = NULL;
  dk_fused_linear_params p = dk_fused_linear_params_default();
  dk_divergence_params d = dk_divergence_params_default();
  int cuda_expected = argc > 2 && strcmp(argv[2], "1") == 0;
  dk_status st;
  if (argc > 1) rng_state = strtoull(argv[1], NULL, 0) | 1u;

  CHECK(same_divergence_params(&p.divergence, &d), "default divergence params differ");
  CHECK(p.logit_scale == 1.0f && p.softcap == 0.0f && p.chunk_rows == 0 && p.accumulate == 0,
        "defaults: scale %g softcap %g chunk %lld accumulate %d", (double)p.logit_scale,
        (double)p.softcap, (long long)p.chunk_rows, p.accumulate);

  st = dk_context_create(-1, &ctx);
  CHECK(st == DK_OK && ctx != NULL, "CPU context: %d", st);

  run_case(ctx, "forward KL defaults", 5, 11, 6, 4, 0, 0, 0, p);
  p.divergence.kind = DK_JSD;
  p.divergence.beta = 0.3f;
  p.logit_scale = 1.5f;
  p.softcap = 3.0f;
  p.chunk_rows = 2;
  run_case(ctx, "JSD, scale, softcap, chunks of 2, labels", 7, 13, 5, 6, 0, 1, 0, p);
  p.divergence.kind = DK_REVERSE_KL;
  p.divergence.temperature = 1.7f;
  p.divergence.reduction = DK_REDUCTION_SUM;
  p.chunk_rows = 3;
  run_case(ctx, "reverse KL, self-distillation, sum", 6, 9, 4, 4, 1, 0, 0, p);
  p.divergence.reduction = DK_REDUCTION_BATCHMEAN;
  p.divergence.num_items = 3.5f;
  run_case(ctx, "accumulate, num_items, labels", 5, 8, 7, 3, 0, 1, 1, p);

  error_paths(ctx);
  dk_context_destroy(ctx);

  if (cuda_expected) {
    dk_context* cctx = NULL;
    float x[4] = {1, 2, 3, 4}, gwv[4] = {0, 0, 0, 0};
    dk_fused_linear_args a;
    dk_fused_linear_params dp = dk_fused_linear_params_default();
    st = dk_context_create(0, &cctx);
    CHECK(st == DK_OK, "CUDA context: %d (%s)", st, dk_last_error());
    memset(&a, 0, sizeof a);
    a.n = 2;
    a.v = 2;
    a.h = 2;
    a.ht = 2;
    a.dtype = DK_DTYPE_F32;
    a.student_hidden = x;
    a.student_hidden_stride = 2;
    a.student_weight = x;
    a.student_weight_stride = 2;
    a.teacher_hidden = x;
    a.teacher_hidden_stride = 2;
    a.teacher_weight = x;
    a.teacher_weight_stride = 2;
    a.grad_weight = gwv;
    a.grad_weight_dtype = DK_DTYPE_F32;
    a.grad_weight_stride = 2;
    st = dk_fused_linear_divergence(cctx, &a, &dp, NULL, 0, NULL);
    CHECK(st == DK_ERR_WRONG_DEVICE, "host pointers on a CUDA context: %d", st);
    dk_context_destroy(cctx);
  }

  printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
