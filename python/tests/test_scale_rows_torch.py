"""distill_kernels.torch.scale_rows_ (CPU tensors: the library's CPU backend; CUDA tensors: the
kernel on the current stream) against torch's own float32 product, and the divergence backward
that scales by grad_output (through it on CUDA, through mul_ on the CPU).

The reference is ``x.float() * f`` rounded by ``.to(dtype)`` (what ``x.mul_(f)`` computes for an
f32 ``[N, 1]`` tensor ``f``: the product in float32, rounded once). Rows whose factor is exactly 1
hold NaN payloads and must keep their bits. Needs torch. Each test body taking ``device`` runs on
CPU tensors and, where a GPU is available, on CUDA tensors; the host-sync / side-stream test is
CUDA-only (skips show their reason with ``pytest -rs``).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: torch tests skipped")

import distill_kernels.torch as dkt  # noqa: E402

from torch_devices import DEVICES, cuda_only, other_device  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FACTORS = [1.0, 0.0, -0.0, -1.0, math.nan, math.inf, 2.5, 1e-6, 1e30, 1.0, -0.375, 0.3]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def reference(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """float32 product, rounded once to x's dtype."""
    return (x.float() * f.reshape(-1, 1)).to(x.dtype)


def make(n, v, offset, dtype, device, seed):
    """A [n, v] view at element `offset` of rows of v + offset + 5 (rows misaligned when
    offset > 0); rows 0 and 9 (factor 1) hold signalling-NaN patterns."""
    g = torch.Generator().manual_seed(seed)
    big = (torch.randn(n, v + offset + 5, generator=g) * 3).to(dtype)
    nan = 0x7F81 if dtype != torch.float32 else 0x7F800001
    for r in (0, 9):
        if r < n:
            bits(big[r])[::2] = nan
    big = big.to(device)
    return big, big[:, offset:offset + v]


def check_rows(before_big, after_big, offset, v, factors):
    f = factors.float().cpu()
    before = before_big[:, offset:offset + v].cpu()
    after = after_big[:, offset:offset + v].cpu()
    for cols in (slice(0, offset), slice(offset + v, None)):
        assert torch.equal(bits(after_big[:, cols].cpu()), bits(before_big[:, cols].cpu()))
    want = reference(before, f)
    for i in range(before.shape[0]):
        fi = f[i] if f.numel() > 1 else f.reshape(-1)[0]
        if fi.item() == 1.0:
            assert torch.equal(bits(after[i]), bits(before[i])), f"row {i} (factor 1) changed"
            continue
        w = want[i] if f.numel() > 1 else reference(before[i:i + 1], fi)[0]
        nan = torch.isnan(w)
        assert torch.equal(torch.isnan(after[i]), nan), f"row {i} (factor {fi.item()})"
        assert torch.equal(bits(after[i])[~nan], bits(w)[~nan]), f"row {i} (factor {fi.item()})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,offset", [(1, 0), (37, 1), (8193, 3), (70001, 0)])
def test_scale_rows_matches_float32_product(device, dtype, v, offset):
    n = len(FACTORS)
    big, x = make(n, v, offset, dtype, device, seed=v + offset)
    factors = torch.tensor(FACTORS, dtype=torch.float32, device=device)
    before = big.clone()
    assert dkt.scale_rows_(x, factors) is x
    check_rows(before, big, offset, v, factors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rows_one_factor(device, dtype):
    big, x = make(6, 300, 2, dtype, device, seed=11)
    before = big.clone()
    dkt.scale_rows_(x, torch.ones((), device=device))  # exactly 1: nothing moves
    assert torch.equal(bits(big), bits(before))
    dkt.scale_rows_(x, 1.0)
    assert torch.equal(bits(big), bits(before))
    dkt.scale_rows_(x, -0.3)
    check_rows(before, big, 2, 300, torch.tensor([-0.3]))
    # A bf16 factor tensor is converted (exactly) to float32.
    before = big.clone()
    dkt.scale_rows_(x, torch.tensor(0.75, dtype=torch.bfloat16, device=device))
    check_rows(before, big, 2, 300, torch.tensor([0.75]))


@pytest.mark.parametrize("device", DEVICES)
def test_scale_rows_bad_arguments(device):
    x = torch.ones(3, 8, device=device)
    with pytest.raises(TypeError):
        dkt.scale_rows_(x.double(), 2.0)
    with pytest.raises(ValueError, match="contiguous"):
        dkt.scale_rows_(x[:, ::2], 2.0)
    with pytest.raises(ValueError, match="N = 3"):
        dkt.scale_rows_(x, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="factors are on"):
        dkt.scale_rows_(x, torch.ones(3, device=other_device(device)))
    with pytest.raises(ValueError, match="requires grad"):
        dkt.scale_rows_(x.clone().requires_grad_(True), 2.0)
    assert torch.all(x == 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_backward_scales_exactly_like_the_float32_product(device, dtype, reduction):
    """The divergence backward scales the forward's gradient by grad_output (on CUDA through
    dk_scale_rows): grad_output 1 gives the unscaled gradient bit for bit, any other the f32
    product rounded once (per row for reduction "none")."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(20, 3001, generator=g) * 2).to(dtype).to(device)
    t = (torch.randn(20, 3001, generator=g) * 2).to(dtype).to(device)

    def grad_with(upstream):
        leaf = s.clone().requires_grad_(True)
        out = dkt.divergence(leaf, t, kind="jsd", reduction=reduction)
        out.backward(upstream)
        return leaf.grad

    ones = torch.ones(20, device=device) if reduction == "none" else torch.ones((), device=device)
    g1 = grad_with(ones)
    w = (torch.rand(20, generator=g) * 3 - 1).to(device) if reduction == "none" else (
        torch.tensor(0.3, device=device))
    w = w.clone()
    if reduction == "none":
        w[::4] = 1.0  # rows left alone
    gw = grad_with(w)
    want = (g1.float() * w.float().reshape(-1, 1)).to(dtype)
    assert torch.equal(bits(gw), bits(want))
    # grad_output exactly 1: the same bits as the forward's gradient, twice.
    assert torch.equal(bits(grad_with(ones)), bits(g1))


@cuda_only("torch.cuda.set_sync_debug_mode and torch streams")
def test_cuda_scale_rows_no_host_sync_and_side_stream():
    big, x = make(16, 5000, 1, torch.bfloat16, "cuda", seed=5)
    factors = torch.linspace(-2, 2, 16, device="cuda")
    factors[::3] = 1.0
    before = big.clone()
    dkt.scale_rows_(x[:1], factors[:1])  # warm up (context, module)
    big.copy_(before)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            f2 = factors * 1  # produced on the side stream right before the call
            dkt.scale_rows_(x, f2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    check_rows(before, big, 1, 5000, factors)
