"""distill_kernels MoE dispatch (numpy, CPU backend) against an independent float64 reference.

The reference below is written from the semantics in DESIGN.md ("MoE dispatch") and the header
(include/distill_kernels.h) with plain numpy; it never calls the library. Every library call runs
with its outputs poisoned first, so unwritten elements show up. The gradient identities are also
checked against finite differences of <output, g>, which are exact up to rounding because permute
and combine are linear in each argument.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import zlib

import ml_dtypes
import numpy as np
import pytest

import distill_kernels as dk
from distill_kernels import _lib

dk_moe_module = importlib.import_module("distill_kernels.moe")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
DTYPES = {"f32": F32, "f16": F16, "bf16": BF16}
# ‖out − ref‖ / ‖ref‖ bounds of DESIGN.md ("Numerics and tests").
TOL = {"f32": 1e-5, "f16": 1e-2, "bf16": 1e-2}


def _moe_available():
    try:
        _lib.moe_lib()
        return None
    except Exception as e:  # noqa: BLE001
        return str(e)


_MISSING = _moe_available()
pytestmark = pytest.mark.skipif(
    _MISSING is not None, reason=f"the library has no MoE dispatch yet: {_MISSING}"
)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(dk_moe_module, "_POISON", True)


# ---- independent float64 reference -----------------------------------------------------------


def ref_route(logits, k, *, score="softmax", renormalize=False, bias=None, n_groups=1,
              topk_groups=1, scale=1.0, capacity=None, block=1):
    """Everything moe_route returns, from the definitions, in float64 / plain loops."""
    lg = np.asarray(logits).astype(np.float64)
    n, e = lg.shape
    if score == "softmax":
        z = np.exp(lg - lg.max(axis=1, keepdims=True))
        s = z / z.sum(axis=1, keepdims=True)
    else:
        s = 1.0 / (1.0 + np.exp(-lg))
    sel = s.copy()
    if bias is not None:
        sel = sel + np.asarray(bias, dtype=np.float32).astype(np.float64)[None, :]
    elif score == "sigmoid" and not (n_groups > 1 and topk_groups < n_groups):
        sel = lg.copy()  # the logits: the exact scores' order (sigmoid saturates at 1)
    if n_groups > 1:
        g = e // n_groups
        top2 = np.sort(sel.reshape(n, n_groups, g), axis=2)[:, :, -2:]
        gscore = top2[:, :, 1] + top2[:, :, 0]
        keep_groups = np.argsort(-gscore, axis=1, kind="stable")[:, :topk_groups]
        keep = np.zeros((n, n_groups), dtype=bool)
        np.put_along_axis(keep, keep_groups, True, axis=1)
        sel = np.where(np.repeat(keep, g, axis=1), sel, -np.inf)
    ids = np.argsort(-sel, axis=1, kind="stable")[:, :k]  # descending, ties to the lower id
    w = np.take_along_axis(s, ids, axis=1)
    if renormalize:
        # From log scores, so that scores too small for float64 (a sigmoid of -1e30) still
        # divide exactly: e^(l - max l) over the chosen experts.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if score == "softmax":
                m = lg.max(axis=1, keepdims=True)
                ls = lg - (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True)))
            else:
                ls = -np.logaddexp(0.0, -lg)
            lc = np.take_along_axis(ls, ids, axis=1)
            r = np.exp(lc - np.max(lc, axis=1, keepdims=True))
            w = r / r.sum(axis=1, keepdims=True)
    w = w * float(np.float32(scale))

    flat = ids.reshape(-1)
    position = np.full(n * k, -1, dtype=np.int64)
    counts = np.zeros(e, dtype=np.int64)
    offsets = [0]
    perm = []
    for ex in range(e):
        slots = np.nonzero(flat == ex)[0]  # ascending n*k + j: token order, then slot
        kept = slots if capacity is None else slots[:capacity]
        counts[ex] = len(kept)
        start = offsets[-1]
        position[kept] = start + np.arange(len(kept))
        padded = -(-len(kept) // block) * block
        perm.extend(kept.tolist())
        perm.extend([-1] * (padded - len(kept)))
        offsets.append(start + padded)
    kept_bound = n * k if capacity is None else min(n * k, e * capacity)
    # Only experts that receive a slot are padded: at most min(E, kept) of them.
    max_rows = kept_bound + min(e, kept_bound) * (block - 1)
    perm_full = np.array(perm + [-1] * (max_rows - len(perm)), dtype=np.int64)
    return dict(
        expert_ids=ids, weights=w, counts=counts, offsets=np.array(offsets), perm=np.array(perm),
        position=position.reshape(n, k), num_rows=offsets[-1], perm_full=perm_full,
        max_rows=max_rows, scores=s,
    )


def ref_permute(x, perm, k, w=None):
    x = np.asarray(x).astype(np.float64)
    out = np.zeros((len(perm), x.shape[1]))
    for r, p in enumerate(perm):
        if p >= 0:
            out[r] = x[p // k] * (1.0 if w is None else float(w.reshape(-1)[p]))
    return out


def ref_combine(rows, position, w=None):
    rows = np.asarray(rows).astype(np.float64)
    n, k = position.shape
    y = np.zeros((n, rows.shape[1]))
    for t in range(n):
        for j in range(k):
            p = position[t, j]
            if p >= 0:
                y[t] += (1.0 if w is None else float(w[t, j])) * rows[p]
    return y


def ref_slot_dot(tokens, rows, position):
    tokens = np.asarray(tokens).astype(np.float64)
    rows = np.asarray(rows).astype(np.float64)
    n, k = position.shape
    out = np.zeros((n, k))
    for t in range(n):
        for j in range(k):
            if position[t, j] >= 0:
                out[t, j] = tokens[t] @ rows[position[t, j]]
    return out


def rel(out, ref):
    out = np.asarray(out).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert not np.isnan(out).any(), "NaN in the output (unwritten or propagated)"
    den = np.linalg.norm(ref)
    return np.linalg.norm(out - ref) / (den if den > 0 else 1.0)


def seed(*parts) -> int:
    """A seed that differs per test case and is the same in every process."""
    return zlib.crc32(repr(parts).encode())


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---- the reference checks itself -------------------------------------------------------------


def test_reference_self_consistency():
    """The reference's permutation is a bijection kept-slots <-> non-padding rows, and its
    backward formulas are the adjoints of its forward ones (to float64 rounding)."""
    rng = np.random.default_rng(1)
    n, e, k, h = 23, 8, 3, 16
    r = ref_route(rng.standard_normal((n, e)), k, capacity=7, block=4)
    pos, perm = r["position"], r["perm"]
    assert r["num_rows"] == len(perm) and r["num_rows"] % 4 == 0
    for row, p in enumerate(perm):
        if p >= 0:
            assert pos.reshape(-1)[p] == row
    assert (pos >= 0).sum() == r["counts"].sum() == (perm >= 0).sum()
    assert r["counts"].max() <= 7
    w = r["weights"]
    x, g = rng.standard_normal((n, h)), rng.standard_normal((len(perm), h))
    lhs = np.sum(ref_permute(x, perm, k, w) * g)
    assert np.isclose(lhs, np.sum(x * ref_combine(g, pos, w)), rtol=1e-12)
    eo, gy = rng.standard_normal((len(perm), h)), rng.standard_normal((n, h))
    assert np.isclose(np.sum(ref_combine(eo, pos, w) * gy), np.sum(eo * ref_permute(gy, perm, k, w)))
    # d<combine, gy>/dw = slot_dot(gy, eo), checked entry by entry
    sd = ref_slot_dot(gy, eo, pos)
    for t, j in [(0, 0), (5, 2), (22, 1)]:
        w2 = w.copy()
        w2[t, j] += 1.0
        d = np.sum(ref_combine(eo, pos, w2) * gy) - np.sum(ref_combine(eo, pos, w) * gy)
        assert np.isclose(d, sd[t, j], rtol=1e-9, atol=1e-12)


def test_reference_tie_rules():
    lg = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0]])
    r = ref_route(lg, 4)
    assert r["expert_ids"].tolist() == [[1, 2, 4, 0]]
    # groups of 2: group scores (1+3, 3+0, 3+1) = 4, 3, 4 -> keep groups 0 and 2 (tie: lower)
    r = ref_route(lg, 2, n_groups=3, topk_groups=2, score="sigmoid")
    assert r["expert_ids"].tolist() == [[1, 4]]
    r = ref_route(lg, 3, n_groups=3, topk_groups=2)
    assert r["expert_ids"].tolist() == [[1, 4, 0]]


# ---- routing ---------------------------------------------------------------------------------


def check_route(got, ref, what=""):
    assert isinstance(got, dk.MoeRoute)
    n, k = ref["expert_ids"].shape
    e = len(ref["counts"])
    assert (got.n, got.e, got.k) == (n, e, k)
    for name in ("expert_ids", "position", "counts", "offsets", "perm", "perm_full"):
        a = getattr(got, name)
        assert a.dtype == np.int32, (name, a.dtype)
        assert a.shape == ref[name].shape, (what, name, a.shape, ref[name].shape)
        bad = np.nonzero(a != ref[name])
        assert bad[0].size == 0, (
            f"{what}: {name} differs at {[tuple(int(i) for i in t) for t in zip(*bad)][:5]}: "
            f"got {a[bad][:5].tolist()}, expected {ref[name][bad][:5].tolist()}"
        )
    assert got.num_rows == ref["num_rows"] == int(got.offsets[-1])
    assert got.max_rows == ref["max_rows"]
    assert got.weights.dtype == np.float32 and got.weights.shape == (n, k)
    assert rel(got.weights, ref["weights"]) <= 1e-6, what
    np.testing.assert_allclose(got.weights, ref["weights"], rtol=3e-6, atol=1e-7)


# Llama 4 (sigmoid top-1), Qwen3-MoE (softmax top-8 of 128, renormalised), DeepSeek-V3 (sigmoid,
# bias, 8 groups keep 4, top-8, renormalised, x2.5), and variations.
ROUTE_CASES = {
    "llama4_scout": dict(n=37, e=16, k=1, kw=dict(score="sigmoid")),
    "llama4_maverick": dict(n=64, e=128, k=1, kw=dict(score="sigmoid")),
    "qwen3_moe": dict(n=101, e=128, k=8, kw=dict(renormalize=True)),
    "deepseek_v3": dict(n=65, e=256, k=8, kw=dict(score="sigmoid", bias=True, n_groups=8,
                                                  topk_groups=4, renormalize=True, scale=2.5)),
    "softmax_plain": dict(n=19, e=8, k=2, kw={}),
    "softmax_groups_e512": dict(n=33, e=512, k=8, kw=dict(n_groups=16, topk_groups=3,
                                                          renormalize=True)),
    "sigmoid_e512_k32": dict(n=9, e=512, k=32, kw=dict(score="sigmoid", bias=True)),
    "k_equals_e": dict(n=5, e=6, k=6, kw=dict(renormalize=True)),
    "one_expert": dict(n=7, e=1, k=1, kw=dict(renormalize=True, scale=0.5)),
    "capacity": dict(n=200, e=8, k=2, kw=dict(capacity=30)),
    "capacity_block": dict(n=301, e=16, k=4, kw=dict(capacity=50, block=8, renormalize=True)),
    "block_only": dict(n=50, e=16, k=2, kw=dict(block=16, score="sigmoid")),
    "capacity_1": dict(n=41, e=4, k=2, kw=dict(capacity=1, block=3)),
    "capacity_large": dict(n=10, e=4, k=2, kw=dict(capacity=1000)),
    "n1": dict(n=1, e=64, k=4, kw=dict(renormalize=True, block=4)),
    "n1_groups": dict(n=1, e=256, k=8, kw=dict(score="sigmoid", bias=True, n_groups=8,
                                               topk_groups=4, renormalize=True, scale=2.5)),
    "negative_scale": dict(n=13, e=32, k=3, kw=dict(scale=-1.25)),
}


@pytest.mark.parametrize("logit_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("case", sorted(ROUTE_CASES))
def test_route_against_reference(case, logit_dtype):
    c = ROUTE_CASES[case]
    rng = np.random.default_rng(seed(case, logit_dtype))
    n, e, k = c["n"], c["e"], c["k"]
    kw = dict(c["kw"])
    logits = randn(rng, (n, e), DTYPES[logit_dtype], scale=2.0)
    if kw.get("bias") is True:
        kw["bias"] = (rng.standard_normal(e) * 0.5).astype(np.float32)
    before = logits.copy()
    got = dk.moe_route(logits, k, **kw)
    check_route(got, ref_route(logits, k, **kw), case)
    assert np.array_equal(logits.view(np.uint16 if logits.itemsize == 2 else np.uint32),
                          before.view(np.uint16 if before.itemsize == 2 else np.uint32))


def test_route_float16_logits_are_widened():
    rng = np.random.default_rng(3)
    lg = randn(rng, (17, 32), F16)
    got = dk.moe_route(lg, 4, renormalize=True)
    check_route(got, ref_route(lg, 4, renormalize=True))
    check_route(dk.moe_route(lg.astype(np.float32), 4, renormalize=True),
                ref_route(lg, 4, renormalize=True))


def test_route_bias_is_selection_only():
    """A large bias on expert 0 makes it chosen everywhere, but its weight stays its score."""
    rng = np.random.default_rng(4)
    n, e = 31, 16
    lg = randn(rng, (n, e), F32)
    bias = np.zeros(e, dtype=np.float32)
    bias[0] = 10.0
    got = dk.moe_route(lg, 2, score="sigmoid", bias=bias)
    assert (got.expert_ids[:, 0] == 0).all()
    np.testing.assert_allclose(got.weights[:, 0], 1 / (1 + np.exp(-lg[:, 0].astype(np.float64))),
                               rtol=2e-6)
    check_route(got, ref_route(lg, 2, score="sigmoid", bias=bias))


def test_route_ties_go_to_the_lower_expert():
    rng = np.random.default_rng(5)
    n, e = 57, 32
    lg = rng.integers(0, 3, size=(n, e)).astype(np.float32)  # many exact ties
    for kw in (dict(), dict(score="sigmoid"), dict(renormalize=True, block=4),
               dict(score="sigmoid", bias=np.repeat(np.array([0.0, 0.5], np.float32), 16))):
        for k in (1, 4, 8):
            check_route(dk.moe_route(lg, k, **kw), ref_route(lg, k, **kw), f"k={k} {kw}")
    # all logits equal: experts 0..k-1, weights 1/E (softmax)
    got = dk.moe_route(np.zeros((3, e), np.float32), 5)
    assert got.expert_ids.tolist() == [[0, 1, 2, 3, 4]] * 3
    np.testing.assert_allclose(got.weights, 1.0 / e, rtol=1e-6)


def test_route_group_ties_go_to_the_lower_group():
    """Every group holds the same multiset of logits (each group shuffled differently), so all
    group scores tie exactly: the kept groups must be the lowest ones."""
    rng = np.random.default_rng(6)
    n, n_groups, g = 12, 8, 4
    base = rng.standard_normal(g).astype(np.float32)
    lg = np.stack([np.concatenate([rng.permutation(base) for _ in range(n_groups)])
                   for _ in range(n)])
    for score in ("softmax", "sigmoid"):
        got = dk.moe_route(lg, 8, score=score, n_groups=n_groups, topk_groups=3)
        ref = ref_route(lg, 8, score=score, n_groups=n_groups, topk_groups=3)
        check_route(got, ref, score)
        assert (got.expert_ids < 3 * g).all()


def test_route_token_of_all_minus_inf_logits():
    """The documented outcome (docstring, header): softmax 0 / 0 gives NaN scores, experts 0..k-1
    with NaN weights; sigmoid gives 0 (NaN renormalised); the other tokens are untouched."""
    rng = np.random.default_rng(8)
    lg = rng.standard_normal((4, 16)).astype(np.float32)
    masked = lg.copy()
    masked[2] = -np.inf
    for kw, weights in ((dict(), "nan"), (dict(score="sigmoid"), "zero"),
                        (dict(score="sigmoid", renormalize=True), "nan")):
        got = dk.moe_route(masked, 3, **kw)
        assert got.expert_ids[2].tolist() == [0, 1, 2], kw
        w = got.weights[2]
        assert (np.isnan(w).all() if weights == "nan" else (w == 0).all()), (kw, w)
        clean = dk.moe_route(lg[[0, 1, 3]], 3, **kw)
        np.testing.assert_array_equal(got.expert_ids[[0, 1, 3]], clean.expert_ids)
        np.testing.assert_array_equal(got.weights[[0, 1, 3]], clean.weights)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_route_renormalises_scores_that_underflow(dtype):
    """Renormalised weights are exact ratios even where the scores underflow (float32: a sigmoid
    below ~-88, a softmax probability ~87 below the token's best; float64: -745): they sum to 1
    and match the log-domain reference, instead of 0 / 0."""
    rng = np.random.default_rng(31)
    # centres -100, -80, -10 (spread 1: below the kernels' direct-division bound, where the
    # sigmoid factor (1 + e^mc) / (1 + e^x) moves the ratios by ~1e-3) and 0
    centre = np.repeat(np.array([-100.0, -80.0, -10.0, 0.0]), 10)[:, None]
    spread = np.repeat(np.array([3.0, 3.0, 1.0, 3.0]), 10)[:, None]
    lg = (rng.standard_normal((40, 32)) * spread + centre).astype(np.float32)
    lg = lg.astype(dtype)
    got = dk.moe_route(lg, 4, score="sigmoid", renormalize=True)
    check_route(got, ref_route(lg, 4, score="sigmoid", renormalize=True))
    np.testing.assert_allclose(got.weights.sum(axis=1), 1.0, rtol=1e-5)
    # softmax: a bias that picks experts 150 below the token's best logit
    soft = rng.standard_normal((12, 64)).astype(np.float32)
    soft[:, :8] = soft[:, :8] * 4.0 - 150.0
    bias = np.zeros(64, np.float32)
    bias[:8] = 10.0
    soft = soft.astype(dtype)
    got = dk.moe_route(soft, 4, renormalize=True, bias=bias)
    check_route(got, ref_route(soft, 4, renormalize=True, bias=bias))
    assert (got.expert_ids < 8).all() and np.isfinite(got.weights).all()


def test_route_renormalised_sigmoid_beyond_float64():
    """Logits of -1e30: float64 scores are 0 too; the weights still come from the logits (one-hot
    here), while a token whose chosen logits are all -inf keeps NaN weights (0 / 0)."""
    lg = np.array([[-1e30, -2e30, -3e38, -np.inf],
                   [-np.inf, -np.inf, -3e38, -np.inf],
                   [-np.inf] * 4], np.float32)
    got = dk.moe_route(lg, 3, score="sigmoid", renormalize=True)
    assert got.expert_ids.tolist() == [[0, 1, 2], [2, 0, 1], [0, 1, 2]]
    assert got.weights[:2].tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert np.isnan(got.weights[2]).all()


def test_route_groups_use_the_top2_sum():
    """A group with one huge expert loses to a group with two good ones."""
    lg = np.array([[5.0, -9.0, -9.0, -9.0, 2.0, 2.0, -9.0, -9.0]], np.float32)
    # sigmoid: group 0 = s(5) + s(-9) ~ 0.993, group 1 = 2 s(2) ~ 1.76
    got = dk.moe_route(lg, 1, score="sigmoid", n_groups=2, topk_groups=1)
    assert got.expert_ids.tolist() == [[4]]
    check_route(got, ref_route(lg, 1, score="sigmoid", n_groups=2, topk_groups=1))


def test_route_capacity_drops_in_token_order():
    n, e, k, cap = 40, 4, 2, 7
    rng = np.random.default_rng(7)
    lg = randn(rng, (n, e), F32)
    lg[:, 1] += 6.0  # everyone wants expert 1
    got = dk.moe_route(lg, k, capacity=cap, block=2)
    ref = ref_route(lg, k, capacity=cap, block=2)
    check_route(got, ref)
    assert got.counts[1] == cap
    kept_tokens = np.nonzero((got.expert_ids == 1) & (got.position >= 0))[0]
    all_tokens = np.nonzero((got.expert_ids == 1).any(axis=1))[0]
    assert kept_tokens.tolist() == all_tokens[:cap].tolist()
    assert (got.position[got.expert_ids == 1][cap:] == -1).all()


def test_route_strided_and_non_contiguous_logits():
    rng = np.random.default_rng(8)
    big = randn(rng, (30, 80), F32)
    views = [big[:, :64], big[::2, 3:67], np.asfortranarray(big[:, 5:69]), big[:, :64][::-1]]
    for v in views:
        got = dk.moe_route(v, 4, score="sigmoid", renormalize=True, n_groups=4, topk_groups=2)
        check_route(got, ref_route(v, 4, score="sigmoid", renormalize=True, n_groups=4,
                                   topk_groups=2))
        dense = dk.moe_route(np.ascontiguousarray(v), 4, score="sigmoid", renormalize=True,
                             n_groups=4, topk_groups=2)
        assert np.array_equal(got.weights, dense.weights)


def test_route_byte_swapped_logits():
    rng = np.random.default_rng(9)
    for dt in (F32, np.float16):
        lg = randn(rng, (13, 16), dt)
        want = dk.moe_route(lg, 2, renormalize=True)
        got = dk.moe_route(lg.astype(lg.dtype.newbyteorder(">")), 2, renormalize=True)
        for f in ("expert_ids", "weights", "counts", "offsets", "perm", "position"):
            assert np.array_equal(getattr(got, f), getattr(want, f)), f


def test_route_is_deterministic():
    rng = np.random.default_rng(9)
    lg = randn(rng, (257, 128), BF16, 2.0)
    a = dk.moe_route(lg, 8, renormalize=True, capacity=20, block=8)
    b = dk.moe_route(lg, 8, renormalize=True, capacity=20, block=8)
    for name in ("expert_ids", "weights", "counts", "offsets", "perm_full", "position"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


def test_max_rows_bound():
    l = _lib.moe_lib()
    for n, e, k, block, cap in [(10, 4, 2, 1, 0), (10, 4, 2, 8, 0), (100, 8, 2, 4, 5),
                                (3, 16, 4, 1, 100), (1, 1, 1, 1, 0), (1, 256, 8, 128, 0),
                                (3, 256, 8, 128, 1), (2, 16, 2, 8, 0)]:
        kept = n * k if cap == 0 else min(n * k, e * cap)
        bound = kept + min(e, kept) * (block - 1)
        assert l.dk_moe_max_rows(n, e, k, block, cap) == bound
    assert l.dk_moe_max_rows(0, 4, 1, 1, 0) == -1 or l.dk_moe_max_rows(0, 4, 1, 1, 0) == 0
    assert l.dk_moe_max_rows(10, 4, 2, 0, 0) == -1
    assert l.dk_moe_max_rows(10, 0, 1, 1, 0) == -1


def test_route_params_default_matches_header():
    p = _lib.moe_lib().dk_moe_route_params_default()
    assert (p.k, p.score, p.renormalize, p.n_groups, p.topk_groups, p.scale, p.capacity,
            p.block) == (1, 0, 0, 1, 1, 1.0, 0, 1)


# ---- permute / combine / backward ------------------------------------------------------------

# (n, e, k, h, route kwargs)
DISPATCH_CASES = {
    "llama4": (37, 16, 1, 64, dict(score="sigmoid")),
    "qwen3": (101, 128, 8, 32, dict(renormalize=True)),
    "deepseek_v3": (29, 256, 8, 16, dict(score="sigmoid", bias=True, n_groups=8, topk_groups=4,
                                         renormalize=True, scale=2.5)),
    "capacity_block": (75, 8, 2, 24, dict(capacity=12, block=4)),
    "n1": (1, 8, 3, 8, dict(block=4)),
}


def make_route(rng, n, e, k, kw):
    kw = dict(kw)
    if kw.get("bias") is True:
        kw["bias"] = (rng.standard_normal(e) * 0.5).astype(np.float32)
    lg = randn(rng, (n, e), F32, 2.0)
    route = dk.moe_route(lg, k, **kw)
    check_route(route, ref_route(lg, k, **kw))
    return route


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(DISPATCH_CASES))
def test_permute_combine_and_backward(case, dtype):
    n, e, k, h, kw = DISPATCH_CASES[case]
    dt = DTYPES[dtype]
    rng = np.random.default_rng(seed(case, dtype))
    route = make_route(rng, n, e, k, kw)
    R, w, pos, perm = route.num_rows, route.weights, route.position, route.perm
    x = randn(rng, (n, h), dt)
    eo = randn(rng, (R, h), dt)
    gy = randn(rng, (n, h), dt)
    gxp = randn(rng, (R, h), dt)
    snapshot = [a.copy() for a in (x, eo, gy, gxp, w, pos, perm)]

    xp = dk.moe_permute(x, route)
    assert xp.dtype == dt and xp.shape == (R, h)
    assert np.array_equal(xp.astype(np.float64), ref_permute(x, perm, k)), "unscaled permute is a copy"
    xps = dk.moe_permute(x, route, scale=True)
    assert xps.dtype == dt and rel(xps, ref_permute(x, perm, k, w)) <= TOL[dtype]
    assert (xps[perm < 0] == 0).all()

    for weighted in (True, False):
        y = dk.moe_combine(eo, route, weighted=weighted)
        assert y.dtype == dt and y.shape == (n, h)
        assert rel(y, ref_combine(eo, pos, w if weighted else None)) <= TOL[dtype], weighted

        g_eo, g_w = dk.moe_combine_backward(gy, eo, route, weighted=weighted)
        assert g_eo.dtype == dt and g_eo.shape == (R, h)
        assert rel(g_eo, ref_permute(gy, perm, k, w if weighted else None)) <= TOL[dtype]
        if weighted:
            assert g_w.dtype == np.float32 and g_w.shape == (n, k)
            assert rel(g_w, ref_slot_dot(gy, eo, pos)) <= 1e-5
            assert (g_w[pos < 0] == 0).all()
        else:
            assert g_w is None

    g_x = dk.moe_permute_backward(gxp, route)
    assert g_x.dtype == dt and g_x.shape == (n, h)
    assert rel(g_x, ref_combine(gxp, pos)) <= TOL[dtype]
    g_x, g_w = dk.moe_permute_backward(gxp, route, x=x, scale=True)
    assert rel(g_x, ref_combine(gxp, pos, w)) <= TOL[dtype]
    assert g_w.dtype == np.float32 and rel(g_w, ref_slot_dot(x, gxp, pos)) <= 1e-5

    for a, b in zip((x, eo, gy, gxp, w, pos, perm), snapshot):
        assert a.tobytes() == b.tobytes(), "an input was modified"


def test_combine_sums_in_float32_not_in_the_half_dtype():
    """Eight bf16 rows that cancel except for a small remainder: accumulating in bf16 would lose
    it, f32 accumulation keeps it."""
    n, e, k, h = 4, 8, 8, 8
    lg = np.zeros((n, e), np.float32)
    route = dk.moe_route(lg, k)  # every token on every expert, weights 1/8
    eo = np.zeros((route.num_rows, h), BF16)
    vals = np.array([256, -256, 1, 256, -256, 1, 1, 1], np.float32)  # sum 4
    for t in range(n):
        for j in range(k):
            eo[route.position[t, j]] = vals[j]
    y = dk.moe_combine(eo, route, weighted=False)
    assert (y.astype(np.float32) == 4.0).all()


def test_permute_rows_and_padding():
    rng = np.random.default_rng(11)
    n, e, k, h = 21, 8, 2, 16
    route = dk.moe_route(randn(rng, (n, e), F32), k, block=8, capacity=4)
    x = randn(rng, (n, h), F32)
    xp = dk.moe_permute(x, route)
    for r, p in enumerate(route.perm):
        if p < 0:
            assert (xp[r] == 0).all()
        else:
            assert np.array_equal(xp[r], x[p // k])
    # position and perm are inverse
    for t in range(n):
        for j in range(k):
            if route.position[t, j] >= 0:
                assert route.perm[route.position[t, j]] == t * k + j


def test_combine_accepts_a_max_rows_buffer():
    """A buffer of up to max_rows rows (e.g. sized before R was known) gives the same result."""
    rng = np.random.default_rng(12)
    n, e, k, h = 30, 8, 2, 16
    route = dk.moe_route(randn(rng, (n, e), F32), k, capacity=6, block=4)
    assert route.max_rows > route.num_rows
    eo = randn(rng, (route.max_rows, h), F32)
    y_full = dk.moe_combine(eo, route)
    y = dk.moe_combine(eo[: route.num_rows], route)
    assert np.array_equal(y, y_full)
    g_full, gw_full = dk.moe_combine_backward(randn(rng, (n, h), F32), eo, route)
    assert g_full.shape == (route.max_rows, h)
    assert (g_full[route.num_rows:] == 0).all()


def test_strided_activations():
    rng = np.random.default_rng(13)
    n, e, k, h = 33, 16, 4, 24
    route = dk.moe_route(randn(rng, (n, e), F32), k, renormalize=True)
    for dt in DTYPES.values():
        big = randn(rng, (n, h + 16), dt)
        x = big[:, 8 : 8 + h]
        assert np.array_equal(dk.moe_permute(x, route, scale=True),
                              dk.moe_permute(np.ascontiguousarray(x), route, scale=True))
        bige = randn(rng, (route.num_rows, 2 * h), dt)
        eo = bige[:, ::2]  # elements not contiguous: copied
        eo2 = bige[:, h:]  # strided rows: read in place
        for a in (eo, eo2):
            assert np.array_equal(dk.moe_combine(a, route), dk.moe_combine(np.ascontiguousarray(a), route))
        gy = big[::-1, :h]
        ga, wa = dk.moe_combine_backward(gy, eo2, route)
        gb, wb = dk.moe_combine_backward(np.ascontiguousarray(gy), np.ascontiguousarray(eo2), route)
        assert np.array_equal(ga, gb) and np.array_equal(wa, wb)


def test_weights_override():
    rng = np.random.default_rng(14)
    n, e, k, h = 17, 8, 2, 8
    route = dk.moe_route(randn(rng, (n, e), F32), k)
    w2 = rng.standard_normal((n, k)).astype(np.float32)
    eo = randn(rng, (route.num_rows, h), F32)
    y1 = dk.moe_combine(eo, route, weights=w2)
    y2 = dk.moe_combine(eo, dataclasses.replace(route, weights=w2))
    assert np.array_equal(y1, y2)
    assert rel(y1, ref_combine(eo, route.position, w2)) <= 1e-6
    # float64 weights are converted to float32
    y3 = dk.moe_combine(eo, route, weights=w2.astype(np.float64))
    assert np.array_equal(y1, y3)


# ---- gradient identities against finite differences -----------------------------------------


def _dot(a, b):
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


@pytest.mark.parametrize("case", ["qwen3", "capacity_block", "llama4"])
def test_combine_gradients_finite_differences(case):
    n, e, k, h, kw = DISPATCH_CASES[case]
    rng = np.random.default_rng(21)
    route = make_route(rng, n, e, k, kw)
    R = route.num_rows
    eo = randn(rng, (R, h), F32)
    g = randn(rng, (n, h), F32)
    g_eo, g_w = dk.moe_combine_backward(g, eo, route)

    def loss(eo_, w_):
        return _dot(dk.moe_combine(eo_, route, weights=w_), g)

    w = route.weights
    eps = 0.25  # the loss is linear in each argument: central differences are exact up to rounding
    d = randn(rng, (R, h), F32)
    fd = (loss(eo + eps * d, w) - loss(eo - eps * d, w)) / (2 * eps)
    assert np.isclose(fd, _dot(g_eo, d), rtol=1e-4, atol=1e-4 * np.sqrt(d.size))
    dw = rng.standard_normal((n, k)).astype(np.float32)
    fd = (loss(eo, w + eps * dw) - loss(eo, w - eps * dw)) / (2 * eps)
    assert np.isclose(fd, _dot(g_w, dw), rtol=1e-4, atol=1e-4 * np.sqrt(dw.size))
    # entry by entry for a few weights, the dropped ones included (derivative 0)
    for t, j in [(0, 0), (n - 1, k - 1), (n // 2, 0)] + [tuple(i) for i in np.argwhere(route.position < 0)[:3]]:
        w2 = w.copy()
        w2[t, j] += 1.0
        assert np.isclose(loss(eo, w2) - loss(eo, w), g_w[t, j], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("case", ["llama4", "deepseek_v3", "capacity_block"])
def test_permute_gradients_finite_differences(case):
    n, e, k, h, kw = DISPATCH_CASES[case]
    rng = np.random.default_rng(22)
    route = make_route(rng, n, e, k, kw)
    R = route.num_rows
    x = randn(rng, (n, h), F32)
    g = randn(rng, (R, h), F32)
    w = route.weights
    for scale in (False, True):

        def loss(x_, w_):
            return _dot(dk.moe_permute(x_, route, scale=scale, weights=w_ if scale else None), g)

        if scale:
            g_x, g_w = dk.moe_permute_backward(g, route, x=x, scale=True)
        else:
            g_x, g_w = dk.moe_permute_backward(g, route), None
        eps = 0.25
        d = randn(rng, (n, h), F32)
        fd = (loss(x + eps * d, w) - loss(x - eps * d, w)) / (2 * eps)
        assert np.isclose(fd, _dot(g_x, d), rtol=1e-4, atol=1e-4 * np.sqrt(d.size)), scale
        if scale:
            dw = rng.standard_normal((n, k)).astype(np.float32)
            fd = (loss(x, w + eps * dw) - loss(x, w - eps * dw)) / (2 * eps)
            assert np.isclose(fd, _dot(g_w, dw), rtol=1e-4, atol=1e-4 * np.sqrt(dw.size))


def test_adjoint_identities_half_dtypes():
    """<permute(x), g> = <x, permute_backward(g)> and <combine(eo), g> = <eo, combine_backward(g)>
    within the half-precision rounding of the outputs."""
    rng = np.random.default_rng(23)
    n, e, k, h = 64, 32, 4, 32
    route = dk.moe_route(randn(rng, (n, e), F32), k, renormalize=True, capacity=12, block=4)
    for dt in (F16, BF16):
        x = randn(rng, (n, h), dt)
        g = randn(rng, (route.num_rows, h), dt)
        lhs = _dot(dk.moe_permute(x, route, scale=True), g)
        rhs = _dot(x, dk.moe_permute_backward(g, route, x=x, scale=True)[0])
        assert np.isclose(lhs, rhs, rtol=2e-2, atol=0.05 * np.sqrt(n * h)), dt
        eo = randn(rng, (route.num_rows, h), dt)
        gy = randn(rng, (n, h), dt)
        lhs = _dot(dk.moe_combine(eo, route), gy)
        rhs = _dot(eo, dk.moe_combine_backward(gy, eo, route)[0])
        assert np.isclose(lhs, rhs, rtol=2e-2, atol=0.05 * np.sqrt(n * h)), dt


# ---- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_dispatch_is_bitwise_deterministic(dtype):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(31)
    n, e, k, h = 129, 64, 8, 64
    route = dk.moe_route(randn(rng, (n, e), F32), k, renormalize=True, block=4)
    x = randn(rng, (n, h), dt)
    eo = randn(rng, (route.num_rows, h), dt)
    gy = randn(rng, (n, h), dt)
    runs = []
    for _ in range(2):
        out = [dk.moe_permute(x, route, scale=True), dk.moe_combine(eo, route)]
        out += list(dk.moe_combine_backward(gy, eo, route))
        out += list(dk.moe_permute_backward(eo, route, x=x, scale=True))
        runs.append([o.tobytes() for o in out])
    assert runs[0] == runs[1]


# ---- the backward calls are the primitives, bit for bit ---------------------------------------

# Routes with dropped slots (capacity) and padding rows (block > 1), k = 1 and k = 8:
# (n, e, k, h, route kwargs).
BACKWARD_CASES = {
    "k1_drops_padding": (40, 8, 1, 16, dict(score="sigmoid", capacity=3, block=2)),
    "k8_drops_padding": (33, 16, 8, 24, dict(renormalize=True, capacity=10, block=4)),
}


def primitive_slot_dot(tokens, rows, route):
    """dk_moe_slot_dot itself (the numpy face has no public slot-dot): out[n, j] =
    <tokens[n], rows[position[n, j]]>, float32 [N, k]."""
    tokens, rows = np.ascontiguousarray(tokens), np.ascontiguousarray(rows)
    out = np.full((route.n, route.k), np.nan, np.float32)
    args = _lib.MoeSlotDotArgs(
        n=route.n, h=tokens.shape[1], k=route.k, rows=rows.shape[0],
        dtype=dk_moe_module._dtype_code("tokens", tokens.dtype), tokens=tokens.ctypes.data,
        tokens_stride=tokens.shape[1], rows_in=rows.ctypes.data, rows_stride=rows.shape[1],
        position=route.position.ctypes.data, out=out.ctypes.data,
    )
    _lib.moe_slot_dot_call(_lib.context(-1), args, None)
    return out


def same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), f"{what}: not the primitives' bits"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(BACKWARD_CASES))
def test_backward_calls_are_the_primitives_bitwise(case, dtype):
    """moe_permute_backward and moe_combine_backward (one library call each) give exactly what
    moe_combine / moe_permute and dk_moe_slot_dot give on the same operands: scaled / weighted
    or not, with strided rows, over dropped slots (gradient 0) and padding rows (zero rows), on
    R rows and on a buffer of max_rows rows."""
    n, e, k, h, kw = BACKWARD_CASES[case]
    dt = DTYPES[dtype]
    rng = np.random.default_rng(seed("backward", case, dtype))
    route = make_route(rng, n, e, k, kw)
    pos = route.position
    assert (pos < 0).any() and (route.perm < 0).any(), "the case must drop slots and pad rows"
    # Every operand a strided view (rows 16-byte aligned: read in place, strides passed on).
    x = randn(rng, (n, h + 8), dt)[:, :h]
    gy = randn(rng, (n, h + 8), dt)[:, 8:]
    # Routes on R rows and on the max_rows bound (rows past R are padding, perm -1).
    for rows in (route.num_rows, route.max_rows):
        r = dataclasses.replace(route, num_rows=rows, perm=route.perm_full[:rows])
        g = randn(rng, (rows, h + 8), dt)[:, :h]  # grad_xp, and expert_out
        w = randn(rng, (n, k), F32)
        what = f"{case}, {dtype}, {rows} rows"

        same_bits(dk.moe_permute_backward(g, r), dk.moe_combine(g, r, weighted=False), what)
        g_x, g_w = dk.moe_permute_backward(g, r, x=x, scale=True, weights=w)
        same_bits(g_x, dk.moe_combine(g, r, weights=w), what)
        same_bits(g_w, primitive_slot_dot(x, g, r), what)
        assert (g_w[pos < 0] == 0).all()

        g_eo, g_w = dk.moe_combine_backward(gy, g, r, weights=w)
        same_bits(g_eo, dk.moe_permute(gy, r, scale=True, weights=w), what)
        assert (g_eo[r.perm < 0] == 0).all()
        same_bits(g_w, primitive_slot_dot(gy, g, r), what)
        assert (g_w[pos < 0] == 0).all()
        for eo in (g, None):  # unweighted: expert_out is not needed
            g_eo, g_w = dk.moe_combine_backward(gy, eo, r, weighted=False)
            assert g_w is None
            same_bits(g_eo, dk.moe_permute(gy, r), what)


# ---- bad input -------------------------------------------------------------------------------


def _route_bad_cases():
    lg = np.random.default_rng(41).standard_normal((6, 16)).astype(np.float32)
    return lg, [
        ("float64 logits", lambda: dk.moe_route(lg.astype(np.float64), 2), TypeError),
        ("int logits", lambda: dk.moe_route(lg.astype(np.int32), 2), TypeError),
        ("1-D logits", lambda: dk.moe_route(lg[0], 2), ValueError),
        ("3-D logits", lambda: dk.moe_route(lg[None], 2), ValueError),
        ("no experts", lambda: dk.moe_route(lg[:, :0], 1), ValueError),
        ("too many experts", lambda: dk.moe_route(np.zeros((2, 1025), np.float32), 2), ValueError),
        ("k = 0", lambda: dk.moe_route(lg, 0), ValueError),
        ("k > E", lambda: dk.moe_route(lg, 17), ValueError),
        ("k > 32", lambda: dk.moe_route(np.zeros((2, 64), np.float32), 33), ValueError),
        ("k float", lambda: dk.moe_route(lg, 2.0), TypeError),
        ("k bool", lambda: dk.moe_route(lg, True), TypeError),
        ("bad score", lambda: dk.moe_route(lg, 2, score="relu"), ValueError),
        ("renormalize int", lambda: dk.moe_route(lg, 2, renormalize=1), TypeError),
        ("n_groups not dividing", lambda: dk.moe_route(lg, 2, n_groups=3), ValueError),
        ("n_groups 0", lambda: dk.moe_route(lg, 2, n_groups=0), ValueError),
        ("groups of one", lambda: dk.moe_route(lg, 2, n_groups=16, topk_groups=4), ValueError),
        ("topk_groups > n_groups", lambda: dk.moe_route(lg, 2, n_groups=4, topk_groups=5), ValueError),
        ("topk_groups 0", lambda: dk.moe_route(lg, 2, n_groups=4, topk_groups=0), ValueError),
        ("k > kept experts", lambda: dk.moe_route(lg, 5, n_groups=4, topk_groups=1), ValueError),
        ("capacity 0", lambda: dk.moe_route(lg, 2, capacity=0), ValueError),
        ("capacity negative", lambda: dk.moe_route(lg, 2, capacity=-3), ValueError),
        ("capacity float", lambda: dk.moe_route(lg, 2, capacity=3.0), TypeError),
        ("block 0", lambda: dk.moe_route(lg, 2, block=0), ValueError),
        ("scale nan", lambda: dk.moe_route(lg, 2, scale=float("nan")), ValueError),
        ("scale inf", lambda: dk.moe_route(lg, 2, scale=float("inf")), ValueError),
        ("scale overflows f32", lambda: dk.moe_route(lg, 2, scale=1e39), ValueError),
        ("scale string", lambda: dk.moe_route(lg, 2, scale="2"), TypeError),
        ("bias shape", lambda: dk.moe_route(lg, 2, bias=np.zeros(15, np.float32)), ValueError),
        ("bias 2-D", lambda: dk.moe_route(lg, 2, bias=np.zeros((1, 16), np.float32)), ValueError),
        ("bias ints", lambda: dk.moe_route(lg, 2, bias=np.zeros(16, np.int64)), TypeError),
        ("not an array", lambda: dk.moe_route("logits", 2), TypeError),
    ]


@pytest.mark.parametrize("idx", range(len(_route_bad_cases()[1])),
                         ids=[c[0] for c in _route_bad_cases()[1]])
def test_route_bad_input(idx):
    lg, cases = _route_bad_cases()
    before = lg.copy()
    name, fn, exc = cases[idx]
    with pytest.raises(exc):
        fn()
    assert np.array_equal(lg, before)


def test_capacity_message_points_to_none():
    lg = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"capacity must be >= 1 \(None for no capacity limit\)"):
        dk.moe_route(lg, 2, capacity=0)


def test_dispatch_bad_input():
    rng = np.random.default_rng(42)
    n, e, k, h = 10, 8, 2, 16
    route = dk.moe_route(randn(rng, (n, e), F32), k, capacity=3, block=4)
    R = route.num_rows
    x = randn(rng, (n, h), F32)
    eo = randn(rng, (R, h), F32)
    snap = [a.copy() for a in (x, eo, route.weights, route.position, route.perm_full)]
    bad = [
        (lambda: dk.moe_permute(x[:, :12], route), ValueError),  # H not a multiple of 8
        (lambda: dk.moe_permute(x[:-1], route), ValueError),  # rows != N
        (lambda: dk.moe_permute(np.ones((n, 16392), np.float32), route), ValueError),  # H > 16384
        (lambda: dk.moe_permute(x.astype(np.float64), route), TypeError),
        (lambda: dk.moe_permute(x.astype(np.int32), route), TypeError),
        (lambda: dk.moe_permute(x[None], route), ValueError),
        (lambda: dk.moe_permute(x, "route"), TypeError),
        (lambda: dk.moe_permute(np.ma.masked_array(x), route), TypeError),  # mask unseen
        (lambda: dk.moe_permute(x, route, scale="yes"), TypeError),
        (lambda: dk.moe_permute(x, route, scale=True, weights=np.ones((n, k + 1))), ValueError),
        (lambda: dk.moe_permute(x, route, scale=True, weights=np.ones((n, k), np.int32)), TypeError),
        # weights= with the flag that reads them off: it would be ignored
        (lambda: dk.moe_permute(x, route, weights=route.weights), ValueError),
        (lambda: dk.moe_combine(eo, route, weighted=False, weights=route.weights), ValueError),
        (lambda: dk.moe_permute_backward(eo, route, weights=route.weights), ValueError),
        (lambda: dk.moe_combine_backward(x, eo, route, weighted=False, weights=route.weights),
         ValueError),
        (lambda: dk.moe_combine(eo[:-1], route), ValueError),  # fewer than R rows
        (lambda: dk.moe_combine(np.zeros((route.max_rows + 1, h), np.float32), route), ValueError),
        (lambda: dk.moe_combine(eo[:, :4], route), ValueError),
        (lambda: dk.moe_combine(eo, route, weighted=None), TypeError),
        (lambda: dk.moe_permute_backward(eo, route, scale=True), ValueError),  # needs x
        (lambda: dk.moe_permute_backward(eo, route, x=x.astype(np.float16), scale=True), TypeError),
        (lambda: dk.moe_permute_backward(eo, route, x=x[:, :8], scale=True), ValueError),
        (lambda: dk.moe_combine_backward(x, None, route), ValueError),  # weighted needs expert_out
        (lambda: dk.moe_combine_backward(x[:, :8], eo, route), ValueError),
        (lambda: dk.moe_combine_backward(x.astype(np.float16), eo, route), TypeError),
        (lambda: dk.moe_combine_backward(x[1:], eo, route), ValueError),
    ]
    for i, (fn, exc) in enumerate(bad):
        with pytest.raises(exc):
            fn()
    for a, b in zip((x, eo, route.weights, route.position, route.perm_full), snap):
        assert a.tobytes() == b.tobytes(), "an input was modified"
    # an inconsistent route is refused before the library reads out of bounds
    broken = route.position.copy()
    broken[0, 0] = R + 5
    with pytest.raises(ValueError):
        dk.moe_combine(eo, dataclasses.replace(route, position=broken))
    broken = route.perm_full.copy()
    broken[0] = n * k
    with pytest.raises(ValueError):
        dk.moe_permute(x, dataclasses.replace(route, perm_full=broken, perm=broken[:R]))
    # perm replaced alone would be ignored (the kernels read perm_full): refused instead
    with pytest.raises(ValueError, match="perm_full"):
        dk.moe_permute(x, dataclasses.replace(route, perm=route.perm[::-1].copy()))
    # unweighted combine backward needs no expert_out
    g, gw = dk.moe_combine_backward(x, None, route, weighted=False)
    assert gw is None and g.shape == (R, h)


def test_c_abi_rejects_bad_calls_and_writes_nothing():
    """Bypassing the Python checks: the library itself refuses and leaves the outputs alone."""
    l = _lib.moe_lib()
    ctx = _lib.context(-1)
    rng = np.random.default_rng(43)
    n, e, k, h = 6, 8, 2, 16
    route = dk.moe_route(randn(rng, (n, e), F32), k)
    x = randn(rng, (n, h), F32)
    out = np.full((route.num_rows, h), 7.0, np.float32)
    for hh, kk in [(12, k), (h, 0)]:  # H not a multiple of 8; k = 0
        args = _lib.MoePermuteArgs(n=n, h=hh, k=kk, rows=route.num_rows, dtype=_lib.DTYPE_F32,
                                   x=x.ctypes.data, x_stride=h, perm=route.perm.ctypes.data,
                                   weights=None, out=out.ctypes.data, out_stride=h)
        assert l.dk_moe_permute(ctx, ctypes.byref(args), None, 0, None) != 0
        assert _lib.last_error()
    args = _lib.MoePermuteArgs(n=n, h=h, k=k, rows=route.num_rows, dtype=_lib.DTYPE_F32,
                               x=None, x_stride=h, perm=route.perm.ctypes.data, weights=None,
                               out=out.ctypes.data, out_stride=h)
    assert l.dk_moe_permute(ctx, ctypes.byref(args), None, 0, None) == 1  # DK_ERR_NULL_POINTER
    assert (out == 7.0).all()
    y = np.full((n, h), 7.0, np.float32)
    args = _lib.MoeCombineArgs(n=n, h=h, k=k, rows=route.num_rows, dtype=9, rows_in=out.ctypes.data,
                               rows_stride=h, position=route.position.ctypes.data, weights=None,
                               y=y.ctypes.data, y_stride=h)
    assert l.dk_moe_combine(ctx, ctypes.byref(args), None) != 0
    assert (y == 7.0).all()
    # route: perm buffer below the bound
    lg = randn(rng, (n, e), F32)
    bufs = [np.full(s, -7, np.int32) for s in ((n, k), (e,), (e + 1,), (n * k - 1,), (n, k))]
    wts = np.full((n, k), np.nan, np.float32)
    args = _lib.MoeRouteArgs(n=n, e=e, logits=lg.ctypes.data, logits_dtype=_lib.DTYPE_F32,
                             logits_stride=e, bias=None, expert_ids=bufs[0].ctypes.data,
                             weights=wts.ctypes.data, counts=bufs[1].ctypes.data,
                             offsets=bufs[2].ctypes.data, perm=bufs[3].ctypes.data,
                             perm_rows=n * k - 1, position=bufs[4].ctypes.data)
    params = _lib.make_moe_route_params(e, k, "softmax", False, 1, 1, 1.0, None, 1)
    assert l.dk_moe_route(ctx, ctypes.byref(args), ctypes.byref(params), None, 0, None) != 0
    assert all((b == -7).all() for b in bufs) and np.isnan(wts).all()
    # route: f16 logits are not accepted by the C ABI (the Python face widens them)
    args.perm_rows = n * k
    big_perm = np.full(n * k, -7, np.int32)
    args.perm = big_perm.ctypes.data
    args.logits_dtype = _lib.DTYPE_F16
    assert l.dk_moe_route(ctx, ctypes.byref(args), ctypes.byref(params), None, 0, None) != 0
    assert (big_perm == -7).all()


def test_no_tokens_is_an_empty_batch():
    # N = 0 (a rank or micro-batch with no tokens): zero counts and offsets, a perm of padding,
    # and every function returns its empty result.
    lg = np.zeros((0, 6), np.float32)
    r = dk.moe_route(lg, 2, block=4)
    assert r.num_rows == 0 and not r.counts.any() and not r.offsets.any()
    assert (r.perm_full == -1).all() and r.perm.shape == (0,) and r.position.shape == (0, 2)
    x = np.zeros((0, 8), np.float32)
    xp = dk.moe_permute(x, r)
    assert xp.shape == (0, 8) and dk.moe_combine(xp, r).shape == (0, 8)
    assert dk.moe_permute_backward(xp, r).shape == (0, 8)
    ge, gw = dk.moe_combine_backward(np.zeros((0, 8), np.float32), xp, r)
    assert ge.shape == (0, 8) and gw.shape == (0, 2)
    with pytest.raises(ValueError, match="no experts"):
        dk.moe_route(np.zeros((3, 0), np.float32), 1)
    # A byte-swapped input gives native-order results, as with tokens (whose rows are copied).
    xs = np.zeros((0, 8), ">f4")
    assert dk.moe_permute(xs, r).dtype == np.float32
    g, gw = dk.moe_permute_backward(xp, r, x=xs, scale=True)
    assert g.dtype == np.float32 and gw.shape == (0, 2)


def test_argument_errors_name_the_argument():
    rng = np.random.default_rng(43)
    n, e, k = 6, 8, 2
    route = dk.moe_route(randn(rng, (n, e), F32), k)
    R, wide = route.num_rows, 16392  # H beyond 16384
    with pytest.raises(ValueError, match=r"grad_y: the hidden size H = 16392 .* 8\.\.=16384"):
        dk.moe_combine_backward(np.zeros((n, wide), F32), np.zeros((R, wide), F32), route)
    with pytest.raises(ValueError, match="expert_out: the hidden size H = 16392"):
        dk.moe_combine(np.zeros((R, wide), F32), route)
    with pytest.raises(ValueError, match="grad_xp: the hidden size H = 16392"):
        dk.moe_permute_backward(np.zeros((R, wide), F32), route)
    # x is read only with scale=True: given without it, it would be ignored.
    with pytest.raises(ValueError, match="x= is only used with scale=True"):
        dk.moe_permute_backward(np.zeros((R, 8), F32), route, x=np.zeros((n, 8), F32))
    with pytest.raises(ValueError, match="non-negative"):
        dk.moe_combine(np.zeros((R, 8), F32), dataclasses.replace(route, num_rows=-1))

