//! CUDA backend of attention: launchers of the tensor-core kernels in `cuda/attention_*.cu`.

mod backward;
mod forward;

pub(crate) use backward::{backward, backward_workspace_size};
pub(crate) use forward::forward;

/// Kernels the attention launchers use (loaded from the fatbin when a device opens).
pub(crate) const KERNEL_NAMES: [&[&str]; 2] = [forward::KERNEL_NAMES, backward::KERNEL_NAMES];
