"""distill_kernels.torch.attention against torch.nn.functional.scaled_dot_product_attention.

The reference is SDPA with ``enable_gqa=True`` on the same (rounded) inputs upcast to float32,
with the math backend and TF32 off, and its gradients from torch autograd. SDPA's ``is_causal``
is aligned top-left, so the causal reference always gets an explicit boolean mask aligned
bottom-right (query i sees keys j <= i + Sk - Sq), the FlashAttention convention this library
follows. Rows that see no key are compared separately (out 0, lse -inf): SDPA gives NaN there.
Needs torch. Each test body taking ``device`` runs on CPU tensors (the library's CPU backend,
with smaller shapes where the CUDA ones would be slow there) and, where a GPU is available (and
the library was built with nvcc), on CUDA tensors; the side-stream test is CUDA-only. Skips show
their reason with ``pytest -rs``.
"""

from __future__ import annotations

import zlib

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: attention torch tests skipped")

import torch.nn.functional as F  # noqa: E402

import distill_kernels as dk  # noqa: E402
import distill_kernels.torch as dkt  # noqa: E402
from distill_kernels import _lib  # noqa: E402

from torch_devices import cuda_only, other_device, device  # noqa: E402,F401 (device: the fixture)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in the output"
    den = torch.linalg.vector_norm(ref).item()
    return torch.linalg.vector_norm(out - ref).item() / (den if den > 0 else 1.0)


def bottom_right_mask(sq, sk, device):
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def sdpa_reference(q, k, v, causal, scale=None, dout=None):
    """SDPA in float32 math on [B, S, H, D] inputs: (out [B, Sq, Hq, D], lse [B, Hq, Sq],
    seen [Sq] (rows that see a key)) and, with dout, the float32 (dq, dk, dv).

    With the bottom-right causal mask the rows that see no key are the first Sq - Sk; SDPA is
    run on the others only (older versions give NaN for a fully masked row, which would leak
    into dk / dv), and those rows get out 0, lse -inf and dq 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1.0 / d**0.5 if scale is None else scale
    off = max(0, sq - sk) if causal else 0
    seen = torch.arange(sq, device=q.device) >= off
    n = sq - off
    mask = (bottom_right_mask(n, sk, q.device) if causal
            else torch.ones(n, sk, dtype=torch.bool, device=q.device))
    grad = dout is not None
    qf = q.detach()[:, off:].float().transpose(1, 2).requires_grad_(grad)
    kf, vf = (x.detach().float().transpose(1, 2).requires_grad_(grad) for x in (k, v))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        g = q.shape[2] // k.shape[2]
        s = (qf.detach() @ kf.detach().repeat_interleave(g, dim=1).transpose(-1, -2)) * scale
        lse_seen = torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)
        b, hq = q.shape[0], q.shape[2]
        out = torch.zeros(b, sq, hq, d, device=q.device)
        out[:, off:] = o.detach().transpose(1, 2)
        lse = torch.full((b, hq, sq), float("-inf"), device=q.device)
        lse[:, :, off:] = lse_seen
        if not grad:
            return out, lse, seen
        do = dout[:, off:].float().transpose(1, 2)
        dq_seen, dk_, dv = torch.autograd.grad(o, (qf, kf, vf), do)
        dq = torch.zeros(b, sq, hq, d, device=q.device)
        dq[:, off:] = dq_seen.transpose(1, 2)
        return out, lse, seen, dq, dk_.transpose(1, 2), dv.transpose(1, 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def make(shape, dtype, seed, device, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, device=device, generator=g) * scale).to(dtype)


def check_forward(out, lse, ref_out, ref_lse, seen, dtype):
    """out [B, Sq, Hq, D], lse [B, Hq, Sq] against the reference on rows that see a key; rows
    that see none must be out 0, lse -inf."""
    assert not torch.isnan(lse).any()
    assert rel_err(out[:, seen], ref_out[:, seen]) <= TOL[dtype]
    torch.testing.assert_close(lse[:, :, seen], ref_lse[:, :, seen], rtol=1e-4, atol=1e-4)
    if (~seen).any():
        assert (out[:, ~seen] == 0).all()
        assert torch.isneginf(lse[:, :, ~seen]).all()


# ---- forward and gradients, padded ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(128, 128), (77, 200), (200, 77)])
def test_forward_and_grads_vs_sdpa(device, dtype, d, group, causal, sq, sk):
    b, hkv = 2, 2
    hq = hkv * group
    seed = zlib.crc32(repr((str(dtype), d, group, causal, sq, sk)).encode())
    q = make((b, sq, hq, d), dtype, seed, device).requires_grad_(True)
    k = make((b, sk, hkv, d), dtype, seed + 1, device).requires_grad_(True)
    v = make((b, sk, hkv, d), dtype, seed + 2, device).requires_grad_(True)
    do = make((b, sq, hq, d), dtype, seed + 3, device)
    out, lse = dkt.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32 and not lse.requires_grad
    ref_out, ref_lse, seen, rdq, rdk, rdv = sdpa_reference(q, k, v, causal, dout=do)
    check_forward(out, lse, ref_out, ref_lse, seen, dtype)
    dq, dk_, dv = torch.autograd.grad(out, (q, k, v), do)
    for name, got, ref in (("dq", dq, rdq), ("dk", dk_, rdk), ("dv", dv, rdv)):
        assert got.shape == ref.shape and got.dtype == dtype
        assert rel_err(got, ref) <= TOL[dtype], (name, rel_err(got, ref))


def test_custom_scale_and_length_one(device):
    for sq, sk, scale in ((1, 1, 0.5), (1, 300, 0.05), (300, 1, 2.0)):
        q = make((3, sq, 8, 128), torch.bfloat16, sq, device)
        k = make((3, sk, 1, 128), torch.bfloat16, sk + 7, device)
        v = make((3, sk, 1, 128), torch.bfloat16, sk + 9, device)
        out, lse = dkt.attention(q, k, v, causal=True, softmax_scale=scale, return_lse=True)
        ref_out, ref_lse, seen = sdpa_reference(q, k, v, True, scale=scale)
        check_forward(out, lse, ref_out, ref_lse, seen, torch.bfloat16)


def test_fused_qkv_slices_and_their_gradient(device):
    """q / k / v sliced out of one qkv projection are read in place; the gradient lands in qkv."""
    b, s, hq, hkv, d = 2, 96, 6, 2, 128
    qkv = make((b, s, hq + 2 * hkv, d), torch.bfloat16, 5, device).requires_grad_(True)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    do = make((b, s, hq, d), torch.bfloat16, 6, device)
    out = dkt.attention(q, k, v, causal=True)
    (g,) = torch.autograd.grad(out, qkv, do)
    q2, k2, v2 = (x.detach().contiguous().requires_grad_(True) for x in (q, k, v))
    out2 = dkt.attention(q2, k2, v2, causal=True)
    g2 = torch.autograd.grad(out2, (q2, k2, v2), do)
    assert torch.equal(out, out2)
    assert torch.equal(g, torch.cat(g2, dim=2))


# ---- varlen ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 3])
def test_varlen_vs_per_sequence_sdpa(device, causal, group):
    lq = [0, 1, 37, 130, 64, 5]
    lk = [3, 1, 100, 130, 0, 17]
    hkv, d, dtype = 2, 128, torch.bfloat16
    hq = hkv * group
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = make((sum(lq), hq, d), dtype, 1, device).requires_grad_(True)
    k = make((sum(lk), hkv, d), dtype, 2, device).requires_grad_(True)
    v = make((sum(lk), hkv, d), dtype, 3, device).requires_grad_(True)
    do = make((sum(lq), hq, d), dtype, 4, device)
    out, lse = dkt.attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             return_lse=True)
    assert lse.shape == (hq, sum(lq))
    dq, dk_, dv = torch.autograd.grad(out, (q, k, v), do)
    # The same with the bounds given (no host synchronisation) gives the same bits.
    out_b = dkt.attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    assert torch.equal(out, out_b)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lq)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lq[b] == 0:
            if lk[b]:
                assert (dk_[ks] == 0).all() and (dv[ks] == 0).all()
            continue
        if lk[b] == 0:
            assert (out[qs] == 0).all() and torch.isneginf(lse[:, qs]).all()
            assert (dq[qs] == 0).all()
            continue
        r_out, r_lse, seen, rdq, rdk, rdv = sdpa_reference(q[None, qs], k[None, ks], v[None, ks],
                                                           causal, dout=do[None, qs])
        check_forward(out[None, qs], lse[None, :, qs], r_out, r_lse, seen, dtype)
        for name, got, ref in (("dq", dq[qs], rdq[0]), ("dk", dk_[ks], rdk[0]),
                               ("dv", dv[ks], rdv[0])):
            assert rel_err(got, ref) <= TOL[dtype], (b, name, rel_err(got, ref))


def test_varlen_offsets_are_checked_when_read(device):
    q = make((10, 2, 64), torch.bfloat16, 1, device)
    k = make((10, 2, 64), torch.bfloat16, 2, device)
    bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=device)
    ok = torch.tensor([0, 4, 6, 10], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="never decrease"):
        dkt.attention(q, k, k, cu_seqlens_q=bad, cu_seqlens_k=ok)
    with pytest.raises(TypeError, match="int32"):
        dkt.attention(q, k, k, cu_seqlens_q=ok.long(), cu_seqlens_k=ok)
    with pytest.raises(ValueError, match="together"):
        dkt.attention(q, k, k, cu_seqlens_q=ok)
    with pytest.raises(ValueError, match="cu_seqlens_k is on"):
        dkt.attention(q, k, k, cu_seqlens_q=ok, cu_seqlens_k=ok.to(other_device(device)))
    # One bound given, so the offsets are read: a bound below the longest sequence (4) is an
    # error (on CUDA the grid it sizes would skip rows, leaving them unwritten).
    with pytest.raises(ValueError, match="longest sequences of cu_seqlens"):
        dkt.attention(q, k, k, cu_seqlens_q=ok, cu_seqlens_k=ok, max_seqlen_q=3)
    out = dkt.attention(q, k, k, cu_seqlens_q=ok, cu_seqlens_k=ok, max_seqlen_k=9)
    assert torch.equal(out, dkt.attention(q, k, k, cu_seqlens_q=ok, cu_seqlens_k=ok))
    # One offset entry is zero sequences: rows in q or k are an error that says so, with or
    # without the bounds (the latter through the library's own check).
    none = torch.zeros(1, dtype=torch.int32, device=device)
    for bounds in ({}, dict(max_seqlen_q=0, max_seqlen_k=0)):
        with pytest.raises(ValueError, match="no sequences"):
            dkt.attention(q, k, k, cu_seqlens_q=none, cu_seqlens_k=none, **bounds)


def test_backward_reads_the_forward_row_layouts_without_copying_again(device, monkeypatch):
    # q, k, v from SDPA's [B, H, S, D] layout are copied once, in the forward; the backward
    # reads those copies instead of copying the strided originals again.
    q = make((2, 6, 5, 64), torch.bfloat16, 3, device).transpose(1, 2).requires_grad_(True)
    k = make((2, 2, 5, 64), torch.bfloat16, 4, device).transpose(1, 2).requires_grad_(True)
    v = make((2, 2, 5, 64), torch.bfloat16, 5, device).transpose(1, 2).requires_grad_(True)
    copied = []
    real = dkt._attn_rows

    def counting(name, x):
        y, stride = real(name, x)
        if y.data_ptr() != x.data_ptr():
            copied.append(name)
        return y, stride

    monkeypatch.setattr(dkt, "_attn_rows", counting)
    out = dkt.attention(q, k, v, causal=True)
    assert sorted(copied) == ["k", "q", "v"]
    copied.clear()
    out.backward(torch.ones_like(out))
    assert copied == [], copied
    ref = sdpa_reference(q.detach(), k.detach(), v.detach(), True, dout=torch.ones_like(out))
    for grad, want in zip((q.grad, k.grad, v.grad), ref[3:]):
        assert rel_err(grad, want) <= 1e-2
    # A tensor passed twice (k is v) is copied once, and that one copy serves both.
    copied.clear()
    out = dkt.attention(q, k, k)
    assert sorted(copied) == ["k", "q"], copied


# ---- determinism, streams, errors ---------------------------------------------------------------------


def test_backward_is_deterministic(device):
    # Smaller on the CPU backend (an f64 reference: the CUDA shape would take seconds there).
    s, hq, hkv = (512, 24, 8) if device == "cuda" else (160, 6, 2)
    q = make((2, s, hq, 128), torch.bfloat16, 11, device).requires_grad_(True)
    k = make((2, s, hkv, 128), torch.bfloat16, 12, device).requires_grad_(True)
    v = make((2, s, hkv, 128), torch.bfloat16, 13, device).requires_grad_(True)
    do = make((2, s, hq, 128), torch.bfloat16, 14, device)
    runs = []
    for _ in range(2):
        out = dkt.attention(q, k, v, causal=True, deterministic=True)
        runs.append((out,) + torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("d,causal,sq,sk", [(128, True, 512, 512), (64, True, 77, 200),
                                             (128, False, 200, 77)])
def test_atomic_dq_mode_vs_sdpa_and_the_deterministic_mode(device, d, causal, sq, sk):
    # deterministic=False: dq summed by f32 atomics on CUDA (the CPU backend has one exact path
    # for both modes); dk / dv bitwise those of the default mode.
    seed = zlib.crc32(repr(("atomic", d, causal, sq, sk)).encode())
    hq, hkv = 24, 8
    if device == "cpu":  # smaller on the CPU backend (an f64 reference)
        hq, hkv, sq, sk = 6, 2, min(sq, 160), min(sk, 160)
    q = make((2, sq, hq, d), torch.bfloat16, seed, device).requires_grad_(True)
    k = make((2, sk, hkv, d), torch.bfloat16, seed + 1, device).requires_grad_(True)
    v = make((2, sk, hkv, d), torch.bfloat16, seed + 2, device).requires_grad_(True)
    do = make((2, sq, hq, d), torch.bfloat16, seed + 3, device)
    _, _, _, rdq, rdk, rdv = sdpa_reference(q, k, v, causal, dout=do)
    grads = {}
    for det in (True, False):
        out = dkt.attention(q, k, v, causal=causal, deterministic=det)
        grads[det] = torch.autograd.grad(out, (q, k, v), do)
    for name, got, ref in zip(("dq", "dk", "dv"), grads[False], (rdq, rdk, rdv)):
        assert rel_err(got, ref) <= TOL[torch.bfloat16], (name, rel_err(got, ref))
    assert torch.equal(grads[False][1], grads[True][1])
    assert torch.equal(grads[False][2], grads[True][2])


@cuda_only("torch streams")
def test_runs_on_the_current_stream():
    q = make((1, 256, 4, 64), torch.float16, 21, "cuda")
    k = make((1, 256, 2, 64), torch.float16, 22, "cuda")
    v = make((1, 256, 2, 64), torch.float16, 23, "cuda")
    want = dkt.attention(q, k, v, causal=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q2 = q * 1  # produced on the side stream, consumed there without a sync
        got = dkt.attention(q2, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


def test_errors(device):
    q = make((1, 8, 4, 64), torch.bfloat16, 1, device)
    k = make((1, 8, 2, 64), torch.bfloat16, 2, device)
    if device == "cuda":  # float32 runs on CPU tensors only
        with pytest.raises(TypeError, match="float32"):
            dkt.attention(q.float(), k.float(), k.float())
    with pytest.raises(TypeError, match="not supported"):
        dkt.attention(q.double(), k.double(), k.double())
    with pytest.raises(TypeError, match="one dtype"):
        dkt.attention(q, k.half(), k)
    with pytest.raises(ValueError, match="multiple"):
        dkt.attention(q[:, :, :3], k, k)
    with pytest.raises(ValueError, match="head dimension"):
        dkt.attention(q[..., :32], k[..., :32], k[..., :32])
    with pytest.raises(ValueError, match="4-D"):
        dkt.attention(q[0], k[0], k[0])
    with pytest.raises(ValueError, match="but k is on"):
        dkt.attention(q, k.to(other_device(device)), k)
    with pytest.raises(ValueError, match="max_seqlen"):
        dkt.attention(q, k, k, max_seqlen_q=8)


# ---- CPU tensors (the CPU backend; needs torch only) -------------------------------------------------


def test_cpu_tensors_use_the_cpu_backend():
    try:
        _lib.attention_lib()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the library has no attention: {e}")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 6, 64, generator=g, dtype=torch.float32).requires_grad_(True)
    k = torch.randn(2, 13, 2, 64, generator=g, dtype=torch.float32).requires_grad_(True)
    v = torch.randn(2, 13, 2, 64, generator=g, dtype=torch.float32).requires_grad_(True)
    do = torch.randn(2, 9, 6, 64, generator=g, dtype=torch.float32)
    out, lse = dkt.attention(q, k, v, causal=True, return_lse=True)
    res = dk.attention(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), causal=True)
    assert torch.equal(out.detach(), torch.from_numpy(res.out))
    assert torch.equal(lse, torch.from_numpy(res.lse))
    grads = torch.autograd.grad(out, (q, k, v), do)
    want = dk.attention_backward(do.numpy(), q.detach().numpy(), k.detach().numpy(),
                                 v.detach().numpy(), res.out, res.lse, causal=True)
    for got, w in zip(grads, want):
        assert torch.equal(got, torch.from_numpy(w))
    # The same math as autograd through a plain float64 implementation.
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", qd, kd.repeat_interleave(3, dim=2)) / 8.0
    s = s.masked_fill(~bottom_right_mask(9, 13, "cpu"), float("-inf"))
    ref = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vd.repeat_interleave(3, dim=2))
    assert rel_err(out, ref) <= 1e-5
    for got, r in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), do.double())):
        assert rel_err(got, r) <= 1e-5
