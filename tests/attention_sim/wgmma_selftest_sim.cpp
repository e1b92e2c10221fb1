// Driver that runs the REAL hardware self-test kernels of cuda/attention_wgmma_selftest.cu
// (dk_wgmma_selftest_ss_bf16, dk_wgmma_selftest_rs_bf16; staged by tests/attention_kernel_sim.rs,
// wgmma_selftest_kernels_on_the_emulator, next to the emulator's dk_mma.cuh and dk_wgmma.cuh, as
// the attention kernels are) on the emulator, with the launch of the Rust unit test
// `wgmma_layouts_on_the_device` (src/attention/cuda/selftest.rs): one block of 128 threads,
// 1024 + 2 · 64 · 128 · 2 bytes of dynamic shared memory. The kernels' own logic (tile loads,
// descriptors, the gather of P into A fragments, the store of the accumulators) is checked here
// against the emulator's reading of the PTX ISA layouts, so that a failure of the unit test on a
// GPU can only mean that reading is wrong.
//
// Usage: wgmma_selftest_sim LATE REVERSE BASE [LBO SBO SMEM]. LATE: the cp.async / wgmma timing
// model (0 EAGER, 1 LATE, sim_core.h); REVERSE: descending lane and warp order; BASE: the shared
// address of the dynamic shared memory's first byte (0, or a multiple of 16 below 1024: the
// kernels align their tiles to 1024 bytes within the 1 KiB of slack themselves); LBO, SBO: the
// descriptors' byte offsets both kernels take (default 0 0: the attention kernels' own
// descriptors); SMEM: the launch's dynamic shared memory (default the unit test's 33 KiB; the
// unit test's offset sweep launches with more).
// Protocol (binary, native endianness):
//   stdin:  u32 magic 0x54534b44 ("DKST"); a, b: 64 × 128 bf16 bits each (row-major, u16);
//           p: 64 × 64 f32; v: 64 × 128 bf16 bits.
//   stdout: c of ss (64 × 64 f32), then c of rs (64 × 128 f32), every element poisoned with a
//           NaN before its launch (an element the kernel does not write stays NaN).
//   stderr: statistics, or "EMULATOR ERROR: ..." and exit status 3 (a check failed) or 4 (a
//           guard page was hit). Exit status 2: usage.
#include "sim_impl.h"

#include <string>

// The kernels' `extern __shared__ unsigned char dk_wgmma_selftest_smem[]` becomes a call
// returning the launch's guarded dynamic shared memory (as in attention_sim.cpp).
#define dk_wgmma_selftest_smem (*sim_selftest_smem())
unsigned char (*sim_selftest_smem())[];
unsigned char (*sim_selftest_smem())[] { return reinterpret_cast<unsigned char(*)[]>(sim::S.smem); }

#include "attention_wgmma_selftest.cu"

#ifndef DK_ATTENTION_SIM_WGMMA_SHIM
#error "the self-test was compiled against the real dk_wgmma.cuh instead of the emulator's"
#endif
#ifndef DK_ATTENTION_SIM_MMA_SHIM
#error "the self-test was compiled against the real dk_mma.cuh instead of the emulator's"
#endif

namespace {

// The unit test's launch: one block of 128 threads and this much dynamic shared memory.
constexpr uint32_t kSmemBytes = 1024 + 2 * 64 * 128 * 2;
constexpr uint32_t kMagic = 0x54534b44u;

const void* g_a;
const void* g_b;
const float* g_p;
const void* g_v;
float* g_c;

uint32_t g_lbo = 0, g_sbo = 0, g_smem = kSmemBytes;

void ss_entry() { dk_wgmma_selftest_ss_bf16(g_a, g_b, g_c, g_lbo, g_sbo); }
void rs_entry() { dk_wgmma_selftest_rs_bf16(g_p, g_v, g_c, g_lbo, g_sbo); }

// An input matrix of rows × cols elements of `elem` bytes from stdin into guarded global memory,
// registered as an extent (cp.async sources must lie inside one of its rows).
char* input(sim::Reader& in, const char* name, int rows, int cols, int elem) {
  const size_t row_bytes = static_cast<size_t>(cols) * elem, bytes = rows * row_bytes;
  char* p = sim::alloc_global(bytes, name);
  memcpy(p, in.bytes(bytes), bytes);
  sim::add_extent(name, p, rows, row_bytes, row_bytes, false);
  return p;
}

// Launches one kernel on a fresh NaN-poisoned output of rows × cols f32 and writes it to stdout.
void run(const char* name, void (*entry)(), int rows, int cols) {
  const size_t bytes = static_cast<size_t>(rows) * cols * 4;
  char* c = sim::alloc_global(bytes, name);
  memset(c, 0xff, bytes);
  sim::add_extent(name, c, rows, cols * 4, cols * 4, true);
  g_c = reinterpret_cast<float*>(c);
  const long w0 = sim::S.wgmmas, c0 = sim::S.collectives;
  sim::launch(name, entry, dim3{1, 1, 1}, dim3{128, 1, 1}, g_smem);
  fprintf(stderr, "%s (%s, %s order, shared memory at %u): %ld warp collectives (%ld warp wgmma)\n",
          name, sim::S.late_copies ? "late" : "eager", sim::S.reverse ? "descending" : "ascending",
          sim::S.smem_base, sim::S.collectives - c0, sim::S.wgmmas - w0);
  if (fwrite(c, 1, bytes, stdout) != bytes) sim::fail("short write");
}

}  // namespace

int main(int argc, char** argv) {
  sim::install_fault_handler();
  if (argc != 4 && argc != 7) {
    fprintf(stderr, "usage: wgmma_selftest_sim LATE REVERSE BASE [LBO SBO SMEM]\n");
    return 2;
  }
  if (argc == 7) {
    g_lbo = static_cast<uint32_t>(atol(argv[4]));
    g_sbo = static_cast<uint32_t>(atol(argv[5]));
    g_smem = static_cast<uint32_t>(atol(argv[6]));
    if (g_smem < kSmemBytes) {
      fprintf(stderr, "SMEM must be at least %u, not %s\n", kSmemBytes, argv[6]);
      return 2;
    }
  }
  sim::S.late_copies = atoi(argv[1]) != 0;
  sim::S.reverse = atoi(argv[2]) != 0;
  const long base = atol(argv[3]);
  if (base < 0 || base >= 1024 || base % 16 != 0) {
    fprintf(stderr, "BASE must be a multiple of 16 in [0, 1024), not %s\n", argv[3]);
    return 2;
  }
  sim::S.smem_base = static_cast<uint32_t>(base);
  sim::Reader in = sim::Reader::from_stdin();
  if (in.get<uint32_t>() != kMagic) sim::fail("bad magic");
  g_a = input(in, "a", 64, 128, 2);
  g_b = input(in, "b", 64, 128, 2);
  g_p = reinterpret_cast<const float*>(input(in, "p", 64, 64, 4));
  g_v = input(in, "v", 64, 128, 2);
  if (in.at != in.data.size()) sim::fail("%zu bytes of input left over", in.data.size() - in.at);
  run("dk_wgmma_selftest_ss_bf16", ss_entry, 64, 64);
  run("dk_wgmma_selftest_rs_bf16", rs_entry, 64, 128);
  fflush(stdout);
  return 0;
}
