//! Host working memory of the CPU backends, allocated so that a refusal is an error for the
//! caller ([`ErrorKind::OutOfMemory`]), not an abort of its process: the f64 reference widens
//! rows (and, in the fused operation, whole operands) to 8 bytes per value.

use crate::error::{Error, ErrorKind, Result};

/// An empty vector with room for `len` values, or [`ErrorKind::OutOfMemory`] naming `what` (a
/// phrase such as "the CPU divergence's f64 rows") and the size where the host refuses it.
pub(crate) fn with_capacity<T>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "could not allocate {:.2} GiB for {what}",
                len as f64 * std::mem::size_of::<T>() as f64 / (1u64 << 30) as f64
            ),
        )
    })?;
    Ok(out)
}

/// `len` copies of `value`, or [`ErrorKind::OutOfMemory`] as [`with_capacity`].
pub(crate) fn filled<T: Copy>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut out = with_capacity(len, what)?;
    out.resize(len, value);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_allocation_is_an_out_of_memory_error() {
        let err = filled(usize::MAX / 16, 0.0f64, "a test buffer").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfMemory);
        assert!(err.to_string().contains("for a test buffer"), "{err}");
        assert_eq!(filled(3, 7u8, "three bytes").unwrap(), vec![7u8; 3]);
    }
}
