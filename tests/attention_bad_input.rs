//! Attention bad input: every validation rule, forward and backward, on the CPU and on CUDA
//! device 0 when present (a visible SKIPPED line otherwise). Each check asserts the error kind,
//! that the message names the argument, and that every buffer (inputs and poisoned outputs) is
//! bitwise unchanged. Rules only one backend applies are marked: the contents of the varlen
//! offsets are checked on the CPU only (CUDA reads them in the kernels), f32 is rejected on
//! CUDA only.

mod common;

use common::attention::*;
use common::moe::{Mt, Vw};
use common::*;
use distill_kernels::attention::{AttentionParams, MAX_ROWS};
use distill_kernels::{Context, DType, ErrorKind, Location};

/// Asserts a rejected run: `kind`, a message mentioning `mention`, every buffer unchanged.
#[track_caller]
fn assert_rejected(dev: &Device, what: &str, kind: ErrorKind, mention: &str, run: Run) {
    let (res, before, after) = run;
    match res {
        Ok(()) => panic!(
            "[{}] {what}: expected {kind:?}, the call succeeded",
            dev.name()
        ),
        Err(e) => {
            assert_eq!(e.kind(), kind, "[{}] {what}: wrong kind ({e})", dev.name());
            assert!(
                e.message().contains(mention),
                "[{}] {what}: the message does not mention {mention:?}: {e}",
                dev.name()
            );
        }
    }
    assert!(
        before == after,
        "[{}] {what}: a buffer changed on error",
        dev.name()
    );
}

/// A location the device's context does not accept.
fn foreign(dev: &Device) -> Location {
    if dev.is_cuda() {
        Location::Host
    } else {
        Location::Cuda(3)
    }
}

/// The base case the forward rules break: bf16, causal, varlen with an empty sequence,
/// GQA 6 / 2, D 64, padded strides. Tq = 8, Tk = 12.
fn base(rng: &mut Rng) -> AttnCase {
    AttnCase::random(
        rng,
        DType::BF16,
        Seqs::varlen(&[3, 0, 5], &[4, 2, 6]),
        AttentionParams::new(6, 2, 64).causal(true),
        Layout::Separate { pad: 8 },
    )
}

/// A padded base case: B = 2, Sq = 4, Sk = 6.
fn padded_base(rng: &mut Rng) -> AttnCase {
    AttnCase::random(
        rng,
        DType::F16,
        Seqs::padded(2, 4, 6),
        AttentionParams::new(4, 4, 128),
        Layout::Separate { pad: 8 },
    )
}

/// Valid out and LSE for the backward of `case` (from the CPU backend).
fn forward_outputs(case: &AttnCase) -> (Vec<f64>, Vec<f32>) {
    let cpu = Device::Cpu(Context::cpu());
    let (res, before, after) = case.run_fwd(&cpu);
    res.unwrap();
    let f = case.fwd_outputs(&before, &after).unwrap();
    (f.out, f.lse)
}

type FwdEdit = Box<dyn Fn(&mut FwdSpec, Location)>;
type BwdEdit = Box<dyn Fn(&mut BwdSpec, Location)>;

/// Runs every forward edit on every device and asserts its rejection.
fn forward_rejects(test: &str, case: &AttnCase, rules: Vec<(&str, ErrorKind, &str, FwdEdit)>) {
    for dev in devices(test) {
        for (what, kind, mention, edit) in &rules {
            let loc = foreign(&dev);
            let run = case.run_fwd_edited(&dev, |s| edit(s, loc));
            assert_rejected(&dev, &format!("{test}: {what}"), *kind, mention, run);
        }
    }
}

/// Runs every backward edit on every device and asserts its rejection.
fn backward_rejects(test: &str, case: &AttnCase, rules: Vec<(&str, ErrorKind, &str, BwdEdit)>) {
    let (out, lse) = forward_outputs(case);
    for dev in devices(test) {
        for (what, kind, mention, edit) in &rules {
            let loc = foreign(&dev);
            let run = case.run_bwd_edited(&dev, &out, &lse, Ws::Library, |s| edit(s, loc));
            assert_rejected(&dev, &format!("{test}: {what}"), *kind, mention, run);
        }
    }
}

macro_rules! rule {
    ($what:expr, $kind:ident, $mention:expr, $edit:expr) => {
        ($what, ErrorKind::$kind, $mention, Box::new($edit) as _)
    };
}

#[test]
fn valid_base_cases_run() {
    // The cases the other tests break are themselves accepted (and write every output).
    let test = "valid_base_cases_run";
    let mut rng = Rng::fresh(test);
    for case in [base(&mut rng), padded_base(&mut rng)] {
        let (out, lse) = forward_outputs(&case);
        for dev in devices(test) {
            let (res, before, after) = case.run_fwd(&dev);
            res.unwrap();
            case.fwd_outputs(&before, &after).unwrap();
            let (res, before, after) = case.run_bwd(&dev, &out, &lse);
            res.unwrap();
            case.bwd_outputs(&before, &after).unwrap();
        }
    }
}

#[test]
fn parameters() {
    let test = "parameters";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    let with = |p: AttentionParams| move |s: &mut FwdSpec, _: Location| s.params = p;
    let p = case.params;
    let scale = |x: f32| AttentionParams {
        softmax_scale: Some(x),
        ..p
    };
    let fwd = vec![
        rule!(
            "heads_q 0",
            Shape,
            "heads_q",
            with(AttentionParams { heads_q: 0, ..p })
        ),
        rule!(
            "heads_kv 0",
            Shape,
            "heads_kv",
            with(AttentionParams { heads_kv: 0, ..p })
        ),
        rule!(
            "heads_q 5 over heads_kv 2",
            Shape,
            "multiple",
            with(AttentionParams { heads_q: 5, ..p })
        ),
        rule!(
            "head_dim 96",
            Shape,
            "head_dim",
            with(AttentionParams { head_dim: 96, ..p })
        ),
        rule!(
            "head_dim 256",
            Shape,
            "head_dim",
            with(AttentionParams { head_dim: 256, ..p })
        ),
        rule!(
            "scale 0",
            InvalidArgument,
            "softmax_scale",
            with(scale(0.0))
        ),
        rule!(
            "scale -1",
            InvalidArgument,
            "softmax_scale",
            with(scale(-1.0))
        ),
        rule!(
            "scale NaN",
            InvalidArgument,
            "softmax_scale",
            with(scale(f32::NAN))
        ),
        rule!(
            "scale inf",
            InvalidArgument,
            "softmax_scale",
            with(scale(f32::INFINITY))
        ),
        // Finite, but softmax_scale · log2(e) is not: every output would be NaN.
        rule!(
            "scale 3e38",
            InvalidArgument,
            "softmax_scale",
            with(scale(3e38))
        ),
        // Consistent with the matrices' columns, but a different head split.
        rule!(
            "heads 6 / 1 against k's 128 columns",
            Shape,
            "k has",
            with(AttentionParams {
                heads_q: 6,
                heads_kv: 1,
                ..p
            })
        ),
    ];
    forward_rejects(test, &case, fwd);
    let withb = |p: AttentionParams| move |s: &mut BwdSpec, _: Location| s.params = p;
    let bwd = vec![
        rule!(
            "heads_q 5 over heads_kv 2",
            Shape,
            "multiple",
            withb(AttentionParams { heads_q: 5, ..p })
        ),
        rule!(
            "head_dim 32",
            Shape,
            "head_dim",
            withb(AttentionParams { head_dim: 32, ..p })
        ),
        rule!(
            "scale -0.5",
            InvalidArgument,
            "softmax_scale",
            withb(scale(-0.5))
        ),
    ];
    backward_rejects(test, &case, bwd);
}

#[test]
fn wrong_device() {
    let test = "wrong_device";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    fn cu(s: &mut BatchSpec, q: bool, loc: Location) {
        if let BatchSpec::Varlen { cu_q, cu_k, .. } = s {
            if q {
                cu_q.loc = loc;
            } else {
                cu_k.loc = loc;
            }
        }
    }
    let fwd = vec![
        rule!("q", WrongDevice, "q", |s: &mut FwdSpec, l| s.q.loc = l),
        rule!("k", WrongDevice, "k", |s: &mut FwdSpec, l| s.k.loc = l),
        rule!("v", WrongDevice, "v", |s: &mut FwdSpec, l| s.v.loc = l),
        rule!("out", WrongDevice, "out", |s: &mut FwdSpec, l| s.out.loc =
            l),
        rule!("lse", WrongDevice, "lse", |s: &mut FwdSpec, l| s.lse.loc =
            l),
        rule!(
            "cu_seqlens_q",
            WrongDevice,
            "cu_seqlens_q",
            |s: &mut FwdSpec, l| cu(&mut s.batch, true, l)
        ),
        rule!(
            "cu_seqlens_k",
            WrongDevice,
            "cu_seqlens_k",
            |s: &mut FwdSpec, l| cu(&mut s.batch, false, l)
        ),
    ];
    forward_rejects(test, &case, fwd);
    let bwd = vec![
        rule!("dout", WrongDevice, "dout", |s: &mut BwdSpec, l| s
            .dout
            .loc =
            l),
        rule!("q", WrongDevice, "q", |s: &mut BwdSpec, l| s.q.loc = l),
        rule!("k", WrongDevice, "k", |s: &mut BwdSpec, l| s.k.loc = l),
        rule!("v", WrongDevice, "v", |s: &mut BwdSpec, l| s.v.loc = l),
        rule!("out", WrongDevice, "out", |s: &mut BwdSpec, l| s.out.loc =
            l),
        rule!("lse", WrongDevice, "lse", |s: &mut BwdSpec, l| s.lse.loc =
            l),
        rule!("dq", WrongDevice, "dq", |s: &mut BwdSpec, l| s.dq.loc = l),
        rule!("dk", WrongDevice, "dk", |s: &mut BwdSpec, l| s.dk.loc = l),
        rule!("dv", WrongDevice, "dv", |s: &mut BwdSpec, l| s.dv.loc = l),
        rule!(
            "cu_seqlens_q",
            WrongDevice,
            "cu_seqlens_q",
            |s: &mut BwdSpec, l| cu(&mut s.batch, true, l)
        ),
        rule!(
            "cu_seqlens_k",
            WrongDevice,
            "cu_seqlens_k",
            |s: &mut BwdSpec, l| cu(&mut s.batch, false, l)
        ),
    ];
    backward_rejects(test, &case, bwd);
}

fn cu_null(s: &mut BatchSpec, q: bool) {
    if let BatchSpec::Varlen { cu_q, cu_k, .. } = s {
        if q {
            *cu_q = cu_q.null();
        } else {
            *cu_k = cu_k.null();
        }
    }
}

#[test]
fn null_pointers() {
    let test = "null_pointers";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    let fwd = vec![
        rule!("q", NullPointer, "q", |s: &mut FwdSpec, _| s.q = s.q.null()),
        rule!("k", NullPointer, "k", |s: &mut FwdSpec, _| s.k = s.k.null()),
        rule!("v", NullPointer, "v", |s: &mut FwdSpec, _| s.v = s.v.null()),
        rule!("out", NullPointer, "out", |s: &mut FwdSpec, _| s.out =
            s.out.null()),
        rule!("lse", NullPointer, "lse", |s: &mut FwdSpec, _| s.lse =
            s.lse.null()),
        rule!(
            "cu_seqlens_q",
            NullPointer,
            "cu_seqlens_q",
            |s: &mut FwdSpec, _| cu_null(&mut s.batch, true)
        ),
        rule!(
            "cu_seqlens_k",
            NullPointer,
            "cu_seqlens_k",
            |s: &mut FwdSpec, _| cu_null(&mut s.batch, false)
        ),
    ];
    forward_rejects(test, &case, fwd);
    let bwd = vec![
        rule!("dout", NullPointer, "dout", |s: &mut BwdSpec, _| s.dout =
            s.dout.null()),
        rule!("q", NullPointer, "q", |s: &mut BwdSpec, _| s.q = s.q.null()),
        rule!("k", NullPointer, "k", |s: &mut BwdSpec, _| s.k = s.k.null()),
        rule!("v", NullPointer, "v", |s: &mut BwdSpec, _| s.v = s.v.null()),
        rule!("out", NullPointer, "out", |s: &mut BwdSpec, _| s.out =
            s.out.null()),
        rule!("lse", NullPointer, "lse", |s: &mut BwdSpec, _| s.lse =
            s.lse.null()),
        rule!("dq", NullPointer, "dq", |s: &mut BwdSpec, _| s.dq =
            s.dq.null()),
        rule!("dk", NullPointer, "dk", |s: &mut BwdSpec, _| s.dk =
            s.dk.null()),
        rule!("dv", NullPointer, "dv", |s: &mut BwdSpec, _| s.dv =
            s.dv.null()),
        rule!(
            "cu_seqlens_q",
            NullPointer,
            "cu_seqlens_q",
            |s: &mut BwdSpec, _| cu_null(&mut s.batch, true)
        ),
        rule!(
            "cu_seqlens_k",
            NullPointer,
            "cu_seqlens_k",
            |s: &mut BwdSpec, _| cu_null(&mut s.batch, false)
        ),
    ];
    backward_rejects(test, &case, bwd);
    // An empty operand may be null, but not once it holds rows: a null k with keys.
    let empty_q = AttnCase::random(
        &mut rng,
        DType::BF16,
        Seqs::varlen(&[0, 0], &[3, 1]),
        AttentionParams::new(2, 1, 64),
        Layout::Separate { pad: 0 },
    );
    forward_rejects(
        test,
        &empty_q,
        vec![rule!(
            "k with rows",
            NullPointer,
            "k",
            |s: &mut FwdSpec, _| {
                s.q = s.q.null();
                s.k = s.k.null();
            }
        )],
    );
}

/// The other 16-bit dtype.
fn other(d: DType) -> DType {
    match d {
        DType::BF16 => DType::F16,
        _ => DType::BF16,
    }
}

#[test]
fn dtypes() {
    let test = "dtypes";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    // Same-size dtypes, so a library that wrongly went ahead would stay in the buffers.
    let fwd = vec![
        rule!(
            "k differs from q",
            UnsupportedDtype,
            "k dtype",
            |s: &mut FwdSpec, _| s.k.dtype = other(s.k.dtype)
        ),
        rule!(
            "v differs from q",
            UnsupportedDtype,
            "v dtype",
            |s: &mut FwdSpec, _| s.v.dtype = other(s.v.dtype)
        ),
        rule!(
            "out differs from q",
            UnsupportedDtype,
            "out dtype",
            |s: &mut FwdSpec, _| s.out.dtype = other(s.out.dtype)
        ),
        rule!(
            "q differs from the rest",
            UnsupportedDtype,
            "dtype",
            |s: &mut FwdSpec, _| s.q.dtype = other(s.q.dtype)
        ),
    ];
    forward_rejects(test, &case, fwd);
    let bwd = vec![
        rule!(
            "dout",
            UnsupportedDtype,
            "dout dtype",
            |s: &mut BwdSpec, _| s.dout.dtype = other(s.dout.dtype)
        ),
        rule!(
            "out",
            UnsupportedDtype,
            "out dtype",
            |s: &mut BwdSpec, _| s.out.dtype = other(s.out.dtype)
        ),
        rule!("dq", UnsupportedDtype, "dq dtype", |s: &mut BwdSpec, _| s
            .dq
            .dtype =
            other(s.dq.dtype)),
        rule!("dk", UnsupportedDtype, "dk dtype", |s: &mut BwdSpec, _| s
            .dk
            .dtype =
            other(s.dk.dtype)),
        rule!("dv", UnsupportedDtype, "dv dtype", |s: &mut BwdSpec, _| s
            .dv
            .dtype =
            other(s.dv.dtype)),
    ];
    backward_rejects(test, &case, bwd);
}

#[test]
fn f32_is_rejected_on_cuda() {
    // CUDA-only rule: the kernels take bf16 / f16; the CPU accepts f32 (attention_reference).
    let test = "f32_is_rejected_on_cuda";
    let mut rng = Rng::fresh(test);
    let case = AttnCase::random(
        &mut rng,
        DType::F32,
        Seqs::padded(2, 3, 5),
        AttentionParams::new(2, 1, 64),
        Layout::Separate { pad: 0 },
    );
    let Some(c) = cuda(test) else { return };
    let dev = Device::Cuda(c);
    assert_rejected(
        &dev,
        "f32 forward",
        ErrorKind::UnsupportedDtype,
        "f32",
        case.run_fwd(&dev),
    );
    let (out, lse) = forward_outputs(&case);
    let run = case.run_bwd(&dev, &out, &lse);
    assert_rejected(
        &dev,
        "f32 backward",
        ErrorKind::UnsupportedDtype,
        "f32",
        run,
    );
}

#[test]
fn shapes() {
    let test = "shapes";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    fn varlen(s: &mut BatchSpec, f: impl FnOnce(&mut Vw, &mut Vw, &mut usize, &mut usize)) {
        if let BatchSpec::Varlen {
            cu_q,
            cu_k,
            max_q,
            max_k,
        } = s
        {
            f(cu_q, cu_k, max_q, max_k);
        }
    }
    let fwd = vec![
        rule!("q columns", Shape, "q has", |s: &mut FwdSpec, _| s
            .q
            .cols -=
            64),
        rule!("k columns", Shape, "k has", |s: &mut FwdSpec, _| s
            .k
            .cols +=
            8),
        rule!("v columns", Shape, "v has", |s: &mut FwdSpec, _| s
            .v
            .cols -=
            64),
        rule!("v rows", Shape, "v has", |s: &mut FwdSpec, _| s.v.rows -= 1),
        rule!("out rows", Shape, "out is", |s: &mut FwdSpec, _| s
            .out
            .rows -=
            1),
        rule!("out columns", Shape, "out is", |s: &mut FwdSpec, _| s
            .out
            .cols -=
            64),
        rule!("lse one short", Shape, "lse", |s: &mut FwdSpec, _| s
            .lse
            .len -=
            1),
        rule!("lse one long", Shape, "lse", |s: &mut FwdSpec, _| s
            .lse
            .len +=
            1),
        rule!(
            "cu_seqlens_q empty",
            Shape,
            "cu_seqlens_q",
            |s: &mut FwdSpec, _| varlen(&mut s.batch, |q, _, _, _| q.len = 0)
        ),
        rule!(
            "cu_seqlens_k one short",
            Shape,
            "cu_seqlens_k",
            |s: &mut FwdSpec, _| varlen(&mut s.batch, |_, k, _, _| k.len -= 1)
        ),
        rule!(
            "one-entry offsets with rows",
            Shape,
            "no sequences",
            |s: &mut FwdSpec, _| varlen(&mut s.batch, |q, k, _, _| {
                q.len = 1;
                k.len = 1;
            })
        ),
        rule!(
            "max_seqlen_q below the longest",
            Shape,
            "max_seqlen_q",
            |s: &mut FwdSpec, _| varlen(&mut s.batch, |_, _, mq, _| *mq = 2)
        ),
        rule!(
            "max_seqlen_k 0 with keys",
            Shape,
            "max_seqlen_k",
            |s: &mut FwdSpec, _| varlen(&mut s.batch, |_, _, _, mk| *mk = 0)
        ),
        rule!(
            "max_seqlen_q beyond 32 bits",
            Shape,
            "max_seqlen_q",
            |s: &mut FwdSpec, _| varlen(&mut s.batch, |_, _, mq, _| *mq = MAX_ROWS + 1)
        ),
    ];
    forward_rejects(test, &case, fwd);
    let bwd = vec![
        rule!("dout rows", Shape, "dout is", |s: &mut BwdSpec, _| s
            .dout
            .rows +=
            1),
        rule!("out columns", Shape, "out is", |s: &mut BwdSpec, _| s
            .out
            .cols -=
            64),
        rule!("dq rows", Shape, "dq is", |s: &mut BwdSpec, _| s.dq.rows -=
            1),
        rule!("dk rows", Shape, "dk is", |s: &mut BwdSpec, _| s.dk.rows -=
            1),
        rule!("dv columns", Shape, "dv is", |s: &mut BwdSpec, _| s
            .dv
            .cols -=
            64),
        rule!("dk shaped like q", Shape, "dk is", |s: &mut BwdSpec, _| {
            s.dk.rows = s.q.rows;
            s.dk.cols = s.q.cols;
        }),
        rule!("lse one short", Shape, "lse", |s: &mut BwdSpec, _| s
            .lse
            .len -=
            1),
        rule!(
            "cu_seqlens lengths differ",
            Shape,
            "cu_seqlens_k",
            |s: &mut BwdSpec, _| varlen(&mut s.batch, |_, k, _, _| k.len -= 1)
        ),
    ];
    backward_rejects(test, &case, bwd);

    // Padded: rows against B·S, and the 32-bit ranges.
    let padded = padded_base(&mut rng);
    fn padded_batch(s: &mut BatchSpec, f: impl FnOnce(&mut usize, &mut usize, &mut usize)) {
        if let BatchSpec::Padded {
            batch,
            seqlen_q,
            seqlen_k,
        } = s
        {
            f(batch, seqlen_q, seqlen_k);
        }
    }
    let fwd = vec![
        rule!(
            "batch·seqlen_q != rows of q",
            Shape,
            "q has",
            |s: &mut FwdSpec, _| padded_batch(&mut s.batch, |b, _, _| *b = 3)
        ),
        rule!(
            "batch·seqlen_k != rows of k",
            Shape,
            "k has",
            |s: &mut FwdSpec, _| padded_batch(&mut s.batch, |_, _, sk| *sk = 5)
        ),
        rule!(
            "batch·seqlen_q overflows",
            Shape,
            "batch",
            |s: &mut FwdSpec, _| padded_batch(&mut s.batch, |b, _, _| *b = usize::MAX)
        ),
        rule!(
            "lse for [B, Hq, Sq] one short",
            Shape,
            "[batch, heads_q, seqlen_q]",
            |s: &mut FwdSpec, _| s.lse.len -= 1
        ),
    ];
    forward_rejects(test, &padded, fwd);
    // An empty padded batch with out-of-range sizes: nothing to read, still rejected.
    let empty = AttnCase::random(
        &mut rng,
        DType::BF16,
        Seqs::padded(0, 4, 4),
        AttentionParams::new(2, 1, 64),
        Layout::Separate { pad: 0 },
    );
    let fwd = vec![
        rule!(
            "seqlen_q beyond 32 bits",
            Shape,
            "seqlen_q",
            |s: &mut FwdSpec, _| padded_batch(&mut s.batch, |_, sq, _| *sq = MAX_ROWS + 1)
        ),
        rule!(
            "seqlen_k beyond 32 bits",
            Shape,
            "seqlen_k",
            |s: &mut FwdSpec, _| padded_batch(&mut s.batch, |_, _, sk| *sk = MAX_ROWS + 1)
        ),
        rule!(
            "heads_q beyond 32 bits",
            Shape,
            "heads_q",
            |s: &mut FwdSpec, _| {
                s.params.heads_q = MAX_ROWS + 1;
                s.params.heads_kv = 1;
                s.q.cols = (MAX_ROWS + 1) * 64;
                s.q.stride = s.q.cols;
                s.out.cols = s.q.cols;
                s.out.stride = s.q.cols;
            }
        ),
    ];
    forward_rejects(test, &empty, fwd);
}

#[test]
fn strides() {
    let test = "strides";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    let fwd = vec![
        rule!(
            "q stride below its row",
            Shape,
            "q row stride",
            |s: &mut FwdSpec, _| s.q.stride = s.q.cols - 8
        ),
        rule!(
            "k stride below its row",
            Shape,
            "k row stride",
            |s: &mut FwdSpec, _| s.k.stride = s.k.cols - 8
        ),
        rule!(
            "out stride below its row",
            Shape,
            "out row stride",
            |s: &mut FwdSpec, _| s.out.stride = s.out.cols - 8
        ),
        // A span between 2^63 and 2^64 bytes: inside the address space's arithmetic, longer
        // than any allocation (it made the CPU backend read past the address space).
        rule!(
            "q span past isize::MAX bytes",
            Shape,
            "q spans more bytes",
            |s: &mut FwdSpec, _| s.q.stride = past_isize_max(&s.q)
        ),
    ];
    forward_rejects(test, &case, fwd);
    let bwd = vec![
        rule!(
            "dout stride",
            Shape,
            "dout row stride",
            |s: &mut BwdSpec, _| s.dout.stride = s.dout.cols - 8
        ),
        rule!("dv stride", Shape, "dv row stride", |s: &mut BwdSpec, _| {
            s.dv.stride = 0
        }),
        rule!(
            "dk span past isize::MAX bytes",
            Shape,
            "dk spans more bytes",
            |s: &mut BwdSpec, _| s.dk.stride = past_isize_max(&s.dk)
        ),
    ];
    backward_rejects(test, &case, bwd);
}

/// A row stride (a multiple of 64 elements, so alignment passes) that puts `m`'s last row just
/// past 2^63 bytes from its first: the span's end still fits 64 bits.
fn past_isize_max(m: &Mt) -> usize {
    assert!(m.rows >= 2, "the case needs two rows of {m:?}");
    let step_bytes = (1usize << 63) / (m.rows - 1) + 1;
    (step_bytes / m.dtype.size()).div_ceil(64) * 64
}

#[test]
fn alignment() {
    let test = "alignment";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    fn cu_shift(s: &mut BatchSpec) {
        if let BatchSpec::Varlen { cu_q, .. } = s {
            *cu_q = cu_q.shifted(2);
        }
    }
    // Shifts by one bf16 element keep element alignment but break the 16-byte row alignment.
    let fwd = vec![
        rule!(
            "q pointer",
            InvalidArgument,
            "q pointer",
            |s: &mut FwdSpec, _| s.q = shifted(s.q, 2)
        ),
        rule!(
            "k pointer",
            InvalidArgument,
            "k pointer",
            |s: &mut FwdSpec, _| s.k = shifted(s.k, 8)
        ),
        rule!(
            "v pointer",
            InvalidArgument,
            "v pointer",
            |s: &mut FwdSpec, _| s.v = shifted(s.v, 2)
        ),
        rule!(
            "out pointer",
            InvalidArgument,
            "out pointer",
            |s: &mut FwdSpec, _| s.out = shifted(s.out, 2)
        ),
        rule!(
            "q stride",
            InvalidArgument,
            "q row stride",
            |s: &mut FwdSpec, _| s.q.stride = s.q.cols + 1
        ),
        rule!(
            "out stride",
            InvalidArgument,
            "out row stride",
            |s: &mut FwdSpec, _| s.out.stride = s.out.cols + 4
        ),
        rule!(
            "lse pointer",
            InvalidArgument,
            "lse pointer",
            |s: &mut FwdSpec, _| s.lse = s.lse.shifted(2)
        ),
        rule!(
            "cu_seqlens_q pointer",
            InvalidArgument,
            "cu_seqlens_q pointer",
            |s: &mut FwdSpec, _| cu_shift(&mut s.batch)
        ),
    ];
    forward_rejects(test, &case, fwd);
    let bwd = vec![
        rule!(
            "dout pointer",
            InvalidArgument,
            "dout pointer",
            |s: &mut BwdSpec, _| s.dout = shifted(s.dout, 2)
        ),
        rule!(
            "dq pointer",
            InvalidArgument,
            "dq pointer",
            |s: &mut BwdSpec, _| s.dq = shifted(s.dq, 4)
        ),
        rule!(
            "dk pointer",
            InvalidArgument,
            "dk pointer",
            |s: &mut BwdSpec, _| s.dk = shifted(s.dk, 2)
        ),
        rule!(
            "dv pointer",
            InvalidArgument,
            "dv pointer",
            |s: &mut BwdSpec, _| s.dv = shifted(s.dv, 2)
        ),
        rule!(
            "dk stride",
            InvalidArgument,
            "dk row stride",
            |s: &mut BwdSpec, _| s.dk.stride = s.dk.cols + 2
        ),
        rule!(
            "lse pointer",
            InvalidArgument,
            "lse pointer",
            |s: &mut BwdSpec, _| s.lse = s.lse.shifted(1)
        ),
    ];
    backward_rejects(test, &case, bwd);
}

#[test]
fn overlapping_outputs() {
    let test = "overlapping_outputs";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    let fwd = vec![
        rule!("out over q", Shape, "overlaps", |s: &mut FwdSpec, _| s
            .out
            .ptr =
            s.q.ptr),
        rule!("lse inside q", Shape, "overlaps", |s: &mut FwdSpec, _| s
            .lse
            .ptr =
            s.q.ptr.wrapping_add(64)),
        rule!("lse inside out", Shape, "overlaps", |s: &mut FwdSpec, _| {
            s.lse.ptr = s.out.ptr
        }),
        rule!(
            "cu_seqlens_k inside out",
            Shape,
            "overlaps",
            |s: &mut FwdSpec, _| {
                if let BatchSpec::Varlen { cu_k, .. } = &mut s.batch {
                    cu_k.ptr = s.out.ptr.wrapping_add(16);
                }
            }
        ),
    ];
    forward_rejects(test, &case, fwd);
    let bwd = vec![
        rule!("dq over dout", Shape, "overlaps", |s: &mut BwdSpec, _| s
            .dq
            .ptr =
            s.dout.ptr),
        rule!("dq over q", Shape, "overlaps", |s: &mut BwdSpec, _| s
            .dq
            .ptr =
            s.q.ptr),
        rule!("dv over v", Shape, "overlaps", |s: &mut BwdSpec, _| s
            .dv
            .ptr =
            s.v.ptr),
        rule!("dk over dq", Shape, "overlaps", |s: &mut BwdSpec, _| s
            .dk
            .ptr =
            s.dq.ptr),
        rule!("dv over dk", Shape, "overlaps", |s: &mut BwdSpec, _| s
            .dv
            .ptr =
            s.dk.ptr),
        rule!("lse inside dq", Shape, "overlaps", |s: &mut BwdSpec, _| s
            .lse
            .ptr =
            s.dq.ptr.wrapping_add(32)),
        rule!("out inside dq", Shape, "overlaps", |s: &mut BwdSpec, _| s
            .out
            .ptr =
            s.dq.ptr),
    ];
    backward_rejects(test, &case, bwd);

    // Packed dqkv: dk moved 8 elements left shares bytes with the end of every dq row.
    let fused = AttnCase::random(
        &mut rng,
        DType::BF16,
        Seqs::padded(2, 5, 5),
        AttentionParams::new(4, 2, 64).causal(true),
        Layout::Fused,
    );
    let bwd = vec![
        rule!(
            "dk into the dq columns",
            Shape,
            "dq output overlaps the dk output",
            |s: &mut BwdSpec, _| s.dk = shifted(s.dk, usize::MAX - 15)
        ),
        rule!(
            "dv into the dk columns",
            Shape,
            "dk output overlaps the dv output",
            |s: &mut BwdSpec, _| s.dv = shifted(s.dv, usize::MAX - 15)
        ),
    ];
    backward_rejects(test, &fused, bwd);
}

#[test]
fn inputs_may_alias() {
    // Inputs may share memory (k and v the same tensor, dout the same as out); outputs
    // interleaved with disjoint columns in one buffer are fine (covered in attention_reference).
    let test = "inputs_may_alias";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    let (out, lse) = forward_outputs(&case);
    for dev in devices(test) {
        let (res, before, after) = case.run_fwd_edited(&dev, |s| s.v = s.k);
        res.unwrap_or_else(|e| panic!("[{}] k = v: {e}", dev.name()));
        let f = case.fwd_outputs(&before, &after).unwrap();
        assert!(f.out.iter().all(|x| x.is_finite()));
        let (res, before, after) = case.run_bwd_edited(&dev, &out, &lse, Ws::Library, |s| {
            s.v = s.k;
            s.dout = s.out;
        });
        res.unwrap_or_else(|e| panic!("[{}] aliased backward inputs: {e}", dev.name()));
        case.bwd_outputs(&before, &after).unwrap();
    }
}

#[test]
fn varlen_offsets_on_the_host() {
    // CPU-only rule: on a host context the offsets' contents are checked before anything is
    // written (CUDA reads them in the kernels, clamped).
    let test = "varlen_offsets_on_the_host";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng); // q [3, 0, 5] (max 5), k [4, 2, 6] (max 6)
    let (out, lse) = forward_outputs(&case);
    let cpu = Device::Cpu(Context::cpu());
    let bad: [(&str, bool, &[i32], &str); 8] = [
        (
            "cu_seqlens_q[0] != 0",
            true,
            &[1, 3, 3, 8],
            "cu_seqlens_q[0]",
        ),
        ("cu_seqlens_q decreasing", true, &[0, 3, 2, 8], "decreases"),
        (
            "cu_seqlens_q[B] != rows of q",
            true,
            &[0, 3, 3, 7],
            "rows of q",
        ),
        (
            "query sequence longer than max_seqlen_q",
            true,
            &[0, 6, 6, 8],
            "max_seqlen_q",
        ),
        ("negative offset", true, &[0, -1, 3, 8], "decreases"),
        (
            "cu_seqlens_k[0] != 0",
            false,
            &[2, 4, 6, 12],
            "cu_seqlens_k[0]",
        ),
        (
            "cu_seqlens_k[B] != rows of k",
            false,
            &[0, 4, 6, 11],
            "rows of k",
        ),
        (
            "key sequence longer than max_seqlen_k",
            false,
            &[0, 7, 8, 12],
            "max_seqlen_k",
        ),
    ];
    for (what, q, cu, mention) in bad {
        let mut fb = case.fwd_bufs();
        fb[if q { fwd_buf::CU_Q } else { fwd_buf::CU_K }] = common::moe::bytes_i32(cu);
        let run = case.run_fwd_with(&cpu, &fb, |_| {});
        assert_rejected(
            &cpu,
            &format!("forward: {what}"),
            ErrorKind::Shape,
            mention,
            run,
        );
        let mut bb = case.bwd_bufs(&out, &lse);
        bb[if q { bwd_buf::CU_Q } else { bwd_buf::CU_K }] = common::moe::bytes_i32(cu);
        let run = case.run_bwd_with(&cpu, &bb, Ws::Library, |_| {});
        assert_rejected(
            &cpu,
            &format!("backward: {what}"),
            ErrorKind::Shape,
            mention,
            run,
        );
    }
}

#[test]
fn workspace_size_query() {
    // The query validates like the backward (same error, nothing written); 0 on the CPU.
    let test = "workspace_size_query";
    let mut rng = Rng::fresh(test);
    let case = base(&mut rng);
    let (out, lse) = forward_outputs(&case);
    for dev in devices(test) {
        let bufs = case.bwd_bufs(&out, &lse);
        let mut size = None;
        let run = run_bufs(
            &dev,
            &bufs,
            |ptrs, loc| case.bwd_spec(ptrs, loc),
            |_, _| Ok(0),
            |s, ctx, _| {
                // SAFETY: views over the case's buffers.
                size = Some(unsafe { s.workspace_size(ctx) }?);
                Ok(())
            },
            Ws::Library,
        );
        run.0
            .unwrap_or_else(|e| panic!("[{}] workspace size: {e}", dev.name()));
        assert!(run.1 == run.2, "[{}] the size query wrote", dev.name());
        let size = size.unwrap();
        if !dev.is_cuda() {
            assert_eq!(size, 0, "the CPU needs no workspace");
        }
        let run = run_bufs(
            &dev,
            &bufs,
            |ptrs, loc| {
                let mut s = case.bwd_spec(ptrs, loc);
                s.dk.ptr = s.dq.ptr;
                s
            },
            |_, _| Ok(0),
            // SAFETY: views over the case's buffers (rejected before access).
            |s, ctx, _| unsafe { s.workspace_size(ctx) }.map(|_| ()),
            Ws::Library,
        );
        assert_rejected(
            &dev,
            "workspace size of an overlapping call",
            ErrorKind::Shape,
            "overlaps",
            run,
        );
        if dev.is_cuda() && size > 0 {
            // A caller workspace one byte short.
            let run = case.run_bwd_with(&dev, &bufs, Ws::Bytes(size - 1), |_| {});
            assert_rejected(
                &dev,
                "workspace one byte short",
                ErrorKind::WorkspaceTooSmall,
                "workspace",
                run,
            );
            // The atomic-dQ mode's f32 accumulator is zeroed and read 16 bytes at a time. Where
            // that mode runs the deterministic kernels (Hopper's wgmma, the default there) it
            // needs no accumulator: the size reported is the deterministic mode's, and a buffer
            // aligned to Delta's 4 bytes is enough.
            let mut atomic = case.clone();
            atomic.params.deterministic = false;
            let mut atomic_size = None;
            let run = run_bufs(
                &dev,
                &bufs,
                |ptrs, loc| atomic.bwd_spec(ptrs, loc),
                |_, _| Ok(0),
                |s, ctx, _| {
                    // SAFETY: views over the case's buffers.
                    atomic_size = Some(unsafe { s.workspace_size(ctx) }?);
                    Ok(())
                },
                Ws::Library,
            );
            run.0.expect("workspace size, deterministic = false");
            let atomic_size = atomic_size.unwrap();
            let run = atomic.run_bwd_with(&dev, &bufs, Ws::Misaligned, |_| {});
            if atomic_size > size {
                assert_rejected(
                    &dev,
                    "misaligned workspace, deterministic = false",
                    ErrorKind::InvalidArgument,
                    "16-byte aligned",
                    run,
                );
            } else {
                assert_eq!(atomic_size, size, "the atomic-dQ mode without accumulator");
                visible(&format!(
                    "{test}: deterministic = false needs no dQ accumulator on this device ({size} bytes, Delta only)"
                ));
                run.0
                    .unwrap_or_else(|e| panic!("4-byte aligned Delta-only workspace: {e}"));
            }
        }
    }
}
