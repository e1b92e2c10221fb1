// Self-check of the emulated warpgroup MMA (dk_wgmma.cuh, sim_wgmma.h), run by
// tests/attention_kernel_sim.rs (wgmma_emulation_self_check). A hand-written kernel of 2
// warpgroups (256 threads) writes its operands into 128-byte-swizzled shared memory by plain
// index arithmetic (the canonical layouts of cuda/include/dk_wgmma.cuh's header, written
// independently of the emulator's descriptor decoder: 16-byte chunk c of row r of an 8-row atom
// at chunk c ^ r) through the three generic-proxy paths (16-byte stores, st.shared.b32, cp.async
// from global memory), fences them, and computes per warpgroup
//   D1[64 x 128] = A[64 x 64] · B[64 x 128]   4 ss products (K-major A and B; start + 32 bytes
//                                             per k-step), one commit group
//   D2[64 x 64]  = P[64 x 32] · V[32 x 64]    2 rs products (P from registers, V MN-major)
//   D3[64 x 128] = P[64 x 32] · V[32 x 128]   2 rs products (LBO between the 64-column
//                                             blocks), each its own group: the second
//                                             accumulates onto the first while it is pending
// then waits for them one group count at a time (wait<3>: D1, wait<1>: D2, wait<0>: D3) and
// writes the fragments out, which are compared bitwise with a CPU product (the values are
// multiples of 1/4 in [-2, 2]: every sum is exact). bf16 and f16.
//
// The regions are aligned to 1024 bytes by the kernel; "ok_base" runs "ok" with the dynamic shared
// memory at shared address 400 (16-byte aligned only: the swizzle acts on addresses), and
// "unaligned" forgets the alignment there.
//
// Usage: wgmma_selfcheck MODE LATE REVERSE. MODE "ok" must pass in both timing models;
// "unswizzled" (A written without the swizzle) must report a mismatch; "read_early" reads D1
// before its wait (a mismatch, NaN, in the LATE model only); "cp_inflight" lets the wgmma read
// cp.async destinations before the copies' wait (an error in the LATE model only); every other
// mode breaks one rule and must end in an emulator error (exit status 3; the test checks the
// message). Exit status: 0 pass, 1 mismatch, 2 usage, 3 / 4 emulator error / fault.
#include "sim_impl.h"

#include <string>

#include "dk_wgmma.cuh"

namespace {

enum Mode {
  kOk, kUnswizzled, kReadEarly, kCpInflight, kAChanged, kAccWritten, kStBusy, kCpBusy, kV4Busy,
  kExitPending, kExitOpen, kWaitOpen, kNoFence, kNoFenceBatch, kNoProxyFence, kNoProxyFenceCp,
  kBadSwizzle, kBadBase, kReserved, kOob, kDivergedDesc, kLaneDiverged, kWarpSkips, kOkBase,
  kUnaligned, kModes
};
const char* const kModeNames[kModes] = {
    "ok", "unswizzled", "read_early", "cp_inflight", "a_changed", "acc_written", "st_busy",
    "cp_busy", "v4_busy", "exit_pending", "exit_open", "wait_open", "no_fence", "no_fence_batch",
    "no_proxy_fence", "no_proxy_fence_cp", "bad_swizzle", "bad_base", "reserved", "oob",
    "diverged_desc", "lane_diverged", "warp_skips", "ok_base", "unaligned"};

Mode g_mode = kOk;
bool g_bf16 = true;

constexpr uint32_t kRegion = 32768;            // shared bytes per warpgroup
constexpr uint32_t kAOff = 0, kBOff = 8192, kVOff = 24576;
// 1 KiB of slack to align the regions to 1024 bytes, a spare 4 KiB at the end.
constexpr uint32_t kSmem = 1024 + 2 * kRegion + 4096;
constexpr uint32_t kVBlock = 4096;             // LBO: 32 k rows x 128 bytes per 64-column block

// Operand values: multiples of 1/4 in [-2, 2], by (matrix, warpgroup, row, column).
float value(int m, int wg, int r, int c) {
  uint32_t h = static_cast<uint32_t>(m * 7919 + wg * 104729 + r * 131 + c * 977 + 12345);
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  return (static_cast<int>(h % 17) - 8) * 0.25f;
}
float A(int wg, int m, int k) { return value(1, wg, m, k); }   // 64 x 64
float B(int wg, int k, int n) { return value(2, wg, k, n); }   // 64 x 128 (stored as rows n)
float P(int wg, int m, int k) { return value(3, wg, m, k); }   // 64 x 32
float V(int wg, int k, int n) { return value(4, wg, k, n); }   // 32 x 128

uint16_t bits16(float x) { return g_bf16 ? sim::f2bf(x) : sim::f2h(x); }
uint32_t pack(float lo, float hi) {
  return static_cast<uint32_t>(bits16(lo)) | (static_cast<uint32_t>(bits16(hi)) << 16);
}

// V of both warpgroups in global memory, row-major [k][n] (the cp.async source).
uint16_t* g_v[2];
// The kernel's results per warpgroup: D1, D2, D3 as [64][128] (D2: 64 columns used).
float g_out[2][3][64][128];

// Canonical offset of element (row, k) of a K-major operand with 128-byte rows (64 elements),
// 8-row atoms of 1024 bytes packed: chunk k / 8 of atom row r at chunk (k / 8) ^ r.
uint32_t kmajor_at(int row, int k, bool swizzle = true) {
  const int r = row % 8, c = k / 8;
  return (row / 8) * 1024 + r * 128 + ((swizzle ? c ^ r : c) * 16) + (k % 8) * 2;
}
// Canonical offset of element (k, n) of the MN-major V: 64-column blocks kVBlock apart, in each
// atoms of 8 k rows x 64 n.
uint32_t mnmajor_at(int k, int n) {
  const int r = k % 8, c = (n % 64) / 8;
  return (n / 64) * kVBlock + (k / 8) * 1024 + r * 128 + ((c ^ r) * 16) + (n % 8) * 2;
}

void store_frag(float* d, int n, int wg, int which, int wsub, int lane) {
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < n / 8; ++j)
    for (int i = 0; i < 2; ++i)
      for (int e = 0; e < 2; ++e)
        g_out[wg][which][16 * wsub + g + 8 * i][8 * j + 2 * t + e] = d[4 * j + 2 * i + e];
}

template <typename T>
void kernel() {
  using namespace dk;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int wg = warp / 4, wsub = warp % 4, g = lane / 4, t = lane % 4;
  // The regions start at the first 1024-byte aligned shared address (the swizzle atoms'
  // alignment); "unaligned" forgets to align them. at(address): the generic pointer.
  const uint32_t base = smem_addr(sim::S.smem);
  const uint32_t s0 = g_mode == kUnaligned ? base : (base + 1023u) & ~1023u;
  auto at = [&](uint32_t addr) { return reinterpret_cast<uint4*>(sim::S.smem + (addr - base)); };

  // Operands of both warpgroups: A by 16-byte stores, B by st.shared.b32, V by cp.async.
  for (int w = 0; w < 2; ++w) {
    const uint32_t R = s0 + w * kRegion;
    for (int c = tid; c < 64 * 8; c += 256) {
      const int row = c / 8, k = 8 * (c % 8);
      uint32_t x[4];
      for (int i = 0; i < 4; ++i) x[i] = pack(A(w, row, k + 2 * i), A(w, row, k + 2 * i + 1));
      const bool swz = g_mode != kUnswizzled;
      *at(R + kAOff + kmajor_at(row, k, swz)) = make_uint4(x[0], x[1], x[2], x[3]);
    }
    for (int i = tid; i < 128 * 32; i += 256) {
      const int n = i / 32, k = 2 * (i % 32);
      st_shared_b32(R + kBOff + kmajor_at(n, k), pack(B(w, k, n), B(w, k + 1, n)));
    }
    if (g_mode == kNoProxyFenceCp) fence_proxy_async();
    for (int c = tid; c < 32 * 16; c += 256) {
      const int k = c / 16, n = 8 * (c % 16);
      cp_async_16(R + kVOff + mnmajor_at(k, n), g_v[w] + k * 128 + n, 16);
    }
  }
  cp_async_commit();
  if (g_mode != kCpInflight) cp_async_wait<0>();
  if (g_mode == kCpInflight) fence_proxy_async();  // copies landed (EAGER) are fenced
  if (g_mode != kNoProxyFenceCp && g_mode != kCpInflight && !(g_mode == kNoProxyFence && tid == 37))
    fence_proxy_async();
  __syncthreads();

  const uint32_t R = s0 + wg * kRegion;
  float d1[64], d2[32], d3[64];
  uint32_t pa[2][4];
  for (int kk = 0; kk < 2; ++kk) {
    const int r0 = 16 * wsub + g, c0 = 16 * kk + 2 * t;
    pa[kk][0] = pack(P(wg, r0, c0), P(wg, r0, c0 + 1));
    pa[kk][1] = pack(P(wg, r0 + 8, c0), P(wg, r0 + 8, c0 + 1));
    pa[kk][2] = pack(P(wg, r0, c0 + 8), P(wg, r0, c0 + 9));
    pa[kk][3] = pack(P(wg, r0 + 8, c0 + 8), P(wg, r0 + 8, c0 + 9));
  }
  if (g_mode != kNoFence) wgmma_fence();
  for (int kk = 0; kk < 4; ++kk) {
    uint64_t da = wgmma_desc(R + kAOff + 32 * kk, 0, 1024);
    uint64_t db = wgmma_desc(R + kBOff + 32 * kk, 0, 1024);
    if (kk == 0) {
      if (g_mode == kBadSwizzle) da = (da & ~(3ull << 62)) | (2ull << 62);
      if (g_mode == kBadBase) da |= 1ull << 49;
      if (g_mode == kReserved) da |= 1ull << 14;
      if (g_mode == kOob) db = wgmma_desc(base + kSmem - 512, 0, 1024);
      if (g_mode == kDivergedDesc && wsub == 1) db += 2;
      if (g_mode == kLaneDiverged && lane == 5) da += 1;
    }
    wgmma_ss<T, 128>(d1, da, db, kk > 0);
  }
  wgmma_commit();
  if (g_mode == kAccWritten) d1[5] = 0.f;
  if (g_mode == kReadEarly) store_frag(d1, 128, wg, 0, wsub, lane);
  if (g_mode == kStBusy && lane == 0) st_shared_b32(R + kBOff + 64, 0u);
  if (g_mode == kCpBusy && lane == 0) cp_async_16(R + kBOff + 64, g_v[wg], 16);
  if (g_mode == kV4Busy && lane == 0)
    *at(R + kBOff + 64) = make_uint4(0, 0, 0, 0);
  for (int kk = 0; kk < 2; ++kk)
    wgmma_rs<T, 64>(d2, pa[kk], wgmma_desc(R + kVOff + kk * 2048, kVBlock, 1024), kk > 0);
  wgmma_commit();
  if (g_mode == kAChanged) pa[0][1] ^= 1u;
  wgmma_rs<T, 128>(d3, pa[0], wgmma_desc(R + kVOff, kVBlock, 1024), false);
  wgmma_commit();
  if (!(g_mode == kWarpSkips && warp == 3))
    wgmma_rs<T, 128>(d3, pa[1], wgmma_desc(R + kVOff + 2048, kVBlock, 1024), true);
  if (g_mode != kWaitOpen) wgmma_commit();
  wgmma_wait<3>();
  if (g_mode != kReadEarly) store_frag(d1, 128, wg, 0, wsub, lane);
  if (g_mode == kNoFenceBatch) wgmma_ss<T, 128>(d1, wgmma_desc(R + kAOff, 0, 1024), wgmma_desc(R + kBOff, 0, 1024), false);
  wgmma_wait<1>();
  store_frag(d2, 64, wg, 1, wsub, lane);
  if (g_mode == kExitPending) return;
  wgmma_wait<0>();
  store_frag(d3, 128, wg, 2, wsub, lane);
  if (g_mode == kCpInflight) cp_async_wait<0>();
  if (g_mode == kExitOpen) {
    wgmma_fence();
    wgmma_ss<T, 128>(d1, wgmma_desc(R + kAOff, 0, 1024), wgmma_desc(R + kBOff, 0, 1024), false);
  }
}

void entry_bf16() { kernel<__nv_bfloat16>(); }
void entry_f16() { kernel<__half>(); }

// Bitwise comparison with the CPU product (exact: small multiples of 1/4); the first
// difference, or "" when there is none.
std::string compare() {
  char msg[256];
  for (int wg = 0; wg < 2; ++wg)
    for (int which = 0; which < 3; ++which) {
      const int cols = which == 1 ? 64 : 128;
      for (int m = 0; m < 64; ++m)
        for (int n = 0; n < cols; ++n) {
          double want = 0;
          if (which == 0)
            for (int k = 0; k < 64; ++k) want += double(A(wg, m, k)) * B(wg, k, n);
          else
            for (int k = 0; k < 32; ++k) want += double(P(wg, m, k)) * V(wg, k, n);
          const float got = g_out[wg][which][m][n];
          if (!(got == static_cast<float>(want))) {
            snprintf(msg, sizeof msg, "warpgroup %d D%d[%d][%d] = %g, %g expected", wg, which + 1, m,
                     n, got, want);
            return msg;
          }
        }
    }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  sim::install_fault_handler();
  if (argc != 4) {
    fprintf(stderr, "usage: wgmma_selfcheck MODE LATE REVERSE\n");
    return 2;
  }
  int mode = -1;
  for (int i = 0; i < kModes; ++i)
    if (std::string(argv[1]) == kModeNames[i]) mode = i;
  if (mode < 0) {
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
  }
  g_mode = static_cast<Mode>(mode);
  if (g_mode == kOkBase || g_mode == kUnaligned) sim::S.smem_base = 400;
  sim::S.late_copies = atoi(argv[2]) != 0;
  sim::S.reverse = atoi(argv[3]) != 0;
  for (int bf = 1; bf >= 0; --bf) {
    g_bf16 = bf != 0;
    for (int w = 0; w < 2; ++w) {
      char name[32];
      snprintf(name, sizeof name, "v%d", w);
      if (!g_v[w]) {
        g_v[w] = reinterpret_cast<uint16_t*>(sim::alloc_global(32 * 128 * 2, strdup(name)));
        sim::add_extent(strdup(name), g_v[w], 32, 256, 256, false);
      }
      for (int k = 0; k < 32; ++k)
        for (int n = 0; n < 128; ++n) g_v[w][k * 128 + n] = bits16(V(w, k, n));
    }
    for (auto& a : g_out)
      for (auto& b : a)
        for (auto& c : b)
          for (float& x : c) x = -12345.f;
    const char* kname = g_bf16 ? "wgmma_selfcheck<bf16>" : "wgmma_selfcheck<f16>";
    sim::launch(kname, g_bf16 ? entry_bf16 : entry_f16, dim3{1, 1, 1}, dim3{256, 1, 1}, kSmem);
    const std::string diff = compare();
    if (!diff.empty()) {
      fprintf(stderr, "MISMATCH %s (%s, %s): %s\n", kname, argv[1],
              sim::S.late_copies ? "late" : "eager", diff.c_str());
      return 1;
    }
  }
  fprintf(stderr, "ok %s (%s, %s order): %ld warp wgmma\n", argv[1],
          sim::S.late_copies ? "late" : "eager", sim::S.reverse ? "descending" : "ascending",
          sim::S.wgmmas);
  return 0;
}
