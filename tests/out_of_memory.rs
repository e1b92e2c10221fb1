//! The CPU fused linear divergence widens whole operands to f64 (O((N + V)·H) memory). Where the
//! host refuses that memory the call must fail with `ErrorKind::OutOfMemory`, leaving the outputs
//! as they were, instead of aborting the caller's process ("memory allocation of … failed").
//!
//! The check runs this test binary again under `ulimit -v` (an address-space limit, Linux): a
//! student weight whose f64 copy fits the limit and a teacher weight whose copy does not.

#![cfg(target_os = "linux")]

use distill_kernels::divergence::{Kind, Params};
use distill_kernels::fused::{FusedLinear, FusedLinearParams};
use distill_kernels::{Context, ErrorKind, Launch, Matrix, MatrixMut, VectorMut};

/// Set in the child process that runs under the limit.
const CHILD: &str = "DK_TEST_OOM_CHILD";

/// The teacher's V·Ht = 2^27: its f32 weight is 512 MiB (never touched: zero pages), its f64
/// copy 1 GiB. The student's H = 8 keeps what the child really writes to ~50 MiB.
const V: usize = 1 << 19;
const H: usize = 8;
const HT: usize = 256;
const N: usize = 3;

#[test]
fn a_refused_allocation_is_an_error_not_an_abort() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let exe = std::env::current_exe().unwrap();
    // The teacher's f32 weight (512 MiB; untouched zero pages count too), the student's weight
    // and its f64 copy (16 + 32 MiB) and 700 MiB for the process itself; the teacher weight's
    // f64 copy (1 GiB) does not fit.
    let limit_kib = (512 + 48 + 700) * 1024;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {limit_kib} && exec \"$0\" \"$@\""))
        .arg(&exe)
        .args([
            "--exact",
            "a_refused_allocation_is_an_error_not_an_abort",
            "--test-threads=1",
            "--nocapture",
        ])
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

fn child() {
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
