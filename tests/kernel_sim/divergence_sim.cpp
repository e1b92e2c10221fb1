// Host simulation of the divergence row kernel's arithmetic (cuda/include/dk_divergence_math.cuh,
// the same code the kernels compile), with the kernel's thread layout played out in order:
// each of `threads` lanes walks its share of the row as for_each does (8-element chunks, then a
// scalar tail), the per-lane states are merged by the warp butterfly and the cross-warp stage
// of block_merge / block_sum, and the loss and gradient are formed as in rows(). Lets the f32
// kernel math be checked against the f64 reference on a machine without a GPU.
//
// With cluster = C >= 1 it plays the Hopper cluster kernel (cuda/divergence_cluster.cu) instead:
// C blocks each own cluster_slice(v, C) elements, reduce them as a block, and the C block
// results are merged in rank order; with tree = 1 as the persistent kernel does it
// (cuda/divergence_persistent.cu): block statistics in two phases (block_stats), block results
// combined the same way over C lanes (merge_slots: offsets C/2 .. 1, lane 0's result).
//
// Protocol (binary, native endianness) on stdin, repeated until EOF:
//   i32 kind (0 forward KL, 1 reverse KL, 2 JSD), f32 beta, f32 inv_t, i32 v, i32 threads,
//   i32 vec (1: 8-element chunks + tail, 0: scalar), i32 cluster (0: one block per row, else
//   blocks per row), i32 tree (1: butterfly merge of the block results), f32 s[v], f32 t[v]
// and on stdout per case: f32 loss, f32 grad[v] (d loss / d s with scale 1, i.e. including 1/T),
// u8 lanes_agree (1 when every lane ended each reduction with bitwise the same state).
// DK_SIM_MUFU=up|down|hash replays the special-function instructions with the error model of
// dk_math.cuh instead of exactly.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dk_divergence_math.cuh"

using namespace dk::divergence;

namespace {

constexpr int kVec = 8;

template <typename T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Butterfly over 32 lanes, then the cross-warp stage: what block_merge / block_sum compute.
template <typename State, typename Merge>
State block_reduce(std::vector<State> lanes, Merge merge, bool* agree) {
  const int threads = static_cast<int>(lanes.size()), warps = threads / 32;
  auto butterfly = [&](State* x) {
    for (int o = 16; o > 0; o >>= 1) {
      State next[32];
      for (int l = 0; l < 32; ++l) next[l] = merge(x[l], x[l ^ o]);
      for (int l = 0; l < 32; ++l) x[l] = next[l];
    }
    for (int l = 1; l < 32; ++l) *agree = *agree && same_bits(x[l], x[0]);
  };
  std::vector<State> per_warp(warps);
  for (int w = 0; w < warps; ++w) {
    butterfly(&lanes[w * 32]);
    per_warp[w] = lanes[w * 32];
  }
  State y[32];
  for (int l = 0; l < 32; ++l) y[l] = l < warps ? per_warp[l] : State();
  butterfly(y);
  return y[0];
}

// Calls f(i, s, t, n) on each lane's share in the kernel's order.
template <typename F>
void for_each_lane(int lane, int threads, int v, bool vec, F&& f) {
  int start = 0;
  if (vec) {
    const int chunks = v / kVec;
    for (int c = lane; c < chunks; c += threads) f(c * kVec, kVec);
    start = chunks * kVec;
  }
  for (int i = start + lane; i < v; i += threads) f(i, 1);
}

// The persistent kernel's block statistics (block_stats in dk_divergence_passes.cuh): in each
// warp, the maxima by a butterfly of fmaxf, one rebase of every lane, the sums by a butterfly of
// additions; then the same over the warps' results.
// warp_stats over n lanes (a power of two): maxima by fmax butterfly, one rebase per lane, sums
// by an addition butterfly, offsets n/2 .. 1.
template <Kind K>
void warp_stats(RowStats<K>* x, int n, float k, bool* agree) {
  std::vector<float> mt(n), ms(n);
  for (int l = 0; l < n; ++l) {
    mt[l] = x[l].mt;
    ms[l] = x[l].ms;
  }
  for (int o = n >> 1; o > 0; o >>= 1) {
    std::vector<float> nt(n), ns(n);
    for (int l = 0; l < n; ++l) {
      nt[l] = std::fmax(mt[l], mt[l ^ o]);
      ns[l] = std::fmax(ms[l], ms[l ^ o]);
    }
    mt = nt;
    ms = ns;
  }
  for (int l = 0; l < n; ++l) {
    x[l].k = k;
    x[l].rebase(mt[l], ms[l]);
  }
  for (int o = n >> 1; o > 0; o >>= 1) {
    std::vector<RowStats<K>> next(x, x + n);
    for (int l = 0; l < n; ++l) {
      next[l].st = x[l].st + x[l ^ o].st;
      next[l].ss = x[l].ss + x[l ^ o].ss;
      if (RowStats<K>::kAcc) next[l].acc = x[l].acc + x[l ^ o].acc;
    }
    std::copy(next.begin(), next.end(), x);
  }
  for (int l = 1; l < n; ++l) *agree = *agree && same_bits(x[l], x[0]);
}

template <Kind K>
RowStats<K> block_reduce_stats(std::vector<RowStats<K>> lanes, float k, bool* agree) {
  const int threads = static_cast<int>(lanes.size()), warps = threads / 32;
  std::vector<RowStats<K>> per_warp(warps);
  for (int w = 0; w < warps; ++w) {
    warp_stats(&lanes[w * 32], 32, k, agree);
    per_warp[w] = lanes[w * 32];
  }
  RowStats<K> y[32];
  for (int l = 0; l < 32; ++l) y[l] = l < warps ? per_warp[l] : RowStats<K>();
  warp_stats(y, 32, k, agree);
  return y[0];
}

// The merge of a cluster's block results: rank order (the stream and smem cluster kernels) or
// the persistent kernel's butterfly over C lanes (C a power of two).
template <typename State, typename Merge>
State cluster_merge(std::vector<State> x, bool tree, Merge merge) {
  if (!tree) {
    State st = x[0];
    for (size_t r = 1; r < x.size(); ++r) st = merge(st, x[r]);
    return st;
  }
  const int c = static_cast<int>(x.size());
  for (int o = c >> 1; o > 0; o >>= 1) {
    std::vector<State> next(c);
    for (int l = 0; l < c; ++l) next[l] = merge(x[l], x[l ^ o]);
    x = next;
  }
  return x[0];
}

// The share [start, start + len) of the row one block reduces (the whole row, or a cluster
// block's slice).
struct Part {
  int start, len;
};

std::vector<Part> parts_of(int v, int cluster) {
  if (cluster == 0) return {Part{0, v}};
  std::vector<Part> parts;
  const int slice = cluster_slice(v, cluster);
  for (int r = 0; r < cluster; ++r) {
    const int start = std::min(v, r * slice);
    parts.push_back(Part{start, std::min(v, start + slice) - start});
  }
  return parts;
}

// kSeries: Row's JSD mode, chosen from β by main() with the kernels' with_tails.
template <Kind K, bool kSeries>
void run_row(float beta, float inv_t, const float* s, const float* t, int v, int threads, bool vec,
             int cluster, bool tree, float* loss_out, float* grad, bool* agree) {
  auto merge = [](RowStats<K> x, const RowStats<K>& y) {
    x.merge(y);
    return x;
  };
  const std::vector<Part> parts = parts_of(v, cluster);
  std::vector<RowStats<K>> blocks;
  for (const Part& part : parts) {
    std::vector<RowStats<K>> lanes(threads);
    const float* ps = s + part.start;
    const float* pt = t + part.start;
    for (int lane = 0; lane < threads; ++lane) {
      for_each_lane(lane, threads, part.len, vec, [&](int i, int n) {
        // StatsPass hands the raw logits to RowStats::add, which scales them by k.
        const float k = exp2_scale(inv_t);
        // A chunk with a masked logit is read again for add_masked (StatsPass::chunk).
        if (n == kVec) {
          const auto& tc = reinterpret_cast<const float(&)[kVec]>(pt[i]);
          const auto& sc = reinterpret_cast<const float(&)[kVec]>(ps[i]);
          if (lanes[lane].add(tc, sc, k)) lanes[lane].add_masked(tc, sc);
        } else {
          const auto& tc = reinterpret_cast<const float(&)[1]>(pt[i]);
          const auto& sc = reinterpret_cast<const float(&)[1]>(ps[i]);
          if (lanes[lane].add(tc, sc, k)) lanes[lane].add_masked(tc, sc);
        }
      });
    }
    blocks.push_back(tree ? block_reduce_stats(lanes, exp2_scale(inv_t), agree)
                          : block_reduce(lanes, merge, agree));
  }
  // Cluster kernels: the block results merged as every block of the cluster merges them (the
  // persistent kernel: warp_stats over C lanes).
  RowStats<K> st;
  if (tree) {
    warp_stats(blocks.data(), static_cast<int>(blocks.size()), exp2_scale(inv_t), agree);
    st = blocks[0];
  } else {
    st = cluster_merge(blocks, false, merge);
  }
  if (st.empty()) {
    *loss_out = 0.f;
    for (int i = 0; i < v; ++i) grad[i] = 0.f;
    return;
  }
  const Row r = row_of<K, kSeries>(st, inv_t, beta);
  float loss, center = 0.f;
  if (K != Kind::Jsd) {
    loss = kl_loss(st, r, &center);
  } else {
    auto add = [](float x, float y) { return x + y; };
    float kl_pm = 0.f;
    std::vector<float> parts_pm, parts_qm;
    for (const Part& part : parts) {
      std::vector<float> pm(threads, 0.f), qm(threads, 0.f);
      for (int lane = 0; lane < threads; ++lane) {
        for_each_lane(lane, threads, part.len, vec, [&](int i, int n) {
          for (int k = 0; k < n; ++k) {
            const float2 terms =
                jsd_terms<kSeries>(r, s[part.start + i + k], t[part.start + i + k]);
            pm[lane] += terms.x;
            qm[lane] += terms.y;
          }
        });
      }
      const float block_pm = block_reduce(pm, add, agree);
      const float block_qm = block_reduce(qm, add, agree);
      parts_pm.push_back(block_pm);
      parts_qm.push_back(block_qm);
    }
    if (cluster == 0) {
      kl_pm = parts_pm[0];
      center = parts_qm[0];
    } else if (!tree) {
      // The stream / smem kernels: 0 + part 0 + part 1 + ... in rank order.
      for (size_t r = 0; r < parts.size(); ++r) {
        kl_pm += parts_pm[r];
        center += parts_qm[r];
      }
    } else {
      kl_pm = cluster_merge(parts_pm, true, add);
      center = cluster_merge(parts_qm, true, add);
    }
    loss = jsd_loss(beta, kl_pm, center);
  }
  *loss_out = clamp_loss(loss);
  const GradRow g = grad_row_of<K, kSeries>(r, center, beta, grad_scale(inv_t, loss));
  for (int i = 0; i < v; ++i) grad[i] = grad_entry<K, kSeries>(g, s[i], t[i]);
}

template <typename T>
bool read(T* x, size_t n = 1) {
  return std::fread(x, sizeof(T), n, stdin) == n;
}

}  // namespace

int main() {
  // The special-function unit's error model (dk_math.cuh): exact, up, down or hashed.
  if (const char* m = std::getenv("DK_SIM_MUFU")) {
    dk::sim_mufu_error = std::strcmp(m, "up") == 0     ? 1
                         : std::strcmp(m, "down") == 0 ? -1
                         : std::strcmp(m, "hash") == 0 ? 2
                                                       : 0;
  }
  int32_t kind, v, threads, vec, cluster, tree;
  float beta, inv_t;
  while (read(&kind) && read(&beta) && read(&inv_t) && read(&v) && read(&threads) && read(&vec) &&
         read(&cluster) && read(&tree)) {
    if (v < 1 || threads < 32 || threads % 32 != 0 || threads > 1024 || kind < 0 || kind > 2 ||
        cluster < 0 || cluster > 16 || (tree != 0 && (cluster & (cluster - 1)) != 0)) {
      std::fprintf(stderr, "bad case header: kind %d v %d threads %d\n", kind, v, threads);
      return 2;
    }
    std::vector<float> s(v), t(v), grad(v);
    if (!read(s.data(), v) || !read(t.data(), v)) {
      std::fprintf(stderr, "truncated case\n");
      return 2;
    }
    float loss = 0.f;
    bool agree = true;
    auto run = [&](auto kind_tag) {
      constexpr Kind K = decltype(kind_tag)::value;
      // The kernel the host launches for this β: jsdx (series tails) or the others.
      auto row = K == Kind::Jsd && jsd_series_tails(beta) ? run_row<K, true> : run_row<K, false>;
      row(beta, inv_t, s.data(), t.data(), v, threads, vec != 0, cluster, tree != 0, &loss,
          grad.data(), &agree);
    };
    if (kind == 0) run(std::integral_constant<Kind, Kind::ForwardKl>{});
    if (kind == 1) run(std::integral_constant<Kind, Kind::ReverseKl>{});
    if (kind == 2) run(std::integral_constant<Kind, Kind::Jsd>{});
    const uint8_t ok = agree ? 1 : 0;
    std::fwrite(&loss, sizeof(float), 1, stdout);
    std::fwrite(grad.data(), sizeof(float), v, stdout);
    std::fwrite(&ok, 1, 1, stdout);
  }
  return 0;
}
