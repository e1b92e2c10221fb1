//! Row scaling in place, skipping the rows whose factor is exactly 1 — on the CPU or on CUDA.
//!
//! `x[i, j] = round(f32(x[i, j]) · factors[i · factor_stride])`: the product in f32, rounded once
//! (to nearest, ties to even) to `x`'s dtype (f32, bf16 or f16) — what PyTorch's `x.mul_(f)` gives
//! for an f32 factor tensor `f` of shape `[N, 1]` (for a 0-d f32 factor on CUDA, PyTorch first
//! rounds the factor to `x`'s dtype; this does not). `factor_stride = 0` applies one factor to
//! every row. A row whose factor is exactly `1.0` (the only f32 equal to 1) is not read or
//! written at all: its bits, NaN payloads included, stay as they are. Every other factor scales
//! its row, 0, negative, infinite and NaN factors included (IEEE products: `0 · inf` is NaN).
//!
//! Made for the backward passes of the divergences: the gradient the forward computed is scaled
//! by `grad_output`, almost always exactly 1 and known only on the device. On CUDA the factors are
//! read by the kernel (no host synchronisation) and rows with factor 1 cost a 4-byte read, not a
//! read and a write of the row. Rows need only be aligned to their element size; the kernel moves
//! 16 bytes at a time from each row's first 16-byte boundary.

pub(crate) mod cpu;
pub(crate) mod cuda;

use crate::checks::{check_location, check_non_null};
use crate::device::{Backend, Context, Launch};
use crate::error::{bail, Result};
use crate::tensor::{DType, MatrixMut, Vector};

/// Operands of [`Context::scale_rows`].
#[derive(Debug)]
pub struct ScaleRows<'a> {
    /// The matrix `[N, V]` (f32, bf16 or f16), scaled in place; V at least 1 (N = 0: nothing
    /// to do, and the pointers may be null).
    pub x: MatrixMut<'a>,
    /// The factors (f32): row `i` is scaled by `factors[i · factor_stride]`. At least
    /// `(N − 1) · factor_stride + 1` entries, disjoint from `x`.
    pub factors: Vector<'a, f32>,
    /// Entries between the factors of consecutive rows; 0 = `factors[0]` for every row.
    pub factor_stride: usize,
}

/// A validated call in raw pointers, what the backends consume.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawScaleRows {
    pub n: usize,
    pub v: usize,
    pub dtype: DType,
    pub x: *mut u8,
    pub stride: usize,
    pub factors: *const f32,
    pub factor_stride: usize,
}

impl RawScaleRows {
    /// Checks everything that can be checked without touching memory; on error nothing is written.
    fn validate(ctx: &Context, call: &ScaleRows<'_>) -> Result<Self> {
        let x = &call.x;
        check_location(ctx, "x", x.location)?;
        check_location(ctx, "factors", call.factors.location)?;
        let (n, v, stride) = (x.rows, x.cols, x.row_stride);
        if v == 0 {
            bail!(Shape, "empty rows: V = 0 (must be at least 1)");
        }
        if n == 0 {
            // No rows: nothing to read or write (the pointers may be null, as an empty
            // tensor's are).
            return Ok(RawScaleRows {
                n,
                v,
                dtype: x.dtype,
                x: x.ptr,
                stride,
                factors: call.factors.ptr,
                factor_stride: call.factor_stride,
            });
        }
        check_non_null("x", x.ptr)?;
        check_non_null("factors", call.factors.ptr)?;
        if stride < v {
            bail!(Shape, "row stride {stride} is smaller than V = {v}");
        }
        // Elements of x and of the factors the call spans, and their bytes: within i64 (the
        // kernel's offsets) and the address space.
        let x_elems = (n - 1)
            .checked_mul(stride)
            .and_then(|e| e.checked_add(v))
            .filter(|&e| e <= i64::MAX as usize / x.dtype.size());
        let Some(x_elems) = x_elems else {
            bail!(
                Shape,
                "N = {n} rows of stride {stride} exceed the addressable range"
            );
        };
        let factor_elems = (n - 1)
            .checked_mul(call.factor_stride)
            .and_then(|e| e.checked_add(1))
            .filter(|&e| e <= i64::MAX as usize / 4);
        let Some(factor_elems) = factor_elems else {
            bail!(
                Shape,
                "N = {n} rows of factor stride {} exceed the addressable range",
                call.factor_stride
            );
        };
        if call.factors.len < factor_elems {
            bail!(
                Shape,
                "factors have {} entries, N = {n} rows with factor stride {} need {factor_elems}",
                call.factors.len,
                call.factor_stride
            );
        }
        for (what, addr, align) in [
            ("x", x.ptr as usize, x.dtype.size()),
            ("factors", call.factors.ptr as usize, 4),
        ] {
            if addr % align != 0 {
                bail!(
                    InvalidArgument,
                    "{what} pointer {addr:#x} is not aligned to its {align}-byte elements"
                );
            }
        }
        let x_start = x.ptr as usize;
        let x_end = x_start.saturating_add(x_elems * x.dtype.size());
        let f_start = call.factors.ptr as usize;
        let f_end = f_start.saturating_add(factor_elems * 4);
        if x_start < f_end && f_start < x_end {
            bail!(Shape, "factors overlap the matrix they scale");
        }
        Ok(RawScaleRows {
            n,
            v,
            dtype: x.dtype,
            x: x.ptr,
            stride,
            factors: call.factors.ptr,
            factor_stride: call.factor_stride,
        })
    }
}

impl Context {
    /// Scales each row of `call.x` in place by its factor, leaving rows whose factor is exactly 1
    /// untouched (see the [module](crate::scale_rows) documentation for the exact arithmetic).
    ///
    /// Stream-ordered on CUDA: returns once the work is queued on `launch.stream` (the factors
    /// are read on the device, when the kernel runs); no workspace is used. On error nothing has
    /// been written.
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn scale_rows(&self, call: ScaleRows<'_>, launch: &Launch<'_>) -> Result<()> {
        let raw = RawScaleRows::validate(self, &call)?;
        if raw.n == 0 {
            return Ok(());
        }
        match self.backend() {
            Backend::Cpu => {
                // SAFETY: validated host pointers covering the shapes (the views' contracts),
                // factors disjoint from x.
                unsafe { cpu::scale_rows(&raw) };
                Ok(())
            }
            Backend::Cuda(dev) => cuda::scale_rows(dev, &raw, launch),
        }
    }
}
