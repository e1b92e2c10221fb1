//! CPU backend of the row scaling: rows split over threads, each element's product in f32 and
//! rounded once to the dtype (as the CUDA kernel does), rows with factor exactly 1 not touched.

use half::{bf16, f16};

use super::RawScaleRows;
use crate::parallel::{for_each_range, Shared};
use crate::tensor::DType;

/// An element type widened to f32 (exactly) and rounded back from f32 (to nearest, ties to even;
/// NaN stays NaN, overflow gives infinity), as the kernel's conversions do: the product is
/// rounded to f32 first, as the kernel's, not formed exactly in f64 as `tensor::Element`'s round
/// trip would (that would be the better answer, and not the kernel's bits).
trait F32Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl F32Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl F32Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl F32Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Scales the rows of `raw.x` by their factors.
///
/// # Safety
/// The pointers of `raw` must be valid host memory for the shapes it describes (validated by
/// `RawScaleRows::validate`), the factors disjoint from `x` and not written during the call.
pub(crate) unsafe fn scale_rows(raw: &RawScaleRows) {
    unsafe fn typed<T: F32Elem>(raw: &RawScaleRows) {
        // SAFETY: the workers only read the factors and each writes only the rows of its range.
        let shared = unsafe { Shared::new(*raw) };
        for_each_range(raw.n, raw.v, |range| {
            let raw = shared.get();
            for i in range {
                // SAFETY: i < n, so i · factor_stride is within the validated factor span.
                let f = unsafe { *raw.factors.add(i * raw.factor_stride) };
                if f == 1.0 {
                    continue; // exactly 1: the identity, the row is not touched
                }
                // SAFETY: row i of x spans v elements from i · stride, owned by this range.
                let row = unsafe {
                    std::slice::from_raw_parts_mut(raw.x.cast::<T>().add(i * raw.stride), raw.v)
                };
                for e in row {
                    *e = T::from_f32(e.to_f32() * f);
                }
            }
        });
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match raw.dtype {
            DType::F32 => typed::<f32>(raw),
            DType::BF16 => typed::<bf16>(raw),
            DType::F16 => typed::<f16>(raw),
        }
    }
}
