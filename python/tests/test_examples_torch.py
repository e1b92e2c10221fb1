"""The Python examples (python/examples/) run to the end and pass their own checks: the first
micro-batch's loss and gradients against plain PyTorch, and the training falling."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch_devices import device  # noqa: E402,F401 (the fixture: cpu, and cuda or a skip)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_on_policy_distillation_example(device):
    src = str(Path(__file__).resolve().parent.parent)
    path = [src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "on_policy_distillation.py"), "--steps", "20",
         "--device", device],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "gradient of lm_head: relative error" in run.stdout
    assert "mean JSD of the first 5 steps" in run.stdout
    assert run.stdout.startswith(f"device: {device}"), run.stdout
    assert run.stdout.rstrip().endswith("\nok"), run.stdout
