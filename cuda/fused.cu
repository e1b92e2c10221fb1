// Fused linear divergence: the elementwise kernels that run between cuBLAS's matrix products.
// The sequence per chunk of rows is driven by src/fused/cuda.rs; design and costs in
// cuda/FUSED.md. In short, per chunk of c rows (S, T: the chunk's f32 logits, c x ld each):
//
//   S = logit_scale · Xs Wsᵀ, T = logit_scale · Xt Wtᵀ          (cuBLAS, f32 output)
//   dk_fused_softcap over S and T                                (only with a softcap)
//   dk_div_fused_<kind>_<out> (cuda/divergence.cu): per-row losses and G = the gradient ·
//     (1 − (S / cap)²), in the GEMM input dtype, written over S;
//   or, for short chunks on Hopper (a cluster row kernel), the row kernel with its gradient
//     written over T, then dk_fused_grad_<out>: G = T · (1 − (S / cap)²) written over S
//     (bf16/f16) or over T (f32; skipped when there is no softcap)
//   grad_hidden[chunk] = α G Ws, grad_weight (+)= α Gᵀ Xs           (cuBLAS, α on the device)
//
// No atomics; every kernel here is elementwise or a fixed single-thread computation, so the
// results are bitwise reproducible.

#include "dk_math.cuh"
#include "dk_vec.cuh"

namespace dk {
namespace fused {

constexpr int kThreads = 256;

// c · tanh(z / c), in place. tanhf (not tanh.approx): the capped logits feed exp() in the
// divergence, where an absolute error of the approximation's 2^-11 · c would cost accuracy.
__device__ __forceinline__ float softcap(float z, float cap, float inv_cap) {
  return cap * tanhf(z * inv_cap);
}

// One block per row (grid-stride over rows), tiles of blockDim 8-element vectors in order.
//
// `out` may alias `capped` row by row (same byte stride per row, sizeof(TO) <= 4): the store of
// element i (bytes [i·sizeof(TO), …) of the row) then lands in bytes of elements <= i of
// `capped`. A tile j of B elements reads bytes [4jB, 4(j+1)B) and writes bytes
// [sizeof(TO)·jB, sizeof(TO)·(j+1)B) ⊂ [0, 4(j+1)B): only elements of tiles 0..j. The barrier
// between each tile's loads and its stores therefore orders every store after every load of
// the bytes it overwrites (earlier tiles were loaded before earlier barriers). `out` may also
// equal `g` (same element, same thread). Rows are disjoint byte ranges, so blocks never race.
template <typename TO>
__device__ __forceinline__ void grad_rows(const float* g, int64_t g_ld, const float* capped,
                                          int64_t capped_ld, TO* out, int64_t out_ld,
                                          int64_t rows, int64_t v, float inv_cap) {
  const int64_t nvec = v / kVec;
  const int tail = static_cast<int>(v - nvec * kVec);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* gr = g + r * g_ld;
    const float* cr = capped != nullptr ? capped + r * capped_ld : nullptr;
    TO* orow = out + r * out_ld;
    for (int64_t base = 0; base < nvec; base += blockDim.x) {
      const int64_t k = base + threadIdx.x;
      const bool active = k < nvec;
      float e[kVec];
      if (active) {
        load8(gr + k * kVec, e);
        if (cr != nullptr) {
          float c[kVec];
          load8(cr + k * kVec, c);
#pragma unroll
          for (int i = 0; i < kVec; ++i) e[i] *= softcap_slope(c[i], inv_cap);
        }
      }
      __syncthreads();  // every load of this tile (and of the earlier ones) before any store
      if (active) store8(orow + k * kVec, e);
    }
    // The last v mod 8 elements: one more (scalar) tile.
    const int64_t i = nvec * kVec + threadIdx.x;
    const bool active = static_cast<int>(threadIdx.x) < tail;
    float e = 0.f;
    if (active) {
      e = gr[i];
      if (cr != nullptr) e *= softcap_slope(cr[i], inv_cap);
    }
    __syncthreads();
    if (active) orow[i] = from_float<TO>(e);
  }
}

}  // namespace fused
}  // namespace dk

// One thread: the constants the GEMMs read in device pointer mode. `scale` is the divergence's
// loss scale (dk_div_prepare: 1 / #valid rows, 1 / num_items, or 1); the gradient GEMMs use
// α = scale · logit_scale / g_scale, so G itself carries neither (no f16 underflow from a 1/N
// factor). `g_scale` (a power of two, 1 unless G is f16: src/fused/cuda.rs `g_scale`) is the
// loss scale the divergence kernels write G with; α divides it out again, exactly.
extern "C" __global__ void __launch_bounds__(32)
    dk_fused_constants(const float* scale, float logit_scale, float g_scale, float* zero,
                       float* one, float* grad_alpha, float* g_scale_out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    *zero = 0.f;
    *one = 1.f;
    *grad_alpha = *scale * logit_scale * (1.f / g_scale);
    *g_scale_out = g_scale;
  }
}

// In place: x[r, j] = cap · tanh(x[r, j] / cap) for r < rows, j < v (row stride ld, a multiple of
// 4 floats, x 16-byte aligned). grid.y strides over rows, grid.x over a row's 8-float vectors;
// the v mod 8 tail is done by the blocks with blockIdx.x == 0.
extern "C" __global__ void __launch_bounds__(dk::fused::kThreads)
    dk_fused_softcap(float* x, int64_t rows, int64_t v, int64_t ld, float cap, float inv_cap) {
  using dk::kVec;
  const int64_t nvec = v / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float* row = x + r * ld;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nvec;
         k += stride) {
      float e[kVec];
      dk::load8(row + k * kVec, e);
#pragma unroll
      for (int i = 0; i < kVec; ++i) e[i] = dk::fused::softcap(e[i], cap, inv_cap);
      dk::store8(row + k * kVec, e);
    }
    if (blockIdx.x == 0) {
      for (int64_t i = nvec * kVec + threadIdx.x; i < v; i += blockDim.x) {
        row[i] = dk::fused::softcap(row[i], cap, inv_cap);
      }
    }
  }
}

// G = g · (capped ? 1 − (capped / cap)² : 1) converted to the GEMM input dtype. See grad_rows
// for the aliasing rules (out over capped with the same row byte stride, or out == g).
#define DK_FUSED_GRAD_KERNEL(name, TO)                                                          \
  extern "C" __global__ void __launch_bounds__(dk::fused::kThreads)                            \
      dk_fused_grad_##name(const float* g, int64_t g_ld, const float* capped, int64_t capped_ld, \
                           TO* out, int64_t out_ld, int64_t rows, int64_t v, float inv_cap) {   \
    dk::fused::grad_rows<TO>(g, g_ld, capped, capped_ld, out, out_ld, rows, v, inv_cap);       \
  }

DK_FUSED_GRAD_KERNEL(f32, float)
DK_FUSED_GRAD_KERNEL(bf16, __nv_bfloat16)
DK_FUSED_GRAD_KERNEL(f16, __half)
