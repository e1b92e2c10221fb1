//! Rust mirror of `DkAttentionShape` (cuda/include/dk_attention_shape.h): the sequence structure,
//! heads, mask and scale that the forward and backward argument structs embed.

use cudarc::driver::DeviceRepr;

use crate::attention::RawBatch;
use crate::error::{bail, Result};

/// Rust mirror of `DkAttentionShape` (cuda/include/dk_attention_shape.h): the sequence structure
/// and head layout shared by the forward and backward argument structs.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AttentionShape {
    /// `const int32_t*` `[batch + 1]` query row offsets; 0 for the padded layout.
    pub cu_seqlens_q: u64,
    /// `const int32_t*` `[batch + 1]` key row offsets; 0 for the padded layout.
    pub cu_seqlens_k: u64,
    /// Sequences B.
    pub batch: i32,
    /// Padded: queries per sequence. Varlen: bound on the longest (sizes the grid).
    pub seqlen_q: i32,
    /// Padded: keys per sequence. Varlen: bound on the longest.
    pub seqlen_k: i32,
    /// Rows of q / out (the varlen offsets are clamped to it).
    pub total_q: i32,
    /// Rows of k / v.
    pub total_k: i32,
    /// Query heads Hq.
    pub heads_q: i32,
    /// KV heads Hkv (divides Hq).
    pub heads_kv: i32,
    /// 1: causal mask aligned bottom-right per sequence.
    pub causal: i32,
    /// Softmax scale applied to q·k.
    pub scale: f32,
    /// `scale · log2(e)`: the kernels exponentiate with exp2.
    pub scale_log2: f32,
}

/// A size the kernels index with `int`: validation bounds every size by `MAX_ROWS`, so this only
/// fails on a broken invariant.
pub(crate) fn to_i32(what: &str, v: usize) -> Result<i32> {
    match i32::try_from(v) {
        Ok(x) => Ok(x),
        Err(_) => bail!(
            Shape,
            "{what} = {v} does not fit the kernels' 32-bit indexing"
        ),
    }
}

impl AttentionShape {
    /// The shape of a validated call.
    pub(crate) fn new(
        shape: &RawBatch,
        heads_q: usize,
        heads_kv: usize,
        causal: bool,
        scale: f32,
    ) -> Result<Self> {
        Ok(AttentionShape {
            cu_seqlens_q: shape.cu_seqlens_q as u64,
            cu_seqlens_k: shape.cu_seqlens_k as u64,
            batch: to_i32("batch", shape.batch)?,
            seqlen_q: to_i32("seqlen_q", shape.seqlen_q)?,
            seqlen_k: to_i32("seqlen_k", shape.seqlen_k)?,
            total_q: to_i32("rows of q", shape.total_q)?,
            total_k: to_i32("rows of k", shape.total_k)?,
            heads_q: to_i32("heads_q", heads_q)?,
            heads_kv: to_i32("heads_kv", heads_kv)?,
            causal: causal as i32,
            scale,
            scale_log2: scale * std::f32::consts::LOG2_E,
        })
    }
}

// SAFETY: plain-old-data with the C layout of DkAttentionShape (checked through the args
// layouts by capi/src/tests/abi_layout.rs).
unsafe impl DeviceRepr for AttentionShape {}
