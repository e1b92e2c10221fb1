#!/usr/bin/env bash
# The test command: builds the library, runs every Rust test (unit, integration, the C ABI
# program, proptests, doc tests) and the Python tests against the freshly built library.
# CUDA tests run when a GPU is present and say SKIPPED otherwise.
#
# Python dependencies (numpy, pytest, ml_dtypes) are installed into .venv on first use.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv (numpy, pytest, ml_dtypes)"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import numpy, pytest, ml_dtypes" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check numpy pytest ml_dtypes
fi

echo "== cargo build --release (the library the C and Python tests load)"
cargo build --release
release="$(bash scripts/cargo-target-dir.sh)/release"

echo "== cargo test --profile release-tests (release optimisation, no LTO: Cargo.toml)"
cargo test --profile release-tests

echo "== pytest python/tests"
DISTILL_KERNELS_LIB="$release/libdistill_kernels.so" \
  "$venv/bin/python" -m pytest python/tests -q -rs
echo "== scripts/test.sh: every step passed in $(( $(date +%s) - start )) s"
