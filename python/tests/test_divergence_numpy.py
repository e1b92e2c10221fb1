"""distill_kernels.divergence (numpy, CPU backend) against an independent float64 reference.

The reference below is written from the math in DESIGN.md ("Token-level divergence") with plain
numpy; it never calls the library. Its gradient is itself checked against finite differences.
Every library call runs with the gradient buffer poisoned (NaN) so unwritten elements show up.
"""

from __future__ import annotations

import importlib
import math

import ml_dtypes
import numpy as np
import pytest

import distill_kernels as dk

# The module (the package attribute `divergence` is the function).
dk_divergence_module = importlib.import_module("distill_kernels.divergence")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
DTYPES = {"f32": F32, "f16": F16, "bf16": BF16}
KIND_BETAS = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.3),
    ("jsd", 0.5),
    ("jsd", 1.0),
]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(dk_divergence_module, "_POISON", True)


# ---- independent float64 reference ------------------------------------------------------------


def _log_softmax(x):
    """Row-wise log-softmax in float64; -inf entries stay -inf; all -inf rows give all -inf."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(x, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        # (x - m) - log(sum), not x - (m + log(sum)): at m = finfo.min (a whole row masked with
        # it) m + log(sum) rounds back to m.
        return (x - m) - np.log(np.sum(np.exp(x - m), axis=1, keepdims=True))


def _xlogy_diff(x, d):
    """x * d with 0 * anything = 0 (masked entries)."""
    with np.errstate(invalid="ignore"):
        return np.where(x == 0.0, 0.0, x * d)


def ref_rows(s, t, kind, beta, temperature):
    """Per-row loss [N] and d(row loss)/d(student logits) [N, V], float64."""
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    a, b = s / temperature, t / temperature
    logq, logp = _log_softmax(a), _log_softmax(b)
    q, p = np.exp(logq), np.exp(logp)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if kind == "forward_kl":
            loss = np.sum(_xlogy_diff(p, logp - logq), axis=1)
            dl_dq_times_q = -p  # dL/dq_k * q_k
        elif kind == "reverse_kl":
            loss = np.sum(_xlogy_diff(q, logq - logp), axis=1)
            dl_dq_times_q = _xlogy_diff(q, logq - logp + 1.0)
        elif kind == "jsd":
            logm = np.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
            kl_pm = np.sum(_xlogy_diff(p, logp - logm), axis=1)
            kl_qm = np.sum(_xlogy_diff(q, logq - logm), axis=1)
            loss = beta * kl_pm + (1 - beta) * kl_qm
            # dL/dq_k = (1 - beta) (log q_k - log m_k)
            dl_dq_times_q = (1 - beta) * _xlogy_diff(q, logq - logm)
        else:
            raise AssertionError(kind)
        # softmax chain rule: dL/da_j = q_j g_j - q_j sum_k q_k g_k, with q_j g_j given above.
        g = dl_dq_times_q - q * np.sum(dl_dq_times_q, axis=1, keepdims=True)
        g = g / temperature
    # Rows with NaN / +inf: NaN; rows all -inf on either side: 0.
    bad = ~np.all((np.isfinite(a) | np.isneginf(a)) & (np.isfinite(b) | np.isneginf(b)), axis=1)
    empty = np.all(np.isneginf(a), axis=1) | np.all(np.isneginf(b), axis=1)
    loss = np.where(empty, 0.0, loss)
    g = np.where(empty[:, None], 0.0, g)
    loss = np.where(bad, np.nan, loss)
    g = np.where(bad[:, None], np.nan, g)
    return loss, g


def reference(s, t, kind="jsd", beta=0.5, temperature=1.0, labels=None, ignore_index=-100,
              reduction="batchmean", num_items=None):
    """(loss, per_token [N], grad [N, V]) in float64, from the math."""
    s64 = np.asarray(s, dtype=np.float64)
    t64 = np.asarray(t, dtype=np.float64)
    if s64.ndim == 1:
        s64, t64 = s64[None], t64[None]
    n = s64.shape[0]
    loss_rows, grad_rows = ref_rows(s64, t64, kind, beta, temperature)
    valid = np.ones(n, bool) if labels is None else (np.asarray(labels).reshape(n) != ignore_index)
    per_token = np.where(valid, loss_rows, 0.0)
    total = per_token.sum()
    if reduction == "batchmean":
        div = num_items if num_items is not None else max(1, int(valid.sum()))
        loss, scale = total / div, 1.0 / div
    else:
        loss, scale = total, 1.0
    grad = np.where(valid[:, None], grad_rows * scale, 0.0)
    return loss, per_token, grad


# ---- helpers ----------------------------------------------------------------------------------


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not np.isnan(out).any(), "NaN in output"
    nr = np.linalg.norm(ref)
    nd = np.linalg.norm(out - ref)
    if nr == 0.0:
        return nd
    return nd / nr


def tolerances(student_dtype, teacher_dtype):
    """(loss, grad) relative-norm tolerances of DESIGN.md."""
    if student_dtype == F32 and teacher_dtype == F32:
        return 1e-5, 1e-5
    return 1e-4, 1e-2 if student_dtype != F32 else 1e-5


def logits(rng, shape, dtype, scale=2.0, offset=0.0):
    """Random logits, rounded to dtype (never zeros)."""
    x = rng.standard_normal(shape) * scale + offset
    return x.astype(dtype)


def run_and_check(s, t, ctx="", **kw):
    """Calls the library, checks it against the reference and that the inputs are untouched."""
    s_copy, t_copy = s.copy(), t.copy()
    labels = kw.get("labels")
    l_copy = None if labels is None else np.array(labels, copy=True)
    r = dk.divergence(s, t, **kw)
    np.testing.assert_array_equal(s, s_copy)
    np.testing.assert_array_equal(t, t_copy)
    if labels is not None:
        np.testing.assert_array_equal(labels, l_copy)
    kw_ref = {k: v for k, v in kw.items() if k != "grad"}
    loss, per_token, grad = reference(s, t, **kw_ref)
    tol_loss, tol_grad = tolerances(s.dtype, t.dtype)
    msg = f"{ctx} shape={s.shape} dtypes={s.dtype}/{t.dtype} {kw_ref}"
    assert isinstance(r.loss, float), msg
    assert r.per_token.dtype == np.float32, msg
    assert r.per_token.shape == s.shape[:-1], msg
    e = rel_err(np.float64(r.loss), loss)
    assert e <= tol_loss, f"loss rel err {e:.3g} ({r.loss} vs {loss}) {msg}"
    e = rel_err(r.per_token.reshape(-1), per_token)
    assert e <= tol_loss, f"per_token rel err {e:.3g} {msg}"
    if kw.get("grad", True):
        assert r.grad is not None, msg
        # Same dtype (in native byte order) and shape as the student.
        assert r.grad.dtype == s.dtype.newbyteorder("=") and r.grad.shape == s.shape, msg
        e = rel_err(r.grad.astype(np.float64).reshape(grad.shape), grad)
        assert e <= tol_grad, f"grad rel err {e:.3g} {msg}"
    else:
        assert r.grad is None, msg
    return r


# ---- the reference itself ---------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_reference_gradient_matches_finite_differences(kind, beta):
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((3, 7)), rng.standard_normal((3, 7))
    for temperature in (1.0, 0.7):
        _, g = ref_rows(s, t, kind, beta, temperature)
        h = 1e-6
        fd = np.zeros_like(s)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                sp, sm = s.copy(), s.copy()
                sp[i, j] += h
                sm[i, j] -= h
                fd[i, j] = (ref_rows(sp, t, kind, beta, temperature)[0][i]
                            - ref_rows(sm, t, kind, beta, temperature)[0][i]) / (2 * h)
        assert rel_err(g, fd) < 1e-6


def test_reference_special_values():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((2, 9))
    loss, _ = ref_rows(s, s, "jsd", 0.5, 1.0)
    np.testing.assert_allclose(loss, 0.0, atol=1e-15)
    t = rng.standard_normal((2, 9))
    # jsd(beta) bounded by the entropy of (beta, 1 - beta); swap maps beta to 1 - beta.
    b = 0.3
    l1, _ = ref_rows(s, t, "jsd", b, 1.0)
    l2, _ = ref_rows(t, s, "jsd", 1 - b, 1.0)
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    assert np.all(l1 <= -b * math.log(b) - (1 - b) * math.log(1 - b))
    # forward KL is the reverse KL with the roles swapped.
    np.testing.assert_allclose(ref_rows(s, t, "forward_kl", 0.5, 1.0)[0],
                               ref_rows(t, s, "reverse_kl", 0.5, 1.0)[0], rtol=1e-12)


# ---- the library against the reference ---------------------------------------------------------


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_kinds_and_dtypes(kind, beta, dtype):
    rng = np.random.default_rng(10)
    d = DTYPES[dtype]
    s, t = logits(rng, (7, 333), d), logits(rng, (7, 333), d)
    run_and_check(s, t, kind=kind, beta=beta)


@pytest.mark.parametrize("sd,td", [("f32", "bf16"), ("bf16", "f32"), ("f16", "bf16"),
                                   ("bf16", "f16"), ("f32", "f16"), ("f16", "f32")])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_mixed_dtypes(sd, td, kind, beta):
    rng = np.random.default_rng(11)
    s, t = logits(rng, (5, 257), DTYPES[sd]), logits(rng, (5, 257), DTYPES[td])
    run_and_check(s, t, kind=kind, beta=beta, temperature=1.5)


@pytest.mark.parametrize("temperature", [0.5, 0.7, 2.0, 3.3])
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_temperature(temperature, kind, beta):
    rng = np.random.default_rng(12)
    s, t = logits(rng, (4, 129), F32), logits(rng, (4, 129), F32)
    run_and_check(s, t, kind=kind, beta=beta, temperature=temperature)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_labels_and_reductions(reduction, kind, beta):
    rng = np.random.default_rng(13)
    s, t = logits(rng, (9, 100), BF16), logits(rng, (9, 100), F32)
    labels = rng.integers(0, 100, size=9)
    labels[[1, 4, 5]] = -100
    r = run_and_check(s, t, kind=kind, beta=beta, labels=labels, reduction=reduction)
    assert np.all(r.per_token[[1, 4, 5]] == 0.0)
    assert np.all(r.grad[[1, 4, 5]].astype(np.float32) == 0.0)
    # A custom ignore_index.
    labels2 = labels.copy()
    labels2[labels2 == -100] = 7
    labels2[0] = 7
    run_and_check(s, t, kind=kind, beta=beta, labels=labels2, ignore_index=7, reduction=reduction)


def test_reductions_are_consistent():
    rng = np.random.default_rng(14)
    s, t = logits(rng, (6, 50), F32), logits(rng, (6, 50), F32)
    labels = np.array([1, -100, 3, 4, -100, 6])
    rb = dk.divergence(s, t, kind="jsd", labels=labels, reduction="batchmean")
    rs = dk.divergence(s, t, kind="jsd", labels=labels, reduction="sum")
    rn = dk.divergence(s, t, kind="jsd", labels=labels, reduction="none")
    np.testing.assert_array_equal(rb.per_token, rs.per_token)
    np.testing.assert_array_equal(rs.per_token, rn.per_token)
    np.testing.assert_allclose(rn.loss, rn.per_token.astype(np.float64).sum(), rtol=1e-6)
    np.testing.assert_allclose(rs.loss, rn.loss, rtol=1e-6)
    np.testing.assert_allclose(rb.loss, rs.loss / 4, rtol=1e-6)
    np.testing.assert_allclose(rb.grad, rs.grad / 4, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(rs.grad, rn.grad)


@pytest.mark.parametrize("num_items", [1.0, 3.0, 17.5, 1000])
def test_num_items(num_items):
    rng = np.random.default_rng(15)
    s, t = logits(rng, (5, 64), F32), logits(rng, (5, 64), F32)
    labels = np.array([0, -100, 2, 3, -100])
    run_and_check(s, t, kind="forward_kl", labels=labels, num_items=num_items)
    run_and_check(s, t, kind="jsd", beta=0.3, num_items=num_items)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_non_contiguous_row_views_zero_copy(dtype):
    rng = np.random.default_rng(16)
    d = DTYPES[dtype]
    big_s = logits(rng, (6, 300), d)
    big_t = logits(rng, (6, 310), d)
    s, t = big_s[:, :257], big_t[:, 20:277]
    assert not s.flags.c_contiguous and not t.flags.c_contiguous
    # The row views go to the library as they are, with their row stride.
    arr, stride = dk_divergence_module._row_layout(s)
    assert arr is s and stride == 300
    arr, stride = dk_divergence_module._row_layout(t)
    assert arr is t and stride == 310
    big_s_copy, big_t_copy = big_s.copy(), big_t.copy()
    for kind, beta in KIND_BETAS:
        r = run_and_check(s, t, kind=kind, beta=beta, temperature=0.9)
        assert r.grad.flags.c_contiguous
    np.testing.assert_array_equal(big_s, big_s_copy)
    np.testing.assert_array_equal(big_t, big_t_copy)
    # Every other row.
    run_and_check(big_s[::2, :100], big_t[1::2, :100], kind="jsd", beta=0.5)


def test_other_layouts_are_copied():
    rng = np.random.default_rng(17)
    base = logits(rng, (40, 24), F32)
    t = logits(rng, (20, 12), F32)
    cases = {
        "column stride 2": base[::2, ::2],
        "fortran order": np.asfortranarray(base[:20, :12]),
        "reversed rows": base[:20, :12][::-1],
        "reversed columns": base[:20, :12][:, ::-1],
        "broadcast row": np.broadcast_to(base[0, :12], (20, 12)),
        "byte-swapped": base[:20, :12].astype(">f4"),
    }
    for name, s in cases.items():
        run_and_check(s, t, ctx=name, kind="jsd", beta=0.3)
        run_and_check(t, s, ctx=name + " (teacher)", kind="forward_kl")
    # Misaligned data: a float32 view one byte into a buffer.
    raw = np.zeros(20 * 12 * 4 + 1, dtype=np.uint8)
    mis = np.ndarray((20, 12), dtype=np.float32, buffer=raw, offset=1)
    mis[...] = logits(rng, (20, 12), F32)
    assert not mis.flags.aligned
    run_and_check(mis, t, ctx="misaligned", kind="reverse_kl")


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_grad_false(kind, beta):
    rng = np.random.default_rng(18)
    s, t = logits(rng, (4, 77), BF16), logits(rng, (4, 77), BF16)
    r = run_and_check(s, t, kind=kind, beta=beta, grad=False)
    assert r.grad is None
    r2 = dk.divergence(s, t, kind=kind, beta=beta, grad=True)
    assert r.loss == r2.loss
    np.testing.assert_array_equal(r.per_token, r2.per_token)


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_masked_entries(kind, beta, dtype):
    rng = np.random.default_rng(19)
    d = DTYPES[dtype]
    n, v = 6, 130
    s = logits(rng, (n, v), d)
    t = logits(rng, (n, v), d)
    mask = rng.random((n, v)) < 0.3
    mask[:, 0] = False  # at least one entry left in every row
    mask[2, :] = True  # a fully masked row (both sides)
    s[mask] = -np.inf
    t[mask] = -np.inf
    t[4, :] = -np.inf  # teacher all -inf, student not: loss 0, grad 0
    s[5, :] = -np.inf  # student all -inf, teacher not: loss 0, grad 0
    r = dk.divergence(s, t, kind=kind, beta=beta, reduction="sum")
    assert not np.isnan(r.per_token).any() and not np.isnan(r.loss)
    g = r.grad.astype(np.float64)
    assert not np.isnan(g).any()
    assert np.all(g[mask] == 0.0)
    for row in (2, 4, 5):
        assert r.per_token[row] == 0.0 and np.all(g[row] == 0.0), row
    # Rows with masked entries equal the reference computed on the unmasked subset.
    tol_loss, tol_grad = tolerances(d, d)
    for row in (0, 1, 3):
        keep = ~mask[row]
        loss, grad = ref_rows(s[row, keep][None], t[row, keep][None], kind, beta, 1.0)
        assert rel_err(r.per_token[row], loss[0]) <= tol_loss, row
        assert rel_err(g[row, keep], grad[0]) <= tol_grad, row
    # ... and the whole call equals the reference with the same masks.
    run_and_check(s, t, kind=kind, beta=beta, reduction="sum")


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_whole_sides_at_finfo_min_are_uniform(kind, beta, dtype):
    """A side masked entirely with finfo(dtype).min (masked_fill over the whole row) is a uniform
    distribution, as a row of zeros is: the same bits of loss and gradient. (The CPU backend
    formed log p = x - (max + ln sum) until 2026-11-29, which at max = -3.4e38 rounds to x - max
    and loses ln V: losses off by O(1).) Row 0: the teacher side, row 1: the student side, row
    2: both."""
    rng = np.random.default_rng(41)
    d = DTYPES[dtype]
    n, v = 3, 150
    s, t = logits(rng, (n, v), d), logits(rng, (n, v), d)
    lo = ml_dtypes.finfo(d).min
    masked = (s.copy(), t.copy())
    zeros = (s.copy(), t.copy())
    for (ss, tt), fill in ((masked, lo), (zeros, 0)):
        tt[0] = fill
        ss[1] = fill
        ss[2] = fill
        tt[2] = fill
    r = dk.divergence(*masked, kind=kind, beta=beta)
    z = dk.divergence(*zeros, kind=kind, beta=beta)
    np.testing.assert_array_equal(r.per_token, z.per_token)
    np.testing.assert_array_equal(r.grad.astype(np.float64), z.grad.astype(np.float64))
    assert r.per_token[0] > 0.0 and r.per_token[1] > 0.0  # not treated as masked rows
    # ... and both agree with the reference computed from the masked logits themselves.
    run_and_check(*masked, kind=kind, beta=beta)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_masked_on_one_side_only(dtype):
    """Entries masked on one side only, where the divergence stays finite: JSD either way, forward
    KL with the teacher masked (p = 0 there), reverse KL with the student masked (q = 0 there)."""
    rng = np.random.default_rng(32)
    d = DTYPES[dtype]
    s, t = logits(rng, (5, 70), d), logits(rng, (5, 70), d)
    mask_s = rng.random((5, 70)) < 0.25
    mask_t = rng.random((5, 70)) < 0.25
    mask_s[:, 0] = mask_t[:, 0] = False
    s_m, t_m = s.copy(), t.copy()
    s_m[mask_s] = -np.inf
    t_m[mask_t] = -np.inf
    for kind, beta in [("jsd", 0.5), ("jsd", 0.3), ("jsd", 0.9)]:
        run_and_check(s_m, t_m, kind=kind, beta=beta, reduction="sum")
    run_and_check(s, t_m, kind="forward_kl", temperature=0.8)
    run_and_check(s_m, t, kind="reverse_kl", temperature=1.7)
    r = dk.divergence(s_m, t_m, kind="jsd", beta=0.4)
    assert np.all(r.grad[mask_s].astype(np.float32) == 0.0)


def test_all_rows_ignored():
    rng = np.random.default_rng(20)
    s, t = logits(rng, (5, 40), F32), logits(rng, (5, 40), F32)
    labels = np.full(5, -100)
    for reduction in ("batchmean", "sum", "none"):
        r = dk.divergence(s, t, kind="jsd", labels=labels, reduction=reduction)
        assert r.loss == 0.0
        assert np.all(r.per_token == 0.0)
        assert np.all(r.grad == 0.0)
    r = dk.divergence(s, t, kind="forward_kl", labels=labels, num_items=8)
    assert r.loss == 0.0 and np.all(r.grad == 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_nan_rows_stay_in_their_row(bad, side, kind, beta):
    rng = np.random.default_rng(21)
    s, t = logits(rng, (5, 60), F32), logits(rng, (5, 60), F32)
    (s if side == "student" else t)[2, 17] = bad
    r = dk.divergence(s, t, kind=kind, beta=beta, reduction="batchmean")
    assert np.isnan(r.per_token[2])
    assert np.all(np.isnan(r.grad[2]))
    assert math.isnan(r.loss)
    others = [0, 1, 3, 4]
    _, per_token, grad = reference(s, t, kind=kind, beta=beta)
    assert rel_err(r.per_token[others], per_token[others]) <= 1e-5
    assert rel_err(r.grad[others], grad[others]) <= 1e-5
    # Ignoring the bad row removes it entirely.
    labels = np.array([0, 1, -100, 3, 4])
    run_and_check(s, t, kind=kind, beta=beta, labels=labels)


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_v_equals_one(kind, beta):
    rng = np.random.default_rng(22)
    s, t = logits(rng, (4, 1), F32), logits(rng, (4, 1), F32)
    r = dk.divergence(s, t, kind=kind, beta=beta)
    assert r.loss == 0.0 and np.all(r.per_token == 0.0) and np.all(r.grad == 0.0)
    assert r.grad.shape == (4, 1)
    # Column view of a wider array (row stride 3, V = 1).
    big = logits(rng, (4, 3), BF16)
    r = dk.divergence(big[:, 1:2], big[:, 2:3], kind=kind, beta=beta)
    assert r.loss == 0.0 and np.all(r.grad.astype(np.float32) == 0.0)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_odd_v(dtype, kind, beta):
    rng = np.random.default_rng(23)
    d = DTYPES[dtype]
    s, t = logits(rng, (3, 1001), d), logits(rng, (3, 1001), F16)
    run_and_check(s, t, kind=kind, beta=beta, temperature=1.3)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("reverse_kl", 0.5)])
def test_large_vocabulary(dtype, kind, beta):
    rng = np.random.default_rng(24)
    d = DTYPES[dtype]
    s = logits(rng, (2, 262145), d, scale=3.0)
    t = logits(rng, (2, 262145), d, scale=3.0)
    run_and_check(s, t, kind=kind, beta=beta)


def test_single_row_1d():
    rng = np.random.default_rng(25)
    s, t = logits(rng, 50, F32), logits(rng, 50, F32)
    r = run_and_check(s, t, kind="jsd", beta=0.3)
    assert r.per_token.shape == () and r.grad.shape == (50,)
    r2 = dk.divergence(s[None], t[None], kind="jsd", beta=0.3)
    assert r.loss == r2.loss
    np.testing.assert_array_equal(r.grad, r2.grad[0])
    r3 = dk.divergence(s, t, kind="jsd", labels=np.array(-100))
    assert r3.loss == 0.0
    r4 = dk.divergence(s, t, kind="jsd", labels=[-100])
    assert r4.loss == 0.0


def test_label_dtypes():
    rng = np.random.default_rng(26)
    s, t = logits(rng, (4, 30), F32), logits(rng, (4, 30), F32)
    base = dk.divergence(s, t, labels=np.array([1, -100, 2, 3]), kind="jsd")
    for lab in (np.array([1, -100, 2, 3], dtype=np.int32), np.array([1, -100, 2, 3], np.int16),
                [1, -100, 2, 3]):
        r = dk.divergence(s, t, labels=lab, kind="jsd")
        assert r.loss == base.loss
    r = dk.divergence(s, t, labels=np.array([1, 255, 2, 3], np.uint8), ignore_index=255,
                      kind="jsd")
    assert r.loss == base.loss


def test_deterministic():
    rng = np.random.default_rng(27)
    s, t = logits(rng, (16, 999), BF16), logits(rng, (16, 999), F32)
    a = dk.divergence(s, t, kind="jsd", beta=0.3)
    b = dk.divergence(s, t, kind="jsd", beta=0.3)
    assert a.loss == b.loss
    np.testing.assert_array_equal(a.per_token, b.per_token)
    np.testing.assert_array_equal(a.grad.view(np.uint16), b.grad.view(np.uint16))


def test_shift_invariance_and_zero_on_equal_rows():
    rng = np.random.default_rng(28)
    s, t = logits(rng, (3, 64), F32), logits(rng, (3, 64), F32)
    a = dk.divergence(s, t, kind="jsd", reduction="none")
    b = dk.divergence(s + np.float32(4.0), t - np.float32(2.0), kind="jsd", reduction="none")
    np.testing.assert_allclose(a.per_token, b.per_token, rtol=1e-5, atol=1e-7)
    z = dk.divergence(s, s.copy(), kind="reverse_kl")
    assert abs(z.loss) < 1e-6 and np.max(np.abs(z.grad)) < 1e-6


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_gradient_vs_finite_differences(kind, beta, reduction):
    """The library's gradient against central differences of the library's own loss."""
    rng = np.random.default_rng(29)
    n, v, temperature = 3, 5, 0.8
    s = logits(rng, (n, v), F32, scale=1.0)
    t = logits(rng, (n, v), F32, scale=1.0)
    labels = np.array([0, -100, 1])
    kw = dict(kind=kind, beta=beta, temperature=temperature, labels=labels, reduction=reduction)
    g = dk.divergence(s, t, **kw).grad.astype(np.float64)
    fd = np.zeros((n, v))
    h = np.float32(1e-2)
    for i in range(n):
        for j in range(v):
            sp, sm = s.copy(), s.copy()
            sp[i, j] += h
            sm[i, j] -= h
            step = np.float64(sp[i, j]) - np.float64(sm[i, j])
            fd[i, j] = (dk.divergence(sp, t, grad=False, **kw).loss
                        - dk.divergence(sm, t, grad=False, **kw).loss) / step
    assert rel_err(g, fd) < 2e-3, (g, fd)
    assert np.all(g[1] == 0.0)


@pytest.mark.parametrize("seed", range(40))
def test_random_shapes_and_parameters(seed):
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(1, 17))
    v = int(rng.choice([1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 64, 127, 255, 512, 1000, 4099]))
    if rng.random() < 0.3:
        v = int(rng.integers(1, 3000))
    sd, td = (DTYPES[k] for k in rng.choice(list(DTYPES), size=2))
    kind = str(rng.choice(["forward_kl", "reverse_kl", "jsd"]))
    beta = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.9, 1.0, rng.random()]))
    temperature = float(rng.choice([1.0, 0.5, 2.0, 0.1 + 3 * rng.random()]))
    reduction = str(rng.choice(["batchmean", "sum", "none"]))
    labels = None
    if rng.random() < 0.5:
        labels = rng.integers(0, 1000, size=n)
        labels[rng.random(n) < 0.3] = -100
    num_items = None
    if reduction == "batchmean" and rng.random() < 0.3:
        num_items = float(rng.integers(1, 50))
    pad_s = int(rng.integers(0, 5)) if rng.random() < 0.4 else 0
    pad_t = int(rng.integers(0, 5)) if rng.random() < 0.4 else 0
    scale = float(rng.choice([0.5, 2.0, 5.0]))
    s = logits(rng, (n, v + pad_s), sd, scale=scale)[:, :v]
    t = logits(rng, (n, v + pad_t), td, scale=scale, offset=float(rng.normal()))[:, pad_t:]
    run_and_check(
        s, t, ctx=f"seed={1000 + seed}", kind=kind, beta=beta, temperature=temperature,
        labels=labels, reduction=reduction, num_items=num_items, grad=bool(rng.random() < 0.85),
    )


# ---- bad input ---------------------------------------------------------------------------------


def _bad_cases():
    rng = np.random.default_rng(30)
    s, t = logits(rng, (4, 10), F32), logits(rng, (4, 10), F32)
    lab = np.array([1, 2, -100, 3])
    ok = dict(student=s, teacher=t)
    cases = [
        ("3-D student", dict(student=s.reshape(2, 2, 10), teacher=t.reshape(2, 2, 10)), ValueError),
        ("0-D", dict(student=np.float32(1.0), teacher=np.float32(1.0)), ValueError),
        ("shape mismatch", dict(student=s, teacher=t[:3]), ValueError),
        ("V mismatch", dict(student=s, teacher=t[:, :9]), ValueError),
        ("float64", dict(student=s.astype(np.float64), teacher=t), TypeError),
        ("int32 teacher", dict(student=s, teacher=t.astype(np.int32)), TypeError),
        ("complex", dict(student=s.astype(np.complex64), teacher=t), TypeError),
        ("not an array", dict(student="abc", teacher=t), TypeError),
        ("masked student", dict(student=np.ma.masked_array(s, s > 0), teacher=t), TypeError),
        ("masked labels", dict(ok, labels=np.ma.masked_array(lab, lab < 0)), TypeError),
        ("V = 0", dict(student=s[:, :0], teacher=t[:, :0]), ValueError),
        ("beta < 0", dict(ok, beta=-0.1, kind="jsd"), ValueError),
        ("beta > 1", dict(ok, beta=1.0001, kind="jsd"), ValueError),
        ("beta nan", dict(ok, beta=float("nan"), kind="jsd"), ValueError),
        # JSD betas that float32 (the library's type) rounds to 1 or 0: reverse / forward KL.
        ("beta rounds to 1", dict(ok, beta=1 - 2.9e-8, kind="jsd"), ValueError),
        ("beta rounds to 0", dict(ok, beta=1e-46, kind="jsd"), ValueError),
        ("beta str", dict(ok, beta="0.5"), TypeError),
        ("beta numpy bool", dict(ok, beta=np.bool_(True), kind="jsd"), TypeError),
        ("beta complex", dict(ok, beta=np.complex64(0.5 + 1j), kind="jsd"), TypeError),
        ("temperature 0-d str", dict(ok, temperature=np.array("2")), TypeError),
        ("temperature 0-d object", dict(ok, temperature=np.array(2.0, dtype=object)), TypeError),
        ("temperature 0", dict(ok, temperature=0.0), ValueError),
        ("temperature < 0", dict(ok, temperature=-1.0), ValueError),
        ("temperature inf", dict(ok, temperature=float("inf")), ValueError),
        ("temperature nan", dict(ok, temperature=float("nan")), ValueError),
        ("temperature underflows f32", dict(ok, temperature=1e-60), ValueError),
        ("temperature subnormal f32", dict(ok, temperature=3e-39), ValueError),
        ("labels too short", dict(ok, labels=lab[:3]), ValueError),
        ("labels too long", dict(ok, labels=np.arange(5)), ValueError),
        ("labels 2-D", dict(ok, labels=lab.reshape(2, 2)), ValueError),
        ("labels float", dict(ok, labels=lab.astype(np.float32)), TypeError),
        ("num_items 0", dict(ok, num_items=0), ValueError),
        ("num_items < 0", dict(ok, num_items=-2.0), ValueError),
        ("num_items nan", dict(ok, num_items=float("nan")), ValueError),
        ("num_items subnormal", dict(ok, num_items=1e-40), ValueError),
        ("num_items tiny", dict(ok, num_items=1e-60), ValueError),
        ("num_items with sum", dict(ok, num_items=4, reduction="sum"), ValueError),
        ("num_items with none", dict(ok, num_items=4, reduction="none"), ValueError),
        ("kind", dict(ok, kind="kl"), ValueError),
        ("kind None", dict(ok, kind=None), ValueError),
        ("reduction", dict(ok, reduction="mean"), ValueError),
        ("ignore_index float", dict(ok, ignore_index=1.5), TypeError),
        ("ignore_index too big", dict(ok, ignore_index=2**64), ValueError),
        ("grad not bool", dict(ok, grad="yes"), TypeError),
    ]
    return cases


@pytest.mark.parametrize("name,kwargs,exc", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_and_leaves_inputs_untouched(name, kwargs, exc):
    copies = {k: np.array(v, copy=True) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc) as info:
        dk.divergence(**kwargs)
    assert str(info.value), name
    for k, c in copies.items():
        np.testing.assert_array_equal(kwargs[k], c, err_msg=name)


def test_library_errors_carry_status_and_message():
    from distill_kernels import _lib
    import ctypes

    # A CUDA context on a machine without that device: NoDeviceError from the library itself.
    if dk.cuda_device_count() == 0:
        with pytest.raises(dk.NoDeviceError) as info:
            _lib.context(0)
        assert info.value.status == 5 and "CUDA" in str(info.value)
    with pytest.raises(dk.DistillKernelsError):
        _lib.context(10_000)
    # Bad stride through the raw ABI: ShapeError with the library's message, nothing written.
    rng = np.random.default_rng(31)
    s, t = logits(rng, (3, 8), F32), logits(rng, (3, 8), F32)
    grad = np.full((3, 8), np.nan, np.float32)
    per_token = np.full(3, np.nan, np.float32)
    loss = ctypes.c_float(float("nan"))
    args = _lib.DivergenceArgs(
        n=3, v=8, student=s.ctypes.data, student_dtype=0, student_stride=7,
        teacher=t.ctypes.data, teacher_dtype=0, teacher_stride=8, labels=None,
        loss=ctypes.addressof(loss), per_token=per_token.ctypes.data, grad=grad.ctypes.data,
        grad_stride=8,
    )
    params = _lib.lib().dk_divergence_params_default()
    status = _lib.lib().dk_divergence(_lib.context(-1), ctypes.byref(args), ctypes.byref(params),
                                      None, 0, None)
    with pytest.raises(dk.ShapeError) as info:
        _lib.check(status, "dk_divergence")
    assert info.value.status == 3 and "stride" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert np.isnan(grad).all() and np.isnan(per_token).all() and math.isnan(loss.value)
    # Unsupported dtype code.
    args.student_stride = 8
    args.student_dtype = 7
    status = _lib.lib().dk_divergence(_lib.context(-1), ctypes.byref(args), ctypes.byref(params),
                                      None, 0, None)
    with pytest.raises(dk.UnsupportedDtypeError):
        _lib.check(status)
    assert np.isnan(grad).all()
    # Defaults of the C ABI.
    assert params.kind == 0 and params.temperature == 1.0 and params.ignore_index == -100
    assert params.reduction == 0 and params.num_items == 0.0


def test_version_and_devices():
    assert dk.__version__ == dk.version()
    assert isinstance(dk.cuda_device_count(), int) and dk.cuda_device_count() >= 0
    assert dk.library_path().is_file()


# ---- the gradient over the student (grad_inplace=True) -----------------------------------------


def _bits(a):
    """The array's bit patterns (unsigned ints of its item size), for bitwise comparisons."""
    return a.view(f"u{a.dtype.itemsize}")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_grad_inplace_is_the_separate_gradient_written_over_student(dtype, kind, beta):
    rng = np.random.default_rng(40)
    d = DTYPES[dtype]
    big = logits(rng, (7, 520), d)
    s = big[:, :501]  # strided rows: the gradient keeps the student's row stride
    t = logits(rng, (7, 501), d)
    labels = np.array([0, -100, 2, 3, -100, 5, 6])
    kw = dict(kind=kind, beta=beta, temperature=1.3, labels=labels)
    ref = run_and_check(s, t, **kw)
    padding, t_copy = big[:, 501:].copy(), t.copy()
    r = dk.divergence(s, t, grad_inplace=True, **kw)
    assert r.loss == ref.loss
    np.testing.assert_array_equal(r.per_token, ref.per_token)
    assert r.grad.shape == s.shape and np.shares_memory(r.grad, big)
    np.testing.assert_array_equal(_bits(s), _bits(ref.grad))  # student now holds the gradient
    np.testing.assert_array_equal(_bits(big[:, 501:]), _bits(padding))  # not past V
    np.testing.assert_array_equal(t, t_copy)


def test_grad_inplace_one_row():
    rng = np.random.default_rng(41)
    s, t = logits(rng, 333, F32), logits(rng, 333, F32)
    ref = dk.divergence(s, t, kind="reverse_kl")
    r = dk.divergence(s, t, kind="reverse_kl", grad_inplace=True)
    assert r.grad.shape == (333,) and np.shares_memory(r.grad, s)
    np.testing.assert_array_equal(s, ref.grad)
    assert r.loss == ref.loss


def test_grad_inplace_refuses_what_it_cannot_write_and_writes_nothing():
    rng = np.random.default_rng(42)
    base = logits(rng, (40, 24), F32)
    t = logits(rng, (20, 12), F32)
    needs_a_copy = {
        "column stride 2": base[::2, ::2],
        "fortran order": np.asfortranarray(base[:20, :12]),
        "reversed rows": base[:20, :12][::-1],
        "broadcast row": np.broadcast_to(base[0, :12], (20, 12)),
        "byte-swapped": base[:20, :12].astype(">f4"),
    }
    for name, s in needs_a_copy.items():
        before = np.array(s, copy=True)
        with pytest.raises(ValueError, match="grad_inplace"):
            dk.divergence(s, t, grad_inplace=True)
        np.testing.assert_array_equal(s, before, err_msg=name)
    ro = base[:20, :12].copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        dk.divergence(ro, t, grad_inplace=True)
    s = base[:20, :12].copy()
    before = s.copy()
    with pytest.raises(ValueError, match="needs grad=True"):
        dk.divergence(s, t, grad=False, grad_inplace=True)
    with pytest.raises(TypeError, match="numpy array"):
        dk.divergence(s.tolist(), t, grad_inplace=True)
    with pytest.raises(TypeError, match="grad_inplace must be a bool"):
        dk.divergence(s, t, grad_inplace=1)
    # Student over the teacher's memory: the library refuses the overlap before writing.
    with pytest.raises(dk.DistillKernelsError, match="overlaps the teacher"):
        dk.divergence(s, s, grad_inplace=True)
    wide = base[:20, :24].copy()
    with pytest.raises(dk.DistillKernelsError, match="overlaps the teacher"):
        dk.divergence(wide[:, :12], wide[:, 6:18], grad_inplace=True)  # rows share 6 entries
    np.testing.assert_array_equal(wide, base[:20, :24])
    with pytest.raises(ValueError):  # a bad argument the library rejects: nothing written
        dk.divergence(s, t, beta=2.0, grad_inplace=True)
    np.testing.assert_array_equal(s, before)


def test_grad_inplace_beside_a_teacher_in_the_same_buffer():
    # Student and teacher as disjoint row views of one buffer (the halves of [N, 2V] rows, or
    # alternate rows): they share no element, so the gradient may go over the student in place.
    rng = np.random.default_rng(41)
    for kind in ("forward_kl", "jsd"):
        for split in ("halves", "alternate rows"):
            big = rng.standard_normal((16, 26)).astype(np.float32)
            if split == "halves":
                s, t = big[:, :13], big[:, 13:]
            else:
                s, t = big[0::2], big[1::2]
            want = dk.divergence(s.copy(), t.copy(), kind=kind)
            teacher_before = t.copy()
            got = dk.divergence(s, t, kind=kind, grad_inplace=True)
            assert np.shares_memory(got.grad, big)
            np.testing.assert_array_equal(got.grad, want.grad)
            np.testing.assert_array_equal(t, teacher_before)
            assert got.loss == want.loss


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
def test_grad_dtype_float32_keeps_small_half_precision_gradients(dtype):
    # batchmean over N rows: entries ~ (q - p) / N, below float16's 6e-8 for most of a wide
    # row. grad_dtype="float32" returns them in float32: the call on the student widened.
    rng = np.random.default_rng(43)
    s = (rng.standard_normal((64, 4000)) * 2).astype(dtype)
    t = (rng.standard_normal((64, 4000)) * 2).astype(np.float32)
    wide = dk.divergence(s.astype(np.float32), t, kind="jsd")
    got = dk.divergence(s, t, kind="jsd", grad_dtype="float32")
    assert got.grad.dtype == np.float32
    np.testing.assert_array_equal(got.grad, wide.grad)
    assert got.loss == wide.loss
    native = dk.divergence(s, t, kind="jsd").grad
    assert native.dtype == dtype
    if dtype == np.float16:
        assert (native == 0).mean() > 0.1 and (got.grad == 0).mean() == 0.0  # 19 % here, none
    with pytest.raises(ValueError, match="needs grad=True"):
        dk.divergence(s, t, grad=False, grad_dtype="float32")
    with pytest.raises(ValueError, match="grad_dtype must be"):
        dk.divergence(s, t, grad_dtype=np.float64)
    if dtype != np.float32:
        inplace = s.copy()
        with pytest.raises(ValueError, match="drop grad_dtype"):
            dk.divergence(inplace, t, grad_inplace=True, grad_dtype="float32")
        np.testing.assert_array_equal(inplace, s)


def test_beta_is_taken_as_float32():
    # The library's β is a float32 (the C ABI's type), on every backend: near 1, 1 − β moves
    # by up to 2^-25 / (1 − β) relative when β is rounded. The CPU result is exact for that
    # float32 β, and differs from the float64 β's by about that much (documented).
    rng = np.random.default_rng(44)
    s = rng.standard_normal((4, 50)).astype(np.float32)
    t = rng.standard_normal((4, 50)).astype(np.float32)
    for beta in (0.999, 1 - 1e-6):
        b32 = float(np.float32(beta))
        got = dk.divergence(s, t, kind="jsd", beta=beta, reduction="sum")
        exact32, _, g32 = reference(s, t, "jsd", b32, reduction="sum")
        exact64, _, _ = reference(s, t, "jsd", beta, reduction="sum")
        assert abs(got.loss - exact32) <= 1e-6 * abs(exact32)
        np.testing.assert_allclose(got.grad, g32, rtol=1e-5, atol=1e-7)
        bound = 2.0**-25 / (1 - beta)
        assert abs(exact32 - exact64) <= 1.5 * bound * abs(exact64)


def test_num_items_as_a_one_value_array():
    # A token count of one value in any shape, as the torch face takes one-value tensors.
    rng = np.random.default_rng(42)
    s, t = rng.standard_normal((2, 6, 9)).astype(np.float32)
    want = dk.divergence(s, t, num_items=7.0)
    for n in (np.array(7.0), np.array([7.0]), np.array([[7]]), np.float32(7)):
        got = dk.divergence(s, t, num_items=n)
        assert got.loss == want.loss
        np.testing.assert_array_equal(got.grad, want.grad)
    for bad in (np.array([7.0, 8.0]), np.zeros((0,)), np.array([True])):
        with pytest.raises((TypeError, ValueError)):
            dk.divergence(s, t, num_items=bad)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_an_empty_batch_is_a_zero_loss(reduction):
    # N = 0 rows (every token of a micro-batch filtered out): loss 0, empty per-token losses and
    # gradient, for the separate and the in-place gradient alike.
    s = np.ones((0, 10), np.float32)
    t = np.ones((0, 10), BF16)
    for grad_inplace in (False, True):
        r = dk.divergence(s.copy(), t, kind="jsd", reduction=reduction, labels=np.zeros(0, np.int64),
                          grad_inplace=grad_inplace)
        assert r.loss == 0.0 and r.per_token.shape == (0,) and r.grad.shape == (0, 10)
    for dt in (np.int32, np.int64, np.uint64, np.uint32):  # an empty max() once raised for uint64
        r = dk.divergence(s, t, labels=np.zeros(0, dt), reduction=reduction)
        assert r.loss == 0.0
    with pytest.raises(ValueError, match="V must be at least 1"):
        dk.divergence(np.ones((3, 0), np.float32), np.ones((3, 0), np.float32))


def test_scalars_in_any_real_numpy_type():
    """A one-row call takes a plain int label; beta and temperature take numpy and ml_dtypes
    real scalars (bfloat16, float8) as well as Python numbers."""
    rng = np.random.default_rng(44)
    s, t = logits(rng, (10,), F32), logits(rng, (10,), F32)
    want = dk.divergence(s, t, kind="jsd", beta=0.5, temperature=2.0)
    assert dk.divergence(s, t, kind="jsd", beta=0.5, temperature=2.0, labels=3).loss == want.loss
    assert dk.divergence(s, t, labels=-100).loss == 0.0  # the one row ignored
    for beta in (np.float16(0.5), ml_dtypes.bfloat16(0.5), ml_dtypes.float8_e4m3fn(0.5),
                 np.array(0.5, np.float32)):
        got = dk.divergence(s, t, kind="jsd", beta=beta, temperature=np.int64(2))
        assert got.loss == want.loss, type(beta)
