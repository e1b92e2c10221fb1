//! Where `dk bench` runs: the CPU reference backend or one CUDA device. Both hold one group of
//! inputs (one dtype and shape) at a time, run the divergence once poisoned and checked, then
//! `iters` timed runs, and measure the copy bandwidth the floor is defined against.

use std::ffi::c_void;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use distill_kernels::divergence::{Divergence, Params};
use distill_kernels::{Context, DType, Launch, Location, Matrix, MatrixMut, VectorMut};

use crate::data::{fill_rows, widen, HostBuf};

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

    /// Copy bandwidth in bytes per second (bytes read + bytes written over time), and what
    /// was measured.
    pub fn copy_bandwidth(&mut self) -> Result<(f64, String), String> {
        match self {
            Runner::Cpu(_) => Ok(cpu_copy_bandwidth()),
            Runner::Cuda(c) => c.copy_bandwidth(),
        }
    }

    /// Generates and places the inputs of one group; returns the sampled rows.
    pub fn load(
        &mut self,
        dtype: DType,
        n: usize,
        v: usize,
        seed: u64,
        samples: &[usize],
    ) -> Result<Inputs, String> {
        match self {
            Runner::Cpu(c) => Ok(c.load(dtype, n, v, seed, samples)),
            Runner::Cuda(c) => c.load(dtype, n, v, seed, samples),
        }
    }

    /// One poisoned, checked run, then `iters` timed runs.
    pub fn run(
        &mut self,
        params: &Params,
        with_grad: bool,
        iters: usize,
        samples: &[usize],
    ) -> Result<Outputs, String> {
        match self {
            Runner::Cpu(c) => c.run(params, with_grad, iters, samples),
            Runner::Cuda(c) => c.run(params, with_grad, iters, samples),
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
// CPU

struct CpuGroup {
    dtype: DType,
    n: usize,
    v: usize,
    student: HostBuf,
    teacher: HostBuf,
    grad: HostBuf,
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
    fn load(&mut self, dtype: DType, n: usize, v: usize, seed: u64, samples: &[usize]) -> Inputs {
        self.group = None;
        let bytes = n * v * dtype.size();
        let mut student = HostBuf::zeroed(bytes);
        let mut teacher = HostBuf::zeroed(bytes);
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
        self.group = Some(CpuGroup {
            dtype,
            n,
            v,
            student,
            teacher,
            grad: HostBuf::zeroed(bytes),
        });
        inputs
    }

    fn call(
        ctx: &Context,
        g: &mut CpuGroup,
        params: &Params,
        with_grad: bool,
        per_token: &mut [f32],
        loss: &mut [f32],
    ) -> Result<(), String> {
        let (dtype, n, v) = (g.dtype, g.n, g.v);
        // SAFETY: the buffers hold n × v elements of dtype, 8-byte aligned, and live across
        // the call; the gradient buffer is distinct from the inputs.
        let call = unsafe {
            Divergence {
                student: Matrix::from_raw(g.student.ptr(), dtype, n, v, v, Location::Host),
                teacher: Matrix::from_raw(g.teacher.ptr(), dtype, n, v, v, Location::Host),
                labels: None,
                per_token: Some(VectorMut::host(per_token)),
                loss: Some(VectorMut::host(loss)),
                grad: with_grad
                    .then(|| MatrixMut::from_raw(g.grad.ptr_mut(), dtype, n, v, v, Location::Host)),
            }
        };
        ctx.divergence(call, params, &Launch::default())
            .map_err(|e| e.to_string())
    }

    fn run(
        &mut self,
        params: &Params,
        with_grad: bool,
        iters: usize,
        samples: &[usize],
    ) -> Result<Outputs, String> {
        let g = self.group.as_mut().ok_or("no inputs loaded")?;
        let mut per_token = vec![f32::NAN; g.n];
        let mut loss = [f32::NAN];
        g.grad.as_bytes_mut().fill(0xFF); // NaN in every dtype: unwritten entries show
        Self::call(&self.ctx, g, params, with_grad, &mut per_token, &mut loss)?;
        let rb = g.v * g.dtype.size();
        let grad_rows = if with_grad {
            samples
                .iter()
                .map(|&r| widen(g.dtype, &g.grad.as_bytes()[r * rb..(r + 1) * rb]))
                .collect()
        } else {
            Vec::new()
        };
        let mut times = Vec::with_capacity(iters);
        let (mut pt, mut l) = (vec![0f32; g.n], [0f32]);
        for _ in 0..iters {
            let t0 = Instant::now();
            Self::call(&self.ctx, g, params, with_grad, &mut pt, &mut l)?;
            times.push(t0.elapsed().as_secs_f64());
        }
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
}

pub struct CudaRunner {
    ctx: Context,
    cu: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    group: Option<CudaGroup>,
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
        Ok(CudaRunner {
            ctx,
            cu,
            stream,
            ordinal,
            group: None,
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

    /// A device-to-device copy of up to 1 GiB, timed with events, median of 10 after a warm-up.
    fn copy_bandwidth(&mut self) -> Result<(f64, String), String> {
        let (free, _) = drv("cuMemGetInfo", self.cu.mem_get_info())?;
        let bytes = ((1usize << 30).min(free / 4) / 4096) * 4096;
        if bytes < (16 << 20) {
            return Err(format!(
                "only {:.2} GiB of device memory free: cannot measure the copy bandwidth",
                free as f64 / GIB
            ));
        }
        let src = drv("cuMemAlloc", self.stream.alloc_zeros::<u8>(bytes))?;
        // SAFETY: the destination is only written.
        let mut dst = drv("cuMemAlloc", unsafe { self.stream.alloc::<u8>(bytes) })?;
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
    ) -> Result<Inputs, String> {
        self.group = None;
        drv("cuStreamSynchronize", self.stream.synchronize())?;
        let rb = v * dtype.size();
        let bytes = n * rb;
        let ws_bytes = self.ctx.divergence_workspace_size(n);
        let need = 3 * bytes + 8 * n + ws_bytes + (64 << 20);
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
        });
        Ok(inputs)
    }

    fn call(&self, params: &Params, with_grad: bool) -> Result<(), String> {
        let g = self.group.as_ref().ok_or("no inputs loaded")?;
        let (dtype, n, v, loc) = (g.dtype, g.n, g.v, Location::Cuda(self.ordinal));
        let ws_len = self.ctx.divergence_workspace_size(n);
        // SAFETY: every pointer is a live allocation of this device of the size the view
        // describes; the stream belongs to the device's primary context and outlives the call.
        let (call, launch) = unsafe {
            (
                Divergence {
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
                    grad: with_grad.then(|| {
                        MatrixMut::from_raw(self.ptr(&g.grad) as *mut u8, dtype, n, v, v, loc)
                    }),
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
        iters: usize,
        samples: &[usize],
    ) -> Result<Outputs, String> {
        let g = self.group.as_ref().ok_or("no inputs loaded")?;
        let (dtype, v, s) = (g.dtype, g.v, &self.stream);
        let rb = v * dtype.size();
        // Poison every output with NaN (0xFF bytes) so an unwritten element fails the check.
        // SAFETY: the pointers and sizes are those of live allocations of this stream.
        unsafe {
            for (p, len) in [
                (self.ptr(&g.grad), g.grad.len()),
                (self.ptr(&g.per_token), 4 * g.n),
                (self.ptr(&g.loss), 4),
            ] {
                drv(
                    "cuMemsetD8",
                    cudarc::driver::result::memset_d8_async(p, 0xFF, len, s.cu_stream()),
                )?;
            }
        }
        self.call(params, with_grad)?;
        drv("cuStreamSynchronize (checked run)", s.synchronize())?;
        let per_token = drv("cuMemcpyDtoH", s.clone_dtoh(&g.per_token))?;
        let loss = drv("cuMemcpyDtoH", s.clone_dtoh(&g.loss))?;
        drv("cuStreamSynchronize", s.synchronize())?;
        let loss = loss[0];
        let mut grad_rows = Vec::new();
        if with_grad {
            let mut buf = vec![0u8; rb];
            for &r in samples {
                drv(
                    "cuMemcpyDtoH",
                    s.memcpy_dtoh(&g.grad.slice(r * rb..(r + 1) * rb), &mut buf),
                )?;
                drv("cuStreamSynchronize", s.synchronize())?;
                grad_rows.push(widen(dtype, &buf));
            }
        }
        // Timed runs back to back, an event between each two.
        let events = self.timing_events(iters + 1)?;
        drv("cuEventRecord", events[0].record(s))?;
        for e in &events[1..] {
            self.call(params, with_grad)?;
            drv("cuEventRecord", e.record(s))?;
        }
        drv("cuStreamSynchronize (timed runs)", s.synchronize())?;
        Ok(Outputs {
            times: Self::elapsed(&events)?,
            loss,
            per_token,
            grad_rows,
        })
    }
}
