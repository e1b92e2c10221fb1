//! Launcher of the attention forward kernels (`cuda/attention_forward.cu`,
//! `cuda/attention_forward_wgmma.cu`): the argument structs shared with them
//! (`cuda/include/dk_attention_shape.h`, `cuda/include/dk_attention_fwd_args.h`), the choice of
//! instantiation (dtype × head dimension × kernel family) and the grid. Design notes and
//! measurements: `cuda/ATTENTION.md`.
//!
//! Kernel families: on a compute capability 9.0 device that accepted their shared memory, the
//! Hopper wgmma kernels (`dk_attn_fwd_*_d{64,128}g`) by default (measured on an H200 at 1.5–1.6×
//! the mma.sync kernels, cuda/ATTENTION.md "Forward on wgmma"); elsewhere the mma.sync kernels of
//! 4 warps (`dk_attn_fwd_*_d{64,128}`). `DK_ATTENTION_FWD=mma` asks for those everywhere (the
//! A/B baseline on Hopper), `DK_ATTENTION_FWD=wide` for the mma.sync D = 128 kernel of 8 warps
//! whose pairs split each key tile (`dk_attn_fwd_*_d128w`, where the device accepted its shared
//! memory; it takes precedence over wgmma), `DK_ATTENTION_FWD=wgmma` is the default's policy.
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;

use super::shape::AttentionShape;
use super::{requested, Requested};
use crate::attention::RawAttention;
use crate::device::{CudaDevice, Launch};
use crate::error::{bail, Result};
use crate::tensor::DType;

/// Every kernel of `cuda/attention_forward.cu`, loaded when a CUDA context opens.
pub(crate) const KERNEL_NAMES: &[&str] = &[
    "dk_attn_fwd_bf16_d64",
    "dk_attn_fwd_bf16_d128",
    "dk_attn_fwd_f16_d64",
    "dk_attn_fwd_f16_d128",
    "dk_attn_fwd_bf16_d128w",
    "dk_attn_fwd_f16_d128w",
    "dk_attn_fwd_bf16_d64g",
    "dk_attn_fwd_bf16_d128g",
    "dk_attn_fwd_f16_d64g",
    "dk_attn_fwd_f16_d128g",
];

/// The wgmma kernels (sm_90a), opted into their shared memory on Hopper devices only.
const WGMMA_KERNELS: [&str; 4] = [
    "dk_attn_fwd_bf16_d64g",
    "dk_attn_fwd_bf16_d128g",
    "dk_attn_fwd_f16_d64g",
    "dk_attn_fwd_f16_d128g",
];

/// Threads per block (`kThreads` in attention_forward.cu: 4 warps).
const THREADS: u32 = 128;
/// Threads per block of the D = 128 split kernel (`SplitTiling::kThreads`: 8 warps) and of the
/// wgmma kernels (`WgTiling::kThreads`: 2 warpgroups).
const SPLIT_THREADS: u32 = 256;
/// Query rows per block of the split kernel (`SplitTiling::kBlockM`: 4 warp pairs of 32) and of
/// the wgmma kernels (`WgTiling::kBlockM`: 2 warpgroups of 64).
const SPLIT_ROWS: usize = 128;
/// Largest `gridDim.y` and `gridDim.z`: more heads or sequences take several launches.
const MAX_GRID_YZ: usize = 65535;
/// Largest static-or-default dynamic shared memory per block without an opt-in.
const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// Tiling of the instantiation for head dimension `d`, mirroring the `DK_ATTN_FWD_KERNEL` lines
/// of attention_forward.cu: (query rows per block = 64 · MT, dynamic shared memory = Q tile of
/// those rows + one K and one V tile of 64 keys, D · 2 bytes a row).
fn tiling(head_dim: usize) -> (usize, usize) {
    let (block_m, keys) = if head_dim == 64 { (128, 64) } else { (64, 64) };
    (block_m, (block_m + 2 * keys) * head_dim * 2)
}

/// Dynamic shared memory of the D = 128 split kernel (`SplitTiling::kSmemBytes`): the Q tile of
/// its 128 rows (later the output staging), one K and one V tile of 64 keys, the P tile
/// (128 rows × 64 keys of 16 bits) and the two halves' row maxima / sums (2 × 128 f32).
fn split_smem_bytes() -> usize {
    let (rows, keys, d) = (SPLIT_ROWS, 64, 128);
    (rows + 2 * keys) * d * 2 + rows * keys * 2 + 2 * rows * 4
}

/// Dynamic shared memory of the wgmma kernels (`WgTiling::kSmemBytes`): 1 KiB of slack to
/// align the tiles to 1024 bytes, the Q tile of 128 rows and two stages of one K and one V tile
/// of 128 keys.
fn wgmma_smem_bytes(head_dim: usize) -> usize {
    1024 + (SPLIT_ROWS + 4 * 128) * head_dim * 2
}

/// Which forward kernels serve a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// `dk_attn_fwd_*_d{64,128}`: mma.sync, 4 warps (the default off Hopper).
    Mma,
    /// `DK_ATTENTION_FWD=wide`: the D = 128 split kernel (`dk_attn_fwd_*_d128w`).
    Wide,
    /// The Hopper kernels (`dk_attn_fwd_*_d{64,128}g`): the default where the device has them.
    Wgmma,
}

/// The variant a call runs, given what was requested and what the device accepted when it
/// opened: `wide` (D = 128) and `mma` take precedence over wgmma; the default and `wgmma` run
/// wgmma where the device has it; everything else the mma.sync kernels.
fn choose(req: Requested, head_dim: usize, wide_ok: bool, wgmma_ok: bool) -> Variant {
    match req {
        Requested::Wide if head_dim == 128 && wide_ok => Variant::Wide,
        Requested::Wide | Requested::Mma => Variant::Mma,
        Requested::Default | Requested::Wgmma if wgmma_ok => Variant::Wgmma,
        Requested::Default | Requested::Wgmma => Variant::Mma,
    }
}

/// The variant a call runs on `dev` (see [`choose`]).
fn variant(dev: &CudaDevice, head_dim: usize) -> Variant {
    choose(
        requested("DK_ATTENTION_FWD"),
        head_dim,
        dev.attention_wide_fwd(),
        dev.attention_wgmma_fwd(),
    )
}

/// Sets a kernel's dynamic shared memory limit; false where the device refuses.
fn opt_in(functions: &HashMap<&'static str, CudaFunction>, name: &str, bytes: usize) -> bool {
    functions.get(name).is_some_and(|f| {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .is_ok()
    })
}

/// Opts the split kernels into their dynamic shared memory (81 KiB, above the 48 KB default),
/// once when a device opens; false where the device refuses (the 16-row kernel then serves every
/// D = 128 call).
pub(crate) fn configure(functions: &HashMap<&'static str, CudaFunction>) -> bool {
    ["dk_attn_fwd_bf16_d128w", "dk_attn_fwd_f16_d128w"]
        .iter()
        .all(|name| opt_in(functions, name, split_smem_bytes()))
}

/// Opts the wgmma kernels into their dynamic shared memory (81 and 161 KiB) on a Hopper device:
/// compute capability 9.0 exactly, the one the sm_90a cubin runs on (elsewhere the sm_80 code,
/// whose wgmma kernels are empty bodies). False elsewhere or where the device refuses (the
/// mma.sync kernels then serve every call).
pub(crate) fn configure_wgmma(
    functions: &HashMap<&'static str, CudaFunction>,
    compute_capability: (i32, i32),
) -> bool {
    compute_capability == (9, 0)
        && WGMMA_KERNELS.iter().all(|name| {
            let d = if name.ends_with("d64g") { 64 } else { 128 };
            opt_in(functions, name, wgmma_smem_bytes(d))
        })
}

/// Rust mirror of `DkAttentionFwdArgs` (cuda/include/dk_attention_fwd_args.h), passed by value.
/// Pointers are device addresses (0 = null); strides are elements between token rows.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AttentionFwdArgs {
    /// Sequence structure, heads, mask and scale.
    pub shape: AttentionShape,
    /// `const T*` queries `[total_q, heads_q · D]`.
    pub q: u64,
    /// `const T*` keys `[total_k, heads_kv · D]`.
    pub k: u64,
    /// `const T*` values `[total_k, heads_kv · D]`.
    pub v: u64,
    /// `T*` out `[total_q, heads_q · D]`.
    pub out: u64,
    /// `float*` LSE: `[batch, heads_q, seqlen_q]` (padded) or `[heads_q, total_q]` (varlen).
    pub lse: u64,
    /// Token stride of q.
    pub q_stride: i64,
    /// Token stride of k.
    pub k_stride: i64,
    /// Token stride of v.
    pub v_stride: i64,
    /// Token stride of out.
    pub out_stride: i64,
    /// Query head of `blockIdx.y = 0` (launches cover at most 65535 heads).
    pub head_offset: i32,
    /// Sequence of `blockIdx.z = 0` (launches cover at most 65535 sequences).
    pub batch_offset: i32,
}

// SAFETY: plain-old-data with the C layout of DkAttentionFwdArgs (see attention_fwd_args_layout).
unsafe impl DeviceRepr for AttentionFwdArgs {}

/// Size and field offsets of [`AttentionFwdArgs`] (the fields of the embedded shape as
/// `shape.<field>`), for the layout test against the C headers. Used by this file's tests until
/// src/lib.rs re-exports it (through `pub use` in attention/cuda/mod.rs) for
/// capi/src/tests/abi_layout.rs.
#[doc(hidden)]
pub fn attention_fwd_args_layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    let shape = offset_of!(AttentionFwdArgs, shape);
    vec![
        ("sizeof", size_of::<AttentionFwdArgs>()),
        ("shape", shape),
        (
            "shape.cu_seqlens_q",
            shape + offset_of!(AttentionShape, cu_seqlens_q),
        ),
        (
            "shape.cu_seqlens_k",
            shape + offset_of!(AttentionShape, cu_seqlens_k),
        ),
        ("shape.batch", shape + offset_of!(AttentionShape, batch)),
        (
            "shape.seqlen_q",
            shape + offset_of!(AttentionShape, seqlen_q),
        ),
        (
            "shape.seqlen_k",
            shape + offset_of!(AttentionShape, seqlen_k),
        ),
        ("shape.total_q", shape + offset_of!(AttentionShape, total_q)),
        ("shape.total_k", shape + offset_of!(AttentionShape, total_k)),
        ("shape.heads_q", shape + offset_of!(AttentionShape, heads_q)),
        (
            "shape.heads_kv",
            shape + offset_of!(AttentionShape, heads_kv),
        ),
        ("shape.causal", shape + offset_of!(AttentionShape, causal)),
        ("shape.scale", shape + offset_of!(AttentionShape, scale)),
        (
            "shape.scale_log2",
            shape + offset_of!(AttentionShape, scale_log2),
        ),
        ("q", offset_of!(AttentionFwdArgs, q)),
        ("k", offset_of!(AttentionFwdArgs, k)),
        ("v", offset_of!(AttentionFwdArgs, v)),
        ("out", offset_of!(AttentionFwdArgs, out)),
        ("lse", offset_of!(AttentionFwdArgs, lse)),
        ("q_stride", offset_of!(AttentionFwdArgs, q_stride)),
        ("k_stride", offset_of!(AttentionFwdArgs, k_stride)),
        ("v_stride", offset_of!(AttentionFwdArgs, v_stride)),
        ("out_stride", offset_of!(AttentionFwdArgs, out_stride)),
        ("head_offset", offset_of!(AttentionFwdArgs, head_offset)),
        ("batch_offset", offset_of!(AttentionFwdArgs, batch_offset)),
    ]
}

/// The forward kernel for a dtype, head dimension and variant (one of [`KERNEL_NAMES`]; the
/// split kernel exists at D = 128 only).
fn kernel_name(dtype: DType, head_dim: usize, variant: Variant) -> Result<&'static str> {
    let wide = variant == Variant::Wide;
    let wg = variant == Variant::Wgmma;
    Ok(match (dtype, head_dim) {
        (DType::BF16, 64) if wg => "dk_attn_fwd_bf16_d64g",
        (DType::BF16, 64) => "dk_attn_fwd_bf16_d64",
        (DType::BF16, 128) if wg => "dk_attn_fwd_bf16_d128g",
        (DType::BF16, 128) if wide => "dk_attn_fwd_bf16_d128w",
        (DType::BF16, 128) => "dk_attn_fwd_bf16_d128",
        (DType::F16, 64) if wg => "dk_attn_fwd_f16_d64g",
        (DType::F16, 64) => "dk_attn_fwd_f16_d64",
        (DType::F16, 128) if wg => "dk_attn_fwd_f16_d128g",
        (DType::F16, 128) if wide => "dk_attn_fwd_f16_d128w",
        (DType::F16, 128) => "dk_attn_fwd_f16_d128",
        (DType::F32, _) => bail!(
            UnsupportedDtype,
            "attention on CUDA takes bf16 or f16 (f32 runs on the CPU backend only)"
        ),
        (_, d) => bail!(Shape, "head_dim = {d} has no CUDA kernel (64 or 128)"),
    })
}

/// The launches of a call: `(head_offset, batch_offset, config)` with grid
/// `(⌈seqlen_q / rows per block⌉, heads, sequences)` over chunks of at most 65535 heads and
/// 65535 sequences (one launch unless Hq or B exceeds that); none when no query row exists.
fn launches(raw: &RawAttention, variant: Variant) -> Vec<(usize, usize, LaunchConfig)> {
    let s = &raw.shape;
    if s.batch == 0 || s.seqlen_q == 0 || s.total_q == 0 || raw.heads_q == 0 {
        return Vec::new();
    }
    let (block_m, smem, threads) = match variant {
        Variant::Wide => (SPLIT_ROWS, split_smem_bytes(), SPLIT_THREADS),
        Variant::Wgmma => (SPLIT_ROWS, wgmma_smem_bytes(raw.head_dim), SPLIT_THREADS),
        Variant::Mma => {
            let (block_m, smem) = tiling(raw.head_dim);
            (block_m, smem, THREADS)
        }
    };
    // seqlen_q ≤ MAX_ROWS = i32::MAX, so the tile count fits u32.
    let tiles = s.seqlen_q.div_ceil(block_m) as u32;
    let mut out = Vec::new();
    for h0 in (0..raw.heads_q).step_by(MAX_GRID_YZ) {
        for b0 in (0..s.batch).step_by(MAX_GRID_YZ) {
            let heads = (raw.heads_q - h0).min(MAX_GRID_YZ) as u32;
            let seqs = (s.batch - b0).min(MAX_GRID_YZ) as u32;
            let cfg = LaunchConfig {
                grid_dim: (tiles, heads, seqs),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            out.push((h0, b0, cfg));
        }
    }
    out
}

/// Forward pass on the caller's stream: out and LSE.
pub(crate) fn forward(dev: &CudaDevice, raw: &RawAttention, launch: &Launch<'_>) -> Result<()> {
    let variant = variant(dev, raw.head_dim);
    let name = kernel_name(raw.dtype, raw.head_dim, variant)?;
    let launches = launches(raw, variant);
    if launches.is_empty() {
        return Ok(()); // no query row: nothing to write
    }
    for (what, p) in [
        ("q", raw.q as *const _),
        ("k", raw.k as *const _),
        ("v", raw.v as *const _),
        ("out", raw.out as *const _),
        ("lse", raw.lse as *const _),
        ("cu_seqlens_q", raw.shape.cu_seqlens_q as *const _),
        ("cu_seqlens_k", raw.shape.cu_seqlens_k as *const _),
    ] {
        dev.check_pointer(what, p)?;
    }
    let function = dev.function(name)?;
    super::note_kernel(name);
    let mut args = AttentionFwdArgs {
        shape: AttentionShape::new(&raw.shape, raw.heads_q, raw.heads_kv, raw.causal, raw.scale)?,
        q: raw.q as u64,
        k: raw.k as u64,
        v: raw.v as u64,
        out: raw.out as u64,
        lse: raw.lse as u64,
        q_stride: raw.q_stride as i64,
        k_stride: raw.k_stride as i64,
        v_stride: raw.v_stride as i64,
        out_stride: raw.out_stride as i64,
        head_offset: 0,
        batch_offset: 0,
    };
    // SAFETY: the caller of the safe API handed a live stream of this device (Launch::on_stream
    // is unsafe for that reason), or null for the legacy default stream.
    let stream = unsafe { dev.borrow_stream(launch.stream) };
    for (h0, b0, cfg) in launches {
        debug_assert!(
            variant != Variant::Mma || cfg.shared_mem_bytes as usize <= DEFAULT_SMEM_LIMIT
        );
        // Below heads_q and batch, which AttentionShape::new checked to fit i32.
        args.head_offset = h0 as i32;
        args.batch_offset = b0 as i32;
        // SAFETY: AttentionFwdArgs has the kernel's C layout (DkAttentionFwdArgs); the call was
        // validated (shapes, strides, 16-byte aligned rows, dtype, head dimension), every pointer
        // checked above to be device memory of this device covering those shapes, and the
        // dynamic shared memory is within the default 48 KB (see the tests) or, for the split
        // and wgmma kernels, what `configure` / `configure_wgmma` opted them into (the wgmma
        // kernels only on a compute capability 9.0 device, whose cubin holds their bodies).
        unsafe { stream.launch_builder(function).arg(&args).launch(cfg)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::RawBatch;

    #[test]
    fn args_layout_matches_the_header() {
        // offsetof / sizeof of DkAttentionFwdArgs from the host C compiler.
        let want: &[(&str, usize)] = &[
            ("sizeof", 136),
            ("shape", 0),
            ("shape.cu_seqlens_q", 0),
            ("shape.cu_seqlens_k", 8),
            ("shape.batch", 16),
            ("shape.seqlen_q", 20),
            ("shape.seqlen_k", 24),
            ("shape.total_q", 28),
            ("shape.total_k", 32),
            ("shape.heads_q", 36),
            ("shape.heads_kv", 40),
            ("shape.causal", 44),
            ("shape.scale", 48),
            ("shape.scale_log2", 52),
            ("q", 56),
            ("k", 64),
            ("v", 72),
            ("out", 80),
            ("lse", 88),
            ("q_stride", 96),
            ("k_stride", 104),
            ("v_stride", 112),
            ("out_stride", 120),
            ("head_offset", 128),
            ("batch_offset", 132),
        ];
        assert_eq!(attention_fwd_args_layout(), want);
    }

    #[test]
    fn every_instantiation_is_listed() {
        for dtype in [DType::BF16, DType::F16] {
            for d in crate::attention::HEAD_DIMS {
                for v in [Variant::Mma, Variant::Wide, Variant::Wgmma] {
                    let name = kernel_name(dtype, d, v).unwrap();
                    assert!(KERNEL_NAMES.contains(&name), "{name}");
                    assert_eq!(WGMMA_KERNELS.contains(&name), v == Variant::Wgmma, "{name}");
                }
            }
        }
        assert!(kernel_name(DType::F32, 64, Variant::Mma).is_err());
        // The split kernel exists at D = 128 only; D = 64 keeps the mma.sync kernel of 4 warps.
        assert_eq!(
            kernel_name(DType::BF16, 64, Variant::Wide).unwrap(),
            "dk_attn_fwd_bf16_d64"
        );
    }

    #[test]
    fn wgmma_is_the_default_where_the_device_has_it() {
        use Requested as R;
        use Variant as V;
        // (requested, D, wide accepted, wgmma accepted) → variant.
        for (req, d, wide_ok, wgmma_ok, want) in [
            // Hopper (both accepted): wgmma unless mma.sync is asked for; wide wins at D = 128.
            (R::Default, 64, true, true, V::Wgmma),
            (R::Default, 128, true, true, V::Wgmma),
            (R::Wgmma, 128, true, true, V::Wgmma),
            (R::Mma, 64, true, true, V::Mma),
            (R::Mma, 128, true, true, V::Mma),
            (R::Wide, 128, true, true, V::Wide),
            (R::Wide, 64, true, true, V::Mma),
            // Elsewhere (no wgmma): the mma.sync kernels, wide where accepted.
            (R::Default, 128, true, false, V::Mma),
            (R::Wgmma, 64, true, false, V::Mma),
            (R::Wgmma, 128, true, false, V::Mma),
            (R::Mma, 128, true, false, V::Mma),
            (R::Wide, 128, true, false, V::Wide),
            (R::Wide, 128, false, false, V::Mma),
            // A Hopper device that refused the wide kernel's shared memory.
            (R::Wide, 128, false, true, V::Mma),
        ] {
            assert_eq!(
                choose(req, d, wide_ok, wgmma_ok),
                want,
                "{req:?} D = {d}, wide {wide_ok}, wgmma {wgmma_ok}"
            );
        }
    }

    fn raw(batch: usize, seqlen_q: usize, total_q: usize, heads_q: usize) -> RawAttention {
        RawAttention {
            shape: RawBatch {
                batch,
                seqlen_q,
                seqlen_k: 7,
                total_q,
                total_k: 7 * batch,
                cu_seqlens_q: std::ptr::null(),
                cu_seqlens_k: std::ptr::null(),
            },
            heads_q,
            heads_kv: 1,
            head_dim: 64,
            dtype: DType::BF16,
            causal: false,
            scale: 0.125,
            q: std::ptr::null(),
            q_stride: 64 * heads_q,
            k: std::ptr::null(),
            k_stride: 64,
            v: std::ptr::null(),
            v_stride: 64,
            out: std::ptr::null_mut(),
            out_stride: 64 * heads_q,
            lse: std::ptr::null_mut(),
        }
    }

    #[test]
    fn shared_memory_needs_no_opt_in() {
        for d in crate::attention::HEAD_DIMS {
            let (block_m, smem) = tiling(d);
            assert!(block_m == 64 || block_m == 128);
            assert!(smem <= DEFAULT_SMEM_LIMIT, "D = {d}: {smem} bytes");
        }
        assert_eq!(tiling(64), (128, 32768));
        assert_eq!(tiling(128), (64, 49152));
    }

    #[test]
    fn split_kernel_takes_128_rows_per_block() {
        let mut r = raw(2, 129, 258, 3);
        r.head_dim = 128;
        r.q_stride = 128 * 3;
        let l = launches(&r, Variant::Wide);
        assert_eq!(l[0].2.grid_dim, (2, 3, 2));
        assert_eq!(l[0].2.block_dim, (SPLIT_THREADS, 1, 1));
        assert_eq!(l[0].2.shared_mem_bytes as usize, split_smem_bytes());
        assert_eq!(launches(&r, Variant::Mma)[0].2.grid_dim, (3, 3, 2));
        // 81 KiB: two blocks fit an A100 SM (164 KiB) and a Hopper SM (228 KiB).
        assert_eq!(split_smem_bytes(), 82_944);
    }

    #[test]
    fn wgmma_kernels_take_128_rows_and_fit_a_hopper_sm() {
        for d in crate::attention::HEAD_DIMS {
            let mut r = raw(2, 129, 258, 3);
            r.head_dim = d;
            r.q_stride = d * 3;
            let l = launches(&r, Variant::Wgmma);
            assert_eq!(l[0].2.grid_dim, (2, 3, 2));
            assert_eq!(l[0].2.block_dim, (SPLIT_THREADS, 1, 1));
            assert_eq!(l[0].2.shared_mem_bytes as usize, wgmma_smem_bytes(d));
        }
        // WgTiling::kSmemBytes; one block per SM within Hopper's 227 KiB opt-in limit.
        assert_eq!(wgmma_smem_bytes(64), 82_944);
        assert_eq!(wgmma_smem_bytes(128), 164_864);
        assert!(wgmma_smem_bytes(128) <= 227 * 1024);
    }

    #[test]
    fn launches_cover_rows_heads_and_sequences() {
        assert!(launches(&raw(0, 5, 0, 4), Variant::Mma).is_empty());
        assert!(launches(&raw(3, 0, 0, 4), Variant::Mma).is_empty());
        let l = launches(&raw(2, 129, 258, 3), Variant::Mma);
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].0, l[0].1), (0, 0));
        assert_eq!(l[0].2.grid_dim, (2, 3, 2)); // D = 64: 128 rows per block
        assert_eq!(l[0].2.block_dim, (THREADS, 1, 1));
        let l = launches(&raw(70000, 1, 70000, 8), Variant::Mma);
        let starts: Vec<_> = l.iter().map(|(h, b, c)| (*h, *b, c.grid_dim)).collect();
        assert_eq!(
            starts,
            vec![(0, 0, (1, 8, 65535)), (0, 65535, (1, 8, 70000 - 65535))]
        );
    }
}
