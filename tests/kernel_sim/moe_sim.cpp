// Host replay of the MoE route kernels (cuda/moe.cu). The per-token routing is the kernels' own
// code: route_token from cuda/include/dk_moe_route_math.cuh, run by 32 cooperative fibers (one
// per lane of the warp) that meet at every collective (REDUX max/min, shuffles, __syncwarp).
// The fibers check that every lane reaches the same collectives in the same order (a converged
// warp, as the full-mask intrinsics require), and between two collectives they run in
// ascending or descending lane order (chosen per run): a lane reading shared memory another
// lane writes without a __syncwarp between them gives different results in the two orders.
// The chunk counting, scan and assignment are replayed in plain loops with the kernels'
// integer helpers (order-independent bit masks, ranks, padding, empty rows).
//
// Protocol (binary, native endianness) on stdin, repeated until EOF:
//   i32 n, e, k, score, renormalize, n_groups, topk_groups; f32 scale; i32 capacity (0 = none),
//   block, has_bias, reverse_lanes; i64 perm_rows; f32 logits[n * e]; f32 bias[e] if has_bias
// and on stdout per case:
//   u8 converged; i32 expert_ids[n * k]; f32 weights[n * k]; i32 counts[e]; i32 offsets[e + 1];
//   i32 perm[perm_rows]; i32 position[n * k]
// Outputs start poisoned (0x7fff0000) so unwritten entries show.
#include <ucontext.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "dk_moe_route_math.cuh"

using namespace dk::moe;

namespace {

constexpr int32_t kPoison = 0x7fff0000;

// 32 lanes as fibers meeting at every collective.
class FiberWarp {
 public:
  explicit FiberWarp(bool reverse) : reverse_(reverse) {
    for (auto& s : stacks_) s.resize(1 << 16);
  }

  int lane() const { return cur_; }
  uint32_t redux_max(uint32_t v) { return collective(kMax, v, 0); }
  uint32_t redux_min(uint32_t v) { return collective(kMin, v, 0); }
  uint32_t shfl(uint32_t v, int src) { return collective(kShfl, v, src); }
  float shfl(float v, int src) { return bits_float(collective(kShfl, float_bits(v), src)); }
  uint32_t shfl_xor(uint32_t v, int m) { return collective(kShflXor, v, m); }
  float shfl_xor(float v, int m) { return bits_float(collective(kShflXor, float_bits(v), m)); }
  void syncwarp() { collective(kSync, 0, 0); }

  // Runs body(lane) on the 32 lanes; false when the lanes' collectives diverged.
  bool run(std::function<void(int)> body) {
    body_ = std::move(body);
    current_ = this;
    for (int l = 0; l < 32; ++l) {
      getcontext(&ctx_[l]);
      ctx_[l].uc_stack.ss_sp = stacks_[l].data();
      ctx_[l].uc_stack.ss_size = stacks_[l].size();
      ctx_[l].uc_link = &main_;
      makecontext(&ctx_[l], &FiberWarp::trampoline, 0);
      op_[l] = kNone;
    }
    for (;;) {
      for (int s = 0; s < 32; ++s) {
        cur_ = reverse_ ? 31 - s : s;
        swapcontext(&main_, &ctx_[cur_]);
      }
      const Op o = op_[0];
      for (int l = 1; l < 32; ++l) {
        if (op_[l] != o) return false;  // the suspended fibers are abandoned
      }
      if (o == kDone) return true;
      for (int l = 0; l < 32; ++l) {
        switch (o) {
          case kMax: {
            uint32_t m = 0;
            for (int q = 0; q < 32; ++q) m = val_[q] > m ? val_[q] : m;
            res_[l] = m;
            break;
          }
          case kMin: {
            uint32_t m = UINT32_MAX;
            for (int q = 0; q < 32; ++q) m = val_[q] < m ? val_[q] : m;
            res_[l] = m;
            break;
          }
          case kShfl:
            res_[l] = val_[arg_[l] & 31];
            break;
          case kShflXor:
            res_[l] = val_[(l ^ arg_[l]) & 31];
            break;
          default:
            res_[l] = 0;
        }
      }
    }
  }

 private:
  enum Op { kNone, kMax, kMin, kShfl, kShflXor, kSync, kDone };

  uint32_t collective(Op o, uint32_t v, int a) {
    const int l = cur_;
    op_[l] = o;
    val_[l] = v;
    arg_[l] = a;
    swapcontext(&ctx_[l], &main_);
    return res_[l];
  }

  static void trampoline() {
    FiberWarp* w = current_;
    const int l = w->cur_;
    w->body_(l);
    w->op_[l] = kDone;  // returns to main_ through uc_link
  }

  static FiberWarp* current_;
  bool reverse_;
  int cur_ = 0;
  ucontext_t main_, ctx_[32];
  std::vector<char> stacks_[32];
  Op op_[32];
  uint32_t val_[32], res_[32];
  int arg_[32];
  std::function<void(int)> body_;
};

FiberWarp* FiberWarp::current_ = nullptr;

struct Case {
  int32_t n, e, k, score, renormalize, n_groups, topk_groups;
  float scale;
  int32_t capacity, block, has_bias, reverse;
  int64_t perm_rows;
  std::vector<float> logits, bias;
};

struct Out {
  bool converged = true;
  std::vector<int32_t> ids, counts, offsets, perm, position;
  std::vector<float> weights;
};

template <int P>
void route_all(const Case& c, Out& o) {
  const int n = c.n, e = c.e, k = c.k;
  const int cap = c.capacity > 0 ? c.capacity : INT_MAX;
  const int chunks = (n + DK_MOE_CHUNK - 1) / DK_MOE_CHUNK;
  const RouteConfig cfg = route_config(e, k, c.score, c.renormalize, c.n_groups, c.topk_groups,
                                       c.scale, c.has_bias ? c.bias.data() : nullptr);
  std::vector<int> cc(static_cast<size_t>(e) * chunks, kPoison);
  std::vector<uint32_t> scratch(kScratchWords<P>, 0xdeadbeefu);  // one warp's shared scratch
  FiberWarp warp(c.reverse != 0);

  // 1. top-k per token and per-chunk masks, in-chunk ranks, chunk counts.
  for (int ch = 0; ch < chunks; ++ch) {
    std::vector<uint32_t> smask(e, 0u);
    std::vector<int> chosen(32 * k, -1);
    for (int tt = 0; tt < DK_MOE_CHUNK; ++tt) {
      const int64_t tok = static_cast<int64_t>(ch) * DK_MOE_CHUNK + tt;
      if (tok >= n) break;
      int ex[32];
      float wt[32];
      const bool ok = warp.run([&](int lane) {
        const float* token_row = c.logits.data() + tok * e;
        float x[P];
        for (int i = 0; i < P; ++i) {
          const int idx = i * 32 + lane;
          x[i] = idx < e ? token_row[idx] : -INFINITY;
        }
        route_token<P>(
            warp, x, cfg, scratch.data(), [=](int i) { return token_row[i]; }, ex[lane], wt[lane]);
      });
      if (!ok) {
        o.converged = false;
        return;
      }
      for (int j = 0; j < k; ++j) {
        o.ids[tok * k + j] = ex[j];
        o.weights[tok * k + j] = wt[j];
        if (ex[j] >= 0 && ex[j] < e) {
          smask[ex[j]] |= 1u << tt;  // atomicOr
          chosen[tt * k + j] = ex[j];
        }
      }
    }
    for (int tt = 0; tt < DK_MOE_CHUNK; ++tt) {
      const int64_t tok = static_cast<int64_t>(ch) * DK_MOE_CHUNK + tt;
      for (int j = 0; j < k && tok < n; ++j) {
        const int ex = chosen[tt * k + j];
        if (ex >= 0) o.position[tok * k + j] = popcount(smask[ex] & lanes_below(tt));
      }
    }
    for (int x = 0; x < e; ++x) cc[static_cast<size_t>(x) * chunks + ch] = popcount(smask[x]);
  }

  // 2. per-expert exclusive scan over the chunks, capacity clamp.
  for (int x = 0; x < e; ++x) {
    int run = 0;
    for (int ch = 0; ch < chunks; ++ch) {
      const int v = cc[static_cast<size_t>(x) * chunks + ch];
      cc[static_cast<size_t>(x) * chunks + ch] = run;
      run += v;
    }
    o.counts[x] = run < cap ? run : cap;
  }

  // 3. offsets, positions, perm, empty rows.
  std::vector<int> off(e + 1, 0), kept(e);
  for (int x = 0; x < e; ++x) {
    kept[x] = o.counts[x];
    off[x + 1] = off[x] + round_up(kept[x], c.block);
  }
  for (int x = 0; x <= e; ++x) o.offsets[x] = off[x];
  for (int s = 0; s < n * k; ++s) {
    const int x = o.ids[s];
    if (x < 0 || x >= e) {
      o.position[s] = -1;
      continue;
    }
    const int ch = (s / k) / DK_MOE_CHUNK;
    const int rank = cc[static_cast<size_t>(x) * chunks + ch] + o.position[s];
    if (rank < cap) {
      const int row = off[x] + rank;
      o.position[s] = row;
      if (row >= 0 && row < c.perm_rows) o.perm[row] = s;
    } else {
      o.position[s] = -1;
    }
  }
  for (int64_t r = 0; r < c.perm_rows; ++r) {
    const bool empty = c.block == 1 ? r >= off[e] : is_empty_row(off.data(), kept.data(), e, r);
    if (empty) o.perm[r] = -1;
  }
}

template <typename T>
bool read(T* v, size_t count = 1) {
  return fread(v, sizeof(T), count, stdin) == count;
}

template <typename T>
void write(const std::vector<T>& v) {
  fwrite(v.data(), sizeof(T), v.size(), stdout);
}

}  // namespace

int main() {
  for (;;) {
    Case c;
    if (!read(&c.n)) break;
    bool ok = read(&c.e) && read(&c.k) && read(&c.score) && read(&c.renormalize) &&
              read(&c.n_groups) && read(&c.topk_groups) && read(&c.scale) && read(&c.capacity) &&
              read(&c.block) && read(&c.has_bias) && read(&c.reverse) && read(&c.perm_rows);
    if (!ok) return 2;
    c.logits.resize(static_cast<size_t>(c.n) * c.e);
    if (!read(c.logits.data(), c.logits.size())) return 2;
    if (c.has_bias) {
      c.bias.resize(c.e);
      if (!read(c.bias.data(), c.bias.size())) return 2;
    }
    Out o;
    const size_t nk = static_cast<size_t>(c.n) * c.k;
    o.ids.assign(nk, kPoison);
    o.weights.assign(nk, NAN);
    o.counts.assign(c.e, kPoison);
    o.offsets.assign(c.e + 1, kPoison);
    o.perm.assign(c.perm_rows, kPoison);
    o.position.assign(nk, kPoison);
    const int p = c.e <= 32 ? 1 : c.e <= 64 ? 2 : c.e <= 128 ? 4 : c.e <= 256 ? 8 : c.e <= 512 ? 16 : 32;
    switch (p) {
      case 1: route_all<1>(c, o); break;
      case 2: route_all<2>(c, o); break;
      case 4: route_all<4>(c, o); break;
      case 8: route_all<8>(c, o); break;
      case 16: route_all<16>(c, o); break;
      default: route_all<32>(c, o); break;
    }
    const uint8_t conv = o.converged ? 1 : 0;
    fwrite(&conv, 1, 1, stdout);
    write(o.ids);
    write(o.weights);
    write(o.counts);
    write(o.offsets);
    write(o.perm);
    write(o.position);
  }
  return 0;
}
