// Arguments of the attention backward kernels (cuda/attention_backward.cu), passed by value to
// each of its kernels (Delta preprocess, dK/dV, dQ; or, in the atomic-dQ mode, Delta, dK/dV with
// dQ accumulation, dQ conversion). Plain C so the Rust mirror
// (`AttentionBwdArgs` in src/attention/cuda/backward.rs) can be checked against it by
// capi/src/tests/abi_layout.rs.
#ifndef DK_ATTENTION_BWD_ARGS_H
#define DK_ATTENTION_BWD_ARGS_H

#include <stdint.h>

#include "dk_attention_shape.h"

typedef struct DkAttentionBwdArgs {
  DkAttentionShape shape;  // sequences, heads, mask, scale
  uint64_t dout;           // const T*  [total_q, heads_q * D], dout_stride
  uint64_t q;              // const T*  [total_q, heads_q * D], q_stride
  uint64_t k;              // const T*  [total_k, heads_kv * D], k_stride
  uint64_t v;              // const T*  [total_k, heads_kv * D], v_stride
  uint64_t out;            // const T*  [total_q, heads_q * D], out_stride
  uint64_t lse;            // const float*, natural log; [batch, heads_q, seqlen_q] or [heads_q, total_q]
  uint64_t delta;          // float* workspace laid out like lse: rowsum(dout * out) per (row, head)
  uint64_t dq;             // T*  [total_q, heads_q * D], dq_stride
  uint64_t dk;             // T*  [total_k, heads_kv * D], dk_stride
  uint64_t dv;             // T*  [total_k, heads_kv * D], dv_stride
  int64_t dout_stride;     // elements between token rows (all strides)
  int64_t q_stride;
  int64_t k_stride;
  int64_t v_stride;
  int64_t out_stride;
  int64_t dq_stride;
  int64_t dk_stride;
  int64_t dv_stride;
  uint64_t dq_accum;       // float* workspace [total_q, heads_q * D] (atomic-dQ mode), else 0
} DkAttentionBwdArgs;

#endif
