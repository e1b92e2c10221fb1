// Host emulator of the CUDA features the attention kernels use (cuda/attention_forward.cu,
// cuda/attention_backward.cu and their wgmma versions, cuda/attention_{forward,backward}_wgmma.cu),
// so that the REAL kernel source runs on a machine without a GPU.
// Used by tests/attention_sim/attention_sim.cpp (driver) through tests/attention_kernel_sim.rs.
//
// Execution model
//   Every CUDA thread of a block is a fiber with its own stack (a hand-written context switch on
//   x86-64 Linux, ucontext elsewhere). A fiber runs until it reaches a scheduling point: a warp
//   collective (ldmatrix, mma.sync, __shfl_*_sync, __syncwarp), __syncthreads, a named barrier
//   (bar.sync id, count), or its exit. A named barrier opens as soon as `count` threads of the
//   block wait at `id` (or arrived there with bar.arrive, a warp collective that does not wait), and the warp sweep starts again at once, so its warps run ahead of the
//   warps that have not reached their own barriers: a named barrier used where the block's was
//   needed shows as a difference between the two orders. Every opening of an id in a block must
//   release the same warps (warp groups sharing an id race on the hardware).
//   The scheduler runs one warp at a time: it resumes each runnable lane of the warp (ascending
//   or descending lane order), and when all 32 lanes wait at a collective it checks that they
//   wait at the SAME one (a converged warp, as the .sync.aligned instructions require), executes
//   it once for the whole warp from the lanes' operands, and resumes them. When every warp waits
//   at __syncthreads (or has exited), the barrier opens. Warps run in ascending or descending
//   order, so between two barriers one warp runs its whole phase before the next starts: a
//   shared-memory race between warps (or between lanes between two collectives) gives different
//   results in the two orders. Blocks run one after the other, in ascending or descending order
//   of their linear index (with the descending lane and warp order).
//
// Warp collectives, from the PTX ISA fragment tables (g = lane / 4, t = lane % 4):
//   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l supplies the address of row l % 8
//     of matrix l / 8 (16 contiguous bytes, 16-byte aligned). Destination register i of lane l
//     holds matrix i: non-trans: row g, elements 2t (low half) and 2t + 1 (high half);
//     .trans: element (row 2t, column g) low and (row 2t + 1, column g) high.
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, D = A B + C:
//     A (16x16): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//                a3 = A[g+8][2t+8, 2t+9] (low half = lower column);
//     B (16x8):  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g] (low half = lower k);
//     C, D (16x8 f32): c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
//     Products are exact (16-bit inputs), the 16 products and C are summed in double and rounded
//     once to f32 (the hardware's internal order and precision are unspecified; the test's
//     tolerances cover the difference).
//   shfl.sync.bfly / idx: full mask required; the value of lane l ^ m (or lane src).
//   ex2.approx.ftz.f32: exp2f with subnormal inputs and results flushed to zero.
//
// cp.async (cp.async.cg.shared.global, 16 bytes, src-size s: bytes s..15 zero-filled, nothing
// read when s = 0), cp.async.commit_group, cp.async.wait_group N. Two timing models, chosen
// per run: EAGER (the copy lands when issued) and LATE (it lands only when a wait_group forces
// its group: the oldest groups beyond the N most recent). In the LATE model a shadow map
// counts the copies in flight into each 16-byte shared chunk; any emulated shared-memory read
// or write of a chunk with a copy in flight (by any thread) is reported, so a missing wait (or
// a wait without the __syncthreads that publishes other threads' copies) is caught even when
// the stale data would not change the result. A thread exiting with copies in flight is an
// error.
//
// Warpgroup MMA (Hopper wgmma, tests/attention_sim/dk_wgmma.cuh replacing cuda/include/
// dk_wgmma.cuh; scheduler side in sim_wgmma.h). A warpgroup is 4 consecutive warps (block size a
// multiple of 128). wgmma.mma_async m64nNk16 (N = 64, 128; bf16 / f16 in, f32 accumulators),
// wgmma.fence, commit_group and wait_group N are warp collectives (converged lanes, the same
// operands in every lane); a product executes per warp: warp w' = warp % 4 computes rows
// 16 w' .. 16 w' + 15 of D, in lane l (g = l / 4, t = l % 4) d[4 j + 2 i + e] =
// D[16 w' + g + 8 i][8 j + 2 t + e]; the warps of a warpgroup must issue the same products (N,
// type, descriptors, scale-d) in the same order. A from registers (rs): a[0] = A[16 w' + g]
// [2 t, 2 t + 1], a[1] = rows + 8, a[2] = columns + 8, a[3] = both (low half = lower column).
// Shared operands by descriptor (start = (desc & 0x3FFF) << 4, LBO = bits 16-29 << 4, SBO =
// bits 32-45 << 4; base offset (bits 49-51) must be 0, the swizzle (bits 62-63) 1 = 128-byte,
// other bits 0): K-major (ss A with row = m, B with row = n) element (row, k) at start +
// 128 (row % 8) + SBO (row / 8) + 2 k; MN-major (rs B, transposed) element (k, n) at start +
// 2 (n % 64) + LBO (n / 64) + 128 (k % 8) + SBO (k / 8); physical = linear ^ (((linear >> 7) & 7)
// << 4). Every element read is bounds-checked. Products exact, summed in double with the
// accumulator (scale-d = 1) and rounded once to f32 per product.
//   Timing follows late_copies. EAGER: a product reads shared memory and writes its
//   accumulators at issue. LATE: it is computed at the wgmma_wait that retires it (commit_group
//   closes the open products into a group; wait_group N retires all but the N most recent
//   groups, oldest first); at issue its accumulators are overwritten with a NaN, so reading them
//   early shows; a product accumulating onto a pending one on the same registers takes its
//   result. In both models: the A fragments (rs) must be unchanged and the accumulators hold
//   what the product left there (result or NaN) when it retires or when the next product on
//   them is issued (no register writes in between); the 16-byte chunks a pending product reads
//   are busy: any checked write into them (cp.async issue or landing, st.shared, 16-byte stores)
//   is an error; a wgmma needs a wgmma_fence by its warp since the warp's last wait_group (or the
//   block's start); wait_group 0 with uncommitted products and a thread exiting with products
//   pending (committed or not) are errors.
//   Proxies: a shadow per 16-byte chunk keeps the thread of the last generic-proxy write
//   (st.shared, 16-byte stores, cp.async landing: the issuing thread) that the thread has not
//   followed with fence.proxy.async (fence_proxy_async clears its own chunks); a wgmma reading
//   such a chunk is an error (a missing barrier after the fence shows as a difference between
//   the two orders). Plain pointer stores (float, uint32_t) are not tracked.
//
// Memory checks
//   Shared memory: the block's dynamic shared memory (the launch's byte count, rounded up to 16)
//   ends exactly where an inaccessible 64 KiB guard region starts, with another before it, and
//   is filled with 0xff (NaN in bf16, f16 and f32) before every block. Its shared address (what
//   smem_addr gives for its first byte) is State::smem_base, 0 unless a driver moves it (the
//   attention driver does for the wgmma kernels, to check their own alignment of the tiles). Every emulated access
//   (ldmatrix rows, cp.async destinations, st.shared.b32, ld.shared.v4, 16-byte uint4 loads and
//   stores) is checked against [0, bytes) and for alignment; plain pointer accesses (float,
//   float2, uint32_t) are covered by the guard regions only.
//   Global memory: every buffer sits between guard regions in the same way. Every operand the
//   driver registers (matrix rows [rows x cols] with a token stride, LSE and Delta vectors,
//   cu_seqlens) is an extent; cp.async sources, 16-byte uint4 loads and stores and __ldg reads
//   must lie inside one row of a registered extent (stores: of a writable one; loads: of a
//   readable one, which every extent is but the store-only ones of add_store_extent, which may
//   overlap others), and a 16-byte output chunk stored twice in one launch is an error (every
//   output element is written once).
//   Other plain accesses (the LSE and Delta stores and loads) are covered by the guards, by the
//   NaN padding of the inputs and by the poisoned outputs and workspace the test checks.
//   A fault in a guard region is reported with the buffer it belongs to, the kernel, the block
//   and the thread.
//
// Thread-block clusters (launch with cluster = C > 1; the persistent divergence kernel through
// tests/divergence_sim/dk_cluster.cuh): the C blocks of a cluster (blockIdx.x = cluster · C +
// rank, a 1-D grid) run together as one group of C × blockDim fibers. Blocks take turns in
// ascending or descending order, and each runs as far as it can in its turn (its warps one after
// the other, through its own __syncthreads, which opens once all its threads wait there) until
// it waits at the cluster barrier or exits: a block runs as far ahead of the others as the
// cluster barrier allows, so reuse of shared memory the others may still read shows as a
// difference between the two orders. Clusters run one after the other. Each block has its own guarded dynamic shared memory, and
// blockIdx and the shared memory follow the fiber that runs.
//   barrier.cluster.arrive / wait (.aligned): warp collectives (all 32 lanes at the same one).
//     Split: a thread runs on between its arrive and its wait. Each thread must alternate
//     arrive, wait, arrive, ...: arriving twice without a wait, waiting without an arrival, and
//     exiting with an arrival not waited for are errors. A wait returns once every thread of
//     the cluster has arrived for that phase; waits that no thread can ever complete (exited
//     threads, threads parked at another barrier for good) are reported as a deadlock.
//   Distributed shared memory (mapa): reads only. A pointer mapped into block r's shared
//     memory (bounds- and alignment-checked, r < C, r's threads not all exited) points into r's
//     PUBLISHED copy: the state of its shared memory at the latest fence.acq_rel.cluster
//     executed by one of r's threads (0xff before any). So a remote read sees only what was
//     fenced (the relaxed arrive publishes nothing), and a missing fence shows as stale data.
//     Writes through a mapped pointer are not modelled (they would land in the copy).
//   cp.async: as above, each block with its own map of copies in flight (the staged
//     divergence kernel copies its next row while it computes the current one).
//
// Additions for the MoE kernels (tests/moe_sim_kernels): 32-bit integer shuffles (bfly, idx, up;
// the bits travel unchanged), redux.sync.{min,max}.u32, vote.sync.ballot, __popc, __ffs, atomicOr / atomicCAS /
// atomicExch (plain read-modify-writes: fibers switch only at scheduling points), static
// __shared__ arrays through sim::static_shared (each its own guarded mapping, 0xff-filled when a
// block first declares it; every thread of the block must declare the same arrays in the same
// order), and the interleaved warp order (State::interleave): the warps of a block take turns at
// every warp collective, one collective each, instead of each running to the next
// __syncthreads, so shared memory that two warps use at once between barriers shows up. A
// 16-byte copy assignment checks its source as a load too (not only its destination).
//
// Not modelled: timing, warps actually running concurrently inside a phase (a warp's lanes and
// the warps run one after the other between scheduling points; the two orders stand in for
// all interleavings, and there is no happens-before race detector: a race shows only as a
// difference between the two runs), bank conflicts, register limits and spills, the memory
// consistency model beyond barriers, partial-warp masks, and the exact rounding of the tensor
// cores and of ex2.approx.
#pragma once

#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#if !(defined(__x86_64__) && defined(__linux__)) || defined(SIM_UCONTEXT)
#define SIM_USE_UCONTEXT 1
#include <ucontext.h>
#endif

// ---- CUDA keywords ----------------------------------------------------------------------------
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

using std::max;
using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace sim {

// ---- Errors -----------------------------------------------------------------------------------

void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

// ---- Fibers -----------------------------------------------------------------------------------

enum class St : uint8_t { Run, Warp, Bar, NBar, CWait, Done };
enum class Op : uint8_t {
  None, Ldsm, LdsmT, MmaBf16, MmaF16, ShflXor, ShflIdx, SyncWarp, ClusterArrive, ClusterWait,
  ShflBits, ReduxMax, ReduxMin, WgmmaSS, WgmmaRS, WgFence, WgCommit, WgWait, NBarArrive, Ballot
};

inline const char* op_name(Op o) {
  switch (o) {
    case Op::Ldsm: return "ldmatrix.x4";
    case Op::LdsmT: return "ldmatrix.x4.trans";
    case Op::MmaBf16: return "mma.m16n8k16.bf16";
    case Op::MmaF16: return "mma.m16n8k16.f16";
    case Op::ShflXor: return "shfl.sync.bfly";
    case Op::ShflIdx: return "shfl.sync.idx";
    case Op::SyncWarp: return "__syncwarp";
    case Op::ClusterArrive: return "barrier.cluster.arrive";
    case Op::ClusterWait: return "barrier.cluster.wait";
    case Op::ShflBits: return "shfl.sync (32-bit integer)";
    case Op::ReduxMax: return "redux.sync.max.u32";
    case Op::ReduxMin: return "redux.sync.min.u32";
    case Op::WgmmaSS: return "wgmma.mma_async (A from shared memory)";
    case Op::WgmmaRS: return "wgmma.mma_async (A from registers)";
    case Op::WgFence: return "wgmma.fence";
    case Op::WgCommit: return "wgmma.commit_group";
    case Op::WgWait: return "wgmma.wait_group";
    case Op::NBarArrive: return "bar.arrive";
    case Op::Ballot: return "vote.sync.ballot";
    default: return "none";
  }
}

struct Copy {
  uint32_t dst;      // shared offset
  const char* src;   // global source
  int bytes;         // 0..16, rest zero-filled
};

struct Lane {
  void* sp = nullptr;  // saved stack pointer (fast switch)
#ifdef SIM_USE_UCONTEXT
  ucontext_t uc;
#endif
  char* stack = nullptr;  // mmap'd, lowest page a guard
  St st = St::Run;
  Op op = Op::None;
  dim3 tid;
  int blk = 0;             // block of the running group (cluster rank; 0 without clusters)
  uint32_t arrives = 0;    // cluster barrier arrivals and waits of this thread
  uint32_t waits = 0;
  int nbar_id = 0;     // named barrier (bar.sync id, count) this thread waits at
  int nbar_count = 0;
  int arg = 0;         // shfl: lane mask / source lane / delta
  int mode = 0;        // ShflBits: 0 bfly, 1 idx, 2 up
  int sh_next = 0;     // static __shared__ arrays this thread has declared in its block
  uint32_t in[6];      // ldsm: in[0] = shared offset; mma: a0..a3, b0, b1
  float f[4];          // mma: C; shfl: f[0] value
  uint32_t out[4];     // ldsm result
  float fo[4];         // mma D / shfl result
  std::vector<Copy> open;                  // issued, not committed
  std::vector<std::vector<Copy>> groups;   // committed, oldest first
  // wgmma operands of the posted product (sim_wgmma.h): the accumulator array (n / 2 floats),
  // the A fragment array (rs), the descriptors, N, the element type, scale-d.
  float* wg_d = nullptr;
  const uint32_t* wg_a = nullptr;
  uint64_t wg_da = 0, wg_db = 0;
  int wg_n = 0;
  bool wg_bf16 = false, wg_acc = false;
  // Shared chunks whose last generic-proxy write (not yet made visible to the async proxy by
  // fence.proxy.async) may be this thread's (State::gen_writer holds the truth).
  std::vector<uint32_t> gen_written;
};

// One warp's share of a wgmma.mma_async m64nNk16 (its 16 rows of D), from issue to the
// wgmma.wait_group that retires it (sim_wgmma.h).
struct WgOp {
  int warp = 0;           // warp of the group (lanes 32 warp ..)
  int n = 0;              // N (64 or 128); n / 2 accumulators per lane
  bool bf16 = false, rs = false, acc = false;
  uint64_t da = 0, db = 0;
  long group = -1;        // commit group (-1: not committed yet)
  float* d[32];           // each lane's accumulator array
  const uint32_t* a_ptr[32];  // rs: each lane's A fragment array, and its values at issue
  uint32_t a[32][4];
  // The accumulator input per lane (acc): known at issue, or (cin_ready false) the result of
  // the earlier pending product on the same accumulators, filled in when that one retires.
  std::vector<float> cin;  // 32 x n/2
  bool cin_ready[32];
  // What the accumulators hold while this is the latest pending product on them: its result
  // (EAGER) or the poison NaN (LATE); any other value at the next product on them or at its
  // retirement means the kernel wrote them in between.
  std::vector<uint32_t> expect;  // 32 x n/2 bit patterns
  std::vector<uint32_t> chunks;  // 16-byte shared chunks it reads (busy until it retires)
};

// A warp's wgmma state: whether a wgmma.fence came since its last wgmma.wait_group, its
// products not yet retired (issue order: committed groups oldest first, then the open ones),
// its committed groups not yet waited for (ids, oldest first; a group may be empty).
struct WgWarp {
  bool fenced = false;
  std::vector<WgOp> ops;
  std::vector<long> groups;
  long next_group = 0;
  long issued = 0;  // products issued in this block (the warpgroup's warps must agree)
};

// What every warp of a warpgroup must pass alike to its k-th wgmma.
struct WgSig {
  int n;
  bool bf16, rs, acc;
  uint64_t da, db;
};

struct Extent {
  const char* base;
  int64_t rows;
  int64_t row_bytes;     // accessible bytes per row
  int64_t stride_bytes;  // between rows
  bool writable;
  const char* name;
  // false: a store-only extent (sim::add_store_extent): loads through it are errors.
  bool readable = true;
};

struct Alloc {
  char* map;  // start of the mapping (guard page)
  size_t map_bytes;
  char* lo;   // data
  char* hi;
  const char* name;
  std::vector<uint8_t> stores;  // 16-byte stores per 16-byte chunk in the current launch
};

struct State {
  // launch
  const char* kernel = "";
  dim3 grid, block, block_idx;
  int nthreads = 0;
  std::vector<Lane> lanes;
  int cur = -1;
  void* sched_sp = nullptr;
#ifdef SIM_USE_UCONTEXT
  ucontext_t sched_uc;
#endif
  void (*entry)() = nullptr;
  // models
  bool late_copies = false;
  bool reverse = false;
  bool single_stores = true;  // a 16-byte output chunk stored twice in one launch is an error
  // Warps take turns at every warp collective (one collective each, round robin) instead of
  // each running up to the next __syncthreads: exposes shared memory that two warps of a block
  // use at the same time between barriers (e.g. a per-warp scratch indexed wrongly).
  bool interleave = false;
  // Static __shared__ arrays (tests/moe_sim_kernels: SIM_SHARED): each a guarded mapping,
  // allocated on first use in a launch, filled with 0xff when a block first declares it.
  struct StaticShared {
    char* map;
    size_t map_bytes;
    char* p;
    size_t bytes;
    const char* name;
  };
  std::vector<StaticShared> static_shared;
  size_t static_live = 0;  // arrays declared (and poisoned) in the running block
  // shared memory
  char* smem = nullptr;  // block's dynamic shared memory (ends at a guard region)
  uint32_t smem_bytes = 0;
  // The shared address of the dynamic shared memory's first byte, as smem_addr gives it (0 unless
  // a driver sets it: a base only 16-byte aligned checks a kernel's own alignment of its tiles,
  // e.g. wgmma's 1024-byte swizzle atoms). Addresses (ldmatrix, cp.async, st/ld.shared, wgmma
  // descriptors) are this plus the offset in the dynamic shared memory.
  uint32_t smem_base = 0;
  char* smem_map = nullptr;
  size_t smem_map_bytes = 0;
  // Copies in flight per 16-byte chunk of the running block's shared memory (its
  // GroupBlock::inflight: each block of a cluster has its own).
  uint16_t* inflight = nullptr;
  // wgmma (sim_wgmma.h): per warp of the block, per warpgroup the operands of its products in
  // issue order; per 16-byte chunk the pending products reading it (busy: no write allowed)
  // and the warp of the latest; the thread (group lane + 1, 0: none) of the last generic-proxy
  // write not yet fenced by fence.proxy.async.
  std::vector<WgWarp> wg;
  std::vector<std::vector<WgSig>> wg_sigs;
  std::vector<uint16_t> wg_busy;
  std::vector<int16_t> wg_busy_warp;
  std::vector<int32_t> gen_writer;
  // clusters: the running group's blocks (one with cluster = 1)
  struct GroupBlock {
    dim3 idx;
    char* smem;  // dynamic shared memory (ends at a guard region)
    char* map;
    size_t map_bytes;
    char* published;  // the copy remote readers see (cluster > 1), guarded the same way
    std::vector<uint16_t> inflight;  // cp.async copies in flight per 16-byte chunk
    char* pub_map;
    size_t pub_map_bytes;
    bool exited;
    // Per named barrier id: the warps (bit w) its first opening released in this block. Every
    // later opening must release the same warps (two warp pairs sharing an id is a race on the
    // hardware, where arrivals interleave).
    uint32_t nbar_warps[16];
    // Per named barrier id: the threads that arrived with bar.arrive in its current phase (they
    // count towards its opening without waiting), their count operand and their warps.
    int nbar_arrived[16];
    int nbar_arrive_count[16];
    uint32_t nbar_arrive_warps[16];
  };
  bool clustered = false;  // a cluster launch (cluster >= 1 blocks)
  unsigned cluster = 1;    // blocks per group
  std::vector<GroupBlock> group;
  uint32_t phases = 0;  // cluster barrier phases completed by the running group
  // global memory
  std::vector<Extent> extents;
  std::vector<Alloc> allocs;
  // statistics
  long blocks = 0, collectives = 0, mmas = 0, barriers = 0, copies = 0, cluster_barriers = 0;
  long wgmmas = 0;  // warp shares of wgmma products
};

extern State S;

inline Lane& me() { return S.lanes[S.cur]; }

#ifndef SIM_USE_UCONTEXT
extern "C" void sim_ctx_switch(void** save_sp, void* to_sp);
#endif

// Lane -> scheduler.
inline void yield_to_sched() {
#ifdef SIM_USE_UCONTEXT
  swapcontext(&me().uc, &S.sched_uc);
#else
  sim_ctx_switch(&me().sp, S.sched_sp);
#endif
}

// ---- Memory checks ----------------------------------------------------------------------------

inline bool in_smem_map(const void* p) {
  const char* c = static_cast<const char*>(p);
  return S.smem_map && c >= S.smem_map && c < S.smem_map + S.smem_map_bytes;
}

// The block of the running group whose shared memory (or published copy) holds p, or -1.
inline int group_smem_of(const void* p, bool* published) {
  const char* c = static_cast<const char*>(p);
  for (size_t b = 0; b < S.group.size(); ++b) {
    const State::GroupBlock& g = S.group[b];
    if (g.map && c >= g.map && c < g.map + g.map_bytes) { *published = false; return static_cast<int>(b); }
    if (g.pub_map && c >= g.pub_map && c < g.pub_map + g.pub_map_bytes) { *published = true; return static_cast<int>(b); }
  }
  return -1;
}

inline const Alloc* alloc_of(const void* p) {
  const char* c = static_cast<const char*>(p);
  for (const Alloc& a : S.allocs)
    if (c >= a.map && c < a.map + a.map_bytes) return &a;
  return nullptr;
}

const char* where();  // "kernel K block (x,y,z) thread t"

// The offset in the dynamic shared memory of shared address `addr` (S.smem_base + offset); an
// address below the base is reported as such.
inline uint32_t smem_off(uint32_t addr, const char* what) {
  if (addr < S.smem_base)
    fail("%s: %s at shared address %u, below the dynamic shared memory (which starts at %u)",
         where(), what, addr, S.smem_base);
  return addr - S.smem_base;
}

// A generic-proxy write of shared bytes [off, off + n) by the running thread (a store, or a
// cp.async landing): the chunks are not visible to wgmma until the thread's fence.proxy.async.
inline void note_generic_write(uint32_t off, uint32_t n) {
  if (S.clustered || S.gen_writer.empty() || S.cur < 0) return;
  const int32_t who = S.cur + 1;
  for (uint32_t c = off / 16; c <= (off + n - 1) / 16 && c < S.gen_writer.size(); ++c) {
    if (S.gen_writer[c] != who) {
      S.gen_writer[c] = who;
      me().gen_written.push_back(c);
    }
  }
}

// Shared-memory range [off, off + n) by offset. A write (`write`) must not touch a chunk that a
// pending wgmma reads; it is a generic-proxy write of the running thread unless `generic` is
// false (a cp.async destination: its copy is noted when it lands).
inline void check_smem(uint32_t off, uint32_t n, uint32_t align, const char* what, bool write,
                       bool generic = true) {
  if (static_cast<uint64_t>(off) + n > S.smem_bytes)
    fail("%s: shared-memory %s of %u bytes at offset %u, outside the %u bytes of the launch", where(),
         what, n, off, S.smem_bytes);
  if (off % align) fail("%s: %s at shared offset %u is not %u-byte aligned", where(), what, off, align);
  if (write && !S.wg_busy.empty()) {
    for (uint32_t c = off / 16; c <= (off + n - 1) / 16 && c < S.wg_busy.size(); ++c) {
      if (S.wg_busy[c])
        fail("%s: %s writes shared bytes %u..%u while a wgmma of warp %d that reads chunk %u (bytes "
             "%u..%u) is pending (missing wgmma_wait, or a barrier after it, before the overwrite)",
             where(), what, off, off + n - 1, S.wg_busy_warp[c], c, 16 * c, 16 * c + 15);
    }
  }
  if (write && generic) note_generic_write(off, n);
  if (S.late_copies) {
    for (uint32_t c = off / 16; c <= (off + n - 1) / 16; ++c) {
      if (S.inflight[c])
        fail("%s: %s %s shared bytes %u..%u while a cp.async into chunk %u (bytes %u..%u) is still in "
             "flight (missing cp.async.wait_group or __syncthreads)",
             where(), what, write ? "writes" : "reads", off, off + n - 1, c, 16 * c, 16 * c + 15);
    }
  }
}

// A global access of n bytes at p: inside one row of a registered extent (writable for stores,
// readable for loads). Extents may overlap (the fused persistent divergence kernel's
// store-only G rows over its read-only logits): the access needs one that holds it and allows
// it; when only others hold it, the first of those names it in the error. Without overlapping
// extents this is the first extent that holds the access, as before.
inline void check_global(const void* p, int64_t n, bool write, const char* what) {
  const char* c = static_cast<const char*>(p);
  const Extent* holder = nullptr;  // the first extent that holds the access
  int64_t holder_r = 0, holder_col = 0;
  for (const Extent& e : S.extents) {
    if (e.rows <= 0 || c < e.base) continue;
    const int64_t off = c - e.base;
    const int64_t r = off / e.stride_bytes, col = off % e.stride_bytes;
    if (r >= e.rows || col + n > e.row_bytes) continue;
    if (!holder) {
      holder = &e;
      holder_r = r;
      holder_col = col;
    }
    if (write ? !e.writable : !e.readable) continue;
    if (write && n == 16 && S.single_stores) {
      // Every output element is written once per launch (the kernels' determinism claim).
      Alloc* a = const_cast<Alloc*>(alloc_of(p));
      const size_t chunk = static_cast<size_t>(c - a->lo) / 16;
      if (a->stores.size() <= chunk) a->stores.resize(chunk + 1, 0);
      if (++a->stores[chunk] > 1)
        fail("%s: %s writes %s row %lld bytes %lld..%lld a second time in this launch", where(),
             what, e.name, (long long)r, (long long)col, (long long)(col + 15));
    }
    return;
  }
  if (holder && write)
    fail("%s: %s writes %lld bytes into the input %s (row %lld, byte %lld)", where(), what,
         (long long)n, holder->name, (long long)holder_r, (long long)holder_col);
  if (holder)
    fail("%s: %s reads %lld bytes from the store-only %s (row %lld, byte %lld)", where(), what,
         (long long)n, holder->name, (long long)holder_r, (long long)holder_col);
  // Locate the access relative to the nearest operand starting at or before it in its buffer.
  const Alloc* a = alloc_of(p);
  const Extent* near = nullptr;
  for (const Extent& e : S.extents)
    if (a && alloc_of(e.base) == a && e.base <= c && (!near || e.base > near->base)) near = &e;
  char loc[256] = "";
  if (near) {
    const int64_t off = c - near->base;
    snprintf(loc, sizeof loc, ": row %lld byte %lld of %s (%lld rows of %lld bytes, %lld apart)",
             (long long)(off / near->stride_bytes), (long long)(off % near->stride_bytes), near->name,
             (long long)near->rows, (long long)near->row_bytes, (long long)near->stride_bytes);
  } else if (a) {
    snprintf(loc, sizeof loc, ": byte %lld of buffer %s", (long long)(c - a->lo), a->name);
  }
  fail("%s: %s %s %lld bytes outside every operand's rows%s", where(), what, write ? "writes" : "reads",
       (long long)n, loc);
}

// An access through a pointer of unknown kind: shared memory, a registered buffer, or a local.
inline void check_any(const void* p, int64_t n, bool write, const char* what, uint32_t align = 16) {
  if (in_smem_map(p)) {
    const char* c = static_cast<const char*>(p);
    if (c < S.smem) fail("%s: %s %s shared memory before its start", where(), what, write ? "writes" : "reads");
    check_smem(static_cast<uint32_t>(c - S.smem), static_cast<uint32_t>(n), align, what, write);
    return;
  }
  if (alloc_of(p)) check_global(p, n, write, what);
  // else: a local on the fiber stack
}

// ---- 16-bit floats ----------------------------------------------------------------------------

inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// f32 -> bf16, round to nearest even (NaN -> canonical NaN, as __float2bfloat16_rn).
inline uint16_t f2bf(float x) {
  uint32_t u = fbits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf2f(uint16_t h) { return bitsf(static_cast<uint32_t>(h) << 16); }

// f32 -> f16, round to nearest even, overflow to inf, subnormals (as __float2half_rn).
inline uint16_t f2h(float f) {
  uint32_t x = fbits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (x >= 0x477ff000u) return sign | 0x7c00;  // >= 65520: rounds to inf
  if (x < 0x38800000u) {                        // below 2^-14: subnormal (or zero) half
    const float a = bitsf(x) * 16777216.0f;      // exact: the value in units of 2^-24
    return sign | static_cast<uint16_t>(nearbyintf(a));  // ties to even; 1024 = smallest normal
  }
  uint32_t h = ((((x >> 23) - 127 + 15) << 10) | ((x & 0x7fffffu) >> 13));
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}
inline float h2f(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (e == 31) return bitsf(sign | 0x7f800000u | (m << 13));
  return bitsf(sign | ((e - 15 + 127) << 23) | (m << 13));
}

// ---- Warp collectives (lane side) -----------------------------------------------------------

inline void post(Op op) {
  Lane& l = me();
  l.op = op;
  l.st = St::Warp;
  yield_to_sched();
}

inline void ldsm(uint32_t r[4], uint32_t addr, bool trans) {
  Lane& l = me();
  l.in[0] = smem_off(addr, trans ? "ldmatrix.trans row" : "ldmatrix row");
  post(trans ? Op::LdsmT : Op::Ldsm);
  for (int i = 0; i < 4; ++i) r[i] = me().out[i];
}

inline void mma(bool bf16, float d[4], const uint32_t a[4], const uint32_t b[2]) {
  Lane& l = me();
  for (int i = 0; i < 4; ++i) { l.in[i] = a[i]; l.f[i] = d[i]; }
  l.in[4] = b[0];
  l.in[5] = b[1];
  post(bf16 ? Op::MmaBf16 : Op::MmaF16);
  for (int i = 0; i < 4; ++i) d[i] = me().fo[i];
}

inline float shfl(unsigned mask, float v, int arg, bool is_xor) {
  if (mask != 0xffffffffu) fail("%s: shuffle with mask %#x (the emulator needs full warps)", where(), mask);
  Lane& l = me();
  l.f[0] = v;
  l.arg = arg;
  post(is_xor ? Op::ShflXor : Op::ShflIdx);
  return me().fo[0];
}

inline void syncwarp() { post(Op::SyncWarp); }

// 32-bit integer shuffles (mode 0 bfly, 1 idx, 2 up) and redux.sync min / max: the bits travel
// unchanged (in[0] -> out[0]).
inline uint32_t shfl_bits(unsigned mask, uint32_t v, int arg, int mode) {
  if (mask != 0xffffffffu) fail("%s: shuffle with mask %#x (the emulator needs full warps)", where(), mask);
  Lane& l = me();
  l.in[0] = v;
  l.arg = arg;
  l.mode = mode;
  post(Op::ShflBits);
  return me().out[0];
}

inline uint32_t redux(unsigned mask, uint32_t v, bool is_max) {
  if (mask != 0xffffffffu) fail("%s: redux.sync with mask %#x (the emulator needs full warps)", where(), mask);
  me().in[0] = v;
  post(is_max ? Op::ReduxMax : Op::ReduxMin);
  return me().out[0];
}

// vote.sync.ballot: bit l of the result is lane l's predicate.
inline uint32_t ballot(unsigned mask, bool pred) {
  if (mask != 0xffffffffu) fail("%s: ballot with mask %#x (the emulator needs full warps)", where(), mask);
  me().in[0] = pred ? 1u : 0u;
  post(Op::Ballot);
  return me().out[0];
}

// A static __shared__ array of the running block (see State::static_shared): every thread of
// the block declares the same arrays in the same order and gets the same memory.
void* static_shared(size_t bytes, const char* name);

inline void syncthreads() {
  Lane& l = me();
  l.st = St::Bar;
  yield_to_sched();
}

// bar.sync id, count (id 1..15; 0 is __syncthreads): opens once `count` threads of the block
// (whole warps) wait at barrier `id`, all naming the same count.
inline void named_barrier(int id, int count) {
  if (id <= 0 || id > 15 || count <= 0 || count % 32 != 0)
    fail("%s: bar.sync %d, %d (id 1..15, a count of whole warps)", where(), id, count);
  Lane& l = me();
  l.st = St::NBar;
  l.nbar_id = id;
  l.nbar_count = count;
  yield_to_sched();
}

// bar.arrive id, count (a warp collective here: bar.arrive is .aligned): the warp counts towards
// barrier `id`'s current phase without waiting; the barrier opens for its waiters once arrivals
// and waiters make `count` (all naming the same count; more is an error).
inline void named_barrier_arrive(int id, int count) {
  if (id <= 0 || id > 15 || count <= 0 || count % 32 != 0)
    fail("%s: bar.arrive %d, %d (id 1..15, a count of whole warps)", where(), id, count);
  Lane& l = me();
  l.nbar_id = id;
  l.nbar_count = count;
  post(Op::NBarArrive);
}

// ---- cp.async ---------------------------------------------------------------------------------

// A copy lands: a generic-proxy write of its 16 bytes by the issuing thread (the running one:
// copies land in cp_async or in the issuing thread's cp_wait).
inline void land(const Copy& c) {
  check_smem(c.dst, 16, 16, "cp.async landing", true);
  char* d = S.smem + c.dst;
  if (c.bytes > 0) memcpy(d, c.src, c.bytes);
  memset(d + c.bytes, 0, 16 - c.bytes);
}

inline void cp_async(uint32_t dst_addr, const void* src, int bytes) {
  const uint32_t dst = smem_off(dst_addr, "cp.async destination");
  if (bytes < 0 || bytes > 16) fail("%s: cp.async src-size %d (0..16)", where(), bytes);
  check_smem(dst, 16, 16, "cp.async destination", true, false);
  if (bytes > 0) {
    if (reinterpret_cast<uintptr_t>(src) % 16) fail("%s: cp.async source %p not 16-byte aligned", where(), src);
    check_global(src, bytes, false, "cp.async");
  }
  S.copies++;
  const Copy c{dst, static_cast<const char*>(src), bytes};
  if (!S.late_copies) {
    land(c);
  } else {
    if (S.inflight[dst / 16]) fail("%s: two cp.async in flight into shared chunk %u", where(), dst / 16);
    S.inflight[dst / 16]++;
    me().open.push_back(c);
  }
}

inline void cp_commit() {
  Lane& l = me();
  l.groups.push_back(std::move(l.open));
  l.open.clear();
}

inline void cp_wait(int n) {
  Lane& l = me();
  // Copies not yet committed are not waited for by wait_group (they stay in flight).
  while (static_cast<int>(l.groups.size()) > n) {
    for (const Copy& c : l.groups.front()) {
      if (S.late_copies) {
        S.inflight[c.dst / 16]--;
        land(c);
      }
    }
    l.groups.erase(l.groups.begin());
  }
}

// ---- ex2.approx.ftz ---------------------------------------------------------------------------

inline float ex2_ftz(float x) {
  if (fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  float y = exp2f(x);
  if (fpclassify(y) == FP_SUBNORMAL) y = 0.f;
  return y;
}

// ---- Clusters (lane side) -------------------------------------------------------------------

inline unsigned cluster_rank() { return static_cast<unsigned>(me().blk); }
inline unsigned cluster_blocks() { return S.cluster; }
inline void cluster_arrive() { post(Op::ClusterArrive); }
inline void cluster_wait() { post(Op::ClusterWait); }

// fence.acq_rel.cluster: publishes this block's shared memory to the cluster's remote readers.
inline void cluster_fence() {
  const State::GroupBlock& g = S.group[me().blk];
  if (g.published) memcpy(g.published, g.smem, S.smem_bytes);
}

// mapa: the address of p (this block's dynamic shared memory, `bytes` bytes read there with
// `align`) in block `rank`'s published shared memory.
inline const void* cluster_map(const void* p, int rank, size_t bytes, size_t align) {
  const char* c = static_cast<const char*>(p);
  if (!S.smem || c < S.smem || c + bytes > S.smem + S.smem_bytes)
    fail("%s: mapa of a pointer (%zu bytes) outside this block's %u bytes of dynamic shared memory",
         where(), bytes, S.smem_bytes);
  const size_t off = static_cast<size_t>(c - S.smem);
  if (off % align) fail("%s: mapa of shared offset %zu, not %zu-byte aligned", where(), off, align);
  if (rank < 0 || rank >= static_cast<int>(S.cluster))
    fail("%s: mapa to block %d of a cluster of %u", where(), rank, S.cluster);
  const State::GroupBlock& g = S.group[rank];
  if (g.exited)
    fail("%s: reads the shared memory of cluster block %d, whose threads have all exited", where(), rank);
  if (!S.clustered) fail("%s: mapa outside a cluster launch", where());
  return g.published + off;
}

// A kernel file staged for the emulator has each static `__shared__ T name[dims];` rewritten to
// `SIM_SHARED(T, name, [dims]);` (tests/common's rewrite_shared): a reference to a guarded,
// 0xff-filled array shared by the running block's threads (static_shared), where the empty
// `__shared__` above would give every fiber its own.
#define SIM_SHARED(T, name, dims) \
  T(&name) dims = *reinterpret_cast<T(*) dims>(sim::static_shared(sizeof(T dims), #name))

// ---- Launch -----------------------------------------------------------------------------------

// Runs the grid of `kernel` (a function taking the argument struct by value, called through
// `entry` on every fiber); with cluster >= 1, a cluster launch of `cluster` blocks per cluster
// along x (0: no clusters). Defined in sim_impl.h.
void launch(const char* name, void (*entry)(), dim3 grid, dim3 block, uint32_t smem_bytes,
            unsigned cluster = 0);

// The drivers' input: a byte buffer read front to back (values in native layout, strings as a
// u32 length and the bytes); truncated input is a failure.
struct Reader {
  std::vector<char> data;
  size_t at = 0;
  // All of stdin (the drivers read their whole input before they launch anything).
  static Reader from_stdin() {
    Reader in;
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) in.data.insert(in.data.end(), buf, buf + n);
    return in;
  }
  template <typename T> T get() {
    if (at + sizeof(T) > data.size()) fail("truncated input");
    T v;
    memcpy(&v, data.data() + at, sizeof(T));
    at += sizeof(T);
    return v;
  }
  std::string str() {
    const uint32_t n = get<uint32_t>();
    if (at + n > data.size()) fail("truncated input");
    std::string s(data.data() + at, n);
    at += n;
    return s;
  }
  const char* bytes(size_t n) {
    if (at + n > data.size()) fail("truncated input");
    const char* p = data.data() + at;
    at += n;
    return p;
  }
};

}  // namespace sim

// ---- CUDA built-ins ---------------------------------------------------------------------------

#define threadIdx (sim::me().tid)
#define blockIdx (sim::S.block_idx)
#define gridDim (sim::S.grid)
#define blockDim (sim::S.block)

inline void __syncthreads() { sim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) sim::fail("%s: __syncwarp with a partial mask", sim::where());
  sim::syncwarp();
}
inline float __shfl_xor_sync(unsigned mask, float v, int m, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  return sim::shfl(mask, v, m, true);
}
inline float __shfl_sync(unsigned mask, float v, int src, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  return sim::shfl(mask, v, src, false);
}
inline int __shfl_sync(unsigned mask, int v, int src, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  return static_cast<int>(sim::shfl_bits(mask, static_cast<uint32_t>(v), src, 1));
}
inline unsigned __shfl_sync(unsigned mask, unsigned v, int src, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  return sim::shfl_bits(mask, v, src, 1);
}
inline int __shfl_xor_sync(unsigned mask, int v, int m, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  return static_cast<int>(sim::shfl_bits(mask, static_cast<uint32_t>(v), m, 0));
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int m, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  return sim::shfl_bits(mask, v, m, 0);
}
// A double as two 32-bit shuffles, as the hardware does it (dk_div_finish's f64 sum).
inline double __shfl_xor_sync(unsigned mask, double v, int m, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  uint64_t bits;
  memcpy(&bits, &v, sizeof bits);
  const uint64_t lo = sim::shfl_bits(mask, static_cast<uint32_t>(bits), m, 0);
  const uint64_t hi = sim::shfl_bits(mask, static_cast<uint32_t>(bits >> 32), m, 0);
  bits = lo | (hi << 32);
  memcpy(&v, &bits, sizeof v);
  return v;
}
// A 64-bit integer as two 32-bit shuffles, likewise (dk_div_prepare's count of valid rows).
inline unsigned long long __shfl_xor_sync(unsigned mask, unsigned long long v, int m,
                                          int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  const uint64_t lo = sim::shfl_bits(mask, static_cast<uint32_t>(v), m, 0);
  const uint64_t hi = sim::shfl_bits(mask, static_cast<uint32_t>(v >> 32), m, 0);
  return lo | (hi << 32);
}
inline int __shfl_up_sync(unsigned mask, int v, unsigned delta, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  return static_cast<int>(sim::shfl_bits(mask, static_cast<uint32_t>(v), static_cast<int>(delta), 2));
}
inline unsigned __shfl_up_sync(unsigned mask, unsigned v, unsigned delta, int width = 32) {
  if (width != 32) sim::fail("%s: shuffle width %d", sim::where(), width);
  return sim::shfl_bits(mask, v, static_cast<int>(delta), 2);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) { return sim::redux(mask, v, true); }
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) { return sim::redux(mask, v, false); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return sim::ballot(mask, pred != 0); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// Atomics: fibers switch only at scheduling points, so a plain read-modify-write is atomic.
// Global operands are checked like other accesses (inside a row of an operand; stores into a
// writable one).
inline unsigned atomicOr(unsigned* p, unsigned v) {
  sim::check_any(p, 4, true, "atomicOr", 4);
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline int atomicCAS(int* p, int compare, int v) {
  sim::check_any(p, 4, true, "atomicCAS", 4);
  const int old = *p;
  if (old == compare) *p = v;
  return old;
}
inline int atomicExch(int* p, int v) {
  sim::check_any(p, 4, true, "atomicExch", 4);
  const int old = *p;
  *p = v;
  return old;
}

inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }

// Read-only global load: checked against the registered extents.
template <typename T> inline T __ldg(const T* p) {
  sim::check_global(p, sizeof(T), false, "__ldg");
  return *p;
}

struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// 16-byte vector: its copies through pointers are the kernels' 16-byte global and shared
// accesses, so copy construction (a load from the source's address) and copy assignment (a
// store to this address) are checked. Locals on a fiber stack are not checked.
struct uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  uint4(unsigned a, unsigned b, unsigned c, unsigned d) : x(a), y(b), z(c), w(d) {}
  uint4(const uint4& o) {
    sim::check_any(&o, 16, false, "16-byte load");
    x = o.x; y = o.y; z = o.z; w = o.w;
  }
  uint4& operator=(const uint4& o) {
    sim::check_any(&o, 16, false, "16-byte load");
    sim::check_any(this, 16, true, "16-byte store");
    x = o.x; y = o.y; z = o.z; w = o.w;
    return *this;
  }
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4(a, b, c, d); }

// cuda_bf16.h / cuda_fp16.h: storage types and the conversions the kernels use.
struct __nv_bfloat16 { uint16_t x; };
struct __half { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half2 { __half x, y; };

inline float __bfloat162float(__nv_bfloat16 h) { return sim::bf2f(h.x); }
inline float __half2float(__half h) { return sim::h2f(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {sim::f2bf(f)}; }
inline __half __float2half_rn(float f) { return {sim::f2h(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {{sim::f2bf(a)}, {sim::f2bf(b)}}; }
inline __half2 __floats2half2_rn(float a, float b) { return {{sim::f2h(a)}, {sim::f2h(b)}}; }
inline float2 __half22float2(__half2 h) { return {sim::h2f(h.x.x), sim::h2f(h.y.x)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {sim::bf2f(h.x.x), sim::bf2f(h.y.x)}; }
