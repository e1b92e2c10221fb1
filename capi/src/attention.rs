//! C ABI of grouped-query attention (`dk_attention_*`): forward, backward and the backward's
//! workspace query.

use std::ffi::c_void;

use super::context::{context, DkContext};
use super::divergence::dtype;
use super::{boundary, read_arg, to_usize, write_workspace_size, DkStatus};
use crate::bail;
use distill_kernels::attention::{Attention, AttentionBackward, AttentionParams, Batch};
use distill_kernels::device::{Context, Launch};
use distill_kernels::tensor::{Location, Matrix, MatrixMut, Vector, VectorMut};
use distill_kernels::Result;

/// `dk_attention_params`: heads, head dimension, mask, softmax scale, determinism.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkAttentionParams {
    /// Query heads Hq (≥ 1, a multiple of `heads_kv`).
    pub heads_q: i64,
    /// Key / value heads Hkv (≥ 1).
    pub heads_kv: i64,
    /// Head dimension D: 64 or 128.
    pub head_dim: i64,
    /// 1: causal mask aligned bottom-right; 0: none.
    pub causal: i32,
    /// Scale of `q·k` before the softmax; 0 = `1/√D`, else finite and > 0.
    pub softmax_scale: f32,
    /// Backward: 1 = bitwise reproducible dq / dk / dv; 0 = may use float atomics.
    pub deterministic: i32,
}

/// `dk_attention_batch`: how token rows form sequences (padded or packed variable-length).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkAttentionBatch {
    /// Sequences B (≥ 0).
    pub batch: i64,
    /// Padded: queries per sequence; varlen: a bound on the longest query sequence.
    pub seqlen_q: i64,
    /// Padded: keys per sequence; varlen: a bound on the longest key sequence.
    pub seqlen_k: i64,
    /// NULL (padded) or `[batch + 1]` query row offsets.
    pub cu_seqlens_q: *const i32,
    /// NULL (padded) or `[batch + 1]` key row offsets.
    pub cu_seqlens_k: *const i32,
    /// Varlen: rows of q (= `cu_seqlens_q[batch]`); padded: ignored.
    pub rows_q: i64,
    /// Varlen: rows of k (= `cu_seqlens_k[batch]`); padded: ignored.
    pub rows_k: i64,
}

/// `dk_attention_args`: operands and outputs of `dk_attention_forward`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkAttentionArgs {
    /// How rows form sequences.
    pub batch: DkAttentionBatch,
    /// `dk_dtype` of q, k, v and out.
    pub dtype: i32,
    /// Queries `[rows_q, heads_q·head_dim]`.
    pub q: *const c_void,
    /// Elements between q rows.
    pub q_stride: i64,
    /// Keys `[rows_k, heads_kv·head_dim]`.
    pub k: *const c_void,
    /// Elements between k rows.
    pub k_stride: i64,
    /// Values `[rows_k, heads_kv·head_dim]`.
    pub v: *const c_void,
    /// Elements between v rows.
    pub v_stride: i64,
    /// Out `[rows_q, heads_q·head_dim]`.
    pub out: *mut c_void,
    /// Elements between out rows.
    pub out_stride: i64,
    /// Out: f32 log-sum-exp, `[batch, heads_q, seqlen_q]` (padded) or `[heads_q, rows_q]`.
    pub lse: *mut f32,
}

/// `dk_attention_backward_args`: operands and outputs of `dk_attention_backward`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DkAttentionBackwardArgs {
    /// How rows form sequences (as in the forward call).
    pub batch: DkAttentionBatch,
    /// `dk_dtype` of every tensor operand (lse is f32).
    pub dtype: i32,
    /// Gradient w.r.t. out, `[rows_q, heads_q·head_dim]`.
    pub dout: *const c_void,
    /// Elements between dout rows.
    pub dout_stride: i64,
    /// Queries of the forward call.
    pub q: *const c_void,
    /// Elements between q rows.
    pub q_stride: i64,
    /// Keys of the forward call.
    pub k: *const c_void,
    /// Elements between k rows.
    pub k_stride: i64,
    /// Values of the forward call.
    pub v: *const c_void,
    /// Elements between v rows.
    pub v_stride: i64,
    /// Out of the forward call.
    pub out: *const c_void,
    /// Elements between out rows.
    pub out_stride: i64,
    /// LSE of the forward call.
    pub lse: *const f32,
    /// Out: gradient w.r.t. q, `[rows_q, heads_q·head_dim]`.
    pub dq: *mut c_void,
    /// Elements between dq rows.
    pub dq_stride: i64,
    /// Out: gradient w.r.t. k, `[rows_k, heads_kv·head_dim]`.
    pub dk: *mut c_void,
    /// Elements between dk rows.
    pub dk_stride: i64,
    /// Out: gradient w.r.t. v, `[rows_k, heads_kv·head_dim]`.
    pub dv: *mut c_void,
    /// Elements between dv rows.
    pub dv_stride: i64,
}

/// A C flag that must be 0 or 1.
fn flag(what: &str, x: i32) -> Result<bool> {
    match x {
        0 => Ok(false),
        1 => Ok(true),
        _ => bail!(InvalidArgument, "{what} must be 0 or 1, got {x}"),
    }
}

/// `a · b`, rejecting overflow.
fn product(what: &str, a: usize, b: usize) -> Result<usize> {
    match a.checked_mul(b) {
        Some(p) => Ok(p),
        None => bail!(Shape, "{what} = {a}·{b} overflows"),
    }
}

/// Converts and checks the C parameters.
fn params_from_c(p: &DkAttentionParams) -> Result<AttentionParams> {
    let softmax_scale = if p.softmax_scale == 0.0 {
        None
    } else {
        Some(p.softmax_scale)
    };
    let params = AttentionParams {
        heads_q: to_usize("heads_q", p.heads_q)?,
        heads_kv: to_usize("heads_kv", p.heads_kv)?,
        head_dim: to_usize("head_dim", p.head_dim)?,
        causal: flag("causal", p.causal)?,
        softmax_scale,
        deterministic: flag("deterministic", p.deterministic)?,
    };
    params.validate()?;
    Ok(params)
}

/// Reads the parameters behind `params`.
///
/// # Safety
/// `params` null (rejected) or a valid struct.
unsafe fn read_params(params: *const DkAttentionParams) -> Result<AttentionParams> {
    // SAFETY: forwarded contract (null is rejected).
    let p = unsafe { read_arg("params (start from dk_attention_params_default())", params)? };
    params_from_c(&p)
}

/// The Rust batch and the row counts of q (Tq) and k (Tk).
///
/// # Safety
/// The offsets, when non-null, must hold `batch + 1` entries in `loc`'s memory.
unsafe fn batch_from_c<'a>(
    b: &DkAttentionBatch,
    loc: Location,
) -> Result<(Batch<'a>, usize, usize)> {
    let batch = to_usize("batch.batch", b.batch)?;
    let seqlen_q = to_usize("batch.seqlen_q", b.seqlen_q)?;
    let seqlen_k = to_usize("batch.seqlen_k", b.seqlen_k)?;
    match (b.cu_seqlens_q.is_null(), b.cu_seqlens_k.is_null()) {
        (true, true) => {
            let rows_q = product("batch·seqlen_q", batch, seqlen_q)?;
            let rows_k = product("batch·seqlen_k", batch, seqlen_k)?;
            let batch = Batch::Padded {
                batch,
                seqlen_q,
                seqlen_k,
            };
            Ok((batch, rows_q, rows_k))
        }
        (false, false) => {
            let rows_q = to_usize("batch.rows_q", b.rows_q)?;
            let rows_k = to_usize("batch.rows_k", b.rows_k)?;
            let Some(len) = batch.checked_add(1) else {
                bail!(Shape, "batch = {batch} is too large");
            };
            // SAFETY: forwarded contract.
            let (cu_q, cu_k) = unsafe {
                (
                    Vector::from_raw(b.cu_seqlens_q, len, loc),
                    Vector::from_raw(b.cu_seqlens_k, len, loc),
                )
            };
            let batch = Batch::Varlen {
                cu_seqlens_q: cu_q,
                cu_seqlens_k: cu_k,
                max_seqlen_q: seqlen_q,
                max_seqlen_k: seqlen_k,
            };
            Ok((batch, rows_q, rows_k))
        }
        (q_null, _) => bail!(
            InvalidArgument,
            "cu_seqlens_q and cu_seqlens_k must both be NULL (padded batch) or both set \
             (varlen batch); only {} is set",
            if q_null {
                "cu_seqlens_k"
            } else {
                "cu_seqlens_q"
            }
        ),
    }
}

/// Row lengths in elements of q-shaped (`heads_q·D`) and kv-shaped (`heads_kv·D`) operands, and
/// the LSE's entries (`heads_q·Tq`).
fn widths(p: &AttentionParams, rows_q: usize) -> Result<(usize, usize, usize)> {
    let q_cols = product("heads_q·head_dim", p.heads_q, p.head_dim)?;
    let kv_cols = product("heads_kv·head_dim", p.heads_kv, p.head_dim)?;
    let lse_len = product("heads_q·rows_q", p.heads_q, rows_q)?;
    Ok((q_cols, kv_cols, lse_len))
}

/// Reads `args` and `params` behind their pointers and builds the forward call.
///
/// # Safety
/// `args` and `params` null (rejected) or valid structs; the pointers in `args` valid for the
/// shapes it describes, in the context's memory.
unsafe fn forward_from_c<'a>(
    c: &Context,
    args: *const DkAttentionArgs,
    params: *const DkAttentionParams,
) -> Result<(Attention<'a>, AttentionParams)> {
    // SAFETY: forwarded contract (null is rejected).
    let a = unsafe { read_arg("args", args)? };
    // SAFETY: as above.
    let params = unsafe { read_params(params)? };
    let loc = c.location();
    // SAFETY: forwarded contract.
    let (batch, rows_q, rows_k) = unsafe { batch_from_c(&a.batch, loc)? };
    let (q_cols, kv_cols, lse_len) = widths(&params, rows_q)?;
    let d = dtype("q", a.dtype)?;
    let q_stride = to_usize("q_stride", a.q_stride)?;
    let k_stride = to_usize("k_stride", a.k_stride)?;
    let v_stride = to_usize("v_stride", a.v_stride)?;
    let out_stride = to_usize("out_stride", a.out_stride)?;
    // SAFETY (all views): the caller guarantees the pointers cover the shapes in the context's
    // memory; null pointers are rejected by the operation before any access.
    let call = unsafe {
        Attention {
            batch,
            q: Matrix::from_raw(a.q.cast(), d, rows_q, q_cols, q_stride, loc),
            k: Matrix::from_raw(a.k.cast(), d, rows_k, kv_cols, k_stride, loc),
            v: Matrix::from_raw(a.v.cast(), d, rows_k, kv_cols, v_stride, loc),
            out: MatrixMut::from_raw(a.out.cast(), d, rows_q, q_cols, out_stride, loc),
            lse: VectorMut::from_raw(a.lse, lse_len, loc),
        }
    };
    Ok((call, params))
}

/// Reads `args` and `params` behind their pointers and builds the backward call.
///
/// # Safety
/// As [`forward_from_c`].
unsafe fn backward_from_c<'a>(
    c: &Context,
    args: *const DkAttentionBackwardArgs,
    params: *const DkAttentionParams,
) -> Result<(AttentionBackward<'a>, AttentionParams)> {
    // SAFETY: forwarded contract (null is rejected).
    let a = unsafe { read_arg("args", args)? };
    // SAFETY: as above.
    let params = unsafe { read_params(params)? };
    let loc = c.location();
    // SAFETY: forwarded contract.
    let (batch, rows_q, rows_k) = unsafe { batch_from_c(&a.batch, loc)? };
    let (q_cols, kv_cols, lse_len) = widths(&params, rows_q)?;
    let d = dtype("q", a.dtype)?;
    let dout_stride = to_usize("dout_stride", a.dout_stride)?;
    let q_stride = to_usize("q_stride", a.q_stride)?;
    let k_stride = to_usize("k_stride", a.k_stride)?;
    let v_stride = to_usize("v_stride", a.v_stride)?;
    let out_stride = to_usize("out_stride", a.out_stride)?;
    let dq_stride = to_usize("dq_stride", a.dq_stride)?;
    let dk_stride = to_usize("dk_stride", a.dk_stride)?;
    let dv_stride = to_usize("dv_stride", a.dv_stride)?;
    // SAFETY (all views): as in forward_from_c.
    let call = unsafe {
        AttentionBackward {
            batch,
            dout: Matrix::from_raw(a.dout.cast(), d, rows_q, q_cols, dout_stride, loc),
            q: Matrix::from_raw(a.q.cast(), d, rows_q, q_cols, q_stride, loc),
            k: Matrix::from_raw(a.k.cast(), d, rows_k, kv_cols, k_stride, loc),
            v: Matrix::from_raw(a.v.cast(), d, rows_k, kv_cols, v_stride, loc),
            out: Matrix::from_raw(a.out.cast(), d, rows_q, q_cols, out_stride, loc),
            lse: Vector::from_raw(a.lse, lse_len, loc),
            dq: MatrixMut::from_raw(a.dq.cast(), d, rows_q, q_cols, dq_stride, loc),
            dk: MatrixMut::from_raw(a.dk.cast(), d, rows_k, kv_cols, dk_stride, loc),
            dv: MatrixMut::from_raw(a.dv.cast(), d, rows_k, kv_cols, dv_stride, loc),
        }
    };
    Ok((call, params))
}

/// The default parameters: one query and one KV head, head_dim 128, not causal, the default
/// softmax scale (0 = `1/√D`), deterministic backward.
#[no_mangle]
pub extern "C" fn dk_attention_params_default() -> DkAttentionParams {
    let d = AttentionParams::new(1, 1, 128);
    DkAttentionParams {
        heads_q: d.heads_q as i64,
        heads_kv: d.heads_kv as i64,
        head_dim: d.head_dim as i64,
        causal: d.causal as i32,
        softmax_scale: d.softmax_scale.unwrap_or(0.0),
        deterministic: d.deterministic as i32,
    }
}

/// Attention forward on the caller's stream: `out` and `lse`. Needs no workspace.
///
/// # Safety
/// `ctx` null or live; `args` and `params` null or valid structs; every non-null pointer in
/// `args` valid for the shapes it describes, in the context's memory (host for CPU, device for
/// CUDA); `stream` null or a live stream of the context's device.
#[no_mangle]
pub unsafe extern "C" fn dk_attention_forward(
    ctx: *const DkContext,
    args: *const DkAttentionArgs,
    params: *const DkAttentionParams,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract.
        let (call, params) = unsafe { forward_from_c(c, args, params)? };
        // SAFETY: forwarded contract.
        let launch = unsafe { Launch::on_stream(stream) };
        c.attention(call, &params, &launch)
    })
}

/// Bytes of workspace `dk_attention_backward` needs for this call on this context (0 on the
/// CPU). Validates the call like the backward itself.
///
/// # Safety
/// `ctx` null or live; `args` and `params` null or valid structs whose pointers describe the
/// call; `bytes` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn dk_attention_backward_workspace_size(
    ctx: *const DkContext,
    args: *const DkAttentionBackwardArgs,
    params: *const DkAttentionParams,
    bytes: *mut usize,
) -> DkStatus {
    let size = |c: &Context| {
        // SAFETY: forwarded contract.
        let (call, params) = unsafe { backward_from_c(c, args, params)? };
        c.attention_backward_workspace_size(&call, &params)
    };
    // SAFETY: forwarded contract.
    unsafe { write_workspace_size(ctx, bytes, size) }
}

/// Attention backward on the caller's stream: `dq`, `dk` and `dv`. `workspace` may be NULL (the
/// library allocates, stream-ordered) or hold at least `dk_attention_backward_workspace_size`
/// bytes.
///
/// # Safety
/// As [`dk_attention_forward`]; `workspace` null or `workspace_bytes` bytes in the context's
/// memory.
#[no_mangle]
pub unsafe extern "C" fn dk_attention_backward(
    ctx: *const DkContext,
    args: *const DkAttentionBackwardArgs,
    params: *const DkAttentionParams,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        // SAFETY: forwarded contract.
        let (call, params) = unsafe { backward_from_c(c, args, params)? };
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
        c.attention_backward(call, &params, &launch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_params_convert_to_the_rust_defaults() {
        let p = params_from_c(&dk_attention_params_default()).unwrap();
        assert_eq!(p, AttentionParams::new(1, 1, 128));
    }

    #[test]
    fn scale_zero_is_the_default_and_bad_scales_are_rejected() {
        let mut c = dk_attention_params_default();
        c.head_dim = 64;
        assert_eq!(params_from_c(&c).unwrap().softmax_scale, None);
        c.softmax_scale = 0.5;
        assert_eq!(params_from_c(&c).unwrap().softmax_scale, Some(0.5));
        for s in [-1.0, f32::NAN, f32::INFINITY] {
            c.softmax_scale = s;
            let e = params_from_c(&c).unwrap_err();
            assert_eq!(e.kind(), distill_kernels::ErrorKind::InvalidArgument, "{s}");
        }
    }

    #[test]
    fn one_cu_seqlens_is_an_invalid_argument() {
        let cu = [0i32, 3];
        let b = DkAttentionBatch {
            batch: 1,
            seqlen_q: 3,
            seqlen_k: 3,
            cu_seqlens_q: cu.as_ptr(),
            cu_seqlens_k: std::ptr::null(),
            rows_q: 3,
            rows_k: 3,
        };
        // SAFETY: the one offset array set holds batch + 1 entries.
        let e = unsafe { batch_from_c(&b, Location::Host) }.unwrap_err();
        assert_eq!(e.kind(), distill_kernels::ErrorKind::InvalidArgument);
        let b = DkAttentionBatch {
            cu_seqlens_q: std::ptr::null(),
            cu_seqlens_k: cu.as_ptr(),
            ..b
        };
        // SAFETY: as above.
        let e = unsafe { batch_from_c(&b, Location::Host) }.unwrap_err();
        assert_eq!(e.kind(), distill_kernels::ErrorKind::InvalidArgument);
    }
}
