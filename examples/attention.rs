//! Causal grouped-query attention, forward and backward: 6 query heads over 2 KV heads
//! (Hq / Hkv = 3), D = 64, two sequences of 12 tokens, in the FlashAttention layout (token rows
//! of `heads · D` values). Checks one head's output and LSE against a direct computation, and
//! dV against an identity the backward must satisfy.
//!
//! ```sh
//! cargo run --release --example attention
//! ```
//!
//! CPU backend (exact f64 reference; f32, bf16 or f16 host slices). On CUDA (bf16 / f16 only) use
//! `Context::cuda(0)?`, device pointers wrapped with the `unsafe` `*::from_raw(..,
//! Location::Cuda(0))` and `unsafe { Launch::on_stream(stream) }`. Token rows must start on
//! 16-byte boundaries (`attention::ROW_ALIGN`) on every backend: `AlignedBuf` gives them.

mod common;

use common::{random_rows, Rng};
use distill_kernels::attention::{Attention, AttentionBackward, AttentionParams, Batch};
use distill_kernels::{AlignedBuf, Context, Launch, Matrix, MatrixMut, Vector, VectorMut};

/// A read-only view of token rows `w` values wide.
fn view(x: &[f32], w: usize) -> distill_kernels::Result<Matrix<'_>> {
    Matrix::host(x, x.len() / w, w, w)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (b, s, hq, hkv, d) = (2, 12, 6, 2, 64);
    let p = AttentionParams::new(hq, hkv, d).causal(true); // softmax scale 1/√D
    let batch = Batch::Padded {
        batch: b,
        seqlen_q: s,
        seqlen_k: s,
    };
    let (t, wq, wk) = (b * s, hq * d, hkv * d); // token rows, q row width, kv row width
    let mut rng = Rng(11);
    let (q, k, v) = (
        random_rows(t * wq, &mut rng),
        random_rows(t * wk, &mut rng),
        random_rows(t * wk, &mut rng),
    );
    let mut out = AlignedBuf::<f32>::zeros(t * wq);
    let mut lse = vec![0f32; b * hq * s]; // [B, Hq, S]

    let ctx = Context::cpu();
    ctx.attention(
        Attention {
            batch,
            q: view(&q, wq)?,
            k: view(&k, wk)?,
            v: view(&v, wk)?,
            out: MatrixMut::host(&mut out, t, wq, wq)?,
            lse: VectorMut::host(&mut lse),
        },
        &p,
        &Launch::default(),
    )?;
    println!(
        "context: {}, B = {b}, S = {s}, Hq = {hq}, Hkv = {hkv}, D = {d}, causal",
        ctx.describe()
    );
    println!("out: [{t}, {wq}] (= [B·S, Hq·D]), lse: [{b}, {hq}, {s}]");

    // Direct computation for sequence 1, query head 4 (KV head 4 / 3 = 1): query i sees keys 0..=i.
    let (seq, head) = (1, 4);
    let kvh = head / p.group();
    let (mut err_out, mut err_lse) = (0f64, 0f64);
    let krow = |j: usize| (seq * s + j) * wk + kvh * d..(seq * s + j) * wk + (kvh + 1) * d;
    for i in 0..s {
        let qi = &q[(seq * s + i) * wq + head * d..][..d];
        let score = |j: usize| {
            let kj = &k[krow(j)];
            qi.iter()
                .zip(kj)
                .map(|(&a, &c)| a as f64 * c as f64)
                .sum::<f64>()
                * p.scale() as f64
        };
        let scores: Vec<f64> = (0..=i).map(score).collect();
        let l = scores.iter().map(|x| x.exp()).sum::<f64>().ln();
        err_lse = err_lse.max((l - lse[(seq * hq + head) * s + i] as f64).abs());
        for c in 0..d {
            let o: f64 = (0..=i)
                .map(|j| (scores[j] - l).exp() * v[krow(j)][c] as f64)
                .sum();
            err_out = err_out.max((o - out[(seq * s + i) * wq + head * d + c] as f64).abs());
        }
    }
    println!(
        "head {head} of sequence {seq} vs direct: max |err| out {err_out:.1e}, lse {err_lse:.1e}"
    );
    assert!(err_out < 1e-5 && err_lse < 1e-5);

    // Backward with a random dOut. dK and dV come back in the KV shape, summed over the group.
    let dout = random_rows(t * wq, &mut rng);
    let (mut dq, mut dk, mut dv) = (
        AlignedBuf::<f32>::zeros(t * wq),
        AlignedBuf::<f32>::zeros(t * wk),
        AlignedBuf::<f32>::zeros(t * wk),
    );
    ctx.attention_backward(
        AttentionBackward {
            batch,
            dout: view(&dout, wq)?,
            q: view(&q, wq)?,
            k: view(&k, wk)?,
            v: view(&v, wk)?,
            out: view(&out, wq)?,
            lse: Vector::host(&lse),
            dq: MatrixMut::host(&mut dq, t, wq, wq)?,
            dk: MatrixMut::host(&mut dk, t, wk, wk)?,
            dv: MatrixMut::host(&mut dv, t, wk, wk)?,
        },
        &p,
        &Launch::default(),
    )?;
    let norm = |x: &[f32]| x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    println!(
        "|dq| = {:.4}, |dk| = {:.4}, |dv| = {:.4}",
        norm(&dq),
        norm(&dk),
        norm(&dv)
    );

    // dV = Pᵀ·dOut and every row of P sums to 1, so per sequence and KV head the keys' dV rows
    // sum to the dOut rows of that head's query group.
    // sums[seq, g, c] = Σ_j dV[j, g, c] − Σ_i Σ_(h in group g) dOut[i, h, c], which must be 0.
    let mut sums = vec![0f64; b * wk];
    for row in 0..t {
        let seq = row / s;
        for (col, &x) in dv[row * wk..(row + 1) * wk].iter().enumerate() {
            sums[seq * wk + col] += x as f64;
        }
        for (col, &x) in dout[row * wq..(row + 1) * wq].iter().enumerate() {
            let kv_head = col / d / p.group();
            sums[seq * wk + kv_head * d + col % d] -= x as f64;
        }
    }
    let err = sums.iter().fold(0f64, |m, x| m.max(x.abs()));
    println!("max |sum_j dV[j] - sum_(i, h in group) dOut[i, h]| = {err:.1e}");
    assert!(err < 1e-4);
    println!("ok: forward matches the direct computation, dV satisfies the row-sum identity");
    Ok(())
}
