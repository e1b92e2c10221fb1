//! MoE token dispatch: route 64 tokens over 16 experts (softmax top-2, renormalised), gather the
//! token rows into expert-major order (permute), run a toy "expert" on each expert's segment,
//! and sum each token's k expert rows back with the routing weights (combine).
//!
//! ```sh
//! cargo run --release --example moe_dispatch
//! ```
//!
//! CPU backend (host slices). On CUDA use `Context::cuda(0)?`, device pointers wrapped with the
//! `unsafe` `*::from_raw(.., Location::Cuda(0))` and `unsafe { Launch::on_stream(stream) }`.
//! Activation rows must start on 16-byte boundaries (`moe::ROW_ALIGN`) on every backend:
//! `AlignedBuf` gives them.

mod common;

use common::Rng;
use distill_kernels::moe::{Combine, Permute, Route, RouteParams};
use distill_kernels::{AlignedBuf, Context, Launch, Matrix, MatrixMut, Vector, VectorMut};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n, e, h) = (64, 16, 32);
    let params = RouteParams {
        renormalize: true, // each token's 2 weights sum to 1 (Qwen3-MoE, Mixtral)
        ..RouteParams::new(2)
    };
    let k = params.k;
    let mut rng = Rng(3);
    let router_logits = rng.uniform(n * e, -2.0, 2.0);
    let mut x = AlignedBuf::<f32>::zeros(n * h); // token rows [N, H]
    x.copy_from_slice(&rng.uniform(n * h, -1.0, 1.0));

    let ctx = Context::cpu();
    let (mut ids, mut weights, mut position) =
        (vec![0i32; n * k], vec![0f32; n * k], vec![0i32; n * k]);
    let (mut counts, mut offsets) = (vec![0i32; e], vec![0i32; e + 1]);
    let mut perm = vec![0i32; params.max_rows(n, e)]; // ≥ R = offsets[E]
    ctx.moe_route(
        Route {
            logits: Matrix::host(&router_logits, n, e, e)?,
            bias: None,
            expert_ids: VectorMut::host(&mut ids),
            weights: VectorMut::host(&mut weights),
            counts: VectorMut::host(&mut counts),
            offsets: VectorMut::host(&mut offsets),
            perm: VectorMut::host(&mut perm),
            position: VectorMut::host(&mut position),
        },
        &params,
        &Launch::default(),
    )?;
    let r = offsets[e] as usize;
    println!(
        "context: {}, N = {n}, E = {e}, top-{k}, H = {h}",
        ctx.describe()
    );
    println!("tokens per expert: {counts:?} (R = {r} permuted rows)");
    println!(
        "token 0 -> experts {:?}, weights {:.4?}",
        &ids[..k],
        &weights[..k]
    );

    // Permute: xp[row] = x[perm[row] / k], expert 0's rows first, then expert 1's, ...
    let mut xp = AlignedBuf::<f32>::zeros(r * h);
    let call = Permute {
        x: Matrix::host(&x, n, h, h)?,
        k,
        perm: Vector::host(&perm[..r]),
        weights: None,
        out: MatrixMut::host(&mut xp, r, h, h)?,
    };
    ctx.moe_permute(call, &Launch::default())?;
    let mut identity = AlignedBuf::<f32>::zeros(r * h); // the "identity expert" output, for the check below
    identity.copy_from_slice(&xp);

    // A toy expert: expert `ex` multiplies its rows (its segment of xp) by ex + 1.
    for ex in 0..e {
        let seg = offsets[ex] as usize * h..offsets[ex + 1] as usize * h;
        xp[seg].iter_mut().for_each(|a| *a *= (ex + 1) as f32);
    }

    // Combine: y[t] = Σ_j weights[t, j] · xp[position[t, j]].
    let combine = |rows: &[f32], y: &mut [f32]| -> Result<(), distill_kernels::Error> {
        let call = Combine {
            rows: Matrix::host(rows, r, h, h)?,
            k,
            position: Vector::host(&position),
            weights: Some(Vector::host(&weights)),
            y: MatrixMut::host(y, n, h, h)?,
        };
        ctx.moe_combine(call, &Launch::default())
    };
    let (mut y, mut y_id) = (
        AlignedBuf::<f32>::zeros(n * h),
        AlignedBuf::<f32>::zeros(n * h),
    );
    combine(&xp, &mut y)?;
    combine(&identity, &mut y_id)?;

    // Checks: with the identity expert and renormalised weights, combine(permute(x)) = x; with
    // the toy expert, y[t] = (Σ_j w[t, j] · (id[t, j] + 1)) · x[t].
    let mut err = [0f32; 2];
    for t in 0..n {
        let f: f32 = (0..k)
            .map(|j| weights[t * k + j] * (ids[t * k + j] + 1) as f32)
            .sum();
        for c in t * h..(t + 1) * h {
            err[0] = err[0].max((y_id[c] - x[c]).abs());
            err[1] = err[1].max((y[c] - f * x[c]).abs());
        }
    }
    println!("max |combine(permute(x)) - x| = {:.1e}", err[0]);
    println!("max |y - (sum_j w_j (expert_j + 1)) x| = {:.1e}", err[1]);
    assert!(err[0] <= 1e-6 && err[1] <= 1e-5);
    println!("ok: the round trip is the identity and the toy experts combine as expected");
    Ok(())
}
