#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler from PyPI into a local folder and prints the nvcc path.
#
# The five packages must be pinned together: unpinned, pip mixes 13.x parts and ptxas rejects the
# PTX that the newer front end writes. With --sass, also installs cuobjdump + nvdisasm (13.2, the
# first PyPI release that ships them) for reading SASS without a GPU.
#
# usage: scripts/install-cuda-toolchain.sh [--sass] [DEST]   (DEST defaults to .cuda-toolchain)
set -euo pipefail

sass=0
if [ "${1:-}" = "--sass" ]; then sass=1; shift; fi
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.cuda-toolchain}
py=${PYTHON:-python3}

nvcc="$dest/nvcc/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  echo "installing the pinned CUDA 13.0 compiler into $dest/nvcc" >&2
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest/nvcc" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
# pip --target can drop the executable bit on some setups.
chmod +x "$dest/nvcc/nvidia/cu13/bin/"* "$dest/nvcc/nvidia/cu13/nvvm/bin/"* 2>/dev/null || true

if [ "$sass" = 1 ] && [ ! -x "$dest/sass/nvidia/cu13/bin/cuobjdump" ]; then
  echo "installing cuobjdump + nvdisasm into $dest/sass" >&2
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest/sass" \
    nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.78 >&2
  chmod +x "$dest/sass/nvidia/cu13/bin/"* 2>/dev/null || true
fi

"$nvcc" --version >&2
echo "$nvcc"
