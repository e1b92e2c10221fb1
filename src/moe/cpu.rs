//! CPU backend of MoE dispatch: the exact reference. Scores, sums and dot products in f64,
//! multi-threaded over tokens (or permuted rows), deterministic: every output element is computed
//! by one thread in a fixed order, and the permutation is a sequential counting sort.
//!
//! Selection order: a higher selection score first, equal scores to the lower expert (group)
//! index; a NaN selection score ranks below every number, −∞ included (so the choice is always
//! defined, and a NaN never displaces an expert masked by a −∞ bias; its weight stays NaN). Sigmoid without a bias or an excluded group compares the logits instead: the order of
//! the exact scores, which saturate at 1 in f64 from logits of ~37 and would tie. The index
//! contents (`perm`, `position`) are checked before anything is written.

use std::cmp::Ordering;

use half::{bf16, f16};

use super::{
    RawCombine, RawCombineBackward, RawPermute, RawPermuteBackward, RawRoute, RawSlotDot,
    RouteParams, Score,
};
use crate::error::{bail, Result};
use crate::host_alloc::filled;
use crate::parallel::{for_each_range, threads_for, Shared};
use crate::tensor::{DType, Element};

// ------------------------------------------------------------------------------------------
// Route
// ------------------------------------------------------------------------------------------

/// A group's score from the sum of its two best selection scores: NaN (a NaN among them, or
/// −∞ + ∞) ranks as −∞.
fn key(x: f64) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else {
        x
    }
}

/// The ranking key of a selection score (or of a logit, where logits are compared: sigmoid
/// without a bias or an excluded group): the value, except that a NaN ranks below every number,
/// −∞ included, as on CUDA: −∞ becomes `f64::MIN` (below every sum of an f32 score and bias)
/// and NaN −∞. So a NaN logit never displaces an expert masked with a −∞ bias.
fn rank_key(x: f64) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else if x == f64::NEG_INFINITY {
        f64::MIN
    } else {
        x
    }
}

/// Descending key, then ascending index: a total order on `(key, index)` pairs.
fn by_rank(a: (f64, usize), b: (f64, usize)) -> Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Scores of one token's logits `l` into `scores` (f64).
fn score_row(score: Score, l: &[f64], scores: &mut [f64]) {
    match score {
        Score::Sigmoid => {
            for (s, &x) in scores.iter_mut().zip(l) {
                *s = 1.0 / (1.0 + (-x).exp());
            }
        }
        Score::Softmax => {
            let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for (s, &x) in scores.iter_mut().zip(l) {
                *s = (x - m).exp();
                sum += *s;
            }
            for s in scores.iter_mut() {
                *s /= sum;
            }
        }
    }
}

/// Whether group-limited selection leaves some group out (`topk_groups < n_groups`).
fn excludes_groups(p: &RouteParams) -> bool {
    p.n_groups > 1 && p.topk_groups < p.n_groups
}

/// Per-token scratch of the selection.
struct Selector {
    logits: Vec<f64>,
    scores: Vec<f64>,
    /// (selection key, expert) of the candidate experts.
    candidates: Vec<(f64, usize)>,
    /// (group score, group).
    groups: Vec<(f64, usize)>,
}

impl Selector {
    fn new(e: usize, n_groups: usize) -> Self {
        Selector {
            logits: vec![0.0; e],
            scores: vec![0.0; e],
            candidates: Vec::with_capacity(e),
            groups: Vec::with_capacity(n_groups),
        }
    }

    /// Chooses the experts of one token (logits already in `self.logits`): writes the k expert
    /// ids by descending selection score and their weights.
    fn select(&mut self, p: &RouteParams, bias: &[f64], ids: &mut [i32], weights: &mut [f32]) {
        let e = self.logits.len();
        score_row(p.score, &self.logits, &mut self.scores);
        let by_logit = p.score == Score::Sigmoid && bias.is_empty() && !excludes_groups(p);
        // The selection score of expert i (its logit where logits are compared).
        let value = |i: usize| {
            if by_logit {
                self.logits[i]
            } else {
                self.scores[i] + bias.get(i).copied().unwrap_or(0.0)
            }
        };
        let sel = |i: usize| rank_key(value(i));
        self.candidates.clear();
        if p.n_groups > 1 {
            let size = e / p.n_groups;
            self.groups.clear();
            for g in 0..p.n_groups {
                // The two best by rank, summed as values. A group has ≥ 2 experts, so a slot
                // still empty at the end means NaN scores, which the NaN it starts with stands
                // for (rank −∞: NaN ranks are never greater).
                let nan = (f64::NEG_INFINITY, f64::NAN);
                let (mut first, mut second) = (nan, nan);
                for i in g * size..(g + 1) * size {
                    let s = (sel(i), value(i));
                    if s.0 > first.0 {
                        second = first;
                        first = s;
                    } else if s.0 > second.0 {
                        second = s;
                    }
                }
                self.groups.push((key(first.1 + second.1), g));
            }
            self.groups.sort_by(|&a, &b| by_rank(a, b));
            for &(_, g) in &self.groups[..p.topk_groups] {
                self.candidates
                    .extend((g * size..(g + 1) * size).map(|i| (sel(i), i)));
            }
        } else {
            self.candidates.extend((0..e).map(|i| (sel(i), i)));
        }
        let k = p.k;
        if k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(k - 1, |&a, &b| by_rank(a, b));
        }
        let chosen = &mut self.candidates[..k];
        chosen.sort_by(|&a, &b| by_rank(a, b));
        let total: f64 = chosen.iter().map(|&(_, i)| self.scores[i]).sum();
        // Renormalised scores too small to divide directly: ratios from the logits (a NaN total
        // keeps the division: NaN weights, as documented).
        let small = p.renormalize && total < RENORMALISE_DIRECT_MIN;
        let mc = chosen
            .iter()
            .map(|&(_, i)| self.logits[i])
            .fold(f64::NEG_INFINITY, f64::max);
        let numerator = |i: usize| {
            let x = self.logits[i];
            match (small, p.score) {
                (false, _) => self.scores[i],
                (true, Score::Softmax) => (x - mc).exp(),
                (true, Score::Sigmoid) => (x - mc).exp() * ((1.0 + mc.exp()) / (1.0 + x.exp())),
            }
        };
        let norm = match (small, p.renormalize) {
            (true, _) => chosen.iter().map(|&(_, i)| numerator(i)).sum(),
            (false, true) => total,
            (false, false) => 1.0,
        };
        let scale = p.scale as f64;
        for (j, &(_, i)) in chosen.iter().enumerate() {
            ids[j] = i as i32;
            weights[j] = (numerator(i) / norm * scale) as f32;
        }
    }
}

/// Below this sum of the chosen scores, renormalisation takes the ratios from the logits (as the
/// CUDA kernels do below the same f32 sum): the scores themselves may have underflowed, a
/// sigmoid below about -745 or a softmax probability 745 below the token's max in f64, and
/// 0 / 0 would make finite logits' weights NaN. Softmax: e^(x - mc) with mc the largest chosen
/// logit; sigmoid: s(x) (1 + e^-mc) = e^(x - mc) (1 + e^mc) / (1 + e^x), an identity whose
/// e^mc cannot overflow here (the largest score is below 2^-8, so mc < -ln 255 ≈ -5.5). A
/// token whose chosen logits are all -inf still gets NaN (0 / 0).
const RENORMALISE_DIRECT_MIN: f64 = 1.0 / 256.0;

/// Widens row `row` of a logits matrix into `out`.
///
/// # Safety
/// `ptr` must hold row `row` of a `dtype` host matrix with `stride` and at least `out.len()`
/// columns.
unsafe fn read_logits(ptr: *const u8, dtype: DType, stride: usize, row: usize, out: &mut [f64]) {
    unsafe fn widen<T: Element>(p: *const u8, stride: usize, row: usize, out: &mut [f64]) {
        // SAFETY: the caller guarantees the row is in bounds.
        let src = unsafe { std::slice::from_raw_parts(p.cast::<T>().add(row * stride), out.len()) };
        for (o, &x) in out.iter_mut().zip(src) {
            *o = x.to_f64();
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            DType::F32 => widen::<f32>(ptr, stride, row, out),
            DType::BF16 => widen::<bf16>(ptr, stride, row, out),
            DType::F16 => widen::<f16>(ptr, stride, row, out),
        }
    }
}

/// The permutation of the chosen experts: counts, padded offsets, perm (−1 filled) and positions.
struct Permutation {
    counts: Vec<i32>,
    offsets: Vec<i32>,
    perm: Vec<i32>,
    position: Vec<i32>,
}

/// Counting sort of the slots (expert-major, then token, then slot) with capacity drops and
/// block padding. `ids` holds `n·k` valid expert indices below `e`. Errors only where the host
/// refuses the memory of `perm` and `position`.
fn permutation(ids: &[i32], e: usize, perm_rows: usize, p: &RouteParams) -> Result<Permutation> {
    let mut seen = vec![0usize; e];
    for &id in ids {
        seen[id as usize] += 1;
    }
    let cap = p.capacity.unwrap_or(usize::MAX);
    let counts: Vec<usize> = seen.iter().map(|&c| c.min(cap)).collect();
    let mut offsets = Vec::with_capacity(e + 1);
    offsets.push(0usize);
    for &c in &counts {
        let last = offsets[offsets.len() - 1];
        offsets.push(last + c.next_multiple_of(p.block));
    }
    let mut perm = filled(perm_rows, -1i32, "the CPU route's permutation")?;
    let mut position = filled(ids.len(), -1i32, "the CPU route's positions")?;
    let mut cursor = vec![0usize; e];
    // Slots in flat order n·k + j are already token-major, slot-minor: walking them once and
    // appending to each expert's segment gives expert, then token, then slot.
    for (slot, &id) in ids.iter().enumerate() {
        let ex = id as usize;
        let i = cursor[ex];
        cursor[ex] += 1;
        if i < counts[ex] {
            let row = offsets[ex] + i;
            perm[row] = slot as i32;
            position[slot] = row as i32;
        }
    }
    Ok(Permutation {
        counts: counts.iter().map(|&c| c as i32).collect(),
        offsets: offsets.iter().map(|&o| o as i32).collect(),
        perm,
        position,
    })
}

/// Copies `src` to the `dst` host pointer.
///
/// # Safety
/// `dst` must be valid for `src.len()` writes and not overlap `src`.
unsafe fn store<T: Copy>(dst: *mut T, src: &[T]) {
    // SAFETY: forwarded from the caller.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
}

/// Routes every token and writes all outputs.
///
/// # Safety
/// The pointers of `raw` must be valid host memory for the shapes it describes (validated by
/// [`RawRoute::validate`](super::RawRoute), with `params` checked against `raw.e`).
pub(crate) unsafe fn route(raw: &RawRoute, params: &RouteParams) -> Result<()> {
    let (n, e, k) = (raw.n, raw.e, params.k);
    let bias: Vec<f64> = if raw.bias.is_null() {
        Vec::new()
    } else {
        // SAFETY: the bias holds e values.
        unsafe { std::slice::from_raw_parts(raw.bias, e) }
            .iter()
            .map(|&b| b as f64)
            .collect()
    };
    // The outputs are built here and stored at the end (nothing is written on error): a
    // refused allocation is an error for the caller, not an abort.
    let mut ids = filled(n * k, 0i32, "the CPU route's expert ids")?;
    let mut weights = filled(n * k, 0f32, "the CPU route's weights")?;
    let threads = threads_for(n, e * 8);
    let per = n.div_ceil(threads);
    // SAFETY: the workers read shared inputs and each writes only its own rows of the outputs.
    let shared = unsafe { Shared::new(*raw) };
    std::thread::scope(|scope| {
        for (chunk, (ids, weights)) in ids
            .chunks_mut(per * k)
            .zip(weights.chunks_mut(per * k))
            .enumerate()
        {
            let (shared, bias) = (&shared, &bias);
            scope.spawn(move || {
                let raw = shared.get();
                let mut selector = Selector::new(e, params.n_groups);
                for (t, (ids, weights)) in ids.chunks_mut(k).zip(weights.chunks_mut(k)).enumerate()
                {
                    let token = chunk * per + t;
                    // SAFETY: token < n rows of e logits with the validated stride.
                    unsafe {
                        read_logits(
                            raw.logits,
                            raw.logits_dtype,
                            raw.logits_stride,
                            token,
                            &mut selector.logits,
                        )
                    };
                    selector.select(params, bias, ids, weights);
                }
            });
        }
    });
    let p = permutation(&ids, e, raw.perm_rows, params)?;
    // SAFETY: validated output lengths (n·k, e, e + 1, perm_rows, n·k), disjoint from the inputs
    // and from each other.
    unsafe {
        store(raw.expert_ids, &ids);
        store(raw.weights, &weights);
        store(raw.counts, &p.counts);
        store(raw.offsets, &p.offsets);
        store(raw.perm, &p.perm);
        store(raw.position, &p.position);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Permute, combine, slot dot
// ------------------------------------------------------------------------------------------

/// Checks that every index is −1 or in [0, bound), before anything is written.
fn check_indices(what: &str, indices: &[i32], bound: usize) -> Result<()> {
    if let Some((i, &v)) = indices
        .iter()
        .enumerate()
        .find(|&(_, &v)| v < -1 || (v >= 0 && v as usize >= bound))
    {
        bail!(
            InvalidArgument,
            "{what}[{i}] = {v} is neither -1 nor in [0, {bound})"
        );
    }
    Ok(())
}

/// Row `row` of a host matrix of `T`.
///
/// # Safety
/// The row must be in bounds of a live matrix with `stride`, `h` columns.
unsafe fn row<'a, T>(ptr: *const u8, stride: usize, row: usize, h: usize) -> &'a [T] {
    // SAFETY: forwarded from the caller.
    unsafe { std::slice::from_raw_parts(ptr.cast::<T>().add(row * stride), h) }
}

/// Row `row` of a writable host matrix of `T`.
///
/// # Safety
/// As [`row`], and no other live reference to that row.
unsafe fn row_mut<'a, T>(ptr: *mut u8, stride: usize, row: usize, h: usize) -> &'a mut [T] {
    // SAFETY: forwarded from the caller.
    unsafe { std::slice::from_raw_parts_mut(ptr.cast::<T>().add(row * stride), h) }
}

/// Columns of a row handled at a time: a tile of f64 sums (4 KB) stays in L1 while a token's k
/// slot rows are added into it.
const TILE: usize = 512;

/// `out = x · w`, each element rounded once (a tile at a time: f16 rounds a slice faster).
fn scale_row<T: Element>(x: &[T], w: f64, out: &mut [T]) {
    let mut wide = [0.0; TILE];
    for (x, out) in x.chunks(TILE).zip(out.chunks_mut(TILE)) {
        let wide = &mut wide[..x.len()];
        for (d, &v) in wide.iter_mut().zip(x) {
            *d = v.to_f64() * w;
        }
        T::from_f64_slice(wide, out);
    }
}

/// `acc += w · src`, elementwise in f64.
fn add_scaled<T: Element>(acc: &mut [f64], w: f64, src: &[T]) {
    for (a, &v) in acc.iter_mut().zip(src) {
        *a += w * v.to_f64();
    }
}

/// Dot products computed side by side in [`dots`]: each sum is still one sequential chain, but
/// independent chains keep the adder busy instead of waiting on one.
const LANES: usize = 4;

/// `Σ_i a_l[i] · b_l[i]` for each lane `l`, in f64, each summed in column order from −0: the
/// identity of + and where `Iterator::sum` starts, so an all-(−0) product row stays −0.
fn dots<T: Element, const L: usize>(a: [&[T]; L], b: [&[T]; L]) -> [f64; L] {
    let h = a[0].len();
    let a = a.map(|r| &r[..h]);
    let b = b.map(|r| &r[..h]);
    let mut sums = [-0.0; L];
    for i in 0..h {
        for l in 0..L {
            sums[l] += a[l][i].to_f64() * b[l][i].to_f64();
        }
    }
    sums
}

/// Gathers token rows into the permuted order (scaled by the weights when given).
///
/// # Safety
/// The pointers of `raw` must be valid host memory for the shapes it describes (validated by
/// [`RawPermute::validate`](super::RawPermute)).
pub(crate) unsafe fn permute(raw: &RawPermute) -> Result<()> {
    // SAFETY: perm holds `rows` values.
    let perm = unsafe { std::slice::from_raw_parts(raw.perm, raw.rows) };
    check_indices("perm", perm, raw.n * raw.k)?;
    let weights = if raw.weights.is_null() {
        None
    } else {
        // SAFETY: the weights hold n·k values.
        Some(unsafe { std::slice::from_raw_parts(raw.weights, raw.n * raw.k) })
    };
    unsafe fn typed<T: Element>(raw: &RawPermute, perm: &[i32], weights: Option<&[f32]>) {
        // SAFETY: the workers read shared inputs and each writes only its own rows of the outputs.
        let shared = unsafe { Shared::new(*raw) };
        for_each_range(raw.rows, raw.h, |range| {
            let raw = shared.get();
            for r in range {
                // SAFETY: r < rows of the output, owned by this range.
                let out = unsafe { row_mut::<T>(raw.out, raw.out_stride, r, raw.h) };
                let p = perm[r];
                if p < 0 {
                    out.fill(T::from_f64(0.0));
                    continue;
                }
                let p = p as usize;
                // SAFETY: p < n·k (checked), so p / k < n rows of x.
                let x = unsafe { row::<T>(raw.x, raw.x_stride, p / raw.k, raw.h) };
                match weights {
                    // Unscaled: the row's bits, as the CUDA gather copies them (NaN payloads
                    // included), at copy speed.
                    None => out.copy_from_slice(x),
                    Some(w) => scale_row(x, w[p] as f64, out),
                }
            }
        });
    }
    // SAFETY: validated shapes, indices checked above.
    unsafe {
        match raw.dtype {
            DType::F32 => typed::<f32>(raw, perm, weights),
            DType::BF16 => typed::<bf16>(raw, perm, weights),
            DType::F16 => typed::<f16>(raw, perm, weights),
        }
    }
    Ok(())
}

/// Each token's (weighted) sum of its rows, in slot order, rounded once.
///
/// # Safety
/// The pointers of `raw` must be valid host memory for the shapes it describes (validated by
/// [`RawCombine::validate`](super::RawCombine)).
pub(crate) unsafe fn combine(raw: &RawCombine) -> Result<()> {
    let slots = raw.n * raw.k;
    // SAFETY: position holds n·k values.
    let position = unsafe { std::slice::from_raw_parts(raw.position, slots) };
    check_indices("position", position, raw.rows)?;
    let weights = if raw.weights.is_null() {
        None
    } else {
        // SAFETY: the weights hold n·k values.
        Some(unsafe { std::slice::from_raw_parts(raw.weights, slots) })
    };
    unsafe fn typed<T: Element>(raw: &RawCombine, position: &[i32], weights: Option<&[f32]>) {
        // SAFETY: the workers read shared inputs and each writes only its own rows of the outputs.
        let shared = unsafe { Shared::new(*raw) };
        for_each_range(raw.n, raw.h * raw.k, |range| {
            let raw = shared.get();
            let mut acc = [0.0; TILE];
            for t in range {
                // SAFETY: t < n rows of y, owned by this range.
                let y = unsafe { row_mut::<T>(raw.y, raw.y_stride, t, raw.h) };
                // A tile of columns at a time, all k slots into it: the sums stay in L1.
                for start in (0..raw.h).step_by(TILE) {
                    let cols = start..(start + TILE).min(raw.h);
                    let acc = &mut acc[..cols.len()];
                    acc.fill(0.0);
                    for slot in t * raw.k..(t + 1) * raw.k {
                        let Ok(r) = usize::try_from(position[slot]) else {
                            continue;
                        };
                        let w = weights.map_or(1.0, |w| w[slot] as f64);
                        // SAFETY: r < rows (checked).
                        let src = unsafe { row::<T>(raw.rows_in, raw.rows_stride, r, raw.h) };
                        add_scaled(acc, w, &src[cols.clone()]);
                    }
                    T::from_f64_slice(acc, &mut y[cols]);
                }
            }
        });
    }
    // SAFETY: validated shapes, indices checked above.
    unsafe {
        match raw.dtype {
            DType::F32 => typed::<f32>(raw, position, weights),
            DType::BF16 => typed::<bf16>(raw, position, weights),
            DType::F16 => typed::<f16>(raw, position, weights),
        }
    }
    Ok(())
}

/// Per-slot dot products of each token's row with its permuted rows.
///
/// # Safety
/// The pointers of `raw` must be valid host memory for the shapes it describes (validated by
/// [`RawSlotDot::validate`](super::RawSlotDot)).
pub(crate) unsafe fn slot_dot(raw: &RawSlotDot) -> Result<()> {
    let slots = raw.n * raw.k;
    // SAFETY: position holds n·k values.
    let position = unsafe { std::slice::from_raw_parts(raw.position, slots) };
    check_indices("position", position, raw.rows)?;
    unsafe fn typed<T: Element>(raw: &RawSlotDot, position: &[i32]) {
        // SAFETY: the workers read shared inputs and each writes only its own rows of the outputs.
        let shared = unsafe { Shared::new(*raw) };
        for_each_range(raw.n, raw.h * raw.k, |range| {
            let raw = shared.get();
            let first = range.start * raw.k;
            // SAFETY: the slots of this range's tokens, within the n·k outputs, owned by it.
            let out =
                unsafe { std::slice::from_raw_parts_mut(raw.out.add(first), range.len() * raw.k) };
            // Dropped slots stay 0.
            out.fill(0.0);
            // (slot, token row, permuted row) of every kept slot, LANES of them at a time.
            let kept: Vec<(usize, &[T], &[T])> = (first..first + out.len())
                .filter_map(|slot| {
                    let r = usize::try_from(position[slot]).ok()?;
                    // SAFETY: slot / k < n rows of tokens, r < rows (checked).
                    let (x, src) = unsafe {
                        (
                            row::<T>(raw.tokens, raw.tokens_stride, slot / raw.k, raw.h),
                            row::<T>(raw.rows_in, raw.rows_stride, r, raw.h),
                        )
                    };
                    Some((slot, x, src))
                })
                .collect();
            let mut chunks = kept.chunks_exact(LANES);
            for c in &mut chunks {
                let sums = dots::<T, LANES>(
                    std::array::from_fn(|l| c[l].1),
                    std::array::from_fn(|l| c[l].2),
                );
                for (&(slot, ..), sum) in c.iter().zip(sums) {
                    out[slot - first] = sum as f32;
                }
            }
            for &(slot, x, src) in chunks.remainder() {
                out[slot - first] = dots::<T, 1>([x], [src])[0] as f32;
            }
        });
    }
    // SAFETY: validated shapes, indices checked above.
    unsafe {
        match raw.dtype {
            DType::F32 => typed::<f32>(raw, position),
            DType::BF16 => typed::<bf16>(raw, position),
            DType::F16 => typed::<f16>(raw, position),
        }
    }
    Ok(())
}

/// The gradients of a permute: the combine, then the slot-dot (which checks the same position
/// against the same rows, so nothing is written unless both run).
///
/// # Safety
/// `raw` was validated: host pointers covering its shapes.
pub(crate) unsafe fn permute_backward(raw: &RawPermuteBackward) -> Result<()> {
    // SAFETY: forwarded contract.
    unsafe { combine(&raw.combine)? };
    if let Some(dot) = &raw.dot {
        // SAFETY: forwarded contract.
        unsafe { slot_dot(dot)? };
    }
    Ok(())
}

/// The gradients of a combine: the permute, then the slot-dot; `position` is checked first, so
/// nothing is written on error.
///
/// # Safety
/// `raw` was validated: host pointers covering its shapes.
pub(crate) unsafe fn combine_backward(raw: &RawCombineBackward) -> Result<()> {
    let p = &raw.permute;
    // SAFETY: position holds n·k values.
    let position = unsafe { std::slice::from_raw_parts(raw.position, p.n * p.k) };
    check_indices("position", position, p.rows)?;
    // SAFETY: forwarded contract.
    unsafe { permute(p)? };
    if let Some(dot) = &raw.dot {
        // SAFETY: forwarded contract.
        unsafe { slot_dot(dot)? };
    }
    Ok(())
}
