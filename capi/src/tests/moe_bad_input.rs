//! MoE bad input: one test per kind of mistake, on the CPU and on CUDA device 0 when present.
//! Each asserts the error kind AND that every buffer (inputs and poisoned outputs) is bitwise
//! unchanged. The C ABI's own checks (codes, null pointers, dk_last_error) are at the end.

use std::ffi::CStr;

use super::common::moe::*;
use super::common::*;
use crate::context::{dk_context_create, dk_context_destroy, DkContext};
use crate::error::dk_last_error;
use crate::moe::{
    dk_moe_combine, dk_moe_combine_backward, dk_moe_max_rows, dk_moe_permute,
    dk_moe_permute_backward, dk_moe_permute_workspace_size, dk_moe_route,
    dk_moe_route_params_default, dk_moe_route_workspace_size, dk_moe_slot_dot, DkMoeCombineArgs,
    DkMoeCombineBackwardArgs, DkMoePermuteArgs, DkMoePermuteBackwardArgs, DkMoeRouteArgs,
    DkMoeRouteParams, DkMoeSlotDotArgs,
};
use distill_kernels::moe::{Combine, RouteParams, Score, SlotDot, MAX_EXPERTS, MAX_HIDDEN};
use distill_kernels::{
    Context, DType, Error, ErrorKind, Launch, Location, Matrix, MatrixMut, Vector, VectorMut,
};

type Run = (Result<(), Error>, Vec<Bytes>, Vec<Bytes>);

/// Runs `run` on every device and asserts `kind` with every buffer unchanged.
#[track_caller]
fn rejects(test: &str, what: &str, kind: ErrorKind, run: impl Fn(&Device) -> Run) {
    for dev in devices(test) {
        let (res, before, after) = run(&dev);
        assert_kind(res, kind, &format!("[{}] {test}: {what}", dev.name()));
        assert!(
            before == after,
            "[{}] {test}: {what}: a buffer changed on error",
            dev.name()
        );
    }
}

/// As [`rejects`], on the CPU only (checks the CUDA kernels do not make: index contents).
#[track_caller]
fn cpu_rejects(what: &str, kind: ErrorKind, run: impl Fn(&Device) -> Run) {
    let dev = Device::Cpu(distill_kernels::Context::cpu());
    let (res, before, after) = run(&dev);
    assert_kind(res, kind, &format!("[cpu] {what}"));
    assert!(before == after, "[cpu] {what}: a buffer changed on error");
}

/// A location the device's context does not accept.
fn foreign(dev: &Device) -> Location {
    if dev.is_cuda() {
        Location::Host
    } else {
        Location::Cuda(3)
    }
}

/// The base route: bf16 logits, bias, groups, capacity and block padding all in use.
fn route_case(rng: &mut Rng) -> RouteCase {
    let params = RouteParams {
        score: Score::Sigmoid,
        renormalize: true,
        n_groups: 4,
        topk_groups: 2,
        scale: 2.0,
        capacity: Some(12),
        block: 4,
        ..RouteParams::new(4)
    };
    let logits = Logits::new(DType::BF16, 37, 16, &rng.logits(37, 16, 1.0));
    let bias = (0..16).map(|_| rng.range(-0.1, 0.1) as f32).collect();
    RouteCase::new(logits, Some(bias), params)
}

/// The base route's outputs, from the CPU backend.
fn routed(rng: &mut Rng) -> (RouteCase, RouteOut) {
    let case = route_case(rng);
    let (res, _, after) = case.run(&Device::Cpu(distill_kernels::Context::cpu()));
    res.unwrap();
    let out = case.outputs(&after);
    (case, out)
}

fn permute_case(rng: &mut Rng) -> PermuteCase {
    let (_, r) = routed(rng);
    let rows = r.offsets[16] as usize;
    PermuteCase {
        x: random_matrix(rng, DType::BF16, 37, 16, 16),
        k: 4,
        perm: r.perm[..rows].to_vec(),
        weights: Some(r.weights),
        out_stride: 16,
        what: "permute".into(),
    }
}

fn combine_case(rng: &mut Rng) -> CombineCase {
    let (_, r) = routed(rng);
    let rows = r.offsets[16] as usize;
    CombineCase {
        rows: random_matrix(rng, DType::F16, rows, 16, 16),
        n: 37,
        position: r.position,
        weights: Some(r.weights),
        y_stride: 16,
        what: "combine".into(),
    }
}

fn slot_dot_case(rng: &mut Rng) -> SlotDotCase {
    let (_, r) = routed(rng);
    let rows = r.offsets[16] as usize;
    SlotDotCase {
        tokens: random_matrix(rng, DType::F32, 37, 16, 16),
        rows: random_matrix(rng, DType::F32, rows, 16, 16),
        position: r.position,
        what: "slot_dot".into(),
    }
}

#[test]
fn valid_base_cases_run() {
    // The base cases the other tests break are themselves accepted.
    let mut rng = Rng::fresh("valid_base_cases_run");
    for dev in devices("valid_base_cases_run") {
        let r = route_case(&mut rng);
        let (res, before, after) = r.run(&dev);
        res.unwrap();
        r.tails(&before, &after).unwrap();
        let p = permute_case(&mut rng);
        let (res, _, after) = p.run(&dev);
        res.unwrap();
        p.output(&after).unwrap();
        let c = combine_case(&mut rng);
        let (res, _, after) = c.run(&dev);
        res.unwrap();
        c.output(&after).unwrap();
        let d = slot_dot_case(&mut rng);
        let (res, _, after) = d.run(&dev);
        res.unwrap();
        d.output(&after).unwrap();
    }
}

// ---- route ---------------------------------------------------------------------------------

#[test]
fn route_null_pointers() {
    let mut rng = Rng::fresh("route_null_pointers");
    let c = route_case(&mut rng);
    type Edit = fn(&mut RouteSpec);
    let edits: [(&str, Edit); 8] = [
        ("logits", |s| s.logits = s.logits.null()),
        ("bias", |s| s.bias = s.bias.map(Vw::null)),
        ("expert_ids", |s| s.expert_ids = s.expert_ids.null()),
        ("weights", |s| s.weights = s.weights.null()),
        ("counts", |s| s.counts = s.counts.null()),
        ("offsets", |s| s.offsets = s.offsets.null()),
        ("perm", |s| s.perm = s.perm.null()),
        ("position", |s| s.position = s.position.null()),
    ];
    for (what, edit) in edits {
        rejects("route_null_pointers", what, ErrorKind::NullPointer, |d| {
            c.run_edited(d, edit)
        });
    }
}

#[test]
fn route_memory_on_another_device() {
    let mut rng = Rng::fresh("route_memory_on_another_device");
    let c = route_case(&mut rng);
    type Edit = fn(&mut RouteSpec, Location);
    let edits: [(&str, Edit); 8] = [
        ("logits", |s, l| s.logits.loc = l),
        ("bias", |s, l| s.bias.as_mut().unwrap().loc = l),
        ("expert_ids", |s, l| s.expert_ids.loc = l),
        ("weights", |s, l| s.weights.loc = l),
        ("counts", |s, l| s.counts.loc = l),
        ("offsets", |s, l| s.offsets.loc = l),
        ("perm", |s, l| s.perm.loc = l),
        ("position", |s, l| s.position.loc = l),
    ];
    for (what, edit) in edits {
        rejects(
            "route_memory_on_another_device",
            what,
            ErrorKind::WrongDevice,
            |d| {
                let loc = foreign(d);
                c.run_edited(d, |s| edit(s, loc))
            },
        );
    }
}

#[test]
fn route_logits_dtype_f16() {
    let mut rng = Rng::fresh("route_logits_dtype_f16");
    let mut c = route_case(&mut rng);
    c.logits = Logits::new(DType::F16, 37, 16, &c.logits.vals.clone());
    rejects(
        "route_logits_dtype_f16",
        "f16 logits",
        ErrorKind::UnsupportedDtype,
        |d| c.run(d),
    );
}

#[test]
fn route_empty_or_too_many_experts() {
    let mut rng = Rng::fresh("route_empty_or_too_many_experts");
    let c = route_case(&mut rng);
    rejects(
        "route_empty_or_too_many_experts",
        "N = 0",
        ErrorKind::Shape,
        |d| c.run_edited(d, |s| s.logits.rows = 0),
    );
    for e in [0, MAX_EXPERTS + 4] {
        rejects(
            "route_empty_or_too_many_experts",
            &format!("E = {e}"),
            ErrorKind::Shape,
            |d| {
                c.run_edited(d, |s| {
                    s.logits.cols = e;
                    s.logits.stride = e;
                    s.params.n_groups = 1;
                    s.params.topk_groups = 1;
                })
            },
        );
    }
}

#[test]
fn route_stride_smaller_than_e() {
    let mut rng = Rng::fresh("route_stride_smaller_than_e");
    let c = route_case(&mut rng);
    for stride in [0, 15] {
        rejects(
            "route_stride_smaller_than_e",
            &format!("stride {stride}"),
            ErrorKind::Shape,
            |d| c.run_edited(d, |s| s.logits.stride = stride),
        );
    }
}

#[test]
fn route_parameters_out_of_range() {
    let mut rng = Rng::fresh("route_parameters_out_of_range");
    let c = route_case(&mut rng);
    let base = c.params;
    let bad = [
        ("k = 0", RouteParams { k: 0, ..base }),
        ("k = 17 > E", RouteParams { k: 17, ..base }),
        (
            "k = 9 > kept experts (2 groups of 4)",
            RouteParams { k: 9, ..base },
        ),
        (
            "n_groups = 3 does not divide 16",
            RouteParams {
                n_groups: 3,
                ..base
            },
        ),
        (
            "n_groups = 0",
            RouteParams {
                n_groups: 0,
                ..base
            },
        ),
        (
            "n_groups = 16 (1 expert per group)",
            RouteParams {
                n_groups: 16,
                topk_groups: 8,
                ..base
            },
        ),
        (
            "topk_groups = 0",
            RouteParams {
                topk_groups: 0,
                ..base
            },
        ),
        (
            "topk_groups = 5 > n_groups",
            RouteParams {
                topk_groups: 5,
                ..base
            },
        ),
        (
            "scale NaN",
            RouteParams {
                scale: f32::NAN,
                ..base
            },
        ),
        (
            "scale inf",
            RouteParams {
                scale: f32::INFINITY,
                ..base
            },
        ),
        (
            "capacity 0",
            RouteParams {
                capacity: Some(0),
                ..base
            },
        ),
        ("block 0", RouteParams { block: 0, ..base }),
    ];
    for (what, p) in bad {
        rejects(
            "route_parameters_out_of_range",
            what,
            ErrorKind::InvalidArgument,
            |d| c.run_edited(d, |s| s.params = p),
        );
    }
    // k above 32 with enough experts.
    let mut wide = c.clone();
    wide.logits = Logits::new(DType::F32, 2, 64, &rng.logits(2, 64, 1.0));
    wide.bias = None;
    wide.params = RouteParams::new(33);
    wide.perm_rows = 66;
    rejects(
        "route_parameters_out_of_range",
        "k = 33",
        ErrorKind::InvalidArgument,
        |d| wide.run_edited(d, |s| s.params.k = 33),
    );
}

#[test]
fn route_output_lengths() {
    let mut rng = Rng::fresh("route_output_lengths");
    let c = route_case(&mut rng);
    let s = c.slots();
    type Edit = fn(&mut RouteSpec, usize);
    let edits: [(&str, Edit, usize); 11] = [
        ("expert_ids N·k - 1", |sp, s| sp.expert_ids.len = s - 1, s),
        ("expert_ids N·k + 1", |sp, s| sp.expert_ids.len = s + 1, s),
        ("weights N·k - 1", |sp, s| sp.weights.len = s - 1, s),
        ("position N·k + 1", |sp, s| sp.position.len = s + 1, s),
        ("counts E - 1", |sp, _| sp.counts.len = 15, s),
        ("counts E + 1", |sp, _| sp.counts.len = 17, s),
        ("offsets E", |sp, _| sp.offsets.len = 16, s),
        ("offsets E + 2", |sp, _| sp.offsets.len = 18, s),
        ("bias E - 1", |sp, _| sp.bias.as_mut().unwrap().len = 15, s),
        ("perm max_rows - 1", |sp, _| sp.perm.len -= 1, c.perm_rows),
        ("perm empty", |sp, _| sp.perm.len = 0, s),
    ];
    for (what, edit, arg) in edits {
        rejects("route_output_lengths", what, ErrorKind::Shape, |d| {
            c.run_edited(d, |sp| edit(sp, arg))
        });
    }
}

#[test]
fn route_indices_beyond_int32() {
    // Nothing is read: the shapes alone are refused.
    let mut rng = Rng::fresh("route_indices_beyond_int32");
    let c = route_case(&mut rng);
    rejects(
        "route_indices_beyond_int32",
        "N·k > 2^31 - 1",
        ErrorKind::Shape,
        |d| {
            c.run_edited(d, |s| {
                s.logits.rows = 1 << 29;
                let slots = (1usize << 29) * 4;
                s.expert_ids.len = slots;
                s.weights.len = slots;
                s.position.len = slots;
                s.perm.len = slots;
            })
        },
    );
    rejects(
        "route_indices_beyond_int32",
        "E·(block - 1) > 2^31 - 1",
        ErrorKind::Shape,
        |d| {
            c.run_edited(d, |s| {
                s.params.block = 1 << 28;
                s.perm.len = usize::MAX / 2;
            })
        },
    );
}

#[test]
fn route_misaligned_pointers() {
    let mut rng = Rng::fresh("route_misaligned_pointers");
    let c = route_case(&mut rng);
    type Edit = fn(&mut RouteSpec);
    let edits: [(&str, Edit); 5] = [
        ("bf16 logits + 1 byte", |s| {
            s.logits.ptr = s.logits.ptr.wrapping_add(1)
        }),
        ("bias + 2 bytes", |s| s.bias = s.bias.map(|b| b.shifted(2))),
        ("expert_ids + 1 byte", |s| {
            s.expert_ids = s.expert_ids.shifted(1)
        }),
        ("weights + 2 bytes", |s| s.weights = s.weights.shifted(2)),
        ("perm + 3 bytes", |s| s.perm = s.perm.shifted(3)),
    ];
    for (what, edit) in edits {
        rejects(
            "route_misaligned_pointers",
            what,
            ErrorKind::InvalidArgument,
            |d| c.run_edited(d, edit),
        );
    }
}

#[test]
fn route_overlapping_buffers() {
    let mut rng = Rng::fresh("route_overlapping_buffers");
    let c = route_case(&mut rng);
    type Edit = fn(&mut RouteSpec);
    let edits: [(&str, Edit); 4] = [
        ("expert_ids over the logits", |s| {
            s.expert_ids.ptr = s.logits.ptr.wrapping_add(8)
        }),
        ("weights over the bias", |s| {
            s.weights.ptr = s.bias.unwrap().ptr
        }),
        ("position == perm", |s| s.position.ptr = s.perm.ptr),
        ("offsets inside counts", |s| {
            s.offsets.ptr = s.counts.ptr.wrapping_add(4)
        }),
    ];
    for (what, edit) in edits {
        rejects("route_overlapping_buffers", what, ErrorKind::Shape, |d| {
            c.run_edited(d, edit)
        });
    }
}

// ---- permute -------------------------------------------------------------------------------

#[test]
fn permute_null_pointers_and_devices() {
    let mut rng = Rng::fresh("permute_null_pointers_and_devices");
    let c = permute_case(&mut rng);
    type Edit = fn(&mut PermuteSpec);
    let nulls: [(&str, Edit); 4] = [
        ("x", |s| s.x = s.x.null()),
        ("perm", |s| s.perm = s.perm.null()),
        ("weights", |s| s.weights = s.weights.map(Vw::null)),
        ("out", |s| s.out = s.out.null()),
    ];
    for (what, edit) in nulls {
        rejects(
            "permute_null_pointers_and_devices",
            what,
            ErrorKind::NullPointer,
            |d| c.run_edited(d, edit),
        );
    }
    type LocEdit = fn(&mut PermuteSpec, Location);
    let locs: [(&str, LocEdit); 4] = [
        ("x", |s, l| s.x.loc = l),
        ("perm", |s, l| s.perm.loc = l),
        ("weights", |s, l| s.weights.as_mut().unwrap().loc = l),
        ("out", |s, l| s.out.loc = l),
    ];
    for (what, edit) in locs {
        rejects(
            "permute_null_pointers_and_devices",
            what,
            ErrorKind::WrongDevice,
            |d| {
                let loc = foreign(d);
                c.run_edited(d, |s| edit(s, loc))
            },
        );
    }
}

#[test]
fn permute_shapes() {
    let mut rng = Rng::fresh("permute_shapes");
    let c = permute_case(&mut rng);
    type Edit = fn(&mut PermuteSpec);
    let edits: [(&str, Edit); 11] = [
        ("x stride wrapping the span", |s| {
            s.x.stride = usize::MAX / 2
        }),
        ("out stride past isize::MAX bytes", |s| {
            s.out.stride = isize::MAX as usize / 2
        }),
        ("H = 12 (not a multiple of 8)", |s| {
            s.x.cols = 12;
            s.out.cols = 12;
        }),
        ("H = 0", |s| {
            s.x.cols = 0;
            s.out.cols = 0;
        }),
        ("H = MAX_HIDDEN + 8", |s| {
            let h = MAX_HIDDEN + 8;
            s.x.cols = h;
            s.x.stride = h;
            s.out.cols = h;
            s.out.stride = h;
        }),
        ("x stride < H", |s| s.x.stride = 8),
        ("out stride < H", |s| s.out.stride = 15),
        ("out rows != perm entries", |s| s.out.rows -= 1),
        ("out cols != H", |s| s.out.cols = 8),
        ("weights length N·k - 1", |s| {
            s.weights.as_mut().unwrap().len -= 1
        }),
        ("N·k > 2^31 - 1", |s| {
            s.x.rows = 1 << 29;
            s.weights = None;
        }),
    ];
    for (what, edit) in edits {
        rejects("permute_shapes", what, ErrorKind::Shape, |d| {
            c.run_edited(d, edit)
        });
    }
}

#[test]
fn permute_k_out_of_range() {
    let mut rng = Rng::fresh("permute_k_out_of_range");
    let c = permute_case(&mut rng);
    for k in [0, 33] {
        rejects(
            "permute_k_out_of_range",
            &format!("k = {k}"),
            ErrorKind::InvalidArgument,
            |d| {
                c.run_edited(d, |s| {
                    s.k = k;
                    s.weights = None;
                })
            },
        );
    }
}

#[test]
fn permute_dtype_misalignment_overlap() {
    let mut rng = Rng::fresh("permute_dtype_misalignment_overlap");
    let c = permute_case(&mut rng);
    rejects(
        "permute_dtype_misalignment_overlap",
        "out f32 for bf16 x",
        ErrorKind::UnsupportedDtype,
        |d| c.run_edited(d, |s| s.out.dtype = DType::F32),
    );
    rejects(
        "permute_dtype_misalignment_overlap",
        "x + 1 byte",
        ErrorKind::InvalidArgument,
        |d| c.run_edited(d, |s| s.x.ptr = s.x.ptr.wrapping_add(1)),
    );
    rejects(
        "permute_dtype_misalignment_overlap",
        "weights + 2 bytes",
        ErrorKind::InvalidArgument,
        |d| c.run_edited(d, |s| s.weights = s.weights.map(|w| w.shifted(2))),
    );
    rejects(
        "permute_dtype_misalignment_overlap",
        "out == x",
        ErrorKind::Shape,
        |d| c.run_edited(d, |s| s.out.ptr = s.x.ptr),
    );
    rejects(
        "permute_dtype_misalignment_overlap",
        "out over perm",
        ErrorKind::Shape,
        |d| c.run_edited(d, |s| s.out.ptr = s.perm.ptr),
    );
}

#[test]
fn activation_rows_not_16_byte_aligned() {
    // Element-aligned but not 16-byte aligned row starts (pointer or stride): refused on every
    // backend (the CUDA kernels move 16 bytes at a time).
    let mut rng = Rng::fresh("activation_rows_not_16_byte_aligned");
    let p = permute_case(&mut rng);
    let test = "activation_rows_not_16_byte_aligned";
    rejects(
        test,
        "permute x + 1 element",
        ErrorKind::InvalidArgument,
        |d| p.run_edited(d, |s| s.x.ptr = s.x.ptr.wrapping_add(2)),
    );
    rejects(
        test,
        "permute out + 4 elements",
        ErrorKind::InvalidArgument,
        |d| p.run_edited(d, |s| s.out.ptr = s.out.ptr.wrapping_add(8)),
    );
    rejects(
        test,
        "permute x stride H + 1",
        ErrorKind::InvalidArgument,
        |d| p.run_edited(d, |s| s.x.stride = 17),
    );
    rejects(
        test,
        "permute out stride H + 4",
        ErrorKind::InvalidArgument,
        |d| p.run_edited(d, |s| s.out.stride = 20),
    );
    let c = combine_case(&mut rng);
    rejects(
        test,
        "combine rows + 1 element",
        ErrorKind::InvalidArgument,
        |d| c.run_edited(d, |s| s.rows.ptr = s.rows.ptr.wrapping_add(2)),
    );
    rejects(
        test,
        "combine y stride H + 2",
        ErrorKind::InvalidArgument,
        |d| c.run_edited(d, |s| s.y.stride = 18),
    );
    let t = slot_dot_case(&mut rng);
    rejects(
        test,
        "slot_dot tokens + 2 elements",
        ErrorKind::InvalidArgument,
        |d| t.run_edited(d, |s| s.tokens.ptr = s.tokens.ptr.wrapping_add(8)),
    );
    rejects(
        test,
        "slot_dot rows stride H + 1",
        ErrorKind::InvalidArgument,
        |d| t.run_edited(d, |s| s.rows.stride = 17),
    );
}

#[test]
fn permute_indices_out_of_range_on_cpu() {
    let mut rng = Rng::fresh("permute_indices_out_of_range_on_cpu");
    for bad in [-2, 37 * 4, i32::MAX] {
        let mut c = permute_case(&mut rng);
        let last = c.perm.len() - 1;
        c.perm[last] = bad;
        cpu_rejects(
            &format!("perm entry {bad}"),
            ErrorKind::InvalidArgument,
            |d| c.run(d),
        );
    }
}

// ---- combine -------------------------------------------------------------------------------

#[test]
fn combine_null_pointers_and_devices() {
    let mut rng = Rng::fresh("combine_null_pointers_and_devices");
    let c = combine_case(&mut rng);
    type Edit = fn(&mut CombineSpec);
    let nulls: [(&str, Edit); 4] = [
        ("rows", |s| s.rows = s.rows.null()),
        ("position", |s| s.position = s.position.null()),
        ("weights", |s| s.weights = s.weights.map(Vw::null)),
        ("y", |s| s.y = s.y.null()),
    ];
    for (what, edit) in nulls {
        rejects(
            "combine_null_pointers_and_devices",
            what,
            ErrorKind::NullPointer,
            |d| c.run_edited(d, edit),
        );
    }
    type LocEdit = fn(&mut CombineSpec, Location);
    let locs: [(&str, LocEdit); 4] = [
        ("rows", |s, l| s.rows.loc = l),
        ("position", |s, l| s.position.loc = l),
        ("weights", |s, l| s.weights.as_mut().unwrap().loc = l),
        ("y", |s, l| s.y.loc = l),
    ];
    for (what, edit) in locs {
        rejects(
            "combine_null_pointers_and_devices",
            what,
            ErrorKind::WrongDevice,
            |d| {
                let loc = foreign(d);
                c.run_edited(d, |s| edit(s, loc))
            },
        );
    }
}

#[test]
fn combine_shapes() {
    let mut rng = Rng::fresh("combine_shapes");
    let c = combine_case(&mut rng);
    type Edit = fn(&mut CombineSpec);
    let edits: [(&str, Edit); 8] = [
        ("position length not a multiple of N", |s| {
            s.position.len -= 1
        }),
        ("position empty", |s| s.position.len = 0),
        ("H = 20", |s| {
            s.rows.cols = 20;
            s.rows.stride = 20;
            s.y.cols = 20;
            s.y.stride = 20;
        }),
        ("y cols != H", |s| s.y.cols = 8),
        ("rows stride < H", |s| s.rows.stride = 9),
        ("y stride < H", |s| s.y.stride = 0),
        ("weights length N·k + 1", |s| {
            s.weights.as_mut().unwrap().len += 1
        }),
        ("no rows", |s| s.rows.rows = 0),
    ];
    for (what, edit) in edits {
        rejects("combine_shapes", what, ErrorKind::Shape, |d| {
            c.run_edited(d, edit)
        });
    }
    // k = 33 slots per token (one token): out of range.
    rejects(
        "combine_shapes",
        "k = 33",
        ErrorKind::InvalidArgument,
        |d| {
            c.run_edited(d, |s| {
                s.y.rows = 1;
                s.k = 33;
                s.position.len = 33;
                s.weights = None;
            })
        },
    );
}

#[test]
fn combine_dtype_misalignment_overlap() {
    let mut rng = Rng::fresh("combine_dtype_misalignment_overlap");
    let c = combine_case(&mut rng);
    rejects(
        "combine_dtype_misalignment_overlap",
        "y bf16 for f16 rows",
        ErrorKind::UnsupportedDtype,
        |d| c.run_edited(d, |s| s.y.dtype = DType::BF16),
    );
    rejects(
        "combine_dtype_misalignment_overlap",
        "rows + 1 byte",
        ErrorKind::InvalidArgument,
        |d| c.run_edited(d, |s| s.rows.ptr = s.rows.ptr.wrapping_add(1)),
    );
    rejects(
        "combine_dtype_misalignment_overlap",
        "position + 2 bytes",
        ErrorKind::InvalidArgument,
        |d| c.run_edited(d, |s| s.position = s.position.shifted(2)),
    );
    rejects(
        "combine_dtype_misalignment_overlap",
        "y over rows",
        ErrorKind::Shape,
        |d| c.run_edited(d, |s| s.y.ptr = s.rows.ptr.wrapping_add(32)),
    );
    rejects(
        "combine_dtype_misalignment_overlap",
        "y over weights",
        ErrorKind::Shape,
        |d| c.run_edited(d, |s| s.y.ptr = s.weights.unwrap().ptr),
    );
}

#[test]
fn combine_indices_out_of_range_on_cpu() {
    let mut rng = Rng::fresh("combine_indices_out_of_range_on_cpu");
    for bad in [-7, 100_000] {
        let mut c = combine_case(&mut rng);
        c.position[5] = bad;
        cpu_rejects(
            &format!("position entry {bad}"),
            ErrorKind::InvalidArgument,
            |d| c.run(d),
        );
    }
}

// ---- slot dot ------------------------------------------------------------------------------

#[test]
fn slot_dot_null_pointers_and_devices() {
    let mut rng = Rng::fresh("slot_dot_null_pointers_and_devices");
    let c = slot_dot_case(&mut rng);
    type Edit = fn(&mut SlotDotSpec);
    let nulls: [(&str, Edit); 4] = [
        ("tokens", |s| s.tokens = s.tokens.null()),
        ("rows", |s| s.rows = s.rows.null()),
        ("position", |s| s.position = s.position.null()),
        ("out", |s| s.out = s.out.null()),
    ];
    for (what, edit) in nulls {
        rejects(
            "slot_dot_null_pointers_and_devices",
            what,
            ErrorKind::NullPointer,
            |d| c.run_edited(d, edit),
        );
    }
    type LocEdit = fn(&mut SlotDotSpec, Location);
    let locs: [(&str, LocEdit); 4] = [
        ("tokens", |s, l| s.tokens.loc = l),
        ("rows", |s, l| s.rows.loc = l),
        ("position", |s, l| s.position.loc = l),
        ("out", |s, l| s.out.loc = l),
    ];
    for (what, edit) in locs {
        rejects(
            "slot_dot_null_pointers_and_devices",
            what,
            ErrorKind::WrongDevice,
            |d| {
                let loc = foreign(d);
                c.run_edited(d, |s| edit(s, loc))
            },
        );
    }
}

#[test]
fn slot_dot_shapes_dtypes_overlap() {
    let mut rng = Rng::fresh("slot_dot_shapes_dtypes_overlap");
    let c = slot_dot_case(&mut rng);
    type Edit = fn(&mut SlotDotSpec);
    let shapes: [(&str, Edit); 6] = [
        ("rows H != tokens H", |s| s.rows.cols = 8),
        ("H = 4", |s| {
            s.tokens.cols = 4;
            s.rows.cols = 4;
        }),
        ("out length N·k - 1", |s| s.out.len -= 1),
        ("position length not a multiple of N", |s| {
            s.position.len += 1;
            s.out.len += 1;
        }),
        ("tokens stride < H", |s| s.tokens.stride = 8),
        ("out over position", |s| s.out.ptr = s.position.ptr),
    ];
    for (what, edit) in shapes {
        rejects(
            "slot_dot_shapes_dtypes_overlap",
            what,
            ErrorKind::Shape,
            |d| c.run_edited(d, edit),
        );
    }
    rejects(
        "slot_dot_shapes_dtypes_overlap",
        "rows bf16, tokens f32",
        ErrorKind::UnsupportedDtype,
        |d| c.run_edited(d, |s| s.rows.dtype = DType::BF16),
    );
    rejects(
        "slot_dot_shapes_dtypes_overlap",
        "out + 1 byte",
        ErrorKind::InvalidArgument,
        |d| c.run_edited(d, |s| s.out = s.out.shifted(1)),
    );
}

#[test]
fn slot_dot_indices_out_of_range_on_cpu() {
    let mut rng = Rng::fresh("slot_dot_indices_out_of_range_on_cpu");
    let mut c = slot_dot_case(&mut rng);
    c.position[0] = c.rows.rows as i32;
    cpu_rejects("position entry = rows", ErrorKind::InvalidArgument, |d| {
        c.run(d)
    });
}

// ---- C ABI ---------------------------------------------------------------------------------

fn last_error() -> String {
    // SAFETY: dk_last_error returns a valid NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(dk_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A bad call: what it is, the status it must get, and the edit of valid arguments that makes it.
type ErrorCase<'a, A> = (&'a str, i32, fn(&mut A));

/// A CPU context and valid host buffers for every MoE call (n = 6, e = 8, k = 2, h = 8): `x`
/// holds token rows, `xp` permuted rows (R = 12); `out` and `dots` are the poisoned outputs.
struct CMoe {
    ctx: *mut DkContext,
    logits: Vec<f32>,
    ids: Vec<i32>,
    weights: Vec<f32>,
    counts: Vec<i32>,
    offsets: Vec<i32>,
    perm: Vec<i32>,
    position: Vec<i32>,
    x: Vec<f32>,
    xp: Vec<f32>,
    out: Vec<f32>,
    dots: Vec<f32>,
}

impl CMoe {
    fn new(rng: &mut Rng) -> Self {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { dk_context_create(-1, &mut ctx) }, 0);
        CMoe {
            ctx,
            logits: rng.logits(6, 8, 1.0).iter().map(|&x| x as f32).collect(),
            ids: vec![POISON_I32; 12],
            weights: vec![poison_f32(); 12],
            counts: vec![POISON_I32; 8],
            offsets: vec![POISON_I32; 9],
            perm: vec![POISON_I32; 12],
            position: vec![POISON_I32; 12],
            x: (0..48).map(|i| i as f32 * 0.25).collect(),
            xp: (0..96).map(|i| (i % 13) as f32 * 0.375 - 2.0).collect(),
            out: vec![poison_f32(); 12 * 8],
            dots: vec![poison_f32(); 12],
        }
    }

    fn route_args(&mut self) -> DkMoeRouteArgs {
        DkMoeRouteArgs {
            n: 6,
            e: 8,
            logits: self.logits.as_ptr().cast(),
            logits_dtype: 0,
            logits_stride: 8,
            bias: std::ptr::null(),
            expert_ids: self.ids.as_mut_ptr(),
            weights: self.weights.as_mut_ptr(),
            counts: self.counts.as_mut_ptr(),
            offsets: self.offsets.as_mut_ptr(),
            perm: self.perm.as_mut_ptr(),
            perm_rows: 12,
            position: self.position.as_mut_ptr(),
        }
    }

    fn params() -> DkMoeRouteParams {
        DkMoeRouteParams {
            k: 2,
            ..dk_moe_route_params_default()
        }
    }

    fn route_untouched(&self) -> bool {
        [
            &self.ids,
            &self.counts,
            &self.offsets,
            &self.perm,
            &self.position,
        ]
        .iter()
        .all(|v| v.iter().all(|&x| x == POISON_I32))
            && self.weights.iter().all(|x| x.to_bits() == POISON_F32)
    }

    fn outs_untouched(&self) -> bool {
        self.out.iter().all(|x| x.to_bits() == POISON_F32)
            && self.dots.iter().all(|x| x.to_bits() == POISON_F32)
    }

    /// Poisons `out` and `dots` again (after a valid call wrote them).
    fn repoison(&mut self) {
        self.out.fill(poison_f32());
        self.dots.fill(poison_f32());
    }

    /// Runs `call` on `base` edited by each case: the status is the case's, with a message, and
    /// neither the outputs nor the activations (`x`, `xp`: inputs an overlapping output would
    /// write) changed.
    fn expect_errors<A: Copy>(
        &self,
        op: &str,
        base: A,
        cases: &[ErrorCase<A>],
        call: impl Fn(&A) -> i32,
    ) {
        let inputs = (self.x.clone(), self.xp.clone());
        for (what, code, edit) in cases {
            let mut a = base;
            edit(&mut a);
            let s = call(&a);
            assert_eq!(s, *code, "{op} {what}: status {s}, {:?}", last_error());
            assert!(!last_error().is_empty(), "{op} {what}: empty dk_last_error");
            assert!(self.outs_untouched(), "{op} {what}: outputs written");
            assert!(
                (&self.x, &self.xp) == (&inputs.0, &inputs.1),
                "{op} {what}: inputs written"
            );
        }
    }

    fn route(&mut self, edit: impl FnOnce(&mut DkMoeRouteArgs, &mut DkMoeRouteParams)) -> i32 {
        let mut a = self.route_args();
        let mut p = Self::params();
        edit(&mut a, &mut p);
        // SAFETY: every pointer in `a` points into this struct's live buffers (or is null).
        unsafe {
            dk_moe_route(
                self.ctx,
                &a,
                &p,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
            )
        }
    }

    /// Routes validly (perm and position then hold real values) and resets the other outputs.
    fn routed(rng: &mut Rng) -> Self {
        let mut c = CMoe::new(rng);
        assert_eq!(c.route(|_, _| {}), 0, "{}", last_error());
        c
    }

    fn permute_args(&mut self) -> DkMoePermuteArgs {
        DkMoePermuteArgs {
            n: 6,
            h: 8,
            k: 2,
            rows: 12,
            dtype: 0,
            x: self.x.as_ptr().cast(),
            x_stride: 8,
            perm: self.perm.as_ptr(),
            weights: self.weights.as_ptr(),
            out: self.out.as_mut_ptr().cast(),
            out_stride: 8,
        }
    }

    fn combine_args(&mut self) -> DkMoeCombineArgs {
        DkMoeCombineArgs {
            n: 6,
            h: 8,
            k: 2,
            rows: 6,
            dtype: 0,
            rows_in: self.x.as_ptr().cast(),
            rows_stride: 8,
            position: self.position.as_ptr(),
            weights: self.weights.as_ptr(),
            y: self.out.as_mut_ptr().cast(),
            y_stride: 8,
        }
    }

    /// grad_xp = `xp` (R = 12 rows), scaled forward, with the weights' gradient.
    fn permute_backward_args(&mut self) -> DkMoePermuteBackwardArgs {
        DkMoePermuteBackwardArgs {
            n: 6,
            h: 8,
            k: 2,
            rows: 12,
            dtype: 0,
            grad_xp: self.xp.as_ptr().cast(),
            grad_xp_stride: 8,
            position: self.position.as_ptr(),
            weights: self.weights.as_ptr(),
            x: self.x.as_ptr().cast(),
            x_stride: 8,
            grad_x: self.out.as_mut_ptr().cast(),
            grad_x_stride: 8,
            grad_weights: self.dots.as_mut_ptr(),
        }
    }

    /// grad_y = `x`, expert_out = `xp` (R = 12 rows), weighted, with the weights' gradient.
    fn combine_backward_args(&mut self) -> DkMoeCombineBackwardArgs {
        DkMoeCombineBackwardArgs {
            n: 6,
            h: 8,
            k: 2,
            rows: 12,
            dtype: 0,
            grad_y: self.x.as_ptr().cast(),
            grad_y_stride: 8,
            expert_out: self.xp.as_ptr().cast(),
            expert_out_stride: 8,
            perm: self.perm.as_ptr(),
            position: self.position.as_ptr(),
            weights: self.weights.as_ptr(),
            grad_expert_out: self.out.as_mut_ptr().cast(),
            grad_expert_out_stride: 8,
            grad_weights: self.dots.as_mut_ptr(),
        }
    }

    fn slot_dot_args(&mut self) -> DkMoeSlotDotArgs {
        DkMoeSlotDotArgs {
            n: 6,
            h: 8,
            k: 2,
            rows: 6,
            dtype: 0,
            tokens: self.x.as_ptr().cast(),
            tokens_stride: 8,
            rows_in: self.x.as_ptr().cast(),
            rows_stride: 8,
            position: self.position.as_ptr(),
            out: self.dots.as_mut_ptr(),
        }
    }
}

impl Drop for CMoe {
    fn drop(&mut self) {
        // SAFETY: created by dk_context_create, destroyed once.
        unsafe { dk_context_destroy(self.ctx) };
    }
}

#[test]
fn c_abi_route_errors() {
    let mut rng = Rng::fresh("c_abi_route_errors");
    let mut c = CMoe::new(&mut rng);
    type Edit = fn(&mut DkMoeRouteArgs, &mut DkMoeRouteParams);
    let cases: [(&str, i32, Edit); 18] = [
        ("null logits", 1, |a, _| a.logits = std::ptr::null()),
        ("null perm", 1, |a, _| a.perm = std::ptr::null_mut()),
        ("score 2", 2, |_, p| p.score = 2),
        ("renormalize 2", 2, |_, p| p.renormalize = 2),
        ("capacity -1", 2, |_, p| p.capacity = -1),
        ("k 0", 2, |_, p| p.k = 0),
        ("k -3", 2, |_, p| p.k = -3),
        ("n_groups 0", 2, |_, p| p.n_groups = 0),
        ("topk_groups -1", 2, |_, p| p.topk_groups = -1),
        ("block 0", 2, |_, p| p.block = 0),
        ("scale NaN", 2, |_, p| p.scale = f32::NAN),
        ("n -1", 3, |a, _| a.n = -1),
        ("e -8", 3, |a, _| a.e = -8),
        ("logits stride 7", 3, |a, _| a.logits_stride = 7),
        ("perm_rows 11", 3, |a, _| a.perm_rows = 11),
        ("perm_rows -1", 3, |a, _| a.perm_rows = -1),
        ("f16 logits", 4, |a, _| a.logits_dtype = 2),
        ("dtype 9", 4, |a, _| a.logits_dtype = 9),
    ];
    for (what, code, edit) in cases {
        let s = c.route(edit);
        assert_eq!(s, code, "{what}: status {s}, message {:?}", last_error());
        assert!(!last_error().is_empty(), "{what}: empty dk_last_error");
        assert!(c.route_untouched(), "{what}: outputs were written");
        if matches!(what, "f16 logits" | "dtype 9") {
            // Both name what router logits take (f16 is a dtype, but not one of theirs).
            assert!(
                last_error().contains("is not f32 (0) or bf16 (1)"),
                "{what}: {}",
                last_error()
            );
        }
    }
    // Null ctx / args / params.
    let a = c.route_args();
    let p = CMoe::params();
    let null = std::ptr::null_mut();
    // SAFETY: null handles are rejected before any access.
    unsafe {
        assert_eq!(dk_moe_route(std::ptr::null(), &a, &p, null, 0, null), 1);
        assert!(last_error().contains("context"), "{}", last_error());
        assert_eq!(dk_moe_route(c.ctx, std::ptr::null(), &p, null, 0, null), 1);
        assert_eq!(dk_moe_route(c.ctx, &a, std::ptr::null(), null, 0, null), 1);
    }
    assert!(c.route_untouched());
    // A valid call then succeeds and clears the message.
    assert_eq!(c.route(|_, _| {}), 0, "{}", last_error());
    assert_eq!(last_error(), "");
    assert!(c.position.iter().all(|&p| (0..12).contains(&p)));
}

#[test]
fn c_abi_permute_combine_slot_dot_errors() {
    let mut rng = Rng::fresh("c_abi_permute_combine_slot_dot_errors");
    let mut c = CMoe::routed(&mut rng);
    let null = std::ptr::null_mut();
    type PEdit = fn(&mut DkMoePermuteArgs);
    let permute: [(&str, i32, PEdit); 8] = [
        ("null x", 1, |a| a.x = std::ptr::null()),
        ("null out", 1, |a| a.out = std::ptr::null_mut()),
        ("k 0", 2, |a| a.k = 0),
        ("k -1", 2, |a| a.k = -1),
        ("h 12", 3, |a| a.h = 12),
        ("rows -1", 3, |a| a.rows = -1),
        ("n·k overflow", 3, |a| {
            a.n = i64::MAX / 2;
            a.weights = std::ptr::null();
        }),
        ("dtype 3", 4, |a| a.dtype = 3),
    ];
    let base = c.permute_args();
    // SAFETY: pointers into `c`'s live buffers (or null / claims rejected before access).
    c.expect_errors("permute", base, &permute, |a| unsafe {
        dk_moe_permute(c.ctx, a, null, 0, null)
    });
    type CEdit = fn(&mut DkMoeCombineArgs);
    let combine: [(&str, i32, CEdit); 6] = [
        // (n = 0 is an empty batch, tests/empty_batch.rs)
        ("null rows_in", 1, |a| a.rows_in = std::ptr::null()),
        ("null position", 1, |a| a.position = std::ptr::null()),
        ("k 33", 2, |a| {
            a.k = 33;
            a.n = 1;
            a.weights = std::ptr::null();
        }),
        ("y_stride 4", 3, |a| a.y_stride = 4),
        ("rows 0 for n tokens", 3, |a| a.rows = 0),
        ("dtype -1", 4, |a| a.dtype = -1),
    ];
    let base = c.combine_args();
    // SAFETY: as above.
    c.expect_errors("combine", base, &combine, |a| unsafe {
        dk_moe_combine(c.ctx, a, null)
    });
    type DEdit = fn(&mut DkMoeSlotDotArgs);
    let dots: [(&str, i32, DEdit); 5] = [
        ("null out", 1, |a| a.out = std::ptr::null_mut()),
        ("null tokens", 1, |a| a.tokens = std::ptr::null()),
        ("k 0", 2, |a| a.k = 0),
        ("rows_stride -8", 3, |a| a.rows_stride = -8),
        ("dtype 7", 4, |a| a.dtype = 7),
    ];
    let base = c.slot_dot_args();
    // SAFETY: as above.
    c.expect_errors("slot_dot", base, &dots, |a| unsafe {
        dk_moe_slot_dot(c.ctx, a, null)
    });
    // Null ctx / args.
    let (pa, ca, da) = (c.permute_args(), c.combine_args(), c.slot_dot_args());
    // SAFETY: null handles are rejected before any access.
    unsafe {
        assert_eq!(dk_moe_permute(std::ptr::null(), &pa, null, 0, null), 1);
        assert_eq!(dk_moe_permute(c.ctx, std::ptr::null(), null, 0, null), 1);
        assert_eq!(dk_moe_combine(std::ptr::null(), &ca, null), 1);
        assert_eq!(dk_moe_combine(c.ctx, std::ptr::null(), null), 1);
        assert_eq!(dk_moe_slot_dot(std::ptr::null(), &da, null), 1);
        assert_eq!(dk_moe_slot_dot(c.ctx, std::ptr::null(), null), 1);
    }
    assert!(c.outs_untouched());
    // Valid calls succeed.
    let (mut pa, mut da) = (c.permute_args(), c.slot_dot_args());
    // SAFETY: pointers into `c`'s live buffers.
    unsafe {
        pa.weights = std::ptr::null();
        assert_eq!(
            dk_moe_permute(c.ctx, &pa, null, 0, null),
            0,
            "{}",
            last_error()
        );
        da.rows_in = pa.out.cast_const();
        da.rows = 12;
        assert_eq!(dk_moe_slot_dot(c.ctx, &da, null), 0, "{}", last_error());
    }
    assert_eq!(last_error(), "");
    // Each token's slot dots with its own gathered row are its squared norm.
    for t in 0..6 {
        let norm2: f32 = c.x[t * 8..(t + 1) * 8].iter().map(|v| v * v).sum();
        for j in 0..2 {
            assert_eq!(c.dots[t * 2 + j], norm2, "token {t}, slot {j}");
        }
    }
}

/// The two backward calls refuse what the primitives they stand for refuse, and what is theirs
/// alone: the weights' gradient without its operand or the operand without it, outputs over
/// each other or over an input. Nothing is written; the valid calls then give the primitives'
/// results bit for bit.
#[test]
fn c_abi_permute_backward_errors() {
    let mut rng = Rng::fresh("c_abi_permute_backward_errors");
    let mut c = CMoe::routed(&mut rng);
    let null = std::ptr::null_mut();
    type Edit = fn(&mut DkMoePermuteBackwardArgs);
    let cases: [(&str, i32, Edit); 17] = [
        ("null grad_xp", 1, |a| a.grad_xp = std::ptr::null()),
        ("null position", 1, |a| a.position = std::ptr::null()),
        ("null grad_x", 1, |a| a.grad_x = std::ptr::null_mut()),
        ("x without grad_weights", 2, |a| {
            a.grad_weights = std::ptr::null_mut()
        }),
        ("grad_weights without x", 2, |a| a.x = std::ptr::null()),
        ("k 0", 2, |a| a.k = 0),
        ("k 33", 2, |a| {
            a.k = 33;
            a.n = 1;
            a.weights = std::ptr::null();
        }),
        ("grad_xp + 4 bytes (rows not 16-byte aligned)", 2, |a| {
            a.grad_xp = a.grad_xp.wrapping_byte_add(4)
        }),
        ("h 12", 3, |a| a.h = 12),
        ("rows -1", 3, |a| a.rows = -1),
        ("rows 0 for n tokens", 3, |a| a.rows = 0),
        ("grad_x_stride 4", 3, |a| a.grad_x_stride = 4),
        ("x_stride -8", 3, |a| a.x_stride = -8),
        ("grad_x over grad_xp", 3, |a| {
            a.grad_x = a.grad_xp.cast_mut()
        }),
        ("grad_x over x", 3, |a| a.grad_x = a.x.cast_mut()),
        ("grad_weights over x", 3, |a| {
            a.grad_weights = a.x.cast_mut().cast()
        }),
        ("dtype 3", 4, |a| a.dtype = 3),
    ];
    let base = c.permute_backward_args();
    // SAFETY: pointers into `c`'s live buffers (or null / claims rejected before access).
    let call = |a: &DkMoePermuteBackwardArgs| unsafe { dk_moe_permute_backward(c.ctx, a, null) };
    c.expect_errors("permute_backward", base, &cases, call);
    // SAFETY: null handles are rejected before any access.
    unsafe {
        assert_eq!(dk_moe_permute_backward(std::ptr::null(), &base, null), 1);
        assert_eq!(dk_moe_permute_backward(c.ctx, std::ptr::null(), null), 1);
    }
    assert!(c.outs_untouched());

    // Valid: the combine and the slot-dot of the same operands, bit for bit.
    let (ca, da) = (c.combine_args(), c.slot_dot_args());
    let (grad_xp, rows) = (c.xp.as_ptr().cast(), 12);
    let mut want_x = vec![poison_f32(); 48];
    let mut want_w = vec![poison_f32(); 12];
    // SAFETY: pointers into `c`'s live buffers and the local vectors.
    unsafe {
        let y = want_x.as_mut_ptr().cast();
        let ca = DkMoeCombineArgs {
            rows_in: grad_xp,
            rows,
            y,
            ..ca
        };
        assert_eq!(dk_moe_combine(c.ctx, &ca, null), 0, "{}", last_error());
        let out = want_w.as_mut_ptr();
        let da = DkMoeSlotDotArgs {
            rows_in: grad_xp,
            rows,
            out,
            ..da
        };
        assert_eq!(dk_moe_slot_dot(c.ctx, &da, null), 0, "{}", last_error());
        assert_eq!(
            dk_moe_permute_backward(c.ctx, &base, null),
            0,
            "{}",
            last_error()
        );
    }
    assert_eq!(last_error(), "");
    assert_eq!(bits(&c.out[..48]), bits(&want_x));
    assert!(
        c.out[48..].iter().all(|x| x.to_bits() == POISON_F32),
        "past grad_x written"
    );
    assert_eq!(bits(&c.dots), bits(&want_w));
    // grad_x only: x_stride is not read when x is NULL.
    c.repoison();
    let a = DkMoePermuteBackwardArgs {
        x: std::ptr::null(),
        x_stride: -1,
        grad_weights: null.cast(),
        ..base
    };
    // SAFETY: as above.
    assert_eq!(
        unsafe { dk_moe_permute_backward(c.ctx, &a, null) },
        0,
        "{}",
        last_error()
    );
    assert_eq!(bits(&c.out[..48]), bits(&want_x));
    assert!(
        c.dots.iter().all(|x| x.to_bits() == POISON_F32),
        "grad_weights written"
    );
}

#[test]
fn c_abi_combine_backward_errors() {
    let mut rng = Rng::fresh("c_abi_combine_backward_errors");
    let mut c = CMoe::routed(&mut rng);
    let null = std::ptr::null_mut();
    type Edit = fn(&mut DkMoeCombineBackwardArgs);
    let cases: [(&str, i32, Edit); 21] = [
        ("null grad_y", 1, |a| a.grad_y = std::ptr::null()),
        ("null perm", 1, |a| a.perm = std::ptr::null()),
        ("null position", 1, |a| a.position = std::ptr::null()),
        ("null grad_expert_out", 1, |a| {
            a.grad_expert_out = std::ptr::null_mut()
        }),
        ("expert_out without grad_weights", 2, |a| {
            a.grad_weights = std::ptr::null_mut()
        }),
        ("grad_weights without expert_out", 2, |a| {
            a.expert_out = std::ptr::null()
        }),
        ("k -1", 2, |a| a.k = -1),
        ("k 33", 2, |a| {
            a.k = 33;
            a.n = 1;
            a.weights = std::ptr::null();
        }),
        (
            "grad_expert_out + 8 bytes (rows not 16-byte aligned)",
            2,
            |a| a.grad_expert_out = a.grad_expert_out.wrapping_byte_add(8),
        ),
        ("position + 2 bytes", 2, |a| {
            a.position = a.position.wrapping_byte_add(2)
        }),
        ("h 12", 3, |a| a.h = 12),
        ("rows -1", 3, |a| a.rows = -1),
        ("rows 0 with grad_weights", 3, |a| a.rows = 0),
        ("n -1", 3, |a| a.n = -1),
        ("grad_y_stride 4", 3, |a| a.grad_y_stride = 4),
        ("expert_out_stride -1", 3, |a| a.expert_out_stride = -1),
        ("grad_expert_out_stride 7", 3, |a| {
            a.grad_expert_out_stride = 7
        }),
        ("grad_expert_out over expert_out", 3, |a| {
            a.grad_expert_out = a.expert_out.cast_mut()
        }),
        ("grad_weights over grad_y", 3, |a| {
            a.grad_weights = a.grad_y.cast_mut().cast()
        }),
        ("grad_weights over grad_expert_out", 3, |a| {
            a.grad_weights = a.grad_expert_out.cast()
        }),
        ("dtype -1", 4, |a| a.dtype = -1),
    ];
    let base = c.combine_backward_args();
    // SAFETY: pointers into `c`'s live buffers (or null / claims rejected before access).
    let call = |a: &DkMoeCombineBackwardArgs| unsafe { dk_moe_combine_backward(c.ctx, a, null) };
    c.expect_errors("combine_backward", base, &cases, call);
    // Index contents are checked on the CPU before anything is written.
    let (perm, position) = (c.perm.clone(), c.position.clone());
    for (what, entry) in [("perm", 12), ("position", -2)] {
        let mut a = base;
        let mut bad = if what == "perm" {
            perm.clone()
        } else {
            position.clone()
        };
        bad[3] = entry;
        if what == "perm" {
            a.perm = bad.as_ptr();
        } else {
            a.position = bad.as_ptr();
        }
        // SAFETY: as above.
        let s = unsafe { dk_moe_combine_backward(c.ctx, &a, null) };
        assert_eq!(s, 2, "{what} entry {entry}: status {s}, {:?}", last_error());
        assert!(c.outs_untouched(), "{what} entry {entry}: outputs written");
    }
    // SAFETY: null handles are rejected before any access.
    unsafe {
        assert_eq!(dk_moe_combine_backward(std::ptr::null(), &base, null), 1);
        assert_eq!(dk_moe_combine_backward(c.ctx, std::ptr::null(), null), 1);
    }
    assert!(c.outs_untouched());

    // Valid: the permute and the slot-dot of the same operands, bit for bit.
    let (pa, da) = (c.permute_args(), c.slot_dot_args());
    let mut want_eo = vec![poison_f32(); 96];
    let mut want_w = vec![poison_f32(); 12];
    // SAFETY: pointers into `c`'s live buffers and the local vectors.
    unsafe {
        let out = want_eo.as_mut_ptr().cast();
        let pa = DkMoePermuteArgs { out, ..pa };
        assert_eq!(
            dk_moe_permute(c.ctx, &pa, null, 0, null),
            0,
            "{}",
            last_error()
        );
        let (rows_in, out) = (c.xp.as_ptr().cast(), want_w.as_mut_ptr());
        let da = DkMoeSlotDotArgs {
            rows_in,
            rows: 12,
            out,
            ..da
        };
        assert_eq!(dk_moe_slot_dot(c.ctx, &da, null), 0, "{}", last_error());
        assert_eq!(
            dk_moe_combine_backward(c.ctx, &base, null),
            0,
            "{}",
            last_error()
        );
    }
    assert_eq!(last_error(), "");
    assert_eq!(bits(&c.out), bits(&want_eo));
    assert_eq!(bits(&c.dots), bits(&want_w));
    // Unweighted, without the weights' gradient: expert_out_stride is not read.
    c.repoison();
    let a = DkMoeCombineBackwardArgs {
        expert_out: std::ptr::null(),
        expert_out_stride: -1,
        weights: std::ptr::null(),
        grad_weights: null.cast(),
        ..base
    };
    let pa = DkMoePermuteArgs {
        weights: std::ptr::null(),
        out: want_eo.as_mut_ptr().cast(),
        ..pa
    };
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            dk_moe_permute(c.ctx, &pa, null, 0, null),
            0,
            "{}",
            last_error()
        );
        assert_eq!(
            dk_moe_combine_backward(c.ctx, &a, null),
            0,
            "{}",
            last_error()
        );
    }
    assert_eq!(bits(&c.out), bits(&want_eo));
    assert!(
        c.dots.iter().all(|x| x.to_bits() == POISON_F32),
        "grad_weights written"
    );
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn c_abi_max_rows_defaults_and_workspace() {
    assert_eq!(dk_moe_max_rows(10, 4, 2, 1, 0), 20);
    assert_eq!(dk_moe_max_rows(10, 4, 2, 8, 0), 48);
    assert_eq!(dk_moe_max_rows(10, 4, 2, 1, 3), 12);
    assert_eq!(dk_moe_max_rows(0, 4, 2, 1, 0), 0);
    for (n, e, k, block, cap) in [
        (-1, 4, 2, 1, 0),
        (10, 0, 2, 1, 0),
        (10, -4, 2, 1, 0),
        (10, 4, 0, 1, 0),
        (10, 4, 2, 0, 0),
        (10, 4, 2, 1, -1),
        (i64::MAX, 4, 2, 1, 0),
    ] {
        assert_eq!(
            dk_moe_max_rows(n, e, k, block, cap),
            -1,
            "({n}, {e}, {k}, {block}, {cap})"
        );
    }
    let d = dk_moe_route_params_default();
    assert_eq!(
        (
            d.k,
            d.score,
            d.renormalize,
            d.n_groups,
            d.topk_groups,
            d.capacity,
            d.block
        ),
        (1, 0, 0, 1, 1, 0, 1)
    );
    assert_eq!(d.scale, 1.0);
    let mut ctx: *mut DkContext = std::ptr::null_mut();
    // SAFETY (block): valid out-pointers or nulls that are rejected.
    unsafe {
        assert_eq!(dk_context_create(-1, &mut ctx), 0);
        let mut bytes = 77usize;
        assert_eq!(dk_moe_route_workspace_size(ctx, 100, 8, 2, &mut bytes), 0);
        assert_eq!(bytes, 0, "CPU needs no workspace");
        let mut bytes = 77usize;
        assert_eq!(dk_moe_permute_workspace_size(ctx, 100, 8, &mut bytes), 0);
        assert_eq!(bytes, 0, "CPU needs no permute workspace");
        let mut bytes = 77usize;
        assert_eq!(dk_moe_permute_workspace_size(ctx, 100, 0, &mut bytes), 2);
        assert_eq!(dk_moe_permute_workspace_size(ctx, -1, 2, &mut bytes), 3);
        assert_eq!(bytes, 77);
        assert_eq!(dk_moe_route_workspace_size(ctx, -1, 8, 2, &mut bytes), 3);
        assert_eq!(bytes, 77);
        // The queries answer with the status of their calls: E, k and N·k as dk_moe_route and
        // dk_moe_permute check them (they once said DK_OK to what the calls refuse).
        for (n, e, k, status) in [
            (100, 0, 1, 3),      // no expert
            (100, 2000, 8, 3),   // E past MAX_EXPERTS
            (100, 8, 0, 2),      // k = 0
            (100, 8, 9, 2),      // k > E
            (100, 64, 40, 2),    // k past MAX_K
            (1 << 31, 8, 2, 3),  // N past 2^31 - 1
            (1 << 28, 64, 8, 3), // N·k past 2^31 - 1
            // Two bad values: k is checked first, with the params, as the call checks it.
            (-1, 4, 0, 2),
            (4, 0, 0, 2),
            (4, 1025, 0, 2),
        ] {
            assert_eq!(
                dk_moe_route_workspace_size(ctx, n, e, k, &mut bytes),
                status,
                "route size query, n {n}, e {e}, k {k}"
            );
            assert_eq!(bytes, 77);
        }
        for (n, k, status) in [(100, 33, 2), (1 << 31, 2, 3), (1 << 28, 8, 3)] {
            assert_eq!(
                dk_moe_permute_workspace_size(ctx, n, k, &mut bytes),
                status,
                "permute size query, n {n}, k {k}"
            );
            assert_eq!(bytes, 77);
        }
        assert_eq!(
            dk_moe_route_workspace_size(ctx, 1, 8, 2, std::ptr::null_mut()),
            1
        );
        assert_eq!(
            dk_moe_route_workspace_size(std::ptr::null(), 1, 8, 2, &mut bytes),
            1
        );
        assert_eq!(dk_context_destroy(ctx), 0);
    }
}

/// Combine and slot-dot take k from the caller, as permute does: a wrong row count of `y` (or of
/// `tokens`) whose N still divides the N·k position entries was once read as another k
/// (N = 6, k = 2 with 3 rows of y: k = 4) and summed meaningless slots.
#[test]
fn combine_and_slot_dot_check_position_against_the_given_k() {
    let ctx = Context::cpu();
    let (n, k, h) = (6, 2, 8);
    let rows: Vec<f32> = (0..n * k * h).map(|i| i as f32 * 0.25 - 3.0).collect();
    let position: Vec<i32> = (0..(n * k) as i32).collect();
    let weights = vec![0.5f32; n * k];
    let combine = |y: &mut [f32], y_rows: usize, k: usize| {
        ctx.moe_combine(
            Combine {
                rows: Matrix::host(&rows, n * 2, h, h).unwrap(),
                k,
                position: Vector::host(&position),
                weights: Some(Vector::host(&weights)),
                y: MatrixMut::host(y, y_rows, h, h).unwrap(),
            },
            &Launch::default(),
        )
    };
    let mut y = vec![f32::NAN; n * h];
    combine(&mut y, n, k).expect("the consistent call");
    assert!(y.iter().all(|v| v.is_finite()));
    for (what, y_rows, k, kind) in [
        ("y with N / 2 rows", n / 2, k, ErrorKind::Shape),
        ("k one too many", n, k + 1, ErrorKind::Shape),
        ("k = 0", n, 0, ErrorKind::InvalidArgument),
    ] {
        let mut y = vec![f32::NAN; n * h];
        let err = combine(&mut y, y_rows, k).expect_err(what);
        assert_eq!(err.kind(), kind, "{what}: {err}");
        assert!(y.iter().all(|v| v.is_nan()), "{what}: y written");
    }

    let tokens = &rows[..n * h];
    let slot_dot = |out: &mut [f32], token_rows: usize, k: usize| {
        ctx.moe_slot_dot(
            SlotDot {
                tokens: Matrix::host(&tokens[..token_rows * h], token_rows, h, h).unwrap(),
                rows: Matrix::host(&rows, n * 2, h, h).unwrap(),
                k,
                position: Vector::host(&position),
                out: VectorMut::host(out),
            },
            &Launch::default(),
        )
    };
    let mut out = vec![f32::NAN; n * k];
    slot_dot(&mut out, n, k).expect("the consistent call");
    assert!(out.iter().all(|v| v.is_finite()));
    for (what, token_rows, k, kind) in [
        ("tokens with N / 2 rows", n / 2, k, ErrorKind::Shape),
        ("k = 0", n, 0, ErrorKind::InvalidArgument),
    ] {
        let mut out = vec![f32::NAN; n * 2];
        let err = slot_dot(&mut out, token_rows, k).expect_err(what);
        assert_eq!(err.kind(), kind, "{what}: {err}");
        assert!(out.iter().all(|v| v.is_nan()), "{what}: out written");
    }
}
