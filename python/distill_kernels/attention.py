"""numpy face of grouped-query attention, on the library's CPU backend.

FlashAttention layout. Padded batch: ``q [B, Sq, Hq, D]``, ``k`` / ``v [B, Sk, Hkv, D]``; the
log-sum-exp is ``[B, Hq, Sq]``. Packed variable-length batch (``cu_seqlens_q`` and
``cu_seqlens_k`` given, both int32 ``[B + 1]``): ``q [Tq, Hq, D]``, ``k`` / ``v [Tk, Hkv, D]``,
sequence b holding query rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1]`` (and likewise keys); the
log-sum-exp is ``[Hq, Tq]``. Hq is a multiple of Hkv (query head h reads KV head
``h // (Hq // Hkv)``), D is 64 or 128, dtypes float16 / ``ml_dtypes.bfloat16`` / float32 (the CPU
backend takes float32 too; the CUDA kernels, through ``distill_kernels.torch``, do not).

The causal mask is aligned bottom-right, per sequence: query i sees keys j <= i + Sk - Sq. A query
row that sees no key (causal with Sq > Sk, or an empty key sequence) gets out 0 and lse -inf.

Layout of the inputs: each token's Hq·D (or Hkv·D) values must be contiguous (the last two axes
C-ordered); the token axis may have any stride that is a multiple of 16 bytes, with a 16-byte
aligned base, so ``q = qkv[:, :, :Hq]`` of a fused ``qkv [B, S, Hq + 2·Hkv, D]`` is read without
a copy. For the padded layout the batch axis must step over whole sequences
(``strides[0] == Sq · strides[1]``, or B = 1). Anything else (other strides, misaligned or
byte-swapped data) is copied with a fresh C-contiguous array first. The inputs are never written;
outputs are fresh C-contiguous arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import _lib
from ._arrays import as_array
from .divergence import _BF16, _dtype_code

__all__ = ["AttentionResult", "attention", "attention_backward"]

# Tests set this to fill every output with NaN before the call, to check all of it is written.
_POISON = False


@dataclass(frozen=True)
class AttentionResult:
    """Result of :func:`attention` (also unpacks as ``out, lse``).

    Fields: ``out`` (shaped like q, in q's dtype) and ``lse`` (float32 natural-log
    log-sum-exp of each query row's scaled scores, ``[B, Hq, Sq]`` padded or ``[Hq, Tq]``
    varlen; -inf for a row that sees no key)."""

    out: np.ndarray
    """softmax(scale · q kᵀ + mask) v, shaped like q, in q's dtype."""
    lse: np.ndarray
    """float32 natural-log log-sum-exp of each query row's scaled scores: ``[B, Hq, Sq]``
    (padded) or ``[Hq, Tq]`` (varlen); −inf for a row that sees no key."""

    def __iter__(self):
        return iter((self.out, self.lse))


def _as_array(name: str, x) -> np.ndarray:
    return as_array(name, x, "distill_kernels.torch.attention")


def _float_input(name: str, x) -> np.ndarray:
    a = _as_array(name, x)
    if a.dtype.kind != "f" and not (_BF16 is not None and a.dtype == _BF16):
        raise TypeError(
            f"{name} dtype {a.dtype} is not supported: use float16, ml_dtypes.bfloat16 or float32"
        )
    _dtype_code(name, a.dtype)  # TypeError for float64 (with a hint) and other widths
    return a


def _token_rows(a: np.ndarray) -> Tuple[np.ndarray, int]:
    """(array, token stride in elements) for ``a [..tokens.., H, D]``: the array itself when its
    tokens are rows the library can read (H·D contiguous values per token, one stride between
    consecutive tokens over all leading axes, 16-byte aligned rows, native byte order), else a
    fresh C-contiguous copy."""
    item = a.dtype.itemsize
    h, d = a.shape[-2], a.shape[-1]
    row = h * d
    lead = a.shape[:-2]
    ok = a.dtype.isnative and a.flags.aligned
    # Values of a token: D contiguous, heads D apart (axes of length 1 may have any stride).
    if ok and d > 1 and a.strides[-1] != item:
        ok = False
    if ok and h > 1 and a.strides[-2] != d * item:
        ok = False
    # Tokens: one stride over all leading axes (flattened C-order).
    stride_b = None
    if ok:
        expect = None
        for size, st in zip(reversed(lead), reversed(a.strides[: len(lead)])):
            if size == 1:
                continue
            if expect is None:
                stride_b = st
                expect = st * size
            elif st == expect:
                expect = st * size
            else:
                ok = False
                break
    if stride_b is None:
        stride_b = row * item  # at most one token: any stride will do
    if ok and (stride_b <= 0 or stride_b % item or stride_b // item < row):
        ok = False
    if ok and a.size and (a.ctypes.data % _lib.ATTENTION_ROW_ALIGN
                          or stride_b % _lib.ATTENTION_ROW_ALIGN):
        ok = False
    if not ok:
        # A fresh copy (ascontiguousarray would hand back a contiguous-but-misaligned array).
        a = np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)
        stride_b = row * item
    return a, stride_b // item


def _cu_seqlens(name: str, x, rows: int, rows_name: str) -> np.ndarray:
    c = _as_array(name, x)
    if c.dtype == np.bool_ or c.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (int32), got dtype {c.dtype}")
    if c.ndim != 1 or c.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [B + 1] (at least one entry), got shape {c.shape}")
    c64 = c.astype(np.int64)
    if c64[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(c64[0])}")
    if np.any(np.diff(c64) < 0):
        raise ValueError(f"{name} must be non-decreasing (sequence offsets), got {c64.tolist()}")
    if c64[-1] != rows:
        raise ValueError(
            f"{name}[-1] = {int(c64[-1])} must equal the number of {rows_name} rows, {rows}"
        )
    if rows >= 2**31:
        raise ValueError(f"{rows} {rows_name} rows do not fit the int32 offsets of {name}")
    return np.ascontiguousarray(c64, dtype=np.int32)


class _Problem:
    """The checked shapes of one call."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k):
        self.dtype = _lib.native_dtype(q.dtype)
        for name, x in (("k", k), ("v", v)):
            if _lib.native_dtype(x.dtype) != self.dtype:
                raise TypeError(f"q, k and v must have one dtype: q is {q.dtype}, {name} is "
                                f"{x.dtype}")
        self.code = _dtype_code("q", q.dtype)
        if (cu_seqlens_q is None) != (cu_seqlens_k is None):
            raise ValueError(
                "cu_seqlens_q and cu_seqlens_k must be given together (varlen) or not at all "
                "(padded)"
            )
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            for name, x in (("q", q), ("k", k), ("v", v)):
                if x.ndim != 3:
                    raise ValueError(
                        f"with cu_seqlens (packed sequences) {name} must be 3-D [tokens, heads, "
                        f"D], got shape {x.shape}"
                    )
            self.cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "query")
            self.cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "key")
            if self.cu_q.shape != self.cu_k.shape:
                raise ValueError(
                    f"cu_seqlens_q has {self.cu_q.shape[0]} entries and cu_seqlens_k "
                    f"{self.cu_k.shape[0]}: both must be [B + 1] for the same B"
                )
            self.batch = self.cu_q.shape[0] - 1
            self.rows_q, self.rows_k = q.shape[0], k.shape[0]
            self.seqlen_q = int(np.diff(self.cu_q).max()) if self.batch else 0
            self.seqlen_k = int(np.diff(self.cu_k).max()) if self.batch else 0
        else:
            for name, x in (("q", q), ("k", k), ("v", v)):
                if x.ndim != 4:
                    raise ValueError(
                        f"{name} must be 4-D [B, S, heads, D] (or 3-D [tokens, heads, D] with "
                        f"cu_seqlens_q / cu_seqlens_k), got shape {x.shape}"
                    )
            if k.shape[0] != q.shape[0]:
                raise ValueError(f"q {q.shape} and k {k.shape} must have the same batch size B")
            self.cu_q = self.cu_k = None
            self.batch, self.seqlen_q = q.shape[0], q.shape[1]
            self.seqlen_k = k.shape[1]
            self.rows_q, self.rows_k = self.batch * self.seqlen_q, self.batch * self.seqlen_k
        if v.shape != k.shape:
            raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
        self.heads_q, self.head_dim = q.shape[-2], q.shape[-1]
        self.heads_kv = k.shape[-2]
        if k.shape[-1] != self.head_dim:
            raise ValueError(
                f"q {q.shape} and k {k.shape} must have the same head dimension D (last axis)"
            )
        if max(self.rows_q, self.rows_k) >= 2**31 or self.heads_q * self.rows_q >= 2**31:
            raise ValueError("too many rows: token rows and heads × rows must fit in int32")
        self.q_shape, self.k_shape = q.shape, k.shape

    def params(self, causal, softmax_scale, deterministic) -> _lib.AttentionParams:
        return _lib.make_attention_params(self.heads_q, self.heads_kv, self.head_dim, causal,
                                          softmax_scale, deterministic)

    def lse_shape(self) -> Tuple[int, ...]:
        if self.varlen:
            return (self.heads_q, self.rows_q)
        return (self.batch, self.heads_q, self.seqlen_q)

    def c_batch(self) -> _lib.AttentionBatch:
        return _lib.AttentionBatch(
            batch=self.batch,
            seqlen_q=self.seqlen_q,
            seqlen_k=self.seqlen_k,
            cu_seqlens_q=None if self.cu_q is None else self.cu_q.ctypes.data,
            cu_seqlens_k=None if self.cu_k is None else self.cu_k.ctypes.data,
            rows_q=self.rows_q,
            rows_k=self.rows_k,
        )


def _fresh(shape, dtype) -> np.ndarray:
    a = np.empty(shape, dtype=dtype)
    if _POISON:
        a.fill(np.nan)
    return a


def _like(name: str, x, shape, dtype) -> np.ndarray:
    a = _float_input(name, x)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    if _lib.native_dtype(a.dtype) != dtype:
        raise TypeError(f"{name} dtype {a.dtype} must be the dtype of q, {dtype}")
    return a


def attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
) -> AttentionResult:
    """Grouped-query attention forward: ``out = softmax(scale · q kᵀ + mask) v`` per query head,
    and the log-sum-exp of each query row.

    ``q [B, Sq, Hq, D]``, ``k`` / ``v [B, Sk, Hkv, D]`` (padded), or ``q [Tq, Hq, D]``, ``k`` /
    ``v [Tk, Hkv, D]`` with ``cu_seqlens_q`` / ``cu_seqlens_k`` (packed, int32 ``[B + 1]``).
    ``causal`` masks bottom-right per sequence (query i sees keys j <= i + Sk − Sq);
    ``softmax_scale`` None is 1/√D (else > 0, at most ~2.36e38). Returns
    :class:`AttentionResult` (``out`` like q, ``lse`` float32 ``[B, Hq, Sq]`` or ``[Hq, Tq]``).

    Limits of the CUDA kernels (as in FlashAttention-2): sums run in float32, so Sk·max|v| and
    D·max|q|·max|k| must stay below ~3.4e38, and scores times ``softmax_scale`` below ~2.4e38;
    probabilities are rounded to the input dtype for the P·V product, so with float16 a key
    weighted below ~3e-8 of the row's running maximum counts as 0 (bfloat16 keeps float32's
    range), and values at float16's maximum can round to inf.

    Raises ValueError / TypeError for bad shapes, dtypes or parameters before calling the
    library (a :class:`DistillKernelsError` subclass when the library rejects a call).
    """
    q = _float_input("q", q)
    k = _float_input("k", k)
    v = _float_input("v", v)
    p = _Problem(q, k, v, cu_seqlens_q, cu_seqlens_k)
    params = p.params(causal, softmax_scale, True)
    q2, q_stride = _token_rows(q)
    k2, k_stride = _token_rows(k)
    v2, v_stride = _token_rows(v)
    out = _fresh(p.q_shape, p.dtype)
    lse = _fresh(p.lse_shape(), np.float32)
    args = _lib.AttentionArgs(
        batch=p.c_batch(),
        dtype=p.code,
        q=q2.ctypes.data,
        q_stride=q_stride,
        k=k2.ctypes.data,
        k_stride=k_stride,
        v=v2.ctypes.data,
        v_stride=v_stride,
        out=out.ctypes.data,
        out_stride=p.heads_q * p.head_dim,
        lse=lse.ctypes.data,
    )
    _lib.attention_forward_call(_lib.context(-1), args, params, None)
    return AttentionResult(out=out, lse=lse)


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    deterministic: bool = True,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`attention`: given ``dout = dL/d(out)`` and the forward's ``out`` and
    ``lse``, returns ``(dq, dk, dv)`` shaped like q, k, v, in their dtype (dK / dV summed over
    each KV head's query group). Same layouts and keywords as :func:`attention`, which must be
    the ones of the forward call; ``deterministic`` asks for bitwise reproducible gradients;
    ``False`` lets CUDA sum dQ with f32 atomics (faster on the mma.sync kernels; dQ's last bits
    then vary between runs, dK / dV do not; on H100 / H200 the default wgmma kernels run the
    reproducible kernels for it, which are faster there). The CPU backend is always reproducible.

    The CUDA kernels rebuild the probabilities from the float32 ``lse`` (as FlashAttention-2),
    so its rounding, up to |lse|·2^-24, is a relative error of the gradients (1e-4 at |lse| ~
    2000); the CPU backend recomputes each row's statistics in float64.
    """
    q = _float_input("q", q)
    k = _float_input("k", k)
    v = _float_input("v", v)
    p = _Problem(q, k, v, cu_seqlens_q, cu_seqlens_k)
    params = p.params(causal, softmax_scale, deterministic)
    dout = _like("dout", dout, p.q_shape, p.dtype)
    out = _like("out", out, p.q_shape, p.dtype)
    l = _as_array("lse", lse)
    if _lib.native_dtype(l.dtype) != np.float32:
        raise TypeError(f"lse must be float32 (the forward's lse), got dtype {l.dtype}")
    if l.shape != p.lse_shape():
        raise ValueError(
            f"lse must have shape {p.lse_shape()} ("
            + ("[Hq, Tq]" if p.varlen else "[B, Hq, Sq]")
            + f"), got {l.shape}"
        )
    l = np.ascontiguousarray(l, dtype=np.float32)
    q2, q_stride = _token_rows(q)
    k2, k_stride = _token_rows(k)
    v2, v_stride = _token_rows(v)
    do2, do_stride = _token_rows(dout)
    o2, o_stride = _token_rows(out)
    dq = _fresh(p.q_shape, p.dtype)
    dk = _fresh(p.k_shape, p.dtype)
    dv = _fresh(p.k_shape, p.dtype)
    args = _lib.AttentionBackwardArgs(
        batch=p.c_batch(),
        dtype=p.code,
        dout=do2.ctypes.data,
        dout_stride=do_stride,
        q=q2.ctypes.data,
        q_stride=q_stride,
        k=k2.ctypes.data,
        k_stride=k_stride,
        v=v2.ctypes.data,
        v_stride=v_stride,
        out=o2.ctypes.data,
        out_stride=o_stride,
        lse=l.ctypes.data,
        dq=dq.ctypes.data,
        dq_stride=p.heads_q * p.head_dim,
        dk=dk.ctypes.data,
        dk_stride=p.heads_kv * p.head_dim,
        dv=dv.ctypes.data,
        dv_stride=p.heads_kv * p.head_dim,
    )
    handle = _lib.context(-1)
    ws_bytes = _lib.attention_backward_workspace_size(handle, args, params)
    workspace = np.empty(ws_bytes, dtype=np.uint8) if ws_bytes else None
    _lib.attention_backward_call(handle, args, params,
                                 None if workspace is None else workspace.ctypes.data, ws_bytes,
                                 None)
    return dq, dk, dv
