// The routing arithmetic of the MoE kernels (cuda/moe.cu), written once for the device and for
// the host: tests/kernel_sim/moe_sim.cpp compiles this header with the system C++ compiler and
// runs `route_token` with 32 cooperative host fibers standing in for the lanes of a warp, so
// scores, group selection, top-k with ties and renormalisation are checked without a GPU.
//
// The warp is a template parameter `W` providing:
//   int lane();                                  this lane, 0..31
//   uint32_t redux_max(uint32_t), redux_min(uint32_t);   over the full warp (REDUX on sm_80+)
//   float shfl(float, int src);  uint32_t shfl(uint32_t, int src);
//   float shfl_xor(float, int);  uint32_t shfl_xor(uint32_t, int);
//   void syncwarp();
// Every lane calls the same collectives in the same order (the host fibers check it).
#pragma once

#include <stdint.h>
#include <string.h>

#include "dk_math.cuh"
#include "dk_moe_args.h"

#ifdef __CUDACC__
#define DK_MOE_FN __device__ __forceinline__
#else
#define DK_MOE_FN inline
#endif

namespace dk {
namespace moe {

// ---- Order keys -----------------------------------------------------------------------------
// A float maps to a uint32 whose unsigned order is the float order, so one integer max (REDUX)
// picks the best score and one integer min picks the lowest index among equal scores. NaN ranks
// as -inf (as in the CPU reference: the choice is always defined, ties to the lower index), -0
// as +0, and kKeyNone, below every float, marks excluded entries (taken, outside the kept
// groups, past E).
constexpr uint32_t kKeyNone = 0u;

DK_MOE_FN uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DK_MOE_FN float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

DK_MOE_FN uint32_t order_key(float f) {
  if (f != f) f = -INFINITY;
  const uint32_t u = f == 0.f ? 0u : float_bits(f);  // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // -inf -> 0x007fffff > kKeyNone
}

// Inverse of order_key on its image.
DK_MOE_FN float key_value(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The two largest keys seen (kKeyNone when fewer).
struct Top2 {
  uint32_t a = kKeyNone, b = kKeyNone;  // a >= b
  DK_MOE_FN void add(uint32_t x) {
    if (x > a) {
      b = a;
      a = x;
    } else if (x > b) {
      b = x;
    }
  }
  // Merge with another pair (c >= d): the top two of {a, b, c, d}.
  DK_MOE_FN void merge(uint32_t c, uint32_t d) {
    const uint32_t hi = a > c ? a : c, lo = a > c ? c : a;
    const uint32_t rest = b > d ? b : d;
    a = hi;
    b = lo > rest ? lo : rest;
  }
};

// ---- Small integer helpers shared by the kernels and the simulation -----------------------
DK_MOE_FN int round_up(int x, int m) { return (x + m - 1) / m * m; }

// The segment e with off[e] <= r < off[e + 1], for 0 <= r < off[n_segments] (binary search).
DK_MOE_FN int find_segment(const int* off, int n_segments, int r) {
  int lo = 0, hi = n_segments - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (off[mid] <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Rows of perm that hold no slot: the padding at the end of each segment, and everything past
// R = off[e]. `kept` are the per-expert counts after capacity drops.
DK_MOE_FN bool is_empty_row(const int* off, const int* kept, int e, int64_t r) {
  const int total = off[e];
  if (r >= total) return true;
  const int seg = find_segment(off, e, static_cast<int>(r));
  return static_cast<int>(r) - off[seg] >= kept[seg];
}

// Bits of the lanes (tokens of a chunk) below `t`.
DK_MOE_FN uint32_t lanes_below(int t) { return t == 0 ? 0u : (0xffffffffu >> (32 - t)); }

DK_MOE_FN int popcount(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// ---- One token's routing --------------------------------------------------------------------
struct RouteConfig {
  int e, k, score, renormalize, n_groups, topk_groups;
  float scale;
  const float* bias;  // [e] or null
};

template <class W>
DK_MOE_FN float warp_sum(W& w, float x) {
DK_UNROLL
  for (int o = 16; o > 0; o >>= 1) x += w.shfl_xor(x, o);
  return x;
}

// Routes one token held by a warp: lane l holds the logits of experts i * 32 + l (i < P) in
// x[i] (anything where the expert is >= e). On return lane j < k holds the j-th chosen expert
// (descending selection score, ties to the lower index) and its weight; other lanes hold -1, 0.
// `scratch` is 32 * P words of this warp's shared memory (used only with groups).
template <int P, class W>
DK_MOE_FN void route_token(W& w, const float (&x)[P], const RouteConfig& c, uint32_t* scratch,
                           int& out_expert, float& out_weight) {
  const int lane = w.lane();
  float score[P];
  uint32_t key[P];

  if (c.score == DK_MOE_ARGS_SOFTMAX) {
    // Max through order keys (one REDUX): a NaN logit makes every score NaN below anyway.
    uint32_t mk = kKeyNone;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      const uint32_t kx = order_key(x[i]);
      if (i * 32 + lane < c.e && kx > mk) mk = kx;
    }
    const float m = key_value(w.redux_max(mk));
    float sum = 0.f;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      score[i] = i * 32 + lane < c.e ? expf(x[i] - m) : 0.f;
      sum += score[i];
    }
    sum = warp_sum(w, sum);
DK_UNROLL
    for (int i = 0; i < P; ++i) score[i] = score[i] / sum;
  } else {
DK_UNROLL
    for (int i = 0; i < P; ++i) score[i] = 1.f / (1.f + expf(-x[i]));
  }

DK_UNROLL
  for (int i = 0; i < P; ++i) {
    const int idx = i * 32 + lane;
    key[i] = idx < c.e ? order_key(c.bias ? score[i] + c.bias[idx] : score[i]) : kKeyNone;
  }

  // Group-limited selection: a group's score is the sum of its top-2 selection scores; the
  // best topk_groups groups are kept (ties to the lower group), experts elsewhere are excluded.
  if (c.n_groups > 1 && c.topk_groups < c.n_groups) {
    const int ng = c.n_groups, gsize = c.e / ng;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      if (i * 32 + lane < c.e) scratch[i * 32 + lane] = key[i];
    }
    w.syncwarp();
    // L lanes per group (a power of two, L * ng <= 32), or one lane per group when ng > 32.
    int L = 1;
    while (2 * L * ng <= 32) L *= 2;
    const int sub = lane & (L - 1);
    // Groups a lane owns: ng <= e / 2 <= 16 * P, so at most P / 2 (one when ng <= 32).
    constexpr int kMaxOwn = P / 2 > 0 ? P / 2 : 1;
    uint32_t gkey[kMaxOwn];
DK_UNROLL
    for (int t = 0; t < kMaxOwn; ++t) gkey[t] = kKeyNone;
    if (ng <= 32) {
      const int g = lane / L;
      Top2 t2;
      if (g < ng) {
        for (int x2 = g * gsize + sub; x2 < (g + 1) * gsize; x2 += L) t2.add(scratch[x2]);
      }
      for (int o = L >> 1; o > 0; o >>= 1) {
        const uint32_t c2 = w.shfl_xor(t2.a, o), d2 = w.shfl_xor(t2.b, o);
        t2.merge(c2, d2);
      }
      if (g < ng && sub == 0) gkey[0] = order_key(key_value(t2.a) + key_value(t2.b));
    } else {
      // Lane l owns groups l, l + 32, ... (one lane per group).
DK_UNROLL
      for (int t = 0; t < kMaxOwn; ++t) {
        const int g = lane + 32 * t;
        if (g < ng) {
          Top2 t2;
          for (int x2 = g * gsize; x2 < (g + 1) * gsize; ++x2) t2.add(scratch[x2]);
          gkey[t] = order_key(key_value(t2.a) + key_value(t2.b));
        }
      }
    }
    // Owner of group g: lane (g % 32) / slot g / 32 when ng > 32, lane g * L / slot 0 otherwise.
    uint32_t kept_bits = 0;  // bit t: this lane's owned group in slot t is kept
    for (int r = 0; r < c.topk_groups; ++r) {
      uint32_t best = kKeyNone;
      int bt = 0;
DK_UNROLL
      for (int t = 0; t < kMaxOwn; ++t) {
        if (gkey[t] > best) {
          best = gkey[t];
          bt = t;
        }
      }
      const uint32_t m = w.redux_max(best);
      const int my_group = ng <= 32 ? lane / L : lane + 32 * bt;
      const uint32_t win = w.redux_min(best == m && best != kKeyNone ? static_cast<uint32_t>(my_group) : 0xffffffffu);
      const bool mine = ng <= 32 ? (sub == 0 && static_cast<uint32_t>(lane / L) == win)
                                 : (static_cast<uint32_t>(lane) == (win & 31u));
      // The owner clears its slot bt (the lowest slot holding m). Written as a value match,
      // not gkey[bt] = ..., which the compiler would turn into a local-memory store.
      bool done = !mine;
DK_UNROLL
      for (int t = 0; t < kMaxOwn; ++t) {
        const bool hit = !done && gkey[t] == m;
        gkey[t] = hit ? kKeyNone : gkey[t];
        kept_bits |= hit ? 1u << t : 0u;
        done = done || hit;
      }
    }
    // Publish the kept flags (1 word per group, after everyone has read the expert keys).
    w.syncwarp();
    if (ng <= 32) {
      if (sub == 0 && lane / L < ng) scratch[lane / L] = kept_bits & 1u;
    } else {
DK_UNROLL
      for (int t = 0; t < kMaxOwn; ++t) {
        if (lane + 32 * t < ng) scratch[lane + 32 * t] = (kept_bits >> t) & 1u;
      }
    }
    w.syncwarp();
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      const int idx = i * 32 + lane;
      if (idx < c.e && scratch[idx / gsize] == 0u) key[i] = kKeyNone;
    }
    w.syncwarp();  // scratch is rewritten by the next token
  }

  // k rounds of warp argmax: the lane's best (lowest i among equal keys), the warp's best key
  // (REDUX max), the lowest expert index holding it (REDUX min), its score from its lane.
  out_expert = -1;
  float my_score = 0.f;
  for (int r = 0; r < c.k; ++r) {
    uint32_t best = kKeyNone;
    int bi = 0;
    float bs = 0.f;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      if (key[i] > best) {
        best = key[i];
        bi = i;
        bs = score[i];
      }
    }
    const uint32_t m = w.redux_max(best);
    const uint32_t cand =
        best == m && best != kKeyNone ? static_cast<uint32_t>(bi * 32 + lane) : 0xffffffffu;
    const uint32_t win = w.redux_min(cand);
    const int owner = static_cast<int>(win & 31u);
    const float ws = w.shfl(bs, owner);
    // The owner clears its entry bi: the lowest i whose key is m (a value match, see above).
    bool done = lane != owner;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      const bool hit = !done && key[i] == m;
      key[i] = hit ? kKeyNone : key[i];
      done = done || hit;
    }
    if (lane == r) {
      out_expert = static_cast<int>(win);
      my_score = ws;
    }
  }

  float wv = lane < c.k ? my_score : 0.f;
  if (c.renormalize) wv = wv / warp_sum(w, wv);
  out_weight = lane < c.k ? wv * c.scale : 0.f;
}

}  // namespace moe
}  // namespace dk
