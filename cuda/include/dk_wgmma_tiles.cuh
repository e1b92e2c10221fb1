// Product batches of the wgmma attention kernels (cuda/attention_*_wgmma.cu) over tiles in the
// 128-byte-swizzle layout of dk_wgmma.cuh (64-column halves one after the other, 128-byte rows).
// Built on dk_wgmma.cuh's wrappers, so the host emulator runs them as they are.
#pragma once

#include <stdint.h>

#include "dk_attention_tile.cuh"  // wg_tile_offset
#include "dk_mma.cuh"             // st_shared_b32
#include "dk_vec.cuh"             // pack2
#include "dk_wgmma.cuh"

namespace dk {

#if defined(DK_HAS_WGMMA)

// Descriptor units (16 bytes) from the start of a K-major operand to its k-step kk (16
// elements of the row), in a tile of Rows rows: 32 bytes a step inside a 128-byte row, the next
// 64-column half after four steps.
template <int Rows>
__device__ __forceinline__ uint32_t kmajor_step(int kk) {
  return static_cast<uint32_t>(((kk >> 2) * Rows * 128 + (kk & 3) * 32) >> 4);
}

// acc = A · Bᵀ over D columns: A (the warpgroup's 64 rows at a_desc, in a tile of ARows rows) and
// B (N rows at b_desc + b_off descriptor units, in a tile of BRows rows) both K-major; D / 16
// products, the first without the old accumulators. Issued, not committed. (A stage offset
// passed as b_off, added in 32 bits, saves the dK/dV kernel 12 registers against a moved
// 64-bit descriptor.)
template <typename T, int N, int D, int ARows, int BRows>
__device__ __forceinline__ void wgmma_abt(float (&acc)[N / 2], uint64_t a_desc, uint64_t b_desc,
                                          uint32_t b_off = 0) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    wgmma_ss<T, N>(acc, a_desc + kmajor_step<ARows>(kk), b_desc + (b_off + kmajor_step<BRows>(kk)),
                   kk > 0);
  }
}

// acc += A · B over K rows of B: A from registers (a[kk]: the warp's rows, columns 16 kk ..
// 16 kk + 15, packed from accumulators), B MN-major at b_desc (16 rows of 128 bytes a step).
// Issued, not committed.
template <typename T, int N, int K>
__device__ __forceinline__ void wgmma_ab_regs(float (&acc)[N / 2], const uint32_t (&a)[K / 16][4],
                                              uint64_t b_desc) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) wgmma_rs<T, N>(acc, a[kk], b_desc + ((kk * 16 * 128) >> 4), true);
}

// Stages a warpgroup's 64 × N accumulators (this thread's: rows `row` and `row + 8` of the tile,
// columns 8 j + 2 t, + 1) in T into the wgmma tile of Rows rows at shared address `tile`, row
// `row` times m0 and row `row + 8` times m1: 4-byte stores, the output staging of the kernels.
template <typename T, int Rows, int N>
__device__ __forceinline__ void stage_acc_wg(const float (&acc)[N / 2], float m0, float m1,
                                             uint32_t tile, int row, int t) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
    const uint32_t at = tile + attn::wg_tile_offset<Rows>(row, j) + t * 4;
    st_shared_b32(at, pack2<T>(acc[4 * j] * m0, acc[4 * j + 1] * m0));
    st_shared_b32(at + 8 * 128, pack2<T>(acc[4 * j + 2] * m1, acc[4 * j + 3] * m1));
  }
}

#endif  // DK_HAS_WGMMA

}  // namespace dk
