//! Validation of MoE calls: everything that can be checked without touching memory (locations,
//! null pointers, dtypes, shapes, strides, lengths, 32-bit index ranges, alignment, overlaps),
//! turning the public views into the raw structs the backends consume. On error nothing has been
//! written.
//!
//! Alignment: index, weight and logit pointers to their element size; activation rows (permute,
//! combine, slot dot) to [`ROW_ALIGN`] bytes (base pointer and row stride), on every backend.
//!
//! The index contents (`perm`, `position`) cannot be checked here: the CPU backend checks them
//! before writing; the CUDA kernels treat an entry out of range as −1 (they clamp).

use super::params::{MAX_HIDDEN, MAX_K, ROW_ALIGN};
use super::{
    Combine, CombineBackward, Permute, PermuteBackward, RawCombine, RawCombineBackward, RawPermute,
    RawPermuteBackward, RawRoute, RawSlotDot, Route, RouteParams, SlotDot,
};
use crate::checks::{check_location, check_non_null};
use crate::device::Context;
use crate::error::{bail, Error, Result};
use crate::tensor::{span_bytes, DType, Matrix, MatrixMut, Vector, VectorMut};

/// Largest count or index that fits the int32 outputs (`perm`, `position`, `offsets`).
const MAX_I32: usize = i32::MAX as usize;

/// A half-open byte range `[start, end)` some operand spans.
#[derive(Debug, Clone, Copy)]
struct Span {
    what: &'static str,
    start: usize,
    end: usize,
}

impl Span {
    fn of(what: &'static str, ptr: *const u8, elems: usize, elem_size: usize) -> Span {
        let start = ptr as usize;
        Span {
            what,
            start,
            end: start.saturating_add(elems.saturating_mul(elem_size)),
        }
    }

    /// A matrix's span; a shape error where its rows overflow the address range.
    fn matrix(
        what: &'static str,
        ptr: *const u8,
        rows: usize,
        cols: usize,
        stride: usize,
        dtype: DType,
    ) -> Result<Span> {
        let bytes = span_bytes(what, rows, cols, stride, dtype.size())?;
        Ok(Span::of(what, ptr, bytes, 1))
    }

    fn vector<T>(what: &'static str, ptr: *const T, len: usize) -> Span {
        Span::of(what, ptr.cast(), len, std::mem::size_of::<T>())
    }

    fn overlaps(&self, other: &Span) -> bool {
        // An empty span (an operand of no entries) shares no byte with anything.
        self.start < self.end
            && other.start < other.end
            && self.start < other.end
            && other.start < self.end
    }
}

/// Every output must be disjoint from every input and from every other output.
fn check_disjoint(outputs: &[Span], inputs: &[Span]) -> Result<()> {
    for (i, out) in outputs.iter().enumerate() {
        if let Some(input) = inputs.iter().find(|s| out.overlaps(s)) {
            bail!(Shape, "{} output overlaps input {}", out.what, input.what);
        }
        if let Some(other) = outputs[i + 1..].iter().find(|s| out.overlaps(s)) {
            bail!(
                Shape,
                "{} output overlaps the {} output",
                out.what,
                other.what
            );
        }
    }
    Ok(())
}

/// Every pointer must be aligned to its element size.
fn check_aligned(spans: &[(Span, usize)]) -> Result<()> {
    for (span, align) in spans {
        if span.start % align != 0 {
            bail!(
                InvalidArgument,
                "{} pointer {:#x} is not aligned to its {align}-byte elements",
                span.what,
                span.start
            );
        }
    }
    Ok(())
}

/// Activation matrices `(what, pointer, row stride, dtype)`: base pointer and row stride in bytes
/// must be multiples of [`ROW_ALIGN`].
fn check_rows_aligned(mats: &[(&str, *const u8, usize, DType)]) -> Result<()> {
    for &(what, ptr, stride, dtype) in mats {
        if ptr as usize % ROW_ALIGN != 0 {
            bail!(
                InvalidArgument,
                "{what} pointer {:#x} is not {ROW_ALIGN}-byte aligned (rows are moved {ROW_ALIGN} bytes at a time)",
                ptr as usize
            );
        }
        if (stride % ROW_ALIGN) * dtype.size() % ROW_ALIGN != 0 {
            bail!(
                InvalidArgument,
                "{what} row stride {stride} ({}) is not a multiple of {ROW_ALIGN} bytes",
                dtype.name()
            );
        }
    }
    Ok(())
}

/// Location and null checks of a read-only vector.
fn vector_in<T>(ctx: &Context, what: &str, v: &Vector<'_, T>) -> Result<()> {
    check_location(ctx, what, v.location)?;
    // No entries (no tokens): may be null, as an empty tensor's pointer is.
    if v.len == 0 {
        return Ok(());
    }
    check_non_null(what, v.ptr)
}

/// Location and null checks of an output vector.
fn vector_out<T>(ctx: &Context, what: &str, v: &VectorMut<'_, T>) -> Result<()> {
    check_location(ctx, what, v.location)?;
    // No entries: may be null, as in vector_in.
    if v.len == 0 {
        return Ok(());
    }
    check_non_null(what, v.ptr)
}

fn check_len(what: &str, len: usize, want: usize, of: &str) -> Result<()> {
    if len != want {
        bail!(Shape, "{what} has {len} entries, {want} expected ({of})");
    }
    Ok(())
}

/// Location, null, stride and hidden-size checks of an activation matrix `[rows, h]`.
fn activations_in(ctx: &Context, what: &str, m: &Matrix<'_>) -> Result<()> {
    check_location(ctx, what, m.location)?;
    if m.rows > 0 {
        check_non_null(what, m.ptr)?;
    }
    check_hidden(what, m.cols)?;
    if m.row_stride < m.cols {
        bail!(
            Shape,
            "{what} row stride {} is smaller than H = {}",
            m.row_stride,
            m.cols
        );
    }
    Ok(())
}

/// As [`activations_in`] for an output matrix, which must be `[rows, h]` of `dtype`.
fn activations_out(
    ctx: &Context,
    what: &str,
    m: &MatrixMut<'_>,
    rows: usize,
    h: usize,
    dtype: DType,
) -> Result<()> {
    check_location(ctx, what, m.location)?;
    if rows > 0 {
        check_non_null(what, m.ptr)?;
    }
    if m.dtype != dtype {
        bail!(
            UnsupportedDtype,
            "{what} dtype {} differs from the input dtype {}",
            m.dtype.name(),
            dtype.name()
        );
    }
    if m.rows != rows || m.cols != h {
        bail!(
            Shape,
            "{what} is {} x {}, {rows} x {h} expected",
            m.rows,
            m.cols
        );
    }
    if m.row_stride < h {
        bail!(
            Shape,
            "{what} row stride {} is smaller than H = {h}",
            m.row_stride
        );
    }
    Ok(())
}

fn check_hidden(what: &str, h: usize) -> Result<()> {
    if h < 8 || h % 8 != 0 || h > MAX_HIDDEN {
        bail!(
            Shape,
            "{what}: H = {h} must be a multiple of 8 in 8..={MAX_HIDDEN}"
        );
    }
    Ok(())
}

/// The checks every MoE call makes of its N tokens and k slots per token: N ≤ 2^31 − 1,
/// 1 ≤ k ≤ [`MAX_K`](super::MAX_K) and N·k ≤ 2^31 − 1 (int32 indices). Returns N·k. The C ABI's
/// workspace queries make them too, so a query answers with the status its call would.
///
/// # Errors
/// [`ErrorKind::Shape`](crate::ErrorKind::Shape) for N or N·k out of range,
/// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) for k.
pub fn check_tokens_and_slots(n: usize, k: usize) -> Result<usize> {
    check_tokens(n)?;
    check_slots(n, k)
}

fn check_tokens(n: usize) -> Result<()> {
    // N = 0 is an empty batch (src/moe/empty.rs).
    if n > MAX_I32 {
        bail!(Shape, "N = {n} tokens exceed 2^31 - 1");
    }
    Ok(())
}

/// Checks `1 ≤ k ≤ 32` and that the `n·k` slots index in int32; returns `n·k`.
fn check_slots(n: usize, k: usize) -> Result<usize> {
    if k == 0 || k > MAX_K {
        bail!(InvalidArgument, "k = {k} must be in 1..={MAX_K}");
    }
    match n.checked_mul(k) {
        Some(slots) if slots <= MAX_I32 => Ok(slots),
        _ => bail!(Shape, "N·k = {n}·{k} slots exceed 2^31 - 1 (int32 indices)"),
    }
}

/// Checks the number of permuted rows (int32-indexable; ≥ 1 unless `allow_empty`).
fn check_rows(what: &str, rows: usize, allow_empty: bool) -> Result<()> {
    if (rows == 0 && !allow_empty) || rows > MAX_I32 {
        bail!(Shape, "{what} has {rows} rows: must be in 1..=2^31 - 1");
    }
    Ok(())
}

fn check_same_dtype(what: &str, dtype: DType, want: DType) -> Result<()> {
    if dtype != want {
        bail!(
            UnsupportedDtype,
            "{what} dtype {} differs from {}",
            dtype.name(),
            want.name()
        );
    }
    Ok(())
}

impl RawRoute {
    /// Checks a route call against `ctx` and `params`.
    pub(crate) fn validate(ctx: &Context, call: Route<'_>, params: &RouteParams) -> Result<Self> {
        let logits = &call.logits;
        let (n, e) = (logits.rows, logits.cols);
        params.validate(e)?;
        check_location(ctx, "router logits", logits.location)?;
        if n > 0 {
            check_non_null("router logits", logits.ptr)?;
        }
        if let Some(b) = &call.bias {
            vector_in(ctx, "bias", b)?;
        }
        vector_out(ctx, "expert_ids", &call.expert_ids)?;
        vector_out(ctx, "weights", &call.weights)?;
        vector_out(ctx, "counts", &call.counts)?;
        vector_out(ctx, "offsets", &call.offsets)?;
        vector_out(ctx, "perm", &call.perm)?;
        vector_out(ctx, "position", &call.position)?;
        if !matches!(logits.dtype, DType::F32 | DType::BF16) {
            bail!(
                UnsupportedDtype,
                "router logits must be f32 or bf16, got {}",
                logits.dtype.name()
            );
        }
        check_tokens(n)?;
        if logits.row_stride < e {
            bail!(
                Shape,
                "router logits row stride {} is smaller than E = {e}",
                logits.row_stride
            );
        }
        let slots = check_slots(n, params.k)?;
        let need = params.max_rows(n, e);
        if need > MAX_I32 {
            bail!(
                Shape,
                "up to {need} permuted rows (N = {n}, k = {}, block = {}) exceed 2^31 - 1",
                params.k,
                params.block
            );
        }
        if let Some(b) = &call.bias {
            check_len("bias", b.len, e, "one per expert")?;
        }
        let per_slot = format!("N·k = {n}·{}", params.k);
        check_len("expert_ids", call.expert_ids.len, slots, &per_slot)?;
        check_len("weights", call.weights.len, slots, &per_slot)?;
        check_len("position", call.position.len, slots, &per_slot)?;
        check_len("counts", call.counts.len, e, "one per expert")?;
        check_len("offsets", call.offsets.len, e + 1, "E + 1")?;
        let perm_rows = call.perm.len;
        if perm_rows < need {
            bail!(
                Shape,
                "perm has {perm_rows} entries, at least max_rows = {need} needed"
            );
        }
        if perm_rows > MAX_I32 {
            bail!(Shape, "perm has {perm_rows} entries, more than 2^31 - 1");
        }
        let bias = call.bias.as_ref().map_or(std::ptr::null(), |b| b.ptr);
        let logits_span = Span::matrix(
            "router logits",
            logits.ptr,
            n,
            e,
            logits.row_stride,
            logits.dtype,
        )?;
        let bias_span = Span::vector("bias", bias, if bias.is_null() { 0 } else { e });
        let outputs = [
            Span::vector("expert_ids", call.expert_ids.ptr, slots),
            Span::vector("weights", call.weights.ptr, slots),
            Span::vector("counts", call.counts.ptr, e),
            Span::vector("offsets", call.offsets.ptr, e + 1),
            Span::vector("perm", call.perm.ptr, perm_rows),
            Span::vector("position", call.position.ptr, slots),
        ];
        let mut aligned: Vec<(Span, usize)> = outputs.iter().map(|s| (*s, 4)).collect();
        aligned.push((logits_span, logits.dtype.size()));
        aligned.push((bias_span, 4));
        check_aligned(&aligned)?;
        check_disjoint(&outputs, &[logits_span, bias_span])?;
        Ok(RawRoute {
            n,
            e,
            logits: logits.ptr,
            logits_dtype: logits.dtype,
            logits_stride: logits.row_stride,
            bias,
            expert_ids: call.expert_ids.ptr,
            weights: call.weights.ptr,
            counts: call.counts.ptr,
            offsets: call.offsets.ptr,
            perm: call.perm.ptr,
            perm_rows,
            position: call.position.ptr,
        })
    }
}

impl RawPermute {
    /// Checks a permute call against `ctx`.
    pub(crate) fn validate(ctx: &Context, call: Permute<'_>) -> Result<Self> {
        let x = &call.x;
        activations_in(ctx, "x", x)?;
        vector_in(ctx, "perm", &call.perm)?;
        if let Some(w) = &call.weights {
            vector_in(ctx, "weights", w)?;
        }
        let (n, h, dtype) = (x.rows, x.cols, x.dtype);
        let rows = call.perm.len;
        activations_out(ctx, "permuted output", &call.out, rows, h, dtype)?;
        check_tokens(n)?;
        let slots = check_slots(n, call.k)?;
        check_rows("perm", rows, true)?;
        if let Some(w) = &call.weights {
            check_len("weights", w.len, slots, &format!("N·k = {n}·{}", call.k))?;
        }
        let weights = call.weights.as_ref().map_or(std::ptr::null(), |w| w.ptr);
        let out = &call.out;
        let x_span = Span::matrix("x", x.ptr, n, h, x.row_stride, dtype)?;
        let perm_span = Span::vector("perm", call.perm.ptr, rows);
        let w_span = Span::vector(
            "weights",
            weights,
            if weights.is_null() { 0 } else { slots },
        );
        let out_span = Span::matrix("permuted", out.ptr, rows, h, out.row_stride, dtype)?;
        check_aligned(&[(perm_span, 4), (w_span, 4)])?;
        check_rows_aligned(&[
            ("x", x.ptr, x.row_stride, dtype),
            ("permuted output", out.ptr, out.row_stride, dtype),
        ])?;
        check_disjoint(&[out_span], &[x_span, perm_span, w_span])?;
        Ok(RawPermute {
            n,
            h,
            k: call.k,
            rows,
            dtype,
            x: x.ptr,
            x_stride: x.row_stride,
            perm: call.perm.ptr,
            weights,
            out: out.ptr,
            out_stride: out.row_stride,
        })
    }
}

/// Checks `k` and that a position vector holds its `N·k` entries; returns N·k.
fn check_position(n: usize, k: usize, position_len: usize) -> Result<usize> {
    let slots = check_slots(n, k)?;
    check_len("position", position_len, slots, &format!("N·k = {n}·{k}"))?;
    Ok(slots)
}

impl RawCombine {
    /// Checks a combine call against `ctx`.
    pub(crate) fn validate(ctx: &Context, call: Combine<'_>) -> Result<Self> {
        let rows_in = &call.rows;
        activations_in(ctx, "rows", rows_in)?;
        vector_in(ctx, "position", &call.position)?;
        if let Some(w) = &call.weights {
            vector_in(ctx, "weights", w)?;
        }
        let y = &call.y;
        let (n, h, dtype, rows) = (y.rows, rows_in.cols, rows_in.dtype, rows_in.rows);
        activations_out(ctx, "y", y, n, h, dtype)?;
        check_tokens(n)?;
        check_rows("rows", rows, n == 0)?;
        let k = call.k;
        let slots = check_position(n, k, call.position.len)?;
        if let Some(w) = &call.weights {
            check_len("weights", w.len, slots, &format!("N·k = {n}·{k}"))?;
        }
        let weights = call.weights.as_ref().map_or(std::ptr::null(), |w| w.ptr);
        let rows_span = Span::matrix("rows", rows_in.ptr, rows, h, rows_in.row_stride, dtype)?;
        let pos_span = Span::vector("position", call.position.ptr, slots);
        let w_span = Span::vector(
            "weights",
            weights,
            if weights.is_null() { 0 } else { slots },
        );
        let y_span = Span::matrix("y", y.ptr, n, h, y.row_stride, dtype)?;
        check_aligned(&[(pos_span, 4), (w_span, 4)])?;
        check_rows_aligned(&[
            ("rows", rows_in.ptr, rows_in.row_stride, dtype),
            ("y", y.ptr, y.row_stride, dtype),
        ])?;
        check_disjoint(&[y_span], &[rows_span, pos_span, w_span])?;
        Ok(RawCombine {
            n,
            h,
            k,
            rows,
            dtype,
            rows_in: rows_in.ptr,
            rows_stride: rows_in.row_stride,
            position: call.position.ptr,
            weights,
            y: y.ptr,
            y_stride: y.row_stride,
        })
    }
}

impl RawSlotDot {
    /// Checks a slot-dot call against `ctx`.
    pub(crate) fn validate(ctx: &Context, call: SlotDot<'_>) -> Result<Self> {
        let (tokens, rows_in) = (&call.tokens, &call.rows);
        activations_in(ctx, "tokens", tokens)?;
        activations_in(ctx, "rows", rows_in)?;
        vector_in(ctx, "position", &call.position)?;
        vector_out(ctx, "slot-dot output", &call.out)?;
        let (n, h, dtype, rows) = (tokens.rows, tokens.cols, tokens.dtype, rows_in.rows);
        check_same_dtype("rows", rows_in.dtype, dtype)?;
        if rows_in.cols != h {
            bail!(
                Shape,
                "rows have H = {} but tokens have H = {h}",
                rows_in.cols
            );
        }
        check_tokens(n)?;
        check_rows("rows", rows, n == 0)?;
        let k = call.k;
        let slots = check_position(n, k, call.position.len)?;
        check_len(
            "slot-dot output",
            call.out.len,
            slots,
            &format!("N·k = {n}·{k}"),
        )?;
        let tokens_span = Span::matrix("tokens", tokens.ptr, n, h, tokens.row_stride, dtype)?;
        let rows_span = Span::matrix("rows", rows_in.ptr, rows, h, rows_in.row_stride, dtype)?;
        let pos_span = Span::vector("position", call.position.ptr, slots);
        let out_span = Span::vector("slot-dot", call.out.ptr, slots);
        check_aligned(&[(pos_span, 4), (out_span, 4)])?;
        check_rows_aligned(&[
            ("tokens", tokens.ptr, tokens.row_stride, dtype),
            ("rows", rows_in.ptr, rows_in.row_stride, dtype),
        ])?;
        check_disjoint(&[out_span], &[tokens_span, rows_span, pos_span])?;
        Ok(RawSlotDot {
            n,
            h,
            k,
            rows,
            dtype,
            tokens: tokens.ptr,
            tokens_stride: tokens.row_stride,
            rows_in: rows_in.ptr,
            rows_stride: rows_in.row_stride,
            position: call.position.ptr,
            out: call.out.ptr,
        })
    }
}

/// A sub-call's error with the backward pass's name for its operands in front.
fn within<T>(role: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| Error::new(e.kind(), format!("{role}: {}", e.message())))
}

/// `grad_weights` and the operand its dots need are given together or not at all.
fn check_pair(operand: &str, has_operand: bool, has_grad_weights: bool) -> Result<()> {
    if has_operand != has_grad_weights {
        bail!(
            InvalidArgument,
            "{operand} and grad_weights go together (the weights' gradient needs {operand}); one was given without the other"
        );
    }
    Ok(())
}

impl RawPermuteBackward {
    /// Checks a permute backward against `ctx`: the combine it computes and the slot-dot of the
    /// weights' gradient, then what neither checks (same tokens, outputs apart from each other
    /// and from the other call's inputs).
    pub(crate) fn validate(ctx: &Context, call: PermuteBackward<'_>) -> Result<Self> {
        check_pair("x", call.x.is_some(), call.grad_weights.is_some())?;
        let (grad_xp, k, position, weights) = (call.grad_xp, call.k, call.position, call.weights);
        let combine = within(
            "grad_x = combine(grad_xp as rows)",
            RawCombine::validate(
                ctx,
                Combine {
                    rows: grad_xp,
                    k,
                    position,
                    weights,
                    y: call.grad_x,
                },
            ),
        )?;
        let (Some(x), Some(out)) = (call.x, call.grad_weights) else {
            return Ok(RawPermuteBackward { combine, dot: None });
        };
        let dot = within(
            "grad_weights = slot_dot(x as tokens, grad_xp as rows)",
            RawSlotDot::validate(
                ctx,
                SlotDot {
                    tokens: x,
                    rows: grad_xp,
                    k,
                    position,
                    out,
                },
            ),
        )?;
        if dot.n != combine.n {
            bail!(
                Shape,
                "x has {} rows but grad_x has {} (one per token)",
                dot.n,
                combine.n
            );
        }
        let c = &combine;
        let grad_x = Span::matrix("grad_x", c.y, c.n, c.h, c.y_stride, c.dtype)?;
        let x_span = Span::matrix("x", dot.tokens, dot.n, dot.h, dot.tokens_stride, dot.dtype)?;
        let slots = c.n * c.k;
        let grad_w = Span::vector("grad_weights", dot.out, slots);
        let w = Span::vector(
            "weights",
            c.weights,
            if c.weights.is_null() { 0 } else { slots },
        );
        check_disjoint(&[grad_x, grad_w], &[x_span, w])?;
        Ok(RawPermuteBackward {
            combine,
            dot: Some(dot),
        })
    }
}

impl RawCombineBackward {
    /// Checks a combine backward against `ctx`: the permute it computes, the route's position,
    /// and the slot-dot of the weights' gradient, then what none of them checks.
    pub(crate) fn validate(ctx: &Context, call: CombineBackward<'_>) -> Result<Self> {
        check_pair(
            "expert_out",
            call.expert_out.is_some(),
            call.grad_weights.is_some(),
        )?;
        let (grad_y, k, position) = (call.grad_y, call.k, call.position);
        let permute = within(
            "grad_expert_out = permute(grad_y as x)",
            RawPermute::validate(
                ctx,
                Permute {
                    x: grad_y,
                    k,
                    perm: call.perm,
                    weights: call.weights,
                    out: call.grad_expert_out,
                },
            ),
        )?;
        vector_in(ctx, "position", &position)?;
        let p = &permute;
        let slots = check_position(p.n, k, position.len)?;
        let pos_span = Span::vector("position", position.ptr, slots);
        check_aligned(&[(pos_span, 4)])?;
        let grad_eo = Span::matrix("grad_expert_out", p.out, p.rows, p.h, p.out_stride, p.dtype)?;
        let (Some(expert_out), Some(out)) = (call.expert_out, call.grad_weights) else {
            check_disjoint(&[grad_eo], &[pos_span])?;
            return Ok(RawCombineBackward {
                permute,
                position: position.ptr,
                dot: None,
            });
        };
        let dot = within(
            "grad_weights = slot_dot(grad_y as tokens, expert_out as rows)",
            RawSlotDot::validate(
                ctx,
                SlotDot {
                    tokens: grad_y,
                    rows: expert_out,
                    k,
                    position,
                    out,
                },
            ),
        )?;
        if dot.rows != p.rows {
            bail!(
                Shape,
                "expert_out has {} rows but grad_expert_out and perm have {} (one per permuted row)",
                dot.rows,
                p.rows
            );
        }
        let eo = Span::matrix(
            "expert_out",
            dot.rows_in,
            dot.rows,
            dot.h,
            dot.rows_stride,
            dot.dtype,
        )?;
        let grad_w = Span::vector("grad_weights", dot.out, slots);
        let perm = Span::vector("perm", p.perm, p.rows);
        let w = Span::vector(
            "weights",
            p.weights,
            if p.weights.is_null() { 0 } else { slots },
        );
        check_disjoint(&[grad_eo, grad_w], &[pos_span, eo, perm, w])?;
        Ok(RawCombineBackward {
            permute,
            position: position.ptr,
            dot: Some(dot),
        })
    }
}
