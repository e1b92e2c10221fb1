//! Hardware check of the wgmma layouts behind the Hopper attention kernels
//! (`cuda/attention_wgmma_selftest.cu`): one shared-memory product (the `S = Q·Kᵀ` form) and one
//! register-operand product (the `P·V` form) against f64 products, on a compute capability 9.0
//! device. It separates a misreading of the PTX ISA's descriptor layouts from attention logic:
//! if the attention reference tests fail under `DK_ATTENTION_FWD=wgmma` and this passes, the
//! fault is in the kernels.

/// The self-test kernels, loaded with the others when a device opens.
pub(crate) const KERNEL_NAMES: &[&str] =
    &["dk_wgmma_selftest_ss_bf16", "dk_wgmma_selftest_rs_bf16"];

/// The self-test's inputs and their f64 products, shared by the device unit test below and the
/// emulator test of the same kernels (`tests/attention_kernel_sim.rs`), so both check one case.
/// Inputs are deterministic, of both signs, never zero and exactly representable in bf16.
#[doc(hidden)]
pub struct WgmmaSelftestCase {
    /// 64 × 128, row-major: ss computes C = A·Bᵀ (64 × 64).
    pub a: Vec<f32>,
    /// 64 × 128, row-major.
    pub b: Vec<f32>,
    /// 64 × 64, row-major: rs computes C = P·V (64 × 128).
    pub p: Vec<f32>,
    /// 64 × 128, row-major.
    pub v: Vec<f32>,
    /// A·Bᵀ in f64.
    pub want_ss: Vec<f64>,
    /// P·V in f64.
    pub want_rs: Vec<f64>,
}

/// The one case of [`WgmmaSelftestCase`].
#[doc(hidden)]
pub fn wgmma_selftest_case() -> WgmmaSelftestCase {
    let values = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24;
                half::bf16::from_f32((h as f32 - 127.5) / 64.0).to_f32()
            })
            .collect()
    };
    let (a, b) = (values(64 * 128, 1), values(64 * 128, 2));
    let (p, v) = (values(64 * 64, 3), values(64 * 128, 4));
    let want_ss = (0..64 * 64)
        .map(|ij| {
            let (i, j) = (ij / 64, ij % 64);
            (0..128)
                .map(|k| a[i * 128 + k] as f64 * b[j * 128 + k] as f64)
                .sum()
        })
        .collect();
    let want_rs = (0..64 * 128)
        .map(|ij| {
            let (i, j) = (ij / 128, ij % 128);
            (0..64)
                .map(|k| p[i * 64 + k] as f64 * v[k * 128 + j] as f64)
                .sum()
        })
        .collect();
    WgmmaSelftestCase {
        a,
        b,
        p,
        v,
        want_ss,
        want_rs,
    }
}

#[cfg(test)]
mod tests {
    use crate::device::Context;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    use half::bf16;
    use std::io::Write;

    /// A line straight to the terminal (not captured by the test harness): a skipped hardware
    /// check must say so.
    fn visible(line: &str) {
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    /// Dynamic shared memory of both kernels: 1 KiB of alignment slack, two 64 × 128 bf16 tiles.
    const SMEM_BYTES: u32 = 1024 + 2 * 64 * 128 * 2;

    fn bits(x: &[f32]) -> Vec<u16> {
        x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
    }

    /// Largest |got − want| over the largest |want|: the products of bf16 inputs are exact and
    /// the f32 sums of at most 128 terms leave ~1e-7 relative; a wrong layout leaves O(1). A
    /// non-finite element is an infinite error (`f64::max` would skip a NaN).
    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        if got.iter().any(|g| !g.is_finite()) {
            return f64::INFINITY;
        }
        let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
        err / scale
    }

    #[test]
    fn wgmma_layouts_on_the_device() {
        let Ok(ctx) = Context::cuda(0) else {
            visible("SKIPPED wgmma_layouts_on_the_device: no CUDA device");
            return;
        };
        let dev = ctx.cuda_device().expect("a CUDA context");
        if dev.compute_capability() != (9, 0) {
            visible(&format!(
                "SKIPPED wgmma_layouts_on_the_device: compute capability {:?}, not 9.0",
                dev.compute_capability()
            ));
            return;
        }
        let stream = dev.ctx.default_stream();
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: SMEM_BYTES,
        };

        let case = super::wgmma_selftest_case();

        // ss: C[64][64] = A[64][128] · B[64][128]ᵀ.
        let da = stream.clone_htod(&bits(&case.a)).unwrap();
        let db = stream.clone_htod(&bits(&case.b)).unwrap();
        let mut dc = stream.alloc_zeros::<f32>(64 * 64).unwrap();
        let f = dev.function("dk_wgmma_selftest_ss_bf16").unwrap();
        // SAFETY: the kernel takes (const bf16* a, const bf16* b, float* c) of 64 × 128, 64 × 128
        // and 64 × 64 elements, which these buffers hold; 33 KiB of shared memory needs no opt-in.
        unsafe {
            stream
                .launch_builder(f)
                .arg(&da)
                .arg(&db)
                .arg(&mut dc)
                .launch(cfg)
                .unwrap()
        };
        let c = stream.clone_dtoh(&dc).unwrap();
        let e = rel_err(&c, &case.want_ss);
        assert!(e < 1e-5, "ss product (the S = Q·Kᵀ form): error {e:.3e}");

        // rs: C[64][128] = P[64][64] · V[64][128].
        let dp = stream.clone_htod(&case.p).unwrap();
        let dv = stream.clone_htod(&bits(&case.v)).unwrap();
        let mut dc = stream.alloc_zeros::<f32>(64 * 128).unwrap();
        let f = dev.function("dk_wgmma_selftest_rs_bf16").unwrap();
        // SAFETY: the kernel takes (const float* p, const bf16* v, float* c) of 64 × 64, 64 × 128
        // and 64 × 128 elements, which these buffers hold; 33 KiB of shared memory needs no opt-in.
        unsafe {
            stream
                .launch_builder(f)
                .arg(&dp)
                .arg(&dv)
                .arg(&mut dc)
                .launch(cfg)
                .unwrap()
        };
        let c = stream.clone_dtoh(&dc).unwrap();
        let e = rel_err(&c, &case.want_rs);
        assert!(e < 1e-5, "rs product (the P·V form): error {e:.3e}");
        visible("wgmma_layouts_on_the_device: ss and rs products match on the device");
    }
}
