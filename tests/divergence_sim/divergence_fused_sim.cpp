// Driver of the fused chunk kernel emulator (tests/divergence_fused_sim.rs): compiles the REAL
// cuda/divergence.cu (staged by the test: static __shared__ arrays rewritten to sim_core.h's SIM_SHARED)
// against the host emulator of tests/attention_sim/sim_core.h (every CUDA
// thread a fiber, warp collectives, __syncthreads, guarded memory) and runs one launch of one
// dk_div_fused_<kind>_<dtype> kernel: a chunk's f32 logits S (student) and T (teacher), and G,
// the gradient in the output dtype, written over S row by row (cuda/divergence.cu,
// FusedGradSink). The point is that in-place write: its stores land in bytes of S that other
// threads read, so the emulator's thread orders (ascending, descending) show a missing barrier
// as a difference between the two runs and against the reference.
//
// __CUDA_ARCH__ and the math helpers are arranged in divergence_cu.h (as in
// divergence_persistent_sim.cpp: dk_math.cuh keeps its host versions).
//
// Protocol (binary, native endianness), one launch per process:
//   stdin:  u32 magic 0x46444b44 ("DKDF"); str kernel name (e.g. dk_div_fused_jsd_bf16);
//           i32 reverse order; i64 n, v, ld (row stride of S and T, f32 elements),
//           ignore_index; f32 beta, inv_temperature, scale, inv_cap; i32 grad (0: forward
//           only), i32 has_labels;
//           buffers, each u64 bytes + bytes: S, T, [labels if has_labels], per_row
//   (str = u32 length + bytes).
//   stdout: S (holding G in the first bytes of each row when grad), T and per_row after the
//           launch.
//   stderr: statistics, or "EMULATOR ERROR: ..." and exit status 3 (a check failed) or 4 (a
//           guard region was hit).
#include <string>

#include "divergence_cu.h"

namespace {

using sim::Reader;

using Kernel = void (*)(const DkDivergenceArgs, float);
struct Named {
  const char* name;
  Kernel fn;
};

#define DK_SIM_K(k, o) {"dk_div_fused_" #k "_" #o, dk_div_fused_##k##_##o},
#define DK_SIM_KIND(k) DK_SIM_K(k, f32) DK_SIM_K(k, bf16) DK_SIM_K(k, f16)
const Named kKernels[] = {DK_SIM_KIND(fkl) DK_SIM_KIND(rkl) DK_SIM_KIND(jsd) DK_SIM_KIND(jsdx)};
#undef DK_SIM_KIND
#undef DK_SIM_K

DkDivergenceArgs g_args;
float g_inv_cap;
Kernel g_fn;
void entry() { g_fn(g_args, g_inv_cap); }

}  // namespace

int main() {
  sim::install_fault_handler();
  check_host_math();
  Reader in = Reader::from_stdin();
  if (in.get<uint32_t>() != 0x46444b44u) sim::fail("bad magic");
  const std::string name = in.str();
  sim::S.reverse = in.get<int32_t>() != 0;
  DkDivergenceArgs a;
  memset(&a, 0, sizeof a);
  a.n = in.get<int64_t>();
  a.v = in.get<int64_t>();
  const int64_t ld = in.get<int64_t>();
  a.ignore_index = in.get<int64_t>();
  a.beta = in.get<float>();
  a.inv_temperature = in.get<float>();
  const float scale = in.get<float>();
  g_inv_cap = in.get<float>();
  const bool grad = in.get<int32_t>() != 0;
  const bool has_labels = in.get<int32_t>() != 0;
  g_fn = nullptr;
  for (const Named& k : kKernels)
    if (name == k.name) g_fn = k.fn;
  if (!g_fn) sim::fail("no kernel %s", name.c_str());
  const int64_t gb = name.find("_f32") != std::string::npos ? 4 : 2;  // bytes of a G element

  sim::Buffers bufs;
  auto take = [&](const char* what, bool returned = true) { return bufs.take(in, what, returned); };
  char* s = take("S");
  char* t = take("T");
  char* labels = has_labels ? take("labels", false) : nullptr;
  char* per_row = take("per_row");
  char* scale_p = sim::alloc_global(4, "scale");
  memcpy(scale_p, &scale, 4);

  // Operand extents: every access inside one row of one of them. S is writable when G goes over
  // it (G's rows are its first v · sizeof(G) bytes, inside S's v · 4).
  const int64_t n = a.n, v = a.v;
  sim::add_extent(grad ? "S (G written over it)" : "S", s, n, v * 4, ld * 4, grad);
  sim::add_extent("T", t, n, v * 4, ld * 4, false);
  if (labels) sim::add_extent("labels", labels, 1, n * 8, n * 8, false);
  sim::add_extent("per_row", per_row, 1, n * 4, n * 4, true);
  sim::add_extent("scale", scale_p, 1, 4, 4, false);

  a.student = reinterpret_cast<uint64_t>(s);
  a.teacher = reinterpret_cast<uint64_t>(t);
  a.student_stride = ld;
  a.teacher_stride = ld;
  a.grad = grad ? reinterpret_cast<uint64_t>(s) : 0;
  a.grad_stride = ld * 4 / gb;  // S's row bytes, in G elements
  a.labels = reinterpret_cast<uint64_t>(labels);
  a.per_row = reinterpret_cast<uint64_t>(per_row);
  a.scale = reinterpret_cast<uint64_t>(scale_p);
  g_args = a;

  dim3 grid, block;
  grid.x = static_cast<unsigned>(n);
  block.x = static_cast<unsigned>(dk::divergence::kThreads);
  sim::launch(name.c_str(), entry, grid, block, 0);
  fprintf(stderr, "%s: %ld blocks x %d threads: %ld warp collectives, %ld __syncthreads\n",
          name.c_str(), static_cast<long>(n), dk::divergence::kThreads, sim::S.collectives,
          sim::S.barriers);
  bufs.write_back();
  return 0;
}
