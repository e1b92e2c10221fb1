//! Properties of the fused linear divergence, checked with proptest on the CPU backend through
//! the public API:
//! - the result does not depend on the chunk size (bitwise on the CPU, which sums in the same
//!   order whatever the chunking);
//! - it equals the plain divergence op run on explicitly materialised logits
//!   (`cap(scale · hidden @ weightᵀ)`), its gradient pushed through the chain rule by hand;
//! - gradient accumulation: two micro-batches with `accumulate` and `sum` give the gradient of the
//!   whole batch.

use distill_kernels::divergence::{Divergence, Kind, Params, Reduction};
use distill_kernels::fused::{FusedLinear, FusedLinearParams};
use distill_kernels::{Context, Launch, Matrix, MatrixMut, Vector, VectorMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

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

/// Inputs of one call (f32, contiguous).
#[derive(Debug, Clone)]
struct Inputs {
    n: usize,
    v: usize,
    h: usize,
    ht: usize,
    sh: Vec<f32>,
    sw: Vec<f32>,
    th: Vec<f32>,
    tw: Vec<f32>,
    /// Labels: `true` = ignored row.
    ignored: Vec<bool>,
}

fn inputs() -> impl Strategy<Value = Inputs> {
    (1usize..=10, 1usize..=20, 1usize..=8, 1usize..=8).prop_flat_map(|(n, v, h, ht)| {
        (
            vec(-1.5f32..1.5, n * h),
            vec(-1.0f32..1.0, v * h),
            vec(-1.5f32..1.5, n * ht),
            vec(-1.0f32..1.0, v * ht),
            vec(prop::bool::weighted(0.2), n),
        )
            .prop_map(move |(sh, sw, th, tw, ignored)| Inputs {
                n,
                v,
                h,
                ht,
                sh,
                sw,
                th,
                tw,
                ignored,
            })
    })
}

fn params() -> impl Strategy<Value = FusedLinearParams> {
    let kind = prop_oneof![
        Just((Kind::ForwardKl, 0.5f32)),
        Just((Kind::ReverseKl, 0.5)),
        (0.0f32..=1.0).prop_map(|b| (Kind::Jsd, b)),
    ];
    let reduction = prop_oneof![
        Just(Reduction::BatchMean),
        Just(Reduction::Sum),
        Just(Reduction::None)
    ];
    (
        kind,
        reduction,
        0.5f32..2.0,
        0.25f32..3.0,
        prop::option::of(1.0f32..6.0),
    )
        .prop_map(
            |((kind, beta), reduction, temperature, logit_scale, softcap)| FusedLinearParams {
                divergence: Params {
                    kind,
                    beta,
                    temperature,
                    reduction,
                    ..Params::default()
                },
                logit_scale,
                softcap,
                ..FusedLinearParams::default()
            },
        )
}

/// Outputs of one call (f32 everywhere).
#[derive(Debug, Clone, PartialEq)]
struct Out {
    per_token: Vec<f32>,
    loss: f32,
    gh: Vec<f32>,
    gw: Vec<f32>,
}

fn labels_of(x: &Inputs, params: &FusedLinearParams) -> Vec<i64> {
    x.ignored
        .iter()
        .map(|&i| if i { params.divergence.ignore_index } else { 1 })
        .collect()
}

/// Runs the fused op on the CPU; `gh` / `gw` start as `prev` (used with `accumulate`).
fn fused(x: &Inputs, params: &FusedLinearParams, prev: Option<(&[f32], &[f32])>) -> Out {
    let (n, v, h, ht) = (x.n, x.v, x.h, x.ht);
    let labels = labels_of(x, params);
    let mut per_token = vec![f32::NAN; n];
    let mut loss = [f32::NAN];
    let (mut gh, mut gw) = match prev {
        Some((a, b)) => (a.to_vec(), b.to_vec()),
        None => (vec![f32::NAN; n * h], vec![f32::NAN; v * h]),
    };
    Context::cpu()
        .fused_linear_divergence(
            FusedLinear {
                num_items: None,
                student_hidden: Matrix::host(&x.sh, n, h, h).unwrap(),
                student_weight: Matrix::host(&x.sw, v, h, h).unwrap(),
                teacher_hidden: Matrix::host(&x.th, n, ht, ht).unwrap(),
                teacher_weight: Matrix::host(&x.tw, v, ht, ht).unwrap(),
                labels: Some(Vector::host(&labels)),
                per_token: Some(VectorMut::host(&mut per_token)),
                loss: Some(VectorMut::host(&mut loss)),
                grad_hidden: Some(MatrixMut::host(&mut gh, n, h, h).unwrap()),
                grad_weight: Some(MatrixMut::host(&mut gw, v, h, h).unwrap()),
            },
            params,
            &Launch::default(),
        )
        .unwrap();
    Out {
        per_token,
        loss: loss[0],
        gh,
        gw,
    }
}

/// ‖a − b‖ / max(‖b‖, floor); infinite on NaN.
fn rel(a: &[f32], b: &[f64], floor: f64) -> f64 {
    let (mut d, mut r) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::INFINITY;
        }
        d += (x as f64 - y) * (x as f64 - y);
        r += y * y;
    }
    d.sqrt() / r.sqrt().max(floor)
}

#[test]
fn result_does_not_depend_on_the_chunk_size() {
    let mut runner = TestRunner::new(config(96));
    runner
        .run(
            &(inputs(), params(), 1usize..=12, 1usize..=12),
            |(x, p, a, b)| {
                let pa = FusedLinearParams {
                    chunk_rows: Some(a),
                    ..p
                };
                let pb = FusedLinearParams {
                    chunk_rows: Some(b),
                    ..p
                };
                let auto = FusedLinearParams {
                    chunk_rows: None,
                    ..p
                };
                let (oa, ob, oc) = (
                    fused(&x, &pa, None),
                    fused(&x, &pb, None),
                    fused(&x, &auto, None),
                );
                prop_assert_eq!(&oa, &ob, "chunk_rows {} vs {}", a, b);
                prop_assert_eq!(&oa, &oc, "chunk_rows {} vs automatic", a);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn equals_the_divergence_on_materialised_logits() {
    let mut runner = TestRunner::new(config(96));
    runner
        .run(&(inputs(), params(), 1usize..=4), |(x, p, chunk)| {
            let (n, v, h, ht) = (x.n, x.v, x.h, x.ht);
            let scale = p.logit_scale as f64;
            let cap = p.softcap.map(|c| c as f64);
            // Logits cap(scale · x·w) in f64, handed to the divergence op in f32, and
            // d(capped)/d(raw) for the chain rule.
            let materialise = |x: &[f32], w: &[f32], k: usize| -> (Vec<f32>, Vec<f64>) {
                let mut z = Vec::with_capacity(n * v);
                let mut dz = Vec::with_capacity(n * v);
                for r in 0..n {
                    for j in 0..v {
                        let raw: f64 = (0..k)
                            .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                            .sum();
                        let s = scale * raw;
                        let (zc, d) = match cap {
                            None => (s, scale),
                            Some(c) => {
                                let t = (s / c).tanh();
                                (c * t, (1.0 - t * t) * scale)
                            }
                        };
                        z.push(zc as f32);
                        dz.push(d);
                    }
                }
                (z, dz)
            };
            let (zs, dzs) = materialise(&x.sh, &x.sw, h);
            let (zt, _) = materialise(&x.th, &x.tw, ht);
            let labels = labels_of(&x, &p);
            let mut per_token = vec![f32::NAN; n];
            let mut loss = [f32::NAN];
            let mut g = vec![f32::NAN; n * v];
            Context::cpu()
                .divergence(
                    Divergence {
                        num_items: None,
                        student: Matrix::host(&zs, n, v, v).unwrap(),
                        teacher: Matrix::host(&zt, n, v, v).unwrap(),
                        labels: Some(Vector::host(&labels)),
                        per_token: Some(VectorMut::host(&mut per_token)),
                        loss: Some(VectorMut::host(&mut loss)),
                        grad: Some(MatrixMut::host(&mut g, n, v, v).unwrap()),
                    },
                    &p.divergence,
                    &Launch::default(),
                )
                .unwrap();
            let mut gh = vec![0.0f64; n * h];
            let mut gw = vec![0.0f64; v * h];
            for r in 0..n {
                for j in 0..v {
                    let grj = g[r * v + j] as f64 * dzs[r * v + j];
                    for c in 0..h {
                        gh[r * h + c] += grj * x.sw[j * h + c] as f64;
                        gw[j * h + c] += grj * x.sh[r * h + c] as f64;
                    }
                }
            }
            let out = fused(
                &x,
                &FusedLinearParams {
                    chunk_rows: Some(chunk),
                    ..p
                },
                None,
            );
            let pt: Vec<f64> = per_token.iter().map(|&x| x as f64).collect();
            // The divergence op sees f32-rounded logits: allow for that rounding.
            let tol = 1e-4;
            let e = rel(&out.per_token, &pt, 1e-3);
            prop_assert!(e < tol, "per-token {}", e);
            let e = rel(&[out.loss], &[loss[0] as f64], 1e-3);
            prop_assert!(e < tol, "loss {} vs {} ({})", out.loss, loss[0], e);
            let e = rel(&out.gh, &gh, 1e-3);
            prop_assert!(e < tol, "grad_hidden {}", e);
            let e = rel(&out.gw, &gw, 1e-3);
            prop_assert!(e < tol, "grad_weight {}", e);
            Ok(())
        })
        .unwrap();
}

#[test]
fn micro_batches_accumulate_to_the_whole_batch() {
    let mut runner = TestRunner::new(config(64));
    runner
        .run(&(inputs(), params()), |(x, p)| {
            prop_assume!(x.n >= 2);
            let p = FusedLinearParams {
                divergence: Params {
                    reduction: Reduction::Sum,
                    ..p.divergence
                },
                ..p
            };
            let whole = fused(&x, &p, None);
            let split = x.n / 2;
            let part = |rows: std::ops::Range<usize>| Inputs {
                n: rows.len(),
                sh: x.sh[rows.start * x.h..rows.end * x.h].to_vec(),
                th: x.th[rows.start * x.ht..rows.end * x.ht].to_vec(),
                ignored: x.ignored[rows.clone()].to_vec(),
                ..x.clone()
            };
            let (a, b) = (part(0..split), part(split..x.n));
            let acc = FusedLinearParams {
                accumulate: true,
                ..p
            };
            let zeros_h = vec![0.0f32; a.n * x.h];
            let zeros_w = vec![0.0f32; x.v * x.h];
            let first = fused(&a, &acc, Some((&zeros_h, &zeros_w)));
            let zeros_h = vec![0.0f32; b.n * x.h];
            let second = fused(&b, &acc, Some((&zeros_h, &first.gw)));
            let gw: Vec<f64> = whole.gw.iter().map(|&x| x as f64).collect();
            let e = rel(&second.gw, &gw, 1e-3);
            prop_assert!(e < 1e-6, "accumulated grad_weight vs whole batch: {}", e);
            prop_assert_eq!(&first.gh[..], &whole.gh[..a.n * x.h]);
            prop_assert_eq!(&second.gh[..], &whole.gh[a.n * x.h..]);
            Ok(())
        })
        .unwrap();
}
