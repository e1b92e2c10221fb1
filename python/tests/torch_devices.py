"""The per-device parametrisation the torch test files share (one test body per device).

``device`` is a fixture: "cpu" always (the library's CPU backend), "cuda" where a GPU is present
(skipped with the reason otherwise). ``cuda_only(why)`` marks a test about CUDA itself (streams,
host synchronisation, graphs, device memory). Import it after ``pytest.importorskip("torch")``:
``from torch_devices import HAVE_CUDA, cuda_only, device, other_device  # noqa: F401``.
"""

from __future__ import annotations

import pytest
import torch

HAVE_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not HAVE_CUDA,
        reason="CUDA is not available: cuda case skipped (the body also runs on cpu)")),
]


def cuda_only(why):
    """Marks a CUDA-only test, skipped with `why` where there is no GPU."""
    return pytest.mark.skipif(
        not HAVE_CUDA, reason=f"CUDA is not available: CUDA-only test ({why})")


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test body runs on: "cpu", then "cuda" where present."""
    return request.param


def other_device(device):
    """A device that is not `device` (tensors there must be refused): meta stands in for it on a
    machine without a GPU."""
    return "meta" if device == "cpu" else "cpu"
