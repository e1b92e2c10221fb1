// Sequence structure and head layout shared by the attention kernels' argument structs
// (dk_attention_fwd_args.h, dk_attention_bwd_args.h). Plain C so the Rust mirrors can be checked
// against it by capi/src/tests/abi_layout.rs.
#ifndef DK_ATTENTION_SHAPE_H
#define DK_ATTENTION_SHAPE_H

#include <stdint.h>

typedef struct DkAttentionShape {
  uint64_t cu_seqlens_q;  // const int32_t* [batch + 1]; 0 = padded layout
  uint64_t cu_seqlens_k;  // const int32_t* [batch + 1]; 0 = padded layout
  int32_t batch;          // sequences
  int32_t seqlen_q;       // padded: queries per sequence; varlen: bound on the longest
  int32_t seqlen_k;       // padded: keys per sequence; varlen: bound on the longest
  int32_t total_q;        // rows of q (padded: batch * seqlen_q)
  int32_t total_k;        // rows of k
  int32_t heads_q;
  int32_t heads_kv;
  int32_t causal;         // bottom-right aligned, per sequence
  float scale;            // softmax scale applied to q.k
  float scale_log2;       // scale * log2(e): scores go through exp2
} DkAttentionShape;

#endif
