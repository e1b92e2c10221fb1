// Hardware check of the wgmma layouts the attention kernels rely on (dk_wgmma_desc.cuh,
// dk_wgmma.cuh, dk_wgmma_tiles.cuh and the wgmma tile layout of dk_attention_tile.cuh), apart
// from any attention logic: the unit test `wgmma_layouts_on_the_device`
// (src/attention/cuda/selftest.rs) runs it on a compute capability 9.0 device against f64
// products. If the attention kernels' results are wrong on a card and these pass, the fault is
// in the kernels' logic, not in our reading of the PTX ISA's layouts; if these fail, it is the
// reading, and the test then relaunches them with other byte offsets and with probe inputs to
// say which reading the card has.
//   ss: C[64][64] = A[64][128] · B[64][128]ᵀ, A and B K-major in shared memory, 8 k-steps across
//       both 64-column halves (the S = Q·Kᵀ form);
//   rs: C[64][128] = P[64][64] · V[64][128], P packed into A fragments from registers as the
//       kernels pack their accumulators, V the MN-major operand with LBO across its halves (the
//       P·V form).
// Both take the descriptors' byte offsets (lbo, sbo); sbo = 0 (never a valid stride) means the
// attention kernels' own descriptors, wgmma_desc_kmajor and wgmma_desc_mnmajor.
// One warpgroup (128 threads); C written from the accumulators by the documented D layout
// (d[4 j + 2 i + e] = C[16 w + g + 8 i][8 j + 2 t + e]).
#include <stdint.h>

#include "dk_attention_tile.cuh"
#include "dk_mma.cuh"
#include "dk_vec.cuh"
#include "dk_wgmma.cuh"
#include "dk_wgmma_tiles.cuh"

namespace dk {
namespace wgmma_selftest {

constexpr int kThreads = 128;
// Dynamic shared memory of both kernels (the unit test passes it): 1 KiB of alignment slack and
// two 64 × 128 tiles of 16-bit elements, 33 KiB.

#if defined(DK_HAS_WGMMA)

// The thread's accumulators of a 64 × N product to row-major C (ldc = N).
template <int N>
__device__ __forceinline__ void store_acc(const float (&acc)[N / 2], float* c) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) c[(16 * warp + g + 8 * i) * N + 8 * j + 2 * t + e] = acc[4 * j + 2 * i + e];
}

// Rows 0 .. 63 of a 64 × 128 row-major matrix into a wgmma tile at `dst`, landed, fenced for
// the async proxy and published by the barrier.
template <typename T>
__device__ __forceinline__ void load(uint32_t dst, const T* src) {
  attn::load_tile_async<128, 64, kThreads, true>(dst, src, 128, 64, threadIdx.x);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void ss(const T* a, const T* b, float* c, uint32_t lbo, uint32_t sbo,
                                   unsigned char* smem) {
  const uint32_t s_a = (smem_addr(smem) + 1023u) & ~1023u;
  const uint32_t s_b = s_a + 64 * 128 * 2;
  load(s_a, a);
  load(s_b, b);
  // Descriptors before the fence: ptxas orders any register the products read after it.
  const uint64_t da = sbo ? wgmma_desc(s_a, lbo, sbo) : wgmma_desc_kmajor(s_a);
  const uint64_t db = sbo ? wgmma_desc(s_b, lbo, sbo) : wgmma_desc_kmajor(s_b);
  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  wgmma_fence_operands(acc);
  wgmma_fence();
  wgmma_abt<T, 64, 128, 64, 64>(acc, da, db);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  store_acc<64>(acc, c);
}

template <typename T>
__device__ __forceinline__ void rs(const float* p, const T* v, float* c, uint32_t lbo, uint32_t sbo,
                                   unsigned char* smem) {
  const uint32_t s_v = (smem_addr(smem) + 1023u) & ~1023u;
  load(s_v, v);
  const uint64_t dv = sbo ? wgmma_desc(s_v, lbo, sbo) : wgmma_desc_mnmajor(s_v, 64 * 128);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // A fragment of k-step kk: rows 16 w + g (+ 8), columns 16 kk + 2 t (+ 8), pairs packed.
  uint32_t pa[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int row = 16 * warp + g + 8 * (q & 1), col = 16 * kk + 2 * t + 8 * (q >> 1);
      pa[kk][q] = pack2<T>(p[row * 64 + col], p[row * 64 + col + 1]);
    }
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  wgmma_fence_operands(acc);
  wgmma_fence();
  wgmma_ab_regs<T, 128, 64>(acc, pa, dv);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  store_acc<128>(acc, c);
}

#endif  // DK_HAS_WGMMA

}  // namespace wgmma_selftest
}  // namespace dk

#if defined(DK_HAS_WGMMA)
#define DK_WGMMA_SELFTEST_SS(T) dk::wgmma_selftest::ss<T>(static_cast<const T*>(a), static_cast<const T*>(b), c, lbo, sbo, dk_wgmma_selftest_smem);
#define DK_WGMMA_SELFTEST_RS(T) dk::wgmma_selftest::rs<T>(p, static_cast<const T*>(v), c, lbo, sbo, dk_wgmma_selftest_smem);
#else
#define DK_WGMMA_SELFTEST_SS(T) (void)a, (void)b, (void)c, (void)lbo, (void)sbo;
#define DK_WGMMA_SELFTEST_RS(T) (void)p, (void)v, (void)c, (void)lbo, (void)sbo;
#endif

// a, b: 64 × 128 bf16 row-major; c: 64 × 64 f32; lbo, sbo: as above.
extern "C" __global__ void __launch_bounds__(dk::wgmma_selftest::kThreads)
    dk_wgmma_selftest_ss_bf16(const void* a, const void* b, float* c, uint32_t lbo, uint32_t sbo) {
  extern __shared__ __align__(16) unsigned char dk_wgmma_selftest_smem[];
  DK_WGMMA_SELFTEST_SS(__nv_bfloat16)
}

// p: 64 × 64 f32 (rounded to bf16 in the kernel); v: 64 × 128 bf16; c: 64 × 128 f32; lbo, sbo:
// as above.
extern "C" __global__ void __launch_bounds__(dk::wgmma_selftest::kThreads)
    dk_wgmma_selftest_rs_bf16(const float* p, const void* v, float* c, uint32_t lbo, uint32_t sbo) {
  extern __shared__ __align__(16) unsigned char dk_wgmma_selftest_smem[];
  DK_WGMMA_SELFTEST_RS(__nv_bfloat16)
}
