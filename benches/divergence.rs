//! Criterion benchmarks of the divergence, forward + backward, throughput in bytes
//! (3 × N × V × 2 for bf16: both inputs read once, the gradient written once).
//!
//! - `divergence/cpu/<kind>`: the CPU reference backend, bf16, N = 4, V = 151936.
//! - `divergence/cuda/<kind>`: CUDA device 0, bf16, N = 4096, V = 151936, device buffers, the
//!   stream synchronised inside the timed closure. Skipped, with a line saying why, when there is
//!   no usable CUDA device (no driver, no device, or a build without kernels).
//!
//! `cargo bench --bench divergence` runs both; `dk bench` is the checked, floor-relative report.

use std::ffi::c_void;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use distill_kernels::divergence::{Divergence, Kind, Params};
use distill_kernels::{Context, DType, Launch, Location, Matrix, MatrixMut, VectorMut};
use half::bf16;

mod common;

const V: usize = 151_936;
const CPU_ROWS: usize = 4;
const CUDA_ROWS: usize = 4096;
const KINDS: [Kind; 3] = [Kind::ForwardKl, Kind::ReverseKl, Kind::Jsd];

/// `count` bf16 logits: student ~ N(0, 3²), teacher = 0.9 × student + N(0, 1.5²).
fn logits(count: usize, seed: u64) -> (Vec<bf16>, Vec<bf16>) {
    let mut state = seed;
    let mut next = move || {
        // SplitMix64, mapped to (0, 1].
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) + 1) as f64 / (1u64 << 53) as f64
    };
    let (mut s, mut t) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for _ in 0..count {
        let r = (-2.0 * next().ln()).sqrt();
        let (a, b) = (std::f64::consts::TAU * next()).sin_cos();
        let x = 3.0 * r * a;
        s.push(bf16::from_f64(x));
        t.push(bf16::from_f64(0.9 * x + 1.5 * r * b));
    }
    (s, t)
}

fn params(kind: Kind) -> Params {
    Params {
        kind,
        beta: 0.5,
        ..Params::default()
    }
}

fn bench_cpu(c: &mut Criterion) {
    let (n, v) = (CPU_ROWS, V);
    let (student, teacher) = logits(n * v, 1);
    let mut grad = vec![bf16::ZERO; n * v];
    let mut loss = [0f32];
    let ctx = Context::cpu();
    let mut group = c.benchmark_group("divergence/cpu");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes((3 * n * v * DType::BF16.size()) as u64));
    for kind in KINDS {
        let p = params(kind);
        group.bench_function(
            BenchmarkId::new(kind.name(), format!("bf16_{n}x{v}")),
            |b| {
                b.iter(|| {
                    ctx.divergence(
                        Divergence {
                            num_items: None,
                            student: Matrix::host(&student, n, v, v).unwrap(),
                            teacher: Matrix::host(&teacher, n, v, v).unwrap(),
                            labels: None,
                            per_token: None,
                            loss: Some(VectorMut::host(&mut loss)),
                            grad: Some(MatrixMut::host(&mut grad, n, v, v).unwrap()),
                        },
                        &p,
                        &Launch::default(),
                    )
                    .unwrap();
                })
            },
        );
    }
    group.finish();
}

mod cuda {
    use super::*;
    use common::cuda::{ptr, setup};
    use cudarc::driver::CudaSlice;

    pub fn bench(c: &mut Criterion) {
        let Some((ctx, stream)) = setup("divergence/cuda") else {
            return;
        };
        let (n, v) = (CUDA_ROWS, V);
        // 256 distinct random rows, tiled over N rows at distinct addresses (no cache reuse).
        let tile = 256.min(n);
        let (s_host, t_host) = logits(tile * v, 2);
        let bits = |x: &[bf16]| x.iter().map(|h| h.to_bits()).collect::<Vec<u16>>();
        let (s_bits, t_bits) = (bits(&s_host), bits(&t_host));
        let mut student: CudaSlice<u16> = stream.alloc_zeros(n * v).expect("alloc");
        let mut teacher: CudaSlice<u16> = stream.alloc_zeros(n * v).expect("alloc");
        let grad: CudaSlice<u16> = stream.alloc_zeros(n * v).expect("alloc");
        let loss: CudaSlice<f32> = stream.alloc_zeros(1).expect("alloc");
        let ws_len = ctx.divergence_workspace_size(n);
        let ws: CudaSlice<u8> = stream.alloc_zeros(ws_len.max(1)).expect("alloc");
        let mut r0 = 0;
        while r0 < n {
            let k = tile.min(n - r0);
            let range = r0 * v..(r0 + k) * v;
            stream
                .memcpy_htod(&s_bits[..k * v], &mut student.slice_mut(range.clone()))
                .expect("upload");
            stream
                .memcpy_htod(&t_bits[..k * v], &mut teacher.slice_mut(range))
                .expect("upload");
            stream.synchronize().expect("sync");
            r0 += k;
        }
        let (sp, tp, gp, lp, wp) = (
            ptr(&student, &stream),
            ptr(&teacher, &stream),
            ptr(&grad, &stream),
            ptr(&loss, &stream),
            ptr(&ws, &stream),
        );
        let loc = Location::Cuda(0);
        let mut group = c.benchmark_group("divergence/cuda");
        group.throughput(Throughput::Bytes((3 * n * v * DType::BF16.size()) as u64));
        for kind in KINDS {
            let p = params(kind);
            group.bench_function(
                BenchmarkId::new(kind.name(), format!("bf16_{n}x{v}")),
                |b| {
                    b.iter(|| {
                        // SAFETY: the pointers are live allocations of device 0 of the sizes the
                        // views describe; the stream belongs to its primary context.
                        let (call, launch) = unsafe {
                            (
                                Divergence {
                                    num_items: None,
                                    student: Matrix::from_raw(
                                        sp as *const u8,
                                        DType::BF16,
                                        n,
                                        v,
                                        v,
                                        loc,
                                    ),
                                    teacher: Matrix::from_raw(
                                        tp as *const u8,
                                        DType::BF16,
                                        n,
                                        v,
                                        v,
                                        loc,
                                    ),
                                    labels: None,
                                    per_token: None,
                                    loss: Some(VectorMut::from_raw(lp as *mut f32, 1, loc)),
                                    grad: Some(MatrixMut::from_raw(
                                        gp as *mut u8,
                                        DType::BF16,
                                        n,
                                        v,
                                        v,
                                        loc,
                                    )),
                                },
                                Launch::on_stream(stream.cu_stream() as *mut c_void)
                                    .with_workspace(VectorMut::from_raw(
                                        wp as *mut u8,
                                        ws_len,
                                        loc,
                                    )),
                            )
                        };
                        ctx.divergence(call, &p, &launch).unwrap();
                        stream.synchronize().unwrap();
                    })
                },
            );
        }
        group.finish();
        stream.synchronize().expect("sync");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_cpu, cuda::bench
}
criterion_main!(benches);
