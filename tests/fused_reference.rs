//! The fused linear divergence against an INDEPENDENT f64 reference written from the math here
//! (plain matmul, logit scale, softcap, the test-side naive divergence of `common::naive_row`,
//! and the gradients by the explicit chain rule), on the CPU and — when present — on CUDA device
//! 0 (a visible SKIPPED line otherwise).
//!
//! Covers every kind (JSD β ∈ {0, 0.25, 0.5, 1}), temperature, labels with ignore_index, every
//! reduction, num_items, softcap, logit_scale, chunk sizes that do not divide N (1, 3, N, auto),
//! self-distillation (the teacher weight is the student weight's pointer), accumulation into the
//! gradient buffers, gradient dtypes (input or f32), inputs f32 / bf16 / f16, padded strides,
//! forward-only and partial outputs, central finite differences, and determinism. Outputs are
//! poisoned before each run and every element must be written; inputs and padding untouched.

mod common;

use std::ffi::c_void;

use common::*;
use cudarc::driver::{CudaSlice, DevicePtr};
use distill_kernels::divergence::{Kind, Params, Reduction};
use distill_kernels::fused::{FusedLinear, FusedLinearParams};
use distill_kernels::{
    Context, DType, Error, ErrorKind, Launch, Location, Matrix, MatrixMut, Vector, VectorMut,
};

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

/// A matrix of values exactly representable in the case's dtype, laid out with `stride`.
#[derive(Debug, Clone)]
struct Mat {
    rows: usize,
    cols: usize,
    stride: usize,
    vals: Vec<f64>,
}

impl Mat {
    fn random(rng: &mut Rng, dtype: DType, rows: usize, cols: usize, std: f64) -> Mat {
        let vals = (0..rows * cols)
            .map(|_| round_to(dtype, std * rng.normal()))
            .collect();
        Mat {
            rows,
            cols,
            stride: cols,
            vals,
        }
    }
    fn row(&self, r: usize) -> &[f64] {
        &self.vals[r * self.cols..(r + 1) * self.cols]
    }
    /// Encoded with NaN padding between rows.
    fn encode(&self, dtype: DType) -> Bytes {
        let mut all = vec![f64::NAN; (self.rows * self.stride).max(1)];
        for r in 0..self.rows {
            all[r * self.stride..r * self.stride + self.cols].copy_from_slice(self.row(r));
        }
        Bytes::from_slice(&encode(dtype, &all))
    }
}

/// A gradient output: its dtype, stride, and (with accumulate) the buffer's previous contents.
#[derive(Debug, Clone)]
struct GradOut {
    dtype: DType,
    stride: usize,
    prev: Option<Vec<f64>>,
}

#[derive(Debug, Clone)]
struct FCase {
    dtype: DType,
    sh: Mat,
    sw: Mat,
    th: Mat,
    tw: Mat,
    /// The teacher weight is the student weight's buffer (needs Ht = H).
    self_distill: bool,
    labels: Option<Vec<i64>>,
    params: FusedLinearParams,
    per_token: bool,
    loss: bool,
    gh: Option<GradOut>,
    gw: Option<GradOut>,
    /// `num_items` held in memory (the call's `num_items` view), `None` = absent.
    num_items_mem: Option<f32>,
    what: String,
}

impl FCase {
    /// Random inputs (logits of order a few units), every output requested, gradients in the
    /// input dtype.
    #[allow(clippy::too_many_arguments)]
    fn random(
        rng: &mut Rng,
        dtype: DType,
        n: usize,
        v: usize,
        h: usize,
        ht: usize,
        params: FusedLinearParams,
    ) -> FCase {
        let s = rng.range(1.0, 2.5);
        let t = rng.range(1.0, 2.5);
        let sh = Mat::random(rng, dtype, n, h, 1.0);
        let sw = Mat::random(rng, dtype, v, h, s / (h as f64).sqrt());
        let th = Mat::random(rng, dtype, n, ht, 1.0);
        let tw = Mat::random(rng, dtype, v, ht, t / (ht as f64).sqrt());
        let p = &params.divergence;
        let what = format!(
            "{} beta={} T={} {} num_items={:?} scale={} softcap={:?} chunk={:?} acc={} N={n} V={v} H={h} Ht={ht} {}",
            p.kind.name(),
            p.beta,
            p.temperature,
            p.reduction.name(),
            p.num_items,
            params.logit_scale,
            params.softcap,
            params.chunk_rows,
            params.accumulate,
            dtype.name()
        );
        FCase {
            dtype,
            sh,
            sw,
            th,
            tw,
            self_distill: false,
            labels: None,
            params,
            per_token: true,
            loss: true,
            gh: Some(GradOut {
                dtype,
                stride: h,
                prev: None,
            }),
            gw: Some(GradOut {
                dtype,
                stride: h,
                prev: None,
            }),
            num_items_mem: None,
            what,
        }
    }

    fn n(&self) -> usize {
        self.sh.rows
    }
    fn v(&self) -> usize {
        self.sw.rows
    }
    fn h(&self) -> usize {
        self.sh.cols
    }
    fn teacher_weight(&self) -> &Mat {
        if self.self_distill {
            &self.sw
        } else {
            &self.tw
        }
    }

    fn random_labels(mut self, rng: &mut Rng, p: f64) -> Self {
        let ii = self.params.divergence.ignore_index;
        self.labels = Some(
            (0..self.n())
                .map(|_| {
                    if rng.uniform() < p {
                        ii
                    } else {
                        rng.below(0, 1000) as i64
                    }
                })
                .collect(),
        );
        self.what += &format!(" labels(p_ignore={p})");
        self
    }

    /// Sets every gradient output's dtype.
    fn grad_dtypes(mut self, gh: DType, gw: DType) -> Self {
        if let Some(g) = &mut self.gh {
            g.dtype = gh;
        }
        if let Some(g) = &mut self.gw {
            g.dtype = gw;
        }
        self.what += &format!(" grad_hidden={} grad_weight={}", gh.name(), gw.name());
        self
    }
}

// ------------------------------------------------------------------------------------------
// Independent reference
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Ref {
    per_token: Vec<f64>,
    loss: f64,
    /// `n × h`, before rounding and without the previous buffer contents.
    gh: Vec<f64>,
    /// `v × h`, likewise.
    gw: Vec<f64>,
}

/// Logits of one row: scale · (x · w_j), soft-capped; and d(capped)/d(x · w_j).
fn logits_ref(x: &[f64], w: &Mat, scale: f64, cap: Option<f64>) -> (Vec<f64>, Vec<f64>) {
    let mut z = Vec::with_capacity(w.rows);
    let mut dz = Vec::with_capacity(w.rows);
    for j in 0..w.rows {
        let raw: f64 = x.iter().zip(w.row(j)).map(|(a, b)| a * b).sum();
        let s = scale * raw;
        match cap {
            None => {
                z.push(s);
                dz.push(scale);
            }
            Some(c) => {
                let t = (s / c).tanh();
                z.push(c * t);
                dz.push((1.0 - t * t) * scale);
            }
        }
    }
    (z, dz)
}

fn reference(c: &FCase) -> Ref {
    let p = &c.params.divergence;
    let (n, v, h) = (c.n(), c.v(), c.h());
    let t = p.temperature as f64;
    let scale = c.params.logit_scale as f64;
    let cap = c.params.softcap.map(|x| x as f64);
    let mut per_token = vec![0.0; n];
    // d(sum of row losses)/d(raw logits), `n × v`.
    let mut g = vec![0.0; n * v];
    let mut valid = 0usize;
    for r in 0..n {
        if c.labels.as_ref().is_some_and(|l| l[r] == p.ignore_index) {
            continue;
        }
        valid += 1;
        let (zs, dzs) = logits_ref(c.sh.row(r), &c.sw, scale, cap);
        let (zt, _) = logits_ref(c.th.row(r), c.teacher_weight(), scale, cap);
        let b: Vec<f64> = zs.iter().map(|x| x / t).collect();
        let a: Vec<f64> = zt.iter().map(|x| x / t).collect();
        let (l, gb) = naive_row(p.kind, p.beta as f64, &b, &a);
        per_token[r] = l;
        for j in 0..v {
            g[r * v + j] = gb[j] / t * dzs[j];
        }
    }
    let divisor = match p.reduction {
        Reduction::BatchMean => p.num_items.map_or(valid.max(1) as f64, |x| x as f64),
        Reduction::Sum | Reduction::None => 1.0,
    };
    let loss = per_token.iter().sum::<f64>() / divisor;
    g.iter_mut().for_each(|x| *x /= divisor);
    let mut gh = vec![0.0; n * h];
    let mut gw = vec![0.0; v * h];
    for r in 0..n {
        for j in 0..v {
            let grj = g[r * v + j];
            for k in 0..h {
                gh[r * h + k] += grj * c.sw.row(j)[k];
                gw[j * h + k] += grj * c.sh.row(r)[k];
            }
        }
    }
    Ref {
        per_token,
        loss,
        gh,
        gw,
    }
}

// ------------------------------------------------------------------------------------------
// Buffers and running a case
// ------------------------------------------------------------------------------------------

const SH: usize = 0;
const SW: usize = 1;
const TH: usize = 2;
const TW: usize = 3;
const LABELS: usize = 4;
const PT: usize = 5;
const LOSS: usize = 6;
const GH: usize = 7;
const GW: usize = 8;
const NUM_ITEMS: usize = 9;
const SLOTS: usize = 10;

/// Every buffer of a call; `None` where the case has no such buffer.
#[derive(Debug, Clone, PartialEq)]
struct FBufs([Option<Bytes>; SLOTS]);

fn grad_buffer(g: &GradOut, rows: usize, cols: usize) -> Bytes {
    let elems = (rows * g.stride).max(1);
    let mut b = poison_bytes(g.dtype, elems);
    if let Some(prev) = &g.prev {
        for r in 0..rows {
            let enc = encode(g.dtype, &prev[r * cols..(r + 1) * cols]);
            let s = r * g.stride * g.dtype.size();
            b[s..s + enc.len()].copy_from_slice(&enc);
        }
    }
    Bytes::from_slice(&b)
}

impl FBufs {
    fn new(c: &FCase) -> FBufs {
        let (n, v, h) = (c.n(), c.v(), c.h());
        let mut b: [Option<Bytes>; SLOTS] = Default::default();
        b[SH] = Some(c.sh.encode(c.dtype));
        b[SW] = Some(c.sw.encode(c.dtype));
        b[TH] = Some(c.th.encode(c.dtype));
        if !c.self_distill {
            b[TW] = Some(c.tw.encode(c.dtype));
        }
        b[LABELS] = c.labels.as_ref().map(|l| {
            Bytes::from_slice(&l.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
        });
        b[PT] = c
            .per_token
            .then(|| Bytes::from_slice(&poison_bytes(DType::F32, n)));
        b[LOSS] = c
            .loss
            .then(|| Bytes::from_slice(&poison_bytes(DType::F32, 1)));
        b[GH] = c.gh.as_ref().map(|g| grad_buffer(g, n, h));
        b[GW] = c.gw.as_ref().map(|g| grad_buffer(g, v, h));
        b[NUM_ITEMS] = c.num_items_mem.map(|d| Bytes::from_slice(&d.to_le_bytes()));
        FBufs(b)
    }

    fn host_ptrs(&mut self) -> [*mut u8; SLOTS] {
        let mut p = [std::ptr::null_mut(); SLOTS];
        for (i, b) in self.0.iter_mut().enumerate() {
            if let Some(b) = b {
                p[i] = b.ptr();
            }
        }
        p
    }
}

/// Builds the views of `c` over `p` in `loc` and runs the call.
///
/// # Safety
/// `p` must hold the buffers of [`FBufs::new`] for `c`, in memory `ctx` uses.
unsafe fn call(
    ctx: &Context,
    c: &FCase,
    p: [*mut u8; SLOTS],
    loc: Location,
    launch: &Launch<'_>,
) -> Result<(), Error> {
    let (n, v, h) = (c.n(), c.v(), c.h());
    let ht = c.th.cols;
    let d = c.dtype;
    let (tw_ptr, tw) = if c.self_distill {
        (p[SW], &c.sw)
    } else {
        (p[TW], &c.tw)
    };
    // SAFETY: forwarded from the caller (the buffers cover the views).
    unsafe {
        ctx.fused_linear_divergence(
            FusedLinear {
                num_items: c
                    .num_items_mem
                    .map(|_| Vector::from_raw(p[NUM_ITEMS] as *const f32, 1, loc)),
                student_hidden: Matrix::from_raw(p[SH], d, n, h, c.sh.stride, loc),
                student_weight: Matrix::from_raw(p[SW], d, v, h, c.sw.stride, loc),
                teacher_hidden: Matrix::from_raw(p[TH], d, n, ht, c.th.stride, loc),
                teacher_weight: Matrix::from_raw(tw_ptr, d, v, ht, tw.stride, loc),
                labels: c
                    .labels
                    .as_ref()
                    .map(|_| Vector::from_raw(p[LABELS] as *const i64, n, loc)),
                per_token: c
                    .per_token
                    .then(|| VectorMut::from_raw(p[PT] as *mut f32, n, loc)),
                loss: c
                    .loss
                    .then(|| VectorMut::from_raw(p[LOSS] as *mut f32, 1, loc)),
                grad_hidden: c
                    .gh
                    .as_ref()
                    .map(|g| MatrixMut::from_raw(p[GH], g.dtype, n, h, g.stride, loc)),
                grad_weight: c
                    .gw
                    .as_ref()
                    .map(|g| MatrixMut::from_raw(p[GW], g.dtype, v, h, g.stride, loc)),
            },
            &c.params,
            launch,
        )
    }
}

fn run_cuda(dev: &CudaDev, c: &FCase, bufs: &mut FBufs) -> Result<(), Error> {
    let d: Vec<Option<CudaSlice<u8>>> = bufs
        .0
        .iter()
        .map(|b| {
            b.as_ref()
                .map(|b| dev.stream.clone_htod(b.as_ref()).expect("htod"))
        })
        .collect();
    let mut p = [std::ptr::null_mut(); SLOTS];
    for (i, s) in d.iter().enumerate() {
        if let Some(s) = s {
            let (ptr, _sync) = s.device_ptr(&dev.stream);
            p[i] = ptr as usize as *mut u8;
        }
    }
    // SAFETY: the test's stream on device 0's primary context, live for the whole call.
    let launch = unsafe { Launch::on_stream(dev.stream.cu_stream() as *mut c_void) };
    dev.stream.synchronize().expect("sync before");
    // SAFETY: device buffers laid out for the case.
    let result = unsafe { call(&dev.ctx, c, p, Location::Cuda(0), &launch) };
    dev.stream.synchronize().expect("sync after the call");
    for (s, b) in d.iter().zip(bufs.0.iter_mut()) {
        if let (Some(s), Some(b)) = (s, b) {
            let back = dev.stream.clone_dtoh(s).expect("dtoh");
            b.as_mut().copy_from_slice(&back);
        }
    }
    dev.stream.synchronize().expect("sync after copies");
    result
}

/// Runs `c` with poisoned outputs; the result and every buffer before and after.
fn run(dev: &Device, c: &FCase) -> (Result<(), Error>, FBufs, FBufs) {
    let before = FBufs::new(c);
    let mut after = before.clone();
    let result = match dev {
        Device::Cpu(ctx) => {
            let p = after.host_ptrs();
            // SAFETY: host buffers laid out for the case.
            unsafe { call(ctx, c, p, Location::Host, &Launch::default()) }
        }
        Device::Cuda(d) => run_cuda(d, c, &mut after),
    };
    (result, before, after)
}

// ------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct FOut {
    per_token: Option<Vec<f64>>,
    loss: Option<f64>,
    gh: Option<Vec<f64>>,
    gw: Option<Vec<f64>>,
}

/// The `rows × cols` values of a gradient buffer (and their raw bits).
fn grad_values(g: &GradOut, b: &Bytes, rows: usize, cols: usize) -> (Vec<f64>, Vec<u32>) {
    let mut vals = Vec::with_capacity(rows * cols);
    let mut bits = Vec::with_capacity(rows * cols);
    let s = g.dtype.size();
    for r in 0..rows {
        let row = &b.as_ref()[r * g.stride * s..(r * g.stride + cols) * s];
        vals.extend(decode(g.dtype, row));
        bits.extend((0..cols).map(|i| elem_bits(g.dtype, row, i)));
    }
    (vals, bits)
}

fn outputs(c: &FCase, after: &FBufs) -> FOut {
    let (n, v, h) = (c.n(), c.v(), c.h());
    let f32s = |b: &Bytes| decode(DType::F32, b.as_ref());
    FOut {
        per_token: after.0[PT].as_ref().map(f32s),
        loss: after.0[LOSS].as_ref().map(|b| f32s(b)[0]),
        gh: c
            .gh
            .as_ref()
            .map(|g| grad_values(g, after.0[GH].as_ref().unwrap(), n, h).0),
        gw: c
            .gw
            .as_ref()
            .map(|g| grad_values(g, after.0[GW].as_ref().unwrap(), v, h).0),
    }
}

/// Tolerance on a gradient's relative-norm error: output rounding on the CPU, DESIGN.md's on CUDA.
fn grad_tol(cuda: bool, input: DType, out: DType) -> f64 {
    let rounding = match out {
        DType::F32 => 1e-6,
        DType::BF16 => 5e-3,
        DType::F16 => 1e-3,
    };
    if cuda {
        if input == DType::F32 && out == DType::F32 {
            1e-5
        } else {
            1e-2
        }
    } else {
        rounding
    }
}

/// Checks a run of `c` on `dev` against the reference; returns the outputs.
#[track_caller]
fn check_case(dev: &Device, c: &FCase) -> FOut {
    let (result, before, after) = run(dev, c);
    let ctx = format!("[{}] {}", dev.name(), c.what);
    if let Err(e) = result {
        panic!("{ctx}: the call failed: {e}");
    }
    let r = reference(c);
    let out = outputs(c, &after);
    let cuda = dev.is_cuda();
    let all_f32 = c.dtype == DType::F32;
    let (loss_tol, floor) = match (cuda, all_f32) {
        (false, _) => (1e-6, 1e-6),
        (true, true) => (1e-5, 1e-2),
        (true, false) => (1e-4, 1e-2),
    };
    // Inputs untouched.
    for slot in [SH, SW, TH, TW, LABELS] {
        assert_eq!(
            before.0[slot], after.0[slot],
            "{ctx}: input buffer {slot} was modified"
        );
    }
    if let Some(pt) = &out.per_token {
        let e = rel_err(pt, &r.per_token, floor);
        assert!(e <= loss_tol, "{ctx}: per-token error {e:e}");
    }
    if let Some(l) = out.loss {
        let e = rel_err(&[l], &[r.loss], floor);
        assert!(
            e <= loss_tol,
            "{ctx}: loss {l} vs reference {} (error {e:e})",
            r.loss
        );
    }
    let (n, v, h) = (c.n(), c.v(), c.h());
    for (name, slot, g, reference, rows) in [
        ("grad_hidden", GH, &c.gh, &r.gh, n),
        ("grad_weight", GW, &c.gw, &r.gw, v),
    ] {
        let Some(g) = g else { continue };
        let buf = after.0[slot].as_ref().unwrap();
        let (vals, bits) = grad_values(g, buf, rows, h);
        let expected: Vec<f64> = match &g.prev {
            Some(prev) => prev.iter().zip(reference).map(|(p, x)| p + x).collect(),
            None => reference.clone(),
        };
        if g.prev.is_none() {
            let poison = poison_bits(g.dtype);
            let unwritten = bits.iter().filter(|&&b| b == poison).count();
            assert_eq!(
                unwritten, 0,
                "{ctx}: {unwritten} {name} elements not written"
            );
        }
        let e = rel_err(&vals, &expected, floor);
        let tol = grad_tol(cuda, c.dtype, g.dtype);
        assert!(e <= tol, "{ctx}: {name} error {e:e} > {tol:e}");
        // Padding between rows untouched.
        let before_buf = before.0[slot].as_ref().unwrap();
        let s = g.dtype.size();
        for r in 0..rows {
            let pad = (r * g.stride + h) * s..((r + 1) * g.stride).min(rows * g.stride) * s;
            assert_eq!(
                &buf.as_ref()[pad.clone()],
                &before_buf.as_ref()[pad],
                "{ctx}: {name} padding of row {r} modified"
            );
        }
    }
    out
}

/// An edit of a case.
type Edit = fn(&mut FCase);

fn divergence_params(kind: Kind, beta: f32, reduction: Reduction) -> Params {
    Params {
        kind,
        beta,
        reduction,
        ..Params::default()
    }
}

fn fparams(divergence: Params) -> FusedLinearParams {
    FusedLinearParams {
        divergence,
        ..FusedLinearParams::default()
    }
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

#[test]
fn every_kind_and_reduction_f32() {
    let mut rng = Rng::fresh("every_kind_and_reduction_f32");
    for dev in devices("every_kind_and_reduction_f32") {
        for kp in kinds() {
            for reduction in [Reduction::BatchMean, Reduction::Sum, Reduction::None] {
                let mut d = divergence_params(kp.kind, kp.beta, reduction);
                d.temperature = [1.0, 0.7, 2.0][rng.below(0, 3)];
                let (n, v) = (rng.below(1, 10), rng.below(1, 40));
                let (h, ht) = (rng.below(1, 24), rng.below(1, 24));
                let c = FCase::random(&mut rng, DType::F32, n, v, h, ht, fparams(d));
                check_case(&dev, &c);
            }
        }
    }
}

#[test]
fn labels_ignore_index_and_num_items() {
    let mut rng = Rng::fresh("labels_ignore_index_and_num_items");
    for dev in devices("labels_ignore_index_and_num_items") {
        for kp in kinds() {
            for (p_ignore, num_items) in [(0.3, None), (0.5, Some(3.5f32)), (1.0, None)] {
                let mut d = divergence_params(kp.kind, kp.beta, Reduction::BatchMean);
                d.num_items = num_items;
                d.ignore_index = [-100, 7][rng.below(0, 2)];
                let c = FCase::random(&mut rng, DType::F32, 9, 17, 12, 8, fparams(d))
                    .random_labels(&mut rng, p_ignore);
                check_case(&dev, &c);
            }
            // Labels with reduction sum / none too.
            for reduction in [Reduction::Sum, Reduction::None] {
                let d = divergence_params(kp.kind, kp.beta, reduction);
                let c = FCase::random(&mut rng, DType::F32, 6, 11, 5, 7, fparams(d))
                    .random_labels(&mut rng, 0.4);
                check_case(&dev, &c);
            }
        }
    }
}

#[test]
fn num_items_in_memory_matches_the_parameter() {
    // Bitwise the outputs of the same value as the parameter (checked against the reference
    // above), over several chunks and with accumulation; a value that is not finite and at
    // least 2^-126 gives the sum. Refused: both given, or a reduction other than batchmean.
    let test = "fused num_items_in_memory_matches_the_parameter";
    let mut rng = Rng::fresh(test);
    let outputs_of = |b: &FBufs| [PT, LOSS, GH, GW].map(|i| b.0[i].clone());
    for dev in devices(test) {
        for (dtype, accumulate) in [(DType::F32, false), (DType::BF16, true)] {
            let d = divergence_params(Kind::Jsd, 0.4, Reduction::BatchMean);
            let p = FusedLinearParams {
                accumulate,
                chunk_rows: Some(3),
                ..fparams(d)
            };
            let mut base =
                FCase::random(&mut rng, dtype, 7, 19, 8, 8, p).random_labels(&mut rng, 0.3);
            if accumulate {
                let (n, v, h) = (base.n(), base.v(), base.h());
                let mut prev = |len: usize| -> Option<Vec<f64>> {
                    Some(
                        (0..len)
                            .map(|_| round_to(dtype, 0.05 * rng.normal()))
                            .collect(),
                    )
                };
                base.gh.as_mut().unwrap().prev = prev(n * h);
                base.gw.as_mut().unwrap().prev = prev(v * h);
            }
            let ok = |c: &FCase| {
                let (r, before, after) = run(&dev, c);
                r.unwrap_or_else(|e| panic!("{} {}: {e}", dev.name(), c.what));
                assert_eq!(before.0[NUM_ITEMS], after.0[NUM_ITEMS], "num_items written");
                outputs_of(&after)
            };
            for value in [5.5f32, 1.0, 2.0e-3] {
                let mut by_value = base.clone();
                by_value.params.divergence.num_items = Some(value);
                let mut in_memory = base.clone();
                in_memory.num_items_mem = Some(value);
                assert!(
                    ok(&by_value) == ok(&in_memory),
                    "{} {}: num_items {value} in memory differs from the parameter",
                    dev.name(),
                    base.what
                );
            }
            let mut sum = base.clone();
            sum.params.divergence.reduction = Reduction::Sum;
            let sum = ok(&sum);
            for value in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
                let mut in_memory = base.clone();
                in_memory.num_items_mem = Some(value);
                assert!(
                    ok(&in_memory) == sum,
                    "{} {}: num_items {value} in memory is not the sum",
                    dev.name(),
                    base.what
                );
            }
            let refused = |c: &FCase, needle: &str| {
                let (r, before, after) = run(&dev, c);
                let e = r.expect_err("refused");
                assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
                assert!(e.to_string().contains(needle), "{e}");
                assert_eq!(before, after, "{}: a refused call wrote", dev.name());
            };
            let mut both = base.clone();
            both.num_items_mem = Some(2.0);
            both.params.divergence.num_items = Some(2.0);
            refused(&both, "given twice");
            let mut wrong = base.clone();
            wrong.num_items_mem = Some(2.0);
            wrong.params.divergence.reduction = Reduction::Sum;
            refused(&wrong, "only applies to reduction=batchmean");
        }
    }
}

#[test]
fn softcap_and_logit_scale() {
    let mut rng = Rng::fresh("softcap_and_logit_scale");
    for dev in devices("softcap_and_logit_scale") {
        for kp in kinds() {
            for (scale, cap) in [(0.5f32, None), (1.0, Some(2.0f32)), (1.7, Some(5.0))] {
                let mut d = divergence_params(kp.kind, kp.beta, Reduction::BatchMean);
                d.temperature = rng.range(0.5, 2.0) as f32;
                let p = FusedLinearParams {
                    logit_scale: scale,
                    softcap: cap,
                    ..fparams(d)
                };
                let c = FCase::random(&mut rng, DType::F32, 7, 23, 16, 9, p)
                    .random_labels(&mut rng, 0.2);
                check_case(&dev, &c);
            }
        }
    }
}

#[test]
fn chunk_sizes_that_do_not_divide_n() {
    let mut rng = Rng::fresh("chunk_sizes_that_do_not_divide_n");
    for dev in devices("chunk_sizes_that_do_not_divide_n") {
        for kp in [
            Params::new(Kind::ForwardKl),
            Params {
                beta: 0.5,
                ..Params::new(Kind::Jsd)
            },
        ] {
            let n = 11;
            let p = FusedLinearParams {
                softcap: Some(3.0),
                ..fparams(kp)
            };
            let base =
                FCase::random(&mut rng, DType::F32, n, 19, 10, 6, p).random_labels(&mut rng, 0.25);
            let mut results = Vec::new();
            for chunk in [Some(1), Some(3), Some(4), Some(n), Some(n + 5), None] {
                let mut c = base.clone();
                c.params.chunk_rows = chunk;
                c.what += &format!(" chunk_rows={chunk:?}");
                results.push((chunk, check_case(&dev, &c)));
            }
            if !dev.is_cuda() {
                // The CPU sums in the same order whatever the chunk size: identical bits.
                for (chunk, r) in &results[1..] {
                    assert_eq!(
                        r, &results[0].1,
                        "cpu: chunk_rows={chunk:?} differs from chunk_rows=1"
                    );
                }
            }
        }
    }
}

#[test]
fn self_distillation_shares_the_weight() {
    let mut rng = Rng::fresh("self_distillation_shares_the_weight");
    for dev in devices("self_distillation_shares_the_weight") {
        for kp in kinds() {
            let (n, v, h) = (rng.below(1, 9), rng.below(2, 30), rng.below(1, 20));
            let mut c = FCase::random(&mut rng, DType::F32, n, v, h, h, fparams(kp));
            c.self_distill = true;
            c.what += " self-distillation";
            check_case(&dev, &c);
        }
    }
}

#[test]
fn accumulate_adds_to_the_buffers() {
    let mut rng = Rng::fresh("accumulate_adds_to_the_buffers");
    for dev in devices("accumulate_adds_to_the_buffers") {
        for (dtype, gdt) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::F16, DType::F16),
        ] {
            let d = divergence_params(Kind::Jsd, 0.5, Reduction::BatchMean);
            let p = FusedLinearParams {
                accumulate: true,
                chunk_rows: Some(2),
                ..fparams(d)
            };
            let (n, v, h) = (5, 13, 8);
            let mut c = FCase::random(&mut rng, dtype, n, v, h, 6, p).grad_dtypes(gdt, gdt);
            let prev = |rng: &mut Rng, len: usize| -> Vec<f64> {
                (0..len)
                    .map(|_| round_to(gdt, 0.05 * rng.normal()))
                    .collect()
            };
            c.gh.as_mut().unwrap().prev = Some(prev(&mut rng, n * h));
            c.gw.as_mut().unwrap().prev = Some(prev(&mut rng, v * h));
            check_case(&dev, &c);
        }
    }
}

#[test]
fn input_and_gradient_dtypes() {
    let mut rng = Rng::fresh("input_and_gradient_dtypes");
    for dev in devices("input_and_gradient_dtypes") {
        for dtype in DType::ALL {
            for (gh, gw) in [
                (dtype, dtype),
                (DType::F32, DType::F32),
                (dtype, DType::F32),
            ] {
                for kp in [
                    Params::new(Kind::ReverseKl),
                    Params {
                        beta: 0.25,
                        ..Params::new(Kind::Jsd)
                    },
                ] {
                    let p = FusedLinearParams {
                        softcap: Some(4.0),
                        chunk_rows: Some(3),
                        ..fparams(kp)
                    };
                    let c = FCase::random(&mut rng, dtype, 8, 21, 16, 12, p).grad_dtypes(gh, gw);
                    check_case(&dev, &c);
                }
            }
        }
    }
}

#[test]
fn f16_gradients_of_a_close_teacher_at_a_large_vocabulary() {
    // A teacher close to the student (self-distillation: shared weight, hidden states 0.1
    // apart) at V = 65536, T = 8: most of G = dL/dlogits lies below f16's normals (6.1e-5)
    // unless it is scaled (src/fused/cuda.rs `g_scale`); a float64 model of the unscaled f16 G
    // gives 1.9e-2 (KL) and 0.96 (JSD) relative error in grad_hidden, the scaled one < 5e-5.
    // f32 gradient outputs, so that only G's precision is measured, relative to the
    // gradients' own norm (check_case's floor of 1e-2 would hide errors of gradients this
    // small). Reverse KL's scale is 2^10 smaller (its gradient has no bound, and overflow is
    // worse than underflow): part of its G stays subnormal here, grad_weight ~1e-3 to 3e-3 in
    // a model (a review), so it is held to the f16 contract's 1e-2.
    let mut rng = Rng::fresh("f16_gradients_of_a_close_teacher_at_a_large_vocabulary");
    for dev in devices("f16_gradients_of_a_close_teacher_at_a_large_vocabulary") {
        for kind in [Kind::ForwardKl, Kind::ReverseKl, Kind::Jsd] {
            let p = FusedLinearParams {
                chunk_rows: Some(3),
                ..fparams(Params {
                    temperature: 8.0,
                    reduction: Reduction::Sum,
                    ..Params::new(kind)
                })
            };
            let (n, v, h) = (5, 65536, 32);
            let mut c = FCase::random(&mut rng, DType::F16, n, v, h, h, p)
                .grad_dtypes(DType::F32, DType::F32);
            c.self_distill = true;
            c.th.vals =
                c.sh.vals
                    .iter()
                    .map(|&x| round_to(DType::F16, x + 0.1 * rng.normal()))
                    .collect();
            c.what += " close teacher, f32 gradients";
            let out = check_case(&dev, &c);
            let r = reference(&c);
            let tol = if kind == Kind::ReverseKl { 1e-2 } else { 1e-3 };
            for (name, got, want) in [
                ("grad_hidden", &out.gh, &r.gh),
                ("grad_weight", &out.gw, &r.gw),
            ] {
                let e = rel_err(got.as_ref().unwrap(), want, 0.0);
                assert!(e <= tol, "[{}] {}: {name} error {e:e}", dev.name(), c.what);
            }
        }
    }
}

#[test]
fn padded_strides() {
    let mut rng = Rng::fresh("padded_strides");
    for dev in devices("padded_strides") {
        for dtype in DType::ALL {
            let p = fparams(Params::new(Kind::ForwardKl));
            let mut c = FCase::random(&mut rng, dtype, 6, 9, 7, 5, p);
            c.sh.stride = 7 + 3;
            c.sw.stride = 7 + 1;
            c.th.stride = 5 + 4;
            c.tw.stride = 5 + 2;
            c.gh.as_mut().unwrap().stride = 7 + 5;
            c.gw.as_mut().unwrap().stride = 7 + 2;
            c.what += " padded strides";
            check_case(&dev, &c);
        }
    }
}

#[test]
fn forward_only_and_partial_outputs() {
    let mut rng = Rng::fresh("forward_only_and_partial_outputs");
    for dev in devices("forward_only_and_partial_outputs") {
        let p = FusedLinearParams {
            softcap: Some(3.0),
            ..fparams(Params::new(Kind::ReverseKl))
        };
        let base = FCase::random(&mut rng, DType::F32, 7, 15, 9, 11, p);
        let full = check_case(&dev, &base);
        let variants: [(&str, Edit); 5] = [
            ("forward only", |c| {
                c.gh = None;
                c.gw = None;
            }),
            ("grad_hidden only", |c| c.gw = None),
            ("grad_weight only", |c| c.gh = None),
            ("no per-token", |c| c.per_token = false),
            ("gradients only", |c| {
                c.per_token = false;
                c.loss = false;
            }),
        ];
        for (what, edit) in variants {
            let mut c = base.clone();
            edit(&mut c);
            c.what += &format!(" {what}");
            let out = check_case(&dev, &c);
            if !dev.is_cuda() {
                for (got, want) in [
                    (out.loss.map(|x| vec![x]), full.loss.map(|x| vec![x])),
                    (out.per_token, full.per_token.clone()),
                    (out.gh, full.gh.clone()),
                    (out.gw, full.gw.clone()),
                ] {
                    if let Some(g) = got {
                        assert_eq!(Some(g), want, "cpu {what}: differs from the full call");
                    }
                }
            }
        }
    }
}

/// The loss of `c` (as f64) computed by `dev`.
fn loss_of(dev: &Device, c: &FCase) -> f64 {
    let (res, _, after) = run(dev, c);
    res.unwrap_or_else(|e| panic!("[{}] {}: {e}", dev.name(), c.what));
    outputs(c, &after).loss.unwrap()
}

#[test]
fn gradients_match_central_finite_differences() {
    let mut rng = Rng::fresh("gradients_match_central_finite_differences");
    for dev in devices("gradients_match_central_finite_differences") {
        for (kp, cap) in [
            (Params::new(Kind::ForwardKl), None),
            (Params::new(Kind::ReverseKl), Some(2.5f32)),
            (
                Params {
                    beta: 0.3,
                    temperature: 1.5,
                    ..Params::new(Kind::Jsd)
                },
                Some(3.0),
            ),
        ] {
            let p = FusedLinearParams {
                softcap: cap,
                logit_scale: 1.3,
                chunk_rows: Some(2),
                ..fparams(Params {
                    reduction: Reduction::Sum,
                    ..kp
                })
            };
            let (n, v, h) = (3, 6, 4);
            let c = FCase::random(&mut rng, DType::F32, n, v, h, 3, p);
            let (res, _, after) = run(&dev, &c);
            res.unwrap();
            let out = outputs(&c, &after);
            let (gh, gw) = (out.gh.unwrap(), out.gw.unwrap());
            let eps = 1e-2;
            let mut fd_h = Vec::new();
            let mut fd_w = Vec::new();
            let mut fwd = c.clone();
            fwd.gh = None;
            fwd.gw = None;
            for i in 0..n * h {
                let mut plus = fwd.clone();
                plus.sh.vals[i] = round_to(DType::F32, plus.sh.vals[i] + eps);
                let mut minus = fwd.clone();
                minus.sh.vals[i] = round_to(DType::F32, minus.sh.vals[i] - eps);
                fd_h.push(
                    (loss_of(&dev, &plus) - loss_of(&dev, &minus))
                        / (plus.sh.vals[i] - minus.sh.vals[i]),
                );
            }
            for i in 0..v * h {
                let mut plus = fwd.clone();
                plus.sw.vals[i] = round_to(DType::F32, plus.sw.vals[i] + eps);
                let mut minus = fwd.clone();
                minus.sw.vals[i] = round_to(DType::F32, minus.sw.vals[i] - eps);
                fd_w.push(
                    (loss_of(&dev, &plus) - loss_of(&dev, &minus))
                        / (plus.sw.vals[i] - minus.sw.vals[i]),
                );
            }
            let eh = rel_err(&gh, &fd_h, 1e-3);
            let ew = rel_err(&gw, &fd_w, 1e-3);
            let what = format!("[{}] {}", dev.name(), c.what);
            assert!(
                eh < 2e-3,
                "{what}: grad_hidden vs finite differences {eh:e}"
            );
            assert!(
                ew < 2e-3,
                "{what}: grad_weight vs finite differences {ew:e}"
            );
        }
    }
}

#[test]
fn deterministic_run_after_run() {
    let mut rng = Rng::fresh("deterministic_run_after_run");
    for dev in devices("deterministic_run_after_run") {
        for dtype in [DType::F32, DType::BF16] {
            let p = FusedLinearParams {
                softcap: Some(3.0),
                chunk_rows: Some(3),
                ..fparams(Params {
                    beta: 0.5,
                    ..Params::new(Kind::Jsd)
                })
            };
            let c = FCase::random(&mut rng, dtype, 10, 37, 24, 16, p).random_labels(&mut rng, 0.2);
            let (r1, _, a1) = run(&dev, &c);
            let (r2, _, a2) = run(&dev, &c);
            r1.unwrap();
            r2.unwrap();
            assert_eq!(a1, a2, "[{}] {}: two runs differ", dev.name(), c.what);
        }
    }
}

#[test]
fn self_distillation_of_identical_models_is_zero() {
    // Same hidden states, same weight: every divergence is 0 and so is every gradient.
    let mut rng = Rng::fresh("self_distillation_of_identical_models_is_zero");
    for dev in devices("self_distillation_of_identical_models_is_zero") {
        for kp in kinds() {
            let mut c = FCase::random(&mut rng, DType::F32, 5, 12, 8, 8, fparams(kp));
            c.self_distill = true;
            c.th = c.sh.clone();
            c.what += " identical models";
            let out = check_case(&dev, &c);
            assert!(out.loss.unwrap().abs() < 1e-6, "{}", c.what);
            let tiny = |g: &[f64]| g.iter().all(|x| x.abs() < 1e-6);
            assert!(tiny(out.gh.as_ref().unwrap()) && tiny(out.gw.as_ref().unwrap()));
        }
    }
}
