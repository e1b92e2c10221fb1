//! Where `dk bench` runs: the CPU reference backend or one CUDA device. Both hold one group of
//! inputs (one dtype and shape) at a time, run the divergence once poisoned and checked, then
//! `iters` timed runs, and measure the copy bandwidth the floor is defined against.

use std::ffi::c_void;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use distill_kernels::divergence::{Divergence, Params};
use distill_kernels::{Context, DType, Launch, Location, Matrix, MatrixMut, VectorMut};

use crate::data::{fill_rows, host_memory_available, widen, HostBuf, Rng};
use crate::l2_evict::L2Evict;

/// Sampled rows of the inputs, widened to f64 (not yet divided by T).
pub struct Inputs {
    pub student: Vec<Vec<f64>>,
    pub teacher: Vec<Vec<f64>>,
}

/// What one case produced.
pub struct Outputs {
    /// Seconds per timed run.
    pub times: Vec<f64>,
    /// The reduced loss of the checked run.
    pub loss: f32,
    /// Per-row losses of the checked run, all N.
    pub per_token: Vec<f32>,
    /// Gradient rows of the checked run at the sampled rows (empty for forward-only).
    pub grad_rows: Vec<Vec<f64>>,
}

/// Median of a non-empty list.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

pub enum Runner {
    Cpu(Box<CpuRunner>),
    Cuda(Box<CudaRunner>),
}

impl Runner {
    pub fn cpu() -> Self {
        Runner::Cpu(Box::new(CpuRunner {
            ctx: Context::cpu(),
            group: None,
        }))
    }

    pub fn cuda(ctx: Context) -> Result<Self, String> {
        Ok(Runner::Cuda(Box::new(CudaRunner::new(ctx)?)))
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Runner::Cuda(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Runner::Cpu(_) => format!(
                "cpu (f64 reference backend, {} threads)",
                std::thread::available_parallelism().map_or(1, |t| t.get())
            ),
            Runner::Cuda(c) => c.ctx.describe(),
        }
    }

    /// How the CUDA timing evicts the L2 cache before each timed run (`time_parts`), for the
    /// report; `None` on the CPU.
    pub fn flush_method(&self) -> Option<String> {
        match self {
            Runner::Cpu(_) => None,
            Runner::Cuda(c) => Some(match &c.evict {
                Ok(_) => format!(
                    "a read pass over {} MiB (dk_bench_l2_evict): clean lines only",
                    FLUSH_BYTES >> 20
                ),
                Err(e) => format!(
                    "a {} MiB memset (the read kernel did not load: {e}): up to an L2 of dirty \
                     lines written back inside each timed run",
                    FLUSH_BYTES >> 20
                ),
            }),
        }
    }

    /// Copy bandwidth in bytes per second (bytes read + bytes written over time), and what
    /// was measured.
    pub fn copy_bandwidth(&mut self) -> Result<(f64, String), String> {
        match self {
            Runner::Cpu(_) => Ok(cpu_copy_bandwidth()),
            Runner::Cuda(c) => c.copy_bandwidth(),
        }
    }

    /// Generates and places the inputs of one group; returns the sampled rows. `keep_student`:
    /// also keep a copy of the student logits (counted in the memory check), which in-place runs
    /// need (see [`Runner::run`]).
    pub fn load(
        &mut self,
        dtype: DType,
        n: usize,
        v: usize,
        seed: u64,
        samples: &[usize],
        keep_student: bool,
    ) -> Result<Inputs, String> {
        match self {
            Runner::Cpu(c) => c.load(dtype, n, v, seed, samples, keep_student),
            Runner::Cuda(c) => c.load(dtype, n, v, seed, samples, keep_student),
        }
    }

    /// One poisoned, checked run, then `iters` timed runs.
    ///
    /// `inplace` (with `with_grad`): the gradient is written over the student logits, which the
    /// group must have kept at load (`keep_student`). With a kept student, the student is
    /// restored from that copy before every run of every pass, the checked one and each timed
    /// one (outside the timed interval): every run sees the loaded logits (on the gradient
    /// values a previous run left, the CPU backend runs ~25 % faster: f16 gradients are mostly
    /// subnormal), and in-place and separate rows of one call are timed the same way.
    pub fn run(
        &mut self,
        params: &Params,
        with_grad: bool,
        inplace: bool,
        iters: usize,
        samples: &[usize],
    ) -> Result<Outputs, String> {
        let inplace = inplace && with_grad;
        match self {
            Runner::Cpu(c) => c.run(params, with_grad, inplace, iters, samples),
            Runner::Cuda(c) => c.run(params, with_grad, inplace, iters, samples),
        }
    }

    /// Frees the group's buffers.
    pub fn unload(&mut self) {
        match self {
            Runner::Cpu(c) => c.group = None,
            Runner::Cuda(c) => {
                c.group = None;
                let _ = c.stream.synchronize();
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Buffers and timed calls for operations beyond the divergence (the MoE rows of `dk bench`)

/// Memory the runner's backend works on: host memory for the CPU, device memory for CUDA.
pub enum Buf {
    Host(HostBuf),
    Cuda(CudaSlice<u8>),
}

impl Buf {
    pub fn len(&self) -> usize {
        match self {
            Buf::Host(b) => b.len(),
            Buf::Cuda(b) => b.len(),
        }
    }
}

/// One call of a timed sequence (a kernel launch on CUDA; the whole operation on the CPU).
pub type Part<'a> = &'a dyn Fn() -> Result<(), String>;

impl Runner {
    /// The library context the operations run on.
    pub fn context(&self) -> &Context {
        match self {
            Runner::Cpu(c) => &c.ctx,
            Runner::Cuda(c) => &c.ctx,
        }
    }

    /// Where the buffers of [`Runner::alloc`] live.
    pub fn location(&self) -> Location {
        self.context().location()
    }

    /// Free device memory (CUDA), or None on the CPU.
    pub fn free_memory(&self) -> Option<usize> {
        match self {
            Runner::Cpu(_) => None,
            Runner::Cuda(c) => c.cu.mem_get_info().ok().map(|(free, _)| free),
        }
    }

    /// A buffer of `bytes` bytes (at least 1), 16-byte aligned; its contents are unspecified
    /// until written.
    pub fn alloc(&self, bytes: usize) -> Result<Buf, String> {
        let bytes = bytes.max(1);
        match self {
            Runner::Cpu(_) => Ok(Buf::Host(HostBuf::try_zeroed(bytes)?)),
            // SAFETY: callers write (upload or poison) a buffer before any read of it.
            Runner::Cuda(c) => Ok(Buf::Cuda(drv("cuMemAlloc", unsafe {
                c.stream.alloc::<u8>(bytes)
            })?)),
        }
    }

    /// Copies `src` to the start of `dst` and waits for the copy.
    pub fn upload(&self, dst: &mut Buf, src: &[u8]) -> Result<(), String> {
        if src.len() > dst.len() {
            return Err(format!(
                "upload of {} bytes into a buffer of {}",
                src.len(),
                dst.len()
            ));
        }
        match (self, dst) {
            (Runner::Cpu(_), Buf::Host(d)) => {
                d.as_bytes_mut()[..src.len()].copy_from_slice(src);
                Ok(())
            }
            (Runner::Cuda(c), Buf::Cuda(d)) => {
                let s = &c.stream;
                drv(
                    "cuMemcpyHtoD",
                    s.memcpy_htod(src, &mut d.slice_mut(0..src.len())),
                )?;
                drv("cuStreamSynchronize", s.synchronize())
            }
            _ => Err("buffer of another backend".into()),
        }
    }

    /// Fills `dst` with copies of `pattern` (the last one cut short) and waits: device data that
    /// looks random without making the whole buffer on the host.
    pub fn upload_tiled(&self, dst: &mut Buf, pattern: &[u8]) -> Result<(), String> {
        if pattern.is_empty() {
            return Err("upload_tiled: empty pattern".into());
        }
        let len = dst.len();
        match (self, dst) {
            (Runner::Cpu(_), Buf::Host(d)) => {
                for chunk in d.as_bytes_mut().chunks_mut(pattern.len()) {
                    chunk.copy_from_slice(&pattern[..chunk.len()]);
                }
                Ok(())
            }
            (Runner::Cuda(c), Buf::Cuda(d)) => {
                let s = &c.stream;
                for start in (0..len).step_by(pattern.len()) {
                    let end = (start + pattern.len()).min(len);
                    drv(
                        "cuMemcpyHtoD",
                        s.memcpy_htod(&pattern[..end - start], &mut d.slice_mut(start..end)),
                    )?;
                }
                drv("cuStreamSynchronize", s.synchronize())
            }
            _ => Err("buffer of another backend".into()),
        }
    }

    /// The whole buffer, copied to the host (after the work queued before it).
    pub fn download(&self, src: &Buf) -> Result<Vec<u8>, String> {
        match (self, src) {
            (Runner::Cpu(_), Buf::Host(b)) => Ok(b.as_bytes().to_vec()),
            (Runner::Cuda(c), Buf::Cuda(b)) => {
                let s = &c.stream;
                let v = drv("cuMemcpyDtoH", s.clone_dtoh(b))?;
                drv("cuStreamSynchronize", s.synchronize())?;
                Ok(v)
            }
            _ => Err("buffer of another backend".into()),
        }
    }

    /// Fills the buffer with 0xFF bytes: NaN in every float type, −1 in every integer type.
    pub fn poison(&self, buf: &mut Buf) -> Result<(), String> {
        match (self, buf) {
            (Runner::Cpu(_), Buf::Host(b)) => {
                b.as_bytes_mut().fill(0xFF);
                Ok(())
            }
            (Runner::Cuda(c), Buf::Cuda(b)) => {
                let len = b.len();
                let p = c.ptr(b);
                // SAFETY: the pointer and length are those of a live allocation used on this
                // stream.
                drv("cuMemsetD8", unsafe {
                    cudarc::driver::result::memset_d8_async(p, 0xFF, len, c.stream.cu_stream())
                })
            }
            _ => Err("buffer of another backend".into()),
        }
    }

    /// The address of the buffer, for the library's raw views (valid while the buffer lives).
    pub fn addr(&self, buf: &mut Buf) -> *mut u8 {
        match (self, buf) {
            (_, Buf::Host(b)) => b.ptr_mut(),
            (Runner::Cuda(c), Buf::Cuda(b)) => c.ptr(b) as *mut u8,
            (Runner::Cpu(_), Buf::Cuda(_)) => std::ptr::null_mut(),
        }
    }

    /// How the library queues work: the runner's stream on CUDA (with `workspace`, device
    /// memory of `len` bytes, when given), nothing on the CPU.
    pub fn launch(&self, workspace: Option<(*mut u8, usize)>) -> Launch<'static> {
        match self {
            Runner::Cpu(_) => Launch::default(),
            Runner::Cuda(c) => {
                // SAFETY: the runner's stream belongs to the device's primary context and lives
                // as long as the runner, which outlives every call made with this launch.
                let launch = unsafe { Launch::on_stream(c.stream.cu_stream() as *mut c_void) };
                match workspace {
                    // SAFETY: the caller hands a live device allocation of `len` bytes that
                    // outlives the calls.
                    Some((p, len)) => launch.with_workspace(unsafe {
                        VectorMut::from_raw(p, len, Location::Cuda(c.ordinal))
                    }),
                    None => launch,
                }
            }
        }
    }

    /// Runs `parts` once, in order, and waits for them.
    pub fn run_parts(&self, parts: &[Part<'_>]) -> Result<(), String> {
        for p in parts {
            p()?;
        }
        self.sync()
    }

    /// Waits for the queued work (CUDA).
    pub fn sync(&self) -> Result<(), String> {
        match self {
            Runner::Cpu(_) => Ok(()),
            Runner::Cuda(c) => drv("cuStreamSynchronize", c.stream.synchronize()),
        }
    }

    /// `iters` runs of the sequence `parts`, each part timed on its own. On the CPU: the host
    /// clock around each call. On CUDA: events around each launch; before each run a read pass
    /// over a zeroed 256 MiB buffer evicts the L2 cache (outside the timed events; see
    /// `l2_evict`: unlike a memset it leaves no dirty lines to be written back inside the
    /// run), and the runs are queued behind GPU work long enough to cover their enqueueing, so
    /// that the events time the GPU, not the host's launch rate.
    pub fn time_parts(&self, iters: usize, parts: &[Part<'_>]) -> Result<Timed, String> {
        let mut out = vec![Vec::with_capacity(iters); parts.len()];
        match self {
            Runner::Cpu(_) => {
                for _ in 0..iters {
                    for (i, p) in parts.iter().enumerate() {
                        let t0 = Instant::now();
                        p()?;
                        out[i].push(t0.elapsed().as_secs_f64());
                    }
                }
                Ok(Timed {
                    parts: out,
                    host_s: None,
                })
            }
            Runner::Cuda(c) => c.time_parts(iters, parts),
        }
    }
}

/// Times of [`Runner::time_parts`].
pub struct Timed {
    /// Seconds, `[part][iteration]`.
    pub parts: Vec<Vec<f64>>,
    /// CUDA: host seconds to enqueue one run of the parts (library call, validation, launches),
    /// measured while the GPU was busy.
    pub host_s: Option<f64>,
}

/// What [`measure`] produced.
pub struct Measured {
    /// The outputs of the checked (first) run, downloaded.
    pub first: Vec<Vec<u8>>,
    /// Seconds, `[part][iteration]`.
    pub part_times: Vec<Vec<f64>>,
    /// CUDA: host seconds to enqueue one run.
    pub host_s: Option<f64>,
    /// A second poisoned run gave bitwise identical outputs.
    pub same: bool,
    /// The same, per output (in the order of `outputs`).
    pub same_each: Vec<bool>,
}

/// Poisons `outputs`, runs `parts` once (checked run) and downloads the outputs, times `iters`
/// runs, then poisons and runs once more and compares every output bitwise with the first.
pub fn measure(
    runner: &Runner,
    parts: &[Part<'_>],
    outputs: &mut [&mut Buf],
    iters: usize,
) -> Result<Measured, String> {
    for o in outputs.iter_mut() {
        runner.poison(o)?;
    }
    runner.run_parts(parts)?;
    let first = outputs
        .iter()
        .map(|o| runner.download(o))
        .collect::<Result<Vec<_>, _>>()?;
    let timed = runner.time_parts(iters, parts)?;
    for o in outputs.iter_mut() {
        runner.poison(o)?;
    }
    runner.run_parts(parts)?;
    let same_each = outputs
        .iter()
        .zip(&first)
        .map(|(o, a)| Ok(runner.download(o)? == *a))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Measured {
        first,
        part_times: timed.parts,
        host_s: timed.host_s,
        same: same_each.iter().all(|&s| s),
        same_each,
    })
}

/// Bytes of the scratch buffer the CUDA timing reads to evict the L2 cache (50 MB on H100 and
/// H200) and writes to hold the GPU busy while runs are queued.
const FLUSH_BYTES: usize = 256 << 20;

// ------------------------------------------------------------------------------------------
// CPU

struct CpuGroup {
    dtype: DType,
    n: usize,
    v: usize,
    student: HostBuf,
    teacher: HostBuf,
    grad: HostBuf,
    /// The loaded student, kept at load when the call has in-place passes (restored before
    /// every run, see [`Runner::run`]).
    pristine: Option<HostBuf>,
}

pub struct CpuRunner {
    ctx: Context,
    group: Option<CpuGroup>,
}

/// Multi-threaded memcpy of a 256 MiB buffer, median of 7 after a warm-up.
fn cpu_copy_bandwidth() -> (f64, String) {
    const BYTES: usize = 256 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let src: Vec<u8> = (0..BYTES).map(|i| (i * 31 % 251) as u8).collect();
    let mut dst = vec![1u8; BYTES];
    let per = BYTES.div_ceil(threads);
    let mut copy = || {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        t0.elapsed().as_secs_f64()
    };
    copy();
    let times: Vec<f64> = (0..7).map(|_| copy()).collect();
    std::hint::black_box(&dst);
    let t = median(&times);
    (
        2.0 * BYTES as f64 / t,
        format!("host memcpy of 256 MiB on {threads} threads, median of 7"),
    )
}

impl CpuRunner {
    fn load(
        &mut self,
        dtype: DType,
        n: usize,
        v: usize,
        seed: u64,
        samples: &[usize],
        keep_student: bool,
    ) -> Result<Inputs, String> {
        self.group = None;
        let buffers = if keep_student { 4 } else { 3 };
        let bytes = n
            .checked_mul(v)
            .and_then(|e| e.checked_mul(dtype.size()))
            .filter(|b| b.checked_mul(buffers).is_some())
            .ok_or_else(|| format!("{n} x {v} {} overflows the address space", dtype.name()))?;
        // Student, teacher, gradient (and the kept student), checked together before any is
        // allocated.
        if let Some(free) = host_memory_available() {
            if buffers * bytes > free {
                return Err(format!(
                    "{n} x {v} {} needs {:.2} GiB of host memory, {:.2} GiB are available (use --rows)",
                    dtype.name(),
                    (buffers * bytes) as f64 / GIB,
                    free as f64 / GIB
                ));
            }
        }
        let mut student = HostBuf::try_zeroed(bytes)?;
        let mut teacher = HostBuf::try_zeroed(bytes)?;
        fill_rows(
            seed,
            dtype,
            v,
            0,
            student.as_bytes_mut(),
            teacher.as_bytes_mut(),
        );
        let rb = v * dtype.size();
        let rows = |b: &HostBuf| -> Vec<Vec<f64>> {
            samples
                .iter()
                .map(|&r| widen(dtype, &b.as_bytes()[r * rb..(r + 1) * rb]))
                .collect()
        };
        let inputs = Inputs {
            student: rows(&student),
            teacher: rows(&teacher),
        };
        let pristine = if keep_student {
            let mut p = HostBuf::try_zeroed(bytes)?;
            p.as_bytes_mut().copy_from_slice(student.as_bytes());
            Some(p)
        } else {
            None
        };
        self.group = Some(CpuGroup {
            dtype,
            n,
            v,
            student,
            teacher,
            grad: HostBuf::try_zeroed(bytes)?,
            pristine,
        });
        Ok(inputs)
    }

    #[allow(clippy::too_many_arguments)]
    fn call(
        ctx: &Context,
        g: &mut CpuGroup,
        params: &Params,
        with_grad: bool,
        inplace: bool,
        per_token: &mut [f32],
        loss: &mut [f32],
    ) -> Result<(), String> {
        let (dtype, n, v) = (g.dtype, g.n, g.v);
        let grad = if inplace {
            g.student.ptr_mut()
        } else {
            g.grad.ptr_mut()
        };
        // SAFETY: the buffers hold n × v elements of dtype, 8-byte aligned, and live across
        // the call; the gradient buffer is distinct from the inputs, or exactly the student
        // (same rows and stride), which the library allows.
        let call = unsafe {
            Divergence {
                num_items: None,
                student: Matrix::from_raw(g.student.ptr(), dtype, n, v, v, Location::Host),
                teacher: Matrix::from_raw(g.teacher.ptr(), dtype, n, v, v, Location::Host),
                labels: None,
                per_token: Some(VectorMut::host(per_token)),
                loss: Some(VectorMut::host(loss)),
                grad: with_grad.then(|| MatrixMut::from_raw(grad, dtype, n, v, v, Location::Host)),
            }
        };
        ctx.divergence(call, params, &Launch::default())
            .map_err(|e| e.to_string())
    }

    fn run(
        &mut self,
        params: &Params,
        with_grad: bool,
        inplace: bool,
        iters: usize,
        samples: &[usize],
    ) -> Result<Outputs, String> {
        let g = self.group.as_mut().ok_or("no inputs loaded")?;
        if inplace && g.pristine.is_none() {
            return Err("an in-place run needs the student kept at load".into());
        }
        // The loaded student back (a previous in-place run wrote over it).
        let restore = |g: &mut CpuGroup| {
            if let Some(p) = &g.pristine {
                g.student.as_bytes_mut().copy_from_slice(p.as_bytes());
            }
        };
        restore(g);
        let mut per_token = vec![f32::NAN; g.n];
        let mut loss = [f32::NAN];
        if !inplace {
            g.grad.as_bytes_mut().fill(0xFF); // NaN in every dtype: unwritten entries show
        }
        Self::call(
            &self.ctx,
            g,
            params,
            with_grad,
            inplace,
            &mut per_token,
            &mut loss,
        )?;
        let rb = g.v * g.dtype.size();
        let out = if inplace { &g.student } else { &g.grad };
        let grad_rows = if with_grad {
            samples
                .iter()
                .map(|&r| widen(g.dtype, &out.as_bytes()[r * rb..(r + 1) * rb]))
                .collect()
        } else {
            Vec::new()
        };
        let mut times = Vec::with_capacity(iters);
        let (mut pt, mut l) = (vec![0f32; g.n], [0f32]);
        // With a kept student every timed run gets it back first, in place or not, so the
        // rows of one call compare like for like.
        let each = g.pristine.is_some();
        for _ in 0..iters {
            if each {
                restore(g);
            }
            let t0 = Instant::now();
            Self::call(&self.ctx, g, params, with_grad, inplace, &mut pt, &mut l)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        restore(g); // the next run of this group starts from the loaded student
        Ok(Outputs {
            times,
            loss: loss[0],
            per_token,
            grad_rows,
        })
    }
}

// ------------------------------------------------------------------------------------------
// CUDA

struct CudaGroup {
    dtype: DType,
    n: usize,
    v: usize,
    student: CudaSlice<u8>,
    teacher: CudaSlice<u8>,
    grad: CudaSlice<u8>,
    per_token: CudaSlice<f32>,
    loss: CudaSlice<f32>,
    workspace: CudaSlice<u8>,
    /// The loaded student, kept at load when the call has in-place passes (restored before
    /// every run, see [`Runner::run`]).
    pristine: Option<CudaSlice<u8>>,
}

pub struct CudaRunner {
    ctx: Context,
    cu: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    group: Option<CudaGroup>,
    /// The copy bandwidth measured by `copy_bandwidth` (bytes read + written per second), 0
    /// before.
    copy_bw: f64,
    /// The L2 flush kernel, or why it did not load (the timing then flushes with a memset).
    evict: Result<L2Evict, String>,
}

fn drv<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e:?}"))
}

const GIB: f64 = (1u64 << 30) as f64;

impl CudaRunner {
    fn new(ctx: Context) -> Result<Self, String> {
        let ordinal = ctx.cuda_device().ok_or("not a CUDA context")?.ordinal();
        // The primary context: the same one the library's context retained.
        let cu = drv("cuCtx", CudaContext::new(ordinal))?;
        // SAFETY: dk uses one stream for everything, so cudarc's event tracking is not needed.
        unsafe { cu.disable_event_tracking() };
        let stream = drv("cuStreamCreate", cu.new_stream())?;
        let sms = drv(
            "cuDeviceGetAttribute",
            cu.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        )?;
        let evict = L2Evict::load(&stream, sms.max(1) as usize);
        if let Err(e) = &evict {
            eprintln!("dk: warning: {e}; the L2 flush falls back to a memset");
        }
        Ok(CudaRunner {
            ctx,
            cu,
            stream,
            ordinal,
            group: None,
            copy_bw: 0.0,
            evict,
        })
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn timing_events(&self, count: usize) -> Result<Vec<cudarc::driver::CudaEvent>, String> {
        (0..count)
            .map(|_| {
                drv(
                    "cuEventCreate",
                    self.cu
                        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)),
                )
            })
            .collect()
    }

    fn elapsed(events: &[cudarc::driver::CudaEvent]) -> Result<Vec<f64>, String> {
        events
            .windows(2)
            .map(|w| drv("cuEventElapsedTime", w[0].elapsed_ms(&w[1])).map(|ms| ms as f64 / 1e3))
            .collect()
    }

    /// See [`Runner::time_parts`].
    fn time_parts(&self, iters: usize, parts: &[Part<'_>]) -> Result<Timed, String> {
        let s = &self.stream;
        // Enqueue cost of one run (its results are overwritten by the timed runs).
        let t0 = Instant::now();
        for p in parts {
            p()?;
        }
        let enqueue = t0.elapsed().as_secs_f64();
        drv("cuStreamSynchronize", s.synchronize())?;
        // SAFETY: the scratch is zeroed by the memsets below before the flush kernel reads it.
        let scratch = drv("cuMemAlloc", unsafe { s.alloc::<u8>(FLUSH_BYTES) })?;
        let sp = self.ptr(&scratch);
        let memset = || {
            // SAFETY: a live allocation of FLUSH_BYTES bytes used on this stream.
            drv("cuMemsetD8", unsafe {
                cudarc::driver::result::memset_d8_async(sp, 0, FLUSH_BYTES, s.cu_stream())
            })
        };
        // GPU work ahead of the runs: at least 1.5 times what enqueueing them takes, assuming
        // a memset writes no faster than the copy rate (read + write) measured in this run.
        let rate = if self.copy_bw > 0.0 {
            self.copy_bw
        } else {
            5e12
        };
        let ahead = 1.5 * enqueue * iters as f64 + 200e-6;
        let count = ((ahead * rate / FLUSH_BYTES as f64).ceil() as usize).clamp(1, 64);
        for _ in 0..count {
            memset()?;
        }
        let per = parts.len() + 1;
        let events = self.timing_events(iters * per)?;
        let mut host = 0.0;
        for run in events.chunks(per) {
            // Evict the L2 cache: each run starts from DRAM, with no dirty line left to write.
            match &self.evict {
                Ok(evict) => evict.launch(s, &scratch)?,
                Err(_) => memset()?,
            }
            drv("cuEventRecord", run[0].record(s))?;
            for (p, e) in parts.iter().zip(&run[1..]) {
                let t0 = Instant::now();
                p()?;
                host += t0.elapsed().as_secs_f64();
                drv("cuEventRecord", e.record(s))?;
            }
        }
        let host_s = host / iters.max(1) as f64;
        drv("cuStreamSynchronize (timed runs)", s.synchronize())?;
        let mut out = vec![Vec::with_capacity(iters); parts.len()];
        for run in events.chunks(per) {
            for (j, t) in Self::elapsed(run)?.into_iter().enumerate() {
                out[j].push(t);
            }
        }
        drop(scratch);
        Ok(Timed {
            parts: out,
            host_s: Some(host_s),
        })
    }

    /// A device-to-device copy of up to 1 GiB of random bits (never zeros: METHOD.md), timed
    /// with events, median of 10 after a warm-up.
    fn copy_bandwidth(&mut self) -> Result<(f64, String), String> {
        let (free, _) = drv("cuMemGetInfo", self.cu.mem_get_info())?;
        let bytes = ((1usize << 30).min(free / 4) / 4096) * 4096;
        if bytes < (16 << 20) {
            return Err(format!(
                "only {:.2} GiB of device memory free: cannot measure the copy bandwidth",
                free as f64 / GIB
            ));
        }
        // Random words, uploaded once.
        let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
        let words: Vec<u64> = (0..bytes / 8).map(|_| rng.next_u64()).collect();
        let src = drv("cuMemcpyHtoD", self.stream.clone_htod(&words))?;
        drop(words);
        // SAFETY: the destination is only written.
        let mut dst = drv("cuMemAlloc", unsafe { self.stream.alloc::<u64>(bytes / 8) })?;
        drv("cuMemcpyDtoD", self.stream.memcpy_dtod(&src, &mut dst))?;
        let reps = 10;
        let events = self.timing_events(reps + 1)?;
        drv("cuEventRecord", events[0].record(&self.stream))?;
        for e in &events[1..] {
            drv("cuMemcpyDtoD", self.stream.memcpy_dtod(&src, &mut dst))?;
            drv("cuEventRecord", e.record(&self.stream))?;
        }
        drv("cuStreamSynchronize", self.stream.synchronize())?;
        let t = median(&Self::elapsed(&events)?);
        self.copy_bw = 2.0 * bytes as f64 / t;
        Ok((
            2.0 * bytes as f64 / t,
            format!(
                "device-to-device copy of {} MiB, median of {reps}",
                bytes >> 20
            ),
        ))
    }

    fn load(
        &mut self,
        dtype: DType,
        n: usize,
        v: usize,
        seed: u64,
        samples: &[usize],
        keep_student: bool,
    ) -> Result<Inputs, String> {
        self.group = None;
        drv("cuStreamSynchronize", self.stream.synchronize())?;
        let rb = v * dtype.size();
        let bytes = n * rb;
        let ws_bytes = self.ctx.divergence_workspace_size(n);
        let buffers = if keep_student { 4 } else { 3 };
        let need = buffers * bytes + 8 * n + ws_bytes + (64 << 20);
        let (free, _) = drv("cuMemGetInfo", self.cu.mem_get_info())?;
        if need > free {
            return Err(format!(
                "{n} x {v} {} needs {:.2} GiB of device memory, {:.2} GiB are free (use --rows)",
                dtype.name(),
                need as f64 / GIB,
                free as f64 / GIB
            ));
        }
        let s = &self.stream;
        // SAFETY: every buffer below is written (uploaded or poisoned) before it is read.
        let (mut student, mut teacher, grad, per_token, loss, workspace) = unsafe {
            (
                drv("cuMemAlloc", s.alloc::<u8>(bytes))?,
                drv("cuMemAlloc", s.alloc::<u8>(bytes))?,
                drv("cuMemAlloc", s.alloc::<u8>(bytes))?,
                drv("cuMemAlloc", s.alloc::<f32>(n))?,
                drv("cuMemAlloc", s.alloc::<f32>(1))?,
                drv("cuMemAlloc", s.alloc::<u8>(ws_bytes.max(1)))?,
            )
        };
        // Generate on the host in chunks of about 256 MiB per input and upload.
        let chunk_rows = ((256usize << 20) / rb).clamp(1, n);
        let mut hs = vec![0u8; chunk_rows * rb];
        let mut ht = vec![0u8; chunk_rows * rb];
        let mut inputs = Inputs {
            student: vec![Vec::new(); samples.len()],
            teacher: vec![Vec::new(); samples.len()],
        };
        let mut r0 = 0;
        while r0 < n {
            let k = chunk_rows.min(n - r0);
            let (cs, ct) = (&mut hs[..k * rb], &mut ht[..k * rb]);
            fill_rows(seed, dtype, v, r0, cs, ct);
            let range = r0 * rb..(r0 + k) * rb;
            drv(
                "cuMemcpyHtoD",
                s.memcpy_htod(&*cs, &mut student.slice_mut(range.clone())),
            )?;
            drv(
                "cuMemcpyHtoD",
                s.memcpy_htod(&*ct, &mut teacher.slice_mut(range)),
            )?;
            for (i, &r) in samples.iter().enumerate() {
                if (r0..r0 + k).contains(&r) {
                    let o = (r - r0) * rb;
                    inputs.student[i] = widen(dtype, &cs[o..o + rb]);
                    inputs.teacher[i] = widen(dtype, &ct[o..o + rb]);
                }
            }
            drv("cuStreamSynchronize", s.synchronize())?;
            r0 += k;
        }
        let pristine = if keep_student {
            Some(drv(
                "cuMemcpyDtoD (keep the student)",
                s.clone_dtod(&student),
            )?)
        } else {
            None
        };
        self.group = Some(CudaGroup {
            dtype,
            n,
            v,
            student,
            teacher,
            grad,
            per_token,
            loss,
            workspace,
            pristine,
        });
        Ok(inputs)
    }

    /// Copies the kept student (if any) back over the student, on the stream.
    fn restore_student(&mut self) -> Result<(), String> {
        let s = &self.stream;
        if let Some(g) = self.group.as_mut() {
            if let Some(p) = &g.pristine {
                drv(
                    "cuMemcpyDtoD (restore the student)",
                    s.memcpy_dtod(p, &mut g.student),
                )?;
            }
        }
        Ok(())
    }

    fn call(&self, params: &Params, with_grad: bool, inplace: bool) -> Result<(), String> {
        let g = self.group.as_ref().ok_or("no inputs loaded")?;
        let grad = if inplace {
            self.ptr(&g.student)
        } else {
            self.ptr(&g.grad)
        };
        let (dtype, n, v, loc) = (g.dtype, g.n, g.v, Location::Cuda(self.ordinal));
        let ws_len = self.ctx.divergence_workspace_size(n);
        // SAFETY: every pointer is a live allocation of this device of the size the view
        // describes (the gradient distinct from the inputs, or exactly the student, which the
        // library allows); the stream belongs to the device's primary context and outlives the
        // call.
        let (call, launch) = unsafe {
            (
                Divergence {
                    num_items: None,
                    student: Matrix::from_raw(
                        self.ptr(&g.student) as *const u8,
                        dtype,
                        n,
                        v,
                        v,
                        loc,
                    ),
                    teacher: Matrix::from_raw(
                        self.ptr(&g.teacher) as *const u8,
                        dtype,
                        n,
                        v,
                        v,
                        loc,
                    ),
                    labels: None,
                    per_token: Some(VectorMut::from_raw(
                        self.ptr(&g.per_token) as *mut f32,
                        n,
                        loc,
                    )),
                    loss: Some(VectorMut::from_raw(self.ptr(&g.loss) as *mut f32, 1, loc)),
                    grad: with_grad
                        .then(|| MatrixMut::from_raw(grad as *mut u8, dtype, n, v, v, loc)),
                },
                Launch::on_stream(self.stream.cu_stream() as *mut c_void).with_workspace(
                    VectorMut::from_raw(self.ptr(&g.workspace) as *mut u8, ws_len, loc),
                ),
            )
        };
        self.ctx
            .divergence(call, params, &launch)
            .map_err(|e| e.to_string())
    }

    fn run(
        &mut self,
        params: &Params,
        with_grad: bool,
        inplace: bool,
        iters: usize,
        samples: &[usize],
    ) -> Result<Outputs, String> {
        if inplace && self.group.as_ref().is_some_and(|g| g.pristine.is_none()) {
            return Err("an in-place run needs the student kept at load".into());
        }
        self.restore_student()?;
        let stream = self.stream.clone(); // not a borrow of self: restore_student needs &mut
        let g = self.group.as_ref().ok_or("no inputs loaded")?;
        let (dtype, v, s) = (g.dtype, g.v, &stream);
        let rb = v * dtype.size();
        // Poison every output with NaN (0xFF bytes) so an unwritten element fails the check
        // (the in-place gradient overwrites the student, which holds the inputs).
        let grad_len = if inplace { 0 } else { g.grad.len() };
        // SAFETY: the pointers and sizes are those of live allocations of this stream.
        unsafe {
            for (p, len) in [
                (self.ptr(&g.grad), grad_len),
                (self.ptr(&g.per_token), 4 * g.n),
                (self.ptr(&g.loss), 4),
            ] {
                drv(
                    "cuMemsetD8",
                    cudarc::driver::result::memset_d8_async(p, 0xFF, len, s.cu_stream()),
                )?;
            }
        }
        self.call(params, with_grad, inplace)?;
        drv("cuStreamSynchronize (checked run)", s.synchronize())?;
        let per_token = drv("cuMemcpyDtoH", s.clone_dtoh(&g.per_token))?;
        let loss = drv("cuMemcpyDtoH", s.clone_dtoh(&g.loss))?;
        drv("cuStreamSynchronize", s.synchronize())?;
        let loss = loss[0];
        let mut grad_rows = Vec::new();
        if with_grad {
            let mut buf = vec![0u8; rb];
            let out = if inplace { &g.student } else { &g.grad };
            for &r in samples {
                drv(
                    "cuMemcpyDtoH",
                    s.memcpy_dtoh(&out.slice(r * rb..(r + 1) * rb), &mut buf),
                )?;
                drv("cuStreamSynchronize", s.synchronize())?;
                grad_rows.push(widen(dtype, &buf));
            }
        }
        // Timed runs back to back, an event between each two; with a kept student (a call with
        // in-place passes), each run, in place or not, gets the loaded student back first,
        // outside its pair of events, so the rows of one call compare like for like. That copy
        // leaves up to an L2 of dirty student lines, so a read pass (l2_evict) follows it, also
        // outside the events: their write-back is not the timed run's (~12 µs, a real share
        // at N = 256).
        let times = if g.pristine.is_some() {
            let events = self.timing_events(2 * iters)?;
            // (A clone of the kernel handle: restore_student borrows the runner mutably.)
            let flush = match self.evict.clone() {
                Ok(evict) => Some((
                    evict,
                    drv("cuMemAlloc (L2 flush)", s.alloc_zeros::<u8>(FLUSH_BYTES))?,
                )),
                Err(_) => None,
            };
            for pair in events.chunks_exact(2) {
                self.restore_student()?;
                if let Some((evict, scratch)) = &flush {
                    evict.launch(s, scratch)?;
                }
                drv("cuEventRecord", pair[0].record(s))?;
                self.call(params, with_grad, inplace)?;
                drv("cuEventRecord", pair[1].record(s))?;
            }
            self.restore_student()?; // the next run of this group starts from the loaded student
            drv("cuStreamSynchronize (timed runs)", s.synchronize())?;
            events
                .chunks_exact(2)
                .map(|w| Self::elapsed(w).map(|t| t[0]))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            let events = self.timing_events(iters + 1)?;
            drv("cuEventRecord", events[0].record(s))?;
            for e in &events[1..] {
                self.call(params, with_grad, inplace)?;
                drv("cuEventRecord", e.record(s))?;
            }
            drv("cuStreamSynchronize (timed runs)", s.synchronize())?;
            Self::elapsed(&events)?
        };
        Ok(Outputs {
            times,
            loss,
            per_token,
            grad_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_kernels::divergence::Kind;

    #[test]
    fn in_place_runs_write_over_the_student_and_later_runs_see_the_inputs() {
        let mut runner = Runner::cpu();
        let samples = [0, 3, 4];
        let inputs = runner.load(DType::BF16, 5, 999, 7, &samples, true).unwrap();
        let params = Params {
            kind: Kind::Jsd,
            ..Params::default()
        };
        let student_rows = |runner: &Runner| {
            let Runner::Cpu(c) = runner else {
                unreachable!()
            };
            let g = c.group.as_ref().unwrap();
            let rb = g.v * g.dtype.size();
            samples
                .iter()
                .map(|&r| widen(g.dtype, &g.student.as_bytes()[r * rb..(r + 1) * rb]))
                .collect::<Vec<_>>()
        };
        let separate = runner.run(&params, true, false, 1, &samples).unwrap();
        // In place, the checked run's gradient rows are read from the student's memory: they
        // are the separate run's gradient only if it was written there.
        let inplace = runner.run(&params, true, true, 3, &samples).unwrap();
        assert_eq!(separate.grad_rows, inplace.grad_rows);
        assert_eq!(separate.per_token, inplace.per_token);
        assert_eq!(inplace.times.len(), 3);
        // After the run the student holds the loaded logits again, for the next pass.
        assert_eq!(student_rows(&runner), inputs.student);
        let after = runner.run(&params, false, false, 1, &samples).unwrap();
        assert_eq!(after.per_token, separate.per_token);
        // Without the kept student an in-place run is refused.
        runner
            .load(DType::BF16, 5, 999, 7, &samples, false)
            .unwrap();
        assert!(runner.run(&params, true, true, 1, &samples).is_err());
    }
}
