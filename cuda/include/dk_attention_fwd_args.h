// Arguments of the attention forward kernels (cuda/attention_forward.cu), passed by value. Plain
// C so the Rust mirror (`AttentionFwdArgs` in src/attention/cuda/forward.rs) can be checked
// against it (capi/src/tests/abi_layout.rs compiles the headers with the host C compiler).
#ifndef DK_ATTENTION_FWD_ARGS_H
#define DK_ATTENTION_FWD_ARGS_H

#include <stdint.h>

#include "dk_attention_shape.h"

typedef struct DkAttentionFwdArgs {
  DkAttentionShape shape;
  uint64_t q;          // const T* [total_q, heads_q * D], token stride q_stride
  uint64_t k;          // const T* [total_k, heads_kv * D], token stride k_stride
  uint64_t v;          // const T* [total_k, heads_kv * D], token stride v_stride
  uint64_t out;        // T* [total_q, heads_q * D], token stride out_stride
  uint64_t lse;        // float*: [batch, heads_q, seqlen_q] (padded) or [heads_q, total_q] (varlen)
  int64_t q_stride;    // elements between token rows (row starts 16-byte aligned)
  int64_t k_stride;
  int64_t v_stride;
  int64_t out_stride;
  int32_t head_offset;   // query head of blockIdx.y = 0 (grids are split into launches of at
  int32_t batch_offset;  // most 65535 heads × 65535 sequences); sequence of blockIdx.z = 0
} DkAttentionFwdArgs;

#endif
