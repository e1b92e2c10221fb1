//! Fused linear divergence: the token-level divergence of [`crate::divergence`] computed from
//! hidden states and lm_head weights, chunk by chunk, so the `[N, V]` logits never exist whole.
//!
//! Per chunk of rows: student and teacher logits by matrix products (`hidden @ weightᵀ`), times
//! `logit_scale`, soft-capped (`c · tanh(z / c)`) when `softcap` is set; the divergence and its
//! gradient w.r.t. the (capped) student logits; the chain rule through the cap and the scale;
//! then `grad_hidden[chunk] = G @ W` and `grad_weight += Gᵀ @ hidden[chunk]`. The reduction's
//! divisor (batchmean over valid rows, or `num_items`) is taken over all N rows, so the result
//! does not depend on the chunk size.
//!
//! Memory: on CUDA the extra device memory is O(chunk × V) (the chunk's logits). The CPU backend
//! is the f64 reference for small shapes: it widens the four inputs and the weight gradient to
//! f64 whatever the chunk, O((N + V) · H) extra host memory; where the host refuses it the call
//! fails with [`ErrorKind::OutOfMemory`](crate::ErrorKind::OutOfMemory), nothing written.

pub(crate) mod cpu;
pub(crate) mod cuda;
mod params;
mod validate;

pub use params::FusedLinearParams;

use crate::device::{Backend, Context, Launch};
use crate::empty_batch::Fill;
use crate::error::Result;
use crate::tensor::{DType, Matrix, MatrixMut, Vector, VectorMut};

/// Operands and outputs of [`Context::fused_linear_divergence`].
#[derive(Debug)]
pub struct FusedLinear<'a> {
    /// Student hidden states `[N, H]` (bf16, f16 or f32; all four inputs share one dtype).
    pub student_hidden: Matrix<'a>,
    /// Student lm_head weight `[V, H]`.
    pub student_weight: Matrix<'a>,
    /// Teacher hidden states `[N, Ht]`.
    pub teacher_hidden: Matrix<'a>,
    /// Teacher lm_head weight `[V, Ht]` (may be the student's, in self-distillation).
    pub teacher_weight: Matrix<'a>,
    /// Optional labels `[N]`; rows equal to `ignore_index` are skipped.
    pub labels: Option<Vector<'a, i64>>,
    /// Optional per-row loss `[N]` (f32), before the reduction's scale (0 for ignored rows).
    pub per_token: Option<VectorMut<'a, f32>>,
    /// Optional reduced loss (one f32).
    pub loss: Option<VectorMut<'a, f32>>,
    /// Optional `[N, H]` gradient w.r.t. the student hidden states (input dtype or f32).
    pub grad_hidden: Option<MatrixMut<'a>>,
    /// Optional `[V, H]` gradient w.r.t. the student weight (input dtype or f32).
    pub grad_weight: Option<MatrixMut<'a>>,
    /// Optional `batchmean` divisor in memory (one f32 at the context's location), read when
    /// the call runs, as [`Divergence::num_items`](crate::divergence::Divergence::num_items):
    /// it replaces the parameters' `num_items` (giving both is an error), needs `batchmean`, and
    /// a value that is not finite and at least 2^-126 gives the sum.
    pub num_items: Option<Vector<'a, f32>>,
}

impl<'a> FusedLinear<'a> {
    /// A call over these four inputs with every optional operand absent (no labels, no outputs,
    /// no `num_items`): set the ones wanted with struct update syntax,
    /// `FusedLinear { loss: Some(..), ..FusedLinear::new(sh, sw, th, tw) }`, which keeps
    /// compiling when an optional field is added.
    pub fn new(
        student_hidden: Matrix<'a>,
        student_weight: Matrix<'a>,
        teacher_hidden: Matrix<'a>,
        teacher_weight: Matrix<'a>,
    ) -> Self {
        FusedLinear {
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels: None,
            per_token: None,
            loss: None,
            grad_hidden: None,
            grad_weight: None,
            num_items: None,
        }
    }
}

/// Operands of [`Context::fused_linear_reference_gemms`]: the four matrix products a fused
/// linear divergence call of these shapes performs, at full N, alone (self-distillation shapes:
/// the teacher product reuses `hidden` and `weight`).
#[doc(hidden)]
#[derive(Debug)]
pub struct ReferenceGemms<'a> {
    /// `[N, H]`, bf16 or f16.
    pub hidden: Matrix<'a>,
    /// `[V, H]`, the dtype of `hidden`.
    pub weight: Matrix<'a>,
    /// `[N, V]` f32 (as the operation) or the dtype of `hidden`: receives `hidden · weightᵀ`
    /// twice (student, then teacher logits).
    pub logits: MatrixMut<'a>,
    /// `[N, V]` in the dtype of `hidden`: the logits' gradient the last two products read.
    pub grad_logits: Matrix<'a>,
    /// `[N, H]` in the dtype of `hidden`: `grad_logits · weight`.
    pub grad_hidden: MatrixMut<'a>,
    /// `[V, H]` in the dtype of `hidden`: `grad_logitsᵀ · hidden`.
    pub grad_weight: MatrixMut<'a>,
}

/// A validated call in raw pointers, what the backends consume.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawFusedLinear {
    pub n: usize,
    pub v: usize,
    pub h: usize,
    pub ht: usize,
    pub dtype: DType,
    pub student_hidden: *const u8,
    pub student_hidden_stride: usize,
    pub student_weight: *const u8,
    pub student_weight_stride: usize,
    pub teacher_hidden: *const u8,
    pub teacher_hidden_stride: usize,
    pub teacher_weight: *const u8,
    pub teacher_weight_stride: usize,
    /// Null when absent.
    pub labels: *const i64,
    /// Null when absent.
    pub loss: *mut f32,
    /// Null when absent.
    pub per_token: *mut f32,
    /// Null when absent.
    pub grad_hidden: *mut u8,
    pub grad_hidden_dtype: DType,
    pub grad_hidden_stride: usize,
    /// Null when absent.
    pub grad_weight: *mut u8,
    pub grad_weight_dtype: DType,
    pub grad_weight_stride: usize,
    /// Null when absent: batchmean's divisor in memory (one f32).
    pub num_items: *const f32,
}

impl Context {
    /// Bytes of device workspace the call needs with these parameters (0 on the CPU).
    ///
    /// # Errors
    /// What the call itself would refuse in its shapes or parameters (the size of a call that
    /// cannot run is meaningless).
    pub fn fused_linear_workspace_size(
        &self,
        call: &FusedLinear<'_>,
        params: &FusedLinearParams,
    ) -> Result<usize> {
        let raw = RawFusedLinear::validate(self, call, params)?;
        Ok(match self.backend() {
            Backend::Cpu => 0,
            Backend::Cuda(_) => cuda::workspace_size(&raw, params)?,
        })
    }

    /// The floor a fused linear divergence is measured against (`dk bench`): its four matrix
    /// products alone, with the settings the operation uses (cuBLAS `GemmEx`, f32 accumulation,
    /// f32 logits), or with logits in the operands' dtype (what `torch.matmul` gives: the
    /// baseline ANCHORS.md timed). CUDA only; stream-ordered. Not a user operation: hidden from
    /// the docs.
    #[doc(hidden)]
    pub fn fused_linear_reference_gemms(
        &self,
        g: &ReferenceGemms<'_>,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let (n, h, v) = (g.hidden.rows(), g.hidden.cols(), g.weight.rows());
        let dt = g.hidden.dtype();
        let shapes_ok = g.weight.cols() == h
            && (g.logits.rows(), g.logits.cols()) == (n, v)
            && (g.grad_logits.rows(), g.grad_logits.cols()) == (n, v)
            && (g.grad_hidden.rows(), g.grad_hidden.cols()) == (n, h)
            && (g.grad_weight.rows(), g.grad_weight.cols()) == (v, h);
        if !shapes_ok {
            crate::error::bail!(
                Shape,
                "reference GEMMs: operand shapes do not fit [N, H] · [V, H]"
            );
        }
        let dtypes_ok = dt != DType::F32
            && (g.logits.dtype() == DType::F32 || g.logits.dtype() == dt)
            && [
                g.weight.dtype(),
                g.grad_logits.dtype(),
                g.grad_hidden.dtype(),
                g.grad_weight.dtype(),
            ]
            .iter()
            .all(|&d| d == dt);
        if !dtypes_ok {
            crate::error::bail!(
                UnsupportedDtype,
                "reference GEMMs: bf16 or f16 operands, f32 logits or the operands' dtype"
            );
        }
        match self.backend() {
            Backend::Cpu => crate::error::bail!(NoDevice, "reference GEMMs run on CUDA only"),
            Backend::Cuda(dev) => cuda::reference_gemms(dev, g, launch),
        }
    }

    /// Runs the fused linear divergence. Stream-ordered on CUDA; on error nothing is written.
    ///
    /// Self-distillation (the teacher shares the lm_head), JSD, gradients for the student's
    /// hidden states and the weight; `examples/fused_linear.rs` is the longer version.
    ///
    /// ```
    /// use distill_kernels::divergence::{Kind, Params};
    /// use distill_kernels::fused::{FusedLinear, FusedLinearParams};
    /// use distill_kernels::{Context, Launch, Matrix, MatrixMut, VectorMut};
    ///
    /// let (n, h, v) = (6, 16, 100);
    /// let hidden: Vec<f32> = (0..n * h).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let teacher: Vec<f32> = hidden.iter().map(|x| x * 0.9 + 0.05).collect();
    /// let weight: Vec<f32> = (0..v * h).map(|i| (i as f32 * 0.11).cos() * 0.3).collect();
    /// let (mut loss, mut gh, mut gw) = ([0f32], vec![0f32; n * h], vec![0f32; v * h]);
    /// Context::cpu().fused_linear_divergence(
    ///     FusedLinear {
    ///         loss: Some(VectorMut::host(&mut loss)),
    ///         grad_hidden: Some(MatrixMut::host(&mut gh, n, h, h)?),
    ///         grad_weight: Some(MatrixMut::host(&mut gw, v, h, h)?),
    ///         ..FusedLinear::new(
    ///             Matrix::host(&hidden, n, h, h)?,
    ///             Matrix::host(&weight, v, h, h)?,
    ///             Matrix::host(&teacher, n, h, h)?,
    ///             Matrix::host(&weight, v, h, h)?,
    ///         )
    ///     },
    ///     &FusedLinearParams {
    ///         divergence: Params { beta: 0.5, ..Params::new(Kind::Jsd) },
    ///         chunk_rows: Some(4), // 6 rows: a chunk of 4 and one of 2
    ///         ..FusedLinearParams::default()
    ///     },
    ///     &Launch::default(),
    /// )?;
    /// assert!(loss[0] > 0.0 && gh.iter().any(|&g| g != 0.0) && gw.iter().any(|&g| g != 0.0));
    /// # Ok::<(), distill_kernels::Error>(())
    /// ```
    ///
    /// N = 0 rows is an empty batch: the loss is 0, and so is the weight gradient (left as it
    /// is when accumulating); the hidden-state views of no rows may have null pointers.
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn fused_linear_divergence(
        &self,
        call: FusedLinear<'_>,
        params: &FusedLinearParams,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let raw = RawFusedLinear::validate(self, &call, params)?;
        if raw.n == 0 {
            return self.fused_linear_empty(&raw, params, launch);
        }
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::fused_linear(&raw, params) },
            Backend::Cuda(dev) => cuda::fused_linear(dev, &raw, params, launch),
        }
    }

    /// An empty batch (N = 0): the reduced loss is 0, the weight gradient of no rows is 0 (left
    /// as it is when accumulating); nothing else exists to write.
    fn fused_linear_empty(
        &self,
        raw: &RawFusedLinear,
        params: &FusedLinearParams,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let operands = [
            ("student hidden states", raw.student_hidden.cast()),
            ("student weight", raw.student_weight.cast()),
            ("teacher hidden states", raw.teacher_hidden.cast()),
            ("teacher weight", raw.teacher_weight.cast()),
            ("labels", raw.labels.cast()),
            ("per-token loss", raw.per_token.cast_const().cast()),
            ("grad_hidden", raw.grad_hidden.cast_const().cast()),
            ("grad_weight", raw.grad_weight.cast_const().cast()),
            ("num_items", raw.num_items.cast()),
        ];
        let size = raw.grad_weight_dtype.size();
        let weight = Fill {
            what: "grad_weight",
            // Accumulating: the gradient of no rows adds nothing.
            ptr: if params.accumulate {
                std::ptr::null_mut()
            } else {
                raw.grad_weight
            },
            pitch: raw.grad_weight_stride * size,
            width: raw.h * size,
            rows: raw.v,
            value: 0,
        };
        let loss = Fill::bytes("loss", raw.loss.cast(), 4, 0);
        // SAFETY: the loss and the [V, H] weight gradient are null or validated outputs at this
        // context's location.
        unsafe { self.write_empty_outputs(&operands, &[loss, weight], launch) }
    }
}
