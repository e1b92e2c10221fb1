//! MoE calls with nothing to compute, which launch no kernel (crate::empty_batch writes their
//! outputs): a route of no tokens (N = 0) writes zero counts and offsets and a perm of padding
//! (−1); a permute of no tokens writes zero rows (its perm can only hold padding), one of no
//! rows nothing; a combine or slot-dot of no tokens has no output; the backward passes, what
//! their primitives do.

use super::{RawCombine, RawCombineBackward, RawPermute, RawPermuteBackward, RawRoute, RawSlotDot};
use crate::device::{Backend, Context, Launch};
use crate::empty_batch::Fill;
use crate::error::{bail, Result};

impl Context {
    /// A route of no tokens.
    pub(super) fn moe_route_empty(&self, raw: &RawRoute, launch: &Launch<'_>) -> Result<()> {
        let operands = [
            ("router logits", raw.logits.cast()),
            ("bias", raw.bias.cast()),
            ("expert_ids", raw.expert_ids.cast_const().cast()),
            ("weights", raw.weights.cast_const().cast()),
            ("position", raw.position.cast_const().cast()),
        ];
        let fills = [
            Fill::bytes("counts", raw.counts.cast(), 4 * raw.e, 0),
            Fill::bytes("offsets", raw.offsets.cast(), 4 * (raw.e + 1), 0),
            Fill::bytes("perm", raw.perm.cast(), 4 * raw.perm_rows, 0xFF), // −1
        ];
        // SAFETY: validated outputs of E, E + 1 and perm_rows i32 at this context's location.
        unsafe { self.write_empty_outputs(&operands, &fills, launch) }
    }

    /// A permute of no tokens or of no rows.
    pub(super) fn moe_permute_empty(&self, raw: &RawPermute, launch: &Launch<'_>) -> Result<()> {
        if matches!(self.backend(), Backend::Cpu) && raw.rows > 0 {
            // SAFETY: perm holds `rows` validated host entries.
            let perm = unsafe { std::slice::from_raw_parts(raw.perm, raw.rows) };
            // No token, so no slot: every row is padding (−1), the only valid entry. (CUDA
            // cannot read perm without a sync; it writes the same zero rows.)
            if let Some((i, &p)) = perm.iter().enumerate().find(|&(_, &p)| p != -1) {
                bail!(
                    InvalidArgument,
                    "perm[{i}] = {p} is not -1 (N = 0 tokens: every row is padding)"
                );
            }
        }
        let operands = [
            ("x", raw.x.cast()),
            ("perm", raw.perm.cast()),
            ("weights", raw.weights.cast()),
        ];
        let size = raw.dtype.size();
        let rows = Fill {
            what: "out",
            ptr: raw.out,
            pitch: raw.out_stride * size,
            width: raw.h * size,
            rows: raw.rows,
            value: 0,
        };
        // SAFETY: the validated [rows, H] output at this context's location.
        unsafe { self.write_empty_outputs(&operands, &[rows], launch) }
    }

    /// A combine of no tokens: no output.
    pub(super) fn moe_combine_empty(&self, raw: &RawCombine, launch: &Launch<'_>) -> Result<()> {
        let operands = [
            ("rows", raw.rows_in.cast()),
            ("position", raw.position.cast()),
            ("weights", raw.weights.cast()),
            ("y", raw.y.cast_const().cast()),
        ];
        // SAFETY: no fills.
        unsafe { self.write_empty_outputs(&operands, &[], launch) }
    }

    /// A slot-dot of no tokens: no output.
    pub(super) fn moe_slot_dot_empty(&self, raw: &RawSlotDot, launch: &Launch<'_>) -> Result<()> {
        let operands = [
            ("tokens", raw.tokens.cast()),
            ("rows", raw.rows_in.cast()),
            ("position", raw.position.cast()),
            ("slot-dot output", raw.out.cast_const().cast()),
        ];
        // SAFETY: no fills.
        unsafe { self.write_empty_outputs(&operands, &[], launch) }
    }

    /// A permute backward of no tokens: no output (the combine's and slot-dot's).
    pub(super) fn moe_permute_backward_empty(
        &self,
        raw: &RawPermuteBackward,
        launch: &Launch<'_>,
    ) -> Result<()> {
        self.moe_combine_empty(&raw.combine, launch)?;
        match &raw.dot {
            Some(dot) => self.moe_slot_dot_empty(dot, launch),
            None => Ok(()),
        }
    }

    /// A combine backward of no tokens (zero rows of gradient, as the permute of no tokens
    /// writes) or of no rows (no output; without rows every slot must be dropped, and the
    /// weights' gradient needs rows, so validation refused that case with grad_weights).
    pub(super) fn moe_combine_backward_empty(
        &self,
        raw: &RawCombineBackward,
        launch: &Launch<'_>,
    ) -> Result<()> {
        let p = &raw.permute;
        if matches!(self.backend(), Backend::Cpu) && p.n > 0 {
            // SAFETY: position holds n·k validated host entries.
            let position = unsafe { std::slice::from_raw_parts(raw.position, p.n * p.k) };
            if let Some((i, &v)) = position.iter().enumerate().find(|&(_, &v)| v != -1) {
                bail!(
                    InvalidArgument,
                    "position[{i}] = {v} is not -1 (no permuted rows: every slot is dropped)"
                );
            }
        }
        if let Some(dot) = &raw.dot {
            self.moe_slot_dot_empty(dot, launch)?;
        }
        self.moe_permute_empty(p, launch)
    }
}
