// Attention forward on Hopper's warpgroup MMA (wgmma, sm_90a; the default on compute capability
// 9.0 since measured at 1.45-1.64x the mma.sync kernel on an H200, `DK_ATTENTION_FWD=mma` for
// those): the same contract as cuda/attention_forward.cu, with the tensor cores reading K and
// V (and Q) straight from shared memory instead of through ldmatrix. Design notes:
// cuda/ATTENTION.md ("Forward on wgmma").
//
// A block of 2 warpgroups (256 threads) owns 128 query rows of one (sequence, query head); each
// warpgroup owns 64 rows. The block walks 128-key tiles from the last one its rows see down to
// 0 (as the other forward kernels: masked tiles first, then a copy of the loop without the
// mask). Shared memory, all in the 128-byte-swizzle layout of dk_wgmma.cuh (tiles 1024-byte
// aligned): the Q tile, and two stages of K and V tiles. Per key tile n (stage n & 1 of the walk):
//   wait for this thread's copies of K(n), V(n); fence.proxy.async; barrier
//                                 -- everyone's copies visible to wgmma, everyone done with
//                                    tile n + 1, whose stage takes K(n − 1), V(n − 1) (queued
//                                    once this warpgroup's S products are issued)
//   S = Q · K(n)ᵀ                 wgmma m64n128k16 × D / 16, A and B from shared memory;
//                                 warpgroup 1 issues after warpgroup 0 (ping-pong)
//   mask; online softmax          on the accumulators, rows in lane quads as with mma.sync
//   O += P · V(n)                 wgmma m64nDk16 × 8, P from registers (the S accumulators
//                                 packed), V as the MN-major B operand
// so one barrier per tile, and the next tile's loads have a whole tile to land. The ping-pong
// offsets the warpgroups by one product batch: while one computes its softmax, the tensor cores
// run the other's products. The output is
// divided by the row sum, staged through the Q tile and written with 16-byte stores; rows that
// see no key write 0 and LSE −∞.
#include <math.h>
#include <stdint.h>

#include "dk_attention_fwd_args.h"
#include "dk_attention_fwd_block.cuh"
#include "dk_attention_tile.cuh"
#include "dk_mma.cuh"
#include "dk_wgmma.cuh"
#include "dk_wgmma_tiles.cuh"

namespace dk {
namespace attn_fwd {

// Tiling of the wgmma kernel for head dimension D.
template <int D>
struct WgTiling {
  static constexpr int kThreads = 256;  // 2 warpgroups
  static constexpr int kBlockM = 128;   // query rows per block, 64 per warpgroup
  static constexpr int kN = 128;        // keys per tile
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kKVBytes = kN * D * 2;
  // 1024 bytes of slack to align the tiles, Q, then two stages of (K, V).
  static constexpr int kSmemBytes = 1024 + kQBytes + 4 * kKVBytes;
};

#if defined(DK_HAS_WGMMA)

template <typename T, int D>
__device__ __forceinline__ void forward_wgmma(const DkAttentionFwdArgs& a, unsigned char* smem) {
  using Tl = WgTiling<D>;
  constexpr int kThr = Tl::kThreads;
  constexpr int kBlockM = Tl::kBlockM;
  constexpr int kN = Tl::kN;
  constexpr int kPVSteps = kN / 16;  // k-steps of P·V
  constexpr int kSRegs = kN / 2;     // S accumulators per thread (64 rows × kN per warpgroup)
  constexpr int kORegs = D / 2;      // O accumulators per thread
  static_assert(D == 64 || D == 128, "head dimensions");

  // Tiles: Q, then stage s at Q + s · 2 · kKVBytes: K, V. Each a multiple of 1024 bytes.
  const uint32_t s_q = (smem_addr(smem) + 1023u) & ~1023u;
  const uint32_t s_kv0 = s_q + Tl::kQBytes;

  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // The warpgroup (rows 64 wg .. 64 wg + 63), known warp-uniform (a shuffle from lane 0): its
  // descriptor arithmetic then runs in uniform registers instead of a vector-to-uniform move
  // per product.
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0);
  const int g = lane >> 2;
  const int t = lane & 3;
  const int warp_row = 64 * wg + 16 * (warp & 3);  // the warp's 16 rows (g, g + 8)

  // Descriptors: Q (K-major, this warpgroup's 64 rows), K (K-major, the kN keys), V (MN-major,
  // LBO = the distance between the two 64-column halves of a tile). SBO: 8 rows of 128 bytes.
  // A k-step moves Q and K by 32 bytes inside a 128-byte row, and to the second half after 4;
  // V by 16 key rows.
  const uint64_t q_desc = wgmma_desc_kmajor(s_q + 64 * wg * 128);
  const uint64_t k_desc0 = wgmma_desc_kmajor(s_kv0);
  const uint64_t v_desc0 = wgmma_desc_mnmajor(s_kv0 + Tl::kKVBytes, kN * 128);
  constexpr uint32_t kStageDesc = (2 * Tl::kKVBytes) >> 4;  // descriptor units per stage

  const float scale_log2 = s.scale_log2;
  const int heads_q = s.heads_q;
  FwdBlock<T, D, kBlockM, kN> blk;
  if (!blk.init(a, warp_row + g)) return;  // past this sequence's end (varlen)
  const attn::SeqRows& seq = blk.seq;
  const int h = blk.h, b = blk.b, m0 = blk.m0, q_rows = blk.q_rows;
  const int lim_g = blk.lim_g, n_tiles = blk.n_tiles, n_full = blk.n_full;

  // Key tile n of K and V into stage `st`, rows past the sequence end zero-filled.
  auto load_kv = [&](int n, int st) {
    const int rows = seq.k_len - n * kN;
    const uint32_t sk = s_kv0 + st * 2 * Tl::kKVBytes;
    attn::load_tile_async<D, kN, kThr, true>(sk, blk.k + static_cast<int64_t>(n) * kN * a.k_stride,
                                             a.k_stride, rows, tid);
    attn::load_tile_async<D, kN, kThr, true>(sk + Tl::kKVBytes,
                                             blk.v + static_cast<int64_t>(n) * kN * a.v_stride,
                                             a.v_stride, rows, tid);
  };
  attn::load_tile_async<D, kBlockM, kThr, true>(s_q, blk.q, a.q_stride, q_rows, tid);
  if (n_tiles > 0) load_kv(n_tiles - 1, 0);
  cp_async_commit();

  float o[kORegs];
#pragma unroll
  for (int i = 0; i < kORegs; ++i) o[i] = 0.f;
  float sc[kSRegs];
#pragma unroll
  for (int i = 0; i < kSRegs; ++i) sc[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of the raw scores, rows g and g + 8
  float l_run[2] = {0.f, 0.f};              // this lane's part of the row sums

  auto tile = [&](int n, auto masked) {
    const int st = (n_tiles - 1 - n) & 1;
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();

    // S = Q · K(n)ᵀ: this warpgroup's 64 rows × kN keys. Ping-pong: warpgroup 1 issues its
    // products after warpgroup 0's (named barrier 1), so the tensor cores run them one after
    // the other and each warpgroup's softmax overlaps the other's products.
    const uint64_t k_desc = k_desc0 + st * kStageDesc;
    if (wg == 1) named_barrier_sync(1, kThr);
    wgmma_fence_operands(sc);
    wgmma_fence();
    wgmma_abt<T, kN, D, kBlockM, kN>(sc, q_desc, k_desc);
    wgmma_commit();
    if (wg == 0) named_barrier_arrive(1, kThr);
    // The next tile's K, V into the other stage (free since the barrier), while S runs: not
    // between the barrier and the products.
    if (n > 0) load_kv(n - 1, st ^ 1);
    cp_async_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(sc);

    if constexpr (decltype(masked)::value) {
      // sc[4 j + 2 i + e]: row warp_row + g + 8 i, key n kN + 8 j + 2 t + e.
      const int lim0 = row_limit(seq.k_len, lim_g, 0) - n * kN - 2 * t;
      const int lim1 = row_limit(seq.k_len, lim_g, 8) - n * kN - 2 * t;
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (8 * j + e >= lim0) sc[4 * j + e] = -INFINITY;
          if (8 * j + e >= lim1) sc[4 * j + 2 + e] = -INFINITY;
        }
      }
    }

    // Online softmax over rows g (i = 0) and g + 8 (i = 1); a row spans a lane quad.
    float ms[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = m_run[i];
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) mx = fmaxf(mx, fmaxf(sc[4 * j + 2 * i], sc[4 * j + 2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with every key so far masked keeps max −∞: subtract 0 so exp2(−∞ − 0) = 0.
      ms[i] = mx == -INFINITY ? 0.f : mx * scale_log2;
      const float alpha = exp2_fast(m_run[i] * scale_log2 - ms[i]);  // 0 while m_run = −∞
      m_run[i] = mx;
      l_run[i] *= alpha;
#pragma unroll
      for (int j = 0; j < kORegs / 4; ++j) {
        o[4 * j + 2 * i] *= alpha;
        o[4 * j + 2 * i + 1] *= alpha;
      }
    }
    // P = exp2(s · scale_log2 − m · scale_log2), packed: k-step kk of P·V takes the accumulators
    // of keys 16 kk .. 16 kk + 15, sc[8 kk .. 8 kk + 7], in the A fragment order.
    uint32_t pa[kPVSteps][4];
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      const float p0 = exp2_fast(fmaf(sc[4 * j], scale_log2, -ms[0]));
      const float p1 = exp2_fast(fmaf(sc[4 * j + 1], scale_log2, -ms[0]));
      const float p2 = exp2_fast(fmaf(sc[4 * j + 2], scale_log2, -ms[1]));
      const float p3 = exp2_fast(fmaf(sc[4 * j + 3], scale_log2, -ms[1]));
      l_run[0] += p0 + p1;
      l_run[1] += p2 + p3;
      pa[j >> 1][(j & 1) * 2] = pack2<T>(p0, p1);
      pa[j >> 1][(j & 1) * 2 + 1] = pack2<T>(p2, p3);
    }

    // O += P · V(n): this warpgroup's 64 rows × D.
    const uint64_t v_desc = v_desc0 + st * kStageDesc;
    wgmma_fence_operands(o);
    wgmma_fence();
    wgmma_ab_regs<T, D, kN>(o, pa, v_desc);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(o);
  };

  int n = n_tiles - 1;
  for (; n >= n_full; --n) tile(n, BoolTag<true>());
  for (; n >= 0; --n) tile(n, BoolTag<false>());

  // Row sums over the quad; LSE; O / l in T staged in the Q tile (after every warpgroup's last
  // product has read it: the barrier), then 16-byte stores of the block's valid rows.
  cp_async_wait<0>();  // with no key tile the Q copy is still in flight
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i] + __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[i] = l > 0.f ? 1.f / l : 0.f;
    const int row = warp_row + g + 8 * i;
    if (t == 0 && row < q_rows) {
      float* lse = reinterpret_cast<float*>(a.lse);
      const int64_t at = s.cu_seqlens_q != 0
                             ? static_cast<int64_t>(h) * s.total_q + seq.q_start + m0 + row
                             : (static_cast<int64_t>(b) * heads_q + h) * s.seqlen_q + m0 + row;
      lse[at] = l > 0.f ? fmaf(m_run[i], s.scale, logf(l)) : -INFINITY;
    }
  }
  __syncthreads();
  stage_acc_wg<T, kBlockM, D>(o, inv[0], inv[1], s_q, warp_row + g, t);
  __syncthreads();
  T* out = reinterpret_cast<T*>(a.out) + static_cast<int64_t>(seq.q_start + m0) * a.out_stride +
           h * D;
  attn::store_tile<D, kBlockM, kThr, true>(out, a.out_stride, s_q, q_rows, tid);
}

#endif  // DK_HAS_WGMMA

}  // namespace attn_fwd
}  // namespace dk

// Instantiations (sm_90a only; the sm_80 cubin gets empty bodies the launcher never runs).
#if defined(DK_HAS_WGMMA)
#define DK_ATTN_FWD_WG_BODY(T, D) dk::attn_fwd::forward_wgmma<T, D>(args, dk_attn_fwd_smem);
#else
#define DK_ATTN_FWD_WG_BODY(T, D) (void)args;
#endif

#define DK_ATTN_FWD_WG_KERNEL(tname, T, D)                                                     \
  extern "C" __global__ void __launch_bounds__(dk::attn_fwd::WgTiling<D>::kThreads, 1)        \
      dk_attn_fwd_##tname##_d##D##g(const DkAttentionFwdArgs args) {                          \
    extern __shared__ __align__(16) unsigned char dk_attn_fwd_smem[];                         \
    DK_ATTN_FWD_WG_BODY(T, D)                                                                 \
  }

DK_ATTN_FWD_WG_KERNEL(bf16, __nv_bfloat16, 64)
DK_ATTN_FWD_WG_KERNEL(bf16, __nv_bfloat16, 128)
DK_ATTN_FWD_WG_KERNEL(f16, __half, 64)
DK_ATTN_FWD_WG_KERNEL(f16, __half, 128)
