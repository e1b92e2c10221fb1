// Hopper warpgroup matrix multiply (wgmma.mma_async, sm_90a) building blocks for the attention
// kernels: shared-memory matrix descriptors with the 128-byte swizzle, the m64nNk16 products
// with f32 accumulators (A from shared memory or from registers), and the fences that order
// them. A warpgroup is 4 consecutive warps (threads 128 w .. 128 w + 127); every function here
// is executed by all of its threads, converged (.sync.aligned).
//
// Shared-memory operand layouts and their descriptors: dk_wgmma_desc.cuh.
// Register fragments (per warp w of the warpgroup, g = lane / 4, t = lane % 4), the mma.sync
// m16n8k16 layouts stacked over the warps:
//   D (64 × N f32, N / 2 registers): d[4 j + 2 i + e] = D[16 w + g + 8 i][8 j + 2 t + e].
//   A (64 × 16, 4 registers of two 16-bit elements): a[0] = A[16 w + g][2 t, 2 t + 1],
//     a[1] = A[16 w + g + 8][2 t, ..], a[2] = A[16 w + g][2 t + 8, ..], a[3] = A[16 w + g + 8][2 t + 8, ..].
//   So the D fragments of keys 16 kk .. 16 kk + 15 (d[8 kk .. 8 kk + 7]) pack into the A
//   fragment of k-step kk, as with mma.sync.
// Ordering: wgmma_fence() before the first product of a batch (and after any register write to
// its accumulators or A fragments); wgmma_commit() closes a batch into a group;
// wgmma_wait<N>() waits until at most N groups are pending — only then may the accumulators be
// read or the operands' shared memory be overwritten. Shared memory written by ordinary stores
// or cp.async (the generic proxy) is visible to wgmma (the async proxy) only after the writing
// thread's fence_proxy_async() and a barrier.
//
// The host emulator (tests/attention_sim/dk_wgmma.cuh) replaces this file; keep the two
// function lists in step.
#pragma once

#include <stdint.h>

#include "dk_mma.cuh"  // MmaType, smem_addr
#include "dk_wgmma_desc.cuh"

// Where wgmma exists: the sm_90a cubin (and the emulator's copy of this header).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DK_HAS_WGMMA 1
#endif

namespace dk {

// Makes this thread's earlier generic-proxy writes to shared memory (stores, landed cp.async
// copies) visible to the async proxy (wgmma operand reads) once a barrier follows. Declared for
// every target so that shared code can name it; a no-op below sm_90, where nothing reads through
// the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

#if defined(DK_HAS_WGMMA)

// Keeps the compiler from moving accesses of an accumulator across the asynchronous products.
__device__ __forceinline__ void wgmma_fence_operand(float& x) { asm volatile("" : "+f"(x)::"memory"); }
template <int N> __device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) wgmma_fence_operand(d[i]);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

#define DK_WG_D32 \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define DK_WG_D64 \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
#define DK_WG_OPS32 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define DK_WG_OPS64 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// D (+)= A · B, A 64 × 16 K-major in shared memory (desc da), B 16 × N K-major (desc db: N rows
// of 16 k), `acc` = 0: D = A · B (the accumulators' old values ignored).
#define DK_WG_SS(N, TY, DREGS, DOPS, IA, IB, IACC)                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IACC ", 0;\n"                          \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " DREGS         \
               ", %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                                   \
               : DOPS                                                                        \
               : "l"(da), "l"(db), "r"(acc))
// D (+)= A · B, A 64 × 16 from registers (a), B 16 × N MN-major in shared memory (desc db).
#define DK_WG_RS(N, TY, DREGS, DOPS, AREGS, IB, IACC)                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IACC ", 0;\n"                          \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " DREGS         \
               ", " AREGS ", %" #IB ", p, 1, 1, 1;\n}\n"                                     \
               : DOPS                                                                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc))

template <int N> struct Wgmma;
template <> struct Wgmma<64> {
  template <typename T>
  static __device__ __forceinline__ void ss(float (&d)[32], uint64_t da, uint64_t db, int acc) {
    if constexpr (MmaType<T>::kBf16) DK_WG_SS(64, "bf16", DK_WG_D32, DK_WG_OPS32, 32, 33, 34);
    else DK_WG_SS(64, "f16", DK_WG_D32, DK_WG_OPS32, 32, 33, 34);
  }
  template <typename T>
  static __device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t db,
                                            int acc) {
    if constexpr (MmaType<T>::kBf16) DK_WG_RS(64, "bf16", DK_WG_D32, DK_WG_OPS32, "{%32,%33,%34,%35}", 36, 37);
    else DK_WG_RS(64, "f16", DK_WG_D32, DK_WG_OPS32, "{%32,%33,%34,%35}", 36, 37);
  }
};
template <> struct Wgmma<128> {
  template <typename T>
  static __device__ __forceinline__ void ss(float (&d)[64], uint64_t da, uint64_t db, int acc) {
    if constexpr (MmaType<T>::kBf16) DK_WG_SS(128, "bf16", DK_WG_D64, DK_WG_OPS64, 64, 65, 66);
    else DK_WG_SS(128, "f16", DK_WG_D64, DK_WG_OPS64, 64, 65, 66);
  }
  template <typename T>
  static __device__ __forceinline__ void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t db,
                                            int acc) {
    if constexpr (MmaType<T>::kBf16) DK_WG_RS(128, "bf16", DK_WG_D64, DK_WG_OPS64, "{%64,%65,%66,%67}", 68, 69);
    else DK_WG_RS(128, "f16", DK_WG_D64, DK_WG_OPS64, "{%64,%65,%66,%67}", 68, 69);
  }
};

// The kernels' entry points: D[64 × N] (+)= A · B for element type T.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, bool acc) {
  Wgmma<N>::template ss<T>(d, da, db, acc ? 1 : 0);
}
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db,
                                         bool acc) {
  Wgmma<N>::template rs<T>(d, a, db, acc ? 1 : 0);
}

#endif  // DK_HAS_WGMMA

}  // namespace dk
