//! Bad input to the row scaling: one test per kind of mistake, on the CPU and on CUDA device 0
//! when present. Each asserts the error kind AND that the matrix and the factors are bitwise
//! unchanged. The C ABI's own checks (null pointers, codes, negative sizes, dk_last_error) are
//! at the end.

use std::ffi::{c_void, CStr};

use super::common::scale_rows::*;
use super::common::*;
use crate::context::{dk_context_create, dk_context_destroy, DkContext};
use crate::error::dk_last_error;
use crate::scale_rows::{dk_scale_rows, DkScaleRowsArgs};
use distill_kernels::scale_rows::ScaleRows;
use distill_kernels::{Context, DType, ErrorKind, Launch, Location, MatrixMut, Vector};

/// A valid case with no factor-1 rows (so a wrongly accepted call would change the buffer).
fn base(rng: &mut Rng, dtype: DType) -> ScaleCase {
    ScaleCase::random(rng, dtype, 4, 37, 40, 1, 1, 0.0)
}

/// Runs `case` with `tweaks` on every device and asserts `kind` with nothing written.
#[track_caller]
fn rejects(test: &str, case: &ScaleCase, tweaks: Tweaks, kind: ErrorKind, what: &str) {
    for dev in devices(test) {
        let (res, after, factors) = run(&dev, case, tweaks);
        assert_kind(res, kind, &format!("[{}] {test}: {what}", dev.name()));
        assert!(
            after.as_ref() == case.x.as_ref(),
            "[{}] {test}: {what}: x changed on error",
            dev.name()
        );
        assert!(
            factors
                .iter()
                .zip(&case.factors)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "[{}] {test}: {what}: factors changed on error",
            dev.name()
        );
    }
}

#[test]
fn valid_base_case_runs() {
    // The base case the others break is itself accepted and scales every row.
    let mut rng = Rng::fresh("valid_base_case_runs");
    for dev in devices("valid_base_case_runs") {
        for dtype in DType::ALL {
            let case = base(&mut rng, dtype);
            let (res, after, _) = run(&dev, &case, Tweaks::default());
            res.unwrap();
            let scaled = check_scaled(&case, after.as_ref()).unwrap();
            assert_eq!(scaled, case.n * case.v);
        }
    }
}

#[test]
fn null_pointers() {
    let mut rng = Rng::fresh("null_pointers");
    let case = base(&mut rng, DType::BF16);
    for (what, t) in [
        (
            "null x",
            Tweaks {
                null_x: true,
                ..Tweaks::default()
            },
        ),
        (
            "null factors",
            Tweaks {
                null_factors: true,
                ..Tweaks::default()
            },
        ),
    ] {
        rejects("null_pointers", &case, t, ErrorKind::NullPointer, what);
    }
}

#[test]
fn empty_shapes() {
    let mut rng = Rng::fresh("empty_shapes");
    let case = base(&mut rng, DType::F32);
    // N = 0 is nothing to do (tests/empty_batch.rs); V = 0 is an error.
    let t = Tweaks {
        v: Some(0),
        ..Tweaks::default()
    };
    rejects("empty_shapes", &case, t, ErrorKind::Shape, "V = 0");
}

#[test]
fn stride_smaller_than_v() {
    let mut rng = Rng::fresh("stride_smaller_than_v");
    for dtype in DType::ALL {
        let case = base(&mut rng, dtype);
        for stride in [0, 1, case.v - 1] {
            let t = Tweaks {
                stride: Some(stride),
                ..Tweaks::default()
            };
            let what = format!("{} stride {stride} < V = {}", dtype.name(), case.v);
            rejects("stride_smaller_than_v", &case, t, ErrorKind::Shape, &what);
        }
    }
}

#[test]
fn too_few_factors() {
    let mut rng = Rng::fresh("too_few_factors");
    let case = base(&mut rng, DType::F16);
    // N = 4 rows with factor stride 1 read 4 factors; stride 3 read 10.
    for (len, fs) in [(3, 1), (0, 1), (9, 3), (0, 0)] {
        let t = Tweaks {
            factors_len: Some(len),
            factor_stride: Some(fs),
            ..Tweaks::default()
        };
        let what = format!("{len} factors for N = 4 rows of factor stride {fs}");
        rejects("too_few_factors", &case, t, ErrorKind::Shape, &what);
    }
}

#[test]
fn shapes_beyond_the_address_space() {
    let mut rng = Rng::fresh("shapes_beyond_the_address_space");
    let case = base(&mut rng, DType::F32);
    for (what, t) in [
        (
            "row stride 2^62",
            Tweaks {
                stride: Some(1 << 62),
                ..Tweaks::default()
            },
        ),
        (
            "factor stride 2^62",
            Tweaks {
                factor_stride: Some(1 << 62),
                ..Tweaks::default()
            },
        ),
        (
            "N = 2^62 rows",
            Tweaks {
                n: Some(1 << 62),
                ..Tweaks::default()
            },
        ),
    ] {
        rejects(
            "shapes_beyond_the_address_space",
            &case,
            t,
            ErrorKind::Shape,
            what,
        );
    }
}

#[test]
fn misaligned_pointers() {
    let mut rng = Rng::fresh("misaligned_pointers");
    for dtype in DType::ALL {
        let case = base(&mut rng, dtype);
        let t = Tweaks {
            x_byte_shift: 1,
            ..Tweaks::default()
        };
        let what = format!("{} x one byte off its element alignment", dtype.name());
        rejects(
            "misaligned_pointers",
            &case,
            t,
            ErrorKind::InvalidArgument,
            &what,
        );
    }
    let case = base(&mut rng, DType::F32);
    for shift in [1, 2] {
        let t = Tweaks {
            factors_byte_shift: shift,
            factors_len: Some(case.n),
            ..Tweaks::default()
        };
        let what = format!("factors {shift} bytes off their 4-byte alignment");
        rejects(
            "misaligned_pointers",
            &case,
            t,
            ErrorKind::InvalidArgument,
            &what,
        );
    }
}

#[test]
fn factors_overlapping_x() {
    let mut rng = Rng::fresh("factors_overlapping_x");
    let case = base(&mut rng, DType::F32);
    // Inside the first row, and straddling the matrix's last element.
    let last = (case.offset + (case.n - 1) * case.stride + case.v - 1) * 4;
    for at in [case.offset * 4 + 8, last - 8] {
        let t = Tweaks {
            factors_in_x: Some(at),
            factors_len: Some(case.n),
            ..Tweaks::default()
        };
        let what = format!("factors at byte {at} of the x buffer");
        rejects("factors_overlapping_x", &case, t, ErrorKind::Shape, &what);
    }
}

#[test]
fn device_memory_on_cpu_context() {
    // Views labelled as CUDA memory on the CPU context: refused before any access.
    let mut rng = Rng::fresh("device_memory_on_cpu_context");
    let case = base(&mut rng, DType::BF16);
    let cpu = Device::Cpu(Context::cpu());
    for loc in [Location::Cuda(0), Location::Cuda(2)] {
        let t = Tweaks {
            location: Some(loc),
            ..Tweaks::default()
        };
        let (res, after, _) = run(&cpu, &case, t);
        assert_kind(res, ErrorKind::WrongDevice, &format!("{loc:?} on the CPU"));
        assert!(after.as_ref() == case.x.as_ref());
    }
}

#[test]
fn cuda_host_memory() {
    let Some(cuda) = cuda("cuda_host_memory") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_host_memory");
    let case = base(&mut rng, DType::F32);
    // Host memory passed to a CUDA context, labelled Host and labelled as device memory.
    for loc in [Location::Host, Location::Cuda(0), Location::Cuda(1)] {
        let mut x = case.x.clone();
        let factors = case.factors.clone();
        // SAFETY: host buffers; the call must fail (location or pointer check) before access.
        let res = unsafe {
            cuda.ctx.scale_rows(
                ScaleRows {
                    x: MatrixMut::from_raw(x.ptr(), case.dtype, case.n, case.v, case.stride, loc),
                    factors: Vector::from_raw(factors.as_ptr(), factors.len(), loc),
                    factor_stride: 1,
                },
                &Launch::default(),
            )
        };
        assert_kind(
            res,
            ErrorKind::WrongDevice,
            &format!("host memory as {loc:?}"),
        );
        cuda.cu.synchronize().unwrap();
        assert!(x == case.x, "host buffer changed");
    }
}

// ---- C ABI ---------------------------------------------------------------------------------

fn last_error() -> String {
    // SAFETY: dk_last_error returns a valid NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(dk_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A CPU context and a valid bf16 call (3 rows of 20, stride 24, per-row factors).
struct CCall {
    ctx: *mut DkContext,
    x: Vec<u16>,
    factors: Vec<f32>,
}

impl CCall {
    fn new(rng: &mut Rng) -> Self {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { dk_context_create(-1, &mut ctx) }, 0);
        let x = (0..3 * 24)
            .map(|_| half::bf16::from_f64(rng.range(0.5, 2.0)).to_bits())
            .collect();
        CCall {
            ctx,
            x,
            factors: vec![2.0, -0.5, 3.0],
        }
    }

    fn args(&mut self) -> DkScaleRowsArgs {
        DkScaleRowsArgs {
            n: 3,
            v: 20,
            x: self.x.as_mut_ptr().cast(),
            dtype: 1,
            stride: 24,
            factors: self.factors.as_ptr(),
            factor_stride: 1,
        }
    }

    /// Runs `dk_scale_rows` on `ctx` (default: this call's) with the arguments edited by `edit`
    /// (`None`: a null args pointer); returns the status.
    fn run(
        &mut self,
        ctx: Option<*mut DkContext>,
        edit: Option<&dyn Fn(&mut DkScaleRowsArgs)>,
    ) -> i32 {
        let mut a = self.args();
        let ctx = ctx.unwrap_or(self.ctx);
        let args: *const DkScaleRowsArgs = match edit {
            Some(e) => {
                e(&mut a);
                &a
            }
            None => std::ptr::null(),
        };
        // SAFETY: every pointer in `a` points into this struct's live buffers (or is null).
        unsafe { dk_scale_rows(ctx, args, std::ptr::null_mut::<c_void>()) }
    }
}

impl Drop for CCall {
    fn drop(&mut self) {
        // SAFETY: created by dk_context_create, destroyed once.
        unsafe { dk_context_destroy(self.ctx) };
    }
}

#[test]
fn c_abi_valid_call_then_errors() {
    let mut rng = Rng::fresh("c_abi_valid_call_then_errors");
    let mut c = CCall::new(&mut rng);
    let before = c.x.clone();
    // A valid call works, scales exactly the matrix and clears the last error.
    assert_eq!(c.run(None, Some(&|_| {})), 0, "{}", last_error());
    assert_eq!(last_error(), "");
    for (k, (&a, &b)) in c.x.iter().zip(&before).enumerate() {
        let (i, j) = (k / 24, k % 24);
        if j < 20 {
            let want = half::bf16::from_f32(half::bf16::from_bits(b).to_f32() * c.factors[i]);
            assert_eq!(a, want.to_bits(), "x[{i}, {j}]");
        } else {
            assert_eq!(a, b, "padding x[{i}, {j}] changed");
        }
    }
    let null_ctx: *mut DkContext = std::ptr::null_mut();
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        i32,
        &str,
        Option<*mut DkContext>,
        Option<&dyn Fn(&mut DkScaleRowsArgs)>,
    )> = vec![
        (1, "null context", Some(null_ctx), Some(&|_| {})),
        (1, "null args", None, None),
        (1, "null x", None, Some(&|a| a.x = std::ptr::null_mut())),
        (
            1,
            "null factors",
            None,
            Some(&|a| a.factors = std::ptr::null()),
        ),
        (4, "dtype 3", None, Some(&|a| a.dtype = 3)),
        (4, "dtype -1", None, Some(&|a| a.dtype = -1)),
        (3, "n = -1", None, Some(&|a| a.n = -1)),
        (3, "v = 0", None, Some(&|a| a.v = 0)),
        (3, "v = -5", None, Some(&|a| a.v = -5)),
        (3, "stride < v", None, Some(&|a| a.stride = 19)),
        (3, "stride -24", None, Some(&|a| a.stride = -24)),
        (3, "factor_stride -1", None, Some(&|a| a.factor_stride = -1)),
        (
            3,
            "factor_stride i64::MAX",
            None,
            Some(&|a| a.factor_stride = i64::MAX),
        ),
        (3, "stride i64::MAX", None, Some(&|a| a.stride = i64::MAX)),
    ];
    for (code, what, ctx, edit) in cases {
        let mut c = CCall::new(&mut rng);
        let before = (c.x.clone(), c.factors.clone());
        let s = c.run(ctx, edit);
        assert_eq!(s, code, "{what}: status {s}, message {:?}", last_error());
        assert!(!last_error().is_empty(), "{what}: dk_last_error is empty");
        assert!(
            c.x == before.0 && c.factors == before.1,
            "{what}: buffers were written"
        );
    }
}
