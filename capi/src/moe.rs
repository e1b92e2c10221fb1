//! C ABI of MoE dispatch (`dk_moe_*`): route, permute, combine, slot dot, and the backward
//! passes of permute and combine in one call each.

use std::ffi::c_void;

use super::context::{context, DkContext};
use super::{boundary, read_arg, to_usize, write_workspace_size, DkStatus};
use crate::bail;
use distill_kernels::device::{Context, Launch};
use distill_kernels::moe::{
    check_tokens_and_slots, max_rows, Combine, CombineBackward, Permute, PermuteBackward, Route,
    RouteParams, Score, SlotDot,
};
use distill_kernels::tensor::{DType, Matrix, MatrixMut, Vector, VectorMut};
use distill_kernels::Result;

/// `dk_moe_route_params`: routing parameters.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkMoeRouteParams {
    /// Experts per token, 1 ≤ k ≤ min(e, 32).
    pub k: i32,
    /// `DK_MOE_SOFTMAX` or `DK_MOE_SIGMOID`.
    pub score: i32,
    /// 1: the k weights are divided by their sum; 0: not.
    pub renormalize: i32,
    /// Experts in this many contiguous groups (1 = no grouping).
    pub n_groups: i32,
    /// Groups kept, ranked by the sum of their top-2 selection scores.
    pub topk_groups: i32,
    /// Weights are multiplied by it (after renormalisation).
    pub scale: f32,
    /// Tokens per expert (later tokens dropped in token order); 0 = unlimited.
    pub capacity: i64,
    /// Each expert's segment is padded to a multiple of it (≥ 1).
    pub block: i32,
}

/// `dk_moe_route_args`: operands and outputs of `dk_moe_route`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkMoeRouteArgs {
    /// Tokens (≥ 1).
    pub n: i64,
    /// Experts (1..=1024).
    pub e: i32,
    /// Router logits `[n, e]`.
    pub logits: *const c_void,
    /// `DK_DTYPE_F32` or `DK_DTYPE_BF16`.
    pub logits_dtype: i32,
    /// Elements between logits rows (≥ e).
    pub logits_stride: i64,
    /// `[e]` selection bias, or NULL.
    pub bias: *const f32,
    /// Out `[n, k]`.
    pub expert_ids: *mut i32,
    /// Out `[n, k]`.
    pub weights: *mut f32,
    /// Out `[e]`.
    pub counts: *mut i32,
    /// Out `[e + 1]`.
    pub offsets: *mut i32,
    /// Out `[perm_rows]`.
    pub perm: *mut i32,
    /// Entries of `perm` (≥ `dk_moe_max_rows`).
    pub perm_rows: i64,
    /// Out `[n, k]`.
    pub position: *mut i32,
}

/// `dk_moe_permute_args`: `out[r] = x[perm[r] / k] (· weights[perm[r]])`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkMoePermuteArgs {
    /// Tokens.
    pub n: i64,
    /// Hidden size (a multiple of 8).
    pub h: i64,
    /// Slots per token.
    pub k: i32,
    /// Permuted rows (entries of `perm`).
    pub rows: i64,
    /// `dk_dtype` of `x` and `out`.
    pub dtype: i32,
    /// `[n, h]` token rows.
    pub x: *const c_void,
    /// Elements between rows of `x` (≥ h).
    pub x_stride: i64,
    /// `[rows]` from `dk_moe_route`.
    pub perm: *const i32,
    /// `[n, k]` or NULL (no scaling).
    pub weights: *const f32,
    /// Out `[rows, h]`.
    pub out: *mut c_void,
    /// Elements between rows of `out` (≥ h).
    pub out_stride: i64,
}

/// `dk_moe_combine_args`: `y[t] = Σ_j weights[t, j] · rows[position[t, j]]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkMoeCombineArgs {
    /// Tokens.
    pub n: i64,
    /// Hidden size (a multiple of 8).
    pub h: i64,
    /// Slots per token.
    pub k: i32,
    /// Rows of the permuted buffer.
    pub rows: i64,
    /// `dk_dtype` of `rows_in` and `y`.
    pub dtype: i32,
    /// `[rows, h]` in permuted order.
    pub rows_in: *const c_void,
    /// Elements between rows of `rows_in` (≥ h).
    pub rows_stride: i64,
    /// `[n, k]` from `dk_moe_route`.
    pub position: *const i32,
    /// `[n, k]` or NULL (unweighted).
    pub weights: *const f32,
    /// Out `[n, h]`.
    pub y: *mut c_void,
    /// Elements between rows of `y` (≥ h).
    pub y_stride: i64,
}

/// `dk_moe_slot_dot_args`: `out[t, j] = ⟨tokens[t], rows[position[t, j]]⟩`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkMoeSlotDotArgs {
    /// Tokens.
    pub n: i64,
    /// Hidden size (a multiple of 8).
    pub h: i64,
    /// Slots per token.
    pub k: i32,
    /// Rows of the permuted buffer.
    pub rows: i64,
    /// `dk_dtype` of both inputs.
    pub dtype: i32,
    /// `[n, h]`.
    pub tokens: *const c_void,
    /// Elements between rows of `tokens` (≥ h).
    pub tokens_stride: i64,
    /// `[rows, h]`.
    pub rows_in: *const c_void,
    /// Elements between rows of `rows_in` (≥ h).
    pub rows_stride: i64,
    /// `[n, k]`.
    pub position: *const i32,
    /// Out `[n, k]` (f32).
    pub out: *mut f32,
}

/// `dk_moe_permute_backward_args`: the gradients of a permute, `grad_x[t] = Σ_j w[t, j] ·
/// grad_xp[position[t, j]]` and `grad_weights[t, j] = ⟨x[t], grad_xp[position[t, j]]⟩`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkMoePermuteBackwardArgs {
    /// Tokens.
    pub n: i64,
    /// Hidden size (a multiple of 8).
    pub h: i64,
    /// Slots per token.
    pub k: i32,
    /// Rows of `grad_xp` (the permuted rows).
    pub rows: i64,
    /// `dk_dtype` of `grad_xp`, `x` and `grad_x`.
    pub dtype: i32,
    /// `[rows, h]` gradient of the permuted rows.
    pub grad_xp: *const c_void,
    /// Elements between rows of `grad_xp` (≥ h).
    pub grad_xp_stride: i64,
    /// `[n, k]` from `dk_moe_route`.
    pub position: *const i32,
    /// `[n, k]` the forward scaled by, or NULL (it did not scale).
    pub weights: *const f32,
    /// `[n, h]` the forward's input, or NULL: given with, and only with, `grad_weights`.
    pub x: *const c_void,
    /// Elements between rows of `x` (≥ h; ignored when `x` is NULL).
    pub x_stride: i64,
    /// Out `[n, h]`.
    pub grad_x: *mut c_void,
    /// Elements between rows of `grad_x` (≥ h).
    pub grad_x_stride: i64,
    /// Out `[n, k]` (f32), or NULL (not computed).
    pub grad_weights: *mut f32,
}

/// `dk_moe_combine_backward_args`: the gradients of a combine, `grad_expert_out[r] =
/// w[perm[r]] · grad_y[perm[r] / k]` and `grad_weights[t, j] = ⟨grad_y[t],
/// expert_out[position[t, j]]⟩`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkMoeCombineBackwardArgs {
    /// Tokens.
    pub n: i64,
    /// Hidden size (a multiple of 8).
    pub h: i64,
    /// Slots per token.
    pub k: i32,
    /// Permuted rows: entries of `perm`, rows of `grad_expert_out` and of `expert_out`.
    pub rows: i64,
    /// `dk_dtype` of `grad_y`, `expert_out` and `grad_expert_out`.
    pub dtype: i32,
    /// `[n, h]` gradient of the combined rows.
    pub grad_y: *const c_void,
    /// Elements between rows of `grad_y` (≥ h).
    pub grad_y_stride: i64,
    /// `[rows, h]` the forward's rows, or NULL: given with, and only with, `grad_weights`.
    pub expert_out: *const c_void,
    /// Elements between rows of `expert_out` (≥ h; ignored when `expert_out` is NULL).
    pub expert_out_stride: i64,
    /// `[rows]` from `dk_moe_route`.
    pub perm: *const i32,
    /// `[n, k]` from the same `dk_moe_route`.
    pub position: *const i32,
    /// `[n, k]` of a weighted combine, or NULL (unweighted).
    pub weights: *const f32,
    /// Out `[rows, h]`.
    pub grad_expert_out: *mut c_void,
    /// Elements between rows of `grad_expert_out` (≥ h).
    pub grad_expert_out_stride: i64,
    /// Out `[n, k]` (f32), or NULL (not computed).
    pub grad_weights: *mut f32,
}

fn dtype(what: &str, code: i32) -> Result<DType> {
    match DType::from_code(code) {
        Some(d) => Ok(d),
        None => bail!(
            UnsupportedDtype,
            "{what} dtype code {code} is not f32 (0), bf16 (1) or f16 (2)"
        ),
    }
}

/// Converts a C count that must be ≥ 1 (k, e, block).
fn positive(what: &str, x: i64) -> Result<usize> {
    if x < 1 {
        bail!(InvalidArgument, "{what} must be >= 1, got {x}");
    }
    to_usize(what, x)
}

/// `n · k` slots, rejecting overflow.
fn slots(n: usize, k: usize) -> Result<usize> {
    match n.checked_mul(k) {
        Some(s) => Ok(s),
        None => bail!(Shape, "n·k = {n}·{k} overflows"),
    }
}

/// The row stride of an optional matrix: checked only when its pointer is non-null (a NULL
/// operand's stride is ignored, whatever it holds).
fn optional_stride<T>(what: &str, ptr: *const T, stride: i64) -> Result<usize> {
    if ptr.is_null() {
        Ok(0)
    } else {
        to_usize(what, stride)
    }
}

/// The sizes every activation call (permute, combine, slot-dot and the backward calls) shares,
/// converted and checked: `(n, h, k, rows, dtype, n·k)`; `dtype_of` names the operand whose dtype
/// `code` is (in the error message).
fn sizes(
    n: i64,
    h: i64,
    k: i32,
    rows: i64,
    dtype_of: &str,
    code: i32,
) -> Result<(usize, usize, usize, usize, DType, usize)> {
    let (n, h) = (to_usize("n", n)?, to_usize("h", h)?);
    let k = positive("k", k as i64)?;
    let rows = to_usize("rows", rows)?;
    let dt = dtype(dtype_of, code)?;
    Ok((n, h, k, rows, dt, slots(n, k)?))
}

fn params_from_c(p: &DkMoeRouteParams) -> Result<RouteParams> {
    let Some(score) = Score::from_code(p.score) else {
        bail!(
            InvalidArgument,
            "score {} is not softmax (0) or sigmoid (1)",
            p.score
        );
    };
    let renormalize = match p.renormalize {
        0 => false,
        1 => true,
        r => bail!(InvalidArgument, "renormalize must be 0 or 1, got {r}"),
    };
    let capacity = match p.capacity {
        0 => None,
        c if c < 0 => bail!(
            InvalidArgument,
            "capacity must be >= 0 (0 = unlimited), got {c}"
        ),
        c => Some(to_usize("capacity", c)?),
    };
    Ok(RouteParams {
        k: positive("k", p.k as i64)?,
        score,
        renormalize,
        n_groups: positive("n_groups", p.n_groups as i64)?,
        topk_groups: positive("topk_groups", p.topk_groups as i64)?,
        scale: p.scale,
        capacity,
        block: positive("block", p.block as i64)?,
    })
}

/// Upper bound on the permuted rows R: `K + min(e, K)·(block − 1)` with `K = min(n·k,
/// e·capacity)` the slots kept (capacity 0 = unlimited; `distill_kernels::moe::max_rows`). −1
/// when an argument is out of range (n < 0, e, k or block < 1, capacity < 0) or the bound
/// overflows int64.
#[no_mangle]
pub extern "C" fn dk_moe_max_rows(n: i64, e: i32, k: i32, block: i32, capacity: i64) -> i64 {
    if n < 0 || e < 1 || k < 1 || block < 1 || capacity < 0 {
        return -1;
    }
    // The crate's bound (saturating at usize::MAX, which no i64 holds: -1 as for overflow).
    let (Ok(n), Ok(capacity)) = (usize::try_from(n), usize::try_from(capacity)) else {
        return -1; // a 32-bit usize
    };
    let capacity = (capacity > 0).then_some(capacity);
    let rows = max_rows(n, e as usize, k as usize, block as usize, capacity);
    i64::try_from(rows).unwrap_or(-1)
}

/// The default routing parameters: k = 1, softmax, no renormalisation, one group, scale 1, no
/// capacity, block 1.
#[no_mangle]
pub extern "C" fn dk_moe_route_params_default() -> DkMoeRouteParams {
    let d = RouteParams::default();
    DkMoeRouteParams {
        k: d.k as i32,
        score: d.score as i32,
        renormalize: d.renormalize as i32,
        n_groups: d.n_groups as i32,
        topk_groups: d.topk_groups as i32,
        scale: d.scale,
        capacity: 0,
        block: d.block as i32,
    }
}

/// Bytes of workspace `dk_moe_route` needs on this context (0 on the CPU).
///
/// # Safety
/// `ctx` null or live; `bytes` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn dk_moe_route_workspace_size(
    ctx: *const DkContext,
    n: i64,
    e: i32,
    k: i32,
    bytes: *mut usize,
) -> DkStatus {
    // SAFETY: forwarded contract.
    unsafe {
        write_workspace_size(ctx, bytes, |c| {
            // The checks dk_moe_route makes of N, E and k, in its order (k with the params,
            // first): the same status as the call.
            let k = positive("k", k as i64)?;
            let n = to_usize("n", n)?;
            let e = to_usize("e", e as i64)?;
            RouteParams::new(k).validate(e)?;
            check_tokens_and_slots(n, k)?;
            Ok(c.moe_route_workspace_size(n, e, k))
        })
    }
}

/// Borrows the caller's stream and workspace.
///
/// # Safety
/// `stream` null or a live stream of the context's device; `workspace` null or device memory of
/// `workspace_bytes` bytes (checked against the device by the operation).
unsafe fn launch<'a>(
    c: &Context,
    stream: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
) -> Launch<'a> {
    // SAFETY: forwarded contract.
    let l = unsafe { Launch::on_stream(stream) };
    if workspace.is_null() {
        l
    } else {
        // SAFETY: forwarded contract.
        l.with_workspace(unsafe {
            VectorMut::from_raw(workspace.cast(), workspace_bytes, c.location())
        })
    }
}

/// Routes tokens to experts and builds the permutation on the caller's stream. `workspace` may
/// be NULL (the library allocates, stream-ordered) or hold at least
/// `dk_moe_route_workspace_size` bytes.
///
/// # Safety
/// Every non-null pointer must be valid for the shapes `args` describes, in the context's memory;
/// `stream` null or a live stream of the context's device.
#[no_mangle]
pub unsafe extern "C" fn dk_moe_route(
    ctx: *const DkContext,
    args: *const DkMoeRouteArgs,
    params: *const DkMoeRouteParams,
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
        let p = unsafe { read_arg("params (start from dk_moe_route_params_default())", params)? };
        let params = params_from_c(&p)?;
        let n = to_usize("n", a.n)?;
        let e = to_usize("e", a.e as i64)?;
        // Router logits take f32 and bf16 only: say so for an unknown code too.
        let logits_dtype = match DType::from_code(a.logits_dtype) {
            Some(d @ (DType::F32 | DType::BF16)) => d,
            _ => bail!(
                UnsupportedDtype,
                "router logits dtype code {} is not f32 (0) or bf16 (1)",
                a.logits_dtype
            ),
        };
        let stride = to_usize("logits_stride", a.logits_stride)?;
        let perm_rows = to_usize("perm_rows", a.perm_rows)?;
        let slots = slots(n, params.k)?;
        let loc = c.location();
        // SAFETY (all views): the caller guarantees the pointers cover the shapes in the
        // context's memory; null pointers are rejected by the operation before any access.
        let call = unsafe {
            Route {
                logits: Matrix::from_raw(a.logits.cast(), logits_dtype, n, e, stride, loc),
                bias: (!a.bias.is_null()).then(|| Vector::from_raw(a.bias, e, loc)),
                expert_ids: VectorMut::from_raw(a.expert_ids, slots, loc),
                weights: VectorMut::from_raw(a.weights, slots, loc),
                counts: VectorMut::from_raw(a.counts, e, loc),
                offsets: VectorMut::from_raw(a.offsets, e + 1, loc),
                perm: VectorMut::from_raw(a.perm, perm_rows, loc),
                position: VectorMut::from_raw(a.position, slots, loc),
            }
        };
        // SAFETY: forwarded contract.
        let launch = unsafe { launch(c, stream, workspace, workspace_bytes) };
        c.moe_route(call, &params, &launch)
    })
}

/// Bytes of workspace `dk_moe_permute` needs for `n` tokens of `k` slots (0 on the CPU and for
/// k = 1).
///
/// # Safety
/// `ctx` null or live; `bytes` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn dk_moe_permute_workspace_size(
    ctx: *const DkContext,
    n: i64,
    k: i32,
    bytes: *mut usize,
) -> DkStatus {
    // SAFETY: forwarded contract.
    unsafe {
        write_workspace_size(ctx, bytes, |c| {
            let n = to_usize("n", n)?;
            let k = positive("k", k as i64)?;
            check_tokens_and_slots(n, k)?;
            Ok(c.moe_permute_workspace_size(n, k))
        })
    }
}

/// Gathers token rows into the permuted order on the caller's stream.
///
/// # Safety
/// As [`dk_moe_route`].
#[no_mangle]
pub unsafe extern "C" fn dk_moe_permute(
    ctx: *const DkContext,
    args: *const DkMoePermuteArgs,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract (null is rejected).
        let a = unsafe { read_arg("args", args)? };
        let (n, h, k, rows, dt, slots) = sizes(a.n, a.h, a.k, a.rows, "x", a.dtype)?;
        let x_stride = to_usize("x_stride", a.x_stride)?;
        let out_stride = to_usize("out_stride", a.out_stride)?;
        let loc = c.location();
        // SAFETY (all views): as in dk_moe_route.
        let call = unsafe {
            Permute {
                x: Matrix::from_raw(a.x.cast(), dt, n, h, x_stride, loc),
                k,
                perm: Vector::from_raw(a.perm, rows, loc),
                weights: (!a.weights.is_null()).then(|| Vector::from_raw(a.weights, slots, loc)),
                out: MatrixMut::from_raw(a.out.cast(), dt, rows, h, out_stride, loc),
            }
        };
        // SAFETY: forwarded contract.
        let launch = unsafe { launch(c, stream, workspace, workspace_bytes) };
        c.moe_permute(call, &launch)
    })
}

/// Writes each token's (weighted) sum of its permuted rows on the caller's stream.
///
/// # Safety
/// As [`dk_moe_route`].
#[no_mangle]
pub unsafe extern "C" fn dk_moe_combine(
    ctx: *const DkContext,
    args: *const DkMoeCombineArgs,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract (null is rejected).
        let a = unsafe { read_arg("args", args)? };
        let (n, h, k, rows, dt, slots) = sizes(a.n, a.h, a.k, a.rows, "rows_in", a.dtype)?;
        let rows_stride = to_usize("rows_stride", a.rows_stride)?;
        let y_stride = to_usize("y_stride", a.y_stride)?;
        let loc = c.location();
        // SAFETY (all views): as in dk_moe_route.
        let call = unsafe {
            Combine {
                rows: Matrix::from_raw(a.rows_in.cast(), dt, rows, h, rows_stride, loc),
                k,
                position: Vector::from_raw(a.position, slots, loc),
                weights: (!a.weights.is_null()).then(|| Vector::from_raw(a.weights, slots, loc)),
                y: MatrixMut::from_raw(a.y.cast(), dt, n, h, y_stride, loc),
            }
        };
        // SAFETY: forwarded contract.
        let launch = unsafe { Launch::on_stream(stream) };
        c.moe_combine(call, &launch)
    })
}

/// Per-slot dot products of token rows with their permuted rows, on the caller's stream.
///
/// # Safety
/// As [`dk_moe_route`].
#[no_mangle]
pub unsafe extern "C" fn dk_moe_slot_dot(
    ctx: *const DkContext,
    args: *const DkMoeSlotDotArgs,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract (null is rejected).
        let a = unsafe { read_arg("args", args)? };
        let (n, h, k, rows, dt, slots) = sizes(a.n, a.h, a.k, a.rows, "tokens", a.dtype)?;
        let tokens_stride = to_usize("tokens_stride", a.tokens_stride)?;
        let rows_stride = to_usize("rows_stride", a.rows_stride)?;
        let loc = c.location();
        // SAFETY (all views): as in dk_moe_route.
        let call = unsafe {
            SlotDot {
                tokens: Matrix::from_raw(a.tokens.cast(), dt, n, h, tokens_stride, loc),
                rows: Matrix::from_raw(a.rows_in.cast(), dt, rows, h, rows_stride, loc),
                k,
                position: Vector::from_raw(a.position, slots, loc),
                out: VectorMut::from_raw(a.out, slots, loc),
            }
        };
        // SAFETY: forwarded contract.
        let launch = unsafe { Launch::on_stream(stream) };
        c.moe_slot_dot(call, &launch)
    })
}

/// The gradients of a permute in one call on the caller's stream: `grad_x` (the combine of
/// `grad_xp`, weighted when the forward scaled) and, with `x` and `grad_weights`, the weights'
/// gradient (the slot-dot of `x` with `grad_xp`), bit for bit `dk_moe_combine` +
/// `dk_moe_slot_dot`.
///
/// # Safety
/// As [`dk_moe_route`].
#[no_mangle]
pub unsafe extern "C" fn dk_moe_permute_backward(
    ctx: *const DkContext,
    args: *const DkMoePermuteBackwardArgs,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract (null is rejected).
        let a = unsafe { read_arg("args", args)? };
        let (n, h, k, rows, dt, slots) = sizes(a.n, a.h, a.k, a.rows, "grad_xp", a.dtype)?;
        let grad_xp_stride = to_usize("grad_xp_stride", a.grad_xp_stride)?;
        let x_stride = optional_stride("x_stride", a.x, a.x_stride)?;
        let grad_x_stride = to_usize("grad_x_stride", a.grad_x_stride)?;
        let loc = c.location();
        // SAFETY (all views): as in dk_moe_route.
        let call = unsafe {
            PermuteBackward {
                grad_xp: Matrix::from_raw(a.grad_xp.cast(), dt, rows, h, grad_xp_stride, loc),
                k,
                position: Vector::from_raw(a.position, slots, loc),
                weights: (!a.weights.is_null()).then(|| Vector::from_raw(a.weights, slots, loc)),
                x: (!a.x.is_null()).then(|| Matrix::from_raw(a.x.cast(), dt, n, h, x_stride, loc)),
                grad_x: MatrixMut::from_raw(a.grad_x.cast(), dt, n, h, grad_x_stride, loc),
                grad_weights: (!a.grad_weights.is_null())
                    .then(|| VectorMut::from_raw(a.grad_weights, slots, loc)),
            }
        };
        // SAFETY: forwarded contract.
        let launch = unsafe { Launch::on_stream(stream) };
        c.moe_permute_backward(call, &launch)
    })
}

/// The gradients of a combine in one call on the caller's stream: `grad_expert_out` (the
/// permute of `grad_y`, scaled when the combine was weighted) and, with `expert_out` and
/// `grad_weights`, the weights' gradient (the slot-dot of `grad_y` with `expert_out`), bit for
/// bit `dk_moe_permute` + `dk_moe_slot_dot`. No workspace argument (without `grad_weights` on
/// CUDA the permute's scratch is allocated on the stream).
///
/// # Safety
/// As [`dk_moe_route`].
#[no_mangle]
pub unsafe extern "C" fn dk_moe_combine_backward(
    ctx: *const DkContext,
    args: *const DkMoeCombineBackwardArgs,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract (null is rejected).
        let a = unsafe { read_arg("args", args)? };
        let (n, h, k, rows, dt, slots) = sizes(a.n, a.h, a.k, a.rows, "grad_y", a.dtype)?;
        let grad_y_stride = to_usize("grad_y_stride", a.grad_y_stride)?;
        let eo_stride = optional_stride("expert_out_stride", a.expert_out, a.expert_out_stride)?;
        let geo_stride = to_usize("grad_expert_out_stride", a.grad_expert_out_stride)?;
        let loc = c.location();
        // SAFETY (all views): as in dk_moe_route.
        let call = unsafe {
            CombineBackward {
                grad_y: Matrix::from_raw(a.grad_y.cast(), dt, n, h, grad_y_stride, loc),
                expert_out: (!a.expert_out.is_null())
                    .then(|| Matrix::from_raw(a.expert_out.cast(), dt, rows, h, eo_stride, loc)),
                k,
                perm: Vector::from_raw(a.perm, rows, loc),
                position: Vector::from_raw(a.position, slots, loc),
                weights: (!a.weights.is_null()).then(|| Vector::from_raw(a.weights, slots, loc)),
                grad_expert_out: MatrixMut::from_raw(
                    a.grad_expert_out.cast(),
                    dt,
                    rows,
                    h,
                    geo_stride,
                    loc,
                ),
                grad_weights: (!a.grad_weights.is_null())
                    .then(|| VectorMut::from_raw(a.grad_weights, slots, loc)),
            }
        };
        // SAFETY: forwarded contract.
        let launch = unsafe { Launch::on_stream(stream) };
        c.moe_combine_backward(call, &launch)
    })
}

/// Keeps `max_rows` (the Rust bound) and `dk_moe_max_rows` in step for in-range arguments.
#[cfg(test)]
mod tests {
    use super::*;
    use distill_kernels::moe::max_rows;

    #[test]
    fn c_and_rust_bounds_agree() {
        for (n, e, k, block, cap) in [
            (10, 4, 2, 1, 0),
            (10, 4, 2, 8, 0),
            (10, 4, 2, 1, 3),
            (1, 1, 1, 1, 0),
        ] {
            let rust = max_rows(n, e, k, block, (cap != 0).then_some(cap));
            assert_eq!(
                dk_moe_max_rows(n as i64, e as i32, k as i32, block as i32, cap as i64),
                rust as i64
            );
        }
        assert_eq!(dk_moe_max_rows(-1, 4, 2, 1, 0), -1);
        assert_eq!(dk_moe_max_rows(1, 0, 2, 1, 0), -1);
        assert_eq!(dk_moe_max_rows(1, 4, 0, 1, 0), -1);
        assert_eq!(dk_moe_max_rows(1, 4, 2, 0, 0), -1);
        assert_eq!(dk_moe_max_rows(1, 4, 2, 1, -5), -1);
        assert_eq!(dk_moe_max_rows(i64::MAX, 4, 2, 1, 0), -1);
    }
}
