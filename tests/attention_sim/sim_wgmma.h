// Scheduler side of the emulated Hopper warpgroup MMA (wgmma.mma_async m64nNk16 with f32
// accumulators, wgmma.fence / commit_group / wait_group, fence.proxy.async): see sim_core.h's
// header ("wgmma") for the model, tests/attention_sim/dk_wgmma.cuh for the kernels' functions.
// Included by sim_impl.h only (one translation unit).
#pragma once

#include "sim_core.h"

namespace sim {

// The accumulators of a product pending in the LATE model hold this NaN (bits), so a kernel
// that reads them before the wgmma_wait that retires it computes with NaN.
constexpr uint32_t kWgPoison = 0x7fd0ad00u;

// A decoded shared-memory matrix descriptor (sm_90 wgmma: start, leading / stride byte offsets;
// the 128-byte swizzle is the only mode modelled).
struct WgDesc {
  uint32_t start, lbo, sbo;
};

inline WgDesc wg_decode(uint64_t desc, const char* which) {
  const uint32_t base_offset = static_cast<uint32_t>((desc >> 49) & 7);
  const uint32_t swizzle = static_cast<uint32_t>(desc >> 62);
  if (swizzle != 1)
    fail("%s: wgmma %s descriptor 0x%016llx has swizzle mode %u (the emulator models the 128-byte "
         "swizzle only, mode 1)", where(), which, (unsigned long long)desc, swizzle);
  if (base_offset != 0)
    fail("%s: wgmma %s descriptor 0x%016llx has matrix base offset %u (must be 0: the operands' "
         "1024-byte swizzle atoms are aligned)", where(), which, (unsigned long long)desc, base_offset);
  const uint64_t reserved = desc & ~((0x3FFFull) | (0x3FFFull << 16) | (0x3FFFull << 32) |
                                     (7ull << 49) | (3ull << 62));
  if (reserved)
    fail("%s: wgmma %s descriptor 0x%016llx sets reserved bits 0x%016llx (an address or offset "
         "overflowed its 14-bit field?)", where(), which, (unsigned long long)desc,
         (unsigned long long)reserved);
  return WgDesc{static_cast<uint32_t>(desc & 0x3FFF) << 4,
                static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
                static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4};
}

// The 128-byte swizzle: address bits 4-6 XOR bits 7-9.
inline uint32_t wg_swizzle(uint32_t linear) { return linear ^ (((linear >> 7) & 7) << 4); }

// Shared address of element (row, k) of a K-major operand (row = m of A, n of B; k < 16). The
// swizzle acts on the address (S.smem_base + the offset in the dynamic shared memory).
inline uint32_t wg_kmajor(const WgDesc& d, int row, int k) {
  return wg_swizzle(d.start + 128u * (row % 8) + d.sbo * (row / 8) + 2u * k);
}
// Shared address of element (k, n) of an MN-major operand (B with imm-trans-b = 1; k < 16).
inline uint32_t wg_mnmajor(const WgDesc& d, int k, int n) {
  return wg_swizzle(d.start + 2u * (n % 64) + d.lbo * (n / 64) + 128u * (k % 8) + d.sbo * (k / 8));
}
// The offset of an operand element's address in the dynamic shared memory.
inline uint32_t wg_off(uint32_t addr, bool is_a) {
  if (addr < S.smem_base)
    fail("%s: wgmma %s operand element at shared address %u, below the dynamic shared memory "
         "(which starts at %u; are the operand's 1024-byte swizzle atoms aligned?)",
         where(), is_a ? "A" : "B", addr, S.smem_base);
  return addr - S.smem_base;
}

inline float wg_elem(uint16_t h, bool bf16) { return bf16 ? bf2f(h) : h2f(h); }

// Warp w's position in its warpgroup (warp % 4 of its block).
inline int wg_sub(int w) { return (w % (S.nthreads / 32)) % 4; }

// The operand elements warp w of `op` reads from shared memory (A: its 16 rows, ss only; B: all
// 16 x N), each bounds-checked, as (offset, is_a, row, column) visits.
template <typename F>
inline void wg_visit(const WgOp& op, F&& f) {
  const int r0 = 16 * wg_sub(op.warp);
  if (!op.rs) {
    const WgDesc a = wg_decode(op.da, "A");
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 16; ++k) f(wg_off(wg_kmajor(a, r0 + r, k), true), true, r, k);
  }
  const WgDesc b = wg_decode(op.db, "B");
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < op.n; ++n)
      f(wg_off(op.rs ? wg_mnmajor(b, k, n) : wg_kmajor(b, n, k), false), false, k, n);
}

// Computes warp w's 16 x N share of `op` from shared memory (and the A fragments saved at issue)
// with the accumulator input `cin` (32 x n/2, or none): res[l][4 j + 2 i + e] =
// D[g + 8 i][8 j + 2 t + e] of the warp's rows. Products exact, summed in double with the input,
// rounded once to f32 (the tensor cores' internal order and precision are not modelled).
inline void wg_compute(const WgOp& op, const float* cin, float* res) {
  double A[16][16], B[16][128];
  wg_visit(op, [&](uint32_t off, bool is_a, int i, int j) {
    uint16_t h;
    memcpy(&h, S.smem + off, 2);
    (is_a ? A[i][j] : B[i][j]) = wg_elem(h, op.bf16);
  });
  if (op.rs) {
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int h = 0; h < 2; ++h) {
        auto el = [&](int i) {
          return wg_elem(static_cast<uint16_t>(h ? op.a[l][i] >> 16 : op.a[l][i] & 0xffffu), op.bf16);
        };
        A[g][2 * t + h] = el(0);
        A[g + 8][2 * t + h] = el(1);
        A[g][2 * t + 8 + h] = el(2);
        A[g + 8][2 * t + 8 + h] = el(3);
      }
    }
  }
  const int half = op.n / 2;
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < op.n / 8; ++j)
      for (int i = 0; i < 2; ++i)
        for (int e = 0; e < 2; ++e) {
          const int x = 4 * j + 2 * i + e, row = g + 8 * i, col = 8 * j + 2 * t + e;
          double acc = cin ? cin[l * half + x] : 0.0;
          for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
          res[l * half + x] = static_cast<float>(acc);
        }
  }
}

// Do lane l's accumulator arrays of ops p and q overlap; fails where they overlap partially.
inline bool wg_same_d(const WgOp& p, const WgOp& q, int l) {
  const float *a = p.d[l], *b = q.d[l];
  if (a + p.n / 2 <= b || b + q.n / 2 <= a) return false;
  if (a != b || p.n != q.n) {
    S.cur = p.warp * 32 + l;
    fail("%s: the accumulators of a wgmma (%p, %d floats) partially overlap those of a pending "
         "one (%p, %d floats)", where(), static_cast<const void*>(a), p.n / 2,
         static_cast<const void*>(b), q.n / 2);
  }
  return true;
}

// Lane l's accumulators must hold what the latest pending product on them left there.
inline void wg_check_untouched(const WgOp& p, int l, const char* when) {
  for (int x = 0; x < p.n / 2; ++x) {
    if (fbits(p.d[l][x]) != p.expect[l * (p.n / 2) + x]) {
      S.cur = p.warp * 32 + l;
      fail("%s: accumulator register d[%d] of a pending wgmma was written by the kernel before %s "
           "(accumulators belong to the product until the wgmma_wait that retires it)",
           where(), x, when);
    }
  }
}

// Retires the oldest pending product of warp w (LATE: computes it now).
inline void wg_retire(WgWarp& W) {
  WgOp& op = W.ops.front();
  const int half = op.n / 2;
  // A fragments: unchanged since issue (the registers are read until the product completes).
  if (op.rs) {
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i)
        if (op.a_ptr[l][i] != op.a[l][i]) {
          S.cur = op.warp * 32 + l;
          fail("%s: A fragment register a[%d] of a pending wgmma (A from registers) changed before "
               "the wgmma_wait that retires it (0x%08x at issue, 0x%08x now; the fragment array "
               "must stay live and unmodified until then)", where(), i, op.a[l][i], op.a_ptr[l][i]);
        }
  }
  // The next pending product on the same accumulators, per lane (it takes over the check).
  WgOp* next[32];
  for (int l = 0; l < 32; ++l) {
    next[l] = nullptr;
    for (size_t q = 1; q < W.ops.size() && !next[l]; ++q)
      if (wg_same_d(W.ops[q], op, l)) next[l] = &W.ops[q];
    if (!next[l]) wg_check_untouched(op, l, "the wgmma_wait that retires it");
  }
  if (S.late_copies) {
    std::vector<float> res(32 * half);
    for (int l = 0; l < 32; ++l)
      if (op.acc && !op.cin_ready[l]) fail("internal: wgmma accumulator input never computed");
    wg_compute(op, op.acc ? op.cin.data() : nullptr, res.data());
    for (int l = 0; l < 32; ++l) {
      if (next[l]) {
        // A later pending product on the same registers: its input (the registers stay poisoned).
        WgOp& q = *next[l];
        if (q.acc) memcpy(&q.cin[l * half], &res[l * half], half * sizeof(float));
        q.cin_ready[l] = true;
      } else {
        memcpy(op.d[l], &res[l * half], half * sizeof(float));
      }
    }
  }
  for (uint32_t c : op.chunks) S.wg_busy[c]--;
  W.ops.erase(W.ops.begin());
}

// Issue of warp w's share of a wgmma (all 32 lanes posted the same one).
inline void wg_issue(int w, bool rs) {
  Lane* L = &S.lanes[w * 32];
  S.cur = w * 32;
  if (S.clustered) fail("%s: wgmma in a cluster launch (not modelled)", where());
  if (S.nthreads % 128 != 0)
    fail("%s: wgmma in a block of %d threads (warpgroups are 128 threads)", where(), S.nthreads);
  for (int l = 1; l < 32; ++l) {
    if (L[l].wg_da != L[0].wg_da || L[l].wg_db != L[0].wg_db || L[l].wg_acc != L[0].wg_acc ||
        L[l].wg_n != L[0].wg_n || L[l].wg_bf16 != L[0].wg_bf16) {
      S.cur = w * 32 + l;
      fail("%s: lanes of a warp pass different wgmma operands (descriptors 0x%016llx / 0x%016llx "
           "here, 0x%016llx / 0x%016llx in lane 0; scale-d %d / %d)", where(),
           (unsigned long long)L[l].wg_da, (unsigned long long)L[l].wg_db,
           (unsigned long long)L[0].wg_da, (unsigned long long)L[0].wg_db, L[l].wg_acc, L[0].wg_acc);
    }
  }
  const int bw = w % (S.nthreads / 32);
  WgWarp& W = S.wg[w];
  if (!W.fenced)
    fail("%s: wgmma without a wgmma_fence since the warp's last wgmma_wait (or the start of the "
         "block): every batch starts with wgmma_fence()", where());
  WgOp op;
  op.warp = w;
  op.n = L[0].wg_n;
  op.bf16 = L[0].wg_bf16;
  op.rs = rs;
  op.acc = L[0].wg_acc;
  op.da = rs ? 0 : L[0].wg_da;
  op.db = L[0].wg_db;
  // The warpgroup's warps issue the same products in the same order.
  std::vector<WgSig>& sigs = S.wg_sigs[bw / 4];
  const WgSig sig{op.n, op.bf16, op.rs, op.acc, op.da, op.db};
  if (W.issued < static_cast<long>(sigs.size())) {
    const WgSig& o = sigs[W.issued];
    if (o.n != sig.n || o.bf16 != sig.bf16 || o.rs != sig.rs || o.acc != sig.acc || o.da != sig.da ||
        o.db != sig.db)
      fail("%s: wgmma %ld of warpgroup %d differs between its warps (here m64n%dk16 %s, A "
           "0x%016llx, B 0x%016llx, scale-d %d; an earlier warp: m64n%dk16 %s, A 0x%016llx, B "
           "0x%016llx, scale-d %d)", where(), W.issued, bw / 4, sig.n, sig.rs ? "rs" : "ss",
           (unsigned long long)sig.da, (unsigned long long)sig.db, sig.acc, o.n,
           o.rs ? "rs" : "ss", (unsigned long long)o.da, (unsigned long long)o.db, o.acc);
  } else {
    sigs.push_back(sig);
  }
  W.issued++;
  S.wgmmas++;
  const int half = op.n / 2;
  for (int l = 0; l < 32; ++l) {
    op.d[l] = L[l].wg_d;
    op.a_ptr[l] = L[l].wg_a;
    if (rs) memcpy(op.a[l], L[l].wg_a, sizeof op.a[l]);
  }
  // Operands: bounds, a copy in flight (LATE), unfenced generic writes; the chunks it reads.
  S.cur = w * 32;
  wg_visit(op, [&](uint32_t off, bool is_a, int, int) {
    check_smem(off, 2, 2, is_a ? "wgmma A operand element" : "wgmma B operand element", false);
    op.chunks.push_back(off / 16);
  });
  std::sort(op.chunks.begin(), op.chunks.end());
  op.chunks.erase(std::unique(op.chunks.begin(), op.chunks.end()), op.chunks.end());
  for (uint32_t c : op.chunks) {
    if (const int32_t who = S.gen_writer[c]) {
      const int t = (who - 1) % S.nthreads;
      fail("%s: wgmma reads shared chunk %u (bytes %u..%u) last written through the generic proxy "
           "(a store or a landed cp.async) by thread %d (warp %d lane %d), which has not executed "
           "fence_proxy_async() since (the async proxy may not see the write)",
           where(), c, 16 * c, 16 * c + 15, t, t / 32, t % 32);
    }
  }
  // Accumulators: the input (now, or from the pending product on the same registers).
  op.cin.assign(32 * half, 0.f);
  op.expect.assign(32 * half, 0u);
  for (int l = 0; l < 32; ++l) {
    const WgOp* prev = nullptr;
    for (const WgOp& q : W.ops)
      if (wg_same_d(op, q, l)) prev = &q;
    if (prev) wg_check_untouched(*prev, l, "another wgmma on the same accumulators was issued");
    op.cin_ready[l] = true;
    if (op.acc) {
      if (prev && S.late_copies) op.cin_ready[l] = false;
      else memcpy(&op.cin[l * half], op.d[l], half * sizeof(float));
    }
  }
  if (S.late_copies) {
    for (int l = 0; l < 32; ++l)
      for (int x = 0; x < half; ++x) {
        op.d[l][x] = bitsf(kWgPoison);
        op.expect[l * half + x] = kWgPoison;
      }
  } else {
    std::vector<float> res(32 * half);
    wg_compute(op, op.acc ? op.cin.data() : nullptr, res.data());
    for (int l = 0; l < 32; ++l) {
      memcpy(op.d[l], &res[l * half], half * sizeof(float));
      for (int x = 0; x < half; ++x) op.expect[l * half + x] = fbits(res[l * half + x]);
    }
  }
  for (uint32_t c : op.chunks) {
    S.wg_busy[c]++;
    S.wg_busy_warp[c] = static_cast<int16_t>(bw);
  }
  W.ops.push_back(std::move(op));
  S.cur = -1;
}

// wgmma.fence / commit_group / wait_group N and the products for warp w.
inline void wg_exec(int w, Op op) {
  if (S.wg.empty()) {
    S.cur = w * 32;
    fail("%s: wgmma in a launch without wgmma state (cluster launch?)", where());
  }
  WgWarp& W = S.wg[w];
  switch (op) {
    case Op::WgmmaSS:
    case Op::WgmmaRS:
      wg_issue(w, op == Op::WgmmaRS);
      break;
    case Op::WgFence:
      W.fenced = true;
      break;
    case Op::WgCommit: {
      const long id = W.next_group++;
      for (WgOp& o : W.ops)
        if (o.group < 0) o.group = id;
      W.groups.push_back(id);
      break;
    }
    case Op::WgWait: {
      Lane* L = &S.lanes[w * 32];
      const int n = L[0].arg;
      for (int l = 1; l < 32; ++l)
        if (L[l].arg != n) {
          S.cur = w * 32 + l;
          fail("%s: lanes of a warp at wgmma_wait<%d> and wgmma_wait<%d>", where(), L[l].arg, n);
        }
      if (n == 0) {
        long open = 0;
        for (const WgOp& o : W.ops) open += o.group < 0;
        if (open) {
          S.cur = w * 32;
          fail("%s: wgmma_wait<0> with %ld wgmma not committed (uncommitted products are not "
               "waited for: missing wgmma_commit)", where(), open);
        }
      }
      while (static_cast<long>(W.groups.size()) > n) {
        const long id = W.groups.front();
        while (!W.ops.empty() && W.ops.front().group == id) wg_retire(W);
        W.groups.erase(W.groups.begin());
      }
      W.fenced = false;
      break;
    }
    default:
      break;
  }
  S.cur = -1;
}

// A block (or cluster group of blocks) starts: no products, no fences, nothing written.
inline void wg_reset(int total_lanes) {
  S.wg.assign(static_cast<size_t>(total_lanes / 32), WgWarp{});
  S.wg_sigs.assign(static_cast<size_t>((S.nthreads / 32 + 3) / 4), std::vector<WgSig>{});
  std::fill(S.wg_busy.begin(), S.wg_busy.end(), 0);
  std::fill(S.gen_writer.begin(), S.gen_writer.end(), 0);
  for (int i = 0; i < total_lanes; ++i) S.lanes[i].gen_written.clear();
}

// The running thread exits: its warp has no wgmma pending.
inline void wg_check_exit() {
  if (S.wg.empty()) return;
  const WgWarp& W = S.wg[S.cur / 32];
  long open = 0;
  for (const WgOp& o : W.ops) open += o.group < 0;
  if (open)
    fail("%s: the thread exits with %ld wgmma not committed (and not waited for)", where(), open);
  if (!W.ops.empty() || !W.groups.empty())
    fail("%s: the thread exits with %zu wgmma groups not waited for (%zu products pending: missing "
         "wgmma_wait<0>)", where(), W.groups.size(), W.ops.size());
}

// The block's warps are done: each warpgroup's warps issued the same number of products.
inline void wg_check_block_end() {
  if (S.wg.empty() || S.clustered) return;
  const int nw = S.nthreads / 32;
  for (int w = 0; w < nw; ++w) {
    const long want = S.wg[(w / 4) * 4].issued;
    if (S.wg[w].issued != want)
      fail("%s: warp %d issued %ld wgmma, warp %d of its warpgroup %ld (all four warps of a "
           "warpgroup issue every wgmma)", where(), w, S.wg[w].issued, (w / 4) * 4, want);
  }
}

}  // namespace sim
