"""torch face of the token-level divergence: an autograd function over the C ABI.

``divergence(student, teacher, ...)`` takes ``[..., V]`` logits on a CUDA device and
runs zero-copy on that device's current torch stream, with no host synchronisation: the loss is
written into a device tensor. It returns a 0-d float32 tensor for ``batchmean`` / ``sum`` and the
per-token float32 tensor of the leading shape for ``none``. When the student requires grad, the
gradient is computed in the same pass into a buffer of the student's dtype (float32 for a float16 student,
so that it does not underflow before the loss scale reaches it); backward scales it by
``grad_output`` (in place, so each graph can be backpropagated once; on CUDA through
dk_scale_rows, see :func:`scale_rows_`, which reads ``grad_output`` on the device and skips the
pass when it is exactly 1). The teacher is treated as a constant (as in TRL and Liger): no
gradient flows to it.

CPU tensors work too, through the library's CPU backend (blocking).
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional, Tuple, Union

try:
    import torch
    from torch.autograd.function import once_differentiable
except ImportError as e:  # the numpy face (import distill_kernels) needs no torch
    raise ImportError(
        "distill_kernels.torch needs PyTorch (pip install torch); the numpy face, "
        "`import distill_kernels`, works without it"
    ) from e

from . import _lib

__all__ = ["divergence", "DivergenceFunction"]

_DTYPES = {torch.float32: _lib.DTYPE_F32, torch.bfloat16: _lib.DTYPE_BF16, torch.float16: _lib.DTYPE_F16}


def _eager(fn):
    """Runs ``fn`` eagerly under ``torch.compile``: a clean graph break around the ctypes call
    (Dynamo would otherwise try to trace into ctypes, warn three times per call site, and break
    there anyway). ``fullgraph=True`` therefore refuses these functions: the MoE faces and the
    forms that write into inputs or caller buffers. The others are traced as the custom ops of
    :mod:`distill_kernels._torch_ops`."""
    return torch.compiler.disable(fn)


_FORWARD_GRADIENTS = ("its gradients are computed in the forward pass and are not differentiable "
                      "themselves")
_FLT_MIN = _lib.FLT_MIN
_KERNEL_BACKWARD = "its backward runs library kernels that autograd cannot differentiate"


def _first_order(what: str, why: str = _FORWARD_GRADIENTS):
    """Decorator for the backward of a Function whose backward is not differentiable (its
    gradients are computed in the forward pass, or by library kernels, ``why``): a double
    backward (``torch.autograd.grad(..., create_graph=True)``, under which autograd runs
    backward with grad mode on) raises here instead of building a graph that silently lacks
    every second-order term through this call. ``once_differentiable`` alone catches only the
    case where ``grad_output`` itself requires grad."""

    def wrap(backward):
        inner = once_differentiable(backward)

        @functools.wraps(backward)
        def checked(ctx, *grad_outputs):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"distill_kernels.torch.{what}: double backward (create_graph=True) is not "
                    f"supported: {why}"
                )
            return inner(ctx, *grad_outputs)

        return checked

    return wrap


def _device_ordinal(x: torch.Tensor) -> int:
    if x.device.type == "cuda":
        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    if x.device.type == "cpu":
        return -1
    raise ValueError(f"tensors on {x.device} are not supported (CUDA or CPU only)")


def _rows_addressable(x: torch.Tensor) -> bool:
    """Whether the library can take the 2-D `x` as it is: elements contiguous within each row,
    rows not overlapping (a broadcast, stride-0 or overlapping layout is not)."""
    n, v = x.shape
    return n == 0 or ((v == 1 or x.stride(1) == 1) and (n == 1 or x.stride(0) >= v))


def _matrix(name: str, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(2-D tensor whose rows are contiguous, row stride in elements); copies only if needed."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} dtype {x.dtype} is not supported: use float32, bfloat16 or float16")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    elif x.dim() > 2:
        x = x.reshape(-1, x.shape[-1])  # a view where the leading axes flatten, else a copy
    if not _rows_addressable(x):
        x = x.contiguous()
    n, v = x.shape
    # One row or none: the stride is never used (an empty tensor may report 0 or 1).
    return x, (v if n <= 1 else x.stride(0))


def _labels(labels, n: int, lead_shape, device: torch.device) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must be integers (int64 preferred), got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    _lib.check_labels_shape(labels.shape, lead_shape, n)
    return labels.reshape(n).to(torch.int64).contiguous()


def _ptr(x: Optional[torch.Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


def _launch(device: int, student, s_stride, teacher, t_stride, labels, params, loss, per_token,
            grad, g_stride, num_items_mem=None) -> None:
    l = _lib.lib()
    handle = _lib.context(device)
    n, v = student.shape
    stream = None
    workspace, ws_bytes = None, 0
    if device >= 0:
        size = ctypes.c_size_t(0)
        _lib.check(l.dk_divergence_workspace_size(handle, n, ctypes.byref(size)),
                   "dk_divergence_workspace_size")
        ws_bytes = size.value
        if ws_bytes:
            # Through torch's caching allocator, ordered on the current stream like the kernels.
            workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=student.device)
        stream = torch.cuda.current_stream(device).cuda_stream
    args = _lib.DivergenceArgs(
        n=n,
        v=v,
        student=student.data_ptr(),
        student_dtype=_DTYPES[student.dtype],
        student_stride=s_stride,
        teacher=teacher.data_ptr(),
        teacher_dtype=_DTYPES[teacher.dtype],
        teacher_stride=t_stride,
        labels=_ptr(labels),
        loss=_ptr(loss),
        per_token=_ptr(per_token),
        grad=_ptr(grad),
        grad_stride=g_stride,
        num_items=_ptr(num_items_mem),
    )
    status = l.dk_divergence(handle, ctypes.byref(args), ctypes.byref(params), _ptr(workspace),
                             ws_bytes, stream)
    _lib.check(status, "divergence")


def _scale_rows_launch(x: torch.Tensor, factors: torch.Tensor, factor_stride: int) -> None:
    """dk_scale_rows over the 2-D `x` (rows of contiguous elements, row stride x.stride(0)) with
    the float32 `factors` on x's device, on that device's current stream."""
    n, v = x.shape
    device = _device_ordinal(x)

    def go():
        stream = torch.cuda.current_stream(device).cuda_stream if device >= 0 else None
        _lib.scale_rows_call(_lib.context(device), x.data_ptr(), _DTYPES[x.dtype], n, v,
                             x.stride(0) if n > 1 else v, factors.data_ptr(), factor_stride,
                             stream)

    _on_device(device, go)


def _scale_by_grad_output(g: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> None:
    """g *= grad_output in place, over the rows of the 2-D buffer g (per_row: one grad_output
    value per row; else one for all). On CUDA through dk_scale_rows, which reads grad_output on
    the device and skips the rows whose factor is exactly 1 (the usual case: no pass over g at
    all); on the CPU through mul_. The product in float32 with the float32 grad_output, rounded
    once to g's dtype (torch's own mul_ by a 0-d CUDA tensor would first round the factor to g's
    dtype); no host sync."""
    if g.device.type != "cuda":
        g.mul_(grad_output.reshape(-1, 1) if per_row else grad_output.reshape(()))
        return
    factors = grad_output.to(torch.float32).contiguous()
    _scale_rows_launch(g, factors, 1 if per_row else 0)


__all__ += ["scale_rows_"]


@_eager
def scale_rows_(x: torch.Tensor, factors) -> torch.Tensor:
    """Scales the rows of ``x`` in place, ``x[i, :] = round(x[i, :] * factors[i])``; returns ``x``.

    ``x``: ``[N, V]`` (or ``[V]``) float32 / bfloat16 / float16 on a CUDA device (or the CPU,
    through the library's CPU backend), with contiguous rows (a row stride above V is fine); it
    is written through its pointer, so it must not require grad. ``factors``: a tensor on x's
    device with 1 value (every row) or N values (converted to float32), or a Python number. The
    product is computed in float32 and rounded once to x's dtype (as ``x.mul_(f)`` for a float32
    ``f`` of shape ``[N, 1]``; for a 0-d float32 ``f`` on CUDA torch rounds the factor to x's dtype
    first, this does not); rows whose factor is exactly 1.0 are not read or written. On CUDA the
    factors are read by the kernel on the current stream: no host synchronisation, and a factor of
    1 costs no pass over x.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not supported: use float32, bfloat16 or float16")
    if x.dim() not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"x must be a 2-D [N, V] (or 1-D [V]) tensor with V >= 1, got shape "
                         f"{tuple(x.shape)}")
    if x.requires_grad:
        raise ValueError("x requires grad: scale a plain buffer (detached, or under no_grad)")
    _device_ordinal(x)
    m = x.unsqueeze(0) if x.dim() == 1 else x
    n, v = m.shape
    if (v > 1 and m.stride(1) != 1) or (n > 1 and m.stride(0) < v):
        raise ValueError(f"x must have contiguous, non-overlapping rows (stride(-1) == 1, row "
                         f"stride >= V), got strides {tuple(x.stride())}: it is scaled in place")
    if isinstance(factors, torch.Tensor):
        if factors.device != x.device:
            raise ValueError(f"factors are on {factors.device} but x is on {x.device}")
        f = factors.detach().to(torch.float32).reshape(-1).contiguous()
    else:
        f = torch.full((1,), _lib._real("factors", factors), dtype=torch.float32, device=x.device)
    if f.numel() not in (1, n):
        raise ValueError(f"factors must hold 1 value (every row) or N = {n} values, got "
                         f"{f.numel()}")
    _scale_rows_launch(m, f, 0 if f.numel() == 1 else 1)
    return x


def _divergence_run(student, teacher, labels, params, reduction_none: bool, want_grad: bool,
                    inplace: bool = False, num_items_mem: Optional[torch.Tensor] = None):
    """One dk_divergence call over ``[..., V]`` logits (as N rows) on their device's current
    stream: (loss 0-d, per-token ``[N]`` or None, gradient buffer ``[N, V]`` or None). The
    gradient is written over ``student`` with ``inplace`` (its rows addressable: validated by
    the caller); else into a new buffer of the student's dtype (float32 for float16).
    ``num_items_mem``: batchmean's divisor as a float32 ``[1]`` tensor on the student's device
    (see :func:`_num_items_resolved`), read by the library when the call runs."""
    device = _device_ordinal(student)
    s, s_stride = _matrix("student", student)
    t, t_stride = _matrix("teacher", teacher)
    n, v = s.shape
    dev = s.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    per_token = torch.empty(n, dtype=torch.float32, device=dev) if reduction_none else None
    grad, g_stride = None, 0
    if inplace:
        if s.data_ptr() != student.data_ptr():  # pragma: no cover - a bug if reached
            raise RuntimeError("grad_inplace: the student logits were copied")
        grad, g_stride = s, s_stride
    elif want_grad:
        if s.dtype == torch.float16:
            # A float16 gradient of the loss (batchmean: about (q - p) / N per entry) mostly
            # falls below float16's smallest value before backward multiplies it by
            # grad_output, an AMP loss scale: computed from a float32 copy of the student
            # (the same values) into a float32 buffer, rounded to float16 after the scaling.
            s, s_stride = s.float(), v
        grad, g_stride = torch.empty((n, v), dtype=s.dtype, device=dev), v
    _on_device(device, lambda: _launch(device, s, s_stride, t, t_stride, labels, params, loss,
                                       per_token, grad, g_stride, num_items_mem))
    return loss, per_token, grad


class DivergenceFunction(torch.autograd.Function):
    """autograd.Function behind :func:`divergence` (arguments already validated)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, params, reduction_none, want_grad, inplace,
                num_items_mem=None):
        out_shape = student.shape
        lead_shape = student.shape[:-1]
        # inplace: validated by divergence() (student's rows are addressable in place).
        loss, per_token, grad = _divergence_run(student, teacher, labels, params,
                                                reduction_none, want_grad, inplace,
                                                num_items_mem)
        if inplace:
            # student now holds the gradient: autograd nodes that saved it for their backward
            # raise ("modified by an inplace operation") instead of reading the gradient.
            torch.autograd.graph.increment_version(student)
        ctx.grad_buf = grad
        ctx.student_dtype = student.dtype
        ctx.out_shape = out_shape
        ctx.reduction_none = reduction_none
        if reduction_none:
            return per_token.reshape(lead_shape)
        return loss

    @staticmethod
    @_first_order("divergence")
    def backward(ctx, grad_output):
        g = ctx.grad_buf
        if g is None:
            if ctx.needs_input_grad[0]:
                raise RuntimeError(
                    "distill_kernels.torch.divergence: the gradient buffer was already consumed "
                    "by an earlier backward (it is scaled in place); run the forward again "
                    "instead of backpropagating the same graph twice"
                )
            return (None,) * 8
        ctx.grad_buf = None
        _scale_by_grad_output(g, grad_output, ctx.reduction_none)
        # A float32 buffer of a float16 student goes back as float16, rounded once after the
        # scaling (the others are already the student's dtype: no copy).
        g = g.to(ctx.student_dtype).view(ctx.out_shape)
        return (g,) + (None,) * 7


def divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items: Optional[Union[float, torch.Tensor]] = None,
    grad: Optional[bool] = None,
    grad_inplace: bool = False,
) -> torch.Tensor:
    """Token-level divergence of student logits from teacher logits, differentiable in `student`.

    Same parameters and math as :func:`distill_kernels.divergence`. Returns the 0-d float32
    loss (``batchmean`` / ``sum``) or the float32 per-token losses (``none``). The gradient is
    computed in the forward pass when ``student.requires_grad`` (and grad mode is on); pass
    ``grad=False`` to skip it. ``grad=True`` does not force one: without ``requires_grad`` (or
    under ``torch.no_grad()``) nothing could receive it, and the call is forward only.

    ``logits`` may have any leading shape ``[..., V]`` (``[B, T, V]``): they are flattened to rows,
    as a view where the leading axes allow it, else by a copy (``logits[:, :-1]`` of a
    contiguous ``[B, T, V]`` is copied: prefer ``logits`` whole with the labels of each
    sequence's last position set to ``ignore_index``); ``labels`` have the leading shape (or
    are those rows flattened, ``[N]``), and so has the ``none`` output.

    ``num_items`` is a Python number, or a tensor with one value (such as the Hugging Face
    Trainer's ``num_items_in_batch``, on the logits' device or the CPU), converted to float32. A
    tensor on the logits' device is read by the library's kernels on the current stream (no
    host synchronisation); a CPU tensor is read on the host (no synchronisation either). A
    value that is not a finite float32 of at least 2^-126 (the smallest normal: a subnormal's
    reciprocal overflows) gives the ``sum`` (checking it would
    synchronise; a Python number out of that range is an error instead). Either way the divisor
    is folded into the gradient by the kernel, as a Python number is: the results are bitwise
    those of ``num_items=float(value.float())``, and backward makes no pass over the gradient
    when ``grad_output`` is 1 (under ``torch.compile`` a CPU tensor with CUDA logits divides the
    ``sum`` instead, which costs that pass).

    The gradient is kept in the student's dtype until backward multiplies it by ``grad_output``,
    except for a float16 student: its gradient entries (about ``(q - p) / N`` under
    ``batchmean``) mostly lie below float16's smallest value, so they would be 0 before an AMP
    loss scale (``GradScaler``) could lift them. It is computed from a float32 copy of the
    student (the same values, same loss) into a float32 buffer and rounded to float16 after the
    scaling. For float16 only, that costs 8 bytes per logit instead of 2 at the forward's peak
    (the copy and the float32 gradient) and three more passes over them. bfloat16 has
    float32's exponent range and keeps its own dtype. ``grad_inplace=True`` keeps float16 (it
    writes over the student), with that underflow.

    Second derivatives are not supported: under ``create_graph=True`` the backward raises.

    ``grad_inplace=True`` writes that gradient over ``student`` itself instead of a new ``[N, V]``
    buffer (the extra memory of the call drops to a few bytes per row): the student logits are
    destroyed by the forward. Use it where nothing reads them afterwards, typically the output
    of the lm_head (``hidden @ weight.T``), whose backward needs only ``hidden`` and ``weight``.
    ``student`` must then be an intermediate tensor (not a leaf, nor a view of one) whose rows
    are contiguous. Its version counter is bumped, so an autograd node that saved this very
    tensor for its backward (``torch.tanh``, ``softmax`` or ``exp`` producing it, or a product
    with another tensor that requires grad) raises in backward instead of reading the gradient;
    ``cap * torch.tanh(x / cap)`` is fine (the product saves the tanh, not its own output).
    Reads of the logits after this call in the forward (another loss, an argmax, logging) see
    the gradient with no error: do them first. Saved-tensor hooks that keep their own copies
    (``torch.autograd.graph.save_on_cpu`` on CPU tensors, identity hooks) defeat the version
    check, as they do for torch's own in-place ops. When no gradient is computed, nothing is
    written.
    """
    compiling = _TRACEABLE and torch.compiler.is_compiling()
    items = _num_items_tensor(num_items, reduction, student)
    if compiling and _num_items_on_host_only(items, student):
        total = divergence(student, teacher, kind=kind, beta=beta, temperature=temperature,
                           labels=labels, ignore_index=ignore_index, reduction="sum",
                           num_items=None, grad=grad, grad_inplace=grad_inplace)
        return total / _positive_or_one(items)
    if items is not None:
        num_items = None
    if not grad_inplace and compiling:
        # Under torch.compile: the custom op distill_kernels::divergence, traced into the graph
        # (no graph break). grad_inplace writes over an input, so it stays eager (a break).
        return _torch_ops.divergence(student, teacher, kind=kind, beta=beta,
                                     temperature=temperature, labels=labels,
                                     ignore_index=ignore_index, reduction=reduction,
                                     num_items=num_items, num_items_t=items, grad=grad)
    return _divergence_eager(student, teacher, kind=kind, beta=beta, temperature=temperature,
                             labels=labels, ignore_index=ignore_index, reduction=reduction,
                             num_items=num_items, num_items_t=items, grad=grad,
                             grad_inplace=grad_inplace)


def _num_items_on_host_only(items: Optional[torch.Tensor], like: torch.Tensor) -> bool:
    """A tensor ``num_items`` on the CPU with inputs elsewhere: under torch.compile reading it
    would break the graph, so the compiled call divides the ``sum`` by it instead."""
    return items is not None and items.device != like.device


def _positive_or_one(d: torch.Tensor) -> torch.Tensor:
    """``d`` where it is finite and at least 2^-126, else 1 (float32, on d's device: no host
    sync)."""
    d = d.reshape(()).to(torch.float32)
    return torch.where((d >= _FLT_MIN) & torch.isfinite(d), d, torch.ones_like(d))


def _num_items_resolved(items: Optional[torch.Tensor], num_items, reduction: str,
                        like: torch.Tensor):
    """Where the call's batchmean divisor comes from, right before it runs: (num_items for the
    parameters, ``num_items_mem`` for the arguments, reduction). ``items`` is a tensor
    ``num_items`` checked by :func:`_num_items_tensor`, or None (``num_items`` then stands). On
    ``like``'s device it becomes ``num_items_mem``, a float32 ``[1]`` tensor the library reads
    when the call runs (no host sync). A CPU tensor with CUDA inputs is read here on the host (no
    device sync): its value, or the ``sum`` where it is not a finite float32 of at least 2^-126."""
    if items is None:
        return num_items, None, reduction
    d = items.detach().reshape(1).to(torch.float32)
    if d.device == like.device:
        return None, d.contiguous(), reduction
    value = float(d[0])
    if math.isfinite(value) and value >= _FLT_MIN:
        return value, None, reduction
    return None, None, "sum"


def _num_items_tensor(num_items, reduction, like) -> Optional[torch.Tensor]:
    """``num_items`` given as a tensor, checked (one real value, on like's device or the CPU,
    with ``reduction='batchmean'``): the tensor; None for a Python number or None."""
    if not isinstance(num_items, torch.Tensor) or not isinstance(like, torch.Tensor):
        return None
    if not isinstance(reduction, str) or reduction not in _lib.REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(_lib.REDUCTIONS)}, got {reduction!r}")
    if reduction != "batchmean":
        raise ValueError(f"num_items only applies to reduction='batchmean' (got reduction="
                         f"{reduction!r})")
    if num_items.numel() != 1:
        raise ValueError(f"num_items must hold one value, got shape {tuple(num_items.shape)}")
    if num_items.dtype == torch.bool or num_items.is_complex():
        raise TypeError(f"num_items must be a real number, got a {num_items.dtype} tensor")
    if num_items.device != like.device and num_items.device.type != "cpu":
        raise ValueError(f"num_items is on {num_items.device} but the inputs are on "
                         f"{like.device}")
    return num_items.detach()


def _check_divergence_inputs(student, teacher, labels, beta, temperature, grad, grad_inplace):
    """The tensor and flag checks of :func:`divergence` (plain Python on shapes, dtypes and
    devices: traceable by torch.compile); returns the int64 labels ``[N]`` or None. A tensor
    ``num_items`` was taken by :func:`divergence` before."""
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError("student and teacher must be torch tensors")
    for name, x in (("beta", beta), ("temperature", temperature)):
        if isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a Python number (a tensor would force a host sync)")
    if grad is not None and not isinstance(grad, bool):
        raise TypeError(f"grad must be None or a bool, got {grad!r}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in _DTYPES:
            raise TypeError(
                f"{name} dtype {x.dtype} is not supported: use float32, bfloat16 or float16"
            )
        if x.dim() == 0:
            raise ValueError(f"{name} must be [..., V] logits (at least 1-D), got a 0-d tensor")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} differ"
        )
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} but teacher is on {teacher.device}")
    _device_ordinal(student)
    if student.shape[-1] == 0:
        raise ValueError(f"empty rows: shape {tuple(student.shape)} (V must be at least 1; N = 0 "
                         "rows is an empty batch, loss 0)")
    n = student.numel() // student.shape[-1]  # V >= 1: checked
    lab = _labels(labels, n, student.shape[:-1], student.device)
    if not isinstance(grad_inplace, bool):
        raise TypeError(f"grad_inplace must be a bool, got {grad_inplace!r}")
    if grad_inplace and grad is False:
        raise ValueError("grad_inplace=True writes the gradient over student: it needs the "
                         "gradient (grad=False asks for none)")
    return lab


@_eager
def _divergence_eager(student, teacher, *, kind, beta, temperature, labels, ignore_index,
                      reduction, num_items, num_items_t, grad, grad_inplace):
    lab = _check_divergence_inputs(student, teacher, labels, beta, temperature, grad,
                                   grad_inplace)
    num_items, items_mem, reduction = _num_items_resolved(num_items_t, num_items, reduction,
                                                          student)
    params = _lib.make_params(kind, beta, temperature, ignore_index, reduction, num_items)
    want_grad = bool(student.requires_grad and torch.is_grad_enabled() and grad is not False)
    inplace = grad_inplace and want_grad
    if inplace:
        _check_inplace_student(student)
    if not want_grad:
        student = student.detach()  # forward only: the result does not require grad
    # The teacher is a constant: detached, so a teacher that requires grad does not make the
    # result claim a gradient that would never reach it.
    return DivergenceFunction.apply(
        student, teacher.detach(), lab, params, reduction == "none", want_grad, inplace, items_mem
    )


def _check_inplace_student(student: torch.Tensor) -> None:
    """Refuses a student the gradient cannot be written over in place (grad_inplace=True)."""
    base = student._base if student._is_view() else None
    if student.is_leaf or (base is not None and base.is_leaf):
        # A view of a leaf (p[:, :V], p.view(...)) is not a leaf itself but shares the leaf's
        # memory: the parameter would be overwritten by its own gradient.
        raise ValueError(
            "grad_inplace=True writes the gradient over student, so student must be an "
            "intermediate result (such as the lm_head output), not a leaf tensor or a view of "
            "one: the leaf's data would be overwritten and its .grad would be its own memory"
        )
    rows = student.unsqueeze(0) if student.dim() == 1 else student
    if rows.dim() > 2:
        try:
            rows = rows.view(-1, rows.shape[-1])
        except RuntimeError:
            rows = None  # the leading axes do not flatten without a copy
    if rows is None or not _rows_addressable(rows):
        raise ValueError(
            f"grad_inplace=True needs student rows of contiguous elements over leading axes "
            f"that flatten without a copy, got shape {tuple(student.shape)} and strides "
            f"{tuple(student.stride())}: call .contiguous() first or drop grad_inplace"
        )


# ---- MoE dispatch ------------------------------------------------------------------------------
#
# Routes are the numpy face's MoeRoute dataclass holding device tensors. Every kernel runs on
# the current stream of the tensors' device; the only host synchronisation is the one documented
# in moe_route (reading R when it depends on the data).

from .moe import MoeRoute, _only_with  # noqa: E402

__all__ += [
    "MoeRoute",
    "moe_route",
    "moe_permute",
    "moe_combine",
    "moe_permute_backward",
    "moe_combine_backward",
    "MoePermuteFunction",
    "MoeCombineFunction",
]


def _stream(device: int):
    return torch.cuda.current_stream(device).cuda_stream if device >= 0 else None


def _on_device(device: int, fn):
    """Runs fn() with `device` current (the library and torch's allocator follow it)."""
    if device >= 0 and device != torch.cuda.current_device():
        with torch.cuda.device(device):
            return fn()
    return fn()


def _check_flag(name: str, v) -> bool:
    return _lib._bool(name, v)


def _check_route(route, device: torch.device) -> None:
    if not isinstance(route, MoeRoute):
        raise TypeError(f"route must be a MoeRoute (from distill_kernels.torch.moe_route), got "
                        f"{type(route).__name__}")
    n, k = route.n, route.k
    full = route.perm_full if route.perm_full is not None else route.perm
    for name, t, shape in (("position", route.position, (n, k)), ("perm_full", full, None)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"route.{name} must be a torch tensor (a route from "
                            f"distill_kernels.torch.moe_route), got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"route.{name} must be int32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"route.{name} is on {t.device} but the activations are on {device}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"route.{name} must have shape {shape}, got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"route.{name} must be contiguous")
    if full.dim() != 1 or full.shape[0] < route.num_rows:
        raise ValueError(f"route.perm_full must be 1-D with at least num_rows = {route.num_rows} "
                         f"entries, got {tuple(full.shape)}")
    perm = route.perm
    if route.perm_full is not None and perm is not None and not (
        isinstance(perm, torch.Tensor) and tuple(perm.shape) == (route.num_rows,)
        # (an empty perm reads nothing; its data_ptr may be 0)
        and (perm.data_ptr() == full.data_ptr() or route.num_rows == 0)
    ):
        # The kernels read perm_full; perm must be its first num_rows entries (a view: compared
        # by address, which needs no host synchronisation).
        raise ValueError("route.perm is not the start of route.perm_full, which the kernels read: "
                         "replace perm_full (and perm) together")


def _route_weights(route, weights, device: torch.device) -> torch.Tensor:
    w = route.weights if weights is None else weights
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weights must be a torch tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"weights must be floating point, got {w.dtype}")
    if tuple(w.shape) != (route.n, route.k):
        raise ValueError(f"weights must have shape ({route.n}, {route.k}), got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"weights are on {w.device} but the activations are on {device}")
    return w.to(torch.float32).contiguous()  # differentiable: the gradient flows back through it


def _activation(name: str, x, h: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} dtype {x.dtype} is not supported: use float32, bfloat16 or float16")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, H], got shape {tuple(x.shape)}")
    _lib.check_moe_hidden(name, x.shape[1])
    if h is not None and x.shape[1] != h:
        raise ValueError(f"{name} has H = {x.shape[1]}, expected {h}")
    _device_ordinal(x)
    return x


def _permuted_rows(name: str, x: torch.Tensor, route) -> int:
    full = route.perm_full if route.perm_full is not None else route.perm
    rows = x.shape[0]
    if not (route.num_rows <= rows <= full.shape[0]):
        raise ValueError(
            f"{name} has {rows} rows; the route has {route.num_rows} permuted rows (buffers of "
            f"num_rows up to max_rows = {full.shape[0]} rows are accepted)"
        )
    return rows


# The three primitives and the two backward calls on tensors (validated shapes; activations 2-D
# with H a multiple of 8).


def _moe_matrix(name: str, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """:func:`_matrix` with rows starting on 16-byte boundaries (the MoE kernels move rows in
    16-byte vectors): a view at an odd offset or with an odd row stride, such as a slice of a
    wider tensor or the gradient autograd hands a backward, is copied."""
    x, stride = _matrix(name, x)
    align = _lib.MOE_ROW_ALIGN
    if x.numel() and (x.data_ptr() % align or (stride * x.element_size()) % align):
        x = x.clone(memory_format=torch.contiguous_format)
        stride = x.shape[1]
    return x, stride


def _permute_t(x: torch.Tensor, perm_full: torch.Tensor, k: int, w: Optional[torch.Tensor],
               rows: int) -> torch.Tensor:
    device = _device_ordinal(x)
    xm, xs = _moe_matrix("x", x)
    n, h = xm.shape
    out = torch.empty((rows, h), dtype=xm.dtype, device=xm.device)

    def go():
        handle = _lib.context(device)
        args = _lib.MoePermuteArgs(
            n=n, h=h, k=k, rows=rows, dtype=_DTYPES[xm.dtype], x=xm.data_ptr(), x_stride=xs,
            perm=perm_full.data_ptr(), weights=_ptr(w), out=out.data_ptr(), out_stride=h,
        )
        workspace, ws_bytes = None, 0
        if device >= 0:
            ws_bytes = _lib.moe_permute_workspace_size(handle, n, k)
            if ws_bytes:  # torch's caching allocator, ordered on the current stream
                workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=xm.device)
        _lib.moe_permute_call(handle, args, _stream(device), workspace=_ptr(workspace),
                              ws_bytes=ws_bytes)

    _on_device(device, go)
    return out


def _combine_t(rows_in: torch.Tensor, position: torch.Tensor, w: Optional[torch.Tensor]
               ) -> torch.Tensor:
    device = _device_ordinal(rows_in)
    rm, rs = _moe_matrix("rows", rows_in)
    n, k = position.shape
    h = rm.shape[1]
    y = torch.empty((n, h), dtype=rm.dtype, device=rm.device)

    def go():
        args = _lib.MoeCombineArgs(
            n=n, h=h, k=k, rows=rm.shape[0], dtype=_DTYPES[rm.dtype], rows_in=rm.data_ptr(),
            rows_stride=rs, position=position.data_ptr(), weights=_ptr(w), y=y.data_ptr(),
            y_stride=h,
        )
        _lib.moe_combine_call(_lib.context(device), args, _stream(device))

    _on_device(device, go)
    return y


def _slot_dot_t(tokens: torch.Tensor, rows_in: torch.Tensor, position: torch.Tensor
                ) -> torch.Tensor:
    device = _device_ordinal(tokens)
    tm, ts = _moe_matrix("tokens", tokens)
    rm, rs = _moe_matrix("rows", rows_in)
    n, k = position.shape
    out = torch.empty((n, k), dtype=torch.float32, device=tm.device)

    def go():
        args = _lib.MoeSlotDotArgs(
            n=n, h=tm.shape[1], k=k, rows=rm.shape[0], dtype=_DTYPES[tm.dtype],
            tokens=tm.data_ptr(), tokens_stride=ts, rows_in=rm.data_ptr(), rows_stride=rs,
            position=position.data_ptr(), out=out.data_ptr(),
        )
        _lib.moe_slot_dot_call(_lib.context(device), args, _stream(device))

    _on_device(device, go)
    return out


def _permute_backward_t(grad_xp: torch.Tensor, position: torch.Tensor, w: Optional[torch.Tensor],
                        x: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``dk_moe_permute_backward``: grad_x ``[N, H]`` (the combine of ``grad_xp``, weighted by
    ``w`` when given) and, when ``x`` is given, the float32 grad_weights ``[N, k]`` (the slot-dot
    of ``x`` with ``grad_xp``), in one call."""
    device = _device_ordinal(grad_xp)
    gm, gs = _moe_matrix("grad_xp", grad_xp)
    xm, xs = (None, 0) if x is None else _moe_matrix("x", x)
    n, k = position.shape
    h = gm.shape[1]
    grad_x = torch.empty((n, h), dtype=gm.dtype, device=gm.device)
    grad_w = None if x is None else torch.empty((n, k), dtype=torch.float32, device=gm.device)

    def go():
        args = _lib.MoePermuteBackwardArgs(
            n=n, h=h, k=k, rows=gm.shape[0], dtype=_DTYPES[gm.dtype], grad_xp=gm.data_ptr(),
            grad_xp_stride=gs, position=position.data_ptr(), weights=_ptr(w), x=_ptr(xm),
            x_stride=xs, grad_x=grad_x.data_ptr(), grad_x_stride=h, grad_weights=_ptr(grad_w),
        )
        _lib.moe_permute_backward_call(_lib.context(device), args, _stream(device))

    _on_device(device, go)
    return grad_x, grad_w


def _combine_backward_t(grad_y: torch.Tensor, perm_full: torch.Tensor, position: torch.Tensor,
                        w: Optional[torch.Tensor], expert_out: Optional[torch.Tensor], rows: int
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``dk_moe_combine_backward``: grad_expert_out ``[rows, H]`` (the permute of ``grad_y``,
    scaled by ``w`` when given) and, when ``expert_out`` is given, the float32 grad_weights
    ``[N, k]`` (the slot-dot of ``grad_y`` with ``expert_out``), in one call. Called with
    ``expert_out`` (the fused kernel on CUDA, which needs no workspace); without it the callers
    use ``_permute_t``, which hands the permute its scratch from torch's allocator."""
    device = _device_ordinal(grad_y)
    gm, gs = _moe_matrix("grad_y", grad_y)
    em, es = (None, 0) if expert_out is None else _moe_matrix("expert_out", expert_out)
    n, k = position.shape
    h = gm.shape[1]
    grad_eo = torch.empty((rows, h), dtype=gm.dtype, device=gm.device)
    grad_w = None if expert_out is None else torch.empty((n, k), dtype=torch.float32,
                                                         device=gm.device)

    def go():
        args = _lib.MoeCombineBackwardArgs(
            n=n, h=h, k=k, rows=rows, dtype=_DTYPES[gm.dtype], grad_y=gm.data_ptr(),
            grad_y_stride=gs, expert_out=_ptr(em), expert_out_stride=es,
            perm=perm_full.data_ptr(), position=position.data_ptr(), weights=_ptr(w),
            grad_expert_out=grad_eo.data_ptr(), grad_expert_out_stride=h,
            grad_weights=_ptr(grad_w),
        )
        _lib.moe_combine_backward_call(_lib.context(device), args, _stream(device))

    _on_device(device, go)
    return grad_eo, grad_w


class MoePermuteFunction(torch.autograd.Function):
    """autograd.Function behind :func:`moe_permute` (arguments already validated).

    forward(x, weights or None, perm_full, position, k, rows) -> [rows, H]."""

    @staticmethod
    def forward(ctx, x, weights, perm_full, position, k, rows):
        out = _permute_t(x, perm_full, k, weights, rows)
        want_w = weights is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(x if want_w else None, weights, position)
        return out

    @staticmethod
    @_first_order("moe_permute", _KERNEL_BACKWARD)
    def backward(ctx, grad_out):
        # x was saved when, and only when, the weights' gradient is wanted.
        x, weights, position = ctx.saved_tensors
        grad_x = grad_w = None
        g = grad_out if x is None else grad_out.to(x.dtype)
        if ctx.needs_input_grad[0]:  # both gradients in one call
            grad_x, grad_w = _permute_backward_t(g, position, weights, x)
        elif x is not None:
            grad_w = _slot_dot_t(x, g, position)
        return grad_x, grad_w, None, None, None, None


class MoeCombineFunction(torch.autograd.Function):
    """autograd.Function behind :func:`moe_combine` (arguments already validated).

    forward(expert_out, weights or None, perm_full, position, k) -> [N, H]."""

    @staticmethod
    def forward(ctx, expert_out, weights, perm_full, position, k):
        y = _combine_t(expert_out, position, weights)
        want_w = weights is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(expert_out if want_w else None, weights, perm_full, position)
        ctx.rows = expert_out.shape[0]  # (k is position's second dimension)
        return y

    @staticmethod
    @_first_order("moe_combine", _KERNEL_BACKWARD)
    def backward(ctx, grad_y):
        # expert_out was saved when, and only when, the weights' gradient is wanted.
        expert_out, weights, perm_full, position = ctx.saved_tensors
        grad_eo = grad_w = None
        g = grad_y if expert_out is None else grad_y.to(expert_out.dtype)
        if ctx.needs_input_grad[0] and expert_out is None:
            # Nothing to fuse: the permute, with its scratch from torch's allocator.
            grad_eo = _permute_t(g, perm_full, position.shape[1], weights, ctx.rows)
        elif ctx.needs_input_grad[0]:  # both gradients in one call
            grad_eo, grad_w = _combine_backward_t(g, perm_full, position, weights, expert_out,
                                                  ctx.rows)
        elif expert_out is not None:
            grad_w = _slot_dot_t(g, expert_out, position)
        return grad_eo, grad_w, None, None, None


class _KernelValuesFormulaGradient(torch.autograd.Function):
    """forward(values, formula) -> a copy of ``values``; backward sends the gradient to
    ``formula``: the kernel's bits forward (no re-computation that could round, underflow or
    lose a sign), the formula's derivative backward."""

    @staticmethod
    def forward(ctx, values, formula):
        ctx.formula_dtype = formula.dtype
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad.to(ctx.formula_dtype)


class _ChosenLogSoftmax(torch.autograd.Function):
    """forward(logits [N, E], ids [N, k]) -> log softmax(logits)[ids] in float64 [N, k].
    Saves the logits, the ids and the [N, 1] float64 logsumexp: no [N, E] tensor is kept for
    backward (torch's softmax over all E kept two float64 ones per MoE layer). Backward forms
    softmax in float64 again, so the gradient of a dominant chosen score (where its two terms
    cancel) stays float64-accurate."""

    @staticmethod
    def forward(ctx, logits, ids):
        x = logits.double()
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        ctx.save_for_backward(logits, ids, lse)
        return x.gather(1, ids) - lse

    @staticmethod
    def backward(ctx, grad):
        logits, ids, lse = ctx.saved_tensors
        g = -(logits.double() - lse).exp() * grad.sum(dim=-1, keepdim=True)
        g.scatter_add_(1, ids, grad)
        return g.to(logits.dtype), None


def _differentiable_route_weights(logits: torch.Tensor, expert_ids: torch.Tensor,
                                  weights: torch.Tensor, params) -> torch.Tensor:
    """The kernel's ``weights`` as values, with the gradient of the same formula, in float64
    (so that scores underflowing float32 still have one): scores of the chosen experts (softmax
    over all E, or sigmoid), renormalised, scaled. Only [N, k] tensors (and the logits) are
    kept for backward. Renormalised, the weights are a softmax of the chosen log scores: the
    same ratios, without the 0 / 0 of scores that underflow even float64 (a sigmoid of -800)."""
    ids = expert_ids.long()
    if params.score == _lib.MOE_SCORES["softmax"]:
        log_w = _ChosenLogSoftmax.apply(logits, ids)
    else:
        log_w = torch.nn.functional.logsigmoid(logits.gather(1, ids).double())
    w = torch.softmax(log_w, dim=-1) if params.renormalize else log_w.exp()
    w = w * params.scale
    out = _KernelValuesFormulaGradient.apply(weights, w)
    out.retain_grad()  # route.weights.grad is filled, as it was when the weights were a leaf
    return out


@_eager
def moe_route(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = False,
    bias: Optional[torch.Tensor] = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    scale: float = 1.0,
    capacity: Optional[int] = None,
    block: int = 1,
    exact_rows: bool = True,
) -> MoeRoute:
    """Top-k routing and the deterministic permutation; same parameters and math as
    :func:`distill_kernels.moe_route`, on router logits ``[N, E]`` (float32 or bfloat16; float16
    is widened to float32) on a CUDA device (or the CPU).

    Returns a :class:`MoeRoute` of device tensors. When ``logits`` requires grad (and grad mode
    is on), ``route.weights`` is differentiable in them: its values are the kernel's, its
    gradient that of the scores of the chosen experts (softmax over all E or sigmoid, the
    renormalisation and ``scale``; the bias and the group limit only select), so a router
    trains through :func:`moe_combine` (or a scaling :func:`moe_permute`) as it would with
    torch's own top-k. The selection itself (``expert_ids``, the permutation) has no gradient.
    Otherwise ``route.weights`` is a plain float32 tensor.

    Host synchronisation: the number of permuted rows R = offsets[E] sizes the permuted tensor.
    Without ``capacity`` and with ``block=1``, R = N·k is known up front and nothing is
    synchronised. Otherwise R depends on the routing: with ``exact_rows=True`` (the default) it is
    read back to the host (one synchronisation of the current stream, in this call); with
    ``exact_rows=False`` nothing is synchronised and ``route.num_rows`` is the bound
    ``max_rows`` = K + min(E, K)·(block − 1), K = min(N·k, E·capacity) the slots kept: permuted
    tensors then have max_rows rows, the rows past R are zero (``perm`` −1, like padding) and are
    ignored by combine; read the real R from ``route.offsets[-1]`` when you need it.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch tensor, got {type(logits).__name__}")
    exact_rows = _check_flag("exact_rows", exact_rows)
    if logits.dtype == torch.float16:
        logits = logits.float()  # exact
    if logits.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"router logits dtype {logits.dtype} is not supported: use float32 or "
                        "bfloat16")
    if logits.dim() != 2:
        raise ValueError(f"router logits must be 2-D [N, E], got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"router logits have no experts: shape {tuple(logits.shape)} (E must be "
                         "at least 1; N = 0 tokens is an empty batch)")
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a Python number (a tensor would force a host sync)")
    device = _device_ordinal(logits)
    n, e = logits.shape
    params = _lib.make_moe_route_params(e, k, score, renormalize, n_groups, topk_groups, scale,
                                        capacity, block)
    k = params.k
    if n * k >= 2**31:
        raise ValueError(f"N·k = {n}·{k} slots do not fit the int32 slot indices of perm")
    dev = logits.device
    b = None
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch tensor, got {type(bias).__name__}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        if tuple(bias.shape) != (e,):
            raise ValueError(f"bias must have shape ({e},), got {tuple(bias.shape)}")
        if bias.device != dev:
            raise ValueError(f"bias is on {bias.device} but the logits are on {dev}")
        b = bias.detach().to(torch.float32).contiguous()
    lg, stride = _matrix("logits", logits.detach())
    max_rows = _lib.moe_max_rows(n, e, k, params.block, params.capacity)
    i32 = dict(dtype=torch.int32, device=dev)
    expert_ids = torch.empty((n, k), **i32)
    weights = torch.empty((n, k), dtype=torch.float32, device=dev)
    counts = torch.empty(e, **i32)
    offsets = torch.empty(e + 1, **i32)
    perm = torch.empty(max_rows, **i32)
    position = torch.empty((n, k), **i32)

    def go():
        handle = _lib.context(device)
        workspace, ws_bytes = None, 0
        if device >= 0:
            ws_bytes = _lib.moe_route_workspace_size(handle, n, e, k)
            if ws_bytes:  # torch's caching allocator, ordered on the current stream
                workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
        args = _lib.MoeRouteArgs(
            n=n, e=e, logits=lg.data_ptr(), logits_dtype=_DTYPES[lg.dtype], logits_stride=stride,
            bias=_ptr(b), expert_ids=expert_ids.data_ptr(), weights=weights.data_ptr(),
            counts=counts.data_ptr(), offsets=offsets.data_ptr(), perm=perm.data_ptr(),
            perm_rows=max_rows, position=position.data_ptr(),
        )
        _lib.moe_route_call(handle, args, params, _ptr(workspace), ws_bytes, _stream(device))

    _on_device(device, go)
    if params.capacity == 0 and params.block == 1:
        num_rows = n * k  # every slot kept, no padding
    elif exact_rows:
        num_rows = int(offsets[e].item())  # the one host synchronisation
    else:
        num_rows = max_rows
    if logits.requires_grad and torch.is_grad_enabled():
        weights = _differentiable_route_weights(logits, expert_ids, weights, params)
    return MoeRoute(
        expert_ids=expert_ids, weights=weights, counts=counts, offsets=offsets,
        perm=perm[:num_rows], position=position, n=n, e=e, k=k, num_rows=num_rows,
        perm_full=perm,
    )


@_eager
def moe_permute(x: torch.Tensor, route: MoeRoute, scale: bool = False, *,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gathers token rows ``x [N, H]`` into expert order: ``[route.num_rows, H]`` in x's dtype,
    ``out[r] = x[perm[r] // k]`` (times the slot's weight when ``scale``), zero padding rows.

    Differentiable in ``x`` and, when ``scale``, in the weights (``route.weights`` or
    ``weights``): backward is a combine (weighted when scaled) and a per-slot dot product."""
    scale = _check_flag("scale", scale)
    _only_with("scale", scale, "weights", weights)
    _activation("x", x)
    _check_route(route, x.device)
    if x.shape[0] != route.n:
        raise ValueError(f"x has {x.shape[0]} rows, the route has N = {route.n} tokens")
    w = _route_weights(route, weights, x.device) if scale else None
    full = route.perm_full if route.perm_full is not None else route.perm
    return MoePermuteFunction.apply(x, w, full, route.position, route.k, route.num_rows)


@_eager
def moe_combine(expert_out: torch.Tensor, route: MoeRoute, weighted: bool = True, *,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y[n] = Σ_j w[n, j] · expert_out[position[n, j]]`` (``weighted=False``: w = 1), dropped
    slots skipped, accumulated in slot order (f32 on CUDA, f64 on the CPU reference), no atomics
    (bitwise reproducible).

    ``expert_out`` is ``[num_rows, H]`` in permuted order (up to ``max_rows`` rows accepted);
    the result ``[N, H]`` has its dtype. Differentiable in ``expert_out`` and, when weighted, in
    the weights: backward is a permute scaled by the weights and a per-slot dot product."""
    weighted = _check_flag("weighted", weighted)
    _only_with("weighted", weighted, "weights", weights)
    _activation("expert_out", expert_out)
    _check_route(route, expert_out.device)
    _permuted_rows("expert_out", expert_out, route)
    w = _route_weights(route, weights, expert_out.device) if weighted else None
    full = route.perm_full if route.perm_full is not None else route.perm
    return MoeCombineFunction.apply(expert_out, w, full, route.position, route.k)


@_eager
def moe_permute_backward(grad_xp: torch.Tensor, route: MoeRoute, x: Optional[torch.Tensor] = None,
                         scale: bool = False, *, weights: Optional[torch.Tensor] = None):
    """The gradient of :func:`moe_permute` without autograd (same contract as
    :func:`distill_kernels.moe_permute_backward`): ``grad_x``, or ``(grad_x, grad_weights)``
    when ``scale`` (which needs ``x``)."""
    scale = _check_flag("scale", scale)
    _only_with("scale", scale, "weights", weights)
    _only_with("scale", scale, "x", x)
    _activation("grad_xp", grad_xp)
    _check_route(route, grad_xp.device)
    _permuted_rows("grad_xp", grad_xp, route)
    if not scale:
        return _permute_backward_t(grad_xp, route.position, None, None)[0]
    if x is None:
        raise ValueError("moe_permute_backward(scale=True) needs x, the forward input")
    _activation("x", x, grad_xp.shape[1])
    if x.shape[0] != route.n:
        raise ValueError(f"x has {x.shape[0]} rows, the route has N = {route.n} tokens")
    if x.dtype != grad_xp.dtype or x.device != grad_xp.device:
        raise TypeError(f"x ({x.dtype}, {x.device}) and grad_xp ({grad_xp.dtype}, "
                        f"{grad_xp.device}) must have the same dtype and device")
    w = _route_weights(route, weights, grad_xp.device).detach()
    return _permute_backward_t(grad_xp, route.position, w, x)


@_eager
def moe_combine_backward(grad_y: torch.Tensor, expert_out: Optional[torch.Tensor],
                         route: MoeRoute, weighted: bool = True, *,
                         weights: Optional[torch.Tensor] = None):
    """The gradient of :func:`moe_combine` without autograd (same contract as
    :func:`distill_kernels.moe_combine_backward`): ``(grad_expert_out, grad_weights)``."""
    weighted = _check_flag("weighted", weighted)
    _only_with("weighted", weighted, "weights", weights)
    _activation("grad_y", grad_y)
    _check_route(route, grad_y.device)
    if grad_y.shape[0] != route.n:
        raise ValueError(f"grad_y has {grad_y.shape[0]} rows, the route has N = {route.n} tokens")
    full = route.perm_full if route.perm_full is not None else route.perm
    if expert_out is None:
        if weighted:
            raise ValueError("moe_combine_backward(weighted=True) needs expert_out")
        rows = route.num_rows
    else:
        _activation("expert_out", expert_out, grad_y.shape[1])
        rows = _permuted_rows("expert_out", expert_out, route)
        if expert_out.dtype != grad_y.dtype or expert_out.device != grad_y.device:
            raise TypeError(f"grad_y ({grad_y.dtype}, {grad_y.device}) and expert_out "
                            f"({expert_out.dtype}, {expert_out.device}) must have the same dtype "
                            "and device")
    if not weighted:  # nothing to fuse: the permute, with its scratch from torch's allocator
        return _permute_t(grad_y, full, route.k, None, rows), None
    w = _route_weights(route, weights, grad_y.device).detach()
    return _combine_backward_t(grad_y, full, route.position, w, expert_out, rows)


# ---- fused linear divergence -------------------------------------------------------------------
#
# The loss straight from hidden states and lm_head weights (the [N, V] logits never exist whole):
# an autograd function whose gradients are computed in the forward pass, like `divergence`, and
# scaled by grad_output in backward (in place, no host synchronisation).

__all__ += ["fused_linear_divergence", "FusedLinearFunction"]


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs matrix products in on `device`, or None outside it."""
    kind = device.type
    if kind not in ("cuda", "cpu"):
        return None
    try:  # torch >= 2.4
        on = torch.is_autocast_enabled(kind)
        return torch.get_autocast_dtype(kind) if on else None
    except TypeError:  # older: one function per device type
        if kind == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _grad_buffer_dtype(grad_dtype, in_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gradient buffers computed in the forward, for inputs of ``in_dtype`` and
    the caller's ``grad_dtype`` (None: the default)."""
    if grad_dtype is None:
        # float16 gradients of a loss underflow before backward applies grad_output (an AMP
        # loss scale): float32 buffers by default, cast to float16 by autograd after the scaling.
        return torch.float32 if in_dtype == torch.float16 else in_dtype
    if grad_dtype in (torch.float32, "float32", "f32"):
        return torch.float32
    if grad_dtype == in_dtype or grad_dtype == str(in_dtype).replace("torch.", ""):
        return in_dtype
    raise ValueError(
        f"grad_dtype must be None (the input dtype; float32 for float16), the input dtype "
        f"{in_dtype} or "
        f"torch.float32 / 'float32', got {grad_dtype!r}"
    )


def _fused_launch(device: int, hs, ws, ht, wt, labels, params, loss, per_token, gh, gw,
                  num_items_mem=None) -> None:
    """One dk_fused_linear_divergence call on the current stream of `device` (2-D operands whose
    rows are contiguous; gh / gw: (tensor, stride) or None; num_items_mem: batchmean's divisor
    as a float32 [1] tensor on the device, or None)."""
    (hs, hs_stride), (ws, ws_stride), (ht, ht_stride), (wt, wt_stride) = hs, ws, ht, wt
    n, h = hs.shape
    v = ws.shape[0]

    def go():
        handle = _lib.context(device)
        args = _lib.FusedLinearArgs(
            n=n, v=v, h=h, ht=ht.shape[1], dtype=_DTYPES[hs.dtype],
            student_hidden=hs.data_ptr(), student_hidden_stride=hs_stride,
            student_weight=ws.data_ptr(), student_weight_stride=ws_stride,
            teacher_hidden=ht.data_ptr(), teacher_hidden_stride=ht_stride,
            teacher_weight=wt.data_ptr(), teacher_weight_stride=wt_stride,
            labels=_ptr(labels), loss=_ptr(loss), per_token=_ptr(per_token),
            grad_hidden=None if gh is None else gh[0].data_ptr(),
            grad_hidden_dtype=_DTYPES[hs.dtype] if gh is None else _DTYPES[gh[0].dtype],
            grad_hidden_stride=0 if gh is None else gh[1],
            grad_weight=None if gw is None else gw[0].data_ptr(),
            grad_weight_dtype=_DTYPES[hs.dtype] if gw is None else _DTYPES[gw[0].dtype],
            grad_weight_stride=0 if gw is None else gw[1],
            num_items=_ptr(num_items_mem),
        )
        workspace, ws_bytes = None, 0
        if device >= 0:
            ws_bytes = _lib.fused_workspace_size(handle, args, params)
            if ws_bytes:  # torch's caching allocator, ordered on the current stream
                workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=hs.device)
        _lib.fused_call(handle, args, params, _ptr(workspace), ws_bytes, _stream(device))

    _on_device(device, go)


def _fused_run(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, params,
               reduction_none: bool, want_gh: bool, want_gw: bool, grad_dtype: torch.dtype,
               num_items_mem: Optional[torch.Tensor] = None):
    """One dk_fused_linear_divergence call with new output buffers: (loss 0-d, per-token [N] or
    None, grad_hidden [N, H] or None, grad_weight [V, H] or None)."""
    device = _device_ordinal(student_hidden)
    h = student_hidden.shape[-1]
    hs = _matrix("student_hidden", student_hidden.reshape(-1, h))
    ht = _matrix("teacher_hidden", teacher_hidden.reshape(-1, teacher_hidden.shape[-1]))
    ws = _matrix("student_weight", student_weight)
    wt = ws if teacher_weight is student_weight else _matrix("teacher_weight", teacher_weight)
    n, v = hs[0].shape[0], ws[0].shape[0]
    dev = student_hidden.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    per_token = torch.empty(n, dtype=torch.float32, device=dev) if reduction_none else None
    gh = torch.empty((n, h), dtype=grad_dtype, device=dev) if want_gh else None
    gw = torch.empty((v, h), dtype=grad_dtype, device=dev) if want_gw else None
    _fused_launch(device, hs, ws, ht, wt, labels, params, loss, per_token,
                  None if gh is None else (gh, h), None if gw is None else (gw, h),
                  num_items_mem)
    return loss, per_token, gh, gw


class FusedLinearFunction(torch.autograd.Function):
    """autograd.Function behind :func:`fused_linear_divergence` (arguments already validated).

    forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, params,
    reduction_none, want_grad_hidden, want_grad_weight, grad_dtype, num_items_mem=None) -> loss
    or per-token."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                params, reduction_none, want_gh, want_gw, grad_dtype, num_items_mem=None):
        hidden_shape = student_hidden.shape
        lead_shape = student_hidden.shape[:-1]
        loss, per_token, gh, gw = _fused_run(student_hidden, student_weight, teacher_hidden,
                                             teacher_weight, labels, params, reduction_none,
                                             want_gh, want_gw, grad_dtype, num_items_mem)
        ctx.grads = (gh, gw)
        ctx.hidden_shape = hidden_shape
        ctx.reduction_none = reduction_none
        if reduction_none:
            return per_token.reshape(lead_shape)
        return loss

    @staticmethod
    @_first_order("fused_linear_divergence")
    def backward(ctx, grad_output):
        gh, gw = ctx.grads if ctx.grads is not None else (None, None)
        wanted = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if ctx.grads is None and wanted:
            raise RuntimeError(
                "distill_kernels.torch.fused_linear_divergence: the gradient buffers were already "
                "consumed by an earlier backward (they are scaled in place); run the forward "
                "again instead of backpropagating the same graph twice"
            )
        ctx.grads = None
        # With reduction "none" only the hidden-state gradient exists (checked in the forward):
        # it is scaled per row; the weight gradient by the one grad_output value.
        # On CUDA dk_scale_rows (all three buffer dtypes: the input's or float32): no pass over
        # the buffers when grad_output is exactly 1. No host sync; f32 buffers are cast to the
        # input dtype by autograd.
        if gh is not None:
            _scale_by_grad_output(gh, grad_output, ctx.reduction_none)
            gh = gh.view(ctx.hidden_shape)
        if gw is not None:
            _scale_by_grad_output(gw, grad_output, False)
        return (gh, gw) + (None,) * 9


def _fused_out_buffer(name: str, out, shape, in_dtype: torch.dtype, grad_dtype, device):
    """(buffer, row stride) of a caller's gradient buffer, validated (no copy: it is written)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype not in (torch.float32, in_dtype):
        raise TypeError(f"{name} dtype {out.dtype} must be float32 or the input dtype {in_dtype}")
    if grad_dtype is not None and _grad_buffer_dtype(grad_dtype, in_dtype) != out.dtype:
        raise ValueError(f"{name} has dtype {out.dtype} but grad_dtype is {grad_dtype!r}")
    if out.device != device:
        raise ValueError(f"{name} is on {out.device} but the inputs are on {device}")
    if out.requires_grad:
        raise ValueError(f"{name} requires grad: pass a plain buffer (e.g. param.grad or a "
                         "detached tensor)")
    try:
        o = out.view(-1, shape[-1])  # no copy: the library writes into it
    except RuntimeError as e:
        raise ValueError(f"{name}: its leading axes must flatten to rows without a copy") from e
    rows, cols = o.shape
    if (cols > 1 and o.stride(1) != 1) or (rows > 1 and o.stride(0) < cols):
        raise ValueError(f"{name} must have contiguous rows (stride(-1) == 1, row stride >= H, "
                         f"rows not overlapping), got strides {tuple(out.stride())}")
    return o, (cols if rows == 1 else o.stride(0))


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items: Optional[Union[float, torch.Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_rows: Optional[int] = None,
    grad: Optional[bool] = None,
    grad_dtype=None,
    grad_hidden_out: Optional[torch.Tensor] = None,
    grad_weight_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused lm_head + divergence on torch tensors; same parameters and math as
    :func:`distill_kernels.fused_linear_divergence`.

    ``student_hidden [..., H]``, ``student_weight [V, H]``, ``teacher_hidden [..., Ht]``,
    ``teacher_weight [V, Ht]`` (may be ``student_weight`` itself), one dtype (bf16, f16, f32), on
    one CUDA device (CPU tensors go through the CPU backend). Runs on the current stream without
    host synchronisation; extra memory is O(chunk_rows × V) from torch's caching allocator.
    Returns the 0-d float32 loss (``batchmean`` / ``sum``) or the per-token float32 losses
    (``none``).

    Autograd (no ``*_out`` buffers): differentiable in ``student_hidden`` and ``student_weight``
    (the teacher side is a constant). Gradients are computed in the forward pass for the inputs
    that require grad (``grad=False`` skips them) into buffers of ``grad_dtype`` (None: the input
    dtype for bfloat16 and float32, float32 for float16, whose gradients would underflow before
    an AMP loss scale reaches them; ``torch.float32``: f32 accumulation, cast to the parameter's
    dtype by autograd on return) and scaled by ``grad_output`` in backward, in place (a graph is
    backpropagated once; second derivatives are not supported: ``create_graph=True`` raises).
    With ``reduction="none"`` only ``student_hidden`` may require grad: the weight gradient of a
    per-token weighted sum cannot be scaled after the fact.

    Under ``torch.autocast`` the four inputs are cast to its dtype first (differentiably), so the
    products run in it as ``F.linear``'s would and a float32 lm_head weight receives a float32
    gradient.

    ``num_items`` may be a one-value tensor (the Hugging Face Trainer's ``num_items_in_batch``),
    as in :func:`divergence`: read by the library where the call runs, without a host
    synchronisation, and folded into the gradients (bitwise the results of
    ``num_items=float(value.float())``); a value that is not a finite float32 of at least 2^-126
    gives the ``sum``. It works with the accumulating form too (the token count of the whole
    accumulated batch).

    Accumulation (``grad_hidden_out`` and / or ``grad_weight_out`` given, input dtype or float32,
    contiguous rows): no autograd; the gradients of the returned loss itself (grad_output = 1) are
    added to the given buffers in this call (the others are not computed) and the loss returned
    does not require grad. Scale the loss through ``num_items`` if needed. An input that
    requires grad must then have its buffer (``ValueError`` otherwise: it would get no gradient);
    pass frozen inputs detached.

    CPU tensors run the library's float64 reference backend: it converts both weights and the
    weight gradient to float64 whole (O((N + V)·H) extra host memory, not O(chunk_rows × V)),
    and is much slower than ``matmul`` + :func:`divergence`; use it to check, not to train.
    """
    accumulate = grad_hidden_out is not None or grad_weight_out is not None
    compiling = _TRACEABLE and torch.compiler.is_compiling()
    items = _num_items_tensor(num_items, reduction, student_hidden)
    if compiling and not accumulate and _num_items_on_host_only(items, student_hidden):
        total = fused_linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, kind=kind, beta=beta,
            temperature=temperature, labels=labels, ignore_index=ignore_index, reduction="sum",
            num_items=None, logit_scale=logit_scale, softcap=softcap, chunk_rows=chunk_rows,
            grad=grad, grad_dtype=grad_dtype)
        return total / _positive_or_one(items)
    if items is not None:
        num_items = None
    if not accumulate and compiling:
        # Under torch.compile: the custom op distill_kernels::fused_linear_divergence, traced
        # into the graph (no graph break). The accumulating form writes into the caller's
        # buffers, so it stays eager (a break).
        return _torch_ops.fused_linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, kind=kind, beta=beta,
            temperature=temperature, labels=labels, ignore_index=ignore_index,
            reduction=reduction, num_items=num_items, num_items_t=items, logit_scale=logit_scale,
            softcap=softcap, chunk_rows=chunk_rows, grad=grad, grad_dtype=grad_dtype)
    return _fused_eager(
        student_hidden, student_weight, teacher_hidden, teacher_weight, kind=kind, beta=beta,
        temperature=temperature, labels=labels, ignore_index=ignore_index, reduction=reduction,
        num_items=num_items, num_items_t=items, logit_scale=logit_scale, softcap=softcap,
        chunk_rows=chunk_rows, grad=grad, grad_dtype=grad_dtype, grad_hidden_out=grad_hidden_out,
        grad_weight_out=grad_weight_out)


def _fused_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, *, beta,
                  temperature, labels, logit_scale, softcap, grad, grad_dtype):
    """The tensor and flag checks of :func:`fused_linear_divergence` and its autocast cast (plain
    Python on tensor metadata: traceable by torch.compile): (hs, ws, ht, wt, labels [N] or None,
    gradient dtype)."""
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} dtype {x.dtype} is not supported: use float32, bfloat16 or "
                            "float16")
        # Hidden states may have no rows (an empty batch: loss 0); every other size is >= 1.
        if x.shape[-1] == 0 or (name.endswith("weight") and x.numel() == 0):
            raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    # (A tensor num_items was taken by fused_linear_divergence before.)
    for name, x in (("beta", beta), ("temperature", temperature),
                    ("logit_scale", logit_scale), ("softcap", softcap)):
        if isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a Python number (a tensor would force a host sync)")
    if grad is not None and not isinstance(grad, bool):
        raise TypeError(f"grad must be None or a bool, got {grad!r}")
    hs, ws, ht, wt = student_hidden, student_weight, teacher_hidden, teacher_weight
    amp = _autocast_dtype(hs.device)
    if amp is not None:
        # Under torch.autocast the products run in its dtype, as F.linear's would: the four
        # inputs are cast (differentiably: a float32 weight gets its gradient back in float32
        # through the cast), the teacher weight staying the student's own when it was.
        shared = wt is ws
        hs, ws, ht = hs.to(amp), ws.to(amp), ht.to(amp)
        wt = ws if shared else wt.to(amp)
    dtype = hs.dtype
    for name, x in (("student_weight", ws), ("teacher_hidden", ht), ("teacher_weight", wt)):
        if x.dtype != dtype:
            raise TypeError(f"all four inputs must have one dtype: student_hidden is {dtype}, "
                            f"{name} is {x.dtype}")
        if x.device != hs.device:
            raise ValueError(f"student_hidden is on {hs.device} but {name} is on {x.device}")
    _device_ordinal(hs)
    if hs.dim() < 2 or ht.dim() < 2:
        raise ValueError(f"hidden states must be [..., H] with at least 2 axes, got "
                         f"{tuple(hs.shape)} and {tuple(ht.shape)}")
    if ws.dim() != 2 or wt.dim() != 2:
        raise ValueError(f"weights must be 2-D [V, H], got {tuple(ws.shape)} and {tuple(wt.shape)}")
    h, v = hs.shape[-1], ws.shape[0]
    if ws.shape[1] != h:
        raise ValueError(f"student_weight {tuple(ws.shape)} must be [V, H] with H = {h}")
    if tuple(wt.shape) != (v, ht.shape[-1]):
        raise ValueError(f"teacher_weight {tuple(wt.shape)} must be [V, Ht] = ({v}, "
                         f"{ht.shape[-1]})")
    if ht.shape[:-1] != hs.shape[:-1]:
        raise ValueError(f"teacher_hidden {tuple(ht.shape)} and student_hidden {tuple(hs.shape)} "
                         "must have the same leading shape")
    lead_shape = hs.shape[:-1]
    n = 1
    for d in lead_shape:
        n *= d
    lab = _labels(labels, n, lead_shape, hs.device)
    g_dtype = _grad_buffer_dtype(grad_dtype, dtype)
    return hs, ws, ht, wt, lab, g_dtype


def _fused_wanted(hs: torch.Tensor, ws: torch.Tensor, grad, reduction) -> Tuple[bool, bool]:
    """Which gradients the autograd form computes: (grad_hidden, grad_weight)."""
    on = torch.is_grad_enabled() and grad is not False
    want_gh = bool(on and hs.requires_grad)
    want_gw = bool(on and ws.requires_grad)
    if reduction == "none" and want_gw:
        raise ValueError(
            "reduction='none' with student_weight requiring grad is not supported: the weight "
            "gradient of a per-token weighted sum cannot be scaled after the fact; use "
            "reduction='sum' or 'batchmean' (num_items for custom divisors), or freeze the weight"
        )
    return want_gh, want_gw


@_eager
def _fused_eager(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind, beta,
                 temperature, labels, ignore_index, reduction, num_items, num_items_t,
                 logit_scale, softcap, chunk_rows, grad, grad_dtype, grad_hidden_out,
                 grad_weight_out):
    hs, ws, ht, wt, lab, g_dtype = _fused_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, beta=beta,
        temperature=temperature, labels=labels, logit_scale=logit_scale, softcap=softcap,
        grad=grad, grad_dtype=grad_dtype)
    accumulate = grad_hidden_out is not None or grad_weight_out is not None
    num_items, items_mem, reduction = _num_items_resolved(num_items_t, num_items, reduction, hs)
    params = _lib.make_fused_params(kind, beta, temperature, ignore_index, reduction, num_items,
                                    logit_scale, softcap, chunk_rows, accumulate)
    dtype, h, lead_shape = hs.dtype, hs.shape[-1], hs.shape[:-1]
    n = hs.numel() // h  # h >= 1: checked
    device = _device_ordinal(hs)

    if accumulate:
        if grad is False:
            raise ValueError("grad_hidden_out / grad_weight_out need grad=None or True")
        # The loss returned does not require grad, so an input that does and has no buffer
        # would get no gradient at all: typically grad_weight_out=weight.grad after
        # zero_grad() set it to None.
        for name, x, out in (("student_hidden", hs, grad_hidden_out),
                             ("student_weight", ws, grad_weight_out)):
            if out is None and x.requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"{name} requires grad but {name.replace('student_', 'grad_')}_out is None, "
                    "and the accumulating form (a buffer given) computes no autograd gradient: "
                    "pass a buffer for it too (param.grad is None after zero_grad(): use "
                    "torch.zeros_like(param)), or pass that input detached")
        gh = gw = None
        if grad_hidden_out is not None:
            gh = _fused_out_buffer("grad_hidden_out", grad_hidden_out, hs.shape, dtype,
                                   grad_dtype, hs.device)
        if grad_weight_out is not None:
            gw = _fused_out_buffer("grad_weight_out", grad_weight_out, ws.shape, dtype,
                                   grad_dtype, hs.device)
        with torch.no_grad():
            m_hs = _matrix("student_hidden", hs.detach().reshape(-1, h))
            m_ht = _matrix("teacher_hidden", ht.detach().reshape(-1, ht.shape[-1]))
            m_ws = _matrix("student_weight", ws.detach())
            m_wt = m_ws if wt is ws else _matrix("teacher_weight", wt.detach())
            loss = torch.empty((), dtype=torch.float32, device=hs.device)
            per_token = (torch.empty(n, dtype=torch.float32, device=hs.device)
                         if reduction == "none" else None)
            _fused_launch(device, m_hs, m_ws, m_ht, m_wt, lab, params, loss, per_token, gh, gw,
                          items_mem)
        return per_token.reshape(lead_shape) if per_token is not None else loss

    want_gh, want_gw = _fused_wanted(hs, ws, grad, reduction)
    same_weight = wt is ws
    hs_in = hs if want_gh else hs.detach()
    ws_in = ws if want_gw else ws.detach()
    wt_in = ws_in if same_weight else wt.detach()
    return FusedLinearFunction.apply(hs_in, ws_in, ht.detach(), wt_in, lab, params,
                                     reduction == "none", want_gh, want_gw, g_dtype, items_mem)


# ---- grouped-query attention -------------------------------------------------------------------
#
# q [B, Sq, Hq, D], k / v [B, Sk, Hkv, D] (padded) or q [Tq, Hq, D], k / v [Tk, Hkv, D] with
# cu_seqlens_q / cu_seqlens_k (packed), on one CUDA device (CPU tensors go through the CPU
# backend). Forward and backward run on the current stream; the forward saves q, k, v, out and
# lse, the backward gets its workspace from torch's caching allocator.

__all__ += ["attention", "AttentionFunction"]

_ATTN_DTYPES_CUDA = (torch.bfloat16, torch.float16)


def _attn_rows(name: str, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(tensor, token stride in elements) for ``x [..tokens.., H, D]``: x itself when the library
    can read its tokens as rows (H·D contiguous values per token, one stride over the leading
    axes, 16-byte aligned rows), else ``x.contiguous()`` (a copy)."""
    h, d = x.shape[-2], x.shape[-1]
    row = h * d
    item = x.element_size()
    ok = (d == 1 or x.stride(-1) == 1) and (h == 1 or x.stride(-2) == d)
    stride = None
    if ok:
        expect = None
        for size, st in zip(reversed(x.shape[:-2]), reversed(x.stride()[:-2])):
            if size == 1:
                continue
            if expect is None:
                stride, expect = st, st * size
            elif st == expect:
                expect = st * size
            else:
                ok = False
                break
    if stride is None:
        stride = row
    if ok and stride < row:
        ok = False  # broadcast (stride 0) or overlapping tokens
    if ok and x.numel() and (x.data_ptr() % _lib.ATTENTION_ROW_ALIGN
                             or (stride * item) % _lib.ATTENTION_ROW_ALIGN):
        ok = False
    if not ok:
        x = x.contiguous()
        if x.numel() and x.data_ptr() % _lib.ATTENTION_ROW_ALIGN:  # a view at an odd offset
            x = x.clone(memory_format=torch.contiguous_format)
        stride = row
    return x, stride


class _AttnMeta:
    """Shapes and parameters of one attention call (not tensors: autograd passes them through)."""

    __slots__ = ("params", "batch", "seqlen_q", "seqlen_k", "rows_q", "rows_k", "varlen",
                 "heads_q", "heads_kv", "head_dim", "device")

    def c_batch(self, cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor]):
        return _lib.AttentionBatch(
            batch=self.batch, seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k,
            cu_seqlens_q=_ptr(cu_q), cu_seqlens_k=_ptr(cu_k), rows_q=self.rows_q,
            rows_k=self.rows_k,
        )

    def lse_shape(self):
        if self.varlen:
            return (self.heads_q, self.rows_q)
        return (self.batch, self.heads_q, self.seqlen_q)


def _attn_forward(meta: _AttnMeta, q, k, v, cu_q, cu_k):
    q2, qs = _attn_rows("q", q)
    k2, ks = (q2, qs) if k is q else _attn_rows("k", k)
    # One copy for a tensor passed twice (k is v): both are saved for the backward.
    v2, vs = (k2, ks) if v is k else (q2, qs) if v is q else _attn_rows("v", v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(meta.lse_shape(), dtype=torch.float32, device=q.device)
    device = meta.device

    def go():
        args = _lib.AttentionArgs(
            batch=meta.c_batch(cu_q, cu_k), dtype=_DTYPES[q.dtype],
            q=q2.data_ptr(), q_stride=qs, k=k2.data_ptr(), k_stride=ks,
            v=v2.data_ptr(), v_stride=vs, out=out.data_ptr(), out_stride=meta.heads_q * meta.head_dim,
            lse=lse.data_ptr(),
        )
        _lib.attention_forward_call(_lib.context(device), args, meta.params, _stream(device))

    _on_device(device, go)
    # The row layouts the kernels read (copies where the inputs were not readable in place):
    # saved for the backward, which then reads them as they are instead of copying again.
    return out, lse, (q2, k2, v2)


def _attn_backward(meta: _AttnMeta, dout, q, k, v, out, lse, cu_q, cu_k):
    do2, dos = _attn_rows("dout", dout)
    q2, qs = _attn_rows("q", q)
    k2, ks = _attn_rows("k", k)
    v2, vs = _attn_rows("v", v)
    o2, os_ = _attn_rows("out", out)
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    device = meta.device
    hq_d, hkv_d = meta.heads_q * meta.head_dim, meta.heads_kv * meta.head_dim

    def go():
        handle = _lib.context(device)
        args = _lib.AttentionBackwardArgs(
            batch=meta.c_batch(cu_q, cu_k), dtype=_DTYPES[q.dtype],
            dout=do2.data_ptr(), dout_stride=dos, q=q2.data_ptr(), q_stride=qs,
            k=k2.data_ptr(), k_stride=ks, v=v2.data_ptr(), v_stride=vs,
            out=o2.data_ptr(), out_stride=os_, lse=lse.data_ptr(),
            dq=dq.data_ptr(), dq_stride=hq_d, dk=dk.data_ptr(), dk_stride=hkv_d,
            dv=dv.data_ptr(), dv_stride=hkv_d,
        )
        workspace, ws_bytes = None, 0
        ws_bytes = _lib.attention_backward_workspace_size(handle, args, meta.params)
        if ws_bytes:  # torch's caching allocator, ordered on the current stream
            workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=q.device)
        _lib.attention_backward_call(handle, args, meta.params, _ptr(workspace), ws_bytes,
                                     _stream(device))

    _on_device(device, go)
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """autograd.Function behind :func:`attention` (arguments already validated).

    forward(q, k, v, cu_seqlens_q or None, cu_seqlens_k or None, meta) -> (out, lse); lse is
    not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, meta):
        out, lse, (q2, k2, v2) = _attn_forward(meta, q, k, v, cu_q, cu_k)
        ctx.save_for_backward(q2, k2, v2, out, lse, cu_q, cu_k)
        ctx.meta = meta
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @_first_order("attention", _KERNEL_BACKWARD)
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dout.dtype != q.dtype:
            dout = dout.to(q.dtype)
        dq, dk, dv = _attn_backward(ctx.meta, dout, q, k, v, out, lse, cu_q, cu_k)
        return dq, dk, dv, None, None, None


def _cu_seqlens_t(name: str, c, device: torch.device) -> torch.Tensor:
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor (int32), got {type(c).__name__}")
    if c.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {c.dtype}")
    if c.dim() != 1 or c.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [B + 1], got shape {tuple(c.shape)}")
    if c.device != device:
        raise ValueError(f"{name} is on {c.device} but q is on {device}")
    return c.contiguous()


def _max_seqlen(name: str, x) -> int:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a Python int (a tensor would force a host sync)")
    return _lib._int(name, x, 0, 2**31 - 1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    deterministic: bool = True,
    return_lse: bool = False,
):
    """Grouped-query attention on torch tensors, differentiable in q, k and v; same layouts and
    math as :func:`distill_kernels.attention`.

    ``q [B, Sq, Hq, D]``, ``k`` / ``v [B, Sk, Hkv, D]``, or packed ``q [Tq, Hq, D]``, ``k`` /
    ``v [Tk, Hkv, D]`` with int32 ``cu_seqlens_q`` / ``cu_seqlens_k [B + 1]`` on the same device.
    bf16 or f16 on CUDA (f32 too on CPU tensors, which run on the CPU backend), D 64 or 128, Hq a
    multiple of Hkv. Runs on the current stream. Tokens whose heads·D values are contiguous are
    read in place with any 16-byte-multiple token stride (``qkv[:, :, :Hq]`` is not copied);
    other layouts are copied with ``.contiguous()``.

    Varlen: ``max_seqlen_q`` / ``max_seqlen_k`` (Python ints, upper bounds on the longest
    sequences; they size the CUDA grid) avoid any host synchronisation; when either is missing
    both are computed, and the offsets checked (start 0, non-decreasing, end at the row counts),
    with one device-to-host read. With both given the offsets are trusted (out-of-range entries
    are clamped by the kernels: memory stays safe, results are meaningless; on CUDA the rows of
    a sequence longer than its bound past the bound are left unwritten).

    Under ``torch.autocast`` q, k and v are cast to its dtype first, as SDPA's are. Inputs the
    kernels cannot read in place are copied once, in the forward, and the copies are what the
    backward reads (as FlashAttention's ``maybe_contiguous``); an in-place edit of such an input
    after the forward is therefore not detected by autograd, and does not change the gradient.

    Returns ``out`` (like q), or ``(out, lse)`` with ``return_lse=True`` (float32 ``[B, Hq, Sq]``
    or ``[Hq, Tq]``, not differentiable). The backward computes dq, dk, dv in one call, with
    ``deterministic`` (default True) bitwise reproducible dq / dk / dv; ``False`` lets dq be
    summed with f32 atomics as FlashAttention-2 does (faster on the mma.sync kernels; dq's last
    bits vary between runs, dk / dv do not; on H100 / H200 the default wgmma kernels run the
    reproducible kernels for it, which are faster there).
    """
    q, k, v, cu_q, cu_k, device = _attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                    softmax_scale)
    return_lse = _check_flag("return_lse", return_lse)
    if _TRACEABLE and torch.compiler.is_compiling():
        # Under torch.compile: the custom ops distill_kernels::attention_forward / _backward,
        # traced into the graph (no graph break).
        out, lse = _torch_ops.attention(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal,
                                        softmax_scale, deterministic)
    else:
        out, lse = _attention_eager(q, k, v, cu_q, cu_k, device, max_seqlen_q, max_seqlen_k,
                                    causal, softmax_scale, deterministic)
    return (out, lse) if return_lse else out


def _attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale):
    """The type, dtype and device checks of :func:`attention` and its autocast cast (plain
    Python on tensor metadata: traceable by torch.compile): (q, k, v, cu_q, cu_k, device)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    amp = _autocast_dtype(q.device)
    if amp is not None:
        # Under torch.autocast attention runs in its dtype, as SDPA's would: the 16/32-bit float
        # q, k and v are cast (differentiably; float32 inputs get float32 gradients back through
        # the cast); any other dtype is left for the check below to refuse.
        def cast(x):
            return x.to(amp) if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x

        same_kv = k is v
        q, k = cast(q), cast(k)
        v = k if same_kv else cast(v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} dtype {x.dtype} is not supported: use bfloat16 or float16 "
                            "(float32 on CPU tensors only)")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"q, k and v must have one dtype: q is {q.dtype}, {name} is {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {x.device}")
    device = _device_ordinal(q)
    if device >= 0 and q.dtype not in _ATTN_DTYPES_CUDA:
        raise TypeError(f"CUDA attention takes bfloat16 or float16, got {q.dtype} (float32 runs "
                        "on CPU tensors only)")
    if isinstance(softmax_scale, torch.Tensor):
        raise TypeError("softmax_scale must be a Python number (a tensor would force a host sync)")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (varlen) or not at "
                         "all (padded)")
    cu_q = cu_k = None
    if cu_seqlens_q is not None:
        cu_q = _cu_seqlens_t("cu_seqlens_q", cu_seqlens_q, q.device)
        cu_k = _cu_seqlens_t("cu_seqlens_k", cu_seqlens_k, q.device)
    return q, k, v, cu_q, cu_k, device


def _attention_shapes(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k) -> None:
    """The layout checks of :func:`attention` that read only shapes (traceable)."""
    if cu_q is not None:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dim() != 3:
                raise ValueError(f"with cu_seqlens (packed sequences) {name} must be 3-D [tokens, "
                                 f"heads, D], got shape {tuple(x.shape)}")
        if cu_q.shape != cu_k.shape:
            raise ValueError(f"cu_seqlens_q has {cu_q.shape[0]} entries and cu_seqlens_k "
                             f"{cu_k.shape[0]}: both must be [B + 1] for the same B")
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q / max_seqlen_k only apply with cu_seqlens (varlen)")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dim() != 4:
                raise ValueError(f"{name} must be 4-D [B, S, heads, D] (or 3-D [tokens, heads, D] "
                                 f"with cu_seqlens), got shape {tuple(x.shape)}")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same "
                             "batch size B")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same head "
                         "dimension D (last axis)")


def _attention_meta(q, k, v, cu_q, cu_k, device, max_seqlen_q, max_seqlen_k, causal,
                    softmax_scale, deterministic) -> _AttnMeta:
    """The shapes and parameters of one attention call, checked; for packed sequences without
    both bounds, the one host synchronisation that reads the offsets."""
    _attention_shapes(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k)
    meta = _AttnMeta()
    meta.device = device
    meta.varlen = cu_q is not None
    if meta.varlen:
        meta.batch = cu_q.shape[0] - 1
        meta.rows_q, meta.rows_k = q.shape[0], k.shape[0]
        if max_seqlen_q is not None and max_seqlen_k is not None:
            meta.seqlen_q = _max_seqlen("max_seqlen_q", max_seqlen_q)
            meta.seqlen_k = _max_seqlen("max_seqlen_k", max_seqlen_k)
        elif meta.batch == 0:
            if meta.rows_q or meta.rows_k:
                raise ValueError(f"cu_seqlens have one entry (no sequences) but q has "
                                 f"{meta.rows_q} rows and k {meta.rows_k}: both must be empty")
            meta.seqlen_q = meta.seqlen_k = 0
        else:
            # The one host synchronisation: lengths and the offsets' consistency in one read.
            lq = (cu_q[1:] - cu_q[:-1]).to(torch.int64)
            lk = (cu_k[1:] - cu_k[:-1]).to(torch.int64)
            stats = torch.stack([lq.max(), lk.max(), lq.min(), lk.min(),
                                 cu_q[0].to(torch.int64), cu_q[-1].to(torch.int64),
                                 cu_k[0].to(torch.int64), cu_k[-1].to(torch.int64)]).tolist()
            mq, mk, nq, nk, q0, qn, k0, kn = stats
            if q0 != 0 or k0 != 0 or nq < 0 or nk < 0 or qn != meta.rows_q or kn != meta.rows_k:
                raise ValueError(
                    f"cu_seqlens must start at 0, never decrease and end at the row counts "
                    f"(q has {meta.rows_q} rows, k {meta.rows_k}): cu_seqlens_q runs {q0} .. {qn}"
                    f" (smallest step {nq}), cu_seqlens_k {k0} .. {kn} (smallest step {nk})")
            meta.seqlen_q = int(mq) if max_seqlen_q is None else _max_seqlen("max_seqlen_q",
                                                                               max_seqlen_q)
            meta.seqlen_k = int(mk) if max_seqlen_k is None else _max_seqlen("max_seqlen_k",
                                                                               max_seqlen_k)
            # A bound the offsets just read contradict: the CUDA grid would skip the rows past
            # it (their output never written).
            if meta.seqlen_q < mq or meta.seqlen_k < mk:
                raise ValueError(
                    f"max_seqlen_q = {meta.seqlen_q}, max_seqlen_k = {meta.seqlen_k} are below the "
                    f"longest sequences of cu_seqlens ({int(mq)} queries, {int(mk)} keys)")
    else:
        meta.batch, meta.seqlen_q, meta.seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        meta.rows_q, meta.rows_k = meta.batch * meta.seqlen_q, meta.batch * meta.seqlen_k
    meta.heads_q, meta.head_dim, meta.heads_kv = q.shape[-2], q.shape[-1], k.shape[-2]
    if max(meta.rows_q, meta.rows_k) >= 2**31 or meta.heads_q * meta.rows_q >= 2**31:
        raise ValueError("too many rows: token rows and heads × rows must fit in int32")
    meta.params = _lib.make_attention_params(meta.heads_q, meta.heads_kv, meta.head_dim, causal,
                                             softmax_scale, deterministic)
    return meta


@_eager
def _attention_eager(q, k, v, cu_q, cu_k, device, max_seqlen_q, max_seqlen_k, causal,
                     softmax_scale, deterministic):
    meta = _attention_meta(q, k, v, cu_q, cu_k, device, max_seqlen_q, max_seqlen_k, causal,
                           softmax_scale, deterministic)
    return AttentionFunction.apply(q, k, v, cu_q, cu_k, meta)


# The torch.compile face: registers the distill_kernels:: custom ops the functions above call
# while Dynamo traces them (it reads this module's helpers, hence last). torch.library's
# custom_op / register_autograd arrived in torch 2.4: older versions keep the graph breaks.
_TRACEABLE = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_autograd")
if _TRACEABLE:
    from . import _torch_ops  # noqa: E402
