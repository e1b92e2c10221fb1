"""distill_kernels.torch MoE dispatch against the plain-PyTorch implementation and autograd.

The reference is what a PyTorch user writes (ANCHORS.md, "MoE dispatch in plain PyTorch"): route
by softmax / sigmoid + sort + argsort, permute by index_select, combine by index_add, gradients
by torch autograd; evaluated in float64. Needs torch. Each test body taking ``device`` runs on CPU
tensors (the library's CPU backend) and, where a GPU is available (and the library was built with
nvcc), on CUDA tensors; the tests about CUDA itself (host syncs, side streams) are CUDA-only.
Skips show their reason with ``pytest -rs``.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: MoE torch tests skipped")

import distill_kernels as dk  # noqa: E402
import distill_kernels.torch as dkt  # noqa: E402

from torch_devices import cuda_only, other_device, device  # noqa: E402,F401 (device: the fixture)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in the output"
    den = torch.linalg.vector_norm(ref).item()
    return torch.linalg.vector_norm(out - ref).item() / (den if den > 0 else 1.0)


# ---- plain PyTorch (float64) -------------------------------------------------------------------


def torch_route(logits, k, *, score="softmax", renormalize=False, bias=None, n_groups=1,
                topk_groups=1, scale=1.0, capacity=None, block=1):
    """Routing the way a PyTorch user writes it (stable sorts for the tie rule), in float64."""
    lg = logits.double()
    n, e = lg.shape
    s = lg.softmax(-1) if score == "softmax" else lg.sigmoid()
    sel = s if bias is None else s + bias.float().double()
    if score == "sigmoid" and bias is None and not (n_groups > 1 and topk_groups < n_groups):
        sel = lg  # the logits: the exact scores' order (sigmoid saturates at 1)
    if n_groups > 1:
        gs = sel.view(n, n_groups, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.sort(gs, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        mask = torch.zeros(n, n_groups, dtype=torch.bool, device=lg.device)
        mask.scatter_(1, keep, True)
        sel = sel.masked_fill(~mask.repeat_interleave(e // n_groups, dim=1), float("-inf"))
    ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]
    w = s.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * torch.tensor(scale, dtype=torch.float32).item()
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # expert-major, then token, then slot
    raw = torch.bincount(flat, minlength=e)
    start = torch.cumsum(raw, 0) - raw
    rank = torch.arange(n * k, device=lg.device) - start[flat[order]]
    keep = rank < capacity if capacity is not None else torch.ones_like(rank, dtype=torch.bool)
    counts = torch.bincount(flat[order][keep], minlength=e)
    padded = (counts + block - 1) // block * block
    offsets = torch.zeros(e + 1, dtype=torch.long, device=lg.device)
    offsets[1:] = torch.cumsum(padded, 0)
    position = torch.full((n * k,), -1, dtype=torch.long, device=lg.device)
    position[order[keep]] = offsets[flat[order][keep]] + rank[keep]
    R = int(offsets[-1])
    perm = torch.full((R,), -1, dtype=torch.long, device=lg.device)
    perm[position[position >= 0]] = torch.nonzero(position >= 0).flatten()
    return dict(expert_ids=ids, weights=w, counts=counts, offsets=offsets, perm=perm,
                position=position.view(n, k), num_rows=R)


def torch_permute(x, perm, k, w=None):
    valid = perm >= 0
    tok = torch.where(valid, perm, 0) // k
    out = x.index_select(0, tok)
    if w is not None:
        out = out * w.flatten()[torch.where(valid, perm, 0)].unsqueeze(1).to(out.dtype)
    return out * valid.unsqueeze(1).to(out.dtype)


def torch_combine(rows, position, w=None):
    n, k = position.shape
    pos = position.flatten()
    valid = pos >= 0
    src = rows.index_select(0, pos[valid])
    if w is not None:
        src = src * w.flatten()[valid].unsqueeze(1).to(src.dtype)
    tok = torch.arange(n * k, device=rows.device)[valid] // k
    return torch.zeros(n, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, tok, src)


def check_route(got, ref):
    for name in ("expert_ids", "counts", "offsets", "perm", "position"):
        a = getattr(got, name)
        assert a.dtype == torch.int32 and a.device == ref["perm"].device, name
        assert torch.equal(a.long(), ref[name]), name
    assert got.num_rows == ref["num_rows"]
    torch.testing.assert_close(got.weights.double(), ref["weights"], rtol=3e-6, atol=1e-7)
    assert (got.perm_full[got.num_rows:] == -1).all()


ROUTES = {
    "llama4": (64, 16, 1, dict(score="sigmoid")),
    "qwen3": (257, 128, 8, dict(renormalize=True)),
    "deepseek_v3": (129, 256, 8, dict(score="sigmoid", bias=True, n_groups=8, topk_groups=4,
                                      renormalize=True, scale=2.5)),
    "capacity_block": (301, 16, 4, dict(capacity=50, block=8, renormalize=True)),
    "e512": (33, 512, 8, dict(n_groups=16, topk_groups=3)),
    "n1": (1, 64, 4, dict(block=4)),
}


def make_logits(n, e, dtype, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(n, e, device=device, generator=g) * 2).to(dtype)


def route_kw(kw, e, device):
    kw = dict(kw)
    if kw.get("bias") is True:
        kw["bias"] = torch.randn(e, device=device) * 0.5
    return kw


@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(ROUTES))
def test_route_matches_plain_torch_and_the_cpu_backend(device, case, logit_dtype):
    n, e, k, kw = ROUTES[case]
    kw = route_kw(kw, e, device)
    lg = make_logits(n, e, logit_dtype, seed=len(case) + n, device=device)
    got = dkt.moe_route(lg, k, **kw)
    check_route(got, torch_route(lg, k, **kw))
    # the numpy face (CPU backend) gives the same routing
    np_kw = {kk: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for kk, v in kw.items()}
    cpu = dk.moe_route(lg.float().cpu().numpy(), k, **np_kw)  # bf16 values are exact in f32
    for name in ("expert_ids", "counts", "offsets", "perm_full", "position"):
        assert (getattr(got, name).cpu().numpy() == getattr(cpu, name)).all(), name
    assert abs(got.weights.cpu().numpy() - cpu.weights).max() <= 3e-6 * max(1.0, kw.get("scale", 1))


def test_route_ties_go_to_the_lower_expert(device):
    g = torch.Generator(device=device).manual_seed(3)
    lg = torch.randint(0, 3, (97, 32), device=device, generator=g).float()
    for kw in (dict(), dict(score="sigmoid", renormalize=True), dict(block=4, capacity=9)):
        for k in (1, 4, 8):
            check_route(dkt.moe_route(lg, k, **kw), torch_route(lg, k, **kw))


def test_route_token_of_all_minus_inf_logits(device):
    """The documented outcome (header, numpy docstring) on every backend: softmax 0 / 0 gives NaN
    scores, experts 0..k-1 with NaN weights; sigmoid gives weights 0 (NaN renormalised); the
    other tokens are routed as without that token."""
    g = torch.Generator().manual_seed(8)
    lg = torch.randn(4, 16, generator=g).to(device)
    masked = lg.clone()
    masked[2] = float("-inf")
    for kw, nan in ((dict(), True), (dict(score="sigmoid"), False),
                    (dict(score="sigmoid", renormalize=True), True)):
        got = dkt.moe_route(masked, 3, **kw)
        assert got.expert_ids[2].tolist() == [0, 1, 2], kw
        w = got.weights[2]
        assert bool(w.isnan().all()) if nan else bool((w == 0).all()), (kw, w)
        clean = dkt.moe_route(lg[[0, 1, 3]], 3, **kw)
        assert torch.equal(got.expert_ids[[0, 1, 3]], clean.expert_ids), kw
        assert torch.equal(got.weights[[0, 1, 3]], clean.weights), kw


@cuda_only("torch.cuda.set_sync_debug_mode")
def test_cuda_route_without_host_sync_when_r_is_known_or_bounded():
    lg = make_logits(128, 64, torch.bfloat16, seed=4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = dkt.moe_route(lg, 4)  # R = N·k: no sync
        b = dkt.moe_route(lg, 4, capacity=5, block=8, exact_rows=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert a.num_rows == 128 * 4
    kept = min(128 * 4, 64 * 5)
    assert b.num_rows == b.max_rows == kept + min(64, kept) * 7


def test_route_with_r_known_or_bounded(device):
    """exact_rows=False: num_rows is the bound max_rows, the rows past R are padding."""
    lg = make_logits(128, 64, torch.bfloat16, seed=4, device=device)
    a = dkt.moe_route(lg, 4)  # R = N·k
    b = dkt.moe_route(lg, 4, capacity=5, block=8, exact_rows=False)
    assert a.num_rows == 128 * 4
    kept = min(128 * 4, 64 * 5)
    assert b.num_rows == b.max_rows == kept + min(64, kept) * 7
    exact = dkt.moe_route(lg, 4, capacity=5, block=8)
    R = exact.num_rows
    assert R == int(b.offsets[-1]) and R <= b.num_rows
    assert torch.equal(exact.perm, b.perm[:R]) and (b.perm[R:] == -1).all()
    x = torch.randn(128, 64, device=device, dtype=torch.bfloat16)
    xp_b = dkt.moe_permute(x, b)
    assert xp_b.shape == (b.num_rows, 64)
    assert torch.equal(xp_b[:R], dkt.moe_permute(x, exact)) and (xp_b[R:] == 0).all()
    eo = torch.randn(b.num_rows, 64, device=device, dtype=torch.bfloat16)
    assert torch.equal(dkt.moe_combine(eo, b), dkt.moe_combine(eo[:R], exact))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["llama4", "qwen3", "deepseek_v3", "capacity_block"])
def test_forward_and_autograd_match_plain_torch(device, case, dtype):
    n, e, k, kw = ROUTES[case]
    kw = route_kw(kw, e, device)
    h = 64
    lg = make_logits(n, e, torch.float32, seed=7, device=device)
    route = dkt.moe_route(lg, k, **kw)
    R = route.num_rows
    perm, pos = route.perm.long(), route.position.long()
    x = torch.randn(n, h, device=device).to(dtype)
    eo = torch.randn(R, h, device=device).to(dtype)
    gxp = torch.randn(R, h, device=device).to(dtype)
    gy = torch.randn(n, h, device=device).to(dtype)
    for scale in (False, True):
        xa = x.clone().requires_grad_(True)
        wa = route.weights.clone().requires_grad_(True)
        out = dkt.moe_permute(xa, route, scale=scale, weights=wa if scale else None)
        assert out.dtype == dtype and out.shape == (R, h)
        xr = x.double().requires_grad_(True)
        wr = route.weights.double().requires_grad_(True)
        ref = torch_permute(xr, perm, k, wr if scale else None)
        if scale:
            assert rel_err(out, ref) <= tol(dtype)
        else:
            assert torch.equal(out.double(), ref.detach()), "unscaled permute is a copy"
        out.backward(gxp)
        ref.backward(gxp.double())
        assert rel_err(xa.grad, xr.grad) <= tol(dtype), scale
        if scale:
            assert rel_err(wa.grad, wr.grad) <= 1e-5
        else:
            assert wa.grad is None
    for weighted in (True, False):
        ea = eo.clone().requires_grad_(True)
        wa = route.weights.clone().requires_grad_(True)
        y = dkt.moe_combine(ea, route, weighted=weighted, weights=wa if weighted else None)
        assert y.dtype == dtype and y.shape == (n, h)
        er = eo.double().requires_grad_(True)
        wr = route.weights.double().requires_grad_(True)
        ref = torch_combine(er, pos, wr if weighted else None)
        assert rel_err(y, ref) <= tol(dtype), weighted
        y.backward(gy)
        ref.backward(gy.double())
        assert rel_err(ea.grad, er.grad) <= tol(dtype)
        if weighted:
            assert rel_err(wa.grad, wr.grad) <= 1e-5
    # the functional backward matches autograd
    g_eo, g_w = dkt.moe_combine_backward(gy, eo, route)
    ea = eo.clone().requires_grad_(True)
    wa = route.weights.clone().requires_grad_(True)
    dkt.moe_combine(ea, route, weights=wa).backward(gy)
    assert torch.equal(g_eo, ea.grad) and torch.equal(g_w, wa.grad)
    g_x, g_w = dkt.moe_permute_backward(gxp, route, x=x, scale=True)
    xa = x.clone().requires_grad_(True)
    wa = route.weights.clone().requires_grad_(True)
    dkt.moe_permute(xa, route, scale=True, weights=wa).backward(gxp)
    assert torch.equal(g_x, xa.grad) and torch.equal(g_w, wa.grad)


# Routes with dropped slots (capacity) and padding rows (block > 1), k = 1 and k = 8.
BACKWARD_ROUTES = {
    "k1_drops_padding": (64, 16, 1, dict(score="sigmoid", capacity=5, block=2)),
    "k8_drops_padding": (65, 16, 8, dict(renormalize=True, capacity=23, block=4)),
}


@pytest.mark.parametrize("exact_rows", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(BACKWARD_ROUTES))
def test_backward_calls_are_the_primitives_bitwise(device, case, dtype, exact_rows):
    """The backward of moe_permute (scaled) and moe_combine, under autograd and as the functional
    moe_*_backward, computes both gradients in one library call: their bits are those of
    moe_combine / moe_permute and the slot-dot primitive on the same tensors, over dropped slots
    and padding rows, on R rows and (exact_rows=False) on max_rows rows; with one of the two
    gradients wanted alone too, and unscaled / unweighted."""
    n, e, k, kw = BACKWARD_ROUTES[case]
    lg = make_logits(n, e, torch.float32, seed=12, device=device)
    route = dkt.moe_route(lg, k, exact_rows=exact_rows, **kw)
    rows, pos = route.num_rows, route.position
    assert (pos < 0).any() and (route.perm < 0).any(), "the case must drop slots and pad rows"
    g = torch.Generator().manual_seed(13)
    x, gy = (torch.randn(n, 32, generator=g).to(dtype).to(device) for _ in range(2))
    grad_xp, eo = (torch.randn(rows, 32, generator=g).to(dtype).to(device) for _ in range(2))
    w = torch.rand(n, k, generator=g).to(device)
    slot_dot = dkt._slot_dot_t  # the primitive (the torch face has no public slot-dot)
    permute_grads = (dkt.moe_combine(grad_xp, route, weights=w), slot_dot(x, grad_xp, pos))
    combine_grads = (dkt.moe_permute(gy, route, scale=True, weights=w), slot_dot(gy, eo, pos))
    assert (permute_grads[1][pos < 0] == 0).all() and (combine_grads[1][pos < 0] == 0).all()
    assert (combine_grads[0][route.perm < 0] == 0).all()

    for forward, a, grad, want in (
        (lambda a_, w_: dkt.moe_permute(a_, route, scale=True, weights=w_), x, grad_xp,
         permute_grads),
        (lambda a_, w_: dkt.moe_combine(a_, route, weights=w_), eo, gy, combine_grads),
    ):
        for need_a, need_w in ((True, True), (True, False), (False, True)):
            aa, wa = a.clone().requires_grad_(need_a), w.clone().requires_grad_(need_w)
            forward(aa, wa).backward(grad)
            for got, need, bits in ((aa.grad, need_a, want[0]), (wa.grad, need_w, want[1])):
                assert (got is not None) == need
                assert not need or torch.equal(got, bits), (need_a, need_w)
    xa, ea = x.clone().requires_grad_(True), eo.clone().requires_grad_(True)
    dkt.moe_permute(xa, route).backward(grad_xp)
    dkt.moe_combine(ea, route, weighted=False).backward(gy)
    assert torch.equal(xa.grad, dkt.moe_combine(grad_xp, route, weighted=False))
    assert torch.equal(ea.grad, dkt.moe_permute(gy, route))

    # Without autograd.
    assert torch.equal(dkt.moe_permute_backward(grad_xp, route), xa.grad)
    got = dkt.moe_permute_backward(grad_xp, route, x=x, scale=True, weights=w)
    assert all(torch.equal(a, b) for a, b in zip(got, permute_grads))
    got = dkt.moe_combine_backward(gy, eo, route, weights=w)
    assert all(torch.equal(a, b) for a, b in zip(got, combine_grads))
    for expert_out in (eo, None):
        g_eo, g_w = dkt.moe_combine_backward(gy, expert_out, route, weighted=False)
        assert g_w is None and torch.equal(g_eo, ea.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_off_16_byte_rows_are_copied_forward_and_backward(device, dtype):
    # Slices of wider tensors (odd offsets and row strides) as inputs, and as the gradients
    # autograd hands the backward (y[:, 1:] of a wider y): the same bits as contiguous tensors.
    n, e, k, kw = ROUTES["qwen3"]
    route = dkt.moe_route(make_logits(n, e, torch.float32, seed=9, device=device), k,
                          **route_kw(kw, e, device))
    R, h = route.num_rows, 64
    g = torch.Generator().manual_seed(10)
    wide_x = torch.randn(n, h + 3, generator=g).to(dtype).to(device)
    wide_eo = torch.randn(R, h + 1, generator=g).to(dtype).to(device)
    x, eo = wide_x[:, 3:], wide_eo[:, 1:]
    assert x.data_ptr() % 16 and eo.data_ptr() % 16  # the library could not take them as they are
    assert torch.equal(dkt.moe_permute(x, route), dkt.moe_permute(x.contiguous(), route))
    assert torch.equal(dkt.moe_combine(eo, route), dkt.moe_combine(eo.contiguous(), route))
    grads = {}
    for contiguous in (False, True):
        xa = (x.contiguous() if contiguous else x).clone().requires_grad_(True)
        ea = (eo.contiguous() if contiguous else eo).clone().requires_grad_(True)
        wa = route.weights.clone().requires_grad_(True)
        xp = dkt.moe_permute(xa, route, scale=True, weights=wa)
        y = dkt.moe_combine(ea, route, weights=wa)
        # torch.cat's backward hands each input a view at an offset of the upstream gradient
        out = torch.cat([xp.new_ones(R, 1), xp], 1).float().square().sum()
        out = out + torch.cat([y.new_ones(n, 1), y], 1).float().square().sum()
        out.backward()
        grads[contiguous] = (xa.grad, ea.grad, wa.grad)
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)


def test_gradient_reaches_the_router_through_weights(device):
    """A full MoE layer: router weights from the logits (differentiable), permute, a per-expert
    linear map, combine; every gradient against plain torch in float64."""
    n, e, k, h = 96, 8, 2, 32
    g = torch.Generator(device=device).manual_seed(8)
    lg = torch.randn(n, e, device=device, generator=g).requires_grad_(True)
    x = torch.randn(n, h, device=device, generator=g).requires_grad_(True)
    wexp = (torch.randn(e, h, h, device=device, generator=g) / h**0.5).requires_grad_(True)
    route = dkt.moe_route(lg, k, renormalize=True)
    counts = route.counts.tolist()

    def layer(lg_, x_, wexp_, ours):
        p = lg_.softmax(-1).gather(1, route.expert_ids.long())
        p = p / p.sum(-1, keepdim=True)
        if ours:
            xp = dkt.moe_permute(x_, route)
        else:
            xp = torch_permute(x_, route.perm.long(), k)
        outs, o = [], 0
        for ex in range(e):
            outs.append(xp[o : o + counts[ex]] @ wexp_[ex])
            o += counts[ex]
        eo = torch.cat(outs)
        if ours:
            return dkt.moe_combine(eo, route, weights=p)
        return torch_combine(eo, route.position.long(), p)

    gy = torch.randn(n, h, device=device, generator=g)
    grads = torch.autograd.grad((layer(lg, x, wexp, True) * gy).sum(), (lg, x, wexp))
    ld, xd, wd = (t.detach().double().requires_grad_(True) for t in (lg, x, wexp))
    refs = torch.autograd.grad((layer(ld, xd, wd, False) * gy.double()).sum(), (ld, xd, wd))
    for a, b in zip(grads, refs):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("case", ["llama4", "qwen3", "deepseek_v3", "capacity_block"])
def test_route_weights_carry_the_router_gradient(device, case):
    """route.weights of logits that require grad: the kernel's values bit for bit, and the
    gradient of the chosen experts' scores (plain torch routing in float64), through a default
    (route-weighted) combine; without requires_grad a plain tensor."""
    n, e, k, kw = ROUTES[case]
    kw = route_kw(kw, e, device)
    base = make_logits(n, e, torch.float32, 21, device)
    plain = dkt.moe_route(base, k, **kw)
    assert not plain.weights.requires_grad
    lg = base.clone().requires_grad_(True)
    route = dkt.moe_route(lg, k, **kw)
    assert route.weights.requires_grad
    assert torch.equal(route.weights.detach().view(torch.int32), plain.weights.view(torch.int32))
    h = 16
    g = torch.Generator(device=device).manual_seed(22)
    eo = torch.randn(route.num_rows, h, device=device, generator=g)
    gy = torch.randn(n, h, device=device, generator=g)
    (grad,) = torch.autograd.grad((dkt.moe_combine(eo, route) * gy).sum(), (lg,))
    ld = base.double().requires_grad_(True)
    ref = torch_route(ld, k, **kw)
    assert torch.equal(ref["expert_ids"], route.expert_ids.long())
    y = torch_combine(eo.double(), route.position.long(), ref["weights"])
    (want,) = torch.autograd.grad((y * gy.double()).sum(), (ld,))
    assert rel_err(grad, want) <= 1e-5
    with torch.no_grad():
        assert not dkt.moe_route(lg, k, **kw).weights.requires_grad
    # The old pattern still fills route.weights.grad (no longer a leaf: the grad is retained).
    r = dkt.moe_route(lg, k, **kw)
    r.weights.requires_grad_()
    (dkt.moe_combine(eo, r) * gy).sum().backward()
    assert r.weights.grad is not None and r.weights.grad.shape == (n, k)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_weights_save_no_n_by_e_copies_for_backward(device, score):
    """The router gradient's graph keeps [N, k] tensors and at most the float32 logits
    themselves until backward (a float64 softmax over all E kept two [N, E] float64 tensors per
    MoE layer: 4x the logits)."""
    n, e, k = 64, 32, 4
    lg = make_logits(n, e, torch.float32, 23, device).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        route = dkt.moe_route(lg, k, score=score, renormalize=True)
    big = [t for t in saved if t.numel() >= n * e]
    assert all(t.dtype == torch.float32 and t.data_ptr() == lg.data_ptr() for t in big), [
        (tuple(t.shape), t.dtype) for t in big]
    assert route.weights.requires_grad


@pytest.mark.parametrize("gap", [15.0, 20.0])
def test_router_gradient_of_a_dominant_expert_keeps_float64_accuracy(device, gap):
    """Softmax top-1 without renormalisation where the chosen score is ~1: its gradient is the
    difference of two nearly equal terms (w·g and w²·g), which a float32 logsumexp backward
    rounded to 0 from a gap of ~17; the float64 one keeps it (2.9e-7 at 17, 1.4e-8 at 20)."""
    lg = torch.zeros(4, 8, device=device)
    lg[:, 3] = gap
    lg.requires_grad_(True)
    route = dkt.moe_route(lg, 1)
    (grad,) = torch.autograd.grad(route.weights.sum(), (lg,))
    x = lg.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.softmax(x, -1)[:, 3].sum(), (x,))
    assert rel_err(grad[:, 3], want[:, 3]) <= 1e-6, (grad[:, 3], want[:, 3])


def test_route_weights_keep_the_kernels_bits_where_float32_scores_underflow(device):
    """The differentiable weights are the kernel's values, not a float32 re-computation: scores
    that underflow float32 (sigmoid of -110, renormalised) stay finite, and a negative scale's
    -0.0 keeps its sign."""
    lg = torch.full((2, 8), -110.0, device=device)
    lg[1, :] = torch.arange(8, device=device, dtype=torch.float32) * 1e3 - 4e3
    for kw in (dict(score="sigmoid", renormalize=True), dict(scale=-1.0, score="sigmoid")):
        plain = dkt.moe_route(lg, 2, **kw).weights
        got = dkt.moe_route(lg.clone().requires_grad_(True), 2, **kw).weights
        assert torch.isfinite(plain).all()
        assert torch.equal(got.detach().view(torch.int32), plain.view(torch.int32)), (got, plain)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_router_gradient_where_float64_scores_underflow(device, score):
    """Renormalised weights of chosen scores below float64's range (a sigmoid of -800; softmax
    experts a bias picks 800 below the token's best) have finite values and a finite gradient:
    that of the ratios e^(l - max l) / sum of the chosen log scores l, written out here."""
    g = torch.Generator(device="cpu").manual_seed(41)
    lg = torch.randn(6, 8, generator=g).to(device)
    kw = dict(score=score, renormalize=True)
    if score == "sigmoid":
        lg -= 800.0
    else:
        lg[:, :4] -= 800.0
        kw["bias"] = torch.tensor([1.0] * 4 + [0.0] * 4, device=device)
    lga = lg.clone().requires_grad_(True)
    route = dkt.moe_route(lga, 3, **kw)
    assert torch.isfinite(route.weights).all()
    gw = torch.randn(6, 3, generator=g).to(device)
    (grad,) = torch.autograd.grad((route.weights * gw).sum(), (lga,))
    x = lg.detach().double().requires_grad_(True)
    if score == "sigmoid":
        l_all = x - torch.log1p(torch.exp(x))  # log sigmoid for x < 0
    else:
        m = x.max(dim=-1, keepdim=True).values
        l_all = x - m - torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))
    lc = l_all.gather(1, route.expert_ids.long())
    r = torch.exp(lc - lc.max(dim=-1, keepdim=True).values)
    w = r / r.sum(dim=-1, keepdim=True)
    assert rel_err(route.weights, w) <= 1e-6
    (want,) = torch.autograd.grad((w * gw.double()).sum(), (x,))
    assert torch.isfinite(grad).all()
    assert rel_err(grad, want) <= 1e-6


@cuda_only("torch streams")
def test_cuda_bitwise_deterministic_and_on_a_side_stream():
    n, e, k, h = 4096, 128, 8, 256
    lg = make_logits(n, e, torch.bfloat16, seed=9, device="cuda")
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    results = []
    for run in range(2):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            route = dkt.moe_route(lg, k, renormalize=True)
            xa = x.clone().requires_grad_(True)
            wa = route.weights.clone().requires_grad_(True)
            xp = dkt.moe_permute(xa, route)
            y = dkt.moe_combine(xp * 2, route, weights=wa)
            y.backward(torch.ones_like(y))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        results.append([t.clone() for t in (route.perm, route.weights, y, xa.grad, wa.grad)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_input(device):
    lg = make_logits(8, 16, torch.float32, seed=10, device=device)
    route = dkt.moe_route(lg, 2)
    x = torch.randn(8, 32, device=device)
    other = other_device(device)
    moved = dataclasses.replace(route, position=route.position.to(other))
    cases = [
        (lambda: dkt.moe_route(lg.double(), 2), TypeError),
        (lambda: dkt.moe_route(lg, 0), ValueError),
        (lambda: dkt.moe_route(lg, 2, n_groups=3), ValueError),
        (lambda: dkt.moe_route(lg, 2, bias=torch.zeros(16, device=other)), ValueError),
        (lambda: dkt.moe_route(lg.cpu().numpy(), 2), TypeError),
        (lambda: dkt.moe_permute(x[:, :12], route), ValueError),
        (lambda: dkt.moe_permute(x[:-1], route), ValueError),
        (lambda: dkt.moe_permute(x.to(other), route), ValueError),
        (lambda: dkt.moe_permute(x, moved), ValueError),  # route tensors on another device
        (lambda: dkt.moe_combine(x.repeat(2, 1), moved), ValueError),
        (lambda: dkt.moe_permute(x.double(), route), TypeError),
        (lambda: dkt.moe_combine(x[:3], route), ValueError),
        # weights= with the flag that reads them off: it would be ignored
        (lambda: dkt.moe_combine(x.repeat(2, 1), route, weighted=False,
                                 weights=route.weights), ValueError),
        (lambda: dkt.moe_permute(x, route, weights=route.weights), ValueError),
        (lambda: dkt.moe_combine(x.repeat(2, 1), route, weights=torch.ones(8, 3, device=device)),
         ValueError),
        (lambda: dkt.moe_combine(x.repeat(2, 1), route,
                                 weights=torch.ones(8, 2, device=other)), ValueError),
        (lambda: dkt.moe_permute_backward(x.repeat(2, 1), route, scale=True), ValueError),
    ]
    before = x.clone()
    for fn, exc in cases:
        with pytest.raises(exc):
            fn()
    assert torch.equal(x, before)
