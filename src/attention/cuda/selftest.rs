//! Hardware check of the wgmma layouts behind the Hopper attention kernels
//! (`cuda/attention_wgmma_selftest.cu`): one shared-memory product (the `S = Q·Kᵀ` form) and one
//! register-operand product (the `P·V` form) against f64 products, on a compute capability 9.0
//! device. It separates a misreading of the PTX ISA's descriptor layouts from attention logic:
//! if the attention reference tests fail on a Hopper device (whose default is the wgmma kernels)
//! and this passes, the fault is in the kernels.

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
    use crate::attention::cuda::selftest_probe::{
        wgmma_map_report, wgmma_probes, WGMMA_SWEEP_OFFSETS, WGMMA_SWEEP_SMEM_BYTES,
    };
    use crate::device::{Context, CudaDevice};
    use cudarc::driver::sys::CUfunction_attribute_enum;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    use half::bf16;
    use std::io::Write;

    /// A line straight to the terminal (not captured by the test harness): a skipped hardware
    /// check must say so, and a diagnosis must survive a later fault.
    fn visible(line: &str) {
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    /// Dynamic shared memory of both kernels: 1 KiB of alignment slack, two 64 × 128 bf16 tiles.
    const SMEM_BYTES: u32 = 1024 + 2 * 64 * 128 * 2;

    /// The unit test's tolerance (see [`rel_err`]).
    const TOL: f64 = 1e-5;

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

    fn kernel_name(rs: bool) -> &'static str {
        if rs {
            "dk_wgmma_selftest_rs_bf16"
        } else {
            "dk_wgmma_selftest_ss_bf16"
        }
    }

    /// One launch of a self-test kernel: `rs` picks `dk_wgmma_selftest_rs_bf16(p, v, c, lbo,
    /// sbo)` (`left` = p as f32, 64 × 64; `right` = v, 64 × 128) over
    /// `dk_wgmma_selftest_ss_bf16(a, b, c, lbo, sbo)` (both 64 × 128); `sbo` = 0 takes the
    /// attention kernels' own descriptors. Returns C (64 × 128 or 64 × 64).
    fn launch(
        dev: &CudaDevice,
        rs: bool,
        left: &[f32],
        right: &[f32],
        (lbo, sbo): (u32, u32),
        smem: u32,
    ) -> Vec<f32> {
        let stream = dev.ctx.default_stream();
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
        };
        let f = dev.function(kernel_name(rs)).unwrap();
        let dl_bits;
        let dl_f32;
        let dr = stream.clone_htod(&bits(right)).unwrap();
        // Poisoned: an element the kernel does not write stays NaN, an infinite error.
        let mut dc = stream
            .clone_htod(&vec![f32::NAN; if rs { 64 * 128 } else { 64 * 64 }])
            .unwrap();
        let mut b = stream.launch_builder(f);
        if rs {
            dl_f32 = stream.clone_htod(left).unwrap();
            b.arg(&dl_f32);
        } else {
            dl_bits = stream.clone_htod(&bits(left)).unwrap();
            b.arg(&dl_bits);
        }
        b.arg(&dr).arg(&mut dc).arg(&lbo).arg(&sbo);
        // SAFETY: the kernel takes (a: 64 × 128 bf16, b: 64 × 128 bf16, c: 64 × 64 f32) or (p:
        // 64 × 64 f32, v: 64 × 128 bf16, c: 64 × 128 f32) and two u32 offsets, which these
        // buffers and values are; `smem` is at most the limit the caller opted the kernel into
        // (33 KiB needs none). A wrong offset pair makes the product read other shared memory of
        // the block, never outside it (WGMMA_SWEEP_SMEM_BYTES).
        unsafe { b.launch(cfg).unwrap() };
        stream.clone_dtoh(&dc).unwrap()
    }

    /// After a failed product: what the card read for each element of the operands (probes with
    /// the kernels' own descriptors), then which (LBO, SBO) pairs would have made the product
    /// right (the sweep, in the larger shared memory). Each part is printed as soon as it is
    /// known, so that it survives a fault of a later launch.
    fn diagnose(dev: &CudaDevice, rs: bool, left: &[f32], right: &[f32], want: &[f64]) -> String {
        let kind = if rs { "rs" } else { "ss" };
        let probes = wgmma_probes(rs);
        let outputs: Vec<Vec<f32>> = probes
            .iter()
            .map(|p| launch(dev, rs, &p.left, &p.right, (0, 0), SMEM_BYTES))
            .collect();
        let map = wgmma_map_report(&probes, &outputs);
        visible(&format!("wgmma self-test, {kind} layout map:\n{map}"));
        let opted = dev
            .function(kernel_name(rs))
            .unwrap()
            .set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                WGMMA_SWEEP_SMEM_BYTES as i32,
            )
            .is_ok();
        let sweep = if opted {
            let mut matching = Vec::new();
            for lbo in WGMMA_SWEEP_OFFSETS {
                for sbo in WGMMA_SWEEP_OFFSETS {
                    let c = launch(dev, rs, left, right, (lbo, sbo), WGMMA_SWEEP_SMEM_BYTES);
                    if rel_err(&c, want) < TOL {
                        matching.push(format!("(LBO {lbo}, SBO {sbo})"));
                    }
                }
            }
            if matching.is_empty() {
                format!("no (LBO, SBO) pair of {WGMMA_SWEEP_OFFSETS:?} gives the right product")
            } else {
                format!(
                    "pairs giving the right product: {} — the kernels' descriptors are \
                     cuda/include/dk_wgmma_desc.cuh",
                    matching.join(", ")
                )
            }
        } else {
            "sweep not run: the device refused the larger shared memory".to_string()
        };
        visible(&format!("wgmma self-test, {kind} offset sweep: {sweep}"));
        format!("{map}\n{sweep}")
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
        let case = super::wgmma_selftest_case();
        let mut failures = Vec::new();
        let cases = [
            (
                false,
                &case.a,
                &case.b,
                &case.want_ss,
                "ss product (the S = Q·Kᵀ form)",
            ),
            (
                true,
                &case.p,
                &case.v,
                &case.want_rs,
                "rs product (the P·V form)",
            ),
        ];
        // Both products first, then the diagnosis of each that failed: a sweep launch that
        // faulted the context could not then hide the other product's result.
        let errors: Vec<f64> = cases
            .iter()
            .map(|&(rs, left, right, want, form)| {
                let e = rel_err(&launch(dev, rs, left, right, (0, 0), SMEM_BYTES), want);
                visible(&format!("wgmma self-test: {form}: error {e:.3e}"));
                e
            })
            .collect();
        for (&(rs, left, right, want, form), &e) in cases.iter().zip(&errors) {
            if e >= TOL {
                visible(&format!("wgmma self-test: diagnosing the {form}"));
                let why = diagnose(dev, rs, left, right, want);
                failures.push(format!("{form}: error {e:.3e}\n{why}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        visible("wgmma_layouts_on_the_device: ss and rs products match on the device");
    }
}
