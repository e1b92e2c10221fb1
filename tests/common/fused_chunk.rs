//! The fused linear divergence's chunk kernels (cuda/divergence.cu `dk_div_fused_*`, one block
//! per row; cuda/divergence_persistent.cu `dk_divcp_fused_*` / `dk_divcp256_fused_*`, clusters
//! walking rows): f32 soft-capped logits S and T of a chunk in; per-row losses and G, the
//! gradient w.r.t. the raw (uncapped) logits in the GEMMs' dtype, out. Their f64 reference row,
//! the logits the emulator tests draw and the tolerances (DESIGN.md).

use distill_kernels::divergence::Kind;
use distill_kernels::DType;

use super::{naive_row, poison_f32, Rng};

/// What a chunk kernel's row depends on beyond its logits.
#[derive(Debug, Clone, Copy)]
pub struct ChunkParams {
    pub kind: Kind,
    pub beta: f32,
    pub temperature: f32,
    /// d(reduced loss)/d(row loss): what `args.scale` points at (the fused path passes 1).
    pub scale: f32,
    /// The softcap (the logits given are already capped).
    pub cap: Option<f32>,
}

impl ChunkParams {
    /// The kernels' `inv_cap` argument: 1 / cap, 0 without a softcap.
    pub fn inv_cap(&self) -> f32 {
        self.cap.map_or(0.0, |c| 1.0 / c)
    }
}

/// Per-row losses: relative error at most `LOSS_TOL`, with ‖ref‖ floored at `LOSS_FLOOR` (as
/// tests/kernel_sim's per-row check: a KL of two O(1) terms that cancel to ~1e-3 carries f32's
/// ~1e-7 absolute error; a 13-entry reverse-KL row at T = 0.7: loss 3.2e-3, off by 1.7e-7).
pub const LOSS_TOL: f64 = 1e-5;
pub const LOSS_FLOOR: f64 = 0.1;

/// G: relative norm error against the reference rounded to G's dtype (f16 G of a long row is
/// largely subnormal, 1e-2 off before any kernel error otherwise).
pub fn g_tol(out: DType) -> f64 {
    if out == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// A capped student logit: 3 · N(0, 1), through cap · tanh(x / cap) under a softcap (so within
/// (−cap, cap), as the softcap pass leaves it).
pub fn capped_logit(rng: &mut Rng, cap: Option<f32>) -> f32 {
    let z = 3.0 * rng.normal();
    match cap {
        Some(c) => (c as f64 * (z / c as f64).tanh()) as f32,
        None => z as f32,
    }
}

/// Loss and G of one row from the definitions (f64): `naive_row` of s / T and t / T, its
/// gradient times scale / T and the softcap's slope (1 − u)(1 + u), u = s / cap, of the capped
/// logit s (not rounded to G's dtype). An ignored row: 0 and zeros.
pub fn reference_row(p: &ChunkParams, ignored: bool, s: &[f32], t: &[f32]) -> (f64, Vec<f64>) {
    if ignored {
        return (0.0, vec![0.0; s.len()]);
    }
    let inv_t = 1.0 / p.temperature as f64;
    let scaled = |x: &[f32]| x.iter().map(|&e| e as f64 * inv_t).collect::<Vec<f64>>();
    let (loss, grad) = naive_row(p.kind, p.beta as f64, &scaled(s), &scaled(t));
    let factor = p.scale as f64 * inv_t;
    let g = grad
        .into_iter()
        .zip(s)
        .map(|(d, &x)| {
            let slope = p.cap.map_or(1.0, |c| {
                let u = x as f64 / c as f64;
                (1.0 - u) * (1.0 + u)
            });
            d * factor * slope
        })
        .collect();
    (loss, g)
}

/// A chunk's capped logits S and T: `n` rows of `v` with row stride `ld`, the padding
/// poisoned. The teacher is the student plus N(0, 0.5²) noise, as in self-distillation; without
/// a softcap ~1 % of the entries are masked (−inf) on a side where the divergence stays finite:
/// the teacher's for forward KL (p = 0), the student's for reverse KL (q = 0), either for JSD
/// (under a softcap there are none: the softcap pass maps −inf to −cap). `student_low_bits`,
/// when given, replaces the low 16 bits of every student logit before the teacher's is drawn
/// from it (a test of 16-bit G written over S can then tell written elements from old bits).
pub fn chunk_logits(
    rng: &mut Rng,
    kind: Kind,
    cap: Option<f32>,
    (n, v, ld): (usize, usize, usize),
    student_low_bits: Option<u16>,
) -> (Vec<f32>, Vec<f32>) {
    let mut s = vec![poison_f32(); n * ld];
    let mut t = vec![poison_f32(); n * ld];
    for r in 0..n {
        for j in 0..v {
            let mut x = capped_logit(rng, cap);
            if let Some(low) = student_low_bits {
                x = f32::from_bits((x.to_bits() & 0xFFFF_0000) | low as u32);
            }
            let (i, y) = (r * ld + j, x + (0.5 * rng.normal()) as f32);
            (s[i], t[i]) = (x, y);
            if cap.is_none() && rng.uniform() < 0.01 {
                let student = match kind {
                    Kind::ForwardKl => false,
                    Kind::ReverseKl => true,
                    Kind::Jsd => rng.uniform() < 0.5,
                };
                if student {
                    s[i] = f32::NEG_INFINITY;
                } else {
                    t[i] = f32::NEG_INFINITY;
                }
            }
        }
    }
    (s, t)
}
