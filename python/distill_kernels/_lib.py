"""Loading ``libdistill_kernels`` and the ctypes mirror of ``include/distill_kernels.h``.

Nothing here imports numpy or torch. The library is loaded lazily, on the first call that needs
it, so ``import distill_kernels`` works (and reports ``__version__``) before the library is built.

Where the library is looked for, first hit wins:

1. ``$DISTILL_KERNELS_LIB`` -- the path of the shared library itself. When set, it must exist.
2. ``<repo>/target/release/`` where ``<repo>`` is two folders above this package
   (``python/distill_kernels/../../``), when it holds a ``Cargo.toml``: the source checkout this
   package is used from (not installed).
3. ``$CARGO_TARGET_DIR/release/`` when ``CARGO_TARGET_DIR`` is set.
4. ``target/release/`` in the current working directory or any of its parents (for an installed
   package used from inside a checkout).
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
    "LibraryNotFoundError",
    "DivergenceParams",
    "DivergenceArgs",
    "lib",
    "library_path",
    "check",
    "context",
    "version",
    "cuda_device_count",
    "KINDS",
    "REDUCTIONS",
    "DTYPE_F32",
    "DTYPE_BF16",
    "DTYPE_F16",
]

PACKAGE_VERSION = "0.1.0"

# ---- constants of include/distill_kernels.h ----------------------------------------------------

DK_OK = 0
DTYPE_F32, DTYPE_BF16, DTYPE_F16 = 0, 1, 2
KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS = {"batchmean": 0, "sum": 1, "none": 2}

# ---- errors ----------------------------------------------------------------------------------


class DistillKernelsError(Exception):
    """An error reported by the library; ``status`` is the ``DK_ERR_*`` code (0 if raised here)."""

    status = 0

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message


class NullPointerError(DistillKernelsError, ValueError):
    status = 1


class InvalidArgumentError(DistillKernelsError, ValueError):
    status = 2


class ShapeError(DistillKernelsError, ValueError):
    status = 3


class UnsupportedDtypeError(DistillKernelsError, TypeError):
    status = 4


class NoDeviceError(DistillKernelsError, RuntimeError):
    status = 5


class WrongDeviceError(DistillKernelsError, ValueError):
    status = 6


class WorkspaceTooSmallError(DistillKernelsError, ValueError):
    status = 7


class CudaError(DistillKernelsError, RuntimeError):
    status = 8


class PanicError(DistillKernelsError, RuntimeError):
    status = 9


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
    dirs: List[Path] = []
    repo = Path(__file__).resolve().parent.parent.parent
    if (repo / "Cargo.toml").is_file():  # running from the source checkout
        dirs.append(repo / "target" / "release")
    target_dir = os.environ.get("CARGO_TARGET_DIR")
    if target_dir:
        dirs.append(Path(target_dir) / "release")
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
            _check_version(l.dk_version().decode(), path)
            _lib_path = path
            _lib = l
    return _lib


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
    temperature = _real("temperature", temperature)
    t32 = ctypes.c_float(temperature).value
    if not (math.isfinite(temperature) and temperature > 0 and math.isfinite(t32) and t32 > 0):
        raise ValueError(
            f"temperature must be finite and > 0 (as a float32), got {temperature}"
        )
    if isinstance(ignore_index, bool) or not _is_int(ignore_index):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    ignore_index = int(ignore_index)
    if not (-(2**63) <= ignore_index < 2**63):
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    n32 = 0.0
    if num_items is not None:
        num_items = _real("num_items", num_items)
        n32 = ctypes.c_float(num_items).value
        if not (math.isfinite(num_items) and num_items > 0 and math.isfinite(n32) and n32 > 0):
            raise ValueError(f"num_items must be finite and > 0 (as a float32), got {num_items}")
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


def _is_int(x) -> bool:
    import numbers

    return isinstance(x, numbers.Integral)


def _real(name: str, x) -> float:
    import numbers

    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        # 0-d numpy arrays / torch scalars: accept what converts cleanly.
        try:
            if getattr(x, "ndim", None) == 0 or getattr(x, "shape", None) == ():
                return float(x)
        except Exception:
            pass
        raise TypeError(f"{name} must be a real number, got {x!r}")
    return float(x)
