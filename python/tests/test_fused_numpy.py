"""distill_kernels.fused_linear_divergence (numpy, CPU backend) against an independent float64
reference.

The reference below is written from the math of DESIGN.md ("Fused linear divergence" on top of
"Token-level divergence") with plain numpy: the matrix products, logit scale and soft cap, the
log-softmax, the divergence, and the chain rule back to the hidden states and the weight. It never
calls the library, and its gradients are checked against central finite differences. Freshly
allocated gradients are poisoned (NaN) before every library call so unwritten elements show up.
"""

from __future__ import annotations

import importlib
import math

import ml_dtypes
import numpy as np
import pytest

import distill_kernels as dk
from distill_kernels import _lib

fused_module = importlib.import_module("distill_kernels.fused")

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


def _have_fused() -> str:
    try:
        _lib.fused_lib()
        return ""
    except Exception as e:  # noqa: BLE001
        return str(e)


_MISSING = _have_fused()
needs_lib = pytest.mark.skipif(
    bool(_MISSING), reason=f"the library has no fused linear divergence yet: {_MISSING}"
)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(fused_module, "_POISON", True)


# ---- independent float64 reference ------------------------------------------------------------


def _log_softmax(x):
    m = np.max(x, axis=1, keepdims=True)
    return x - (m + np.log(np.sum(np.exp(x - m), axis=1, keepdims=True)))


def _logits(hidden, weight, logit_scale, softcap):
    """(capped logits, d(capped)/d(raw product)) in float64."""
    z = logit_scale * (hidden @ weight.T)
    if softcap is None:
        return z, np.full_like(z, logit_scale)
    th = np.tanh(z / softcap)
    return softcap * th, logit_scale * (1.0 - th * th)


def _rows(zs, zt, kind, beta, temperature):
    """Per-row divergence [N] and its gradient w.r.t. the (capped) student logits [N, V]."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    logq = _log_softmax(zs / temperature)
    logp = _log_softmax(zt / temperature)
    q, p = np.exp(logq), np.exp(logp)
    if kind == "forward_kl":
        loss = np.sum(p * (logp - logq), axis=1)
        gq = -p  # q_k · dL/dq_k
    elif kind == "reverse_kl":
        loss = np.sum(q * (logq - logp), axis=1)
        gq = q * (logq - logp + 1.0)
    else:
        logm = np.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        loss = beta * np.sum(p * (logp - logm), axis=1) + (1 - beta) * np.sum(q * (logq - logm), 1)
        gq = (1 - beta) * q * (logq - logm)
    g = (gq - q * np.sum(gq, axis=1, keepdims=True)) / temperature
    return loss, g


def reference(hs, ws, ht, wt, kind="jsd", beta=0.5, temperature=1.0, labels=None,
              ignore_index=-100, reduction="batchmean", num_items=None, logit_scale=1.0,
              softcap=None):
    """(loss, per_token [N], grad_hidden [N, H], grad_weight [V, H]) in float64."""
    hs, ws, ht, wt = (np.asarray(a, dtype=np.float64) for a in (hs, ws, ht, wt))
    hs = hs.reshape(-1, hs.shape[-1])
    ht = ht.reshape(-1, ht.shape[-1])
    n = hs.shape[0]
    zs, dzs = _logits(hs, ws, logit_scale, softcap)
    zt, _ = _logits(ht, wt, logit_scale, softcap)
    rows, g = _rows(zs, zt, kind, beta, temperature)
    valid = np.ones(n, bool) if labels is None else np.asarray(labels).reshape(n) != ignore_index
    per_token = np.where(valid, rows, 0.0)
    if reduction == "batchmean":
        div = num_items if num_items is not None else max(1, int(valid.sum()))
        scale = 1.0 / div
    else:
        scale = 1.0
    loss = per_token.sum() * scale
    G = np.where(valid[:, None], g * scale, 0.0) * dzs  # d(loss)/d(hidden @ weightᵀ)
    return loss, per_token, G @ ws, G.T @ hs


# ---- helpers ----------------------------------------------------------------------------------


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not np.isnan(out).any(), "NaN in output"
    nr = np.linalg.norm(ref)
    nd = np.linalg.norm(out - ref)
    return nd if nr == 0.0 else nd / nr


def tolerances(dtype):
    """(loss, grad) relative-norm tolerances of DESIGN.md."""
    if dtype == F32:
        return 1e-5, 1e-5
    return 1e-4, 1e-2


def make_inputs(rng, n=23, h=16, v=61, ht=None, dtype=F32, spread=2.0):
    """Random hidden states and weights rounded to dtype (never zeros); the logits have a
    standard deviation of about ``spread``, so the distributions are far from uniform."""
    ht = h if ht is None else ht
    hs = rng.standard_normal((n, h)).astype(dtype)
    ws = (rng.standard_normal((v, h)) * spread / math.sqrt(h)).astype(dtype)
    tt = rng.standard_normal((n, ht)).astype(dtype)
    wt = (rng.standard_normal((v, ht)) * spread / math.sqrt(ht)).astype(dtype)
    return hs, ws, tt, wt


def run_and_check(hs, ws, ht, wt, ctx="", **kw):
    """Calls the library, checks it against the reference and that the inputs are untouched."""
    copies = [a.copy() for a in (hs, ws, ht, wt)]
    labels = kw.get("labels")
    l_copy = None if labels is None else np.array(labels, copy=True)
    r = dk.fused_linear_divergence(hs, ws, ht, wt, **kw)
    for a, c in zip((hs, ws, ht, wt), copies):
        np.testing.assert_array_equal(a, c)
    if labels is not None:
        np.testing.assert_array_equal(labels, l_copy)
    ref_kw = {k: v for k, v in kw.items() if k not in ("grad", "chunk_rows", "grad_dtype")}
    loss, per_token, gh, gw = reference(hs, ws, ht, wt, **ref_kw)
    tol_loss, tol_grad = tolerances(hs.dtype)
    msg = f"{ctx} N={gh.shape[0]} H={gh.shape[1]} V={gw.shape[0]} dtype={hs.dtype} {kw}"
    assert isinstance(r.loss, float), msg
    assert r.per_token.dtype == np.float32 and r.per_token.shape == hs.shape[:-1], msg
    e = rel_err(np.float64(r.loss), loss)
    assert e <= tol_loss, f"loss rel err {e:.3g} ({r.loss} vs {loss}) {msg}"
    e = rel_err(r.per_token.reshape(-1), per_token)
    assert e <= tol_loss, f"per_token rel err {e:.3g} {msg}"
    if kw.get("grad", True):
        want = np.dtype(kw["grad_dtype"]) if kw.get("grad_dtype") is not None else hs.dtype
        # The tolerance of the gradients' own dtype: float32 ones must keep float32's accuracy
        # (the numpy face runs the float64 CPU backend on exact inputs), not the inputs'.
        tol_grad = tolerances(want)[1]
        assert r.grad_hidden.dtype == want and r.grad_hidden.shape == hs.shape, msg
        assert r.grad_weight.dtype == want and r.grad_weight.shape == ws.shape, msg
        e = rel_err(r.grad_hidden.reshape(gh.shape), gh)
        assert e <= tol_grad, f"grad_hidden rel err {e:.3g} {msg}"
        e = rel_err(r.grad_weight, gw)
        assert e <= tol_grad, f"grad_weight rel err {e:.3g} {msg}"
    else:
        assert r.grad_hidden is None and r.grad_weight is None, msg
    return r


# ---- the reference itself ---------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_reference_matches_finite_differences(kind, beta, softcap):
    rng = np.random.default_rng(1)
    hs, ws, ht, wt = (a.astype(np.float64) for a in make_inputs(rng, n=3, h=4, v=5, ht=3))
    labels = np.array([1, -100, 2])
    kw = dict(kind=kind, beta=beta, temperature=0.8, labels=labels, logit_scale=1.3,
              softcap=softcap)
    _, _, gh, gw = reference(hs, ws, ht, wt, **kw)
    eps = 1e-6

    def fd(x, which):
        out = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            a = (xp, ws) if which == "h" else (hs, xp)
            b = (xm, ws) if which == "h" else (hs, xm)
            out[idx] = (reference(a[0], a[1], ht, wt, **kw)[0]
                        - reference(b[0], b[1], ht, wt, **kw)[0]) / (2 * eps)
        return out

    assert rel_err(gh, fd(hs, "h")) < 1e-6
    assert rel_err(gw, fd(ws, "w")) < 1e-6


def test_reference_self_distillation_equal_inputs_zero():
    rng = np.random.default_rng(2)
    hs, ws, _, _ = (a.astype(np.float64) for a in make_inputs(rng, n=4, h=5, v=7))
    loss, per_token, gh, gw = reference(hs, ws, hs, ws, kind="jsd", beta=0.3, softcap=2.0)
    assert abs(loss) < 1e-14 and np.abs(gh).max() < 1e-14 and np.abs(gw).max() < 1e-14


# ---- the library against the reference ---------------------------------------------------------


@needs_lib
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_kinds_and_dtypes(kind, beta, dtype):
    rng = np.random.default_rng(10)
    run_and_check(*make_inputs(rng, dtype=DTYPES[dtype]), kind=kind, beta=beta)


@needs_lib
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_labels_and_reductions(reduction, kind, beta):
    rng = np.random.default_rng(11)
    hs, ws, ht, wt = make_inputs(rng, n=19, dtype=F32)
    labels = rng.integers(0, 61, size=19)
    labels[[1, 4, 5, 18]] = -100
    r = run_and_check(hs, ws, ht, wt, kind=kind, beta=beta, labels=labels, reduction=reduction)
    assert np.all(r.per_token[[1, 4, 5, 18]] == 0.0)
    assert np.all(r.grad_hidden[[1, 4, 5, 18]] == 0.0)
    # A custom ignore_index; int32 labels.
    lab2 = labels.astype(np.int32)
    lab2[lab2 == -100] = 7
    run_and_check(hs, ws, ht, wt, kind=kind, beta=beta, labels=lab2, ignore_index=7,
                  reduction=reduction)


@needs_lib
def test_all_rows_ignored():
    rng = np.random.default_rng(12)
    hs, ws, ht, wt = make_inputs(rng, n=6)
    r = dk.fused_linear_divergence(hs, ws, ht, wt, labels=np.full(6, -100))
    assert r.loss == 0.0 and np.all(r.per_token == 0.0)
    assert np.all(r.grad_hidden == 0.0) and np.all(r.grad_weight == 0.0)


@needs_lib
@pytest.mark.parametrize("num_items", [1.0, 7.0, 1000.0])
def test_num_items(num_items):
    rng = np.random.default_rng(13)
    hs, ws, ht, wt = make_inputs(rng, n=9)
    labels = rng.integers(0, 61, size=9)
    labels[2] = -100
    run_and_check(hs, ws, ht, wt, labels=labels, num_items=num_items)


@needs_lib
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.7])
@pytest.mark.parametrize("logit_scale", [1.0, 0.125, 3.0])
@pytest.mark.parametrize("softcap", [None, 30.0, 1.5])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_temperature_scale_softcap(temperature, logit_scale, softcap, kind, beta):
    rng = np.random.default_rng(14)
    run_and_check(*make_inputs(rng, n=11), kind=kind, beta=beta, temperature=temperature,
                  logit_scale=logit_scale, softcap=softcap)


@needs_lib
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 22, 23, 24, 1000])
def test_chunk_rows(dtype, chunk_rows):
    """Chunks that do not divide N (23) give the reference, and the result of one chunk."""
    rng = np.random.default_rng(15)
    hs, ws, ht, wt = make_inputs(rng, n=23, dtype=DTYPES[dtype])
    labels = rng.integers(0, 61, size=23)
    labels[[0, 7, 8, 22]] = -100
    kw = dict(kind="jsd", beta=0.4, labels=labels, softcap=2.0, logit_scale=0.9)
    run_and_check(hs, ws, ht, wt, chunk_rows=chunk_rows, **kw)
    one = dk.fused_linear_divergence(hs, ws, ht, wt, chunk_rows=23, grad_dtype="float32", **kw)
    r32 = dk.fused_linear_divergence(hs, ws, ht, wt, chunk_rows=chunk_rows, grad_dtype="float32",
                                     **kw)
    assert abs(r32.loss - one.loss) <= 1e-6 * abs(one.loss)
    assert rel_err(r32.per_token, one.per_token) <= 1e-6
    assert rel_err(r32.grad_hidden, one.grad_hidden) <= 1e-6
    assert rel_err(r32.grad_weight, one.grad_weight) <= 1e-6


@needs_lib
def test_chunk_rows_reach_the_library(monkeypatch):
    """Results do not depend on the chunking, so only the call shows that chunk_rows is passed
    on (0: the library chooses)."""
    seen = []
    real = _lib.fused_call

    def spy(handle, args, params, *rest):
        seen.append(params.chunk_rows)
        return real(handle, args, params, *rest)

    monkeypatch.setattr(_lib, "fused_call", spy)
    hs, ws, ht, wt = make_inputs(np.random.default_rng(23), n=9)
    for chunk_rows in (None, 1, 4, 9, 100):
        dk.fused_linear_divergence(hs, ws, ht, wt, chunk_rows=chunk_rows)
    assert seen == [0, 1, 4, 9, 100]


@needs_lib
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_teacher_hidden_size_differs(dtype):
    rng = np.random.default_rng(16)
    run_and_check(*make_inputs(rng, n=13, h=16, ht=24, v=50, dtype=DTYPES[dtype]),
                  kind="forward_kl", chunk_rows=5)


@needs_lib
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_self_distillation_same_weight(dtype):
    """teacher_weight is student_weight (one array); the teacher side gets no gradient."""
    rng = np.random.default_rng(17)
    hs, ws, ht, _ = make_inputs(rng, n=17, dtype=DTYPES[dtype])
    r = run_and_check(hs, ws, ht, ws, kind="jsd", beta=0.5, chunk_rows=6, softcap=3.0)
    assert r.loss > 0
    # Same hidden states too: loss 0, gradients 0.
    r = dk.fused_linear_divergence(hs, ws, hs, ws, kind="jsd")
    assert abs(r.loss) < 1e-6
    assert np.abs(r.grad_weight.astype(np.float64)).max() < 1e-6


@needs_lib
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_grad_dtype_float32(dtype):
    rng = np.random.default_rng(18)
    d = DTYPES[dtype]
    hs, ws, ht, wt = make_inputs(rng, dtype=d)
    r = run_and_check(hs, ws, ht, wt, grad_dtype="float32", chunk_rows=5)
    assert r.grad_hidden.dtype == F32 and r.grad_weight.dtype == F32
    r2 = run_and_check(hs, ws, ht, wt, grad_dtype=np.float32)
    assert r2.grad_weight.dtype == F32
    # The input dtype by name is the default.
    r3 = dk.fused_linear_divergence(hs, ws, ht, wt, grad_dtype=d)
    assert r3.grad_weight.dtype == d


@needs_lib
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_forward_only(dtype):
    rng = np.random.default_rng(19)
    r = run_and_check(*make_inputs(rng, dtype=DTYPES[dtype]), grad=False, chunk_rows=3)
    assert r.grad_hidden is None and r.grad_weight is None


@needs_lib
@pytest.mark.parametrize("dtype,buf", [("f32", "f32"), ("bf16", "bf16"), ("bf16", "f32"),
                                       ("f16", "f16"), ("f16", "f32")])
def test_accumulate_into_buffers(dtype, buf):
    rng = np.random.default_rng(20)
    d, bd = DTYPES[dtype], DTYPES[buf]
    hs, ws, ht, wt = make_inputs(rng, dtype=d)
    kw = dict(kind="jsd", beta=0.3, softcap=4.0, chunk_rows=6)
    _, _, gh_ref, gw_ref = reference(hs, ws, ht, wt, kind="jsd", beta=0.3, softcap=4.0)
    gh0 = (rng.standard_normal(hs.shape) * 0.01).astype(bd)
    gw0 = (rng.standard_normal(ws.shape) * 0.01).astype(bd)
    gh, gw = gh0.copy(), gw0.copy()
    tol = 1e-5 if d == F32 else 1e-2  # DESIGN.md: the inputs' precision sets the tolerance
    r = dk.fused_linear_divergence(hs, ws, ht, wt, grad_hidden_out=gh, grad_weight_out=gw, **kw)
    assert r.grad_hidden is gh and r.grad_weight is gw
    assert rel_err(gh, gh0.astype(np.float64) + gh_ref) <= tol
    assert rel_err(gw, gw0.astype(np.float64) + gw_ref) <= tol
    # Twice more: the buffers hold the sum of three micro-batches.
    for _ in range(2):
        dk.fused_linear_divergence(hs, ws, ht, wt, grad_hidden_out=gh, grad_weight_out=gw, **kw)
    assert rel_err(gh, gh0.astype(np.float64) + 3 * gh_ref) <= tol
    assert rel_err(gw, gw0.astype(np.float64) + 3 * gw_ref) <= tol


@needs_lib
def test_accumulate_one_buffer_and_strided_buffers():
    rng = np.random.default_rng(21)
    hs, ws, ht, wt = make_inputs(rng)
    _, _, gh_ref, gw_ref = reference(hs, ws, ht, wt)
    # Only the weight buffer: the hidden gradient comes back fresh.
    gw0 = rng.standard_normal(ws.shape).astype(F32)
    gw = gw0.copy()
    r = dk.fused_linear_divergence(hs, ws, ht, wt, grad_weight_out=gw)
    assert r.grad_weight is gw
    assert rel_err(gw, gw0 + gw_ref) <= 1e-5
    assert rel_err(r.grad_hidden, gh_ref) <= 1e-5
    # Row-strided buffers (a view of a wider array) and a column-strided one (copied back).
    big = rng.standard_normal((hs.shape[0], hs.shape[1] + 5)).astype(F32)
    big0 = big.copy()
    gcols = np.asfortranarray(rng.standard_normal(ws.shape).astype(F32))
    gcols0 = gcols.copy()
    dk.fused_linear_divergence(hs, ws, ht, wt, grad_hidden_out=big[:, 2:2 + hs.shape[1]],
                               grad_weight_out=gcols)
    assert rel_err(big[:, 2:2 + hs.shape[1]], big0[:, 2:2 + hs.shape[1]] + gh_ref) <= 1e-5
    np.testing.assert_array_equal(big[:, :2], big0[:, :2])
    np.testing.assert_array_equal(big[:, 2 + hs.shape[1]:], big0[:, 2 + hs.shape[1]:])
    assert rel_err(gcols, gcols0 + gw_ref) <= 1e-5


@needs_lib
def test_one_row_buffer_with_strided_elements():
    # One row whose elements are not adjacent (every other column of a wider array, and a
    # reversed row): written through a copy, never as H contiguous values from its start.
    rng = np.random.default_rng(23)
    hs, ws, ht, wt = make_inputs(rng, n=1, h=16, v=50)
    _, _, gh_ref, _ = reference(hs, ws, ht, wt)
    big = rng.standard_normal((1, 32)).astype(F32)
    big0 = big.copy()
    dk.fused_linear_divergence(hs, ws, ht, wt, grad_hidden_out=big[:, ::2])
    assert rel_err(big[:, ::2], big0[:, ::2] + gh_ref) <= 1e-5
    np.testing.assert_array_equal(big[:, 1::2], big0[:, 1::2])
    parent = rng.standard_normal(48).astype(F32)
    parent0 = parent.copy()
    rev = parent[16:32][::-1].reshape(1, 16)
    dk.fused_linear_divergence(hs, ws, ht, wt, grad_hidden_out=rev)
    assert rel_err(rev, parent0[16:32][::-1].reshape(1, 16) + gh_ref) <= 1e-5
    np.testing.assert_array_equal(parent[:16], parent0[:16])
    np.testing.assert_array_equal(parent[32:], parent0[32:])


@needs_lib
def test_strided_inputs_and_leading_axes():
    rng = np.random.default_rng(22)
    hs, ws, ht, wt = make_inputs(rng, n=12, h=16, v=40)
    wide = np.concatenate([ws, ws[:, :3]], axis=1)[:, :16]  # row stride 19
    run_and_check(hs[::1], wide, ht.T.copy().T, wt, chunk_rows=5)
    # [B, T, H] hidden states: per_token [B, T], grad_hidden [B, T, H], labels [B, T].
    h3, t3 = hs.reshape(3, 4, 16), ht.reshape(3, 4, 16)
    labels = rng.integers(0, 40, size=(3, 4))
    labels[1, 2] = -100
    r = run_and_check(h3, ws, t3, wt, labels=labels, chunk_rows=5)
    assert r.per_token.shape == (3, 4) and r.grad_hidden.shape == (3, 4, 16)
    assert r.per_token[1, 2] == 0.0
    # Labels flattened to [N] name the same rows (row-major); a wrong count or shape is refused.
    flat = dk.fused_linear_divergence(h3, ws, t3, wt, labels=labels.reshape(12), chunk_rows=5)
    for got, want in ((flat.loss, r.loss), (flat.per_token, r.per_token),
                      (flat.grad_hidden, r.grad_hidden), (flat.grad_weight, r.grad_weight)):
        np.testing.assert_array_equal(got, want)
    for bad in (labels.reshape(4, 3), labels.reshape(12)[:-1]):
        with pytest.raises(ValueError, match=r"labels must have shape \(3, 4\) or \(12,\)"):
            dk.fused_linear_divergence(h3, ws, t3, wt, labels=bad)


@needs_lib
@pytest.mark.parametrize("dtype", [F32, np.float16])
def test_byte_swapped_inputs_and_buffers(dtype):
    # Big-endian arrays are copied to native order; the gradients were once allocated in the
    # inputs' byte-swapped dtype and filled with native bytes (garbage values, no error).
    rng = np.random.default_rng(23)
    hs, ws, ht, wt = make_inputs(rng, n=7, h=16, v=29, dtype=dtype)
    native = dk.fused_linear_divergence(hs, ws, ht, wt, chunk_rows=3)
    swap = [a.astype(a.dtype.newbyteorder(">")) for a in (hs, ws, ht, wt)]
    got = dk.fused_linear_divergence(*swap, chunk_rows=3)
    assert got.loss == native.loss
    for name in ("per_token", "grad_hidden", "grad_weight"):
        a, b = getattr(got, name), getattr(native, name)
        assert a.dtype == b.dtype and a.dtype.isnative, name
        assert np.array_equal(a, b), name
    # Mixed byte orders are one dtype; byte-swapped accumulation buffers are written through.
    gh = np.zeros(hs.shape, np.dtype(np.float32).newbyteorder(">"))
    gw = np.zeros(ws.shape, np.dtype(np.float32).newbyteorder(">"))
    r = dk.fused_linear_divergence(hs, swap[1], ht, wt, chunk_rows=3, grad_hidden_out=gh,
                                   grad_weight_out=gw)
    assert r.grad_hidden is gh and r.grad_weight is gw
    ref = dk.fused_linear_divergence(hs, ws, ht, wt, chunk_rows=3, grad_dtype="float32")
    assert np.array_equal(gh, ref.grad_hidden) and np.array_equal(gw, ref.grad_weight)


@needs_lib
def test_one_row_and_tiny_shapes():
    rng = np.random.default_rng(23)
    run_and_check(*make_inputs(rng, n=1, h=3, v=2))
    run_and_check(*make_inputs(rng, n=5, h=1, v=1))  # V = 1: loss 0, gradients 0
    run_and_check(*make_inputs(rng, n=2, h=8, v=1000), chunk_rows=1)


@needs_lib
def test_deterministic():
    rng = np.random.default_rng(24)
    inp = make_inputs(rng, n=29, dtype=BF16)
    a = dk.fused_linear_divergence(*inp, chunk_rows=4)
    b = dk.fused_linear_divergence(*inp, chunk_rows=4)
    assert a.loss == b.loss
    for x, y in ((a.per_token, b.per_token), (a.grad_hidden, b.grad_hidden),
                 (a.grad_weight, b.grad_weight)):
        assert x.tobytes() == y.tobytes()


@needs_lib
def test_matches_divergence_on_materialised_logits():
    """The fused result equals dk.divergence on the logits the reference materialises."""
    rng = np.random.default_rng(25)
    hs, ws, ht, wt = make_inputs(rng, n=10)
    zs = (hs.astype(np.float64) @ ws.T.astype(np.float64)).astype(F32)
    zt = (ht.astype(np.float64) @ wt.T.astype(np.float64)).astype(F32)
    d = dk.divergence(zs, zt, kind="reverse_kl")
    r = dk.fused_linear_divergence(hs, ws, ht, wt, kind="reverse_kl")
    assert abs(r.loss - d.loss) <= 1e-5 * abs(d.loss)
    assert rel_err(r.grad_hidden, d.grad.astype(np.float64) @ ws.astype(np.float64)) <= 1e-5


# ---- bad input ----------------------------------------------------------------------------------


def _bad_cases(hs, ws, ht, wt):
    f64 = hs.astype(np.float64)
    yield "float64 inputs", (f64, ws, ht, wt), {}, TypeError
    other = F32 if hs.dtype != F32 else BF16
    yield "mixed dtypes (weight)", (hs, ws.astype(other), ht, wt), {}, TypeError
    yield "mixed dtypes (teacher)", (hs, ws, ht.astype(other), wt.astype(other)), {}, TypeError
    yield "int inputs", (hs.astype(np.int32), ws, ht, wt), {}, TypeError
    yield "1-D hidden", (hs[0], ws, ht[0], wt), {}, ValueError
    yield "3-D weight", (hs, ws[None], ht, wt), {}, ValueError
    yield "H mismatch", (hs, ws[:, :-1], ht, wt), {}, ValueError
    yield "V mismatch", (hs, ws, ht, wt[:-1]), {}, ValueError
    yield "Ht mismatch", (hs, ws, ht[:, :-1], wt), {}, ValueError
    yield "N mismatch", (hs, ws, ht[:-1], wt), {}, ValueError
    yield "empty vocabulary", (hs, ws[:0], ht, wt[:0]), {}, ValueError
    yield "empty hidden size", (hs[:, :0], ws[:, :0], ht, wt), {}, ValueError
    yield "not an array", ("x", ws, ht, wt), {}, TypeError
    n = hs.shape[0]
    for kw, exc in [
        (dict(kind="kl"), ValueError),
        (dict(beta=1.5), ValueError),
        (dict(temperature=0.0), ValueError),
        (dict(temperature=float("nan")), ValueError),
        (dict(reduction="mean"), ValueError),
        (dict(num_items=0), ValueError),
        (dict(num_items=3, reduction="sum"), ValueError),
        (dict(logit_scale=0.0), ValueError),
        (dict(logit_scale=-1.0), ValueError),
        (dict(logit_scale=float("inf")), ValueError),
        (dict(logit_scale="1"), TypeError),
        (dict(softcap=0.0), ValueError),
        (dict(softcap=-3.0), ValueError),
        (dict(softcap=float("nan")), ValueError),
        (dict(chunk_rows=0), ValueError),
        (dict(chunk_rows=-2), ValueError),
        (dict(chunk_rows=2.5), TypeError),
        (dict(grad="yes"), TypeError),
        (dict(grad_dtype="float64"), ValueError),
        (dict(grad_dtype="float16"), ValueError),
        (dict(labels=np.zeros(n + 1, np.int64)), ValueError),
        (dict(labels=np.zeros(n, np.float32)), TypeError),
        (dict(ignore_index=1.5), TypeError),
        (dict(grad_weight_out=np.zeros(ws.shape, F32), grad=False), ValueError),
        (dict(grad_weight_out=np.zeros((ws.shape[0] + 1, ws.shape[1]), F32)), ValueError),
        (dict(grad_hidden_out=np.zeros(hs.shape, np.float64)), TypeError),
        (dict(grad_hidden_out=np.zeros(hs.shape, F16)), TypeError),
        (dict(grad_hidden_out=np.zeros(hs.shape, F32), grad_dtype=hs.dtype),
         ValueError if hs.dtype != F32 else None),
        (dict(grad_weight_out=[[0.0]]), TypeError),
    ]:
        if exc is not None:
            yield f"{kw}", (hs, ws, ht, wt), kw, exc


@needs_lib
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_bad_input_raises_and_touches_nothing(dtype):
    rng = np.random.default_rng(30)
    hs, ws, ht, wt = make_inputs(rng, n=7, h=8, v=11, dtype=DTYPES[dtype])
    copies = [a.copy() for a in (hs, ws, ht, wt)]
    for what, arrays, kw, exc in _bad_cases(hs, ws, ht, wt):
        outs = {k: v for k, v in kw.items() if k.endswith("_out") and isinstance(v, np.ndarray)}
        out_copies = {k: v.copy() for k, v in outs.items()}
        with pytest.raises(exc):
            dk.fused_linear_divergence(*arrays, **kw)
        for a, c in zip((hs, ws, ht, wt), copies):
            np.testing.assert_array_equal(a, c, err_msg=what)
        for k, v in outs.items():
            np.testing.assert_array_equal(v, out_copies[k], err_msg=what)


@needs_lib
def test_bad_output_buffers_raise_and_touch_nothing():
    rng = np.random.default_rng(31)
    hs, ws, ht, wt = make_inputs(rng, n=7, h=8, v=11)
    gw = rng.standard_normal(ws.shape).astype(F32)
    gw.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        dk.fused_linear_divergence(hs, ws, ht, wt, grad_weight_out=gw)
    # A buffer overlapping an input.
    ws_copy = ws.copy()
    with pytest.raises(ValueError, match="overlaps"):
        dk.fused_linear_divergence(hs, ws, ht, wt, grad_weight_out=ws)
    np.testing.assert_array_equal(ws, ws_copy)
    buf = rng.standard_normal(hs.size + ws.size).astype(F32)
    buf0 = buf.copy()
    gh = buf[: hs.size].reshape(hs.shape)
    gw = buf[hs.size - 8 : hs.size - 8 + ws.size].reshape(ws.shape)  # shares 8 elements with gh
    with pytest.raises(ValueError, match="overlap"):
        dk.fused_linear_divergence(hs, ws, ht, wt, grad_hidden_out=gh, grad_weight_out=gw)
    np.testing.assert_array_equal(buf, buf0)
    # A buffer whose rows are one another (stride 0) or overlap: the accumulated rows would
    # land on each other.
    row = rng.standard_normal(hs.shape[1]).astype(F32)
    row0 = row.copy()
    same_rows = np.lib.stride_tricks.as_strided(row, hs.shape, (0, 4))
    half_rows = np.lib.stride_tricks.as_strided(buf, hs.shape, (16, 4))  # rows 4 floats apart
    for bad in (same_rows, half_rows):
        with pytest.raises(ValueError, match="overlapping elements"):
            dk.fused_linear_divergence(hs, ws, ht, wt, grad_hidden_out=bad)
    with pytest.raises(TypeError, match="masked array"):
        dk.fused_linear_divergence(hs, ws, ht, wt, grad_hidden_out=np.ma.masked_array(
            np.zeros(hs.shape, F32)))
    np.testing.assert_array_equal(row, row0)
    np.testing.assert_array_equal(buf, buf0)


def test_missing_symbols_are_reported_clearly():
    """Without the fused symbols (an older library) the call raises LibraryNotFoundError, and
    the divergence keeps working; with them, fused_lib() is the library."""
    if _MISSING:
        rng = np.random.default_rng(32)
        with pytest.raises(dk.LibraryNotFoundError, match="dk_fused_linear"):
            dk.fused_linear_divergence(*make_inputs(rng, n=2, h=2, v=3))
    else:
        assert _lib.fused_lib() is _lib.lib()
    p = _lib.make_fused_params("jsd", 0.5, 1.0, -100, "batchmean", None, 2.0, 30.0, 7, True)
    assert (p.divergence.kind, p.logit_scale, p.softcap, p.chunk_rows, p.accumulate) == (
        2, 2.0, 30.0, 7, 1)
    p = _lib.make_fused_params("forward_kl", 0.5, 1.0, -100, "sum", None, 1.0, None, None, False)
    assert (p.softcap, p.chunk_rows, p.accumulate) == (0.0, 0, 0)


def test_an_empty_batch_is_a_zero_loss_and_a_zero_weight_gradient():
    rng = np.random.default_rng(4)
    hs = np.ones((0, 16), np.float32)
    ws = rng.standard_normal((40, 16)).astype(np.float32)
    r = dk.fused_linear_divergence(hs, ws, hs, ws)
    assert r.loss == 0.0 and r.per_token.shape == (0,) and r.grad_hidden.shape == (0, 16)
    assert r.grad_weight.shape == (40, 16) and not r.grad_weight.any()
    # Accumulating: the buffer keeps its values (the gradient of no rows is 0).
    acc = rng.standard_normal((40, 16)).astype(np.float32)
    before = acc.copy()
    dk.fused_linear_divergence(hs, ws, hs, ws, grad_weight_out=acc)
    assert np.array_equal(acc, before)
