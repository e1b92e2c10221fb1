//! Random logits for the benchmark: fresh, realistic, reproducible from a seed.
//!
//! Student logits are N(0, 3²); teacher logits are 0.9 × student + N(0, 1.5²), so the two
//! distributions are related the way a student and its teacher are, and the divergences are
//! neither zero nor saturated. Each row has its own generator (seeded from the run seed, the
//! dtype, V and the row index), so a row's values do not depend on how rows are chunked or
//! spread over threads.

use distill_kernels::{DType, Element};
use half::{bf16, f16};

/// Standard deviation of the student logits.
const STUDENT_SIGMA: f64 = 3.0;
/// Teacher = `TEACHER_SLOPE` × student + N(0, `TEACHER_NOISE`²).
const TEACHER_SLOPE: f64 = 0.9;
const TEACHER_NOISE: f64 = 1.5;

/// SplitMix64: small, fast, good enough for benchmark inputs.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normals (Box–Muller).
    fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.unit().ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * self.unit()).sin_cos();
        (r * c, r * s)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A seed mixed from several parts.
pub fn mix(parts: &[u64]) -> u64 {
    let mut r = Rng::new(0x5EED);
    for &p in parts {
        r.0 ^= p;
        r.next_u64();
    }
    r.next_u64()
}

/// 16 bytes, 16-byte aligned: the storage unit of [`HostBuf`].
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Block([u8; 16]);

/// A host buffer aligned to 16 bytes: for any element type (the CPU backend reads it as
/// `f32`/`bf16`/`f16`) and for the MoE row operations, whose rows must start on 16 bytes.
pub struct HostBuf {
    blocks: Vec<Block>,
    bytes: usize,
}

impl HostBuf {
    pub fn zeroed(bytes: usize) -> Self {
        HostBuf {
            blocks: vec![Block([0; 16]); bytes.div_ceil(16)],
            bytes,
        }
    }

    /// [`HostBuf::zeroed`] for sizes a user picks (`--rows`, `--vocab`): an error instead of
    /// an abort where the host cannot hold it (more than the memory available, when the system
    /// says, or an allocation that fails).
    pub fn try_zeroed(bytes: usize) -> Result<Self, String> {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        if let Some(free) = host_memory_available() {
            if bytes > free {
                return Err(format!(
                    "a host buffer of {:.2} GiB does not fit in the {:.2} GiB of memory available",
                    gib(bytes),
                    gib(free)
                ));
            }
        }
        let n = bytes.div_ceil(16);
        let mut blocks = Vec::new();
        blocks.try_reserve_exact(n).map_err(|e| {
            format!(
                "cannot allocate a host buffer of {:.2} GiB: {e}",
                gib(bytes)
            )
        })?;
        blocks.resize(n, Block([0; 16]));
        Ok(HostBuf { blocks, bytes })
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the blocks' bytes reinterpreted as the first `bytes` bytes they hold.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.bytes) }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), self.bytes) }
    }

    pub fn ptr(&self) -> *const u8 {
        self.blocks.as_ptr().cast()
    }

    pub fn ptr_mut(&mut self) -> *mut u8 {
        self.blocks.as_mut_ptr().cast()
    }
}

/// Bytes of memory the system could give this process now (`MemAvailable` of /proc/meminfo),
/// where it says.
pub fn host_memory_available() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

fn store(dtype: DType, x: f64, out: &mut [u8]) {
    match dtype {
        DType::F32 => out.copy_from_slice(&(x as f32).to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&<bf16 as Element>::from_f64(x).to_bits().to_le_bytes()),
        DType::F16 => out.copy_from_slice(&<f16 as Element>::from_f64(x).to_bits().to_le_bytes()),
    }
}

/// Little-endian f32 values of `b`.
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Elements of `dtype` in `bytes` whose exponent is all ones (NaN or ±inf: the 0xFF poison of
/// an unwritten element, or a computed non-finite value).
pub fn count_nonfinite(dtype: DType, bytes: &[u8]) -> usize {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000)
            .count(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80)
            .count(),
        DType::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00)
            .count(),
    }
}

/// An error's message (for `map_err`).
pub fn err_string<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Widens one row stored as `dtype` bytes to f64 (exact).
pub fn widen(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
    }
}

/// Fills `student` and `teacher` (each `rows × v` elements of `dtype`, contiguous) with rows
/// `row0 .. row0 + rows` of the logits of run `seed`, on all available cores.
pub fn fill_rows(
    seed: u64,
    dtype: DType,
    v: usize,
    row0: usize,
    student: &mut [u8],
    teacher: &mut [u8],
) {
    let row_bytes = v * dtype.size();
    let rows = student.len() / row_bytes;
    debug_assert_eq!(student.len(), rows * row_bytes);
    debug_assert_eq!(teacher.len(), rows * row_bytes);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(rows)
        .max(1);
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (k, (s_chunk, t_chunk)) in student
            .chunks_mut(per * row_bytes)
            .zip(teacher.chunks_mut(per * row_bytes))
            .enumerate()
        {
            scope.spawn(move || {
                for (j, (s_row, t_row)) in s_chunk
                    .chunks_mut(row_bytes)
                    .zip(t_chunk.chunks_mut(row_bytes))
                    .enumerate()
                {
                    let row = row0 + k * per + j;
                    fill_one_row(
                        mix(&[seed, dtype as u64, v as u64, row as u64]),
                        dtype,
                        s_row,
                        t_row,
                    );
                }
            });
        }
    });
}

fn fill_one_row(seed: u64, dtype: DType, s_row: &mut [u8], t_row: &mut [u8]) {
    let size = dtype.size();
    let mut rng = Rng::new(seed);
    for (s, t) in s_row
        .chunks_exact_mut(size)
        .zip(t_row.chunks_exact_mut(size))
    {
        let (z1, z2) = rng.normal_pair();
        let x = STUDENT_SIGMA * z1;
        store(dtype, x, s);
        store(dtype, TEACHER_SLOPE * x + TEACHER_NOISE * z2, t);
    }
}

/// Fills `out` (rows of `cols` elements of `dtype`, contiguous) with N(0, `sigma`²) values, on
/// all available cores. Row `i` of the buffer is drawn from its own generator (seeded from
/// `seed`, the dtype, `cols` and `i`), so the values do not depend on the thread count.
pub fn fill_normal(seed: u64, dtype: DType, cols: usize, sigma: f64, out: &mut [u8]) {
    let row_bytes = cols * dtype.size();
    if row_bytes == 0 {
        return;
    }
    let rows = out.len() / row_bytes;
    debug_assert_eq!(out.len(), rows * row_bytes);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(rows)
        .max(1);
    let per = rows.div_ceil(threads).max(1);
    let size = dtype.size();
    std::thread::scope(|scope| {
        for (c, chunk) in out.chunks_mut(per * row_bytes).enumerate() {
            scope.spawn(move || {
                for (j, row) in chunk.chunks_mut(row_bytes).enumerate() {
                    let i = c * per + j;
                    let mut rng = Rng::new(mix(&[seed, dtype as u64, cols as u64, i as u64]));
                    for pair in row.chunks_mut(2 * size) {
                        let (z1, z2) = rng.normal_pair();
                        let (a, b) = pair.split_at_mut(size);
                        store(dtype, sigma * z1, a);
                        if !b.is_empty() {
                            store(dtype, sigma * z2, b);
                        }
                    }
                }
            });
        }
    });
}

/// Distinct rows to check against the reference (sorted): all when `n ≤ k`, else the first, the
/// last and `k − 2` drawn at random.
pub fn sample_rows(n: usize, k: usize, seed: u64) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let mut rows = if k >= 2 { vec![0, n - 1] } else { vec![0] };
    let mut rng = Rng::new(mix(&[seed, 0xC4EC]));
    while rows.len() < k {
        let r = rng.below(n);
        if !rows.contains(&r) {
            rows.push(r);
        }
    }
    rows.sort_unstable();
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_do_not_depend_on_chunking() {
        let (v, dtype) = (37, DType::BF16);
        let rb = v * dtype.size();
        let mut s_all = vec![0u8; 5 * rb];
        let mut t_all = vec![0u8; 5 * rb];
        fill_rows(7, dtype, v, 0, &mut s_all, &mut t_all);
        let mut s3 = vec![0u8; 2 * rb];
        let mut t3 = vec![0u8; 2 * rb];
        fill_rows(7, dtype, v, 3, &mut s3, &mut t3);
        assert_eq!(&s_all[3 * rb..], &s3[..]);
        assert_eq!(&t_all[3 * rb..], &t3[..]);
        let w = widen(dtype, &s_all);
        let mean = w.iter().sum::<f64>() / w.len() as f64;
        let sd = (w.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!(sd > 2.0 && sd < 4.0, "sd {sd}");
    }

    #[test]
    fn samples_are_distinct_and_in_range() {
        let s = sample_rows(4096, 8, 1);
        assert_eq!(s.len(), 8);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((s[0], s[7]), (0, 4095));
        assert_eq!(sample_rows(3, 8, 1), vec![0, 1, 2]);
        assert_eq!(sample_rows(10, 1, 1), vec![0]);
    }
}
