//! MoE test support (`common::moe`): buffers, call specs and a runner that executes a call on the
//! CPU or on CUDA device 0 with poisoned outputs, returning every buffer before and after.
//!
//! A call is described by a *spec*: the raw views (pointer, shape, length, location) of each
//! operand. Cases build a valid spec over their buffers; bad-input tests edit one field of it.
//! Buffers are allocated generously, so a wrong length claimed by an edited spec never lets a
//! library that wrongly went ahead leave the allocation.

use std::ffi::c_void;

use cudarc::driver::CudaSlice;
use distill_kernels::moe::{Combine, Permute, Route, RouteParams, SlotDot};
use distill_kernels::{
    Context, DType, Error, Launch, Location, Matrix, MatrixMut, Vector, VectorMut,
};

use super::{decode, elem_bits, encode, poison_bits, poison_bytes, Bytes, Device, Logits, Rng};

/// The bit pattern int32 outputs are poisoned with (no valid id, count, offset or −1).
pub const POISON_I32: i32 = 0xFFBA_DBADu32 as i32;

// ------------------------------------------------------------------------------------------
// Buffers
// ------------------------------------------------------------------------------------------

pub fn bytes_i32(v: &[i32]) -> Bytes {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Bytes::from_slice(&b)
}

pub fn bytes_f32(v: &[f32]) -> Bytes {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Bytes::from_slice(&b)
}

pub fn to_i32s(b: &Bytes) -> Vec<i32> {
    b.as_ref()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn to_f32s(b: &Bytes) -> Vec<f32> {
    b.as_ref()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `len` poisoned int32 entries (at least 1, so no buffer is empty).
pub fn poison_i32(len: usize) -> Bytes {
    bytes_i32(&vec![POISON_I32; len.max(1)])
}

/// `len` poisoned f32 entries (at least 1).
pub fn poison_f32s(len: usize) -> Bytes {
    Bytes::from_slice(&poison_bytes(DType::F32, len.max(1)))
}

/// A poisoned `rows × stride` matrix buffer of `dtype` (at least 1 element).
pub fn poison_matrix(dtype: DType, rows: usize, stride: usize) -> Bytes {
    Bytes::from_slice(&poison_bytes(dtype, (rows * stride).max(1)))
}

/// A placeholder for an absent optional operand (never passed to the library).
pub fn dummy() -> Bytes {
    Bytes::from_slice(&[0u8; 8])
}

/// Decodes the `rows × cols` values of a `stride` matrix buffer; errors if any of them still
/// holds the poison, or if a padding element (columns `cols..stride`) was written.
pub fn read_matrix(
    dtype: DType,
    b: &Bytes,
    rows: usize,
    cols: usize,
    stride: usize,
) -> Result<Vec<f64>, String> {
    let bytes = b.as_ref();
    let size = dtype.size();
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..stride {
            let i = r * stride + c;
            let bits = elem_bits(dtype, bytes, i);
            if c < cols {
                if bits == poison_bits(dtype) {
                    return Err(format!("element [{r}, {c}] was not written"));
                }
                out.extend(decode(dtype, &bytes[i * size..(i + 1) * size]));
            } else if bits != poison_bits(dtype) {
                return Err(format!(
                    "padding element [{r}, {c}] (stride {stride}) was written"
                ));
            }
        }
    }
    Ok(out)
}

/// A `rows × cols` matrix of random values N(0, 1) (never all zero), rounded to `dtype`.
pub fn random_matrix(
    rng: &mut Rng,
    dtype: DType,
    rows: usize,
    cols: usize,
    stride: usize,
) -> Logits {
    let vals: Vec<f64> = (0..rows * cols).map(|_| rng.normal()).collect();
    Logits::new(dtype, rows, cols, &vals).with_stride(stride)
}

/// Encodes a matrix with NaN padding (as `Logits::encode`), at least 1 element.
pub fn matrix_bytes(m: &Logits) -> Bytes {
    Bytes::from_slice(&m.encode())
}

/// f32 weights in `[0.25, 1.25)` (never zero), `len` of them.
pub fn random_weights(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.range(0.25, 1.25) as f32).collect()
}

/// Exact encoding of `xs` rounded to `dtype` (for bias or weights given as f64).
pub fn rounded(dtype: DType, xs: &[f64]) -> Vec<f64> {
    decode(dtype, &encode(dtype, xs))
}

// ------------------------------------------------------------------------------------------
// Views
// ------------------------------------------------------------------------------------------

/// A raw vector view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vw {
    pub ptr: *mut u8,
    pub len: usize,
    pub loc: Location,
}

impl Vw {
    pub fn new(ptr: *mut u8, len: usize, loc: Location) -> Self {
        Vw { ptr, len, loc }
    }
    /// # Safety
    /// `ptr` must be valid for `len` reads of `T` at `loc` (or the call must fail before access).
    pub unsafe fn get<'a, T>(&self) -> Vector<'a, T> {
        Vector::from_raw(self.ptr as *const T, self.len, self.loc)
    }
    /// # Safety
    /// As [`Vw::get`], for writes too.
    pub unsafe fn get_mut<'a, T>(&self) -> VectorMut<'a, T> {
        VectorMut::from_raw(self.ptr as *mut T, self.len, self.loc)
    }
    /// The same view shifted by `elems` elements of `size` bytes (misalignment, overlaps).
    pub fn shifted(mut self, bytes: usize) -> Self {
        self.ptr = self.ptr.wrapping_add(bytes);
        self
    }
    pub fn null(mut self) -> Self {
        self.ptr = std::ptr::null_mut();
        self
    }
}

/// A raw matrix view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mt {
    pub ptr: *mut u8,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    pub loc: Location,
}

impl Mt {
    /// # Safety
    /// `ptr` must be valid for the matrix at `loc` (or the call must fail before access).
    pub unsafe fn get<'a>(&self) -> Matrix<'a> {
        Matrix::from_raw(
            self.ptr,
            self.dtype,
            self.rows,
            self.cols,
            self.stride,
            self.loc,
        )
    }
    /// # Safety
    /// As [`Mt::get`], for writes too.
    pub unsafe fn get_mut<'a>(&self) -> MatrixMut<'a> {
        MatrixMut::from_raw(
            self.ptr,
            self.dtype,
            self.rows,
            self.cols,
            self.stride,
            self.loc,
        )
    }
    pub fn null(mut self) -> Self {
        self.ptr = std::ptr::null_mut();
        self
    }
}

/// A route call in raw views.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub logits: Mt,
    pub bias: Option<Vw>,
    pub expert_ids: Vw,
    pub weights: Vw,
    pub counts: Vw,
    pub offsets: Vw,
    pub perm: Vw,
    pub position: Vw,
    pub params: RouteParams,
}

impl RouteSpec {
    /// # Safety
    /// The views must be valid for what they claim (or the call must fail before access).
    pub unsafe fn run(&self, ctx: &Context, launch: &Launch<'_>) -> Result<(), Error> {
        ctx.moe_route(
            Route {
                logits: self.logits.get(),
                bias: self.bias.map(|b| b.get()),
                expert_ids: self.expert_ids.get_mut(),
                weights: self.weights.get_mut(),
                counts: self.counts.get_mut(),
                offsets: self.offsets.get_mut(),
                perm: self.perm.get_mut(),
                position: self.position.get_mut(),
            },
            &self.params,
            launch,
        )
    }
}

/// A permute call in raw views.
#[derive(Debug, Clone, Copy)]
pub struct PermuteSpec {
    pub x: Mt,
    pub k: usize,
    pub perm: Vw,
    pub weights: Option<Vw>,
    pub out: Mt,
}

impl PermuteSpec {
    /// # Safety
    /// As [`RouteSpec::run`].
    pub unsafe fn run(&self, ctx: &Context, launch: &Launch<'_>) -> Result<(), Error> {
        ctx.moe_permute(
            Permute {
                x: self.x.get(),
                k: self.k,
                perm: self.perm.get(),
                weights: self.weights.map(|w| w.get()),
                out: self.out.get_mut(),
            },
            launch,
        )
    }
}

/// A combine call in raw views.
#[derive(Debug, Clone, Copy)]
pub struct CombineSpec {
    pub rows: Mt,
    pub k: usize,
    pub position: Vw,
    pub weights: Option<Vw>,
    pub y: Mt,
}

impl CombineSpec {
    /// # Safety
    /// As [`RouteSpec::run`].
    pub unsafe fn run(&self, ctx: &Context, launch: &Launch<'_>) -> Result<(), Error> {
        ctx.moe_combine(
            Combine {
                rows: self.rows.get(),
                k: self.k,
                position: self.position.get(),
                weights: self.weights.map(|w| w.get()),
                y: self.y.get_mut(),
            },
            launch,
        )
    }
}

/// A slot-dot call in raw views.
#[derive(Debug, Clone, Copy)]
pub struct SlotDotSpec {
    pub tokens: Mt,
    pub rows: Mt,
    pub k: usize,
    pub position: Vw,
    pub out: Vw,
}

impl SlotDotSpec {
    /// # Safety
    /// As [`RouteSpec::run`].
    pub unsafe fn run(&self, ctx: &Context, launch: &Launch<'_>) -> Result<(), Error> {
        ctx.moe_slot_dot(
            SlotDot {
                tokens: self.tokens.get(),
                rows: self.rows.get(),
                k: self.k,
                position: self.position.get(),
                out: self.out.get_mut(),
            },
            launch,
        )
    }
}

// ------------------------------------------------------------------------------------------
// Running on a device
// ------------------------------------------------------------------------------------------

/// Runs `f` over `bufs` on `dev`: host pointers on the CPU; on CUDA the buffers are copied to
/// device 0, `f` runs on the test's stream, and every buffer is copied back.
pub fn run_on(
    dev: &Device,
    bufs: &mut [Bytes],
    f: impl FnOnce(&Context, &[*mut u8], Location, &Launch<'_>) -> Result<(), Error>,
) -> Result<(), Error> {
    match dev {
        Device::Cpu(ctx) => {
            let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.ptr()).collect();
            f(ctx, &ptrs, Location::Host, &Launch::default())
        }
        Device::Cuda(c) => {
            let d: Vec<CudaSlice<u8>> = bufs
                .iter()
                .map(|b| c.stream.clone_htod(b.as_ref()).expect("htod"))
                .collect();
            let ptrs: Vec<*mut u8> = d.iter().map(|s| c.ptr(s)).collect();
            // SAFETY: the stream is live for the whole call and belongs to device 0's primary
            // context, like the library's context.
            let launch = unsafe { Launch::on_stream(c.stream.cu_stream() as *mut c_void) };
            c.stream.synchronize().expect("sync before");
            let result = f(&c.ctx, &ptrs, Location::Cuda(0), &launch);
            c.stream.synchronize().expect("sync after the call");
            for (dd, b) in d.iter().zip(bufs.iter_mut()) {
                let v = c.stream.clone_dtoh(dd).expect("dtoh");
                b.as_mut().copy_from_slice(&v);
            }
            c.stream.synchronize().expect("sync after copies");
            result
        }
    }
}

/// Runs a spec built by `make` over copies of `bufs`; returns the result and the buffers
/// before and after.
pub fn run_spec<S>(
    dev: &Device,
    bufs: &[Bytes],
    make: impl FnOnce(&[*mut u8], Location) -> S,
    call: impl FnOnce(&S, &Context, &Launch<'_>) -> Result<(), Error>,
) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
    let before = bufs.to_vec();
    let mut after = bufs.to_vec();
    let res = run_on(dev, &mut after, |ctx, ptrs, loc, launch| {
        let spec = make(ptrs, loc);
        call(&spec, ctx, launch)
    });
    (res, before, after)
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

/// A route call: logits (rounded to their dtype), optional bias, parameters, perm entries.
#[derive(Debug, Clone)]
pub struct RouteCase {
    pub logits: Logits,
    pub bias: Option<Vec<f32>>,
    pub params: RouteParams,
    pub perm_rows: usize,
    pub what: String,
}

/// Buffer order of a route case.
pub mod route_buf {
    pub const LOGITS: usize = 0;
    pub const BIAS: usize = 1;
    pub const IDS: usize = 2;
    pub const WEIGHTS: usize = 3;
    pub const COUNTS: usize = 4;
    pub const OFFSETS: usize = 5;
    pub const PERM: usize = 6;
    pub const POSITION: usize = 7;
}

/// Decoded route outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOut {
    pub expert_ids: Vec<i32>,
    pub weights: Vec<f32>,
    pub counts: Vec<i32>,
    pub offsets: Vec<i32>,
    pub perm: Vec<i32>,
    pub position: Vec<i32>,
}

impl RouteCase {
    pub fn new(logits: Logits, bias: Option<Vec<f32>>, params: RouteParams) -> Self {
        let perm_rows = params.max_rows(logits.rows, logits.cols);
        let what = format!(
            "route N={} E={} {} k={} {} renorm={} groups={}/{} scale={} cap={:?} block={} bias={}",
            logits.rows,
            logits.cols,
            logits.dtype.name(),
            params.k,
            params.score.name(),
            params.renormalize,
            params.topk_groups,
            params.n_groups,
            params.scale,
            params.capacity,
            params.block,
            bias.is_some()
        );
        RouteCase {
            logits,
            bias,
            params,
            perm_rows,
            what,
        }
    }

    pub fn n(&self) -> usize {
        self.logits.rows
    }
    pub fn e(&self) -> usize {
        self.logits.cols
    }
    pub fn slots(&self) -> usize {
        self.n() * self.params.k
    }

    /// Inputs encoded, outputs poisoned (each vector a little longer than needed).
    pub fn bufs(&self) -> Vec<Bytes> {
        let (e, s) = (self.e(), self.slots());
        vec![
            matrix_bytes(&self.logits),
            self.bias.as_ref().map_or_else(dummy, |b| bytes_f32(b)),
            poison_i32(s + 8),
            poison_f32s(s + 8),
            poison_i32(e + 8),
            poison_i32(e + 9),
            poison_i32(self.perm_rows + 8),
            poison_i32(s + 8),
        ]
    }

    /// The valid spec over `ptrs` (from [`RouteCase::bufs`]).
    pub fn spec(&self, ptrs: &[*mut u8], loc: Location) -> RouteSpec {
        use route_buf::*;
        let (n, e, s) = (self.n(), self.e(), self.slots());
        let l = &self.logits;
        RouteSpec {
            logits: Mt {
                ptr: ptrs[LOGITS],
                dtype: l.dtype,
                rows: n,
                cols: e,
                stride: l.stride,
                loc,
            },
            bias: self.bias.as_ref().map(|_| Vw::new(ptrs[BIAS], e, loc)),
            expert_ids: Vw::new(ptrs[IDS], s, loc),
            weights: Vw::new(ptrs[WEIGHTS], s, loc),
            counts: Vw::new(ptrs[COUNTS], e, loc),
            offsets: Vw::new(ptrs[OFFSETS], e + 1, loc),
            perm: Vw::new(ptrs[PERM], self.perm_rows, loc),
            position: Vw::new(ptrs[POSITION], s, loc),
            params: self.params,
        }
    }

    /// Runs the case (with `edit` applied to the valid spec).
    pub fn run_edited(
        &self,
        dev: &Device,
        edit: impl FnOnce(&mut RouteSpec),
    ) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
        run_spec(
            dev,
            &self.bufs(),
            |ptrs, loc| {
                let mut s = self.spec(ptrs, loc);
                edit(&mut s);
                s
            },
            // SAFETY: views over the case's buffers (or edited to be rejected before access).
            |s, ctx, launch| unsafe { s.run(ctx, launch) },
        )
    }

    pub fn run(&self, dev: &Device) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
        self.run_edited(dev, |_| {})
    }

    /// The outputs of a run (the exact lengths; the tails are checked by [`RouteCase::tails`]).
    pub fn outputs(&self, after: &[Bytes]) -> RouteOut {
        use route_buf::*;
        let (e, s) = (self.e(), self.slots());
        RouteOut {
            expert_ids: to_i32s(&after[IDS])[..s].to_vec(),
            weights: to_f32s(&after[WEIGHTS])[..s].to_vec(),
            counts: to_i32s(&after[COUNTS])[..e].to_vec(),
            offsets: to_i32s(&after[OFFSETS])[..e + 1].to_vec(),
            perm: to_i32s(&after[PERM])[..self.perm_rows].to_vec(),
            position: to_i32s(&after[POSITION])[..s].to_vec(),
        }
    }

    /// Errors if an output element was not written or one past its vector was.
    pub fn tails(&self, before: &[Bytes], after: &[Bytes]) -> Result<(), String> {
        use route_buf::*;
        if before[LOGITS] != after[LOGITS] || before[BIAS] != after[BIAS] {
            return Err("route inputs were modified".into());
        }
        let (e, s) = (self.e(), self.slots());
        for (name, i, len) in [
            ("expert_ids", IDS, s),
            ("weights", WEIGHTS, s),
            ("counts", COUNTS, e),
            ("offsets", OFFSETS, e + 1),
            ("perm", PERM, self.perm_rows),
            ("position", POSITION, s),
        ] {
            let words = to_i32s(&after[i]);
            if let Some(j) = words[..len].iter().position(|&w| w == POISON_I32) {
                return Err(format!("{name}[{j}] was not written"));
            }
            if let Some(j) = words[len..].iter().position(|&w| w != POISON_I32) {
                return Err(format!(
                    "{name}[{}] past its {len} entries was written",
                    len + j
                ));
            }
        }
        Ok(())
    }
}

/// Buffer order of permute / combine / slot-dot cases: [input matrix, second input (perm,
/// position or permuted rows), third (weights, position or dummy), output].
pub mod act_buf {
    pub const A: usize = 0;
    pub const B: usize = 1;
    pub const C: usize = 2;
    pub const OUT: usize = 3;
}

/// A permute call.
#[derive(Debug, Clone)]
pub struct PermuteCase {
    pub x: Logits,
    pub k: usize,
    pub perm: Vec<i32>,
    pub weights: Option<Vec<f32>>,
    pub out_stride: usize,
    pub what: String,
}

impl PermuteCase {
    pub fn rows(&self) -> usize {
        self.perm.len()
    }
    pub fn bufs(&self) -> Vec<Bytes> {
        let slots = self.x.rows * self.k;
        vec![
            matrix_bytes(&self.x),
            bytes_i32(&self.perm),
            self.weights
                .as_ref()
                .map_or_else(dummy, |w| bytes_f32(&w[..slots])),
            poison_matrix(self.x.dtype, self.rows(), self.out_stride),
        ]
    }
    pub fn spec(&self, ptrs: &[*mut u8], loc: Location) -> PermuteSpec {
        use act_buf::*;
        let x = &self.x;
        PermuteSpec {
            x: Mt {
                ptr: ptrs[A],
                dtype: x.dtype,
                rows: x.rows,
                cols: x.cols,
                stride: x.stride,
                loc,
            },
            k: self.k,
            perm: Vw::new(ptrs[B], self.rows(), loc),
            weights: self
                .weights
                .as_ref()
                .map(|_| Vw::new(ptrs[C], x.rows * self.k, loc)),
            out: Mt {
                ptr: ptrs[OUT],
                dtype: x.dtype,
                rows: self.rows(),
                cols: x.cols,
                stride: self.out_stride,
                loc,
            },
        }
    }
    pub fn run_edited(
        &self,
        dev: &Device,
        edit: impl FnOnce(&mut PermuteSpec),
    ) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
        run_spec(
            dev,
            &self.bufs(),
            |ptrs, loc| {
                let mut s = self.spec(ptrs, loc);
                edit(&mut s);
                s
            },
            // SAFETY: views over the case's buffers (or edited to be rejected before access).
            |s, ctx, launch| unsafe { s.run(ctx, launch) },
        )
    }
    pub fn run(&self, dev: &Device) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
        self.run_edited(dev, |_| {})
    }
    /// The output values (errors on unwritten elements or written padding).
    pub fn output(&self, after: &[Bytes]) -> Result<Vec<f64>, String> {
        read_matrix(
            self.x.dtype,
            &after[act_buf::OUT],
            self.rows(),
            self.x.cols,
            self.out_stride,
        )
    }
}

/// A combine call.
#[derive(Debug, Clone)]
pub struct CombineCase {
    /// Permuted rows `[R, H]`.
    pub rows: Logits,
    pub n: usize,
    pub position: Vec<i32>,
    pub weights: Option<Vec<f32>>,
    pub y_stride: usize,
    pub what: String,
}

impl CombineCase {
    pub fn bufs(&self) -> Vec<Bytes> {
        vec![
            matrix_bytes(&self.rows),
            bytes_i32(&self.position),
            self.weights.as_ref().map_or_else(dummy, |w| bytes_f32(w)),
            poison_matrix(self.rows.dtype, self.n, self.y_stride),
        ]
    }
    pub fn spec(&self, ptrs: &[*mut u8], loc: Location) -> CombineSpec {
        use act_buf::*;
        let r = &self.rows;
        CombineSpec {
            rows: Mt {
                ptr: ptrs[A],
                dtype: r.dtype,
                rows: r.rows,
                cols: r.cols,
                stride: r.stride,
                loc,
            },
            k: self.position.len() / self.n,
            position: Vw::new(ptrs[B], self.position.len(), loc),
            weights: self
                .weights
                .as_ref()
                .map(|w| Vw::new(ptrs[C], w.len(), loc)),
            y: Mt {
                ptr: ptrs[OUT],
                dtype: r.dtype,
                rows: self.n,
                cols: r.cols,
                stride: self.y_stride,
                loc,
            },
        }
    }
    pub fn run_edited(
        &self,
        dev: &Device,
        edit: impl FnOnce(&mut CombineSpec),
    ) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
        run_spec(
            dev,
            &self.bufs(),
            |ptrs, loc| {
                let mut s = self.spec(ptrs, loc);
                edit(&mut s);
                s
            },
            // SAFETY: views over the case's buffers (or edited to be rejected before access).
            |s, ctx, launch| unsafe { s.run(ctx, launch) },
        )
    }
    pub fn run(&self, dev: &Device) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
        self.run_edited(dev, |_| {})
    }
    pub fn output(&self, after: &[Bytes]) -> Result<Vec<f64>, String> {
        read_matrix(
            self.rows.dtype,
            &after[act_buf::OUT],
            self.n,
            self.rows.cols,
            self.y_stride,
        )
    }
}

/// A slot-dot call.
#[derive(Debug, Clone)]
pub struct SlotDotCase {
    pub tokens: Logits,
    /// Permuted rows `[R, H]`, same dtype.
    pub rows: Logits,
    pub position: Vec<i32>,
    pub what: String,
}

impl SlotDotCase {
    pub fn bufs(&self) -> Vec<Bytes> {
        vec![
            matrix_bytes(&self.tokens),
            matrix_bytes(&self.rows),
            bytes_i32(&self.position),
            poison_f32s(self.position.len() + 8),
        ]
    }
    pub fn spec(&self, ptrs: &[*mut u8], loc: Location) -> SlotDotSpec {
        use act_buf::*;
        let (t, r) = (&self.tokens, &self.rows);
        SlotDotSpec {
            tokens: Mt {
                ptr: ptrs[A],
                dtype: t.dtype,
                rows: t.rows,
                cols: t.cols,
                stride: t.stride,
                loc,
            },
            rows: Mt {
                ptr: ptrs[B],
                dtype: r.dtype,
                rows: r.rows,
                cols: r.cols,
                stride: r.stride,
                loc,
            },
            k: self.position.len() / t.rows,
            position: Vw::new(ptrs[C], self.position.len(), loc),
            out: Vw::new(ptrs[OUT], self.position.len(), loc),
        }
    }
    pub fn run_edited(
        &self,
        dev: &Device,
        edit: impl FnOnce(&mut SlotDotSpec),
    ) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
        run_spec(
            dev,
            &self.bufs(),
            |ptrs, loc| {
                let mut s = self.spec(ptrs, loc);
                edit(&mut s);
                s
            },
            // SAFETY: views over the case's buffers (or edited to be rejected before access).
            |s, ctx, launch| unsafe { s.run(ctx, launch) },
        )
    }
    pub fn run(&self, dev: &Device) -> (Result<(), Error>, Vec<Bytes>, Vec<Bytes>) {
        self.run_edited(dev, |_| {})
    }
    /// The `N·k` outputs (errors on unwritten entries or a written tail).
    pub fn output(&self, after: &[Bytes]) -> Result<Vec<f64>, String> {
        let v = to_f32s(&after[act_buf::OUT]);
        let len = self.position.len();
        if let Some(i) = v[..len]
            .iter()
            .position(|x| x.to_bits() == super::POISON_F32)
        {
            return Err(format!("slot-dot output {i} was not written"));
        }
        if v[len..].iter().any(|x| x.to_bits() != super::POISON_F32) {
            return Err("slot-dot output written past N·k".into());
        }
        Ok(v[..len].iter().map(|&x| x as f64).collect())
    }
}
