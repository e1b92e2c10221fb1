// Tile helpers of the attention kernels (forward in cuda/attention_forward.cu; usable by the
// backward too): the row ranges of one sequence, clamped so that garbage cu_seqlens can never
// address memory outside the operands, and shared-memory tiles of `Rows` token rows × D 16-bit
// elements of one head, filled from global memory with cp.async and stored back with 16-byte
// accesses.
//
// Shared-memory layout of a tile (XOR swizzle): a row is D * 2 bytes = D / 8 chunks of 16 bytes;
// chunk c of row r lives at r * D * 2 + ((c ^ (r & 7)) * 16). Eight consecutive rows read at the
// same logical chunk (one 8x8 ldmatrix matrix) then hit eight different 16-byte bank groups, so
// ldmatrix (plain and .trans) and the 16-byte fills are free of bank conflicts. Needs D / 8 >= 8.
//
// The wgmma kernels (kWg = true) store a tile as its 64-column halves one after the other, each
// [Rows][128 bytes] with chunk c of row r at (c ^ (r & 7)) · 16: the 128-byte-swizzle atoms of
// dk_wgmma.cuh when the tile starts 1024-byte aligned (the same bytes as the layout above at
// D = 64).
#pragma once

#include <stdint.h>

#include "dk_attention_shape.h"
#include "dk_mma.cuh"

namespace dk {
namespace attn {

// Token rows of sequence b: queries q_start .. q_start + q_len, keys k_start .. k_start + k_len.
struct SeqRows {
  int q_start;
  int q_len;
  int k_start;
  int k_len;
};

__device__ __forceinline__ int clamp_int(int x, int lo, int hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Row ranges of sequence b (0 <= b < batch). Varlen offsets are clamped into [0, total] with
// end >= start, so every row addressed exists whatever the device arrays hold.
__device__ __forceinline__ SeqRows sequence_rows(const DkAttentionShape& s, int b) {
  SeqRows r;
  if (s.cu_seqlens_q != 0) {
    const int32_t* cq = reinterpret_cast<const int32_t*>(s.cu_seqlens_q);
    const int32_t* ck = reinterpret_cast<const int32_t*>(s.cu_seqlens_k);
    r.q_start = clamp_int(cq[b], 0, s.total_q);
    r.q_len = clamp_int(cq[b + 1], r.q_start, s.total_q) - r.q_start;
    r.k_start = clamp_int(ck[b], 0, s.total_k);
    r.k_len = clamp_int(ck[b + 1], r.k_start, s.total_k) - r.k_start;
  } else {
    r.q_start = b * s.seqlen_q;
    r.q_len = s.seqlen_q;
    r.k_start = b * s.seqlen_k;
    r.k_len = s.seqlen_k;
  }
  return r;
}

// Byte offset of 16-byte chunk c of row r in a swizzled tile with rows of D elements.
template <int D>
__device__ __forceinline__ uint32_t tile_offset(int r, int c) {
  return static_cast<uint32_t>(r * (D * 2) + ((c ^ (r & 7)) << 4));
}

// Byte offset of 16-byte chunk c of row r in a wgmma tile of Rows rows (halves one after the
// other, 128 bytes a row).
template <int Rows>
__device__ __forceinline__ uint32_t wg_tile_offset(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * (Rows * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Thread tid's part of moving a Rows x D tile: chunk c of rows r0 + i * kRowsPerPass. The
// swizzle term (r & 7) is the same for all of a thread's rows, so one base offset serves all.
// kWg: the wgmma layout.
template <int D, int Rows, int Threads, bool kWg = false>
struct TileMap {
  static constexpr int kChunks = D / 8;                 // 16-byte chunks per row
  static constexpr int kRowsPerPass = Threads / kChunks;
  static constexpr int kPasses = Rows / kRowsPerPass;
  static constexpr int kRowPitch = kWg ? 128 : D * 2;  // bytes from a row to the next
  static_assert(kChunks >= 8, "the swizzle needs at least 8 chunks per row");
  static_assert(Threads % kChunks == 0 && kRowsPerPass % 8 == 0, "rows per pass: multiple of 8");
  static_assert(Rows % kRowsPerPass == 0, "whole passes");
  int c;
  int r0;
  uint32_t smem;  // offset of chunk c of row r0
  __device__ __forceinline__ explicit TileMap(int tid)
      : c(tid % kChunks),
        r0(tid / kChunks),
        smem(kWg ? wg_tile_offset<Rows>(tid / kChunks, tid % kChunks)
                 : tile_offset<D>(tid / kChunks, tid % kChunks)) {}
};

// Queues cp.async copies of rows 0 .. Rows of a tile whose row 0 is at `g` (token stride
// `stride` elements of 2 bytes) into the swizzled tile at shared address `dst`. Rows at or past
// `rows_valid` are zero-filled without reading global memory (their source address is row 0,
// which must exist when rows_valid > 0; nothing is read when rows_valid <= 0). Does not commit.
template <int D, int Rows, int Threads, bool kWg = false>
__device__ __forceinline__ void load_tile_async(uint32_t dst, const void* g, int64_t stride,
                                                int rows_valid, int tid) {
  using Map = TileMap<D, Rows, Threads, kWg>;
  const Map m(tid);
  const char* base = static_cast<const char*>(g);
  const char* src = base + static_cast<int64_t>(m.r0) * stride * 2 + m.c * 16;
  const int64_t pass_bytes = static_cast<int64_t>(Map::kRowsPerPass) * stride * 2;
#pragma unroll
  for (int i = 0; i < Map::kPasses; ++i) {
    const bool ok = m.r0 + i * Map::kRowsPerPass < rows_valid;
    cp_async_16(dst + m.smem + i * Map::kRowsPerPass * Map::kRowPitch, ok ? src + i * pass_bytes : base,
                ok ? 16 : 0);
  }
}

// Stores rows 0 .. min(Rows, rows_valid) of the swizzled tile at shared address `tile` to global
// memory at `g` (token stride `stride` elements of 2 bytes), 16 bytes per access.
template <int D, int Rows, int Threads, bool kWg = false>
__device__ __forceinline__ void store_tile(void* g, int64_t stride, uint32_t tile, int rows_valid,
                                           int tid) {
  using Map = TileMap<D, Rows, Threads, kWg>;
  const Map m(tid);
  char* dst = static_cast<char*>(g) + static_cast<int64_t>(m.r0) * stride * 2 + m.c * 16;
  const int64_t pass_bytes = static_cast<int64_t>(Map::kRowsPerPass) * stride * 2;
#pragma unroll
  for (int i = 0; i < Map::kPasses; ++i) {
    if (m.r0 + i * Map::kRowsPerPass < rows_valid) {
      *reinterpret_cast<uint4*>(dst + i * pass_bytes) =
          ld_shared_v4(tile + m.smem + i * Map::kRowsPerPass * Map::kRowPitch);
    }
  }
}

}  // namespace attn
}  // namespace dk
