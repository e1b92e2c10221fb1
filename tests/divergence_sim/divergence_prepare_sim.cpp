// Driver of the loss-scale and loss-sum emulator (tests/divergence_prepare_sim.rs): compiles the
// REAL cuda/divergence.cu (staged by the test: static __shared__ arrays rewritten to sim_core.h's
// SIM_SHARED) against the host emulator of tests/attention_sim/sim_core.h and runs its two
// one-block kernels as the launcher does (src/divergence/cuda.rs: one block of 1024 threads):
// dk_div_prepare (the loss scale: 1 / #valid rows, 1 / num_items as a parameter or in device
// memory, or 1) and, when asked, dk_div_finish (loss = scale · Σ per_row, summed in f64).
//
// The kernel file through divergence_cu.h, as divergence_fused_sim.cpp includes it.
//
// Protocol (binary, native endianness), one launch pair per process:
//   stdin:  u32 magic 0x53444b44 ("DKDS"); i32 reverse order; i64 n, ignore_index;
//           i32 reduction (DK_ARGS_REDUCTION_*); f32 num_items (the parameter); i32 has_mem;
//           f32 the value in device memory (read when has_mem); i32 has_labels; i32 finish;
//           buffers, each u64 bytes + bytes: [labels (n i64) if has_labels], [per_row (n f32)
//           if finish].
//   stdout: the scale (f32), then the loss (f32) when finish.
//   stderr: statistics, or "EMULATOR ERROR: ..." and exit status 3 or 4.
#include "divergence_cu.h"

namespace {

using sim::Reader;

struct Prepare {
  const int64_t* labels;
  int64_t n, ignore_index;
  int reduction;
  float num_items;
  const float* num_items_mem;
  float* scale;
} g_prepare;

struct Finish {
  const float* per_row;
  int64_t n;
  const float* scale;
  float* loss;
} g_finish;

void prepare_entry() {
  const Prepare& p = g_prepare;
  dk_div_prepare(p.labels, p.n, p.ignore_index, p.reduction, p.num_items, p.num_items_mem,
                 p.scale);
}

void finish_entry() { dk_div_finish(g_finish.per_row, g_finish.n, g_finish.scale, g_finish.loss); }

}  // namespace

int main() {
  sim::install_fault_handler();
  check_host_math();
  Reader in = Reader::from_stdin();
  if (in.get<uint32_t>() != 0x53444b44u) sim::fail("bad magic");
  sim::S.reverse = in.get<int32_t>() != 0;
  Prepare p;
  p.n = in.get<int64_t>();
  p.ignore_index = in.get<int64_t>();
  p.reduction = in.get<int32_t>();
  p.num_items = in.get<float>();
  const bool has_mem = in.get<int32_t>() != 0;
  const float mem_value = in.get<float>();
  const bool has_labels = in.get<int32_t>() != 0;
  const bool finish = in.get<int32_t>() != 0;

  sim::Buffers bufs;
  char* labels = has_labels ? bufs.take(in, "labels", false) : nullptr;
  char* per_row = finish ? bufs.take(in, "per_row", false) : nullptr;
  char* mem = nullptr;
  if (has_mem) {
    mem = sim::alloc_global(4, "num_items_mem");
    memcpy(mem, &mem_value, 4);
  }
  // Poisoned outputs: a kernel that does not write them returns NaN bits.
  char* scale = sim::alloc_global(4, "scale");
  char* loss = sim::alloc_global(4, "loss");
  memset(scale, 0xff, 4);
  memset(loss, 0xff, 4);

  p.labels = reinterpret_cast<const int64_t*>(labels);
  p.num_items_mem = reinterpret_cast<const float*>(mem);
  p.scale = reinterpret_cast<float*>(scale);
  g_prepare = p;
  dim3 grid, block;
  grid.x = 1;
  block.x = 1024;
  sim::launch("dk_div_prepare", prepare_entry, grid, block, 0);
  if (finish) {
    g_finish = {reinterpret_cast<const float*>(per_row), p.n, reinterpret_cast<float*>(scale),
                reinterpret_cast<float*>(loss)};
    sim::launch("dk_div_finish", finish_entry, grid, block, 0);
  }
  fprintf(stderr, "n %ld: %ld warp collectives, %ld __syncthreads\n", static_cast<long>(p.n),
          sim::S.collectives, sim::S.barriers);
  if (fwrite(scale, 1, 4, stdout) != 4 || (finish && fwrite(loss, 1, 4, stdout) != 4))
    sim::fail("short write");
  fflush(stdout);
  return 0;
}
