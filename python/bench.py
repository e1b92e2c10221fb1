#!/usr/bin/env python3
"""GPU benchmark of the token-level divergence (forward + backward) and of the MoE dispatch
(route, permute, combine, forward and backward), against what users would pick.

    python python/bench.py                 # shapes of ANCHORS.md (divergence and MoE)
    python python/bench.py --quick         # smaller shapes, for a smoke run
    python python/bench.py --shapes 4096x151936,16384x151936 --kinds forward_kl --json out.json
    python python/bench.py --ops moe_route,moe_permute,moe_combine --impls distill_kernels

``--ops`` picks among divergence, moe_route, moe_permute, moe_combine (``moe`` = the three MoE
ones; default: divergence and moe), fused and attention. They run in the order MoE, divergence,
fused, attention: MoE takes seconds, the divergence (torch.compile at every shape) minutes, so a
run cut off at its time limit loses the slow rows, not the quick ones.

Timing: medians of CUDA events around each call, from bench.py's own loop (not
triton.testing.do_bench: its L2 flush zeroes a 256 MB buffer right before the start event, and up
to an L2's worth of those dirty lines, 50-60 MB, is then written back inside the timed call).
Before every timed call the loop zeroes one 256 MB buffer and then sums a second one into a
single element, a read pass that evicts the dirty lines (their write-back happens there) and
leaves L2 holding clean lines only; every implementation is timed alike, and so is the copy
bandwidth of the floors. A call's first timed run sizes the rest: about 100 ms of calls, at least
MIN_SAMPLES; calls of SLOW_CALL_MS (100 ms) or more take SLOW_SAMPLES (3) samples, that first
one included, and no other warm-up (they already ran untimed to give the errors and the memory).

Verdict: every row of this crate (implementation distill_kernels...) gets ok or FAIL in the last
column. FAIL: it raised (OOM included), an error is not finite or above DESIGN.md's tolerance
(‖x − ref‖ / ‖ref‖ ≤ 1e-2 for bf16 / f16 outputs, ≤ 1e-4 for a loss accumulated in f32 from 16-bit
inputs, ≤ 1e-5 for f32 paths; a MoE route choosing other experts than a stable sort's for any
token), an error it should have has no value (no reference), or two runs gave different bits.
The other implementations' failures (eager OOM, a Liger convention mismatch, torch.compile)
are informational rows. Each row is printed (stdout, flushed) and the JSON rewritten as soon as
it is measured, so a run stopped at its limit keeps the rows it finished ("finished": false in
the JSON until the end). After the tables a last line lists the failures; the exit status is 1
when there is one, 0 otherwise (2: no CUDA device).

Grouped-query attention (``--ops attention``; ANCHORS.md "Grouped-query attention"): bf16,
causal, D = 128, B = 4, S = 4096, Hq / Hkv = 24 / 8 (Phi-4-mini) and B = 1, S = 16384, 40 / 8
(Llama 4); ``--quick``: B = 2, S = 2048 and B = 1, S = 4096. Rows, forward and forward +
backward (torch.autograd.grad of q, k, v): SDPA's flash backend (FlashAttention-2), SDPA's cuDNN
backend (both on [B, H, S, D] copies of the inputs, GQA through enable_gqa=True, or K / V
expanded with repeat_interleave inside the timed call when a backend refuses it: the row says so
and the expansion is timed alone too) and this crate (distill_kernels.torch.attention on
[B, S, H, D]; deterministic, and forward + backward again with deterministic=False, dQ summed
by f32 atomics as FlashAttention-2 does). Each gives the time, TFLOP/s counted as ANCHORS.md does (4·B·Hq·S²·D / 2 forward,
× 3.5 forward + backward), the ratio to the flash backend measured in the same run, the extra
peak memory of one timed call, and the errors of out and of dq / dk / dv on one (sequence, KV
head) slice against a float64 computation (chunked over queries). After the other rows of a
shape the flash backend is timed once more ("SDPA flash (FA2), again"): its ratio to the first
measurement is the drift of the reference over the run (clocks, temperature). The environment
switches DK_ATTENTION_FWD / DK_ATTENTION_BWD = mma|wide|wgmma select this crate's kernel family
for A/B rows (unset: the wgmma kernels on compute capability 9.0, mma.sync elsewhere).

Fused linear JSD (``--ops fused``; ANCHORS.md "Fused linear JSD"): bf16 hidden states and lm_head
weights, JSD beta = 0.5, N = 4096, H = 3072, V = 200064 (Phi-4-mini head) and N = 16384, H = 5120,
V = 202048 (Llama 4 Scout head; an OOM becomes a row). Rows, in the order they run: for each
shape the four cuBLAS GEMMs (torch.matmul: student logits, teacher logits, grad of hidden, grad
of weight) timed in the same run as the floor, and this crate (bf16 grads, f32 grads, and chunks
sized for issue 4's 2 GiB: see fused_2gib_chunk); then, for each shape again, the baselines,
slowest last: torch eager (matmul + TRL's JSD + autograd), Liger LigerFusedLinearJSD
(shift_labels=None) and the chunked LigerFusedLinearJSDLoss (compiled, chunk 1024,
weight_hard_loss=0 and weight_soft_loss=1: the JSD alone, no cross-entropy; timed uncompiled, and
labelled so, when torch.compile fails) when importable. This crate's rows come first so that a
run cut off at its time limit still has them.
Each Liger variant (here and for the divergence) is first run on a small float32 probe
and compared with the float64 value of our quantity; one that computes something else gets an
error row saying so (the mapping of Liger's conventions to ours is written above
_liger_checked in the source). The Liger version and the implementation its dispatcher picks
for the JSD kernel (Triton, CuTe DSL, ...) are logged and kept in the JSON's meta.
Each gives the time, its ratio to the four GEMMs, the extra peak memory of one forward + backward
with the gradients of hidden and weight and without them (the gradient buffers the row returns
subtracted: f32 ones for the f32-grads row; issue 4's 2 GiB, where grad_weight alone is 1.93 GiB
at the Scout shape), and the relative errors ‖x − ref‖ / ‖ref‖ of the loss and of both whole
gradients against a chunked fp32 PyTorch computation on the same inputs.

For every shape, logits dtype (--dtypes: bf16 by default, f32), pass (--passes: fwd+bwd by
default, fwd = forward only, under torch.no_grad()) and kind (--kinds: forward_kl and jsd with
beta = 0.5 by default, reverse_kl) it times:

- torch eager:   log_softmax (in float32) + F.kl_div, as TRL's generalized_jsd_loss computes each
                 kind (beta 0: kl_div(student, teacher); beta 1: kl_div(teacher, student), the
                 gradient through the target; else its JSD formula)
- torch.compile: the same functions compiled
- Liger-Kernel:  LigerKLDIVLoss (forward_kl) / LigerJSD (jsd; reverse_kl = LigerJSD(beta=1), as
                 its docstring maps it) plus the log_softmax they need (when importable)
- this crate:    distill_kernels.torch.divergence

and reports the time, the fraction of the floor (3 * N * V * e bytes forward + backward, 2 * N *
V * e forward only, e = 2 for bf16 logits and 4 for f32, over the device-to-device copy
bandwidth measured in this run), the extra peak memory of one call (the gradient included), for
issue 3's "at most 64 bytes per row beyond inputs and outputs" the same peak without the
gradient, in bytes per row, beside this crate's own workspace per row
(dk_divergence_workspace_size), and two errors against a float64 reference, both relative norms
‖x − ref‖ / ‖ref‖ (not maximum errors): the batchmean loss over all N rows, and (forward +
backward) the gradient on --sample-rows rows (default 4) only, drawn by torch.randperm(N) under
the seed --seed + N + V (printed under the table's floors). Failures (OOM included) become rows
of the table instead of stopping the run.
Two more rows per shape and kind time this crate as a trainer calls it, on the lm_head's output
(an intermediate tensor) with the gradient taken by torch.autograd.grad: with a separate gradient
and with grad_inplace=True (the gradient written over the logits: no [N, V] allocation). The
logits are refilled from the kept student before every run, outside the CUDA events, and their
extra peak memory leaves the kept copy out (run_logits_rows). With ``--impls ...,num_items``
(opt-in) two more: this crate with num_items as a device tensor (folded into the gradient by
the kernels) and its summed loss divided by that tensor by hand (backward then scales the whole
gradient), both dividing by N as the plain row's batchmean does (num_items_impls).

MoE dispatch (bf16 activations; ANCHORS.md, "MoE dispatch in plain PyTorch"):

- route: N = 16384 router logits (bf16) over E = 128 experts, k = 8, softmax, renormalised, every
  output (ids, weights, counts, offsets, permutation, positions). torch eager = softmax + topk +
  stable argsort + bincount/cumsum + scatter of the positions.
- permute / combine, forward and backward, for the three shapes of ANCHORS.md's MoE table
  (Llama 4 Scout 16384 x 5120, E 16, top-1 sigmoid; Llama 4 Maverick 16384 x 5120, E 128, top-1
  sigmoid; Qwen3-MoE 16384 x 2048, E 128, top-8 softmax renormalised). Permute is unscaled,
  combine weighted. torch eager = x.index_select (permute), index_add of the weighted rows
  (combine), and the ops their autograd runs for the backward (index_add for index_select;
  gather + multiply + row sums for the weighted combine), all through torch.autograd.grad.
  distill_kernels = distill_kernels.torch.moe_permute / moe_combine, backward through autograd.

Each MoE row gives the time and the fraction of its memory floor: the minimal bytes, every
operand read once and every result written once (R = N·k permuted rows, bf16), over the copy
bandwidth measured in the same run:
  permute forward  (N + R)·H·2     combine forward  (R + N)·H·2   (+ weights)
  permute backward (R + N)·H·2     combine backward (N + 2R)·H·2  (grad_y, expert_out; grad rows)
  route            N·E·2 + 16·N·k  (logits; ids, weights, positions, permutation)
Note: ANCHORS.md's 94 % for the Qwen3-MoE permute counts R rows read (2·R·H·2 bytes); with the
minimal floor above the same time is about 52 %. The error column compares with a float32
computation of the same math on the same routing; "bitwise" says whether two runs of
distill_kernels gave identical bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the benchmark needs torch
    print("bench.py needs torch (with CUDA)", file=sys.stderr)
    sys.exit(2)

FULL_SHAPES = [(4096, 151936), (4096, 202048)]
QUICK_SHAPES = [(1024, 151936), (512, 202048)]
BETA = 0.5
GIB = 1024**3
FUSED_CHUNK_DEFAULT = 1024  # Liger chunked loss chunk size, as in ANCHORS.md


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- timing -------------------------------------------------------------------------------------


# Timed calls a median takes at least, below SLOW_CALL_MS: about rep_ms / (one call's time) calls
# would leave a 60 ms call with one or two samples.
MIN_SAMPLES = 8
# Calls this slow (LigerFusedLinearJSD at the Scout shape: ~1.2 s) take SLOW_SAMPLES timed samples
# and nothing more: at MIN_SAMPLES each they alone would use up a gpu-check step's time limit.
SLOW_CALL_MS = 100.0
SLOW_SAMPLES = 3
FLUSH_BYTES = 256 << 20  # > 4 × the 50-60 MB L2 of an H100 / H200


class L2Flush:
    """Empties L2 before a timed call, leaving no dirty lines in it.

    Zeroing a buffer larger than L2 (what triton.testing.do_bench does) evicts every line of the
    previous call, but leaves L2 full of the zeros' dirty lines, which are written back to DRAM
    while the next timed call runs: up to 50-60 MB of writes charged to it, a visible bias at
    N = 256 (floor ~55 µs) and for the MoE permute / combine. After the zeroing a read pass over a
    second buffer (summed into one element) evicts those lines, their write-back happening there,
    outside the timed events, and leaves only clean lines, which cost nothing to evict."""

    def __init__(self, nbytes: int = FLUSH_BYTES, device="cuda"):
        n = nbytes // 4
        self.dirty = torch.empty(n, dtype=torch.int32, device=device)
        self.clean = torch.ones(n, dtype=torch.float32, device=device)  # read only, from here on
        self.sink = torch.empty((), dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.dirty.zero_()
        torch.sum(self.clean, dim=0, out=self.sink)


_FLUSH = None


def l2_flush() -> None:
    """The L2 flush of every timed call (one L2Flush, made on first use: 512 MB of the card)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = L2Flush()
    _FLUSH()


def _one_call_ms(fn, setup=None) -> float:
    """One warm call of fn, timed with CUDA events after an L2 flush (the estimate that sizes the
    repetitions, and a sample of its own for a slow call); ``setup()``, when given, runs before
    each of the two calls outside the events."""
    setup = setup or (lambda: None)
    setup()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    setup()
    l2_flush()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end), 1e-3)


def _events_median(fn, warmup_ms: float, rep_ms: float, setup=None) -> float:
    """Median time in ms of fn(), with CUDA events around each call and an L2 flush before each
    (outside the events); ``setup()``, when given, runs before every call (warm-up included),
    before the flush. The events are read once, after the last call: no host synchronisation
    between calls, so the GPU never idles between a start event and the call's first kernel."""
    setup = setup or (lambda: None)
    est = _one_call_ms(fn, setup)
    if est >= SLOW_CALL_MS:
        times, warm, reps = [est], 0, SLOW_SAMPLES - 1
    else:
        times, warm = [], max(1, int(warmup_ms / est))
        reps = max(MIN_SAMPLES, min(1000, int(rep_ms / est)))
    for _ in range(warm):
        setup()
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        setup()
        l2_flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times += [start.elapsed_time(end) for start, end in events]
    return statistics.median(times)


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median ms of fn() (see _events_median); every row of every table is timed by it."""
    return _events_median(fn, warmup_ms, rep_ms)


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device-to-device copy rate in bytes/s (bytes read + written)."""
    n = int(gib * GIB) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * n * 2 / (ms * 1e-3)


def extra_peak_bytes(step) -> int:
    """Bytes allocated at the peak of one ``step()`` beyond what was allocated before it (CUDA;
    what step returns is kept until the peak is read)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kept = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del kept
    return peak - base


def extra_peak_gib(step) -> float:
    """extra_peak_bytes in GiB."""
    return extra_peak_bytes(step) / GIB


# ---- the implementations --------------------------------------------------------------------


def eager_kl(s, t):
    """torch eager: KL(teacher || student), batchmean, log-probs in float32."""
    ls = F.log_softmax(s.float(), dim=-1)
    lt = F.log_softmax(t.float(), dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True)


def eager_reverse_kl(s, t):
    """torch eager: KL(student || teacher), batchmean, log-probs in float32: TRL's
    generalized_jsd_loss at beta = 1 (F.kl_div with the student's log-probs as the target, its
    gradient taken through the target)."""
    ls = F.log_softmax(s.float(), dim=-1)
    lt = F.log_softmax(t.float(), dim=-1)
    return F.kl_div(lt, ls, reduction="batchmean", log_target=True)


def eager_jsd(s, t, beta=BETA):
    """TRL's generalized_jsd_loss (batchmean, no labels), log-probs in float32."""
    ls = F.log_softmax(s.float(), dim=-1)
    lt = F.log_softmax(t.float(), dim=-1)
    b = torch.tensor(beta, dtype=ls.dtype, device=ls.device)
    lm = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
    kl_t = F.kl_div(lm, lt, reduction="none", log_target=True)
    kl_s = F.kl_div(lm, ls, reduction="none", log_target=True)
    jsd = beta * kl_t + (1 - beta) * kl_s
    return jsd.sum() / jsd.size(0)


EAGER = {"forward_kl": eager_kl, "reverse_kl": eager_reverse_kl, "jsd": eager_jsd}
# Each kind as our jsd(β) (DESIGN.md: β = 0 is the forward KL, β = 1 the reverse KL).
KIND_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": BETA}
# --dtypes: the logits dtypes a run may ask for, by their short names (issue 3's two). Not f16:
# its gradient entries, about (q - p) / N, mostly lie below f16's smallest value at these
# shapes, so every implementation's gradient error against f64 would be ~0.3, a verdict on the
# dtype rather than the kernel.
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
# --passes: forward + backward (the gradient of the student logits) and forward only.
PASSES = ("fwd+bwd", "fwd")


def make_impls(kinds, device="cuda", wanted=None):
    """{(impl, kind): callable(s, t) -> scalar loss, or an Exception explaining its absence}.
    The Liger callables are checked on a small probe on ``device`` first (see _liger_checked)."""
    impls = {}
    for kind in kinds:
        impls[("torch eager", kind)] = EAGER[kind]
    try:
        # One compiled graph per shape, dtype and pass (dynamic=False; grad mode is guarded):
        # past dynamo's recompile limit (8) a call would run eagerly under this row's name.
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        compiled = {k: torch.compile(EAGER[k], dynamic=False) for k in kinds}
        for kind in kinds:
            impls[("torch.compile", kind)] = compiled[kind]
    except Exception as e:  # noqa: BLE001
        for kind in kinds:
            impls[("torch.compile", kind)] = e
    try:
        liger = _liger_divergence_fns()
    except Exception as e:  # noqa: BLE001
        liger = {k: ImportError(f"liger-kernel not importable: {e}") for k in kinds}
    for kind in kinds if not wanted or any(w in "liger" for w in wanted) else ():
        fn = liger[kind]
        if not isinstance(fn, Exception):
            try:  # a wrong convention becomes the row's error, not a silently wrong number
                fn = _liger_checked(fn, _divergence_probe(kind, device))
            except Exception as e:  # noqa: BLE001
                fn = e
        impls[("Liger", kind)] = fn
    try:
        import distill_kernels.torch as dkt

        for kind in kinds:
            impls[("distill_kernels", kind)] = (
                lambda s, t, kind=kind: dkt.divergence(s, t, kind=kind, beta=BETA)
            )
        if wanted and any("num_items" in w for w in wanted):
            impls.update(num_items_impls(dkt, kinds))
    except Exception as e:  # noqa: BLE001
        for kind in kinds:
            impls[("distill_kernels", kind)] = e
    return impls


# ---- num_items as a device tensor (opt-in: --impls distill_kernels,num_items) -------------------
#
# A trainer's token count (Hugging Face's num_items_in_batch) is a tensor on the device. This crate
# reads it in its kernels and folds it into the gradient, so its row should time as the plain
# row: 3 N·V passes. Dividing the summed loss by the tensor by hand, what a trainer would write
# around a loss without that option, makes backward scale the whole gradient (grad_output ≠ 1):
# 5 passes. Both divide by N, the plain row's batchmean divisor (no labels), so the reference is
# the same; the count is filled on the device by each call (a fill kernel, no host copy).


def num_items_impls(dkt, kinds):
    """{(impl, kind): callable(s, t) -> loss}: this crate with num_items as a device tensor, and
    the summed loss divided by that tensor by hand."""
    def count(s):
        return torch.full((), s.shape[0], dtype=torch.float32, device=s.device)

    impls = {}
    for kind in kinds:
        impls[("distill_kernels num_items tensor", kind)] = (
            lambda s, t, kind=kind: dkt.divergence(s, t, kind=kind, beta=BETA, num_items=count(s)))
        impls[("distill_kernels sum / num_items tensor", kind)] = (
            lambda s, t, kind=kind: dkt.divergence(s, t, kind=kind, beta=BETA, reduction="sum")
            / count(s))
    return impls


# ---- Liger-Kernel: its calls, and its conventions checked against ours --------------------------
#
# Mapping (liger-kernel 0.8.5, read from its source and checked on CPU against the numpy face of
# this crate, loss and both gradients equal to ~1e-7 relative in f32 for β ∈ {0, 0.2, 0.5, 0.9, 1},
# T ∈ {1, 2}, with and without ignored labels):
#
# - LigerKLDIVLoss(reduction="batchmean", log_target=True)(log q, log p), log q = student
#   log-probs, log p = teacher: Σ exp(log p)·(log p − log q) / BT (ops/kl_div.py) = our
#   forward_kl, batchmean.
# - LigerJSD(beta=β)(log q, log p) (student first): β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q,
#   β = 0 forward KL, β = 1 reverse KL, divided by the rows whose shift_labels are not
#   ignore_index (all rows without labels) (ops/jsd.py `_jsd_kernel`) = our jsd(β), batchmean.
#   The same β as ours, despite the docstring's JSD(P‖Q) with P = teacher written second.
# - LigerFusedLinearJSD(jsd_beta=β, ignore_index, temperature=T)(student_input, student_weight,
#   teacher_input, teacher_weight, shift_labels): the same `_jsd_kernel` on log_softmax of fp32
#   logits / T, summed, divided by the non-ignored rows. `shift_labels` is a required positional
#   argument in 0.8.5 (no default): None means no label mask (÷ BT). = our jsd(β, T) batchmean,
#   with labels = shift_labels. No T² factor (neither has one).
# - LigerFusedLinearJSDLoss(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature,
#   compiled, chunk_size)(student_input, student_weight, teacher_input, teacher_weight,
#   true_labels) (chunked_loss/jsd_loss.py, fused_linear_distillation.py) returns
#   weight_hard_loss · CE(student, true_labels) + weight_soft_loss · JSD, both summed over the rows
#   whose label is not ignore_index and divided by their count; defaults 0.5 / 0.5. Its JSD is ours
#   (β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q, logits / T, no T²). So ours =
#   weight_hard_loss=0.0, weight_soft_loss=1.0 (the CE is then not even computed), with
#   true_labels = our labels (any valid token id, e.g. 0, when there are none). The old call
#   (defaults, labels 0) returned 0.5·CE + 0.5·JSD: about 14× the JSD at V = 200064, where the CE
#   of random logits is ≈ ln V + 2. Its logits stay in the input dtype (bf16 here), so its errors
#   against the fp32 reference are those of bf16 logits.
#
# Each Liger callable is run once on a small float32 probe on the benchmark's device before it is
# timed and compared with the float64 value of our quantity (loss and gradients). A version whose
# result is our loss summed instead of averaged over rows is divided by N (the row says so);
# anything else becomes an error row that gives both numbers, never a silently wrong one.

LIGER_PROBE_FUSED = (48, 32, 300)  # N, H, V
LIGER_PROBE_DIV = (16, 300)  # N, V
PROBE_LOSS_TOL = 1e-3
PROBE_GRAD_TOL = 2e-2


class ConventionError(RuntimeError):
    """A Liger variant computes something other than this crate's quantity."""


def _f64_rows(ls, lt, beta):
    """Per-row divergence in float64 from log-probs (student, teacher): our jsd(β), with β = 0 the
    forward KL and β = 1 the reverse KL (DESIGN.md)."""
    if beta == 0.0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if beta == 1.0:
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _fused_f64(hs, ws, ht, wt, beta=BETA, temperature=1.0, labels=None, ignore_index=-100):
    """Our fused linear jsd(β) in float64 on small inputs: (loss, grad_hidden, grad_weight),
    batchmean over the rows whose label is not ignore_index."""
    a = hs.detach().double().requires_grad_(True)
    b = ws.detach().double().requires_grad_(True)
    ls = F.log_softmax(a @ b.T / temperature, -1)
    lt = F.log_softmax(ht.double() @ wt.double().T / temperature, -1)
    rows = _f64_rows(ls, lt, beta)
    if labels is not None:
        valid = labels != ignore_index
        rows = rows * valid
        count = max(1, int(valid.sum()))
    else:
        count = hs.shape[0]
    loss = rows.sum() / count
    ga, gb = torch.autograd.grad(loss, (a, b))
    return loss.item(), ga, gb


def _probe_rel(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def _fused_probe(device, seed=1234):
    """(run(fn) -> (loss, [grads]), (ref loss, [ref grads]), N) for a fused-linear callable
    fn(hs, ws, ht, wt) on a small float32 problem on ``device``."""
    n, h, v = LIGER_PROBE_FUSED
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))
    ht = torch.randn(n, h, generator=g)
    wt = torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))
    ref_loss, rgh, rgw = _fused_f64(hs, ws, ht, wt)
    hs, ws, ht, wt = (x.to(device) for x in (hs, ws, ht, wt))

    def run(fn):
        a = hs.clone().requires_grad_(True)
        b = ws.clone().requires_grad_(True)
        loss = fn(a, b, ht, wt)
        loss.backward()
        return float(loss.detach().reshape(())), [a.grad, b.grad]

    return run, (ref_loss, [rgh, rgw]), n


def _divergence_probe(kind, device, seed=1234):
    """The same for a divergence callable fn(student logits, teacher logits)."""
    n, v = LIGER_PROBE_DIV
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 2
    t = torch.randn(n, v, generator=g) * 2
    beta = KIND_BETA[kind]
    x = s.double().requires_grad_(True)
    loss = _f64_rows(F.log_softmax(x, -1), F.log_softmax(t.double(), -1), beta).sum() / n
    (gx,) = torch.autograd.grad(loss, x)
    s, t = s.to(device), t.to(device)

    def run(fn):
        x = s.clone().requires_grad_(True)
        out = fn(x, t)
        out.backward()
        return float(out.detach().reshape(())), [x.grad]

    return run, (loss.item(), [gx]), n


def _liger_checked(fn, probe, probe_fn=None):
    """fn itself when it computes our quantity on the probe; fn / N when it computes our quantity
    summed over rows (its ``note`` says so); else ConventionError with both numbers. ``probe_fn``
    (same math, e.g. without torch.compile) is what runs on the probe; default fn."""
    run, (ref_loss, ref_grads), n = probe
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # the probe is float32: compare exactly
        loss, grads = run(probe_fn or fn)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32

    def errs(scale):
        le = abs(loss * scale - ref_loss) / abs(ref_loss)
        ge = max(_probe_rel(g * scale, r) if g is not None else float("inf")
                 for g, r in zip(grads, ref_grads))
        return le, ge

    le, ge = errs(1.0)
    if le <= PROBE_LOSS_TOL and ge <= PROBE_GRAD_TOL:
        fn.note = "convention checked"
        return fn
    le_n, ge_n = errs(1.0 / n)
    if le_n <= PROBE_LOSS_TOL and ge_n <= PROBE_GRAD_TOL:
        def per_row(*a, _fn=fn):
            return _fn(*a) / a[0].shape[0]

        per_row.note = "summed over rows: ÷ N"
        return per_row
    raise ConventionError(
        f"not our quantity: on a {n}-row f32 probe its loss {loss:.5g} vs ours {ref_loss:.5g} "
        f"(ratio {loss / ref_loss:.4g}), grad rel err {ge:.2g}")


def _liger_divergence_fns():
    """{kind: fn(student logits, teacher logits) -> batchmean loss} through Liger (its kernels take
    log-probs: the log_softmax in float32 is part of the timed call)."""
    from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

    liger_kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    liger_jsd = LigerJSD(beta=BETA)  # same β as ours (see the mapping above)

    def liger_kl_fn(s, t):
        return liger_kl(F.log_softmax(s.float(), dim=-1), F.log_softmax(t.float(), dim=-1))

    def liger_jsd_fn(s, t):
        return liger_jsd(F.log_softmax(s.float(), dim=-1), F.log_softmax(t.float(), dim=-1))

    fns = {"forward_kl": liger_kl_fn, "jsd": liger_jsd_fn}
    try:  # a version that refuses β = 1 loses this row only
        liger_rkl = LigerJSD(beta=1.0)  # β = 1: the reverse KL (its docstring; the probe checks)

        def liger_rkl_fn(s, t):
            return liger_rkl(F.log_softmax(s.float(), dim=-1), F.log_softmax(t.float(), dim=-1))

        fns["reverse_kl"] = liger_rkl_fn
    except Exception as e:  # noqa: BLE001
        fns["reverse_kl"] = e
    return fns


def liger_info():
    """What Liger-Kernel runs here: {"version", "ops", "jsd_loss_and_grad"} (values are strings,
    "unknown (...)" where the installed version does not say).

    In liger-kernel 0.8.5 two things choose its kernels. liger_kernel.ops replaces its Function
    classes (LigerJSDFunction, LigerKLDivLossFunction, LigerFusedLinearJSDFunction, ...) with an
    implementation's when one is the default for the device or named by LIGER_KERNEL_IMPL
    ("ops": none on CUDA unless asked, the Triton kernels). Inside them, LigerJSD and
    LigerFusedLinearJSD compute their per-chunk loss and gradient through the dispatcher
    (liger_kernel.backends.dispatch, op "jsd_loss_and_grad"), which takes the available
    implementation of best rank: "nvidia-cutedsl" (CuTe DSL, sm_90+, needs the cutlass package)
    before "nvidia-triton". LigerKLDIVLoss calls its Triton kernel directly; the chunked
    LigerFusedLinearJSDLoss is PyTorch (torch.compile when compiled=True)."""
    info = {}
    try:
        from importlib import metadata

        info["version"] = metadata.version("liger-kernel")
    except Exception as e:  # noqa: BLE001
        info["version"] = f"unknown ({_one_line(e, 80)})"
    try:
        import liger_kernel.ops  # noqa: F401  (runs its implementation selection)
        from liger_kernel.ops.backends import LIGER_KERNEL_IMPL_ENV, select_impl
        from liger_kernel.utils import infer_device

        explicit = os.environ.get(LIGER_KERNEL_IMPL_ENV, "").strip().lower() or None
        chosen = select_impl(infer_device(), explicit=explicit)
        info["ops"] = chosen.name if chosen is not None else "default (Triton)"
    except Exception as e:  # noqa: BLE001
        info["ops"] = f"unknown ({_one_line(e, 80)})"
    try:
        from liger_kernel.backends.dispatch import resolve_impl

        info["jsd_loss_and_grad"] = resolve_impl("jsd_loss_and_grad").impl_name
    except Exception as e:  # noqa: BLE001
        info["jsd_loss_and_grad"] = f"unknown ({_one_line(e, 80)})"
    return info


def fmt_liger(info) -> str:
    return (f"{info.get('version')}; Function classes: {info.get('ops')}; LigerJSD / "
            f"LigerFusedLinearJSD per-chunk kernel (jsd_loss_and_grad): "
            f"{info.get('jsd_loss_and_grad')}; LigerKLDIVLoss: its Triton kernel; chunked "
            "loss: PyTorch")


LIGER_FUSED = "Liger LigerFusedLinearJSD"
LIGER_CHUNKED = "Liger chunked LigerFusedLinearJSDLoss"


def _liger_fused_fns(compiled=True, chunk=FUSED_CHUNK_DEFAULT):
    """{name: (fn(hs, ws, ht, wt) -> our batchmean jsd(BETA), probe fn or None) or Exception}:
    both Liger fused-linear variants, called so that they compute our quantity (mapping above).
    The probe fn of the chunked loss is the same loss without torch.compile (same math; a probe
    shape would only cost the compiled one a recompilation)."""
    out = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        lj = LigerFusedLinearJSD(jsd_beta=BETA, ignore_index=-100, temperature=1.0)

        def liger_fused(hs, ws, ht, wt):
            return lj(hs, ws, ht, wt, None)  # shift_labels=None: no label mask, ÷ N

        out[LIGER_FUSED] = (liger_fused, None)
    except Exception as e:  # noqa: BLE001
        out[LIGER_FUSED] = ImportError(f"not importable: {e}")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        def make(comp):
            lc = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA,
                                         ignore_index=-100, temperature=1.0, compiled=comp,
                                         chunk_size=chunk)

            def liger_chunked(hs, ws, ht, wt):
                # true_labels only mask rows here (no hard loss): all valid
                labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
                return lc(hs, ws, ht, wt, labels)

            return liger_chunked

        out[LIGER_CHUNKED] = (make(compiled), make(False) if compiled else None)
    except Exception as e:  # noqa: BLE001
        out[LIGER_CHUNKED] = ImportError(f"not importable: {e}")
    return out


# ---- float64 reference ----------------------------------------------------------------------


def reference(s, t, kind, rows, chunk=128):
    """(batchmean loss over all rows, {row: d(loss)/d(student row)}) in float64, chunked."""
    n = s.shape[0]
    total = 0.0
    for i in range(0, n, chunk):
        total += _ref_rows(s[i : i + chunk], t[i : i + chunk], kind)[0].sum().item()
    sel = torch.tensor(rows, device=s.device)
    _, g = _ref_rows(s[sel], t[sel], kind, grad=True)
    return total / n, g / n


def _ref_rows(s, t, kind, grad=False):
    s = s.double().requires_grad_(grad)
    rows = _f64_rows(F.log_softmax(s, dim=-1), F.log_softmax(t.double(), dim=-1), KIND_BETA[kind])
    if not grad:
        return rows.detach(), None
    (g,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), g


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


# ---- verdicts: this crate's rows against DESIGN.md's tolerances ---------------------------------
#
# DESIGN.md "Numerics and tests": ‖out − ref‖ / ‖ref‖ against the reference, f32 paths ≤ 1e-5,
# bf16 / f16 outputs ≤ 1e-2 and the loss (accumulated in f32 from 16-bit inputs) ≤ 1e-4; NaN
# never passes. Issue 4 asks the fused gradients within the bf16 tolerance of an fp32 PyTorch
# reference, which is what the fused rows compare with. The route's error is the fraction of
# tokens whose experts differ from a stable sort's (ties to the lower expert, issue 5): exact.

TOL_16BIT = 1e-2
TOL_LOSS_16BIT = 1e-4
TOL_F32 = 1e-5
TOL_ROUTE = 0.0
SECTIONS = ("moe", "results", "fused", "attention")  # the JSON's keys, in the order they run


# --deadline: past it the other implementations' rows are skipped (this crate's still run), so a
# time limit cuts baselines, not this crate's rows. Absolute time.time(); None: no deadline.
_DEADLINE = None
SKIPPED_PAST_DEADLINE = "skipped: past --deadline (this crate's rows still ran)"


def past_deadline() -> bool:
    return _DEADLINE is not None and time.time() > _DEADLINE


def is_ours(row) -> bool:
    """Whether a row is this crate's (its implementation name starts with distill_kernels)."""
    return str(row.get("impl", "")).startswith("distill_kernels")


def dtype_name(dtype) -> str:
    """A dtype's name as rows record it ("bfloat16", "float32"), from a torch dtype or a name."""
    return str(dtype).replace("torch.", "")


def _f32(dtype) -> bool:
    return dtype_name(dtype) == "float32"


def expected_errors(section, row):
    """{error column: its tolerance} for a row of ``section`` (the columns it must have)."""
    dtype = row.get("dtype", "bfloat16")
    out_tol = TOL_F32 if _f32(dtype) else TOL_16BIT
    loss_tol = TOL_F32 if _f32(dtype) else TOL_LOSS_16BIT
    if section == "results":
        if row.get("pass") == "fwd":  # forward only: no gradient to compare
            return {"loss_err": loss_tol}
        return {"loss_err": loss_tol, "grad_err": out_tol}
    if section == "moe":
        return {"err": TOL_ROUTE if row.get("op") == "route" else out_tol}
    if section == "fused":
        return {"loss_err": loss_tol, "grad_hidden_err": out_tol, "grad_weight_err": out_tol}
    if section == "attention":
        errs = {"out_err": out_tol}
        if row.get("pass") == "fwd+bwd":
            errs["grad_err"] = out_tol
        return errs
    raise ValueError(f"unknown section {section!r}")


def row_failures(section, row):
    """None for another implementation's row (informational); for this crate's, the reasons it
    fails ([] when it passes): it raised, an error is missing, not finite or above its
    tolerance, or a bitwise-determinism check (MoE, attention) failed or did not run."""
    if not is_ours(row):
        return None
    if "error" in row:
        return [f"raised: {row['error']}"]
    why = []
    for key, tol in expected_errors(section, row).items():
        value = row.get(key)
        if value is None:
            why.append(f"{key} missing (no reference)")
        elif not math.isfinite(value):
            why.append(f"{key} = {value}")
        elif value > tol:
            why.append(f"{key} {value:.2e} > {tol:.0e}")
    if section in ("moe", "attention") and row.get("bitwise") is not True:
        why.append("two runs gave different bits" if row.get("bitwise") is False
                   else "bitwise check missing")
    return why


def verdict_cell(row) -> str:
    return row.get("verdict", "")


def row_label(section, row) -> str:
    """A row's name in the failure list."""
    impl = row.get("impl", "?") + (f" ({row['note']})" if row.get("note") else "")
    if section == "results":
        return (f"divergence {impl} {row.get('kind')} {row.get('n')}x{row.get('v')} "
                f"{case_label(row)}")
    if section == "moe":
        return f"moe {row.get('op')} {impl} [{row.get('shape')}]"
    if section == "attention":
        return f"attention {impl} [{row.get('shape')}] {row.get('pass')}"
    return f"fused {impl} [{row.get('shape')}]"


class Report:
    """The rows of a run, as they are measured: each judged (row_failures), printed under its
    table's header on ``out`` and flushed, and the whole JSON rewritten (atomically), so that a
    run stopped at its time limit still leaves every row it finished."""

    def __init__(self, meta, json_path=None, out=None):
        self.meta = meta
        self.json_path = json_path
        self.out = out or sys.stdout
        self.rows = {s: [] for s in SECTIONS}
        self.preambles = {}
        self.finished = False

    def preamble(self, section, lines) -> None:
        """Lines printed before ``section``'s table header, with its first row."""
        self.preambles[section] = list(lines)

    def add(self, section, row) -> None:
        why = row_failures(section, row)
        if why is not None:
            row["verdict"] = "FAIL" if why else "ok"
            if why:
                row["failures"] = why
        rows = self.rows[section]
        if not rows:
            print(file=self.out)
            for line in [*self.preambles.get(section, ()), *TABLE_HEADERS[section]]:
                print(line, file=self.out)
        rows.append(row)
        print(ROW_FORMATS[section](row), file=self.out, flush=True)
        self.write_json()

    def failures(self):
        return [(s, r) for s in SECTIONS for r in self.rows[s] if r.get("verdict") == "FAIL"]

    def ours(self) -> int:
        return sum(1 for s in SECTIONS for r in self.rows[s] if "verdict" in r)

    def summary(self) -> str:
        """The last line of a run: this crate's failures, or that there were none."""
        fails = self.failures()
        if not fails:
            return (f"ok: all {self.ours()} distill_kernels rows ran, within DESIGN.md's "
                    "tolerances and bitwise reproducible where checked")
        return (f"FAIL: {len(fails)} of {self.ours()} distill_kernels rows: " + "; ".join(
            f"{row_label(s, r)}: {', '.join(r['failures'])}" for s, r in fails))

    def write_json(self) -> None:
        if not self.json_path:
            return
        doc = {"meta": self.meta, **{s: self.rows[s] for s in SECTIONS},
               "failures": [f"{row_label(s, r)}: {', '.join(r['failures'])}"
                            for s, r in self.failures()],
               "finished": self.finished}
        tmp = f"{self.json_path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=2)
            os.replace(tmp, self.json_path)
        except OSError as e:  # the table on stdout stays the record
            log(f"could not write {self.json_path}: {e}")
        finally:
            # Cut off mid-write (SIGTERM from a time limit, see main): no stray file is left in
            # the output folder (the device tool returns a limited number of files).
            if os.path.exists(tmp):
                try:
                    os.remove(tmp)
                except OSError:
                    pass


# ---- one row of the table -----------------------------------------------------------------------


def dk_workspace_bytes(n: int, device) -> "int | None":
    """This crate's own workspace for an n-row divergence call on ``device``
    (dk_divergence_workspace_size, what distill_kernels.torch allocates per call), or None where
    the library cannot say."""
    try:
        import ctypes

        from distill_kernels import _lib as dk_lib

        l = dk_lib.lib()
        if not hasattr(l, "dk_divergence_workspace_size"):
            return None
        index = -1
        if torch.device(device).type == "cuda":
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
        size = ctypes.c_size_t(0)
        dk_lib.check(l.dk_divergence_workspace_size(dk_lib.context(index), n, ctypes.byref(size)),
                     "dk_divergence_workspace_size")
        return int(size.value)
    except Exception:  # noqa: BLE001  (a column left empty, not a failed row)
        return None


def _memory_columns(row, peak_bytes, grad_bytes, n, device) -> None:
    """The extra peak memory of one call, whole (GiB) and, for issue 3's "at most 64 bytes per
    row beyond inputs and outputs", without the gradient output, in bytes per row."""
    row["extra_gib"] = peak_bytes / GIB
    row["extra_bytes_per_row_excl_grad"] = (peak_bytes - grad_bytes) / max(n, 1)
    if is_ours(row):
        ws = dk_workspace_bytes(n, device)
        if ws is not None:
            row["workspace_bytes_per_row"] = ws / max(n, 1)


def run_one(impl_name, kind, fn, s, t, ref, rows, floor_ms, args, pass_="fwd+bwd"):
    """One divergence row: ``fn(student, teacher) -> loss`` forward + backward (``pass_``
    "fwd+bwd": the gradient of a leaf copy of ``s``) or forward only ("fwd": ``s`` itself, no
    gradient, under torch.no_grad(), as an evaluation or a logging call runs it)."""
    row = {"impl": impl_name, "kind": kind, "n": s.shape[0], "v": s.shape[1],
           "dtype": dtype_name(s.dtype), "pass": pass_}
    if getattr(fn, "note", None):
        row["note"] = fn.note
    if isinstance(fn, Exception):  # one line: the row is a markdown table cell
        row["error"] = f"{type(fn).__name__}: {str(fn).splitlines()[0][:160] if str(fn) else ''}"
        return row
    forward_only = pass_ == "fwd"
    x = s.detach() if forward_only else s.detach().clone().requires_grad_(True)

    def step():
        if forward_only:
            with torch.no_grad():
                return fn(x, t)
        x.grad = None
        loss = fn(x, t)
        loss.backward()
        return loss

    try:
        t0 = time.time()
        loss = step()  # first call: compiles / loads, and gives the values to check
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.time() - t0, 2)
        ref_loss, ref_grad = ref
        loss = loss.detach().reshape(())
        row["loss_err"] = rel_err(loss, torch.tensor(ref_loss, device=loss.device))
        grad_bytes = 0
        if not forward_only:
            row["grad_err"] = rel_err(x.grad[rows], ref_grad)
            grad_bytes = x.grad.numel() * x.grad.element_size()
            x.grad = None
        del loss
        # Extra peak memory of one call (the gradient buffer included).
        _memory_columns(row, extra_peak_bytes(step), grad_bytes, s.shape[0], s.device)
        ms = bench_ms(step, args.warmup_ms, args.rep_ms)
        row["ms"] = ms
        row["pct_floor"] = 100.0 * floor_ms / ms
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = "OOM: " + str(e).split("\n")[0][:120]
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if args.verbose:
            traceback.print_exc()
    finally:
        if not forward_only:
            x.grad = None
        torch.cuda.synchronize()
    return row


def _per_row_bytes(x) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.0f}" if abs(x) < 1e5 else f"{x:.2e}"


DIVERGENCE_HEADER = (
    "| implementation | kind | N × V | logits, pass | time | % of floor | extra peak memory "
    "| extra excl. grad, B/row | dk workspace, B/row | loss rel err | grad rel err (sampled rows) "
    "| verdict |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
)
_DTYPE_SHORT = {dtype_name(d): name for name, d in DTYPES.items()}


def case_label(r) -> str:
    """A divergence row's logits dtype and pass, e.g. "bf16 fwd+bwd" (the defaults when unset)."""
    dtype = dtype_name(r.get("dtype", "bfloat16"))
    return f"{_DTYPE_SHORT.get(dtype, dtype)} {r.get('pass', 'fwd+bwd')}"


def divergence_floor_ms(n, v, dtype, pass_, bw) -> float:
    """The memory floor of one call: each input read once and (forward + backward) the gradient
    written once, n × v elements of ``dtype`` each, over the copy bandwidth ``bw`` (bytes/s)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return (3 if pass_ == "fwd+bwd" else 2) * n * v * elem / bw * 1e3


def fmt_row(r) -> str:
    if r.get("note"):
        r = {**r, "impl": f"{r['impl']} ({r['note']})"}
    lead = f"| {r['impl']} | {r['kind']} | {r['n']} × {r['v']} | {case_label(r)} "
    if "error" in r:
        return f"{lead}| {r['error']} | | | | | | | {verdict_cell(r)} |"
    mem = f"{r['extra_gib']:.2f} GiB" if math.isfinite(r.get("extra_gib", math.nan)) else ""
    grad = f"{r['grad_err']:.1e}" if "grad_err" in r else "-"
    return (
        f"{lead}| {r['ms']:.3f} ms | {r['pct_floor']:.1f} % "
        f"| {mem} | {_per_row_bytes(r.get('extra_bytes_per_row_excl_grad'))} "
        f"| {_per_row_bytes(r.get('workspace_bytes_per_row'))} "
        f"| {r['loss_err']:.1e} | {grad} | {verdict_cell(r)} |"
    )


# ---- this crate with the gradient over the student logits (grad_inplace=True) ------------------
#
# In a trainer the student logits are the lm_head's output, an intermediate tensor, and with
# grad_inplace=True the divergence writes its gradient over them: no [N, V] gradient is allocated.
# Such a call destroys its input, so every timed run starts from a logits buffer refilled from the
# kept student, outside the CUDA events (a refill inside them would add 2 units of traffic to the
# floor's 3). The separate-gradient call is timed by the same harness beside it, so the two rows
# differ only in where the gradient goes. The logits are `leaf.clone()`, an intermediate tensor
# made once per row, and the gradient is taken with torch.autograd.grad(loss, logits): what the
# lm_head's backward would receive. The extra peak memory excludes the kept student.

LOGITS_ROWS = (("separate gradient", False), ("grad_inplace=True", True))


def run_logits_rows(kind, s, t, ref, rows, floor_ms, args, timer=None):
    """Rows for distill_kernels.torch.divergence on an intermediate logits tensor, separate
    gradient and in place; ``timer(fn, warmup_ms, rep_ms, setup)`` defaults to _events_median:
    CUDA events, the refill (``setup``) then the L2 flush before each timed call, so the refill's
    dirty lines are written back before the start event, not inside the timed call."""
    import distill_kernels.torch as dkt

    timer = timer or _events_median
    cuda = s.device.type == "cuda"
    out = []
    for note, inplace in LOGITS_ROWS:
        row = {"impl": "distill_kernels", "kind": kind, "n": s.shape[0], "v": s.shape[1],
               "dtype": dtype_name(s.dtype), "pass": "fwd+bwd",
               "note": f"logits refilled untimed, {note}", "inplace": inplace}
        logits = None
        try:
            logits = s.detach().clone().requires_grad_(True).clone()  # intermediate, own memory

            def refill(logits=logits):
                with torch.no_grad():
                    logits.copy_(s)

            def step(logits=logits, inplace=inplace):
                loss = dkt.divergence(logits, t, kind=kind, beta=BETA, grad_inplace=inplace)
                (g,) = torch.autograd.grad(loss, logits)
                return loss, g

            refill()
            t0 = time.time()
            loss, g = step()
            if cuda:
                torch.cuda.synchronize()
            row["first_call_s"] = round(time.time() - t0, 2)
            if inplace and g.data_ptr() != logits.data_ptr():
                raise RuntimeError("grad_inplace=True: the gradient is not in the logits buffer")
            ref_loss, ref_grad = ref
            loss = loss.detach().reshape(())
            row["loss_err"] = rel_err(loss, torch.tensor(ref_loss, device=loss.device))
            row["grad_err"] = rel_err(g[rows], ref_grad)
            # The gradient output: a new [N, V] buffer, or none at all when written in place.
            grad_bytes = 0 if inplace else g.numel() * g.element_size()
            del loss, g
            refill()
            # no allocator statistics on the CPU
            peak = extra_peak_bytes(step) if cuda else float("nan")
            _memory_columns(row, peak, grad_bytes, s.shape[0], s.device)
            ms = timer(step, args.warmup_ms, args.rep_ms, setup=refill)
            row["ms"] = ms
            row["pct_floor"] = 100.0 * floor_ms / ms
        except Exception as e:  # noqa: BLE001  (OOM included: a row, not a stopped run)
            oom = cuda and isinstance(e, torch.cuda.OutOfMemoryError)
            text = str(e).splitlines()[0][:160] if str(e) else ""
            row["error"] = ("OOM: " + text[:120]) if oom else f"{type(e).__name__}: {text}"
            if args.verbose:
                traceback.print_exc()
        finally:
            del logits
            if cuda:
                torch.cuda.synchronize()
        out.append(row)
    return out


# ---- MoE dispatch ------------------------------------------------------------------------------

MOE_ROUTE_SHAPE = (16384, 128, 8)  # N, E, k: softmax, renormalised
MOE_SHAPES = [  # (name, N, H, E, k, score)
    ("Llama 4 Scout", 16384, 5120, 16, 1, "sigmoid"),
    ("Llama 4 Maverick", 16384, 5120, 128, 1, "sigmoid"),
    ("Qwen3-MoE", 16384, 2048, 128, 8, "softmax"),
]
MOE_QUICK_N = 4096
MOE_OPS = ("moe_route", "moe_permute", "moe_combine")


def plain_route(logits, k, score="softmax", renormalize=False):
    """Routing in plain PyTorch: scores, topk, stable argsort (expert-major, token order)."""
    n, e = logits.shape
    s = logits.float().softmax(-1) if score == "softmax" else logits.float().sigmoid()
    w, ids = s.topk(k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    offsets = torch.zeros(e + 1, dtype=torch.long, device=logits.device)
    offsets[1:] = torch.cumsum(counts, 0)
    position = torch.empty_like(order)
    position[order] = torch.arange(n * k, device=logits.device)
    return ids, w, counts, offsets, order, position.view(n, k)


def _moe_impls(wanted):
    impls = {"torch eager": None, "distill_kernels": None}
    try:
        import distill_kernels.torch as dkt
        from distill_kernels import _lib as dk_lib

        dk_lib.moe_lib()
        impls["distill_kernels"] = dkt
    except Exception as e:  # noqa: BLE001
        impls["distill_kernels"] = e
    if wanted:
        impls = {k: v for k, v in impls.items() if any(w in k.lower() for w in wanted)}
    return impls


def _moe_row(op, impl, shape, floor_bytes, bw, fn, args, err=None, bitwise=None):
    row = {"op": op, "impl": impl, "shape": shape}
    if isinstance(fn, Exception):
        row["error"] = f"{type(fn).__name__}: {str(fn).splitlines()[0][:160] if str(fn) else ''}"
        return row
    try:
        fn()
        torch.cuda.synchronize()
        ms = bench_ms(fn, args.warmup_ms, args.rep_ms)
        row["ms"] = ms
        row["floor_ms"] = floor_bytes / bw * 1e3
        row["pct_floor"] = 100.0 * row["floor_ms"] / ms
        if err is not None:
            row["err"] = err() if callable(err) else err
        if bitwise is not None:
            row["bitwise"] = bitwise() if callable(bitwise) else bitwise
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = "OOM: " + str(e).split("\n")[0][:120]
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if args.verbose:
            traceback.print_exc()
    return row


def _same_bits(run):
    a = run()
    b = run()
    torch.cuda.synchronize()
    if not isinstance(a, (tuple, list)):
        a, b = (a,), (b,)
    return all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


def _grad_fn(out, inputs, grad):
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def _row_adder(rows, emit, fmt, log_fn):
    """A section's ``add(row)``: keeps the row, hands it to ``emit`` (the report, which prints
    and saves it as it comes) when given, and logs it formatted by ``fmt``."""

    def add(row):
        rows.append(row)
        if emit is not None:
            emit(row)
        log_fn("    " + fmt(row))

    return add


def run_moe(ops, impls, bw, args, log_fn, emit=None):
    """The MoE rows of the table; ``emit(row)``, when given, gets each row as it is measured."""
    rows = []

    add = _row_adder(rows, emit, fmt_moe_row, log_fn)

    if "moe_route" in ops:
        n, e, k = MOE_ROUTE_SHAPE
        if args.quick:
            n = MOE_QUICK_N
        shape = f"N {n}, E {e}, k {k}, softmax renorm"
        lg = (torch.randn(n, e, device="cuda") * 2).to(torch.bfloat16)
        floor = n * e * 2 + 16 * n * k
        # stable sort: the tie rule (lower expert first) that torch.topk does not promise
        ref_ids = torch.sort(lg.float().softmax(-1), dim=-1, descending=True,
                             stable=True).indices[:, :k]
        for impl, mod in impls.items():
            log_fn(f"route {impl} {shape} ...")
            if impl == "torch eager":
                fn = lambda: plain_route(lg, k, "softmax", True)  # noqa: E731
                add(_moe_row("route", impl, shape, floor, bw, fn, args))
            elif isinstance(mod, Exception):
                add(_moe_row("route", impl, shape, floor, bw, mod, args))
            else:
                fn = lambda: mod.moe_route(lg, k, renormalize=True)  # noqa: E731

                def agree():
                    ids = mod.moe_route(lg, k, renormalize=True).expert_ids.long()
                    return 1.0 - (ids == ref_ids).all(-1).float().mean().item()  # tokens differing

                def run():
                    r = mod.moe_route(lg, k, renormalize=True)
                    return (r.expert_ids, r.weights, r.perm, r.position, r.offsets)

                add(_moe_row("route", impl, shape, floor, bw, fn, args, err=agree,
                             bitwise=lambda: _same_bits(run)))
        lg = ref_ids = None
        torch.cuda.empty_cache()

    for name, n, h, e, k, score in MOE_SHAPES:
        if not any(o in ops for o in ("moe_permute", "moe_combine")):
            break
        if args.quick:
            n = MOE_QUICK_N
        shape = f"{name}: N {n}, H {h}, E {e}, k {k}, {score}"
        renorm = score == "softmax"
        R = n * k
        try:
            lg = (torch.randn(n, e, device="cuda") * 2).to(torch.bfloat16)
            ids, w, _, _, order, position = plain_route(lg, k, score, renorm)
            x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
            eo = torch.randn(R, h, device="cuda", dtype=torch.bfloat16)
            gxp = torch.randn(R, h, device="cuda", dtype=torch.bfloat16)
            gy = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
        except torch.cuda.OutOfMemoryError as ex:
            # This crate's rows of the shape cannot run: a failure of the run, not a note.
            add({"op": "permute/combine", "impl": "distill_kernels", "shape": shape,
                 "error": f"OOM allocating the inputs: {ex}"[:120]})
            continue
        tok = order // k
        w_perm = w.flatten()[order]
        route = None
        dkt = impls.get("distill_kernels")
        if dkt is not None and not isinstance(dkt, Exception):
            try:
                route = dkt.moe_route(lg, k, score=score, renormalize=renorm)
            except Exception as ex:  # noqa: BLE001
                dkt = ex
        # float32 references on the distill_kernels routing (the same as the plain one barring ties)
        if route is not None:
            rtok = route.perm.long() // k
            rw = route.weights.flatten()[route.perm.long()]
            rpos = route.position.long().flatten()
        for op, fwd_bytes, bwd_bytes in (("moe_permute", (n + R) * h * 2, (R + n) * h * 2),
                                         ("moe_combine", (R + n) * h * 2, (n + 2 * R) * h * 2)):
            if op not in ops:
                continue
            for impl, mod in impls.items():
                log_fn(f"{op} {impl} {shape} ...")
                label = op.replace("moe_", "")
                if impl != "torch eager" and (isinstance(dkt, Exception) or route is None):
                    err = dkt if isinstance(dkt, Exception) else RuntimeError("no route")
                    add(_moe_row(label + " fwd", impl, shape, fwd_bytes, bw, err, args))
                    add(_moe_row(label + " bwd", impl, shape, bwd_bytes, bw, err, args))
                    continue
                try:
                    if op == "moe_permute":
                        xa = x.detach().requires_grad_(True)
                        if impl == "torch eager":
                            fwd = lambda: xa.index_select(0, tok)  # noqa: E731
                            out = fwd()
                            bwd = _grad_fn(out, (xa,), gxp)
                            e_f = e_b = None
                            same_f = same_b = None
                        else:
                            fwd = lambda: dkt.moe_permute(xa, route)  # noqa: E731
                            out = fwd()
                            bwd = _grad_fn(out, (xa,), gxp)
                            e_f = lambda: rel_err(dkt.moe_permute(x, route), x.index_select(0, rtok))  # noqa: E731
                            e_b = lambda: rel_err(  # noqa: E731
                                bwd()[0], torch.zeros(n, h, device="cuda").index_add_(0, rtok, gxp.float()))
                            same_f = lambda: _same_bits(lambda: dkt.moe_permute(x, route))  # noqa: E731
                            same_b = lambda: _same_bits(lambda: bwd()[0])  # noqa: E731
                    else:
                        ea = eo.detach().requires_grad_(True)
                        if impl == "torch eager":
                            wa = w_perm.detach().requires_grad_(True)
                            fwd = lambda: torch.zeros(n, h, device="cuda", dtype=eo.dtype).index_add_(  # noqa: E731
                                0, tok, ea * wa.unsqueeze(1).to(ea.dtype))
                            out = fwd()
                            bwd = _grad_fn(out, (ea, wa), gy)
                            e_f = e_b = same_f = same_b = None
                        else:
                            wa = route.weights.detach().clone().requires_grad_(True)
                            fwd = lambda: dkt.moe_combine(ea, route, weights=wa)  # noqa: E731
                            out = fwd()
                            bwd = _grad_fn(out, (ea, wa), gy)
                            ref_y = torch.zeros(n, h, device="cuda").index_add_(
                                0, rtok, eo.float() * rw.unsqueeze(1))
                            e_f = lambda: rel_err(dkt.moe_combine(eo, route), ref_y)  # noqa: E731

                            def e_b():
                                g_eo, g_w = bwd()
                                ref_eo = gy.float()[rtok] * rw.unsqueeze(1)
                                ref_w = torch.zeros(n * k, device="cuda")
                                ref_w[route.perm.long()] = (gy.float()[rtok] * eo.float()).sum(-1)
                                return max(rel_err(g_eo, ref_eo),
                                           rel_err(g_w.flatten()[rpos >= 0], ref_w[rpos >= 0]))

                            same_f = lambda: _same_bits(lambda: dkt.moe_combine(eo, route))  # noqa: E731
                            same_b = lambda: _same_bits(bwd)  # noqa: E731
                    add(_moe_row(label + " fwd", impl, shape, fwd_bytes, bw, fwd, args, e_f, same_f))
                    add(_moe_row(label + " bwd", impl, shape, bwd_bytes, bw, bwd, args, e_b, same_b))
                    out = bwd = None
                except Exception as ex:  # noqa: BLE001
                    if args.verbose:
                        traceback.print_exc()
                    add(_moe_row(label, impl, shape, fwd_bytes, bw, ex, args))
                torch.cuda.empty_cache()
        lg = x = eo = gxp = gy = route = None
        torch.cuda.empty_cache()
    return rows


MOE_HEADER = (
    "| op | implementation | shape | time | % of strict floor | rel err | bitwise | verdict |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
)


def fmt_moe_row(r) -> str:
    if "error" in r:
        return (f"| {r['op']} | {r['impl']} | {r['shape']} | {r['error']} | | | "
                f"| {verdict_cell(r)} |")
    err = f"{r['err']:.1e}" if r.get("err") is not None else ""
    bits = {True: "yes", False: "NO", None: ""}[r.get("bitwise")]
    return (f"| {r['op']} | {r['impl']} | {r['shape']} | {r['ms'] * 1e3:.1f} µs "
            f"| {r['pct_floor']:.1f} % | {err} | {bits} | {verdict_cell(r)} |")


# ---- fused linear divergence (lm_head + JSD) ------------------------------------------------------

FUSED_SHAPES = [("Phi-4-mini", 4096, 3072, 200064), ("Llama 4 Scout", 16384, 5120, 202048)]
FUSED_QUICK = [("Phi-4-mini (quick)", 1024, 3072, 200064)]
FUSED_CHUNK = FUSED_CHUNK_DEFAULT


def _fused_eager(hs, ws, ht, wt):
    """torch eager: both logits by matmul, TRL's JSD formula in float32, autograd."""
    return eager_jsd(hs @ ws.T, (ht @ wt.T).detach())


def _one_line(e, width=160) -> str:
    """An exception as one table cell: its type and the first line of its message."""
    text = str(e).splitlines()[0][:width] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def _fused_impls(wanted, device="cuda", compiled=True):
    """{name: fn(hs, ws, ht, wt) -> loss, or the exception that says why it cannot run}: this
    crate's rows first, then the baselines, slowest last (the order run_fused times them in)."""
    impls = {}
    try:
        import distill_kernels.torch as dkt
        from distill_kernels import _lib as dk_lib

        dk_lib.fused_lib()
        impls["distill_kernels"] = lambda hs, ws, ht, wt: dkt.fused_linear_divergence(
            hs, ws, ht, wt, kind="jsd", beta=BETA)

        def f32_grads(hs, ws, ht, wt):
            return dkt.fused_linear_divergence(hs, ws, ht, wt, kind="jsd", beta=BETA,
                                               grad_dtype=torch.float32)

        f32_grads.grad_dtype = torch.float32  # its gradient outputs (cast by autograd after)
        impls["distill_kernels (f32 grads)"] = f32_grads
        impls["distill_kernels (≤ 2 GiB)"] = _fused_within_2gib(dkt)
    except Exception as e:  # noqa: BLE001
        impls["distill_kernels"] = e
    impls["torch eager"] = _fused_eager
    if not wanted or any(w in n.lower() for w in wanted for n in (LIGER_FUSED, LIGER_CHUNKED)):
        probe = None
        for name, entry in _liger_fused_fns(compiled, FUSED_CHUNK).items():
            if isinstance(entry, Exception):
                impls[name] = entry
                continue
            fn, probe_fn = entry
            try:  # a wrong convention becomes the row's error, not a silently wrong number
                probe = probe or _fused_probe(device)
                checked = _liger_checked(fn, probe, probe_fn)
                if probe_fn is not None:
                    # The compiled chunked loss: its uncompiled twin (same math, checked on its
                    # own) is timed instead, and the row says so, if torch.compile fails.
                    try:
                        checked.uncompiled = _liger_checked(probe_fn, probe)
                    except Exception:  # noqa: BLE001  (then a compile failure stays the error)
                        pass
                impls[name] = checked
            except Exception as e:  # noqa: BLE001
                impls[name] = e
    if wanted:
        impls = {k: v for k, v in impls.items() if any(w in k.lower() for w in wanted)}
    return impls


FUSED_BUDGET = 2 << 30  # issue 4: at most 2 GiB of extra peak memory
FUSED_MARGIN = 96 << 20  # cuBLAS's 32 MiB workspace, the per-row losses, the allocator


def fused_2gib_chunk(n, h, v, elem):
    """(chunk rows, note) for issue 4's 2 GiB: the chunk's two f32 logit buffers (8 bytes per
    padded column per row) get what FUSED_MARGIN, the crate's pad before them (cuda/FUSED.md,
    version 3: at least 32 rows, else up to 32 MiB of them) and the gradient outputs leave, in
    multiples of 64 rows. The issue does not say whether its 2 GiB count the gradients: counted
    when they leave room for a chunk; where they alone take about all of it (grad_weight alone
    is 1.93 GiB at the Scout shape, V 202048 × H 5120 in bf16) the 2 GiB are what comes beyond
    them, and the note says which."""
    ld = -(-v // 8) * 8
    pad = 4 * max(32, (32 << 20) // (4 * ld)) * ld
    grads = (n * h + v * h) * elem
    for left, what in ((FUSED_BUDGET - FUSED_MARGIN - pad - grads, "≤ 2 GiB with the gradients"),
                       (FUSED_BUDGET - FUSED_MARGIN - pad,
                        f"≤ 2 GiB beyond the gradients, {grads / GIB:.2f} GiB alone")):
        rows = left // (8 * ld) // 64 * 64
        if rows >= 64:
            rows = int(min(rows, max(n, 1)))  # no chunk holds more rows than the call has
            return rows, f"chunks of {rows} rows, {what}"
    raise RuntimeError(f"no chunk of 64 rows fits 2 GiB at V = {v}")


def _fused_within_2gib(dkt):
    """This crate with chunks small enough for issue 4's 2 GiB (fused_2gib_chunk). The default
    chunks take up to 1.5 GiB (cuda/FUSED.md): this row measures what smaller ones cost."""

    def run(hs, ws, ht, wt):
        rows, _ = fused_2gib_chunk(hs.shape[0], ws.shape[1], ws.shape[0], ws.element_size())
        return dkt.fused_linear_divergence(hs, ws, ht, wt, kind="jsd", beta=BETA,
                                           chunk_rows=rows)

    run.chunk_plan = fused_2gib_chunk
    return run


def _fused_reference(hs, ws, ht, wt, chunk=512):
    """fp32 PyTorch on the same (bf16) inputs, chunked over rows: (loss, grad_hidden,
    grad_weight). The JSD gradient w.r.t. the logits is taken per chunk by autograd."""
    n = hs.shape[0]
    w32 = ws.float()
    wt32 = wt.float()
    gw = torch.zeros_like(w32)
    gh = torch.empty(hs.shape, dtype=torch.float32, device=hs.device)
    total = 0.0
    for i in range(0, n, chunk):
        z = (hs[i:i + chunk].float() @ w32.T).requires_grad_(True)
        with torch.no_grad():
            zt = ht[i:i + chunk].float() @ wt32.T
        ls = F.log_softmax(z, -1)
        lt = F.log_softmax(zt, -1)
        lm = torch.logaddexp(lt + math.log(BETA), ls + math.log1p(-BETA))
        rows = BETA * (lt.exp() * (lt - lm)).sum(-1) + (1 - BETA) * (ls.exp() * (ls - lm)).sum(-1)
        (g,) = torch.autograd.grad(rows.sum() / n, z)
        total += rows.sum().item()
        gh[i:i + chunk] = g @ w32
        gw += g.T @ hs[i:i + chunk].float()
        del z, zt, ls, lt, lm, rows, g
    return total / n, gh, gw


def _sync(t) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize()


def run_fused_row(impl, fn, hs, ws, ht, wt, ref, gemm_ms, shape, args, log_fn):
    """One row: the first call (errors against ``ref``; a compiled Liger loss that fails in
    torch.compile falls back to its uncompiled twin, labelled), the extra peak memory of one
    forward + backward with and without the gradient outputs, the median time."""
    row = {"impl": impl, "shape": shape, "dtype": dtype_name(hs.dtype)}
    if getattr(fn, "note", None):
        row["note"] = fn.note
    if isinstance(fn, Exception):
        row["error"] = _one_line(fn)
        return row
    plan = getattr(fn, "chunk_plan", None)
    if plan is not None:
        try:
            row["chunk_rows"], row["note"] = plan(hs.shape[0], ws.shape[1], ws.shape[0],
                                                  ws.element_size())
        except Exception as e:  # noqa: BLE001 (one failed row, not the section)
            row["error"] = f"chunk plan: {_one_line(e)}"
            return row
    a = hs.detach().clone().requires_grad_(True)
    b = ws.detach().clone().requires_grad_(True)

    def first(f):
        a.grad = b.grad = None
        out = f(a, b, ht, wt)
        out.backward()
        _sync(a)
        return out

    try:
        t0 = time.time()
        try:
            loss = first(fn)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            fallback = getattr(fn, "uncompiled", None)
            if fallback is None:
                raise
            row["note"] = (f"uncompiled: torch.compile failed ({_one_line(e, 100)}); "
                           f"{getattr(fallback, 'note', '')}")
            log_fn(f"    {impl}: torch.compile failed ({_one_line(e, 100)}); timing it uncompiled")
            fn = fallback
            t0 = time.time()
            loss = first(fn)
        row["first_call_s"] = round(time.time() - t0, 2)
        if ref is not None:
            row["loss_err"] = abs(loss.item() - ref[0]) / abs(ref[0])
            row["grad_hidden_err"] = rel_err(a.grad, ref[1])
            row["grad_weight_err"] = rel_err(b.grad, ref[2])
        del loss
        # The gradient outputs as the row returns them (f32 buffers for the f32-grads row,
        # which autograd then casts to the parameters' dtype: those copies stay in the peak).
        g_dtype = getattr(fn, "grad_dtype", a.dtype)
        grad_bytes = (a.numel() + b.numel()) * (torch.finfo(g_dtype).bits // 8)
        a.grad = b.grad = None

        def step(f=fn):
            a.grad = b.grad = None
            f(a, b, ht, wt).backward()

        # Extra peak memory beyond the inputs, with the gradients of hidden and weight and
        # without them.
        peak = extra_peak_bytes(step)
        row["extra_gib"] = peak / GIB
        row["extra_excl_grads_gib"] = (peak - grad_bytes) / GIB
        row["ms"] = bench_ms(step, args.warmup_ms, args.rep_ms)
        row["ratio"] = row["ms"] / gemm_ms
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = "OOM: " + str(e).split("\n")[0][:120]
    except Exception as e:  # noqa: BLE001
        row["error"] = _one_line(e)
        if args.verbose:
            traceback.print_exc()
    finally:
        a.grad = b.grad = None
        a = b = None
        _sync(hs)
        torch.cuda.empty_cache()
    return row


def run_fused(shapes, impls, args, log_fn, emit=None, device="cuda"):
    """Every shape's four GEMMs, fp32 reference and this crate's rows first; then, shape by shape
    again (inputs and reference kept), the baselines. Their first calls compile and they are
    slow (LigerFusedLinearJSD ~1.2 s a call at the Scout shape, the compiled chunked loss 20-40 s
    of torch.compile per shape): run first, they could use up a time limit before this crate's
    rows came. ``emit(row)``, when given, gets each row as it is measured."""
    rows = []

    add = _row_adder(rows, emit, fmt_fused_row, log_fn)

    ours = [name for name in impls if is_ours({"impl": name})]
    others = [name for name in impls if name not in ours]
    kept = []  # (shape, inputs, reference, GEMM time) of each shape, for the baselines
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    for name, n, h, v in shapes:
        shape = f"{name}: N {n}, H {h}, V {v}"
        try:
            torch.cuda.empty_cache()
            hs = torch.randn(n, h, device=device, dtype=torch.bfloat16)
            ws = (torch.randn(v, h, device=device) * (2.0 / math.sqrt(h))).to(torch.bfloat16)
            ht = torch.randn(n, h, device=device, dtype=torch.bfloat16)
            wt = (torch.randn(v, h, device=device) * (2.0 / math.sqrt(h))).to(torch.bfloat16)
        except torch.cuda.OutOfMemoryError as e:
            hs = ws = ht = wt = None
            for impl in ours:  # this crate's rows of the shape cannot run: failures
                add({"impl": impl, "shape": shape, "error": f"OOM allocating inputs: {e}"[:120]})
            continue
        # Floor: the four cuBLAS GEMMs, timed in this run.
        try:
            gl = torch.randn(n, v, device=device, dtype=torch.bfloat16)  # a logits gradient
            t_s = bench_ms(lambda: hs @ ws.T, args.warmup_ms, args.rep_ms)
            t_t = bench_ms(lambda: ht @ wt.T, args.warmup_ms, args.rep_ms)
            t_h = bench_ms(lambda: gl @ ws, args.warmup_ms, args.rep_ms)
            t_w = bench_ms(lambda: gl.T @ hs, args.warmup_ms, args.rep_ms)
            gl = None
            gemm_ms = t_s + t_t + t_h + t_w
            tflops = 4 * 2 * n * h * v / (gemm_ms * 1e-3) / 1e12
            add({"impl": "4 cuBLAS GEMMs (torch.matmul)", "shape": shape, "ms": gemm_ms,
                 "ratio": 1.0, "detail": f"{t_s:.2f} + {t_t:.2f} + {t_h:.2f} + {t_w:.2f} ms,"
                 f" {tflops:.0f} TFLOP/s"})
        except torch.cuda.OutOfMemoryError as e:
            gl = None
            gemm_ms = float("nan")
            add({"impl": "4 cuBLAS GEMMs", "shape": shape, "error": f"OOM: {e}"[:120]})
        torch.cuda.empty_cache()
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            ref = _fused_reference(hs, ws, ht, wt)
        except torch.cuda.OutOfMemoryError as e:
            ref = None
            log_fn(f"    fp32 reference: OOM ({str(e)[:80]})")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        torch.cuda.empty_cache()
        for impl in ours:
            log_fn(f"fused {impl} {shape} ...")
            add(run_fused_row(impl, impls[impl], hs, ws, ht, wt, ref, gemm_ms, shape, args,
                              log_fn))
        if others:
            kept.append((shape, (hs, ws, ht, wt), ref, gemm_ms))
        hs = ws = ht = wt = ref = None
        torch.cuda.empty_cache()
    while kept:
        shape, (hs, ws, ht, wt), ref, gemm_ms = kept.pop(0)  # freed once its rows are done
        for impl in others:
            if past_deadline():
                add({"impl": impl, "shape": shape, "error": SKIPPED_PAST_DEADLINE})
                continue
            log_fn(f"fused {impl} {shape} ...")
            add(run_fused_row(impl, impls[impl], hs, ws, ht, wt, ref, gemm_ms, shape, args,
                              log_fn))
        hs = ws = ht = wt = ref = None
        torch.cuda.empty_cache()
    return rows


FUSED_HEADER = (
    "| implementation | shape | time | × GEMMs | extra peak, with grads | extra peak, excl. grads "
    "| loss rel err | grad rel err (hidden / weight) | verdict |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
)


def fmt_fused_row(r) -> str:
    if r.get("note"):
        r = {**r, "impl": f"{r['impl']} ({r['note']})"}
    verdict = verdict_cell(r)
    if "error" in r:
        return f"| {r['impl']} | {r['shape']} | {r['error']} | | | | | | {verdict} |"
    if "detail" in r:
        return f"| {r['impl']} | {r['shape']} | {r['ms']:.2f} ms | 1.00 × | {r['detail']} | | | | |"
    errs = " | "
    if "loss_err" in r:
        errs = (f"{r['loss_err']:.1e} | {r['grad_hidden_err']:.1e} / "
                f"{r['grad_weight_err']:.1e}")
    excl = f"{r['extra_excl_grads_gib']:.2f} GiB" if "extra_excl_grads_gib" in r else ""
    return (f"| {r['impl']} | {r['shape']} | {r['ms']:.2f} ms | {r['ratio']:.2f} × "
            f"| {r['extra_gib']:.2f} GiB | {excl} | {errs} | {verdict} |")


# ---- grouped-query attention ----------------------------------------------------------------------

# (name, B, S, Hq, Hkv, D): ANCHORS.md "Grouped-query attention", bf16, causal.
ATTN_SHAPES = [("Phi-4-mini", 4, 4096, 24, 8, 128), ("Llama 4", 1, 16384, 40, 8, 128)]
ATTN_QUICK = [("Phi-4-mini (quick)", 2, 2048, 24, 8, 128), ("Llama 4 (quick)", 1, 4096, 40, 8, 128)]
ATTN_FA2 = "SDPA flash (FA2)"
ATTN_DK_ATOMIC = "distill_kernels (atomic dQ)"


def attn_flops(b, s, hq, d, causal=True):
    """Forward FLOPs as ANCHORS.md counts them: 4·B·Hq·S²·D, halved when causal."""
    return 4 * b * hq * s * s * d / (2 if causal else 1)


def _sdpa_backend_fn(backend_name):
    """fn(qh, kh, vh) -> out for SDPA restricted to one backend, on [B, H, S, D] tensors, or the
    exception that says why it cannot run. GQA through enable_gqa=True when the backend takes
    it; otherwise K / V are expanded with repeat_interleave inside the timed call (the note says
    so, and the expansion alone is timed as its own row)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def gqa(qh, kh, vh):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)

    def expanded(qh, kh, vh):
        g = qh.shape[1] // kh.shape[1]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qh, kh.repeat_interleave(g, dim=1),
                                                  vh.repeat_interleave(g, dim=1), is_causal=True)

    return gqa, expanded


@torch.no_grad()
def _attn_reference(q, k, v, do, b, hk, chunk=256):
    """float64 forward and backward of one (sequence b, KV head hk) slice, causal, default scale:
    (out [S, g, D], dq [S, g, D], dk [S, D], dv [S, D]) for the g query heads of KV head hk,
    chunked over queries so the S x S scores never exist whole."""
    s_len, hq, d = q.shape[1], q.shape[2], q.shape[3]
    g = hq // k.shape[2]
    heads = slice(hk * g, (hk + 1) * g)
    scale = 1.0 / math.sqrt(d)
    Q = q[b, :, heads].double().transpose(0, 1)  # [g, S, D]
    dO = do[b, :, heads].double().transpose(0, 1)
    K = k[b, :, hk].double()  # [S, D]
    V = v[b, :, hk].double()
    out = torch.empty_like(Q)
    dq = torch.empty_like(Q)
    dk_ = torch.zeros_like(K)
    dv = torch.zeros_like(V)
    j = torch.arange(s_len, device=q.device)
    for i0 in range(0, s_len, chunk):
        i1 = min(s_len, i0 + chunk)
        n = i1 - i0
        kv = i1  # causal, Sq = Sk: rows i0..i1 see keys < i1
        sc = Q[:, i0:i1] @ K[:kv].T * scale  # [g, n, kv]
        mask = j[None, :kv] <= torch.arange(i0, i1, device=q.device)[:, None]
        sc = sc.masked_fill(~mask, float("-inf"))
        p = torch.softmax(sc, dim=-1)
        o = p @ V[:kv]
        out[:, i0:i1] = o
        dp = dO[:, i0:i1] @ V[:kv].T
        delta = (dO[:, i0:i1] * o).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[:, i0:i1] = ds @ K[:kv] * scale
        dk_[:kv] += (ds.transpose(1, 2) @ Q[:, i0:i1]).sum(0) * scale
        dv[:kv] += (p.transpose(1, 2) @ dO[:, i0:i1]).sum(0)
        del sc, p, dp, ds, o, n
    return out.transpose(0, 1), dq.transpose(0, 1), dk_, dv


def _attn_impls(wanted):
    impls = {}
    try:
        from torch.nn.attention import SDPBackend  # noqa: F401

        impls[ATTN_FA2] = _sdpa_backend_fn("FLASH_ATTENTION")
        impls["SDPA cuDNN"] = _sdpa_backend_fn("CUDNN_ATTENTION")
    except Exception as e:  # noqa: BLE001
        impls[ATTN_FA2] = impls["SDPA cuDNN"] = e
    try:
        import distill_kernels.torch as dkt
        from distill_kernels import _lib as dk_lib

        dk_lib.attention_lib()
        impls["distill_kernels"] = lambda q, k, v: dkt.attention(q, k, v, causal=True)
        # FlashAttention-2's own backward mode: dQ summed with f32 atomics (forward identical).
        impls[ATTN_DK_ATOMIC] = lambda q, k, v: dkt.attention(q, k, v, causal=True,
                                                              deterministic=False)
    except Exception as e:  # noqa: BLE001
        impls["distill_kernels"] = impls[ATTN_DK_ATOMIC] = e
    if wanted:
        impls = {k: v for k, v in impls.items()
                 if any(w in k.lower() for w in wanted) or k == ATTN_FA2}
    return impls


def run_attention(shapes, impls, args, log_fn, emit=None):
    """Rows per shape: forward and forward + backward of each implementation (TFLOP/s, ratio to
    SDPA flash = FA2 measured in this run, extra peak memory of the timed call, errors of out /
    dq / dk / dv on one (sequence, KV head) slice against float64), K / V expansion when a
    backend needed it. ``emit(row)``, when given, gets each row as it is measured."""
    rows = []

    add = _row_adder(rows, emit, fmt_attn_row, log_fn)

    for name, b, s, hq, hkv, d in shapes:
        shape = f"{name}: B {b}, S {s}, {hq}/{hkv}, D {d}"
        fwd_flops = attn_flops(b, s, hq, d)
        try:
            torch.cuda.empty_cache()
            # FlashAttention layout [B, S, H, D] for this crate; SDPA gets its own [B, H, S, D]
            # copies of the same values, so each is timed on the layout it prefers.
            q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
            do = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
            qh, kh, vh, doh = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
        except torch.cuda.OutOfMemoryError as e:
            # This crate's rows of the shape cannot run: a failure of the run, not a note.
            add({"impl": "distill_kernels", "shape": shape, "pass": "-",
                 "error": f"OOM allocating inputs: {e}"[:120]})
            continue
        sb, shk = b - 1, hkv - 1  # the checked slice: last sequence, last KV head
        try:
            ref = _attn_reference(q, k, v, do, sb, shk)
        except torch.cuda.OutOfMemoryError as e:
            ref = None
            log_fn(f"    float64 reference: OOM ({str(e)[:80]})")
        torch.cuda.empty_cache()
        fa2 = {}
        fa2_call = None  # the call the FA2 rows timed (enable_gqa, or K / V expanded)
        for impl, fn in impls.items():
            g = hq // hkv
            heads = slice(shk * g, (shk + 1) * g)
            if isinstance(fn, Exception):
                for ps in ("fwd", "fwd+bwd"):
                    add({"impl": impl, "shape": shape, "pass": ps,
                         "error": f"{type(fn).__name__}: {str(fn).splitlines()[0][:160] if str(fn) else ''}"})
                continue
            bhsd = isinstance(fn, tuple)
            if bhsd:  # SDPA: enable_gqa first, expanded K / V when the backend refuses it
                call, note = fn[0], ""
                try:
                    call(qh, kh, vh)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    call, note = fn[1], "K/V expanded (repeat_interleave, in the timed call)"
                    log_fn(f"    {impl}: enable_gqa refused ({str(e).splitlines()[0][:100]}); "
                           "expanding K/V")
                ins = (qh, kh, vh)
                grad_out = doh
                if impl == ATTN_FA2:
                    fa2_call = call
            else:
                call, note = fn, ""
                ins = (q, k, v)
                grad_out = do

            def as_bshd(x):
                return x.transpose(1, 2) if bhsd else x

            # The atomic-dQ mode changes only the backward: its forward is the row above.
            for ps in (("fwd+bwd",) if impl == ATTN_DK_ATOMIC else ("fwd", "fwd+bwd")):
                log_fn(f"attention {impl} {shape} {ps} ...")
                row = {"impl": impl, "shape": shape, "pass": ps, "b": b, "s": s, "hq": hq,
                       "hkv": hkv, "d": d}
                if note:
                    row["note"] = note
                flops = fwd_flops * (3.5 if ps == "fwd+bwd" else 1.0)
                xs = [x.detach().requires_grad_(ps == "fwd+bwd") for x in ins]
                if ps == "fwd":
                    def step():
                        with torch.no_grad():
                            return call(*xs)
                else:
                    def step():
                        out = call(*xs)
                        return (out,) + torch.autograd.grad(out, xs, grad_out)
                try:
                    t0 = time.time()
                    res = step()
                    torch.cuda.synchronize()
                    row["first_call_s"] = round(time.time() - t0, 2)
                    if ref is not None:
                        r_out, r_dq, r_dk, r_dv = ref
                        out = res if ps == "fwd" else res[0]
                        row["out_err"] = rel_err(as_bshd(out)[sb, :, heads], r_out)
                        if ps == "fwd+bwd":
                            dq, dk_, dv = (as_bshd(x) for x in res[1:])
                            row["grad_err"] = max(rel_err(dq[sb, :, heads], r_dq),
                                                  rel_err(dk_[sb, :, shk], r_dk),
                                                  rel_err(dv[sb, :, shk], r_dv))
                    if impl.startswith("distill_kernels"):  # two runs, the same bits?
                        again = step()
                        first = res if isinstance(res, tuple) else (res,)
                        second = again if isinstance(again, tuple) else (again,)
                        if impl == ATTN_DK_ATOMIC:  # out, dk, dv (dq's addition order varies)
                            first, second = (first[0],) + first[2:], (second[0],) + second[2:]
                            row["note"] = "bitwise column: out, dk, dv"
                        row["bitwise"] = all(torch.equal(x, y) for x, y in zip(first, second))
                        del again, first, second
                    del res
                    row["extra_gib"] = extra_peak_gib(step)
                    ms = bench_ms(step, args.warmup_ms, args.rep_ms)
                    row["ms"] = ms
                    row["tflops"] = flops / (ms * 1e-3) / 1e12
                    if impl == ATTN_FA2:
                        fa2[ps] = row["tflops"]
                    if ps in fa2:
                        row["vs_fa2"] = row["tflops"] / fa2[ps]
                except torch.cuda.OutOfMemoryError as e:
                    row["error"] = "OOM: " + str(e).split("\n")[0][:120]
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    if args.verbose:
                        traceback.print_exc()
                finally:
                    xs = None
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                add(row)
            ran = any(r.get("impl") == impl and r.get("shape") == shape and "ms" in r
                      for r in rows)
            if note and ran:  # what the expansion alone costs (it is inside the timed calls above)
                g_ = hq // hkv
                ms = bench_ms(lambda: (kh.repeat_interleave(g_, dim=1),
                                       vh.repeat_interleave(g_, dim=1)), args.warmup_ms, args.rep_ms)
                add({"impl": f"{impl}: K/V expansion alone", "shape": shape, "pass": "fwd",
                     "ms": ms, "note": "repeat_interleave of K and V"})
        # FA2 once more, after every other row of the shape: clocks and temperature drift over a
        # run of long kernels, and each row's ratio is to the first FA2 measurement. The drift
        # row says how far apart the two are (1.00 × when none).
        if fa2 and fa2_call is not None:
            for ps in ("fwd", "fwd+bwd"):
                if ps not in fa2:
                    continue
                try:
                    xs = [x.detach().requires_grad_(ps == "fwd+bwd") for x in (qh, kh, vh)]
                    if ps == "fwd":
                        def again():
                            with torch.no_grad():
                                return fa2_call(*xs)
                    else:
                        def again():
                            out = fa2_call(*xs)
                            return torch.autograd.grad(out, xs, doh)
                    ms = bench_ms(again, args.warmup_ms, args.rep_ms)
                    flops = fwd_flops * (3.5 if ps == "fwd+bwd" else 1.0)
                    tflops = flops / (ms * 1e-3) / 1e12
                    add({"impl": f"{ATTN_FA2}, again", "shape": shape, "pass": ps, "ms": ms,
                         "tflops": tflops, "vs_fa2": tflops / fa2[ps],
                         "note": "re-measured after the other rows: drift of the reference"})
                except Exception as e:  # noqa: BLE001
                    add({"impl": f"{ATTN_FA2}, again", "shape": shape, "pass": ps,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"})
                finally:
                    xs = None
                    torch.cuda.synchronize()
        q = k = v = do = qh = kh = vh = doh = ref = None
        torch.cuda.empty_cache()
    return rows


ATTN_HEADER = (
    "| implementation | shape | pass | time | TFLOP/s | vs FA2 | extra peak memory "
    "| out rel err | grad rel err | bitwise | verdict |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
)


def fmt_attn_row(r) -> str:
    if "error" in r:
        return (f"| {r['impl']} | {r['shape']} | {r['pass']} | {r['error']} | | | | | | "
                f"| {verdict_cell(r)} |")
    tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
    vs = f"{r['vs_fa2']:.2f} ×" if "vs_fa2" in r else ""
    mem = f"{r['extra_gib']:.2f} GiB" if "extra_gib" in r else ""
    oe = f"{r['out_err']:.1e}" if r.get("out_err") is not None else ""
    ge = f"{r['grad_err']:.1e}" if r.get("grad_err") is not None else ""
    bits = {True: "yes", False: "NO", None: ""}[r.get("bitwise")]
    note = f" ({r['note']})" if r.get("note") else ""
    return (f"| {r['impl']}{note} | {r['shape']} | {r['pass']} | {r['ms']:.3f} ms | {tf} | {vs} "
            f"| {mem} | {oe} | {ge} | {bits} | {verdict_cell(r)} |")


# ---- the divergence table ------------------------------------------------------------------------


def sampled_rows(n: int, v: int, seed: int, count: int):
    """The rows whose gradient is compared with the float64 reference at shape n × v: the first
    ``count`` of torch.randperm(n) under the seed ``seed + n + v``, sorted."""
    g = torch.Generator().manual_seed(seed + n + v)
    return sorted(torch.randperm(n, generator=g)[:count].tolist())


def run_divergence(shapes, kinds, impls, logits_rows, bw, args, log_fn, emit=None, started=None,
                   device="cuda", dtypes=(torch.bfloat16,), passes=("fwd+bwd",)):
    """The divergence rows, per shape and logits dtype: for each pass every implementation and
    kind (run_one), then (forward + backward) this crate on a logits buffer (run_logits_rows) when
    ``logits_rows``. ``emit(row)``, when given, gets each row as it is measured."""
    started = time.time() if started is None else started
    results = []

    add = _row_adder(results, emit, fmt_row, log_fn)
    cuda = torch.device(device).type == "cuda"

    def free():
        if cuda:
            torch.cuda.empty_cache()

    for n, v in shapes:
        rows = sampled_rows(n, v, args.seed, args.sample_rows)
        for dtype in dtypes:
            name = dtype_name(dtype)
            try:
                s = t = None  # the previous dtype's inputs are gone before these are made
                s = (torch.randn(n, v, device=device) * 2).to(dtype)
                t = (torch.randn(n, v, device=device) * 2).to(dtype)
            except torch.cuda.OutOfMemoryError as e:
                s = t = None  # a half-made pair does not outlive this case
                free()
                for pass_ in passes:
                    for (impl, kind) in impls:
                        add({"impl": impl, "kind": kind, "n": n, "v": v, "dtype": name,
                             "pass": pass_, "error": f"OOM allocating the inputs: {str(e)[:80]}"})
                continue
            refs = {}

            def ref_of(kind):  # reads this case's s, t and refs (no copies kept)
                if kind not in refs:
                    refs[kind] = reference(s, t, kind, rows)
                    free()
                return refs[kind]

            for pass_ in passes:
                floor_ms = divergence_floor_ms(n, v, dtype, pass_, bw)
                for (impl, kind), fn in impls.items():
                    if not is_ours({"impl": impl}) and past_deadline():
                        add({"impl": impl, "kind": kind, "n": n, "v": v, "dtype": name,
                             "pass": pass_, "error": SKIPPED_PAST_DEADLINE})
                        continue
                    ref = ref_of(kind)
                    log_fn(f"[{time.time() - started:6.1f} s] {impl} {kind} {n}x{v} "
                           f"{case_label({'dtype': name, 'pass': pass_})} ...")
                    r = run_one(impl, kind, fn, s, t, ref, rows, floor_ms, args, pass_=pass_)
                    free()  # what run_one allocated is free now
                    r["floor_ms"] = floor_ms
                    add(r)
                for kind in kinds if logits_rows and pass_ == "fwd+bwd" else ():
                    ref = ref_of(kind)
                    log_fn(f"[{time.time() - started:6.1f} s] distill_kernels {kind} {n}x{v} "
                           f"{name}, logits buffer ...")
                    for r in run_logits_rows(kind, s, t, ref, rows, floor_ms, args):
                        r["floor_ms"] = floor_ms
                        add(r)
                    free()
            s = t = refs = None
            free()
    return results


TABLE_HEADERS = {"results": DIVERGENCE_HEADER, "moe": MOE_HEADER, "fused": FUSED_HEADER,
                 "attention": ATTN_HEADER}
ROW_FORMATS = {"results": fmt_row, "moe": fmt_moe_row, "fused": fmt_fused_row,
               "attention": fmt_attn_row}
# What a section's row needs to be printed, for the row that says a whole section stopped.
_SECTION_BLANKS = {"results": {"kind": "-", "n": "-", "v": "-"}, "moe": {"op": "-", "shape": "-"},
                   "fused": {"shape": "-"}, "attention": {"shape": "-", "pass": "-"}}


def _run_section(report, section, run) -> None:
    """run(emit) with its rows going to ``report``; an exception that escapes the runner (a bug,
    not a failed row) becomes a failed row of this crate instead of ending the run."""
    try:
        run(lambda row: report.add(section, row))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report.add(section, {"impl": "distill_kernels", **_SECTION_BLANKS[section],
                             "error": f"section stopped: {_one_line(e)}"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    p.add_argument("--shapes", help="comma-separated NxV list, e.g. 4096x151936,4096x202048")
    p.add_argument("--kinds", default="forward_kl,jsd",
                   help="comma-separated: forward_kl, reverse_kl, jsd (beta 0.5)")
    p.add_argument("--dtypes", default="bf16",
                   help="the divergence's logits dtypes, comma-separated: bf16, f32")
    p.add_argument("--passes", default="fwd+bwd",
                   help="the divergence's passes, comma-separated: fwd+bwd (forward + backward), "
                   "fwd (forward only)")
    p.add_argument("--impls", default="", help="only these implementations (comma-separated "
                   "substrings of: torch eager, torch.compile, Liger, distill_kernels; "
                   "num_items adds this crate's rows with num_items as a device tensor)")
    p.add_argument("--ops", default="divergence,moe", help="comma-separated: divergence, "
                   "moe_route, moe_permute, moe_combine, moe (the three MoE ops), fused (the "
                   "fused linear JSD) and attention (grouped-query attention, forward and "
                   "forward + backward; fused and attention are not in the default set)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--sample-rows", type=int, default=4, help="rows whose gradient is checked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    step_limit = os.environ.get("GPU_CHECK_STEP_LIMIT", "")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   default=float(step_limit) - 20 if step_limit.isdigit() else None,
                   help="seconds from the start after which the other implementations' rows "
                   "(torch eager, torch.compile, Liger) are skipped and this crate's still run, "
                   "so a time limit cuts baselines; default: scripts/gpu-check.sh's step limit "
                   "(GPU_CHECK_STEP_LIMIT) minus 20, else none")
    args = p.parse_args(argv)
    global _DEADLINE
    _DEADLINE = None if args.deadline is None else time.time() + args.deadline
    # A time limit's SIGTERM (timeout(1)) unwinds like an exception, so the JSON write above
    # cleans up after itself; the rows already written stay.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    if not torch.cuda.is_available():
        print("bench.py needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
        if k not in EAGER:
            p.error(f"unknown kind {k!r} (forward_kl, reverse_kl, jsd)")
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtype_names:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r} (bf16, f32)")
    dtypes = [DTYPES[d] for d in dtype_names]
    passes = [x.strip() for x in args.passes.split(",") if x.strip()]
    for x in passes:
        if x not in PASSES:
            p.error(f"unknown pass {x!r} (fwd+bwd, fwd)")
    if not (kinds and dtypes and passes):
        p.error("--kinds, --dtypes and --passes each need at least one value")
    wanted = [w.strip().lower() for w in args.impls.split(",") if w.strip()]
    ops = set()
    for o in (x.strip() for x in args.ops.split(",") if x.strip()):
        if o == "moe":
            ops.update(MOE_OPS)
        elif o in ("divergence", "fused", "attention") or o in MOE_OPS:
            ops.add(o)
        elif o == "attention_bwd":  # forward + backward rows are part of "attention"
            ops.add("attention")
        else:
            p.error(f"unknown op {o!r} (divergence, moe_route, moe_permute, moe_combine, moe, "
                    "fused, attention)")

    torch.manual_seed(args.seed)
    started = time.time()
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    log(f"{dev}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)")
    meta = {"device": dev, "copy_gbps": bw / 1e9, "torch": torch.__version__}
    try:
        import distill_kernels as dk

        meta["distill_kernels"] = dk.version()
    except Exception as e:  # noqa: BLE001
        meta["distill_kernels"] = f"unavailable: {e}"
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if ops & {"divergence", "fused"} and (not wanted or any(w in "liger" for w in wanted)):
        meta["liger"] = liger_info()
        log(f"Liger-Kernel: {fmt_liger(meta['liger'])}")

    report = Report(meta, args.json)
    print(f"{dev}, copy {bw / 1e9:.0f} GB/s, torch {torch.__version__}, "
          f"distill_kernels {meta['distill_kernels']}, jsd beta = {BETA}", flush=True)
    if "liger" in meta:
        print(f"Liger-Kernel: {fmt_liger(meta['liger'])}", flush=True)

    # MoE first: seconds, where the divergence's torch.compile rows take minutes.
    if ops & set(MOE_OPS):
        log(f"[{time.time() - started:6.1f} s] MoE dispatch ...")
        report.preamble("moe", [
            "MoE dispatch, bf16; % of strict floor = minimal bytes (each operand read once, "
            "see --help; dk bench's 'of floor' is ANCHORS.md's 2·R·H·2, its 'strict' this one) "
            "over the copy rate; rel err = ‖x − ref‖ / ‖ref‖ against float32 on the same "
            "routing (route: fraction of tokens whose experts differ from a stable sort's)"])
        _run_section(report, "moe",
                     lambda emit: run_moe(ops, _moe_impls(wanted), bw, args, log, emit=emit))

    if "divergence" in ops:
        impls = make_impls(kinds, wanted=wanted)
        if wanted:
            impls = {k: v for k, v in impls.items() if any(w in k[0].lower() for w in wanted)}
        # This crate on an intermediate logits tensor, separate gradient and in place (see
        # run_logits_rows), after the rows above; only where its face imports.
        logits_rows = any(impl == "distill_kernels" and not isinstance(fn, Exception)
                          for (impl, _), fn in impls.items())
        lines = [f"Divergence, logits {', '.join(dtype_names)}, passes {', '.join(passes)} "
                 "(fwd+bwd: forward + backward, fwd: forward only); floor = each input read "
                 "once and the gradient written once; loss rel err = |loss − ref| / |ref| "
                 "(batchmean over all N rows), grad rel err = ‖g − ref‖ / ‖ref‖ over the sampled "
                 "rows below only, both against float64; extra excl. grad = extra peak memory "
                 "less the [N, V] gradient output, per row (issue 3: ≤ 64 B/row beyond inputs "
                 "and outputs); dk workspace = dk_divergence_workspace_size / N"]
        for n, v in shapes:
            floors = ", ".join(
                f"{case_label({'dtype': d, 'pass': x})} "
                f"{divergence_floor_ms(n, v, d, x, bw):.3f} ms" for d in dtypes for x in passes)
            lines.append(f"floor {n} × {v}: {floors}; gradient checked on rows "
                         f"{sampled_rows(n, v, args.seed, args.sample_rows)}")
        report.preamble("results", lines)
        _run_section(report, "results", lambda emit: run_divergence(
            shapes, kinds, impls, logits_rows, bw, args, log, emit=emit, started=started,
            dtypes=dtypes, passes=passes))

    if "fused" in ops:
        log(f"[{time.time() - started:6.1f} s] fused linear JSD ...")
        report.preamble("fused", [
            f"Fused linear JSD (beta = {BETA}), bf16, forward + backward (grad of hidden and "
            "weight); ratio to the four cuBLAS GEMMs of the same run; extra peak with the "
            "gradient outputs and without them (issue 4: ≤ 2 GiB); errors = ‖x − ref‖ / ‖ref‖ "
            "(loss, whole gradients) against fp32 PyTorch on the same inputs"])
        _run_section(report, "fused", lambda emit: run_fused(
            FUSED_QUICK if args.quick else FUSED_SHAPES, _fused_impls(wanted), args, log,
            emit=emit))

    if "attention" in ops:
        log(f"[{time.time() - started:6.1f} s] grouped-query attention ...")
        report.preamble("attention", [
            "Grouped-query attention, bf16, causal, D 128, q/k/v [B, S, H, D] for this crate "
            "and [B, H, S, D] for SDPA; TFLOP/s = 4·B·Hq·S²·D/2 forward, × 3.5 forward + "
            "backward (ANCHORS.md); vs FA2 = ratio to SDPA's flash backend in this run; errors "
            "= ‖x − ref‖ / ‖ref‖ on one (sequence, KV head) slice against float64 (grad: the "
            "largest of dq, dk, dv); bitwise = two runs gave the same bits"])
        _run_section(report, "attention", lambda emit: run_attention(
            ATTN_QUICK if args.quick else ATTN_SHAPES, _attn_impls(wanted), args, log,
            emit=emit))

    report.finished = True
    report.write_json()
    summary = report.summary()
    print(f"\nfinished in {time.time() - started:.0f} s")
    if args.json:
        print(f"wrote {args.json}")
    print(summary, flush=True)
    log(summary)
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
