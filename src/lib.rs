//! # distill-kernels
//!
//! Fused kernels for the math of LLM distillation: token-level forward KL, reverse KL and
//! generalized JSD over 128k–262k vocabularies, with the gradient w.r.t. the student logits, the
//! same fused with the lm_head product, MoE token dispatch and grouped-query attention —
//! exact, deterministic, on the CPU (f64 reference) or CUDA (fused kernels embedded in the
//! library, loaded at run time, no link-time CUDA dependency). [`scale_rows`] scales rows in
//! place on the device's own factors, skipping rows whose factor is exactly 1 (the backward
//! passes' `grad_output` scaling).
//!
//! Faces: this Rust API, a C ABI (`include/distill_kernels.h`, built by the workspace member
//! `capi/` as `libdistill_kernels.so` / `.a`) and a ctypes Python package (`python/`) over it,
//! all on the same [`Context`].
//!
//! ```
//! use distill_kernels::{divergence::{Divergence, Kind, Params}, Context, Launch, Matrix, MatrixMut, VectorMut};
//! let (n, v) = (2, 5);
//! let student: Vec<f32> = (0..n * v).map(|i| (i as f32 * 0.37).sin()).collect();
//! let teacher: Vec<f32> = (0..n * v).map(|i| (i as f32 * 0.91).cos()).collect();
//! let mut grad = vec![0f32; n * v];
//! let mut loss = [0f32];
//! let ctx = Context::cpu();
//! ctx.divergence(
//!     Divergence {
//!         loss: Some(VectorMut::host(&mut loss)),
//!         grad: Some(MatrixMut::host(&mut grad, n, v, v)?),
//!         ..Divergence::new(Matrix::host(&student, n, v, v)?, Matrix::host(&teacher, n, v, v)?)
//!     },
//!     &Params::new(Kind::Jsd),
//!     &Launch::default(),
//! )?;
//! assert!(loss[0] > 0.0);
//! # Ok::<(), distill_kernels::Error>(())
//! ```

#![warn(missing_docs)]
// Every fallible public function says how it fails (CI runs clippy with -D warnings).
#![warn(clippy::missing_errors_doc, clippy::missing_panics_doc)]

pub mod aligned;
pub mod attention;
mod checks;
pub mod device;
pub mod divergence;
mod element;
mod empty_batch;
pub mod error;
pub mod fused;
mod host_alloc;
pub mod moe;
mod parallel;
pub mod scale_rows;
pub mod switches;
pub mod tensor;

pub use aligned::AlignedBuf;
pub use device::{Context, Launch};
pub use error::{Error, ErrorKind, Result};
pub use tensor::{DType, Element, Location, Matrix, MatrixMut, Vector, VectorMut};

/// The `half` crate this one is built against, whose [`bf16`](half::bf16) and
/// [`f16`](half::f16) are the 16-bit [`Element`] types: `use distill_kernels::half::bf16;` needs
/// no dependency of its own (nor a matching major version).
pub use half;

/// The crate version (also returned by the C ABI's `dk_version()`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version of the C ABI built from this crate: `DK_ABI_VERSION` of
/// `include/distill_kernels.h`, returned by its `dk_abi_version()`. Raised whenever a declaration
/// of that header is added, removed or changed (the crate version does not say, before 1.0).
pub const C_ABI_VERSION: u32 = 3;

#[doc(hidden)]
pub use attention::cuda::{attention_bwd_args_layout, attention_fwd_args_layout};
#[doc(hidden)]
pub use attention::cuda::{
    wgmma_map_report, wgmma_probes, wgmma_selftest_case, WgmmaOperand, WgmmaProbe,
    WgmmaSelftestCase, WGMMA_SWEEP_OFFSETS, WGMMA_SWEEP_SMEM_BYTES,
};
#[doc(hidden)]
pub use divergence::cpu::row_divergence as reference_row_divergence;
#[doc(hidden)]
pub use divergence::cuda::divergence_args_layout;
#[doc(hidden)]
pub use moe::cuda::{moe_route_args_layout, moe_rows_args_layout};

// A `dk_context` may be shared by threads (include/distill_kernels.h): keep `Context` Send + Sync.
const _: fn() = || {
    fn shared_by_threads<T: Send + Sync>() {}
    shared_by_threads::<Context>();
};
