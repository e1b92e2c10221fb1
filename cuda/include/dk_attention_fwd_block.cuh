// The part of the attention forward kernels' block set-up that every variant shares
// (cuda/attention_forward.cu, cuda/attention_forward_wgmma.cu): which (query tile, head,
// sequence) a block owns, its operands' rows, the causal key limits, the range of key tiles and,
// for the mma.sync kernels, the prologue's and the key loop's cp.async loads.
#pragma once

#include <stdint.h>

#include "dk_attention_fwd_args.h"
#include "dk_attention_tile.cuh"
#include "dk_mma.cuh"

namespace dk {
namespace attn_fwd {

template <bool B> struct BoolTag {
  static constexpr bool value = B;
};

// min(k_len, x) for x computed in 64 bits (x may exceed the int range only above k_len).
__device__ __forceinline__ int key_limit(int k_len, int64_t x) {
  return x < k_len ? static_cast<int>(x) : k_len;
}

// min(k_len, lim + off) for lim <= k_len and off >= 0, without overflow: a row `off` below one
// whose limit is lim. Only the causal mask calls it, where the limits grow by one per row.
__device__ __forceinline__ int row_limit(int k_len, int lim, int off) {
  return min(k_len - off, lim) + off;
}

// What the forward kernels share: the block's (query tile, head, sequence) — x = query tile,
// last first (the most keys under a causal mask); y = query head (consecutive heads share a KV
// head); z = sequence — its rows, the operands' rows, the key limits, the range of key tiles,
// and the prologue's loads.
template <typename T, int D, int kBlockM, int kN>
struct FwdBlock {
  attn::SeqRows seq;
  int h, b, m0, q_rows, hk;
  const T* q;  // row m0 of the sequence, head h
  const T* k;  // row 0 of the sequence, KV head hk
  const T* v;
  // Key limits (exclusive): query row i of the sequence sees keys j < limit(i), where
  // limit(i) = k_len, or min(k_len, i + 1 + k_len − q_len) with the causal mask. lim_lo is the
  // limit of the block's first row (the smallest), lim_hi that of its last valid row, lim_g that
  // of the thread's first row (`row_g` of the block; rows + 8, + 16, ... follow).
  int lim_lo, lim_hi, lim_g;
  // Tiles 0 .. n_tiles hold keys some row sees; tiles below n_full need no mask.
  int n_tiles, n_full;

  // False when the block is past its sequence's end (varlen).
  __device__ __forceinline__ bool init(const DkAttentionFwdArgs& a, int row_g) {
    const DkAttentionShape& s = a.shape;
    const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);
    h = a.head_offset + static_cast<int>(blockIdx.y);
    b = a.batch_offset + static_cast<int>(blockIdx.z);
    seq = attn::sequence_rows(s, b);
    m0 = m_block * kBlockM;
    if (m0 >= seq.q_len) return false;
    q_rows = min(kBlockM, seq.q_len - m0);
    hk = h / (s.heads_q / s.heads_kv);
    q = reinterpret_cast<const T*>(a.q) + static_cast<int64_t>(seq.q_start + m0) * a.q_stride +
        h * D;
    k = reinterpret_cast<const T*>(a.k) + static_cast<int64_t>(seq.k_start) * a.k_stride + hk * D;
    v = reinterpret_cast<const T*>(a.v) + static_cast<int64_t>(seq.k_start) * a.v_stride + hk * D;
    const int64_t diag1 = static_cast<int64_t>(seq.k_len) - seq.q_len + 1;
    lim_lo = lim_hi = lim_g = seq.k_len;
    if (s.causal) {
      lim_lo = key_limit(seq.k_len, m0 + diag1);
      lim_hi = key_limit(seq.k_len, m0 + q_rows - 1 + diag1);
      lim_g = key_limit(seq.k_len, m0 + row_g + diag1);
    }
    n_tiles = lim_hi > 0 ? (lim_hi + kN - 1) / kN : 0;
    n_full = lim_lo > 0 ? lim_lo / kN : 0;
    return true;
  }

  // Prologue: the Q tile, the first (highest) K tile, as two cp.async groups (the second
  // possibly empty: the callers' waits count on two).
  template <int kThr>
  __device__ __forceinline__ void prologue(uint32_t s_q, uint32_t s_k, const DkAttentionFwdArgs& a,
                                           int tid) const {
    attn::load_tile_async<D, kBlockM, kThr>(s_q, q, a.q_stride, q_rows, tid);
    cp_async_commit();
    if (n_tiles > 0) {
      const int n = n_tiles - 1;
      key_tile<kThr>(s_k, k, a.k_stride, n, seq.k_len - n * kN, tid);
    }
    cp_async_commit();
  }

  // Key tile n of K or V (`base`: row 0 of the sequence, KV head hk) into shared memory at s,
  // rows_valid of its rows (the others left out).
  template <int kThr>
  __device__ __forceinline__ void key_tile(uint32_t s, const T* base, int64_t stride, int n,
                                           int rows_valid, int tid) const {
    attn::load_tile_async<D, kN, kThr>(s, base + static_cast<int64_t>(n) * kN * stride, stride,
                                       rows_valid, tid);
  }

  // Start of key tile n: K(n) (and Q) landed for this thread's copies, then, after the barrier,
  // for everyone's; everyone is done with the V buffer (the previous tile's P·V): queue V(n).
  template <int kThr>
  __device__ __forceinline__ void queue_v(uint32_t s_v, int n, const DkAttentionFwdArgs& a,
                                          int tid) const {
    cp_async_wait<0>();
    __syncthreads();
    key_tile<kThr>(s_v, v, a.v_stride, n, seq.k_len - n * kN, tid);
    cp_async_commit();
  }

  // Before P·V(n): V(n) landed everywhere and everyone is done with K(n) (and Q): queue K(n − 1),
  // a full tile (it lies below the last tile, which holds key lim_hi − 1 < k_len).
  template <int kThr>
  __device__ __forceinline__ void queue_k(uint32_t s_k, int n, const DkAttentionFwdArgs& a,
                                          int tid) const {
    cp_async_wait<0>();
    __syncthreads();
    if (n > 0) key_tile<kThr>(s_k, k, a.k_stride, n - 1, kN, tid);
    cp_async_commit();
  }
};

}  // namespace attn_fwd
}  // namespace dk
