// Warp-level tensor-core building blocks shared by the attention kernels (sm_80+): the
// m16n8k16 MMA with f32 accumulators, ldmatrix fragment loads from shared memory, cp.async
// 16-byte copies. f32 pairs are packed into bf16x2 / f16x2 registers by dk_vec.cuh's pack2.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16" for .bf16/.f16), with g = lane / 4, t = lane % 4:
//   A (16x16, row):  a0 = A[g][2t..2t+1]     a1 = A[g+8][2t..2t+1]
//                    a2 = A[g][2t+8..2t+9]   a3 = A[g+8][2t+8..2t+9]
//   B (16x8, col):   b0 = B[2t..2t+1][g]     b1 = B[2t+8..2t+9][g]
//   C/D (16x8, f32): c0,c1 = C[g][2t..2t+1]  c2,c3 = C[g+8][2t..2t+1]
// So the C fragments of two adjacent n-tiles (16x16 of C) hold exactly the elements of one A
// fragment: a score tile computed by one MMA feeds the next MMA after a conversion, without
// going through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "dk_math.cuh"
#include "dk_vec.cuh"  // pack2: two f32 into one register of two 16-bit elements

namespace dk {

// Element type tag → PTX type name used in the mma instruction.
template <typename T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> { static constexpr bool kBf16 = true; };
template <> struct MmaType<__half> { static constexpr bool kBf16 = false; };

// D = A · B + D, A 16x16 (4 regs), B 16x8 (2 regs), D 16x8 f32 (4 regs).
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (MmaType<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Shared-memory address of a generic pointer, for ldmatrix / cp.async.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8, row l % 8.
// Register i receives matrix i: element row g = lane / 4, columns 2t, 2t + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// As ldmatrix_x4 but each 8x8 matrix transposed: register i holds matrix i's column g,
// rows 2t, 2t + 1.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global → shared copy, asynchronous; src_bytes < 16 zero-fills the rest (0 = all zero,
// used for rows past the end of a sequence so no out-of-bounds read happens).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N groups of this thread are still pending.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 2^x on the special-function unit (ex2.approx.ftz: rel. error ~2^-22, -inf → 0): dk_math.cuh's
// fast_exp2 under the name the emulator (tests/attention_sim/dk_mma.cuh) replaces.
__device__ __forceinline__ float exp2_fast(float x) { return fast_exp2(x); }

}  // namespace dk

// ---- Named barriers ----------------------------------------------------------------------
namespace dk {

// bar.sync id, count: waits until `count` threads of the block (whole warps; `id` 1..15, 0 is
// __syncthreads) have arrived at barrier `id`, and orders their shared-memory accesses as
// __syncthreads does for the block. Lets a warp pair synchronise without stalling the others.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// bar.arrive id, count: counts this thread's warp towards barrier `id` without waiting; the
// barrier opens for its waiters (bar.sync) once `count` threads arrived or wait. Orders nothing
// by itself for the arriving threads: a signal, e.g. "my products are issued, issue yours".
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

}  // namespace dk

// ---- Shared-memory accesses by address ------------------------------------------------
namespace dk {

// 32-bit store and load / 16-byte load at a shared-memory address (from smem_addr), e.g.
// staging an output tile written from mma accumulators and read back as 16-byte rows.
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_shared_b32(uint32_t addr) {
  uint32_t r;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(r) : "r"(addr) : "memory");
  return r;
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 r;
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "r"(addr)
               : "memory");
  return r;
}

}  // namespace dk

// ---- Global f32 reductions -------------------------------------------------------------
namespace dk {

// p[0] += x, p[1] += y in global memory, relaxed, no return value (the RED path of L2; the order
// of concurrent additions is unspecified, so sums of several adders are not bitwise
// reproducible). p is 8-byte aligned. sm_90 adds both in one vector reduction.
__device__ __forceinline__ void red_add_f32x2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(x) : "memory");
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p + 1), "f"(y) : "memory");
#endif
}

}  // namespace dk
