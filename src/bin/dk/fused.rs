//! `dk bench --ops fused` (or `dk bench fused`): the fused linear divergence (JSD, β from
//! `--beta`, batchmean) from hidden states and an lm_head, forward + backward (loss, per-token
//! loss, grad of the hidden states, grad of the weight), on the runner's backend.
//!
//! Shapes: on CUDA the two of issue 4 (Phi-4-mini: N 4096, H 3072, V 200064; Llama 4 Scout:
//! N 16384, H 5120, V 202048), in self-distillation form (the teacher's weight is the student's;
//! its hidden states are `0.9 · student + noise`); on the CPU a small one (the CPU backend is the
//! f64 reference: its time says nothing about the GPU).
//!
//! The floor, on CUDA, is the four matrix products the operation needs (student and teacher
//! logits, grad of the hidden states, grad of the weight) run alone by cuBLAS with the
//! operation's settings in the same run (`Context::fused_linear_reference_gemms`); each row
//! reports its time over that floor (issue 4 asks ≤ 1.25×).
//!
//! Checks against an f64 computation written here (independent of the library): the per-token
//! loss and the grad of the hidden states on `check_rows` sampled rows, the reduced loss against
//! the per-token losses, and on the CPU shape every row and the grad of the weight too. Every
//! output is poisoned before the checked run; a second run must give the same bits.

use distill_kernels::divergence::{Kind, Params, Reduction};
use distill_kernels::fused::{FusedLinear, FusedLinearParams, ReferenceGemms};
use distill_kernels::{DType, Matrix, MatrixMut, VectorMut};

use crate::backend::{measure, median, Buf, Runner};
use crate::bench::{json_num, json_opt, json_str, sci, Progress};
use crate::data::{
    count_nonfinite, err_string, f32s, fill_normal, fill_rows, mix, sample_rows, widen,
};

/// The shapes `dk bench` runs the fused linear divergence on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedShape {
    /// Phi-4-mini head: N 4096, H 3072, V 200064.
    Phi4,
    /// Llama 4 Scout head: N 16384, H 5120, V 202048.
    Scout,
    /// CPU: N 40, H 64, V 3001.
    Small,
}

pub const CUDA_FUSED_SHAPES: [FusedShape; 2] = [FusedShape::Phi4, FusedShape::Scout];
pub const CPU_FUSED_SHAPES: [FusedShape; 1] = [FusedShape::Small];

impl FusedShape {
    pub fn name(self) -> &'static str {
        match self {
            FusedShape::Phi4 => "phi4-mini",
            FusedShape::Scout => "scout",
            FusedShape::Small => "small",
        }
    }

    /// (N, H, V).
    fn dims(self) -> (usize, usize, usize) {
        match self {
            FusedShape::Phi4 => (4096, 3072, 200064),
            FusedShape::Scout => (16384, 5120, 202048),
            FusedShape::Small => (40, 64, 3001),
        }
    }
}

/// What `dk bench` asks of this section.
pub struct FusedConfig<'a> {
    pub shapes: &'a [FusedShape],
    pub dtypes: &'a [DType],
    pub iters: usize,
    pub check_rows: usize,
    pub seed: u64,
    pub beta: f32,
}

/// One result row.
pub struct FusedRow {
    shape: FusedShape,
    dtype: DType,
    median_s: f64,
    /// CUDA: the four GEMMs alone, median, with f32 logits (what the operation computes).
    gemm_s: Option<f64>,
    /// CUDA: the same four GEMMs with logits in the operands' dtype (`torch.matmul`'s: the
    /// baseline ANCHORS.md timed), median.
    gemm16_s: Option<f64>,
    workspace: usize,
    loss: Option<f64>,
    checks: Vec<(&'static str, f64, f64)>,
    same: Option<bool>,
    problems: Vec<String>,
    error: Option<String>,
    pub ok: bool,
}

impl FusedRow {
    fn finish(&mut self) {
        self.ok = self.error.is_none()
            && self.problems.is_empty()
            && self.checks.iter().all(|c| c.1 <= c.2)
            && self.same != Some(false);
    }
}

/// The dtypes this backend runs: the CUDA path takes bf16 / f16 operands.
fn dtypes_for(cfg: &FusedConfig<'_>, cuda: bool) -> Vec<DType> {
    cfg.dtypes
        .iter()
        .copied()
        .filter(|&d| !(cuda && d == DType::F32))
        .collect()
}

pub fn count(cfg: &FusedConfig<'_>, cuda: bool) -> usize {
    cfg.shapes.len() * dtypes_for(cfg, cuda).len()
}

pub fn print_header(cfg: &FusedConfig<'_>, cuda: bool) {
    outln!(
        "fused linear divergence: JSD beta {}, batchmean, forward + backward (loss, per-token, grad hidden, grad weight); median of {} timed run(s) after a checked one",
        cfg.beta,
        cfg.iters
    );
    for &s in cfg.shapes {
        let (n, h, v) = s.dims();
        outln!(
            "  {:<10} N {n}, H {h}, V {v}, teacher weight = student weight",
            s.name()
        );
    }
    if cuda && cfg.dtypes.contains(&DType::F32) {
        outln!("  (f32 skipped: the CUDA path takes bf16 / f16 hidden states and weights; f32 runs on the CPU backend)");
    }
    if cuda {
        outln!(
            "x GEMMs = time / the four cuBLAS GEMMs alone (student and teacher logits in f32, grad hidden, grad weight), measured in this run; the target is <= 1.25"
        );
        outln!(
            "x GEMMs16 = time / the same four GEMMs with logits in the operands' dtype (torch.matmul's outputs, as ANCHORS.md timed them); the logits' gradient is random data"
        );
    }
    outln!(
        "checks vs an f64 computation: per-token loss (rel, tol 1e-4) and grad hidden (||g - r|| / ||r||, tol 1e-2 bf16/f16, 1e-5 f32) on sampled rows; on the CPU shape all rows and grad weight"
    );
    if cuda {
        outln!(
            "grad weight on CUDA (whole matrix, gw err column): <grad_hidden, hidden> = <grad_weight, weight> (both are sum G * (hidden W^T)), rel to the sums of |terms|, tol 1e-3; and its column sums over V, 0 since every row of G sums to 0 (rel to sum |gw|, tol 2e-3)"
        );
    }
    outln!();
    outln!("{}", header(cuda));
}

fn header(cuda: bool) -> String {
    format!(
        "shape       dtype  time ms  {}  workspace    loss      tok err   gh err    gw err    same  check",
        if cuda {
            "GEMMs ms  x GEMMs  x GEMMs16"
        } else {
            "                            "
        }
    )
}

fn format_row(r: &FusedRow, cuda: bool) -> String {
    let get = |w: &str| r.checks.iter().find(|c| c.0 == w).map(|c| c.1);
    let ratio_to = |g: Option<f64>| g.map_or("-".into(), |g| format!("{:.2}x", r.median_s / g));
    let (time, gemm, ratio, ratio16) = match (r.error.is_some(), r.gemm_s) {
        (true, _) => ("-".into(), "-".into(), "-".into(), "-".into()),
        (false, Some(g)) => (
            format!("{:.3}", r.median_s * 1e3),
            format!("{:.3}", g * 1e3),
            ratio_to(Some(g)),
            ratio_to(r.gemm16_s),
        ),
        (false, None) => (
            format!("{:.3}", r.median_s * 1e3),
            if cuda { "-".into() } else { String::new() },
            String::new(),
            String::new(),
        ),
    };
    let status = match (&r.error, r.ok) {
        (Some(e), _) => format!("ERROR {e}"),
        (None, true) => "ok".into(),
        (None, false) => {
            // The problems, then each check over its tolerance (NaN included).
            let over = r
                .checks
                .iter()
                .filter(|c| c.1.is_nan() || c.1 > c.2)
                .map(|c| format!("{} {} > {}", c.0, sci(Some(c.1)), c.2));
            let all: Vec<String> = r.problems.iter().cloned().chain(over).collect();
            format!("FAIL {}", all.join("; "))
        }
    };
    format!(
        "{:<11} {:<6} {time:>7}  {gemm:>8}  {ratio:>7}  {ratio16:>9}  {:>7.2} GiB  {:>8}  {:>8}  {:>8}  {:>8}  {:>4}  {status}",
        r.shape.name(),
        r.dtype.name(),
        r.workspace as f64 / (1u64 << 30) as f64,
        r.loss.map_or("-".into(), |l| format!("{l:.5}")),
        sci(get("per-token")),
        sci(get("grad hidden")),
        sci(get("grad weight").or(get("grad weight identity"))),
        match r.same {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        }
    )
}

/// Device bytes a CUDA row needs at most: hidden states of both sides and the weight, the two
/// gradients, the operation's workspace (chunk logits ≤ 1.5 GiB and cuBLAS's), the GEMM floor's
/// f32 logits and logit gradient, the 256 MiB buffer the timing reads to evict L2, and 1 GiB slack.
fn device_bytes(shape: FusedShape, dtype: DType) -> usize {
    let (n, h, v) = shape.dims();
    let es = dtype.size();
    (3 * n * h + 2 * v * h) * es + n * v * (4 + es) + (3 << 29) + (1 << 30) + (1 << 28)
}

/// Host inputs: hidden states of both sides and the shared weight, in the dtype.
struct Host {
    hs: Vec<u8>,
    ht: Vec<u8>,
    w: Vec<u8>,
}

/// One row's f64 reference: (JSD(β) loss, dL/d(student logits) of the batchmean over `n`
/// rows), from the benchmark's own reference row (not the library's), with β = 0 taken as
/// forward KL and β = 1 as reverse KL (the literal mixture formula would give 0 there).
fn ref_row(beta: f64, n: usize, s: &[f64], t: &[f64]) -> (f64, Vec<f64>) {
    let kind = Params {
        kind: Kind::Jsd,
        beta: beta as f32,
        ..Params::default()
    }
    .effective_kind();
    let mut g = vec![0.0; s.len()];
    let loss = crate::reference::divergence_row(kind, beta, s, t, &mut g);
    g.iter_mut().for_each(|x| *x /= n as f64);
    (loss, g)
}

/// Logits of row `r` of `hidden` against every weight row, f64.
fn logits_row(dtype: DType, hidden: &[u8], w: &[u8], h: usize, r: usize) -> Vec<f64> {
    let es = dtype.size();
    let x = widen(dtype, &hidden[r * h * es..(r + 1) * h * es]);
    w.chunks_exact(h * es)
        .map(|row| widen(dtype, row).iter().zip(&x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rel(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    if num.is_nan() {
        f64::NAN
    } else {
        (num / den.max(1e-300)).sqrt()
    }
}

/// Runs every configured shape × dtype, printing each row as it completes.
pub fn run(
    runner: &Runner,
    cfg: &FusedConfig<'_>,
    progress: &mut Progress,
    done: &mut usize,
    total: usize,
) -> Vec<FusedRow> {
    let cuda = runner.is_cuda();
    let mut out = Vec::new();
    for dtype in dtypes_for(cfg, cuda) {
        for &shape in cfg.shapes {
            *done += 1;
            // A shape the card cannot hold is left out with a note, not failed: the default
            // `dk bench` on a smaller GPU still passes.
            if let (true, Some(free)) = (cuda, runner.free_memory()) {
                let need = device_bytes(shape, dtype);
                if need > free {
                    progress.clear();
                    outln!(
                        "{:<11} {:<6} skipped: needs about {:.1} GiB of device memory, {:.1} GiB are free",
                        shape.name(),
                        dtype.name(),
                        need as f64 / (1u64 << 30) as f64,
                        free as f64 / (1u64 << 30) as f64
                    );
                    continue;
                }
            }
            progress.show(&format!(
                "[{done}/{total}] fused {} {} ...",
                shape.name(),
                dtype.name()
            ));
            let mut row = FusedRow {
                shape,
                dtype,
                median_s: f64::NAN,
                gemm_s: None,
                gemm16_s: None,
                workspace: 0,
                loss: None,
                checks: Vec::new(),
                same: None,
                problems: Vec::new(),
                error: None,
                ok: false,
            };
            if let Err(e) = run_row(runner, cfg, &mut row, progress) {
                row.error = Some(e);
            }
            row.finish();
            progress.clear();
            outln!("{}", format_row(&row, cuda));
            out.push(row);
        }
    }
    out
}

fn run_row(
    runner: &Runner,
    cfg: &FusedConfig<'_>,
    row: &mut FusedRow,
    progress: &mut Progress,
) -> Result<(), String> {
    let (n, h, v) = row.shape.dims();
    let dtype = row.dtype;
    let es = dtype.size();
    let cuda = runner.is_cuda();
    let seed = mix(&[cfg.seed, 0xF05E, row.shape as u64, dtype as u64]);
    // Hidden states: student ~ N(0, 3²) per feature, teacher = 0.9 · student + noise (as the
    // divergence rows); weight ~ N(0, 1/H): logits of standard deviation ≈ 3.
    let mut host = Host {
        hs: vec![0u8; n * h * es],
        ht: vec![0u8; n * h * es],
        w: vec![0u8; v * h * es],
    };
    fill_rows(seed, dtype, h, 0, &mut host.hs, &mut host.ht);
    fill_normal(seed ^ 0x57, dtype, h, 1.0 / (h as f64).sqrt(), &mut host.w);
    let up = |data: &[u8]| -> Result<Buf, String> {
        let mut b = runner.alloc(data.len())?;
        runner.upload(&mut b, data)?;
        Ok(b)
    };
    let (mut hs, mut ht, mut w) = (up(&host.hs)?, up(&host.ht)?, up(&host.w)?);
    let mut per_token = runner.alloc(4 * n)?;
    let mut loss = runner.alloc(4)?;
    let mut gh = runner.alloc(n * h * es)?;
    let mut gw = runner.alloc(v * h * es)?;
    let (hs_p, ht_p, w_p) = (
        runner.addr(&mut hs),
        runner.addr(&mut ht),
        runner.addr(&mut w),
    );
    let (pt_p, loss_p) = (runner.addr(&mut per_token), runner.addr(&mut loss));
    let (gh_p, gw_p) = (runner.addr(&mut gh), runner.addr(&mut gw));
    let loc = runner.location();
    let params = FusedLinearParams {
        divergence: Params {
            kind: Kind::Jsd,
            beta: cfg.beta,
            reduction: Reduction::BatchMean,
            ..Params::default()
        },
        ..FusedLinearParams::default()
    };
    // SAFETY: every pointer is a live buffer of the runner's backend of the size the view
    // describes (allocated above); outputs are distinct from inputs and from each other.
    let call = || unsafe {
        FusedLinear {
            num_items: None,
            student_hidden: Matrix::from_raw(hs_p, dtype, n, h, h, loc),
            student_weight: Matrix::from_raw(w_p, dtype, v, h, h, loc),
            teacher_hidden: Matrix::from_raw(ht_p, dtype, n, h, h, loc),
            teacher_weight: Matrix::from_raw(w_p, dtype, v, h, h, loc),
            labels: None,
            per_token: Some(VectorMut::from_raw(pt_p.cast::<f32>(), n, loc)),
            loss: Some(VectorMut::from_raw(loss_p.cast::<f32>(), 1, loc)),
            grad_hidden: Some(MatrixMut::from_raw(gh_p, dtype, n, h, h, loc)),
            grad_weight: Some(MatrixMut::from_raw(gw_p, dtype, v, h, h, loc)),
        }
    };
    let ctx = runner.context();
    row.workspace = ctx
        .fused_linear_workspace_size(&call(), &params)
        .map_err(err_string)?;
    let mut ws = runner.alloc(row.workspace.max(1))?;
    let ws_p = runner.addr(&mut ws);
    let ws_len = row.workspace;
    let op = || -> Result<(), String> {
        let launch = runner.launch((ws_len > 0).then_some((ws_p, ws_len)));
        ctx.fused_linear_divergence(call(), &params, &launch)
            .map_err(err_string)
    };
    let m = measure(
        runner,
        &[&op],
        &mut [&mut per_token, &mut loss, &mut gh, &mut gw],
        cfg.iters,
    )?;
    row.median_s = median(&m.part_times[0]);
    row.same = Some(m.same);

    if cuda {
        // The floor: the four GEMMs alone, at full N, in this run.
        progress.show(&format!(
            "fused {} {}: the four GEMMs alone ...",
            row.shape.name(),
            dtype.name()
        ));
        let mut logits = runner.alloc(4 * n * v)?;
        let mut g = runner.alloc(n * v * es)?;
        // Random values (a 64 MiB pattern repeated), as ANCHORS.md's baseline had: a card under
        // its power limit clocks by how many bits toggle, so a constant operand would flatter it.
        let mut pattern = vec![0u8; ((64 << 20) / (v * es)).max(1) * (v * es)];
        fill_normal(seed ^ 0x6E, dtype, v, 1e-5, &mut pattern);
        runner.upload_tiled(&mut g, &pattern)?;
        let (l_p, g_p) = (runner.addr(&mut logits), runner.addr(&mut g));
        // The four products with logits in `logits_dtype` (f32 as the operation, or the
        // operands' dtype as torch.matmul's); the f32 buffer holds either.
        let gemms = |logits_dtype: DType| {
            move || -> Result<(), String> {
                // SAFETY: live device buffers of the described sizes (above).
                let r = unsafe {
                    ReferenceGemms {
                        hidden: Matrix::from_raw(hs_p, dtype, n, h, h, loc),
                        weight: Matrix::from_raw(w_p, dtype, v, h, h, loc),
                        logits: MatrixMut::from_raw(l_p, logits_dtype, n, v, v, loc),
                        grad_logits: Matrix::from_raw(g_p, dtype, n, v, v, loc),
                        grad_hidden: MatrixMut::from_raw(gh_p, dtype, n, h, h, loc),
                        grad_weight: MatrixMut::from_raw(gw_p, dtype, v, h, h, loc),
                    }
                };
                ctx.fused_linear_reference_gemms(&r, &runner.launch(None))
                    .map_err(err_string)
            }
        };
        let (f32_logits, own_logits) = (gemms(DType::F32), gemms(dtype));
        let t = runner.time_parts(cfg.iters, &[&f32_logits])?;
        row.gemm_s = Some(median(&t.parts[0]));
        // The second baseline is informative: its failure is noted, not the row's.
        match runner.time_parts(cfg.iters, &[&own_logits]) {
            Ok(t) => row.gemm16_s = Some(median(&t.parts[0])),
            Err(e) => outln!(
                "note: fused {} {}: the GEMMs with {} logits failed: {e}",
                row.shape.name(),
                dtype.name(),
                dtype.name()
            ),
        }
    }

    // Checks.
    let tok = f32s(&m.first[0]);
    let l = f32s(&m.first[1])[0] as f64;
    row.loss = Some(l);
    for (what, bytes, dt) in [
        ("grad hidden", &m.first[2], dtype),
        ("grad weight", &m.first[3], dtype),
    ] {
        let bad = count_nonfinite(dt, bytes);
        if bad > 0 {
            row.problems
                .push(format!("{bad} {what} elements not finite"));
        }
    }
    if tok.iter().any(|x| !x.is_finite()) {
        row.problems.push("per-token losses not finite".into());
    }
    let mean: f64 = tok.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    if (mean - l).abs() > 1e-4 * mean.abs().max(1e-30) {
        row.problems
            .push(format!("loss {l} != mean of per-token {mean}"));
    }
    let all = !cuda;
    let rows = if all {
        (0..n).collect()
    } else {
        sample_rows(n, cfg.check_rows, seed ^ 0xC4)
    };
    progress.show(&format!(
        "fused {} {}: f64 check of {} rows ...",
        row.shape.name(),
        dtype.name(),
        rows.len()
    ));
    let beta = cfg.beta as f64;
    let refs: Vec<(f64, Vec<f64>, Vec<f64>)> = crate::attention::par_map(&rows, |&r| {
        let s = logits_row(dtype, &host.hs, &host.w, h, r);
        let t = logits_row(dtype, &host.ht, &host.w, h, r);
        let (loss, g) = ref_row(beta, n, &s, &t);
        // grad hidden row = Σ_v g_v W[v, :]
        let mut gh_row = vec![0.0; h];
        for (gv, wrow) in g.iter().zip(host.w.chunks_exact(h * es)) {
            for (acc, x) in gh_row.iter_mut().zip(widen(dtype, wrow)) {
                *acc += gv * x;
            }
        }
        (loss, gh_row, if all { g } else { Vec::new() })
    });
    let mut tok_err = 0.0f64;
    let (mut got_gh, mut want_gh) = (Vec::new(), Vec::new());
    let gh_host = &m.first[2];
    for (&r, (rl, rg, _)) in rows.iter().zip(&refs) {
        let e = (tok[r] as f64 - rl).abs() / rl.abs().max(1e-6);
        tok_err = if e.is_nan() { f64::NAN } else { tok_err.max(e) };
        got_gh.extend(widen(dtype, &gh_host[r * h * es..(r + 1) * h * es]));
        want_gh.extend_from_slice(rg);
    }
    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    row.checks.push(("per-token", tok_err, 1e-4));
    row.checks
        .push(("grad hidden", rel(&got_gh, &want_gh), tol));
    if all {
        // grad weight = Gᵀ · hidden, G the [N, V] logit gradients of every row.
        let mut want = vec![0.0; v * h];
        for (r, (_, _, g)) in refs.iter().enumerate() {
            let x = widen(dtype, &host.hs[r * h * es..(r + 1) * h * es]);
            for (vi, gv) in g.iter().enumerate() {
                for (acc, xv) in want[vi * h..(vi + 1) * h].iter_mut().zip(&x) {
                    *acc += gv * xv;
                }
            }
        }
        row.checks
            .push(("grad weight", rel(&widen(dtype, &m.first[3]), &want), tol));
    }
    // The whole grad weight on every backend (no f64 reference of it on CUDA: that is a full
    // [N, V] · [N, H] product on the host).
    let (identity, columns) =
        grad_weight_consistency(dtype, h, (&m.first[2], &host.hs), (&m.first[3], &host.w));
    // Measured on the CPU shape (V 3001, bf16): 1.5e-5 and 3.1e-4 (the rounding of grad weight
    // to bf16, whose share shrinks as 1 / √V).
    row.checks.push(("grad weight identity", identity, 1e-3));
    row.checks.push(("grad weight column sums", columns, 2e-3));
    Ok(())
}

/// Two whole-matrix checks of the weight gradient that need no f64 product: with G the logits'
/// gradient, `<grad_hidden, hidden> = <grad_weight, weight>` (both are `Σ G ∘ (hidden · Wᵀ)`),
/// relative to the mean of the two sums of |terms|; and the column sums `Σ_v grad_weight[v, h]`
/// are 0 (every row of G sums to 0: the loss depends on a row's logits only through its
/// softmax), the largest relative to `Σ_v |grad_weight[v, h]|`. Returns both errors.
fn grad_weight_consistency(
    dtype: DType,
    h: usize,
    (gh, hs): (&[u8], &[u8]),
    (gw, w): (&[u8], &[u8]),
) -> (f64, f64) {
    let rb = h * dtype.size();
    // (Σ a·b, Σ |a·b|) over rows, in f64, a few rows per task.
    let dot = |a: &[u8], b: &[u8]| -> (f64, f64) {
        let rows: Vec<usize> = (0..a.len() / rb).step_by(64).collect();
        crate::attention::par_map(&rows, |&r0| {
            let (mut s, mut abs) = (0.0, 0.0);
            for r in r0..(r0 + 64).min(a.len() / rb) {
                let (x, y) = (
                    widen(dtype, &a[r * rb..(r + 1) * rb]),
                    widen(dtype, &b[r * rb..(r + 1) * rb]),
                );
                for (p, q) in x.iter().zip(&y) {
                    s += p * q;
                    abs += (p * q).abs();
                }
            }
            (s, abs)
        })
        .into_iter()
        .fold((0.0, 0.0), |acc, x| (acc.0 + x.0, acc.1 + x.1))
    };
    let (a, abs_a) = dot(gh, hs);
    let (b, abs_b) = dot(gw, w);
    let identity = (a - b).abs() / ((abs_a + abs_b) / 2.0).max(f64::MIN_POSITIVE);
    // Column sums: per block of rows, then added in block order.
    let rows: Vec<usize> = (0..gw.len() / rb).step_by(256).collect();
    let parts = crate::attention::par_map(&rows, |&r0| {
        let (mut sum, mut abs) = (vec![0.0; h], vec![0.0; h]);
        for r in r0..(r0 + 256).min(gw.len() / rb) {
            for (j, x) in widen(dtype, &gw[r * rb..(r + 1) * rb])
                .into_iter()
                .enumerate()
            {
                sum[j] += x;
                abs[j] += x.abs();
            }
        }
        (sum, abs)
    });
    let (mut sum, mut abs) = (vec![0.0; h], vec![0.0; h]);
    for (s, a) in parts {
        for j in 0..h {
            sum[j] += s[j];
            abs[j] += a[j];
        }
    }
    let columns = sum
        .iter()
        .zip(&abs)
        .map(|(s, a)| s.abs() / a.max(f64::MIN_POSITIVE))
        .fold(0.0, |m: f64, e| {
            if m.is_nan() || e.is_nan() {
                f64::NAN
            } else {
                m.max(e)
            }
        });
    (identity, columns)
}

pub fn to_json(rows: &[FusedRow]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            let (n, h, v) = r.shape.dims();
            let checks: Vec<String> = r
                .checks
                .iter()
                .map(|c| format!("{{\"what\": {}, \"err\": {}, \"tol\": {}}}", json_str(c.0), json_num(c.1), json_num(c.2)))
                .collect();
            let ok_time = r.error.is_none() && !r.median_s.is_nan();
            format!(
                "    {{\"shape\": {}, \"n\": {n}, \"h\": {h}, \"v\": {v}, \"dtype\": {}, \"kind\": \"jsd\", \"ms\": {}, \"gemms_ms\": {}, \"x_gemms\": {}, \"gemms16_ms\": {}, \"x_gemms16\": {}, \"workspace_bytes\": {}, \"loss\": {}, \"checks\": [{}], \"same_bits\": {}, \"ok\": {}, \"error\": {}}}",
                json_str(r.shape.name()),
                json_str(r.dtype.name()),
                json_opt(ok_time.then_some(r.median_s * 1e3)),
                json_opt(r.gemm_s.map(|g| g * 1e3)),
                json_opt(r.gemm_s.filter(|_| ok_time).map(|g| r.median_s / g)),
                json_opt(r.gemm16_s.map(|g| g * 1e3)),
                json_opt(r.gemm16_s.filter(|_| ok_time).map(|g| r.median_s / g)),
                r.workspace,
                json_opt(r.loss),
                checks.join(", "),
                r.same.map_or("null".into(), |s| s.to_string()),
                r.ok,
                r.error.as_deref().map_or("null".into(), json_str),
            )
        })
        .collect();
    if items.is_empty() {
        "[]".into()
    } else {
        format!("[\n{}\n  ]", items.join(",\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_gradient_matches_finite_differences() {
        let s = [0.3, -1.2, 2.0, 0.1, -0.5];
        let t = [1.0, 0.2, -0.7, 0.4, 0.0];
        for beta in [0.0, 0.3, 1.0] {
            let (_, g) = ref_row(beta, 2, &s, &t);
            for j in 0..s.len() {
                let (mut a, mut b) = (s, s);
                a[j] += 1e-6;
                b[j] -= 1e-6;
                let fd = (ref_row(beta, 2, &a, &t).0 - ref_row(beta, 2, &b, &t).0) / 2e-6;
                // the loss is one row's; the gradient that of the mean over n = 2 rows
                assert!(
                    (fd / 2.0 - g[j]).abs() < 1e-7,
                    "β {beta}, entry {j}: {fd} vs {}",
                    g[j]
                );
            }
        }
    }

    #[test]
    fn reference_takes_beta_0_and_1_as_the_kl_kinds() {
        let s = [0.3, -1.2, 2.0, 0.1, -0.5];
        let t = [1.0, 0.2, -0.7, 0.4, 0.0];
        let log_softmax = |x: &[f64]| {
            let z = x.iter().map(|v| v.exp()).sum::<f64>().ln();
            x.iter().map(|v| v - z).collect::<Vec<f64>>()
        };
        let (lq, lp) = (log_softmax(&s), log_softmax(&t));
        let kl =
            |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x.exp() * (x - y)).sum() };
        assert!((ref_row(0.0, 1, &s, &t).0 - kl(&lp, &lq)).abs() < 1e-12); // forward: KL(p‖q)
        assert!((ref_row(1.0, 1, &s, &t).0 - kl(&lq, &lp)).abs() < 1e-12); // reverse: KL(q‖p)
    }

    #[test]
    fn grad_weight_consistency_holds_for_true_gradients_and_catches_wrong_ones() {
        let (n, v, h) = (5, 7, 3);
        let x = |i: usize, k: f64| ((i as f64 + 1.0) * k).sin();
        let hs: Vec<f64> = (0..n * h).map(|i| x(i, 0.7)).collect();
        let w: Vec<f64> = (0..v * h).map(|i| x(i, 1.3)).collect();
        // G with rows summing to 0, as a softmax loss's gradient.
        let mut g: Vec<f64> = (0..n * v).map(|i| x(i, 2.1)).collect();
        for row in g.chunks_mut(v) {
            let mean = row.iter().sum::<f64>() / v as f64;
            row.iter_mut().for_each(|e| *e -= mean);
        }
        let mut gh = vec![0.0; n * h];
        let mut gw = vec![0.0; v * h];
        for t in 0..n {
            for j in 0..v {
                for c in 0..h {
                    gh[t * h + c] += g[t * v + j] * w[j * h + c];
                    gw[j * h + c] += g[t * v + j] * hs[t * h + c];
                }
            }
        }
        let f32s = |a: &[f64]| {
            a.iter()
                .flat_map(|&e| (e as f32).to_le_bytes())
                .collect::<Vec<u8>>()
        };
        let check = |gh: &[f64], gw: &[f64]| {
            grad_weight_consistency(
                DType::F32,
                h,
                (&f32s(gh), &f32s(&hs)),
                (&f32s(gw), &f32s(&w)),
            )
        };
        let (identity, columns) = check(&gh, &gw);
        assert!(identity < 1e-6 && columns < 1e-6, "{identity} {columns}");
        // A token's contribution missing from grad weight breaks the identity only.
        let mut partial = vec![0.0; v * h];
        for t in 1..n {
            for j in 0..v {
                for c in 0..h {
                    partial[j * h + c] += g[t * v + j] * hs[t * h + c];
                }
            }
        }
        assert!(check(&gh, &partial).0 > 1e-2);
        // A vocabulary row doubled breaks both; a NaN is reported as NaN.
        let mut doubled = gw.clone();
        doubled[2 * h..3 * h].iter_mut().for_each(|e| *e *= 2.0);
        let (i2, c2) = check(&gh, &doubled);
        assert!(i2 > 1e-2 && c2 > 1e-2, "{i2} {c2}");
        let mut nan = gw.clone();
        nan[4] = f64::NAN;
        let (i3, c3) = check(&gh, &nan);
        assert!(i3.is_nan() && c3.is_nan());
    }
}
