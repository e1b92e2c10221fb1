"""numpy face of the row scaling, on the library's CPU backend.

``scale_rows(x, factors)`` multiplies each row of ``x`` in place by its factor: the product in
float32, rounded once (to nearest even) to ``x``'s dtype, and rows whose factor is exactly 1.0 are
not touched at all. The torch face (``distill_kernels.torch.scale_rows_``) runs the same on CUDA
tensors, where the factors are read on the device (no host synchronisation).
"""

from __future__ import annotations

import numpy as np

from . import _lib
from ._arrays import as_array, refuse_masked
from .divergence import _dtype_code

__all__ = ["scale_rows"]


def scale_rows(x: np.ndarray, factors) -> np.ndarray:
    """Scales the rows of ``x`` in place: ``x[i, :] = round(x[i, :] * factors[i])``; returns ``x``.

    ``x``: a writeable ``[N, V]`` (or ``[V]``, one row) array of float32, float16 or
    ml_dtypes.bfloat16 whose rows are contiguous (a row stride larger than V is fine, e.g.
    ``big[:, :V]``); it is never copied, so other layouts raise ValueError. ``factors``: a number
    or a 1-element array (one factor for every row), or N values (``[N]``, ``[N, 1]`` or
    ``[1, N]``), of any real dtype (bfloat16 included), converted to float32 (a copy, so they
    may be a view of ``x``).
    The product is computed in float32 and rounded once to ``x``'s dtype; rows whose factor is
    exactly 1.0 keep their bits (NaN payloads included); 0, negative, inf and NaN factors scale
    as IEEE arithmetic says.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array (scaled in place), got {type(x).__name__}")
    refuse_masked("x", x)
    code = _dtype_code("x", x.dtype)
    if x.ndim not in (1, 2):
        raise ValueError(f"x must be 2-D [N, V] (or 1-D [V]), got shape {x.shape}")
    if x.shape[-1] == 0:
        raise ValueError(f"x has empty rows: shape {x.shape}")
    if not x.flags.writeable:
        raise ValueError("x is read-only (it is scaled in place)")
    m = x.reshape(1, -1) if x.ndim == 1 else x
    n, v = m.shape
    f, factor_stride = _factors(factors, n)  # checked even when there are no rows
    if x.size == 0:
        return x  # no rows: nothing to scale
    item = m.dtype.itemsize
    s0, s1 = m.strides
    if not (m.dtype.isnative and m.flags.aligned and (v == 1 or s1 == item)
            and (n == 1 or (s0 % item == 0 and s0 // item >= v))):
        raise ValueError(
            f"x must have contiguous, aligned rows in native byte order (strides {x.strides}, "
            f"dtype {x.dtype}): it is scaled in place, so it cannot be copied"
        )
    stride = v if n == 1 else s0 // item
    _lib.scale_rows_call(_lib.context(-1), m.ctypes.data, code, n, v, stride, f.ctypes.data,
                         factor_stride, None)
    return x


def _factors(factors, n: int):
    """(float32 factors, factor stride) for ``n`` rows, or TypeError / ValueError."""
    if factors is None or isinstance(factors, (str, bytes)) or (
        isinstance(factors, np.ndarray) and factors.dtype.kind in "US"
    ):
        # numpy would parse "2" as 2.0 and None as NaN: a misplaced argument, not a factor.
        raise TypeError(f"factors must be numbers, got {type(factors).__name__}")
    raw = as_array("factors", factors, anything=True)
    if not np.can_cast(raw.dtype, np.float32, "same_kind"):
        # [None, 2] is an object array whose None would become NaN; complex has no order.
        # (bfloat16 and the float8 types of ml_dtypes cast, as do ints and bools.)
        raise TypeError(f"factors must be numbers, got an array of {raw.dtype}")
    if raw.ndim > 2 or (raw.ndim == 2 and 1 not in raw.shape):
        # [N, 1] (as in x * f[:, None]) and [1, N] are the N factors; [2, 2] is a mistake.
        raise ValueError(f"factors must be a number, [N], [N, 1] or [1, N], got shape {raw.shape}")
    # A copy when the factors share memory with x (a row of a square x, say): they are read
    # while x is scaled.
    f = np.array(raw, dtype=np.float32, copy=True).reshape(-1)
    if f.size == 1:
        factor_stride = 0
    elif f.size == n:
        factor_stride = 1
    else:
        raise ValueError(f"factors must hold 1 value (all rows) or N = {n} values, got {f.size}")
    return f, factor_stride
