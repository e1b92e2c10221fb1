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
