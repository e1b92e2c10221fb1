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
