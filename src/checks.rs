//! Validation checks shared by the operations' `validate` modules: a view's location against
//! the context's, null pointers, and output regions disjoint from inputs and from each other.

use crate::device::Context;
use crate::error::{bail, Result};
use crate::tensor::Location;

/// A view must live where the context runs.
pub(crate) fn check_location(ctx: &Context, what: &str, location: Location) -> Result<()> {
    if location != ctx.location() {
        bail!(
            WrongDevice,
            "{what} is in {location:?} memory but the context runs on {:?}",
            ctx.location()
        );
    }
    Ok(())
}

/// A required pointer must not be null.
pub(crate) fn check_non_null<T>(what: &str, ptr: *const T) -> Result<()> {
    if ptr.is_null() {
        bail!(NullPointer, "{what} pointer is null");
    }
    Ok(())
}

/// The memory an operand touches, named for error messages.
pub(crate) trait Footprint {
    /// The operand's name.
    fn what(&self) -> &str;
    /// Whether some byte lies in both footprints.
    fn overlaps(&self, other: &Self) -> bool;
}

/// Every output must be disjoint from every input and from every other output.
pub(crate) fn check_disjoint<F: Footprint>(outputs: &[F], inputs: &[F]) -> Result<()> {
    for (i, out) in outputs.iter().enumerate() {
        if let Some(input) = inputs.iter().find(|s| out.overlaps(s)) {
            bail!(
                Shape,
                "{} output overlaps the {} input",
                out.what(),
                input.what()
            );
        }
        if let Some(other) = outputs[i + 1..].iter().find(|s| out.overlaps(s)) {
            bail!(
                Shape,
                "{} output overlaps the {} output",
                out.what(),
                other.what()
            );
        }
    }
    Ok(())
}

/// A `num_items` held in memory (the `batchmean` divisor of the divergence and fused calls): one
/// 4-byte aligned f32 where the context runs. Returns its pointer, or null when absent.
pub(crate) fn num_items_pointer(
    ctx: &Context,
    view: Option<&crate::tensor::Vector<'_, f32>>,
) -> Result<*const f32> {
    let Some(d) = view else {
        return Ok(std::ptr::null());
    };
    check_location(ctx, "num_items", d.location)?;
    check_non_null("num_items", d.ptr)?;
    if d.len != 1 {
        bail!(
            Shape,
            "num_items must hold exactly 1 element, it has {}",
            d.len
        );
    }
    if d.ptr as usize % 4 != 0 {
        bail!(
            InvalidArgument,
            "num_items pointer {:#x} is not aligned to its 4-byte element",
            d.ptr as usize
        );
    }
    Ok(d.ptr)
}

/// The bytes an operand touches: `rows` runs of `row_bytes` bytes, `stride_bytes` apart, from
/// `start` (128-bit arithmetic: nothing overflows).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    pub(crate) what: &'static str,
    pub(crate) start: u128,
    pub(crate) rows: u128,
    pub(crate) row_bytes: u128,
    pub(crate) stride_bytes: u128,
}

impl Region {
    /// `rows` rows of `cols` elements of `elem` bytes, `stride` elements apart, from `ptr`.
    pub(crate) fn matrix(
        what: &'static str,
        ptr: *const u8,
        (rows, cols, stride): (usize, usize, usize),
        elem: usize,
    ) -> Region {
        Region {
            what,
            start: ptr as usize as u128,
            rows: rows as u128,
            row_bytes: cols as u128 * elem as u128,
            stride_bytes: stride as u128 * elem as u128,
        }
    }

    /// `bytes` contiguous bytes from `ptr` (empty where `ptr` is null).
    pub(crate) fn bytes(what: &'static str, ptr: *const u8, bytes: usize) -> Region {
        Region::matrix(what, ptr, (usize::from(!ptr.is_null()), bytes, bytes), 1)
    }

    fn is_empty(&self) -> bool {
        self.rows == 0 || self.row_bytes == 0
    }

    /// One past the last byte (= `start` when empty).
    pub(crate) fn end(&self) -> u128 {
        if self.is_empty() {
            self.start
        } else {
            self.start + (self.rows - 1) * self.stride_bytes + self.row_bytes
        }
    }
}

impl Footprint for Region {
    fn what(&self) -> &str {
        self.what
    }

    /// Whether some byte lies in both regions. Exact when the two share a stride (or either has
    /// a single row); otherwise the byte ranges are compared.
    fn overlaps(&self, other: &Region) -> bool {
        if self.is_empty() || other.is_empty() {
            return false;
        }
        if self.start >= other.end() || other.start >= self.end() {
            return false;
        }
        let period = match (self.rows, other.rows) {
            (1, 1) => return true,
            (1, _) => other.stride_bytes,
            (_, 1) => self.stride_bytes,
            _ if self.stride_bytes == other.stride_bytes => self.stride_bytes,
            _ => return true,
        };
        if period == 0 {
            return true;
        }
        // Rows i of self and j of other share a byte iff, with m = i − j and d = other − self,
        // d − len(self) < m·period < d + len(other); m ranges over −(rows(other) − 1) ..= rows(self) − 1.
        let s = period as i128;
        let d = other.start as i128 - self.start as i128;
        let lo = (d - self.row_bytes as i128).div_euclid(s) + 1;
        let hi = (d + other.row_bytes as i128 - 1).div_euclid(s);
        let lo = lo.max(1 - other.rows as i128);
        let hi = hi.min(self.rows as i128 - 1);
        lo <= hi
    }
}

#[cfg(test)]
mod tests {
    use super::{Footprint, Region};

    fn mat(start: u128, rows: u128, row_bytes: u128, stride_bytes: u128) -> Region {
        Region {
            what: "m",
            start,
            rows,
            row_bytes,
            stride_bytes,
        }
    }

    /// Byte-by-byte overlap, for comparison.
    fn brute(a: &Region, b: &Region) -> bool {
        let bytes = |r: &Region| {
            let mut s = std::collections::BTreeSet::new();
            for i in 0..r.rows {
                for c in 0..r.row_bytes {
                    s.insert(r.start + i * r.stride_bytes + c);
                }
            }
            s
        };
        !bytes(a).is_disjoint(&bytes(b))
    }

    #[test]
    fn overlap_is_exact_for_equal_strides() {
        let mut cases = 0;
        for sa in 0..40u128 {
            for sb in 0..40u128 {
                for (ra, rb) in [(1, 1), (1, 3), (3, 1), (2, 4), (4, 4), (0, 3)] {
                    for (la, lb) in [(8, 8), (16, 8), (8, 24), (40, 8)] {
                        // Same stride 16 when both have several rows (row lengths up to it),
                        // any lengths when one is a single row.
                        let stride = 16u128;
                        if (ra > 1 && la > stride) || (rb > 1 && lb > stride) {
                            continue;
                        }
                        let a = mat(sa, ra, la, stride);
                        let b = mat(sb, rb, lb, stride);
                        assert_eq!(a.overlaps(&b), brute(&a, &b), "{a:?} {b:?}");
                        assert_eq!(b.overlaps(&a), brute(&a, &b), "{b:?} {a:?}");
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 1000);
    }

    #[test]
    fn different_strides_compare_ranges() {
        // Interleaved but of different strides: reported (conservative).
        let a = mat(0, 4, 8, 32);
        let b = mat(8, 2, 8, 64);
        assert!(!brute(&a, &b));
        assert!(a.overlaps(&b));
        // Disjoint ranges: never reported.
        let c = mat(1000, 2, 8, 64);
        assert!(!a.overlaps(&c));
    }
}
