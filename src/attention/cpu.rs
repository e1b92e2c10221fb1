//! CPU backend of attention (stub: replaced by the f64 reference).

use super::{RawAttention, RawAttentionBackward};
use crate::error::{bail, Result};

/// Forward pass.
///
/// # Safety
/// `raw` was validated and its host pointers cover the shapes.
pub(crate) unsafe fn forward(_raw: &RawAttention) -> Result<()> {
    bail!(InvalidArgument, "attention is not implemented yet")
}

/// Backward pass.
///
/// # Safety
/// `raw` was validated and its host pointers cover the shapes.
pub(crate) unsafe fn backward(_raw: &RawAttentionBackward) -> Result<()> {
    bail!(InvalidArgument, "attention is not implemented yet")
}
