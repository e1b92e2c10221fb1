"""bench.py's logits-buffer rows (``run_logits_rows``): this crate timed on an intermediate
logits tensor, with a separate gradient and with ``grad_inplace=True``.

The rows refill the logits from the kept student before every run, outside the timing. Checked
here, with a timer that runs the step several times and keeps each gradient:
- every run of either row returns the float64 reference's gradient on the sampled rows, so no
  run starts from the previous run's gradient;
- the in-place row's gradient is the logits buffer itself;
- the kept student is never written.

Needs torch (skipped otherwise, with the reason shown by ``pytest -rs``). Runs on CPU tensors
and, where a GPU is present, on CUDA tensors.
"""

from __future__ import annotations

import os
import sys
import types

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: bench.py row checks skipped")

from torch_devices import device  # noqa: E402,F401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402


class RecordingTimer:
    """Stands in for the CUDA-event timer: runs setup() then fn() `runs` times, keeps outputs."""

    def __init__(self, runs=3):
        self.runs = runs
        self.outputs = []

    def __call__(self, fn, warmup_ms, rep_ms, setup):
        for _ in range(self.runs):
            setup()
            loss, g = fn()
            self.outputs.append((loss.detach().clone(), g.detach().clone(), g.data_ptr()))
        return 1.0


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_logits_rows_time_the_right_gradient_every_run(device, kind):
    g = torch.Generator().manual_seed(5)
    n, v = 12, 777
    s = (torch.randn(n, v, generator=g) * 2).to(torch.bfloat16).to(device)
    t = (torch.randn(n, v, generator=g) * 2).to(torch.bfloat16).to(device)
    kept = s.clone()
    rows = [0, 5, 11]
    ref = bench.reference(s, t, kind, rows, chunk=5)
    args = types.SimpleNamespace(warmup_ms=0, rep_ms=0, verbose=True)
    timers = []

    def timer(fn, warmup_ms, rep_ms, setup):
        timers.append(RecordingTimer())
        return timers[-1](fn, warmup_ms, rep_ms, setup)

    out = bench.run_logits_rows(kind, s, t, ref, rows, floor_ms=2.0, args=args, timer=timer)
    assert [r["inplace"] for r in out] == [False, True]
    assert all("error" not in r for r in out), out
    for r, tm in zip(out, timers):
        assert r["grad_err"] < 1e-2 and r["loss_err"] < 1e-5, r  # bf16 gradient rounding
        assert r["pct_floor"] == pytest.approx(200.0)  # 100 · floor / time, floor 2 ms, time 1 ms
        first_loss, first_grad, _ = tm.outputs[0]
        assert bench.rel_err(first_grad[rows], ref[1]) < 1e-2
        for loss, grad, _ in tm.outputs[1:]:  # each run from the refilled logits: same bits
            assert torch.equal(loss, first_loss) and torch.equal(grad, first_grad)
    separate, inplace = timers
    assert torch.equal(separate.outputs[0][1], inplace.outputs[0][1])
    assert len({p for *_, p in inplace.outputs}) == 1  # one buffer, the logits, every run
    assert torch.equal(s, kept)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_num_items_rows_compute_the_plain_rows_quantity(device, kind):
    """bench.py's opt-in num_items rows (--impls ...,num_items): the device-tensor row gives
    bitwise the plain row's loss and gradient (num_items = N is batchmean's own divisor here),
    the hand-divided sum the same values to rounding, and neither row appears unless asked."""
    import distill_kernels.torch as dkt

    g = torch.Generator().manual_seed(7)
    s = (torch.randn(6, 90, generator=g) * 2).to(device)
    t = (torch.randn(6, 90, generator=g) * 2).to(device)
    impls = bench.num_items_impls(dkt, [kind])

    def run(fn):
        x = s.clone().requires_grad_(True)
        loss = fn(x, t)
        loss.backward()
        return loss.detach(), x.grad

    plain = run(lambda x, y: dkt.divergence(x, y, kind=kind, beta=bench.BETA))
    tensor = run(impls[("distill_kernels num_items tensor", kind)])
    by_hand = run(impls[("distill_kernels sum / num_items tensor", kind)])
    for a, b in zip(tensor, plain):
        assert torch.equal(a, b)
    for a, b in zip(by_hand, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    made = bench.make_impls([kind], device=device, wanted=["distill_kernels"])
    assert not any("num_items" in name for name, _ in made)
    made = bench.make_impls([kind], device=device, wanted=["distill_kernels", "num_items"])
    assert {name for name, _ in made} >= {"distill_kernels", "distill_kernels num_items tensor",
                                         "distill_kernels sum / num_items tensor"}
