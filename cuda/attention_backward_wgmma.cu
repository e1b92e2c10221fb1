// Attention backward's deterministic kernels on Hopper's warpgroup MMA (wgmma, sm_90a; the
// default on compute capability 9.0, for both modes, since measured at 1.64-1.67x the mma.sync
// kernels' forward + backward on an H200; `DK_ATTENTION_BWD=mma` for those): the contracts of kernels 2 and 3 of
// cuda/attention_backward.cu (dK, dV and dQ each written once per element, bitwise
// reproducible) with the tensor cores reading Q, dO, K and V straight from shared memory.
// Design notes: cuda/ATTENTION.md ("Backward on wgmma").
//
// dK/dV (dk_attn_bwd_dkdvg_*): a block of 2 warpgroups owns 128 key rows of one (sequence, KV
// head), 64 per warpgroup, and walks the (query head, 64-query tile) steps that see them
// (DkdvWalk with the wgmma tile layout). Shared memory: K, V, two stages of Q, dO, LSE, Delta.
// Per step, with the warpgroup's keys as the MMA rows:
//   Sᵀ = K · Qᵀ, dPᵀ = V · dOᵀ    two groups of wgmma m64n64k16 × D / 16 (operands in shared
//                                 memory); warpgroup 1 issues after warpgroup 0
//   Pᵀ = exp2(Sᵀ · scale log2 e − LSE log2 e) while dPᵀ runs; dSᵀ = Pᵀ ∘ (dPᵀ − Delta)
//   dV += Pᵀ · dO, dK += dSᵀ · Q  wgmma m64nDk16 × 4 each, Pᵀ / dSᵀ from registers, dO and Q as
//                                 MN-major B operands
// dK · scale and dV are staged through the K and V tiles and written once.
//
// dQ (dk_attn_bwd_dqg_*): a block of 2 warpgroups (256 threads) owns 128 query rows of one (sequence, query head), 64
// per warpgroup, and walks the 64-key tiles its rows see (DqWalk, the 64-row kernel's walk with
// the wgmma tile layout). Shared memory, 128-byte-swizzle tiles (dk_wgmma.cuh): Q, dO, and two
// stages of K and V. Per key tile:
//   wait for this thread's copies; fence.proxy.async; barrier
//   S = Q · Kᵀ, dP = dO · Vᵀ      two batches of wgmma m64n64k16 × D / 16 (A, B in shared
//                                 memory); warpgroup 1 issues after warpgroup 0 (ping-pong);
//                                 then the next tile's K, V are queued into the other stage
//   P = exp2(S · scale log2 e − LSE log2 e) (masked entries −∞), while dP is still running
//   dS = P ∘ (dP − Delta), packed into A fragments
//   dQ += dS · K                  wgmma m64nDk16 × 4, dS from registers, K as the MN-major B
// dQ · scale is staged through the Q tile and written with 16-byte stores; rows that see no key
// get 0.
#include <math.h>
#include <stdint.h>

#include "dk_attention_bwd_args.h"
#include "dk_attention_bwd_common.cuh"
#include "dk_attention_fwd_block.cuh"  // BoolTag
#include "dk_attention_tile.cuh"
#include "dk_mma.cuh"
#include "dk_wgmma.cuh"
#include "dk_wgmma_tiles.cuh"

namespace dk {
namespace attn_bwd {

// Tiling of the wgmma dK/dV kernel (the Rust launcher mirrors it: src/attention/cuda/backward.rs).
template <int D>
struct DkdvWgTile {
  static constexpr int kThreads = 256;  // 2 warpgroups
  static constexpr int kBc = 128;       // key rows per block, 64 per warpgroup
  static constexpr int kBr = 64;        // query rows per step
  // 1024 bytes of slack to align the tiles, K, V, two stages of Q and dO, two of LSE and Delta.
  static constexpr int kSmemBytes = 1024 + (2 * kBc * D + 4 * kBr * D) * 2 + 4 * kBr * 4;
};

#if defined(DK_HAS_WGMMA)

template <typename T, int D>
__device__ __forceinline__ void dkdv_wgmma_kernel(const DkAttentionBwdArgs& a, char* smem) {
  using Tl = DkdvWgTile<D>;
  constexpr int Bc = Tl::kBc, Br = Tl::kBr, NT = Tl::kThreads;
  constexpr int kSRegs = Br / 2;  // Sᵀ and dPᵀ accumulators per thread (64 keys × Br queries)
  constexpr int kGRegs = D / 2;   // dK and dV accumulators per thread (64 keys × D)
  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // The warpgroup, known warp-uniform (a shuffle from lane 0): its descriptor arithmetic then
  // runs in uniform registers instead of a vector-to-uniform move per product.
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), g = lane >> 2, t = lane & 3;
  const int warp_row = 64 * wg + 16 * (warp & 3);  // the warp's 16 key rows (g, g + 8)

  DkdvWalk<T, D, Bc, Br, NT, true> walk(a);
  if (!walk.init()) return;
  const Seq& sq = walk.sq;
  const int k0 = walk.k0, off = walk.off, hk = walk.hk;
  const int n_iter = walk.n_iter();

  // Tiles (1024-byte aligned): K, V [Bc][D]; Q, dO [2][Br][D]; then LSE, Delta [2][Br].
  const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
  T* sK = reinterpret_cast<T*>(smem + (base - smem_addr(smem)));
  T* sV = sK + Bc * D;
  T* sQ = sV + Bc * D;
  T* sdO = sQ + 2 * Br * D;
  float* sLse = reinterpret_cast<float*>(sdO + 2 * Br * D);
  float* sDelta = sLse + 2 * Br;

  float dk[kGRegs], dv[kGRegs];
#pragma unroll
  for (int i = 0; i < kGRegs; ++i) dk[i] = dv[i] = 0.f;

  if (n_iter > 0) {
    const typename DkdvWalk<T, D, Bc, Br, NT, true>::Stages stages{sQ, sdO, sLse, sDelta};
    walk.start(sK, sV, stages, tid);

    // Descriptors: K and V as the K-major A of Sᵀ / dPᵀ (this warpgroup's 64 keys), Q and dO
    // as their K-major B (the step's Br queries) and again as the MN-major B of dK / dV (LBO =
    // the distance between a tile's 64-column halves). A k-step over D moves 32 bytes inside a
    // 128-byte row and to the second half after four; a k-step over queries, 16 query rows.
    const uint64_t k_desc = wgmma_desc_kmajor(smem_addr(sK) + 64 * wg * 128);
    const uint64_t v_desc = wgmma_desc_kmajor(smem_addr(sV) + 64 * wg * 128);
    const uint64_t q_desc0 = wgmma_desc_kmajor(smem_addr(sQ));
    const uint64_t do_desc0 = wgmma_desc_kmajor(smem_addr(sdO));
    const uint64_t qt_desc0 = wgmma_desc_mnmajor(smem_addr(sQ), Br * 128);
    const uint64_t dot_desc0 = wgmma_desc_mnmajor(smem_addr(sdO), Br * 128);
    constexpr uint32_t kStageDesc = (Br * D * 2) >> 4;  // descriptor units per stage

    const float scale_log2 = s.scale_log2;
    const int j0 = k0 + warp_row + g;  // the thread's key rows: j0 and j0 + 8
    float sc[kSRegs], dp[kSRegs];
#pragma unroll
    for (int i = 0; i < kSRegs; ++i) sc[i] = dp[i] = 0.f;

    for (int idx = 0; idx < n_iter; ++idx) {
      const int st = idx & 1;
      walk.sync_step();
      const int q0 = walk.q0(idx);
      const bool need_mask = walk.need_mask(q0);

      // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: two groups, so Pᵀ can start while dPᵀ is still running.
      if (wg == 1) named_barrier_sync(1, NT);
      wgmma_fence_operands(sc);
      wgmma_fence_operands(dp);
      wgmma_fence();
      wgmma_abt<T, Br, D, Bc, Br>(sc, k_desc, q_desc0, st * kStageDesc);
      wgmma_commit();
      wgmma_abt<T, Br, D, Bc, Br>(dp, v_desc, do_desc0, st * kStageDesc);
      wgmma_commit();
      if (wg == 0) named_barrier_arrive(1, NT);
      walk.queue_next(idx, stages, tid);  // the other stage: free since the barrier

      // Pᵀ; sc[4 j + 2 r + e] is key j0 + 8 r, query q0 + 8 j + 2 t + e. Two copies, with and
      // without the mask (a uniform branch), as in the 128-key mma.sync kernel.
      wgmma_wait<1>();
      wgmma_fence_operands(sc);
      const float* lse_st = sLse + st * Br;
      auto p_of = [&](auto masked) {
#pragma unroll
        for (int j = 0; j < Br / 8; ++j) {
          const float2 l = *reinterpret_cast<const float2*>(lse_st + 8 * j + 2 * t);
          const float le[2] = {lse_exponent(l.x), lse_exponent(l.y)};
          const int i0 = q0 + 8 * j + 2 * t;
#pragma unroll
          for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = sc[4 * j + 2 * r + e];
              if constexpr (decltype(masked)::value) {
                const int key = j0 + 8 * r;
                if (key >= sq.len_k || (s.causal && i0 + e < key - off)) x = neg_inf();
              }
              sc[4 * j + 2 * r + e] = exp2_fast(fmaf(x, scale_log2, -le[e]));
            }
        }
      };
      if (need_mask) {
        p_of(attn_fwd::BoolTag<true>());
      } else {
        p_of(attn_fwd::BoolTag<false>());
      }

      // dSᵀ = Pᵀ ∘ (dPᵀ − Delta); Pᵀ and dSᵀ packed: k-step kk of the products over queries
      // takes queries 16 kk .. 16 kk + 15.
      wgmma_wait<0>();
      wgmma_fence_operands(dp);
      const float* delta_st = sDelta + st * Br;
      uint32_t pa[Br / 16][4], dsa[Br / 16][4];
#pragma unroll
      for (int j = 0; j < Br / 8; ++j) {
        const float2 d = *reinterpret_cast<const float2*>(delta_st + 8 * j + 2 * t);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float p0 = sc[4 * j + 2 * r], p1 = sc[4 * j + 2 * r + 1];
          pa[j >> 1][(j & 1) * 2 + r] = pack2<T>(p0, p1);
          dsa[j >> 1][(j & 1) * 2 + r] =
              pack2<T>(p0 * (dp[4 * j + 2 * r] - d.x), p1 * (dp[4 * j + 2 * r + 1] - d.y));
        }
      }

      // dV += Pᵀ dO and dK += dSᵀ Q: this warpgroup's 64 keys × D, over the step's Br queries.
      wgmma_fence_operands(dv);
      wgmma_fence_operands(dk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Br / 16; ++kk) {
        const uint32_t q_off = st * kStageDesc + ((kk * 16 * 128) >> 4);
        wgmma_rs<T, D>(dv, pa[kk], dot_desc0 + q_off, true);
        wgmma_rs<T, D>(dk, dsa[kk], qt_desc0 + q_off, true);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(dv);
      wgmma_fence_operands(dk);

      walk.end_step(idx, stages, tid);
    }
  }

  // dK · scale and dV in T staged through the K and V tiles, then 16-byte stores of the block's
  // valid keys. The first barrier is not needed by the present code (as in the dQ kernel: a
  // warp stages into its own rows, read only by its warpgroup's finished products): kept, once
  // per block, so the staging stays safe if tile ownership changes.
  __syncthreads();
  const uint32_t s_k = smem_addr(sK), s_v = smem_addr(sV);
  stage_acc_wg<T, Bc, D>(dk, s.scale, s.scale, s_k, warp_row + g, t);
  stage_acc_wg<T, Bc, D>(dv, 1.f, 1.f, s_v, warp_row + g, t);
  __syncthreads();
  const int valid = sq.len_k - k0;
  const int64_t row0 = static_cast<int64_t>(sq.k_start) + k0;
  attn::store_tile<D, Bc, NT, true>(reinterpret_cast<T*>(a.dk) + row0 * a.dk_stride + hk * D,
                                    a.dk_stride, s_k, valid, tid);
  attn::store_tile<D, Bc, NT, true>(reinterpret_cast<T*>(a.dv) + row0 * a.dv_stride + hk * D,
                                    a.dv_stride, s_v, valid, tid);
}

#endif  // DK_HAS_WGMMA

// Tiling of the wgmma dQ kernel (the Rust launcher mirrors it: src/attention/cuda/backward.rs).
template <int D>
struct DqWgTile {
  static constexpr int kThreads = 256;  // 2 warpgroups
  static constexpr int kBr = 128;       // query rows per block, 64 per warpgroup
  static constexpr int kBc = 64;        // keys per step
  // 1024 bytes of slack to align the tiles, Q, dO, two stages of K, two of V.
  static constexpr int kSmemBytes = 1024 + (2 * kBr * D + 4 * kBc * D) * 2;
};

#if defined(DK_HAS_WGMMA)

template <typename T, int D>
__device__ __forceinline__ void dq_wgmma_kernel(const DkAttentionBwdArgs& a, char* smem) {
  using Tl = DqWgTile<D>;
  constexpr int Br = Tl::kBr, Bc = Tl::kBc, NT = Tl::kThreads;
  constexpr int kSRegs = Bc / 2;  // S and dP accumulators per thread (64 rows × Bc)
  constexpr int kQRegs = D / 2;   // dQ accumulators per thread (64 rows × D)
  const DkAttentionShape& s = a.shape;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // The warpgroup, known warp-uniform (a shuffle from lane 0): its descriptor arithmetic then
  // runs in uniform registers instead of a vector-to-uniform move per product.
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), g = lane >> 2, t = lane & 3;
  const int warp_row = 64 * wg + 16 * (warp & 3);  // the warp's 16 rows (g, g + 8)

  DqWalk<T, D, Br, Bc, NT, true> walk(a);
  if (!walk.init()) return;
  const Seq& sq = walk.sq;
  const int q0 = walk.q0, hq = walk.hq, n_end = walk.n_end;

  // Tiles (1024-byte aligned): Q, dO [Br][D]; K, V [2][Bc][D].
  const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
  T* sQ = reinterpret_cast<T*>(smem + (base - smem_addr(smem)));
  T* sdO = sQ + Br * D;
  T* sK = sdO + Br * D;
  T* sV = sK + 2 * Bc * D;

  float dq[kQRegs];
#pragma unroll
  for (int i = 0; i < kQRegs; ++i) dq[i] = 0.f;

  if (n_end > 0) {
    // The thread's query rows warp_row + g and + 8: LSE exponent, Delta, last visible key.
    float le[2], dl[2];
    int kmax[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) walk.row(warp_row + g + 8 * r, le[r], dl[r], kmax[r]);

    walk.load_q_do(sQ, sdO, tid);
    walk.load_kv(0, sK, sV, tid);
    cp_async_commit();

    // Descriptors: Q, dO (K-major, this warpgroup's 64 rows), K and V (K-major, the Bc keys) for
    // S and dP; K again as the MN-major B of dQ (LBO = the distance between its 64-column
    // halves). A k-step over D moves 32 bytes inside a 128-byte row and to the second half
    // after four; a k-step over keys moves 16 key rows.
    const uint64_t q_desc = wgmma_desc_kmajor(smem_addr(sQ) + 64 * wg * 128);
    const uint64_t do_desc = wgmma_desc_kmajor(smem_addr(sdO) + 64 * wg * 128);
    const uint64_t k_desc0 = wgmma_desc_kmajor(smem_addr(sK));
    const uint64_t v_desc0 = wgmma_desc_kmajor(smem_addr(sV));
    const uint64_t kt_desc0 = wgmma_desc_mnmajor(smem_addr(sK), Bc * 128);
    constexpr uint32_t kStageDesc = (Bc * D * 2) >> 4;  // descriptor units per stage

    const float scale_log2 = s.scale_log2;
    float sc[kSRegs], dp[kSRegs];
#pragma unroll
    for (int i = 0; i < kSRegs; ++i) sc[i] = dp[i] = 0.f;

    for (int n = 0; n < n_end; ++n) {
      const int st = n & 1;
      walk.sync_step();
      const int k0 = n * Bc;
      const bool need_mask = walk.need_mask(n);
      const uint64_t k_desc = k_desc0 + st * kStageDesc;
      const uint64_t v_desc = v_desc0 + st * kStageDesc;

      // S = Q Kᵀ and dP = dO Vᵀ: two groups, so P can start while dP is still running.
      if (wg == 1) named_barrier_sync(1, NT);
      wgmma_fence_operands(sc);
      wgmma_fence_operands(dp);
      wgmma_fence();
      wgmma_abt<T, Bc, D, Br, Bc>(sc, q_desc, k_desc);
      wgmma_commit();
      wgmma_abt<T, Bc, D, Br, Bc>(dp, do_desc, v_desc);
      wgmma_commit();
      if (wg == 0) named_barrier_arrive(1, NT);
      walk.queue_next(n, sK, sV, tid);  // the other stage: free since the barrier

      // P; sc[4 j + 2 r + e] is row warp_row + g + 8 r, key k0 + 8 j + 2 t + e.
      wgmma_wait<1>();
      wgmma_fence_operands(sc);
#pragma unroll
      for (int j = 0; j < Bc / 8; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = sc[4 * j + 2 * r + e];
            if (need_mask && k0 + 8 * j + 2 * t + e > kmax[r]) x = neg_inf();
            sc[4 * j + 2 * r + e] = exp2_fast(fmaf(x, scale_log2, -le[r]));
          }

      // dS = P ∘ (dP − Delta), packed: k-step kk of dS K takes keys 16 kk .. 16 kk + 15.
      wgmma_wait<0>();
      wgmma_fence_operands(dp);
      uint32_t dsa[Bc / 16][4];
#pragma unroll
      for (int j = 0; j < Bc / 8; ++j) {
        const float d0 = sc[4 * j] * (dp[4 * j] - dl[0]);
        const float d1 = sc[4 * j + 1] * (dp[4 * j + 1] - dl[0]);
        const float d2 = sc[4 * j + 2] * (dp[4 * j + 2] - dl[1]);
        const float d3 = sc[4 * j + 3] * (dp[4 * j + 3] - dl[1]);
        dsa[j >> 1][(j & 1) * 2] = pack2<T>(d0, d1);
        dsa[j >> 1][(j & 1) * 2 + 1] = pack2<T>(d2, d3);
      }

      // dQ += dS K.
      const uint64_t kt_desc = kt_desc0 + st * kStageDesc;
      wgmma_fence_operands(dq);
      wgmma_fence();
      wgmma_ab_regs<T, D, Bc>(dq, dsa, kt_desc);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(dq);
    }
  }

  // dQ · scale in T staged in the Q tile, then 16-byte stores. The first barrier is not needed
  // by the present code (a warp stages into its own rows, which only its warpgroup's products
  // read, finished at its wait; every copy landed before the last step's barrier; the emulator
  // confirms it): kept, once per block, so the staging stays safe if tile ownership changes.
  cp_async_wait<0>();
  __syncthreads();
  const uint32_t s_q = smem_addr(sQ);
  stage_acc_wg<T, Br, D>(dq, s.scale, s.scale, s_q, warp_row + g, t);
  __syncthreads();
  const int64_t row0 = static_cast<int64_t>(sq.q_start) + q0;
  attn::store_tile<D, Br, NT, true>(reinterpret_cast<T*>(a.dq) + row0 * a.dq_stride + hq * D,
                                    a.dq_stride, s_q, sq.len_q - q0, tid);
}

#endif  // DK_HAS_WGMMA

}  // namespace attn_bwd
}  // namespace dk

// Instantiations (sm_90a only; the sm_80 cubin gets empty bodies the launcher never runs).
#if defined(DK_HAS_WGMMA)
#define DK_ATTN_BWD_DQ_WG_BODY(T, D) dk::attn_bwd::dq_wgmma_kernel<T, D>(args, dk_attn_bwd_smem);
#else
#define DK_ATTN_BWD_DQ_WG_BODY(T, D) (void)args;
#endif

#if defined(DK_HAS_WGMMA)
#define DK_ATTN_BWD_DKDV_WG_BODY(T, D) dk::attn_bwd::dkdv_wgmma_kernel<T, D>(args, dk_attn_bwd_smem);
#else
#define DK_ATTN_BWD_DKDV_WG_BODY(T, D) (void)args;
#endif

#define DK_ATTN_BWD_DQ_WG_KERNEL(tname, T, D)                                                  \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::DqWgTile<D>::kThreads, 1)        \
      dk_attn_bwd_dqg_##tname##_d##D(const DkAttentionBwdArgs args) {                         \
    extern __shared__ __align__(16) char dk_attn_bwd_smem[];                                  \
    DK_ATTN_BWD_DQ_WG_BODY(T, D)                                                              \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(dk::attn_bwd::DkdvWgTile<D>::kThreads, 1)      \
      dk_attn_bwd_dkdvg_##tname##_d##D(const DkAttentionBwdArgs args) {                       \
    extern __shared__ __align__(16) char dk_attn_bwd_smem[];                                  \
    DK_ATTN_BWD_DKDV_WG_BODY(T, D)                                                            \
  }

DK_ATTN_BWD_DQ_WG_KERNEL(bf16, __nv_bfloat16, 64)
DK_ATTN_BWD_DQ_WG_KERNEL(bf16, __nv_bfloat16, 128)
DK_ATTN_BWD_DQ_WG_KERNEL(f16, __half, 64)
DK_ATTN_BWD_DQ_WG_KERNEL(f16, __half, 128)
