//! The writes of a call with nothing to compute (an empty batch: no rows, no tokens), which
//! launch no kernel: a zero loss, a zeroed weight gradient, a route's zero counts and padding
//! perm. One mechanism for every operation, so that on CUDA every operand is checked to be
//! memory of the context's device before the first write is queued (on error nothing is
//! written), and the CPU and CUDA backends write the same bytes.

use std::ffi::c_void;

use crate::device::{Backend, Context, Launch};
use crate::error::Result;

/// `rows` rows of `width` bytes, `pitch` bytes apart, every byte set to `value`; nothing when
/// the pointer is null (an absent output) or the rows are empty.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fill {
    pub what: &'static str,
    pub ptr: *mut u8,
    pub pitch: usize,
    pub width: usize,
    pub rows: usize,
    pub value: u8,
}

impl Fill {
    /// `bytes` contiguous bytes.
    pub(crate) fn bytes(what: &'static str, ptr: *mut u8, bytes: usize, value: u8) -> Self {
        Fill {
            what,
            ptr,
            pitch: bytes,
            width: bytes,
            rows: 1,
            value,
        }
    }

    fn is_empty(&self) -> bool {
        self.ptr.is_null() || self.width == 0 || self.rows == 0
    }
}

impl Context {
    /// Writes `fills` on the launch's stream (CUDA, `cuMemsetD2D8Async`) or directly (CPU),
    /// after checking, on CUDA, that every operand and fill target is memory of this device
    /// (null: absent or empty, accepted).
    ///
    /// # Safety
    /// Each non-empty fill must describe validated, writable memory at this context's
    /// location that nothing else reads or writes meanwhile.
    pub(crate) unsafe fn write_empty_outputs(
        &self,
        operands: &[(&str, *const c_void)],
        fills: &[Fill],
        launch: &Launch<'_>,
    ) -> Result<()> {
        let fills = fills.iter().filter(|f| !f.is_empty());
        match self.backend() {
            Backend::Cpu => {
                for f in fills {
                    for r in 0..f.rows {
                        // SAFETY: row r of a validated host fill (the caller's contract).
                        unsafe { f.ptr.add(r * f.pitch).write_bytes(f.value, f.width) };
                    }
                }
                Ok(())
            }
            Backend::Cuda(dev) => {
                for &(what, p) in operands {
                    dev.check_pointer(what, p)?;
                }
                for f in fills.clone() {
                    dev.check_pointer(f.what, f.ptr.cast_const().cast())?;
                }
                // SAFETY: the caller of the safe API handed a live stream of this device (or
                // null for the legacy default stream).
                let stream = unsafe { dev.borrow_stream(launch.stream) };
                for f in fills {
                    // SAFETY: validated device memory of this device (checked above).
                    unsafe {
                        cudarc::driver::sys::cuMemsetD2D8Async(
                            f.ptr as u64,
                            f.pitch,
                            f.value,
                            f.width,
                            f.rows,
                            stream.cu_stream(),
                        )
                        .result()?
                    };
                }
                Ok(())
            }
        }
    }
}
