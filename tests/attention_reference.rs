//! Grouped-query attention against an INDEPENDENT naive f64 reference (`common::attention`:
//! expanded K / V per query head, full score matrices with explicit masks), on the CPU and on
//! CUDA device 0 when present (a visible SKIPPED line otherwise).
//!
//! Every run draws fresh random inputs (never zeros), poisons every output, and checks that
//! every output element was written, that nothing outside the outputs changed, and that
//! forward (out, LSE) and all three gradients are within tolerance of the reference computed
//! from the same rounded inputs (the backward from the backend's own forward out and LSE):
//!
//! - CPU (f64 inside, one rounding per output): the error of the reference rounded to the
//!   dtype, plus 2e-6 (the f32 LSE it is given); the LSE within 1e-6;
//! - CUDA: DESIGN.md's tolerances, ‖x − ref‖ / ‖ref‖ ≤ 1e-2 for bf16 / f16 outputs and the f32
//!   LSE ≤ 1e-4, and the same against the CPU backend run on the CUDA run's inputs.
//!
//! Rows that see no key must give exactly out = 0, LSE = −∞ and dq = 0; keys no query sees
//! exactly dk = dv = 0. f32 runs on the CPU only (CUDA rejects f32, see attention_bad_input).
//!
//! Cases: Sq ≠ Sk both ways with causal alignment, length-1 sequences, fully masked rows,
//! varlen batches with empty and uneven sequences and loose length bounds, empty batches,
//! lengths across the CUDA kernels' 64- and 128-row tiles,
//! Hq / Hkv ∈ {1, 3, 8}, D ∈ {64, 128}, non-contiguous token strides (q, k, v sliced from a fused
//! qkv buffer, gradients into a packed dqkv buffer), custom softmax scales; gradients against
//! central finite differences on tiny f32 shapes (the reference itself too); determinism.

mod common;

use common::attention::*;
use common::*;
use distill_kernels::attention::AttentionParams;
use distill_kernels::{Context, DType};

/// Denominator floor of the relative errors.
const FLOOR: f64 = 1e-6;

/// DESIGN.md: f32 paths ≤ 1e-5; bf16 / f16 outputs ≤ 1e-2.
fn design_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 | DType::F16 => 1e-2,
    }
}

fn params(hq: usize, hkv: usize, d: usize, causal: bool) -> AttentionParams {
    AttentionParams::new(hq, hkv, d).causal(causal)
}

/// Share of a gradient's cancellation-free magnitude (`RefGrads::dq_magnitude`) that floors the
/// denominator of its relative error: where the exact gradient cancels to ~0 (a query that sees
/// one key has dS = 0), the allowed absolute error is tol · 1e-2 of that magnitude, 1000 times
/// the f32 rounding the kernels leave there and far below any real defect's error.
const MAGNITUDE_FLOOR: f64 = 1e-2;

/// The denominator floor of a relative error given the output's cancellation-free magnitude.
fn floor_for(magnitude: f64) -> f64 {
    FLOOR.max(MAGNITUDE_FLOOR * magnitude)
}

/// Compares one output against its reference: the CPU within the rounding error of the
/// reference plus 2e-6, CUDA within DESIGN.md's tolerance. `magnitude`: the cancellation-free
/// norm of a gradient that can cancel (dq, dk), 0 for the others.
fn compare(
    dev: &Device,
    case: &AttnCase,
    what: &str,
    got: &[f64],
    reference: &[f64],
    magnitude: f64,
) {
    let floor = floor_for(magnitude);
    let e = rel_err(got, reference, floor);
    let rounded: Vec<f64> = reference.iter().map(|&x| round_to(case.dtype, x)).collect();
    let inherent = rel_err(&rounded, reference, floor);
    let tol = if dev.is_cuda() {
        design_tol(case.dtype)
    } else {
        (inherent + 2e-6).min(design_tol(case.dtype))
    };
    assert!(
        e <= tol,
        "[{}] {}: {what} error {e:.3e} > {tol:.1e} (rounding alone: {inherent:.1e}; \
         denominator floor {floor:.1e})",
        dev.name(),
        case.what
    );
}

/// The LSE against the reference: −∞ exactly where the reference is, finite entries within
/// 1e-6 (CPU) or 1e-4 (CUDA).
fn compare_lse(dev: &Device, case: &AttnCase, got: &[f32], reference: &[f64]) {
    let (mut g, mut r) = (Vec::new(), Vec::new());
    for (i, (&x, &y)) in got.iter().zip(reference).enumerate() {
        if y == f64::NEG_INFINITY {
            assert!(
                x == f32::NEG_INFINITY,
                "[{}] {}: lse[{i}] = {x}, -inf expected (row sees no key)",
                dev.name(),
                case.what
            );
        } else {
            assert!(
                x.is_finite(),
                "[{}] {}: lse[{i}] = {x}, {y} expected",
                dev.name(),
                case.what
            );
            g.push(x as f64);
            r.push(y);
        }
    }
    let tol = if dev.is_cuda() { 1e-4 } else { 1e-6 };
    let e = rel_err(&g, &r, FLOOR);
    assert!(
        e <= tol,
        "[{}] {}: lse error {e:.3e} > {tol:.0e}",
        dev.name(),
        case.what
    );
}

/// Exact zeros where a row sees no key (out, dq) and where no query sees a key (dk, dv).
fn check_exact_zeros(dev: &Device, case: &AttnCase, out: &[f64], grads: Option<&Grads>) {
    let (d, qc, kc) = (case.d(), case.qc(), case.kc());
    for (row, h) in masked_rows(case) {
        let cols = row * qc + h * d..row * qc + (h + 1) * d;
        assert!(
            out[cols.clone()].iter().all(|&x| x == 0.0),
            "[{}] {}: out of masked row {row} head {h} is not 0",
            dev.name(),
            case.what
        );
        if let Some(g) = grads {
            assert!(
                g.dq[cols].iter().all(|&x| x == 0.0),
                "[{}] {}: dq of masked row {row} head {h} is not 0",
                dev.name(),
                case.what
            );
        }
    }
    if let Some(g) = grads {
        for row in unseen_keys(case) {
            let cols = row * kc..(row + 1) * kc;
            assert!(
                g.dk[cols.clone()].iter().all(|&x| x == 0.0)
                    && g.dv[cols].iter().all(|&x| x == 0.0),
                "[{}] {}: dk / dv of key row {row}, which no query sees, is not 0",
                dev.name(),
                case.what
            );
        }
    }
}

/// Forward on `dev`, checked; returns the outputs.
fn forward(dev: &Device, case: &AttnCase) -> FwdOut {
    let (res, before, after) = case.run_fwd(dev);
    res.unwrap_or_else(|e| panic!("[{}] {}: forward failed: {e}", dev.name(), case.what));
    case.fwd_outputs(&before, &after)
        .unwrap_or_else(|e| panic!("[{}] {}: forward: {e}", dev.name(), case.what))
}

/// Backward on `dev` from the given out and LSE, checked for writes; returns the gradients.
fn backward(dev: &Device, case: &AttnCase, out: &[f64], lse: &[f32], ws: Ws) -> Grads {
    let (res, before, after) = case.run_bwd_edited(dev, out, lse, ws, |_| {});
    res.unwrap_or_else(|e| panic!("[{}] {}: backward failed: {e}", dev.name(), case.what));
    case.bwd_outputs(&before, &after)
        .unwrap_or_else(|e| panic!("[{}] {}: backward: {e}", dev.name(), case.what))
}

/// Runs forward and backward of `case` on `dev` and checks both against the reference (and,
/// on CUDA, against the CPU backend on the same inputs). Returns the outputs.
fn check_case_ws(dev: &Device, case: &AttnCase, ws: Ws) -> (FwdOut, Grads) {
    let fwd = forward(dev, case);
    let r = reference_forward(case);
    compare(dev, case, "out", &fwd.out, &r.out, 0.0);
    compare_lse(dev, case, &fwd.lse, &r.lse);
    let grads = backward(dev, case, &fwd.out, &fwd.lse, ws);
    // The reference gradient from the same inputs: Delta from the out the backend was given.
    let rg = reference_backward(case, Some(&fwd.out));
    compare(dev, case, "dq", &grads.dq, &rg.dq, rg.dq_magnitude);
    compare(dev, case, "dk", &grads.dk, &rg.dk, rg.dk_magnitude);
    compare(dev, case, "dv", &grads.dv, &rg.dv, 0.0);
    check_exact_zeros(dev, case, &fwd.out, Some(&grads));
    if dev.is_cuda() {
        // CUDA against the crate's CPU backend on exactly the CUDA run's inputs.
        let cpu = Device::Cpu(Context::cpu());
        let cf = forward(&cpu, case);
        let cg = backward(&cpu, case, &fwd.out, &fwd.lse, Ws::Library);
        let tol = design_tol(case.dtype);
        for (what, got, want, magnitude) in [
            ("out", &fwd.out, &cf.out, 0.0),
            ("dq", &grads.dq, &cg.dq, rg.dq_magnitude),
            ("dk", &grads.dk, &cg.dk, rg.dk_magnitude),
            ("dv", &grads.dv, &cg.dv, 0.0),
        ] {
            let e = rel_err(got, want, floor_for(magnitude));
            assert!(
                e <= tol,
                "[cuda vs cpu backend] {}: {what} error {e:.3e} > {tol:.0e}",
                case.what
            );
        }
    }
    (fwd, grads)
}

fn check_case(dev: &Device, case: &AttnCase) -> (FwdOut, Grads) {
    check_case_ws(dev, case, Ws::Library)
}

/// Runs `case` on every device that takes its dtype (f32: the CPU only).
fn check_everywhere(test: &str, case: &AttnCase) {
    for dev in devices(test) {
        if dev.is_cuda() && case.dtype == DType::F32 {
            continue;
        }
        check_case(&dev, case);
    }
}

#[test]
fn padded_causal_alignment_both_ways() {
    let test = "padded_causal_alignment_both_ways";
    let mut rng = Rng::fresh(test);
    // (B, Sq, Sk, Hq, Hkv, D, causal)
    let shapes = [
        (2, 5, 9, 3, 1, 64, true), // Sq < Sk: every query sees Sk − Sq + i + 1 keys
        (2, 9, 5, 8, 8, 128, true), // Sq > Sk: the first 4 queries see nothing
        (1, 7, 12, 8, 1, 128, false), // group of 8, not causal
        (3, 6, 4, 6, 2, 64, false), // group of 3
        (2, 4, 4, 2, 2, 64, true), // square
        (1, 17, 33, 3, 3, 64, true), // odd lengths
    ];
    for (i, &(b, sq, sk, hq, hkv, d, causal)) in shapes.iter().enumerate() {
        for dtype in DType::ALL {
            // Alternate contiguous and padded token strides.
            let layout = Layout::Separate { pad: 8 * (i % 3) };
            let case = AttnCase::random(
                &mut rng,
                dtype,
                Seqs::padded(b, sq, sk),
                params(hq, hkv, d, causal),
                layout,
            );
            check_everywhere(test, &case);
        }
    }
}

#[test]
fn length_one_sequences() {
    let test = "length_one_sequences";
    let mut rng = Rng::fresh(test);
    // (B, Sq, Sk, causal): single query and key; one query against many keys (sees all); many
    // queries against one key (only the last sees it when causal).
    for &(b, sq, sk, causal) in &[
        (3, 1, 1, true),
        (3, 1, 1, false),
        (2, 1, 7, true),
        (2, 7, 1, true),
        (2, 7, 1, false),
    ] {
        for dtype in [DType::BF16, DType::F32, DType::F16] {
            let case = AttnCase::random(
                &mut rng,
                dtype,
                Seqs::padded(b, sq, sk),
                params(6, 2, 64, causal),
                Layout::Separate { pad: 0 },
            );
            check_everywhere(test, &case);
        }
    }
    let case = AttnCase::random(
        &mut rng,
        DType::BF16,
        Seqs::varlen(&[1, 1, 1], &[1, 3, 1]),
        params(3, 1, 128, true),
        Layout::Separate { pad: 0 },
    );
    check_everywhere(test, &case);
}

#[test]
fn fully_masked_rows() {
    let test = "fully_masked_rows";
    let mut rng = Rng::fresh(test);
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        // Causal with Sq > Sk: queries 0..Sq − Sk see nothing.
        let padded = AttnCase::random(
            &mut rng,
            dtype,
            Seqs::padded(2, 8, 3),
            params(4, 2, 64, true),
            Layout::Separate { pad: 0 },
        );
        // Varlen: a sequence with queries and no keys (masked, causal or not), one with keys
        // and no queries (its dk / dv must be 0).
        let varlen = AttnCase::random(
            &mut rng,
            dtype,
            Seqs::varlen(&[3, 4, 0, 2], &[0, 5, 3, 2]),
            params(3, 3, 128, false),
            Layout::Separate { pad: 8 },
        );
        for case in [&padded, &varlen] {
            assert!(!masked_rows(case).is_empty());
            for dev in devices(test) {
                if dev.is_cuda() && dtype == DType::F32 {
                    continue;
                }
                let (fwd, grads) = check_case(&dev, case);
                for (row, h) in masked_rows(case) {
                    let b = (0..case.seqs.batch())
                        .rfind(|&b| case.seqs.q_start(b) <= row && case.seqs.q[b] > 0)
                        .unwrap();
                    let i = row - case.seqs.q_start(b);
                    let l = fwd.lse[case.seqs.lse_index(case.hq(), b, h, i)];
                    assert_eq!(l, f32::NEG_INFINITY, "{}: lse of masked row", case.what);
                }
                assert!(grads.dq.iter().any(|&x| x != 0.0), "{}", case.what);
            }
        }
        assert!(!unseen_keys(&varlen).is_empty());
    }
}

#[test]
fn varlen_uneven_and_empty_sequences() {
    let test = "varlen_uneven_and_empty_sequences";
    let mut rng = Rng::fresh(test);
    let lens: [(&[usize], &[usize]); 3] = [
        (&[3, 0, 5, 1, 4], &[4, 2, 0, 7, 4]),
        (&[9, 2, 13], &[9, 2, 13]),
        (&[0, 6, 0], &[5, 1, 0]),
    ];
    let heads = [(6, 2, 64), (8, 1, 128), (3, 3, 64)];
    for (i, (q, k)) in lens.iter().enumerate() {
        for (j, &(hq, hkv, d)) in heads.iter().enumerate() {
            for causal in [false, true] {
                let dtype = DType::ALL[(i + j + causal as usize) % 3];
                // Exact bounds, and loose ones (upper bounds are allowed).
                let seqs = Seqs::varlen(q, k).loose_bounds(j, 2 * j);
                let case = AttnCase::random(
                    &mut rng,
                    dtype,
                    seqs,
                    params(hq, hkv, d, causal),
                    Layout::Separate { pad: 8 * j },
                );
                for dev in devices(test) {
                    if dev.is_cuda() && dtype == DType::F32 {
                        continue;
                    }
                    // On CUDA, alternate the library's workspace and an exact caller one.
                    let ws = if causal { Ws::Exact } else { Ws::Library };
                    check_case_ws(&dev, &case, ws);
                }
            }
        }
    }
}

#[test]
fn varlen_equals_padded_with_equal_lengths() {
    let test = "varlen_equals_padded_with_equal_lengths";
    let mut rng = Rng::fresh(test);
    for dev in devices(test) {
        let dtype = if dev.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let padded = AttnCase::random(
            &mut rng,
            dtype,
            Seqs::padded(3, 5, 7),
            params(6, 2, 64, true),
            Layout::Separate { pad: 0 },
        );
        let mut varlen = padded.clone();
        varlen.seqs = Seqs::varlen(&[5, 5, 5], &[7, 7, 7]);
        let (pf, pg) = check_case(&dev, &padded);
        let (vf, vg) = check_case(&dev, &varlen);
        assert_eq!(pf.out, vf.out, "[{}] out", dev.name());
        assert_eq!(
            (pg.dq, pg.dk, pg.dv),
            (vg.dq, vg.dk, vg.dv),
            "[{}]",
            dev.name()
        );
        // [B, Hq, Sq] against [Hq, Tq].
        for b in 0..3 {
            for h in 0..6 {
                for i in 0..5 {
                    assert_eq!(
                        pf.lse[padded.seqs.lse_index(6, b, h, i)].to_bits(),
                        vf.lse[varlen.seqs.lse_index(6, b, h, i)].to_bits(),
                        "[{}] lse b={b} h={h} i={i}",
                        dev.name()
                    );
                }
            }
        }
    }
}

#[test]
fn empty_batches() {
    let test = "empty_batches";
    let mut rng = Rng::fresh(test);
    for seqs in [
        Seqs::padded(0, 4, 4),
        Seqs::padded(2, 0, 5),
        Seqs::padded(2, 3, 0),
        Seqs::varlen(&[], &[]),
        Seqs::varlen(&[0, 0], &[3, 2]),
        Seqs::varlen(&[2, 1], &[0, 0]),
    ] {
        let case = AttnCase::random(
            &mut rng,
            DType::BF16,
            seqs,
            params(4, 2, 64, true),
            Layout::Separate { pad: 0 },
        );
        check_everywhere(test, &case);
    }
    // Empty operands may be null.
    let case = AttnCase::random(
        &mut rng,
        DType::F16,
        Seqs::varlen(&[0, 0], &[3, 2]),
        params(4, 2, 64, false),
        Layout::Separate { pad: 0 },
    );
    for dev in devices(test) {
        let (res, before, after) = case.run_fwd_edited(&dev, |s| {
            s.q = s.q.null();
            s.out = s.out.null();
            s.lse = s.lse.null();
        });
        res.unwrap_or_else(|e| panic!("[{}] null empty operands: {e}", dev.name()));
        assert!(before == after, "[{}] an empty forward wrote", dev.name());
        let (res, before, after) = case.run_bwd_edited(&dev, &[], &[], Ws::Library, |s| {
            s.q = s.q.null();
            s.dout = s.dout.null();
            s.out = s.out.null();
            s.lse = s.lse.null();
            s.dq = s.dq.null();
        });
        res.unwrap_or_else(|e| panic!("[{}] null empty operands (backward): {e}", dev.name()));
        let g = case.bwd_outputs(&before, &after).unwrap();
        assert!(g.dk.iter().chain(&g.dv).all(|&x| x == 0.0));
    }
}

#[test]
fn head_dims_and_group_sizes() {
    let test = "head_dims_and_group_sizes";
    let mut rng = Rng::fresh(test);
    // Hq / Hkv ∈ {1, 3, 8}, with one and two KV heads, D ∈ {64, 128}.
    let heads = [(1, 1), (2, 2), (3, 1), (6, 2), (8, 1), (16, 2)];
    for (i, &(hq, hkv)) in heads.iter().enumerate() {
        for d in [64, 128] {
            let dtype = [DType::BF16, DType::F16][(i + d / 64) % 2];
            let case = AttnCase::random(
                &mut rng,
                dtype,
                Seqs::padded(2, 6, 10),
                params(hq, hkv, d, i % 2 == 0),
                Layout::Separate { pad: 0 },
            );
            check_everywhere(test, &case);
        }
    }
}

#[test]
fn half_precision_gradients_against_the_exact_reference() {
    // The other tests build the reference gradient with Delta = rowsum(dO ∘ out) from the
    // rounded out the backend was given, as the kernels (and FlashAttention) do. DESIGN.md's
    // 1e-2 for bf16 / f16 gradients is against an f64 reference, so here the reference is
    // exact throughout (Delta = rowsum(P ∘ dP) in f64), on shapes like the students' heads:
    // D 128 and 64, groups of 3 and 4, 48–96 keys, the default scale. (With a handful of
    // keys and a large scale, Delta from a bf16 out alone can cost ~1.5e-2, as in FA2:
    // cuda/ATTENTION.md, "Tolerances".)
    let test = "half_precision_gradients_against_the_exact_reference";
    let mut rng = Rng::fresh(test);
    // (B, Sq, Sk, Hq, Hkv, D, causal)
    let shapes = [
        (1, 64, 64, 6, 2, 128, true),
        (2, 48, 80, 4, 1, 64, true),
        (1, 96, 96, 8, 2, 128, false),
    ];
    for &(b, sq, sk, hq, hkv, d, causal) in &shapes {
        for dtype in [DType::BF16, DType::F16] {
            let case = AttnCase::random(
                &mut rng,
                dtype,
                Seqs::padded(b, sq, sk),
                params(hq, hkv, d, causal),
                Layout::Separate { pad: 0 },
            );
            let exact = reference_backward(&case, None);
            for dev in devices(test) {
                let fwd = forward(&dev, &case);
                let grads = backward(&dev, &case, &fwd.out, &fwd.lse, Ws::Library);
                for (what, got, want, magnitude) in [
                    ("dq", &grads.dq, &exact.dq, exact.dq_magnitude),
                    ("dk", &grads.dk, &exact.dk, exact.dk_magnitude),
                    ("dv", &grads.dv, &exact.dv, 0.0),
                ] {
                    let e = rel_err(got, want, floor_for(magnitude));
                    println!(
                        "[{}] {}: {what} {e:.2e} against the exact f64 gradient",
                        dev.name(),
                        case.what
                    );
                    assert!(
                        e <= design_tol(dtype),
                        "[{}] {}: {what} error {e:.3e} against the exact f64 gradient",
                        dev.name(),
                        case.what
                    );
                }
            }
        }
    }
}

#[test]
fn fused_qkv_and_packed_gradient_strides() {
    let test = "fused_qkv_and_packed_gradient_strides";
    let mut rng = Rng::fresh(test);
    for (seqs, hq, hkv, d) in [
        (Seqs::padded(2, 6, 6), 6, 2, 64),
        (Seqs::varlen(&[5, 0, 3], &[5, 0, 3]), 8, 1, 128),
        (Seqs::varlen(&[2, 4], &[4, 2]), 3, 1, 64),
    ] {
        for dtype in DType::ALL {
            for causal in [true, false] {
                let case = AttnCase::random(
                    &mut rng,
                    dtype,
                    seqs.clone(),
                    params(hq, hkv, d, causal),
                    Layout::Fused,
                );
                check_everywhere(test, &case);
            }
        }
    }
}

#[test]
fn custom_softmax_scale() {
    let test = "custom_softmax_scale";
    let mut rng = Rng::fresh(test);
    for (i, scale) in [0.05f32, 0.3, 1.7].into_iter().enumerate() {
        for dtype in DType::ALL {
            let p = AttentionParams {
                softmax_scale: Some(scale),
                ..params(6, 2, [64, 128][i % 2], i != 1)
            };
            let case = AttnCase::random(
                &mut rng,
                dtype,
                Seqs::varlen(&[4, 7], &[6, 5]),
                p,
                Layout::Separate { pad: 8 },
            );
            check_everywhere(test, &case);
        }
    }
}

/// Scores in the thousands to millions (peaked softmax, |LSE| up to ~10⁷): the CPU backend's
/// backward forms P from the row's own f64 statistics, so it stays exact where P rebuilt from
/// the f32 LSE is scaled by e^(|LSE|·2⁻²⁴) (dV 3e-4 off at 1e4, 2e-2 at 1e6). CPU only: the
/// kernels take the given LSE by design (cuda/ATTENTION.md, "Numerics") and f32 is CPU-only.
#[test]
fn cpu_backward_exact_at_large_scores() {
    let test = "cpu_backward_exact_at_large_scores";
    let mut rng = Rng::fresh(test);
    let cpu = Device::Cpu(Context::cpu());
    for (i, scale) in [1e3f32, 1e4, 1e6].into_iter().enumerate() {
        let p = AttentionParams {
            softmax_scale: Some(scale),
            ..params(3, 1, 64, i != 1)
        };
        let case = AttnCase::random(
            &mut rng,
            DType::F32,
            Seqs::varlen(&[5, 3], &[6, 3]),
            p,
            Layout::Separate { pad: 0 },
        );
        check_case(&cpu, &case);
    }
}

/// `Σ w ∘ out` in f64.
fn weighted(w: &[f64], out: &[f64]) -> f64 {
    w.iter().zip(out).map(|(a, b)| a * b).sum()
}

/// Which input of a case a coordinate perturbs.
#[derive(Debug, Clone, Copy)]
enum Input {
    Q,
    K,
    V,
}

fn input(case: &AttnCase, which: Input) -> &[f64] {
    match which {
        Input::Q => &case.q,
        Input::K => &case.k,
        Input::V => &case.v,
    }
}

fn input_mut(case: &mut AttnCase, which: Input) -> &mut Vec<f64> {
    match which {
        Input::Q => &mut case.q,
        Input::K => &mut case.k,
        Input::V => &mut case.v,
    }
}

/// Random coordinates of each input (all of them when few).
fn coordinates(rng: &mut Rng, case: &AttnCase, per_input: usize) -> Vec<(Input, usize)> {
    let mut out = Vec::new();
    for (which, len) in [
        (Input::Q, case.q.len()),
        (Input::K, case.k.len()),
        (Input::V, case.v.len()),
    ] {
        for _ in 0..per_input.min(len) {
            out.push((which, rng.below(0, len)));
        }
    }
    out
}

/// Tiny shapes for the finite-difference checks: a GQA group of 3 over one KV head with
/// Sq < Sk, and two KV heads of 2 with varlen sequences including a masked row.
fn tiny_cases(rng: &mut Rng) -> Vec<AttnCase> {
    vec![
        AttnCase::random(
            rng,
            DType::F32,
            Seqs::padded(1, 3, 5),
            params(3, 1, 64, true),
            Layout::Separate { pad: 0 },
        ),
        AttnCase::random(
            rng,
            DType::F32,
            Seqs::varlen(&[2, 3], &[4, 1]),
            AttentionParams {
                softmax_scale: Some(0.4),
                ..params(4, 2, 64, true)
            },
            Layout::Separate { pad: 0 },
        ),
    ]
}

#[test]
fn gradients_match_finite_differences() {
    // L = Σ w ∘ out through the CPU backend (f64 inside, f32 in and out); the analytic
    // gradients from its backward with dout = w. CUDA takes no f32, so this runs on the CPU.
    let mut rng = Rng::fresh("gradients_match_finite_differences");
    let cpu = Device::Cpu(Context::cpu());
    for case in tiny_cases(&mut rng) {
        let fwd = forward(&cpu, &case);
        let grads = backward(&cpu, &case, &fwd.out, &fwd.lse, Ws::Library);
        let (mut fd, mut an) = (Vec::new(), Vec::new());
        for (which, i) in coordinates(&mut rng, &case, 24) {
            let x = input(&case, which)[i];
            // A power-of-two step; the actual difference of the f32 inputs is the divisor.
            let h = 1.0 / 64.0;
            let (xp, xm) = (round_to(DType::F32, x + h), round_to(DType::F32, x - h));
            let eval = |xv: f64| {
                let mut c = case.clone();
                input_mut(&mut c, which)[i] = xv;
                weighted(&case.dout, &forward(&cpu, &c).out)
            };
            fd.push((eval(xp) - eval(xm)) / (xp - xm));
            an.push(match which {
                Input::Q => grads.dq[i],
                Input::K => grads.dk[i],
                Input::V => grads.dv[i],
            });
        }
        let e = rel_err(&an, &fd, 1e-3);
        assert!(
            e < 2e-3,
            "{}: gradient vs finite differences {e:.2e}\n an {:?}\n fd {:?}",
            case.what,
            &an[..8],
            &fd[..8]
        );
    }
}

#[test]
fn reference_gradients_match_finite_differences() {
    // The naive reference checked against itself in f64: its backward is the gradient of its
    // forward, and Delta from its own out equals rowsum(P ∘ dP).
    let mut rng = Rng::fresh("reference_gradients_match_finite_differences");
    for case in tiny_cases(&mut rng) {
        let exact = reference_backward(&case, None);
        let from_out = reference_backward(&case, Some(&reference_forward(&case).out));
        for (a, b) in [
            (&exact.dq, &from_out.dq),
            (&exact.dk, &from_out.dk),
            (&exact.dv, &from_out.dv),
        ] {
            assert!(
                rel_err(a, b, FLOOR) < 1e-12,
                "{}: Delta identity",
                case.what
            );
        }
        let (mut fd, mut an) = (Vec::new(), Vec::new());
        for (which, i) in coordinates(&mut rng, &case, 40) {
            let h = 1e-5;
            let eval = |dx: f64| {
                let mut c = case.clone();
                input_mut(&mut c, which)[i] += dx;
                weighted(&case.dout, &reference_forward(&c).out)
            };
            fd.push((eval(h) - eval(-h)) / (2.0 * h));
            an.push(match which {
                Input::Q => exact.dq[i],
                Input::K => exact.dk[i],
                Input::V => exact.dv[i],
            });
        }
        let e = rel_err(&an, &fd, 1e-3);
        assert!(e < 1e-7, "{}: reference gradient vs FD {e:.2e}", case.what);
    }
}

#[test]
fn deterministic_bitwise() {
    let test = "deterministic_bitwise";
    let mut rng = Rng::fresh(test);
    for dev in devices(test) {
        let dtype = if dev.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let case = AttnCase::random(
            &mut rng,
            dtype,
            Seqs::varlen(&[37, 0, 64, 5], &[40, 3, 64, 70]),
            AttentionParams {
                deterministic: true,
                ..params(8, 1, 128, true)
            },
            Layout::Separate { pad: 8 },
        );
        let (r1, _, a1) = case.run_fwd(&dev);
        let (r2, _, a2) = case.run_fwd(&dev);
        r1.unwrap();
        r2.unwrap();
        assert!(a1 == a2, "[{}] forward differs between runs", dev.name());
        let fwd = case.fwd_outputs(&case.fwd_bufs(), &a1).unwrap();
        let (r1, _, b1) = case.run_bwd(&dev, &fwd.out, &fwd.lse);
        let (r2, _, b2) = case.run_bwd(&dev, &fwd.out, &fwd.lse);
        r1.unwrap();
        r2.unwrap();
        assert!(
            b1 == b2,
            "[{}] backward (deterministic mode) differs between runs",
            dev.name()
        );
    }
}

/// `deterministic = false` (CUDA: dQ summed by f32 atomics in L2 with the mma.sync kernels; with
/// the wgmma backward, Hopper's default, the deterministic kernels run in this mode too): the
/// same results within tolerance, against the reference and the CPU backend; on CUDA dk and dv
/// bitwise those of the deterministic mode (the same arithmetic), dq within the bf16 / f16
/// tolerance of it.
/// Both workspace kinds: the library's and a caller buffer of exactly the queried size.
#[test]
fn atomic_dq_mode() {
    let test = "atomic_dq_mode";
    let mut rng = Rng::fresh(test);
    let shapes = [
        (Seqs::padded(2, 150, 150), 8, 1, 128, true, DType::BF16),
        (Seqs::padded(1, 70, 200), 3, 1, 64, true, DType::F16),
        (Seqs::padded(1, 130, 40), 4, 2, 128, true, DType::F16),
        (
            Seqs::varlen(&[37, 0, 130, 5, 1], &[40, 3, 64, 0, 70]),
            6,
            2,
            64,
            true,
            DType::BF16,
        ),
        (Seqs::padded(3, 33, 97), 2, 2, 128, false, DType::BF16),
    ];
    for dev in devices(test) {
        for (i, (seqs, hq, hkv, d, causal, dtype)) in shapes.iter().cloned().enumerate() {
            let dtype = if dev.is_cuda() { dtype } else { DType::F32 };
            let atomic = AttentionParams {
                deterministic: false,
                ..params(hq, hkv, d, causal)
            };
            let case = AttnCase::random(&mut rng, dtype, seqs, atomic, Layout::Separate { pad: 8 });
            let ws = if i % 2 == 0 { Ws::Library } else { Ws::Exact };
            let (fwd, grads) = check_case_ws(&dev, &case, ws);
            let mut det = case.clone();
            det.params.deterministic = true;
            let g = backward(&dev, &det, &fwd.out, &fwd.lse, Ws::Library);
            assert!(
                g.dk == grads.dk && g.dv == grads.dv,
                "[{}] {}: dk / dv of the atomic-dQ mode differ from the deterministic mode's",
                dev.name(),
                case.what
            );
            let e = rel_err(&grads.dq, &g.dq, FLOOR);
            assert!(
                e <= design_tol(dtype),
                "[{}] {}: dq of the two modes differ by {e:.2e}",
                dev.name(),
                case.what
            );
        }
    }
}

#[test]
fn lengths_across_tile_boundaries() {
    // Lengths around the 64- and 128-row tiles of the CUDA kernels (partial tiles, masked tails,
    // causal diagonals crossing tiles), padded with Sq ≠ Sk and varlen.
    let test = "lengths_across_tile_boundaries";
    let mut rng = Rng::fresh(test);
    let cases = [
        (Seqs::padded(1, 190, 257), true, DType::BF16),
        (Seqs::padded(2, 129, 65), true, DType::F16),
        (
            Seqs::varlen(
                &[1, 63, 64, 65, 127, 0, 129],
                &[64, 65, 1, 130, 127, 3, 200],
            ),
            true,
            DType::BF16,
        ),
        (
            Seqs::varlen(&[128, 200, 17], &[256, 77, 17]),
            false,
            DType::F16,
        ),
    ];
    for (i, (seqs, causal, dtype)) in cases.into_iter().enumerate() {
        let case = AttnCase::random(
            &mut rng,
            dtype,
            seqs,
            params(6, 2, [128, 64][i % 2], causal),
            Layout::Separate { pad: 8 },
        );
        check_everywhere(test, &case);
    }
}

/// The kernels `DK_ATTENTION_FWD` / `DK_ATTENTION_BWD` ask for (unset: the default policy) must
/// be the ones that ran wherever the device has them: otherwise a step of scripts/gpu-check.sh
/// (the default one, `-wide` or `-wgmma`) would pass on other kernels. Unset or `wgmma`: the wgmma
/// kernels on compute capability 9.0 (where the device accepted their shared memory, as every
/// H100 / H200 does), else the mma.sync kernels of 4 warps (the backward's `wgmma`: the wide
/// ones); `mma`: those everywhere; `wide`: the wide kernels everywhere the device accepted their
/// shared memory (every Hopper and A100), also over wgmma. Without CUDA it says so and checks
/// nothing. Other tests of this process also run kernels, so it checks only that the expected
/// ones ran; the atomic-dQ mode's choice is a unit test (src/attention/cuda/backward.rs).
#[test]
fn requested_kernels_ran() {
    let test = "requested_kernels_ran";
    let fwd = std::env::var("DK_ATTENTION_FWD").unwrap_or_default();
    let bwd = std::env::var("DK_ATTENTION_BWD").unwrap_or_default();
    let Some(c) = cuda(test) else { return };
    let hopper = c.cu.compute_capability().expect("compute capability") == (9, 0);
    let dev = Device::Cuda(c);
    let mut rng = Rng::fresh(test);
    for d in [64, 128] {
        let case = AttnCase::random(
            &mut rng,
            DType::BF16,
            Seqs::padded(1, 150, 150),
            AttentionParams {
                deterministic: true,
                ..params(2, 1, d, true)
            },
            Layout::Separate { pad: 8 },
        );
        check_case(&dev, &case);
    }
    let ran = distill_kernels::attention::kernels_used();
    let expect: Vec<&str> = match (fwd.as_str(), hopper) {
        ("" | "wgmma", true) => vec!["dk_attn_fwd_bf16_d64g", "dk_attn_fwd_bf16_d128g"],
        ("wide", _) => vec!["dk_attn_fwd_bf16_d64", "dk_attn_fwd_bf16_d128w"],
        _ => vec!["dk_attn_fwd_bf16_d64", "dk_attn_fwd_bf16_d128"],
    }
    .into_iter()
    .chain(match (bwd.as_str(), hopper) {
        ("" | "wgmma", true) => vec![
            "dk_attn_bwd_dkdvg_bf16_d64",
            "dk_attn_bwd_dkdvg_bf16_d128",
            "dk_attn_bwd_dqg_bf16_d64",
            "dk_attn_bwd_dqg_bf16_d128",
        ],
        ("wide", _) | ("wgmma", false) => vec![
            "dk_attn_bwd_dkdvw_bf16_d64",
            "dk_attn_bwd_dkdvw_bf16_d128",
            "dk_attn_bwd_dqw_bf16_d64",
            "dk_attn_bwd_dqw_bf16_d128",
        ],
        _ => vec![
            "dk_attn_bwd_dkdv_bf16_d64",
            "dk_attn_bwd_dkdv_bf16_d128",
            "dk_attn_bwd_dq_bf16_d64",
            "dk_attn_bwd_dq_bf16_d128",
        ],
    })
    .collect();
    visible(&format!(
        "{test}: DK_ATTENTION_FWD={fwd:?} DK_ATTENTION_BWD={bwd:?}, compute capability 9.0: \
         {hopper}; ran {ran:?}"
    ));
    for name in expect {
        assert!(
            ran.contains(&name),
            "DK_ATTENTION_FWD={fwd:?} DK_ATTENTION_BWD={bwd:?}: {name} did not run (ran: {ran:?})"
        );
    }
}
