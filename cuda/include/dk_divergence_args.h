// Arguments of the divergence kernels, passed by value. Plain C so the Rust mirror
// (`DivergenceArgs` in src/divergence/cuda.rs) can be checked against it:
// capi/src/tests/abi_layout.rs compiles this header with the host C compiler and compares sizes and offsets.
#ifndef DK_DIVERGENCE_ARGS_H
#define DK_DIVERGENCE_ARGS_H

#include <stdint.h>

typedef struct DkDivergenceArgs {
  uint64_t student;        // const TS*, row-major [n, v] with student_stride
  uint64_t teacher;        // const TT*, [n, v] with teacher_stride
  uint64_t grad;           // TS*, [n, v] with grad_stride; 0 = forward only (may equal student)
  uint64_t labels;         // const int64_t* [n]; 0 = no labels
  uint64_t per_row;        // float* [n]: per-row loss (always set: caller's buffer or workspace)
  uint64_t scale;          // const float*: d(reduced loss)/d(row loss), written by dk_div_prepare
  int64_t n;
  int64_t v;
  int64_t student_stride;  // elements
  int64_t teacher_stride;
  int64_t grad_stride;
  int64_t ignore_index;
  float beta;              // jsd only, strictly inside (0, 1)
  float inv_temperature;
  uint32_t options;        // DK_ARGS_* bits below (0 for every other kernel)
} DkDivergenceArgs;

// The staged JSD kernels (cuda/divergence_staged.cu) keep each entry's log2(q/m) from the
// mixture pass for the gradient pass, over the teacher's slice when it is f32, else in a slice
// of their own after the row buffers (src/divergence/cluster.rs sizes it): one exponential and
// one logarithm fewer per element in the gradient pass.
#define DK_ARGS_STASH_JSD 1u
// With DK_ARGS_STASH_JSD, the statistics pass of the staged JSD kernels also keeps each entry's
// 2^X and 2^Y (relative to the thread's maxima) in two f32 slices after the row buffers (8 bytes
// per slice element, log2(q/m) then over the first): no MUFU operation for p and q in the
// mixture pass, none in the gradient pass (cuda/DIVERGENCE.md, version 11).
#define DK_ARGS_STASH_JSD_EXP 2u

// Reduction codes shared with the C ABI (dk_reduction).
#define DK_ARGS_REDUCTION_BATCHMEAN 0
#define DK_ARGS_REDUCTION_SUM 1
#define DK_ARGS_REDUCTION_NONE 2

#endif
