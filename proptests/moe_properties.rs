//! Properties of MoE dispatch, checked with proptest on the CPU backend through the public API:
//! the permutation is a bijection between kept slots and non-padding rows, expert-major then
//! token then slot, with capacity and padding as specified (R ≤ max_rows, −1 elsewhere); chosen
//! experts are distinct, lie in at most `topk_groups` groups and beat every unchosen expert of
//! those groups; renormalised weights sum to the scale; softmax routing is invariant to a
//! constant added to a token's logits; combine ∘ permute (unscaled, no drops) is k·x;
//! permute and unweighted combine are adjoint; routing twice gives the same bits.

use distill_kernels::moe::{Combine, Permute, Route, RouteParams, Score};
use distill_kernels::{Context, Launch, Matrix, MatrixMut, Vector, VectorMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;

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

/// Route outputs of one CPU call.
#[derive(Debug, Clone, PartialEq)]
struct Routed {
    ids: Vec<i32>,
    weights: Vec<f32>,
    counts: Vec<i32>,
    offsets: Vec<i32>,
    perm: Vec<i32>,
    position: Vec<i32>,
}

fn route(logits: &[f32], bias: Option<&[f32]>, n: usize, e: usize, p: &RouteParams) -> Routed {
    let slots = n * p.k;
    let mut r = Routed {
        ids: vec![-7; slots],
        weights: vec![f32::NAN; slots],
        counts: vec![-7; e],
        offsets: vec![-7; e + 1],
        perm: vec![-7; p.max_rows(n, e)],
        position: vec![-7; slots],
    };
    Context::cpu()
        .moe_route(
            Route {
                logits: Matrix::host(logits, n, e, e).unwrap(),
                bias: bias.map(Vector::host),
                expert_ids: VectorMut::host(&mut r.ids),
                weights: VectorMut::host(&mut r.weights),
                counts: VectorMut::host(&mut r.counts),
                offsets: VectorMut::host(&mut r.offsets),
                perm: VectorMut::host(&mut r.perm),
                position: VectorMut::host(&mut r.position),
            },
            p,
            &Launch::default(),
        )
        .unwrap();
    r
}

fn permute(x: &[f32], n: usize, h: usize, k: usize, perm: &[i32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; perm.len() * h];
    Context::cpu()
        .moe_permute(
            Permute {
                x: Matrix::host(x, n, h, h).unwrap(),
                k,
                perm: Vector::host(perm),
                weights: None,
                out: MatrixMut::host(&mut out, perm.len(), h, h).unwrap(),
            },
            &Launch::default(),
        )
        .unwrap();
    out
}

fn combine(rows: &[f32], r: usize, n: usize, h: usize, position: &[i32]) -> Vec<f32> {
    let k = position.len() / n;
    let mut y = vec![f32::NAN; n * h];
    Context::cpu()
        .moe_combine(
            Combine {
                rows: Matrix::host(rows, r, h, h).unwrap(),
                k,
                position: Vector::host(position),
                weights: None,
                y: MatrixMut::host(&mut y, n, h, h).unwrap(),
            },
            &Launch::default(),
        )
        .unwrap();
    y
}

/// (n, e, logits, params): E a multiple of the group count, k within the kept groups.
fn routing() -> impl Strategy<Value = (usize, usize, Vec<f32>, RouteParams)> {
    (
        1usize..=40,
        prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        1usize..=8,
    )
        .prop_flat_map(|(n, n_groups, per_group)| {
            let e = n_groups * per_group.max(if n_groups > 1 { 2 } else { 1 });
            let size = e / n_groups;
            (
                Just(n),
                Just(e),
                vec(-4.0f32..4.0, n * e),
                1..=n_groups,
                any::<bool>(),
                any::<bool>(),
                prop_oneof![Just(None), (1usize..=20).prop_map(Some)],
                1usize..=5,
                0.25f32..3.0,
            )
                .prop_flat_map(
                    move |(n, e, l, topk_groups, sigmoid, renormalize, capacity, block, scale)| {
                        let kmax = (topk_groups * size).min(32);
                        (1..=kmax).prop_map(move |k| {
                            let p = RouteParams {
                                k,
                                score: if sigmoid {
                                    Score::Sigmoid
                                } else {
                                    Score::Softmax
                                },
                                renormalize,
                                n_groups,
                                topk_groups,
                                scale,
                                capacity,
                                block,
                            };
                            (n, e, l.clone(), p)
                        })
                    },
                )
        })
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn permutation_is_expert_major_bijection((n, e, l, p) in routing()) {
        let r = route(&l, None, n, e, &p);
        let k = p.k;
        let big_r = r.offsets[e] as usize;
        prop_assert!(big_r <= p.max_rows(n, e));
        prop_assert_eq!(r.offsets[0], 0);
        let mut last = (-1i64, -1i64);
        for ex in 0..e {
            let (start, end) = (r.offsets[ex] as usize, r.offsets[ex + 1] as usize);
            let c = r.counts[ex] as usize;
            prop_assert!(p.capacity.map_or(true, |cap| c <= cap));
            prop_assert_eq!(end - start, c.div_ceil(p.block) * p.block);
            for row in start..end {
                let slot = r.perm[row];
                if row < start + c {
                    prop_assert!(slot >= 0);
                    let slot = slot as usize;
                    prop_assert_eq!(r.ids[slot], ex as i32);
                    prop_assert_eq!(r.position[slot], row as i32);
                    // Expert-major, then token, then slot: flat slot indices increase.
                    let key = (ex as i64, slot as i64);
                    prop_assert!(key > last);
                    last = key;
                } else {
                    prop_assert_eq!(slot, -1);
                }
            }
        }
        prop_assert!(r.perm[big_r..].iter().all(|&x| x == -1));
        // Every slot is kept (at its row) or dropped; drops only past an expert's capacity.
        let mut seen = vec![0usize; e];
        for slot in 0..n * k {
            let ex = r.ids[slot] as usize;
            let kept = r.position[slot] >= 0;
            prop_assert_eq!(kept, p.capacity.map_or(true, |cap| seen[ex] < cap));
            seen[ex] += 1;
        }
    }

    #[test]
    fn choice_is_a_grouped_top_k((n, e, l, p) in routing(), bias_scale in 0.0f32..0.5) {
        let bias: Vec<f32> = (0..e).map(|i| bias_scale * ((i * 7 % 5) as f32 - 2.0)).collect();
        let r = route(&l, Some(&bias), n, e, &p);
        let size = e / p.n_groups;
        for t in 0..n {
            let ids = &r.ids[t * p.k..(t + 1) * p.k];
            let row = &l[t * e..(t + 1) * e];
            let score = |i: usize| match p.score {
                Score::Sigmoid => 1.0 / (1.0 + (-(row[i] as f64)).exp()),
                Score::Softmax => {
                    let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
                    (row[i] as f64).exp() / z
                }
            };
            let sel = |i: usize| score(i) + bias[i] as f64;
            let mut groups: Vec<usize> = ids.iter().map(|&i| i as usize / size).collect();
            groups.sort();
            groups.dedup();
            prop_assert!(groups.len() <= p.topk_groups);
            let mut distinct = ids.to_vec();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), p.k);
            let worst = ids.iter().map(|&i| sel(i as usize)).fold(f64::INFINITY, f64::min);
            for x in 0..e {
                if groups.contains(&(x / size)) && !ids.contains(&(x as i32)) {
                    prop_assert!(sel(x) <= worst + 1e-12, "token {}: expert {} beats {:?}", t, x, ids);
                }
            }
            for w in ids.windows(2) {
                prop_assert!(sel(w[0] as usize) >= sel(w[1] as usize) - 1e-12);
            }
            let ws = &r.weights[t * p.k..(t + 1) * p.k];
            prop_assert!(ws.iter().all(|&w| w >= 0.0));
            if p.renormalize {
                let s: f64 = ws.iter().map(|&w| w as f64).sum();
                prop_assert!((s - p.scale as f64).abs() <= 1e-5 * p.scale as f64, "{} vs {}", s, p.scale);
            }
        }
    }

    #[test]
    fn softmax_invariant_to_a_constant_per_token(
        (n, e, l, p) in routing(),
        shift in -8i32..8,
    ) {
        // Logits on a 1/64 grid so adding an integer is exact in f32.
        let l: Vec<f32> = l.iter().map(|&x| (x * 64.0).round() / 64.0).collect();
        let p = RouteParams { score: Score::Softmax, ..p };
        let shifted: Vec<f32> = l.iter().map(|&x| x + shift as f32).collect();
        let a = route(&l, None, n, e, &p);
        let b = route(&shifted, None, n, e, &p);
        prop_assert_eq!(&a.ids, &b.ids);
        prop_assert_eq!(&a.perm, &b.perm);
        for (x, y) in a.weights.iter().zip(&b.weights) {
            prop_assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-6), "{} vs {}", x, y);
        }
    }

    #[test]
    fn routing_is_deterministic((n, e, l, p) in routing()) {
        prop_assert_eq!(route(&l, None, n, e, &p), route(&l, None, n, e, &p));
    }

    #[test]
    fn combine_of_permute_and_adjointness(
        (n, e, l, p) in routing(),
        h8 in 1usize..=4,
        seed in any::<u64>(),
    ) {
        let h = 8 * h8;
        let r = route(&l, None, n, e, &p);
        let rows = r.offsets[e] as usize;
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let x: Vec<f32> = (0..n * h).map(|_| next()).collect();
        let g: Vec<f32> = (0..rows * h).map(|_| next()).collect();
        let xp = permute(&x, n, h, p.k, &r.perm[..rows]);
        let gx = combine(&g, rows, n, h, &r.position);
        // ⟨permute(x), g⟩ = ⟨x, combine(g)⟩.
        let lhs: f64 = xp.iter().zip(&g).map(|(&a, &b)| a as f64 * b as f64).sum();
        let rhs: f64 = x.iter().zip(&gx).map(|(&a, &b)| a as f64 * b as f64).sum();
        prop_assert!((lhs - rhs).abs() <= 1e-5 * (1.0 + lhs.abs()), "{} vs {}", lhs, rhs);
        // Without drops, combining the gathered rows gives k·x (kept slots per token · x).
        let y = combine(&xp, rows, n, h, &r.position);
        for t in 0..n {
            let kept = r.position[t * p.k..(t + 1) * p.k].iter().filter(|&&q| q >= 0).count();
            for c in 0..h {
                let want = kept as f64 * x[t * h + c] as f64;
                prop_assert!((y[t * h + c] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-6));
            }
        }
    }
}
