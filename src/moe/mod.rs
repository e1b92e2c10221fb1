//! MoE token dispatch: routing (top-k experts per token with softmax or sigmoid scores,
//! selection bias, group-limited selection, renormalisation, scaling, capacity and block
//! padding), and the deterministic permute / combine / slot-dot primitives the forward and
//! backward passes are built from — on the CPU (reference) or CUDA.
//!
//! The permuted order is expert-major, then token index, then slot: deterministic. Combine
//! computes each token's weighted sum of its k expert rows in slot order without atomics, so
//! results are bitwise reproducible.
//!
//! Backward passes in terms of the primitives:
//! - permute (unscaled): `grad_x = combine(grad_xp, weights = None)`;
//! - permute scaled by the weights: `grad_x = combine(grad_xp, weights)`,
//!   `grad_weights = slot_dot(x, grad_xp)`;
//! - combine (weighted): `grad_expert_out = permute(grad_y, weights)`,
//!   `grad_weights = slot_dot(grad_y, expert_out)`; unweighted: `permute(grad_y, None)`.
//!
//! Index contents (`perm`, `position`, as a route wrote them or the caller's own): an entry
//! other than −1 or a row (a flat slot for `perm`) in range is an
//! [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) on the CPU, with nothing
//! written; the CUDA kernels, which cannot read them before launching without a host sync,
//! treat such an entry as −1 (a padding row, a dropped slot).
//!
//! [`Context::moe_permute_backward`] and [`Context::moe_combine_backward`] compute each pair in
//! one call with the same results bit for bit; on CUDA, where the weights' gradient is asked
//! for, one kernel reads each row once instead of the row both primitives read twice
//! (`cuda/MOE.md`, "Fused backward passes").

pub(crate) mod cpu;
pub(crate) mod cuda;
mod empty;
mod params;
mod validate;

pub use params::{max_rows, RouteParams, Score, MAX_EXPERTS, MAX_HIDDEN, MAX_K, ROW_ALIGN};
pub use validate::check_tokens_and_slots;

use crate::device::{Backend, Context, Launch};
use crate::error::Result;
use crate::tensor::{DType, Matrix, MatrixMut, Vector, VectorMut};

/// Operands of [`Context::moe_route`].
#[derive(Debug)]
pub struct Route<'a> {
    /// Router logits `[N, E]`, f32 or bf16.
    pub logits: Matrix<'a>,
    /// Optional `[E]` bias added to the scores for selection only.
    pub bias: Option<Vector<'a, f32>>,
    /// Out `[N·k]`: chosen experts per token, by descending selection score (ties: lower id).
    pub expert_ids: VectorMut<'a, i32>,
    /// Out `[N·k]`: weights of the chosen experts.
    pub weights: VectorMut<'a, f32>,
    /// Out `[E]`: tokens per expert after capacity drops.
    pub counts: VectorMut<'a, i32>,
    /// Out `[E + 1]`: padded segment starts; `offsets[E]` is the number of permuted rows R.
    pub offsets: VectorMut<'a, i32>,
    /// Out, at least [`max_rows`] entries: the flat slot index `n·k + j` each permuted row holds,
    /// −1 for padding and for every entry past R.
    pub perm: VectorMut<'a, i32>,
    /// Out `[N·k]`: the permuted row of slot `(n, j)`, −1 when dropped.
    pub position: VectorMut<'a, i32>,
}

/// Operands of [`Context::moe_permute`]: `out[r] = x[perm[r] / k] (· weights[perm[r]])`.
#[derive(Debug)]
pub struct Permute<'a> {
    /// Token rows `[N, H]`.
    pub x: Matrix<'a>,
    /// Slots per token.
    pub k: usize,
    /// `[R]` from [`Route::perm`].
    pub perm: Vector<'a, i32>,
    /// Optional `[N·k]` weights scaling each gathered row (Llama 4 scales the expert input).
    pub weights: Option<Vector<'a, f32>>,
    /// Out `[R, H]`, same dtype as `x`; padding rows are zero.
    pub out: MatrixMut<'a>,
}

/// Operands of [`Context::moe_combine`]: `y[n] = Σ_j w[n, j] · rows[position[n, j]]`.
#[derive(Debug)]
pub struct Combine<'a> {
    /// Rows in permuted order `[R, H]` (expert outputs, or gradients in the backward pass).
    pub rows: Matrix<'a>,
    /// Slots per token (the route's k); `position` must hold `N·k` entries for the `N` rows of `y`.
    pub k: usize,
    /// `[N·k]` from [`Route::position`]; −1 slots are skipped.
    pub position: Vector<'a, i32>,
    /// Optional `[N·k]` weights (None: unweighted sum).
    pub weights: Option<Vector<'a, f32>>,
    /// Out `[N, H]`, same dtype as `rows`.
    pub y: MatrixMut<'a>,
}

/// Operands of [`Context::moe_slot_dot`]: `out[n, j] = ⟨tokens[n], rows[position[n, j]]⟩`.
#[derive(Debug)]
pub struct SlotDot<'a> {
    /// Per-token rows `[N, H]`.
    pub tokens: Matrix<'a>,
    /// Rows in permuted order `[R, H]`, same dtype as `tokens`.
    pub rows: Matrix<'a>,
    /// Slots per token (the route's k); `position` and `out` must hold `N·k` entries for the
    /// `N` rows of `tokens`.
    pub k: usize,
    /// `[N·k]` from [`Route::position`]; −1 slots give 0.
    pub position: Vector<'a, i32>,
    /// Out `[N·k]` (f32).
    pub out: VectorMut<'a, f32>,
}

/// Operands of [`Context::moe_permute_backward`]: the gradients of a [`Permute`] from the
/// gradient of its output.
#[derive(Debug)]
pub struct PermuteBackward<'a> {
    /// Gradient of the permuted rows `[R, H]`.
    pub grad_xp: Matrix<'a>,
    /// Slots per token (the route's k); `position` must hold `N·k` entries for the `N` rows of
    /// `grad_x`.
    pub k: usize,
    /// `[N·k]` from [`Route::position`]; −1 slots are skipped.
    pub position: Vector<'a, i32>,
    /// The `[N·k]` weights the forward scaled by; None when it did not scale.
    pub weights: Option<Vector<'a, f32>>,
    /// The forward's input `[N, H]`, same dtype as `grad_xp`: given with, and only with,
    /// `grad_weights`.
    pub x: Option<Matrix<'a>>,
    /// Out `[N, H]`: `Σ_j w[n, j] · grad_xp[position[n, j]]` (w = 1 unscaled), [`Combine`]'s
    /// result bit for bit.
    pub grad_x: MatrixMut<'a>,
    /// Optional out `[N·k]` (f32): `⟨x[n], grad_xp[position[n, j]]⟩`, 0 for dropped slots,
    /// [`SlotDot`]'s result bit for bit.
    pub grad_weights: Option<VectorMut<'a, f32>>,
}

/// Operands of [`Context::moe_combine_backward`]: the gradients of a [`Combine`] from the
/// gradient of its output.
#[derive(Debug)]
pub struct CombineBackward<'a> {
    /// Gradient of the combined rows `[N, H]`.
    pub grad_y: Matrix<'a>,
    /// The forward's rows in permuted order `[R, H]`, same dtype as `grad_y`: given with, and
    /// only with, `grad_weights`.
    pub expert_out: Option<Matrix<'a>>,
    /// Slots per token (the route's k); `position` must hold `N·k` entries for the `N` rows of
    /// `grad_y`.
    pub k: usize,
    /// `[R]` from [`Route::perm`] (one entry per row of `grad_expert_out`).
    pub perm: Vector<'a, i32>,
    /// `[N·k]` from [`Route::position`], the same route's.
    pub position: Vector<'a, i32>,
    /// The `[N·k]` weights of a weighted combine; None for an unweighted one.
    pub weights: Option<Vector<'a, f32>>,
    /// Out `[R, H]`: `w[perm[r]] · grad_y[perm[r] / k]` (w = 1 unweighted), zero rows for
    /// padding: [`Permute`]'s result bit for bit.
    pub grad_expert_out: MatrixMut<'a>,
    /// Optional out `[N·k]` (f32): `⟨grad_y[n], expert_out[position[n, j]]⟩`, 0 for dropped
    /// slots, [`SlotDot`]'s result bit for bit.
    pub grad_weights: Option<VectorMut<'a, f32>>,
}

/// A validated route call in raw pointers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawRoute {
    pub n: usize,
    pub e: usize,
    pub logits: *const u8,
    pub logits_dtype: DType,
    pub logits_stride: usize,
    /// Null when absent.
    pub bias: *const f32,
    pub expert_ids: *mut i32,
    pub weights: *mut f32,
    pub counts: *mut i32,
    pub offsets: *mut i32,
    pub perm: *mut i32,
    /// Entries of `perm` (>= max_rows).
    pub perm_rows: usize,
    pub position: *mut i32,
}

/// A validated permute call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawPermute {
    pub n: usize,
    pub h: usize,
    pub k: usize,
    pub rows: usize,
    pub dtype: DType,
    pub x: *const u8,
    pub x_stride: usize,
    pub perm: *const i32,
    /// Null: no scaling.
    pub weights: *const f32,
    pub out: *mut u8,
    pub out_stride: usize,
}

/// A validated combine call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawCombine {
    pub n: usize,
    pub h: usize,
    pub k: usize,
    pub rows: usize,
    pub dtype: DType,
    pub rows_in: *const u8,
    pub rows_stride: usize,
    pub position: *const i32,
    /// Null: unweighted.
    pub weights: *const f32,
    pub y: *mut u8,
    pub y_stride: usize,
}

/// A validated slot-dot call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawSlotDot {
    pub n: usize,
    pub h: usize,
    pub k: usize,
    pub rows: usize,
    pub dtype: DType,
    pub tokens: *const u8,
    pub tokens_stride: usize,
    pub rows_in: *const u8,
    pub rows_stride: usize,
    pub position: *const i32,
    pub out: *mut f32,
}

/// A validated permute backward: the combine it computes and, with the weights' gradient, the
/// slot-dot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawPermuteBackward {
    pub combine: RawCombine,
    pub dot: Option<RawSlotDot>,
}

/// A validated combine backward: the permute it computes, the route's position and, with the
/// weights' gradient, the slot-dot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawCombineBackward {
    pub permute: RawPermute,
    pub position: *const i32,
    pub dot: Option<RawSlotDot>,
}

impl Context {
    /// Bytes of device workspace [`Context::moe_route`] needs (0 on the CPU). A size, not a
    /// check: the sizes are validated by the call (the C ABI's query, `dk_moe_route_workspace_size`,
    /// also refuses what the call would).
    pub fn moe_route_workspace_size(&self, n: usize, e: usize, k: usize) -> usize {
        match self.backend() {
            Backend::Cpu => 0,
            Backend::Cuda(_) => cuda::route_workspace_size(n, e, k),
        }
    }

    /// Routes tokens to experts and builds the permutation. On error nothing is written.
    ///
    /// Route, gather each token's rows into expert-major order, and combine them back (with
    /// identity "experts", the combine returns each token's weighted sum: renormalised weights
    /// give the token back). `examples/moe_dispatch.rs` is the longer version.
    ///
    /// ```
    /// use distill_kernels::moe::{Combine, Permute, Route, RouteParams};
    /// use distill_kernels::{AlignedBuf, Context, Launch, Matrix, MatrixMut, Vector, VectorMut};
    ///
    /// let (n, e, h) = (5, 4, 8);
    /// let params = RouteParams { renormalize: true, ..RouteParams::new(2) };
    /// let k = params.k;
    /// let logits: Vec<f32> = (0..n * e).map(|i| ((i * 7) % 11) as f32 * 0.3).collect();
    /// let (mut ids, mut w, mut pos) = (vec![0i32; n * k], vec![0f32; n * k], vec![0i32; n * k]);
    /// let (mut counts, mut offsets) = (vec![0i32; e], vec![0i32; e + 1]);
    /// let mut perm = vec![0i32; params.max_rows(n, e)];
    /// let ctx = Context::cpu();
    /// ctx.moe_route(
    ///     Route {
    ///         logits: Matrix::host(&logits, n, e, e)?,
    ///         bias: None,
    ///         expert_ids: VectorMut::host(&mut ids),
    ///         weights: VectorMut::host(&mut w),
    ///         counts: VectorMut::host(&mut counts),
    ///         offsets: VectorMut::host(&mut offsets),
    ///         perm: VectorMut::host(&mut perm),
    ///         position: VectorMut::host(&mut pos),
    ///     },
    ///     &params,
    ///     &Launch::default(),
    /// )?;
    /// let r = offsets[e] as usize; // permuted rows
    /// assert_eq!(r, n * k);
    ///
    /// let x = AlignedBuf::from_slice(&(0..n * h).map(|i| i as f32).collect::<Vec<_>>());
    /// let mut xp = AlignedBuf::<f32>::zeros(r * h);
    /// ctx.moe_permute(
    ///     Permute {
    ///         x: Matrix::host(&x, n, h, h)?,
    ///         k,
    ///         perm: Vector::host(&perm[..r]),
    ///         weights: None,
    ///         out: MatrixMut::host(&mut xp, r, h, h)?,
    ///     },
    ///     &Launch::default(),
    /// )?;
    /// let mut y = AlignedBuf::<f32>::zeros(n * h);
    /// ctx.moe_combine(
    ///     Combine {
    ///         rows: Matrix::host(&xp, r, h, h)?,
    ///         k,
    ///         position: Vector::host(&pos),
    ///         weights: Some(Vector::host(&w)),
    ///         y: MatrixMut::host(&mut y, n, h, h)?,
    ///     },
    ///     &Launch::default(),
    /// )?;
    /// assert!(y.iter().zip(x.iter()).all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0)));
    /// # Ok::<(), distill_kernels::Error>(())
    /// ```
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn moe_route(
        &self,
        call: Route<'_>,
        params: &RouteParams,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let raw = RawRoute::validate(self, call, params)?;
        if raw.n == 0 {
            return self.moe_route_empty(&raw, launch);
        }
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::route(&raw, params) },
            Backend::Cuda(dev) => cuda::route(dev, &raw, params, launch),
        }
    }

    /// Bytes of device workspace [`Context::moe_permute`] needs for `n` tokens of `k` slots: 0
    /// on the CPU and for k = 1; on CUDA for k > 1, 4 · (n·k + 1) (the inverse of perm). A size,
    /// not a check, as [`Context::moe_route_workspace_size`].
    pub fn moe_permute_workspace_size(&self, n: usize, k: usize) -> usize {
        match self.backend() {
            Backend::Cpu => 0,
            Backend::Cuda(_) => cuda::permute_workspace_size(n, k),
        }
    }

    /// Gathers token rows into the permuted (expert-major) order. On CUDA with k > 1,
    /// `launch`'s workspace (at least [`Context::moe_permute_workspace_size`] bytes, 4-byte
    /// aligned) holds the scratch; without one the library allocates it on the stream.
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn moe_permute(&self, call: Permute<'_>, launch: &Launch<'_>) -> Result<()> {
        let raw = RawPermute::validate(self, call)?;
        if raw.n == 0 || raw.rows == 0 {
            return self.moe_permute_empty(&raw, launch);
        }
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::permute(&raw) },
            Backend::Cuda(dev) => cuda::permute(dev, &raw, launch),
        }
    }

    /// Each token's weighted sum of its expert rows, deterministic (no atomics).
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn moe_combine(&self, call: Combine<'_>, launch: &Launch<'_>) -> Result<()> {
        let raw = RawCombine::validate(self, call)?;
        if raw.n == 0 {
            return self.moe_combine_empty(&raw, launch);
        }
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::combine(&raw) },
            Backend::Cuda(dev) => cuda::combine(dev, &raw, launch),
        }
    }

    /// Per-slot dot products of token rows with their permuted rows (weights' gradients).
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn moe_slot_dot(&self, call: SlotDot<'_>, launch: &Launch<'_>) -> Result<()> {
        let raw = RawSlotDot::validate(self, call)?;
        if raw.n == 0 {
            return self.moe_slot_dot_empty(&raw, launch);
        }
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::slot_dot(&raw) },
            Backend::Cuda(dev) => cuda::slot_dot(dev, &raw, launch),
        }
    }

    /// The gradients of a permute: `grad_x` (a combine of `grad_xp`, weighted when the forward
    /// scaled) and, when asked, the weights' gradient (a slot-dot of `x` with `grad_xp`) in one
    /// call; on CUDA one kernel reads each row of `grad_xp` once for both.
    ///
    /// ```
    /// use distill_kernels::moe::PermuteBackward;
    /// use distill_kernels::{Context, Launch, Matrix, MatrixMut, Vector, VectorMut};
    ///
    /// // Two tokens, k = 2, H = 8; the route put slot s in row position[s] (slot 3 dropped).
    /// let (n, k, h, r) = (2, 2, 8, 3);
    /// let position = [2, 0, 1, -1];
    /// let weights = [0.5f32, 0.25, 1.0, 2.0];
    /// let x: Vec<f32> = (0..n * h).map(|i| i as f32).collect();
    /// let grad_xp: Vec<f32> = (0..r * h).map(|i| 0.1 * i as f32).collect();
    /// let (mut grad_x, mut grad_w) = (vec![0f32; n * h], vec![0f32; n * k]);
    /// Context::cpu().moe_permute_backward(
    ///     PermuteBackward {
    ///         grad_xp: Matrix::host(&grad_xp, r, h, h)?,
    ///         k,
    ///         position: Vector::host(&position),
    ///         weights: Some(Vector::host(&weights)),
    ///         x: Some(Matrix::host(&x, n, h, h)?),
    ///         grad_x: MatrixMut::host(&mut grad_x, n, h, h)?,
    ///         grad_weights: Some(VectorMut::host(&mut grad_w)),
    ///     },
    ///     &Launch::default(),
    /// )?;
    /// // Token 1 has one kept slot (row 1, weight 1): its gradient is that row.
    /// assert_eq!(&grad_x[h..], &grad_xp[h..2 * h]);
    /// assert_eq!(grad_w[3], 0.0); // dropped
    /// # Ok::<(), distill_kernels::Error>(())
    /// ```
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn moe_permute_backward(
        &self,
        call: PermuteBackward<'_>,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let raw = RawPermuteBackward::validate(self, call)?;
        if raw.combine.n == 0 {
            return self.moe_permute_backward_empty(&raw, launch);
        }
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::permute_backward(&raw) },
            Backend::Cuda(dev) => cuda::permute_backward(dev, &raw, launch),
        }
    }

    /// The gradients of a combine: `grad_expert_out` (a permute of `grad_y`, scaled when the
    /// combine was weighted) and, when asked, the weights' gradient (a slot-dot of `grad_y` with
    /// `expert_out`) in one call. On CUDA with the weights' gradient one kernel reads each row of
    /// `grad_y` once for all of its slots and both outputs, and needs no workspace; without it
    /// the call is [`Context::moe_permute`] (whose workspace `launch` may carry).
    ///
    /// `perm` and `position` must come from the same route for the single pass; any other pair
    /// still gives the primitives' results (rows a slot does not point back to are gathered as
    /// [`Context::moe_permute`] does).
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn moe_combine_backward(
        &self,
        call: CombineBackward<'_>,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let raw = RawCombineBackward::validate(self, call)?;
        if raw.permute.n == 0 || raw.permute.rows == 0 {
            return self.moe_combine_backward_empty(&raw, launch);
        }
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::combine_backward(&raw) },
            Backend::Cuda(dev) => cuda::combine_backward(dev, &raw, launch),
        }
    }
}
