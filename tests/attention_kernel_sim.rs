//! The CUDA attention kernels, checked without a GPU: tests/attention_sim/ is a host emulator
//! (one fiber per CUDA thread; ldmatrix, mma.sync m16n8k16, shuffles and cp.async from the PTX
//! ISA; guarded shared and global memory; see tests/attention_sim/sim_core.h) that compiles the
//! REAL kernel sources, cuda/attention_forward.cu, cuda/attention_backward.cu and (where they
//! exist) cuda/attention_forward_wgmma.cu and cuda/attention_backward_wgmma.cu, with their
//! headers. They are staged into a scratch directory next to the emulator's dk_mma.cuh and
//! dk_wgmma.cuh (the only headers replaced: they hold the inline PTX), since the headers include
//! them from their own directory.
//!
//! Each case draws fresh random inputs (never zeros; the seed is printed), runs the forward
//! kernels (the 16-row one, the D = 128 split one, the wgmma one of both head dimensions; the
//! wgmma kernel is skipped, with a printed NOTE, while its source file does not exist or with
//! `DK_ATTENTION_SIM_NO_WGMMA=1`) and then the backward kernels of both modes (deterministic,
//! and atomic dQ; fed the emulated forward's out and LSE) in each configuration (the mma.sync
//! 64-row kernels, `DK_ATTENTION_BWD=mma` and the default off Hopper, `DK_ATTENTION_BWD=wide`'s
//! 128-row ones, and the deterministic wgmma dK/dV and dQ, the default on Hopper, skipped like
//! the wgmma forward) with the grids, blocks and
//! shared-memory sizes of the Rust launchers (src/attention/cuda/forward.rs,
//! src/attention/cuda/backward.rs: the formulas are repeated below), on poisoned outputs, and
//! checks:
//! - every output element was written, nothing else changed (padding, slack, inputs);
//! - out, dq, dk, dv within DESIGN.md's 1e-2 relative norm of the crate's CPU backend (the f64
//!   reference) on the same inputs (f16: 2e-3, tighter where it holds), and the f32 LSE within
//!   1e-6 (DESIGN.md: 1e-4), −∞ exactly where the CPU has it;
//! - rows that see no key: out = 0, LSE = −∞, dq = 0 exactly; keys no query sees: dk = dv = 0;
//! - two runs, one with every cp.async landing at issue and threads, warps and blocks in
//!   ascending order, the other with copies landing only at the cp.async.wait_group that
//!   forces them and everything in descending order, give bitwise the same outputs (in the
//!   atomic-dQ mode: all but dq, whose addition order changes; its dk and dv are bitwise those
//!   of the deterministic mode, and the dq of both runs is checked against the reference; the
//!   wgmma backward's dq, dk, dv are checked against the reference only: they sum in other
//!   orders and round P and dS to the element type for dK and dV);
//! - the emulator's own checks (shared-memory bounds and alignment, reads of shared memory
//!   with a copy in flight, global accesses outside the operands' rows, guard pages, converged
//!   warps at every collective, barriers, outputs stored twice; for wgmma: descriptors, operand
//!   bounds, fences, commit / wait groups, accumulators and A fragments untouched while a
//!   product is pending, no writes into its operands, fence.proxy.async after generic writes;
//!   the wgmma kernels' late-copy runs also move their shared memory to an address aligned to
//!   16 bytes only, see attention_sim.cpp).
//!
//! `wgmma_emulation_self_check` checks the wgmma emulation itself on a hand-written kernel
//! (tests/attention_sim/wgmma_selfcheck.cpp). `wgmma_selftest_kernels_on_the_emulator` runs the
//! REAL hardware self-test kernels of cuda/attention_wgmma_selftest.cu (the GPU unit test
//! `wgmma_layouts_on_the_device`) through the emulator with that test's inputs and tolerance
//! (tests/attention_sim/wgmma_selftest_sim.cpp), so that a failure on a device can only be the
//! emulator's reading of the PTX ISA layouts.
//!
//! Cases (small shapes: the emulator plays every thread of every block): bf16 and f16, D 64 and
//! 128, padded and varlen (empty sequences, length-1 sequences, queries without keys, keys
//! without queries, no query or no key rows at all, loose bounds), causal with Sq < Sk and
//! Sq > Sk, Hq/Hkv 1, 3 and 8, lengths off the 32-, 64- and 128-row tiles and several tiles
//! long, q/k/v sliced from a fused qkv buffer (token stride > row) and padded rows, a sharp
//! softmax (scale 2); plus random shapes drawn from the seed every run.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use common::attention::*;
use common::*;
use distill_kernels::attention::AttentionParams;
use distill_kernels::{Context, DType};

const TEST: &str = "attention_kernel_sim";

/// Outputs, relative norm: DESIGN.md's 1e-2 for bf16; for f16 the emulated kernels hold 2e-3
/// (their error is ~3e-4, the f16 rounding of P and of the outputs), so that a bf16-precision
/// step inside an f16 kernel (~3e-3) shows.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}
/// The f32 LSE (finite entries), relative norm. DESIGN.md allows 1e-4; the emulated kernel
/// holds 1e-6 (its error is ~5e-8: f32 accumulation and logf; the emulator's ex2 is exact).
const TOL_LSE: f64 = 1e-6;
/// Denominator floor of the relative errors.
const FLOOR: f64 = 1e-6;

// ------------------------------------------------------------------------------------------
// Building the emulator
// ------------------------------------------------------------------------------------------

/// The emulator driver, and whether the wgmma forward (kernel 10) and the wgmma backward
/// (kernels 11 and 12) are compiled into it.
#[derive(Clone)]
struct Simulator {
    exe: PathBuf,
    wgmma: bool,
    wgmma_bwd: bool,
}

/// The emulator, built once per test process (the tests share it).
fn simulator() -> Option<Simulator> {
    static SIM: OnceLock<Option<Simulator>> = OnceLock::new();
    SIM.get_or_init(build_simulator).clone()
}

/// The wgmma forward's source, compiled into the driver where it exists.
const WGMMA_SOURCE: &str = "attention_forward_wgmma.cu";
/// The wgmma backward's source (dK/dV and dQ), compiled into the driver where it exists.
const WGMMA_BWD_SOURCE: &str = "attention_backward_wgmma.cu";

/// What a wgmma source holds, for the notes when it is left out.
fn wgmma_what(name: &str) -> &'static str {
    if name == WGMMA_SOURCE {
        "the wgmma forward (kernel 10)"
    } else {
        "the wgmma backward (kernels 11 and 12)"
    }
}

/// The headers the emulator replaces (they hold the inline PTX).
const EMULATED_HEADERS: [&str; 2] = ["dk_mma.cuh", "dk_wgmma.cuh"];

/// The `cuda/*.cu` files the driver includes (`#include "name.cu"`), and whether each is
/// optional (the driver includes it under `__has_include`).
fn driver_sources(driver: &str) -> Vec<(String, bool)> {
    driver
        .lines()
        .filter_map(|l| {
            let name = l.trim().strip_prefix("#include \"")?.strip_suffix('"')?;
            name.ends_with(".cu").then(|| {
                let optional = driver.contains(&format!("__has_include(\"{name}\")"));
                (name.to_string(), optional)
            })
        })
        .collect()
}

/// Copies every header of cuda/include into `stage`, with the emulator's dk_mma.cuh and
/// dk_wgmma.cuh in place of the real ones (a kernel source staged next to them includes them
/// from its own directory, and so do the headers).
fn stage_headers(stage: &Path) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let copy = |from: &Path| {
        let to = stage.join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    for entry in std::fs::read_dir(root.join("cuda/include")).expect("cuda/include") {
        let path = entry.expect("cuda/include entry").path();
        if path
            .file_name()
            .is_some_and(|n| !EMULATED_HEADERS.iter().any(|h| n == *h))
        {
            copy(&path);
        }
    }
    for h in EMULATED_HEADERS {
        copy(&root.join("tests/attention_sim").join(h));
    }
}

/// Copies the kernel sources the driver includes and every header into a scratch directory
/// with the emulator's dk_mma.cuh and dk_wgmma.cuh in place of the real ones, and builds the
/// driver against them. The wgmma sources (forward, backward) are optional: while one does not
/// exist (or with `DK_ATTENTION_SIM_NO_WGMMA=1`) it is left out, loudly, and its checks are
/// skipped.
fn build_simulator() -> Option<Simulator> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let stage = scratch_dir(TEST).join("kernel");
    std::fs::create_dir_all(&stage).expect("create the staging directory");
    let copy = |from: &Path| {
        let to = stage.join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    let sim_dir = root.join("tests/attention_sim");
    let driver = sim_dir.join("attention_sim.cpp");
    let text = std::fs::read_to_string(&driver).expect("read attention_sim.cpp");
    let skip_wgmma = std::env::var_os("DK_ATTENTION_SIM_NO_WGMMA").is_some_and(|v| v != "0");
    let (mut wgmma, mut wgmma_bwd) = (false, false);
    for (name, optional) in driver_sources(&text) {
        let path = root.join("cuda").join(&name);
        let is_wgmma = name == WGMMA_SOURCE || name == WGMMA_BWD_SOURCE;
        if is_wgmma && skip_wgmma {
            visible(&format!(
                "NOTE {TEST}: DK_ATTENTION_SIM_NO_WGMMA is set: cuda/{name} left out, {} is NOT \
                 checked",
                wgmma_what(&name)
            ));
        } else if path.exists() {
            copy(&path);
            wgmma |= name == WGMMA_SOURCE;
            wgmma_bwd |= name == WGMMA_BWD_SOURCE;
        } else if optional {
            visible(&format!(
                "NOTE {TEST}: cuda/{name} does not exist: {} is NOT checked",
                wgmma_what(&name)
            ));
        } else {
            panic!(
                "{}: the driver includes it, but it does not exist",
                path.display()
            );
        }
    }
    stage_headers(&stage);
    let exe = build_kernel_simulator(
        TEST,
        &driver,
        &[stage, sim_dir],
        // The kernels' `#pragma unroll` is CUDA's; the host compiler ignores it.
        &["-Wno-unknown-pragmas"],
    )?;
    Some(Simulator {
        exe,
        wgmma,
        wgmma_bwd,
    })
}

// ------------------------------------------------------------------------------------------
// Launch configurations (the Rust launchers' formulas)
// ------------------------------------------------------------------------------------------

/// One kernel launch: kernel (0 forward, 1 Delta, 2 dK/dV, 3 dQ, 4 dK/dV with atomic dQ, 5 dQ
/// conversion, 6 / 7 the 128-key dK/dV without / with atomic dQ, 8 the D = 128 split forward,
/// 9 the 128-row dQ, 10 the wgmma forward, 11 / 12 the wgmma dK/dV / dQ),
/// grid, threads, dynamic shared memory, and the forward's head / batch offsets.
#[derive(Debug, Clone, Copy)]
struct LaunchCfg {
    kernel: i32,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
    head_offset: i32,
    batch_offset: i32,
}

/// The launcher's limit on gridDim.y and gridDim.z (`MAX_GRID_YZ` in forward.rs).
const MAX_GRID_YZ: usize = 65535;

/// The forward kernels.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fwd {
    /// 16 (D = 128) or 32 (D = 64) rows per warp, 4 warps (kernel 0).
    Rows,
    /// The D = 128 split kernel (kernel 8, `DK_ATTENTION_FWD=wide`).
    Split,
    /// The wgmma kernel of cuda/attention_forward_wgmma.cu (kernel 10), both head dimensions.
    Wgmma,
}

/// The backward configurations (`DK_ATTENTION_BWD`, src/attention/cuda/backward.rs).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bwd {
    /// The default: the 64-key dK/dV kernel (2, or 4 with atomic dQ), the 64-row dQ kernel (3).
    Narrow,
    /// `wide`: the 128-key dK/dV kernels (6, or 7 with atomic dQ), the 128-row dQ kernel (9).
    Wide,
    /// `wgmma`: in the deterministic mode the wgmma dK/dV (11) and dQ (12) kernels of
    /// cuda/attention_backward_wgmma.cu; with atomic dQ, `Wide`.
    Wgmma,
}

/// `launches()` and `tiling()` of src/attention/cuda/forward.rs: grid (⌈Sq / rows per block⌉,
/// Hq, B) in chunks of `split` (the launcher: 65535) heads and sequences, 128 threads,
/// (rows + 2·64 keys)·D·2 bytes of shared memory with 128 query rows per block at D = 64 and 64
/// at D = 128. `Fwd::Split` (`DK_ATTENTION_FWD=wide`, D = 128): the split kernel (kernel 8), 128
/// rows per block of 256 threads, `split_smem_bytes` (plus the P tile and the row exchange).
/// `Fwd::Wgmma`: kernel 10, 128 rows per block of 256 threads (two warpgroups), 1024 + 5·128·D·2
/// bytes (1024 for aligning the swizzle atoms).
fn forward_launches(case: &AttnCase, split: usize, kind: Fwd) -> Vec<LaunchCfg> {
    let s = &case.seqs;
    let (batch, hq, d) = (s.batch(), case.hq(), case.d());
    if batch == 0 || s.max_q == 0 || case.tq() == 0 || hq == 0 {
        return Vec::new();
    }
    let wide = kind != Fwd::Rows;
    let block_m = if d == 64 || wide { 128 } else { 64 };
    let smem = match kind {
        Fwd::Rows => (block_m + 2 * 64) * d * 2,
        Fwd::Split => (block_m + 2 * 64) * d * 2 + 128 * 64 * 2 + 2 * 128 * 4,
        Fwd::Wgmma => 1024 + 5 * 128 * d * 2,
    };
    let tiles = s.max_q.div_ceil(block_m) as u32;
    let mut out = Vec::new();
    for h0 in (0..hq).step_by(split) {
        for b0 in (0..batch).step_by(split) {
            out.push(LaunchCfg {
                kernel: match kind {
                    Fwd::Rows => 0,
                    Fwd::Split => 8,
                    Fwd::Wgmma => 10,
                },
                grid: (
                    tiles,
                    (hq - h0).min(split) as u32,
                    (batch - b0).min(split) as u32,
                ),
                threads: if wide { 256 } else { 128 },
                smem: smem as u32,
                head_offset: h0 as i32,
                batch_offset: b0 as i32,
            });
        }
    }
    out
}

/// `backward()` of src/attention/cuda/backward.rs: Delta (256 threads, D/8 per (row, head))
/// when there are query rows, dK/dV (⌈Sk / 64⌉·B·Hkv blocks) when there are key rows, dQ
/// (⌈Sq / 64⌉·B·Hq blocks) when there are query rows; 128 threads; shared memory
/// `dkdv_smem_bytes` / `dq_smem_bytes`; grids of 0 blocks are not launched. With `atomic_dq`
/// (`deterministic = false`): dK/dV with atomic dQ (`dkdvdq_smem_bytes`: 8 KiB more) and the dQ
/// conversion on the Delta grid instead of dQ. Also returns the workspace size
/// (`backward_workspace_size`).
///
/// With `Bwd::Wide` (`DK_ATTENTION_BWD=wide`): the 128-key dK/dV kernels of 8 warps instead
/// (`dkdv_wide_smem_bytes`, ⌈Sk / 128⌉·B·Hkv blocks of 256 threads; kernel 6, or 7 with atomic
/// dQ), and in the deterministic mode the 128-row dQ kernel (`dq_wide_smem_bytes`,
/// ⌈Sq / 128⌉·B·Hq blocks of 256 threads; kernel 9). With `Bwd::Wgmma`
/// (`DK_ATTENTION_BWD=wgmma`), in the deterministic mode: the wgmma dK/dV kernel (kernel 11,
/// `dkdv_wgmma_smem_bytes` = 1024 + (2·128·D + 4·64·D)·2 + 4·64·4, ⌈Sk / `WGMMA_KEYS` = 128⌉·B·Hkv
/// blocks of 256 threads) and dQ kernel (kernel 12, `dq_wgmma_smem_bytes` = 1024 + (2·128·D +
/// 4·64·D)·2, ⌈Sq / `WGMMA_DQ_ROWS` = 128⌉·B·Hq blocks of 256 threads); with atomic dQ the
/// launcher runs `wide`'s kernels.
fn backward_launches(case: &AttnCase, atomic_dq: bool, kind: Bwd) -> (Vec<LaunchCfg>, usize) {
    let s = &case.seqs;
    let (batch, hq, hkv, d, tq, tk) = (
        s.batch(),
        case.hq(),
        case.hkv(),
        case.d(),
        case.tq(),
        case.tk(),
    );
    let ws = (4 * hq * tq).next_multiple_of(256) + if atomic_dq { 4 * tq * hq * d } else { 0 };
    if tq == 0 && tk == 0 {
        return (Vec::new(), ws);
    }
    let (br_dkdv, bc_dq) = if d == 64 { (64, 64) } else { (32, 32) };
    let dkdv_smem = (2 * 64 * d + 4 * br_dkdv * d) * 2 + 4 * br_dkdv * 4;
    let dq_smem = (2 * 64 * d + 4 * bc_dq * d) * 2;
    let dkdvdq_smem = dkdv_smem + 64 * 64 * 2;
    let one = |kernel, blocks: usize, threads, smem: usize| LaunchCfg {
        kernel,
        grid: (blocks as u32, 1, 1),
        threads,
        smem: smem as u32,
        head_offset: 0,
        batch_offset: 0,
    };
    // As the launcher: `wgmma` is `wide` in the atomic-dQ mode.
    let wgmma = kind == Bwd::Wgmma && !atomic_dq;
    let wide = kind != Bwd::Narrow;
    let mut out = Vec::new();
    let delta_blocks = (hq * tq).div_ceil(256 / (d / 8));
    if tq > 0 {
        out.push(one(1, delta_blocks, 256, 0));
    }
    if tk > 0 && wgmma {
        let blocks = s.max_k.div_ceil(128) * batch * hkv;
        let smem = 1024 + (2 * 128 * d + 4 * 64 * d) * 2 + 4 * 64 * 4;
        out.push(one(11, blocks, 256, smem));
    } else if tk > 0 && wide {
        let blocks = s.max_k.div_ceil(128) * batch * hkv;
        let smem = (2 * 128 * d + 4 * 64 * d + 2 * 128 * 64) * 2 + 4 * 64 * 4;
        out.push(one(if atomic_dq { 7 } else { 6 }, blocks, 256, smem));
    } else if tk > 0 {
        let blocks = s.max_k.div_ceil(64) * batch * hkv;
        out.push(if atomic_dq {
            one(4, blocks, 128, dkdvdq_smem)
        } else {
            one(2, blocks, 128, dkdv_smem)
        });
    }
    if tq > 0 {
        out.push(if atomic_dq {
            one(5, delta_blocks, 256, 0)
        } else if wgmma {
            let smem = 1024 + (2 * 128 * d + 4 * 64 * d) * 2;
            one(12, s.max_q.div_ceil(128) * batch * hq, 256, smem)
        } else if wide {
            let smem = (2 * 128 * d + 4 * 64 * d + 128 * 64) * 2;
            one(9, s.max_q.div_ceil(128) * batch * hq, 256, smem)
        } else {
            one(3, s.max_q.div_ceil(64) * batch * hq, 128, dq_smem)
        });
    }
    out.retain(|l| l.grid.0 > 0);
    (out, ws)
}

// ------------------------------------------------------------------------------------------
// Jobs
// ------------------------------------------------------------------------------------------

/// An operand for the driver: buffer, byte offset, rows, columns, stride (elements), element
/// bytes, writable.
struct Operand {
    name: &'static str,
    buf: usize,
    offset_bytes: usize,
    rows: usize,
    cols: usize,
    stride: usize,
    elem: u32,
    writable: bool,
}

/// The two timing / ordering models of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// cp.async copies land when issued; threads, warps and blocks in ascending order.
    EagerAscending,
    /// Copies land at the wait that forces them; everything in descending order.
    LateDescending,
}

struct Job<'a> {
    backward: bool,
    case: &'a AttnCase,
    mode: Mode,
    bufs: &'a [Bytes],
    buf_names: &'a [&'static str],
    operands: Vec<Operand>,
    launches: Vec<LaunchCfg>,
    workspace: usize,
    /// Backward: the atomic-dQ mode (`deterministic = false`).
    atomic_dq: bool,
    /// An output chunk stored twice in one launch is an error (off for garbage offsets).
    single_stores: bool,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u32).to_ne_bytes());
    out.extend(s.as_bytes());
}

impl Job<'_> {
    fn encode(&self) -> Vec<u8> {
        let c = self.case;
        let mut o = Vec::new();
        let i32s = |o: &mut Vec<u8>, v: &[i32]| v.iter().for_each(|x| o.extend(x.to_ne_bytes()));
        o.extend(0x5341_4b44u32.to_ne_bytes());
        let dtype = match c.dtype {
            DType::BF16 => 0,
            DType::F16 => 1,
            DType::F32 => panic!("the CUDA kernels take bf16 or f16"),
        };
        i32s(
            &mut o,
            &[
                self.backward as i32,
                dtype,
                c.d() as i32,
                (self.mode == Mode::LateDescending) as i32,
                (self.mode == Mode::LateDescending) as i32,
                self.single_stores as i32,
                c.seqs.batch() as i32,
                c.seqs.max_q as i32,
                c.seqs.max_k as i32,
                c.tq() as i32,
                c.tk() as i32,
                c.hq() as i32,
                c.hkv() as i32,
                c.params.causal as i32,
                c.seqs.varlen as i32,
            ],
        );
        // As AttentionShape::new / backward(): the scale in effect and scale · log2(e) in f32.
        let scale = c.params.scale();
        o.extend(scale.to_ne_bytes());
        o.extend((scale * std::f32::consts::LOG2_E).to_ne_bytes());
        o.extend((self.workspace as u64).to_ne_bytes());
        i32s(&mut o, &[self.atomic_dq as i32]);
        i32s(&mut o, &[self.bufs.len() as i32]);
        for (b, name) in self.bufs.iter().zip(self.buf_names) {
            put_str(&mut o, name);
            o.extend((b.len() as u64).to_ne_bytes());
            o.extend(b.as_ref());
        }
        i32s(&mut o, &[self.operands.len() as i32]);
        for op in &self.operands {
            put_str(&mut o, op.name);
            i32s(&mut o, &[op.buf as i32]);
            for v in [op.offset_bytes, op.rows, op.cols, op.stride] {
                o.extend((v as u64).to_ne_bytes());
            }
            o.extend(op.elem.to_ne_bytes());
            i32s(&mut o, &[op.writable as i32]);
        }
        i32s(&mut o, &[self.launches.len() as i32]);
        for l in &self.launches {
            i32s(&mut o, &[l.kernel]);
            for v in [l.grid.0, l.grid.1, l.grid.2, l.threads, l.smem] {
                o.extend(v.to_ne_bytes());
            }
            i32s(&mut o, &[l.head_offset, l.batch_offset]);
        }
        o
    }

    /// Runs the driver: every buffer after the call, and its statistics; or the error it
    /// reported.
    fn run(&self, exe: &Path) -> Result<(Vec<Bytes>, String), String> {
        let total: usize = self.bufs.iter().map(|b| b.len()).sum();
        let (stdout, log) = run_emulator(exe, self.encode(), total)?;
        let mut at = 0;
        let bufs = self
            .bufs
            .iter()
            .map(|b| {
                let r = Bytes::from_slice(&stdout[at..at + b.len()]);
                at += b.len();
                r
            })
            .collect();
        // The logs of a case's runs are printed one after the other: one line break each.
        Ok((bufs, log + "\n"))
    }
}

fn matrix(
    name: &'static str,
    case: &AttnCase,
    s: Slot,
    rows: usize,
    cols: usize,
    w: bool,
) -> Operand {
    Operand {
        name,
        buf: s.buf,
        offset_bytes: s.offset * case.dtype.size(),
        rows,
        cols,
        stride: s.stride,
        elem: case.dtype.size() as u32,
        writable: w,
    }
}

fn vector(name: &'static str, buf: usize, len: usize, w: bool) -> Operand {
    Operand {
        name,
        buf,
        offset_bytes: 0,
        rows: 1,
        cols: len,
        stride: len,
        elem: 4,
        writable: w,
    }
}

fn offsets(case: &AttnCase, cu_q: usize, cu_k: usize) -> Vec<Operand> {
    if !case.seqs.varlen {
        return Vec::new();
    }
    let n = case.seqs.batch() + 1;
    vec![
        vector("cu_seqlens_q", cu_q, n, false),
        vector("cu_seqlens_k", cu_k, n, false),
    ]
}

const FWD_NAMES: [&str; fwd_buf::COUNT] = [
    "q buffer",
    "k buffer",
    "v buffer",
    "out buffer",
    "lse buffer",
    "cu_seqlens_q buffer",
    "cu_seqlens_k buffer",
];
const BWD_NAMES: [&str; bwd_buf::COUNT] = [
    "dout buffer",
    "q buffer",
    "k buffer",
    "v buffer",
    "out buffer",
    "lse buffer",
    "dq buffer",
    "dk buffer",
    "dv buffer",
    "cu_seqlens_q buffer",
    "cu_seqlens_k buffer",
];

/// The forward job; `split`: launches cover at most this many heads and sequences each (the
/// launcher's 65535; less to exercise the kernel's head_offset and batch_offset); `kind`: the
/// kernel.
fn forward_job<'a>(
    case: &'a AttnCase,
    bufs: &'a [Bytes],
    mode: Mode,
    split: usize,
    kind: Fwd,
) -> Job<'a> {
    let [q, k, v, out] = case.fwd_slots();
    let (tq, tk, qc, kc) = (case.tq(), case.tk(), case.qc(), case.kc());
    let mut operands = vec![
        matrix("q", case, q, tq, qc, false),
        matrix("k", case, k, tk, kc, false),
        matrix("v", case, v, tk, kc, false),
        matrix("out", case, out, tq, qc, true),
        vector("lse", fwd_buf::LSE, case.lse_len(), true),
    ];
    operands.extend(offsets(case, fwd_buf::CU_Q, fwd_buf::CU_K));
    Job {
        backward: false,
        case,
        mode,
        bufs,
        buf_names: &FWD_NAMES,
        operands,
        launches: forward_launches(case, split, kind),
        workspace: 0,
        atomic_dq: false,
        single_stores: true,
    }
}

fn backward_job<'a>(
    case: &'a AttnCase,
    bufs: &'a [Bytes],
    mode: Mode,
    atomic_dq: bool,
    kind: Bwd,
) -> Job<'a> {
    let [dout, q, k, v, out, dq, dk, dv] = case.bwd_slots();
    let (tq, tk, qc, kc) = (case.tq(), case.tk(), case.qc(), case.kc());
    let mut operands = vec![
        matrix("dout", case, dout, tq, qc, false),
        matrix("q", case, q, tq, qc, false),
        matrix("k", case, k, tk, kc, false),
        matrix("v", case, v, tk, kc, false),
        matrix("out", case, out, tq, qc, false),
        vector("lse", bwd_buf::LSE, case.lse_len(), false),
        matrix("dq", case, dq, tq, qc, true),
        matrix("dk", case, dk, tk, kc, true),
        matrix("dv", case, dv, tk, kc, true),
    ];
    operands.extend(offsets(case, bwd_buf::CU_Q, bwd_buf::CU_K));
    let (launches, workspace) = backward_launches(case, atomic_dq, kind);
    Job {
        backward: true,
        case,
        mode,
        bufs,
        buf_names: &BWD_NAMES,
        operands,
        launches,
        workspace,
        atomic_dq,
        single_stores: true,
    }
}

// ------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------

/// Errors of one case (relative norms).
#[derive(Debug, Default, Clone)]
struct Errors {
    out: f64,
    /// out of the D = 128 split forward (`DK_ATTENTION_FWD=wide`; 0 at D = 64).
    out_split: f64,
    /// out of the wgmma forward (None: not checked, its source is missing).
    out_wgmma: Option<f64>,
    lse: f64,
    dq: f64,
    /// dQ of the atomic-dQ mode, the worse of its two runs.
    dq_atomic: f64,
    dk: f64,
    /// dK of the 128-key dK/dV kernel (`DK_ATTENTION_BWD=wide`).
    dk_wide: f64,
    dv: f64,
    /// dq, dk, dv of the wgmma backward (`DK_ATTENTION_BWD=wgmma`; None: not checked, its source
    /// is missing).
    wgmma_bwd: Option<[f64; 3]>,
    secs: f64,
    /// The emulator's statistics (launches, blocks, collectives) of the first run of each job.
    log: String,
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<f64, String> {
    close_floor(what, got, want, tol, FLOOR)
}

fn close_floor(what: &str, got: &[f64], want: &[f64], tol: f64, floor: f64) -> Result<f64, String> {
    let e = rel_err(got, want, floor);
    if e <= tol {
        Ok(e)
    } else {
        Err(format!(
            "{what}: relative error {e:.3e} > {tol:.0e} against the CPU backend"
        ))
    }
}

fn check_lse(got: &[f32], want: &[f32]) -> Result<f64, String> {
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (i, (&x, &y)) in got.iter().zip(want).enumerate() {
        if y == f32::NEG_INFINITY {
            if x != f32::NEG_INFINITY {
                return Err(format!(
                    "lse[{i}] = {x}, −inf expected (the row sees no key)"
                ));
            }
        } else if !x.is_finite() {
            return Err(format!("lse[{i}] = {x}, {y} expected"));
        } else {
            g.push(x as f64);
            w.push(y as f64);
        }
    }
    close("lse", &g, &w, TOL_LSE)
}

/// Denominator floor of the dq and dk errors. Both are sums of dS = P∘(dP − Delta), which
/// cancels exactly when every query sees one key (P = 1, out = v, so dP = Delta): dq = dk = 0
/// in exact arithmetic (the CPU backend's result) and f32 rounding noise in the kernels, ~1e-7
/// of the natural gradient scale. That scale, scale·√D·‖dout‖ (the size of dq for
/// unit-variance inputs), times 1e-3 bounds the denominator from below, so such a case compares
/// noise against 1e-3 of the scale instead of dividing by 0; elsewhere ‖dq‖ is far above it.
fn grad_floor(case: &AttnCase) -> f64 {
    let dout = case.dout.iter().map(|x| x * x).sum::<f64>().sqrt();
    (1e-3 * case.params.scale() as f64 * (case.d() as f64).sqrt() * dout).max(FLOOR)
}

/// Exact zeros: out and dq of rows that see no key, dk and dv of keys no query sees.
fn check_zeros(case: &AttnCase, out: &[f64], g: Option<&Grads>) -> Result<(), String> {
    let (d, qc, kc) = (case.d(), case.qc(), case.kc());
    for (row, h) in masked_rows(case) {
        let cols = row * qc + h * d..row * qc + (h + 1) * d;
        if out[cols.clone()].iter().any(|&x| x != 0.0) {
            return Err(format!("out of row {row} head {h} (sees no key) is not 0"));
        }
        if g.is_some_and(|g| g.dq[cols].iter().any(|&x| x != 0.0)) {
            return Err(format!("dq of row {row} head {h} (sees no key) is not 0"));
        }
    }
    if let Some(g) = g {
        for row in unseen_keys(case) {
            let cols = row * kc..(row + 1) * kc;
            if g.dk[cols.clone()]
                .iter()
                .chain(&g.dv[cols])
                .any(|&x| x != 0.0)
            {
                return Err(format!(
                    "dk / dv of key row {row} (no query sees it) is not 0"
                ));
            }
        }
    }
    Ok(())
}

impl Job<'_> {
    /// Where byte `at` of buffer `buf` is: "row r column c of <operand>" or the buffer offset.
    fn locate(&self, buf: usize, at: usize) -> String {
        for op in self.operands.iter().filter(|o| o.buf == buf) {
            let row_bytes = op.stride * op.elem as usize;
            if at < op.offset_bytes || row_bytes == 0 {
                continue;
            }
            let (r, c) = (
                (at - op.offset_bytes) / row_bytes,
                (at - op.offset_bytes) % row_bytes / op.elem as usize,
            );
            if r < op.rows && c < op.cols {
                return format!("{} row {r} column {c}", op.name);
            }
        }
        format!("{} byte {at}", self.buf_names[buf])
    }
}

/// Of a buffer of `len` bytes, the bytes inside the rows of `ops` (operands of that buffer).
fn rows_mask<'o>(len: usize, ops: impl Iterator<Item = &'o Operand>) -> Vec<bool> {
    let mut mask = vec![false; len];
    for op in ops {
        let e = op.elem as usize;
        for r in 0..op.rows {
            let at = op.offset_bytes + r * op.stride * e;
            mask[at..at + op.cols * e]
                .iter_mut()
                .for_each(|x| *x = true);
        }
    }
    mask
}

/// Runs a job in both modes: both runs' buffers, after checking that the second gives the same
/// bits, except in the rows of the operands named in `may_differ` (outputs summed by atomics,
/// whose order the two runs change).
fn run_both<'a>(
    exe: &Path,
    job: impl Fn(Mode) -> Job<'a>,
    may_differ: &[&str],
) -> Result<(Vec<Bytes>, Vec<Bytes>, String), String> {
    let first = job(Mode::EagerAscending);
    let (a, log) = first.run(exe)?;
    let (b, _) = job(Mode::LateDescending)
        .run(exe)
        .map_err(|e| format!("late cp.async, descending order: {e}"))?;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let exempt = rows_mask(
            x.len(),
            first
                .operands
                .iter()
                .filter(|o| o.buf == i && may_differ.contains(&o.name)),
        );
        let differs = x
            .as_ref()
            .iter()
            .zip(y.as_ref())
            .zip(&exempt)
            .position(|((p, q), &ex)| !ex && p != q);
        if let Some(at) = differs {
            return Err(format!(
                "{} differs between the run with eager cp.async and threads, warps and blocks in \
                 ascending order and the run with late cp.async in descending order (a race or \
                 a missing wait)",
                first.locate(i, at)
            ));
        }
    }
    Ok((a, b, log))
}

/// A case and the forward launches' head / sequence chunk.
struct SimCase {
    case: AttnCase,
    split: usize,
}

impl SimCase {
    fn what(&self) -> String {
        if self.split < MAX_GRID_YZ {
            format!(
                "{} [forward in launches of ≤ {} heads × sequences]",
                self.case.what, self.split
            )
        } else {
            self.case.what.clone()
        }
    }
}

fn check_case(sim: &Simulator, sc: &SimCase) -> Result<Errors, String> {
    let exe = &sim.exe;
    let case = &sc.case;
    let t0 = Instant::now();
    let cpu = Device::Cpu(Context::cpu());
    let mut e = Errors::default();

    // Forward.
    let bufs = case.fwd_bufs();
    let (after, _, log) = run_both(
        exe,
        |m| forward_job(case, &bufs, m, sc.split, Fwd::Rows),
        &[],
    )
    .map_err(|e| format!("forward: {e}"))?;
    e.log += &log;
    let fwd = case
        .fwd_outputs(&bufs, &after)
        .map_err(|e| format!("forward: {e}"))?;
    let (res, before, cpu_after) = case.run_fwd(&cpu);
    res.expect("CPU forward");
    let want = case
        .fwd_outputs(&before, &cpu_after)
        .expect("CPU forward outputs");
    e.out = close("out", &fwd.out, &want.out, tol(case.dtype))?;
    e.lse = check_lse(&fwd.lse, &want.lse)?;
    check_zeros(case, &fwd.out, None)?;
    // The D = 128 split kernel (`DK_ATTENTION_FWD=wide`): the same checks. (Its unnormalised O
    // is bitwise the 16-row kernel's; the row sum adds two halves, so out and LSE differ from it
    // in the last bits.)
    if case.d() == 128 {
        let (after, _, log) = run_both(
            exe,
            |m| forward_job(case, &bufs, m, sc.split, Fwd::Split),
            &[],
        )
        .map_err(|e| format!("forward, split kernel: {e}"))?;
        e.log += &log;
        let split = case
            .fwd_outputs(&bufs, &after)
            .map_err(|e| format!("forward, split kernel: {e}"))?;
        e.out_split = close("out (split)", &split.out, &want.out, tol(case.dtype))
            .map_err(|e| format!("forward, split kernel: {e}"))?;
        check_lse(&split.lse, &want.lse).map_err(|e| format!("forward, split kernel: {e}"))?;
        check_zeros(case, &split.out, None).map_err(|e| format!("forward, split kernel: {e}"))?;
    }
    // The wgmma kernel (both head dimensions): the same checks. (Its 128-key tiles rescale the
    // running sums at other points than the 64-key tiles of the other kernels, so out agrees with
    // the 16-row kernel's only to within the output rounding.)
    if sim.wgmma {
        let what = "forward, wgmma kernel";
        let (after, _, log) = run_both(
            exe,
            |m| forward_job(case, &bufs, m, sc.split, Fwd::Wgmma),
            &[],
        )
        .map_err(|e| format!("{what}: {e}"))?;
        e.log += &log;
        let wg = case
            .fwd_outputs(&bufs, &after)
            .map_err(|e| format!("{what}: {e}"))?;
        e.out_wgmma = Some(
            close("out (wgmma)", &wg.out, &want.out, tol(case.dtype))
                .map_err(|e| format!("{what}: {e}"))?,
        );
        check_lse(&wg.lse, &want.lse).map_err(|e| format!("{what}: {e}"))?;
        check_zeros(case, &wg.out, None).map_err(|e| format!("{what}: {e}"))?;
    }

    // Backward from the emulated forward's out and LSE.
    let bufs = case.bwd_bufs(&fwd.out, &fwd.lse);
    let (after, _, log) = run_both(
        exe,
        |m| backward_job(case, &bufs, m, false, Bwd::Narrow),
        &[],
    )
    .map_err(|e| format!("backward: {e}"))?;
    e.log += &log;
    let grads = case
        .bwd_outputs(&bufs, &after)
        .map_err(|e| format!("backward: {e}"))?;
    let (res, before, cpu_after) = case.run_bwd(&cpu, &fwd.out, &fwd.lse);
    res.expect("CPU backward");
    let want = case
        .bwd_outputs(&before, &cpu_after)
        .expect("CPU backward outputs");
    let floor = grad_floor(case);
    e.dq = close_floor("dq", &grads.dq, &want.dq, tol(case.dtype), floor)?;
    e.dk = close_floor("dk", &grads.dk, &want.dk, tol(case.dtype), floor)?;
    e.dv = close("dv", &grads.dv, &want.dv, tol(case.dtype))?;
    check_zeros(case, &fwd.out, Some(&grads))?;

    // Atomic-dQ mode: dK and dV bitwise those of the deterministic mode (same kernels' order of
    // operations), dQ of both runs (different addition orders) within tolerance.
    //
    // The 128-key dK/dV kernels (`DK_ATTENTION_BWD=wide`): each dV element sums the same 16-query
    // MMA terms in the same order as the 64-key kernel (the extra terms of rows a key does not
    // see are exact zeros), so dv is bitwise the 64-key kernel's; so is the deterministic dq of
    // the 128-row dQ kernel (the same 16-key MMA terms in the same order as the 64-row one). dk is not: its dS = P∘(dP − Delta) takes P rounded to the input
    // type (read back from the Pᵀ tile), where the 64-key kernel keeps P in f32; it is checked
    // against the reference instead.
    let wide_det = run_both(exe, |m| backward_job(case, &bufs, m, false, Bwd::Wide), &[])
        .map_err(|e| format!("backward, 128-key dK/dV: {e}"))?;
    e.log += &wide_det.2;
    let wide_grads = case
        .bwd_outputs(&bufs, &wide_det.0)
        .map_err(|e| format!("backward, 128-key dK/dV: {e}"))?;
    if wide_grads.dv != grads.dv || wide_grads.dq != grads.dq {
        return Err(
            "backward, 128-key dK/dV and 128-row dQ: dv or dq not bitwise the 64-row \
                    kernels'"
                .into(),
        );
    }
    e.dk_wide = close_floor(
        "dk (128-key)",
        &wide_grads.dk,
        &want.dk,
        tol(case.dtype),
        floor,
    )
    .map_err(|e| format!("backward, 128-key dK/dV: {e}"))?;
    check_zeros(case, &fwd.out, Some(&wide_grads))
        .map_err(|e| format!("backward, 128-key dK/dV: {e}"))?;
    for wide in [false, true] {
        let what = if wide {
            "backward, 128-key dK/dV, atomic dQ"
        } else {
            "backward, atomic dQ"
        };
        let kind = if wide { Bwd::Wide } else { Bwd::Narrow };
        let (first, second, log) =
            run_both(exe, |m| backward_job(case, &bufs, m, true, kind), &["dq"])
                .map_err(|e| format!("{what}: {e}"))?;
        e.log += &log;
        for (run, after) in [("ascending", &first), ("descending", &second)] {
            let g = case
                .bwd_outputs(&bufs, after)
                .map_err(|e| format!("{what}, {run} run: {e}"))?;
            let same_dk = if wide { &wide_grads.dk } else { &grads.dk };
            if &g.dk != same_dk || g.dv != grads.dv {
                return Err(format!(
                    "{what}, {run} run: dk / dv differ from the deterministic mode's"
                ));
            }
            let err = close_floor("dq (atomic)", &g.dq, &want.dq, tol(case.dtype), floor)
                .map_err(|e| format!("{what}, {run} run: {e}"))?;
            e.dq_atomic = e.dq_atomic.max(err);
            check_zeros(case, &fwd.out, Some(&g)).map_err(|e| format!("{what}, {run} run: {e}"))?;
        }
    }
    // The wgmma backward (`DK_ATTENTION_BWD=wgmma`, deterministic: Delta, then kernels 11 and
    // 12): the checks of the 128-key kernels against the reference, for all three gradients.
    // Not bitwise the mma.sync kernels': wgmma sums 16-element k-steps in its own order, and dK
    // and dV take Pᵀ and dSᵀ rounded to the element type as A operands (like the 128-key dK).
    if sim.wgmma_bwd {
        let what = "backward, wgmma dK/dV and dQ";
        let (after, _, log) = run_both(
            exe,
            |m| backward_job(case, &bufs, m, false, Bwd::Wgmma),
            &[],
        )
        .map_err(|e| format!("{what}: {e}"))?;
        e.log += &log;
        let g = case
            .bwd_outputs(&bufs, &after)
            .map_err(|e| format!("{what}: {e}"))?;
        let t = tol(case.dtype);
        let errs = [
            close_floor("dq (wgmma)", &g.dq, &want.dq, t, floor),
            close_floor("dk (wgmma)", &g.dk, &want.dk, t, floor),
            close("dv (wgmma)", &g.dv, &want.dv, t),
        ];
        let mut got = [0.0; 3];
        for (x, err) in got.iter_mut().zip(errs) {
            *x = err.map_err(|e| format!("{what}: {e}"))?;
        }
        e.wgmma_bwd = Some(got);
        check_zeros(case, &fwd.out, Some(&g)).map_err(|e| format!("{what}: {e}"))?;
    }
    e.secs = t0.elapsed().as_secs_f64();
    Ok(e)
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

fn cases(rng: &mut Rng) -> Vec<SimCase> {
    let sep = Layout::Separate { pad: 8 };
    let mut out = Vec::new();
    let mut add = |dtype, d, seqs: Seqs, hq, hkv, causal, layout, scale: Option<f32>| {
        let mut params = AttentionParams::new(hq, hkv, d).causal(causal);
        params.softmax_scale = scale;
        out.push(AttnCase::random(rng, dtype, seqs, params, layout));
    };
    use DType::{BF16, F16};
    for (dtype, d) in [(BF16, 64), (F16, 128), (F16, 64), (BF16, 128)] {
        // Lengths off every tile size, two sequences, no mask.
        add(dtype, d, Seqs::padded(2, 77, 77), 1, 1, false, sep, None);
        // Causal, Sq < Sk (the diagonal crosses key tiles) and Sq > Sk (rows that see no key).
        add(dtype, d, Seqs::padded(1, 45, 130), 3, 1, true, sep, None);
        add(dtype, d, Seqs::padded(1, 140, 50), 3, 3, true, sep, None);
        // Several query and key tiles: the K/V pipeline, masked then unmasked key tiles, the
        // dK/dV loop over query tiles and heads of the group.
        add(dtype, d, Seqs::padded(1, 300, 300), 2, 1, true, sep, None);
        // Varlen: an empty sequence, length-1 sequences, queries without keys, keys without
        // queries, causal.
        add(
            dtype,
            d,
            Seqs::varlen(&[5, 0, 1, 70, 33, 2], &[40, 3, 1, 0, 90, 0]),
            2,
            1,
            true,
            sep,
            None,
        );
        // No query rows at all (dK = dV = 0 written), and no key rows at all (out 0, LSE −∞,
        // dQ 0).
        add(
            dtype,
            d,
            Seqs::varlen(&[0, 0], &[3, 70]),
            2,
            1,
            false,
            sep,
            None,
        );
        add(
            dtype,
            d,
            Seqs::varlen(&[5, 66], &[0, 0]),
            2,
            2,
            true,
            sep,
            None,
        );
    }
    for (dtype, d) in [(BF16, 64), (F16, 128)] {
        // Varlen without the mask, loose bounds (blocks past every sequence).
        add(
            dtype,
            d,
            Seqs::varlen(&[1, 66, 0, 17], &[1, 0, 65, 130]).loose_bounds(40, 70),
            3,
            3,
            false,
            sep,
            None,
        );
        // A sharp softmax (large scale: exponents far below 0 underflow), long keys.
        add(
            dtype,
            d,
            Seqs::padded(1, 70, 200),
            1,
            1,
            false,
            sep,
            Some(2.0),
        );
    }
    for (dtype, d) in [(F16, 64), (BF16, 128)] {
        // q, k, v sliced from a fused qkv buffer (token stride (Hq + 2 Hkv)·D), gradients into
        // a packed dqkv buffer.
        add(
            dtype,
            d,
            Seqs::padded(2, 40, 40),
            3,
            1,
            true,
            Layout::Fused,
            None,
        );
        // GQA 8:1.
        add(dtype, d, Seqs::padded(1, 97, 97), 8, 1, true, sep, None);
        add(
            dtype,
            d,
            Seqs::varlen(&[20, 1, 9], &[9, 20, 1]),
            8,
            1,
            false,
            Layout::Fused,
            None,
        );
        // Length-1 sequences: all 1 × 1 (dq = dk = 0 up to rounding, see grad_floor), and
        // length-1 queries with one sequence of 3 keys (dq meaningful).
        add(dtype, d, Seqs::padded(3, 1, 1), 8, 2, true, sep, None);
        add(
            dtype,
            d,
            Seqs::varlen(&[1, 1, 1], &[1, 3, 1]),
            8,
            2,
            true,
            sep,
            None,
        );
    }
    let mut out: Vec<SimCase> = out
        .into_iter()
        .map(|case| {
            // GQA 8:1 and six-sequence batches: the forward also in launches of at most 2 heads
            // and 2 sequences each, so the kernel's head_offset and batch_offset are used (the
            // launcher splits only above 65535).
            let split = if case.hq() == 8 || case.seqs.batch() >= 6 {
                2
            } else {
                MAX_GRID_YZ
            };
            SimCase { case, split }
        })
        .collect();
    for _ in 0..RANDOM_CASES {
        let case = random_case(rng);
        let split = [MAX_GRID_YZ, MAX_GRID_YZ, 1, 2][rng.below(0, 4)];
        out.push(SimCase { case, split });
    }
    out
}

/// Random cases per run, on top of the fixed ones (new shapes every run; the seed replays them).
const RANDOM_CASES: usize = 10;

/// A random shape: dtype, D, heads, mask, padded or varlen lengths up to 160 (empty sequences
/// included), loose bounds, row padding 0..16 or fused qkv, sometimes a custom scale.
fn random_case(rng: &mut Rng) -> AttnCase {
    let dtype = [DType::BF16, DType::F16][rng.below(0, 2)];
    let d = [64, 128][rng.below(0, 2)];
    let (hq, hkv) = [(1, 1), (2, 1), (3, 3), (4, 2), (6, 3), (8, 1), (8, 4)][rng.below(0, 7)];
    let causal = rng.below(0, 2) == 1;
    let seqs = if rng.below(0, 2) == 0 {
        let (sq, sk) = (rng.below(1, 161), rng.below(1, 161));
        let sk = if rng.below(0, 3) == 0 { sq } else { sk };
        Seqs::padded(rng.below(1, 3), sq, sk)
    } else {
        let b = rng.below(1, 5);
        let len = |rng: &mut Rng| {
            if rng.below(0, 5) == 0 {
                0
            } else {
                rng.below(1, 161)
            }
        };
        let q: Vec<usize> = (0..b).map(|_| len(rng)).collect();
        let k: Vec<usize> = (0..b).map(|_| len(rng)).collect();
        let (eq, ek) = if rng.below(0, 3) == 0 {
            (rng.below(0, 70), rng.below(0, 70))
        } else {
            (0, 0)
        };
        Seqs::varlen(&q, &k).loose_bounds(eq, ek)
    };
    let layout = if seqs.total_q() == seqs.total_k() && rng.below(0, 2) == 0 {
        Layout::Fused
    } else {
        Layout::Separate {
            pad: 8 * rng.below(0, 3),
        }
    };
    let mut params = AttentionParams::new(hq, hkv, d).causal(causal);
    if rng.below(0, 4) == 0 {
        params.softmax_scale = Some(rng.range(0.05, 1.5) as f32);
    }
    AttnCase::random(rng, dtype, seqs, params, layout)
}

#[test]
fn attention_kernels_match_the_cpu_backend() {
    let Some(sim) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh(TEST);
    let all = cases(&mut rng);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<Errors, String>)>> = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(all.len());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= all.len() {
                    break;
                }
                let r = check_case(&sim, &all[i]);
                results.lock().unwrap().push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);
    let mut failures = Vec::new();
    for (i, r) in &results {
        let what = all[*i].what();
        match r {
            Ok(e) => {
                let wgmma = e
                    .out_wgmma
                    .map_or("skipped".to_string(), |x| format!("{x:.1e}"));
                let wg = |i: usize| {
                    e.wgmma_bwd
                        .map_or("skipped".to_string(), |x| format!("{:.1e}", x[i]))
                };
                eprintln!(
                    "ok   {what}: out {:.1e} (split {:.1e}, wgmma {wgmma}) lse {:.1e} dq {:.1e} \
                     (atomic {:.1e}, wgmma {}) dk {:.1e} (128-key {:.1e}, wgmma {}) dv {:.1e} \
                     (wgmma {}) ({:.1}s)",
                    e.out,
                    e.out_split,
                    e.lse,
                    e.dq,
                    e.dq_atomic,
                    wg(0),
                    e.dk,
                    e.dk_wide,
                    wg(1),
                    e.dv,
                    wg(2),
                    e.secs
                );
                if std::env::var_os("DK_ATTENTION_SIM_LOG").is_some() {
                    eprint!("{}", e.log);
                }
            }
            Err(msg) => {
                eprintln!("FAIL {what}: {msg}");
                failures.push(format!("{what}: {msg}"));
            }
        }
    }
    eprintln!(
        "{} cases, {} failed, {:.1}s on {workers} threads",
        all.len(),
        failures.len(),
        t0.elapsed().as_secs_f64()
    );
    for (checked, name) in [(sim.wgmma, WGMMA_SOURCE), (sim.wgmma_bwd, WGMMA_BWD_SOURCE)] {
        if !checked {
            visible(&format!(
                "NOTE {TEST}: {} (cuda/{name}) was NOT checked: the file does not exist or \
                 DK_ATTENTION_SIM_NO_WGMMA is set",
                wgmma_what(name)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "the emulated attention kernels failed {} case(s) (seed in the output above):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Bytes outside every writable operand's rows are unchanged (inputs, padding, slack).
fn untouched_outside_outputs(job: &Job<'_>, after: &[Bytes]) -> Result<(), String> {
    for (b, (before, after)) in job.bufs.iter().zip(after).enumerate() {
        let inside = rows_mask(
            before.len(),
            job.operands.iter().filter(|o| o.writable && o.buf == b),
        );
        let changed = before
            .as_ref()
            .iter()
            .zip(after.as_ref())
            .zip(&inside)
            .position(|((x, y), &ins)| !ins && x != y);
        if let Some(at) = changed {
            return Err(format!("{} was written", job.locate(b, at)));
        }
    }
    Ok(())
}

/// Garbage `cu_seqlens` (negative, decreasing, past the row counts, i32::MIN / i32::MAX): the
/// kernels clamp the offsets into the rows that exist (src/attention/mod.rs, `Batch::Varlen`),
/// so every access must stay inside the operands' rows and nothing outside dq, dk, dv, out and
/// the LSE may change. The results are meaningless and not checked (sequences overlap, so an
/// output chunk may be stored twice, and rows may be left unwritten).
#[test]
fn garbage_offsets_stay_in_bounds() {
    let Some(sim) = simulator() else {
        return;
    };
    let exe = sim.exe.clone();
    let mut rng = Rng::fresh("attention_kernel_sim_garbage");
    let cu =
        |v: &[i32]| Bytes::from_slice(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    let garbage_q = cu(&[0, 500, -3, 40, 30, i32::MIN]);
    let garbage_k = cu(&[3, 50, -4, 2000, i32::MAX, 5]);
    let mut failures = Vec::new();
    for (dtype, d) in [
        (DType::BF16, 64),
        (DType::F16, 128),
        (DType::F16, 64),
        (DType::BF16, 128),
    ] {
        for causal in [false, true] {
            let seqs = Seqs::varlen(&[10, 20, 30, 0, 5], &[15, 25, 35, 3, 0]).loose_bounds(100, 60);
            let params = AttentionParams::new(4, 2, d).causal(causal);
            let case = AttnCase::random(&mut rng, dtype, seqs, params, Layout::Separate { pad: 8 });
            let mut fwd = case.fwd_bufs();
            fwd[fwd_buf::CU_Q] = garbage_q.clone();
            fwd[fwd_buf::CU_K] = garbage_k.clone();
            let out: Vec<f64> = case.q.iter().map(|x| 0.5 * x).collect();
            let lse: Vec<f32> = (0..case.lse_len())
                .map(|i| {
                    if i % 7 == 3 {
                        f32::NEG_INFINITY
                    } else {
                        rng.range(2.0, 6.0) as f32
                    }
                })
                .collect();
            let mut bwd = case.bwd_bufs(&out, &lse);
            bwd[bwd_buf::CU_Q] = garbage_q.clone();
            bwd[bwd_buf::CU_K] = garbage_k.clone();
            for mode in [Mode::EagerAscending, Mode::LateDescending] {
                let split = if d == 128 { Fwd::Split } else { Fwd::Rows };
                let mut jobs = vec![
                    forward_job(&case, &fwd, mode, MAX_GRID_YZ, Fwd::Rows),
                    forward_job(&case, &fwd, mode, MAX_GRID_YZ, split),
                    backward_job(&case, &bwd, mode, false, Bwd::Narrow),
                    backward_job(&case, &bwd, mode, true, Bwd::Narrow),
                    backward_job(&case, &bwd, mode, false, Bwd::Wide),
                    backward_job(&case, &bwd, mode, true, Bwd::Wide),
                ];
                if sim.wgmma {
                    jobs.push(forward_job(&case, &fwd, mode, MAX_GRID_YZ, Fwd::Wgmma));
                }
                if sim.wgmma_bwd {
                    jobs.push(backward_job(&case, &bwd, mode, false, Bwd::Wgmma));
                }
                for job in &mut jobs {
                    job.single_stores = false;
                    let wide = job.launches.iter().any(|l| l.kernel >= 6);
                    let wgmma = job.launches.iter().any(|l| l.kernel >= 10);
                    let what = match (job.backward, job.atomic_dq, wide) {
                        (false, _, true) if wgmma => "forward (wgmma)",
                        (true, false, true) if wgmma => "backward (wgmma dK/dV and dQ)",
                        (false, _, true) => "forward (split)",
                        (false, _, false) => "forward",
                        (true, false, false) => "backward",
                        (true, true, false) => "backward (atomic dQ)",
                        (true, false, true) => "backward (128-key dK/dV)",
                        (true, true, true) => "backward (128-key dK/dV, atomic dQ)",
                    };
                    let res = job
                        .run(&exe)
                        .and_then(|(after, _)| untouched_outside_outputs(job, &after));
                    if let Err(e) = res {
                        failures.push(format!("{} {what} {mode:?}: {e}", case.what));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "garbage offsets led outside the operands:\n{}",
        failures.join("\n")
    );
}

/// The wgmma emulation itself (tests/attention_sim/wgmma_selfcheck.cpp, built against the
/// emulator's dk_wgmma.cuh): a hand-written kernel's ss (m64n128k16) and rs (m64n64k16,
/// m64n128k16) products, its operands written into swizzled shared memory by plain index
/// arithmetic, are bitwise the CPU products in both timing models and orders; every rule the
/// emulator enforces fires on a kernel that breaks it (exit status 3 and its message), and the
/// comparison itself catches a wrong layout and accumulators read before their wait.
#[test]
fn wgmma_emulation_self_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let sim_dir = root.join("tests/attention_sim");
    let Some(exe) = build_kernel_simulator(
        "attention_wgmma_selfcheck",
        &sim_dir.join("wgmma_selfcheck.cpp"),
        &[sim_dir.clone(), root.join("cuda/include")],
        &["-Wno-unknown-pragmas"],
    ) else {
        return;
    };
    /// What a run must end in.
    #[derive(Clone, Copy)]
    enum Want {
        Pass,
        /// Exit status 1, a result differing from the CPU product (the message part).
        Mismatch(&'static str),
        /// Exit status 3, an emulator error (the message part).
        Error(&'static str),
    }
    use Want::{Error, Mismatch, Pass};
    // Mode, then what the EAGER run (ascending order) and the LATE run (descending) end in.
    let both = |w: Want| (w, w);
    let modes: Vec<(&str, (Want, Want))> =
        vec![
        ("ok", both(Pass)),
        ("ok_base", both(Pass)),
        ("unswizzled", both(Mismatch("D1["))),
        ("read_early", (Pass, Mismatch("= nan"))),
        ("cp_inflight", (Pass, Error("while a cp.async into chunk"))),
        ("a_changed", both(Error("A fragment register a[1] of a pending wgmma"))),
        (
            "acc_written",
            both(Error("accumulator register d[5] of a pending wgmma was written")),
        ),
        ("st_busy", both(Error("st.shared.b32 writes shared bytes"))),
        ("cp_busy", both(Error("cp.async destination writes shared bytes"))),
        ("v4_busy", both(Error("16-byte store writes shared bytes"))),
        (
            "exit_pending",
            both(Error("exits with 1 wgmma groups not waited for")),
        ),
        ("exit_open", both(Error("exits with 1 wgmma not committed"))),
        (
            "wait_open",
            both(Error("wgmma_wait<0> with 1 wgmma not committed")),
        ),
        ("no_fence", both(Error("wgmma without a wgmma_fence"))),
        ("no_fence_batch", both(Error("wgmma without a wgmma_fence"))),
        (
            "no_proxy_fence",
            both(Error(
                "through the generic proxy (a store or a landed cp.async) by thread 37 (warp 1 \
                 lane 5)",
            )),
        ),
        (
            "no_proxy_fence_cp",
            both(Error("last written through the generic proxy")),
        ),
        ("bad_swizzle", both(Error("has swizzle mode 2"))),
        ("bad_base", both(Error("has matrix base offset 1"))),
        ("reserved", both(Error("sets reserved bits 0x0000000000004000"))),
        (
            "oob",
            both(Error(
                "wgmma B operand element of 2 bytes at offset 70656, outside the 70656 bytes",
            )),
        ),
        (
            "unaligned",
            both(Error("below the dynamic shared memory (which starts at 400")),
        ),
        ("diverged_desc", both(Error("differs between its warps"))),
        (
            "lane_diverged",
            both(Error("lanes of a warp pass different wgmma operands")),
        ),
        (
            "warp_skips",
            both(Error("warp 3 issued 7 wgmma, warp 0 of its warpgroup 8")),
        ),
    ];
    let t0 = Instant::now();
    let mut failures = Vec::new();
    let mut runs = 0;
    for (mode, (eager, late)) in modes {
        // The passing mode also in the other two combinations of timing model and order.
        let mut combos = vec![(false, false, eager), (true, true, late)];
        if mode.starts_with("ok") {
            combos.extend([(true, false, late), (false, true, eager)]);
        }
        for (late_model, reverse, want) in combos {
            runs += 1;
            let out = std::process::Command::new(&exe)
                .args([
                    mode,
                    if late_model { "1" } else { "0" },
                    if reverse { "1" } else { "0" },
                ])
                .output()
                .expect("run the wgmma self-check");
            let log = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
            let code = out.status.code();
            let ok = match want {
                Pass => code == Some(0),
                Mismatch(m) => code == Some(1) && log.starts_with("MISMATCH") && log.contains(m),
                Error(m) => {
                    code == Some(3)
                        && log.starts_with("EMULATOR ERROR: wgmma_selfcheck<bf16> block (0,0,0)")
                        && log.contains(m)
                }
            };
            let what = format!(
                "{mode} ({}, {})",
                if late_model { "late" } else { "eager" },
                if reverse { "descending" } else { "ascending" }
            );
            if ok {
                eprintln!("ok   {what}: {}", log.lines().next().unwrap_or(""));
            } else {
                let expected = match want {
                    Pass => "a pass".to_string(),
                    Mismatch(m) => format!("a mismatch (exit status 1) naming {m:?}"),
                    Error(m) => format!("an emulator error (exit status 3) naming {m:?}"),
                };
                failures.push(format!("{what}: {expected}, got {:?}:\n{log}", out.status));
            }
        }
    }
    eprintln!(
        "wgmma self-check: {runs} runs, {} failed, {:.1}s",
        failures.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "the wgmma emulation self-check failed:\n{}",
        failures.join("\n")
    );
}

// ------------------------------------------------------------------------------------------
// The hardware self-test kernels (cuda/attention_wgmma_selftest.cu) on the emulator
// ------------------------------------------------------------------------------------------

/// The self-test's source, staged next to the emulator's headers.
const SELFTEST_SOURCE: &str = "attention_wgmma_selftest.cu";

/// The unit test's tolerance: largest |got − want| over the largest |want|.
const SELFTEST_TOL: f64 = 1e-5;

/// The unit test's error measure (largest |got − want| over the largest |want|) of a
/// `rows` × `cols` result, and where the largest difference is; an element that is not finite
/// (the driver poisons the outputs with a NaN, so an element never written stays one; the LATE
/// model's accumulators are a NaN until their wait) is an error of its own, since f64::max
/// would pass over it.
fn selftest_error(got: &[f32], want: &[f64], cols: usize) -> Result<(f64, String), String> {
    assert_eq!(got.len(), want.len());
    let bad: Vec<usize> = (0..got.len()).filter(|&i| !got[i].is_finite()).collect();
    if let Some(&i) = bad.first() {
        return Err(format!(
            "{} elements not finite, the first C[{}][{}] = {}",
            bad.len(),
            i / cols,
            i % cols,
            got[i]
        ));
    }
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    let (at, err) = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .enumerate()
        .fold((0, 0f64), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    let e = err / scale;
    Ok((
        e,
        format!(
            "largest difference at C[{}][{}]: {} against {}",
            at / cols,
            at % cols,
            got[at],
            want[at]
        ),
    ))
}

/// The self-test driver's stdin for inputs a, b (ss, 64 × 128 each), p (rs, 64 × 64, sent as
/// f32) and v (rs, 64 × 128); the 16-bit ones rounded to bf16.
fn selftest_input(a: &[f32], b: &[f32], p: &[f32], v: &[f32]) -> Vec<u8> {
    let bf16_bytes = |x: &[f32]| -> Vec<u8> {
        x.iter()
            .flat_map(|&e| half::bf16::from_f32(e).to_bits().to_ne_bytes())
            .collect()
    };
    let mut input = 0x5453_4b44u32.to_ne_bytes().to_vec();
    input.extend(bf16_bytes(a));
    input.extend(bf16_bytes(b));
    input.extend(p.iter().flat_map(|e| e.to_ne_bytes()));
    input.extend(bf16_bytes(v));
    input
}

/// One run of the self-test driver (tests/attention_sim/wgmma_selftest_sim.cpp) on `input`: the
/// ss result (64 × 64) followed by the rs result (64 × 128), or why there is none.
/// `offsets`: the kernels' (LBO, SBO) and the launch's dynamic shared memory, for the unit
/// test's failure diagnosis; `None` for the kernels' own descriptors and the unit test's launch.
fn run_selftest_driver(
    exe: &Path,
    input: &[u8],
    late: bool,
    reverse: bool,
    base: u32,
    offsets: Option<(u32, u32, u32)>,
) -> Result<Vec<f32>, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let flag = |b: bool| if b { "1" } else { "0" };
    let mut args = vec![
        flag(late).to_string(),
        flag(reverse).to_string(),
        base.to_string(),
    ];
    if let Some((lbo, sbo, smem)) = offsets {
        args.extend([lbo, sbo, smem].map(|v| v.to_string()));
    }
    let mut child = Command::new(exe)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the self-test driver");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input)
        .expect("write the driver's input");
    let out = child
        .wait_with_output()
        .expect("wait for the self-test driver");
    if !out.status.success() || out.stdout.len() != 4 * (64 * 64 + 64 * 128) {
        return Err(format!(
            "{:?}, {} bytes of output:\n{}",
            out.status,
            out.stdout.len(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    Ok(out
        .stdout
        .chunks_exact(4)
        .map(|w| f32::from_ne_bytes(w.try_into().unwrap()))
        .collect())
}

/// The hardware self-test kernels of cuda/attention_wgmma_selftest.cu (run on a GPU by the unit
/// test `wgmma_layouts_on_the_device`, src/attention/cuda/selftest.rs), the REAL source staged
/// like the attention kernels and built into tests/attention_sim/wgmma_selftest_sim.cpp: with
/// the unit test's launch and inputs, both products (ss: C = A·Bᵀ, rs: C = P·V) are within its
/// tolerance of the f64 products, and every output element is written, in both timing models,
/// both orders, and with the dynamic shared memory at shared address 0, 400 and 16 (aligned to
/// 16 bytes only; at 16 the kernels' alignment to 1024 bytes takes all but 16 bytes of the 1 KiB
/// of slack). So the kernels' own logic (tile loads, descriptors, the gather of P into A
/// fragments, the store of the accumulators) agrees with the emulator's reading of the PTX ISA
/// layouts: if the unit test fails on a device, that reading is what is wrong.
#[test]
fn wgmma_selftest_kernels_on_the_emulator() {
    const NAME: &str = "attention_wgmma_selftest";
    if std::env::var_os("DK_ATTENTION_SIM_NO_WGMMA").is_some_and(|v| v != "0") {
        visible(&format!(
            "NOTE {NAME}: DK_ATTENTION_SIM_NO_WGMMA is set: cuda/{SELFTEST_SOURCE} is NOT checked"
        ));
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let sim_dir = root.join("tests/attention_sim");
    let stage = scratch_dir(NAME).join("kernel");
    std::fs::create_dir_all(&stage).expect("create the staging directory");
    let source = root.join("cuda").join(SELFTEST_SOURCE);
    std::fs::copy(&source, stage.join(SELFTEST_SOURCE))
        .unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
    stage_headers(&stage);
    let t0 = Instant::now();
    let Some(exe) = build_kernel_simulator(
        NAME,
        &sim_dir.join("wgmma_selftest_sim.cpp"),
        &[stage, sim_dir],
        &["-Wno-unknown-pragmas"],
    ) else {
        return;
    };
    let built = t0.elapsed().as_secs_f64();

    // The unit test's inputs and f64 products (the same function builds both).
    let distill_kernels::WgmmaSelftestCase {
        a,
        b,
        p,
        v,
        want_ss,
        want_rs,
    } = distill_kernels::wgmma_selftest_case();
    let input = selftest_input(&a, &b, &p, &v);

    let t1 = Instant::now();
    let mut failures = Vec::new();
    let combos: Vec<(bool, bool, u32)> = [false, true]
        .into_iter()
        .flat_map(|late| [false, true].map(|reverse| (late, reverse)))
        .flat_map(|(late, reverse)| [0u32, 400, 16].map(|base| (late, reverse, base)))
        .collect();
    let mut failed_runs = 0;
    for &(late, reverse, base) in &combos {
        let before = failures.len();
        let what = format!(
            "{}, {}, shared memory at {base}",
            if late { "late" } else { "eager" },
            if reverse { "descending" } else { "ascending" }
        );
        let c = match run_selftest_driver(&exe, &input, late, reverse, base, None) {
            Ok(c) => c,
            Err(m) => {
                failures.push(format!("{what}: {m}"));
                failed_runs += 1;
                continue;
            }
        };
        let (c_ss, c_rs) = c.split_at(64 * 64);
        let mut line = format!("{what}:");
        for (kernel, got, want, cols) in [
            ("ss (C = A·Bᵀ)", c_ss, &want_ss, 64),
            ("rs (C = P·V)", c_rs, &want_rs, 128),
        ] {
            match selftest_error(got, want, cols) {
                Ok((e, _)) if e < SELFTEST_TOL => line += &format!(" {kernel} error {e:.3e};"),
                Ok((e, at)) => failures.push(format!(
                    "{what}: {kernel}: error {e:.3e}, over {SELFTEST_TOL:e}; {at}"
                )),
                Err(m) => failures.push(format!("{what}: {kernel}: {m}")),
            }
        }
        eprintln!("{line}");
        failed_runs += usize::from(failures.len() > before);
    }
    eprintln!(
        "wgmma self-test kernels on the emulator: {} runs, {failed_runs} failed; build {built:.1}s, \
         runs {:.2}s",
        combos.len(),
        t1.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "the hardware self-test kernels (cuda/{SELFTEST_SOURCE}) disagree with the emulator:\n{}",
        failures.join("\n")
    );

    // The unit test's failure diagnosis (src/attention/cuda/selftest_probe.rs), run here where
    // the reading is known, must report that reading: the probes map every operand element to
    // itself, and the offset sweep finds the kernels' own pairs and no pair that cannot be
    // right. A probe run computes both kernels, so the ss probes run beside the rs ones.
    let t2 = Instant::now();
    let (ss_probes, rs_probes) = (
        distill_kernels::wgmma_probes(false),
        distill_kernels::wgmma_probes(true),
    );
    let mut ss_out = Vec::new();
    let mut rs_out = Vec::new();
    for (i, sp) in ss_probes.iter().enumerate() {
        let rp = &rs_probes[i % rs_probes.len()];
        let input = selftest_input(&sp.left, &sp.right, &rp.left, &rp.right);
        let c = run_selftest_driver(&exe, &input, true, false, 16, None)
            .unwrap_or_else(|m| panic!("probe run {i}: {m}"));
        let (c_ss, c_rs) = c.split_at(64 * 64);
        ss_out.push(c_ss.to_vec());
        if i < rs_probes.len() {
            rs_out.push(c_rs.to_vec());
        }
    }
    let report = [
        distill_kernels::wgmma_map_report(&ss_probes, &ss_out),
        distill_kernels::wgmma_map_report(&rs_probes, &rs_out),
    ]
    .join("\n");
    assert_eq!(report.lines().count(), 3, "{report}");
    assert!(
        report
            .lines()
            .all(|l| l.ends_with("every element read where we place it")),
        "the probes misreport the emulator's layout:\n{report}"
    );

    // And a misreading shows: V's offsets swapped (LBO 1024, SBO 8192) move its elements.
    let swapped: Vec<Vec<f32>> = rs_probes
        .iter()
        .map(|rp| {
            let input = selftest_input(&a, &b, &rp.left, &rp.right);
            let offsets = Some((1024, 8192, distill_kernels::WGMMA_SWEEP_SMEM_BYTES));
            let c = run_selftest_driver(&exe, &input, false, false, 0, offsets)
                .unwrap_or_else(|m| panic!("probe run with swapped offsets: {m}"));
            c[64 * 64..].to_vec()
        })
        .collect();
    let report = distill_kernels::wgmma_map_report(&rs_probes, &swapped);
    assert!(
        report.contains("elements read from elsewhere") && report.contains("(0, 64) ← (8, 0)"),
        "the probes miss V read with its offsets swapped:\n{report}"
    );

    // The sweep: every pair, both kernels per run, with the sweep's shared memory. K-major
    // operands ignore LBO (SBO 1024 matches whatever LBO); V needs both of its offsets.
    let mut ss_match = Vec::new();
    let mut rs_match = Vec::new();
    let mut refused = 0;
    for lbo in distill_kernels::WGMMA_SWEEP_OFFSETS {
        for sbo in distill_kernels::WGMMA_SWEEP_OFFSETS {
            let offsets = Some((lbo, sbo, distill_kernels::WGMMA_SWEEP_SMEM_BYTES));
            let Ok(c) = run_selftest_driver(&exe, &input, false, false, 0, offsets) else {
                refused += 1;
                continue;
            };
            let (c_ss, c_rs) = c.split_at(64 * 64);
            if selftest_error(c_ss, &want_ss, 64).is_ok_and(|(e, _)| e < SELFTEST_TOL) {
                ss_match.push((lbo, sbo));
            }
            if selftest_error(c_rs, &want_rs, 128).is_ok_and(|(e, _)| e < SELFTEST_TOL) {
                rs_match.push((lbo, sbo));
            }
        }
    }
    let all_lbo_at_1024: Vec<(u32, u32)> = distill_kernels::WGMMA_SWEEP_OFFSETS
        .iter()
        .map(|&l| (l, 1024))
        .collect();
    eprintln!(
        "wgmma self-test diagnosis on the emulator: probes read as written; sweep of {} pairs \
         ({refused} runs stopped by the emulator): ss matches {ss_match:?}, rs {rs_match:?}; {:.2}s",
        distill_kernels::WGMMA_SWEEP_OFFSETS.len().pow(2),
        t2.elapsed().as_secs_f64()
    );
    assert_eq!(ss_match, all_lbo_at_1024, "ss pairs the sweep finds");
    assert_eq!(rs_match, vec![(8192, 1024)], "rs pairs the sweep finds");
}
