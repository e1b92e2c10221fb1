"""distill_kernels.torch.fused_linear_divergence against an fp32 PyTorch reference (matmul + the
divergence formulas of torch / TRL, gradients by torch autograd) and the numpy face (CPU backend).

Needs torch. Each test body taking ``device`` runs on CPU tensors (the library's CPU backend) and,
where a GPU is available (and the library was built with nvcc), on CUDA tensors; the tests about
CUDA itself (side streams, CUDA memory use) are CUDA-only. Skips show their reason with
``pytest -rs``.
"""

from __future__ import annotations

import contextlib
import math

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: fused torch tests skipped")
import torch.nn.functional as F  # noqa: E402

import distill_kernels as dk  # noqa: E402
import distill_kernels.torch as dkt  # noqa: E402

from torch_devices import cuda_only, other_device, device  # noqa: E402,F401 (device: the fixture)


KIND_BETAS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0)]
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def torch_reference(hs, ws, ht, wt, kind="jsd", beta=0.5, temperature=1.0, labels=None,
                    ignore_index=-100, reduction="batchmean", num_items=None, logit_scale=1.0,
                    softcap=None):
    """fp32 eager PyTorch: (loss or per-token tensor, grad_hidden, grad_weight) by autograd."""
    hs32 = hs.detach().float().requires_grad_(True)
    ws32 = ws.detach().float().requires_grad_(True)
    zs = logit_scale * (hs32.reshape(-1, hs32.shape[-1]) @ ws32.T)
    with torch.no_grad():
        zt = logit_scale * (ht.float().reshape(-1, ht.shape[-1]) @ wt.float().T)
    if softcap is not None:
        zs = softcap * torch.tanh(zs / softcap)
        zt = softcap * torch.tanh(zt / softcap)
    ls = F.log_softmax(zs / temperature, dim=-1)
    lt = F.log_softmax(zt / temperature, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        rows = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse_kl":
        rows = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    else:  # TRL's generalized_jsd_loss
        lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), dim=0)
        rows = (beta * F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
                + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1))
    n = rows.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=rows.device)
    if labels is not None:
        valid = labels.reshape(n) != ignore_index
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "batchmean":
        div = num_items if num_items is not None else max(1, int(valid.sum().item()))
        loss = rows.sum() / div
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum()
    loss.backward()
    return loss.detach(), rows.detach(), hs32.grad.reshape(hs.shape), ws32.grad


def rel(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    nr = torch.linalg.vector_norm(ref)
    nd = torch.linalg.vector_norm(out - ref)
    return (nd / nr).item() if nr > 0 else nd.item()


def inputs(device, n=64, h=128, v=1000, ht=None, dtype=torch.bfloat16, spread=2.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    ht = h if ht is None else ht
    mk = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    hs = mk(n, h).to(dtype)
    ws = (mk(v, h) * spread / math.sqrt(h)).to(dtype)
    tt = mk(n, ht).to(dtype)
    wt = (mk(v, ht) * spread / math.sqrt(ht)).to(dtype)
    return hs, ws, tt, wt


def tol(dtype):
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1e-2)


def check(hs, ws, ht, wt, **kw):
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_rows", "grad_dtype")}
    loss_ref, rows_ref, gh_ref, gw_ref = torch_reference(hs, ws, ht, wt, **ref_kw)
    a = hs.detach().clone().requires_grad_(True)
    b = ws.detach().clone().requires_grad_(True)
    loss = dkt.fused_linear_divergence(a, b, ht, wt, **kw)
    assert loss.dtype == torch.float32 and loss.device == hs.device
    loss.backward()
    tl, tg = tol(hs.dtype)
    assert rel(loss, loss_ref) <= tl, (rel(loss, loss_ref), kw)
    assert a.grad.dtype == hs.dtype and b.grad.dtype == ws.dtype
    assert rel(a.grad, gh_ref) <= tg, (rel(a.grad, gh_ref), kw)
    assert rel(b.grad, gw_ref) <= tg, (rel(b.grad, gw_ref), kw)
    return loss, a.grad, b.grad


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_matches_torch_reference(device, kind, beta, dtype):
    check(*inputs(device, dtype=DTYPES[dtype]), kind=kind, beta=beta)


@pytest.mark.parametrize("softcap", [None, 30.0, 2.0])
@pytest.mark.parametrize("logit_scale,temperature", [(1.0, 1.0), (0.5, 2.0), (3.0, 0.7)])
def test_scale_softcap_temperature(device, softcap, logit_scale, temperature):
    check(*inputs(device, n=37, v=777), kind="jsd", beta=0.3, softcap=softcap,
          logit_scale=logit_scale, temperature=temperature, chunk_rows=8)


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 64, 100])
def test_labels_chunks_reductions(device, reduction, chunk_rows):
    hs, ws, ht, wt = inputs(device, n=50, v=513, seed=3)
    labels = torch.randint(0, 513, (50,), device=device)
    labels[[0, 9, 10, 49]] = -100
    check(hs, ws, ht, wt, labels=labels, reduction=reduction, chunk_rows=chunk_rows)
    check(hs, ws, ht, wt, labels=labels, num_items=17.0, chunk_rows=chunk_rows)


def test_reduction_none_hidden_only_and_weight_refused(device):
    hs, ws, ht, wt = inputs(device, n=20, v=300, seed=4)
    _, rows_ref, _, _ = torch_reference(hs, ws, ht, wt, reduction="none")
    a = hs.detach().clone().requires_grad_(True)
    per_token = dkt.fused_linear_divergence(a, ws, ht, wt, reduction="none")
    assert per_token.shape == (20,)
    assert rel(per_token, rows_ref) <= 1e-4
    w = torch.rand(20, device=device)
    (per_token * w).sum().backward()
    # reference: d(sum w_n rows_n)/d hidden
    a32 = hs.detach().float().requires_grad_(True)
    ls = F.log_softmax(a32 @ ws.float().T, -1)
    lt = F.log_softmax(ht.float() @ wt.float().T, -1)
    lm = torch.logsumexp(torch.stack([ls + math.log(0.5), lt + math.log(0.5)]), 0)
    rows = 0.5 * F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1) + 0.5 * F.kl_div(
        lm, ls, reduction="none", log_target=True).sum(-1)
    (rows * w).sum().backward()
    assert rel(a.grad, a32.grad) <= 1e-2
    with pytest.raises(ValueError, match="reduction='none'"):
        dkt.fused_linear_divergence(hs, ws.detach().clone().requires_grad_(True), ht, wt,
                                    reduction="none")


def _grad_output_scaling(device, stream):
    hs, ws, ht, wt = inputs(device, seed=5)
    _, _, gh_ref, gw_ref = torch_reference(hs, ws, ht, wt)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        a = hs.detach().clone().requires_grad_(True)
        b = ws.detach().clone().requires_grad_(True)
        loss = dkt.fused_linear_divergence(a, b, ht, wt, chunk_rows=16)
        (2.5 * loss).backward()
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    assert rel(a.grad, 2.5 * gh_ref) <= 1e-2
    assert rel(b.grad, 2.5 * gw_ref) <= 1e-2


def test_grad_output_scaling(device):
    _grad_output_scaling(device, None)


@cuda_only("torch streams")
def test_cuda_grad_output_scaling_on_a_side_stream():
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    _grad_output_scaling("cuda", s)


def test_self_distillation_same_weight_tensor(device):
    hs, ws, ht, _ = inputs(device, seed=6)
    w = ws.detach().clone().requires_grad_(True)
    a = hs.detach().clone().requires_grad_(True)
    loss = dkt.fused_linear_divergence(a, w, ht, w, kind="jsd", softcap=5.0)
    loss.backward()
    _, _, gh_ref, gw_ref = torch_reference(hs, ws, ht, ws, softcap=5.0)
    assert rel(a.grad, gh_ref) <= 1e-2 and rel(w.grad, gw_ref) <= 1e-2


def test_grad_dtype_f32_and_accumulate_buffers(device):
    hs, ws, ht, wt = inputs(device, seed=7)
    _, _, gh_ref, gw_ref = torch_reference(hs, ws, ht, wt)
    a = hs.detach().clone().requires_grad_(True)
    b = ws.detach().clone().requires_grad_(True)
    dkt.fused_linear_divergence(a, b, ht, wt, grad_dtype=torch.float32).backward()
    assert b.grad.dtype == torch.bfloat16 and rel(b.grad, gw_ref) <= 1e-2
    gw0 = torch.randn(ws.shape, device=device) * 0.01
    gh0 = torch.randn(hs.shape, device=device, dtype=torch.bfloat16) * 0.01
    gw, gh = gw0.clone(), gh0.clone()
    for _ in range(2):
        loss = dkt.fused_linear_divergence(hs, ws, ht, wt, grad_weight_out=gw, grad_hidden_out=gh)
        assert not loss.requires_grad
    assert rel(gw, gw0.double() + 2 * gw_ref.double()) <= 1e-2
    assert rel(gh, gh0.double() + 2 * gh_ref.double()) <= 1e-2
    # An input that requires grad with no buffer would get no gradient at all (the loss does
    # not require grad): refused, nothing written. The idiom grad_weight_out=w.grad after
    # zero_grad() passes None.
    w = ws.detach().clone().requires_grad_(True)
    x = hs.detach().clone().requires_grad_(True)
    before = gh.clone()
    with pytest.raises(ValueError, match="student_weight requires grad but grad_weight_out is None"):
        dkt.fused_linear_divergence(hs, w, ht, wt, grad_hidden_out=gh, grad_weight_out=w.grad)
    with pytest.raises(ValueError, match="student_hidden requires grad but grad_hidden_out is None"):
        dkt.fused_linear_divergence(x, ws, ht, wt, grad_weight_out=gw)
    assert torch.equal(gh, before)
    dkt.fused_linear_divergence(x.detach(), w.detach(), ht, wt, grad_hidden_out=gh)
    with torch.no_grad():
        dkt.fused_linear_divergence(x, w, ht, wt, grad_hidden_out=gh)


def test_matches_cpu_numpy_face(device):
    """The torch face against the numpy face (the CPU backend) on the same inputs: on CUDA
    tensors the kernels against the exact reference; on CPU tensors a face-parity check (both
    faces pass the same arguments; the maths is checked against fp32 autograd elsewhere)."""
    pytest.importorskip("numpy")
    hs, ws, ht, wt = inputs(device, n=30, h=32, v=200, dtype=torch.float32, seed=8)
    labels = torch.randint(0, 200, (30,), device=device)
    labels[3] = -100
    kw = dict(kind="jsd", beta=0.3, softcap=4.0, logit_scale=0.8, temperature=1.3, chunk_rows=7)
    a = hs.detach().clone().requires_grad_(True)
    b = ws.detach().clone().requires_grad_(True)
    loss = dkt.fused_linear_divergence(a, b, ht, wt, labels=labels, **kw)
    loss.backward()
    r = dk.fused_linear_divergence(*(x.cpu().numpy() for x in (hs, ws, ht, wt)),
                                   labels=labels.cpu().numpy(), **kw)
    assert abs(loss.item() - r.loss) <= 1e-5 * abs(r.loss)
    assert rel(a.grad.cpu(), torch.from_numpy(r.grad_hidden)) <= 1e-5
    assert rel(b.grad.cpu(), torch.from_numpy(r.grad_weight)) <= 1e-5


def test_forward_only_and_backward_twice(device):
    hs, ws, ht, wt = inputs(device, seed=9)
    with torch.no_grad():
        loss = dkt.fused_linear_divergence(hs.requires_grad_(True), ws, ht, wt)
    assert not loss.requires_grad
    hs.requires_grad_(False)
    a = hs.detach().clone().requires_grad_(True)
    loss = dkt.fused_linear_divergence(a, ws, ht, wt)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already consumed"):
        loss.backward()


@cuda_only("measures CUDA memory with torch.cuda.max_memory_allocated")
def test_cuda_extra_memory_is_o_chunk_times_v():
    n, h, v, chunk = 4096, 256, 32768, 256
    hs, ws, ht, wt = inputs("cuda", n=n, h=h, v=v, seed=10)
    a = hs.detach().clone().requires_grad_(True)
    b = ws.detach().clone().requires_grad_(True)
    dkt.fused_linear_divergence(a, b, ht, wt, chunk_rows=chunk).backward()  # warm up
    a.grad = b.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = dkt.fused_linear_divergence(a, b, ht, wt, chunk_rows=chunk)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (n * h + v * h) * 2
    budget = grads + 8 * chunk * v * 4 + (16 << 20)
    full_logits = n * v * 4
    assert extra <= budget, (extra / 2**20, budget / 2**20)
    assert extra < full_logits, "extra memory is as large as the f32 [N, V] logits"


def test_bad_input(device):
    hs, ws, ht, wt = inputs(device, n=8, h=16, v=32, seed=11)
    other = other_device(device)
    with pytest.raises(TypeError):
        dkt.fused_linear_divergence(hs, ws.float(), ht, wt)
    with pytest.raises(ValueError):
        dkt.fused_linear_divergence(hs, ws[:, :-1], ht, wt)
    with pytest.raises(ValueError):
        dkt.fused_linear_divergence(hs, ws, ht, wt, softcap=0.0)
    with pytest.raises(ValueError):
        dkt.fused_linear_divergence(hs, ws, ht, wt, chunk_rows=0)
    with pytest.raises(ValueError, match="num_items only applies"):
        dkt.fused_linear_divergence(hs, ws, ht, wt, reduction="sum", num_items=torch.tensor(3.0))
    with pytest.raises(ValueError):
        dkt.fused_linear_divergence(hs, ws, ht.to(other), wt)
    with pytest.raises(ValueError):
        dkt.fused_linear_divergence(hs, ws, ht, wt, grad_weight_out=torch.zeros(
            ws.shape, device=device).t().contiguous().t())
    with pytest.raises(ValueError):
        dkt.fused_linear_divergence(hs, ws, ht, wt, grad_weight_out=torch.zeros(
            ws.shape, device=device), grad=False)
    with pytest.raises(ValueError, match="grad_weight_out is on"):
        dkt.fused_linear_divergence(hs, ws, ht, wt, grad_weight_out=torch.zeros(
            ws.shape, device=other))
    with pytest.raises(ValueError, match="labels are on"):
        dkt.fused_linear_divergence(hs, ws, ht, wt, labels=torch.zeros(8, dtype=torch.int64,
                                                                       device=other))
