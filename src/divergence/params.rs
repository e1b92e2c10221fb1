//! Parameters of the divergence and their validation.

use crate::error::{bail, Result};

/// Which divergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Kind {
    /// KL(teacher ‖ student) = Σ p (log p − log q).
    ForwardKl = 0,
    /// KL(student ‖ teacher) = Σ q (log q − log p).
    ReverseKl = 1,
    /// Generalized Jensen–Shannon divergence with weight `beta` on the teacher.
    Jsd = 2,
}

impl Kind {
    /// The kind for a C ABI code.
    pub fn from_code(code: i32) -> Option<Kind> {
        match code {
            0 => Some(Kind::ForwardKl),
            1 => Some(Kind::ReverseKl),
            2 => Some(Kind::Jsd),
            _ => None,
        }
    }

    /// The name used by the CLI and Python (`forward_kl`, `reverse_kl`, `jsd`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::ForwardKl => "forward_kl",
            Kind::ReverseKl => "reverse_kl",
            Kind::Jsd => "jsd",
        }
    }

    /// Parses a name as printed by [`Kind::name`].
    pub fn from_name(name: &str) -> Option<Kind> {
        [Kind::ForwardKl, Kind::ReverseKl, Kind::Jsd]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// How per-row losses are reduced to the scalar loss (and so how the gradient is scaled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Reduction {
    /// Sum over valid rows divided by max(1, number of valid rows), or by `num_items` when given.
    BatchMean = 0,
    /// Sum over rows.
    Sum = 1,
    /// Per-row values are the result; the scalar loss is their sum and the gradient is its gradient.
    None = 2,
}

impl Reduction {
    /// The reduction for a C ABI code.
    pub fn from_code(code: i32) -> Option<Reduction> {
        match code {
            0 => Some(Reduction::BatchMean),
            1 => Some(Reduction::Sum),
            2 => Some(Reduction::None),
            _ => None,
        }
    }

    /// The name used by the CLI and Python (`batchmean`, `sum`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Reduction::BatchMean => "batchmean",
            Reduction::Sum => "sum",
            Reduction::None => "none",
        }
    }
}

/// Divergence parameters. `Params::default()` is forward KL, T = 1, batchmean, ignore_index −100
/// (as the C ABI's `dk_divergence_params_default`); the Python functions default to JSD, β = 0.5.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Which divergence.
    pub kind: Kind,
    /// Teacher weight of the JSD mixture, in [0, 1] (checked for every kind, used by JSD only).
    pub beta: f32,
    /// Softmax temperature, finite and > 0; the gradient includes the 1/T of the chain rule.
    pub temperature: f32,
    /// Rows whose label equals this are skipped (only when labels are given).
    pub ignore_index: i64,
    /// Reduction of the per-row losses.
    pub reduction: Reduction,
    /// Divisor that replaces the count of valid rows for `batchmean` (gradient accumulation):
    /// finite and at least `f32::MIN_POSITIVE` (2^-126), else the call is refused.
    pub num_items: Option<f32>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            kind: Kind::ForwardKl,
            beta: 0.5,
            temperature: 1.0,
            ignore_index: -100,
            reduction: Reduction::BatchMean,
            num_items: None,
        }
    }
}

impl Params {
    /// Parameters of `kind` with everything else at its default.
    pub fn new(kind: Kind) -> Self {
        Params {
            kind,
            ..Params::default()
        }
    }

    /// Rejects out-of-range values with a message naming the parameter.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument), with a message naming
    /// the parameter and its range.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.beta) {
            bail!(InvalidArgument, "beta must be in [0, 1], got {}", self.beta);
        }
        // The CUDA kernels scale by log2(e) / T in f32: a subnormal T makes it infinite (already
        // below about 4.25e-39) and the rows NaN, where the CPU's f64 gives a finite result. A
        // normal T (>= f32::MIN_POSITIVE, 1.18e-38) keeps it below 1.3e38.
        if !(self.temperature.is_finite() && self.temperature >= f32::MIN_POSITIVE) {
            bail!(
                InvalidArgument,
                "temperature must be finite and at least f32::MIN_POSITIVE (1.1754944e-38), got {}",
                self.temperature
            );
        }
        if let Some(n) = self.num_items {
            // A subnormal divisor's f32 reciprocal overflows: refused like 0.
            if !(n.is_finite() && n >= f32::MIN_POSITIVE) {
                bail!(
                    InvalidArgument,
                    "num_items must be finite and at least f32::MIN_POSITIVE (1.1754944e-38), got {n}"
                );
            }
            self.num_items_reduction()?;
        }
        Ok(())
    }

    /// `num_items`, in either form, is the divisor of `batchmean` only.
    fn num_items_reduction(&self) -> Result<()> {
        if self.reduction != Reduction::BatchMean {
            bail!(
                InvalidArgument,
                "num_items only applies to reduction=batchmean (got {})",
                self.reduction.name()
            );
        }
        Ok(())
    }

    /// Checks a `num_items` given in memory (`in_memory`: the call's `num_items` view) against
    /// these parameters: it needs `batchmean` and replaces [`Params::num_items`].
    pub(crate) fn check_num_items_in_memory(&self, in_memory: bool) -> Result<()> {
        if !in_memory {
            return Ok(());
        }
        if let Some(n) = self.num_items {
            bail!(
                InvalidArgument,
                "num_items is given twice: {n} in the parameters and a value in memory"
            );
        }
        self.num_items_reduction()
    }

    /// The divergence actually computed: JSD with β = 0 is forward KL, with β = 1 reverse KL.
    pub fn effective_kind(&self) -> Kind {
        match self.kind {
            Kind::Jsd if self.beta == 0.0 => Kind::ForwardKl,
            Kind::Jsd if self.beta == 1.0 => Kind::ReverseKl,
            k => k,
        }
    }
}
