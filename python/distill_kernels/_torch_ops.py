"""The torch.compile face: the library's calls registered as ``torch.library`` custom ops.

Outside torch.compile the public functions of :mod:`distill_kernels.torch` run their eager
autograd Functions. While Dynamo traces them (``torch.compiler.is_compiling()``) they call the
ops below instead, so a compiled training step keeps one graph (``fullgraph=True`` works; CUDA
graphs, ``mode="reduce-overhead"``, have not been tried on a GPU). Each op has a fake (shape-only)
implementation for tracing and an autograd formula; the real implementation is the same C ABI
call the eager face makes, on the current stream.

The divergence and the fused linear divergence compute their gradients in the forward, as
the eager face does, and the backward scales those buffers in place by ``grad_output``
(``distill_kernels::scale_grad_``: on CUDA no pass at all when it is exactly 1). AOTAutograd
donates the saved buffers to the backward, so Inductor runs that mutation on them with no copy;
under ``retain_graph=True`` torch keeps copies or refuses with its own error, so a buffer is
never scaled twice. ``scale_grad_`` refuses grad mode (``create_graph=True``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _lib
from . import torch as _face

_NS = "distill_kernels"

_DOUBLE_BACKWARD = (
    "distill_kernels.torch: double backward (create_graph=True) is not supported: the gradients "
    "of divergence / fused_linear_divergence are computed in the forward pass and are not "
    "differentiable themselves")


def _check_names(kind, reduction) -> None:
    """The string parameters, constants while tracing: refused before the op is traced (a plain
    ValueError) and again by the fakes for direct callers of the ops."""
    if not isinstance(kind, str) or kind not in _lib.KINDS:
        raise ValueError(f"kind must be one of {sorted(_lib.KINDS)}, got {kind!r}")
    if not isinstance(reduction, str) or reduction not in _lib.REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(_lib.REDUCTIONS)}, got {reduction!r}")


def _empty(like: Tensor) -> Tensor:
    """The placeholder for an output the call does not produce (ops cannot return None)."""
    return like.new_empty(0, dtype=torch.float32)


# ---- divergence ----------------------------------------------------------------------------------


@torch.library.custom_op(f"{_NS}::divergence", mutates_args=())
def _divergence_op(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    kind: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    num_items: Optional[float],
    want_grad: bool,
    num_items_t: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss 0-d, per-token [N] or [0], gradient [N, V] or [0]) for 2-D logits. The gradient
    output belongs to the op's backward, which scales it in place: not for the caller's use.
    The scalar parameters are checked here, where they are concrete numbers. ``num_items_t``: a
    tensor num_items (checked by the face), read where the call runs."""
    num_items, items_mem, reduction = _face._num_items_resolved(num_items_t, num_items,
                                                                reduction, student)
    params = _lib.make_params(kind, beta, temperature, ignore_index, reduction, num_items)
    loss, per_token, grad = _face._divergence_run(student, teacher, labels, params,
                                                  reduction == "none", want_grad,
                                                  num_items_mem=items_mem)
    # Absent outputs are empty tensors, each its own (outputs must not alias one another).
    return (loss, per_token if per_token is not None else _empty(student),
            grad if grad is not None else _empty(student))


@_divergence_op.register_fake
def _divergence_fake(student, teacher, labels, kind, beta, temperature, ignore_index, reduction,
                     num_items, want_grad, num_items_t):
    _check_names(kind, reduction)
    n, v = student.shape
    f32 = torch.float32
    per_token = student.new_empty((n,), dtype=f32) if reduction == "none" else _empty(student)
    # float16 gradients are computed and scaled in float32 (see divergence's docstring).
    grad = (student.new_empty((n, v), dtype=_face._grad_buffer_dtype(None, student.dtype))
            if want_grad else _empty(student))
    return student.new_empty((), dtype=f32), per_token, grad


def _divergence_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.reduction_none = inputs[7] == "none"
    ctx.student_dtype = inputs[0].dtype


def _divergence_backward(ctx, d_loss, d_per_token, _d_grad):
    (grad,) = ctx.saved_tensors
    factor = d_per_token if ctx.reduction_none else d_loss
    torch.ops.distill_kernels.scale_grad_(grad, factor, ctx.reduction_none)
    return (grad.to(ctx.student_dtype),) + (None,) * 10


torch.library.register_autograd(f"{_NS}::divergence", _divergence_backward,
                                setup_context=_divergence_setup)


@torch.library.custom_op(f"{_NS}::scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, factor: Tensor, per_row: bool) -> None:
    """grad *= factor (per row, or one value) in place (on CUDA through dk_scale_rows: no pass
    when the factor is exactly 1). Runs in the backward: grad mode on there means
    create_graph=True, whose second-order terms these forward-computed buffers cannot give."""
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    _face._scale_by_grad_output(grad, factor, per_row)


def divergence(student, teacher, *, kind, beta, temperature, labels, ignore_index, reduction,
               num_items, num_items_t, grad):
    """:func:`distill_kernels.torch.divergence` as traced by torch.compile (grad_inplace off)."""
    _check_names(kind, reduction)
    lab = _face._check_divergence_inputs(student, teacher, labels, beta, temperature, grad,
                                         False)
    want_grad = bool(student.requires_grad and torch.is_grad_enabled() and grad is not False)
    lead_shape, v = student.shape[:-1], student.shape[-1]
    s = student.reshape(-1, v)  # [..., V] as rows ([V]: one row)
    if not want_grad:
        s = s.detach()
    t = teacher.reshape(-1, v).detach()
    loss, per_token, _ = torch.ops.distill_kernels.divergence(
        s, t, lab, kind, beta, temperature, ignore_index, reduction, num_items, want_grad,
        num_items_t)
    return per_token.reshape(lead_shape) if reduction == "none" else loss


# ---- grouped-query attention ---------------------------------------------------------------------


def _attn_meta(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
               deterministic):
    return _face._attention_meta(q, k, v, cu_q, cu_k, _face._device_ordinal(q), max_seqlen_q,
                                 max_seqlen_k, causal, softmax_scale, deterministic)


@torch.library.custom_op(f"{_NS}::attention_forward", mutates_args=())
def _attention_forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    causal: bool,
    softmax_scale: Optional[float],
    deterministic: bool,
) -> Tuple[Tensor, Tensor]:
    """(out like q, float32 lse) of :func:`distill_kernels.torch.attention`."""
    meta = _attn_meta(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      softmax_scale, deterministic)
    out, lse, _ = _face._attn_forward(meta, q, k, v, cu_seqlens_q, cu_seqlens_k)
    return out, lse


@_attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            causal, softmax_scale, deterministic):
    if cu_seqlens_q is not None:  # packed: lse [Hq, Tq]
        lse_shape = (q.shape[-2], q.shape[0])
    else:  # padded: lse [B, Hq, Sq]
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    causal: bool,
    softmax_scale: Optional[float],
    deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`distill_kernels.torch.attention`."""
    meta = _attn_meta(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      softmax_scale, deterministic)
    return _face._attn_backward(meta, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, causal, softmax_scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k = inputs[:5]
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.params = inputs[5:]  # max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic
    ctx.mark_non_differentiable(output[1])


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.distill_kernels.attention_backward(
        dout.to(q.dtype), q, k, v, out, lse, cu_q, cu_k, *ctx.params)
    return (dq, dk, dv) + (None,) * 7


torch.library.register_autograd(f"{_NS}::attention_forward", _attention_backward,
                                setup_context=_attention_setup)


def attention(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
              deterministic):
    """:func:`distill_kernels.torch.attention` as traced by torch.compile: (out, lse)."""
    _face._attention_shapes(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k)
    return torch.ops.distill_kernels.attention_forward(
        q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic)


# ---- fused linear divergence ---------------------------------------------------------------------


@torch.library.custom_op(f"{_NS}::fused_linear_divergence", mutates_args=())
def _fused_op(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Optional[Tensor],
    kind: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    num_items: Optional[float],
    logit_scale: float,
    softcap: Optional[float],
    chunk_rows: Optional[int],
    want_grad_hidden: bool,
    want_grad_weight: bool,
    grad_dtype: torch.dtype,
    num_items_t: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d, per-token [N] or [0], grad_hidden [N, H] or [0], grad_weight [V, H] or [0])
    for hidden states 2-D [N, H]. The gradient outputs belong to the op's backward, which
    scales them in place: not for the caller's use. ``num_items_t`` as in the divergence op."""
    num_items, items_mem, reduction = _face._num_items_resolved(num_items_t, num_items,
                                                                reduction, student_hidden)
    params = _lib.make_fused_params(kind, beta, temperature, ignore_index, reduction, num_items,
                                    logit_scale, softcap, chunk_rows, False)
    loss, per_token, gh, gw = _face._fused_run(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, params,
        reduction == "none", want_grad_hidden, want_grad_weight, grad_dtype, items_mem)
    hs = student_hidden
    return (loss, _empty(hs) if per_token is None else per_token,
            _empty(hs) if gh is None else gh, _empty(hs) if gw is None else gw)


@_fused_op.register_fake
def _fused_fake(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kind, beta,
                temperature, ignore_index, reduction, num_items, logit_scale, softcap, chunk_rows,
                want_grad_hidden, want_grad_weight, grad_dtype, num_items_t):
    _check_names(kind, reduction)
    n, h = student_hidden.shape
    v = student_weight.shape[0]
    f32 = torch.float32
    hs, new = student_hidden, student_hidden.new_empty
    return (new((), dtype=f32), new((n,), dtype=f32) if reduction == "none" else _empty(hs),
            new((n, h), dtype=grad_dtype) if want_grad_hidden else _empty(hs),
            new((v, h), dtype=grad_dtype) if want_grad_weight else _empty(hs))


def _fused_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.reduction_none = inputs[9] == "none"
    ctx.wanted = (inputs[14], inputs[15])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _fused_backward(ctx, d_loss, d_per_token, _d_gh, _d_gw):
    gh, gw = ctx.saved_tensors
    factor = d_per_token if ctx.reduction_none else d_loss
    # With reduction "none" only the hidden-state gradient exists (per-row factors); the weight
    # gradient is scaled by the one grad_output value.
    grads = [None, None]
    if ctx.wanted[0]:
        torch.ops.distill_kernels.scale_grad_(gh, factor, ctx.reduction_none)
        grads[0] = gh.to(ctx.dtypes[0])
    if ctx.wanted[1]:
        torch.ops.distill_kernels.scale_grad_(gw, factor, False)
        grads[1] = gw.to(ctx.dtypes[1])
    return tuple(grads) + (None,) * 16


torch.library.register_autograd(f"{_NS}::fused_linear_divergence", _fused_backward,
                                setup_context=_fused_setup)


def fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                            kind, beta, temperature, labels, ignore_index, reduction, num_items,
                            num_items_t, logit_scale, softcap, chunk_rows, grad, grad_dtype):
    """:func:`distill_kernels.torch.fused_linear_divergence` as traced by torch.compile (the
    autograd form: no ``*_out`` buffers)."""
    _check_names(kind, reduction)
    hs, ws, ht, wt, lab, g_dtype = _face._fused_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, beta=beta,
        temperature=temperature, labels=labels, logit_scale=logit_scale, softcap=softcap,
        grad=grad, grad_dtype=grad_dtype)
    want_gh, want_gw = _face._fused_wanted(hs, ws, grad, reduction)
    lead_shape = hs.shape[:-1]
    hs2 = hs.reshape(-1, hs.shape[-1])
    if not want_gh:
        hs2 = hs2.detach()
    ws_in = ws if want_gw else ws.detach()
    loss, per_token, _, _ = torch.ops.distill_kernels.fused_linear_divergence(
        hs2, ws_in, ht.reshape(-1, ht.shape[-1]).detach(), wt.detach(), lab, kind, beta,
        temperature, ignore_index, reduction, num_items, logit_scale, softcap, chunk_rows,
        want_gh, want_gw, g_dtype, num_items_t)
    return per_token.reshape(lead_shape) if reduction == "none" else loss
