// Host-emulator replacement of cuda/include/dk_wgmma.cuh: the same functions, the inline PTX
// replaced by the emulated warpgroup MMA of sim_core.h / sim_wgmma.h (model and checks in
// sim_core.h's header, "wgmma"). The test stages the kernel sources with this file in place of
// the real header, as for dk_mma.cuh. Keep the function list in step with the real header.
//
// Every function but fence_proxy_async is a warp collective here (all 32 lanes, converged, the
// same call): a product is executed per warp, for the warp's 16 rows of the warpgroup's 64.
#pragma once

#include <stdint.h>

#include "dk_mma.cuh"  // MmaType, smem_addr (the emulator's)
#include "sim_core.h"

// The descriptors (start, LBO, SBO, swizzle mode) are the real header's: the emulator decodes
// the same bits (sim_wgmma.h, wg_decode); shared addresses here are offsets in the block's
// dynamic shared memory plus S.smem_base.
#include "dk_wgmma_desc.cuh"

#define DK_HAS_WGMMA 1
#define DK_ATTENTION_SIM_WGMMA_SHIM 1

namespace dk {

// Compiler ordering only: nothing to emulate (the accumulators live in memory).
inline void wgmma_fence_operand(float&) {}
template <int N> inline void wgmma_fence_operands(float (&)[N]) {}

inline void wgmma_fence() { sim::post(sim::Op::WgFence); }
inline void wgmma_commit() { sim::post(sim::Op::WgCommit); }
template <int N> inline void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group N");
  sim::me().arg = N;
  sim::post(sim::Op::WgWait);
}

// fence.proxy.async.shared::cta: this thread's earlier generic-proxy writes of shared memory
// become visible to wgmma operand reads (once a barrier orders them).
inline void fence_proxy_async() {
  sim::Lane& l = sim::me();
  const int32_t who = sim::S.cur + 1;
  for (uint32_t c : l.gen_written)
    if (c < sim::S.gen_writer.size() && sim::S.gen_writer[c] == who) sim::S.gen_writer[c] = 0;
  l.gen_written.clear();
}

namespace wgmma_sim {
template <typename T, int N>
inline void post(float* d, const uint32_t* a, uint64_t da, uint64_t db, bool acc) {
  static_assert(N == 64 || N == 128, "m64nNk16 with N = 64 or 128");
  sim::Lane& l = sim::me();
  l.wg_d = d;
  l.wg_a = a;
  l.wg_da = da;
  l.wg_db = db;
  l.wg_n = N;
  l.wg_bf16 = MmaType<T>::kBf16;
  l.wg_acc = acc;
  sim::post(a ? sim::Op::WgmmaRS : sim::Op::WgmmaSS);
}
}  // namespace wgmma_sim

template <int N> struct Wgmma {
  static_assert(N == 64 || N == 128, "m64nNk16 with N = 64 or 128");
  // D (+)= A · B, A 64 × 16 K-major in shared memory (desc da), B 16 × N K-major (desc db).
  template <typename T>
  static inline void ss(float (&d)[N / 2], uint64_t da, uint64_t db, int acc) {
    wgmma_sim::post<T, N>(d, nullptr, da, db, acc != 0);
  }
  // D (+)= A · B, A 64 × 16 from registers (a), B 16 × N MN-major in shared memory (desc db).
  template <typename T>
  static inline void rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int acc) {
    wgmma_sim::post<T, N>(d, a, 0, db, acc != 0);
  }
};

// The kernels' entry points: D[64 × N] (+)= A · B for element type T.
template <typename T, int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, bool acc) {
  Wgmma<N>::template ss<T>(d, da, db, acc ? 1 : 0);
}
template <typename T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, bool acc) {
  Wgmma<N>::template rs<T>(d, a, db, acc ? 1 : 0);
}

}  // namespace dk
