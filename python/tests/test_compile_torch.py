"""distill_kernels.torch under torch.compile: the divergence, the fused linear divergence and
attention are traced into the graph as torch.library custom ops (``fullgraph=True`` compiles),
and the compiled step gives the eager face's results bit for bit (the same library calls; the
backward scales the same forward-computed buffers), which the eager tests compare with float64.

``aot_eager`` checks the tracing, the fake implementations and the autograd formulas without
code generation; one case per operation also goes through Inductor (C++ code for the CPU, with
the system compiler). Each test body runs on CPU tensors and, where a GPU is available, on CUDA
tensors (skips say so with ``pytest -rs``). Needs torch.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: torch tests skipped")

import distill_kernels.torch as dkt  # noqa: E402
from distill_kernels import torch as face  # noqa: E402

from torch_devices import device  # noqa: E402,F401


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces anew: no recompile limit, no graph left from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rand(shape, dtype, device, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def compiled(fn, backend):
    return torch.compile(fn, fullgraph=True, backend=backend)


def same(a, b):
    """Bitwise equality (NaN payloads included), dtype and shape first."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def ref_divergence(s, t, kind, beta, temperature, labels):
    """float64 per-token divergence (masked rows 0) and the batchmean loss."""
    p = torch.log_softmax(s.double() / temperature, -1)
    q = torch.log_softmax(t.double() / temperature, -1)
    if kind == "forward_kl":
        per = (q.exp() * (q - p)).sum(-1)
    elif kind == "reverse_kl":
        per = (p.exp() * (p - q)).sum(-1)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        m = torch.logaddexp(q + b.log(), p + (1 - b).log())
        per = b * (q.exp() * (q - m)).sum(-1) + (1 - b) * (p.exp() * (p - m)).sum(-1)
    keep = torch.ones_like(per) if labels is None else (labels != -100).double()
    return per * keep, (per * keep).sum() / keep.sum()


# ---- divergence ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none", "num_items"])
def test_divergence_fullgraph_matches_eager_bitwise(device, kind, dtype, reduction):
    n, v = 7, 333
    s0 = rand((n, v), dtype, device, 1)
    t = rand((n, v), dtype, device, 2)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3)).to(device)
    labels[2] = -100
    red = "batchmean" if reduction == "num_items" else reduction
    extra = {"num_items": 11.0} if reduction == "num_items" else {}
    w = rand((n,), torch.float32, device, 4)  # per-row grad_output for "none"

    def step(s, t, labels):
        out = dkt.divergence(s, t, kind=kind, beta=0.3, temperature=1.7, labels=labels,
                             reduction=red, **extra)
        return (out * w).sum() if red == "none" else out * 3.0

    results = []
    for fn in (step, compiled(step, "aot_eager")):
        s = s0.clone().requires_grad_()
        loss = fn(s, t, labels)
        loss.backward()
        results.append((loss.detach(), s.grad))
    (l_e, g_e), (l_c, g_c) = results
    same(l_e, l_c)
    same(g_e, g_c)
    assert g_c.dtype == dtype
    # And the value is the divergence (an independent float64 check of the compiled step).
    per, mean = ref_divergence(s0, t, kind, 0.3, 1.7, labels)
    want = {"batchmean": mean * 3, "sum": per.sum() * 3, "none": (per * w.double()).sum(),
            "num_items": per.sum() / 11.0 * 3}[reduction]
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert abs(float(l_c) - float(want)) <= tol * max(1.0, abs(float(want)))


def test_divergence_inductor_scales_the_forward_buffer_in_place(device, monkeypatch):
    """Inductor runs the backward's scale_grad_ on the buffer the forward wrote (AOTAutograd
    donates it): no copy, so the compiled backward costs what the eager one does."""
    n, v = 5, 257
    s0 = rand((n, v), torch.bfloat16, device, 5)
    t = rand((n, v), torch.bfloat16, device, 6)
    seen = {}
    run, scale = face._divergence_run, face._scale_by_grad_output

    def run_spy(*a, **k):
        out = run(*a, **k)
        seen["forward"] = out[2].data_ptr()
        return out

    def scale_spy(g, *a):
        seen["backward"] = g.data_ptr()
        return scale(g, *a)

    monkeypatch.setattr(face, "_divergence_run", run_spy)
    monkeypatch.setattr(face, "_scale_by_grad_output", scale_spy)

    def step(s, t):
        return dkt.divergence(s, t, kind="jsd") * 2.0

    s = s0.clone().requires_grad_()
    loss = compiled(step, "inductor")(s, t)
    loss.backward()
    assert seen["backward"] == seen["forward"]
    e = s0.clone().requires_grad_()
    monkeypatch.undo()
    (dkt.divergence(e, t, kind="jsd") * 2.0).backward()
    same(loss.detach(), (dkt.divergence(s0, t, kind="jsd") * 2.0))
    same(s.grad, e.grad)


def test_divergence_compiled_forward_only_and_1d(device):
    v = 100
    s = rand((v,), torch.float32, device, 7).requires_grad_()
    t = rand((v,), torch.float32, device, 8)

    def fwd(s, t):
        with torch.no_grad():
            a = dkt.divergence(s, t, kind="forward_kl")
        b = dkt.divergence(s, t, kind="forward_kl", grad=False)
        return a, b

    a, b = compiled(fwd, "aot_eager")(s, t)
    assert not a.requires_grad and not b.requires_grad
    same(a, dkt.divergence(s.detach(), t, kind="forward_kl"))
    same(a, b)

    def grad1d(s, t):
        return dkt.divergence(s, t, kind="reverse_kl", reduction="none")

    out = compiled(grad1d, "aot_eager")(s, t)
    assert out.shape == ()
    out.backward()
    e = s.detach().clone().requires_grad_()
    dkt.divergence(e, t, kind="reverse_kl", reduction="none").backward()
    same(s.grad, e.grad)


def test_divergence_compiled_leading_axes_and_num_items_tensor(device):
    """[B, T, V] logits sliced for the next-token shift, labels [B, T], and Hugging Face's
    num_items_in_batch as a device tensor: one graph, the eager results bit for bit."""
    s0 = rand((2, 6, 90), torch.bfloat16, device, 14)
    t = rand((2, 6, 90), torch.bfloat16, device, 15)
    labels = torch.randint(0, 90, (2, 5), generator=torch.Generator().manual_seed(16))
    labels = labels.to(device)
    labels[0, 0] = -100
    items = torch.tensor(9, device=device)

    def step(s, t, labels, items):
        return dkt.divergence(s[:, :-1], t[:, :-1], kind="forward_kl", labels=labels,
                              num_items=items)

    results = []
    for fn in (step, compiled(step, "aot_eager")):
        s = s0.clone().requires_grad_()
        loss = fn(s, t, labels, items)
        loss.backward()
        results.append((loss.detach(), s.grad))
    for e, c in zip(*results):
        same(e, c)


def test_divergence_compiled_rejects_bad_parameters(device):
    s = rand((3, 50), torch.float32, device, 9).requires_grad_()
    t = rand((3, 50), torch.float32, device, 10)
    # Refused before the op is traced: the eager error type without fullgraph.
    with pytest.raises(ValueError, match="kind must be one of"):
        torch.compile(lambda s, t: dkt.divergence(s, t, kind="kl"), backend="aot_eager")(s, t)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="reduction must be one of"):
        torch.compile(lambda h, w: dkt.fused_linear_divergence(h, w, h, w, reduction="avg"),
                      backend="aot_eager")(s, s.detach().clone())
    torch._dynamo.reset()
    # A float given as an input of the compiled function: its range checked when the op runs.
    with pytest.raises(ValueError, match="temperature must be finite and at least"):
        compiled(lambda s, t, T: dkt.divergence(s, t, temperature=T), "aot_eager")(s, t, -1.0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="student shape"):
        compiled(lambda s, t: dkt.divergence(s, t), "aot_eager")(s, t[:, :40])


def test_divergence_grad_inplace_stays_eager_under_compile(device):
    """grad_inplace writes over an input: a graph break (refused by fullgraph=True), with the
    eager result otherwise."""
    x = rand((4, 16), torch.float32, device, 11)
    w0 = rand((60, 16), torch.float32, device, 12)
    t = rand((4, 60), torch.float32, device, 13)

    def step(x, w, t):
        return dkt.divergence(x @ w.T, t, grad_inplace=True)

    w = w0.clone().requires_grad_()
    with pytest.raises(Exception, match="(?i)skip|disable|graph break"):
        compiled(step, "aot_eager")(x, w, t)
    torch._dynamo.reset()
    loss = torch.compile(step, backend="aot_eager")(x, w, t)
    loss.backward()
    e = w0.clone().requires_grad_()
    step(x, e, t).backward()
    same(w.grad, e.grad)


# ---- fused linear divergence ---------------------------------------------------------------------


# One Inductor case per operation (its C++ compile takes seconds); aot_eager covers the rest.
@pytest.mark.parametrize("backend,dtype", [("aot_eager", torch.float32),
                                           ("aot_eager", torch.bfloat16),
                                           ("inductor", torch.bfloat16)])
def test_fused_fullgraph_matches_eager_bitwise(device, backend, dtype):
    b, s_len, h, v = 2, 5, 16, 70
    hs0 = rand((b, s_len, h), dtype, device, 20, 1.0)
    w0 = rand((v, h), dtype, device, 21, 0.5)
    ht = rand((b, s_len, h), dtype, device, 22, 1.0)
    labels = torch.randint(0, v, (b, s_len), generator=torch.Generator().manual_seed(23))
    labels = labels.to(device)
    labels[1, 3] = -100

    def step(hs, w, ht, labels):  # self-distillation: the teacher reads the student's head
        return dkt.fused_linear_divergence(hs, w, ht, w, kind="jsd", beta=0.4, temperature=1.3,
                                           labels=labels, softcap=15.0, logit_scale=0.9,
                                           chunk_rows=3) * 2.0

    results = []
    for fn in (step, compiled(step, backend)):
        hs, w = hs0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(hs, w, ht, labels)
        loss.backward()
        results.append((loss.detach(), hs.grad, w.grad))
    for e, c in zip(*results):
        same(e, c)


def test_fused_compiled_per_token_and_frozen_weight(device):
    n, h, v = 6, 8, 40
    hs0 = rand((n, h), torch.float32, device, 24)
    w = rand((v, h), torch.float32, device, 25, 0.5)
    ht = rand((n, h), torch.float32, device, 26)
    wt = rand((v, h), torch.float32, device, 27, 0.5)
    scale = rand((n,), torch.float32, device, 28)

    def step(hs, w, ht, wt):
        per = dkt.fused_linear_divergence(hs, w, ht, wt, kind="reverse_kl", reduction="none")
        return (per * scale).sum()

    results = []
    for fn in (step, compiled(step, "aot_eager")):
        hs = hs0.clone().requires_grad_()
        loss = fn(hs, w, ht, wt)
        loss.backward()
        results.append((loss.detach(), hs.grad))
    for e, c in zip(*results):
        same(e, c)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="reduction='none' with student_weight"):
        compiled(step, "aot_eager")(hs0, w.clone().requires_grad_(), ht, wt)


def test_fused_accumulate_stays_eager_under_compile(device):
    n, h, v = 4, 8, 30
    hs = rand((n, h), torch.float32, device, 29)
    w = rand((v, h), torch.float32, device, 30, 0.5)
    ht = rand((n, h), torch.float32, device, 31)
    gw_c = rand((v, h), torch.float32, device, 32)
    gw_e = gw_c.clone()

    def step(hs, w, ht, gw):
        return dkt.fused_linear_divergence(hs, w, ht, w, grad_weight_out=gw)

    loss_c = torch.compile(step, backend="aot_eager")(hs, w, ht, gw_c)
    loss_e = step(hs, w, ht, gw_e)
    same(loss_c, loss_e)
    same(gw_c, gw_e)


# ---- attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_attention_fullgraph_matches_eager_bitwise(device, backend):
    dtype = torch.bfloat16
    b, sq, sk, hq, hkv, d = 2, 9, 12, 6, 2, 64
    q0 = rand((b, sq, hq, d), dtype, device, 40, 1.0)
    k0 = rand((b, sk, hkv, d), dtype, device, 41, 1.0)
    v0 = rand((b, sk, hkv, d), dtype, device, 42, 1.0)
    w = rand((b, sq, hq, d), torch.float32, device, 43)

    def step(q, k, v):
        out, lse = dkt.attention(q, k, v, causal=True, softmax_scale=0.2, return_lse=True)
        return (out.float() * w).sum(), lse

    results = []
    for fn in (step, compiled(step, backend)):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        loss, lse = fn(q, k, v)
        loss.backward()
        results.append((lse, q.grad, k.grad, v.grad))
    for e, c in zip(*results):
        same(e, c)


@pytest.mark.parametrize("bounds", [False, True])
def test_attention_varlen_fullgraph_matches_eager_bitwise(device, bounds):
    """Packed sequences (one empty); without max_seqlen bounds the op reads the offsets itself
    (the one host synchronisation), with them it does not."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hq, hkv, d = 4, 2, 128
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=device)
    q0 = rand((10, hq, d), dtype, device, 44, 1.0)
    kv0 = rand((10, hkv, d), dtype, device, 45, 1.0)
    extra = {"max_seqlen_q": 7, "max_seqlen_k": 7} if bounds else {}

    def step(q, kv):  # k is v: one tensor for both
        out = dkt.attention(q, kv, kv, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, **extra)
        return (out * out).sum()

    results = []
    for fn in (step, compiled(step, "aot_eager")):
        q, kv = q0.clone().requires_grad_(), kv0.clone().requires_grad_()
        loss = fn(q, kv)
        loss.backward()
        results.append((loss.detach(), q.grad, kv.grad))
    for e, c in zip(*results):
        same(e, c)


def test_attention_compiled_under_autocast(device):
    """torch.autocast inside the compiled region casts q, k, v as the eager face does."""
    amp = torch.bfloat16
    q0 = rand((1, 5, 2, 64), torch.float32, device, 46, 1.0)
    k0 = rand((1, 5, 1, 64), torch.float32, device, 47, 1.0)

    def step(q, k):
        with torch.autocast(device_type=device, dtype=amp):
            return dkt.attention(q, k, k).float().sum()

    results = []
    for fn in (step, compiled(step, "aot_eager")):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        loss = fn(q, k)
        loss.backward()
        results.append((loss.detach(), q.grad, k.grad))
    for e, c in zip(*results):
        same(e, c)
    assert results[1][1].dtype == torch.float32


# ---- the ops' registrations ----------------------------------------------------------------------


# The gradient outputs of the divergence ops are the backward's own buffers (scaled in place):
# opcheck's AOT-dispatch test hands them to the caller as results, which the wrappers never do;
# the compiled-step tests above cover that path.
NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_ops_pass_torch_library_opcheck(device):
    """torch.library.opcheck: schemas (mutation declared), fake implementations against the
    real ones, autograd registration, and (attention, scale_grad_) AOT dispatch."""
    s = rand((3, 40), torch.float32, device, 50).requires_grad_()
    t = rand((3, 40), torch.float32, device, 51)
    items = torch.tensor(5, device=device)  # a tensor num_items, read where the op runs
    for num_items_t in (None, items):
        torch.library.opcheck(torch.ops.distill_kernels.divergence.default,
                              (s, t, None, "jsd", 0.5, 1.0, -100, "batchmean", None, True,
                               num_items_t),
                              test_utils=NO_AOT)
    hs = rand((4, 8), torch.float32, device, 52).requires_grad_()
    w = rand((30, 8), torch.float32, device, 53).requires_grad_()
    for reduction, num_items_t in (("sum", None), ("batchmean", items)):
        torch.library.opcheck(torch.ops.distill_kernels.fused_linear_divergence.default,
                              (hs, w, hs.detach(), w.detach(), None, "forward_kl", 0.5, 1.0,
                               -100, reduction, None, 1.0, None, None, True, True,
                               torch.float32, num_items_t),
                              test_utils=NO_AOT)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = rand((1, 6, 4, 64), dtype, device, 54).requires_grad_()
    k = rand((1, 6, 2, 64), dtype, device, 55).requires_grad_()
    v = rand((1, 6, 2, 64), dtype, device, 56).requires_grad_()
    torch.library.opcheck(torch.ops.distill_kernels.attention_forward.default,
                          (q, k, v, None, None, None, None, True, None, True))
    g = rand((3, 40), torch.float32, device, 57)
    with torch.no_grad():  # it runs in backward passes, and refuses create_graph's grad mode
        torch.library.opcheck(torch.ops.distill_kernels.scale_grad_.default,
                              (g, torch.full((3,), 0.5, device=device), True))


def test_compiled_double_backward_raises_as_in_eager(device):
    """create_graph=True: the forward-computed gradients have no second-order terms; compiled,
    the backward's scale_grad_ refuses it instead of returning a first-order result."""
    s0 = rand((4, 30), torch.float32, device, 60)
    t = rand((4, 30), torch.float32, device, 61)
    h0 = rand((4, 8), torch.float32, device, 62)
    w = rand((30, 8), torch.float32, device, 63)

    def div(s):
        return dkt.divergence(s, t, kind="jsd")

    def fused(h):
        return dkt.fused_linear_divergence(h, w, h.detach(), w)

    for fn, x0 in ((div, s0), (fused, h0)):
        for f in (fn, compiled(fn, "aot_eager")):
            x = x0.clone().requires_grad_()
            loss = f(x)
            with pytest.raises(RuntimeError, match="double backward"):
                torch.autograd.grad(loss, x, create_graph=True)
            torch._dynamo.reset()


def test_compiled_attention_refuses_bad_layouts_clearly(device):
    q = rand((8, 64), torch.float32, device, 64)
    with pytest.raises(ValueError, match="q must be 4-D"):
        torch.compile(lambda q: dkt.attention(q, q, q), backend="aot_eager")(q)
    torch._dynamo.reset()
    q = rand((1, 4, 2, 64), torch.float32, device, 65)
    k = rand((1, 4, 1, 64), torch.float32, device, 66)
    with pytest.raises(ValueError, match="must have the same shape"):
        torch.compile(lambda q, k: dkt.attention(q, k, k[:, :3]), backend="aot_eager")(q, k)


def test_a_changing_num_items_tensor_compiles_once(device):
    """num_items as a tensor (Hugging Face's num_items_in_batch) is data, not a constant: new
    values reuse the graph."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    t = rand((4, 30), torch.float32, device, 67)
    step = torch.compile(lambda s, n: dkt.divergence(s, t, num_items=n), backend=counter,
                         fullgraph=True)
    for i in range(5):
        s = rand((4, 30), torch.float32, device, 68 + i).requires_grad_()
        step(s, torch.tensor(3 + i, device=device)).backward()
        e = s.detach().clone().requires_grad_()
        dkt.divergence(e, t, num_items=torch.tensor(3 + i, device=device)).backward()
        same(s.grad, e.grad)
    assert counter.frame_count == 1
