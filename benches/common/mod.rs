//! Helpers shared by the criterion benches: reproducible inputs and the CUDA set-up (context,
//! one stream, device pointers, stream-synchronised timing). Each bench uses a subset.
#![allow(dead_code)]

use half::bf16;

/// SplitMix64 mapped to uniform values in [-2, 2).
pub fn uniform(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

/// [`uniform`] rounded to bf16.
pub fn bf16s(count: usize, seed: u64) -> Vec<bf16> {
    uniform(count, seed)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

pub mod cuda {
    use std::sync::Arc;

    use criterion::Bencher;
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
    use distill_kernels::Context;

    /// Why CUDA benches cannot run here, or the context to run them on.
    fn open() -> Result<Context, String> {
        if !distill_kernels::device::cuda_driver_present() {
            return Err("no CUDA driver".into());
        }
        if distill_kernels::device::cuda_device_count() == 0 {
            return Err("no CUDA device".into());
        }
        Context::cuda(0).map_err(|e| e.to_string())
    }

    /// The library's context on CUDA device 0 and one stream of the device's primary context;
    /// `None`, after printing `<group>: skipped (<why>)`, when there is no usable device.
    pub fn setup(group: &str) -> Option<(Context, Arc<CudaStream>)> {
        let ctx = match open() {
            Ok(ctx) => ctx,
            Err(why) => {
                println!("{group}: skipped ({why})");
                return None;
            }
        };
        let cu = CudaContext::new(0).expect("primary context");
        // SAFETY: one stream only, so cudarc's cross-stream event tracking is not needed.
        unsafe { cu.disable_event_tracking() };
        let stream = cu.new_stream().expect("stream");
        Some((ctx, stream))
    }

    /// The device address of `s`.
    pub fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
        s.device_ptr(stream).0
    }

    /// Times `f` with the stream synchronised inside the timed closure.
    pub fn iter_synced(b: &mut Bencher<'_>, stream: &CudaStream, f: &dyn Fn()) {
        b.iter(|| {
            f();
            stream.synchronize().unwrap();
        })
    }
}
