"""distill_kernels: fused KL / JSD divergences (from logits, or fused with the lm_head), MoE
token dispatch and grouped-query attention for LLM distillation, over the library's C ABI.

``distill_kernels.divergence``, ``distill_kernels.fused_linear_divergence`` (the divergence
straight from hidden states and lm_head weights) and ``distill_kernels.moe_route`` / ``moe_permute`` /
``moe_combine`` (and their ``*_backward``) and ``distill_kernels.attention`` /
``attention_backward`` (grouped-query attention, padded or packed variable-length) and
``distill_kernels.scale_rows`` (in-place row scaling that skips rows whose factor is exactly 1)
work on numpy arrays (CPU backend);
``distill_kernels.torch`` has the same as autograd functions for torch tensors (CUDA, zero-copy,
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
    OutOfMemoryError,
    PanicError,
    ShapeError,
    UnsupportedDtypeError,
    WorkspaceTooSmallError,
    WrongDeviceError,
    cuda_archs,
    cuda_device_count,
    library_path,
    version,
)
from .divergence import DivergenceResult, divergence  # noqa: E402  (the function shadows the module)
from .fused import FusedLinearResult, fused_linear_divergence  # noqa: E402
from .attention import AttentionResult, attention, attention_backward  # noqa: E402
from .scale_rows import scale_rows  # noqa: E402
from .moe import (  # noqa: E402
    MoeRoute,
    moe_combine,
    moe_combine_backward,
    moe_permute,
    moe_permute_backward,
    moe_route,
)

__all__ = [
    "__version__",
    "version",
    "cuda_archs",
    "cuda_device_count",
    "library_path",
    "divergence",
    "DivergenceResult",
    "fused_linear_divergence",
    "FusedLinearResult",
    "moe_route",
    "moe_permute",
    "moe_combine",
    "moe_permute_backward",
    "moe_combine_backward",
    "MoeRoute",
    "attention",
    "attention_backward",
    "AttentionResult",
    "scale_rows",
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
    "OutOfMemoryError",
    "LibraryNotFoundError",
]
