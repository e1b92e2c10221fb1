// Attention forward (FlashAttention-2 style, mma.sync m16n8k16): out = softmax(scale · q kᵀ +
// mask) v per query head and the natural-log LSE of each query row. Design notes, budgets and the
// SASS check: cuda/ATTENTION.md ("Forward").
//
// One block of 4 warps owns 64 query rows (16 per warp) of one (sequence, query head) and walks
// the 64-key tiles of its KV head from the last one it sees down to 0, so the few tiles that need
// the mask (the causal diagonal, the ragged end of the keys) come first and the rest run without
// it. Shared memory holds one K tile and one V tile (swizzled, dk_attention_tile.cuh); the Q tile
// is staged through the V buffer once and kept as mma A fragments in registers. Per key tile:
//   wait K(n); sync; queue V(n)        -- V(n) loads during S = Q·Kᵀ and the softmax
//   S = Q·K(n)ᵀ; mask; online softmax; P as A fragments (straight from the S accumulators)
//   wait V(n); sync; queue K(n-1)      -- K(n-1) loads during O += P·V(n)
//   O += P·V(n)
// Rows of a warp live in quads (lane / 4 = row, lane % 4 = column pair), so row max and sum need
// two __shfl_xor_sync. The output is divided by the row sum, staged through the K buffer and
// written with 16-byte stores; rows that see no key write 0 and LSE −∞.
#include <math.h>
#include <stdint.h>

#include "dk_attention_fwd_args.h"
#include "dk_attention_tile.cuh"
#include "dk_mma.cuh"

namespace dk {
namespace attn_fwd {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per block
constexpr int kBlockN = 64;           // keys per tile

template <bool B> struct BoolTag {
  static constexpr bool value = B;
};

// min(k_len, x) for x computed in 64 bits (x may exceed the int range only above k_len).
__device__ __forceinline__ int key_limit(int k_len, int64_t x) {
  return x < k_len ? static_cast<int>(x) : k_len;
}

template <typename T, int D>
__device__ __forceinline__ void forward(const DkAttentionFwdArgs& a) {
  constexpr int kRowBytes = D * 2;
  constexpr int kTileBytes = kBlockN * kRowBytes;
  constexpr int kKSteps = D / 16;     // k-steps of Q·Kᵀ (16 dims each)
  constexpr int kDTiles = D / 8;      // n-tiles of O (8 dims each)
  constexpr int kKeyTiles = kBlockN / 8;
  static_assert(kBlockM == kBlockN, "the Q tile is staged in the V buffer");

  // [0, kTileBytes): K tile, later the output staging; [kTileBytes, 2 kTileBytes): V tile, first
  // the Q tile.
  __shared__ uint4 smem[2 * kTileBytes / 16];
  const uint32_t s_k = smem_addr(smem);
  const uint32_t s_v = s_k + kTileBytes;

  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;  // row of the fragments (and g + 8)
  const int t = lane & 3;   // column pair of the fragments

  // ldmatrix row addresses. K (non-trans, two key n-tiles × one 16-dim k-step per x4): lane l
  // reads key row (l & 7) + 8 (l >> 4), chunk 2 kk + ((l >> 3) & 1). V (trans, one 16-key step ×
  // two dim n-tiles) and Q (A fragments): row (l & 7) + 8 ((l >> 3) & 1), chunk 2 kk + (l >> 4).
  // With the swizzle the chunk becomes (2 kk + x) ^ (l & 7) = (2 kk) ^ (x ^ (l & 7)): bit 3 of
  // 2 kk is an immediate, bits 1..2 pick one of four per-lane offsets.
  const int xk = ((lane >> 3) & 1) ^ (lane & 7);
  const int xv = (lane >> 4) ^ (lane & 7);
  uint32_t k_off[4], v_off[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    k_off[i] = static_cast<uint32_t>(((2 * i) ^ xk) << 4);
    v_off[i] = static_cast<uint32_t>(((2 * i) ^ xv) << 4);
  }
  const uint32_t k_lane = s_k + ((lane & 7) + ((lane >> 4) << 3)) * kRowBytes;
  const uint32_t v_lane = s_v + ((lane & 7) + (((lane >> 3) & 1) << 3)) * kRowBytes;
  const uint32_t q_lane = s_v + (warp * 16 + (lane & 15)) * kRowBytes;

  const float scale_log2 = s.scale_log2;
  const int heads_q = s.heads_q;
  const int group = s.heads_q / s.heads_kv;
  const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);  // heaviest causal first
  const int m0 = m_block * kBlockM;
  const int64_t jobs = static_cast<int64_t>(heads_q) * s.batch;

  for (int64_t job = blockIdx.y; job < jobs; job += gridDim.y) {
    const int h = static_cast<int>(job % heads_q);
    const int b = static_cast<int>(job / heads_q);
    const attn::SeqRows seq = attn::sequence_rows(s, b);
    if (m0 >= seq.q_len) continue;  // uniform over the block
    const int q_rows = min(kBlockM, seq.q_len - m0);
    const int hk = h / group;

    const T* q = reinterpret_cast<const T*>(a.q) +
                 static_cast<int64_t>(seq.q_start + m0) * a.q_stride + h * D;
    const T* k =
        reinterpret_cast<const T*>(a.k) + static_cast<int64_t>(seq.k_start) * a.k_stride + hk * D;
    const T* v =
        reinterpret_cast<const T*>(a.v) + static_cast<int64_t>(seq.k_start) * a.v_stride + hk * D;

    // Key limits (exclusive): query row i of the sequence sees keys j < limit(i), where
    // limit(i) = k_len, or min(k_len, i + 1 + k_len − q_len) with the causal mask. lim_lo is the
    // limit of the block's first row (the smallest), lim_hi that of its last valid row.
    const int64_t diag1 = static_cast<int64_t>(seq.k_len) - seq.q_len + 1;
    int lim_lo = seq.k_len, lim_hi = seq.k_len;
    int lim_row[2] = {seq.k_len, seq.k_len};
    if (s.causal) {
      lim_lo = key_limit(seq.k_len, m0 + diag1);
      lim_hi = key_limit(seq.k_len, m0 + q_rows - 1 + diag1);
#pragma unroll
      for (int i = 0; i < 2; ++i) lim_row[i] = key_limit(seq.k_len, m0 + warp * 16 + g + 8 * i + diag1);
    }
    // Tiles 0 .. n_tiles hold keys some row sees; tiles below n_full need no mask.
    const int n_tiles = lim_hi > 0 ? (lim_hi + kBlockN - 1) / kBlockN : 0;
    const int n_full = lim_lo > 0 ? lim_lo / kBlockN : 0;

    // Prologue: Q into the V buffer, the first (highest) K tile into the K buffer.
    attn::load_tile_async<D, kBlockM, kThreads>(s_v, q, a.q_stride, q_rows, tid);
    cp_async_commit();
    if (n_tiles > 0) {
      const int n = n_tiles - 1;
      attn::load_tile_async<D, kBlockN, kThreads>(
          s_k, k + static_cast<int64_t>(n) * kBlockN * a.k_stride, a.k_stride,
          seq.k_len - n * kBlockN, tid);
    }
    cp_async_commit();  // possibly empty: the wait below counts on two groups
    cp_async_wait<1>();
    __syncthreads();
    uint32_t qf[kKSteps][4];
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      ldmatrix_x4(qf[kk], q_lane + v_off[kk & 3] + (kk >> 2) * 128);
    }

    float o[kDTiles][4];
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    }
    float m_run[2] = {-INFINITY, -INFINITY};  // running max of the raw scores q·k
    float l_run[2] = {0.f, 0.f};              // this lane's part of the row sum (relative to m_run)

    auto tile = [&](int n, auto masked) {
      // K(n) has landed (this thread's copies), then everyone's; everyone is done with the V
      // buffer (previous P·V, or the Q fragments): queue V(n).
      cp_async_wait<0>();
      __syncthreads();
      attn::load_tile_async<D, kBlockN, kThreads>(
          s_v, v + static_cast<int64_t>(n) * kBlockN * a.v_stride, a.v_stride,
          seq.k_len - n * kBlockN, tid);
      cp_async_commit();

      // S = Q · K(n)ᵀ: 16 rows × 64 keys per warp, sc[j] = keys 8j .. 8j + 7.
      float sc[kKeyTiles][4];
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
        for (int p = 0; p < kKeyTiles / 2; ++p) {
          uint32_t bk[4];
          ldmatrix_x4(bk, k_lane + k_off[kk & 3] + (kk >> 2) * 128 + p * 16 * kRowBytes);
          mma_16816<T>(sc[2 * p], qf[kk], bk);
          mma_16816<T>(sc[2 * p + 1], qf[kk], bk + 2);
        }
      }

      if constexpr (decltype(masked)::value) {
        // Key of sc[j][e] (and sc[j][2 + e]) relative to tile start: 8j + 2t + e.
        const int lim0 = lim_row[0] - n * kBlockN - 2 * t;
        const int lim1 = lim_row[1] - n * kBlockN - 2 * t;
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (8 * j + e >= lim0) sc[j][e] = -INFINITY;
            if (8 * j + e >= lim1) sc[j][2 + e] = -INFINITY;
          }
        }
      }

      // Online softmax. Row g: sc[j][0..1]; row g + 8: sc[j][2..3]; a row spans a quad.
      float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        mx[0] = fmaxf(mx[0], fmaxf(sc[j][0], sc[j][1]));
        mx[1] = fmaxf(mx[1], fmaxf(sc[j][2], sc[j][3]));
      }
      float ms[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        // A row with every key so far masked keeps max −∞: subtract 0 so exp2(−∞ − 0) = 0
        // instead of exp2(−∞ + ∞) = NaN.
        ms[i] = mx[i] == -INFINITY ? 0.f : mx[i] * scale_log2;
        const float alpha = exp2_fast(m_run[i] * scale_log2 - ms[i]);  // 0 while m_run = −∞
        m_run[i] = mx[i];
        l_run[i] *= alpha;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
          o[d][2 * i] *= alpha;
          o[d][2 * i + 1] *= alpha;
        }
      }
      // P = exp2(s · scale_log2 − m · scale_log2) as A fragments of P·V: key step kk uses the
      // accumulators of key n-tiles 2 kk (a0, a1) and 2 kk + 1 (a2, a3).
      uint32_t pa[kBlockN / 16][4];
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        const float p0 = exp2_fast(fmaf(sc[j][0], scale_log2, -ms[0]));
        const float p1 = exp2_fast(fmaf(sc[j][1], scale_log2, -ms[0]));
        const float p2 = exp2_fast(fmaf(sc[j][2], scale_log2, -ms[1]));
        const float p3 = exp2_fast(fmaf(sc[j][3], scale_log2, -ms[1]));
        l_run[0] += p0 + p1;
        l_run[1] += p2 + p3;
        pa[j >> 1][(j & 1) * 2] = pack2<T>(p0, p1);
        pa[j >> 1][(j & 1) * 2 + 1] = pack2<T>(p2, p3);
      }

      // V(n) has landed everywhere and everyone is done with K(n): queue K(n − 1) (a full tile:
      // it lies below the last tile, which holds key lim_hi − 1 < k_len).
      cp_async_wait<0>();
      __syncthreads();
      if (n > 0) {
        attn::load_tile_async<D, kBlockN, kThreads>(
            s_k, k + static_cast<int64_t>(n - 1) * kBlockN * a.k_stride, a.k_stride, kBlockN,
            tid);
      }
      cp_async_commit();

      // O += P · V(n): 16 rows × D per warp.
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, v_lane + v_off[dp & 3] + (dp >> 2) * 128 + kk * 16 * kRowBytes);
          mma_16816<T>(o[2 * dp], pa[kk], bv);
          mma_16816<T>(o[2 * dp + 1], pa[kk], bv + 2);
        }
      }
    };

    int n = n_tiles - 1;
    for (; n >= n_full; --n) tile(n, BoolTag<true>());
    for (; n >= 0; --n) tile(n, BoolTag<false>());

    // Finalise: full row sums, LSE, O / l.
    float inv[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
      // l > 0 whenever m is finite (its own term is exp2(0) = 1); l = 0: the row saw no key.
      inv[i] = l_run[i] > 0.f ? 1.f / l_run[i] : 0.f;
    }
    if (t == 0) {
      float* lse = reinterpret_cast<float*>(a.lse);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = warp * 16 + g + 8 * i;
        if (r < q_rows) {
          const int64_t at = s.cu_seqlens_q != 0
                                 ? static_cast<int64_t>(h) * s.total_q + seq.q_start + m0 + r
                                 : (static_cast<int64_t>(b) * heads_q + h) * s.seqlen_q + m0 + r;
          lse[at] = l_run[i] > 0.f ? fmaf(m_run[i], s.scale, logf(l_run[i])) : -INFINITY;
        }
      }
    }

    // Stage O (in T) in the K buffer: nobody reads it after the last tile's second barrier and
    // no copy into it is pending (the last tile, n = 0, queued none).
    cp_async_wait<0>();
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int r = warp * 16 + g;
      const uint32_t at = s_k + r * kRowBytes + ((d ^ g) << 4) + t * 4;  // r & 7 == g
      st_shared_b32(at, pack2<T>(o[d][0] * inv[0], o[d][1] * inv[0]));
      st_shared_b32(at + 8 * kRowBytes, pack2<T>(o[d][2] * inv[1], o[d][3] * inv[1]));
    }
    __syncthreads();
    T* out = reinterpret_cast<T*>(a.out) + static_cast<int64_t>(seq.q_start + m0) * a.out_stride +
             h * D;
    attn::store_tile<D, kBlockM, kThreads>(out, a.out_stride, s_k, q_rows, tid);
    __syncthreads();  // the next job refills both buffers
  }
}

}  // namespace attn_fwd
}  // namespace dk

// Registers: D = 128 keeps O (64), the Q fragments (32) and S (32) live; 2 blocks per SM leave
// 255 per thread. D = 64: 3 blocks per SM (170 per thread; at 4 blocks = 128 ptxas spills).
#define DK_ATTN_FWD_KERNEL(tname, T, D, MIN_BLOCKS)                                          \
  extern "C" __global__ void __launch_bounds__(dk::attn_fwd::kThreads, MIN_BLOCKS)           \
      dk_attn_fwd_##tname##_d##D(const DkAttentionFwdArgs args) {                           \
    dk::attn_fwd::forward<T, D>(args);                                                      \
  }

DK_ATTN_FWD_KERNEL(bf16, __nv_bfloat16, 64, 3)
DK_ATTN_FWD_KERNEL(bf16, __nv_bfloat16, 128, 2)
DK_ATTN_FWD_KERNEL(f16, __half, 64, 3)
DK_ATTN_FWD_KERNEL(f16, __half, 128, 2)
