//! `dk bench --ops moe`: MoE dispatch (route, permute, combine, forward and backward) for the
//! model shapes of `ANCHORS.md`, on the runner's backend, every result checked against the CPU
//! backend, timed, and reported as a fraction of the floor `cuda/MOE.md` defines over the copy
//! bandwidth measured in the same run.
//!
//! Per shape: one route (router logits f32 `[N, E]` → ids, weights, counts, offsets, perm,
//! position), then, on that route's outputs, four results with activations of the chosen dtype:
//! - permute fwd: `xp = permute(x)` (scaled by the weights where the model scales the expert
//!   input, as Llama 4 does);
//! - permute bwd: `grad_x = combine(grad_xp)` (weighted, plus `grad_w = slot_dot(x, grad_xp)`,
//!   when the forward scaled);
//! - combine fwd: `y = combine(expert_out)` (weighted unless the weights already scaled the input);
//! - combine bwd: `grad_eo = permute(grad_y)` (scaled by the weights, plus
//!   `grad_w = slot_dot(grad_y, expert_out)`, when the forward was weighted).
//!
//! The backward passes are one call each (`moe_permute_backward`, `moe_combine_backward`): with
//! the weights' gradient on CUDA one fused kernel, whose floor is the strict one (each operand
//! read or written once); on the CPU, and on CUDA under `DK_MOE_BACKWARD=primitives`, the two
//! primitives, and the row is labelled and floored as those two.
//!
//! Checks: the route against the CPU backend on every token (on CUDA, whose scores are f32, a
//! token whose selection differs must be a valid top-k within 1e-5 of the f64 scores: a near-tie,
//! counted), its weights within 1e-5 and the permutation exactly; permute / combine / slot-dot
//! against the CPU backend run on sampled rows of the same inputs; every output poisoned (0xFF)
//! before the checked run and scanned for unwritten (non-finite) elements; and every output of a
//! second poisoned run compared bitwise with the first.

use distill_kernels::moe::{
    max_rows, Combine, CombineBackward, Permute, PermuteBackward, Route, RouteParams, Score,
    SlotDot,
};
use distill_kernels::{Context, DType, Launch, Location, Matrix, MatrixMut, Vector, VectorMut};

use crate::backend::{measure, median, Buf, Measured, Part, Runner};
use crate::bench::{json_num, json_opt, json_str, json_strs, pct, sci, Progress};
use crate::data::{
    count_nonfinite, err_string, f32s, fill_normal, host_memory_available, mix, sample_rows, widen,
    HostBuf,
};

/// The MoE shapes of `ANCHORS.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Llama 4 Scout: H 5120, 16 experts, sigmoid top-1, the weight scales the expert input.
    Scout,
    /// Llama 4 Maverick's router (H 5120, 128 experts, sigmoid top-1), with the weight on the
    /// combine (the expert output) so that both placements of the weight are measured.
    Maverick,
    /// Qwen3-MoE: H 2048, 128 experts, softmax top-8 renormalised, the weight on the output.
    Qwen3,
}

pub const ALL_SHAPES: [Shape; 3] = [Shape::Scout, Shape::Maverick, Shape::Qwen3];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Scout => "scout",
            Shape::Maverick => "maverick",
            Shape::Qwen3 => "qwen3",
        }
    }

    pub fn from_name(s: &str) -> Option<Shape> {
        ALL_SHAPES.into_iter().find(|x| x.name() == s)
    }

    fn describe(self) -> &'static str {
        match self {
            Shape::Scout => {
                "Llama 4 Scout: H 5120, E 16, sigmoid top-1, weight scales the expert input"
            }
            Shape::Maverick => {
                "Llama 4 Maverick router: H 5120, E 128, sigmoid top-1, weight on the combine"
            }
            Shape::Qwen3 => {
                "Qwen3-MoE: H 2048, E 128, softmax top-8 renormalised, weight on the combine"
            }
        }
    }

    fn h(self) -> usize {
        match self {
            Shape::Scout | Shape::Maverick => 5120,
            Shape::Qwen3 => 2048,
        }
    }

    fn params(self) -> RouteParams {
        match self {
            Shape::Scout => RouteParams {
                score: Score::Sigmoid,
                ..RouteParams::new(1)
            },
            Shape::Maverick => RouteParams {
                score: Score::Sigmoid,
                ..RouteParams::new(1)
            },
            Shape::Qwen3 => RouteParams {
                renormalize: true,
                ..RouteParams::new(8)
            },
        }
    }

    fn e(self) -> usize {
        match self {
            Shape::Scout => 16,
            Shape::Maverick | Shape::Qwen3 => 128,
        }
    }

    /// The weight scales the expert input (permute) rather than the output (combine).
    fn scaled_input(self) -> bool {
        self == Shape::Scout
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Route,
    PermuteFwd,
    PermuteBwd,
    CombineFwd,
    CombineBwd,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Route => "route",
            Op::PermuteFwd => "permute fwd",
            Op::PermuteBwd => "permute bwd",
            Op::CombineFwd => "combine fwd",
            Op::CombineBwd => "combine bwd",
        }
    }
}

const OPS: [Op; 5] = [
    Op::Route,
    Op::PermuteFwd,
    Op::PermuteBwd,
    Op::CombineFwd,
    Op::CombineBwd,
];

/// Standard deviation of the router logits and of the activations.
const LOGIT_SIGMA: f64 = 1.0;
const ACT_SIGMA: f64 = 1.0;
/// Selection scores closer than this may be ordered either way by the f32 CUDA router.
const NEAR_TIE: f64 = 1e-5;
/// Relative tolerance of the route weights and of the slot-dot outputs (f32).
const F32_TOL: f64 = 1e-5;

/// Tolerance of an activation output of `dtype` (DESIGN.md: bf16/f16 1e-2, f32 1e-5).
fn act_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 | DType::F16 => 1e-2,
    }
}

/// What `dk bench` asks of this section.
pub struct MoeConfig<'a> {
    pub shapes: &'a [Shape],
    pub dtypes: &'a [DType],
    pub tokens: usize,
    pub iters: usize,
    pub check_rows: usize,
    pub seed: u64,
}

/// One named comparison of a result.
struct CheckVal {
    what: &'static str,
    err: f64,
    tol: f64,
    /// Bitwise equality was required (err is then 0 or the numeric difference).
    exact: bool,
}

impl CheckVal {
    fn passed(&self) -> bool {
        self.err <= self.tol // NaN fails
    }
}

/// One kernel of a result, timed on its own.
struct PartRow {
    name: String,
    median_s: f64,
    bytes: f64,
}

/// One result row.
pub struct MoeRow {
    shape: Shape,
    dtype: DType,
    n: usize,
    h: usize,
    e: usize,
    k: usize,
    rows: usize,
    op: Op,
    /// The kernels the result ran, in order (`combine(w)+slot-dot`).
    kernels: String,
    iters: usize,
    median_s: f64,
    min_s: f64,
    /// CUDA: host seconds to enqueue one run (library calls and launches).
    host_s: Option<f64>,
    /// Floor bytes as `cuda/MOE.md` defines them (summed over the kernels of a result).
    bytes: f64,
    /// Each operand read or written exactly once (the op as one fused kernel would move it).
    strict_bytes: f64,
    parts: Vec<PartRow>,
    checks: Vec<CheckVal>,
    near_ties: usize,
    same: Option<bool>,
    problems: Vec<String>,
    error: Option<String>,
    pub ok: bool,
}

impl MoeRow {
    fn gbps(&self) -> f64 {
        self.bytes / self.median_s / 1e9
    }

    fn finish(&mut self) {
        self.ok = self.error.is_none()
            && self.problems.is_empty()
            && self.checks.iter().all(CheckVal::passed)
            && self.same != Some(false);
    }
}

// ------------------------------------------------------------------------------------------
// Host data helpers

fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `||got - want|| / ||want||` (or the absolute norm where `want` is 0); NaN if any value is.
fn rel_norm(got: &[f64], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

fn max_nan(acc: f64, x: f64) -> f64 {
    if acc.is_nan() || x.is_nan() {
        f64::NAN
    } else {
        acc.max(x)
    }
}

// ------------------------------------------------------------------------------------------
// Route reference and checks

/// All outputs of a route call, on the host.
#[derive(Clone, PartialEq)]
struct RouteOut {
    ids: Vec<i32>,
    weights: Vec<f32>,
    counts: Vec<i32>,
    offsets: Vec<i32>,
    perm: Vec<i32>,
    position: Vec<i32>,
}

impl RouteOut {
    fn from_bytes(b: &[Vec<u8>]) -> RouteOut {
        RouteOut {
            ids: i32s(&b[0]),
            weights: f32s(&b[1]),
            counts: i32s(&b[2]),
            offsets: i32s(&b[3]),
            perm: i32s(&b[4]),
            position: i32s(&b[5]),
        }
    }
}

/// The CPU backend's route of `logits` (`[n, e]` f32 on the host).
fn cpu_route(
    cpu: &Context,
    logits: &HostBuf,
    n: usize,
    e: usize,
    params: &RouteParams,
) -> Result<RouteOut, String> {
    let k = params.k;
    let rows = max_rows(n, e, k, params.block, params.capacity);
    let mut o = RouteOut {
        ids: vec![0; n * k],
        weights: vec![0.0; n * k],
        counts: vec![0; e],
        offsets: vec![0; e + 1],
        perm: vec![0; rows],
        position: vec![0; n * k],
    };
    // SAFETY: the host buffer holds n × e f32 values, 16-byte aligned, alive across the call.
    let logits = unsafe { Matrix::from_raw(logits.ptr(), DType::F32, n, e, e, Location::Host) };
    cpu.moe_route(
        Route {
            logits,
            bias: None,
            expert_ids: VectorMut::host(&mut o.ids),
            weights: VectorMut::host(&mut o.weights),
            counts: VectorMut::host(&mut o.counts),
            offsets: VectorMut::host(&mut o.offsets),
            perm: VectorMut::host(&mut o.perm),
            position: VectorMut::host(&mut o.position),
        },
        params,
        &Launch::default(),
    )
    .map_err(|e| format!("CPU reference route: {e}"))?;
    Ok(o)
}

/// Scores of one token in f64 (no bias: the benchmarked routers have none).
fn scores_f64(score: Score, logits: &[f32]) -> Vec<f64> {
    match score {
        Score::Sigmoid => logits
            .iter()
            .map(|&x| 1.0 / (1.0 + (-(x as f64)).exp()))
            .collect(),
        Score::Softmax => {
            let m = logits
                .iter()
                .map(|&x| x as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = logits.iter().map(|&x| (x as f64 - m).exp()).collect();
            let z: f64 = ex.iter().sum();
            ex.into_iter().map(|x| x / z).collect()
        }
    }
}

/// Whether `chosen` is a top-k of `scores` when scores within `eps` may be ordered either way.
fn choice_valid(scores: &[f64], chosen: &[i32], eps: f64) -> Result<(), String> {
    let e = scores.len();
    let mut seen = vec![false; e];
    for &c in chosen {
        if c < 0 || c as usize >= e || seen[c as usize] {
            return Err(format!("ids {chosen:?} out of range or repeated"));
        }
        seen[c as usize] = true;
    }
    for w in chosen.windows(2) {
        if scores[w[0] as usize] < scores[w[1] as usize] - eps {
            return Err(format!("ids {chosen:?} not by descending score"));
        }
    }
    let worst = chosen
        .iter()
        .map(|&c| scores[c as usize])
        .fold(f64::INFINITY, f64::min);
    if let Some(x) = (0..e).find(|&x| !seen[x] && scores[x] > worst + eps) {
        return Err(format!(
            "expert {x} (score {:.9}) beats the chosen {chosen:?}",
            scores[x]
        ));
    }
    Ok(())
}

/// Weights of a choice: the chosen scores, renormalised when asked, times the scale.
fn weights_of(params: &RouteParams, scores: &[f64], chosen: &[i32]) -> Vec<f64> {
    let picked: Vec<f64> = chosen.iter().map(|&c| scores[c as usize]).collect();
    let total: f64 = picked.iter().sum();
    picked
        .iter()
        .map(|&s| (if params.renormalize { s / total } else { s }) * params.scale as f64)
        .collect()
}

/// Counts, offsets, perm and position of a choice (no capacity, block 1: the benchmarked
/// routers), expert-major, then token, then slot. None when an id is out of range.
#[allow(clippy::type_complexity)]
fn permutation_of(
    ids: &[i32],
    e: usize,
    perm_rows: usize,
) -> Option<(Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>)> {
    let mut counts = vec![0i32; e];
    for &id in ids {
        *counts.get_mut(usize::try_from(id).ok()?)? += 1;
    }
    let mut offsets = vec![0i32; e + 1];
    for x in 0..e {
        offsets[x + 1] = offsets[x] + counts[x];
    }
    let mut cursor: Vec<i32> = offsets[..e].to_vec();
    let mut perm = vec![-1i32; perm_rows];
    let mut position = vec![-1i32; ids.len()];
    for (slot, &id) in ids.iter().enumerate() {
        let row = cursor[id as usize];
        cursor[id as usize] += 1;
        *perm.get_mut(row as usize)? = slot as i32;
        position[slot] = row;
    }
    Some((counts, offsets, perm, position))
}

/// Checks a route result against the CPU backend's on every token. Returns the checks, the
/// number of near-tie tokens, and problems.
fn check_route(
    cuda: bool,
    params: &RouteParams,
    e: usize,
    logits: &[f32],
    got: &RouteOut,
    cpu: &RouteOut,
) -> (Vec<CheckVal>, usize, Vec<String>) {
    let k = params.k;
    let n = got.ids.len() / k;
    let mut problems = Vec::new();
    let mut near_ties = 0usize;
    let mut bad_tokens = 0usize;
    // The expected weights of the device's own choice, in f64.
    let mut want_w: Vec<f64> = cpu.weights.iter().map(|&w| w as f64).collect();
    for t in 0..n {
        let (g, c) = (&got.ids[t * k..(t + 1) * k], &cpu.ids[t * k..(t + 1) * k]);
        if g == c {
            continue;
        }
        let scores = scores_f64(params.score, &logits[t * e..(t + 1) * e]);
        let verdict = if cuda {
            choice_valid(&scores, g, NEAR_TIE)
        } else {
            Err("the CPU backend must match itself exactly".into())
        };
        match verdict {
            Ok(()) => {
                near_ties += 1;
                want_w[t * k..(t + 1) * k].copy_from_slice(&weights_of(params, &scores, g));
            }
            Err(msg) => {
                if bad_tokens == 0 {
                    problems.push(format!("token {t}: experts {g:?}, CPU {c:?}: {msg}"));
                }
                bad_tokens += 1;
            }
        }
    }
    if bad_tokens > 1 {
        problems.push(format!(
            "{bad_tokens} tokens with a wrong choice of experts"
        ));
    }
    let got_w: Vec<f64> = got.weights.iter().map(|&w| w as f64).collect();
    let checks = vec![CheckVal {
        what: "weights",
        err: rel_norm(&got_w, &want_w),
        tol: F32_TOL,
        exact: false,
    }];
    // The permutation: the CPU's when the choices agree, else the one of the device's choice.
    let own;
    let (counts, offsets, perm, position) = if near_ties == 0 {
        (&cpu.counts, &cpu.offsets, &cpu.perm, &cpu.position)
    } else {
        match permutation_of(&got.ids, e, got.perm.len()) {
            Some(p) => {
                own = p;
                (&own.0, &own.1, &own.2, &own.3)
            }
            None => {
                problems.push("expert ids out of range: permutation not checked".into());
                return (checks, near_ties, problems);
            }
        }
    };
    for (name, g, w) in [
        ("counts", &got.counts, counts),
        ("offsets", &got.offsets, offsets),
        ("perm", &got.perm, perm),
        ("position", &got.position, position),
    ] {
        if let Some(i) = g.iter().zip(w.iter()).position(|(a, b)| a != b) {
            let diff = g.iter().zip(w.iter()).filter(|(a, b)| a != b).count();
            problems.push(format!(
                "{name}[{i}] = {}, expected {} ({diff} entries differ)",
                g[i], w[i]
            ));
        }
    }
    (checks, near_ties, problems)
}

// ------------------------------------------------------------------------------------------
// Row operations: the CPU backend on sampled rows

/// Host copies of the inputs of one shape.
struct HostInputs {
    logits: HostBuf,
    /// Token rows `[N, H]`: x of the forward.
    x: HostBuf,
    /// Token rows `[N, H]`: the incoming gradient of the combine (grad_y).
    g_tok: HostBuf,
    /// Permuted rows `[R, H]`: the expert outputs, and the incoming gradient of the permute.
    rows_in: HostBuf,
}

/// Row-wise comparison of sampled rows: `got` holds the whole output, row `idx[i]` of it is
/// compared with row `i` of `want`. The largest per-row relative error, and whether every
/// sampled row was bitwise equal.
fn compare_rows(dtype: DType, h: usize, got: &[u8], idx: &[usize], want: &HostBuf) -> (f64, bool) {
    let rb = h * dtype.size();
    let (mut worst, mut bitwise) = (0.0f64, true);
    for (i, &r) in idx.iter().enumerate() {
        let g = &got[r * rb..(r + 1) * rb];
        let w = &want.as_bytes()[i * rb..(i + 1) * rb];
        bitwise &= g == w;
        worst = max_nan(worst, rel_norm(&widen(dtype, g), &widen(dtype, w)));
    }
    (worst, bitwise)
}

fn host_matrix(buf: &HostBuf, dtype: DType, rows: usize, h: usize) -> Matrix<'_> {
    assert!(buf.len() >= rows * h * dtype.size());
    // SAFETY: the buffer holds rows × h elements of dtype, 16-byte aligned, and is borrowed for
    // the view's lifetime.
    unsafe { Matrix::from_raw(buf.ptr(), dtype, rows, h, h, Location::Host) }
}

fn host_matrix_mut(buf: &mut HostBuf, dtype: DType, rows: usize, h: usize) -> MatrixMut<'_> {
    assert!(buf.len() >= rows * h * dtype.size());
    // SAFETY: as above, uniquely borrowed.
    unsafe { MatrixMut::from_raw(buf.ptr_mut(), dtype, rows, h, h, Location::Host) }
}

/// Geometry of one shape's run.
#[derive(Clone, Copy)]
struct Geo {
    dtype: DType,
    n: usize,
    h: usize,
    k: usize,
    rows: usize,
    /// Rows (or tokens) checked per output.
    check_rows: usize,
}

/// The CPU permute of the sampled permuted rows `idx`, compared with `got` (`[R, H]`).
#[allow(clippy::too_many_arguments)]
fn check_permute(
    cpu: &Context,
    g: Geo,
    src: &HostBuf,
    perm: &[i32],
    weights: Option<&[f32]>,
    got: &[u8],
    idx: &[usize],
    what: &'static str,
) -> Result<CheckVal, String> {
    let perm_sub: Vec<i32> = idx.iter().map(|&r| perm[r]).collect();
    let mut out = HostBuf::zeroed(idx.len() * g.h * g.dtype.size());
    cpu.moe_permute(
        Permute {
            x: host_matrix(src, g.dtype, g.n, g.h),
            k: g.k,
            perm: Vector::host(&perm_sub),
            weights: weights.map(Vector::host),
            out: host_matrix_mut(&mut out, g.dtype, idx.len(), g.h),
        },
        &Launch::default(),
    )
    .map_err(|e| format!("CPU reference permute: {e}"))?;
    let (err, bitwise) = compare_rows(g.dtype, g.h, got, idx, &out);
    // An unscaled permute moves bits: anything but equality is an error.
    let exact = weights.is_none();
    Ok(CheckVal {
        what,
        err: if exact && !bitwise && err == 0.0 {
            f64::NAN
        } else {
            err
        },
        tol: if exact { 0.0 } else { act_tol(g.dtype) },
        exact,
    })
}

/// The CPU combine of the sampled tokens `idx`, compared with `got` (`[N, H]`).
#[allow(clippy::too_many_arguments)]
fn check_combine(
    cpu: &Context,
    g: Geo,
    rows_in: &HostBuf,
    position: &[i32],
    weights: Option<&[f32]>,
    got: &[u8],
    idx: &[usize],
    what: &'static str,
) -> Result<CheckVal, String> {
    let k = g.k;
    let pos_sub: Vec<i32> = idx
        .iter()
        .flat_map(|&t| position[t * k..(t + 1) * k].iter().copied())
        .collect();
    let w_sub: Option<Vec<f32>> = weights.map(|w| {
        idx.iter()
            .flat_map(|&t| w[t * k..(t + 1) * k].iter().copied())
            .collect()
    });
    let mut y = HostBuf::zeroed(idx.len() * g.h * g.dtype.size());
    cpu.moe_combine(
        Combine {
            rows: host_matrix(rows_in, g.dtype, g.rows, g.h),
            k,
            position: Vector::host(&pos_sub),
            weights: w_sub.as_deref().map(Vector::host),
            y: host_matrix_mut(&mut y, g.dtype, idx.len(), g.h),
        },
        &Launch::default(),
    )
    .map_err(|e| format!("CPU reference combine: {e}"))?;
    let (err, _) = compare_rows(g.dtype, g.h, got, idx, &y);
    Ok(CheckVal {
        what,
        err,
        tol: act_tol(g.dtype),
        exact: false,
    })
}

/// The CPU slot-dot of the sampled tokens `idx`, compared with `got` (`[N·k]` f32).
fn check_slot_dot(
    cpu: &Context,
    g: Geo,
    tokens: &HostBuf,
    rows_in: &HostBuf,
    position: &[i32],
    got: &[u8],
    idx: &[usize],
) -> Result<CheckVal, String> {
    let (k, rb) = (g.k, g.h * g.dtype.size());
    let mut sub = HostBuf::zeroed(idx.len() * rb);
    for (i, &t) in idx.iter().enumerate() {
        sub.as_bytes_mut()[i * rb..(i + 1) * rb]
            .copy_from_slice(&tokens.as_bytes()[t * rb..(t + 1) * rb]);
    }
    let pos_sub: Vec<i32> = idx
        .iter()
        .flat_map(|&t| position[t * k..(t + 1) * k].iter().copied())
        .collect();
    let mut out = vec![0f32; idx.len() * k];
    cpu.moe_slot_dot(
        SlotDot {
            tokens: host_matrix(&sub, g.dtype, idx.len(), g.h),
            rows: host_matrix(rows_in, g.dtype, g.rows, g.h),
            k,
            position: Vector::host(&pos_sub),
            out: VectorMut::host(&mut out),
        },
        &Launch::default(),
    )
    .map_err(|e| format!("CPU reference slot-dot: {e}"))?;
    let all = f32s(got);
    let got_sub: Vec<f64> = idx
        .iter()
        .flat_map(|&t| all[t * k..(t + 1) * k].iter().map(|&x| x as f64))
        .collect();
    let want: Vec<f64> = out.iter().map(|&x| x as f64).collect();
    Ok(CheckVal {
        what: "grad_w",
        err: rel_norm(&got_sub, &want),
        tol: F32_TOL,
        exact: false,
    })
}

// ------------------------------------------------------------------------------------------
// Running one shape

/// The backend buffers of one shape.
struct DevBufs {
    logits: Buf,
    ids: Buf,
    weights: Buf,
    counts: Buf,
    offsets: Buf,
    perm: Buf,
    position: Buf,
    workspace: Buf,
    x: Buf,
    g_tok: Buf,
    rows_in: Buf,
    out_rows: Buf,
    out_tok: Buf,
    grad_w: Buf,
}

/// Their addresses, for the library's raw views.
#[derive(Clone, Copy)]
struct Addrs {
    logits: *mut u8,
    ids: *mut u8,
    weights: *mut u8,
    counts: *mut u8,
    offsets: *mut u8,
    perm: *mut u8,
    position: *mut u8,
    workspace: *mut u8,
    ws_len: usize,
    x: *mut u8,
    g_tok: *mut u8,
    rows_in: *mut u8,
    out_rows: *mut u8,
    out_tok: *mut u8,
    grad_w: *mut u8,
}

/// Rows of one shape (all ops), run in order; a failure to set up marks every row.
fn run_shape(
    runner: &Runner,
    cfg: &MoeConfig<'_>,
    dtype: DType,
    shape: Shape,
    progress: &mut Progress,
    step: &mut usize,
    total: usize,
) -> Vec<MoeRow> {
    let (n, h, e) = (cfg.tokens, shape.h(), shape.e());
    let params = shape.params();
    let k = params.k;
    let rows = max_rows(n, e, k, params.block, params.capacity);
    let mut out: Vec<MoeRow> = OPS
        .iter()
        .map(|&op| MoeRow {
            shape,
            dtype,
            n,
            h,
            e,
            k,
            rows,
            op,
            kernels: String::new(),
            iters: cfg.iters,
            median_s: f64::NAN,
            min_s: f64::NAN,
            host_s: None,
            bytes: 0.0,
            strict_bytes: 0.0,
            parts: Vec::new(),
            checks: Vec::new(),
            near_ties: 0,
            same: None,
            problems: Vec::new(),
            error: None,
            ok: false,
        })
        .collect();
    progress.show(&format!(
        "[{}/{total}] moe {} {} {n}x{h}: generating inputs ...",
        *step + 1,
        shape.name(),
        dtype.name()
    ));
    let g = Geo {
        dtype,
        n,
        h,
        k,
        rows,
        check_rows: cfg.check_rows,
    };
    let setup = setup_shape(runner, cfg, g, e, shape);
    let (host, mut bufs, addrs) = match setup {
        Ok(x) => x,
        Err(msg) => {
            for r in &mut out {
                r.error = Some(msg.clone());
                r.finish();
            }
            *step += out.len();
            return out;
        }
    };
    let cpu = Context::cpu();
    let mut route: Option<RouteOut> = None;
    for row in &mut out {
        *step += 1;
        progress.show(&format!(
            "[{}/{total}] moe {} {} {n}x{h} {} ...",
            *step,
            shape.name(),
            dtype.name(),
            row.op.name()
        ));
        let r = match row.op {
            Op::Route => run_route(runner, &cpu, g, e, &params, &host, &mut bufs, addrs, row)
                .map(|ro| route = Some(ro)),
            op => match &route {
                None => Err("no route (its row failed)".to_string()),
                Some(ro) => run_rows(runner, &cpu, g, shape, op, ro, &host, &mut bufs, addrs, row),
            },
        };
        if let Err(msg) = r {
            row.error = Some(msg);
        }
        row.finish();
    }
    out
}

/// Generates the inputs, allocates and fills the backend buffers.
fn setup_shape(
    runner: &Runner,
    cfg: &MoeConfig<'_>,
    g: Geo,
    e: usize,
    shape: Shape,
) -> Result<(HostInputs, DevBufs, Addrs), String> {
    let (n, h, k, rows, b) = (g.n, g.h, g.k, g.rows, g.dtype.size());
    let ctx = runner.context();
    let ws_len = ctx.moe_route_workspace_size(n, e, k);
    let act = (3 * n * h + 2 * rows * h) * b;
    let idx = 4 * (3 * n * k + 2 * e + 1 + rows + n * k);
    let need = n * e * 4 + idx + ws_len;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    // The host copies of the inputs (logits, x, the token and row gradients).
    let host_bytes = n * e * 4 + (2 * n * h + rows * h) * b;
    match runner.free_memory() {
        Some(free) => {
            // Margin: the 256 MiB buffer the CUDA timing reads to evict L2, and some slack.
            if act + need + (512 << 20) > free {
                return Err(format!(
                    "{} at N = {n} needs {:.2} GiB of device memory, {:.2} GiB are free (use --tokens)",
                    shape.name(),
                    gib(act + need),
                    gib(free)
                ));
            }
        }
        None => {
            // The CPU backend: its buffers are host memory too, beside the host inputs.
            if let Some(free) = host_memory_available() {
                if host_bytes + act + need > free {
                    return Err(format!(
                        "{} at N = {n} needs {:.2} GiB of host memory, {:.2} GiB are available \
                         (use --tokens)",
                        shape.name(),
                        gib(host_bytes + act + need),
                        gib(free)
                    ));
                }
            }
        }
    }
    let seed = |what: u64| mix(&[cfg.seed, 0x30E, shape as u64, what]);
    let gen = |rows: usize, cols: usize, dtype: DType, sigma: f64, what: u64| {
        let mut buf = HostBuf::try_zeroed(rows * cols * dtype.size())?;
        fill_normal(seed(what), dtype, cols, sigma, buf.as_bytes_mut());
        Ok::<HostBuf, String>(buf)
    };
    let host = HostInputs {
        logits: gen(n, e, DType::F32, LOGIT_SIGMA, 1)?,
        x: gen(n, h, g.dtype, ACT_SIGMA, 2)?,
        g_tok: gen(n, h, g.dtype, ACT_SIGMA, 3)?,
        rows_in: gen(rows, h, g.dtype, ACT_SIGMA, 4)?,
    };
    let filled = |data: &HostBuf| -> Result<Buf, String> {
        let mut buf = runner.alloc(data.len())?;
        runner.upload(&mut buf, data.as_bytes())?;
        Ok(buf)
    };
    let mut bufs = DevBufs {
        logits: filled(&host.logits)?,
        ids: runner.alloc(4 * n * k)?,
        weights: runner.alloc(4 * n * k)?,
        counts: runner.alloc(4 * e)?,
        offsets: runner.alloc(4 * (e + 1))?,
        perm: runner.alloc(4 * rows)?,
        position: runner.alloc(4 * n * k)?,
        workspace: runner.alloc(ws_len)?,
        x: filled(&host.x)?,
        g_tok: filled(&host.g_tok)?,
        rows_in: filled(&host.rows_in)?,
        out_rows: runner.alloc(rows * h * b)?,
        out_tok: runner.alloc(n * h * b)?,
        grad_w: runner.alloc(4 * n * k)?,
    };
    let addrs = Addrs {
        logits: runner.addr(&mut bufs.logits),
        ids: runner.addr(&mut bufs.ids),
        weights: runner.addr(&mut bufs.weights),
        counts: runner.addr(&mut bufs.counts),
        offsets: runner.addr(&mut bufs.offsets),
        perm: runner.addr(&mut bufs.perm),
        position: runner.addr(&mut bufs.position),
        workspace: runner.addr(&mut bufs.workspace),
        ws_len,
        x: runner.addr(&mut bufs.x),
        g_tok: runner.addr(&mut bufs.g_tok),
        rows_in: runner.addr(&mut bufs.rows_in),
        out_rows: runner.addr(&mut bufs.out_rows),
        out_tok: runner.addr(&mut bufs.out_tok),
        grad_w: runner.addr(&mut bufs.grad_w),
    };
    Ok((host, bufs, addrs))
}

/// Times and checks the route; returns its outputs as they are left in the backend buffers.
#[allow(clippy::too_many_arguments)]
fn run_route(
    runner: &Runner,
    cpu: &Context,
    g: Geo,
    e: usize,
    params: &RouteParams,
    host: &HostInputs,
    bufs: &mut DevBufs,
    a: Addrs,
    row: &mut MoeRow,
) -> Result<RouteOut, String> {
    let (n, k, rows) = (g.n, g.k, g.rows);
    let ctx = runner.context();
    let loc = runner.location();
    let route = || -> Result<(), String> {
        // SAFETY: every pointer is a live buffer of the runner's backend of the size the view
        // describes (allocated in setup_shape), distinct from the others.
        let call = unsafe {
            Route {
                logits: Matrix::from_raw(a.logits, DType::F32, n, e, e, loc),
                bias: None,
                expert_ids: VectorMut::from_raw(a.ids.cast(), n * k, loc),
                weights: VectorMut::from_raw(a.weights.cast(), n * k, loc),
                counts: VectorMut::from_raw(a.counts.cast(), e, loc),
                offsets: VectorMut::from_raw(a.offsets.cast(), e + 1, loc),
                perm: VectorMut::from_raw(a.perm.cast(), rows, loc),
                position: VectorMut::from_raw(a.position.cast(), n * k, loc),
            }
        };
        ctx.moe_route(call, params, &runner.launch(Some((a.workspace, a.ws_len))))
            .map_err(err_string)
    };
    let parts: [Part<'_>; 1] = [&route];
    let m = measure(
        runner,
        &parts,
        &mut [
            &mut bufs.ids,
            &mut bufs.weights,
            &mut bufs.counts,
            &mut bufs.offsets,
            &mut bufs.perm,
            &mut bufs.position,
        ],
        row.iters,
    )?;
    // Floor (cuda/MOE.md): logits read once, ids, weights, position and perm written once.
    let bytes = (n * e * 4 + 4 * (3 * n * k + rows)) as f64;
    set_times(row, &m, &["top-k+scan+assign"], &[bytes], bytes);
    let got = RouteOut::from_bytes(&m.first);
    let reference = cpu_route(cpu, &host.logits, n, e, params)?;
    let logits = f32s(host.logits.as_bytes());
    let (checks, near_ties, problems) =
        check_route(runner.is_cuda(), params, e, &logits, &got, &reference);
    row.checks = checks;
    row.near_ties = near_ties;
    row.problems = problems;
    row.same = Some(m.same);
    if m.same {
        Ok(got)
    } else {
        // The rows below use what the backend buffers hold now: the second run's outputs.
        let last = [
            &bufs.ids,
            &bufs.weights,
            &bufs.counts,
            &bufs.offsets,
            &bufs.perm,
            &bufs.position,
        ]
        .iter()
        .map(|b| runner.download(b))
        .collect::<Result<Vec<_>, _>>()?;
        Ok(RouteOut::from_bytes(&last))
    }
}

/// Fills the timing fields of a row from its measured parts.
fn set_times(row: &mut MoeRow, m: &Measured, names: &[&str], bytes: &[f64], strict: f64) {
    let iters = m.part_times.first().map_or(0, Vec::len);
    let totals: Vec<f64> = (0..iters)
        .map(|i| m.part_times.iter().map(|p| p[i]).sum())
        .collect();
    row.median_s = median(&totals);
    row.host_s = m.host_s;
    row.min_s = totals.iter().copied().fold(f64::INFINITY, f64::min);
    row.bytes = bytes.iter().sum();
    row.strict_bytes = strict;
    row.kernels = names.join("+");
    row.parts = if names.len() > 1 {
        names
            .iter()
            .zip(bytes)
            .zip(&m.part_times)
            .map(|((name, &b), t)| PartRow {
                name: name.to_string(),
                median_s: median(t),
                bytes: b,
            })
            .collect()
    } else {
        Vec::new()
    };
}

/// Times and checks one of permute / combine, forward or backward, on the route's outputs.
#[allow(clippy::too_many_arguments)]
fn run_rows(
    runner: &Runner,
    cpu: &Context,
    g: Geo,
    shape: Shape,
    op: Op,
    ro: &RouteOut,
    host: &HostInputs,
    bufs: &mut DevBufs,
    a: Addrs,
    row: &mut MoeRow,
) -> Result<(), String> {
    let (dtype, n, h, k, rows) = (g.dtype, g.n, g.h, g.k, g.rows);
    let b = dtype.size();
    let ctx = runner.context();
    let loc = runner.location();
    let scaled = shape.scaled_input();
    let tok_bytes = (n * h * b) as f64;
    let row_bytes = (rows * h * b) as f64;
    let grad_w_bytes = (4 * n * k) as f64;

    // SAFETY (all four closures): every pointer is a live buffer of the runner's backend of the
    // size the view describes (allocated in setup_shape); inputs and outputs are distinct.
    let permute = |src: *mut u8, weighted: bool| {
        move || -> Result<(), String> {
            let call = unsafe {
                Permute {
                    x: Matrix::from_raw(src, dtype, n, h, h, loc),
                    k,
                    perm: Vector::from_raw(a.perm.cast(), rows, loc),
                    weights: weighted.then(|| Vector::from_raw(a.weights.cast(), n * k, loc)),
                    out: MatrixMut::from_raw(a.out_rows, dtype, rows, h, h, loc),
                }
            };
            ctx.moe_permute(call, &runner.launch(None))
                .map_err(err_string)
        }
    };
    let combine = |weighted: bool| {
        move || -> Result<(), String> {
            let call = unsafe {
                Combine {
                    rows: Matrix::from_raw(a.rows_in, dtype, rows, h, h, loc),
                    k,
                    position: Vector::from_raw(a.position.cast(), n * k, loc),
                    weights: weighted.then(|| Vector::from_raw(a.weights.cast(), n * k, loc)),
                    y: MatrixMut::from_raw(a.out_tok, dtype, n, h, h, loc),
                }
            };
            ctx.moe_combine(call, &runner.launch(None))
                .map_err(err_string)
        }
    };
    let permute_backward = |scaled: bool| {
        move || -> Result<(), String> {
            let call = unsafe {
                PermuteBackward {
                    grad_xp: Matrix::from_raw(a.rows_in, dtype, rows, h, h, loc),
                    k,
                    position: Vector::from_raw(a.position.cast(), n * k, loc),
                    weights: scaled.then(|| Vector::from_raw(a.weights.cast(), n * k, loc)),
                    x: scaled.then(|| Matrix::from_raw(a.x, dtype, n, h, h, loc)),
                    grad_x: MatrixMut::from_raw(a.out_tok, dtype, n, h, h, loc),
                    grad_weights: scaled.then(|| VectorMut::from_raw(a.grad_w.cast(), n * k, loc)),
                }
            };
            ctx.moe_permute_backward(call, &runner.launch(None))
                .map_err(err_string)
        }
    };
    let combine_backward = |weighted: bool| {
        move || -> Result<(), String> {
            let call = unsafe {
                CombineBackward {
                    grad_y: Matrix::from_raw(a.g_tok, dtype, n, h, h, loc),
                    expert_out: weighted
                        .then(|| Matrix::from_raw(a.rows_in, dtype, rows, h, h, loc)),
                    k,
                    perm: Vector::from_raw(a.perm.cast(), rows, loc),
                    position: Vector::from_raw(a.position.cast(), n * k, loc),
                    weights: weighted.then(|| Vector::from_raw(a.weights.cast(), n * k, loc)),
                    grad_expert_out: MatrixMut::from_raw(a.out_rows, dtype, rows, h, h, loc),
                    grad_weights: weighted
                        .then(|| VectorMut::from_raw(a.grad_w.cast(), n * k, loc)),
                }
            };
            ctx.moe_combine_backward(call, &runner.launch(None))
                .map_err(err_string)
        }
    };
    // Backward passes that run as their two primitives (the CPU backend's, or CUDA's under the
    // A/B switch): labelled and floored as those two kernels.
    let primitives = !runner.is_cuda()
        || distill_kernels::switches::active()
            .iter()
            .any(|s| s == "DK_MOE_BACKWARD=primitives");

    let seed = mix(&[rows as u64, n as u64, op as u64, shape as u64]);
    let row_idx = sample_rows(rows, g.check_rows, seed);
    let tok_idx = sample_rows(n, g.check_rows, seed ^ 0x70C);
    let w = Some(&ro.weights[..]);
    let pname = |weighted: bool| if weighted { "permute(w)" } else { "permute" };
    let cname = |weighted: bool| if weighted { "combine(w)" } else { "combine" };
    // Floors (cuda/MOE.md, b = element size): permute 2·R·H·b, combine and slot-dot (R + N)·H·b.
    let (pf, cf) = (2.0 * row_bytes, row_bytes + tok_bytes);

    match op {
        Op::Route => unreachable!("the route has its own runner"),
        Op::PermuteFwd => {
            let f = permute(a.x, scaled);
            let m = measure(runner, &[&f], &mut [&mut bufs.out_rows], row.iters)?;
            set_times(row, &m, &[pname(scaled)], &[pf], row_bytes + tok_bytes);
            row.same = Some(m.same);
            scan(row, dtype, "xp", &m.first[0]);
            row.checks.push(check_permute(
                cpu,
                g,
                &host.x,
                &ro.perm,
                w.filter(|_| scaled),
                &m.first[0],
                &row_idx,
                "xp",
            )?);
        }
        Op::PermuteBwd => {
            // grad_x = combine(grad_xp[, w]); when scaled, grad_w = slot_dot(x, grad_xp): one
            // fused kernel (two launches under DK_MOE_BACKWARD=primitives).
            let f = permute_backward(scaled);
            let (m, names, bytes, strict) = if scaled {
                let m = measure(
                    runner,
                    &[&f],
                    &mut [&mut bufs.out_tok, &mut bufs.grad_w],
                    row.iters,
                )?;
                let strict = row_bytes + 2.0 * tok_bytes + grad_w_bytes;
                if primitives {
                    (m, vec!["combine(w)+slot-dot"], vec![2.0 * cf], strict)
                } else {
                    (m, vec!["combine-dot(w)"], vec![strict], strict)
                }
            } else {
                let m = measure(runner, &[&f], &mut [&mut bufs.out_tok], row.iters)?;
                (m, vec![cname(false)], vec![cf], cf)
            };
            set_times(row, &m, &names, &bytes, strict);
            row.same = Some(m.same);
            scan(row, dtype, "grad_x", &m.first[0]);
            row.checks.push(check_combine(
                cpu,
                g,
                &host.rows_in,
                &ro.position,
                w.filter(|_| scaled),
                &m.first[0],
                &tok_idx,
                "grad_x",
            )?);
            if scaled {
                scan(row, DType::F32, "grad_w", &m.first[1]);
                row.checks.push(check_slot_dot(
                    cpu,
                    g,
                    &host.x,
                    &host.rows_in,
                    &ro.position,
                    &m.first[1],
                    &tok_idx,
                )?);
            }
        }
        Op::CombineFwd => {
            let weighted = !scaled;
            let f = combine(weighted);
            let m = measure(runner, &[&f], &mut [&mut bufs.out_tok], row.iters)?;
            set_times(row, &m, &[cname(weighted)], &[cf], cf);
            row.same = Some(m.same);
            scan(row, dtype, "y", &m.first[0]);
            row.checks.push(check_combine(
                cpu,
                g,
                &host.rows_in,
                &ro.position,
                w.filter(|_| weighted),
                &m.first[0],
                &tok_idx,
                "y",
            )?);
        }
        Op::CombineBwd => {
            // grad_eo = permute(grad_y[, w]); when weighted, grad_w = slot_dot(grad_y, eo): one
            // fused kernel reading each row of grad_y once for all of its slots (the primitives'
            // permute and slot-dot under DK_MOE_BACKWARD=primitives).
            let weighted = !scaled;
            let f = combine_backward(weighted);
            let (m, names, bytes, strict) = if weighted {
                let m = measure(
                    runner,
                    &[&f],
                    &mut [&mut bufs.out_rows, &mut bufs.grad_w],
                    row.iters,
                )?;
                let strict = 2.0 * row_bytes + tok_bytes + grad_w_bytes;
                if primitives {
                    (m, vec!["permute(w)+slot-dot"], vec![pf + cf], strict)
                } else {
                    (m, vec!["permute-dot(w)"], vec![strict], strict)
                }
            } else {
                // Without the weights' gradient the call is the permute (nothing to fuse).
                let m = measure(runner, &[&f], &mut [&mut bufs.out_rows], row.iters)?;
                (m, vec![pname(false)], vec![pf], row_bytes + tok_bytes)
            };
            set_times(row, &m, &names, &bytes, strict);
            row.same = Some(m.same);
            scan(row, dtype, "grad_eo", &m.first[0]);
            row.checks.push(check_permute(
                cpu,
                g,
                &host.g_tok,
                &ro.perm,
                w.filter(|_| weighted),
                &m.first[0],
                &row_idx,
                "grad_eo",
            )?);
            if weighted {
                scan(row, DType::F32, "grad_w", &m.first[1]);
                row.checks.push(check_slot_dot(
                    cpu,
                    g,
                    &host.g_tok,
                    &host.rows_in,
                    &ro.position,
                    &m.first[1],
                    &tok_idx,
                )?);
            }
        }
    }
    Ok(())
}

/// Records unwritten (still poisoned) or non-finite elements of a whole output.
fn scan(row: &mut MoeRow, dtype: DType, what: &str, bytes: &[u8]) {
    let bad = count_nonfinite(dtype, bytes);
    if bad > 0 {
        row.problems.push(format!(
            "{what}: {bad} elements not finite (unwritten or NaN)"
        ));
    }
}

// ------------------------------------------------------------------------------------------
// The section: header, rows, JSON

/// Results the section will produce for `cfg`.
pub fn count(cfg: &MoeConfig<'_>) -> usize {
    cfg.shapes.len() * cfg.dtypes.len() * OPS.len()
}

/// Prints the section's header and table head.
pub fn print_header(cfg: &MoeConfig<'_>, cuda: bool) {
    outln!(
        "MoE dispatch: N = {} tokens per shape, activations {}, router logits f32 ~ N(0, 1), activations ~ N(0, 1); median of {} timed run(s) after a checked one; up to {} rows checked per output (all where there are fewer)",
        cfg.tokens,
        cfg.dtypes.iter().map(|d| d.name()).collect::<Vec<_>>().join(","),
        cfg.iters,
        cfg.check_rows
    );
    for s in cfg.shapes {
        outln!("  {:<9} {}", s.name(), s.describe());
    }
    outln!(
        "floor = bytes / copy bandwidth, bytes per cuda/MOE.md (b = element size): route N*E*4 + 4*(3*N*k + R); permute 2*R*H*b; combine, slot-dot (R + N)*H*b; a bwd sums its kernels (a fused one: its strict bytes)"
    );
    outln!(
        "strict = the op's operands each read or written once ((N + R)*H*b for permute; bwd with slot-dot adds the other operand and 4*N*k)"
    );
    outln!(
        "check: route vs the CPU backend on every token ({}weights rel 1e-5, counts/offsets/perm/position exact); rows vs the CPU backend on sampled rows: unscaled permute bitwise, else max row ||d - c|| / ||c|| <= {} ({}), grad_w 1e-5; every output poisoned first and scanned; 2nd run = a second poisoned run bitwise identical",
        if cuda { "ids exact except f32 near-ties within 1e-5, counted as ties; " } else { "ids exact; " },
        cfg.dtypes.iter().map(|&d| sci(Some(act_tol(d)))).collect::<Vec<_>>().join("/"),
        cfg.dtypes.iter().map(|d| d.name()).collect::<Vec<_>>().join("/"),
    );
    if !cuda {
        // The CPU backend is what these rows run: compared with itself they say the outputs
        // are complete and repeatable, not that they are right.
        outln!(
            "note: on the CPU the rows are compared with the CPU backend itself (complete writes and repeatability only); the independent MoE reference is tests/moe_reference.rs (cargo test)"
        );
    }
    outln!();
    outln!("{MOE_HEADER}");
}

const MOE_HEADER: &str = "shape     dtype  N x H       E/k     op          kernels               time us   host us      GB/s  of floor    strict  err             ties  2nd run  check";

fn format_row(r: &MoeRow, copy_bw: f64) -> String {
    let timed = r.error.is_none() && !r.median_s.is_nan();
    let (time, gbps, floor, strict) = if timed {
        (
            format!("{:.1}", r.median_s * 1e6),
            format!("{:.1}", r.gbps()),
            pct(r.gbps() * 1e9 / copy_bw),
            pct(r.strict_bytes / r.median_s / copy_bw),
        )
    } else {
        ("-".into(), "-".into(), "-".into(), "-".into())
    };
    let host = match r.host_s {
        Some(x) if timed => format!("{:.1}", x * 1e6),
        _ => "-".into(),
    };
    let errs = if r.checks.is_empty() {
        "-".to_string()
    } else {
        r.checks
            .iter()
            .map(|c| sci(Some(c.err)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let status = match (&r.error, r.ok) {
        (Some(e), _) => format!("ERROR: {e}"),
        (None, true) => "ok".into(),
        (None, false) => {
            let mut s = "FAIL".to_string();
            let mut why: Vec<String> = r
                .checks
                .iter()
                .filter(|c| !c.passed())
                .map(|c| format!("{} {} > {}", c.what, sci(Some(c.err)), sci(Some(c.tol))))
                .collect();
            if r.same == Some(false) {
                why.push("second run differs".into());
            }
            why.extend(r.problems.iter().cloned());
            if !why.is_empty() {
                s += &format!(" ({})", why.join("; "));
            }
            s
        }
    };
    let mut s = format!(
        "{:<9} {:<6} {:<11} {:<7} {:<11} {:<19} {time:>9} {host:>9} {gbps:>9} {floor:>8} {strict:>8}  {errs:<15} {:>4}  {:<7}  {status}",
        r.shape.name(),
        r.dtype.name(),
        format!("{}x{}", r.n, r.h),
        format!("{}/{}", r.e, r.k),
        r.op.name(),
        if r.kernels.is_empty() { "-" } else { &r.kernels },
        if r.op == Op::Route { r.near_ties.to_string() } else { "-".into() },
        match r.same {
            Some(true) => "same",
            Some(false) => "DIFF",
            None => "-",
        },
    );
    if timed {
        for p in &r.parts {
            s += &format!(
                "\n{:<9} {:<6} {:<11} {:<7} {:<11} {:<19} {:>9} {:>9} {:>9} {:>8}",
                "",
                "",
                "",
                "",
                "",
                format!("  {}", p.name),
                format!("{:.1}", p.median_s * 1e6),
                "",
                format!("{:.1}", p.bytes / p.median_s / 1e9),
                pct(p.bytes / p.median_s / copy_bw),
            );
        }
    }
    s
}

/// Runs every shape × dtype of the section, printing each row as it completes.
pub fn run(
    runner: &Runner,
    cfg: &MoeConfig<'_>,
    copy_bw: f64,
    progress: &mut Progress,
    done: &mut usize,
    total: usize,
) -> Vec<MoeRow> {
    let mut rows = Vec::with_capacity(count(cfg));
    for &dtype in cfg.dtypes {
        for &shape in cfg.shapes {
            let got = run_shape(runner, cfg, dtype, shape, progress, done, total);
            progress.clear();
            for r in &got {
                outln!("{}", format_row(r, copy_bw));
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
            rows.extend(got);
            let _ = runner.sync();
        }
    }
    progress.clear();
    rows
}

/// The section's results as a JSON array (the `moe_results` field of `dk bench --json`).
pub fn to_json(rows: &[MoeRow], copy_bw: f64) -> String {
    let mut s = String::from("[\n");
    for (i, r) in rows.iter().enumerate() {
        let timed = r.error.is_none() && !r.median_s.is_nan();
        let us = |x: f64| json_opt(timed.then_some(x * 1e6));
        let parts = r
            .parts
            .iter()
            .map(|p| {
                format!(
                    "{{\"kernel\": {}, \"median_us\": {}, \"bytes\": {}, \"floor_fraction\": {}}}",
                    json_str(&p.name),
                    json_num(p.median_s * 1e6),
                    p.bytes,
                    json_num(p.bytes / p.median_s / copy_bw)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let checks = r
            .checks
            .iter()
            .map(|c| {
                format!(
                    "{{\"what\": {}, \"err\": {}, \"tol\": {}, \"exact\": {}, \"ok\": {}}}",
                    json_str(c.what),
                    json_num(c.err),
                    json_num(c.tol),
                    c.exact,
                    c.passed()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        s += &format!(
            "    {{\"shape\": {}, \"model\": {}, \"dtype\": {}, \"logits_dtype\": \"f32\", \"n\": {}, \"h\": {}, \"e\": {}, \"k\": {}, \
             \"permuted_rows\": {}, \"op\": {}, \"kernels\": {}, \"iters\": {}, \"median_us\": {}, \"min_us\": {}, \"host_enqueue_us\": {}, \
             \"bytes\": {}, \"strict_bytes\": {}, \"gbps\": {}, \"floor_fraction\": {}, \"strict_fraction\": {}, \
             \"parts\": [{parts}], \"checks\": [{checks}], \"near_ties\": {}, \"bitwise_repeat\": {}, \
             \"ok\": {}, \"problems\": [{}], \"error\": {}}}{}\n",
            json_str(r.shape.name()),
            json_str(r.shape.describe()),
            json_str(r.dtype.name()),
            r.n,
            r.h,
            r.e,
            r.k,
            r.rows,
            json_str(r.op.name()),
            json_str(&r.kernels),
            r.iters,
            us(r.median_s),
            us(r.min_s),
            json_opt(r.host_s.map(|x| x * 1e6)),
            r.bytes,
            r.strict_bytes,
            json_opt(timed.then(|| r.gbps())),
            json_opt(timed.then(|| r.gbps() * 1e9 / copy_bw)),
            json_opt(timed.then(|| r.strict_bytes / r.median_s / copy_bw)),
            r.near_ties,
            r.same.map_or("null".into(), |b| b.to_string()),
            r.ok,
            json_strs(&r.problems),
            r.error.as_deref().map_or("null".into(), json_str),
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    s += "  ]";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_ties_are_accepted_and_wrong_choices_are_not() {
        let scores = [0.1, 0.3, 0.3 + 1e-7, 0.2];
        assert!(choice_valid(&scores, &[2, 1], 1e-5).is_ok());
        assert!(choice_valid(&scores, &[1, 2], 1e-5).is_ok()); // a near-tie either way
        assert!(choice_valid(&scores, &[1, 3], 1e-5).is_err()); // 2 beats 3
        assert!(choice_valid(&scores, &[1, 1], 1e-5).is_err());
        assert!(choice_valid(&scores, &[4, 1], 1e-5).is_err());
    }

    #[test]
    fn permutation_is_expert_major_then_token_then_slot() {
        // 3 tokens, k = 2, 3 experts.
        let ids = [2, 0, 0, 1, 2, 0];
        let (counts, offsets, perm, position) = permutation_of(&ids, 3, 6).unwrap();
        assert_eq!(counts, vec![3, 1, 2]);
        assert_eq!(offsets, vec![0, 3, 4, 6]);
        assert_eq!(perm, vec![1, 2, 5, 3, 0, 4]);
        assert_eq!(position, vec![4, 0, 1, 3, 5, 2]);
        assert!(permutation_of(&[0, 5], 3, 2).is_none());
    }

    #[test]
    fn nonfinite_scan_sees_poison() {
        assert_eq!(count_nonfinite(DType::BF16, &[0xFF, 0xFF, 0x80, 0x3F]), 1);
        assert_eq!(count_nonfinite(DType::F16, &[0xFF, 0xFF, 0x00, 0x3C]), 1);
        assert_eq!(
            count_nonfinite(DType::F32, &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x80, 0x3F]),
            1
        );
    }

    #[test]
    fn row_checks_catch_wrong_values() {
        let cpu = Context::cpu();
        let (n, e, h, k) = (40, 8, 64, 2);
        let p = RouteParams {
            renormalize: true,
            ..RouteParams::new(k)
        };
        let mut logits = HostBuf::zeroed(n * e * 4);
        fill_normal(1, DType::F32, e, 1.0, logits.as_bytes_mut());
        let ro = cpu_route(&cpu, &logits, n, e, &p).unwrap();
        let rows = n * k;
        let g = Geo {
            dtype: DType::BF16,
            n,
            h,
            k,
            rows,
            check_rows: 16,
        };
        let rb = h * 2;
        let mut x = HostBuf::zeroed(n * rb);
        fill_normal(2, DType::BF16, h, 1.0, x.as_bytes_mut());
        let mut rows_in = HostBuf::zeroed(rows * rb);
        fill_normal(3, DType::BF16, h, 1.0, rows_in.as_bytes_mut());
        let all_rows: Vec<usize> = (0..rows).collect();
        let all_tokens: Vec<usize> = (0..n).collect();

        // Permute: bitwise when unscaled, so one flipped mantissa bit fails.
        let mut xp = HostBuf::zeroed(rows * rb);
        cpu.moe_permute(
            Permute {
                x: host_matrix(&x, g.dtype, n, h),
                k,
                perm: Vector::host(&ro.perm),
                weights: None,
                out: host_matrix_mut(&mut xp, g.dtype, rows, h),
            },
            &Launch::default(),
        )
        .unwrap();
        let mut got = xp.as_bytes().to_vec();
        let check =
            |got: &[u8]| check_permute(&cpu, g, &x, &ro.perm, None, got, &all_rows, "xp").unwrap();
        assert!(check(&got).passed());
        got[3 * rb + 10] ^= 1;
        assert!(!check(&got).passed());

        // Combine (weighted): a row off by 5 % fails, the exact answer passes.
        let mut y = HostBuf::zeroed(n * rb);
        cpu.moe_combine(
            Combine {
                rows: host_matrix(&rows_in, g.dtype, rows, h),
                k,
                position: Vector::host(&ro.position),
                weights: Some(Vector::host(&ro.weights)),
                y: host_matrix_mut(&mut y, g.dtype, n, h),
            },
            &Launch::default(),
        )
        .unwrap();
        let check = |got: &[u8]| {
            check_combine(
                &cpu,
                g,
                &rows_in,
                &ro.position,
                Some(&ro.weights),
                got,
                &all_tokens,
                "y",
            )
            .unwrap()
        };
        let mut got = y.as_bytes().to_vec();
        assert!(check(&got).passed());
        for c in got[7 * rb..8 * rb].chunks_exact_mut(2) {
            let v = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64();
            c.copy_from_slice(&half::bf16::from_f64(v * 1.05).to_bits().to_le_bytes());
        }
        assert!(!check(&got).passed());

        // Slot-dot: one value off by 1e-3 (relative to the norm) fails.
        let mut dots = vec![0f32; n * k];
        cpu.moe_slot_dot(
            SlotDot {
                tokens: host_matrix(&x, g.dtype, n, h),
                rows: host_matrix(&rows_in, g.dtype, rows, h),
                k,
                position: Vector::host(&ro.position),
                out: VectorMut::host(&mut dots),
            },
            &Launch::default(),
        )
        .unwrap();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let check = |got: &[u8]| {
            check_slot_dot(&cpu, g, &x, &rows_in, &ro.position, got, &all_tokens).unwrap()
        };
        assert!(check(&bytes(&dots)).passed());
        let norm = dots.iter().map(|&d| (d as f64).powi(2)).sum::<f64>().sqrt();
        dots[5] += (1e-3 * norm) as f32;
        assert!(!check(&bytes(&dots)).passed());
    }

    #[test]
    fn cpu_route_matches_its_own_check() {
        let cpu = Context::cpu();
        let (n, e) = (37, 16);
        let mut logits = HostBuf::zeroed(n * e * 4);
        fill_normal(5, DType::F32, e, 1.0, logits.as_bytes_mut());
        for shape in ALL_SHAPES {
            let p = RouteParams {
                k: shape.params().k.min(4),
                ..shape.params()
            };
            let r = cpu_route(&cpu, &logits, n, e, &p).unwrap();
            let l = f32s(logits.as_bytes());
            let (checks, ties, problems) = check_route(false, &p, e, &l, &r, &r);
            assert!(problems.is_empty() && ties == 0, "{problems:?}");
            assert!(checks.iter().all(CheckVal::passed));
            let own = permutation_of(&r.ids, e, r.perm.len()).unwrap();
            assert_eq!(
                (own.0, own.1, own.2, own.3),
                (r.counts, r.offsets, r.perm, r.position)
            );
        }
    }
}
