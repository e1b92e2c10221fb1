// Attention backward on tensor cores (mma.sync m16n8k16, f32 accumulators). Two modes, three
// launches each on the caller's stream, every kernel taking DkAttentionBwdArgs by value. Design,
// budgets and costs: cuda/ATTENTION.md, "## Backward".
//
// Deterministic mode (1, 2, 3): no atomics, every output element is written once by one thread,
// so dQ, dK and dV are bitwise reproducible. Seven GEMMs per (query tile, key tile).
// Atomic-dQ mode (1', 2', 4): five GEMMs, as FlashAttention-2; dK and dV are still written once
// (bitwise reproducible), dQ is summed over key tiles by f32 reductions in L2 (not reproducible
// bit for bit: the order of the additions varies from run to run).
//
//   1. dk_attn_bwd_delta_<t>_d<D>: Delta[row, h] = sum_d dO[row, h, d] * O[row, h, d] (f32), into
//      the workspace, laid out like the LSE. D / 8 threads per (row, head), 16-byte loads.
//   2. dk_attn_bwd_dkdv_<t>_d<D>: one block (4 warps) per (tile of 64 key rows, KV head,
//      sequence); warp w owns key rows 16w .. 16w + 15 of the tile. K and V of the tile sit in
//      shared memory; the block loops over the G query heads of the KV head and over the query
//      tiles (Br rows) that see the key tile, double-buffering Q, dO, LSE and Delta with cp.async.
//      Per query tile and warp, with everything transposed so that the warp's key rows are the
//      MMA rows:  S^T = K Q^T,  P^T = exp2(S^T scale log2 e - LSE log2 e),  dV += P^T dO,
//      dP^T = V dO^T,  dS^T = P^T o (dP^T - Delta),  dK += dS^T Q. The C fragments of P^T and
//      dS^T are the A fragments of the next MMA (dk_mma.cuh), dO and Q are read as B operands
//      with ldmatrix (.trans for the products over the query axis). dK, dV stay in registers for
//      the whole loop and are written once (dK times the scale): the sum over the query group
//      happens in the accumulators.
//   3. dk_attn_bwd_dq_<t>_d<D>: one block (4 warps) per (tile of 64 query rows, query head,
//      sequence); warp w owns query rows 16w .. 16w + 15, whose Q and dO fragments stay in
//      registers. Loop over the key tiles the query tile sees (K and V double-buffered):
//      S = Q K^T, P, dP = dO V^T, dS = P o (dP - Delta), dQ += dS K (ldmatrix.trans on K).
//      dQ written once, times the scale.
//   1'. The Delta kernel also zeroes the f32 dQ accumulator (workspace, [total_q, heads_q * D]).
//   2'. dk_attn_bwd_dkdvdq_<t>_d<D>: kernel 2, and per loop step dS^T goes to shared memory,
//      then the 4 warps (2 x 2 over query rows and head columns) compute dQ_tile = dS K and add
//      it into the accumulator with red.global.add (.v2 on sm_90).
//   4. dk_attn_bwd_dq_convert_<t>_d<D>: dQ = scale * accumulator, in T, 16-byte stores.
//
// Masking: rows past the end of a sequence are zero-filled by cp.async (no out-of-bounds read)
// and get LSE = -inf (so P = 0) and Delta = 0; score entries of keys past the end or above the
// causal diagonal (query i sees key j iff j <= i + Sk - Sq) are set to -inf before the exp.
// A LSE of -inf (a query row that sees no key) is turned into +inf in the exponent, so P = 0
// and dS = 0 for that row: its dQ is 0, never NaN.
//
// Shared tiles are [rows][D] of 16-byte chunks, chunk c of row r stored at chunk c ^ (r & 7):
// the eight row addresses of every ldmatrix phase and of the cp.async writes hit distinct banks.

#include <limits.h>
#include <stddef.h>

#include <type_traits>

#include "dk_attention_bwd_args.h"
#include "dk_attention_bwd_common.cuh"
#include "dk_mma.cuh"
#include "dk_vec.cuh"

// The layout the Rust mirror (AttentionBwdArgs, src/attention/cuda/backward.rs) asserts in its
// unit test: both sides checked against the same numbers.
static_assert(sizeof(DkAttentionShape) == 56 && sizeof(DkAttentionBwdArgs) == 208,
              "DkAttentionBwdArgs layout changed: update the Rust mirror");
static_assert(offsetof(DkAttentionShape, batch) == 16 && offsetof(DkAttentionShape, causal) == 44 &&
                  offsetof(DkAttentionShape, scale_log2) == 52,
              "DkAttentionShape layout changed: update the Rust mirror");
static_assert(offsetof(DkAttentionBwdArgs, dout) == 56 && offsetof(DkAttentionBwdArgs, delta) == 104 &&
                  offsetof(DkAttentionBwdArgs, dv) == 128 &&
                  offsetof(DkAttentionBwdArgs, dout_stride) == 136 &&
                  offsetof(DkAttentionBwdArgs, dv_stride) == 192 &&
                  offsetof(DkAttentionBwdArgs, dq_accum) == 200,
              "DkAttentionBwdArgs layout changed: update the Rust mirror");

namespace dk {
namespace attn_bwd {

constexpr int kThreads = 128;       // dK/dV and dQ kernels: 4 warps, 16 rows each
// Blocks per SM the dK/dV and dQ kernels are compiled for (caps registers at 65536 / (128 x n)):
// 2 for D = 128 (the accumulators alone take 128 / 64 registers), 3 for D = 64.
template <int D> constexpr int min_blocks() { return D == 64 ? 3 : 2; }
constexpr int kDeltaThreads = 256;  // Delta kernel

// Tile shapes (the Rust launcher mirrors them: src/attention/cuda/backward.rs).
template <int D> struct DkdvTile {
  static constexpr int kBc = 64;               // key rows per block (4 warps x 16)
  static constexpr int kBr = D == 64 ? 64 : 32;  // query rows per loop step
  static constexpr int kSmemBytes = (2 * kBc * D + 4 * kBr * D) * 2 + 4 * kBr * 4;
  // Atomic-dQ mode: plus the dS^T tile, [kBc][kDsW] with rows 64 elements wide (8 chunks, so the
  // [rows][64] swizzle applies; at kBr = 32 only 4 of each row's 8 chunks hold data, spread over
  // the row by the swizzle).
  static constexpr int kDsW = 64;
  static_assert(kBr <= kDsW, "dS^T tile row too narrow");
  static constexpr int kSmemBytesAtomicDq = kSmemBytes + kBc * kDsW * 2;
};
template <int D> struct DqTile {
  static constexpr int kBr = 64;               // query rows per block (4 warps x 16)
  static constexpr int kBc = D == 64 ? 64 : 32;  // key rows per loop step
  static constexpr int kSmemBytes = (2 * kBr * D + 4 * kBc * D) * 2;
};

// ldmatrix addressing. In a 16-row block of a swizzled tile, lane l hands ldmatrix the address
// of row `lrow` (0..15), chunk `c0 + lc` (c0 even, lc 0 or 1): since row & 7 = lrow & 7 and
// c0 + lc = c0 ^ lc, its byte offset is lane_off ^ (c0 * 16) with the per-lane constant
// lane_off = lrow * 2D + ((lc ^ (lrow & 7)) * 16) (the XOR only touches the chunk bits, below
// 2D). So each fragment address is one XOR with an immediate plus the tile and row-block base.
template <int D> __device__ __forceinline__ uint32_t lane_offset(int lrow, int lc) {
  return static_cast<uint32_t>(lrow * 2 * D + ((lc ^ (lrow & 7)) << 4));
}
// The two lane patterns of the kernels' ldmatrix x4 reads in a swizzled [rows][W] tile (matrix
// mi = lane / 8 gets rows lane % 8 of ...):
//   a_lane: an A operand, or a B operand read with .trans: matrices (rows 0-7 | 8-15) x (chunk
//           c0 | c0 + 1);
//   b_lane: a B operand read plainly, or an A operand stored transposed ([k][m] rows, read with
//           .trans): matrices (chunk c0 | c0 + 1) x (rows 0-7 | 8-15).
template <int W> __device__ __forceinline__ uint32_t a_lane(int lane) {
  return lane_offset<W>(((lane >> 3) & 1) * 8 + (lane & 7), lane >> 4);
}
template <int W> __device__ __forceinline__ uint32_t b_lane(int lane) {
  return lane_offset<W>((lane >> 4) * 8 + (lane & 7), (lane >> 3) & 1);
}

template <int D>
__device__ __forceinline__ uint32_t frag_addr(uint32_t tile, int row16, int c0, uint32_t lane_off) {
  return tile + static_cast<uint32_t>(row16 * 2 * D) + (lane_off ^ static_cast<uint32_t>(c0 << 4));
}

// acc[mt][2n .. 2n+1] (16 rows x 16 columns each pair) += A (the 16 x D blocks at tile rows
// a_row + 16 mt) times the transpose of the B tile rows b_row .. b_row + N - 1 (N rows x D): the
// B operand of an n-tile is 8 B rows, read with non-transposed ldmatrix (B[k][n] = rowsB[n][k]),
// and each B fragment feeds all MT m-tiles (the 128-key dK/dV kernel's two: half the B traffic
// per MMA of one). KU: k-steps unrolled (all by default; the 128-key kernel unrolls 4, the period
// of the swizzle's XOR pattern, which keeps its fragment addresses in few registers).
template <typename T, int D, int MT, int N, int KU = D / 16>
__device__ __forceinline__ void mma_abt_tiles(float (&acc)[MT][N / 8][4], uint32_t a_tile, int a_row,
                                              uint32_t b_tile, int b_row, uint32_t a_off,
                                              uint32_t b_off) {
#pragma unroll KU
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(af[mt], frag_addr<D>(a_tile, a_row + 16 * mt, 2 * kk, a_off));
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t bf[4];
      ldmatrix_x4(bf, frag_addr<D>(b_tile, b_row + nn * 16, 2 * kk, b_off));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * nn], af[mt], bf);
        mma_16816<T>(acc[mt][2 * nn + 1], af[mt], bf + 2);
      }
    }
  }
}

// One m-tile of mma_abt_tiles, B rows from 0.
template <typename T, int D, int N>
__device__ __forceinline__ void mma_abt_smem(float (&acc)[N / 8][4], uint32_t a_tile, int a_row16,
                                             uint32_t b_tile, uint32_t a_off, uint32_t b_off) {
  mma_abt_tiles<T, D, 1, N>(reinterpret_cast<float(&)[1][N / 8][4]>(acc), a_tile, a_row16, b_tile,
                            0, a_off, b_off);
}

// As mma_abt_smem with the A fragments already in registers.
template <typename T, int D, int N>
__device__ __forceinline__ void mma_abt_regs(float (&acc)[N / 8][4], const uint32_t (&af)[D / 16][4],
                                             uint32_t b_tile, uint32_t b_off) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t bf[4];
      ldmatrix_x4(bf, frag_addr<D>(b_tile, nn * 16, 2 * kk, b_off));
      mma_16816<T>(acc[2 * nn], af[kk], bf);
      mma_16816<T>(acc[2 * nn + 1], af[kk], bf + 2);
    }
  }
}

// out (16 x D, D / 8 n-tiles) += X (16 x K, the C fragments of K / 8 n-tiles, converted to A
// fragments) times the B tile (K rows x D, read with ldmatrix.trans: B[k][n] = rows[k][n]).
template <typename T, int D, int K>
__device__ __forceinline__ void mma_xb_trans(float (&out)[D / 8][4], const float (&x)[K / 8][4],
                                             uint32_t b_tile, uint32_t lane_off) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
                           pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                           pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, frag_addr<D>(b_tile, kk * 16, 2 * dn, lane_off));
      mma_16816<T>(out[2 * dn], a, bf);
      mma_16816<T>(out[2 * dn + 1], a, bf + 2);
    }
  }
}

// out[mt] (16 rows x NC columns each) += A (16 x K) times B (K rows of the swizzled [rows][WB]
// tile `b_tile`, columns b_col .. b_col + NC - 1, read with ldmatrix.trans: B[k][n] = rows[k][n]).
// A comes from the swizzled [rows][WA] tile `a_tile`: with kATrans = false its m-tile mt is the
// rows a_m + 16 mt (columns = k, lane pattern a_off of an A operand); with kATrans = true the
// tile holds A transposed ([k][m] rows, read with .trans, lane pattern of a non-transposed B
// operand) and the m-tile is the columns a_m + 16 mt. Each B fragment feeds all MT m-tiles. KU:
// k-steps unrolled, as in mma_abt_tiles.
template <typename T, int WA, int WB, int MT, int K, int NC, bool kATrans, int KU = K / 16>
__device__ __forceinline__ void mma_tiles_bt(float (&out)[MT][NC / 8][4], uint32_t a_tile, int a_m,
                                             uint32_t a_off, uint32_t b_tile, int b_col,
                                             uint32_t b_off) {
#pragma unroll KU
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (kATrans) {
        ldmatrix_x4_trans(af[mt], frag_addr<WA>(a_tile, kk * 16, (a_m + mt * 16) / 8, a_off));
      } else {
        ldmatrix_x4(af[mt], frag_addr<WA>(a_tile, a_m + mt * 16, 2 * kk, a_off));
      }
    }
#pragma unroll
    for (int p = 0; p < NC / 16; ++p) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, frag_addr<WB>(b_tile, kk * 16, b_col / 8 + 2 * p, b_off));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(out[mt][2 * p], af[mt], bf);
        mma_16816<T>(out[mt][2 * p + 1], af[mt], bf + 2);
      }
    }
  }
}

// Stages a warp's accumulator block (MT m-tiles of 16 rows from tile row `row0`, NC columns
// from column `col0`), times `mul`, in T, into the swizzled [rows][D] tile `stage` (4-byte
// stores of the C fragments: the 8 rows of a lane quad hit 8 distinct bank groups).
template <typename T, int D, int MT, int NC>
__device__ __forceinline__ void stage_acc(const float (&acc)[MT][NC / 8][4], float mul, T* stage,
                                          int row0, int col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int dt = 0; dt < NC / 8; ++dt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 16 * mt + g + 8 * r;
        *reinterpret_cast<uint32_t*>(stage + swz<D>(row, col0 / 8 + dt) + 2 * t) =
            pack2<T>(acc[mt][dt][2 * r] * mul, acc[mt][dt][2 * r + 1] * mul);
      }
}

// Copies ROWS staged rows of the swizzled [rows][D] tile `stage` to global rows of `dst` (row
// stride `stride`) with 16-byte stores by NT threads (index `tid`), rows >= `valid` skipped.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void copy_rows_out(const T* stage, T* dst, int64_t stride, int valid,
                                              int tid) {
  constexpr int kChunks = D / 8;
  static_assert(ROWS * kChunks % NT == 0, "rows not a multiple of the threads");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / NT; ++it) {
    const int i = it * NT + tid;
    const int r = i / kChunks, c = i % kChunks;
    if (r < valid) {
      const uint4 v = *reinterpret_cast<const uint4*>(stage + swz<D>(r, c));
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(r) * stride + c * 8) = v;
    }
  }
}

// Writes a warp's 16 x D accumulator block (times `mul`, in T) to global rows
// `row0 + 0..15` of `dst` (row stride `stride`), rows >= `valid` skipped. Goes through the
// warp's own 16 rows of the swizzled tile `stage` for 16-byte coalesced stores; those rows must
// be read only by this warp (the callers' A-operand rows).
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float mul, T* stage,
                                           T* dst, int64_t stride, int valid, int lane) {
  __syncwarp();
  stage_acc<T, D, 1, D>(reinterpret_cast<const float(&)[1][D / 8][4]>(acc), mul, stage, 0, 0, lane);
  __syncwarp();
  copy_rows_out<T, D, 16, 32>(stage, dst, stride, valid, lane);
}

// ---- 1. Delta ------------------------------------------------------------------------------

template <typename T, int D>
__device__ __forceinline__ void delta_kernel(const DkAttentionBwdArgs& a) {
  constexpr int kLanes = D / 8;  // threads per (row, head), 8 elements each
  constexpr int kItems = kDeltaThreads / kLanes;
  const DkAttentionShape& s = a.shape;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kItems + threadIdx.x / kLanes;
  const int sub = threadIdx.x % kLanes;
  const bool ok = item < static_cast<int64_t>(s.total_q) * s.heads_q;
  int row = 0, h = 0;
  float acc = 0.f;
  if (ok) {
    row = static_cast<int>(item / s.heads_q);
    h = static_cast<int>(item % s.heads_q);
    const T* dout = reinterpret_cast<const T*>(a.dout) + static_cast<int64_t>(row) * a.dout_stride +
                    h * D + sub * 8;
    const T* out = reinterpret_cast<const T*>(a.out) + static_cast<int64_t>(row) * a.out_stride +
                   h * D + sub * 8;
    float x[kVec], y[kVec];
    load8(dout, x);
    load8(out, y);
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc = fmaf(x[i], y[i], acc);
    if (a.dq_accum != 0) {  // atomic-dQ mode: this (row, head)'s accumulator starts at 0
      const float zero[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      store8(reinterpret_cast<float*>(a.dq_accum) + item * D + sub * 8, zero);
    }
  }
  // The kLanes threads of an item are consecutive lanes of one warp.
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (ok && sub == 0) {
    int64_t idx;
    if (s.cu_seqlens_q != 0) {
      idx = static_cast<int64_t>(h) * s.total_q + row;
    } else {
      const int b = row / s.seqlen_q, sq = row % s.seqlen_q;
      idx = (static_cast<int64_t>(b) * s.heads_q + h) * s.seqlen_q + sq;
    }
    reinterpret_cast<float*>(a.delta)[idx] = acc;
  }
}

// ---- 2. dK, dV -----------------------------------------------------------------------------

// dQ_tile (Br query rows x D) = dS (Br x Bc, stored transposed in the swizzled [Bc][W] tile at
// `ds_tile`) times K (the block's [Bc][D] tile), added into the f32 accumulator rows `accum`
// (row stride `accum_stride`), rows >= `valid` skipped. Warps 2 x WARPS_N: warp w owns query rows
// (w / WARPS_N) Br / 2 .. and columns (w % WARPS_N) D / WARPS_N .. (2 x 2 for the 64-key kernel,
// 2 x 4 for the 128-key one: 32 accumulators per thread at D = 128; KU k-steps unrolled). A
// fragments of dS by ldmatrix.trans from [key][query] rows (ds_off: the lane's row / chunk
// pattern of a transposed operand), B fragments of K by ldmatrix.trans as in mma_xb_trans.
template <typename T, int D, int Br, int Bc, int W, int WARPS_N, int KU = Bc / 16>
__device__ __forceinline__ void dq_tile_red(uint32_t ds_tile, uint32_t k_tile, uint32_t ds_off,
                                            uint32_t k_off, float* accum, int64_t accum_stride,
                                            int valid, int warp, int lane) {
  constexpr int WM = Br / 2, WN = D / WARPS_N, MT = WM / 16;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  float acc[MT][WN / 8][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < WN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  mma_tiles_bt<T, W, D, MT, Bc, WN, true, KU>(acc, ds_tile, wm * WM, ds_off, k_tile, wn * WN, k_off);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = wm * WM + mt * 16 + g + 8 * r;
      if (row < valid) {
        float* dst = accum + row * accum_stride + wn * WN + 2 * t;
#pragma unroll
        for (int nt = 0; nt < WN / 8; ++nt)
          red_add_f32x2(dst + nt * 8, acc[mt][nt][2 * r], acc[mt][nt][2 * r + 1]);
      }
    }
}

template <typename T, int D, bool kAtomicDq>
__device__ __forceinline__ void dkdv_kernel(const DkAttentionBwdArgs& a, char* smem) {
  constexpr int Bc = DkdvTile<D>::kBc, Br = DkdvTile<D>::kBr, W = DkdvTile<D>::kDsW;
  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;

  DkdvWalk<T, D, Bc, Br, kThreads> walk(a);
  if (!walk.init()) return;
  const Seq& sq = walk.sq;
  const int k0 = walk.k0, off = walk.off, hk = walk.hk;
  const int n_iter = walk.n_iter();

  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Bc * D;
  T* sQ = sV + Bc * D;       // [2][Br][D]
  T* sdO = sQ + 2 * Br * D;  // [2][Br][D]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * Br * D);  // [2][Br]
  float* sDelta = sLse + 2 * Br;                              // [2][Br]
  T* sdS = reinterpret_cast<T*>(sDelta + 2 * Br);  // [Bc][W], atomic-dQ mode only

  // ldmatrix lane patterns: A and .trans B operands of [][D] tiles, plain B operands, and the
  // transposed dS^T tile's A operand (the plain B pattern on W-wide rows).
  const uint32_t a_off = a_lane<D>(lane), b_off = b_lane<D>(lane), ds_off = b_lane<W>(lane);

  // Per-thread key rows g and g + 8 of the warp: a score column (query i) is masked when
  // i < qmin (keys past the end: every query; causal: queries before j - off).
  int qmin[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = k0 + warp * 16 + g + 8 * r;
    qmin[r] = j >= sq.len_k ? INT_MAX : (s.causal ? j - off : INT_MIN);
  }

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  if (n_iter > 0) {
    const typename DkdvWalk<T, D, Bc, Br, kThreads>::Stages stages{sQ, sdO, sLse, sDelta};
    walk.start(sK, sV, stages, tid);

    const uint32_t sK_a = smem_addr(sK), sV_a = smem_addr(sV);
    const float scale_log2 = s.scale_log2;

    for (int idx = 0; idx < n_iter; ++idx) {
      const int st = idx & 1;
      walk.begin_step(idx, stages, tid);
      const int q0 = walk.q0(idx);
      const bool need_mask = walk.need_mask(q0);
      const uint32_t sQ_a = smem_addr(sQ + st * Br * D), sdO_a = smem_addr(sdO + st * Br * D);

      // S^T = K Q^T (16 key rows x Br queries per warp).
      float sc[Br / 8][4];
#pragma unroll
      for (int i = 0; i < Br / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[i][e] = 0.f;
      mma_abt_smem<T, D, Br>(sc, sK_a, warp * 16, sQ_a, a_off, b_off);

      // P^T = exp2(S^T scale log2 e - LSE log2 e); element (row g + 8r, column 8nt + 2t + e).
      const float* lse_st = sLse + st * Br;
#pragma unroll
      for (int nt = 0; nt < Br / 8; ++nt) {
        const float2 l = *reinterpret_cast<const float2*>(lse_st + nt * 8 + 2 * t);
        const float le[2] = {lse_exponent(l.x), lse_exponent(l.y)};
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = sc[nt][2 * r + e];
            if (need_mask && q0 + nt * 8 + 2 * t + e < qmin[r]) x = neg_inf();
            sc[nt][2 * r + e] = exp2_fast(fmaf(x, scale_log2, -le[e]));
          }
      }

      // dV += P^T dO.
      mma_xb_trans<T, D, Br>(dv, sc, sdO_a, a_off);

      // dP^T = V dO^T.
      float dp[Br / 8][4];
#pragma unroll
      for (int i = 0; i < Br / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[i][e] = 0.f;
      mma_abt_smem<T, D, Br>(dp, sV_a, warp * 16, sdO_a, a_off, b_off);

      // dS^T = P^T o (dP^T - Delta), over dP^T.
      const float* delta_st = sDelta + st * Br;
#pragma unroll
      for (int nt = 0; nt < Br / 8; ++nt) {
        const float2 d = *reinterpret_cast<const float2*>(delta_st + nt * 8 + 2 * t);
        dp[nt][0] = sc[nt][0] * (dp[nt][0] - d.x);
        dp[nt][1] = sc[nt][1] * (dp[nt][1] - d.y);
        dp[nt][2] = sc[nt][2] * (dp[nt][2] - d.x);
        dp[nt][3] = sc[nt][3] * (dp[nt][3] - d.y);
      }

      // dK += dS^T Q.
      mma_xb_trans<T, D, Br>(dk, dp, sQ_a, a_off);

      if constexpr (kAtomicDq) {
        // dS^T rows of this warp to shared memory (the previous step's readers passed this
        // step's first barrier), then dQ_tile = dS K for the whole block, added in L2.
        const uint32_t sdS_a = smem_addr(sdS);
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            st_shared_b32(sdS_a + 2 * (swz<W>(warp * 16 + g + 8 * r, nt) + 2 * t),
                          pack2<T>(dp[nt][2 * r], dp[nt][2 * r + 1]));
        __syncthreads();
        const int hq = walk.head(idx);
        const int64_t stride = static_cast<int64_t>(s.heads_q) * D;
        dq_tile_red<T, D, Br, Bc, W, 2>(
            sdS_a, sK_a, ds_off, a_off,
            reinterpret_cast<float*>(a.dq_accum) + (static_cast<int64_t>(sq.q_start) + q0) * stride +
                hq * D,
            stride, sq.len_q - q0, warp, lane);
      }

      walk.end_step(idx, stages, tid);
    }
    // Atomic-dQ mode: every warp read all of sK for dQ; the staging below overwrites it.
    if constexpr (kAtomicDq) __syncthreads();
  }

  // Each warp stages its rows through its own 16 rows of sK / sV (only it ever read them).
  const int valid = sq.len_k - k0 - warp * 16;
  const int64_t row0 = static_cast<int64_t>(sq.k_start) + k0 + warp * 16;
  store_rows<T, D>(dk, s.scale, sK + warp * 16 * D,
                   reinterpret_cast<T*>(a.dk) + row0 * a.dk_stride + hk * D, a.dk_stride, valid,
                   lane);
  store_rows<T, D>(dv, 1.f, sV + warp * 16 * D,
                   reinterpret_cast<T*>(a.dv) + row0 * a.dv_stride + hk * D, a.dv_stride, valid,
                   lane);
}

// ---- 2w. dK, dV (and atomic dQ) in 128-key blocks of 8 warps --------------------------------
//
// The 64-key kernel above gives each warp 16 key rows, so every B fragment (Q, dO) it reads from
// shared memory feeds one m-tile: ~352 bytes of shared-memory traffic per HMMA at D = 128, the
// limit Nsight Compute showed (shared 85 %, tensor 47 %; cuda/ATTENTION.md). Here a block of 8
// warps owns 128 keys and each warp 32 of them (two m-tiles per B fragment), FlashAttention-2's
// layout: warp w = (key group w / 2, half w % 2).
//   S^T, dP^T:  keys 32 (w / 2) .. + 32  x  queries 32 (w % 2) .. + 32 of the 64-query step;
//   P^T, dS^T:  written to shared memory ([128 keys][64 queries], bf16/f16), one barrier;
//   dV, dK:     keys 32 (w / 2) .. + 32  x  head columns (w % 2) D / 2 .. + D / 2, over all 64
//               queries, A fragments of P^T / dS^T by ldmatrix from the tiles;
//   atomic dQ:  dQ_tile = dS K over the 128 keys, warps 2 x 4 (dq_tile_red).
// About 264 bytes per HMMA at D = 128 (model in ATTENTION.md), and in the atomic mode half the
// L2 reductions per FLOP (128 keys per red instead of 64). Each dV element sums the same
// 16-query MMA terms in the same order as the 64-key kernel (extra terms of fully masked rows
// are exact zeros): bitwise the same dV, which tests/attention_kernel_sim checks. dS takes P
// rounded to T (read back from the P^T tile) where the 64-key kernel keeps it in f32, so dK
// differs from it in the last bits (checked against the f64 reference instead).
template <int D> struct DkdvWideTile {
  static constexpr int kThreads = 256;  // 8 warps
  static constexpr int kBc = 128;       // key rows per block: 4 groups of 32
  static constexpr int kBr = 64;        // query rows per step: 2 halves of 32
  static constexpr int kW = 64;         // row width of the P^T / dS^T tiles (= kBr)
  // K and V; two stages of Q and dO; P^T and dS^T; two stages of LSE and Delta.
  static constexpr int kSmemBytes = (2 * kBc * D + 4 * kBr * D + 2 * kBc * kW) * 2 + 4 * kBr * 4;
};

template <typename T, int D, bool kAtomicDq>
__device__ __forceinline__ void dkdv_wide_kernel(const DkAttentionBwdArgs& a, char* smem) {
  using Tile = DkdvWideTile<D>;
  constexpr int Bc = Tile::kBc, Br = Tile::kBr, W = Tile::kW, NT = Tile::kThreads;
  constexpr int HD = D / 2;  // head columns of a warp's dK / dV block
  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int kg = warp >> 1, half = warp & 1;

  DkdvWalk<T, D, Bc, Br, NT> walk(a);
  if (!walk.init()) return;
  const Seq& sq = walk.sq;
  const int k0 = walk.k0, off = walk.off, hk = walk.hk;
  const int n_iter = walk.n_iter();

  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Bc * D;
  T* sQ = sV + Bc * D;       // [2][Br][D]
  T* sdO = sQ + 2 * Br * D;  // [2][Br][D]
  T* sP = sdO + 2 * Br * D;  // [Bc][W]: P^T
  T* sdS = sP + Bc * W;      // [Bc][W]: dS^T
  float* sLse = reinterpret_cast<float*>(sdS + Bc * W);  // [2][Br]
  float* sDelta = sLse + 2 * Br;                          // [2][Br]

  const uint32_t a_off = a_lane<D>(lane), b_off = b_lane<D>(lane);  // [][D] tiles
  const uint32_t pa_off = a_lane<W>(lane), ds_off = b_lane<W>(lane);  // A, A^T: [keys][W]

  // The thread's key rows are j = j0 + 16 mt + 8 r; query column i is masked for key j when
  // j is past the keys or (causal) i < j - off. Computed where a tile needs it rather than
  // held (registers are at the limit at D = 128).
  const int j0 = k0 + 32 * kg + g;

  float dk[2][HD / 8][4], dv[2][HD / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < HD / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mt][i][e] = dv[mt][i][e] = 0.f;

  if (n_iter > 0) {
    const typename DkdvWalk<T, D, Bc, Br, NT>::Stages stages{sQ, sdO, sLse, sDelta};
    walk.start(sK, sV, stages, tid);

    const uint32_t sK_a = smem_addr(sK), sV_a = smem_addr(sV);
    const uint32_t sP_a = smem_addr(sP), sdS_a = smem_addr(sdS);
    const float scale_log2 = s.scale_log2;

    for (int idx = 0; idx < n_iter; ++idx) {
      const int st = idx & 1;
      // Also: every warp is done with step idx - 1's reads of the P^T / dS^T tiles.
      walk.begin_step(idx, stages, tid);
      const int q0 = walk.q0(idx);
      const bool need_mask = walk.need_mask(q0);
      const uint32_t sQ_a = smem_addr(sQ + st * Br * D), sdO_a = smem_addr(sdO + st * Br * D);

      // S^T = K Q^T: the warp's 32 keys x its 32 queries.
      float sc[2][4][4] = {};
      mma_abt_tiles<T, D, 2, 32, 4>(sc, sK_a, 32 * kg, sQ_a, 32 * half, a_off, b_off);

      // P^T; element (key row 32 kg + 16 mt + g + 8 r, query column 32 half + 8 nt + 2 t + e).
      // Two copies, with and without the mask (a uniform branch): computing the mask's compares
      // on every step, as a select, cost ~200 of its ~1300 instructions per warp and step.
      const float* lse_st = sLse + st * Br + 32 * half;
      auto p_of = [&](auto masked) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const float2 l = *reinterpret_cast<const float2*>(lse_st + nt * 8 + 2 * t);
          const float le[2] = {lse_exponent(l.x), lse_exponent(l.y)};
          const int i0 = q0 + 32 * half + nt * 8 + 2 * t;
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                float x = sc[mt][nt][2 * r + e];
                if constexpr (decltype(masked)::value) {
                  const int j = j0 + 16 * mt + 8 * r;
                  if (j >= sq.len_k || (s.causal && i0 + e < j - off)) x = neg_inf();
                }
                sc[mt][nt][2 * r + e] = exp2_fast(fmaf(x, scale_log2, -le[e]));
              }
        }
      };
      if (need_mask) {
        p_of(std::true_type{});
      } else {
        p_of(std::false_type{});
      }

      // P^T to its tile (the previous step's readers passed this step's first barrier). dS
      // reads it back from there, in T: fp32 P (or its packed copy) kept in registers across
      // the dP^T MMAs made ptxas spill at D = 128.
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            st_shared_b32(sP_a + 2 * (swz<W>(32 * kg + 16 * mt + g + 8 * r, 4 * half + nt) + 2 * t),
                          pack2<T>(sc[mt][nt][2 * r], sc[mt][nt][2 * r + 1]));

      // dP^T = V dO^T, then dS^T = P^T o (dP^T - Delta) to its tile.
      float dp[2][4][4] = {};
      mma_abt_tiles<T, D, 2, 32, 4>(dp, sV_a, 32 * kg, sdO_a, 32 * half, a_off, b_off);
      const float* delta_st = sDelta + st * Br + 32 * half;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const float2 d = *reinterpret_cast<const float2*>(delta_st + nt * 8 + 2 * t);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const uint32_t at = 2 * (swz<W>(32 * kg + 16 * mt + g + 8 * r, 4 * half + nt) + 2 * t);
            const float2 p = unpack2<T>(ld_shared_b32(sP_a + at));
            st_shared_b32(sdS_a + at, pack2<T>(p.x * (dp[mt][nt][2 * r] - d.x),
                                               p.y * (dp[mt][nt][2 * r + 1] - d.y)));
          }
      }
      // dV / dK read only their key group's rows of the tiles, written by the group's two warps:
      // the pair's named barrier. The atomic mode's dQ reads every row: the block's.
      if constexpr (kAtomicDq) {
        __syncthreads();
      } else {
        named_barrier_sync(1 + kg, 64);
      }

      // dV += P^T dO and dK += dS^T Q: the warp's 32 keys x its D / 2 head columns, over the
      // step's 64 queries.
      mma_tiles_bt<T, W, D, 2, Br, HD, false, 4>(dv, sP_a, 32 * kg, pa_off, sdO_a, HD * half, a_off);
      mma_tiles_bt<T, W, D, 2, Br, HD, false, 4>(dk, sdS_a, 32 * kg, pa_off, sQ_a, HD * half, a_off);

      if constexpr (kAtomicDq) {
        const int hq = walk.head(idx);
        const int64_t stride = static_cast<int64_t>(s.heads_q) * D;
        dq_tile_red<T, D, Br, Bc, W, 4, 4>(
            sdS_a, sK_a, ds_off, a_off,
            reinterpret_cast<float*>(a.dq_accum) + (static_cast<int64_t>(sq.q_start) + q0) * stride +
                hq * D,
            stride, sq.len_q - q0, warp, lane);
      }

      walk.end_step(idx, stages, tid);
    }
  }

  // dK (times the scale) and dV staged through the K and V tiles, once every warp is done
  // reading them, then stored 16 bytes at a time by the whole block.
  __syncthreads();
  stage_acc<T, D, 2, HD>(dk, s.scale, sK, 32 * kg, HD * half, lane);
  stage_acc<T, D, 2, HD>(dv, 1.f, sV, 32 * kg, HD * half, lane);
  __syncthreads();
  const int valid = sq.len_k - k0;
  const int64_t row0 = static_cast<int64_t>(sq.k_start) + k0;
  copy_rows_out<T, D, Bc, NT>(sK, reinterpret_cast<T*>(a.dk) + row0 * a.dk_stride + hk * D,
                              a.dk_stride, valid, tid);
  copy_rows_out<T, D, Bc, NT>(sV, reinterpret_cast<T*>(a.dv) + row0 * a.dv_stride + hk * D,
                              a.dv_stride, valid, tid);
}

// ---- 3. dQ ---------------------------------------------------------------------------------

template <typename T, int D>
__device__ __forceinline__ void dq_kernel(const DkAttentionBwdArgs& a, char* smem) {
  constexpr int Br = DqTile<D>::kBr, Bc = DqTile<D>::kBc;
  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;

  DqWalk<T, D, Br, Bc, kThreads> walk(a);
  if (!walk.init()) return;
  const Seq& sq = walk.sq;
  const int q0 = walk.q0, hq = walk.hq, n_end = walk.n_end;

  T* sQ = reinterpret_cast<T*>(smem);  // [Br][D]
  T* sdO = sQ + Br * D;                // [Br][D]
  T* sK = sdO + Br * D;                // [2][Bc][D]
  T* sV = sK + 2 * Bc * D;             // [2][Bc][D]

  const uint32_t a_off = a_lane<D>(lane), b_off = b_lane<D>(lane);

  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[i][e] = 0.f;

  if (n_end > 0) {
    // Per-thread query rows g and g + 8 of the warp: LSE exponent, Delta and the last visible key.
    float le[2], dl[2];
    int kmax[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) walk.row(warp * 16 + g + 8 * r, le[r], dl[r], kmax[r]);

    walk.load_q_do(sQ, sdO, tid);
    walk.load_kv(0, sK, sV, tid);
    cp_async_commit();

    // The warp's Q and dO rows as A fragments, kept in registers for the whole loop.
    uint32_t qf[D / 16][4], of[D / 16][4];
    cp_async_wait<1>();
    __syncthreads();
    {
      const uint32_t sQ_a = smem_addr(sQ), sdO_a = smem_addr(sdO);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        ldmatrix_x4(qf[kk], frag_addr<D>(sQ_a, warp * 16, 2 * kk, a_off));
        ldmatrix_x4(of[kk], frag_addr<D>(sdO_a, warp * 16, 2 * kk, a_off));
      }
    }

    const float scale_log2 = s.scale_log2;
    for (int n = 0; n < n_end; ++n) {
      const int st = n & 1;
      walk.begin_step(n, sK, sV, tid);
      const int k0 = n * Bc;
      const bool need_mask = walk.need_mask(n);
      const uint32_t sK_a = smem_addr(sK + st * Bc * D), sV_a = smem_addr(sV + st * Bc * D);

      // S = Q K^T (16 query rows x Bc keys per warp).
      float sc[Bc / 8][4];
#pragma unroll
      for (int i = 0; i < Bc / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[i][e] = 0.f;
      mma_abt_regs<T, D, Bc>(sc, qf, sK_a, b_off);

      // P; element (row g + 8r, key column 8nt + 2t + e).
#pragma unroll
      for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = sc[nt][2 * r + e];
            if (need_mask && k0 + nt * 8 + 2 * t + e > kmax[r]) x = neg_inf();
            sc[nt][2 * r + e] = exp2_fast(fmaf(x, scale_log2, -le[r]));
          }

      // dP = dO V^T.
      float dp[Bc / 8][4];
#pragma unroll
      for (int i = 0; i < Bc / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[i][e] = 0.f;
      mma_abt_regs<T, D, Bc>(dp, of, sV_a, b_off);

      // dS = P o (dP - Delta), over dP.
#pragma unroll
      for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[nt][e] = sc[nt][e] * (dp[nt][e] - dl[e >> 1]);

      // dQ += dS K.
      mma_xb_trans<T, D, Bc>(dq, dp, sK_a, a_off);
    }
  }

  // Each warp stages its rows through its own 16 rows of sQ (only it ever read them).
  const int64_t row0 = static_cast<int64_t>(sq.q_start) + q0 + warp * 16;
  store_rows<T, D>(dq, s.scale, sQ + warp * 16 * D,
                   reinterpret_cast<T*>(a.dq) + row0 * a.dq_stride + hq * D, a.dq_stride,
                   sq.len_q - q0 - warp * 16, lane);
}

// ---- 3w. dQ in 128-row blocks of 8 warps, warp pairs splitting each key step -----------------
//
// The 64-row dQ kernel above gives a warp 16 query rows, so each K / V fragment it reads feeds
// one m-tile (~298 bytes of shared traffic per HMMA at D = 128). Here a pair of warps owns 32
// rows and splits each 64-key step: warp (pair p, half h) computes S and dP for its 32 rows ×
// keys 32 h .. 32 h + 31 (Q and dO fragments from shared memory, each K / V fragment feeding two
// m-tiles), writes dS (in T) to a [128 rows][64 keys] tile, and after one barrier accumulates dQ
// for its 32 rows × head columns h D / 2 .. over all 64 keys (dS fragments from the tile). dQ is
// D registers per thread (64 at D = 128). Each dQ element sums the same 16-key MMA terms in the
// same order as the 64-row kernel's (32-key steps there, 64 here, ascending), so the results are
// bitwise the same (tests/attention_kernel_sim checks it).
template <int D> struct DqWideTile {
  static constexpr int kThreads = 256;  // 8 warps
  static constexpr int kBr = 128;       // query rows per block: 4 pairs of 32
  static constexpr int kBc = 64;        // keys per step: 2 halves of 32
  // Q, dO; two stages of K and V; the dS tile [kBr][kBc].
  static constexpr int kSmemBytes = (2 * kBr * D + 4 * kBc * D + kBr * kBc) * 2;
};

template <typename T, int D>
__device__ __forceinline__ void dq_wide_kernel(const DkAttentionBwdArgs& a, char* smem) {
  using Tile = DqWideTile<D>;
  constexpr int Br = Tile::kBr, Bc = Tile::kBc, NT = Tile::kThreads;
  constexpr int HD = D / 2;  // head columns of a warp's dQ block
  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int pair = warp >> 1, half = warp & 1;
  const int row0 = 32 * pair;  // the pair's first row in the block

  DqWalk<T, D, Br, Bc, NT> walk(a);
  if (!walk.init()) return;
  const Seq& sq = walk.sq;
  const int q0 = walk.q0, hq = walk.hq, n_end = walk.n_end;

  T* sQ = reinterpret_cast<T*>(smem);  // [Br][D]
  T* sdO = sQ + Br * D;                // [Br][D]
  T* sK = sdO + Br * D;                // [2][Bc][D]
  T* sV = sK + 2 * Bc * D;             // [2][Bc][D]
  T* sdS = sV + 2 * Bc * D;            // [Br][Bc]

  const uint32_t a_off = a_lane<D>(lane), b_off = b_lane<D>(lane);  // [][D] tiles
  const uint32_t sa_off = a_lane<Bc>(lane);                           // A: the dS tile

  float dq[2][HD / 8][4] = {};

  if (n_end > 0) {
    // The thread's rows 16 mt + g + 8 i of the pair (index 2 mt + i): LSE exponent, Delta, and
    // the last key each sees.
    float le[4], dl[4];
    int kmax[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) walk.row(row0 + 16 * (r >> 1) + 8 * (r & 1) + g, le[r], dl[r], kmax[r]);

    walk.load_q_do(sQ, sdO, tid);
    walk.load_kv(0, sK, sV, tid);
    cp_async_commit();

    const uint32_t sQ_a = smem_addr(sQ), sdO_a = smem_addr(sdO), sdS_a = smem_addr(sdS);
    const float scale_log2 = s.scale_log2;
    for (int n = 0; n < n_end; ++n) {
      const int st = n & 1;
      // Also: everyone is done with step n - 1's reads of the dS tile.
      walk.begin_step(n, sK, sV, tid);
      const int k0 = n * Bc;
      const bool need_mask = walk.need_mask(n);
      const uint32_t sK_a = smem_addr(sK + st * Bc * D), sV_a = smem_addr(sV + st * Bc * D);

      // S = Q K^T and dP = dO V^T: the pair's 32 rows x this half's 32 keys.
      float sc[2][4][4] = {};
      mma_abt_tiles<T, D, 2, 32, 4>(sc, sQ_a, row0, sK_a, 32 * half, a_off, b_off);
      float dp[2][4][4] = {};
      mma_abt_tiles<T, D, 2, 32, 4>(dp, sdO_a, row0, sV_a, 32 * half, a_off, b_off);

      // P, then dS = P o (dP - Delta) in T to the tile; element (row 16 mt + g + 8 i, key
      // 32 half + 8 nt + 2 t + e). Two copies, with and without the mask (a uniform branch).
      auto ds_of = [&](auto masked) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * mt + (e >> 1);
              float x = sc[mt][nt][e];
              if constexpr (decltype(masked)::value) {
                if (k0 + 32 * half + nt * 8 + 2 * t + (e & 1) > kmax[r]) x = neg_inf();
              }
              const float p = exp2_fast(fmaf(x, scale_log2, -le[r]));
              v[e] = p * (dp[mt][nt][e] - dl[r]);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const int row = row0 + 16 * mt + g + 8 * i;
              st_shared_b32(sdS_a + 2 * (swz<Bc>(row, 4 * half + nt) + 2 * t),
                            pack2<T>(v[2 * i], v[2 * i + 1]));
            }
          }
      };
      if (need_mask) {
        ds_of(std::true_type{});
      } else {
        ds_of(std::false_type{});
      }
      // dQ reads only the pair's rows of the dS tile, written by the pair's two warps.
      named_barrier_sync(1 + pair, 64);

      // dQ += dS K: the pair's 32 rows x this half's D / 2 head columns, over the step's keys.
      mma_tiles_bt<T, Bc, D, 2, Bc, HD, false, 4>(dq, sdS_a, row0, sa_off, sK_a, HD * half, a_off);
    }
  }

  // dQ (times the scale) staged through the Q tile once every warp is done reading it, then
  // stored 16 bytes at a time by the whole block.
  __syncthreads();
  stage_acc<T, D, 2, HD>(dq, s.scale, sQ, row0, HD * half, lane);
  __syncthreads();
  const int64_t grow = static_cast<int64_t>(sq.q_start) + q0;
  copy_rows_out<T, D, Br, NT>(sQ, reinterpret_cast<T*>(a.dq) + grow * a.dq_stride + hq * D,
                              a.dq_stride, sq.len_q - q0, tid);
}

// ---- 4. dQ from the accumulator (atomic-dQ mode) ------------------------------------------

// dq[row, h, :] = scale * accumulator[row, h, :] in T; D / 8 threads per (row, head) as Delta.
template <typename T, int D>
__device__ __forceinline__ void dq_convert_kernel(const DkAttentionBwdArgs& a) {
  constexpr int kLanes = D / 8;
  constexpr int kItems = kDeltaThreads / kLanes;
  const DkAttentionShape& s = a.shape;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kItems + threadIdx.x / kLanes;
  const int sub = threadIdx.x % kLanes;
  if (item >= static_cast<int64_t>(s.total_q) * s.heads_q) return;
  const int row = static_cast<int>(item / s.heads_q), h = static_cast<int>(item % s.heads_q);
  float x[kVec];
  load8(reinterpret_cast<const float*>(a.dq_accum) + item * D + sub * 8, x);
#pragma unroll
  for (int i = 0; i < kVec; ++i) x[i] *= s.scale;
  store8(reinterpret_cast<T*>(a.dq) + static_cast<int64_t>(row) * a.dq_stride + h * D + sub * 8, x);
}

}  // namespace attn_bwd
}  // namespace dk

#define DK_ATTN_BWD_KERNELS(tname, T, D)                                                       \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::kDeltaThreads)                    \
      dk_attn_bwd_delta_##tname##_d##D(const DkAttentionBwdArgs args) {                        \
    dk::attn_bwd::delta_kernel<T, D>(args);                                                    \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::kThreads,                         \
                                              dk::attn_bwd::min_blocks<D>())                   \
      dk_attn_bwd_dkdv_##tname##_d##D(const DkAttentionBwdArgs args) {                         \
    extern __shared__ __align__(16) char dk_attn_bwd_smem[];                                   \
    dk::attn_bwd::dkdv_kernel<T, D, false>(args, dk_attn_bwd_smem);                            \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::kThreads,                         \
                                              dk::attn_bwd::min_blocks<D>())                   \
      dk_attn_bwd_dkdvdq_##tname##_d##D(const DkAttentionBwdArgs args) {                       \
    extern __shared__ __align__(16) char dk_attn_bwd_smem[];                                   \
    dk::attn_bwd::dkdv_kernel<T, D, true>(args, dk_attn_bwd_smem);                             \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::DkdvWideTile<D>::kThreads, 1)    \
      dk_attn_bwd_dkdvw_##tname##_d##D(const DkAttentionBwdArgs args) {                        \
    extern __shared__ __align__(16) char dk_attn_bwd_smem[];                                   \
    dk::attn_bwd::dkdv_wide_kernel<T, D, false>(args, dk_attn_bwd_smem);                       \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::DkdvWideTile<D>::kThreads, 1)    \
      dk_attn_bwd_dkdvdqw_##tname##_d##D(const DkAttentionBwdArgs args) {                      \
    extern __shared__ __align__(16) char dk_attn_bwd_smem[];                                   \
    dk::attn_bwd::dkdv_wide_kernel<T, D, true>(args, dk_attn_bwd_smem);                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::DqWideTile<D>::kThreads, 1)      \
      dk_attn_bwd_dqw_##tname##_d##D(const DkAttentionBwdArgs args) {                          \
    extern __shared__ __align__(16) char dk_attn_bwd_smem[];                                   \
    dk::attn_bwd::dq_wide_kernel<T, D>(args, dk_attn_bwd_smem);                                \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::kDeltaThreads)                    \
      dk_attn_bwd_dq_convert_##tname##_d##D(const DkAttentionBwdArgs args) {                   \
    dk::attn_bwd::dq_convert_kernel<T, D>(args);                                               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::kThreads,                         \
                                              dk::attn_bwd::min_blocks<D>())                   \
      dk_attn_bwd_dq_##tname##_d##D(const DkAttentionBwdArgs args) {                           \
    extern __shared__ __align__(16) char dk_attn_bwd_smem[];                                   \
    dk::attn_bwd::dq_kernel<T, D>(args, dk_attn_bwd_smem);                                     \
  }

DK_ATTN_BWD_KERNELS(bf16, __nv_bfloat16, 64)
DK_ATTN_BWD_KERNELS(bf16, __nv_bfloat16, 128)
DK_ATTN_BWD_KERNELS(f16, __half, 64)
DK_ATTN_BWD_KERNELS(f16, __half, 128)
