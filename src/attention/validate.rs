//! Validation of attention calls (stub: replaced by the full checks).

use super::{Attention, AttentionBackward, AttentionParams, RawAttention, RawAttentionBackward};
use crate::device::Context;
use crate::error::{bail, Result};

impl RawAttention {
    /// Checks a forward call and lowers it to raw pointers; nothing is written.
    pub(crate) fn validate(
        _ctx: &Context,
        _call: &Attention<'_>,
        params: &AttentionParams,
    ) -> Result<Self> {
        params.validate()?;
        bail!(InvalidArgument, "attention is not implemented yet")
    }
}

impl RawAttentionBackward {
    /// Checks a backward call and lowers it to raw pointers; nothing is written.
    pub(crate) fn validate(
        _ctx: &Context,
        _call: &AttentionBackward<'_>,
        params: &AttentionParams,
    ) -> Result<Self> {
        params.validate()?;
        bail!(InvalidArgument, "attention is not implemented yet")
    }
}
