// Driver of the attention kernel emulator (tests/attention_kernel_sim.rs): compiles the REAL
// kernel sources (cuda/attention_forward.cu, cuda/attention_backward.cu and, where the test
// staged them, cuda/attention_forward_wgmma.cu and cuda/attention_backward_wgmma.cu; staged next
// to the emulator's dk_mma.cuh and dk_wgmma.cuh; see sim_core.h for what is emulated and
// checked) and runs one call (the forward, or the backward kernels) on the buffers it is given.
//
// Protocol (binary, native endianness), one job per process:
//   stdin:  u32 magic 0x53414b44 ("DKAS"); i32 kind (0 forward, 1 backward), dtype (0 bf16,
//           1 f16), head_dim, late_copies, reverse_order, single_stores (1: an output chunk
//           stored twice in one launch is an error; 0 for garbage offsets, where sequences
//           overlap);
//           DkAttentionShape scalars: i32 batch, seqlen_q, seqlen_k, total_q, total_k, heads_q,
//           heads_kv, causal, varlen; f32 scale, scale_log2;
//           u64 workspace_bytes (backward: the Delta region, rounded up to 256 bytes, then in the
//             atomic-dQ mode the f32 dQ accumulator); i32 atomic_dq;
//           i32 n_buffers; per buffer: str name, u64 bytes, the bytes;
//           i32 n_operands; per operand: str name, i32 buffer, u64 byte offset, u64 rows,
//             u64 columns, u64 stride (elements between rows), u32 element bytes, i32 writable
//             forward order: q, k, v, out, lse[, cu_seqlens_q, cu_seqlens_k]
//             backward order: dout, q, k, v, out, lse, dq, dk, dv[, cu_seqlens_q, cu_seqlens_k]
//           i32 n_launches; per launch: i32 kernel (0 forward, 1 Delta, 2 dK/dV, 3 dQ, 4 dK/dV
//             with atomic dQ, 5 dQ conversion, 6 / 7 the 128-key dK/dV without / with atomic dQ,
//             8 the D = 128 split forward, 9 the 128-row dQ kernel, 10 the wgmma forward
//             dk_attn_fwd_{bf16,f16}_d{64,128}g of cuda/attention_forward_wgmma.cu: 128 rows
//             per block of 256 threads (2 warpgroups), grid as 8's; an error where the
//             driver was built without that file: see DK_SIM_WGMMA_FWD; in the late-copy
//             run its dynamic shared memory starts at shared address 400, 16-byte aligned
//             only, so the kernel's own alignment of its 1024-byte swizzle atoms is checked;
//             11 and 12 the wgmma backward of cuda/attention_backward_wgmma.cu, run after
//             Delta (1): 11 dk_attn_bwd_dkdvg_{bf16,f16}_d{64,128}, dK/dV of 128 key rows per
//             block of 256 threads (2 warpgroups), grid as 6's; 12 dk_attn_bwd_dqg_*, the
//             deterministic dQ of 128 query rows per block of 256 threads, grid as 9's; an
//             error where the driver was built without that file (DK_SIM_WGMMA_BWD); in the
//             late-copy run their shared memory starts at address 400, as kernel 10's),
//             u32 grid x, y, z, block x, dynamic shared bytes; i32 head_offset, batch_offset
//   (str = u32 length + bytes). The launches are the Rust launchers' (the test computes them
//   with the same formulas as src/attention/cuda/{forward,backward}.rs).
//   stdout: every buffer after the run, in order, same sizes.
//   stderr: statistics, or "EMULATOR ERROR: ..." and exit status 3 (a check failed) or 4 (a
//           guard page was hit).
#include "sim_impl.h"

#include <chrono>
#include <string>

// The kernels' `extern __shared__ T name[]` become calls returning the launch's guarded
// dynamic shared memory (a pointer to an array of unknown bound, dereferenced).
#define dk_attn_fwd_smem (*sim_fwd_smem())
#define dk_attn_bwd_smem (*sim_bwd_smem())
unsigned char (*sim_fwd_smem())[];
char (*sim_bwd_smem())[];
unsigned char (*sim_fwd_smem())[] { return reinterpret_cast<unsigned char(*)[]>(sim::S.smem); }
char (*sim_bwd_smem())[] { return reinterpret_cast<char(*)[]>(sim::S.smem); }

#include "attention_forward.cu"
// The wgmma forward, where the test staged it (it skips kernel 10 otherwise).
#if __has_include("attention_forward_wgmma.cu")
#include "attention_forward_wgmma.cu"
#define DK_SIM_WGMMA_FWD 1
#ifndef DK_ATTENTION_SIM_WGMMA_SHIM
#error "the wgmma kernel was compiled against the real dk_wgmma.cuh instead of the emulator's"
#endif
#endif
#include "attention_backward.cu"
// The wgmma backward kernels (11, 12), where the test staged them (it skips them otherwise).
#if __has_include("attention_backward_wgmma.cu")
#include "attention_backward_wgmma.cu"
#define DK_SIM_WGMMA_BWD 1
#ifndef DK_ATTENTION_SIM_WGMMA_SHIM
#error "the wgmma kernels were compiled against the real dk_wgmma.cuh instead of the emulator's"
#endif
#endif

#ifndef DK_ATTENTION_SIM_MMA_SHIM
#error "the kernels were compiled against the real dk_mma.cuh instead of the emulator's"
#endif

namespace {

using sim::Reader;

struct Operand {
  std::string name;
  char* ptr;
  int64_t stride;  // elements
};

using FwdKernel = void (*)(const DkAttentionFwdArgs);
using BwdKernel = void (*)(const DkAttentionBwdArgs);

DkAttentionFwdArgs g_fwd;
DkAttentionBwdArgs g_bwd;
FwdKernel g_fwd_fn;
BwdKernel g_bwd_fn;
void fwd_entry() { g_fwd_fn(g_fwd); }
void bwd_entry() { g_bwd_fn(g_bwd); }

// The forward kernel (`split`: the D = 128 kernel of 8 warps whose pairs split each key tile)
// and its name.
FwdKernel fwd_kernel(bool bf16, int d, bool split, const char** name) {
  if (split) {
    if (d != 128) sim::fail("the split forward exists for D = 128 only");
    *name = bf16 ? "dk_attn_fwd_bf16_d128w" : "dk_attn_fwd_f16_d128w";
    return bf16 ? dk_attn_fwd_bf16_d128w : dk_attn_fwd_f16_d128w;
  }
  *name = bf16 ? (d == 64 ? "dk_attn_fwd_bf16_d64" : "dk_attn_fwd_bf16_d128")
               : (d == 64 ? "dk_attn_fwd_f16_d64" : "dk_attn_fwd_f16_d128");
  if (bf16) return d == 64 ? dk_attn_fwd_bf16_d64 : dk_attn_fwd_bf16_d128;
  return d == 64 ? dk_attn_fwd_f16_d64 : dk_attn_fwd_f16_d128;
}

// The wgmma forward (kernel 10) and its name.
FwdKernel fwd_wgmma_kernel(bool bf16, int d, const char** name) {
#ifdef DK_SIM_WGMMA_FWD
  *name = bf16 ? (d == 64 ? "dk_attn_fwd_bf16_d64g" : "dk_attn_fwd_bf16_d128g")
               : (d == 64 ? "dk_attn_fwd_f16_d64g" : "dk_attn_fwd_f16_d128g");
  if (bf16) return d == 64 ? dk_attn_fwd_bf16_d64g : dk_attn_fwd_bf16_d128g;
  return d == 64 ? dk_attn_fwd_f16_d64g : dk_attn_fwd_f16_d128g;
#else
  (void)bf16;
  (void)d;
  *name = "dk_attn_fwd_*g";
  sim::fail("kernel 10 (the wgmma forward): the driver was built without "
            "cuda/attention_forward_wgmma.cu");
#endif
}

// The wgmma backward kernels (11: dK/dV, 12: dQ) and their names.
BwdKernel bwd_wgmma_kernel(bool bf16, int d, int which, const char** name) {
#ifdef DK_SIM_WGMMA_BWD
#define DK_SIM_PICK_WG(t, D)                                                                   \
  if (which == 11) { *name = "dk_attn_bwd_dkdvg_" #t "_d" #D; return dk_attn_bwd_dkdvg_##t##_d##D; } \
  *name = "dk_attn_bwd_dqg_" #t "_d" #D;                                                       \
  return dk_attn_bwd_dqg_##t##_d##D;
  if (bf16 && d == 64) { DK_SIM_PICK_WG(bf16, 64) }
  if (bf16) { DK_SIM_PICK_WG(bf16, 128) }
  if (d == 64) { DK_SIM_PICK_WG(f16, 64) }
  DK_SIM_PICK_WG(f16, 128)
#undef DK_SIM_PICK_WG
#else
  (void)bf16;
  (void)d;
  *name = which == 11 ? "dk_attn_bwd_dkdvg_*" : "dk_attn_bwd_dqg_*";
  sim::fail("kernel %d (the wgmma backward): the driver was built without "
            "cuda/attention_backward_wgmma.cu", which);
#endif
}

// Backward kernel `which` (1 Delta, 2 dK/dV, 3 dQ, 4 dK/dV + atomic dQ, 5 dQ conversion, 6 and
// 7: the 128-key dK/dV kernels without and with atomic dQ, 9: the 128-row dQ kernel, 11 and 12:
// the wgmma dK/dV and dQ kernels) and its name.
BwdKernel bwd_kernel(bool bf16, int d, int which, const char** name) {
  if (which == 11 || which == 12) return bwd_wgmma_kernel(bf16, d, which, name);
  if (which < 1 || which > 9 || which == 8) sim::fail("backward kernel %d does not exist", which);
#define DK_SIM_PICK(t, D)                                                    \
  if (which == 1) { *name = "dk_attn_bwd_delta_" #t "_d" #D; return dk_attn_bwd_delta_##t##_d##D; } \
  if (which == 2) { *name = "dk_attn_bwd_dkdv_" #t "_d" #D; return dk_attn_bwd_dkdv_##t##_d##D; }   \
  if (which == 4) { *name = "dk_attn_bwd_dkdvdq_" #t "_d" #D; return dk_attn_bwd_dkdvdq_##t##_d##D; } \
  if (which == 6) { *name = "dk_attn_bwd_dkdvw_" #t "_d" #D; return dk_attn_bwd_dkdvw_##t##_d##D; } \
  if (which == 7) { *name = "dk_attn_bwd_dkdvdqw_" #t "_d" #D; return dk_attn_bwd_dkdvdqw_##t##_d##D; } \
  if (which == 9) { *name = "dk_attn_bwd_dqw_" #t "_d" #D; return dk_attn_bwd_dqw_##t##_d##D; } \
  if (which == 5) {                                                          \
    *name = "dk_attn_bwd_dq_convert_" #t "_d" #D;                            \
    return dk_attn_bwd_dq_convert_##t##_d##D;                                \
  }                                                                          \
  *name = "dk_attn_bwd_dq_" #t "_d" #D;                                      \
  return dk_attn_bwd_dq_##t##_d##D;
  if (bf16 && d == 64) { DK_SIM_PICK(bf16, 64) }
  if (bf16) { DK_SIM_PICK(bf16, 128) }
  if (d == 64) { DK_SIM_PICK(f16, 64) }
  DK_SIM_PICK(f16, 128)
#undef DK_SIM_PICK
}

}  // namespace

int main() {
  sim::install_fault_handler();
  Reader in = Reader::from_stdin();
  if (in.get<uint32_t>() != 0x53414b44u) sim::fail("bad magic");
  const int kind = in.get<int32_t>();
  const bool bf16 = in.get<int32_t>() == 0;
  const int d = in.get<int32_t>();
  sim::S.late_copies = in.get<int32_t>() != 0;
  sim::S.reverse = in.get<int32_t>() != 0;
  sim::S.single_stores = in.get<int32_t>() != 0;
  if (d != 64 && d != 128) sim::fail("head_dim %d", d);
  DkAttentionShape shape;
  memset(&shape, 0, sizeof shape);
  shape.batch = in.get<int32_t>();
  shape.seqlen_q = in.get<int32_t>();
  shape.seqlen_k = in.get<int32_t>();
  shape.total_q = in.get<int32_t>();
  shape.total_k = in.get<int32_t>();
  shape.heads_q = in.get<int32_t>();
  shape.heads_kv = in.get<int32_t>();
  shape.causal = in.get<int32_t>();
  const bool varlen = in.get<int32_t>() != 0;
  shape.scale = in.get<float>();
  shape.scale_log2 = in.get<float>();
  const uint64_t ws_bytes = in.get<uint64_t>();
  const bool atomic_dq = in.get<int32_t>() != 0;

  std::vector<std::string> names;
  std::vector<std::pair<char*, uint64_t>> bufs;
  const int nbuf = in.get<int32_t>();
  names.reserve(nbuf);
  for (int i = 0; i < nbuf; ++i) {
    names.push_back(in.str());
    const uint64_t n = in.get<uint64_t>();
    char* p = sim::alloc_global(n, names.back().c_str());
    memcpy(p, in.bytes(n), n);
    bufs.push_back({p, n});
  }
  std::vector<Operand> ops;
  std::vector<std::string> op_names;
  const int nops = in.get<int32_t>();
  op_names.reserve(nops);
  for (int i = 0; i < nops; ++i) {
    op_names.push_back(in.str());
    const int b = in.get<int32_t>();
    const uint64_t off = in.get<uint64_t>(), rows = in.get<uint64_t>(), cols = in.get<uint64_t>(),
                   stride = in.get<uint64_t>();
    const int64_t elem = in.get<uint32_t>();
    const bool writable = in.get<int32_t>() != 0;
    if (b < 0 || b >= nbuf) sim::fail("operand %s: buffer %d", op_names.back().c_str(), b);
    char* p = bufs[b].first + off;
    sim::add_extent(op_names.back().c_str(), p, static_cast<int64_t>(rows), static_cast<int64_t>(cols) * elem,
                    static_cast<int64_t>(stride) * elem, writable);
    ops.push_back({op_names.back(), p, static_cast<int64_t>(stride)});
  }
  auto op = [&](size_t i, const char* want) -> const Operand& {
    if (i >= ops.size() || ops[i].name != want) sim::fail("operand %zu should be %s", i, want);
    return ops[i];
  };
  const size_t base = kind == 0 ? 5 : 9;
  if (varlen) {
    shape.cu_seqlens_q = reinterpret_cast<uint64_t>(op(base, "cu_seqlens_q").ptr);
    shape.cu_seqlens_k = reinterpret_cast<uint64_t>(op(base + 1, "cu_seqlens_k").ptr);
  }
  if (kind == 0) {
    g_fwd.shape = shape;
    g_fwd.q = reinterpret_cast<uint64_t>(op(0, "q").ptr);
    g_fwd.q_stride = op(0, "q").stride;
    g_fwd.k = reinterpret_cast<uint64_t>(op(1, "k").ptr);
    g_fwd.k_stride = op(1, "k").stride;
    g_fwd.v = reinterpret_cast<uint64_t>(op(2, "v").ptr);
    g_fwd.v_stride = op(2, "v").stride;
    g_fwd.out = reinterpret_cast<uint64_t>(op(3, "out").ptr);
    g_fwd.out_stride = op(3, "out").stride;
    g_fwd.lse = reinterpret_cast<uint64_t>(op(4, "lse").ptr);
  } else {
    g_bwd.shape = shape;
    const char* mats[] = {"dout", "q", "k", "v", "out"};
    uint64_t* ptrs[] = {&g_bwd.dout, &g_bwd.q, &g_bwd.k, &g_bwd.v, &g_bwd.out};
    int64_t* strides[] = {&g_bwd.dout_stride, &g_bwd.q_stride, &g_bwd.k_stride, &g_bwd.v_stride,
                          &g_bwd.out_stride};
    for (int i = 0; i < 5; ++i) {
      *ptrs[i] = reinterpret_cast<uint64_t>(op(i, mats[i]).ptr);
      *strides[i] = op(i, mats[i]).stride;
    }
    g_bwd.lse = reinterpret_cast<uint64_t>(op(5, "lse").ptr);
    const char* grads[] = {"dq", "dk", "dv"};
    uint64_t* gptrs[] = {&g_bwd.dq, &g_bwd.dk, &g_bwd.dv};
    int64_t* gstrides[] = {&g_bwd.dq_stride, &g_bwd.dk_stride, &g_bwd.dv_stride};
    for (int i = 0; i < 3; ++i) {
      *gptrs[i] = reinterpret_cast<uint64_t>(op(6 + i, grads[i]).ptr);
      *gstrides[i] = op(6 + i, grads[i]).stride;
    }
    // The workspace (the launcher's size): Hq * Tq floats of Delta, then from the next
    // multiple of 256 bytes, in the atomic-dQ mode, the [Tq, Hq * D] f32 dQ accumulator.
    char* ws = sim::alloc_global(ws_bytes, "workspace");
    const uint32_t poison = 0xffbadbadu;
    for (uint64_t i = 0; i + 4 <= ws_bytes; i += 4) memcpy(ws + i, &poison, 4);
    const int64_t entries = static_cast<int64_t>(shape.heads_q) * shape.total_q;
    sim::add_extent("delta", ws, 1, entries * 4, entries * 4, true);
    g_bwd.delta = entries > 0 ? reinterpret_cast<uint64_t>(ws) : 0;
    const int64_t delta_region = (entries * 4 + 255) / 256 * 256;
    if (atomic_dq && entries > 0) {
      if (static_cast<uint64_t>(delta_region + entries * d * 4) > ws_bytes)
        sim::fail("workspace of %llu bytes too small for the dQ accumulator",
                  (unsigned long long)ws_bytes);
      char* acc = ws + delta_region;
      sim::add_extent("dq_accum", acc, shape.total_q, static_cast<int64_t>(shape.heads_q) * d * 4,
                      static_cast<int64_t>(shape.heads_q) * d * 4, true);
      g_bwd.dq_accum = reinterpret_cast<uint64_t>(acc);
    } else {
      g_bwd.dq_accum = 0;
    }
  }

  const int nl = in.get<int32_t>();
  long wgmmas_before = 0;
  for (int i = 0; i < nl; ++i) {
    const int which = in.get<int32_t>();
    dim3 grid, block;
    grid.x = in.get<uint32_t>();
    grid.y = in.get<uint32_t>();
    grid.z = in.get<uint32_t>();
    block.x = in.get<uint32_t>();
    const uint32_t smem = in.get<uint32_t>();
    const int32_t head_offset = in.get<int32_t>(), batch_offset = in.get<int32_t>();
    const auto t0 = std::chrono::steady_clock::now();
    const long c0 = sim::S.collectives, b0 = sim::S.blocks;
    const char* name;
    if (which == 0 || which == 8 || which == 10) {
      if (kind != 0) sim::fail("forward launch in a backward job");
      g_fwd.head_offset = head_offset;
      g_fwd.batch_offset = batch_offset;
      g_fwd_fn = which == 10 ? fwd_wgmma_kernel(bf16, d, &name) : fwd_kernel(bf16, d, which == 8, &name);
      // The wgmma kernel aligns its tiles itself (the launch has 1024 bytes of slack): in the
      // late-copy run its shared memory starts at an address that is only 16-byte aligned.
      sim::S.smem_base = which == 10 && sim::S.late_copies ? 400 : 0;
      sim::launch(name, fwd_entry, grid, block, smem);
      sim::S.smem_base = 0;
    } else {
      if (kind != 1) sim::fail("backward launch in a forward job");
      g_bwd_fn = bwd_kernel(bf16, d, which, &name);
      // As for kernel 10: the wgmma kernels align their tiles themselves.
      sim::S.smem_base = (which == 11 || which == 12) && sim::S.late_copies ? 400 : 0;
      sim::launch(name, bwd_entry, grid, block, smem);
      sim::S.smem_base = 0;
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const long w0 = wgmmas_before;
    wgmmas_before = sim::S.wgmmas;
    fprintf(stderr, "%s grid (%u,%u,%u) x %u threads, %u B shared: %ld blocks, %ld warp collectives (%ld warp wgmma), %.2fs\n",
            name, grid.x, grid.y, grid.z, block.x, smem, sim::S.blocks - b0, sim::S.collectives - c0,
            sim::S.wgmmas - w0, secs);
  }
  if (kind == 1 && shape.total_q > 0) {
    // Delta (not returned): every one of its Hq * Tq entries written (every row exists in both
    // layouts), nothing past them.
    const char* ws = reinterpret_cast<const char*>(g_bwd.delta);
    const int64_t entries = static_cast<int64_t>(shape.heads_q) * shape.total_q;
    const int64_t delta_region = (entries * 4 + 255) / 256 * 256;
    const int64_t checked = atomic_dq ? delta_region : static_cast<int64_t>(ws_bytes);
    for (int64_t i = 0; i * 4 + 4 <= checked; ++i) {
      uint32_t v;
      memcpy(&v, ws + 4 * i, 4);
      if (i < entries && v == 0xffbadbadu) sim::fail("Delta entry %lld was not written", (long long)i);
      if (i >= entries && v != 0xffbadbadu)
        sim::fail("Delta workspace entry %lld (past the %lld entries) was written", (long long)i,
                  (long long)entries);
    }
    // The dQ accumulator: every entry zeroed by Delta, then only added to (poison is a NaN).
    for (int64_t i = 0; atomic_dq && i < entries * d; ++i) {
      float v;
      memcpy(&v, reinterpret_cast<const char*>(g_bwd.dq_accum) + 4 * i, 4);
      if (v != v) sim::fail("dQ accumulator entry %lld was not zeroed by the Delta kernel", (long long)i);
    }
  }
  for (const auto& b : bufs) {
    if (b.second && fwrite(b.first, 1, b.second, stdout) != b.second) sim::fail("short write");
  }
  fflush(stdout);
  return 0;
}
