//! Parameters of the fused linear divergence, their validation, and the automatic chunk size.

use crate::divergence::Params;
use crate::error::{bail, Result};

/// Scratch bytes per chunk the automatic chunk size aims at: the chunk's student and teacher
/// logits in f32 plus f32 copies of its hidden rows (512 MiB, well inside the 2 GiB extra peak
/// memory the fused op is allowed at V ≈ 200k).
pub(crate) const AUTO_CHUNK_BYTES: usize = 512 << 20;

/// Automatic chunks of at least this many rows are rounded down to a multiple of it (full
/// tensor-core tiles in the GEMMs).
pub(crate) const AUTO_CHUNK_MULTIPLE: usize = 64;

/// Rows per chunk chosen from the shapes: as many rows as fit [`AUTO_CHUNK_BYTES`] of scratch
/// (`2 × V` f32 logits and `H + Ht` f32 hidden values per row), rounded down to a multiple of
/// [`AUTO_CHUNK_MULTIPLE`] when at least that many fit, never more than `n` and never 0.
///
/// For N = 4096, H = Ht = 3072, V = 200064 this is 320 rows (≈ 0.5 GiB of logits per chunk).
pub(crate) fn chunk_rows_for(n: usize, v: usize, h: usize, ht: usize) -> usize {
    let per_row = 4usize
        .saturating_mul(
            2usize
                .saturating_mul(v)
                .saturating_add(h)
                .saturating_add(ht),
        )
        .max(1);
    let fit = (AUTO_CHUNK_BYTES / per_row).max(1);
    let rows = if fit >= AUTO_CHUNK_MULTIPLE {
        fit / AUTO_CHUNK_MULTIPLE * AUTO_CHUNK_MULTIPLE
    } else {
        fit
    };
    rows.min(n).max(1)
}

/// Fused linear divergence parameters: the divergence's, plus the logit transform and chunking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedLinearParams {
    /// Divergence kind, β, temperature, reduction, ignore_index, num_items.
    pub divergence: Params,
    /// Logits are multiplied by it (finite, > 0).
    pub logit_scale: f32,
    /// When set (> 0): logits = softcap · tanh(logits / softcap), after the scale.
    pub softcap: Option<f32>,
    /// Rows per chunk; None chooses from V and H.
    pub chunk_rows: Option<usize>,
    /// Add into the gradient buffers instead of overwriting them.
    pub accumulate: bool,
}

impl Default for FusedLinearParams {
    fn default() -> Self {
        FusedLinearParams {
            divergence: Params::default(),
            logit_scale: 1.0,
            softcap: None,
            chunk_rows: None,
            accumulate: false,
        }
    }
}

impl FusedLinearParams {
    /// Rejects out-of-range values with a message naming the parameter: the divergence
    /// parameters, `logit_scale` (finite, > 0), `softcap` (finite, > 0 when set) and
    /// `chunk_rows` (≥ 1 when set).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument), with a message naming
    /// the parameter and its range.
    pub fn validate(&self) -> Result<()> {
        self.divergence.validate()?;
        if !(self.logit_scale.is_finite() && self.logit_scale > 0.0) {
            bail!(
                InvalidArgument,
                "logit_scale must be finite and > 0, got {}",
                self.logit_scale
            );
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                bail!(
                    InvalidArgument,
                    "softcap must be finite and > 0 when set, got {c}"
                );
            }
        }
        if self.chunk_rows == Some(0) {
            bail!(InvalidArgument, "chunk_rows must be at least 1 when set");
        }
        Ok(())
    }

    /// Rows per chunk for a call of `n` rows, vocabulary `v` and hidden sizes `h` (student) and
    /// `ht` (teacher): `chunk_rows` when set, else the automatic choice from the shapes; never
    /// more than `n` nor less than 1 (so 1 for n = 0, an empty batch, which runs no chunk).
    pub fn rows_per_chunk(&self, n: usize, v: usize, h: usize, ht: usize) -> usize {
        self.chunk_rows
            .unwrap_or_else(|| chunk_rows_for(n, v, h, ht))
            .min(n)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_chunk_is_bounded_and_rounded() {
        assert_eq!(chunk_rows_for(4096, 200_064, 3072, 3072), 320);
        assert_eq!(chunk_rows_for(3, 200_064, 3072, 3072), 3);
        assert_eq!(chunk_rows_for(1 << 20, 1 << 30, 1, 1), 1);
        assert_eq!(chunk_rows_for(10, 7, 3, 5), 10);
        let p = FusedLinearParams::default();
        assert_eq!(p.rows_per_chunk(5, 7, 3, 3), 5);
        let p = FusedLinearParams {
            chunk_rows: Some(100),
            ..p
        };
        assert_eq!(p.rows_per_chunk(5, 7, 3, 3), 5);
        assert!(FusedLinearParams {
            chunk_rows: Some(0),
            ..p
        }
        .validate()
        .is_err());
    }
}
