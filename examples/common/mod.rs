//! Helpers shared by the examples: a tiny deterministic generator (so they need no `rand`) and
//! f32 rows that start on the 16-byte boundary the MoE and attention kernels require.
#![allow(dead_code)] // each example uses part of it

use std::ops::{Deref, DerefMut};

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

/// The row alignment both row-based operations ask for.
pub const ROW_ALIGN: usize = {
    let (m, a) = (
        distill_kernels::moe::ROW_ALIGN,
        distill_kernels::attention::ROW_ALIGN,
    );
    if m > a {
        m
    } else {
        a
    }
};

/// f32 rows starting on a `ROW_ALIGN` boundary (a `Vec<f32>` only promises 4 bytes).
pub struct Rows(Vec<f32>, usize, usize); // buffer, start, len

impl Rows {
    pub fn zeros(len: usize) -> Self {
        let buf = vec![0f32; len + ROW_ALIGN / 4];
        let start = buf.as_ptr().align_offset(ROW_ALIGN);
        Rows(buf, start, len)
    }

    /// `len` values uniform in [-1, 1).
    pub fn random(len: usize, rng: &mut Rng) -> Self {
        let mut r = Rows::zeros(len);
        r.copy_from_slice(&rng.uniform(len, -1.0, 1.0));
        r
    }
}

impl Deref for Rows {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0[self.1..self.1 + self.2]
    }
}

impl DerefMut for Rows {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0[self.1..self.1 + self.2]
    }
}
