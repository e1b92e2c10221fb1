//! The divergence against an independent naive f64 reference (tests/common), on the CPU backend
//! (the crate's oracle) and on CUDA device 0 when present (also compared with the CPU backend):
//! every kind × dtype pair × edge case, strides, offsets, in place, forward only, reductions,
//! labels, masking, NaN, vocabulary sizes, determinism.

mod common;

use common::*;
use distill_kernels::divergence::{Divergence, DivergenceInPlace, Kind, Params, Reduction};
use distill_kernels::{
    Context, DType, Error, ErrorKind, Launch, Location, Matrix, MatrixMut, Vector, VectorMut,
};

const TEMPERATURES: [f32; 4] = [1.0, 0.7, 2.5, 1.3];
const REDUCTIONS: [Reduction; 3] = [Reduction::BatchMean, Reduction::Sum, Reduction::None];

/// Forward KL, reverse KL and JSD with this β.
fn three_kinds(beta: f32) -> [Params; 3] {
    [
        Params::new(Kind::ForwardKl),
        Params::new(Kind::ReverseKl),
        Params {
            beta,
            ..Params::new(Kind::Jsd)
        },
    ]
}

/// The kind this case effectively computes (JSD β = 0 / 1 are forward / reverse KL).
fn effective(p: &Params) -> Kind {
    p.effective_kind()
}

#[test]
fn every_kind_and_dtype_pair_matches_reference() {
    let mut rng = Rng::fresh("every_kind_and_dtype_pair_matches_reference");
    for dev in devices("every_kind_and_dtype_pair_matches_reference") {
        let mut i = 0;
        for kind in kinds() {
            for (s, t) in dtype_pairs() {
                let params = Params {
                    temperature: TEMPERATURES[i % 4],
                    reduction: REDUCTIONS[i % 3],
                    ..kind
                };
                i += 1;
                let n = rng.below(3, 9);
                let v = rng.below(20, 400);
                let case = Case::random(&mut rng, n, v, s, t, params).random_labels(&mut rng, 0.25);
                run_checked(&dev, &case);
            }
        }
    }
}

#[test]
fn temperatures() {
    let mut rng = Rng::fresh("temperatures");
    for dev in devices("temperatures") {
        for temperature in [0.25f32, 0.7, 1.0, 1.7, 4.0] {
            for kind in kinds() {
                for (s, t) in [(DType::F32, DType::F32), (DType::BF16, DType::F16)] {
                    let params = Params {
                        temperature,
                        ..kind
                    };
                    let case = Case::random(&mut rng, 4, 257, s, t, params);
                    run_checked(&dev, &case);
                }
            }
        }
    }
}

#[test]
fn reductions_labels_and_num_items() {
    let mut rng = Rng::fresh("reductions_labels_and_num_items");
    for dev in devices("reductions_labels_and_num_items") {
        for kind in three_kinds(0.5) {
            for reduction in REDUCTIONS {
                let num_items: &[Option<f32>] = if reduction == Reduction::BatchMean {
                    &[None, Some(2.5), Some(1000.0)]
                } else {
                    &[None]
                };
                for &num_items in num_items {
                    let params = Params {
                        reduction,
                        num_items,
                        ..kind
                    };
                    let (n, v) = (7, 129);
                    // No labels.
                    let case = Case::random(&mut rng, n, v, DType::F32, DType::BF16, params);
                    run_checked(&dev, &case);
                    // Default ignore_index (−100), some rows ignored.
                    let case = Case::random(&mut rng, n, v, DType::BF16, DType::BF16, params)
                        .with_labels(vec![5, -100, 17, -100, 0, 3, -100]);
                    run_checked(&dev, &case);
                    // A custom ignore_index: −100 is then an ordinary label.
                    let params = Params {
                        ignore_index: 3,
                        ..params
                    };
                    let mut case = Case::random(&mut rng, n, v, DType::F16, DType::F32, params)
                        .with_labels(vec![-100, 3, 3, 9, -100, 3, 1]);
                    case.what += " ignore_index=3";
                    run_checked(&dev, &case);
                    // Labels present, nothing ignored.
                    let case = Case::random(&mut rng, n, v, DType::F32, DType::F32, params)
                        .with_labels(vec![0, 1, 2, 4, 5, 6, 7]);
                    run_checked(&dev, &case);
                }
            }
        }
    }
}

#[test]
fn batchmean_divisor_and_grad_scale() {
    // batchmean = sum / #valid, and the gradient scales the same way (exactly on the CPU).
    let mut rng = Rng::fresh("batchmean_divisor_and_grad_scale");
    let cpu = Device::Cpu(Context::cpu());
    let labels = vec![1, -100, 2, 3, -100, 4];
    let base = Case::random(
        &mut rng,
        6,
        300,
        DType::F32,
        DType::F32,
        Params::new(Kind::Jsd),
    )
    .with_labels(labels);
    let run = |reduction, num_items| {
        let mut c = base.clone();
        c.params.reduction = reduction;
        c.params.num_items = num_items;
        let (r, _, after) = cpu.run(&c);
        r.unwrap();
        outputs(&c, &after)
    };
    let sum = run(Reduction::Sum, None);
    let mean = run(Reduction::BatchMean, None);
    let none = run(Reduction::None, None);
    let items = run(Reduction::BatchMean, Some(8.0));
    let (ls, lm, ln, li) = (
        sum.loss.unwrap() as f64,
        mean.loss.unwrap() as f64,
        none.loss.unwrap() as f64,
        items.loss.unwrap() as f64,
    );
    assert!(
        (lm * 4.0 - ls).abs() <= 1e-6 * ls.abs(),
        "mean {lm} sum {ls}"
    );
    assert!(
        (li * 8.0 - ls).abs() <= 1e-6 * ls.abs(),
        "num_items {li} sum {ls}"
    );
    assert_eq!(ls.to_bits(), ln.to_bits(), "none's loss is the sum");
    assert_eq!(sum.per_token, none.per_token);
    assert_eq!(
        sum.per_token, mean.per_token,
        "per-token values do not depend on reduction"
    );
    let (gs, gm) = (sum.grad.unwrap(), mean.grad.unwrap());
    for (a, b) in gs.iter().zip(&gm) {
        assert!(
            (a - 4.0 * b).abs() <= 1e-6 * a.abs().max(1e-30),
            "{a} vs 4 × {b}"
        );
    }
}

/// Bitwise equality of two runs' outputs (loss, per-token losses, gradient), NaN included.
fn same_bits(a: &Outputs, b: &Outputs, what: &str) {
    let bits = |o: &Outputs| {
        (
            o.loss.map(f32::to_bits),
            o.per_token
                .as_ref()
                .map(|p| p.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
            o.grad_bits.clone(),
        )
    };
    assert!(bits(a) == bits(b), "{what}: outputs differ");
}

#[test]
fn num_items_in_memory_matches_the_parameter() {
    // The divisor read from memory when the call runs gives bitwise the results of the same
    // value passed as Params::num_items (checked against the f64 reference by the test above),
    // in place too; a value that is not finite and at least 2^-126 (subnormals included, whose
    // f32 reciprocal overflows) gives the sum.
    let test = "num_items_in_memory_matches_the_parameter";
    let mut rng = Rng::fresh(test);
    for dev in devices(test) {
        for params in three_kinds(0.3) {
            for (s_dtype, in_place) in [(DType::BF16, false), (DType::F32, true)] {
                let mut base = Case::random(&mut rng, 9, 517, s_dtype, DType::BF16, params)
                    .with_labels(vec![3, -100, 5, 7, -100, 11, 13, 2, 1]);
                if in_place {
                    base = base.grad_out(GradOut::InPlace);
                }
                let run = |c: &Case| {
                    let (r, before, after) = dev.run(c);
                    r.unwrap_or_else(|e| panic!("{} {}: {e}", dev.name(), c.what));
                    check_untouched(c, &before, &after).unwrap();
                    outputs(c, &after)
                };
                let what =
                    |d: f32| format!("{} {:?} {s_dtype:?} num_items {d}", dev.name(), params.kind);
                for d in [37.5f32, 1.0, 3.0e-3, 1.0e30, f32::MIN_POSITIVE] {
                    let mut by_value = base.clone();
                    by_value.params.num_items = Some(d);
                    let mut in_memory = base.clone();
                    in_memory.num_items_mem = Some(d);
                    same_bits(&run(&by_value), &run(&in_memory), &what(d));
                }
                let mut sum = base.clone();
                sum.params.reduction = Reduction::Sum;
                let sum = run(&sum);
                for d in [
                    0.0f32,
                    -0.0,
                    -4.0,
                    f32::NAN,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    f32::MIN_POSITIVE / 2.0,
                    f32::from_bits(1),
                ] {
                    let mut in_memory = base.clone();
                    in_memory.num_items_mem = Some(d);
                    same_bits(&sum, &run(&in_memory), &what(d));
                }
            }
        }
    }
}

#[test]
fn num_items_in_memory_refusals_write_nothing() {
    let test = "num_items_in_memory_refusals_write_nothing";
    let mut rng = Rng::fresh(test);
    for dev in devices(test) {
        let mut base = Case::random(&mut rng, 4, 64, DType::F32, DType::F32, Params::default());
        base.num_items_mem = Some(3.0);
        let refused = |c: &Case, kind: ErrorKind, needle: &str| {
            let (r, before, after) = dev.run(c);
            let e = r.expect_err("the call must be refused");
            assert_eq!(e.kind(), kind, "{}: {e}", dev.name());
            assert!(e.to_string().contains(needle), "{}: {e}", dev.name());
            assert_eq!(before, after, "{}: a refused call wrote", dev.name());
        };
        let mut both = base.clone();
        both.params.num_items = Some(3.0);
        refused(&both, ErrorKind::InvalidArgument, "given twice");
        for reduction in [Reduction::Sum, Reduction::None] {
            let mut c = base.clone();
            c.params.reduction = reduction;
            refused(
                &c,
                ErrorKind::InvalidArgument,
                "only applies to reduction=batchmean",
            );
        }
    }
    // The view itself: one aligned f32 where the context runs, clear of the outputs.
    let ctx = Context::cpu();
    let (n, v) = (2, 8);
    let s: Vec<f32> = (0..n * v).map(|i| (i as f32 * 0.7).sin()).collect();
    let t: Vec<f32> = (0..n * v).map(|i| (i as f32 * 0.3).cos()).collect();
    let words = [4.0f32, 4.0, 4.0];
    let misaligned = words.as_ptr().cast::<u8>().wrapping_add(2).cast::<f32>();
    let cases: [(&str, Vector<'_, f32>, ErrorKind, &str); 4] = [
        (
            "two values",
            Vector::host(&words[..2]),
            ErrorKind::Shape,
            "exactly 1 element",
        ),
        // SAFETY (these three): refused before any access.
        (
            "device view",
            unsafe { Vector::from_raw(words.as_ptr(), 1, Location::Cuda(0)) },
            ErrorKind::WrongDevice,
            "num_items",
        ),
        (
            "null",
            unsafe { Vector::from_raw(std::ptr::null(), 1, Location::Host) },
            ErrorKind::NullPointer,
            "num_items",
        ),
        (
            "misaligned",
            unsafe { Vector::from_raw(misaligned, 1, Location::Host) },
            ErrorKind::InvalidArgument,
            "aligned",
        ),
    ];
    // Views are Copy: one pair serves every call.
    let (sm, tm) = (
        Matrix::host(&s, n, v, v).unwrap(),
        Matrix::host(&t, n, v, v).unwrap(),
    );
    let refused = |call: Divergence<'_>, what: &str| -> Error {
        ctx.divergence(call, &Params::default(), &Launch::default())
            .expect_err(what)
    };
    for (what, num_items, kind, needle) in cases {
        let mut loss = [f32::NAN];
        let call = Divergence {
            loss: Some(VectorMut::host(&mut loss)),
            num_items: Some(num_items),
            ..Divergence::new(sm, tm)
        };
        let e = refused(call, what);
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert!(e.to_string().contains(needle), "{what}: {e}");
        assert!(loss[0].is_nan(), "{what}: the loss was written");
    }
    let overlap = |e: Error| {
        assert_eq!(e.kind(), ErrorKind::Shape, "{e}");
        assert!(e.to_string().contains("overlaps the num_items"), "{e}");
    };
    // num_items inside an output, the gradient, and the student logits the gradient replaces.
    let mut per_token = [f32::NAN; 2];
    let inside = per_token.as_ptr().wrapping_add(1);
    // SAFETY (the three views below): a host f32 inside another operand; the call is refused
    // before any access.
    let num_items = unsafe { Vector::from_raw(inside, 1, Location::Host) };
    overlap(refused(
        Divergence {
            per_token: Some(VectorMut::host(&mut per_token)),
            num_items: Some(num_items),
            ..Divergence::new(sm, tm)
        },
        "inside per_token",
    ));
    let mut grad = vec![f32::NAN; n * v];
    let inside = grad.as_ptr().wrapping_add(5);
    let num_items = unsafe { Vector::from_raw(inside, 1, Location::Host) };
    overlap(refused(
        Divergence {
            grad: Some(MatrixMut::host(&mut grad, n, v, v).unwrap()),
            num_items: Some(num_items),
            ..Divergence::new(sm, tm)
        },
        "inside the gradient",
    ));
    assert!(grad.iter().all(|x| x.is_nan()), "the gradient was written");
    let mut student = s.clone();
    let inside = student.as_ptr().wrapping_add(v);
    let num_items = unsafe { Vector::from_raw(inside, 1, Location::Host) };
    let call = DivergenceInPlace {
        num_items: Some(num_items),
        ..DivergenceInPlace::new(MatrixMut::host(&mut student, n, v, v).unwrap(), tm)
    };
    overlap(
        ctx.divergence_in_place(call, &Params::default(), &Launch::default())
            .expect_err("inside the in-place student"),
    );
    assert_eq!(student, s, "the student logits were written");
}

#[test]
fn num_items_in_memory_with_an_empty_batch() {
    // N = 0 reads nothing and writes a zero loss, but the view must still be valid memory where
    // the context runs (a host pointer on CUDA is refused, as for the other operands).
    let test = "num_items_in_memory_with_an_empty_batch";
    let items = [5.0f32];
    for dev in devices(test) {
        let loc = dev.context().location();
        // SAFETY (views): no rows, nothing is read; the num_items view is host memory, on
        // CUDA deliberately so.
        let empty = unsafe { Matrix::from_raw(std::ptr::null(), DType::F32, 0, 9, 9, loc) };
        let num_items = unsafe { Vector::from_raw(items.as_ptr(), 1, loc) };
        let mut loss = [f32::NAN];
        let result = dev.context().divergence(
            Divergence {
                loss: (!dev.is_cuda()).then(|| VectorMut::host(&mut loss)),
                num_items: Some(num_items),
                ..Divergence::new(empty, empty)
            },
            &Params::default(),
            &Launch::default(),
        );
        if dev.is_cuda() {
            let e = result.expect_err("host num_items");
            assert_eq!(e.kind(), ErrorKind::WrongDevice, "{e}");
            continue;
        }
        result.unwrap();
        assert_eq!(loss[0].to_bits(), 0f32.to_bits(), "the empty batch's loss");
        // On the CPU: a view claiming CUDA memory, and a misaligned one, are refused too.
        let words = [5.0f32, 5.0];
        let misaligned = words.as_ptr().cast::<u8>().wrapping_add(1).cast::<f32>();
        for (num_items, kind) in [
            // SAFETY (both): refused before any access.
            (
                unsafe { Vector::from_raw(items.as_ptr(), 1, Location::Cuda(0)) },
                ErrorKind::WrongDevice,
            ),
            (
                unsafe { Vector::from_raw(misaligned, 1, loc) },
                ErrorKind::InvalidArgument,
            ),
        ] {
            let mut loss = [f32::NAN];
            let call = Divergence {
                loss: Some(VectorMut::host(&mut loss)),
                num_items: Some(num_items),
                ..Divergence::new(empty, empty)
            };
            let e = dev
                .context()
                .divergence(call, &Params::default(), &Launch::default())
                .expect_err("a bad num_items with an empty batch");
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains("num_items"), "{e}");
            assert!(loss[0].is_nan(), "the loss was written");
        }
    }
}

#[test]
fn strides_and_unaligned_pointers() {
    let mut rng = Rng::fresh("strides_and_unaligned_pointers");
    for dev in devices("strides_and_unaligned_pointers") {
        let mut i = 0;
        for (s, t) in dtype_pairs() {
            for (v, ss, ts, gs, offset) in [
                (1001, 1003, 1010, 1001, 0),
                (1001, 1001, 1001, 1024, 1),
                (1024, 1032, 1025, 1031, 1),
                (1000, 1008, 1008, 1008, 3),
                (64, 65, 64, 72, 0),
            ] {
                let params = Params {
                    reduction: REDUCTIONS[i % 3],
                    ..kinds()[i % 6]
                };
                i += 1;
                let mut case = Case::random(&mut rng, 3, v, s, t, params).strides(ss, ts, gs);
                case.offset = offset;
                case.what += &format!(" offset={offset}");
                run_checked(&dev, &case);
            }
        }
    }
}

#[test]
fn in_place_equals_separate_bitwise() {
    let mut rng = Rng::fresh("in_place_equals_separate_bitwise");
    for dev in devices("in_place_equals_separate_bitwise") {
        for kind in kinds() {
            for (s, t, stride, offset) in [
                (DType::F32, DType::F32, 300, 0),
                (DType::BF16, DType::BF16, 304, 0),
                (DType::F16, DType::BF16, 301, 1),
                (DType::BF16, DType::F32, 300, 1),
            ] {
                let mut base = Case::random(&mut rng, 5, 300, s, t, kind)
                    .strides(stride, 300, 300)
                    .random_labels(&mut rng, 0.2);
                base.offset = offset;
                let (sep, _) = run_checked(&dev, &base);
                let in_place = base.clone().grad_out(GradOut::InPlace);
                let (ip, _) = run_checked(&dev, &in_place);
                let through_c_path = base
                    .clone()
                    .grad_out(GradOut::IntoStudent { shift: 0, stride });
                let (cp, _) = run_checked(&dev, &through_c_path);
                for (name, o) in [("in place", &ip), ("grad == student", &cp)] {
                    assert_eq!(
                        sep.grad_bits,
                        o.grad_bits,
                        "[{}] {}: {name} gradient differs from the separate one",
                        dev.name(),
                        base.what
                    );
                    let bits = |x: &Option<Vec<f32>>| {
                        x.as_ref()
                            .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
                    };
                    assert_eq!(bits(&sep.per_token), bits(&o.per_token), "{name} per-token");
                    assert_eq!(
                        sep.loss.map(f32::to_bits),
                        o.loss.map(f32::to_bits),
                        "{name} loss"
                    );
                }
            }
        }
    }
}

#[test]
fn forward_only_and_optional_outputs() {
    let mut rng = Rng::fresh("forward_only_and_optional_outputs");
    for dev in devices("forward_only_and_optional_outputs") {
        for kind in kinds() {
            for (s, t) in [(DType::F32, DType::F32), (DType::BF16, DType::F16)] {
                let base = Case::random(&mut rng, 6, 500, s, t, kind).random_labels(&mut rng, 0.2);
                let (full, _) = run_checked(&dev, &base);
                for (per_token, loss) in
                    [(true, true), (true, false), (false, true), (false, false)]
                {
                    let mut c = base.clone().grad_out(GradOut::None);
                    c.per_token = per_token.then_some(c.n());
                    c.loss = loss.then_some(1);
                    c.what += &format!(" forward-only per_token={per_token} loss={loss}");
                    let (fwd, _) = run_checked(&dev, &c);
                    assert!(fwd.grad.is_none());
                    if !dev.is_cuda() {
                        // The CPU backend computes the same sums either way: same bits.
                        if per_token {
                            assert_eq!(fwd.per_token, full.per_token, "{}", c.what);
                        }
                        if loss {
                            assert_eq!(fwd.loss.map(f32::to_bits), full.loss.map(f32::to_bits));
                        }
                    }
                }
                // Gradient without any loss output.
                let mut c = base.clone();
                c.per_token = None;
                c.loss = None;
                c.what += " gradient only";
                let (g, _) = run_checked(&dev, &c);
                assert_eq!(g.grad_bits, full.grad_bits, "{}", c.what);
            }
        }
    }
}

/// Which sides may be masked alone without making the divergence infinite.
fn mask_sides(p: &Params) -> (bool, bool) {
    match effective(p) {
        // forward KL: teacher-only masks give p = 0 (fine); student-only give +inf.
        Kind::ForwardKl => (false, true),
        Kind::ReverseKl => (true, false),
        Kind::Jsd => (true, true),
    }
}

#[test]
fn masked_entries_contribute_nothing() {
    masked_entries_check("masked_entries_contribute_nothing", |_| f64::NEG_INFINITY);
}

#[test]
fn masks_of_finfo_min_contribute_nothing() {
    // Finite masks: inside the kernels (x − max) · log2(e) / T overflows f32 to −inf for them,
    // which once made the forward and reverse KL rows NaN on CUDA.
    masked_entries_check("masks_of_finfo_min_contribute_nothing", finfo_min);
}

/// Rows with entries masked by `mask(dtype)` on both sides, on one side where that keeps the
/// divergence finite, and a row with one unmasked entry: every result finite and within the
/// f64 reference's tolerance.
fn masked_entries_check(name: &str, mask: fn(DType) -> f64) {
    let mut rng = Rng::fresh(name);
    for dev in devices(name) {
        for kind in kinds() {
            let (student_alone, teacher_alone) = mask_sides(&kind);
            for (s, t) in dtype_pairs() {
                let (n, v) = (5, 203);
                let (ms, mt) = (mask(s), mask(t));
                let mut case = Case::random(&mut rng, n, v, s, t, kind);
                for r in 0..n {
                    for c in 1..v {
                        let u = rng.uniform();
                        if u < 0.3 {
                            case.student.row_mut(r)[c] = ms;
                            case.teacher.row_mut(r)[c] = mt;
                        } else if u < 0.4 && student_alone && r % 2 == 0 {
                            case.student.row_mut(r)[c] = ms;
                        } else if u < 0.5 && teacher_alone && r % 2 == 1 {
                            case.teacher.row_mut(r)[c] = mt;
                        }
                    }
                }
                // A row with a single unmasked entry on both sides (loss 0, gradient 0).
                for c in 1..v {
                    case.student.row_mut(n - 1)[c] = ms;
                    case.teacher.row_mut(n - 1)[c] = mt;
                }
                case.what += " masked";
                let (out, _) = run_checked(&dev, &case);
                let pt = out.per_token.unwrap();
                assert!(pt.iter().all(|x| x.is_finite()), "{}: {pt:?}", case.what);
                assert!(
                    out.grad.unwrap().iter().all(|x| x.is_finite()),
                    "{}",
                    case.what
                );
            }
        }
    }
}

#[test]
fn whole_sides_at_finfo_min_are_uniform() {
    // A row whose whole side is torch.finfo(dtype).min (every entry masked with
    // `masked_fill`) is a uniform distribution on that side, not a masked one: the value is
    // finite. Its maximum is then ≈ −3.4e38 (f32), where max + ln Σ rounds back to max in f64,
    // so a log-softmax formed as x − (max + ln Σ) loses ln V (the CPU backend did, until
    // 2026-11-29: losses off by O(1)); the naive reference forms (x − max) − ln Σ. Row 0: the
    // teacher side; row 1: the student side; row 2: both (two uniform rows: loss 0); row 3
    // untouched.
    let name = "whole_sides_at_finfo_min_are_uniform";
    let mut rng = Rng::fresh(name);
    for dev in devices(name) {
        for kind in kinds() {
            for (s, t) in dtype_pairs() {
                let (n, v) = (4, 203);
                let mut case = Case::random(&mut rng, n, v, s, t, kind);
                case.teacher.row_mut(0).fill(finfo_min(t));
                case.student.row_mut(1).fill(finfo_min(s));
                case.teacher.row_mut(2).fill(finfo_min(t));
                case.student.row_mut(2).fill(finfo_min(s));
                case.what += " whole sides at finfo.min";
                let (out, _) = run_checked(&dev, &case);
                let pt = out.per_token.unwrap();
                // Not treated as masked rows (loss 0): a random row against a uniform one.
                assert!(pt[0] > 0.0 && pt[1] > 0.0, "{}: {pt:?}", case.what);
                assert!(
                    pt[2].abs() <= 1e-12,
                    "{}: two uniform rows: {pt:?}",
                    case.what
                );
            }
        }
    }
}

#[test]
fn agreeing_distributions_give_exactly_zero() {
    // Rows whose teacher is the student (same dtype, same bits), and one-entry rows (any two
    // logits: both distributions are [1]): the divergence is 0 and so is the gradient. The
    // kernels' math is built to give exactly 0 there, for every kind and β, whatever the GPU's
    // MUFU rounding (cuda/DIVERGENCE.md, version 7; the host replay checks the same under an
    // error model); the CPU's f64 gets within 1e-12. A β-dependent rounding of −log β
    // (≈ 1e-7) or an exponent that is not exactly 0 at the row maximum fails here.
    let mut rng = Rng::fresh("agreeing_distributions_give_exactly_zero");
    for dev in devices("agreeing_distributions_give_exactly_zero") {
        let exact = dev.is_cuda();
        for kind in kinds() {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                for v in [1usize, 1000] {
                    let n = 4;
                    let mut case = Case::random(&mut rng, n, v, dtype, dtype, kind);
                    if v > 1 {
                        for r in 0..n {
                            let row = case.student.row_mut(r).to_vec();
                            case.teacher.row_mut(r).copy_from_slice(&row);
                        }
                    }
                    case.what += &format!(" agreeing rows, V = {v}");
                    let (out, _) = run_checked(&dev, &case);
                    let bound = if exact { 0.0 } else { 1e-12 };
                    let pt = out.per_token.as_ref().unwrap();
                    assert!(
                        pt.iter().all(|x| x.abs() as f64 <= bound),
                        "[{}] {}: per-token losses {pt:?}",
                        dev.name(),
                        case.what
                    );
                    let gmax = out
                        .grad
                        .as_ref()
                        .unwrap()
                        .iter()
                        .fold(0.0f64, |m, g| m.max(g.abs()));
                    assert!(
                        gmax <= bound,
                        "[{}] {}: gradient up to {gmax:e}",
                        dev.name(),
                        case.what
                    );
                }
            }
        }
    }
}

#[test]
fn jsd_at_extreme_beta_keeps_relative_accuracy() {
    // min(β, 1 − β) < 2^-5 runs the jsdx kernels on CUDA (series tails: cuda/DIVERGENCE.md,
    // "Version 8"). The loss is then ~min(β, 1 − β) times a divergence and, as β → 0, the
    // gradient ~β, so each is held to its own size: the bounds of tests/kernel_sim.rs's replay
    // of the same math under the worst-case MUFU model, doubled. Before the series the replay
    // gave gradients 5e-2 .. 1 off at β ≤ 1e-4 and losses 2e-7 off whatever β.
    let mut rng = Rng::fresh("jsd_at_extreme_beta_keeps_relative_accuracy");
    for dev in devices("jsd_at_extreme_beta_keeps_relative_accuracy") {
        for beta in [0.02f32, 1e-3, 1e-5, 1e-7, 1.0 - 1e-4] {
            for (s, t) in [(DType::F32, DType::F32), (DType::F32, DType::BF16)] {
                let params = Params {
                    beta,
                    reduction: Reduction::Sum,
                    ..Params::new(Kind::Jsd)
                };
                let (n, v) = (6, 3001);
                let case = Case::random(&mut rng, n, v, s, t, params);
                let (out, _) = run_checked(&dev, &case);
                let reference = reference(&case);
                let m = beta.min(1.0 - beta) as f64;
                let pt = out.per_token.as_ref().unwrap();
                let g = out.grad.as_ref().unwrap();
                for (r, (&l, &rl)) in pt.iter().zip(&reference.per_token).enumerate() {
                    let l = l as f64;
                    assert!(
                        (l - rl).abs() <= 2e-3 * rl.abs() + 6e-6 * m,
                        "[{}] {}: row {r} loss {l:e} vs {rl:e}",
                        dev.name(),
                        case.what
                    );
                    let row = r * v..(r + 1) * v;
                    let rg = &reference.grad[row.clone()];
                    let norm = rg.iter().map(|x| x * x).sum::<f64>().sqrt();
                    let err = g[row]
                        .iter()
                        .zip(rg)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f64>()
                        .sqrt();
                    assert!(
                        err <= 4e-3 * norm + 1e-6 * m,
                        "[{}] {}: row {r} gradient error {err:e} against a norm of {norm:e}",
                        dev.name(),
                        case.what
                    );
                }
            }
        }
    }
}

#[test]
fn fully_masked_rows_are_zero() {
    let mut rng = Rng::fresh("fully_masked_rows_are_zero");
    for dev in devices("fully_masked_rows_are_zero") {
        for kind in kinds() {
            for (s, t) in dtype_pairs() {
                let (n, v) = (6, 150);
                let mut case =
                    Case::random(&mut rng, n, v, s, t, kind).with_labels(vec![1, 2, 3, 4, 5, -100]);
                case.student.row_mut(1).fill(f64::NEG_INFINITY);
                case.teacher.row_mut(3).fill(f64::NEG_INFINITY);
                case.student.row_mut(4).fill(f64::NEG_INFINITY);
                case.teacher.row_mut(4).fill(f64::NEG_INFINITY);
                case.what += " fully masked rows 1 (student), 3 (teacher), 4 (both)";
                let (out, _) = run_checked(&dev, &case);
                let pt = out.per_token.unwrap();
                let g = out.grad.unwrap();
                for r in [1, 3, 4, 5] {
                    assert_eq!(pt[r], 0.0, "{}: row {r} loss", case.what);
                    assert!(
                        g[r * v..(r + 1) * v].iter().all(|&x| x == 0.0),
                        "row {r} grad"
                    );
                }
            }
        }
    }
}

#[test]
fn all_rows_ignored_gives_zero() {
    let mut rng = Rng::fresh("all_rows_ignored_gives_zero");
    for dev in devices("all_rows_ignored_gives_zero") {
        for kind in kinds() {
            for reduction in REDUCTIONS {
                for (s, t) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16)] {
                    let params = Params { reduction, ..kind };
                    let mut case =
                        Case::random(&mut rng, 4, 77, s, t, params).with_labels(vec![-100; 4]);
                    case.what += " all ignored";
                    let (out, _) = run_checked(&dev, &case);
                    assert_eq!(out.loss, Some(0.0), "{}", case.what);
                    assert!(out.per_token.unwrap().iter().all(|&x| x == 0.0));
                    assert!(out.grad.unwrap().iter().all(|&x| x == 0.0));
                }
            }
        }
    }
}

#[test]
fn nan_is_confined_to_its_row() {
    let mut rng = Rng::fresh("nan_is_confined_to_its_row");
    for dev in devices("nan_is_confined_to_its_row") {
        for kind in kinds() {
            for (s, t) in dtype_pairs() {
                let (n, v) = (6, 120);
                let mut case = Case::random(&mut rng, n, v, s, t, kind);
                let c = rng.below(0, v);
                case.student.row_mut(1)[c] = f64::NAN;
                let c = rng.below(0, v);
                case.teacher.row_mut(3)[c] = f64::NAN;
                let c = rng.below(0, v);
                case.teacher.row_mut(4)[c] = f64::INFINITY;
                case.what += " NaN in rows 1 (student), 3 (teacher), +inf in row 4 (teacher)";
                let reference = reference(&case);
                assert_eq!(
                    reference.nan_rows,
                    vec![false, true, false, true, true, false]
                );
                let (out, _) = run_checked(&dev, &case);
                assert!(out.loss.unwrap().is_nan());
                let pt = out.per_token.unwrap();
                for r in [0, 2, 5] {
                    assert!(pt[r].is_finite(), "{}: row {r}", case.what);
                }
            }
        }
    }
}

#[test]
fn nan_in_an_ignored_row_is_never_read() {
    let mut rng = Rng::fresh("nan_in_an_ignored_row_is_never_read");
    for dev in devices("nan_in_an_ignored_row_is_never_read") {
        for kind in kinds() {
            for (s, t) in [(DType::F32, DType::F32), (DType::BF16, DType::F16)] {
                let mut case =
                    Case::random(&mut rng, 4, 99, s, t, kind).with_labels(vec![1, -100, 2, 3]);
                case.student.row_mut(1).fill(f64::NAN);
                case.teacher.row_mut(1)[5] = f64::INFINITY;
                case.what += " NaN in ignored row 1";
                let (out, _) = run_checked(&dev, &case);
                assert!(out.loss.unwrap().is_finite(), "{}", case.what);
                assert_eq!(out.per_token.unwrap()[1], 0.0);
            }
        }
    }
}

#[test]
fn vocabulary_sizes() {
    let mut rng = Rng::fresh("vocabulary_sizes");
    for dev in devices("vocabulary_sizes") {
        for v in [1, 2, 7, 8, 9, 15, 16, 17, 1001] {
            for kind in kinds() {
                for (s, t) in [
                    (DType::F32, DType::F32),
                    (DType::BF16, DType::BF16),
                    (DType::F16, DType::F32),
                ] {
                    let case = Case::random(&mut rng, 4, v, s, t, kind);
                    let (out, _) = run_checked(&dev, &case);
                    if v == 1 {
                        // One entry: p = q = 1, every divergence is 0 and so is the gradient
                        // (up to the rounding of log β + log1p(−β) for JSD).
                        let pt = out.per_token.unwrap();
                        assert!(pt.iter().all(|&x| x.abs() <= 1e-6), "{}: {pt:?}", case.what);
                        assert!(out.grad.unwrap().iter().all(|&x| x.abs() <= 1e-6));
                    }
                }
            }
        }
    }
}

#[test]
fn large_vocabularies() {
    let mut rng = Rng::fresh("large_vocabularies");
    for dev in devices("large_vocabularies") {
        let n = if dev.is_cuda() { 8 } else { 2 };
        for v in [262_145, 262_144, 151_936] {
            for kind in three_kinds(0.5) {
                for (s, t) in [
                    (DType::BF16, DType::BF16),
                    (DType::F32, DType::F32),
                    (DType::F16, DType::BF16),
                ] {
                    if !dev.is_cuda() && v != 262_145 && s != DType::BF16 {
                        continue; // keep the CPU part short; CUDA covers the rest
                    }
                    let case = Case::random(&mut rng, n, v, s, t, kind);
                    run_checked(&dev, &case);
                }
            }
        }
        if dev.is_cuda() {
            // Unaligned large rows: odd stride and a one-element pointer offset.
            let mut case = Case::random(
                &mut rng,
                4,
                151_936,
                DType::BF16,
                DType::BF16,
                Params::new(Kind::Jsd),
            )
            .strides(151_937, 151_939, 151_936);
            case.offset = 1;
            run_checked(&dev, &case);
        }
    }
}

/// More rows than the card runs clusters or blocks at once, with ignored, fully masked and
/// partly masked rows scattered among them: the persistent cluster kernel
/// (`DK_DIVERGENCE_CLUSTER=persist`, scripts/gpu-check.sh) walks several rows per cluster and
/// pipelines the passes of successive rows, so each row's statistics, mixture sums and gradient
/// must land on that row whatever its neighbours are. Also in place (the gradient of a row is
/// written while the next rows are read). On the default policy these rows run one block each.
#[test]
fn many_rows_with_ignored_and_masked_neighbours() {
    let mut rng = Rng::fresh("many_rows_with_ignored_and_masked_neighbours");
    for dev in devices("many_rows_with_ignored_and_masked_neighbours") {
        let (n, v) = if dev.is_cuda() {
            (600, 4096)
        } else {
            (40, 512)
        };
        for kind in kinds() {
            for (s, t) in [(DType::BF16, DType::BF16), (DType::F32, DType::F16)] {
                let mut case =
                    Case::random(&mut rng, n, v, s, t, kind).random_labels(&mut rng, 0.2);
                for r in 0..n {
                    match rng.below(0, 10) {
                        0 => case.student.row_mut(r).fill(f64::NEG_INFINITY),
                        1 => {
                            case.student.row_mut(r).fill(f64::NEG_INFINITY);
                            case.teacher.row_mut(r).fill(f64::NEG_INFINITY);
                        }
                        2 => {
                            // Masked on both sides in a quarter of the entries (entry 0 kept).
                            for c in 1..v {
                                if rng.uniform() < 0.25 {
                                    case.student.row_mut(r)[c] = f64::NEG_INFINITY;
                                    case.teacher.row_mut(r)[c] = f64::NEG_INFINITY;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                case.what += " many rows, masked and ignored neighbours";
                let (sep, _) = run_checked(&dev, &case);
                let in_place = case.clone().grad_out(GradOut::InPlace);
                let (ip, _) = run_checked(&dev, &in_place);
                assert_eq!(
                    sep.grad_bits,
                    ip.grad_bits,
                    "[{}] {}: in place differs from separate",
                    dev.name(),
                    case.what
                );
            }
        }
    }
}

#[test]
fn deterministic_bitwise() {
    let mut rng = Rng::fresh("deterministic_bitwise");
    for dev in devices("deterministic_bitwise") {
        let mut cases = Vec::new();
        for kind in kinds() {
            for (s, t) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16)] {
                cases
                    .push(Case::random(&mut rng, 9, 3001, s, t, kind).random_labels(&mut rng, 0.2));
            }
        }
        if dev.is_cuda() {
            for kind in kinds() {
                cases.push(Case::random(
                    &mut rng,
                    64,
                    32_000,
                    DType::BF16,
                    DType::BF16,
                    kind,
                ));
            }
        }
        for case in &cases {
            let (r1, _, a1) = dev.run(case);
            let (r2, _, a2) = dev.run(case);
            let (r3, _, a3) = dev.run(case);
            r1.and(r2)
                .and(r3)
                .unwrap_or_else(|e| panic!("{}: {e}", case.what));
            assert!(
                a1 == a2 && a2 == a3,
                "[{}] {}: runs differ",
                dev.name(),
                case.what
            );
        }
    }
}

#[test]
fn cuda_default_stream_and_caller_workspace() {
    let Some(cuda) = cuda("cuda_default_stream_and_caller_workspace") else {
        return;
    };
    let dev = Device::Cuda(cuda);
    let mut rng = Rng::fresh("cuda_default_stream_and_caller_workspace");
    for kind in kinds() {
        let case = Case::random(&mut rng, 33, 5000, DType::BF16, DType::F32, kind)
            .random_labels(&mut rng, 0.2);
        let reference = reference(&case);
        let tol = Tol::for_device(&dev, &case);
        for ws in [Workspace::Exact, Workspace::Bytes(1 << 20)] {
            let (r, before, after) = dev.run_ws(&case, ws);
            r.unwrap_or_else(|e| panic!("{ws:?}: {e}"));
            check(&case, &reference, &before, &after, tol)
                .unwrap_or_else(|m| panic!("{} {ws:?}: {m}", case.what));
        }
    }
    // The legacy default stream (Launch::default()).
    let Device::Cuda(c) = &dev else {
        unreachable!()
    };
    let case = Case::random(
        &mut rng,
        5,
        777,
        DType::F32,
        DType::F32,
        Params::new(Kind::Jsd),
    );
    let before = Bufs::new(&case);
    let mut after = before.clone();
    let d: Vec<_> = [
        Some(&after.student),
        Some(&after.teacher),
        after.grad.as_ref(),
        Some(&after.per_token),
        Some(&after.loss),
    ]
    .into_iter()
    .map(|b| c.stream.clone_htod(b.unwrap().as_ref()).unwrap())
    .collect();
    c.stream.synchronize().unwrap();
    let ptr = |i: usize| {
        use cudarc::driver::DevicePtr;
        let (p, _g) = d[i].device_ptr(&c.stream);
        p as usize as *mut u8
    };
    let base = BasePtrs {
        student: ptr(0),
        teacher: ptr(1),
        grad: ptr(2),
        labels: std::ptr::null_mut(),
        per_token: ptr(3),
        loss: ptr(4),
        num_items: std::ptr::null_mut(),
    };
    // SAFETY: device buffers laid out for the case.
    unsafe { call(&c.ctx, &case, base, Location::Cuda(0), &Launch::default()) }.unwrap();
    c.cu.synchronize().unwrap();
    for (i, h) in [
        &mut after.student,
        &mut after.teacher,
        after.grad.as_mut().unwrap(),
        &mut after.per_token,
        &mut after.loss,
    ]
    .into_iter()
    .enumerate()
    {
        h.as_mut()
            .copy_from_slice(&c.stream.clone_dtoh(&d[i]).unwrap());
    }
    c.stream.synchronize().unwrap();
    check(
        &case,
        &reference(&case),
        &before,
        &after,
        Tol::for_device(&dev, &case),
    )
    .unwrap_or_else(|m| panic!("default stream: {m}"));
}

#[test]
fn reference_self_check() {
    // The independent reference against hand-computed values.
    let ln = f64::ln;
    // Two entries, p = (0.5, 0.5), q = softmax(0, ln 3) = (0.25, 0.75).
    let a = [0.0, 0.0];
    let b = [0.0, ln(3.0)];
    let (fkl, g) = naive_row(Kind::ForwardKl, 0.5, &b, &a);
    let want = 0.5 * ln(0.5 / 0.25) + 0.5 * ln(0.5 / 0.75);
    assert!((fkl - want).abs() < 1e-15);
    assert!((g[0] - (0.25 - 0.5)).abs() < 1e-15 && (g[1] - (0.75 - 0.5)).abs() < 1e-15);
    let (rkl, _) = naive_row(Kind::ReverseKl, 0.5, &b, &a);
    assert!((rkl - (0.25 * ln(0.5) + 0.75 * ln(1.5))).abs() < 1e-15);
    let (jsd, _) = naive_row(Kind::Jsd, 0.5, &b, &a);
    let m = [0.375, 0.625];
    let want = 0.5 * (0.5 * ln(0.5 / m[0]) + 0.5 * ln(0.5 / m[1]))
        + 0.5 * (0.25 * ln(0.25 / m[0]) + 0.75 * ln(0.75 / m[1]));
    assert!((jsd - want).abs() < 1e-15);
    // β = 0 / 1 are the KL kinds by definition.
    assert_eq!(naive_row(Kind::Jsd, 0.0, &b, &a).0, fkl);
    assert_eq!(naive_row(Kind::Jsd, 1.0, &b, &a).0, rkl);
    // Gradients of the reference against central differences of the reference.
    let mut rng = Rng::fresh("reference_self_check");
    for kind in kinds() {
        let beta = kind.beta as f64;
        let b = rng.logits(1, 13, 1.5);
        let a = rng.logits(1, 13, 1.5);
        let (_, g) = naive_row(kind.kind, beta, &b, &a);
        for j in 0..13 {
            let h = 1e-5;
            let mut bp = b.clone();
            bp[j] += h;
            let mut bm = b.clone();
            bm[j] -= h;
            let fd = (naive_row(kind.kind, beta, &bp, &a).0
                - naive_row(kind.kind, beta, &bm, &a).0)
                / (2.0 * h);
            assert!(
                (fd - g[j]).abs() < 1e-8,
                "{kind:?} j={j}: fd {fd} vs {}",
                g[j]
            );
        }
    }
    // And against the crate's hidden row oracle.
    for kind in kinds() {
        let b = rng.logits(1, 50, 2.0);
        let a = rng.logits(1, 50, 2.0);
        let (l, g) = naive_row(kind.kind, kind.beta as f64, &b, &a);
        let mut g2 = vec![0.0; 50];
        let l2 = distill_kernels::reference_row_divergence(
            kind.effective_kind(),
            kind.beta as f64,
            &b,
            &a,
            Some(&mut g2),
        );
        assert!(
            (l - l2).abs() <= 1e-12 * l.abs().max(1e-12),
            "{kind:?}: {l} vs {l2}"
        );
        assert!(rel_err(&g2, &g, 1e-30) < 1e-10, "{kind:?}");
    }
}
