"""numpy face of the token-level divergence, on the library's CPU backend.

Shapes: ``student`` and ``teacher`` are ``[N, V]`` (or ``[V]``, a single row). The per-token loss
has the leading shape (``[N]``, or ``()`` for a single row), the gradient the student's shape and
dtype. Rows may be strided (``big[:, :V]`` is passed without a copy); arrays whose elements are
not contiguous within a row, or that are misaligned, byte-swapped or have rows that overlap, are
copied first. The inputs are never written, except ``student`` with ``grad_inplace=True``, which
receives the gradient (no gradient buffer is allocated).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import _lib
from ._arrays import as_array

__all__ = ["DivergenceResult", "divergence"]

try:  # bfloat16 support is optional: without ml_dtypes there is no bf16 array to pass anyway.
    import ml_dtypes as _ml_dtypes

    _BF16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    _BF16 = None


# Tests set this to fill the gradient with NaN before the call, to check every element is written.
_POISON = False


def _dtype_code(name: str, dt: np.dtype) -> int:
    if dt.kind == "f" and dt.itemsize == 4:
        return _lib.DTYPE_F32
    if dt.kind == "f" and dt.itemsize == 2:
        return _lib.DTYPE_F16
    if _BF16 is not None and dt == _BF16:
        return _lib.DTYPE_BF16
    raise TypeError(
        f"{name} dtype {dt} is not supported: use float32, float16 or ml_dtypes.bfloat16"
        + (" (float64 inputs: convert with .astype(np.float32))" if dt == np.float64 else "")
    )


@dataclass(frozen=True)
class DivergenceResult:
    """Result of :func:`divergence` (also unpacks as ``loss, per_token, grad``).

    Fields: ``loss`` (float, the reduced loss; for ``reduction="none"`` the sum of the per-token
    losses), ``per_token`` (float32 ``[N]``, 0 for ignored rows), ``grad`` (d(loss)/d(student),
    shaped like ``student`` in its dtype, or None when ``grad=False``)."""

    loss: float
    """The reduced loss (for ``reduction="none"``: the sum of the per-token losses)."""
    per_token: np.ndarray
    """float32 per-row losses, 0 for ignored rows."""
    grad: Optional[np.ndarray]
    """d(loss)/d(student), same shape and dtype as ``student``; None when ``grad=False``."""

    def __iter__(self):
        return iter((self.loss, self.per_token, self.grad))


def _as_logits(name: str, x) -> np.ndarray:
    x = as_array(name, x)
    _dtype_code(name, x.dtype)  # raises TypeError on anything else
    if x.ndim not in (1, 2):
        raise ValueError(f"{name} must be 2-D [N, V] (or 1-D [V]), got shape {x.shape}")
    return x


def _row_layout(x: np.ndarray) -> Tuple[np.ndarray, int]:
    """(array, row stride in elements) for a 2-D array the library can read without a copy,
    copying only when the layout cannot be expressed as rows of contiguous elements."""
    n, v = x.shape
    if n == 0:
        return x, v  # no rows: nothing is read or written, any layout will do
    item = x.dtype.itemsize
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    elem_ok = v == 1 or x.strides[1] == item
    if n == 1:
        row_ok, stride = True, v
    else:
        s0 = x.strides[0]
        row_ok = s0 % item == 0 and s0 // item >= v
        stride = s0 // item if row_ok else v
    if not (elem_ok and row_ok and x.flags.aligned):
        # A fresh copy: ascontiguousarray would hand back a contiguous-but-misaligned array as is.
        x = np.array(x, order="C", copy=True)
        stride = v
    return x, stride


def _labels(labels, n: int, lead_shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    if labels is None:
        return None
    lab = as_array("labels", labels, anything=True)
    if lab.dtype == np.bool_ or lab.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers (int64 preferred), got dtype {lab.dtype}")
    _lib.check_labels_shape(lab.shape, lead_shape, n)
    if lab.dtype == np.uint64 and lab.size and int(lab.max()) >= 2**63:
        raise ValueError("labels do not fit in int64")
    return np.ascontiguousarray(lab.reshape(n), dtype=np.int64)


def _grad_code(grad_dtype, in_dtype: np.dtype) -> Tuple[np.dtype, int]:
    """(numpy dtype, DK_DTYPE_*) of the gradients: the input dtype or float32."""
    if grad_dtype is None:
        return in_dtype, _dtype_code("input", in_dtype)
    try:
        dt = np.dtype(grad_dtype)
    except TypeError as e:
        raise TypeError(f"grad_dtype must be None, 'float32' or the input dtype, got "
                        f"{grad_dtype!r}") from e
    dt = _lib.native_dtype(dt)
    if dt == np.float32:
        return dt, _lib.DTYPE_F32
    if dt == in_dtype:
        return dt, _dtype_code("input", in_dtype)
    raise ValueError(
        f"grad_dtype must be None (the input dtype {in_dtype}), the input dtype or float32, "
        f"got {dt}"
    )


def _ptr(a: Optional[np.ndarray]) -> Optional[int]:
    return None if a is None else a.ctypes.data


def divergence(
    student,
    teacher,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels=None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items: Optional[float] = None,
    grad: bool = True,
    grad_inplace: bool = False,
    grad_dtype=None,
) -> DivergenceResult:
    """Token-level divergence between student and teacher logits, with its gradient.

    ``student`` and ``teacher``: ``[N, V]`` (or one row ``[V]``) numpy arrays of float32,
    float16 or ``ml_dtypes.bfloat16`` (the two may differ); flatten ``[B, S, V]`` logits with
    ``.reshape(-1, V)``. ``labels``: None or ``[N]`` integers (only compared with
    ``ignore_index``). Returns a :class:`DivergenceResult` (``loss``, ``per_token``, ``grad``).

    p = softmax(teacher / T), q = softmax(student / T) over the last axis;
    ``forward_kl`` = KL(p‖q), ``reverse_kl`` = KL(q‖p), ``jsd`` = β KL(p‖m) + (1−β) KL(q‖m) with
    m = βp + (1−β)q (β = 0 is forward KL, β = 1 reverse KL, as TRL's generalized_jsd_loss).
    Rows whose label equals ``ignore_index`` get loss 0 and gradient 0. ``batchmean`` divides the
    sum by the number of counted rows (at least 1) or by ``num_items``; ``sum`` sums; ``none``
    returns the per-row losses as the result (``loss`` is their sum, the gradient that of the sum).
    The gradient (``grad=True``) is d(loss)/d(student), 1/T included, in the student's dtype, or
    in float32 with ``grad_dtype="float32"``. For a float16 student that matters: its entries
    (about ``(q − p) / N`` under ``batchmean``) mostly lie below float16's smallest value
    (6e-8) at large N · V and round to 0 (61 % of them at N = 512, V = 32000); float32 keeps
    them (the student is widened first, which is exact).

    ``-inf`` logits are masked entries: they contribute 0, and a row with every entry masked on
    either side has loss 0 and gradient 0. Where only one side masks an entry the other gives
    mass to, the divergence is infinite: forward KL (teacher mass on an entry the student masks)
    gives a loss of ``inf`` with a finite gradient; reverse KL, or JSD with β = 1 (student mass
    on an entry the teacher masks), gives ``inf`` with a non-finite gradient row. Mask padded
    vocabulary entries on both sides. NaN (or ``+inf``) in a row makes that row's loss and
    gradient NaN and leaves other rows alone.

    Accuracy of the CUDA kernels (float32 arithmetic, hardware exp2 / log2): about 1e-5 relative
    at β in [0.1, 0.9] and T up to ~10. JSD with min(β, 1 − β) < 2^-5 runs kernels of its own
    whose loss and gradient errors shrink with min(β, 1 − β) as the values do (in a host replay
    of their arithmetic: within 3e-6 · min(β, 1 − β) plus 1e-3 relative for the loss, 2e-3 of
    the row's norm for the gradient). For β between 2^-5 and 0.1 (or 0.9 and 1 − 2^-5), a row's
    gradient may be up to ~1e-3 of its norm off under a worst-case model of the hardware's
    error. The KL loss's absolute error floor (~1e-7 per row) weighs more as T shrinks the
    divergence (~1e-3 relative at T = 100). With finite masks
    (``torch.finfo(dtype).min``) on one side only, the result is as undefined as the infinite
    one, and the CUDA kernels may give ``inf`` / NaN where float64 stays finite. A ``num_items``
    below ~T / 3.4e38 overflows the gradient's float32 scale. The CPU backend computes in
    float64. β itself is a float32 on every backend (the C ABI's type): near 1 its rounding
    moves 1 − β by up to 2^-25 / (1 − β) relative, and the JSD with it (up to 3e-5 at
    β = 0.999, 3e-2 at 1 − 10^-6; β close to 0 keeps full precision).

    ``grad_inplace=True`` writes the gradient over ``student`` itself (the logits are no longer
    needed once their gradient is known), so no ``[N, V]`` buffer is allocated; ``result.grad``
    is then a view of ``student``'s memory. ``student`` must be a writable numpy array whose rows
    the library can address (elements contiguous within a row, aligned, native byte order);
    anything that would need a copy is refused rather than silently not done in place.

    Raises ValueError / TypeError for bad arguments (a :class:`DistillKernelsError` subclass when
    the library rejects them, with its message); nothing is written then. Without
    ``grad_inplace`` the inputs are never modified.
    """
    params = _lib.make_params(kind, beta, temperature, ignore_index, reduction, num_items)
    if not isinstance(grad, (bool, np.bool_)):
        raise TypeError(f"grad must be a bool, got {grad!r}")
    if not isinstance(grad_inplace, (bool, np.bool_)):
        raise TypeError(f"grad_inplace must be a bool, got {grad_inplace!r}")
    if grad_inplace and not grad:
        raise ValueError("grad_inplace=True writes the gradient over student: it needs grad=True")
    if grad_inplace and not isinstance(student, np.ndarray):
        raise TypeError(
            f"grad_inplace=True needs student as a numpy array (it receives the gradient), got "
            f"{type(student).__name__}"
        )
    s = _as_logits("student", student)
    t = _as_logits("teacher", teacher)
    if s.shape != t.shape:
        raise ValueError(f"student shape {s.shape} and teacher shape {t.shape} differ")
    out_shape = s.shape
    lead_shape = s.shape[:-1]
    if s.ndim == 1:
        s, t = s[None, :], t[None, :]
    n, v = s.shape
    if v == 0:
        raise ValueError(f"empty rows: shape {out_shape} (V must be at least 1; N = 0 rows is "
                         "an empty batch, loss 0)")
    s_code = _dtype_code("student", s.dtype)
    t_code = _dtype_code("teacher", t.dtype)
    if grad_dtype is not None:
        if not grad:
            raise ValueError("grad_dtype applies to the gradient: it needs grad=True")
        g_dtype, g_code = _grad_code(grad_dtype, _lib.native_dtype(s.dtype))
        if g_code != s_code:
            if grad_inplace:
                raise ValueError("grad_inplace=True writes the gradient in the student's own "
                                 f"dtype {s.dtype}: drop grad_dtype (or grad_inplace)")
            # The library writes the gradient in the student's dtype: widen the student (exact).
            s, s_code = s.astype(g_dtype), g_code
    s_view = s
    s, s_stride = _row_layout(s)
    if grad_inplace:
        if s is not s_view:
            raise ValueError(
                "grad_inplace=True needs student rows the library can write in place (elements "
                "contiguous within each row, aligned, native byte order, rows not overlapping); "
                "pass np.ascontiguousarray(student) or drop grad_inplace"
            )
        if not s.flags.writeable:
            raise ValueError("grad_inplace=True: student is read-only (it receives the gradient)")
    t, t_stride = _row_layout(t)
    lab = _labels(labels, n, lead_shape)

    loss = ctypes.c_float(float("nan"))
    per_token = np.full(n, np.nan, dtype=np.float32)
    g = None
    g_stride = 0
    if grad_inplace:
        g, g_stride = s, s_stride  # the library allows the gradient exactly over the student
    elif grad:
        g, g_stride = np.empty((n, v), dtype=s.dtype), v
        if _POISON:
            g.fill(np.nan)
    args = _lib.DivergenceArgs(
        n=n,
        v=v,
        student=_ptr(s),
        student_dtype=s_code,
        student_stride=s_stride,
        teacher=_ptr(t),
        teacher_dtype=t_code,
        teacher_stride=t_stride,
        labels=_ptr(lab),
        loss=ctypes.addressof(loss),
        per_token=_ptr(per_token),
        grad=_ptr(g),
        grad_stride=g_stride,
    )
    l = _lib.lib()
    ctx = _lib.context(-1)
    status = l.dk_divergence(ctx, ctypes.byref(args), ctypes.byref(params), None, 0, None)
    _lib.check(status, "divergence")
    return DivergenceResult(
        loss=float(loss.value),
        per_token=per_token.reshape(lead_shape),
        grad=None if g is None else g.reshape(out_shape),
    )
