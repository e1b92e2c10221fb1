//! The element types the kernels read and write, and their exact conversions to and from f64.
//!
//! The CPU backends compute in f64 and convert every element on the way in and out, so these
//! conversions are written without branches or per-call feature checks, which lets the row
//! loops vectorise: `half`'s own conversions branch (bf16) or test for F16C on every call (f16),
//! which held the MoE permute and combine to a few % of a memory copy. The tests below check them
//! bit for bit against `half`'s widening and against rounding through f32 "to odd".

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::tensor::DType;

/// A floating-point element type the kernels read and write: `f32`, [`bf16`] and [`struct@f16`].
///
/// Sealed: the safe views ([`Matrix::host`](crate::Matrix::host) and its kin) size the memory
/// they hand to the kernels from [`DTYPE`](Element::DTYPE), so an implementation whose `DTYPE`
/// did not match its size would let safe code read or write past a slice. It cannot be
/// implemented outside this crate:
///
/// ```compile_fail
/// use distill_kernels::{DType, Element};
///
/// #[derive(Clone, Copy)]
/// struct Byte(u8);
/// impl Element for Byte {
///     const DTYPE: DType = DType::F32; // 4 bytes claimed for a 1-byte type
///     fn to_f64(self) -> f64 {
///         self.0 as f64
///     }
///     fn from_f64(x: f64) -> Self {
///         Byte(x as u8)
///     }
/// }
/// ```
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widens to f64 (exact; a NaN keeps its payload and gets the quiet bit).
    fn to_f64(self) -> f64;
    /// Rounds from f64 to nearest, ties to even (correctly rounded: one rounding of the exact
    /// value; NaN stays NaN, overflow gives infinity).
    fn from_f64(x: f64) -> Self;
    /// `dst[i] = Self::from_f64(src[i])` over the shorter of the two slices; a type may do it
    /// faster a slice at a time.
    fn from_f64_slice(src: &[f64], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_f64(s);
        }
    }
}

mod sealed {
    /// Implemented for exactly the types whose size matches their [`DType`](super::DType).
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline]
    fn to_f64(self) -> f64 {
        // A bf16 is the top half of an f32; the f64 cast quiets a NaN as `half` does.
        f32::from_bits(u32::from(self.to_bits()) << 16) as f64
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        // Exact in f32 (or ±inf past bf16's range, or NaN), so the top half is the bf16; a NaN
        // gets its quiet bit, as `bf16::from_f32` sets it.
        let bits = (round_to_grid(x, 7, -133) as f32).to_bits();
        let quiet = if x.is_nan() { 0x40 } else { 0 };
        bf16::from_bits((bits >> 16) as u16 | quiet)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f64(self) -> f64 {
        // No subnormal float on the way, so a flush-to-zero / denormals-are-zero mode
        // (torch.set_flush_denormal, -ffast-math libraries) changes nothing, as it does not for
        // `half`'s F16C conversion.
        let h = u32::from(self.to_bits());
        // Exponent and fraction moved into an f32's places. Normal: rebiased by 127 − 15.
        // Subnormal: read as 2^-14 · (1 + m/1024) (one binade up), minus 2^-14, leaving
        // m · 2^-24 exactly. Infinity / NaN: the exponent all ones, the payload kept.
        let u = (h & 0x7FFF) << 13;
        let e = u & 0x0F80_0000;
        let normal = f32::from_bits(u + (112 << 23));
        let subnormal = f32::from_bits(u + (113 << 23)) - f32::from_bits(113 << 23);
        let special = f32::from_bits(u + (224 << 23));
        let magnitude = if e == 0 {
            subnormal
        } else if e == 0x0F80_0000 {
            special
        } else {
            normal
        };
        f32::from_bits(magnitude.to_bits() | (h & 0x8000) << 16) as f64
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        // An f16 value (or 2^16 past the largest finite one, or NaN), exact in f64; its bits
        // taken apart with integer operations, never a subnormal float (see `to_f64`).
        let g = round_to_grid(x, 10, -24);
        let bits = g.to_bits();
        let a = g.abs();
        // Normal (2^-14 <= a < 2^16): the exponent rebiased, the top 10 fraction bits.
        let exponent = ((bits >> 52) & 0x7FF).wrapping_sub(1023 - 15);
        let normal = (exponent << 10 | (bits >> 42) & 0x3FF) as u16;
        // Subnormal (a < 2^-14): a whole number of 2^-24 quanta, 0..=1023.
        let subnormal = (a * 16_777_216.0) as u16;
        // NaN: quiet, the top of its payload kept (what `f16::from_f32` gives).
        let nan = 0x7E00 | ((bits >> 42) & 0x3FF) as u16;
        let magnitude = if a < 6.103_515_625e-5 {
            subnormal
        } else if a < 65536.0 {
            normal
        } else if a.is_nan() {
            nan
        } else {
            0x7C00
        };
        f16::from_bits(((bits >> 48) as u16 & 0x8000) | magnitude)
    }
    fn from_f64_slice(src: &[f64], dst: &mut [f16]) {
        // Rounded to the f16 grid in f64, then converted (exactly) 8 at a time by `half`'s
        // slice conversion, which checks for F16C once (the MoE combine's and scale_row's
        // path; per element, `from_f64` takes the bits apart with integer operations).
        const CHUNK: usize = 256;
        let mut exact = [0f32; CHUNK];
        for (src, dst) in src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)) {
            let n = src.len().min(dst.len());
            for (e, &s) in exact[..n].iter_mut().zip(src) {
                *e = round_to_grid(s, 10, -24) as f32;
            }
            dst[..n].convert_from_f32_slice(&exact[..n]);
        }
    }
}

/// `x` rounded to nearest, ties to even, to a binary float with `frac_bits` fraction bits and
/// no quantum below 2^`min_quantum_exp` (bf16: 7, −133; f16: 10, −24): the value `from_f64`
/// rounds to, past the format's largest finite value too (bf16 then casts to ±inf in f32, f16
/// checks for 2^16); NaN stays NaN with its payload. Adding c = 2^52 quanta of |x|'s binade
/// leaves a sum whose f64 ulp is that quantum, so the addition rounds |x| to the grid (ties to
/// even: c is an even number of quanta), and subtracting c again is exact.
#[inline]
fn round_to_grid(x: f64, frac_bits: u64, min_quantum_exp: i32) -> f64 {
    const EXPONENT: u64 = 0x7FF0_0000_0000_0000;
    // Anything from 2^200 up (inf and NaN too) only has to stay huge: capping its binade keeps
    // c finite.
    const CAP: f64 = 1.606_938_044_258_990_3e60; // 2^200
    let a = x.abs();
    let binade = if a < CAP { a } else { CAP };
    let c = f64::from_bits((binade.to_bits() & EXPONENT) + ((52 - frac_bits) << 52));
    // Below the smallest normal the quantum stays that of the subnormals.
    let floor = f64::from_bits(((min_quantum_exp + 52 + 1023) as u64) << 52);
    let c = if c > floor { c } else { floor };
    ((a + c) - c).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: reproducible random bits.
    fn random_bits(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// `x` rounded to f32 "to odd": truncated toward zero, with the last mantissa bit set when
    /// that lost anything. Rounding the result to nearest-even into a format at least two bits
    /// narrower (bf16, f16, over their whole ranges, subnormals included) gives `x` correctly
    /// rounded: the odd bit stands for the discarded bits, so no tie is invented or lost. The
    /// oracle for [`Element::from_f64`] (`half`'s own `from_f64` drops the low 32 bits of the
    /// f64 first and so rounds some values just above a tie down).
    fn round_to_odd_f32(x: f64) -> f32 {
        let y = x as f32; // nearest; exact for NaN, ±inf, ±0 and values f32 holds
        if x.is_nan() || y as f64 == x {
            return y;
        }
        let mut bits = y.to_bits();
        if (y as f64).abs() > x.abs() {
            bits -= 1; // y rounded away from zero (up to inf on overflow): its neighbour toward zero
        }
        f32::from_bits(bits | 1)
    }

    /// The oracles: `half`'s widening, and rounding through f32 to odd, then `half`'s rounding
    /// of that f32 to nearest.
    trait Oracle: Element + std::fmt::Debug {
        fn bits(self) -> u32;
        fn slow_to_f64(self) -> f64;
        fn slow_from_f64(x: f64) -> Self;
    }
    impl Oracle for f32 {
        fn bits(self) -> u32 {
            self.to_bits()
        }
        fn slow_to_f64(self) -> f64 {
            f64::from(self)
        }
        fn slow_from_f64(x: f64) -> Self {
            x as f32
        }
    }
    impl Oracle for bf16 {
        fn bits(self) -> u32 {
            self.to_bits().into()
        }
        fn slow_to_f64(self) -> f64 {
            bf16::to_f64(self)
        }
        fn slow_from_f64(x: f64) -> Self {
            bf16::from_f32(round_to_odd_f32(x))
        }
    }
    impl Oracle for f16 {
        fn bits(self) -> u32 {
            self.to_bits().into()
        }
        fn slow_to_f64(self) -> f64 {
            f16::to_f64(self)
        }
        fn slow_from_f64(x: f64) -> Self {
            f16::from_f32(round_to_odd_f32(x))
        }
    }

    fn check_widen<T: Oracle>(values: impl Iterator<Item = T>) {
        // The widening is exact, so equal f64 bits mean equal values (and NaN payloads).
        for v in values {
            assert_eq!(
                Element::to_f64(v).to_bits(),
                v.slow_to_f64().to_bits(),
                "{:?}: {:?}",
                T::DTYPE,
                v
            );
        }
    }

    #[test]
    fn to_f64_is_halfs_widening_bitwise() {
        check_widen((0..=u16::MAX).map(bf16::from_bits));
        check_widen((0..=u16::MAX).map(f16::from_bits));
        let mut next = random_bits(1);
        check_widen((0..1 << 20).map(|_| f32::from_bits(next() as u32)));
    }

    /// f64 values that stress the rounding to `T`: any bit pattern (huge, tiny, inf, NaN),
    /// the format's own values and their neighbours, and the midpoints between neighbours,
    /// exact and off by a little either way.
    fn hard_values<T: Element>(next: &mut impl FnMut() -> u64, count: usize) -> Vec<f64> {
        let mut xs = Vec::with_capacity(count * 8);
        let (ulp, format_value): (f64, &dyn Fn(u64) -> f64) = match T::DTYPE {
            DType::F32 => (2f64.powi(-23), &|b| f32::from_bits(b as u32) as f64),
            DType::BF16 => (2f64.powi(-7), &|b| bf16::from_bits(b as u16).to_f64()),
            DType::F16 => (2f64.powi(-10), &|b| f16::from_bits(b as u16).to_f64()),
        };
        for _ in 0..count {
            xs.push(f64::from_bits(next()));
            let b = next();
            let v = format_value(b);
            // The exact midpoint to the next pattern up (away from zero; subnormals included,
            // both parities of v's last bit: ties that round up and down to even) and its two
            // f64 neighbours.
            let w = format_value(b.wrapping_add(1));
            if v.is_finite() && w.is_finite() && (v < 0.0) == (w < 0.0) {
                let mid = (v + w) / 2.0; // exact: one more bit than the format
                xs.extend([
                    mid,
                    f64::from_bits(mid.to_bits() + 1),
                    f64::from_bits(mid.to_bits() - 1),
                ]);
            }
            // Half an ulp of v (relative; subnormals get other distances, also fine).
            let half = v.abs() * ulp / 2.0;
            let tiny = half * 2f64.powi(-30);
            for x in [
                v,
                v + half,
                v - half,
                v + half + tiny,
                v + half - tiny,
                f64::from_bits((v + half).to_bits() ^ 1),
            ] {
                xs.push(x);
            }
            xs.push(v * 2f64.powi((next() % 80) as i32 - 40));
        }
        xs.extend([
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            1e300,
            2f64.powi(979),
            2f64.powi(982),
            -2f64.powi(999),
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            65536.0,
            3.4e38,
            2f64.powi(-133),
            2f64.powi(-134),
            2f64.powi(-134) * 1.0000001,
            2f64.powi(-24),
            2f64.powi(-25),
            2f64.powi(-25) * 1.0000001,
            2f64.powi(-14),
            2f64.powi(-14) - 2f64.powi(-25),
        ]);
        // NaNs with payloads, both signs.
        for payload in [1u64, 1 << 28, 1 << 29, (1 << 51) - 1, 0x0005_5555_5555_5555] {
            xs.push(f64::from_bits(0x7FF0_0000_0000_0000 | payload));
            xs.push(f64::from_bits(0xFFF8_0000_0000_0000 | payload));
        }
        xs
    }

    fn check_narrow<T: Oracle>(seed: u64) {
        let mut next = random_bits(seed);
        let xs = hard_values::<T>(&mut next, 1 << 17);
        // The slice conversion too, over lengths that do and do not fill its chunks.
        let mut sliced = vec![T::from_f64(0.0); xs.len()];
        let mut start = 0;
        for len in (0..).map(|i| [1, 7, 256, 300, 1000][i % 5]) {
            let end = (start + len).min(xs.len());
            T::from_f64_slice(&xs[start..end], &mut sliced[start..end]);
            start = end;
            if start == xs.len() {
                break;
            }
        }
        for (&x, &s) in xs.iter().zip(&sliced) {
            let (got, want) = (T::from_f64(x), T::slow_from_f64(x));
            for (how, got) in [("from_f64", got), ("from_f64_slice", s)] {
                assert!(
                    got.bits() == want.bits(),
                    "{:?} {how}: {x:e} ({:#x}) -> {:#x}, rounding to odd gives {:#x}",
                    T::DTYPE,
                    x.to_bits(),
                    got.bits(),
                    want.bits()
                );
            }
        }
    }

    /// Runs `f` with the SSE unit flushing subnormal results to zero and reading subnormal
    /// inputs as zero (what `torch.set_flush_denormal(True)` or `-ffast-math` code sets in the
    /// thread), then restores the mode. The compiler assumes the default mode, so the work is
    /// kept behind `black_box` and a call that is not inlined.
    #[cfg(target_arch = "x86_64")]
    #[allow(deprecated)] // _mm_getcsr / _mm_setcsr: no stable replacement
    fn with_ftz_daz<R>(f: impl FnOnce() -> R) -> R {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        // SAFETY: SSE is baseline on x86_64; only the FTZ (bit 15) and DAZ (bit 6) flags of
        // this thread change, and the old value is put back before returning.
        let old = unsafe { _mm_getcsr() };
        unsafe { _mm_setcsr(old | 0x8040) };
        let r = std::hint::black_box(f());
        unsafe { _mm_setcsr(old) };
        r
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn f16_conversions_ignore_flush_to_zero_modes() {
        // A review found the first branch-free version passing f16 subnormals through f32
        // subnormals: 0 under FTZ / DAZ, where `half`'s F16C conversions are exact.
        let patterns: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let xs = hard_values::<f16>(&mut random_bits(5), 1 << 15);
        let want_wide: Vec<u64> = patterns.iter().map(|h| h.slow_to_f64().to_bits()).collect();
        let want_narrow: Vec<u32> = xs.iter().map(|&x| f16::slow_from_f64(x).bits()).collect();
        #[inline(never)]
        fn convert(patterns: &[f16], xs: &[f64]) -> (Vec<u64>, Vec<u32>, Vec<u32>) {
            let wide = patterns
                .iter()
                .map(|&h| Element::to_f64(h).to_bits())
                .collect();
            let narrow = xs
                .iter()
                .map(|&x| <f16 as Element>::from_f64(x).bits())
                .collect();
            let mut sliced = vec![f16::ZERO; xs.len()];
            <f16 as Element>::from_f64_slice(xs, &mut sliced);
            (wide, narrow, sliced.iter().map(|h| h.bits()).collect())
        }
        let (p, x) = (std::hint::black_box(&patterns), std::hint::black_box(&xs));
        let (wide, narrow, sliced) = with_ftz_daz(|| convert(p, x));
        for (i, (&got, &want)) in wide.iter().zip(&want_wide).enumerate() {
            assert_eq!(
                got,
                want,
                "to_f64 of {:#06x} under FTZ/DAZ",
                patterns[i].to_bits()
            );
        }
        for (i, &want) in want_narrow.iter().enumerate() {
            assert_eq!(narrow[i], want, "from_f64({:e}) under FTZ/DAZ", xs[i]);
            assert_eq!(sliced[i], want, "from_f64_slice({:e}) under FTZ/DAZ", xs[i]);
        }
    }

    #[test]
    fn from_f64_is_rounding_to_odd_then_to_nearest_bitwise() {
        check_narrow::<bf16>(2);
        check_narrow::<f16>(3);
        check_narrow::<f32>(4);
    }

    /// Checks that `r` (of a format with the given bits ↔ f64 maps) is `x` rounded to nearest,
    /// ties to even, against the two neighbours of `r` (differences with a neighbour of `x` are
    /// exact in f64).
    fn check_nearest(x: f64, r_bits: u16, to_f64: impl Fn(u16) -> f64, what: &str) {
        let r = to_f64(r_bits);
        if x.is_nan() {
            assert!(r.is_nan(), "{what}: {x:e} -> {r:e}");
            return;
        }
        if r.is_infinite() {
            // Overflow: x is beyond the largest finite value by at least half its ulp.
            let max_bits = (r_bits & 0x8000) | ((r_bits & 0x7FFF) - 1);
            let max = to_f64(max_bits);
            let prev = to_f64(max_bits - 1);
            assert!(
                (x - max).abs() >= (max - prev).abs() / 2.0,
                "{what}: {x:e} -> inf"
            );
            return;
        }
        let d = (x - r).abs();
        for nb in [r_bits.wrapping_add(1), r_bits.wrapping_sub(1)] {
            let n = to_f64(nb);
            if n.is_nan() || n.is_infinite() || (n == 0.0 && r == 0.0) {
                continue;
            }
            let dn = (x - n).abs();
            assert!(
                d < dn || (d == dn && r_bits & 1 == 0),
                "{what}: {x:e} -> {r:e} (bits {r_bits:#06x}) but {n:e} is nearer or the even tie"
            );
        }
    }

    #[test]
    fn from_f64_is_correctly_rounded_for_16_bit_formats() {
        let bf = |b: u16| bf16::from_bits(b).to_f64();
        let hf = |b: u16| f16::from_bits(b).to_f64();
        // Just above a tie: half's own from_f64 drops the low 32 bits of x and rounds these down.
        let above = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(<bf16 as Element>::from_f64(above).to_bits(), 0x3F81);
        assert_eq!(<bf16 as Element>::from_f64(-above).to_bits(), 0xBF81);
        let above = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(<f16 as Element>::from_f64(above).to_bits(), 0x3C01);
        // Exact ties go to even, and just below a tie rounds down.
        assert_eq!(
            <bf16 as Element>::from_f64(1.0 + 2f64.powi(-8)).to_bits(),
            0x3F80
        );
        assert_eq!(
            <bf16 as Element>::from_f64(1.0 + 3.0 * 2f64.powi(-8)).to_bits(),
            0x3F82
        );
        assert_eq!(
            <bf16 as Element>::from_f64(1.0 + 2f64.powi(-8) - 2f64.powi(-40)).to_bits(),
            0x3F80
        );
        // Specials.
        assert!(<bf16 as Element>::from_f64(f64::NAN).is_nan());
        assert_eq!(<bf16 as Element>::from_f64(1e300).to_bits(), 0x7F80);
        assert_eq!(<f16 as Element>::from_f64(-1e10).to_bits(), 0xFC00);
        assert_eq!(<f16 as Element>::from_f64(-0.0).to_bits(), 0x8000);
        assert_eq!(<bf16 as Element>::from_f64(1e-300).to_bits(), 0x0000);
        // Random values over each format's range (normal, subnormal, near overflow), with their
        // low bits random so that near-ties occur at all distances.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        for i in 0..400_000 {
            let u = next();
            // A random 16-bit pattern's value, then a random offset of up to one of its ulps,
            // and sometimes exactly half an ulp.
            let (fmt_bits, to): (u16, &dyn Fn(u16) -> f64) = if i % 2 == 0 {
                ((u >> 48) as u16, &bf)
            } else {
                ((u >> 48) as u16, &hf)
            };
            let base = to(fmt_bits & 0x7FFE);
            let next_up = to((fmt_bits & 0x7FFE) + 1);
            if !base.is_finite() || !next_up.is_finite() {
                continue;
            }
            let frac = match u & 7 {
                0 => 0.5,
                1 => 0.5 + f64::EPSILON * 4.0,
                2 => 0.5 - f64::EPSILON * 4.0,
                _ => (u & 0xFFFF_FFFF) as f64 / 2f64.powi(32),
            };
            let mut x = base + (next_up - base) * frac;
            if u & 8 != 0 {
                x = -x;
            }
            if i % 2 == 0 {
                check_nearest(x, <bf16 as Element>::from_f64(x).to_bits(), bf, "bf16");
            } else {
                check_nearest(x, <f16 as Element>::from_f64(x).to_bits(), hf, "f16");
            }
        }
    }
}
