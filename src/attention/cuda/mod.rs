//! CUDA backend of attention: launchers of the tensor-core kernels in `cuda/attention_*.cu`.

mod backward;
mod forward;
mod selftest;
mod selftest_probe;
mod shape;

#[doc(hidden)]
pub use backward::attention_bwd_args_layout;
pub(crate) use backward::{backward, backward_workspace_size};
#[doc(hidden)]
pub use forward::attention_fwd_args_layout;
pub(crate) use forward::forward;
#[doc(hidden)]
pub use selftest::{wgmma_selftest_case, WgmmaSelftestCase};
#[doc(hidden)]
pub use selftest_probe::{
    wgmma_map_report, wgmma_probes, WgmmaOperand, WgmmaProbe, WGMMA_SWEEP_OFFSETS,
    WGMMA_SWEEP_SMEM_BYTES,
};

/// The value of an attention switch (`DK_ATTENTION_FWD`, `DK_ATTENTION_BWD`): which kernel
/// family the call asks for. What each means, and its fallback where the device lacks the
/// family, is the launcher's (`forward::choose`, `backward::family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requested {
    /// Unset: wgmma where the device has it, else the mma.sync kernels.
    Default,
    /// `mma`: the mma.sync kernels of 4 warps everywhere.
    Mma,
    /// `wide`: the wide mma.sync kernels where the device accepted them.
    Wide,
    /// `wgmma`: the value of the A/B runs before wgmma became the default.
    Wgmma,
}

/// The switch `name`'s value (read once per process by `crate::switches`).
fn requested(name: &str) -> Requested {
    match crate::switches::value(name) {
        Some("mma") => Requested::Mma,
        Some("wide") => Requested::Wide,
        Some("wgmma") => Requested::Wgmma,
        _ => Requested::Default,
    }
}

/// Kernels the attention launchers use (loaded from the fatbin when a device opens).
pub(crate) const KERNEL_NAMES: [&[&str]; 3] = [
    forward::KERNEL_NAMES,
    backward::KERNEL_NAMES,
    selftest::KERNEL_NAMES,
];

/// The distinct attention kernels this process launched, for [`kernels_used`].
static USED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

/// Records a launched kernel (once per name).
fn note_kernel(name: &'static str) {
    let mut used = USED.lock().unwrap_or_else(|p| p.into_inner());
    if !used.contains(&name) {
        used.push(name);
    }
}

/// The forward, dK/dV and deterministic dQ kernels the attention calls of this process ran (e.g.
/// `dk_attn_fwd_bf16_d128g`, `dk_attn_bwd_dkdvg_bf16_d128`), in first-use order: benchmarks print
/// them, so that a run (the default: wgmma on Hopper, or an A/B run with
/// `DK_ATTENTION_FWD=mma|wide|wgmma`, `DK_ATTENTION_BWD=mma|wide|wgmma`) says what it measured.
pub fn kernels_used() -> Vec<&'static str> {
    USED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Which attention kernels beyond the mma.sync defaults a device accepted when it opened (their
/// dynamic shared memory is above the default 48 KB): the wgmma kernels serve calls by default
/// only then, and `DK_ATTENTION_FWD=wide` / `DK_ATTENTION_BWD=wide` select the wide ones only
/// then.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WideKernels {
    /// The D = 128 split forward (`dk_attn_fwd_*_d128w`, 81 KiB).
    pub forward: bool,
    /// The 128-key dK/dV kernels (`dk_attn_bwd_dkdv{,dq}w_*`, up to 161 KiB).
    pub backward: bool,
    /// The Hopper wgmma forward (`dk_attn_fwd_*_d{64,128}g`, up to 161 KiB; compute capability
    /// 9.0 only): the default forward where accepted.
    pub wgmma_forward: bool,
    /// The Hopper wgmma dK/dV and dQ kernels (`dk_attn_bwd_{dkdvg,dqg}_*`, up to 130 KiB;
    /// compute capability 9.0 only): the default backward, both modes, where accepted.
    pub wgmma_backward: bool,
}

/// Opts the attention kernels into their dynamic shared memory, once when a device opens. An
/// error for an mma.sync default kernel fails the open; a refused wide or wgmma kernel is only
/// never selected (the mma.sync kernels serve its calls).
pub(crate) fn configure(
    functions: &std::collections::HashMap<&'static str, cudarc::driver::CudaFunction>,
    compute_capability: (i32, i32),
) -> crate::error::Result<WideKernels> {
    Ok(WideKernels {
        backward: backward::configure(functions)?,
        forward: forward::configure(functions),
        wgmma_forward: forward::configure_wgmma(functions, compute_capability),
        wgmma_backward: backward::configure_wgmma(functions, compute_capability),
    })
}
