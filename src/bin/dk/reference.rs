//! The benchmark's own f64 reference of one divergence row, written from the textbook formulas
//! (log-softmax of each side, the KL sums, the softmax Jacobian for the gradient) and sharing no
//! code with the library: on the CPU the backend under test is the library's f64 row function,
//! so checking it against that same function would prove nothing.

use distill_kernels::divergence::Kind;

/// log-softmax of `x` and its probabilities; `None` when every entry is −inf (a fully masked
/// side) or one is NaN.
fn log_softmax(x: &[f64]) -> Option<(Vec<f64>, Vec<f64>)> {
    if x.iter().any(|v| v.is_nan()) {
        return None;
    }
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return None;
    }
    // (v − m) − ln Σ, not v − (m + ln Σ): where a whole row sits at a finite mask (m ≈ −3.4e38)
    // m + ln Σ rounds back to m.
    let ln_sum = x.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
    let logp: Vec<f64> = x.iter().map(|&v| (v - m) - ln_sum).collect();
    let p = logp.iter().map(|l| l.exp()).collect();
    Some((logp, p))
}

/// Σ_i x_i (lx_i − ly_i) over the entries with x_i > 0 (0 · log 0 = 0).
fn kl(x: &[f64], lx: &[f64], ly: &[f64]) -> f64 {
    (0..x.len())
        .filter(|&i| x[i] > 0.0)
        .map(|i| x[i] * (lx[i] - ly[i]))
        .sum()
}

/// The divergence of one row of student logits `b` and teacher logits `a` (both already divided
/// by the temperature) and, into `grad`, its gradient w.r.t. `b`. `kind` is the effective kind
/// (JSD with β strictly between 0 and 1). A fully masked side gives 0; a NaN gives NaN.
pub fn divergence_row(kind: Kind, beta: f64, b: &[f64], a: &[f64], grad: &mut [f64]) -> f64 {
    let (Some((lq, q)), Some((lp, p))) = (log_softmax(b), log_softmax(a)) else {
        let nan = b.iter().chain(a).any(|v| v.is_nan());
        let fill = if nan { f64::NAN } else { 0.0 };
        grad.iter_mut().for_each(|g| *g = fill);
        return fill;
    };
    // dL/db_j = q_j (g_j − Σ_i q_i g_i) for a loss with dL/dq_i = g_i (softmax Jacobian).
    let through_softmax = |g: &dyn Fn(usize) -> f64, grad: &mut [f64]| {
        let qg: f64 = (0..q.len())
            .filter(|&i| q[i] > 0.0)
            .map(|i| q[i] * g(i))
            .sum();
        for (j, out) in grad.iter_mut().enumerate() {
            *out = if q[j] > 0.0 { q[j] * (g(j) - qg) } else { 0.0 };
        }
    };
    match kind {
        Kind::ForwardKl => {
            // L = Σ p (log p − log q); dL/db = q − p.
            for (j, out) in grad.iter_mut().enumerate() {
                *out = q[j] - p[j];
            }
            kl(&p, &lp, &lq)
        }
        Kind::ReverseKl => {
            // L = Σ q (log q − log p); dL/dq_i = log q_i − log p_i + 1.
            through_softmax(&|i| lq[i] - lp[i] + 1.0, grad);
            kl(&q, &lq, &lp)
        }
        Kind::Jsd => {
            // L = β KL(p‖m) + (1 − β) KL(q‖m), m = βp + (1 − β)q; dL/dq_i = (1 − β) log(q_i / m_i).
            let lm: Vec<f64> = (0..q.len())
                .map(|i| (beta * p[i] + (1.0 - beta) * q[i]).ln())
                .collect();
            through_softmax(&|i| (1.0 - beta) * (lq[i] - lm[i]), grad);
            beta * kl(&p, &lp, &lm) + (1.0 - beta) * kl(&q, &lq, &lm)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences of the loss against the analytic gradient, every kind.
    #[test]
    fn gradient_matches_finite_differences() {
        let b: Vec<f64> = (0..7).map(|i| (i as f64 * 0.7).sin() * 2.0).collect();
        let a: Vec<f64> = (0..7).map(|i| (i as f64 * 1.3).cos() * 1.5).collect();
        for (kind, beta) in [
            (Kind::ForwardKl, 0.5),
            (Kind::ReverseKl, 0.5),
            (Kind::Jsd, 0.3),
        ] {
            let mut g = vec![0.0; 7];
            let loss = divergence_row(kind, beta, &b, &a, &mut g);
            assert!(loss > 0.0);
            for j in 0..7 {
                let h = 1e-6;
                let mut bp = b.clone();
                bp[j] += h;
                let mut bm = b.clone();
                bm[j] -= h;
                let mut scratch = vec![0.0; 7];
                let fd = (divergence_row(kind, beta, &bp, &a, &mut scratch)
                    - divergence_row(kind, beta, &bm, &a, &mut scratch))
                    / (2.0 * h);
                assert!(
                    (fd - g[j]).abs() < 1e-7,
                    "{kind:?} entry {j}: {fd} vs {}",
                    g[j]
                );
            }
        }
    }

    /// The same row against the library's row function (a different implementation).
    #[test]
    fn agrees_with_the_library_row_function() {
        let b: Vec<f64> = (0..300).map(|i| (i as f64 * 0.37).sin() * 3.0).collect();
        let a: Vec<f64> = (0..300).map(|i| (i as f64 * 0.11).cos() * 2.0).collect();
        for (kind, beta) in [
            (Kind::ForwardKl, 0.5),
            (Kind::ReverseKl, 0.5),
            (Kind::Jsd, 0.7),
        ] {
            let (mut g1, mut g2) = (vec![0.0; 300], vec![0.0; 300]);
            let l1 = divergence_row(kind, beta, &b, &a, &mut g1);
            let l2 = distill_kernels::reference_row_divergence(kind, beta, &b, &a, Some(&mut g2));
            assert!(
                (l1 - l2).abs() <= 1e-12 * l2.abs(),
                "{kind:?}: {l1} vs {l2}"
            );
            let err = g1
                .iter()
                .zip(&g2)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-14, "{kind:?}: gradient differs by {err}");
        }
    }
}
