//! Fused linear JSD: the divergence straight from hidden states and the lm_head weight, in row
//! chunks, so the `[N, V]` logits never exist whole. Self-distillation: the teacher shares the
//! student's weight and differs only in its hidden states. Computes the loss and the gradients
//! w.r.t. the student hidden states and weight, with a chunk size that does not divide N, and
//! checks that the result does not depend on the chunk size.
//!
//! ```sh
//! cargo run --release --example fused_linear
//! ```
//!
//! CPU backend (exact f64 reference, host slices). On CUDA use `Context::cuda(0)?`, device
//! pointers wrapped with the `unsafe` `Matrix::from_raw(.., Location::Cuda(0))` (f32, bf16 or
//! f16; the products go through cuBLAS) and `unsafe { Launch::on_stream(stream) }`.

mod common;

use common::Rng;
use distill_kernels::divergence::{Kind, Params};
use distill_kernels::fused::{FusedLinear, FusedLinearParams};
use distill_kernels::{Context, Launch, Matrix, MatrixMut, Vector, VectorMut};

/// Loss, per-token losses, grad_hidden `[N, H]` and grad_weight `[V, H]` of one call.
type Outputs = (f32, Vec<f32>, Vec<f32>, Vec<f32>);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n, h, v) = (24, 64, 1000);
    let mut rng = Rng(7);
    let student_hidden = rng.uniform(n * h, -1.0, 1.0);
    let teacher_hidden = rng.uniform(n * h, -1.0, 1.0);
    let weight = rng.uniform(v * h, -0.5, 0.5); // lm_head [V, H], shared by both sides
    let mut labels = vec![0i64; n];
    labels[3] = -100; // an ignored (e.g. prompt) token

    let ctx = Context::cpu();
    let run = |chunk_rows: usize| -> Result<Outputs, distill_kernels::Error> {
        let (mut loss, mut per_token) = ([0f32], vec![0f32; n]);
        let (mut gh, mut gw) = (vec![0f32; n * h], vec![0f32; v * h]);
        ctx.fused_linear_divergence(
            FusedLinear {
                labels: Some(Vector::host(&labels)),
                per_token: Some(VectorMut::host(&mut per_token)),
                loss: Some(VectorMut::host(&mut loss)),
                grad_hidden: Some(MatrixMut::host(&mut gh, n, h, h)?),
                grad_weight: Some(MatrixMut::host(&mut gw, v, h, h)?),
                // The teacher reads the student's own lm_head (self-distillation).
                ..FusedLinear::new(
                    Matrix::host(&student_hidden, n, h, h)?,
                    Matrix::host(&weight, v, h, h)?,
                    Matrix::host(&teacher_hidden, n, h, h)?,
                    Matrix::host(&weight, v, h, h)?,
                )
            },
            &FusedLinearParams {
                divergence: Params {
                    beta: 0.5,
                    ..Params::new(Kind::Jsd)
                },
                softcap: Some(30.0), // logits = 30 · tanh(z / 30); logit_scale stays 1
                chunk_rows: Some(chunk_rows),
                ..FusedLinearParams::default()
            },
            &Launch::default(),
        )?;
        Ok((loss[0], per_token, gh, gw))
    };

    let chunk = 7; // 24 rows = 3 chunks of 7 + one of 3
    let (loss, per_token, gh, gw) = run(chunk)?;
    let norm = |x: &[f32]| x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    println!(
        "context: {}, N = {n}, H = {h}, V = {v}, chunk_rows = {chunk}",
        ctx.describe()
    );
    println!("loss = {loss:.6}");
    println!("per-token (first 6) = {:.5?}", &per_token[..6]);
    println!("|grad_hidden| = {:.6e}", norm(&gh));
    println!("|grad_weight| = {:.6e}", norm(&gw));
    assert!(per_token[3] == 0.0 && gh[3 * h..4 * h].iter().all(|&x| x == 0.0));

    // The same call in one chunk: the divisor of batchmean is taken over all N rows, so the
    // result does not depend on the chunking (on the CPU it is even bitwise the same).
    let (loss1, per_token1, gh1, gw1) = run(n)?;
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .fold(0f32, |m, (&x, &y)| m.max((x - y).abs()))
    };
    let diff = [
        (loss - loss1).abs(),
        max_diff(&per_token, &per_token1),
        max_diff(&gh, &gh1),
        max_diff(&gw, &gw1),
    ];
    let [dl, dp, dh, dw] = diff;
    println!("chunk_rows = {n} vs {chunk}, max |diff|: loss {dl:.1e}, per-token {dp:.1e},");
    println!("    grad_hidden {dh:.1e}, grad_weight {dw:.1e}");
    assert!(
        diff.iter().all(|&d| d <= 1e-5),
        "chunking changed the result"
    );
    println!("ok: chunked and unchunked results agree within 1e-5");
    Ok(())
}
