//! CUDA backend of the fused linear divergence: cuBLAS matrix products (cudarc, `libcublas`
//! loaded at run time) around the divergence's row kernel and the elementwise kernels of
//! `cuda/fused.cu`, chunk by chunk on the caller's stream. Design, memory and costs:
//! `cuda/FUSED.md`.
//!
//! Per chunk of `c` rows, with `S` and `T` the chunk's f32 logits in the workspace
//! (`c × ld` each, `ld` = V rounded up to 8, `T` right after `S`, a pad of rows of stride `ld`
//! before `S`, at least 32 and up to 32 MiB, never more than the chunk):
//!
//! 1. `S = logit_scale · Xs Wsᵀ`, `T = logit_scale · Xt Wtᵀ` (two GEMMs, f32 output, f32 compute);
//! 2. with a softcap, `dk_fused_softcap` in place over `S` and `T`;
//! 3. the divergence of the chunk with a loss scale of `g_scale` (1, or for f16 `G` a power of
//!    two that lifts it out of f16's subnormals), its per-row losses into the chunk's
//!    slice of the per-row buffer. Where the divergence's policy runs one block per row (every
//!    chunk of ≥ 512 rows, and every chunk off Hopper), `dk_div_fused_<kind>_<dtype>`
//!    (cuda/divergence.cu) writes `G`, the gradient w.r.t. the raw logits (softcap slope
//!    included), in the input dtype straight over `S` (row stride `2·ld` for bf16/f16, `ld` for
//!    f32), and step 4 is skipped. Where it runs a persistent cluster variant
//!    (`DK_DIVERGENCE_CLUSTER=persist` / `persist256`), `dk_divcp[256]_fused_<kind>_<dtype>`
//!    (cuda/divergence_persistent.cu) writes `G` of row r over `S` row r − Q (Q clusters, the
//!    row the cluster finished before; the first rows' G in the pad), so `G` starts Q rows
//!    before `S`, and step 4 is skipped. Under the staged cluster variant
//!    (`DK_DIVERGENCE_CLUSTER=staged`), `dk_divcq_fused_<kind>_<dtype>`
//!    (cuda/divergence_staged.cu) writes `G` of row r over `S` row r itself (each block holds
//!    its slice of the row in shared memory before any block writes G), and step 4 is skipped.
//!    Otherwise (short chunks on Hopper under the stream or smem cluster variant) the row kernel writes the gradient w.r.t. the capped logits over
//!    `T` (each element read and written by the same thread), and
//! 4. `dk_fused_grad_<dtype>`: `G = T · (1 − (S/cap)²)` converted to the input dtype and written
//!    over `S` (bf16/f16, row stride `2·ld`), or over `T` in place (f32; skipped without softcap);
//! 5. `grad_hidden[chunk] = α · G Ws` and `grad_weight (+)= α · Gᵀ Xs[chunk]`, `α` = loss scale ×
//!    logit_scale / `g_scale` read from device memory (the scale is only known on the device: it
//!    counts the valid labels), `β` = 1 when accumulating (and for `grad_weight` after the first
//!    chunk).
//!
//! Before the chunks `dk_div_prepare` writes the loss scale over all N labels and
//! `dk_fused_constants` derives `α` and the constants 0 and 1 that `β` points to; after them
//! `dk_div_finish` reduces the N per-row losses once.
//!
//! ## Row-major operands through column-major cuBLAS
//!
//! A row-major `[r, k]` matrix with row stride `s` is, read column-major with leading dimension
//! `s`, its transpose (`k × r`). So, with every matrix below stored row-major:
//!
//! - logits `L[c, V] = X[c, H] · W[V, H]ᵀ` ⇔ `Lᵀ (V×c) = W (V×H) · Xᵀ (H×c)`: the W buffer read
//!   column-major is `Wᵀ` (H×V), so `transa = T` (lda = W's row stride), the X buffer is `Xᵀ`,
//!   `transb = N` (ldb = X's row stride), `C` = L's buffer (ldc = `ld`); `m = V, n = c, k = H`.
//! - `grad_hidden GH[c, H] = G[c, V] · W[V, H]` ⇔ `GHᵀ (H×c) = Wᵀ (H×V) · Gᵀ (V×c)`: `transa = N`
//!   on the W buffer, `transb = N` on the G buffer (ldb = G's row stride), `C` = GH's buffer;
//!   `m = H, n = c, k = V`.
//! - `grad_weight GW[V, H] = Gᵀ[V, c] · X[c, H]` ⇔ `GWᵀ (H×V) = Xᵀ (H×c) · G (c×V)`: `transa = N`
//!   on the X buffer, `transb = T` on the G buffer, `C` = GW's buffer; `m = H, n = V, k = c`.
//!
//! (PyTorch's `F.linear` and its two backward products use the same TN / NN / NT forms.)

use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::result::{self as blas, CublasError};
use cudarc::cublas::sys as bsys;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::{FusedLinearParams, RawFusedLinear};
use crate::device::{CudaDevice, Launch};
use crate::divergence::cuda::{DivergenceArgs, FusedRowKernels, RowKernels};
use crate::error::{bail, Error, ErrorKind, Result};
use crate::tensor::DType;

/// Every kernel of `cuda/fused.cu`, loaded when a CUDA context opens.
pub(crate) const KERNEL_NAMES: &[&str] = &[
    "dk_fused_constants",
    "dk_fused_softcap",
    "dk_fused_grad_f32",
    "dk_fused_grad_bf16",
    "dk_fused_grad_f16",
    // cuda/divergence.cu: the chunk's divergence writing G itself (FusedGradSink).
    "dk_div_fused_fkl_f32",
    "dk_div_fused_fkl_bf16",
    "dk_div_fused_fkl_f16",
    "dk_div_fused_rkl_f32",
    "dk_div_fused_rkl_bf16",
    "dk_div_fused_rkl_f16",
    "dk_div_fused_jsd_f32",
    "dk_div_fused_jsd_bf16",
    "dk_div_fused_jsd_f16",
    "dk_div_fused_jsdx_f32",
    "dk_div_fused_jsdx_bf16",
    "dk_div_fused_jsdx_f16",
];

/// Alignment of every region of the workspace (cuBLAS wants 256 bytes for its workspace).
const ALIGN: usize = 256;
/// cuBLAS's workspace, handed to it with `cublasSetWorkspace` on every call: NVIDIA recommends
/// 32 MiB on Hopper (4 MiB before). Our own buffer makes concurrent calls on different streams
/// safe (cuBLAS's default pool is shared by the handle's streams) and keeps cuBLAS from
/// allocating inside a CUDA graph capture.
const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Automatic chunks: the chunk's two f32 logit buffers stay within this many bytes.
const AUTO_CHUNK_BYTES: usize = 3 << 29; // 1.5 GiB
/// Automatic chunks are multiples of this many rows (GEMM tiles), unless one chunk holds all N.
const CHUNK_MULTIPLE: usize = 64;
/// Threads per block of the elementwise kernels (`kThreads` in fused.cu).
const THREADS: u32 = 256;

/// The constant block at the start of the workspace (f32 indices).
const C_ZERO: usize = 0;
const C_ONE: usize = 1;
const C_SCALE: usize = 2;
const C_GRAD_ALPHA: usize = 3;
const C_G_SCALE: usize = 4;

/// The power of two the divergence kernels scale `G` by (their loss scale; `α` divides it out):
/// 1 for bf16 and f32, whose exponent range is f32's. f16 normals end at 6.1e-5, and at large
/// vocabularies most entries of `G = (q − p) / T` lie below that: at V = 262144, T = 4 the f16
/// `G` put a 1.4e-1 relative error into `grad_hidden` (a float64 model; 2e-4 with this scale).
/// So f16 `G` is scaled towards f16's top: `|G| ≤ b / T`, with `b` a bound on `T·|∂L/∂s|` of
/// the kind, and `2^k ≤ 2^15 · T / b`:
/// - forward KL: `|q − p| ≤ 1`, so `b` = 1;
/// - JSD with β < 1: `(1 − β) q |ln(q/m) − KL(q ‖ m)| ≤ (1 − β)(1/e + ln(1 / (1 − β))) ≤ 2/e`
///   (`q/m ≤ 1 / (1 − β)`, `q ln(q/m) ≥ −m/e`), so `b` = 1 too (β = 0 is forward KL);
/// - reverse KL (and JSD with β = 1): `q |ln(q/p) − L|` has no bound; `b` = 1024 keeps it finite
///   up to ~2047 (log ratios of ~2000 nats: logit gaps of 2000·T, far past a real lm_head's),
///   where the unscaled f16 `G` overflowed past 65504·T.
///
/// The exponent stays in [−111, 64], where `2^k` and `2^−k` are normal floats.
fn g_scale(dtype: DType, div: &crate::divergence::Params) -> f32 {
    use crate::divergence::Kind;
    if dtype != DType::F16 {
        return 1.0;
    }
    let bound = if div.effective_kind() == Kind::ReverseKl {
        1024.0
    } else {
        1.0
    };
    let k = (32768.0 * div.temperature as f64 / bound).log2().floor();
    (k.clamp(-111.0, 64.0) as i32 as f64).exp2() as f32
}

/// Row stride (f32 elements) of the chunk's logit buffers: 32-byte aligned rows, so the
/// kernels' 16-byte vectors and cuBLAS's aligned paths apply, also to the bf16/f16 `G` written
/// over them with row stride `2·ld`.
fn logits_ld(v: usize) -> usize {
    v.next_multiple_of(8)
}

/// The pad before S: where the persistent chunk kernel writes the G rows of its clusters'
/// first rows (G of row r goes over S row r − Q, Q the clusters it runs:
/// `RowKernels::fused_rows`), so at most that many clusters run it. At least
/// [`G_PAD_MIN_ROWS`] rows (the card places ≤ 16 clusters at V ≈ 200k in f32, C = 16), more
/// while they fit [`G_PAD_BYTES`] (smaller vocabularies run smaller clusters, more of them:
/// 66 of 4 blocks at V = 32000 on an H100), never more than the chunk.
const G_PAD_MIN_ROWS: usize = 32;
const G_PAD_BYTES: usize = 32 << 20;

/// Rows of the pad before S for chunks of `chunk` rows of stride `ld` (f32 elements).
fn g_pad_rows(chunk: usize, ld: usize) -> usize {
    (G_PAD_BYTES / (4 * ld.max(1)))
        .max(G_PAD_MIN_ROWS)
        .min(chunk)
}

/// Rows per chunk: the request (clamped to [1, N]) or, automatically, the largest multiple of
/// 64 rows whose two f32 logit buffers fit in 1.5 GiB (at least 64), balanced over the chunks
/// that N then needs (so the last chunk is not a sliver), and at most N.
pub(crate) fn chunk_rows(n: usize, v: usize, requested: Option<usize>) -> usize {
    let n = n.max(1);
    if let Some(c) = requested {
        return c.clamp(1, n);
    }
    let per_row = 2 * 4 * logits_ld(v.max(1));
    let max = (AUTO_CHUNK_BYTES / per_row / CHUNK_MULTIPLE * CHUNK_MULTIPLE).max(CHUNK_MULTIPLE);
    if n <= max {
        return n;
    }
    let chunks = n.div_ceil(max);
    n.div_ceil(chunks).next_multiple_of(CHUNK_MULTIPLE).min(max)
}

/// The row counts of the chunks, in order, for chunks of at most `chunk` rows (what
/// [`chunk_rows`] chose). A requested chunk size is taken as it is: full chunks, then the rest.
/// Automatic chunks are balanced in 64-row units, the larger ones first, so no chunk is a
/// sliver: 16384 rows in chunks of ≤ 960 are 4 × 960 + 14 × 896, not 17 × 960 + 64 (a sliver
/// runs its GEMMs on 64 rows and still reads and writes the whole weight gradient).
fn chunk_plan(n: usize, chunk: usize, automatic: bool) -> Vec<usize> {
    let chunk = chunk.max(1);
    let chunks = n.div_ceil(chunk);
    if !automatic || chunks <= 1 {
        return (0..chunks).map(|k| chunk.min(n - k * chunk)).collect();
    }
    let units = n.div_ceil(CHUNK_MULTIPLE);
    let (base, extra) = (units / chunks, units % chunks);
    let mut plan: Vec<usize> = (0..chunks)
        .map(|k| (base + usize::from(k < extra)) * CHUNK_MULTIPLE)
        .collect();
    // The last unit may be short: the last chunk gives the difference back.
    *plan.last_mut().unwrap() -= units * CHUNK_MULTIPLE - n;
    plan
}

/// Byte offsets of the workspace regions, relative to the workspace start rounded up to 256.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Rows per chunk.
    chunk: usize,
    /// Row stride of the logit buffers (f32 elements).
    ld: usize,
    /// Per-row losses `[N]` (f32) when the caller gave no per-token buffer.
    per_row: Option<usize>,
    /// Rows of the pad before `S` ([`g_pad_rows`]).
    pad: usize,
    /// `S` (`chunk × ld` f32), then `T` right after the chunk's rows of `S`; the pad (`pad`
    /// rows of stride `ld`, rounded up to 256 bytes) right before `S`.
    logits: usize,
    /// cuBLAS's workspace.
    cublas: usize,
    /// Total bytes, including 256 bytes of slack to align an unaligned workspace pointer.
    total: usize,
}

/// The workspace layout of a call; a shape error where its bytes would pass the address space
/// (N and V near their limits: unchecked, the size wrapped to a small number and the chunk
/// buffers landed outside the workspace).
fn layout(raw: &RawFusedLinear, params: &FusedLinearParams) -> Result<Layout> {
    let chunk = chunk_rows(raw.n, raw.v, params.chunk_rows);
    let ld = logits_ld(raw.v);
    // In u128, where nothing overflows (chunk ≤ N < 2^63, ld < 2^31); the offsets grow, so the
    // total bounds them all.
    let f32_blocks = |count: u128| (4 * count).next_multiple_of(ALIGN as u128);
    let mut off = ALIGN as u128; // the constant block (5 floats used)
    let per_row = if raw.per_token.is_null() {
        let at = off;
        off += f32_blocks(raw.n as u128);
        Some(at)
    } else {
        None
    };
    let pad = g_pad_rows(chunk, ld);
    off += f32_blocks(pad as u128 * ld as u128);
    let logits = off;
    off += f32_blocks(2 * chunk as u128 * ld as u128);
    let cublas = off;
    let total = off + (CUBLAS_WORKSPACE + ALIGN) as u128;
    if total > isize::MAX as u128 {
        bail!(
            Shape,
            "the fused workspace of N = {}, V = {} in chunks of {chunk} rows passes the address \
             space (pass a smaller chunk_rows)",
            raw.n,
            raw.v
        );
    }
    Ok(Layout {
        chunk,
        ld,
        per_row: per_row.map(|at| at as usize),
        pad,
        logits: logits as usize,
        cublas: cublas as usize,
        total: total as usize,
    })
}

/// cuBLAS's 32-bit sizes and row strides of a call (0 for a gradient not requested).
struct GemmInts {
    v: i32,
    h: i32,
    ht: i32,
    /// The chunk logits' row stride (f32 elements).
    ld: i32,
    student_hidden: i32,
    student_weight: i32,
    teacher_hidden: i32,
    teacher_weight: i32,
    grad_hidden: i32,
    grad_weight: i32,
}

/// Checks every size the GEMMs take as an `int` up front, so that no GEMM fails halfway and
/// the size query refuses what the call refuses.
fn gemm_ints(raw: &RawFusedLinear, lay: &Layout) -> Result<GemmInts> {
    to_i32("N", raw.n)?;
    if raw.dtype != DType::F32 {
        // A 16-bit G over S has a row stride of S's row bytes: 2·ld of its elements.
        to_i32("the bf16/f16 gradient row stride", 2 * lay.ld)?;
    }
    let grad = |wanted: bool, what: &str, stride: usize| {
        if wanted {
            to_i32(what, stride)
        } else {
            Ok(0)
        }
    };
    Ok(GemmInts {
        v: to_i32("V", raw.v)?,
        h: to_i32("H", raw.h)?,
        ht: to_i32("Ht", raw.ht)?,
        ld: to_i32("the chunk logits' row stride", lay.ld)?,
        student_hidden: to_i32("student hidden row stride", raw.student_hidden_stride)?,
        student_weight: to_i32("student weight row stride", raw.student_weight_stride)?,
        teacher_hidden: to_i32("teacher hidden row stride", raw.teacher_hidden_stride)?,
        teacher_weight: to_i32("teacher weight row stride", raw.teacher_weight_stride)?,
        grad_hidden: grad(
            !raw.grad_hidden.is_null(),
            "grad_hidden row stride",
            raw.grad_hidden_stride,
        )?,
        grad_weight: grad(
            !raw.grad_weight.is_null(),
            "grad_weight row stride",
            raw.grad_weight_stride,
        )?,
    })
}

/// Exact bytes of device workspace [`fused_linear`] uses for this call; what the call would
/// refuse for its sizes (the workspace's or cuBLAS's 32-bit ones) is refused here too.
pub(crate) fn workspace_size(raw: &RawFusedLinear, params: &FusedLinearParams) -> Result<usize> {
    let lay = layout(raw, params)?;
    gemm_ints(raw, &lay)?;
    Ok(lay.total)
}

// ---- cuBLAS: loading and the per-device handle ------------------------------------------------

/// The cuBLAS entry points used here: checked once, so a library without one of them is an
/// error instead of a panic inside cudarc's loader.
const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetWorkspace_v2",
    "cublasSetPointerMode_v2",
    "cublasSetMathMode",
    "cublasSetAtomicsMode",
    "cublasGemmEx",
];

/// Ok when libcublas can be loaded with every symbol used here. Success is cached; a failure is
/// checked again on the next call (a host process may load libcublas later, e.g. with torch).
fn cublas_loadable() -> Result<()> {
    static PRESENT: OnceLock<()> = OnceLock::new();
    if PRESENT.get().is_some() {
        return Ok(());
    }
    // SAFETY: only tries to dlopen the library; no cuBLAS call is made.
    if !unsafe { bsys::is_culib_present() } {
        bail!(
            NoDevice,
            "cuBLAS (libcublas) could not be loaded: the fused linear divergence needs it for its \
             matrix products (install cuBLAS 12 or 13, e.g. the CUDA toolkit or the nvidia-cublas \
             wheel, and make libcublas.so findable through LD_LIBRARY_PATH)"
        );
    }
    // SAFETY: the library loads (checked above), so `culib` does not panic; symbol lookups only.
    let lib = unsafe { bsys::culib() };
    for &name in CUBLAS_SYMBOLS {
        // SAFETY: a lookup; the symbol is never called through this pointer.
        if unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err() {
            bail!(
                NoDevice,
                "cuBLAS (libcublas) was loaded but has no {name}: cuBLAS 11.4 or newer is needed"
            );
        }
    }
    let _ = PRESENT.set(());
    Ok(())
}

fn blas_error(what: &str, e: CublasError) -> Error {
    Error::new(ErrorKind::Cuda, format!("cuBLAS {what} failed: {:?}", e.0))
}

fn blas_check(what: &str, status: bsys::cublasStatus_t) -> Result<()> {
    status.result().map_err(|e| blas_error(what, e))
}

/// One cuBLAS handle of a device's primary context. It keeps the context alive, so it is
/// destroyed while its context still exists whatever order `CudaDevice` drops its fields in.
struct BlasHandle {
    handle: bsys::cublasHandle_t,
    ctx: Arc<CudaContext>,
}

// SAFETY: a cuBLAS handle may be used from any thread as long as calls are not concurrent; the
// `Mutex` in `BlasSlot` serialises them.
unsafe impl Send for BlasHandle {}

impl BlasHandle {
    fn create(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread()?;
        let handle = blas::create_handle().map_err(|e| {
            blas_error("cublasCreate (is libcublas newer than the CUDA driver?)", e)
        })?;
        let this = BlasHandle {
            handle,
            ctx: ctx.clone(),
        };
        // SAFETY: a live handle; plain setters. Tensor cores for bf16/f16 (f32 compute), no TF32
        // for f32 inputs (CUBLAS_DEFAULT_MATH), no atomics (reproducible results).
        unsafe {
            blas_check(
                "cublasSetMathMode",
                bsys::cublasSetMathMode(handle, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH),
            )?;
            blas_check(
                "cublasSetAtomicsMode",
                bsys::cublasSetAtomicsMode(
                    handle,
                    bsys::cublasAtomicsMode_t::CUBLAS_ATOMICS_NOT_ALLOWED,
                ),
            )?;
        }
        Ok(this)
    }
}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created by cublasCreate and destroyed once, here. Errors (e.g. at process
            // exit, when the driver is already shutting down) are ignored.
            let _ = unsafe { blas::destroy_handle(self.handle) };
        }
    }
}

/// The lazily created cuBLAS handle of a [`CudaDevice`], behind a mutex: a handle's stream and
/// workspace are handle state, so one call's GEMMs must not interleave with another thread's.
#[derive(Default)]
pub(crate) struct BlasSlot(Mutex<Option<BlasHandle>>);

impl std::fmt::Debug for BlasSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlasSlot")
    }
}

impl BlasSlot {
    /// Locks the slot, creating the handle on first use.
    fn acquire(&self, ctx: &Arc<CudaContext>) -> Result<MutexGuard<'_, Option<BlasHandle>>> {
        // A panic while the lock was held cannot leave the handle half-made: keep using it.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(BlasHandle::create(ctx)?);
        }
        Ok(guard)
    }
}

/// The handle [`BlasSlot::acquire`] holds (always present once acquired).
fn handle_of(guard: &Option<BlasHandle>) -> Result<bsys::cublasHandle_t> {
    match guard {
        Some(b) => Ok(b.handle),
        None => bail!(
            Cuda,
            "cuBLAS handle missing after creation (a bug: please report it)"
        ),
    }
}

fn cuda_type(d: DType) -> bsys::cudaDataType {
    match d {
        DType::F32 => bsys::cudaDataType::CUDA_R_32F,
        DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => bsys::cudaDataType::CUDA_R_16F,
    }
}

/// One `cublasGemmEx` in column-major terms (see the module docs for the row-major mapping).
struct Gemm {
    transa: bool,
    transb: bool,
    m: i32,
    n: i32,
    k: i32,
    a: u64,
    a_type: DType,
    lda: i32,
    b: u64,
    b_type: DType,
    ldb: i32,
    c: u64,
    c_type: DType,
    ldc: i32,
}

impl Gemm {
    /// # Safety
    /// A live handle whose stream and workspace are set; `a`, `b`, `c` device memory covering
    /// the shapes; `alpha` / `beta` f32 pointers valid in the handle's current pointer mode.
    unsafe fn run(
        &self,
        handle: bsys::cublasHandle_t,
        alpha: *const c_void,
        beta: *const c_void,
        what: &str,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // SAFETY: forwarded from the caller.
        let r = unsafe {
            blas::gemm_ex(
                handle,
                op(self.transa),
                op(self.transb),
                self.m,
                self.n,
                self.k,
                alpha,
                self.a as *const c_void,
                cuda_type(self.a_type),
                self.lda,
                self.b as *const c_void,
                cuda_type(self.b_type),
                self.ldb,
                beta,
                self.c as *mut c_void,
                cuda_type(self.c_type),
                self.ldc,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        r.map_err(|e| blas_error(&format!("cublasGemmEx ({what})"), e))
    }
}

/// A row-major matrix operand of a product: device address and row stride (elements).
#[derive(Debug, Clone, Copy)]
struct Operand {
    ptr: u64,
    ld: i32,
}

/// The three products of the operation, in row-major terms (`rows` tokens, vocabulary `v`,
/// hidden size `h`; `dt` the dtype of the hidden states and weights). The fused call and the
/// reference GEMMs build them here, so both time the same cuBLAS calls.
impl Gemm {
    /// `out [rows, V]` (`out_type`: f32 in the operation) = `x [rows, H]` · `w [V, H]`ᵀ: a
    /// chunk's logits.
    fn logits(
        dt: DType,
        (rows, h, v): (i32, i32, i32),
        x: Operand,
        w: Operand,
        out: Operand,
        out_type: DType,
    ) -> Gemm {
        Gemm {
            transa: true,
            transb: false,
            m: v,
            n: rows,
            k: h,
            a: w.ptr,
            a_type: dt,
            lda: w.ld,
            b: x.ptr,
            b_type: dt,
            ldb: x.ld,
            c: out.ptr,
            c_type: out_type,
            ldc: out.ld,
        }
    }

    /// `out [rows, H]` (`out_type`) = `g [rows, V]` · `w [V, H]`: the gradient of the hidden
    /// states from the logits' gradient `g` (in `dt`).
    fn grad_hidden(
        dt: DType,
        (rows, h, v): (i32, i32, i32),
        g: Operand,
        w: Operand,
        out: Operand,
        out_type: DType,
    ) -> Gemm {
        Gemm {
            transa: false,
            transb: false,
            m: h,
            n: rows,
            k: v,
            a: w.ptr,
            a_type: dt,
            lda: w.ld,
            b: g.ptr,
            b_type: dt,
            ldb: g.ld,
            c: out.ptr,
            c_type: out_type,
            ldc: out.ld,
        }
    }

    /// `out [V, H]` (`out_type`) = `g [rows, V]`ᵀ · `x [rows, H]`: the weight's gradient.
    fn grad_weight(
        dt: DType,
        (rows, h, v): (i32, i32, i32),
        g: Operand,
        x: Operand,
        out: Operand,
        out_type: DType,
    ) -> Gemm {
        Gemm {
            transa: false,
            transb: true,
            m: h,
            n: v,
            k: rows,
            a: x.ptr,
            a_type: dt,
            lda: x.ld,
            b: g.ptr,
            b_type: dt,
            ldb: g.ld,
            c: out.ptr,
            c_type: out_type,
            ldc: out.ld,
        }
    }
}

/// Points the handle at the caller's stream and at `workspace` (CUBLAS_WORKSPACE bytes, 256-byte
/// aligned). SetStream resets the workspace, so it comes first.
///
/// # Safety
/// A live handle that this thread holds; `stream` a live stream of the handle's context;
/// `workspace` device memory that outlives the work queued with the handle.
unsafe fn bind_handle(
    handle: bsys::cublasHandle_t,
    stream: &CudaStream,
    workspace: u64,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        blas_check(
            "cublasSetStream",
            bsys::cublasSetStream_v2(handle, stream.cu_stream() as bsys::cudaStream_t),
        )?;
        blas_check(
            "cublasSetWorkspace",
            bsys::cublasSetWorkspace_v2(handle, workspace as *mut c_void, CUBLAS_WORKSPACE),
        )
    }
}

fn set_pointer_mode(handle: bsys::cublasHandle_t, device: bool) -> Result<()> {
    let mode = if device {
        bsys::cublasPointerMode_t::CUBLAS_POINTER_MODE_DEVICE
    } else {
        bsys::cublasPointerMode_t::CUBLAS_POINTER_MODE_HOST
    };
    // SAFETY: a live handle, locked by the caller.
    blas_check("cublasSetPointerMode", unsafe {
        bsys::cublasSetPointerMode_v2(handle, mode)
    })
}

// ---- the call ------------------------------------------------------------------------------------

fn to_i32(what: &str, x: usize) -> Result<i32> {
    match i32::try_from(x) {
        Ok(v) => Ok(v),
        Err(_) => bail!(
            InvalidArgument,
            "{what} = {x} exceeds the 32-bit sizes of cuBLAS's GEMM (2^31 - 1)"
        ),
    }
}

/// The fused kernels, looked up before anything is queued.
struct FusedKernels<'d> {
    constants: &'d CudaFunction,
    softcap: &'d CudaFunction,
    grad: &'d CudaFunction,
    /// The chunk's divergence writing G (step 3): `dk_div_fused_<kind>_<dtype>` and, under a
    /// persistent cluster variant, `dk_divcp[256]_fused_<kind>_<dtype>`.
    rows_to_g: FusedRowKernels<'d>,
}

/// The four products of [`crate::fused::ReferenceGemms`] on the caller's stream, host scalars
/// α = 1, β = 0, the operation's `GemmEx` settings (see `fused_linear`, steps 1 and 5).
pub(crate) fn reference_gemms(
    dev: &CudaDevice,
    g: &crate::fused::ReferenceGemms<'_>,
    launch: &Launch<'_>,
) -> Result<()> {
    let ptrs = [
        g.hidden.ptr as *const c_void,
        g.weight.ptr as *const c_void,
        g.logits.ptr as *const c_void,
        g.grad_logits.ptr as *const c_void,
        g.grad_hidden.ptr as *const c_void,
        g.grad_weight.ptr as *const c_void,
    ];
    for p in ptrs {
        dev.check_pointer("reference GEMM operand", p)?;
    }
    let (n, h, v) = (g.hidden.rows, g.hidden.cols, g.weight.rows);
    let dt = g.hidden.dtype;
    let (n_i, h_i, v_i) = (to_i32("N", n)?, to_i32("H", h)?, to_i32("V", v)?);
    let ld = |what: &str, m_stride: usize| to_i32(what, m_stride);
    let (lx, lw) = (
        ld("hidden stride", g.hidden.row_stride)?,
        ld("weight stride", g.weight.row_stride)?,
    );
    let (ll, lg) = (
        ld("logits stride", g.logits.row_stride)?,
        ld("grad_logits stride", g.grad_logits.row_stride)?,
    );
    let (lgh, lgw) = (
        ld("grad_hidden stride", g.grad_hidden.row_stride)?,
        ld("grad_weight stride", g.grad_weight.row_stride)?,
    );
    // Any start: the slack of ALIGN bytes lets the buffer be aligned here.
    dev.check_workspace(launch, CUBLAS_WORKSPACE + ALIGN, 1, "cuBLAS's workspace")?;
    cublas_loadable()?;
    let guard = dev.blas.acquire(&dev.ctx)?;
    let handle = handle_of(&guard)?;
    // SAFETY: the caller of the safe API handed a live stream of this device.
    let stream = unsafe { dev.borrow_stream(launch.stream) };
    let (ws, owned) = dev.workspace(launch, &stream, CUBLAS_WORKSPACE + ALIGN)?;
    dev.ctx.bind_to_thread()?;
    // SAFETY: a live handle (locked), the caller's stream, a 256-byte aligned workspace of
    // CUBLAS_WORKSPACE bytes freed in stream order after the products.
    unsafe { bind_handle(handle, &stream, ws.next_multiple_of(ALIGN as u64))? };
    set_pointer_mode(handle, false)?;
    let (one, zero) = (1.0f32, 0.0f32);
    let (alpha, beta) = ((&one as *const f32).cast(), (&zero as *const f32).cast());
    let op = |ptr: *const u8, ld: i32| Operand {
        ptr: ptr as u64,
        ld,
    };
    let (hidden, weight) = (op(g.hidden.ptr, lx), op(g.weight.ptr, lw));
    let grad_logits = op(g.grad_logits.ptr, lg);
    let dims = (n_i, h_i, v_i);
    let logits = Gemm::logits(
        dt,
        dims,
        hidden,
        weight,
        op(g.logits.ptr, ll),
        g.logits.dtype,
    );
    let grad_hidden = Gemm::grad_hidden(
        dt,
        dims,
        grad_logits,
        weight,
        op(g.grad_hidden.ptr, lgh),
        dt,
    );
    let grad_weight = Gemm::grad_weight(
        dt,
        dims,
        grad_logits,
        hidden,
        op(g.grad_weight.ptr, lgw),
        dt,
    );
    // SAFETY: device operands of this device covering the checked shapes; host scalars in host
    // pointer mode.
    unsafe {
        logits.run(handle, alpha, beta, "student logits")?;
        logits.run(handle, alpha, beta, "teacher logits")?;
        grad_hidden.run(handle, alpha, beta, "grad_hidden")?;
        grad_weight.run(handle, alpha, beta, "grad_weight")?;
    }
    // As at the end of fused_linear: the handle keeps neither the caller's stream nor a
    // workspace freed after this call.
    // SAFETY: a live handle; the null stream is the legacy default stream.
    blas_check("cublasSetStream", unsafe {
        bsys::cublasSetStream_v2(handle, std::ptr::null_mut())
    })?;
    drop(guard);
    drop(owned); // stream-ordered
    Ok(())
}

/// Queues the fused linear divergence on the caller's stream.
pub(crate) fn fused_linear(
    dev: &CudaDevice,
    raw: &RawFusedLinear,
    params: &FusedLinearParams,
    launch: &Launch<'_>,
) -> Result<()> {
    for (what, p) in [
        ("student hidden states", raw.student_hidden as *const c_void),
        ("student weight", raw.student_weight as *const c_void),
        ("teacher hidden states", raw.teacher_hidden as *const c_void),
        ("teacher weight", raw.teacher_weight as *const c_void),
        ("labels", raw.labels as *const c_void),
        ("loss", raw.loss as *const c_void),
        ("per-token loss", raw.per_token as *const c_void),
        ("grad_hidden", raw.grad_hidden as *const c_void),
        ("grad_weight", raw.grad_weight as *const c_void),
        ("num_items", raw.num_items as *const c_void),
    ] {
        dev.check_pointer(what, p)?;
    }
    let want_hidden = !raw.grad_hidden.is_null();
    let want_weight = !raw.grad_weight.is_null();
    let want_grad = want_hidden || want_weight;
    if !want_grad && raw.loss.is_null() && raw.per_token.is_null() {
        return Ok(()); // nothing requested
    }
    for (what, wanted, dtype) in [
        ("grad_hidden", want_hidden, raw.grad_hidden_dtype),
        ("grad_weight", want_weight, raw.grad_weight_dtype),
    ] {
        if wanted && dtype != raw.dtype && dtype != DType::F32 {
            bail!(
                UnsupportedDtype,
                "{what} must be {} (the input dtype) or f32, got {}",
                raw.dtype.name(),
                dtype.name()
            );
        }
    }

    let lay = layout(raw, params)?;
    let (n, v) = (raw.n, raw.v);
    let esize = raw.dtype.size();
    let GemmInts {
        v: v_i,
        h: h_i,
        ht: ht_i,
        ld: ld_i,
        student_hidden: sxs,
        student_weight: sws,
        teacher_hidden: sxt,
        teacher_weight: swt,
        grad_hidden: sgh,
        grad_weight: sgw,
    } = gemm_ints(raw, &lay)?;

    // Any start: the layout's slack aligns it.
    dev.check_workspace(
        launch,
        lay.total,
        1,
        "these shapes (fused_linear_workspace_size)",
    )?;
    cublas_loadable()?;
    let div = &params.divergence;
    let rows = RowKernels::new(dev, div.effective_kind(), div.beta, DType::F32, DType::F32)?;
    let kernels = FusedKernels {
        constants: dev.function("dk_fused_constants")?,
        softcap: dev.function("dk_fused_softcap")?,
        grad: dev.function(&format!("dk_fused_grad_{}", raw.dtype.name()))?,
        rows_to_g: rows.fused_kernels(dev, raw.dtype)?,
    };
    let guard = dev.blas.acquire(&dev.ctx)?;
    let handle = handle_of(&guard)?;

    // SAFETY: the caller of the safe API handed a live stream of this device (Launch::on_stream
    // is unsafe for that reason), or null for the legacy default stream.
    let stream = unsafe { dev.borrow_stream(launch.stream) };
    let (ws_start, owned) = dev.workspace(launch, &stream, lay.total)?;
    let base = ws_start.next_multiple_of(ALIGN as u64);
    let konst = |i: usize| base + 4 * i as u64;
    let per_row_base = match lay.per_row {
        Some(off) => base + off as u64,
        None => raw.per_token as u64,
    };
    let s_buf = base + lay.logits as u64;

    dev.ctx.bind_to_thread()?;
    // SAFETY: a live handle (locked), the caller's stream of this context, and a 256-byte
    // aligned device buffer of CUBLAS_WORKSPACE bytes that lives until the queued work is done
    // (the caller's, or ours, freed in stream order below).
    unsafe { bind_handle(handle, &stream, base + lay.cublas as u64)? };

    // The loss scale over all N rows, and the GEMM constants.
    if want_grad || !raw.loss.is_null() {
        let num_items = raw.num_items as u64;
        rows.prepare(
            &stream,
            raw.labels as u64,
            n as i64,
            div,
            num_items,
            konst(C_SCALE),
        )?;
    }
    if want_grad {
        let (scale, zero, one, alpha, g_scale_at) = (
            konst(C_SCALE),
            konst(C_ZERO),
            konst(C_ONE),
            konst(C_GRAD_ALPHA),
            konst(C_G_SCALE),
        );
        let g = g_scale(raw.dtype, div);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches dk_fused_constants(const float*, float, float, float*, float*,
        // float*, float*); all five pointers are floats of the workspace's constant block.
        unsafe {
            stream
                .launch_builder(kernels.constants)
                .arg(&scale)
                .arg(&params.logit_scale)
                .arg(&g)
                .arg(&zero)
                .arg(&one)
                .arg(&alpha)
                .arg(&g_scale_at)
                .launch(cfg)?;
        }
    }

    let cap = params.softcap;
    let inv_cap = cap.map_or(0.0, |c| 1.0 / c);
    let zero_host = 0.0f32;
    let mut r0 = 0usize;
    for c in chunk_plan(n, lay.chunk, params.chunk_rows.is_none()) {
        let c_i = c as i32; // <= N, checked above
        let t_buf = s_buf + (4 * c * lay.ld) as u64;
        let xs = raw.student_hidden as u64 + (r0 * raw.student_hidden_stride * esize) as u64;
        let xt = raw.teacher_hidden as u64 + (r0 * raw.teacher_hidden_stride * esize) as u64;

        // 1. Logits of the chunk, f32: S = logit_scale · Xs Wsᵀ, T = logit_scale · Xt Wtᵀ.
        set_pointer_mode(handle, false)?;
        let logits = |x: u64, x_ld: i32, w: u64, w_ld: i32, h: i32, out: u64| {
            let op = |ptr, ld| Operand { ptr, ld };
            Gemm::logits(
                raw.dtype,
                (c_i, h, v_i),
                op(x, x_ld),
                op(w, w_ld),
                op(out, ld_i),
                DType::F32,
            )
        };
        // SAFETY: validated operands (device memory of this device, shapes and strides checked);
        // S and T are inside the workspace; host scalars in host pointer mode.
        unsafe {
            logits(xs, sxs, raw.student_weight as u64, sws, h_i, s_buf).run(
                handle,
                (&params.logit_scale as *const f32).cast(),
                (&zero_host as *const f32).cast(),
                "student logits",
            )?;
            logits(xt, sxt, raw.teacher_weight as u64, swt, ht_i, t_buf).run(
                handle,
                (&params.logit_scale as *const f32).cast(),
                (&zero_host as *const f32).cast(),
                "teacher logits",
            )?;
        }

        // 2. Softcap, in place over S and T (2c rows of stride ld).
        if let Some(cap) = cap {
            let (x, rows2, vv, ld) = (s_buf, 2 * c as i64, v as i64, lay.ld as i64);
            let nvec = (v / 8) as u64;
            let cfg = LaunchConfig {
                grid_dim: (
                    nvec.div_ceil(THREADS as u64).clamp(1, 1 << 16) as u32,
                    (2 * c).min(65535) as u32,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches dk_fused_softcap(float*, int64_t, int64_t, int64_t, float, float);
            // S and T are 2c contiguous rows of ld f32 in the workspace, 256-byte aligned.
            unsafe {
                stream
                    .launch_builder(kernels.softcap)
                    .arg(&x)
                    .arg(&rows2)
                    .arg(&vv)
                    .arg(&ld)
                    .arg(&cap)
                    .arg(&inv_cap)
                    .launch(cfg)?;
            }
        }

        // 3. The divergence of the chunk: per-row losses, and G (loss scale 1) over S, or the
        //    gradient w.r.t. the capped logits over T for step 4.
        let per_row = per_row_base + 4 * r0 as u64;
        let labels = if raw.labels.is_null() {
            0
        } else {
            raw.labels as u64 + 8 * r0 as u64
        };
        let mut args = DivergenceArgs {
            student: s_buf,
            teacher: t_buf,
            grad: 0,
            labels,
            per_row,
            // G's scale (`g_scale`): read only when the gradient is written, after
            // dk_fused_constants wrote it.
            scale: konst(C_G_SCALE),
            n: c as i64,
            v: v as i64,
            student_stride: lay.ld as i64,
            teacher_stride: lay.ld as i64,
            grad_stride: lay.ld as i64,
            ignore_index: div.ignore_index,
            beta: div.beta,
            inv_temperature: 1.0 / div.temperature,
            options: 0,
        };
        // G's row stride (elements of the input dtype) over S: S's row bytes.
        let g_over_s = match raw.dtype {
            DType::F32 => ld_i,
            DType::BF16 | DType::F16 => 2 * ld_i,
        };
        // Where the chunk kernel wrote G (over S, or Q rows of S before it), if it did.
        let mut g_at = None;
        if want_grad {
            let fused = DivergenceArgs {
                grad: s_buf,
                grad_stride: g_over_s as i64,
                ..args
            };
            g_at = rows.fused_rows(&kernels.rows_to_g, &stream, &fused, inv_cap, lay.pad)?;
            if g_at.is_none() {
                args.grad = t_buf;
            }
        }
        let g_written = g_at.is_some();
        if !g_written {
            rows.rows(&stream, &args)?;
        }

        if want_grad {
            // 4. G = dL/d(raw logits) / (scale · logit_scale), in the GEMM input dtype: where
            //    the chunk kernel wrote it, else over S, or for f32 over T in place.
            let (g, g_ld) = match g_at {
                Some(at) => (at, g_over_s),
                None if raw.dtype == DType::F32 => (t_buf, ld_i),
                None => (s_buf, g_over_s),
            };
            if !g_written && (cap.is_some() || raw.dtype != DType::F32) {
                let capped = if cap.is_some() { s_buf } else { 0 };
                let (ld, out_ld, rows_c, vv) = (lay.ld as i64, g_ld as i64, c as i64, v as i64);
                let cfg = LaunchConfig {
                    grid_dim: (c as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches dk_fused_grad_<dtype>(const float*, int64_t, const float*,
                // int64_t, TO*, int64_t, int64_t, int64_t, float); the output aliases S row by
                // row with the same byte stride (4·ld = sizeof(TO)·out_ld) or equals T, the
                // cases the kernel is written for.
                unsafe {
                    stream
                        .launch_builder(kernels.grad)
                        .arg(&t_buf)
                        .arg(&ld)
                        .arg(&capped)
                        .arg(&ld)
                        .arg(&g)
                        .arg(&out_ld)
                        .arg(&rows_c)
                        .arg(&vv)
                        .arg(&inv_cap)
                        .launch(cfg)?;
                }
            }

            // 5. The gradient GEMMs, α = loss scale · logit_scale and β from device memory.
            set_pointer_mode(handle, true)?;
            let alpha = konst(C_GRAD_ALPHA) as *const c_void;
            if want_hidden {
                let gh = raw.grad_hidden as u64
                    + (r0 * raw.grad_hidden_stride * raw.grad_hidden_dtype.size()) as u64;
                let beta = konst(if params.accumulate { C_ONE } else { C_ZERO });
                let gemm = Gemm::grad_hidden(
                    raw.dtype,
                    (c_i, h_i, v_i),
                    Operand { ptr: g, ld: g_ld },
                    Operand {
                        ptr: raw.student_weight as u64,
                        ld: sws,
                    },
                    Operand { ptr: gh, ld: sgh },
                    raw.grad_hidden_dtype,
                );
                // SAFETY: validated operands; G in the workspace; α, β device floats of the
                // constant block, written by dk_fused_constants earlier on this stream.
                unsafe { gemm.run(handle, alpha, beta as *const c_void, "grad_hidden")? };
            }
            if want_weight {
                let beta = konst(if params.accumulate || r0 > 0 {
                    C_ONE
                } else {
                    C_ZERO
                });
                let gemm = Gemm::grad_weight(
                    raw.dtype,
                    (c_i, h_i, v_i),
                    Operand { ptr: g, ld: g_ld },
                    Operand { ptr: xs, ld: sxs },
                    Operand {
                        ptr: raw.grad_weight as u64,
                        ld: sgw,
                    },
                    raw.grad_weight_dtype,
                );
                // SAFETY: as above.
                unsafe { gemm.run(handle, alpha, beta as *const c_void, "grad_weight")? };
            }
        }
        r0 += c;
    }

    if !raw.loss.is_null() {
        rows.finish(
            &stream,
            per_row_base,
            n as i64,
            konst(C_SCALE),
            raw.loss as u64,
        )?;
    }
    // Leave the handle in host pointer mode, on the legacy default stream and with cuBLAS's own
    // workspace pool (SetStream resets it): it must not keep the caller's stream or a workspace
    // that is freed after this call. The next call sets both again.
    set_pointer_mode(handle, false)?;
    // SAFETY: a live handle; the null stream is the legacy default stream.
    blas_check("cublasSetStream", unsafe {
        bsys::cublasSetStream_v2(handle, std::ptr::null_mut())
    })?;
    drop(guard);
    drop(owned); // stream-ordered free after the work that uses it
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(n: usize, v: usize, per_token: bool) -> RawFusedLinear {
        RawFusedLinear {
            n,
            v,
            h: 64,
            ht: 64,
            dtype: DType::BF16,
            student_hidden: std::ptr::null(),
            student_hidden_stride: 64,
            student_weight: std::ptr::null(),
            student_weight_stride: 64,
            teacher_hidden: std::ptr::null(),
            teacher_hidden_stride: 64,
            teacher_weight: std::ptr::null(),
            teacher_weight_stride: 64,
            labels: std::ptr::null(),
            loss: std::ptr::null_mut(),
            per_token: if per_token {
                std::ptr::NonNull::<f32>::dangling().as_ptr()
            } else {
                std::ptr::null_mut()
            },
            grad_hidden: std::ptr::null_mut(),
            grad_hidden_dtype: DType::BF16,
            grad_hidden_stride: 64,
            grad_weight: std::ptr::null_mut(),
            grad_weight_dtype: DType::F32,
            grad_weight_stride: 64,
            num_items: std::ptr::null(),
        }
    }

    #[test]
    fn automatic_chunks() {
        for &(n, v) in &[
            (1, 1),
            (63, 1000),
            (4096, 200_064),
            (16_384, 202_048),
            (5000, 262_144),
            (100_000, 32_000),
            (1_000_000, 8),
        ] {
            let c = chunk_rows(n, v, None);
            assert!(c >= 1 && c <= n, "n = {n}, v = {v}: chunk {c}");
            assert!(
                c == n || c % CHUNK_MULTIPLE == 0,
                "n = {n}, v = {v}: chunk {c}"
            );
            assert!(
                c <= CHUNK_MULTIPLE || 8 * c * logits_ld(v) <= AUTO_CHUNK_BYTES,
                "n = {n}, v = {v}: chunk {c} exceeds the budget"
            );
            // No more chunks than the budget forces.
            let max = (AUTO_CHUNK_BYTES / (8 * logits_ld(v)) / CHUNK_MULTIPLE * CHUNK_MULTIPLE)
                .max(CHUNK_MULTIPLE);
            assert_eq!(n.div_ceil(c), n.div_ceil(max.min(n)), "n = {n}, v = {v}");
        }
        // The benchmark shape: 5 chunks of 832 rows (the last 768), 1.24 GiB of logits.
        assert_eq!(chunk_rows(4096, 200_064, None), 832);
        assert_eq!(chunk_rows(16_384, 202_048, None), 960);
        assert_eq!(chunk_rows(10, 5, Some(0)), 1);
        assert_eq!(chunk_rows(10, 5, Some(3)), 3);
        assert_eq!(chunk_rows(10, 5, Some(64)), 10);
    }

    #[test]
    fn chunk_plans_cover_the_rows_without_slivers() {
        for &(n, v) in &[
            (1, 1),
            (63, 1000),
            (4096, 200_064),
            (16_384, 202_048),
            (16_385, 202_048),
            (5000, 262_144),
            (100_000, 32_000),
            (12_345, 151_936),
        ] {
            let chunk = chunk_rows(n, v, None);
            let plan = chunk_plan(n, chunk, true);
            let what = format!("n = {n}, v = {v}, chunk {chunk}: {plan:?}");
            assert_eq!(plan.iter().sum::<usize>(), n, "{what}");
            assert_eq!(plan.len(), n.div_ceil(chunk), "{what}");
            assert!(plan.iter().all(|&c| c >= 1 && c <= chunk), "{what}");
            // Multiples of 64 except the last; no two differ by more than 64 rows (plus the
            // last's short unit).
            let body = &plan[..plan.len() - 1];
            assert!(body.iter().all(|c| c % CHUNK_MULTIPLE == 0), "{what}");
            let (lo, hi) = (plan.iter().min().unwrap(), plan.iter().max().unwrap());
            assert!(hi - lo < 2 * CHUNK_MULTIPLE, "{what}");
        }
        assert_eq!(
            chunk_plan(16_384, 960, true),
            [[960; 4].as_slice(), &[896; 14]].concat()
        );
        assert_eq!(chunk_plan(4096, 832, true), vec![832, 832, 832, 832, 768]);
        // A requested size is kept: full chunks, then the rest.
        assert_eq!(chunk_plan(10, 3, false), vec![3, 3, 3, 1]);
        assert_eq!(chunk_plan(10, 10, false), vec![10]);
    }

    #[test]
    fn g_pad_holds_the_clusters_within_its_bytes() {
        // V ≈ 200k (f32 rows of 800 KB): 41 rows fit 32 MiB; V = 1M (4 MB rows): the
        // 32-row floor, 128 MB.
        assert_eq!(g_pad_rows(832, logits_ld(200064)), 41);
        assert_eq!(g_pad_rows(832, logits_ld(1 << 20)), 32);
        // V = 32000: 262 rows fit 32 MiB, more than an H100's 66 clusters of 4 blocks.
        assert_eq!(g_pad_rows(832, logits_ld(32000)), 262);
        // Never more than the chunk.
        assert_eq!(g_pad_rows(10, logits_ld(32000)), 10);
        assert_eq!(g_pad_rows(1, 8), 1);
    }

    #[test]
    fn workspace_layout() {
        let params = FusedLinearParams {
            chunk_rows: Some(100),
            ..FusedLinearParams::default()
        };
        for per_token in [false, true] {
            let r = raw(1000, 1001, per_token);
            let l = layout(&r, &params).unwrap();
            assert_eq!(l.chunk, 100);
            assert_eq!(l.ld, 1008);
            let per_row = if per_token { 0 } else { 4096 };
            assert_eq!(l.per_row, (!per_token).then_some(256));
            // The pad: the whole chunk here (100 rows of 4032 bytes fit 32 MiB), rounded up
            // to 256 bytes, before S.
            assert_eq!(l.pad, 100);
            assert_eq!(
                l.logits,
                256 + per_row + (4 * 100 * 1008usize).next_multiple_of(256)
            );
            assert_eq!(l.cublas, l.logits + 2 * 4 * 100 * 1008);
            assert_eq!(l.total, l.cublas + CUBLAS_WORKSPACE + 256);
            assert_eq!(workspace_size(&r, &params).unwrap(), l.total);
            for off in [l.logits, l.cublas] {
                assert_eq!(off % ALIGN, 0);
            }
        }
    }

    #[test]
    fn sizes_past_the_address_space_or_cublas_ints_are_refused() {
        // N = chunk = 2^31 - 1 rows of ld = 2^30 - 8: 2^64 + 32 MiB of workspace, which wrapped
        // to 32 MiB (and put S past it) before the checked layout.
        let n = (1usize << 31) - 1;
        let r = raw(n, (1 << 30) - 15, false);
        let params = FusedLinearParams {
            chunk_rows: Some(n),
            ..FusedLinearParams::default()
        };
        let e = layout(&r, &params).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Shape, "{e}");
        assert!(e.to_string().contains("address space"), "{e}");
        assert_eq!(
            workspace_size(&r, &params).unwrap_err().kind(),
            ErrorKind::Shape
        );
        // A 16-bit G over S has a row stride of 2·ld elements: past 2^31 - 1 the query refuses
        // it as the call does; f32 G (stride ld) is fine there.
        let small = FusedLinearParams {
            chunk_rows: Some(1),
            ..FusedLinearParams::default()
        };
        let v = (1 << 30) - 7; // ld 2^30: 2·ld = 2^31
        let e = workspace_size(&raw(1, v, true), &small).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("gradient row stride"), "{e}");
        let f32_call = RawFusedLinear {
            dtype: DType::F32,
            ..raw(1, v, true)
        };
        assert!(workspace_size(&f32_call, &small).is_ok());
        // A gradient's row stride past cuBLAS's int only counts when that gradient is wanted.
        let strided = RawFusedLinear {
            grad_weight_stride: 1 << 31,
            ..raw(4, 100, true)
        };
        assert!(workspace_size(&strided, &small).is_ok());
        let wanted = RawFusedLinear {
            grad_weight: std::ptr::NonNull::<u8>::dangling().as_ptr().cast(),
            ..strided
        };
        assert!(workspace_size(&wanted, &small).is_err());
    }

    /// Plays out dk_fused_grad_bf16 writing over the capped logits it reads (cuda/fused.cu,
    /// grad_rows): per row, tiles of `threads` 8-element vectors, each tile's loads, a barrier,
    /// its stores; a tile's stores either land before the next tile's loads or after them (a
    /// slow thread), and both must give the out-of-place result.
    #[test]
    fn grad_over_capped_tiles_never_clobber_unread_input() {
        let (cap, inv_cap) = (7.5f32, 1.0 / 7.5f32);
        let slope = |c: f32| {
            let t = c * inv_cap;
            (1.0 - t) * (1.0 + t)
        };
        for &(v, threads) in &[
            (1usize, 4usize),
            (7, 4),
            (8, 4),
            (9, 4),
            (33, 2),
            (64, 4),
            (200, 4),
            (1001, 8),
        ] {
            let ld = logits_ld(v);
            let rows = 3;
            let capped: Vec<f32> = (0..rows * ld)
                .map(|i| cap * ((i as f32 * 0.37).sin()))
                .collect();
            let g: Vec<f32> = (0..rows * ld).map(|i| (i as f32 * 0.11).cos()).collect();
            let expected = |r: usize, i: usize| {
                half::bf16::from_f32(g[r * ld + i] * slope(capped[r * ld + i])).to_bits()
            };
            for delayed in [false, true] {
                let mut bytes: Vec<u8> = capped.iter().flat_map(|x| x.to_le_bytes()).collect();
                let read = |b: &[u8], r: usize, i: usize| {
                    let at = 4 * (r * ld + i);
                    f32::from_le_bytes(b[at..at + 4].try_into().unwrap())
                };
                for r in 0..rows {
                    let out_at = |i: usize| 4 * r * ld + 2 * i;
                    // Elements of each tile: vectors [base, base + threads), then the tail.
                    let nvec = v / 8;
                    let mut tiles: Vec<Vec<usize>> = (0..nvec)
                        .step_by(threads)
                        .map(|b| (8 * b..8 * (b + threads).min(nvec)).collect())
                        .collect();
                    tiles.push((8 * nvec..v).collect());
                    let mut pending: Vec<(usize, u16)> = Vec::new();
                    for tile in tiles {
                        let loaded: Vec<(usize, f32)> = tile
                            .iter()
                            .map(|&i| (i, g[r * ld + i] * slope(read(&bytes, r, i))))
                            .collect();
                        for (at, bits) in pending.drain(..) {
                            bytes[at..at + 2].copy_from_slice(&bits.to_le_bytes());
                        }
                        // barrier
                        for (i, x) in loaded {
                            let bits = half::bf16::from_f32(x).to_bits();
                            if delayed {
                                pending.push((out_at(i), bits));
                            } else {
                                bytes[out_at(i)..out_at(i) + 2]
                                    .copy_from_slice(&bits.to_le_bytes());
                            }
                        }
                    }
                    for (at, bits) in pending.drain(..) {
                        bytes[at..at + 2].copy_from_slice(&bits.to_le_bytes());
                    }
                    for i in 0..v {
                        let got = u16::from_le_bytes([bytes[out_at(i)], bytes[out_at(i) + 1]]);
                        assert_eq!(got, expected(r, i), "v = {v}, row {r}, element {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn f16_g_scale_keeps_the_bounded_gradient_under_2_pow_15() {
        use crate::divergence::{Kind, Params};
        let p = |kind, beta: f32, temperature: f32| Params {
            beta,
            temperature,
            ..Params::new(kind)
        };
        // bf16 and f32 G keep the old scale of 1 (bitwise the old path).
        for dtype in [DType::BF16, DType::F32] {
            assert_eq!(g_scale(dtype, &p(Kind::Jsd, 0.5, 4.0)), 1.0);
        }
        for (kind, beta, bound) in [
            (Kind::ForwardKl, 0.5, 1.0),
            (Kind::Jsd, 0.0, 1.0),
            (Kind::Jsd, 0.5, 1.0),
            (Kind::Jsd, 1.0 - f32::EPSILON, 1.0),
            (Kind::Jsd, 1.0, 1024.0),
            (Kind::ReverseKl, 0.5, 1024.0),
        ] {
            for t in [1e-30f32, 1e-3, 0.25, 1.0, 4.0, 1e3] {
                let g = g_scale(DType::F16, &p(kind, beta, t)) as f64;
                let k = g.log2();
                assert_eq!(k, k.round(), "{kind:?} T = {t}: {g} is not a power of two");
                assert!((-111.0..=64.0).contains(&k), "{kind:?} T = {t}: 2^{k}");
                // Largest such power of two: |G| · 2^k ≤ 2^15 and twice it would not be.
                let top = bound / t as f64 * g;
                if k > -111.0 && k < 64.0 {
                    assert!(top <= 32768.0 && top > 16384.0, "{kind:?} T = {t}: {top}");
                }
            }
        }
        // The bounds themselves: |T · ∂L/∂s| of random JSD rows stays within 2/e < 1.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut worst = 0f64;
        for _ in 0..2000 {
            let v = 2 + (uniform() * 6.0) as usize;
            let beta = uniform();
            let logits = |u: &mut dyn FnMut() -> f64| -> Vec<f64> {
                (0..v).map(|_| (u() - 0.5) * 40.0).collect()
            };
            let softmax = |x: &[f64]| -> Vec<f64> {
                let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = x.iter().map(|&y| (y - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|&y| y / s).collect()
            };
            let q = softmax(&logits(&mut uniform));
            let pt = softmax(&logits(&mut uniform));
            let m: Vec<f64> = (0..v).map(|i| beta * pt[i] + (1.0 - beta) * q[i]).collect();
            let kl: f64 = (0..v)
                .filter(|&i| q[i] > 0.0)
                .map(|i| q[i] * (q[i] / m[i]).ln())
                .sum();
            for i in (0..v).filter(|&i| q[i] > 0.0) {
                let g = (1.0 - beta) * q[i] * ((q[i] / m[i]).ln() - kl);
                worst = worst.max(g.abs());
            }
        }
        assert!(worst <= 2.0 / std::f64::consts::E, "{worst}");
    }
}
