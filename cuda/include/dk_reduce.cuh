// Deterministic warp and block reductions.
// Every reduction combines values in a fixed tree, so results are bitwise reproducible.
#pragma once

#include "dk_math.cuh"

namespace dk {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Sum over the block; every thread gets the result. `smem` holds at least 32 floats and may be
// reused after the call returns.
__device__ __forceinline__ float block_sum(float x, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  x = lane < warps ? smem[lane] : 0.f;
  return warp_sum(x);
}

// Sum over the block in a fixed order (the warps' xor butterflies, then thread 0 adds the warps'
// sums in warp order), returned to thread 0; the other threads get an unspecified value. For
// the one-block loss kernels' f64 sum and 64-bit count. `smem` holds at least 32 values.
template <typename T>
__device__ __forceinline__ T block_sum_to_thread0(T x, T* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < warps; ++w) total += smem[w];
  }
  return total;
}

// The skeleton of a block reduction: `warp_reduce` (every lane of a warp ends with the warp's
// result) within each warp, then over the warps' results in every warp, lanes past the last warp
// holding a default-constructed (empty) state. `smem` holds at least 32 states and may be
// reused after the call.
template <typename State, typename WarpReduce>
__device__ __forceinline__ State block_reduce(State x, State* smem,
                                              WarpReduce warp_reduce) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const State w = warp_reduce(x);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = w;
  __syncthreads();
  State y;
  if (lane < warps) y = smem[lane];
  return warp_reduce(y);
}

// Merges a per-thread state over the block in a fixed order; every thread gets the result.
// `State` needs `merge(const State&)` (commutative, so all lanes agree bit for bit) and
// `shfl_xor(int)`. `smem` holds at least 32 states and may be reused after the call.
template <typename State>
__device__ __forceinline__ State block_merge(State x, State* smem) {
  return block_reduce(x, smem, [](State s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s.merge(s.shfl_xor(o));
    return s;
  });
}

}  // namespace dk
