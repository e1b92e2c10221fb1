//! Helpers shared by the examples: a tiny deterministic generator (so they need no `rand`) and
//! random f32 rows in an [`AlignedBuf`].
#![allow(dead_code)] // each example uses part of it

use distill_kernels::AlignedBuf;

/// SplitMix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `len` values uniform in [lo, hi).
    pub fn uniform(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len)
            .map(|_| lo + (hi - lo) * (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .collect()
    }
}

/// `len` f32 values uniform in [-1, 1), in a buffer whose rows start on the 16-byte boundary the
/// MoE and attention operations require (a `Vec<f32>` only promises 4 bytes).
pub fn random_rows(len: usize, rng: &mut Rng) -> AlignedBuf<f32> {
    AlignedBuf::from_slice(&rng.uniform(len, -1.0, 1.0))
}
