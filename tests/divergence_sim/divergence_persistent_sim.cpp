// Driver of the persistent divergence kernel emulator (tests/divergence_persistent_sim.rs):
// compiles the REAL cuda/divergence_persistent.cu and cuda/divergence_staged.cu (staged by the
// test next to this directory's dk_cluster.cuh; dk_mma.cuh, for the staged kernels' cp.async,
// comes from tests/attention_sim) against the host emulator of
// tests/attention_sim/sim_core.h (every CUDA thread a fiber, warp collectives, __syncthreads,
// thread-block clusters with a split barrier and distributed shared memory, guarded memory;
// see there for what is and is not modelled) and runs one launch of one dk_divcp_* /
// dk_divcp256_* / dk_divcq_* kernel on the buffers it is given: a divergence kernel
// (dk_divcp[256]_<kind>_<student>_<teacher>, dk_divcq_<kind>_<student>_<teacher>: the staged
// kernels, whose dynamic shared memory must be their scratch plus two slices of both inputs,
// as the launcher sizes it) or a fused linear divergence chunk kernel
// (dk_divcp[256]_fused_<kind>_<G dtype>: f32 S and T, G with the softcap slope, written
// `shift` rows before S in S's own buffer, grad mode 3 below).
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
//           i32 threads, cluster C, clusters Q, dynamic shared bytes, reverse order (which
//           also lands cp.async copies late: only at the wait that forces them);
//           i64 n, v, student_stride, teacher_stride, grad_stride, ignore_index;
//           f32 beta, inv_temperature, scale (the f32 the prepare kernel would write),
//           inv_cap (the fused kernels' softcap argument; 0 for the others);
//           i32 grad mode (0 forward only, 1 separate buffer, 2 in place over the student,
//           3 the fused kernels' G `shift` rows before S: see below), i32 shift (0 unless
//           mode 3), i32 has_labels; u32 options (the arguments' DK_ARGS_* bits: the staged
//           JSD kernels' stash, whose slices add to the shared memory: 4 bytes per slice
//           element for log2(q/m) with a 16-bit teacher, 8 with the kept exponentials);
//           buffers, each u64 bytes + bytes: student, teacher, [grad if mode 1],
//           [labels if has_labels], per_row
//   (str = u32 length + bytes).
//   Mode 3 (fused kernels only; modes 0 and 3 are theirs): the student buffer holds `shift`
//   rows of pad, then S's n rows (row stride student_stride f32 elements); args.student points
//   at S, args.grad at the buffer's start and args.grad_stride is S's row bytes in G elements
//   (the grad_stride field is ignored), so G row r goes over the bytes of S row r − shift (the
//   pad for r < shift): what the launcher does with shift = Q, the clusters. S's rows are a
//   read-only extent and G's rows (the first v · sizeof(G) bytes of each) a store-only one
//   over them (sim::add_store_extent): a load of the pad or a store into S outside G's rows
//   is an error. After the launch, every 16-byte chunk of G's rows up to the last full chunk
//   of 8 elements must have been stored exactly once (the scalar tail: the test's check).
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
#define dk_divcq_smem (*sim_divcp_smem())

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
#include "divergence_staged.cu"
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
using FusedKernel = void (*)(const DkDivergenceArgs, float);
struct NamedFused {
  const char* name;
  FusedKernel fn;
};

#define DK_SIM_K(k, s, t) {"dk_divcp_" #k "_" #s "_" #t, dk_divcp_##k##_##s##_##t}, \
                          {"dk_divcp256_" #k "_" #s "_" #t, dk_divcp256_##k##_##s##_##t},
#define DK_SIM_KIND(k)                                                              \
  DK_SIM_K(k, f32, f32) DK_SIM_K(k, f32, bf16) DK_SIM_K(k, f32, f16)                \
  DK_SIM_K(k, bf16, f32) DK_SIM_K(k, bf16, bf16) DK_SIM_K(k, bf16, f16)             \
  DK_SIM_K(k, f16, f32) DK_SIM_K(k, f16, bf16) DK_SIM_K(k, f16, f16)
const Named kKernels[] = {DK_SIM_KIND(fkl) DK_SIM_KIND(rkl) DK_SIM_KIND(jsd) DK_SIM_KIND(jsdx)};
#undef DK_SIM_KIND
#undef DK_SIM_K

// The staged kernels (divergence_staged.cu, version 9): one 512-thread shape.
#define DK_SIM_K(k, s, t) {"dk_divcq_" #k "_" #s "_" #t, dk_divcq_##k##_##s##_##t},
#define DK_SIM_KIND(k)                                                              \
  DK_SIM_K(k, f32, f32) DK_SIM_K(k, f32, bf16) DK_SIM_K(k, f32, f16)                \
  DK_SIM_K(k, bf16, f32) DK_SIM_K(k, bf16, bf16) DK_SIM_K(k, bf16, f16)             \
  DK_SIM_K(k, f16, f32) DK_SIM_K(k, f16, bf16) DK_SIM_K(k, f16, f16)
const Named kStagedKernels[] = {DK_SIM_KIND(fkl) DK_SIM_KIND(rkl) DK_SIM_KIND(jsd)
                                    DK_SIM_KIND(jsdx)};
#undef DK_SIM_KIND
#undef DK_SIM_K

#define DK_SIM_K(k, o) {"dk_divcp_fused_" #k "_" #o, dk_divcp_fused_##k##_##o}, \
                       {"dk_divcp256_fused_" #k "_" #o, dk_divcp256_fused_##k##_##o},
#define DK_SIM_KIND(k) DK_SIM_K(k, f32) DK_SIM_K(k, bf16) DK_SIM_K(k, f16)
const NamedFused kFusedKernels[] = {DK_SIM_KIND(fkl) DK_SIM_KIND(rkl) DK_SIM_KIND(jsd) DK_SIM_KIND(jsdx)};
#undef DK_SIM_KIND
#undef DK_SIM_K

#define DK_SIM_K(k, o) {"dk_divcq_fused_" #k "_" #o, dk_divcq_fused_##k##_##o},
#define DK_SIM_KIND(k) DK_SIM_K(k, f32) DK_SIM_K(k, bf16) DK_SIM_K(k, f16)
const NamedFused kStagedFusedKernels[] = {DK_SIM_KIND(fkl) DK_SIM_KIND(rkl) DK_SIM_KIND(jsd)
                                              DK_SIM_KIND(jsdx)};
#undef DK_SIM_KIND
#undef DK_SIM_K

DkDivergenceArgs g_args;
Kernel g_fn;
FusedKernel g_fused_fn;
float g_inv_cap;
void entry() {
  if (g_fused_fn) {
    g_fused_fn(g_args, g_inv_cap);
  } else {
    g_fn(g_args);
  }
}

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
  g_inv_cap = in.get<float>();
  const int grad_mode = in.get<int32_t>();
  const int64_t shift = in.get<int32_t>();
  const bool has_labels = in.get<int32_t>() != 0;
  a.options = in.get<uint32_t>();
  g_fn = nullptr;
  g_fused_fn = nullptr;
  for (const Named& k : kKernels)
    if (name == k.name) g_fn = k.fn;
  bool staged = false;
  for (const Named& k : kStagedKernels)
    if (name == k.name) g_fn = k.fn, staged = true;
  for (const NamedFused& k : kFusedKernels)
    if (name == k.name) g_fused_fn = k.fn;
  for (const NamedFused& k : kStagedFusedKernels)
    if (name == k.name) g_fused_fn = k.fn, staged = true;
  if (!g_fn && !g_fused_fn) sim::fail("no kernel %s", name.c_str());
  const bool fused = g_fused_fn != nullptr;
  if (fused ? grad_mode != 0 && grad_mode != 3 : grad_mode < 0 || grad_mode > 2)
    sim::fail("grad mode %d for %s", grad_mode, name.c_str());
  if (!fused && g_inv_cap != 0.f) sim::fail("inv_cap %g for %s", g_inv_cap, name.c_str());
  if (grad_mode == 3 ? shift < 0 : shift != 0)
    sim::fail("shift %ld in grad mode %d", static_cast<long>(shift), grad_mode);
  if (smem < sizeof(dk::divergence::ClusterScratch<dk::divergence::Kind::Jsd>))
    sim::fail("%u bytes of dynamic shared memory, the kernel's ClusterScratch needs more", smem);
  // The descending run also lands cp.async copies late (only at the wait that forces them; the
  // staged kernels' copies of the next rows): a read of a chunk whose copy is in flight is an
  // error, and the two runs must still agree bitwise.
  sim::S.late_copies = sim::S.reverse;

  // Bytes of a student, teacher and gradient element (the fused kernels: f32 S and T, G named
  // last).
  const bool s16 = name.find("_bf16_") != std::string::npos || name.find("_f16_") != std::string::npos;
  const char* tail = name.c_str() + name.rfind('_') + 1;
  const int64_t last = strcmp(tail, "f32") == 0 ? 4 : 2;
  const int64_t sb = fused ? 4 : s16 ? 2 : 4, tb = fused ? 4 : last, gb = fused ? last : sb;
  const bool jsd = name.find("_jsd") != std::string::npos;
  if ((a.options & ~(DK_ARGS_STASH_JSD | DK_ARGS_STASH_JSD_EXP)) != 0 ||
      (a.options & DK_ARGS_STASH_JSD_EXP && !(a.options & DK_ARGS_STASH_JSD)) ||
      (a.options != 0 && !(staged && jsd)))
    sim::fail("options %u for %s (the staged JSD kernels' stash only)", a.options, name.c_str());
  if (staged) {
    // The kernels' scratch, then two buffers of both inputs' slices, then the JSD stash's slice
    // when it is kept (DK_ARGS_STASH_JSD, a gradient) and the teacher's is not f32
    // (staged_smem_bytes in src/divergence/cluster.rs); with DK_ARGS_STASH_JSD_EXP, two f32
    // slices whatever the teacher, with a gradient or forward only (version 12).
    const int64_t slice = dk::divergence::cluster_slice(static_cast<int>(a.v), cluster);
    const bool stash = (a.options & DK_ARGS_STASH_JSD) != 0 && grad_mode != 0;
    const int64_t stash_bytes = (a.options & DK_ARGS_STASH_JSD_EXP) != 0 ? 8
                                : !stash                                ? 0
                                : tb == 2                               ? 4
                                                                        : 0;
    const int64_t need = dk::divergence::kClusterScratchBytes + slice * (2 * (sb + tb) + stash_bytes);
    if (smem != need)
      sim::fail("%u bytes of dynamic shared memory for %s, the launcher gives %ld", smem,
                name.c_str(), static_cast<long>(need));
  }

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
  // and each 16-byte output chunk at most once; loads: a readable one).
  const int64_t n = a.n, v = a.v;
  char* const s_rows = student + shift * a.student_stride * sb;  // S after the pad (mode 3)
  sim::add_extent(grad_mode == 2 ? "student (gradient in place)" : "student", s_rows, n, v * sb,
                  a.student_stride * sb, grad_mode == 2);
  if (grad_mode == 3)
    sim::add_store_extent(shift > 0 ? "G (rows before S's)" : "G (over S's own rows)", student, n,
                          v * gb, a.student_stride * sb);
  sim::add_extent("teacher", teacher, n, v * tb, a.teacher_stride * tb, false);
  if (grad) sim::add_extent("grad", grad, n, v * sb, a.grad_stride * sb, true);
  if (labels) sim::add_extent("labels", labels, 1, n * 8, n * 8, false);
  sim::add_extent("per_row", per_row, 1, n * 4, n * 4, true);
  sim::add_extent("scale", scale_p, 1, 4, 4, false);

  a.student = reinterpret_cast<uint64_t>(s_rows);
  a.teacher = reinterpret_cast<uint64_t>(teacher);
  a.grad = grad_mode == 0 ? 0 : reinterpret_cast<uint64_t>(grad_mode == 1 ? grad : student);
  if (grad_mode == 2) a.grad_stride = a.student_stride;
  if (grad_mode == 3) a.grad_stride = a.student_stride * sb / gb;  // S's row bytes
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
  if (grad_mode == 3) {
    // Every 16-byte chunk of G's rows before the scalar tail stored once (the extent check
    // allows at most once).
    const sim::Alloc* buf = sim::alloc_of(student);
    const int64_t chunks = v / 8 * 8 * gb / 16;
    for (int64_t r = 0; r < n; ++r) {
      const size_t first = static_cast<size_t>(student + r * a.student_stride * sb - buf->lo) / 16;
      for (int64_t k = 0; k < chunks; ++k) {
        const size_t at = first + static_cast<size_t>(k);
        if (at >= buf->stores.size() || buf->stores[at] != 1)
          sim::fail("G row %ld bytes %ld..%ld: not written", static_cast<long>(r),
                    static_cast<long>(16 * k), static_cast<long>(16 * k + 15));
      }
    }
  }
  bufs.write_back();
  return 0;
}
