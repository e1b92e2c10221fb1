//! The row scaling (`Context::scale_rows`) against an independent computation (tests/common/
//! scale_rows.rs: the exact f64 product, rounded to nearest even to f32 and then to the dtype,
//! written from the definition), on the CPU backend and, with the same test bodies, on CUDA
//! device 0 when one is present (a visible "SKIPPED cuda part of …: no CUDA device" line
//! otherwise): every dtype, aligned and misaligned rows, strides, factor strides (0 = one factor),
//! rows with factor exactly 1 bitwise untouched (NaN payloads in them), rows with factors 0, −0,
//! negative, ±inf, NaN, next to 1, tiny (subnormal results) and huge (overflow) scaled, ties
//! rounded to even, padding and tail untouched, the factors never written.

mod common;

use common::scale_rows::*;
use common::*;
use distill_kernels::DType;

/// (N, V, row stride, offset in elements, factor stride).
const LAYOUTS: &[(usize, usize, usize, usize, usize)] = &[
    (7, 1, 1, 0, 1),
    (5, 13, 13, 1, 1),
    (6, 8, 8, 0, 0),
    (4, 64, 72, 0, 1),
    (5, 100, 103, 3, 2),
    (3, 8192, 8192, 0, 1), // exactly one chunk of the kernel
    (3, 8193, 8200, 5, 3), // a chunk and one element, misaligned
    (4, 20_000, 20_011, 7, 1),
    (9, 1000, 1000, 2, 0), // one factor for every row
    (2, 40_000, 40_000, 1, 5),
];

/// Runs `case` on `dev` and checks every element; returns the count of scaled elements.
#[track_caller]
fn run_and_check(dev: &Device, case: &ScaleCase) -> usize {
    let (res, after, factors) = run(dev, case, Tweaks::default());
    res.unwrap_or_else(|e| panic!("[{}] {}: {e}", dev.name(), case.what));
    assert_eq!(
        factors.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
        case.factors.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
        "[{}] {}: the factors were written",
        dev.name(),
        case.what
    );
    check_scaled(case, after.as_ref())
        .unwrap_or_else(|e| panic!("[{}] {}: {e}", dev.name(), case.what))
}

#[test]
fn every_dtype_and_layout_matches_reference() {
    let mut rng = Rng::fresh("every_dtype_and_layout_matches_reference");
    for dev in devices("every_dtype_and_layout_matches_reference") {
        for dtype in DType::ALL {
            for &(n, v, stride, offset, fs) in LAYOUTS {
                let case = ScaleCase::random(&mut rng, dtype, n, v, stride, offset, fs, 0.3);
                run_and_check(&dev, &case);
            }
        }
    }
}

#[test]
fn factor_one_leaves_the_buffer_bitwise_untouched() {
    // One factor of exactly 1 for all rows, and per-row factors all 1: nothing changes, NaN
    // payloads included (any arithmetic on a signalling NaN would quiet it).
    let mut rng = Rng::fresh("factor_one_leaves_the_buffer_bitwise_untouched");
    for dev in devices("factor_one_leaves_the_buffer_bitwise_untouched") {
        for dtype in DType::ALL {
            for (n, v, stride, offset, fs) in [(5, 3000, 3001, 1, 0), (7, 9000, 9000, 0, 1)] {
                let case = ScaleCase::random(&mut rng, dtype, n, v, stride, offset, fs, 1.0);
                assert!((0..n).all(|i| case.factor(i) == 1.0));
                let (res, after, _) = run(&dev, &case, Tweaks::default());
                res.unwrap();
                assert!(
                    after.as_ref() == case.x.as_ref(),
                    "[{}] {}: the buffer changed",
                    dev.name(),
                    case.what
                );
            }
        }
    }
}

#[test]
fn the_test_data_covers_the_edge_cases() {
    // The random cases above do scale rows by every kind of factor and do hold factor-1 rows:
    // counted here, so a change to the generator cannot quietly empty the test.
    let mut rng = Rng::fresh("the_test_data_covers_the_edge_cases");
    let (mut ones, mut zeros, mut nans, mut infs, mut negs, mut near_one) = (0, 0, 0, 0, 0, 0);
    let (mut subnormal_out, mut overflow_out) = (0, 0);
    for dtype in DType::ALL {
        let case = ScaleCase::random(&mut rng, dtype, 400, 50, 50, 0, 1, 0.3);
        for i in 0..case.n {
            let f = case.factor(i);
            ones += (f == 1.0) as usize;
            zeros += (f == 0.0) as usize;
            nans += f.is_nan() as usize;
            infs += f.is_infinite() as usize;
            negs += (f < 0.0) as usize;
            near_one += (f != 1.0 && (f - 1.0).abs() < 1e-6) as usize;
            if f == 1.0 || !f.is_finite() {
                continue;
            }
            let min_normal = match dtype {
                DType::F32 | DType::BF16 => 2f64.powi(-126),
                DType::F16 => 2f64.powi(-14),
            };
            for j in 0..case.v {
                let k = i * case.stride + j;
                let x = decode(
                    dtype,
                    &case.x.as_ref()[k * dtype.size()..(k + 1) * dtype.size()],
                )[0];
                let y = expected(dtype, x, f);
                subnormal_out += (y != 0.0 && y.abs() < min_normal) as usize;
                overflow_out += (y.is_infinite() && x.is_finite()) as usize;
            }
        }
    }
    for (what, count) in [
        ("factor 1 rows", ones),
        ("factor ±0 rows", zeros),
        ("NaN factor rows", nans),
        ("infinite factor rows", infs),
        ("negative factor rows", negs),
        ("factor 1 ± ulp rows", near_one),
        ("subnormal results", subnormal_out),
        ("overflowing results", overflow_out),
    ] {
        assert!(count > 0, "no {what} in the generated cases");
    }
}

#[test]
fn ties_round_to_even() {
    // Every bf16 / f16 value in [1, 2) times factors whose f32 products land exactly halfway
    // between two values of the dtype: round to nearest even (neither truncation nor half-up).
    let mut rng = Rng::fresh("ties_round_to_even");
    let factors = [
        1.5f32,
        1.25,
        1.75,
        1.125,
        1.0 + 2f64.powi(-8) as f32,
        0.75,
        -1.5,
        3.0,
    ];
    for dev in devices("ties_round_to_even") {
        for (dtype, p) in [(DType::BF16, 8), (DType::F16, 11)] {
            let v = 1usize << (p - 1); // the values of [1, 2)
            let n = factors.len();
            let mut case = ScaleCase::random(&mut rng, dtype, n, v, v, 0, 1, 0.0);
            let step = 2f64.powi(-(p - 1));
            let row: Vec<f64> = (0..v).map(|j| 1.0 + j as f64 * step).collect();
            let enc = encode(dtype, &row);
            let mut buf = case.x.as_ref().to_vec();
            for (i, &f) in factors.iter().enumerate() {
                let s = case.offset + i * case.stride;
                buf[s * dtype.size()..(s + v) * dtype.size()].copy_from_slice(&enc);
                case.factors[case.factor_offset + i] = f;
            }
            case.x = Bytes::from_slice(&buf);
            // Ties in the data, rounded each way by the reference.
            let (mut up, mut down) = (0, 0);
            for &f in &factors {
                for &x in &row {
                    let y = round_f32(x * f as f64);
                    let r = expected(dtype, x, f);
                    let e = ((y.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023;
                    let half_ulp = 2f64.powi(e - p);
                    if (y - r).abs() == half_ulp {
                        if r.abs() > y.abs() {
                            up += 1;
                        } else {
                            down += 1;
                        }
                    }
                }
            }
            assert!(
                up > 10 && down > 10,
                "{}: {up} ties rounded up, {down} down",
                dtype.name()
            );
            run_and_check(&dev, &case);
        }
    }
}

#[test]
fn many_rows_and_long_rows() {
    // Many rows (on CUDA: more work items than one batch of every block, so the blocks loop)
    // and rows of 2^18 + elements (many chunks per row).
    let mut rng = Rng::fresh("many_rows_and_long_rows");
    for dev in devices("many_rows_and_long_rows") {
        for (dtype, n, v, stride, offset, fs) in [
            (DType::BF16, 300_000, 3, 4, 1, 1),
            (DType::F32, 2, 262_144 + 13, 262_160, 1, 1),
            (DType::F16, 3, 262_144, 262_144, 0, 0),
        ] {
            let case = ScaleCase::random(&mut rng, dtype, n, v, stride, offset, fs, 0.5);
            run_and_check(&dev, &case);
        }
    }
}

#[test]
fn reference_rounding_is_right_on_known_values() {
    // The independent reference itself, on hand-checked values.
    let bf = |x: f64, f: f32| expected(DType::BF16, x, f);
    let h = |x: f64, f: f32| expected(DType::F16, x, f);
    // 1.0078125 × 1.5 = 1.51171875: halfway between 1.5078125 (odd) and 1.515625 (even).
    assert_eq!(bf(1.0078125, 1.5), 1.515625);
    // 1.0234375 × 1.5 = 1.53515625: halfway between 1.53125 (even) and 1.5390625 (odd).
    assert_eq!(bf(1.0234375, 1.5), 1.53125);
    // f16: 1 + 2^-10 times 1.5 = 1.5 + 1.5 · 2^-10, halfway between 1.5 + 2^-10 (odd) and
    // 1.5 + 2^-9 (even).
    assert_eq!(h(1.0 + 2f64.powi(-10), 1.5), 1.5 + 2f64.powi(-9));
    // Overflow and the largest finite values.
    assert_eq!(h(65504.0, 1.0000001), 65504.0);
    assert_eq!(h(65504.0, 1.0005), f64::INFINITY);
    assert_eq!(h(-60000.0, 2.0), f64::NEG_INFINITY);
    assert_eq!(bf(3.0e38, 2.0), f64::INFINITY);
    // Subnormals of f16 (2^-24 is the smallest) and underflow to a signed zero.
    assert_eq!(h(1.0, 2f64.powi(-24) as f32), 2f64.powi(-24));
    assert_eq!(h(1.0, 2f64.powi(-26) as f32), 0.0);
    assert!(h(-1.0, 2f64.powi(-26) as f32).is_sign_negative());
    // A tie, 1.5 · 2^-24, goes to the even neighbour 2 · 2^-24.
    assert_eq!(h(1.5, 2f64.powi(-24) as f32), 2f64.powi(-23));
    // bf16 subnormal (smallest 2^-133) and f32 rounding before the dtype's.
    assert_eq!(bf(1.0, 2f64.powi(-133) as f32), 2f64.powi(-133));
    assert_eq!(
        expected(DType::F32, 1.0, 2f64.powi(-149) as f32),
        2f64.powi(-149)
    );
    // A tie, 2^-150, goes to the even neighbour 0.
    assert_eq!(expected(DType::F32, 0.5, 2f64.powi(-149) as f32), 0.0);
    // Specials.
    assert!(bf(f64::INFINITY, 0.0).is_nan());
    assert!(bf(2.0, f32::NAN).is_nan());
    assert!(bf(-2.0, 0.0).is_sign_negative());
}
