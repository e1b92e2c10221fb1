//! The CPU backend widens to f64: the fused linear divergence whole operands (O((N + V)·H)
//! memory), the divergence each worker's rows (3 · V values), the attention each worker's keys
//! and values of the longest sequence (2 · Sk · D values). Where the host refuses that memory
//! the call must fail with `ErrorKind::OutOfMemory`, leaving the outputs as they were, instead of
//! aborting the caller's process ("memory allocation of … failed").
//!
//! Each check runs this test binary again under `ulimit -v` (an address-space limit, Linux), with
//! inputs that fit the limit and f64 working memory that does not.

#![cfg(target_os = "linux")]

use distill_kernels::attention::{Attention, AttentionParams, Batch};
use distill_kernels::divergence::{Divergence, Kind, Params};
use distill_kernels::fused::{FusedLinear, FusedLinearParams};
use distill_kernels::{Context, ErrorKind, Launch, Matrix, MatrixMut, VectorMut};

/// Set in the child process that runs under the limit.
const CHILD: &str = "DK_TEST_OOM_CHILD";

/// Runs the test `name` of this binary again, as the child, under `ulimit -v limit_kib`, and
/// checks that it reported an `OutOfMemory` error (and nothing aborted).
fn run_child(name: &str, limit_kib: usize) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {limit_kib} && exec \"$0\" \"$@\""))
        .arg(&exe)
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .expect("run the test binary under ulimit -v");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the child under ulimit -v {limit_kib} KiB failed ({:?}):\n{text}",
        out.status
    );
    assert!(text.contains("child: OutOfMemory"), "{text}");
    for line in text.lines().filter(|l| l.contains("child:")) {
        println!("{line}");
    }
}

/// Prints the child's address-space size as it starts (for the log of a failure).
fn child_started() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let size = status
        .lines()
        .find(|l| l.starts_with("VmSize"))
        .unwrap_or("VmSize: ?");
    println!(
        "child: started at {}",
        size.split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// The fused operation's teacher: V·Ht = 2^27, its f32 weight 512 MiB (never touched: zero
/// pages), its f64 copy 1 GiB. The student's H = 8 keeps what the child really writes to ~50 MiB.
const V: usize = 1 << 19;
const H: usize = 8;
const HT: usize = 256;
const N: usize = 3;

#[test]
fn a_refused_allocation_is_an_error_not_an_abort() {
    if std::env::var_os(CHILD).is_some() {
        return fused_child();
    }
    // The teacher's f32 weight (512 MiB; untouched zero pages count too), the student's weight
    // and its f64 copy (16 + 32 MiB) and 700 MiB for the process itself; the teacher weight's
    // f64 copy (1 GiB) does not fit.
    run_child(
        "a_refused_allocation_is_an_error_not_an_abort",
        (512 + 48 + 700) * 1024,
    );
}

/// One divergence row of 2^25 f32 logits: student, teacher and gradient 128 MiB each, the CPU
/// backend's f64 rows (student, teacher, gradient) 768 MiB.
const ROW: usize = 1 << 25;

#[test]
fn the_divergence_refuses_rows_it_cannot_widen() {
    if std::env::var_os(CHILD).is_some() {
        return divergence_child();
    }
    // The three f32 rows (384 MiB) and 700 MiB for the process fit; the f64 rows do not.
    run_child(
        "the_divergence_refuses_rows_it_cannot_widen",
        (384 + 700) * 1024,
    );
}

fn divergence_child() {
    child_started();
    let student: Vec<f32> = (0..ROW).map(|i| (i as f32 * 0.37).sin()).collect();
    let teacher: Vec<f32> = (0..ROW).map(|i| (i as f32 * 0.29).cos()).collect();
    let mut grad = vec![f32::NAN; ROW];
    let mut loss = [f32::NAN];
    let err = Context::cpu()
        .divergence(
            Divergence {
                loss: Some(VectorMut::host(&mut loss)),
                grad: Some(MatrixMut::host(&mut grad, 1, ROW, ROW).unwrap()),
                ..Divergence::new(
                    Matrix::host(&student, 1, ROW, ROW).unwrap(),
                    Matrix::host(&teacher, 1, ROW, ROW).unwrap(),
                )
            },
            &Params::new(Kind::Jsd),
            &Launch::default(),
        )
        .expect_err("the f64 rows cannot fit the limit");
    assert_eq!(err.kind(), ErrorKind::OutOfMemory, "{err}");
    assert!(err.message().contains("f64 rows"), "{err}");
    assert!(
        loss[0].is_nan() && grad.iter().all(|g| g.is_nan()),
        "an output was written"
    );
    println!("child: {:?}: {err}", err.kind());
}

/// One query against 2^21 keys of D = 64 in f32: k and v 512 MiB each (zero pages); the CPU
/// backend's f64 copies of them, 2 GiB for its one worker.
const KEYS: usize = 1 << 21;

#[test]
fn the_attention_refuses_keys_it_cannot_widen() {
    if std::env::var_os(CHILD).is_some() {
        return attention_child();
    }
    // k and v (1 GiB) and 700 MiB for the process fit; the f64 keys and values do not.
    run_child(
        "the_attention_refuses_keys_it_cannot_widen",
        (1024 + 700) * 1024,
    );
}

fn attention_child() {
    child_started();
    const D: usize = 64;
    let q: Vec<f32> = (0..D).map(|i| (i as f32 * 0.37).sin()).collect();
    let kv = vec![0.0f32; KEYS * D];
    let mut out = vec![f32::NAN; D];
    let mut lse = [f32::NAN];
    let err = Context::cpu()
        .attention(
            Attention {
                batch: Batch::Padded {
                    batch: 1,
                    seqlen_q: 1,
                    seqlen_k: KEYS,
                },
                q: Matrix::host(&q, 1, D, D).unwrap(),
                k: Matrix::host(&kv, KEYS, D, D).unwrap(),
                v: Matrix::host(&kv, KEYS, D, D).unwrap(),
                out: MatrixMut::host(&mut out, 1, D, D).unwrap(),
                lse: VectorMut::host(&mut lse),
            },
            &AttentionParams::new(1, 1, D),
            &Launch::default(),
        )
        .expect_err("the f64 keys and values cannot fit the limit");
    assert_eq!(err.kind(), ErrorKind::OutOfMemory, "{err}");
    assert!(err.message().contains("key and value rows"), "{err}");
    assert!(
        lse[0].is_nan() && out.iter().all(|o| o.is_nan()),
        "an output was written"
    );
    println!("child: {:?}: {err}", err.kind());
}

fn fused_child() {
    child_started();
    let hidden: Vec<f32> = (0..N * H).map(|i| (i as f32 * 0.37).sin()).collect();
    let teacher_hidden: Vec<f32> = (0..N * HT).map(|i| (i as f32 * 0.29).cos()).collect();
    let weight = vec![0.0f32; V * H];
    let teacher_weight = vec![0.0f32; V * HT];
    let mut loss = [f32::NAN];
    let mut gh = vec![f32::NAN; N * H];
    let err = Context::cpu()
        .fused_linear_divergence(
            FusedLinear {
                num_items: None,
                student_hidden: Matrix::host(&hidden, N, H, H).unwrap(),
                student_weight: Matrix::host(&weight, V, H, H).unwrap(),
                teacher_hidden: Matrix::host(&teacher_hidden, N, HT, HT).unwrap(),
                teacher_weight: Matrix::host(&teacher_weight, V, HT, HT).unwrap(),
                labels: None,
                per_token: None,
                loss: Some(VectorMut::host(&mut loss)),
                grad_hidden: Some(MatrixMut::host(&mut gh, N, H, H).unwrap()),
                grad_weight: None,
            },
            &FusedLinearParams {
                divergence: Params::new(Kind::ForwardKl),
                ..FusedLinearParams::default()
            },
            &Launch::default(),
        )
        .expect_err("the teacher weight's f64 copy cannot fit the limit");
    assert_eq!(err.kind(), ErrorKind::OutOfMemory, "{err}");
    assert!(err.message().contains("teacher weight"), "{err}");
    assert!(
        loss[0].is_nan() && gh.iter().all(|g| g.is_nan()),
        "an output was written"
    );
    println!("child: {:?}: {err}", err.kind());
}
