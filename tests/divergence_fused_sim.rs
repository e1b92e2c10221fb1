//! The fused linear divergence's chunk kernels (cuda/divergence.cu: `dk_div_fused_<kind>_<dtype>`,
//! one block per row over a chunk's f32 logits, writing G — the gradient w.r.t. the raw logits,
//! softcap slope included — in the GEMMs' dtype over the student logits themselves), checked
//! without a GPU. The REAL kernel source is compiled for the host with the emulator of
//! tests/attention_sim/sim_core.h (every CUDA thread a fiber, __syncthreads, warp collectives,
//! guarded memory; tests/divergence_sim/divergence_fused_sim.cpp is the driver), its static
//! `__shared__` arrays staged as the emulator's guarded ones.
//!
//! What this is for: the in-place store. A bf16 / f16 G element i lands in the bytes of f32
//! element i / 2 of the same row, which another thread reads; the kernel orders its stores with
//! barriers after the loads of steps 0, 1, 2, 4, 8, … (FusedGradSink). Each case runs with the
//! threads in ascending and in descending order on the same inputs: a store that overtakes a
//! load shows as different bits between the two runs and as an error against the reference.
//!
//! Checks, per case: the emulator's own (accesses inside the operands' rows, stores only into
//! S and the per-row losses, guard regions); both orders bitwise equal; per-row losses and G
//! against the f64 reference of tests/common (`naive_row`, times the loss scale / T and the
//! softcap slope 1 − (s / cap)² of the capped logit s, rounded to G's dtype) at DESIGN.md's
//! tolerances (losses 1e-5; G 1e-5 in f32, 1e-2 in bf16 / f16, relative norm over the chunk); ignored and fully masked
//! rows exactly 0; the NaN row NaN throughout; every per-row loss written.
//!
//! Cases: forward KL, reverse KL, JSD (β = 0.5, 0.25); G in f32, bf16 and f16; with and without
//! a softcap; rows of 9–17 steps of 2048 elements (so the barriers of steps 0, 1, 2, 4, 8 and
//! 16 all order stores) with a scalar tail, and a short row of one partial step; forward only.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;
use distill_kernels::divergence::{kernel_kind_tag, Kind};
use distill_kernels::DType;

const TEST: &str = "divergence_fused_sim";
/// kThreads of cuda/divergence.cu: a step of the final pass covers 8 × 256 elements.
const STEP: usize = 8 * 256;
const IGNORE: i64 = -100;

fn simulator() -> Option<PathBuf> {
    static SIM: OnceLock<Option<PathBuf>> = OnceLock::new();
    SIM.get_or_init(|| divergence_cu_simulator(TEST, "divergence_fused_sim.cpp"))
        .clone()
}

#[derive(Clone)]
struct FusedCase {
    what: String,
    kind: Kind,
    beta: f32,
    temperature: f32,
    /// Loss scale (what dk_div_prepare would write; the fused path passes 1).
    scale: f32,
    cap: Option<f32>,
    /// G's dtype.
    out: DType,
    grad: bool,
    n: usize,
    v: usize,
    ld: usize,
    /// Capped logits, row-major with stride `ld` (padding poisoned).
    s: Vec<f32>,
    t: Vec<f32>,
    labels: Option<Vec<i64>>,
}

impl FusedCase {
    fn kernel(&self) -> String {
        // The launcher's choice (jsdx: JSD at an extreme β).
        let k = kernel_kind_tag(effective_kind(self.kind, self.beta), self.beta);
        format!("dk_div_fused_{k}_{}", self.out.name())
    }

    fn row<'a>(&self, x: &'a [f32], r: usize) -> &'a [f32] {
        &x[r * self.ld..r * self.ld + self.v]
    }
}

/// Rows of the case whose contents are special: (ignored, student all −inf, NaN).
const IGNORED_ROW: usize = 1;
const MASKED_ROW: usize = 2;
const NAN_ROW: usize = 3;

#[allow(clippy::too_many_arguments)]
fn make(
    rng: &mut Rng,
    kind: Kind,
    beta: f32,
    out: DType,
    cap: Option<f32>,
    grad: bool,
    n: usize,
    v: usize,
) -> FusedCase {
    let ld = v.next_multiple_of(8) + 8;
    let temperature = [0.7f32, 1.0, 2.0][rng.below(0, 3)];
    let (mut s, t) = fused_chunk::chunk_logits(rng, kind, cap, (n, v, ld), None);
    let mut labels = None;
    if n > NAN_ROW {
        let mut l: Vec<i64> = (0..n).map(|_| rng.below(0, 50_000) as i64).collect();
        l[IGNORED_ROW] = IGNORE;
        labels = Some(l);
        // A row without a student distribution (all −inf; under a softcap, all −cap: a
        // uniform one).
        let masked = cap.map_or(f32::NEG_INFINITY, |c| -c);
        s[MASKED_ROW * ld..MASKED_ROW * ld + v].fill(masked);
        let col = rng.below(0, v);
        s[NAN_ROW * ld + col] = f32::NAN;
    }
    FusedCase {
        what: format!(
            "{kind:?} beta {beta} T {temperature} out {} cap {cap:?} grad {grad} n {n} v {v}",
            out.name()
        ),
        kind,
        beta,
        temperature,
        scale: [1.0f32, 0.25][rng.below(0, 2)],
        cap,
        out,
        grad,
        n,
        v,
        ld,
        s,
        t,
        labels,
    }
}

fn cases(rng: &mut Rng) -> Vec<FusedCase> {
    use DType::{BF16, F16, F32};
    let mut out = Vec::new();
    let kinds = [
        (Kind::ForwardKl, 0.5),
        (Kind::ReverseKl, 0.5),
        (Kind::Jsd, 0.5),
        (Kind::Jsd, 0.25),
        (Kind::Jsd, 1e-3), // the jsdx kernels' series tails
    ];
    for (i, &(kind, beta)) in kinds.iter().enumerate() {
        for (j, &dtype) in [BF16, F16, F32].iter().enumerate() {
            let cap = [None, Some(30.0)][(i + j) % 2];
            // 9 .. 17 steps and a scalar tail of 1 .. 7 elements.
            let v = STEP * rng.below(9, 18) - rng.below(1, 8);
            out.push(make(rng, kind, beta, dtype, cap, true, 5, v));
        }
    }
    // A row shorter than one step (only thread 0's barrier-0 step and a tail), two rows.
    out.push(make(rng, Kind::Jsd, 0.5, BF16, Some(30.0), true, 2, 1003));
    out.push(make(rng, Kind::ReverseKl, 0.5, F16, None, true, 2, 13));
    // Rows of the scalar tail alone (no 16-byte step: only the tail's barrier orders its
    // stores, which land in other threads' elements).
    out.push(make(rng, Kind::Jsd, 0.25, BF16, None, true, 2, 7));
    // Forward only: S untouched.
    out.push(make(
        rng,
        Kind::Jsd,
        0.5,
        BF16,
        None,
        false,
        5,
        STEP * 3 + 5,
    ));
    out
}

fn input(c: &FusedCase, reverse: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(0x4644_4b44u32.to_ne_bytes());
    let name = c.kernel();
    b.extend((name.len() as u32).to_ne_bytes());
    b.extend(name.as_bytes());
    b.extend((reverse as i32).to_ne_bytes());
    for x in [c.n as i64, c.v as i64, c.ld as i64, IGNORE] {
        b.extend(x.to_ne_bytes());
    }
    let inv_cap = c.cap.map_or(0.0, |x| 1.0 / x);
    for x in [c.beta, 1.0 / c.temperature, c.scale, inv_cap] {
        b.extend(x.to_ne_bytes());
    }
    b.extend((c.grad as i32).to_ne_bytes());
    b.extend((c.labels.is_some() as i32).to_ne_bytes());
    let mut buf = |bytes: Vec<u8>| {
        b.extend((bytes.len() as u64).to_ne_bytes());
        b.extend(bytes);
    };
    buf(c.s.iter().flat_map(|x| x.to_ne_bytes()).collect());
    buf(c.t.iter().flat_map(|x| x.to_ne_bytes()).collect());
    if let Some(l) = &c.labels {
        buf(l.iter().flat_map(|x| x.to_ne_bytes()).collect());
    }
    buf(poison_bytes(DType::F32, c.n));
    b
}

/// Loss and G of row `r` from the definitions (f64): tests/common/fused_chunk.rs.
fn reference_row(c: &FusedCase, r: usize) -> (f64, Vec<f64>) {
    let p = fused_chunk::ChunkParams {
        kind: c.kind,
        beta: c.beta,
        temperature: c.temperature,
        scale: c.scale,
        cap: c.cap,
    };
    let ignored = c.labels.as_ref().is_some_and(|l| l[r] == IGNORE);
    fused_chunk::reference_row(&p, ignored, c.row(&c.s, r), c.row(&c.t, r))
}

fn check(c: &FusedCase, out: &[u8]) -> Result<(), String> {
    let (n, v, ld) = (c.n, c.v, c.ld);
    let (s_bytes, rest) = out.split_at(4 * n * ld);
    let (t_bytes, per_row_bytes) = rest.split_at(4 * n * ld);
    let per_row = decode(DType::F32, per_row_bytes);
    let t_in: Vec<u8> = c.t.iter().flat_map(|x| x.to_ne_bytes()).collect();
    if t_bytes != t_in.as_slice() {
        return Err("T was modified".into());
    }
    if !c.grad {
        let s_in: Vec<u8> = c.s.iter().flat_map(|x| x.to_ne_bytes()).collect();
        if s_bytes != s_in.as_slice() {
            return Err("forward only, but S was modified".into());
        }
    }
    let (mut losses, mut ref_losses, mut gs, mut ref_gs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..n {
        let (rl, rg) = reference_row(c, r);
        let g = decode(c.out, &s_bytes[r * 4 * ld..r * 4 * ld + v * c.out.size()]);
        let special =
            c.labels.is_some() && (r == IGNORED_ROW || (r == MASKED_ROW && c.cap.is_none()));
        if c.labels.is_some() && r == NAN_ROW {
            if !per_row[r].is_nan() || (c.grad && !g.iter().all(|x| x.is_nan())) {
                return Err(format!("row {r} (a NaN logit): loss and G must be NaN"));
            }
            continue;
        }
        if special {
            if per_row[r] != 0.0 || (c.grad && g.iter().any(|&x| x != 0.0)) {
                return Err(format!(
                    "row {r} (ignored or without a distribution): loss {} and G must be 0",
                    per_row[r]
                ));
            }
            continue;
        }
        losses.push(per_row[r]);
        ref_losses.push(rl);
        if c.grad {
            gs.extend(g);
            // G is stored in its dtype: the reference rounded the same way (f16 G of a long
            // row is largely subnormal, 1e-2 off before any kernel error).
            ref_gs.extend(rg.iter().map(|&x| round_to(c.out, x)));
        }
    }
    // The tolerances of tests/common/fused_chunk.rs (why the loss floor: there).
    let loss_err = rel_err(&losses, &ref_losses, fused_chunk::LOSS_FLOOR);
    if loss_err > fused_chunk::LOSS_TOL {
        return Err(format!("per-row losses: rel norm error {loss_err:e}"));
    }
    let g_err = rel_err(&gs, &ref_gs, 1e-30);
    let g_tol = fused_chunk::g_tol(c.out);
    if g_err > g_tol {
        return Err(format!("G: rel norm error {g_err:e} (tolerance {g_tol:e})"));
    }
    Ok(())
}

#[test]
fn fused_chunk_kernels_write_g_over_the_student_logits() {
    let Some(exe) = simulator() else { return };
    let mut rng = Rng::fresh(TEST);
    let cases = cases(&mut rng);
    run_cases_parallel(TEST, cases.len(), |i| {
        let c = &cases[i];
        let what = format!("{}: {}", c.kernel(), c.what);
        let expect = 4 * (2 * c.n * c.ld + c.n);
        let run = |reverse| run_emulator(&exe, input(c, reverse), expect);
        let result = (|| {
            let (fwd, log) = run(false)?;
            let (rev, _) = run(true)?;
            if fwd != rev {
                let at = fwd.iter().zip(&rev).position(|(a, b)| a != b).unwrap();
                return Err(format!(
                    "ascending and descending thread orders differ (first at byte {at}): a \
                     store overtook a load"
                ));
            }
            check(c, &fwd)?;
            Ok(log)
        })();
        (what, result)
    });
}
