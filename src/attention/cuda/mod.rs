//! CUDA backend of attention: launchers of the tensor-core kernels in `cuda/attention_*.cu`.

mod backward;
mod forward;

pub(crate) use backward::{backward, backward_workspace_size};
pub(crate) use forward::forward;

/// Kernels this module launches (loaded from the fatbin when a device opens).
pub(crate) const KERNEL_NAMES: &[&str] = &[];
