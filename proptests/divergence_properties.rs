//! Properties of the divergence (DESIGN.md "Numerics and tests"), checked with proptest on the
//! CPU backend through the public API, and CPU == CUDA within tolerance when a GPU is present
//! (a visible SKIPPED line otherwise):
//! KL ≥ 0 and = 0 on equal rows (> 0 when a row really differs); 0 ≤ JSD(β) ≤ H(β);
//! swapping student and teacher maps jsd(β) to jsd(1 − β); gradient rows sum to 0; gradient ==
//! central finite differences; invariance to a constant added to a row (student and teacher
//! separately); reductions consistent; chunked == unchunked (bitwise); temperature scaling.

#[path = "../tests/common/mod.rs"]
mod common;

use distill_kernels::divergence::{Divergence, Kind, Params, Reduction};
use distill_kernels::{Context, DType, Launch, Matrix, MatrixMut, Vector, VectorMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Per-token losses, reduced loss, gradient (f32 everywhere) of one CPU call.
#[derive(Debug, Clone, PartialEq)]
struct Out {
    per_token: Vec<f32>,
    loss: f32,
    grad: Vec<f32>,
}

fn run(s: &[f32], t: &[f32], n: usize, v: usize, params: Params, labels: Option<&[i64]>) -> Out {
    let mut per_token = vec![f32::NAN; n];
    let mut loss = [f32::NAN];
    let mut grad = vec![f32::NAN; n * v];
    Context::cpu()
        .divergence(
            Divergence {
                num_items: None,
                student: Matrix::host(s, n, v, v).unwrap(),
                teacher: Matrix::host(t, n, v, v).unwrap(),
                labels: labels.map(Vector::host),
                per_token: Some(VectorMut::host(&mut per_token)),
                loss: Some(VectorMut::host(&mut loss)),
                grad: Some(MatrixMut::host(&mut grad, n, v, v).unwrap()),
            },
            &params,
            &Launch::default(),
        )
        .unwrap();
    Out {
        per_token,
        loss: loss[0],
        grad,
    }
}

/// `cases` cases, or `DK_PROPTEST_CASES` when set (for longer runs).
fn config(cases: u32) -> Config {
    let cases = std::env::var("DK_PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// (n, v, student, teacher) with logits in [lo, hi).
fn logits(
    max_n: usize,
    min_v: usize,
    max_v: usize,
    lo: f32,
    hi: f32,
) -> impl Strategy<Value = (usize, usize, Vec<f32>, Vec<f32>)> {
    (1..=max_n, min_v..=max_v)
        .prop_flat_map(move |(n, v)| (Just(n), Just(v), vec(lo..hi, n * v), vec(lo..hi, n * v)))
}

fn kind_strategy() -> impl Strategy<Value = Params> {
    prop_oneof![
        Just(Params::new(Kind::ForwardKl)),
        Just(Params::new(Kind::ReverseKl)),
        (0.0f32..=1.0).prop_map(|beta| Params {
            beta,
            ..Params::new(Kind::Jsd)
        }),
        prop_oneof![Just(0.0f32), Just(1.0f32)].prop_map(|beta| Params {
            beta,
            ..Params::new(Kind::Jsd)
        }),
    ]
}

fn temperature() -> impl Strategy<Value = f32> {
    prop_oneof![Just(1.0f32), Just(0.5), Just(2.0), 0.3f32..3.0]
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn kl_nonnegative_zero_on_equal_rows(
        (n, v, s, t) in logits(4, 1, 200, -12.0, 12.0),
        temp in temperature(),
    ) {
        for kind in [Kind::ForwardKl, Kind::ReverseKl] {
            let p = Params { temperature: temp, ..Params::new(kind) };
            let out = run(&s, &t, n, v, p, None);
            for (r, &x) in out.per_token.iter().enumerate() {
                prop_assert!(x >= 0.0, "{kind:?} row {r}: {x}");
            }
            // Equal rows: exactly 0, gradient exactly 0.
            let same = run(&s, &s, n, v, p, None);
            prop_assert!(same.per_token.iter().all(|&x| x == 0.0), "{:?}", same.per_token);
            prop_assert!(same.grad.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn kl_positive_when_a_row_differs(
        (n, v, s, _t) in logits(3, 2, 64, -5.0, 5.0),
        delta in prop_oneof![-3.0f32..-0.5, 0.5f32..3.0],
    ) {
        // Move each row's largest student logit: a different distribution, so KL > 0.
        let mut t = s.clone();
        for r in 0..n {
            let row = &mut t[r * v..(r + 1) * v];
            let j = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            row[j] += delta;
        }
        for kind in [Kind::ForwardKl, Kind::ReverseKl] {
            let out = run(&s, &t, n, v, Params::new(kind), None);
            prop_assert!(out.per_token.iter().all(|&x| x > 0.0), "{kind:?}: {:?}", out.per_token);
        }
        let jsd = run(&s, &t, n, v, Params { beta: 0.5, ..Params::new(Kind::Jsd) }, None);
        prop_assert!(jsd.per_token.iter().all(|&x| x > 0.0), "{:?}", jsd.per_token);
    }

    #[test]
    fn jsd_bounded_by_mixture_entropy(
        (n, v, s, t) in logits(4, 1, 100, -30.0, 30.0),
        beta in 0.001f32..0.999,
        temp in temperature(),
    ) {
        let p = Params { beta, temperature: temp, ..Params::new(Kind::Jsd) };
        let out = run(&s, &t, n, v, p, None);
        let b = beta as f64;
        let bound = -b * b.ln() - (1.0 - b) * (1.0 - b).ln();
        for &x in &out.per_token {
            prop_assert!(x as f64 >= -1e-12, "JSD {x} < 0");
            prop_assert!(x as f64 <= bound * (1.0 + 1e-6) + 1e-12, "JSD {x} > bound {bound}");
        }
        // Equal rows: ~0.
        let same = run(&s, &s, n, v, p, None);
        prop_assert!(same.per_token.iter().all(|&x| x.abs() <= 1e-9), "{:?}", same.per_token);
    }

    #[test]
    fn swapping_student_and_teacher_maps_beta_to_one_minus_beta(
        (n, v, s, t) in logits(4, 1, 100, -10.0, 10.0),
        // β on the 2⁻²⁴ grid, so that 1 − β is exact in f32 as well.
        beta in prop_oneof![
            (0u32..=1 << 24).prop_map(|k| k as f32 / (1u32 << 24) as f32),
            Just(0.0f32),
            Just(1.0f32)
        ],
        temp in temperature(),
    ) {
        let a = run(&s, &t, n, v, Params { beta, temperature: temp, ..Params::new(Kind::Jsd) }, None);
        let b = run(&t, &s, n, v, Params { beta: 1.0 - beta, temperature: temp, ..Params::new(Kind::Jsd) }, None);
        for (x, y) in a.per_token.iter().zip(&b.per_token) {
            prop_assert!((x - y).abs() <= 1e-6 * x.abs().max(y.abs()) + 1e-9, "β={beta}: {x} vs {y}");
        }
        // And forward KL(s, t) == reverse KL(t, s).
        let f = run(&s, &t, n, v, Params::new(Kind::ForwardKl), None);
        let r = run(&t, &s, n, v, Params::new(Kind::ReverseKl), None);
        for (x, y) in f.per_token.iter().zip(&r.per_token) {
            prop_assert!((x - y).abs() <= 1e-6 * x.abs() + 1e-9, "{x} vs {y}");
        }
    }

    #[test]
    fn gradient_rows_sum_to_zero(
        (n, v, s, t) in logits(4, 1, 300, -15.0, 15.0),
        p in kind_strategy(),
        temp in temperature(),
        reduction in prop_oneof![Just(Reduction::BatchMean), Just(Reduction::Sum), Just(Reduction::None)],
    ) {
        let p = Params { temperature: temp, reduction, ..p };
        let out = run(&s, &t, n, v, p, None);
        for r in 0..n {
            let row = &out.grad[r * v..(r + 1) * v];
            let sum: f64 = row.iter().map(|&g| g as f64).sum();
            let abs: f64 = row.iter().map(|&g| (g as f64).abs()).sum();
            prop_assert!(sum.abs() <= 1e-6 * abs + 1e-12, "row {r}: Σg = {sum}, Σ|g| = {abs}");
        }
    }

    #[test]
    fn gradient_matches_central_differences(
        (n, v, s, t) in logits(2, 1, 10, -4.0, 4.0),
        p in kind_strategy(),
        temp in prop_oneof![Just(1.0f32), Just(0.5), Just(2.0), 0.7f32..1.5],
        reduction in prop_oneof![Just(Reduction::BatchMean), Just(Reduction::Sum)],
    ) {
        let p = Params { temperature: temp, reduction, ..p };
        let out = run(&s, &t, n, v, p, None);
        let h = 1e-2f32;
        for i in 0..n * v {
            let mut sp = s.clone();
            sp[i] += h;
            let mut sm = s.clone();
            sm[i] -= h;
            // The perturbation actually applied (f32 rounding), in f64.
            let step = sp[i] as f64 - sm[i] as f64;
            let lp = run(&sp, &t, n, v, p, None).loss as f64;
            let lm = run(&sm, &t, n, v, p, None).loss as f64;
            let fd = (lp - lm) / step;
            let g = out.grad[i] as f64;
            let tol = 2e-4 + 2e-3 * g.abs() + 1e-6 * (lp.abs() + lm.abs()) / step;
            prop_assert!((fd - g).abs() <= tol, "{p:?} entry {i}: fd {fd} vs grad {g}");
        }
    }

    #[test]
    fn invariant_to_a_constant_per_row(
        (n, v) in (1usize..4, 1usize..100),
        seed in any::<u64>(),
        temp in prop_oneof![Just(1.0f32), Just(0.5), Just(2.0), Just(1.3)],
        p in kind_strategy(),
    ) {
        // Logits on a 1/64 grid and constants on it too: the shifted inputs are exact in f32.
        let mut rng = common::Rng::new(seed);
        let grid = |rng: &mut common::Rng, lim: f64| ((rng.range(-lim, lim) * 64.0).round() / 64.0) as f32;
        let s: Vec<f32> = (0..n * v).map(|_| grid(&mut rng, 8.0)).collect();
        let t: Vec<f32> = (0..n * v).map(|_| grid(&mut rng, 8.0)).collect();
        let mut s2 = s.clone();
        let mut t2 = t.clone();
        for r in 0..n {
            let (cs, ct) = (grid(&mut rng, 16.0), grid(&mut rng, 16.0));
            s2[r * v..(r + 1) * v].iter_mut().for_each(|x| *x += cs);
            t2[r * v..(r + 1) * v].iter_mut().for_each(|x| *x += ct);
        }
        let p = Params { temperature: temp, ..p };
        let a = run(&s, &t, n, v, p, None);
        for (s_, t_) in [(&s2, &t), (&s, &t2), (&s2, &t2)] {
            let b = run(s_, t_, n, v, p, None);
            for (x, y) in a.per_token.iter().zip(&b.per_token) {
                prop_assert!((x - y).abs() <= 1e-6 * x.abs() + 1e-9, "{x} vs {y}");
            }
            let ga: Vec<f64> = a.grad.iter().map(|&x| x as f64).collect();
            let gb: Vec<f64> = b.grad.iter().map(|&x| x as f64).collect();
            // Floor 1e-7: near-equal rows have gradients of ~1e-10 whose f64 rounding (~1e-15
            // from logits shifted by up to 32) is then a large fraction of themselves.
            let e = common::rel_err(&gb, &ga, 1e-7);
            prop_assert!(e <= 1e-6, "gradient changed by {e}");
        }
    }

    #[test]
    fn reductions_are_consistent(
        (n, v, s, t) in logits(6, 1, 80, -8.0, 8.0),
        p in kind_strategy(),
        ignore in vec(any::<bool>(), 6),
        num_items in 0.5f32..100.0,
    ) {
        let labels: Vec<i64> = (0..n).map(|r| if ignore[r] { -100 } else { r as i64 }).collect();
        let valid = labels.iter().filter(|&&l| l != -100).count();
        let with = |reduction, num_items| run(&s, &t, n, v, Params { reduction, num_items, ..p }, Some(&labels));
        let sum = with(Reduction::Sum, None);
        let mean = with(Reduction::BatchMean, None);
        let none = with(Reduction::None, None);
        let items = with(Reduction::BatchMean, Some(num_items));
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()) + 1e-12;
        prop_assert!(close(sum.loss as f64, mean.loss as f64 * valid.max(1) as f64), "{} vs {} × {valid}", sum.loss, mean.loss);
        prop_assert!(close(sum.loss as f64, items.loss as f64 * num_items as f64));
        prop_assert_eq!(sum.loss.to_bits(), none.loss.to_bits());
        prop_assert_eq!(&sum.per_token, &none.per_token);
        prop_assert_eq!(&sum.per_token, &mean.per_token);
        prop_assert_eq!(&sum.grad, &none.grad);
        let total: f64 = sum.per_token.iter().map(|&x| x as f64).sum();
        prop_assert!(close(total, sum.loss as f64));
        for (r, &l) in labels.iter().enumerate() {
            if l == -100 {
                prop_assert_eq!(sum.per_token[r], 0.0);
                prop_assert!(sum.grad[r * v..(r + 1) * v].iter().all(|&g| g == 0.0));
            }
        }
        for (a, b) in sum.grad.iter().zip(&mean.grad) {
            let scaled = *b as f64 * valid.max(1) as f64;
            prop_assert!(close(*a as f64, scaled) || (*a as f64 - scaled).abs() < 1e-30, "{a} vs {b} × {valid}");
        }
    }

    #[test]
    fn chunked_equals_unchunked(
        (n, v, s, t) in logits(8, 1, 120, -10.0, 10.0),
        split in 0.0f64..1.0,
        p in kind_strategy(),
        temp in temperature(),
    ) {
        let k = ((n as f64 * split) as usize).clamp(1, n);
        let p = Params { temperature: temp, reduction: Reduction::Sum, ..p };
        let all = run(&s, &t, n, v, p, None);
        let a = run(&s[..k * v], &t[..k * v], k, v, p, None);
        let mut per_token = a.per_token.clone();
        let mut grad = a.grad.clone();
        let mut loss = a.loss as f64;
        if k < n {
            let b = run(&s[k * v..], &t[k * v..], n - k, v, p, None);
            per_token.extend(&b.per_token);
            grad.extend(&b.grad);
            loss += b.loss as f64;
        }
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&per_token), bits(&all.per_token));
        prop_assert_eq!(bits(&grad), bits(&all.grad));
        prop_assert!((loss - all.loss as f64).abs() <= 1e-6 * loss.abs() + 1e-9);
    }

    #[test]
    fn temperature_scaling(
        (n, v, s, t) in logits(4, 1, 100, -6.0, 6.0),
        p in kind_strategy(),
        temp in prop_oneof![Just(0.5f32), Just(2.0), Just(4.0), 0.3f32..3.0],
    ) {
        // divergence(T·s, T·t; T) == divergence(s, t; 1), and its gradient w.r.t. T·s is 1/T
        // times the one w.r.t. s.
        let exact = temp.log2().fract() == 0.0;
        let base = run(&s, &t, n, v, Params { temperature: 1.0, ..p }, None);
        let st: Vec<f32> = s.iter().map(|&x| x * temp).collect();
        let tt: Vec<f32> = t.iter().map(|&x| x * temp).collect();
        let scaled = run(&st, &tt, n, v, Params { temperature: temp, ..p }, None);
        // Otherwise T·s is rounded to f32: logits move by up to |s|·2⁻²⁴ ≈ 4e-7.
        for (x, y) in base.per_token.iter().zip(&scaled.per_token) {
            if exact {
                prop_assert_eq!(x.to_bits(), y.to_bits());
            } else {
                prop_assert!((x - y).abs() as f64 <= 2e-5 * x.abs() as f64 + 2e-6, "{x} vs {y}");
            }
        }
        let g1: Vec<f64> = base.grad.iter().map(|&x| x as f64 / temp as f64).collect();
        let gt: Vec<f64> = scaled.grad.iter().map(|&x| x as f64).collect();
        let e = common::rel_err(&gt, &g1, if exact { 1e-9 } else { 1e-3 });
        prop_assert!(e <= if exact { 1e-7 } else { 1e-4 }, "gradient error {e}");
    }
}

#[test]
fn cpu_equals_cuda() {
    let Some(cuda) = common::cuda("cpu_equals_cuda (proptest)") else {
        return;
    };
    let dev = common::Device::Cuda(cuda);
    let dtypes = prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)];
    let strategy = (
        logits(6, 1, 3000, -12.0, 12.0),
        kind_strategy(),
        temperature(),
        dtypes.clone(),
        dtypes,
        vec(any::<bool>(), 6),
    );
    let mut runner = TestRunner::new(config(48));
    runner
        .run(&strategy, |((n, v, s, t), p, temp, sd, td, ignore)| {
            let p = Params {
                temperature: temp,
                ..p
            };
            let to64 = |x: &[f32]| x.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let mut case = common::Case::new(
                common::Logits::new(sd, n, v, &to64(&s)),
                common::Logits::new(td, n, v, &to64(&t)),
                p,
            )
            .with_labels((0..n).map(|r| if ignore[r] { -100 } else { 1 }).collect());
            case.what = format!("proptest {p:?} N={n} V={v} {sd:?}/{td:?}");
            // Panics (with the case) on any mismatch against the reference or the CPU backend.
            common::run_checked(&dev, &case);
            // Chunked == unchunked on the device too (per-token losses, bitwise).
            if n > 1 {
                let k = n / 2;
                let mut head = case.clone();
                head.student = common::Logits::new(sd, k, v, &to64(&s[..k * v]));
                head.teacher = common::Logits::new(td, k, v, &to64(&t[..k * v]));
                head.labels = case.labels.as_ref().map(|l| l[..k].to_vec());
                head.per_token = Some(k);
                head.grad = common::GradOut::Separate(head.grad_spec());
                let (r1, _, whole) = dev.run(&case);
                let (r2, _, part) = dev.run(&head);
                r1.and(r2).unwrap();
                let w = common::outputs(&case, &whole).per_token.unwrap();
                let h = common::outputs(&head, &part).per_token.unwrap();
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&w[..k]), bits(&h));
            }
            Ok(())
        })
        .unwrap();
}
