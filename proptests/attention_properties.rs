//! Properties of grouped-query attention, checked with proptest on the CPU backend through the
//! public API (f32 inputs and outputs, f64 inside):
//!
//! - every out row lies in the per-dimension hull of the value rows it sees (0 when it sees
//!   none), and its LSE between the largest visible score and that plus ln(#visible);
//! - scaling v by a power of two scales out, dq and dk by it exactly and leaves the LSE and dv
//!   unchanged (bitwise);
//! - without the causal mask, permuting the keys (k and v rows together) permutes dk and dv and
//!   changes nothing else (up to f64 summation order);
//! - with the causal mask, changing a key changes no row that cannot see it (bitwise);
//! - GQA equals MHA over K / V heads repeated across each group, with dK and dV the sums of the
//!   repeated heads' gradients;
//! - a varlen batch of equal lengths equals the padded batch (bitwise, LSE re-indexed);
//! - Σ_keys dV = Σ dO over the rows that see a key, and Σ_keys dK ≈ 0 (softmax rows sum to 1).

use distill_kernels::attention::{Attention, AttentionBackward, AttentionParams, Batch};
use distill_kernels::{Context, Launch, Matrix, MatrixMut, Vector, VectorMut};
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

/// One attention problem with f32 inputs (compact rows).
#[derive(Debug, Clone)]
struct Problem {
    /// Queries and keys per sequence.
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    /// Padded layout (all lengths equal) instead of varlen.
    padded: bool,
    params: AttentionParams,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
struct Fwd {
    out: Vec<f32>,
    lse: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
struct Grads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn cu(lens: &[usize]) -> Vec<i32> {
    let mut out = vec![0i32];
    for &l in lens {
        out.push(out[out.len() - 1] + l as i32);
    }
    out
}

impl Problem {
    fn tq(&self) -> usize {
        self.q_lens.iter().sum()
    }
    fn tk(&self) -> usize {
        self.k_lens.iter().sum()
    }
    fn qc(&self) -> usize {
        self.params.heads_q * self.params.head_dim
    }
    fn kc(&self) -> usize {
        self.params.heads_kv * self.params.head_dim
    }
    fn q_start(&self, b: usize) -> usize {
        self.q_lens[..b].iter().sum()
    }
    fn k_start(&self, b: usize) -> usize {
        self.k_lens[..b].iter().sum()
    }
    /// Keys query `i` of sequence `b` sees: `0..n`.
    fn visible(&self, b: usize, i: usize) -> usize {
        let (sq, sk) = (self.q_lens[b], self.k_lens[b]);
        if self.params.causal {
            (i + sk + 1).saturating_sub(sq).min(sk)
        } else {
            sk
        }
    }
    fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        if self.padded {
            (b * self.params.heads_q + h) * self.q_lens[0] + i
        } else {
            h * self.tq() + self.q_start(b) + i
        }
    }

    fn batch<'a>(&self, cu_q: &'a [i32], cu_k: &'a [i32]) -> Batch<'a> {
        if self.padded {
            Batch::Padded {
                batch: self.q_lens.len(),
                seqlen_q: self.q_lens[0],
                seqlen_k: self.k_lens[0],
            }
        } else {
            Batch::Varlen {
                cu_seqlens_q: Vector::host(cu_q),
                cu_seqlens_k: Vector::host(cu_k),
                max_seqlen_q: self.q_lens.iter().copied().max().unwrap_or(0),
                max_seqlen_k: self.k_lens.iter().copied().max().unwrap_or(0),
            }
        }
    }

    fn forward(&self) -> Fwd {
        let (tq, tk, qc, kc) = (self.tq(), self.tk(), self.qc(), self.kc());
        let (cq, ck) = (cu(&self.q_lens), cu(&self.k_lens));
        let mut f = Fwd {
            out: vec![f32::NAN; tq * qc],
            lse: vec![f32::NAN; self.params.heads_q * tq],
        };
        Context::cpu()
            .attention(
                Attention {
                    batch: self.batch(&cq, &ck),
                    q: Matrix::host(&self.q, tq, qc, qc).unwrap(),
                    k: Matrix::host(&self.k, tk, kc, kc).unwrap(),
                    v: Matrix::host(&self.v, tk, kc, kc).unwrap(),
                    out: MatrixMut::host(&mut f.out, tq, qc, qc).unwrap(),
                    lse: VectorMut::host(&mut f.lse),
                },
                &self.params,
                &Launch::default(),
            )
            .unwrap();
        f
    }

    fn backward(&self, f: &Fwd) -> Grads {
        let (tq, tk, qc, kc) = (self.tq(), self.tk(), self.qc(), self.kc());
        let (cq, ck) = (cu(&self.q_lens), cu(&self.k_lens));
        let mut g = Grads {
            dq: vec![f32::NAN; tq * qc],
            dk: vec![f32::NAN; tk * kc],
            dv: vec![f32::NAN; tk * kc],
        };
        Context::cpu()
            .attention_backward(
                AttentionBackward {
                    batch: self.batch(&cq, &ck),
                    dout: Matrix::host(&self.dout, tq, qc, qc).unwrap(),
                    q: Matrix::host(&self.q, tq, qc, qc).unwrap(),
                    k: Matrix::host(&self.k, tk, kc, kc).unwrap(),
                    v: Matrix::host(&self.v, tk, kc, kc).unwrap(),
                    out: Matrix::host(&f.out, tq, qc, qc).unwrap(),
                    lse: Vector::host(&f.lse),
                    dq: MatrixMut::host(&mut g.dq, tq, qc, qc).unwrap(),
                    dk: MatrixMut::host(&mut g.dk, tk, kc, kc).unwrap(),
                    dv: MatrixMut::host(&mut g.dv, tk, kc, kc).unwrap(),
                },
                &self.params,
                &Launch::default(),
            )
            .unwrap();
        g
    }

    /// Scaled score of query row `row`, head `h` against key row `key` (f64).
    fn score(&self, row: usize, h: usize, key: usize) -> f64 {
        let d = self.params.head_dim;
        let g = h / (self.params.heads_q / self.params.heads_kv);
        let q = &self.q[row * self.qc() + h * d..][..d];
        let k = &self.k[key * self.kc() + g * d..][..d];
        let dot: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
        self.params.scale() as f64 * dot
    }
}

/// Deterministic values in [-2, 2) from a seed (SplitMix64), never zero.
fn values(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| loop {
            *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let x = ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0;
            if x != 0.0 {
                break x;
            }
        })
        .collect()
}

/// Builds a problem from its shape and a seed for the values.
#[allow(clippy::too_many_arguments)]
fn build(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    padded: bool,
    hkv: usize,
    group: usize,
    d: usize,
    causal: bool,
    scale: Option<f32>,
    mut seed: u64,
) -> Problem {
    let params = AttentionParams {
        softmax_scale: scale,
        ..AttentionParams::new(hkv * group, hkv, d).causal(causal)
    };
    let (tq, tk): (usize, usize) = (q_lens.iter().sum(), k_lens.iter().sum());
    let (qc, kc) = (params.heads_q * d, hkv * d);
    Problem {
        q: values(&mut seed, tq * qc),
        k: values(&mut seed, tk * kc),
        v: values(&mut seed, tk * kc),
        dout: values(&mut seed, tq * qc),
        q_lens,
        k_lens,
        padded,
        params,
    }
}

/// Small problems: 1–3 sequences (varlen with empty ones, or padded), GQA groups 1–3 over
/// 1–2 KV heads, D 64 or 128, causal or not, default or custom scale.
fn problem() -> impl Strategy<Value = Problem> {
    (
        1usize..=3,
        any::<bool>(),
        1usize..=2,
        1usize..=3,
        prop_oneof![3 => Just(64usize), 1 => Just(128)],
        any::<bool>(),
        prop_oneof![Just(None), (0.05f32..1.5).prop_map(Some)],
        any::<u64>(),
    )
        .prop_flat_map(|(b, padded, hkv, group, d, causal, scale, seed)| {
            let lens = if padded {
                (0usize..=6, 0usize..=7)
                    .prop_map(move |(sq, sk)| (vec![sq; b], vec![sk; b]))
                    .boxed()
            } else {
                (
                    proptest::collection::vec(0usize..=6, b),
                    proptest::collection::vec(0usize..=7, b),
                )
                    .boxed()
            };
            lens.prop_map(move |(q, k)| build(q, k, padded, hkv, group, d, causal, scale, seed))
        })
}

/// ‖a − b‖ / max(‖b‖, floor), equal entries (−∞ LSEs included) contributing no difference.
fn rel(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let (mut d2, mut r2) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if x != y {
            d2 += (x as f64 - y as f64).powi(2);
        }
        if y.is_finite() {
            r2 += (y as f64).powi(2);
        }
    }
    d2.sqrt() / r2.sqrt().max(floor)
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn out_in_the_hull_of_visible_values_and_lse_bounds(p in problem()) {
        let f = p.forward();
        let (hq, d, qc, kc) = (p.params.heads_q, p.params.head_dim, p.qc(), p.kc());
        let group = hq / p.params.heads_kv;
        for b in 0..p.q_lens.len() {
            for i in 0..p.q_lens[b] {
                let row = p.q_start(b) + i;
                let n = p.visible(b, i);
                for h in 0..hq {
                    let out = &f.out[row * qc + h * d..][..d];
                    let lse = f.lse[p.lse_index(b, h, i)];
                    if n == 0 {
                        prop_assert!(out.iter().all(|&x| x == 0.0));
                        prop_assert_eq!(lse, f32::NEG_INFINITY);
                        continue;
                    }
                    for (c, &o) in out.iter().enumerate() {
                        let vs = (0..n).map(|j| {
                            p.v[(p.k_start(b) + j) * kc + (h / group) * d + c] as f64
                        });
                        let (lo, hi) = vs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                            (lo.min(x), hi.max(x))
                        });
                        let eps = 1e-6 * (1.0 + hi.abs().max(lo.abs()));
                        prop_assert!(
                            o as f64 >= lo - eps && o as f64 <= hi + eps,
                            "out {} outside [{}, {}]", o, lo, hi
                        );
                    }
                    let m = (0..n)
                        .map(|j| p.score(row, h, p.k_start(b) + j))
                        .fold(f64::NEG_INFINITY, f64::max);
                    let eps = 1e-6 * (1.0 + m.abs());
                    prop_assert!(lse as f64 >= m - eps, "lse {} < max score {}", lse, m);
                    prop_assert!(
                        lse as f64 <= m + (n as f64).ln() + eps,
                        "lse {} > max score {} + ln {}", lse, m, n
                    );
                }
            }
        }
    }

    #[test]
    fn scaling_v_by_a_power_of_two(p in problem(), e in -2i32..=2) {
        let c = 2f32.powi(e);
        let f = p.forward();
        let g = p.backward(&f);
        let mut s = p.clone();
        s.v.iter_mut().for_each(|x| *x *= c);
        let fs = s.forward();
        let gs = s.backward(&fs);
        // Exact, except where a result is (or scales into) an f32 subnormal: tiny gradients
        // of keys a peaked softmax all but ignores.
        let tiny = 4.0 * f32::MIN_POSITIVE;
        let scaled = |got: &[f32], base: &[f32]| {
            got.iter().zip(base).all(|(&a, &b)| {
                a.to_bits() == (b * c).to_bits() || (a.abs() < tiny && (b * c).abs() < tiny)
            })
        };
        prop_assert!(scaled(&fs.out, &f.out));
        prop_assert_eq!(&fs.lse, &f.lse);
        prop_assert!(scaled(&gs.dq, &g.dq));
        prop_assert!(scaled(&gs.dk, &g.dk));
        prop_assert_eq!(&gs.dv, &g.dv);
    }

    #[test]
    fn keys_permute_without_causal_mask(mut p in problem(), rot in 1usize..7) {
        p.params.causal = false;
        let f = p.forward();
        let g = p.backward(&f);
        // Rotate the keys of every sequence by `rot` (k and v rows together).
        let kc = p.kc();
        let mut r = p.clone();
        let mut from = vec![0usize; p.tk()]; // new key row -> old key row
        for b in 0..p.k_lens.len() {
            let (k0, sk) = (p.k_start(b), p.k_lens[b]);
            for j in 0..sk {
                from[k0 + j] = k0 + (j + rot) % sk;
            }
        }
        for (new, &old) in from.iter().enumerate() {
            r.k[new * kc..(new + 1) * kc].copy_from_slice(&p.k[old * kc..(old + 1) * kc]);
            r.v[new * kc..(new + 1) * kc].copy_from_slice(&p.v[old * kc..(old + 1) * kc]);
        }
        let fr = r.forward();
        let gr = r.backward(&fr);
        prop_assert!(rel(&fr.out, &f.out, 1e-6) < 1e-6);
        prop_assert!(rel(&fr.lse, &f.lse, 1e-6) < 1e-6);
        prop_assert!(rel(&gr.dq, &g.dq, 1e-6) < 1e-5);
        let unpermute = |x: &[f32]| {
            let mut out = vec![0f32; x.len()];
            for (new, &old) in from.iter().enumerate() {
                out[old * kc..(old + 1) * kc].copy_from_slice(&x[new * kc..(new + 1) * kc]);
            }
            out
        };
        prop_assert!(rel(&unpermute(&gr.dk), &g.dk, 1e-6) < 1e-5);
        prop_assert!(rel(&unpermute(&gr.dv), &g.dv, 1e-6) < 1e-5);
    }

    #[test]
    fn causal_rows_ignore_keys_they_cannot_see(mut p in problem()) {
        p.params.causal = true;
        let f = p.forward();
        let kc = p.kc();
        // Change the last key (and value) of every sequence.
        let mut c = p.clone();
        for b in 0..p.k_lens.len() {
            if p.k_lens[b] > 0 {
                let last = p.k_start(b) + p.k_lens[b] - 1;
                for x in &mut c.k[last * kc..(last + 1) * kc] {
                    *x = -*x * 1.5;
                }
                for x in &mut c.v[last * kc..(last + 1) * kc] {
                    *x += 1.0;
                }
            }
        }
        let fc = c.forward();
        let (hq, d, qc) = (p.params.heads_q, p.params.head_dim, p.qc());
        for b in 0..p.q_lens.len() {
            for i in 0..p.q_lens[b] {
                if p.visible(b, i) == p.k_lens[b] {
                    continue; // sees the last key
                }
                let row = p.q_start(b) + i;
                for h in 0..hq {
                    prop_assert_eq!(
                        &fc.out[row * qc + h * d..][..d],
                        &f.out[row * qc + h * d..][..d]
                    );
                    let l = p.lse_index(b, h, i);
                    prop_assert_eq!(fc.lse[l].to_bits(), f.lse[l].to_bits());
                }
            }
        }
    }

    #[test]
    fn gqa_equals_mha_with_repeated_kv_heads(p in problem()) {
        let (hq, hkv, d) = (p.params.heads_q, p.params.heads_kv, p.params.head_dim);
        let group = hq / hkv;
        let (tk, kc) = (p.tk(), p.kc());
        let repeat = |x: &[f32]| {
            let mut out = Vec::with_capacity(tk * hq * d);
            for r in 0..tk {
                for h in 0..hq {
                    out.extend_from_slice(&x[r * kc + (h / group) * d..][..d]);
                }
            }
            out
        };
        let mut m = p.clone();
        m.params.heads_kv = hq;
        m.k = repeat(&p.k);
        m.v = repeat(&p.v);
        let f = p.forward();
        let g = p.backward(&f);
        let fm = m.forward();
        let gm = m.backward(&fm);
        prop_assert_eq!(&f, &fm);
        prop_assert_eq!(&g.dq, &gm.dq);
        // dK, dV of a KV head: the sum of its query heads' gradients.
        let reduce = |x: &[f32]| {
            let mut out = vec![0f32; tk * kc];
            for r in 0..tk {
                for gi in 0..hkv {
                    for c in 0..d {
                        let s: f64 = (gi * group..(gi + 1) * group)
                            .map(|h| x[r * hq * d + h * d + c] as f64)
                            .sum();
                        out[r * kc + gi * d + c] = s as f32;
                    }
                }
            }
            out
        };
        prop_assert!(rel(&reduce(&gm.dk), &g.dk, 1e-6) < 1e-6);
        prop_assert!(rel(&reduce(&gm.dv), &g.dv, 1e-6) < 1e-6);
    }

    #[test]
    fn varlen_equals_padded_for_equal_lengths(p in problem()) {
        // The drawn shape with every sequence as long as the first, padded.
        let b = p.q_lens.len();
        let (sq, sk) = (p.q_lens[0], p.k_lens[0]);
        let seed = p.q.first().map_or(7, |x| x.to_bits() as u64) ^ 0x5eed;
        let pr = &p.params;
        let padded = build(
            vec![sq; b],
            vec![sk; b],
            true,
            pr.heads_kv,
            pr.heads_q / pr.heads_kv,
            pr.head_dim,
            pr.causal,
            pr.softmax_scale,
            seed,
        );
        let mut varlen = padded.clone();
        varlen.padded = false;
        let (fp, fv) = (padded.forward(), varlen.forward());
        prop_assert_eq!(&fp.out, &fv.out);
        for bi in 0..b {
            for h in 0..p.params.heads_q {
                for i in 0..sq {
                    prop_assert_eq!(
                        fp.lse[padded.lse_index(bi, h, i)].to_bits(),
                        fv.lse[varlen.lse_index(bi, h, i)].to_bits()
                    );
                }
            }
        }
        prop_assert_eq!(padded.backward(&fp), varlen.backward(&fv));
    }

    #[test]
    fn dv_sums_to_dout_and_dk_sums_to_zero(p in problem()) {
        let f = p.forward();
        let g = p.backward(&f);
        let (hq, hkv, d, qc, kc) =
            (p.params.heads_q, p.params.heads_kv, p.params.head_dim, p.qc(), p.kc());
        let group = hq / hkv;
        for b in 0..p.q_lens.len() {
            for gi in 0..hkv {
                let (mut dv_sum, mut dout_sum) = (vec![0f64; d], vec![0f64; d]);
                let (mut dk_sum, mut dk_abs) = (vec![0f64; d], 0f64);
                // What Σ_keys dK = scale·Σ_i (Σ_j dS_ij)·q_i can deviate from 0 by: Σ_j dS_ij =
                // Σ_j P_ij dP_ij − Delta_i vanishes up to the f32 rounding of out (in Delta) and of
                // the LSE (in P), and every dK entry is rounded to f32.
                let mut dk_bound = 0f64;
                for j in 0..p.k_lens[b] {
                    let r = (p.k_start(b) + j) * kc + gi * d;
                    for c in 0..d {
                        dv_sum[c] += g.dv[r + c] as f64;
                        dk_sum[c] += g.dk[r + c] as f64;
                        dk_abs += (g.dk[r + c] as f64).abs();
                    }
                }
                for i in 0..p.q_lens[b] {
                    if p.visible(b, i) == 0 {
                        continue;
                    }
                    let row = p.q_start(b) + i;
                    for h in gi * group..(gi + 1) * group {
                        let at = row * qc + h * d;
                        let mut delta_abs = 0f64;
                        let mut q_abs = 0f64;
                        let rows = p.dout[at..at + d].iter().zip(&f.out[at..]).zip(&p.q[at..]);
                        for (sum, ((&g, &o), &q)) in dout_sum.iter_mut().zip(rows) {
                            *sum += g as f64;
                            delta_abs += (g as f64 * o as f64).abs();
                            q_abs += (q as f64).abs();
                        }
                        let lse = f.lse[p.lse_index(b, h, i)] as f64;
                        dk_bound += p.params.scale() as f64
                            * delta_abs
                            * (1.0 + lse.abs())
                            * f32::EPSILON as f64
                            * q_abs;
                    }
                }
                let err: f64 = dv_sum.iter().zip(&dout_sum).map(|(a, b)| (a - b).abs()).sum();
                let size: f64 = dout_sum.iter().map(|x| x.abs()).sum();
                prop_assert!(err <= 1e-5 * (1.0 + size), "Σ dV − Σ dO = {}", err);
                let dk_err: f64 = dk_sum.iter().map(|x| x.abs()).sum();
                let bound = 4.0 * (dk_bound + dk_abs * f32::EPSILON as f64) + 1e-12;
                prop_assert!(dk_err <= bound, "Σ dK = {} > {}", dk_err, bound);
            }
        }
    }
}
