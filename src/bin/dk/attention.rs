//! `dk bench --ops attention` (or `dk bench attention`): grouped-query attention, forward and
//! forward + backward, on the runner's backend, every result checked on sampled rows against an
//! f64 computation written here (independent of the library), timed, and reported in FLOP/s
//! counted as `ANCHORS.md` does: 4·B·Hq·S²·D / 2 forward for causal attention with Sq = Sk
//! (the visible (query, key) pairs otherwise), × 3.5 for forward + backward.
//!
//! Shapes: on CUDA the `ANCHORS.md` ones (B 4, S 4096, 24/8 heads; B 1, S 16384, 40/8; D 128,
//! causal) and a packed variable-length batch of 8 uneven sequences (16384 tokens, 24/8); on the
//! CPU two small ones (the CPU backend is the f64 reference: its rate says nothing about the GPU),
//! padded with Sq ≠ Sk and packed with an empty query sequence, a key sequence shorter than its
//! queries (rows that see no key) and a sequence of one token.
//!
//! Checks, per result: every output poisoned (0xFF) before the checked run and scanned for
//! unwritten elements (lse may be −inf, never NaN); on `check_rows` sampled query rows (all
//! heads) out and lse against the f64 forward; rows that see no key exactly out 0, lse −inf; for
//! the backward, dq on the sampled query rows and dk / dv on sampled key rows against the f64
//! backward given the forward's own out and lse (the backward's inputs); and a second poisoned
//! run must give bitwise identical outputs (the deterministic mode). A third row per shape,
//! `fwd+bwd/a`, runs the backward with `deterministic = false` (dQ summed by f32 atomics, as
//! FlashAttention-2 does): checked the same way, except that only out, lse, dk and dv must
//! repeat bit for bit.

use distill_kernels::attention::{Attention, AttentionBackward, AttentionParams, Batch};
use distill_kernels::{DType, Location, Matrix, MatrixMut, Vector, VectorMut};

use crate::backend::{measure, median, Buf, Runner};
use crate::bench::{json_num, json_opt, json_str, json_strs, sci, Progress};
use crate::data::{
    count_nonfinite, err_string, f32s, fill_normal, mix, sample_rows, widen, HostBuf,
};

/// The shapes `dk bench` runs attention on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnShape {
    /// Phi-4-mini: B 4, S 4096, 24 / 8 heads, D 128, causal.
    Phi4,
    /// Llama 4: B 1, S 16384, 40 / 8 heads, D 128, causal.
    Llama4,
    /// 8 packed sequences of uneven lengths (16384 tokens), 24 / 8 heads, D 128, causal.
    Varlen,
    /// CPU: B 2, Sq 96, Sk 160, 8 / 2 heads, D 64, causal.
    Small,
    /// CPU: 5 packed sequences (an empty one, one of a single token, one with fewer keys than
    /// queries), 6 / 2 heads, D 128, causal.
    SmallVarlen,
}

pub const ALL_ATTN_SHAPES: [AttnShape; 5] = [
    AttnShape::Phi4,
    AttnShape::Llama4,
    AttnShape::Varlen,
    AttnShape::Small,
    AttnShape::SmallVarlen,
];
pub const CUDA_ATTN_SHAPES: [AttnShape; 3] =
    [AttnShape::Phi4, AttnShape::Llama4, AttnShape::Varlen];
pub const CPU_ATTN_SHAPES: [AttnShape; 2] = [AttnShape::Small, AttnShape::SmallVarlen];

const VARLEN_LENS: [usize; 8] = [4096, 1024, 3000, 512, 2048, 4096, 1000, 608];
const SMALL_VARLEN_Q: [usize; 5] = [37, 0, 1, 90, 64];
const SMALL_VARLEN_K: [usize; 5] = [37, 5, 9, 64, 100];

/// How token rows form sequences in a shape.
enum Layout {
    Padded { batch: usize, sq: usize, sk: usize },
    Varlen { lq: Vec<usize>, lk: Vec<usize> },
}

struct Spec {
    layout: Layout,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    causal: bool,
}

impl AttnShape {
    pub fn name(self) -> &'static str {
        match self {
            AttnShape::Phi4 => "phi4-mini",
            AttnShape::Llama4 => "llama4",
            AttnShape::Varlen => "varlen",
            AttnShape::Small => "small",
            AttnShape::SmallVarlen => "small-varlen",
        }
    }

    pub fn from_name(s: &str) -> Option<AttnShape> {
        ALL_ATTN_SHAPES.into_iter().find(|x| x.name() == s)
    }

    fn spec(self) -> Spec {
        let (layout, heads_q, heads_kv, head_dim) = match self {
            AttnShape::Phi4 => (
                Layout::Padded {
                    batch: 4,
                    sq: 4096,
                    sk: 4096,
                },
                24,
                8,
                128,
            ),
            AttnShape::Llama4 => (
                Layout::Padded {
                    batch: 1,
                    sq: 16384,
                    sk: 16384,
                },
                40,
                8,
                128,
            ),
            AttnShape::Varlen => (
                Layout::Varlen {
                    lq: VARLEN_LENS.to_vec(),
                    lk: VARLEN_LENS.to_vec(),
                },
                24,
                8,
                128,
            ),
            AttnShape::Small => (
                Layout::Padded {
                    batch: 2,
                    sq: 96,
                    sk: 160,
                },
                8,
                2,
                64,
            ),
            AttnShape::SmallVarlen => (
                Layout::Varlen {
                    lq: SMALL_VARLEN_Q.to_vec(),
                    lk: SMALL_VARLEN_K.to_vec(),
                },
                6,
                2,
                128,
            ),
        };
        Spec {
            layout,
            heads_q,
            heads_kv,
            head_dim,
            causal: true,
        }
    }

    /// `ANCHORS.md`'s measured rates on one H200 (FA2 = SDPA flash, cuDNN = SDPA cudnn), TFLOP/s:
    /// (FA2 fwd, FA2 fwd+bwd, cuDNN fwd, cuDNN fwd+bwd). Another run on another day: a guide, not
    /// a same-run comparison (that is `python/bench.py --ops attention`).
    fn anchors(self) -> Option<[f64; 4]> {
        match self {
            AttnShape::Phi4 => Some([318.0, 265.0, 530.0, 469.0]),
            AttnShape::Llama4 => Some([338.0, 319.0, 572.0, 534.0]),
            _ => None,
        }
    }
}

impl Spec {
    /// Per sequence: (first query row, queries, first key row, keys).
    fn seqs(&self) -> Vec<(usize, usize, usize, usize)> {
        match &self.layout {
            Layout::Padded { batch, sq, sk } => {
                (0..*batch).map(|b| (b * sq, *sq, b * sk, *sk)).collect()
            }
            Layout::Varlen { lq, lk } => {
                let (mut q0, mut k0) = (0, 0);
                lq.iter()
                    .zip(lk)
                    .map(|(&a, &b)| {
                        let s = (q0, a, k0, b);
                        q0 += a;
                        k0 += b;
                        s
                    })
                    .collect()
            }
        }
    }

    fn rows(&self) -> (usize, usize) {
        let s = self.seqs();
        (
            s.iter().map(|x| x.1).sum::<usize>(),
            s.iter().map(|x| x.3).sum::<usize>(),
        )
    }

    fn describe(&self) -> String {
        let l = match &self.layout {
            Layout::Padded { batch, sq, sk } if sq == sk => format!("B {batch}, S {sq}"),
            Layout::Padded { batch, sq, sk } => format!("B {batch}, Sq {sq}, Sk {sk}"),
            Layout::Varlen { lq, lk } if lq == lk => format!("varlen {lq:?}"),
            Layout::Varlen { lq, lk } => format!("varlen q {lq:?} k {lk:?}"),
        };
        format!(
            "{l}, {}/{} heads, D {}{}",
            self.heads_q,
            self.heads_kv,
            self.head_dim,
            if self.causal { ", causal" } else { "" }
        )
    }

    fn short(&self) -> String {
        match &self.layout {
            Layout::Padded { batch, sq, sk } if sq == sk => {
                format!("{batch}x{sq} {}/{}", self.heads_q, self.heads_kv)
            }
            Layout::Padded { batch, sq, sk } => {
                format!("{batch}x{sq}x{sk} {}/{}", self.heads_q, self.heads_kv)
            }
            Layout::Varlen { lq, .. } => format!(
                "{}t {}/{}",
                lq.iter().sum::<usize>(),
                self.heads_q,
                self.heads_kv
            ),
        }
    }

    /// Keys query `i` of a sequence of `sq` queries and `sk` keys sees: `0 .. visible`.
    fn visible(&self, i: usize, sq: usize, sk: usize) -> usize {
        if !self.causal {
            return sk;
        }
        // j <= i + sk - sq  <=>  j < i + 1 + sk - sq
        (i + 1 + sk).saturating_sub(sq).min(sk)
    }

    /// Forward FLOPs: 4·Hq·D per visible (query, key) pair; ANCHORS.md's S²/2 for causal
    /// sequences with Sq = Sk.
    fn flops(&self) -> f64 {
        let per_pair = 4.0 * (self.heads_q * self.head_dim) as f64;
        let pairs: f64 = self
            .seqs()
            .iter()
            .map(|&(_, sq, _, sk)| {
                if !self.causal {
                    (sq * sk) as f64
                } else if sq == sk {
                    (sq * sk) as f64 / 2.0
                } else {
                    (0..sq).map(|i| self.visible(i, sq, sk) as f64).sum()
                }
            })
            .sum();
        per_pair * pairs
    }

    fn params(&self) -> AttentionParams {
        AttentionParams::new(self.heads_q, self.heads_kv, self.head_dim).causal(self.causal)
    }

    fn scale(&self) -> f64 {
        self.params().scale() as f64
    }
}

/// What `dk bench` asks of this section.
pub struct AttnConfig<'a> {
    pub shapes: &'a [AttnShape],
    pub dtypes: &'a [DType],
    pub iters: usize,
    pub check_rows: usize,
    pub seed: u64,
}

/// One named comparison of a result.
struct CheckVal {
    what: &'static str,
    err: f64,
    tol: f64,
}

impl CheckVal {
    fn passed(&self) -> bool {
        self.err <= self.tol // NaN fails
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Fwd,
    FwdBwd,
    /// Forward + backward with `deterministic = false` (atomic dQ).
    FwdBwdAtomic,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Fwd => "fwd",
            Pass::FwdBwd => "fwd+bwd",
            Pass::FwdBwdAtomic => "fwd+bwd/a",
        }
    }

    fn backward(self) -> bool {
        self != Pass::Fwd
    }
}

/// One result row.
pub struct AttnRow {
    shape: AttnShape,
    desc: String,
    short: String,
    dtype: DType,
    pass: Pass,
    iters: usize,
    median_s: f64,
    min_s: f64,
    /// fwd+bwd: the backward call's median alone.
    bwd_s: Option<f64>,
    host_s: Option<f64>,
    flops: f64,
    checks: Vec<CheckVal>,
    masked_rows: usize,
    same: Option<bool>,
    problems: Vec<String>,
    error: Option<String>,
    pub ok: bool,
}

impl AttnRow {
    fn rate(&self) -> f64 {
        self.flops / self.median_s
    }

    fn finish(&mut self) {
        self.ok = self.error.is_none()
            && self.problems.is_empty()
            && self.checks.iter().all(CheckVal::passed)
            && self.same != Some(false);
    }

    fn check(&self, what: &str) -> Option<f64> {
        self.checks.iter().find(|c| c.what == what).map(|c| c.err)
    }

    /// The largest gradient error (dq, dk, dv).
    fn grad_err(&self) -> Option<f64> {
        let gs: Vec<f64> = ["dq", "dk", "dv"]
            .iter()
            .filter_map(|w| self.check(w))
            .collect();
        if gs.is_empty() {
            None
        } else if gs.iter().any(|x| x.is_nan()) {
            Some(f64::NAN)
        } else {
            Some(gs.into_iter().fold(0.0, f64::max))
        }
    }

    /// This rate over ANCHORS.md's FA2 rate of the same shape and pass (H200).
    fn vs_fa2(&self) -> Option<f64> {
        let a = self.shape.anchors()?;
        let fa2 = if self.pass == Pass::Fwd { a[0] } else { a[1] };
        Some(self.rate() / 1e12 / fa2)
    }
}

/// Tolerance of out / dq / dk / dv (DESIGN.md: bf16/f16 1e-2, f32 1e-5, ‖x − ref‖ / ‖ref‖).
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 | DType::F16 => 1e-2,
    }
}

/// Largest |lse − ref| / max(1, |ref|) accepted (f32 accumulation).
const LSE_TOL: f64 = 1e-4;

// ------------------------------------------------------------------------------------------
// f64 reference on sampled rows (host)

/// The inputs (and the outputs read back) on the host, for the reference.
struct Host {
    dtype: DType,
    q: HostBuf,
    k: HostBuf,
    v: HostBuf,
    dout: HostBuf,
}

fn row_of(dtype: DType, buf: &[u8], row: usize, len: usize) -> Vec<f64> {
    let b = dtype.size();
    widen(dtype, &buf[row * len * b..(row + 1) * len * b])
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Runs `f` over `items` on all cores, results in order.
pub(crate) fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(items.len())
        .max(1);
    let per = items.len().div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|c| scope.spawn(move || c.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("reference thread panicked"))
            .collect()
    })
}

/// Where the lse of (query row `r` of sequence `s`, position `i`, head `h`) lives.
fn lse_index(spec: &Spec, tq: usize, s: usize, i: usize, r: usize, h: usize) -> usize {
    match &spec.layout {
        Layout::Padded { sq, .. } => (s * spec.heads_q + h) * sq + i,
        Layout::Varlen { .. } => h * tq + r,
    }
}

/// The sequence and position of global query row `r` (or key row with `keys`).
fn locate(seqs: &[(usize, usize, usize, usize)], r: usize, keys: bool) -> (usize, usize) {
    for (s, &(q0, sq, k0, sk)) in seqs.iter().enumerate() {
        let (start, len) = if keys { (k0, sk) } else { (q0, sq) };
        if r >= start && r < start + len {
            return (s, r - start);
        }
    }
    unreachable!("row {r} is in no sequence")
}

/// f64 forward of one query row, all heads: (out `[Hq·D]`, lse `[Hq]`).
fn ref_forward_row(
    spec: &Spec,
    h: &Host,
    seq: (usize, usize, usize, usize),
    r: usize,
    i: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (hq, hkv, d) = (spec.heads_q, spec.heads_kv, spec.head_dim);
    let g = hq / hkv;
    let (_, sq, k0, sk) = seq;
    let q = row_of(h.dtype, h.q.as_bytes(), r, hq * d);
    let n = spec.visible(i, sq, sk);
    let scale = spec.scale();
    let mut scores = vec![vec![0.0f64; n]; hq];
    let mut vrows = Vec::with_capacity(n);
    for j in 0..n {
        let k = row_of(h.dtype, h.k.as_bytes(), k0 + j, hkv * d);
        for (head, sc) in scores.iter_mut().enumerate() {
            let kv = head / g;
            sc[j] = scale * dot(&q[head * d..(head + 1) * d], &k[kv * d..(kv + 1) * d]);
        }
        vrows.push(row_of(h.dtype, h.v.as_bytes(), k0 + j, hkv * d));
    }
    let mut out = vec![0.0; hq * d];
    let mut lse = vec![f64::NEG_INFINITY; hq];
    for (head, sc) in scores.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let kv = head / g;
        let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
        lse[head] = m + z.ln();
        for (j, s) in sc.iter().enumerate() {
            let p = (s - lse[head]).exp();
            for t in 0..d {
                out[head * d + t] += p * vrows[j][kv * d + t];
            }
        }
    }
    (out, lse)
}

/// What the backward reference reads besides the inputs: the forward's own out (for
/// D = rowsum(dout ∘ out)) and lse, both from the checked forward run.
struct FwdOut {
    lse: Vec<f32>,
    /// D per (query row, head): `[Tq · Hq]`.
    delta: Vec<f64>,
}

fn deltas(spec: &Spec, h: &Host, out: &[u8], tq: usize) -> Vec<f64> {
    let (hq, d) = (spec.heads_q, spec.head_dim);
    let rows: Vec<usize> = (0..tq).collect();
    par_map(&rows, |&r| {
        let o = row_of(h.dtype, out, r, hq * d);
        let g = row_of(h.dtype, h.dout.as_bytes(), r, hq * d);
        (0..hq)
            .map(|head| dot(&o[head * d..(head + 1) * d], &g[head * d..(head + 1) * d]))
            .collect::<Vec<f64>>()
    })
    .concat()
}

/// f64 dq of one query row, all heads, given the forward's lse and D.
fn ref_dq_row(
    spec: &Spec,
    h: &Host,
    f: &FwdOut,
    seqs: &[(usize, usize, usize, usize)],
    tq: usize,
    r: usize,
) -> Vec<f64> {
    let (hq, hkv, d) = (spec.heads_q, spec.heads_kv, spec.head_dim);
    let g = hq / hkv;
    let (s, i) = locate(seqs, r, false);
    let (_, sq, k0, sk) = seqs[s];
    let n = spec.visible(i, sq, sk);
    let scale = spec.scale();
    let q = row_of(h.dtype, h.q.as_bytes(), r, hq * d);
    let go = row_of(h.dtype, h.dout.as_bytes(), r, hq * d);
    let mut dq = vec![0.0; hq * d];
    for j in 0..n {
        let k = row_of(h.dtype, h.k.as_bytes(), k0 + j, hkv * d);
        let v = row_of(h.dtype, h.v.as_bytes(), k0 + j, hkv * d);
        for head in 0..hq {
            let kv = head / g;
            let lse = f.lse[lse_index(spec, tq, s, i, r, head)] as f64;
            let kr = &k[kv * d..(kv + 1) * d];
            let p = (scale * dot(&q[head * d..(head + 1) * d], kr) - lse).exp();
            let dp = dot(&go[head * d..(head + 1) * d], &v[kv * d..(kv + 1) * d]);
            let ds = p * (dp - f.delta[r * hq + head]);
            for t in 0..d {
                dq[head * d + t] += scale * ds * kr[t];
            }
        }
    }
    dq
}

/// f64 (dk, dv) of one key row, all KV heads, given the forward's lse and D.
fn ref_dkv_row(
    spec: &Spec,
    h: &Host,
    f: &FwdOut,
    seqs: &[(usize, usize, usize, usize)],
    tq: usize,
    kr: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (hq, hkv, d) = (spec.heads_q, spec.heads_kv, spec.head_dim);
    let g = hq / hkv;
    let (s, j) = locate(seqs, kr, true);
    let (q0, sq, _, sk) = seqs[s];
    let scale = spec.scale();
    let k = row_of(h.dtype, h.k.as_bytes(), kr, hkv * d);
    let v = row_of(h.dtype, h.v.as_bytes(), kr, hkv * d);
    let mut dk = vec![0.0; hkv * d];
    let mut dv = vec![0.0; hkv * d];
    for i in 0..sq {
        if j >= spec.visible(i, sq, sk) {
            continue;
        }
        let r = q0 + i;
        let q = row_of(h.dtype, h.q.as_bytes(), r, hq * d);
        let go = row_of(h.dtype, h.dout.as_bytes(), r, hq * d);
        for head in 0..hq {
            let kv = head / g;
            let lse = f.lse[lse_index(spec, tq, s, i, r, head)] as f64;
            let qh = &q[head * d..(head + 1) * d];
            let gh = &go[head * d..(head + 1) * d];
            let p = (scale * dot(qh, &k[kv * d..(kv + 1) * d]) - lse).exp();
            let dp = dot(gh, &v[kv * d..(kv + 1) * d]);
            let ds = p * (dp - f.delta[r * hq + head]);
            for t in 0..d {
                dk[kv * d + t] += scale * ds * qh[t];
                dv[kv * d + t] += p * gh[t];
            }
        }
    }
    (dk, dv)
}

/// ‖got − want‖ / ‖want‖ over rows (the absolute norm where want is 0); NaN if any value is.
fn rel_rows(got: &[Vec<f64>], want: &[Vec<f64>]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        for (&a, &b) in g.iter().zip(w) {
            num += (a - b) * (a - b);
            den += b * b;
        }
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

// ------------------------------------------------------------------------------------------
// One shape: buffers, calls, rows

struct Bufs {
    q: Buf,
    k: Buf,
    v: Buf,
    dout: Buf,
    out: Buf,
    lse: Buf,
    dq: Buf,
    dk: Buf,
    dv: Buf,
    cu_q: Buf,
    cu_k: Buf,
    ws: Buf,
}

/// Addresses of the buffers (valid while `Bufs` lives).
#[derive(Clone, Copy)]
struct Addrs {
    q: *mut u8,
    k: *mut u8,
    v: *mut u8,
    dout: *mut u8,
    out: *mut u8,
    lse: *mut u8,
    dq: *mut u8,
    dk: *mut u8,
    dv: *mut u8,
    cu_q: *mut u8,
    cu_k: *mut u8,
    ws: *mut u8,
    ws_len: usize,
}

/// The library's view of a shape's batch.
fn batch<'a>(spec: &Spec, a: Addrs, loc: Location) -> Batch<'a> {
    match &spec.layout {
        Layout::Padded { batch, sq, sk } => Batch::Padded {
            batch: *batch,
            seqlen_q: *sq,
            seqlen_k: *sk,
        },
        Layout::Varlen { lq, lk } => Batch::Varlen {
            // SAFETY: [B + 1] int32 offsets uploaded in `setup`, alive while the calls run.
            cu_seqlens_q: unsafe { Vector::from_raw(a.cu_q.cast::<i32>(), lq.len() + 1, loc) },
            cu_seqlens_k: unsafe { Vector::from_raw(a.cu_k.cast::<i32>(), lk.len() + 1, loc) },
            max_seqlen_q: lq.iter().copied().max().unwrap_or(0),
            max_seqlen_k: lk.iter().copied().max().unwrap_or(0),
        },
    }
}

/// Generates the inputs, allocates and fills the backend buffers.
fn setup(
    runner: &Runner,
    cfg: &AttnConfig<'_>,
    spec: &Spec,
    shape: AttnShape,
    dtype: DType,
) -> Result<(Host, Bufs, Addrs), String> {
    let (tq, tk) = spec.rows();
    let b = dtype.size();
    let (qw, kw) = (spec.heads_q * spec.head_dim, spec.heads_kv * spec.head_dim);
    let nseq = spec.seqs().len();
    let act = (3 * tq * qw + 4 * tk * kw) * b + 4 * spec.heads_q * tq;
    if let Some(free) = runner.free_memory() {
        // Margin: the 256 MiB buffer the CUDA timing reads to evict L2, the workspace, some slack.
        if act + (768 << 20) > free {
            return Err(format!(
                "{} needs {:.2} GiB of device memory, {:.2} GiB are free",
                shape.name(),
                act as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            ));
        }
    }
    let seed = |what: u64| mix(&[cfg.seed, 0xA77, shape as u64, dtype as u64, what]);
    let gen = |rows: usize, cols: usize, what: u64| {
        let mut buf = HostBuf::zeroed(rows * cols * b);
        fill_normal(seed(what), dtype, cols, 1.0, buf.as_bytes_mut());
        buf
    };
    let host = Host {
        dtype,
        q: gen(tq, qw, 1),
        k: gen(tk, kw, 2),
        v: gen(tk, kw, 3),
        dout: gen(tq, qw, 4),
    };
    let filled = |data: &[u8]| -> Result<Buf, String> {
        let mut buf = runner.alloc(data.len())?;
        runner.upload(&mut buf, data)?;
        Ok(buf)
    };
    let offsets = |lens: Vec<usize>| -> Vec<u8> {
        let mut acc = 0i32;
        let mut o = acc.to_le_bytes().to_vec();
        for l in lens {
            acc += l as i32;
            o.extend_from_slice(&acc.to_le_bytes());
        }
        o
    };
    let (cu_q, cu_k) = match &spec.layout {
        Layout::Padded { .. } => (runner.alloc(4)?, runner.alloc(4)?),
        Layout::Varlen { lq, lk } => (filled(&offsets(lq.clone()))?, filled(&offsets(lk.clone()))?),
    };
    debug_assert!(nseq > 0);
    let mut bufs = Bufs {
        q: filled(host.q.as_bytes())?,
        k: filled(host.k.as_bytes())?,
        v: filled(host.v.as_bytes())?,
        dout: filled(host.dout.as_bytes())?,
        out: runner.alloc(tq * qw * b)?,
        lse: runner.alloc(4 * spec.heads_q * tq)?,
        dq: runner.alloc(tq * qw * b)?,
        dk: runner.alloc(tk * kw * b)?,
        dv: runner.alloc(tk * kw * b)?,
        cu_q,
        cu_k,
        ws: runner.alloc(1)?,
    };
    let mut a = Addrs {
        q: runner.addr(&mut bufs.q),
        k: runner.addr(&mut bufs.k),
        v: runner.addr(&mut bufs.v),
        dout: runner.addr(&mut bufs.dout),
        out: runner.addr(&mut bufs.out),
        lse: runner.addr(&mut bufs.lse),
        dq: runner.addr(&mut bufs.dq),
        dk: runner.addr(&mut bufs.dk),
        dv: runner.addr(&mut bufs.dv),
        cu_q: runner.addr(&mut bufs.cu_q),
        cu_k: runner.addr(&mut bufs.cu_k),
        ws: std::ptr::null_mut(),
        ws_len: 0,
    };
    let ws_len = runner
        .context()
        .attention_backward_workspace_size(
            &backward_call(spec, dtype, a, runner.location()),
            // The larger of the two modes' workspaces (the atomic-dQ mode adds the accumulator).
            &AttentionParams {
                deterministic: false,
                ..spec.params()
            },
        )
        .map_err(|e| format!("backward workspace size: {e}"))?;
    bufs.ws = runner.alloc(ws_len)?;
    a.ws = runner.addr(&mut bufs.ws);
    a.ws_len = ws_len;
    Ok((host, bufs, a))
}

fn forward_call<'a>(spec: &Spec, dtype: DType, a: Addrs, loc: Location) -> Attention<'a> {
    let (tq, tk) = spec.rows();
    let (qw, kw) = (spec.heads_q * spec.head_dim, spec.heads_kv * spec.head_dim);
    // SAFETY: every pointer is a live buffer of the runner's backend of the size the view
    // describes (allocated in `setup`); outputs are distinct from inputs.
    unsafe {
        Attention {
            batch: batch(spec, a, loc),
            q: Matrix::from_raw(a.q, dtype, tq, qw, qw, loc),
            k: Matrix::from_raw(a.k, dtype, tk, kw, kw, loc),
            v: Matrix::from_raw(a.v, dtype, tk, kw, kw, loc),
            out: MatrixMut::from_raw(a.out, dtype, tq, qw, qw, loc),
            lse: VectorMut::from_raw(a.lse.cast::<f32>(), spec.heads_q * tq, loc),
        }
    }
}

fn backward_call<'a>(spec: &Spec, dtype: DType, a: Addrs, loc: Location) -> AttentionBackward<'a> {
    let (tq, tk) = spec.rows();
    let (qw, kw) = (spec.heads_q * spec.head_dim, spec.heads_kv * spec.head_dim);
    // SAFETY: as in `forward_call`.
    unsafe {
        AttentionBackward {
            batch: batch(spec, a, loc),
            dout: Matrix::from_raw(a.dout, dtype, tq, qw, qw, loc),
            q: Matrix::from_raw(a.q, dtype, tq, qw, qw, loc),
            k: Matrix::from_raw(a.k, dtype, tk, kw, kw, loc),
            v: Matrix::from_raw(a.v, dtype, tk, kw, kw, loc),
            out: Matrix::from_raw(a.out, dtype, tq, qw, qw, loc),
            lse: Vector::from_raw(a.lse.cast::<f32>(), spec.heads_q * tq, loc),
            dq: MatrixMut::from_raw(a.dq, dtype, tq, qw, qw, loc),
            dk: MatrixMut::from_raw(a.dk, dtype, tk, kw, kw, loc),
            dv: MatrixMut::from_raw(a.dv, dtype, tk, kw, kw, loc),
        }
    }
}

/// Query rows that see no key: (global row, sequence, position).
fn masked_rows(spec: &Spec) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for (s, &(q0, sq, _, sk)) in spec.seqs().iter().enumerate() {
        for i in 0..sq {
            if spec.visible(i, sq, sk) == 0 {
                v.push((q0 + i, s, i));
            }
        }
    }
    v
}

/// Rows of one shape and dtype: fwd, then fwd+bwd.
fn run_shape(
    runner: &Runner,
    cfg: &AttnConfig<'_>,
    shape: AttnShape,
    dtype: DType,
    progress: &mut Progress,
    step: &mut usize,
    total: usize,
) -> Vec<AttnRow> {
    let spec = shape.spec();
    let mut rows: Vec<AttnRow> = [Pass::Fwd, Pass::FwdBwd, Pass::FwdBwdAtomic]
        .into_iter()
        .map(|pass| AttnRow {
            shape,
            desc: spec.describe(),
            short: spec.short(),
            dtype,
            pass,
            iters: cfg.iters,
            median_s: f64::NAN,
            min_s: f64::NAN,
            bwd_s: None,
            host_s: None,
            flops: spec.flops() * if pass.backward() { 3.5 } else { 1.0 },
            checks: Vec::new(),
            masked_rows: 0,
            same: None,
            problems: Vec::new(),
            error: None,
            ok: false,
        })
        .collect();
    progress.show(&format!(
        "[{}/{total}] attention {} {}: generating inputs ...",
        *step + 1,
        shape.name(),
        dtype.name()
    ));
    let (host, mut bufs, a) = match setup(runner, cfg, &spec, shape, dtype) {
        Ok(x) => x,
        Err(msg) => {
            for r in &mut rows {
                r.error = Some(msg.clone());
                r.finish();
            }
            *step += rows.len();
            return rows;
        }
    };
    for row in &mut rows {
        *step += 1;
        progress.show(&format!(
            "[{}/{total}] attention {} {} {} ...",
            *step,
            shape.name(),
            dtype.name(),
            row.pass.name()
        ));
        if let Err(msg) = run_row(runner, cfg, &spec, &host, &mut bufs, a, row) {
            row.error = Some(msg);
        }
        row.finish();
    }
    rows
}

fn run_row(
    runner: &Runner,
    cfg: &AttnConfig<'_>,
    spec: &Spec,
    host: &Host,
    bufs: &mut Bufs,
    a: Addrs,
    row: &mut AttnRow,
) -> Result<(), String> {
    let dtype = row.dtype;
    let ctx = runner.context();
    let loc = runner.location();
    let mut params = spec.params();
    params.deterministic = row.pass != Pass::FwdBwdAtomic;
    let (tq, tk) = spec.rows();
    let (qw, kw) = (spec.heads_q * spec.head_dim, spec.heads_kv * spec.head_dim);
    let fwd = || -> Result<(), String> {
        ctx.attention(
            forward_call(spec, dtype, a, loc),
            &params,
            &runner.launch(None),
        )
        .map_err(err_string)
    };
    let bwd = || -> Result<(), String> {
        let ws = (a.ws_len > 0).then_some((a.ws, a.ws_len));
        ctx.attention_backward(
            backward_call(spec, dtype, a, loc),
            &params,
            &runner.launch(ws),
        )
        .map_err(err_string)
    };
    let m = match row.pass {
        Pass::Fwd => measure(
            runner,
            &[&fwd],
            &mut [&mut bufs.out, &mut bufs.lse],
            row.iters,
        )?,
        Pass::FwdBwd | Pass::FwdBwdAtomic => measure(
            runner,
            &[&fwd, &bwd],
            &mut [
                &mut bufs.out,
                &mut bufs.lse,
                &mut bufs.dq,
                &mut bufs.dk,
                &mut bufs.dv,
            ],
            row.iters,
        )?,
    };
    let iters = m.part_times.first().map_or(0, Vec::len);
    let totals: Vec<f64> = (0..iters)
        .map(|i| m.part_times.iter().map(|p| p[i]).sum())
        .collect();
    row.median_s = median(&totals);
    row.min_s = totals.iter().copied().fold(f64::INFINITY, f64::min);
    row.host_s = m.host_s;
    if row.pass.backward() {
        row.bwd_s = Some(median(&m.part_times[1]));
    }
    row.same = Some(if row.pass == Pass::FwdBwdAtomic {
        // dq (output 2) is summed in an order that varies from run to run.
        m.same_each.iter().enumerate().all(|(i, &s)| i == 2 || s)
    } else {
        m.same
    });

    // Unwritten or non-finite outputs (lse: NaN only; −inf is a row that sees no key).
    let lse = f32s(&m.first[1]);
    let nan_lse = lse.iter().filter(|x| x.is_nan()).count();
    if nan_lse > 0 {
        row.problems
            .push(format!("{nan_lse} lse entries NaN (unwritten or computed)"));
    }
    let names = ["out", "lse", "dq", "dk", "dv"];
    for (i, bytes) in m.first.iter().enumerate() {
        if i == 1 {
            continue;
        }
        let bad = count_nonfinite(dtype, bytes);
        if bad > 0 {
            row.problems.push(format!(
                "{bad} {} elements not finite (unwritten or NaN)",
                names[i]
            ));
        }
    }
    // Rows that see no key: out exactly 0, lse −inf.
    let seqs = spec.seqs();
    let masked = masked_rows(spec);
    row.masked_rows = masked.len();
    let mut wrong_masked = 0;
    for &(r, s, i) in &masked {
        let o = row_of(dtype, &m.first[0], r, qw);
        let l_ok = (0..spec.heads_q).all(|h| {
            let x = lse[lse_index(spec, tq, s, i, r, h)];
            x.is_infinite() && x < 0.0
        });
        if !l_ok || o.iter().any(|&x| x != 0.0) {
            wrong_masked += 1;
        }
    }
    if wrong_masked > 0 {
        row.problems.push(format!(
            "{wrong_masked} rows that see no key are not out 0 / lse -inf"
        ));
    }

    // Forward on sampled query rows (all heads).
    let seed = mix(&[cfg.seed, row.shape as u64, row.pass as u64, 0xA7]);
    let qrows = sample_rows(tq, cfg.check_rows, seed);
    let refs = par_map(&qrows, |&r| {
        let (s, i) = locate(&seqs, r, false);
        ref_forward_row(spec, host, seqs[s], r, i)
    });
    let got_out: Vec<Vec<f64>> = qrows
        .iter()
        .map(|&r| row_of(dtype, &m.first[0], r, qw))
        .collect();
    let want_out: Vec<Vec<f64>> = refs.iter().map(|x| x.0.clone()).collect();
    row.checks.push(CheckVal {
        what: "out",
        err: rel_rows(&got_out, &want_out),
        tol: tol(dtype),
    });
    let mut lse_err = 0.0f64;
    for (&r, (_, rl)) in qrows.iter().zip(&refs) {
        let (s, i) = locate(&seqs, r, false);
        for (h, &want) in rl.iter().enumerate() {
            let got = lse[lse_index(spec, tq, s, i, r, h)] as f64;
            let e = if want.is_infinite() && got == want {
                0.0
            } else {
                (got - want).abs() / want.abs().max(1.0)
            };
            lse_err = if e.is_nan() { f64::NAN } else { lse_err.max(e) };
        }
    }
    row.checks.push(CheckVal {
        what: "lse",
        err: lse_err,
        tol: LSE_TOL,
    });
    if row.pass == Pass::Fwd {
        return Ok(());
    }

    // Backward: dq on the sampled query rows, dk / dv on sampled key rows, against the f64
    // backward given this run's out and lse (the backward's own inputs).
    let f = FwdOut {
        delta: deltas(spec, host, &m.first[0], tq),
        lse,
    };
    let dq_want = par_map(&qrows, |&r| ref_dq_row(spec, host, &f, &seqs, tq, r));
    let dq_got: Vec<Vec<f64>> = qrows
        .iter()
        .map(|&r| row_of(dtype, &m.first[2], r, qw))
        .collect();
    row.checks.push(CheckVal {
        what: "dq",
        err: rel_rows(&dq_got, &dq_want),
        tol: tol(dtype),
    });
    let krows = sample_rows(tk, cfg.check_rows, seed ^ 0xC0);
    let dkv_want = par_map(&krows, |&r| ref_dkv_row(spec, host, &f, &seqs, tq, r));
    let dk_got: Vec<Vec<f64>> = krows
        .iter()
        .map(|&r| row_of(dtype, &m.first[3], r, kw))
        .collect();
    let dv_got: Vec<Vec<f64>> = krows
        .iter()
        .map(|&r| row_of(dtype, &m.first[4], r, kw))
        .collect();
    let dk_want: Vec<Vec<f64>> = dkv_want.iter().map(|x| x.0.clone()).collect();
    let dv_want: Vec<Vec<f64>> = dkv_want.iter().map(|x| x.1.clone()).collect();
    row.checks.push(CheckVal {
        what: "dk",
        err: rel_rows(&dk_got, &dk_want),
        tol: tol(dtype),
    });
    row.checks.push(CheckVal {
        what: "dv",
        err: rel_rows(&dv_got, &dv_want),
        tol: tol(dtype),
    });
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The section: count, header, rows, JSON

/// The dtypes this backend runs (the CUDA kernels take bf16 / f16 only).
fn dtypes_for(cfg: &AttnConfig<'_>, cuda: bool) -> Vec<DType> {
    cfg.dtypes
        .iter()
        .copied()
        .filter(|&d| !(cuda && d == DType::F32))
        .collect()
}

pub fn count(cfg: &AttnConfig<'_>, cuda: bool) -> usize {
    3 * cfg.shapes.len() * dtypes_for(cfg, cuda).len()
}

pub fn print_header(cfg: &AttnConfig<'_>, cuda: bool) {
    outln!(
        "attention: median of {} timed run(s) after a checked one, up to {} query rows and {} key rows checked per result (all where there are fewer)",
        cfg.iters,
        cfg.check_rows,
        cfg.check_rows
    );
    for &s in cfg.shapes {
        outln!("  {:<13} {}", s.name(), s.spec().describe());
    }
    if cuda && cfg.dtypes.contains(&DType::F32) {
        outln!("  (f32 skipped: the CUDA kernels take bf16 / f16; f32 runs on the CPU backend)");
    }
    if !cuda && cfg.shapes.iter().any(|s| CUDA_ATTN_SHAPES.contains(s)) {
        outln!(
            "  note: the CUDA shapes run on the f64 CPU backend here: expect hours (the CPU's own shapes are small, small-varlen)"
        );
    }
    outln!(
        "FLOP/s: 4*Hq*D per visible (query, key) pair (causal Sq = Sk: S^2/2, as docs/ANCHORS.md), x3.5 for fwd+bwd"
    );
    if cuda {
        outln!(
            "vs FA2*: this rate over docs/ANCHORS.md's FlashAttention-2 (SDPA flash) rate, measured on an H200 in another run; same-run comparisons: python/bench.py --ops attention"
        );
    }
    outln!(
        "out / dq / dk / dv rel = ||x - ref|| / ||ref|| on the checked rows; lse = max |lse - ref| / max(1, |ref|); same = a second run gave the same bits"
    );
    outln!(
        "fwd+bwd/a: the backward with deterministic = false (dQ summed by f32 atomics, as FA2 does); its same column covers out, lse, dk, dv"
    );
    outln!();
    outln!("{}", header(cuda));
}

fn header(cuda: bool) -> String {
    format!(
        "shape                    dtype  pass       time ms  {:>9}  {:>7}  out rel   lse err   grad rel  same  check",
        if cuda { "TFLOP/s" } else { "GFLOP/s" },
        if cuda { "vs FA2*" } else { "" }
    )
}

fn format_row(r: &AttnRow, cuda: bool) -> String {
    let (time, rate, vs) = if r.error.is_some() || r.median_s.is_nan() {
        ("-".to_string(), "-".to_string(), "-".to_string())
    } else {
        let div = if cuda { 1e12 } else { 1e9 };
        (
            format!("{:.3}", r.median_s * 1e3),
            format!("{:.1}", r.rate() / div),
            if cuda {
                r.vs_fa2().map_or("-".into(), |x| format!("{x:.2}x"))
            } else {
                String::new()
            },
        )
    };
    let status = match (&r.error, r.ok) {
        (Some(e), _) => format!("ERROR: {e}"),
        (None, true) => "ok".into(),
        (None, false) => {
            let mut s = "FAIL".to_string();
            let failed: Vec<String> = r
                .checks
                .iter()
                .filter(|c| !c.passed())
                .map(|c| format!("{} {} > {}", c.what, sci(Some(c.err)), sci(Some(c.tol))))
                .collect();
            let mut why = r.problems.clone();
            why.extend(failed);
            if r.same == Some(false) {
                why.push("second run differs".into());
            }
            if !why.is_empty() {
                s += &format!(" ({})", why.join("; "));
            }
            s
        }
    };
    let same = match r.same {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    format!(
        "{:<24} {:<6} {:<9} {time:>8}  {rate:>9}  {vs:>7}  {:>8}  {:>8}  {:>8}  {same:>4}  {status}",
        format!("{} {}", r.shape.name(), r.short),
        r.dtype.name(),
        r.pass.name(),
        sci(r.check("out")),
        sci(r.check("lse")),
        sci(r.grad_err()),
    )
}

/// Runs every shape × dtype, printing rows as they complete.
pub fn run(
    runner: &Runner,
    cfg: &AttnConfig<'_>,
    progress: &mut Progress,
    done: &mut usize,
    total: usize,
) -> Vec<AttnRow> {
    let cuda = runner.is_cuda();
    let mut out = Vec::new();
    for dtype in dtypes_for(cfg, cuda) {
        for &shape in cfg.shapes {
            let rows = run_shape(runner, cfg, shape, dtype, progress, done, total);
            progress.clear();
            for r in &rows {
                outln!("{}", format_row(r, cuda));
            }
            out.extend(rows);
        }
    }
    progress.clear();
    out
}

pub fn to_json(rows: &[AttnRow], cuda: bool) -> String {
    let mut s = String::from("[\n");
    for (i, r) in rows.iter().enumerate() {
        let ok_time = r.error.is_none() && !r.median_s.is_nan();
        let checks = r
            .checks
            .iter()
            .map(|c| {
                format!(
                    "{{\"what\": {}, \"err\": {}, \"tol\": {}}}",
                    json_str(c.what),
                    json_num(c.err),
                    json_num(c.tol)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        s += &format!(
            "    {{\"shape\": {}, \"desc\": {}, \"dtype\": {}, \"pass\": {}, \"iters\": {}, \
             \"median_ms\": {}, \"min_ms\": {}, \"bwd_median_ms\": {}, \"host_us\": {}, \"flops\": {}, \
             \"{}\": {}, \"vs_fa2_anchor\": {}, \"masked_rows\": {}, \"checks\": [{}], \"same_bits\": {}, \
             \"ok\": {}, \"problems\": [{}], \"error\": {}}}{}\n",
            json_str(r.shape.name()),
            json_str(&r.desc),
            json_str(r.dtype.name()),
            json_str(r.pass.name()),
            r.iters,
            json_opt(ok_time.then_some(r.median_s * 1e3)),
            json_opt(ok_time.then_some(r.min_s * 1e3)),
            json_opt(r.bwd_s.map(|x| x * 1e3)),
            json_opt(r.host_s.map(|x| x * 1e6)),
            json_num(r.flops),
            if cuda { "tflops" } else { "gflops" },
            json_opt(ok_time.then(|| r.rate() / if cuda { 1e12 } else { 1e9 })),
            json_opt(ok_time.then(|| r.vs_fa2()).flatten()),
            r.masked_rows,
            checks,
            r.same.map_or("null".into(), |b| b.to_string()),
            r.ok,
            json_strs(&r.problems),
            r.error.as_deref().map_or("null".into(), json_str),
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    s += "  ]";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_keys_are_bottom_right() {
        let spec = AttnShape::Small.spec();
        // Sq 4, Sk 6: query 0 sees keys 0..=2.
        assert_eq!(spec.visible(0, 4, 6), 3);
        assert_eq!(spec.visible(3, 4, 6), 6);
        // Sq 6, Sk 4: queries 0 and 1 see nothing.
        assert_eq!(spec.visible(0, 6, 4), 0);
        assert_eq!(spec.visible(1, 6, 4), 0);
        assert_eq!(spec.visible(2, 6, 4), 1);
        assert_eq!(spec.visible(0, 3, 0), 0);
    }

    #[test]
    fn flops_follow_anchors() {
        let s = AttnShape::Phi4.spec();
        assert_eq!(s.flops(), 4.0 * 4.0 * 24.0 * 4096.0 * 4096.0 * 128.0 / 2.0);
        assert_eq!(s.rows(), (4 * 4096, 4 * 4096));
        let v = AttnShape::SmallVarlen.spec();
        assert_eq!(v.rows(), (192, 215));
        assert!(!masked_rows(&v).is_empty());
    }

    #[test]
    fn reference_row_is_a_softmax_average() {
        // One sequence, one head, D 64: out of the last query row is a convex combination of the
        // value rows, and lse >= the largest score.
        let spec = Spec {
            layout: Layout::Padded {
                batch: 1,
                sq: 3,
                sk: 3,
            },
            heads_q: 1,
            heads_kv: 1,
            head_dim: 64,
            causal: true,
        };
        let mut h = Host {
            dtype: DType::F32,
            q: HostBuf::zeroed(3 * 64 * 4),
            k: HostBuf::zeroed(3 * 64 * 4),
            v: HostBuf::zeroed(3 * 64 * 4),
            dout: HostBuf::zeroed(3 * 64 * 4),
        };
        fill_normal(1, DType::F32, 64, 1.0, h.q.as_bytes_mut());
        fill_normal(2, DType::F32, 64, 1.0, h.k.as_bytes_mut());
        // v rows constant 1, 2, 3: out = the softmax-weighted mean, in (1, 3).
        for (j, c) in h.v.as_bytes_mut().chunks_exact_mut(64 * 4).enumerate() {
            for x in c.chunks_exact_mut(4) {
                x.copy_from_slice(&((j + 1) as f32).to_le_bytes());
            }
        }
        let (out, lse) = ref_forward_row(&spec, &h, (0, 3, 0, 3), 2, 2);
        assert!(out.iter().all(|&x| x > 1.0 && x < 3.0));
        assert!(out.windows(2).all(|w| (w[0] - w[1]).abs() < 1e-12));
        let (out0, lse0) = ref_forward_row(&spec, &h, (0, 3, 0, 3), 0, 0);
        assert!(out0.iter().all(|&x| (x - 1.0).abs() < 1e-12)); // row 0 sees key 0 only
        assert!(lse[0].is_finite() && lse0[0].is_finite());
    }
}
