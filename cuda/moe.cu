// MoE dispatch kernels: routing (top-k, per-chunk counts, scan, assignment) and the row
// movers (permute, combine, slot dot). Design, bytes moved and floors: cuda/MOE.md.
//
// Route = three launches on the caller's stream, no atomics on global memory, no float atomics:
//   1. dk_moe_topk_<dtype>_p<P>: one block per chunk of 32 tokens, one warp per token (lane l
//      holds experts l, l + 32, ...: P = 32-expert slices). Scores, group selection, k rounds
//      of warp argmax (dk_moe_route_math.cuh) -> expert_ids, weights. Each chosen (token,
//      expert) sets bit t of the chunk's mask of that expert in shared memory (atomicOr: the
//      result does not depend on the order). Then the in-chunk rank of each slot, popc(mask &
//      lanes below t), goes to `position` (temporarily) and popc(mask) to the workspace
//      chunk_counts[e, chunk].
//   2. dk_moe_scan: one block per expert: exclusive prefix of its chunk counts (in place: the
//      base rank of each chunk), total, capacity clamp -> counts[e].
//   3. dk_moe_assign: every block rebuilds the padded offsets from counts in shared memory
//      (block 0 writes `offsets`); each slot's rank = base + in-chunk rank gives its row (or -1
//      past the capacity): position[slot] = row, perm[row] = slot; every other perm entry (block
//      padding, rows past R up to perm_rows) is written -1 by a disjoint set of threads.
// The order of the permutation (expert, then token, then slot) follows from the ranks.

#include "dk_moe_args.h"
#include "dk_moe_route_math.cuh"
#include "dk_pdl.cuh"
#include "dk_vec.cuh"

namespace dk {
namespace moe {

constexpr unsigned kFull = 0xffffffffu;

// The warp interface of route_token (dk_moe_route_math.cuh) on the device.
struct DeviceWarp {
  __device__ __forceinline__ int lane() const { return threadIdx.x & 31; }
  __device__ __forceinline__ uint32_t redux_max(uint32_t v) const { return __reduce_max_sync(kFull, v); }
  __device__ __forceinline__ uint32_t redux_min(uint32_t v) const { return __reduce_min_sync(kFull, v); }
  __device__ __forceinline__ float shfl(float v, int src) const { return __shfl_sync(kFull, v, src); }
  __device__ __forceinline__ uint32_t shfl(uint32_t v, int src) const { return __shfl_sync(kFull, v, src); }
  __device__ __forceinline__ float shfl_xor(float v, int m) const { return __shfl_xor_sync(kFull, v, m); }
  __device__ __forceinline__ uint32_t shfl_xor(uint32_t v, int m) const { return __shfl_xor_sync(kFull, v, m); }
  __device__ __forceinline__ void syncwarp() const { __syncwarp(); }
};

// Exclusive prefix sum of one int per thread over the block (blockDim a multiple of 32); every
// thread also gets the block total. `smem` holds 32 ints; reusable after the call.
__device__ __forceinline__ int block_exclusive_scan(int x, int* smem, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();  // smem may still be read by a previous scan
  if (lane == 31) smem[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int v = lane < warps ? smem[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFull, v, o);
      if (lane >= o) v += y;
    }
    smem[lane] = v;  // inclusive prefix of the warp totals
  }
  __syncthreads();
  total = smem[warps - 1];
  return (warp > 0 ? smem[warp - 1] : 0) + incl - x;
}

// ---- 1. top-k and per-chunk counts ----------------------------------------------------------
constexpr int kTopkWarps = 8;
constexpr int kTokensPerWarp = DK_MOE_CHUNK / kTopkWarps;
static_assert(DK_MOE_CHUNK % kTopkWarps == 0, "chunk split over the warps");

// Lane's slices of a token row: x[i] = row[i * 32 + lane] for i < nv (the slices holding an
// expert), -inf past e.
template <int P, typename T>
__device__ __forceinline__ void load_logits(const T* row, int nv, float (&x)[P]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < P; ++i) x[i] = i < nv ? to_float(row[i * 32 + lane]) : -INFINITY;
}

template <int P, typename T>
__device__ __forceinline__ void topk(const DkMoeRouteArgs& a) {
  __shared__ uint32_t smask[32 * P];
  __shared__ __align__(8) uint32_t scratch[kTopkWarps][kScratchWords<P>];
  // The next token's logits are loaded while the current one is routed, where registers allow.
  constexpr bool kPrefetch = P <= 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int e = threadIdx.x; e < a.e; e += blockDim.x) smask[e] = 0u;
  __syncthreads();

  const RouteConfig cfg =
      route_config(a.e, a.k, a.score, a.renormalize, a.n_groups, a.topk_groups, a.scale,
                   reinterpret_cast<const float*>(a.bias));
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * DK_MOE_CHUNK;
  const int k = a.k;
  const int nv = (a.e - lane + 31) >> 5;  // this lane's slices that hold an expert
  // This warp's first token row (n0 + warp; then kTopkWarps rows on each time). Slot indices
  // n * k + lane in 32 bits: N·k < 2^31 (checked on the host); unsigned, as the unused lanes
  // (>= k) of the last tokens may pass 2^31.
  const T* row = reinterpret_cast<const T*>(a.logits) + (n0 + warp) * a.logits_stride;
  const int64_t row_step = kTopkWarps * a.logits_stride;
  int* expert_ids = reinterpret_cast<int*>(a.expert_ids);
  float* weights = reinterpret_cast<float*>(a.weights);
  uint32_t slot = static_cast<uint32_t>(n0 + warp) * k + lane;
  const uint32_t slot_step = kTopkWarps * k;
  DeviceWarp w;

  int chosen[kTokensPerWarp];
  // Two buffers used in turn (token t routes xb[t & 1] while t + 1 loads into the other): no
  // register copies between tokens.
  float xb[kPrefetch ? 2 : 1][P];
  if (kPrefetch && n0 + warp < a.n) load_logits(row, nv, xb[0]);
#pragma unroll
  for (int t = 0; t < kTokensPerWarp; ++t) {
    const int tt = warp + t * kTopkWarps;  // token within the chunk
    const int64_t n = n0 + tt;
    chosen[t] = -1;
    if (n < a.n) {  // uniform over the warp
      float(&x)[P] = xb[kPrefetch ? t & 1 : 0];
      if (kPrefetch) {
        if (t + 1 < kTokensPerWarp && n + kTopkWarps < a.n) {
          load_logits(row + (t + 1) * row_step, nv, xb[kPrefetch ? (t + 1) & 1 : 0]);
        }
      } else {
        load_logits(row + t * row_step, nv, x);
      }
      int ex;
      float wt;
      const T* token_row = row + t * row_step;
      route_token<P>(w, x, cfg, scratch[warp], [=](int i) { return to_float(token_row[i]); }, ex,
                     wt);
      if (lane < k) {
        expert_ids[slot] = ex;
        weights[slot] = wt;
        if (ex >= 0) {
          atomicOr(&smask[ex], 1u << tt);
          chosen[t] = ex;
        }
      }
      slot += slot_step;
    }
  }
  __syncthreads();

  int* position = reinterpret_cast<int*>(a.position);
#pragma unroll
  for (int t = 0; t < kTokensPerWarp; ++t) {
    const int tt = warp + t * kTopkWarps;
    const int64_t n = n0 + tt;
    if (n < a.n && chosen[t] >= 0) {
      position[n * k + lane] = popcount(smask[chosen[t]] & lanes_below(tt));
    }
  }
  int* cc = reinterpret_cast<int*>(a.chunk_counts);
  for (int e = threadIdx.x; e < a.e; e += blockDim.x) {
    cc[static_cast<int64_t>(e) * a.chunks + blockIdx.x] = popcount(smask[e]);
  }
}

// ---- 2. per-expert scan over the chunks -----------------------------------------------------
constexpr int kScanThreads = 256;
constexpr int kScanPerThread = 4;

__device__ __forceinline__ void scan(const DkMoeRouteArgs& a) {
  __shared__ int smem[32];
  const int e = blockIdx.x;
  int* cc = reinterpret_cast<int*>(a.chunk_counts) + static_cast<int64_t>(e) * a.chunks;
  int carry = 0;
  for (int base = 0; base < a.chunks; base += kScanThreads * kScanPerThread) {
    const int c0 = base + threadIdx.x * kScanPerThread;
    int v[kScanPerThread];
    int local = 0;
#pragma unroll
    for (int u = 0; u < kScanPerThread; ++u) {
      v[u] = c0 + u < a.chunks ? cc[c0 + u] : 0;
      local += v[u];
    }
    int tile_total;
    int run = carry + block_exclusive_scan(local, smem, tile_total);
#pragma unroll
    for (int u = 0; u < kScanPerThread; ++u) {
      if (c0 + u < a.chunks) {
        cc[c0 + u] = run;
        run += v[u];
      }
    }
    carry += tile_total;
  }
  if (threadIdx.x == 0) {
    reinterpret_cast<int*>(a.counts)[e] = carry < a.capacity ? carry : a.capacity;
  }
}

// ---- 3. offsets, positions and the permutation ----------------------------------------------
constexpr int kAssignThreads = 256;
constexpr int kAssignPerThread = 4;  // slots per thread (grid sizing); also experts in the prelude
constexpr int kMaxExperts = kAssignThreads * kAssignPerThread;  // 1024

__device__ __forceinline__ void assign(const DkMoeRouteArgs& a) {
  __shared__ int off[kMaxExperts + 1];
  __shared__ int kept[kMaxExperts];
  __shared__ int smem[32];
  const int E = a.e;
  const int* counts = reinterpret_cast<const int*>(a.counts);

  // Padded segment starts, rebuilt by every block from the E counts (cheap, L2-resident).
  const int e0 = threadIdx.x * kAssignPerThread;
  int pad[kAssignPerThread];
  int local = 0;
#pragma unroll
  for (int u = 0; u < kAssignPerThread; ++u) {
    const int e = e0 + u;
    const int kv = e < E ? counts[e] : 0;
    if (e < E) kept[e] = kv;
    pad[u] = e < E ? round_up(kv, a.block) : 0;
    local += pad[u];
  }
  int total;
  int run = block_exclusive_scan(local, smem, total);
#pragma unroll
  for (int u = 0; u < kAssignPerThread; ++u) {
    if (e0 + u < E) off[e0 + u] = run;
    run += pad[u];
  }
  if (threadIdx.x == 0) off[E] = total;
  __syncthreads();
  if (blockIdx.x == 0) {
    int* offsets = reinterpret_cast<int*>(a.offsets);
    for (int e = threadIdx.x; e <= E; e += blockDim.x) offsets[e] = off[e];
  }

  const int* ids = reinterpret_cast<const int*>(a.expert_ids);
  const int* cc = reinterpret_cast<const int*>(a.chunk_counts);
  int* position = reinterpret_cast<int*>(a.position);
  int* perm = reinterpret_cast<int*>(a.perm);
  const int k = a.k;
  const int nk = static_cast<int>(a.n * k);  // < 2^31, checked on the host
  // 64-bit loop counter: gridDim.x · blockDim.x and s + stride may pass 2^31 (nk near it).
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s64 < nk;
       s64 += stride) {
    const int s = static_cast<int>(s64);  // < nk
    const int e = ids[s];
    if (e < 0 || e >= E) {  // never happens: top-k always picks an expert
      position[s] = -1;
      continue;
    }
    const int c = (s / k) / DK_MOE_CHUNK;
    const int rank = cc[static_cast<int64_t>(e) * a.chunks + c] + position[s];
    if (rank < a.capacity) {
      const int row = off[e] + rank;
      position[s] = row;
      perm[row] = s;
    } else {
      position[s] = -1;
    }
  }

  // Every row that holds no slot: disjoint from the rows written above.
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < a.perm_rows;
       r += stride) {
    const bool empty = a.block == 1 ? r >= total : is_empty_row(off, kept, E, r);
    if (empty) perm[r] = -1;
  }
}

// ---- Row movers -----------------------------------------------------------------------------
// One warp per (row, segment): a segment is 32 lanes x kSegVecs chunks of 8 elements, each
// chunk one 16-byte load (two for f32), all of a lane's loads issued before its stores.
constexpr int kRowsThreads = 256;
constexpr int kRowsWarps = kRowsThreads / 32;
constexpr int kSegVecs = 4;
constexpr int kSegChunks = 32 * kSegVecs;

// dst = src over the lane's chunks c0 + 32 u of a row (raw 16-byte copies, dk_vec.cuh's Raw8,
// never converted): the row movers' copy. Not inlined: inlined into permute_tokens (slot loop, row from a shuffle) the 16-byte
// stores came out as 4-byte ones.
template <typename T>
__device__ __noinline__ void copy_segment(const T* src, T* dst, int64_t c0, int64_t hv) {
  Raw8<T> v[kSegVecs];
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < hv) v[u] = load_raw8(src + c * kVec);
  }
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < hv) store_raw8(dst + c * kVec, v[u]);
  }
}

// dst = w · src over the lane's chunks c0 + 32 u of a row. The raw 16-byte words of every chunk
// are loaded before any is widened: widening each as it arrives let ptxas reuse a raw register
// for the next load, which then waited for the previous one (two round trips per segment in
// the 16-bit gather on sm_90a and in permute_tokens; found by reading the SASS in review).
template <typename T>
__device__ __noinline__ void scale_segment(const T* src, T* dst, float w, int64_t c0, int64_t hv) {
  Raw8<T> r[kSegVecs];
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < hv) r[u] = load_raw8(src + c * kVec);
  }
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < hv) {
      float v[kVec];
      unpack8(r[u], v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] *= w;
      store8(dst + c * kVec, v);
    }
  }
}
// The gather above reads x[n] once per slot, k times in all and far apart in time (rows are in
// expert order), so from DRAM at the ANCHORS shapes. When perm is a permutation of the kept
// slots (what the route makes), its inverse gives each token's destination rows and one read of
// x[n] serves all of them. The contract stays the gather's for any perm: perm_invert sets a flag
// when a slot is claimed twice, and then permute_tokens does nothing and the gather runs.
//
// a.src2: int workspace, pos[a.limit] preset to -1 (slot -> row), then the flag (preset 0).

template <typename T>
__device__ __forceinline__ void permute(const DkMoeRowsArgs& a) {
  // After perm_invert (a.src2 set): only when perm turned out not to be a permutation.
  if (a.src2 != 0 && reinterpret_cast<const int*>(a.src2)[a.limit] == 0) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t hv = a.h / kVec;
  const int64_t nseg = (hv + kSegChunks - 1) / kSegChunks;
  const int64_t items = a.items * nseg;
  const T* x = reinterpret_cast<const T*>(a.src);
  const int* perm = reinterpret_cast<const int*>(a.index);
  const float* wts = reinterpret_cast<const float*>(a.weights);
  T* out = reinterpret_cast<T*>(a.dst);
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp; it < items;
       it += static_cast<int64_t>(gridDim.x) * kRowsWarps) {
    const int64_t r = it / nseg;
    const int64_t c0 = (it - r * nseg) * kSegChunks + lane;
    const int p = perm[r];
    T* dst = out + r * a.dst_stride;
    if (p < 0 || p >= a.limit) {
      const float z[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int u = 0; u < kSegVecs; ++u) {
        const int64_t c = c0 + 32 * u;
        if (c < hv) store8(dst + c * kVec, z);
      }
      continue;
    }
    const T* src = x + static_cast<int64_t>(p / a.k) * a.src_stride;
    if (wts == nullptr) {
      copy_segment(src, dst, c0, hv);
    } else {
      scale_segment(src, dst, wts[p], c0, hv);
    }
  }
}

// ---- Token-major permute (k > 1): each token row read once -----------------------------------

// Zeroes, by the whole warp, row i of the 32 rows starting at `rows` for each bit i of `mask`
// (a warp-uniform ballot): padding rows of perm_invert and permute_dot.
template <typename T>
__device__ __forceinline__ void zero_rows(unsigned mask, T* rows, int64_t stride, int64_t hv) {
  const int lane = threadIdx.x & 31;
  const float z[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (unsigned m = mask; m != 0; m &= m - 1) {
    T* dst = rows + (__ffs(static_cast<int>(m)) - 1) * stride;
    for (int64_t c = lane; c < hv; c += 32) store8(dst + c * kVec, z);
  }
}

// One row per thread: a kept row claims its slot in pos (32 claims per warp in flight at once);
// the warp then zeroes its padding rows (perm -1 or out of range) together. Was one warp per
// row with one lane claiming: 16384 blocks of one dependent load and one CAS each at Qwen3's
// shape (review).
template <typename T>
__device__ __forceinline__ void perm_invert(const DkMoeRowsArgs& a) {
  const int lane = threadIdx.x & 31;
  const int64_t hv = a.h / kVec;
  const int* perm = reinterpret_cast<const int*>(a.index);
  int* pos = reinterpret_cast<int*>(a.src2);
  int* flag = pos + a.limit;
  T* out = reinterpret_cast<T*>(a.dst);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // `base` is the warp's first row: uniform over the warp, so the ballot below is converged.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x - lane);
       base < a.items; base += stride) {
    const int64_t r = base + lane;
    bool pad = false;
    if (r < a.items) {
      const int p = perm[r];
      if (p >= 0 && p < a.limit) {
        if (atomicCAS(pos + p, -1, static_cast<int>(r)) != -1) atomicExch(flag, 1);
      } else {
        pad = true;
      }
    }
    zero_rows(__ballot_sync(kFull, pad), out + base * a.dst_stride, a.dst_stride, hv);
  }
}

// One warp per (token, segment): the segment of x[n] loaded once, stored to each of the token's
// rows (times the slot's weight when scaling). Every kept row is written by exactly one warp.
template <typename T>
__device__ __forceinline__ void permute_tokens(const DkMoeRowsArgs& a) {
  const int* pos = reinterpret_cast<const int*>(a.src2);
  if (pos[a.limit] != 0) return;  // not a permutation: the gather does the work
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k = a.k;
  const int64_t hv = a.h / kVec;
  const int64_t nseg = (hv + kSegChunks - 1) / kSegChunks;
  const int64_t tokens = a.limit / k;
  const int64_t items = tokens * nseg;
  const T* x = reinterpret_cast<const T*>(a.src);
  const float* wts = reinterpret_cast<const float*>(a.weights);
  T* out = reinterpret_cast<T*>(a.dst);
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp; it < items;
       it += static_cast<int64_t>(gridDim.x) * kRowsWarps) {
    const int64_t n = it / nseg;
    const int64_t c0 = (it - n * nseg) * kSegChunks + lane;
    // Lane j holds slot j's row (-1: dropped) and weight.
    int my_r = -1;
    float my_w = 1.f;
    if (lane < k) {
      my_r = pos[n * k + lane];
      if (wts != nullptr) my_w = wts[n * k + lane];
    }
    const T* src = x + n * a.src_stride;
    // The segment is re-loaded for every slot: the first load reads DRAM, the others hit L1
    // (same warp, just before); held in registers across the slot loop instead, the 16-byte
    // stores came out split into 4-byte ones.
    if (wts == nullptr) {
      for (int j = 0; j < k; ++j) {
        const int r = __shfl_sync(kFull, my_r, j);
        if (r >= 0) copy_segment(src, out + static_cast<int64_t>(r) * a.dst_stride, c0, hv);
      }
    } else {
      for (int j = 0; j < k; ++j) {
        const int r = __shfl_sync(kFull, my_r, j);
        const float w = __shfl_sync(kFull, my_w, j);
        if (r >= 0) scale_segment(src, out + static_cast<int64_t>(r) * a.dst_stride, w, c0, hv);
      }
    }
  }
}

// Loads one segment of a row: the lane's chunks c0 + 32 u that lie inside the row.
template <typename T>
__device__ __forceinline__ void load_segment(const T* row, int64_t c0, int64_t hv,
                                             float (&v)[kSegVecs][kVec]) {
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < hv) load8(row + c * kVec, v[u]);
  }
}

// acc += w * v over the lane's chunks inside the row, one fma per element (f32).
__device__ __forceinline__ void fma_segment(float w, const float (&v)[kSegVecs][kVec], int64_t c0,
                                            int64_t hv, float (&acc)[kSegVecs][kVec]) {
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    if (c0 + 32 * u < hv) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[u][i] = fmaf(w, v[u][i], acc[u][i]);
    }
  }
}

// The raw 16-byte words of a segment of a row (the lane's chunks c0 + 32 u inside it), not
// widened: a 16-bit segment stays 16 registers, so two of them are loaded before either is used.
template <typename T>
__device__ __forceinline__ void load_segment_raw(const T* row, int64_t c0, int64_t hv,
                                                 Raw8<T> (&r)[kSegVecs]) {
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < hv) r[u] = load_raw8(row + c * kVec);
  }
}

// acc += w * v over the lane's chunks inside the row from raw words (fma_segment's arithmetic).
template <typename T>
__device__ __forceinline__ void fma_segment_raw(float w, const Raw8<T> (&r)[kSegVecs], int64_t c0,
                                                int64_t hv, float (&acc)[kSegVecs][kVec]) {
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    if (c0 + 32 * u < hv) {
      float v[kVec];
      unpack8(r[u], v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[u][i] = fmaf(w, v[i], acc[u][i]);
    }
  }
}

// y = fmaf(w, v, 0) over the lane's chunks inside the row (0 where the slot is skipped): the
// general loop's result for one slot, bit for bit (fmaf(w, v, +0) turns a -0 product into +0,
// as acc = 0 then fma does; w * v would not).
template <typename T>
__device__ __forceinline__ void store_top1(T* dst, bool keep, float w, const Raw8<T> (&r)[kSegVecs],
                                           int64_t c0, int64_t hv) {
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < hv) {
      float o[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (keep) {
        unpack8(r[u], o);
#pragma unroll
        for (int i = 0; i < kVec; ++i) o[i] = fmaf(w, o[i], 0.f);
      }
      store8(dst + c * kVec, o);
    }
  }
}

// k = 1 (Llama 4 Scout / Maverick): each warp takes two items (2q, 2q + 1), loads both
// positions and weights up front and issues both segments' loads before either's stores: 4 KB in
// flight per warp instead of 2 KB behind a dependent index load (cuda/MOE.md, "Combine at
// H = 5120"). The launcher sizes the grid by pairs for k = 1; any grid is correct.
template <typename T>
__device__ __forceinline__ void combine_top1(const DkMoeRowsArgs& a, int64_t hv, int64_t nseg) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t items = a.items * nseg;
  const int64_t pairs = (items + 1) / 2;
  const T* rows = reinterpret_cast<const T*>(a.src);
  const int* position = reinterpret_cast<const int*>(a.index);
  const float* wts = reinterpret_cast<const float*>(a.weights);
  T* y = reinterpret_cast<T*>(a.dst);
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp; q < pairs;
       q += static_cast<int64_t>(gridDim.x) * kRowsWarps) {
    const int64_t ia = 2 * q, ib = ia + 1;
    const bool has_b = ib < items;  // uniform over the warp
    // One division per pair, 32-bit where the index fits (a 64-bit division is a ~70-instruction
    // subroutine on the path to the position loads); item b is the next segment of a's token or
    // the first of the next token.
    const int64_t na = ia <= INT32_MAX ? static_cast<int64_t>(static_cast<uint32_t>(ia) /
                                                              static_cast<uint32_t>(nseg))
                                       : ia / nseg;
    const int64_t sa = ia - na * nseg;
    const bool next_token = sa + 1 == nseg;
    const int64_t nb = next_token ? na + 1 : na;
    const int64_t ca = sa * kSegChunks + lane;
    const int64_t cb = (next_token ? 0 : sa + 1) * kSegChunks + lane;
    // Every lane loads the (uniform) position and weight of both items: one broadcast each.
    int pa = position[na];
    int pb = has_b ? position[nb] : -1;
    if (pa >= a.limit) pa = -1;
    if (pb >= a.limit) pb = -1;
    const float wa = wts != nullptr ? wts[na] : 1.f;
    const float wb = wts != nullptr && has_b ? wts[nb] : 1.f;
    Raw8<T> ra[kSegVecs], rb[kSegVecs];
    if (pa >= 0) load_segment_raw(rows + static_cast<int64_t>(pa) * a.src_stride, ca, hv, ra);
    if (pb >= 0) load_segment_raw(rows + static_cast<int64_t>(pb) * a.src_stride, cb, hv, rb);
    store_top1(y + na * a.dst_stride, pa >= 0, wa, ra, ca, hv);
    if (has_b) store_top1(y + nb * a.dst_stride, pb >= 0, wb, rb, cb, hv);
  }
}

template <typename T>
__device__ __forceinline__ void combine(const DkMoeRowsArgs& a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t hv = a.h / kVec;
  const int64_t nseg = (hv + kSegChunks - 1) / kSegChunks;
  if (a.k == 1) {
    combine_top1<T>(a, hv, nseg);
    return;
  }
  const int64_t items = a.items * nseg;
  const T* rows = reinterpret_cast<const T*>(a.src);
  const int* position = reinterpret_cast<const int*>(a.index);
  const float* wts = reinterpret_cast<const float*>(a.weights);
  T* y = reinterpret_cast<T*>(a.dst);
  const int k = a.k;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp; it < items;
       it += static_cast<int64_t>(gridDim.x) * kRowsWarps) {
    const int64_t n = it / nseg;
    const int64_t c0 = (it - n * nseg) * kSegChunks + lane;
    // Lane j holds slot j's row and weight (unweighted: 1, and fma(1, v, acc) == acc + v).
    int my_p = -1;
    float my_w = 1.f;
    if (lane < k) {
      my_p = position[n * k + lane];
      if (my_p >= a.limit) my_p = -1;
      if (wts != nullptr) my_w = wts[n * k + lane];
    }
    float acc[kSegVecs][kVec];
#pragma unroll
    for (int u = 0; u < kSegVecs; ++u) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[u][i] = 0.f;
    }
    // Two slots' loads in flight, accumulated strictly in slot order.
    for (int j = 0; j < k; j += 2) {
      const int p0 = __shfl_sync(kFull, my_p, j);
      const float w0 = __shfl_sync(kFull, my_w, j);
      const int p1_raw = __shfl_sync(kFull, my_p, (j + 1) & 31);
      const float w1 = __shfl_sync(kFull, my_w, (j + 1) & 31);
      const int p1 = j + 1 < k ? p1_raw : -1;
      float v0[kSegVecs][kVec], v1[kSegVecs][kVec];
      if (p0 >= 0) load_segment(rows + static_cast<int64_t>(p0) * a.src_stride, c0, hv, v0);
      if (p1 >= 0) load_segment(rows + static_cast<int64_t>(p1) * a.src_stride, c0, hv, v1);
      if (p0 >= 0) fma_segment(w0, v0, c0, hv, acc);
      if (p1 >= 0) fma_segment(w1, v1, c0, hv, acc);
    }
    T* dst = y + n * a.dst_stride;
#pragma unroll
    for (int u = 0; u < kSegVecs; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c < hv) store8(dst + c * kVec, acc[u]);
    }
  }
}

// ---- Dot products of token rows with permuted rows (the weights' gradients) ---------------
//
// Every dot is summed in one order, whichever kernel computes it: per segment, each lane's
// chunks into 8 partial sums (element i of every chunk, chunks in order), the 8 added in order,
// the warp butterfly (every lane ends with the same bits); the segments' sums added in segment
// order starting from 0. So the fused backward kernels below give slot_dot's bits.

// The lane's partial dot of two segments (its chunks c0 + 32 u inside the row).
template <typename T>
__device__ __forceinline__ float segment_dot(const Raw8<T> (&a)[kSegVecs], const Raw8<T> (&b)[kSegVecs],
                                             int64_t c0, int64_t hv) {
  float acc[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    if (c0 + 32 * u < hv) {
      float va[kVec], vb[kVec];
      unpack8(a[u], va);
      unpack8(b[u], vb);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = fmaf(va[i], vb[i], acc[i]);
    }
  }
  float t = acc[0];
#pragma unroll
  for (int i = 1; i < kVec; ++i) t += acc[i];
  return t;
}

// Sum over the warp by the xor butterfly: every lane gets the same bits (each step adds the same
// two values on both partners).
__device__ __forceinline__ float warp_sum(float t) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(kFull, t, o);
  return t;
}

// out[s] = <tokens[s / k], rows[position[s]]>: one warp per slot, segment by segment.
template <typename T>
__device__ __forceinline__ void slot_dot(const DkMoeRowsArgs& a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t hv = a.h / kVec;
  const int64_t nseg = (hv + kSegChunks - 1) / kSegChunks;
  const T* tokens = reinterpret_cast<const T*>(a.src);
  const T* rows = reinterpret_cast<const T*>(a.src2);
  const int* position = reinterpret_cast<const int*>(a.index);
  float* out = reinterpret_cast<float*>(a.dst);
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp; s < a.items;
       s += static_cast<int64_t>(gridDim.x) * kRowsWarps) {
    const int p = position[s];
    float result = 0.f;
    if (p >= 0 && p < a.limit) {  // uniform over the warp
      const T* tk = tokens + (s / a.k) * a.src_stride;
      const T* rw = rows + static_cast<int64_t>(p) * a.src2_stride;
      for (int64_t g = 0; g < nseg; ++g) {  // uniform: the butterfly needs every lane
        const int64_t c0 = g * kSegChunks + lane;
        Raw8<T> ta[kSegVecs], rb[kSegVecs];
        load_segment_raw(tk, c0, hv, ta);
        load_segment_raw(rw, c0, hv, rb);
        result += warp_sum(segment_dot(ta, rb, c0, hv));
      }
    }
    if (lane == 0) out[s] = result;
  }
}

// ---- Fused backward passes: each row read once ------------------------------------------
//
// The backward of a scaled permute is combine(grad_xp, w) and slot_dot(x, grad_xp); that of a
// weighted combine is permute(grad_y, w) and slot_dot(grad_y, expert_out). Run as two kernels,
// the row read by both (grad_xp; grad_y) is read twice. These kernels do both in one pass, with
// the primitives' arithmetic: their outputs are bitwise those of the two launches.

// combine_dot (permute backward): src = rows (grad_xp) [limit, h], src2 = x [items, h], index =
// position, weights (or 0), dst = y (grad_x) [items, h], dst2 = dots (float) [items * k].
// A warp per token, segment by segment: x's segment and two slots' row segments loaded, the
// rows accumulated as combine does (slot order, fma in f32), each slot's dot as slot_dot sums it.
template <typename T>
__device__ __forceinline__ void combine_dot(const DkMoeRowsArgs& a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t hv = a.h / kVec;
  const int64_t nseg = (hv + kSegChunks - 1) / kSegChunks;
  const T* rows = reinterpret_cast<const T*>(a.src);
  const T* x = reinterpret_cast<const T*>(a.src2);
  const int* position = reinterpret_cast<const int*>(a.index);
  const float* wts = reinterpret_cast<const float*>(a.weights);
  T* y = reinterpret_cast<T*>(a.dst);
  float* dots = reinterpret_cast<float*>(a.dst2);
  const int k = a.k;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp; n < a.items;
       n += static_cast<int64_t>(gridDim.x) * kRowsWarps) {
    int my_p = -1;
    float my_w = 1.f;
    if (lane < k) {
      my_p = position[n * k + lane];
      if (my_p >= a.limit) my_p = -1;
      if (wts != nullptr) my_w = wts[n * k + lane];
    }
    float my_dot = 0.f;  // lane j: slot j's dot
    for (int64_t g = 0; g < nseg; ++g) {
      const int64_t c0 = g * kSegChunks + lane;
      Raw8<T> xr[kSegVecs];
      load_segment_raw(x + n * a.src2_stride, c0, hv, xr);
      float acc[kSegVecs][kVec];
#pragma unroll
      for (int u = 0; u < kSegVecs; ++u) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[u][i] = 0.f;
      }
      for (int j = 0; j < k; j += 2) {
        const int p0 = __shfl_sync(kFull, my_p, j);
        const float w0 = __shfl_sync(kFull, my_w, j);
        const int p1_raw = __shfl_sync(kFull, my_p, (j + 1) & 31);
        const float w1 = __shfl_sync(kFull, my_w, (j + 1) & 31);
        const int p1 = j + 1 < k ? p1_raw : -1;
        Raw8<T> r0[kSegVecs], r1[kSegVecs];
        if (p0 >= 0) load_segment_raw(rows + static_cast<int64_t>(p0) * a.src_stride, c0, hv, r0);
        if (p1 >= 0) load_segment_raw(rows + static_cast<int64_t>(p1) * a.src_stride, c0, hv, r1);
        if (p0 >= 0) {
          fma_segment_raw(w0, r0, c0, hv, acc);
          const float d = warp_sum(segment_dot(xr, r0, c0, hv));
          if (lane == j) my_dot += d;
        }
        if (p1 >= 0) {
          fma_segment_raw(w1, r1, c0, hv, acc);
          const float d = warp_sum(segment_dot(xr, r1, c0, hv));
          if (lane == j + 1) my_dot += d;
        }
      }
      T* dst = y + n * a.dst_stride;
#pragma unroll
      for (int u = 0; u < kSegVecs; ++u) {
        const int64_t c = c0 + 32 * u;
        if (c < hv) store8(dst + c * kVec, acc[u]);
      }
    }
    if (lane < k) dots[n * k + lane] = my_dot;
  }
}

// dst = src (raw copy), or w · src rounded once when `scale` (permute's arithmetic), over the
// lane's chunks of a segment, when `store`; returns the lane's partial dot of src with `other`
// (segment_dot's order) when `dot`, else 0. Every pointer is a valid row whether used or not: a
// null `other` made nvcc emit generic LD.E.128 for its loads instead of LDG.E.128 (SASS, sm_90a).
// Not inlined, for the reason copy_segment is not (16-byte stores behind a shuffled row index).
template <typename T>
__device__ __noinline__ float store_and_dot(const T* src, T* dst, const T* other, float w, bool scale,
                                            bool store, bool dot, int64_t c0, int64_t hv) {
  Raw8<T> r[kSegVecs], o[kSegVecs];
#pragma unroll
  for (int u = 0; u < kSegVecs; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < hv) {
      r[u] = load_raw8(src + c * kVec);
      if (dot) o[u] = load_raw8(other + c * kVec);
    }
  }
  if (store) {
#pragma unroll
    for (int u = 0; u < kSegVecs; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c < hv) {
        if (scale) {
          float v[kVec];
          unpack8(r[u], v);
#pragma unroll
          for (int i = 0; i < kVec; ++i) v[i] *= w;
          store8(dst + c * kVec, v);
        } else {
          store_raw8(dst + c * kVec, r[u]);
        }
      }
    }
  }
  return dot ? segment_dot(r, o, c0, hv) : 0.f;
}

// permute_dot (combine backward): src = tokens (grad_y) [items, h], src2 = other rows
// (expert_out) [limit, h] or 0, index = position [items * k], index2 = perm [limit], weights (or
// 0), dst = out (grad_expert_out) [limit, h], dst2 = dots (float) [items * k] or 0.
// out is permute(tokens, perm, weights) and dots slot_dot(tokens, other, position) for ANY perm
// and position, each output row written by exactly one warp:
// - warp items [0, items): a token. Slot s = n·k + j with row r = position[s] writes out[r] when
//   it owns the row (perm[r] == s), from the token's segment loaded once (later slots hit L1),
//   and its dot with other[r] (also when it does not own the row).
// - warp items past that: 32 rows each. A row whose perm entry is outside [0, items·k) is
//   zeroed; one whose slot does not point back to it (never, for a route's perm and position)
//   is gathered as permute does.
template <typename T>
__device__ __forceinline__ void permute_dot(const DkMoeRowsArgs& a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k = a.k;
  const int64_t hv = a.h / kVec;
  const int64_t nseg = (hv + kSegChunks - 1) / kSegChunks;
  const int64_t slots = a.items * k;
  const int64_t groups = (static_cast<int64_t>(a.limit) + 31) / 32;
  const T* tokens = reinterpret_cast<const T*>(a.src);
  const T* other = reinterpret_cast<const T*>(a.src2);
  const int* position = reinterpret_cast<const int*>(a.index);
  const int* perm = reinterpret_cast<const int*>(a.index2);
  const float* wts = reinterpret_cast<const float*>(a.weights);
  T* out = reinterpret_cast<T*>(a.dst);
  float* dots = reinterpret_cast<float*>(a.dst2);
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp; it < a.items + groups;
       it += static_cast<int64_t>(gridDim.x) * kRowsWarps) {
    if (it >= a.items) {  // uniform over the warp
      const int64_t r = (it - a.items) * 32 + lane;
      int p = -1;
      bool pad = false, gather = false;
      if (r < a.limit) {
        p = perm[r];
        pad = p < 0 || p >= slots;
        gather = !pad && position[p] != r;
      }
      T* group = out + (it - a.items) * 32 * a.dst_stride;
      zero_rows(__ballot_sync(kFull, pad), group, a.dst_stride, hv);
      for (unsigned m = __ballot_sync(kFull, gather); m != 0; m &= m - 1) {
        const int src_lane = __ffs(static_cast<int>(m)) - 1;
        const int q = __shfl_sync(kFull, p, src_lane);
        const T* src = tokens + static_cast<int64_t>(q / k) * a.src_stride;
        T* dst = group + src_lane * a.dst_stride;
        const float w = wts != nullptr ? wts[q] : 1.f;
        for (int64_t g = 0; g < nseg; ++g) {
          const int64_t c0 = g * kSegChunks + lane;
          if (wts == nullptr) {
            copy_segment(src, dst, c0, hv);
          } else {
            scale_segment(src, dst, w, c0, hv);
          }
        }
      }
      continue;
    }
    const int64_t n = it;
    // Lane j: slot j's row (-1: dropped or out of range), whether it owns it, its weight.
    int my_r = -1;
    bool my_own = false;
    float my_w = 1.f;
    if (lane < k) {
      my_r = position[n * k + lane];
      if (my_r >= a.limit) my_r = -1;
      if (my_r >= 0) my_own = perm[my_r] == n * k + lane;
      if (wts != nullptr) my_w = wts[n * k + lane];
    }
    const unsigned owners = __ballot_sync(kFull, my_own);
    const T* src = tokens + n * a.src_stride;
    const bool dot = other != nullptr;
    float my_dot = 0.f;
    for (int64_t g = 0; g < nseg; ++g) {
      const int64_t c0 = g * kSegChunks + lane;
      for (int j = 0; j < k; ++j) {
        const int r = __shfl_sync(kFull, my_r, j);
        const float w = __shfl_sync(kFull, my_w, j);
        if (r < 0) continue;  // uniform
        const bool own = (owners >> j) & 1u;
        if (!own && !dot) continue;
        const float d = store_and_dot(src, out + static_cast<int64_t>(r) * a.dst_stride,
                                      dot ? other + static_cast<int64_t>(r) * a.src2_stride : src, w,
                                      wts != nullptr, own, dot, c0, hv);
        if (dot) {
          const float t = warp_sum(d);
          if (lane == j) my_dot += t;
        }
      }
    }
    if (dots != nullptr && lane < k) dots[n * k + lane] = my_dot;
  }
}

}  // namespace moe
}  // namespace dk

#define DK_MOE_TOPK(tname, T, P)                                                      \
  extern "C" __global__ void __launch_bounds__(dk::moe::kTopkWarps * 32, 1)           \
      dk_moe_topk_##tname##_p##P(const DkMoeRouteArgs args) {                         \
    dk::moe::topk<P, T>(args);                                                        \
  }
#define DK_MOE_TOPK_ALL_P(tname, T) \
  DK_MOE_TOPK(tname, T, 1)          \
  DK_MOE_TOPK(tname, T, 2)          \
  DK_MOE_TOPK(tname, T, 4)          \
  DK_MOE_TOPK(tname, T, 8)          \
  DK_MOE_TOPK(tname, T, 16)         \
  DK_MOE_TOPK(tname, T, 32)

DK_MOE_TOPK_ALL_P(f32, float)
DK_MOE_TOPK_ALL_P(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(dk::moe::kScanThreads)
    dk_moe_scan(const DkMoeRouteArgs args) {
  // Launched as a programmatic dependent of the top-k kernel (src/moe/cuda.rs): nothing of its
  // output (the chunk counts) may be read before this wait. The top-k kernel does not trigger
  // early (its blocks may span several waves, which waiting scan blocks would crowd); the scan,
  // one short wave, lets the assignment be scheduled at once.
  dk::wait_for_previous_grid();
  dk::allow_dependent_launch();
  dk::moe::scan(args);
}

extern "C" __global__ void __launch_bounds__(dk::moe::kAssignThreads)
    dk_moe_assign(const DkMoeRouteArgs args) {
  // A programmatic dependent of the scan, which itself returned from its wait only after the
  // top-k grid completed: both kernels' outputs are visible after this wait.
  dk::wait_for_previous_grid();
  dk::moe::assign(args);
}

#define DK_MOE_ROWS(op, tname, T)                                                     \
  extern "C" __global__ void __launch_bounds__(dk::moe::kRowsThreads)                 \
      dk_moe_##op##_##tname(const DkMoeRowsArgs args) {                               \
    dk::moe::op<T>(args);                                                             \
  }
#define DK_MOE_ROWS_ALL(op)               \
  DK_MOE_ROWS(op, f32, float)             \
  DK_MOE_ROWS(op, bf16, __nv_bfloat16)    \
  DK_MOE_ROWS(op, f16, __half)

DK_MOE_ROWS_ALL(permute)
DK_MOE_ROWS_ALL(perm_invert)
DK_MOE_ROWS_ALL(permute_tokens)
DK_MOE_ROWS_ALL(combine)
DK_MOE_ROWS_ALL(slot_dot)
DK_MOE_ROWS_ALL(combine_dot)
DK_MOE_ROWS_ALL(permute_dot)
