//! Bad input to the fused linear divergence: one test per kind of mistake, each checking the
//! error kind (and a non-empty message) and that no buffer changed — outputs stay poisoned. On a
//! CPU context; the CUDA part (host pointers given to a CUDA context) runs where a device is
//! present, with a visible SKIPPED line otherwise.

mod common;

use common::*;
use distill_kernels::divergence::{Kind, Params, Reduction};
use distill_kernels::fused::{FusedLinear, FusedLinearParams};
use distill_kernels::{
    Context, DType, Error, ErrorKind, Launch, Location, Matrix, MatrixMut, Vector, VectorMut,
};

const SH: usize = 0;
const SW: usize = 1;
const TH: usize = 2;
const TW: usize = 3;
const LABELS: usize = 4;
const PT: usize = 5;
const LOSS: usize = 6;
const GH: usize = 7;
const GW: usize = 8;
/// `num_items` in memory (absent from the valid spec).
const NUM_ITEMS: usize = 9;
const SLOTS: usize = 10;

/// Bytes every buffer gets: far more than any spec below can reach.
const BUF_BYTES: usize = 1 << 14;

/// One matrix view: dtype, rows, cols, stride.
#[derive(Debug, Clone, Copy)]
struct View {
    dtype: DType,
    rows: usize,
    cols: usize,
    stride: usize,
}

/// A call, valid by default, that each test breaks in one way.
#[derive(Debug, Clone)]
struct Spec {
    /// Matrices: SH, SW, TH, TW, GH, GW (by slot; others unused).
    views: [View; SLOTS],
    /// Vector lengths: LABELS, PT, LOSS (by slot).
    lens: [usize; SLOTS],
    /// Which optional operands are present (the four inputs always are).
    present: [bool; SLOTS],
    /// Pointers replaced by null.
    null: [bool; SLOTS],
    /// Byte offset of each pointer inside its buffer (misalignment).
    offset: [usize; SLOTS],
    /// `alias[a] = Some((b, bytes))`: slot `a` points `bytes` into slot `b`'s buffer.
    alias: [Option<(usize, usize)>; SLOTS],
    /// A slot whose view claims to live on CUDA device 0.
    on_cuda: Option<usize>,
    params: FusedLinearParams,
}

impl Spec {
    fn valid() -> Spec {
        let (n, v, h, ht) = (4, 6, 5, 3);
        let m = |rows, cols| View {
            dtype: DType::F32,
            rows,
            cols,
            stride: cols,
        };
        let mut views = [m(0, 0); SLOTS];
        views[SH] = m(n, h);
        views[SW] = m(v, h);
        views[TH] = m(n, ht);
        views[TW] = m(v, ht);
        views[GH] = m(n, h);
        views[GW] = m(v, h);
        let mut lens = [0; SLOTS];
        lens[LABELS] = n;
        lens[PT] = n;
        lens[LOSS] = 1;
        lens[NUM_ITEMS] = 1;
        let mut present = [true; SLOTS];
        present[NUM_ITEMS] = false;
        Spec {
            views,
            lens,
            present,
            null: [false; SLOTS],
            offset: [0; SLOTS],
            alias: [None; SLOTS],
            on_cuda: None,
            params: FusedLinearParams {
                divergence: Params {
                    beta: 0.5,
                    ..Params::new(Kind::Jsd)
                },
                softcap: Some(4.0),
                ..FusedLinearParams::default()
            },
        }
    }

    /// Every input and gradient in `dtype`.
    fn dtype(mut self, d: DType) -> Spec {
        for s in [SH, SW, TH, TW, GH, GW] {
            self.views[s].dtype = d;
        }
        self
    }
}

/// Runs `spec` on `ctx` over fresh buffers (inputs random, outputs poisoned); returns the
/// result and the buffers before and after.
fn run_on(
    ctx: &Context,
    spec: &Spec,
    rng: &mut Rng,
) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
    let mut bufs: Vec<Bytes> = (0..SLOTS)
        .map(|slot| match slot {
            SH | SW | TH | TW => {
                let d = spec.views[slot].dtype;
                let vals: Vec<f64> = (0..BUF_BYTES / d.size()).map(|_| rng.normal()).collect();
                Bytes::from_slice(&encode(d, &vals))
            }
            LABELS => Bytes::from_slice(
                &(0..BUF_BYTES / 8)
                    .flat_map(|i| (i as i64 % 5).to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            _ => Bytes::from_slice(&poison_bytes(DType::F32, BUF_BYTES / 4)),
        })
        .collect();
    let before = bufs.clone();
    let bases: Vec<*mut u8> = bufs.iter_mut().map(|b| b.ptr()).collect();
    let mut p = [std::ptr::null_mut::<u8>(); SLOTS];
    for slot in 0..SLOTS {
        p[slot] = match spec.alias[slot] {
            Some((other, bytes)) => bases[other].wrapping_add(bytes),
            None => bases[slot].wrapping_add(spec.offset[slot]),
        };
        if spec.null[slot] {
            p[slot] = std::ptr::null_mut();
        }
    }
    let loc = |slot: usize| {
        if spec.on_cuda == Some(slot) {
            Location::Cuda(0)
        } else {
            ctx.location()
        }
    };
    let mat = |slot: usize| {
        let v = spec.views[slot];
        // SAFETY: the buffers hold BUF_BYTES, more than any view reaches; a bad view must be
        // rejected before any access (what these tests check).
        unsafe { Matrix::from_raw(p[slot], v.dtype, v.rows, v.cols, v.stride, loc(slot)) }
    };
    let mat_mut = |slot: usize| {
        let v = spec.views[slot];
        // SAFETY: as above.
        unsafe { MatrixMut::from_raw(p[slot], v.dtype, v.rows, v.cols, v.stride, loc(slot)) }
    };
    let present = |slot: usize| spec.present[slot];
    // SAFETY (vectors): as above.
    let call = unsafe {
        FusedLinear {
            student_hidden: mat(SH),
            student_weight: mat(SW),
            teacher_hidden: mat(TH),
            teacher_weight: mat(TW),
            labels: present(LABELS)
                .then(|| Vector::from_raw(p[LABELS] as *const i64, spec.lens[LABELS], loc(LABELS))),
            per_token: present(PT)
                .then(|| VectorMut::from_raw(p[PT] as *mut f32, spec.lens[PT], loc(PT))),
            loss: present(LOSS)
                .then(|| VectorMut::from_raw(p[LOSS] as *mut f32, spec.lens[LOSS], loc(LOSS))),
            grad_hidden: present(GH).then(|| mat_mut(GH)),
            grad_weight: present(GW).then(|| mat_mut(GW)),
            num_items: present(NUM_ITEMS).then(|| {
                Vector::from_raw(
                    p[NUM_ITEMS] as *const f32,
                    spec.lens[NUM_ITEMS],
                    loc(NUM_ITEMS),
                )
            }),
        }
    };
    let result = ctx.fused_linear_divergence(call, &spec.params, &Launch::default());
    (result, before, bufs)
}

/// Asserts `spec` fails with `kind` on the CPU and leaves every buffer as it was.
#[track_caller]
fn rejects(spec: &Spec, kind: ErrorKind, what: &str) {
    let mut rng = Rng::fresh(what);
    let ctx = Context::cpu();
    let (result, before, after) = run_on(&ctx, spec, &mut rng);
    assert_kind(result, kind, what);
    for (slot, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(
            b == a,
            "{what}: buffer {slot} changed although the call failed"
        );
    }
}

#[test]
fn the_valid_spec_runs() {
    let mut rng = Rng::fresh("the_valid_spec_runs");
    for d in DType::ALL {
        let (result, before, after) = run_on(&Context::cpu(), &Spec::valid().dtype(d), &mut rng);
        result.unwrap_or_else(|e| panic!("{}: {e}", d.name()));
        assert!(before[GW] != after[GW] && before[PT] != after[PT]);
    }
}

#[test]
fn null_pointers() {
    let names = [
        "student hidden",
        "student weight",
        "teacher hidden",
        "teacher weight",
        "labels",
        "per-token loss",
        "loss",
        "grad_hidden",
        "grad_weight",
    ];
    for (slot, name) in names.iter().enumerate() {
        let mut s = Spec::valid();
        s.null[slot] = true;
        rejects(&s, ErrorKind::NullPointer, &format!("null {name}"));
    }
}

#[test]
fn empty_dimensions() {
    // N = 0 is an empty batch (tests/empty_batch.rs); V, H and Ht must be at least 1.
    let mut s = Spec::valid();
    s.views[SW].rows = 0;
    s.views[TW].rows = 0;
    s.views[GW].rows = 0;
    rejects(&s, ErrorKind::Shape, "V = 0");
    let mut s = Spec::valid();
    for slot in [SH, SW, GH, GW] {
        s.views[slot].cols = 0;
        s.views[slot].stride = 0;
    }
    rejects(&s, ErrorKind::Shape, "H = 0");
    let mut s = Spec::valid();
    for slot in [TH, TW] {
        s.views[slot].cols = 0;
        s.views[slot].stride = 0;
    }
    rejects(&s, ErrorKind::Shape, "Ht = 0");
}

#[test]
fn rows_beyond_32_bits() {
    let mut s = Spec::valid();
    let n = 1usize << 31;
    s.views[SH].rows = n;
    s.views[TH].rows = n;
    s.present[GH] = false;
    s.present[LABELS] = false;
    s.present[PT] = false;
    rejects(&s, ErrorKind::Shape, "N = 2^31");
}

#[test]
fn vocabulary_beyond_max_vocab() {
    // V past 2^31 - 2^16: the divergence kernels' 32-bit in-row indices would wrap. Such a
    // weight's span also covers the small test buffers (an overlap, also a shape error), so the
    // message is what shows which check refused it; at MAX_VOCAB itself that check passes.
    let vocab_message = |v: usize| {
        let mut s = Spec::valid();
        s.views[SW].rows = v;
        s.views[TW].rows = v;
        s.present[GW] = false;
        let mut rng = Rng::fresh("vocabulary_beyond_max_vocab");
        let (result, before, after) = run_on(&Context::cpu(), &s, &mut rng);
        assert!(
            before == after,
            "V = {v}: buffers changed although the call failed"
        );
        result
            .expect_err("a span this large is refused")
            .to_string()
    };
    let max = distill_kernels::divergence::MAX_VOCAB;
    let beyond = vocab_message(max + 1);
    assert!(beyond.contains("MAX_VOCAB"), "V = MAX_VOCAB + 1: {beyond}");
    let at = vocab_message(max);
    assert!(
        !at.contains("MAX_VOCAB"),
        "V = MAX_VOCAB refused by the cap: {at}"
    );
}

#[test]
fn inconsistent_shapes() {
    type Edit = fn(&mut Spec);
    let cases: [(&str, Edit); 8] = [
        ("student weight columns != H", |s| s.views[SW].cols = 4),
        ("teacher hidden rows != N", |s| s.views[TH].rows = 3),
        ("teacher weight rows != V", |s| s.views[TW].rows = 5),
        ("teacher weight columns != Ht", |s| {
            s.views[TW].cols = 2;
            s.views[TW].stride = 2;
        }),
        ("grad_hidden rows", |s| s.views[GH].rows = 3),
        ("grad_hidden columns", |s| s.views[GH].cols = 4),
        ("grad_weight rows", |s| s.views[GW].rows = 7),
        ("grad_weight columns", |s| s.views[GW].cols = 6),
    ];
    for (what, edit) in cases {
        let mut s = Spec::valid();
        edit(&mut s);
        rejects(&s, ErrorKind::Shape, what);
    }
}

#[test]
fn vector_lengths() {
    for (slot, len, what) in [
        (LABELS, 3, "labels shorter than N"),
        (LABELS, 5, "labels longer than N"),
        (PT, 3, "per-token shorter than N"),
        (LOSS, 2, "loss of 2 elements"),
        (LOSS, 0, "loss of 0 elements"),
    ] {
        let mut s = Spec::valid();
        s.lens[slot] = len;
        rejects(&s, ErrorKind::Shape, what);
    }
}

/// The six matrix slots and their names.
const MATRICES: [(usize, &str); 6] = [
    (SH, "student hidden"),
    (SW, "student weight"),
    (TH, "teacher hidden"),
    (TW, "teacher weight"),
    (GH, "grad_hidden"),
    (GW, "grad_weight"),
];

#[test]
fn strides_smaller_than_rows() {
    for (slot, what) in MATRICES {
        let mut s = Spec::valid();
        s.views[slot].stride = s.views[slot].cols - 1;
        rejects(&s, ErrorKind::Shape, &format!("{what} stride < columns"));
    }
}

/// A stride whose span passes 2^63 bytes: no allocation is that long, and the backends' offsets
/// would overflow (a stride of 2^61 f32 elements made the CPU backend read past the address
/// space instead of refusing).
#[test]
fn strides_past_the_address_space() {
    for (slot, what) in MATRICES {
        let mut s = Spec::valid();
        let view = s.views[slot];
        // Just past 2^63 bytes from the first row to the last: the span's end still fits 64
        // bits, so only the isize::MAX bound can refuse it.
        let step_bytes = (1usize << 63) / (view.rows - 1) + 1;
        s.views[slot].stride = step_bytes.div_ceil(view.dtype.size());
        let span = (view.rows - 1) as u128 * s.views[slot].stride as u128 * 4;
        assert!(span > isize::MAX as u128 && span < (1u128 << 64) - (1 << 48));
        rejects(
            &s,
            ErrorKind::Shape,
            &format!("{what} span past isize::MAX"),
        );
    }
}

#[test]
fn input_dtypes_differ() {
    for slot in [SW, TH, TW] {
        let mut s = Spec::valid();
        s.views[slot].dtype = DType::BF16;
        rejects(
            &s,
            ErrorKind::UnsupportedDtype,
            &format!("input {slot} in bf16, the others f32"),
        );
    }
}

#[test]
fn gradient_dtypes() {
    for (input, grad) in [
        (DType::F32, DType::BF16),
        (DType::F32, DType::F16),
        (DType::BF16, DType::F16),
        (DType::F16, DType::BF16),
    ] {
        for slot in [GH, GW] {
            let mut s = Spec::valid().dtype(input);
            s.views[slot].dtype = grad;
            rejects(
                &s,
                ErrorKind::UnsupportedDtype,
                &format!(
                    "{} inputs, gradient {slot} in {}",
                    input.name(),
                    grad.name()
                ),
            );
        }
    }
}

#[test]
fn misaligned_pointers() {
    for (slot, bytes, dtype) in [
        (SH, 2, DType::F32),
        (SW, 1, DType::BF16),
        (TH, 1, DType::F16),
        (TW, 2, DType::F32),
        (LABELS, 4, DType::F32),
        (PT, 2, DType::F32),
        (LOSS, 1, DType::F32),
        (GH, 2, DType::F32),
        (GW, 1, DType::BF16),
    ] {
        let mut s = Spec::valid().dtype(dtype);
        s.offset[slot] = bytes;
        rejects(
            &s,
            ErrorKind::InvalidArgument,
            &format!("slot {slot} misaligned by {bytes} bytes ({})", dtype.name()),
        );
    }
}

#[test]
fn outputs_overlapping_inputs_or_each_other() {
    for (out, into, bytes, what) in [
        (GH, SH, 0, "grad_hidden over the student hidden"),
        (GH, TH, 8, "grad_hidden inside the teacher hidden"),
        (GW, SW, 4, "grad_weight inside the student weight"),
        (GW, TW, 0, "grad_weight over the teacher weight"),
        (GW, GH, 16, "grad_weight inside grad_hidden"),
        (GH, GW, 0, "grad_hidden over grad_weight"),
        (PT, LABELS, 0, "per-token over the labels"),
        (LOSS, PT, 4, "loss inside the per-token loss"),
        (PT, GW, 8, "per-token inside grad_weight"),
        (LOSS, SH, 0, "loss over the student hidden"),
    ] {
        let mut s = Spec::valid();
        s.alias[out] = Some((into, bytes));
        rejects(&s, ErrorKind::Shape, what);
    }
}

#[test]
fn parameters_out_of_range() {
    let d = Spec::valid().params;
    let bad: Vec<(&str, FusedLinearParams)> = vec![
        (
            "beta 1.5",
            FusedLinearParams {
                divergence: Params {
                    beta: 1.5,
                    ..d.divergence
                },
                ..d
            },
        ),
        (
            "temperature 0",
            FusedLinearParams {
                divergence: Params {
                    temperature: 0.0,
                    ..d.divergence
                },
                ..d
            },
        ),
        (
            "temperature NaN",
            FusedLinearParams {
                divergence: Params {
                    temperature: f32::NAN,
                    ..d.divergence
                },
                ..d
            },
        ),
        (
            "num_items with sum",
            FusedLinearParams {
                divergence: Params {
                    num_items: Some(4.0),
                    reduction: Reduction::Sum,
                    ..d.divergence
                },
                ..d
            },
        ),
        (
            "num_items 0",
            FusedLinearParams {
                divergence: Params {
                    num_items: Some(0.0),
                    ..d.divergence
                },
                ..d
            },
        ),
        (
            "logit_scale 0",
            FusedLinearParams {
                logit_scale: 0.0,
                ..d
            },
        ),
        (
            "logit_scale -1",
            FusedLinearParams {
                logit_scale: -1.0,
                ..d
            },
        ),
        (
            "logit_scale inf",
            FusedLinearParams {
                logit_scale: f32::INFINITY,
                ..d
            },
        ),
        (
            "logit_scale NaN",
            FusedLinearParams {
                logit_scale: f32::NAN,
                ..d
            },
        ),
        (
            "softcap 0",
            FusedLinearParams {
                softcap: Some(0.0),
                ..d
            },
        ),
        (
            "softcap -2",
            FusedLinearParams {
                softcap: Some(-2.0),
                ..d
            },
        ),
        (
            "softcap NaN",
            FusedLinearParams {
                softcap: Some(f32::NAN),
                ..d
            },
        ),
        (
            "softcap inf",
            FusedLinearParams {
                softcap: Some(f32::INFINITY),
                ..d
            },
        ),
        (
            "chunk_rows 0",
            FusedLinearParams {
                chunk_rows: Some(0),
                ..d
            },
        ),
    ];
    for (what, params) in bad {
        let mut s = Spec::valid();
        s.params = params;
        rejects(&s, ErrorKind::InvalidArgument, what);
    }
}

#[test]
fn num_items_in_memory() {
    let with = || {
        let mut s = Spec::valid();
        s.present[NUM_ITEMS] = true;
        s
    };
    let mut rng = Rng::fresh("fused num_items_in_memory");
    let (result, _, _) = run_on(&Context::cpu(), &with(), &mut rng);
    result.expect("a valid num_items in memory");
    let mut s = with();
    s.params.divergence.num_items = Some(2.0);
    rejects(
        &s,
        ErrorKind::InvalidArgument,
        "num_items in memory and in the parameters",
    );
    for reduction in [Reduction::Sum, Reduction::None] {
        let mut s = with();
        s.params.divergence.reduction = reduction;
        rejects(
            &s,
            ErrorKind::InvalidArgument,
            &format!("num_items in memory with {}", reduction.name()),
        );
    }
    let mut s = with();
    s.lens[NUM_ITEMS] = 2;
    rejects(&s, ErrorKind::Shape, "num_items of 2 values");
    let mut s = with();
    s.null[NUM_ITEMS] = true;
    rejects(&s, ErrorKind::NullPointer, "num_items null");
    let mut s = with();
    s.offset[NUM_ITEMS] = 2;
    rejects(&s, ErrorKind::InvalidArgument, "num_items misaligned");
    let mut s = with();
    s.on_cuda = Some(NUM_ITEMS);
    rejects(
        &s,
        ErrorKind::WrongDevice,
        "num_items in CUDA memory on a CPU context",
    );
    for (out, bytes) in [(PT, 4), (LOSS, 0), (GW, 8), (GH, 0)] {
        let mut s = with();
        s.alias[NUM_ITEMS] = Some((out, bytes));
        rejects(
            &s,
            ErrorKind::Shape,
            &format!("num_items inside output slot {out}"),
        );
    }
}

#[test]
fn operands_on_another_device() {
    for slot in [SH, SW, TH, TW, LABELS, PT, LOSS, GH, GW] {
        let mut s = Spec::valid();
        s.on_cuda = Some(slot);
        rejects(
            &s,
            ErrorKind::WrongDevice,
            &format!("slot {slot} in CUDA memory on a CPU context"),
        );
    }
}

#[test]
fn host_pointers_on_a_cuda_context() {
    let Some(dev) = cuda("host_pointers_on_a_cuda_context") else {
        return;
    };
    let mut rng = Rng::fresh("host_pointers_on_a_cuda_context");
    let vals =
        |rng: &mut Rng, len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
    let (sh, sw) = (vals(&mut rng, 20), vals(&mut rng, 30));
    let (th, tw) = (vals(&mut rng, 12), vals(&mut rng, 18));
    let mut gw = vec![poison_f32(); 30];
    let call = FusedLinear {
        num_items: None,
        student_hidden: Matrix::host(&sh, 4, 5, 5).unwrap(),
        student_weight: Matrix::host(&sw, 6, 5, 5).unwrap(),
        teacher_hidden: Matrix::host(&th, 4, 3, 3).unwrap(),
        teacher_weight: Matrix::host(&tw, 6, 3, 3).unwrap(),
        labels: None,
        per_token: None,
        loss: None,
        grad_hidden: None,
        grad_weight: Some(MatrixMut::host(&mut gw, 6, 5, 5).unwrap()),
    };
    let result =
        dev.ctx
            .fused_linear_divergence(call, &FusedLinearParams::default(), &Launch::default());
    assert_kind(
        result,
        ErrorKind::WrongDevice,
        "host views on a CUDA context",
    );
    assert!(
        gw.iter().all(|x| x.to_bits() == POISON_F32),
        "grad_weight written although the call failed"
    );
}

#[test]
fn workspace_query_checks_shapes_and_params() {
    let ctx = Context::cpu();
    let sh = vec![1.0f32; 20];
    let sw = vec![1.0f32; 30];
    let th = vec![1.0f32; 12];
    let tw = vec![1.0f32; 18];
    let make = |sw_cols: usize| FusedLinear {
        num_items: None,
        student_hidden: Matrix::host(&sh, 4, 5, 5).unwrap(),
        student_weight: Matrix::host(&sw, 6, sw_cols, 5).unwrap(),
        teacher_hidden: Matrix::host(&th, 4, 3, 3).unwrap(),
        teacher_weight: Matrix::host(&tw, 6, 3, 3).unwrap(),
        labels: None,
        per_token: None,
        loss: None,
        grad_hidden: None,
        grad_weight: None,
    };
    let p = FusedLinearParams::default();
    assert_eq!(ctx.fused_linear_workspace_size(&make(5), &p).unwrap(), 0);
    let e = ctx.fused_linear_workspace_size(&make(4), &p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Shape, "{e}");
    // Parameters the call would refuse are refused by the size query too.
    let mut bad = FusedLinearParams::default();
    bad.divergence.temperature = f32::NAN;
    let e = ctx.fused_linear_workspace_size(&make(5), &bad).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // And num_items in memory where the parameters have one already.
    let items = [3.0f32];
    let mut both = FusedLinearParams::default();
    both.divergence.num_items = Some(3.0);
    let call = FusedLinear {
        num_items: Some(Vector::host(&items)),
        ..make(5)
    };
    let e = ctx.fused_linear_workspace_size(&call, &both).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("given twice"), "{e}");
}
