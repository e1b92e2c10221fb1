"""distill_kernels.torch.divergence against F.kl_div and TRL's generalized_jsd_loss formula.

Needs torch. Each test body taking ``device`` runs once per device: on CPU tensors (the library's
exact CPU backend) wherever torch is installed, and on CUDA tensors where a GPU is available (and
the library was built with nvcc); tests that are about CUDA itself (streams, host syncs, graph
capture, CUDA against the CPU backend) are CUDA-only. Skips show their reason with ``pytest -rs``.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: torch tests skipped")
import torch.nn.functional as F  # noqa: E402

import distill_kernels as dk  # noqa: E402
import distill_kernels.torch as dkt  # noqa: E402

from torch_devices import cuda_only, other_device, device  # noqa: E402,F401 (device: the fixture)


KIND_BETAS = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.3),
    ("jsd", 0.5),
    ("jsd", 1.0),
]


# ---- references written from the formulas ------------------------------------------------------


def kl_div_reference(student, teacher, kind, temperature=1.0, reduction="batchmean"):
    """forward / reverse KL through F.kl_div, in float64."""
    s = F.log_softmax(student.double() / temperature, dim=-1)
    t = F.log_softmax(teacher.double() / temperature, dim=-1)
    if kind == "forward_kl":  # KL(teacher || student)
        rows = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
        total = F.kl_div(s, t, reduction="sum", log_target=True)
        batchmean = F.kl_div(s, t, reduction="batchmean", log_target=True)
    else:  # KL(student || teacher)
        rows = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
        total = F.kl_div(t, s, reduction="sum", log_target=True)
        batchmean = F.kl_div(t, s, reduction="batchmean", log_target=True)
    return {"batchmean": batchmean, "sum": total, "none": rows}[reduction]


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                             temperature=1.0, reduction="batchmean"):
    """TRL's GKDTrainer.generalized_jsd_loss (float64 here), written out."""
    student_logits = student_logits.double() / temperature
    teacher_logits = teacher_logits.double() / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - b), teacher_log_probs + torch.log(b)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / jsd.size(0)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def rel_err(out, ref):
    out = out.detach().double()
    ref = ref.detach().double().to(out.device)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "NaN in output"
    nr = torch.linalg.vector_norm(ref).item()
    nd = torch.linalg.vector_norm(out - ref).item()
    return nd if nr == 0 else nd / nr


def tol(dtype):
    """(loss, grad) tolerances of DESIGN.md for student/teacher of this dtype."""
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1e-2)


def make(n, v, dtype, device, seed, scale=2.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    return s, t


def reference(student, teacher, kind, beta, temperature, labels=None, reduction="batchmean"):
    if kind == "jsd":
        return trl_generalized_jsd_loss(student, teacher, labels, beta, temperature, reduction)
    assert labels is None
    return kl_div_reference(student, teacher, kind, temperature, reduction)


def ours_and_reference(s, t, kind, beta, temperature, labels=None, reduction="batchmean",
                       upstream=None):
    """(loss, grad) from distill_kernels and from the float64 torch reference."""
    s1 = s.detach().clone().requires_grad_(True)
    out = dkt.divergence(s1, t, kind=kind, beta=beta, temperature=temperature, labels=labels,
                         reduction=reduction)
    s2 = s.detach().double().clone().requires_grad_(True)
    ref = reference(s2, t.double(), kind, beta, temperature, labels, reduction)
    if reduction == "none":
        if labels is not None:  # TRL drops ignored rows; ours keeps zeros there
            full = torch.zeros(s.shape[0], dtype=torch.float64, device=s.device)
            full[labels != -100] = ref.sum(-1) if ref.dim() == 2 else ref
            ref = full
        elif ref.dim() == 2:
            ref = ref.sum(-1)
    w = upstream if upstream is not None else torch.ones_like(ref)
    (out * w.to(out.dtype)).sum().backward()
    (ref * w.double()).sum().backward()
    return out, s1.grad, ref, s2.grad


# ---- every device (CPU tensors: the CPU backend; CUDA tensors: the kernels) ----------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_kl_div_and_trl(device, dtype, kind, beta, temperature):
    s, t = make(32, 4099, dtype, device, seed=1)
    out, g, ref, g_ref = ours_and_reference(s, t, kind, beta, temperature)
    assert out.shape == () and out.dtype == torch.float32 and out.device == s.device
    assert g.dtype == dtype and g.shape == s.shape
    tl, tg = tol(dtype)
    assert rel_err(out, ref) <= tl
    assert rel_err(g, g_ref) <= tg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("jsd", 0.3)])
def test_labels_and_ignore_index(device, dtype, kind, beta):
    s, t = make(40, 1000, dtype, device, seed=2)
    labels = torch.randint(0, 1000, (40,), device=device)
    labels[::3] = -100
    for reduction in ("batchmean", "sum", "none"):
        out, g, ref, g_ref = ours_and_reference(s, t, kind, beta, 1.0, labels, reduction)
        tl, tg = tol(dtype)
        assert rel_err(out, ref) <= tl, reduction
        assert rel_err(g, g_ref) <= tg, reduction
        assert torch.all(g[::3] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_reduction_none_non_uniform_grad_output(device, dtype, kind, beta):
    s, t = make(24, 3001, dtype, device, seed=3)
    w = torch.randn(24, device=device, dtype=torch.float32)
    out, g, ref, g_ref = ours_and_reference(s, t, kind, beta, 0.7, reduction="none", upstream=w)
    assert out.shape == (24,) and out.dtype == torch.float32
    tl, tg = tol(dtype)
    assert rel_err(out, ref) <= tl
    assert rel_err(g, g_ref) <= tg


def test_grad_output_scaling_and_num_items(device):
    s, t = make(16, 777, torch.float32, device, seed=4)
    s1 = s.clone().requires_grad_(True)
    (dkt.divergence(s1, t, kind="forward_kl", num_items=50.0) * 3.5).backward()
    s2 = s.double().clone().requires_grad_(True)
    (kl_div_reference(s2, t, "forward_kl", reduction="sum") / 50.0 * 3.5).backward()
    assert rel_err(s1.grad, s2.grad) <= 1e-5


@cuda_only("torch streams")
def test_cuda_side_stream():
    side = torch.cuda.Stream()
    s0, t0 = make(64, 8192, torch.bfloat16, "cuda", seed=5)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        # Inputs produced on the side stream right before the call: only stream order keeps it
        # correct. A large matmul first keeps the stream busy.
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):
            big = big @ big
            big = big / big.norm()
        s = (s0.float() * 1.0 + big[0, 0] * 0).to(torch.bfloat16).requires_grad_(True)
        t = t0 * 1
        loss = dkt.divergence(s, t, kind="jsd", beta=0.5)
        loss.backward()
        g = s.grad
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _, _, ref, g_ref = ours_and_reference(s0, t0, "jsd", 0.5, 1.0)
    assert rel_err(loss, ref) <= 1e-4
    assert rel_err(g, g_ref) <= 1e-2


@cuda_only("torch.cuda.set_sync_debug_mode")
def test_cuda_no_host_sync_on_hot_path():
    s, t = make(32, 2048, torch.bfloat16, "cuda", seed=6)
    labels = torch.randint(0, 2048, (32,), device="cuda")
    for _ in range(2):  # warm up: contexts, module load, allocator pools
        s1 = s.clone().requires_grad_(True)
        dkt.divergence(s1, t, kind="jsd", labels=labels).backward()
    torch.cuda.synchronize()
    s1 = s.clone().requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = dkt.divergence(s1, t, kind="jsd", labels=labels)
        loss.backward()
        per = dkt.divergence(s, t, kind="forward_kl", reduction="none")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and per.shape == (32,)


def test_row_views_and_one_row(device):
    big_s, big_t = make(8, 5000, torch.bfloat16, device, seed=7)
    s, t = big_s[:, :4093], big_t[:, 7:4100]
    # Row views go to the library as they are (same pointer, row stride of the big tensor).
    m, stride = dkt._matrix("student", t)
    assert m.data_ptr() == t.data_ptr() and stride == 5000
    leaf = big_s.clone().requires_grad_(True)
    out = dkt.divergence(leaf[:, :4093], t, kind="jsd", beta=0.3)
    out.backward()
    s2 = s.double().clone().requires_grad_(True)
    ref = trl_generalized_jsd_loss(s2, t, beta=0.3)
    ref.backward()
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(leaf.grad[:, :4093], s2.grad) <= 1e-2
    assert torch.all(leaf.grad[:, 4093:] == 0)
    # Non-unit inner stride: copied, same results.
    out, g, ref, g_ref = ours_and_reference(s[:, ::2], t[:, ::2], "forward_kl", 0.5, 1.0)
    assert rel_err(out, ref) <= 1e-4 and rel_err(g, g_ref) <= 1e-2
    one = dkt.divergence(s[0], t[0], kind="reverse_kl", reduction="none")
    assert one.shape == ()


def masked_rows_reference(s, t, mask, kind, beta, temperature):
    """Per-row losses and d(Σ losses)/d(student) in float64 from the math, the masked columns
    dropped (what a -inf mask on both sides means); rows with nothing left are 0."""
    if kind == "jsd" and beta in (0.0, 1.0):  # TRL's ends: forward and reverse KL
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    n, v = s.shape
    per = torch.zeros(n, dtype=torch.float64)
    grad = torch.zeros(n, v, dtype=torch.float64)
    for i in range(n):
        cols = ~mask[i]
        x = s[i, cols].detach().double().clone().requires_grad_(True)
        if not cols.any() or not torch.isfinite(x).any():
            continue
        logq = F.log_softmax(x / temperature, dim=-1)
        logp = F.log_softmax(t[i, cols].double() / temperature, dim=-1)
        p, q = logp.exp(), logq.exp()
        if kind == "forward_kl":
            loss = (p * (logp - logq)).sum()
        elif kind == "reverse_kl":
            loss = (q * (logq - logp)).sum()
        else:
            logm = torch.log(beta * p + (1 - beta) * q)
            loss = beta * (p * (logp - logm)).sum() + (1 - beta) * (q * (logq - logm)).sum()
        loss.backward()
        per[i] = loss.detach()
        grad[i, cols] = x.grad
    return per, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_matches_cpu_backend_edge_cases(device, dtype, kind, beta):
    """`device` (reduction "none", backward of the per-token sum) against the library's CPU
    backend (the exact reference, reduction "sum") on masked, NaN, ignored rows."""
    n, v = 12, 2053
    s, t = make(n, v, dtype, "cpu", seed=8)
    mask = torch.rand(n, v, generator=torch.Generator().manual_seed(9)) < 0.2
    mask[:, 0] = False
    mask[3] = True
    s[mask] = -math.inf
    t[mask] = -math.inf
    s[5] = -math.inf  # student row all masked
    t[6, 11] = math.nan  # NaN confined to row 6
    labels = torch.arange(n)
    labels[7] = -100
    kw = dict(kind=kind, beta=beta, temperature=1.3, labels=labels, reduction="sum")
    sc = s.clone().requires_grad_(True)
    loss_cpu = dkt.divergence(sc, t, **kw)
    loss_cpu.backward()
    sg = s.to(device).requires_grad_(True)
    kwc = dict(kw, labels=labels.to(device))
    per_dev = dkt.divergence(sg, t.to(device), **dict(kwc, reduction="none"))
    per_dev.sum().backward()
    per_cpu = dkt.divergence(s, t, **dict(kw, reduction="none"))
    assert torch.isnan(per_dev[6]).item() and torch.isnan(sg.grad[6]).all().item()
    keep = [i for i in range(n) if i != 6]
    tl, tg = tol(dtype)
    assert rel_err(per_dev[keep].cpu(), per_cpu[keep]) <= tl
    assert rel_err(sg.grad[keep].cpu(), sc.grad[keep]) <= tg
    assert torch.all(sg.grad[mask.to(device)].nan_to_num(0) == 0)
    assert torch.all(sg.grad[[3, 5, 7]] == 0) and torch.all(per_dev[[3, 5, 7]] == 0)
    # And against the float64 math (on CPU tensors the comparisons above are the backend with
    # itself): the rows that count, masked columns dropped.
    ref_per, ref_grad = masked_rows_reference(s, t, mask, kind, beta, 1.3)
    live = [0, 1, 2, 4, 8, 9, 10, 11]
    assert rel_err(per_dev[live].cpu(), ref_per[live]) <= tl
    assert rel_err(sg.grad[live].cpu(), ref_grad[live]) <= tg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_masks_of_finfo_min_match_masks_of_minus_infinity(device, dtype, kind, beta):
    """``masked_fill(mask, torch.finfo(dtype).min)``, as Hugging Face code masks logits, gives
    what a -inf mask gives: finite losses and gradients (on CUDA, (x - max) / T overflows f32
    to -inf inside the kernels for these; that once made the KL rows NaN)."""
    n, v = 6, 3001
    s, t = make(n, v, dtype, "cpu", seed=21)
    mask = torch.rand(n, v, generator=torch.Generator().manual_seed(22)) < 0.3
    mask[:, :9] = True  # a whole first chunk masked: the running maxima start at the mask
    mask[:, 40] = False
    results = []
    for fill in (-math.inf, torch.finfo(dtype).min):
        sm = s.masked_fill(mask, fill).to(device).requires_grad_(True)
        tm = t.masked_fill(mask, fill).to(device)
        per = dkt.divergence(sm, tm, kind=kind, beta=beta, temperature=0.7, reduction="none")
        per.sum().backward()
        assert torch.isfinite(per).all() and torch.isfinite(sm.grad).all(), fill
        results.append((per.detach(), sm.grad))
    (per_inf, g_inf), (per_min, g_min) = results
    tl, tg = tol(dtype)
    assert rel_err(per_min, per_inf) <= tl
    assert rel_err(g_min, g_inf) <= tg
    assert torch.all(g_min[mask.to(device)] == 0)


def test_large_vocabulary_and_determinism(device):
    s, t = make(4, 262145, torch.bfloat16, device, seed=10)
    out, g, ref, g_ref = ours_and_reference(s, t, "jsd", 0.5, 1.0)
    assert rel_err(out, ref) <= 1e-4 and rel_err(g, g_ref) <= 1e-2
    s1 = s.clone().requires_grad_(True)
    dkt.divergence(s1, t, kind="jsd").backward()
    s2 = s.clone().requires_grad_(True)
    dkt.divergence(s2, t, kind="jsd").backward()
    assert torch.equal(s1.grad.view(torch.int16), s2.grad.view(torch.int16))


@cuda_only("CUDA graph capture")
def test_cuda_graph_capture():
    s, t = make(16, 4096, torch.bfloat16, "cuda", seed=11)
    dkt.divergence(s, t, kind="forward_kl")  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = dkt.divergence(s, t, kind="forward_kl")
    s2, t2 = make(16, 4096, torch.bfloat16, "cuda", seed=12)
    s.copy_(s2)
    t.copy_(t2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(loss, kl_div_reference(s2, t2, "forward_kl")) <= 1e-4


@cuda_only("CUDA graph capture")
def test_cuda_graph_reads_a_device_num_items_at_every_replay():
    """python/README.md: a num_items tensor on the logits' device is read by the kernels at every
    replay of a captured graph (float32 by pointer, int64 through a captured cast), so a count
    updated in place is used; the loss matches an eager call with the new count."""
    s, t = make(16, 4096, torch.bfloat16, "cuda", seed=14)
    for dtype in (torch.float32, torch.int64):
        items = torch.tensor(7, dtype=dtype, device="cuda")
        dkt.divergence(s, t, kind="forward_kl", num_items=items)  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = dkt.divergence(s, t, kind="forward_kl", num_items=items)
        for count in (7, 11, 3):
            items.fill_(count)
            graph.replay()
            torch.cuda.synchronize()
            want = dkt.divergence(s, t, kind="forward_kl", num_items=float(count))
            assert torch.equal(loss, want), (dtype, count, loss.item(), want.item())


def test_bad_input(device):
    s, t = make(4, 64, torch.float32, device, seed=13)
    other = other_device(device)
    with pytest.raises(ValueError):
        dkt.divergence(s, t.to(other))
    with pytest.raises(ValueError):
        dkt.divergence(s, t, labels=torch.zeros(4, dtype=torch.int64, device=other))
    with pytest.raises(TypeError):
        dkt.divergence(s.double(), t)
    with pytest.raises(ValueError):
        dkt.divergence(s, t[:3])
    with pytest.raises(ValueError):
        dkt.divergence(s, t, beta=2.0)


# ---- the gradient over the student logits (grad_inplace=True) ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_grad_inplace_gives_the_same_gradients_over_the_logits(device, dtype, kind, beta):
    # The trainer's case: logits from the lm_head, the divergence's gradient written over them.
    g = torch.Generator(device="cpu").manual_seed(21)
    hidden = torch.randn(9, 32, generator=g).to(dtype).to(device)
    weight = (torch.randn(700, 32, generator=g) * 0.3).to(dtype).to(device)
    t = (torch.randn(9, 700, generator=g) * 2).to(dtype).to(device)
    labels = torch.tensor([0, -100, 2, 3, 4, 5, -100, 7, 8], device=device)
    grads = {}
    for inplace in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        s = h @ w.T
        out = dkt.divergence(s, t, kind=kind, beta=beta, temperature=1.2, labels=labels,
                             reduction="none", grad_inplace=inplace)
        if inplace:
            assert s._version > 0  # s now holds d(loss)/ds
        (out * torch.arange(1, 10, device=device, dtype=torch.float32)).sum().backward()
        grads[inplace] = (out.detach(), h.grad, w.grad)
    if dtype != torch.float16:
        for a, b in zip(grads[False], grads[True]):
            assert torch.equal(a, b)  # bitwise: the same kernel math, only the output moved
        return
    # float16: the separate gradient goes through a float32 buffer (so that it does not
    # underflow before grad_output scales it); in place it is rounded to float16 first. The same
    # losses; gradients one float16 rounding apart.
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-6, atol=0)
    for a, b in zip(grads[False][1:], grads[True][1:]):
        assert not torch.equal(a, b) or a.abs().max() == 0  # the two paths really differ
        assert (a.float() - b.float()).abs().max() <= 2e-3 * a.float().abs().max()


def test_grad_inplace_writes_over_a_strided_student_view(device):
    s0, t = make(6, 257, torch.bfloat16, device, seed=22)
    big = torch.zeros(6, 300, dtype=torch.bfloat16, device=device)
    big[:, :257] = s0
    leaf = big.clone().requires_grad_(True)
    s = (leaf * 1)[:, :257]  # an intermediate view: rows of 257 with a row stride of 300
    ref = dkt.divergence(s0.clone().requires_grad_(True), t, kind="jsd")
    ptr = s.data_ptr()
    out = dkt.divergence(s, t, kind="jsd", grad_inplace=True)
    assert torch.equal(out, ref)
    out.backward()
    s_ref = s0.clone().requires_grad_(True)
    dkt.divergence(s_ref, t, kind="jsd").backward()
    assert s.data_ptr() == ptr and torch.equal(s.detach(), s_ref.grad)  # the gradient, in s
    assert torch.equal(leaf.grad[:, :257], s_ref.grad) and (leaf.grad[:, 257:] == 0).all()


@cuda_only("torch.cuda.max_memory_allocated")
def test_cuda_grad_inplace_allocates_no_gradient():
    g = torch.Generator(device="cpu").manual_seed(24)
    hidden = torch.randn(512, 64, generator=g).to(torch.bfloat16).cuda()
    weight = (torch.randn(32000, 64, generator=g) * 0.3).to(torch.bfloat16).cuda()
    t = (torch.randn(512, 32000, generator=g) * 2).to(torch.bfloat16).cuda()
    grad_bytes = 512 * 32000 * 2
    peaks = {}
    for inplace in (False, True):
        h = hidden.clone().requires_grad_(True)
        s = h @ weight.T
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        dkt.divergence(s, t, kind="jsd", grad_inplace=inplace).backward()
        torch.cuda.synchronize()
        peaks[inplace] = torch.cuda.max_memory_allocated() - base
        del s, h
    # The separate buffer costs one [N, V] gradient; in place the call adds well under that.
    assert peaks[False] >= grad_bytes, peaks
    assert peaks[True] < grad_bytes // 4, peaks


def test_grad_inplace_beside_a_teacher_in_the_same_buffer(device):
    # Student and teacher as the two halves of one [N, 2V] output (rows that share no element):
    # the gradient goes over the student's half, the teacher's half is left as it was.
    g = torch.Generator().manual_seed(31)
    both0 = torch.randn(8, 2 * 96, generator=g).to(device)
    x = both0.clone().requires_grad_(True)
    both = x * 1.0
    s, t = both[:, :96], both[:, 96:].detach()
    teacher_before = t.clone()
    dkt.divergence(s, t, kind="jsd", grad_inplace=True).backward()
    assert torch.equal(t, teacher_before)
    e = both0[:, :96].clone().requires_grad_(True)
    dkt.divergence(e, both0[:, 96:], kind="jsd").backward()
    assert torch.equal(x.grad[:, :96], e.grad) and not x.grad[:, 96:].any()


def test_grad_inplace_refusals_and_the_version_bump(device):
    s0, t = make(4, 64, torch.float32, device, seed=23)
    leaf = s0.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="not a leaf"):
        dkt.divergence(leaf, t, grad_inplace=True)
    for view in (leaf[:, :], leaf.view(4, 64), leaf[1]):  # views of a leaf share its memory
        before = leaf.detach().clone()
        with pytest.raises(ValueError, match="view of one"):
            dkt.divergence(view, t[1] if view.dim() == 1 else t, grad_inplace=True)
        assert torch.equal(leaf.detach(), before)
    x = s0.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="contiguous"):
        dkt.divergence(x.T.contiguous().T, t, grad_inplace=True)  # column-major rows
    with pytest.raises(TypeError, match="grad_inplace must be a bool"):
        dkt.divergence(x * 1, t, grad_inplace=1)
    y = x * 1
    before = y.detach().clone()
    with pytest.raises(ValueError, match="overlaps the teacher"):
        dkt.divergence(y, y.detach(), grad_inplace=True)
    assert torch.equal(y.detach(), before)
    with pytest.raises(ValueError, match="needs the gradient"):
        dkt.divergence(y, t, grad=False, grad_inplace=True)
    # No gradient computed (grad mode off): nothing written.
    y = x * 1
    before = y.detach().clone()
    with torch.no_grad():
        z = x * 1
        dkt.divergence(z, t, grad_inplace=True)
    assert torch.equal(y.detach(), before) and torch.equal(z, before)
    # A node that saved the logits (tanh keeps its output) must not read the gradient instead.
    c = torch.tanh(x)
    out = dkt.divergence(c, t, grad_inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    # A soft-cap as written in models, cap * tanh(x / cap): the product saves the tanh, not its
    # own output, so in place is fine and gives the separate-buffer gradient.
    grads = []
    for inplace in (False, True):
        x.grad = None
        capped = 30.0 * torch.tanh(x / 30.0)
        dkt.divergence(capped, t, kind="jsd", grad_inplace=inplace).backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


# ---- CPU tensors (no GPU needed) ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_cpu_tensors(dtype, kind, beta):
    s, t = make(6, 301, dtype, "cpu", seed=14)
    out, g, ref, g_ref = ours_and_reference(s, t, kind, beta, 1.5)
    tl, tg = tol(dtype)
    assert rel_err(out, ref) <= tl and rel_err(g, g_ref) <= tg
    w = torch.rand(6)
    out, g, ref, g_ref = ours_and_reference(s, t, kind, beta, 1.0, reduction="none", upstream=w)
    assert rel_err(out, ref) <= tl and rel_err(g, g_ref) <= tg


def test_cpu_forward_only_and_backward_twice():
    s, t = make(3, 50, torch.float32, "cpu", seed=15)
    out = dkt.divergence(s, t, kind="jsd")
    assert not out.requires_grad
    s1 = s.clone().requires_grad_(True)
    out = dkt.divergence(s1, t, kind="jsd", grad=False)
    assert not out.requires_grad
    out = dkt.divergence(s1, t, kind="jsd")
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already consumed"):
        out.backward()


def test_cpu_matches_numpy_face():
    np = pytest.importorskip("numpy")
    s, t = make(5, 40, torch.float32, "cpu", seed=16)
    r = dk.divergence(s.numpy(), t.numpy(), kind="jsd", beta=0.3)
    s1 = s.clone().requires_grad_(True)
    out = dkt.divergence(s1, t, kind="jsd", beta=0.3)
    out.backward()
    assert out.item() == r.loss
    np.testing.assert_array_equal(s1.grad.numpy(), r.grad)
