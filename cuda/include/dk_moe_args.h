// Arguments of the MoE kernels (cuda/moe.cu), passed by value. Plain C so the Rust mirrors
// (`MoeRouteArgs` / `MoeRowsArgs` in src/moe/cuda.rs) can be checked against it with the host C
// compiler (field offsets: `moe_args_layout()`).
#ifndef DK_MOE_ARGS_H
#define DK_MOE_ARGS_H

#include <stdint.h>

// Score functions (same codes as DK_MOE_SOFTMAX / DK_MOE_SIGMOID in distill_kernels.h).
#define DK_MOE_ARGS_SOFTMAX 0
#define DK_MOE_ARGS_SIGMOID 1

// Tokens per chunk of the counting pass: one 32-bit mask per (expert, chunk).
#define DK_MOE_CHUNK 32

// Every route kernel (top-k, scan, assign) takes the same struct.
typedef struct DkMoeRouteArgs {
  uint64_t logits;        // const T* [n, e] with logits_stride (T = float or bf16)
  uint64_t bias;          // const float* [e], 0 = none (selection only)
  uint64_t expert_ids;    // int32_t* [n * k]
  uint64_t weights;       // float* [n * k]
  uint64_t counts;        // int32_t* [e]: kept tokens per expert (written by the scan)
  uint64_t offsets;       // int32_t* [e + 1]
  uint64_t perm;          // int32_t* [perm_rows]
  uint64_t position;      // int32_t* [n * k]: in-chunk rank after top-k, the row after assign
  uint64_t chunk_counts;  // int32_t* [e * chunks] workspace: per (expert, chunk) count -> base
  int64_t n;              // tokens
  int64_t logits_stride;  // elements between rows
  int64_t perm_rows;      // entries of perm (all written)
  int32_t e;              // experts, 1..1024
  int32_t k;              // experts per token, 1..min(e, 32)
  int32_t score;          // DK_MOE_ARGS_SOFTMAX / DK_MOE_ARGS_SIGMOID
  int32_t renormalize;    // 1: weights divided by their sum
  int32_t n_groups;       // contiguous expert groups (1 = no grouping)
  int32_t topk_groups;    // groups kept
  int32_t capacity;       // tokens kept per expert (INT32_MAX = unlimited)
  int32_t block;          // segment padding multiple, >= 1
  int32_t chunks;         // ceil(n / DK_MOE_CHUNK)
  float scale;            // weights multiplied by it (after renormalisation)
} DkMoeRouteArgs;

// Permute, combine, slot-dot and the fused backward kernels take the same struct; the fields
// mean:
//   permute:     src = x [n, h], index = perm [items], weights = [n * k] or 0,
//                dst = out [items, h]; items = permuted rows.
//   combine:     src = rows [rows, h], index = position [n * k], weights = [n * k] or 0,
//                dst = y [n, h]; items = n.
//   slot_dot:    src = tokens [n, h], src2 = rows [rows, h], index = position [n * k],
//                dst = out (float) [n * k]; items = n * k.
//   combine_dot: combine's fields, plus src2 = x [n, h] and dst2 = dots (float) [n * k]: the
//                backward of a scaled permute (grad_x and the weights' gradient).
//   permute_dot: src = tokens [n, h], src2 = other rows [rows, h] or 0, index = position
//                [n * k], index2 = perm [rows], weights = [n * k] or 0, dst = out [rows, h],
//                dst2 = dots (float) [n * k] or 0; items = n: the backward of a combine.
// `limit` bounds the indices read from `index`: n * k for perm entries (permute), the rows of
// the permuted buffer for positions (the others). An index outside [0, limit) is treated as -1
// (a zero row, a skipped slot, a zero dot product) instead of being dereferenced.
// Row starts are 16-byte aligned (checked on the host): h % 8 == 0, every stride a multiple of
// 16 bytes, every base pointer 16-byte aligned. The pointer fields come first (the kernel
// emulator of the tests patches them).
typedef struct DkMoeRowsArgs {
  uint64_t src;
  uint64_t src2;
  uint64_t index;
  uint64_t index2;
  uint64_t weights;
  uint64_t dst;
  uint64_t dst2;
  int64_t items;
  int64_t h;
  int64_t src_stride;   // elements
  int64_t src2_stride;  // elements
  int64_t dst_stride;   // elements
  int32_t k;
  int32_t limit;
} DkMoeRowsArgs;

#endif
