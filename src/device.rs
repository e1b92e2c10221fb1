//! Execution contexts: the CPU, or one CUDA device with the embedded kernels loaded.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
};

use crate::error::{bail, Error, ErrorKind, Result};
use crate::tensor::{Location, VectorMut};

/// The embedded fatbin, when the build found `nvcc`.
#[cfg(dk_cuda_kernels)]
pub(crate) const FATBIN: Option<&[u8]> = Some(include_bytes!(env!("DK_FATBIN_PATH")));
/// The embedded fatbin, when the build found `nvcc`.
#[cfg(not(dk_cuda_kernels))]
pub(crate) const FATBIN: Option<&[u8]> = None;

/// GPU architectures compiled into the library (empty without kernels).
pub fn compiled_cuda_archs() -> Vec<&'static str> {
    #[cfg(dk_cuda_kernels)]
    {
        env!("DK_CUDA_ARCHS").split(',').collect()
    }
    #[cfg(not(dk_cuda_kernels))]
    {
        Vec::new()
    }
}

/// The `nvcc` release the kernels were compiled with, if any.
pub fn nvcc_version() -> Option<&'static str> {
    #[cfg(dk_cuda_kernels)]
    {
        Some(env!("DK_NVCC_VERSION"))
    }
    #[cfg(not(dk_cuda_kernels))]
    {
        None
    }
}

/// Every kernel the launchers use: all are loaded when a device opens.
fn kernel_names() -> impl Iterator<Item = &'static str> {
    crate::divergence::cuda::KERNEL_NAMES
        .iter()
        .chain(crate::moe::cuda::KERNEL_NAMES)
        .chain(crate::fused::cuda::KERNEL_NAMES)
        .chain(crate::scale_rows::cuda::KERNEL_NAMES)
        .chain(
            crate::attention::cuda::KERNEL_NAMES
                .iter()
                .flat_map(|names| names.iter()),
        )
        .copied()
}

/// True when the CUDA driver library can be loaded (never panics, unlike cudarc's loaders).
pub fn cuda_driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
    unsafe { sys::is_culib_present() }
}

/// Number of CUDA devices, 0 when there is no driver or no device.
pub fn cuda_device_count() -> usize {
    if !cuda_driver_present() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// One CUDA device: its primary context (the one PyTorch uses) and the loaded kernels.
#[derive(Debug)]
pub struct CudaDevice {
    pub(crate) ctx: Arc<CudaContext>,
    functions: HashMap<&'static str, CudaFunction>,
    _module: Arc<CudaModule>,
    name: String,
    compute_capability: (i32, i32),
    /// Streaming multiprocessors (grid sizing of the loop-over-items kernels).
    sm_count: usize,
    /// L2 cache bytes (the persistent divergence kernel sizes its pipeline to it).
    l2_bytes: usize,
    /// The divergence cluster kernel variant usable here (Hopper sm_90, not turned off,
    /// configured), if any.
    cluster_divergence: Option<crate::divergence::cluster::Variant>,
    /// The opt-in attention kernels this device accepted.
    attention_wide: crate::attention::cuda::WideKernels,
    /// The cuBLAS handle, created on first use by the fused linear divergence.
    pub(crate) blas: crate::fused::cuda::BlasSlot,
}

impl CudaDevice {
    fn open(ordinal: usize) -> Result<Self> {
        let Some(fatbin) = FATBIN else {
            bail!(
                NoDevice,
                "this build of distill-kernels has no CUDA kernels (nvcc was not found at build time)"
            );
        };
        if !cuda_driver_present() {
            bail!(
                NoDevice,
                "no CUDA driver (libcuda) could be loaded on this machine"
            );
        }
        let count = cuda_device_count();
        if ordinal >= count {
            bail!(
                NoDevice,
                "CUDA device {ordinal} requested but {count} device(s) are present"
            );
        }
        crate::switches::check()?;
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: the library never hands out CudaSlices across streams; every launch is ordered
        // on the caller's stream, so cudarc's event tracking would only add overhead.
        unsafe { ctx.disable_event_tracking() };
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))?;
        let mut functions = HashMap::new();
        for name in kernel_names() {
            functions.insert(name, module.load_function(name)?);
        }
        let name = ctx.name()?;
        let compute_capability = ctx.compute_capability()?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )?
            .max(1) as usize;
        let l2_bytes = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?
            .max(0) as usize;
        // Function attributes set once here, not on every launch.
        ctx.bind_to_thread()?;
        // A cluster configuration the driver refuses only costs speed: the one-block kernel
        // serves every row then (the reason is kept for `divergence::cluster_fallback_reason`).
        let smem_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?
            .max(0) as usize;
        let cluster_divergence =
            crate::divergence::cluster::available(compute_capability).filter(|_| {
                match crate::divergence::cluster::configure(&functions, smem_optin) {
                    Ok(()) => true,
                    Err(e) => {
                        crate::divergence::cluster::note_fallback(format!(
                            "the cluster kernels' attributes were refused when the device opened \
                         ({e}); every row runs the one-block kernel"
                        ));
                        false
                    }
                }
            });
        let attention_wide = crate::attention::cuda::configure(&functions, compute_capability)?;
        Ok(CudaDevice {
            ctx,
            functions,
            _module: module,
            name,
            compute_capability,
            sm_count,
            l2_bytes,
            cluster_divergence,
            attention_wide,
            blas: Default::default(),
        })
    }

    /// A loaded kernel by name.
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::Cuda,
                format!("kernel {name} is not in the fatbin"),
            )
        })
    }

    /// The CUDA ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device name reported by the driver.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Streaming multiprocessors, read once when the device opened.
    pub(crate) fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// Bytes of L2 cache, read once when the device opened.
    pub(crate) fn l2_bytes(&self) -> usize {
        self.l2_bytes
    }

    /// The Hopper cluster kernel variant the divergence rows may run on, if any (sm_90, not
    /// turned off by `DK_DIVERGENCE_CLUSTER=0`, its attributes accepted when the device opened).
    pub(crate) fn cluster_divergence(&self) -> Option<crate::divergence::cluster::Variant> {
        self.cluster_divergence
    }

    /// Whether the 128-key attention dK/dV kernels accepted their shared memory when the device
    /// opened (`DK_ATTENTION_BWD=wide`, or `wgmma` off Hopper, may select them only then).
    pub(crate) fn attention_wide_bwd(&self) -> bool {
        self.attention_wide.backward
    }

    /// Whether the D = 128 split attention forward accepted its shared memory when the device
    /// opened (`DK_ATTENTION_FWD=wide` may select it only then).
    pub(crate) fn attention_wide_fwd(&self) -> bool {
        self.attention_wide.forward
    }

    /// Whether the Hopper wgmma attention forward accepted its shared memory when the device
    /// opened (compute capability 9.0): only then is it the default forward (unless
    /// `DK_ATTENTION_FWD=mma` or `wide` asks for the mma.sync kernels).
    pub(crate) fn attention_wgmma_fwd(&self) -> bool {
        self.attention_wide.wgmma_forward
    }

    /// Whether the Hopper wgmma attention dK/dV and dQ kernels accepted their shared memory when
    /// the device opened (compute capability 9.0): only then are they the default backward, in
    /// both modes (unless `DK_ATTENTION_BWD=mma` or `wide` asks for the mma.sync kernels).
    pub(crate) fn attention_wgmma_bwd(&self) -> bool {
        self.attention_wide.wgmma_backward
    }

    /// Checks that `ptr` is device memory of this device.
    pub(crate) fn check_pointer(&self, what: &str, ptr: *const c_void) -> Result<()> {
        if ptr.is_null() {
            return Ok(());
        }
        let mut ordinal: i32 = -1;
        self.ctx.bind_to_thread()?;
        // SAFETY: a query only; `ordinal` is a valid out-pointer for an int.
        let rc = unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr as sys::CUdeviceptr,
            )
        };
        if rc != sys::CUresult::CUDA_SUCCESS {
            bail!(
                WrongDevice,
                "{what} is not CUDA device memory (host pointer on a CUDA context?)"
            );
        }
        if ordinal != self.ordinal() as i32 {
            bail!(
                WrongDevice,
                "{what} lives on CUDA device {ordinal}, the context is device {}",
                self.ordinal()
            );
        }
        Ok(())
    }

    /// Checks the caller's workspace, when one is given: this device's memory, non-null, at
    /// least `need` bytes, its start a multiple of `align` bytes (what the kernels store there
    /// needs: a misaligned store is a sticky error that ends the CUDA context). `what` says what
    /// the size is for, in the message.
    pub(crate) fn check_workspace(
        &self,
        launch: &Launch<'_>,
        need: usize,
        align: usize,
        what: &str,
    ) -> Result<()> {
        let Some(ws) = &launch.workspace else {
            return Ok(());
        };
        if ws.location != Location::Cuda(self.ordinal()) {
            bail!(
                WrongDevice,
                "workspace is in {:?} memory, the context is CUDA device {}",
                ws.location,
                self.ordinal()
            );
        }
        if ws.ptr.is_null() {
            bail!(NullPointer, "workspace pointer is null");
        }
        if ws.len < need {
            bail!(
                WorkspaceTooSmall,
                "workspace has {} bytes, {need} are needed for {what}",
                ws.len
            );
        }
        if ws.ptr as usize % align != 0 {
            bail!(
                InvalidArgument,
                "the workspace for {what} must be {align}-byte aligned, got address {:p}",
                ws.ptr
            );
        }
        self.check_pointer("workspace", ws.ptr as *const c_void)
    }

    /// The start of the workspace: the caller's (checked by [`CudaDevice::check_workspace`]), or
    /// `need` bytes allocated in stream order, returned so the caller keeps them alive until its
    /// launches are queued (dropping the buffer frees it in stream order).
    pub(crate) fn workspace(
        &self,
        launch: &Launch<'_>,
        stream: &Arc<CudaStream>,
        need: usize,
    ) -> Result<(u64, Option<CudaSlice<u8>>)> {
        if let Some(ws) = &launch.workspace {
            return Ok((ws.ptr as u64, None));
        }
        // SAFETY: every user of the scratch writes a region before reading it.
        let buf = unsafe { stream.alloc::<u8>(need) }?;
        let ptr = {
            let (ptr, _sync) = buf.device_ptr(stream);
            ptr
        };
        Ok((ptr, Some(buf)))
    }

    /// Wraps the caller's stream (null = the legacy default stream) without owning it.
    ///
    /// # Safety
    /// `stream` must be null or a live stream of this device's primary context.
    pub(crate) unsafe fn borrow_stream(&self, stream: *mut c_void) -> Arc<CudaStream> {
        // SAFETY: forwarded from the caller; the wrapper never destroys the stream.
        unsafe { self.ctx.wrap_borrowed_stream(stream as sys::CUstream) }
    }
}

/// Which backend a context runs on.
#[derive(Debug)]
pub(crate) enum Backend {
    Cpu,
    Cuda(CudaDevice),
}

/// Where operations run: the CPU reference, or one CUDA device.
///
/// Dropping a CUDA context unloads its kernels and destroys its cuBLAS handle: drop it only
/// after the work queued through it has finished (synchronise the streams it used first).
#[derive(Debug)]
pub struct Context {
    backend: Backend,
}

impl Context {
    /// The CPU backend (always available).
    pub fn cpu() -> Self {
        Context {
            backend: Backend::Cpu,
        }
    }

    /// The CUDA device `ordinal`: retains its primary context and loads the embedded kernels.
    ///
    /// # Errors
    /// [`ErrorKind::NoDevice`] where there is no driver, no such device, or no kernels;
    /// [`ErrorKind::InvalidArgument`] while a `DK_*` A/B switch of the environment holds a value
    /// it does not take ([`crate::switches`]); [`ErrorKind::Cuda`] where the driver fails.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Context {
            backend: Backend::Cuda(CudaDevice::open(ordinal)?),
        })
    }

    /// `-1` for the CPU, `n ≥ 0` for CUDA device `n` (the C ABI's convention).
    ///
    /// # Errors
    /// As [`Context::cuda`]; [`ErrorKind::InvalidArgument`] for a code below -1.
    pub fn new(device: i32) -> Result<Self> {
        match device {
            -1 => Ok(Context::cpu()),
            n if n >= 0 => Context::cuda(n as usize),
            n => bail!(
                InvalidArgument,
                "device must be -1 (CPU) or a CUDA ordinal, got {n}"
            ),
        }
    }

    /// The best backend present: CUDA device 0 when there is one, else the CPU.
    ///
    /// # Errors
    /// Only what is not a missing GPU: a device that is present but cannot be opened, or a
    /// `DK_*` switch with a value it does not know ([`ErrorKind::InvalidArgument`]: a misspelt
    /// switch must not quietly fall back to the CPU). A missing CUDA build, driver or device
    /// ([`ErrorKind::NoDevice`]) gives the CPU context.
    pub fn best() -> Result<Self> {
        match Context::cuda(0) {
            Err(e) if e.kind() == ErrorKind::NoDevice => Ok(Context::cpu()),
            r => r,
        }
    }

    /// Where this context expects its operands' memory.
    pub fn location(&self) -> Location {
        match &self.backend {
            Backend::Cpu => Location::Host,
            Backend::Cuda(d) => Location::Cuda(d.ordinal()),
        }
    }

    /// The CUDA device, if this is a CUDA context.
    pub fn cuda_device(&self) -> Option<&CudaDevice> {
        match &self.backend {
            Backend::Cuda(d) => Some(d),
            Backend::Cpu => None,
        }
    }

    /// A one-line description (`cpu`, or `cuda:0 (NVIDIA H100, sm_90)`).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Cpu => "cpu".to_string(),
            Backend::Cuda(d) => {
                let (ma, mi) = d.compute_capability();
                format!("cuda:{} ({}, sm_{ma}{mi})", d.ordinal(), d.name())
            }
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }
}

/// How a call is launched on a CUDA context: the stream, and optionally a caller-owned
/// workspace. Ignored by the CPU backend. `Launch::default()` is the legacy default stream with
/// a workspace allocated (stream-ordered) by the library. `Send` but not `Sync`: one workspace
/// serves one call at a time, so threads do not share a `Launch`:
///
/// ```
/// fn send<T: Send>() {}
/// send::<distill_kernels::Launch<'static>>(); // moved to a thread: fine
/// ```
///
/// ```compile_fail
/// fn sync<T: Sync>() {}
/// sync::<distill_kernels::Launch<'static>>(); // shared between threads: refused
/// ```
#[derive(Debug)]
pub struct Launch<'a> {
    pub(crate) stream: *mut c_void,
    pub(crate) workspace: Option<VectorMut<'a, u8>>,
}

// SAFETY: the stream is an opaque CUDA handle, usable from any thread (the driver API is
// thread-safe and a stream belongs to no thread); the workspace view is Send.
unsafe impl Send for Launch<'_> {}
// Not Sync: a call writes its workspace in one kernel and reads it in a later one, so two
// threads queueing calls through one `&Launch` (one workspace) could interleave them and
// clobber each other's scratch (an out-of-bounds write where the route's scratch holds row
// offsets). Each thread builds its own `Launch` (cheap); calls on one thread are stream-ordered.

impl Default for Launch<'_> {
    fn default() -> Self {
        Launch {
            stream: std::ptr::null_mut(),
            workspace: None,
        }
    }
}

impl<'a> Launch<'a> {
    /// Launches on a caller-owned stream (a `CUstream` / `cudaStream_t`; null = legacy default).
    ///
    /// # Safety
    /// `stream` must be null or a live stream of the context's device (its primary context),
    /// alive until the queued work has finished.
    pub unsafe fn on_stream(stream: *mut c_void) -> Self {
        Launch {
            stream,
            workspace: None,
        }
    }

    /// Uses `workspace` (device memory of at least `*_workspace_size` bytes) for scratch. Its
    /// start must be 4-byte aligned (16 for the non-deterministic attention backward; any for
    /// the fused linear divergence), as every allocator's is; a call refuses it otherwise
    /// ([`ErrorKind::InvalidArgument`]), before queuing anything.
    pub fn with_workspace(mut self, workspace: VectorMut<'a, u8>) -> Self {
        self.workspace = Some(workspace);
        self
    }
}

/// A 1-D launch configuration for `cuLaunchKernelEx` (cudarc's launch builder takes no launch
/// attributes): `blocks` blocks of `threads` threads with `smem` bytes of dynamic shared memory
/// on `stream`, with one launch attribute (a cluster shape, programmatic serialization), which
/// must outlive the configuration.
pub(crate) fn launch_config_1d(
    blocks: u32,
    threads: u32,
    smem: usize,
    stream: sys::CUstream,
    attr: &mut sys::CUlaunchAttribute,
) -> sys::CUlaunchConfig {
    sys::CUlaunchConfig {
        gridDimX: blocks,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: stream,
        attrs: attr,
        numAttrs: 1,
    }
}

#[cfg(test)]
mod tests {
    /// Every kernel a launcher names is in the fatbin for every compiled architecture: a missing
    /// one would make every device open fail (the names are loaded when a device opens), which
    /// only a GPU would otherwise show. Checked against the ptxas report of this build.
    #[test]
    fn every_launched_kernel_was_compiled() {
        let names: Vec<&str> = super::kernel_names().collect();
        assert!(names.len() > 100, "only {} kernel names", names.len());
        #[cfg(dk_cuda_kernels)]
        {
            // Embedded at build time: the executable also runs on the GPU machine, where the
            // build folder is not.
            let report = include_str!(env!("DK_PTXAS_REPORT"));
            let mut missing = Vec::new();
            // Cubins (sm_*); the compute_* entry is PTX, which ptxas does not report.
            for arch in super::compiled_cuda_archs()
                .into_iter()
                .filter(|a| a.starts_with("sm_"))
            {
                for name in &names {
                    let line = format!("Compiling entry function '{name}' for '{arch}'");
                    if !report.contains(&line) {
                        missing.push(format!("{name} ({arch})"));
                    }
                }
            }
            assert!(missing.is_empty(), "not compiled: {}", missing.join(", "));
        }
        #[cfg(not(dk_cuda_kernels))]
        eprintln!(
            "SKIPPED the fatbin part of every_launched_kernel_was_compiled: built without nvcc"
        );
    }
}
