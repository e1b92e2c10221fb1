//! Launchers of the attention backward kernels (`cuda/attention_backward.cu`): the argument
//! struct shared with them (`cuda/include/dk_attention_bwd_args.h`), the workspace and the three
//! launches of each mode. Design, tiling and budgets: `cuda/ATTENTION.md`, "Backward".
//!
//! Deterministic mode (`deterministic = true`), on the caller's stream, in order:
//!
//! 1. `dk_attn_bwd_delta_<t>_d<D>`: `Delta = rowsum(dout ∘ out)` per (query row, head), f32,
//!    into the workspace (laid out like the LSE);
//! 2. `dk_attn_bwd_dkdv_<t>_d<D>`: dK and dV, one block per (64 key rows, KV head, sequence),
//!    looping over the query heads of the group and the query tiles that see the keys;
//! 3. `dk_attn_bwd_dq_<t>_d<D>`: dQ, one block per (64 query rows, query head, sequence),
//!    looping over the key tiles the queries see.
//!
//! No atomics: every element of dq, dk and dv is written once, by one thread, after a
//! reduction in a fixed order, so the results are bitwise reproducible run after run.
//!
//! Atomic-dQ mode (`deterministic = false`, as FlashAttention-2's default): five GEMMs instead
//! of seven. Delta also zeroes an f32 dQ accumulator in the workspace; `dk_attn_bwd_dkdvdq_*`
//! computes dK and dV as kernel 2 and adds each step's `dS·K` into the accumulator with f32
//! reductions in L2; `dk_attn_bwd_dq_convert_*` writes `dq = scale · accumulator`. dk and dv stay
//! bitwise reproducible; dq varies in its last bits from run to run (addition order).
//!
//! Kernel families (`cuda/ATTENTION.md`, "Backward on wgmma" for the measurements). On a
//! compute capability 9.0 device that accepted their shared memory the default is Hopper's
//! warpgroup MMA (`cuda/attention_backward_wgmma.cu`: `dk_attn_bwd_dkdvg_*`, 128 key rows of 2
//! warpgroups, 64-query steps; `dk_attn_bwd_dqg_*`, 128 query rows, 64-key steps), the
//! deterministic mode's three launches with kernels 2 and 3 replaced, in BOTH modes: on an H200
//! (bf16, causal, D = 128) fwd+bwd ran at 391–415 TFLOP/s on it against 236–249 for the
//! mma.sync deterministic mode and 210–241 for the mma.sync atomic-dQ mode (278–307 with the
//! 128-key atomic-dQ kernels), so `deterministic = false` takes it too: dq is then reproducible
//! as well and dk / dv are identical between the modes. The workspace size reported stays the
//! atomic-dQ mode's (a caller's buffer is checked against it); only its Delta region is used,
//! and the dQ accumulator is neither zeroed nor converted. Elsewhere the default is the mma.sync
//! kernels above.
//!
//! `DK_ATTENTION_BWD=mma` asks for the mma.sync kernels above everywhere (the A/B baseline on
//! Hopper). `DK_ATTENTION_BWD=wide` runs the mma.sync dK/dV in 128-key blocks of 8 warps instead
//! (`dk_attn_bwd_dkdvw_*`, `dk_attn_bwd_dkdvdqw_*`: each warp owns 32 keys, so every
//! shared-memory B fragment feeds two MMA row tiles, FlashAttention-2's layout), in both modes,
//! and the deterministic mode's dQ in 128-row blocks of 8 warps (`dk_attn_bwd_dqw_*`, warp
//! pairs splitting each key step), where the device allows their shared memory (161 and
//! 144 KiB at D = 128; else as `mma`), taking precedence over wgmma on Hopper.
//! `DK_ATTENTION_BWD=wgmma` is the default's policy on Hopper and falls back to `wide` elsewhere.
//! `attention::kernels_used` lists what ran.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

use super::shape::{to_i32, AttentionShape};
use super::{requested, Requested};
use crate::attention::RawAttentionBackward;
use crate::device::{CudaDevice, Launch};
use crate::error::{bail, Result};
use crate::tensor::DType;

/// Rust mirror of `DkAttentionBwdArgs` (cuda/include/dk_attention_bwd_args.h), passed by value
/// to the three backward kernels. Pointers are device addresses; strides are elements between
/// token rows.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AttentionBwdArgs {
    /// Sequences, heads, mask, scale.
    pub shape: AttentionShape,
    /// Gradient of the loss w.r.t. out, `[total_q, Hq·D]`.
    pub dout: u64,
    /// Queries `[total_q, Hq·D]`.
    pub q: u64,
    /// Keys `[total_k, Hkv·D]`.
    pub k: u64,
    /// Values `[total_k, Hkv·D]`.
    pub v: u64,
    /// Out of the forward call `[total_q, Hq·D]`.
    pub out: u64,
    /// f32 natural-log LSE of the forward call: `[B, Hq, Sq]` padded, `[Hq, total_q]` varlen.
    pub lse: u64,
    /// f32 workspace region laid out like `lse`: `Delta = rowsum(dout ∘ out)`.
    pub delta: u64,
    /// Out: dQ `[total_q, Hq·D]`.
    pub dq: u64,
    /// Out: dK `[total_k, Hkv·D]`, summed over the query group.
    pub dk: u64,
    /// Out: dV `[total_k, Hkv·D]`, summed over the query group.
    pub dv: u64,
    /// Token stride of `dout`.
    pub dout_stride: i64,
    /// Token stride of `q`.
    pub q_stride: i64,
    /// Token stride of `k`.
    pub k_stride: i64,
    /// Token stride of `v`.
    pub v_stride: i64,
    /// Token stride of `out`.
    pub out_stride: i64,
    /// Token stride of `dq`.
    pub dq_stride: i64,
    /// Token stride of `dk`.
    pub dk_stride: i64,
    /// Token stride of `dv`.
    pub dv_stride: i64,
    /// f32 workspace region `[total_q, Hq·D]`: the dQ accumulator of the atomic-dQ mode; 0 in
    /// the deterministic mode.
    pub dq_accum: u64,
}

// SAFETY: plain-old-data with the C layout of DkAttentionBwdArgs (see
// attention_bwd_args_layout and its test).
unsafe impl DeviceRepr for AttentionBwdArgs {}

/// Size and field offsets of [`AttentionBwdArgs`] (shape fields as `shape.<name>`), for a
/// layout test against the C header.
#[doc(hidden)]
pub fn attention_bwd_args_layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    vec![
        ("sizeof", size_of::<AttentionBwdArgs>()),
        ("shape", offset_of!(AttentionBwdArgs, shape)),
        (
            "shape.cu_seqlens_q",
            offset_of!(AttentionShape, cu_seqlens_q),
        ),
        (
            "shape.cu_seqlens_k",
            offset_of!(AttentionShape, cu_seqlens_k),
        ),
        ("shape.batch", offset_of!(AttentionShape, batch)),
        ("shape.seqlen_q", offset_of!(AttentionShape, seqlen_q)),
        ("shape.seqlen_k", offset_of!(AttentionShape, seqlen_k)),
        ("shape.total_q", offset_of!(AttentionShape, total_q)),
        ("shape.total_k", offset_of!(AttentionShape, total_k)),
        ("shape.heads_q", offset_of!(AttentionShape, heads_q)),
        ("shape.heads_kv", offset_of!(AttentionShape, heads_kv)),
        ("shape.causal", offset_of!(AttentionShape, causal)),
        ("shape.scale", offset_of!(AttentionShape, scale)),
        ("shape.scale_log2", offset_of!(AttentionShape, scale_log2)),
        ("dout", offset_of!(AttentionBwdArgs, dout)),
        ("q", offset_of!(AttentionBwdArgs, q)),
        ("k", offset_of!(AttentionBwdArgs, k)),
        ("v", offset_of!(AttentionBwdArgs, v)),
        ("out", offset_of!(AttentionBwdArgs, out)),
        ("lse", offset_of!(AttentionBwdArgs, lse)),
        ("delta", offset_of!(AttentionBwdArgs, delta)),
        ("dq", offset_of!(AttentionBwdArgs, dq)),
        ("dk", offset_of!(AttentionBwdArgs, dk)),
        ("dv", offset_of!(AttentionBwdArgs, dv)),
        ("dout_stride", offset_of!(AttentionBwdArgs, dout_stride)),
        ("q_stride", offset_of!(AttentionBwdArgs, q_stride)),
        ("k_stride", offset_of!(AttentionBwdArgs, k_stride)),
        ("v_stride", offset_of!(AttentionBwdArgs, v_stride)),
        ("out_stride", offset_of!(AttentionBwdArgs, out_stride)),
        ("dq_stride", offset_of!(AttentionBwdArgs, dq_stride)),
        ("dk_stride", offset_of!(AttentionBwdArgs, dk_stride)),
        ("dv_stride", offset_of!(AttentionBwdArgs, dv_stride)),
        ("dq_accum", offset_of!(AttentionBwdArgs, dq_accum)),
    ]
}

/// Kernels this file launches.
pub(crate) const KERNEL_NAMES: &[&str] = &[
    "dk_attn_bwd_delta_bf16_d64",
    "dk_attn_bwd_delta_bf16_d128",
    "dk_attn_bwd_delta_f16_d64",
    "dk_attn_bwd_delta_f16_d128",
    "dk_attn_bwd_dkdv_bf16_d64",
    "dk_attn_bwd_dkdv_bf16_d128",
    "dk_attn_bwd_dkdv_f16_d64",
    "dk_attn_bwd_dkdv_f16_d128",
    "dk_attn_bwd_dq_bf16_d64",
    "dk_attn_bwd_dq_bf16_d128",
    "dk_attn_bwd_dq_f16_d64",
    "dk_attn_bwd_dq_f16_d128",
    "dk_attn_bwd_dkdvdq_bf16_d64",
    "dk_attn_bwd_dkdvdq_bf16_d128",
    "dk_attn_bwd_dkdvdq_f16_d64",
    "dk_attn_bwd_dkdvdq_f16_d128",
    "dk_attn_bwd_dq_convert_bf16_d64",
    "dk_attn_bwd_dq_convert_bf16_d128",
    "dk_attn_bwd_dq_convert_f16_d64",
    "dk_attn_bwd_dq_convert_f16_d128",
    "dk_attn_bwd_dkdvw_bf16_d64",
    "dk_attn_bwd_dkdvw_bf16_d128",
    "dk_attn_bwd_dkdvw_f16_d64",
    "dk_attn_bwd_dkdvw_f16_d128",
    "dk_attn_bwd_dkdvdqw_bf16_d64",
    "dk_attn_bwd_dkdvdqw_bf16_d128",
    "dk_attn_bwd_dkdvdqw_f16_d64",
    "dk_attn_bwd_dkdvdqw_f16_d128",
    "dk_attn_bwd_dqw_bf16_d64",
    "dk_attn_bwd_dqw_bf16_d128",
    "dk_attn_bwd_dqw_f16_d64",
    "dk_attn_bwd_dqw_f16_d128",
    "dk_attn_bwd_dqg_bf16_d64",
    "dk_attn_bwd_dqg_bf16_d128",
    "dk_attn_bwd_dqg_f16_d64",
    "dk_attn_bwd_dqg_f16_d128",
    "dk_attn_bwd_dkdvg_bf16_d64",
    "dk_attn_bwd_dkdvg_bf16_d128",
    "dk_attn_bwd_dkdvg_f16_d64",
    "dk_attn_bwd_dkdvg_f16_d128",
];

/// Threads per block of the Delta kernel (`kDeltaThreads`); D / 8 threads per (row, head).
const DELTA_THREADS: u32 = 256;
/// Threads per block of the dK/dV and dQ kernels (`kThreads`: 4 warps of 16 rows).
const THREADS: u32 = 128;
/// Key rows per dK/dV block (`DkdvTile::kBc`).
const DKDV_KEYS: usize = 64;
/// Query rows per dQ block (`DqTile::kBr`).
const DQ_QUERIES: usize = 64;
/// Alignment of every workspace region.
const REGION_ALIGN: usize = 256;
/// Threads per block of the 128-key dK/dV kernels (`DkdvWideTile::kThreads`: 8 warps of 32 keys),
/// also of the 128-row dQ kernel and of the wgmma kernels (`DkdvWgTile`, `DqWgTile`: 2 warpgroups).
const WIDE_THREADS: u32 = 256;
/// Key rows per block of the 128-key dK/dV kernels (`DkdvWideTile::kBc`).
const WIDE_KEYS: usize = 128;
/// Query rows per loop step of the 128-key dK/dV kernels (`DkdvWideTile::kBr`), also the row
/// width of their Pᵀ and dSᵀ tiles.
const WIDE_QUERIES: usize = 64;

/// Dynamic shared memory of the 128-key dK/dV kernels, with or without atomic dQ
/// (`DkdvWideTile::kSmemBytes`): K and V of the block's keys, two stages of Q and dO tiles, the
/// Pᵀ and dSᵀ tiles, two stages of LSE and Delta.
fn dkdv_wide_smem_bytes(head_dim: usize) -> usize {
    let (bc, br) = (WIDE_KEYS, WIDE_QUERIES);
    (2 * bc * head_dim + 4 * br * head_dim + 2 * bc * br) * 2 + 4 * br * 4
}

/// Query rows per block of the 128-row dQ kernel (`DqWideTile::kBr`: 4 warp pairs of 32).
const WIDE_DQ_ROWS: usize = 128;

/// Dynamic shared memory of the 128-row dQ kernel (`DqWideTile::kSmemBytes`): Q and dO of the
/// block's rows, two stages of K and V tiles of 64 keys, the dS tile (128 rows × 64 keys).
fn dq_wide_smem_bytes(head_dim: usize) -> usize {
    let (br, bc) = (WIDE_DQ_ROWS, 64);
    (2 * br * head_dim + 4 * bc * head_dim + br * bc) * 2
}

/// Query rows per block of the wgmma dQ kernel (`DqWgTile::kBr`: 2 warpgroups of 64).
const WGMMA_DQ_ROWS: usize = 128;

/// Dynamic shared memory of the wgmma dQ kernel (`DqWgTile::kSmemBytes`): 1 KiB of slack to
/// align the tiles to 1024 bytes, Q and dO of the block's rows, two stages of K and V tiles of
/// 64 keys.
fn dq_wgmma_smem_bytes(head_dim: usize) -> usize {
    1024 + (2 * WGMMA_DQ_ROWS * head_dim + 4 * 64 * head_dim) * 2
}

/// Key rows per block of the wgmma dK/dV kernel (`DkdvWgTile::kBc`: 2 warpgroups of 64).
const WGMMA_KEYS: usize = 128;

/// Dynamic shared memory of the wgmma dK/dV kernel (`DkdvWgTile::kSmemBytes`): 1 KiB of slack
/// to align the tiles to 1024 bytes, K and V of the block's keys, two stages of Q and dO tiles
/// of 64 queries, two stages of their LSE and Delta.
fn dkdv_wgmma_smem_bytes(head_dim: usize) -> usize {
    1024 + (2 * WGMMA_KEYS * head_dim + 4 * 64 * head_dim) * 2 + 4 * 64 * 4
}

/// The kernel family of a backward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// mma.sync, 64-key dK/dV and 64-row dQ blocks of 4 warps.
    Mma,
    /// mma.sync, 128-key dK/dV and 128-row dQ blocks of 8 warps.
    Wide,
    /// Hopper wgmma, 128-key dK/dV and 128-row dQ blocks of 2 warpgroups: deterministic
    /// kernels only, which then serve both modes.
    Wgmma,
}

/// The family a call runs, given what was requested and what the device accepted when it
/// opened: `mma` and `wide` take precedence over wgmma; the default and `wgmma` run wgmma where
/// the device has it, else the mma.sync kernels (`wgmma`: the wide ones where accepted).
fn family(req: Requested, wide_ok: bool, wgmma_ok: bool) -> Family {
    match req {
        Requested::Default | Requested::Wgmma if wgmma_ok => Family::Wgmma,
        Requested::Wide | Requested::Wgmma if wide_ok => Family::Wide,
        _ => Family::Mma,
    }
}

/// Query rows per loop step of the dK/dV kernel (`DkdvTile::kBr`).
fn dkdv_queries(head_dim: usize) -> usize {
    if head_dim == 64 {
        64
    } else {
        32
    }
}

/// Key rows per loop step of the dQ kernel (`DqTile::kBc`).
fn dq_keys(head_dim: usize) -> usize {
    if head_dim == 64 {
        64
    } else {
        32
    }
}

/// Dynamic shared memory of the dK/dV kernel (`DkdvTile::kSmemBytes`): K and V of the block's
/// keys, two stages of Q and dO tiles, two stages of LSE and Delta.
fn dkdv_smem_bytes(head_dim: usize) -> usize {
    let (bc, br) = (DKDV_KEYS, dkdv_queries(head_dim));
    (2 * bc * head_dim + 4 * br * head_dim) * 2 + 4 * br * 4
}

/// Dynamic shared memory of the dK/dV kernel with atomic dQ (`DkdvTile::kSmemBytesAtomicDq`):
/// that of [`dkdv_smem_bytes`] plus the block's dSᵀ tile (64 keys × 64 columns of 16 bits).
fn dkdvdq_smem_bytes(head_dim: usize) -> usize {
    dkdv_smem_bytes(head_dim) + DKDV_KEYS * 64 * 2
}

/// Dynamic shared memory of the dQ kernel (`DqTile::kSmemBytes`): Q and dO of the block's
/// queries, two stages of K and V tiles.
fn dq_smem_bytes(head_dim: usize) -> usize {
    let (br, bc) = (DQ_QUERIES, dq_keys(head_dim));
    (2 * br * head_dim + 4 * bc * head_dim) * 2
}

/// Bytes of the Delta region of the workspace (f32, `Hq·Tq` entries laid out like the LSE),
/// rounded up to 256: the dQ accumulator, when there is one, starts there.
fn delta_region_bytes(raw: &RawAttentionBackward) -> usize {
    (4 * raw.heads_q * raw.shape.total_q).next_multiple_of(REGION_ALIGN)
}

/// Workspace bytes of a call: the Delta region and, when dQ is summed with atomics, the f32 dQ
/// accumulator `[Tq, Hq·D]` after it; 0 when there is no query row.
fn workspace_bytes(raw: &RawAttentionBackward, atomic_dq: bool) -> usize {
    let accum = if atomic_dq {
        4 * raw.shape.total_q * raw.heads_q * raw.head_dim
    } else {
        0
    };
    delta_region_bytes(raw) + accum
}

/// The kernels that serve `raw` on `dev`: the family the device and `DK_ATTENTION_BWD` choose,
/// in the mode the call asks for. The size query and the call both ask here.
fn chosen_kernels(dev: &CudaDevice, raw: &RawAttentionBackward) -> Kernels {
    let family = family(
        requested("DK_ATTENTION_BWD"),
        dev.attention_wide_bwd(),
        dev.attention_wgmma_bwd(),
    );
    kernels(family, raw.deterministic, raw.head_dim)
}

/// Device workspace the backward needs on `dev`: the Delta region, plus the f32 dQ accumulator
/// where the kernels that serve the call sum dQ with atomics (the atomic-dQ mode, except on the
/// Hopper wgmma kernels: there only the Delta region).
pub(crate) fn backward_workspace_size(dev: &CudaDevice, raw: &RawAttentionBackward) -> usize {
    workspace_bytes(raw, chosen_kernels(dev, raw).atomic_dq)
}

/// Blocks of a grid over (tiles, sequences, heads), flattened into x.
fn grid_blocks(what: &str, seqlen: usize, tile: usize, batch: usize, heads: usize) -> Result<u32> {
    let blocks = seqlen
        .div_ceil(tile)
        .saturating_mul(batch)
        .saturating_mul(heads);
    Ok(to_i32(&format!("the {what} grid (blocks)"), blocks)? as u32)
}

fn launch(
    stream: &Arc<CudaStream>,
    f: &CudaFunction,
    args: &AttentionBwdArgs,
    blocks: u32,
    threads: u32,
    smem: usize,
) -> Result<()> {
    if blocks == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: AttentionBwdArgs has the C layout of DkAttentionBwdArgs, the kernels' only
    // parameter; every pointer in it is device memory of this device covering the validated
    // shapes (or the workspace region sized by backward_workspace_size), and `smem` is at most
    // the dynamic shared memory the function was opted into.
    unsafe { stream.launch_builder(f).arg(args).launch(cfg)? };
    Ok(())
}

/// The kernels `configure` opts into their dynamic shared memory on every device: the name
/// stem (between `dk_attn_bwd_` and `_{dtype}_d{D}`) and the bytes their launches ask for.
fn default_opt_ins(d: usize) -> [(&'static str, usize); 3] {
    [
        ("dkdv", dkdv_smem_bytes(d)),
        ("dkdvdq", dkdvdq_smem_bytes(d)),
        ("dq", dq_smem_bytes(d)),
    ]
}

/// The 128-key kernels `configure` opts in where the device allows (`DK_ATTENTION_BWD=wide`, and
/// `wgmma` off Hopper).
fn wide_opt_ins(d: usize) -> [(&'static str, usize); 3] {
    [
        ("dkdvw", dkdv_wide_smem_bytes(d)),
        ("dkdvdqw", dkdv_wide_smem_bytes(d)),
        ("dqw", dq_wide_smem_bytes(d)),
    ]
}

/// The wgmma kernels `configure_wgmma` opts in on a Hopper device (the default there).
fn wgmma_opt_ins(d: usize) -> [(&'static str, usize); 2] {
    [
        ("dkdvg", dkdv_wgmma_smem_bytes(d)),
        ("dqg", dq_wgmma_smem_bytes(d)),
    ]
}

/// Sets the dynamic shared memory limit of `dk_attn_bwd_{stem}_{dtype}_d{D}` for every dtype and
/// head dimension of `table`. Returns the first refusal (kernel, bytes, the driver's error), if
/// any; the others are still tried.
fn opt_in<const K: usize>(
    functions: &HashMap<&'static str, CudaFunction>,
    table: fn(usize) -> [(&'static str, usize); K],
) -> Option<String> {
    let mut refused = None;
    for t in ["bf16", "f16"] {
        for d in [64, 128] {
            for (stem, bytes) in table(d) {
                let name = format!("dk_attn_bwd_{stem}_{t}_d{d}");
                if let Some(f) = functions.get(name.as_str()) {
                    let attr =
                        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                    if let Err(e) = f.set_attribute(attr, bytes as i32) {
                        refused.get_or_insert(format!("{name} with {bytes} bytes: {e:?}"));
                    }
                }
            }
        }
    }
    refused
}

/// Opts the dK/dV and dQ kernels in to their dynamic shared memory (over the 48 KB default),
/// once when a device opens (an error where the default kernels are refused). Returns whether
/// the 128-key kernels were accepted too (their 161 KiB at D = 128 exceed what some devices
/// allow a block): only then may `DK_ATTENTION_BWD=wide` (or `wgmma` off Hopper) select them.
pub(crate) fn configure(functions: &HashMap<&'static str, CudaFunction>) -> Result<bool> {
    if let Some(why) = opt_in(functions, default_opt_ins) {
        bail!(
            Cuda,
            "the device refused an attention backward kernel's dynamic shared memory: {why}"
        );
    }
    Ok(opt_in(functions, wide_opt_ins).is_none())
}

/// Opts the wgmma dK/dV and dQ kernels into their dynamic shared memory (66 and 130 KiB, 65
/// and 129 KiB) on a Hopper device: compute capability 9.0 exactly, the one the sm_90a cubin
/// runs on (elsewhere the sm_80 code, whose wgmma kernels are empty bodies). False elsewhere or
/// where the device refuses: only then do they serve calls (by default, unless
/// `DK_ATTENTION_BWD=mma` or `wide` asks for the mma.sync kernels).
pub(crate) fn configure_wgmma(
    functions: &HashMap<&'static str, CudaFunction>,
    compute_capability: (i32, i32),
) -> bool {
    compute_capability == (9, 0) && opt_in(functions, wgmma_opt_ins).is_none()
}

/// The kernels of one backward call, each as (name stem, dynamic shared memory, threads): every
/// stem with more than 48 KB is in the opt-in table of its family (see the tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kernels {
    dkdv: (&'static str, usize, u32),
    dq: (&'static str, usize, u32),
    /// Key rows per dK/dV block.
    dkdv_keys: usize,
    /// Query rows per dQ block (unused when `atomic_dq`: the conversion runs over Delta's items).
    dq_rows: usize,
    /// Whether dQ is summed with f32 atomics into the workspace's accumulator (then `dq` is the
    /// conversion kernel). Never with wgmma: its deterministic kernels serve both modes.
    atomic_dq: bool,
}

/// Which kernels serve a call of `family` at head dimension `d`; `deterministic` as asked by
/// the call (the atomic-dQ mode for `false`, except on wgmma).
fn kernels(family: Family, deterministic: bool, d: usize) -> Kernels {
    let atomic_dq = !deterministic && family != Family::Wgmma;
    let (dkdv, dkdv_keys) = match (family, atomic_dq) {
        (Family::Wgmma, _) => (
            ("dkdvg", dkdv_wgmma_smem_bytes(d), WIDE_THREADS),
            WGMMA_KEYS,
        ),
        (Family::Wide, true) => (
            ("dkdvdqw", dkdv_wide_smem_bytes(d), WIDE_THREADS),
            WIDE_KEYS,
        ),
        (Family::Wide, false) => (("dkdvw", dkdv_wide_smem_bytes(d), WIDE_THREADS), WIDE_KEYS),
        (Family::Mma, true) => (("dkdvdq", dkdvdq_smem_bytes(d), THREADS), DKDV_KEYS),
        (Family::Mma, false) => (("dkdv", dkdv_smem_bytes(d), THREADS), DKDV_KEYS),
    };
    let (dq, dq_rows) = match (atomic_dq, family) {
        (true, _) => (("dq_convert", 0, DELTA_THREADS), DQ_QUERIES),
        (false, Family::Wgmma) => (("dqg", dq_wgmma_smem_bytes(d), WIDE_THREADS), WGMMA_DQ_ROWS),
        (false, Family::Wide) => (("dqw", dq_wide_smem_bytes(d), WIDE_THREADS), WIDE_DQ_ROWS),
        (false, Family::Mma) => (("dq", dq_smem_bytes(d), THREADS), DQ_QUERIES),
    };
    Kernels {
        dkdv,
        dq,
        dkdv_keys,
        dq_rows,
        atomic_dq,
    }
}

/// Backward pass on the caller's stream: dq, dk, dv, in the mode `raw.deterministic` asks for
/// (see the module documentation).
pub(crate) fn backward(
    dev: &CudaDevice,
    raw: &RawAttentionBackward,
    launch_cfg: &Launch<'_>,
) -> Result<()> {
    for (what, p) in [
        ("dout", raw.dout as *const _),
        ("q", raw.q as *const _),
        ("k", raw.k as *const _),
        ("v", raw.v as *const _),
        ("out", raw.out as *const _),
        ("lse", raw.lse as *const _),
        ("dq", raw.dq as *const _),
        ("dk", raw.dk as *const _),
        ("dv", raw.dv as *const _),
        ("cu_seqlens_q", raw.shape.cu_seqlens_q as *const _),
        ("cu_seqlens_k", raw.shape.cu_seqlens_k as *const _),
    ] {
        dev.check_pointer(what, p)?;
    }
    let t = match raw.dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => bail!(
            UnsupportedDtype,
            "the CUDA attention kernels take bf16 or f16, got f32"
        ),
    };
    let d = raw.head_dim;
    if d != 64 && d != 128 {
        bail!(
            Shape,
            "head_dim = {d}: the CUDA attention kernels take 64 or 128"
        );
    }
    let sh = &raw.shape;
    let chosen = chosen_kernels(dev, raw);
    let atomic_dq = chosen.atomic_dq;
    let need = workspace_bytes(raw, atomic_dq);
    // Delta is f32; the atomic-dQ accumulator is read and zeroed 16 bytes at a time.
    dev.check_workspace(
        launch_cfg,
        need,
        if atomic_dq { 16 } else { 4 },
        &if !atomic_dq {
            format!("Delta of Hq·Tq = {}·{}", raw.heads_q, sh.total_q)
        } else {
            format!(
                "Delta and the f32 dQ accumulator of Hq·Tq = {}·{} rows of D = {d}",
                raw.heads_q, sh.total_q
            )
        },
    )?;

    let shape = AttentionShape::new(sh, raw.heads_q, raw.heads_kv, raw.causal, raw.scale)?;
    to_i32("Hq·Tq", raw.heads_q.saturating_mul(sh.total_q))?;
    let delta_items = raw.heads_q * sh.total_q;
    let delta_blocks = to_i32(
        "the Delta grid (blocks)",
        delta_items.div_ceil(DELTA_THREADS as usize / (d / 8)),
    )? as u32;
    let dkdv_blocks = grid_blocks(
        "dK/dV",
        sh.seqlen_k,
        chosen.dkdv_keys,
        sh.batch,
        raw.heads_kv,
    )?;
    let dq_blocks = grid_blocks("dQ", sh.seqlen_q, chosen.dq_rows, sh.batch, raw.heads_q)?;
    if sh.total_q == 0 && sh.total_k == 0 {
        return Ok(()); // no row to write
    }

    // Every kernel looked up before anything is queued (opted into its shared memory by
    // `configure` when the device opened).
    let f_delta = dev.function(&format!("dk_attn_bwd_delta_{t}_d{d}"))?;
    let (dkdv_kernel, dkdv_smem, dkdv_threads) = chosen.dkdv;
    let dkdv_name = format!("dk_attn_bwd_{dkdv_kernel}_{t}_d{d}");
    let f_dkdv = dev.function(&dkdv_name)?;
    let (dq_kernel, dq_smem, dq_threads) = chosen.dq;
    let dq_name = format!("dk_attn_bwd_{dq_kernel}_{t}_d{d}");
    let f_dq = dev.function(&dq_name)?;
    // SAFETY: the caller of the safe API handed a live stream of this device (Launch::on_stream
    // is unsafe for that reason), or null for the legacy default stream.
    let stream = unsafe { dev.borrow_stream(launch_cfg.stream) };
    // Library-owned workspace (when none is given and one is needed): stream-ordered.
    let (ws, owned) = if need > 0 {
        dev.workspace(launch_cfg, &stream, need)?
    } else {
        (0, None)
    };

    let args = AttentionBwdArgs {
        shape,
        dout: raw.dout as u64,
        q: raw.q as u64,
        k: raw.k as u64,
        v: raw.v as u64,
        out: raw.out as u64,
        lse: raw.lse as u64,
        delta: ws,
        dq: raw.dq as u64,
        dk: raw.dk as u64,
        dv: raw.dv as u64,
        dout_stride: raw.dout_stride as i64,
        q_stride: raw.q_stride as i64,
        k_stride: raw.k_stride as i64,
        v_stride: raw.v_stride as i64,
        out_stride: raw.out_stride as i64,
        dq_stride: raw.dq_stride as i64,
        dk_stride: raw.dk_stride as i64,
        dv_stride: raw.dv_stride as i64,
        dq_accum: if atomic_dq && sh.total_q > 0 {
            ws + delta_region_bytes(raw) as u64
        } else {
            0
        },
    };
    // Delta first (the other two read it; with `dq_accum` it also zeroes the accumulator, which
    // only the atomic-dQ kernels read); dK/dV also runs without query rows (it writes the zero
    // gradients of keys no query sees), dQ also without keys (zero gradients).
    if sh.total_q > 0 {
        launch(&stream, f_delta, &args, delta_blocks, DELTA_THREADS, 0)?;
    }
    if sh.total_k > 0 {
        launch(&stream, f_dkdv, &args, dkdv_blocks, dkdv_threads, dkdv_smem)?;
        if let Some(name) = KERNEL_NAMES.iter().find(|n| **n == dkdv_name) {
            super::note_kernel(name);
        }
    }
    if sh.total_q > 0 {
        if atomic_dq {
            // Same items as Delta: D/8 threads per (row, head).
            launch(&stream, f_dq, &args, delta_blocks, DELTA_THREADS, 0)?;
        } else {
            launch(&stream, f_dq, &args, dq_blocks, dq_threads, dq_smem)?;
            if let Some(name) = KERNEL_NAMES.iter().find(|n| **n == dq_name) {
                super::note_kernel(name);
            }
        }
    }
    drop(owned); // stream-ordered free after the kernels that use it
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_launch_over_48_kb_was_opted_in_for_its_mode() {
        // DK_ATTENTION_BWD=wgmma once launched the wgmma dK/dV kernel with 66 / 130 KiB that
        // only its dQ kernel had been opted into: CUDA_ERROR_INVALID_VALUE on every Hopper call.
        for d in [64, 128] {
            for family in [Family::Mma, Family::Wide, Family::Wgmma] {
                for deterministic in [true, false] {
                    let mut granted: Vec<(&str, usize)> = default_opt_ins(d).to_vec();
                    match family {
                        Family::Mma => {}
                        Family::Wide => granted.extend(wide_opt_ins(d)),
                        Family::Wgmma => granted.extend(wgmma_opt_ins(d)),
                    }
                    let k = kernels(family, deterministic, d);
                    for (stem, smem, _) in [k.dkdv, k.dq] {
                        let ok = smem <= 48 * 1024
                            || granted.iter().any(|&(g, bytes)| g == stem && smem <= bytes);
                        assert!(
                            ok,
                            "D = {d}, {family:?}, deterministic {deterministic}: {stem} asks \
                             for {smem} bytes without an opt-in"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wgmma_is_the_default_where_the_device_has_it() {
        use Family as F;
        use Requested as R;
        // (requested, wide accepted, wgmma accepted) → family.
        for (req, wide_ok, wgmma_ok, want) in [
            // Hopper (both accepted): wgmma unless an mma.sync family is asked for.
            (R::Default, true, true, F::Wgmma),
            (R::Wgmma, true, true, F::Wgmma),
            (R::Mma, true, true, F::Mma),
            (R::Wide, true, true, F::Wide),
            (R::Wide, false, true, F::Mma),
            // Elsewhere: the 64-row mma.sync kernels by default; `wgmma` falls back to `wide`.
            (R::Default, true, false, F::Mma),
            (R::Default, false, false, F::Mma),
            (R::Mma, true, false, F::Mma),
            (R::Wide, true, false, F::Wide),
            (R::Wide, false, false, F::Mma),
            (R::Wgmma, true, false, F::Wide),
            (R::Wgmma, false, false, F::Mma),
        ] {
            assert_eq!(
                family(req, wide_ok, wgmma_ok),
                want,
                "{req:?}, wide {wide_ok}, wgmma {wgmma_ok}"
            );
        }
    }

    #[test]
    fn kernels_of_each_family_and_mode() {
        for d in [64, 128] {
            let stems = |f, det| {
                let k = kernels(f, det, d);
                (k.dkdv.0, k.dq.0, k.dkdv_keys, k.atomic_dq)
            };
            assert_eq!(stems(Family::Mma, true), ("dkdv", "dq", DKDV_KEYS, false));
            assert_eq!(
                stems(Family::Mma, false),
                ("dkdvdq", "dq_convert", DKDV_KEYS, true)
            );
            assert_eq!(
                stems(Family::Wide, true),
                ("dkdvw", "dqw", WIDE_KEYS, false)
            );
            assert_eq!(
                stems(Family::Wide, false),
                ("dkdvdqw", "dq_convert", WIDE_KEYS, true)
            );
            assert_eq!(
                stems(Family::Wgmma, true),
                ("dkdvg", "dqg", WGMMA_KEYS, false)
            );
        }
    }

    #[test]
    fn atomic_dq_mode_on_wgmma_runs_the_deterministic_wgmma_kernels() {
        // deterministic = false on Hopper: the deterministic wgmma kernels (faster there than the
        // atomic-dQ kernels, and dk / dv identical between the modes), no accumulator, no
        // conversion; the same launches as deterministic = true.
        for d in [64, 128] {
            let atomic = kernels(Family::Wgmma, false, d);
            assert_eq!(atomic, kernels(Family::Wgmma, true, d));
            assert!(!atomic.atomic_dq);
            assert_eq!((atomic.dkdv.0, atomic.dq.0), ("dkdvg", "dqg"));
            assert_eq!(
                (atomic.dkdv_keys, atomic.dq_rows),
                (WGMMA_KEYS, WGMMA_DQ_ROWS)
            );
            assert_eq!(atomic.dq.1, dq_wgmma_smem_bytes(d));
        }
        // What the default policy picks on a Hopper device for that mode.
        let k = kernels(family(Requested::Default, true, true), false, 128);
        assert_eq!((k.dkdv.0, k.dq.0, k.atomic_dq), ("dkdvg", "dqg", false));
    }

    #[test]
    fn the_reported_workspace_covers_every_family() {
        // The size reported for deterministic = false (the dQ accumulator after Delta) is at
        // least what any family uses: Delta only on wgmma, Delta + accumulator otherwise.
        let raw = RawAttentionBackward {
            shape: crate::attention::RawBatch {
                batch: 2,
                seqlen_q: 150,
                seqlen_k: 150,
                total_q: 300,
                total_k: 300,
                cu_seqlens_q: std::ptr::null(),
                cu_seqlens_k: std::ptr::null(),
            },
            heads_q: 8,
            heads_kv: 1,
            head_dim: 128,
            dtype: DType::BF16,
            causal: true,
            scale: 0.088,
            deterministic: false,
            dout: std::ptr::null(),
            dout_stride: 1024,
            q: std::ptr::null(),
            q_stride: 1024,
            k: std::ptr::null(),
            k_stride: 128,
            v: std::ptr::null(),
            v_stride: 128,
            out: std::ptr::null(),
            out_stride: 1024,
            lse: std::ptr::null(),
            dq: std::ptr::null_mut(),
            dq_stride: 1024,
            dk: std::ptr::null_mut(),
            dk_stride: 128,
            dv: std::ptr::null_mut(),
            dv_stride: 128,
        };
        let delta = delta_region_bytes(&raw);
        assert_eq!(delta, (4 * 8 * 300usize).next_multiple_of(REGION_ALIGN));
        assert_eq!(workspace_bytes(&raw, true), delta + 4 * 300 * 8 * 128);
        assert_eq!(workspace_bytes(&raw, false), delta);
    }

    /// The C layout of DkAttentionBwdArgs, worked out by hand from the header (natural
    /// alignment, no packing): capi/src/tests/abi_layout.rs can check the same numbers against the
    /// compiled header once this layout function is exported.
    #[test]
    fn args_layout_matches_the_header() {
        let want: &[(&str, usize)] = &[
            ("sizeof", 208),
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
            ("dout", 56),
            ("q", 64),
            ("k", 72),
            ("v", 80),
            ("out", 88),
            ("lse", 96),
            ("delta", 104),
            ("dq", 112),
            ("dk", 120),
            ("dv", 128),
            ("dout_stride", 136),
            ("q_stride", 144),
            ("k_stride", 152),
            ("v_stride", 160),
            ("out_stride", 168),
            ("dq_stride", 176),
            ("dk_stride", 184),
            ("dv_stride", 192),
            ("dq_accum", 200),
        ];
        assert_eq!(attention_bwd_args_layout(), want);
    }

    #[test]
    fn shared_memory_budgets() {
        // The kernels' kSmemBytes (cuda/attention_backward.cu); all above 48 KB, hence the opt-in.
        assert_eq!(dkdv_smem_bytes(64), 50_176);
        assert_eq!(dkdv_smem_bytes(128), 66_048);
        assert_eq!(dq_smem_bytes(64), 49_152);
        assert_eq!(dq_smem_bytes(128), 65_536);
        assert_eq!(dkdvdq_smem_bytes(64), 58_368);
        assert_eq!(dkdvdq_smem_bytes(128), 74_240);
        // 128-key kernels: 161 KiB at D = 128, under the 227 KiB a Hopper block may opt into
        // (and the 163 KiB of an A100).
        assert_eq!(dkdv_wide_smem_bytes(64), 99_328);
        assert_eq!(dkdv_wide_smem_bytes(128), 164_864);
        assert_eq!(dq_wide_smem_bytes(64), 81_920);
        assert_eq!(dq_wide_smem_bytes(128), 147_456);
        // The wgmma dQ kernel (DqWgTile::kSmemBytes): one block per SM.
        assert_eq!(dq_wgmma_smem_bytes(64), 66_560);
        assert_eq!(dq_wgmma_smem_bytes(128), 132_096);
        assert_eq!(dkdv_wgmma_smem_bytes(64), 67_584);
        assert_eq!(dkdv_wgmma_smem_bytes(128), 133_120);
    }

    #[test]
    fn every_dkdv_and_dq_kernel_is_listed() {
        for t in ["bf16", "f16"] {
            for d in [64, 128] {
                for k in [
                    "dq",
                    "dqw",
                    "dqg",
                    "dq_convert",
                    "dkdv",
                    "dkdvw",
                    "dkdvg",
                    "dkdvdq",
                    "dkdvdqw",
                ] {
                    let name = format!("dk_attn_bwd_{k}_{t}_d{d}");
                    assert!(KERNEL_NAMES.contains(&name.as_str()), "{name}");
                }
            }
        }
    }
}
