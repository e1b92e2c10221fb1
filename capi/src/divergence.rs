//! C ABI of the token-level divergence (`dk_divergence*`).

use std::ffi::c_void;

use super::context::{context, DkContext};
use super::{boundary, read_arg, to_usize, write_workspace_size, DkStatus};
use crate::bail;
use distill_kernels::device::Launch;
use distill_kernels::divergence::{Divergence, Kind, Params, Reduction};
use distill_kernels::tensor::{DType, Matrix, MatrixMut, Vector, VectorMut};
use distill_kernels::Result;

/// `dk_divergence_params`: the divergence parameters.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkDivergenceParams {
    /// `dk_divergence_kind`.
    pub kind: i32,
    /// JSD teacher weight in [0, 1].
    pub beta: f32,
    /// Softmax temperature, finite and > 0.
    pub temperature: f32,
    /// `dk_reduction`.
    pub reduction: i32,
    /// Rows whose label equals this are skipped.
    pub ignore_index: i64,
    /// Divisor override for batchmean; 0 = none.
    pub num_items: f32,
}

/// `dk_divergence_args`: operands and outputs of one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkDivergenceArgs {
    /// Rows.
    pub n: i64,
    /// Vocabulary size (columns).
    pub v: i64,
    /// Student logits `[n, v]`.
    pub student: *const c_void,
    /// `dk_dtype` of the student logits (and of the gradient).
    pub student_dtype: i32,
    /// Elements between student rows (>= v).
    pub student_stride: i64,
    /// Teacher logits `[n, v]`.
    pub teacher: *const c_void,
    /// `dk_dtype` of the teacher logits.
    pub teacher_dtype: i32,
    /// Elements between teacher rows (>= v).
    pub teacher_stride: i64,
    /// Optional labels `[n]` (NULL: every row counts).
    pub labels: *const i64,
    /// Optional reduced loss (one float).
    pub loss: *mut f32,
    /// Optional per-row loss `[n]`.
    pub per_token: *mut f32,
    /// Optional gradient `[n, v]` in the student dtype; may equal `student` (in place).
    pub grad: *mut c_void,
    /// Elements between gradient rows (>= v; must equal `student_stride` in place).
    pub grad_stride: i64,
    /// Optional batchmean divisor in the context's memory (one float), read when the call runs.
    pub num_items: *const f32,
}

pub(crate) fn dtype(what: &str, code: i32) -> Result<DType> {
    match DType::from_code(code) {
        Some(d) => Ok(d),
        None => bail!(
            UnsupportedDtype,
            "{what} dtype code {code} is not f32 (0), bf16 (1) or f16 (2)"
        ),
    }
}

pub(crate) fn params_from_c(p: &DkDivergenceParams) -> Result<Params> {
    let Some(kind) = Kind::from_code(p.kind) else {
        bail!(
            InvalidArgument,
            "kind {} is not forward_kl (0), reverse_kl (1) or jsd (2)",
            p.kind
        );
    };
    let Some(reduction) = Reduction::from_code(p.reduction) else {
        bail!(
            InvalidArgument,
            "reduction {} is not batchmean (0), sum (1) or none (2)",
            p.reduction
        );
    };
    let params = Params {
        kind,
        beta: p.beta,
        temperature: p.temperature,
        ignore_index: p.ignore_index,
        reduction,
        num_items: (p.num_items != 0.0).then_some(p.num_items),
    };
    params.validate()?;
    Ok(params)
}

/// The default parameters: forward KL, β = 0.5, T = 1, batchmean, ignore_index = −100.
#[no_mangle]
pub extern "C" fn dk_divergence_params_default() -> DkDivergenceParams {
    let d = Params::default();
    DkDivergenceParams {
        kind: d.kind as i32,
        beta: d.beta,
        temperature: d.temperature,
        reduction: d.reduction as i32,
        ignore_index: d.ignore_index,
        num_items: 0.0,
    }
}

/// Bytes of workspace `dk_divergence` needs for `n` rows on this context (0 on the CPU).
///
/// # Safety
/// `ctx` null or live; `bytes` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn dk_divergence_workspace_size(
    ctx: *const DkContext,
    n: i64,
    bytes: *mut usize,
) -> DkStatus {
    // SAFETY: forwarded contract.
    unsafe {
        write_workspace_size(ctx, bytes, |c| {
            Ok(c.divergence_workspace_size(to_usize("n", n)?))
        })
    }
}

/// Runs the divergence on the caller's stream. `workspace` may be NULL (the library allocates,
/// stream-ordered) or hold at least `dk_divergence_workspace_size` bytes.
///
/// # Safety
/// Every non-null pointer must be valid for the shapes `args` describes, in the context's memory
/// (host for CPU, device for CUDA); `stream` null or a live stream of the context's device.
#[no_mangle]
pub unsafe extern "C" fn dk_divergence(
    ctx: *const DkContext,
    args: *const DkDivergenceArgs,
    params: *const DkDivergenceParams,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract (null is rejected).
        let a = unsafe { read_arg("args", args)? };
        // SAFETY: as above.
        let p = unsafe { read_arg("params (start from dk_divergence_params_default())", params)? };
        let params = params_from_c(&p)?;
        let (n, v) = (to_usize("n", a.n)?, to_usize("v", a.v)?);
        let s_dtype = dtype("student", a.student_dtype)?;
        let t_dtype = dtype("teacher", a.teacher_dtype)?;
        let s_stride = to_usize("student_stride", a.student_stride)?;
        let t_stride = to_usize("teacher_stride", a.teacher_stride)?;
        let loc = c.location();
        // SAFETY (all views below): the caller guarantees the pointers cover the shapes in the
        // context's memory; null pointers are rejected by the operation before any access.
        let call = unsafe {
            Divergence {
                student: Matrix::from_raw(a.student.cast(), s_dtype, n, v, s_stride, loc),
                teacher: Matrix::from_raw(a.teacher.cast(), t_dtype, n, v, t_stride, loc),
                labels: (!a.labels.is_null()).then(|| Vector::from_raw(a.labels, n, loc)),
                per_token: (!a.per_token.is_null())
                    .then(|| VectorMut::from_raw(a.per_token, n, loc)),
                loss: (!a.loss.is_null()).then(|| VectorMut::from_raw(a.loss, 1, loc)),
                grad: if a.grad.is_null() {
                    None
                } else {
                    let g_stride = to_usize("grad_stride", a.grad_stride)?;
                    Some(MatrixMut::from_raw(
                        a.grad.cast(),
                        s_dtype,
                        n,
                        v,
                        g_stride,
                        loc,
                    ))
                },
                num_items: (!a.num_items.is_null()).then(|| Vector::from_raw(a.num_items, 1, loc)),
            }
        };
        // SAFETY: the caller guarantees the stream; the workspace, when given, is device memory
        // of `workspace_bytes` bytes (checked against the device and the size needed).
        let launch = unsafe {
            let l = Launch::on_stream(stream);
            if workspace.is_null() {
                l
            } else {
                l.with_workspace(VectorMut::from_raw(workspace.cast(), workspace_bytes, loc))
            }
        };
        c.divergence(call, &params, &launch)
    })
}
