//! Token-level divergence between student and teacher logits: forward KL, reverse KL and
//! generalized JSD, with temperature, ignored rows, reductions and the gradient w.r.t. the
//! student logits — on the CPU (f64 reference) or on CUDA (fused kernels).
//!
//! With `p = softmax(t / T)` (teacher) and `q = softmax(s / T)` (student) over a row:
//! - forward KL `= Σ p (log p − log q)`, reverse KL `= Σ q (log q − log p)`;
//! - `jsd(β) = β KL(p ‖ m) + (1 − β) KL(q ‖ m)`, `m = β p + (1 − β) q`, with `β = 0` defined as
//!   forward KL and `β = 1` as reverse KL (TRL's `generalized_jsd_loss`, Liger's `LigerJSD`).
//!
//! Edge cases: `−inf` logits are masked entries and contribute 0 (never NaN); a row whose
//! student or teacher logits are all `−inf` has loss 0 and gradient 0; a row whose label equals
//! `ignore_index` has loss 0 and gradient 0 and is not counted by `batchmean`; NaN (or `+inf`)
//! in a row makes that row's loss and gradient NaN and leaves other rows alone (the reduced loss
//! is then NaN). Where the two sides mask different entries the divergence can be infinite:
//! forward KL is `+inf` where the teacher has mass on an entry the student masks (its gradient
//! stays finite), reverse KL where the student has mass on an entry the teacher masks (its
//! gradient row is then non-finite). Pointers must be aligned to their element size.

pub(crate) mod cluster;
pub(crate) mod cpu;
pub(crate) mod cuda;
mod params;

pub use cluster::fallback_reason as cluster_fallback_reason;
pub use cluster::launch_shapes as cluster_launch_shapes;
#[doc(hidden)]
pub use cuda::kind_tag as kernel_kind_tag;
pub use params::{Kind, Params, Reduction};

/// The largest vocabulary (row length V) the divergence and the fused linear divergence take:
/// 2^31 − 2^16, so the kernels' 32-bit in-row indices keep a margin for their strides (a
/// block's step, a cluster's slices) without wrapping.
pub const MAX_VOCAB: usize = (1 << 31) - (1 << 16);

/// Refuses a vocabulary past [`MAX_VOCAB`]; `what` names it in the message (the divergence's V,
/// the fused operation's weight rows).
pub(crate) fn check_vocab(what: &str, v: usize) -> Result<()> {
    if v > MAX_VOCAB {
        bail!(
            Shape,
            "{what} = {v} exceeds MAX_VOCAB = 2^31 - 2^16 = {MAX_VOCAB}"
        );
    }
    Ok(())
}

use crate::checks::{check_location, num_items_pointer, Footprint, Region};
use crate::device::{Backend, Context, Launch};
use crate::empty_batch::Fill;
use crate::error::{bail, Result};
use crate::tensor::{span_bytes, DType, Matrix, MatrixMut, Vector, VectorMut};

/// Inputs and outputs of one divergence call with the gradient in a separate buffer (or none).
#[derive(Debug)]
pub struct Divergence<'a> {
    /// Student logits `[N, V]`.
    pub student: Matrix<'a>,
    /// Teacher logits `[N, V]` (dtype may differ from the student's).
    pub teacher: Matrix<'a>,
    /// Optional labels `[N]`; rows whose label equals `ignore_index` are skipped.
    pub labels: Option<Vector<'a, i64>>,
    /// Optional per-row loss output `[N]` (f32): each row's divergence before the reduction
    /// scales it (under `batchmean` the loss is their sum over the valid rows or `num_items`,
    /// so `Σ per_token ≠ loss` there); 0 for ignored rows.
    pub per_token: Option<VectorMut<'a, f32>>,
    /// Optional reduced loss output (one f32).
    pub loss: Option<VectorMut<'a, f32>>,
    /// Optional gradient of the reduced loss w.r.t. the student logits, `[N, V]` in the
    /// student's dtype. `None` computes the forward pass only. To write it over the student
    /// logits, call [`Context::divergence_in_place`] with a [`DivergenceInPlace`] (a separate
    /// view over the same memory here would break the views' no-aliasing contract).
    pub grad: Option<MatrixMut<'a>>,
    /// Optional `batchmean` divisor in memory: one f32 at the context's location, read when the
    /// call runs (on CUDA by a kernel on the stream, so a token count the trainer computed on
    /// the device needs no host synchronisation). It replaces [`Params::num_items`] (giving
    /// both is an error) and needs `reduction = batchmean`. A value that is not finite and at
    /// least `f32::MIN_POSITIVE` (2^-126; a subnormal's reciprocal overflows) gives the sum
    /// (divisor 1), since no error could be reported without a synchronisation.
    pub num_items: Option<Vector<'a, f32>>,
}

/// Inputs and outputs of one divergence call that overwrites the student logits with the gradient.
#[derive(Debug)]
pub struct DivergenceInPlace<'a> {
    /// Student logits `[N, V]`, replaced by the gradient.
    pub student: MatrixMut<'a>,
    /// Teacher logits `[N, V]`.
    pub teacher: Matrix<'a>,
    /// Optional labels `[N]`.
    pub labels: Option<Vector<'a, i64>>,
    /// Optional per-row loss output `[N]` (f32): each row's divergence before the reduction
    /// scales it (under `batchmean` the loss is their sum over the valid rows or `num_items`,
    /// so `Σ per_token ≠ loss` there); 0 for ignored rows.
    pub per_token: Option<VectorMut<'a, f32>>,
    /// Optional reduced loss output (one f32).
    pub loss: Option<VectorMut<'a, f32>>,
    /// Optional `batchmean` divisor in memory, as [`Divergence::num_items`].
    pub num_items: Option<Vector<'a, f32>>,
}

impl<'a> Divergence<'a> {
    /// A call over these logits with every optional operand absent (no labels, no outputs, no
    /// `num_items`): set the ones wanted with struct update syntax,
    /// `Divergence { loss: Some(..), grad: Some(..), ..Divergence::new(student, teacher) }`, which
    /// keeps compiling when an optional field is added.
    pub fn new(student: Matrix<'a>, teacher: Matrix<'a>) -> Self {
        Divergence {
            student,
            teacher,
            labels: None,
            per_token: None,
            loss: None,
            grad: None,
            num_items: None,
        }
    }
}

impl<'a> DivergenceInPlace<'a> {
    /// A call over these logits with every optional operand absent, as [`Divergence::new`].
    pub fn new(student: MatrixMut<'a>, teacher: Matrix<'a>) -> Self {
        DivergenceInPlace {
            student,
            teacher,
            labels: None,
            per_token: None,
            loss: None,
            num_items: None,
        }
    }
}

/// A validated call in raw pointers, what the backends consume.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawDivergence {
    pub n: usize,
    pub v: usize,
    pub student: *const u8,
    pub student_dtype: DType,
    pub student_stride: usize,
    pub teacher: *const u8,
    pub teacher_dtype: DType,
    pub teacher_stride: usize,
    /// Null for forward-only. Same dtype as the student.
    pub grad: *mut u8,
    pub grad_stride: usize,
    /// Null when absent.
    pub labels: *const i64,
    /// Null when absent.
    pub per_token: *mut f32,
    /// Null when absent.
    pub loss: *mut f32,
    /// Null when absent: batchmean's divisor in memory (one f32).
    pub num_items: *const f32,
}

/// The address range a matrix spans, or a shape error where it overflows the address space.
fn byte_range(
    what: &str,
    ptr: *const u8,
    rows: usize,
    cols: usize,
    stride: usize,
    dtype: DType,
) -> Result<(usize, usize)> {
    let start = ptr as usize;
    let bytes = span_bytes(what, rows, cols, stride, dtype.size())?;
    match start.checked_add(bytes) {
        Some(end) => Ok((start, end)),
        None => bail!(
            Shape,
            "{what}: the matrix runs past the end of the address space"
        ),
    }
}

impl RawDivergence {
    /// Checks everything that can be checked without touching memory; on error nothing is written.
    fn validate(&self, in_place: bool) -> Result<()> {
        // An empty batch (N = 0) has no rows to read: its operands may be null, as an empty
        // tensor's pointer is.
        if self.student.is_null() && self.n > 0 {
            bail!(NullPointer, "student logits pointer is null");
        }
        if self.teacher.is_null() && self.n > 0 {
            bail!(NullPointer, "teacher logits pointer is null");
        }
        if self.v == 0 {
            bail!(
                Shape,
                "empty rows: V = 0 (the vocabulary must hold at least 1 entry)"
            );
        }
        if self.n > i32::MAX as usize {
            bail!(Shape, "N = {} exceeds 2^31 - 1", self.n);
        }
        check_vocab("V", self.v)?;
        if self.student_stride < self.v {
            bail!(
                Shape,
                "student row stride {} is smaller than V = {}",
                self.student_stride,
                self.v
            );
        }
        if self.teacher_stride < self.v {
            bail!(
                Shape,
                "teacher row stride {} is smaller than V = {}",
                self.teacher_stride,
                self.v
            );
        }
        let misaligned = [
            (
                "student logits",
                self.student as usize,
                self.student_dtype.size(),
            ),
            (
                "teacher logits",
                self.teacher as usize,
                self.teacher_dtype.size(),
            ),
            ("gradient", self.grad as usize, self.student_dtype.size()),
            ("labels", self.labels as usize, 8),
            ("per-token loss", self.per_token as usize, 4),
            ("loss", self.loss as usize, 4),
        ]
        .into_iter()
        .find(|(_, addr, align)| addr % align != 0);
        if let Some((what, addr, align)) = misaligned {
            bail!(
                InvalidArgument,
                "{what} pointer {addr:#x} is not aligned to its {align}-byte elements"
            );
        }
        // Neither matrix may run past the end of the address space.
        byte_range(
            "student logits",
            self.student,
            self.n,
            self.v,
            self.student_stride,
            self.student_dtype,
        )?;
        byte_range(
            "teacher logits",
            self.teacher,
            self.n,
            self.v,
            self.teacher_stride,
            self.teacher_dtype,
        )?;
        // Exact for strided rows of one stride: disjoint row views of one buffer (student and
        // teacher interleaved, [N, 2V] halves) may take the gradient in place.
        let (n, v) = (self.n, self.v);
        let student_region = Region::matrix(
            "student logits",
            self.student,
            (n, v, self.student_stride),
            self.student_dtype.size(),
        );
        let teacher_region = Region::matrix(
            "teacher logits",
            self.teacher,
            (n, v, self.teacher_stride),
            self.teacher_dtype.size(),
        );
        let mut outputs = vec![
            Region::bytes("per-token loss output", self.per_token.cast(), 4 * n),
            Region::bytes("loss output", self.loss.cast(), 4),
        ];
        if !self.grad.is_null() {
            if self.grad_stride < self.v {
                bail!(
                    Shape,
                    "gradient row stride {} is smaller than V = {}",
                    self.grad_stride,
                    self.v
                );
            }
            byte_range(
                "gradient",
                self.grad,
                self.n,
                self.v,
                self.grad_stride,
                self.student_dtype,
            )?;
            let same_as_student =
                std::ptr::eq(self.grad, self.student) && self.grad_stride == self.student_stride;
            let what = if in_place || same_as_student {
                "gradient written over the student logits"
            } else {
                "gradient output"
            };
            let grad = Region::matrix(
                what,
                self.grad,
                (n, v, self.grad_stride),
                self.student_dtype.size(),
            );
            if in_place || same_as_student {
                // The student's own memory (in place, or the same buffer and layout through the
                // separate-buffer entry of the C ABI): only the other operands must stay clear.
            } else if grad.overlaps(&student_region) {
                bail!(Shape, "gradient buffer partly overlaps the student logits (in place needs the same pointer and stride)");
            }
            outputs.push(grad);
        }
        let inputs = [
            teacher_region,
            Region::bytes("labels", self.labels.cast(), 8 * n),
            Region::bytes("num_items", self.num_items.cast(), 4),
        ];
        for (i, out) in outputs.iter().enumerate() {
            let what = out.what();
            if let Some(input) = inputs.iter().find(|r| out.overlaps(r)) {
                bail!(Shape, "{what} overlaps the {}", input.what());
            }
            if !what.starts_with("gradient") && out.overlaps(&student_region) {
                bail!(Shape, "{what} overlaps the student logits");
            }
            if let Some(other) = outputs[i + 1..].iter().find(|r| out.overlaps(r)) {
                bail!(Shape, "{what} overlaps the {}", other.what());
            }
        }
        Ok(())
    }
}

struct Optionals<'a, 'b> {
    labels: &'b Option<Vector<'a, i64>>,
    per_token: &'b Option<VectorMut<'a, f32>>,
    loss: &'b Option<VectorMut<'a, f32>>,
    num_items: &'b Option<Vector<'a, f32>>,
}

/// The raw pointers of the optional vectors: labels, per-token loss, loss, num_items.
type RawOptionals = (*const i64, *mut f32, *mut f32, *const f32);

/// Checks the optional vectors against `n`, the context and (`num_items` in memory) the
/// parameters, returning their raw pointers.
fn raw_optionals(
    ctx: &Context,
    n: usize,
    params: &Params,
    o: Optionals<'_, '_>,
) -> Result<RawOptionals> {
    let mut labels = std::ptr::null();
    if let Some(l) = o.labels {
        check_location(ctx, "labels", l.location)?;
        if l.ptr.is_null() && n > 0 {
            bail!(NullPointer, "labels pointer is null");
        }
        if l.len != n {
            bail!(Shape, "labels have {} entries for N = {n} rows", l.len);
        }
        labels = l.ptr;
    }
    let mut per_token = std::ptr::null_mut();
    if let Some(p) = o.per_token {
        check_location(ctx, "per-token loss", p.location)?;
        if p.ptr.is_null() && n > 0 {
            bail!(NullPointer, "per-token loss pointer is null");
        }
        if p.len != n {
            bail!(
                Shape,
                "per-token loss has {} entries for N = {n} rows",
                p.len
            );
        }
        per_token = p.ptr;
    }
    let mut loss = std::ptr::null_mut();
    if let Some(l) = o.loss {
        check_location(ctx, "loss", l.location)?;
        if l.ptr.is_null() {
            bail!(NullPointer, "loss pointer is null");
        }
        if l.len != 1 {
            bail!(
                Shape,
                "loss output must hold exactly 1 element, it has {}",
                l.len
            );
        }
        loss = l.ptr;
    }
    params.check_num_items_in_memory(o.num_items.is_some())?;
    let num_items = num_items_pointer(ctx, o.num_items.as_ref())?;
    Ok((labels, per_token, loss, num_items))
}

fn check_pair(ctx: &Context, student: &Matrix<'_>, teacher: &Matrix<'_>) -> Result<()> {
    check_location(ctx, "student logits", student.location)?;
    check_location(ctx, "teacher logits", teacher.location)?;
    if student.rows != teacher.rows || student.cols != teacher.cols {
        bail!(
            Shape,
            "student logits are {} x {} but teacher logits are {} x {}",
            student.rows,
            student.cols,
            teacher.rows,
            teacher.cols
        );
    }
    Ok(())
}

impl Context {
    /// Bytes of device workspace a divergence over `n` rows needs (0 on the CPU). Pass at least
    /// this much through [`Launch::with_workspace`], or none to let the library allocate on the stream.
    /// A size, not a check: the call validates its operands.
    pub fn divergence_workspace_size(&self, n: usize) -> usize {
        match self.backend() {
            Backend::Cpu => 0,
            Backend::Cuda(_) => cuda::workspace_size(n),
        }
    }

    /// Runs the divergence: writes the requested outputs (loss, per-token loss, gradient).
    ///
    /// N = 0 rows is an empty batch: the loss is written as 0 and nothing else exists to write
    /// (the views of no rows may have null pointers); V must be at least 1.
    ///
    /// Stream-ordered on CUDA: returns once the work is queued on `launch.stream`, without
    /// synchronising. On error nothing has been written.
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn divergence(
        &self,
        call: Divergence<'_>,
        params: &Params,
        launch: &Launch<'_>,
    ) -> Result<()> {
        params.validate()?;
        check_pair(self, &call.student, &call.teacher)?;
        let (mut grad, mut grad_stride) = (std::ptr::null_mut(), 0);
        if let Some(g) = &call.grad {
            check_location(self, "gradient", g.location)?;
            if g.ptr.is_null() && g.rows > 0 {
                bail!(NullPointer, "gradient pointer is null");
            }
            if g.dtype != call.student.dtype {
                bail!(
                    UnsupportedDtype,
                    "gradient dtype {} differs from the student dtype {}",
                    g.dtype.name(),
                    call.student.dtype.name()
                );
            }
            if g.rows != call.student.rows || g.cols != call.student.cols {
                bail!(
                    Shape,
                    "gradient is {} x {} but the logits are {} x {}",
                    g.rows,
                    g.cols,
                    call.student.rows,
                    call.student.cols
                );
            }
            grad = g.ptr;
            grad_stride = g.row_stride;
        }
        let n = call.student.rows;
        let (labels, per_token, loss, num_items) = raw_optionals(
            self,
            n,
            params,
            Optionals {
                labels: &call.labels,
                per_token: &call.per_token,
                loss: &call.loss,
                num_items: &call.num_items,
            },
        )?;
        let raw = RawDivergence {
            n,
            v: call.student.cols,
            student: call.student.ptr,
            student_dtype: call.student.dtype,
            student_stride: call.student.row_stride,
            teacher: call.teacher.ptr,
            teacher_dtype: call.teacher.dtype,
            teacher_stride: call.teacher.row_stride,
            grad,
            grad_stride,
            labels,
            per_token,
            loss,
            num_items,
        };
        raw.validate(false)?;
        self.run_divergence(&raw, params, launch)
    }

    /// Runs the divergence and overwrites the student logits with the gradient.
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn divergence_in_place(
        &self,
        call: DivergenceInPlace<'_>,
        params: &Params,
        launch: &Launch<'_>,
    ) -> Result<()> {
        params.validate()?;
        let student = call.student.as_matrix();
        check_pair(self, &student, &call.teacher)?;
        let n = student.rows;
        let (labels, per_token, loss, num_items) = raw_optionals(
            self,
            n,
            params,
            Optionals {
                labels: &call.labels,
                per_token: &call.per_token,
                loss: &call.loss,
                num_items: &call.num_items,
            },
        )?;
        let raw = RawDivergence {
            n,
            v: student.cols,
            student: student.ptr,
            student_dtype: student.dtype,
            student_stride: student.row_stride,
            teacher: call.teacher.ptr,
            teacher_dtype: call.teacher.dtype,
            teacher_stride: call.teacher.row_stride,
            grad: call.student.ptr,
            grad_stride: student.row_stride,
            labels,
            per_token,
            loss,
            num_items,
        };
        raw.validate(true)?;
        self.run_divergence(&raw, params, launch)
    }

    fn run_divergence(
        &self,
        raw: &RawDivergence,
        params: &Params,
        launch: &Launch<'_>,
    ) -> Result<()> {
        if raw.n == 0 {
            // An empty batch: the reduced loss of no rows is 0; nothing else exists to write.
            let operands = [
                ("student logits", raw.student.cast()),
                ("teacher logits", raw.teacher.cast()),
                ("gradient", raw.grad.cast_const().cast()),
                ("labels", raw.labels.cast()),
                ("per-token loss", raw.per_token.cast_const().cast()),
                ("num_items", raw.num_items.cast()),
            ];
            let loss = Fill::bytes("loss", raw.loss.cast(), 4, 0);
            // SAFETY: the loss is null or a validated f32 at this context's location.
            return unsafe { self.write_empty_outputs(&operands, &[loss], launch) };
        }
        match self.backend() {
            Backend::Cpu => {
                // SAFETY: every pointer was checked non-null (or is an absent optional), in host
                // memory, and spans the validated shape by the views' construction contracts.
                unsafe { cpu::divergence(raw, params) }
            }
            Backend::Cuda(dev) => cuda::divergence(dev, raw, params, launch),
        }
    }
}
