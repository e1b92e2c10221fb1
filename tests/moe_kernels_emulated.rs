//! The REAL MoE kernels of cuda/moe.cu run on the CPU and compared with the crate's CPU backend.
//!
//! tests/moe_kernel_sim.rs replays the routing arithmetic (dk_moe_route_math.cuh); this test
//! compiles the kernel file itself for the host with the emulator of
//! tests/attention_sim/sim_core.h (every CUDA thread a fiber, warps in lockstep at shuffles,
//! redux.sync and __syncwarp, __syncthreads, guarded global and shared memory, static
//! `__shared__` arrays each in its own guarded, 0xff-filled mapping) and runs every kernel the
//! launcher (src/moe/cuda.rs) uses, with the launcher's kernel choice, grid, block and shared
//! memory (0 bytes of dynamic shared memory everywhere; the formulas are repeated below, each
//! citing its source):
//! - route: `dk_moe_topk_{f32,bf16}_p{1,2,4,8,16,32}` (P from E as `topk_kernel_name`),
//!   `dk_moe_scan`, `dk_moe_assign`;
//! - permute: the token-major path for k > 1 (`dk_moe_perm_invert_*`, `dk_moe_permute_tokens_*`,
//!   then `dk_moe_permute_*`, which returns at once unless perm is not a permutation), and the
//!   row gather `dk_moe_permute_*` alone (k = 1, or `DK_MOE_PERMUTE=gather`), unscaled and
//!   scaled by the weights;
//! - combine `dk_moe_combine_*`, weighted and unweighted (k = 1: two items per warp, the grid
//!   sized by item pairs); slot dot `dk_moe_slot_dot_*`;
//! - the backward passes are these kernels on gradients (src/moe/mod.rs): permute's backward is
//!   a combine (weighted when the forward scaled) plus, when scaled, slot_dot(x, grad_xp) for the
//!   weights; combine's backward is a permute of grad_y (scaled when weighted) plus
//!   slot_dot(grad_y, expert_out).
//!
//! Every launch sequence runs on poisoned outputs (and a poisoned route workspace) in four
//! orders: blocks, warps and lanes ascending; all descending; warps interleaved at every warp
//! collective (lanes ascending, then descending). The four results must be bitwise identical
//! (a race between warps or lanes shows as a difference). The emulator checks converged warps at
//! every collective, 16-byte accesses and atomics inside one row of an operand (stores into
//! writable ones only), each 16-byte output chunk stored at most once per launch, shared and
//! global guard regions. Then, against the CPU backend on the same inputs:
//! - route: expert ids, counts, offsets, perm (every entry) and position exactly; every output
//!   element written, nothing past the outputs written. Weights: the CPU computes in f64, the
//!   kernel in f32 (with the host libm's expf here, the device's on a GPU), so they are compared
//!   at `(P + 16) · 2⁻²⁴` relative (P rounding steps of the lane's partial softmax sum, 5 of the
//!   butterfly, and a few for exp, the divisions, the renormalisation sum and the scale), NaN
//!   where the CPU has NaN. Random logits are drawn without near-ties (two selection scores, or
//!   two group scores, within 1e-5 relative but not equal), where f32 and f64 may rank them
//!   differently; exact ties are built in on purpose.
//! - movers, bitwise where the CPU's arithmetic is the kernel's: permute unscaled (a copy, every
//!   dtype), permute scaled in f32 (one rounding of the exact product either way), combine in
//!   f32 with k = 1 (fmaf(w, v, 0) is the rounded product); elsewhere the CPU sums in f64 and
//!   rounds once, so: scaled 16-bit permute within 1 ulp of the dtype (the kernel rounds the
//!   product to f32 first: a double rounding), combine within 1 ulp of the dtype plus
//!   k · 2⁻²³ · Σ|w·v| (k fmaf roundings of an f32 accumulator), slot dot within
//!   H · 2⁻²³ · Σ|t·r| (f32 partial sums). Every mover output is also compared BITWISE with the
//!   kernel's own order restated here (fmaf over the slots in order, then one rounding to the
//!   dtype; slot dot's 8 partial sums per lane, added in order, then the xor butterfly), which is
//!   what makes the tolerances above a second check rather than the only one.
//! - every output row written (no poison left), padding columns and rows past the outputs
//!   untouched, inputs unchanged.
//!
//! Cases: Qwen3-like (softmax top-8 of 128, renormalised), Llama-4-like (sigmoid top-1 with the
//! expert input scaled), DeepSeek-V3-like (sigmoid + bias, 8 groups keep 4, top-8, renormalised,
//! × 2.5), group selection with more than 32 groups, E from 8 to 1024 (every P: 1, 2, 4, 8, 16,
//! 32, both selection paths of P ≤ 8), k = 1 ... 32 (the movers and fused backward kernels
//! at k = 1, 2, 3, 8 and 32), ties (equal logits, duplicated groups), NaN
//! and ±inf logits, capacity drops, block padding, N not a multiple of the 32-token chunk, padded
//! logit strides (NaN padding), bf16 / f16 / f32 activations, H a multiple of 8 but not of the
//! 1024-element segment (and H = 8), perm that is not a permutation (the token-major path's
//! fallback to the gather).
//!
//! `DK_SIM_MOE_CU=<file>` stages that file instead of cuda/moe.cu, and
//! `DK_SIM_MOE_INCLUDE=<dir>` takes the headers from there instead of cuda/include (to check
//! that the test catches a deliberately broken copy). Without a C++ compiler the test prints
//! SKIPPED (and fails under CI).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::moe::*;
use common::*;
use distill_kernels::moe::{RouteParams, Score};
use distill_kernels::{Context, DType};
use half::{bf16, f16};

const TEST: &str = "moe_kernels_emulated";

// ------------------------------------------------------------------------------------------
// The launcher's constants and formulas (src/moe/cuda.rs)
// ------------------------------------------------------------------------------------------

/// `CHUNK` (tokens per chunk of the counting pass, `DK_MOE_CHUNK`).
const CHUNK: usize = 32;
/// `TOPK_THREADS`, `SCAN_THREADS`, `ASSIGN_THREADS`, `ASSIGN_PER_THREAD`.
const TOPK_THREADS: u32 = 256;
const SCAN_THREADS: u32 = 256;
const ASSIGN_THREADS: u32 = 256;
const ASSIGN_PER_THREAD: usize = 1;
/// `ROWS_THREADS`, `ROWS_WARPS`, `SEG_CHUNKS`, `MAX_BLOCKS`, `FALLBACK_GATHER_BLOCKS`.
const ROWS_THREADS: u32 = 256;
const ROWS_WARPS: usize = 8;
const SEG_CHUNKS: usize = 128;
const MAX_BLOCKS: usize = 1 << 24;
/// `FALLBACK_GATHER_BLOCKS`.
const FALLBACK_GATHER_BLOCKS: usize = 1024;

/// `route_workspace_size`: one int per (expert, chunk), rounded up to 256 bytes.
fn route_workspace_size(n: usize, e: usize) -> usize {
    (4 * e * n.div_ceil(CHUNK)).next_multiple_of(256).max(256)
}

/// `topk_kernel_name`: P = ceil(E / 32) rounded up to a power of two.
fn topk_p(e: usize) -> usize {
    e.div_ceil(32).next_power_of_two()
}

/// `segments`: warp items per row.
fn segments(h: usize) -> usize {
    (h / 8).div_ceil(SEG_CHUNKS)
}

/// `launch_rows`: blocks for `warp_items`.
fn rows_grid(warp_items: usize) -> u32 {
    warp_items.div_ceil(ROWS_WARPS).min(MAX_BLOCKS) as u32
}

// ------------------------------------------------------------------------------------------
// Building the emulator
// ------------------------------------------------------------------------------------------

fn simulator() -> Option<PathBuf> {
    static SIM: OnceLock<Option<PathBuf>> = OnceLock::new();
    SIM.get_or_init(build_simulator).clone()
}

fn build_simulator() -> Option<PathBuf> {
    let root = repo_root();
    let stage = stage_kernel_source(TEST, "moe.cu", "DK_SIM_MOE_CU");
    let include = match std::env::var_os("DK_SIM_MOE_INCLUDE") {
        Some(alt) => {
            visible(&format!(
                "{TEST}: headers from {} (DK_SIM_MOE_INCLUDE)",
                Path::new(&alt).display()
            ));
            PathBuf::from(alt)
        }
        None => root.join("cuda/include"),
    };
    build_kernel_simulator(
        TEST,
        &root.join("tests/moe_sim_kernels/moe_kernels_emu.cpp"),
        &[stage, include, root.join("tests/attention_sim")],
        EMULATOR_CXX_FLAGS,
    )
}

// ------------------------------------------------------------------------------------------
// Launch sequences
// ------------------------------------------------------------------------------------------

/// A buffer handed to the emulator: its bytes and the operand extent inside it.
#[derive(Clone)]
struct SimBuf {
    name: &'static str,
    bytes: Bytes,
    /// rows, bytes per row, bytes between rows (rows = 0: no extent).
    extent: (usize, usize, usize),
    writable: bool,
}

fn vec_buf(name: &'static str, bytes: &Bytes, len_bytes: usize, writable: bool) -> SimBuf {
    SimBuf {
        name,
        bytes: bytes.clone(),
        extent: (usize::from(len_bytes > 0), len_bytes, len_bytes),
        writable,
    }
}

fn mat_buf(
    name: &'static str,
    bytes: &Bytes,
    dtype: DType,
    rows: usize,
    cols: usize,
    stride: usize,
    writable: bool,
) -> SimBuf {
    let s = dtype.size();
    SimBuf {
        name,
        bytes: bytes.clone(),
        extent: (rows, cols * s, stride.max(cols) * s),
        writable,
    }
}

/// `DkMoeRouteArgs` (cuda/include/dk_moe_args.h; src/moe/cuda.rs `MoeRouteArgs`): pointer
/// fields hold a buffer index + 1 (0: null).
#[derive(Default, Clone, Copy)]
struct RouteArgs {
    ptrs: [u64; 9], // logits bias expert_ids weights counts offsets perm position chunk_counts
    n: i64,
    logits_stride: i64,
    perm_rows: i64,
    ints: [i32; 9], // e k score renormalize n_groups topk_groups capacity block chunks
    scale: f32,
}

impl RouteArgs {
    fn bytes(&self) -> Vec<u8> {
        let mut o = Vec::new();
        self.ptrs.iter().for_each(|p| o.extend(p.to_ne_bytes()));
        [self.n, self.logits_stride, self.perm_rows]
            .iter()
            .for_each(|x| o.extend(x.to_ne_bytes()));
        self.ints.iter().for_each(|x| o.extend(x.to_ne_bytes()));
        o.extend(self.scale.to_ne_bytes());
        assert_eq!(o.len(), 136, "sizeof(DkMoeRouteArgs)");
        o
    }
}

/// `DkMoeRowsArgs`: pointer fields as above.
#[derive(Default, Clone, Copy)]
struct RowsArgs {
    ptrs: [u64; 7], // src src2 index index2 weights dst dst2
    items: i64,
    h: i64,
    src_stride: i64,
    src2_stride: i64,
    dst_stride: i64,
    k: i32,
    limit: i32,
}

impl RowsArgs {
    fn bytes(&self) -> Vec<u8> {
        let mut o = Vec::new();
        self.ptrs.iter().for_each(|p| o.extend(p.to_ne_bytes()));
        [
            self.items,
            self.h,
            self.src_stride,
            self.src2_stride,
            self.dst_stride,
        ]
        .iter()
        .for_each(|x| o.extend(x.to_ne_bytes()));
        o.extend(self.k.to_ne_bytes());
        o.extend(self.limit.to_ne_bytes());
        assert_eq!(o.len(), 104, "sizeof(DkMoeRowsArgs)");
        o
    }
}

struct SimLaunch {
    kernel: String,
    grid: u32,
    block: u32,
    args: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u32).to_ne_bytes());
    out.extend(s.as_bytes());
}

/// Runs the launches on the buffers in one order (0 ascending, 1 descending, 2 / 3 warps
/// interleaved with ascending / descending lanes): the buffers after, and the statistics line.
fn run_sim(
    exe: &Path,
    bufs: &[SimBuf],
    launches: &[SimLaunch],
    order: i32,
) -> Result<(Vec<Bytes>, String), String> {
    let mut o = Vec::new();
    o.extend(0x454f_4d44u32.to_ne_bytes());
    o.extend(order.to_ne_bytes());
    o.extend((bufs.len() as u32).to_ne_bytes());
    for b in bufs {
        put_str(&mut o, b.name);
        o.extend((b.bytes.len() as u64).to_ne_bytes());
        o.extend(b.bytes.as_ref());
        for x in [b.extent.0, b.extent.1, b.extent.2] {
            o.extend((x as i64).to_ne_bytes());
        }
        o.extend((b.writable as i32).to_ne_bytes());
    }
    o.extend((launches.len() as u32).to_ne_bytes());
    for l in launches {
        put_str(&mut o, &l.kernel);
        for x in [l.grid, l.block, 0u32, l.args.len() as u32] {
            o.extend(x.to_ne_bytes());
        }
        o.extend(&l.args);
    }
    let total: usize = bufs.iter().map(|b| b.bytes.len()).sum();
    let (stdout, log) = run_emulator(exe, o, total)?;
    let mut at = 0;
    let out = bufs
        .iter()
        .map(|b| {
            let x = Bytes::from_slice(&stdout[at..at + b.bytes.len()]);
            at += b.bytes.len();
            x
        })
        .collect();
    Ok((out, log))
}

/// Runs in all four orders; errors unless they agree bitwise. Returns the buffers after.
fn run_all_orders(
    exe: &Path,
    bufs: &[SimBuf],
    launches: &[SimLaunch],
) -> Result<(Vec<Bytes>, String), String> {
    let (first, log) = run_sim(exe, bufs, launches, 0)?;
    for order in 1..4 {
        let (other, _) = run_sim(exe, bufs, launches, order)?;
        for (i, (a, b)) in first.iter().zip(&other).enumerate() {
            // perm_invert's scratch: which of two rows claiming one slot wins depends on the
            // order (only when perm is not a permutation; the outputs must not).
            if a != b && bufs[i].name != "pos scratch" {
                let at = (0..a.len())
                    .find(|&j| a.as_ref()[j] != b.as_ref()[j])
                    .unwrap();
                return Err(format!(
                    "order {order} differs from the ascending order (a race): buffer {} byte {at}",
                    bufs[i].name
                ));
            }
        }
    }
    Ok((first, log))
}

// ------------------------------------------------------------------------------------------
// Route
// ------------------------------------------------------------------------------------------

/// The launcher's three route launches (src/moe/cuda.rs `route`) over `RouteCase::bufs` plus
/// the workspace (buffer 9).
fn route_launches(c: &RouteCase) -> Vec<SimLaunch> {
    let (n, e, k) = (c.n(), c.e(), c.params.k);
    let chunks = n.div_ceil(CHUNK);
    let p = &c.params;
    let args = RouteArgs {
        ptrs: [1, if c.bias.is_some() { 2 } else { 0 }, 3, 4, 5, 6, 7, 8, 9],
        n: n as i64,
        logits_stride: c.logits.stride as i64,
        perm_rows: c.perm_rows as i64,
        ints: [
            e as i32,
            k as i32,
            match p.score {
                Score::Softmax => 0,
                Score::Sigmoid => 1,
            },
            p.renormalize as i32,
            p.n_groups as i32,
            p.topk_groups as i32,
            p.capacity
                .map_or(i32::MAX, |c| c.min(i32::MAX as usize) as i32),
            p.block as i32,
            chunks as i32,
        ],
        scale: p.scale,
    }
    .bytes();
    let mut l = Vec::new();
    if chunks > 0 {
        l.push(SimLaunch {
            kernel: format!("dk_moe_topk_{}_p{}", c.logits.dtype.name(), topk_p(e)),
            grid: chunks as u32,
            block: TOPK_THREADS,
            args: args.clone(),
        });
    }
    l.push(SimLaunch {
        kernel: "dk_moe_scan".into(),
        grid: e as u32,
        block: SCAN_THREADS,
        args: args.clone(),
    });
    let work = (n * k).max(c.perm_rows).max(1);
    l.push(SimLaunch {
        kernel: "dk_moe_assign".into(),
        grid: work
            .div_ceil(ASSIGN_THREADS as usize * ASSIGN_PER_THREAD)
            .min(MAX_BLOCKS) as u32,
        block: ASSIGN_THREADS,
        args,
    });
    l
}

fn route_sim_bufs(c: &RouteCase) -> Vec<SimBuf> {
    use route_buf::*;
    let (n, e, s) = (c.n(), c.e(), c.slots());
    let b = c.bufs();
    let ws = route_workspace_size(n, e);
    vec![
        mat_buf(
            "logits",
            &b[LOGITS],
            c.logits.dtype,
            n,
            e,
            c.logits.stride,
            false,
        ),
        vec_buf(
            "bias",
            &b[BIAS],
            if c.bias.is_some() { 4 * e } else { 0 },
            false,
        ),
        vec_buf("expert_ids", &b[IDS], 4 * s, true),
        vec_buf("weights", &b[WEIGHTS], 4 * s, true),
        vec_buf("counts", &b[COUNTS], 4 * e, true),
        vec_buf("offsets", &b[OFFSETS], 4 * (e + 1), true),
        vec_buf("perm", &b[PERM], 4 * c.perm_rows, true),
        vec_buf("position", &b[POSITION], 4 * s, true),
        vec_buf(
            "chunk_counts",
            &poison_i32(ws / 4),
            4 * e * n.div_ceil(CHUNK),
            true,
        ),
    ]
}

/// The route on the CPU backend: its outputs.
fn cpu_route(c: &RouteCase) -> Result<RouteOut, String> {
    let (res, before, after) = c.run(&Device::Cpu(Context::cpu()));
    res.map_err(|e| format!("the CPU backend refused the route: {e}"))?;
    c.tails(&before, &after)?;
    Ok(c.outputs(&after))
}

fn check_route(exe: &Path, c: &RouteCase) -> Result<String, String> {
    let want = cpu_route(c)?;
    let bufs = route_sim_bufs(c);
    let (after, log) = run_all_orders(exe, &bufs, &route_launches(c))?;
    let before: Vec<Bytes> = bufs.iter().map(|b| b.bytes.clone()).collect();
    c.tails(&before[..8], &after[..8])
        .map_err(|e| format!("kernel outputs: {e}"))?;
    let got = c.outputs(&after);
    let k = c.params.k;
    for (name, g, w) in [
        ("expert_ids", &got.expert_ids, &want.expert_ids),
        ("counts", &got.counts, &want.counts),
        ("offsets", &got.offsets, &want.offsets),
        ("perm", &got.perm, &want.perm),
        ("position", &got.position, &want.position),
    ] {
        if let Some(i) = (0..w.len()).find(|&i| g[i] != w[i]) {
            let at = if name == "expert_ids" || name == "position" {
                format!(" (token {}, slot {})", i / k, i % k)
            } else {
                String::new()
            };
            return Err(format!(
                "{name}[{i}]{at} = {} where the CPU has {}",
                g[i], w[i]
            ));
        }
    }
    let tol = (topk_p(c.e()) + 16) as f64 * 2f64.powi(-24);
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.weights.iter().zip(&want.weights).enumerate() {
        if w.is_nan() || g.is_nan() {
            if w.is_nan() != g.is_nan() {
                return Err(format!("weights[{i}] = {g} where the CPU has {w}"));
            }
            continue;
        }
        let err = (g as f64 - w as f64).abs();
        // Relative, down to 1e-30: a score that underflows f32 on the direct division has a
        // weight below ~3e-36 there (cuda/MOE.md), where the CPU's f64 may still have one.
        let rel = err / (w as f64).abs().max(1e-30);
        worst = worst.max(rel);
        if rel > tol {
            return Err(format!(
                "weights[{i}] (token {}, slot {}) = {g:e} where the CPU has {w:e}: {rel:.2e} relative > {tol:.2e}",
                i / k,
                i % k
            ));
        }
    }
    Ok(format!(
        "{log}\n    weights: worst {worst:.2e} relative (bound {tol:.2e})"
    ))
}

/// Selection keys of one token in f64 (the CPU's), for the near-tie filter: (the k + 1 best
/// candidate keys in the kept groups, the topk_groups + 1 best group scores).
fn decision_keys(row: &[f64], bias: Option<&[f32]>, p: &RouteParams) -> (Vec<f64>, Vec<f64>) {
    let e = row.len();
    let scores: Vec<f64> = match p.score {
        Score::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        Score::Softmax => {
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = row.iter().map(|&x| (x - m).exp()).collect();
            let z: f64 = ex.iter().sum();
            ex.iter().map(|&x| x / z).collect()
        }
    };
    let key = |x: f64| if x.is_nan() { f64::NEG_INFINITY } else { x };
    let sel: Vec<f64> = (0..e)
        .map(|i| key(scores[i] + bias.map_or(0.0, |b| b[i] as f64)))
        .collect();
    let desc = |v: &mut Vec<(f64, usize)>| {
        v.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)))
    };
    let size = e / p.n_groups;
    let mut groups: Vec<(f64, usize)> = (0..p.n_groups)
        .map(|g| {
            let mut s: Vec<f64> = sel[g * size..(g + 1) * size].to_vec();
            s.sort_by(|a, b| b.partial_cmp(a).unwrap());
            (key(s[0] + s[1.min(s.len() - 1)]), g)
        })
        .collect();
    desc(&mut groups);
    let kept: Vec<usize> = if p.n_groups > 1 {
        groups[..p.topk_groups].iter().map(|&(_, g)| g).collect()
    } else {
        vec![0]
    };
    let mut cand: Vec<(f64, usize)> = (0..e)
        .filter(|&i| p.n_groups == 1 || kept.contains(&(i / size)))
        .map(|i| (sel[i], i))
        .collect();
    desc(&mut cand);
    let gk = if p.n_groups > 1 {
        (p.topk_groups + 1).min(p.n_groups)
    } else {
        0
    };
    (
        cand.iter().take(p.k + 1).map(|x| x.0).collect(),
        groups.iter().take(gk).map(|x| x.0).collect(),
    )
}

/// Two different values within 1e-5 relative: f32 and f64 may order them differently.
fn near_tie(keys: &[f64]) -> bool {
    keys.windows(2).any(|w| {
        let (a, b) = (w[0], w[1]);
        a.is_finite() && b.is_finite() && a != b && (a - b).abs() <= 1e-5 * a.abs().max(b.abs())
    })
}

fn row_near_tie(row: &[f64], bias: Option<&[f32]>, p: &RouteParams) -> bool {
    let (c, g) = decision_keys(row, bias, p);
    near_tie(&c) || near_tie(&g)
}

/// What to build into a route's logits beyond random rows.
#[derive(Default, Clone)]
struct Special {
    /// Rows of equal logits (every expert ties).
    all_equal: Vec<usize>,
    /// Rows whose second half of the experts repeats the first (ties between experts, and
    /// between groups when the groups split evenly).
    duplicated: Vec<usize>,
    /// Rows with a NaN logit; rows with a +inf logit; rows with a quarter of -inf logits.
    nan: Vec<usize>,
    pos_inf: Vec<usize>,
    neg_inf: Vec<usize>,
    /// Rows shifted by −100: every f32 sigmoid score 0 or subnormal, so renormalisation reads
    /// the logits again (the kernel's `logit_of`, this token's row).
    low: Vec<usize>,
}

#[allow(clippy::too_many_arguments)]
fn route_case(
    rng: &mut Rng,
    what: &str,
    dtype: DType,
    (n, e): (usize, usize),
    stride_pad: usize,
    std: f64,
    params: RouteParams,
    bias: bool,
    sp: &Special,
) -> RouteCase {
    // Bias: a shuffled grid with steps of 0.1 / E (no two within 1e-5 of each other). A row of
    // equal logits depends on the bias alone, and its group keys (sums of two biased scores)
    // may still come within 1e-5 for some shuffles: then the whole case is drawn again.
    for _ in 0..20 {
        if let Some(c) = try_route_case(rng, what, dtype, (n, e), stride_pad, std, params, bias, sp)
        {
            return c;
        }
    }
    panic!("{what}: no bias shuffle and logits without a near-tie in 20 draws");
}

/// One draw of [`route_case`]'s inputs: None when a row keeps a near-tie through 200 redraws
/// of its logits (a row that does not change with them: equal logits).
#[allow(clippy::too_many_arguments)]
fn try_route_case(
    rng: &mut Rng,
    what: &str,
    dtype: DType,
    (n, e): (usize, usize),
    stride_pad: usize,
    std: f64,
    params: RouteParams,
    bias: bool,
    sp: &Special,
) -> Option<RouteCase> {
    let bias: Option<Vec<f32>> = bias.then(|| {
        let mut order: Vec<usize> = (0..e).collect();
        for i in (1..e).rev() {
            order.swap(i, rng.below(0, i + 1));
        }
        order
            .iter()
            .map(|&j| ((j as f64 - e as f64 / 2.0) * 0.1 / e as f64) as f32)
            .collect()
    });
    let round = |x: f64| round_to(dtype, x);
    let mut vals = Vec::with_capacity(n * e);
    for t in 0..n {
        let special = sp.all_equal.contains(&t)
            || sp.low.contains(&t)
            || sp.duplicated.contains(&t)
            || sp.nan.contains(&t)
            || sp.pos_inf.contains(&t)
            || sp.neg_inf.contains(&t);
        let mut row: Vec<f64>;
        let mut tries = 0;
        loop {
            row = (0..e).map(|_| round(rng.normal() * std)).collect();
            if sp.all_equal.contains(&t) {
                row.fill(0.375);
            }
            if sp.duplicated.contains(&t) {
                for i in e / 2..e {
                    row[i] = row[i - e / 2];
                }
            }
            if sp.neg_inf.contains(&t) {
                for x in row.iter_mut().step_by(4) {
                    *x = f64::NEG_INFINITY;
                }
            }
            if sp.pos_inf.contains(&t) {
                row[e / 3] = f64::INFINITY;
            }
            if sp.nan.contains(&t) {
                row[e / 2] = f64::NAN;
            }
            if sp.low.contains(&t) {
                row.iter_mut().for_each(|x| *x = round(*x - 100.0));
            }
            if !row_near_tie(&row, bias.as_deref(), &params) {
                break;
            }
            tries += 1;
            if tries == 200 {
                // Redrawing the logits does not help (equal logits): a new draw of the case.
                assert!(special, "{what}: no logits without a near-tie for row {t}");
                return None;
            }
        }
        vals.extend(row);
    }
    let logits = Logits::new(dtype, n, e, &vals).with_stride(e + stride_pad);
    let mut c = RouteCase::new(logits, bias, params);
    c.what = format!("{what}: {} P={}", c.what, topk_p(e));
    Some(c)
}

fn params(k: usize, score: Score) -> RouteParams {
    RouteParams {
        score,
        ..RouteParams::new(k)
    }
}

fn route_cases(rng: &mut Rng) -> Vec<RouteCase> {
    use DType::{BF16, F32};
    use Score::{Sigmoid, Softmax};
    let mut out = Vec::new();
    let specials = |n: usize| Special {
        all_equal: vec![1],
        duplicated: vec![n / 2],
        nan: vec![n - 1],
        pos_inf: vec![n - 2],
        neg_inf: vec![3, n - 3],
        low: Vec::new(),
    };
    // Renormalised sigmoid: rows near -100, at each of a warp's four turns (token n0 + warp +
    // 8 t of a 32-token chunk: rows 5, 13, 21, 29 are warp 5's turns 0 to 3).
    let low = |n: usize| Special {
        low: vec![0, 5, 13, 21, 29, n - 4],
        ..specials(n)
    };
    // Qwen3-MoE: softmax top-8 of 128, renormalised (P = 4, sorted candidates).
    let qwen = RouteParams {
        renormalize: true,
        ..params(8, Softmax)
    };
    out.push(route_case(
        rng,
        "Qwen3",
        F32,
        (70, 128),
        4,
        1.0,
        qwen,
        false,
        &specials(70),
    ));
    out.push(route_case(
        rng,
        "Qwen3 capacity + block",
        BF16,
        (45, 128),
        0,
        1.5,
        RouteParams {
            capacity: Some(3),
            block: 8,
            ..qwen
        },
        false,
        &specials(45),
    ));
    // Llama 4: sigmoid top-1 (P = 1).
    out.push(route_case(
        rng,
        "Llama4",
        BF16,
        (40, 16),
        8,
        2.0,
        params(1, Sigmoid),
        false,
        &specials(40),
    ));
    out.push(route_case(
        rng,
        "Llama4 capacity + block",
        F32,
        (33, 16),
        0,
        2.0,
        RouteParams {
            capacity: Some(2),
            block: 4,
            ..params(1, Sigmoid)
        },
        false,
        &Special::default(),
    ));
    // DeepSeek-V3: sigmoid + bias, 8 groups keep 4, top-8, renormalised, x 2.5 (P = 8).
    let ds = RouteParams {
        renormalize: true,
        n_groups: 8,
        topk_groups: 4,
        scale: 2.5,
        ..params(8, Sigmoid)
    };
    out.push(route_case(
        rng,
        "DeepSeek-V3",
        F32,
        (40, 256),
        0,
        1.5,
        ds,
        true,
        &low(40),
    ));
    out.push(route_case(
        rng,
        "DeepSeek-V3 bf16 capacity + block",
        BF16,
        (35, 256),
        8,
        1.5,
        RouteParams {
            capacity: Some(2),
            block: 16,
            ..ds
        },
        true,
        &Special::default(),
    ));
    // Sigmoid ranked by the logits, renormalised, rows near -100, padded stride (P = 2).
    out.push(route_case(
        rng,
        "sigmoid top-4 renormalised, low rows",
        BF16,
        (44, 48),
        8,
        3.0,
        RouteParams {
            renormalize: true,
            ..params(4, Sigmoid)
        },
        false,
        &low(44),
    ));
    // P = 16 (E = 512): scan selection; more than 32 groups (one lane per group).
    out.push(route_case(
        rng,
        "E=512",
        BF16,
        (36, 512),
        0,
        1.0,
        RouteParams {
            renormalize: true,
            ..params(8, Softmax)
        },
        false,
        &specials(36),
    ));
    out.push(route_case(
        rng,
        "E=512 64 groups keep 5",
        F32,
        (20, 512),
        0,
        1.5,
        RouteParams {
            n_groups: 64,
            topk_groups: 5,
            renormalize: true,
            ..params(6, Sigmoid)
        },
        true,
        &Special {
            duplicated: vec![4],
            ..Default::default()
        },
    ));
    // P = 32 (E > 512).
    out.push(route_case(
        rng,
        "E=1024",
        F32,
        (12, 1024),
        0,
        1.0,
        params(4, Softmax),
        false,
        &Special {
            nan: vec![5],
            neg_inf: vec![2],
            ..Default::default()
        },
    ));
    out.push(route_case(
        rng,
        "E=600 groups",
        BF16,
        (9, 600),
        8,
        1.5,
        RouteParams {
            n_groups: 8,
            topk_groups: 3,
            scale: 0.5,
            ..params(10, Sigmoid)
        },
        true,
        &Special::default(),
    ));
    // Every P <= 8 on both selection paths (use_sorted: P = 2 from k = 3, P = 4 from 4,
    // P = 8 from 5; P = 1 always sorted), k = E, k = 32.
    for (e, k, dtype, score) in [
        (8, 8, F32, Sigmoid),
        (20, 3, BF16, Softmax),
        (64, 2, F32, Softmax),
        (40, 3, BF16, Sigmoid),
        (64, 32, F32, Softmax),
        (100, 3, F32, Sigmoid),
        (128, 4, BF16, Softmax),
        (256, 4, F32, Softmax),
        (200, 5, BF16, Sigmoid),
    ] {
        let n = [1, 31, 32, 33, 65][rng.below(0, 5)];
        let sp = if n >= 8 {
            specials(n)
        } else {
            Special::default()
        };
        let pad = [0, 8][rng.below(0, 2)];
        let p = RouteParams {
            renormalize: rng.uniform() < 0.5,
            capacity: if rng.uniform() < 0.3 {
                Some(rng.below(1, 4))
            } else {
                None
            },
            block: [1, 1, 2, 16][rng.below(0, 4)],
            ..params(k, score)
        };
        let bias = rng.uniform() < 0.3;
        out.push(route_case(
            rng,
            "P sweep",
            dtype,
            (n, e),
            pad,
            1.0,
            p,
            bias,
            &sp,
        ));
    }
    // One expert.
    out.push(route_case(
        rng,
        "E=1",
        BF16,
        (40, 1),
        8,
        1.0,
        RouteParams {
            block: 8,
            ..params(1, Sigmoid)
        },
        false,
        &Special::default(),
    ));
    // Experts switched off by a −∞ bias beside NaN logits: NaN ranks below −∞ (select_key),
    // through the plain selection and through groups (their sums ranking a NaN as −∞).
    for (e, groups, k) in [(8, (1, 1), 8), (8, (4, 3), 5), (64, (8, 3), 9)] {
        let n = 6;
        let mut vals = rng.logits(n, e, 1.0);
        for (t, row) in vals.chunks_mut(e).enumerate() {
            for x in row.iter_mut().skip(t % 3 + 1).step_by(3) {
                *x = f64::NAN;
            }
        }
        let bias: Vec<f32> = (0..e)
            .map(|i| if i % 4 == 2 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let p = RouteParams {
            n_groups: groups.0,
            topk_groups: groups.1,
            ..params(k, Sigmoid)
        };
        out.push(RouteCase::new(Logits::new(F32, n, e, &vals), Some(bias), p));
    }
    out
}

// ------------------------------------------------------------------------------------------
// Permute, combine, slot dot
// ------------------------------------------------------------------------------------------

/// The route the movers run on (from the CPU backend: the route kernels are checked above).
struct Routed {
    n: usize,
    k: usize,
    weights: Vec<f32>,
    perm: Vec<i32>,
    position: Vec<i32>,
    /// Rows of the permuted buffer (perm entries, every one past offsets[E] is −1).
    rows: usize,
}

fn routed(c: &RouteCase) -> Routed {
    let r = cpu_route(c).expect("CPU route");
    Routed {
        n: c.n(),
        k: c.params.k,
        weights: r.weights,
        rows: r.perm.len(),
        perm: r.perm,
        position: r.position,
    }
}

fn to_bits16(dtype: DType, x: f32) -> u32 {
    match dtype {
        DType::F32 => x.to_bits(),
        DType::BF16 => bf16::from_f32(x).to_bits() as u32,
        DType::F16 => f16::from_f32(x).to_bits() as u32,
    }
}

fn from_bits(dtype: DType, b: u32) -> f32 {
    match dtype {
        DType::F32 => f32::from_bits(b),
        DType::BF16 => bf16::from_bits(b as u16).to_f32(),
        DType::F16 => f16::from_bits(b as u16).to_f32(),
    }
}

/// One ulp of `dtype` at |x|.
fn ulp(dtype: DType, x: f64) -> f64 {
    let bits = match dtype {
        DType::F32 => 24,
        DType::BF16 => 8,
        DType::F16 => 11,
    };
    let min_exp = match dtype {
        DType::F32 | DType::BF16 => -126,
        DType::F16 => -14,
    };
    let e = if x == 0.0 {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - bits + 1)
}

/// A mover check: the emulated output buffer against the kernel-order model (bitwise) and the
/// CPU backend's output (bitwise or within `tol(i)`).
struct Expect {
    dtype: DType,
    rows: usize,
    cols: usize,
    stride: usize,
    model: Vec<u32>,
    cpu_bitwise: bool,
    tol: Vec<f64>,
}

fn compare_rows(what: &str, e: &Expect, got: &Bytes, cpu: &Bytes) -> Result<(), String> {
    let (g, c) = (got.as_ref(), cpu.as_ref());
    let poison = poison_bits(e.dtype);
    for r in 0..e.rows {
        for col in 0..e.stride.max(e.cols) {
            let i = r * e.stride.max(e.cols) + col;
            let gb = elem_bits(e.dtype, g, i);
            if col >= e.cols {
                if gb != poison {
                    return Err(format!("{what}: padding [{r}, {col}] written"));
                }
                continue;
            }
            let cb = elem_bits(e.dtype, c, i);
            let m = e.model[r * e.cols + col];
            if gb == poison {
                return Err(format!("{what}: [{r}, {col}] not written"));
            }
            if gb != m {
                return Err(format!(
                    "{what}: [{r}, {col}] = {} ({gb:#x}) where the kernel's order gives {} ({m:#x})",
                    from_bits(e.dtype, gb),
                    from_bits(e.dtype, m)
                ));
            }
            let (gv, cv) = (from_bits(e.dtype, gb) as f64, from_bits(e.dtype, cb) as f64);
            let ok = if e.cpu_bitwise {
                gb == cb
            } else {
                (gv - cv).abs() <= e.tol[r * e.cols + col]
            };
            if !ok {
                return Err(format!(
                    "{what}: [{r}, {col}] = {gv:e} where the CPU has {cv:e} ({})",
                    if e.cpu_bitwise {
                        "bitwise".to_string()
                    } else {
                        format!("tolerance {:.2e}", e.tol[r * e.cols + col])
                    }
                ));
            }
        }
    }
    // Nothing past the rows.
    let used = e.rows * e.stride.max(e.cols);
    let total = g.len() / e.dtype.size();
    if let Some(j) = (used..total).find(|&j| elem_bits(e.dtype, g, j) != poison) {
        return Err(format!("{what}: element {j} past the output written"));
    }
    Ok(())
}

fn mat_vals(m: &Logits) -> Vec<f32> {
    m.vals.iter().map(|&x| x as f32).collect()
}

/// The kernels treat an index outside [0, limit) as −1 (cuda/include/dk_moe_args.h); the CPU
/// backend rejects it. The CPU reference runs on the indices with those replaced by −1.
fn sanitized(idx: &[i32], limit: usize) -> Vec<i32> {
    idx.iter()
        .map(|&p| if p < 0 || p as usize >= limit { -1 } else { p })
        .collect()
}

/// Indices outside [0, limit) put into a copy: −7, limit, limit + 5, i32::MAX, i32::MIN.
fn corrupted(idx: &[i32], limit: usize) -> Vec<i32> {
    let mut v = idx.to_vec();
    let bad = [-7, limit as i32, limit as i32 + 5, i32::MAX, i32::MIN];
    for (j, b) in bad.iter().enumerate() {
        let at = (j * 7 + 3) % v.len();
        v[at] = *b;
    }
    v
}

/// Permute: `PermuteCase` through the launcher's path (src/moe/cuda.rs `permute`).
fn check_permute(exe: &Path, c: &PermuteCase, gather: bool) -> Result<String, String> {
    let slots = c.x.rows * c.k;
    let sane = PermuteCase {
        perm: sanitized(&c.perm, slots),
        ..c.clone()
    };
    let (res, _, cpu_after) = sane.run(&Device::Cpu(Context::cpu()));
    res.map_err(|e| format!("the CPU backend refused: {e}"))?;
    let (n, h, k, rows) = (c.x.rows, c.x.cols, c.k, c.rows());
    let dt = c.x.dtype;
    let b = c.bufs();
    let mut bufs = vec![
        mat_buf("x", &b[0], dt, n, h, c.x.stride, false),
        vec_buf("perm", &b[1], 4 * rows, false),
        vec_buf(
            "weights",
            &b[2],
            if c.weights.is_some() { 4 * slots } else { 0 },
            false,
        ),
        mat_buf("out", &b[3], dt, rows, h, c.out_stride, true),
    ];
    let mut args = RowsArgs {
        ptrs: [1, 0, 2, 0, if c.weights.is_some() { 3 } else { 0 }, 4, 0],
        items: rows as i64,
        h: h as i64,
        src_stride: c.x.stride as i64,
        src2_stride: 0,
        dst_stride: c.out_stride as i64,
        k: k as i32,
        limit: slots as i32,
    };
    let t = dt.name();
    let mut launches = Vec::new();
    let gather_grid = rows_grid(rows * segments(h));
    if rows > 0 && h > 0 {
        if k == 1 || slots == 0 || gather {
            launches.push(SimLaunch {
                kernel: format!("dk_moe_permute_{t}"),
                grid: gather_grid,
                block: ROWS_THREADS,
                args: args.bytes(),
            });
        } else {
            // Scratch: slots ints preset to -1, then the flag preset to 0.
            let mut scratch = vec![-1i32; slots];
            scratch.push(0);
            bufs.push(vec_buf(
                "pos scratch",
                &bytes_i32(&scratch),
                4 * (slots + 1),
                true,
            ));
            args.ptrs[1] = 5;
            let a = args.bytes();
            launches.push(SimLaunch {
                kernel: format!("dk_moe_perm_invert_{t}"),
                grid: rows_grid(rows.div_ceil(32)),
                block: ROWS_THREADS,
                args: a.clone(),
            });
            launches.push(SimLaunch {
                kernel: format!("dk_moe_permute_tokens_{t}"),
                grid: rows_grid(n * segments(h)),
                block: ROWS_THREADS,
                args: a.clone(),
            });
            launches.push(SimLaunch {
                kernel: format!("dk_moe_permute_{t}"),
                grid: rows_grid((rows * segments(h)).min(FALLBACK_GATHER_BLOCKS * ROWS_WARPS)),
                block: ROWS_THREADS,
                args: a,
            });
        }
    }
    let (after, log) = run_all_orders(exe, &bufs, &launches)?;
    for i in 0..3 {
        if after[i] != bufs[i].bytes {
            return Err(format!("input {} modified", bufs[i].name));
        }
    }
    // The kernel's arithmetic: a raw copy, or round_T(f32(x · w)).
    let x = mat_vals(&c.x);
    let mut model = Vec::with_capacity(rows * h);
    let mut tol = Vec::with_capacity(rows * h);
    for r in 0..rows {
        let p = c.perm[r];
        for col in 0..h {
            if p < 0 || p as usize >= slots {
                model.push(to_bits16(dt, 0.0));
                tol.push(0.0);
                continue;
            }
            let v = x[(p as usize / k) * h + col];
            let y = match &c.weights {
                None => v,
                Some(w) => v * w[p as usize],
            };
            model.push(to_bits16(dt, y));
            tol.push(ulp(dt, y as f64));
        }
    }
    let e = Expect {
        dtype: dt,
        rows,
        cols: h,
        stride: c.out_stride,
        model,
        cpu_bitwise: c.weights.is_none() || dt == DType::F32,
        tol,
    };
    compare_rows("permute out", &e, &after[3], &cpu_after[act_buf::OUT])?;
    Ok(log)
}

/// Combine: `CombineCase` through `dk_moe_combine_*` (src/moe/cuda.rs `combine`).
fn check_combine(exe: &Path, c: &CombineCase, k: usize) -> Result<String, String> {
    let sane = CombineCase {
        position: sanitized(&c.position, c.rows.rows),
        ..c.clone()
    };
    let (res, _, cpu_after) = sane.run(&Device::Cpu(Context::cpu()));
    res.map_err(|e| format!("the CPU backend refused: {e}"))?;
    let (n, h, rows) = (c.n, c.rows.cols, c.rows.rows);
    let dt = c.rows.dtype;
    let b = c.bufs();
    let bufs = vec![
        mat_buf("rows", &b[0], dt, rows, h, c.rows.stride, false),
        vec_buf("position", &b[1], 4 * n * k, false),
        vec_buf(
            "weights",
            &b[2],
            if c.weights.is_some() { 4 * n * k } else { 0 },
            false,
        ),
        mat_buf("y", &b[3], dt, n, h, c.y_stride, true),
    ];
    let args = RowsArgs {
        ptrs: [1, 0, 2, 0, if c.weights.is_some() { 3 } else { 0 }, 4, 0],
        items: n as i64,
        h: h as i64,
        src_stride: c.rows.stride as i64,
        src2_stride: 0,
        dst_stride: c.y_stride as i64,
        k: k as i32,
        limit: rows.min(i32::MAX as usize) as i32,
    };
    // `combine`: one warp per (token, segment) item; for k = 1 one per pair of items.
    let items = n * segments(h);
    let warp_items = if k == 1 { items.div_ceil(2) } else { items };
    let launches = if n > 0 && h > 0 {
        vec![SimLaunch {
            kernel: format!("dk_moe_combine_{}", dt.name()),
            grid: rows_grid(warp_items),
            block: ROWS_THREADS,
            args: args.bytes(),
        }]
    } else {
        vec![]
    };
    let (after, log) = run_all_orders(exe, &bufs, &launches)?;
    for i in 0..3 {
        if after[i] != bufs[i].bytes {
            return Err(format!("input {} modified", bufs[i].name));
        }
    }
    // The kernel's order: fmaf over the slots in order in f32, one rounding to the dtype.
    let v = mat_vals(&c.rows);
    let mut model = Vec::with_capacity(n * h);
    let mut tol = Vec::with_capacity(n * h);
    for t in 0..n {
        for col in 0..h {
            let (mut acc, mut mag) = (0f32, 0f64);
            for j in 0..k {
                let p = c.position[t * k + j];
                if p < 0 || p as usize >= rows {
                    continue;
                }
                let w = c.weights.as_ref().map_or(1.0, |w| w[t * k + j]);
                let x = v[p as usize * h + col];
                acc = w.mul_add(x, acc);
                mag += (w as f64 * x as f64).abs();
            }
            model.push(to_bits16(dt, acc));
            tol.push(ulp(dt, acc as f64) + k as f64 * 2f64.powi(-23) * mag);
        }
    }
    let e = Expect {
        dtype: dt,
        rows: n,
        cols: h,
        stride: c.y_stride,
        model,
        cpu_bitwise: dt == DType::F32 && k == 1,
        tol,
    };
    compare_rows("combine y", &e, &after[3], &cpu_after[act_buf::OUT])?;
    Ok(log)
}

/// The kernels' order for one dot product of two rows (cuda/moe.cu, "Dot products"): per
/// 1024-element segment, each lane's chunks into 8 partial sums (element i of each chunk, chunks
/// in order), the 8 added in order, the xor butterfly; the segments' sums added in order from 0.
/// Also Σ|t·r| for the tolerance against the CPU.
fn model_dot(t: &[f32], r: &[f32]) -> (f32, f64) {
    let h = t.len();
    let hv = h / 8;
    let (mut total, mut mag) = (0f32, 0f64);
    for g in 0..hv.div_ceil(SEG_CHUNKS) {
        let mut lanes = [0f32; 32];
        for (lane, out) in lanes.iter_mut().enumerate() {
            let mut acc = [0f32; 8];
            for u in 0..4 {
                let ch = g * SEG_CHUNKS + lane + 32 * u;
                if ch < hv {
                    for (i, a) in acc.iter_mut().enumerate() {
                        let (x, y) = (t[ch * 8 + i], r[ch * 8 + i]);
                        *a = x.mul_add(y, *a);
                        mag += (x as f64 * y as f64).abs();
                    }
                }
            }
            *out = acc.iter().skip(1).fold(acc[0], |t, &a| t + a);
        }
        let mut o = 16;
        while o > 0 {
            let prev = lanes;
            for (l, x) in lanes.iter_mut().enumerate() {
                *x = prev[l] + prev[l ^ o];
            }
            o >>= 1;
        }
        total += lanes[0];
    }
    (total, mag)
}

/// Slot dot: `SlotDotCase` through `dk_moe_slot_dot_*` (src/moe/cuda.rs `slot_dot`).
fn check_slot_dot(exe: &Path, c: &SlotDotCase, k: usize) -> Result<String, String> {
    let sane = SlotDotCase {
        position: sanitized(&c.position, c.rows.rows),
        ..c.clone()
    };
    let (res, _, cpu_after) = sane.run(&Device::Cpu(Context::cpu()));
    res.map_err(|e| format!("the CPU backend refused: {e}"))?;
    let (n, h, rows) = (c.tokens.rows, c.tokens.cols, c.rows.rows);
    let dt = c.tokens.dtype;
    let slots = n * k;
    let b = c.bufs();
    let bufs = vec![
        mat_buf("tokens", &b[0], dt, n, h, c.tokens.stride, false),
        mat_buf("rows", &b[1], dt, rows, h, c.rows.stride, false),
        vec_buf("position", &b[2], 4 * slots, false),
        vec_buf("out", &b[3], 4 * slots, true),
    ];
    let args = RowsArgs {
        ptrs: [1, 2, 3, 0, 0, 4, 0],
        items: slots as i64,
        h: h as i64,
        src_stride: c.tokens.stride as i64,
        src2_stride: c.rows.stride as i64,
        dst_stride: 0,
        k: k as i32,
        limit: rows.min(i32::MAX as usize) as i32,
    };
    let launches = if slots > 0 {
        vec![SimLaunch {
            kernel: format!("dk_moe_slot_dot_{}", dt.name()),
            grid: rows_grid(slots),
            block: ROWS_THREADS,
            args: args.bytes(),
        }]
    } else {
        vec![]
    };
    let (after, log) = run_all_orders(exe, &bufs, &launches)?;
    for i in 0..3 {
        if after[i] != bufs[i].bytes {
            return Err(format!("input {} modified", bufs[i].name));
        }
    }
    let (tk, rw) = (mat_vals(&c.tokens), mat_vals(&c.rows));
    let got = to_f32s(&after[3]);
    let cpu_out = to_f32s(&cpu_after[act_buf::OUT]);
    if got[slots..].iter().any(|x| x.to_bits() != POISON_F32) {
        return Err("slot dot: written past N·k".into());
    }
    for s in 0..slots {
        let p = c.position[s];
        let (model, mag) = if p < 0 || p as usize >= rows {
            (0f32, 0f64)
        } else {
            let (t0, r0) = ((s / k) * h, p as usize * h);
            model_dot(&tk[t0..t0 + h], &rw[r0..r0 + h])
        };
        if got[s].to_bits() != model.to_bits() {
            return Err(format!(
                "slot dot [{s}] = {:e} where the kernel's order gives {model:e}",
                got[s]
            ));
        }
        let tol = h as f64 * 2f64.powi(-23) * mag;
        if (got[s] as f64 - cpu_out[s] as f64).abs() > tol {
            return Err(format!(
                "slot dot [{s}] = {:e} where the CPU has {:e} (tolerance {tol:.2e})",
                got[s], cpu_out[s]
            ));
        }
    }
    Ok(log)
}

/// Launches of `dk_moe_combine_*` over buffers (rows, position, weights, y) = (1, 2, 3, 4), as
/// `check_combine` (src/moe/cuda.rs `combine`) builds them.
fn combine_launch(c: &CombineCase, k: usize) -> SimLaunch {
    let (n, h) = (c.n, c.rows.cols);
    let args = RowsArgs {
        ptrs: [1, 0, 2, 0, if c.weights.is_some() { 3 } else { 0 }, 4, 0],
        items: n as i64,
        h: h as i64,
        src_stride: c.rows.stride as i64,
        src2_stride: 0,
        dst_stride: c.y_stride as i64,
        k: k as i32,
        limit: c.rows.rows.min(i32::MAX as usize) as i32,
    };
    let items = n * segments(h);
    SimLaunch {
        kernel: format!("dk_moe_combine_{}", c.rows.dtype.name()),
        grid: rows_grid(if k == 1 { items.div_ceil(2) } else { items }),
        block: ROWS_THREADS,
        args: args.bytes(),
    }
}

/// A slot-dot launch (src/moe/cuda.rs `slot_dot`) with the given buffer numbers for (tokens,
/// rows, position, out).
fn slot_dot_launch(c: &SlotDotCase, k: usize, ptrs: [u64; 4]) -> SimLaunch {
    let slots = c.tokens.rows * k;
    let args = RowsArgs {
        ptrs: [ptrs[0], ptrs[1], ptrs[2], 0, 0, ptrs[3], 0],
        items: slots as i64,
        h: c.tokens.cols as i64,
        src_stride: c.tokens.stride as i64,
        src2_stride: c.rows.stride as i64,
        dst_stride: 0,
        k: k as i32,
        limit: c.rows.rows.min(i32::MAX as usize) as i32,
    };
    SimLaunch {
        kernel: format!("dk_moe_slot_dot_{}", c.tokens.dtype.name()),
        grid: rows_grid(slots),
        block: ROWS_THREADS,
        args: args.bytes(),
    }
}

/// A fused backward kernel's outputs against the two primitives' launches on the same buffers:
/// inputs unchanged, every output bitwise the primitives' (matrices through `compare_rows`, so
/// also every element written, padding columns and rows past the output untouched; dot vectors
/// written in [0, slots) and not past).
fn same_as_primitives(
    what: &str,
    bufs: &[SimBuf],
    fused: &[Bytes],
    unfused: &[Bytes],
    mats: &[(usize, DType, usize, usize, usize)],
    dots: Option<(usize, usize)>,
) -> Result<(), String> {
    for (i, b) in bufs.iter().enumerate() {
        if !b.writable && fused[i] != b.bytes {
            return Err(format!("{what}: input {} modified", b.name));
        }
    }
    for &(i, dtype, rows, cols, stride) in mats {
        let u = unfused[i].as_ref();
        let model = (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .map(|(r, c)| elem_bits(dtype, u, r * stride.max(cols) + c))
            .collect();
        let e = Expect {
            dtype,
            rows,
            cols,
            stride,
            model,
            cpu_bitwise: true,
            tol: vec![],
        };
        compare_rows(
            &format!("{what}: {}", bufs[i].name),
            &e,
            &fused[i],
            &unfused[i],
        )?;
    }
    if let Some((i, slots)) = dots {
        let (got, want) = (to_f32s(&fused[i]), to_f32s(&unfused[i]));
        if let Some(s) = (0..slots).find(|&s| got[s].to_bits() == POISON_F32) {
            return Err(format!("{what}: grad_weights[{s}] not written"));
        }
        if got[slots..].iter().any(|x| x.to_bits() != POISON_F32) {
            return Err(format!("{what}: grad_weights written past N·k"));
        }
        if let Some(s) = (0..slots).find(|&s| got[s].to_bits() != want[s].to_bits()) {
            return Err(format!(
                "{what}: grad_weights[{s}] = {:e} where combine + slot dot give {:e}",
                got[s], want[s]
            ));
        }
    }
    Ok(())
}

/// Permute backward, fused (`dk_moe_combine_dot_*`, src/moe/cuda.rs `permute_backward`): the
/// combine of grad_xp and the slot dot of x with grad_xp in one pass, bitwise those two kernels'
/// results on the same inputs (which `check_combine` and `check_slot_dot` hold to the CPU).
fn check_permute_backward(
    exe: &Path,
    comb: &CombineCase,
    dot: &SlotDotCase,
    k: usize,
) -> Result<String, String> {
    let (n, h, rows, dt) = (comb.n, comb.rows.cols, comb.rows.rows, comb.rows.dtype);
    let slots = n * k;
    let (cb, db) = (comb.bufs(), dot.bufs());
    let weighted = comb.weights.is_some();
    let bufs = vec![
        mat_buf("grad_xp", &cb[0], dt, rows, h, comb.rows.stride, false),
        vec_buf("position", &cb[1], 4 * slots, false),
        vec_buf(
            "weights",
            &cb[2],
            if weighted { 4 * slots } else { 0 },
            false,
        ),
        mat_buf("grad_x", &cb[3], dt, n, h, comb.y_stride, true),
        mat_buf("x", &db[0], dt, n, h, dot.tokens.stride, false),
        vec_buf("grad_weights", &db[3], 4 * slots, true),
    ];
    let args = RowsArgs {
        ptrs: [1, 5, 2, 0, if weighted { 3 } else { 0 }, 4, 6],
        items: n as i64,
        h: h as i64,
        src_stride: comb.rows.stride as i64,
        src2_stride: dot.tokens.stride as i64,
        dst_stride: comb.y_stride as i64,
        k: k as i32,
        limit: rows.min(i32::MAX as usize) as i32,
    };
    // `permute_backward`: a warp per token.
    let fused = [SimLaunch {
        kernel: format!("dk_moe_combine_dot_{}", dt.name()),
        grid: rows_grid(n),
        block: ROWS_THREADS,
        args: args.bytes(),
    }];
    let (after, log) = run_all_orders(exe, &bufs, &fused)?;
    let primitives = [
        combine_launch(comb, k),
        slot_dot_launch(dot, k, [5, 1, 2, 6]),
    ];
    let (want, _) = run_sim(exe, &bufs, &primitives, 0)?;
    same_as_primitives(
        "permute backward",
        &bufs,
        &after,
        &want,
        &[(3, dt, n, h, comb.y_stride)],
        Some((5, slots)),
    )?;
    Ok(log)
}

/// Combine backward, fused (`dk_moe_permute_dot_*`, src/moe/cuda.rs `combine_backward`): the
/// permute of grad_y (here against the row gather, whose contract holds for any perm) and, when
/// weighted, the slot dot of grad_y with expert_out, bitwise; `position` may disagree with
/// `perm` (rows then come from the kernel's row items).
fn check_combine_backward(
    exe: &Path,
    perm: &PermuteCase,
    position: &[i32],
    dot: Option<&SlotDotCase>,
) -> Result<String, String> {
    let (n, h, k, rows, dt) = (perm.x.rows, perm.x.cols, perm.k, perm.rows(), perm.x.dtype);
    let slots = n * k;
    let pb = perm.bufs();
    let weighted = perm.weights.is_some();
    let mut bufs = vec![
        mat_buf("grad_y", &pb[0], dt, n, h, perm.x.stride, false),
        vec_buf("perm", &pb[1], 4 * rows, false),
        vec_buf(
            "weights",
            &pb[2],
            if weighted { 4 * slots } else { 0 },
            false,
        ),
        mat_buf(
            "grad_expert_out",
            &pb[3],
            dt,
            rows,
            h,
            perm.out_stride,
            true,
        ),
        vec_buf("position", &bytes_i32(position), 4 * slots, false),
    ];
    if let Some(d) = dot {
        let db = d.bufs();
        bufs.push(mat_buf(
            "expert_out",
            &db[1],
            dt,
            d.rows.rows,
            h,
            d.rows.stride,
            false,
        ));
        bufs.push(vec_buf("grad_weights", &db[3], 4 * slots, true));
    }
    let has = |i: u64| if dot.is_some() { i } else { 0 };
    let args = RowsArgs {
        ptrs: [1, has(6), 5, 2, if weighted { 3 } else { 0 }, 4, has(7)],
        items: n as i64,
        h: h as i64,
        src_stride: perm.x.stride as i64,
        src2_stride: dot.map_or(0, |d| d.rows.stride) as i64,
        dst_stride: perm.out_stride as i64,
        k: k as i32,
        limit: rows as i32,
    };
    // `combine_backward`: a warp per token, then one per 32 rows.
    let fused = [SimLaunch {
        kernel: format!("dk_moe_permute_dot_{}", dt.name()),
        grid: rows_grid(n + rows.div_ceil(32)),
        block: ROWS_THREADS,
        args: args.bytes(),
    }];
    let (after, log) = run_all_orders(exe, &bufs, &fused)?;
    let gather = RowsArgs {
        ptrs: [1, 0, 2, 0, if weighted { 3 } else { 0 }, 4, 0],
        items: rows as i64,
        h: h as i64,
        src_stride: perm.x.stride as i64,
        src2_stride: 0,
        dst_stride: perm.out_stride as i64,
        k: k as i32,
        limit: slots as i32,
    };
    let mut primitives = vec![SimLaunch {
        kernel: format!("dk_moe_permute_{}", dt.name()),
        grid: rows_grid(rows * segments(h)),
        block: ROWS_THREADS,
        args: gather.bytes(),
    }];
    if let Some(d) = dot {
        primitives.push(slot_dot_launch(d, k, [1, 6, 5, 7]));
    }
    let (want, _) = run_sim(exe, &bufs, &primitives, 0)?;
    same_as_primitives(
        "combine backward",
        &bufs,
        &after,
        &want,
        &[(3, dt, rows, h, perm.out_stride)],
        dot.map(|_| (6, slots)),
    )?;
    Ok(log)
}

/// A copy of a route's position whose slots disagree with perm: two kept slots swap rows, a
/// third points at a fourth's row, and a dropped slot (if any) at a padding row (if any).
fn scrambled(position: &[i32], perm: &[i32]) -> Vec<i32> {
    let mut v = position.to_vec();
    let kept: Vec<usize> = (0..v.len()).filter(|&s| v[s] >= 0).collect();
    if kept.len() >= 4 {
        v.swap(kept[0], kept[1]);
        v[kept[2]] = v[kept[3]];
    }
    let dropped = (0..v.len()).find(|&s| v[s] < 0);
    let pad = perm.iter().position(|&p| p < 0);
    if let (Some(s), Some(r)) = (dropped, pad) {
        v[s] = r as i32;
    }
    v
}

/// A mover scenario: a route (on the CPU), activations of dtype and H, and the forward and
/// backward kernel calls built on it.
struct MoverCase {
    what: String,
    route: RouteCase,
    dtype: DType,
    h: usize,
    /// Forward permute scaled by the weights (Llama 4).
    scaled: bool,
    /// Combine weighted.
    weighted: bool,
    /// Also the row gather for k > 1 (DK_MOE_PERMUTE=gather).
    gather_too: bool,
}

enum MoverCall {
    Permute(PermuteCase, bool),
    Combine(CombineCase, usize),
    SlotDot(SlotDotCase, usize),
    /// The fused permute backward: its combine and slot-dot cases, k.
    PermuteBackward(CombineCase, SlotDotCase, usize),
    /// The fused combine backward: its permute case, the position, the slot-dot case if weighted.
    CombineBackward(PermuteCase, Vec<i32>, Option<SlotDotCase>),
}

impl MoverCall {
    fn what(&self) -> String {
        match self {
            MoverCall::Permute(c, g) => {
                format!("permute{} {}", if *g { " (gather)" } else { "" }, c.what)
            }
            MoverCall::Combine(c, _) => format!("combine {}", c.what),
            MoverCall::SlotDot(c, _) => format!("slot dot {}", c.what),
            MoverCall::PermuteBackward(c, ..) => format!("fused {}", c.what),
            MoverCall::CombineBackward(c, ..) => format!("fused {}", c.what),
        }
    }
    fn check(&self, exe: &Path) -> Result<String, String> {
        match self {
            MoverCall::Permute(c, g) => check_permute(exe, c, *g),
            MoverCall::Combine(c, k) => check_combine(exe, c, *k),
            MoverCall::SlotDot(c, k) => check_slot_dot(exe, c, *k),
            MoverCall::PermuteBackward(c, d, k) => check_permute_backward(exe, c, d, *k),
            MoverCall::CombineBackward(p, pos, d) => {
                check_combine_backward(exe, p, pos, d.as_ref())
            }
        }
    }
}

/// Padded row strides: a multiple of 16 bytes for every dtype (8 elements of f16 / bf16, 4 of
/// f32), `extra` × 8 elements more.
fn padded(h: usize, extra: usize) -> usize {
    h + 8 * extra
}

fn mover_calls(rng: &mut Rng, m: &MoverCase) -> Vec<MoverCall> {
    let r = routed(&m.route);
    let (n, k, h, dt) = (r.n, r.k, m.h, m.dtype);
    let tag = format!("[{}] {} H={h} k={k}", m.what, dt.name());
    let w = |on: bool| on.then(|| r.weights.clone());
    let mut out = Vec::new();
    // Forward: permute x -> xp (token-major for k > 1; the gather too when asked).
    let x = random_matrix(rng, dt, n, h, padded(h, 1));
    let permute = |x: &Logits, weights: Option<Vec<f32>>, what: &str| PermuteCase {
        x: x.clone(),
        k,
        perm: r.perm.clone(),
        weights,
        out_stride: padded(h, 2),
        what: format!("{tag} {what}"),
    };
    out.push(MoverCall::Permute(
        permute(&x, w(m.scaled), "forward"),
        false,
    ));
    if m.gather_too && k > 1 {
        out.push(MoverCall::Permute(
            permute(&x, w(m.scaled), "forward"),
            true,
        ));
    }
    // Forward: combine expert_out -> y.
    let expert_out = random_matrix(rng, dt, r.rows, h, padded(h, 1));
    let combine = |rows: &Logits, weights: Option<Vec<f32>>, what: &str| CombineCase {
        rows: rows.clone(),
        n,
        position: r.position.clone(),
        weights,
        y_stride: padded(h, 3),
        what: format!("{tag} {what}"),
    };
    out.push(MoverCall::Combine(
        combine(&expert_out, w(m.weighted), "forward"),
        k,
    ));
    // Backward of permute: grad_x = combine(grad_xp, weights if scaled); grad_w = slot_dot(x, grad_xp).
    let grad_xp = random_matrix(rng, dt, r.rows, h, padded(h, 0));
    out.push(MoverCall::Combine(
        combine(&grad_xp, w(m.scaled), "permute backward"),
        k,
    ));
    if m.scaled {
        let dot = SlotDotCase {
            tokens: x.clone(),
            rows: grad_xp.clone(),
            position: r.position.clone(),
            what: format!("{tag} permute backward (weights)"),
        };
        out.push(MoverCall::SlotDot(dot.clone(), k));
        out.push(MoverCall::PermuteBackward(
            combine(&grad_xp, w(true), "permute backward"),
            dot,
            k,
        ));
    }
    // Backward of combine: grad_expert_out = permute(grad_y, weights if weighted);
    // grad_w = slot_dot(grad_y, expert_out).
    let grad_y = random_matrix(rng, dt, n, h, padded(h, 2));
    out.push(MoverCall::Permute(
        permute(&grad_y, w(m.weighted), "combine backward"),
        false,
    ));
    let dot = m.weighted.then(|| SlotDotCase {
        tokens: grad_y.clone(),
        rows: expert_out,
        position: r.position.clone(),
        what: format!("{tag} combine backward (weights)"),
    });
    if let Some(d) = &dot {
        out.push(MoverCall::SlotDot(d.clone(), k));
    }
    out.push(MoverCall::CombineBackward(
        permute(&grad_y, w(m.weighted), "combine backward"),
        r.position.clone(),
        dot,
    ));
    out
}

fn mover_cases(rng: &mut Rng) -> Vec<MoverCall> {
    use DType::{BF16, F16, F32};
    use Score::{Sigmoid, Softmax};
    let none = Special::default();
    let mut scenarios = Vec::new();
    // Qwen3-like: k = 8 of 128, renormalised, capacity drops and block padding; H = 1032 (two
    // segments, the second one chunk wide).
    let qwen = RouteParams {
        renormalize: true,
        capacity: Some(3),
        block: 4,
        ..params(8, Softmax)
    };
    scenarios.push(MoverCase {
        what: "Qwen3".into(),
        route: route_case(rng, "Qwen3", F32, (37, 128), 0, 1.0, qwen, false, &none),
        dtype: BF16,
        h: 1032,
        scaled: false,
        weighted: true,
        gather_too: true,
    });
    // Llama-4-like: sigmoid top-1, expert input scaled (permute weighted), combine unweighted.
    scenarios.push(MoverCase {
        what: "Llama4".into(),
        route: route_case(
            rng,
            "Llama4",
            BF16,
            (35, 16),
            0,
            2.0,
            RouteParams {
                capacity: Some(3),
                ..params(1, Sigmoid)
            },
            false,
            &none,
        ),
        dtype: F32,
        h: 1040,
        scaled: true,
        weighted: false,
        gather_too: false,
    });
    scenarios.push(MoverCase {
        what: "Llama4 f16".into(),
        route: route_case(
            rng,
            "Llama4",
            BF16,
            (20, 16),
            0,
            2.0,
            params(1, Sigmoid),
            false,
            &none,
        ),
        dtype: F16,
        h: 264,
        scaled: true,
        weighted: true,
        gather_too: false,
    });
    // DeepSeek-V3-like: k = 8 of 256 in groups, x 2.5; f32 and f16 activations.
    let ds = RouteParams {
        renormalize: true,
        n_groups: 8,
        topk_groups: 4,
        scale: 2.5,
        block: 2,
        ..params(8, Sigmoid)
    };
    scenarios.push(MoverCase {
        what: "DeepSeek-V3".into(),
        route: route_case(rng, "DeepSeek-V3", F32, (21, 256), 0, 1.5, ds, true, &none),
        dtype: F32,
        h: 136,
        scaled: false,
        weighted: true,
        gather_too: true,
    });
    scenarios.push(MoverCase {
        what: "DeepSeek-V3 f16".into(),
        route: route_case(rng, "DeepSeek-V3", BF16, (9, 256), 0, 1.5, ds, true, &none),
        dtype: F16,
        h: 2056,
        scaled: true,
        weighted: true,
        gather_too: false,
    });
    // k = 2 (the combine's slot pair), k = 3 (a pair and a single), H = 8 (one chunk).
    scenarios.push(MoverCase {
        what: "k=2".into(),
        route: route_case(
            rng,
            "k=2",
            F32,
            (33, 8),
            0,
            1.0,
            params(2, Softmax),
            false,
            &none,
        ),
        dtype: BF16,
        h: 8,
        scaled: true,
        weighted: true,
        gather_too: true,
    });
    scenarios.push(MoverCase {
        what: "k=3".into(),
        route: route_case(
            rng,
            "k=3",
            F32,
            (17, 40),
            0,
            1.0,
            RouteParams {
                capacity: Some(1),
                ..params(3, Sigmoid)
            },
            false,
            &none,
        ),
        dtype: F32,
        h: 1024,
        scaled: false,
        weighted: true,
        gather_too: false,
    });
    // k = 32 (every lane a slot; the combine pairs' (j + 1) & 31), with drops; H = 16.
    scenarios.push(MoverCase {
        what: "k=32".into(),
        route: route_case(
            rng,
            "k=32",
            F32,
            (9, 64),
            0,
            1.0,
            RouteParams {
                capacity: Some(4),
                block: 2,
                ..params(32, Softmax)
            },
            false,
            &none,
        ),
        dtype: F32,
        h: 16,
        scaled: true,
        weighted: true,
        gather_too: false,
    });
    let mut out: Vec<MoverCall> = scenarios.iter().flat_map(|m| mover_calls(rng, m)).collect();
    // Indices outside [0, limit) (the kernels' contract: treated as −1) in each mover's index.
    let bad: Vec<MoverCall> = out
        .iter()
        .filter(|m| match m {
            MoverCall::Permute(c, _) => {
                c.what.starts_with("[Qwen3]") || c.what.starts_with("[Llama4]")
            }
            MoverCall::Combine(c, _) => {
                c.what.starts_with("[Qwen3]") || c.what.starts_with("[Llama4]")
            }
            MoverCall::SlotDot(c, _) => c.what.starts_with("[Qwen3]"),
            MoverCall::PermuteBackward(c, ..) => c.what.starts_with("[Llama4]"),
            MoverCall::CombineBackward(c, ..) => {
                c.what.starts_with("[Qwen3]") || c.what.starts_with("[Llama4]")
            }
        })
        .map(|m| match m {
            MoverCall::Permute(c, g) => MoverCall::Permute(
                PermuteCase {
                    perm: corrupted(&c.perm, c.x.rows * c.k),
                    what: format!("{} (indices out of range)", c.what),
                    ..c.clone()
                },
                *g,
            ),
            MoverCall::Combine(c, k) => MoverCall::Combine(
                CombineCase {
                    position: corrupted(&c.position, c.rows.rows),
                    what: format!("{} (indices out of range)", c.what),
                    ..c.clone()
                },
                *k,
            ),
            MoverCall::SlotDot(c, k) => MoverCall::SlotDot(
                SlotDotCase {
                    position: corrupted(&c.position, c.rows.rows),
                    what: format!("{} (indices out of range)", c.what),
                    ..c.clone()
                },
                *k,
            ),
            MoverCall::PermuteBackward(c, d, k) => MoverCall::PermuteBackward(
                CombineCase {
                    position: corrupted(&c.position, c.rows.rows),
                    what: format!("{} (indices out of range)", c.what),
                    ..c.clone()
                },
                SlotDotCase {
                    position: corrupted(&d.position, d.rows.rows),
                    ..d.clone()
                },
                *k,
            ),
            MoverCall::CombineBackward(c, pos, d) => MoverCall::CombineBackward(
                PermuteCase {
                    perm: corrupted(&c.perm, c.x.rows * c.k),
                    what: format!("{} (indices out of range)", c.what),
                    ..c.clone()
                },
                corrupted(pos, c.rows()),
                d.as_ref().map(|d| SlotDotCase {
                    position: corrupted(pos, c.rows()),
                    ..d.clone()
                }),
            ),
        })
        .collect();
    out.extend(bad);
    // Position disagreeing with perm (in range): the fused combine backward's row items gather
    // the rows no slot owns, non-owning slots still get their dots.
    let scramble: Vec<MoverCall> = out
        .iter()
        .filter_map(|m| match m {
            MoverCall::CombineBackward(c, pos, d) if !c.what.contains("out of range") => {
                let pos = scrambled(pos, &c.perm);
                Some(MoverCall::CombineBackward(
                    PermuteCase {
                        what: format!("{} (position disagrees with perm)", c.what),
                        ..c.clone()
                    },
                    pos.clone(),
                    d.as_ref().map(|d| SlotDotCase {
                        position: pos,
                        ..d.clone()
                    }),
                ))
            }
            _ => None,
        })
        .collect();
    out.extend(scramble);
    // k = 1 combine (two items per warp): an odd number of items (H = 5120: 5 segments, 7
    // tokens), a dropped slot, zero and negative weights and ±0 rows, where fmaf(w, v, +0) and
    // w · v differ in the sign of zero.
    for (dt, weighted) in [(F32, true), (BF16, true), (F32, false)] {
        let (n, h) = (7, 5120);
        let mut rows = random_matrix(rng, dt, 9, h, h);
        for (i, x) in rows.vals.iter_mut().enumerate() {
            match i % 11 {
                0 => *x = 0.0,
                1 => *x = -0.0,
                _ => {}
            }
        }
        let mut w = random_weights(rng, n);
        w[1] = -w[1];
        w[2] = 0.0;
        w[4] = -0.0;
        out.push(MoverCall::Combine(
            CombineCase {
                rows,
                n,
                position: vec![3, 0, 8, -1, 5, 2, 3],
                weights: weighted.then_some(w),
                y_stride: h + 8,
                what: format!(
                    "k=1 {} H={h} weighted={weighted} (signed zeros, a dropped slot)",
                    dt.name()
                ),
            },
            1,
        ));
    }
    // A perm that is not a permutation (slot 5 twice): the token-major path must fall back to
    // the gather (perm_invert's flag).
    let mut perm: Vec<i32> = (0..24).collect();
    perm[9] = 5;
    perm[17] = -1;
    out.push(MoverCall::Permute(
        PermuteCase {
            x: random_matrix(rng, BF16, 6, 1032, 1040),
            k: 4,
            perm,
            weights: Some(random_weights(rng, 24)),
            out_stride: 1032,
            what: "perm with a slot twice (fallback to the gather)".into(),
        },
        false,
    ));
    out
}

// ------------------------------------------------------------------------------------------
// The test
// ------------------------------------------------------------------------------------------

enum Job {
    Route(RouteCase),
    Mover(MoverCall),
}

#[test]
fn moe_kernels_match_the_cpu_backend() {
    let Some(exe) = simulator() else {
        return;
    };
    let mut rng = Rng::fresh(TEST);
    let mut jobs: Vec<Job> = route_cases(&mut rng).into_iter().map(Job::Route).collect();
    jobs.extend(mover_cases(&mut rng).into_iter().map(Job::Mover));
    run_cases_parallel(TEST, jobs.len(), |i| match &jobs[i] {
        Job::Route(c) => (c.what.clone(), check_route(&exe, c)),
        Job::Mover(m) => (m.what(), m.check(&exe)),
    });
}
