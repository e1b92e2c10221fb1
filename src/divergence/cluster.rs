//! The Hopper path of the divergence row kernel (`cuda/divergence_cluster.cu`): one
//! thread-block cluster per row, each block owning a slice of the row, so that the later passes
//! find the row on chip (in L2 for the stream variant, in shared memory for the smem variant).
//! Since the H100 runs (cuda/DIVERGENCE.md, version 4) it serves short batches only, on the
//! stream variant; `src/divergence/cuda.rs` decides. The persistent variants
//! (`cuda/divergence_persistent.cu`, `cuda/divergence_staged.cu`: resident clusters that walk
//! many rows) are opt-in. This file chooses the variant and the cluster size and launches with
//! `cuLaunchKernelEx` (cudarc's launch builder has no cluster attribute).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaStream};

use super::cuda::DivergenceArgs;
use crate::device::launch_config_1d;
use crate::error::{Error, ErrorKind, Result};

/// Threads per cluster block (`kClusterThreads` in divergence_cluster.cu; the persistent
/// kernels' 512-thread shape too).
const CLUSTER_THREADS: u32 = 512;
/// Cluster sizes tried, smallest first; 16 is Hopper's non-portable maximum.
const CLUSTER_SIZES: [usize; 5] = [1, 2, 4, 8, 16];
/// Slice bytes (both inputs) that let two blocks share an SM (228 KB of shared memory each).
const TWO_PER_SM_BYTES: usize = 100 * 1024;
/// The most dynamic shared memory one block may use (227 KB opt-in minus the static slots).
const MAX_SLICE_BYTES: usize = 220 * 1024;
/// Grids smaller than this many blocks leave SMs idle (132 SMs × 2): short batches split rows
/// over more blocks.
pub(crate) const MIN_BLOCKS: usize = 264;
/// From this many rows the one-block kernel (256 threads, six blocks per SM) has at least four
/// blocks per SM and beats both cluster variants: at N = 4096 it ran forward KL fwd+bwd at 58 %
/// of the floor against 47–49 %, JSD at 42 % against 35–37 % (H100, 2026-11-26). Below it,
/// rows are split over clusters (N = 256: 41 %).
pub(crate) const ONE_BLOCK_MIN_ROWS: usize = 512;
/// Slices are not split below this many elements (a block must have work for its 512 threads).
const MIN_SLICE: usize = 4096;

/// Stream variant: the largest slice (bytes of both inputs) a block streams. The slices in
/// flight (132 SMs x 2 blocks x this) stay well inside the 50 MB L2, so the passes after the
/// first hit it.
const STREAM_SLICE_BYTES: usize = 80 * 1024;

/// Which Hopper kernel serves the rows (A/B measurements choose with `DK_DIVERGENCE_CLUSTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// `dk_divcs_*`: each block streams its slice from global memory, later passes from L2.
    Stream,
    /// `dk_divc_*`: each block holds its slice in shared memory.
    Smem,
    /// `dk_divcp_*` (cuda/divergence_persistent.cu): resident clusters that walk many rows,
    /// the passes of successive rows in one loop; blocks of 512 threads. Opt-in until measured
    /// on a GPU.
    Persistent,
    /// `dk_divcp256_*`: the same with blocks of 256 threads, each with two steps of loads in
    /// flight (twice the chunks per thread between two row reductions).
    Persistent256,
    /// `dk_divcq_*` (cuda/divergence_staged.cu): resident clusters whose blocks hold their slice
    /// of two rows in shared memory, copying the next row while they compute the current one
    /// (sized by [`staged_grid`]). Opt-in until measured on a GPU.
    Staged,
}

impl Variant {
    /// The kernel name prefix (replacing the one-block kernel's `dk_div_`).
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Variant::Stream => "dk_divcs_",
            Variant::Smem => "dk_divc_",
            Variant::Persistent => "dk_divcp_",
            Variant::Persistent256 => "dk_divcp256_",
            Variant::Staged => "dk_divcq_",
        }
    }

    /// Threads per block of the variant's kernels.
    pub(crate) fn threads(self) -> u32 {
        match self {
            Variant::Persistent256 => 256,
            _ => CLUSTER_THREADS,
        }
    }

    /// Whether it is one of the persistent variants (sized by [`persistent_grid`]).
    pub(crate) fn persistent(self) -> bool {
        matches!(self, Variant::Persistent | Variant::Persistent256)
    }
}

/// `DK_DIVERGENCE_CLUSTER`, read once: `0` turns the cluster path off (one block per row);
/// `smem`, `stream`, `persist`, `persist256` or `staged` runs every aligned call on that variant,
/// whatever the number of rows (A/B measurements); unset, the stream variant for short batches
/// only (any other value is refused when the context opens: `crate::switches`). Returns the variant, if any, and whether it was named.
fn env_choice() -> (Option<Variant>, bool) {
    match crate::switches::value("DK_DIVERGENCE_CLUSTER") {
        Some("0") => (None, false),
        Some("smem") => (Some(Variant::Smem), true),
        Some("stream") => (Some(Variant::Stream), true),
        Some("persist") => (Some(Variant::Persistent), true),
        Some("persist256") => (Some(Variant::Persistent256), true),
        Some("staged") => (Some(Variant::Staged), true),
        _ => (Some(Variant::Stream), false),
    }
}

/// Whether `DK_DIVERGENCE_CLUSTER` names a variant (`smem`, `stream`, `persist`,
/// `persist256`, `staged`): the cluster path then serves long batches too.
pub(crate) fn forced_by_env() -> bool {
    env_choice().1
}

/// `DK_DIVERGENCE_CLUSTER_SIZE=<1|2|4|8|16>`: forces the stream, persistent and staged variants'
/// cluster size (A/B measurements); any other value is refused when the context opens
/// (`crate::switches`).
fn forced_size() -> Option<usize> {
    crate::switches::value("DK_DIVERGENCE_CLUSTER_SIZE")
        .and_then(|v| v.parse().ok())
        .filter(|c| CLUSTER_SIZES.contains(c))
}

/// The distinct Hopper cluster launch shapes of this process (kernel name, cluster size, grid),
/// for [`launch_shapes`]; at most [`MAX_SHAPES`] are kept.
static SHAPES: Mutex<Vec<String>> = Mutex::new(Vec::new());
const MAX_SHAPES: usize = 32;

/// Records a queued cluster launch shape (once per distinct description), and what the staged
/// JSD kernel kept between its passes ([`Stash`]).
fn note_shape(kernel: &str, (c, clusters): (usize, usize), args: &DivergenceArgs) {
    let (n, v) = (args.n, args.v);
    use super::cuda::{STASH_JSD, STASH_JSD_EXP};
    let stash = if args.options & STASH_JSD_EXP != 0 {
        ", exponentials and log2(q/m) kept"
    } else if args.options & STASH_JSD != 0 {
        ", log2(q/m) kept for the gradient"
    } else {
        ""
    };
    let what = format!("{kernel}: {clusters} clusters of {c} blocks for {n} rows of {v}{stash}");
    let mut shapes = SHAPES.lock().unwrap_or_else(|p| p.into_inner());
    if shapes.len() < MAX_SHAPES && !shapes.contains(&what) {
        shapes.push(what);
    }
}

/// The distinct cluster launch shapes this process queued (e.g. `dk_divcp_fkl_bf16_bf16: 33
/// clusters of 8 blocks for 4096 rows of 151936`), first 32: which Hopper kernel and cluster
/// size served the divergence rows (the one-block kernel is not listed). Benchmarks print them,
/// so that an A/B run says what it measured.
pub fn launch_shapes() -> Vec<String> {
    SHAPES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The first refused cluster launch of this process (the call then ran the one-block kernel).
static FALLBACK: Mutex<Option<String>> = Mutex::new(None);

/// Records why the cluster path was not taken (kept: the first reason) for [`fallback_reason`].
pub(crate) fn note_fallback(why: String) {
    let mut slot = FALLBACK.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        *slot = Some(why);
    }
}

/// [`note_fallback`] for a refused launch.
pub(crate) fn note_refused_launch(c: usize, smem: usize, err: &Error) {
    note_fallback(format!(
        "a cluster of {c} blocks with {smem} bytes of shared memory each was refused ({err}); \
         such rows run the one-block kernel"
    ));
}

/// Why the Hopper cluster kernel was not used in this process where it would have been, if
/// that happened: the driver may refuse a cluster shape the card cannot place (e.g. 16 blocks of
/// one SM each on a card with smaller GPCs), or the kernels' attributes when a device opens. The
/// calls still complete, on the one-block-per-row kernel, so the results are right and only the
/// speed differs; benchmarks print this reason.
pub fn fallback_reason() -> Option<String> {
    FALLBACK.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Whether the cluster kernels may be used on a device of this compute capability: the sm_90
/// family only, the one the fatbin has an sm_90a cubin for. A newer card runs code compiled from
/// compute_80 (the sm_100 / sm_120 cubins or the PTX), where these kernels are empty (their body
/// is sm_90a's), so they would write nothing; the one-block kernel serves those cards.
pub(crate) fn available(compute_capability: (i32, i32)) -> Option<Variant> {
    if compute_capability.0 == 9 {
        env_choice().0
    } else {
        None
    }
}

/// Elements of the row each cluster block holds (`cluster_slice` in dk_divergence_math.cuh).
pub(crate) fn slice(v: usize, c: usize) -> usize {
    v.div_ceil(c).next_multiple_of(8)
}

/// The cluster size of `variant` for `n` rows of `v` elements with `elem_bytes` bytes per element
/// pair, or None when the one-block kernel should run instead.
pub(crate) fn cluster_size(
    variant: Variant,
    n: usize,
    v: usize,
    elem_bytes: usize,
) -> Option<usize> {
    match variant {
        Variant::Smem => smem_cluster_size(n, v, elem_bytes),
        Variant::Stream => {
            Some(forced_size().unwrap_or_else(|| stream_cluster_size(n, v, elem_bytes)))
        }
        // Sized with the device's occupancy (and L2): persistent_grid, staged_grid.
        Variant::Persistent | Variant::Persistent256 | Variant::Staged => None,
    }
}

/// Persistent variant: the fraction of L2 that the bytes touched between a row's first read and
/// its last re-read may fill (the rest is left to the other traffic and to imperfect LRU).
const PERSISTENT_L2_SHARE: f64 = 0.6;

/// Persistent variant: the smallest cluster size (2 to 16) whose pipeline keeps every re-read in
/// L2. A row read in iteration i is re-read `lag` iterations later (1 for the KL kinds, 2 for
/// JSD); meanwhile every resident cluster reads one new row pair and writes one gradient row
/// per iteration, so the re-read distance is `lag × clusters × v × (pair + grad bytes)`.
/// `resident(c)` is how many clusters of `c` blocks fit the card at once (sizes it cannot place
/// are skipped). Falls back to the largest placeable size when none fits (the longest f32 rows:
/// their re-reads then partly miss).
pub(crate) fn persistent_cluster_size(
    v: usize,
    pair_bytes: usize,
    grad_bytes: usize,
    lag: usize,
    l2_bytes: usize,
    resident: impl Fn(usize) -> usize,
) -> usize {
    let per_cluster = (v * (pair_bytes + grad_bytes)) as f64;
    let budget = l2_bytes as f64 * PERSISTENT_L2_SHARE;
    let placeable: Vec<(usize, usize)> = CLUSTER_SIZES[1..]
        .iter()
        .map(|&c| (c, resident(c)))
        .filter(|&(_, k)| k > 0)
        .collect();
    placeable
        .iter()
        .find(|&&(_, k)| (lag * k) as f64 * per_cluster <= budget)
        .or(placeable.last())
        .map_or(16, |&(c, _)| c)
}

/// Dynamic shared memory of a persistent-kernel block: its reduction scratch and cluster slots
/// (`ClusterScratch`, `kClusterScratchBytes` in cuda/include/dk_divergence_cluster.cuh).
pub(crate) const PERSISTENT_SMEM_BYTES: usize = 1024;

/// Blocks per SM the persistent variants aim at: each SM then holds blocks of two clusters, so
/// one's barrier waits are covered by the other's loads, and no more (more clusters would mean
/// more rows in flight, hence larger clusters and fewer chunks per thread between reductions).
const PERSISTENT_BLOCKS_PER_SM: usize = 2;

/// A persistent variant's cluster size ([`persistent_cluster_size`], or
/// `DK_DIVERGENCE_CLUSTER_SIZE`) and number of clusters (as many as fit the card at once, at
/// most [`PERSISTENT_BLOCKS_PER_SM`] blocks per SM and one cluster per row). None when the card
/// cannot place a cluster of that size.
pub(crate) fn persistent_grid(
    f: &CudaFunction,
    stream: &Arc<CudaStream>,
    variant: Variant,
    (n, v): (usize, usize),
    (student_bytes, teacher_bytes): (usize, usize),
    lag: usize,
    (l2_bytes, sm_count): (usize, usize),
) -> Result<Option<(usize, usize)>> {
    stream.context().bind_to_thread()?;
    let resident = |c: usize| {
        max_active_clusters(f, variant.threads(), c, PERSISTENT_SMEM_BYTES)
            .min(PERSISTENT_BLOCKS_PER_SM * sm_count / c)
    };
    let pair = student_bytes + teacher_bytes;
    let c = forced_size().unwrap_or_else(|| {
        persistent_cluster_size(v, pair, student_bytes, lag, l2_bytes, resident)
    });
    let clusters = resident(c).min(n);
    Ok((clusters > 0).then_some((c, clusters)))
}

/// The most dynamic shared memory a Hopper block may opt in to (227 KB); the staged kernels are
/// configured for it.
const STAGED_MAX_SMEM: usize = 227 * 1024;

/// Where the staged JSD kernels keep each entry's log2(q/m) from the mixture pass for the
/// gradient pass (`DK_ARGS_STASH_JSD`; cuda/DIVERGENCE.md, version 10): the gradient pass then
/// spends one exponential per element instead of two exponentials and a logarithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stash {
    /// Not kept: the gradient pass forms it again (the KL kinds, forward only,
    /// `DK_DIVERGENCE_JSD_STASH=0`, or rows whose stash fits no cluster).
    Off,
    /// Over the teacher's slice of the row, when the teacher logits are f32 (no extra memory).
    OverTeacher,
    /// In an f32 slice of its own after the two row buffers (16-bit teacher logits).
    Slice,
    /// Version 11 (`DK_DIVERGENCE_JSD_STASH=exp`, `DK_ARGS_STASH_JSD_EXP`): the statistics pass
    /// also keeps each entry's two exponentials, in two f32 slices after the row buffers
    /// (log2(q/m) then over the first): no MUFU operation for p and q in the mixture pass, none
    /// in the gradient pass, for 8 bytes per slice element and one more pass over the slice
    /// (the thread's maxima first). Forward only too (version 12): the mixture pass alone
    /// spares its two exponentials per element.
    Exp,
}

impl Stash {
    /// The stash of a staged launch: for JSD (`jsd`), [`Stash::Exp`] under
    /// `DK_DIVERGENCE_JSD_STASH=exp`, with a gradient (`grad`) or without; else with a gradient
    /// log2(q/m) unless `DK_DIVERGENCE_JSD_STASH=0`, over the teacher's slice when its elements
    /// are 4 bytes; nothing for the KL kinds or a forward-only JSD by default.
    pub(crate) fn for_rows(jsd: bool, grad: bool, teacher_bytes: usize) -> Stash {
        match crate::switches::value("DK_DIVERGENCE_JSD_STASH") {
            _ if !jsd => Stash::Off,
            Some("0") => Stash::Off,
            Some("exp") => Stash::Exp,
            _ if grad => Stash::log_ratio_for(teacher_bytes),
            _ => Stash::Off,
        }
    }

    /// Version 10's stash for teacher elements of `teacher_bytes`.
    fn log_ratio_for(teacher_bytes: usize) -> Stash {
        if teacher_bytes == 4 {
            Stash::OverTeacher
        } else {
            Stash::Slice
        }
    }

    /// What to try where this stash fits no cluster: [`Stash::Exp`] falls back to version 10's
    /// with a gradient (`grad`) and to none without (log2(q/m) serves only the gradient
    /// pass), version 10's to none; None where nothing smaller exists (the rows fit no cluster
    /// at all).
    pub(crate) fn smaller(self, grad: bool, teacher_bytes: usize) -> Option<Stash> {
        match self {
            Stash::Exp if grad => Some(Stash::log_ratio_for(teacher_bytes)),
            Stash::Exp | Stash::Slice => Some(Stash::Off),
            Stash::OverTeacher | Stash::Off => None,
        }
    }

    /// Shared memory per slice element beyond the row buffers.
    pub(crate) fn bytes(self) -> usize {
        match self {
            Stash::Exp => 8,
            Stash::Slice => 4,
            Stash::Off | Stash::OverTeacher => 0,
        }
    }

    /// The kernel arguments' `options` bits.
    pub(crate) fn options(self) -> u32 {
        use super::cuda::{STASH_JSD, STASH_JSD_EXP};
        match self {
            Stash::Off => 0,
            Stash::OverTeacher | Stash::Slice => STASH_JSD,
            Stash::Exp => STASH_JSD | STASH_JSD_EXP,
        }
    }
}

/// Staged variant: a block's dynamic shared memory for rows of `v` elements with `pair_bytes`
/// bytes per (student, teacher) element pair in clusters of `c`: the persistent kernels' scratch
/// ([`PERSISTENT_SMEM_BYTES`]), then two buffers of its slice of both inputs, then the JSD
/// stash's own slices where it has them ([`Stash::bytes`]: [`Stash::Slice`], [`Stash::Exp`]).
pub(crate) fn staged_smem_bytes(v: usize, c: usize, pair_bytes: usize, stash: Stash) -> usize {
    PERSISTENT_SMEM_BYTES + slice(v, c) * (2 * pair_bytes + stash.bytes())
}

/// Staged variant: the smallest cluster size whose blocks hold two rows' slices (and the
/// stash), doubled (up to 8) while `n` rows give fewer clusters than `sm_count / c` (a short
/// batch leaves SMs idle) and slices stay at least [`MIN_SLICE`] long. None when even 16 blocks
/// cannot hold them (f32 pairs past V = 231424): the one-block kernel serves those.
pub(crate) fn staged_cluster_size(
    n: usize,
    v: usize,
    pair_bytes: usize,
    stash: Stash,
    sm_count: usize,
) -> Option<usize> {
    let mut c = CLUSTER_SIZES
        .into_iter()
        .find(|&c| staged_smem_bytes(v, c, pair_bytes, stash) <= STAGED_MAX_SMEM)?;
    while n * c < sm_count && c < 8 && slice(v, 2 * c) >= MIN_SLICE {
        c *= 2;
    }
    Some(c)
}

/// A staged launch's shape: cluster size, clusters, dynamic shared memory per block, and the
/// stash it has room for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StagedShape {
    pub c: usize,
    pub clusters: usize,
    pub smem: usize,
    pub stash: Stash,
}

/// The staged variant's shape ([`staged_choice`] on this card, under
/// `DK_DIVERGENCE_CLUSTER_SIZE`): cluster size, clusters (as many as the card runs at once, at
/// most one per row), shared memory per block and stash. `stash`: the stash asked for and
/// whether the launch has a gradient pass (which decides the smaller stashes to fall back to,
/// [`Stash::smaller`]). None when no size and stash fit the rows or the card places no cluster
/// of those that do.
pub(crate) fn staged_grid(
    f: &CudaFunction,
    stream: &Arc<CudaStream>,
    (n, v): (usize, usize),
    elem_bytes: (usize, usize),
    stash: (Stash, bool),
    sm_count: usize,
) -> Result<Option<StagedShape>> {
    stream.context().bind_to_thread()?;
    let placed = |c: usize, smem: usize| max_active_clusters(f, Variant::Staged.threads(), c, smem);
    let forced = forced_size();
    Ok(staged_choice(
        (n, v),
        elem_bytes,
        stash,
        (sm_count, forced),
        placed,
    ))
}

/// [`staged_grid`]'s choice, with `placed(c, smem)` the clusters of that shape the card runs at
/// once and `grad` whether the launch has a gradient pass. Candidates, in order, each taken
/// where its shared memory fits and the card places at least one cluster of it: the forced
/// size (`DK_DIVERGENCE_CLUSTER_SIZE`) with the stash asked for, then with each smaller one
/// ([`Stash::smaller`]: an A/B of the cluster size keeps its size); then the first size that
/// holds the rows ([`staged_cluster_size`]) with the stash asked for, then with each smaller
/// one (so a card that cannot place a 16-block cluster still gets the smaller stash at 8).
/// None when no candidate runs.
fn staged_choice(
    (n, v): (usize, usize),
    (student_bytes, teacher_bytes): (usize, usize),
    (stash, grad): (Stash, bool),
    (sm_count, forced): (usize, Option<usize>),
    placed: impl Fn(usize, usize) -> usize,
) -> Option<StagedShape> {
    let pair_bytes = student_bytes + teacher_bytes;
    let chain = std::iter::successors(Some(stash), |s| s.smaller(grad, teacher_bytes));
    let at_forced = chain.clone().filter_map(|s| forced.map(|c| (c, s)));
    let own =
        chain.filter_map(|s| staged_cluster_size(n, v, pair_bytes, s, sm_count).map(|c| (c, s)));
    at_forced.chain(own).find_map(|(c, stash)| {
        let smem = staged_smem_bytes(v, c, pair_bytes, stash);
        let clusters = if smem <= STAGED_MAX_SMEM {
            placed(c, smem).min(n)
        } else {
            0
        };
        (clusters > 0).then_some(StagedShape {
            c,
            clusters,
            smem,
            stash,
        })
    })
}

/// How many clusters of `c` blocks of `f` (`threads` threads and `smem` bytes of dynamic shared
/// memory each) the device runs at once (`cuOccupancyMaxActiveClusters`;
/// GPC sizes limit the larger clusters), 0 when it cannot place one. Cached per function, size
/// and shared memory: the answer does not change while the process runs.
fn max_active_clusters(f: &CudaFunction, threads: u32, c: usize, smem: usize) -> usize {
    /// (function, cluster size, shared memory) → clusters.
    type Cache = Mutex<HashMap<(usize, usize, usize), usize>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = (f.cu_function() as usize, c, smem);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(&k) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return k;
    }
    let mut attr = cluster_attribute(c);
    let config = launch_config_1d(c as u32, threads, smem, std::ptr::null_mut(), &mut attr);
    let mut count: std::ffi::c_int = 0;
    // SAFETY: `config` and the attribute it points at live for the call; `count` is a valid
    // out-pointer; the function belongs to the current context (its device opened it).
    let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut count, f.cu_function(), &config) };
    let k = if r == sys::CUresult::CUDA_SUCCESS {
        count.max(0) as usize
    } else {
        0
    };
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, k);
    k
}

/// The launch attribute that sets a cluster of `c` blocks along x.
fn cluster_attribute(c: usize) -> sys::CUlaunchAttribute {
    // SAFETY: an all-zero CUlaunchAttribute is a valid (ignored) attribute; the id and the
    // clusterDim member are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
        x: c as u32,
        y: 1,
        z: 1,
    };
    attr
}

/// Stream variant: the smallest cluster whose slices fit [`STREAM_SLICE_BYTES`] (8 at most:
/// longer rows stream larger slices), doubled while a short batch leaves SMs idle. Never 16:
/// 16-block clusters ran at 21 % of the floor where 8 ran at 47 % (H100, forward KL, V 151936).
fn stream_cluster_size(n: usize, v: usize, elem_bytes: usize) -> usize {
    const MAX: usize = 8;
    let mut c = CLUSTER_SIZES
        .into_iter()
        .take_while(|&c| c <= MAX)
        .find(|&c| slice(v, c) * elem_bytes <= STREAM_SLICE_BYTES)
        .unwrap_or(MAX);
    while n * c < MIN_BLOCKS && c < MAX && slice(v, 2 * c) >= MIN_SLICE {
        c *= 2;
    }
    c
}

/// Smem variant: the smallest cluster that holds the row two blocks per SM, else one per SM;
/// None when even 16 blocks cannot hold it.
fn smem_cluster_size(n: usize, v: usize, elem_bytes: usize) -> Option<usize> {
    let fits = |c: usize, budget: usize| slice(v, c) * elem_bytes <= budget;
    let mut c = CLUSTER_SIZES
        .into_iter()
        .find(|&c| fits(c, TWO_PER_SM_BYTES))
        .or_else(|| {
            CLUSTER_SIZES
                .into_iter()
                .find(|&c| fits(c, MAX_SLICE_BYTES))
        })?;
    while n * c < MIN_BLOCKS && c < 8 && slice(v, 2 * c) >= MIN_SLICE {
        c *= 2;
    }
    Some(c)
}

/// Whether every row start of the call is 16-byte aligned (the kernel copies with cp.async).
pub(crate) fn rows_aligned(
    args: &DivergenceArgs,
    student_bytes: usize,
    teacher_bytes: usize,
) -> bool {
    let ok = |ptr: u64, stride: i64, elem: usize| {
        ptr % 16 == 0 && (stride as u64 % 16) * elem as u64 % 16 == 0
    };
    ok(args.student, args.student_stride, student_bytes)
        && ok(args.teacher, args.teacher_stride, teacher_bytes)
        && (args.grad == 0 || ok(args.grad, args.grad_stride, student_bytes))
}

/// Opts the cluster kernels in to their shared memory and to 16-block clusters, once when a
/// device opens (not per launch): a fixed cap, so launches of any size from any thread fit it.
/// The staged kernels' cap is the device's opt-in limit (`smem_optin` bytes) where that is below
/// [`STAGED_MAX_SMEM`]: their larger launches are then refused and noted, not the device's
/// cluster kernels as a whole.
pub(crate) fn configure(
    functions: &HashMap<&'static str, CudaFunction>,
    smem_optin: usize,
) -> Result<()> {
    use sys::CUfunction_attribute_enum as Attr;
    for (name, f) in functions {
        if name.starts_with("dk_divc_") {
            f.set_attribute(
                Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                MAX_SLICE_BYTES as i32,
            )?;
        }
        if name.starts_with("dk_divcq_") {
            f.set_attribute(
                Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                STAGED_MAX_SMEM.min(smem_optin) as i32,
            )?;
        }
        if [
            "dk_divc_",
            "dk_divcs_",
            "dk_divcp_",
            "dk_divcp256_",
            "dk_divcq_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
        {
            f.set_attribute(Attr::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)?;
        }
    }
    Ok(())
}

/// What [`launch`] did.
pub(crate) enum Launched {
    /// The kernel is queued.
    Queued,
    /// The driver refused the cluster shape (out of cluster resources, an unsupported cluster
    /// size or launch value); nothing was queued. The reason, for [`note_refused_launch`].
    Refused(Error),
}

/// Queues `f` (configured by [`configure`]; `name` is its kernel name, for [`launch_shapes`])
/// over `args.n` rows as `clusters` clusters of `c` blocks of `threads` threads (one cluster
/// per row, except for the persistent variants) with `smem` bytes of dynamic shared memory per
/// block. `inv_cap` is the second parameter of the fused linear divergence's kernels
/// (`dk_divcp[256]_fused_*`), None for the others. A refusal of the cluster shape is
/// `Ok(Launched::Refused)`; any other error (a sticky one from earlier work, say) is an error.
pub(crate) fn launch(
    (f, name): (&CudaFunction, &str),
    stream: &Arc<CudaStream>,
    args: &DivergenceArgs,
    inv_cap: Option<&f32>,
    (c, clusters): (usize, usize),
    threads: u32,
    smem: usize,
) -> Result<Launched> {
    debug_assert!(smem <= MAX_SLICE_BYTES.max(STAGED_MAX_SMEM));
    // Past the grid's 2^31 - 1 blocks (a forced stream cluster over ~2^27 rows): refused like a
    // shape the driver turns down, so the rows fall back to the one-block kernel.
    let Some(blocks) = clusters.checked_mul(c).filter(|&b| b <= i32::MAX as usize) else {
        return Ok(Launched::Refused(Error::new(
            ErrorKind::Shape,
            format!("{clusters} clusters x {c} blocks pass the grid limit (2^31 - 1 blocks)"),
        )));
    };
    let blocks = blocks as u32;
    let mut attr = cluster_attribute(c);
    let config = launch_config_1d(blocks, threads, smem, stream.cu_stream(), &mut attr);
    let mut params = [
        args as *const DivergenceArgs as *mut c_void,
        std::ptr::null_mut(),
    ];
    if let Some(x) = inv_cap {
        params[1] = x as *const f32 as *mut c_void;
    }
    stream.context().bind_to_thread()?;
    // SAFETY: the kernel takes one DkDivergenceArgs by value, then one float exactly when
    // `inv_cap` is given (the params point at them, alive for the call; the driver reads as
    // many as the kernel has); the grid is a whole number of clusters; the caller checked the
    // pointers, shapes and alignment (rows_aligned) and that the device is Hopper (sm_90).
    let r = unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    use sys::CUresult as R;
    match r {
        R::CUDA_SUCCESS => {
            note_shape(name, (c, clusters), args);
            Ok(Launched::Queued)
        }
        // The cluster shape itself: a card that cannot place it (launch-time, not sticky).
        R::CUDA_ERROR_INVALID_CLUSTER_SIZE
        | R::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
        | R::CUDA_ERROR_INVALID_VALUE
        | R::CUDA_ERROR_NOT_SUPPORTED => Ok(Launched::Refused(r.result().unwrap_err().into())),
        _ => Err(r.result().unwrap_err().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_clusters_hold_two_rows_in_shared_memory() {
        let sms = 132;
        let off = Stash::Off;
        let size = |n, v, pair| staged_cluster_size(n, v, pair, off, sms);
        // bf16 pairs (4 bytes per element): two rows of 151936 or 202048 in 8 blocks (149 KB,
        // 198 KB each), of 262144 in 16 (129 KB).
        assert_eq!(size(4096, 151936, 4), Some(8));
        assert_eq!(staged_smem_bytes(151936, 8, 4, off), 1024 + 2 * 18992 * 4);
        assert_eq!(size(4096, 202048, 4), Some(8));
        assert_eq!(size(4096, 262144, 4), Some(16));
        // f32 pairs: 16 blocks up to V = 231424 (the fused path's 200064), none past it.
        assert_eq!(size(4096, 200064, 8), Some(16));
        assert_eq!(size(4096, 262144, 8), None);
        assert_eq!(size(4096, 231424, 8), Some(16));
        assert_eq!(size(4096, 231432, 8), None);
        // Every size it picks fits the opt-in limit, and the next smaller one does not (the
        // stash's own slice is for 16-bit teachers: 2- and 4-byte pairs).
        for stash in [Stash::Off, Stash::OverTeacher, Stash::Slice] {
            for (v, pair) in [(151936, 4), (32000, 4), (200064, 8), (50000, 8), (1000, 2)] {
                if stash == Stash::Slice && pair == 8 {
                    continue;
                }
                let c = staged_cluster_size(4096, v, pair, stash, sms).unwrap();
                assert!(staged_smem_bytes(v, c, pair, stash) <= STAGED_MAX_SMEM);
                if c > 1 {
                    assert!(
                        staged_smem_bytes(v, c / 2, pair, stash) > STAGED_MAX_SMEM,
                        "{v} {pair} {stash:?}"
                    );
                }
            }
        }
        // Short batches: clusters doubled up to 8 while the rows leave SMs idle and slices stay
        // at least 4096 long.
        assert_eq!(size(2, 32768, 4), Some(8));
        assert_eq!(size(2, 16384, 4), Some(4));
        assert_eq!(size(256, 151936, 4), Some(8));
    }

    #[test]
    fn the_jsd_stash_of_16_bit_teachers_takes_four_bytes_an_element() {
        let sms = 132;
        let slice = |v, pair| staged_cluster_size(4096, v, pair, Stash::Slice, sms);
        // bf16 pairs with the f32 stash, 12 bytes per slice element: 151936 still fits 8 blocks
        // (224 KB), 202048 needs 16 (148 KB), 262144 fits 16 (193 KB).
        assert_eq!(slice(151936, 4), Some(8));
        assert_eq!(
            staged_smem_bytes(151936, 8, 4, Stash::Slice),
            1024 + 18992 * (2 * 4 + 4)
        );
        assert_eq!(slice(202048, 4), Some(16));
        assert_eq!(slice(262144, 4), Some(16));
        // f32 student, bf16 teacher (6-byte pairs, 16 with the stash): none past V = 231424,
        // where the launch goes without the stash (staged_grid) rather than off the variant.
        assert_eq!(slice(231424, 6), Some(16));
        assert_eq!(slice(262144, 6), None);
        assert_eq!(
            staged_cluster_size(4096, 262144, 6, Stash::Off, sms),
            Some(16)
        );
        // Over an f32 teacher's slice the stash costs nothing.
        assert_eq!(
            staged_smem_bytes(200064, 16, 8, Stash::OverTeacher),
            staged_smem_bytes(200064, 16, 8, Stash::Off)
        );
        assert_eq!(Stash::Off.options(), 0);
        assert_eq!(Stash::Exp.options(), 3);
        assert_eq!(Stash::Slice.options(), super::super::cuda::STASH_JSD);
        assert_eq!(Stash::OverTeacher.options(), super::super::cuda::STASH_JSD);
    }

    #[test]
    fn kept_exponentials_take_eight_bytes_and_fall_back_where_they_do_not_fit() {
        let sms = 132;
        // A card that places 8 clusters of any shape, and one that places none of 16 blocks.
        let any = |_: usize, _: usize| 8;
        let no16 = |c: usize, _: usize| if c == 16 { 0 } else { 8 };
        let choose = |v, elem, stash, forced, placed: &dyn Fn(usize, usize) -> usize| {
            staged_choice((4096, v), elem, stash, (sms, forced), placed).map(|s| (s.c, s.stash))
        };
        // With a gradient pass.
        let pick = |v, elem, stash, forced, placed: &dyn Fn(usize, usize) -> usize| {
            choose(v, elem, (stash, true), forced, placed)
        };
        let bf16 = (2, 2);
        let f32 = (4, 4);
        // bf16 pairs with the two kept f32 exponentials, 16 bytes per slice element: 16 blocks
        // at 151936 (149 KB) and 202048 (199 KB); at 262144 (257 KB) version 10's slice.
        assert_eq!(
            pick(151936, bf16, Stash::Exp, None, &any),
            Some((16, Stash::Exp))
        );
        assert_eq!(
            staged_smem_bytes(151936, 16, 4, Stash::Exp),
            1024 + 9496 * (2 * 4 + 8)
        );
        assert_eq!(
            pick(202048, bf16, Stash::Exp, None, &any),
            Some((16, Stash::Exp))
        );
        assert_eq!(
            pick(262144, bf16, Stash::Exp, None, &any),
            Some((16, Stash::Slice))
        );
        // f32 pairs, 24 bytes: 151936 just fits 16 blocks (224 KB); the fused path's 200064
        // takes version 10's stash over T; 262144 fits no stash and no cluster at all.
        assert_eq!(
            pick(151936, f32, Stash::Exp, None, &any),
            Some((16, Stash::Exp))
        );
        assert_eq!(
            pick(200064, f32, Stash::Exp, None, &any),
            Some((16, Stash::OverTeacher))
        );
        assert_eq!(pick(262144, f32, Stash::Exp, None, &any), None);
        // A 16-bit teacher past what its slice allows: no stash rather than no staged kernel.
        assert_eq!(
            pick(262144, (4, 2), Stash::Slice, None, &any),
            Some((16, Stash::Off))
        );
        // A forced size keeps its size: the stash gets smaller until it fits (an A/B of the
        // cluster size measures that size); a forced size that fits nothing is ignored.
        assert_eq!(
            pick(202048, bf16, Stash::Slice, Some(8), &any),
            Some((8, Stash::Off))
        );
        assert_eq!(
            pick(151936, bf16, Stash::Exp, Some(8), &any),
            Some((8, Stash::Slice))
        );
        assert_eq!(
            pick(151936, bf16, Stash::Exp, Some(16), &any),
            Some((16, Stash::Exp))
        );
        assert_eq!(
            pick(262144, bf16, Stash::Slice, Some(4), &any),
            Some((16, Stash::Slice))
        );
        // A card that places no 16-block cluster: the smaller stash at 8 blocks, where it fits.
        assert_eq!(
            pick(151936, bf16, Stash::Exp, None, &no16),
            Some((8, Stash::Slice))
        );
        assert_eq!(
            pick(202048, bf16, Stash::Slice, None, &no16),
            Some((8, Stash::Off))
        );
        assert_eq!(pick(262144, bf16, Stash::Slice, None, &no16), None);
        // The clusters never exceed the rows, and the shared memory is the chosen stash's.
        let short = staged_choice((3, 151936), bf16, (Stash::Exp, true), (sms, None), any);
        let short = short.unwrap();
        assert_eq!(short.clusters, 3);
        assert_eq!(short.smem, staged_smem_bytes(151936, 16, 4, Stash::Exp));
        // Forward only (version 12), the kept exponentials fall back to no stash at all: the
        // log ratio serves only the gradient pass.
        let forward = |v, elem| choose(v, elem, (Stash::Exp, false), None, &any);
        assert_eq!(forward(151936, bf16), Some((16, Stash::Exp)));
        assert_eq!(forward(262144, bf16), Some((16, Stash::Off)));
        assert_eq!(forward(200064, f32), Some((16, Stash::Off)));
    }

    #[test]
    fn cluster_sizes_for_model_vocabularies() {
        let smem = |n, v, e| cluster_size(Variant::Smem, n, v, e);
        // bf16 pair (4 bytes per element): 151936 fits 8 blocks of 76 KB, two per SM.
        assert_eq!(smem(4096, 151936, 4), Some(8));
        assert_eq!(smem(4096, 262144, 4), Some(16));
        // f32 pair at 262144: 16 blocks of 128 KB, one per SM.
        assert_eq!(smem(4096, 262144, 8), Some(16));
        // Too large for 16 blocks: the one-block kernel.
        assert_eq!(smem(16, 1 << 20, 8), None);
        // Small rows: one block, unless the batch is short.
        assert_eq!(smem(4096, 1000, 4), Some(1));
        assert_eq!(smem(2, 32768, 4), Some(8));
        assert_eq!(smem(256, 151936, 4), Some(8));
        // Stream: slices of at most 80 KB, 8 blocks at most (longer rows stream more each).
        let stream = |n, v, e| stream_cluster_size(n, v, e);
        assert_eq!(stream(4096, 151936, 4), 8);
        assert_eq!(stream(4096, 202048, 4), 8);
        assert_eq!(stream(4096, 262144, 8), 8);
        assert_eq!(stream(16, 1 << 20, 8), 8);
        assert_eq!(stream(4096, 1000, 4), 1);
        assert_eq!(stream(4096, 16384, 4), 1);
        assert_eq!(stream(4096, 32768, 4), 2);
        // Short batches: more blocks per row while slices keep 4096 elements.
        assert_eq!(stream(256, 151936, 4), 8);
        assert_eq!(stream(16, 151936, 4), 8);
        assert_eq!(stream(2, 32768, 4), 8);
        assert_eq!(stream(2, 8192, 4), 2);
    }

    #[test]
    fn persistent_cluster_sizes_keep_the_re_reads_in_l2() {
        // A card with 132 SMs, 2 blocks per SM (KL) or 1 (JSD) and 60 MiB of L2 (36 MiB budget);
        // the launcher reads the real L2 size when the device opens.
        let two_per_sm = |c: usize| 264 / c;
        let one_per_sm = |c: usize| 132 / c;
        let l2 = 60 << 20;
        // bf16 pair + bf16 gradient: 6 bytes per element, 0.91 MB per row at V = 151936.
        // C = 4: 66 clusters x 0.91 MB = 60 MB, over budget; C = 8: 33 x 0.91 = 30 MB.
        assert_eq!(persistent_cluster_size(151936, 4, 2, 1, l2, two_per_sm), 8);
        // V = 262144: 1.57 MB per row; C = 8 gives 52 MB, C = 16 26 MB.
        assert_eq!(persistent_cluster_size(262144, 4, 2, 1, l2, two_per_sm), 16);
        // JSD re-reads two iterations later at one block per SM: C = 8 gives 2 x 16 x 0.91 MB.
        assert_eq!(persistent_cluster_size(151936, 4, 2, 2, l2, one_per_sm), 8);
        // Short rows: two blocks per cluster are enough.
        assert_eq!(persistent_cluster_size(32768, 4, 2, 1, l2, two_per_sm), 2);
        // Sizes the card cannot place are skipped, even when they would fit.
        let no_16 = |c: usize| if c < 16 { 264 / c } else { 0 };
        assert_eq!(persistent_cluster_size(262144, 4, 2, 1, l2, no_16), 8);
        // Nothing fits (f32 rows of 1M entries): the largest placeable cluster.
        assert_eq!(
            persistent_cluster_size(1 << 20, 8, 4, 2, l2, two_per_sm),
            16
        );
        assert_eq!(persistent_cluster_size(1 << 20, 8, 4, 2, l2, no_16), 8);
    }

    #[test]
    fn slices_cover_the_row_and_start_aligned() {
        for v in [1usize, 7, 8, 9, 1000, 151936, 202048, 262143] {
            for c in CLUSTER_SIZES {
                let s = slice(v, c);
                assert_eq!(s % 8, 0);
                assert!(s * c >= v, "v {v} c {c}");
            }
        }
    }
}
