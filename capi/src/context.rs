//! Context lifetime, version and device queries.

use std::ffi::{c_char, CString};
use std::sync::OnceLock;

use super::{boundary, DkStatus};
use crate::bail;
use distill_kernels::device::{compiled_cuda_archs, cuda_device_count, Context};
use distill_kernels::Result;

/// Opaque handle of a [`Context`] (`dk_context` in C).
pub struct DkContext {
    pub(crate) inner: Context,
}

/// Borrows the context behind a handle, rejecting null.
///
/// # Safety
/// `ctx` must be null or a handle from `dk_context_create` not yet destroyed.
pub(crate) unsafe fn context<'a>(ctx: *const DkContext) -> Result<&'a Context> {
    if ctx.is_null() {
        bail!(NullPointer, "context is null");
    }
    // SAFETY: non-null and, by the caller's contract, a live handle.
    Ok(unsafe { &(*ctx).inner })
}

/// The library version, `"MAJOR.MINOR.PATCH"` (static storage).
#[no_mangle]
pub extern "C" fn dk_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The C ABI's version, `DK_ABI_VERSION` of `include/distill_kernels.h`: raised whenever a
/// declaration of the header is added, removed or changed (a unit test keeps the two equal and
/// fails when the declarations change without it). Kept in the Rust crate, where `dk info`
/// reads it too.
pub const ABI_VERSION: u32 = distill_kernels::C_ABI_VERSION;

/// The `DK_ABI_VERSION` this library was built with: a C program compares it with the header it
/// was compiled against before its first call.
#[no_mangle]
pub extern "C" fn dk_abi_version() -> u32 {
    ABI_VERSION
}

/// 64-bit FNV-1a of `bytes` (at compile time: the header's fingerprint).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// The fingerprint of the C header this library was built with.
const HEADER_HASH: u64 = fnv1a(include_bytes!("../../include/distill_kernels.h"));

/// 64-bit FNV-1a of the bytes of `include/distill_kernels.h` as this library was built: a binding
/// that has the header (the Python package in a checkout) compares it to catch a stale library
/// of the same version number but another ABI.
#[no_mangle]
pub extern "C" fn dk_header_hash() -> u64 {
    HEADER_HASH
}

/// The GPU architectures whose kernels are compiled into this library, comma-separated
/// (`"sm_80,sm_90a,sm_100,sm_120,compute_80"`, static storage), or `""` for a library built
/// without `nvcc` (its CUDA contexts are refused).
#[no_mangle]
pub extern "C" fn dk_cuda_archs() -> *const c_char {
    static ARCHS: OnceLock<CString> = OnceLock::new();
    ARCHS
        .get_or_init(|| CString::new(compiled_cuda_archs().join(",")).unwrap_or_default())
        .as_ptr()
}

/// Number of CUDA devices present (0 without a driver).
#[no_mangle]
pub extern "C" fn dk_cuda_device_count() -> i32 {
    std::panic::catch_unwind(cuda_device_count).map_or(0, |n| n as i32)
}

/// Creates a context: `device = -1` for the CPU, `n >= 0` for CUDA device `n`.
///
/// # Safety
/// `out` must be null (rejected) or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn dk_context_create(device: i32, out: *mut *mut DkContext) -> DkStatus {
    boundary(|| {
        crate::check_out("out (context handle)", out)?;
        let ctx = Box::new(DkContext {
            inner: Context::new(device)?,
        });
        // SAFETY: checked non-null and aligned; the caller owns the handle until dk_context_destroy.
        unsafe { *out = Box::into_raw(ctx) };
        Ok(())
    })
}

/// Destroys a context (NULL is a no-op). Work queued on streams must not depend on it afterwards.
///
/// # Safety
/// `ctx` must be null or a handle from `dk_context_create`, destroyed once.
#[no_mangle]
pub unsafe extern "C" fn dk_context_destroy(ctx: *mut DkContext) -> DkStatus {
    boundary(|| {
        if !ctx.is_null() {
            // SAFETY: the handle came from Box::into_raw in dk_context_create.
            drop(unsafe { Box::from_raw(ctx) });
        }
        Ok(())
    })
}

/// Writes the context's device (-1 for the CPU) to `out`.
///
/// # Safety
/// `ctx` must be null or a live handle; `out` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn dk_context_device(ctx: *const DkContext, out: *mut i32) -> DkStatus {
    boundary(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { context(ctx)? };
        crate::check_out("out", out)?;
        let dev = c.cuda_device().map_or(-1, |d| d.ordinal() as i32);
        // SAFETY: checked non-null and aligned.
        unsafe { *out = dev };
        Ok(())
    })
}
