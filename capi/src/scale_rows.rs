//! C ABI of the row scaling (`dk_scale_rows`).

use std::ffi::c_void;

use super::context::{context, DkContext};
use super::divergence::dtype;
use super::{boundary, read_arg, to_usize, DkStatus};
use distill_kernels::device::Launch;
use distill_kernels::scale_rows::ScaleRows;
use distill_kernels::tensor::{MatrixMut, Vector};

/// `dk_scale_rows_args`: `x[i, j] = round(x[i, j] · factors[i · factor_stride])`, in place.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkScaleRowsArgs {
    /// Rows (≥ 1).
    pub n: i64,
    /// Elements per row (≥ 1).
    pub v: i64,
    /// `[n, v]`, scaled in place.
    pub x: *mut c_void,
    /// `dk_dtype` of `x`.
    pub dtype: i32,
    /// Elements between rows of `x` (≥ v).
    pub stride: i64,
    /// f32 factors: row `i` is scaled by `factors[i · factor_stride]`.
    pub factors: *const f32,
    /// Entries between consecutive rows' factors (≥ 0; 0 = one factor for every row).
    pub factor_stride: i64,
}

/// Scales each row of `x` in place by its factor on the caller's stream; rows whose factor is
/// exactly 1.0f are not touched. The factors are read on the device (no host synchronisation).
///
/// # Safety
/// `ctx` null or live; `args` null or valid; `x` and `factors` valid for the shapes `args`
/// describes, in the context's memory (host for CPU, device for CUDA); `stream` null or a live
/// stream of the context's device.
#[no_mangle]
pub unsafe extern "C" fn dk_scale_rows(
    ctx: *const DkContext,
    args: *const DkScaleRowsArgs,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract (null is rejected).
        let a = unsafe { read_arg("args", args)? };
        let (n, v) = (to_usize("n", a.n)?, to_usize("v", a.v)?);
        let dt = dtype("x", a.dtype)?;
        let stride = to_usize("stride", a.stride)?;
        let factor_stride = to_usize("factor_stride", a.factor_stride)?;
        // The factors the rows read: (n − 1) · factor_stride + 1 (checked again, with the other
        // shape rules, by the operation; an overflow here is left for it to report).
        let factors_len = n
            .saturating_sub(1)
            .saturating_mul(factor_stride)
            .saturating_add(1);
        let loc = c.location();
        // SAFETY (both views): the caller guarantees the pointers cover the shapes in the
        // context's memory; null pointers are rejected by the operation before any access.
        let call = unsafe {
            ScaleRows {
                x: MatrixMut::from_raw(a.x.cast(), dt, n, v, stride, loc),
                factors: Vector::from_raw(a.factors, factors_len, loc),
                factor_stride,
            }
        };
        // SAFETY: forwarded contract.
        let launch = unsafe { Launch::on_stream(stream) };
        c.scale_rows(call, &launch)
    })
}
