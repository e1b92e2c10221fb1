"""What a training step relies on from the torch face, beyond the math: float16 gradients that
survive an AMP loss scale, a clear error for second derivatives, a constant teacher, and no
hidden host synchronisation through tensor-valued parameters.

Needs torch. Each test body taking ``device`` runs on CPU tensors (the library's CPU backend)
and, where a GPU is available, on CUDA tensors. Skips show their reason with ``pytest -rs``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: torch contract tests skipped")
import torch.nn.functional as F  # noqa: E402

import distill_kernels.torch as dkt  # noqa: E402

from torch_devices import device  # noqa: E402,F401 (the fixture)

# GradScaler's initial scale.
LOSS_SCALE = 65536.0


def forward_kl_f64(s, t):
    """batchmean KL(p || q), p = softmax(t), q = softmax(s), in float64 by torch itself."""
    return F.kl_div(F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1),
                    reduction="batchmean", log_target=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def self_distillation_logits(n, v, seed):
    """A teacher close to the student (self-distillation): the gradient entries, about
    (q - p) / N, lie far below float16's smallest value."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 0.5
    t = s + torch.randn(n, v, generator=g) * 0.02
    return s, t


def test_float16_gradient_survives_a_loss_scale(device):
    n, v = 256, 8192
    s, t = self_distillation_logits(n, v, 3)
    s16, t16 = s.half().to(device), t.half().to(device)
    x = s16.clone().requires_grad_(True)
    (dkt.divergence(x, t16, kind="forward_kl") * LOSS_SCALE).backward()
    assert x.grad.dtype == torch.float16
    # Reference: the gradient of the same (float16-valued) logits in float64, scaled as
    # GradScaler does, compared after unscaling.
    xr = s16.double().cpu().requires_grad_(True)
    (forward_kl_f64(xr, t16.cpu()) * LOSS_SCALE).backward()
    got = x.grad.cpu().double() / LOSS_SCALE
    want = xr.grad / LOSS_SCALE
    assert rel(got, want) < 2e-3
    # The shape really exercises the hazard: rounding the unscaled gradient to float16 first
    # (what a float16 gradient buffer did) loses most of it.
    assert rel(want.half().double(), want) > 0.1


def test_float16_fused_gradients_survive_a_loss_scale(device):
    n, h, v = 1024, 32, 4096
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.1
    teacher_hidden = hidden + 0.02 * torch.randn(n, h, generator=g)  # self-distillation
    hs, ws, ht = (x.half().to(device) for x in (hidden, weight, teacher_hidden))
    a = hs.clone().requires_grad_(True)
    b = ws.clone().requires_grad_(True)
    loss = dkt.fused_linear_divergence(a, b, ht, ws, kind="forward_kl")
    (loss * LOSS_SCALE).backward()
    assert a.grad.dtype == torch.float16 and b.grad.dtype == torch.float16
    ar = hs.cpu().double().requires_grad_(True)
    br = ws.cpu().double().requires_grad_(True)
    ref = forward_kl_f64(ar @ br.T, ht.cpu().double() @ ws.cpu().double().T)
    (ref * LOSS_SCALE).backward()
    assert rel(a.grad.cpu().double(), ar.grad) < 5e-3
    assert rel(b.grad.cpu().double(), br.grad) < 5e-3
    # Rounded to float16 before the scale, the gradients lose much of themselves.
    losses = [rel((g / LOSS_SCALE).half().double(), g / LOSS_SCALE) for g in (ar.grad, br.grad)]
    assert max(losses) > 0.1


def test_double_backward_raises_instead_of_dropping_second_order_terms(device):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(6, 16, generator=g).to(device).requires_grad_(True)
    w = torch.randn(33, 16, generator=g).to(device).requires_grad_(True)
    t = torch.randn(6, 33, generator=g).to(device)
    # A gradient penalty: the gradient w.r.t. h would need this call's second derivative.
    out = dkt.divergence(h @ w.T, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, h, create_graph=True)
    out = dkt.fused_linear_divergence(h, w, h.detach(), w.detach())
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, h, create_graph=True)
    # A plain backward of a fresh graph still works, inside activation checkpointing too.
    for reentrant in (False, True):
        h.grad = None
        loss = torch.utils.checkpoint.checkpoint(
            lambda x: dkt.divergence(x @ w.T, t), h, use_reentrant=reentrant)
        loss.backward()
        ref_h = h.detach().clone().requires_grad_(True)
        dkt.divergence(ref_h @ w.detach().T, t).backward()
        assert torch.equal(h.grad, ref_h.grad)


def test_attention_and_moe_double_backward_raise(device):
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 5, 2, 64, generator=g).to(device).requires_grad_(True)
    k = torch.randn(1, 7, 1, 64, generator=g).to(device)
    v = torch.randn(1, 7, 1, 64, generator=g).to(device)
    out = dkt.attention(q, k, v)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    x = torch.randn(10, 16, generator=g).to(device).requires_grad_(True)
    route = dkt.moe_route(torch.randn(10, 4, generator=g).to(device), 2)
    y = dkt.moe_combine(dkt.moe_permute(x, route), route)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_a_teacher_that_requires_grad_stays_a_constant(device):
    g = torch.Generator().manual_seed(9)
    s = torch.randn(4, 50, generator=g).to(device)
    t = torch.randn(4, 50, generator=g).to(device).requires_grad_(True)
    out = dkt.divergence(s, t)
    assert not out.requires_grad and out.grad_fn is None
    x = s.clone().requires_grad_(True)
    dkt.divergence(x, t).backward()
    assert x.grad is not None and t.grad is None


def test_tensor_valued_scalars_are_refused_except_num_items(device):
    s = torch.randn(4, 50).to(device)
    h, w = torch.randn(4, 8).to(device), torch.randn(50, 8).to(device)
    for name in ("beta", "temperature"):
        with pytest.raises(TypeError, match=name):
            dkt.divergence(s, s, **{name: torch.tensor(0.5)})
    for name in ("beta", "temperature", "logit_scale", "softcap"):
        with pytest.raises(TypeError, match=name):
            dkt.fused_linear_divergence(h, w, h, w, **{name: torch.tensor(0.5)})
    with pytest.raises(ValueError, match="num_items only applies"):
        dkt.divergence(s, s, reduction="sum", num_items=torch.tensor(3.0))
    with pytest.raises(ValueError, match="reduction must be one of"):
        dkt.divergence(s, s, reduction="mean", num_items=torch.tensor(3.0))
    with pytest.raises(ValueError, match="one value"):
        dkt.divergence(s, s, num_items=torch.tensor([3.0, 4.0]))


def _bits_equal(x, y, what):
    assert x.dtype == y.dtype and x.shape == y.shape, what
    assert torch.equal(x.view(torch.int32) if x.dtype == torch.float32 else x,
                       y.view(torch.int32) if y.dtype == torch.float32 else y), what


def test_num_items_as_a_tensor_is_folded_into_the_gradient(device):
    """Hugging Face's num_items_in_batch is a tensor: read where the call runs (on the device:
    no host sync) and folded into the gradient by the kernel, so the loss has no division node
    (backward makes no pass over the gradient) and the results are bitwise those of the Python
    number; a value that is not a finite float32 of at least 2^-126 (a subnormal's reciprocal
    overflows) gives the sum."""
    g = torch.Generator().manual_seed(14)
    s0 = torch.randn(2, 5, 60, generator=g).to(device)
    t = torch.randn(2, 5, 60, generator=g).to(device)
    labels = torch.randint(0, 60, (2, 5), generator=g).to(device)
    labels[0, :2] = -100
    h0, w0 = torch.randn(2, 5, 8, generator=g).to(device), torch.randn(60, 8, generator=g).to(device)

    def run(items, reduction="batchmean"):
        s = s0.clone().requires_grad_(True)
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        a = dkt.divergence(s, t, kind="jsd", labels=labels, num_items=items, reduction=reduction)
        b = dkt.fused_linear_divergence(h, w, h0, w0, labels=labels, num_items=items,
                                        reduction=reduction)
        names = (type(a.grad_fn).__name__, type(b.grad_fn).__name__)
        (a + b).backward()
        return (a.detach(), b.detach(), s.grad, h.grad, w.grad), names

    want, _ = run(17.0)
    for items in (torch.tensor(17, device=device), torch.tensor([17.0]),
                  torch.tensor(17.0, dtype=torch.float64, device=device)):
        got, names = run(items)
        assert names == ("DivergenceFunctionBackward", "FusedLinearFunctionBackward"), names
        for x, y in zip(got, want):
            _bits_equal(x, y, f"num_items={items!r}")
    want_sum, _ = run(None, reduction="sum")
    for bad in (0, -3.0, float("nan"), float("inf"), 2.0**-127):
        for items in (torch.tensor(bad, device=device), torch.tensor(bad)):
            got, _ = run(items)
            for x, y in zip(got, want_sum):
                _bits_equal(x, y, f"num_items={items!r}")
    zero = dkt.divergence(s0, t, labels=torch.full((2, 5), -100, device=device),
                          num_items=torch.tensor(0, device=device))
    assert zero.item() == 0.0


def test_num_items_read_on_the_host_for_inputs_elsewhere():
    """A CPU tensor with inputs on another device (CUDA; the meta device stands in for it here,
    so this runs without a GPU) is read on the host as float32: its value, or the sum where it is
    not a finite float32 of at least 2^-126 (a float64 1e39 overflows, 1e-50 rounds to 0, 1e-40
    is subnormal)."""
    from distill_kernels.torch import _num_items_resolved, _positive_or_one
    elsewhere = torch.empty(0, device="meta")
    for value, want in ((17, 17.0), (2.5, 2.5), (torch.tensor(3.0, dtype=torch.float64), 3.0)):
        got = _num_items_resolved(torch.as_tensor(value).reshape(1), None, "batchmean",
                                  elsewhere)
        assert got == (want, None, "batchmean"), got
    for bad in (0, -2.0, float("nan"), float("inf"), 1e39, 1e-50, 1e-40):
        got = _num_items_resolved(torch.tensor(bad, dtype=torch.float64), None, "batchmean",
                                  elsewhere)
        assert got == (None, None, "sum"), (bad, got)
    # Same device: the float32 [1] tensor the library reads, no host read.
    num, mem, red = _num_items_resolved(torch.tensor(9), None, "batchmean", torch.empty(0))
    assert num is None and red == "batchmean" and mem.dtype == torch.float32
    assert mem.shape == (1,) and mem.item() == 9.0
    # No tensor: the Python number stands.
    assert _num_items_resolved(None, 4.0, "batchmean", elsewhere) == (4.0, None, "batchmean")
    # The torch.compile fallback's divisor: the value, or 1.
    assert _positive_or_one(torch.tensor(6)).item() == 6.0
    for bad in (0.0, -1.0, float("nan"), float("-inf"), 1e39, 1e-40):
        assert _positive_or_one(torch.tensor(bad, dtype=torch.float64)).item() == 1.0


def test_num_items_tensor_with_accumulated_gradients(device):
    """The accumulating fused form (gradients added into the caller's buffers) takes a tensor
    num_items too: bitwise the Python number's sums."""
    g = torch.Generator().manual_seed(18)
    h = torch.randn(6, 8, generator=g).to(device)
    w = torch.randn(40, 8, generator=g).to(device)
    ht = torch.randn(6, 8, generator=g).to(device)
    labels = torch.randint(0, 40, (6,), generator=g).to(device)
    labels[3] = -100
    start_h = torch.randn(6, 8, generator=g).to(device)
    start_w = torch.randn(40, 8, generator=g).to(device)
    outs = []
    for items in (23.0, torch.tensor(23, device=device), torch.tensor(23.0)):
        gh, gw = start_h.clone(), start_w.clone()
        loss = dkt.fused_linear_divergence(h, w, ht, w, labels=labels, num_items=items,
                                           grad_hidden_out=gh, grad_weight_out=gw)
        outs.append((loss, gh, gw))
    for got in outs[1:]:
        for x, y in zip(got, outs[0]):
            _bits_equal(x, y, "accumulated with a tensor num_items")


def test_divergence_takes_leading_axes(device):
    """[B, T, V] logits: the rows of the flattened tensor, labels and per-token losses [B, T];
    a contiguous student is read in place (grad_inplace works), a sliced one is copied."""
    g = torch.Generator().manual_seed(15)
    s0 = torch.randn(3, 4, 70, generator=g).to(device)
    t = torch.randn(3, 4, 70, generator=g).to(device)
    labels = torch.randint(0, 70, (3, 4), generator=g).to(device)
    labels[1, 2] = -100
    s = s0.clone().requires_grad_(True)
    per = dkt.divergence(s, t, kind="reverse_kl", labels=labels, reduction="none")
    assert per.shape == (3, 4)
    w = torch.randn(3, 4, generator=g).to(device)
    (per * w).sum().backward()
    flat = s0.reshape(12, 70).clone().requires_grad_(True)
    per2 = dkt.divergence(flat, t.reshape(12, 70), kind="reverse_kl", labels=labels.reshape(12),
                          reduction="none")
    (per2 * w.reshape(12)).sum().backward()
    assert torch.equal(per.reshape(12), per2.detach())
    assert torch.equal(s.grad.reshape(12, 70), flat.grad)
    x = s0.clone().requires_grad_(True)
    y = x * 1.0  # an intermediate result: grad_inplace writes over it
    dkt.divergence(y, t, labels=labels, grad_inplace=True).backward()
    e = s0.clone().requires_grad_(True)
    dkt.divergence(e, t, labels=labels).backward()
    assert torch.equal(x.grad, e.grad)
    sliced = s0.clone().requires_grad_(True)
    dkt.divergence(sliced[:, :-1], t[:, :-1]).backward()
    e = s0[:, :-1].clone().requires_grad_(True)
    dkt.divergence(e, t[:, :-1]).backward()
    assert torch.equal(sliced.grad[:, :-1], e.grad) and not sliced.grad[:, -1].any()
    with pytest.raises(ValueError, match="flatten without a copy"):
        dkt.divergence((sliced * 1.0)[:, :-1], t[:, :-1], grad_inplace=True)
    # Labels flattened to [N] (as for cross_entropy) name the same rows, row-major.
    flat_labels = dkt.divergence(s0, t, kind="reverse_kl", labels=labels.reshape(12),
                                 reduction="none")
    assert torch.equal(flat_labels, per.detach()) and flat_labels.shape == (3, 4)
    for bad in (labels.reshape(4, 3), labels.reshape(12)[:-1], labels[:, :-1]):
        with pytest.raises(ValueError, match=r"labels must have shape \(3, 4\) or \(12,\)"):
            dkt.divergence(s0, t, labels=bad)


def test_torch_compile_traces_the_calls_as_custom_ops_not_ctypes(device):
    import warnings

    g = torch.Generator().manual_seed(10)
    h = torch.randn(8, 16, generator=g).to(device)
    w = torch.randn(64, 16, generator=g).to(device)
    t = torch.randn(8, 64, generator=g).to(device)

    def step(h, w):
        a = dkt.divergence(h @ w.T, t, kind="jsd")
        b = dkt.fused_linear_divergence(h, w, h.detach(), w.detach(), kind="forward_kl")
        return a + b

    grads = []
    for fn in (step, torch.compile(step, backend="eager"),
               torch.compile(step, backend="eager", fullgraph=True)):
        torch._dynamo.reset()
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(hh, ww).backward()
        # Dynamo warns once per ctypes builtin it fails to trace: none is traced.
        assert not [c for c in caught if "Dynamo" in str(c.message)], caught
        grads.append((hh.grad, ww.grad))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    # The MoE faces stay eager behind a graph break: fullgraph refuses them.
    torch._dynamo.reset()
    logits = torch.randn(8, 4, generator=g).to(device)
    with pytest.raises(Exception, match="(?i)skip|disable|graph break"):
        torch.compile(lambda x: dkt.moe_route(x, 2).weights, backend="eager",
                      fullgraph=True)(logits)
    torch._dynamo.reset()


def test_an_empty_batch_is_a_zero_loss_with_empty_gradients(device):
    # Every token of a micro-batch filtered out (logits[mask] with no True): no error.
    h = torch.zeros(0, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    t = torch.zeros(0, 40, device=device)
    loss = dkt.divergence(h @ w.T, t)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 16) and not w.grad.any()
    h.grad = w.grad = None
    loss = dkt.fused_linear_divergence(h, w, h.detach(), w.detach())
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 16)
    assert w.grad.shape == (40, 16) and not w.grad.any()
    # Empty tensors report odd strides (0 or 1): no row is read, so any layout is accepted.
    for odd in (torch.zeros(1, 40, device=device).expand(0, 40),
                torch.zeros(40, 0, device=device).t(),
                torch.zeros(8, device=device).as_strided((0, 40), (1, 1))):
        assert dkt.divergence(odd, t).item() == 0.0
        assert dkt.fused_linear_divergence(odd[:, :16], w, odd[:, :16], w).item() == 0.0


def test_fused_follows_autocast_like_a_linear_layer(device):
    # A float32 lm_head under autocast(bfloat16): the same call as with bfloat16 inputs cast by
    # hand, and a float32 gradient for the float32 weight.
    g = torch.Generator().manual_seed(11)
    h = torch.randn(12, 16, generator=g).to(device)
    w = torch.randn(50, 16, generator=g).to(device)
    a, b = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = dkt.fused_linear_divergence(a, b, a.detach(), b.detach(), kind="jsd")
    loss.backward()
    assert b.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
    a2, b2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ab, bb = a2.to(torch.bfloat16), b2.to(torch.bfloat16)
    loss2 = dkt.fused_linear_divergence(ab, bb, ab.detach(), bb.detach(), kind="jsd")
    loss2.backward()
    assert torch.equal(loss, loss2)
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)


def test_attention_follows_autocast_like_sdpa(device):
    # float32 q, k, v (e.g. after a float32 RoPE) under autocast(bfloat16): the result and the
    # gradients are those of the same call on bfloat16 casts, with float32 gradients back.
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, 5, 4, 64, generator=g).to(device)
    k = torch.randn(1, 7, 2, 64, generator=g).to(device)
    a, b = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = dkt.attention(a, b, b, causal=True)  # k is v: one cast, both gradients summed
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    a2, b2 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    kb = b2.to(torch.bfloat16)
    out2 = dkt.attention(a2.to(torch.bfloat16), kb, kb, causal=True)
    out2.float().sum().backward()
    assert torch.equal(out, out2)
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)
    # Autocast casts floating inputs only: integers are still refused.
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="not supported"):
            dkt.attention(q.to(torch.int32), k.to(torch.int32), k.to(torch.int32))


def test_moe_over_no_tokens(device):
    r = dkt.moe_route(torch.zeros(0, 6, device=device), 2, block=4)
    assert r.num_rows == 0 and not r.counts.any() and not r.offsets.any()
    x = torch.zeros(0, 8, device=device, requires_grad=True)
    y = dkt.moe_combine(dkt.moe_permute(x, r), r)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)

