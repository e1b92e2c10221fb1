//! Grouped-query attention, forward and backward, in the FlashAttention layout.
//!
//! Every operand is a matrix of token rows: q and out are `[Tq, Hq·D]`, k and v `[Tk, Hkv·D]`
//! (heads contiguous inside a row, D contiguous inside a head; the token stride may be larger,
//! e.g. q sliced out of a fused qkv projection). How token rows form sequences is the [`Batch`]:
//! padded (`B` sequences of `Sq` queries and `Sk` keys, row `b·S + s`) or packed variable-length
//! (`cu_seqlens`, how RL and distillation rollouts of different lengths are batched).
//!
//! Forward: `out = softmax(scale · q kᵀ + mask) v` per query head, where query head `h` reads KV
//! head `h / (Hq / Hkv)`, and the natural-log log-sum-exp of each query row (f32). A query row
//! that sees no key (causal with `Sq > Sk`, or an empty key sequence) outputs 0 with LSE −∞.
//!
//! Backward: dQ, dK and dV from dOut, q, k, v, out and LSE. dK and dV have the KV shape: the
//! sum over each KV head's query group is done inside the kernels, never by expanding K / V.

pub(crate) mod cpu;
pub(crate) mod cuda;
mod params;
mod validate;

pub use cuda::kernels_used;
pub use params::{AttentionParams, HEAD_DIMS, MAX_ROWS, MAX_SOFTMAX_SCALE, ROW_ALIGN};

use crate::device::{Backend, Context, Launch};
use crate::error::Result;
use crate::tensor::{DType, Matrix, MatrixMut, Vector, VectorMut};

/// How token rows form sequences.
#[derive(Debug, Clone, Copy)]
pub enum Batch<'a> {
    /// `batch` sequences of `seqlen_q` queries and `seqlen_k` keys each: q has `batch·seqlen_q`
    /// rows (row `b·seqlen_q + s`), k and v `batch·seqlen_k`. The LSE is `[batch, Hq, seqlen_q]`.
    Padded {
        /// Sequences B.
        batch: usize,
        /// Queries per sequence Sq.
        seqlen_q: usize,
        /// Keys per sequence Sk.
        seqlen_k: usize,
    },
    /// Packed sequences: sequence `b` holds query rows `cu_seqlens_q[b] .. cu_seqlens_q[b+1]` and
    /// key rows `cu_seqlens_k[b] .. cu_seqlens_k[b+1]`. Both arrays have `B + 1` entries, start at
    /// 0, never decrease and end at the row counts of q and k. Sequences may be empty. The LSE
    /// is `[Hq, Tq]`.
    ///
    /// The CPU backend checks every entry; on CUDA the arrays live in device memory and are read
    /// by the kernels only, so they are trusted (out-of-range entries are clamped to the rows that
    /// exist, which keeps memory safe but gives meaningless results; a sequence longer than
    /// `max_seqlen_q` / `max_seqlen_k` has its rows past the bound left unwritten, where the CPU
    /// backend refuses the bound).
    Varlen {
        /// `[B + 1]` query row offsets.
        cu_seqlens_q: Vector<'a, i32>,
        /// `[B + 1]` key row offsets.
        cu_seqlens_k: Vector<'a, i32>,
        /// The longest query sequence (an upper bound is fine; it sizes the CUDA grid). At
        /// most `i32::MAX`, and `B · max_seqlen_q` must cover the rows of q (checked on every
        /// backend; a true bound always does).
        max_seqlen_q: usize,
        /// The longest key sequence (an upper bound is fine), with the same two rules against
        /// the rows of k.
        max_seqlen_k: usize,
    },
}

/// Operands and outputs of [`Context::attention`].
#[derive(Debug)]
pub struct Attention<'a> {
    /// How rows form sequences.
    pub batch: Batch<'a>,
    /// Queries `[Tq, Hq·D]`, bf16 or f16 (f32 on the CPU backend only).
    pub q: Matrix<'a>,
    /// Keys `[Tk, Hkv·D]`, the dtype of q.
    pub k: Matrix<'a>,
    /// Values `[Tk, Hkv·D]`, the dtype of q.
    pub v: Matrix<'a>,
    /// Out `[Tq, Hq·D]`, the dtype of q.
    pub out: MatrixMut<'a>,
    /// Out: natural-log log-sum-exp of the scaled scores of each query row, f32,
    /// `[B, Hq, Sq]` (padded) or `[Hq, Tq]` (varlen); −∞ for a row that sees no key.
    pub lse: VectorMut<'a, f32>,
}

/// Operands and outputs of [`Context::attention_backward`].
#[derive(Debug)]
pub struct AttentionBackward<'a> {
    /// How rows form sequences (as in the forward call).
    pub batch: Batch<'a>,
    /// Gradient of the loss w.r.t. out, `[Tq, Hq·D]`, the dtype of q.
    pub dout: Matrix<'a>,
    /// Queries of the forward call.
    pub q: Matrix<'a>,
    /// Keys of the forward call.
    pub k: Matrix<'a>,
    /// Values of the forward call.
    pub v: Matrix<'a>,
    /// Out of the forward call.
    pub out: Matrix<'a>,
    /// LSE of the forward call.
    pub lse: Vector<'a, f32>,
    /// Out: gradient w.r.t. q, `[Tq, Hq·D]`, the dtype of q.
    pub dq: MatrixMut<'a>,
    /// Out: gradient w.r.t. k, `[Tk, Hkv·D]` (summed over each KV head's query group).
    pub dk: MatrixMut<'a>,
    /// Out: gradient w.r.t. v, `[Tk, Hkv·D]`.
    pub dv: MatrixMut<'a>,
}

/// Sequence structure of a validated call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawBatch {
    /// Sequences B.
    pub batch: usize,
    /// Padded: Sq. Varlen: the caller's bound on the longest query sequence.
    pub seqlen_q: usize,
    /// Padded: Sk. Varlen: the bound on the longest key sequence.
    pub seqlen_k: usize,
    /// Rows of q / out / dout / dq (Tq; padded: B·Sq).
    pub total_q: usize,
    /// Rows of k / v / dk / dv (Tk; padded: B·Sk).
    pub total_k: usize,
    /// Null for the padded layout, else `[B + 1]` offsets.
    pub cu_seqlens_q: *const i32,
    /// Null for the padded layout, else `[B + 1]` offsets.
    pub cu_seqlens_k: *const i32,
}

impl RawBatch {
    /// Packed variable-length layout (LSE `[Hq, Tq]`)?
    pub fn is_varlen(&self) -> bool {
        !self.cu_seqlens_q.is_null()
    }

    /// Entries of the LSE for `heads_q` query heads (Hq·Tq in both layouts).
    pub fn lse_len(&self, heads_q: usize) -> usize {
        heads_q * self.total_q
    }
}

/// A validated forward call in raw pointers. Strides are in elements between token rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawAttention {
    pub shape: RawBatch,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub causal: bool,
    /// The softmax scale in effect.
    pub scale: f32,
    pub q: *const u8,
    pub q_stride: usize,
    pub k: *const u8,
    pub k_stride: usize,
    pub v: *const u8,
    pub v_stride: usize,
    pub out: *mut u8,
    pub out_stride: usize,
    pub lse: *mut f32,
}

/// A validated backward call in raw pointers. Strides are in elements between token rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawAttentionBackward {
    pub shape: RawBatch,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub causal: bool,
    /// The softmax scale in effect.
    pub scale: f32,
    pub deterministic: bool,
    pub dout: *const u8,
    pub dout_stride: usize,
    pub q: *const u8,
    pub q_stride: usize,
    pub k: *const u8,
    pub k_stride: usize,
    pub v: *const u8,
    pub v_stride: usize,
    pub out: *const u8,
    pub out_stride: usize,
    pub lse: *const f32,
    pub dq: *mut u8,
    pub dq_stride: usize,
    pub dk: *mut u8,
    pub dk_stride: usize,
    pub dv: *mut u8,
    pub dv_stride: usize,
}

impl Context {
    /// Attention forward: out and LSE. Stream-ordered on CUDA; on error nothing is written.
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn attention(
        &self,
        call: Attention<'_>,
        params: &AttentionParams,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let raw = RawAttention::validate(self, &call, params)?;
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::forward(&raw) },
            Backend::Cuda(dev) => cuda::forward(dev, &raw, launch),
        }
    }

    /// Bytes of device workspace [`Context::attention_backward`] needs for this call (0 on the
    /// CPU). Validates the call like the backward itself.
    ///
    /// # Errors
    /// What [`Context::attention_backward`] would refuse in the call itself.
    pub fn attention_backward_workspace_size(
        &self,
        call: &AttentionBackward<'_>,
        params: &AttentionParams,
    ) -> Result<usize> {
        let raw = RawAttentionBackward::validate(self, call, params)?;
        Ok(match self.backend() {
            Backend::Cpu => 0,
            Backend::Cuda(dev) => cuda::backward_workspace_size(dev, &raw),
        })
    }

    /// Attention backward: dQ, dK, dV. Stream-ordered on CUDA; on error nothing is written.
    ///
    #[doc = crate::error::call_errors_doc!()]
    pub fn attention_backward(
        &self,
        call: AttentionBackward<'_>,
        params: &AttentionParams,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let raw = RawAttentionBackward::validate(self, &call, params)?;
        match self.backend() {
            // SAFETY: validated host pointers covering the shapes.
            Backend::Cpu => unsafe { cpu::backward(&raw) },
            Backend::Cuda(dev) => cuda::backward(dev, &raw, launch),
        }
    }
}
