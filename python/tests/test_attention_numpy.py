"""distill_kernels attention (numpy, CPU backend) against an independent float64 reference.

The reference below is written from the semantics in DESIGN.md ("Grouped-query attention") and
the header (include/distill_kernels.h) with plain numpy: K / V heads expanded to the query heads,
the full score matrix, a boolean bottom-right causal mask, a masked softmax; it never calls the
library. Every library call runs with its outputs poisoned first (NaN), so unwritten elements show
up. The backward is also checked against central finite differences on a tiny float32 case.
"""

from __future__ import annotations

import ctypes
import importlib
import zlib

import ml_dtypes
import numpy as np
import pytest

import distill_kernels as dk
from distill_kernels import _lib

dk_attention_module = importlib.import_module("distill_kernels.attention")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
DTYPES = {"f32": F32, "f16": F16, "bf16": BF16}
# ‖out − ref‖ / ‖ref‖ bounds of DESIGN.md ("Numerics and tests").
TOL = {"f32": 1e-5, "f16": 1e-2, "bf16": 1e-2}


def _attention_available():
    try:
        _lib.attention_lib()
        return None
    except Exception as e:  # noqa: BLE001
        return str(e)


_MISSING = _attention_available()
pytestmark = pytest.mark.skipif(
    _MISSING is not None, reason=f"the library has no attention yet: {_MISSING}"
)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(dk_attention_module, "_POISON", True)


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(rng, shape, dtype, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---- independent float64 reference -----------------------------------------------------------


def ref_sequence(q, k, v, causal, scale, dout=None):
    """One sequence: q [Sq, Hq, D], k / v [Sk, Hkv, D] (any float dtype, widened to float64).

    Returns (out [Sq, Hq, D], lse [Hq, Sq]) and, with dout, also (dq, dk, dv)."""
    q, k, v = (np.asarray(x).astype(np.float64) for x in (q, k, v))
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    g = hq // hkv
    ke = np.repeat(k, g, axis=1)  # [Sk, Hq, D]: query head h reads KV head h // g
    ve = np.repeat(v, g, axis=1)
    s = np.einsum("ihd,jhd->hij", q, ke) * scale
    allowed = np.ones((sq, sk), dtype=bool)
    if causal:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        allowed = j <= i + sk - sq  # bottom-right aligned
    s = np.where(allowed[None], s, -np.inf)
    m = s.max(axis=2, initial=-np.inf, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.where(allowed[None], np.exp(s - m_safe), 0.0)
    z = e.sum(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = np.where(z > 0, np.log(np.where(z > 0, z, 1.0)) + m_safe, -np.inf)[..., 0]
    p = np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0)  # [Hq, Sq, Sk]
    out = np.einsum("hij,jhd->ihd", p, ve)
    if dout is None:
        return out, lse
    do = np.asarray(dout).astype(np.float64)
    dp = np.einsum("ihd,jhd->hij", do, ve)
    delta = np.einsum("ihd,ihd->hi", do, out)[..., None]
    ds = p * (dp - delta)
    dq = np.einsum("hij,jhd->ihd", ds, ke) * scale
    dke = np.einsum("hij,ihd->jhd", ds, q) * scale
    dve = np.einsum("hij,ihd->jhd", p, do)
    dk_ = dke.reshape(sk, hkv, g, d).sum(axis=2)
    dv_ = dve.reshape(sk, hkv, g, d).sum(axis=2)
    return out, lse, dq, dk_, dv_


def ref_attention(q, k, v, *, causal=False, scale=None, cu_q=None, cu_k=None, dout=None):
    """The whole batch, in the layouts of the library: padded [B, S, H, D] (lse [B, Hq, Sq]) or
    packed [T, H, D] with offsets (lse [Hq, Tq])."""
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else float(np.float32(scale))
    if cu_q is None:
        seqs = [(q[b], k[b], v[b], None if dout is None else dout[b]) for b in range(q.shape[0])]
    else:
        seqs = [
            (q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]],
             None if dout is None else dout[cu_q[b]:cu_q[b + 1]])
            for b in range(len(cu_q) - 1)
        ]
    res = [ref_sequence(a, b_, c, causal, scale, g) for a, b_, c, g in seqs]
    if cu_q is None:
        stack = [np.stack([r[i] for r in res]) if res else None for i in range(len(res[0]))]
        return stack  # out [B,Sq,Hq,D], lse [B,Hq,Sq], (dq, dk, dv)
    hq = q.shape[1]
    out = np.concatenate([r[0] for r in res], axis=0) if res else np.zeros(q.shape)
    lse = np.concatenate([r[1] for r in res], axis=1) if res else np.zeros((hq, 0))
    if dout is None:
        return out, lse
    dq = np.concatenate([r[2] for r in res], axis=0)
    dk_ = np.concatenate([r[3] for r in res], axis=0)
    dv_ = np.concatenate([r[4] for r in res], axis=0)
    return out, lse, dq, dk_, dv_


def rel_err(got, ref) -> float:
    got = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    assert not np.isnan(got).any(), "NaN in the output (unwritten or computed)"
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (den if den > 0 else 1.0))


def check_forward(res, ref_out, ref_lse, tol):
    out, lse = res.out, res.lse
    assert lse.dtype == np.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    masked = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), masked), "lse = -inf exactly for rows seeing no key"
    assert not np.isnan(lse).any()
    fin = ~masked
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-5, atol=1e-5)
    # Rows that see no key output exactly 0.
    o = out.astype(np.float64)
    if ref_lse.ndim == 3:  # [B, Hq, Sq] -> out [B, Sq, Hq, D]
        m = np.transpose(masked, (0, 2, 1))
    else:  # [Hq, Tq] -> out [Tq, Hq, D]
        m = masked.T
    assert np.all(o[m] == 0.0), "rows that see no key must output 0"
    assert rel_err(out, ref_out) <= tol, rel_err(out, ref_out)


# ---- the C ABI's defaults -----------------------------------------------------------------------


def test_params_default_matches_the_header():
    p = _lib.attention_lib().dk_attention_params_default()
    assert (p.heads_q, p.heads_kv, p.head_dim) == (1, 1, 128)
    assert p.causal == 0 and p.softmax_scale == 0.0 and p.deterministic == 1
    assert ctypes.sizeof(_lib.AttentionArgs) == 136
    assert ctypes.sizeof(_lib.AttentionBackwardArgs) == 200


# ---- forward, padded -----------------------------------------------------------------------------

# (Sq, Sk): Sq < Sk, Sq = Sk, Sq > Sk (causal: the first Sq - Sk rows see no key).
SEQ_SHAPES = [(7, 19), (13, 13), (21, 6)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", SEQ_SHAPES)
def test_forward_padded(dtype, d, group, causal, sq, sk):
    rng = rng_for("fwd", dtype, d, group, causal, sq, sk)
    b, hkv = 2, 2
    hq = hkv * group
    dt = DTYPES[dtype]
    q = randn(rng, (b, sq, hq, d), dt)
    k = randn(rng, (b, sk, hkv, d), dt)
    v = randn(rng, (b, sk, hkv, d), dt)
    res = dk.attention(q, k, v, causal=causal)
    assert res.out.dtype == dt and res.out.shape == q.shape
    assert res.lse.shape == (b, hq, sq)
    ref_out, ref_lse = ref_attention(q, k, v, causal=causal)
    check_forward(res, ref_out, ref_lse, TOL[dtype])
    if causal and sq > sk:
        assert np.isneginf(res.lse[:, :, : sq - sk]).all()


@pytest.mark.parametrize("sq,sk,causal", [(1, 1, False), (1, 1, True), (1, 9, True),
                                          (9, 1, True), (1, 9, False)])
def test_forward_length_one(sq, sk, causal):
    rng = rng_for("len1", sq, sk, causal)
    q = randn(rng, (3, sq, 4, 64), BF16)
    k = randn(rng, (3, sk, 2, 64), BF16)
    v = randn(rng, (3, sk, 2, 64), BF16)
    res = dk.attention(q, k, v, causal=causal)
    check_forward(res, *ref_attention(q, k, v, causal=causal), TOL["bf16"])
    if sk == 1 and not (causal and sq > 1):
        # One key: the softmax is 1, out is that value row exactly (bf16 round trip).
        want = np.repeat(v.astype(np.float64), 2, axis=2)
        np.testing.assert_array_equal(res.out.astype(np.float64)[:, -1:], want)


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_custom_scale(scale):
    rng = rng_for("scale", scale)
    q = randn(rng, (2, 11, 6, 128), F32)
    k = randn(rng, (2, 17, 3, 128), F32)
    v = randn(rng, (2, 17, 3, 128), F32)
    res = dk.attention(q, k, v, causal=True, softmax_scale=scale)
    check_forward(res, *ref_attention(q, k, v, causal=True, scale=scale), TOL["f32"])
    default = dk.attention(q, k, v, causal=True, softmax_scale=None)
    explicit = dk.attention(q, k, v, causal=True, softmax_scale=1.0 / np.sqrt(128))
    np.testing.assert_allclose(default.out, explicit.out, rtol=1e-6, atol=1e-7)


def test_large_scores_do_not_overflow():
    """Scores far beyond exp's range: the online softmax must subtract the row maximum."""
    rng = rng_for("big")
    q = randn(rng, (1, 9, 2, 64), F32, scale=30.0)
    k = randn(rng, (1, 9, 2, 64), F32, scale=30.0)
    v = randn(rng, (1, 9, 2, 64), F32)
    res = dk.attention(q, k, v, causal=True)
    assert np.isfinite(res.out).all() and np.isfinite(res.lse).all()
    check_forward(res, *ref_attention(q, k, v, causal=True), TOL["f32"])


# ---- forward, packed variable-length ------------------------------------------------------------

VARLEN_CASES = {
    # (query lengths, key lengths): uneven, empty query / key sequences, Sq > Sk and Sq < Sk.
    "uneven": ([5, 17, 1, 9], [5, 20, 3, 9]),
    "empty": ([0, 6, 4, 0, 3], [4, 6, 0, 0, 8]),
    "single": ([13], [7]),
    "none": ([], []),
}


@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("group", [1, 3])
def test_forward_varlen(case, causal, dtype, group):
    lq, lk = VARLEN_CASES[case]
    rng = rng_for("varlen", case, causal, dtype, group)
    cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    hkv, d = 2, 64
    hq = hkv * group
    dt = DTYPES[dtype]
    q = randn(rng, (int(cu_q[-1]), hq, d), dt)
    k = randn(rng, (int(cu_k[-1]), hkv, d), dt)
    v = randn(rng, (int(cu_k[-1]), hkv, d), dt)
    res = dk.attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert res.out.shape == q.shape and res.lse.shape == (hq, q.shape[0])
    ref_out, ref_lse = ref_attention(q, k, v, causal=causal, cu_q=cu_q, cu_k=cu_k)
    check_forward(res, ref_out, ref_lse, TOL[dtype])
    # A query sequence whose key sequence is empty sees nothing: lse -inf, out 0.
    for b in range(len(lq)):
        if lk[b] == 0 and lq[b] > 0:
            assert np.isneginf(res.lse[:, cu_q[b]:cu_q[b + 1]]).all()
            assert (res.out[cu_q[b]:cu_q[b + 1]].astype(np.float64) == 0).all()


def test_varlen_matches_padded_per_sequence():
    rng = rng_for("varlen-vs-padded")
    lq, lk = [3, 11, 6], [8, 11, 2]
    cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    q = randn(rng, (20, 8, 128), BF16)
    k = randn(rng, (21, 1, 128), BF16)
    v = randn(rng, (21, 1, 128), BF16)
    packed = dk.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        one = dk.attention(q[None, qs], k[None, ks], v[None, ks], causal=True)
        np.testing.assert_array_equal(one.out[0], packed.out[qs])
        np.testing.assert_array_equal(one.lse[0], packed.lse[:, qs])


def test_cu_seqlens_int64_is_accepted():
    rng = rng_for("int64")
    q = randn(rng, (9, 2, 64), F16)
    k = randn(rng, (9, 2, 64), F16)
    v = randn(rng, (9, 2, 64), F16)
    cu = np.array([0, 4, 9], dtype=np.int64)
    a = dk.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    b = dk.attention(q, k, v, cu_seqlens_q=cu.astype(np.int32), cu_seqlens_k=cu.astype(np.int32))
    np.testing.assert_array_equal(a.out, b.out)


# ---- layouts: strided token rows read in place, others copied -----------------------------------


def test_qkv_slices_are_read_without_a_copy(monkeypatch):
    rng = rng_for("qkv")
    b, s, hq, hkv, d = 2, 10, 6, 2, 64
    qkv = randn(rng, (b, s, hq + 2 * hkv, d), BF16)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    seen = []
    real = dk_attention_module._token_rows

    def spy(a):
        r = real(a)
        seen.append((np.shares_memory(r[0], qkv), r[1]))
        return r

    monkeypatch.setattr(dk_attention_module, "_token_rows", spy)
    res = dk.attention(q, k, v, causal=True)
    assert seen == [(True, (hq + 2 * hkv) * d)] * 3, seen
    ref = dk.attention(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
                       causal=True)
    np.testing.assert_array_equal(res.out, ref.out)
    np.testing.assert_array_equal(res.lse, ref.lse)
    # Packed rows sliced out of a wider buffer work the same way.
    flat = qkv.reshape(b * s, hq + 2 * hkv, d)
    cu = np.array([0, 7, 20], dtype=np.int32)
    r2 = dk.attention(flat[:, :hq], flat[:, hq:hq + hkv], flat[:, hq + hkv:], cu_seqlens_q=cu,
                      cu_seqlens_k=cu)
    check_forward(r2, *ref_attention(flat[:, :hq], flat[:, hq:hq + hkv], flat[:, hq + hkv:],
                                     cu_q=cu, cu_k=cu), TOL["bf16"])


def test_other_layouts_are_copied():
    rng = rng_for("layouts")
    q = randn(rng, (2, 5, 4, 64), F32)
    k = randn(rng, (2, 7, 2, 64), F32)
    v = randn(rng, (2, 7, 2, 64), F32)
    want = dk.attention(q, k, v)
    # heads-major storage ([B, H, S, D] transposed to [B, S, H, D]): heads not D apart -> copy
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    # batch axis not stepping over whole sequences
    kb = np.ascontiguousarray(k.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    # byte-swapped
    vs = v.astype(v.dtype.newbyteorder(">"))
    # misaligned base (offset by 4 bytes)
    buf = np.empty(v.size + 1, dtype=F32)
    vm = buf[1:].reshape(v.shape)
    vm[...] = v
    for args in ((qt, k, v), (q, kb, v), (q, k, vs), (q, k, vm)):
        got = dk.attention(*args)
        np.testing.assert_array_equal(got.out, want.out)
        np.testing.assert_array_equal(got.lse, want.lse)
    # inputs are never written
    np.testing.assert_array_equal(vm, v)


# ---- backward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("causal,sq,sk", [(False, 9, 14), (True, 9, 14), (True, 14, 9),
                                          (True, 12, 12)])
@pytest.mark.parametrize("d", [64, 128])
def test_backward_padded(dtype, group, causal, sq, sk, d):
    rng = rng_for("bwd", dtype, group, causal, sq, sk, d)
    b, hkv = 2, 1 if group == 8 else 2
    hq = hkv * group
    dt = DTYPES[dtype]
    q = randn(rng, (b, sq, hq, d), dt)
    k = randn(rng, (b, sk, hkv, d), dt)
    v = randn(rng, (b, sk, hkv, d), dt)
    do = randn(rng, (b, sq, hq, d), dt)
    fwd = dk.attention(q, k, v, causal=causal)
    dq, dk_, dv = dk.attention_backward(do, q, k, v, fwd.out, fwd.lse, causal=causal)
    for got, like in ((dq, q), (dk_, k), (dv, v)):
        assert got.shape == like.shape and got.dtype == dt
    _, _, rdq, rdk, rdv = ref_attention(q, k, v, causal=causal, dout=do)
    for name, got, ref in (("dq", dq, rdq), ("dk", dk_, rdk), ("dv", dv, rdv)):
        assert rel_err(got, ref) <= TOL[dtype], (name, rel_err(got, ref))
    if causal and sq > sk:
        # Rows that see no key have no gradient.
        assert (dq[:, : sq - sk].astype(np.float64) == 0).all()


@pytest.mark.parametrize("case", ["uneven", "empty"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_varlen(case, causal):
    lq, lk = VARLEN_CASES[case]
    rng = rng_for("bwd-varlen", case, causal)
    cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    hq, hkv, d = 6, 2, 128
    q = randn(rng, (int(cu_q[-1]), hq, d), BF16)
    k = randn(rng, (int(cu_k[-1]), hkv, d), BF16)
    v = randn(rng, (int(cu_k[-1]), hkv, d), BF16)
    do = randn(rng, q.shape, BF16)
    kw = dict(causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    fwd = dk.attention(q, k, v, **kw)
    grads = dk.attention_backward(do, q, k, v, fwd.out, fwd.lse, **kw)
    _, _, *refs = ref_attention(q, k, v, causal=causal, cu_q=cu_q, cu_k=cu_k, dout=do)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert rel_err(got, ref) <= TOL["bf16"], (name, rel_err(got, ref))
    # Keys of a sequence without queries get no gradient.
    for b in range(len(lq)):
        if lq[b] == 0:
            ks = slice(cu_k[b], cu_k[b + 1])
            assert (grads[1][ks].astype(np.float64) == 0).all()
            assert (grads[2][ks].astype(np.float64) == 0).all()


def test_backward_is_deterministic_and_never_writes_its_inputs():
    rng = rng_for("det")
    q = randn(rng, (2, 15, 8, 64), BF16)
    k = randn(rng, (2, 15, 2, 64), BF16)
    v = randn(rng, (2, 15, 2, 64), BF16)
    do = randn(rng, q.shape, BF16)
    fwd = dk.attention(q, k, v, causal=True)
    copies = [x.copy() for x in (do, q, k, v, fwd.out, fwd.lse)]
    a = dk.attention_backward(do, q, k, v, fwd.out, fwd.lse, causal=True)
    b = dk.attention_backward(do, q, k, v, fwd.out, fwd.lse, causal=True, deterministic=False)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()
    for x, c in zip((do, q, k, v, fwd.out, fwd.lse), copies):
        assert x.tobytes() == c.tobytes()


def test_backward_against_finite_differences():
    """L = Σ g ∘ out; dL/dx from attention_backward(dout=g) against central differences of the
    float32 forward, on every input (a causal case with Sq > Sk, so one row sees no key)."""
    rng = rng_for("fd")
    sq, sk, hq, hkv, d = 4, 3, 2, 1, 64
    q = randn(rng, (1, sq, hq, d), F32, 0.5)
    k = randn(rng, (1, sk, hkv, d), F32, 0.5)
    v = randn(rng, (1, sk, hkv, d), F32)
    g = randn(rng, (1, sq, hq, d), F32)
    kw = dict(causal=True, softmax_scale=0.3)
    fwd = dk.attention(q, k, v, **kw)
    grads = dict(zip("qkv", dk.attention_backward(g, q, k, v, fwd.out, fwd.lse, **kw)))
    inputs = {"q": q, "k": k, "v": v}

    def loss(x):
        out = dk.attention(x["q"], x["k"], x["v"], **kw).out
        return float(np.sum(out.astype(np.float64) * g.astype(np.float64)))

    eps = 1e-2
    for name, x in inputs.items():
        flat = rng.choice(x.size, size=16, replace=False)
        for idx in flat:
            pos = np.unravel_index(idx, x.shape)
            plus = {n: a.copy() for n, a in inputs.items()}
            minus = {n: a.copy() for n, a in inputs.items()}
            plus[name][pos] += eps
            minus[name][pos] -= eps
            fd = (loss(plus) - loss(minus)) / (2 * eps)
            got = float(grads[name][pos])
            assert abs(got - fd) <= 2e-3 + 1e-2 * abs(fd), (name, pos, got, fd)
    # The masked query row (row 0: sees keys j <= 0 + 3 - 4) has a zero gradient.
    assert (grads["q"][0, 0] == 0).all()


# ---- argument errors, raised before the library is called ----------------------------------------


def _qkv(dtype=BF16, b=1, sq=4, sk=4, hq=4, hkv=2, d=64):
    rng = rng_for("err")
    return (randn(rng, (b, sq, hq, d), dtype), randn(rng, (b, sk, hkv, d), dtype),
            randn(rng, (b, sk, hkv, d), dtype))


def test_errors_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="4-D"):
        dk.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="multiple"):
        dk.attention(*_qkv(hq=3, hkv=2))
    with pytest.raises(ValueError, match="head dimension"):
        dk.attention(*_qkv(d=96))
    with pytest.raises(ValueError, match="same head dimension"):
        dk.attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="same shape"):
        dk.attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="batch"):
        dk.attention(np.concatenate([q, q]), k, v)
    with pytest.raises(ValueError, match=">= 1"):
        dk.attention(q[:, :, :0], k[:, :, :0], v[:, :, :0])


def test_errors_varlen():
    q, k, v = (x[0] for x in _qkv())
    cu = np.array([0, 4], dtype=np.int32)
    with pytest.raises(ValueError, match="together"):
        dk.attention(q, k, v, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="3-D"):
        dk.attention(q[None], k[None], v[None], cu_seqlens_q=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match=r"\[0\] must be 0"):
        dk.attention(q, k, v, cu_seqlens_q=np.array([1, 4], np.int32), cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="non-decreasing"):
        dk.attention(q, k, v, cu_seqlens_q=np.array([0, 3, 2, 4], np.int32),
                     cu_seqlens_k=np.array([0, 1, 2, 4], np.int32))
    with pytest.raises(ValueError, match="must equal"):
        dk.attention(q, k, v, cu_seqlens_q=np.array([0, 3], np.int32), cu_seqlens_k=cu)
    with pytest.raises(ValueError, match=r"\[B \+ 1\] for the same B"):
        dk.attention(q, k, v, cu_seqlens_q=np.array([0, 2, 4], np.int32), cu_seqlens_k=cu)
    with pytest.raises(TypeError, match="integers"):
        dk.attention(q, k, v, cu_seqlens_q=cu.astype(np.float32), cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="1-D"):
        dk.attention(q, k, v, cu_seqlens_q=cu[None], cu_seqlens_k=cu)


def test_errors_dtypes_and_parameters():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="float64"):
        dk.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    with pytest.raises(TypeError, match="not supported"):
        dk.attention(q.astype(np.int32), k, v)
    with pytest.raises(TypeError, match="one dtype"):
        dk.attention(q, k.astype(np.float16), v)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e60, 3e38):
        with pytest.raises(ValueError, match="softmax_scale"):
            dk.attention(q, k, v, softmax_scale=bad)
    with pytest.raises(TypeError, match="softmax_scale"):
        dk.attention(q, k, v, softmax_scale="0.1")
    with pytest.raises(TypeError, match="causal"):
        dk.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="torch|numpy"):
        dk.attention(object(), k, v)


def test_errors_backward():
    q, k, v = _qkv()
    fwd = dk.attention(q, k, v)
    do = fwd.out.copy()
    with pytest.raises(ValueError, match="lse must have shape"):
        dk.attention_backward(do, q, k, v, fwd.out, fwd.lse[:, :, :2])
    with pytest.raises(TypeError, match="float32"):
        dk.attention_backward(do, q, k, v, fwd.out, fwd.lse.astype(np.float64))
    with pytest.raises(ValueError, match="dout must have shape"):
        dk.attention_backward(do[:, :2], q, k, v, fwd.out, fwd.lse)
    with pytest.raises(TypeError, match="dtype of q"):
        dk.attention_backward(do.astype(np.float16), q, k, v, fwd.out, fwd.lse)
    with pytest.raises(TypeError, match="deterministic"):
        dk.attention_backward(do, q, k, v, fwd.out, fwd.lse, deterministic=None)
    # varlen lse is [Hq, Tq]
    cu = np.array([0, 4], dtype=np.int32)
    with pytest.raises(ValueError, match=r"\[Hq, Tq\]"):
        dk.attention_backward(do[0], q[0], k[0], v[0], fwd.out[0], fwd.lse,
                              cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_library_errors_become_package_exceptions():
    """A call the Python checks let through but the library rejects raises the package's
    exception type (a DistillKernelsError that is also a ValueError / TypeError)."""
    q, k, v = _qkv()
    p = _lib.make_attention_params(4, 2, 64, False, None, True)
    args = _lib.AttentionArgs(
        batch=_lib.AttentionBatch(batch=1, seqlen_q=4, seqlen_k=4, rows_q=4, rows_k=4),
        dtype=_lib.DTYPE_BF16, q=None, q_stride=256, k=k.ctypes.data, k_stride=128,
        v=v.ctypes.data, v_stride=128, out=None, out_stride=256, lse=None,
    )
    with pytest.raises(dk.DistillKernelsError) as e:
        _lib.attention_forward_call(_lib.context(-1), args, p, None)
    assert isinstance(e.value, ValueError) and e.value.status != 0
