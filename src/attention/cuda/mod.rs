//! CUDA backend of attention: launchers of the tensor-core kernels in `cuda/attention_*.cu`.

mod backward;
mod forward;
mod shape;

#[doc(hidden)]
pub use backward::attention_bwd_args_layout;
pub use backward::dkdv_kernels_used;
pub(crate) use backward::{backward, backward_workspace_size, configure};
#[doc(hidden)]
pub use forward::attention_fwd_args_layout;
pub(crate) use forward::forward;

/// Kernels the attention launchers use (loaded from the fatbin when a device opens).
pub(crate) const KERNEL_NAMES: [&[&str]; 2] = [forward::KERNEL_NAMES, backward::KERNEL_NAMES];
