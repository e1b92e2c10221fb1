//! The persistent cluster divergence kernels (cuda/divergence_persistent.cu: `dk_divcp_*`, 512
//! threads, and `dk_divcp256_*`, 256 threads with two load steps in flight), checked without a
//! GPU. tests/kernel_sim replays their per-element arithmetic; this test runs their control
//! logic: the REAL kernel source is compiled for the host with the emulator of
//! tests/attention_sim/sim_core.h (every CUDA thread a fiber, warps in lockstep at shuffles,
//! __syncthreads, guarded memory) and its thread-block clusters: a cluster's C blocks run
//! together, the split cluster barrier (arrive / wait as converged warp collectives, each thread
//! alternating arrive and wait, no exit with an arrival not waited for, deadlocks reported) and
//! distributed shared memory (mapa, bounds-checked, reading the other block's shared memory as
//! its threads last published it with the cluster fence). The kernel source is staged into a
//! scratch directory next to tests/divergence_sim/dk_cluster.cuh, the only header replaced (it
//! holds the cluster PTX); how __CUDA_ARCH__ and dk_math.cuh's host versions are arranged is
//! explained in tests/divergence_sim/divergence_persistent_sim.cpp.
//!
//! Every case runs with the launcher's configuration (src/divergence/cuda.rs
//! `RowKernels::persistent`, src/divergence/cluster.rs `persistent_grid`): Q clusters of C
//! blocks (1-D grid, `PERSISTENT_SMEM_BYTES` of dynamic shared memory), 16-byte aligned rows,
//! Q ≤ n, and `scale` set as the prepare kernel would write it (batchmean: 1 / valid rows). Each
//! case runs twice, blocks of a cluster, warps and lanes in ascending and in descending order
//! (clusters one after the other, also in both orders), on poisoned outputs, and checks:
//! - the emulator's own checks (converged warps at every collective and cluster barrier, the
//!   barrier protocol, shared and distributed shared memory bounds, global accesses inside the
//!   operands' rows, stores only into outputs and each 16-byte output chunk at most once,
//!   guard regions around every buffer);
//! - both runs give bitwise the same buffers (a race between blocks or warps shows as a
//!   difference);
//! - per-row losses and gradients against the crate's CPU backend at DESIGN.md's tolerances
//!   (f32: 1e-5 relative norm; 16-bit: 1e-4 losses, 1e-2 gradients), over all rows and row by
//!   row; every output element written, padding and inputs untouched (except the gradient
//!   rows in place); NaN only in the NaN row;
//! - exact zeros: the loss and the gradient of ignored rows and of rows without a
//!   distribution (a side all −inf).
//!
//! Cases: forward KL, reverse KL, JSD (β = 0.5 and 0.25, and β = 0 / 1, which run the KL
//! kernels); f32, bf16 and f16 logits; C = 1, 2, 4, 8, 16; Q = 1..5 clusters walking up to 40
//! rows (and Q = n); rows of several 16-byte chunks per thread (both of the 256-thread shape's
//! loops) and tiny rows (blocks with empty slices), v not a multiple of 8 with padded strides
//! (the scalar tail); labels ignoring the first and last rows of clusters' walks, consecutive
//! rows of a walk, whole walks; fully masked rows (student, teacher, both all −inf), partly
//! masked rows; a NaN row; forward only, a separate gradient and the gradient in place over
//! the student logits; temperatures ≠ 1. Plus random cases drawn from the printed seed.
//!
//! The fused linear divergence's variant (`dk_divcp_fused_*`, `dk_divcp256_fused_*`: G with the
//! softcap slope in the GEMMs' dtype, written Q rows before S over the rows the clusters walked
//! before) has its own cases and checks (`fused_persistent_kernels_write_g_q_rows_before_s`),
//! and a negative test that the race of G over its own rows is seen
//! (`fused_persistent_g_over_its_own_rows_is_seen_to_race`).
//!
//! The staged kernels (`dk_divcq_*`, cuda/divergence_staged.cu) run the same cases, their fused
//! variant G over its own rows; their JSD stashes (cuda/DIVERGENCE.md, versions 10 and 11) are
//! checked against the CPU backend too, and version 10's to change no bit
//! (`staged_jsd_stash_changes_no_bit`, `fused_staged_jsd_stash_changes_no_bit`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::fused_chunk::{self, chunk_logits, g_tol, reference_row, ChunkParams};
use common::*;
use distill_kernels::divergence::{kernel_kind_tag, Kind, Params, Reduction};
use distill_kernels::{Context, DType};

const TEST: &str = "divergence_persistent_sim";

/// `PERSISTENT_SMEM_BYTES` of src/divergence/cluster.rs (`kClusterScratchBytes` in the kernels).
const PERSISTENT_SMEM_BYTES: u32 = 1024;

/// The staged kernels' dynamic shared memory, as src/divergence/cluster.rs `staged_smem_bytes`
/// sizes it: the scratch (`kClusterScratchBytes`), then two buffers of the block's slice of
/// both inputs, then `stash_bytes` per slice element (the JSD stash of a 16-bit teacher: 4; the
/// driver checks the same formula).
fn staged_smem_bytes(v: usize, c: usize, pair_bytes: usize, stash_bytes: usize) -> u32 {
    let slice = v.div_ceil(c).next_multiple_of(8);
    PERSISTENT_SMEM_BYTES + (slice * (2 * pair_bytes + stash_bytes)) as u32
}

/// What the staged JSD kernels keep between their passes (src/divergence/cluster.rs `Stash`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stash {
    Off,
    /// Version 10 (`DK_ARGS_STASH_JSD`): log2(q/m), over an f32 teacher's slice or in a slice
    /// of its own.
    LogRatio,
    /// Version 11 (`DK_ARGS_STASH_JSD_EXP` too): also the statistics pass's exponentials, in
    /// two slices of their own.
    Exp,
}

impl Stash {
    /// The kernel arguments' `options` (cuda/include/dk_divergence_args.h).
    fn options(self) -> u32 {
        match self {
            Stash::Off => 0,
            Stash::LogRatio => 1,
            Stash::Exp => 3,
        }
    }

    /// Shared memory per slice element beyond the row buffers, for teacher elements of
    /// `teacher_bytes`.
    fn bytes(self, teacher_bytes: usize) -> usize {
        match self {
            Stash::LogRatio if teacher_bytes == 2 => 4,
            Stash::Exp => 8,
            _ => 0,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Building the emulator
// ------------------------------------------------------------------------------------------

fn simulator() -> Option<PathBuf> {
    static SIM: OnceLock<Option<PathBuf>> = OnceLock::new();
    SIM.get_or_init(build_simulator).clone()
}

/// Copies the kernel sources (the persistent and the staged kernels) and their headers into a
/// scratch directory with the emulator's dk_cluster.cuh in place of the real one (and without
/// dk_mma.cuh, whose emulator version tests/attention_sim has: the staged kernels' cp.async),
/// and builds the driver against them. `DK_SIM_PERSISTENT_CU=<file>` / `DK_SIM_STAGED_CU=<file>`
/// stage that file instead of cuda/divergence_persistent.cu / cuda/divergence_staged.cu (to
/// check that the test catches a deliberately broken copy).
fn build_simulator() -> Option<PathBuf> {
    let root = repo_root();
    let stage = scratch_dir(TEST).join("kernel");
    std::fs::create_dir_all(&stage).expect("create the staging directory");
    let copy = |from: &Path| {
        let to = stage.join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    // The kernel files, each from `cuda/` unless its variable names another copy.
    for (file, var) in [
        ("divergence_persistent.cu", "DK_SIM_PERSISTENT_CU"),
        ("divergence_staged.cu", "DK_SIM_STAGED_CU"),
    ] {
        let from = match std::env::var_os(var) {
            Some(alt) => {
                let alt = PathBuf::from(alt);
                visible(&format!("{TEST}: kernel source {} ({var})", alt.display()));
                alt
            }
            None => root.join("cuda").join(file),
        };
        std::fs::copy(&from, stage.join(file))
            .unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
    for entry in std::fs::read_dir(root.join("cuda/include")).expect("cuda/include") {
        let path = entry.expect("cuda/include entry").path();
        if path
            .file_name()
            .is_some_and(|n| n != "dk_cluster.cuh" && n != "dk_mma.cuh")
        {
            copy(&path);
        }
    }
    let sim_dir = root.join("tests/divergence_sim");
    copy(&sim_dir.join("dk_cluster.cuh"));
    build_kernel_simulator(
        TEST,
        &sim_dir.join("divergence_persistent_sim.cpp"),
        &[stage, root.join("tests/attention_sim")],
        EMULATOR_CXX_FLAGS,
    )
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Grad {
    None,
    Separate,
    InPlace,
}

/// One launch: the call (inputs, labels, parameters, gradient destination) and the launch
/// shape.
struct SimCase {
    case: Case,
    /// 512: `dk_divcp_*` (one load step); 256: `dk_divcp256_*` (two). 512 for the staged
    /// kernels.
    threads: u32,
    /// The staged kernels (`dk_divcq_*`, cuda/divergence_staged.cu) instead of the persistent
    /// ones.
    staged: bool,
    /// Staged JSD with a gradient: what the kernel keeps between passes (the launcher's
    /// default is `LogRatio`).
    stash: Stash,
    /// Blocks per cluster.
    c: usize,
    /// Clusters.
    q: usize,
}

impl SimCase {
    fn kernel(&self) -> String {
        let prefix = if self.staged {
            "dk_divcq"
        } else if self.threads == 512 {
            "dk_divcp"
        } else {
            "dk_divcp256"
        };
        // The launcher's choice (jsdx: JSD at an extreme β).
        let kind = kernel_kind_tag(self.case.params.effective_kind(), self.case.params.beta);
        format!(
            "{prefix}_{kind}_{}_{}",
            self.case.student.dtype.name(),
            self.case.teacher.dtype.name()
        )
    }

    fn what(&self) -> String {
        format!(
            "{} C={} Q={}: {}",
            self.kernel(),
            self.c,
            self.q,
            self.case.what
        )
    }
}

/// What to do to a case's rows beyond random logits.
#[derive(Default, Clone)]
struct Edits {
    /// Rows whose label is ignore_index (labels are given when this is Some).
    ignored: Option<Vec<usize>>,
    /// Rows whose student / teacher / both sides are all −inf.
    student_masked: Vec<usize>,
    teacher_masked: Vec<usize>,
    both_masked: Vec<usize>,
    /// Rows with a quarter of their entries masked (on both sides, plus on the side alone that
    /// keeps the loss finite).
    partly_masked: Vec<usize>,
    /// A row with one NaN student logit.
    nan_row: Option<usize>,
}

/// Padded row stride: `v` rounded up to 8 elements (16 bytes for every dtype) plus `extra` × 8.
fn stride(v: usize, extra: usize) -> usize {
    v.next_multiple_of(8) + 8 * extra
}

#[allow(clippy::too_many_arguments)]
fn make(
    rng: &mut Rng,
    params: Params,
    (s, t): (DType, DType),
    (n, v): (usize, usize),
    (threads, c, q): (u32, usize, usize),
    grad: Grad,
    e: &Edits,
) -> SimCase {
    assert!(
        q >= 1 && q <= n,
        "the launcher runs at most one cluster per row"
    );
    let params = Params {
        reduction: Reduction::BatchMean,
        ..params
    };
    let mut case = Case::random(rng, n, v, s, t, params);
    // Padded strides (rows stay 16-byte aligned, as the launcher requires).
    let (ss, ts, gs) = (stride(v, 1), stride(v, 2), stride(v, 0) + 8 * (v % 2));
    case = case.strides(ss, ts, gs);
    case.grad = match grad {
        Grad::None => GradOut::None,
        Grad::Separate => GradOut::Separate(GradSpec {
            dtype: s,
            rows: n,
            cols: v,
            stride: gs,
        }),
        Grad::InPlace => GradOut::InPlace,
    };
    case.loss = None; // the emulator runs the row kernel only (no dk_div_finish)
    if let Some(ignored) = &e.ignored {
        let ii = params.ignore_index;
        let labels = (0..n)
            .map(|r| {
                if ignored.contains(&r) {
                    ii
                } else {
                    rng.below(0, 50_000) as i64
                }
            })
            .collect();
        case = case.with_labels(labels);
        case.what += &format!(" ignored={ignored:?}");
    }
    for &r in &e.student_masked {
        case.student.row_mut(r).fill(f64::NEG_INFINITY);
    }
    for &r in &e.teacher_masked {
        case.teacher.row_mut(r).fill(f64::NEG_INFINITY);
    }
    for &r in &e.both_masked {
        case.student.row_mut(r).fill(f64::NEG_INFINITY);
        case.teacher.row_mut(r).fill(f64::NEG_INFINITY);
    }
    // Which side may be masked alone with a finite loss.
    let (student_alone, teacher_alone) = match params.effective_kind() {
        Kind::ForwardKl => (false, true),
        Kind::ReverseKl => (true, false),
        Kind::Jsd => (true, true),
    };
    for &r in &e.partly_masked {
        for col in 1..v {
            let u = rng.uniform();
            if u < 0.25 {
                case.student.row_mut(r)[col] = f64::NEG_INFINITY;
                case.teacher.row_mut(r)[col] = f64::NEG_INFINITY;
            } else if u < 0.3 && student_alone {
                case.student.row_mut(r)[col] = f64::NEG_INFINITY;
            } else if u < 0.35 && teacher_alone {
                case.teacher.row_mut(r)[col] = f64::NEG_INFINITY;
            }
        }
    }
    if let Some(r) = e.nan_row {
        let col = rng.below(0, v);
        case.student.row_mut(r)[col] = f64::NAN;
    }
    if !e.student_masked.is_empty() || !e.teacher_masked.is_empty() || !e.both_masked.is_empty() {
        case.what += &format!(
            " masked rows: student {:?} teacher {:?} both {:?}",
            e.student_masked, e.teacher_masked, e.both_masked
        );
    }
    if !e.partly_masked.is_empty() {
        case.what += &format!(" partly masked {:?}", e.partly_masked);
    }
    if let Some(r) = e.nan_row {
        case.what += &format!(" NaN row {r}");
    }
    case.what += &format!(" grad={grad:?}");
    SimCase {
        case,
        threads,
        staged: false,
        stash: Stash::Off,
        c,
        q,
    }
}

/// The first row of cluster 0's walk, the last row of the last cluster's walk and of cluster
/// 1's, and two consecutive rows of cluster 0's walk.
fn walk_edges(n: usize, q: usize) -> Vec<usize> {
    let last_of = |k: usize| k + (n - 1 - k) / q * q;
    let mut rows = vec![0, last_of(q - 1), last_of(1.min(q - 1))];
    if 2 * q < n {
        rows.extend([q, 2 * q]);
    }
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// The rows `walk_edges` leaves live, from the middle of the batch on, then the others.
fn live_rows(n: usize, q: usize) -> Vec<usize> {
    let ignored = walk_edges(n, q);
    (n / 2..n)
        .chain(0..n / 2)
        .filter(|r| !ignored.contains(r))
        .collect()
}

fn jsd(beta: f32) -> Params {
    Params {
        beta,
        ..Params::new(Kind::Jsd)
    }
}

/// A slice of `chunks` 16-byte chunks per thread for C blocks of `threads` threads, minus
/// `short` elements (a scalar tail in the last block when not a multiple of 8).
fn v_for(c: usize, threads: u32, chunks_per_thread: f64, short: usize) -> usize {
    let slice = (chunks_per_thread * threads as f64 * 8.0) as usize;
    c * slice.next_multiple_of(8) - short
}

fn cases(rng: &mut Rng) -> Vec<SimCase> {
    use DType::{BF16, F16, F32};
    let fkl = Params::new(Kind::ForwardKl);
    let rkl = Params::new(Kind::ReverseKl);
    let mut out = Vec::new();
    // Every kind, both shapes, several chunks per thread (the 256-thread shape's two-step loop
    // and its one-step remainder), labels at the walks' edges, masked, partly masked and NaN
    // rows (each a row that is not ignored), a tail.
    for (i, &params) in [fkl, rkl, jsd(0.5)].iter().enumerate() {
        for (j, &threads) in [512u32, 256].iter().enumerate() {
            let c = [2, 4, 8][(i + j) % 3];
            let (n, q) = [(11, 3), (17, 4), (9, 2)][(i + 2 * j) % 3];
            let v = v_for(c, threads, 2.6, 3);
            let live = live_rows(n, q);
            assert!(live.len() >= 5);
            let e = Edits {
                ignored: Some(walk_edges(n, q)),
                student_masked: vec![live[0]],
                teacher_masked: vec![live[live.len() - 1]],
                both_masked: vec![live[1]],
                partly_masked: vec![live[2]],
                nan_row: Some(live[3]),
            };
            let grad = [Grad::Separate, Grad::InPlace][(i + j) % 2];
            out.push(make(
                rng,
                params,
                (F32, F32),
                (n, v),
                (threads, c, q),
                grad,
                &e,
            ));
        }
    }
    // 16-bit logits (and the one f16 student), temperatures ≠ 1.
    let t07 = |p: Params| Params {
        temperature: 0.7,
        ..p
    };
    let t25 = |p: Params| Params {
        temperature: 2.5,
        ..p
    };
    let ends = |n, q| Edits {
        ignored: Some(walk_edges(n, q)),
        both_masked: vec![live_rows(n, q)[0]],
        ..Default::default()
    };
    out.push(make(
        rng,
        t07(fkl),
        (BF16, BF16),
        (7, v_for(1, 256, 2.5, 5)),
        (256, 1, 2),
        Grad::Separate,
        &ends(7, 2),
    ));
    out.push(make(
        rng,
        rkl,
        (BF16, F32),
        (30, 37),
        (512, 8, 4),
        Grad::InPlace,
        &ends(30, 4),
    ));
    out.push(make(
        rng,
        t25(jsd(0.5)),
        (F16, BF16),
        (13, v_for(2, 512, 1.5, 1)),
        (512, 2, 3),
        Grad::Separate,
        &ends(13, 3),
    ));
    out.push(make(
        rng,
        jsd(0.5),
        (BF16, BF16),
        (40, 203),
        (256, 4, 5),
        Grad::InPlace,
        &Edits {
            ignored: Some(walk_edges(40, 5)),
            student_masked: vec![7, 12],
            partly_masked: vec![3, 8, 13],
            ..Default::default()
        },
    ));
    // Cluster of 16 (tiny and large rows).
    out.push(make(
        rng,
        jsd(0.5),
        (BF16, BF16),
        (5, v_for(16, 256, 1.2, 0)),
        (256, 16, 2),
        Grad::Separate,
        &ends(5, 2),
    ));
    out.push(make(
        rng,
        fkl,
        (F32, F32),
        (6, 99),
        (512, 16, 2),
        Grad::Separate,
        &ends(6, 2),
    ));
    // Effective kinds: JSD with β = 0 / 1 runs the forward / reverse KL kernels; β = 0.25; and
    // β = 1e-3 and 1 − 1e-3, the series tails of the jsdx kernels.
    for (k, params) in [jsd(0.0), jsd(1.0), jsd(0.25), jsd(1e-3), jsd(0.999)]
        .into_iter()
        .enumerate()
    {
        out.push(make(
            rng,
            params,
            (F32, BF16),
            (12, v_for(2, 256, 2.2, 7)),
            (256, 2, 3 + k),
            Grad::Separate,
            &ends(12, 3 + k),
        ));
    }
    // Forward only (grad = 0), every kind.
    for (k, params) in [fkl, rkl, jsd(0.5)].into_iter().enumerate() {
        out.push(make(
            rng,
            params,
            (F32, F32),
            (10, v_for(4, 512, 1.1, 4)),
            (512, 4, 2 + k),
            Grad::None,
            &Edits {
                ignored: Some(walk_edges(10, 2 + k)),
                teacher_masked: vec![live_rows(10, 2 + k)[0]],
                nan_row: Some(live_rows(10, 2 + k)[1]),
                ..Default::default()
            },
        ));
    }
    // Walk shapes: Q = n (one row per cluster), a single row, a walk entirely ignored, every
    // row ignored, no labels.
    out.push(make(
        rng,
        jsd(0.5),
        (F32, F32),
        (5, 300),
        (512, 2, 5),
        Grad::InPlace,
        &Edits {
            ignored: Some(vec![2]),
            ..Default::default()
        },
    ));
    out.push(make(
        rng,
        rkl,
        (F32, F32),
        (1, 1000),
        (256, 4, 1),
        Grad::Separate,
        &Edits::default(),
    ));
    out.push(make(
        rng,
        fkl,
        (BF16, BF16),
        (14, 500),
        (512, 2, 3),
        Grad::Separate,
        &Edits {
            // Cluster 1's walk (1, 4, 7, 10, 13) entirely ignored.
            ignored: Some(vec![1, 4, 7, 10, 13, 0]),
            ..Default::default()
        },
    ));
    for params in [fkl, jsd(0.5)] {
        out.push(make(
            rng,
            params,
            (F32, F32),
            (6, 77),
            (256, 2, 2),
            Grad::InPlace,
            &Edits {
                ignored: Some((0..6).collect()),
                ..Default::default()
            },
        ));
    }
    out.push(make(
        rng,
        jsd(0.5),
        (F32, F32),
        (8, 1024),
        (512, 1, 3),
        Grad::Separate,
        &Edits {
            both_masked: vec![0, 7],
            student_masked: vec![3],
            ..Default::default()
        },
    ));
    // Random cases from the seed.
    for _ in 0..6 {
        out.push(random_case(rng));
    }
    out
}

fn random_case(rng: &mut Rng) -> SimCase {
    let kinds = kinds();
    let params = Params {
        temperature: [1.0, 0.7, 1.3][rng.below(0, 3)],
        ..kinds[rng.below(0, kinds.len())]
    };
    let pairs = dtype_pairs();
    let dts = pairs[rng.below(0, pairs.len())];
    let threads = [512u32, 256][rng.below(0, 2)];
    let c = [1usize, 2, 4, 8][rng.below(0, 4)];
    let n = rng.below(2, 25);
    let q = rng.below(1, n.min(5) + 1);
    let v = if rng.uniform() < 0.5 {
        rng.below(1, 400)
    } else {
        v_for(c, threads, rng.range(0.5, 2.5), rng.below(0, 8))
    };
    let mut pick = |p: f64| (0..n).filter(|_| rng.uniform() < p).collect::<Vec<_>>();
    let e = Edits {
        ignored: Some(pick(0.2)),
        both_masked: pick(0.1),
        partly_masked: pick(0.15),
        ..Default::default()
    };
    let grad = [Grad::None, Grad::Separate, Grad::InPlace][rng.below(0, 3)];
    let mut sc = make(rng, params, dts, (n, v), (threads, c, q), grad, &e);
    sc.case.what += " (random)";
    sc
}

// ------------------------------------------------------------------------------------------
// Running the emulator
// ------------------------------------------------------------------------------------------

/// The fixed part of the driver's input (its protocol, before the buffers).
struct Header {
    kernel: String,
    /// (threads, C, Q).
    shape: (u32, usize, usize),
    /// Dynamic shared memory per block.
    smem: u32,
    reverse: bool,
    n: usize,
    v: usize,
    /// (student, teacher, gradient) row strides in elements.
    strides: (usize, usize, usize),
    ignore_index: i64,
    beta: f32,
    temperature: f32,
    scale: f32,
    inv_cap: f32,
    /// `DK_ARGS_*` bits of the kernel arguments (`options`).
    options: u32,
    /// 0 forward only, 1 separate, 2 in place, 3 fused G `shift` rows before S.
    grad_mode: i32,
    shift: usize,
    has_labels: bool,
}

impl Header {
    fn encode(&self, o: &mut Vec<u8>) {
        o.extend(0x5044_4b44u32.to_ne_bytes());
        o.extend((self.kernel.len() as u32).to_ne_bytes());
        o.extend(self.kernel.as_bytes());
        let (threads, c, q) = self.shape;
        for x in [threads as i32, c as i32, q as i32] {
            o.extend(x.to_ne_bytes());
        }
        o.extend(self.smem.to_ne_bytes());
        o.extend((self.reverse as i32).to_ne_bytes());
        let (ss, ts, gs) = self.strides;
        for x in [
            self.n as i64,
            self.v as i64,
            ss as i64,
            ts as i64,
            gs as i64,
            self.ignore_index,
        ] {
            o.extend(x.to_ne_bytes());
        }
        // As the launcher: beta as given, 1 / T in f32.
        for x in [self.beta, 1.0 / self.temperature, self.scale, self.inv_cap] {
            o.extend(x.to_ne_bytes());
        }
        for x in [self.grad_mode, self.shift as i32, self.has_labels as i32] {
            o.extend(x.to_ne_bytes());
        }
        o.extend(self.options.to_ne_bytes());
    }
}

/// Appends each buffer (u64 length, bytes) to the driver's input.
fn put_buffers(o: &mut Vec<u8>, bufs: &[&[u8]]) {
    for b in bufs {
        o.extend((b.len() as u64).to_ne_bytes());
        o.extend(*b);
    }
}

/// d(reduced loss)/d(row loss) as dk_div_prepare writes it: batchmean over the valid rows.
fn scale(case: &Case) -> f32 {
    let valid = match &case.labels {
        None => case.n(),
        Some(l) => l.iter().filter(|&&x| x != case.params.ignore_index).count(),
    };
    (1.0 / valid.max(1) as f64) as f32
}

/// The buffers the emulator is given and returns, in order (see the driver's protocol).
fn sim_buffers(b: &Bufs) -> Vec<&Bytes> {
    let mut v = vec![&b.student, &b.teacher];
    v.extend(b.grad.as_ref());
    v.extend(b.labels.as_ref());
    v.push(&b.per_token);
    v
}

/// Runs the kernel on `before` (blocks, warps, lanes and clusters in ascending or descending
/// order): every buffer after the launch, and the emulator's statistics line.
fn run_sim(
    exe: &Path,
    sc: &SimCase,
    before: &Bufs,
    reverse: bool,
) -> Result<(Bufs, String), String> {
    let c = &sc.case;
    let grad_mode: i32 = match c.grad {
        GradOut::None => 0,
        GradOut::Separate(_) => 1,
        GradOut::InPlace => 2,
        GradOut::IntoStudent { .. } => unreachable!(),
    };
    let grad_stride = match c.grad {
        GradOut::Separate(g) => g.stride,
        _ => c.student.stride,
    };
    let mut o = Vec::new();
    Header {
        kernel: sc.kernel(),
        shape: (sc.threads, sc.c, sc.q),
        smem: if sc.staged {
            let pair = c.student.dtype.size() + c.teacher.dtype.size();
            let stash = sc.stash.bytes(c.teacher.dtype.size());
            staged_smem_bytes(c.v(), sc.c, pair, stash)
        } else {
            PERSISTENT_SMEM_BYTES
        },
        reverse,
        n: c.n(),
        v: c.v(),
        strides: (c.student.stride, c.teacher.stride, grad_stride),
        ignore_index: c.params.ignore_index,
        beta: c.params.beta,
        temperature: c.params.temperature,
        scale: scale(c),
        inv_cap: 0.0,
        options: sc.stash.options(),
        grad_mode,
        shift: 0,
        has_labels: c.labels.is_some(),
    }
    .encode(&mut o);
    let bufs = sim_buffers(before);
    put_buffers(&mut o, &bufs.iter().map(|b| b.as_ref()).collect::<Vec<_>>());
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let (stdout, log) = run_emulator(exe, o, total)?;
    let mut after = before.clone();
    let mut at = 0;
    let mut take = |b: &mut Bytes| {
        *b = Bytes::from_slice(&stdout[at..at + b.len()]);
        at += b.len();
    };
    take(&mut after.student);
    take(&mut after.teacher);
    if let Some(g) = after.grad.as_mut() {
        take(g);
    }
    if let Some(l) = after.labels.as_mut() {
        take(l);
    }
    take(&mut after.per_token);
    Ok((after, log))
}

// ------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------

/// The CPU backend's outputs as the reference of `common::check` (per-row losses, gradient
/// values as written in the student dtype, NaN rows).
fn cpu_reference(sc: &SimCase) -> Result<Reference, String> {
    let (res, _, after) = Device::Cpu(Context::cpu()).run(&sc.case);
    res.map_err(|e| format!("the CPU backend refused the case: {e}"))?;
    let out = outputs(&sc.case, &after);
    let per_token: Vec<f64> = out.per_token.unwrap().iter().map(|&x| x as f64).collect();
    let nan_rows = per_token.iter().map(|x| x.is_nan()).collect();
    let grad = out
        .grad
        .unwrap_or_else(|| vec![0.0; sc.case.n() * sc.case.v()]);
    Ok(Reference {
        per_token,
        loss: f64::NAN,
        grad,
        nan_rows,
    })
}

/// Row by row: each per-row loss and each gradient row within the tolerance (a loss or a
/// gradient landing in another row's place shows here even where the norms over all rows
/// hide it), and exact zeros where the row has no loss: ignored rows, rows with a side all
/// −inf.
fn check_rows(sc: &SimCase, r: &Reference, after: &Bufs, tol: Tol) -> Result<(), String> {
    let c = &sc.case;
    let (n, v) = (c.n(), c.v());
    let out = outputs(c, after);
    let pt = out.per_token.as_ref().unwrap();
    for row in 0..n {
        let ignored = c
            .labels
            .as_ref()
            .is_some_and(|l| l[row] == c.params.ignore_index);
        let no_distribution = [c.student.row(row), c.teacher.row(row)]
            .iter()
            .any(|x| x.iter().all(|&e| e == f64::NEG_INFINITY));
        let zero = ignored || no_distribution;
        let what = if ignored {
            "ignored"
        } else {
            "without a distribution"
        };
        if zero && pt[row].to_bits() != 0 {
            return Err(format!(
                "row {row} ({what}): loss {} instead of +0",
                pt[row]
            ));
        }
        if !r.nan_rows[row] {
            let e = rel_err(&[pt[row] as f64], &[r.per_token[row]], tol.floor);
            if e > tol.per_token {
                return Err(format!(
                    "row {row}: loss {} against {} (error {e:.2e} > {:.0e})",
                    pt[row], r.per_token[row], tol.per_token
                ));
            }
        }
        if let (Some(g), Some(bits)) = (&out.grad, &out.grad_bits) {
            let cols = row * v..(row + 1) * v;
            if zero && bits[cols.clone()].iter().any(|&b| b != 0) {
                return Err(format!("row {row} ({what}): gradient not all +0"));
            }
            if !r.nan_rows[row] {
                let want = &r.grad[cols.clone()];
                let e = rel_err(&g[cols], want, tol.floor);
                let dtype = c.student.dtype;
                let rounded: Vec<f64> = want.iter().map(|&x| round_to(dtype, x)).collect();
                let inherent = rel_err(&rounded, want, tol.floor);
                if e > tol.grad + inherent {
                    return Err(format!(
                        "row {row}: gradient error {e:.2e} > {:.0e}",
                        tol.grad
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The first element where two runs differ, located.
fn first_difference(sc: &SimCase, a: &Bufs, b: &Bufs) -> Option<String> {
    let c = &sc.case;
    let grad_stride = match c.grad {
        GradOut::Separate(g) => g.stride,
        _ => c.student.stride,
    };
    // (name, bytes of an element, row stride in elements; 0 for a vector) of each buffer.
    let mut layout = vec![
        ("student", c.student.dtype.size(), c.student.stride),
        ("teacher", c.teacher.dtype.size(), c.teacher.stride),
    ];
    if a.grad.is_some() {
        layout.push(("grad", c.student.dtype.size(), grad_stride));
    }
    if a.labels.is_some() {
        layout.push(("labels", 8, 0));
    }
    layout.push(("per_row", 4, 0));
    for ((x, y), (name, elem, stride)) in sim_buffers(a).iter().zip(sim_buffers(b)).zip(layout) {
        let (p, q) = (x.as_ref(), y.as_ref());
        if let Some(at) = (0..p.len()).find(|&j| p[j] != q[j]) {
            let e = at / elem;
            return Some(match e.checked_div(stride) {
                None => format!("{name} element {e}"),
                Some(row) => format!("{name} row {row} column {}", e % stride),
            });
        }
    }
    None
}

/// Runs one case in both orders and checks it; returns the statistics line of the ascending
/// run.
fn check_case(exe: &Path, sc: &SimCase) -> Result<String, String> {
    let reference = cpu_reference(sc)?;
    let before = Bufs::new(&sc.case);
    let (up, log) = run_sim(exe, sc, &before, false)?;
    let (down, _) = run_sim(exe, sc, &before, true)?;
    if up != down {
        let at = first_difference(sc, &up, &down).unwrap_or_default();
        return Err(format!(
            "ascending and descending orders differ (a race): first at {at}"
        ));
    }
    let tol = Tol::cuda(sc.case.student.dtype, sc.case.teacher.dtype);
    check(&sc.case, &reference, &before, &up, tol)?;
    check_rows(sc, &reference, &up, tol)?;
    Ok(log)
}

#[test]
fn persistent_kernels_match_the_cpu_backend() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh(TEST);
    let cases = cases(&mut rng);
    run_cases_parallel(TEST, cases.len(), |i| {
        (cases[i].what(), check_case(&exe, &cases[i]))
    });
}

/// The staged kernels (`dk_divcq_*`, cuda/divergence_staged.cu: each block holds its slice of
/// two rows in shared memory, copying the next while it computes the current) on the same
/// cases, at their one block shape (512 threads); the descending run lands the cp.async copies
/// late (at the wait that forces them), so a read of a chunk before its copy is waited for is
/// an error there. Every third case has a row with a whole side at finfo.min.
#[test]
fn staged_kernels_match_the_cpu_backend() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh(&format!("{TEST}-staged"));
    let mut cases: Vec<SimCase> = cases(&mut rng).into_iter().map(staged).collect();
    for (i, sc) in cases.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
        finite_mask_side(&mut sc.case, i % 2 == 0);
    }
    run_cases_parallel(TEST, cases.len(), |i| {
        (cases[i].what(), check_case(&exe, &cases[i]))
    });
}

/// A case on the staged kernel as the launcher runs it: JSD with a gradient keeps log2(q/m)
/// for the gradient pass (`stash`).
fn staged(sc: SimCase) -> SimCase {
    let jsd_grad = sc.case.params.effective_kind() == Kind::Jsd && sc.case.grad != GradOut::None;
    let stash = if jsd_grad {
        Stash::LogRatio
    } else {
        Stash::Off
    };
    SimCase {
        threads: 512,
        staged: true,
        stash,
        ..sc
    }
}

/// Fills one side (the teacher's, or the student's) of the case's first row that is not
/// ignored with its dtype's finite minimum, over whatever the row held.
fn finite_mask_side(case: &mut Case, teacher: bool) {
    let ii = case.params.ignore_index;
    let n = case.student.rows;
    let Some(r) = (0..n).find(|&r| case.labels.as_ref().map_or(true, |l| l[r] != ii)) else {
        return;
    };
    let side = if teacher {
        &mut case.teacher
    } else {
        &mut case.student
    };
    let m = finfo_min(side.dtype);
    side.row_mut(r).fill(m);
    case.what += &format!(
        " {} row {r} at finfo.min",
        if teacher { "teacher" } else { "student" }
    );
}

/// `sc` without its gradient: forward only (`args.grad` = 0).
fn forward_only(sc: &SimCase) -> SimCase {
    let mut case = sc.case.clone();
    case.grad = GradOut::None;
    case.what += " forward only";
    SimCase { case, ..*sc }
}

/// The JSD cases with a gradient of `cases` (fresh draws from `rng`) on the staged kernel
/// with `stash`.
fn staged_jsd_cases(rng: &mut Rng, stash: Stash) -> Vec<SimCase> {
    let cases: Vec<SimCase> = cases(rng)
        .into_iter()
        .map(staged)
        .filter(|sc| sc.stash != Stash::Off)
        .map(|sc| SimCase { stash, ..sc })
        .collect();
    assert!(
        cases.len() >= 8,
        "{} JSD cases with a gradient",
        cases.len()
    );
    cases
}

/// The staged JSD kernels with the statistics pass's exponentials kept (cuda/DIVERGENCE.md,
/// version 11, `DK_DIVERGENCE_JSD_STASH=exp`: the thread's maxima first, then 2^X and 2^Y
/// relative to them in two f32 slices, the mixture sums from those and the thread's factors,
/// the gradient from 2^Y and log2(q/m) kept over 2^X) on the JSD cases with a gradient, and
/// every other one of them forward only (version 12), checked like
/// `staged_kernels_match_the_cpu_backend` (both orders, against the CPU backend). In every
/// case one row has a whole side at the dtype's finite minimum (`torch.finfo(dtype).min`
/// masks: that side is then uniform, and version 12's w must not lose the other side's logits
/// to the far maximum). Its values round differently from version 10's, so this is the check,
/// not bitwise equality.
#[test]
fn staged_jsd_kept_exponentials_match_the_cpu_backend() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh(&format!("{TEST}-staged-exp"));
    let mut cases = staged_jsd_cases(&mut rng, Stash::Exp);
    let forward: Vec<SimCase> = cases.iter().step_by(2).map(forward_only).collect();
    cases.extend(forward);
    for (i, sc) in cases.iter_mut().enumerate() {
        finite_mask_side(&mut sc.case, i % 2 == 0);
    }
    run_cases_parallel(TEST, cases.len(), |i| {
        (cases[i].what(), check_case(&exe, &cases[i]))
    });
}

/// The staged JSD kernels' stash (cuda/DIVERGENCE.md, version 10: the mixture pass keeps each
/// entry's log2(q/m) over an f32 teacher's slice or in a slice of its own, and the gradient
/// pass reads it instead of forming it again) changes no bit: on the JSD cases with a gradient
/// of `cases` (fresh draws; `staged_kernels_match_the_cpu_backend` checks the stashed runs
/// against the CPU backend in both orders), the launch without it (`DK_DIVERGENCE_JSD_STASH=0`)
/// must give bitwise the same buffers. A value stashed for the wrong entry, or read before it is
/// written, shows here even where it stays within the reference's tolerance.
#[test]
fn staged_jsd_stash_changes_no_bit() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh(&format!("{TEST}-staged-stash"));
    let cases = staged_jsd_cases(&mut rng, Stash::LogRatio);
    run_cases_parallel(TEST, cases.len(), |i| {
        let on = &cases[i];
        let result = (|| {
            let before = Bufs::new(&on.case);
            let (with, log) = run_sim(&exe, on, &before, false)?;
            let off = SimCase {
                stash: Stash::Off,
                case: on.case.clone(),
                ..*on
            };
            let (without, _) = run_sim(&exe, &off, &before, false)?;
            if with != without {
                let at = first_difference(on, &with, &without).unwrap_or_default();
                return Err(format!("the stash changed the outputs: first at {at}"));
            }
            Ok(log)
        })();
        (on.what(), result)
    });
}

// ------------------------------------------------------------------------------------------
// The fused linear divergence's variant (dk_divcp_fused_*, dk_divcp256_fused_*)
// ------------------------------------------------------------------------------------------

/// ignore_index of the fused cases.
const FUSED_IGNORE: i64 = -100;

/// Where a fused case's G goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum GPlace {
    /// Forward only (`args.grad` = 0).
    None,
    /// Q rows before S, over the rows the clusters walked before (the launcher's layout).
    Before,
    /// Over S's own rows (shift 0): a 16-bit G races with the other blocks' loads in the
    /// persistent kernels; the staged kernels' layout (their blocks copy a row before any
    /// writes its G).
    Own,
}

/// One launch of a fused chunk kernel: f32 capped logits S and T (row stride `ld`), G in `out`
/// in S's buffer (`place`).
struct FusedSimCase {
    what: String,
    p: ChunkParams,
    out: DType,
    place: GPlace,
    /// 512: `dk_divcp_fused_*`; 256: `dk_divcp256_fused_*`. 512 for the staged kernels.
    threads: u32,
    /// The staged kernels (`dk_divcq_fused_*`) instead of the persistent ones.
    staged: bool,
    /// Staged JSD: what the kernel keeps between passes (the launcher's default: log2(q/m) over
    /// T's slice).
    stash: Stash,
    c: usize,
    q: usize,
    n: usize,
    v: usize,
    ld: usize,
    /// n rows of `ld`, padding poisoned.
    s: Vec<f32>,
    t: Vec<f32>,
    labels: Option<Vec<i64>>,
    /// A row whose student logits are all −inf (under a softcap all −cap: uniform, a live row).
    masked: Option<usize>,
    /// A row with one NaN student logit.
    nan: Option<usize>,
}

impl FusedSimCase {
    fn kernel(&self) -> String {
        let prefix = if self.staged {
            "dk_divcq"
        } else if self.threads == 512 {
            "dk_divcp"
        } else {
            "dk_divcp256"
        };
        let kind = kernel_kind_tag(effective_kind(self.p.kind, self.p.beta), self.p.beta);
        format!("{prefix}_fused_{kind}_{}", self.out.name())
    }

    /// Pad rows before S in its buffer (G row r is buffer row r).
    fn shift(&self) -> usize {
        match self.place {
            GPlace::Before => self.q,
            GPlace::None | GPlace::Own => 0,
        }
    }

    fn row<'a>(&self, x: &'a [f32], r: usize) -> &'a [f32] {
        &x[r * self.ld..r * self.ld + self.v]
    }

    fn ignored(&self, r: usize) -> bool {
        self.labels.as_ref().is_some_and(|l| l[r] == FUSED_IGNORE)
    }

    /// S's buffer as the launcher lays it out: `shift` poisoned pad rows, then S.
    fn s_buffer(&self) -> Vec<u8> {
        let mut b = poison_bytes(DType::F32, self.shift() * self.ld);
        b.extend(self.s.iter().flat_map(|x| x.to_ne_bytes()));
        b
    }

    fn t_bytes(&self) -> Vec<u8> {
        self.t.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    fn label_bytes(&self) -> Vec<u8> {
        self.labels
            .iter()
            .flatten()
            .flat_map(|x| x.to_ne_bytes())
            .collect()
    }

    fn input(&self, reverse: bool) -> Vec<u8> {
        let mut o = Vec::new();
        Header {
            kernel: self.kernel(),
            shape: (self.threads, self.c, self.q),
            smem: if self.staged {
                staged_smem_bytes(self.v, self.c, 8, self.stash.bytes(4))
            } else {
                PERSISTENT_SMEM_BYTES
            },
            reverse,
            n: self.n,
            v: self.v,
            strides: (self.ld, self.ld, self.ld * 4 / self.out.size()),
            ignore_index: FUSED_IGNORE,
            beta: self.p.beta,
            temperature: self.p.temperature,
            scale: self.p.scale,
            inv_cap: self.p.inv_cap(),
            options: self.stash.options(),
            grad_mode: if self.place == GPlace::None { 0 } else { 3 },
            shift: self.shift(),
            has_labels: self.labels.is_some(),
        }
        .encode(&mut o);
        let (s, t, l) = (self.s_buffer(), self.t_bytes(), self.label_bytes());
        let per_row = poison_bytes(DType::F32, self.n);
        let mut bufs = vec![&s[..], &t[..]];
        if self.labels.is_some() {
            bufs.push(&l[..]);
        }
        bufs.push(&per_row[..]);
        put_buffers(&mut o, &bufs);
        o
    }

    /// Bytes the driver returns: S's buffer, T, labels, per-row losses.
    fn output_len(&self) -> usize {
        self.s_buffer().len() + 4 * self.t.len() + self.label_bytes().len() + 4 * self.n
    }
}

/// A fused case. The student logits are capped (within (−cap, cap) under a softcap), with a
/// teacher near them as in self-distillation and, without a softcap, ~1 % masked entries on a
/// side where the divergence stays finite. The low 16 bits of every finite student logit are
/// `POISON_16`, a NaN in bf16 and f16 (the logit is within a bf16 ulp of what was drawn, and
/// still under the cap: the cap, 30, is a bf16 value and the high bits are truncated): G's old
/// bytes are then a NaN, a logit or the pad's poison, never what the kernel writes, so an
/// element left unwritten shows. With `edits`: labels ignoring the first and the last row, a
/// fully masked row and a NaN row among the others.
#[allow(clippy::too_many_arguments)]
fn make_fused(
    rng: &mut Rng,
    (kind, beta): (Kind, f32),
    out: DType,
    cap: Option<f32>,
    place: GPlace,
    (threads, c, q): (u32, usize, usize),
    (n, v): (usize, usize),
    edits: bool,
) -> FusedSimCase {
    assert!(
        q >= 1 && q <= n,
        "the launcher runs at most one cluster per row"
    );
    assert!(
        !cap.is_some_and(|c| c.to_bits() & 0xFFFF != 0),
        "the cap must be a bf16 value (see above)"
    );
    let ld = stride(v, 1);
    let p = ChunkParams {
        kind,
        beta,
        temperature: [0.7f32, 1.0, 2.0][rng.below(0, 3)],
        scale: [1.0f32, 0.25][rng.below(0, 2)],
        cap,
    };
    let (mut s, t) = chunk_logits(rng, kind, cap, (n, v, ld), Some(POISON_16));
    let (mut labels, mut masked, mut nan) = (None, None, None);
    if edits {
        assert!(n >= 4);
        let mut l: Vec<i64> = (0..n).map(|_| rng.below(0, 50_000) as i64).collect();
        l[0] = FUSED_IGNORE;
        l[n - 1] = FUSED_IGNORE;
        labels = Some(l);
        let (m, x) = (n / 2, n / 2 + 1).min((n - 3, n - 2));
        masked = Some(m);
        nan = Some(x);
        s[m * ld..m * ld + v].fill(cap.map_or(f32::NEG_INFINITY, |c| -c));
        s[x * ld + rng.below(0, v)] = f32::NAN;
    }
    let place_what = match place {
        GPlace::None => "forward only".to_string(),
        GPlace::Before => format!("G {} rows before S", q),
        GPlace::Own => "G over its own rows".to_string(),
    };
    FusedSimCase {
        what: format!(
            "{kind:?} beta {beta} T {} scale {} cap {cap:?} n {n} v {v}, {place_what}{}",
            p.temperature,
            p.scale,
            if edits {
                format!(", ignored [0, {}] masked {masked:?} NaN {nan:?}", n - 1)
            } else {
                String::new()
            }
        ),
        p,
        out,
        place,
        threads,
        staged: false,
        stash: Stash::Off,
        c,
        q,
        n,
        v,
        ld,
        s,
        t,
        labels,
        masked,
        nan,
    }
}

/// The fused cases: every kind (JSD β = 0.5, 0.25, and 1e-3: the jsdx kernels) with G in f32,
/// bf16 and f16, with and
/// without a softcap, both shapes, C = 1, 2, 4, 8 and Q = 1..4 with 2 to 12 / Q rows per
/// cluster, rows of 2 to 3.5 16-byte chunks per thread (both of the 256-thread shape's loops)
/// with a scalar tail in some; short rows (blocks with empty slices); forward only.
fn fused_cases(rng: &mut Rng) -> Vec<FusedSimCase> {
    use DType::{BF16, F16, F32};
    let kinds = [
        (Kind::ForwardKl, 0.5),
        (Kind::ReverseKl, 0.5),
        (Kind::Jsd, 0.5),
        (Kind::Jsd, 0.25),
        (Kind::Jsd, 1e-3),
    ];
    let mut out = Vec::new();
    for (k, &kind) in kinds.iter().enumerate() {
        for (d, &dtype) in [F32, BF16, F16].iter().enumerate() {
            let i = 3 * k + d;
            let threads = [512u32, 256][i % 2];
            let c = [2usize, 4, 8, 1][i % 4];
            let q = 1 + (i / 2) % 4;
            let n = rng.below((2 * q).max(6), 13);
            let v = v_for(c, threads, rng.range(2.0, 3.5), rng.below(0, 8));
            let cap = [None, Some(30.0)][(k + d) % 2];
            let shape = (threads, c, q);
            out.push(make_fused(
                rng,
                kind,
                dtype,
                cap,
                GPlace::Before,
                shape,
                (n, v),
                true,
            ));
        }
    }
    // Short rows: blocks with empty slices, a slice of the tail alone.
    let jsd25 = (Kind::Jsd, 0.25);
    let rkl = (Kind::ReverseKl, 0.5);
    out.push(make_fused(
        rng,
        rkl,
        F16,
        None,
        GPlace::Before,
        (256, 4, 2),
        (7, 37),
        true,
    ));
    out.push(make_fused(
        rng,
        jsd25,
        BF16,
        Some(30.0),
        GPlace::Before,
        (512, 8, 3),
        (9, 203),
        true,
    ));
    // Forward only: S's buffer untouched.
    out.push(make_fused(
        rng,
        (Kind::ForwardKl, 0.5),
        BF16,
        Some(30.0),
        GPlace::None,
        (256, 4, 2),
        (8, v_for(4, 256, 1.5, 3)),
        true,
    ));
    out.push(make_fused(
        rng,
        (Kind::Jsd, 0.5),
        F16,
        None,
        GPlace::None,
        (512, 2, 3),
        (9, v_for(2, 512, 1.5, 0)),
        true,
    ));
    out
}

/// The first byte where two outputs of a case differ, located.
fn fused_difference(c: &FusedSimCase, a: &[u8], b: &[u8]) -> Option<String> {
    let at = a.iter().zip(b).position(|(x, y)| x != y)?;
    let (s_len, row) = (c.s_buffer().len(), 4 * c.ld);
    Some(if at < s_len {
        let j = at / row;
        format!(
            "S's buffer row {j} byte {} (G row {j}, S row {})",
            at % row,
            j as i64 - c.shift() as i64
        )
    } else {
        format!("byte {} after S's buffer", at - s_len)
    })
}

/// Checks one run's outputs: T and labels untouched; S's buffer untouched outside G's rows
/// (bytes [0, v · sizeof(G)) of buffer rows 0..n; all of it when forward only); per row, every G
/// element written (its bits changed, where they were not +0, the low half of a −inf logit,
/// which G may be), the loss and G against the reference, exactly +0 for ignored rows and the
/// fully masked row, NaN throughout for the NaN row.
fn check_fused(c: &FusedSimCase, out: &[u8]) -> Result<(), String> {
    let s_in = c.s_buffer();
    let (s_out, rest) = out.split_at(s_in.len());
    let (t_out, rest) = rest.split_at(4 * c.t.len());
    let (l_out, per_row) = rest.split_at(c.label_bytes().len());
    if t_out != c.t_bytes().as_slice() {
        return Err("T was modified".into());
    }
    if l_out != c.label_bytes().as_slice() {
        return Err("the labels were modified".into());
    }
    let (row, g_bytes) = (4 * c.ld, c.v * c.out.size());
    for j in 0..s_in.len() / row {
        let covered = if c.place != GPlace::None && j < c.n {
            g_bytes
        } else {
            0
        };
        let span = j * row + covered..(j + 1) * row;
        if let Some(b) = (span.clone()).find(|&b| s_out[b] != s_in[b]) {
            return Err(format!(
                "S's buffer row {j} byte {} modified (outside G's rows)",
                b - j * row
            ));
        }
    }
    for r in 0..c.n {
        let ignored = c.ignored(r);
        let (want_loss, want_g) = reference_row(&c.p, ignored, c.row(&c.s, r), c.row(&c.t, r));
        let loss_bits = elem_bits(DType::F32, per_row, r);
        let loss = f32::from_bits(loss_bits) as f64;
        let g_span = r * row..r * row + g_bytes;
        let (g_new, g_old) = (&s_out[g_span.clone()], &s_in[g_span]);
        let g = (c.place != GPlace::None).then(|| decode(c.out, g_new));
        if g.is_some() {
            for k in 0..c.v {
                let (new, old) = (elem_bits(c.out, g_new, k), elem_bits(c.out, g_old, k));
                // An f32 G over its own row (the staged kernels) puts the NaN row's NaN over
                // its NaN logit, the same bits; the NaN-throughout check below covers it.
                let nan_over_nan = c.nan == Some(r) && new == (f32::NAN).to_bits();
                if new == old && old != 0 && !nan_over_nan {
                    return Err(format!(
                        "row {r}: G element {k} not written (still {old:#x})"
                    ));
                }
            }
        }
        if c.nan == Some(r) {
            if !loss.is_nan() || loss_bits == POISON_F32 {
                return Err(format!("row {r} (a NaN logit): loss {loss} is not NaN"));
            }
            if g.as_ref().is_some_and(|g| g.iter().any(|x| !x.is_nan())) {
                return Err(format!("row {r} (a NaN logit): G is not NaN throughout"));
            }
            continue;
        }
        if ignored || (c.masked == Some(r) && c.p.cap.is_none()) {
            let what = if ignored { "ignored" } else { "fully masked" };
            if loss_bits != 0 {
                return Err(format!("row {r} ({what}): loss {loss} instead of +0"));
            }
            if g.is_some() && (0..c.v).any(|k| elem_bits(c.out, g_new, k) != 0) {
                return Err(format!("row {r} ({what}): G not all +0"));
            }
            continue;
        }
        let e = rel_err(&[loss], &[want_loss], fused_chunk::LOSS_FLOOR);
        if e > fused_chunk::LOSS_TOL {
            return Err(format!(
                "row {r}: loss {loss} against {want_loss} (error {e:.2e} > {:.0e})",
                fused_chunk::LOSS_TOL
            ));
        }
        if let Some(g) = g {
            let want: Vec<f64> = want_g.iter().map(|&x| round_to(c.out, x)).collect();
            let (e, tol) = (rel_err(&g, &want, 1e-30), g_tol(c.out));
            if e > tol {
                return Err(format!("row {r}: G error {e:.2e} > {tol:.0e}"));
            }
        }
    }
    Ok(())
}

/// Runs a fused case in both orders and checks it; the statistics line of the ascending run.
fn check_fused_case(exe: &Path, c: &FusedSimCase) -> Result<String, String> {
    let run = |reverse| run_emulator(exe, c.input(reverse), c.output_len());
    let (up, log) = run(false)?;
    let (down, _) = run(true)?;
    if let Some(at) = fused_difference(c, &up, &down) {
        return Err(format!(
            "ascending and descending orders differ (a race): first at {at}"
        ));
    }
    check_fused(c, &up)?;
    Ok(log)
}

/// The fused linear divergence's variant of the persistent kernels (`dk_divcp_fused_*`,
/// `dk_divcp256_fused_*`: f32 logits S and T, G — the gradient w.r.t. the raw logits, softcap
/// slope included — in the GEMMs' dtype), run on the emulator as the launcher lays G out: Q rows
/// before S in S's own buffer, with S's row bytes as its stride, so that G row r goes over the
/// logits of row r − Q, the row its cluster walked before (rows r < Q: the pad before S). The
/// kernel's claim is that this is race-free: that row's last loads ran an iteration earlier in
/// every block of the cluster, and the cluster barrier orders them before the stores. The
/// emulator runs the cluster's blocks as far ahead of each other as the barrier allows, so a
/// store that overtakes a load shows as a difference between the two orders and against the
/// reference.
///
/// Checks, per case: the emulator's own (S's rows a read-only extent and G's rows a store-only
/// one over them and the pad: a store into S outside G's rows or a load of the pad is an
/// error; every 16-byte chunk of G stored exactly once); both orders bitwise equal; per-row
/// losses and G against the f64 reference of tests/common (`fused_chunk::reference_row`, G
/// rounded to its dtype) at DESIGN.md's tolerances (losses 1e-5; G 1e-5 in f32, 1e-2 in bf16 /
/// f16, relative norm per row); ignored and fully masked rows exactly +0; the NaN row NaN
/// throughout; T and the labels untouched; S's buffer untouched outside G's rows (the second
/// half of each row's bytes under a 16-bit G, S's last Q rows, the rows' padding; all of it
/// when forward only); every G element written (see `make_fused`).
///
/// Cases: `fused_cases`.
#[test]
fn fused_persistent_kernels_write_g_q_rows_before_s() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh("fused_persistent_kernels_write_g_q_rows_before_s");
    let cases = fused_cases(&mut rng);
    run_cases_parallel(TEST, cases.len(), |i| {
        let c = &cases[i];
        (
            format!("{} C={} Q={}: {}", c.kernel(), c.c, c.q, c.what),
            check_fused_case(&exe, c),
        )
    });
}

/// A fused case on the staged kernel (512 threads, G over S's own rows unless forward only)
/// with `stash`.
fn on_staged(c: FusedSimCase, stash: Stash) -> FusedSimCase {
    FusedSimCase {
        threads: 512,
        staged: true,
        stash,
        place: match c.place {
            GPlace::None => GPlace::None,
            GPlace::Before | GPlace::Own => GPlace::Own,
        },
        what: c
            .what
            .replace(&format!("G {} rows before S", c.q), "G over its own rows"),
        ..c
    }
}

/// The JSD cases of `fused_cases` on the staged kernel with `stash`: those with G, and with
/// `forward` the forward-only ones too.
fn fused_staged_jsd_cases(rng: &mut Rng, stash: Stash, forward: bool) -> Vec<FusedSimCase> {
    let cases: Vec<FusedSimCase> = fused_cases(rng)
        .into_iter()
        .filter(|c| effective_kind(c.p.kind, c.p.beta) == Kind::Jsd)
        .filter(|c| forward || c.place != GPlace::None)
        .map(|c| on_staged(c, stash))
        .collect();
    assert!(cases.len() >= 6, "{} fused JSD cases", cases.len());
    cases
}

/// The staged kernels' fused variant (`dk_divcq_fused_*`, cuda/divergence_staged.cu and
/// cuda/FUSED.md, version 4) on the same cases, G over S's own rows as the launcher lays it
/// out for them (shift 0, S's row bytes as G's stride: the layout the next test shows to race
/// in the persistent kernels), 512 threads. The same checks: both orders bitwise equal (the
/// descending run lands the copies late), every G chunk stored once, S untouched outside G's
/// rows, T untouched, per-row loss and G against the f64 reference.
#[test]
fn fused_staged_kernels_write_g_over_s() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh("fused_staged_kernels_write_g_over_s");
    let cases: Vec<FusedSimCase> = fused_cases(&mut rng)
        .into_iter()
        .map(|c| {
            // As the launcher: JSD with G keeps log2(q/m) over T's slice; forward only, nothing.
            let jsd_grad =
                effective_kind(c.p.kind, c.p.beta) == Kind::Jsd && c.place != GPlace::None;
            let stash = if jsd_grad {
                Stash::LogRatio
            } else {
                Stash::Off
            };
            on_staged(c, stash)
        })
        .collect();
    run_cases_parallel(TEST, cases.len(), |i| {
        let c = &cases[i];
        (
            format!("{} C={} Q={}: {}", c.kernel(), c.c, c.q, c.what),
            check_fused_case(&exe, c),
        )
    });
}

/// The fused staged JSD kernels' stash (over T's f32 slice) changes no bit either: the JSD cases
/// with G of `fused_cases` (fresh draws), run with and without it, must give bitwise the same
/// buffers (`fused_staged_kernels_write_g_over_s` checks the stashed runs against the reference).
#[test]
fn fused_staged_jsd_stash_changes_no_bit() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh("fused_staged_jsd_stash_changes_no_bit");
    let cases = fused_staged_jsd_cases(&mut rng, Stash::LogRatio, false);
    run_cases_parallel(TEST, cases.len(), |i| {
        let on = &cases[i];
        let result = (|| {
            let (with, log) = run_emulator(&exe, on.input(false), on.output_len())?;
            let off = FusedSimCase {
                stash: Stash::Off,
                what: String::new(),
                s: on.s.clone(),
                t: on.t.clone(),
                labels: on.labels.clone(),
                ..*on
            };
            let (without, _) = run_emulator(&exe, off.input(false), off.output_len())?;
            match with.iter().zip(&without).position(|(a, b)| a != b) {
                Some(at) => Err(format!("the stash changed the output at byte {at}")),
                None if with.len() != without.len() => Err("output lengths differ".into()),
                None => Ok(log),
            }
        })();
        (
            format!("{} C={} Q={}: {}", on.kernel(), on.c, on.q, on.what),
            result,
        )
    });
}

/// The fused staged JSD kernels with the exponentials kept (versions 11 and 12) on the JSD
/// cases of `fused_cases`, G over S's own rows or forward only (version 12):
/// `fused_staged_kernels_write_g_over_s`'s checks.
#[test]
fn fused_staged_jsd_kept_exponentials_write_g_over_s() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh("fused_staged_jsd_kept_exponentials_write_g_over_s");
    let cases = fused_staged_jsd_cases(&mut rng, Stash::Exp, true);
    run_cases_parallel(TEST, cases.len(), |i| {
        let c = &cases[i];
        (
            format!("{} C={} Q={}: {}", c.kernel(), c.c, c.q, c.what),
            check_fused_case(&exe, c),
        )
    });
}

/// That the fused test can see the race it is about: the same launches with G over S's own
/// rows (shift 0) and a bf16 G, whose bytes are the first half of the f32 row that the
/// cluster's other blocks (and the block's other threads) read in the same iteration, must
/// fail by the two orders giving different bytes. (Any other failure does not count: a value
/// off the reference alone, or the emulator rejecting an access — the layout is as legal for
/// it as Q rows before.)
#[test]
fn fused_persistent_g_over_its_own_rows_is_seen_to_race() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh("fused_persistent_g_over_its_own_rows_is_seen_to_race");
    let cases = [
        make_fused(
            &mut rng,
            (Kind::ForwardKl, 0.5),
            DType::BF16,
            None,
            GPlace::Own,
            (512, 2, 2),
            (8, v_for(2, 512, 2.5, 0)),
            false,
        ),
        make_fused(
            &mut rng,
            (Kind::Jsd, 0.5),
            DType::BF16,
            Some(30.0),
            GPlace::Own,
            (256, 4, 1),
            (6, v_for(4, 256, 2.5, 5)),
            true,
        ),
    ];
    run_cases_parallel(TEST, cases.len(), |i| {
        let c = &cases[i];
        let what = format!("{} C={} Q={}: {}", c.kernel(), c.c, c.q, c.what);
        let verdict = match check_fused_case(&exe, c) {
            Ok(_) => Err(
                "passed: the test does not see the race of a 16-bit G over its own \
                          rows"
                    .to_string(),
            ),
            // The race itself: the two orders see different bytes. Any other failure (a
            // value off the reference alone, an element not written) is not this test's point.
            Err(e) if e.contains("orders differ (a race)") => Ok(format!("fails as it must: {e}")),
            Err(e) => Err(format!(
                "failed, but not by the two orders differing (the race): {e}"
            )),
        };
        (what, verdict)
    });
}
