//! MoE calls with nothing to compute, which launch no kernel: a route of no tokens (N = 0)
//! writes zero counts and offsets and a perm of padding (−1); a permute of no tokens writes zero
//! rows (its perm can only hold padding), one of no rows nothing; a combine or slot-dot of no
//! tokens has no output.

use super::{RawCombine, RawPermute, RawRoute, RawSlotDot};
use crate::device::{Backend, Context, CudaDevice, Launch};
use crate::error::{bail, Result};

/// Every operand on `dev`, as for a call with work (null: absent or empty).
fn check_pointers(dev: &CudaDevice, ptrs: &[(&str, *const u8)]) -> Result<()> {
    for &(what, p) in ptrs {
        dev.check_pointer(what, p.cast())?;
    }
    Ok(())
}

impl Context {
    /// A route of no tokens.
    pub(super) fn moe_route_empty(&self, raw: &RawRoute, launch: &Launch<'_>) -> Result<()> {
        let e = raw.e;
        match self.backend() {
            Backend::Cpu => {
                // SAFETY: validated host outputs of E, E + 1 and perm_rows entries (perm may be
                // null only when it has none).
                unsafe {
                    std::slice::from_raw_parts_mut(raw.counts, e).fill(0);
                    std::slice::from_raw_parts_mut(raw.offsets, e + 1).fill(0);
                    if raw.perm_rows > 0 {
                        std::slice::from_raw_parts_mut(raw.perm, raw.perm_rows).fill(-1);
                    }
                }
                Ok(())
            }
            Backend::Cuda(dev) => {
                check_pointers(
                    dev,
                    &[
                        ("router logits", raw.logits),
                        ("bias", raw.bias.cast()),
                        ("expert_ids", raw.expert_ids.cast_const().cast()),
                        ("weights", raw.weights.cast_const().cast()),
                        ("counts", raw.counts.cast_const().cast()),
                        ("offsets", raw.offsets.cast_const().cast()),
                        ("perm", raw.perm.cast_const().cast()),
                        ("position", raw.position.cast_const().cast()),
                    ],
                )?;
                dev.fill_rows(launch, "counts", raw.counts.cast(), 4 * e, 4 * e, 1, 0)?;
                dev.fill_rows(
                    launch,
                    "offsets",
                    raw.offsets.cast(),
                    4 * (e + 1),
                    4 * (e + 1),
                    1,
                    0,
                )?;
                let perm_bytes = 4 * raw.perm_rows;
                dev.fill_rows(
                    launch,
                    "perm",
                    raw.perm.cast(),
                    perm_bytes,
                    perm_bytes,
                    1,
                    0xFF,
                )
            }
        }
    }

    /// A permute of no tokens or of no rows.
    pub(super) fn moe_permute_empty(&self, raw: &RawPermute, launch: &Launch<'_>) -> Result<()> {
        let row_bytes = raw.h * raw.dtype.size();
        let pitch = raw.out_stride * raw.dtype.size();
        match self.backend() {
            Backend::Cpu => {
                if raw.rows == 0 {
                    return Ok(());
                }
                // SAFETY: perm holds `rows` validated host entries.
                let perm = unsafe { std::slice::from_raw_parts(raw.perm, raw.rows) };
                // No token, so no slot: every row is padding (−1), the only valid entry.
                if let Some((i, &p)) = perm.iter().enumerate().find(|&(_, &p)| p != -1) {
                    bail!(
                        InvalidArgument,
                        "perm[{i}] = {p} is outside -1..0 (N = 0 tokens: every row is padding)"
                    );
                }
                for r in 0..raw.rows {
                    // SAFETY: row r of the validated host output, `row_bytes` bytes.
                    unsafe { raw.out.add(r * pitch).write_bytes(0, row_bytes) };
                }
                Ok(())
            }
            Backend::Cuda(dev) => {
                check_pointers(
                    dev,
                    &[
                        ("x", raw.x),
                        ("perm", raw.perm.cast()),
                        ("weights", raw.weights.cast()),
                        ("out", raw.out.cast_const()),
                    ],
                )?;
                // Padding rows are zero; entries other than −1 cannot be checked without
                // reading perm on the device, and get the same zero rows.
                dev.fill_rows(launch, "out", raw.out.cast(), pitch, row_bytes, raw.rows, 0)
            }
        }
    }

    /// A combine of no tokens: no output.
    pub(super) fn moe_combine_empty(&self, raw: &RawCombine) -> Result<()> {
        match self.backend() {
            Backend::Cpu => Ok(()),
            Backend::Cuda(dev) => check_pointers(
                dev,
                &[
                    ("rows", raw.rows_in),
                    ("position", raw.position.cast()),
                    ("weights", raw.weights.cast()),
                    ("y", raw.y.cast_const()),
                ],
            ),
        }
    }

    /// A slot-dot of no tokens: no output.
    pub(super) fn moe_slot_dot_empty(&self, raw: &RawSlotDot) -> Result<()> {
        match self.backend() {
            Backend::Cpu => Ok(()),
            Backend::Cuda(dev) => check_pointers(
                dev,
                &[
                    ("tokens", raw.tokens),
                    ("rows", raw.rows_in),
                    ("position", raw.position.cast()),
                    ("slot-dot output", raw.out.cast_const().cast()),
                ],
            ),
        }
    }
}
