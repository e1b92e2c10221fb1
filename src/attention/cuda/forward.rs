//! Launcher of the attention forward kernel (stub).

use crate::attention::RawAttention;
use crate::device::{CudaDevice, Launch};
use crate::error::{bail, Result};

/// Kernels this file launches.
pub(crate) const KERNEL_NAMES: &[&str] = &[];

/// Forward pass on the caller's stream.
pub(crate) fn forward(_dev: &CudaDevice, _raw: &RawAttention, _launch: &Launch<'_>) -> Result<()> {
    bail!(NoDevice, "attention kernels are not built yet")
}
