//! The divergence's loss scale and loss sum (cuda/divergence.cu: `dk_div_prepare`,
//! `dk_div_finish`), checked without a GPU. The REAL kernel source is compiled for the host with
//! the emulator of tests/attention_sim/sim_core.h (every CUDA thread a fiber, warp collectives,
//! __syncthreads, guarded memory; tests/divergence_sim/divergence_prepare_sim.cpp is the
//! driver) and launched as src/divergence/cuda.rs does: one block of 1024 threads each.
//!
//! The contract (DESIGN.md, README's `num_items`): under `batchmean` the scale is
//! 1 / #valid rows (rows whose label is not `ignore_index`; all rows without labels; 1 when
//! none is valid), correctly rounded to f32; or `1 / num_items` (a parameter, or one f32 in
//! device memory: the sum when that value is not a finite float of at least 2^-126); `sum` and
//! `none` give 1. The loss is `scale · Σ per_row` in f64, rounded once.
//!
//! Cases: labels with ignored rows at a count that is not a multiple of the block; 2^24 + 3
//! labels, two ignored (2^24 + 1 valid rows: a count an f32 cannot hold, which the kernel
//! counted in f32 until 2026-11-28); 2^24 + 1 rows without labels (the same, through the
//! no-labels path); every label ignored; no rows; `num_items` as a parameter and in memory
//! (normal, the smallest normal, subnormal, NaN, ±inf, negative, zero); `sum` and `none`; the
//! loss sum of random per-row losses. Every case runs with the threads ascending and descending:
//! the two results must be bitwise equal.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;

const TEST: &str = "divergence_prepare_sim";
const IGNORE: i64 = -100;
const BATCHMEAN: i32 = 0;
const SUM: i32 = 1;
const NONE: i32 = 2;

fn simulator() -> Option<PathBuf> {
    static SIM: OnceLock<Option<PathBuf>> = OnceLock::new();
    SIM.get_or_init(|| divergence_cu_simulator(TEST, "divergence_prepare_sim.cpp"))
        .clone()
}

struct Case {
    what: String,
    n: usize,
    reduction: i32,
    num_items: f32,
    mem: Option<f32>,
    labels: Option<Vec<i64>>,
    per_row: Option<Vec<f32>>,
    /// The scale the contract gives.
    scale: f32,
}

fn input(c: &Case, reverse: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(0x5344_4b44u32.to_ne_bytes());
    b.extend((reverse as i32).to_ne_bytes());
    b.extend((c.n as i64).to_ne_bytes());
    b.extend(IGNORE.to_ne_bytes());
    b.extend(c.reduction.to_ne_bytes());
    b.extend(c.num_items.to_ne_bytes());
    b.extend((c.mem.is_some() as i32).to_ne_bytes());
    b.extend(c.mem.unwrap_or(0.0).to_ne_bytes());
    b.extend((c.labels.is_some() as i32).to_ne_bytes());
    b.extend((c.per_row.is_some() as i32).to_ne_bytes());
    if let Some(l) = &c.labels {
        b.extend(((l.len() * 8) as u64).to_ne_bytes());
        for x in l {
            b.extend(x.to_ne_bytes());
        }
    }
    if let Some(p) = &c.per_row {
        b.extend(((p.len() * 4) as u64).to_ne_bytes());
        for x in p {
            b.extend(x.to_ne_bytes());
        }
    }
    b
}

/// 1 / count in f64, rounded once to f32 (the count at least 1).
fn inverse(count: usize) -> f32 {
    (1.0 / count.max(1) as f64) as f32
}

/// Labels for `n` rows, the rows in `ignored` set to IGNORE, the others random token ids.
fn labels(rng: &mut Rng, n: usize, ignored: &[usize]) -> Vec<i64> {
    let mut l: Vec<i64> = (0..n).map(|_| rng.below(0, 200_000) as i64).collect();
    for &i in ignored {
        l[i] = IGNORE;
    }
    l
}

fn cases(rng: &mut Rng) -> Vec<Case> {
    let plain = |what: &str, n, labels: Option<Vec<i64>>, scale| Case {
        what: what.into(),
        n,
        reduction: BATCHMEAN,
        num_items: 0.0,
        mem: None,
        labels,
        per_row: None,
        scale,
    };
    let mut out = Vec::new();
    // Ignored rows scattered over a count that is not a multiple of the block.
    let n = 5000;
    let ignored: Vec<usize> = (0..n).filter(|i| i % 7 == 3 || i % 1024 == 0).collect();
    let valid = n - ignored.len();
    out.push(plain(
        "labels, some ignored",
        n,
        Some(labels(rng, n, &ignored)),
        inverse(valid),
    ));
    // 2^24 + 1 valid rows: not an f32 integer (the f32 count rounded it to 2^24 or 2^24 + 2).
    let big = (1 << 24) + 3;
    out.push(plain(
        "2^24 + 3 labels, 2 ignored",
        big,
        Some(labels(rng, big, &[17, big - 1])),
        inverse(big - 2),
    ));
    let big = (1 << 24) + 1;
    out.push(plain("2^24 + 1 rows, no labels", big, None, inverse(big)));
    out.push(plain(
        "every label ignored",
        300,
        Some(vec![IGNORE; 300]),
        1.0,
    ));
    out.push(plain("no rows", 0, None, 1.0));
    out.push(Case {
        num_items: 7.5,
        ..plain(
            "num_items 7.5 (parameter)",
            40,
            Some(labels(rng, 40, &[1])),
            1.0 / 7.5f32,
        )
    });
    for (value, scale) in [
        (3.0f32, 1.0 / 3.0f32),
        (f32::MIN_POSITIVE, 1.0 / f32::MIN_POSITIVE),
        (f32::MIN_POSITIVE / 2.0, 1.0),
        (f32::NAN, 1.0),
        (f32::INFINITY, 1.0),
        (f32::NEG_INFINITY, 1.0),
        (-2.0, 1.0),
        (0.0, 1.0),
    ] {
        // In memory it wins over the parameter and the labels.
        out.push(Case {
            num_items: 5.0,
            mem: Some(value),
            ..plain(
                &format!("num_items {value:e} in memory"),
                40,
                Some(labels(rng, 40, &[2])),
                scale,
            )
        });
    }
    for (reduction, name) in [(SUM, "sum"), (NONE, "none")] {
        out.push(Case {
            reduction,
            num_items: 3.0,
            mem: Some(2.0),
            ..plain(name, 40, Some(labels(rng, 40, &[0])), 1.0)
        });
    }
    // The loss: random per-row losses, scaled by 1 / #valid.
    let n = 3000;
    let ignored = [5usize, 2048, 2999];
    out.push(Case {
        per_row: Some((0..n).map(|_| (rng.uniform() * 3.0) as f32).collect()),
        ..plain(
            "loss of 3000 rows",
            n,
            Some(labels(rng, n, &ignored)),
            inverse(n - ignored.len()),
        )
    });
    out
}

fn check(c: &Case, out: &[u8]) -> Result<(), String> {
    let scale = f32::from_ne_bytes(out[..4].try_into().unwrap());
    if scale.to_bits() != c.scale.to_bits() {
        return Err(format!(
            "scale {scale:e} ({:#010x}), the contract gives {:e} ({:#010x})",
            scale.to_bits(),
            c.scale,
            c.scale.to_bits()
        ));
    }
    if let Some(p) = &c.per_row {
        let loss = f32::from_ne_bytes(out[4..8].try_into().unwrap());
        // f64 sums in another order differ in their last bits; rounded to f32 they agree
        // within one f32 step.
        let exact = p.iter().map(|&x| x as f64).sum::<f64>() * c.scale as f64;
        let ulp = (exact as f32).abs() * f32::EPSILON;
        if (loss as f64 - exact).abs() > ulp as f64 {
            return Err(format!("loss {loss:e}, expected {exact:e} within {ulp:e}"));
        }
    }
    Ok(())
}

#[test]
fn loss_scale_and_sum_follow_the_contract() {
    let Some(exe) = simulator() else { return };
    let mut rng = Rng::fresh(TEST);
    let cases = cases(&mut rng);
    run_cases_parallel(TEST, cases.len(), |i| {
        let c = &cases[i];
        let expect = if c.per_row.is_some() { 8 } else { 4 };
        let run = |reverse| run_emulator(&exe, input(c, reverse), expect);
        let result = (|| {
            let (fwd, log) = run(false)?;
            let (rev, _) = run(true)?;
            if fwd != rev {
                return Err("ascending and descending thread orders differ".to_string());
            }
            check(c, &fwd)?;
            Ok(log)
        })();
        (c.what.clone(), result)
    });
}
