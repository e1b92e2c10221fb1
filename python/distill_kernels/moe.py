"""numpy face of the MoE token dispatch, on the library's CPU backend.

Routing turns router logits ``[N, E]`` into the top-k experts of every token, their weights and
a deterministic permutation of the N·k (token, slot) pairs into expert-major order (expert, then
token, then slot); permute gathers token rows into that order, combine sums each token's k expert
rows back, weighted. The backward passes are the same primitives, each pair computed by one
library call (``dk_moe_permute_backward`` / ``dk_moe_combine_backward``) with their results bit
for bit:

- ``moe_permute_backward(g, route)``            = ``combine(g, unweighted)``;
- ``moe_permute_backward(g, route, x, scale=True)`` = ``combine(g, weights)`` and
  ``grad_weights[n, j] = <x[n], g[position[n, j]]>``;
- ``moe_combine_backward(g, expert_out, route)`` = ``permute(g, scaled by weights)`` and
  ``grad_weights[n, j] = <g[n], expert_out[position[n, j]]>``.

Activations are float32, float16 or ``ml_dtypes.bfloat16``, ``[rows, H]`` with H a multiple of 8;
rows may be strided (``big[:, :H]`` is read without a copy). Router logits are float32 or
bfloat16 (float16 logits are widened to float32 first, exactly). Inputs are never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _lib
from ._arrays import as_array
from .divergence import _BF16, _dtype_code, _row_layout

__all__ = [
    "MoeRoute",
    "moe_route",
    "moe_permute",
    "moe_combine",
    "moe_permute_backward",
    "moe_combine_backward",
]

# Tests set this to fill every output with garbage before the call, to check all of it is written.
_POISON = False


@dataclass(frozen=True, eq=False)
class MoeRoute:
    """Result of :func:`moe_route` (numpy arrays; ``distill_kernels.torch.moe_route`` returns the
    same class holding torch tensors).

    Pass it to :func:`moe_permute` / :func:`moe_combine` and their backward functions. To use
    other weights with the same routing (e.g. weights that carry a gradient), pass ``weights=``
    to those functions or ``dataclasses.replace(route, weights=w)``.

    Fields: ``expert_ids`` (int32 ``[N, k]``), ``weights`` (float32 ``[N, k]``), ``counts``
    (int32 ``[E]``), ``offsets`` (int32 ``[E + 1]``, segment starts in the permuted buffer),
    ``perm`` (int32 ``[R]``: the flat slot n·k + j each permuted row holds, -1 for padding),
    ``position`` (int32 ``[N, k]``: the permuted row of each slot, -1 when dropped), the sizes
    ``n``, ``e``, ``k`` and ``num_rows`` (R); each is described in the source beside its field.
    """

    expert_ids: Any
    """int32 ``[N, k]``: the chosen experts of each token, by descending selection score (ties
    to the lower expert id)."""
    weights: Any
    """float32 ``[N, k]``: the unbiased scores of the chosen experts (renormalised to sum 1 when
    asked), times ``scale``. Dropped slots keep their weight (they are skipped by combine)."""
    counts: Any
    """int32 ``[E]``: tokens routed to each expert after capacity drops."""
    offsets: Any
    """int32 ``[E + 1]``: start of each expert's segment in the permuted rows, each segment
    padded to a multiple of ``block``; ``offsets[E]`` = R."""
    perm: Any
    """int32 ``[num_rows]``: the flat slot ``n·k + j`` each permuted row holds, −1 for padding."""
    position: Any
    """int32 ``[N, k]``: the permuted row of slot ``(n, j)``, −1 when dropped by the capacity."""
    n: int
    """Tokens N."""
    e: int
    """Experts E."""
    k: int
    """Experts per token."""
    num_rows: int
    """Rows of the permuted buffer: R = offsets[E] (or, for a torch route made with
    ``exact_rows=False``, the bound ``max_rows``; rows past R are padding)."""
    perm_full: Any = None
    """int32 ``[max_rows]``: the whole permutation buffer (``perm`` is its first ``num_rows``
    entries; the entries past R are −1). ``max_rows`` = K + min(E, K)·(block − 1), with
    K = min(N·k, E·capacity) the slots kept."""

    @property
    def max_rows(self) -> int:
        """The bound on R that sized ``perm_full``."""
        full = self.perm_full if self.perm_full is not None else self.perm
        return int(full.shape[0])


# ---- argument checks -------------------------------------------------------------------------


def _logits(logits) -> np.ndarray:
    lg = as_array("logits", logits)
    if not lg.dtype.isnative:
        lg = lg.astype(_lib.native_dtype(lg.dtype))  # the same values in native byte order
    if lg.dtype == np.float16:
        lg = lg.astype(np.float32)  # exact
    if not (lg.dtype == np.float32 or (_BF16 is not None and lg.dtype == _BF16)):
        raise TypeError(
            f"router logits dtype {lg.dtype} is not supported: use float32 or ml_dtypes.bfloat16"
            + (" (float64 logits: convert with .astype(np.float32))" if lg.dtype == np.float64 else "")
        )
    if lg.ndim != 2:
        raise ValueError(f"router logits must be 2-D [N, E], got shape {lg.shape}")
    if lg.shape[1] == 0:
        raise ValueError(f"router logits have no experts: shape {lg.shape} (E must be at least "
                         "1; N = 0 tokens is an empty batch)")
    return lg


def _bias(bias, e: int) -> Optional[np.ndarray]:
    if bias is None:
        return None
    b = as_array("bias", bias)
    if b.dtype.kind != "f" and not (_BF16 is not None and b.dtype == _BF16):
        raise TypeError(f"bias must hold floating-point numbers, got dtype {b.dtype}")
    if b.shape != (e,):
        raise ValueError(f"bias must have shape ({e},) (one per expert), got {b.shape}")
    return np.ascontiguousarray(b, dtype=np.float32)


def _activations(name: str, x, h: Optional[int] = None) -> Tuple[np.ndarray, int, int]:
    """(array with contiguous rows, row stride in elements, dtype code) of a 2-D activation."""
    a = as_array(name, x)
    _dtype_code(name, a.dtype)  # TypeError on anything but f32 / f16 / bf16
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, H], got shape {a.shape}")
    _lib.check_moe_hidden(name, a.shape[1])
    if h is not None and a.shape[1] != h:
        raise ValueError(f"{name} has H = {a.shape[1]}, expected {h}")
    if a.shape[0] == 0:
        # No rows to read: a native-order twin, as the copy of a byte-swapped array would be.
        dt = _lib.native_dtype(a.dtype)
        return np.empty(a.shape, dt), a.shape[1], _dtype_code(name, dt)
    a, stride = _row_layout(a)
    if a.ctypes.data % _lib.MOE_ROW_ALIGN or (stride * a.dtype.itemsize) % _lib.MOE_ROW_ALIGN:
        # The kernels move rows in 16-byte vectors: rows must start on 16-byte boundaries.
        a, stride = np.array(a, order="C", copy=True), a.shape[1]
    return a, stride, _dtype_code(name, a.dtype)


def _ptr(a: Optional[np.ndarray]) -> Optional[int]:
    return None if a is None else a.ctypes.data


class _R:
    """The arrays of a MoeRoute, checked and in the layout the C ABI reads."""

    def __init__(self, route):
        if not isinstance(route, MoeRoute):
            raise TypeError(f"route must be a MoeRoute (from moe_route), got {type(route).__name__}")
        n, e, k, r = route.n, route.e, route.k, route.num_rows
        for name, v in (("n", n), ("e", e), ("k", k), ("num_rows", r)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"route.{name} must be a non-negative integer, got {v!r}")
            if v < 0:
                raise ValueError(f"route.{name} must be a non-negative integer, got {v!r}")
        self.n, self.e, self.k, self.num_rows = int(n), int(e), int(k), int(r)
        self.position = self._ints("position", route.position, (self.n, self.k))
        full = route.perm_full if route.perm_full is not None else route.perm
        full = as_array("route.perm_full", full)
        if full.ndim != 1 or full.shape[0] < self.num_rows:
            raise ValueError(
                f"route.perm_full must be 1-D with at least num_rows = {self.num_rows} entries, "
                f"got shape {full.shape}"
            )
        self.perm_full = self._ints("perm_full", full, full.shape)
        if route.perm_full is not None and route.perm is not None:
            # The kernels read perm_full; perm is its first num_rows entries. A route whose perm
            # was replaced alone (dataclasses.replace(route, perm=...)) would be ignored silently.
            head = as_array("route.perm", route.perm)
            if head.shape != (self.num_rows,) or not np.array_equal(
                head, self.perm_full[: self.num_rows]
            ):
                raise ValueError(
                    "route.perm differs from route.perm_full[:num_rows]; perm is the start of "
                    "perm_full, which the kernels read: replace perm_full (and perm) together"
                )
        self._weights = route.weights
        if self.position.size and (
            self.position.min() < -1 or self.position.max() >= max(self.num_rows, 0)
        ):
            raise ValueError(
                f"route.position holds rows outside -1..{self.num_rows - 1}: "
                "the route is inconsistent (use the arrays moe_route returned)"
            )

    @staticmethod
    def _ints(name, a, shape) -> np.ndarray:
        a = as_array(f"route.{name}", a)
        if a.dtype.kind not in "iu":
            raise TypeError(f"route.{name} must hold integers, got dtype {a.dtype}")
        if a.shape != tuple(shape):
            raise ValueError(f"route.{name} must have shape {tuple(shape)}, got {a.shape}")
        if a.dtype != np.int32:
            if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
                raise ValueError(f"route.{name} does not fit in int32")
        return np.ascontiguousarray(a, dtype=np.int32)

    def perm(self, rows: int) -> np.ndarray:
        p = self.perm_full[:rows]
        if p.size and (p.min() < -1 or p.max() >= self.n * self.k):
            raise ValueError(
                f"route.perm holds slots outside -1..{self.n * self.k - 1}: the route is "
                "inconsistent (use the arrays moe_route returned)"
            )
        return p

    def weights(self, override=None) -> np.ndarray:
        w = self._weights if override is None else override
        w = as_array("weights", w)
        if w.dtype.kind != "f" and not (_BF16 is not None and w.dtype == _BF16):
            raise TypeError(f"weights must be floating point, got dtype {w.dtype}")
        if w.shape != (self.n, self.k):
            raise ValueError(f"weights must have shape ({self.n}, {self.k}), got {w.shape}")
        return np.ascontiguousarray(w, dtype=np.float32)

    def rows_of(self, name: str, a: np.ndarray) -> int:
        """Checks a permuted-order buffer's row count: R <= rows <= max_rows."""
        rows = a.shape[0]
        if not (self.num_rows <= rows <= self.perm_full.shape[0]):
            raise ValueError(
                f"{name} has {rows} rows; the route has R = {self.num_rows} permuted rows "
                f"(buffers of R up to max_rows = {self.perm_full.shape[0]} rows are accepted)"
            )
        return rows


def _token_rows(name: str, a, r: _R, h: Optional[int] = None):
    a, stride, code = _activations(name, a, h)
    if a.shape[0] != r.n:
        raise ValueError(f"{name} has {a.shape[0]} rows, the route has N = {r.n} tokens")
    return a, stride, code


def _flag(name: str, v) -> bool:
    return _lib._bool(name, v)


def _only_with(flag: str, on: bool, name: str, value) -> None:
    """``name=`` is read only when ``flag`` is on: given with it off, it would be ignored,
    which is a mistake to report, not to pass over."""
    if not on and value is not None:
        raise ValueError(f"{name}= is only used with {flag}=True; it was given with {flag}=False")


# ---- the library calls -------------------------------------------------------------------------


def _output(shape, dtype) -> np.ndarray:
    """An output array, filled with NaN first when the tests poison outputs."""
    out = np.empty(shape, dtype=dtype)
    if _POISON:
        out.fill(np.nan)
    return out


def _permute(x, x_stride, code, r: _R, w: Optional[np.ndarray], rows: int, what: str) -> np.ndarray:
    h = x.shape[1]
    out = _output((rows, h), x.dtype)
    if rows == 0:
        return out
    perm = r.perm(rows)
    args = _lib.MoePermuteArgs(
        n=r.n, h=h, k=r.k, rows=rows, dtype=code, x=_ptr(x), x_stride=x_stride, perm=_ptr(perm),
        weights=_ptr(w), out=_ptr(out), out_stride=h,
    )
    _lib.moe_permute_call(_lib.context(-1), args, None, what)
    return out


def _combine(rows_in, rows_stride, code, r: _R, w: Optional[np.ndarray], what: str) -> np.ndarray:
    h = rows_in.shape[1]
    y = _output((r.n, h), rows_in.dtype)
    args = _lib.MoeCombineArgs(
        n=r.n, h=h, k=r.k, rows=rows_in.shape[0], dtype=code, rows_in=_ptr(rows_in),
        rows_stride=rows_stride, position=_ptr(r.position), weights=_ptr(w), y=_ptr(y),
        y_stride=h,
    )
    _lib.moe_combine_call(_lib.context(-1), args, None, what)
    return y


def _permute_backward(g, g_stride, code, r: _R, w: Optional[np.ndarray], x: Optional[np.ndarray],
                      x_stride: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``dk_moe_permute_backward``: grad_x ``[N, H]`` (the combine of ``g``, weighted by ``w``
    when given) and, when ``x`` is given, grad_weights ``[N, k]`` (its slot-dot with ``g``)."""
    h = g.shape[1]
    grad_x = _output((r.n, h), g.dtype)
    grad_w = None if x is None else _output((r.n, r.k), np.float32)
    args = _lib.MoePermuteBackwardArgs(
        n=r.n, h=h, k=r.k, rows=g.shape[0], dtype=code, grad_xp=_ptr(g), grad_xp_stride=g_stride,
        position=_ptr(r.position), weights=_ptr(w), x=_ptr(x), x_stride=x_stride,
        grad_x=_ptr(grad_x), grad_x_stride=h, grad_weights=_ptr(grad_w),
    )
    _lib.moe_permute_backward_call(_lib.context(-1), args, None, "moe_permute_backward")
    return grad_x, grad_w


def _combine_backward(g, g_stride, code, r: _R, w: Optional[np.ndarray],
                      eo: Optional[np.ndarray], eo_stride: int,
                      rows: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``dk_moe_combine_backward``: grad_expert_out ``[rows, H]`` (the permute of ``g``, scaled
    by ``w`` when given) and, when ``eo`` is given, grad_weights ``[N, k]`` (the slot-dot of
    ``g`` with ``eo``)."""
    h = g.shape[1]
    grad_eo = _output((rows, h), g.dtype)
    grad_w = None if eo is None else _output((r.n, r.k), np.float32)
    args = _lib.MoeCombineBackwardArgs(
        n=r.n, h=h, k=r.k, rows=rows, dtype=code, grad_y=_ptr(g), grad_y_stride=g_stride,
        expert_out=_ptr(eo), expert_out_stride=eo_stride, perm=_ptr(r.perm(rows)),
        position=_ptr(r.position), weights=_ptr(w), grad_expert_out=_ptr(grad_eo),
        grad_expert_out_stride=h, grad_weights=_ptr(grad_w),
    )
    _lib.moe_combine_backward_call(_lib.context(-1), args, None, "moe_combine_backward")
    return grad_eo, grad_w


def _same_dtype(a_name, a, b_name, b) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} ({a.dtype}) and {b_name} ({b.dtype}) must have the same dtype")


# ---- public functions -------------------------------------------------------------------------


def moe_route(
    logits,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = False,
    bias=None,
    n_groups: int = 1,
    topk_groups: int = 1,
    scale: float = 1.0,
    capacity: Optional[int] = None,
    block: int = 1,
) -> MoeRoute:
    """Top-``k`` routing of router ``logits [N, E]`` and the deterministic permutation.

    Scores are ``softmax`` over the E logits of a token or element-wise ``sigmoid``. The
    selection score is score + ``bias[e]`` (``bias`` is used for selection only). With
    ``n_groups`` > 1 the experts form ``n_groups`` contiguous groups; a group is scored by the
    sum of its two best selection scores, the best ``topk_groups`` groups are kept (ties to the
    lower group) and the k experts are chosen inside them (ties to the lower expert). ``sigmoid``
    with no ``bias`` and no group left out compares the logits themselves (the exact scores'
    order; float32 scores saturate at 1 from logits of ~17 and would tie). The weights are the
    unbiased scores of the chosen experts, divided by their sum when ``renormalize`` (exact
    ratios even where the scores underflow, e.g. a sigmoid of -100: finite logits give finite
    weights), then times ``scale``. A NaN selection score ranks below every number: with
    ``sigmoid`` a NaN logit only keeps its expert from being chosen (the weights stay finite),
    with ``softmax`` a NaN logit makes the whole token's scores, and so its weights, NaN (so
    does a ``+inf`` logit: inf − inf, as ``torch.softmax`` gives). A
    token whose logits are all ``-inf`` has NaN ``softmax`` scores (0 / 0, as ``torch.softmax``
    gives): it goes to experts 0..k−1 with NaN weights; under ``sigmoid`` its scores are 0, and
    so are its weights (NaN with ``renormalize``, 0 / 0), its experts chosen by ``bias`` alone
    (0..k−1 without one). Other tokens keep their experts and weights, but such a token still
    takes its experts' rows (``counts``, ``offsets``, ``capacity``) and its NaN weights reach
    their gradients: leave padding tokens out of the batch rather than masking their logits.

    The permuted rows are ordered by expert, then token, then slot. With a ``capacity``, an
    expert keeps its first ``capacity`` tokens in token order; the others are dropped
    (``position`` −1, not in ``counts``). Every expert's segment is padded to a multiple of
    ``block`` (padding rows: ``perm`` −1). Presets: Llama 4 ``k=1, score="sigmoid"`` (and
    ``moe_permute(..., scale=True)``); Qwen3-MoE ``k=8, renormalize=True``; DeepSeek-V3
    ``k=8, score="sigmoid", bias=b, n_groups=8, topk_groups=4, renormalize=True, scale=2.5``.
    """
    lg = _logits(logits)
    n, e = lg.shape
    params = _lib.make_moe_route_params(
        e, k, score, renormalize, n_groups, topk_groups, scale, capacity, block
    )
    k = params.k
    if n * k >= 2**31:
        raise ValueError(f"N·k = {n}·{k} slots do not fit the int32 slot indices of perm")
    b = _bias(bias, e)
    code = _lib.DTYPE_F32 if lg.dtype == np.float32 else _lib.DTYPE_BF16
    lg, stride = _row_layout(lg)
    max_rows = _lib.moe_max_rows(n, e, k, params.block, params.capacity)

    expert_ids = np.empty((n, k), dtype=np.int32)
    weights = np.empty((n, k), dtype=np.float32)
    counts = np.empty(e, dtype=np.int32)
    offsets = np.empty(e + 1, dtype=np.int32)
    perm = np.empty(max_rows, dtype=np.int32)
    position = np.empty((n, k), dtype=np.int32)
    if _POISON:
        for a in (expert_ids, counts, offsets, perm, position):
            a.fill(-7)
        weights.fill(np.nan)
    handle = _lib.context(-1)
    ws_bytes = _lib.moe_route_workspace_size(handle, n, e, k)
    ws = np.empty(ws_bytes, dtype=np.uint8) if ws_bytes else None
    args = _lib.MoeRouteArgs(
        n=n, e=e, logits=_ptr(lg), logits_dtype=code, logits_stride=stride, bias=_ptr(b),
        expert_ids=_ptr(expert_ids), weights=_ptr(weights), counts=_ptr(counts),
        offsets=_ptr(offsets), perm=_ptr(perm), perm_rows=max_rows, position=_ptr(position),
    )
    _lib.moe_route_call(handle, args, params, _ptr(ws), ws_bytes, None)
    num_rows = int(offsets[e])
    return MoeRoute(
        expert_ids=expert_ids, weights=weights, counts=counts, offsets=offsets,
        perm=perm[:num_rows], position=position, n=n, e=e, k=k, num_rows=num_rows,
        perm_full=perm,
    )


def moe_permute(x, route: MoeRoute, scale: bool = False, *, weights=None) -> np.ndarray:
    """Gathers token rows into expert order: ``out[r] = x[perm[r] // k]`` (times the slot's
    weight when ``scale``, as Llama 4 scales the expert input), zero rows for padding.

    ``x`` is ``[N, H]``; the result is ``[R, H]`` in x's dtype. ``weights`` overrides
    ``route.weights``."""
    r = _R(route)
    scale = _flag("scale", scale)
    _only_with("scale", scale, "weights", weights)
    x, stride, code = _token_rows("x", x, r)
    w = r.weights(weights) if scale else None
    return _permute(x, stride, code, r, w, r.num_rows, "moe_permute")


def moe_combine(expert_out, route: MoeRoute, weighted: bool = True, *, weights=None) -> np.ndarray:
    """Sums each token's expert rows: ``y[n] = Σ_j w[n, j] · expert_out[position[n, j]]``
    (``weighted=False``: w = 1), dropped slots skipped, accumulated in slot order (in float32 on
    CUDA, float64 on this CPU reference) and rounded once (bitwise reproducible).

    ``expert_out`` is ``[R, H]`` in permuted order (a buffer of up to ``route.max_rows`` rows is
    accepted too: rows past R are ignored); the result is ``[N, H]`` in its dtype."""
    r = _R(route)
    weighted = _flag("weighted", weighted)
    _only_with("weighted", weighted, "weights", weights)
    eo, stride, code = _activations("expert_out", expert_out)
    r.rows_of("expert_out", eo)
    w = r.weights(weights) if weighted else None
    return _combine(eo, stride, code, r, w, "moe_combine")


def moe_permute_backward(
    grad_xp, route: MoeRoute, x=None, scale: bool = False, *, weights=None
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Gradient of :func:`moe_permute`: given ``grad_xp = dL/d(permuted rows) [R, H]``, returns
    ``grad_x [N, H]`` (an unweighted combine), or with ``scale=True`` (which needs the forward
    input ``x``) the pair ``(grad_x, grad_weights)`` where grad_x is the weighted combine and
    ``grad_weights[n, j] = <x[n], grad_xp[position[n, j]]>`` (float32 ``[N, k]``, 0 for dropped
    slots)."""
    r = _R(route)
    scale = _flag("scale", scale)
    _only_with("scale", scale, "weights", weights)
    _only_with("scale", scale, "x", x)
    g, g_stride, code = _activations("grad_xp", grad_xp)
    r.rows_of("grad_xp", g)
    if not scale:
        return _permute_backward(g, g_stride, code, r, None, None, 0)[0]
    if x is None:
        raise ValueError(
            "moe_permute_backward(scale=True) needs x, the forward input (the weights' gradient "
            "is <x[n], grad_xp[position[n, j]]>)"
        )
    xa, x_stride, _ = _token_rows("x", x, r, g.shape[1])
    _same_dtype("x", xa, "grad_xp", g)
    return _permute_backward(g, g_stride, code, r, r.weights(weights), xa, x_stride)


def moe_combine_backward(
    grad_y, expert_out, route: MoeRoute, weighted: bool = True, *, weights=None
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Gradient of :func:`moe_combine`: given ``grad_y = dL/dy [N, H]``, returns
    ``(grad_expert_out, grad_weights)``: ``grad_expert_out[r] = w · grad_y[token of r]`` (a
    permute scaled by the weights; zero rows for padding), with as many rows as ``expert_out``,
    and ``grad_weights[n, j] = <grad_y[n], expert_out[position[n, j]]>`` (float32 ``[N, k]``,
    0 for dropped slots), None when ``weighted=False`` (``expert_out`` may then be None: the
    result has R rows)."""
    r = _R(route)
    weighted = _flag("weighted", weighted)
    _only_with("weighted", weighted, "weights", weights)
    g, g_stride, code = _token_rows("grad_y", grad_y, r)
    if expert_out is None:
        if weighted:
            raise ValueError(
                "moe_combine_backward(weighted=True) needs expert_out (the weights' gradient is "
                "<grad_y[n], expert_out[position[n, j]]>)"
            )
        return _combine_backward(g, g_stride, code, r, None, None, 0, r.num_rows)
    eo, eo_stride, _ = _activations("expert_out", expert_out, g.shape[1])
    rows = r.rows_of("expert_out", eo)
    _same_dtype("grad_y", g, "expert_out", eo)
    if not weighted:
        return _combine_backward(g, g_stride, code, r, None, None, 0, rows)
    return _combine_backward(g, g_stride, code, r, r.weights(weights), eo, eo_stride, rows)
