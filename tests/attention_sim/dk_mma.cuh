// Host-emulator replacement of cuda/include/dk_mma.cuh: the same functions with the inline PTX
// replaced by the emulated warp collectives and checked shared-memory accesses of sim_core.h
// (fragment layouts documented there, from the PTX ISA). The test stages the kernel sources
// with this file in place of the real header, because dk_attention_tile.cuh includes
// "dk_mma.cuh" from its own directory. Keep the function list in step with the real header.
#pragma once

#include <stdint.h>

#include "sim_core.h"
#include "dk_vec.cuh"  // pack2, as the real dk_mma.cuh

#define DK_ATTENTION_SIM_MMA_SHIM 1

namespace dk {

template <typename T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> { static constexpr bool kBf16 = true; };
template <> struct MmaType<__half> { static constexpr bool kBf16 = false; };

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D = A B + D.
template <typename T>
inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  sim::mma(MmaType<T>::kBf16, d, a, b);
}

// __cvta_generic_to_shared: S.smem_base (0 unless the driver sets it) plus the offset in the
// block's dynamic shared memory.
inline uint32_t smem_addr(const void* p) {
  const char* c = static_cast<const char*>(p);
  if (!sim::S.smem || c < sim::S.smem || c > sim::S.smem + sim::S.smem_bytes)
    sim::fail("%s: smem_addr of a pointer outside the launch's shared memory", sim::where());
  return sim::S.smem_base + static_cast<uint32_t>(c - sim::S.smem);
}

inline void ldmatrix_x4(uint32_t r[4], uint32_t addr) { sim::ldsm(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) { sim::ldsm(r, addr, true); }

// cp.async.cg.shared.global [dst], [src], 16, src_bytes.
inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  sim::cp_async(dst, src, src_bytes);
}
inline void cp_async_commit() { sim::cp_commit(); }
template <int N> inline void cp_async_wait() { sim::cp_wait(N); }

// pack2 comes from the real dk_vec.cuh (through the emulator's __floats2bfloat162_rn /
// __floats2half2_rn, sim_core.h).

// ex2.approx.ftz.f32.
inline float exp2_fast(float x) { return sim::ex2_ftz(x); }

// bar.sync id, count.
inline void named_barrier_sync(int id, int count) { sim::named_barrier(id, count); }
// bar.arrive id, count.
inline void named_barrier_arrive(int id, int count) { sim::named_barrier_arrive(id, count); }

// st.shared.b32 / ld.shared.b32 / ld.shared.v4.b32 at a shared offset.
inline void st_shared_b32(uint32_t address, uint32_t v) {
  const uint32_t addr = sim::smem_off(address, "st.shared.b32");
  sim::check_smem(addr, 4, 4, "st.shared.b32", true);
  memcpy(sim::S.smem + addr, &v, 4);
}
inline uint32_t ld_shared_b32(uint32_t address) {
  const uint32_t addr = sim::smem_off(address, "ld.shared.b32");
  sim::check_smem(addr, 4, 4, "ld.shared.b32", false);
  uint32_t w;
  memcpy(&w, sim::S.smem + addr, 4);
  return w;
}
inline uint4 ld_shared_v4(uint32_t address) {
  const uint32_t addr = sim::smem_off(address, "ld.shared.v4");
  sim::check_smem(addr, 16, 16, "ld.shared.v4", false);
  uint32_t w[4];
  memcpy(w, sim::S.smem + addr, 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// red.global.add(.v2).f32: checked like a store into an output row (not counted as one of the
// once-per-launch stores: several blocks add into the same accumulator row).
inline void red_add_f32x2(float* p, float x, float y) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0)
    sim::fail("%s: red.global.add.v2.f32 at an address that is not 8-byte aligned", sim::where());
  sim::check_global(p, 8, true, "red.global.add.v2.f32");
  p[0] += x;
  p[1] += y;
}

}  // namespace dk
