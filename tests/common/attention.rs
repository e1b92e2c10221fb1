//! Attention test support (`common::attention`): an INDEPENDENT naive f64 reference, cases
//! (sequences, parameters, buffer layouts, random inputs), call specs in raw views that
//! bad-input tests edit, and a runner that executes a call on the CPU or on CUDA device 0 with
//! poisoned outputs, returning every buffer before and after the call.
//!
//! The reference is written straight from the math and shares no code with `src/attention/cpu.rs`:
//! per sequence and query head it expands K and V to that head, builds the full score matrix
//! with an explicit mask (0 or −∞), takes a max-shifted softmax of each row, and multiplies
//! matrices; the backward keeps per-query-head dK and dV and reduces them over the group at the
//! end.

use std::ffi::c_void;

use cudarc::driver::CudaSlice;
use distill_kernels::attention::{Attention, AttentionBackward, AttentionParams, Batch};
use distill_kernels::{Context, DType, Error, Launch, Location, VectorMut};

use super::moe::{bytes_i32, Mt, Vw};
use super::{decode, elem_bits, encode, poison_bits, poison_bytes, round_to, Bytes, Device, Rng};

/// The result of a run: the call's result, every buffer before and after.
pub type Run = (Result<(), Error>, Vec<Bytes>, Vec<Bytes>);

/// Elements of slack after the last row of every matrix buffer (NaN after inputs, poison after
/// outputs), so an edited spec (a shifted pointer, a wrong stride) that a library wrongly
/// accepted would still stay inside the allocation, and a stray write shows up.
pub const SLACK: usize = 64;

// ------------------------------------------------------------------------------------------
// Sequences
// ------------------------------------------------------------------------------------------

/// How token rows form sequences: the query and key count of each sequence, and whether the
/// call uses the padded or the varlen layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Seqs {
    pub q: Vec<usize>,
    pub k: Vec<usize>,
    pub varlen: bool,
    /// The `max_seqlen_q` passed (varlen; ≥ every query count).
    pub max_q: usize,
    /// The `max_seqlen_k` passed.
    pub max_k: usize,
}

impl Seqs {
    /// `b` sequences of `sq` queries and `sk` keys, padded layout.
    pub fn padded(b: usize, sq: usize, sk: usize) -> Self {
        Seqs {
            q: vec![sq; b],
            k: vec![sk; b],
            varlen: false,
            max_q: sq,
            max_k: sk,
        }
    }

    /// Packed sequences with these lengths; the bounds are the longest lengths.
    pub fn varlen(q: &[usize], k: &[usize]) -> Self {
        assert_eq!(q.len(), k.len());
        Seqs {
            q: q.to_vec(),
            k: k.to_vec(),
            varlen: true,
            max_q: q.iter().copied().max().unwrap_or(0),
            max_k: k.iter().copied().max().unwrap_or(0),
        }
    }

    /// The same sequences with looser bounds (`max_seqlen` + extra).
    pub fn loose_bounds(mut self, extra_q: usize, extra_k: usize) -> Self {
        self.max_q += extra_q;
        self.max_k += extra_k;
        self
    }

    pub fn batch(&self) -> usize {
        self.q.len()
    }
    pub fn total_q(&self) -> usize {
        self.q.iter().sum()
    }
    pub fn total_k(&self) -> usize {
        self.k.iter().sum()
    }
    pub fn q_start(&self, b: usize) -> usize {
        self.q[..b].iter().sum()
    }
    pub fn k_start(&self, b: usize) -> usize {
        self.k[..b].iter().sum()
    }
    fn cu(lens: &[usize]) -> Vec<i32> {
        let mut out = vec![0i32];
        for &l in lens {
            out.push(out[out.len() - 1] + l as i32);
        }
        out
    }
    pub fn cu_q(&self) -> Vec<i32> {
        Seqs::cu(&self.q)
    }
    pub fn cu_k(&self) -> Vec<i32> {
        Seqs::cu(&self.k)
    }

    /// Entry of the LSE for query `i` of sequence `b`, head `h` (padded `[B, Hq, Sq]`, varlen
    /// `[Hq, Tq]`).
    pub fn lse_index(&self, hq: usize, b: usize, h: usize, i: usize) -> usize {
        if self.varlen {
            h * self.total_q() + self.q_start(b) + i
        } else {
            (b * hq + h) * self.max_q + i
        }
    }

    pub fn describe(&self) -> String {
        if self.varlen {
            format!(
                "varlen q={:?} k={:?} max=({}, {})",
                self.q, self.k, self.max_q, self.max_k
            )
        } else {
            format!(
                "padded B={} Sq={} Sk={}",
                self.batch(),
                self.max_q,
                self.max_k
            )
        }
    }
}

/// Whether query `i` of a sequence of `sq` queries and `sk` keys sees key `j` (the causal mask
/// is aligned bottom-right: `j ≤ i + sk − sq`).
pub fn sees(causal: bool, i: usize, j: usize, sq: usize, sk: usize) -> bool {
    !causal || (j as i64) <= i as i64 + sk as i64 - sq as i64
}

// ------------------------------------------------------------------------------------------
// Layouts
// ------------------------------------------------------------------------------------------

/// Where the matrices live.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layout {
    /// Every matrix in its own buffer, rows `cols + pad` elements apart (`pad` a multiple of 8,
    /// so rows stay 16-byte aligned).
    Separate { pad: usize },
    /// Self-attention over one fused projection: q, k and v are column slices of one `qkv`
    /// buffer, dq, dk and dv of one packed `dqkv` buffer (row stride `(Hq + 2·Hkv)·D`); out and
    /// dout in their own buffers with 8 elements of padding. Needs `Tq == Tk`.
    Fused,
}

/// A matrix operand inside a buffer: first element and row stride, in elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    pub buf: usize,
    pub offset: usize,
    pub stride: usize,
}

/// Buffer indices of a forward call.
pub mod fwd_buf {
    pub const Q: usize = 0;
    pub const K: usize = 1;
    pub const V: usize = 2;
    pub const OUT: usize = 3;
    pub const LSE: usize = 4;
    pub const CU_Q: usize = 5;
    pub const CU_K: usize = 6;
    pub const COUNT: usize = 7;
}

/// Buffer indices of a backward call.
pub mod bwd_buf {
    pub const DOUT: usize = 0;
    pub const Q: usize = 1;
    pub const K: usize = 2;
    pub const V: usize = 3;
    pub const OUT: usize = 4;
    pub const LSE: usize = 5;
    pub const DQ: usize = 6;
    pub const DK: usize = 7;
    pub const DV: usize = 8;
    pub const CU_Q: usize = 9;
    pub const CU_K: usize = 10;
    pub const COUNT: usize = 11;
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

/// One attention problem: sequences, parameters, dtype, layout and inputs (compact row-major
/// `[rows, heads·D]`, already rounded to the dtype, never zero).
#[derive(Debug, Clone)]
pub struct AttnCase {
    pub dtype: DType,
    pub seqs: Seqs,
    pub params: AttentionParams,
    pub layout: Layout,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub dout: Vec<f64>,
    pub what: String,
}

/// `n` values N(0, 1) rounded to `dtype`, none of them zero.
pub fn random_values(rng: &mut Rng, dtype: DType, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| loop {
            let x = round_to(dtype, rng.normal());
            if x != 0.0 {
                break x;
            }
        })
        .collect()
}

impl AttnCase {
    /// Fresh random inputs for the shape.
    pub fn random(
        rng: &mut Rng,
        dtype: DType,
        seqs: Seqs,
        params: AttentionParams,
        layout: Layout,
    ) -> Self {
        let (tq, tk) = (seqs.total_q(), seqs.total_k());
        let qc = params.heads_q * params.head_dim;
        let kc = params.heads_kv * params.head_dim;
        let what = format!(
            "{} {} Hq={} Hkv={} D={} causal={} scale={:?} {:?}",
            dtype.name(),
            seqs.describe(),
            params.heads_q,
            params.heads_kv,
            params.head_dim,
            params.causal,
            params.softmax_scale,
            layout
        );
        AttnCase {
            dtype,
            q: random_values(rng, dtype, tq * qc),
            k: random_values(rng, dtype, tk * kc),
            v: random_values(rng, dtype, tk * kc),
            dout: random_values(rng, dtype, tq * qc),
            seqs,
            params,
            layout,
            what,
        }
    }

    pub fn hq(&self) -> usize {
        self.params.heads_q
    }
    pub fn hkv(&self) -> usize {
        self.params.heads_kv
    }
    pub fn d(&self) -> usize {
        self.params.head_dim
    }
    /// Columns of q, out, dout, dq.
    pub fn qc(&self) -> usize {
        self.hq() * self.d()
    }
    /// Columns of k, v, dk, dv.
    pub fn kc(&self) -> usize {
        self.hkv() * self.d()
    }
    pub fn tq(&self) -> usize {
        self.seqs.total_q()
    }
    pub fn tk(&self) -> usize {
        self.seqs.total_k()
    }
    pub fn lse_len(&self) -> usize {
        self.hq() * self.tq()
    }

    /// Slots of (q, k, v) in the q buffer index `qb` (fused) or `qb, qb + 1, qb + 2`.
    fn qkv_slots(&self, qb: usize) -> (Slot, Slot, Slot) {
        let (qc, kc) = (self.qc(), self.kc());
        match self.layout {
            Layout::Separate { pad } => (
                Slot {
                    buf: qb,
                    offset: 0,
                    stride: qc + pad,
                },
                Slot {
                    buf: qb + 1,
                    offset: 0,
                    stride: kc + pad,
                },
                Slot {
                    buf: qb + 2,
                    offset: 0,
                    stride: kc + pad,
                },
            ),
            Layout::Fused => {
                assert_eq!(self.tq(), self.tk(), "fused qkv needs Tq == Tk");
                let w = qc + 2 * kc;
                (
                    Slot {
                        buf: qb,
                        offset: 0,
                        stride: w,
                    },
                    Slot {
                        buf: qb,
                        offset: qc,
                        stride: w,
                    },
                    Slot {
                        buf: qb,
                        offset: qc + kc,
                        stride: w,
                    },
                )
            }
        }
    }

    /// A separate `[*, cols]` slot in buffer `buf`.
    fn own_slot(&self, buf: usize, cols: usize) -> Slot {
        let pad = match self.layout {
            Layout::Separate { pad } => pad,
            Layout::Fused => 8,
        };
        Slot {
            buf,
            offset: 0,
            stride: cols + pad,
        }
    }

    /// Forward slots: q, k, v, out.
    pub fn fwd_slots(&self) -> [Slot; 4] {
        let (q, k, v) = self.qkv_slots(fwd_buf::Q);
        [q, k, v, self.own_slot(fwd_buf::OUT, self.qc())]
    }

    /// Backward slots: dout, q, k, v, out, dq, dk, dv.
    pub fn bwd_slots(&self) -> [Slot; 8] {
        let (q, k, v) = self.qkv_slots(bwd_buf::Q);
        let (dq, dk, dv) = self.qkv_slots(bwd_buf::DQ);
        [
            self.own_slot(bwd_buf::DOUT, self.qc()),
            q,
            k,
            v,
            self.own_slot(bwd_buf::OUT, self.qc()),
            dq,
            dk,
            dv,
        ]
    }

    /// Elements buffer `buf` needs for the matrices `(slot, rows, cols)` placed in it.
    fn buffer_elems(buf: usize, mats: &[(Slot, usize, usize)]) -> usize {
        mats.iter()
            .filter(|(s, _, _)| s.buf == buf)
            .map(|(s, rows, _)| rows * s.stride)
            .max()
            .unwrap_or(0)
            + SLACK
    }

    /// Matrix buffers: inputs hold their values with NaN everywhere else, outputs are poison.
    fn matrix_bufs(
        &self,
        count: usize,
        mats: &[(Slot, usize, usize)],
        values: &[Option<&[f64]>],
    ) -> Vec<Option<Bytes>> {
        let mut out = vec![None; count];
        for (b, slot) in out.iter_mut().enumerate() {
            if !mats.iter().any(|(s, _, _)| s.buf == b) {
                continue;
            }
            let elems = AttnCase::buffer_elems(b, mats);
            let is_input = mats
                .iter()
                .zip(values)
                .any(|((s, _, _), v)| s.buf == b && v.is_some());
            if is_input {
                let mut all = vec![f64::NAN; elems];
                for ((s, rows, cols), v) in mats.iter().zip(values) {
                    if s.buf != b {
                        continue;
                    }
                    let v = v.expect("a buffer holds inputs or outputs, not both");
                    for r in 0..*rows {
                        let at = s.offset + r * s.stride;
                        all[at..at + cols].copy_from_slice(&v[r * cols..(r + 1) * cols]);
                    }
                }
                *slot = Some(Bytes::from_slice(&encode(self.dtype, &all)));
            } else {
                *slot = Some(Bytes::from_slice(&poison_bytes(self.dtype, elems)));
            }
        }
        out
    }

    fn offsets_bufs(&self) -> (Bytes, Bytes) {
        if self.seqs.varlen {
            (bytes_i32(&self.seqs.cu_q()), bytes_i32(&self.seqs.cu_k()))
        } else {
            (bytes_i32(&[0]), bytes_i32(&[0]))
        }
    }

    /// Forward buffers: inputs encoded (NaN padding), out and LSE poisoned.
    pub fn fwd_bufs(&self) -> Vec<Bytes> {
        let [q, k, v, out] = self.fwd_slots();
        let (tq, tk, qc, kc) = (self.tq(), self.tk(), self.qc(), self.kc());
        let mats = [(q, tq, qc), (k, tk, kc), (v, tk, kc), (out, tq, qc)];
        let values = [
            Some(&self.q[..]),
            Some(&self.k[..]),
            Some(&self.v[..]),
            None,
        ];
        let mut bufs = self.matrix_bufs(fwd_buf::COUNT, &mats, &values);
        bufs[fwd_buf::LSE] = Some(Bytes::from_slice(&poison_bytes(
            DType::F32,
            self.lse_len() + SLACK,
        )));
        let (cq, ck) = self.offsets_bufs();
        bufs[fwd_buf::CU_Q] = Some(cq);
        bufs[fwd_buf::CU_K] = Some(ck);
        bufs.into_iter()
            .map(|b| b.unwrap_or_else(|| Bytes::from_slice(&[0u8; 16])))
            .collect()
    }

    /// Backward buffers: inputs (dout, q, k, v, the given out and LSE) encoded, dq, dk, dv
    /// poisoned.
    pub fn bwd_bufs(&self, out_vals: &[f64], lse: &[f32]) -> Vec<Bytes> {
        let [dout, q, k, v, out, dq, dk, dv] = self.bwd_slots();
        let (tq, tk, qc, kc) = (self.tq(), self.tk(), self.qc(), self.kc());
        let mats = [
            (dout, tq, qc),
            (q, tq, qc),
            (k, tk, kc),
            (v, tk, kc),
            (out, tq, qc),
            (dq, tq, qc),
            (dk, tk, kc),
            (dv, tk, kc),
        ];
        let out_vals: Vec<f64> = out_vals.iter().map(|&x| round_to(self.dtype, x)).collect();
        let values = [
            Some(&self.dout[..]),
            Some(&self.q[..]),
            Some(&self.k[..]),
            Some(&self.v[..]),
            Some(&out_vals[..]),
            None,
            None,
            None,
        ];
        let mut bufs = self.matrix_bufs(bwd_buf::COUNT, &mats, &values);
        let mut lse_bytes: Vec<u8> = lse.iter().flat_map(|x| x.to_le_bytes()).collect();
        lse_bytes.extend(poison_bytes(DType::F32, SLACK));
        bufs[bwd_buf::LSE] = Some(Bytes::from_slice(&lse_bytes));
        let (cq, ck) = self.offsets_bufs();
        bufs[bwd_buf::CU_Q] = Some(cq);
        bufs[bwd_buf::CU_K] = Some(ck);
        bufs.into_iter()
            .map(|b| b.unwrap_or_else(|| Bytes::from_slice(&[0u8; 16])))
            .collect()
    }

    fn mt(&self, ptrs: &[*mut u8], loc: Location, s: Slot, rows: usize, cols: usize) -> Mt {
        Mt {
            ptr: ptrs[s.buf].wrapping_add(s.offset * self.dtype.size()),
            dtype: self.dtype,
            rows,
            cols,
            stride: s.stride,
            loc,
        }
    }

    fn batch_spec(&self, ptrs: &[*mut u8], cu: (usize, usize), loc: Location) -> BatchSpec {
        let s = &self.seqs;
        if s.varlen {
            BatchSpec::Varlen {
                cu_q: Vw::new(ptrs[cu.0], s.batch() + 1, loc),
                cu_k: Vw::new(ptrs[cu.1], s.batch() + 1, loc),
                max_q: s.max_q,
                max_k: s.max_k,
            }
        } else {
            BatchSpec::Padded {
                batch: s.batch(),
                seqlen_q: s.max_q,
                seqlen_k: s.max_k,
            }
        }
    }

    /// The valid forward spec over `ptrs` (from [`AttnCase::fwd_bufs`]).
    pub fn fwd_spec(&self, ptrs: &[*mut u8], loc: Location) -> FwdSpec {
        let [q, k, v, out] = self.fwd_slots();
        let (tq, tk, qc, kc) = (self.tq(), self.tk(), self.qc(), self.kc());
        FwdSpec {
            batch: self.batch_spec(ptrs, (fwd_buf::CU_Q, fwd_buf::CU_K), loc),
            q: self.mt(ptrs, loc, q, tq, qc),
            k: self.mt(ptrs, loc, k, tk, kc),
            v: self.mt(ptrs, loc, v, tk, kc),
            out: self.mt(ptrs, loc, out, tq, qc),
            lse: Vw::new(ptrs[fwd_buf::LSE], self.lse_len(), loc),
            params: self.params,
        }
    }

    /// The valid backward spec over `ptrs` (from [`AttnCase::bwd_bufs`]).
    pub fn bwd_spec(&self, ptrs: &[*mut u8], loc: Location) -> BwdSpec {
        let [dout, q, k, v, out, dq, dk, dv] = self.bwd_slots();
        let (tq, tk, qc, kc) = (self.tq(), self.tk(), self.qc(), self.kc());
        BwdSpec {
            batch: self.batch_spec(ptrs, (bwd_buf::CU_Q, bwd_buf::CU_K), loc),
            dout: self.mt(ptrs, loc, dout, tq, qc),
            q: self.mt(ptrs, loc, q, tq, qc),
            k: self.mt(ptrs, loc, k, tk, kc),
            v: self.mt(ptrs, loc, v, tk, kc),
            out: self.mt(ptrs, loc, out, tq, qc),
            lse: Vw::new(ptrs[bwd_buf::LSE], self.lse_len(), loc),
            dq: self.mt(ptrs, loc, dq, tq, qc),
            dk: self.mt(ptrs, loc, dk, tk, kc),
            dv: self.mt(ptrs, loc, dv, tk, kc),
            params: self.params,
        }
    }

    /// Runs the forward call (with `edit` applied to the valid spec).
    pub fn run_fwd_edited(&self, dev: &Device, edit: impl FnOnce(&mut FwdSpec)) -> Run {
        self.run_fwd_with(dev, &self.fwd_bufs(), edit)
    }

    /// Runs the forward call over `bufs` (from [`AttnCase::fwd_bufs`], possibly edited: other
    /// offsets) with `edit` applied to the valid spec.
    pub fn run_fwd_with(
        &self,
        dev: &Device,
        bufs: &[Bytes],
        edit: impl FnOnce(&mut FwdSpec),
    ) -> Run {
        run_bufs(
            dev,
            bufs,
            |ptrs, loc| {
                let mut s = self.fwd_spec(ptrs, loc);
                edit(&mut s);
                s
            },
            |_, _| Ok(0),
            // SAFETY: views over the case's buffers (or edited to be rejected before access).
            |s, ctx, launch| unsafe { s.run(ctx, launch) },
            Ws::Library,
        )
    }

    pub fn run_fwd(&self, dev: &Device) -> Run {
        self.run_fwd_edited(dev, |_| {})
    }

    /// Runs the backward call with the given out (rounded to the dtype here) and LSE.
    pub fn run_bwd_edited(
        &self,
        dev: &Device,
        out: &[f64],
        lse: &[f32],
        ws: Ws,
        edit: impl FnOnce(&mut BwdSpec),
    ) -> Run {
        self.run_bwd_with(dev, &self.bwd_bufs(out, lse), ws, edit)
    }

    /// Runs the backward call over `bufs` (from [`AttnCase::bwd_bufs`], possibly edited) with
    /// `edit` applied to the valid spec.
    pub fn run_bwd_with(
        &self,
        dev: &Device,
        bufs: &[Bytes],
        ws: Ws,
        edit: impl FnOnce(&mut BwdSpec),
    ) -> Run {
        run_bufs(
            dev,
            bufs,
            |ptrs, loc| {
                let mut s = self.bwd_spec(ptrs, loc);
                edit(&mut s);
                s
            },
            // SAFETY: as below; the size query reads nothing.
            |s, ctx| unsafe { s.workspace_size(ctx) },
            // SAFETY: views over the case's buffers (or edited to be rejected before access).
            |s, ctx, launch| unsafe { s.run(ctx, launch) },
            ws,
        )
    }

    pub fn run_bwd(&self, dev: &Device, out: &[f64], lse: &[f32]) -> Run {
        self.run_bwd_edited(dev, out, lse, Ws::Library, |_| {})
    }

    /// The forward outputs of a run: errors on an unwritten element, a written element outside
    /// out and the LSE, or a modified input.
    pub fn fwd_outputs(&self, before: &[Bytes], after: &[Bytes]) -> Result<FwdOut, String> {
        for (b, name) in [
            (fwd_buf::Q, "q"),
            (fwd_buf::K, "k"),
            (fwd_buf::V, "v"),
            (fwd_buf::CU_Q, "cu_seqlens_q"),
            (fwd_buf::CU_K, "cu_seqlens_k"),
        ] {
            if before[b] != after[b] {
                return Err(format!("input buffer {name} was modified"));
            }
        }
        let [_, _, _, out] = self.fwd_slots();
        let vals = read_outputs(
            self.dtype,
            "out",
            &after[fwd_buf::OUT],
            &[(out, self.tq(), self.qc())],
        )?;
        let lse = read_lse(&after[fwd_buf::LSE], self.lse_len())?;
        Ok(FwdOut {
            out: vals.into_iter().next().unwrap(),
            lse,
        })
    }

    /// The gradients of a run: errors on an unwritten element, a written element outside dq,
    /// dk and dv, or a modified input.
    pub fn bwd_outputs(&self, before: &[Bytes], after: &[Bytes]) -> Result<Grads, String> {
        for (b, name) in [
            (bwd_buf::DOUT, "dout"),
            (bwd_buf::Q, "q"),
            (bwd_buf::K, "k"),
            (bwd_buf::V, "v"),
            (bwd_buf::OUT, "out"),
            (bwd_buf::LSE, "lse"),
            (bwd_buf::CU_Q, "cu_seqlens_q"),
            (bwd_buf::CU_K, "cu_seqlens_k"),
        ] {
            if before[b] != after[b] {
                return Err(format!("input buffer {name} was modified"));
            }
        }
        let [_, _, _, _, _, dq, dk, dv] = self.bwd_slots();
        let (tq, tk, qc, kc) = (self.tq(), self.tk(), self.qc(), self.kc());
        let mut got = Vec::new();
        for b in [bwd_buf::DQ, bwd_buf::DK, bwd_buf::DV] {
            let here: Vec<(Slot, usize, usize)> = [(dq, tq, qc), (dk, tk, kc), (dv, tk, kc)]
                .into_iter()
                .filter(|(s, _, _)| s.buf == b)
                .collect();
            if !here.is_empty() {
                got.extend(read_outputs(self.dtype, "gradient", &after[b], &here)?);
            }
        }
        let mut it = got.into_iter();
        Ok(Grads {
            dq: it.next().unwrap(),
            dk: it.next().unwrap(),
            dv: it.next().unwrap(),
        })
    }
}

/// Forward outputs, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct FwdOut {
    /// `[Tq, Hq·D]` compact.
    pub out: Vec<f64>,
    pub lse: Vec<f32>,
}

/// Gradients, decoded (compact).
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// Decodes the output matrices `(slot, rows, cols)` of one buffer; errors if an element of them
/// still holds the poison or if any other element of the buffer changed from the poison.
fn read_outputs(
    dtype: DType,
    what: &str,
    buf: &Bytes,
    mats: &[(Slot, usize, usize)],
) -> Result<Vec<Vec<f64>>, String> {
    let bytes = buf.as_ref();
    let size = dtype.size();
    let total = bytes.len() / size;
    let mut inside = vec![false; total];
    let mut out = Vec::new();
    for (m, &(s, rows, cols)) in mats.iter().enumerate() {
        let mut vals = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                let i = s.offset + r * s.stride + c;
                inside[i] = true;
                if elem_bits(dtype, bytes, i) == poison_bits(dtype) {
                    return Err(format!(
                        "{what} matrix {m} element [{r}, {c}] was not written"
                    ));
                }
                vals.extend(decode(dtype, &bytes[i * size..(i + 1) * size]));
            }
        }
        out.push(vals);
    }
    for (i, &ins) in inside.iter().enumerate() {
        if !ins && elem_bits(dtype, bytes, i) != poison_bits(dtype) {
            return Err(format!(
                "{what} buffer element {i} (padding or slack) was written"
            ));
        }
    }
    Ok(out)
}

fn read_lse(buf: &Bytes, len: usize) -> Result<Vec<f32>, String> {
    let v: Vec<f32> = buf
        .as_ref()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if let Some(i) = v[..len]
        .iter()
        .position(|x| x.to_bits() == super::POISON_F32)
    {
        return Err(format!("lse[{i}] was not written"));
    }
    if let Some(i) = v[len..]
        .iter()
        .position(|x| x.to_bits() != super::POISON_F32)
    {
        return Err(format!(
            "lse[{}] past its {len} entries was written",
            len + i
        ));
    }
    Ok(v[..len].to_vec())
}

// ------------------------------------------------------------------------------------------
// Specs
// ------------------------------------------------------------------------------------------

/// The matrix view moved by `bytes` (misalignment, overlaps).
pub fn shifted(mut m: Mt, bytes: usize) -> Mt {
    m.ptr = m.ptr.wrapping_add(bytes);
    m
}

/// The batch of a call in raw views.
#[derive(Debug, Clone, Copy)]
pub enum BatchSpec {
    Padded {
        batch: usize,
        seqlen_q: usize,
        seqlen_k: usize,
    },
    Varlen {
        cu_q: Vw,
        cu_k: Vw,
        max_q: usize,
        max_k: usize,
    },
}

impl BatchSpec {
    /// # Safety
    /// The offset views must be valid for what they claim (or the call must fail before access).
    pub unsafe fn get<'a>(&self) -> Batch<'a> {
        match *self {
            BatchSpec::Padded {
                batch,
                seqlen_q,
                seqlen_k,
            } => Batch::Padded {
                batch,
                seqlen_q,
                seqlen_k,
            },
            BatchSpec::Varlen {
                cu_q,
                cu_k,
                max_q,
                max_k,
            } => Batch::Varlen {
                cu_seqlens_q: cu_q.get(),
                cu_seqlens_k: cu_k.get(),
                max_seqlen_q: max_q,
                max_seqlen_k: max_k,
            },
        }
    }
}

/// A forward call in raw views.
#[derive(Debug, Clone, Copy)]
pub struct FwdSpec {
    pub batch: BatchSpec,
    pub q: Mt,
    pub k: Mt,
    pub v: Mt,
    pub out: Mt,
    pub lse: Vw,
    pub params: AttentionParams,
}

impl FwdSpec {
    /// # Safety
    /// The views must be valid for what they claim (or the call must fail before access).
    pub unsafe fn run(&self, ctx: &Context, launch: &Launch<'_>) -> Result<(), Error> {
        ctx.attention(
            Attention {
                batch: self.batch.get(),
                q: self.q.get(),
                k: self.k.get(),
                v: self.v.get(),
                out: self.out.get_mut(),
                lse: self.lse.get_mut(),
            },
            &self.params,
            launch,
        )
    }
}

/// A backward call in raw views.
#[derive(Debug, Clone, Copy)]
pub struct BwdSpec {
    pub batch: BatchSpec,
    pub dout: Mt,
    pub q: Mt,
    pub k: Mt,
    pub v: Mt,
    pub out: Mt,
    pub lse: Vw,
    pub dq: Mt,
    pub dk: Mt,
    pub dv: Mt,
    pub params: AttentionParams,
}

impl BwdSpec {
    /// # Safety
    /// As [`FwdSpec::run`].
    unsafe fn call<'a>(&self) -> AttentionBackward<'a> {
        AttentionBackward {
            batch: self.batch.get(),
            dout: self.dout.get(),
            q: self.q.get(),
            k: self.k.get(),
            v: self.v.get(),
            out: self.out.get(),
            lse: self.lse.get(),
            dq: self.dq.get_mut(),
            dk: self.dk.get_mut(),
            dv: self.dv.get_mut(),
        }
    }

    /// # Safety
    /// As [`FwdSpec::run`].
    pub unsafe fn run(&self, ctx: &Context, launch: &Launch<'_>) -> Result<(), Error> {
        ctx.attention_backward(self.call(), &self.params, launch)
    }

    /// # Safety
    /// As [`FwdSpec::run`].
    pub unsafe fn workspace_size(&self, ctx: &Context) -> Result<usize, Error> {
        ctx.attention_backward_workspace_size(&self.call(), &self.params)
    }
}

// ------------------------------------------------------------------------------------------
// Running on a device
// ------------------------------------------------------------------------------------------

/// How a CUDA run provides its workspace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ws {
    /// The library allocates (stream-ordered).
    Library,
    /// A caller buffer of exactly the queried size.
    Exact,
    /// A caller buffer of this many bytes (at least 1 allocated).
    Bytes(usize),
    /// A caller buffer of the queried size starting 4 bytes past a 16-byte boundary.
    Misaligned,
}

/// Runs a spec built by `make` over copies of `bufs` on `dev`: host pointers on the CPU; on
/// CUDA the buffers are copied to device 0, the call runs on the test's stream (with a caller
/// workspace of `ws_size` bytes when `ws` says so), and every buffer is copied back.
pub fn run_bufs<S>(
    dev: &Device,
    bufs: &[Bytes],
    make: impl FnOnce(&[*mut u8], Location) -> S,
    ws_size: impl FnOnce(&S, &Context) -> Result<usize, Error>,
    call: impl FnOnce(&S, &Context, &Launch<'_>) -> Result<(), Error>,
    ws: Ws,
) -> Run {
    let before = bufs.to_vec();
    let mut after = bufs.to_vec();
    let res = match dev {
        Device::Cpu(ctx) => {
            let ptrs: Vec<*mut u8> = after.iter_mut().map(|b| b.ptr()).collect();
            for p in &ptrs {
                // The system allocator gives 16-byte alignment to these sizes; the tests rely on it.
                assert_eq!(*p as usize % 16, 0, "host test buffer not 16-byte aligned");
            }
            let spec = make(&ptrs, Location::Host);
            call(&spec, ctx, &Launch::default())
        }
        Device::Cuda(c) => {
            let d: Vec<CudaSlice<u8>> = after
                .iter()
                .map(|b| c.stream.clone_htod(b.as_ref()).expect("htod"))
                .collect();
            let ptrs: Vec<*mut u8> = d.iter().map(|s| c.ptr(s)).collect();
            let spec = make(&ptrs, Location::Cuda(0));
            let res = (|| {
                let ws_buf = match ws {
                    Ws::Library => None,
                    Ws::Exact | Ws::Bytes(_) | Ws::Misaligned => {
                        let bytes = match ws {
                            Ws::Bytes(b) => b,
                            _ => ws_size(&spec, &c.ctx)?,
                        };
                        let skew = if matches!(ws, Ws::Misaligned) { 4 } else { 0 };
                        // SAFETY: scratch memory; the library writes before it reads.
                        Some((
                            unsafe { c.stream.alloc::<u8>(bytes.max(1) + skew) }
                                .expect("workspace"),
                            bytes,
                            skew,
                        ))
                    }
                };
                // SAFETY: the stream is live for the whole call and belongs to device 0's
                // primary context, like the library's context.
                let mut launch = unsafe { Launch::on_stream(c.stream.cu_stream() as *mut c_void) };
                if let Some((buf, bytes, skew)) = &ws_buf {
                    // SAFETY: device memory of at least `bytes` bytes on device 0 from `skew`.
                    launch = launch.with_workspace(unsafe {
                        VectorMut::from_raw(c.ptr(buf).add(*skew), *bytes, Location::Cuda(0))
                    });
                }
                c.stream.synchronize().expect("sync before");
                let res = call(&spec, &c.ctx, &launch);
                c.stream.synchronize().expect("sync after the call");
                drop(ws_buf);
                res
            })();
            for (dd, b) in d.iter().zip(after.iter_mut()) {
                let v = c.stream.clone_dtoh(dd).expect("dtoh");
                b.as_mut().copy_from_slice(&v);
            }
            c.stream.synchronize().expect("sync after copies");
            res
        }
    };
    (res, before, after)
}

// ------------------------------------------------------------------------------------------
// Independent reference (naive f64, from the math)
// ------------------------------------------------------------------------------------------

/// Reference forward outputs.
#[derive(Debug, Clone)]
pub struct RefFwd {
    /// `[Tq, Hq·D]` compact.
    pub out: Vec<f64>,
    /// In the call's LSE layout.
    pub lse: Vec<f64>,
}

/// Reference gradients (compact).
#[derive(Debug, Clone)]
pub struct RefGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    /// ‖dq‖ and ‖dk‖ (Frobenius) of the same sums with every term taken in absolute value
    /// (|dS| ≤ P (|dP| + |Delta|), |K|, |Q|): the scale of what cancels. Where a query sees one
    /// key, dS = P (dP − Delta) is 0 exactly and so is dq, while an f32 kernel leaves rounding
    /// of the size ~1e-7 of these norms; a relative error needs them as its floor.
    pub dq_magnitude: f64,
    pub dk_magnitude: f64,
}

type Mat = Vec<Vec<f64>>;

/// Rows `start..start + n` of head `head` of a compact `[rows, heads·d]` matrix, as `n × d`.
fn head_rows(x: &[f64], cols: usize, d: usize, head: usize, start: usize, n: usize) -> Mat {
    (start..start + n)
        .map(|r| x[r * cols + head * d..r * cols + (head + 1) * d].to_vec())
        .collect()
}

fn matmul_t(a: &Mat, b: &Mat) -> Mat {
    // a [n × d] · bᵀ, b [m × d] → [n × m].
    a.iter()
        .map(|ar| {
            b.iter()
                .map(|br| ar.iter().zip(br).map(|(x, y)| x * y).sum())
                .collect()
        })
        .collect()
}

fn matmul(a: &Mat, b: &Mat, inner: usize, cols: usize) -> Mat {
    // a [n × inner] · b [inner × cols].
    a.iter()
        .map(|ar| {
            (0..cols)
                .map(|c| (0..inner).map(|t| ar[t] * b[t][c]).sum())
                .collect()
        })
        .collect()
}

fn transpose(a: &Mat, rows: usize, cols: usize) -> Mat {
    (0..cols)
        .map(|c| (0..rows).map(|r| a[r][c]).collect())
        .collect()
}

/// Softmax with its probabilities and log-sum-exp, per head and sequence: (P `[sq × sk]`,
/// lse `[sq]`), with the mask applied as −∞ scores.
fn probabilities(case: &AttnCase, q: &Mat, k: &Mat, sq: usize, sk: usize) -> (Mat, Vec<f64>) {
    let scale = case.params.scale() as f64;
    let mut s = matmul_t(q, k);
    for (i, row) in s.iter_mut().enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            *x = *x * scale
                + if sees(case.params.causal, i, j, sq, sk) {
                    0.0
                } else {
                    f64::NEG_INFINITY
                };
        }
    }
    let mut lse = Vec::with_capacity(sq);
    for row in s.iter_mut() {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            // No visible key: P = 0, lse = −∞.
            row.iter_mut().for_each(|x| *x = 0.0);
            lse.push(f64::NEG_INFINITY);
            continue;
        }
        let z: f64 = row.iter().map(|&x| (x - m).exp()).sum();
        row.iter_mut().for_each(|x| *x = (*x - m).exp() / z);
        lse.push(m + z.ln());
    }
    (s, lse)
}

/// The forward pass of `case` from its (rounded) inputs.
pub fn reference_forward(case: &AttnCase) -> RefFwd {
    let (hq, d, qc, kc) = (case.hq(), case.d(), case.qc(), case.kc());
    let group = hq / case.hkv();
    let mut out = vec![0.0; case.tq() * qc];
    let mut lse = vec![0.0; case.lse_len()];
    for b in 0..case.seqs.batch() {
        let (sq, sk) = (case.seqs.q[b], case.seqs.k[b]);
        let (q0, k0) = (case.seqs.q_start(b), case.seqs.k_start(b));
        for h in 0..hq {
            // K and V expanded to query head h.
            let q = head_rows(&case.q, qc, d, h, q0, sq);
            let k = head_rows(&case.k, kc, d, h / group, k0, sk);
            let v = head_rows(&case.v, kc, d, h / group, k0, sk);
            let (p, l) = probabilities(case, &q, &k, sq, sk);
            let o = matmul(&p, &v, sk, d);
            for i in 0..sq {
                out[(q0 + i) * qc + h * d..(q0 + i) * qc + (h + 1) * d].copy_from_slice(&o[i]);
                lse[case.seqs.lse_index(hq, b, h, i)] = l[i];
            }
        }
    }
    RefFwd { out, lse }
}

/// The gradients of `L = Σ dout ∘ out` w.r.t. q, k and v. `delta_out`: the out the backend is
/// given (compact `[Tq, Hq·D]`), whose `rowsum(dout ∘ out)` is used as Delta like the kernels
/// do; `None` uses `rowsum(P ∘ dP)`, the exact value.
pub fn reference_backward(case: &AttnCase, delta_out: Option<&[f64]>) -> RefGrads {
    let (hq, d, qc, kc) = (case.hq(), case.d(), case.qc(), case.kc());
    let hkv = case.hkv();
    let group = hq / hkv;
    let scale = case.params.scale() as f64;
    let mut dq = vec![0.0; case.tq() * qc];
    let mut dk = vec![0.0; case.tk() * kc];
    let mut dv = vec![0.0; case.tk() * kc];
    let mut dq_mag2 = 0.0;
    let mut dk_mag = vec![0.0; case.tk() * kc];
    let abs = |m: &Mat| -> Mat {
        m.iter()
            .map(|r| r.iter().map(|x| x.abs()).collect())
            .collect()
    };
    for b in 0..case.seqs.batch() {
        let (sq, sk) = (case.seqs.q[b], case.seqs.k[b]);
        let (q0, k0) = (case.seqs.q_start(b), case.seqs.k_start(b));
        // Per query head gradients of the expanded K and V, reduced over the group below.
        let mut dk_heads: Vec<Mat> = Vec::new();
        let mut dk_mag_heads: Vec<Mat> = Vec::new();
        let mut dv_heads: Vec<Mat> = Vec::new();
        for h in 0..hq {
            let q = head_rows(&case.q, qc, d, h, q0, sq);
            let k = head_rows(&case.k, kc, d, h / group, k0, sk);
            let v = head_rows(&case.v, kc, d, h / group, k0, sk);
            let dout = head_rows(&case.dout, qc, d, h, q0, sq);
            let (p, _) = probabilities(case, &q, &k, sq, sk);
            let pt = transpose(&p, sq, sk);
            dv_heads.push(matmul(&pt, &dout, sq, d));
            let dp = matmul_t(&dout, &v);
            let delta: Vec<f64> = match delta_out {
                Some(o) => {
                    let o = head_rows(o, qc, d, h, q0, sq);
                    (0..sq)
                        .map(|i| (0..d).map(|c| dout[i][c] * o[i][c]).sum())
                        .collect()
                }
                None => (0..sq)
                    .map(|i| (0..sk).map(|j| p[i][j] * dp[i][j]).sum())
                    .collect(),
            };
            let ds: Mat = (0..sq)
                .map(|i| (0..sk).map(|j| p[i][j] * (dp[i][j] - delta[i])).collect())
                .collect();
            let dq_h = matmul(&ds, &k, sk, d);
            let dk_h = matmul(&transpose(&ds, sq, sk), &q, sq, d);
            dk_heads.push(dk_h);
            let ds_abs: Mat = (0..sq)
                .map(|i| {
                    (0..sk)
                        .map(|j| p[i][j] * (dp[i][j].abs() + delta[i].abs()))
                        .collect()
                })
                .collect();
            let dq_mag_h = matmul(&ds_abs, &abs(&k), sk, d);
            dq_mag2 += dq_mag_h
                .iter()
                .flatten()
                .map(|x| (scale * x).powi(2))
                .sum::<f64>();
            dk_mag_heads.push(matmul(&transpose(&ds_abs, sq, sk), &abs(&q), sq, d));
            for i in 0..sq {
                for c in 0..d {
                    dq[(q0 + i) * qc + h * d + c] = scale * dq_h[i][c];
                }
            }
        }
        for h in 0..hq {
            let g = h / group;
            for j in 0..sk {
                for c in 0..d {
                    dk[(k0 + j) * kc + g * d + c] += scale * dk_heads[h][j][c];
                    dk_mag[(k0 + j) * kc + g * d + c] += scale * dk_mag_heads[h][j][c];
                    dv[(k0 + j) * kc + g * d + c] += dv_heads[h][j][c];
                }
            }
        }
    }
    RefGrads {
        dq,
        dk,
        dv,
        dq_magnitude: dq_mag2.sqrt(),
        dk_magnitude: dk_mag.iter().map(|x| x * x).sum::<f64>().sqrt(),
    }
}

/// Query rows (global) × heads that see no key: `(row, head)`.
pub fn masked_rows(case: &AttnCase) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for b in 0..case.seqs.batch() {
        let (sq, sk) = (case.seqs.q[b], case.seqs.k[b]);
        for i in 0..sq {
            if !(0..sk).any(|j| sees(case.params.causal, i, j, sq, sk)) {
                for h in 0..case.hq() {
                    out.push((case.seqs.q_start(b) + i, h));
                }
            }
        }
    }
    out
}

/// Key rows (global) no query of their sequence sees.
pub fn unseen_keys(case: &AttnCase) -> Vec<usize> {
    let mut out = Vec::new();
    for b in 0..case.seqs.batch() {
        let (sq, sk) = (case.seqs.q[b], case.seqs.k[b]);
        for j in 0..sk {
            if !(0..sq).any(|i| sees(case.params.causal, i, j, sq, sk)) {
                out.push(case.seqs.k_start(b) + j);
            }
        }
    }
    out
}
