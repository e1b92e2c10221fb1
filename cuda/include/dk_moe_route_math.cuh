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
// picks the best score and one integer min picks the lowest index among equal scores. -0 ranks
// as +0; order_key ranks NaN as -inf, select_key (expert selection) below -inf, as in the CPU
// reference: the choice is always defined, and a NaN never displaces an expert masked with a
// -inf bias. kKeyNone, below every float, marks excluded entries (taken, outside the kept
// groups, past E).
constexpr uint32_t kKeyNone = 0u;
// A NaN selection score: above kKeyNone, below order_key(-inf); key_value gives a NaN back.
constexpr uint32_t kKeyNaN = 1u;

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
  // fmaxf drops a NaN (-> -inf), + 0 turns -0 into +0 and leaves every other value as it is;
  // then sign-magnitude to unsigned order: 2 integer instructions instead of a branchy 5.
  const uint32_t u = float_bits(fmaxf(f, -INFINITY) + 0.f);
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

// The key of an expert's selection score: order_key, except NaN -> kKeyNaN.
DK_MOE_FN uint32_t select_key(float f) { return f != f ? kKeyNaN : order_key(f); }

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
  // Derived once by route_config (group-limited selection only), so that no token divides:
  int gsize = 0;     // experts per group, e / n_groups
  uint32_t gmul = 0;  // idx / gsize == (idx * gmul) >> 20 for idx < 1024 (see route_config)
  int glanes_log2 = 0;  // n_groups <= 32: log2 of the lanes per group, 2^L * n_groups <= 32
};

DK_MOE_FN RouteConfig route_config(int e, int k, int score, int renormalize, int n_groups,
                                   int topk_groups, float scale, const float* bias) {
  RouteConfig c{e, k, score, renormalize, n_groups, topk_groups, scale, bias};
  c.gsize = e / n_groups;
  // gmul = ceil(2^20 / gsize): idx * gmul / 2^20 = idx / gsize + idx * d / 2^20 with 0 <= d < 1,
  // and idx * d / 2^20 < 1024 / 2^20 <= 1 / gsize (gsize <= 512 with >= 2 groups) keeps the floor.
  c.gmul = ((1u << 20) + static_cast<uint32_t>(c.gsize) - 1u) / static_cast<uint32_t>(c.gsize);
  while ((2 << c.glanes_log2) * n_groups <= 32) ++c.glanes_log2;
  return c;
}

template <class W>
DK_MOE_FN float warp_sum(W& w, float x) {
DK_UNROLL
  for (int o = 16; o > 0; o >>= 1) x += w.shfl_xor(x, o);
  return x;
}

// Words of shared scratch route_token needs per warp: the scores by expert (32 P), and for
// P = 4, 8 each lane's sorted candidate list (P + 1 entries of 2 words, see select_sorted).
template <int P>
constexpr int kScratchWords = P >= 4 && P <= 8 ? 32 * P + 64 * (P + 1) : 32 * P;

// Whether route_token selects from per-lane sorted candidates (select_sorted) rather than
// rescanning the lane's P keys every round (select_scan). Sorting costs P (P - 1) / 2
// compare-exchanges once, then a round costs ~16 instructions instead of ~29 (P = 4) or ~56
// (P = 8): sorted from the k where the static SASS counts cross (cuda/MOE.md, "Top-k: sorted
// candidates"). P >= 16 always scans (the sort would cost more than the rounds save).
template <int P>
DK_MOE_FN bool use_sorted(int k) {
  static_assert(P <= 8, "P >= 16 always scans");
  return P == 1 || (P == 2 && k >= 3) || (P == 4 && k >= 4) || (P == 8 && k >= 5);
}

// k rounds of warp argmax over candidates sorted per lane. Each lane sorts its P (key, index)
// pairs by descending key, equal keys in ascending index (odd-even transposition: adjacent
// compare-exchanges that swap only on a strictly greater key, so equal keys never cross and the
// initial order, ascending index, survives). A round is then: REDUX.MAX of the lanes' heads, the
// lowest index among the heads equal to it (REDUX.MIN; excluded entries carry index ~0), and the
// owner pops its head. For P >= 4 the entries after the head wait in `list` (P + 1 slots per
// lane, slot-major: a warp's 64-bit loads are conflict-free), so a pop costs two selects
// whatever P is; a lane reads only its own entries (no __syncwarp). Returns, in lane r < k, the
// r-th chosen expert (~0u where none).
template <int P, class W>
DK_MOE_FN uint32_t select_sorted(W& w, const uint32_t (&key)[P], int k, uint64_t* list) {
  const int lane = w.lane();
  uint32_t s[P], id[P];
DK_UNROLL
  for (int i = 0; i < P; ++i) {
    s[i] = key[i];
    id[i] = key[i] == kKeyNone ? 0xffffffffu : static_cast<uint32_t>(i * 32 + lane);
  }
DK_UNROLL
  for (int t = 0; t < P; ++t) {
DK_UNROLL
    for (int j = t & 1; j + 1 < P; j += 2) {
      const bool sw = s[j + 1] > s[j];
      const uint32_t s0 = sw ? s[j + 1] : s[j], s1 = sw ? s[j] : s[j + 1];
      const uint32_t i0 = sw ? id[j + 1] : id[j], i1 = sw ? id[j] : id[j + 1];
      s[j] = s0;
      s[j + 1] = s1;
      id[j] = i0;
      id[j + 1] = i1;
    }
  }
  uint32_t out = 0xffffffffu;
  if constexpr (P <= 2) {  // all in registers: a pop is 2 P selects
    for (int r = 0; r < k; ++r) {
      const uint32_t m = w.redux_max(s[0]);
      const uint32_t win = w.redux_min(s[0] == m ? id[0] : 0xffffffffu);
      const bool pop = id[0] == win;
DK_UNROLL
      for (int j = 0; j + 1 < P; ++j) {
        s[j] = pop ? s[j + 1] : s[j];
        id[j] = pop ? id[j + 1] : id[j];
      }
      s[P - 1] = pop ? kKeyNone : s[P - 1];
      id[P - 1] = pop ? 0xffffffffu : id[P - 1];
      out = lane == r ? win : out;
    }
    return out;
  }
  // The entries after the head, then two sentinels, in `list`: a lane pops at most its P
  // entries, so reads stay in slots 0 .. P. An entry is id << 32 | key (one 64-bit load). The
  // next entry is loaded at the top of every round, popped or not: its latency hides behind the
  // two reductions (a load after the pop would sit on the round's critical path).
  const uint64_t kNone = 0xffffffff00000000ull | kKeyNone;
DK_UNROLL
  for (int j = 1; j < P; ++j) list[(j - 1) * 32 + lane] = static_cast<uint64_t>(id[j]) << 32 | s[j];
  list[(P - 1) * 32 + lane] = kNone;
  list[P * 32 + lane] = kNone;
  uint32_t h0 = s[0], i0 = id[0];
  const uint64_t* next = list + lane;
  for (int r = 0; r < k; ++r) {
    const uint64_t h1 = *next;
    const uint32_t m = w.redux_max(h0);
    const uint32_t win = w.redux_min(h0 == m ? i0 : 0xffffffffu);
    // win == ~0 only when nothing is left anywhere (k above the candidates): nobody pops then,
    // which keeps the reads inside the list.
    if (i0 == win && win != 0xffffffffu) {
      h0 = static_cast<uint32_t>(h1);
      i0 = static_cast<uint32_t>(h1 >> 32);
      next += 32;
    }
    out = lane == r ? win : out;
  }
  return out;
}

// k rounds of warp argmax rescanning the lane's P keys: the lane's best (lowest i among equal
// keys), REDUX.MAX, the lowest expert index holding it (REDUX.MIN), the owner clears it. For
// large P (sorting 16 or 32 entries costs more than it saves) and small k. Same result as
// select_sorted.
template <int P, class W>
DK_MOE_FN uint32_t select_scan(W& w, uint32_t (&key)[P], int k) {
  const int lane = w.lane();
  uint32_t out = 0xffffffffu;
  for (int r = 0; r < k; ++r) {
    uint32_t best = kKeyNone;
    int bi = 0;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      if (key[i] > best) {
        best = key[i];
        bi = i;
      }
    }
    const uint32_t m = w.redux_max(best);
    const uint32_t cand =
        best == m && best != kKeyNone ? static_cast<uint32_t>(bi * 32 + lane) : 0xffffffffu;
    const uint32_t win = w.redux_min(cand);
    // The owner clears the entry by index match: no dynamic register index (a local-memory
    // array, see cuda/MOE.md).
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      key[i] = win == static_cast<uint32_t>(i * 32 + lane) ? kKeyNone : key[i];
    }
    out = lane == r ? win : out;
  }
  return out;
}

// Renormalisation divides each chosen score by their sum. At or above this sum the f32 scores
// give it to an ulp or two: a score that underflowed (a sigmoid below ~-88, a softmax
// probability ~87 below the token's max) has a true weight under FLT_MIN * 2^8 ~ 3e-36. Below
// it renormalise_small recomputes the ratios from the logits (rare: the chosen scores of a
// token sum to less than 0.4 %).
constexpr float kRenormaliseDirectMin = 0x1p-8f;

// Renormalised weight of the chosen expert whose logit lane holds in `xj` (`chosen`; other
// lanes pass -inf and get 0) when the chosen scores are too small to divide directly. The
// ratios are taken against the largest chosen logit mc, so nothing overflows or underflows
// before the division: softmax e^(x - mc); sigmoid s(x) (1 + e^-mc) = e^(x - mc) (1 + e^mc) /
// (1 + e^x), an identity; e^mc cannot overflow here (the largest score is below 2^-8, so
// mc < -ln 255 ~ -5.5). A token whose chosen logits are all -inf gets NaN (0 / 0, as the
// direct division gives).
template <class W>
DK_MOE_FN float renormalise_small(W& w, const RouteConfig& c, float xj, bool chosen) {
  const float mc = key_value(w.redux_max(order_key(xj)));
  float r = expf(xj - mc);
  if (c.score != DK_MOE_ARGS_SOFTMAX) r = r * ((1.f + expf(mc)) / (1.f + expf(xj)));
  r = chosen ? r : 0.f;
  return r / warp_sum(w, r);
}

// Routes one token held by a warp: lane l holds the logits of experts i * 32 + l (i < P) in
// x[i] (anything where the expert is >= e). On return lane j < k holds the j-th chosen expert
// (descending selection score, ties to the lower index) and its weight; other lanes hold -1, 0.
// `scratch` is kScratchWords<P> words of this warp's shared memory, 8-byte aligned; route_token
// leaves the warp converged and done with it (the next call may write it at once).
// `logit_of(i)` returns expert i's logit as x holds it (read again only by renormalise_small).
template <int P, class W, class LogitOf>
DK_MOE_FN void route_token(W& w, const float (&x)[P], const RouteConfig& c, uint32_t* scratch,
                           const LogitOf& logit_of, int& out_expert, float& out_weight) {
  const int lane = w.lane();
  // Slice i holds an expert (i * 32 + lane < e) iff i < nv: one compare per use.
  const int nv = (c.e - lane + 31) >> 5;
  float score[P];
  uint32_t key[P];

  if (c.score == DK_MOE_ARGS_SOFTMAX) {
    // The max as floats (fmaxf drops NaN: ranked -inf, as order_key does), one order key for
    // the REDUX: the same key as the max of the keys. A NaN logit makes every score NaN below.
    float mx = -INFINITY;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      if (i < nv) mx = fmaxf(mx, x[i]);
    }
    const float m = key_value(w.redux_max(order_key(mx)));
    float sum = 0.f;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      const float ex = expf(x[i] - m);  // unconditional: a select, not a branch per slice
      score[i] = i < nv ? ex : 0.f;
      sum += score[i];
    }
    sum = warp_sum(w, sum);
DK_UNROLL
    for (int i = 0; i < P; ++i) score[i] = score[i] / sum;
  } else {
DK_UNROLL
    for (int i = 0; i < P; ++i) score[i] = 1.f / (1.f + expf(-x[i]));
  }

  if (c.bias != nullptr) {  // one test per token, not one per slice
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      const int idx = i * 32 + lane;
      key[i] = i < nv ? select_key(score[i] + c.bias[idx]) : kKeyNone;
    }
  } else {
    // Sigmoid with no bias and no group excluded ranks the logits themselves: the order of the
    // exact scores, where float32 ones saturate (1 from x ~ 17, 0 below ~ -88) and would tie
    // (Llama 4's reference ranks the logits too). Groups sum scores, so they keep them. A NaN
    // logit (a NaN score) keeps ranking below every number, -inf included (select_key).
    const bool by_logit =
        c.score != DK_MOE_ARGS_SOFTMAX && !(c.n_groups > 1 && c.topk_groups < c.n_groups);
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      const uint32_t k = select_key(by_logit ? x[i] : score[i]);
      key[i] = i < nv ? k : kKeyNone;
    }
  }

  // Group-limited selection: a group's score is the sum of its top-2 selection scores; the
  // best topk_groups groups are kept (ties to the lower group), experts elsewhere are excluded.
  if (c.n_groups > 1 && c.topk_groups < c.n_groups) {
    const int ng = c.n_groups, gsize = c.gsize;
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      if (i < nv) scratch[i * 32 + lane] = key[i];
    }
    w.syncwarp();
    if (ng <= 32) {
      // L = 2^glanes_log2 lanes per group (L * ng <= 32); lane g * L + sub, sub = 0 holds its key.
      const int L = 1 << c.glanes_log2;
      const int g = lane >> c.glanes_log2, sub = lane & (L - 1);
      Top2 t2;
      if (g < ng) {
        for (int x2 = g * gsize + sub; x2 < (g + 1) * gsize; x2 += L) t2.add(scratch[x2]);
      }
      for (int o = L >> 1; o > 0; o >>= 1) {
        const uint32_t c2 = w.shfl_xor(t2.a, o), d2 = w.shfl_xor(t2.b, o);
        t2.merge(c2, d2);
      }
      // order_key never returns kKeyNone, so only the holders' keys take part.
      uint32_t gkey = g < ng && sub == 0 ? order_key(key_value(t2.a) + key_value(t2.b)) : kKeyNone;
      bool kept = false;
      for (int r = 0; r < c.topk_groups; ++r) {
        const uint32_t m = w.redux_max(gkey);
        const uint32_t win =
            w.redux_min(gkey == m && gkey != kKeyNone ? static_cast<uint32_t>(g) : 0xffffffffu);
        const bool mine = gkey != kKeyNone && static_cast<uint32_t>(g) == win;
        kept = kept || mine;
        gkey = mine ? kKeyNone : gkey;
      }
      // Publish the kept flags (1 word per group, after everyone has read the expert keys).
      w.syncwarp();
      if (g < ng && sub == 0) scratch[g] = kept ? 1u : 0u;
    } else {
      // Lane l owns groups l, l + 32, ... (one lane per group): ng <= e / 2 <= 16 * P, so at
      // most P / 2 of them.
      constexpr int kMaxOwn = P / 2 > 0 ? P / 2 : 1;
      uint32_t gkey[kMaxOwn];
DK_UNROLL
      for (int t = 0; t < kMaxOwn; ++t) {
        gkey[t] = kKeyNone;
        const int g = lane + 32 * t;
        if (g < ng) {
          Top2 t2;
          for (int x2 = g * gsize; x2 < (g + 1) * gsize; ++x2) t2.add(scratch[x2]);
          gkey[t] = order_key(key_value(t2.a) + key_value(t2.b));
        }
      }
      uint32_t kept_bits = 0;  // bit t: this lane's group in slot t is kept
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
        const uint32_t win = w.redux_min(
            best == m && best != kKeyNone ? static_cast<uint32_t>(lane + 32 * bt) : 0xffffffffu);
        // The owner clears group win by index match (no dynamic register index).
DK_UNROLL
        for (int t = 0; t < kMaxOwn; ++t) {
          const bool hit = win == static_cast<uint32_t>(lane + 32 * t);
          gkey[t] = hit ? kKeyNone : gkey[t];
          kept_bits |= hit ? 1u << t : 0u;
        }
      }
      w.syncwarp();
DK_UNROLL
      for (int t = 0; t < kMaxOwn; ++t) {
        if (lane + 32 * t < ng) scratch[lane + 32 * t] = (kept_bits >> t) & 1u;
      }
    }
    w.syncwarp();
DK_UNROLL
    for (int i = 0; i < P; ++i) {
      const int idx = i * 32 + lane;
      const int grp = static_cast<int>((static_cast<uint32_t>(idx) * c.gmul) >> 20);
      if (i < nv && scratch[grp] == 0u) key[i] = kKeyNone;
    }
    w.syncwarp();  // the flags are read; scratch takes the scores next
  }

  // The scores go to scratch, by expert: lane j reads its chosen expert's after the selection
  // (one load instead of a shuffle and selects every round).
DK_UNROLL
  for (int i = 0; i < P; ++i) scratch[i * 32 + lane] = float_bits(score[i]);
  w.syncwarp();
  uint32_t win;
  if constexpr (P <= 8) {
    win = use_sorted<P>(c.k)
              ? select_sorted<P>(w, key, c.k, reinterpret_cast<uint64_t*>(scratch + 32 * P))
              : select_scan<P>(w, key, c.k);
  } else {
    win = select_scan<P>(w, key, c.k);
  }
  out_expert = static_cast<int>(win);
  const float my_score = lane < c.k && win != 0xffffffffu ? bits_float(scratch[win]) : 0.f;
  w.syncwarp();  // scratch is rewritten by the next token

  float wv = my_score;
  if (c.renormalize) {
    const float total = warp_sum(w, wv);  // the same bits on every lane (butterfly)
    // Uniform over the warp; a NaN total keeps the division (NaN weights, as documented).
    if (total < kRenormaliseDirectMin) {
      const bool chosen = lane < c.k && win != 0xffffffffu;
      wv = renormalise_small(w, c, chosen ? logit_of(static_cast<int>(win)) : -INFINITY, chosen);
    } else {
      wv = wv / total;
    }
  }
  out_weight = lane < c.k ? wv * c.scale : 0.f;
}

}  // namespace moe
}  // namespace dk
