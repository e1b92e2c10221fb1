"""distill_kernels: fused KL / JSD divergences for LLM distillation, over the library's C ABI.

``distill_kernels.divergence`` works on numpy arrays (CPU backend);
``distill_kernels.torch.divergence`` is the autograd function for torch tensors (CUDA, zero-copy,
on torch's current stream). Importing this package needs numpy, never torch. The shared library is loaded on first use; see ``_lib`` for where it is
looked for (``DISTILL_KERNELS_LIB`` first).
"""

from ._lib import (
    PACKAGE_VERSION as __version__,
    CudaError,
    DistillKernelsError,
    InvalidArgumentError,
    LibraryNotFoundError,
    NoDeviceError,
    NullPointerError,
    PanicError,
    ShapeError,
    UnsupportedDtypeError,
    WorkspaceTooSmallError,
    WrongDeviceError,
    cuda_device_count,
    library_path,
    version,
)
from .divergence import DivergenceResult, divergence  # noqa: E402  (the function shadows the module)

__all__ = [
    "__version__",
    "version",
    "cuda_device_count",
    "library_path",
    "divergence",
    "DivergenceResult",
    "DistillKernelsError",
    "NullPointerError",
    "InvalidArgumentError",
    "ShapeError",
    "UnsupportedDtypeError",
    "NoDeviceError",
    "WrongDeviceError",
    "WorkspaceTooSmallError",
    "CudaError",
    "PanicError",
    "LibraryNotFoundError",
]
