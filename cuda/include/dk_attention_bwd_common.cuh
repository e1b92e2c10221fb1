// Pieces of the attention backward kernels that more than one file uses
// (cuda/attention_backward.cu, cuda/attention_backward_wgmma.cu): sequences and their clamped
// offsets, the LSE / Delta layout, the cp.async tile loads (both shared-memory layouts), the
// dK/dV kernels' walk over the query tiles that see a key tile, and the dQ kernels' walk over a
// query tile's key tiles.
#pragma once

#include <stdint.h>

#include "dk_attention_bwd_args.h"
#include "dk_attention_tile.cuh"
#include "dk_mma.cuh"
#include "dk_wgmma.cuh"  // fence_proxy_async

namespace dk {
namespace attn_bwd {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// The LSE in base 2 as it enters the exponent; -inf (a row that sees no key) becomes +inf so
// that exp2(s - lse) = 0 for every finite or -inf s.
__device__ __forceinline__ float lse_exponent(float lse) {
  return lse == neg_inf() ? pos_inf() : lse * kLog2e;
}

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][D] tile.
template <int D> __device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// One sequence of the batch: its first row and length on each side. Varlen offsets are clamped
// into [0, total] and made non-decreasing, so any offsets give in-bounds rows.
struct Seq {
  int q_start, len_q, k_start, len_k;
};

__device__ __forceinline__ void seq_range(uint64_t cu, int b, int seqlen, int total, int& start,
                                          int& len) {
  if (cu == 0) {
    start = b * seqlen;
    len = seqlen;
  } else {
    const int* p = reinterpret_cast<const int*>(cu);
    const int a = min(max(__ldg(p + b), 0), total);
    const int e = min(max(__ldg(p + b + 1), a), total);
    start = a;
    len = e - a;
  }
}

__device__ __forceinline__ Seq seq_of(const DkAttentionShape& s, int b) {
  Seq r;
  seq_range(s.cu_seqlens_q, b, s.seqlen_q, s.total_q, r.q_start, r.len_q);
  seq_range(s.cu_seqlens_k, b, s.seqlen_k, s.total_k, r.k_start, r.len_k);
  return r;
}

// Index of (sequence b, query head h, row 0 of the sequence) in the LSE / Delta layout:
// [batch, heads_q, seqlen_q] padded, [heads_q, total_q] varlen.
__device__ __forceinline__ int64_t lse_base(const DkAttentionShape& s, int b, int h, int q_start) {
  return s.cu_seqlens_q != 0
             ? static_cast<int64_t>(h) * s.total_q + q_start
             : (static_cast<int64_t>(b) * s.heads_q + h) * s.seqlen_q;
}

__device__ __forceinline__ int cdiv(int x, int y) { return x / y + (x % y != 0 ? 1 : 0); }

// cp.async of `ROWS` rows of one head (D elements from `src`, row stride `stride`) into a
// swizzled tile; rows >= `valid` are zero-filled without reading (their source address is row
// 0, which the callers guarantee exists). Thread tid (of NT) moves chunk tid % (D / 8) of rows
// tid / (D / 8) + k * kStep: kStep is a multiple of 8, so the swizzle is the same for all k.
// kWg: the wgmma layout of dk_attention_tile.cuh (64-column halves of 128-byte rows).
template <typename T, int D, int ROWS, int NT = 128, bool kWg = false>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride, int valid, int tid) {
  constexpr int kChunks = D / 8, kStep = NT / kChunks;
  constexpr int kPitch = kWg ? 128 : D * 2;  // bytes from a row to the next
  static_assert(ROWS % kStep == 0 && kStep % 8 == 0, "tile not a multiple of the block");
  const int r0 = tid / kChunks, c = tid % kChunks;
  const uint32_t d0 = kWg ? smem_addr(dst) + attn::wg_tile_offset<ROWS>(r0, c)
                          : smem_addr(dst + swz<D>(r0, c));
  const T* s0 = src + static_cast<int64_t>(r0) * stride + c * 8;
#pragma unroll
  for (int k = 0; k < ROWS / kStep; ++k) {
    const bool ok = r0 + k * kStep < valid;
    cp_async_16(d0 + k * kStep * kPitch, ok ? s0 + static_cast<int64_t>(k * kStep) * stride : src,
                ok ? 16 : 0);
  }
}

// What the dK/dV kernels share: the block's keys (grid key tiles outermost, so the
// causal-heavy first tiles of every head start first), the query tiles that see them (causal:
// from the one holding the first query that sees key k0, to the last), and the loads of a loop
// step: the Q and dO tiles of (query head, query tile) `idx` by cp.async, their LSE and Delta
// entries (threads 0 .. 2 Br - 1, one each) by a plain load into `lse_delta`, stored to shared
// memory after the step (its latency hides behind the MMAs). Bc keys per block, Br queries per
// step, NT threads; kWg: the wgmma tile layout (and the proxy fence before each step's barrier).
template <typename T, int D, int Bc, int Br, int NT, bool kWg = false>
struct DkdvWalk {
  const DkAttentionBwdArgs& a;
  Seq sq{};
  int b = 0, hk = 0, k0 = 0, group = 0, off = 0, m_begin = 0, n_m = 0, steps = 0;
  float lse_delta = 0.f;

  __device__ __forceinline__ explicit DkdvWalk(const DkAttentionBwdArgs& args) : a(args) {}

  // False when the block is past its sequence's keys (varlen grid bound): it owns no row.
  __device__ __forceinline__ bool init() {
    const DkAttentionShape& s = a.shape;
    const unsigned bh = static_cast<unsigned>(s.batch) * static_cast<unsigned>(s.heads_kv);
    const int tile = static_cast<int>(blockIdx.x / bh);
    const int rest = static_cast<int>(blockIdx.x % bh);
    b = rest / s.heads_kv;
    hk = rest % s.heads_kv;
    sq = seq_of(s, b);
    k0 = tile * Bc;
    if (k0 >= sq.len_k) return false;
    group = s.heads_q / s.heads_kv;
    off = sq.len_k - sq.len_q;  // causal: query i sees key j iff j <= i + off
    const int i_min = s.causal ? max(0, k0 - off) : 0;
    if (i_min < sq.len_q) {
      m_begin = i_min / Br;
      n_m = cdiv(sq.len_q, Br) - m_begin;
    }
    steps = group * n_m;
    return true;
  }
  __device__ __forceinline__ int n_iter() const { return steps; }
  __device__ __forceinline__ int head(int idx) const { return hk * group + idx / n_m; }
  __device__ __forceinline__ int q0(int idx) const { return (m_begin + idx % n_m) * Br; }

  // The block's K and V rows (zero-filled past the sequence's keys).
  __device__ __forceinline__ void load_kv(T* sK, T* sV, int tid) const {
    const int64_t krow = static_cast<int64_t>(sq.k_start) + k0;
    load_rows<T, D, Bc, NT, kWg>(sK, reinterpret_cast<const T*>(a.k) + krow * a.k_stride + hk * D,
                            a.k_stride, sq.len_k - k0, tid);
    load_rows<T, D, Bc, NT, kWg>(sV, reinterpret_cast<const T*>(a.v) + krow * a.v_stride + hk * D,
                            a.v_stride, sq.len_k - k0, tid);
  }

  // Step idx's Q and dO tiles into sQ / sdO (its stage), its LSE or Delta entry into lse_delta.
  __device__ __forceinline__ void load_stage(int idx, T* sQ, T* sdO, int tid) {
    const int hq = head(idx), q = q0(idx);
    const int64_t row = static_cast<int64_t>(sq.q_start) + q;
    load_rows<T, D, Br, NT, kWg>(sQ, reinterpret_cast<const T*>(a.q) + row * a.q_stride + hq * D,
                            a.q_stride, sq.len_q - q, tid);
    load_rows<T, D, Br, NT, kWg>(sdO, reinterpret_cast<const T*>(a.dout) + row * a.dout_stride + hq * D,
                            a.dout_stride, sq.len_q - q, tid);
    if (tid < 2 * Br) {
      const bool is_delta = tid >= Br;
      const int r = is_delta ? tid - Br : tid;
      if (q + r < sq.len_q) {
        const float* glse = reinterpret_cast<const float*>(a.lse);
        const float* gdelta = reinterpret_cast<const float*>(a.delta);
        lse_delta = (is_delta ? gdelta : glse)[lse_base(a.shape, b, hq, sq.q_start) + q + r];
      } else {
        lse_delta = is_delta ? 0.f : neg_inf();  // past the end: P = 0, Delta = 0
      }
    }
  }

  // Thread tid < Br owns sLse[tid], Br <= tid < 2 Br owns sDelta[tid - Br] (of one stage).
  __device__ __forceinline__ void store_lse_delta(float* sLse, float* sDelta, int tid) const {
    if (tid < 2 * Br) (tid < Br ? sLse : sDelta)[tid % Br] = lse_delta;
  }

  // The loop's shared-memory stages: sQ, sdO [2][Br][D], sLse, sDelta [2][Br].
  struct Stages {
    T* q;
    T* dout;
    float* lse;
    float* delta;
  };

  // Before the loop: K, V and stage 0 in flight, stage 0's LSE and Delta stored.
  __device__ __forceinline__ void start(T* sK, T* sV, const Stages& st, int tid) {
    load_kv(sK, sV, tid);
    load_stage(0, st.q, st.dout, tid);
    cp_async_commit();
    store_lse_delta(st.lse, st.delta, tid);
  }

  // Start of step idx (stage idx & 1): its stage has landed for every thread and every warp is
  // done with step idx - 1 (whose stage buffers the next loads overwrite); step idx + 1's loads
  // are issued.
  __device__ __forceinline__ void begin_step(int idx, const Stages& sm, int tid) {
    sync_step();
    queue_next(idx, sm, tid);
  }
  // begin_step in two parts, so that the wgmma kernels issue their first products between them
  // (the loads then leave the barrier-to-product path): the wait, the proxy fence (kWg) and the
  // barrier ...
  __device__ __forceinline__ void sync_step() const {
    cp_async_wait<0>();
    if constexpr (kWg) fence_proxy_async();
    __syncthreads();
  }
  // ... and step idx + 1's loads into the other stage.
  __device__ __forceinline__ void queue_next(int idx, const Stages& sm, int tid) {
    if (idx + 1 < steps) {
      const int nx = (idx + 1) & 1;
      load_stage(idx + 1, sm.q + nx * Br * D, sm.dout + nx * Br * D, tid);
      cp_async_commit();
    }
  }

  // End of step idx: step idx + 1's LSE and Delta to their stage (released by this step's
  // first barrier).
  __device__ __forceinline__ void end_step(int idx, const Stages& sm, int tid) const {
    if (idx + 1 < steps) {
      const int nx = (idx + 1) & 1;
      store_lse_delta(sm.lse + nx * Br, sm.delta + nx * Br, tid);
    }
  }

  // Whether some score of the step at query tile q0 is masked (keys past the end, or the
  // causal diagonal).
  __device__ __forceinline__ bool need_mask(int q0) const {
    return k0 + Bc > sq.len_k || (a.shape.causal && k0 + Bc - 1 > q0 + off);
  }
};

// What the dQ kernels share: the block's (query tile, sequence, query head), the last query
// tiles (the most keys under a causal mask) first; the key tiles (Bc keys) its Br rows see; the
// per-row constants of a thread's rows; and the tile loads (NT threads).
template <typename T, int D, int Br, int Bc, int NT, bool kWg = false>
struct DqWalk {
  const DkAttentionBwdArgs& a;
  Seq sq{};
  int b = 0, hq = 0, hk = 0, q0 = 0, off = 0, n_end = 0;

  __device__ __forceinline__ explicit DqWalk(const DkAttentionBwdArgs& args) : a(args) {}

  // False when the block owns no row (past the grid's tiles or its sequence's queries).
  __device__ __forceinline__ bool init() {
    const DkAttentionShape& s = a.shape;
    const unsigned bh = static_cast<unsigned>(s.batch) * static_cast<unsigned>(s.heads_q);
    const int n_tiles = cdiv(s.seqlen_q, Br);
    const int tile = n_tiles - 1 - static_cast<int>(blockIdx.x / bh);
    const int rest = static_cast<int>(blockIdx.x % bh);
    b = rest / s.heads_q;
    hq = rest % s.heads_q;
    if (tile < 0) return false;
    sq = seq_of(s, b);
    q0 = tile * Br;
    if (q0 >= sq.len_q) return false;
    hk = hq / (s.heads_q / s.heads_kv);
    off = sq.len_k - sq.len_q;
    if (s.causal) {
      const int64_t kmax = min(static_cast<int64_t>(q0) + Br - 1 + off,
                               static_cast<int64_t>(sq.len_k) - 1);
      n_end = kmax < 0 ? 0 : static_cast<int>(kmax / Bc) + 1;
    } else {
      n_end = cdiv(sq.len_k, Bc);
    }
    return true;
  }

  // Query row q0 + i of the block: its LSE exponent, Delta, and the last key it sees (rows past
  // the sequence: P = 0 and Delta = 0).
  __device__ __forceinline__ void row(int i, float& le, float& dl, int& kmax) const {
    const DkAttentionShape& s = a.shape;
    const int64_t base = lse_base(s, b, hq, sq.q_start);
    const int r = q0 + i;
    const bool ok = r < sq.len_q;
    le = ok ? lse_exponent(reinterpret_cast<const float*>(a.lse)[base + r]) : pos_inf();
    dl = ok ? reinterpret_cast<const float*>(a.delta)[base + r] : 0.f;
    kmax = s.causal ? static_cast<int>(min(static_cast<int64_t>(r) + off,
                                          static_cast<int64_t>(sq.len_k) - 1))
                    : sq.len_k - 1;
  }

  // The block's Q and dO rows (one cp.async group, committed).
  __device__ __forceinline__ void load_q_do(T* sQ, T* sdO, int tid) const {
    const int64_t row = static_cast<int64_t>(sq.q_start) + q0;
    load_rows<T, D, Br, NT, kWg>(sQ, reinterpret_cast<const T*>(a.q) + row * a.q_stride + hq * D,
                            a.q_stride, sq.len_q - q0, tid);
    load_rows<T, D, Br, NT, kWg>(sdO, reinterpret_cast<const T*>(a.dout) + row * a.dout_stride + hq * D,
                            a.dout_stride, sq.len_q - q0, tid);
    cp_async_commit();
  }

  // Key tile n's K and V rows into sK / sV (one stage; not committed).
  __device__ __forceinline__ void load_kv(int n, T* sK, T* sV, int tid) const {
    const int k0 = n * Bc;
    const int64_t row = static_cast<int64_t>(sq.k_start) + k0;
    load_rows<T, D, Bc, NT, kWg>(sK, reinterpret_cast<const T*>(a.k) + row * a.k_stride + hk * D,
                            a.k_stride, sq.len_k - k0, tid);
    load_rows<T, D, Bc, NT, kWg>(sV, reinterpret_cast<const T*>(a.v) + row * a.v_stride + hk * D,
                            a.v_stride, sq.len_k - k0, tid);
  }

  // Whether some score of key tile n is masked (keys past the end, or the causal diagonal).
  __device__ __forceinline__ bool need_mask(int n) const {
    const int k0 = n * Bc;
    return k0 + Bc > sq.len_k || (a.shape.causal && k0 + Bc - 1 > q0 + off);
  }

  // Start of step n (stage n & 1 of sK / sV, [2][Bc][D]): K / V of step n (and Q, dO) landed
  // for everyone, and everyone is done with step n - 1, whose stage the loads of step n + 1,
  // issued here, overwrite.
  // With kWg (wgmma reads the tiles through the async proxy) each thread fences its landed
  // copies before the barrier.
  __device__ __forceinline__ void begin_step(int n, T* sK, T* sV, int tid) const {
    sync_step();
    queue_next(n, sK, sV, tid);
  }
  // begin_step in two parts (see DkdvWalk::sync_step).
  __device__ __forceinline__ void sync_step() const {
    cp_async_wait<0>();
    if constexpr (kWg) fence_proxy_async();
    __syncthreads();
  }
  __device__ __forceinline__ void queue_next(int n, T* sK, T* sV, int tid) const {
    if (n + 1 < n_end) {
      const int nx = (n + 1) & 1;
      load_kv(n + 1, sK + nx * Bc * D, sV + nx * Bc * D, tid);
      cp_async_commit();
    }
  }
};

}  // namespace attn_bwd
}  // namespace dk
