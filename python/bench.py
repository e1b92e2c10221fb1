#!/usr/bin/env python3
"""GPU benchmark of the token-level divergence, forward + backward, against what users would pick.

    python python/bench.py                 # shapes of ANCHORS.md: 4096x151936, 4096x202048
    python python/bench.py --quick         # smaller shapes, for a smoke run
    python python/bench.py --shapes 4096x151936,16384x151936 --kinds forward_kl --json out.json

For every shape (bf16 logits) and kind (forward_kl, jsd with beta = 0.5) it times, with
triton.testing.do_bench medians (CUDA events when triton is missing):

- torch eager:   log_softmax (in float32) + F.kl_div, or TRL's generalized_jsd_loss formula
- torch.compile: the same functions compiled
- Liger-Kernel:  LigerKLDIVLoss / LigerJSD plus the log_softmax they need (when importable)
- this crate:    distill_kernels.torch.divergence

and reports the time, the fraction of the floor (3 * N * V * 2 bytes over the device-to-device
copy bandwidth measured in this run), the extra peak memory of one forward + backward (the
gradient included), and the error against a float64 reference (loss over all rows, gradient on a
few sampled rows). Failures (OOM included) become rows of the table instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import math
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- timing -------------------------------------------------------------------------------------


def _events_median(fn, warmup_ms: float, rep_ms: float) -> float:
    """Median time in ms of fn(), with CUDA events around each call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    times = []
    for _ in range(max(5, min(1000, int(rep_ms / est)))):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _events_median(fn, warmup_ms, rep_ms)
    try:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except TypeError:  # older triton: no return_mode
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5]))


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device-to-device copy rate in bytes/s (bytes read + written)."""
    n = int(gib * GIB) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * n * 2 / (ms * 1e-3)


# ---- the implementations --------------------------------------------------------------------


def eager_kl(s, t):
    """torch eager: KL(teacher || student), batchmean, log-probs in float32."""
    ls = F.log_softmax(s.float(), dim=-1)
    lt = F.log_softmax(t.float(), dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True)


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


EAGER = {"forward_kl": eager_kl, "jsd": eager_jsd}


def make_impls(kinds):
    """{(impl, kind): callable(s, t) -> scalar loss, or an Exception explaining its absence}."""
    impls = {}
    for kind in kinds:
        impls[("torch eager", kind)] = EAGER[kind]
    try:
        compiled = {k: torch.compile(EAGER[k], dynamic=False) for k in kinds}
        for kind in kinds:
            impls[("torch.compile", kind)] = compiled[kind]
    except Exception as e:  # noqa: BLE001
        for kind in kinds:
            impls[("torch.compile", kind)] = e
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        liger_kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        liger_jsd = LigerJSD(beta=BETA)

        def liger_kl_fn(s, t):
            return liger_kl(F.log_softmax(s.float(), dim=-1), F.log_softmax(t.float(), dim=-1))

        def liger_jsd_fn(s, t):
            return liger_jsd(F.log_softmax(s.float(), dim=-1), F.log_softmax(t.float(), dim=-1))

        liger = {"forward_kl": liger_kl_fn, "jsd": liger_jsd_fn}
        for kind in kinds:
            impls[("Liger", kind)] = liger[kind]
    except Exception as e:  # noqa: BLE001
        for kind in kinds:
            impls[("Liger", kind)] = ImportError(f"liger-kernel not importable: {e}")
    try:
        import distill_kernels.torch as dkt

        for kind in kinds:
            impls[("distill_kernels", kind)] = (
                lambda s, t, kind=kind: dkt.divergence(s, t, kind=kind, beta=BETA)
            )
    except Exception as e:  # noqa: BLE001
        for kind in kinds:
            impls[("distill_kernels", kind)] = e
    return impls


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
    ls = F.log_softmax(s, dim=-1)
    lt = F.log_softmax(t.double(), dim=-1)
    if kind == "forward_kl":
        rows = (lt.exp() * (lt - ls)).sum(-1)
    else:
        lm = torch.logaddexp(lt + math.log(BETA), ls + math.log1p(-BETA))
        rows = BETA * (lt.exp() * (lt - lm)).sum(-1) + (1 - BETA) * (ls.exp() * (ls - lm)).sum(-1)
    if not grad:
        return rows.detach(), None
    (g,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), g


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


# ---- one row of the table -----------------------------------------------------------------------


def run_one(impl_name, kind, fn, s, t, ref, rows, floor_ms, args):
    row = {"impl": impl_name, "kind": kind, "n": s.shape[0], "v": s.shape[1]}
    if isinstance(fn, Exception):
        row["error"] = f"{type(fn).__name__}: {fn}"
        return row
    x = s.detach().clone().requires_grad_(True)

    def step():
        x.grad = None
        fn(x, t).backward()

    try:
        t0 = time.time()
        x.grad = None
        loss = fn(x, t)  # first call: compiles / loads, and gives the values to check
        loss.backward()
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.time() - t0, 2)
        ref_loss, ref_grad = ref
        loss = loss.detach().reshape(())
        row["loss_err"] = rel_err(loss, torch.tensor(ref_loss, device=loss.device))
        row["grad_err"] = rel_err(x.grad[rows], ref_grad)
        del loss
        # Extra peak memory of one forward + backward (the gradient buffer included).
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["extra_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
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
        x.grad = None
        torch.cuda.synchronize()
    return row


def fmt_row(r) -> str:
    shape = f"{r['n']} × {r['v']}"
    if "error" in r:
        return f"| {r['impl']} | {r['kind']} | {shape} | {r['error']} | | | | |"
    return (
        f"| {r['impl']} | {r['kind']} | {shape} | {r['ms']:.3f} ms | {r['pct_floor']:.1f} % "
        f"| {r['extra_gib']:.2f} GiB | {r['loss_err']:.1e} | {r['grad_err']:.1e} |"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    p.add_argument("--shapes", help="comma-separated NxV list, e.g. 4096x151936,4096x202048")
    p.add_argument("--kinds", default="forward_kl,jsd", help="forward_kl and/or jsd (beta 0.5)")
    p.add_argument("--impls", default="", help="only these implementations (comma-separated "
                   "substrings of: torch eager, torch.compile, Liger, distill_kernels)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--sample-rows", type=int, default=4, help="rows whose gradient is checked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    args = p.parse_args(argv)

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
            p.error(f"unknown kind {k!r} (forward_kl, jsd)")
    wanted = [w.strip().lower() for w in args.impls.split(",") if w.strip()]

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

    impls = make_impls(kinds)
    if wanted:
        impls = {k: v for k, v in impls.items() if any(w in k[0].lower() for w in wanted)}
    results = []
    for n, v in shapes:
        floor_ms = 3 * n * v * 2 / bw * 1e3
        try:
            s = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16)
            t = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16)
        except torch.cuda.OutOfMemoryError as e:
            for (impl, kind) in impls:
                results.append({"impl": impl, "kind": kind, "n": n, "v": v,
                                "error": f"OOM allocating the inputs: {str(e)[:80]}"})
            continue
        g = torch.Generator().manual_seed(args.seed + n + v)
        rows = sorted(torch.randperm(n, generator=g)[: args.sample_rows].tolist())
        refs = {}
        for (impl, kind), fn in impls.items():
            if kind not in refs:
                refs[kind] = reference(s, t, kind, rows)
                torch.cuda.empty_cache()
            log(f"[{time.time() - started:6.1f} s] {impl} {kind} {n}x{v} ...")
            r = run_one(impl, kind, fn, s, t, refs[kind], rows, floor_ms, args)
            torch.cuda.empty_cache()  # what run_one allocated is free now
            r["floor_ms"] = floor_ms
            results.append(r)
            log("    " + fmt_row(r))
        del s, t, refs
        torch.cuda.empty_cache()

    print()
    print(f"{dev}, copy {bw / 1e9:.0f} GB/s, torch {torch.__version__}, "
          f"distill_kernels {meta['distill_kernels']}, bf16 forward + backward, "
          f"jsd beta = {BETA}, {time.time() - started:.0f} s")
    for n, v in shapes:
        print(f"floor {n} × {v}: {3 * n * v * 2 / bw * 1e3:.3f} ms")
    print()
    print("| implementation | kind | N × V | time | % of floor | extra peak memory "
          "| loss rel err | grad rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(fmt_row(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
