//! C ABI of the fused linear divergence (`dk_fused_linear*`).

use std::ffi::c_void;

use super::context::{context, DkContext};
use super::divergence::{dtype, params_from_c, DkDivergenceParams};
use super::{boundary, read_arg, to_usize, write_workspace_size, DkStatus};
use crate::bail;
use distill_kernels::device::{Context, Launch};
use distill_kernels::fused::{FusedLinear, FusedLinearParams};
use distill_kernels::tensor::{Matrix, MatrixMut, Vector, VectorMut};
use distill_kernels::Result;

/// `dk_fused_linear_params`: the divergence parameters plus the logit transform and chunking.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkFusedLinearParams {
    /// Kind, β, temperature, reduction, ignore_index, num_items.
    pub divergence: DkDivergenceParams,
    /// Logits are multiplied by it (finite, > 0; 1 = none).
    pub logit_scale: f32,
    /// > 0: logits = softcap · tanh(logits / softcap); 0 = none.
    pub softcap: f32,
    /// Rows per chunk (>= 1); 0 = chosen from v and h.
    pub chunk_rows: i64,
    /// 1: add into the gradient buffers; 0: overwrite them.
    pub accumulate: i32,
}

/// `dk_fused_linear_args`: operands and outputs of one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkFusedLinearArgs {
    /// Rows (tokens).
    pub n: i64,
    /// Vocabulary size.
    pub v: i64,
    /// Student hidden size.
    pub h: i64,
    /// Teacher hidden size.
    pub ht: i64,
    /// `dk_dtype` of all four inputs.
    pub dtype: i32,
    /// Student hidden states `[n, h]`.
    pub student_hidden: *const c_void,
    /// Elements between student hidden rows (>= h).
    pub student_hidden_stride: i64,
    /// Student lm_head weight `[v, h]`.
    pub student_weight: *const c_void,
    /// Elements between student weight rows (>= h).
    pub student_weight_stride: i64,
    /// Teacher hidden states `[n, ht]`.
    pub teacher_hidden: *const c_void,
    /// Elements between teacher hidden rows (>= ht).
    pub teacher_hidden_stride: i64,
    /// Teacher lm_head weight `[v, ht]`; may be the student's.
    pub teacher_weight: *const c_void,
    /// Elements between teacher weight rows (>= ht).
    pub teacher_weight_stride: i64,
    /// Optional labels `[n]` (NULL: every row counts).
    pub labels: *const i64,
    /// Optional reduced loss (one float).
    pub loss: *mut f32,
    /// Optional per-row loss `[n]`.
    pub per_token: *mut f32,
    /// Optional `[n, h]` gradient w.r.t. the student hidden states.
    pub grad_hidden: *mut c_void,
    /// `dk_dtype` of `grad_hidden`: the input dtype or f32.
    pub grad_hidden_dtype: i32,
    /// Elements between `grad_hidden` rows (>= h).
    pub grad_hidden_stride: i64,
    /// Optional `[v, h]` gradient w.r.t. the student weight.
    pub grad_weight: *mut c_void,
    /// `dk_dtype` of `grad_weight`: the input dtype or f32.
    pub grad_weight_dtype: i32,
    /// Elements between `grad_weight` rows (>= h).
    pub grad_weight_stride: i64,
    /// Optional batchmean divisor in the context's memory (one float), read when the call runs.
    pub num_items: *const f32,
}

fn fused_params_from_c(p: &DkFusedLinearParams) -> Result<FusedLinearParams> {
    let divergence = params_from_c(&p.divergence)?;
    let chunk_rows = match p.chunk_rows {
        0 => None,
        c if c > 0 => Some(usize::try_from(c).unwrap_or(usize::MAX)),
        c => bail!(
            InvalidArgument,
            "chunk_rows must be >= 1 (or 0 = automatic), got {c}"
        ),
    };
    let accumulate = match p.accumulate {
        0 => false,
        1 => true,
        a => bail!(InvalidArgument, "accumulate must be 0 or 1, got {a}"),
    };
    let params = FusedLinearParams {
        divergence,
        logit_scale: p.logit_scale,
        softcap: (p.softcap != 0.0).then_some(p.softcap),
        chunk_rows,
        accumulate,
    };
    params.validate()?;
    Ok(params)
}

/// Reads `args` and `params` behind their pointers and builds the Rust call (views in the
/// context's memory).
///
/// # Safety
/// `args` and `params` null (rejected) or valid structs; the pointers in `args` valid for the
/// shapes it describes, in the context's memory.
unsafe fn call_from_c<'a>(
    c: &Context,
    args: *const DkFusedLinearArgs,
    params: *const DkFusedLinearParams,
) -> Result<(FusedLinear<'a>, FusedLinearParams)> {
    // SAFETY: forwarded contract (null is rejected).
    let a = unsafe { read_arg("args", args)? };
    // SAFETY: as above.
    let p = unsafe {
        read_arg(
            "params (start from dk_fused_linear_params_default())",
            params,
        )?
    };
    let params = fused_params_from_c(&p)?;
    let (n, v) = (to_usize("n", a.n)?, to_usize("v", a.v)?);
    let (h, ht) = (to_usize("h", a.h)?, to_usize("ht", a.ht)?);
    let d = dtype("input", a.dtype)?;
    let sh_stride = to_usize("student_hidden_stride", a.student_hidden_stride)?;
    let sw_stride = to_usize("student_weight_stride", a.student_weight_stride)?;
    let th_stride = to_usize("teacher_hidden_stride", a.teacher_hidden_stride)?;
    let tw_stride = to_usize("teacher_weight_stride", a.teacher_weight_stride)?;
    let grad_hidden = if a.grad_hidden.is_null() {
        None
    } else {
        let gd = dtype("grad_hidden", a.grad_hidden_dtype)?;
        let stride = to_usize("grad_hidden_stride", a.grad_hidden_stride)?;
        Some((a.grad_hidden, gd, stride))
    };
    let grad_weight = if a.grad_weight.is_null() {
        None
    } else {
        let gd = dtype("grad_weight", a.grad_weight_dtype)?;
        let stride = to_usize("grad_weight_stride", a.grad_weight_stride)?;
        Some((a.grad_weight, gd, stride))
    };
    let loc = c.location();
    // SAFETY (all views below): the caller guarantees the pointers cover the shapes in the
    // context's memory; null pointers are rejected by the operation before any access.
    let call = unsafe {
        FusedLinear {
            student_hidden: Matrix::from_raw(a.student_hidden.cast(), d, n, h, sh_stride, loc),
            student_weight: Matrix::from_raw(a.student_weight.cast(), d, v, h, sw_stride, loc),
            teacher_hidden: Matrix::from_raw(a.teacher_hidden.cast(), d, n, ht, th_stride, loc),
            teacher_weight: Matrix::from_raw(a.teacher_weight.cast(), d, v, ht, tw_stride, loc),
            labels: (!a.labels.is_null()).then(|| Vector::from_raw(a.labels, n, loc)),
            per_token: (!a.per_token.is_null()).then(|| VectorMut::from_raw(a.per_token, n, loc)),
            loss: (!a.loss.is_null()).then(|| VectorMut::from_raw(a.loss, 1, loc)),
            grad_hidden: grad_hidden
                .map(|(ptr, gd, stride)| MatrixMut::from_raw(ptr.cast(), gd, n, h, stride, loc)),
            grad_weight: grad_weight
                .map(|(ptr, gd, stride)| MatrixMut::from_raw(ptr.cast(), gd, v, h, stride, loc)),
            num_items: (!a.num_items.is_null()).then(|| Vector::from_raw(a.num_items, 1, loc)),
        }
    };
    Ok((call, params))
}

/// The default parameters: the divergence defaults, logit_scale 1, no softcap, automatic
/// chunks, gradients overwritten.
#[no_mangle]
pub extern "C" fn dk_fused_linear_params_default() -> DkFusedLinearParams {
    let d = FusedLinearParams::default();
    DkFusedLinearParams {
        divergence: super::divergence::dk_divergence_params_default(),
        logit_scale: d.logit_scale,
        softcap: d.softcap.unwrap_or(0.0),
        chunk_rows: 0,
        accumulate: d.accumulate as i32,
    }
}

/// Bytes of workspace `dk_fused_linear_divergence` needs for this call on this context (0 on
/// the CPU).
///
/// # Safety
/// `ctx` null or live; `args` and `params` null or valid structs whose pointers describe the
/// call; `bytes` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn dk_fused_linear_workspace_size(
    ctx: *const DkContext,
    args: *const DkFusedLinearArgs,
    params: *const DkFusedLinearParams,
    bytes: *mut usize,
) -> DkStatus {
    let size = |c: &Context| {
        // SAFETY: forwarded contract.
        let (call, params) = unsafe { call_from_c(c, args, params)? };
        c.fused_linear_workspace_size(&call, &params)
    };
    // SAFETY: forwarded contract.
    unsafe { write_workspace_size(ctx, bytes, size) }
}

/// Runs the fused linear divergence on the caller's stream. `workspace` may be NULL (the library
/// allocates, stream-ordered) or hold at least `dk_fused_linear_workspace_size` bytes.
///
/// # Safety
/// Every non-null pointer must be valid for the shapes `args` describes, in the context's memory
/// (host for CPU, device for CUDA); `stream` null or a live stream of the context's device.
#[no_mangle]
pub unsafe extern "C" fn dk_fused_linear_divergence(
    ctx: *const DkContext,
    args: *const DkFusedLinearArgs,
    params: *const DkFusedLinearParams,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract.
        let (call, params) = unsafe { call_from_c(c, args, params)? };
        // SAFETY: the caller guarantees the stream; the workspace, when given, is memory of
        // `workspace_bytes` bytes in the context's memory (checked by the backend).
        let launch = unsafe {
            let l = Launch::on_stream(stream);
            if workspace.is_null() {
                l
            } else {
                l.with_workspace(VectorMut::from_raw(
                    workspace.cast(),
                    workspace_bytes,
                    c.location(),
                ))
            }
        };
        c.fused_linear_divergence(call, &params, &launch)
    })
}
