//! CPU backend of attention: the exact reference. Inputs are widened to f64 and every score,
//! softmax, product and sum is computed in f64; each output element is rounded to its dtype once.
//!
//! Work is split into items, each computed by one thread in a fixed order, so the results do not
//! depend on the number of threads or on which thread takes which item (bitwise deterministic):
//!
//! - forward: one item per (sequence, query head) writes that head's columns of the sequence's
//!   out rows and its LSE entries;
//! - backward: one item per (sequence, KV head) walks the head's query group in order, writes dQ
//!   of those query heads and the sum over the group of dK and dV.
//!
//! The backward works from the caller's out and LSE, like the CUDA kernels:
//! `P = exp(scale·q·k − lse)` (0 where the LSE is −∞), `Delta = rowsum(dO ∘ out)`,
//! `dS = P ∘ (dO·vᵀ − Delta)`, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `dV = Pᵀ·dO`.

use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};

use super::{RawAttention, RawAttentionBackward, RawBatch};
use crate::error::Result;
use crate::host_alloc;
use crate::parallel::Shared;
use crate::tensor::{DType, Element};

/// Multiply-adds of work below which a call stays on one thread (per extra thread).
const WORK_PER_THREAD: usize = 1 << 18;

/// One sequence: its first query row and query count, its first key row and key count.
#[derive(Debug, Clone, Copy)]
struct Seq {
    q0: usize,
    sq: usize,
    k0: usize,
    sk: usize,
}

/// The sequences of a validated batch, read by index: not collected into a table, which for
/// a batch of 2³¹ − 1 empty sequences (a valid call) would take 64 GiB.
#[derive(Clone, Copy)]
struct Sequences<'a> {
    batch: usize,
    seqlen_q: usize,
    seqlen_k: usize,
    /// The varlen offsets `(cu_seqlens_q, cu_seqlens_k)`, `batch + 1` entries each.
    offsets: Option<(&'a [i32], &'a [i32])>,
}

impl Sequences<'_> {
    /// The sequences of `b`.
    ///
    /// # Safety
    /// For a varlen batch the offset pointers must be host memory of `batch + 1` entries each,
    /// checked by validation (starting at 0, non-decreasing, ending at the row counts), alive
    /// while the result is used.
    unsafe fn of(b: &RawBatch) -> Self {
        let offsets = b.is_varlen().then(|| {
            // SAFETY: forwarded from the caller.
            unsafe {
                (
                    std::slice::from_raw_parts(b.cu_seqlens_q, b.batch + 1),
                    std::slice::from_raw_parts(b.cu_seqlens_k, b.batch + 1),
                )
            }
        });
        Sequences {
            batch: b.batch,
            seqlen_q: b.seqlen_q,
            seqlen_k: b.seqlen_k,
            offsets,
        }
    }

    fn len(&self) -> usize {
        self.batch
    }

    fn get(&self, i: usize) -> Seq {
        match self.offsets {
            None => Seq {
                q0: i * self.seqlen_q,
                sq: self.seqlen_q,
                k0: i * self.seqlen_k,
                sk: self.seqlen_k,
            },
            Some((cq, ck)) => Seq {
                q0: cq[i] as usize,
                sq: (cq[i + 1] - cq[i]) as usize,
                k0: ck[i] as usize,
                sk: (ck[i + 1] - ck[i]) as usize,
            },
        }
    }

    fn iter(&self) -> impl Iterator<Item = Seq> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// Keys query `i` of a sequence of `sq` queries and `sk` keys sees: `0..visible`. Causal is
/// aligned bottom-right: key `j` is visible iff `j ≤ i + sk − sq`.
fn visible(i: usize, sq: usize, sk: usize, causal: bool) -> usize {
    if causal {
        (i + sk + 1).saturating_sub(sq).min(sk)
    } else {
        sk
    }
}

/// Widens `out.len()` elements of a `dtype` host array starting at element `index`.
///
/// # Safety
/// The elements must be valid, initialised host memory of `dtype`.
unsafe fn load(ptr: *const u8, dtype: DType, index: usize, out: &mut [f64]) {
    unsafe fn widen<T: Element>(p: *const u8, index: usize, out: &mut [f64]) {
        // SAFETY: the caller guarantees the elements are in bounds and aligned (rows start
        // 16-byte aligned).
        let src = unsafe { std::slice::from_raw_parts(p.cast::<T>().add(index), out.len()) };
        for (o, &x) in out.iter_mut().zip(src) {
            *o = x.to_f64();
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            DType::F32 => widen::<f32>(ptr, index, out),
            DType::BF16 => widen::<bf16>(ptr, index, out),
            DType::F16 => widen::<f16>(ptr, index, out),
        }
    }
}

/// Rounds `values·scale` to `dtype` and writes them at element `index` of a host array.
///
/// # Safety
/// The elements must be valid host memory of `dtype`, written by no one else meanwhile (no
/// reference to them is formed: other threads may write neighbouring elements).
unsafe fn store(ptr: *mut u8, dtype: DType, index: usize, values: &[f64], scale: f64) {
    unsafe fn narrow<T: Element>(p: *mut u8, index: usize, values: &[f64], scale: f64) {
        let dst = p.cast::<T>();
        for (k, &x) in values.iter().enumerate() {
            // SAFETY: forwarded from the caller.
            unsafe { dst.add(index + k).write(T::from_f64(x * scale)) };
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            DType::F32 => narrow::<f32>(ptr, index, values, scale),
            DType::BF16 => narrow::<bf16>(ptr, index, values, scale),
            DType::F16 => narrow::<f16>(ptr, index, values, scale),
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `acc += a·x`.
fn axpy(acc: &mut [f64], a: f64, x: &[f64]) {
    for (o, &v) in acc.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Runs `f(state, item)` for every item in `0..items` on one thread per state in `states`
/// (items handed out one at a time, so uneven sequences balance). The states are built by the
/// caller, on its thread, so that a refused allocation is an error before any work starts.
fn for_each_item<S: Send>(items: usize, states: Vec<S>, f: impl Fn(&mut S, usize) + Sync) {
    if states.len() <= 1 || items <= 1 {
        if let Some(mut state) = states.into_iter().next() {
            for i in 0..items {
                f(&mut state, i);
            }
        }
        return;
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for mut state in states.into_iter().take(items) {
            let (next, f) = (&next, &f);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items {
                    break;
                }
                f(&mut state, i);
            });
        }
    });
}

/// Threads that `work` multiply-adds deserve.
fn threads_for(work: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(work / WORK_PER_THREAD)
        .max(1)
}

/// Multiply-adds of a call with `heads` query heads of dimension `d` over `seqs` (upper bound:
/// no causal discount).
fn work(seqs: &Sequences, heads: usize, d: usize) -> usize {
    seqs.iter()
        .map(|s| s.sq.saturating_mul(s.sk))
        .fold(0usize, |a, b| a.saturating_add(b))
        .saturating_mul(heads)
        .saturating_mul(d)
}

/// Index of the LSE entry of query `i` (row `row`) of sequence `b` for head `h`.
fn lse_index(shape: &RawBatch, heads_q: usize, b: usize, h: usize, i: usize, row: usize) -> usize {
    if shape.is_varlen() {
        h * shape.total_q + row
    } else {
        (b * heads_q + h) * shape.seqlen_q + i
    }
}

/// Per-thread scratch: K and V of one head, and per-query rows.
struct Scratch {
    k: Vec<f64>,
    v: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    q: Vec<f64>,
    o: Vec<f64>,
    dout: Vec<f64>,
    acc: Vec<f64>,
    scores: Vec<f64>,
}

impl Scratch {
    /// One worker's scratch for keys of sequences up to `max_sk` long, all of it reserved here
    /// (the loads and scores then stay within capacity): [`ErrorKind::OutOfMemory`] where the
    /// host refuses it. `gradients`: also dK and dV (the backward).
    ///
    /// [`ErrorKind::OutOfMemory`]: crate::error::ErrorKind::OutOfMemory
    fn new(d: usize, max_sk: usize, gradients: bool) -> Result<Self> {
        let keys = max_sk.saturating_mul(d);
        let what = "the CPU attention's per-thread key and value rows (f64)";
        let grads_what = "the CPU attention's per-thread dK and dV rows (f64)";
        let grads = if gradients { keys } else { 0 };
        Ok(Scratch {
            k: host_alloc::with_capacity(keys, what)?,
            v: host_alloc::with_capacity(keys, what)?,
            dk: host_alloc::with_capacity(grads, grads_what)?,
            dv: host_alloc::with_capacity(grads, grads_what)?,
            q: vec![0.0; d],
            o: vec![0.0; d],
            dout: vec![0.0; d],
            acc: vec![0.0; d],
            scores: host_alloc::with_capacity(max_sk, "the CPU attention's per-thread scores")?,
        })
    }

    /// `threads` scratches (at least one) for the sequences of `seqs`.
    fn for_threads(
        threads: usize,
        seqs: &Sequences,
        d: usize,
        gradients: bool,
    ) -> Result<Vec<Self>> {
        let max_sk = seqs.iter().map(|s| s.sk).max().unwrap_or(0);
        (0..threads.max(1))
            .map(|_| Scratch::new(d, max_sk, gradients))
            .collect()
    }

    /// Scores the loaded query row against the first `n` (≥ 1) loaded keys: leaves
    /// `scores[j]` = exp(scale·q·k_j − m) and returns (m, Σ_j scores[j]), m the largest score.
    fn score_row(&mut self, n: usize, d: usize, scale: f64) -> (f64, f64) {
        self.scores.clear();
        for j in 0..n {
            self.scores
                .push(scale * dot(&self.q, &self.k[j * d..(j + 1) * d]));
        }
        let m = self
            .scores
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for x in self.scores.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        (m, sum)
    }

    /// Loads the `sk` keys and values of KV head `g` starting at key row `k0`.
    ///
    /// # Safety
    /// The rows must be inside the validated k and v matrices.
    #[allow(clippy::too_many_arguments)]
    unsafe fn load_kv(
        &mut self,
        (k, k_stride): (*const u8, usize),
        (v, v_stride): (*const u8, usize),
        dtype: DType,
        d: usize,
        g: usize,
        k0: usize,
        sk: usize,
    ) {
        self.k.resize(sk * d, 0.0);
        self.v.resize(sk * d, 0.0);
        for j in 0..sk {
            let row = k0 + j;
            // SAFETY: forwarded from the caller.
            unsafe {
                load(
                    k,
                    dtype,
                    row * k_stride + g * d,
                    &mut self.k[j * d..(j + 1) * d],
                );
                load(
                    v,
                    dtype,
                    row * v_stride + g * d,
                    &mut self.v[j * d..(j + 1) * d],
                );
            }
        }
    }
}

/// Forward pass: out and LSE.
///
/// # Safety
/// `raw` was validated for a host context: its pointers are valid host memory covering the
/// shapes, the outputs are disjoint from the inputs and from each other.
pub(crate) unsafe fn forward(raw: &RawAttention) -> Result<()> {
    if raw.shape.total_q == 0 {
        // No query row: out and the LSE have no element (a batch of empty sequences, however
        // many, is done without visiting them).
        return Ok(());
    }
    // SAFETY: validated offsets (host context).
    let seqs = unsafe { Sequences::of(&raw.shape) };
    let (hq, d) = (raw.heads_q, raw.head_dim);
    let group = raw.heads_q / raw.heads_kv;
    let scale = raw.scale as f64;
    // SAFETY: the workers read shared inputs and each writes only the output elements of its
    // own items (disjoint by construction, see the module docs).
    let shared = unsafe { Shared::new(*raw) };
    let items = seqs.len() * hq;
    let threads = threads_for(work(&seqs, hq, d)).min(items);
    for_each_item(
        items,
        Scratch::for_threads(threads, &seqs, d, false)?,
        |s, item| {
            let raw = shared.get();
            let (b, h) = (item / hq, item % hq);
            let seq = seqs.get(b);
            // SAFETY: key rows k0..k0 + sk of a validated sequence, KV head h / group < Hkv.
            unsafe {
                s.load_kv(
                    (raw.k, raw.k_stride),
                    (raw.v, raw.v_stride),
                    raw.dtype,
                    d,
                    h / group,
                    seq.k0,
                    seq.sk,
                )
            };
            for i in 0..seq.sq {
                let row = seq.q0 + i;
                let lse_at = lse_index(&raw.shape, hq, b, h, i, row);
                let n = visible(i, seq.sq, seq.sk, raw.causal);
                s.acc.fill(0.0);
                let lse = if n == 0 {
                    f64::NEG_INFINITY
                } else {
                    // SAFETY: query row `row` < Tq, head h < Hq.
                    unsafe { load(raw.q, raw.dtype, row * raw.q_stride + h * d, &mut s.q) };
                    let (m, sum) = s.score_row(n, d, scale);
                    for j in 0..n {
                        axpy(&mut s.acc, s.scores[j], &s.v[j * d..(j + 1) * d]);
                    }
                    for a in s.acc.iter_mut() {
                        *a /= sum;
                    }
                    m + sum.ln()
                };
                // SAFETY: this item owns head h's columns of row `row` of out and LSE entry
                // `lse_at` (< Hq·Tq); nothing else writes them.
                unsafe {
                    store(
                        raw.out,
                        raw.dtype,
                        row * raw.out_stride + h * d,
                        &s.acc,
                        1.0,
                    );
                    raw.lse.add(lse_at).write(lse as f32);
                }
            }
        },
    );
    Ok(())
}

/// Backward pass: dQ, dK, dV.
///
/// # Safety
/// `raw` was validated for a host context: its pointers are valid host memory covering the
/// shapes, the outputs are disjoint from the inputs and from each other.
pub(crate) unsafe fn backward(raw: &RawAttentionBackward) -> Result<()> {
    if raw.shape.total_q == 0 && raw.shape.total_k == 0 {
        // No row of dq, dk or dv to write.
        return Ok(());
    }
    // SAFETY: validated offsets (host context).
    let seqs = unsafe { Sequences::of(&raw.shape) };
    let (hq, hkv, d) = (raw.heads_q, raw.heads_kv, raw.head_dim);
    let group = hq / hkv;
    let scale = raw.scale as f64;
    // Bitwise reproducible whatever `raw.deterministic` asks: no item depends on another.
    let _ = raw.deterministic;
    // SAFETY: the workers read shared inputs and each writes only the output elements of its
    // own items (disjoint by construction, see the module docs).
    let shared = unsafe { Shared::new(*raw) };
    // Backward is about 2.5× the forward's multiply-adds.
    let items = seqs.len() * hkv;
    let threads = threads_for(work(&seqs, hq, d).saturating_mul(5) / 2).min(items);
    for_each_item(
        items,
        Scratch::for_threads(threads, &seqs, d, true)?,
        |s, item| {
            let raw = shared.get();
            let (b, g) = (item / hkv, item % hkv);
            let seq = seqs.get(b);
            // SAFETY: key rows k0..k0 + sk of a validated sequence, KV head g < Hkv.
            unsafe {
                s.load_kv(
                    (raw.k, raw.k_stride),
                    (raw.v, raw.v_stride),
                    raw.dtype,
                    d,
                    g,
                    seq.k0,
                    seq.sk,
                )
            };
            s.dk.clear();
            s.dk.resize(seq.sk * d, 0.0);
            s.dv.clear();
            s.dv.resize(seq.sk * d, 0.0);
            for h in g * group..(g + 1) * group {
                for i in 0..seq.sq {
                    let row = seq.q0 + i;
                    let n = visible(i, seq.sq, seq.sk, raw.causal);
                    // SAFETY: LSE entry of a query row < Tq and head < Hq (< Hq·Tq entries).
                    let lse = unsafe { *raw.lse.add(lse_index(&raw.shape, hq, b, h, i, row)) };
                    s.acc.fill(0.0);
                    if n > 0 && lse != f32::NEG_INFINITY {
                        // SAFETY: query row `row` < Tq, head h < Hq, of q, dout and out.
                        unsafe {
                            load(raw.q, raw.dtype, row * raw.q_stride + h * d, &mut s.q);
                            load(
                                raw.dout,
                                raw.dtype,
                                row * raw.dout_stride + h * d,
                                &mut s.dout,
                            );
                            load(raw.out, raw.dtype, row * raw.out_stride + h * d, &mut s.o);
                        }
                        let delta = dot(&s.dout, &s.o);
                        // P from the row's f64 statistics, not from the f32 LSE given: its
                        // rounding, |lse|·2⁻²⁴, would scale every P by e^error (dV 2e-2 off
                        // at scores near 1e6, NaN near 1e10). The kernels use the given LSE.
                        let (_, sum) = s.score_row(n, d, scale);
                        for j in 0..n {
                            let kj = &s.k[j * d..(j + 1) * d];
                            let vj = &s.v[j * d..(j + 1) * d];
                            let p = s.scores[j] / sum;
                            let ds = p * (dot(&s.dout, vj) - delta);
                            axpy(&mut s.acc, ds, kj);
                            axpy(&mut s.dk[j * d..(j + 1) * d], ds, &s.q);
                            axpy(&mut s.dv[j * d..(j + 1) * d], p, &s.dout);
                        }
                    }
                    // SAFETY: this item owns head h's columns of dq row `row` (h is in its
                    // KV head's group, the sequence is its own).
                    unsafe {
                        store(
                            raw.dq,
                            raw.dtype,
                            row * raw.dq_stride + h * d,
                            &s.acc,
                            scale,
                        )
                    };
                }
            }
            for j in 0..seq.sk {
                let row = seq.k0 + j;
                // SAFETY: this item owns KV head g's columns of the sequence's dk and dv rows.
                unsafe {
                    let (dk, dv) = (&s.dk[j * d..(j + 1) * d], &s.dv[j * d..(j + 1) * d]);
                    store(raw.dk, raw.dtype, row * raw.dk_stride + g * d, dk, scale);
                    store(raw.dv, raw.dtype, row * raw.dv_stride + g * d, dv, 1.0);
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{visible, Scratch};
    use crate::error::ErrorKind;

    /// Key rows the host cannot hold (one query against more keys than memory) are an
    /// OutOfMemory error from the calling thread, not an abort of the process; the scratch of
    /// an ordinary call has room for its longest sequence.
    #[test]
    fn scratch_the_host_refuses_is_an_out_of_memory_error() {
        match Scratch::new(128, usize::MAX / 256, false) {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::OutOfMemory);
                assert!(e.to_string().contains("key and value rows"), "{e}");
            }
            Ok(_) => panic!("a scratch of 2^64 / 2 bytes was allocated"),
        }
        let s = Scratch::new(64, 300, true).unwrap();
        assert!(s.k.capacity() >= 300 * 64 && s.dv.capacity() >= 300 * 64);
        assert!(s.scores.capacity() >= 300);
    }

    #[test]
    fn causal_alignment_is_bottom_right() {
        // Sq = Sk: the usual lower triangle.
        assert_eq!(visible(0, 4, 4, true), 1);
        assert_eq!(visible(3, 4, 4, true), 4);
        // Sq < Sk: the last query sees every key, the first Sk − Sq + 1.
        assert_eq!(visible(0, 2, 5, true), 4);
        assert_eq!(visible(1, 2, 5, true), 5);
        // Sq > Sk: the first Sq − Sk queries see nothing.
        assert_eq!(visible(0, 5, 2, true), 0);
        assert_eq!(visible(2, 5, 2, true), 0);
        assert_eq!(visible(3, 5, 2, true), 1);
        assert_eq!(visible(4, 5, 2, true), 2);
        // No keys.
        assert_eq!(visible(0, 1, 0, true), 0);
        assert_eq!(visible(0, 1, 0, false), 0);
        assert_eq!(visible(0, 3, 2, false), 2);
    }
}
