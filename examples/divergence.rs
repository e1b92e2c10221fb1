//! Token-level JSD (β = 0.5) between student and teacher logits: the reduced loss, the per-token
//! losses and the gradient w.r.t. the student logits in one call, with one row ignored through
//! its label; then the same call on bf16 logits.
//!
//! ```sh
//! cargo run --release --example divergence
//! ```
//!
//! It runs on the CPU backend (`Context::cpu()`, the exact f64 reference), which takes host
//! slices. On CUDA the call is the same, except that the context is `Context::cuda(0)?` and
//! every operand is device memory wrapped with the `unsafe` `Matrix::from_raw` /
//! `MatrixMut::from_raw` / `VectorMut::from_raw` and `Location::Cuda(0)`; pass the caller's stream
//! with `unsafe { Launch::on_stream(stream) }`: the call only queues work on it.

mod common;

use common::Rng;
use distill_kernels::divergence::{Divergence, Kind, Params};
use distill_kernels::{Context, Launch, Matrix, MatrixMut, Vector, VectorMut};
use half::bf16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n, v) = (4, 32_000);
    let mut rng = Rng(42);
    let student = rng.uniform(n * v, -4.0, 4.0);
    let teacher = rng.uniform(n * v, -4.0, 4.0);
    // Row 1's label is ignore_index (-100 by default): loss 0, gradient 0, not counted.
    let labels: [i64; 4] = [17, -100, 5, 31_999];
    let params = Params {
        beta: 0.5,
        ..Params::new(Kind::Jsd) // batchmean, T = 1, ignore_index = -100
    };

    let ctx = Context::cpu();
    let mut loss = [0f32];
    let mut per_token = vec![0f32; n];
    let mut grad = vec![0f32; n * v];
    ctx.divergence(
        Divergence {
            labels: Some(Vector::host(&labels)),
            per_token: Some(VectorMut::host(&mut per_token)),
            loss: Some(VectorMut::host(&mut loss)),
            grad: Some(MatrixMut::host(&mut grad, n, v, v)?),
            ..Divergence::new(
                Matrix::host(&student, n, v, v)?,
                Matrix::host(&teacher, n, v, v)?,
            )
        },
        &params,
        &Launch::default(),
    )?;
    println!(
        "context: {}, N = {n}, V = {v}, JSD beta = 0.5",
        ctx.describe()
    );
    println!("loss (batchmean over 3 valid rows) = {:.6}", loss[0]);
    println!("per-token = {per_token:.6?}");

    // Checks: batchmean is the mean of the valid rows; a softmax gradient row sums to 0; the
    // ignored row is exactly 0.
    let mean = per_token.iter().sum::<f32>() / 3.0;
    assert!((loss[0] - mean).abs() <= 1e-6 * mean.abs().max(1.0));
    for (row, g) in grad.chunks_exact(v).enumerate() {
        let sum: f64 = g.iter().map(|&x| x as f64).sum();
        let max = g.iter().fold(0f32, |m, &x| m.max(x.abs()));
        println!("grad row {row}: sum = {sum:+.2e}, max |g| = {max:.2e}");
        if labels[row] == params.ignore_index {
            assert!(g.iter().all(|&x| x == 0.0) && per_token[row] == 0.0);
        } else {
            assert!(sum.abs() < 1e-6, "gradient row {row} sums to {sum}");
        }
    }
    println!("ok: loss = mean of valid rows, gradient rows sum to ~0, ignored row is exactly 0");

    // bf16 logits (student and teacher may differ in dtype; the gradient takes the student's).
    // The CPU backend widens inputs exactly, so the loss equals the f32 loss of the same
    // bf16-rounded values.
    let student16: Vec<bf16> = student.iter().map(|&x| bf16::from_f32(x)).collect();
    let teacher16: Vec<bf16> = teacher.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut grad16 = vec![bf16::ZERO; n * v];
    let mut loss16 = [0f32];
    ctx.divergence(
        Divergence {
            labels: Some(Vector::host(&labels)),
            loss: Some(VectorMut::host(&mut loss16)),
            grad: Some(MatrixMut::host(&mut grad16, n, v, v)?),
            ..Divergence::new(
                Matrix::host(&student16, n, v, v)?,
                Matrix::host(&teacher16, n, v, v)?,
            )
        },
        &params,
        &Launch::default(),
    )?;
    let rounded = |x: &[bf16]| x.iter().map(|y| y.to_f32()).collect::<Vec<f32>>();
    let (s32, t32) = (rounded(&student16), rounded(&teacher16));
    let mut loss_rounded = [0f32];
    ctx.divergence(
        Divergence {
            labels: Some(Vector::host(&labels)),
            loss: Some(VectorMut::host(&mut loss_rounded)),
            // no grad: forward only
            ..Divergence::new(Matrix::host(&s32, n, v, v)?, Matrix::host(&t32, n, v, v)?)
        },
        &params,
        &Launch::default(),
    )?;
    println!(
        "bf16 loss = {:.6} (f32 on the same rounded values: {:.6}, f32 inputs: {:.6})",
        loss16[0], loss_rounded[0], loss[0]
    );
    assert!((loss16[0] - loss_rounded[0]).abs() <= 1e-6 * loss_rounded[0].abs());
    println!("ok: bf16 inputs are widened exactly");
    Ok(())
}
