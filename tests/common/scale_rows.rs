//! Row scaling (`Context::scale_rows`): cases (a matrix inside a buffer with padding around and
//! between its rows, rows with factor 1 filled with distinctive bit patterns), an INDEPENDENT
//! reference of every element's expected value (exact f64 product, then round-to-nearest-even to
//! f32 and to the dtype written here from the definition, not with the `half` crate), and a
//! runner on the CPU or CUDA device 0 that returns the buffers after the call.

use std::ffi::c_void;

use cudarc::driver::{CudaSlice, DevicePtr};
use distill_kernels::scale_rows::ScaleRows;
use distill_kernels::{DType, Error, Launch, Location, MatrixMut, Vector};

use super::{decode, elem_bits, encode, Bytes, Device, Rng};

/// Elements after the last row (must stay untouched).
pub const TAIL: usize = 11;

/// A distinctive 16-bit pattern for padding (a signalling NaN in bf16, a NaN in f16).
const PAD_16: u16 = 0xFF8D;
/// A distinctive 32-bit pattern for padding (a signalling NaN with a payload).
const PAD_32: u32 = 0x7F80_0D1F;

#[derive(Debug, Clone)]
pub struct ScaleCase {
    pub dtype: DType,
    pub n: usize,
    pub v: usize,
    pub stride: usize,
    /// Elements of the buffer before the first row (misaligns the row starts).
    pub offset: usize,
    /// The whole buffer, encoded: `offset`, the rows with `stride − v` padding after each but the
    /// last, then [`TAIL`] elements.
    pub x: Bytes,
    /// The factors buffer; row `i` reads `factors[factor_offset + i · factor_stride]`, every other
    /// entry is junk that must not be read.
    pub factors: Vec<f32>,
    pub factor_stride: usize,
    pub factor_offset: usize,
    pub what: String,
}

/// Factor kinds drawn per row.
fn random_factor(rng: &mut Rng, dtype: DType) -> f32 {
    let small = match dtype {
        // Products in the dtype's subnormal range (or flushed to zero).
        DType::F32 => 2f64.powi(-(rng.below(120, 150) as i32)) as f32,
        DType::BF16 => (2f64.powi(-(rng.below(120, 140) as i32)) * rng.range(1.0, 2.0)) as f32,
        DType::F16 => (2f64.powi(-(rng.below(14, 26) as i32)) * rng.range(1.0, 2.0)) as f32,
    };
    let big = match dtype {
        DType::F32 | DType::BF16 => 2f32.powi(rng.below(100, 128) as i32),
        DType::F16 => 2f32.powi(rng.below(8, 20) as i32) * rng.range(1.0, 2.0) as f32,
    };
    match rng.below(0, 16) {
        0 => 0.0,
        1 => -0.0,
        2 => f32::NAN,
        3 => f32::INFINITY,
        4 => f32::NEG_INFINITY,
        5 => -(rng.range(0.1, 10.0) as f32),
        6 => small,
        7 => big,
        // Next to 1: scaled, not skipped.
        8 => f32::from_bits(1.0f32.to_bits() - 1),
        9 => f32::from_bits(1.0f32.to_bits() + 1),
        10 => -1.0,
        _ => (rng.range(-3.0, 3.0)).exp2() as f32 * if rng.uniform() < 0.2 { -1.0 } else { 1.0 },
    }
}

/// A random non-zero value for a scaled row, sometimes a special one.
fn random_value(rng: &mut Rng, dtype: DType) -> f64 {
    let r = rng.uniform();
    if r < 0.01 {
        return f64::INFINITY;
    }
    if r < 0.02 {
        return f64::NEG_INFINITY;
    }
    if r < 0.03 {
        return f64::NAN;
    }
    if r < 0.05 {
        // A subnormal of the dtype.
        let min_sub = match dtype {
            DType::F32 => 2f64.powi(-149),
            DType::BF16 => 2f64.powi(-133),
            DType::F16 => 2f64.powi(-24),
        };
        return min_sub * rng.below(1, 100) as f64 * if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
    }
    loop {
        let x = rng.normal() * rng.range(-4.0, 4.0).exp2();
        let x = decode(dtype, &encode(dtype, &[x]))[0];
        if x != 0.0 {
            return x;
        }
    }
}

/// Bits of a row with factor 1, which must survive untouched: NaN payloads (signalling ones,
/// which any arithmetic would quiet), infinities, zeros and random bit patterns.
fn poison_bits(rng: &mut Rng, dtype: DType, j: usize) -> u32 {
    let r = rng.next_u64();
    match (dtype, j % 4) {
        (DType::F32, 0) => 0x7F80_0001 | ((r as u32) & 0x003F_FFFF), // signalling NaN
        (DType::F32, 1) => 0xFF80_0000 | ((r as u32) & 0x007F_FFFF) | 1,
        (DType::F32, _) => r as u32,
        (_, 0) => (0x7C01 | (r as u32 & 0x01FF)) & 0xFFFF, // f16: signalling NaN; bf16: a big number
        (DType::BF16, 1) => 0xFF81 | (r as u32 & 0x003E),  // signalling NaN
        (_, _) => r as u32 & 0xFFFF,
    }
}

fn put(dtype: DType, buf: &mut [u8], i: usize, bits: u32) {
    let s = dtype.size();
    buf[i * s..(i + 1) * s].copy_from_slice(&bits.to_le_bytes()[..s]);
}

impl ScaleCase {
    /// Random case: each row's factor drawn from [`random_factor`] or exactly 1 with probability
    /// `p_one` (those rows hold distinctive bits); scaled rows hold random non-zero values.
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        rng: &mut Rng,
        dtype: DType,
        n: usize,
        v: usize,
        stride: usize,
        offset: usize,
        factor_stride: usize,
        p_one: f64,
    ) -> Self {
        let factor_offset = rng.below(0, 3);
        let nf = factor_offset + (n - 1) * factor_stride + 1 + rng.below(0, 3);
        // Junk in the entries no row reads: reading one would show in the results.
        let mut factors: Vec<f32> = (0..nf).map(|k| 1000.0 + k as f32).collect();
        for i in 0..n {
            let f = if rng.uniform() < p_one {
                1.0
            } else {
                random_factor(rng, dtype)
            };
            factors[factor_offset + i * factor_stride] = f;
        }
        let elems = offset + (n - 1) * stride + v + TAIL;
        let mut buf = vec![0u8; elems * dtype.size()];
        for i in 0..elems {
            put(
                dtype,
                &mut buf,
                i,
                if dtype == DType::F32 {
                    PAD_32
                } else {
                    PAD_16 as u32
                },
            );
        }
        for i in 0..n {
            let f = factors[factor_offset + i * factor_stride];
            let start = offset + i * stride;
            for j in 0..v {
                let bits = if f == 1.0 {
                    poison_bits(rng, dtype, j)
                } else {
                    let x = random_value(rng, dtype);
                    let e = encode(dtype, &[x]);
                    elem_bits(dtype, &e, 0)
                };
                put(dtype, &mut buf, start + j, bits);
            }
        }
        ScaleCase {
            dtype,
            n,
            v,
            stride,
            offset,
            x: Bytes::from_slice(&buf),
            factors,
            factor_stride,
            factor_offset,
            what: format!(
                "{} N={n} V={v} stride={stride} offset={offset} factor_stride={factor_stride}",
                dtype.name()
            ),
        }
    }

    /// The factor of row `i`.
    pub fn factor(&self, i: usize) -> f32 {
        self.factors[self.factor_offset + i * self.factor_stride]
    }

    /// Elements of the buffer.
    pub fn elems(&self) -> usize {
        self.x.len() / self.dtype.size()
    }

    /// `(row, column)` of buffer element `k` when it belongs to the matrix.
    pub fn locate(&self, k: usize) -> Option<(usize, usize)> {
        let k = k.checked_sub(self.offset)?;
        let (i, j) = (k / self.stride, k % self.stride);
        (i < self.n && j < self.v).then_some((i, j))
    }
}

/// Rounds `y` (finite or not) to nearest, ties to even, on the grid of a binary format with `p`
/// significand bits (implicit bit included), minimum normal exponent `emin` and largest finite
/// value `max` (beyond which the rounded value is infinite). Written from the definition.
pub fn round_ne(y: f64, p: i32, emin: i32, max: f64) -> f64 {
    if !y.is_finite() || y == 0.0 {
        return y;
    }
    // y is a normal f64 here (it comes from an f32): its exponent from the bits, exactly.
    let e = ((y.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let ulp = 2f64.powi(e.max(emin) - (p - 1));
    let r = (y / ulp).round_ties_even() * ulp;
    if r.abs() > max {
        f64::INFINITY.copysign(y)
    } else {
        r
    }
}

/// The f32 rounding of `y` (an exact f64 product of two f32 values), written from the definition.
pub fn round_f32(y: f64) -> f64 {
    round_ne(y, 24, -126, f32::MAX as f64)
}

/// The expected value of `x · f`: the exact product, rounded to f32, then once to the dtype.
pub fn expected(dtype: DType, x: f64, f: f32) -> f64 {
    // Two ≤ 24-bit significands: the f64 product is exact (NaN and infinities as IEEE says).
    let p = round_f32(x * f as f64);
    match dtype {
        DType::F32 => p,
        DType::BF16 => round_ne(p, 8, -126, (2.0 - 2f64.powi(-7)) * 2f64.powi(127)),
        DType::F16 => round_ne(p, 11, -14, 65504.0),
    }
}

/// Checks every element of `after` against `case`: rows with factor 1, padding and the tail
/// bitwise untouched, scaled elements equal to [`expected`] (value and sign; NaN where NaN is
/// expected, any payload). Returns the number of elements that were scaled.
pub fn check_scaled(case: &ScaleCase, after: &[u8]) -> Result<usize, String> {
    let dt = case.dtype;
    let before = case.x.as_ref();
    let mut scaled = 0;
    let mut errors = Vec::new();
    for k in 0..case.elems() {
        let (b, a) = (elem_bits(dt, before, k), elem_bits(dt, after, k));
        match case.locate(k) {
            Some((i, j)) if case.factor(i) != 1.0 => {
                let f = case.factor(i);
                let x = decode(dt, &before[k * dt.size()..(k + 1) * dt.size()])[0];
                let want = expected(dt, x, f);
                let got = decode(dt, &after[k * dt.size()..(k + 1) * dt.size()])[0];
                let ok = if want.is_nan() {
                    got.is_nan()
                } else {
                    got == want && got.is_sign_negative() == want.is_sign_negative()
                };
                if !ok {
                    errors.push(format!(
                        "x[{i}, {j}] = {x:e} (bits {b:#x}) × {f:e}: got {got:e} (bits {a:#x}), \
                         expected {want:e}"
                    ));
                }
                scaled += 1;
            }
            Some((i, j)) => {
                if a != b {
                    errors.push(format!(
                        "x[{i}, {j}] (factor 1) changed: bits {b:#x} -> {a:#x}"
                    ));
                }
            }
            None => {
                if a != b {
                    errors.push(format!(
                        "buffer element {k} (not in the matrix) changed: bits {b:#x} -> {a:#x}"
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(scaled)
    } else {
        let n = errors.len();
        errors.truncate(12);
        Err(format!("{n} wrong elements, first: {}", errors.join("; ")))
    }
}

/// What a bad-input test changes in the call (the buffers stay as the case made them).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tweaks {
    pub null_x: bool,
    pub null_factors: bool,
    /// Bytes added to the x pointer (misalignment).
    pub x_byte_shift: usize,
    /// Bytes added to the factors pointer (misalignment).
    pub factors_byte_shift: usize,
    /// The factors view's length (default: what the buffer holds past the pointer).
    pub factors_len: Option<usize>,
    /// The factors pointer placed this many bytes into the x buffer (overlap).
    pub factors_in_x: Option<usize>,
    pub n: Option<usize>,
    pub v: Option<usize>,
    pub stride: Option<usize>,
    pub factor_stride: Option<usize>,
    /// The location both views claim (default: the device's).
    pub location: Option<Location>,
}

/// Runs `case` (with `tweaks`) on `dev`; returns the call's result and the x and factor buffers
/// after it.
pub fn run(dev: &Device, case: &ScaleCase, tweaks: Tweaks) -> (Result<(), Error>, Bytes, Vec<f32>) {
    let mut x = case.x.clone();
    let mut factors = case.factors.clone();
    let result = match dev {
        Device::Cpu(ctx) => {
            let xp = x.ptr();
            let fp = factors.as_mut_ptr().cast::<u8>();
            // SAFETY: host buffers the case laid out (tweaks only break the call's own checks).
            unsafe {
                call(
                    ctx,
                    case,
                    tweaks,
                    xp,
                    fp,
                    Location::Host,
                    &Launch::default(),
                )
            }
        }
        Device::Cuda(d) => {
            let dx: CudaSlice<u8> = d.stream.clone_htod(x.as_ref()).expect("htod x");
            let fbytes: Vec<u8> = factors.iter().flat_map(|f| f.to_le_bytes()).collect();
            let df: CudaSlice<u8> = d.stream.clone_htod(&fbytes).expect("htod factors");
            let xp = {
                let (p, _sync) = dx.device_ptr(&d.stream);
                p as usize as *mut u8
            };
            let fp = {
                let (p, _sync) = df.device_ptr(&d.stream);
                p as usize as *mut u8
            };
            d.stream.synchronize().expect("sync before");
            // SAFETY: the stream is live and belongs to device 0's primary context.
            let launch = unsafe { Launch::on_stream(d.stream.cu_stream() as *mut c_void) };
            // SAFETY: device buffers the case laid out.
            let r = unsafe { call(&d.ctx, case, tweaks, xp, fp, Location::Cuda(0), &launch) };
            d.stream.synchronize().expect("sync after the call");
            x.as_mut()
                .copy_from_slice(&d.stream.clone_dtoh(&dx).expect("dtoh x"));
            let fb = d.stream.clone_dtoh(&df).expect("dtoh factors");
            factors = fb
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            d.stream.synchronize().expect("sync after copies");
            r
        }
    };
    (result, x, factors)
}

/// Builds the views over the base pointers `xp` (the x buffer) and `fp` (the factors buffer) and
/// calls `scale_rows`.
///
/// # Safety
/// `xp` and `fp` hold the case's buffers at `location`.
unsafe fn call(
    ctx: &distill_kernels::Context,
    case: &ScaleCase,
    t: Tweaks,
    xp: *mut u8,
    fp: *mut u8,
    location: Location,
    launch: &Launch<'_>,
) -> Result<(), Error> {
    let loc = t.location.unwrap_or(location);
    let x_ptr = if t.null_x {
        std::ptr::null_mut()
    } else {
        // SAFETY: within the x buffer (the shift is a few bytes into the offset region or rows).
        unsafe { xp.add(case.offset * case.dtype.size() + t.x_byte_shift) }
    };
    let (f_ptr, f_avail) = match t.factors_in_x {
        // SAFETY: within the x buffer.
        Some(b) => (unsafe { xp.add(b) }, (case.x.len() - b) / 4),
        None => (
            // SAFETY: within the factors buffer.
            unsafe { fp.add(case.factor_offset * 4 + t.factors_byte_shift) },
            case.factors.len() - case.factor_offset,
        ),
    };
    let f_ptr = if t.null_factors {
        std::ptr::null()
    } else {
        f_ptr.cast::<f32>().cast_const()
    };
    let n = t.n.unwrap_or(case.n);
    let v = t.v.unwrap_or(case.v);
    let stride = t.stride.unwrap_or(case.stride);
    // SAFETY: the caller's contract; tweaked shapes are refused before any access.
    let call = unsafe {
        ScaleRows {
            x: MatrixMut::from_raw(x_ptr, case.dtype, n, v, stride, loc),
            factors: Vector::from_raw(f_ptr, t.factors_len.unwrap_or(f_avail), loc),
            factor_stride: t.factor_stride.unwrap_or(case.factor_stride),
        }
    };
    ctx.scale_rows(call, launch)
}
