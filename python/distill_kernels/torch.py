"""torch face of the token-level divergence: an autograd function over the C ABI.

``divergence(student, teacher, ...)`` takes ``[N, V]`` (or ``[V]``) logits on a CUDA device and
runs zero-copy on that device's current torch stream, with no host synchronisation: the loss is
written into a device tensor. It returns a 0-d float32 tensor for ``batchmean`` / ``sum`` and the
per-token float32 ``[N]`` tensor for ``none``. When the student requires grad, the gradient is
computed in the same pass into a buffer of the student's dtype; backward scales it by
``grad_output`` (in place, so each graph can be backpropagated once). The teacher is treated as a
constant (as in TRL and Liger): no gradient flows to it.

CPU tensors work too, through the library's CPU backend (blocking).
"""

from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import _lib

__all__ = ["divergence", "DivergenceFunction"]

_DTYPES = {torch.float32: _lib.DTYPE_F32, torch.bfloat16: _lib.DTYPE_BF16, torch.float16: _lib.DTYPE_F16}


def _device_ordinal(x: torch.Tensor) -> int:
    if x.device.type == "cuda":
        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    if x.device.type == "cpu":
        return -1
    raise ValueError(f"tensors on {x.device} are not supported (CUDA or CPU only)")


def _matrix(name: str, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(2-D tensor whose rows are contiguous, row stride in elements); copies only if needed."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} dtype {x.dtype} is not supported: use float32, bfloat16 or float16")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    n, v = x.shape
    if v > 1 and x.stride(1) != 1:
        x = x.contiguous()
    if n == 1:
        return x, v
    if x.stride(0) < v:  # broadcast (stride 0), overlapping or reversed rows
        x = x.contiguous()
    return x, x.stride(0)


def _labels(labels, n: int, lead_shape, device: torch.device) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must be integers (int64 preferred), got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    if tuple(labels.shape) != tuple(lead_shape) and not (lead_shape == () and labels.shape == (1,)):
        raise ValueError(f"labels must have shape {tuple(lead_shape)}, got {tuple(labels.shape)}")
    return labels.reshape(n).to(torch.int64).contiguous()


def _ptr(x: Optional[torch.Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


def _launch(device: int, student, s_stride, teacher, t_stride, labels, params, loss, per_token,
            grad) -> None:
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
        grad_stride=v if grad is not None else 0,
    )
    status = l.dk_divergence(handle, ctypes.byref(args), ctypes.byref(params), _ptr(workspace),
                             ws_bytes, stream)
    _lib.check(status, "divergence")


class DivergenceFunction(torch.autograd.Function):
    """autograd.Function behind :func:`divergence` (arguments already validated)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, params, reduction_none, want_grad):
        out_shape = student.shape
        lead_shape = student.shape[:-1]
        device = _device_ordinal(student)
        s, s_stride = _matrix("student", student)
        t, t_stride = _matrix("teacher", teacher)
        n, v = s.shape
        dev = s.device
        loss = torch.empty((), dtype=torch.float32, device=dev)
        per_token = torch.empty(n, dtype=torch.float32, device=dev) if reduction_none else None
        grad = torch.empty((n, v), dtype=s.dtype, device=dev) if want_grad else None
        if device >= 0 and device != torch.cuda.current_device():
            with torch.cuda.device(device):
                _launch(device, s, s_stride, t, t_stride, labels, params, loss, per_token, grad)
        else:
            _launch(device, s, s_stride, t, t_stride, labels, params, loss, per_token, grad)
        ctx.grad_buf = grad
        ctx.out_shape = out_shape
        ctx.reduction_none = reduction_none
        if reduction_none:
            return per_token.reshape(lead_shape)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        g = ctx.grad_buf
        if g is None:
            if ctx.needs_input_grad[0]:
                raise RuntimeError(
                    "distill_kernels.torch.divergence: the gradient buffer was already consumed "
                    "by an earlier backward (it is scaled in place); run the forward again "
                    "instead of backpropagating the same graph twice"
                )
            return None, None, None, None, None, None
        ctx.grad_buf = None
        if ctx.reduction_none:
            scale = grad_output.reshape(-1, 1)
        else:
            scale = grad_output.reshape(())
        g.mul_(scale)  # computed in float32, stored in the student's dtype; no host sync
        return g.view(ctx.out_shape), None, None, None, None, None


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
    num_items: Optional[float] = None,
    grad: Optional[bool] = None,
) -> torch.Tensor:
    """Token-level divergence of student logits from teacher logits, differentiable in `student`.

    Same parameters and math as :func:`distill_kernels.divergence`. Returns the 0-d float32
    loss (``batchmean`` / ``sum``) or the float32 per-token losses (``none``). The gradient is
    computed in the forward pass when ``student.requires_grad`` (and grad mode is on); pass
    ``grad=False`` to skip it. ``num_items`` must be a Python number (not a tensor: reading a
    device tensor would synchronise the host).
    """
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError("student and teacher must be torch tensors")
    if isinstance(num_items, torch.Tensor):
        raise TypeError("num_items must be a Python number (a tensor would force a host sync)")
    params = _lib.make_params(kind, beta, temperature, ignore_index, reduction, num_items)
    if grad is not None and not isinstance(grad, bool):
        raise TypeError(f"grad must be None or a bool, got {grad!r}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in _DTYPES:
            raise TypeError(
                f"{name} dtype {x.dtype} is not supported: use float32, bfloat16 or float16"
            )
        if x.dim() not in (1, 2):
            raise ValueError(f"{name} must be 2-D [N, V] (or 1-D [V]), got {tuple(x.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} differ"
        )
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} but teacher is on {teacher.device}")
    _device_ordinal(student)
    if student.numel() == 0:
        raise ValueError(f"empty logits: shape {tuple(student.shape)}")
    n = 1 if student.dim() == 1 else student.shape[0]
    lab = _labels(labels, n, student.shape[:-1], student.device)
    want_grad = bool(student.requires_grad and torch.is_grad_enabled() and grad is not False)
    if not want_grad:
        student = student.detach()  # forward only: the result does not require grad
    return DivergenceFunction.apply(
        student, teacher, lab, params, reduction == "none", want_grad
    )
