//! CUDA backend of the row scaling: one launch of `dk_scale_rows_<dtype>` (cuda/scale_rows.cu)
//! on the caller's stream. Work items are (row, chunk of [`CHUNK`] elements); the grid is a few
//! waves of blocks that loop over the items, and a block reads the factors of its next 256 items
//! before it touches any row, so rows with factor 1 cost a 4-byte read.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::RawScaleRows;
use crate::device::{CudaDevice, Launch};
use crate::error::{bail, Result};

/// Every kernel of `cuda/scale_rows.cu`, loaded when a CUDA context opens.
pub(crate) const KERNEL_NAMES: &[&str] = &[
    "dk_scale_rows_f32",
    "dk_scale_rows_bf16",
    "dk_scale_rows_f16",
];

/// Threads per block (`kThreads` in scale_rows.cu).
const THREADS: u32 = 256;
/// Elements of a row per work item (`kChunk` in scale_rows.cu: 256 threads × 8 × 4).
pub(crate) const CHUNK: usize = 8192;
/// Blocks launched per SM: at least the resident blocks (2048 threads per SM at most), so the
/// card is full whatever the kernel's register count; blocks loop over the items beyond that.
const BLOCKS_PER_SM: usize = 8;

/// Queues the row scaling on the caller's stream.
pub(crate) fn scale_rows(dev: &CudaDevice, raw: &RawScaleRows, launch: &Launch<'_>) -> Result<()> {
    dev.check_pointer("x", raw.x as *const _)?;
    dev.check_pointer("factors", raw.factors as *const _)?;
    let f = dev.function(&format!("dk_scale_rows_{}", raw.dtype.name()))?;
    let chunks = raw.v.div_ceil(CHUNK);
    let items = raw.n.saturating_mul(chunks);
    let grid = items.min(dev.sm_count() * BLOCKS_PER_SM);
    // The kernel counts items in 32 bits: items + 256 · grid must stay below 2^31.
    if items.saturating_add(THREADS as usize * grid) > i32::MAX as usize {
        bail!(
            Shape,
            "N = {} rows of V = {} elements are {items} work items of {CHUNK} elements, more than \
             one call handles (2^31 - {}); split the rows over several calls",
            raw.n,
            raw.v,
            THREADS as usize * grid
        );
    }
    let cfg = LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (x, factors) = (raw.x as u64, raw.factors as u64);
    let (v, stride, factor_stride) = (raw.v as i64, raw.stride as i64, raw.factor_stride as i64);
    let (chunks, items) = (chunks as i32, items as i32);
    // SAFETY: the caller of the safe API handed a live stream of this device (Launch::on_stream
    // is unsafe for that reason), or null for the legacy default stream.
    let stream = unsafe { dev.borrow_stream(launch.stream) };
    // SAFETY: the arguments match dk_scale_rows_<dtype>(T*, const float*, int64_t v, int64_t
    // stride, int64_t factor_stride, int32_t chunks, int32_t items); x and the factors are device
    // memory of this device covering the validated shapes (checked above), disjoint, and aligned
    // to their element sizes.
    unsafe {
        stream
            .launch_builder(f)
            .arg(&x)
            .arg(&factors)
            .arg(&v)
            .arg(&stride)
            .arg(&factor_stride)
            .arg(&chunks)
            .arg(&items)
            .launch(cfg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The host's item size is the kernel's (a mismatch would leave parts of rows unscaled).
    #[test]
    fn chunk_matches_the_kernel() {
        let src = include_str!("../../cuda/scale_rows.cu");
        let constant = |name: &str| -> usize {
            let line = src
                .lines()
                .find(|l| l.starts_with(&format!("constexpr int {name} = ")))
                .unwrap_or_else(|| panic!("{name} not found in cuda/scale_rows.cu"));
            line.trim_end_matches(';')
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        // kChunk = kThreads * kVec * kUnroll, kVec = 8 (dk_vec.cuh).
        assert_eq!(constant("kThreads"), super::THREADS as usize);
        assert_eq!(
            constant("kThreads") * 8 * constant("kUnroll"),
            super::CHUNK,
            "CHUNK vs kChunk"
        );
        assert!(include_str!("../../cuda/include/dk_vec.cuh").contains("constexpr int kVec = 8;"));
    }
}
