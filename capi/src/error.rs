//! The thread-local message of the last failed call (`dk_last_error`).

use std::cell::RefCell;
use std::ffi::{c_char, CString};

use distill_kernels::error::Error;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set(e: &Error) {
    let text = e.to_string().replace('\0', " ");
    LAST_ERROR.with(|m| *m.borrow_mut() = CString::new(text).unwrap_or_default());
}

pub(crate) fn clear() {
    LAST_ERROR.with(|m| *m.borrow_mut() = CString::default());
}

/// The message of the last failed call on this thread ("" after a success). The pointer stays
/// valid until the next `dk_` call on the same thread.
#[no_mangle]
pub extern "C" fn dk_last_error() -> *const c_char {
    LAST_ERROR.with(|m| m.borrow().as_ptr())
}
