// Definitions of the emulator (sim_core.h): scheduler, warp collectives, guarded memory, fault
// reports. Included by exactly one translation unit (attention_sim.cpp).
#pragma once

#include <stdarg.h>

#include "sim_core.h"
#include "sim_wgmma.h"

namespace sim {

State S;

static const size_t kPage = 4096;
static const size_t kGuard = 16 * kPage;  // inaccessible bytes before and after every buffer
static const size_t kStackBytes = 256 * 1024;  // per fiber; the lowest page is a guard

static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

const char* where() {
  static char buf[256];
  if (S.cur >= 0) {
    const int t = S.nthreads > 0 ? S.cur % S.nthreads : S.cur;  // S.cur indexes the group's lanes
    snprintf(buf, sizeof buf, "%s block (%u,%u,%u) thread %d (warp %d lane %d)", S.kernel,
             S.block_idx.x, S.block_idx.y, S.block_idx.z, t, t / 32, t % 32);
  } else {
    snprintf(buf, sizeof buf, "%s block (%u,%u,%u)", S.kernel, S.block_idx.x, S.block_idx.y,
             S.block_idx.z);
  }
  return buf;
}

void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("EMULATOR ERROR: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  fflush(stderr);
  _exit(3);
}

// ---- Context switch ---------------------------------------------------------------------------

#ifndef SIM_USE_UCONTEXT
// sim_ctx_switch(save, to): pushes the callee-saved registers, stores the stack pointer in
// *save, switches to `to` and pops the registers saved there (System V x86-64).
asm(R"(
  .text
  .globl sim_ctx_switch
  .type sim_ctx_switch, @function
sim_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sim_ctx_switch, .-sim_ctx_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

[[noreturn]] static void fiber_main() {
  S.entry();
  Lane& l = me();
  bool pending = !l.open.empty();
  for (const auto& g : l.groups) pending |= !g.empty();
  if (pending) fail("%s: the thread exits with cp.async copies in flight", where());
  wg_check_exit();
  if (l.arrives != l.waits)
    fail("%s: the thread exits with a cluster barrier arrival it has not waited for (%u arrivals, "
         "%u waits)", where(), l.arrives, l.waits);
  l.st = St::Done;
  yield_to_sched();
  fail("a finished fiber was resumed");
}

// Makes block b of the running group the current one: blockIdx and its shared memory.
static void enter_block(int b) {
  const State::GroupBlock& g = S.group[b];
  S.block_idx = g.idx;
  S.smem = g.smem;
  S.smem_map = g.map;
  S.smem_map_bytes = g.map_bytes;
  S.inflight = S.group[b].inflight.data();
}

static void resume(int i) {
  enter_block(S.lanes[i].blk);
  S.cur = i;
#ifdef SIM_USE_UCONTEXT
  swapcontext(&S.sched_uc, &S.lanes[i].uc);
#else
  sim_ctx_switch(&S.sched_sp, S.lanes[i].sp);
#endif
  S.cur = -1;
}

static void init_fiber(Lane& l) {
  if (!l.stack) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
    l.stack = static_cast<char*>(p);
    mprotect(l.stack, kPage, PROT_NONE);
  }
#ifdef SIM_USE_UCONTEXT
  getcontext(&l.uc);
  l.uc.uc_stack.ss_sp = l.stack + kPage;
  l.uc.uc_stack.ss_size = kStackBytes - kPage;
  l.uc.uc_link = &S.sched_uc;
  makecontext(&l.uc, reinterpret_cast<void (*)()>(fiber_main), 0);
#else
  void** sp = reinterpret_cast<void**>(l.stack + kStackBytes);  // 16-byte aligned
  *--sp = nullptr;                                  // return address of fiber_main (never used)
  *--sp = reinterpret_cast<void*>(&fiber_main);     // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;      // rbp rbx r12 r13 r14 r15
  l.sp = sp;
#endif
}

// ---- Warp collectives (scheduler side) ----------------------------------------------------

static inline uint16_t smem16(uint32_t off) {
  uint16_t v;
  memcpy(&v, S.smem + off, 2);
  return v;
}
static inline float elem16(uint32_t reg, int half, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return bf16 ? bf2f(h) : h2f(h);
}

// Executes collective `op` for warp w of the group (lanes 32w .. 32w + 31) and sets the lanes'
// states (runnable, or parked at a cluster wait).
static void exec_warp(int w, Op op) {
  Lane* L = &S.lanes[w * 32];
  S.collectives++;
  for (int l = 0; l < 32; ++l) L[l].st = St::Run;
  switch (op) {
    case Op::Ldsm:
    case Op::LdsmT: {
      for (int l = 0; l < 32; ++l) {
        S.cur = w * 32 + l;  // for the message
        check_smem(L[l].in[0], 16, 16, op == Op::Ldsm ? "ldmatrix row" : "ldmatrix.trans row", false);
      }
      S.cur = -1;
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          uint16_t lo, hi;
          if (op == Op::Ldsm) {
            lo = smem16(L[8 * i + g].in[0] + 4 * t);
            hi = smem16(L[8 * i + g].in[0] + 4 * t + 2);
          } else {
            lo = smem16(L[8 * i + 2 * t].in[0] + 2 * g);
            hi = smem16(L[8 * i + 2 * t + 1].in[0] + 2 * g);
          }
          L[l].out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      }
      break;
    }
    case Op::MmaBf16:
    case Op::MmaF16: {
      S.mmas++;
      const bool bf = op == Op::MmaBf16;
      double A[16][16], B[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int h = 0; h < 2; ++h) {
          A[g][2 * t + h] = elem16(L[l].in[0], h, bf);
          A[g + 8][2 * t + h] = elem16(L[l].in[1], h, bf);
          A[g][2 * t + 8 + h] = elem16(L[l].in[2], h, bf);
          A[g + 8][2 * t + 8 + h] = elem16(L[l].in[3], h, bf);
          B[2 * t + h][g] = elem16(L[l].in[4], h, bf);
          B[2 * t + 8 + h][g] = elem16(L[l].in[5], h, bf);
        }
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
          double acc = L[l].f[i];
          for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
          L[l].fo[i] = static_cast<float>(acc);
        }
      }
      break;
    }
    case Op::ShflBits: {
      uint32_t v[32];
      for (int l = 0; l < 32; ++l) v[l] = L[l].in[0];
      for (int l = 0; l < 32; ++l) {
        const int a = L[l].arg, m = L[l].mode;
        if (m != L[0].mode) {
          S.cur = w * 32 + l;
          fail("%s: lanes of one warp at different kinds of shuffle", where());
        }
        int src = m == 0 ? (l ^ a) : m == 1 ? (a & 31) : l - a;
        if (src < 0 || src >= 32) src = l;  // bfly out of range, up below lane 0: own value
        L[l].out[0] = v[src];
      }
      break;
    }
    case Op::Ballot: {
      uint32_t b = 0;
      for (int l = 0; l < 32; ++l) b |= (L[l].in[0] & 1u) << l;
      for (int l = 0; l < 32; ++l) L[l].out[0] = b;
      break;
    }
    case Op::ReduxMax:
    case Op::ReduxMin: {
      uint32_t r = L[0].in[0];
      for (int l = 1; l < 32; ++l)
        r = op == Op::ReduxMax ? std::max(r, L[l].in[0]) : std::min(r, L[l].in[0]);
      for (int l = 0; l < 32; ++l) L[l].out[0] = r;
      break;
    }
    case Op::ShflXor:
    case Op::ShflIdx: {
      float v[32];
      for (int l = 0; l < 32; ++l) v[l] = L[l].f[0];
      for (int l = 0; l < 32; ++l) {
        const int src = op == Op::ShflXor ? (l ^ L[l].arg) : (L[l].arg & 31);
        L[l].fo[0] = src >= 0 && src < 32 ? v[src] : v[l];
      }
      break;
    }
    case Op::ClusterArrive:
      for (int l = 0; l < 32; ++l) {
        if (L[l].arrives != L[l].waits) {
          S.cur = w * 32 + l;
          fail("%s: arrives at the cluster barrier again without having waited for its previous "
               "arrival (%u arrivals, %u waits)", where(), L[l].arrives, L[l].waits);
        }
        L[l].arrives++;
      }
      break;
    case Op::ClusterWait:
      for (int l = 0; l < 32; ++l) {
        if (L[l].arrives != L[l].waits + 1) {
          S.cur = w * 32 + l;
          fail("%s: waits at the cluster barrier without an arrival to wait for (%u arrivals, %u "
               "waits)", where(), L[l].arrives, L[l].waits);
        }
        L[l].waits++;
        if (S.phases < L[l].waits) L[l].st = St::CWait;
      }
      break;
    case Op::NBarArrive: {
      State::GroupBlock& gb = S.group[L[0].blk];
      const int id = L[0].nbar_id, count = L[0].nbar_count;
      for (int l = 1; l < 32; ++l)
        if (L[l].nbar_id != id || L[l].nbar_count != count) {
          S.cur = w * 32 + l;
          fail("%s: lanes of a warp at bar.arrive %d, %d and bar.arrive %d, %d", where(), L[l].nbar_id,
               L[l].nbar_count, id, count);
        }
      if (gb.nbar_arrived[id] > 0 && gb.nbar_arrive_count[id] != count) {
        S.cur = w * 32;
        fail("%s: bar.arrive %d named with counts %d and %d", where(), id, gb.nbar_arrive_count[id],
             count);
      }
      gb.nbar_arrived[id] += 32;
      gb.nbar_arrive_count[id] = count;
      gb.nbar_arrive_warps[id] |= 1u << (w % (S.nthreads / 32));
      if (gb.nbar_arrived[id] > count) {
        S.cur = w * 32;
        fail("%s: %d threads arrive at bar.arrive %d, %d before it opens (a warp arriving again for "
             "the next phase before the barrier completed?)", where(), gb.nbar_arrived[id], id, count);
      }
      break;
    }
    case Op::WgmmaSS:
    case Op::WgmmaRS:
    case Op::WgFence:
    case Op::WgCommit:
    case Op::WgWait:
      wg_exec(w, op);
      break;
    case Op::SyncWarp:
    case Op::None:
      break;
  }
}

// Completes the cluster barrier phases every thread of the group has arrived for and releases
// the threads waiting for them; true if any thread was released.
static bool release_cluster() {
  const int total = static_cast<int>(S.group.size()) * S.nthreads;
  for (;;) {
    bool all = total > 0;
    for (int i = 0; i < total && all; ++i) all = S.lanes[i].arrives > S.phases;
    if (!all) break;
    S.phases++;
    S.cluster_barriers++;
  }
  bool any = false;
  for (int i = 0; i < total; ++i) {
    Lane& l = S.lanes[i];
    if (l.st == St::CWait && l.waits <= S.phases) {
      l.st = St::Run;
      any = true;
    }
  }
  return any;
}

// ---- Blocks -------------------------------------------------------------------------------

// Runs the group's blocks (one, or the C blocks of a cluster) to completion.
static void run_group() {
  const int n = S.nthreads, nwarps = n / 32, nb_group = static_cast<int>(S.group.size());
  const int total = nb_group * n;
  for (int i = 0; i < total; ++i) {
    Lane& l = S.lanes[i];
    l.st = St::Run;
    l.op = Op::None;
    l.tid = dim3{static_cast<unsigned>(i % n), 0, 0};
    l.blk = i / n;
    l.arrives = l.waits = 0;
    l.sh_next = 0;
    l.open.clear();
    l.groups.clear();
    init_fiber(l);
  }
  for (State::GroupBlock& g : S.group) {
    if (S.smem_bytes) memset(g.smem, 0xff, S.smem_bytes);  // NaN in bf16, f16 and f32
    if (S.smem_bytes && g.published) memset(g.published, 0xff, S.smem_bytes);
    g.exited = false;
    std::fill(std::begin(g.nbar_warps), std::end(g.nbar_warps), 0u);
    std::fill(std::begin(g.nbar_arrived), std::end(g.nbar_arrived), 0);
    std::fill(std::begin(g.nbar_arrive_count), std::end(g.nbar_arrive_count), 0);
    std::fill(std::begin(g.nbar_arrive_warps), std::end(g.nbar_arrive_warps), 0u);
  }
  S.phases = 0;
  S.static_live = 0;
  for (State::GroupBlock& g : S.group) std::fill(g.inflight.begin(), g.inflight.end(), 0);
  enter_block(0);
  wg_reset(total);
  S.blocks += nb_group;
  // Named barriers of block b: barrier id opens once as many of the block's threads wait at it
  // or arrived at it (bar.arrive) as they name (all naming the same count). Returns whether one
  // opened.
  auto open_named = [&](int b) {
    bool opened = false;
    for (int id = 1; id < 16; ++id) {
      State::GroupBlock& gb = S.group[b];
      const int arrived = gb.nbar_arrived[id];
      int waiting = 0, count = arrived > 0 ? gb.nbar_arrive_count[id] : -1;
      uint32_t warps = gb.nbar_arrive_warps[id];
      for (int i = b * n; i < (b + 1) * n; ++i) {
        const Lane& l = S.lanes[i];
        if (l.st != St::NBar || l.nbar_id != id) continue;
        if (count >= 0 && l.nbar_count != count) {
          enter_block(b);
          fail("%s: bar.sync %d named with counts %d and %d", where(), id, count, l.nbar_count);
        }
        count = l.nbar_count;
        ++waiting;
        warps |= 1u << ((i - b * n) / 32);
      }
      if (waiting + arrived == 0 || waiting + arrived < count) continue;
      if (waiting + arrived > count) {
        enter_block(b);
        fail("%s: %d threads wait at bar.sync %d, %d (and %d arrived with bar.arrive)", where(), waiting,
             id, count, arrived);
      }
      gb.nbar_arrived[id] = 0;
      gb.nbar_arrive_warps[id] = 0;
      uint32_t& first = S.group[b].nbar_warps[id];
      if (first == 0) first = warps;
      if (first != warps) {
        enter_block(b);
        fail("%s: bar.sync %d released warps 0x%x, earlier 0x%x (warp groups sharing a barrier id)",
             where(), id, warps, first);
      }
      for (int i = b * n; i < (b + 1) * n; ++i)
        if (S.lanes[i].st == St::NBar && S.lanes[i].nbar_id == id) S.lanes[i].st = St::Run;
      S.barriers++;
      opened = true;
    }
    return opened;
  };
  for (;;) {
    bool progress = false;
    // Each block in turn runs as far as it can: its warps one after the other up to
    // __syncthreads (which opens once all its threads wait there), a cluster wait or the exit.
    for (int bi = 0; bi < nb_group; ++bi) {
      const int b = S.reverse ? nb_group - 1 - bi : bi;
      for (;;) {
        // Interleaved: sweeps over the warps, each running to its next collective, until none
        // moves; otherwise one sweep, each warp running up to __syncthreads (or its exit).
        bool moved, reopened;
        do {
        moved = false;
        reopened = false;
        for (int wi = 0; wi < nwarps; ++wi) {
          const int w = b * nwarps + (S.reverse ? nwarps - 1 - wi : wi);  // warp of the group
          for (;;) {
            for (int li = 0; li < 32; ++li) {
              const int i = w * 32 + (S.reverse ? 31 - li : li);
              if (S.lanes[i].st == St::Run) {
                resume(i);
                progress = true;
                moved = true;
              }
            }
            int nw = 0, nb = 0, nc = 0, nd = 0;
            for (int l = 0; l < 32; ++l) {
              const St st = S.lanes[w * 32 + l].st;
              nw += st == St::Warp;
              nb += st == St::Bar;
              nc += st == St::CWait;
              nd += st == St::Done;
            }
            if (nw == 0) break;
            int first = -1;
            for (int l = 0; l < 32; ++l)
              if (S.lanes[w * 32 + l].st == St::Warp) { first = l; break; }
            const Op op = S.lanes[w * 32 + first].op;
            enter_block(b);
            if (nw < 32)
              fail("%s warp %d: %d lanes wait at %s while %d wait at __syncthreads, %d at a cluster "
                   "wait and %d exited (a warp collective needs all 32 lanes)",
                   where(), w % nwarps, nw, op_name(op), nb, nc, nd);
            for (int l = 0; l < 32; ++l) {
              if (S.lanes[w * 32 + l].op != op)
                fail("%s warp %d diverged: lane %d at %s, lane %d at %s", where(), w % nwarps, first,
                     op_name(op), l, op_name(S.lanes[w * 32 + l].op));
            }
            exec_warp(w, op);
            moved = true;
            if (S.interleave) break;
          }
          // A named barrier this warp completed opens at once, and the sweep starts again, so
          // its warps run ahead of the warps that have not reached their own barriers yet (a
          // named barrier orders only its own warps).
          if (open_named(b)) {
            reopened = true;
            break;
          }
        }
        } while ((S.interleave && moved) || reopened);
        if (open_named(b)) continue;
        // __syncthreads: the block's barrier opens when all its threads wait at it.
        int nb = 0, nd = 0;
        for (int i = b * n; i < (b + 1) * n; ++i) {
          nb += S.lanes[i].st == St::Bar;
          nd += S.lanes[i].st == St::Done;
        }
        if (nd == n) {
          S.group[b].exited = true;
          break;
        }
        if (nb + nd < n || nb == 0) break;
        enter_block(b);
        if (nd > 0) fail("%s: __syncthreads reached by %d threads while %d exited", where(), nb, nd);
        S.barriers++;
        for (int i = b * n; i < (b + 1) * n; ++i) S.lanes[i].st = St::Run;
      }
    }
    int done = 0;
    for (int i = 0; i < total; ++i) done += S.lanes[i].st == St::Done;
    if (done == total) {
      enter_block(0);
      wg_check_block_end();
      break;
    }
    progress |= release_cluster();
    if (!progress) {
      char msg[1024];
      int at = 0;
      for (int b = 0; b < nb_group && at < 900; ++b) {
        int nb = 0, nn = 0, nc = 0, nd = 0;
        for (int i = b * n; i < (b + 1) * n; ++i) {
          nb += S.lanes[i].st == St::Bar;
          nn += S.lanes[i].st == St::NBar;
          nc += S.lanes[i].st == St::CWait;
          nd += S.lanes[i].st == St::Done;
        }
        at += snprintf(msg + at, sizeof msg - at,
                       " [block %d: %d at __syncthreads, %d at a named barrier, %d at a cluster "
                       "wait, %d exited]",
                       b, nb, nn, nc, nd);
      }
      enter_block(0);
      fail("%s: deadlock after %u cluster barrier phases:%s", where(), S.phases, msg);
    }
  }
}

// ---- Guarded memory -----------------------------------------------------------------------

// `bytes` of memory whose end (rounded up to 16) touches kGuard inaccessible bytes, with as
// many before the start.
static char* guarded(size_t bytes, char** map_out, size_t* map_bytes) {
  const size_t body = round_up(std::max<size_t>(bytes, 1), kPage);
  const size_t total = body + 2 * kGuard;
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail("mmap of %zu bytes failed", total);
  char* m = static_cast<char*>(p);
  mprotect(m, kGuard, PROT_NONE);
  mprotect(m + kGuard + body, kGuard, PROT_NONE);
  *map_out = m;
  *map_bytes = total;
  return m + kGuard + body - round_up(bytes, 16);
}

char* alloc_global(size_t bytes, const char* name) {
  Alloc a;
  a.lo = guarded(bytes, &a.map, &a.map_bytes);
  a.hi = a.lo + bytes;
  a.name = name;
  S.allocs.push_back(a);
  return a.lo;
}

// The operand buffers a driver reads from its input (each a u64 byte count and the bytes) into
// guarded global memory, and writes back to stdout after the launch, in the order read.
struct Buffers {
  struct Buf {
    const char* what;
    char* p;
    uint64_t bytes;
    bool returned;  // written back by write_back
  };
  std::vector<Buf> list;

  char* take(Reader& in, const char* what, bool returned = true) {
    const uint64_t n = in.get<uint64_t>();
    char* p = alloc_global(n, what);
    memcpy(p, in.bytes(n), n);
    list.push_back({what, p, n, returned});
    return p;
  }

  void write_back() const {
    for (const Buf& b : list) {
      if (b.returned && b.bytes && fwrite(b.p, 1, b.bytes, stdout) != b.bytes) fail("short write");
    }
    fflush(stdout);
  }
};

void add_extent(const char* name, const void* base, int64_t rows, int64_t row_bytes,
                int64_t stride_bytes, bool writable) {
  if (rows <= 0 || row_bytes <= 0) return;
  const Alloc* a = alloc_of(base);
  if (!a) fail("extent %s is not in a registered buffer", name);
  const char* end = static_cast<const char*>(base) + (rows - 1) * stride_bytes + row_bytes;
  if (static_cast<const char*>(base) < a->lo || end > a->hi)
    fail("extent %s does not fit its buffer %s", name, a->name);
  S.extents.push_back(Extent{static_cast<const char*>(base), rows, row_bytes,
                             stride_bytes > 0 ? stride_bytes : row_bytes, writable, name, true});
}

// A store-only extent: rows the kernel writes and never reads. It may overlap other extents
// (check_global: a store needs a writable extent that holds it, a load a readable one), e.g.
// the fused persistent divergence kernel's G rows written over the logits of earlier rows,
// which stay read-only through their own extent: so a store into the logits outside G's rows
// and a load of G's rows outside the logits' (the pad before them) are both still errors.
void add_store_extent(const char* name, const void* base, int64_t rows, int64_t row_bytes,
                      int64_t stride_bytes) {
  const size_t before = S.extents.size();
  add_extent(name, base, rows, row_bytes, stride_bytes, true);
  if (S.extents.size() > before) S.extents.back().readable = false;
}

void* static_shared(size_t bytes, const char* name) {
  if (S.clustered) fail("%s: static __shared__ %s in a cluster launch (not modelled)", where(), name);
  Lane& l = me();
  const size_t i = static_cast<size_t>(l.sh_next++);
  if (i < S.static_live) {
    const State::StaticShared& a = S.static_shared[i];
    if (a.bytes != bytes || strcmp(a.name, name) != 0)
      fail("%s: static __shared__ declaration %zu is %s (%zu bytes) here, %s (%zu bytes) in another "
           "thread of the block", where(), i, name, bytes, a.name, a.bytes);
    return a.p;
  }
  if (i != S.static_live) fail("%s: static __shared__ declarations out of order", where());
  if (i == S.static_shared.size()) {
    State::StaticShared a;
    a.p = guarded(bytes, &a.map, &a.map_bytes);
    a.bytes = bytes;
    a.name = name;
    S.static_shared.push_back(a);
  }
  State::StaticShared& a = S.static_shared[i];
  if (a.bytes != bytes || strcmp(a.name, name) != 0)
    fail("%s: static __shared__ declaration %zu is %s (%zu bytes) here, %s (%zu bytes) in another "
         "block", where(), i, name, bytes, a.name, a.bytes);
  memset(a.p, 0xff, bytes);  // NaN in bf16, f16 and f32; -1 as int
  S.static_live++;
  return a.p;
}

// ---- Faults -------------------------------------------------------------------------------

static void on_fault(int sig, siginfo_t* si, void*) {
  const char* a = static_cast<const char*>(si->si_addr);
  char what[256] = "an unmapped address";
  bool pub = false;
  const int gb = group_smem_of(a, &pub);
  if (gb >= 0) {
    const char* base = pub ? S.group[gb].published : S.group[gb].smem;
    snprintf(what, sizeof what, "the guard of the %sshared memory of group block %d (offset %ld; the launch has %u bytes)",
             pub ? "published copy of the " : "", gb, static_cast<long>(a - base), S.smem_bytes);
  } else if (const State::StaticShared* ss = [&]() -> const State::StaticShared* {
               for (const State::StaticShared& x : S.static_shared)
                 if (a >= x.map && a < x.map + x.map_bytes) return &x;
               return nullptr;
             }()) {
    snprintf(what, sizeof what, "the guard of static __shared__ %s (offset %ld; %zu bytes)", ss->name,
             static_cast<long>(a - ss->p), ss->bytes);
  } else if (const Alloc* al = alloc_of(a)) {
    if (a < al->lo)
      snprintf(what, sizeof what, "the guard %ld bytes before buffer %s", static_cast<long>(al->lo - a),
               al->name);
    else
      snprintf(what, sizeof what, "the guard %ld bytes past the end of buffer %s (%ld bytes)",
               static_cast<long>(a - al->hi), al->name, static_cast<long>(al->hi - al->lo));
  } else {
    for (size_t i = 0; i < S.lanes.size(); ++i) {
      const char* s = S.lanes[i].stack;
      if (s && a >= s && a < s + kPage) snprintf(what, sizeof what, "the stack guard of thread %zu", i);
    }
  }
  char msg[768];
  const int len = snprintf(msg, sizeof msg, "EMULATOR ERROR: %s: signal %d, access to %p in %s\n",
                           where(), sig, si->si_addr, what);
  if (len > 0) {
    ssize_t r = write(2, msg, static_cast<size_t>(std::min<int>(len, sizeof msg - 1)));
    (void)r;
  }
  _exit(4);
}

void install_fault_handler() {
  static char alt[1 << 16];
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_sp = alt;
  ss.ss_size = sizeof alt;
  sigaltstack(&ss, nullptr);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

// ---- Launch -------------------------------------------------------------------------------

void launch(const char* name, void (*entry)(), dim3 grid, dim3 block, uint32_t smem_bytes,
            unsigned cluster) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x == 0 || block.x > 1024)
    fail("%s: block (%u,%u,%u) not supported (1-D, whole warps)", name, block.x, block.y, block.z);
  if (cluster > 0 && (grid.y != 1 || grid.z != 1 || grid.x % cluster != 0 || cluster > 16))
    fail("%s: grid (%u,%u,%u) is not a 1-D whole number of clusters of %u blocks (at most 16)", name,
         grid.x, grid.y, grid.z, cluster);
  S.kernel = name;
  S.grid = grid;
  S.block = block;
  S.entry = entry;
  S.nthreads = static_cast<int>(block.x);
  S.clustered = cluster > 0;
  S.cluster = cluster > 0 ? cluster : 1;
  const size_t lanes = static_cast<size_t>(S.nthreads) * S.cluster;
  if (S.lanes.size() < lanes) S.lanes.resize(lanes);
  // Dynamic shared memory of each block of a group: [smem, smem + bytes) ends at a guard
  // region (bytes rounded up to 16); in a cluster launch also its published copy.
  for (State::GroupBlock& g : S.group) {
    munmap(g.map, g.map_bytes);
    if (g.pub_map) munmap(g.pub_map, g.pub_map_bytes);
  }
  S.group.assign(S.cluster, State::GroupBlock{});
  for (State::GroupBlock& g : S.group) {
    g.smem = guarded(smem_bytes, &g.map, &g.map_bytes);
    if (S.clustered) g.published = guarded(smem_bytes, &g.pub_map, &g.pub_map_bytes);
  }
  S.smem_bytes = smem_bytes;
  for (State::StaticShared& a : S.static_shared) munmap(a.map, a.map_bytes);
  S.static_shared.clear();
  S.static_live = 0;
  const size_t chunks16 = round_up(smem_bytes, 16) / 16 + 1;
  for (State::GroupBlock& g : S.group) g.inflight.assign(chunks16, 0);
  S.wg_busy.assign(chunks16, 0);
  S.wg_busy_warp.assign(chunks16, 0);
  S.gen_writer.assign(chunks16, 0);
  for (Alloc& a : S.allocs) a.stores.clear();
  const unsigned nx = grid.x, ny = grid.y, nz = grid.z;
  const uint64_t nblocks = static_cast<uint64_t>(nx) * ny * nz, ngroups = nblocks / S.cluster;
  for (uint64_t k = 0; k < ngroups; ++k) {
    const uint64_t gi = S.reverse ? ngroups - 1 - k : k;
    for (unsigned r = 0; r < S.cluster; ++r) {
      const uint64_t b = gi * S.cluster + r;
      S.group[r].idx = dim3{static_cast<unsigned>(b % nx), static_cast<unsigned>(b / nx % ny),
                            static_cast<unsigned>(b / nx / ny)};
    }
    run_group();
  }
}

}  // namespace sim
