//! Validation of fused linear divergence calls: everything that can be checked without touching
//! memory (locations, null pointers, dtypes, shapes, strides, 32-bit ranges, alignment,
//! overlaps), turning the public views into the raw struct the backends consume. On error
//! nothing has been written.
//!
//! Inputs may alias each other (the teacher weight is the student's in self-distillation); every
//! output must be disjoint from every input and from every other output.

use super::{FusedLinear, FusedLinearParams, RawFusedLinear};
use crate::checks::{check_disjoint, check_location, check_non_null, num_items_pointer, Footprint};
use crate::device::Context;
use crate::divergence::check_vocab;
use crate::error::{bail, Result};
use crate::tensor::{DType, Matrix, MatrixMut, Vector, VectorMut};

/// Largest N, V, H or Ht: the kernels and cuBLAS index with 32-bit integers.
const MAX_DIM: usize = i32::MAX as usize;

/// A half-open byte range `[start, end)` some operand spans.
#[derive(Debug, Clone, Copy)]
struct Span {
    what: &'static str,
    start: usize,
    end: usize,
}

impl Span {
    /// The bytes of `elems` elements of `elem_size` bytes at `ptr`; a Shape error on overflow or
    /// past `isize::MAX` bytes, which no allocation spans (such a stride would make the backends'
    /// offsets overflow).
    fn of(what: &'static str, ptr: *const u8, elems: usize, elem_size: usize) -> Result<Span> {
        let start = ptr as usize;
        let end = elems
            .checked_mul(elem_size)
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .and_then(|bytes| start.checked_add(bytes));
        match end {
            Some(end) => Ok(Span { what, start, end }),
            None => bail!(
                Shape,
                "{what} spans more bytes than the address space holds"
            ),
        }
    }

    fn matrix(
        what: &'static str,
        ptr: *const u8,
        rows: usize,
        cols: usize,
        stride: usize,
        dtype: DType,
    ) -> Result<Span> {
        let elems = if rows == 0 || cols == 0 {
            Some(0)
        } else {
            (rows - 1)
                .checked_mul(stride)
                .and_then(|e| e.checked_add(cols))
        };
        match elems {
            Some(elems) => Span::of(what, ptr, elems, dtype.size()),
            None => bail!(
                Shape,
                "{what} spans more elements than the address space holds"
            ),
        }
    }
}

impl Footprint for Span {
    fn what(&self) -> &str {
        self.what
    }

    fn overlaps(&self, other: &Span) -> bool {
        // An empty span (an operand of no rows) shares no byte with anything.
        self.start < self.end
            && other.start < other.end
            && self.start < other.end
            && other.start < self.end
    }
}

fn check_aligned(what: &str, ptr: *const u8, align: usize) -> Result<()> {
    if ptr as usize % align != 0 {
        bail!(
            InvalidArgument,
            "{what} pointer {:#x} is not aligned to its {align}-byte elements",
            ptr as usize
        );
    }
    Ok(())
}

fn check_dim(what: &str, x: usize) -> Result<()> {
    if x == 0 {
        bail!(Shape, "{what} is 0 (must be at least 1)");
    }
    if x > MAX_DIM {
        bail!(Shape, "{what} = {x} exceeds 2^31 - 1");
    }
    Ok(())
}

/// Location, null, stride and alignment checks of an input matrix (one of no rows may be null,
/// as an empty tensor's pointer is).
fn matrix_in(ctx: &Context, what: &str, m: &Matrix<'_>) -> Result<()> {
    check_location(ctx, what, m.location)?;
    if m.rows > 0 {
        check_non_null(what, m.ptr)?;
    }
    if m.row_stride < m.cols {
        bail!(
            Shape,
            "{what} row stride {} is smaller than its {} columns",
            m.row_stride,
            m.cols
        );
    }
    check_aligned(what, m.ptr, m.dtype.size())
}

/// Checks a gradient output `[rows, cols]` of the input dtype or f32; returns (ptr, dtype, stride).
fn grad_out(
    ctx: &Context,
    what: &str,
    m: &MatrixMut<'_>,
    rows: usize,
    cols: usize,
    input: DType,
) -> Result<(*mut u8, DType, usize)> {
    check_location(ctx, what, m.location)?;
    if rows > 0 {
        check_non_null(what, m.ptr)?;
    }
    if m.dtype != input && m.dtype != DType::F32 {
        let allowed = if input == DType::F32 {
            "must be f32, the input dtype".to_string()
        } else {
            format!("is neither the input dtype {} nor f32", input.name())
        };
        bail!(
            UnsupportedDtype,
            "{what} dtype {} {allowed}",
            m.dtype.name()
        );
    }
    if m.rows != rows || m.cols != cols {
        bail!(
            Shape,
            "{what} is {} x {}, {rows} x {cols} expected",
            m.rows,
            m.cols
        );
    }
    if m.row_stride < cols {
        bail!(
            Shape,
            "{what} row stride {} is smaller than its {cols} columns",
            m.row_stride
        );
    }
    check_aligned(what, m.ptr, m.dtype.size())?;
    Ok((m.ptr, m.dtype, m.row_stride))
}

fn vector_in<T>(ctx: &Context, what: &str, v: &Vector<'_, T>, len: usize) -> Result<()> {
    check_location(ctx, what, v.location)?;
    if len > 0 {
        check_non_null(what, v.ptr)?;
    }
    if v.len != len {
        bail!(Shape, "{what} has {} entries, {len} expected", v.len);
    }
    check_aligned(what, v.ptr.cast(), std::mem::size_of::<T>())
}

fn vector_out<T>(ctx: &Context, what: &str, v: &VectorMut<'_, T>, len: usize) -> Result<()> {
    check_location(ctx, what, v.location)?;
    if len > 0 {
        check_non_null(what, v.ptr)?;
    }
    if v.len != len {
        bail!(Shape, "{what} has {} entries, {len} expected", v.len);
    }
    check_aligned(what, v.ptr.cast_const().cast(), std::mem::size_of::<T>())
}

impl RawFusedLinear {
    /// Shapes, pointers, dtypes, locations, alignment and overlaps, without the parameter
    /// checks.
    pub(crate) fn describe(ctx: &Context, call: &FusedLinear<'_>) -> Result<Self> {
        let (sh, sw, th, tw) = (
            &call.student_hidden,
            &call.student_weight,
            &call.teacher_hidden,
            &call.teacher_weight,
        );
        matrix_in(ctx, "student hidden", sh)?;
        matrix_in(ctx, "student weight", sw)?;
        matrix_in(ctx, "teacher hidden", th)?;
        matrix_in(ctx, "teacher weight", tw)?;
        let dtype = sh.dtype;
        for (what, m) in [
            ("student weight", sw),
            ("teacher hidden", th),
            ("teacher weight", tw),
        ] {
            if m.dtype != dtype {
                bail!(
                    UnsupportedDtype,
                    "{what} dtype {} differs from the student hidden dtype {} (all four inputs share one dtype)",
                    m.dtype.name(),
                    dtype.name()
                );
            }
        }
        let (n, h, v, ht) = (sh.rows, sh.cols, sw.rows, th.cols);
        // N = 0 is an empty batch (a zero loss); the other sizes must be at least 1.
        if n > MAX_DIM {
            bail!(Shape, "N (student hidden rows) = {n} exceeds 2^31 - 1");
        }
        check_dim("H (student hidden size)", h)?;
        check_dim("V (student weight rows)", v)?;
        check_vocab("V (student weight rows)", v)?;
        check_dim("Ht (teacher hidden size)", ht)?;
        if sw.cols != h {
            bail!(
                Shape,
                "student weight is {} x {} but the student hidden size is H = {h}",
                sw.rows,
                sw.cols
            );
        }
        if th.rows != n {
            bail!(
                Shape,
                "teacher hidden has {} rows but the student hidden has N = {n}",
                th.rows
            );
        }
        if tw.rows != v || tw.cols != ht {
            bail!(
                Shape,
                "teacher weight is {} x {}, {v} x {ht} expected (V = student weight rows, Ht = teacher hidden size)",
                tw.rows,
                tw.cols
            );
        }
        let mut inputs = vec![
            Span::matrix("student hidden", sh.ptr, n, h, sh.row_stride, dtype)?,
            Span::matrix("student weight", sw.ptr, v, h, sw.row_stride, dtype)?,
            Span::matrix("teacher hidden", th.ptr, n, ht, th.row_stride, dtype)?,
            Span::matrix("teacher weight", tw.ptr, v, ht, tw.row_stride, dtype)?,
        ];
        let mut outputs = Vec::new();
        let mut labels = std::ptr::null();
        if let Some(l) = &call.labels {
            vector_in(ctx, "labels", l, n)?;
            inputs.push(Span::of("labels", l.ptr.cast(), n, 8)?);
            labels = l.ptr;
        }
        let num_items = num_items_pointer(ctx, call.num_items.as_ref())?;
        if !num_items.is_null() {
            inputs.push(Span::of("num_items", num_items.cast(), 1, 4)?);
        }
        let mut per_token = std::ptr::null_mut();
        if let Some(p) = &call.per_token {
            vector_out(ctx, "per-token loss", p, n)?;
            outputs.push(Span::of("per-token loss", p.ptr.cast_const().cast(), n, 4)?);
            per_token = p.ptr;
        }
        let mut loss = std::ptr::null_mut();
        if let Some(l) = &call.loss {
            vector_out(ctx, "loss", l, 1)?;
            outputs.push(Span::of("loss", l.ptr.cast_const().cast(), 1, 4)?);
            loss = l.ptr;
        }
        let (mut grad_hidden, mut grad_hidden_dtype, mut grad_hidden_stride) =
            (std::ptr::null_mut(), dtype, 0);
        if let Some(g) = &call.grad_hidden {
            (grad_hidden, grad_hidden_dtype, grad_hidden_stride) =
                grad_out(ctx, "grad_hidden", g, n, h, dtype)?;
            outputs.push(Span::matrix(
                "grad_hidden",
                grad_hidden,
                n,
                h,
                grad_hidden_stride,
                grad_hidden_dtype,
            )?);
        }
        let (mut grad_weight, mut grad_weight_dtype, mut grad_weight_stride) =
            (std::ptr::null_mut(), dtype, 0);
        if let Some(g) = &call.grad_weight {
            (grad_weight, grad_weight_dtype, grad_weight_stride) =
                grad_out(ctx, "grad_weight", g, v, h, dtype)?;
            outputs.push(Span::matrix(
                "grad_weight",
                grad_weight,
                v,
                h,
                grad_weight_stride,
                grad_weight_dtype,
            )?);
        }
        check_disjoint(&outputs, &inputs)?;
        Ok(RawFusedLinear {
            n,
            v,
            h,
            ht,
            dtype,
            student_hidden: sh.ptr,
            student_hidden_stride: sh.row_stride,
            student_weight: sw.ptr,
            student_weight_stride: sw.row_stride,
            teacher_hidden: th.ptr,
            teacher_hidden_stride: th.row_stride,
            teacher_weight: tw.ptr,
            teacher_weight_stride: tw.row_stride,
            labels,
            loss,
            per_token,
            grad_hidden,
            grad_hidden_dtype,
            grad_hidden_stride,
            grad_weight,
            grad_weight_dtype,
            grad_weight_stride,
            num_items,
        })
    }

    /// Everything checked: the parameters, then [`RawFusedLinear::describe`]. On error nothing
    /// has been written.
    pub(crate) fn validate(
        ctx: &Context,
        call: &FusedLinear<'_>,
        params: &FusedLinearParams,
    ) -> Result<Self> {
        params.validate()?;
        params
            .divergence
            .check_num_items_in_memory(call.num_items.is_some())?;
        RawFusedLinear::describe(ctx, call)
    }
}
