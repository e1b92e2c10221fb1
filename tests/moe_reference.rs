//! MoE dispatch against an INDEPENDENT reference written here from the definitions (full sorts
//! instead of partial selection, a sort of (expert, token, slot) triples instead of a counting
//! sort, tanh-form sigmoid, softmax without max subtraction), on the CPU and on CUDA device 0
//! when present (a visible SKIPPED line otherwise).
//!
//! Covers the routers of Llama 4 (sigmoid top-1, expert input scaled by the weight), Qwen3-MoE
//! (softmax top-8 of 128, renormalised) and DeepSeek-V3 (sigmoid, selection bias, 8 groups keep
//! 4, top-8, renormalised, × 2.5); capacity drops; block padding; ties; awkward N, E up to 512, k
//! up to 32; f32 / bf16 logits; permute / combine / slot-dot for f32 / bf16 / f16 and several H;
//! the backward passes against finite differences; determinism; every output element written.
//!
//! On the CPU the chosen experts must equal the reference exactly. CUDA scores in f32, so where
//! two candidates are within 1e-5 of each other either may win: the device's choice is checked
//! to be a valid top-k of the reference scores within that margin, and its weights and
//! permutation are checked exactly against the reference applied to its own choice.

mod common;

use common::moe::*;
use common::*;
use distill_kernels::moe::{RouteParams, Score, ROW_ALIGN};
use distill_kernels::{DType, ErrorKind, Launch, Location, VectorMut};

// ------------------------------------------------------------------------------------------
// Independent reference
// ------------------------------------------------------------------------------------------

/// Scores `[N, E]` and selection scores (score + bias) from the definitions.
fn ref_scores(case: &RouteCase) -> (Vec<f64>, Vec<f64>) {
    let (n, e) = (case.n(), case.e());
    let mut scores = Vec::with_capacity(n * e);
    for t in 0..n {
        let l = case.logits.row(t);
        match case.params.score {
            Score::Sigmoid => scores.extend(l.iter().map(|&x| 0.5 * (1.0 + (0.5 * x).tanh()))),
            Score::Softmax => {
                let z: f64 = l.iter().map(|&x| x.exp()).sum();
                scores.extend(l.iter().map(|&x| x.exp() / z));
            }
        }
    }
    // Sigmoid with no bias and no group left out ranks the logits (the exact scores' order).
    let p = &case.params;
    let by_logit = p.score == Score::Sigmoid
        && case.bias.is_none()
        && !(p.n_groups > 1 && p.topk_groups < p.n_groups);
    let sel = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| match &case.bias {
            _ if by_logit => case.logits.row(i / e)[i % e],
            Some(b) => s + b[i % e] as f64,
            None => s,
        })
        .collect();
    (scores, sel)
}

/// Sorts `(value, index)` pairs by descending value, ties by ascending index.
fn rank(mut v: Vec<(f64, usize)>) -> Vec<(f64, usize)> {
    v.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    v
}

/// Group scores of one token: sum of the two largest selection scores of each group.
fn group_scores(p: &RouteParams, sel: &[f64]) -> Vec<f64> {
    let size = sel.len() / p.n_groups;
    (0..p.n_groups)
        .map(|g| {
            let members = rank((g * size..(g + 1) * size).map(|i| (sel[i], i)).collect());
            members.iter().take(2).map(|m| m.0).sum()
        })
        .collect()
}

/// The reference choice of one token.
fn ref_choose(p: &RouteParams, sel: &[f64]) -> Vec<i32> {
    let size = sel.len() / p.n_groups;
    let kept: Vec<usize> = rank(
        group_scores(p, sel)
            .into_iter()
            .enumerate()
            .map(|(g, s)| (s, g))
            .collect(),
    )
    .into_iter()
    .take(p.topk_groups)
    .map(|(_, g)| g)
    .collect();
    let candidates = (0..sel.len())
        .filter(|i| kept.contains(&(i / size)))
        .map(|i| (sel[i], i))
        .collect();
    rank(candidates)
        .into_iter()
        .take(p.k)
        .map(|(_, i)| i as i32)
        .collect()
}

/// Weights of a given choice: unbiased scores, renormalised, scaled. Renormalised weights come
/// from log scores (softmax x − ln Σ e^x, sigmoid −softplus(−x)), so that scores too small for
/// f64 still divide exactly: e^(l − max l) / Σ e^(l − max l) over the chosen experts.
fn ref_weights(p: &RouteParams, logits: &[f64], scores: &[f64], ids: &[i32]) -> Vec<f64> {
    let unscaled: Vec<f64> = if p.renormalize {
        let log_score = |x: f64| match p.score {
            Score::Sigmoid => -((-x).max(0.0) + (-x.abs()).exp().ln_1p()),
            Score::Softmax => {
                // ln Σ e^y, shifted by the max so that no logit overflows (NaN with a NaN logit)
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                x - m - logits.iter().map(|&y| (y - m).exp()).sum::<f64>().ln()
            }
        };
        let l: Vec<f64> = ids.iter().map(|&i| log_score(logits[i as usize])).collect();
        let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = l.iter().map(|&v| (v - m).exp()).sum();
        l.iter().map(|&v| (v - m).exp() / total).collect()
    } else {
        ids.iter().map(|&i| scores[i as usize]).collect()
    };
    unscaled.iter().map(|&w| w * p.scale as f64).collect()
}

/// Counts, offsets, perm and position of a choice, from a sorted list of (expert, token, slot).
fn ref_permutation(
    ids: &[i32],
    n: usize,
    e: usize,
    p: &RouteParams,
    perm_rows: usize,
) -> (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>) {
    let k = p.k;
    let mut triples: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|t| (0..k).map(move |j| (ids[t * k + j] as usize, t, j)))
        .collect();
    triples.sort();
    let mut counts = vec![0i32; e];
    let mut offsets = vec![0i32; e + 1];
    let mut perm = vec![-1i32; perm_rows];
    let mut position = vec![-1i32; n * k];
    for ex in 0..e {
        let mine: Vec<&(usize, usize, usize)> = triples.iter().filter(|x| x.0 == ex).collect();
        let kept = mine.len().min(p.capacity.unwrap_or(usize::MAX));
        counts[ex] = kept as i32;
        for (i, &&(_, t, j)) in mine.iter().take(kept).enumerate() {
            let row = offsets[ex] as usize + i;
            perm[row] = (t * k + j) as i32;
            position[t * k + j] = row as i32;
        }
        let padded = kept.div_ceil(p.block) * p.block;
        offsets[ex + 1] = offsets[ex] + padded as i32;
    }
    (counts, offsets, perm, position)
}

/// The full reference outputs of a route case.
fn ref_route(case: &RouteCase) -> RouteOut {
    let (n, e, k) = (case.n(), case.e(), case.params.k);
    let (scores, sel) = ref_scores(case);
    let mut ids = Vec::with_capacity(n * k);
    let mut weights = Vec::with_capacity(n * k);
    for t in 0..n {
        let chosen = ref_choose(&case.params, &sel[t * e..(t + 1) * e]);
        weights.extend(
            ref_weights(
                &case.params,
                case.logits.row(t),
                &scores[t * e..(t + 1) * e],
                &chosen,
            )
            .iter()
            .map(|&w| w as f32),
        );
        ids.extend(chosen);
    }
    let (counts, offsets, perm, position) =
        ref_permutation(&ids, n, e, &case.params, case.perm_rows);
    RouteOut {
        expert_ids: ids,
        weights,
        counts,
        offsets,
        perm,
        position,
    }
}

/// Whether `chosen` is a valid top-k of one token's selection scores when values within `eps`
/// may be ordered either way (groups included).
fn selection_valid(p: &RouteParams, sel: &[f64], chosen: &[i32], eps: f64) -> Result<(), String> {
    let e = sel.len();
    let size = e / p.n_groups;
    let mut seen = vec![false; e];
    for &c in chosen {
        if c < 0 || c as usize >= e || seen[c as usize] {
            return Err(format!("ids {chosen:?} out of range or repeated"));
        }
        seen[c as usize] = true;
    }
    let gs = group_scores(p, sel);
    let mut sorted = gs.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let threshold = sorted[p.topk_groups - 1];
    let mut used: Vec<usize> = chosen.iter().map(|&c| c as usize / size).collect();
    used.sort();
    used.dedup();
    if let Some(g) = used.iter().find(|&&g| gs[g] < threshold - eps) {
        return Err(format!(
            "expert of group {g} chosen, which is not among the best groups"
        ));
    }
    let mut allowed = used.clone();
    allowed.extend((0..p.n_groups).filter(|&g| gs[g] > threshold + eps));
    allowed.sort();
    allowed.dedup();
    if allowed.len() > p.topk_groups {
        return Err(format!(
            "choice spans groups {used:?}, inconsistent with keeping {}",
            p.topk_groups
        ));
    }
    for w in chosen.windows(2) {
        if sel[w[0] as usize] < sel[w[1] as usize] - eps {
            return Err(format!("ids {chosen:?} not by descending score"));
        }
    }
    let worst = chosen
        .iter()
        .map(|&c| sel[c as usize])
        .fold(f64::INFINITY, f64::min);
    if let Some(x) =
        (0..e).find(|&x| !seen[x] && allowed.contains(&(x / size)) && sel[x] > worst + eps)
    {
        return Err(format!(
            "expert {x} (score {}) beats the chosen {chosen:?}",
            sel[x]
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------

/// Relative-norm tolerance of an output rounded to `dtype`, on `dev`, beyond that rounding.
fn tol(dev: &Device, dtype: DType) -> f64 {
    match (dev.is_cuda(), dtype) {
        (false, _) => 1e-6,
        (true, DType::F32) => 1e-5,
        (true, _) => 1e-2,
    }
}

/// `got` against `reference` (f64) for outputs rounded to `dtype`.
fn check_close(dev: &Device, dtype: DType, got: &[f64], reference: &[f64], what: &str) {
    let rounded: Vec<f64> = reference.iter().map(|&x| round_to(dtype, x)).collect();
    let inherent = rel_err(&rounded, reference, 1e-6);
    let e = rel_err(got, reference, 1e-6);
    let allowed = tol(dev, dtype) + inherent;
    if e > allowed {
        let worst = (0..got.len())
            .max_by(|&a, &b| {
                (got[a] - reference[a])
                    .abs()
                    .partial_cmp(&(got[b] - reference[b]).abs())
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .unwrap_or(0);
        panic!(
            "[{}] {what}: error {e:.3e} > {allowed:.1e} (worst index {worst}: got {}, ref {})",
            dev.name(),
            got[worst],
            reference[worst]
        );
    }
}

/// Runs a route case and checks every output; returns the device's outputs.
fn check_route(dev: &Device, case: &RouteCase) -> RouteOut {
    let (res, before, after) = case.run(dev);
    let fail = |msg: String| -> ! { panic!("[{}] {}: {msg}", dev.name(), case.what) };
    if let Err(e) = res {
        fail(format!("call failed: {e}"));
    }
    if let Err(msg) = case.tails(&before, &after) {
        fail(msg);
    }
    let out = case.outputs(&after);
    let reference = ref_route(case);
    let (n, e, k) = (case.n(), case.e(), case.params.k);
    let (scores, sel) = ref_scores(case);
    for t in 0..n {
        let got = &out.expert_ids[t * k..(t + 1) * k];
        let want = &reference.expert_ids[t * k..(t + 1) * k];
        if got == want {
            continue;
        }
        if !dev.is_cuda() {
            fail(format!("token {t}: experts {got:?}, reference {want:?}"));
        }
        if let Err(msg) = selection_valid(&case.params, &sel[t * e..(t + 1) * e], got, 1e-5) {
            fail(format!(
                "token {t}: experts {got:?} (reference {want:?}): {msg}"
            ));
        }
    }
    // Weights and permutation of the device's own choice.
    let mut want_w = Vec::with_capacity(n * k);
    for t in 0..n {
        want_w.extend(ref_weights(
            &case.params,
            case.logits.row(t),
            &scores[t * e..(t + 1) * e],
            &out.expert_ids[t * k..(t + 1) * k],
        ));
    }
    let got_w: Vec<f64> = out.weights.iter().map(|&w| w as f64).collect();
    check_close(
        dev,
        DType::F32,
        &got_w,
        &want_w,
        &format!("{}: weights", case.what),
    );
    let (counts, offsets, perm, position) =
        ref_permutation(&out.expert_ids, n, e, &case.params, case.perm_rows);
    for (name, got, want) in [
        ("counts", &out.counts, &counts),
        ("offsets", &out.offsets, &offsets),
        ("perm", &out.perm, &perm),
        ("position", &out.position, &position),
    ] {
        if got != want {
            let i = got
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap();
            fail(format!("{name}[{i}] = {}, reference {}", got[i], want[i]));
        }
    }
    out
}

/// Reference of permute: `out[r] = x[perm[r] / k] · w[perm[r]]`, 0 for −1.
fn ref_permute(x: &Logits, k: usize, perm: &[i32], weights: Option<&[f32]>) -> Vec<f64> {
    let h = x.cols;
    let mut out = vec![0.0; perm.len() * h];
    for (r, &p) in perm.iter().enumerate() {
        if p >= 0 {
            let p = p as usize;
            let w = weights.map_or(1.0, |w| w[p] as f64);
            for c in 0..h {
                out[r * h + c] = x.row(p / k)[c] * w;
            }
        }
    }
    out
}

/// Reference of combine: `y[t] = Σ_j w[t, j] · rows[position[t, j]]`.
fn ref_combine(rows: &Logits, n: usize, position: &[i32], weights: Option<&[f32]>) -> Vec<f64> {
    let (h, k) = (rows.cols, position.len() / n);
    let mut y = vec![0.0; n * h];
    for t in 0..n {
        for j in 0..k {
            let pos = position[t * k + j];
            if pos < 0 {
                continue;
            }
            let w = weights.map_or(1.0, |w| w[t * k + j] as f64);
            for c in 0..h {
                y[t * h + c] += w * rows.row(pos as usize)[c];
            }
        }
    }
    y
}

/// Reference of slot dot: `out[t, j] = ⟨tokens[t], rows[position[t, j]]⟩`.
fn ref_slot_dot(tokens: &Logits, rows: &Logits, position: &[i32]) -> Vec<f64> {
    let k = position.len() / tokens.rows;
    position
        .iter()
        .enumerate()
        .map(|(slot, &pos)| {
            if pos < 0 {
                return 0.0;
            }
            let (a, b) = (tokens.row(slot / k), rows.row(pos as usize));
            a.iter().zip(b).map(|(x, y)| x * y).sum()
        })
        .collect()
}

fn check_permute(dev: &Device, case: &PermuteCase) -> Vec<f64> {
    let (res, before, after) = case.run(dev);
    res.unwrap_or_else(|e| panic!("[{}] {}: call failed: {e}", dev.name(), case.what));
    for i in [act_buf::A, act_buf::B, act_buf::C] {
        assert!(
            before[i] == after[i],
            "[{}] {}: input {i} modified",
            dev.name(),
            case.what
        );
    }
    let got = case
        .output(&after)
        .unwrap_or_else(|m| panic!("[{}] {}: {m}", dev.name(), case.what));
    let want = ref_permute(&case.x, case.k, &case.perm, case.weights.as_deref());
    let h = case.x.cols;
    for (r, &p) in case.perm.iter().enumerate() {
        let row = &got[r * h..(r + 1) * h];
        if p < 0 {
            assert!(
                row.iter().all(|&v| v == 0.0),
                "[{}] {}: padding row {r} is not zero",
                dev.name(),
                case.what
            );
        } else if case.weights.is_none() {
            // An unscaled gather is a copy: bitwise equal values.
            assert_eq!(
                row,
                &want[r * h..(r + 1) * h],
                "[{}] {}: row {r}",
                dev.name(),
                case.what
            );
        }
    }
    check_close(dev, case.x.dtype, &got, &want, &case.what);
    got
}

fn check_combine(dev: &Device, case: &CombineCase) -> Vec<f64> {
    let (res, before, after) = case.run(dev);
    res.unwrap_or_else(|e| panic!("[{}] {}: call failed: {e}", dev.name(), case.what));
    for i in [act_buf::A, act_buf::B, act_buf::C] {
        assert!(
            before[i] == after[i],
            "[{}] {}: input {i} modified",
            dev.name(),
            case.what
        );
    }
    let got = case
        .output(&after)
        .unwrap_or_else(|m| panic!("[{}] {}: {m}", dev.name(), case.what));
    let want = ref_combine(&case.rows, case.n, &case.position, case.weights.as_deref());
    check_close(dev, case.rows.dtype, &got, &want, &case.what);
    got
}

fn check_slot_dot(dev: &Device, case: &SlotDotCase) -> Vec<f64> {
    let (res, before, after) = case.run(dev);
    res.unwrap_or_else(|e| panic!("[{}] {}: call failed: {e}", dev.name(), case.what));
    for i in [act_buf::A, act_buf::B, act_buf::C] {
        assert!(
            before[i] == after[i],
            "[{}] {}: input {i} modified",
            dev.name(),
            case.what
        );
    }
    let got = case
        .output(&after)
        .unwrap_or_else(|m| panic!("[{}] {}: {m}", dev.name(), case.what));
    let want = ref_slot_dot(&case.tokens, &case.rows, &case.position);
    for (slot, &pos) in case.position.iter().enumerate() {
        if pos < 0 {
            assert_eq!(
                got[slot],
                0.0,
                "[{}] {}: dropped slot {slot}",
                dev.name(),
                case.what
            );
        }
    }
    check_close(dev, DType::F32, &got, &want, &case.what);
    got
}

// ------------------------------------------------------------------------------------------
// Case builders
// ------------------------------------------------------------------------------------------

/// Random router logits `[n, e]` of `dtype` with row stride `stride`.
fn router_logits(rng: &mut Rng, dtype: DType, n: usize, e: usize, stride: usize) -> Logits {
    let std = rng.range(0.5, 2.0);
    Logits::new(dtype, n, e, &rng.logits(n, e, std)).with_stride(stride)
}

fn random_bias(rng: &mut Rng, e: usize) -> Vec<f32> {
    (0..e).map(|_| rng.range(-0.1, 0.1) as f32).collect()
}

/// Runs the forward dispatch of a routed batch on `dev`: permute (scaled or not) then combine
/// (weighted or not), with hidden size `h` in `dtype`, using the reference route's outputs.
fn dispatch(
    dev: &Device,
    rng: &mut Rng,
    case: &RouteCase,
    route: &RouteOut,
    dtype: DType,
    h: usize,
    (scaled_input, weighted_output): (bool, bool),
) {
    let (n, k) = (case.n(), case.params.k);
    let rows = route.offsets[case.e()] as usize;
    let x = random_matrix(rng, dtype, n, h, h);
    let p = PermuteCase {
        x,
        k,
        perm: route.perm[..rows].to_vec(),
        weights: scaled_input.then(|| route.weights.clone()),
        out_stride: h,
        what: format!(
            "{}: permute {} H={h} scaled={scaled_input}",
            case.what,
            dtype.name()
        ),
    };
    check_permute(dev, &p);
    let expert_out = random_matrix(rng, dtype, rows, h, h);
    let c = CombineCase {
        rows: expert_out,
        n,
        position: route.position.clone(),
        weights: weighted_output.then(|| route.weights.clone()),
        y_stride: h,
        what: format!(
            "{}: combine {} H={h} weighted={weighted_output}",
            case.what,
            dtype.name()
        ),
    };
    check_combine(dev, &c);
}

// ------------------------------------------------------------------------------------------
// Routers of real models
// ------------------------------------------------------------------------------------------

#[test]
fn llama4_sigmoid_top1_scaled_input() {
    let mut rng = Rng::fresh("llama4_sigmoid_top1_scaled_input");
    for dev in devices("llama4_sigmoid_top1_scaled_input") {
        for (n, dtype) in [
            (1, DType::F32),
            (37, DType::BF16),
            (1000, DType::F32),
            (777, DType::BF16),
        ] {
            let params = RouteParams {
                score: Score::Sigmoid,
                ..RouteParams::new(1)
            };
            let case = RouteCase::new(router_logits(&mut rng, dtype, n, 16, 16), None, params);
            let out = check_route(&dev, &case);
            // Top-1 sigmoid: the weight is the sigmoid of the largest logit.
            for t in 0..n {
                let l = case.logits.row(t)[out.expert_ids[t] as usize];
                let s = 1.0 / (1.0 + (-l).exp());
                assert!((out.weights[t] as f64 - s).abs() < 1e-6, "token {t}");
            }
            let route = ref_route(&case);
            dispatch(
                &dev,
                &mut rng,
                &case,
                &route,
                DType::BF16,
                64,
                (true, false),
            );
        }
    }
}

#[test]
fn qwen3_moe_softmax_top8_of_128_renormalised() {
    let mut rng = Rng::fresh("qwen3_moe_softmax_top8_of_128_renormalised");
    for dev in devices("qwen3_moe_softmax_top8_of_128_renormalised") {
        for (n, dtype, stride) in [
            (1, DType::BF16, 128),
            (37, DType::F32, 136),
            (513, DType::BF16, 128),
        ] {
            let params = RouteParams {
                renormalize: true,
                ..RouteParams::new(8)
            };
            let case = RouteCase::new(router_logits(&mut rng, dtype, n, 128, stride), None, params);
            let out = check_route(&dev, &case);
            for t in 0..n {
                let s: f64 = out.weights[t * 8..(t + 1) * 8]
                    .iter()
                    .map(|&w| w as f64)
                    .sum();
                assert!(
                    (s - 1.0).abs() < 1e-5,
                    "token {t}: renormalised weights sum to {s}"
                );
            }
            let route = ref_route(&case);
            dispatch(
                &dev,
                &mut rng,
                &case,
                &route,
                DType::BF16,
                128,
                (false, true),
            );
        }
    }
}

#[test]
fn deepseek_v3_grouped_biased_scaled() {
    let mut rng = Rng::fresh("deepseek_v3_grouped_biased_scaled");
    for dev in devices("deepseek_v3_grouped_biased_scaled") {
        for (n, dtype) in [(1, DType::F32), (37, DType::BF16), (300, DType::F32)] {
            let params = RouteParams {
                score: Score::Sigmoid,
                renormalize: true,
                n_groups: 8,
                topk_groups: 4,
                scale: 2.5,
                ..RouteParams::new(8)
            };
            let bias = random_bias(&mut rng, 256);
            let case = RouteCase::new(
                router_logits(&mut rng, dtype, n, 256, 256),
                Some(bias),
                params,
            );
            let out = check_route(&dev, &case);
            for t in 0..n {
                let ids = &out.expert_ids[t * 8..(t + 1) * 8];
                let mut groups: Vec<i32> = ids.iter().map(|&i| i / 32).collect();
                groups.sort();
                groups.dedup();
                assert!(
                    groups.len() <= 4,
                    "token {t}: experts from groups {groups:?}"
                );
                let s: f64 = out.weights[t * 8..(t + 1) * 8]
                    .iter()
                    .map(|&w| w as f64)
                    .sum();
                assert!(
                    (s - 2.5).abs() < 1e-5,
                    "token {t}: weights sum to {s}, not 2.5"
                );
            }
            let route = ref_route(&case);
            dispatch(
                &dev,
                &mut rng,
                &case,
                &route,
                DType::BF16,
                64,
                (false, true),
            );
        }
    }
}

#[test]
fn bias_changes_selection_not_weights() {
    // A large bias on expert 3 makes it chosen everywhere, with its unbiased score as weight.
    let mut rng = Rng::fresh("bias_changes_selection_not_weights");
    for dev in devices("bias_changes_selection_not_weights") {
        let mut bias = vec![0.0f32; 32];
        bias[3] = 10.0;
        let params = RouteParams {
            score: Score::Sigmoid,
            ..RouteParams::new(2)
        };
        let case = RouteCase::new(
            router_logits(&mut rng, DType::F32, 41, 32, 32),
            Some(bias),
            params,
        );
        let out = check_route(&dev, &case);
        for t in 0..41 {
            assert_eq!(out.expert_ids[t * 2], 3, "token {t}");
            let l = case.logits.row(t)[3];
            assert!((out.weights[t * 2] as f64 - 1.0 / (1.0 + (-l).exp())).abs() < 1e-6);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Capacity, padding, ties, shapes
// ------------------------------------------------------------------------------------------

#[test]
fn capacity_drops_later_tokens() {
    let mut rng = Rng::fresh("capacity_drops_later_tokens");
    for dev in devices("capacity_drops_later_tokens") {
        for (n, e, k, cap, block) in [
            (64, 8, 2, 5, 1),
            (37, 16, 4, 3, 4),
            (200, 32, 8, 40, 16),
            (9, 4, 1, 1, 1),
        ] {
            let params = RouteParams {
                capacity: Some(cap),
                block,
                ..RouteParams::new(k)
            };
            let case = RouteCase::new(router_logits(&mut rng, DType::F32, n, e, e), None, params);
            let out = check_route(&dev, &case);
            let dropped = out.position.iter().filter(|&&p| p < 0).count();
            let kept: i32 = out.counts.iter().sum();
            assert_eq!(kept as usize + dropped, n * k);
            assert!(out.counts.iter().all(|&c| c as usize <= cap));
            // The kept entries of an expert are its first `cap` slots in token order.
            for ex in 0..e as i32 {
                let slots: Vec<usize> = (0..n * k).filter(|&s| out.expert_ids[s] == ex).collect();
                for (i, &s) in slots.iter().enumerate() {
                    assert_eq!(out.position[s] >= 0, i < cap, "expert {ex}, its entry {i}");
                }
            }
            if n >= 37 {
                assert!(dropped > 0, "{}: expected drops", case.what);
            }
            let route = ref_route(&case);
            dispatch(&dev, &mut rng, &case, &route, DType::F32, 24, (true, true));
        }
    }
}

#[test]
fn block_padding_and_perm_tail() {
    let mut rng = Rng::fresh("block_padding_and_perm_tail");
    for dev in devices("block_padding_and_perm_tail") {
        for (n, e, k, block, extra) in [(37, 8, 2, 8, 0), (100, 64, 4, 128, 13), (5, 16, 2, 3, 100)]
        {
            let params = RouteParams {
                block,
                ..RouteParams::new(k)
            };
            let mut case =
                RouteCase::new(router_logits(&mut rng, DType::BF16, n, e, e), None, params);
            case.perm_rows += extra;
            let out = check_route(&dev, &case);
            for ex in 0..e {
                let (start, end) = (out.offsets[ex] as usize, out.offsets[ex + 1] as usize);
                assert_eq!(start % block, 0);
                assert_eq!(
                    end - start,
                    (out.counts[ex] as usize).div_ceil(block) * block
                );
                let c = out.counts[ex] as usize;
                assert!(out.perm[start..start + c].iter().all(|&p| p >= 0));
                assert!(out.perm[start + c..end].iter().all(|&p| p == -1));
            }
            let r = out.offsets[e] as usize;
            assert!(r <= case.params.max_rows(n, e));
            assert!(out.perm[r..].iter().all(|&p| p == -1), "perm tail past R");
            let route = ref_route(&case);
            dispatch(&dev, &mut rng, &case, &route, DType::F16, 16, (false, true));
        }
    }
}

#[test]
fn ties_go_to_lower_indices() {
    let mut rng = Rng::fresh("ties_go_to_lower_indices");
    for dev in devices("ties_go_to_lower_indices") {
        for dtype in [DType::F32, DType::BF16] {
            // Equal logits: the lowest ids, in order.
            let e = 16;
            let mut vals = vec![0.75; 3 * e];
            // Row 1: a block of equal maxima in the middle.
            for i in [5, 9, 12, 13] {
                vals[e + i] = 2.0;
            }
            // Row 2: two equal pairs.
            for (i, v) in [(2, 1.5), (7, 1.5), (4, 3.0), (11, 3.0)] {
                vals[2 * e + i] = v;
            }
            for score in [Score::Softmax, Score::Sigmoid] {
                let params = RouteParams {
                    score,
                    ..RouteParams::new(4)
                };
                let case = RouteCase::new(Logits::new(dtype, 3, e, &vals), None, params);
                let out = check_route(&dev, &case);
                assert_eq!(&out.expert_ids[..4], &[0, 1, 2, 3]);
                assert_eq!(&out.expert_ids[4..8], &[5, 9, 12, 13]);
                assert_eq!(&out.expert_ids[8..12], &[4, 11, 2, 7]);
                assert_eq!(out.expert_ids, ref_route(&case).expert_ids);
            }
            // Equal group scores: the lower group wins. 4 groups of 4; groups 1 and 3 tie for
            // the best, groups 0 and 2 tie below them; keep 1 → group 1.
            let g = [
                0.0, 0.5, 0.25, 0.0, //
                1.0, 0.0, 0.0, 1.0, //
                0.5, 0.0, 0.0, 0.25, //
                0.0, 1.0, 1.0, 0.0,
            ];
            let params = RouteParams {
                score: Score::Sigmoid,
                n_groups: 4,
                topk_groups: 1,
                ..RouteParams::new(2)
            };
            let case = RouteCase::new(Logits::new(dtype, 1, 16, &g), None, params);
            let out = check_route(&dev, &case);
            assert_eq!(out.expert_ids, vec![4, 7]);
            // Keep 3: groups 1, 3 and then 0 (tied with 2).
            let params = RouteParams {
                topk_groups: 3,
                k: 6,
                ..params
            };
            let case = RouteCase::new(Logits::new(dtype, 1, 16, &g), None, params);
            let out = check_route(&dev, &case);
            assert_eq!(out.expert_ids, vec![4, 7, 13, 14, 1, 2]);
        }
        // bf16 logits of many tokens have exact duplicates: must match the reference exactly.
        let params = RouteParams::new(8);
        let coarse: Vec<f64> = (0..200 * 64)
            .map(|_| (rng.below(0, 6) as f64) * 0.5)
            .collect();
        let case = RouteCase::new(Logits::new(DType::BF16, 200, 64, &coarse), None, params);
        let out = check_route(&dev, &case);
        assert_eq!(out.expert_ids, ref_route(&case).expert_ids);
    }
}

#[test]
fn shapes_n_e_k_and_strides() {
    let mut rng = Rng::fresh("shapes_n_e_k_and_strides");
    for dev in devices("shapes_n_e_k_and_strides") {
        for (n, e, k) in [
            (1, 1, 1),
            (37, 2, 1),
            (37, 7, 7),
            (129, 7, 3),
            (1, 512, 8),
            (257, 512, 8),
            (37, 64, 32),
            (3, 512, 32),
            (1000, 128, 6),
        ] {
            for (dtype, score) in [(DType::F32, Score::Softmax), (DType::BF16, Score::Sigmoid)] {
                let stride = e + rng.below(0, 3) * 8;
                let params = RouteParams {
                    score,
                    renormalize: rng.uniform() < 0.5,
                    scale: rng.range(0.5, 3.0) as f32,
                    ..RouteParams::new(k)
                };
                let case =
                    RouteCase::new(router_logits(&mut rng, dtype, n, e, stride), None, params);
                check_route(&dev, &case);
            }
        }
    }
}

#[test]
fn nan_logits_rank_last() {
    // A NaN selection score ranks as −inf: with sigmoid the NaN expert is never preferred; with
    // softmax every score of that token is NaN and the lowest ids are chosen.
    for dev in devices("nan_logits_rank_last") {
        let mut vals = vec![0.0; 2 * 8];
        for (i, v) in vals.iter_mut().enumerate() {
            *v = (i % 8) as f64 * 0.25;
        }
        vals[7] = f64::NAN;
        let case = RouteCase::new(
            Logits::new(DType::F32, 2, 8, &vals),
            None,
            RouteParams {
                score: Score::Sigmoid,
                ..RouteParams::new(2)
            },
        );
        let (res, before, after) = case.run(&dev);
        res.unwrap();
        case.tails(&before, &after).unwrap();
        let out = case.outputs(&after);
        assert_eq!(out.expert_ids, vec![6, 5, 7, 6]);
        let case = RouteCase {
            params: RouteParams::new(2),
            ..case
        };
        let (res, before, after) = case.run(&dev);
        res.unwrap();
        case.tails(&before, &after).unwrap();
        let out = case.outputs(&after);
        assert_eq!(&out.expert_ids[..2], &[0, 1]);
        assert!(out.weights[..2].iter().all(|w| w.is_nan()));
        assert_eq!(&out.expert_ids[2..], &[7, 6]);
    }
}

#[test]
fn nan_scores_rank_below_experts_masked_by_a_minus_inf_bias() {
    // A NaN selection score ranks below every number, −∞ included, with a bias too: a −∞ bias
    // (an expert switched off) gives a score of −∞, which is still a number, so the NaN
    // logit's expert comes after it, and its NaN weight reaches nothing at k = 2 or 3.
    let row = [
        1.0,
        f64::NAN,
        2.0,
        3.0,
        -1.0,
        f64::NAN,
        0.5,
        f64::NEG_INFINITY,
    ];
    let bias = vec![
        0.0,
        0.0,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        0.0,
        0.0,
        0.0,
        0.0,
    ];
    for dev in devices("nan_scores_rank_below_experts_masked_by_a_minus_inf_bias") {
        // (score, groups / kept groups, k, expected ids): one token of 8 experts; with 2 groups
        // of 4 both kept; with 4 groups of 2 keeping 3: groups 0 ({0, 1}: 0.73 + NaN), 1
        // ({2, 3}: −∞ + −∞) and 2 ({4, 5}: 0.27 + NaN) all score −∞ and tie, so 0 and 1 are
        // kept beside 3 ({6, 7}: 0.62 + 0).
        for (score, (ng, kg), k, want) in [
            (Score::Sigmoid, (1, 1), 3, vec![0, 6, 4]),
            (Score::Sigmoid, (1, 1), 8, vec![0, 6, 4, 7, 2, 3, 1, 5]),
            (Score::Sigmoid, (2, 2), 6, vec![0, 6, 4, 7, 2, 3]),
            (Score::Sigmoid, (4, 3), 5, vec![0, 6, 7, 2, 3]),
        ] {
            let case = RouteCase::new(
                Logits::new(DType::F32, 1, 8, &row),
                Some(bias.clone()),
                RouteParams {
                    score,
                    n_groups: ng,
                    topk_groups: kg,
                    ..RouteParams::new(k)
                },
            );
            let (res, before, after) = case.run(&dev);
            res.unwrap_or_else(|e| panic!("[{}] {}: {e}", dev.name(), case.what));
            case.tails(&before, &after).unwrap();
            let out = case.outputs(&after);
            assert_eq!(out.expert_ids, want, "[{}] {}", dev.name(), case.what);
            let finite = want
                .iter()
                .take_while(|&&i| !row[i as usize].is_nan())
                .count();
            assert!(
                out.weights[..finite].iter().all(|w| w.is_finite())
                    && out.weights[finite..].iter().all(|w| w.is_nan()),
                "[{}] {}: weights {:?}",
                dev.name(),
                case.what,
                out.weights
            );
        }
    }
}

#[test]
fn sigmoid_without_bias_ranks_the_logits() {
    // Sigmoid scores saturate (exactly 1 from logits of ~17 in f32, ~37 in f64; 0 below ~-88 in
    // f32): without a bias the logits are compared, which is the exact scores' order (and
    // Llama 4's). With a bias the saturated scores tie and go to the lower index.
    let row = [
        40.0,
        45.0,
        17.0,
        20.0,
        -100.0,
        f64::NEG_INFINITY,
        -90.0,
        0.0,
    ];
    for dev in devices("sigmoid_without_bias_ranks_the_logits") {
        let case = RouteCase::new(
            Logits::new(DType::F32, 1, 8, &row),
            None,
            RouteParams {
                score: Score::Sigmoid,
                ..RouteParams::new(8)
            },
        );
        let (res, before, after) = case.run(&dev);
        res.unwrap();
        case.tails(&before, &after).unwrap();
        let out = case.outputs(&after);
        assert_eq!(
            out.expert_ids,
            vec![1, 0, 3, 2, 7, 6, 4, 5],
            "{}",
            dev.name()
        );
        let biased = RouteCase {
            bias: Some(vec![0.0; 8]),
            ..case
        };
        let (res, _, after) = biased.run(&dev);
        res.unwrap();
        let out = biased.outputs(&after);
        assert_eq!(&out.expert_ids[..2], &[0, 1], "{}", dev.name());
        // A NaN logit still ranks below every number, -inf included (its weight stays NaN).
        let nan = RouteCase::new(
            Logits::new(
                DType::F32,
                1,
                4,
                &[f64::NAN, f64::NEG_INFINITY, 1.0, f64::NEG_INFINITY],
            ),
            None,
            RouteParams {
                score: Score::Sigmoid,
                ..RouteParams::new(4)
            },
        );
        let (res, _, after) = nan.run(&dev);
        res.unwrap();
        let out = nan.outputs(&after);
        assert_eq!(out.expert_ids, vec![2, 1, 3, 0], "{}", dev.name());
        assert_eq!(&out.weights[1..3], &[0.0, 0.0]);
        assert!(out.weights[3].is_nan());
    }
}

#[test]
fn renormalised_weights_of_underflowing_scores() {
    // Chosen scores that underflow (f32: a sigmoid below ~-88, a softmax probability ~87 below
    // the token's max; f64: -745) still have exact ratios: renormalised weights stay finite and
    // sum to 1, and a token whose chosen logits are all -inf gets NaN (0 / 0).
    let mut rng = Rng::fresh("renormalised_weights_of_underflowing_scores");
    let sigmoid = |k| RouteParams {
        score: Score::Sigmoid,
        renormalize: true,
        ..RouteParams::new(k)
    };
    for dev in devices("renormalised_weights_of_underflowing_scores") {
        for dtype in [DType::F32, DType::BF16] {
            // Tokens around -100, -80, -10 (spread 1: below the kernels' direct-division bound,
            // where the sigmoid factor (1 + e^mc) / (1 + e^x) moves the ratios by ~1e-3) and 0.
            let (n, e) = (24, 32);
            let mut vals = rng.logits(n, e, 1.0);
            for (t, row) in vals.chunks_mut(e).enumerate() {
                let (centre, spread) =
                    [(-100.0, 3.0), (-80.0, 3.0), (-10.0, 1.0), (0.0, 3.0)][t % 4];
                row.iter_mut().for_each(|v| *v = *v * spread + centre);
            }
            let case = RouteCase::new(Logits::new(dtype, n, e, &vals), None, sigmoid(4));
            let out = check_route(&dev, &case);
            for t in 0..n {
                let sum: f32 = out.weights[t * 4..(t + 1) * 4].iter().sum();
                assert!(
                    (sum - 1.0).abs() < 1e-5,
                    "[{}] token {t}: weights sum to {sum}",
                    dev.name()
                );
            }
            // DeepSeek-V3's configuration on logits near -100 (the bias picks the experts).
            let mut vals = rng.logits(16, 256, 4.0);
            vals.iter_mut().for_each(|v| *v -= 100.0);
            let case = RouteCase::new(
                Logits::new(dtype, 16, 256, &vals),
                Some(random_bias(&mut rng, 256)),
                RouteParams {
                    n_groups: 8,
                    topk_groups: 4,
                    scale: 2.5,
                    ..sigmoid(8)
                },
            );
            check_route(&dev, &case);
            // Softmax whose bias picks experts 150 below the token's best logit.
            let (n, e) = (12, 64);
            let mut vals = rng.logits(n, e, 1.0);
            for row in vals.chunks_mut(e) {
                row[..8].iter_mut().for_each(|v| *v = *v * 4.0 - 150.0);
            }
            let mut bias = vec![0f32; e];
            bias[..8].fill(10.0);
            let case = RouteCase::new(
                Logits::new(dtype, n, e, &vals),
                Some(bias),
                RouteParams {
                    renormalize: true,
                    ..RouteParams::new(4)
                },
            );
            let out = check_route(&dev, &case);
            assert!(out.expert_ids.iter().all(|&x| x < 8), "[{}]", dev.name());
        }
        // Beyond f64's exponent (f32 only): one-hot when one logit is far above the others;
        // NaN when every chosen logit is -inf.
        let vals = [
            -1e30,
            -2e30,
            -3e38,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
            -3e38,
            f64::NEG_INFINITY,
        ];
        let case = RouteCase::new(Logits::new(DType::F32, 2, 4, &vals), None, sigmoid(3));
        let (res, before, after) = case.run(&dev);
        res.unwrap();
        case.tails(&before, &after).unwrap();
        let out = case.outputs(&after);
        assert_eq!(out.expert_ids, vec![0, 1, 2, 2, 0, 1], "[{}]", dev.name());
        assert_eq!(&out.weights[..3], &[1.0, 0.0, 0.0], "[{}]", dev.name());
        assert_eq!(out.weights[3], 1.0, "[{}]", dev.name());
        let all_minus_inf = RouteCase::new(
            Logits::new(DType::F32, 1, 4, &[f64::NEG_INFINITY; 4]),
            None,
            sigmoid(2),
        );
        let (res, _, after) = all_minus_inf.run(&dev);
        res.unwrap();
        let out = all_minus_inf.outputs(&after);
        assert_eq!(out.expert_ids, vec![0, 1], "[{}]", dev.name());
        assert!(out.weights.iter().all(|w| w.is_nan()), "[{}]", dev.name());
    }
}

// ------------------------------------------------------------------------------------------
// Permute / combine / slot dot
// ------------------------------------------------------------------------------------------

/// A routed batch (reference outputs) for activation tests, with capacity drops and padding.
fn routed(
    rng: &mut Rng,
    n: usize,
    e: usize,
    k: usize,
    cap: usize,
    block: usize,
) -> (RouteCase, RouteOut) {
    let params = RouteParams {
        capacity: Some(cap),
        block,
        renormalize: true,
        ..RouteParams::new(k)
    };
    let case = RouteCase::new(router_logits(rng, DType::F32, n, e, e), None, params);
    let out = ref_route(&case);
    (case, out)
}

#[test]
fn permute_combine_slot_dot_dtypes_and_sizes() {
    let mut rng = Rng::fresh("permute_combine_slot_dot_dtypes_and_sizes");
    for dev in devices("permute_combine_slot_dot_dtypes_and_sizes") {
        for (n, h) in [(37, 8), (19, 24), (64, 1024), (1, 1024)] {
            let (case, route) = routed(&mut rng, n, 16, 4, (n / 3).max(1), 8);
            let rows = route.offsets[16] as usize;
            for dtype in DType::ALL {
                for (pad_in, pad_out) in [(0, 0), (8, 16)] {
                    let tag = format!("N={n} H={h} {} strides +{pad_in}/+{pad_out}", dtype.name());
                    let x = random_matrix(&mut rng, dtype, n, h, h + pad_in);
                    for weights in [None, Some(route.weights.clone())] {
                        check_permute(
                            &dev,
                            &PermuteCase {
                                x: x.clone(),
                                k: 4,
                                perm: route.perm[..rows].to_vec(),
                                weights: weights.clone(),
                                out_stride: h + pad_out,
                                what: format!(
                                    "{}: permute {tag} scaled={}",
                                    case.what,
                                    weights.is_some()
                                ),
                            },
                        );
                        let expert_out = random_matrix(&mut rng, dtype, rows, h, h + pad_in);
                        check_combine(
                            &dev,
                            &CombineCase {
                                rows: expert_out,
                                n,
                                position: route.position.clone(),
                                weights: weights.clone(),
                                y_stride: h + pad_out,
                                what: format!(
                                    "{}: combine {tag} weighted={}",
                                    case.what,
                                    weights.is_some()
                                ),
                            },
                        );
                    }
                    let expert_out = random_matrix(&mut rng, dtype, rows, h, h + pad_out);
                    check_slot_dot(
                        &dev,
                        &SlotDotCase {
                            tokens: x,
                            rows: expert_out,
                            position: route.position.clone(),
                            what: format!("{}: slot_dot {tag}", case.what),
                        },
                    );
                }
            }
        }
    }
}

#[test]
fn strides_wider_than_h() {
    // Row strides of one 16-byte step past H (inputs) and three (outputs): the least padding
    // the row alignment allows, per dtype.
    let mut rng = Rng::fresh("strides_wider_than_h");
    for dev in devices("strides_wider_than_h") {
        let (n, h) = (23, 40);
        let (case, route) = routed(&mut rng, n, 8, 2, 100, 1);
        let rows = route.offsets[8] as usize;
        for dtype in DType::ALL {
            let step = ROW_ALIGN / dtype.size();
            let (xs, os, rs, ys) = (h + step, h + 3 * step, h + 2 * step, h + 5 * step);
            let tag = format!("{} strides {xs}/{os}/{rs}/{ys}", dtype.name());
            let x = random_matrix(&mut rng, dtype, n, h, xs);
            check_permute(
                &dev,
                &PermuteCase {
                    x: x.clone(),
                    k: 2,
                    perm: route.perm[..rows].to_vec(),
                    weights: Some(route.weights.clone()),
                    out_stride: os,
                    what: format!("{}: permute {tag}", case.what),
                },
            );
            let expert_out = random_matrix(&mut rng, dtype, rows, h, rs);
            check_combine(
                &dev,
                &CombineCase {
                    rows: expert_out.clone(),
                    n,
                    position: route.position.clone(),
                    weights: Some(route.weights.clone()),
                    y_stride: ys,
                    what: format!("{}: combine {tag}", case.what),
                },
            );
            check_slot_dot(
                &dev,
                &SlotDotCase {
                    tokens: x,
                    rows: expert_out,
                    position: route.position.clone(),
                    what: format!("{}: slot_dot {tag}", case.what),
                },
            );
        }
    }
}

#[test]
fn unscaled_permute_copies_the_bits() {
    // An unscaled permute is a row copy: NaN payloads (quiet and signalling), −0 and subnormals
    // come out bit for bit, on every backend (the CPU copies rows; CUDA's gather moves raw
    // 16-byte words), and padding rows are +0.
    let mut rng = Rng::fresh("unscaled_permute_copies_the_bits");
    for dev in devices("unscaled_permute_copies_the_bits") {
        let (case, route) = routed(&mut rng, 23, 16, 4, 10, 8);
        let rows = route.offsets[16] as usize;
        for dtype in DType::ALL {
            let (n, h) = (23, 24);
            let permute = PermuteCase {
                x: random_matrix(&mut rng, dtype, n, h, h),
                k: 4,
                perm: route.perm[..rows].to_vec(),
                weights: None,
                out_stride: h,
                what: format!(
                    "{}: unscaled permute {} special bits",
                    case.what,
                    dtype.name()
                ),
            };
            let size = dtype.size();
            let specials: &[u64] = match size {
                // Quiet / signalling NaN with payloads for bf16 (0x7FC1, 0x7F81) and f16
                // (0x7E01, 0x7C01), negative NaN, −0, ± the smallest subnormal.
                2 => &[
                    0x7FC1, 0x7F81, 0x7E01, 0x7C01, 0xFFC3, 0x8000, 0x0001, 0x8001,
                ],
                _ => &[
                    0x7FC0_0001,
                    0x7F80_0001,
                    0xFFC0_0123,
                    0x8000_0000,
                    0x0000_0001,
                ],
            };
            let mut bufs = permute.bufs();
            // Every element of x gets a special pattern in turn, so each shows up in the output.
            for (i, e) in bufs[act_buf::A].as_mut().chunks_exact_mut(size).enumerate() {
                let v = specials[i % specials.len()].to_le_bytes();
                e.copy_from_slice(&v[..size]);
            }
            let x_bytes = bufs[act_buf::A].as_ref().to_vec();
            let (res, _, after) = run_spec(
                &dev,
                &bufs,
                |ptrs, loc| permute.spec(ptrs, loc),
                // SAFETY: views over the case's buffers.
                |s, ctx, launch| unsafe { s.run(ctx, launch) },
            );
            res.unwrap_or_else(|e| panic!("{}: {e}", permute.what));
            let out = after[act_buf::OUT].as_ref();
            let row_bytes = h * size;
            for (r, &p) in permute.perm.iter().enumerate() {
                let got = &out[r * row_bytes..(r + 1) * row_bytes];
                if p < 0 {
                    assert!(
                        got.iter().all(|&b| b == 0),
                        "{}: padding row {r}",
                        permute.what
                    );
                } else {
                    let src = (p as usize / 4) * row_bytes;
                    assert_eq!(
                        got,
                        &x_bytes[src..src + row_bytes],
                        "{}: row {r} (slot {p}) is not the bits of its token",
                        permute.what
                    );
                }
            }
        }
    }
}

#[test]
fn permute_and_unweighted_combine_are_adjoint() {
    // Backward of an unscaled permute is an unweighted combine: ⟨permute(x), G⟩ = ⟨x, combine(G)⟩.
    let mut rng = Rng::fresh("permute_and_unweighted_combine_are_adjoint");
    for dev in devices("permute_and_unweighted_combine_are_adjoint") {
        let (n, h, k) = (29, 32, 3);
        let (case, route) = routed(&mut rng, n, 8, k, 8, 4);
        let rows = route.offsets[8] as usize;
        let x = random_matrix(&mut rng, DType::F32, n, h, h);
        let g = random_matrix(&mut rng, DType::F32, rows, h, h);
        let xp = check_permute(
            &dev,
            &PermuteCase {
                x: x.clone(),
                k,
                perm: route.perm[..rows].to_vec(),
                weights: None,
                out_stride: h,
                what: format!("{}: adjoint permute", case.what),
            },
        );
        let gx = check_combine(
            &dev,
            &CombineCase {
                rows: g.clone(),
                n,
                position: route.position.clone(),
                weights: None,
                y_stride: h,
                what: format!("{}: adjoint combine", case.what),
            },
        );
        let lhs: f64 = xp.iter().zip(&g.vals).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.vals.iter().zip(&gx).map(|(a, b)| a * b).sum();
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Gradients against finite differences
// ------------------------------------------------------------------------------------------

/// Runs combine (f32) and returns y.
fn combine_f32(
    dev: &Device,
    rows: &Logits,
    n: usize,
    position: &[i32],
    weights: &[f32],
) -> Vec<f64> {
    let c = CombineCase {
        rows: rows.clone(),
        n,
        position: position.to_vec(),
        weights: Some(weights.to_vec()),
        y_stride: rows.cols,
        what: "fd combine".into(),
    };
    let (res, _, after) = c.run(dev);
    res.unwrap();
    c.output(&after).unwrap()
}

/// Runs a scaled permute (f32) and returns the permuted rows.
fn permute_f32(dev: &Device, x: &Logits, k: usize, perm: &[i32], weights: &[f32]) -> Vec<f64> {
    let p = PermuteCase {
        x: x.clone(),
        k,
        perm: perm.to_vec(),
        weights: Some(weights.to_vec()),
        out_stride: x.cols,
        what: "fd permute".into(),
    };
    let (res, _, after) = p.run(dev);
    res.unwrap();
    p.output(&after).unwrap()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central difference of `loss` along one f32 value `v`, with the step as actually rounded.
fn central(v: f32, step: f32, mut loss: impl FnMut(f32) -> f64) -> f64 {
    let (hi, lo) = (v + step, v - step);
    (loss(hi) - loss(lo)) / (hi as f64 - lo as f64)
}

#[test]
fn combine_backward_matches_finite_differences() {
    // L = ⟨combine(rows, w), g⟩: dL/drows = permute(g, w) (scaled), dL/dw = slot_dot(g, rows).
    let mut rng = Rng::fresh("combine_backward_matches_finite_differences");
    for dev in devices("combine_backward_matches_finite_differences") {
        let (n, h, k, e) = (19, 24, 4, 16);
        let (case, route) = routed(&mut rng, n, e, k, 5, 4);
        let rows_n = route.offsets[e] as usize;
        let rows = random_matrix(&mut rng, DType::F32, rows_n, h, h);
        let g = random_matrix(&mut rng, DType::F32, n, h, h);
        let w = route.weights.clone();
        let grad_rows = check_permute(
            &dev,
            &PermuteCase {
                x: g.clone(),
                k,
                perm: route.perm[..rows_n].to_vec(),
                weights: Some(w.clone()),
                out_stride: h,
                what: format!("{}: grad rows", case.what),
            },
        );
        let grad_w = check_slot_dot(
            &dev,
            &SlotDotCase {
                tokens: g.clone(),
                rows: rows.clone(),
                position: route.position.clone(),
                what: format!("{}: grad weights", case.what),
            },
        );
        let mut fd = Vec::new();
        let mut an = Vec::new();
        for _ in 0..24 {
            let i = rng.below(0, rows_n * h);
            let loss = |v: f32| {
                let mut r = rows.clone();
                r.vals[i] = v as f64;
                dot(&combine_f32(&dev, &r, n, &route.position, &w), &g.vals)
            };
            fd.push(central(rows.vals[i] as f32, 0.0625, loss));
            an.push(grad_rows[i]);
        }
        for s in 0..n * k {
            let loss = |v: f32| {
                let mut ww = w.clone();
                ww[s] = v;
                dot(&combine_f32(&dev, &rows, n, &route.position, &ww), &g.vals)
            };
            fd.push(central(w[s], 0.0625, loss));
            an.push(grad_w[s]);
        }
        let err = rel_err(&fd, &an, 1e-3);
        assert!(
            err < 1e-3,
            "[{}] combine backward: FD error {err:.3e}",
            dev.name()
        );
    }
}

#[test]
fn permute_scaled_backward_matches_finite_differences() {
    // L = ⟨permute(x, w), G⟩: dL/dx = combine(G, w), dL/dw = slot_dot(x, G).
    let mut rng = Rng::fresh("permute_scaled_backward_matches_finite_differences");
    for dev in devices("permute_scaled_backward_matches_finite_differences") {
        let (n, h, k, e) = (17, 16, 2, 8);
        let (case, route) = routed(&mut rng, n, e, k, 3, 2);
        let rows_n = route.offsets[e] as usize;
        let perm = &route.perm[..rows_n];
        let x = random_matrix(&mut rng, DType::F32, n, h, h);
        let gp = random_matrix(&mut rng, DType::F32, rows_n, h, h);
        let w = route.weights.clone();
        let grad_x = check_combine(
            &dev,
            &CombineCase {
                rows: gp.clone(),
                n,
                position: route.position.clone(),
                weights: Some(w.clone()),
                y_stride: h,
                what: format!("{}: grad x", case.what),
            },
        );
        let grad_w = check_slot_dot(
            &dev,
            &SlotDotCase {
                tokens: x.clone(),
                rows: gp.clone(),
                position: route.position.clone(),
                what: format!("{}: grad weights", case.what),
            },
        );
        let mut fd = Vec::new();
        let mut an = Vec::new();
        for _ in 0..24 {
            let i = rng.below(0, n * h);
            let loss = |v: f32| {
                let mut xx = x.clone();
                xx.vals[i] = v as f64;
                dot(&permute_f32(&dev, &xx, k, perm, &w), &gp.vals)
            };
            fd.push(central(x.vals[i] as f32, 0.0625, loss));
            an.push(grad_x[i]);
        }
        for s in 0..n * k {
            let loss = |v: f32| {
                let mut ww = w.clone();
                ww[s] = v;
                dot(&permute_f32(&dev, &x, k, perm, &ww), &gp.vals)
            };
            fd.push(central(w[s], 0.0625, loss));
            an.push(grad_w[s]);
        }
        let err = rel_err(&fd, &an, 1e-3);
        assert!(
            err < 1e-3,
            "[{}] permute backward: FD error {err:.3e}",
            dev.name()
        );
    }
}

// ------------------------------------------------------------------------------------------
// Determinism
// ------------------------------------------------------------------------------------------

#[test]
fn runs_are_bitwise_deterministic() {
    let mut rng = Rng::fresh("runs_are_bitwise_deterministic");
    for dev in devices("runs_are_bitwise_deterministic") {
        let params = RouteParams {
            renormalize: true,
            capacity: Some(300),
            block: 16,
            ..RouteParams::new(8)
        };
        let case = RouteCase::new(
            router_logits(&mut rng, DType::BF16, 2048, 128, 128),
            None,
            params,
        );
        let (r1, _, a1) = case.run(&dev);
        let (r2, _, a2) = case.run(&dev);
        r1.unwrap();
        r2.unwrap();
        assert!(a1 == a2, "[{}] route differs between runs", dev.name());
        let route = case.outputs(&a1);
        let rows = route.offsets[128] as usize;
        let h = 256;
        let x = random_matrix(&mut rng, DType::BF16, 2048, h, h);
        let p = PermuteCase {
            x: x.clone(),
            k: 8,
            perm: route.perm[..rows].to_vec(),
            weights: Some(route.weights.clone()),
            out_stride: h,
            what: "determinism permute".into(),
        };
        let expert_out = random_matrix(&mut rng, DType::BF16, rows, h, h);
        let c = CombineCase {
            rows: expert_out.clone(),
            n: 2048,
            position: route.position.clone(),
            weights: Some(route.weights.clone()),
            y_stride: h,
            what: "determinism combine".into(),
        };
        let d = SlotDotCase {
            tokens: x,
            rows: expert_out,
            position: route.position.clone(),
            what: "determinism slot_dot".into(),
        };
        let twice = |run: &dyn Fn() -> Vec<Bytes>, what: &str| {
            assert!(
                run() == run(),
                "[{}] {what} differs between runs",
                dev.name()
            );
        };
        twice(&|| p.run(&dev).2, "permute");
        twice(&|| c.run(&dev).2, "combine");
        twice(&|| d.run(&dev).2, "slot_dot");
    }
}

#[test]
fn permute_scratch_in_the_callers_workspace() {
    // A k > 1 permute on CUDA needs 4 · (N·k + 1) bytes of scratch: in the caller's workspace
    // when one is given (bitwise the same rows as with library-allocated scratch), refused
    // when it is too small or misaligned, with nothing written. None on the CPU.
    let test = "permute_scratch_in_the_callers_workspace";
    let mut rng = Rng::fresh(test);
    let (case, route) = routed(&mut rng, 37, 16, 4, 37, 8);
    let rows = route.offsets[16] as usize;
    let (n, h) = (37, 24);
    let permute = PermuteCase {
        x: random_matrix(&mut rng, DType::BF16, n, h, h),
        k: 4,
        perm: route.perm[..rows].to_vec(),
        weights: None,
        out_stride: h,
        what: format!("{}: permute into a caller workspace", case.what),
    };
    for dev in devices(test) {
        let Device::Cuda(c) = &dev else {
            if let Device::Cpu(ctx) = &dev {
                assert_eq!(ctx.moe_permute_workspace_size(n, 4), 0);
            }
            continue;
        };
        let need = c.ctx.moe_permute_workspace_size(n, 4);
        assert_eq!(need, 4 * (n * 4 + 1));
        assert_eq!(c.ctx.moe_permute_workspace_size(n, 1), 0);
        let (res, _, library) = permute.run(&dev);
        res.unwrap_or_else(|e| panic!("{}: {e}", permute.what));
        for (bytes, skew, want) in [
            (need, 0, None),
            (need - 1, 0, Some(ErrorKind::WorkspaceTooSmall)),
            (need, 2, Some(ErrorKind::InvalidArgument)),
        ] {
            // SAFETY: scratch memory the library writes before it reads.
            let buf = unsafe { c.stream.alloc::<u8>(bytes + skew) }.expect("workspace");
            let (res, before, after) = run_spec(
                &dev,
                &permute.bufs(),
                |ptrs, loc| permute.spec(ptrs, loc),
                |s, ctx, _| {
                    // SAFETY: the test's live stream of device 0; `bytes` bytes of device
                    // memory of device 0 from `skew`.
                    let launch = unsafe {
                        Launch::on_stream(c.stream.cu_stream() as *mut std::ffi::c_void)
                            .with_workspace(VectorMut::from_raw(
                                c.ptr(&buf).add(skew),
                                bytes,
                                Location::Cuda(0),
                            ))
                    };
                    // SAFETY: views over the case's buffers.
                    unsafe { s.run(ctx, &launch) }
                },
            );
            match want {
                None => {
                    res.unwrap_or_else(|e| panic!("{}: {e}", permute.what));
                    assert!(
                        after[act_buf::OUT] == library[act_buf::OUT],
                        "{}: rows differ from the library-allocated run",
                        permute.what
                    );
                }
                Some(kind) => {
                    let err = res.expect_err("a bad workspace must be refused");
                    assert_eq!(err.kind(), kind, "{err}");
                    assert!(
                        after == before,
                        "{}: written despite the error",
                        permute.what
                    );
                }
            }
        }
        println!(
            "[{}] {}: caller workspace of {need} bytes used; too small and misaligned refused",
            dev.name(),
            permute.what
        );
    }
}
