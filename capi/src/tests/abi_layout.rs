//! Layouts shared between C and Rust: a C probe (compiled with the system compiler through the
//! `cc` crate) prints sizeof / alignment / offsetof of every field of the structs the headers
//! declare — parsed from the headers, so a new field cannot be missed — and the values of the
//! code macros. They must equal the Rust mirrors: the `*_args_layout()` functions for the kernel
//! argument structs (cuda/include/dk_*_args.h, dk_attention_shape.h) and `offset_of!` on the C ABI structs
//! (include/distill_kernels.h: divergence, row scaling, fused linear divergence, MoE dispatch and
//! attention).

use std::collections::BTreeMap;
use std::mem::{align_of, offset_of, size_of};
use std::process::Command;

use super::common::*;
use crate::attention::{
    DkAttentionArgs, DkAttentionBackwardArgs, DkAttentionBatch, DkAttentionParams,
};
use crate::divergence::{DkDivergenceArgs, DkDivergenceParams};
use crate::fused::{DkFusedLinearArgs, DkFusedLinearParams};
use crate::moe::{
    DkMoeCombineArgs, DkMoeCombineBackwardArgs, DkMoePermuteArgs, DkMoePermuteBackwardArgs,
    DkMoeRouteArgs, DkMoeRouteParams, DkMoeSlotDotArgs,
};
use crate::scale_rows::DkScaleRowsArgs;
use distill_kernels::divergence::{Kind, Reduction};
use distill_kernels::moe::Score;
use distill_kernels::{DType, ErrorKind};

/// Strips /* */ and // comments.
fn strip_comments(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while !rest.is_empty() {
        let b = rest.find("/*");
        let l = rest.find("//");
        let cut = match (b, l) {
            (Some(b), Some(l)) => b.min(l),
            (Some(b), None) => b,
            (None, Some(l)) => l,
            (None, None) => {
                out.push_str(rest);
                break;
            }
        };
        out.push_str(&rest[..cut]);
        if rest[cut..].starts_with("/*") {
            let end = rest[cut..].find("*/").expect("unterminated comment");
            rest = &rest[cut + end + 2..];
        } else {
            let end = rest[cut..].find('\n').unwrap_or(rest.len() - cut);
            rest = &rest[cut + end..];
        }
    }
    out
}

/// `typedef struct TAG { fields } NAME;` → (NAME, field names in order).
fn structs(header: &str) -> Vec<(String, Vec<String>)> {
    let code = strip_comments(header);
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(pos) = rest.find("typedef struct") {
        rest = &rest[pos + "typedef struct".len()..];
        let Some(open) = rest.find('{') else { break };
        let semi = rest.find(';').unwrap_or(usize::MAX);
        if semi < open {
            continue; // `typedef struct x x;` (opaque)
        }
        let close = rest.find('}').expect("struct body");
        let body = &rest[open + 1..close];
        let after = &rest[close + 1..];
        let name: String = after
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let fields = body
            .split(';')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| {
                let d = d.split('[').next().unwrap().trim_end();
                d.rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        out.push((name, fields));
        rest = &rest[close..];
    }
    out
}

const MACROS: &[&str] = &[
    "DK_OK",
    "DK_ERR_NULL_POINTER",
    "DK_ERR_INVALID_ARGUMENT",
    "DK_ERR_SHAPE",
    "DK_ERR_UNSUPPORTED_DTYPE",
    "DK_ERR_NO_DEVICE",
    "DK_ERR_WRONG_DEVICE",
    "DK_ERR_WORKSPACE_TOO_SMALL",
    "DK_ERR_CUDA",
    "DK_ERR_PANIC",
    "DK_ERR_OUT_OF_MEMORY",
    "DK_DTYPE_F32",
    "DK_DTYPE_BF16",
    "DK_DTYPE_F16",
    "DK_FORWARD_KL",
    "DK_REVERSE_KL",
    "DK_JSD",
    "DK_REDUCTION_BATCHMEAN",
    "DK_REDUCTION_SUM",
    "DK_REDUCTION_NONE",
    "DK_ARGS_REDUCTION_BATCHMEAN",
    "DK_ARGS_REDUCTION_SUM",
    "DK_ARGS_REDUCTION_NONE",
    "DK_MOE_SOFTMAX",
    "DK_MOE_SIGMOID",
    "DK_MOE_ARGS_SOFTMAX",
    "DK_MOE_ARGS_SIGMOID",
];

type Probe = (BTreeMap<String, usize>, BTreeMap<String, Vec<String>>);

/// Compiles and runs the probe; returns "STRUCT.FIELD" / "STRUCT sizeof" / "MACRO" → value, and
/// the fields of each struct. `None` (with a visible SKIPPED line) without a C compiler.
fn probe(test: &str) -> Option<Probe> {
    let mut cmd = c_compiler(test)?;
    let root = repo_root();
    let mut all = Vec::new();
    for h in [
        "cuda/include/dk_divergence_args.h",
        "cuda/include/dk_moe_args.h",
        "cuda/include/dk_attention_shape.h",
        "cuda/include/dk_attention_fwd_args.h",
        "cuda/include/dk_attention_bwd_args.h",
        "include/distill_kernels.h",
    ] {
        all.extend(structs(&std::fs::read_to_string(root.join(h)).unwrap()));
    }
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"dk_divergence_args.h\"\n\
         #include \"dk_moe_args.h\"\n#include \"dk_attention_fwd_args.h\"\n\
         #include \"dk_attention_bwd_args.h\"\n#include \"distill_kernels.h\"\n",
    );
    for (name, _) in &all {
        c += &format!("typedef struct {{ char c; {name} x; }} align_{name};\n");
    }
    c += "int main(void) {\n";
    for (name, fields) in &all {
        c += &format!("  printf(\"{name} sizeof %zu\\n\", sizeof({name}));\n");
        c += &format!("  printf(\"{name} alignof %zu\\n\", offsetof(align_{name}, x));\n");
        for f in fields {
            c += &format!("  printf(\"{name}.{f} %zu\\n\", offsetof({name}, {f}));\n");
        }
    }
    for m in MACROS {
        c += &format!("  printf(\"{m} %d\\n\", (int)({m}));\n");
    }
    c += "  return 0;\n}\n";
    let dir = scratch_dir("abi_probe");
    let src = dir.join("probe.c");
    std::fs::write(&src, c).unwrap();
    let exe = dir.join("probe");
    cmd.arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("cuda/include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe);
    let (ok, out) = run_command(&mut cmd);
    assert!(ok, "compiling the layout probe failed:\n{out}");
    let (ok, out) = run_command(&mut Command::new(&exe));
    assert!(ok, "probe failed:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
    let values = out
        .lines()
        .skip(1) // the command line
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect();
    Some((values, all.into_iter().collect()))
}

/// Compares the probe's view of `c_name` with Rust's (size, align, field offsets).
fn compare(
    values: &BTreeMap<String, usize>,
    fields: &BTreeMap<String, Vec<String>>,
    c_name: &str,
    size: usize,
    align: Option<usize>,
    rust: &[(&str, usize)],
) {
    let c_fields = fields
        .get(c_name)
        .unwrap_or_else(|| panic!("{c_name} not found in the headers"));
    let rust_names: Vec<&str> = rust.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        c_fields, &rust_names,
        "{c_name}: C fields (in order) vs the Rust mirror's"
    );
    assert_eq!(values[&format!("{c_name} sizeof")], size, "{c_name} sizeof");
    if let Some(a) = align {
        assert_eq!(
            values[&format!("{c_name} alignof")],
            a,
            "{c_name} alignment"
        );
    }
    for (f, off) in rust {
        assert_eq!(
            values[&format!("{c_name}.{f}")],
            *off,
            "{c_name}.{f} offset (C vs Rust)"
        );
    }
}

#[test]
fn kernel_args_structs_match_rust_mirrors() {
    let Some((values, fields)) = probe("kernel_args_structs_match_rust_mirrors") else {
        return;
    };
    for (c_name, layout) in [
        (
            "DkDivergenceArgs",
            distill_kernels::divergence_args_layout(),
        ),
        ("DkMoeRouteArgs", distill_kernels::moe_route_args_layout()),
        ("DkMoeRowsArgs", distill_kernels::moe_rows_args_layout()),
        (
            "DkAttentionFwdArgs",
            distill_kernels::attention_fwd_args_layout(),
        ),
        (
            "DkAttentionBwdArgs",
            distill_kernels::attention_bwd_args_layout(),
        ),
    ] {
        let size = layout
            .iter()
            .find(|(n, _)| *n == "sizeof")
            .expect("sizeof entry")
            .1;
        // Top-level fields here; the embedded DkAttentionShape's `shape.<field>` entries below.
        let rust: Vec<(&str, usize)> = layout
            .iter()
            .filter(|(n, _)| *n != "sizeof" && !n.contains('.'))
            .copied()
            .collect();
        compare(&values, &fields, c_name, size, None, &rust);
    }
    // DkAttentionShape, as embedded in both argument structs (relative to the `shape` field).
    for layout in [
        distill_kernels::attention_fwd_args_layout(),
        distill_kernels::attention_bwd_args_layout(),
    ] {
        let base = layout.iter().find(|(n, _)| *n == "shape").expect("shape").1;
        let rust: Vec<(&str, usize)> = layout
            .iter()
            .filter_map(|(n, off)| Some((n.strip_prefix("shape.")?, off - base)))
            .collect();
        let size = values["DkAttentionShape sizeof"];
        compare(&values, &fields, "DkAttentionShape", size, None, &rust);
    }
}

#[test]
fn c_abi_structs_match_rust() {
    let Some((values, fields)) = probe("c_abi_structs_match_rust") else {
        return;
    };
    compare(
        &values,
        &fields,
        "dk_divergence_args",
        size_of::<DkDivergenceArgs>(),
        Some(align_of::<DkDivergenceArgs>()),
        &[
            ("n", offset_of!(DkDivergenceArgs, n)),
            ("v", offset_of!(DkDivergenceArgs, v)),
            ("student", offset_of!(DkDivergenceArgs, student)),
            ("student_dtype", offset_of!(DkDivergenceArgs, student_dtype)),
            (
                "student_stride",
                offset_of!(DkDivergenceArgs, student_stride),
            ),
            ("teacher", offset_of!(DkDivergenceArgs, teacher)),
            ("teacher_dtype", offset_of!(DkDivergenceArgs, teacher_dtype)),
            (
                "teacher_stride",
                offset_of!(DkDivergenceArgs, teacher_stride),
            ),
            ("labels", offset_of!(DkDivergenceArgs, labels)),
            ("loss", offset_of!(DkDivergenceArgs, loss)),
            ("per_token", offset_of!(DkDivergenceArgs, per_token)),
            ("grad", offset_of!(DkDivergenceArgs, grad)),
            ("grad_stride", offset_of!(DkDivergenceArgs, grad_stride)),
            ("num_items", offset_of!(DkDivergenceArgs, num_items)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_divergence_params",
        size_of::<DkDivergenceParams>(),
        Some(align_of::<DkDivergenceParams>()),
        &[
            ("kind", offset_of!(DkDivergenceParams, kind)),
            ("beta", offset_of!(DkDivergenceParams, beta)),
            ("temperature", offset_of!(DkDivergenceParams, temperature)),
            ("reduction", offset_of!(DkDivergenceParams, reduction)),
            ("ignore_index", offset_of!(DkDivergenceParams, ignore_index)),
            ("num_items", offset_of!(DkDivergenceParams, num_items)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_scale_rows_args",
        size_of::<DkScaleRowsArgs>(),
        Some(align_of::<DkScaleRowsArgs>()),
        &[
            ("n", offset_of!(DkScaleRowsArgs, n)),
            ("v", offset_of!(DkScaleRowsArgs, v)),
            ("x", offset_of!(DkScaleRowsArgs, x)),
            ("dtype", offset_of!(DkScaleRowsArgs, dtype)),
            ("stride", offset_of!(DkScaleRowsArgs, stride)),
            ("factors", offset_of!(DkScaleRowsArgs, factors)),
            ("factor_stride", offset_of!(DkScaleRowsArgs, factor_stride)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_moe_route_params",
        size_of::<DkMoeRouteParams>(),
        Some(align_of::<DkMoeRouteParams>()),
        &[
            ("k", offset_of!(DkMoeRouteParams, k)),
            ("score", offset_of!(DkMoeRouteParams, score)),
            ("renormalize", offset_of!(DkMoeRouteParams, renormalize)),
            ("n_groups", offset_of!(DkMoeRouteParams, n_groups)),
            ("topk_groups", offset_of!(DkMoeRouteParams, topk_groups)),
            ("scale", offset_of!(DkMoeRouteParams, scale)),
            ("capacity", offset_of!(DkMoeRouteParams, capacity)),
            ("block", offset_of!(DkMoeRouteParams, block)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_moe_route_args",
        size_of::<DkMoeRouteArgs>(),
        Some(align_of::<DkMoeRouteArgs>()),
        &[
            ("n", offset_of!(DkMoeRouteArgs, n)),
            ("e", offset_of!(DkMoeRouteArgs, e)),
            ("logits", offset_of!(DkMoeRouteArgs, logits)),
            ("logits_dtype", offset_of!(DkMoeRouteArgs, logits_dtype)),
            ("logits_stride", offset_of!(DkMoeRouteArgs, logits_stride)),
            ("bias", offset_of!(DkMoeRouteArgs, bias)),
            ("expert_ids", offset_of!(DkMoeRouteArgs, expert_ids)),
            ("weights", offset_of!(DkMoeRouteArgs, weights)),
            ("counts", offset_of!(DkMoeRouteArgs, counts)),
            ("offsets", offset_of!(DkMoeRouteArgs, offsets)),
            ("perm", offset_of!(DkMoeRouteArgs, perm)),
            ("perm_rows", offset_of!(DkMoeRouteArgs, perm_rows)),
            ("position", offset_of!(DkMoeRouteArgs, position)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_moe_permute_args",
        size_of::<DkMoePermuteArgs>(),
        Some(align_of::<DkMoePermuteArgs>()),
        &[
            ("n", offset_of!(DkMoePermuteArgs, n)),
            ("h", offset_of!(DkMoePermuteArgs, h)),
            ("k", offset_of!(DkMoePermuteArgs, k)),
            ("rows", offset_of!(DkMoePermuteArgs, rows)),
            ("dtype", offset_of!(DkMoePermuteArgs, dtype)),
            ("x", offset_of!(DkMoePermuteArgs, x)),
            ("x_stride", offset_of!(DkMoePermuteArgs, x_stride)),
            ("perm", offset_of!(DkMoePermuteArgs, perm)),
            ("weights", offset_of!(DkMoePermuteArgs, weights)),
            ("out", offset_of!(DkMoePermuteArgs, out)),
            ("out_stride", offset_of!(DkMoePermuteArgs, out_stride)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_moe_combine_args",
        size_of::<DkMoeCombineArgs>(),
        Some(align_of::<DkMoeCombineArgs>()),
        &[
            ("n", offset_of!(DkMoeCombineArgs, n)),
            ("h", offset_of!(DkMoeCombineArgs, h)),
            ("k", offset_of!(DkMoeCombineArgs, k)),
            ("rows", offset_of!(DkMoeCombineArgs, rows)),
            ("dtype", offset_of!(DkMoeCombineArgs, dtype)),
            ("rows_in", offset_of!(DkMoeCombineArgs, rows_in)),
            ("rows_stride", offset_of!(DkMoeCombineArgs, rows_stride)),
            ("position", offset_of!(DkMoeCombineArgs, position)),
            ("weights", offset_of!(DkMoeCombineArgs, weights)),
            ("y", offset_of!(DkMoeCombineArgs, y)),
            ("y_stride", offset_of!(DkMoeCombineArgs, y_stride)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_moe_slot_dot_args",
        size_of::<DkMoeSlotDotArgs>(),
        Some(align_of::<DkMoeSlotDotArgs>()),
        &[
            ("n", offset_of!(DkMoeSlotDotArgs, n)),
            ("h", offset_of!(DkMoeSlotDotArgs, h)),
            ("k", offset_of!(DkMoeSlotDotArgs, k)),
            ("rows", offset_of!(DkMoeSlotDotArgs, rows)),
            ("dtype", offset_of!(DkMoeSlotDotArgs, dtype)),
            ("tokens", offset_of!(DkMoeSlotDotArgs, tokens)),
            ("tokens_stride", offset_of!(DkMoeSlotDotArgs, tokens_stride)),
            ("rows_in", offset_of!(DkMoeSlotDotArgs, rows_in)),
            ("rows_stride", offset_of!(DkMoeSlotDotArgs, rows_stride)),
            ("position", offset_of!(DkMoeSlotDotArgs, position)),
            ("out", offset_of!(DkMoeSlotDotArgs, out)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_moe_permute_backward_args",
        size_of::<DkMoePermuteBackwardArgs>(),
        Some(align_of::<DkMoePermuteBackwardArgs>()),
        &[
            ("n", offset_of!(DkMoePermuteBackwardArgs, n)),
            ("h", offset_of!(DkMoePermuteBackwardArgs, h)),
            ("k", offset_of!(DkMoePermuteBackwardArgs, k)),
            ("rows", offset_of!(DkMoePermuteBackwardArgs, rows)),
            ("dtype", offset_of!(DkMoePermuteBackwardArgs, dtype)),
            ("grad_xp", offset_of!(DkMoePermuteBackwardArgs, grad_xp)),
            (
                "grad_xp_stride",
                offset_of!(DkMoePermuteBackwardArgs, grad_xp_stride),
            ),
            ("position", offset_of!(DkMoePermuteBackwardArgs, position)),
            ("weights", offset_of!(DkMoePermuteBackwardArgs, weights)),
            ("x", offset_of!(DkMoePermuteBackwardArgs, x)),
            ("x_stride", offset_of!(DkMoePermuteBackwardArgs, x_stride)),
            ("grad_x", offset_of!(DkMoePermuteBackwardArgs, grad_x)),
            (
                "grad_x_stride",
                offset_of!(DkMoePermuteBackwardArgs, grad_x_stride),
            ),
            (
                "grad_weights",
                offset_of!(DkMoePermuteBackwardArgs, grad_weights),
            ),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_moe_combine_backward_args",
        size_of::<DkMoeCombineBackwardArgs>(),
        Some(align_of::<DkMoeCombineBackwardArgs>()),
        &[
            ("n", offset_of!(DkMoeCombineBackwardArgs, n)),
            ("h", offset_of!(DkMoeCombineBackwardArgs, h)),
            ("k", offset_of!(DkMoeCombineBackwardArgs, k)),
            ("rows", offset_of!(DkMoeCombineBackwardArgs, rows)),
            ("dtype", offset_of!(DkMoeCombineBackwardArgs, dtype)),
            ("grad_y", offset_of!(DkMoeCombineBackwardArgs, grad_y)),
            (
                "grad_y_stride",
                offset_of!(DkMoeCombineBackwardArgs, grad_y_stride),
            ),
            (
                "expert_out",
                offset_of!(DkMoeCombineBackwardArgs, expert_out),
            ),
            (
                "expert_out_stride",
                offset_of!(DkMoeCombineBackwardArgs, expert_out_stride),
            ),
            ("perm", offset_of!(DkMoeCombineBackwardArgs, perm)),
            ("position", offset_of!(DkMoeCombineBackwardArgs, position)),
            ("weights", offset_of!(DkMoeCombineBackwardArgs, weights)),
            (
                "grad_expert_out",
                offset_of!(DkMoeCombineBackwardArgs, grad_expert_out),
            ),
            (
                "grad_expert_out_stride",
                offset_of!(DkMoeCombineBackwardArgs, grad_expert_out_stride),
            ),
            (
                "grad_weights",
                offset_of!(DkMoeCombineBackwardArgs, grad_weights),
            ),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_fused_linear_params",
        size_of::<DkFusedLinearParams>(),
        Some(align_of::<DkFusedLinearParams>()),
        &[
            ("divergence", offset_of!(DkFusedLinearParams, divergence)),
            ("logit_scale", offset_of!(DkFusedLinearParams, logit_scale)),
            ("softcap", offset_of!(DkFusedLinearParams, softcap)),
            ("chunk_rows", offset_of!(DkFusedLinearParams, chunk_rows)),
            ("accumulate", offset_of!(DkFusedLinearParams, accumulate)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_fused_linear_args",
        size_of::<DkFusedLinearArgs>(),
        Some(align_of::<DkFusedLinearArgs>()),
        &[
            ("n", offset_of!(DkFusedLinearArgs, n)),
            ("v", offset_of!(DkFusedLinearArgs, v)),
            ("h", offset_of!(DkFusedLinearArgs, h)),
            ("ht", offset_of!(DkFusedLinearArgs, ht)),
            ("dtype", offset_of!(DkFusedLinearArgs, dtype)),
            (
                "student_hidden",
                offset_of!(DkFusedLinearArgs, student_hidden),
            ),
            (
                "student_hidden_stride",
                offset_of!(DkFusedLinearArgs, student_hidden_stride),
            ),
            (
                "student_weight",
                offset_of!(DkFusedLinearArgs, student_weight),
            ),
            (
                "student_weight_stride",
                offset_of!(DkFusedLinearArgs, student_weight_stride),
            ),
            (
                "teacher_hidden",
                offset_of!(DkFusedLinearArgs, teacher_hidden),
            ),
            (
                "teacher_hidden_stride",
                offset_of!(DkFusedLinearArgs, teacher_hidden_stride),
            ),
            (
                "teacher_weight",
                offset_of!(DkFusedLinearArgs, teacher_weight),
            ),
            (
                "teacher_weight_stride",
                offset_of!(DkFusedLinearArgs, teacher_weight_stride),
            ),
            ("labels", offset_of!(DkFusedLinearArgs, labels)),
            ("loss", offset_of!(DkFusedLinearArgs, loss)),
            ("per_token", offset_of!(DkFusedLinearArgs, per_token)),
            ("grad_hidden", offset_of!(DkFusedLinearArgs, grad_hidden)),
            (
                "grad_hidden_dtype",
                offset_of!(DkFusedLinearArgs, grad_hidden_dtype),
            ),
            (
                "grad_hidden_stride",
                offset_of!(DkFusedLinearArgs, grad_hidden_stride),
            ),
            ("grad_weight", offset_of!(DkFusedLinearArgs, grad_weight)),
            (
                "grad_weight_dtype",
                offset_of!(DkFusedLinearArgs, grad_weight_dtype),
            ),
            (
                "grad_weight_stride",
                offset_of!(DkFusedLinearArgs, grad_weight_stride),
            ),
            ("num_items", offset_of!(DkFusedLinearArgs, num_items)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_attention_params",
        size_of::<DkAttentionParams>(),
        Some(align_of::<DkAttentionParams>()),
        &[
            ("heads_q", offset_of!(DkAttentionParams, heads_q)),
            ("heads_kv", offset_of!(DkAttentionParams, heads_kv)),
            ("head_dim", offset_of!(DkAttentionParams, head_dim)),
            ("causal", offset_of!(DkAttentionParams, causal)),
            (
                "softmax_scale",
                offset_of!(DkAttentionParams, softmax_scale),
            ),
            (
                "deterministic",
                offset_of!(DkAttentionParams, deterministic),
            ),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_attention_batch",
        size_of::<DkAttentionBatch>(),
        Some(align_of::<DkAttentionBatch>()),
        &[
            ("batch", offset_of!(DkAttentionBatch, batch)),
            ("seqlen_q", offset_of!(DkAttentionBatch, seqlen_q)),
            ("seqlen_k", offset_of!(DkAttentionBatch, seqlen_k)),
            ("cu_seqlens_q", offset_of!(DkAttentionBatch, cu_seqlens_q)),
            ("cu_seqlens_k", offset_of!(DkAttentionBatch, cu_seqlens_k)),
            ("rows_q", offset_of!(DkAttentionBatch, rows_q)),
            ("rows_k", offset_of!(DkAttentionBatch, rows_k)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_attention_args",
        size_of::<DkAttentionArgs>(),
        Some(align_of::<DkAttentionArgs>()),
        &[
            ("batch", offset_of!(DkAttentionArgs, batch)),
            ("dtype", offset_of!(DkAttentionArgs, dtype)),
            ("q", offset_of!(DkAttentionArgs, q)),
            ("q_stride", offset_of!(DkAttentionArgs, q_stride)),
            ("k", offset_of!(DkAttentionArgs, k)),
            ("k_stride", offset_of!(DkAttentionArgs, k_stride)),
            ("v", offset_of!(DkAttentionArgs, v)),
            ("v_stride", offset_of!(DkAttentionArgs, v_stride)),
            ("out", offset_of!(DkAttentionArgs, out)),
            ("out_stride", offset_of!(DkAttentionArgs, out_stride)),
            ("lse", offset_of!(DkAttentionArgs, lse)),
        ],
    );
    compare(
        &values,
        &fields,
        "dk_attention_backward_args",
        size_of::<DkAttentionBackwardArgs>(),
        Some(align_of::<DkAttentionBackwardArgs>()),
        &[
            ("batch", offset_of!(DkAttentionBackwardArgs, batch)),
            ("dtype", offset_of!(DkAttentionBackwardArgs, dtype)),
            ("dout", offset_of!(DkAttentionBackwardArgs, dout)),
            (
                "dout_stride",
                offset_of!(DkAttentionBackwardArgs, dout_stride),
            ),
            ("q", offset_of!(DkAttentionBackwardArgs, q)),
            ("q_stride", offset_of!(DkAttentionBackwardArgs, q_stride)),
            ("k", offset_of!(DkAttentionBackwardArgs, k)),
            ("k_stride", offset_of!(DkAttentionBackwardArgs, k_stride)),
            ("v", offset_of!(DkAttentionBackwardArgs, v)),
            ("v_stride", offset_of!(DkAttentionBackwardArgs, v_stride)),
            ("out", offset_of!(DkAttentionBackwardArgs, out)),
            (
                "out_stride",
                offset_of!(DkAttentionBackwardArgs, out_stride),
            ),
            ("lse", offset_of!(DkAttentionBackwardArgs, lse)),
            ("dq", offset_of!(DkAttentionBackwardArgs, dq)),
            ("dq_stride", offset_of!(DkAttentionBackwardArgs, dq_stride)),
            ("dk", offset_of!(DkAttentionBackwardArgs, dk)),
            ("dk_stride", offset_of!(DkAttentionBackwardArgs, dk_stride)),
            ("dv", offset_of!(DkAttentionBackwardArgs, dv)),
            ("dv_stride", offset_of!(DkAttentionBackwardArgs, dv_stride)),
        ],
    );
    // The embedded batch structs have the layout checked above, at offset 0 of both args.
    assert_eq!(values["dk_attention_args.batch"], 0);
    assert_eq!(values["dk_attention_backward_args.batch"], 0);
    // The embedded divergence parameters have the layout checked above, at the same offset.
    assert_eq!(
        values["dk_fused_linear_params.divergence"], 0,
        "dk_fused_linear_params.divergence offset"
    );
    assert_eq!(
        size_of::<DkDivergenceParams>(),
        values["dk_divergence_params sizeof"]
    );
    // Every struct the headers declare is covered above.
    let covered = [
        "DkDivergenceArgs",
        "DkMoeRouteArgs",
        "DkMoeRowsArgs",
        "DkAttentionShape",
        "DkAttentionFwdArgs",
        "DkAttentionBwdArgs",
        "dk_divergence_args",
        "dk_divergence_params",
        "dk_scale_rows_args",
        "dk_fused_linear_params",
        "dk_fused_linear_args",
        "dk_moe_route_params",
        "dk_moe_route_args",
        "dk_moe_permute_args",
        "dk_moe_combine_args",
        "dk_moe_slot_dot_args",
        "dk_moe_permute_backward_args",
        "dk_moe_combine_backward_args",
        "dk_attention_params",
        "dk_attention_batch",
        "dk_attention_args",
        "dk_attention_backward_args",
    ];
    for name in fields.keys() {
        assert!(
            covered.contains(&name.as_str()),
            "struct {name} has no layout check"
        );
    }
}

#[test]
fn code_macros_match_rust_enums() {
    let Some((values, _)) = probe("code_macros_match_rust_enums") else {
        return;
    };
    let m = |name: &str| values[name] as i32;
    assert_eq!(m("DK_OK"), crate::DK_OK);
    for (name, kind) in [
        ("DK_ERR_NULL_POINTER", ErrorKind::NullPointer),
        ("DK_ERR_INVALID_ARGUMENT", ErrorKind::InvalidArgument),
        ("DK_ERR_SHAPE", ErrorKind::Shape),
        ("DK_ERR_UNSUPPORTED_DTYPE", ErrorKind::UnsupportedDtype),
        ("DK_ERR_NO_DEVICE", ErrorKind::NoDevice),
        ("DK_ERR_WRONG_DEVICE", ErrorKind::WrongDevice),
        ("DK_ERR_WORKSPACE_TOO_SMALL", ErrorKind::WorkspaceTooSmall),
        ("DK_ERR_CUDA", ErrorKind::Cuda),
        ("DK_ERR_PANIC", ErrorKind::Panic),
        ("DK_ERR_OUT_OF_MEMORY", ErrorKind::OutOfMemory),
    ] {
        assert_eq!(m(name), kind as i32, "{name}");
    }
    for (name, d) in [
        ("DK_DTYPE_F32", DType::F32),
        ("DK_DTYPE_BF16", DType::BF16),
        ("DK_DTYPE_F16", DType::F16),
    ] {
        assert_eq!(m(name), d as i32, "{name}");
        assert_eq!(DType::from_code(m(name)), Some(d));
    }
    for (name, k) in [
        ("DK_FORWARD_KL", Kind::ForwardKl),
        ("DK_REVERSE_KL", Kind::ReverseKl),
        ("DK_JSD", Kind::Jsd),
    ] {
        assert_eq!(Kind::from_code(m(name)), Some(k), "{name}");
    }
    for (name, args_name, score) in [
        ("DK_MOE_SOFTMAX", "DK_MOE_ARGS_SOFTMAX", Score::Softmax),
        ("DK_MOE_SIGMOID", "DK_MOE_ARGS_SIGMOID", Score::Sigmoid),
    ] {
        assert_eq!(m(name), score as i32, "{name}");
        assert_eq!(Score::from_code(m(name)), Some(score), "{name}");
        assert_eq!(m(args_name), score as i32, "{args_name}");
    }
    for (name, args_name, r) in [
        (
            "DK_REDUCTION_BATCHMEAN",
            "DK_ARGS_REDUCTION_BATCHMEAN",
            Reduction::BatchMean,
        ),
        ("DK_REDUCTION_SUM", "DK_ARGS_REDUCTION_SUM", Reduction::Sum),
        (
            "DK_REDUCTION_NONE",
            "DK_ARGS_REDUCTION_NONE",
            Reduction::None,
        ),
    ] {
        assert_eq!(Reduction::from_code(m(name)), Some(r), "{name}");
        assert_eq!(m(args_name), r as i32, "{args_name}");
    }
}

#[test]
fn header_struct_parser() {
    let h = "typedef struct a a; /* x */\ntypedef struct S {\n  int64_t n; // c\n  const void* p; /* d */\n  float x[4];\n} S;";
    assert_eq!(
        structs(h),
        vec![(
            "S".to_string(),
            vec!["n".to_string(), "p".to_string(), "x".to_string()]
        )]
    );
}
