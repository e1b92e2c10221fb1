//! Test support shared by the integration tests (`mod common;` in each test file).
//!
//! - An INDEPENDENT naive f64 implementation of the divergence, written from the math (linear
//!   space softmax, direct sums), so the crate's CPU backend (the oracle) is itself checked.
//! - A small deterministic RNG with a fresh seed per test (printed, replayable with
//!   `DK_TEST_SEED`).
//! - Cases (inputs, parameters, which outputs) and a runner that executes a case on the CPU or on
//!   CUDA device 0 with poisoned outputs, returning every buffer before and after the call.
//! - Checks: relative-norm errors, "every output element written", "padding and inputs
//!   untouched", NaN confined to its row.
//! - MoE dispatch: buffers, call specs and a device runner in [`moe`].
//! - Attention: an independent naive reference, cases, call specs and a runner in [`attention`].
//! - Row scaling: cases, an independent reference of the rounding and a runner in [`scale_rows`].
//! - The fused linear divergence's chunk kernels: the f64 reference of a row (loss and G with
//!   the softcap slope), their logits and tolerances in [`fused_chunk`].
#![allow(dead_code)]

pub mod attention;
pub mod fused_chunk;
pub mod moe;
pub mod scale_rows;

use std::ffi::c_void;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use distill_kernels::device::{compiled_cuda_archs, cuda_device_count};
use distill_kernels::divergence::{Divergence, DivergenceInPlace, Kind, Params, Reduction};
use distill_kernels::{
    Context, DType, Element, Error, Launch, Location, Matrix, MatrixMut, Vector, VectorMut,
};
use half::{bf16, f16};

// ------------------------------------------------------------------------------------------
// RNG
// ------------------------------------------------------------------------------------------

/// splitmix64: tiny, deterministic, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    pub seed: u64,
}

static SEED_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed, seed }
    }

    /// A fresh seed per call (time, a counter and the test name), or `DK_TEST_SEED` when set.
    /// The seed goes to the test's captured output, which cargo shows when the test fails.
    pub fn fresh(test: &str) -> Self {
        let seed = match std::env::var("DK_TEST_SEED") {
            Ok(s) => parse_seed(&s).expect("DK_TEST_SEED must be a decimal or 0x-hex u64"),
            Err(_) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                let mut h = 0xcbf2_9ce4_8422_2325u64;
                for b in test.bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
                }
                let c = SEED_COUNTER.fetch_add(1, Ordering::Relaxed);
                splitmix(
                    nanos ^ h ^ c.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ std::process::id() as u64,
                )
            }
        };
        eprintln!("[{test}] seed = {seed:#x} (replay with DK_TEST_SEED={seed:#x})");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [lo, hi).
    pub fn below(&mut self, lo: usize, hi: usize) -> usize {
        assert!(hi > lo);
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Random logits `[n, v]`: N(0, std²) plus a random constant per row (never all zeros).
    pub fn logits(&mut self, n: usize, v: usize, std: f64) -> Vec<f64> {
        let mut out = Vec::with_capacity(n * v);
        for _ in 0..n {
            let shift = self.range(-4.0, 4.0);
            for _ in 0..v {
                out.push(shift + std * self.normal());
            }
        }
        out
    }

    /// Teacher logits correlated with `student`: `a·student + noise`, plus a row shift.
    pub fn teacher_like(&mut self, student: &[f64], v: usize, noise: f64) -> Vec<f64> {
        let a = self.range(0.3, 1.2);
        let mut out = Vec::with_capacity(student.len());
        for row in student.chunks(v) {
            let shift = self.range(-3.0, 3.0);
            for &s in row {
                out.push(a * s + shift + noise * self.normal());
            }
        }
        out
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

// ------------------------------------------------------------------------------------------
// Element encoding, poison
// ------------------------------------------------------------------------------------------

/// The bit pattern outputs are poisoned with (a NaN with a payload no computation produces).
pub const POISON_F32: u32 = 0xFFBA_DBAD;
/// The 16-bit poison (a NaN in both bf16 and f16).
pub const POISON_16: u16 = 0xFFBA;

pub fn poison_bits(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => POISON_F32,
        DType::BF16 | DType::F16 => POISON_16 as u32,
    }
}

pub fn poison_f32() -> f32 {
    f32::from_bits(POISON_F32)
}

pub fn encode(dtype: DType, xs: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * dtype.size());
    for &x in xs {
        match dtype {
            DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
            DType::BF16 => {
                out.extend_from_slice(&<bf16 as Element>::from_f64(x).to_bits().to_le_bytes())
            }
            DType::F16 => {
                out.extend_from_slice(&<f16 as Element>::from_f64(x).to_bits().to_le_bytes())
            }
        }
    }
    out
}

pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
    }
}

/// Raw bits of element `i` of a `dtype` buffer.
pub fn elem_bits(dtype: DType, bytes: &[u8], i: usize) -> u32 {
    let s = dtype.size();
    let b = &bytes[i * s..(i + 1) * s];
    match dtype {
        DType::F32 => u32::from_le_bytes(b.try_into().unwrap()),
        DType::BF16 | DType::F16 => u16::from_le_bytes(b.try_into().unwrap()) as u32,
    }
}

/// Rounds `x` to `dtype` and back.
pub fn round_to(dtype: DType, x: f64) -> f64 {
    decode(dtype, &encode(dtype, &[x]))[0]
}

pub fn poison_bytes(dtype: DType, elems: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(elems * dtype.size());
    for _ in 0..elems {
        match dtype {
            DType::F32 => out.extend_from_slice(&POISON_F32.to_le_bytes()),
            _ => out.extend_from_slice(&POISON_16.to_le_bytes()),
        }
    }
    out
}

/// A byte buffer aligned to 8 bytes (host views need element alignment).
#[derive(Clone, PartialEq, Eq)]
pub struct Bytes {
    words: Vec<u64>,
    len: usize,
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}

impl Bytes {
    pub fn from_slice(b: &[u8]) -> Self {
        let mut out = Bytes {
            words: vec![0u64; b.len().div_ceil(8).max(1)],
            len: b.len(),
        };
        out.as_mut().copy_from_slice(b);
        out
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ref(&self) -> &[u8] {
        // SAFETY: u64 storage of at least `len` bytes; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }
    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }
    pub fn ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

/// Logits `[rows, cols]` already rounded to `dtype`, laid out with `stride` (≥ cols, unless a
/// bad-input test says otherwise). Padding between rows is NaN, so reading it shows up.
#[derive(Debug, Clone)]
pub struct Logits {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    /// `rows × cols` values, compact, exactly representable in `dtype`.
    pub vals: Vec<f64>,
}

/// The most negative finite value of a dtype: the mask of `masked_fill(mask,
/// torch.finfo(dtype).min)`, which Hugging Face code uses instead of −inf.
pub fn finfo_min(d: DType) -> f64 {
    match d {
        DType::F32 => f32::MIN as f64,
        DType::BF16 => bf16::MIN.to_f64(),
        DType::F16 => f16::MIN.to_f64(),
    }
}

impl Logits {
    pub fn new(dtype: DType, rows: usize, cols: usize, vals: &[f64]) -> Self {
        assert_eq!(vals.len(), rows * cols);
        Logits {
            dtype,
            rows,
            cols,
            stride: cols,
            vals: vals.iter().map(|&x| round_to(dtype, x)).collect(),
        }
    }
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
    pub fn row(&self, r: usize) -> &[f64] {
        &self.vals[r * self.cols..(r + 1) * self.cols]
    }
    pub fn row_mut(&mut self, r: usize) -> &mut [f64] {
        &mut self.vals[r * self.cols..(r + 1) * self.cols]
    }
    /// Elements the buffer holds (generous: `rows × max(stride, cols)`, at least 1).
    pub fn buffer_elems(&self) -> usize {
        (self.rows * self.stride.max(self.cols)).max(1)
    }
    /// Encoded buffer with NaN padding.
    pub fn encode(&self) -> Vec<u8> {
        let stride = self.stride.max(self.cols);
        let mut all = vec![f64::NAN; self.buffer_elems()];
        for r in 0..self.rows {
            all[r * stride..r * stride + self.cols].copy_from_slice(self.row(r));
        }
        encode(self.dtype, &all)
    }
}

/// Where the gradient goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradOut {
    /// Forward only.
    None,
    /// A separate buffer.
    Separate(GradSpec),
    /// `Context::divergence_in_place` (over the student logits).
    InPlace,
    /// A separate-buffer call whose gradient pointer points into the student buffer, `shift`
    /// elements after the student pointer (0 with the student stride = in place through the
    /// separate-buffer entry, as the C ABI allows).
    IntoStudent { shift: usize, stride: usize },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradSpec {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

/// Pointers to replace with null (bad-input tests).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Nulls {
    pub student: bool,
    pub teacher: bool,
    pub grad: bool,
    pub labels: bool,
    pub per_token: bool,
    pub loss: bool,
}

/// One call: inputs, parameters and which outputs are requested.
#[derive(Debug, Clone)]
pub struct Case {
    pub student: Logits,
    pub teacher: Logits,
    pub labels: Option<Vec<i64>>,
    pub params: Params,
    pub grad: GradOut,
    /// Length of the per-token output, `None` = not requested.
    pub per_token: Option<usize>,
    /// Length of the loss output (1), `None` = not requested.
    pub loss: Option<usize>,
    /// Elements every matrix pointer is shifted by inside its buffer (misalignment).
    pub offset: usize,
    /// `num_items` held in memory (the call's `num_items` view over one f32), `None` = absent.
    pub num_items_mem: Option<f32>,
    pub nulls: Nulls,
    /// What this case is, for messages.
    pub what: String,
}

impl Case {
    /// A contiguous case with every output requested and the gradient in a separate buffer.
    pub fn new(student: Logits, teacher: Logits, params: Params) -> Self {
        let n = student.rows;
        let grad = GradOut::Separate(GradSpec {
            dtype: student.dtype,
            rows: student.rows,
            cols: student.cols,
            stride: student.stride,
        });
        Case {
            student,
            teacher,
            labels: None,
            params,
            grad,
            per_token: Some(n),
            loss: Some(1),
            offset: 0,
            num_items_mem: None,
            nulls: Nulls::default(),
            what: String::new(),
        }
    }

    /// Random logits of the given shape and dtypes (teacher correlated with the student).
    pub fn random(
        rng: &mut Rng,
        n: usize,
        v: usize,
        s_dtype: DType,
        t_dtype: DType,
        params: Params,
    ) -> Self {
        let std = rng.range(1.0, 3.0);
        let s = rng.logits(n, v, std);
        let noise = rng.range(0.5, 2.0);
        let t = rng.teacher_like(&s, v, noise);
        let mut c = Case::new(
            Logits::new(s_dtype, n, v, &s),
            Logits::new(t_dtype, n, v, &t),
            params,
        );
        c.what = format!(
            "{} beta={} T={} {} N={n} V={v} student={} teacher={}",
            params.kind.name(),
            params.beta,
            params.temperature,
            params.reduction.name(),
            s_dtype.name(),
            t_dtype.name()
        );
        c
    }

    pub fn n(&self) -> usize {
        self.student.rows
    }
    pub fn v(&self) -> usize {
        self.student.cols
    }

    /// Sets the student, teacher and gradient strides.
    pub fn strides(mut self, s: usize, t: usize, g: usize) -> Self {
        self.student.stride = s;
        self.teacher.stride = t;
        if let GradOut::Separate(spec) = &mut self.grad {
            spec.stride = g;
        }
        self.what += &format!(" strides=({s},{t},{g})");
        self
    }

    pub fn grad_out(mut self, g: GradOut) -> Self {
        self.grad = g;
        self
    }

    pub fn grad_spec(&self) -> GradSpec {
        GradSpec {
            dtype: self.student.dtype,
            rows: self.student.rows,
            cols: self.student.cols,
            stride: self.student.stride,
        }
    }

    pub fn with_labels(mut self, labels: Vec<i64>) -> Self {
        self.labels = Some(labels);
        self
    }

    /// Random labels in [0, 50000) with each row ignored (= ignore_index) with probability `p`.
    pub fn random_labels(mut self, rng: &mut Rng, p: f64) -> Self {
        let ii = self.params.ignore_index;
        let labels = (0..self.n())
            .map(|_| {
                if rng.uniform() < p {
                    ii
                } else {
                    loop {
                        let l = rng.below(0, 50_000) as i64;
                        if l != ii {
                            break l;
                        }
                    }
                }
            })
            .collect();
        self.labels = Some(labels);
        self
    }

    /// The gradient's element type / shape / stride as written, if any.
    pub fn written_grad(&self) -> Option<GradSpec> {
        match self.grad {
            GradOut::None => None,
            GradOut::Separate(g) => Some(g),
            GradOut::InPlace => Some(self.grad_spec()),
            GradOut::IntoStudent { stride, .. } => Some(GradSpec {
                stride,
                ..self.grad_spec()
            }),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Independent reference (naive f64, linear space)
// ------------------------------------------------------------------------------------------

/// Reference outputs of a case.
#[derive(Debug, Clone)]
pub struct Reference {
    pub per_token: Vec<f64>,
    pub loss: f64,
    /// `n × v`, the gradient of the reduced loss w.r.t. the student logits (before rounding).
    pub grad: Vec<f64>,
    /// Rows whose outputs are NaN (NaN or +inf inputs).
    pub nan_rows: Vec<bool>,
}

enum Softmax {
    /// A NaN or +inf entry.
    Invalid,
    /// Every entry is −inf.
    Masked,
    /// (log-probabilities, probabilities); masked entries have log = −inf and p = 0.
    Ok(Vec<f64>, Vec<f64>),
}

fn softmax(x: &[f64]) -> Softmax {
    if x.iter().any(|v| v.is_nan() || *v == f64::INFINITY) {
        return Softmax::Invalid;
    }
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return Softmax::Masked;
    }
    let z: f64 = x.iter().map(|&v| (v - m).exp()).sum();
    let p: Vec<f64> = x.iter().map(|&v| (v - m).exp() / z).collect();
    let lp: Vec<f64> = x.iter().map(|&v| v - m - z.ln()).collect();
    Softmax::Ok(lp, p)
}

/// Loss of one row and dL/db (b = student logits / T), from the definitions:
/// forward KL(p‖q), reverse KL(q‖p), JSD(β) = β KL(p‖m) + (1−β) KL(q‖m) with m = βp + (1−β)q
/// in linear space (β = 0 is forward KL, β = 1 reverse KL by definition).
/// The gradient goes through the softmax Jacobian: dL/db_j = q_j (g_j − Σ q_i g_i), g = dL/dq.
pub fn naive_row(kind: Kind, beta: f64, b: &[f64], a: &[f64]) -> (f64, Vec<f64>) {
    let v = b.len();
    let (sq, sp) = (softmax(b), softmax(a));
    let (lq, q, lp, p) = match (sq, sp) {
        (Softmax::Invalid, _) | (_, Softmax::Invalid) => return (f64::NAN, vec![f64::NAN; v]),
        (Softmax::Masked, _) | (_, Softmax::Masked) => return (0.0, vec![0.0; v]),
        (Softmax::Ok(lq, q), Softmax::Ok(lp, p)) => (lq, q, lp, p),
    };
    let kind = match kind {
        Kind::Jsd if beta == 0.0 => Kind::ForwardKl,
        Kind::Jsd if beta == 1.0 => Kind::ReverseKl,
        k => k,
    };
    // Σ x_i (lx_i − ly_i) over x_i > 0.
    let kl = |x: &[f64], lx: &[f64], ly: &[f64]| -> f64 {
        (0..v)
            .filter(|&i| x[i] > 0.0)
            .map(|i| x[i] * (lx[i] - ly[i]))
            .sum()
    };
    // Softmax Jacobian-vector product with dL/dq = g (entries with q = 0 contribute 0).
    let through_softmax = |g: &[f64]| -> Vec<f64> {
        let qg: f64 = (0..v).filter(|&i| q[i] > 0.0).map(|i| q[i] * g[i]).sum();
        (0..v)
            .map(|j| if q[j] > 0.0 { q[j] * (g[j] - qg) } else { 0.0 })
            .collect()
    };
    match kind {
        Kind::ForwardKl => {
            let loss = kl(&p, &lp, &lq);
            // dL/dq_i = −p_i / q_i, so dL/db_j = q_j − p_j Σ... = q_j − p_j (Σ p = 1).
            let grad = (0..v).map(|j| q[j] - p[j]).collect();
            (loss, grad)
        }
        Kind::ReverseKl => {
            let loss = kl(&q, &lq, &lp);
            let g: Vec<f64> = (0..v)
                .map(|i| if q[i] > 0.0 { lq[i] - lp[i] + 1.0 } else { 0.0 })
                .collect();
            (loss, through_softmax(&g))
        }
        Kind::Jsd => {
            let m: Vec<f64> = (0..v).map(|i| beta * p[i] + (1.0 - beta) * q[i]).collect();
            let lm: Vec<f64> = m.iter().map(|x| x.ln()).collect();
            let loss = beta * kl(&p, &lp, &lm) + (1.0 - beta) * kl(&q, &lq, &lm);
            // d/dq_i of the loss with m depending on q: (1−β)(log q_i − log m_i).
            let g: Vec<f64> = (0..v)
                .map(|i| {
                    if q[i] > 0.0 {
                        (1.0 - beta) * (lq[i] - lm[i])
                    } else {
                        0.0
                    }
                })
                .collect();
            (loss, through_softmax(&g))
        }
    }
}

/// The reference result of a (valid) case, computed from the rounded inputs.
pub fn reference(case: &Case) -> Reference {
    let p = &case.params;
    let (n, v) = (case.n(), case.v());
    let t = p.temperature as f64;
    let beta = p.beta as f64;
    let mut per_token = vec![0.0; n];
    let mut grad = vec![0.0; n * v];
    let mut nan_rows = vec![false; n];
    let mut valid = 0usize;
    for r in 0..n {
        let ignored = case.labels.as_ref().is_some_and(|l| l[r] == p.ignore_index);
        if ignored {
            continue;
        }
        valid += 1;
        let b: Vec<f64> = case.student.row(r).iter().map(|x| x / t).collect();
        let a: Vec<f64> = case.teacher.row(r).iter().map(|x| x / t).collect();
        let (l, g) = naive_row(p.kind, beta, &b, &a);
        per_token[r] = l;
        nan_rows[r] = l.is_nan();
        grad[r * v..(r + 1) * v].copy_from_slice(&g);
    }
    let divisor = match p.reduction {
        Reduction::BatchMean => p.num_items.map_or(valid.max(1) as f64, |x| x as f64),
        Reduction::Sum | Reduction::None => 1.0,
    };
    let loss = per_token.iter().sum::<f64>() / divisor;
    for g in &mut grad {
        *g /= divisor * t;
    }
    Reference {
        per_token,
        loss,
        grad,
        nan_rows,
    }
}

// ------------------------------------------------------------------------------------------
// Buffers and running a case
// ------------------------------------------------------------------------------------------

/// Host copies of every buffer of a call (inputs poisoned/padded as described).
#[derive(Debug, Clone, PartialEq)]
pub struct Bufs {
    pub student: Bytes,
    pub teacher: Bytes,
    pub grad: Option<Bytes>,
    pub labels: Option<Bytes>,
    pub per_token: Bytes,
    pub loss: Bytes,
    /// The f32 of `num_items` in memory (an input).
    pub num_items: Option<Bytes>,
}

impl Bufs {
    /// Encodes the inputs and poisons the outputs. Matrix buffers start with `offset`
    /// poison elements.
    pub fn new(case: &Case) -> Self {
        let with_prefix = |l: &Logits| {
            let mut b = poison_bytes(l.dtype, case.offset);
            b.extend_from_slice(&l.encode());
            Bytes::from_slice(&b)
        };
        let grad = match case.grad {
            GradOut::Separate(g) => {
                let elems = case.offset + (g.rows * g.stride.max(g.cols)).max(1);
                Some(Bytes::from_slice(&poison_bytes(g.dtype, elems)))
            }
            _ => None,
        };
        // Vectors get at least N (or 1) entries even when a bad-input case claims fewer, so a
        // library that wrongly went ahead would still stay inside the allocation.
        let n = case.student.rows;
        let labels = case.labels.as_ref().map(|l| {
            let mut b: Vec<u8> = l.iter().flat_map(|x| x.to_le_bytes()).collect();
            while b.len() < 8 * n.max(1) {
                b.extend_from_slice(&1234i64.to_le_bytes());
            }
            Bytes::from_slice(&b)
        });
        let pt = case.per_token.unwrap_or(0).max(n).max(1);
        let ls = case.loss.unwrap_or(0).max(1);
        Bufs {
            student: with_prefix(&case.student),
            teacher: with_prefix(&case.teacher),
            grad,
            labels,
            per_token: Bytes::from_slice(&poison_bytes(DType::F32, pt)),
            loss: Bytes::from_slice(&poison_bytes(DType::F32, ls)),
            num_items: case
                .num_items_mem
                .map(|d| Bytes::from_slice(&d.to_le_bytes())),
        }
    }
}

/// Base pointers of the buffers (host or device) before the offset is applied.
#[derive(Debug, Clone, Copy)]
pub struct BasePtrs {
    pub student: *mut u8,
    pub teacher: *mut u8,
    pub grad: *mut u8,
    pub labels: *mut u8,
    pub per_token: *mut u8,
    pub loss: *mut u8,
    pub num_items: *mut u8,
}

impl BasePtrs {
    pub fn host(b: &mut Bufs) -> Self {
        BasePtrs {
            student: b.student.ptr(),
            teacher: b.teacher.ptr(),
            grad: b.grad.as_mut().map_or(std::ptr::null_mut(), |g| g.ptr()),
            labels: b.labels.as_mut().map_or(std::ptr::null_mut(), |g| g.ptr()),
            per_token: b.per_token.ptr(),
            loss: b.loss.ptr(),
            num_items: b
                .num_items
                .as_mut()
                .map_or(std::ptr::null_mut(), |g| g.ptr()),
        }
    }
}

/// Makes the views of `case` over `base` in `loc` and runs the call on `ctx`.
///
/// # Safety
/// `base` must point to buffers laid out by [`Bufs::new`] for `case`, in memory `ctx` can use
/// (or deliberately not, for wrong-device tests — then the call must fail before any access).
pub unsafe fn call(
    ctx: &Context,
    case: &Case,
    base: BasePtrs,
    loc: Location,
    launch: &Launch<'_>,
) -> Result<(), Error> {
    let nul = |b: bool, p: *mut u8| if b { std::ptr::null_mut() } else { p };
    let s = &case.student;
    let t = &case.teacher;
    let sp = nul(
        case.nulls.student,
        base.student.wrapping_add(case.offset * s.dtype.size()),
    );
    let tp = nul(
        case.nulls.teacher,
        base.teacher.wrapping_add(case.offset * t.dtype.size()),
    );
    let teacher = Matrix::from_raw(tp, t.dtype, t.rows, t.cols, t.stride, loc);
    let labels = case.labels.as_ref().map(|l| {
        Vector::from_raw(
            nul(case.nulls.labels, base.labels) as *const i64,
            l.len(),
            loc,
        )
    });
    let per_token = case.per_token.map(|len| {
        VectorMut::from_raw(
            nul(case.nulls.per_token, base.per_token) as *mut f32,
            len,
            loc,
        )
    });
    let loss = case
        .loss
        .map(|len| VectorMut::from_raw(nul(case.nulls.loss, base.loss) as *mut f32, len, loc));
    let num_items = case
        .num_items_mem
        .map(|_| Vector::from_raw(base.num_items as *const f32, 1, loc));
    match case.grad {
        GradOut::InPlace => ctx.divergence_in_place(
            DivergenceInPlace {
                num_items,
                student: MatrixMut::from_raw(sp, s.dtype, s.rows, s.cols, s.stride, loc),
                teacher,
                labels,
                per_token,
                loss,
            },
            &case.params,
            launch,
        ),
        g => {
            let grad = match g {
                GradOut::None | GradOut::InPlace => None,
                GradOut::Separate(spec) => Some(MatrixMut::from_raw(
                    nul(
                        case.nulls.grad,
                        base.grad.wrapping_add(case.offset * spec.dtype.size()),
                    ),
                    spec.dtype,
                    spec.rows,
                    spec.cols,
                    spec.stride,
                    loc,
                )),
                GradOut::IntoStudent { shift, stride } => Some(MatrixMut::from_raw(
                    sp.wrapping_add(shift * s.dtype.size()),
                    s.dtype,
                    s.rows,
                    s.cols,
                    stride,
                    loc,
                )),
            };
            ctx.divergence(
                Divergence {
                    num_items,
                    student: Matrix::from_raw(sp, s.dtype, s.rows, s.cols, s.stride, loc),
                    teacher,
                    labels,
                    per_token,
                    loss,
                    grad,
                },
                &case.params,
                launch,
            )
        }
    }
}

/// How a CUDA run provides its workspace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Workspace {
    /// The library allocates (stream-ordered).
    Library,
    /// A caller buffer of exactly the queried size.
    Exact,
    /// A caller buffer of this many bytes.
    Bytes(usize),
    /// A caller buffer of the queried size that starts one byte into its allocation.
    Misaligned,
}

/// CUDA device 0 with a context of the library and a cudarc stream for the test's memory.
pub struct CudaDev {
    pub ctx: Context,
    pub cu: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// A backend to run cases on.
pub enum Device {
    Cpu(Context),
    Cuda(CudaDev),
}

/// Writes a line straight to the terminal (not captured by the test harness).
pub fn visible(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Why CUDA tests cannot run here, or `None` when CUDA device 0 is usable.
pub fn cuda_unavailable() -> Option<String> {
    if compiled_cuda_archs().is_empty() {
        return Some("library built without CUDA kernels (nvcc not found at build time)".into());
    }
    if cuda_device_count() == 0 {
        return Some("no CUDA device".into());
    }
    None
}

/// CUDA device 0 when present (panics if a device is present but cannot be opened); prints a
/// visible SKIPPED line otherwise.
pub fn cuda(test: &str) -> Option<CudaDev> {
    static SKIPPED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if let Some(why) = cuda_unavailable() {
        let mut seen = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.iter().any(|t| t == test) {
            seen.push(test.to_string());
            visible(&format!("SKIPPED cuda part of {test}: {why}"));
        }
        return None;
    }
    let ctx = Context::cuda(0).unwrap_or_else(|e| panic!("CUDA device present but: {e}"));
    let cu = CudaContext::new(0).expect("cudarc context");
    let stream = cu.new_stream().expect("cudarc stream");
    Some(CudaDev { ctx, cu, stream })
}

/// The CPU, plus CUDA device 0 when present (with a visible skip line when not).
pub fn devices(test: &str) -> Vec<Device> {
    let mut out = vec![Device::Cpu(Context::cpu())];
    if let Some(c) = cuda(test) {
        out.push(Device::Cuda(c));
    }
    out
}

impl Device {
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu(_) => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
    pub fn context(&self) -> &Context {
        match self {
            Device::Cpu(c) => c,
            Device::Cuda(c) => &c.ctx,
        }
    }

    /// Runs `case` with poisoned outputs; returns the call's result and every buffer before and
    /// after it.
    pub fn run(&self, case: &Case) -> (Result<(), Error>, Bufs, Bufs) {
        self.run_ws(case, Workspace::Library)
    }

    pub fn run_ws(&self, case: &Case, ws: Workspace) -> (Result<(), Error>, Bufs, Bufs) {
        let before = Bufs::new(case);
        let mut after = before.clone();
        let result = match self {
            Device::Cpu(ctx) => {
                let base = BasePtrs::host(&mut after);
                // SAFETY: host buffers laid out for the case.
                unsafe { call(ctx, case, base, Location::Host, &Launch::default()) }
            }
            Device::Cuda(dev) => dev.run(case, &mut after, ws),
        };
        (result, before, after)
    }
}

impl CudaDev {
    fn upload(&self, b: &Bytes) -> CudaSlice<u8> {
        self.stream.clone_htod(b.as_ref()).expect("htod")
    }

    pub fn ptr(&self, d: &CudaSlice<u8>) -> *mut u8 {
        let (p, _sync) = d.device_ptr(&self.stream);
        p as usize as *mut u8
    }

    /// Copies `bufs` to the device, runs the case on the test's stream, copies everything back.
    pub fn run(&self, case: &Case, bufs: &mut Bufs, ws: Workspace) -> Result<(), Error> {
        let d_student = self.upload(&bufs.student);
        let d_teacher = self.upload(&bufs.teacher);
        let d_grad = bufs.grad.as_ref().map(|g| self.upload(g));
        let d_labels = bufs.labels.as_ref().map(|g| self.upload(g));
        let d_per_token = self.upload(&bufs.per_token);
        let d_loss = self.upload(&bufs.loss);
        let d_num_items = bufs.num_items.as_ref().map(|g| self.upload(g));
        let base = BasePtrs {
            student: self.ptr(&d_student),
            teacher: self.ptr(&d_teacher),
            grad: d_grad
                .as_ref()
                .map_or(std::ptr::null_mut(), |d| self.ptr(d)),
            labels: d_labels
                .as_ref()
                .map_or(std::ptr::null_mut(), |d| self.ptr(d)),
            per_token: self.ptr(&d_per_token),
            loss: self.ptr(&d_loss),
            num_items: d_num_items
                .as_ref()
                .map_or(std::ptr::null_mut(), |d| self.ptr(d)),
        };
        let ws_bytes = match ws {
            Workspace::Library => None,
            Workspace::Exact => Some(self.ctx.divergence_workspace_size(case.n()).max(1)),
            Workspace::Bytes(b) => Some(b.max(1)),
            Workspace::Misaligned => Some(self.ctx.divergence_workspace_size(case.n()) + 1),
        };
        let d_ws = ws_bytes.map(|b| {
            // SAFETY: scratch memory; the library writes before it reads.
            unsafe { self.stream.alloc::<u8>(b) }.expect("workspace alloc")
        });
        // SAFETY: the stream is live for the whole call and belongs to device 0's primary
        // context, like the library's context.
        let mut launch = unsafe { Launch::on_stream(self.stream.cu_stream() as *mut c_void) };
        if let Some(d) = &d_ws {
            let (offset, len) = match ws {
                Workspace::Bytes(b) => (0, b),
                Workspace::Misaligned => (1, d.len() - 1),
                _ => (0, d.len()),
            };
            // SAFETY: device memory of `len` bytes (or fewer claimed) on device 0, `offset`
            // bytes into an allocation of offset + len or more.
            launch = launch.with_workspace(unsafe {
                VectorMut::from_raw(self.ptr(d).wrapping_add(offset), len, Location::Cuda(0))
            });
        }
        self.stream.synchronize().expect("sync before");
        // SAFETY: device buffers laid out for the case.
        let result = unsafe { call(&self.ctx, case, base, Location::Cuda(0), &launch) };
        self.stream.synchronize().expect("sync after the call");
        let back = |d: &CudaSlice<u8>, h: &mut Bytes| {
            let v = self.stream.clone_dtoh(d).expect("dtoh");
            h.as_mut().copy_from_slice(&v);
        };
        back(&d_student, &mut bufs.student);
        back(&d_teacher, &mut bufs.teacher);
        if let (Some(d), Some(h)) = (&d_grad, bufs.grad.as_mut()) {
            back(d, h);
        }
        if let (Some(d), Some(h)) = (&d_labels, bufs.labels.as_mut()) {
            back(d, h);
        }
        back(&d_per_token, &mut bufs.per_token);
        back(&d_loss, &mut bufs.loss);
        if let (Some(d), Some(h)) = (&d_num_items, bufs.num_items.as_mut()) {
            back(d, h);
        }
        self.stream.synchronize().expect("sync after copies");
        // The workspace and the device buffers are freed here, after the synchronisations.
        result
    }
}

// ------------------------------------------------------------------------------------------
// Outputs and checks
// ------------------------------------------------------------------------------------------

/// Decoded outputs of a successful run.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub per_token: Option<Vec<f32>>,
    pub loss: Option<f32>,
    /// Gradient values `n × v` (decoded), when a gradient was requested.
    pub grad: Option<Vec<f64>>,
    /// Raw bits of the gradient values `n × v`.
    pub grad_bits: Option<Vec<u32>>,
}

fn f32s(b: &Bytes) -> Vec<f32> {
    b.as_ref()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Where the gradient of a case lives in `after`: (bytes, element offset of row 0, spec).
fn grad_location<'a>(case: &Case, after: &'a Bufs) -> Option<(&'a [u8], usize, GradSpec)> {
    match case.grad {
        GradOut::None => None,
        GradOut::Separate(spec) => Some((after.grad.as_ref().unwrap().as_ref(), case.offset, spec)),
        GradOut::InPlace => Some((after.student.as_ref(), case.offset, case.grad_spec())),
        GradOut::IntoStudent { shift, stride } => Some((
            after.student.as_ref(),
            case.offset + shift,
            GradSpec {
                stride,
                ..case.grad_spec()
            },
        )),
    }
}

pub fn outputs(case: &Case, after: &Bufs) -> Outputs {
    let per_token = case.per_token.map(|n| f32s(&after.per_token)[..n].to_vec());
    let loss = case.loss.map(|_| f32s(&after.loss)[0]);
    let (grad, grad_bits) = match grad_location(case, after) {
        None => (None, None),
        Some((bytes, off, g)) => {
            let mut vals = Vec::with_capacity(g.rows * g.cols);
            let mut bits = Vec::with_capacity(g.rows * g.cols);
            for r in 0..g.rows {
                let start = off + r * g.stride;
                let size = g.dtype.size();
                let row = &bytes[start * size..(start + g.cols) * size];
                vals.extend(decode(g.dtype, row));
                bits.extend((0..g.cols).map(|c| elem_bits(g.dtype, row, c)));
            }
            (Some(vals), Some(bits))
        }
    };
    Outputs {
        per_token,
        loss,
        grad,
        grad_bits,
    }
}

/// ‖out − ref‖ / max(‖ref‖, floor); infinite when anything is NaN.
pub fn rel_err(out: &[f64], reference: &[f64], floor: f64) -> f64 {
    assert_eq!(out.len(), reference.len());
    let mut d2 = 0.0;
    let mut r2 = 0.0;
    for (&o, &r) in out.iter().zip(reference) {
        if o.is_nan() || r.is_nan() {
            return f64::INFINITY;
        }
        if o == r {
            // Also covers equal infinities.
            r2 += if r.is_finite() { r * r } else { 0.0 };
            continue;
        }
        d2 += (o - r) * (o - r);
        r2 += r * r;
    }
    let d = d2.sqrt();
    if d == 0.0 {
        return 0.0;
    }
    d / r2.sqrt().max(floor)
}

/// The denominator floor of `rel_err` under which `len` values each off by `abs` still pass a
/// relative tolerance `tol`: an absolute allowance expressed in rel_err's terms (the check then
/// passes within the larger of the relative and the absolute bound).
pub fn abs_floor(floor: f64, abs: f64, len: usize, tol: f64) -> f64 {
    floor.max(abs * (len as f64).sqrt() / tol)
}

/// Tolerances on the relative-norm errors.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub loss: f64,
    pub per_token: f64,
    pub grad: f64,
    /// Lower bound on ‖ref‖ in the denominator.
    pub floor: f64,
    /// Absolute error allowed per token where it exceeds the relative tolerances of the
    /// per-token losses and the loss (0 but for JSD on CUDA: [`Tol::JSD_MUFU_PER_TOKEN`]).
    pub abs_per_token: f64,
}

impl Tol {
    /// The CPU backend computes in f64: only the output rounding is left.
    pub fn cpu(student: DType) -> Self {
        Tol {
            loss: 1e-6,
            per_token: 1e-6,
            // Beyond the rounding to the student dtype (added by `check`).
            grad: match student {
                DType::F32 => 1e-6,
                DType::BF16 | DType::F16 => 1e-3,
            },
            // Where the reference is ~0 (identical rows, V = 1), f64 rounding of O(1) terms
            // (~1e-16) is all that is left: allow it in absolute terms.
            floor: 1e-6,
            abs_per_token: 0.0,
        }
    }

    /// The JSD kernels' base-2 log of each entry's mixture ratio goes through lg2.approx
    /// (absolute error 2^-22) and is weighted by probabilities summing to 1 on each side: a
    /// token's JSD is off by up to ~2^-21 · ln 2 nats whatever its size, which near-identical
    /// rows (high temperature) make a relative error above 1e-5 (H200, 2026-11-28: 1.5e-5 of a
    /// 3.5e-3 JSD at T = 4). cuda/DIVERGENCE.md, "Accuracy of small JSD".
    pub const JSD_MUFU_PER_TOKEN: f64 = 3.3e-7;

    /// DESIGN.md: f32 ≤ 1e-5; bf16/f16 gradients ≤ 1e-2 and losses ≤ 1e-4.
    pub fn cuda(student: DType, teacher: DType) -> Self {
        let all_f32 = student == DType::F32 && teacher == DType::F32;
        Tol {
            loss: if all_f32 { 1e-5 } else { 1e-4 },
            per_token: if all_f32 { 1e-5 } else { 1e-4 },
            grad: if student == DType::F32 { 1e-5 } else { 1e-2 },
            // Absolute allowance where the reference is ~0 (f32 rounding of O(1) terms).
            floor: 1e-2,
            abs_per_token: 0.0,
        }
    }

    pub fn for_device(dev: &Device, case: &Case) -> Self {
        if dev.is_cuda() {
            let jsd = case.params.effective_kind() == Kind::Jsd;
            Tol {
                abs_per_token: if jsd { Tol::JSD_MUFU_PER_TOKEN } else { 0.0 },
                ..Tol::cuda(case.student.dtype, case.teacher.dtype)
            }
        } else {
            Tol::cpu(case.student.dtype)
        }
    }
}

/// Checks that inputs other than an in-place gradient are untouched and that gradient padding
/// and prefixes still hold their poison / NaN padding.
pub fn check_untouched(case: &Case, before: &Bufs, after: &Bufs) -> Result<(), String> {
    if before.teacher != after.teacher {
        return Err("teacher logits were modified".into());
    }
    if before.labels != after.labels {
        return Err("labels were modified".into());
    }
    if before.num_items != after.num_items {
        return Err("num_items was modified".into());
    }
    let s = &case.student;
    let size = s.dtype.size();
    match case.grad {
        GradOut::None | GradOut::Separate(_) => {
            if before.student != after.student {
                return Err("student logits were modified".into());
            }
        }
        GradOut::InPlace | GradOut::IntoStudent { .. } => {
            // Everything outside the gradient's rows × cols must be unchanged.
            let g = case.written_grad().unwrap();
            let shift = match case.grad {
                GradOut::IntoStudent { shift, .. } => shift,
                _ => 0,
            };
            let total = before.student.len() / size;
            for i in 0..total {
                let inside = i >= case.offset + shift && {
                    let j = i - case.offset - shift;
                    j / g.stride.max(1) < g.rows && j % g.stride.max(1) < g.cols
                };
                if !inside
                    && elem_bits(s.dtype, before.student.as_ref(), i)
                        != elem_bits(s.dtype, after.student.as_ref(), i)
                {
                    return Err(format!(
                        "student buffer element {i} outside the gradient was modified"
                    ));
                }
            }
        }
    }
    if let (GradOut::Separate(g), Some(b), Some(a)) = (case.grad, &before.grad, &after.grad) {
        let total = b.len() / g.dtype.size();
        for i in 0..total {
            let inside = i >= case.offset && {
                let j = i - case.offset;
                j / g.stride.max(1) < g.rows && j % g.stride.max(1) < g.cols
            };
            if !inside && elem_bits(g.dtype, a.as_ref(), i) != poison_bits(g.dtype) {
                return Err(format!(
                    "gradient buffer element {i} (padding or prefix) was written"
                ));
            }
        }
    }
    // Output tails beyond the requested lengths.
    let pt = f32s(&after.per_token);
    for (i, x) in pt.iter().enumerate().skip(case.per_token.unwrap_or(0)) {
        if x.to_bits() != POISON_F32 {
            return Err(format!(
                "per-token element {i} beyond the output was written"
            ));
        }
    }
    if case.loss.is_none() && f32s(&after.loss)[0].to_bits() != POISON_F32 {
        return Err("loss written although not requested".into());
    }
    Ok(())
}

/// Checks a run's outputs against `reference` (written everywhere, NaN only in NaN rows,
/// errors within `tol`), and that nothing else changed.
pub fn check(
    case: &Case,
    reference: &Reference,
    before: &Bufs,
    after: &Bufs,
    tol: Tol,
) -> Result<(), String> {
    check_untouched(case, before, after)?;
    let out = outputs(case, after);
    let n = case.n();
    let v = case.v();
    if let Some(pt) = &out.per_token {
        let mut o = Vec::new();
        let mut r = Vec::new();
        for (i, &x) in pt.iter().enumerate().take(n) {
            if x.to_bits() == POISON_F32 {
                return Err(format!("per-token loss {i} was not written"));
            }
            if reference.nan_rows[i] {
                if !x.is_nan() {
                    return Err(format!("per-token loss {i} should be NaN, got {x}"));
                }
            } else {
                o.push(x as f64);
                r.push(reference.per_token[i]);
            }
        }
        let floor = abs_floor(tol.floor, tol.abs_per_token, o.len(), tol.per_token);
        let e = rel_err(&o, &r, floor);
        if e > tol.per_token {
            return Err(format!(
                "per-token loss error {e:.3e} > {:.1e}\n  got {:?}\n  ref {:?}",
                tol.per_token,
                &o[..o.len().min(8)],
                &r[..r.len().min(8)]
            ));
        }
    }
    if let Some(l) = out.loss {
        if l.to_bits() == POISON_F32 {
            return Err("loss was not written".into());
        }
        if reference.loss.is_nan() {
            if !l.is_nan() {
                return Err(format!("loss should be NaN, got {l}"));
            }
        } else {
            // The loss is the per-token losses times one factor (1 for sum, 1 / the divisor
            // for batchmean): each token's allowance times that factor.
            let finite: Vec<f64> = (0..n)
                .filter(|&i| !reference.nan_rows[i])
                .map(|i| reference.per_token[i])
                .collect();
            let total: f64 = finite.iter().sum();
            let factor = if total > 0.0 && reference.loss.is_finite() {
                reference.loss / total
            } else {
                1.0
            };
            let abs = tol.abs_per_token * finite.len() as f64 * factor;
            let floor = abs_floor(tol.floor, abs, 1, tol.loss);
            let e = rel_err(&[l as f64], &[reference.loss], floor);
            if e > tol.loss {
                return Err(format!(
                    "loss error {e:.3e} > {:.1e}: got {l}, ref {}",
                    tol.loss, reference.loss
                ));
            }
        }
    }
    if let (Some(g), Some(bits), Some(spec)) = (&out.grad, &out.grad_bits, case.written_grad()) {
        let mut o = Vec::new();
        let mut r = Vec::new();
        for row in 0..n {
            for c in 0..v {
                let i = row * v + c;
                if bits[i] == poison_bits(spec.dtype) {
                    return Err(format!("gradient [{row}, {c}] was not written"));
                }
                if reference.nan_rows[row] {
                    if !g[i].is_nan() {
                        return Err(format!("gradient [{row}, {c}] should be NaN, got {}", g[i]));
                    }
                } else {
                    o.push(g[i]);
                    r.push(reference.grad[i]);
                }
            }
        }
        let e = rel_err(&o, &r, tol.floor);
        // The error the student dtype itself forces (f16 gradients of large vocabularies are
        // subnormal): no implementation can beat the reference rounded to that dtype.
        let rounded: Vec<f64> = r.iter().map(|&x| round_to(spec.dtype, x)).collect();
        let inherent = rel_err(&rounded, &r, tol.floor);
        if e > tol.grad + inherent {
            let worst = (0..o.len())
                .max_by(|&a, &b| {
                    (o[a] - r[a])
                        .abs()
                        .partial_cmp(&(o[b] - r[b]).abs())
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
                .unwrap_or(0);
            return Err(format!(
                "gradient error {e:.3e} > {:.1e} + {inherent:.1e} (rounding) (worst flat index {worst}: got {}, ref {})",
                tol.grad,
                o.get(worst).copied().unwrap_or(f64::NAN),
                r.get(worst).copied().unwrap_or(f64::NAN)
            ));
        }
    }
    Ok(())
}

/// Runs `case` on `dev`, checks it against the independent reference, and on CUDA also against
/// the CPU backend. Panics with the case description on failure. Returns the outputs.
pub fn run_checked(dev: &Device, case: &Case) -> (Outputs, Bufs) {
    let (res, before, after) = dev.run(case);
    if let Err(e) = res {
        panic!("[{}] {}: call failed: {e}", dev.name(), case.what);
    }
    let reference = reference(case);
    let tol = Tol::for_device(dev, case);
    if let Err(msg) = check(case, &reference, &before, &after, tol) {
        panic!("[{}] {}: {msg}", dev.name(), case.what);
    }
    let out = outputs(case, &after);
    if dev.is_cuda() {
        // CUDA against the crate's CPU backend too (the oracle the rest of the suite checks).
        let cpu = Device::Cpu(Context::cpu());
        let (res, _, cpu_after) = cpu.run(case);
        res.unwrap_or_else(|e| panic!("[cpu] {}: {e}", case.what));
        let co = outputs(case, &cpu_after);
        let as_ref = Reference {
            per_token: co.per_token.clone().map_or_else(
                || reference.per_token.clone(),
                |p| p.iter().map(|&x| x as f64).collect(),
            ),
            loss: co.loss.map_or(reference.loss, |l| l as f64),
            grad: co.grad.clone().unwrap_or_else(|| reference.grad.clone()),
            nan_rows: reference.nan_rows.clone(),
        };
        // Both outputs are rounded to the student dtype: allow the rounding error of each
        // (relative to the f64 reference) on top of the tolerance.
        let slack = case.written_grad().map_or(0.0, |g| {
            let valid: Vec<usize> = (0..case.n() * case.v())
                .filter(|&i| !reference.nan_rows[i / case.v().max(1)])
                .collect();
            let r: Vec<f64> = valid.iter().map(|&i| reference.grad[i]).collect();
            let rounded: Vec<f64> = r.iter().map(|&x| round_to(g.dtype, x)).collect();
            2.0 * rel_err(&rounded, &r, tol.floor)
        });
        let tol = Tol {
            grad: tol.grad + slack,
            ..tol
        };
        if let Err(msg) = check(case, &as_ref, &before, &after, tol) {
            panic!("[cuda vs cpu backend] {}: {msg}", case.what);
        }
    }
    (out, after)
}

/// Every (student, teacher) dtype pair.
pub fn dtype_pairs() -> Vec<(DType, DType)> {
    let mut out = Vec::new();
    for s in DType::ALL {
        for t in DType::ALL {
            out.push((s, t));
        }
    }
    out
}

/// The kinds to cover: forward, reverse, and JSD with β ∈ {0, 0.25, 0.5, 1}.
/// The kind the launcher runs for `kind` at this β (JSD β = 0 / 1: forward / reverse KL).
pub fn effective_kind(kind: Kind, beta: f32) -> Kind {
    Params {
        beta,
        ..Params::new(kind)
    }
    .effective_kind()
}

pub fn kinds() -> Vec<Params> {
    let mut out = vec![Params::new(Kind::ForwardKl), Params::new(Kind::ReverseKl)];
    // β = 0 / 1 run the KL kernels; 1e-3 the jsdx kernels (series tails) on CUDA.
    for beta in [0.0, 0.25, 0.5, 1.0, 1e-3] {
        out.push(Params {
            beta,
            ..Params::new(Kind::Jsd)
        });
    }
    out
}

/// Asserts `f` returns an error of `kind`.
#[track_caller]
pub fn assert_kind(res: Result<(), Error>, kind: distill_kernels::ErrorKind, what: &str) {
    match res {
        Ok(()) => panic!("{what}: expected {kind:?}, the call succeeded"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{what}: wrong error kind ({e})");
            assert!(!e.message().is_empty(), "{what}: empty error message");
        }
    }
}

// ------------------------------------------------------------------------------------------
// C toolchain helpers (capi/tests/c_abi.rs, capi/src/tests/abi_layout.rs)
// ------------------------------------------------------------------------------------------

/// The repository root.
pub fn repo_root() -> std::path::PathBuf {
    // The workspace root, also from the C ABI crate's tests (capi/).
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|d| d.join("include/distill_kernels.h").is_file())
        .unwrap_or(manifest)
        .to_path_buf()
}

/// The target directory of the running test's profile (`target/<profile>`): the test binary
/// lives in its `deps/`.
pub fn profile_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// A scratch directory for this test's C artefacts (under the profile's target directory).
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let k = COUNTER.fetch_add(1, Ordering::Relaxed);
    let d = profile_dir()
        .join("c-tests")
        .join(format!("{name}-{}-{k}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// The host's target triple, for the `cc` crate outside a build script.
pub fn host_triple() -> String {
    let arch = std::env::consts::ARCH;
    match std::env::consts::OS {
        "linux" => format!("{arch}-unknown-linux-gnu"),
        "macos" => format!("{arch}-apple-darwin"),
        os => format!("{arch}-unknown-{os}"),
    }
}

/// The system C (or, with `cpp`, C++) compiler as found by the `cc` crate at `opt_level`, as a
/// command. Where none can run (a GPU machine with only the prebuilt test binaries), prints a
/// visible SKIPPED line and returns `None` — except under CI (`CI` set), where that is a failure.
fn system_compiler(test: &str, cpp: bool, opt_level: u32) -> Option<std::process::Command> {
    let triple = host_triple();
    let language = if cpp { "C++" } else { "C" };
    let tool = cc::Build::new()
        .cpp(cpp)
        .target(&triple)
        .host(&triple)
        .opt_level(opt_level)
        .debug(false)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .try_get_compiler();
    let why = match &tool {
        Err(e) => Some(format!("the cc crate found no {language} compiler: {e}")),
        Ok(t) => {
            let runs = std::process::Command::new(t.path())
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            (!runs).then(|| format!("{} does not run", t.path().display()))
        }
    };
    if let Some(why) = why {
        assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
        visible(&format!("SKIPPED {test}: {why}"));
        return None;
    }
    Some(tool.unwrap().to_command())
}

/// The system C compiler (see `system_compiler`) with C99 and strict warnings, `-O1`.
pub fn c_compiler(test: &str) -> Option<std::process::Command> {
    let mut cmd = system_compiler(test, false, 1)?;
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror"]);
    Some(cmd)
}

/// The system C++ compiler (see `system_compiler`) with C++17 and strict warnings, `-O2`.
pub fn cpp_compiler(test: &str) -> Option<std::process::Command> {
    let mut cmd = system_compiler(test, true, 2)?;
    cmd.args(["-std=c++17", "-Wall", "-Wextra", "-Werror"]);
    Some(cmd)
}

/// Runs `check(i)` for every case index `0..count` on a few threads (the emulator drivers are
/// single-threaded processes), prints each passing case's label and log and a summary, and
/// fails with every failing case's label and reason. `check` returns (label, Ok(log) or Err).
pub fn run_cases_parallel(
    test: &str,
    count: usize,
    check: impl Fn(usize) -> (String, Result<String, String>) + Sync,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let t0 = Instant::now();
                match check(i) {
                    (what, Ok(log)) => visible(&format!(
                        "{test} case {i} ok ({:.2}s): {what}\n    {log}",
                        t0.elapsed().as_secs_f64()
                    )),
                    (what, Err(e)) => failures
                        .lock()
                        .unwrap()
                        .push(format!("case {i}: {what}\n  {e}")),
                }
            });
        }
    });
    visible(&format!(
        "{test}: {count} cases in {:.1}s",
        start.elapsed().as_secs_f64()
    ));
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs an emulator driver with `input` on its stdin: its stdout (checked to be `expect` bytes
/// long) and its stderr log, trimmed; or, when it exits with a failure or returns the wrong
/// number of bytes, the reason with its log.
pub fn run_emulator(
    exe: &std::path::Path,
    input: Vec<u8>,
    expect: usize,
) -> Result<(Vec<u8>, String), String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run the emulator {}: {e}", exe.display()));
    let mut stdin = child.stdin.take().unwrap();
    // Written from another thread: the driver may fill its stdout before it has read it all.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("emulator output");
    let _ = writer.join().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    if !out.status.success() {
        return Err(format!("the emulator stopped ({}):\n{log}", out.status));
    }
    if out.stdout.len() != expect {
        return Err(format!(
            "the emulator returned {} bytes, {expect} expected",
            out.stdout.len()
        ));
    }
    Ok((out.stdout, log))
}

/// Builds a host simulator of kernel code (`tests/kernel_sim/<source>`, compiled as C++17 with
/// `cuda/include` on the include path) with the system C++ compiler. `None`, with a visible
/// SKIPPED line, where there is no C++ compiler — except under CI, where that is a failure.
pub fn kernel_simulator(test: &str, source: &str) -> Option<std::path::PathBuf> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    build_kernel_simulator(
        test,
        &root.join("tests/kernel_sim").join(source),
        &[root.join("cuda/include")],
        &[],
    )
}

/// Builds the C++17 program `source` (strict warnings, `-O2`, plus `extra` flags) with
/// `includes` on the include path, in order, into this test's scratch directory. `None`, with a
/// visible SKIPPED line, where there is no C++ compiler that runs — except under CI, where that
/// is a failure.
pub fn build_kernel_simulator(
    test: &str,
    source: &std::path::Path,
    includes: &[std::path::PathBuf],
    extra: &[&str],
) -> Option<std::path::PathBuf> {
    let stem = source.file_stem().expect("source file name");
    let exe = scratch_dir(test).join(stem);
    let mut cmd = cpp_compiler(test)?;
    cmd.arg("-fno-fast-math").args(extra);
    for dir in includes {
        cmd.arg(format!("-I{}", dir.display()));
    }
    cmd.arg(source).arg("-o").arg(&exe);
    let (ok, out) = run_command(&mut cmd);
    assert!(ok, "{test}: building the kernel simulator failed:\n{out}");
    Some(exe)
}

/// The program and its arguments (without the environment), for messages.
pub fn describe(cmd: &std::process::Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command, returning (success, the command line, then stdout + stderr).
pub fn run_command(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    let mut text = format!("$ {}\n", describe(cmd));
    text += &String::from_utf8_lossy(&out.stdout);
    text += &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Flags for the emulator drivers: CUDA idioms the host compiler warns about (`#pragma
/// unroll`, threadIdx.x (unsigned) against int lengths, aggregates initialised up to their
/// accumulators).
pub const EMULATOR_CXX_FLAGS: &[&str] = &[
    "-Wno-unknown-pragmas",
    "-Wno-sign-compare",
    "-Wno-missing-field-initializers",
];

/// Stages `cuda/<file>` for the host emulator in this test's scratch directory, its static
/// `__shared__` arrays rewritten as the emulator's guarded ones (`rewrite_shared`), and returns
/// the directory. The environment variable `override_var`, when set, names a file staged
/// instead (to check that a test catches a deliberately broken copy).
pub fn stage_kernel_source(test: &str, file: &str, override_var: &str) -> std::path::PathBuf {
    let stage = scratch_dir(test).join("kernel");
    std::fs::create_dir_all(&stage).expect("create the staging directory");
    let src = match std::env::var_os(override_var) {
        Some(alt) => {
            let alt = std::path::PathBuf::from(alt);
            visible(&format!(
                "{test}: kernel source {} ({override_var})",
                alt.display()
            ));
            alt
        }
        None => repo_root().join("cuda").join(file),
    };
    let text = std::fs::read_to_string(&src).expect("read the kernel source");
    std::fs::write(stage.join(file), rewrite_shared(&text))
        .unwrap_or_else(|e| panic!("stage {file}: {e}"));
    stage
}

/// Builds the emulator driver `tests/divergence_sim/<driver>`, which includes cuda/divergence.cu
/// (through tests/divergence_sim/divergence_cu.h) staged by [`stage_kernel_source`]
/// (`DK_SIM_DIVERGENCE_CU=<file>` stages that file instead). `None` where there is no C++
/// compiler (see `build_kernel_simulator`).
pub fn divergence_cu_simulator(test: &str, driver: &str) -> Option<std::path::PathBuf> {
    let root = repo_root();
    let stage = stage_kernel_source(test, "divergence.cu", "DK_SIM_DIVERGENCE_CU");
    build_kernel_simulator(
        test,
        &root.join("tests/divergence_sim").join(driver),
        &[
            stage,
            root.join("cuda/include"),
            root.join("tests/attention_sim"),
        ],
        EMULATOR_CXX_FLAGS,
    )
}

/// Rewrites each static `__shared__ [__align__(n)] T name[dims];` as
/// `SIM_SHARED(T, name, [dims]);` (the driver's guarded arrays); every `__shared__` in the file
/// must be such a declaration. Used to stage a kernel file for the host emulator
/// (tests/attention_sim/sim_core.h), whose `__shared__` is empty.
pub fn rewrite_shared(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    let mut count = 0;
    while let Some(at) = rest.find("__shared__") {
        out += &rest[..at];
        let decl_end = rest[at..]
            .find(';')
            .expect("a __shared__ declaration ends with ;")
            + at;
        let decl = rest[at + "__shared__".len()..decl_end].trim();
        let decl = match decl.strip_prefix("__align__(") {
            Some(r) => r[r.find(')').unwrap() + 1..].trim(),
            None => decl,
        };
        let bracket = decl
            .find('[')
            .unwrap_or_else(|| panic!("not an array: {decl}"));
        let (head, dims) = (decl[..bracket].trim(), decl[bracket..].trim());
        let space = head.rfind(' ').unwrap_or_else(|| panic!("no type: {decl}"));
        let (ty, name) = (head[..space].trim(), head[space + 1..].trim());
        assert!(
            !ty.is_empty()
                && name.chars().all(|c| c.is_alphanumeric() || c == '_')
                && dims.ends_with(']')
                && !dims.contains(','),
            "unexpected __shared__ declaration: {decl}"
        );
        out += &format!("SIM_SHARED({ty}, {name}, {dims});");
        rest = &rest[decl_end + 1..];
        count += 1;
    }
    out += rest;
    assert!(count > 0, "no __shared__ declaration rewritten");
    out
}
