//! Borrowed views of matrices and vectors, on the host or on a CUDA device.
//!
//! A view is a pointer plus dtype, shape, row stride and where the memory lives. Safe constructors
//! borrow a host slice (and check its length); `from_raw` constructors are `unsafe` and used by the
//! C ABI and for device memory owned by another library (PyTorch).

use std::marker::PhantomData;

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

pub use crate::element::Element;

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
    /// Borrows a host slice as a matrix.
    ///
    /// # Errors
    /// [`ErrorKind::Shape`] if the slice is too short for the shape or
    /// the stride is below `cols`.
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
    /// `ptr` must be valid for reads of `span` elements of `dtype` at `location`, where span is
    /// `(rows - 1) * row_stride + cols` (0 for an empty view), or null (the operations reject a
    /// null view of any element; one of none, as an empty tensor's, is accepted), and not be
    /// written through another path while the view is used. Valid for `'a`
    /// and, for CUDA memory, until the work queued on the stream of every call that used the
    /// view has completed: the calls return once their work is queued.
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
    ///
    /// # Errors
    /// [`ErrorKind::Shape`] if the slice is too short for the shape or
    /// the stride is below `cols`.
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
    /// `ptr` must be valid for reads and writes of `span` elements of `dtype` at `location`,
    /// where span is `(rows - 1) * row_stride + cols` (0 for an empty view), or null (the
    /// operations reject a null view of any element; one of none is accepted), with no other
    /// access while the view is used (the divergence's gradient over the student logits is the
    /// one exception, through [`crate::divergence::DivergenceInPlace`]). Valid for `'a` and, for
    /// CUDA memory, until the work queued on the stream of every call that used the view has
    /// completed: the calls return once their work is queued.
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
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        self.location
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
    /// `ptr` must be valid for reads of `len` elements at `location` (or null: rejected unless
    /// `len` is 0) for `'a` and, for CUDA memory, until the work queued on the stream of
    /// every call that used the view has completed (the calls return once it is queued).
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
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        self.location
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
    /// `ptr` must be valid for reads and writes of `len` elements at `location` (or null:
    /// rejected unless `len` is 0) for `'a` and, for CUDA memory, until the work queued on the stream
    /// of every call that used the view has completed (the calls return once it is queued), with
    /// no other access while the view is used.
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
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        self.location
    }
    /// A read-only view of the same memory, borrowed from this one.
    pub fn as_vector(&self) -> Vector<'_, T> {
        Vector {
            ptr: self.ptr.cast_const(),
            len: self.len,
            location: self.location,
            _borrow: PhantomData,
        }
    }
}
