// Shared-memory matrix descriptors of the wgmma operands (sm_90a), and the two operand shapes
// the attention kernels build them for. Plain integer arithmetic, so the host emulator's
// dk_wgmma.cuh includes this file as it is: the kernels, the hardware self-test and the
// emulator read one definition of the byte offsets. If the self-test
// (`wgmma_layouts_on_the_device`) finds another pair of offsets matching on a card, this is the
// one place to change.
//
// Layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Shared Memory Layout"), with the
// 128-byte swizzle: an operand is made of 1024-byte atoms of 8 rows × 128 bytes (64 16-bit
// elements), 16-byte chunk c of atom row r stored at chunk c ^ r (the hardware XORs address bits
// 4-6 with bits 7-9, so atoms must be 1024-byte aligned).
//   K-major (the k index contiguous: A = Q, B = K): element (row, k) at
//     start + 128 (row % 8) + SBO (row / 8) + 2 k, k < 16 — the start advances 32 bytes per
//     k-step inside the 128-byte row; LBO is not used; SBO = 1024 when 8-row groups are packed.
//   MN-major (the n index contiguous: B = V with imm-trans-b = 1): element (k, n) at
//     start + 2 (n % 64) + LBO (n / 64) + 128 (k % 8) + SBO (k / 8).
//   The physical address is then linear ^ (((linear >> 7) & 7) << 4).
#pragma once

#include <stdint.h>

namespace dk {

// Descriptor of a 128-byte-swizzled shared-memory operand starting at shared address `addr`
// (16-byte aligned) with leading / stride byte offsets `lbo` / `sbo`. The start address is the
// low field (address / 16), so adding bytes / 16 to a descriptor moves its start.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// A K-major operand whose 8-row groups are packed (1024 bytes apart). LBO is ignored by the
// hardware for swizzled K-major operands; 16 (field value 1) is what CUTLASS writes.
constexpr uint32_t kWgmmaKMajorLbo = 16;
constexpr uint32_t kWgmmaKMajorSbo = 1024;
__device__ __forceinline__ uint64_t wgmma_desc_kmajor(uint32_t addr) {
  return wgmma_desc(addr, kWgmmaKMajorLbo, kWgmmaKMajorSbo);
}

// An MN-major operand whose 64-column halves lie `half_bytes` apart (LBO) and whose 8-row
// groups of k are packed within a half (SBO = 1024).
constexpr uint32_t kWgmmaMnMajorSbo = 1024;
__device__ __forceinline__ uint64_t wgmma_desc_mnmajor(uint32_t addr, uint32_t half_bytes) {
  return wgmma_desc(addr, half_bytes, kWgmmaMnMajorSbo);
}

}  // namespace dk
