// Attention forward (FlashAttention-2 style, mma.sync m16n8k16): out = softmax(scale · q kᵀ +
// mask) v per query head and the natural-log LSE of each query row. Design notes, budgets and the
// SASS check: cuda/ATTENTION.md ("Forward").
//
// One block of 4 warps owns 64 · MT query rows (16 · MT per warp) of one (sequence, query head)
// and walks the 64-key tiles of its KV head from the last one it sees down to 0, so the few
// tiles that need the mask (the causal diagonal, the ragged end of the keys) come first and the
// rest run a copy of the loop without it. Shared memory holds the Q tile, one K tile and one V
// tile (swizzled, dk_attention_tile.cuh); Q is kept as mma A fragments in registers when they are
// few (MT · D <= 128), else re-read with ldmatrix at every key tile. Per key tile:
//   wait K(n); sync; queue V(n)        -- V(n) loads during S = Q·Kᵀ and the softmax
//   S = Q·K(n)ᵀ; mask; online softmax; P as A fragments (straight from the S accumulators)
//   wait V(n); sync; queue K(n-1)      -- K(n-1) loads during O += P·V(n)
//   O += P·V(n)
// Rows of a warp live in quads (lane / 4 = row, lane % 4 = column pair), so row max and sum need
// two __shfl_xor_sync. The output is divided by the row sum, staged through the Q tile and
// written with 16-byte stores; rows that see no key write 0 and LSE −∞.
#include <math.h>
#include <stdint.h>

#include "dk_attention_fwd_args.h"
#include "dk_attention_fwd_block.cuh"
#include "dk_attention_tile.cuh"
#include "dk_mma.cuh"

namespace dk {
namespace attn_fwd {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// Tiling of one instantiation: D head dimension, kMT m-tiles of 16 query rows per warp, kN keys
// per tile. The Q fragments stay in registers when they are few (kMT · D ≤ 128); otherwise they
// are read from the Q tile in shared memory at every key tile.
template <int D, int kMT, int kN>
struct Tiling {
  static constexpr int kBlockM = 16 * kMT * kWarps;  // query rows per block
  static constexpr int kRowBytes = D * 2;
  static constexpr int kQBytes = kBlockM * kRowBytes;
  static constexpr int kKVBytes = kN * kRowBytes;
  static constexpr int kSmemBytes = kQBytes + 2 * kKVBytes;  // Q (later O), K, V
  static constexpr bool kQInRegs = kMT * D <= 128;
};

template <typename T, int D, int kMT, int kN>
__device__ __forceinline__ void forward(const DkAttentionFwdArgs& a, unsigned char* smem) {
  using Tl = Tiling<D, kMT, kN>;
  constexpr int kBlockM = Tl::kBlockM;
  constexpr int kRowBytes = Tl::kRowBytes;
  constexpr int kKSteps = D / 16;     // k-steps of Q·Kᵀ (16 dims each)
  constexpr int kDTiles = D / 8;      // n-tiles of O (8 dims each)
  constexpr int kKeyTiles = kN / 8;   // n-tiles of S (8 keys each)
  constexpr int kPSteps = kN / 16;    // k-steps of P·V (16 keys each)
  constexpr int kRows = 2 * kMT;      // query rows per thread: 16 mt + g + 8 i, index 2 mt + i
  static_assert(kN % 16 == 0 && D % 64 == 0, "tile shapes");

  // Q tile (then the output staging), K tile, V tile; all swizzled (dk_attention_tile.cuh).
  const uint32_t s_q = smem_addr(smem);
  const uint32_t s_k = s_q + Tl::kQBytes;
  const uint32_t s_v = s_k + Tl::kKVBytes;

  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;  // row of the fragments (and g + 8)
  const int t = lane & 3;   // column pair of the fragments
  const int warp_row = warp * 16 * kMT;

  // ldmatrix row addresses (byte offsets in a tile). K (non-trans, two key n-tiles × one
  // 16-dim k-step per x4): lane l reads key row (l & 7) + 8 (l >> 4), chunk 2 kk + ((l >> 3) & 1).
  // V (trans, one 16-key step × two dim n-tiles) and Q (A fragments): row (l & 7) +
  // 8 ((l >> 3) & 1) (Q: l & 15), chunk 2 kk + (l >> 4). Swizzled, chunk c + x (c even, x < 2)
  // is stored at ((c + x) ^ (row & 7)) · 16 = (c · 16) ^ (((x ^ (row & 7)) · 16): the per-lane
  // offset below XOR an immediate, which cannot carry into the row bits (c · 16 < D · 2).
  const uint32_t k_lane = ((lane & 7) + ((lane >> 4) << 3)) * kRowBytes +
                          ((((lane >> 3) & 1) ^ (lane & 7)) << 4);
  const uint32_t v_lane =
      ((lane & 7) + (((lane >> 3) & 1) << 3)) * kRowBytes + (((lane >> 4) ^ (lane & 7)) << 4);
  const uint32_t q_lane = (warp_row + (lane & 15)) * kRowBytes + (((lane >> 4) ^ (lane & 7)) << 4);

  const float scale_log2 = s.scale_log2;
  const int heads_q = s.heads_q;
  FwdBlock<T, D, kBlockM, kN> blk;
  if (!blk.init(a, warp_row + g)) return;  // past this sequence's end (varlen)
  const attn::SeqRows& seq = blk.seq;
  const int h = blk.h, b = blk.b, m0 = blk.m0, q_rows = blk.q_rows;
  const int lim_g = blk.lim_g, n_tiles = blk.n_tiles, n_full = blk.n_full;
  blk.template prologue<kThreads>(s_q, s_k, a, tid);
  uint32_t qf[Tl::kQInRegs ? kMT : 1][Tl::kQInRegs ? kKSteps : 1][4];
  if constexpr (Tl::kQInRegs) {
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        ldmatrix_x4(qf[mt][kk], s_q + (q_lane ^ (kk * 32)) + mt * 16 * kRowBytes);
      }
    }
  }

  float o[kMT][kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
  }
  float m_run[kRows];  // running max of the raw scores q·k
  float l_run[kRows];  // this lane's part of the row sum (relative to m_run)
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }

  auto tile = [&](int n, auto masked) {
    blk.template queue_v<kThreads>(s_v, n, a, tid);

    // Opaque copies of the lane offsets: without them the compiler precomputes every
    // `offset ^ immediate` outside the loop and holds each in a register.
    uint32_t kl = k_lane, vl = v_lane, ql = q_lane;
    asm volatile("" : "+r"(kl), "+r"(vl), "+r"(ql));

    // S = Q · K(n)ᵀ: 16 kMT rows × kN keys per warp, sc[mt][j] = keys 8j .. 8j + 7.
    float sc[kMT][kKeyTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) sc[mt][j][0] = sc[mt][j][1] = sc[mt][j][2] = sc[mt][j][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t qa[kMT][4];
      if constexpr (!Tl::kQInRegs) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          ldmatrix_x4(qa[mt], s_q + (ql ^ (kk * 32)) + mt * 16 * kRowBytes);
        }
      }
#pragma unroll
      for (int p = 0; p < kKeyTiles / 2; ++p) {
        uint32_t bk[4];
        ldmatrix_x4(bk, s_k + (kl ^ (kk * 32)) + p * 16 * kRowBytes);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          const uint32_t* af = Tl::kQInRegs ? qf[Tl::kQInRegs ? mt : 0][Tl::kQInRegs ? kk : 0]
                                            : qa[mt];
          mma_16816<T>(sc[mt][2 * p], af, bk);
          mma_16816<T>(sc[mt][2 * p + 1], af, bk + 2);
        }
      }
    }

    if constexpr (decltype(masked)::value) {
      // Key of sc[mt][j][e] (and [2 + e]) relative to the tile start: 8j + 2t + e.
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        // Row 16 mt + 8 i + g: limit min(k_len, lim_g + 16 mt + 8 i), formed without overflow.
        const int lim0 = row_limit(seq.k_len, lim_g, 16 * mt) - n * kN - 2 * t;
        const int lim1 = row_limit(seq.k_len, lim_g, 16 * mt + 8) - n * kN - 2 * t;
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (8 * j + e >= lim0) sc[mt][j][e] = -INFINITY;
            if (8 * j + e >= lim1) sc[mt][j][2 + e] = -INFINITY;
          }
        }
      }
    }

    // Online softmax. Row 2 mt: sc[mt][j][0..1]; row 2 mt + 1: sc[mt][j][2..3]; a row spans a
    // quad. P = exp2(s · scale_log2 − m · scale_log2) becomes the A fragments of P·V: key step
    // kk uses the accumulators of key n-tiles 2 kk (a0, a1) and 2 kk + 1 (a2, a3).
    uint32_t pa[kMT][kPSteps][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      float mx[2] = {m_run[2 * mt], m_run[2 * mt + 1]};
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        mx[0] = fmaxf(mx[0], fmaxf(sc[mt][j][0], sc[mt][j][1]));
        mx[1] = fmaxf(mx[1], fmaxf(sc[mt][j][2], sc[mt][j][3]));
      }
      float ms[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = 2 * mt + i;
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        // A row with every key so far masked keeps max −∞: subtract 0 so exp2(−∞ − 0) = 0
        // instead of exp2(−∞ + ∞) = NaN.
        ms[i] = mx[i] == -INFINITY ? 0.f : mx[i] * scale_log2;
        const float alpha = exp2_fast(m_run[r] * scale_log2 - ms[i]);  // 0 while m_run = −∞
        m_run[r] = mx[i];
        l_run[r] *= alpha;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
          o[mt][d][2 * i] *= alpha;
          o[mt][d][2 * i + 1] *= alpha;
        }
      }
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        const float p0 = exp2_fast(fmaf(sc[mt][j][0], scale_log2, -ms[0]));
        const float p1 = exp2_fast(fmaf(sc[mt][j][1], scale_log2, -ms[0]));
        const float p2 = exp2_fast(fmaf(sc[mt][j][2], scale_log2, -ms[1]));
        const float p3 = exp2_fast(fmaf(sc[mt][j][3], scale_log2, -ms[1]));
        l_run[2 * mt] += p0 + p1;
        l_run[2 * mt + 1] += p2 + p3;
        pa[mt][j >> 1][(j & 1) * 2] = pack2<T>(p0, p1);
        pa[mt][j >> 1][(j & 1) * 2 + 1] = pack2<T>(p2, p3);
      }
    }

    blk.template queue_k<kThreads>(s_k, n, a, tid);

    // O += P · V(n): 16 kMT rows × D per warp.
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk) {
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, s_v + (vl ^ (dp * 32)) + kk * 16 * kRowBytes);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(o[mt][2 * dp], pa[mt][kk], bv);
          mma_16816<T>(o[mt][2 * dp + 1], pa[mt][kk], bv + 2);
        }
      }
    }
  };

  int n = n_tiles - 1;
  for (; n >= n_full; --n) tile(n, BoolTag<true>());
  for (; n >= 0; --n) tile(n, BoolTag<false>());

  // Finalise: full row sums, LSE, O / l.
  float inv[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    // l > 0 whenever m is finite (its own term is exp2(0) = 1); l = 0: the row saw no key.
    inv[r] = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
  }
  if (t == 0) {
    float* lse = reinterpret_cast<float*>(a.lse);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp_row + 16 * (r >> 1) + 8 * (r & 1) + g;
      if (row < q_rows) {
        const int64_t at = s.cu_seqlens_q != 0
                               ? static_cast<int64_t>(h) * s.total_q + seq.q_start + m0 + row
                               : (static_cast<int64_t>(b) * heads_q + h) * s.seqlen_q + m0 + row;
        lse[at] = l_run[r] > 0.f ? fmaf(m_run[r], s.scale, logf(l_run[r])) : -INFINITY;
      }
    }
  }

  // Stage O (in T) in the Q buffer, once every Q copy has landed and every warp is done reading
  // Q (with no key tile at all, the Q fragment loads of the prologue are the last reads).
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int row = warp_row + 16 * mt + g;
      const uint32_t at = s_q + row * kRowBytes + ((d ^ g) << 4) + t * 4;  // row & 7 == g
      st_shared_b32(at, pack2<T>(o[mt][d][0] * inv[2 * mt], o[mt][d][1] * inv[2 * mt]));
      st_shared_b32(at + 8 * kRowBytes,
                    pack2<T>(o[mt][d][2] * inv[2 * mt + 1], o[mt][d][3] * inv[2 * mt + 1]));
    }
  }
  __syncthreads();
  T* out = reinterpret_cast<T*>(a.out) + static_cast<int64_t>(seq.q_start + m0) * a.out_stride +
           h * D;
  attn::store_tile<D, kBlockM, kThreads>(out, a.out_stride, s_q, q_rows, tid);
}

// ---- D = 128 in 128-row blocks of 8 warps, warp pairs splitting each tile -------------------
//
// The kernel above gives a warp 16 rows at D = 128 (32 spill: see ATTENTION.md), so every K and V
// fragment it reads with ldmatrix feeds one m-tile: ~320 bytes of shared-memory traffic per HMMA
// with its share of the cp.async writes, the limit Nsight Compute showed (L1/shared 75 %, tensor
// 51 %, H100). Here a pair of warps owns 32 rows and splits both products of each 64-key tile:
//   S = Q·Kᵀ:   warp (pair r, half h) computes its 32 rows × keys 32 h .. 32 h + 31 (Q fragments in
//               registers, each K fragment feeds two m-tiles);
//   softmax:    the two halves' row maxima meet in shared memory (the pair's named barrier),
//               so both warps rescale with the same maximum; each keeps the row sum of its own
//               keys;
//   P:          each warp writes its P (in T) to a [128 rows][64 keys] tile;
//   O += P·V:   warp (r, h) accumulates its 32 rows × head columns 64 h .. 64 h + 63 over all 64
//               keys (P fragments from the tile, each V fragment feeds two m-tiles).
// O is 64 registers per thread, Q 64: ~208 bytes of shared-memory traffic per HMMA (model in
// ATTENTION.md). Per element the arithmetic is the 16-row kernel's: S, the maxima, P and the
// unnormalised O are bitwise the same; the row sum adds the two halves' partial sums at the end,
// so out and LSE differ from the 16-row kernel's in the last bits.
template <int D> struct SplitTiling {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 128;  // 4 warp pairs of 32 rows
  static constexpr int kN = 64;        // keys per tile
  static constexpr int kRowBytes = D * 2;
  static constexpr int kQBytes = kBlockM * kRowBytes;  // Q, later the output staging
  static constexpr int kKVBytes = kN * kRowBytes;
  static constexpr int kPBytes = kBlockM * kN * 2;     // P tile, [128 rows][64 keys]
  static constexpr int kXBytes = 2 * kBlockM * 4;      // the halves' row maxima / sums
  static constexpr int kSmemBytes = kQBytes + 2 * kKVBytes + kPBytes + kXBytes;
};

template <typename T, int D>
__device__ __forceinline__ void forward_split(const DkAttentionFwdArgs& a, unsigned char* smem) {
  using Tl = SplitTiling<D>;
  constexpr int kBlockM = Tl::kBlockM, kN = Tl::kN, kThr = Tl::kThreads;
  constexpr int kRowBytes = Tl::kRowBytes;
  constexpr int kKSteps = D / 16;   // k-steps of Q·Kᵀ
  constexpr int kHalfD = D / 2;     // head columns of a warp's O
  constexpr int kODTiles = kHalfD / 8;
  constexpr int kSKeys = kN / 2;    // keys of a warp's S
  constexpr int kSTiles = kSKeys / 8;
  constexpr int kPSteps = kN / 16;  // k-steps of P·V
  static_assert(D == 128, "the split kernel is the D = 128 variant");

  const uint32_t s_q = smem_addr(smem);
  const uint32_t s_k = s_q + Tl::kQBytes;
  const uint32_t s_v = s_k + Tl::kKVBytes;
  const uint32_t s_p = s_v + Tl::kKVBytes;
  float* xchg = reinterpret_cast<float*>(smem + Tl::kQBytes + 2 * Tl::kKVBytes + Tl::kPBytes);

  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int pair = warp >> 1, half = warp & 1;
  const int warp_row = pair * 32;

  // ldmatrix lane offsets as in forward(): K rows (non-trans B), V rows (trans B), Q rows (A);
  // P rows (A) in the [rows][64] tile, 8 chunks a row.
  const uint32_t k_lane = ((lane & 7) + ((lane >> 4) << 3)) * kRowBytes +
                          ((((lane >> 3) & 1) ^ (lane & 7)) << 4);
  const uint32_t v_lane =
      ((lane & 7) + (((lane >> 3) & 1) << 3)) * kRowBytes + (((lane >> 4) ^ (lane & 7)) << 4);
  const uint32_t q_lane = (warp_row + (lane & 15)) * kRowBytes + (((lane >> 4) ^ (lane & 7)) << 4);
  const uint32_t p_lane = (warp_row + (lane & 15)) * (kN * 2) + (((lane >> 4) ^ (lane & 7)) << 4);

  const float scale_log2 = s.scale_log2;
  const int heads_q = s.heads_q;
  FwdBlock<T, D, kBlockM, kN> blk;
  if (!blk.init(a, warp_row + g)) return;
  const attn::SeqRows& seq = blk.seq;
  const int h = blk.h, b = blk.b, m0 = blk.m0, q_rows = blk.q_rows;
  const int lim_g = blk.lim_g, n_tiles = blk.n_tiles, n_full = blk.n_full;
  blk.template prologue<kThr>(s_q, s_k, a, tid);
  // The warp's 32 rows of Q as A fragments, for the whole loop.
  uint32_t qf[2][kKSteps][4];
  cp_async_wait<1>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk)
      ldmatrix_x4(qf[mt][kk], s_q + (q_lane ^ (kk * 32)) + mt * 16 * kRowBytes);

  float o[2][kODTiles][4] = {};
  float m_run[4], l_run[4];  // rows 16 mt + g + 8 i at index 2 mt + i; l_run: this half's keys
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }
  // This thread's rows in the exchange buffer: xchg[half][row] (row within the block).
  auto xrow = [&](int r) { return warp_row + 16 * (r >> 1) + 8 * (r & 1) + g; };

  auto tile = [&](int n, auto masked) {
    // Also: everyone is done with the P tile of tile n + 1.
    blk.template queue_v<kThr>(s_v, n, a, tid);

    uint32_t kl = k_lane, vl = v_lane, pl = p_lane;
    asm volatile("" : "+r"(kl), "+r"(vl), "+r"(pl));

    // S = Q · K(n)ᵀ over this half's 32 keys: sc[mt][j] = keys 32 half + 8 j ...
    float sc[2][kSTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int p = 0; p < kSTiles / 2; ++p) {
        uint32_t bk[4];
        ldmatrix_x4(bk, s_k + (kl ^ (kk * 32)) + (half * kSKeys + p * 16) * kRowBytes);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(sc[mt][2 * p], qf[mt][kk], bk);
          mma_16816<T>(sc[mt][2 * p + 1], qf[mt][kk], bk + 2);
        }
      }
    }

    if constexpr (decltype(masked)::value) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int lim0 = row_limit(seq.k_len, lim_g, 16 * mt) - n * kN - half * kSKeys - 2 * t;
        const int lim1 = row_limit(seq.k_len, lim_g, 16 * mt + 8) - n * kN - half * kSKeys - 2 * t;
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (8 * j + e >= lim0) sc[mt][j][e] = -INFINITY;
            if (8 * j + e >= lim1) sc[mt][j][2 + e] = -INFINITY;
          }
        }
      }
    }

    // Row maxima of this half (over the lane quad), to the exchange buffer; the pair's named
    // barrier (only the two warps of a pair share rows); the tile maximum of each row is the
    // larger of both halves'.
    float mx[4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      mx[2 * mt] = -INFINITY;
      mx[2 * mt + 1] = -INFINITY;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
        mx[2 * mt] = fmaxf(mx[2 * mt], fmaxf(sc[mt][j][0], sc[mt][j][1]));
        mx[2 * mt + 1] = fmaxf(mx[2 * mt + 1], fmaxf(sc[mt][j][2], sc[mt][j][3]));
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      if (t == 0) xchg[half * kBlockM + xrow(r)] = mx[r];
    }
    named_barrier_sync(1 + pair, 64);
    float ms[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float m_tile = fmaxf(mx[r], xchg[(half ^ 1) * kBlockM + xrow(r)]);
      const float m_new = fmaxf(m_run[r], m_tile);
      // A row with every key so far masked keeps max −∞: subtract 0 (exp2(−∞ − 0) = 0).
      ms[r] = m_new == -INFINITY ? 0.f : m_new * scale_log2;
      const float alpha = exp2_fast(m_run[r] * scale_log2 - ms[r]);  // 0 while m_run = −∞
      m_run[r] = m_new;
      l_run[r] *= alpha;
#pragma unroll
      for (int d = 0; d < kODTiles; ++d) {
        o[r >> 1][d][2 * (r & 1)] *= alpha;
        o[r >> 1][d][2 * (r & 1) + 1] *= alpha;
      }
    }
    // P of this half's keys, in T, to the P tile (row 16 mt + g (+ 8), key 32 half + 8 j + 2 t).
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
        const float p0 = exp2_fast(fmaf(sc[mt][j][0], scale_log2, -ms[2 * mt]));
        const float p1 = exp2_fast(fmaf(sc[mt][j][1], scale_log2, -ms[2 * mt]));
        const float p2 = exp2_fast(fmaf(sc[mt][j][2], scale_log2, -ms[2 * mt + 1]));
        const float p3 = exp2_fast(fmaf(sc[mt][j][3], scale_log2, -ms[2 * mt + 1]));
        l_run[2 * mt] += p0 + p1;
        l_run[2 * mt + 1] += p2 + p3;
        const int row = warp_row + 16 * mt + g;  // row & 7 == g
        const int chunk = half * (kSKeys / 8) + j;
        const uint32_t at = s_p + row * (kN * 2) + ((chunk ^ g) << 4) + t * 4;
        st_shared_b32(at, pack2<T>(p0, p1));
        st_shared_b32(at + 8 * (kN * 2), pack2<T>(p2, p3));
      }
    }

    // Also: both halves' P are in the tile.
    blk.template queue_k<kThr>(s_k, n, a, tid);

    // O += P · V(n): the pair's 32 rows × this half's 64 head columns, over the tile's 64 keys
    // (two of the four k-steps unrolled: fully unrolled, ptxas spilled on sm_90a).
#pragma unroll 2
    for (int kk = 0; kk < kPSteps; ++kk) {
      uint32_t pf[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(pf[mt], s_p + (pl ^ (kk * 32)) + mt * 16 * (kN * 2));
#pragma unroll
      for (int dp = 0; dp < kODTiles / 2; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, s_v + (vl ^ ((half * (kHalfD / 8) + 2 * dp) * 16)) +
                                  kk * 16 * kRowBytes);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(o[mt][2 * dp], pf[mt], bv);
          mma_16816<T>(o[mt][2 * dp + 1], pf[mt], bv + 2);
        }
      }
    }
  };

  int n = n_tiles - 1;
  for (; n >= n_full; --n) tile(n, BoolTag<true>());
  for (; n >= 0; --n) tile(n, BoolTag<false>());

  // Row sums: this half's quad sum to the exchange buffer, then half 0's plus half 1's (the same
  // order in both warps of a pair); LSE from half 0; O / l staged in the Q tile.
  float l_half[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    l_half[r] = l_run[r] + __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_half[r] += __shfl_xor_sync(0xffffffffu, l_half[r], 2);
  }
  // No barrier needed before these exchange writes: every read of the last tile's maxima came
  // before that tile's queue_k barrier. The barrier after them also orders every warp's Q
  // fragment loads (with no key tile, the prologue's) before the staging that overwrites the
  // Q tile (a pair's two warps read the same rows).
#pragma unroll
  for (int r = 0; r < 4; ++r)
    if (t == 0) xchg[half * kBlockM + xrow(r)] = l_half[r];
  __syncthreads();
  float inv[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float l = xchg[xrow(r)] + xchg[kBlockM + xrow(r)];
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int row = xrow(r);
    if (half == 0 && t == 0 && row < q_rows) {
      float* lse = reinterpret_cast<float*>(a.lse);
      const int64_t at = s.cu_seqlens_q != 0
                             ? static_cast<int64_t>(h) * s.total_q + seq.q_start + m0 + row
                             : (static_cast<int64_t>(b) * heads_q + h) * s.seqlen_q + m0 + row;
      lse[at] = l > 0.f ? fmaf(m_run[r], s.scale, logf(l)) : -INFINITY;
    }
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int d = 0; d < kODTiles; ++d) {
      const int row = warp_row + 16 * mt + g;
      const int chunk = half * (kHalfD / 8) + d;
      const uint32_t at = s_q + row * kRowBytes + ((chunk ^ g) << 4) + t * 4;
      st_shared_b32(at, pack2<T>(o[mt][d][0] * inv[2 * mt], o[mt][d][1] * inv[2 * mt]));
      st_shared_b32(at + 8 * kRowBytes,
                    pack2<T>(o[mt][d][2] * inv[2 * mt + 1], o[mt][d][3] * inv[2 * mt + 1]));
    }
  }
  __syncthreads();
  T* out = reinterpret_cast<T*>(a.out) + static_cast<int64_t>(seq.q_start + m0) * a.out_stride +
           h * D;
  attn::store_tile<D, kBlockM, kThr>(out, a.out_stride, s_q, q_rows, tid);
}

}  // namespace attn_fwd
}  // namespace dk

// Instantiations: kernel name, element type, D, m-tiles per warp (MT), keys per tile (N), min
// blocks per SM. The launcher (src/attention/cuda/forward.rs) mirrors the query rows per block
// (64 · MT) and the dynamic shared memory (Tiling::kSmemBytes). D = 64 runs 32 rows per warp with
// the Q fragments in registers (246-254 registers, 2 blocks per SM); at D = 128 the O accumulators
// alone take 128 registers for 32 rows, and ptxas spills at 255, so it runs 16 rows per warp
// (224-232 registers, 2 blocks per SM). See cuda/ATTENTION.md.
#define DK_ATTN_FWD_KERNEL(tname, T, D, MT, N, MIN_BLOCKS)                                   \
  extern "C" __global__ void __launch_bounds__(dk::attn_fwd::kThreads, MIN_BLOCKS)           \
      dk_attn_fwd_##tname##_d##D(const DkAttentionFwdArgs args) {                           \
    extern __shared__ __align__(16) unsigned char dk_attn_fwd_smem[];                       \
    dk::attn_fwd::forward<T, D, MT, N>(args, dk_attn_fwd_smem);                             \
  }

DK_ATTN_FWD_KERNEL(bf16, __nv_bfloat16, 64, 2, 64, 2)
DK_ATTN_FWD_KERNEL(bf16, __nv_bfloat16, 128, 1, 64, 2)
DK_ATTN_FWD_KERNEL(f16, __half, 64, 2, 64, 2)
DK_ATTN_FWD_KERNEL(f16, __half, 128, 1, 64, 2)

// The D = 128 split kernel (8 warps, 128 rows; DK_ATTENTION_FWD=wide until measured).
#define DK_ATTN_FWD_SPLIT_KERNEL(tname, T)                                                     \
  extern "C" __global__ void __launch_bounds__(dk::attn_fwd::SplitTiling<128>::kThreads, 1)   \
      dk_attn_fwd_##tname##_d128w(const DkAttentionFwdArgs args) {                            \
    extern __shared__ __align__(16) unsigned char dk_attn_fwd_smem[];                         \
    dk::attn_fwd::forward_split<T, 128>(args, dk_attn_fwd_smem);                              \
  }

DK_ATTN_FWD_SPLIT_KERNEL(bf16, __nv_bfloat16)
DK_ATTN_FWD_SPLIT_KERNEL(f16, __half)
