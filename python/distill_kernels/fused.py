"""numpy face of the fused linear divergence, on the library's CPU backend.

The divergence of :func:`distill_kernels.divergence` computed straight from hidden states and
lm_head weights: student logits = ``logit_scale · student_hidden @ student_weightᵀ`` (then
``softcap · tanh(z / softcap)`` when ``softcap`` is set), teacher logits likewise from its own
hidden states and weight. Rows are processed in chunks, so the ``[N, V]`` logits never exist
whole (the CPU backend, this face's, is an f64 reference for small shapes: it widens the inputs
and the weight gradient to float64, O((N + V) · H) extra memory; :class:`OutOfMemoryError`
where the host refuses it). Outputs: the loss, the per-token losses, and the gradients of the loss w.r.t. the student
hidden states (``[N, H]``) and the student weight (``[V, H]``); the teacher gets none.

Shapes: hidden states ``[..., H]`` (leading axes are flattened into N rows; ``per_token`` has the
leading shape), weights ``[V, H]`` / ``[V, Ht]``. All four inputs share one dtype (float32,
float16 or ``ml_dtypes.bfloat16``). Rows may be strided; other layouts are copied. The inputs are
never written.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import _lib
from ._arrays import as_array, refuse_masked
from .divergence import _dtype_code, _grad_code, _labels, _ptr, _row_layout

__all__ = ["FusedLinearResult", "fused_linear_divergence"]

# Tests set this to fill freshly allocated gradients with NaN before the call, to check every
# element is written.
_POISON = False


@dataclass(frozen=True)
class FusedLinearResult:
    """Result of :func:`fused_linear_divergence` (also unpacks as ``loss, per_token,
    grad_hidden, grad_weight``).

    Fields: ``loss`` (float), ``per_token`` (float32, the hidden states' leading shape),
    ``grad_hidden`` (shaped like ``student_hidden``) and ``grad_weight`` (``[V, H]``), both in
    ``grad_dtype`` or None when ``grad=False``."""

    loss: float
    """The reduced loss (for ``reduction="none"``: the sum of the per-token losses)."""
    per_token: np.ndarray
    """float32 per-row losses (the hidden states' leading shape), 0 for ignored rows."""
    grad_hidden: Optional[np.ndarray]
    """d(loss)/d(student_hidden), shaped like it, in ``grad_dtype`` (the given buffer when
    ``grad_hidden_out`` was passed); None when ``grad=False``."""
    grad_weight: Optional[np.ndarray]
    """d(loss)/d(student_weight) ``[V, H]`` in ``grad_dtype`` (the given buffer when
    ``grad_weight_out`` was passed); None when ``grad=False``."""

    def __iter__(self):
        return iter((self.loss, self.per_token, self.grad_hidden, self.grad_weight))


def _as_array(name: str, x, min_ndim: int, max_ndim: Optional[int]) -> np.ndarray:
    x = as_array(name, x)
    _dtype_code(name, x.dtype)  # TypeError on anything else
    if x.ndim < min_ndim or (max_ndim is not None and x.ndim > max_ndim):
        want = "at least 2-D [..., H]" if max_ndim is None else "2-D [V, H]"
        raise ValueError(f"{name} must be {want}, got shape {x.shape}")
    # Hidden states may have no rows (an empty batch: loss 0); every other size is >= 1.
    if x.shape[-1] == 0 or (max_ndim is not None and 0 in x.shape):
        raise ValueError(f"{name} is empty: shape {x.shape}")
    return x


def _out_buffer(name: str, out, shape: Tuple[int, ...], in_dtype: np.dtype, grad_dtype,
                inputs) -> Tuple[np.ndarray, int]:
    """Validates a caller-provided gradient buffer; returns (array, DK_DTYPE_*)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(out).__name__}")
    refuse_masked(name, out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    # A byte-swapped buffer is written through a native copy (_writable_rows).
    out_dtype = _lib.native_dtype(out.dtype)
    if out_dtype == np.float32:
        code = _lib.DTYPE_F32
    elif out_dtype == in_dtype:
        code = _dtype_code(name, in_dtype)
    else:
        raise TypeError(f"{name} dtype {out.dtype} must be float32 or the input dtype {in_dtype}")
    if grad_dtype is not None and _lib.native_dtype(np.dtype(grad_dtype)) != out_dtype:
        raise ValueError(f"{name} has dtype {out.dtype} but grad_dtype is {np.dtype(grad_dtype)}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if not _elements_distinct(out):
        # A broadcast or as_strided view: gradients accumulated into it would land on each
        # other (and the copy written back would keep only the last row's).
        raise ValueError(f"{name} may have overlapping elements (strides {out.strides}): "
                         "pass a buffer whose elements are separate memory")
    for iname, x in inputs:
        if np.may_share_memory(out, x):
            raise ValueError(f"{name} overlaps {iname}: the gradient buffer must be separate "
                             "memory")
    return out, code


def fused_linear_divergence(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels=None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items: Optional[float] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_rows: Optional[int] = None,
    grad: bool = True,
    grad_dtype=None,
    grad_hidden_out: Optional[np.ndarray] = None,
    grad_weight_out: Optional[np.ndarray] = None,
) -> FusedLinearResult:
    """Fused lm_head + divergence: loss and gradients from hidden states, logits never whole.

    Student logits ``z = logit_scale · student_hidden @ student_weightᵀ``, soft-capped to
    ``softcap · tanh(z / softcap)`` when ``softcap`` is given; the teacher's likewise from
    ``teacher_hidden`` and ``teacher_weight`` (pass the same array as ``student_weight`` for
    self-distillation). Then the divergence of :func:`distill_kernels.divergence` with the same
    ``kind``, ``beta``, ``temperature``, ``labels`` / ``ignore_index``, ``reduction`` and
    ``num_items``. ``labels``: one integer per row, in the leading shape of the hidden states or
    flattened (``[N]``).

    ``chunk_rows`` rows are processed at a time (None: chosen from V and H); the result does not
    depend on it. With ``grad=True`` the gradients of the loss w.r.t. ``student_hidden`` and
    ``student_weight`` are returned, in the input dtype or, with ``grad_dtype="float32"``, in
    float32. ``grad_hidden_out`` / ``grad_weight_out`` (``[..., H]`` / ``[V, H]``, the input
    dtype or float32) are accumulated into (``+=``, gradient accumulation) and returned; when
    only one of them is given the other gradient is returned fresh.

    Raises ValueError / TypeError for bad arguments (a :class:`DistillKernelsError` subclass when
    the library rejects them); the inputs are never modified, nor are the buffers on error.
    """
    accumulate = grad_hidden_out is not None or grad_weight_out is not None
    params = _lib.make_fused_params(kind, beta, temperature, ignore_index, reduction, num_items,
                                    logit_scale, softcap, chunk_rows, accumulate)
    if not isinstance(grad, (bool, np.bool_)):
        raise TypeError(f"grad must be a bool, got {grad!r}")
    if accumulate and not grad:
        raise ValueError("grad_hidden_out / grad_weight_out need grad=True")
    hs = _as_array("student_hidden", student_hidden, 2, None)
    ws = _as_array("student_weight", student_weight, 2, 2)
    ht = _as_array("teacher_hidden", teacher_hidden, 2, None)
    wt = _as_array("teacher_weight", teacher_weight, 2, 2)
    # Byte-swapped inputs are copied to native order below; the gradients are native too.
    dtype = _lib.native_dtype(hs.dtype)
    for name, x in (("student_weight", ws), ("teacher_hidden", ht), ("teacher_weight", wt)):
        if _lib.native_dtype(x.dtype) != dtype:
            raise TypeError(f"all four inputs must have one dtype: student_hidden is {dtype}, "
                            f"{name} is {x.dtype}")
    code = _dtype_code("student_hidden", dtype)
    lead_shape = hs.shape[:-1]
    h = hs.shape[-1]
    v = ws.shape[0]
    if ws.shape[1] != h:
        raise ValueError(f"student_weight {ws.shape} must be [V, H] with H = {h} (the hidden size "
                         f"of student_hidden {hs.shape})")
    hdim_t = ht.shape[-1]
    if wt.shape != (v, hdim_t):
        raise ValueError(f"teacher_weight {wt.shape} must be [V, Ht] = ({v}, {hdim_t}) (V of "
                         f"student_weight, Ht of teacher_hidden {ht.shape})")
    if ht.shape[:-1] != lead_shape:
        raise ValueError(f"teacher_hidden {ht.shape} and student_hidden {hs.shape} must have "
                         "the same leading shape (one row per token)")
    n = int(np.prod(lead_shape))
    lab = _labels(labels, n, lead_shape)
    g_dtype, g_code = _grad_code(grad_dtype, dtype)

    inputs = (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht),
              ("teacher_weight", wt))
    gh_out = gw_out = None
    gh_code = gw_code = g_code
    if grad_hidden_out is not None:
        gh_out, gh_code = _out_buffer("grad_hidden_out", grad_hidden_out, hs.shape, dtype,
                                      grad_dtype, inputs)
    if grad_weight_out is not None:
        gw_out, gw_code = _out_buffer("grad_weight_out", grad_weight_out, ws.shape, dtype,
                                      grad_dtype, inputs)
    if gh_out is not None and gw_out is not None and np.may_share_memory(gh_out, gw_out):
        raise ValueError("grad_hidden_out and grad_weight_out overlap")

    hs2, hs_stride = _row_layout(hs.reshape(n, h))
    ws2, ws_stride = _row_layout(ws)
    ht2, ht_stride = _row_layout(ht.reshape(n, hdim_t))
    wt2, wt_stride = (ws2, ws_stride) if wt is ws else _row_layout(wt)

    # What the library writes: (array with contiguous rows, row stride, copy back afterwards).
    gh = gw = None
    if grad:
        if gh_out is not None:
            view = gh_out.reshape(n, h) if _reshape_is_view(gh_out, (n, h)) else None
            gh = _writable_rows(view, gh_out, (n, h))
        else:
            gh = (_fresh((n, h), g_dtype, accumulate), h, False)
        if gw_out is not None:
            gw = _writable_rows(gw_out, gw_out, (v, h))
        else:
            gw = (_fresh((v, h), g_dtype, accumulate), h, False)

    loss = ctypes.c_float(float("nan"))
    per_token = np.full(n, np.nan, dtype=np.float32)
    args = _lib.FusedLinearArgs(
        n=n,
        v=v,
        h=h,
        ht=hdim_t,
        dtype=code,
        student_hidden=_ptr(hs2),
        student_hidden_stride=hs_stride,
        student_weight=_ptr(ws2),
        student_weight_stride=ws_stride,
        teacher_hidden=_ptr(ht2),
        teacher_hidden_stride=ht_stride,
        teacher_weight=_ptr(wt2),
        teacher_weight_stride=wt_stride,
        labels=_ptr(lab),
        loss=ctypes.addressof(loss),
        per_token=_ptr(per_token),
        grad_hidden=None if gh is None else gh[0].ctypes.data,
        grad_hidden_dtype=gh_code,
        grad_hidden_stride=0 if gh is None else gh[1],
        grad_weight=None if gw is None else gw[0].ctypes.data,
        grad_weight_dtype=gw_code,
        grad_weight_stride=0 if gw is None else gw[1],
    )
    handle = _lib.context(-1)
    ws_bytes = _lib.fused_workspace_size(handle, args, params)
    workspace = np.empty(ws_bytes, np.uint8) if ws_bytes else None
    _lib.fused_call(handle, args, params, _ptr(workspace), ws_bytes, None)

    grad_hidden = grad_weight = None
    if grad:
        grad_hidden = _finish(gh, gh_out, hs.shape)
        grad_weight = _finish(gw, gw_out, ws.shape)
    return FusedLinearResult(
        loss=float(loss.value),
        per_token=per_token.reshape(lead_shape),
        grad_hidden=grad_hidden,
        grad_weight=grad_weight,
    )


def _fresh(shape, dtype, zero: bool) -> np.ndarray:
    if zero:  # accumulate mode (the other buffer was given): add into zeros
        return np.zeros(shape, dtype)
    a = np.empty(shape, dtype)
    if _POISON:
        a.fill(np.nan)
    return a


def _reshape_is_view(a: np.ndarray, shape) -> bool:
    try:
        r = a.reshape(shape)
    except ValueError:
        return False
    return np.may_share_memory(r, a)  # a copy is fresh memory


def _elements_distinct(a: np.ndarray) -> bool:
    """Whether no two elements of ``a`` share bytes: with the dimensions ordered by stride, each
    stride must step over everything the smaller ones span (a sufficient test; layouts that
    interleave dimensions are refused too)."""
    span = a.itemsize
    for stride, n in sorted((abs(s), n) for s, n in zip(a.strides, a.shape) if n > 1):
        if stride < span:
            return False
        span += stride * (n - 1)
    return True


def _writable_rows(view2d: Optional[np.ndarray], out: np.ndarray, shape):
    """(array the library writes, row stride, needs copy-back) for a caller's buffer: the
    buffer itself when its rows are contiguous, aligned and native, else a contiguous copy of
    its contents that is copied back after the call."""
    item = out.dtype.itemsize
    a = view2d if view2d is not None else (out if out.ndim == 2 else None)
    if a is not None and a.dtype.isnative and a.flags.aligned:
        rows, cols = a.shape
        elem_ok = cols == 1 or a.strides[1] == item
        s0 = a.strides[0]
        if rows == 1 and elem_ok:  # a single row: its stride is never used
            return a, cols, False
        if elem_ok and s0 % item == 0 and s0 // item >= cols:
            return a, s0 // item, False
    c = np.array(out.reshape(shape), dtype=out.dtype.newbyteorder("="), order="C", copy=True)
    return c, shape[1], True


def _finish(buf, out: Optional[np.ndarray], shape) -> np.ndarray:
    arr, _, copy_back = buf
    if out is None:
        return arr.reshape(shape)
    if copy_back:
        np.copyto(out, arr.reshape(shape))
    return out
