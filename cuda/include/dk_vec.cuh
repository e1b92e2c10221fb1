// Element conversion and 16-byte vector loads / stores of 8 elements of f32, bf16 or f16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace dk {

// Elements handled per vector step: one 16-byte load of bf16/f16, two of f32.
constexpr int kVec = 8;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// 8 consecutive elements as loaded, before widening to f32: one 16-byte word for bf16 / f16,
// two for f32. Loading all raw words of a step before converting any keeps the loads together.
template <typename T>
struct Raw8 {
  uint4 w[sizeof(T) == 4 ? 2 : 1];
};

// Loads 8 consecutive elements starting at a 16-byte aligned address. Plain (coherent) loads:
// the student row may be overwritten in place by the gradient later in the same kernel.
template <typename T>
__device__ __forceinline__ Raw8<T> load_raw8(const T* p) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(r.w) / sizeof(uint4)); ++i) {
    r.w[i] = reinterpret_cast<const uint4*>(p)[i];
  }
  return r;
}

__device__ __forceinline__ void unpack8(const Raw8<float>& r, float out[kVec]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    out[4 * i] = __uint_as_float(r.w[i].x);
    out[4 * i + 1] = __uint_as_float(r.w[i].y);
    out[4 * i + 2] = __uint_as_float(r.w[i].z);
    out[4 * i + 3] = __uint_as_float(r.w[i].w);
  }
}

__device__ __forceinline__ void unpack8(const Raw8<__nv_bfloat16>& r, float out[kVec]) {
  const uint32_t w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bf16 is the top half of an f32: widening is a shift.
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack8(const Raw8<__half>& r, float out[kVec]) {
  const uint32_t w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], sizeof(h));
    const float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float out[kVec]) {
  unpack8(load_raw8(p), out);
}

// 16 bytes at p (16-byte aligned, generic: global or shared memory) read again with one volatile
// vector load: volatile scalar loads of a 16-bit chunk compile to 8 system-scope LDG.U16 each.
__device__ __forceinline__ uint4 reload16(const void* p) {
  uint4 v;
#if defined(__CUDA_ARCH__)
  asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
#else
  const volatile uint32_t* q = static_cast<const volatile uint32_t*>(p);
  v.x = q[0], v.y = q[1], v.z = q[2], v.w = q[3];
#endif
  return v;
}

// A whole 8-element chunk (16-byte aligned) read again: one or two volatile vector loads.
template <typename T>
__device__ __forceinline__ void reload_chunk(const T* p, float (&out)[kVec]) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(r.w) / sizeof(uint4)); ++i)
    r.w[i] = reload16(reinterpret_cast<const uint4*>(p) + i);
  unpack8(r, out);
}

// Reads N elements again with volatile loads (generic: global or shared memory), for a rare
// path that must not keep the first load's registers alive until it runs.
template <int N>
__device__ __forceinline__ void reload(const float* p, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = reinterpret_cast<const volatile float*>(p)[i];
}

template <int N>
__device__ __forceinline__ void reload(const __nv_bfloat16* p, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const uint32_t bits = reinterpret_cast<const volatile uint16_t*>(p)[i];
    out[i] = __uint_as_float(bits << 16);
  }
}

template <int N>
__device__ __forceinline__ void reload(const __half* p, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const uint16_t bits = reinterpret_cast<const volatile uint16_t*>(p)[i];
    __half h;
    memcpy(&h, &bits, sizeof(h));
    out[i] = __half2float(h);
  }
}

// Two f32 rounded to nearest even into one register of two 16-bit elements (low half = a): the
// 16-bit stores below and the attention kernels' MMA operands (dk_mma.cuh).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

// The two 16-bit elements of a pack2 register as f32 (low half first): exact.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w);

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, sizeof(h));
  return __half22float2(h);
}

// 8 values rounded to T and packed as they lie in memory (the inverse of unpack8).
template <typename T>
__device__ __forceinline__ Raw8<T> pack8(const float v[kVec]) {
  Raw8<T> r;
  r.w[0] = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                      pack2<T>(v[6], v[7]));
  return r;
}

template <>
__device__ __forceinline__ Raw8<float> pack8<float>(const float v[kVec]) {
  Raw8<float> r;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    r.w[i] = make_uint4(__float_as_uint(v[4 * i]), __float_as_uint(v[4 * i + 1]),
                        __float_as_uint(v[4 * i + 2]), __float_as_uint(v[4 * i + 3]));
  }
  return r;
}

// Stores raw words at a 16-byte aligned address (16-byte stores).
template <typename T>
__device__ __forceinline__ void store_raw8(T* p, const Raw8<T>& r) {
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(r.w) / sizeof(uint4)); ++i) {
    reinterpret_cast<uint4*>(p)[i] = r.w[i];
  }
}

// Stores 8 consecutive elements at a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void store8(T* p, const float v[kVec]) {
  store_raw8(p, pack8<T>(v));
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace dk
