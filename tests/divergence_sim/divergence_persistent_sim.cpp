// Driver of the persistent divergence kernel emulator (tests/divergence_persistent_sim.rs):
// compiles the REAL cuda/divergence_persistent.cu (staged by the test next to this directory's
// dk_cluster.cuh, the only header replaced) against the host emulator of
// tests/attention_sim/sim_core.h (every CUDA thread a fiber, warp collectives, __syncthreads,
// thread-block clusters with a split barrier and distributed shared memory, guarded memory;
// see there for what is and is not modelled) and runs one launch of one dk_divcp_* /
// dk_divcp256_* kernel on the buffers it is given.
//
// __CUDA_ARCH__ and the math helpers: the kernel body is compiled only under
// `#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900`, while dk_math.cuh picks its inline PTX
// (ex2.approx, lg2.approx) under `#ifdef __CUDA_ARCH__` and otherwise its host versions (exact
// exp2 / log2 with the device's flush to zero and the same rounded products: the ones
// tests/kernel_sim uses). So this file includes the headers first, with __CUDACC__ defined (as
// nvcc does in both passes: the RowStats shuffles, CUDA's float2) and __CUDA_ARCH__ not yet
// defined, which fixes their host versions (#pragma once), then defines __CUDA_ARCH__ 900 for
// the kernel file alone. The PTX could not slip in unnoticed: the host assembler rejects it.
//
// Protocol (binary, native endianness), one launch per process:
//   stdin:  u32 magic 0x50444b44 ("DKDP"); str kernel name (e.g. dk_divcp256_jsd_bf16_f32);
//           i32 threads, cluster C, clusters Q, dynamic shared bytes, reverse order;
//           i64 n, v, student_stride, teacher_stride, grad_stride, ignore_index;
//           f32 beta, inv_temperature, scale (the f32 the prepare kernel would write);
//           i32 grad mode (0 forward only, 1 separate buffer, 2 in place over the student),
//           i32 has_labels;
//           buffers, each u64 bytes + bytes: student, teacher, [grad if mode 1],
//           [labels if has_labels], per_row
//   (str = u32 length + bytes).
//   stdout: the same buffers after the launch, in the same order and sizes.
//   stderr: statistics, or "EMULATOR ERROR: ..." and exit status 3 (a check failed) or 4 (a
//           guard region was hit).
#include "sim_impl.h"

#include <chrono>
#include <string>

// The kernel's `extern __shared__ unsigned char dk_divcp_smem[]` (declared inside
// dk::divergence::persistent_rows) becomes a call returning the running block's guarded
// dynamic shared memory.
namespace dk {
namespace divergence {
unsigned char (*sim_divcp_smem())[];
unsigned char (*sim_divcp_smem())[] { return reinterpret_cast<unsigned char(*)[]>(sim::S.smem); }
}  // namespace divergence
}  // namespace dk
#define dk_divcp_smem (*sim_divcp_smem())

#define __CUDACC__ 1
#include "dk_math.cuh"
#include "dk_divergence_math.cuh"
#include "dk_reduce.cuh"
#include "dk_vec.cuh"
#include "dk_divergence_passes.cuh"
#include "dk_divergence_args.h"
#include "host_math_check.h"

#define __CUDA_ARCH__ 900
#include "divergence_persistent.cu"
#undef __CUDA_ARCH__
#undef __CUDACC__

#ifndef DK_DIVERGENCE_SIM_CLUSTER_SHIM
#error "the kernel was compiled against the real dk_cluster.cuh instead of the emulator's"
#endif

namespace {

using sim::Reader;

using Kernel = void (*)(const DkDivergenceArgs);
struct Named {
  const char* name;
  Kernel fn;
};

#define DK_SIM_K(k, s, t) {"dk_divcp_" #k "_" #s "_" #t, dk_divcp_##k##_##s##_##t}, \
                          {"dk_divcp256_" #k "_" #s "_" #t, dk_divcp256_##k##_##s##_##t},
#define DK_SIM_KIND(k)                                                              \
  DK_SIM_K(k, f32, f32) DK_SIM_K(k, f32, bf16) DK_SIM_K(k, f32, f16)                \
  DK_SIM_K(k, bf16, f32) DK_SIM_K(k, bf16, bf16) DK_SIM_K(k, bf16, f16)             \
  DK_SIM_K(k, f16, f32) DK_SIM_K(k, f16, bf16) DK_SIM_K(k, f16, f16)
const Named kKernels[] = {DK_SIM_KIND(fkl) DK_SIM_KIND(rkl) DK_SIM_KIND(jsd)};
#undef DK_SIM_KIND
#undef DK_SIM_K

DkDivergenceArgs g_args;
Kernel g_fn;
void entry() { g_fn(g_args); }

}  // namespace

int main() {
  sim::install_fault_handler();
  check_host_math();
  Reader in = Reader::from_stdin();
  if (in.get<uint32_t>() != 0x50444b44u) sim::fail("bad magic");
  const std::string name = in.str();
  const int threads = in.get<int32_t>(), cluster = in.get<int32_t>(), clusters = in.get<int32_t>();
  const uint32_t smem = in.get<uint32_t>();
  sim::S.reverse = in.get<int32_t>() != 0;
  DkDivergenceArgs a;
  memset(&a, 0, sizeof a);
  a.n = in.get<int64_t>();
  a.v = in.get<int64_t>();
  a.student_stride = in.get<int64_t>();
  a.teacher_stride = in.get<int64_t>();
  a.grad_stride = in.get<int64_t>();
  a.ignore_index = in.get<int64_t>();
  a.beta = in.get<float>();
  a.inv_temperature = in.get<float>();
  const float scale = in.get<float>();
  const int grad_mode = in.get<int32_t>();
  const bool has_labels = in.get<int32_t>() != 0;
  g_fn = nullptr;
  for (const Named& k : kKernels)
    if (name == k.name) g_fn = k.fn;
  if (!g_fn) sim::fail("no kernel %s", name.c_str());
  if (smem < sizeof(dk::divergence::PersistentSmem<dk::divergence::Kind::Jsd>))
    sim::fail("%u bytes of dynamic shared memory, the kernel's PersistentSmem needs more", smem);

  const bool s16 = name.find("_bf16_") != std::string::npos || name.find("_f16_") != std::string::npos;
  const char* tail = name.c_str() + name.rfind('_') + 1;
  const int64_t sb = s16 ? 2 : 4, tb = strcmp(tail, "f32") == 0 ? 4 : 2;

  sim::Buffers bufs;
  auto take = [&](const char* what, bool returned = true) { return bufs.take(in, what, returned); };
  char* student = take("student");
  char* teacher = take("teacher");
  char* grad = grad_mode == 1 ? take("grad") : nullptr;
  char* labels = has_labels ? take("labels") : nullptr;
  char* per_row = take("per_row");
  char* scale_p = sim::alloc_global(4, "scale");
  memcpy(scale_p, &scale, 4);

  // Operand extents: accesses must lie inside one row of one of them (stores: a writable one,
  // and each 16-byte output chunk at most once).
  const int64_t n = a.n, v = a.v;
  sim::add_extent(grad_mode == 2 ? "student (gradient in place)" : "student", student, n, v * sb,
                  a.student_stride * sb, grad_mode == 2);
  sim::add_extent("teacher", teacher, n, v * tb, a.teacher_stride * tb, false);
  if (grad) sim::add_extent("grad", grad, n, v * sb, a.grad_stride * sb, true);
  if (labels) sim::add_extent("labels", labels, 1, n * 8, n * 8, false);
  sim::add_extent("per_row", per_row, 1, n * 4, n * 4, true);
  sim::add_extent("scale", scale_p, 1, 4, 4, false);

  a.student = reinterpret_cast<uint64_t>(student);
  a.teacher = reinterpret_cast<uint64_t>(teacher);
  a.grad = grad_mode == 0 ? 0 : reinterpret_cast<uint64_t>(grad_mode == 1 ? grad : student);
  if (grad_mode == 2) a.grad_stride = a.student_stride;
  a.labels = reinterpret_cast<uint64_t>(labels);
  a.per_row = reinterpret_cast<uint64_t>(per_row);
  a.scale = reinterpret_cast<uint64_t>(scale_p);
  g_args = a;

  const auto t0 = std::chrono::steady_clock::now();
  dim3 grid, block;
  grid.x = static_cast<unsigned>(clusters * cluster);
  block.x = static_cast<unsigned>(threads);
  sim::launch(name.c_str(), entry, grid, block, smem, static_cast<unsigned>(cluster));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fprintf(stderr,
          "%s: %d clusters x %d blocks x %d threads, %u B shared: %ld warp collectives, %ld "
          "__syncthreads, %ld cluster barrier phases, %.2fs\n",
          name.c_str(), clusters, cluster, threads, smem, sim::S.collectives, sim::S.barriers,
          sim::S.cluster_barriers, secs);
  bufs.write_back();
  return 0;
}
