//! Attention parameters: heads, head dimension, mask, softmax scale, determinism.

use crate::error::{bail, Result};

/// Head dimensions the kernels (and, to keep every backend accepting the same calls, the CPU
/// reference) support.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Bytes every token row start (base pointer and token stride) of q, k, v, out, dout, dq, dk and
/// dv must be a multiple of: the CUDA kernels move 16 bytes at a time, and the rule is checked on
/// every backend so a call the CPU accepts CUDA accepts too.
pub const ROW_ALIGN: usize = 16;

/// Largest number of token rows of any operand, and of heads × rows of the LSE: the kernels
/// index with 32-bit integers.
pub const MAX_ROWS: usize = i32::MAX as usize;

/// The largest `softmax_scale` accepted: the kernels use `softmax_scale · log2(e)` as an f32,
/// which must be finite (f32::MAX / log2(e), rounded down).
pub const MAX_SOFTMAX_SCALE: f32 = 2.358_657_4e38;

/// Parameters of [`crate::Context::attention`] and [`crate::Context::attention_backward`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    /// Query heads Hq (≥ 1, a multiple of `heads_kv`).
    pub heads_q: usize,
    /// Key / value heads Hkv (≥ 1). Query head `h` reads KV head `h / (Hq / Hkv)`.
    pub heads_kv: usize,
    /// Head dimension D, one of [`HEAD_DIMS`].
    pub head_dim: usize,
    /// Causal mask aligned bottom-right: query `i` of a sequence sees keys `j ≤ i + Sk − Sq`.
    pub causal: bool,
    /// Scale applied to `q·k` before the softmax; `None` is `1/√D`. When set: > 0 and at most
    /// [`MAX_SOFTMAX_SCALE`].
    pub softmax_scale: Option<f32>,
    /// Backward only: bitwise reproducible dQ, dK and dV (no floating-point atomics). `false`
    /// lets the CUDA backend sum dQ over key tiles with f32 atomics, as FlashAttention-2 does:
    /// five GEMMs instead of seven and a workspace of `4·Tq·Hq·D` more bytes; dQ's last bits then
    /// vary from run to run, dK and dV stay reproducible. On a Hopper device running the wgmma
    /// backward (its default) `false` runs the deterministic kernels, faster there, so dQ is
    /// reproducible too; the workspace size asked for stays the same. The CPU backend and the
    /// forward pass are always deterministic.
    pub deterministic: bool,
}

impl AttentionParams {
    /// Non-causal, default scale, deterministic backward.
    pub fn new(heads_q: usize, heads_kv: usize, head_dim: usize) -> Self {
        AttentionParams {
            heads_q,
            heads_kv,
            head_dim,
            causal: false,
            softmax_scale: None,
            deterministic: true,
        }
    }

    /// The same parameters with the causal mask on or off.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Query heads per KV head (Hq / Hkv).
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv.max(1)
    }

    /// The softmax scale in effect: the one set, or `1/√D`.
    pub fn scale(&self) -> f32 {
        self.softmax_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// Checks heads, head dimension and scale.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) (or `Shape` for a
    /// size that does not fit), with a message naming the parameter and its range.
    pub fn validate(&self) -> Result<()> {
        if self.heads_q == 0 || self.heads_kv == 0 {
            bail!(
                Shape,
                "heads_q = {} and heads_kv = {} must both be >= 1",
                self.heads_q,
                self.heads_kv
            );
        }
        if self.heads_q % self.heads_kv != 0 {
            bail!(
                Shape,
                "heads_q = {} must be a multiple of heads_kv = {}",
                self.heads_q,
                self.heads_kv
            );
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            bail!(
                Shape,
                "head_dim = {} is not supported: must be one of {HEAD_DIMS:?}",
                self.head_dim
            );
        }
        if let Some(s) = self.softmax_scale {
            // The kernels scale by softmax_scale · log2(e) in f32: past ~2.36e38 that is +inf,
            // and inf − inf would make every output NaN.
            if !(s.is_finite() && s > 0.0 && (s * std::f32::consts::LOG2_E).is_finite()) {
                bail!(
                    InvalidArgument,
                    "softmax_scale = {s} must be finite, > 0 and at most {MAX_SOFTMAX_SCALE:e} \
                     (softmax_scale · log2(e) must be a finite f32)"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_softmax_scale_is_the_last_scale_with_a_finite_log2_scale() {
        let log2 = |s: f32| s * std::f32::consts::LOG2_E;
        assert!(log2(MAX_SOFTMAX_SCALE).is_finite());
        assert!(log2(MAX_SOFTMAX_SCALE.next_up()).is_infinite());
        let p = |s| AttentionParams {
            softmax_scale: Some(s),
            ..AttentionParams::new(8, 8, 64)
        };
        assert!(p(MAX_SOFTMAX_SCALE).validate().is_ok());
        let err = p(MAX_SOFTMAX_SCALE.next_up()).validate().unwrap_err();
        assert!(err.to_string().contains("softmax_scale"), "{err}");
    }
}
