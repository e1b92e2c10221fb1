//! Tests that call the C ABI's exports from Rust: bad input (codes, messages, nothing written)
//! and the header's struct layouts. They are unit tests because this crate has no rlib for
//! integration tests to link; the C programs run from `capi/tests/c_abi.rs`.

#[path = "../../../tests/common/mod.rs"]
mod common;

mod abi_layout;
mod bad_input;
mod moe_bad_input;
mod scale_rows_bad_input;

/// `dk_version()` is the Rust crate's version (the header's macros: capi/tests/c_abi.rs).
#[test]
fn dk_version_is_the_crate_version() {
    // SAFETY: dk_version returns a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(crate::context::dk_version()) };
    assert_eq!(v.to_str().unwrap(), distill_kernels::VERSION);
}

/// `dk_cuda_archs()` lists what the build compiled, the Rust side's list joined by commas.
#[test]
fn dk_cuda_archs_is_the_build_list() {
    // SAFETY: dk_cuda_archs returns a static NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(crate::context::dk_cuda_archs()) };
    let want = distill_kernels::device::compiled_cuda_archs().join(",");
    assert_eq!(s.to_str().unwrap(), want);
    for arch in want.split(',').filter(|a| !a.is_empty()) {
        assert!(
            arch.starts_with("sm_") || arch.starts_with("compute_"),
            "{arch}"
        );
    }
}
