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
 *    or pass NULL to let the library allocate on the stream (cuMemAllocAsync).
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

/* Status codes. */
typedef int32_t dk_status;
#define DK_OK 0
#define DK_ERR_NULL_POINTER 1
#define DK_ERR_INVALID_ARGUMENT 2
#define DK_ERR_SHAPE 3
#define DK_ERR_UNSUPPORTED_DTYPE 4
#define DK_ERR_NO_DEVICE 5
#define DK_ERR_WRONG_DEVICE 6
#define DK_ERR_WORKSPACE_TOO_SMALL 7
#define DK_ERR_CUDA 8
#define DK_ERR_PANIC 9

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
/* Message of the last failed call on this thread ("" after a success). */
const char* dk_last_error(void);
/* Number of CUDA devices (0 when no driver is present). */
int32_t dk_cuda_device_count(void);

/* device = -1: CPU; n >= 0: CUDA device n (its primary context, the one PyTorch uses). */
dk_status dk_context_create(int32_t device, dk_context** out);
/* NULL is a no-op. */
dk_status dk_context_destroy(dk_context* ctx);
/* -1 for the CPU, else the CUDA ordinal. */
dk_status dk_context_device(const dk_context* ctx, int32_t* out);

/* ---- Token-level divergence ------------------------------------------------------------ */

typedef struct dk_divergence_params {
  int32_t kind;         /* DK_FORWARD_KL, DK_REVERSE_KL, DK_JSD */
  float beta;           /* JSD teacher weight, in [0, 1] */
  float temperature;    /* finite, > 0; logits are divided by it (gradient includes the 1/T) */
  int32_t reduction;    /* DK_REDUCTION_* */
  int64_t ignore_index; /* rows whose label equals it are skipped (default -100) */
  float num_items;      /* batchmean divisor override; 0 = count the valid rows */
} dk_divergence_params;

typedef struct dk_divergence_args {
  int64_t n;              /* rows, >= 1 */
  int64_t v;              /* vocabulary size, >= 1 */
  const void* student;    /* [n, v] logits */
  int32_t student_dtype;  /* DK_DTYPE_* (also the gradient's dtype) */
  int64_t student_stride; /* elements between rows, >= v */
  const void* teacher;    /* [n, v] logits */
  int32_t teacher_dtype;  /* DK_DTYPE_*, may differ from the student's */
  int64_t teacher_stride; /* >= v */
  const int64_t* labels;  /* [n] or NULL (every row counts) */
  float* loss;            /* 1 float or NULL */
  float* per_token;       /* [n] per-row loss or NULL */
  void* grad;             /* [n, v] d(loss)/d(student) or NULL (forward only); may equal student */
  int64_t grad_stride;    /* >= v; equal to student_stride when grad == student */
} dk_divergence_args;

/* forward KL, beta 0.5, temperature 1, batchmean, ignore_index -100, no num_items. */
dk_divergence_params dk_divergence_params_default(void);
dk_status dk_divergence_workspace_size(const dk_context* ctx, int64_t n, size_t* bytes);
dk_status dk_divergence(const dk_context* ctx, const dk_divergence_args* args,
                        const dk_divergence_params* params, void* workspace, size_t workspace_bytes,
                        void* stream);

#ifdef __cplusplus
}
#endif

#endif /* DISTILL_KERNELS_H */
