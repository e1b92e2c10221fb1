#!/usr/bin/env bash
# The torch face's tests on CPU tensors (distill_kernels.torch through the CPU backend), for
# machines without a GPU: CI runs it after the README's test command. Installs torch 2.11.0 (the
# GPU machine's version; from PyPI, whose Linux wheel brings its CUDA libraries: ~4.7 GB) with
# numpy, pytest and ml_dtypes into .venv-torch (or DK_TORCH_VENV), then runs the torch test files
# against the library scripts/test.sh built. Their CUDA cases say SKIPPED with the reason here
# and run on a GPU machine (scripts/gpu-check.sh's pytest step).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

venv=${DK_TORCH_VENV:-$root/.venv-torch}
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv (torch 2.11.0, numpy, pytest, ml_dtypes)"
  python3 -m venv "$venv"
fi
torch_version=2.11.0
if ! "$venv/bin/python" -c "import torch, numpy, pytest, ml_dtypes
assert torch.__version__.split('+')[0] == '$torch_version'" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch==$torch_version" numpy pytest ml_dtypes
fi
"$venv/bin/python" -c "import torch; print('== torch', torch.__version__, '(CUDA available:', torch.cuda.is_available(), ')')"

echo "== cargo build --release (the library the tests load; nothing to do when it is current)"
cargo build --release
release="$(bash scripts/cargo-target-dir.sh)/release"

echo "== pytest python/tests/test_*_torch.py (CPU tensors; CUDA cases skip without a GPU)"
DISTILL_KERNELS_LIB="$release/libdistill_kernels.so" \
  "$venv/bin/python" -m pytest python/tests/test_*_torch.py -q -rs
