//! Launchers of the attention backward kernels (stub).

use crate::attention::RawAttentionBackward;
use crate::device::{CudaDevice, Launch};
use crate::error::{bail, Result};

/// Kernels this file launches.
pub(crate) const KERNEL_NAMES: &[&str] = &[];

/// Device workspace the backward needs.
pub(crate) fn backward_workspace_size(_raw: &RawAttentionBackward) -> usize {
    0
}

/// Backward pass on the caller's stream.
pub(crate) fn backward(
    _dev: &CudaDevice,
    _raw: &RawAttentionBackward,
    _launch: &Launch<'_>,
) -> Result<()> {
    bail!(NoDevice, "attention kernels are not built yet")
}
