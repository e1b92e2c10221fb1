/*
 * A real C99 client of the MoE dispatch C ABI, built and run by capi/tests/c_abi.rs.
 *
 * Checks, on a CPU context: dk_moe_max_rows and the default parameters; dk_moe_route (softmax
 * and sigmoid, renormalisation, scale, selection bias, group-limited selection, capacity drops,
 * block padding, ties, f32 and bf16 logits with a row stride) against its own double-precision
 * implementation below; dk_moe_permute / dk_moe_combine / dk_moe_slot_dot (f32 and bf16) on
 * the routed batch against the same; dk_moe_permute_backward / dk_moe_combine_backward against
 * those primitives on the same operands, bit for bit; poisoned outputs written everywhere and
 * nothing past them; and the error paths (NULL arguments, bad codes, bad shapes: status,
 * dk_last_error, nothing written). On CUDA (argv[2] = "1") it checks the workspace query and that host pointers are
 * refused; the numerical CUDA checks live in the Rust tests.
 *
 * Usage: moe_test SEED CUDA_EXPECTED
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

/* ---- poison ---------------------------------------------------------------------------------- */

static const uint32_t POISON = 0xFFBADBADu;
static const int32_t POISON_I32 = (int32_t)0xFFBADBADu;
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

/* ---- the reference, in double ---------------------------------------------------------------- */

/* One token: scores of its e logits, then the k chosen experts (by descending selection score,
 * ties to the lower index, within the best topk_groups groups) and their weights. */
static void ref_token(const double* logits, const float* bias, int e, const dk_moe_route_params* p,
                      int32_t* ids, double* weights) {
  double score[1024], sel[1024], gscore[1024], total = 0.0, z = 0.0;
  int kept_group[1024], taken[1024];
  int i, j, g, size = e / p->n_groups;
  for (i = 0; i < e; ++i) {
    score[i] = p->score == DK_MOE_SIGMOID ? 1.0 / (1.0 + exp(-logits[i])) : exp(logits[i]);
    z += score[i];
  }
  for (i = 0; i < e; ++i) {
    if (p->score == DK_MOE_SOFTMAX) score[i] /= z;
    sel[i] = score[i] + (bias ? (double)bias[i] : 0.0);
    taken[i] = 0;
  }
  /* Group scores: the two largest selection scores of each group. */
  for (g = 0; g < p->n_groups; ++g) {
    double a = -INFINITY, b = -INFINITY;
    for (i = g * size; i < (g + 1) * size; ++i) {
      if (sel[i] > a) {
        b = a;
        a = sel[i];
      } else if (sel[i] > b) {
        b = sel[i];
      }
    }
    gscore[g] = a + b;
    kept_group[g] = 0;
  }
  for (j = 0; j < p->topk_groups; ++j) {
    int best = -1;
    for (g = 0; g < p->n_groups; ++g)
      if (!kept_group[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
    kept_group[best] = 1;
  }
  /* Top-k by repeated arg-max (strictly greater: the lower index wins ties). */
  for (j = 0; j < p->k; ++j) {
    int best = -1;
    for (i = 0; i < e; ++i)
      if (kept_group[i / size] && !taken[i] && (best < 0 || sel[i] > sel[best])) best = i;
    taken[best] = 1;
    ids[j] = best;
    weights[j] = score[best];
    total += score[best];
  }
  for (j = 0; j < p->k; ++j)
    weights[j] = (p->renormalize ? weights[j] / total : weights[j]) * (double)p->scale;
}

/* Counting, capacity, padding: expert-major, then token, then slot. */
static void ref_permutation(const int32_t* ids, int n, int e, const dk_moe_route_params* p,
                            int64_t perm_rows, int32_t* counts, int32_t* offsets, int32_t* perm,
                            int32_t* position) {
  int k = p->k, ex, t, j;
  int64_t r;
  for (r = 0; r < perm_rows; ++r) perm[r] = -1;
  offsets[0] = 0;
  for (ex = 0; ex < e; ++ex) {
    int seen = 0, kept = 0;
    for (t = 0; t < n; ++t) {
      for (j = 0; j < k; ++j) {
        if (ids[t * k + j] != ex) continue;
        if (p->capacity == 0 || seen < p->capacity) {
          perm[offsets[ex] + kept] = t * k + j;
          position[t * k + j] = offsets[ex] + kept;
          ++kept;
        } else {
          position[t * k + j] = -1;
        }
        ++seen;
      }
    }
    counts[ex] = kept;
    offsets[ex + 1] = offsets[ex] + (kept + p->block - 1) / p->block * p->block;
  }
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

/* ---- route + permute / combine / slot dot on one batch --------------------------------------- */

#define PAD 8 /* poisoned entries past every output vector */

typedef struct batch {
  int n, e, k, rows;
  int32_t* ids;
  float* weights;
  int32_t* perm;
  int32_t* position;
} batch;

/* Routes n tokens of random logits (or `fixed` ones) and checks everything; fills `out`. */
static void run_route(dk_context* ctx, const char* name, int n, int e, int stride, int bf16,
                      int with_bias, const double* fixed, dk_moe_route_params p, batch* out) {
  int k = p.k, t, i, bad = 0;
  int64_t max_rows = dk_moe_max_rows(n, e, k, p.block, p.capacity);
  int64_t perm_rows = max_rows + 5, r;
  size_t es = bf16 ? 2 : 4;
  double* logits = malloc(sizeof(double) * (size_t)n * e);
  unsigned char* lbuf = malloc(es * (size_t)n * stride);
  float* bias = malloc(sizeof(float) * (size_t)e);
  int32_t* ids = malloc(sizeof(int32_t) * (size_t)(n * k + PAD));
  float* weights = malloc(sizeof(float) * (size_t)(n * k + PAD));
  int32_t* counts = malloc(sizeof(int32_t) * (size_t)(e + PAD));
  int32_t* offsets = malloc(sizeof(int32_t) * (size_t)(e + 1 + PAD));
  int32_t* perm = malloc(sizeof(int32_t) * (size_t)(perm_rows + PAD));
  int32_t* position = malloc(sizeof(int32_t) * (size_t)(n * k + PAD));
  int32_t* ref_ids = malloc(sizeof(int32_t) * (size_t)(n * k));
  double* ref_w = malloc(sizeof(double) * (size_t)(n * k));
  double* got_w = malloc(sizeof(double) * (size_t)(n * k));
  int32_t* ref_counts = malloc(sizeof(int32_t) * (size_t)e);
  int32_t* ref_offsets = malloc(sizeof(int32_t) * (size_t)(e + 1));
  int32_t* ref_perm = malloc(sizeof(int32_t) * (size_t)perm_rows);
  int32_t* ref_position = malloc(sizeof(int32_t) * (size_t)(n * k));
  dk_moe_route_args a;
  dk_status st;
  double e_w;

  CHECK(max_rows > 0, "%s: dk_moe_max_rows = %lld\n", name, (long long)max_rows);
  for (i = 0; i < e; ++i) bias[i] = with_bias ? (float)(0.2 * rng_uniform() - 0.1) : 0.0f;
  for (t = 0; t < n; ++t) {
    for (i = 0; i < stride; ++i) {
      /* Padding columns hold NaN: they must never be read. */
      float f = i < e ? (float)(fixed ? fixed[t * e + i] : 1.5 * rng_normal()) : NAN;
      if (bf16) {
        uint16_t h = i < e ? f32_to_bf16(f) : 0x7fc1;
        memcpy(lbuf + 2 * ((size_t)t * stride + i), &h, 2);
        if (i < e) logits[t * e + i] = bf16_to_double(h);
      } else {
        memcpy(lbuf + 4 * ((size_t)t * stride + i), &f, 4);
        if (i < e) logits[t * e + i] = f;
      }
    }
  }
  for (i = 0; i < n * k + PAD; ++i) {
    ids[i] = POISON_I32;
    position[i] = POISON_I32;
    weights[i] = poison_f32();
  }
  for (i = 0; i < e + PAD; ++i) counts[i] = POISON_I32;
  for (i = 0; i < e + 1 + PAD; ++i) offsets[i] = POISON_I32;
  for (r = 0; r < perm_rows + PAD; ++r) perm[r] = POISON_I32;

  for (t = 0; t < n; ++t)
    ref_token(logits + (size_t)t * e, with_bias ? bias : NULL, e, &p, ref_ids + t * k,
              ref_w + t * k);
  ref_permutation(ref_ids, n, e, &p, perm_rows, ref_counts, ref_offsets, ref_perm, ref_position);

  memset(&a, 0, sizeof a);
  a.n = n;
  a.e = e;
  a.logits = lbuf;
  a.logits_dtype = bf16 ? DK_DTYPE_BF16 : DK_DTYPE_F32;
  a.logits_stride = stride;
  a.bias = with_bias ? bias : NULL;
  a.expert_ids = ids;
  a.weights = weights;
  a.counts = counts;
  a.offsets = offsets;
  a.perm = perm;
  a.perm_rows = perm_rows;
  a.position = position;
  st = dk_moe_route(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_OK, "%s: status %d (%s)\n", name, (int)st, dk_last_error());

  for (i = 0; i < n * k; ++i) {
    bad += ids[i] != ref_ids[i];
    got_w[i] = weights[i];
  }
  CHECK(bad == 0, "%s: %d expert ids differ from the reference\n", name, bad);
  e_w = rel_err(got_w, ref_w, n * k);
  CHECK(e_w <= 1e-6, "%s: weights rel err %.3g\n", name, e_w);
  bad = 0;
  for (i = 0; i < e; ++i) bad += counts[i] != ref_counts[i];
  for (i = 0; i <= e; ++i) bad += offsets[i] != ref_offsets[i];
  for (r = 0; r < perm_rows; ++r) bad += perm[r] != ref_perm[r];
  for (i = 0; i < n * k; ++i) bad += position[i] != ref_position[i];
  CHECK(bad == 0, "%s: %d counts / offsets / perm / position entries differ\n", name, bad);
  CHECK(offsets[e] <= max_rows, "%s: R = %d > max_rows %lld\n", name, (int)offsets[e],
        (long long)max_rows);
  bad = 0;
  for (i = n * k; i < n * k + PAD; ++i)
    bad += ids[i] != POISON_I32 || position[i] != POISON_I32 || !is_poison(weights[i]);
  for (i = e; i < e + PAD; ++i) bad += counts[i] != POISON_I32;
  for (i = e + 1; i < e + 1 + PAD; ++i) bad += offsets[i] != POISON_I32;
  for (r = perm_rows; r < perm_rows + PAD; ++r) bad += perm[r] != POISON_I32;
  CHECK(bad == 0, "%s: %d entries past the outputs written\n", name, bad);
  printf("ok   %-52s R = %d of at most %lld\n", name, (int)offsets[e], (long long)max_rows);

  out->n = n;
  out->e = e;
  out->k = k;
  out->rows = offsets[e];
  out->ids = ids;
  out->weights = weights;
  out->perm = perm;
  out->position = position;
  free(logits);
  free(lbuf);
  free(bias);
  free(counts);
  free(offsets);
  free(ref_ids);
  free(ref_w);
  free(got_w);
  free(ref_counts);
  free(ref_offsets);
  free(ref_perm);
  free(ref_position);
}

static void free_batch(batch* b) {
  free(b->ids);
  free(b->weights);
  free(b->perm);
  free(b->position);
}

/* Permute (scaled), combine (weighted) and slot dot in f32 with strides, against the reference;
 * an unscaled bf16 permute must copy bit for bit. */
static void run_activations(dk_context* ctx, const char* name, const batch* b, int h) {
  int n = b->n, k = b->k, rows = b->rows, xs = h + 8, os = h + 16, r, t, j, c, bad = 0;
  float* x = malloc(sizeof(float) * (size_t)n * xs);
  float* xp = malloc(sizeof(float) * (size_t)rows * os);
  float* eo = malloc(sizeof(float) * (size_t)rows * xs);
  float* y = malloc(sizeof(float) * (size_t)n * os);
  float* dots = malloc(sizeof(float) * (size_t)(n * k + PAD));
  uint16_t* xb = malloc(2 * (size_t)n * h);
  uint16_t* xpb = malloc(2 * (size_t)rows * h);
  double* got = calloc((size_t)(rows > n ? rows : n) * h, sizeof(double));
  double* ref = calloc((size_t)(rows > n ? rows : n) * h, sizeof(double));
  double* got_d = calloc((size_t)n * k, sizeof(double));
  double* ref_d = calloc((size_t)n * k, sizeof(double));
  dk_moe_permute_args pa;
  dk_moe_combine_args ca;
  dk_moe_slot_dot_args da;
  dk_status st;
  double e;

  for (t = 0; t < n * xs; ++t) x[t] = (t % xs) < h ? (float)rng_normal() : NAN;
  for (t = 0; t < rows * xs; ++t) eo[t] = (t % xs) < h ? (float)rng_normal() : NAN;
  for (t = 0; t < rows * os; ++t) xp[t] = poison_f32();
  for (t = 0; t < n * os; ++t) y[t] = poison_f32();
  for (t = 0; t < n * k + PAD; ++t) dots[t] = poison_f32();
  for (t = 0; t < n * h; ++t) xb[t] = f32_to_bf16((float)rng_normal());
  for (t = 0; t < rows * h; ++t) xpb[t] = POISON16;

  /* Permute, scaled by the weights. */
  memset(&pa, 0, sizeof pa);
  pa.n = n;
  pa.h = h;
  pa.k = k;
  pa.rows = rows;
  pa.dtype = DK_DTYPE_F32;
  pa.x = x;
  pa.x_stride = xs;
  pa.perm = b->perm;
  pa.weights = b->weights;
  pa.out = xp;
  pa.out_stride = os;
  st = dk_moe_permute(ctx, &pa, NULL, 0, NULL);
  CHECK(st == DK_OK, "%s permute: status %d (%s)\n", name, (int)st, dk_last_error());
  for (r = 0; r < rows; ++r) {
    int p = b->perm[r];
    for (c = 0; c < os; ++c) {
      float v = xp[(size_t)r * os + c];
      if (c >= h) {
        bad += !is_poison(v);
        continue;
      }
      bad += is_poison(v);
      got[(size_t)r * h + c] = v;
      ref[(size_t)r * h + c] = p < 0 ? 0.0 : (double)x[(size_t)(p / k) * xs + c] * b->weights[p];
    }
  }
  e = rel_err(got, ref, rows * h);
  CHECK(bad == 0, "%s permute: %d elements unwritten or padding written\n", name, bad);
  CHECK(e <= 1e-6, "%s permute: rel err %.3g\n", name, e);

  /* Combine, weighted, slot order. */
  memset(&ca, 0, sizeof ca);
  ca.n = n;
  ca.h = h;
  ca.k = k;
  ca.rows = rows;
  ca.dtype = DK_DTYPE_F32;
  ca.rows_in = eo;
  ca.rows_stride = xs;
  ca.position = b->position;
  ca.weights = b->weights;
  ca.y = y;
  ca.y_stride = os;
  st = dk_moe_combine(ctx, &ca, NULL);
  CHECK(st == DK_OK, "%s combine: status %d (%s)\n", name, (int)st, dk_last_error());
  bad = 0;
  for (t = 0; t < n; ++t) {
    for (c = 0; c < os; ++c) {
      float v = y[(size_t)t * os + c];
      double s = 0.0;
      if (c >= h) {
        bad += !is_poison(v);
        continue;
      }
      bad += is_poison(v);
      for (j = 0; j < k; ++j) {
        int pos = b->position[t * k + j];
        if (pos >= 0) s += (double)b->weights[t * k + j] * eo[(size_t)pos * xs + c];
      }
      got[(size_t)t * h + c] = v;
      ref[(size_t)t * h + c] = s;
    }
  }
  e = rel_err(got, ref, n * h);
  CHECK(bad == 0, "%s combine: %d elements unwritten or padding written\n", name, bad);
  CHECK(e <= 1e-6, "%s combine: rel err %.3g\n", name, e);

  /* Slot dot of the tokens with the expert rows. */
  memset(&da, 0, sizeof da);
  da.n = n;
  da.h = h;
  da.k = k;
  da.rows = rows;
  da.dtype = DK_DTYPE_F32;
  da.tokens = x;
  da.tokens_stride = xs;
  da.rows_in = eo;
  da.rows_stride = xs;
  da.position = b->position;
  da.out = dots;
  st = dk_moe_slot_dot(ctx, &da, NULL);
  CHECK(st == DK_OK, "%s slot_dot: status %d (%s)\n", name, (int)st, dk_last_error());
  bad = 0;
  for (t = 0; t < n; ++t) {
    for (j = 0; j < k; ++j) {
      int pos = b->position[t * k + j];
      double s = 0.0;
      if (pos >= 0)
        for (c = 0; c < h; ++c) s += (double)x[(size_t)t * xs + c] * eo[(size_t)pos * xs + c];
      bad += is_poison(dots[t * k + j]);
      got_d[t * k + j] = dots[t * k + j];
      ref_d[t * k + j] = s;
    }
  }
  for (t = n * k; t < n * k + PAD; ++t) bad += !is_poison(dots[t]);
  e = rel_err(got_d, ref_d, n * k);
  CHECK(bad == 0, "%s slot_dot: %d outputs unwritten or written past n*k\n", name, bad);
  CHECK(e <= 1e-6, "%s slot_dot: rel err %.3g\n", name, e);

  /* bf16 permute without scaling: an exact copy, padding rows zero. */
  pa.dtype = DK_DTYPE_BF16;
  pa.x = xb;
  pa.x_stride = h;
  pa.weights = NULL;
  pa.out = xpb;
  pa.out_stride = h;
  st = dk_moe_permute(ctx, &pa, NULL, 0, NULL);
  CHECK(st == DK_OK, "%s bf16 permute: status %d (%s)\n", name, (int)st, dk_last_error());
  bad = 0;
  for (r = 0; r < rows; ++r) {
    int p = b->perm[r];
    for (c = 0; c < h; ++c) {
      uint16_t v = xpb[(size_t)r * h + c];
      bad += p < 0 ? v != 0 : v != xb[(size_t)(p / k) * h + c];
    }
  }
  CHECK(bad == 0, "%s bf16 permute: %d elements differ from the gathered rows\n", name, bad);
  printf("ok   %-52s permute / combine / slot_dot, H = %d\n", name, h);

  free(x);
  free(xp);
  free(eo);
  free(y);
  free(dots);
  free(xb);
  free(xpb);
  free(got);
  free(ref);
  free(got_d);
  free(ref_d);
}

/* ---- the backward calls against the primitives ----------------------------------------------- */

/* A [rows, stride] matrix of es-byte elements (4: f32, 2: bf16): random values in the first h
 * columns and NaN past them (never read), or poison everywhere (an output). */
static unsigned char* new_matrix(int rows, int h, int stride, size_t es, int poisoned) {
  size_t i, len = (size_t)rows * stride;
  unsigned char* m = malloc(es * (len > 0 ? len : 1));
  for (i = 0; i < len; ++i) {
    float f = poisoned ? poison_f32() : (int)(i % stride) < h ? (float)rng_normal() : NAN;
    uint16_t v = poisoned ? POISON16 : (int)(i % stride) < h ? f32_to_bf16(f) : 0x7fc1;
    if (es == 2)
      memcpy(m + 2 * i, &v, 2);
    else
      memcpy(m + 4 * i, &f, 4);
  }
  return m;
}

static float* new_poisoned(int len) {
  float* v = malloc(sizeof(float) * (size_t)len);
  int i;
  for (i = 0; i < len; ++i) v[i] = poison_f32();
  return v;
}

/* dk_moe_permute_backward = dk_moe_combine + dk_moe_slot_dot and dk_moe_combine_backward =
 * dk_moe_permute + dk_moe_slot_dot on the same operands, every byte of the outputs (row padding
 * and the entries past grad_weights stay poisoned): f32 with row strides and bf16, weighted with
 * the weights' gradient and unweighted without it. */
static void run_backward(dk_context* ctx, const char* name, const batch* b, int h) {
  int n = b->n, k = b->k, rows = b->rows, pass, i;
  for (pass = 0; pass < 4; ++pass) {
    int bf16 = pass & 1, grads = pass < 2, s = bf16 ? h : h + 8;
    int32_t dt = bf16 ? DK_DTYPE_BF16 : DK_DTYPE_F32;
    size_t es = bf16 ? 2 : 4, dots_bytes = sizeof(float) * (size_t)(n * k + PAD);
    const char* what = bf16 ? (grads ? "bf16, weighted" : "bf16, unweighted")
                            : (grads ? "f32, weighted" : "f32, unweighted");
    const float* w = grads ? b->weights : NULL;
    /* Token rows (x, or grad_y) and permuted rows (grad_xp, or expert_out); outputs: [0] the
     * primitives', [1] the backward call's. */
    unsigned char* tok = new_matrix(n, h, s, es, 0);
    unsigned char* prm = new_matrix(rows, h, s, es, 0);
    unsigned char* tok_out[2] = {new_matrix(n, h, s, es, 1), new_matrix(n, h, s, es, 1)};
    unsigned char* prm_out[2] = {new_matrix(rows, h, s, es, 1), new_matrix(rows, h, s, es, 1)};
    float* dots[2] = {new_poisoned(n * k + PAD), new_poisoned(n * k + PAD)};
    /* The slot-dot both backward calls compute: tokens = tok, rows = prm. */
    dk_moe_slot_dot_args da = {.n = n, .h = h, .k = k, .rows = rows, .dtype = dt, .tokens = tok,
                               .tokens_stride = s, .rows_in = prm, .rows_stride = s,
                               .position = b->position, .out = dots[0]};
    /* The permute's gradients (grad_xp = prm, x = tok); x_stride is not read without x. */
    dk_moe_combine_args ca = {.n = n, .h = h, .k = k, .rows = rows, .dtype = dt, .rows_in = prm,
                              .rows_stride = s, .position = b->position, .weights = w,
                              .y = tok_out[0], .y_stride = s};
    dk_moe_permute_backward_args pb = {
        .n = n, .h = h, .k = k, .rows = rows, .dtype = dt, .grad_xp = prm, .grad_xp_stride = s,
        .position = b->position, .weights = w, .x = grads ? tok : NULL, .x_stride = grads ? s : -1,
        .grad_x = tok_out[1], .grad_x_stride = s, .grad_weights = grads ? dots[1] : NULL};
    /* The combine's gradients (grad_y = tok, expert_out = prm). */
    dk_moe_permute_args pa = {.n = n, .h = h, .k = k, .rows = rows, .dtype = dt, .x = tok,
                              .x_stride = s, .perm = b->perm, .weights = w, .out = prm_out[0],
                              .out_stride = s};
    dk_moe_combine_backward_args cb = {
        .n = n, .h = h, .k = k, .rows = rows, .dtype = dt, .grad_y = tok, .grad_y_stride = s,
        .expert_out = grads ? prm : NULL, .expert_out_stride = grads ? s : -1, .perm = b->perm,
        .position = b->position, .weights = w, .grad_expert_out = prm_out[1],
        .grad_expert_out_stride = s, .grad_weights = grads ? dots[1] : NULL};
    dk_status st[4];

    st[0] = grads ? dk_moe_slot_dot(ctx, &da, NULL) : DK_OK;
    st[1] = dk_moe_combine(ctx, &ca, NULL);
    st[2] = dk_moe_permute_backward(ctx, &pb, NULL);
    CHECK(st[0] == DK_OK && st[1] == DK_OK && st[2] == DK_OK,
          "%s %s: slot_dot %d, combine %d, permute_backward %d (%s)\n", name, what, (int)st[0],
          (int)st[1], (int)st[2], dk_last_error());
    CHECK(memcmp(tok_out[0], tok_out[1], es * (size_t)n * s) == 0,
          "%s %s: permute_backward's grad_x is not dk_moe_combine's\n", name, what);
    CHECK(memcmp(dots[0], dots[1], dots_bytes) == 0,
          "%s %s: permute_backward's grad_weights are not dk_moe_slot_dot's\n", name, what);

    for (i = 0; i < n * k + PAD; ++i) dots[1][i] = poison_f32();
    st[3] = dk_moe_permute(ctx, &pa, NULL, 0, NULL);
    st[2] = dk_moe_combine_backward(ctx, &cb, NULL);
    CHECK(st[3] == DK_OK && st[2] == DK_OK, "%s %s: permute %d, combine_backward %d (%s)\n", name,
          what, (int)st[3], (int)st[2], dk_last_error());
    CHECK(memcmp(prm_out[0], prm_out[1], es * (size_t)rows * s) == 0,
          "%s %s: combine_backward's grad_expert_out is not dk_moe_permute's\n", name, what);
    CHECK(memcmp(dots[0], dots[1], dots_bytes) == 0,
          "%s %s: combine_backward's grad_weights are not dk_moe_slot_dot's\n", name, what);
    CHECK(!grads || !is_poison(dots[1][0]), "%s %s: grad_weights unwritten\n", name, what);

    free(tok);
    free(prm);
    for (i = 0; i < 2; ++i) {
      free(tok_out[i]);
      free(prm_out[i]);
      free(dots[i]);
    }
  }
  printf("ok   %-52s backward calls = the primitives, bit for bit\n", name);
}

static dk_moe_route_params make_params(int k, int score, int renormalize, int n_groups,
                                       int topk_groups, float scale, int64_t capacity,
                                       int block) {
  dk_moe_route_params p = dk_moe_route_params_default();
  p.k = k;
  p.score = score;
  p.renormalize = renormalize;
  p.n_groups = n_groups;
  p.topk_groups = topk_groups;
  p.scale = scale;
  p.capacity = capacity;
  p.block = block;
  return p;
}

/* ---- error paths ----------------------------------------------------------------------------- */

static void check_errors(dk_context* ctx) {
  /* Activations from malloc: their rows must start on 16-byte boundaries. */
  float logits[24], weights[6], dots[6];
  float* x = malloc(sizeof(float) * 24);
  float* out = malloc(sizeof(float) * 48);
  int32_t ids[6], counts[4], offsets[5], perm[6], position[6];
  dk_moe_route_args a;
  dk_moe_route_params p = make_params(2, DK_MOE_SOFTMAX, 0, 1, 1, 1.0f, 0, 1), bad;
  dk_moe_permute_args pa;
  dk_moe_combine_args ca;
  dk_moe_slot_dot_args da;
  dk_moe_permute_backward_args pb;
  dk_moe_combine_backward_args cb;
  dk_status st;
  size_t ws = 99;
  int i, untouched;

  for (i = 0; i < 24; ++i) {
    logits[i] = (float)(0.1 * i);
    x[i] = (float)(0.5 * i);
  }
  for (i = 0; i < 6; ++i) {
    ids[i] = POISON_I32;
    position[i] = POISON_I32;
    perm[i] = POISON_I32;
    weights[i] = poison_f32();
    dots[i] = poison_f32();
  }
  for (i = 0; i < 4; ++i) counts[i] = POISON_I32;
  for (i = 0; i < 5; ++i) offsets[i] = POISON_I32;
  for (i = 0; i < 48; ++i) out[i] = poison_f32();
  memset(&a, 0, sizeof a);
  a.n = 3;
  a.e = 4;
  a.logits = logits;
  a.logits_dtype = DK_DTYPE_F32;
  a.logits_stride = 8;
  a.expert_ids = ids;
  a.weights = weights;
  a.counts = counts;
  a.offsets = offsets;
  a.perm = perm;
  a.perm_rows = 6;
  a.position = position;

#define EXPECT_STATUS(call, code, what)                                                     \
  do {                                                                                      \
    st = (call);                                                                            \
    CHECK(st == (code), "%s: status %d, expected %d (%s)\n", what, (int)st, (int)(code),    \
          dk_last_error());                                                                 \
    CHECK(strlen(dk_last_error()) > 0, "%s: dk_last_error() is empty\n", what);             \
    untouched = 1;                                                                          \
    for (i = 0; i < 6; ++i)                                                                 \
      untouched &= ids[i] == POISON_I32 && position[i] == POISON_I32 &&                     \
                   perm[i] == POISON_I32 && is_poison(weights[i]) && is_poison(dots[i]);    \
    for (i = 0; i < 4; ++i) untouched &= counts[i] == POISON_I32;                           \
    for (i = 0; i < 5; ++i) untouched &= offsets[i] == POISON_I32;                          \
    for (i = 0; i < 48; ++i) untouched &= is_poison(out[i]);                                \
    CHECK(untouched, "%s: outputs were written on error\n", what);                          \
    printf("ok   error: %-41s -> %d \"%s\"\n", what, (int)st, dk_last_error());             \
  } while (0)

  EXPECT_STATUS(dk_moe_route(NULL, &a, &p, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL context");
  EXPECT_STATUS(dk_moe_route(ctx, NULL, &p, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL args");
  EXPECT_STATUS(dk_moe_route(ctx, &a, NULL, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL params");
  a.counts = NULL;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &p, NULL, 0, NULL), DK_ERR_NULL_POINTER, "NULL counts");
  a.counts = counts;
  a.logits_dtype = DK_DTYPE_F16;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &p, NULL, 0, NULL), DK_ERR_UNSUPPORTED_DTYPE,
                "f16 router logits");
  a.logits_dtype = 5;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &p, NULL, 0, NULL), DK_ERR_UNSUPPORTED_DTYPE,
                "logits dtype 5");
  a.logits_dtype = DK_DTYPE_F32;
  a.logits_stride = 3;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &p, NULL, 0, NULL), DK_ERR_SHAPE, "logits stride < e");
  a.logits_stride = 8;
  a.perm_rows = 5;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &p, NULL, 0, NULL), DK_ERR_SHAPE, "perm_rows < max_rows");
  a.perm_rows = 6;
  a.e = 0;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &p, NULL, 0, NULL), DK_ERR_SHAPE, "e = 0");
  a.e = 4;
  a.position = ids;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &p, NULL, 0, NULL), DK_ERR_SHAPE, "position == expert_ids");
  a.position = position;
  bad = p;
  bad.k = 5;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT, "k 5 > e");
  bad = p;
  bad.score = 3;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT, "score 3");
  bad = p;
  bad.n_groups = 3;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
                "n_groups 3 does not divide 4");
  bad = p;
  bad.capacity = -2;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
                "capacity -2");
  bad = p;
  bad.block = 0;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT, "block 0");
  bad = p;
  bad.scale = (float)INFINITY;
  EXPECT_STATUS(dk_moe_route(ctx, &a, &bad, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT,
                "scale inf");
  EXPECT_STATUS(dk_moe_route_workspace_size(ctx, 3, 4, 2, NULL), DK_ERR_NULL_POINTER,
                "workspace_size out NULL");
  EXPECT_STATUS(dk_moe_route_workspace_size(NULL, 3, 4, 2, &ws), DK_ERR_NULL_POINTER,
                "workspace_size NULL context");
  CHECK(ws == 99, "workspace size written on error\n");

  /* Permute / combine / slot dot over 3 tokens of h = 8 (refused before the indices are read). */
  memset(&pa, 0, sizeof pa);
  pa.n = 3;
  pa.h = 8;
  pa.k = 2;
  pa.rows = 6;
  pa.dtype = DK_DTYPE_F32;
  pa.x = x;
  pa.x_stride = 8;
  pa.perm = perm;
  pa.out = out;
  pa.out_stride = 8;
  EXPECT_STATUS(dk_moe_permute(ctx, NULL, NULL, 0, NULL), DK_ERR_NULL_POINTER, "permute NULL args");
  pa.h = 6;
  EXPECT_STATUS(dk_moe_permute(ctx, &pa, NULL, 0, NULL), DK_ERR_SHAPE, "permute h = 6");
  pa.h = 8;
  pa.k = 0;
  EXPECT_STATUS(dk_moe_permute(ctx, &pa, NULL, 0, NULL), DK_ERR_INVALID_ARGUMENT, "permute k = 0");
  pa.k = 2;
  pa.out = x;
  EXPECT_STATUS(dk_moe_permute(ctx, &pa, NULL, 0, NULL), DK_ERR_SHAPE, "permute out == x");
  pa.out = out;
  pa.dtype = 4;
  EXPECT_STATUS(dk_moe_permute(ctx, &pa, NULL, 0, NULL), DK_ERR_UNSUPPORTED_DTYPE, "permute dtype 4");
  memset(&ca, 0, sizeof ca);
  ca.n = 3;
  ca.h = 8;
  ca.k = 2;
  ca.rows = 3;
  ca.dtype = DK_DTYPE_F32;
  ca.rows_in = x;
  ca.rows_stride = 8;
  ca.position = position;
  ca.y = out;
  ca.y_stride = 7;
  EXPECT_STATUS(dk_moe_combine(ctx, &ca, NULL), DK_ERR_SHAPE, "combine y_stride < h");
  ca.y_stride = 8;
  ca.position = NULL;
  EXPECT_STATUS(dk_moe_combine(ctx, &ca, NULL), DK_ERR_NULL_POINTER, "combine NULL position");
  memset(&da, 0, sizeof da);
  da.n = 3;
  da.h = 8;
  da.k = 2;
  da.rows = 3;
  da.dtype = DK_DTYPE_F32;
  da.tokens = x;
  da.tokens_stride = 8;
  da.rows_in = x;
  da.rows_stride = 8;
  da.position = position;
  da.out = NULL;
  EXPECT_STATUS(dk_moe_slot_dot(ctx, &da, NULL), DK_ERR_NULL_POINTER, "slot_dot NULL out");
  da.out = dots;
  da.k = -1;
  EXPECT_STATUS(dk_moe_slot_dot(ctx, &da, NULL), DK_ERR_INVALID_ARGUMENT, "slot_dot k = -1");
  /* The backward calls: their own rules (the weights' gradient with its operand, outputs apart). */
  pb = (dk_moe_permute_backward_args){
      .n = 3, .h = 8, .k = 2, .rows = 3, .dtype = DK_DTYPE_F32, .grad_xp = x, .grad_xp_stride = 8,
      .position = position, .weights = NULL, .x = x, .x_stride = 8, .grad_x = out,
      .grad_x_stride = 8, .grad_weights = NULL};
  EXPECT_STATUS(dk_moe_permute_backward(ctx, NULL, NULL), DK_ERR_NULL_POINTER,
                "permute_backward NULL args");
  EXPECT_STATUS(dk_moe_permute_backward(ctx, &pb, NULL), DK_ERR_INVALID_ARGUMENT,
                "permute_backward x, no grad_weights");
  pb.grad_weights = dots;
  pb.grad_x = x;
  EXPECT_STATUS(dk_moe_permute_backward(ctx, &pb, NULL), DK_ERR_SHAPE,
                "permute_backward grad_x over grad_xp, x");
  pb.grad_x = out;
  pb.dtype = 3;
  EXPECT_STATUS(dk_moe_permute_backward(ctx, &pb, NULL), DK_ERR_UNSUPPORTED_DTYPE,
                "permute_backward dtype 3");
  cb = (dk_moe_combine_backward_args){
      .n = 3, .h = 8, .k = 2, .rows = 3, .dtype = DK_DTYPE_F32, .grad_y = x, .grad_y_stride = 8,
      .expert_out = x, .expert_out_stride = 8, .perm = perm, .position = position, .weights = NULL,
      .grad_expert_out = out, .grad_expert_out_stride = 8, .grad_weights = NULL};
  EXPECT_STATUS(dk_moe_combine_backward(NULL, &cb, NULL), DK_ERR_NULL_POINTER,
                "combine_backward NULL context");
  EXPECT_STATUS(dk_moe_combine_backward(ctx, &cb, NULL), DK_ERR_INVALID_ARGUMENT,
                "combine_backward expert_out, no grad_weights");
  cb.grad_weights = dots;
  cb.perm = NULL;
  EXPECT_STATUS(dk_moe_combine_backward(ctx, &cb, NULL), DK_ERR_NULL_POINTER,
                "combine_backward NULL perm");
  cb.perm = perm;
  cb.grad_expert_out_stride = 4;
  EXPECT_STATUS(dk_moe_combine_backward(ctx, &cb, NULL), DK_ERR_SHAPE,
                "combine_backward grad_expert_out_stride < h");
#undef EXPECT_STATUS

  /* Out-of-range indices are refused on the CPU (before anything is written). */
  for (i = 0; i < 6; ++i) position[i] = i % 3;
  position[4] = 3;
  da.k = 2;
  st = dk_moe_slot_dot(ctx, &da, NULL);
  CHECK(st == DK_ERR_INVALID_ARGUMENT, "slot_dot position 3 of 3 rows: %d\n", (int)st);
  for (i = 0; i < 6; ++i) CHECK(is_poison(dots[i]), "slot_dot wrote on error\n");
  /* A success clears the message. */
  position[4] = -1;
  st = dk_moe_slot_dot(ctx, &da, NULL);
  CHECK(st == DK_OK && strcmp(dk_last_error(), "") == 0, "valid slot_dot after errors: %d %s\n",
        (int)st, dk_last_error());
  CHECK(dots[4] == 0.0f, "dropped slot's dot is %g\n", (double)dots[4]);
  free(x);
  free(out);
}

static void check_cuda(void) {
  dk_context* ctx = NULL;
  size_t ws = 0;
  float logits[8] = {0}, weights[4];
  int32_t ids[4], counts[4], offsets[5], perm[4], position[4];
  dk_moe_route_args a;
  dk_moe_route_params p = dk_moe_route_params_default();
  dk_status st = dk_context_create(0, &ctx);
  int i;
  CHECK(st == DK_OK && ctx != NULL, "CUDA context: %d %s\n", (int)st, dk_last_error());
  if (st != DK_OK) return;
  CHECK(dk_moe_route_workspace_size(ctx, 16384, 128, 8, &ws) == DK_OK,
        "route workspace query: %s\n", dk_last_error());
  {
    size_t pws = 0;
    CHECK(dk_moe_permute_workspace_size(ctx, 16384, 8, &pws) == DK_OK &&
              pws == 4 * ((size_t)16384 * 8 + 1),
          "permute workspace query: %zu %s\n", pws, dk_last_error());
  }
  for (i = 0; i < 4; ++i) ids[i] = POISON_I32;
  memset(&a, 0, sizeof a);
  a.n = 2;
  a.e = 4;
  a.logits = logits;
  a.logits_dtype = DK_DTYPE_F32;
  a.logits_stride = 4;
  a.expert_ids = ids;
  a.weights = weights;
  a.counts = counts;
  a.offsets = offsets;
  a.perm = perm;
  a.perm_rows = 2;
  a.position = position;
  st = dk_moe_route(ctx, &a, &p, NULL, 0, NULL);
  CHECK(st == DK_ERR_WRONG_DEVICE, "host memory on a CUDA context: %d (%s)\n", (int)st,
        dk_last_error());
  for (i = 0; i < 4; ++i) CHECK(ids[i] == POISON_I32, "host ids written by a refused call\n");
  CHECK(dk_context_destroy(ctx) == DK_OK, "destroy CUDA context\n");
  printf("ok   CUDA context: route workspace %zu bytes for 16384 x 128 top-8, host memory "
         "refused\n",
         ws);
}

int main(int argc, char** argv) {
  dk_context* ctx = NULL;
  int cuda_expected = argc > 2 && strcmp(argv[2], "1") == 0;
  dk_moe_route_params p;
  dk_status st;
  batch b;
  double ties[2 * 8] = {0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5,  /* all equal */
                        0.0, 1.0, 0.0, 1.0, 2.0, 0.0, 2.0, 0.0}; /* equal pairs */
  size_t ws = 99;

  if (argc > 1) rng_state = strtoull(argv[1], NULL, 0) | 1u;
  printf("seed %llu, dk_version() = %s\n", (unsigned long long)rng_state, dk_version());

  /* Bounds and defaults. */
  CHECK(dk_moe_max_rows(10, 4, 2, 1, 0) == 20, "max_rows plain\n");
  CHECK(dk_moe_max_rows(10, 4, 2, 8, 0) == 48, "max_rows block 8\n");
  CHECK(dk_moe_max_rows(10, 4, 2, 1, 3) == 12, "max_rows capacity 3\n");
  CHECK(dk_moe_max_rows(-1, 4, 2, 1, 0) == -1, "max_rows n -1\n");
  CHECK(dk_moe_max_rows(10, 4, 2, 0, 0) == -1, "max_rows block 0\n");
  CHECK(dk_moe_max_rows(10, 4, 2, 1, -1) == -1, "max_rows capacity -1\n");
  CHECK(dk_moe_max_rows(INT64_MAX, 4, 2, 1, 0) == -1, "max_rows overflow\n");
  p = dk_moe_route_params_default();
  CHECK(p.k == 1 && p.score == DK_MOE_SOFTMAX && p.renormalize == 0 && p.n_groups == 1 &&
            p.topk_groups == 1 && p.scale == 1.0f && p.capacity == 0 && p.block == 1,
        "default params\n");

  st = dk_context_create(-1, &ctx);
  CHECK(st == DK_OK && ctx != NULL, "CPU context: %d %s\n", (int)st, dk_last_error());
  if (st != DK_OK) return 1;
  CHECK(dk_moe_route_workspace_size(ctx, 100, 16, 4, &ws) == DK_OK && ws == 0,
        "CPU route workspace %zu\n", ws);
  ws = 99;
  CHECK(dk_moe_permute_workspace_size(ctx, 100, 4, &ws) == DK_OK && ws == 0,
        "CPU permute workspace %zu\n", ws);

  /* name, n, e, stride, bf16, bias, fixed logits,
   * params (k, score, renormalize, n_groups, topk_groups, scale, capacity, block) */
  run_route(ctx, "softmax top-4 of 16, renormalised", 37, 16, 16, 0, 0, NULL,
            make_params(4, DK_MOE_SOFTMAX, 1, 1, 1, 1.0f, 0, 1), &b);
  run_activations(ctx, "softmax top-4 of 16", &b, 24);
  run_backward(ctx, "softmax top-4 of 16", &b, 24);
  free_batch(&b);
  run_route(ctx, "sigmoid, bias, 4 groups keep 2, x2.5, cap 8, block 4, bf16", 37, 16, 20, 1, 1,
            NULL, make_params(4, DK_MOE_SIGMOID, 1, 4, 2, 2.5f, 8, 4), &b);
  run_activations(ctx, "grouped, capacity, padding", &b, 16);
  run_backward(ctx, "grouped, capacity, padding", &b, 16);
  free_batch(&b);
  run_route(ctx, "sigmoid top-1 (Llama 4 style), cap 3", 40, 8, 8, 0, 0, NULL,
            make_params(1, DK_MOE_SIGMOID, 0, 1, 1, 1.0f, 3, 1), &b);
  run_activations(ctx, "top-1 with drops", &b, 8);
  run_backward(ctx, "top-1 with drops", &b, 8);
  free_batch(&b);
  run_route(ctx, "one token, all 8 experts, block 3", 1, 8, 8, 1, 0, NULL,
            make_params(8, DK_MOE_SOFTMAX, 0, 1, 1, 0.5f, 0, 3), &b);
  run_activations(ctx, "one token", &b, 8);
  run_backward(ctx, "one token", &b, 8);
  free_batch(&b);
  run_route(ctx, "ties: equal logits go to lower ids", 2, 8, 8, 0, 0, ties,
            make_params(3, DK_MOE_SOFTMAX, 0, 1, 1, 1.0f, 0, 1), &b);
  CHECK(b.ids[0] == 0 && b.ids[1] == 1 && b.ids[2] == 2, "ties row 0: %d %d %d\n", (int)b.ids[0],
        (int)b.ids[1], (int)b.ids[2]);
  CHECK(b.ids[3] == 4 && b.ids[4] == 6 && b.ids[5] == 1, "ties row 1: %d %d %d\n", (int)b.ids[3],
        (int)b.ids[4], (int)b.ids[5]);
  free_batch(&b);

  check_errors(ctx);
  CHECK(dk_context_destroy(ctx) == DK_OK, "destroy\n");

  if (cuda_expected)
    check_cuda();
  else
    printf("SKIPPED CUDA part of the MoE C test (dk_cuda_device_count() = %d)\n",
           (int)dk_cuda_device_count());

  printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
