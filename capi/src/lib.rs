//! The C ABI of distill-kernels (`include/distill_kernels.h`), built as `libdistill_kernels.so`
//! and `libdistill_kernels.a`: one status enum, a thread-local last-error message, and a panic
//! boundary on every export. One file per operation, each a thin layer over the Rust crate.
//!
//! Conventions: every function returns `dk_status`; on error nothing has been written and
//! `dk_last_error()` says why. Pointers are host memory on a CPU context and device memory of
//! the context's device on a CUDA context. Streams are the caller's (`cudaStream_t`/`CUstream`,
//! NULL = the legacy default stream).
//!
//! This is a crate of its own (not crate types of `distill-kernels`) so that Rust programs
//! depending on `distill-kernels` do not build a cdylib and a staticlib with it.

#![warn(missing_docs)]
#![warn(clippy::missing_errors_doc, clippy::missing_panics_doc)]

pub mod attention;
pub mod context;
pub mod divergence;
pub mod error;
pub mod fused;
pub mod moe;
pub mod scale_rows;

use std::panic::{catch_unwind, AssertUnwindSafe};

use distill_kernels::device::Context;
use distill_kernels::error::{Error, ErrorKind, Result};

/// Returns early with an error of the given kind and a formatted message (the Rust crate's).
pub(crate) use distill_kernels::__dk_bail as bail;

/// Status codes returned by every C function (`dk_status`).
pub type DkStatus = i32;
/// Success.
pub const DK_OK: DkStatus = 0;

/// Runs `f` behind the panic boundary: maps its error (or a caught panic) to a status code and
/// records the message for `dk_last_error`.
pub(crate) fn boundary(f: impl FnOnce() -> Result<()>) -> DkStatus {
    let outcome = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::new(ErrorKind::Panic, what))
    });
    match outcome {
        Ok(()) => {
            error::clear();
            DK_OK
        }
        Err(e) => {
            let code = e.kind() as DkStatus;
            error::set(&e);
            code
        }
    }
}

/// Copies the struct behind a C pointer, rejecting null with a message that names it.
///
/// # Safety
/// `p` must be null or point to a valid `T`.
pub(crate) unsafe fn read_arg<T: Copy>(what: &str, p: *const T) -> Result<T> {
    if p.is_null() {
        return Err(Error::new(
            ErrorKind::NullPointer,
            format!("{what} is null"),
        ));
    }
    // SAFETY: non-null and, by the caller's contract, a valid `T`; read unaligned because the
    // argument structs' alignment is the caller's C compiler's business, not a checked rule.
    Ok(unsafe { p.read_unaligned() })
}

/// Checks a single-value output pointer before anything is computed: non-null, and aligned to
/// its type as the header asks of every pointer (a misaligned write would be undefined
/// behaviour here, not just slow).
pub(crate) fn check_out<T>(what: &str, p: *mut T) -> Result<()> {
    if p.is_null() {
        return Err(Error::new(
            ErrorKind::NullPointer,
            format!("{what} is null"),
        ));
    }
    if !p.is_aligned() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{what} is not aligned to {} bytes",
                std::mem::align_of::<T>()
            ),
        ));
    }
    Ok(())
}

/// Converts a C size to `usize`, rejecting negatives.
pub(crate) fn to_usize(what: &str, x: i64) -> Result<usize> {
    usize::try_from(x)
        .map_err(|_| Error::new(ErrorKind::Shape, format!("{what} must be >= 0, got {x}")))
}

/// The body of a `dk_*_workspace_size` export: checks `ctx` and then `bytes` for null, computes
/// the size with `size` and writes it to `bytes`, behind the panic boundary.
///
/// # Safety
/// `ctx` null or a live context; `bytes` null or valid for one write.
pub(crate) unsafe fn write_workspace_size(
    ctx: *const context::DkContext,
    bytes: *mut usize,
    size: impl FnOnce(&Context) -> Result<usize>,
) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context::context(ctx)? };
        check_out("bytes (output)", bytes)?;
        let n = size(c)?;
        // SAFETY: checked non-null and aligned.
        unsafe { *bytes = n };
        Ok(())
    })
}

#[cfg(test)]
mod tests;
