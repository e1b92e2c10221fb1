//! Criterion benchmarks of MoE dispatch: route, permute, combine and slot-dot, throughput in
//! the floor bytes of `cuda/MOE.md` (route: N·E·4 + 4·(3·N·k + R); permute 2·R·H·b; combine
//! and slot-dot (R + N)·H·b; b = 2 for bf16, R = N·k permuted rows); on CUDA also the backward
//! passes with the weights' gradient (`permute_backward` where the shape scales the input,
//! `combine_backward` where it weights the output: one fused kernel each), in their strict bytes
//! (each operand read or written once: (R + 2N)·H·b, or (2R + N)·H·b, plus 4·N·k).
//!
//! - `moe/cpu/<op>/<shape>`: the CPU reference backend, small: route at N = 1024, the row
//!   operations at N = 128 tokens (bf16 activations, f32 router logits).
//! - `moe/cuda/<op>/<shape>`: CUDA device 0 at N = 16384 for the three shapes of `ANCHORS.md`
//!   (Llama 4 Scout, H 5120, E 16, sigmoid top-1, scaled input; E 128 sigmoid top-1 at H 5120;
//!   Qwen3-MoE, H 2048, E 128, softmax top-8 renormalised), device buffers, the stream
//!   synchronised inside the timed closure. Skipped, with a line saying why, when there is no
//!   usable CUDA device (no driver, no device, or a build without kernels).
//!
//! `cargo bench --bench moe` runs both; `dk bench --ops moe` is the checked, floor-relative report.

use std::ffi::c_void;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use distill_kernels::moe::{
    Combine, CombineBackward, Permute, PermuteBackward, Route, RouteParams, Score, SlotDot,
};
use distill_kernels::{Context, DType, Launch, Location, Matrix, MatrixMut, Vector, VectorMut};
use half::bf16;

mod common;
use common::{bf16s, uniform};

const CPU_ROUTE_TOKENS: usize = 1024;
const CPU_TOKENS: usize = 128;
const CUDA_TOKENS: usize = 16384;

/// A benchmarked MoE layer: hidden size, experts and router.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    h: usize,
    e: usize,
    params: RouteParams,
    /// The weight scales the expert input (permute) instead of the output (combine).
    scaled_input: bool,
}

fn shapes() -> [Shape; 3] {
    let sigmoid1 = RouteParams {
        score: Score::Sigmoid,
        ..RouteParams::new(1)
    };
    [
        Shape {
            name: "scout_h5120_e16_k1",
            h: 5120,
            e: 16,
            params: sigmoid1,
            scaled_input: true,
        },
        Shape {
            name: "h5120_e128_k1",
            h: 5120,
            e: 128,
            params: sigmoid1,
            scaled_input: false,
        },
        Shape {
            name: "qwen3_h2048_e128_k8",
            h: 2048,
            e: 128,
            params: RouteParams {
                renormalize: true,
                ..RouteParams::new(8)
            },
            scaled_input: false,
        },
    ]
}

/// Floor bytes of a route call.
fn route_bytes(n: usize, s: &Shape) -> u64 {
    let k = s.params.k;
    (n * s.e * 4 + 4 * (3 * n * k + n * k)) as u64
}

/// Floor bytes of permute (2·R·H·b) and of combine / slot-dot ((R + N)·H·b), bf16.
fn row_bytes(n: usize, s: &Shape) -> (u64, u64) {
    let r = n * s.params.k;
    let b = DType::BF16.size();
    ((2 * r * s.h * b) as u64, ((r + n) * s.h * b) as u64)
}

/// Host outputs of a route.
struct HostRoute {
    weights: Vec<f32>,
    perm: Vec<i32>,
    position: Vec<i32>,
}

fn route_host(ctx: &Context, logits: &[f32], n: usize, s: &Shape) -> HostRoute {
    let (e, k) = (s.e, s.params.k);
    let mut ids = vec![0i32; n * k];
    let mut r = HostRoute {
        weights: vec![0f32; n * k],
        perm: vec![0i32; n * k],
        position: vec![0i32; n * k],
    };
    let (mut counts, mut offsets) = (vec![0i32; e], vec![0i32; e + 1]);
    ctx.moe_route(
        Route {
            logits: Matrix::host(logits, n, e, e).unwrap(),
            bias: None,
            expert_ids: VectorMut::host(&mut ids),
            weights: VectorMut::host(&mut r.weights),
            counts: VectorMut::host(&mut counts),
            offsets: VectorMut::host(&mut offsets),
            perm: VectorMut::host(&mut r.perm),
            position: VectorMut::host(&mut r.position),
        },
        &s.params,
        &Launch::default(),
    )
    .unwrap();
    r
}

fn bench_cpu(c: &mut Criterion) {
    let ctx = Context::cpu();
    let mut group = c.benchmark_group("moe/cpu");
    group.sampling_mode(SamplingMode::Flat);
    for s in shapes() {
        let (e, k, h) = (s.e, s.params.k, s.h);
        // Route.
        let n = CPU_ROUTE_TOKENS;
        let logits = uniform(n * e, 1);
        let (mut ids, mut w, mut pos) = (vec![0i32; n * k], vec![0f32; n * k], vec![0i32; n * k]);
        let (mut counts, mut offsets, mut perm) =
            (vec![0i32; e], vec![0i32; e + 1], vec![0i32; n * k]);
        group.throughput(Throughput::Bytes(route_bytes(n, &s)));
        group.bench_function(BenchmarkId::new("route", format!("{}_n{n}", s.name)), |b| {
            b.iter(|| {
                ctx.moe_route(
                    Route {
                        logits: Matrix::host(&logits, n, e, e).unwrap(),
                        bias: None,
                        expert_ids: VectorMut::host(&mut ids),
                        weights: VectorMut::host(&mut w),
                        counts: VectorMut::host(&mut counts),
                        offsets: VectorMut::host(&mut offsets),
                        perm: VectorMut::host(&mut perm),
                        position: VectorMut::host(&mut pos),
                    },
                    &s.params,
                    &Launch::default(),
                )
                .unwrap()
            })
        });

        // Row operations on a smaller N.
        let n = CPU_TOKENS;
        let r = n * k;
        let rt = route_host(&ctx, &uniform(n * e, 2), n, &s);
        let x = bf16s(n * h, 3);
        let rows = bf16s(r * h, 4);
        let mut xp = vec![bf16::ZERO; r * h];
        let mut y = vec![bf16::ZERO; n * h];
        let mut dots = vec![0f32; n * k];
        let (pb, cb) = row_bytes(n, &s);
        let id = |op: &str| BenchmarkId::new(op.to_string(), format!("{}_n{n}", s.name));
        group.throughput(Throughput::Bytes(pb));
        group.bench_function(id("permute"), |b| {
            b.iter(|| {
                ctx.moe_permute(
                    Permute {
                        x: Matrix::host(&x, n, h, h).unwrap(),
                        k,
                        perm: Vector::host(&rt.perm),
                        weights: s.scaled_input.then(|| Vector::host(&rt.weights[..])),
                        out: MatrixMut::host(&mut xp, r, h, h).unwrap(),
                    },
                    &Launch::default(),
                )
                .unwrap()
            })
        });
        group.throughput(Throughput::Bytes(cb));
        group.bench_function(id("combine"), |b| {
            b.iter(|| {
                ctx.moe_combine(
                    Combine {
                        rows: Matrix::host(&rows, r, h, h).unwrap(),
                        k,
                        position: Vector::host(&rt.position),
                        weights: (!s.scaled_input).then(|| Vector::host(&rt.weights[..])),
                        y: MatrixMut::host(&mut y, n, h, h).unwrap(),
                    },
                    &Launch::default(),
                )
                .unwrap()
            })
        });
        group.bench_function(id("slot_dot"), |b| {
            b.iter(|| {
                ctx.moe_slot_dot(
                    SlotDot {
                        tokens: Matrix::host(&x, n, h, h).unwrap(),
                        rows: Matrix::host(&rows, r, h, h).unwrap(),
                        k,
                        position: Vector::host(&rt.position),
                        out: VectorMut::host(&mut dots),
                    },
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
    use cudarc::driver::CudaSlice;

    pub fn bench(c: &mut Criterion) {
        let Some((ctx, stream)) = setup("moe/cuda") else {
            return;
        };
        let loc = Location::Cuda(0);
        let n = CUDA_TOKENS;
        let mut group = c.benchmark_group("moe/cuda");
        for s in shapes() {
            let (e, k, h) = (s.e, s.params.k, s.h);
            let r = n * k;
            let logits: CudaSlice<f32> = stream.clone_htod(&uniform(n * e, 5)).expect("upload");
            let ids: CudaSlice<i32> = stream.alloc_zeros(n * k).expect("alloc");
            let weights: CudaSlice<f32> = stream.alloc_zeros(n * k).expect("alloc");
            let counts: CudaSlice<i32> = stream.alloc_zeros(e).expect("alloc");
            let offsets: CudaSlice<i32> = stream.alloc_zeros(e + 1).expect("alloc");
            let perm: CudaSlice<i32> = stream.alloc_zeros(r).expect("alloc");
            let position: CudaSlice<i32> = stream.alloc_zeros(n * k).expect("alloc");
            let ws_len = ctx.moe_route_workspace_size(n, e, k);
            let ws: CudaSlice<u8> = stream.alloc_zeros(ws_len.max(1)).expect("alloc");
            let bits = |v: Vec<bf16>| v.into_iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
            let x: CudaSlice<u16> = stream.clone_htod(&bits(bf16s(n * h, 6))).expect("upload");
            let rows: CudaSlice<u16> = stream.clone_htod(&bits(bf16s(r * h, 7))).expect("upload");
            let xp: CudaSlice<u16> = stream.alloc_zeros(r * h).expect("alloc");
            let y: CudaSlice<u16> = stream.alloc_zeros(n * h).expect("alloc");
            let grad_w: CudaSlice<f32> = stream.alloc_zeros(n * k).expect("alloc");
            stream.synchronize().expect("sync");
            let gwa = ptr(&grad_w, &stream);
            let (lp, ip, wp, cp, op, pp, qp, sp) = (
                ptr(&logits, &stream),
                ptr(&ids, &stream),
                ptr(&weights, &stream),
                ptr(&counts, &stream),
                ptr(&offsets, &stream),
                ptr(&perm, &stream),
                ptr(&position, &stream),
                ptr(&ws, &stream),
            );
            let (xa, ra, xpa, ya) = (
                ptr(&x, &stream),
                ptr(&rows, &stream),
                ptr(&xp, &stream),
                ptr(&y, &stream),
            );
            let launch = |with_ws: bool| {
                // SAFETY: the stream belongs to device 0's primary context and outlives the
                // calls; the workspace is a live allocation of ws_len bytes.
                let l = unsafe { Launch::on_stream(stream.cu_stream() as *mut c_void) };
                if with_ws {
                    l.with_workspace(unsafe { VectorMut::from_raw(sp as *mut u8, ws_len, loc) })
                } else {
                    l
                }
            };
            // SAFETY (route, permute, combine): every pointer is a live allocation of device 0
            // of the size its view describes.
            let route = || {
                let call = unsafe {
                    Route {
                        logits: Matrix::from_raw(lp as *const u8, DType::F32, n, e, e, loc),
                        bias: None,
                        expert_ids: VectorMut::from_raw(ip as *mut i32, n * k, loc),
                        weights: VectorMut::from_raw(wp as *mut f32, n * k, loc),
                        counts: VectorMut::from_raw(cp as *mut i32, e, loc),
                        offsets: VectorMut::from_raw(op as *mut i32, e + 1, loc),
                        perm: VectorMut::from_raw(pp as *mut i32, r, loc),
                        position: VectorMut::from_raw(qp as *mut i32, n * k, loc),
                    }
                };
                ctx.moe_route(call, &s.params, &launch(true)).unwrap();
            };
            let permute = || {
                let call = unsafe {
                    Permute {
                        x: Matrix::from_raw(xa as *const u8, DType::BF16, n, h, h, loc),
                        k,
                        perm: Vector::from_raw(pp as *const i32, r, loc),
                        weights: s
                            .scaled_input
                            .then(|| Vector::from_raw(wp as *const f32, n * k, loc)),
                        out: MatrixMut::from_raw(xpa as *mut u8, DType::BF16, r, h, h, loc),
                    }
                };
                ctx.moe_permute(call, &launch(false)).unwrap();
            };
            let combine = || {
                let call = unsafe {
                    Combine {
                        rows: Matrix::from_raw(ra as *const u8, DType::BF16, r, h, h, loc),
                        k,
                        position: Vector::from_raw(qp as *const i32, n * k, loc),
                        weights: (!s.scaled_input)
                            .then(|| Vector::from_raw(wp as *const f32, n * k, loc)),
                        y: MatrixMut::from_raw(ya as *mut u8, DType::BF16, n, h, h, loc),
                    }
                };
                ctx.moe_combine(call, &launch(false)).unwrap();
            };
            // The backward pass with the weights' gradient of whichever op the shape weights:
            // x and the permuted rows stand in for (grad_y, expert_out) / (x, grad_xp).
            let backward = || {
                let launch = launch(false);
                // SAFETY: as above; grad_w holds n·k floats.
                unsafe {
                    let tokens = Matrix::from_raw(xa as *const u8, DType::BF16, n, h, h, loc);
                    let permuted = Matrix::from_raw(ra as *const u8, DType::BF16, r, h, h, loc);
                    let position = Vector::from_raw(qp as *const i32, n * k, loc);
                    let w = Some(Vector::from_raw(wp as *const f32, n * k, loc));
                    let gw = Some(VectorMut::from_raw(gwa as *mut f32, n * k, loc));
                    if s.scaled_input {
                        let grad_x = MatrixMut::from_raw(ya as *mut u8, DType::BF16, n, h, h, loc);
                        let call = PermuteBackward {
                            grad_xp: permuted,
                            k,
                            position,
                            weights: w,
                            x: Some(tokens),
                            grad_x,
                            grad_weights: gw,
                        };
                        ctx.moe_permute_backward(call, &launch).unwrap();
                    } else {
                        let grad_eo =
                            MatrixMut::from_raw(xpa as *mut u8, DType::BF16, r, h, h, loc);
                        let call = CombineBackward {
                            grad_y: tokens,
                            expert_out: Some(permuted),
                            k,
                            perm: Vector::from_raw(pp as *const i32, r, loc),
                            position,
                            weights: w,
                            grad_expert_out: grad_eo,
                            grad_weights: gw,
                        };
                        ctx.moe_combine_backward(call, &launch).unwrap();
                    }
                }
            };
            // The route's outputs feed permute and combine.
            route();
            stream.synchronize().expect("sync");
            let id = |op: &str| BenchmarkId::new(op.to_string(), format!("{}_n{n}", s.name));
            let (pb, cb) = row_bytes(n, &s);
            let strict =
                (s.h * 2 * if s.scaled_input { r + 2 * n } else { 2 * r + n } + 4 * n * k) as u64;
            let bwd = if s.scaled_input {
                "permute_backward"
            } else {
                "combine_backward"
            };
            for (name, bytes, f) in [
                ("route", route_bytes(n, &s), &route as &dyn Fn()),
                ("permute", pb, &permute),
                ("combine", cb, &combine),
                (bwd, strict, &backward),
            ] {
                group.throughput(Throughput::Bytes(bytes));
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
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_cpu, cuda::bench
}
criterion_main!(benches);
