//! CUDA backend of the divergence: argument struct shared with `cuda/divergence.cu`, workspace
//! layout, and the three launches (prepare the scale, the row kernel, reduce the loss).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{cluster, Kind, Params, RawDivergence};
use crate::device::{CudaDevice, Launch};
use crate::error::Result;
use crate::tensor::DType;

/// Rust mirror of `DkDivergenceArgs` (cuda/include/dk_divergence_args.h), passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DivergenceArgs {
    pub student: u64,
    pub teacher: u64,
    pub grad: u64,
    pub labels: u64,
    pub per_row: u64,
    pub scale: u64,
    pub n: i64,
    pub v: i64,
    pub student_stride: i64,
    pub teacher_stride: i64,
    pub grad_stride: i64,
    pub ignore_index: i64,
    pub beta: f32,
    pub inv_temperature: f32,
    /// `DK_ARGS_*` bits ([`STASH_JSD`]); 0 except where the staged launcher sets them.
    pub options: u32,
}

/// `DK_ARGS_STASH_JSD`: the staged JSD kernels keep each entry's log2(q/m) from the mixture
/// pass for the gradient pass ([`cluster::Stash`]).
pub(crate) const STASH_JSD: u32 = 1;
/// `DK_ARGS_STASH_JSD_EXP`: with [`STASH_JSD`], their statistics pass also keeps each entry's
/// exponentials ([`cluster::Stash::Exp`]).
pub(crate) const STASH_JSD_EXP: u32 = 2;

// SAFETY: plain-old-data with the C layout of DkDivergenceArgs (checked by
// capi/src/tests/abi_layout.rs).
unsafe impl DeviceRepr for DivergenceArgs {}

/// Size and field offsets of [`DivergenceArgs`], for the layout test against the C header.
#[doc(hidden)]
pub fn divergence_args_layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    vec![
        ("sizeof", size_of::<DivergenceArgs>()),
        ("student", offset_of!(DivergenceArgs, student)),
        ("teacher", offset_of!(DivergenceArgs, teacher)),
        ("grad", offset_of!(DivergenceArgs, grad)),
        ("labels", offset_of!(DivergenceArgs, labels)),
        ("per_row", offset_of!(DivergenceArgs, per_row)),
        ("scale", offset_of!(DivergenceArgs, scale)),
        ("n", offset_of!(DivergenceArgs, n)),
        ("v", offset_of!(DivergenceArgs, v)),
        ("student_stride", offset_of!(DivergenceArgs, student_stride)),
        ("teacher_stride", offset_of!(DivergenceArgs, teacher_stride)),
        ("grad_stride", offset_of!(DivergenceArgs, grad_stride)),
        ("ignore_index", offset_of!(DivergenceArgs, ignore_index)),
        ("beta", offset_of!(DivergenceArgs, beta)),
        (
            "inv_temperature",
            offset_of!(DivergenceArgs, inv_temperature),
        ),
        ("options", offset_of!(DivergenceArgs, options)),
    ]
}

/// Every kernel of `cuda/divergence.cu`, `cuda/divergence_cluster.cu`,
/// `cuda/divergence_persistent.cu` (the fused linear divergence's persistent chunk kernels
/// included) and `cuda/divergence_staged.cu`, loaded when a CUDA context opens (the cluster kernels have empty bodies in the
/// sm_80 cubin and are only launched on Hopper, sm_90).
pub(crate) const KERNEL_NAMES: &[&str] = &[
    "dk_div_prepare",
    "dk_div_finish",
    "dk_div_fkl_f32_f32",
    "dk_div_fkl_f32_bf16",
    "dk_div_fkl_f32_f16",
    "dk_div_fkl_bf16_f32",
    "dk_div_fkl_bf16_bf16",
    "dk_div_fkl_bf16_f16",
    "dk_div_fkl_f16_f32",
    "dk_div_fkl_f16_bf16",
    "dk_div_fkl_f16_f16",
    "dk_div_rkl_f32_f32",
    "dk_div_rkl_f32_bf16",
    "dk_div_rkl_f32_f16",
    "dk_div_rkl_bf16_f32",
    "dk_div_rkl_bf16_bf16",
    "dk_div_rkl_bf16_f16",
    "dk_div_rkl_f16_f32",
    "dk_div_rkl_f16_bf16",
    "dk_div_rkl_f16_f16",
    "dk_div_jsd_f32_f32",
    "dk_div_jsd_f32_bf16",
    "dk_div_jsd_f32_f16",
    "dk_div_jsd_bf16_f32",
    "dk_div_jsd_bf16_bf16",
    "dk_div_jsd_bf16_f16",
    "dk_div_jsd_f16_f32",
    "dk_div_jsd_f16_bf16",
    "dk_div_jsd_f16_f16",
    "dk_div_jsdx_f32_f32",
    "dk_div_jsdx_f32_bf16",
    "dk_div_jsdx_f32_f16",
    "dk_div_jsdx_bf16_f32",
    "dk_div_jsdx_bf16_bf16",
    "dk_div_jsdx_bf16_f16",
    "dk_div_jsdx_f16_f32",
    "dk_div_jsdx_f16_bf16",
    "dk_div_jsdx_f16_f16",
    "dk_divc_fkl_f32_f32",
    "dk_divc_fkl_f32_bf16",
    "dk_divc_fkl_f32_f16",
    "dk_divc_fkl_bf16_f32",
    "dk_divc_fkl_bf16_bf16",
    "dk_divc_fkl_bf16_f16",
    "dk_divc_fkl_f16_f32",
    "dk_divc_fkl_f16_bf16",
    "dk_divc_fkl_f16_f16",
    "dk_divc_rkl_f32_f32",
    "dk_divc_rkl_f32_bf16",
    "dk_divc_rkl_f32_f16",
    "dk_divc_rkl_bf16_f32",
    "dk_divc_rkl_bf16_bf16",
    "dk_divc_rkl_bf16_f16",
    "dk_divc_rkl_f16_f32",
    "dk_divc_rkl_f16_bf16",
    "dk_divc_rkl_f16_f16",
    "dk_divc_jsd_f32_f32",
    "dk_divc_jsd_f32_bf16",
    "dk_divc_jsd_f32_f16",
    "dk_divc_jsd_bf16_f32",
    "dk_divc_jsd_bf16_bf16",
    "dk_divc_jsd_bf16_f16",
    "dk_divc_jsd_f16_f32",
    "dk_divc_jsd_f16_bf16",
    "dk_divc_jsd_f16_f16",
    "dk_divc_jsdx_f32_f32",
    "dk_divc_jsdx_f32_bf16",
    "dk_divc_jsdx_f32_f16",
    "dk_divc_jsdx_bf16_f32",
    "dk_divc_jsdx_bf16_bf16",
    "dk_divc_jsdx_bf16_f16",
    "dk_divc_jsdx_f16_f32",
    "dk_divc_jsdx_f16_bf16",
    "dk_divc_jsdx_f16_f16",
    "dk_divcs_fkl_f32_f32",
    "dk_divcs_fkl_f32_bf16",
    "dk_divcs_fkl_f32_f16",
    "dk_divcs_fkl_bf16_f32",
    "dk_divcs_fkl_bf16_bf16",
    "dk_divcs_fkl_bf16_f16",
    "dk_divcs_fkl_f16_f32",
    "dk_divcs_fkl_f16_bf16",
    "dk_divcs_fkl_f16_f16",
    "dk_divcs_rkl_f32_f32",
    "dk_divcs_rkl_f32_bf16",
    "dk_divcs_rkl_f32_f16",
    "dk_divcs_rkl_bf16_f32",
    "dk_divcs_rkl_bf16_bf16",
    "dk_divcs_rkl_bf16_f16",
    "dk_divcs_rkl_f16_f32",
    "dk_divcs_rkl_f16_bf16",
    "dk_divcs_rkl_f16_f16",
    "dk_divcs_jsd_f32_f32",
    "dk_divcs_jsd_f32_bf16",
    "dk_divcs_jsd_f32_f16",
    "dk_divcs_jsd_bf16_f32",
    "dk_divcs_jsd_bf16_bf16",
    "dk_divcs_jsd_bf16_f16",
    "dk_divcs_jsd_f16_f32",
    "dk_divcs_jsd_f16_bf16",
    "dk_divcs_jsd_f16_f16",
    "dk_divcs_jsdx_f32_f32",
    "dk_divcs_jsdx_f32_bf16",
    "dk_divcs_jsdx_f32_f16",
    "dk_divcs_jsdx_bf16_f32",
    "dk_divcs_jsdx_bf16_bf16",
    "dk_divcs_jsdx_bf16_f16",
    "dk_divcs_jsdx_f16_f32",
    "dk_divcs_jsdx_f16_bf16",
    "dk_divcs_jsdx_f16_f16",
    "dk_divcp_fkl_f32_f32",
    "dk_divcp_fkl_f32_bf16",
    "dk_divcp_fkl_f32_f16",
    "dk_divcp_fkl_bf16_f32",
    "dk_divcp_fkl_bf16_bf16",
    "dk_divcp_fkl_bf16_f16",
    "dk_divcp_fkl_f16_f32",
    "dk_divcp_fkl_f16_bf16",
    "dk_divcp_fkl_f16_f16",
    "dk_divcp_rkl_f32_f32",
    "dk_divcp_rkl_f32_bf16",
    "dk_divcp_rkl_f32_f16",
    "dk_divcp_rkl_bf16_f32",
    "dk_divcp_rkl_bf16_bf16",
    "dk_divcp_rkl_bf16_f16",
    "dk_divcp_rkl_f16_f32",
    "dk_divcp_rkl_f16_bf16",
    "dk_divcp_rkl_f16_f16",
    "dk_divcp_jsd_f32_f32",
    "dk_divcp_jsd_f32_bf16",
    "dk_divcp_jsd_f32_f16",
    "dk_divcp_jsd_bf16_f32",
    "dk_divcp_jsd_bf16_bf16",
    "dk_divcp_jsd_bf16_f16",
    "dk_divcp_jsd_f16_f32",
    "dk_divcp_jsd_f16_bf16",
    "dk_divcp_jsd_f16_f16",
    "dk_divcp_jsdx_f32_f32",
    "dk_divcp_jsdx_f32_bf16",
    "dk_divcp_jsdx_f32_f16",
    "dk_divcp_jsdx_bf16_f32",
    "dk_divcp_jsdx_bf16_bf16",
    "dk_divcp_jsdx_bf16_f16",
    "dk_divcp_jsdx_f16_f32",
    "dk_divcp_jsdx_f16_bf16",
    "dk_divcp_jsdx_f16_f16",
    "dk_divcp256_fkl_f32_f32",
    "dk_divcp256_fkl_f32_bf16",
    "dk_divcp256_fkl_f32_f16",
    "dk_divcp256_fkl_bf16_f32",
    "dk_divcp256_fkl_bf16_bf16",
    "dk_divcp256_fkl_bf16_f16",
    "dk_divcp256_fkl_f16_f32",
    "dk_divcp256_fkl_f16_bf16",
    "dk_divcp256_fkl_f16_f16",
    "dk_divcp256_rkl_f32_f32",
    "dk_divcp256_rkl_f32_bf16",
    "dk_divcp256_rkl_f32_f16",
    "dk_divcp256_rkl_bf16_f32",
    "dk_divcp256_rkl_bf16_bf16",
    "dk_divcp256_rkl_bf16_f16",
    "dk_divcp256_rkl_f16_f32",
    "dk_divcp256_rkl_f16_bf16",
    "dk_divcp256_rkl_f16_f16",
    "dk_divcp256_jsd_f32_f32",
    "dk_divcp256_jsd_f32_bf16",
    "dk_divcp256_jsd_f32_f16",
    "dk_divcp256_jsd_bf16_f32",
    "dk_divcp256_jsd_bf16_bf16",
    "dk_divcp256_jsd_bf16_f16",
    "dk_divcp256_jsd_f16_f32",
    "dk_divcp256_jsd_f16_bf16",
    "dk_divcp256_jsd_f16_f16",
    "dk_divcp256_jsdx_f32_f32",
    "dk_divcp256_jsdx_f32_bf16",
    "dk_divcp256_jsdx_f32_f16",
    "dk_divcp256_jsdx_bf16_f32",
    "dk_divcp256_jsdx_bf16_bf16",
    "dk_divcp256_jsdx_bf16_f16",
    "dk_divcp256_jsdx_f16_f32",
    "dk_divcp256_jsdx_f16_bf16",
    "dk_divcp256_jsdx_f16_f16",
    "dk_divcp_fused_fkl_f32",
    "dk_divcp_fused_fkl_bf16",
    "dk_divcp_fused_fkl_f16",
    "dk_divcp_fused_rkl_f32",
    "dk_divcp_fused_rkl_bf16",
    "dk_divcp_fused_rkl_f16",
    "dk_divcp_fused_jsd_f32",
    "dk_divcp_fused_jsd_bf16",
    "dk_divcp_fused_jsd_f16",
    "dk_divcp_fused_jsdx_f32",
    "dk_divcp_fused_jsdx_bf16",
    "dk_divcp_fused_jsdx_f16",
    "dk_divcp256_fused_fkl_f32",
    "dk_divcp256_fused_fkl_bf16",
    "dk_divcp256_fused_fkl_f16",
    "dk_divcp256_fused_rkl_f32",
    "dk_divcp256_fused_rkl_bf16",
    "dk_divcp256_fused_rkl_f16",
    "dk_divcp256_fused_jsd_f32",
    "dk_divcp256_fused_jsd_bf16",
    "dk_divcp256_fused_jsd_f16",
    "dk_divcp256_fused_jsdx_f32",
    "dk_divcp256_fused_jsdx_bf16",
    "dk_divcp256_fused_jsdx_f16",
    "dk_divcq_fkl_f32_f32",
    "dk_divcq_fkl_f32_bf16",
    "dk_divcq_fkl_f32_f16",
    "dk_divcq_fkl_bf16_f32",
    "dk_divcq_fkl_bf16_bf16",
    "dk_divcq_fkl_bf16_f16",
    "dk_divcq_fkl_f16_f32",
    "dk_divcq_fkl_f16_bf16",
    "dk_divcq_fkl_f16_f16",
    "dk_divcq_rkl_f32_f32",
    "dk_divcq_rkl_f32_bf16",
    "dk_divcq_rkl_f32_f16",
    "dk_divcq_rkl_bf16_f32",
    "dk_divcq_rkl_bf16_bf16",
    "dk_divcq_rkl_bf16_f16",
    "dk_divcq_rkl_f16_f32",
    "dk_divcq_rkl_f16_bf16",
    "dk_divcq_rkl_f16_f16",
    "dk_divcq_jsd_f32_f32",
    "dk_divcq_jsd_f32_bf16",
    "dk_divcq_jsd_f32_f16",
    "dk_divcq_jsd_bf16_f32",
    "dk_divcq_jsd_bf16_bf16",
    "dk_divcq_jsd_bf16_f16",
    "dk_divcq_jsd_f16_f32",
    "dk_divcq_jsd_f16_bf16",
    "dk_divcq_jsd_f16_f16",
    "dk_divcq_jsdx_f32_f32",
    "dk_divcq_jsdx_f32_bf16",
    "dk_divcq_jsdx_f32_f16",
    "dk_divcq_jsdx_bf16_f32",
    "dk_divcq_jsdx_bf16_bf16",
    "dk_divcq_jsdx_bf16_f16",
    "dk_divcq_jsdx_f16_f32",
    "dk_divcq_jsdx_f16_bf16",
    "dk_divcq_jsdx_f16_f16",
    "dk_divcq_fused_fkl_f32",
    "dk_divcq_fused_fkl_bf16",
    "dk_divcq_fused_fkl_f16",
    "dk_divcq_fused_rkl_f32",
    "dk_divcq_fused_rkl_bf16",
    "dk_divcq_fused_rkl_f16",
    "dk_divcq_fused_jsd_f32",
    "dk_divcq_fused_jsd_bf16",
    "dk_divcq_fused_jsd_f16",
    "dk_divcq_fused_jsdx_f32",
    "dk_divcq_fused_jsdx_bf16",
    "dk_divcq_fused_jsdx_f16",
];

/// Threads per block of the row kernel (`kThreads` in divergence.cu).
const ROW_THREADS: u32 = 256;
/// Byte offset of the per-row scratch in the workspace (the scale sits at 0).
const PER_ROW_OFFSET: usize = 256;

/// Workspace bytes for `n` rows: the loss scale, then `n` per-row losses. Saturates (an `n`
/// that large is refused by the call itself).
pub(crate) fn workspace_size(n: usize) -> usize {
    n.checked_mul(4)
        .and_then(|b| b.checked_next_multiple_of(256))
        .and_then(|b| b.checked_add(PER_ROW_OFFSET))
        .unwrap_or(usize::MAX)
}

/// Whether JSD at this β runs the `jsdx` kernels: min(β, 1 − β) < 2⁻⁵ in f32, the test of
/// `jsd_series_tails` in `cuda/include/dk_divergence_math.cuh`. There the loss scales with
/// min(β, 1 − β) and the gradient, as β → 0, with β, and the ordinary kernels' softplus tail
/// (`lg2.approx(1 + u)`, absolute error ~2⁻²²) swamped it: gradients 3e-4 off at β = 0.01 and
/// wholly wrong at 1e-7 in the host replay. The `jsdx` kernels take a series for small tails
/// (cuda/DIVERGENCE.md, "Version 8"); the others are compiled without it and do not change.
pub(crate) fn jsd_series_tails(beta: f32) -> bool {
    beta.min(1.0 - beta) < 1.0 / 32.0
}

/// The kind's part of the kernel names: `fkl`, `rkl`, `jsd`, or `jsdx` for JSD at an extreme
/// β ([`jsd_series_tails`]). `kind` is the effective kind ([`Params::effective_kind`]).
/// Public (hidden) for the kernel emulator tests, which name the kernel the launcher would.
#[doc(hidden)]
pub fn kind_tag(kind: Kind, beta: f32) -> &'static str {
    match kind {
        Kind::ForwardKl => "fkl",
        Kind::ReverseKl => "rkl",
        Kind::Jsd if jsd_series_tails(beta) => "jsdx",
        Kind::Jsd => "jsd",
    }
}

fn row_kernel_name(tag: &str, student: DType, teacher: DType) -> String {
    format!("dk_div_{tag}_{}_{}", student.name(), teacher.name())
}

/// How [`RowKernels::queue_persistent`] launches a persistent kernel.
struct PersistentLaunch<'a> {
    /// Bytes per student and teacher element.
    elem_bytes: (usize, usize),
    /// Iterations between a row's statistics and its last re-read.
    lag: usize,
    /// At most this many clusters.
    max_clusters: usize,
    /// The fused kernels' second parameter (None: the divergence kernels, which have one).
    inv_cap: Option<f32>,
    /// G of row r over the student row r − Q (Q the clusters launched): `grad` is set to the
    /// student logits Q rows before `student` (the fused kernels).
    grad_before_student: bool,
    /// What runs instead when the card places no cluster, for the fallback note.
    instead: &'a str,
}

/// The three kernels of one divergence: looked up together so that a missing kernel is an error
/// before anything is queued. Shared with the fused linear divergence (src/fused/cuda.rs), which
/// runs the row kernel chunk by chunk over its own f32 logits.
pub(crate) struct RowKernels<'d> {
    prepare: &'d CudaFunction,
    rows: &'d CudaFunction,
    /// The cluster variant of `rows` (Hopper, sm_90, only), which one it is, and its name.
    cluster_rows: Option<(&'d CudaFunction, cluster::Variant, String)>,
    /// The kind's part of the kernel names (`kind_tag`).
    tag: &'static str,
    /// Whether the kind needs a pass after the statistics when no gradient is asked for (JSD).
    fwd_multi_pass: bool,
    /// Bytes per element of the student and teacher logits.
    elem_bytes: (usize, usize),
    /// The device's L2 size: the persistent cluster kernels keep their re-reads within it.
    l2_bytes: usize,
    /// The device's SM count (the persistent kernels' grid).
    sm_count: usize,
    finish: &'d CudaFunction,
}

/// The fused linear divergence's chunk kernels of one kind and G dtype
/// ([`RowKernels::fused_rows`]).
pub(crate) struct FusedRowKernels<'d> {
    /// `dk_div_fused_<kind>_<dtype>` (cuda/divergence.cu): one block per row, G over S.
    one_block: &'d CudaFunction,
    /// `dk_divcp[256]_fused_<kind>_<dtype>` (cuda/divergence_persistent.cu) or
    /// `dk_divcq_fused_<kind>_<dtype>` (cuda/divergence_staged.cu) and its name, when the
    /// divergence runs a persistent or the staged cluster variant on this device.
    cluster: Option<(&'d CudaFunction, String)>,
}

/// One block of 1024 threads: `dk_div_prepare` and `dk_div_finish`.
const SINGLE_BLOCK: LaunchConfig = LaunchConfig {
    grid_dim: (1, 1, 1),
    block_dim: (1024, 1, 1),
    shared_mem_bytes: 0,
};

impl<'d> RowKernels<'d> {
    /// The kernels of `kind` (already the effective kind: see [`Params::effective_kind`]) at
    /// this β (JSD's `jsdx` kernels or the others: [`jsd_series_tails`]) for these student and
    /// teacher dtypes.
    pub(crate) fn new(
        dev: &'d CudaDevice,
        kind: Kind,
        beta: f32,
        student: DType,
        teacher: DType,
    ) -> Result<Self> {
        let tag = kind_tag(kind, beta);
        Ok(RowKernels {
            prepare: dev.function("dk_div_prepare")?,
            rows: dev.function(&row_kernel_name(tag, student, teacher))?,
            cluster_rows: match dev.cluster_divergence() {
                Some(variant) => {
                    let name =
                        row_kernel_name(tag, student, teacher).replace("dk_div_", variant.prefix());
                    Some((dev.function(&name)?, variant, name))
                }
                None => None,
            },
            tag,
            fwd_multi_pass: kind == Kind::Jsd,
            elem_bytes: (student.size(), teacher.size()),
            l2_bytes: dev.l2_bytes(),
            sm_count: dev.sm_count(),
            finish: dev.function("dk_div_finish")?,
        })
    }

    /// The fused linear divergence's chunk kernels for G in `dtype`, of this `RowKernels`' kind
    /// and β (it is the f32 one).
    pub(crate) fn fused_kernels(
        &self,
        dev: &'d CudaDevice,
        dtype: DType,
    ) -> Result<FusedRowKernels<'d>> {
        let k = self.tag;
        let cluster = match &self.cluster_rows {
            Some((_, variant, _))
                if variant.persistent() || *variant == cluster::Variant::Staged =>
            {
                let name = format!("{}fused_{k}_{}", variant.prefix(), dtype.name());
                Some((dev.function(&name)?, name))
            }
            _ => None,
        };
        Ok(FusedRowKernels {
            one_block: dev.function(&format!("dk_div_fused_{k}_{}", dtype.name()))?,
            cluster,
        })
    }

    /// Queues `dk_div_prepare`: writes d(reduced loss)/d(row loss) to `scale_out` (one f32 of
    /// device memory), from the `n` labels (0 = none), the reduction and `num_items` (the
    /// parameter, or the f32 at `num_items_mem` when that is not 0).
    pub(crate) fn prepare(
        &self,
        stream: &Arc<CudaStream>,
        labels: u64,
        n: i64,
        params: &Params,
        num_items_mem: u64,
        scale_out: u64,
    ) -> Result<()> {
        let reduction = params.reduction as i32;
        let num_items = params.num_items.unwrap_or(0.0);
        // SAFETY: argument types and order match dk_div_prepare's signature; the caller passes
        // device memory of this device (labels: n entries or 0; num_items_mem: one f32 or 0;
        // scale_out: one f32).
        unsafe {
            stream
                .launch_builder(self.prepare)
                .arg(&labels)
                .arg(&n)
                .arg(&params.ignore_index)
                .arg(&reduction)
                .arg(&num_items)
                .arg(&num_items_mem)
                .arg(&scale_out)
                .launch(SINGLE_BLOCK)?;
        }
        Ok(())
    }

    /// Queues the row kernel over `args.n` rows: one block per row, except on Hopper (sm_90)
    /// for a short batch of 16-byte aligned rows, which runs one cluster per row so that the
    /// card fills (the H100 measurements behind this are in cuda/DIVERGENCE.md, version 3).
    pub(crate) fn rows(&self, stream: &Arc<CudaStream>, args: &DivergenceArgs) -> Result<()> {
        let (sb, tb) = self.elem_bytes;
        let (n, v) = (args.n as usize, args.v as usize);
        let one_block = self.one_block_policy(args);
        if let Some((f, variant, name)) = self.cluster_rows.as_ref().filter(|_| !one_block) {
            let (f, variant) = (*f, *variant);
            if variant.persistent() {
                if self.persistent((f, name), variant, stream, args)? {
                    return Ok(());
                }
            } else if variant == cluster::Variant::Staged {
                if self.staged((f, name), stream, args)? {
                    return Ok(());
                }
            } else if let Some(c) = cluster::cluster_size(variant, n, v, sb + tb) {
                if cluster::rows_aligned(args, sb, tb) {
                    let smem = match variant {
                        cluster::Variant::Smem => cluster::slice(v, c) * (sb + tb),
                        _ => 0,
                    };
                    // A refused launch queues nothing: the one-block kernel below takes over.
                    let shape = (c, n);
                    match cluster::launch(
                        (f, name),
                        stream,
                        args,
                        None,
                        shape,
                        variant.threads(),
                        smem,
                    )? {
                        cluster::Launched::Queued => return Ok(()),
                        cluster::Launched::Refused(e) => cluster::note_refused_launch(c, smem, &e),
                    }
                }
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (args.n as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: DivergenceArgs has the kernel's C layout; the caller guarantees the shapes and
        // that every pointer is device memory of this device covering them.
        unsafe { stream.launch_builder(self.rows).arg(args).launch(cfg)? };
        Ok(())
    }

    /// Whether the policy picks the one-block kernel for these rows before trying a cluster
    /// kernel: many rows, or (forward only, one pass) enough rows to fill the card.
    fn one_block_policy(&self, args: &DivergenceArgs) -> bool {
        // One pass over the row has nothing to re-read: the one-block kernel streams it at
        // 96–100 % of the floor once a wave of blocks fills the card.
        let single_pass = args.grad == 0 && !self.fwd_multi_pass;
        let n = args.n as usize;
        !cluster::forced_by_env()
            && (n >= cluster::ONE_BLOCK_MIN_ROWS || (single_pass && n >= cluster::MIN_BLOCKS))
    }

    /// The fused linear divergence's chunk (f32 logits; `args.grad` = the student logits S and
    /// `args.grad_stride` S's row bytes in elements of G): queues a kernel that writes G — the
    /// gradient w.r.t. the raw logits in the GEMMs' dtype, softcap slope applied when `inv_cap`
    /// ≠ 0 — and returns where G starts (its row stride is `args.grad_stride`), or None, with
    /// nothing queued, for the caller's cluster kernel and separate conversion pass.
    ///
    /// - Where `rows` would run the one-block kernel: `kernels.one_block`
    ///   (`dk_div_fused_<kind>_<dtype>`, cuda/divergence.cu), G over S itself.
    /// - Where `rows` would run a persistent cluster variant (`DK_DIVERGENCE_CLUSTER=persist` /
    ///   `persist256`): `kernels.persistent` (`dk_divcp[256]_fused_*`,
    ///   cuda/divergence_persistent.cu) on Q ≤ `pad_rows` clusters, G of row r over the logits of
    ///   row r − Q (the row its cluster finished an iteration earlier): G starts Q rows of S
    ///   before S, in the `pad_rows` rows the caller reserved there.
    /// - Where `rows` would run the staged variant (`DK_DIVERGENCE_CLUSTER=staged`):
    ///   `kernels.cluster` (`dk_divcq_fused_*`, cuda/divergence_staged.cu), G of row r over S's
    ///   row r itself (every block has its slice of the row in shared memory before any writes
    ///   G): G starts at S.
    /// - Where the persistent or staged kernel cannot run (two rows fit no cluster, or the card
    ///   places none; noted): the one-block kernel, as above.
    /// - Otherwise (the smem and stream cluster variants, unaligned rows): None.
    pub(crate) fn fused_rows(
        &self,
        kernels: &FusedRowKernels<'_>,
        stream: &Arc<CudaStream>,
        args: &DivergenceArgs,
        inv_cap: f32,
        pad_rows: usize,
    ) -> Result<Option<u64>> {
        debug_assert_eq!(
            args.grad, args.student,
            "G is written over the student logits"
        );
        // Both kernels' in-place arguments are for their 16-byte steps: neither has a scalar
        // path for unaligned rows (the fused path's workspace rows always are aligned). G's
        // rows start at the student rows (grad_stride counts G's elements), so the f32 logits
        // decide.
        if !cluster::rows_aligned(&DivergenceArgs { grad: 0, ..*args }, 4, 4) {
            return Ok(None);
        }
        if let Some((_, variant, _)) = self.cluster_rows.as_ref() {
            if !self.one_block_policy(args) {
                let queued = match &kernels.cluster {
                    Some(f) if *variant == cluster::Variant::Staged => {
                        self.fused_staged(f, stream, (args, inv_cap))?
                    }
                    Some(f) => {
                        self.fused_persistent(f, *variant, stream, (args, inv_cap), pad_rows)?
                    }
                    // The smem and stream variants: the caller's cluster kernel and conversion.
                    None => return Ok(None),
                };
                if queued.is_some() {
                    return Ok(queued);
                }
                // The card placed no cluster of the variant (noted): the one-block kernel
                // below writes G over S instead.
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (args.n as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches dk_div_fused_*(DkDivergenceArgs, float): DivergenceArgs has the C
        // layout; the caller guarantees device memory covering the shapes, G over the student
        // rows with the same row byte stride (what the kernel is written for).
        unsafe {
            stream
                .launch_builder(kernels.one_block)
                .arg(args)
                .arg(&inv_cap)
                .launch(cfg)?
        };
        Ok(Some(args.grad))
    }

    /// [`Self::fused_rows`] on the persistent variant: G of row r over S row r − Q, Q at most
    /// `pad_rows` (the pad the caller reserved before S).
    fn fused_persistent(
        &self,
        &(f, ref name): &(&CudaFunction, String),
        variant: cluster::Variant,
        stream: &Arc<CudaStream>,
        (args, inv_cap): (&DivergenceArgs, f32),
        pad_rows: usize,
    ) -> Result<Option<u64>> {
        let launch = PersistentLaunch {
            elem_bytes: (4, 4),
            lag: if self.fwd_multi_pass { 2 } else { 1 },
            max_clusters: pad_rows,
            inv_cap: Some(inv_cap),
            grad_before_student: true,
            instead: "the one-block kernel (G over S)",
        };
        self.queue_persistent((f, name.as_str()), variant, stream, args, &launch)
    }

    /// [`Self::fused_rows`] on the staged variant: G of row r over S's row r (`args.grad` is S).
    fn fused_staged(
        &self,
        (f, name): &(&CudaFunction, String),
        stream: &Arc<CudaStream>,
        (args, inv_cap): (&DivergenceArgs, f32),
    ) -> Result<Option<u64>> {
        let instead = "the one-block kernel (G over S)";
        // S and T are f32: JSD's stash goes over T's slice.
        let stash = cluster::Stash::for_rows(self.fwd_multi_pass, args.grad != 0, 4);
        let launch = ((4, 4), stash, Some(&inv_cap));
        let queued = self.queue_staged((f, name), stream, args, launch, instead)?;
        Ok(queued.then_some(args.grad))
    }

    /// Sizes a persistent kernel's grid (`persistent_grid`, at most `launch.max_clusters`
    /// clusters) and queues it; the gradient pointer it was given (Some) or None, with nothing
    /// queued, where the card places no cluster of `f` or refuses the launch (both noted).
    fn queue_persistent(
        &self,
        (f, name): (&CudaFunction, &str),
        variant: cluster::Variant,
        stream: &Arc<CudaStream>,
        args: &DivergenceArgs,
        launch: &PersistentLaunch<'_>,
    ) -> Result<Option<u64>> {
        let (n, v) = (args.n as usize, args.v as usize);
        let device = (self.l2_bytes, self.sm_count);
        let grid = cluster::persistent_grid(
            f,
            stream,
            variant,
            (n, v),
            launch.elem_bytes,
            launch.lag,
            device,
        )?
        .map(|(c, clusters)| (c, clusters.min(launch.max_clusters)))
        .filter(|&(_, q)| q > 0);
        let Some((c, q)) = grid else {
            cluster::note_fallback(format!(
                "the card places no cluster of {name} for V = {v}; such rows run {}",
                launch.instead
            ));
            return Ok(None);
        };
        let mut args = *args;
        if launch.grad_before_student {
            // The kernel's shift is its number of clusters (gridDim.x / c): the same q sets the
            // grid below and G's start here.
            args.grad =
                args.student - (q * launch.elem_bytes.0 * args.student_stride as usize) as u64;
        }
        let smem = cluster::PERSISTENT_SMEM_BYTES;
        let kernel = (f, name);
        match cluster::launch(
            kernel,
            stream,
            &args,
            launch.inv_cap.as_ref(),
            (c, q),
            variant.threads(),
            smem,
        )? {
            cluster::Launched::Queued => Ok(Some(args.grad)),
            cluster::Launched::Refused(e) => {
                cluster::note_refused_launch(c, smem, &e);
                Ok(None)
            }
        }
    }

    /// Queues the persistent cluster kernel (`DK_DIVERGENCE_CLUSTER=persist`) when the rows are
    /// 16-byte aligned and the card places its clusters; false when the caller must run the
    /// one-block kernel instead (nothing queued).
    fn persistent(
        &self,
        (f, name): (&CudaFunction, &str),
        variant: cluster::Variant,
        stream: &Arc<CudaStream>,
        args: &DivergenceArgs,
    ) -> Result<bool> {
        let (sb, tb) = self.elem_bytes;
        if !cluster::rows_aligned(args, sb, tb) {
            return Ok(false);
        }
        // Iterations between a row's statistics and its last re-read: the gradient of the KL
        // kinds follows one iteration later; JSD's mixture pass one, its gradient two.
        let launch = PersistentLaunch {
            elem_bytes: (sb, tb),
            lag: if self.fwd_multi_pass && args.grad != 0 {
                2
            } else {
                1
            },
            max_clusters: usize::MAX,
            inv_cap: None,
            grad_before_student: false,
            instead: "the one-block kernel",
        };
        Ok(self
            .queue_persistent((f, name), variant, stream, args, &launch)?
            .is_some())
    }

    /// Queues the staged cluster kernel (`DK_DIVERGENCE_CLUSTER=staged`,
    /// cuda/divergence_staged.cu) when the rows are 16-byte aligned, two of their slices fit a
    /// block's shared memory and the card places the clusters; false when the caller must run
    /// the one-block kernel instead (nothing queued; why is noted).
    fn staged(
        &self,
        (f, name): (&CudaFunction, &str),
        stream: &Arc<CudaStream>,
        args: &DivergenceArgs,
    ) -> Result<bool> {
        let (sb, tb) = self.elem_bytes;
        if !cluster::rows_aligned(args, sb, tb) {
            cluster::note_fallback(format!(
                "{name} copies 16-byte pieces: rows not 16-byte aligned run the one-block kernel"
            ));
            return Ok(false);
        }
        // JSD (the kind with a pass after the statistics) keeps log2(q/m) for its gradient.
        let stash = cluster::Stash::for_rows(self.fwd_multi_pass, args.grad != 0, tb);
        self.queue_staged(
            (f, name),
            stream,
            args,
            ((sb, tb), stash, None),
            "the one-block kernel",
        )
    }

    /// Sizes a staged kernel's grid (`staged_grid`; bytes per student and teacher element, the
    /// JSD stash asked for, `inv_cap` the fused kernels' second parameter) and
    /// queues it, with the stash's option bit where it has room; false, with nothing queued and
    /// the reason noted (`instead`: what runs then), where two rows fit no cluster, the card
    /// places none, or it refuses the launch.
    fn queue_staged(
        &self,
        (f, name): (&CudaFunction, &str),
        stream: &Arc<CudaStream>,
        args: &DivergenceArgs,
        (elem_bytes, stash, inv_cap): ((usize, usize), cluster::Stash, Option<&f32>),
        instead: &str,
    ) -> Result<bool> {
        let (n, v) = (args.n as usize, args.v as usize);
        let stash = (stash, args.grad != 0);
        let Some(shape) =
            cluster::staged_grid(f, stream, (n, v), elem_bytes, stash, self.sm_count)?
        else {
            cluster::note_fallback(format!(
                "two rows of V = {v} do not fit the shared memory of 16 blocks of {name}, or the \
                 card places no such cluster; such rows run {instead}"
            ));
            return Ok(false);
        };
        let cluster::StagedShape {
            c,
            clusters,
            smem,
            stash,
        } = shape;
        let args = DivergenceArgs {
            options: args.options | stash.options(),
            ..*args
        };
        let threads = cluster::Variant::Staged.threads();
        match cluster::launch(
            (f, name),
            stream,
            &args,
            inv_cap,
            (c, clusters),
            threads,
            smem,
        )? {
            cluster::Launched::Queued => Ok(true),
            cluster::Launched::Refused(e) => {
                cluster::note_refused_launch(c, smem, &e);
                Ok(false)
            }
        }
    }

    /// Queues `dk_div_finish`: `loss = *scale · Σ per_row[0..n]` (f64, fixed order).
    pub(crate) fn finish(
        &self,
        stream: &Arc<CudaStream>,
        per_row: u64,
        n: i64,
        scale: u64,
        loss: u64,
    ) -> Result<()> {
        // SAFETY: matches dk_div_finish(const float*, int64_t, const float*, float*); device
        // pointers of this device from the caller.
        unsafe {
            stream
                .launch_builder(self.finish)
                .arg(&per_row)
                .arg(&n)
                .arg(&scale)
                .arg(&loss)
                .launch(SINGLE_BLOCK)?;
        }
        Ok(())
    }
}

/// Queues the divergence on the caller's stream.
pub(crate) fn divergence(
    dev: &CudaDevice,
    raw: &RawDivergence,
    params: &Params,
    launch: &Launch<'_>,
) -> Result<()> {
    for (what, p) in [
        ("student logits", raw.student as *const _),
        ("teacher logits", raw.teacher as *const _),
        ("gradient", raw.grad as *const _),
        ("labels", raw.labels as *const _),
        ("per-token loss", raw.per_token as *const _),
        ("loss", raw.loss as *const _),
        ("num_items", raw.num_items as *const _),
    ] {
        dev.check_pointer(what, p)?;
    }
    let need = workspace_size(raw.n);
    // It holds the f32 loss scale and per-row f32 partial results.
    dev.check_workspace(launch, need, 4, &format!("N = {}", raw.n))?;
    let kernels = RowKernels::new(
        dev,
        params.effective_kind(),
        params.beta,
        raw.student_dtype,
        raw.teacher_dtype,
    )?;

    // SAFETY: the caller of the safe API handed a live stream of this device (Launch::on_stream
    // is unsafe for that reason), or null for the legacy default stream.
    let stream = unsafe { dev.borrow_stream(launch.stream) };
    // Library-owned workspace (when none is given): allocated and freed in stream order.
    let (ws_base, owned) = dev.workspace(launch, &stream, need)?;
    let scale_ptr = ws_base;
    let per_row = if raw.per_token.is_null() {
        ws_base + PER_ROW_OFFSET as u64
    } else {
        raw.per_token as u64
    };

    let n = raw.n as i64;
    let labels = raw.labels as u64;
    kernels.prepare(&stream, labels, n, params, raw.num_items as u64, scale_ptr)?;

    let args = DivergenceArgs {
        student: raw.student as u64,
        teacher: raw.teacher as u64,
        grad: raw.grad as u64,
        labels,
        per_row,
        scale: scale_ptr,
        n,
        v: raw.v as i64,
        student_stride: raw.student_stride as i64,
        teacher_stride: raw.teacher_stride as i64,
        grad_stride: raw.grad_stride as i64,
        ignore_index: params.ignore_index,
        beta: params.beta,
        inv_temperature: 1.0 / params.temperature,
        options: 0,
    };
    // The shapes were validated and every pointer checked to be device memory of this device.
    kernels.rows(&stream, &args)?;

    if !raw.loss.is_null() {
        kernels.finish(&stream, per_row, n, scale_ptr, raw.loss as u64)?;
    }
    drop(owned); // stream-ordered free after the kernels that use it
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_tails_are_taken_at_the_extremes_of_beta_only() {
        // The boundary min(β, 1 − β) = 2⁻⁵ itself, and 1 − 2⁻⁵ (1 − β exact there), stay ordinary.
        for beta in [
            1e-30f32,
            1e-7,
            1e-3,
            0.01,
            0.031,
            0.969,
            0.999,
            1.0 - 2f32.powi(-24),
        ] {
            assert!(jsd_series_tails(beta), "beta {beta}");
        }
        for beta in [1.0f32 / 32.0, 0.032, 0.1, 0.5, 0.9, 0.968, 1.0 - 1.0 / 32.0] {
            assert!(!jsd_series_tails(beta), "beta {beta}");
        }
    }

    #[test]
    fn every_kernel_the_launchers_name_is_listed() {
        let dtypes = [DType::F32, DType::BF16, DType::F16];
        let prefixes = [
            "dk_div_",
            "dk_divc_",
            "dk_divcs_",
            "dk_divcp_",
            "dk_divcp256_",
            "dk_divcq_",
        ];
        for (kind, beta) in [
            (Kind::ForwardKl, 0.5f32),
            (Kind::ReverseKl, 0.5),
            (Kind::Jsd, 0.5),
            (Kind::Jsd, 1e-3),
        ] {
            let tag = kind_tag(kind, beta);
            for s in dtypes {
                for t in dtypes {
                    for prefix in prefixes {
                        let name = row_kernel_name(tag, s, t).replace("dk_div_", prefix);
                        assert!(KERNEL_NAMES.contains(&name.as_str()), "{name}");
                    }
                }
                let fused = format!("dk_div_fused_{tag}_{}", s.name());
                assert!(
                    crate::fused::cuda::KERNEL_NAMES.contains(&fused.as_str()),
                    "{fused}"
                );
                for prefix in ["dk_divcp_", "dk_divcp256_", "dk_divcq_"] {
                    let name = format!("{prefix}fused_{tag}_{}", s.name());
                    assert!(KERNEL_NAMES.contains(&name.as_str()), "{name}");
                }
            }
        }
        assert_eq!(kind_tag(Kind::Jsd, 1e-3), "jsdx");
        assert_eq!(kind_tag(Kind::Jsd, 0.5), "jsd");
    }
}
