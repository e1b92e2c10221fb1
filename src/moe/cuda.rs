//! CUDA backend of MoE dispatch: the argument structs shared with `cuda/moe.cu`
//! (`cuda/include/dk_moe_args.h`), the route workspace, and the launches. Design notes, bytes
//! moved and floors: `cuda/MOE.md`.
//!
//! Route is three kernels on the caller's stream: top-k with per-chunk expert counts, a
//! per-expert scan of those counts, and the assignment of rows (positions, perm, offsets).
//! Permute, combine and slot-dot are a warp per (row, segment of the row) with 16-byte loads and
//! stores, so they require 16-byte aligned rows. Permute with k > 1 first inverts `perm` and then
//! reads each token row once for all of its slots (`cuda/MOE.md`, "Token-major permute").

use cudarc::driver::{sys, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

use super::{
    max_rows, RawCombine, RawCombineBackward, RawPermute, RawPermuteBackward, RawRoute, RawSlotDot,
    RouteParams, Score, MAX_EXPERTS, MAX_K,
};
use crate::device::{launch_config_1d, CudaDevice, Launch};
use crate::error::{bail, Result};
use crate::tensor::DType;

/// Rust mirror of `DkMoeRouteArgs` (cuda/include/dk_moe_args.h), passed by value to every
/// route kernel.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MoeRouteArgs {
    pub logits: u64,
    pub bias: u64,
    pub expert_ids: u64,
    pub weights: u64,
    pub counts: u64,
    pub offsets: u64,
    pub perm: u64,
    pub position: u64,
    pub chunk_counts: u64,
    pub n: i64,
    pub logits_stride: i64,
    pub perm_rows: i64,
    pub e: i32,
    pub k: i32,
    pub score: i32,
    pub renormalize: i32,
    pub n_groups: i32,
    pub topk_groups: i32,
    pub capacity: i32,
    pub block: i32,
    pub chunks: i32,
    pub scale: f32,
}

// SAFETY: plain-old-data with the C layout of DkMoeRouteArgs (see moe_route_args_layout).
unsafe impl DeviceRepr for MoeRouteArgs {}

/// Rust mirror of `DkMoeRowsArgs` (cuda/include/dk_moe_args.h): permute, combine, slot-dot and
/// the fused backward kernels.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MoeRowsArgs {
    pub src: u64,
    pub src2: u64,
    pub index: u64,
    pub index2: u64,
    pub weights: u64,
    pub dst: u64,
    pub dst2: u64,
    pub items: i64,
    pub h: i64,
    pub src_stride: i64,
    pub src2_stride: i64,
    pub dst_stride: i64,
    pub k: i32,
    pub limit: i32,
}

// SAFETY: plain-old-data with the C layout of DkMoeRowsArgs (see moe_rows_args_layout).
unsafe impl DeviceRepr for MoeRowsArgs {}

/// Size and field offsets of [`MoeRouteArgs`], for the layout test against the C header.
#[doc(hidden)]
pub fn moe_route_args_layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    vec![
        ("sizeof", size_of::<MoeRouteArgs>()),
        ("logits", offset_of!(MoeRouteArgs, logits)),
        ("bias", offset_of!(MoeRouteArgs, bias)),
        ("expert_ids", offset_of!(MoeRouteArgs, expert_ids)),
        ("weights", offset_of!(MoeRouteArgs, weights)),
        ("counts", offset_of!(MoeRouteArgs, counts)),
        ("offsets", offset_of!(MoeRouteArgs, offsets)),
        ("perm", offset_of!(MoeRouteArgs, perm)),
        ("position", offset_of!(MoeRouteArgs, position)),
        ("chunk_counts", offset_of!(MoeRouteArgs, chunk_counts)),
        ("n", offset_of!(MoeRouteArgs, n)),
        ("logits_stride", offset_of!(MoeRouteArgs, logits_stride)),
        ("perm_rows", offset_of!(MoeRouteArgs, perm_rows)),
        ("e", offset_of!(MoeRouteArgs, e)),
        ("k", offset_of!(MoeRouteArgs, k)),
        ("score", offset_of!(MoeRouteArgs, score)),
        ("renormalize", offset_of!(MoeRouteArgs, renormalize)),
        ("n_groups", offset_of!(MoeRouteArgs, n_groups)),
        ("topk_groups", offset_of!(MoeRouteArgs, topk_groups)),
        ("capacity", offset_of!(MoeRouteArgs, capacity)),
        ("block", offset_of!(MoeRouteArgs, block)),
        ("chunks", offset_of!(MoeRouteArgs, chunks)),
        ("scale", offset_of!(MoeRouteArgs, scale)),
    ]
}

/// Size and field offsets of [`MoeRowsArgs`], for the layout test against the C header.
#[doc(hidden)]
pub fn moe_rows_args_layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    vec![
        ("sizeof", size_of::<MoeRowsArgs>()),
        ("src", offset_of!(MoeRowsArgs, src)),
        ("src2", offset_of!(MoeRowsArgs, src2)),
        ("index", offset_of!(MoeRowsArgs, index)),
        ("index2", offset_of!(MoeRowsArgs, index2)),
        ("weights", offset_of!(MoeRowsArgs, weights)),
        ("dst", offset_of!(MoeRowsArgs, dst)),
        ("dst2", offset_of!(MoeRowsArgs, dst2)),
        ("items", offset_of!(MoeRowsArgs, items)),
        ("h", offset_of!(MoeRowsArgs, h)),
        ("src_stride", offset_of!(MoeRowsArgs, src_stride)),
        ("src2_stride", offset_of!(MoeRowsArgs, src2_stride)),
        ("dst_stride", offset_of!(MoeRowsArgs, dst_stride)),
        ("k", offset_of!(MoeRowsArgs, k)),
        ("limit", offset_of!(MoeRowsArgs, limit)),
    ]
}

/// Every kernel of `cuda/moe.cu`, loaded when a CUDA context opens.
pub(crate) const KERNEL_NAMES: &[&str] = &[
    "dk_moe_topk_f32_p1",
    "dk_moe_topk_f32_p2",
    "dk_moe_topk_f32_p4",
    "dk_moe_topk_f32_p8",
    "dk_moe_topk_f32_p16",
    "dk_moe_topk_f32_p32",
    "dk_moe_topk_bf16_p1",
    "dk_moe_topk_bf16_p2",
    "dk_moe_topk_bf16_p4",
    "dk_moe_topk_bf16_p8",
    "dk_moe_topk_bf16_p16",
    "dk_moe_topk_bf16_p32",
    "dk_moe_scan",
    "dk_moe_assign",
    "dk_moe_permute_f32",
    "dk_moe_permute_bf16",
    "dk_moe_permute_f16",
    "dk_moe_perm_invert_f32",
    "dk_moe_perm_invert_bf16",
    "dk_moe_perm_invert_f16",
    "dk_moe_permute_tokens_f32",
    "dk_moe_permute_tokens_bf16",
    "dk_moe_permute_tokens_f16",
    "dk_moe_combine_f32",
    "dk_moe_combine_bf16",
    "dk_moe_combine_f16",
    "dk_moe_slot_dot_f32",
    "dk_moe_slot_dot_bf16",
    "dk_moe_slot_dot_f16",
    "dk_moe_combine_dot_f32",
    "dk_moe_combine_dot_bf16",
    "dk_moe_combine_dot_f16",
    "dk_moe_permute_dot_f32",
    "dk_moe_permute_dot_bf16",
    "dk_moe_permute_dot_f16",
];

/// Tokens per chunk of the counting pass (`DK_MOE_CHUNK`).
const CHUNK: usize = 32;
/// Threads per block of the top-k kernel (`kTopkWarps * 32`); one block per chunk.
const TOPK_THREADS: u32 = 256;
/// Threads per block of the scan (`kScanThreads`); one block per expert.
const SCAN_THREADS: u32 = 256;
/// Threads per block of the assignment (`kAssignThreads`) and slots (or perm rows) per thread
/// in the grid's size. One: each slot's loads (expert id, in-chunk rank, then the chunk's base
/// rank) form a dependent chain, and a thread that walks four slots waits for four chains in
/// turn; at four, Qwen3's 131072 slots made 128 blocks that took 8.4 us (ncu, H200).
const ASSIGN_THREADS: u32 = 256;
const ASSIGN_PER_THREAD: usize = 1;
/// Warps per block of the row movers (`kRowsThreads / 32`) and 8-element chunks per warp item
/// (`kSegChunks`).
const ROWS_THREADS: u32 = 256;
const ROWS_WARPS: usize = 8;
const SEG_CHUNKS: usize = 128;
/// Grid-stride loops cover the rest beyond this many blocks.
const MAX_BLOCKS: usize = 1 << 24;
/// Blocks of the token-major permute's fallback gather, which nearly always only reads a flag.
const FALLBACK_GATHER_BLOCKS: usize = 1024;

/// Workspace bytes of a route call: one int per (expert, 32-token chunk).
pub(crate) fn route_workspace_size(n: usize, e: usize, _k: usize) -> usize {
    // Saturating: a size past usize (a call the route refuses anyway) never wraps to a small one.
    4usize
        .saturating_mul(e)
        .saturating_mul(n.div_ceil(CHUNK))
        .checked_next_multiple_of(256)
        .unwrap_or(usize::MAX)
        .max(256)
}

/// Device workspace of the permute (`Context::moe_permute_workspace_size`): for k > 1 the
/// inverse of perm (one int per slot) and a flag (cuda/moe.cu, "Token-major permute"); none for
/// k = 1, whose gather needs no scratch.
pub(crate) fn permute_workspace_size(n: usize, k: usize) -> usize {
    if k > 1 && n > 0 {
        // Saturating, as the route's (the permute refuses N·k past i32 anyway).
        n.saturating_mul(k).saturating_add(1).saturating_mul(4)
    } else {
        0
    }
}

/// Checks a caller's workspace for int32 scratch of `need` bytes: this device, large enough,
/// 4-byte aligned. Nothing to check without one.
fn check_int_workspace(
    dev: &CudaDevice,
    launch: &Launch<'_>,
    need: usize,
    what: &str,
) -> Result<()> {
    dev.check_workspace(launch, need, 4, what)
}

/// The top-k kernel for `e` experts: lanes hold P = 32-expert slices (P a power of two).
fn topk_kernel_name(dtype: DType, e: usize) -> String {
    let p = e.div_ceil(32).next_power_of_two();
    format!("dk_moe_topk_{}_p{p}", dtype.name())
}

fn check_i32(what: &str, v: usize) -> Result<i32> {
    match i32::try_from(v) {
        Ok(x) => Ok(x),
        Err(_) => bail!(
            InvalidArgument,
            "{what} = {v} exceeds the CUDA kernels' 32-bit indices"
        ),
    }
}

fn launch_route(
    stream: &Arc<CudaStream>,
    f: &CudaFunction,
    args: &MoeRouteArgs,
    blocks: usize,
    threads: u32,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: MoeRouteArgs has the C layout of DkMoeRouteArgs, the kernels' only parameter;
    // every pointer in it is device memory of this device covering the validated shapes.
    unsafe { stream.launch_builder(f).arg(args).launch(cfg)? };
    Ok(())
}

/// Whether the route's scan and assignment are launched as programmatic dependents of the kernel
/// before them (compute capability 9.0): their blocks may then be scheduled while that kernel
/// drains, hiding two launch gaps of the three-kernel route. The kernels wait for the previous
/// grid themselves (`cuda/include/dk_pdl.cuh`). `DK_MOE_PDL=0` launches them plainly (A/B).
fn dependent_launch(dev: &CudaDevice) -> bool {
    // Exactly 9: newer cards run code compiled from compute_80 (sm_100 / sm_120 cubins, the
    // PTX), in which the kernels' waits are empty.
    dev.compute_capability().0 == 9 && crate::switches::value("DK_MOE_PDL") != Some("0")
}

/// [`launch_route`] with the programmatic stream serialization attribute (see
/// [`dependent_launch`]); a plain launch where that is off.
fn launch_route_dependent(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    f: &CudaFunction,
    args: &MoeRouteArgs,
    blocks: usize,
    threads: u32,
) -> Result<()> {
    if !dependent_launch(dev) {
        return launch_route(stream, f, args, blocks, threads);
    }
    // SAFETY: an all-zero CUlaunchAttribute is a valid (ignored) attribute; the id and its
    // value member are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = launch_config_1d(blocks as u32, threads, 0, stream.cu_stream(), &mut attr);
    let mut params = [args as *const MoeRouteArgs as *mut std::ffi::c_void];
    stream.context().bind_to_thread()?;
    // SAFETY: the kernel takes one DkMoeRouteArgs by value (params[0] points at it, alive for
    // the call); every pointer in it is device memory of this device covering the validated
    // shapes; the kernel waits for the previous grid before it reads or writes any of it.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()?;
    Ok(())
}

/// Queues the route (top-k, scan, assignment) on the caller's stream.
pub(crate) fn route(
    dev: &CudaDevice,
    raw: &RawRoute,
    params: &RouteParams,
    launch: &Launch<'_>,
) -> Result<()> {
    for (what, p) in [
        ("router logits", raw.logits as *const _),
        ("bias", raw.bias as *const _),
        ("expert_ids", raw.expert_ids as *const _),
        ("weights", raw.weights as *const _),
        ("counts", raw.counts as *const _),
        ("offsets", raw.offsets as *const _),
        ("perm", raw.perm as *const _),
        ("position", raw.position as *const _),
    ] {
        dev.check_pointer(what, p)?;
    }
    if !matches!(raw.logits_dtype, DType::F32 | DType::BF16) {
        bail!(
            UnsupportedDtype,
            "router logits must be f32 or bf16, got {}",
            raw.logits_dtype.name()
        );
    }
    let (n, e, k) = (raw.n, raw.e, params.k);
    // The kernels' limits (1024 experts: the assignment's shared offsets; 32 slots: one per lane).
    if e == 0 || e > MAX_EXPERTS || k == 0 || k > MAX_K {
        bail!(
            InvalidArgument,
            "E = {e}, k = {k}: the CUDA kernels take 1 <= E <= {MAX_EXPERTS}, 1 <= k <= {MAX_K}"
        );
    }
    check_i32("N·k", n.saturating_mul(k))?;
    check_i32(
        "the permuted rows bound",
        max_rows(n, e, k, params.block, params.capacity),
    )?;
    let chunks = n.div_ceil(CHUNK);

    let topk = dev.function(&topk_kernel_name(raw.logits_dtype, e))?;
    let scan = dev.function("dk_moe_scan")?;
    let assign = dev.function("dk_moe_assign")?;

    // SAFETY: the caller of the safe API handed a live stream of this device (Launch::on_stream
    // is unsafe for that reason), or null for the legacy default stream.
    let stream = unsafe { dev.borrow_stream(launch.stream) };
    let need = route_workspace_size(n, e, k);
    check_int_workspace(dev, launch, need, &format!("a route of N = {n}, E = {e}"))?;
    let (ws, owned) = dev.workspace(launch, &stream, need)?;

    let args = MoeRouteArgs {
        logits: raw.logits as u64,
        bias: raw.bias as u64,
        expert_ids: raw.expert_ids as u64,
        weights: raw.weights as u64,
        counts: raw.counts as u64,
        offsets: raw.offsets as u64,
        perm: raw.perm as u64,
        position: raw.position as u64,
        chunk_counts: ws,
        n: n as i64,
        logits_stride: raw.logits_stride as i64,
        perm_rows: raw.perm_rows as i64,
        e: e as i32,
        k: k as i32,
        score: match params.score {
            Score::Softmax => 0,
            Score::Sigmoid => 1,
        },
        renormalize: params.renormalize as i32,
        n_groups: params.n_groups as i32,
        topk_groups: params.topk_groups as i32,
        capacity: params
            .capacity
            .map_or(i32::MAX, |c| c.min(i32::MAX as usize) as i32),
        block: check_i32("block", params.block)?,
        chunks: chunks as i32,
        scale: params.scale,
    };
    if chunks > 0 {
        launch_route(&stream, topk, &args, chunks, TOPK_THREADS)?;
    }
    launch_route_dependent(dev, &stream, scan, &args, e, SCAN_THREADS)?;
    let per_block = ASSIGN_THREADS as usize * ASSIGN_PER_THREAD;
    let work = (n * k).max(raw.perm_rows).max(1);
    launch_route_dependent(
        dev,
        &stream,
        assign,
        &args,
        work.div_ceil(per_block).min(MAX_BLOCKS),
        ASSIGN_THREADS,
    )?;
    drop(owned); // stream-ordered free after the kernels that use it
    Ok(())
}

/// The kernels that hold a token's slots in lanes take at most 32; N·k must fit an i32.
fn check_slots_per_token(what: &str, n: usize, k: usize) -> Result<()> {
    if k > MAX_K {
        bail!(
            InvalidArgument,
            "k = {k}: the CUDA {what} takes at most 32 slots per token"
        );
    }
    check_i32("N·k", n.saturating_mul(k))?;
    Ok(())
}

/// Row starts must be 16-byte aligned for the kernels' vector loads and stores.
fn check_rows_alignment(h: usize, dtype: DType, mats: &[(&str, *const u8, usize)]) -> Result<()> {
    if h % 8 != 0 {
        bail!(
            InvalidArgument,
            "H = {h}: the CUDA kernels need a multiple of 8"
        );
    }
    for &(what, ptr, stride) in mats {
        if (ptr as usize) % 16 != 0 {
            bail!(
                InvalidArgument,
                "{what} is not 16-byte aligned (the CUDA kernels load 16 bytes at a time)"
            );
        }
        if (stride % 16) * dtype.size() % 16 != 0 {
            bail!(
                InvalidArgument,
                "{what} row stride {stride} ({}) is not a multiple of 16 bytes (the CUDA kernels load 16 bytes at a time)",
                dtype.name()
            );
        }
    }
    Ok(())
}

fn launch_rows(
    dev: &CudaDevice,
    launch: &Launch<'_>,
    name: &str,
    args: &MoeRowsArgs,
    warp_items: usize,
) -> Result<()> {
    let f = dev.function(name)?;
    // SAFETY: see `route`.
    let stream = unsafe { dev.borrow_stream(launch.stream) };
    let cfg = LaunchConfig {
        grid_dim: (warp_items.div_ceil(ROWS_WARPS).min(MAX_BLOCKS) as u32, 1, 1),
        block_dim: (ROWS_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: MoeRowsArgs has the C layout of DkMoeRowsArgs, the kernel's only parameter; every
    // pointer is device memory of this device covering the validated shapes, rows aligned.
    unsafe { stream.launch_builder(f).arg(args).launch(cfg)? };
    Ok(())
}

/// Warp items of a row mover: one per (row, 128-chunk segment).
fn segments(h: usize) -> usize {
    (h / 8).div_ceil(SEG_CHUNKS)
}

/// Queues the permute (gather into expert order) on the caller's stream.
pub(crate) fn permute(dev: &CudaDevice, raw: &RawPermute, launch: &Launch<'_>) -> Result<()> {
    for (what, p) in [
        ("x", raw.x as *const _),
        ("perm", raw.perm as *const _),
        ("weights", raw.weights as *const _),
        ("out", raw.out as *const _),
    ] {
        dev.check_pointer(what, p)?;
    }
    if raw.rows == 0 || raw.h == 0 {
        return Ok(());
    }
    check_rows_alignment(
        raw.h,
        raw.dtype,
        &[
            ("x", raw.x, raw.x_stride),
            ("out", raw.out as *const u8, raw.out_stride),
        ],
    )?;
    let slots = check_i32("N·k", raw.n.saturating_mul(raw.k))?;
    let mut args = MoeRowsArgs {
        src: raw.x as u64,
        src2: 0,
        index: raw.perm as u64,
        index2: 0,
        weights: raw.weights as u64,
        dst: raw.out as u64,
        dst2: 0,
        items: raw.rows as i64,
        h: raw.h as i64,
        src_stride: raw.x_stride as i64,
        src2_stride: 0,
        dst_stride: raw.out_stride as i64,
        k: check_i32("k", raw.k)?,
        limit: slots,
    };
    let t = raw.dtype.name();
    let gather = format!("dk_moe_permute_{t}");
    let need = permute_workspace_size(raw.n, raw.k);
    let what = format!("a permute of N·k = {slots} slots");
    // The caller's workspace is checked on every path, also where the gather needs none, so a
    // call is refused or not whatever the A/B switch.
    check_int_workspace(dev, launch, need, &what)?;
    if raw.k == 1 || slots == 0 || gather_forced() {
        // One slot per token: the gather reads every token row once already.
        return launch_rows(dev, launch, &gather, &args, raw.rows * segments(raw.h));
    }
    // k > 1: token-major (cuda/moe.cu, "Token-major permute"): the inverse of perm in scratch
    // memory (slots ints, preset -1, then a flag, preset 0), one read of each token row; the
    // gather runs only if perm turns out not to be a permutation (the flag).
    // Looked up before anything is queued (launch_rows looks them up again).
    dev.function(&format!("dk_moe_perm_invert_{t}"))?;
    dev.function(&format!("dk_moe_permute_tokens_{t}"))?;
    dev.function(&gather)?;
    // SAFETY: see `route`.
    let stream = unsafe { dev.borrow_stream(launch.stream) };
    // Checked above; preset below before any kernel reads it.
    let (ptr, scratch) = dev.workspace(launch, &stream, need)?;
    // SAFETY: `ptr` is at least 4 · (slots + 1) bytes of device memory of this device.
    unsafe {
        cudarc::driver::result::memset_d8_async(ptr, 0xff, 4 * slots as usize, stream.cu_stream())?;
        cudarc::driver::result::memset_d8_async(ptr + 4 * slots as u64, 0, 4, stream.cu_stream())?;
    }
    args.src2 = ptr;
    // One row per thread: warp items are groups of 32 rows.
    launch_rows(
        dev,
        launch,
        &format!("dk_moe_perm_invert_{t}"),
        &args,
        raw.rows.div_ceil(32),
    )?;
    launch_rows(
        dev,
        launch,
        &format!("dk_moe_permute_tokens_{t}"),
        &args,
        raw.n * segments(raw.h),
    )?;
    // The fallback gather reads the flag and returns unless perm was no permutation (misuse):
    // a capped grid (its loop strides over the rest) keeps that check cheap.
    let fallback_items = (raw.rows * segments(raw.h)).min(FALLBACK_GATHER_BLOCKS * ROWS_WARPS);
    launch_rows(dev, launch, &gather, &args, fallback_items)?;
    drop(scratch); // stream-ordered free after the kernels
    Ok(())
}

/// `DK_MOE_PERMUTE=gather` in the environment keeps the row-major gather for every k (A/B
/// measurements, or a way around the token-major path).
fn gather_forced() -> bool {
    crate::switches::value("DK_MOE_PERMUTE") == Some("gather")
}

/// Queues the combine (each token's weighted sum of its rows) on the caller's stream.
pub(crate) fn combine(dev: &CudaDevice, raw: &RawCombine, launch: &Launch<'_>) -> Result<()> {
    for (what, p) in [
        ("rows", raw.rows_in as *const _),
        ("position", raw.position as *const _),
        ("weights", raw.weights as *const _),
        ("y", raw.y as *const _),
    ] {
        dev.check_pointer(what, p)?;
    }
    if raw.n == 0 || raw.h == 0 {
        return Ok(());
    }
    check_slots_per_token("combine", raw.n, raw.k)?;
    check_rows_alignment(
        raw.h,
        raw.dtype,
        &[
            ("rows", raw.rows_in, raw.rows_stride),
            ("y", raw.y as *const u8, raw.y_stride),
        ],
    )?;
    let args = MoeRowsArgs {
        src: raw.rows_in as u64,
        src2: 0,
        index: raw.position as u64,
        index2: 0,
        weights: raw.weights as u64,
        dst: raw.y as u64,
        dst2: 0,
        items: raw.n as i64,
        h: raw.h as i64,
        src_stride: raw.rows_stride as i64,
        src2_stride: 0,
        dst_stride: raw.y_stride as i64,
        k: raw.k as i32,
        limit: raw.rows.min(i32::MAX as usize) as i32,
    };
    let name = format!("dk_moe_combine_{}", raw.dtype.name());
    // k = 1: a warp takes two (token, segment) items (cuda/moe.cu `combine_top1`).
    let items = raw.n * segments(raw.h);
    let warp_items = if raw.k == 1 { items.div_ceil(2) } else { items };
    launch_rows(dev, launch, &name, &args, warp_items)
}

/// Queues the per-slot dot products on the caller's stream.
pub(crate) fn slot_dot(dev: &CudaDevice, raw: &RawSlotDot, launch: &Launch<'_>) -> Result<()> {
    for (what, p) in [
        ("tokens", raw.tokens as *const _),
        ("rows", raw.rows_in as *const _),
        ("position", raw.position as *const _),
        ("out", raw.out as *const _),
    ] {
        dev.check_pointer(what, p)?;
    }
    let slots = raw.n.saturating_mul(raw.k);
    if slots == 0 {
        return Ok(());
    }
    if raw.h > 0 {
        check_rows_alignment(
            raw.h,
            raw.dtype,
            &[
                ("tokens", raw.tokens, raw.tokens_stride),
                ("rows", raw.rows_in, raw.rows_stride),
            ],
        )?;
    }
    check_i32("N·k", slots)?;
    let args = MoeRowsArgs {
        src: raw.tokens as u64,
        src2: raw.rows_in as u64,
        index: raw.position as u64,
        index2: 0,
        weights: 0,
        dst: raw.out as u64,
        dst2: 0,
        items: slots as i64,
        h: raw.h as i64,
        src_stride: raw.tokens_stride as i64,
        src2_stride: raw.rows_stride as i64,
        dst_stride: 0,
        k: raw.k as i32,
        limit: raw.rows.min(i32::MAX as usize) as i32,
    };
    let name = format!("dk_moe_slot_dot_{}", raw.dtype.name());
    launch_rows(dev, launch, &name, &args, slots)
}

/// `DK_MOE_BACKWARD=primitives` in the environment runs the backward passes as their two
/// primitives (A/B measurements of the fused kernels).
fn backward_primitives() -> bool {
    crate::switches::value("DK_MOE_BACKWARD") == Some("primitives")
}

/// Queues the gradients of a permute: without the weights' gradient the combine; with it
/// `dk_moe_combine_dot_*`, a warp per token reading each row of grad_xp once for both outputs.
pub(crate) fn permute_backward(
    dev: &CudaDevice,
    raw: &RawPermuteBackward,
    launch: &Launch<'_>,
) -> Result<()> {
    let Some(dot) = &raw.dot else {
        return combine(dev, &raw.combine, launch);
    };
    let c = &raw.combine;
    // Every pointer checked before anything is queued, on both paths.
    for (what, p) in [
        ("grad_xp", c.rows_in as *const _),
        ("position", c.position as *const _),
        ("weights", c.weights as *const _),
        ("grad_x", c.y as *const _),
        ("x", dot.tokens as *const _),
        ("grad_weights", dot.out as *const _),
    ] {
        dev.check_pointer(what, p)?;
    }
    if backward_primitives() {
        combine(dev, c, launch)?;
        return slot_dot(dev, dot, launch);
    }
    check_slots_per_token("backward", c.n, c.k)?;
    check_rows_alignment(
        c.h,
        c.dtype,
        &[
            ("grad_xp", c.rows_in, c.rows_stride),
            ("grad_x", c.y as *const u8, c.y_stride),
            ("x", dot.tokens, dot.tokens_stride),
        ],
    )?;
    let args = MoeRowsArgs {
        src: c.rows_in as u64,
        src2: dot.tokens as u64,
        index: c.position as u64,
        index2: 0,
        weights: c.weights as u64,
        dst: c.y as u64,
        dst2: dot.out as u64,
        items: c.n as i64,
        h: c.h as i64,
        src_stride: c.rows_stride as i64,
        src2_stride: dot.tokens_stride as i64,
        dst_stride: c.y_stride as i64,
        k: c.k as i32,
        limit: c.rows.min(i32::MAX as usize) as i32,
    };
    let name = format!("dk_moe_combine_dot_{}", c.dtype.name());
    launch_rows(dev, launch, &name, &args, c.n)
}

/// Queues the gradients of a combine. With the weights' gradient: `dk_moe_permute_dot_*`, a warp
/// per token (its row of grad_y read once for all of its slots, their rows of grad_expert_out
/// and their dots) and a warp per 32 rows for the padding, in one launch and without workspace.
/// Without it: the permute.
pub(crate) fn combine_backward(
    dev: &CudaDevice,
    raw: &RawCombineBackward,
    launch: &Launch<'_>,
) -> Result<()> {
    let p = &raw.permute;
    let Some(dot) = &raw.dot else {
        // Nothing to fuse: the permute (token-major for k > 1, measured at 87-94 % of its floor).
        return permute(dev, p, launch);
    };
    // Every pointer checked before anything is queued, on both paths.
    for (what, ptr) in [
        ("grad_y", p.x as *const _),
        ("perm", p.perm as *const _),
        ("position", raw.position as *const _),
        ("weights", p.weights as *const _),
        ("grad_expert_out", p.out as *const _),
        ("expert_out", dot.rows_in as *const _),
        ("grad_weights", dot.out as *const _),
    ] {
        dev.check_pointer(what, ptr)?;
    }
    if backward_primitives() {
        permute(dev, p, launch)?;
        return slot_dot(dev, dot, launch);
    }
    // The fused kernel needs no scratch; a caller's workspace is checked as the permute checks
    // it, so a call is refused or not whatever the A/B switch.
    check_int_workspace(
        dev,
        launch,
        permute_workspace_size(p.n, p.k),
        &format!("a combine backward of N·k = {}·{} slots", p.n, p.k),
    )?;
    check_slots_per_token("backward", p.n, p.k)?;
    check_rows_alignment(
        p.h,
        p.dtype,
        &[
            ("grad_y", p.x, p.x_stride),
            ("grad_expert_out", p.out as *const u8, p.out_stride),
            ("expert_out", dot.rows_in, dot.rows_stride),
        ],
    )?;
    let args = MoeRowsArgs {
        src: p.x as u64,
        src2: dot.rows_in as u64,
        index: raw.position as u64,
        index2: p.perm as u64,
        weights: p.weights as u64,
        dst: p.out as u64,
        dst2: dot.out as u64,
        items: p.n as i64,
        h: p.h as i64,
        src_stride: p.x_stride as i64,
        src2_stride: dot.rows_stride as i64,
        dst_stride: p.out_stride as i64,
        k: p.k as i32,
        limit: check_i32("permuted rows", p.rows)?,
    };
    let name = format!("dk_moe_permute_dot_{}", p.dtype.name());
    launch_rows(dev, launch, &name, &args, p.n + p.rows.div_ceil(32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_kernel_for_every_expert_count_is_listed() {
        for dtype in [DType::F32, DType::BF16] {
            for e in 1..=1024 {
                let name = topk_kernel_name(dtype, e);
                assert!(KERNEL_NAMES.contains(&name.as_str()), "{name} (E = {e})");
                let p: usize = name.rsplit('p').next().unwrap().parse().unwrap();
                assert!(32 * p >= e && (p == 1 || 16 * p < e), "E = {e} -> P = {p}");
            }
        }
    }

    #[test]
    fn workspace_covers_every_chunk() {
        assert_eq!(route_workspace_size(1, 1, 1), 256);
        assert_eq!(route_workspace_size(16384, 128, 8), 4 * 128 * 512);
        assert!(route_workspace_size(33, 1024, 8) >= 4 * 1024 * 2);
    }

    #[test]
    fn layouts_are_c_like() {
        let route = moe_route_args_layout();
        assert_eq!(route[0], ("sizeof", 136));
        let rows = moe_rows_args_layout();
        assert_eq!(rows[0], ("sizeof", 104));
    }
}
