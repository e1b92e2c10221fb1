//! The fused MoE backward passes, `Context::moe_permute_backward` and
//! `Context::moe_combine_backward`, on the CPU and on CUDA device 0 when present (a visible
//! SKIPPED line otherwise):
//! - each output bitwise the primitives it fuses, on the same device and inputs (combine +
//!   slot-dot; permute + slot-dot), with and without weights and the weights' gradient, for
//!   routes with dropped slots and padding rows, f32 / bf16 / f16, k = 1, 3 and 8; outputs
//!   poisoned before every call, so an unwritten element shows. The primitives themselves are
//!   held to an independent reference and finite differences in tests/moe_reference.rs;
//! - bad input refused with nothing written (operands that go together, shapes the two halves
//!   share, outputs overlapping each other, out-of-range positions on the CPU);
//! - no tokens: a combine backward writes its zero rows, a permute backward nothing.

mod common;

use common::moe::*;
use common::*;
use distill_kernels::moe::{CombineBackward, PermuteBackward, RouteParams, Score};
use distill_kernels::{Context, DType, Error, ErrorKind, Location};

const TEST: &str = "moe_backward";

/// A route (from the CPU backend) and the activations of one backward scenario.
struct Scenario {
    what: String,
    n: usize,
    k: usize,
    h: usize,
    dtype: DType,
    weights: Vec<f32>,
    perm: Vec<i32>,
    position: Vec<i32>,
    /// Token rows `[N, H]`: the forward's x, or grad_y.
    tokens: Logits,
    /// Permuted rows `[R, H]`: grad_xp, or expert_out.
    rows: Logits,
}

fn scenario(
    rng: &mut Rng,
    what: &str,
    (n, e): (usize, usize),
    params: RouteParams,
    dtype: DType,
    h: usize,
) -> Scenario {
    let logits = random_matrix(rng, DType::F32, n, e, e);
    let route = RouteCase::new(logits, None, params);
    let (res, _, after) = route.run(&Device::Cpu(Context::cpu()));
    res.expect("CPU route");
    let out = route.outputs(&after);
    let r = out.offsets[e] as usize;
    assert!(
        out.position.contains(&-1),
        "{what}: the scenario should drop a slot"
    );
    Scenario {
        what: format!("{what} {} H={h} k={}", dtype.name(), params.k),
        n,
        k: params.k,
        h,
        dtype,
        weights: out.weights,
        perm: out.perm[..r].to_vec(),
        position: out.position,
        tokens: random_matrix(rng, dtype, n, h, h + 8),
        rows: random_matrix(rng, dtype, r, h, h + 16),
    }
}

fn scenarios(rng: &mut Rng) -> Vec<Scenario> {
    use DType::{BF16, F16, F32};
    let drops = |k, score| RouteParams {
        capacity: Some(3),
        score,
        ..RouteParams::new(k)
    };
    vec![
        // Llama 4: sigmoid top-1 (the k = 1 paths), capacity drops.
        scenario(rng, "Llama4", (35, 16), drops(1, Score::Sigmoid), F32, 1040),
        // Qwen3-like: softmax top-8, renormalised, drops and block padding, two segments.
        scenario(
            rng,
            "Qwen3",
            (37, 32),
            RouteParams {
                renormalize: true,
                block: 4,
                ..drops(8, Score::Softmax)
            },
            BF16,
            1032,
        ),
        // k = 3: a slot pair and a single one; f16.
        scenario(
            rng,
            "k=3",
            (17, 12),
            RouteParams {
                block: 2,
                ..drops(3, Score::Sigmoid)
            },
            F16,
            264,
        ),
    ]
}

/// A matrix view over buffer `i`.
fn mt(ptrs: &[*mut u8], i: usize, m: &Logits, loc: Location) -> Mt {
    Mt {
        ptr: ptrs[i],
        dtype: m.dtype,
        rows: m.rows,
        cols: m.cols,
        stride: m.stride,
        loc,
    }
}

/// An output matrix view over buffer `i`, `rows` × `cols` with `stride`.
fn out_mt(
    ptrs: &[*mut u8],
    i: usize,
    d: DType,
    rows: usize,
    cols: usize,
    stride: usize,
    loc: Location,
) -> Mt {
    Mt {
        ptr: ptrs[i],
        dtype: d,
        rows,
        cols,
        stride,
        loc,
    }
}

/// Buffers of a permute backward: grad_xp, position, weights, x, grad_x, grad_weights.
fn permute_backward_bufs(s: &Scenario) -> Vec<Bytes> {
    vec![
        matrix_bytes(&s.rows),
        bytes_i32(&s.position),
        bytes_f32(&s.weights),
        matrix_bytes(&s.tokens),
        poison_matrix(s.dtype, s.n, s.h + 24),
        poison_f32s(s.n * s.k + 8),
    ]
}

/// The fused permute backward (`scaled`: with the weights; `dots`: and their gradient).
fn fused_permute_backward(
    dev: &Device,
    s: &Scenario,
    scaled: bool,
    dots: bool,
) -> (Result<(), Error>, Vec<Bytes>) {
    let mut bufs = permute_backward_bufs(s);
    let slots = s.n * s.k;
    let res = run_on(dev, &mut bufs, |ctx, p, loc, launch| {
        // SAFETY: views over the buffers above, sized for the scenario.
        unsafe {
            ctx.moe_permute_backward(
                PermuteBackward {
                    grad_xp: mt(p, 0, &s.rows, loc).get(),
                    k: s.k,
                    position: Vw::new(p[1], slots, loc).get(),
                    weights: scaled.then(|| Vw::new(p[2], slots, loc).get()),
                    x: dots.then(|| mt(p, 3, &s.tokens, loc).get()),
                    grad_x: out_mt(p, 4, s.dtype, s.n, s.h, s.h + 24, loc).get_mut(),
                    grad_weights: dots.then(|| Vw::new(p[5], slots, loc).get_mut()),
                },
                launch,
            )
        }
    });
    (res, bufs)
}

/// The same gradients from the primitives: combine(grad_xp), then slot_dot(x, grad_xp).
fn primitive_permute_backward(dev: &Device, s: &Scenario, scaled: bool, dots: bool) -> Vec<Bytes> {
    let mut bufs = permute_backward_bufs(s);
    let slots = s.n * s.k;
    run_on(dev, &mut bufs, |ctx, p, loc, launch| {
        let comb = CombineSpec {
            rows: mt(p, 0, &s.rows, loc),
            k: s.k,
            position: Vw::new(p[1], slots, loc),
            weights: scaled.then(|| Vw::new(p[2], slots, loc)),
            y: out_mt(p, 4, s.dtype, s.n, s.h, s.h + 24, loc),
        };
        // SAFETY: views over the buffers above.
        unsafe { comb.run(ctx, launch)? };
        if dots {
            let dot = SlotDotSpec {
                tokens: mt(p, 3, &s.tokens, loc),
                rows: mt(p, 0, &s.rows, loc),
                k: s.k,
                position: Vw::new(p[1], slots, loc),
                out: Vw::new(p[5], slots, loc),
            };
            // SAFETY: as above.
            unsafe { dot.run(ctx, launch)? };
        }
        Ok(())
    })
    .expect("the primitives");
    bufs
}

/// Buffers of a combine backward: grad_y, expert_out, perm, position, weights,
/// grad_expert_out, grad_weights.
fn combine_backward_bufs(s: &Scenario) -> Vec<Bytes> {
    vec![
        matrix_bytes(&s.tokens),
        matrix_bytes(&s.rows),
        bytes_i32(&s.perm),
        bytes_i32(&s.position),
        bytes_f32(&s.weights),
        poison_matrix(s.dtype, s.rows.rows, s.h + 8),
        poison_f32s(s.n * s.k + 8),
    ]
}

fn fused_combine_backward(
    dev: &Device,
    s: &Scenario,
    weighted: bool,
    dots: bool,
) -> (Result<(), Error>, Vec<Bytes>) {
    let mut bufs = combine_backward_bufs(s);
    let (slots, r) = (s.n * s.k, s.rows.rows);
    let res = run_on(dev, &mut bufs, |ctx, p, loc, launch| {
        // SAFETY: views over the buffers above, sized for the scenario.
        unsafe {
            ctx.moe_combine_backward(
                CombineBackward {
                    grad_y: mt(p, 0, &s.tokens, loc).get(),
                    expert_out: dots.then(|| mt(p, 1, &s.rows, loc).get()),
                    k: s.k,
                    perm: Vw::new(p[2], r, loc).get(),
                    position: Vw::new(p[3], slots, loc).get(),
                    weights: weighted.then(|| Vw::new(p[4], slots, loc).get()),
                    grad_expert_out: out_mt(p, 5, s.dtype, r, s.h, s.h + 8, loc).get_mut(),
                    grad_weights: dots.then(|| Vw::new(p[6], slots, loc).get_mut()),
                },
                launch,
            )
        }
    });
    (res, bufs)
}

/// The same gradients from the primitives: permute(grad_y), then slot_dot(grad_y, expert_out).
fn primitive_combine_backward(
    dev: &Device,
    s: &Scenario,
    weighted: bool,
    dots: bool,
) -> Vec<Bytes> {
    let mut bufs = combine_backward_bufs(s);
    let (slots, r) = (s.n * s.k, s.rows.rows);
    run_on(dev, &mut bufs, |ctx, p, loc, launch| {
        let perm = PermuteSpec {
            x: mt(p, 0, &s.tokens, loc),
            k: s.k,
            perm: Vw::new(p[2], r, loc),
            weights: weighted.then(|| Vw::new(p[4], slots, loc)),
            out: out_mt(p, 5, s.dtype, r, s.h, s.h + 8, loc),
        };
        // SAFETY: views over the buffers above.
        unsafe { perm.run(ctx, launch)? };
        if dots {
            let dot = SlotDotSpec {
                tokens: mt(p, 0, &s.tokens, loc),
                rows: mt(p, 1, &s.rows, loc),
                k: s.k,
                position: Vw::new(p[3], slots, loc),
                out: Vw::new(p[6], slots, loc),
            };
            // SAFETY: as above.
            unsafe { dot.run(ctx, launch)? };
        }
        Ok(())
    })
    .expect("the primitives");
    bufs
}

/// Buffers `outputs` equal bitwise (padding columns and tails included).
fn check_same(what: &str, got: &[Bytes], want: &[Bytes], outputs: &[usize]) {
    for &i in outputs {
        assert!(
            got[i] == want[i],
            "{what}: output buffer {i} differs from the primitives' (first byte {})",
            (0..got[i].len())
                .find(|&j| got[i].as_ref()[j] != want[i].as_ref()[j])
                .unwrap_or(0)
        );
    }
}

#[test]
fn fused_backward_passes_are_the_primitives_bit_for_bit() {
    let mut rng = Rng::fresh(TEST);
    let cases = scenarios(&mut rng);
    for dev in devices("fused_backward_passes_are_the_primitives_bit_for_bit") {
        for s in &cases {
            for (scaled, dots) in [(true, true), (true, false), (false, false), (false, true)] {
                let what = format!(
                    "[{}] {} permute backward scaled={scaled} dots={dots}",
                    dev.name(),
                    s.what
                );
                let (res, got) = fused_permute_backward(&dev, s, scaled, dots);
                res.unwrap_or_else(|e| panic!("{what}: {e}"));
                let want = primitive_permute_backward(&dev, s, scaled, dots);
                check_same(&what, &got, &want, &[4, 5]);
                let grad_x = read_matrix(s.dtype, &got[4], s.n, s.h, s.h + 24);
                grad_x.unwrap_or_else(|e| panic!("{what}: grad_x {e}"));
                let gw = to_f32s(&got[5]);
                if dots {
                    assert!(
                        gw[..s.n * s.k].iter().all(|x| x.to_bits() != POISON_F32),
                        "{what}: a dot not written"
                    );
                    for (slot, &p) in s.position.iter().enumerate() {
                        if p < 0 {
                            assert_eq!(gw[slot], 0.0, "{what}: dropped slot {slot}");
                        }
                    }
                } else {
                    assert!(
                        gw.iter().all(|x| x.to_bits() == POISON_F32),
                        "{what}: dots written unasked"
                    );
                }

                let what = format!(
                    "[{}] {} combine backward weighted={scaled} dots={dots}",
                    dev.name(),
                    s.what
                );
                let (res, got) = fused_combine_backward(&dev, s, scaled, dots);
                res.unwrap_or_else(|e| panic!("{what}: {e}"));
                let want = primitive_combine_backward(&dev, s, scaled, dots);
                check_same(&what, &got, &want, &[5, 6]);
                let grad_eo = read_matrix(s.dtype, &got[5], s.rows.rows, s.h, s.h + 8)
                    .unwrap_or_else(|e| panic!("{what}: grad_expert_out {e}"));
                for (r, &p) in s.perm.iter().enumerate() {
                    if p < 0 {
                        assert!(
                            grad_eo[r * s.h..(r + 1) * s.h].iter().all(|&x| x == 0.0),
                            "{what}: padding row {r}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fused_backward_refuses_bad_input_writing_nothing() {
    let mut rng = Rng::fresh(TEST);
    let s = &scenarios(&mut rng)[1];
    for dev in devices("fused_backward_refuses_bad_input_writing_nothing") {
        let untouched = |what: &str,
                         res: Result<(), Error>,
                         kind: ErrorKind,
                         got: &[Bytes],
                         fresh: &[Bytes]| {
            let e = res.expect_err(what);
            assert_eq!(e.kind(), kind, "{what}: {e}");
            assert!(got == fresh, "{what}: written although refused ({e})");
        };
        let slots = s.n * s.k;
        // x without grad_weights (permute backward), expert_out without grad_weights.
        let mut bufs = permute_backward_bufs(s);
        let res = run_on(&dev, &mut bufs, |ctx, p, loc, launch| unsafe {
            // SAFETY: views over the buffers; refused before any access.
            ctx.moe_permute_backward(
                PermuteBackward {
                    grad_xp: mt(p, 0, &s.rows, loc).get(),
                    k: s.k,
                    position: Vw::new(p[1], slots, loc).get(),
                    weights: Some(Vw::new(p[2], slots, loc).get()),
                    x: Some(mt(p, 3, &s.tokens, loc).get()),
                    grad_x: out_mt(p, 4, s.dtype, s.n, s.h, s.h + 24, loc).get_mut(),
                    grad_weights: None,
                },
                launch,
            )
        });
        untouched(
            "x without grad_weights",
            res,
            ErrorKind::InvalidArgument,
            &bufs,
            &permute_backward_bufs(s),
        );
        // grad_weights overlapping grad_x.
        let mut bufs = permute_backward_bufs(s);
        let res = run_on(&dev, &mut bufs, |ctx, p, loc, launch| unsafe {
            // SAFETY: as above.
            ctx.moe_permute_backward(
                PermuteBackward {
                    grad_xp: mt(p, 0, &s.rows, loc).get(),
                    k: s.k,
                    position: Vw::new(p[1], slots, loc).get(),
                    weights: Some(Vw::new(p[2], slots, loc).get()),
                    x: Some(mt(p, 3, &s.tokens, loc).get()),
                    grad_x: out_mt(p, 4, s.dtype, s.n, s.h, s.h + 24, loc).get_mut(),
                    grad_weights: Some(Vw::new(p[4], slots, loc).get_mut()),
                },
                launch,
            )
        });
        untouched(
            "grad_weights over grad_x",
            res,
            ErrorKind::Shape,
            &bufs,
            &permute_backward_bufs(s),
        );
        // expert_out with fewer rows than perm.
        let mut bufs = combine_backward_bufs(s);
        let r = s.rows.rows;
        let res = run_on(&dev, &mut bufs, |ctx, p, loc, launch| unsafe {
            // SAFETY: as above (expert_out claims fewer rows than it has).
            ctx.moe_combine_backward(
                CombineBackward {
                    grad_y: mt(p, 0, &s.tokens, loc).get(),
                    expert_out: Some(
                        Mt {
                            rows: r - 1,
                            ..mt(p, 1, &s.rows, loc)
                        }
                        .get(),
                    ),
                    k: s.k,
                    perm: Vw::new(p[2], r, loc).get(),
                    position: Vw::new(p[3], slots, loc).get(),
                    weights: Some(Vw::new(p[4], slots, loc).get()),
                    grad_expert_out: out_mt(p, 5, s.dtype, r, s.h, s.h + 8, loc).get_mut(),
                    grad_weights: Some(Vw::new(p[6], slots, loc).get_mut()),
                },
                launch,
            )
        });
        untouched(
            "expert_out rows",
            res,
            ErrorKind::Shape,
            &bufs,
            &combine_backward_bufs(s),
        );
        // A position past the rows: the CPU checks it before the permute writes anything (CUDA
        // treats it as a dropped slot, cuda/include/dk_moe_args.h).
        if matches!(dev, Device::Cpu(_)) {
            let mut bad = combine_backward_bufs(s);
            let mut pos = s.position.clone();
            pos[3] = r as i32;
            bad[3] = bytes_i32(&pos);
            let fresh = bad.clone();
            let res = run_on(&dev, &mut bad, |ctx, p, loc, launch| unsafe {
                // SAFETY: as above.
                ctx.moe_combine_backward(
                    CombineBackward {
                        grad_y: mt(p, 0, &s.tokens, loc).get(),
                        expert_out: None,
                        k: s.k,
                        perm: Vw::new(p[2], r, loc).get(),
                        position: Vw::new(p[3], slots, loc).get(),
                        weights: None,
                        grad_expert_out: out_mt(p, 5, s.dtype, r, s.h, s.h + 8, loc).get_mut(),
                        grad_weights: None,
                    },
                    launch,
                )
            });
            untouched(
                "position past the rows",
                res,
                ErrorKind::InvalidArgument,
                &bad,
                &fresh,
            );
        }
    }
}

#[test]
fn fused_backward_of_no_tokens() {
    for dev in devices("fused_backward_of_no_tokens") {
        let (h, r, k) = (16, 4, 2);
        // Combine backward, N = 0: perm is all padding, grad_expert_out becomes zero rows.
        let mut bufs = vec![
            Bytes::from_slice(&[0u8; 64]),
            bytes_i32(&[-1; 4]),
            bytes_i32(&[0]),
            poison_matrix(DType::BF16, r, h),
        ];
        run_on(&dev, &mut bufs, |ctx, p, loc, launch| unsafe {
            // SAFETY: grad_y of no rows, perm of r entries, an empty position, a [r, h] output.
            ctx.moe_combine_backward(
                CombineBackward {
                    grad_y: out_mt(p, 0, DType::BF16, 0, h, h, loc).get(),
                    expert_out: None,
                    k,
                    perm: Vw::new(p[1], r, loc).get(),
                    position: Vw::new(p[2], 0, loc).get(),
                    weights: None,
                    grad_expert_out: out_mt(p, 3, DType::BF16, r, h, h, loc).get_mut(),
                    grad_weights: None,
                },
                launch,
            )
        })
        .unwrap_or_else(|e| panic!("[{}] combine backward of no tokens: {e}", dev.name()));
        let rows = read_matrix(DType::BF16, &bufs[3], r, h, h).expect("every row written");
        assert!(rows.iter().all(|&x| x == 0.0), "[{}] zero rows", dev.name());
        // Permute backward, N = 0: nothing to write (grad_x has no rows).
        let mut bufs = vec![
            poison_matrix(DType::F32, r, h),
            bytes_i32(&[0]),
            poison_matrix(DType::F32, 1, h),
        ];
        let before = bufs.clone();
        run_on(&dev, &mut bufs, |ctx, p, loc, launch| unsafe {
            // SAFETY: grad_xp [r, h], an empty position, a grad_x of no rows.
            ctx.moe_permute_backward(
                PermuteBackward {
                    grad_xp: out_mt(p, 0, DType::F32, r, h, h, loc).get(),
                    k,
                    position: Vw::new(p[1], 0, loc).get(),
                    weights: None,
                    x: None,
                    grad_x: out_mt(p, 2, DType::F32, 0, h, h, loc).get_mut(),
                    grad_weights: None,
                },
                launch,
            )
        })
        .unwrap_or_else(|e| panic!("[{}] permute backward of no tokens: {e}", dev.name()));
        assert!(
            bufs == before,
            "[{}] permute backward of no tokens wrote",
            dev.name()
        );
    }
}
