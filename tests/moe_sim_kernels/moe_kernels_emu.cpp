// Driver of the MoE kernel emulator (tests/moe_kernels_emulated.rs): compiles the REAL
// cuda/moe.cu against the host emulator of tests/attention_sim/sim_core.h (every CUDA thread a
// fiber, warps in lockstep at shuffles, redux.sync and __syncwarp, __syncthreads, guarded
// memory; see there for what is and is not modelled) and runs a sequence of launches of its
// kernels on the buffers it is given (a route is top-k, scan, assign; the token-major permute is
// perm_invert, permute_tokens, permute).
//
// Staging (done by the test): cuda/moe.cu is copied with each static `__shared__ T name[dims];`
// declaration rewritten to `SIM_SHARED(T, name, [dims]);` (sim_core.h: a reference to a guarded,
// 0xff-filled array of the running block, sim::static_shared), the only change to the source;
// the test counts the rewrites against the `__shared__` in the file.
//
// __CUDA_ARCH__: moe.cu and dk_moe_route_math.cuh take their device paths (__float_as_uint,
// __popc) under __CUDA_ARCH__, and dk_math.cuh its inline PTX. So dk_math.cuh is included first
// with __CUDACC__ defined and __CUDA_ARCH__ not (its host versions, locked in by #pragma once;
// the MoE kernels use none of them; dk_pdl.cuh likewise: its no-ops, the kernels run in launch
// order here), then __CUDA_ARCH__ 900 is defined for moe.cu and the
// route math. expf, fmaxf and fmaf are the host libm's: the device's expf (≤ 2 ulp) may round
// differently, so the route weights are compared with a tolerance, never bitwise.
//
// Protocol (binary, native endianness), one process per run of a launch sequence:
//   stdin:  u32 magic 0x454f4d44 ("DMOE"); i32 order (0 ascending, 1 descending,
//           2 interleaved warps, ascending lanes, 3 interleaved, descending);
//           u32 buffers, each: str name, u64 bytes + the bytes, i64 rows, row_bytes,
//           stride_bytes (the operand extent inside the buffer: accesses through 16-byte
//           vectors and atomics must lie in one of its rows), i32 writable;
//           u32 launches, each: str kernel, u32 grid, block, dynamic shared bytes,
//           u32 argument bytes + the DkMoeRouteArgs or DkMoeRowsArgs (by the kernel's name)
//           whose pointer fields hold a buffer index + 1 (0: null).
//   (str = u32 length + bytes).
//   stdout: every buffer after the last launch, in order.
//   stderr: statistics, or "EMULATOR ERROR: ..." and exit status 3 (a check failed) or 4 (a
//           guard region was hit).
#include "sim_impl.h"

#include <chrono>
#include <string>

#define __noinline__

#define __CUDACC__ 1
#include "dk_math.cuh"
#include "dk_pdl.cuh"  // its host no-ops (griddepcontrol is PTX), locked in like dk_math.cuh's

#define __CUDA_ARCH__ 900
#include "moe.cu"
#undef __CUDA_ARCH__
#undef __CUDACC__

namespace {

using sim::Reader;

using RouteKernel = void (*)(const DkMoeRouteArgs);
using RowsKernel = void (*)(const DkMoeRowsArgs);
struct Named {
  const char* name;
  RouteKernel route;
  RowsKernel rows;
};

#define DK_SIM_TOPK(t, p) {"dk_moe_topk_" #t "_p" #p, dk_moe_topk_##t##_p##p, nullptr},
#define DK_SIM_TOPK_ALL(t) \
  DK_SIM_TOPK(t, 1) DK_SIM_TOPK(t, 2) DK_SIM_TOPK(t, 4) DK_SIM_TOPK(t, 8) DK_SIM_TOPK(t, 16) DK_SIM_TOPK(t, 32)
#define DK_SIM_ROWS(op)                                                    \
  {"dk_moe_" #op "_f32", nullptr, dk_moe_##op##_f32},                      \
      {"dk_moe_" #op "_bf16", nullptr, dk_moe_##op##_bf16},                \
      {"dk_moe_" #op "_f16", nullptr, dk_moe_##op##_f16},
const Named kKernels[] = {
    DK_SIM_TOPK_ALL(f32) DK_SIM_TOPK_ALL(bf16)
    {"dk_moe_scan", dk_moe_scan, nullptr},
    {"dk_moe_assign", dk_moe_assign, nullptr},
    DK_SIM_ROWS(permute) DK_SIM_ROWS(perm_invert) DK_SIM_ROWS(permute_tokens)
    DK_SIM_ROWS(combine) DK_SIM_ROWS(slot_dot) DK_SIM_ROWS(combine_dot) DK_SIM_ROWS(permute_dot)};
#undef DK_SIM_TOPK
#undef DK_SIM_TOPK_ALL
#undef DK_SIM_ROWS

const Named* g_kernel;
DkMoeRouteArgs g_route;
DkMoeRowsArgs g_rows;
void entry() {
  if (g_kernel->route) {
    g_kernel->route(g_route);
  } else {
    g_kernel->rows(g_rows);
  }
}

// Pointer fields (the leading u64s of the struct) from buffer indices + 1.
template <typename A>
A patch(const char* bytes, uint32_t n, size_t pointers, const std::vector<char*>& bufs) {
  if (n != sizeof(A)) sim::fail("argument struct of %u bytes, %zu expected", n, sizeof(A));
  A a;
  memcpy(&a, bytes, sizeof a);
  uint64_t p[16];
  memcpy(p, &a, pointers * 8);
  for (size_t i = 0; i < pointers; ++i) {
    if (p[i] == 0) continue;
    if (p[i] > bufs.size()) sim::fail("pointer field %zu names buffer %llu of %zu", i,
                                      (unsigned long long)p[i], bufs.size());
    p[i] = reinterpret_cast<uint64_t>(bufs[p[i] - 1]);
  }
  memcpy(&a, p, pointers * 8);
  return a;
}

}  // namespace

int main() {
  sim::install_fault_handler();
#ifdef DK_HD
  if (dk::fast_exp2(0.5f) != exp2f(0.5f)) sim::fail("dk_math.cuh: not the host versions");
#endif
  Reader in = Reader::from_stdin();
  if (in.get<uint32_t>() != 0x454f4d44u) sim::fail("bad magic");
  const int order = in.get<int32_t>();
  sim::S.reverse = order == 1 || order == 3;
  sim::S.interleave = order >= 2;

  const uint32_t nbufs = in.get<uint32_t>();
  std::vector<std::string> names(nbufs);
  std::vector<char*> bufs(nbufs);
  std::vector<uint64_t> sizes(nbufs);
  for (uint32_t i = 0; i < nbufs; ++i) {
    names[i] = in.str();
    sizes[i] = in.get<uint64_t>();
    bufs[i] = sim::alloc_global(sizes[i], names[i].c_str());
    memcpy(bufs[i], in.bytes(sizes[i]), sizes[i]);
    const int64_t rows = in.get<int64_t>(), row_bytes = in.get<int64_t>(), stride = in.get<int64_t>();
    const bool writable = in.get<int32_t>() != 0;
    sim::add_extent(names[i].c_str(), bufs[i], rows, row_bytes, stride, writable);
  }

  const uint32_t nlaunch = in.get<uint32_t>();
  std::string log;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> kernels(nlaunch);
  for (uint32_t li = 0; li < nlaunch; ++li) {
    kernels[li] = in.str();
    const std::string& name = kernels[li];
    dim3 grid, block;
    grid.x = in.get<uint32_t>();
    block.x = in.get<uint32_t>();
    const uint32_t smem = in.get<uint32_t>();
    const uint32_t nargs = in.get<uint32_t>();
    const char* args = in.bytes(nargs);
    g_kernel = nullptr;
    for (const Named& k : kKernels)
      if (name == k.name) g_kernel = &k;
    if (!g_kernel) sim::fail("no kernel %s", name.c_str());
    if (g_kernel->route) {
      g_route = patch<DkMoeRouteArgs>(args, nargs, 9, bufs);
    } else {
      g_rows = patch<DkMoeRowsArgs>(args, nargs, 7, bufs);
    }
    const long c0 = sim::S.collectives, b0 = sim::S.barriers, k0 = sim::S.blocks;
    sim::launch(name.c_str(), entry, grid, block, smem);
    char line[256];
    snprintf(line, sizeof line, "%s%s<<<%u, %u>>> %ld blocks, %ld collectives, %ld __syncthreads",
             li ? "; " : "", name.c_str(), grid.x, block.x, sim::S.blocks - k0,
             sim::S.collectives - c0, sim::S.barriers - b0);
    log += line;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fprintf(stderr, "%s (%.2fs)\n", log.c_str(), secs);
  for (uint32_t i = 0; i < nbufs; ++i) {
    if (sizes[i] && fwrite(bufs[i], 1, sizes[i], stdout) != sizes[i]) sim::fail("short write");
  }
  fflush(stdout);
  return 0;
}
