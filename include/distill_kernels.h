/*
 * distill-kernels C ABI.
 *
 * Conventions:
 *  - Every function returns dk_status; DK_OK is 0. On error nothing has been written and
 *    dk_last_error() returns a message (thread-local, valid until the next dk_ call on the thread).
 *  - A context is created for the CPU (device = -1) or a CUDA device (device = ordinal). On a CUDA
 *    context every pointer is device memory of that device (checked), work is queued on the
 *    caller's stream (cudaStream_t / CUstream; NULL = the legacy default stream) and no call
 *    synchronises the host. On the CPU context pointers are host memory and calls are blocking.
 *  - Scratch memory: query *_workspace_size and pass at least that many bytes of device memory,
 *    or pass NULL to let the library allocate on the stream (cuMemAllocAsync). Its start must
 *    be 4-byte aligned (16 for the non-deterministic attention backward where the device's
 *    kernels sum dq with atomics; any for the fused linear divergence), as every allocator's
 *    is: DK_ERR_INVALID_ARGUMENT otherwise. The CPU
 *    context needs none (its queries say 0) and ignores a workspace given, unchecked: a run on
 *    the CPU does not test a program's workspace handling.
 *  - Pointers are aligned to their element size (DK_ERR_INVALID_ARGUMENT otherwise); MoE and
 *    attention rows need 16-byte alignment (their sections say which).
 *  - Outputs may not overlap the inputs or each other (DK_ERR_SHAPE), except the documented
 *    in-place forms. The divergence and attention compare the bytes the strided rows touch, so
 *    rows of one stride that share no element (two halves of one [n, 2v] buffer) are accepted;
 *    the fused, MoE and row-scaling calls compare each matrix's first-to-last byte range, so
 *    there such interleaved layouts are refused too.
 *  - A context may be used from several threads at once; each thread has its own message. A
 *    caller's workspace serves one call at a time: calls that may interleave (from other
 *    threads, or on other streams) each need their own.
 *  - No panic or exception crosses this boundary.
 */
#ifndef DISTILL_KERNELS_H
#define DISTILL_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DK_VERSION_MAJOR 0
#define DK_VERSION_MINOR 1
#define DK_VERSION_PATCH 0
#define DK_VERSION_STRING "0.1.0"

/* ABI version: raised whenever a declaration of this header is added, removed or changed (a
   struct's layout, a constant's value, a function or its signature); the version number does
   not say, as 0.x releases may change the ABI. Check dk_abi_version() == DK_ABI_VERSION once
   before the first call: a library of another ABI would read this header's structs wrongly (a
   field read past the end of a caller's struct, say) or lack a function. A library from before
   version 2 has no dk_abi_version at all: the program then fails to load or link. On Linux the
   shared library's SONAME is libdistill_kernels.so.<DK_ABI_VERSION> (since 2026-11-28), so a
   program linked against such a library is refused by the loader where only another ABI's
   library is found (one linked against an earlier library records the unversioned name).
   History: 1, the ABI until 2026-11-27 (no macro); 2 (2026-11-28): dk_divergence_args and
   dk_fused_linear_args gained num_items; 3 (2026-11-28): dk_moe_permute_backward and
   dk_moe_combine_backward. */
#define DK_ABI_VERSION 3

/* Status codes (see the conventions above; the message is in dk_last_error()). */
typedef int32_t dk_status;
#define DK_OK 0
#define DK_ERR_NULL_POINTER 1        /* a required pointer was null */
#define DK_ERR_INVALID_ARGUMENT 2    /* a parameter out of range (beta, temperature, a code, ...) */
#define DK_ERR_SHAPE 3               /* shapes, lengths or strides do not fit together, or overlap */
#define DK_ERR_UNSUPPORTED_DTYPE 4   /* a dtype the operation does not accept */
#define DK_ERR_NO_DEVICE 5           /* no CUDA driver or device, or a library built without kernels */
#define DK_ERR_WRONG_DEVICE 6        /* memory on another device, or host memory where device memory is needed */
#define DK_ERR_WORKSPACE_TOO_SMALL 7 /* smaller than the matching *_workspace_size asked for */
#define DK_ERR_CUDA 8                /* the CUDA driver (or cuBLAS) returned an error */
#define DK_ERR_PANIC 9               /* a panic caught at the boundary: a bug, please report it */
#define DK_ERR_OUT_OF_MEMORY 10      /* the host could not allocate the CPU backend's working memory */

/* Element types (dk_dtype). */
#define DK_DTYPE_F32 0
#define DK_DTYPE_BF16 1
#define DK_DTYPE_F16 2

/* Divergence kinds (dk_divergence_params.kind). */
#define DK_FORWARD_KL 0 /* KL(teacher || student) */
#define DK_REVERSE_KL 1 /* KL(student || teacher) */
#define DK_JSD 2        /* beta KL(p||m) + (1-beta) KL(q||m); beta 0 = forward KL, 1 = reverse KL */

/* Reductions (dk_divergence_params.reduction). */
#define DK_REDUCTION_BATCHMEAN 0 /* sum over valid rows / max(1, #valid) (or / num_items) */
#define DK_REDUCTION_SUM 1
#define DK_REDUCTION_NONE 2 /* per-row values are the result; loss = their sum */

typedef struct dk_context dk_context;

/* "MAJOR.MINOR.PATCH", static storage. */
const char* dk_version(void);
/* The DK_ABI_VERSION this library was built with. */
uint32_t dk_abi_version(void);
/* 64-bit FNV-1a of the bytes of this header file as the library was built: compare it with the
   header you compile against to catch a stale library of the same version. */
uint64_t dk_header_hash(void);
/* Message of the last call on this thread that returned a dk_status ("" after a success).
   Functions that return no status (dk_version, dk_cuda_archs, dk_cuda_device_count,
   dk_moe_max_rows, the *_params_default) leave it as it was. */
const char* dk_last_error(void);
/* Number of CUDA devices (0 when no driver is present). */
int32_t dk_cuda_device_count(void);
/* The GPU architectures whose kernels are compiled into this library, comma-separated
   ("sm_80,sm_90a,sm_100,sm_120,compute_80"; static storage), or "" for a library built without
   nvcc, which refuses CUDA contexts (DK_ERR_NO_DEVICE). */
const char* dk_cuda_archs(void);

/* device = -1: CPU; n >= 0: CUDA device n (its primary context, the one PyTorch uses); below -1
   DK_ERR_INVALID_ARGUMENT. A CUDA context is refused with DK_ERR_INVALID_ARGUMENT while a DK_*
   A/B switch of the environment (README, "A/B switches") holds a value it does not take (checked
   once a device is found: without a driver the status is DK_ERR_NO_DEVICE). */
dk_status dk_context_create(int32_t device, dk_context** out);
/* NULL is a no-op. The context must not be used, or destroyed again, afterwards (undefined
   behaviour, as for free()). A CUDA context unloads its kernels here: destroy it only after
   the work queued through it has finished (synchronise its streams first). */
dk_status dk_context_destroy(dk_context* ctx);
/* -1 for the CPU, else the CUDA ordinal. */
dk_status dk_context_device(const dk_context* ctx, int32_t* out);

/* ---- Token-level divergence ------------------------------------------------------------ */

typedef struct dk_divergence_params {
  int32_t kind;         /* DK_FORWARD_KL, DK_REVERSE_KL, DK_JSD */
  float beta;           /* JSD teacher weight, in [0, 1]; a float, so near 1 its rounding moves
                           1 - beta by up to 2^-25 / (1 - beta) relative (and the JSD with it) */
  float temperature;    /* finite, >= FLT_MIN (normal); logits are divided by it (gradient
                           includes the 1/T) */
  int32_t reduction;    /* DK_REDUCTION_* */
  int64_t ignore_index; /* rows whose label equals it are skipped (default -100) */
  float num_items;      /* batchmean divisor override; 0 = count the valid rows; else finite,
                           >= FLT_MIN (normal) */
} dk_divergence_params;

typedef struct dk_divergence_args {
  int64_t n;              /* rows, >= 0 (0: an empty batch, *loss = 0, nothing else written) */
  int64_t v;              /* vocabulary size, 1 ..= 2^31 - 2^16 */
  const void* student;    /* [n, v] logits */
  int32_t student_dtype;  /* DK_DTYPE_* (also the gradient's dtype) */
  int64_t student_stride; /* elements between rows, >= v */
  const void* teacher;    /* [n, v] logits */
  int32_t teacher_dtype;  /* DK_DTYPE_*, may differ from the student's */
  int64_t teacher_stride; /* >= v */
  const int64_t* labels;  /* [n] or NULL (every row counts) */
  float* loss;            /* 1 float or NULL */
  float* per_token;       /* [n] per-row loss before the reduction's scale (0 if ignored), or NULL */
  void* grad;             /* [n, v] d(loss)/d(student) or NULL (forward only); may equal student */
  int64_t grad_stride;    /* >= v; equal to student_stride when grad == student */
  const float* num_items; /* NULL, or 1 float in the context's memory: batchmean's divisor, read
                             when the call runs (a token count computed on the device needs no
                             host sync); replaces params->num_items (which must then be 0), needs
                             DK_REDUCTION_BATCHMEAN; a value not finite and >= 2^-126 (FLT_MIN)
                             gives the sum */
} dk_divergence_args;

/*
 * Masking: -inf logits contribute 0; a row with every entry -inf on either side has loss 0 and
 * gradient 0. An entry -inf on one side only where the other side has mass makes the row's
 * divergence +inf: forward KL (student -inf) keeps a finite gradient, reverse KL and JSD with
 * beta = 1 (teacher -inf) give a non-finite gradient row. NaN or +inf in a row makes that row's
 * loss and gradient NaN (and the reduced loss), other rows untouched.
 */
/* forward KL, beta 0.5, temperature 1, batchmean, ignore_index -100, no num_items. */
dk_divergence_params dk_divergence_params_default(void);
dk_status dk_divergence_workspace_size(const dk_context* ctx, int64_t n, size_t* bytes);
dk_status dk_divergence(const dk_context* ctx, const dk_divergence_args* args,
                        const dk_divergence_params* params, void* workspace, size_t workspace_bytes,
                        void* stream);

/* ---- Row scaling ------------------------------------------------------------------------ */
/*
 * In place: x[i, j] = round(x[i, j] * factors[i * factor_stride]), the product in f32 rounded
 * once (to nearest even) to x's dtype (as torch's x.mul_(f) for an f32 [n, 1] tensor f; the
 * factor itself is never rounded to x's dtype). factor_stride 0 applies factors[0] to every
 * row. A row whose factor is exactly 1.0f is not read or written (its bits stay, NaN payloads
 * included); every other factor (0, negative, inf, NaN) scales its row. The factors are read on
 * the device when the kernel runs: scaling a gradient by a grad_output that lives on the GPU
 * needs no host synchronisation and costs almost nothing when it is 1. Row starts need only be
 * aligned to the element size. No workspace.
 */
typedef struct dk_scale_rows_args {
  int64_t n;              /* rows, >= 0 (0: nothing to do) */
  int64_t v;              /* elements per row, >= 1 */
  void* x;                /* [n, v], scaled in place */
  int32_t dtype;          /* DK_DTYPE_* of x */
  int64_t stride;         /* elements between rows, >= v */
  const float* factors;   /* (n - 1) * factor_stride + 1 floats, disjoint from x */
  int64_t factor_stride;  /* >= 0; 0 = one factor for every row */
} dk_scale_rows_args;
dk_status dk_scale_rows(const dk_context* ctx, const dk_scale_rows_args* args, void* stream);

/* ---- MoE dispatch --------------------------------------------------------------------- */
/*
 * Route: router logits [n, e] -> top-k experts per token, their weights, and a deterministic
 * permutation into expert-major order (expert, then token, then slot). Permute gathers token
 * rows into that order, combine writes each token's weighted sum of its k expert rows (no
 * atomics: bitwise reproducible), slot_dot gives the per-slot dot products the backward passes
 * need. Backward of permute = combine (weighted by the weights when permute scaled, plus
 * slot_dot for the weights' gradient); backward of combine = permute (scaled by the weights)
 * for the expert rows and slot_dot for the weights. dk_moe_permute_backward and
 * dk_moe_combine_backward compute each pair in one call, bit for bit the same results (on CUDA
 * one kernel reads the shared operand's rows once for both outputs).
 *
 * Selection: a higher selection score (score + bias) first, equal scores to the lower expert
 * (group) index; a NaN selection score ranks below every number. Sigmoid with no bias and no
 * group left out compares the logits (the exact scores' order: f32 scores saturate at 1 from
 * logits of ~17 and would tie). A token whose logits are all -inf has NaN softmax scores (0/0):
 * experts 0..k-1, NaN weights; under sigmoid weights 0 (NaN when renormalised: 0/0), experts
 * chosen by the bias alone. Such a token still takes rows of those experts (counts, capacity):
 * leave padding tokens out rather than mask them. Renormalised weights are exact ratios even
 * where the chosen scores underflow (a sigmoid of -100, a softmax probability far below the
 * token's best): finite logits give finite weights. Activations (permute, combine,
 * slot_dot and the backward calls): h a multiple of 8 in 8..16384, every row start 16-byte
 * aligned (base pointer and stride * element size multiples of 16), on every backend. Index
 * contents (perm, position): an entry outside -1..limit is an error (DK_ERR_INVALID_ARGUMENT,
 * nothing written) on the CPU and is treated as -1 on CUDA, which cannot read them before
 * launching.
 */

/* Score functions (dk_moe_route_params.score). */
#define DK_MOE_SOFTMAX 0
#define DK_MOE_SIGMOID 1

typedef struct dk_moe_route_params {
  int32_t k;           /* experts per token, 1 <= k <= e (and k <= 32) */
  int32_t score;       /* DK_MOE_SOFTMAX (over the e logits) or DK_MOE_SIGMOID */
  int32_t renormalize; /* 1: the k weights are divided by their sum */
  int32_t n_groups;    /* e experts in n_groups contiguous groups (1 = no grouping); it must
                          divide e, with at least 2 experts per group when > 1 */
  int32_t topk_groups; /* groups kept (1..n_groups), ranked by the sum of their top-2 selection
                          scores; k <= topk_groups * e / n_groups */
  float scale;         /* weights are multiplied by it (after renormalisation); finite */
  int64_t capacity;    /* tokens per expert, later tokens dropped in token order; 0 = unlimited,
                          < 0 invalid */
  int32_t block;       /* each expert's segment padded to a multiple of it (>= 1) */
} dk_moe_route_params;

typedef struct dk_moe_route_args {
  int64_t n;              /* tokens, >= 0 (0: counts, offsets 0, perm all -1) */
  int32_t e;              /* experts, 1..1024 */
  const void* logits;     /* [n, e] router logits */
  int32_t logits_dtype;   /* DK_DTYPE_F32 or DK_DTYPE_BF16 */
  int64_t logits_stride;  /* elements between rows, >= e */
  const float* bias;      /* [e] added to the scores for selection only, or NULL */
  int32_t* expert_ids;    /* [n, k] out: by descending selection score, ties to the lower id */
  float* weights;         /* [n, k] out: unbiased scores of the chosen experts (renorm, scale) */
  int32_t* counts;        /* [e] out: tokens per expert after drops */
  int32_t* offsets;       /* [e + 1] out: segment starts in the permuted rows (padded); R = offsets[e] */
  int32_t* perm;          /* [perm_rows] out: flat index n*k + j held by each permuted row, -1 = padding */
  int64_t perm_rows;      /* >= dk_moe_max_rows(n, e, k, block, capacity); rows past R are -1 */
  int32_t* position;      /* [n, k] out: permuted row of (n, j), -1 if dropped */
} dk_moe_route_args;

/* Upper bound on R = offsets[e]: K + min(e, K)*(block-1) with K = min(n*k, e*capacity) the slots
 * kept (capacity 0 = unlimited; only experts that receive a slot are padded).
 * -1 on bad arguments (n < 0; e, k or block < 1; capacity < 0) or int64 overflow. */
int64_t dk_moe_max_rows(int64_t n, int32_t e, int32_t k, int32_t block, int64_t capacity);
/* Defaults: k = 1, softmax, no renormalisation, 1 group, scale 1, no capacity, block 1. */
dk_moe_route_params dk_moe_route_params_default(void);
/* Scratch of dk_moe_route (0 on the CPU); a workspace given must be 4-byte aligned. Checks n, e
   and k as dk_moe_route does, with the same status. */
dk_status dk_moe_route_workspace_size(const dk_context* ctx, int64_t n, int32_t e, int32_t k,
                                      size_t* bytes);
dk_status dk_moe_route(const dk_context* ctx, const dk_moe_route_args* args,
                       const dk_moe_route_params* params, void* workspace, size_t workspace_bytes,
                       void* stream);

/* out[r] = x[perm[r] / k] (times weights[perm[r]] when weights != NULL), 0 where perm[r] = -1. */
typedef struct dk_moe_permute_args {
  int64_t n;             /* tokens, >= 0 (0: every perm entry is -1, the rows become 0) */
  int64_t h;             /* hidden size, a multiple of 8 */
  int32_t k;             /* slots per token, 1..32 */
  int64_t rows;          /* permuted rows (entries of perm), >= 0 */
  int32_t dtype;         /* DK_DTYPE_* of x and out */
  const void* x;         /* [n, h] */
  int64_t x_stride;      /* >= h */
  const int32_t* perm;   /* [rows], from dk_moe_route */
  const float* weights;  /* [n, k] or NULL (no scaling) */
  void* out;             /* [rows, h] */
  int64_t out_stride;    /* >= h */
} dk_moe_permute_args;
/* Scratch of dk_moe_permute: 0 on the CPU and for k = 1 or n = 0; on CUDA for k > 1,
   4 * (n * k + 1) bytes (4-byte aligned; NULL lets the library allocate it on the stream). A
   workspace given is checked (device, size, alignment) even where the call needs none (on a
   CUDA context). Checks n and k as dk_moe_permute does, with the same status. */
dk_status dk_moe_permute_workspace_size(const dk_context* ctx, int64_t n, int32_t k,
                                        size_t* bytes);
dk_status dk_moe_permute(const dk_context* ctx, const dk_moe_permute_args* args, void* workspace,
                         size_t workspace_bytes, void* stream);

/* y[t] = sum over j of weights[t, j] * rows[position[t, j]] (weights NULL: unweighted), slots
 * with position -1 skipped, accumulated in slot order (in f32 on CUDA, f64 on the CPU reference)
 * and rounded once to the dtype. */
typedef struct dk_moe_combine_args {
  int64_t n;                 /* tokens, >= 0 (0: nothing to write) */
  int64_t h;                 /* hidden size, a multiple of 8 */
  int32_t k;                 /* slots per token, 1..32 */
  int64_t rows;              /* rows of the permuted buffer (>= 1 when n > 0) */
  int32_t dtype;             /* DK_DTYPE_* of rows and y */
  const void* rows_in;       /* [rows, h] expert outputs (or gradients) in permuted order */
  int64_t rows_stride;       /* >= h */
  const int32_t* position;   /* [n, k], from dk_moe_route */
  const float* weights;      /* [n, k] or NULL */
  void* y;                   /* [n, h] */
  int64_t y_stride;          /* >= h */
} dk_moe_combine_args;
dk_status dk_moe_combine(const dk_context* ctx, const dk_moe_combine_args* args, void* stream);

/* out[t, j] = dot(tokens[t], rows[position[t, j]]), summed in f32 on CUDA (f64 on the CPU
 * reference), 0 where position is -1. */
typedef struct dk_moe_slot_dot_args {
  int64_t n;                 /* tokens, >= 0 (0: nothing to write) */
  int64_t h;                 /* hidden size, a multiple of 8 */
  int32_t k;                 /* slots per token, 1..32 */
  int64_t rows;              /* rows of the permuted buffer (>= 1 when n > 0) */
  int32_t dtype;             /* DK_DTYPE_* of both inputs */
  const void* tokens;        /* [n, h] */
  int64_t tokens_stride;     /* >= h */
  const void* rows_in;       /* [rows, h] */
  int64_t rows_stride;       /* >= h */
  const int32_t* position;   /* [n, k] */
  float* out;                /* [n, k] */
} dk_moe_slot_dot_args;
dk_status dk_moe_slot_dot(const dk_context* ctx, const dk_moe_slot_dot_args* args, void* stream);

/* The gradients of dk_moe_permute from grad_xp = d(loss)/d(out), in one call:
 *   grad_x[t] = sum over j of w[t, j] * grad_xp[position[t, j]], w = weights (the forward
 *     scaled) or 1 (weights NULL), slots with position -1 skipped: dk_moe_combine's result with
 *     rows_in = grad_xp, bit for bit;
 *   grad_weights[t, j] = dot(x[t], grad_xp[position[t, j]]), 0 where position is -1:
 *     dk_moe_slot_dot's result with tokens = x, rows_in = grad_xp, bit for bit.
 * x and grad_weights are given together (the weights' gradient) or both NULL (grad_x only);
 * one without the other is DK_ERR_INVALID_ARGUMENT. Each operand is checked as in those two
 * calls, with the same statuses; the outputs may not overlap each other or any input. No
 * workspace. */
typedef struct dk_moe_permute_backward_args {
  int64_t n;                 /* tokens, >= 0 (0: nothing to write) */
  int64_t h;                 /* hidden size, a multiple of 8 */
  int32_t k;                 /* slots per token, 1..32 */
  int64_t rows;              /* rows of grad_xp (>= 1 when n > 0) */
  int32_t dtype;             /* DK_DTYPE_* of grad_xp, x and grad_x */
  const void* grad_xp;       /* [rows, h] gradient of dk_moe_permute's out */
  int64_t grad_xp_stride;    /* >= h */
  const int32_t* position;   /* [n, k], from dk_moe_route */
  const float* weights;      /* [n, k] the forward scaled by, or NULL (it did not scale) */
  const void* x;             /* [n, h] the forward's input, or NULL (needed for grad_weights) */
  int64_t x_stride;          /* >= h; ignored when x is NULL */
  void* grad_x;              /* [n, h] out */
  int64_t grad_x_stride;     /* >= h */
  float* grad_weights;       /* [n, k] out, or NULL (not computed) */
} dk_moe_permute_backward_args;
dk_status dk_moe_permute_backward(const dk_context* ctx, const dk_moe_permute_backward_args* args,
                                  void* stream);

/* The gradients of dk_moe_combine from grad_y = d(loss)/d(y), in one call:
 *   grad_expert_out[r] = w[perm[r]] * grad_y[perm[r] / k], w = weights (a weighted combine) or
 *     1 (weights NULL), 0 where perm[r] = -1: dk_moe_permute's result with x = grad_y, bit for
 *     bit;
 *   grad_weights[t, j] = dot(grad_y[t], expert_out[position[t, j]]), 0 where position is -1:
 *     dk_moe_slot_dot's result with tokens = grad_y, rows_in = expert_out, bit for bit.
 * expert_out and grad_weights are given together or both NULL (one without the other is
 * DK_ERR_INVALID_ARGUMENT). perm and position come from the same dk_moe_route: on CUDA each row
 * of grad_y is then read once for all its slots and both outputs (any other pair still gives
 * the two calls' results). Each operand is checked as in those two calls, with the same
 * statuses; the outputs may not overlap each other or any input. No workspace argument: with
 * grad_weights CUDA needs none; without it the call is dk_moe_permute, whose scratch (k > 1 on
 * CUDA) the library then allocates on the stream. */
typedef struct dk_moe_combine_backward_args {
  int64_t n;                       /* tokens, >= 0 (0: the rows of grad_expert_out become 0) */
  int64_t h;                       /* hidden size, a multiple of 8 */
  int32_t k;                       /* slots per token, 1..32 */
  int64_t rows;                    /* permuted rows: entries of perm, rows of grad_expert_out
                                      and expert_out (R, or a buffer of up to dk_moe_max_rows
                                      rows whose perm entries past R are -1); >= 1 when n > 0
                                      and grad_weights is given */
  int32_t dtype;                   /* DK_DTYPE_* of grad_y, expert_out and grad_expert_out */
  const void* grad_y;              /* [n, h] gradient of dk_moe_combine's y */
  int64_t grad_y_stride;           /* >= h */
  const void* expert_out;          /* [rows, h] the forward's rows, or NULL (needed for
                                      grad_weights) */
  int64_t expert_out_stride;       /* >= h; ignored when expert_out is NULL */
  const int32_t* perm;             /* [rows], from dk_moe_route */
  const int32_t* position;         /* [n, k], from the same dk_moe_route */
  const float* weights;            /* [n, k] of a weighted combine, or NULL (unweighted) */
  void* grad_expert_out;           /* [rows, h] out */
  int64_t grad_expert_out_stride;  /* >= h */
  float* grad_weights;             /* [n, k] out, or NULL (not computed) */
} dk_moe_combine_backward_args;
dk_status dk_moe_combine_backward(const dk_context* ctx, const dk_moe_combine_backward_args* args,
                                  void* stream);

/* ---- Fused linear divergence ------------------------------------------------------------ */
/*
 * The divergence of dk_divergence computed straight from hidden states and lm_head weights:
 * student logits = student_hidden @ student_weight^T, teacher logits = teacher_hidden @
 * teacher_weight^T, both multiplied by logit_scale and then soft-capped
 * (softcap * tanh(z / softcap)) when softcap > 0. Rows are processed in chunks, so extra device
 * memory is O(chunk_rows * v), never O(n * v); the logits never exist whole. (The CPU context
 * is an f64 reference for small shapes: it widens the inputs and the weight gradient to f64.) Outputs: the loss, per-row
 * losses, and the gradients of the reduced loss w.r.t. student_hidden and student_weight (the
 * teacher gets none). With accumulate = 1 the gradients are added to the buffers' contents
 * (gradient accumulation across micro-batches).
 */
typedef struct dk_fused_linear_params {
  dk_divergence_params divergence; /* kind, beta, temperature, reduction, ignore_index, num_items */
  float logit_scale;               /* logits multiplied by it (finite, > 0; 1 = none) */
  float softcap;                   /* > 0: logits = softcap * tanh(logits / softcap); 0 = none */
  int64_t chunk_rows;              /* rows per chunk, >= 1; 0 = chosen from v and h */
  int32_t accumulate;              /* 1: add into grad_hidden / grad_weight instead of overwriting */
} dk_fused_linear_params;

typedef struct dk_fused_linear_args {
  int64_t n;                     /* rows (tokens), >= 0 (0: *loss = 0, grad_weight = 0 unless accumulating) */
  int64_t v;                     /* vocabulary size (student and teacher), 1 ..= 2^31 - 2^16 */
  int64_t h;                     /* student hidden size, >= 1 */
  int64_t ht;                    /* teacher hidden size, >= 1 */
  int32_t dtype;                 /* DK_DTYPE_* of all four inputs (bf16, f16 or f32) */
  const void* student_hidden;    /* [n, h] */
  int64_t student_hidden_stride; /* >= h */
  const void* student_weight;    /* [v, h] */
  int64_t student_weight_stride; /* >= h */
  const void* teacher_hidden;    /* [n, ht] */
  int64_t teacher_hidden_stride; /* >= ht */
  const void* teacher_weight;    /* [v, ht]; may be the student's (self-distillation) */
  int64_t teacher_weight_stride; /* >= ht */
  const int64_t* labels;         /* [n] or NULL */
  float* loss;                   /* 1 float or NULL */
  float* per_token;              /* [n] or NULL */
  void* grad_hidden;             /* [n, h] d(loss)/d(student_hidden) or NULL */
  int32_t grad_hidden_dtype;     /* the input dtype, or DK_DTYPE_F32 */
  int64_t grad_hidden_stride;    /* >= h */
  void* grad_weight;             /* [v, h] d(loss)/d(student_weight) or NULL */
  int32_t grad_weight_dtype;     /* the input dtype, or DK_DTYPE_F32 (f32 accumulation) */
  int64_t grad_weight_stride;    /* >= h */
  const float* num_items;        /* NULL, or batchmean's divisor in memory: as dk_divergence_args */
} dk_fused_linear_args;

/* Defaults: the divergence defaults, logit_scale 1, no softcap, automatic chunks, overwrite. */
dk_fused_linear_params dk_fused_linear_params_default(void);
/* Checks the call as dk_fused_linear_divergence does (same statuses: pass the real pointers),
   then writes the bytes of scratch it needs to *bytes. */
dk_status dk_fused_linear_workspace_size(const dk_context* ctx, const dk_fused_linear_args* args,
                                         const dk_fused_linear_params* params, size_t* bytes);
dk_status dk_fused_linear_divergence(const dk_context* ctx, const dk_fused_linear_args* args,
                                     const dk_fused_linear_params* params, void* workspace,
                                     size_t workspace_bytes, void* stream);

/* ---- Grouped-query attention ----------------------------------------------------------- */

/*
 * FlashAttention layout: every operand is token rows. q / out / dout / dq are [rows_q, heads_q *
 * head_dim], k / v / dk / dv [rows_k, heads_kv * head_dim]; inside a row, head h occupies elements
 * h * head_dim .. (h + 1) * head_dim. Strides are elements between token rows (>= the row length;
 * base pointers and strides * element size must be multiples of 16 bytes). Query head h reads KV
 * head h / (heads_q / heads_kv). A query row that sees no key outputs 0 with lse = -inf.
 *
 * Padded batch (cu_seqlens_q == cu_seqlens_k == NULL): batch sequences of seqlen_q queries and
 * seqlen_k keys; rows_q = batch * seqlen_q (row b * seqlen_q + s), rows_k = batch * seqlen_k;
 * lse is [batch, heads_q, seqlen_q].
 * Varlen batch (both non-NULL, [batch + 1] int32 each, starting at 0, non-decreasing, ending at
 * rows_q / rows_k): sequence b holds query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1]; seqlen_q /
 * seqlen_k are then upper bounds on the longest sequences (they size the CUDA grid; at most
 * INT32_MAX, and batch * seqlen must cover rows_q / rows_k, checked on every context); lse is
 * [heads_q, rows_q]. On a CUDA context the offsets are device memory read only by the kernels
 * (not checked; out-of-range entries are clamped so memory stays safe, and the rows of a
 * sequence longer than its seqlen bound past that bound are left unwritten: the CPU context
 * refuses such a bound with DK_ERR_SHAPE). Exactly one of the two
 * offset pointers NULL is DK_ERR_INVALID_ARGUMENT; a negative count or stride, heads_q or
 * heads_kv of 0, heads_q not a multiple of heads_kv, or a head_dim other than 64 and 128 is
 * DK_ERR_SHAPE; causal and deterministic other than 0 or 1 are DK_ERR_INVALID_ARGUMENT.
 * Also DK_ERR_INVALID_ARGUMENT: a base pointer or stride that breaks the 16-byte rule, a
 * softmax_scale that is not > 0 and at most 2.3586574e38, the last float whose product with
 * log2(e) is finite (0 and -0 select 1 / sqrt(head_dim)). DK_ERR_SHAPE:
 * outputs overlapping inputs or each other; offsets that break the rules above on the CPU
 * context (which reads them).
 */
typedef struct dk_attention_params {
  int64_t heads_q;       /* >= 1, a multiple of heads_kv */
  int64_t heads_kv;      /* >= 1 */
  int64_t head_dim;      /* 64 or 128 */
  int32_t causal;        /* 1: query i sees keys j <= i + Sk - Sq (bottom-right), per sequence */
  float softmax_scale;   /* 0: 1 / sqrt(head_dim); else > 0 and <= 2.3586574e38 */
  int32_t deterministic; /* backward: 1 = bitwise reproducible dq / dk / dv (no float atomics);
                            0 = dq summed by f32 atomics on CUDA (faster, last bits vary from run
                            to run; dk / dv still reproducible; needs a larger workspace) */
} dk_attention_params;

typedef struct dk_attention_batch {
  int64_t batch;               /* sequences B, >= 0 */
  int64_t seqlen_q;            /* padded: queries per sequence; varlen: bound on the longest */
  int64_t seqlen_k;            /* padded: keys per sequence; varlen: bound on the longest */
  const int32_t* cu_seqlens_q; /* NULL (padded) or [batch + 1] */
  const int32_t* cu_seqlens_k; /* NULL (padded) or [batch + 1] */
  int64_t rows_q;              /* varlen: rows of q (= cu_seqlens_q[batch]); padded: ignored */
  int64_t rows_k;              /* varlen: rows of k (= cu_seqlens_k[batch]); padded: ignored */
} dk_attention_batch;

typedef struct dk_attention_args {
  dk_attention_batch batch;
  int32_t dtype;      /* DK_DTYPE_BF16 or DK_DTYPE_F16 (DK_DTYPE_F32 on the CPU context only) */
  const void* q;      /* [rows_q, heads_q * head_dim] */
  int64_t q_stride;
  const void* k;      /* [rows_k, heads_kv * head_dim] */
  int64_t k_stride;
  const void* v;      /* [rows_k, heads_kv * head_dim] */
  int64_t v_stride;
  void* out;          /* out [rows_q, heads_q * head_dim], dtype */
  int64_t out_stride;
  float* lse;         /* out, f32: [batch, heads_q, seqlen_q] (padded) or [heads_q, rows_q] */
} dk_attention_args;

typedef struct dk_attention_backward_args {
  dk_attention_batch batch;
  int32_t dtype;      /* of every tensor operand below (lse is f32) */
  const void* dout;   /* d(loss)/d(out), [rows_q, heads_q * head_dim] */
  int64_t dout_stride;
  const void* q;
  int64_t q_stride;
  const void* k;
  int64_t k_stride;
  const void* v;
  int64_t v_stride;
  const void* out;    /* out of the forward call */
  int64_t out_stride;
  const float* lse;   /* lse of the forward call */
  void* dq;           /* out [rows_q, heads_q * head_dim] */
  int64_t dq_stride;
  void* dk;           /* out [rows_k, heads_kv * head_dim], summed over the query group */
  int64_t dk_stride;
  void* dv;           /* out [rows_k, heads_kv * head_dim] */
  int64_t dv_stride;
} dk_attention_backward_args;

/* heads_q = heads_kv = 1, head_dim = 128, not causal, default scale, deterministic. */
dk_attention_params dk_attention_params_default(void);
/* out and lse. Needs no workspace. */
dk_status dk_attention_forward(const dk_context* ctx, const dk_attention_args* args,
                               const dk_attention_params* params, void* stream);
/* Checks the call as dk_attention_backward does (same statuses), then writes the bytes of
   scratch it needs: 0 on the CPU context; on CUDA f32 Delta for heads_q * rows_q rows and, with
   deterministic = 0 where the device's kernels sum dq with atomics, the f32 dq accumulator
   [rows_q, heads_q * head_dim] after it (none on compute capability 9.0, whose default kernels
   serve both modes deterministically; DK_ATTENTION_BWD can choose otherwise). */
dk_status dk_attention_backward_workspace_size(const dk_context* ctx,
                                               const dk_attention_backward_args* args,
                                               const dk_attention_params* params, size_t* bytes);
/* dq, dk, dv. */
dk_status dk_attention_backward(const dk_context* ctx, const dk_attention_backward_args* args,
                                const dk_attention_params* params, void* workspace,
                                size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* DISTILL_KERNELS_H */
