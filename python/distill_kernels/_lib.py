"""Loading ``libdistill_kernels`` and the ctypes mirror of ``include/distill_kernels.h``.

Nothing here imports numpy or torch. The library is loaded lazily, on the first call that needs
it, so ``import distill_kernels`` works (and reports ``__version__``) before the library is built.

Where the library is looked for, first hit wins:

1. ``$DISTILL_KERNELS_LIB`` -- the path of the shared library itself. When set, it must exist.
2. This package's own folder, where ``pip install ./python`` puts the library built in the
   checkout (python/setup.py).
3. ``$CARGO_TARGET_DIR/release/`` when ``CARGO_TARGET_DIR`` is set (where ``cargo build`` then
   writes the library, so a stale ``target/`` in the checkout cannot shadow it).
4. ``<repo>/target/release/`` where ``<repo>`` is two folders above this package
   (``python/distill_kernels/../../``), when it holds a ``Cargo.toml``: the source checkout this
   package is used from (not installed).
5. ``target/release/`` in the current working directory or any of its parents (for an installed
   package without a library of its own, used from inside a checkout).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional

__all__ = [
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
    "DivergenceParams",
    "DivergenceArgs",
    "ScaleRowsArgs",
    "MoeRouteParams",
    "MoeRouteArgs",
    "MoePermuteArgs",
    "MoeCombineArgs",
    "MoeSlotDotArgs",
    "MoePermuteBackwardArgs",
    "MoeCombineBackwardArgs",
    "MOE_SCORES",
    "FusedLinearParams",
    "FusedLinearArgs",
    "AttentionParams",
    "AttentionBatch",
    "AttentionArgs",
    "AttentionBackwardArgs",
    "ATTENTION_HEAD_DIMS",
    "lib",
    "scale_rows_lib",
    "scale_rows_call",
    "moe_lib",
    "fused_lib",
    "attention_lib",
    "library_path",
    "check",
    "context",
    "version",
    "cuda_device_count",
    "cuda_archs",
    "KINDS",
    "REDUCTIONS",
    "DTYPE_F32",
    "DTYPE_BF16",
    "DTYPE_F16",
]

PACKAGE_VERSION = "0.1.0"

# 64-bit FNV-1a of the bytes of include/distill_kernels.h that the ctypes mirror below follows.
# A library must report the same from dk_header_hash(); the tests require it to equal the
# checkout's header, so a header change cannot land without a look at this mirror.
HEADER_HASH = 0xCC16F4EC471E708B

# ---- constants of include/distill_kernels.h ----------------------------------------------------

DK_OK = 0
DTYPE_F32, DTYPE_BF16, DTYPE_F16 = 0, 1, 2
KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS = {"batchmean": 0, "sum": 1, "none": 2}
MOE_SCORES = {"softmax": 0, "sigmoid": 1}
MOE_MAX_K = 32  # dk_moe_route_params.k: 1 <= k <= min(e, 32)
MOE_MAX_EXPERTS = 1024  # dk_moe_route_args.e: 1..1024
ATTENTION_HEAD_DIMS = (64, 128)  # dk_attention_params.head_dim
ATTENTION_ROW_ALIGN = 16  # bytes: token row starts (base pointers and strides) of every operand
# dk_attention_params.softmax_scale: at most this float32 (softmax_scale * log2(e) stays finite)
ATTENTION_MAX_SOFTMAX_SCALE = ctypes.c_float(2.3586574e38).value
MOE_MAX_HIDDEN = 16384  # the hidden size H of the MoE activations: a multiple of 8 in 8..16384
MOE_ROW_ALIGN = 16  # bytes: row starts (base pointers and strides) of the MoE activations

# ---- errors ----------------------------------------------------------------------------------


# float32's smallest normal value (2^-126): the lower bound of temperature and num_items.
FLT_MIN = 2.0**-126

class DistillKernelsError(Exception):
    """An error reported by the library; ``status`` is the ``DK_ERR_*`` code (0 if raised here)."""

    status = 0

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message


class NullPointerError(DistillKernelsError, ValueError):
    """A required pointer was null (DK_ERR_NULL_POINTER)."""

    status = 1


class InvalidArgumentError(DistillKernelsError, ValueError):
    """A parameter out of range: beta, temperature, a code, ... (DK_ERR_INVALID_ARGUMENT)."""

    status = 2


class ShapeError(DistillKernelsError, ValueError):
    """Shapes, lengths or strides that do not fit, or overlapping buffers (DK_ERR_SHAPE)."""

    status = 3


class UnsupportedDtypeError(DistillKernelsError, TypeError):
    """A dtype the operation does not accept (DK_ERR_UNSUPPORTED_DTYPE)."""

    status = 4


class NoDeviceError(DistillKernelsError, RuntimeError):
    """No CUDA driver or device, or a library built without kernels (DK_ERR_NO_DEVICE)."""

    status = 5


class WrongDeviceError(DistillKernelsError, ValueError):
    """Memory on another device, or host memory where device memory is needed
    (DK_ERR_WRONG_DEVICE)."""

    status = 6


class WorkspaceTooSmallError(DistillKernelsError, ValueError):
    """A workspace smaller than its *_workspace_size (DK_ERR_WORKSPACE_TOO_SMALL)."""

    status = 7


class CudaError(DistillKernelsError, RuntimeError):
    """The CUDA driver or cuBLAS returned an error (DK_ERR_CUDA)."""

    status = 8


class PanicError(DistillKernelsError, RuntimeError):
    """A panic caught at the library boundary: a bug, please report it (DK_ERR_PANIC)."""

    status = 9


class OutOfMemoryError(DistillKernelsError, MemoryError):
    """The host could not allocate the CPU backend's working memory (DK_ERR_OUT_OF_MEMORY)."""

    status = 10


class LibraryNotFoundError(DistillKernelsError, OSError):
    """The shared library could not be found or loaded."""


_STATUS_ERRORS = {
    cls.status: cls
    for cls in (
        NullPointerError,
        InvalidArgumentError,
        ShapeError,
        UnsupportedDtypeError,
        NoDeviceError,
        WrongDeviceError,
        WorkspaceTooSmallError,
        CudaError,
        PanicError,
        OutOfMemoryError,
    )
}

# ---- struct mirrors ----------------------------------------------------------------------------


class DivergenceParams(ctypes.Structure):
    """``dk_divergence_params``."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("beta", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("reduction", ctypes.c_int32),
        ("ignore_index", ctypes.c_int64),
        ("num_items", ctypes.c_float),
    ]


class DivergenceArgs(ctypes.Structure):
    """``dk_divergence_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("v", ctypes.c_int64),
        ("student", ctypes.c_void_p),
        ("student_dtype", ctypes.c_int32),
        ("student_stride", ctypes.c_int64),
        ("teacher", ctypes.c_void_p),
        ("teacher_dtype", ctypes.c_int32),
        ("teacher_stride", ctypes.c_int64),
        ("labels", ctypes.c_void_p),
        ("loss", ctypes.c_void_p),
        ("per_token", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("grad_stride", ctypes.c_int64),
        ("num_items", ctypes.c_void_p),
    ]


class ScaleRowsArgs(ctypes.Structure):
    """``dk_scale_rows_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("v", ctypes.c_int64),
        ("x", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("stride", ctypes.c_int64),
        ("factors", ctypes.c_void_p),
        ("factor_stride", ctypes.c_int64),
    ]


class MoeRouteParams(ctypes.Structure):
    """``dk_moe_route_params``."""

    _fields_ = [
        ("k", ctypes.c_int32),
        ("score", ctypes.c_int32),
        ("renormalize", ctypes.c_int32),
        ("n_groups", ctypes.c_int32),
        ("topk_groups", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("capacity", ctypes.c_int64),
        ("block", ctypes.c_int32),
    ]


class MoeRouteArgs(ctypes.Structure):
    """``dk_moe_route_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("e", ctypes.c_int32),
        ("logits", ctypes.c_void_p),
        ("logits_dtype", ctypes.c_int32),
        ("logits_stride", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("expert_ids", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("counts", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("perm", ctypes.c_void_p),
        ("perm_rows", ctypes.c_int64),
        ("position", ctypes.c_void_p),
    ]


class MoePermuteArgs(ctypes.Structure):
    """``dk_moe_permute_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("x", ctypes.c_void_p),
        ("x_stride", ctypes.c_int64),
        ("perm", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("out_stride", ctypes.c_int64),
    ]


class MoeCombineArgs(ctypes.Structure):
    """``dk_moe_combine_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("rows_in", ctypes.c_void_p),
        ("rows_stride", ctypes.c_int64),
        ("position", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("y_stride", ctypes.c_int64),
    ]


class MoeSlotDotArgs(ctypes.Structure):
    """``dk_moe_slot_dot_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("tokens", ctypes.c_void_p),
        ("tokens_stride", ctypes.c_int64),
        ("rows_in", ctypes.c_void_p),
        ("rows_stride", ctypes.c_int64),
        ("position", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
    ]


class MoePermuteBackwardArgs(ctypes.Structure):
    """``dk_moe_permute_backward_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("grad_xp", ctypes.c_void_p),
        ("grad_xp_stride", ctypes.c_int64),
        ("position", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("x", ctypes.c_void_p),
        ("x_stride", ctypes.c_int64),
        ("grad_x", ctypes.c_void_p),
        ("grad_x_stride", ctypes.c_int64),
        ("grad_weights", ctypes.c_void_p),
    ]


class MoeCombineBackwardArgs(ctypes.Structure):
    """``dk_moe_combine_backward_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("grad_y", ctypes.c_void_p),
        ("grad_y_stride", ctypes.c_int64),
        ("expert_out", ctypes.c_void_p),
        ("expert_out_stride", ctypes.c_int64),
        ("perm", ctypes.c_void_p),
        ("position", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("grad_expert_out", ctypes.c_void_p),
        ("grad_expert_out_stride", ctypes.c_int64),
        ("grad_weights", ctypes.c_void_p),
    ]


class FusedLinearParams(ctypes.Structure):
    """``dk_fused_linear_params`` (embeds ``dk_divergence_params``)."""

    _fields_ = [
        ("divergence", DivergenceParams),
        ("logit_scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("chunk_rows", ctypes.c_int64),
        ("accumulate", ctypes.c_int32),
    ]


class FusedLinearArgs(ctypes.Structure):
    """``dk_fused_linear_args``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("v", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("ht", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("student_hidden", ctypes.c_void_p),
        ("student_hidden_stride", ctypes.c_int64),
        ("student_weight", ctypes.c_void_p),
        ("student_weight_stride", ctypes.c_int64),
        ("teacher_hidden", ctypes.c_void_p),
        ("teacher_hidden_stride", ctypes.c_int64),
        ("teacher_weight", ctypes.c_void_p),
        ("teacher_weight_stride", ctypes.c_int64),
        ("labels", ctypes.c_void_p),
        ("loss", ctypes.c_void_p),
        ("per_token", ctypes.c_void_p),
        ("grad_hidden", ctypes.c_void_p),
        ("grad_hidden_dtype", ctypes.c_int32),
        ("grad_hidden_stride", ctypes.c_int64),
        ("grad_weight", ctypes.c_void_p),
        ("grad_weight_dtype", ctypes.c_int32),
        ("grad_weight_stride", ctypes.c_int64),
        ("num_items", ctypes.c_void_p),
    ]


class AttentionParams(ctypes.Structure):
    """``dk_attention_params``."""

    _fields_ = [
        ("heads_q", ctypes.c_int64),
        ("heads_kv", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("causal", ctypes.c_int32),
        ("softmax_scale", ctypes.c_float),
        ("deterministic", ctypes.c_int32),
    ]


class AttentionBatch(ctypes.Structure):
    """``dk_attention_batch``."""

    _fields_ = [
        ("batch", ctypes.c_int64),
        ("seqlen_q", ctypes.c_int64),
        ("seqlen_k", ctypes.c_int64),
        ("cu_seqlens_q", ctypes.c_void_p),
        ("cu_seqlens_k", ctypes.c_void_p),
        ("rows_q", ctypes.c_int64),
        ("rows_k", ctypes.c_int64),
    ]


class AttentionArgs(ctypes.Structure):
    """``dk_attention_args``."""

    _fields_ = [
        ("batch", AttentionBatch),
        ("dtype", ctypes.c_int32),
        ("q", ctypes.c_void_p),
        ("q_stride", ctypes.c_int64),
        ("k", ctypes.c_void_p),
        ("k_stride", ctypes.c_int64),
        ("v", ctypes.c_void_p),
        ("v_stride", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("out_stride", ctypes.c_int64),
        ("lse", ctypes.c_void_p),
    ]


class AttentionBackwardArgs(ctypes.Structure):
    """``dk_attention_backward_args``."""

    _fields_ = [
        ("batch", AttentionBatch),
        ("dtype", ctypes.c_int32),
        ("dout", ctypes.c_void_p),
        ("dout_stride", ctypes.c_int64),
        ("q", ctypes.c_void_p),
        ("q_stride", ctypes.c_int64),
        ("k", ctypes.c_void_p),
        ("k_stride", ctypes.c_int64),
        ("v", ctypes.c_void_p),
        ("v_stride", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("out_stride", ctypes.c_int64),
        ("lse", ctypes.c_void_p),
        ("dq", ctypes.c_void_p),
        ("dq_stride", ctypes.c_int64),
        ("dk", ctypes.c_void_p),
        ("dk_stride", ctypes.c_int64),
        ("dv", ctypes.c_void_p),
        ("dv_stride", ctypes.c_int64),
    ]


# ---- finding and loading the library ------------------------------------------------------------


def _lib_names() -> List[str]:
    if sys.platform == "win32":
        return ["distill_kernels.dll"]
    if sys.platform == "darwin":
        return ["libdistill_kernels.dylib"]
    return ["libdistill_kernels.so"]


def _candidates() -> List[Path]:
    names = _lib_names()
    # Bundled by `pip install ./python` (setup.py): built together with this package's code.
    dirs: List[Path] = [Path(__file__).resolve().parent]
    # Where cargo builds when CARGO_TARGET_DIR is set: before the checkout, so that a stale
    # target/ there never shadows the library just built.
    target_dir = os.environ.get("CARGO_TARGET_DIR")
    if target_dir:
        dirs.append(Path(target_dir) / "release")
    repo = Path(__file__).resolve().parent.parent.parent
    if (repo / "Cargo.toml").is_file():  # running from the source checkout
        dirs.append(repo / "target" / "release")
    cwd = Path.cwd().resolve()
    for d in [cwd, *cwd.parents]:
        dirs.append(d / "target" / "release")
    out: List[Path] = []
    for d in dirs:
        for n in names:
            p = d / n
            if p not in out:
                out.append(p)
    return out


_HOW_TO_BUILD = (
    "build it with `cargo build --release` in the distill-kernels repository "
    "(it produces target/release/libdistill_kernels.so), or set DISTILL_KERNELS_LIB "
    "to the path of the shared library"
)


def _find_library() -> Path:
    env = os.environ.get("DISTILL_KERNELS_LIB")
    if env:
        p = Path(env)
        if not p.is_file():
            raise LibraryNotFoundError(
                f"DISTILL_KERNELS_LIB={env!r} does not name an existing file; " + _HOW_TO_BUILD
            )
        return p
    tried = _candidates()
    for p in tried:
        if p.is_file():
            return p
    shown = "\n  ".join(str(p) for p in tried[:6])
    raise LibraryNotFoundError(
        "libdistill_kernels was not found; "
        + _HOW_TO_BUILD
        + ".\nLooked in:\n  "
        + shown
        + ("\n  ..." if len(tried) > 6 else "")
    )


def _declare(l: ctypes.CDLL) -> None:
    c_ctx_p = ctypes.c_void_p
    l.dk_version.argtypes = []
    l.dk_version.restype = ctypes.c_char_p
    l.dk_last_error.argtypes = []
    l.dk_last_error.restype = ctypes.c_char_p
    l.dk_cuda_device_count.argtypes = []
    l.dk_cuda_device_count.restype = ctypes.c_int32
    if hasattr(l, "dk_cuda_archs"):  # an older library lacks it: the header check says so next
        l.dk_cuda_archs.argtypes = []
        l.dk_cuda_archs.restype = ctypes.c_char_p
    l.dk_context_create.argtypes = [ctypes.c_int32, ctypes.POINTER(c_ctx_p)]
    l.dk_context_create.restype = ctypes.c_int32
    l.dk_context_destroy.argtypes = [c_ctx_p]
    l.dk_context_destroy.restype = ctypes.c_int32
    l.dk_context_device.argtypes = [c_ctx_p, ctypes.POINTER(ctypes.c_int32)]
    l.dk_context_device.restype = ctypes.c_int32
    l.dk_divergence_params_default.argtypes = []
    l.dk_divergence_params_default.restype = DivergenceParams
    l.dk_divergence_workspace_size.argtypes = [
        c_ctx_p,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_size_t),
    ]
    l.dk_divergence_workspace_size.restype = ctypes.c_int32
    l.dk_divergence.argtypes = [
        c_ctx_p,
        ctypes.POINTER(DivergenceArgs),
        ctypes.POINTER(DivergenceParams),
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
    ]
    l.dk_divergence.restype = ctypes.c_int32


def _first_missing(l: ctypes.CDLL, names) -> Optional[str]:
    """The first of ``names`` that ``l`` does not export (None if it exports them all)."""
    return next((name for name in names if not hasattr(l, name)), None)


_SCALE_ROWS_SYMBOLS = ("dk_scale_rows",)


def _declare_scale_rows(l: ctypes.CDLL) -> Optional[str]:
    """Declares dk_scale_rows; returns its name if the library lacks it (a library built before
    the operation: reported when it is called, see scale_rows_lib), else None."""
    missing = _first_missing(l, _SCALE_ROWS_SYMBOLS)
    if missing is not None:
        return missing
    l.dk_scale_rows.argtypes = [ctypes.c_void_p, ctypes.POINTER(ScaleRowsArgs), ctypes.c_void_p]
    l.dk_scale_rows.restype = ctypes.c_int32
    return None


_MOE_SYMBOLS = (
    "dk_moe_max_rows",
    "dk_moe_route_params_default",
    "dk_moe_route_workspace_size",
    "dk_moe_route",
    "dk_moe_permute_workspace_size",
    "dk_moe_permute",
    "dk_moe_combine",
    "dk_moe_slot_dot",
    "dk_moe_permute_backward",
    "dk_moe_combine_backward",
)


def _declare_moe(l: ctypes.CDLL) -> Optional[str]:
    """Declares the MoE functions; returns the first missing symbol's name (None if all exist).

    A library built before the MoE operation lacks them: the divergence must keep working with
    it, so a missing symbol is only reported when an MoE function is called (see moe_lib)."""
    missing = _first_missing(l, _MOE_SYMBOLS)
    if missing is not None:
        return missing
    c_ctx_p = ctypes.c_void_p
    i32, i64, vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    l.dk_moe_max_rows.argtypes = [i64, i32, i32, i32, i64]
    l.dk_moe_max_rows.restype = i64
    l.dk_moe_route_params_default.argtypes = []
    l.dk_moe_route_params_default.restype = MoeRouteParams
    l.dk_moe_route_workspace_size.argtypes = [c_ctx_p, i64, i32, i32, ctypes.POINTER(ctypes.c_size_t)]
    l.dk_moe_route_workspace_size.restype = i32
    l.dk_moe_route.argtypes = [
        c_ctx_p,
        ctypes.POINTER(MoeRouteArgs),
        ctypes.POINTER(MoeRouteParams),
        vp,
        ctypes.c_size_t,
        vp,
    ]
    l.dk_moe_route.restype = i32
    l.dk_moe_permute_workspace_size.argtypes = [c_ctx_p, i64, i32, ctypes.POINTER(ctypes.c_size_t)]
    l.dk_moe_permute_workspace_size.restype = i32
    l.dk_moe_permute.argtypes = [
        c_ctx_p, ctypes.POINTER(MoePermuteArgs), vp, ctypes.c_size_t, vp
    ]
    l.dk_moe_permute.restype = i32
    l.dk_moe_combine.argtypes = [c_ctx_p, ctypes.POINTER(MoeCombineArgs), vp]
    l.dk_moe_combine.restype = i32
    l.dk_moe_slot_dot.argtypes = [c_ctx_p, ctypes.POINTER(MoeSlotDotArgs), vp]
    l.dk_moe_slot_dot.restype = i32
    l.dk_moe_permute_backward.argtypes = [c_ctx_p, ctypes.POINTER(MoePermuteBackwardArgs), vp]
    l.dk_moe_permute_backward.restype = i32
    l.dk_moe_combine_backward.argtypes = [c_ctx_p, ctypes.POINTER(MoeCombineBackwardArgs), vp]
    l.dk_moe_combine_backward.restype = i32
    return None


_FUSED_SYMBOLS = (
    "dk_fused_linear_params_default",
    "dk_fused_linear_workspace_size",
    "dk_fused_linear_divergence",
)


def _declare_fused(l: ctypes.CDLL) -> Optional[str]:
    """Declares the fused linear divergence functions; returns the first missing symbol's name
    (None if all exist). Like the MoE ones, a missing symbol is only reported when the fused
    operation is called (see fused_lib)."""
    missing = _first_missing(l, _FUSED_SYMBOLS)
    if missing is not None:
        return missing
    c_ctx_p, vp = ctypes.c_void_p, ctypes.c_void_p
    l.dk_fused_linear_params_default.argtypes = []
    l.dk_fused_linear_params_default.restype = FusedLinearParams
    l.dk_fused_linear_workspace_size.argtypes = [
        c_ctx_p,
        ctypes.POINTER(FusedLinearArgs),
        ctypes.POINTER(FusedLinearParams),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    l.dk_fused_linear_workspace_size.restype = ctypes.c_int32
    l.dk_fused_linear_divergence.argtypes = [
        c_ctx_p,
        ctypes.POINTER(FusedLinearArgs),
        ctypes.POINTER(FusedLinearParams),
        vp,
        ctypes.c_size_t,
        vp,
    ]
    l.dk_fused_linear_divergence.restype = ctypes.c_int32
    return None


_ATTENTION_SYMBOLS = (
    "dk_attention_params_default",
    "dk_attention_forward",
    "dk_attention_backward_workspace_size",
    "dk_attention_backward",
)


def _declare_attention(l: ctypes.CDLL) -> Optional[str]:
    """Declares the attention functions; returns the first missing symbol's name (None if all
    exist). Like the MoE ones, a missing symbol is only reported when attention is called (see
    attention_lib)."""
    missing = _first_missing(l, _ATTENTION_SYMBOLS)
    if missing is not None:
        return missing
    c_ctx_p, vp = ctypes.c_void_p, ctypes.c_void_p
    l.dk_attention_params_default.argtypes = []
    l.dk_attention_params_default.restype = AttentionParams
    l.dk_attention_forward.argtypes = [
        c_ctx_p,
        ctypes.POINTER(AttentionArgs),
        ctypes.POINTER(AttentionParams),
        vp,
    ]
    l.dk_attention_forward.restype = ctypes.c_int32
    l.dk_attention_backward_workspace_size.argtypes = [
        c_ctx_p,
        ctypes.POINTER(AttentionBackwardArgs),
        ctypes.POINTER(AttentionParams),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    l.dk_attention_backward_workspace_size.restype = ctypes.c_int32
    l.dk_attention_backward.argtypes = [
        c_ctx_p,
        ctypes.POINTER(AttentionBackwardArgs),
        ctypes.POINTER(AttentionParams),
        vp,
        ctypes.c_size_t,
        vp,
    ]
    l.dk_attention_backward.restype = ctypes.c_int32
    return None


def _fnv1a(data: bytes) -> int:
    """64-bit FNV-1a, as dk_header_hash computes it over the header's bytes."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _check_header(l: ctypes.CDLL, path: Path) -> None:
    """The library must have been built from the header this module mirrors (``HEADER_HASH``):
    a stale build keeps the version number but not the ABI. The message says which side is
    behind: the library (in a checkout: rebuild it), this mirror (the checkout's header changed
    after it), or a library from elsewhere."""
    try:
        built_fn = l.dk_header_hash
    except AttributeError:
        built = None
    else:
        built_fn.argtypes = []
        built_fn.restype = ctypes.c_uint64
        built = built_fn()
    if built == HEADER_HASH:
        return
    header = Path(__file__).resolve().parent.parent.parent / "include" / "distill_kernels.h"
    in_checkout = header.is_file()
    if in_checkout and built is not None and built == _fnv1a(header.read_bytes()):
        raise LibraryNotFoundError(
            f"{header} changed after the Python package's ctypes mirror of it "
            f"(distill_kernels/_lib.py, HEADER_HASH = {HEADER_HASH:#x}): libdistill_kernels at "
            f"{path} was built from the new header ({built:#x}). Update the mirror to the "
            f"header, then set HEADER_HASH = {built:#x}"
        )
    if os.environ.get("DISTILL_KERNELS_LIB"):
        raise LibraryNotFoundError(
            f"libdistill_kernels at {path} (DISTILL_KERNELS_LIB) was built from another "
            "include/distill_kernels.h than this package mirrors: point DISTILL_KERNELS_LIB at a "
            "library built in the same checkout as the package, or unset it to let the package "
            "find its own"
        )
    if in_checkout:
        raise LibraryNotFoundError(
            f"libdistill_kernels at {path} was built from another include/distill_kernels.h than "
            f"{header} (a stale build: `cargo run --bin dk` does not refresh "
            "target/release/libdistill_kernels.so); rebuild it with `cargo build --release`"
        )
    raise LibraryNotFoundError(
        f"libdistill_kernels at {path} was built from another include/distill_kernels.h than "
        "this installed package mirrors: reinstall the package from the checkout the library "
        "was built in (`pip install ./python` after `cargo build --release`)"
    )


def _check_version(found: str, path: Path) -> None:
    if found == PACKAGE_VERSION:
        return
    f, p = found.split("."), PACKAGE_VERSION.split(".")
    msg = (
        f"libdistill_kernels at {path} is version {found}, the Python package is "
        f"{PACKAGE_VERSION}"
    )
    if f[:2] != p[:2]:
        raise LibraryNotFoundError(msg + "; rebuild the library or reinstall the package")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None
# Per optional operation ("scale_rows", "moe", "fused", "attention"): the first of its symbols
# the loaded library lacks, or None.
_missing: Dict[str, Optional[str]] = {}


def lib() -> ctypes.CDLL:
    """The loaded library (loaded, declared and version-checked on first use)."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            path = _find_library()
            try:
                l = ctypes.CDLL(str(path))
            except OSError as e:
                raise LibraryNotFoundError(f"could not load {path}: {e}; " + _HOW_TO_BUILD) from e
            _declare(l)
            _missing["scale_rows"] = _declare_scale_rows(l)
            _missing["moe"] = _declare_moe(l)
            _missing["fused"] = _declare_fused(l)
            _missing["attention"] = _declare_attention(l)
            _check_version(l.dk_version().decode(), path)
            _check_header(l, path)
            _lib_path = path
            _lib = l
    return _lib


def _lib_exporting(key: str, operation: str) -> ctypes.CDLL:
    """The loaded library, or LibraryNotFoundError naming the first symbol of ``operation`` (the
    ``_missing`` entry ``key``) it lacks."""
    l = lib()
    missing = _missing[key]
    if missing is not None:
        raise LibraryNotFoundError(
            f"libdistill_kernels at {_lib_path} does not export {missing}, which {operation} "
            f"needs: the library is older than this package (a stale build: `cargo run --bin "
            f"dk` does not refresh target/release/libdistill_kernels.so) or was built without "
            f"it; rebuild it with `cargo build --release`"
        )
    return l


def scale_rows_lib() -> ctypes.CDLL:
    """The loaded library, checked to export the row scaling (``dk_scale_rows``)."""
    return _lib_exporting("scale_rows", "the row scaling")


def moe_lib() -> ctypes.CDLL:
    """The loaded library, checked to export the MoE dispatch functions (``dk_moe_*``)."""
    return _lib_exporting("moe", "the MoE dispatch operation")


def fused_lib() -> ctypes.CDLL:
    """The loaded library, checked to export the fused linear divergence (``dk_fused_linear_*``)."""
    return _lib_exporting("fused", "the fused linear divergence")


def attention_lib() -> ctypes.CDLL:
    """The loaded library, checked to export grouped-query attention (``dk_attention_*``)."""
    return _lib_exporting("attention", "attention")


def library_path() -> Path:
    """Path of the loaded library (loads it if needed)."""
    lib()
    assert _lib_path is not None
    return _lib_path


def last_error() -> str:
    msg = lib().dk_last_error()
    return msg.decode(errors="replace") if msg else ""


def check(status: int, what: str = "distill_kernels") -> None:
    """Raises the exception of a non-zero status, with dk_last_error()'s message.

    Must be called on the thread that made the failing call (the message is thread-local)."""
    if status == DK_OK:
        return
    cls = _STATUS_ERRORS.get(status, DistillKernelsError)
    msg = last_error() or "no message"
    raise cls(f"{what}: {msg} (status {status})", status)


def version() -> str:
    """Version of the loaded library (``dk_version()``)."""
    return lib().dk_version().decode()


def cuda_device_count() -> int:
    """Number of CUDA devices the library sees (0 without a driver)."""
    return int(lib().dk_cuda_device_count())


def cuda_archs() -> List[str]:
    """The GPU architectures whose kernels are compiled into the library (``dk_cuda_archs()``),
    such as ``["sm_80", "sm_90a", "sm_100", "sm_120", "compute_80"]``; empty for a library built
    without nvcc, which runs on the CPU only."""
    text = lib().dk_cuda_archs().decode()
    return [a for a in text.split(",") if a]


# Contexts are created once per device and kept for the life of the process (never destroyed:
# destroying a CUDA context handle at interpreter exit can race with other libraries' teardown).
_contexts: Dict[int, int] = {}


def context(device: int = -1) -> int:
    """The cached context handle for ``device`` (-1 = CPU, n = CUDA ordinal)."""
    h = _contexts.get(device)
    if h is not None:
        return h
    l = lib()
    with _lock:
        h = _contexts.get(device)
        if h is None:
            out = ctypes.c_void_p()
            check(l.dk_context_create(int(device), ctypes.byref(out)), "dk_context_create")
            h = out.value
            assert h
            _contexts[device] = h
    return h


def make_params(
    kind: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    num_items: Optional[float],
) -> DivergenceParams:
    """Validates the scalar parameters (ValueError/TypeError) and packs them for the C ABI."""
    import math

    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    beta = _real("beta", beta)
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    b32 = ctypes.c_float(beta).value
    if kind == "jsd" and 0.0 < beta < 1.0 and b32 in (0.0, 1.0):
        # The C ABI's beta is a float32, and 0 and 1 select forward and reverse KL: a JSD beta
        # that rounds to either would silently become that KL (a loss ~1e7 times larger).
        raise ValueError(
            f"beta = {beta!r} rounds to {b32:g} as a float32 (the library's type), which selects "
            f"{'reverse' if b32 == 1.0 else 'forward'} KL; pass {b32:g} for that, or a beta "
            f"that float32 keeps inside (0, 1) (between 1.4e-45 and 1 - 6e-8)"
        )
    temperature = _real("temperature", temperature)
    t32 = ctypes.c_float(temperature).value
    # A normal float32 (the CUDA kernels scale by log2(e) / T in float32).
    if not (math.isfinite(temperature) and math.isfinite(t32) and t32 >= FLT_MIN):
        raise ValueError(
            f"temperature must be finite and at least 1.1754944e-38 (the smallest normal "
            f"float32), got {temperature}"
        )
    if isinstance(ignore_index, bool) or not _is_int(ignore_index):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    ignore_index = int(ignore_index)
    if not (-(2**63) <= ignore_index < 2**63):
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    n32 = 0.0
    if num_items is not None:
        # One value in any shape ([1], [[x]]), as a token count often arrives; 0-d and numbers too.
        if getattr(num_items, "size", None) == 1 and getattr(num_items, "ndim", 0) > 0:
            num_items = num_items.reshape(())
        num_items = _real("num_items", num_items)
        n32 = ctypes.c_float(num_items).value
        if not (math.isfinite(num_items) and math.isfinite(n32) and n32 >= FLT_MIN):
            raise ValueError(
                f"num_items must be finite and at least 1.1754944e-38 (the smallest normal "
                f"float32: the reduction divides by it), got {num_items}"
            )
        if reduction != "batchmean":
            raise ValueError(
                f"num_items only applies to reduction='batchmean' (got reduction={reduction!r})"
            )
    return DivergenceParams(
        kind=KINDS[kind],
        beta=beta,
        temperature=temperature,
        reduction=REDUCTIONS[reduction],
        ignore_index=ignore_index,
        num_items=n32,
    )


def native_dtype(dt):
    """A numpy dtype in native byte order: byte-swapped arrays are compared, allocated for and
    copied as their native twin (the library reads and writes native bytes only)."""
    return dt.newbyteorder("=") if dt.byteorder not in ("=", "|") else dt


def _is_int(x) -> bool:
    import numbers

    return isinstance(x, numbers.Integral)


def check_labels_shape(shape, lead_shape, n: int) -> None:
    """ValueError unless labels of ``shape`` give one per row: the rows' leading shape, or those
    rows flattened (``[N]``, row-major, as DESIGN.md has it); shared by the numpy and torch
    faces."""
    shape, lead_shape = tuple(shape), tuple(lead_shape)
    if shape not in (lead_shape, (n,)):
        want = f"{lead_shape} or ({n},)" if len(lead_shape) != 1 else f"{lead_shape}"
        raise ValueError(f"labels must have shape {want} (one per row), got {shape}")


def _real(name: str, x) -> float:
    import numbers

    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        # 0-d numpy arrays and torch tensors of an integer or floating dtype (not bool, complex,
        # strings or objects, which float() would also take).
        if (getattr(x, "ndim", None) == 0 or getattr(x, "shape", None) == ()) and _real_dtype(
            getattr(x, "dtype", None)
        ):
            try:
                return float(x)
            except Exception:
                pass
        raise TypeError(f"{name} must be a real number, got {x!r}")
    return float(x)


def check_moe_hidden(name: str, h: int) -> None:
    """ValueError, naming the argument, unless ``h`` is a MoE hidden size the kernels take (a
    multiple of 8 in 8..=MOE_MAX_HIDDEN); shared by the numpy and torch faces."""
    if not (0 < h <= MOE_MAX_HIDDEN and h % 8 == 0):
        raise ValueError(
            f"{name}: the hidden size H = {h} must be a multiple of 8 in 8..={MOE_MAX_HIDDEN}"
        )


def _real_dtype(dt) -> bool:
    """Whether a numpy or torch dtype holds real numbers (integers or floats), without importing
    either: numpy's kind, ml_dtypes' float names (kind "V"), torch's flags."""
    if dt is None:
        return False
    kind = getattr(dt, "kind", None)
    if isinstance(kind, str):
        # ml_dtypes' bfloat16 and float8 / float4 types are kind "V" (and some "f").
        return kind in "iuf" or str(getattr(dt, "name", "")).startswith(("float", "bfloat"))
    if str(dt) == "torch.bool" or getattr(dt, "is_complex", True):
        return False
    return hasattr(dt, "is_floating_point")


# ---- row scaling: the call shared by the numpy and torch faces ----------------------------------


def scale_rows_call(handle, x_ptr: int, dtype: int, n: int, v: int, stride: int,
                    factors_ptr: int, factor_stride: int, stream, what: str = "scale_rows") -> None:
    """``dk_scale_rows``: ``x[i, :] *= factors[i * factor_stride]`` in place (f32 product, rounded
    once; rows whose factor is exactly 1.0 untouched), on ``stream`` for a CUDA context."""
    args = ScaleRowsArgs(n=n, v=v, x=x_ptr, dtype=dtype, stride=stride, factors=factors_ptr,
                         factor_stride=factor_stride)
    check(scale_rows_lib().dk_scale_rows(handle, ctypes.byref(args), stream), what)


# ---- MoE dispatch: parameters and calls shared by the numpy and torch faces --------------------


def _int(name: str, x, lo: int, hi: int, hint: str = "") -> int:
    if isinstance(x, bool) or not _is_int(x):
        # 0-d integer numpy arrays are accepted; anything else is a type error.
        if getattr(x, "shape", None) == () and getattr(getattr(x, "dtype", None), "kind", "") in "iu":
            x = int(x)
        else:
            raise TypeError(f"{name} must be an integer, got {x!r}")
    x = int(x)
    if not (lo <= x <= hi):
        bound = f">= {lo}" if hi >= 2**62 else f"in {lo}..={hi}"  # no one means 2^62
        raise ValueError(f"{name} must be {bound}{hint}, got {x}")
    return x


def _bool(name: str, x) -> bool:
    """A Python or numpy bool (0 / 1 integers are refused: they are usually a misplaced argument)."""
    if isinstance(x, bool):
        return x
    t = type(x)
    if t.__module__ == "numpy" and t.__name__ in ("bool_", "bool"):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {x!r}")


def make_moe_route_params(
    e: int,
    k,
    score: str,
    renormalize,
    n_groups,
    topk_groups,
    scale,
    capacity,
    block,
) -> MoeRouteParams:
    """Validates the routing parameters against ``e`` experts (ValueError / TypeError, with the
    rule that was broken) and packs them for the C ABI."""
    import math

    if not (1 <= e <= MOE_MAX_EXPERTS):
        raise ValueError(f"E = {e} experts: must be in 1..={MOE_MAX_EXPERTS}")
    if not isinstance(score, str) or score not in MOE_SCORES:
        raise ValueError(f"score must be one of {sorted(MOE_SCORES)}, got {score!r}")
    k = _int("k", k, 1, min(e, MOE_MAX_K))
    renormalize = _bool("renormalize", renormalize)
    n_groups = _int("n_groups", n_groups, 1, e)
    if e % n_groups != 0:
        raise ValueError(f"n_groups = {n_groups} must divide E = {e}")
    if n_groups > 1 and e // n_groups < 2:
        raise ValueError(
            f"group scores (sum of a group's top-2 scores) need at least 2 experts per group "
            f"(E = {e}, n_groups = {n_groups})"
        )
    topk_groups = _int("topk_groups", topk_groups, 1, n_groups)
    kept = topk_groups * (e // n_groups)
    if k > kept:
        raise ValueError(
            f"k = {k} exceeds the {kept} experts of the kept groups "
            f"(topk_groups = {topk_groups} of n_groups = {n_groups}, E = {e})"
        )
    scale = _real("scale", scale)
    s32 = ctypes.c_float(scale).value
    if not (math.isfinite(scale) and math.isfinite(s32)):
        raise ValueError(f"scale must be finite (as a float32), got {scale}")
    if capacity is None:
        cap = 0
    else:
        cap = _int("capacity", capacity, 1, 2**62, " (None for no capacity limit)")
    block = _int("block", block, 1, 2**31 - 1)
    return MoeRouteParams(
        k=k,
        score=MOE_SCORES[score],
        renormalize=1 if renormalize else 0,
        n_groups=n_groups,
        topk_groups=topk_groups,
        scale=scale,
        capacity=cap,
        block=block,
    )


def moe_max_rows(n: int, e: int, k: int, block: int, capacity: int) -> int:
    """``dk_moe_max_rows``: the bound on R = offsets[E] (``capacity`` 0 = unlimited)."""
    rows = int(moe_lib().dk_moe_max_rows(n, e, k, block, capacity))
    if rows < 0:
        raise ValueError(
            f"dk_moe_max_rows rejected n = {n}, e = {e}, k = {k}, block = {block}, "
            f"capacity = {capacity}"
        )
    if rows >= 2**31:
        raise ValueError(
            f"the permuted buffer would have {rows} rows (K + min(E, K)·(block − 1), K the slots "
            "kept), more than the int32 row indices of perm / position can address"
        )
    return rows


def _workspace_size(fn, name: str, *args) -> int:
    """Calls the ``dk_*_workspace_size`` function ``fn`` (named ``name``) with ``args`` and a
    ``size_t`` out-pointer; the size it wrote."""
    size = ctypes.c_size_t(0)
    check(fn(*args, ctypes.byref(size)), name)
    return int(size.value)


def moe_route_workspace_size(handle: int, n: int, e: int, k: int) -> int:
    return _workspace_size(
        moe_lib().dk_moe_route_workspace_size, "dk_moe_route_workspace_size", handle, n, e, k
    )


def moe_route_call(handle, args: MoeRouteArgs, params: MoeRouteParams, workspace, ws_bytes,
                   stream) -> None:
    status = moe_lib().dk_moe_route(
        handle, ctypes.byref(args), ctypes.byref(params), workspace, ws_bytes, stream
    )
    check(status, "moe_route")


def moe_permute_workspace_size(handle: int, n: int, k: int) -> int:
    return _workspace_size(
        moe_lib().dk_moe_permute_workspace_size, "dk_moe_permute_workspace_size", handle, n, k
    )


def moe_permute_call(handle, args: MoePermuteArgs, stream, what: str = "moe_permute",
                     workspace=None, ws_bytes: int = 0) -> None:
    check(moe_lib().dk_moe_permute(handle, ctypes.byref(args), workspace, ws_bytes, stream), what)


def moe_combine_call(handle, args: MoeCombineArgs, stream, what: str = "moe_combine") -> None:
    check(moe_lib().dk_moe_combine(handle, ctypes.byref(args), stream), what)


def moe_slot_dot_call(handle, args: MoeSlotDotArgs, stream, what: str = "moe_slot_dot") -> None:
    check(moe_lib().dk_moe_slot_dot(handle, ctypes.byref(args), stream), what)


def moe_permute_backward_call(handle, args: MoePermuteBackwardArgs, stream,
                              what: str = "moe_permute_backward") -> None:
    check(moe_lib().dk_moe_permute_backward(handle, ctypes.byref(args), stream), what)


def moe_combine_backward_call(handle, args: MoeCombineBackwardArgs, stream,
                              what: str = "moe_combine_backward") -> None:
    check(moe_lib().dk_moe_combine_backward(handle, ctypes.byref(args), stream), what)


# ---- fused linear divergence: parameters and calls shared by the numpy and torch faces ---------


def make_fused_params(
    kind: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    num_items: Optional[float],
    logit_scale,
    softcap,
    chunk_rows,
    accumulate: bool,
) -> FusedLinearParams:
    """Validates the parameters of the fused linear divergence (ValueError / TypeError, with the
    rule that was broken) and packs them for the C ABI."""
    import math

    div = make_params(kind, beta, temperature, ignore_index, reduction, num_items)
    logit_scale = _real("logit_scale", logit_scale)
    s32 = ctypes.c_float(logit_scale).value
    if not (math.isfinite(logit_scale) and logit_scale > 0 and math.isfinite(s32) and s32 > 0):
        raise ValueError(f"logit_scale must be finite and > 0 (as a float32), got {logit_scale}")
    cap = 0.0
    if softcap is not None:
        softcap = _real("softcap", softcap)
        cap = ctypes.c_float(softcap).value
        if not (math.isfinite(softcap) and softcap > 0 and math.isfinite(cap) and cap > 0):
            raise ValueError(
                f"softcap must be None (no cap) or finite and > 0 (as a float32), got {softcap}"
            )
    chunk = 0 if chunk_rows is None else _int(
        "chunk_rows", chunk_rows, 1, 2**62, " (None to choose it from V and H)"
    )
    return FusedLinearParams(
        divergence=div,
        logit_scale=logit_scale,
        softcap=cap,
        chunk_rows=chunk,
        accumulate=1 if accumulate else 0,
    )


def fused_workspace_size(handle, args: FusedLinearArgs, params: FusedLinearParams) -> int:
    return _workspace_size(
        fused_lib().dk_fused_linear_workspace_size, "dk_fused_linear_workspace_size",
        handle, ctypes.byref(args), ctypes.byref(params),
    )


def fused_call(handle, args: FusedLinearArgs, params: FusedLinearParams, workspace, ws_bytes,
               stream) -> None:
    status = fused_lib().dk_fused_linear_divergence(
        handle, ctypes.byref(args), ctypes.byref(params), workspace, ws_bytes, stream
    )
    check(status, "fused_linear_divergence")


# ---- attention: parameters and calls shared by the numpy and torch faces -----------------------


def make_attention_params(
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    causal,
    softmax_scale,
    deterministic,
) -> AttentionParams:
    """Validates the attention parameters (ValueError / TypeError, with the rule that was broken)
    and packs them for the C ABI (``softmax_scale`` None is 0: the library's 1/sqrt(head_dim))."""
    import math

    if heads_q < 1 or heads_kv < 1:
        raise ValueError(f"heads_q = {heads_q} and heads_kv = {heads_kv} must both be >= 1")
    if heads_q % heads_kv != 0:
        raise ValueError(
            f"the query heads Hq = {heads_q} must be a multiple of the key/value heads "
            f"Hkv = {heads_kv} (grouped-query attention: query head h reads KV head "
            "h // (Hq // Hkv))"
        )
    if head_dim not in ATTENTION_HEAD_DIMS:
        raise ValueError(
            f"head dimension D = {head_dim} is not supported: must be one of "
            f"{list(ATTENTION_HEAD_DIMS)}"
        )
    causal = _bool("causal", causal)
    deterministic = _bool("deterministic", deterministic)
    scale = 0.0
    if softmax_scale is not None:
        softmax_scale = _real("softmax_scale", softmax_scale)
        scale = ctypes.c_float(softmax_scale).value
        if not (math.isfinite(softmax_scale) and 0 < scale <= ATTENTION_MAX_SOFTMAX_SCALE):
            raise ValueError(
                f"softmax_scale must be None (1/sqrt(D)) or > 0 and at most "
                f"{ATTENTION_MAX_SOFTMAX_SCALE:.8g} (as a float32; the kernels use softmax_scale "
                f"* log2(e) as a float32), got {softmax_scale}"
            )
    return AttentionParams(
        heads_q=heads_q,
        heads_kv=heads_kv,
        head_dim=head_dim,
        causal=1 if causal else 0,
        softmax_scale=scale,
        deterministic=1 if deterministic else 0,
    )


def attention_forward_call(handle, args: AttentionArgs, params: AttentionParams, stream) -> None:
    status = attention_lib().dk_attention_forward(
        handle, ctypes.byref(args), ctypes.byref(params), stream
    )
    check(status, "attention")


def attention_backward_workspace_size(handle, args: AttentionBackwardArgs,
                                      params: AttentionParams) -> int:
    return _workspace_size(
        attention_lib().dk_attention_backward_workspace_size,
        "dk_attention_backward_workspace_size",
        handle, ctypes.byref(args), ctypes.byref(params),
    )


def attention_backward_call(handle, args: AttentionBackwardArgs, params: AttentionParams,
                            workspace, ws_bytes, stream) -> None:
    status = attention_lib().dk_attention_backward(
        handle, ctypes.byref(args), ctypes.byref(params), workspace, ws_bytes, stream
    )
    check(status, "attention_backward")
