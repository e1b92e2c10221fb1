//! Borrowed views of matrices and vectors, on the host or on a CUDA device.
//!
//! A view is a pointer plus dtype, shape, row stride and where the memory lives. Safe constructors
//! borrow a host slice (and check its length); `from_raw` constructors are `unsafe` and used by the
//! C ABI and for device memory owned by another library (PyTorch).

use std::marker::PhantomData;

use half::{bf16, f16};

use crate::error::{bail, Error, ErrorKind, Result};

/// Element types of logits and gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum DType {
    /// IEEE binary32.
    F32 = 0,
    /// bfloat16.
    BF16 = 1,
    /// IEEE binary16.
    F16 = 2,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Short lowercase name (`f32`, `bf16`, `f16`), as used in kernel names and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// The dtype for a C ABI code, if it is one.
    pub fn from_code(code: i32) -> Option<DType> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::BF16),
            2 => Some(DType::F16),
            _ => None,
        }
    }

    /// Every dtype, for tests and benchmarks.
    pub const ALL: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
}

/// A floating-point element type the kernels read and write.
pub trait Element: Copy + Send + Sync + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64;
    /// Rounds from f64 to nearest, ties to even (correctly rounded: one rounding of the exact
    /// value; NaN stays NaN, overflow gives infinity).
    fn from_f64(x: f64) -> Self;
}

/// `x` rounded to f32 "to odd": truncated toward zero, with the last mantissa bit set when
/// that lost anything. Rounding the result to nearest-even into a format at least two bits
/// narrower (bf16, f16, over their whole ranges, subnormals included) gives `x` correctly
/// rounded: the odd bit stands for the discarded bits, so no tie is invented or lost. `half`'s
/// own `from_f64` drops the low 32 bits of the f64 first and so rounds some values just above
/// a tie down (about one bf16 value in 16 000, one f16 value in 2 000).
fn round_to_odd_f32(x: f64) -> f32 {
    let y = x as f32; // nearest; exact for NaN, ±inf, ±0 and values f32 holds
    if x.is_nan() || y as f64 == x {
        return y;
    }
    let mut bits = y.to_bits();
    if (y as f64).abs() > x.abs() {
        bits -= 1; // y rounded away from zero (up to inf on overflow): its neighbour toward zero
    }
    f32::from_bits(bits | 1)
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f32(round_to_odd_f32(x))
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f32(round_to_odd_f32(x))
    }
}

/// Where a view's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// Host memory.
    Host,
    /// Device memory of the CUDA device with this ordinal.
    Cuda(usize),
}

/// Bytes a `rows × cols` matrix of `elem_size`-byte elements, rows `row_stride` elements apart,
/// spans (0 when empty), or a shape error naming `what` where that count overflows or exceeds
/// `isize::MAX`, which no allocation can: a stride that wraps the arithmetic must not make a
/// view look small.
pub(crate) fn span_bytes(
    what: &str,
    rows: usize,
    cols: usize,
    row_stride: usize,
    elem_size: usize,
) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(row_stride)
        .and_then(|e| e.checked_add(cols))
        .and_then(|e| e.checked_mul(elem_size))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Shape,
                format!("{what}: {rows} rows of stride {row_stride} exceed the addressable range"),
            )
        })
}

fn check_host_matrix(
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    elem_size: usize,
) -> Result<()> {
    if row_stride < cols {
        bail!(
            Shape,
            "row stride {row_stride} is smaller than the row length {cols}"
        );
    }
    let need = span_bytes("matrix", rows, cols, row_stride, elem_size)? / elem_size;
    if len < need {
        bail!(
            Shape,
            "a {rows} x {cols} matrix with row stride {row_stride} needs {need} elements, the slice has {len}"
        );
    }
    Ok(())
}

/// A read-only row-major matrix view: `rows × cols`, rows `row_stride` elements apart.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub(crate) ptr: *const u8,
    pub(crate) dtype: DType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) location: Location,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: a view is a borrowed pointer; the borrow rules of its constructor make sharing sound.
unsafe impl Send for Matrix<'_> {}
// SAFETY: as above, read-only.
unsafe impl Sync for Matrix<'_> {}

impl<'a> Matrix<'a> {
    /// Borrows a host slice as a matrix; errors if the slice is too short or the stride too small.
    pub fn host<T: Element>(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Result<Self> {
        check_host_matrix(data.len(), rows, cols, row_stride, T::DTYPE.size())?;
        Ok(Matrix {
            ptr: data.as_ptr().cast(),
            dtype: T::DTYPE,
            rows,
            cols,
            row_stride,
            location: Location::Host,
            _borrow: PhantomData,
        })
    }

    /// Wraps a raw pointer.
    ///
    /// # Safety
    /// `ptr` must be valid for reads of `span` elements of `dtype` at `location` (or null, which
    /// the operations reject) for the lifetime `'a`, and not be written through another path while
    /// the view is used.
    pub unsafe fn from_raw(
        ptr: *const u8,
        dtype: DType,
        rows: usize,
        cols: usize,
        row_stride: usize,
        location: Location,
    ) -> Self {
        Matrix {
            ptr,
            dtype,
            rows,
            cols,
            row_stride,
            location,
            _borrow: PhantomData,
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns (the vocabulary size for logits).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Elements between the starts of consecutive rows.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        self.location
    }
}

/// A writable row-major matrix view.
#[derive(Debug)]
pub struct MatrixMut<'a> {
    pub(crate) ptr: *mut u8,
    pub(crate) dtype: DType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) location: Location,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: the view holds the unique borrow its constructor took.
unsafe impl Send for MatrixMut<'_> {}

impl<'a> MatrixMut<'a> {
    /// Mutably borrows a host slice as a matrix.
    pub fn host<T: Element>(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Result<Self> {
        check_host_matrix(data.len(), rows, cols, row_stride, T::DTYPE.size())?;
        Ok(MatrixMut {
            ptr: data.as_mut_ptr().cast(),
            dtype: T::DTYPE,
            rows,
            cols,
            row_stride,
            location: Location::Host,
            _borrow: PhantomData,
        })
    }

    /// Wraps a raw pointer.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `span` elements of `dtype` at `location` (or
    /// null, which the operations reject) for `'a`, with no other access while the view is used.
    pub unsafe fn from_raw(
        ptr: *mut u8,
        dtype: DType,
        rows: usize,
        cols: usize,
        row_stride: usize,
        location: Location,
    ) -> Self {
        MatrixMut {
            ptr,
            dtype,
            rows,
            cols,
            row_stride,
            location,
            _borrow: PhantomData,
        }
    }

    /// A read-only view of the same memory, borrowed from this one.
    pub fn as_matrix(&self) -> Matrix<'_> {
        Matrix {
            ptr: self.ptr,
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            location: self.location,
            _borrow: PhantomData,
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Elements between the starts of consecutive rows.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }
}

/// A read-only contiguous vector view of `T`.
#[derive(Debug, Clone, Copy)]
pub struct Vector<'a, T> {
    pub(crate) ptr: *const T,
    pub(crate) len: usize,
    pub(crate) location: Location,
    _borrow: PhantomData<&'a [T]>,
}

// SAFETY: a shared borrow of plain data.
unsafe impl<T: Sync> Send for Vector<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Vector<'_, T> {}

impl<'a, T> Vector<'a, T> {
    /// Borrows a host slice.
    pub fn host(data: &'a [T]) -> Self {
        Vector {
            ptr: data.as_ptr(),
            len: data.len(),
            location: Location::Host,
            _borrow: PhantomData,
        }
    }

    /// Wraps a raw pointer.
    ///
    /// # Safety
    /// `ptr` must be valid for reads of `len` elements at `location` (or null, which the
    /// operations reject) for `'a`.
    pub unsafe fn from_raw(ptr: *const T, len: usize, location: Location) -> Self {
        Vector {
            ptr,
            len,
            location,
            _borrow: PhantomData,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A writable contiguous vector view of `T`.
#[derive(Debug)]
pub struct VectorMut<'a, T> {
    pub(crate) ptr: *mut T,
    pub(crate) len: usize,
    pub(crate) location: Location,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: the view holds the unique borrow its constructor took.
unsafe impl<T: Send> Send for VectorMut<'_, T> {}

impl<'a, T> VectorMut<'a, T> {
    /// Mutably borrows a host slice.
    pub fn host(data: &'a mut [T]) -> Self {
        VectorMut {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            location: Location::Host,
            _borrow: PhantomData,
        }
    }

    /// Wraps a raw pointer.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` elements at `location` (or null, which
    /// the operations reject) for `'a`, with no other access while the view is used.
    pub unsafe fn from_raw(ptr: *mut T, len: usize, location: Location) -> Self {
        VectorMut {
            ptr,
            len,
            location,
            _borrow: PhantomData,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that `r` (of a format with the given bits ↔ f64 maps) is `x` rounded to nearest,
    /// ties to even, against the two neighbours of `r` (differences with a neighbour of `x` are
    /// exact in f64).
    fn check_nearest(x: f64, r_bits: u16, to_f64: impl Fn(u16) -> f64, what: &str) {
        let r = to_f64(r_bits);
        if x.is_nan() {
            assert!(r.is_nan(), "{what}: {x:e} -> {r:e}");
            return;
        }
        if r.is_infinite() {
            // Overflow: x is beyond the largest finite value by at least half its ulp.
            let max_bits = (r_bits & 0x8000) | ((r_bits & 0x7FFF) - 1);
            let max = to_f64(max_bits);
            let prev = to_f64(max_bits - 1);
            assert!(
                (x - max).abs() >= (max - prev).abs() / 2.0,
                "{what}: {x:e} -> inf"
            );
            return;
        }
        let d = (x - r).abs();
        for nb in [r_bits.wrapping_add(1), r_bits.wrapping_sub(1)] {
            let n = to_f64(nb);
            if n.is_nan() || n.is_infinite() || (n == 0.0 && r == 0.0) {
                continue;
            }
            let dn = (x - n).abs();
            assert!(
                d < dn || (d == dn && r_bits & 1 == 0),
                "{what}: {x:e} -> {r:e} (bits {r_bits:#06x}) but {n:e} is nearer or the even tie"
            );
        }
    }

    #[test]
    fn from_f64_is_correctly_rounded_for_16_bit_formats() {
        let bf = |b: u16| bf16::from_bits(b).to_f64();
        let hf = |b: u16| f16::from_bits(b).to_f64();
        // Just above a tie: half's own from_f64 drops the low 32 bits of x and rounds these down.
        let above = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(<bf16 as Element>::from_f64(above).to_bits(), 0x3F81);
        assert_eq!(<bf16 as Element>::from_f64(-above).to_bits(), 0xBF81);
        let above = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(<f16 as Element>::from_f64(above).to_bits(), 0x3C01);
        // Exact ties go to even, and just below a tie rounds down.
        assert_eq!(
            <bf16 as Element>::from_f64(1.0 + 2f64.powi(-8)).to_bits(),
            0x3F80
        );
        assert_eq!(
            <bf16 as Element>::from_f64(1.0 + 3.0 * 2f64.powi(-8)).to_bits(),
            0x3F82
        );
        assert_eq!(
            <bf16 as Element>::from_f64(1.0 + 2f64.powi(-8) - 2f64.powi(-40)).to_bits(),
            0x3F80
        );
        // Specials.
        assert!(<bf16 as Element>::from_f64(f64::NAN).is_nan());
        assert_eq!(<bf16 as Element>::from_f64(1e300).to_bits(), 0x7F80);
        assert_eq!(<f16 as Element>::from_f64(-1e10).to_bits(), 0xFC00);
        assert_eq!(<f16 as Element>::from_f64(-0.0).to_bits(), 0x8000);
        assert_eq!(<bf16 as Element>::from_f64(1e-300).to_bits(), 0x0000);
        // Random values over each format's range (normal, subnormal, near overflow), with their
        // low bits random so that near-ties occur at all distances.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        for i in 0..400_000 {
            let u = next();
            // A random 16-bit pattern's value, then a random offset of up to one of its ulps,
            // and sometimes exactly half an ulp.
            let (fmt_bits, to): (u16, &dyn Fn(u16) -> f64) = if i % 2 == 0 {
                ((u >> 48) as u16, &bf)
            } else {
                ((u >> 48) as u16, &hf)
            };
            let base = to(fmt_bits & 0x7FFE);
            let next_up = to((fmt_bits & 0x7FFE) + 1);
            if !base.is_finite() || !next_up.is_finite() {
                continue;
            }
            let frac = match u & 7 {
                0 => 0.5,
                1 => 0.5 + f64::EPSILON * 4.0,
                2 => 0.5 - f64::EPSILON * 4.0,
                _ => (u & 0xFFFF_FFFF) as f64 / 2f64.powi(32),
            };
            let mut x = base + (next_up - base) * frac;
            if u & 8 != 0 {
                x = -x;
            }
            if i % 2 == 0 {
                check_nearest(x, <bf16 as Element>::from_f64(x).to_bits(), bf, "bf16");
            } else {
                check_nearest(x, <f16 as Element>::from_f64(x).to_bits(), hf, "f16");
            }
        }
    }
}
