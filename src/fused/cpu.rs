//! CPU backend of the fused linear divergence: the exact reference. f64 throughout (logits by
//! dot products, the divergence of [`crate::divergence::cpu::row_divergence`], the chain
//! rule, both gradient products), multi-threaded over rows (and over vocabulary rows for the
//! weight gradient), one rounding per output element.
//!
//! Chunks only bound the scratch memory: every f64 sum runs in the same order whatever the chunk
//! size (a weight-gradient row accumulates its rows in row order, across chunks), so the results
//! are bitwise independent of `chunk_rows`.
//!
//! The three products work on blocks of up to 8 rows (logits and hidden gradient: hidden rows;
//! weight gradient: vocabulary rows), so each row of the matrix they stream is read once per
//! block and the block's sums run side by side. Each sum still adds its terms one at a time in
//! index order, so a value is the same bits whichever block it falls in (1.6–1.7× faster than
//! one row at a time on a 2-core host, bitwise the same results).

use half::{bf16, f16};

use super::{FusedLinearParams, RawFusedLinear};
use crate::divergence::cpu::{reduction_scale, row_divergence};
use crate::divergence::Kind;
use crate::error::Result;
use crate::host_alloc;
use crate::tensor::{DType, Element};

/// What an allocation of the fused reference is for, in an
/// [`OutOfMemory`](crate::error::ErrorKind::OutOfMemory) message: it widens whole operands to f64
/// (a 152k × 4096 weight is 5 GB).
fn purpose(what: &str) -> String {
    format!(
        "the f64 {what} of the CPU fused linear divergence (it widens whole operands: \
         O((N + V)·H) memory)"
    )
}

/// An empty f64 buffer with room for `len` values, or
/// [`OutOfMemory`](crate::error::ErrorKind::OutOfMemory) where the host refuses it.
fn f64_buffer(len: usize, what: &str) -> Result<Vec<f64>> {
    host_alloc::with_capacity(len, &purpose(what))
}

/// [`f64_buffer`] filled with `len` zeros.
fn f64_zeros(len: usize, what: &str) -> Result<Vec<f64>> {
    host_alloc::filled(len, 0.0, &purpose(what))
}

/// Reads a `rows × cols` matrix with `stride` into a compact f64 buffer (`what` names it in an
/// allocation failure).
///
/// # Safety
/// `ptr` must be valid host memory for the matrix.
unsafe fn read_matrix(
    what: &str,
    ptr: *const u8,
    dtype: DType,
    rows: usize,
    cols: usize,
    stride: usize,
) -> Result<Vec<f64>> {
    unsafe fn widen<T: Element>(
        p: *const u8,
        rows: usize,
        cols: usize,
        stride: usize,
        out: &mut Vec<f64>,
    ) {
        for r in 0..rows {
            // SAFETY: the caller guarantees the rows are in bounds.
            let src = unsafe { std::slice::from_raw_parts(p.cast::<T>().add(r * stride), cols) };
            out.extend(src.iter().map(|x| x.to_f64()));
        }
    }
    let mut out = f64_buffer(rows * cols, what)?;
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            DType::F32 => widen::<f32>(ptr, rows, cols, stride, &mut out),
            DType::BF16 => widen::<bf16>(ptr, rows, cols, stride, &mut out),
            DType::F16 => widen::<f16>(ptr, rows, cols, stride, &mut out),
        }
    }
    Ok(out)
}

/// Writes the compact `rows × cols` values into a matrix with `stride`, rounding once to
/// `dtype`; with `accumulate` the matrix's previous values are added first (in f64).
///
/// # Safety
/// `ptr` must be valid, writable host memory for the matrix, not accessed by anyone else meanwhile.
unsafe fn store_matrix(
    ptr: *mut u8,
    dtype: DType,
    stride: usize,
    cols: usize,
    values: &[f64],
    accumulate: bool,
) {
    unsafe fn narrow<T: Element>(
        p: *mut u8,
        stride: usize,
        cols: usize,
        values: &[f64],
        accumulate: bool,
    ) {
        for (r, row) in values.chunks_exact(cols).enumerate() {
            // SAFETY: the caller guarantees the rows are in bounds and exclusively ours.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(p.cast::<T>().add(r * stride), cols) };
            for (d, &x) in dst.iter_mut().zip(row) {
                let prev = if accumulate { d.to_f64() } else { 0.0 };
                *d = T::from_f64(if accumulate { prev + x } else { x });
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            DType::F32 => narrow::<f32>(ptr, stride, cols, values, accumulate),
            DType::BF16 => narrow::<bf16>(ptr, stride, cols, values, accumulate),
            DType::F16 => narrow::<f16>(ptr, stride, cols, values, accumulate),
        }
    }
}

/// The threads [`par_rows`] runs on at most (all cores).
fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |t| t.get())
}

/// Runs `f(first_row, rows_a, rows_b, scratch)` over contiguous row ranges of `a` (`wa` values
/// per row) and `b` (`wb` per row) on up to all cores; `rows` rows in all. Each worker gets its
/// own `per_thread` values of `pool`, which holds [`max_threads`] × `per_thread` (allocated by
/// the caller before any worker starts, so a refusal is an error, not an abort).
fn par_rows(
    rows: usize,
    (a, wa): (&mut [f64], usize),
    (b, wb): (&mut [f64], usize),
    (pool, per_thread): (&mut [f64], usize),
    f: impl Fn(usize, &mut [f64], &mut [f64], &mut [f64]) + Sync,
) {
    // Never more workers than the pool has blocks for: the core count is asked again here and
    // may have grown since the caller sized the pool (the thread's affinity widened mid-call).
    let pool_blocks = pool.len().checked_div(per_thread).unwrap_or(usize::MAX);
    let threads = max_threads().min(pool_blocks).min(rows).max(1);
    let per = rows.div_ceil(threads);
    if threads == 1 {
        f(0, a, b, &mut pool[..per_thread]);
        return;
    }
    std::thread::scope(|scope| {
        let mut a_rest = a;
        let mut b_rest = b;
        let mut pool_rest = pool;
        let mut first = 0;
        while first < rows {
            let take = per.min(rows - first);
            let (a_now, a_next) = std::mem::take(&mut a_rest).split_at_mut(take * wa);
            let (b_now, b_next) = std::mem::take(&mut b_rest).split_at_mut(take * wb);
            let (p_now, p_next) = std::mem::take(&mut pool_rest).split_at_mut(per_thread);
            (a_rest, b_rest, pool_rest) = (a_next, b_next, p_next);
            let f = &f;
            scope.spawn(move || f(first, a_now, b_now, p_now));
            first += take;
        }
    });
}

/// `R` dot products against one vector: `out[r] = Σ_c x[r][c] · w[c]`, each summed in index
/// order starting from −0.0 (the identity of `+`, as the standard library's float `sum` uses
/// since Rust 1.82), so a row's value does not depend on which rows share its block. The `R`
/// independent sums keep the FP adder busy and read `w` once for all of them.
fn dots<const R: usize>(x: [&[f64]; R], w: &[f64]) -> [f64; R] {
    let h = w.len();
    let x = x.map(|row| &row[..h]);
    let mut acc = [-0.0f64; R];
    for (c, &wc) in w.iter().enumerate() {
        for r in 0..R {
            acc[r] += x[r][c] * wc;
        }
    }
    acc
}

/// `out[r][c] += Σ_j coef[r][j] · w_j[c]` for `R` outputs at once, `w_j` the `j`-th row (of
/// `out`'s length) of `w`; every element sums its terms in `j` order, whatever `R` is.
fn axpy_rows<const R: usize>(coef: [&[f64]; R], w: &[f64], out: [&mut [f64]; R]) {
    let h = out[0].len();
    let out = out.map(|o| &mut o[..h]);
    for (j, wj) in w.chunks_exact(h).enumerate() {
        let c = coef.map(|row| row[j]);
        for (i, &wc) in wj.iter().enumerate() {
            for r in 0..R {
                out[r][i] += c[r] * wc;
            }
        }
    }
}

/// Calls `f` on consecutive blocks of `items`: blocks of 8, then one of 4, 2 or 1 for each
/// bit of the rest, so every block length is one of the monomorphised sizes.
fn for_blocks<T>(items: &[T], mut f: impl FnMut(&[T])) {
    let mut rest = items;
    while !rest.is_empty() {
        let take = [BLOCK, 4, 2, 1]
            .into_iter()
            .find(|&b| b <= rest.len())
            .unwrap_or(1);
        let (now, next) = rest.split_at(take);
        f(now);
        rest = next;
    }
}

/// Logits of `R` rows, `z_j = scale · (hidden_r · weight_j)`, soft-capped when `cap` is set,
/// into `out[r]`; `dcap[r]` (when not empty) receives `d(capped)/d(scaled)` = `1 − tanh²(z / cap)`.
/// Each value is bitwise the one-row computation's (see [`dots`]).
fn block_logits<const R: usize>(
    hidden: [&[f64]; R],
    weight: &[f64],
    scale: f64,
    cap: Option<f64>,
    out: [&mut [f64]; R],
    dcap: [&mut [f64]; R],
) {
    let h = hidden[0].len();
    for (j, w) in weight.chunks_exact(h).enumerate() {
        let z = dots(hidden, w);
        for r in 0..R {
            let z = scale * z[r];
            out[r][j] = match cap {
                None => z,
                Some(c) => {
                    let t = (z / c).tanh();
                    if !dcap[r].is_empty() {
                        dcap[r][j] = 1.0 - t * t;
                    }
                    c * t
                }
            };
        }
    }
}

/// Splits `buf` into `R` consecutive slices of `len` values (empty slices when `len` is 0).
fn split_rows<const R: usize>(buf: &mut [f64], len: usize) -> [&mut [f64]; R] {
    let mut rest = buf;
    std::array::from_fn(|_| {
        let (now, next) = std::mem::take(&mut rest).split_at_mut(len);
        rest = next;
        now
    })
}

/// Rows per block of the products (the largest of [`for_blocks`]' sizes).
const BLOCK: usize = 8;

/// [`block_logits`] for a block of 1, 2, 4 or 8 rows (`hidden`), into consecutive rows of
/// `out` (and of `dcap` when it is not empty).
fn logits_block(
    hidden: &[&[f64]],
    weight: &[f64],
    scale: f64,
    cap: Option<f64>,
    out: &mut [f64],
    dcap: &mut [f64],
) {
    let v = weight.len() / hidden[0].len();
    let dv = dcap.len() / hidden.len();
    macro_rules! call {
        ($r:literal) => {
            block_logits::<$r>(
                std::array::from_fn(|i| hidden[i]),
                weight,
                scale,
                cap,
                split_rows::<$r>(out, v),
                split_rows::<$r>(dcap, dv),
            )
        };
    }
    match hidden.len() {
        8 => call!(8),
        4 => call!(4),
        2 => call!(2),
        1 => call!(1),
        n => unreachable!("block of {n} rows"),
    }
}

/// [`axpy_rows`] for a block of 1, 2, 4 or 8 output rows.
fn axpy_block(coef: &[&[f64]], w: &[f64], out: &mut [&mut [f64]]) {
    macro_rules! call {
        ($r:literal) => {{
            let mut it = out.iter_mut();
            axpy_rows::<$r>(
                std::array::from_fn(|i| coef[i]),
                w,
                std::array::from_fn(|_| &mut **it.next().expect("block rows")),
            )
        }};
    }
    match coef.len() {
        8 => call!(8),
        4 => call!(4),
        2 => call!(2),
        1 => call!(1),
        n => unreachable!("block of {n} rows"),
    }
}

/// The divergence settings every row uses.
#[derive(Clone, Copy)]
struct RowMath {
    kind: Kind,
    beta: f64,
    inv_t: f64,
    logit_scale: f64,
    cap: Option<f64>,
    /// The reduction's factor (1, 1 / valid rows or 1 / num_items).
    reduction: f64,
}

/// Copyable raw pointers for the worker threads (only the labels are read through it).
#[derive(Clone, Copy)]
struct Labels(*const i64);
// SAFETY: read-only host memory, valid for the whole call.
unsafe impl Send for Labels {}
// SAFETY: as above.
unsafe impl Sync for Labels {}

impl Labels {
    /// True when row `r` has a label equal to `ignore`.
    ///
    /// # Safety
    /// `r` must be below the number of labels (when there are labels).
    unsafe fn ignored(&self, r: usize, ignore: i64) -> bool {
        // SAFETY: forwarded from the caller.
        !self.0.is_null() && unsafe { *self.0.add(r) } == ignore
    }
}

/// Runs the whole call on the host.
///
/// # Safety
/// The pointers of `raw` must be valid host memory for the shapes it describes, outputs disjoint
/// from the inputs and from each other (validated by the caller).
pub(crate) unsafe fn fused_linear(raw: &RawFusedLinear, params: &FusedLinearParams) -> Result<()> {
    let (n, v, h, ht) = (raw.n, raw.v, raw.h, raw.ht);
    let dp = &params.divergence;
    let math = RowMath {
        kind: dp.effective_kind(),
        beta: dp.beta as f64,
        inv_t: 1.0 / dp.temperature as f64,
        logit_scale: params.logit_scale as f64,
        cap: params.softcap.map(|c| c as f64),
        // SAFETY: labels are null or n host values, num_items null or one (validated).
        reduction: unsafe { reduction_scale(raw.labels, n, raw.num_items, dp) },
    };
    // SAFETY: the four inputs are valid host matrices of the validated shapes.
    let (sh, sw, th, tw) = unsafe {
        (
            read_matrix(
                "student hidden states",
                raw.student_hidden,
                raw.dtype,
                n,
                h,
                raw.student_hidden_stride,
            )?,
            read_matrix(
                "student weight",
                raw.student_weight,
                raw.dtype,
                v,
                h,
                raw.student_weight_stride,
            )?,
            read_matrix(
                "teacher hidden states",
                raw.teacher_hidden,
                raw.dtype,
                n,
                ht,
                raw.teacher_hidden_stride,
            )?,
            read_matrix(
                "teacher weight",
                raw.teacher_weight,
                raw.dtype,
                v,
                ht,
                raw.teacher_weight_stride,
            )?,
        )
    };
    let (want_gh, want_gw) = (!raw.grad_hidden.is_null(), !raw.grad_weight.is_null());
    let want_grad = want_gh || want_gw;
    let labels = Labels(raw.labels);
    let ignore = dp.ignore_index;
    let chunk = params.rows_per_chunk(n, v, h, ht);

    let mut row_loss = f64_zeros(n, "per-row losses")?;
    let mut grad_hidden = f64_zeros(if want_gh { n * h } else { 0 }, "hidden-state gradient")?;
    let mut grad_weight = f64_zeros(if want_gw { v * h } else { 0 }, "weight gradient")?;
    // G = d(reduced loss) / d(raw logits) of the chunk's rows, `rows × v`.
    let mut g = f64_zeros(
        if want_grad { chunk * v } else { 0 },
        "chunk of logit gradients",
    )?;
    let gw = if want_grad { v } else { 0 };

    // Each worker's logits of one block of rows: student, teacher (and the cap's derivative).
    let with_dcap = want_grad && math.cap.is_some();
    let block_values = (2 + usize::from(with_dcap)) * BLOCK.min(chunk) * v;
    let mut pool = f64_zeros(
        max_threads().min(chunk).max(1) * block_values,
        "per-thread logit blocks",
    )?;
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let g = &mut g[..rows * gw];
        // Logits, divergence and G, in blocks of rows that share each weight row's reads.
        par_rows(
            rows,
            (g, gw),
            (&mut row_loss[r0..r0 + rows], 1),
            (&mut pool, block_values),
            |first, g_rows, losses, scratch| {
                // Scratch for one block: at most this thread's rows, so with many threads and
                // few rows each it stays the one-row size.
                let blk = BLOCK.min(losses.len());
                let (b, rest) = scratch.split_at_mut(blk * v);
                let (a, rest) = rest.split_at_mut(blk * v);
                let dcap = &mut rest[..if with_dcap { blk * v } else { 0 }];
                let dv = if with_dcap { v } else { 0 };
                let mut none: [f64; 0] = [];
                // The rows that need logits; ignored rows are settled here.
                let mut live = Vec::with_capacity(losses.len());
                for (k, loss) in losses.iter_mut().enumerate() {
                    // SAFETY: the row is below n, and the labels hold n values when non-null.
                    if unsafe { labels.ignored(r0 + first + k, ignore) } {
                        *loss = 0.0;
                        g_rows[k * gw..(k + 1) * gw].fill(0.0);
                    } else {
                        live.push(k);
                    }
                }
                for_blocks(&live, |block| {
                    let at = |k: usize| r0 + first + k;
                    let student: Vec<&[f64]> =
                        block.iter().map(|&k| &sh[at(k) * h..][..h]).collect();
                    let teacher: Vec<&[f64]> =
                        block.iter().map(|&k| &th[at(k) * ht..][..ht]).collect();
                    let s = math.logit_scale;
                    logits_block(
                        &student,
                        &sw,
                        s,
                        math.cap,
                        &mut *b,
                        &mut dcap[..block.len() * dv],
                    );
                    logits_block(&teacher, &tw, s, math.cap, &mut *a, &mut none);
                    for (i, &k) in block.iter().enumerate() {
                        let (b, a) = (&mut b[i * v..(i + 1) * v], &mut a[i * v..(i + 1) * v]);
                        b.iter_mut().for_each(|x| *x *= math.inv_t);
                        a.iter_mut().for_each(|x| *x *= math.inv_t);
                        let g_row = &mut g_rows[k * gw..(k + 1) * gw];
                        let grad = want_grad.then_some(&mut *g_row);
                        let l = row_divergence(math.kind, math.beta, b, a, grad);
                        // A divergence is >= 0; rounding of equal rows can give -1e-16 (NaN stays).
                        losses[k] = if l < 0.0 { 0.0 } else { l };
                        if want_grad {
                            let f = math.reduction * math.inv_t * math.logit_scale;
                            let dcap = &dcap[i * dv..(i + 1) * dv];
                            for (j, x) in g_row.iter_mut().enumerate() {
                                *x *= if dcap.is_empty() { f } else { f * dcap[j] };
                            }
                        }
                    }
                });
            },
        );
        let g = &*g;
        // grad_hidden[r] = Σ_j G[r, j] · W_j, a block of rows per pass over W.
        if want_gh {
            let mut unused: [f64; 0] = [];
            par_rows(
                rows,
                (&mut grad_hidden[r0 * h..(r0 + rows) * h], h),
                (&mut unused, 0),
                (&mut [], 0),
                |first, out, _, _| {
                    let mut outs: Vec<&mut [f64]> = out.chunks_exact_mut(h).collect();
                    let ks: Vec<usize> = (0..outs.len()).collect();
                    for_blocks(&ks, |block| {
                        let coef: Vec<&[f64]> = block
                            .iter()
                            .map(|&k| &g[(first + k) * v..(first + k + 1) * v])
                            .collect();
                        let o = &mut outs[block[0]..block[0] + block.len()];
                        axpy_block(&coef, &sw, o);
                    });
                },
            );
        }
        // grad_weight[j] += Σ_r G[r, j] · hidden_r, rows in order (across chunks too), a block
        // of vocabulary rows per pass over the chunk's hidden rows.
        if want_gw {
            let mut unused: [f64; 0] = [];
            let x = &sh[r0 * h..(r0 + rows) * h];
            par_rows(
                v,
                (&mut grad_weight, h),
                (&mut unused, 0),
                (&mut [], 0),
                |first, out, _, _| {
                    let mut outs: Vec<&mut [f64]> = out.chunks_exact_mut(h).collect();
                    let js: Vec<usize> = (0..outs.len()).collect();
                    // Column j of G, gathered once per block.
                    let mut cols = vec![0.0f64; BLOCK * rows];
                    for_blocks(&js, |block| {
                        for (i, &jj) in block.iter().enumerate() {
                            for k in 0..rows {
                                cols[i * rows + k] = g[k * v + first + jj];
                            }
                        }
                        let coef: Vec<&[f64]> = cols.chunks_exact(rows).take(block.len()).collect();
                        let o = &mut outs[block[0]..block[0] + block.len()];
                        axpy_block(&coef, x, o);
                    });
                },
            );
        }
    }

    if !raw.per_token.is_null() {
        // SAFETY: per_token holds n f32 values, disjoint from everything else.
        let out = unsafe { std::slice::from_raw_parts_mut(raw.per_token, n) };
        for (o, &l) in out.iter_mut().zip(&row_loss) {
            *o = l as f32;
        }
    }
    if !raw.loss.is_null() {
        let total: f64 = row_loss.iter().sum();
        // SAFETY: loss holds one f32.
        unsafe { *raw.loss = (total * math.reduction) as f32 };
    }
    // SAFETY: validated, disjoint output matrices of the described shapes.
    unsafe {
        if want_gh {
            store_matrix(
                raw.grad_hidden,
                raw.grad_hidden_dtype,
                raw.grad_hidden_stride,
                h,
                &grad_hidden,
                params.accumulate,
            );
        }
        if want_gw {
            store_matrix(
                raw.grad_weight,
                raw.grad_weight_dtype,
                raw.grad_weight_stride,
                h,
                &grad_weight,
                params.accumulate,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::par_rows;

    /// A pool sized for fewer workers than the cores (the core count grew after the caller
    /// sized it: a widened affinity) still runs every row, on as many workers as it has
    /// blocks for, instead of panicking when it is split.
    #[test]
    fn par_rows_runs_on_the_blocks_the_pool_has() {
        let rows = 37;
        let mut a: Vec<f64> = (0..rows * 2).map(|i| i as f64).collect();
        let mut b = vec![0.0f64; rows];
        let per_thread = 3;
        let mut pool = vec![f64::NAN; per_thread]; // one worker's block
        par_rows(
            rows,
            (&mut a, 2),
            (&mut b, 1),
            (&mut pool, per_thread),
            |first, a_rows, b_rows, scratch| {
                assert_eq!(scratch.len(), per_thread);
                for (r, out) in b_rows.iter_mut().enumerate() {
                    *out = (first + r) as f64 + a_rows[2 * r + 1];
                }
            },
        );
        for (r, &v) in b.iter().enumerate() {
            assert_eq!(v, (r + 2 * r + 1) as f64, "row {r}");
        }
    }
}
