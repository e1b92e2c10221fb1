//! Routing parameters and the bound on the number of permuted rows.

use crate::error::{bail, Result};

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Score {
    /// Softmax over the E logits of a token (Qwen3-MoE, Mixtral).
    Softmax = 0,
    /// Element-wise sigmoid (Llama 4, DeepSeek-V3). With no bias and no group left out the
    /// selection compares the logits themselves: the exact scores' order, where f32 scores
    /// saturate at 1 from logits of ~17 (and f64 ones from ~37) and would tie.
    Sigmoid = 1,
}

impl Score {
    /// The score for a C ABI code.
    pub fn from_code(code: i32) -> Option<Score> {
        match code {
            0 => Some(Score::Softmax),
            1 => Some(Score::Sigmoid),
            _ => None,
        }
    }

    /// `softmax` or `sigmoid`.
    pub fn name(self) -> &'static str {
        match self {
            Score::Softmax => "softmax",
            Score::Sigmoid => "sigmoid",
        }
    }

    /// Parses a name as printed by [`Score::name`].
    pub fn from_name(name: &str) -> Option<Score> {
        [Score::Softmax, Score::Sigmoid]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// Routing parameters. `RouteParams::new(k)` is softmax top-k with nothing else.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteParams {
    /// Experts per token (1 ≤ k ≤ min(E, 32)).
    pub k: usize,
    /// Score function.
    pub score: Score,
    /// Divide the k weights by their sum. The ratios are exact even where the chosen scores
    /// underflow (a sigmoid of −100, a softmax probability far below the token's best): finite
    /// logits give finite weights; chosen logits all −∞ give NaN (0 / 0).
    pub renormalize: bool,
    /// Experts split into this many contiguous groups (1 = no grouping).
    pub n_groups: usize,
    /// Groups kept, ranked by the sum of their top-2 selection scores.
    pub topk_groups: usize,
    /// Weights multiplied by this (after renormalisation).
    pub scale: f32,
    /// Tokens per expert; later tokens (in token order) are dropped.
    pub capacity: Option<usize>,
    /// Each expert's segment is padded to a multiple of this (≥ 1).
    pub block: usize,
}

/// Largest k the kernels support.
pub const MAX_K: usize = 32;
/// Largest E the kernels support.
pub const MAX_EXPERTS: usize = 1024;
/// Largest hidden size H permute, combine and slot-dot accept (H must also be a multiple of 8).
pub const MAX_HIDDEN: usize = 16384;
/// Bytes every activation row start (base pointer and row stride) of permute, combine and
/// slot-dot must be a multiple of: the CUDA kernels move 16 bytes at a time, and the rule is
/// checked on every backend so a call the CPU accepts CUDA accepts too.
pub const ROW_ALIGN: usize = 16;

impl Default for RouteParams {
    /// Softmax top-1 (the C ABI's `dk_moe_route_params_default()`).
    fn default() -> Self {
        RouteParams::new(1)
    }
}

impl RouteParams {
    /// Softmax top-`k`, no bias, no grouping, no renormalisation, scale 1, no capacity, block 1.
    pub fn new(k: usize) -> Self {
        RouteParams {
            k,
            score: Score::Softmax,
            renormalize: false,
            n_groups: 1,
            topk_groups: 1,
            scale: 1.0,
            capacity: None,
            block: 1,
        }
    }

    /// Checks the parameters against `e` experts.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) (or `Shape` for a
    /// size that does not fit), with a message naming the parameter and its range.
    pub fn validate(&self, e: usize) -> Result<()> {
        if e == 0 || e > MAX_EXPERTS {
            bail!(Shape, "E = {e} experts: must be in 1..={MAX_EXPERTS}");
        }
        if self.k == 0 || self.k > e || self.k > MAX_K {
            bail!(
                InvalidArgument,
                "k = {} must be in 1..=min(E = {e}, {MAX_K})",
                self.k
            );
        }
        if self.n_groups == 0 || e % self.n_groups != 0 {
            bail!(
                InvalidArgument,
                "n_groups = {} must divide E = {e}",
                self.n_groups
            );
        }
        if self.topk_groups == 0 || self.topk_groups > self.n_groups {
            bail!(
                InvalidArgument,
                "topk_groups = {} must be in 1..=n_groups ({})",
                self.topk_groups,
                self.n_groups
            );
        }
        if self.n_groups > 1 && e / self.n_groups < 2 {
            bail!(
                InvalidArgument,
                "group scores need at least 2 experts per group (E = {e}, n_groups = {})",
                self.n_groups
            );
        }
        let kept = self.topk_groups * (e / self.n_groups);
        if self.k > kept {
            bail!(
                InvalidArgument,
                "k = {} exceeds the {kept} experts in the kept groups",
                self.k
            );
        }
        if !self.scale.is_finite() {
            bail!(InvalidArgument, "scale must be finite, got {}", self.scale);
        }
        if self.capacity == Some(0) {
            bail!(InvalidArgument, "capacity must be at least 1 (or none)");
        }
        if self.block == 0 {
            bail!(InvalidArgument, "block must be at least 1");
        }
        Ok(())
    }

    /// [`max_rows`] for `n` tokens and `e` experts with these parameters: the least number of
    /// entries [`Route::perm`](super::Route::perm) must hold.
    pub fn max_rows(&self, n: usize, e: usize) -> usize {
        max_rows(n, e, self.k, self.block, self.capacity)
    }
}

/// Upper bound on the permuted rows `R = offsets[E]`: `K + min(E, K)·(block − 1)` with
/// `K = min(N·k, E·capacity)` the slots kept, saturating at `usize::MAX` (such a bound is
/// rejected by the operations, whose row indices are 32-bit). Only an expert that receives a
/// slot has a segment to pad, and at most `min(E, K)` do: a decode step of DeepSeek-V3 (N = 1,
/// k = 8 of E = 256, block 128) needs 1024 rows, where `K + E·(block − 1)` said 32520.
pub fn max_rows(n: usize, e: usize, k: usize, block: usize, capacity: Option<usize>) -> usize {
    let slots = n.saturating_mul(k);
    let kept = match capacity {
        Some(c) => slots.min(e.saturating_mul(c)),
        None => slots,
    };
    let padded = e.min(kept);
    kept.saturating_add(padded.saturating_mul(block.saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_rows_bound() {
        assert_eq!(max_rows(10, 4, 2, 1, None), 20);
        assert_eq!(max_rows(10, 4, 2, 8, None), 20 + 28);
        // Only experts that receive a slot are padded: at most min(E, kept) of them.
        assert_eq!(max_rows(1, 256, 8, 128, None), 8 * 128);
        assert_eq!(max_rows(3, 256, 8, 128, Some(1)), 24 * 128);
        assert_eq!(max_rows(0, 256, 8, 128, None), 0);
        assert_eq!(max_rows(10, 4, 2, 1, Some(3)), 12);
        assert_eq!(max_rows(10, 4, 2, 1, Some(300)), 20);
        assert_eq!(max_rows(usize::MAX, 4, 2, 1, None), usize::MAX);
        assert_eq!(max_rows(1, 4, 1, usize::MAX, None), usize::MAX);
        assert_eq!(RouteParams::new(3).max_rows(5, 8), 15);
    }

    #[test]
    fn validate_rejects_out_of_range() {
        let ok = RouteParams::new(2);
        assert!(ok.validate(8).is_ok());
        for (p, e) in [
            (RouteParams::new(0), 8),
            (RouteParams::new(9), 8),
            (RouteParams::new(33), 64),
            (RouteParams { n_groups: 3, ..ok }, 8),
            (
                RouteParams {
                    n_groups: 4,
                    topk_groups: 5,
                    ..ok
                },
                8,
            ),
            (
                RouteParams {
                    n_groups: 8,
                    topk_groups: 1,
                    ..ok
                },
                8,
            ),
            (
                RouteParams {
                    k: 5,
                    n_groups: 4,
                    topk_groups: 2,
                    ..ok
                },
                8,
            ),
            (
                RouteParams {
                    scale: f32::NAN,
                    ..ok
                },
                8,
            ),
            (
                RouteParams {
                    capacity: Some(0),
                    ..ok
                },
                8,
            ),
            (RouteParams { block: 0, ..ok }, 8),
            (ok, 0),
            (ok, MAX_EXPERTS + 1),
        ] {
            assert!(p.validate(e).is_err(), "{p:?} with E = {e}");
        }
    }
}
