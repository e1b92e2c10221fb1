"""``python -m distill_kernels``: which library the package loads, and what it can run on.

Prints the package and library versions, the library's path (and how it was found), the CUDA
devices the library sees, and whether torch is there for ``distill_kernels.torch``. Exits with
status 1, after saying why, when the library cannot be loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    import distill_kernels as dk

    package = Path(dk.__file__).resolve().parent
    print(f"distill_kernels {dk.__version__}: package at {package}")
    try:
        path = dk.library_path()
    except dk.LibraryNotFoundError as e:
        print(f"library: not loaded: {e}")
        return 1
    if os.environ.get("DISTILL_KERNELS_LIB"):
        how = "DISTILL_KERNELS_LIB"
    elif path.resolve().parent == package:
        how = "bundled with the package"
    else:
        how = "found in a cargo target folder"
    print(f"library: {path} ({how}), version {dk.version()}")
    archs = dk.cuda_archs()
    print(
        "CUDA kernels compiled in: "
        + (", ".join(archs) if archs else "none: built without nvcc, the CPU backend only "
           "(set NVCC or CUDA_HOME and rebuild for CUDA)")
    )
    devices = dk.cuda_device_count()
    print(f"CUDA devices seen by the library: {devices}")
    try:
        import torch
    except ImportError:
        print("torch: not installed (distill_kernels.torch needs it; numpy works without)")
    else:
        cuda = torch.cuda.is_available()
        print(f"torch {torch.__version__}: CUDA {'available' if cuda else 'not available'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
