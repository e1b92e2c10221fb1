/*
 * A real C99 client of the distill-kernels C ABI, built and run by capi/tests/c_abi.rs.
 *
 * Checks, on a CPU context: the version, the default parameters, the divergence (forward KL,
 * reverse KL, JSD; batchmean / sum / none; labels with ignore_index; temperature; num_items;
 * row strides; a bf16 student; in place; forward only) against its own double-precision
 * implementation below, poisoned outputs written everywhere and padding untouched, and the
 * error paths (NULL arguments, bad codes, bad shapes: status, dk_last_error, nothing written);
 * and the row scaling (dk_scale_rows: f32 and bf16, factor-1 rows untouched, its error paths).
 * On CUDA (argv[2] = "1": a device and compiled kernels are present) it opens a context and
 * checks the device queries and that host pointers are refused; the numerical CUDA checks live
 * in the Rust tests, which own device memory through cudarc.
 *
 * Usage: divergence_test SEED CUDA_EXPECTED
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

/* ---- the reference, in double ---------------------------------------------------------------- */

/* log-softmax of x[0..v) / T into out; returns 0 when the row is fully masked (-inf). */
static int log_softmax(const double* x, int v, double inv_t, double* out) {
  double m = -INFINITY, s = 0.0;
  int i;
  for (i = 0; i < v; ++i)
    if (x[i] * inv_t > m) m = x[i] * inv_t;
  if (m == -INFINITY) return 0;
  for (i = 0; i < v; ++i) s += exp(x[i] * inv_t - m);
  for (i = 0; i < v; ++i) out[i] = x[i] * inv_t - m - log(s);
  return 1;
}

/* Loss of one row and dL/db (b = s / T). lq, lp: log-probabilities. */
static double ref_row(int kind, double beta, const double* lq, const double* lp, int v,
                      double* g) {
  double loss = 0.0, acc = 0.0;
  int i;
  if (kind == DK_JSD && beta == 0.0) kind = DK_FORWARD_KL;
  if (kind == DK_JSD && beta == 1.0) kind = DK_REVERSE_KL;
  if (kind == DK_FORWARD_KL) {
    for (i = 0; i < v; ++i) {
      double p = exp(lp[i]), q = exp(lq[i]);
      if (p > 0.0) loss += p * (lp[i] - lq[i]);
      g[i] = q - p;
    }
  } else if (kind == DK_REVERSE_KL) {
    for (i = 0; i < v; ++i) {
      double q = exp(lq[i]);
      if (q > 0.0) loss += q * (lq[i] - lp[i]);
    }
    for (i = 0; i < v; ++i) {
      double q = exp(lq[i]);
      g[i] = q > 0.0 ? q * (lq[i] - lp[i] - loss) : 0.0;
    }
  } else {
    for (i = 0; i < v; ++i) {
      double p = exp(lp[i]), q = exp(lq[i]);
      double m = beta * p + (1.0 - beta) * q;
      if (p > 0.0) loss += beta * p * log(p / m);
      if (q > 0.0) acc += q * log(q / m);
    }
    loss += (1.0 - beta) * acc;
    for (i = 0; i < v; ++i) {
      double p = exp(lp[i]), q = exp(lq[i]);
      double m = beta * p + (1.0 - beta) * q;
      g[i] = q > 0.0 ? (1.0 - beta) * q * (log(q / m) - acc) : 0.0;
    }
  }
  return loss;
}

/* Reference of a whole call over dense double inputs [n, v]. grad: [n, v] of d(loss)/d(s). */
static void ref_call(const double* s, const double* t, const int64_t* labels, int n, int v,
                     const dk_divergence_params* p, double* per_token, double* loss,
                     double* grad) {
  double* lq = malloc(sizeof(double) * (size_t)v);
  double* lp = malloc(sizeof(double) * (size_t)v);
  double total = 0.0, divisor = 1.0, inv_t = 1.0 / (double)p->temperature;
  int r, i, valid = 0;
  for (r = 0; r < n; ++r) {
    double* g = grad + (size_t)r * v;
    per_token[r] = 0.0;
    for (i = 0; i < v; ++i) g[i] = 0.0;
    if (labels && labels[r] == p->ignore_index) continue;
    ++valid;
    if (!log_softmax(s + (size_t)r * v, v, inv_t, lq)) continue;
    if (!log_softmax(t + (size_t)r * v, v, inv_t, lp)) continue;
    per_token[r] = ref_row(p->kind, p->beta, lq, lp, v, g);
    total += per_token[r];
  }
  if (p->reduction == DK_REDUCTION_BATCHMEAN)
    divisor = p->num_items != 0.0f ? (double)p->num_items : (valid > 0 ? valid : 1);
  *loss = total / divisor;
  for (i = 0; i < n * v; ++i) grad[i] *= inv_t / divisor;
  free(lq);
  free(lp);
}

/* ---- helpers --------------------------------------------------------------------------------- */

static const uint32_t POISON = 0xFFBADBADu;
static const uint16_t POISON16 = 0xFFBAu;

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

static double rel_err(const double* out, const double* ref, int len) {
  double d = 0.0, r = 0.0;
  int i;
  for (i = 0; i < len; ++i) {
    if (out[i] != out[i]) return INFINITY; /* NaN */
    d += (out[i] - ref[i]) * (out[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  if (d == 0.0) return 0.0;
  return sqrt(d) / (sqrt(r) > 1e-6 ? sqrt(r) : 1e-6);
}

/* ---- the numerical checks -------------------------------------------------------------------- */

/* One call: f32 or bf16 student (grad in the same dtype), f32 teacher, strides > v allowed. */
static void run_case(dk_context* ctx, const char* name, int n, int v, int s_stride, int t_stride,
                     int g_stride, int student_bf16, int in_place, int forward_only,
                     const int64_t* labels, dk_divergence_params p) {
  size_t s_elems = (size_t)n * s_stride, t_elems = (size_t)n * t_stride;
  size_t g_elems = (size_t)n * g_stride;
  size_t es = student_bf16 ? 2 : 4;
  double* s = malloc(sizeof(double) * (size_t)n * v);
  double* t = malloc(sizeof(double) * (size_t)n * v);
  double* ref_pt = malloc(sizeof(double) * (size_t)n);
  double* ref_g = malloc(sizeof(double) * (size_t)n * v);
  double* got = malloc(sizeof(double) * (size_t)n * v);
  unsigned char* s_buf = malloc(es * s_elems);
  float* t_buf = malloc(sizeof(float) * t_elems);
  unsigned char* g_buf = malloc(es * g_elems);
  float* per_token = malloc(sizeof(float) * (size_t)n);
  float loss = poison_f32(), ref_loss_f;
  double ref_loss, e;
  dk_divergence_args a;
  dk_status st;
  int r, i, unwritten = 0, padding_changed = 0, rows = 0;
  double scale = 0.5 + 2.0 * rng_uniform();

  /* Inputs, rounded to their dtype; padding NaN (must never be read). */
  for (i = 0; i < (int)s_elems; ++i) {
    if (student_bf16) {
      uint16_t nan16 = 0x7fc1;
      memcpy(s_buf + 2 * (size_t)i, &nan16, 2);
    } else {
      ((float*)s_buf)[i] = NAN;
    }
  }
  for (i = 0; i < (int)t_elems; ++i) t_buf[i] = NAN;
  for (r = 0; r < n; ++r) {
    double shift = 4.0 * rng_uniform() - 2.0;
    for (i = 0; i < v; ++i) {
      float sf = (float)(shift + scale * rng_normal());
      float tf = (float)(0.7 * sf + scale * rng_normal());
      if (student_bf16) {
        uint16_t h = f32_to_bf16(sf);
        memcpy(s_buf + 2 * ((size_t)r * s_stride + i), &h, 2);
        s[(size_t)r * v + i] = bf16_to_double(h);
      } else {
        ((float*)s_buf)[(size_t)r * s_stride + i] = sf;
        s[(size_t)r * v + i] = sf;
      }
      t_buf[(size_t)r * t_stride + i] = tf;
      t[(size_t)r * v + i] = tf;
    }
  }
  /* Poisoned outputs. */
  for (i = 0; i < (int)g_elems; ++i) {
    if (student_bf16)
      memcpy(g_buf + 2 * (size_t)i, &POISON16, 2);
    else
      memcpy(g_buf + 4 * (size_t)i, &POISON, 4);
  }
  for (r = 0; r < n; ++r) per_token[r] = poison_f32();

  ref_call(s, t, labels, n, v, &p, ref_pt, &ref_loss, ref_g);

  memset(&a, 0, sizeof a);
  a.n = n;
  a.v = v;
  a.student = s_buf;
  a.student_dtype = student_bf16 ? DK_DTYPE_BF16 : DK_DTYPE_F32;
  a.student_stride = s_stride;
  a.teacher = t_buf;
  a.teacher_dtype = DK_DTYPE_F32;
  a.teacher_stride = t_stride;
  a.labels = labels;
  a.loss = &loss;
  a.per_token = per_token;
  if (forward_only) {
    a.grad = NULL;
  } else if (in_place) {
    a.grad = s_buf;
    a.grad_stride = s_stride;
  } else {
    a.grad = g_buf;
    a.grad_stride = g_stride;
  }
  st = dk_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_OK, "%s: status %d (%s)\n", name, (int)st, dk_last_error());
  CHECK(strcmp(dk_last_error(), "") == 0, "%s: last error after success: %s\n", name,
        dk_last_error());

  /* Loss and per-token losses. */
  ref_loss_f = (float)ref_loss;
  CHECK(!is_poison(loss), "%s: loss not written\n", name);
  e = fabs((double)loss - ref_loss) / (fabs(ref_loss) > 1e-6 ? fabs(ref_loss) : 1e-6);
  CHECK(e <= 1e-5, "%s: loss %.9g vs reference %.9g (f32 %.9g), rel err %.3g\n", name,
        (double)loss, ref_loss, (double)ref_loss_f, e);
  for (r = 0; r < n; ++r) {
    CHECK(!is_poison(per_token[r]), "%s: per_token[%d] not written\n", name, r);
    got[r] = per_token[r];
  }
  e = rel_err(got, ref_pt, n);
  CHECK(e <= 1e-5, "%s: per-token rel err %.3g\n", name, e);
  if (labels)
    for (r = 0; r < n; ++r)
      if (labels[r] == p.ignore_index) CHECK(per_token[r] == 0.0f, "%s: ignored row %d\n", name, r);

  /* Gradient: values within tolerance, every element written, padding untouched. */
  if (!forward_only) {
    const unsigned char* gb = in_place ? s_buf : g_buf;
    int gs = in_place ? s_stride : g_stride;
    for (r = 0; r < n; ++r) {
      for (i = 0; i < gs; ++i) {
        size_t k = (size_t)r * gs + i;
        if (student_bf16) {
          uint16_t h;
          memcpy(&h, gb + 2 * k, 2);
          if (i < v) {
            unwritten += h == POISON16;
            got[(size_t)r * v + i] = bf16_to_double(h);
          } else {
            padding_changed += in_place ? h != 0x7fc1 : h != POISON16;
          }
        } else {
          float f;
          memcpy(&f, gb + 4 * k, 4);
          if (i < v) {
            unwritten += is_poison(f);
            got[(size_t)r * v + i] = f;
          } else {
            padding_changed += in_place ? f == f : !is_poison(f);
          }
        }
      }
    }
    e = rel_err(got, ref_g, n * v);
    CHECK(unwritten == 0, "%s: %d gradient elements not written\n", name, unwritten);
    CHECK(padding_changed == 0, "%s: %d padding elements changed\n", name, padding_changed);
    CHECK(e <= (student_bf16 ? 1e-2 : 1e-5), "%s: gradient rel err %.3g\n", name, e);
  } else {
    for (i = 0; i < (int)g_elems; ++i) {
      uint32_t u = 0;
      memcpy(&u, g_buf + es * (size_t)i, es);
      rows += student_bf16 ? (uint16_t)u != POISON16 : u != POISON;
    }
    CHECK(rows == 0, "%s: forward-only touched the gradient buffer\n", name);
  }
  printf("ok   %-44s loss %+.6f (reference %+.6f)\n", name, (double)loss, ref_loss);

  free(s);
  free(t);
  free(ref_pt);
  free(ref_g);
  free(got);
  free(s_buf);
  free(t_buf);
  free(g_buf);
  free(per_token);
}

static dk_divergence_params make_params(int kind, float beta, float temperature, int reduction) {
  dk_divergence_params p = dk_divergence_params_default();
  p.kind = kind;
  p.beta = beta;
  p.temperature = temperature;
  p.reduction = reduction;
  return p;
}

/* ---- error paths ----------------------------------------------------------------------------- */

static void check_errors(dk_context* ctx) {
  float s[12], t[12], g[12], pt[3], loss;
  int64_t labels[3] = {1, -100, 2};
  dk_divergence_args a;
  dk_divergence_params p = dk_divergence_params_default(), bad;
  dk_status st;
  size_t ws = 99;
  int i, untouched;
  dk_context* none = NULL;

  for (i = 0; i < 12; ++i) {
    s[i] = (float)(0.1 * i);
    t[i] = (float)(0.2 * (11 - i));
    g[i] = poison_f32();
  }
  for (i = 0; i < 3; ++i) pt[i] = poison_f32();
  loss = poison_f32();
  memset(&a, 0, sizeof a);
  a.n = 3;
  a.v = 4;
  a.student = s;
  a.student_dtype = DK_DTYPE_F32;
  a.student_stride = 4;
  a.teacher = t;
  a.teacher_dtype = DK_DTYPE_F32;
  a.teacher_stride = 4;
  a.labels = labels;
  a.loss = &loss;
  a.per_token = pt;
  a.grad = g;
  a.grad_stride = 4;

#define EXPECT_STATUS(call, code, what)                                                     \
  do {                                                                                      \
    st = (call);                                                                            \
    CHECK(st == (code), "%s: status %d, expected %d (%s)\n", what, (int)st, (int)(code),    \
          dk_last_error());                                                                 \
    CHECK(strlen(dk_last_error()) > 0, "%s: dk_last_error() is empty\n", what);             \
    untouched = is_poison(loss);                                                            \
    for (i = 0; i < 3; ++i) untouched &= is_poison(pt[i]);                                  \
    for (i = 0; i < 12; ++i) untouched &= is_poison(g[i]);                                  \
    CHECK(untouched, "%s: outputs were written on error\n", what);                          \
    printf("ok   error: %-37s -> %d \"%s\"\n", what, (int)st, dk_last_error());             \
  } while (0)

  EXPECT_STATUS(dk_divergence(NULL, &a, &p, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL context");
  EXPECT_STATUS(dk_divergence(ctx, NULL, &p, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL args");
  EXPECT_STATUS(dk_divergence(ctx, &a, NULL, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL params");
  a.student = NULL;
  EXPECT_STATUS(dk_divergence(ctx, &a, &p, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL student");
  a.student = s;
  a.teacher = NULL;
  EXPECT_STATUS(dk_divergence(ctx, &a, &p, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL teacher");
  a.teacher = t;
  a.student_dtype = 7;
  EXPECT_STATUS(dk_divergence(ctx, &a, &p, NULL, 0, NULL), DK_ERR_UNSUPPORTED_DTYPE,
                "student dtype 7");
  a.student_dtype = DK_DTYPE_F32;
  a.teacher_stride = 3;
  EXPECT_STATUS(dk_divergence(ctx, &a, &p, NULL, 0, NULL), DK_ERR_SHAPE, "teacher stride < v");
  a.teacher_stride = 4;
  a.v = 0;
  EXPECT_STATUS(dk_divergence(ctx, &a, &p, NULL, 0, NULL), DK_ERR_SHAPE, "v = 0");
  a.v = 4;
  bad = p;
  bad.kind = 9;
  EXPECT_STATUS(dk_divergence(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT, "kind 9");
  bad = p;
  bad.reduction = -1;
  EXPECT_STATUS(dk_divergence(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
                "reduction -1");
  bad = p;
  bad.kind = DK_JSD;
  bad.beta = -0.5f;
  EXPECT_STATUS(dk_divergence(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
                "beta -0.5");
  bad = p;
  bad.temperature = -1.0f;
  EXPECT_STATUS(dk_divergence(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
                "temperature -1");
  bad = p;
  bad.temperature = (float)INFINITY;
  EXPECT_STATUS(dk_divergence(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
                "temperature inf");
  a.grad = s + 1;
  EXPECT_STATUS(dk_divergence(ctx, &a, &p, NULL, 0, NULL), DK_ERR_SHAPE,
                "grad overlapping student");
  a.grad = g;
  EXPECT_STATUS(dk_context_create(-1, NULL), DK_ERR_NULL_POINTER, "context out NULL");
  EXPECT_STATUS(dk_context_create(-3, &none), DK_ERR_INVALID_ARGUMENT, "device -3");
  CHECK(none == NULL, "context written on error\n");
  EXPECT_STATUS(dk_divergence_workspace_size(ctx, 3, NULL), DK_ERR_NULL_POINTER,
                "workspace_size out NULL");
  EXPECT_STATUS(dk_divergence_workspace_size(NULL, 3, &ws), DK_ERR_NULL_POINTER,
                "workspace_size NULL context");
  CHECK(ws == 99, "workspace size written on error\n");
  if (dk_cuda_device_count() == 0) {
    EXPECT_STATUS(dk_context_create(0, &none), DK_ERR_NO_DEVICE, "CUDA context without a GPU");
    CHECK(none == NULL, "context written on error\n");
  }
  /* An empty batch: n = 0 with every row operand NULL (as an empty tensor's pointer) writes a
   * zero loss and nothing else. */
  {
    dk_divergence_args e = a;
    float zl = poison_f32();
    e.n = 0;
    e.student = e.teacher = NULL;
    e.grad = NULL;
    e.per_token = NULL;
    e.labels = NULL;
    e.loss = &zl;
    st = dk_divergence(ctx, &e, &p, NULL, 0, NULL);
    CHECK(st == DK_OK && zl == 0.0f, "n = 0: status %d, loss %g (%s)\n", (int)st, (double)zl,
          dk_last_error());
    untouched = is_poison(loss);
    for (i = 0; i < 3; ++i) untouched &= is_poison(pt[i]);
    for (i = 0; i < 12; ++i) untouched &= is_poison(g[i]);
    CHECK(untouched, "n = 0 wrote another call's outputs\n");
    printf("ok   n = 0: status %d, loss %g\n", (int)st, (double)zl);
  }
  /* A success clears the message. */
  st = dk_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_OK && strcmp(dk_last_error(), "") == 0, "valid call after errors: %d %s\n",
        (int)st, dk_last_error());
  CHECK(!is_poison(loss) && loss == loss, "valid call wrote no loss\n");
#undef EXPECT_STATUS
}

static void check_cuda(void) {
  dk_context* ctx = NULL;
  int32_t dev = -5;
  size_t ws = 0;
  float s[8] = {0}, t[8] = {0}, loss = poison_f32();
  dk_divergence_args a;
  dk_divergence_params p = dk_divergence_params_default();
  dk_status st = dk_context_create(0, &ctx);
  CHECK(st == DK_OK && ctx != NULL, "CUDA context: %d %s\n", (int)st, dk_last_error());
  if (st != DK_OK) return;
  CHECK(dk_context_device(ctx, &dev) == DK_OK && dev == 0, "device %d\n", (int)dev);
  CHECK(dk_divergence_workspace_size(ctx, 1000, &ws) == DK_OK && ws >= 4000,
        "workspace for 1000 rows: %zu bytes\n", ws);
  memset(&a, 0, sizeof a);
  a.n = 2;
  a.v = 4;
  a.student = s;
  a.student_dtype = DK_DTYPE_F32;
  a.student_stride = 4;
  a.teacher = t;
  a.teacher_dtype = DK_DTYPE_F32;
  a.teacher_stride = 4;
  a.loss = &loss;
  st = dk_divergence(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_WRONG_DEVICE, "host memory on a CUDA context: %d (%s)\n", (int)st,
        dk_last_error());
  CHECK(is_poison(loss), "host loss written by a refused CUDA call\n");
  CHECK(dk_context_destroy(ctx) == DK_OK, "destroy CUDA context\n");
  printf("ok   CUDA context: device 0, workspace %zu bytes for 1000 rows, host memory refused\n",
         ws);
}

/* ---- row scaling (dk_scale_rows) ---------------------------------------------------------- */

/* f32 and bf16 rows in a strided buffer: rows with factor 1 hold NaN payloads and must keep their
 * bits, the others are scaled (the float product rounded once: exact in float for f32,
 * f32_to_bf16's round to nearest even for bf16), the padding stays, one factor (stride 0) for
 * all rows works both ways, and bad arguments return their status with nothing written. */
static void check_scale_rows(dk_context* ctx) {
  enum { N = 6, V = 37, S = 40 };
  static const float factors[N] = {2.5f, 1.0f, -0.75f, 0.0f, 1.0f, 1.0e-3f};
  float xf[N * S], xf0[N * S], two = 2.0f, one = 1.0f;
  uint16_t xb[N * S], xb0[N * S];
  dk_scale_rows_args a;
  dk_status st;
  int i, j, wrong = 0, changed;

  for (i = 0; i < N; ++i) {
    for (j = 0; j < S; ++j) {
      int k = i * S + j;
      if (j >= V) {
        memcpy(&xf[k], &POISON, 4);
        xb[k] = POISON16;
      } else if (factors[i] == 1.0f) {
        uint32_t nan = 0x7F800001u + (uint32_t)j; /* signalling NaNs: arithmetic would quiet them */
        memcpy(&xf[k], &nan, 4);
        xb[k] = (uint16_t)(0xFF81u + (unsigned)j);
      } else {
        xf[k] = (float)(rng_normal() * 3.0);
        xb[k] = f32_to_bf16(xf[k]);
      }
    }
  }
  memcpy(xf0, xf, sizeof xf);
  memcpy(xb0, xb, sizeof xb);

  memset(&a, 0, sizeof a);
  a.n = N;
  a.v = V;
  a.x = xf;
  a.dtype = DK_DTYPE_F32;
  a.stride = S;
  a.factors = factors;
  a.factor_stride = 1;
  st = dk_scale_rows(ctx, &a, NULL);
  CHECK(st == DK_OK, "scale_rows f32: status %d (%s)\n", (int)st, dk_last_error());
  a.x = xb;
  a.dtype = DK_DTYPE_BF16;
  st = dk_scale_rows(ctx, &a, NULL);
  CHECK(st == DK_OK, "scale_rows bf16: status %d (%s)\n", (int)st, dk_last_error());
  for (i = 0; i < N; ++i) {
    for (j = 0; j < S; ++j) {
      int k = i * S + j;
      float want = xf0[k];
      uint16_t want_b = xb0[k];
      if (j < V && factors[i] != 1.0f) {
        want = xf0[k] * factors[i];
        want_b = f32_to_bf16((float)bf16_to_double(xb0[k]) * factors[i]);
      }
      wrong += memcmp(&xf[k], &want, 4) != 0;
      wrong += xb[k] != want_b;
    }
  }
  CHECK(wrong == 0, "scale_rows: %d elements differ from the reference or changed\n", wrong);

  /* One factor for every row: 1 leaves the buffer alone, 2 doubles every row (not the padding). */
  memcpy(xf, xf0, sizeof xf);
  a.x = xf;
  a.dtype = DK_DTYPE_F32;
  a.factors = &one;
  a.factor_stride = 0;
  st = dk_scale_rows(ctx, &a, NULL);
  CHECK(st == DK_OK && memcmp(xf, xf0, sizeof xf) == 0, "scale_rows by 1: %d, changed %d\n",
        (int)st, memcmp(xf, xf0, sizeof xf) != 0);
  a.factors = &two;
  st = dk_scale_rows(ctx, &a, NULL);
  wrong = 0;
  for (i = 0; i < N; ++i) {
    for (j = 0; j < S; ++j) {
      int k = i * S + j;
      float want = j < V ? xf0[k] * 2.0f : xf0[k];
      /* NaN rows: any NaN is right (payloads may be quieted) */
      if (j < V && xf0[k] != xf0[k]) wrong += xf[k] == xf[k];
      else wrong += memcmp(&xf[k], &want, 4) != 0;
    }
  }
  CHECK(st == DK_OK && wrong == 0, "scale_rows by 2: status %d, %d wrong\n", (int)st, wrong);
  printf("ok   scale_rows: f32 and bf16, factor-1 rows untouched, one factor for all rows\n");

  /* Errors: the status, a message, and nothing written. */
  memcpy(xf, xf0, sizeof xf);
  a.factors = factors;
  a.factor_stride = 1;
#define EXPECT_SCALE(call, code, what)                                                      \
  do {                                                                                      \
    st = (call);                                                                            \
    changed = memcmp(xf, xf0, sizeof xf) != 0;                                              \
    CHECK(st == (code) && strlen(dk_last_error()) > 0 && !changed,                          \
          "scale_rows %s: status %d, expected %d (%s), changed %d\n", what, (int)st,        \
          (int)(code), dk_last_error(), changed);                                           \
    printf("ok   error: scale_rows %-26s -> %d \"%s\"\n", what, (int)st, dk_last_error());    \
  } while (0)
  EXPECT_SCALE(dk_scale_rows(NULL, &a, NULL), DK_ERR_NULL_POINTER, "NULL context");
  EXPECT_SCALE(dk_scale_rows(ctx, NULL, NULL), DK_ERR_NULL_POINTER, "NULL args");
  a.x = NULL;
  EXPECT_SCALE(dk_scale_rows(ctx, &a, NULL), DK_ERR_NULL_POINTER, "NULL x");
  a.x = xf;
  a.factors = NULL;
  EXPECT_SCALE(dk_scale_rows(ctx, &a, NULL), DK_ERR_NULL_POINTER, "NULL factors");
  a.factors = factors;
  a.dtype = 5;
  EXPECT_SCALE(dk_scale_rows(ctx, &a, NULL), DK_ERR_UNSUPPORTED_DTYPE, "dtype 5");
  a.dtype = DK_DTYPE_F32;
  a.stride = V - 1;
  EXPECT_SCALE(dk_scale_rows(ctx, &a, NULL), DK_ERR_SHAPE, "stride < v");
  a.stride = S;
  a.factor_stride = -1;
  EXPECT_SCALE(dk_scale_rows(ctx, &a, NULL), DK_ERR_SHAPE, "factor_stride -1");
  a.factor_stride = 1;
  a.v = 0;
  EXPECT_SCALE(dk_scale_rows(ctx, &a, NULL), DK_ERR_SHAPE, "v = 0");
  a.v = V;
  /* No rows: nothing to do, even with NULL pointers. */
  a.n = 0;
  a.x = NULL;
  a.factors = NULL;
  st = dk_scale_rows(ctx, &a, NULL);
  CHECK(st == DK_OK && memcmp(xf, xf0, sizeof xf) == 0, "scale_rows n = 0: status %d (%s)\n",
        (int)st, dk_last_error());
  printf("ok   scale_rows n = 0 -> %d\n", (int)st);
  a.n = N;
  a.x = xf;
  a.factors = factors;
  a.v = -3;
  EXPECT_SCALE(dk_scale_rows(ctx, &a, NULL), DK_ERR_SHAPE, "v = -3");
  a.v = V;
  a.factors = xf + 3; /* inside the matrix */
  EXPECT_SCALE(dk_scale_rows(ctx, &a, NULL), DK_ERR_SHAPE, "factors overlapping x");
#undef EXPECT_SCALE
}

int main(int argc, char** argv) {
  dk_context* ctx = NULL;
  int32_t dev = 7;
  size_t ws = 99;
  char version[64];
  int cuda_expected = argc > 2 && strcmp(argv[2], "1") == 0;
  int64_t labels[6] = {3, -100, 11, 7, -100, 0};
  int64_t labels7[6] = {-100, 7, 1, 7, 2, 3};
  dk_divergence_params p;
  dk_status st;

  if (argc > 1) rng_state = strtoull(argv[1], NULL, 0) | 1u;
  printf("seed %llu, dk_version() = %s, header %s\n", (unsigned long long)rng_state, dk_version(),
         DK_VERSION_STRING);

  /* Version: the function, the string macro and the numeric macros agree. */
  CHECK(strcmp(dk_version(), DK_VERSION_STRING) == 0, "dk_version() %s vs header %s\n",
        dk_version(), DK_VERSION_STRING);
  CHECK(dk_abi_version() == DK_ABI_VERSION, "dk_abi_version() %u vs header %u\n",
        (unsigned)dk_abi_version(), (unsigned)DK_ABI_VERSION);
  sprintf(version, "%d.%d.%d", DK_VERSION_MAJOR, DK_VERSION_MINOR, DK_VERSION_PATCH);
  CHECK(strcmp(version, DK_VERSION_STRING) == 0, "numeric macros %s vs %s\n", version,
        DK_VERSION_STRING);

  /* The compiled architectures: a string, non-empty where the CUDA part is expected to run. */
  CHECK(dk_cuda_archs() != NULL, "dk_cuda_archs() is NULL\n");
  if (cuda_expected)
    CHECK(dk_cuda_archs() != NULL && strncmp(dk_cuda_archs(), "sm_", 3) == 0,
          "dk_cuda_archs() '%s' with kernels expected\n", dk_cuda_archs() ? dk_cuda_archs() : "");

  /* Defaults. */
  p = dk_divergence_params_default();
  CHECK(p.kind == DK_FORWARD_KL && p.beta == 0.5f && p.temperature == 1.0f &&
            p.reduction == DK_REDUCTION_BATCHMEAN && p.ignore_index == -100 && p.num_items == 0.0f,
        "default params\n");

  st = dk_context_create(-1, &ctx);
  CHECK(st == DK_OK && ctx != NULL, "CPU context: %d %s\n", (int)st, dk_last_error());
  if (st != DK_OK) return 1;
  CHECK(dk_context_device(ctx, &dev) == DK_OK && dev == -1, "CPU device is %d\n", (int)dev);
  CHECK(dk_divergence_workspace_size(ctx, 100, &ws) == DK_OK && ws == 0, "CPU workspace %zu\n",
        ws);

  /* name, n, v, strides (s, t, g), bf16 student, in place, forward only, labels, params */
  run_case(ctx, "forward_kl batchmean", 4, 50, 50, 50, 50, 0, 0, 0, NULL,
           make_params(DK_FORWARD_KL, 0.5f, 1.0f, DK_REDUCTION_BATCHMEAN));
  run_case(ctx, "reverse_kl sum, labels", 6, 33, 33, 33, 33, 0, 0, 0, labels,
           make_params(DK_REVERSE_KL, 0.5f, 1.0f, DK_REDUCTION_SUM));
  run_case(ctx, "jsd(0.5) batchmean, labels, T=2", 6, 77, 77, 77, 77, 0, 0, 0, labels,
           make_params(DK_JSD, 0.5f, 2.0f, DK_REDUCTION_BATCHMEAN));
  run_case(ctx, "jsd(0.25) none, strides 130/129/136", 3, 128, 130, 129, 136, 0, 0, 0, NULL,
           make_params(DK_JSD, 0.25f, 0.8f, DK_REDUCTION_NONE));
  p = make_params(DK_JSD, 0.9f, 1.0f, DK_REDUCTION_BATCHMEAN);
  p.num_items = 10.0f;
  run_case(ctx, "jsd(0.9) batchmean num_items=10, labels", 6, 40, 40, 40, 40, 0, 0, 0, labels, p);
  p = make_params(DK_FORWARD_KL, 0.5f, 1.0f, DK_REDUCTION_BATCHMEAN);
  p.ignore_index = 7;
  run_case(ctx, "forward_kl ignore_index=7", 6, 20, 20, 20, 20, 0, 0, 0, labels7, p);
  run_case(ctx, "jsd(0) = forward_kl, bf16 student", 3, 64, 64, 64, 64, 1, 0, 0, NULL,
           make_params(DK_JSD, 0.0f, 1.0f, DK_REDUCTION_SUM));
  run_case(ctx, "jsd(1) = reverse_kl, bf16 student, stride", 3, 64, 72, 64, 70, 1, 0, 0, labels,
           make_params(DK_JSD, 1.0f, 1.5f, DK_REDUCTION_BATCHMEAN));
  run_case(ctx, "forward_kl in place (grad == student)", 4, 31, 35, 31, 35, 0, 1, 0, NULL,
           make_params(DK_FORWARD_KL, 0.5f, 1.0f, DK_REDUCTION_BATCHMEAN));
  run_case(ctx, "jsd(0.5) in place, bf16", 4, 31, 33, 31, 33, 1, 1, 0, labels,
           make_params(DK_JSD, 0.5f, 1.0f, DK_REDUCTION_SUM));
  run_case(ctx, "reverse_kl forward only", 5, 45, 45, 45, 45, 0, 0, 1, labels,
           make_params(DK_REVERSE_KL, 0.5f, 1.0f, DK_REDUCTION_BATCHMEAN));

  check_errors(ctx);
  check_scale_rows(ctx);
  CHECK(dk_context_destroy(ctx) == DK_OK, "destroy\n");
  CHECK(dk_context_destroy(NULL) == DK_OK, "destroy NULL\n");

  if (cuda_expected)
    check_cuda();
  else
    printf("SKIPPED CUDA part of the C test (dk_cuda_device_count() = %d, kernels %s)\n",
           (int)dk_cuda_device_count(), argc > 2 ? "as reported by the Rust side" : "unknown");

  printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
