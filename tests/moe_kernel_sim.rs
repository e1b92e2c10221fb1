//! The CUDA route kernels' logic, checked without a GPU: tests/kernel_sim/moe_sim.cpp compiles
//! the routing header the kernels use (cuda/include/dk_moe_route_math.cuh) for the host, runs
//! each token's `route_token` on 32 cooperative fibers standing in for a warp's lanes, replays
//! the chunk counting, scan and assignment with the kernels' integer helpers, and is compared
//! here with a simple f64 reference written from the specification:
//! - top-k (scores, bias, groups, ties to the lower index, NaN ranked as −∞, order): exactly,
//!   skipping only tokens whose reference decision has a near-tie (0 < gap < 1e-6 relative)
//!   that f32 may break either way; exact ties must go to the lower index;
//! - weights (unbiased scores, renormalisation, scale): 1e-5 relative;
//! - counts, offsets, perm (every entry) and position: exactly, rebuilt from the simulated
//!   expert ids (expert-major, then token, capacity drops, block padding, −1 elsewhere);
//! - the crate's CPU backend on the same inputs: the same experts (near-ties aside), weights
//!   within 1e-5, the same permutation;
//! - the warp converges at every collective, and running the lanes between collectives in
//!   ascending or descending order gives the same bits (no shared-memory race inside a warp).

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use distill_kernels::moe::{max_rows, Route, RouteParams, Score};
use distill_kernels::{Context, Launch, Matrix, Vector, VectorMut};

fn simulator() -> Option<PathBuf> {
    kernel_simulator("moe_kernel_sim", "moe_sim.cpp")
}

#[derive(Clone, Debug)]
struct Cfg {
    e: usize,
    k: usize,
    sigmoid: bool,
    renormalize: bool,
    n_groups: usize,
    topk_groups: usize,
    scale: f32,
    capacity: Option<usize>,
    block: usize,
}

impl Cfg {
    fn new(e: usize, k: usize) -> Self {
        Cfg {
            e,
            k,
            sigmoid: false,
            renormalize: false,
            n_groups: 1,
            topk_groups: 1,
            scale: 1.0,
            capacity: None,
            block: 1,
        }
    }
}

struct Case {
    name: String,
    cfg: Cfg,
    n: usize,
    logits: Vec<f32>,
    bias: Option<Vec<f32>>,
    perm_rows: usize,
}

#[derive(PartialEq, Debug)]
struct SimOut {
    converged: bool,
    ids: Vec<i32>,
    weights: Vec<u32>, // bits, for the bitwise comparison of the two lane orders
    counts: Vec<i32>,
    offsets: Vec<i32>,
    perm: Vec<i32>,
    position: Vec<i32>,
}

/// Reads the simulator's output stream.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let (head, rest) = self.0.split_at(1);
        self.0 = rest;
        head[0]
    }
    fn words(&mut self, n: usize) -> Vec<u32> {
        let (head, rest) = self.0.split_at(4 * n);
        self.0 = rest;
        head.chunks(4)
            .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn ints(&mut self, n: usize) -> Vec<i32> {
        self.words(n).into_iter().map(|x| x as i32).collect()
    }
}

fn run_sim(exe: &PathBuf, cases: &[Case], reverse: bool) -> Vec<SimOut> {
    let mut input = Vec::new();
    for c in cases {
        let g = &c.cfg;
        for v in [
            c.n as i32,
            g.e as i32,
            g.k as i32,
            g.sigmoid as i32,
            g.renormalize as i32,
            g.n_groups as i32,
            g.topk_groups as i32,
        ] {
            input.extend(v.to_ne_bytes());
        }
        input.extend(g.scale.to_ne_bytes());
        for v in [
            g.capacity.unwrap_or(0) as i32,
            g.block as i32,
            c.bias.is_some() as i32,
            reverse as i32,
        ] {
            input.extend(v.to_ne_bytes());
        }
        input.extend((c.perm_rows as i64).to_ne_bytes());
        c.logits.iter().for_each(|x| input.extend(x.to_ne_bytes()));
        if let Some(b) = &c.bias {
            b.iter().for_each(|x| input.extend(x.to_ne_bytes()));
        }
    }
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the MoE simulator");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("simulator output");
    writer.join().unwrap().expect("write simulator input");
    assert!(out.status.success(), "simulator failed: {:?}", out.status);
    let mut r = Reader(&out.stdout);
    let outs = cases
        .iter()
        .map(|c| {
            let nk = c.n * c.cfg.k;
            let e = c.cfg.e;
            SimOut {
                converged: r.byte() == 1,
                ids: r.ints(nk),
                weights: r.words(nk),
                counts: r.ints(e),
                offsets: r.ints(e + 1),
                perm: r.ints(c.perm_rows),
                position: r.ints(nk),
            }
        })
        .collect();
    assert!(r.0.is_empty(), "simulator wrote more than expected");
    outs
}

// ---- The reference, written from the specification ---------------------------------------

fn scores(row: &[f32], sigmoid: bool) -> Vec<f64> {
    let x: Vec<f64> = row.iter().map(|&v| v as f64).collect();
    if sigmoid {
        x.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect()
    } else {
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = x.iter().map(|&v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }
}

/// Natural logs of the scores, which do not underflow where the scores do: softmax x − M −
/// ln Σ e^(x − M) (NaN everywhere when a logit is NaN), sigmoid −ln(1 + e^−x).
fn log_scores(row: &[f32], sigmoid: bool) -> Vec<f64> {
    let x: Vec<f64> = row.iter().map(|&v| v as f64).collect();
    if sigmoid {
        x.iter()
            .map(|&v| {
                if v >= 0.0 {
                    -(-v).exp().ln_1p()
                } else {
                    v - v.exp().ln_1p()
                }
            })
            .collect()
    } else {
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + x.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
        x.iter().map(|&v| v - lse).collect()
    }
}

/// The chosen experts' scores divided by their sum, from log scores: e^(l − max l) over the
/// chosen, so that scores too small for f64 (a sigmoid of −1e30) still have exact ratios. NaN
/// when a chosen log score is NaN or all are −∞ (0 / 0).
fn renormalised(log_scores: &[f64], chosen: &[usize]) -> Vec<f64> {
    let m = chosen
        .iter()
        .map(|&i| log_scores[i])
        .fold(f64::NEG_INFINITY, f64::max);
    let r: Vec<f64> = chosen.iter().map(|&i| (log_scores[i] - m).exp()).collect();
    let sum: f64 = r.iter().sum();
    r.iter().map(|v| v / sum).collect()
}

/// Two finite values an f32 computation may order either way: a few ulps of f32 (~2e-7
/// relative) for the scores and group sums, with a margin.
fn near(a: f64, b: f64) -> bool {
    let d = (a - b).abs();
    a.is_finite() && b.is_finite() && d > 0.0 && d <= 1e-6 * a.abs().max(b.abs())
}

/// The ranking value of a selection score: NaN ranks as −∞ (the specification's total order).
fn rank_key(x: f64) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else {
        x
    }
}

fn desc(v: &[f64]) -> impl Fn(&usize, &usize) -> std::cmp::Ordering + '_ {
    move |&a, &b| v[b].partial_cmp(&v[a]).unwrap().then(a.cmp(&b))
}

/// The chosen experts in order, or None when a decision is a near-tie.
fn reference_topk(cfg: &Cfg, row: &[f32], bias: Option<&[f32]>) -> Option<Vec<usize>> {
    let e = cfg.e;
    let sc = scores(row, cfg.sigmoid);
    let excluding = cfg.n_groups > 1 && cfg.topk_groups < cfg.n_groups;
    // Sigmoid with no bias and no group left out ranks the logits (the exact scores' order).
    let by_logit = cfg.sigmoid && bias.is_none() && !excluding;
    let sel: Vec<f64> = (0..e)
        .map(|i| match bias {
            // NaN still ranks below -inf: -inf moves to f64::MIN, below every f32 logit.
            _ if by_logit && row[i] == f32::NEG_INFINITY => f64::MIN,
            _ if by_logit => rank_key(row[i] as f64),
            Some(b) => rank_key(sc[i] + b[i] as f64),
            None => rank_key(sc[i]),
        })
        .collect();
    let mut allowed = vec![true; e];
    if excluding {
        let gsize = e / cfg.n_groups;
        let gs: Vec<f64> = (0..cfg.n_groups)
            .map(|g| {
                let mut v = sel[g * gsize..(g + 1) * gsize].to_vec();
                v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                rank_key(v[0] + v[1])
            })
            .collect();
        let mut order: Vec<usize> = (0..cfg.n_groups).collect();
        order.sort_by(desc(&gs));
        if near(gs[order[cfg.topk_groups - 1]], gs[order[cfg.topk_groups]]) {
            return None;
        }
        for &g in &order[cfg.topk_groups..] {
            allowed[g * gsize..(g + 1) * gsize].fill(false);
        }
    }
    let mut cand: Vec<usize> = (0..e).filter(|&i| allowed[i]).collect();
    cand.sort_by(desc(&sel));
    for j in 0..cfg.k {
        if j + 1 < cand.len() && near(sel[cand[j]], sel[cand[j + 1]]) {
            return None;
        }
    }
    Some(cand[..cfg.k].to_vec())
}

/// counts, offsets, perm, position for the given expert ids.
fn reference_permutation(
    cfg: &Cfg,
    n: usize,
    ids: &[i32],
    perm_rows: usize,
) -> (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>) {
    let (e, k) = (cfg.e, cfg.k);
    let cap = cfg.capacity.unwrap_or(usize::MAX);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); e];
    for t in 0..n {
        for j in 0..k {
            members[ids[t * k + j] as usize].push(t * k + j);
        }
    }
    let counts: Vec<i32> = members.iter().map(|m| m.len().min(cap) as i32).collect();
    let mut offsets = vec![0i32; e + 1];
    for x in 0..e {
        offsets[x + 1] = offsets[x] + (counts[x] as usize).next_multiple_of(cfg.block) as i32;
    }
    let mut perm = vec![-1i32; perm_rows];
    let mut position = vec![-1i32; n * k];
    for x in 0..e {
        for (rank, &slot) in members[x].iter().enumerate().take(cap) {
            let row = offsets[x] as usize + rank;
            perm[row] = slot as i32;
            position[slot] = row as i32;
        }
    }
    (counts, offsets, perm, position)
}

fn check(c: &Case, o: &SimOut) {
    let (cfg, n, k, e) = (&c.cfg, c.n, c.cfg.k, c.cfg.e);
    let what = &c.name;
    assert!(
        o.converged,
        "{what}: the warp's lanes diverged at a collective"
    );
    let (mut skipped, mut nan_tokens) = (0, 0usize);
    let mut worst = 0.0f64;
    for t in 0..n {
        let ids = &o.ids[t * k..(t + 1) * k];
        for (j, &x) in ids.iter().enumerate() {
            assert!(
                x >= 0 && (x as usize) < e,
                "{what}: token {t} slot {j}: expert {x}"
            );
            assert!(
                !ids[..j].contains(&x),
                "{what}: token {t} picks expert {x} twice: {ids:?}"
            );
        }
        let row = &c.logits[t * e..(t + 1) * e];
        match reference_topk(cfg, row, c.bias.as_deref()) {
            Some(r) => {
                let got: Vec<usize> = ids.iter().map(|&x| x as usize).collect();
                assert_eq!(got, r, "{what}: token {t}: experts (kernel vs reference)");
            }
            None => skipped += 1,
        }
        let chosen: Vec<usize> = ids.iter().map(|&x| x as usize).collect();
        let unscaled = if cfg.renormalize {
            renormalised(&log_scores(row, cfg.sigmoid), &chosen)
        } else {
            let sc = scores(row, cfg.sigmoid);
            chosen.iter().map(|&x| sc[x]).collect()
        };
        for (j, &w) in unscaled.iter().enumerate() {
            let w = w * cfg.scale as f64;
            let got = f32::from_bits(o.weights[t * k + j]) as f64;
            if w.is_nan() {
                assert!(
                    got.is_nan(),
                    "{what}: token {t} slot {j}: weight {got}, reference NaN"
                );
                nan_tokens += usize::from(j == 0);
                continue;
            }
            let err = (got - w).abs() / w.abs().max(1e-30);
            worst = worst.max(err);
            assert!(
                err <= 1e-5,
                "{what}: token {t} slot {j}: weight {got} vs reference {w} (rel {err:e})"
            );
        }
    }
    // Near-ties depend on the data only: this guards against inputs that test nothing.
    assert!(
        skipped <= n / 10 + 2,
        "{what}: {skipped} of {n} tokens have near-ties in the reference"
    );
    let (counts, offsets, perm, position) = reference_permutation(cfg, n, &o.ids, c.perm_rows);
    assert_eq!(o.counts, counts, "{what}: counts");
    assert_eq!(o.offsets, offsets, "{what}: offsets");
    assert_eq!(o.perm, perm, "{what}: perm");
    assert_eq!(o.position, position, "{what}: position");
    println!(
        "{what}: N = {n}, {skipped} near-tie tokens skipped, {nan_tokens} with NaN weights, \
         worst weight rel err {worst:e}"
    );
}

/// The crate's CPU backend (the oracle the GPU tests compare with) on the same case.
fn cpu_route(c: &Case) -> SimOut {
    let g = &c.cfg;
    let params = RouteParams {
        k: g.k,
        score: if g.sigmoid {
            Score::Sigmoid
        } else {
            Score::Softmax
        },
        renormalize: g.renormalize,
        n_groups: g.n_groups,
        topk_groups: g.topk_groups,
        scale: g.scale,
        capacity: g.capacity,
        block: g.block,
    };
    let nk = c.n * g.k;
    let (mut ids, mut weights) = (vec![0i32; nk], vec![0f32; nk]);
    let (mut counts, mut offsets) = (vec![0i32; g.e], vec![0i32; g.e + 1]);
    let (mut perm, mut position) = (vec![0i32; c.perm_rows], vec![0i32; nk]);
    let call = Route {
        logits: Matrix::host(&c.logits, c.n, g.e, g.e).unwrap(),
        bias: c.bias.as_deref().map(Vector::host),
        expert_ids: VectorMut::host(&mut ids),
        weights: VectorMut::host(&mut weights),
        counts: VectorMut::host(&mut counts),
        offsets: VectorMut::host(&mut offsets),
        perm: VectorMut::host(&mut perm),
        position: VectorMut::host(&mut position),
    };
    Context::cpu()
        .moe_route(call, &params, &Launch::default())
        .unwrap_or_else(|e| panic!("{}: CPU route: {e}", c.name));
    SimOut {
        converged: true,
        ids,
        weights: weights.iter().map(|w| w.to_bits()).collect(),
        counts,
        offsets,
        perm,
        position,
    }
}

/// The simulated kernels against the CPU backend: the same experts wherever the reference has
/// no near-tie, weights within 1e-5, and the same permutation when every token agrees.
fn check_against_cpu(c: &Case, sim: &SimOut) {
    let cpu = cpu_route(c);
    let (k, e, what) = (c.cfg.k, c.cfg.e, &c.name);
    let mut all_same = true;
    for t in 0..c.n {
        let (a, b) = (&sim.ids[t * k..(t + 1) * k], &cpu.ids[t * k..(t + 1) * k]);
        if a != b {
            all_same = false;
            let row = &c.logits[t * e..(t + 1) * e];
            assert!(
                reference_topk(&c.cfg, row, c.bias.as_deref()).is_none(),
                "{what}: token {t}: kernel experts {a:?}, CPU backend {b:?}"
            );
            continue;
        }
        for j in t * k..(t + 1) * k {
            let (x, y) = (
                f32::from_bits(sim.weights[j]),
                f32::from_bits(cpu.weights[j]),
            );
            let err = ((x - y).abs() / y.abs().max(1e-30)) as f64;
            assert!(
                (x.is_nan() && y.is_nan()) || err <= 1e-5,
                "{what}: slot {j}: kernel weight {x}, CPU backend {y}"
            );
        }
    }
    if all_same {
        assert_eq!(sim.counts, cpu.counts, "{what}: counts vs CPU backend");
        assert_eq!(sim.offsets, cpu.offsets, "{what}: offsets vs CPU backend");
        assert_eq!(sim.perm, cpu.perm, "{what}: perm vs CPU backend");
        assert_eq!(
            sim.position, cpu.position,
            "{what}: position vs CPU backend"
        );
    }
}

fn run_and_check(cases: &[Case]) {
    let Some(exe) = simulator() else { return };
    let fwd = run_sim(&exe, cases, false);
    let rev = run_sim(&exe, cases, true);
    for ((c, a), b) in cases.iter().zip(&fwd).zip(&rev) {
        assert_eq!(
            a, b,
            "{}: lane order changed the results (a shared-memory race)",
            c.name
        );
        check(c, a);
        check_against_cpu(c, a);
    }
}

// ---- Inputs -------------------------------------------------------------------------------

fn normal_logits(rng: &mut Rng, n: usize, e: usize, std: f64) -> Vec<f32> {
    (0..n * e).map(|_| (rng.normal() * std) as f32).collect()
}

/// Few distinct values: many exact ties.
fn tied_logits(rng: &mut Rng, n: usize, e: usize, levels: usize) -> Vec<f32> {
    (0..n * e)
        .map(|_| rng.below(0, levels) as f32 * 0.5 - 1.0)
        .collect()
}

fn case(name: &str, cfg: Cfg, n: usize, logits: Vec<f32>, bias: Option<Vec<f32>>) -> Case {
    let perm_rows = max_rows(n, cfg.e, cfg.k, cfg.block, cfg.capacity) + 13;
    Case {
        name: name.to_string(),
        cfg,
        n,
        logits,
        bias,
        perm_rows,
    }
}

fn random_bias(rng: &mut Rng, e: usize, std: f64) -> Vec<f32> {
    (0..e).map(|_| (rng.normal() * std) as f32).collect()
}

#[test]
fn route_math_model_configurations() {
    let mut rng = Rng::fresh("moe_sim_models");
    let mut cases = Vec::new();
    let qwen = Cfg {
        renormalize: true,
        ..Cfg::new(128, 8)
    };
    cases.push(case(
        "Qwen3-MoE softmax top-8 of 128, renormalised",
        qwen,
        333,
        normal_logits(&mut rng, 333, 128, 1.5),
        None,
    ));
    let scout = Cfg {
        sigmoid: true,
        ..Cfg::new(16, 1)
    };
    cases.push(case(
        "Llama 4 Scout sigmoid top-1 of 16",
        scout,
        517,
        normal_logits(&mut rng, 517, 16, 2.0),
        None,
    ));
    let maverick = Cfg {
        sigmoid: true,
        ..Cfg::new(128, 1)
    };
    cases.push(case(
        "Llama 4 Maverick sigmoid top-1 of 128",
        maverick,
        161,
        normal_logits(&mut rng, 161, 128, 2.0),
        None,
    ));
    let dsv3 = Cfg {
        sigmoid: true,
        renormalize: true,
        n_groups: 8,
        topk_groups: 4,
        scale: 2.5,
        ..Cfg::new(256, 8)
    };
    let bias = random_bias(&mut rng, 256, 0.05);
    cases.push(case(
        "DeepSeek-V3 sigmoid, bias, 8 groups keep 4, top-8, x2.5",
        dsv3,
        150,
        normal_logits(&mut rng, 150, 256, 2.0),
        Some(bias),
    ));
    run_and_check(&cases);
}

#[test]
fn route_math_groups_and_expert_counts() {
    let mut rng = Rng::fresh("moe_sim_groups");
    let mut cases = Vec::new();
    let grouped = |e, k, ng, tg, sigmoid| Cfg {
        sigmoid,
        n_groups: ng,
        topk_groups: tg,
        ..Cfg::new(e, k)
    };
    // More groups than lanes (one lane per group, several groups per lane).
    let bias = random_bias(&mut rng, 512, 0.02);
    cases.push(case(
        "512 experts, 64 groups keep 5, top-6",
        grouped(512, 6, 64, 5, false),
        70,
        normal_logits(&mut rng, 70, 512, 2.0),
        Some(bias),
    ));
    cases.push(case(
        "1000 experts, 100 groups keep 10, top-8",
        grouped(1000, 8, 100, 10, true),
        21,
        normal_logits(&mut rng, 21, 1000, 2.0),
        None,
    ));
    // Group counts that do not divide 32, groups spanning lanes.
    cases.push(case(
        "60 experts, 3 groups keep 2, top-4",
        grouped(60, 4, 3, 2, true),
        90,
        normal_logits(&mut rng, 90, 60, 2.0),
        None,
    ));
    cases.push(case(
        "96 experts, 12 groups keep 3, top-5",
        grouped(96, 5, 12, 3, false),
        90,
        normal_logits(&mut rng, 90, 96, 2.0),
        None,
    ));
    cases.push(case(
        "40 experts, 20 groups keep 7, top-3",
        grouped(40, 3, 20, 7, true),
        64,
        normal_logits(&mut rng, 64, 40, 2.0),
        None,
    ));
    cases.push(case(
        "8 experts, 4 groups keep 4 (all kept)",
        grouped(8, 2, 4, 4, false),
        40,
        normal_logits(&mut rng, 40, 8, 2.0),
        None,
    ));
    // Expert counts around the per-lane slices.
    for (e, k, n) in [
        (1usize, 1usize, 50usize),
        (2, 2, 33),
        (32, 4, 32),
        (33, 3, 64),
        (64, 7, 31),
        (65, 9, 45),
        (300, 12, 40),
        (1024, 32, 40),
    ] {
        let cfg = Cfg {
            renormalize: e % 2 == 1,
            scale: 0.75,
            ..Cfg::new(e, k)
        };
        cases.push(case(
            &format!("E = {e}, top-{k}"),
            cfg,
            n,
            normal_logits(&mut rng, n, e, 1.0),
            None,
        ));
    }
    run_and_check(&cases);
}

#[test]
fn route_math_exact_ties_go_to_the_lower_index() {
    let mut rng = Rng::fresh("moe_sim_ties");
    let mut cases = Vec::new();
    cases.push(case(
        "softmax ties, top-6 of 64",
        Cfg::new(64, 6),
        128,
        tied_logits(&mut rng, 128, 64, 3),
        None,
    ));
    let cfg = Cfg {
        sigmoid: true,
        n_groups: 8,
        topk_groups: 3,
        renormalize: true,
        ..Cfg::new(128, 5)
    };
    let bias: Vec<f32> = (0..128).map(|_| rng.below(0, 3) as f32 * 0.125).collect();
    cases.push(case(
        "sigmoid ties with quantised bias, 8 groups keep 3, top-5",
        cfg,
        128,
        tied_logits(&mut rng, 128, 128, 2),
        Some(bias),
    ));
    // Every logit equal: experts 0..k in order.
    cases.push(case(
        "all equal, top-8 of 200",
        Cfg::new(200, 8),
        40,
        vec![0.25; 40 * 200],
        None,
    ));
    run_and_check(&cases);
}

#[test]
fn route_math_capacity_padding_and_nan() {
    let mut rng = Rng::fresh("moe_sim_capacity");
    let mut cases = Vec::new();
    let capped = |e, k, cap, block| Cfg {
        capacity: cap,
        block,
        ..Cfg::new(e, k)
    };
    cases.push(case(
        "capacity 5, block 8, top-2 of 16",
        capped(16, 2, Some(5), 8),
        200,
        normal_logits(&mut rng, 200, 16, 1.0),
        None,
    ));
    cases.push(case(
        "capacity 20, block 64, top-8 of 128",
        capped(128, 8, Some(20), 64),
        300,
        normal_logits(&mut rng, 300, 128, 1.0),
        None,
    ));
    cases.push(case(
        "no capacity, block 16, top-4 of 32",
        capped(32, 4, None, 16),
        97,
        normal_logits(&mut rng, 97, 32, 1.0),
        None,
    ));
    cases.push(case(
        "capacity 1, block 1, top-1 of 4",
        capped(4, 1, Some(1), 1),
        65,
        normal_logits(&mut rng, 65, 4, 1.0),
        None,
    ));
    // Skewed routing: most tokens want the same experts.
    let mut skew = normal_logits(&mut rng, 150, 64, 0.5);
    for t in 0..150 {
        skew[t * 64 + 3] += 6.0;
        skew[t * 64 + 40] += 5.0;
    }
    cases.push(case(
        "skewed, capacity 37, block 4, top-3 of 64",
        capped(64, 3, Some(37), 4),
        150,
        skew,
        None,
    ));
    // NaN logits: a NaN selection score ranks as -inf; the weight stays NaN.
    let mut nan = normal_logits(&mut rng, 70, 48, 1.0);
    for t in (0..70).step_by(3) {
        nan[t * 48 + (t % 48)] = f32::NAN;
    }
    let cfg = Cfg {
        sigmoid: true,
        n_groups: 4,
        topk_groups: 2,
        ..capped(48, 4, Some(9), 2)
    };
    cases.push(case(
        "NaN logits, sigmoid, groups",
        cfg,
        70,
        nan.clone(),
        None,
    ));
    // Saturating sigmoid scores (f32: 1 from x ~ 17, 0 below ~ -88): ranked by the logits.
    cases.push(case(
        "sigmoid, saturated logits, top-4 of 16",
        Cfg {
            sigmoid: true,
            ..capped(16, 4, None, 1)
        },
        70,
        normal_logits(&mut rng, 70, 16, 60.0),
        None,
    ));
    // By logit (sigmoid, no bias, no group left out): NaN still below -inf.
    let mut nan_inf = normal_logits(&mut rng, 70, 16, 1.0);
    for t in 0..70 {
        nan_inf[t * 16 + t % 16] = f32::NAN;
        nan_inf[t * 16 + (t + 5) % 16] = f32::NEG_INFINITY;
        if t % 4 == 0 {
            // a token with most experts NaN or -inf, so k reaches them
            for j in 0..12 {
                nan_inf[t * 16 + j] = if j % 2 == 0 {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
    }
    cases.push(case(
        "NaN and -inf logits, sigmoid by logit, top-6 of 16",
        Cfg {
            sigmoid: true,
            ..capped(16, 6, None, 1)
        },
        70,
        nan_inf,
        None,
    ));
    cases.push(case(
        "NaN logits, softmax",
        capped(48, 4, None, 1),
        70,
        nan,
        None,
    ));
    run_and_check(&cases);
}

#[test]
fn route_math_renormalises_scores_that_underflow() {
    // f32 scores of these tokens underflow (sigmoid below ~-88, softmax probabilities ~87 below
    // the max): renormalised, their ratios must still be exact, not 0 / 0.
    let mut rng = Rng::fresh("moe_sim_underflow");
    let mut cases = Vec::new();
    let renorm = |e, k, sigmoid| Cfg {
        sigmoid,
        renormalize: true,
        ..Cfg::new(e, k)
    };
    // Sigmoid ranked by logit: tokens around -95 (every score 0 or subnormal), -75 (small but
    // normal), -10 with a spread of 1 (below the direct-division bound, where the sigmoid
    // factor (1 + e^mc) / (1 + e^x) moves the ratios by ~1e-3), -6 (mostly above it) and 0.
    let centres = [
        (-95.0f32, 3.0f32),
        (-75.0, 3.0),
        (-10.0, 1.0),
        (-6.0, 3.0),
        (0.0, 3.0),
    ];
    let mut lg = normal_logits(&mut rng, 120, 16, 1.0);
    for (t, row) in lg.chunks_mut(16).enumerate() {
        let (centre, spread) = centres[t % 5];
        row.iter_mut().for_each(|v| *v = *v * spread + centre);
    }
    // The tokens near -10 must take the ratios-from-logits path, and with a factor that matters.
    let small_path = lg
        .chunks(16)
        .filter(|row| {
            let mut s: Vec<f64> = row
                .iter()
                .map(|&x| 1.0 / (1.0 + (-x as f64).exp()))
                .collect();
            s.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let total: f64 = s[..4].iter().sum();
            total < 1.0 / 256.0 && s[0] > 1e-5
        })
        .count();
    assert!(
        small_path >= 20,
        "{small_path} tokens near -10 below the bound"
    );
    cases.push(case(
        "sigmoid, logits near -95 / -75 / -10 / -6 / 0, top-4 of 16",
        renorm(16, 4, true),
        120,
        lg,
        None,
    ));
    // Logits that f64 cannot exponentiate either, and tokens whose chosen logits are all -inf
    // (NaN weights: 0 / 0) next to tokens with one finite chosen logit.
    let mut far: Vec<f32> = (0..64 * 8)
        .map(|_| -1e30 * (1.0 + rng.uniform() as f32))
        .collect();
    for t in (0..64).step_by(5) {
        far[t * 8..(t + 1) * 8].fill(f32::NEG_INFINITY);
        if t % 2 == 1 {
            far[t * 8 + 3] = -3.0e38;
        }
    }
    cases.push(case(
        "sigmoid, logits near -1e30 and -inf, top-3 of 8",
        renorm(8, 3, true),
        64,
        far,
        None,
    ));
    // Softmax with a selection bias that picks experts ~150 below the token's best logit.
    let mut soft = normal_logits(&mut rng, 90, 64, 1.0);
    for row in soft.chunks_mut(64) {
        row[..8].iter_mut().for_each(|v| *v = *v * 4.0 - 150.0);
    }
    let mut bias = vec![0f32; 64];
    bias[..8].fill(10.0);
    cases.push(case(
        "softmax, bias picks experts 150 below the max, top-4 of 64",
        renorm(64, 4, false),
        90,
        soft,
        Some(bias),
    ));
    // DeepSeek-V3's configuration on logits near -100.
    let mut deep = normal_logits(&mut rng, 40, 256, 4.0);
    deep.iter_mut().for_each(|v| *v -= 100.0);
    let bias = random_bias(&mut rng, 256, 0.05);
    cases.push(case(
        "DeepSeek-V3 configuration, logits near -100",
        Cfg {
            n_groups: 8,
            topk_groups: 4,
            scale: 2.5,
            ..renorm(256, 8, true)
        },
        40,
        deep,
        Some(bias),
    ));
    run_and_check(&cases);
}
