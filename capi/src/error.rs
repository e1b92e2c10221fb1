//! The thread-local message of the last failed call (`dk_last_error`).
//!
//! Every access goes through `try_with`: a `dk_` call made while its thread exits (a
//! `pthread_key_create` destructor that destroys the thread's context, say) may find the
//! thread-local already torn down, and `with` would then panic outside the panic boundary,
//! aborting the process. Such a call keeps its status; only its message is lost.

use std::cell::RefCell;
use std::ffi::{c_char, CString};

use distill_kernels::error::Error;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Shown by `dk_last_error` on a thread whose message storage is already gone.
const UNAVAILABLE: &std::ffi::CStr = c"(no message: the thread is exiting)";

pub(crate) fn set(e: &Error) {
    let text = e.to_string().replace('\0', " ");
    let _ = LAST_ERROR.try_with(|m| *m.borrow_mut() = CString::new(text).unwrap_or_default());
}

pub(crate) fn clear() {
    let _ = LAST_ERROR.try_with(|m| *m.borrow_mut() = CString::default());
}

/// The message of the last failed call on this thread ("" after a success). The pointer stays
/// valid until the next `dk_` call on the same thread.
#[no_mangle]
pub extern "C" fn dk_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|m| m.borrow().as_ptr())
        .unwrap_or(UNAVAILABLE.as_ptr())
}
