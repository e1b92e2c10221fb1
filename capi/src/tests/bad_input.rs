//! Bad input: one test per kind of mistake, on the CPU and on CUDA device 0 when present. Each
//! asserts the error kind AND that every buffer (inputs and poisoned outputs) is bitwise
//! unchanged. The C ABI's own checks (codes, null pointers, dk_last_error) are at the end.

use std::ffi::{c_void, CStr};

use super::common::*;
use crate::context::{dk_context_create, dk_context_destroy, dk_context_device, DkContext};
use crate::divergence::{
    dk_divergence, dk_divergence_params_default, dk_divergence_workspace_size, DkDivergenceArgs,
    DkDivergenceParams,
};
use crate::error::dk_last_error;
use distill_kernels::device::cuda_device_count;
use distill_kernels::divergence::{Divergence, Kind, Params, Reduction};
use distill_kernels::{
    Context, DType, ErrorKind, Launch, Location, Matrix, MatrixMut, Vector, VectorMut,
};

fn base(rng: &mut Rng) -> Case {
    Case::random(rng, 4, 37, DType::F32, DType::BF16, Params::new(Kind::Jsd))
        .with_labels(vec![1, -100, 2, 3])
}

/// Runs `case` on every device and asserts `kind` with nothing written.
#[track_caller]
fn rejects(test: &str, case: &Case, kind: ErrorKind) {
    for dev in devices(test) {
        let (res, before, after) = dev.run(case);
        assert_kind(
            res,
            kind,
            &format!("[{}] {test}: {}", dev.name(), case.what),
        );
        assert!(
            before == after,
            "[{}] {test}: a buffer changed on error",
            dev.name()
        );
    }
}

#[test]
fn valid_base_case_runs() {
    // The base case the others break is itself accepted (so the errors below are about the
    // one thing each test changes).
    let mut rng = Rng::fresh("valid_base_case_runs");
    for dev in devices("valid_base_case_runs") {
        run_checked(&dev, &base(&mut rng));
    }
}

#[test]
fn null_pointers() {
    let mut rng = Rng::fresh("null_pointers");
    for which in ["student", "teacher", "grad", "labels", "per_token", "loss"] {
        let mut c = base(&mut rng);
        match which {
            "student" => c.nulls.student = true,
            "teacher" => c.nulls.teacher = true,
            "grad" => c.nulls.grad = true,
            "labels" => c.nulls.labels = true,
            "per_token" => c.nulls.per_token = true,
            _ => c.nulls.loss = true,
        }
        c.what = format!("null {which}");
        rejects("null_pointers", &c, ErrorKind::NullPointer);
    }
    // In place with a null student.
    let mut c = base(&mut rng).grad_out(GradOut::InPlace);
    c.nulls.student = true;
    c.what = "in place, null student".into();
    rejects("null_pointers", &c, ErrorKind::NullPointer);
}

#[test]
fn empty_shapes() {
    let mut rng = Rng::fresh("empty_shapes");
    // N = 0 with V >= 1 is an empty batch (tests/empty_batch.rs); V = 0 is not.
    for (n, v) in [(4, 0), (0, 0)] {
        let mut c = base(&mut rng);
        c.student = Logits::new(DType::F32, n, v, &vec![0.5; n * v]);
        c.teacher = Logits::new(DType::BF16, n, v, &vec![0.25; n * v]);
        c.grad = GradOut::Separate(c.grad_spec());
        c.labels = Some(vec![1; n]);
        c.per_token = Some(n);
        c.what = format!("N={n} V={v}");
        rejects("empty_shapes", &c, ErrorKind::Shape);
    }
}

#[test]
fn mismatched_student_teacher_shapes() {
    let mut rng = Rng::fresh("mismatched_student_teacher_shapes");
    for (n, v) in [(5, 37), (4, 36), (3, 38)] {
        let mut c = base(&mut rng);
        c.teacher = Logits::new(DType::BF16, n, v, &rng.logits(n, v, 1.0));
        c.what = format!("teacher {n} x {v}, student 4 x 37");
        rejects("mismatched_student_teacher_shapes", &c, ErrorKind::Shape);
    }
}

#[test]
fn stride_smaller_than_v() {
    let mut rng = Rng::fresh("stride_smaller_than_v");
    for (s, t, g) in [(36, 37, 37), (37, 30, 37), (37, 37, 36), (0, 37, 37)] {
        let mut c = base(&mut rng).strides(s, t, g);
        c.what = format!("strides ({s}, {t}, {g}) for V = 37");
        rejects("stride_smaller_than_v", &c, ErrorKind::Shape);
    }
    // In place: the student stride is also the gradient's.
    let mut c = base(&mut rng).grad_out(GradOut::InPlace);
    c.student.stride = 20;
    c.what = "in place, stride 20 < V".into();
    rejects("stride_smaller_than_v", &c, ErrorKind::Shape);
    // The safe host constructors check it too.
    let data = vec![1.0f32; 100];
    let e = Matrix::host(&data, 2, 10, 9).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Shape);
    let e = Matrix::host(&data, 11, 10, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Shape, "slice too short: {e}");
    let mut data = vec![1.0f32; 100];
    let e = MatrixMut::host(&mut data, 2, 60, 60).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Shape);
}

/// A row stride so large that (rows − 1) · stride + cols wraps must not make a view look small:
/// the span once wrapped to 8 elements and the CPU backend wrote outside the slice.
#[test]
fn strides_that_wrap_the_span_are_rejected() {
    let mut data = vec![7.0f32; 64];
    for (rows, cols, stride) in [
        (2, 8, usize::MAX - 7),
        (5, 8, 1usize << 62),
        (3, 1, usize::MAX / 2 + 1),
        (2, 8, (isize::MAX as usize) / 4 + 1),
    ] {
        let e = Matrix::host(&data[..16], rows, cols, stride).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::Shape,
            "{rows} x {cols}, stride {stride}: {e}"
        );
        let e = MatrixMut::host(&mut data[32..], rows, cols, stride).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::Shape,
            "{rows} x {cols}, stride {stride}: {e}"
        );
    }
    assert!(data.iter().all(|&x| x == 7.0));
    // One row: the stride is never multiplied, any value ≥ cols is fine.
    assert!(Matrix::host(&data[..8], 1, 8, usize::MAX).is_ok());
}

#[test]
fn grad_dtype_differs_from_student() {
    let mut rng = Rng::fresh("grad_dtype_differs_from_student");
    for dtype in [DType::BF16, DType::F16] {
        let mut c = base(&mut rng);
        c.grad = GradOut::Separate(GradSpec {
            dtype,
            ..c.grad_spec()
        });
        c.what = format!("grad {} for an f32 student", dtype.name());
        rejects(
            "grad_dtype_differs_from_student",
            &c,
            ErrorKind::UnsupportedDtype,
        );
    }
}

#[test]
fn grad_shape_mismatch() {
    let mut rng = Rng::fresh("grad_shape_mismatch");
    for (rows, cols) in [(3, 37), (5, 37), (4, 36), (4, 38)] {
        let mut c = base(&mut rng);
        c.grad = GradOut::Separate(GradSpec {
            rows,
            cols,
            stride: 40,
            ..c.grad_spec()
        });
        c.what = format!("grad {rows} x {cols}");
        rejects("grad_shape_mismatch", &c, ErrorKind::Shape);
    }
}

#[test]
fn grad_partly_overlapping_student() {
    let mut rng = Rng::fresh("grad_partly_overlapping_student");
    // One element after the student pointer, same stride.
    let mut c = base(&mut rng).strides(41, 37, 41);
    c.grad = GradOut::IntoStudent {
        shift: 1,
        stride: 41,
    };
    c.what = "grad = student + 1 element".into();
    rejects("grad_partly_overlapping_student", &c, ErrorKind::Shape);
    // Same pointer, different stride (only the exact same layout counts as in place).
    c.grad = GradOut::IntoStudent {
        shift: 0,
        stride: 37,
    };
    c.what = "grad = student with another stride".into();
    rejects("grad_partly_overlapping_student", &c, ErrorKind::Shape);
    // Starting in the middle of the student rows.
    c.grad = GradOut::IntoStudent {
        shift: 41,
        stride: 37,
    };
    c.what = "grad = student row 1".into();
    rejects("grad_partly_overlapping_student", &c, ErrorKind::Shape);
}

#[test]
fn outputs_overlapping_inputs() {
    // Outputs aliasing the teacher or labels (host, CPU context): raw views into one buffer.
    let ctx = Context::cpu();
    let (n, v) = (3usize, 16usize);
    let mut rng = Rng::fresh("outputs_overlapping_inputs");
    let student: Vec<f32> = rng.logits(n, v, 1.0).iter().map(|&x| x as f32).collect();
    let mut teacher: Vec<f32> = rng.logits(n, v, 1.0).iter().map(|&x| x as f32).collect();
    let mut grad = vec![f32::from_bits(POISON_F32); n * v];
    let labels = vec![1i64, 2, 3];
    let t0 = teacher.clone();
    let tp = teacher.as_mut_ptr();
    let params = Params::new(Kind::ForwardKl);
    // per-token loss written over the teacher.
    // SAFETY: every view points into live host buffers large enough for its shape.
    let res = unsafe {
        ctx.divergence(
            Divergence {
                num_items: None,
                student: Matrix::host(&student, n, v, v).unwrap(),
                teacher: Matrix::from_raw(tp.cast(), DType::F32, n, v, v, Location::Host),
                labels: None,
                per_token: Some(VectorMut::from_raw(tp.add(5), n, Location::Host)),
                loss: None,
                grad: None,
            },
            &params,
            &Launch::default(),
        )
    };
    assert_kind(res, ErrorKind::Shape, "per-token over the teacher");
    // gradient over the teacher.
    // SAFETY: as above.
    let res = unsafe {
        ctx.divergence(
            Divergence {
                num_items: None,
                student: Matrix::host(&student, n, v, v).unwrap(),
                teacher: Matrix::from_raw(tp.cast(), DType::F32, n, v, v, Location::Host),
                labels: None,
                per_token: None,
                loss: None,
                grad: Some(MatrixMut::from_raw(
                    tp.cast(),
                    DType::F32,
                    n,
                    v,
                    v,
                    Location::Host,
                )),
            },
            &params,
            &Launch::default(),
        )
    };
    assert_kind(res, ErrorKind::Shape, "gradient over the teacher");
    assert_eq!(teacher, t0, "teacher modified");
    // loss over the per-token output, and loss over the labels.
    let mut pt = vec![f32::from_bits(POISON_F32); n];
    let pp = pt.as_mut_ptr();
    // SAFETY: as above.
    let res = unsafe {
        ctx.divergence(
            Divergence {
                num_items: None,
                student: Matrix::host(&student, n, v, v).unwrap(),
                teacher: Matrix::host(&t0, n, v, v).unwrap(),
                labels: None,
                per_token: Some(VectorMut::from_raw(pp, n, Location::Host)),
                loss: Some(VectorMut::from_raw(pp.add(1), 1, Location::Host)),
                grad: Some(MatrixMut::host(&mut grad, n, v, v).unwrap()),
            },
            &params,
            &Launch::default(),
        )
    };
    assert_kind(res, ErrorKind::Shape, "loss over the per-token output");
    let mut labels_copy = labels.clone();
    let lp = labels_copy.as_mut_ptr();
    // SAFETY: as above.
    let res = unsafe {
        ctx.divergence(
            Divergence {
                num_items: None,
                student: Matrix::host(&student, n, v, v).unwrap(),
                teacher: Matrix::host(&t0, n, v, v).unwrap(),
                labels: Some(Vector::from_raw(lp, n, Location::Host)),
                per_token: None,
                loss: Some(VectorMut::from_raw(lp.cast::<f32>(), 1, Location::Host)),
                grad: None,
            },
            &params,
            &Launch::default(),
        )
    };
    assert_kind(res, ErrorKind::Shape, "loss over the labels");
    assert_eq!(labels_copy, labels);
    assert!(pt.iter().all(|x| x.to_bits() == POISON_F32));
    assert!(grad.iter().all(|x| x.to_bits() == POISON_F32));
}

#[test]
fn per_token_wrong_length() {
    let mut rng = Rng::fresh("per_token_wrong_length");
    for len in [0, 3, 5, 40] {
        let mut c = base(&mut rng);
        c.per_token = Some(len);
        c.what = format!("per_token of {len} for N = 4");
        rejects("per_token_wrong_length", &c, ErrorKind::Shape);
    }
}

#[test]
fn loss_wrong_length() {
    let mut rng = Rng::fresh("loss_wrong_length");
    for len in [0, 2] {
        let mut c = base(&mut rng);
        c.loss = Some(len);
        c.what = format!("loss of {len} elements");
        rejects("loss_wrong_length", &c, ErrorKind::Shape);
    }
}

#[test]
fn labels_wrong_length() {
    let mut rng = Rng::fresh("labels_wrong_length");
    for len in [0, 3, 5] {
        let c = base(&mut rng).with_labels(vec![7; len]);
        rejects("labels_wrong_length", &c, ErrorKind::Shape);
    }
}

#[test]
fn beta_out_of_range() {
    let mut rng = Rng::fresh("beta_out_of_range");
    for beta in [
        -0.1f32,
        -1e-9,
        1.0 + 1e-6,
        2.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ] {
        let mut c = base(&mut rng);
        c.params.beta = beta;
        c.what = format!("beta = {beta}");
        rejects("beta_out_of_range", &c, ErrorKind::InvalidArgument);
        assert_eq!(
            c.params.validate().unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}

#[test]
fn temperature_out_of_range() {
    let mut rng = Rng::fresh("temperature_out_of_range");
    for t in [
        0.0f32,
        -0.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        // Subnormal: log2(e) / T is infinite in f32 (the CUDA kernels' scale), even where 1 / T
        // is not (3e-39).
        3e-39,
        1e-39,
        f32::from_bits(1),
    ] {
        for kind in [Kind::ForwardKl, Kind::ReverseKl, Kind::Jsd] {
            let mut c = base(&mut rng);
            c.params.kind = kind;
            c.params.temperature = t;
            c.what = format!("{} temperature = {t}", kind.name());
            rejects("temperature_out_of_range", &c, ErrorKind::InvalidArgument);
        }
    }
}

#[test]
fn num_items_invalid() {
    let mut rng = Rng::fresh("num_items_invalid");
    for x in [0.0f32, -0.0, -3.0, f32::NAN, f32::INFINITY] {
        let mut c = base(&mut rng);
        c.params.num_items = Some(x);
        c.what = format!("num_items = {x}");
        rejects("num_items_invalid", &c, ErrorKind::InvalidArgument);
    }
    for reduction in [Reduction::Sum, Reduction::None] {
        let mut c = base(&mut rng);
        c.params.reduction = reduction;
        c.params.num_items = Some(4.0);
        c.what = format!("num_items with reduction {}", reduction.name());
        rejects("num_items_invalid", &c, ErrorKind::InvalidArgument);
    }
}

#[test]
fn device_memory_on_cpu_context() {
    // Views labelled as CUDA memory on the CPU context: refused before any access.
    let mut rng = Rng::fresh("device_memory_on_cpu_context");
    let ctx = Context::cpu();
    let c = base(&mut rng);
    for loc in [Location::Cuda(0), Location::Cuda(3)] {
        let mut before = Bufs::new(&c);
        let after_ptrs = BasePtrs::host(&mut before);
        let snapshot = before.clone();
        // SAFETY: host buffers; the call must fail on the location before touching them.
        let res = unsafe { call(&ctx, &c, after_ptrs, loc, &Launch::default()) };
        assert_kind(res, ErrorKind::WrongDevice, &format!("{loc:?} on the CPU"));
        assert!(before == snapshot);
    }
}

#[test]
fn cuda_context_without_gpu_is_no_device() {
    match cuda_unavailable() {
        Some(why) => {
            for r in [Context::cuda(0).map(|_| ()), Context::new(0).map(|_| ())] {
                assert_kind(r, ErrorKind::NoDevice, &format!("CUDA context with {why}"));
            }
            assert!(Context::best().unwrap().cuda_device().is_none());
            visible(&format!(
                "note: CUDA absent ({why}): checked that Context::cuda(0) is NoDevice"
            ));
        }
        None => {
            assert!(Context::cuda(0).is_ok());
        }
    }
    // An ordinal past the last device, and a negative device code.
    let past = cuda_device_count();
    assert_kind(
        Context::cuda(past).map(|_| ()),
        ErrorKind::NoDevice,
        "ordinal past the last device",
    );
    assert_kind(
        Context::new(-2).map(|_| ()),
        ErrorKind::InvalidArgument,
        "device -2",
    );
}

#[test]
fn cuda_host_memory_and_workspace() {
    let Some(cuda) = cuda("cuda_host_memory_and_workspace") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_host_memory_and_workspace");
    let c = base(&mut rng);
    // Host memory passed to a CUDA context: labelled Host, and labelled as device memory.
    for loc in [Location::Host, Location::Cuda(0), Location::Cuda(1)] {
        let mut bufs = Bufs::new(&c);
        let snapshot = bufs.clone();
        let ptrs = BasePtrs::host(&mut bufs);
        // SAFETY: host buffers; the call must fail (location or pointer check) before access.
        let res = unsafe { call(&cuda.ctx, &c, ptrs, loc, &Launch::default()) };
        assert_kind(
            res,
            ErrorKind::WrongDevice,
            &format!("host memory as {loc:?}"),
        );
        cuda.cu.synchronize().unwrap();
        assert!(bufs == snapshot, "host buffers changed");
    }
    let dev = Device::Cuda(cuda);
    let need = dev.context().divergence_workspace_size(c.n());
    assert!(need > 0);
    for bytes in [1, need - 1] {
        let (res, before, after) = dev.run_ws(&c, Workspace::Bytes(bytes));
        assert_kind(
            res,
            ErrorKind::WorkspaceTooSmall,
            &format!("workspace {bytes} < {need}"),
        );
        assert!(before == after, "buffers changed");
    }
    // Large enough but one byte off: the kernels store f32 values at its start (a misaligned
    // store would end the CUDA context for the whole process).
    let (res, before, after) = dev.run_ws(&c, Workspace::Misaligned);
    assert_kind(
        res,
        ErrorKind::InvalidArgument,
        "workspace one byte off 4-byte alignment",
    );
    assert!(before == after, "buffers changed");
    // A workspace in host memory.
    let Device::Cuda(cuda) = &dev else {
        unreachable!()
    };
    let mut host_ws = vec![0u8; need];
    let ws = VectorMut::host(&mut host_ws);
    let mut bufs = Bufs::new(&c);
    let snapshot = bufs.clone();
    // Device copies of the buffers so only the workspace is wrong.
    let d: Vec<_> = [
        &bufs.student,
        &bufs.teacher,
        bufs.grad.as_ref().unwrap(),
        bufs.labels.as_ref().unwrap(),
        &bufs.per_token,
        &bufs.loss,
    ]
    .into_iter()
    .map(|b| cuda.stream.clone_htod(b.as_ref()).unwrap())
    .collect();
    let ptr = |i: usize| {
        use cudarc::driver::DevicePtr;
        let (p, _g) = d[i].device_ptr(&cuda.stream);
        p as usize as *mut u8
    };
    let base_ptrs = BasePtrs {
        student: ptr(0),
        teacher: ptr(1),
        grad: ptr(2),
        labels: ptr(3),
        per_token: ptr(4),
        loss: ptr(5),
        num_items: std::ptr::null_mut(),
    };
    // SAFETY: live stream of device 0.
    let launch =
        unsafe { Launch::on_stream(cuda.stream.cu_stream() as *mut c_void) }.with_workspace(ws);
    // SAFETY: device buffers laid out for the case.
    let res = unsafe { call(&cuda.ctx, &c, base_ptrs, Location::Cuda(0), &launch) };
    assert_kind(res, ErrorKind::WrongDevice, "host workspace");
    cuda.stream.synchronize().unwrap();
    // num_items in host memory (the rest on the device).
    let mut host_items = 4.0f32;
    let mut with_items = c.clone();
    with_items.num_items_mem = Some(4.0);
    let items_ptrs = BasePtrs {
        num_items: (&mut host_items as *mut f32).cast(),
        ..base_ptrs
    };
    // SAFETY: live stream of device 0.
    let launch = unsafe { Launch::on_stream(cuda.stream.cu_stream() as *mut c_void) };
    // SAFETY: device buffers laid out for the case, num_items deliberately on the host.
    let res = unsafe {
        call(
            &cuda.ctx,
            &with_items,
            items_ptrs,
            Location::Cuda(0),
            &launch,
        )
    };
    assert_kind(res, ErrorKind::WrongDevice, "num_items in host memory");
    cuda.stream.synchronize().unwrap();
    let back: Vec<Vec<u8>> = d
        .iter()
        .map(|x| cuda.stream.clone_dtoh(x).unwrap())
        .collect();
    cuda.stream.synchronize().unwrap();
    bufs.student.as_mut().copy_from_slice(&back[0]);
    bufs.per_token.as_mut().copy_from_slice(&back[4]);
    bufs.loss.as_mut().copy_from_slice(&back[5]);
    bufs.grad
        .as_mut()
        .unwrap()
        .as_mut()
        .copy_from_slice(&back[2]);
    assert!(bufs == snapshot, "device buffers changed");
}

// ---- C ABI ---------------------------------------------------------------------------------

fn last_error() -> String {
    // SAFETY: dk_last_error returns a valid NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(dk_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A CPU context and a valid f32 call with every output, and the buffers.
struct CCall {
    ctx: *mut DkContext,
    student: Vec<f32>,
    teacher: Vec<f32>,
    labels: Vec<i64>,
    grad: Vec<f32>,
    per_token: Vec<f32>,
    loss: f32,
    params: DkDivergenceParams,
}

impl CCall {
    fn new(rng: &mut Rng) -> Self {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { dk_context_create(-1, &mut ctx) }, 0);
        let (n, v) = (3, 20);
        CCall {
            ctx,
            student: rng.logits(n, v, 1.5).iter().map(|&x| x as f32).collect(),
            teacher: rng.logits(n, v, 1.5).iter().map(|&x| x as f32).collect(),
            labels: vec![4, -100, 9],
            grad: vec![poison_f32(); n * v],
            per_token: vec![poison_f32(); n],
            loss: poison_f32(),
            params: DkDivergenceParams {
                kind: 2,
                ..dk_divergence_params_default()
            },
        }
    }

    fn args(&mut self) -> DkDivergenceArgs {
        DkDivergenceArgs {
            n: 3,
            v: 20,
            student: self.student.as_ptr().cast(),
            student_dtype: 0,
            student_stride: 20,
            teacher: self.teacher.as_ptr().cast(),
            teacher_dtype: 0,
            teacher_stride: 20,
            labels: self.labels.as_ptr(),
            loss: &mut self.loss,
            per_token: self.per_token.as_mut_ptr(),
            grad: self.grad.as_mut_ptr().cast(),
            grad_stride: 20,
            num_items: std::ptr::null(),
        }
    }

    fn untouched(&self) -> bool {
        self.grad.iter().all(|x| x.to_bits() == POISON_F32)
            && self.per_token.iter().all(|x| x.to_bits() == POISON_F32)
            && self.loss.to_bits() == POISON_F32
    }

    /// Runs `dk_divergence` with `args` edited by `edit`; returns the status.
    fn run(&mut self, edit: impl FnOnce(&mut DkDivergenceArgs, &mut DkDivergenceParams)) -> i32 {
        let mut a = self.args();
        let mut p = self.params;
        edit(&mut a, &mut p);
        // SAFETY: every pointer in `a` points into this struct's live buffers (or is null).
        unsafe {
            dk_divergence(
                self.ctx,
                &a,
                &p,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
            )
        }
    }
}

impl Drop for CCall {
    fn drop(&mut self) {
        // SAFETY: created by dk_context_create, destroyed once.
        unsafe { dk_context_destroy(self.ctx) };
    }
}

#[track_caller]
fn c_rejects(
    c: &mut CCall,
    code: i32,
    what: &str,
    edit: impl FnOnce(&mut DkDivergenceArgs, &mut DkDivergenceParams),
) {
    let s = c.run(edit);
    assert_eq!(s, code, "{what}: status {s}, message {:?}", last_error());
    assert!(!last_error().is_empty(), "{what}: dk_last_error is empty");
    assert!(c.untouched(), "{what}: outputs were written");
}

#[test]
fn c_abi_num_items_in_memory_equals_the_parameter() {
    // The same divisor through args->num_items gives bitwise the params->num_items outputs;
    // a value there that is not finite and at least 2^-126 (a subnormal too) gives the sum.
    let mut rng = Rng::fresh("c_abi_num_items_in_memory_equals_the_parameter");
    let outputs = |c: &CCall| {
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        (c.loss.to_bits(), bits(&c.per_token), bits(&c.grad))
    };
    let c0 = CCall::new(&mut rng);
    let (student, teacher) = (c0.student.clone(), c0.teacher.clone());
    let run = |edit: &dyn Fn(&mut DkDivergenceArgs, &mut DkDivergenceParams)| {
        let mut c = CCall::new(&mut Rng::new(0));
        (c.student, c.teacher) = (student.clone(), teacher.clone());
        let s = c.run(edit);
        assert_eq!(s, 0, "{}", last_error());
        outputs(&c)
    };
    let items = 6.5f32;
    let by_value = run(&|_, p| p.num_items = items);
    let in_memory = run(&|a, _| a.num_items = &items);
    assert!(
        by_value == in_memory,
        "num_items in memory differs from the parameter"
    );
    let sum = run(&|_, p| p.reduction = 1);
    let subnormal = f32::MIN_POSITIVE / 4.0;
    for bad in [
        0.0f32,
        -2.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        subnormal,
    ] {
        let got = run(&|a, _| a.num_items = &bad);
        assert!(got == sum, "num_items {bad} in memory is not the sum");
    }
}

#[test]
fn c_abi_valid_call_then_errors() {
    let mut rng = Rng::fresh("c_abi_valid_call_then_errors");
    let mut c = CCall::new(&mut rng);
    // A valid call works and clears the last error.
    let s0 = c.run(|_, _| {});
    assert_eq!(s0, 0, "{}", last_error());
    assert_eq!(last_error(), "");
    assert!(c.loss.is_finite() && c.per_token[1] == 0.0);
    let mut c = CCall::new(&mut rng);
    c_rejects(&mut c, 1, "null student", |a, _| {
        a.student = std::ptr::null()
    });
    c_rejects(&mut c, 1, "null teacher", |a, _| {
        a.teacher = std::ptr::null()
    });
    c_rejects(&mut c, 4, "student dtype 3", |a, _| a.student_dtype = 3);
    c_rejects(&mut c, 4, "teacher dtype -1", |a, _| a.teacher_dtype = -1);
    c_rejects(&mut c, 2, "kind 3", |_, p| p.kind = 3);
    c_rejects(&mut c, 2, "kind -1", |_, p| p.kind = -1);
    c_rejects(&mut c, 2, "reduction 3", |_, p| p.reduction = 3);
    c_rejects(&mut c, 2, "beta 1.5", |_, p| p.beta = 1.5);
    c_rejects(&mut c, 2, "temperature 0", |_, p| p.temperature = 0.0);
    c_rejects(&mut c, 2, "temperature NaN", |_, p| {
        p.temperature = f32::NAN
    });
    c_rejects(&mut c, 2, "num_items -1", |_, p| p.num_items = -1.0);
    c_rejects(&mut c, 2, "num_items subnormal", |_, p| {
        p.num_items = f32::MIN_POSITIVE / 2.0
    });
    c_rejects(&mut c, 2, "num_items with sum", |_, p| {
        p.num_items = 3.0;
        p.reduction = 1;
    });
    let items = [3.0f32, 3.0];
    let at = items.as_ptr();
    c_rejects(&mut c, 2, "num_items in memory and in params", |a, p| {
        a.num_items = at;
        p.num_items = 3.0;
    });
    c_rejects(&mut c, 2, "num_items in memory with sum", |a, p| {
        a.num_items = at;
        p.reduction = 1;
    });
    c_rejects(&mut c, 2, "num_items in memory misaligned", |a, _| {
        a.num_items = at.cast::<u8>().wrapping_add(1).cast();
    });
    c_rejects(&mut c, 3, "v = 0", |a, _| a.v = 0);
    c_rejects(&mut c, 3, "n = -1", |a, _| a.n = -1);
    c_rejects(&mut c, 3, "v = -5", |a, _| a.v = -5);
    // V past 2^31 - 2^16 (the kernels' 32-bit in-row indices would wrap near 2^31). Such rows
    // also overlap the small test buffers (a shape error too): the message tells which check
    // refused it, and at 2^31 - 2^16 itself the cap lets it through.
    for (v, capped) in [
        ((1i64 << 31) - (1 << 16) + 1, true),
        ((1 << 31) - (1 << 16), false),
    ] {
        c_rejects(&mut c, 3, "v near 2^31", |a, _| {
            a.v = v;
            a.student_stride = v;
            a.teacher_stride = v;
            a.grad_stride = v;
        });
        let e = last_error();
        assert_eq!(e.contains("MAX_VOCAB"), capped, "v = {v}: {e}");
    }
    c_rejects(&mut c, 3, "student_stride 19 < v", |a, _| {
        a.student_stride = 19
    });
    c_rejects(&mut c, 3, "teacher_stride -20", |a, _| {
        a.teacher_stride = -20
    });
    c_rejects(&mut c, 3, "grad_stride 0", |a, _| a.grad_stride = 0);
    c_rejects(&mut c, 3, "student_stride i64::MAX", |a, _| {
        a.student_stride = i64::MAX
    });
    c_rejects(&mut c, 3, "teacher_stride 2^61", |a, _| {
        a.teacher_stride = 1 << 61
    });
    c_rejects(&mut c, 3, "grad_stride i64::MAX / 2", |a, _| {
        a.grad_stride = i64::MAX / 2
    });
    c_rejects(&mut c, 3, "grad = student + 1", |a, _| {
        a.grad = a.student.cast::<f32>().wrapping_add(1) as *mut c_void;
    });
    // Null ctx / args / params.
    let a = c.args();
    let p = c.params;
    // SAFETY: null handles are rejected before any access.
    let s = unsafe {
        dk_divergence(
            std::ptr::null(),
            &a,
            &p,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(s, 1);
    assert!(last_error().contains("context"), "{}", last_error());
    // SAFETY: as above.
    let s = unsafe {
        dk_divergence(
            c.ctx,
            std::ptr::null(),
            &p,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(s, 1);
    // SAFETY: as above.
    let s = unsafe {
        dk_divergence(
            c.ctx,
            &a,
            std::ptr::null(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(s, 1);
    assert!(!last_error().is_empty());
    assert!(c.untouched());
}

#[test]
fn c_abi_context_and_queries() {
    // SAFETY (block): every pointer passed is null (rejected) or a valid local.
    unsafe {
        assert_eq!(dk_context_create(-1, std::ptr::null_mut()), 1);
        assert!(!last_error().is_empty());
        let mut ctx: *mut DkContext = std::ptr::null_mut();
        assert_eq!(dk_context_create(-7, &mut ctx), 2);
        assert!(ctx.is_null(), "out written on error");
        if cuda_unavailable().is_some() {
            assert_eq!(dk_context_create(0, &mut ctx), 5, "{}", last_error());
            assert!(ctx.is_null(), "out written on error");
            assert!(!last_error().is_empty());
        }
        let count = cuda_device_count() as i32;
        assert_eq!(dk_context_create(count, &mut ctx), 5);
        assert!(ctx.is_null());
        assert_eq!(dk_context_create(-1, &mut ctx), 0);
        assert!(!ctx.is_null());
        let mut dev = 1234;
        assert_eq!(dk_context_device(ctx, &mut dev), 0);
        assert_eq!(dev, -1);
        assert_eq!(dk_context_device(ctx, std::ptr::null_mut()), 1);
        assert_eq!(dk_context_device(std::ptr::null(), &mut dev), 1);
        let mut bytes = 77usize;
        assert_eq!(dk_divergence_workspace_size(ctx, 10, &mut bytes), 0);
        assert_eq!(bytes, 0, "CPU needs no workspace");
        assert_eq!(
            dk_divergence_workspace_size(ctx, 10, std::ptr::null_mut()),
            1
        );
        let mut bytes = 77usize;
        assert_eq!(dk_divergence_workspace_size(ctx, -1, &mut bytes), 3);
        assert_eq!(bytes, 77);
        assert_eq!(
            dk_divergence_workspace_size(std::ptr::null(), 1, &mut bytes),
            1
        );
        assert_eq!(dk_context_destroy(ctx), 0);
        assert_eq!(dk_context_destroy(std::ptr::null_mut()), 0);
        let d = dk_divergence_params_default();
        assert_eq!((d.kind, d.reduction, d.ignore_index), (0, 0, -100));
        assert_eq!((d.beta, d.temperature, d.num_items), (0.5, 1.0, 0.0));
    }
}

/// The single-value outputs (a context handle, a device, a workspace size) are refused when
/// misaligned, as the header asks of every pointer, with nothing written: a write through such
/// a pointer would be undefined behaviour in the library, not a slow store.
#[test]
fn c_abi_misaligned_single_value_outputs() {
    let mut storage = [0x5Au8; 32];
    let base = storage.as_mut_ptr();
    // An address one byte past an 8-byte boundary: misaligned for every multi-byte type.
    let odd = base.wrapping_add(8 - (base as usize % 8) + 1);
    // SAFETY (block): each pointer is a valid local, misaligned ones inside `storage` with
    // room for the value; the calls refuse them before writing.
    unsafe {
        let mut ctx: *mut DkContext = std::ptr::null_mut();
        assert_eq!(dk_context_create(-1, &mut ctx), 0);
        assert_eq!(dk_context_create(-1, odd.cast()), 2, "context handle");
        assert!(last_error().contains("not aligned"), "{}", last_error());
        assert_eq!(dk_context_device(ctx, odd.cast()), 2, "device");
        assert!(
            last_error().contains("out is not aligned"),
            "{}",
            last_error()
        );
        assert_eq!(dk_divergence_workspace_size(ctx, 4, odd.cast()), 2);
        assert!(last_error().contains("bytes (output)"), "{}", last_error());
        assert!(storage.iter().all(|&b| b == 0x5A), "an output was written");
        assert_eq!(dk_context_destroy(ctx), 0);
    }
}
