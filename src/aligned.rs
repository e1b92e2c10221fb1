//! Host buffers whose first element sits on a 16-byte boundary, for the row-based operations
//! (MoE dispatch, attention), which require 16-byte aligned rows on every backend so that a call
//! the CPU accepts CUDA accepts too. A `Vec<f32>` only promises 4 bytes, a `Vec<bf16>` 2.

use std::fmt;
use std::ops::{Deref, DerefMut};

use crate::tensor::Element;

/// The alignment of [`AlignedBuf`]'s first element, in bytes: the row alignment of
/// [`moe::ROW_ALIGN`](crate::moe::ROW_ALIGN) and [`attention::ROW_ALIGN`](crate::attention::ROW_ALIGN).
pub const BUF_ALIGN: usize = 16;

// The buffers must satisfy every row-based operation's alignment.
const _: () =
    assert!(BUF_ALIGN % crate::moe::ROW_ALIGN == 0 && BUF_ALIGN % crate::attention::ROW_ALIGN == 0);

/// `len` elements of `T` starting on a [`BUF_ALIGN`]-byte boundary, used like a `Vec` through
/// `Deref<Target = [T]>`: pass `&buf` to [`Matrix::host`](crate::Matrix::host) and
/// `&mut buf` to [`MatrixMut::host`](crate::MatrixMut::host). With rows of a multiple of
/// 16 bytes (H a multiple of 8 for 16-bit types, of 4 for f32) every row is aligned.
///
/// ```
/// use distill_kernels::half::bf16;
/// use distill_kernels::{AlignedBuf, Matrix};
///
/// let (n, h) = (3, 64);
/// let mut x = AlignedBuf::<bf16>::zeros(n * h);
/// x[5] = bf16::from_f32(1.5);
/// assert_eq!(x.as_ptr() as usize % 16, 0);
/// let view = Matrix::host(&x, n, h, h).unwrap();
/// assert_eq!(view.rows(), n);
/// ```
pub struct AlignedBuf<T: Element> {
    storage: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Element> AlignedBuf<T> {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        Self::filled(len, T::from_f64(0.0))
    }

    /// `len` copies of `value`.
    ///
    /// # Panics
    /// If `len` elements (plus alignment slack) overflow `usize`. (Where the memory cannot be
    /// allocated the process aborts, as for a `Vec`.)
    pub fn filled(len: usize, value: T) -> Self {
        let size = std::mem::size_of::<T>();
        // Enough spare elements to reach the next boundary from any element-aligned address.
        let spare = BUF_ALIGN / size - 1;
        let total = len
            .checked_add(spare)
            .expect("AlignedBuf length overflows usize");
        let storage = vec![value; total];
        let start = storage.as_ptr().align_offset(BUF_ALIGN);
        assert!(
            start <= spare,
            "element-aligned storage is within {spare} elements of a {BUF_ALIGN}-byte boundary"
        );
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let mut buf = Self::zeros(values.len());
        buf.copy_from_slice(values);
        buf
    }
}

impl<T: Element> Deref for AlignedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl<T: Element> DerefMut for AlignedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl<T: Element> Clone for AlignedBuf<T> {
    fn clone(&self) -> Self {
        // A fresh allocation may sit at another offset from the boundary.
        Self::from_slice(self)
    }
}

impl<T: Element + fmt::Debug> fmt::Debug for AlignedBuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn check<T: Element + PartialEq + fmt::Debug>(value: T) {
        for len in [0, 1, 7, 8, 1000] {
            let mut b = AlignedBuf::<T>::filled(len, value);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0, "{len}");
            assert!(b.iter().all(|&x| x == value));
            if len > 0 {
                b[len - 1] = T::from_f64(2.0);
            }
            let c = b.clone();
            assert_eq!(c.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(&c[..], &b[..]);
        }
        assert!(AlignedBuf::<T>::zeros(5)
            .iter()
            .all(|&x| x == T::from_f64(0.0)));
    }

    #[test]
    fn starts_on_the_boundary_and_holds_what_was_put() {
        check(1.5f32);
        check(bf16::from_f32(-3.0));
        check(f16::from_f32(0.25));
    }
}
