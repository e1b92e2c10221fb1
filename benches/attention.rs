//! Criterion benchmarks of grouped-query attention, throughput in FLOPs counted as in
//! `ANCHORS.md`: 4·B·Hq·S²·D forward (halved when causal), 2.5 × that for the backward alone,
//! 3.5 × for forward + backward. Criterion prints them as "elem/s": read FLOP/s.
//!
//! - `attention/cpu/<pass>/<shape>`: the f64 CPU reference on small shapes (B = 1, S = 128,
//!   Hq / Hkv = 8 / 2, D = 64 and 128, causal and not; bf16), so a run stays short.
//! - `attention/cuda/<pass>/<shape>`: CUDA device 0 on the two shapes of `ANCHORS.md` (bf16,
//!   D = 128, causal: B = 4, S = 4096, 24 / 8 and B = 1, S = 16384, 40 / 8), device buffers,
//!   a caller workspace, the stream synchronised inside the timed closure; the backward in the
//!   deterministic mode and, as a separate row, without it. Skipped, with a line saying why,
//!   when there is no usable CUDA device (no driver, no device, a build without kernels, or a
//!   library whose attention kernels fail to run).
//!
//! `cargo bench --bench attention` runs both; `dk bench --ops attention` is the checked report.

use std::ffi::c_void;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use distill_kernels::attention::{Attention, AttentionBackward, AttentionParams, Batch};
use distill_kernels::{
    Context, DType, Error, Launch, Location, Matrix, MatrixMut, Vector, VectorMut,
};
use half::bf16;

mod common;
use common::bf16s;

/// A benchmarked attention shape (padded batch, Sq = Sk = S).
#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
}

impl Shape {
    fn name(&self) -> String {
        format!(
            "b{}_s{}_h{}x{}_d{}{}",
            self.b,
            self.s,
            self.hq,
            self.hkv,
            self.d,
            if self.causal { "_causal" } else { "" }
        )
    }
    fn params(&self) -> AttentionParams {
        AttentionParams::new(self.hq, self.hkv, self.d).causal(self.causal)
    }
    fn batch(&self) -> Batch<'static> {
        Batch::Padded {
            batch: self.b,
            seqlen_q: self.s,
            seqlen_k: self.s,
        }
    }
    /// Token rows.
    fn rows(&self) -> usize {
        self.b * self.s
    }
    fn qc(&self) -> usize {
        self.hq * self.d
    }
    fn kc(&self) -> usize {
        self.hkv * self.d
    }
    /// Forward FLOPs as in ANCHORS.md.
    fn flops(&self) -> u64 {
        let full = 4 * self.b * self.hq * self.s * self.s * self.d;
        (if self.causal { full / 2 } else { full }) as u64
    }
}

/// The three timed passes: (name, FLOPs as a multiple of the forward's, in tenths).
const FWD: (&str, u64) = ("forward", 10);
const BWD: (&str, u64) = ("backward", 25);
const FWD_BWD: (&str, u64) = ("forward_backward", 35);

fn cpu_shapes() -> Vec<Shape> {
    let mut out = Vec::new();
    for d in [64, 128] {
        for causal in [true, false] {
            out.push(Shape {
                b: 1,
                s: 128,
                hq: 8,
                hkv: 2,
                d,
                causal,
            });
        }
    }
    out
}

fn bench_cpu(c: &mut Criterion) {
    let ctx = Context::cpu();
    let mut group = c.benchmark_group("attention/cpu");
    group.sampling_mode(SamplingMode::Flat);
    for sh in cpu_shapes() {
        let (rows, qc, kc) = (sh.rows(), sh.qc(), sh.kc());
        let q = bf16s(rows * qc, 1);
        let k = bf16s(rows * kc, 2);
        let v = bf16s(rows * kc, 3);
        let dout = bf16s(rows * qc, 4);
        let mut out = vec![bf16::ZERO; rows * qc];
        let mut lse = vec![0f32; sh.hq * rows];
        let (mut dq, mut dk, mut dv) = (
            vec![bf16::ZERO; rows * qc],
            vec![bf16::ZERO; rows * kc],
            vec![bf16::ZERO; rows * kc],
        );
        let p = sh.params();
        let forward = |out: &mut [bf16], lse: &mut [f32]| {
            ctx.attention(
                Attention {
                    batch: sh.batch(),
                    q: Matrix::host(&q, rows, qc, qc).unwrap(),
                    k: Matrix::host(&k, rows, kc, kc).unwrap(),
                    v: Matrix::host(&v, rows, kc, kc).unwrap(),
                    out: MatrixMut::host(out, rows, qc, qc).unwrap(),
                    lse: VectorMut::host(lse),
                },
                &p,
                &Launch::default(),
            )
            .unwrap()
        };
        forward(&mut out, &mut lse);
        let id = |pass: &str| BenchmarkId::new(pass.to_string(), sh.name());
        group.throughput(Throughput::Elements(sh.flops() * FWD.1 / 10));
        group.bench_function(id(FWD.0), |b| b.iter(|| forward(&mut out, &mut lse)));
        group.throughput(Throughput::Elements(sh.flops() * BWD.1 / 10));
        group.bench_function(id(BWD.0), |b| {
            b.iter(|| {
                ctx.attention_backward(
                    AttentionBackward {
                        batch: sh.batch(),
                        dout: Matrix::host(&dout, rows, qc, qc).unwrap(),
                        q: Matrix::host(&q, rows, qc, qc).unwrap(),
                        k: Matrix::host(&k, rows, kc, kc).unwrap(),
                        v: Matrix::host(&v, rows, kc, kc).unwrap(),
                        out: Matrix::host(&out, rows, qc, qc).unwrap(),
                        lse: Vector::host(&lse),
                        dq: MatrixMut::host(&mut dq, rows, qc, qc).unwrap(),
                        dk: MatrixMut::host(&mut dk, rows, kc, kc).unwrap(),
                        dv: MatrixMut::host(&mut dv, rows, kc, kc).unwrap(),
                    },
                    &p,
                    &Launch::default(),
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

mod cuda {
    use super::*;
    use common::cuda::{iter_synced, ptr, setup};
    use cudarc::driver::{CudaSlice, CudaStream};
    use std::sync::Arc;

    /// The shapes of ANCHORS.md.
    fn shapes() -> [Shape; 2] {
        [
            Shape {
                b: 4,
                s: 4096,
                hq: 24,
                hkv: 8,
                d: 128,
                causal: true,
            },
            Shape {
                b: 1,
                s: 16384,
                hq: 40,
                hkv: 8,
                d: 128,
                causal: true,
            },
        ]
    }

    /// Device buffers of one shape.
    struct Bufs {
        q: CudaSlice<u16>,
        k: CudaSlice<u16>,
        v: CudaSlice<u16>,
        dout: CudaSlice<u16>,
        out: CudaSlice<u16>,
        lse: CudaSlice<f32>,
        dq: CudaSlice<u16>,
        dk: CudaSlice<u16>,
        dv: CudaSlice<u16>,
    }

    fn upload(stream: &Arc<CudaStream>, n: usize, seed: u64) -> CudaSlice<u16> {
        let bits: Vec<u16> = bf16s(n, seed).into_iter().map(|x| x.to_bits()).collect();
        stream.clone_htod(&bits).expect("upload")
    }

    /// One pass over device memory. Every pointer is a live allocation of device 0 of the size
    /// its view describes; the stream belongs to device 0's primary context.
    struct Runner<'a> {
        ctx: &'a Context,
        stream: &'a Arc<CudaStream>,
        sh: Shape,
        bufs: &'a Bufs,
        ws: &'a CudaSlice<u8>,
        ws_len: usize,
    }

    impl Runner<'_> {
        fn launch(&self) -> Launch<'_> {
            // SAFETY: the stream belongs to device 0's primary context and outlives the call.
            let l = unsafe { Launch::on_stream(self.stream.cu_stream() as *mut c_void) };
            // SAFETY: a live device allocation of at least `ws_len` bytes.
            l.with_workspace(unsafe {
                VectorMut::from_raw(
                    ptr(self.ws, self.stream) as *mut u8,
                    self.ws_len,
                    Location::Cuda(0),
                )
            })
        }

        fn mat<'b>(&self, p: u64, cols: usize) -> Matrix<'b> {
            // SAFETY: see the struct docs.
            unsafe {
                Matrix::from_raw(
                    p as *const u8,
                    DType::BF16,
                    self.sh.rows(),
                    cols,
                    cols,
                    Location::Cuda(0),
                )
            }
        }

        fn mat_mut<'b>(&self, p: u64, cols: usize) -> MatrixMut<'b> {
            // SAFETY: see the struct docs.
            unsafe {
                MatrixMut::from_raw(
                    p as *mut u8,
                    DType::BF16,
                    self.sh.rows(),
                    cols,
                    cols,
                    Location::Cuda(0),
                )
            }
        }

        fn forward(&self) -> Result<(), Error> {
            let (s, b, sh) = (self.stream, self.bufs, self.sh);
            let lse_len = sh.hq * sh.rows();
            let call = Attention {
                batch: sh.batch(),
                q: self.mat(ptr(&b.q, s), sh.qc()),
                k: self.mat(ptr(&b.k, s), sh.kc()),
                v: self.mat(ptr(&b.v, s), sh.kc()),
                out: self.mat_mut(ptr(&b.out, s), sh.qc()),
                // SAFETY: see the struct docs.
                lse: unsafe {
                    VectorMut::from_raw(ptr(&b.lse, s) as *mut f32, lse_len, Location::Cuda(0))
                },
            };
            self.ctx.attention(call, &sh.params(), &self.launch())
        }

        fn call(&self) -> AttentionBackward<'_> {
            let (s, b, sh) = (self.stream, self.bufs, self.sh);
            let lse_len = sh.hq * sh.rows();
            AttentionBackward {
                batch: sh.batch(),
                dout: self.mat(ptr(&b.dout, s), sh.qc()),
                q: self.mat(ptr(&b.q, s), sh.qc()),
                k: self.mat(ptr(&b.k, s), sh.kc()),
                v: self.mat(ptr(&b.v, s), sh.kc()),
                out: self.mat(ptr(&b.out, s), sh.qc()),
                // SAFETY: see the struct docs.
                lse: unsafe {
                    Vector::from_raw(ptr(&b.lse, s) as *const f32, lse_len, Location::Cuda(0))
                },
                dq: self.mat_mut(ptr(&b.dq, s), sh.qc()),
                dk: self.mat_mut(ptr(&b.dk, s), sh.kc()),
                dv: self.mat_mut(ptr(&b.dv, s), sh.kc()),
            }
        }

        fn backward(&self, deterministic: bool) -> Result<(), Error> {
            let p = AttentionParams {
                deterministic,
                ..self.sh.params()
            };
            self.ctx.attention_backward(self.call(), &p, &self.launch())
        }
    }

    pub fn bench(c: &mut Criterion) {
        let Some((ctx, stream)) = setup("attention/cuda") else {
            return;
        };
        let mut group = c.benchmark_group("attention/cuda");
        for sh in shapes() {
            let (rows, qc, kc) = (sh.rows(), sh.qc(), sh.kc());
            let bufs = Bufs {
                q: upload(&stream, rows * qc, 11),
                k: upload(&stream, rows * kc, 12),
                v: upload(&stream, rows * kc, 13),
                dout: upload(&stream, rows * qc, 14),
                out: stream.alloc_zeros(rows * qc).expect("alloc"),
                lse: stream.alloc_zeros(sh.hq * rows).expect("alloc"),
                dq: stream.alloc_zeros(rows * qc).expect("alloc"),
                dk: stream.alloc_zeros(rows * kc).expect("alloc"),
                dv: stream.alloc_zeros(rows * kc).expect("alloc"),
            };
            let probe = Runner {
                ctx: &ctx,
                stream: &stream,
                sh,
                bufs: &bufs,
                ws: &stream.alloc_zeros(1).expect("alloc"),
                ws_len: 1,
            };
            let ws_len = match ctx.attention_backward_workspace_size(&probe.call(), &sh.params()) {
                Ok(n) => n,
                Err(e) => {
                    println!("attention/cuda: skipped ({e})");
                    return;
                }
            };
            let ws: CudaSlice<u8> = stream.alloc_zeros(ws_len.max(1)).expect("alloc");
            let run = Runner {
                ctx: &ctx,
                stream: &stream,
                sh,
                bufs: &bufs,
                ws: &ws,
                ws_len,
            };
            // One untimed pass of each: the backward needs the forward's out and LSE, and a
            // library whose kernels cannot run is reported instead of benchmarked.
            if let Err(e) = run.forward().and_then(|()| run.backward(true)) {
                println!("attention/cuda: skipped ({e})");
                return;
            }
            stream.synchronize().expect("sync");
            let id = |pass: &str| BenchmarkId::new(pass.to_string(), sh.name());
            let fwd = || run.forward().unwrap();
            let bwd = || run.backward(true).unwrap();
            let bwd_nondet = || run.backward(false).unwrap();
            let both = || {
                run.forward().unwrap();
                run.backward(true).unwrap();
            };
            for (name, tenths, f) in [
                (FWD.0, FWD.1, &fwd as &dyn Fn()),
                (BWD.0, BWD.1, &bwd),
                ("backward_nondeterministic", BWD.1, &bwd_nondet),
                (FWD_BWD.0, FWD_BWD.1, &both),
            ] {
                group.throughput(Throughput::Elements(sh.flops() * tenths / 10));
                group.bench_function(id(name), |b| iter_synced(b, &stream, f));
            }
            stream.synchronize().expect("sync");
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench_cpu, cuda::bench
}
criterion_main!(benches);
