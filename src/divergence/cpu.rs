//! CPU backend: the exact reference. f64 throughout, multi-threaded over rows, deterministic
//! (each row is computed by one thread and the row losses are summed in row order).

use half::{bf16, f16};

use super::{Kind, Params, RawDivergence, Reduction};
use crate::error::Result;
use crate::host_alloc::filled;
use crate::parallel::{for_each_chunk_with_scratch, Shared};
use crate::tensor::{DType, Element};

/// Loss of one row and, when `grad` is given, d(loss)/dz for z = logits / T (unscaled).
///
/// `b` and `a` are the student and teacher logits already divided by T. Masked entries (−inf)
/// contribute 0; a row with no finite entry on either side has loss 0 and gradient 0; NaN or
/// +inf anywhere makes the loss NaN.
///
/// # Panics
/// If `a` or `grad` is shorter than `b`.
pub fn row_divergence(
    kind: Kind,
    beta: f64,
    b: &[f64],
    a: &[f64],
    grad: Option<&mut [f64]>,
) -> f64 {
    thread_local! {
        /// e^(x − max) of the student and teacher rows, kept from the log-sum-exp pass so the
        /// loss and gradient passes need no exponential of their own for p and q.
        static SHIFTED: std::cell::RefCell<(Vec<f64>, Vec<f64>)> = const {
            std::cell::RefCell::new((Vec::new(), Vec::new()))
        };
    }
    // `try_with`: a call made while its thread exits (from a C thread-key destructor) finds the
    // thread-local gone, and `with` would panic; such a call uses buffers of its own.
    let mut grad = grad;
    SHIFTED
        .try_with(|cell| {
            let (eb, ea) = &mut *cell.borrow_mut();
            row_divergence_with(kind, beta, b, a, grad.take(), eb, ea)
        })
        .unwrap_or_else(|_| {
            let (mut eb, mut ea) = (Vec::new(), Vec::new());
            row_divergence_with(kind, beta, b, a, grad.take(), &mut eb, &mut ea)
        })
}

/// A row's softmax normaliser: its maximum `max` and `sum` = Σ e^(x − max), with
/// `e[i] = e^(x[i] − max)` left in the caller's buffer.
struct Normaliser {
    max: f64,
    sum: f64,
}

impl Normaliser {
    /// The log-sum-exp, max + ln(sum): NaN for a NaN row, −inf for one with nothing finite.
    fn lse(&self) -> f64 {
        self.max + self.sum.ln()
    }

    /// log softmax of an entry x: (x − max) − ln(sum). Not x − lse: where the maximum is huge
    /// (a whole row at a finite mask, torch.finfo(dtype).min ≈ −3.4e38), max + ln(sum) rounds
    /// back to max and the entries would lose ln(sum) entirely; x − max is exact there.
    fn log_prob(&self, x: f64) -> f64 {
        (x - self.max) - self.sum.ln()
    }
}

/// The normaliser of `x`, with `e[i] = e^(x[i] − max)` left in `e` (untouched when the max is
/// −inf or NaN: the sum is then 1, so that the lse is that max).
fn log_sum_exp(x: &[f64], e: &mut Vec<f64>) -> Normaliser {
    let max = x.iter().fold(
        f64::NEG_INFINITY,
        |m, &v| if v > m || v.is_nan() { v } else { m },
    );
    if max == f64::NEG_INFINITY || max.is_nan() {
        return Normaliser { max, sum: 1.0 };
    }
    e.clear();
    e.extend(x.iter().map(|&v| (v - max).exp()));
    let sum = e.iter().sum::<f64>();
    Normaliser { max, sum }
}

fn row_divergence_with(
    kind: Kind,
    beta: f64,
    b: &[f64],
    a: &[f64],
    grad: Option<&mut [f64]>,
    eb: &mut Vec<f64>,
    ea: &mut Vec<f64>,
) -> f64 {
    let (zs, zt) = (log_sum_exp(b, eb), log_sum_exp(a, ea));
    let (lzs, lzt, ss, st) = (zs.lse(), zt.lse(), zs.sum, zt.sum);
    if lzs.is_nan() || lzt.is_nan() || lzs == f64::INFINITY || lzt == f64::INFINITY {
        if let Some(g) = grad {
            g.fill(f64::NAN);
        }
        return f64::NAN;
    }
    if lzs == f64::NEG_INFINITY || lzt == f64::NEG_INFINITY {
        if let Some(g) = grad {
            g.fill(0.0);
        }
        return 0.0;
    }
    // log p, log q and p, q for entry i; masked entries give log = −inf and prob = 0. p and q
    // are e^(x − max) / Σ e^(x − max), from the log-sum-exp pass.
    let (inv_st, inv_ss) = (1.0 / st, 1.0 / ss);
    let lp = |i: usize| zt.log_prob(a[i]);
    let lq = |i: usize| zs.log_prob(b[i]);
    let p = |i: usize| ea[i] * inv_st;
    let q = |i: usize| eb[i] * inv_ss;
    let (lb, l1b) = (beta.ln(), (-beta).ln_1p());
    let lm = |i: usize| log_add_exp(lp(i) + lb, lq(i) + l1b);
    // x · (y − z) with the convention 0 · anything = 0 (masked entries).
    let xlog = |x: f64, d: f64| if x == 0.0 { 0.0 } else { x * d };
    let v = b.len();
    // The sums of a row in one pass, then the gradient where it needs the row's loss: each
    // entry's mixture log is formed once, not once per sum (every sum runs in index order).
    let mut grad = grad;
    match kind {
        Kind::ForwardKl => {
            let mut loss = -0.0;
            for i in 0..v {
                let p = p(i);
                loss += xlog(p, lp(i) - lq(i));
                if let Some(g) = grad.as_deref_mut() {
                    g[i] = q(i) - p;
                }
            }
            loss
        }
        Kind::ReverseKl => {
            let mut loss = -0.0;
            for i in 0..v {
                loss += xlog(q(i), lq(i) - lp(i));
            }
            if let Some(g) = grad {
                for (i, gi) in g.iter_mut().enumerate() {
                    *gi = xlog(q(i), lq(i) - lp(i) - loss);
                }
            }
            loss
        }
        Kind::Jsd => {
            let (mut kl_pm, mut kl_qm) = (-0.0, -0.0);
            for i in 0..v {
                let m = lm(i);
                kl_pm += xlog(p(i), lp(i) - m);
                kl_qm += xlog(q(i), lq(i) - m);
                if let Some(g) = grad.as_deref_mut() {
                    // log(q/m), finished below once KL(q‖m) is known.
                    g[i] = lq(i) - m;
                }
            }
            if let Some(g) = grad {
                for (i, gi) in g.iter_mut().enumerate() {
                    *gi = (1.0 - beta) * xlog(q(i), *gi - kl_qm);
                }
            }
            beta * kl_pm + (1.0 - beta) * kl_qm
        }
    }
}

/// log(e^x + e^y) without overflow; −inf when both are −inf.
pub fn log_add_exp(x: f64, y: f64) -> f64 {
    let m = x.max(y);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((x - m).exp() + (y - m).exp()).ln()
}

/// Reads `v` elements of row `row` and multiplies them by `scale`.
///
/// # Safety
/// `ptr` must point to host memory holding row `row` of a `dtype` matrix with `stride`.
unsafe fn read_row(
    ptr: *const u8,
    dtype: DType,
    stride: usize,
    row: usize,
    scale: f64,
    out: &mut [f64],
) {
    unsafe fn widen<T: Element>(
        p: *const u8,
        stride: usize,
        row: usize,
        scale: f64,
        out: &mut [f64],
    ) {
        // SAFETY: the caller guarantees the row is in bounds.
        let src = unsafe { std::slice::from_raw_parts(p.cast::<T>().add(row * stride), out.len()) };
        for (o, &x) in out.iter_mut().zip(src) {
            *o = x.to_f64() * scale;
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            DType::F32 => widen::<f32>(ptr, stride, row, scale, out),
            DType::BF16 => widen::<bf16>(ptr, stride, row, scale, out),
            DType::F16 => widen::<f16>(ptr, stride, row, scale, out),
        }
    }
}

/// Writes `values × scale` into row `row`, rounding to `dtype`.
///
/// # Safety
/// `ptr` must point to writable host memory holding row `row` of a `dtype` matrix with `stride`,
/// not read or written by another thread meanwhile.
unsafe fn write_row(
    ptr: *mut u8,
    dtype: DType,
    stride: usize,
    row: usize,
    scale: f64,
    values: &[f64],
) {
    unsafe fn narrow<T: Element>(
        p: *mut u8,
        stride: usize,
        row: usize,
        scale: f64,
        values: &[f64],
    ) {
        // SAFETY: the caller guarantees the row is in bounds and exclusively ours.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(p.cast::<T>().add(row * stride), values.len())
        };
        for (d, &x) in dst.iter_mut().zip(values) {
            *d = T::from_f64(x * scale);
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            DType::F32 => narrow::<f32>(ptr, stride, row, scale, values),
            DType::BF16 => narrow::<bf16>(ptr, stride, row, scale, values),
            DType::F16 => narrow::<f16>(ptr, stride, row, scale, values),
        }
    }
}

/// The divisor `batchmean` uses and the factor the gradient is scaled by.
///
/// # Safety
/// `raw.labels` is null or points to `raw.n` host i64 values; `raw.num_items` is null or points
/// to one host f32.
pub(crate) unsafe fn loss_scale(raw: &RawDivergence, params: &Params) -> f64 {
    // SAFETY: forwarded from the caller.
    unsafe { reduction_scale(raw.labels, raw.n, raw.num_items, params) }
}

/// The factor the reduction multiplies the summed row losses (and the gradient) by: 1 for
/// `sum` / `none`, `1 / num_items` or `1 / max(1, valid rows)` for `batchmean`, the valid rows
/// counted over all `n` labels (rows whose label is not `ignore_index`; all rows without labels).
/// `num_items_mem` (or null) is `num_items` held in memory, read here; a value there that is
/// not finite and at least `f32::MIN_POSITIVE` (2^-126) gives the sum (factor 1), as on CUDA.
///
/// # Safety
/// `labels` is null or points to `n` host i64 values; `num_items_mem` is null or points to one
/// host f32.
pub(crate) unsafe fn reduction_scale(
    labels: *const i64,
    n: usize,
    num_items_mem: *const f32,
    params: &Params,
) -> f64 {
    match params.reduction {
        Reduction::Sum | Reduction::None => 1.0,
        Reduction::BatchMean => {
            if !num_items_mem.is_null() {
                // SAFETY: the caller guarantees one readable f32.
                let d = unsafe { num_items_mem.read() };
                return if d.is_finite() && d >= f32::MIN_POSITIVE {
                    1.0 / d as f64
                } else {
                    1.0
                };
            }
            if let Some(n) = params.num_items {
                return 1.0 / n as f64;
            }
            let valid = if labels.is_null() {
                n
            } else {
                // SAFETY: the caller guarantees n labels.
                let labels = unsafe { std::slice::from_raw_parts(labels, n) };
                labels.iter().filter(|&&l| l != params.ignore_index).count()
            };
            1.0 / valid.max(1) as f64
        }
    }
}

/// Runs the whole call on the host.
///
/// # Safety
/// The pointers of `raw` must be valid host memory for the shape it describes (validated by the
/// caller), with outputs not aliasing inputs except a gradient exactly over the student logits.
///
/// # Errors
/// [`crate::error::ErrorKind::OutOfMemory`] where the host refuses the f64 rows (2 or 3 · V values
/// per worker thread) or the row losses; nothing is written then.
pub(crate) unsafe fn divergence(raw: &RawDivergence, params: &Params) -> Result<()> {
    let kind = params.effective_kind();
    let beta = params.beta as f64;
    let inv_t = 1.0 / params.temperature as f64;
    // SAFETY: labels validated by the caller.
    let scale = unsafe { loss_scale(raw, params) };
    let (n, v) = (raw.n, raw.v);
    // SAFETY: each worker reads shared inputs and writes only its own rows of the outputs.
    let shared = unsafe { Shared::new(*raw) };
    let ignore = params.ignore_index;
    let mut row_loss = filled(n, 0.0f64, "the CPU divergence's row losses")?;
    // Each worker's f64 rows: student, teacher and, with a gradient, the gradient.
    let scratch = if raw.grad.is_null() { 2 * v } else { 3 * v };
    let what = "the CPU divergence's f64 rows (2 or 3 · V values per thread)";
    // Small calls stay on the calling thread (a thread start costs more than their rows).
    for_each_chunk_with_scratch(&mut row_loss, v, scratch, what, |first, chunk, mem| {
        let raw = shared.get();
        let (b, rest) = mem.split_at_mut(v);
        let (a, g) = rest.split_at_mut(v);
        for (k, out) in chunk.iter_mut().enumerate() {
            let row = first + k;
            // SAFETY: row < n, labels hold n values when non-null.
            let ignored = !raw.labels.is_null() && unsafe { *raw.labels.add(row) } == ignore;
            if ignored {
                *out = 0.0;
                g.fill(0.0);
            } else {
                // SAFETY: row < n within the validated shapes.
                unsafe {
                    read_row(
                        raw.student,
                        raw.student_dtype,
                        raw.student_stride,
                        row,
                        inv_t,
                        b,
                    );
                    read_row(
                        raw.teacher,
                        raw.teacher_dtype,
                        raw.teacher_stride,
                        row,
                        inv_t,
                        a,
                    );
                }
                let grad = (!raw.grad.is_null()).then_some(&mut *g);
                let loss = row_divergence(kind, beta, b, a, grad);
                // A divergence is >= 0; rounding of equal rows can give -1e-16 (NaN stays).
                *out = if loss < 0.0 { 0.0 } else { loss };
            }
            if !raw.grad.is_null() {
                // SAFETY: this thread owns row `row` of the gradient; the student row
                // (which may be the same memory) was read above.
                unsafe {
                    write_row(
                        raw.grad,
                        raw.student_dtype,
                        raw.grad_stride,
                        row,
                        scale * inv_t,
                        g,
                    )
                };
            }
        }
    })?;
    if !raw.per_token.is_null() {
        for (i, &l) in row_loss.iter().enumerate() {
            // SAFETY: per_token holds n f32 values.
            unsafe { *raw.per_token.add(i) = l as f32 };
        }
    }
    if !raw.loss.is_null() {
        let total: f64 = row_loss.iter().sum();
        // SAFETY: loss holds one f32.
        unsafe { *raw.loss = (total * scale) as f32 };
    }
    Ok(())
}
