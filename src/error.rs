//! One error type for the whole crate, and the status codes the C ABI returns for it.

use std::fmt;

/// What went wrong, coarsely: the C ABI returns this as its status code (`dk_status`).
/// Non-exhaustive: new kinds may be added (as `OutOfMemory` was), so a `match` needs a `_` arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A required pointer was null.
    NullPointer = 1,
    /// A parameter is out of range (β outside [0, 1], temperature ≤ 0, …).
    InvalidArgument = 2,
    /// Shapes, lengths or strides do not fit together, or operands overlap where they may not.
    Shape = 3,
    /// A dtype the operation does not accept.
    UnsupportedDtype = 4,
    /// No usable CUDA driver or device for a CUDA context, or the library was built without kernels.
    NoDevice = 5,
    /// A pointer lives on another device (or on the host where device memory is needed).
    WrongDevice = 6,
    /// The caller's workspace is smaller than `*_workspace_size` asked for.
    WorkspaceTooSmall = 7,
    /// The CUDA driver returned an error.
    Cuda = 8,
    /// A panic was caught at the C boundary (a bug: please report it).
    Panic = 9,
    /// The host could not allocate the CPU backend's working memory (its f64 copies of large
    /// operands); nothing was written.
    OutOfMemory = 10,
}

impl ErrorKind {
    /// The stable name used in messages and in the C header.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NullPointer => "null pointer",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Shape => "shape or layout mismatch",
            ErrorKind::UnsupportedDtype => "unsupported dtype",
            ErrorKind::NoDevice => "no device",
            ErrorKind::WrongDevice => "wrong device",
            ErrorKind::WorkspaceTooSmall => "workspace too small",
            ErrorKind::Cuda => "CUDA error",
            ErrorKind::Panic => "internal panic",
            ErrorKind::OutOfMemory => "out of memory",
        }
    }
}

impl fmt::Display for ErrorKind {
    /// The stable name ([`ErrorKind::name`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error with its kind and a message that says which argument was wrong and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// The kind (the C status code).
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.message)
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::new(ErrorKind::Cuda, e.to_string())
    }
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The `# Errors` section every operation's documentation shares (`#[doc =
/// crate::error::call_errors_doc!()]`): the rules are the same for each call, so they are
/// written once.
macro_rules! call_errors_doc {
    () => {
        "# Errors\n\
         Refused before anything is queued or written, with the [`ErrorKind`](crate::ErrorKind) \
         naming the rule: `NullPointer`, `Shape` (sizes, strides, overlapping outputs), \
         `UnsupportedDtype`, `InvalidArgument` (parameters, alignment), `WrongDevice` (memory \
         not where the context expects it), `WorkspaceTooSmall`; `OutOfMemory` where the CPU \
         backend cannot allocate its working copies; `Cuda` where the driver refuses to queue \
         the work; `NoDevice` where a library the call needs cannot be loaded (cuBLAS, for the \
         fused linear divergence on CUDA)."
    };
}
pub(crate) use call_errors_doc;

/// Returns early with an error of the given kind and a formatted message. Exported (hidden) for
/// the C ABI crate, `capi/`, which uses it as its own `bail!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __dk_bail {
    ($kind:ident, $($fmt:tt)+) => {
        return Err($crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($fmt)+)))
    };
}
pub(crate) use crate::__dk_bail as bail;
