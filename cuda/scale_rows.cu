// Row scaling in place: x[i, j] = round(float(x[i, j]) * factors[i * factor_stride]), the
// product in f32 and rounded once to x's dtype (f32, bf16, f16). factor_stride 0 = one factor for
// every row.
//
// Made for the backward of the divergence (and of the fused linear divergence): the gradient the
// forward wrote is scaled by grad_output, which is almost always exactly 1. The factor is read on
// the device, so the host never synchronises, and rows whose factor is 1.0f (bitwise: the only
// float equal to 1) are never touched: with one factor for all rows the whole grid returns after
// one read; with per-row factors a block reads the factors of its next 256 items at once and only
// scales the items whose factor is not 1 (see `rows`).
//
// Work items: n rows x `chunks` chunks of kChunk elements; the host launches at most a few waves
// of blocks and each block loops over items gridDim.x apart (no grid limit is approached, whatever
// n and v). Within a row the first `head` elements (0..7 for 16-bit types, 0..3 for f32), up to
// the first 16-byte boundary, are scaled one by one by chunk 0; from there the row is cut into
// chunks of kChunk elements moved with 16-byte loads (load8 of dk_vec.cuh) and stores (store8_v4
// below), kUnroll loads in flight per thread, and the row's last partial vector one element at a
// time. So every row runs on vector loads whatever its alignment (rows need only be aligned to
// the element size).

#include "dk_vec.cuh"

namespace dk {
namespace scale_rows {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kWarps = kThreads / 32;
// Elements per (row, chunk) item: 8192. Kept in step with CHUNK in src/scale_rows/cuda.rs.
constexpr int kChunk = kThreads * kVec * kUnroll;

template <typename T>
__device__ __forceinline__ void scale_one(T* p, float f) {
  *p = from_float<T>(to_float(*p) * f);
}

// 16-byte stores of 8 elements (dk_vec.cuh's pack8) as explicit st.global.v4 (a plain, weak
// store, as the compiler emits for store8 elsewhere): in this kernel, a read-modify-write of
// the same addresses, the compiler splits store8's vector store into 4-byte stores.
__device__ __forceinline__ void st_v4(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d)
               : "memory");
}

template <typename T>
__device__ __forceinline__ void store8_v4(T* p, const float v[kVec]) {
  const Raw8<T> r = pack8<T>(v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(r.w) / sizeof(uint4)); ++i) {
    st_v4(reinterpret_cast<uint4*>(p) + i, r.w[i].x, r.w[i].y, r.w[i].z, r.w[i].w);
  }
}

// Scales one (row, chunk) item by f.
template <typename T>
__device__ __forceinline__ void item(T* __restrict__ x, int64_t v, int64_t stride, int chunks,
                                     int it, float f) {
  const int row = it / chunks;
  const int chunk = it - row * chunks;
  T* r = x + row * stride;
  const int64_t to_boundary =
      static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(r) & 15u)) & 15u) / sizeof(T));
  const int64_t head = to_boundary < v ? to_boundary : v;
  if (chunk == 0 && threadIdx.x < head) scale_one(r + threadIdx.x, f);
  const int64_t begin = head + static_cast<int64_t>(chunk) * kChunk;
  const int64_t end = (v - begin) < kChunk ? v : begin + kChunk;
  if (begin >= end) return;
  T* p = r + begin;  // 16-byte aligned
  const int len = static_cast<int>(end - begin);
  const int vecs = len / kVec;
  float buf[kUnroll][kVec];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int i = threadIdx.x + u * kThreads;
    if (i < vecs) load8(p + i * kVec, buf[u]);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int i = threadIdx.x + u * kThreads;
    if (i < vecs) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) buf[u][k] *= f;
      store8_v4(p + i * kVec, buf[u]);
    }
  }
  // The row's last elements past the final whole vector (only the row's last chunk has any).
  const int tail = vecs * kVec + static_cast<int>(threadIdx.x);
  if (tail < len) scale_one(p + tail, f);
}

// Block b owns items b, b + G, b + 2G, ... (G = gridDim.x), taken kThreads at a time: each thread
// reads the factor of one of the next kThreads items, a ballot marks those whose factor is not
// exactly 1, and the block scales only the marked ones. Skipped rows cost one 4-byte read per
// item, kThreads of them in parallel (and with one factor for all rows, 1 read per block).
template <typename T>
__device__ __forceinline__ void rows(T* __restrict__ x, const float* __restrict__ factors,
                                     int64_t v, int64_t stride, int64_t factor_stride, int chunks,
                                     int items) {
  __shared__ uint32_t need[kWarps];
  __shared__ float batch_factor[kThreads];
  // One factor for every row: the whole grid returns at once when it is exactly 1.
  if (factor_stride == 0 && __ldg(factors) == 1.0f) return;
  // 32-bit item indices: the host keeps items + kThreads * gridDim.x below 2^31.
  const int grid = gridDim.x;
  for (int base = blockIdx.x; base < items; base += grid * kThreads) {
    const int mine = base + static_cast<int>(threadIdx.x) * grid;
    bool scale = false;
    if (mine < items) {
      const float f = __ldg(factors + static_cast<int64_t>(mine / chunks) * factor_stride);
      batch_factor[threadIdx.x] = f;
      scale = !(f == 1.0f);  // NaN is scaled (it is not 1)
    }
    const uint32_t ballot = __ballot_sync(0xffffffffu, scale);
    if ((threadIdx.x & 31) == 0) need[threadIdx.x >> 5] = ballot;
    __syncthreads();
#pragma unroll 1
    for (int w = 0; w < kWarps; ++w) {
      uint32_t m = need[w];
      while (m != 0) {
        const int t = w * 32 + __ffs(m) - 1;
        m &= m - 1;
        item(x, v, stride, chunks, base + t * grid, batch_factor[t]);
      }
    }
    __syncthreads();  // the next batch overwrites need and batch_factor
  }
}

}  // namespace scale_rows
}  // namespace dk

#define DK_SCALE_ROWS(tname, T)                                                               \
  extern "C" __global__ void __launch_bounds__(dk::scale_rows::kThreads)                      \
      dk_scale_rows_##tname(T* __restrict__ x, const float* __restrict__ factors, int64_t v,  \
                            int64_t stride, int64_t factor_stride, int32_t chunks,           \
                            int32_t items) {                                                 \
    dk::scale_rows::rows<T>(x, factors, v, stride, factor_stride, chunks, items);             \
  }

DK_SCALE_ROWS(f32, float)
DK_SCALE_ROWS(bf16, __nv_bfloat16)
DK_SCALE_ROWS(f16, __half)

#undef DK_SCALE_ROWS
