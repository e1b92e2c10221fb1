//! An empty batch (N = 0 rows) through the divergence, the fused linear divergence and the row
//! scaling, on the CPU and on CUDA device 0 when present: the reduced loss is written as 0, the
//! fused weight gradient is zeroed (or left alone when accumulating), nothing else is touched,
//! and the operands of no rows may be null pointers, as an empty tensor's are. V = 0 (or H = 0)
//! is still an error.

mod common;

use std::ffi::c_void;

use common::{devices, Device};
use distill_kernels::divergence::{Divergence, DivergenceInPlace, Kind, Params, Reduction};
use distill_kernels::fused::{FusedLinear, FusedLinearParams};
use distill_kernels::scale_rows::ScaleRows;
use distill_kernels::{
    DType, ErrorKind, Launch, Location, Matrix, MatrixMut, Result, Vector, VectorMut,
};

const V: usize = 77;
const H: usize = 16;
const VW: usize = 40; // fused vocabulary
const PAD: usize = 3; // grad_weight row padding, which must stay untouched

/// One f32 output and one padded f32 `[VW, H]` gradient buffer on the device, poisoned, plus
/// the views and launch to use them.
struct Outputs {
    loss: Vec<f32>,
    grad_weight: Vec<f32>,
}

impl Outputs {
    fn poisoned() -> Self {
        Outputs {
            loss: vec![f32::NAN],
            grad_weight: (0..VW * (H + PAD)).map(|i| -1.0 - i as f32).collect(),
        }
    }
}

/// Runs `f` with device (or host) copies of `out` and null / empty operands, then copies the
/// outputs back.
fn run(
    dev: &Device,
    out: &mut Outputs,
    f: impl FnOnce(Location, *mut f32, *mut f32, &Launch<'_>) -> Result<()>,
) -> Result<()> {
    match dev {
        Device::Cpu(_) => f(
            Location::Host,
            out.loss.as_mut_ptr(),
            out.grad_weight.as_mut_ptr(),
            &Launch::default(),
        ),
        Device::Cuda(c) => {
            let mut loss = c.stream.clone_htod(&out.loss).expect("htod");
            let mut gw = c.stream.clone_htod(&out.grad_weight).expect("htod");
            let (lp, gp) = {
                use cudarc::driver::DevicePtrMut;
                let (lp, _s1) = loss.device_ptr_mut(&c.stream);
                let (gp, _s2) = gw.device_ptr_mut(&c.stream);
                (lp as usize as *mut f32, gp as usize as *mut f32)
            };
            // SAFETY: the test's own live stream of device 0.
            let launch = unsafe { Launch::on_stream(c.stream.cu_stream() as *mut c_void) };
            let result = f(Location::Cuda(0), lp, gp, &launch);
            c.stream.synchronize().expect("sync");
            out.loss = c.stream.clone_dtoh(&loss).expect("dtoh");
            out.grad_weight = c.stream.clone_dtoh(&gw).expect("dtoh");
            result
        }
    }
}

fn empty(dtype: DType, cols: usize, loc: Location) -> Matrix<'static> {
    // SAFETY: no rows: nothing is read (a null pointer, as an empty tensor's).
    unsafe { Matrix::from_raw(std::ptr::null(), dtype, 0, cols, cols, loc) }
}

fn empty_mut(dtype: DType, cols: usize, loc: Location) -> MatrixMut<'static> {
    // SAFETY: as `empty`.
    unsafe { MatrixMut::from_raw(std::ptr::null_mut(), dtype, 0, cols, cols, loc) }
}

fn scalar<'a>(p: *mut f32, loc: Location) -> VectorMut<'a, f32> {
    // SAFETY: one f32 of the caller's buffer at `loc`.
    unsafe { VectorMut::from_raw(p, 1, loc) }
}

#[test]
fn the_divergence_of_no_rows_is_a_zero_loss() {
    for dev in devices("the_divergence_of_no_rows_is_a_zero_loss") {
        let ctx = dev.context();
        for kind in [Kind::ForwardKl, Kind::ReverseKl, Kind::Jsd] {
            for reduction in [Reduction::BatchMean, Reduction::Sum, Reduction::None] {
                for (num_items, in_place) in [(None, false), (Some(5.0), false), (None, true)] {
                    let params = Params {
                        kind,
                        reduction,
                        num_items: num_items.filter(|_| reduction == Reduction::BatchMean),
                        ..Params::default()
                    };
                    let what = format!("{} {kind:?} {reduction:?} in place {in_place}", dev.name());
                    let mut out = Outputs::poisoned();
                    let before_gw = out.grad_weight.clone();
                    run(&dev, &mut out, |loc, loss, _, launch| {
                        // SAFETY: no rows: nothing is read or written through the null views.
                        let (labels, per_token) = unsafe {
                            (
                                Vector::from_raw(std::ptr::null::<i64>(), 0, loc),
                                VectorMut::from_raw(std::ptr::null_mut::<f32>(), 0, loc),
                            )
                        };
                        if in_place {
                            ctx.divergence_in_place(
                                DivergenceInPlace {
                                    num_items: None,
                                    student: empty_mut(DType::BF16, V, loc),
                                    teacher: empty(DType::F32, V, loc),
                                    labels: Some(labels),
                                    per_token: Some(per_token),
                                    loss: Some(scalar(loss, loc)),
                                },
                                &params,
                                launch,
                            )
                        } else {
                            ctx.divergence(
                                Divergence {
                                    num_items: None,
                                    student: empty(DType::BF16, V, loc),
                                    teacher: empty(DType::F32, V, loc),
                                    labels: Some(labels),
                                    per_token: Some(per_token),
                                    loss: Some(scalar(loss, loc)),
                                    grad: Some(empty_mut(DType::BF16, V, loc)),
                                },
                                &params,
                                launch,
                            )
                        }
                    })
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(out.loss[0].to_bits(), 0f32.to_bits(), "{what}");
                    assert_eq!(
                        out.grad_weight, before_gw,
                        "{what}: untouched memory written"
                    );
                }
            }
        }
        // V = 0 stays an error, and writes nothing.
        let mut out = Outputs::poisoned();
        let err = run(&dev, &mut out, |loc, loss, _, launch| {
            ctx.divergence(
                Divergence {
                    num_items: None,
                    student: empty(DType::F32, 0, loc),
                    teacher: empty(DType::F32, 0, loc),
                    labels: None,
                    per_token: None,
                    loss: Some(scalar(loss, loc)),
                    grad: None,
                },
                &Params::default(),
                launch,
            )
        })
        .expect_err("V = 0");
        assert_eq!(err.kind(), ErrorKind::Shape, "{err}");
        assert!(out.loss[0].is_nan(), "V = 0 wrote the loss");
    }
}

#[test]
fn the_fused_divergence_of_no_rows_zeroes_the_weight_gradient() {
    for dev in devices("the_fused_divergence_of_no_rows_zeroes_the_weight_gradient") {
        let ctx = dev.context();
        // The weights are real (V rows of H), only the hidden states are empty.
        let weight: Vec<f32> = (0..VW * H).map(|i| (i as f32 * 0.37).sin()).collect();
        for accumulate in [false, true] {
            let what = format!("{} accumulate {accumulate}", dev.name());
            let mut out = Outputs::poisoned();
            let before = out.grad_weight.clone();
            let params = FusedLinearParams {
                accumulate,
                ..FusedLinearParams::default()
            };
            let weight_dev;
            let w_ptr = match &dev {
                Device::Cpu(_) => weight.as_ptr(),
                Device::Cuda(c) => {
                    weight_dev = c.stream.clone_htod(&weight).expect("htod");
                    use cudarc::driver::DevicePtr;
                    let (p, _s) = weight_dev.device_ptr(&c.stream);
                    p as usize as *const f32
                }
            };
            run(&dev, &mut out, |loc, loss, gw, launch| {
                // SAFETY: the weight buffer holds VW x H f32 at `loc`; the gradient buffer VW
                // rows of H + PAD; the empty operands are never read.
                let (w, grad_weight) = unsafe {
                    (
                        Matrix::from_raw(w_ptr.cast(), DType::F32, VW, H, H, loc),
                        MatrixMut::from_raw(gw.cast(), DType::F32, VW, H, H + PAD, loc),
                    )
                };
                ctx.fused_linear_divergence(
                    FusedLinear {
                        num_items: None,
                        student_hidden: empty(DType::F32, H, loc),
                        student_weight: w,
                        teacher_hidden: empty(DType::F32, H, loc),
                        teacher_weight: w,
                        labels: None,
                        per_token: None,
                        loss: Some(scalar(loss, loc)),
                        grad_hidden: Some(empty_mut(DType::F32, H, loc)),
                        grad_weight: Some(grad_weight),
                    },
                    &params,
                    launch,
                )
            })
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(out.loss[0].to_bits(), 0f32.to_bits(), "{what}");
            for r in 0..VW {
                for c in 0..H + PAD {
                    let (got, old) = (
                        out.grad_weight[r * (H + PAD) + c],
                        before[r * (H + PAD) + c],
                    );
                    if c < H && !accumulate {
                        assert_eq!(got.to_bits(), 0f32.to_bits(), "{what}: [{r}, {c}]");
                    } else {
                        assert_eq!(got.to_bits(), old.to_bits(), "{what}: [{r}, {c}] written");
                    }
                }
            }
        }
    }
}

#[test]
fn scaling_no_rows_is_a_no_op() {
    for dev in devices("scaling_no_rows_is_a_no_op") {
        let ctx = dev.context();
        let mut out = Outputs::poisoned();
        run(&dev, &mut out, |loc, _, _, launch| {
            ctx.scale_rows(
                ScaleRows {
                    x: empty_mut(DType::BF16, V, loc),
                    // SAFETY: no rows: no factor is read.
                    factors: unsafe { Vector::from_raw(std::ptr::null(), 0, loc) },
                    factor_stride: 1,
                },
                launch,
            )
        })
        .unwrap_or_else(|e| panic!("{}: {e}", dev.name()));
        let err = run(&dev, &mut out, |loc, _, _, launch| {
            ctx.scale_rows(
                ScaleRows {
                    x: empty_mut(DType::BF16, 0, loc),
                    // SAFETY: as above.
                    factors: unsafe { Vector::from_raw(std::ptr::null(), 0, loc) },
                    factor_stride: 1,
                },
                launch,
            )
        })
        .expect_err("V = 0");
        assert_eq!(err.kind(), ErrorKind::Shape, "{err}");
    }
}

/// A device (or host) copy of `data`, its pointer, and a way to read it back.
enum Buf<T: cudarc::driver::DeviceRepr> {
    Host(Vec<T>),
    Cuda(cudarc::driver::CudaSlice<T>),
}

impl<T: cudarc::driver::DeviceRepr + Clone + Default + Unpin> Buf<T> {
    fn new(dev: &Device, data: Vec<T>) -> Self {
        match dev {
            Device::Cpu(_) => Buf::Host(data),
            Device::Cuda(c) => Buf::Cuda(c.stream.clone_htod(&data).expect("htod")),
        }
    }
    fn ptr(&mut self, dev: &Device) -> *mut T {
        match (self, dev) {
            (Buf::Host(v), _) => v.as_mut_ptr(),
            (Buf::Cuda(d), Device::Cuda(c)) => {
                use cudarc::driver::DevicePtrMut;
                let (p, _s) = d.device_ptr_mut(&c.stream);
                p as usize as *mut T
            }
            _ => unreachable!("a device buffer on the CPU"),
        }
    }
    fn read(&self, dev: &Device) -> Vec<T> {
        match (self, dev) {
            (Buf::Host(v), _) => v.clone(),
            (Buf::Cuda(d), Device::Cuda(c)) => {
                c.stream.synchronize().expect("sync");
                c.stream.clone_dtoh(d).expect("dtoh")
            }
            _ => unreachable!("a device buffer on the CPU"),
        }
    }
}

fn launch_of(dev: &Device) -> Launch<'static> {
    match dev {
        Device::Cpu(_) => Launch::default(),
        // SAFETY: the test's own stream, alive for the whole test.
        Device::Cuda(c) => unsafe { Launch::on_stream(c.stream.cu_stream() as *mut c_void) },
    }
}

fn location_of(dev: &Device) -> Location {
    if dev.is_cuda() {
        Location::Cuda(0)
    } else {
        Location::Host
    }
}

#[test]
fn moe_calls_over_no_tokens() {
    use distill_kernels::moe::{Combine, Permute, Route, RouteParams, SlotDot};
    for dev in devices("moe_calls_over_no_tokens") {
        let (ctx, loc, launch) = (dev.context(), location_of(&dev), launch_of(&dev));
        let (e, h) = (6, 8);
        // SAFETY (every from_raw below): null views of no entries are never accessed; the
        // others are the buffers above, at `loc`, of the lengths given.
        let none_i32 = || unsafe { VectorMut::from_raw(std::ptr::null_mut::<i32>(), 0, loc) };

        // Route: zero counts and offsets, a perm of padding. No token means no expert to pad
        // (the bound is 0 rows); a longer perm (6 · 3 entries) is allowed and all -1.
        let params = RouteParams {
            block: 4,
            ..RouteParams::new(2)
        };
        assert_eq!(params.max_rows(0, e), 0);
        let perm_rows = e * 3;
        let mut counts = Buf::new(&dev, vec![7i32; e]);
        let mut offsets = Buf::new(&dev, vec![7i32; e + 1]);
        let mut perm = Buf::new(&dev, vec![7i32; perm_rows]);
        let (cp, op, pp) = (counts.ptr(&dev), offsets.ptr(&dev), perm.ptr(&dev));
        ctx.moe_route(
            Route {
                logits: empty(DType::F32, e, loc),
                bias: None,
                expert_ids: none_i32(),
                // SAFETY: as above.
                weights: unsafe { VectorMut::from_raw(std::ptr::null_mut::<f32>(), 0, loc) },
                counts: unsafe { VectorMut::from_raw(cp, e, loc) },
                offsets: unsafe { VectorMut::from_raw(op, e + 1, loc) },
                perm: unsafe { VectorMut::from_raw(pp, perm_rows, loc) },
                position: none_i32(),
            },
            &params,
            &launch,
        )
        .unwrap_or_else(|e| panic!("{}: route: {e}", dev.name()));
        assert_eq!(counts.read(&dev), vec![0; e], "{}", dev.name());
        assert_eq!(offsets.read(&dev), vec![0; e + 1], "{}", dev.name());
        assert_eq!(perm.read(&dev), vec![-1; perm_rows], "{}", dev.name());

        // Permute: R rows of padding become zero rows; no rows, nothing.
        for rows in [0usize, 3] {
            let mut pad = Buf::new(&dev, vec![-1i32; rows.max(1)]);
            let mut out = Buf::new(&dev, vec![f32::NAN; rows.max(1) * h]);
            let (padp, outp) = (pad.ptr(&dev), out.ptr(&dev));
            ctx.moe_permute(
                Permute {
                    x: empty(DType::F32, h, loc),
                    k: 2,
                    perm: unsafe { Vector::from_raw(padp.cast_const(), rows, loc) },
                    weights: None,
                    out: unsafe { MatrixMut::from_raw(outp.cast(), DType::F32, rows, h, h, loc) },
                },
                &launch,
            )
            .unwrap_or_else(|e| panic!("{}: permute of {rows} rows: {e}", dev.name()));
            let got = out.read(&dev);
            if rows == 0 {
                assert!(got.iter().all(|v| v.is_nan()), "{}: written", dev.name());
            } else {
                assert!(
                    got.iter().all(|&v| v.to_bits() == 0),
                    "{}: {got:?}",
                    dev.name()
                );
            }
        }
        if !dev.is_cuda() {
            // The CPU reads perm: an entry other than padding has no slot to name.
            let mut out = vec![f32::NAN; 2 * h];
            let err = ctx
                .moe_permute(
                    Permute {
                        x: empty(DType::F32, h, loc),
                        k: 2,
                        perm: Vector::host(&[-1, 0]),
                        weights: None,
                        out: MatrixMut::host(&mut out, 2, h, h).unwrap(),
                    },
                    &launch,
                )
                .expect_err("perm entry 0 with no tokens");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
            assert!(out.iter().all(|v| v.is_nan()), "written on error");
        }

        // Combine and slot-dot of no tokens: no output, the expert rows never read.
        let mut rows_in = Buf::new(&dev, vec![1.5f32; 4 * h]);
        let rp = rows_in.ptr(&dev);
        let rows_view =
            || unsafe { Matrix::from_raw(rp.cast_const().cast(), DType::F32, 4, h, h, loc) };
        ctx.moe_combine(
            Combine {
                rows: rows_view(),
                k: 2,
                position: unsafe { Vector::from_raw(std::ptr::null(), 0, loc) },
                weights: None,
                y: empty_mut(DType::F32, h, loc),
            },
            &launch,
        )
        .unwrap_or_else(|e| panic!("{}: combine: {e}", dev.name()));
        ctx.moe_slot_dot(
            SlotDot {
                tokens: empty(DType::F32, h, loc),
                rows: rows_view(),
                k: 2,
                position: unsafe { Vector::from_raw(std::ptr::null(), 0, loc) },
                out: unsafe { VectorMut::from_raw(std::ptr::null_mut(), 0, loc) },
            },
            &launch,
        )
        .unwrap_or_else(|e| panic!("{}: slot-dot: {e}", dev.name()));
        assert_eq!(rows_in.read(&dev), vec![1.5f32; 4 * h]);
    }
}
