//! Validation of attention calls: everything that can be checked before anything is written,
//! turning the public views into the raw structs the backends consume. On error nothing has
//! been written.
//!
//! The checks, in this order (the first failing one is reported, naming the argument):
//!
//! 1. the parameters ([`AttentionParams::validate`]);
//! 2. every view lives where the context runs ([`WrongDevice`](crate::ErrorKind::WrongDevice)):
//!    q, k, v, out, lse (forward), dout, q, k, v, out, lse, dq, dk, dv (backward), and both
//!    `cu_seqlens` arrays of a varlen batch;
//! 3. no null pointer for an operand holding at least one element
//!    ([`NullPointer`](crate::ErrorKind::NullPointer)); an empty operand (no rows, or an empty
//!    LSE) may be null;
//! 4. dtypes ([`UnsupportedDtype`](crate::ErrorKind::UnsupportedDtype)): q is bf16 or f16, or
//!    f32 on the CPU context only (the CUDA kernels are tensor-core kernels for 16-bit inputs);
//!    every other matrix has q's dtype (the LSE is f32 by type);
//! 5. shapes ([`Shape`](crate::ErrorKind::Shape)): q has `Hq·D` columns, k and v `Hkv·D`, k and v
//!    the same rows, out / dout / dq the shape of q, dk / dv the shape of k; padded: q has `B·Sq`
//!    rows, k `B·Sk`; varlen: both offset arrays have `B + 1 ≥ 1` entries and the length bounds
//!    can hold the rows (`B·max_seqlen ≥ rows`); the LSE has `Hq·Tq` entries; B, Sq, Sk (or the
//!    bounds), every row count, Hq, Hkv and `Hq·Tq` are at most [`MAX_ROWS`] (the kernels index
//!    with 32-bit integers); every row stride is at least its row length and every view fits
//!    the address space;
//! 6. alignment ([`InvalidArgument`](crate::ErrorKind::InvalidArgument)): the base pointer and
//!    the byte stride of every non-empty matrix are multiples of [`ROW_ALIGN`] (on every
//!    backend, so a call the CPU accepts CUDA accepts too); the non-empty LSE and the offsets are
//!    aligned to 4 bytes. Empty operands have nothing to align (an empty `Vec`'s pointer is only
//!    element-aligned);
//! 7. overlaps ([`Shape`](crate::ErrorKind::Shape)): no output shares a byte with an input or
//!    with another output. Inputs may alias each other. The test is exact for strided matrices
//!    of equal stride, so outputs interleaved with inputs or with each other in one buffer are
//!    accepted when their columns are disjoint (dq, dk and dv as slices of one packed dqkv
//!    buffer, like q, k and v of a fused qkv projection); views of different strides are
//!    compared by their byte ranges (conservative);
//! 8. on a host (CPU) context, the contents of the offset arrays
//!    ([`Shape`](crate::ErrorKind::Shape)): `cu[0] = 0`, never decreasing, `cu_q[B]` = rows of q,
//!    `cu_k[B]` = rows of k, every sequence no longer than its `max_seqlen` bound. On CUDA the
//!    offsets are device memory read only by the kernels, which clamp them (see
//!    [`Batch::Varlen`]).

use super::params::{MAX_ROWS, ROW_ALIGN};
use super::{
    Attention, AttentionBackward, AttentionParams, Batch, RawAttention, RawAttentionBackward,
    RawBatch,
};
use crate::checks::{check_disjoint, check_location, Region};
use crate::device::Context;
use crate::error::{bail, Result};
use crate::tensor::{DType, Location, Matrix, MatrixMut, Vector, VectorMut};

/// A matrix operand (input or output), as the checks see it.
#[derive(Debug, Clone, Copy)]
struct Operand {
    what: &'static str,
    ptr: *const u8,
    dtype: DType,
    rows: usize,
    cols: usize,
    stride: usize,
    location: Location,
}

impl Operand {
    fn input(what: &'static str, m: &Matrix<'_>) -> Self {
        Operand {
            what,
            ptr: m.ptr,
            dtype: m.dtype,
            rows: m.rows,
            cols: m.cols,
            stride: m.row_stride,
            location: m.location,
        }
    }

    fn output(what: &'static str, m: &MatrixMut<'_>) -> Self {
        Operand {
            what,
            ptr: m.ptr.cast_const(),
            dtype: m.dtype,
            rows: m.rows,
            cols: m.cols,
            stride: m.row_stride,
            location: m.location,
        }
    }

    fn is_empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }

    /// The bytes the operand touches: `rows` rows of `cols` elements, `stride` elements apart.
    fn region(&self) -> Region {
        let size = self.dtype.size() as u128;
        Region {
            what: self.what,
            start: self.ptr as usize as u128,
            rows: self.rows as u128,
            row_bytes: self.cols as u128 * size,
            stride_bytes: self.stride as u128 * size,
        }
    }
}

/// A vector operand (the LSE or an offset array).
#[derive(Debug, Clone, Copy)]
struct Vec1 {
    what: &'static str,
    ptr: *const u8,
    len: usize,
    elem: usize,
    location: Location,
}

impl Vec1 {
    fn input<T>(what: &'static str, v: &Vector<'_, T>) -> Self {
        Vec1 {
            what,
            ptr: v.ptr.cast(),
            len: v.len,
            elem: std::mem::size_of::<T>(),
            location: v.location,
        }
    }

    fn output<T>(what: &'static str, v: &VectorMut<'_, T>) -> Self {
        Vec1 {
            what,
            ptr: v.ptr.cast_const().cast(),
            len: v.len,
            elem: std::mem::size_of::<T>(),
            location: v.location,
        }
    }

    /// One row of `len` elements.
    fn region(&self) -> Region {
        let bytes = self.len as u128 * self.elem as u128;
        Region {
            what: self.what,
            start: self.ptr as usize as u128,
            rows: 1,
            row_bytes: bytes,
            stride_bytes: bytes,
        }
    }
}

/// Locations of every view, then nulls, then dtypes (`mats[0]` is q, whose dtype every other
/// matrix must have).
fn check_operands(ctx: &Context, mats: &[Operand], vecs: &[Vec1]) -> Result<()> {
    for m in mats {
        check_location(ctx, m.what, m.location)?;
    }
    for v in vecs {
        check_location(ctx, v.what, v.location)?;
    }
    for m in mats {
        if m.ptr.is_null() && !m.is_empty() {
            bail!(
                NullPointer,
                "{} pointer is null ({} x {} elements)",
                m.what,
                m.rows,
                m.cols
            );
        }
    }
    for v in vecs {
        if v.ptr.is_null() && v.len > 0 {
            bail!(
                NullPointer,
                "{} pointer is null ({} entries)",
                v.what,
                v.len
            );
        }
    }
    let dtype = mats[0].dtype;
    let dtype_ok = match dtype {
        DType::BF16 | DType::F16 => true,
        DType::F32 => ctx.location() == Location::Host,
    };
    if !dtype_ok {
        bail!(
            UnsupportedDtype,
            "{} dtype {} is not supported on {:?}: attention takes bf16 or f16 (f32 on the CPU context only)",
            mats[0].what,
            dtype.name(),
            ctx.location()
        );
    }
    for m in &mats[1..] {
        if m.dtype != dtype {
            bail!(
                UnsupportedDtype,
                "{} dtype {} differs from the q dtype {} (every tensor operand has q's dtype)",
                m.what,
                m.dtype.name(),
                dtype.name()
            );
        }
    }
    Ok(())
}

/// `a·b`, or a Shape error naming `what` when it overflows.
fn mul(what: &str, a: usize, b: usize) -> Result<usize> {
    match a.checked_mul(b) {
        Some(x) => Ok(x),
        None => bail!(Shape, "{what} = {a}·{b} overflows"),
    }
}

fn check_32bit(what: &str, x: usize) -> Result<()> {
    if x > MAX_ROWS {
        bail!(
            Shape,
            "{what} = {x} exceeds 2^31 - 1 (the kernels index with 32-bit integers)"
        );
    }
    Ok(())
}

/// `m` is `rows × cols`.
fn check_shape(m: &Operand, rows: usize, cols: usize, of: &str) -> Result<()> {
    if m.rows != rows || m.cols != cols {
        bail!(
            Shape,
            "{} is {} x {}, {rows} x {cols} expected ({of})",
            m.what,
            m.rows,
            m.cols
        );
    }
    Ok(())
}

/// The sequence structure of `batch` against the rows of q (`total_q`) and k (`total_k`),
/// without reading any offsets.
fn describe_batch(batch: &Batch<'_>, total_q: usize, total_k: usize) -> Result<RawBatch> {
    match *batch {
        Batch::Padded {
            batch,
            seqlen_q,
            seqlen_k,
        } => {
            check_32bit("batch", batch)?;
            check_32bit("seqlen_q", seqlen_q)?;
            check_32bit("seqlen_k", seqlen_k)?;
            let want_q = mul("batch·seqlen_q", batch, seqlen_q)?;
            let want_k = mul("batch·seqlen_k", batch, seqlen_k)?;
            if total_q != want_q {
                bail!(
                    Shape,
                    "q has {total_q} rows, batch·seqlen_q = {batch}·{seqlen_q} = {want_q} expected (padded batch)"
                );
            }
            if total_k != want_k {
                bail!(
                    Shape,
                    "k has {total_k} rows, batch·seqlen_k = {batch}·{seqlen_k} = {want_k} expected (padded batch)"
                );
            }
            Ok(RawBatch {
                batch,
                seqlen_q,
                seqlen_k,
                total_q,
                total_k,
                cu_seqlens_q: std::ptr::null(),
                cu_seqlens_k: std::ptr::null(),
            })
        }
        Batch::Varlen {
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
        } => {
            if cu_seqlens_q.len == 0 {
                bail!(
                    Shape,
                    "cu_seqlens_q is empty: it needs batch + 1 >= 1 entries"
                );
            }
            if cu_seqlens_k.len != cu_seqlens_q.len {
                bail!(
                    Shape,
                    "cu_seqlens_k has {} entries but cu_seqlens_q has {} (both are batch + 1)",
                    cu_seqlens_k.len,
                    cu_seqlens_q.len
                );
            }
            let batch = cu_seqlens_q.len - 1;
            check_32bit("batch (cu_seqlens entries - 1)", batch)?;
            check_32bit("max_seqlen_q", max_seqlen_q)?;
            check_32bit("max_seqlen_k", max_seqlen_k)?;
            if batch == 0 && (total_q > 0 || total_k > 0) {
                bail!(
                    Shape,
                    "cu_seqlens have one entry (no sequences) but q has {total_q} rows and k {total_k}: both must be empty"
                );
            }
            for (what, bound, rows, of) in [
                ("max_seqlen_q", max_seqlen_q, total_q, "q"),
                ("max_seqlen_k", max_seqlen_k, total_k, "k"),
            ] {
                // B sequences of at most `bound` rows hold at most B·bound rows.
                if batch.saturating_mul(bound) < rows {
                    bail!(
                        Shape,
                        "{what} = {bound} is below the longest sequence: {batch} sequences cannot hold the {rows} rows of {of}"
                    );
                }
            }
            Ok(RawBatch {
                batch,
                seqlen_q: max_seqlen_q,
                seqlen_k: max_seqlen_k,
                total_q,
                total_k,
                cu_seqlens_q: cu_seqlens_q.ptr,
                cu_seqlens_k: cu_seqlens_k.ptr,
            })
        }
    }
}

/// The offset arrays of a varlen batch in the call's views (for the location, null, alignment
/// and overlap checks).
fn offset_views(batch: &Batch<'_>) -> Vec<Vec1> {
    match batch {
        Batch::Padded { .. } => Vec::new(),
        Batch::Varlen {
            cu_seqlens_q,
            cu_seqlens_k,
            ..
        } => vec![
            Vec1::input("cu_seqlens_q", cu_seqlens_q),
            Vec1::input("cu_seqlens_k", cu_seqlens_k),
        ],
    }
}

/// Shapes shared by forward and backward: q is `[Tq, Hq·D]`, k and v `[Tk, Hkv·D]`, every
/// `q_like` operand the shape of q, every `k_like` the shape of k; the batch against the rows;
/// the LSE length; the 32-bit ranges; strides; and the address-space extent of every view.
fn check_shapes(
    params: &AttentionParams,
    batch: &Batch<'_>,
    (q, k, v): (&Operand, &Operand, &Operand),
    q_like: &[&Operand],
    k_like: &[&Operand],
    lse: &Vec1,
) -> Result<RawBatch> {
    let (hq, hkv, d) = (params.heads_q, params.heads_kv, params.head_dim);
    check_32bit("heads_q", hq)?;
    check_32bit("heads_kv", hkv)?;
    let q_cols = mul("heads_q·head_dim", hq, d)?;
    let kv_cols = mul("heads_kv·head_dim", hkv, d)?;
    if q.cols != q_cols {
        bail!(
            Shape,
            "q has {} columns, heads_q·head_dim = {hq}·{d} = {q_cols} expected",
            q.cols
        );
    }
    for m in [k, v] {
        if m.cols != kv_cols {
            bail!(
                Shape,
                "{} has {} columns, heads_kv·head_dim = {hkv}·{d} = {kv_cols} expected",
                m.what,
                m.cols
            );
        }
    }
    if v.rows != k.rows {
        bail!(
            Shape,
            "v has {} rows but k has {} (one row per key)",
            v.rows,
            k.rows
        );
    }
    for m in q_like {
        check_shape(m, q.rows, q_cols, "the shape of q")?;
    }
    for m in k_like {
        check_shape(m, k.rows, kv_cols, "the shape of k")?;
    }
    check_32bit("rows of q", q.rows)?;
    check_32bit("rows of k", k.rows)?;
    let raw = describe_batch(batch, q.rows, k.rows)?;
    // Both factors are below 2^31: the product fits.
    let lse_len = raw.lse_len(hq);
    check_32bit("heads_q·rows of q (LSE entries)", lse_len)?;
    if lse.len != lse_len {
        let layout = if raw.is_varlen() {
            format!("[heads_q, rows of q] = [{hq}, {}]", q.rows)
        } else {
            format!(
                "[batch, heads_q, seqlen_q] = [{}, {hq}, {}]",
                raw.batch, raw.seqlen_q
            )
        };
        bail!(
            Shape,
            "{} has {} entries, {lse_len} expected ({layout})",
            lse.what,
            lse.len
        );
    }
    Ok(raw)
}

/// Strides at least the row length, every view inside the address space.
fn check_strides_and_extent(mats: &[Operand], vecs: &[Vec1]) -> Result<()> {
    for m in mats {
        if m.stride < m.cols {
            bail!(
                Shape,
                "{} row stride {} is smaller than its row of {} elements",
                m.what,
                m.stride,
                m.cols
            );
        }
    }
    let regions = mats
        .iter()
        .map(Operand::region)
        .chain(vecs.iter().map(Vec1::region));
    for r in regions {
        // No allocation exceeds isize::MAX bytes: a longer span is a stride that would make the
        // backends' offsets overflow, not memory the caller has.
        if r.end() > usize::MAX as u128 || r.end() - r.start > isize::MAX as u128 {
            bail!(
                Shape,
                "{} spans more bytes than the address space holds",
                r.what
            );
        }
    }
    Ok(())
}

/// Row alignment of every matrix, element alignment of every vector. Empty operands have no
/// rows to align and are skipped (an empty `Vec` has a dangling, merely element-aligned pointer).
fn check_alignment(mats: &[Operand], vecs: &[Vec1]) -> Result<()> {
    for m in mats.iter().filter(|m| !m.is_empty()) {
        if m.ptr as usize % ROW_ALIGN != 0 {
            bail!(
                InvalidArgument,
                "{} pointer {:#x} is not {ROW_ALIGN}-byte aligned (rows are moved {ROW_ALIGN} bytes at a time)",
                m.what,
                m.ptr as usize
            );
        }
        if (m.stride % ROW_ALIGN) * m.dtype.size() % ROW_ALIGN != 0 {
            bail!(
                InvalidArgument,
                "{} row stride {} ({} elements of {} bytes) is not a multiple of {ROW_ALIGN} bytes",
                m.what,
                m.stride,
                m.dtype.name(),
                m.dtype.size()
            );
        }
    }
    for v in vecs.iter().filter(|v| v.len > 0) {
        if v.ptr as usize % v.elem != 0 {
            bail!(
                InvalidArgument,
                "{} pointer {:#x} is not aligned to its {}-byte elements",
                v.what,
                v.ptr as usize,
                v.elem
            );
        }
    }
    Ok(())
}

/// Checks one host offset array: `cu[0] = 0`, non-decreasing, `cu[B]` = `rows`, every length
/// at most `bound`.
fn check_offsets(
    what: &str,
    cu: &[i32],
    rows: usize,
    of: &str,
    bound: (&str, usize),
) -> Result<()> {
    if cu[0] != 0 {
        bail!(Shape, "{what}[0] = {} must be 0", cu[0]);
    }
    for (b, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            bail!(
                Shape,
                "{what} decreases: {what}[{}] = {} < {what}[{b}] = {}",
                b + 1,
                w[1],
                w[0]
            );
        }
        let len = (w[1] - w[0]) as usize;
        if len > bound.1 {
            bail!(
                Shape,
                "sequence {b} has {len} rows ({what}[{}] - {what}[{b}]) but {} = {}",
                b + 1,
                bound.0,
                bound.1
            );
        }
    }
    let last = cu[cu.len() - 1];
    if last as usize != rows {
        bail!(
            Shape,
            "{what}[{}] = {last} must equal the {rows} rows of {of}",
            cu.len() - 1
        );
    }
    Ok(())
}

/// On a host context, the contents of the offsets of a varlen batch.
fn check_host_offsets(ctx: &Context, batch: &Batch<'_>, raw: &RawBatch) -> Result<()> {
    let Batch::Varlen {
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
    } = *batch
    else {
        return Ok(());
    };
    if ctx.location() != Location::Host {
        return Ok(());
    }
    // SAFETY: host views (location checked), non-null, 4-byte aligned, and by the contract of
    // their constructors valid for reads of `len` (≥ 1, checked) entries.
    let (cq, ck) = unsafe {
        (
            std::slice::from_raw_parts(cu_seqlens_q.ptr, cu_seqlens_q.len),
            std::slice::from_raw_parts(cu_seqlens_k.ptr, cu_seqlens_k.len),
        )
    };
    check_offsets(
        "cu_seqlens_q",
        cq,
        raw.total_q,
        "q",
        ("max_seqlen_q", max_seqlen_q),
    )?;
    check_offsets(
        "cu_seqlens_k",
        ck,
        raw.total_k,
        "k",
        ("max_seqlen_k", max_seqlen_k),
    )
}

impl RawAttention {
    /// Checks a forward call and lowers it to raw pointers; nothing is written.
    pub(crate) fn validate(
        ctx: &Context,
        call: &Attention<'_>,
        params: &AttentionParams,
    ) -> Result<Self> {
        params.validate()?;
        let q = Operand::input("q", &call.q);
        let k = Operand::input("k", &call.k);
        let v = Operand::input("v", &call.v);
        let out = Operand::output("out", &call.out);
        let lse = Vec1::output("lse", &call.lse);
        let offsets = offset_views(&call.batch);
        let mats = [q, k, v, out];
        let mut vecs = vec![lse];
        vecs.extend(&offsets);
        check_operands(ctx, &mats, &vecs)?;
        let shape = check_shapes(params, &call.batch, (&q, &k, &v), &[&out], &[], &lse)?;
        check_strides_and_extent(&mats, &vecs)?;
        check_alignment(&mats, &vecs)?;
        let mut inputs = vec![q.region(), k.region(), v.region()];
        inputs.extend(offsets.iter().map(Vec1::region));
        check_disjoint(&[out.region(), lse.region()], &inputs)?;
        check_host_offsets(ctx, &call.batch, &shape)?;
        Ok(RawAttention {
            shape,
            heads_q: params.heads_q,
            heads_kv: params.heads_kv,
            head_dim: params.head_dim,
            dtype: q.dtype,
            causal: params.causal,
            scale: params.scale(),
            q: q.ptr,
            q_stride: q.stride,
            k: k.ptr,
            k_stride: k.stride,
            v: v.ptr,
            v_stride: v.stride,
            out: call.out.ptr,
            out_stride: out.stride,
            lse: call.lse.ptr,
        })
    }
}

impl RawAttentionBackward {
    /// Checks a backward call and lowers it to raw pointers; nothing is written.
    pub(crate) fn validate(
        ctx: &Context,
        call: &AttentionBackward<'_>,
        params: &AttentionParams,
    ) -> Result<Self> {
        params.validate()?;
        let q = Operand::input("q", &call.q);
        let k = Operand::input("k", &call.k);
        let v = Operand::input("v", &call.v);
        let dout = Operand::input("dout", &call.dout);
        let out = Operand::input("out", &call.out);
        let dq = Operand::output("dq", &call.dq);
        let dk = Operand::output("dk", &call.dk);
        let dv = Operand::output("dv", &call.dv);
        let lse = Vec1::input("lse", &call.lse);
        let offsets = offset_views(&call.batch);
        let mats = [q, k, v, dout, out, dq, dk, dv];
        let mut vecs = vec![lse];
        vecs.extend(&offsets);
        check_operands(ctx, &mats, &vecs)?;
        let shape = check_shapes(
            params,
            &call.batch,
            (&q, &k, &v),
            &[&dout, &out, &dq],
            &[&dk, &dv],
            &lse,
        )?;
        check_strides_and_extent(&mats, &vecs)?;
        check_alignment(&mats, &vecs)?;
        let mut inputs = vec![
            q.region(),
            k.region(),
            v.region(),
            dout.region(),
            out.region(),
            lse.region(),
        ];
        inputs.extend(offsets.iter().map(Vec1::region));
        check_disjoint(&[dq.region(), dk.region(), dv.region()], &inputs)?;
        check_host_offsets(ctx, &call.batch, &shape)?;
        Ok(RawAttentionBackward {
            shape,
            heads_q: params.heads_q,
            heads_kv: params.heads_kv,
            head_dim: params.head_dim,
            dtype: q.dtype,
            causal: params.causal,
            scale: params.scale(),
            deterministic: params.deterministic,
            dout: dout.ptr,
            dout_stride: dout.stride,
            q: q.ptr,
            q_stride: q.stride,
            k: k.ptr,
            k_stride: k.stride,
            v: v.ptr,
            v_stride: v.stride,
            out: out.ptr,
            out_stride: out.stride,
            lse: call.lse.ptr,
            dq: call.dq.ptr,
            dq_stride: dq.stride,
            dk: call.dk.ptr,
            dk_stride: dk.stride,
            dv: call.dv.ptr,
            dv_stride: dv.stride,
        })
    }
}
