"""bench.py's verdicts, reporting, run order and timing loop, on CPU with CUDA stubbed.

bench.py only runs on a GPU machine, which a session gets rarely and for minutes: what can be
checked without one is checked here, the CUDA calls (events, synchronize, the device name, the
copy bandwidth, the allocator's peak) replaced by stand-ins and the kernels run on CPU tensors
(this crate's CPU backend):
- this crate's rows FAIL when they raised, miss an error, have a non-finite one or one above
  DESIGN.md's tolerance, or were not bitwise reproducible; other implementations' rows never do;
- main exits 1 on such a failure, 0 when only other implementations failed, after printing every
  row and the failure line and writing the JSON; each row is printed and the JSON rewritten as
  soon as the row is measured; MoE runs before the divergence;
- the fused rows run this crate first, the baselines after; the compiled Liger loss falls back to
  its uncompiled twin when torch.compile fails; the memory columns with and without gradients;
  the 2 GiB chunk plan at the Scout shape does not raise;
- the timing loop flushes L2 outside the CUDA events, after the untimed setup, and caps slow
  calls at SLOW_SAMPLES samples.

Needs torch (skipped otherwise, with the reason shown by ``pytest -rs``).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import types

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: bench.py checks skipped")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402

GIB = 1024**3


def div_row(impl="distill_kernels", **kw):
    row = {"impl": impl, "kind": "jsd", "n": 4, "v": 8, "ms": 1.0, "pct_floor": 50.0,
           "extra_gib": 0.1, "loss_err": 1e-6, "grad_err": 2e-3}
    row.update(kw)
    return row


# ---- verdicts -----------------------------------------------------------------------------------


def test_ok_row_of_this_crate_passes_and_other_rows_are_not_judged():
    assert bench.row_failures("results", div_row()) == []
    for bad in (div_row("torch eager", error="OOM: out of memory"),
                div_row("Liger", grad_err=float("nan")), div_row("torch.compile", loss_err=1.0)):
        assert bench.row_failures("results", bad) is None


@pytest.mark.parametrize("change, reason", [
    ({"error": "RuntimeError: boom"}, "raised: RuntimeError: boom"),
    ({"grad_err": float("nan")}, "grad_err = nan"),
    ({"loss_err": float("inf")}, "loss_err = inf"),
    ({"grad_err": 1.5e-2}, "grad_err 1.50e-02 > 1e-02"),
    ({"loss_err": 2e-4}, "loss_err 2.00e-04 > 1e-04"),
    ({"loss_err": None}, "loss_err missing (no reference)"),
])
def test_divergence_row_of_this_crate_fails(change, reason):
    row = div_row("distill_kernels num_items tensor", **change)
    if change.get("loss_err", 0) is None:
        del row["loss_err"]
    assert bench.row_failures("results", row) == [reason]


def test_f32_rows_get_the_f32_tolerance():
    assert bench.row_failures("results", div_row(dtype="float32", grad_err=5e-6)) == []
    assert bench.row_failures("results", div_row(dtype="float32", grad_err=2e-5)) == [
        "grad_err 2.00e-05 > 1e-05"]


def test_moe_and_attention_rows_need_equal_bits():
    moe = {"op": "combine bwd", "impl": "distill_kernels", "shape": "s", "ms": 1.0,
           "pct_floor": 80.0, "err": 3e-3, "bitwise": True}
    assert bench.row_failures("moe", moe) == []
    assert bench.row_failures("moe", {**moe, "bitwise": False}) == ["two runs gave different bits"]
    assert bench.row_failures("moe", {**moe, "bitwise": None}) == ["bitwise check missing"]
    # The route: any token routed to other experts than a stable sort's fails.
    route = {**moe, "op": "route", "err": 0.0}
    assert bench.row_failures("moe", route) == []
    assert bench.row_failures("moe", {**route, "err": 1 / 16384}) == [
        "err 6.10e-05 > 0e+00"]
    attn = {"impl": "distill_kernels (atomic dQ)", "shape": "s", "pass": "fwd+bwd", "ms": 1.0,
            "out_err": 4e-3, "grad_err": 5e-3, "bitwise": True}
    assert bench.row_failures("attention", attn) == []
    assert bench.row_failures("attention", {**attn, "grad_err": 0.02}) == [
        "grad_err 2.00e-02 > 1e-02"]
    fwd = {k: v for k, v in attn.items() if k != "grad_err"}
    assert bench.row_failures("attention", {**fwd, "pass": "fwd"}) == []  # no gradient: not asked
    assert bench.row_failures("attention", {**attn, "impl": "SDPA cuDNN", "bitwise": None}) is None


def test_fused_rows_check_loss_and_both_gradients():
    row = {"impl": "distill_kernels (≤ 2 GiB)", "shape": "s", "ms": 1.0, "ratio": 1.2,
           "extra_gib": 1.0, "loss_err": 3e-6, "grad_hidden_err": 2e-3, "grad_weight_err": 3e-3}
    assert bench.row_failures("fused", row) == []
    assert bench.row_failures("fused", {**row, "grad_weight_err": float("nan")}) == [
        "grad_weight_err = nan"]
    no_ref = {k: v for k, v in row.items() if not k.endswith("_err")}
    assert len(bench.row_failures("fused", no_ref)) == 3


# ---- the report and main ------------------------------------------------------------------------


def test_report_prints_and_writes_each_row_as_it_comes(tmp_path):
    out = io.StringIO()
    path = tmp_path / "r.json"
    rep = bench.Report({"device": "x"}, str(path), out=out)
    rep.preamble("results", ["the preamble"])
    rep.add("results", div_row("torch eager", error="OOM: no"))
    text = out.getvalue()
    assert text.index("the preamble") < text.index("| implementation |") < text.index("OOM: no")
    doc = json.loads(path.read_text())
    assert doc["finished"] is False and len(doc["results"]) == 1 and doc["failures"] == []
    rep.add("results", div_row(grad_err=float("nan")))
    doc = json.loads(path.read_text())
    assert doc["results"][1]["verdict"] == "FAIL" and doc["failures"] == [
        "divergence distill_kernels jsd 4x8 bf16 fwd+bwd: grad_err = nan"]
    assert out.getvalue().count("| implementation |") == 1  # one header per table
    assert out.getvalue().rstrip().endswith("| FAIL |")
    assert rep.summary().startswith("FAIL: 1 of 1 distill_kernels rows: divergence")
    assert not os.path.exists(f"{path}.tmp")


@pytest.fixture
def fake_cuda(monkeypatch):
    """main's CUDA calls replaced: a device that exists, a copy rate, no real benchmarks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H200")
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a: 4.0e12)
    monkeypatch.setattr(bench, "liger_info", lambda: {"version": "stub"})
    monkeypatch.setattr(bench, "_moe_impls", lambda wanted: {})
    monkeypatch.setattr(bench, "make_impls", lambda kinds, wanted=None: {})


MOE_OK = {"op": "permute fwd", "impl": "distill_kernels", "shape": "s", "ms": 0.1,
          "pct_floor": 80.0, "err": 0.0, "bitwise": True}
MOE_EAGER_OOM = {"op": "permute fwd", "impl": "torch eager", "shape": "s", "error": "OOM: x"}


def _stub_moe(rows, seen=None, capsys=None, path=None):
    def run_moe(ops, impls, bw, args, log_fn, emit=None):
        for row in rows:
            emit(dict(row))
            if seen is not None:  # what a run stopped here would have left
                seen.append((capsys.readouterr().out, json.loads(path.read_text())))
        return rows

    return run_moe


def test_main_exits_0_when_only_other_implementations_fail(fake_cuda, monkeypatch, tmp_path,
                                                            capsys):
    path = tmp_path / "b.json"
    seen = []
    monkeypatch.setattr(bench, "run_moe", _stub_moe([MOE_EAGER_OOM, MOE_OK], seen, capsys, path))
    assert bench.main(["--ops", "moe", "--json", str(path)]) == 0
    # Each row on stdout and in the JSON before the next was measured.
    assert "OOM: x" in seen[0][0] and len(seen[0][1]["moe"]) == 1
    assert seen[0][1]["finished"] is False
    assert "| ok |" in seen[1][0] and len(seen[1][1]["moe"]) == 2
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("ok: all 1 distill_kernels rows ran")
    doc = json.loads(path.read_text())
    assert doc["finished"] is True and doc["failures"] == []


def test_main_exits_1_when_a_row_of_this_crate_fails(fake_cuda, monkeypatch, tmp_path, capsys):
    path = tmp_path / "b.json"
    rows = [MOE_OK, {**MOE_OK, "op": "permute bwd", "bitwise": False}]
    monkeypatch.setattr(bench, "run_moe", _stub_moe(rows))
    assert bench.main(["--ops", "moe", "--json", str(path)]) == 1
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1] == ("FAIL: 1 of 2 distill_kernels rows: moe permute bwd distill_kernels [s]: "
                       "two runs gave different bits")
    assert any(line.endswith("| NO | FAIL |") for line in out)
    doc = json.loads(path.read_text())
    assert doc["finished"] is True and len(doc["failures"]) == 1


def test_a_runner_that_crashes_is_a_failure_not_a_stopped_run(fake_cuda, monkeypatch, capsys):
    def run_moe(*a, **kw):
        raise KeyError("bug")

    monkeypatch.setattr(bench, "run_moe", run_moe)
    assert bench.main(["--ops", "moe", "--quick"]) == 1
    assert "section stopped: KeyError" in capsys.readouterr().out.rstrip().splitlines()[-1]


def test_default_ops_run_moe_before_the_divergence(fake_cuda, monkeypatch, capsys):
    calls = []

    def run_moe(*a, emit=None, **kw):
        calls.append("moe")
        return []

    def run_divergence(shapes, kinds, impls, logits_rows, bw, args, log_fn, emit=None,
                       started=None, dtypes=None, passes=None):
        calls.append(("divergence", tuple(kinds), tuple(dtypes), tuple(passes)))
        emit(div_row(n=shapes[0][0], v=shapes[0][1]))
        return []

    monkeypatch.setattr(bench, "run_moe", run_moe)
    monkeypatch.setattr(bench, "run_divergence", run_divergence)
    assert bench.main(["--shapes", "256x151936"]) == 0
    assert calls == ["moe", ("divergence", ("forward_kl", "jsd"), (torch.bfloat16,), ("fwd+bwd",))]
    out = capsys.readouterr().out
    rows = bench.sampled_rows(256, 151936, 0, 4)
    assert f"floor 256 × 151936: bf16 fwd+bwd {3 * 256 * 151936 * 2 / 4.0e12 * 1e3:.3f} ms" in out
    assert f"gradient checked on rows {rows}" in out and "over the sampled rows" in out


def test_kinds_dtypes_and_passes_reach_the_divergence_and_its_floors(fake_cuda, monkeypatch,
                                                                    capsys):
    """--kinds / --dtypes / --passes (issue 3's reverse KL, f32 logits, forward only): passed on,
    one floor per dtype and pass (3 units forward + backward, 2 forward only, 4-byte f32)."""
    calls = []

    def run_divergence(shapes, kinds, impls, logits_rows, bw, args, log_fn, emit=None,
                       started=None, dtypes=None, passes=None):
        calls.append((tuple(kinds), tuple(dtypes), tuple(passes), sorted({k for _, k in impls})))
        emit(div_row(kind="reverse_kl", n=shapes[0][0], v=shapes[0][1], dtype="float32",
                     **{"pass": "fwd"}))
        return []

    monkeypatch.setattr(bench, "run_divergence", run_divergence)
    monkeypatch.setattr(bench, "make_impls", lambda kinds, wanted=None: {
        ("distill_kernels", k): (lambda s, t: None) for k in kinds})
    argv = ["--ops", "divergence", "--shapes", "4096x151936", "--kinds", "reverse_kl",
            "--dtypes", "bf16,f32", "--passes", "fwd+bwd,fwd"]
    assert bench.main(argv) == 0
    assert calls == [(("reverse_kl",), (torch.bfloat16, torch.float32), ("fwd+bwd", "fwd"),
                      ["reverse_kl"])]
    out = capsys.readouterr().out
    floor = [f"{u * 4096 * 151936 * e / 4.0e12 * 1e3:.3f} ms" for e in (2, 4) for u in (3, 2)]
    assert (f"floor 4096 × 151936: bf16 fwd+bwd {floor[0]}, bf16 fwd {floor[1]}, f32 fwd+bwd "
            f"{floor[2]}, f32 fwd {floor[3]};") in out
    assert "| distill_kernels | reverse_kl | 4096 × 151936 | f32 fwd | 1.000 ms |" in out


@pytest.mark.parametrize("flag, value", [("--kinds", "kl"), ("--dtypes", "fp8"),
                                         ("--dtypes", "f16"), ("--passes", "bwd"),
                                         ("--passes", ",")])
def test_unknown_kinds_dtypes_and_passes_are_refused(fake_cuda, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--ops", "divergence", flag, value])
    assert e.value.code == 2


def test_memory_columns_leave_the_gradient_out():
    row = {"impl": "distill_kernels"}
    n, v = 256, 151936
    grad = n * v * 2
    bench._memory_columns(row, grad + 64 * n, grad, n, "cpu")
    assert row["extra_bytes_per_row_excl_grad"] == 64
    assert row["extra_gib"] == pytest.approx((grad + 64 * n) / GIB)
    assert row["workspace_bytes_per_row"] == 0  # the CPU backend's workspace: none


@pytest.mark.parametrize("section, row", [
    ("moe", MOE_OK), ("moe", MOE_EAGER_OOM),
    ("attention", {"impl": "distill_kernels", "shape": "s", "pass": "fwd+bwd", "ms": 2.0,
                   "tflops": 300.0, "vs_fa2": 1.1, "extra_gib": 0.5, "out_err": 1e-3,
                   "grad_err": 2e-3, "bitwise": True}),
    ("attention", {"impl": "SDPA cuDNN", "shape": "s", "pass": "fwd", "error": "refused"}),
    ("results", div_row(extra_bytes_per_row_excl_grad=40.0, workspace_bytes_per_row=8.0)),
    ("results", div_row("torch eager", error="OOM: x")),
])
def test_every_row_has_its_tables_columns(section, row):
    out = io.StringIO()
    rep = bench.Report({}, None, out=out)
    rep.add(section, dict(row))
    header, _, line = out.getvalue().splitlines()[1:4]
    assert header == bench.TABLE_HEADERS[section][0]
    assert line.count("|") == header.count("|"), line
    assert line.endswith("| ok |") == (bench.is_ours(row) and "error" not in row), line


# ---- the fused rows -----------------------------------------------------------------------------


def test_two_gib_plan_does_not_raise_at_the_scout_shape():
    rows, note = bench.fused_2gib_chunk(16384, 5120, 202048, 2)
    assert rows >= 64 and rows % 64 == 0 and "beyond the gradients, 2.08 GiB alone" in note
    # Phi-4-mini: the gradients (1.17 GiB) leave room: the stricter count.
    rows_phi, note_phi = bench.fused_2gib_chunk(4096, 3072, 200064, 2)
    assert note_phi.endswith("≤ 2 GiB with the gradients") and 64 <= rows_phi < rows
    ld = 200064
    used = 8 * rows_phi * ld + (4096 + 200064) * 3072 * 2 + bench.FUSED_MARGIN
    assert used < 2 * GIB  # the chunk's f32 logits, the gradients and the margin fit


def test_fused_runs_this_crate_first_then_the_baselines(monkeypatch):
    monkeypatch.setattr(bench, "bench_ms", lambda fn, *a, **kw: (fn(), 2.0)[1])
    monkeypatch.setattr(bench, "extra_peak_bytes", lambda step: (step(), 3 * GIB)[1])
    ours = bench._fused_impls(["distill"], device="cpu")
    assert list(ours) == ["distill_kernels", "distill_kernels (f32 grads)",
                          "distill_kernels (≤ 2 GiB)"]

    def compiled(*a):
        raise RuntimeError("torch.compile: backend failed")

    compiled.note = "convention checked"

    def twin(*a):  # the uncompiled loss: the same quantity
        return bench._fused_eager(*a)

    twin.note = "convention checked"
    compiled.uncompiled = twin
    impls = {"torch eager": bench._fused_eager,
             bench.LIGER_FUSED: bench.ConventionError("not our quantity"),
             bench.LIGER_CHUNKED: compiled, **ours}
    out = io.StringIO()
    rep = bench.Report({}, None, out=out)
    args = types.SimpleNamespace(warmup_ms=0, rep_ms=0, verbose=False)
    rows = bench.run_fused([("tiny", 24, 16, 40), ("small", 20, 8, 72)], impls, args,
                           lambda m: None, emit=lambda r: rep.add("fused", r), device="cpu")
    emitted = rep.rows["fused"]
    gemms, dk = "4 cuBLAS GEMMs (torch.matmul)", list(ours)
    baselines = ["torch eager", bench.LIGER_FUSED, bench.LIGER_CHUNKED]
    # Every shape's GEMMs and this crate's rows, then every shape's baselines.
    assert [(r["impl"], r["shape"].split(":")[0]) for r in emitted] == (
        [(i, "tiny") for i in [gemms] + dk] + [(i, "small") for i in [gemms] + dk]
        + [(i, "tiny") for i in baselines] + [(i, "small") for i in baselines])
    assert emitted == rows
    by = {r["impl"]: r for r in rows if r["shape"].startswith("tiny")}
    assert by["4 cuBLAS GEMMs (torch.matmul)"]["ms"] == 8.0
    for name in ours:
        r = by[name]
        assert bench.row_failures("fused", r) == [], r
        assert r["ratio"] == pytest.approx(0.25)
    grads = (24 * 16 + 40 * 16)
    assert by["distill_kernels"]["extra_excl_grads_gib"] == pytest.approx(3 - grads * 2 / GIB)
    assert by["distill_kernels (f32 grads)"]["extra_excl_grads_gib"] == pytest.approx(
        3 - grads * 4 / GIB)
    assert by["distill_kernels (≤ 2 GiB)"]["note"] == (
        "chunks of 24 rows, ≤ 2 GiB with the gradients")
    chunked = by[bench.LIGER_CHUNKED]
    assert "error" not in chunked and chunked["note"].startswith(
        "uncompiled: torch.compile failed (RuntimeError: torch.compile: backend failed)")
    assert chunked["loss_err"] < 1e-2
    assert "ConventionError" in by[bench.LIGER_FUSED]["error"]
    assert bench.row_failures("fused", by[bench.LIGER_FUSED]) is None
    lines = out.getvalue().splitlines()
    assert lines[1] == bench.FUSED_HEADER[0] and len(lines) == 3 + len(rows) == 3 + 14
    for line, r in zip(lines[3:], rows):  # every row has the header's columns
        assert line.count("|") == bench.FUSED_HEADER[0].count("|"), line
        assert line.endswith("| ok |") == bench.is_ours(r), line


def test_a_failing_liger_call_without_twin_stays_the_rows_error(monkeypatch):
    monkeypatch.setattr(bench, "bench_ms", lambda fn, *a, **kw: 1.0)

    def compiled(*a):
        raise RuntimeError("torch.compile: backend failed")

    args = types.SimpleNamespace(warmup_ms=0, rep_ms=0, verbose=False)
    hs, ws = torch.randn(4, 8).bfloat16(), torch.randn(10, 8).bfloat16()
    row = bench.run_fused_row("torch eager", compiled, hs, ws, hs, ws, None, 1.0, "s", args,
                              lambda m: None)
    assert row["error"].startswith("RuntimeError: torch.compile")


# ---- timing -------------------------------------------------------------------------------------


class FakeGPU:
    """CUDA events on a fake clock: fn, setup and the flush advance it by their own times, so a
    timing that takes in anything but fn shows it."""

    def __init__(self, fn_ms, setup_ms=3.0, flush_ms=7.0):
        self.t, self.log = 0.0, []
        self.fn_ms, self.setup_ms, self.flush_ms = fn_ms, setup_ms, flush_ms
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = gpu.t
                gpu.log.append("record")

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.at - self.at

        self.Event = Event

    def fn(self):
        self.t += self.fn_ms
        self.log.append("fn")

    def setup(self):
        self.t += self.setup_ms
        self.log.append("setup")

    def flush(self):
        self.t += self.flush_ms
        self.log.append("flush")


@pytest.fixture
def fake_gpu(monkeypatch):
    def make(fn_ms):
        gpu = FakeGPU(fn_ms)
        monkeypatch.setattr(torch.cuda, "Event", gpu.Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(bench, "l2_flush", gpu.flush)
        return gpu

    return make


def _timed(log):
    """The calls between a pair of events, and what came right before each start event."""
    spans, before, i = [], [], 0
    while i < len(log):
        if log[i] == "record":
            j = log.index("record", i + 1)
            spans.append(log[i + 1:j])
            before.append(log[max(0, i - 2):i])
            i = j + 1
        else:
            i += 1
    return spans, before


@pytest.mark.parametrize("fn_ms", [0.05, 20.0])
def test_events_time_fn_alone_with_the_flush_after_setup(fake_gpu, fn_ms):
    gpu = fake_gpu(fn_ms)
    ms = bench._events_median(gpu.fn, 25, 100, setup=gpu.setup)
    assert ms == pytest.approx(fn_ms)  # neither the refill nor the flush inside the events
    spans, before = _timed(gpu.log)
    assert all(s == ["fn"] for s in spans)
    assert all(b == ["setup", "flush"] for b in before)  # refill, then flush, then start
    assert len(spans) >= bench.MIN_SAMPLES + 1  # the estimate, then the samples


def test_slow_calls_get_a_fixed_small_number_of_samples(fake_gpu):
    gpu = fake_gpu(1200.0)
    assert bench.bench_ms(gpu.fn, 25, 100) == pytest.approx(1200.0)
    spans, before = _timed(gpu.log)
    assert len(spans) == bench.SLOW_SAMPLES
    assert gpu.log.count("fn") == bench.SLOW_SAMPLES + 1  # one untimed warm call, no warm-up
    assert all(b[-1] == "flush" for b in before)


def test_l2_flush_leaves_the_read_buffer_clean():
    f = bench.L2Flush(nbytes=4096, device="cpu")
    f.dirty.fill_(7)
    f()
    assert torch.count_nonzero(f.dirty) == 0
    assert torch.equal(f.clean, torch.ones(1024))  # read, never written
    assert f.sink.item() == 1024.0 and f.sink.dim() == 0


def test_logits_rows_time_with_the_flushing_loop_and_their_refill_as_setup(monkeypatch):
    """run_logits_rows's default timer is _events_median (whose flush follows setup, above),
    with the logits refill as its setup."""
    calls = []

    def events_median(fn, warmup_ms, rep_ms, setup=None):
        calls.append(setup)
        setup()
        fn()
        return 1.0

    monkeypatch.setattr(bench, "_events_median", events_median)
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, 50, generator=g) * 2).to(torch.bfloat16)
    t = (torch.randn(6, 50, generator=g) * 2).to(torch.bfloat16)
    ref = bench.reference(s, t, "jsd", [1, 4])
    args = types.SimpleNamespace(warmup_ms=0, rep_ms=0, verbose=True)
    out = bench.run_logits_rows("jsd", s, t, ref, [1, 4], floor_ms=1.0, args=args)
    assert len(calls) == 2 and all(callable(c) for c in calls)
    assert all(bench.row_failures("results", r) == [] for r in out), out
    assert [r["ms"] for r in out] == [1.0, 1.0]


def test_divergence_rows_on_cpu_through_the_report(monkeypatch):
    """run_divergence end to end on CPU tensors (timing and allocator stubbed): every row has the
    header's columns, this crate's rows pass, and the per-row memory leaves the gradient out."""
    import distill_kernels.torch as dkt

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(bench, "bench_ms", lambda fn, *a, **kw: (fn(), 0.5)[1])
    monkeypatch.setattr(bench, "_events_median",
                        lambda fn, w, r, setup=None: (setup(), fn(), 0.5)[2])
    n, v = 16, 300
    monkeypatch.setattr(bench, "extra_peak_bytes", lambda step: (step(), n * v * 2 + 32 * n)[1])
    impls = {("torch eager", "jsd"): bench.eager_jsd,
             ("distill_kernels", "jsd"): lambda s, t: dkt.divergence(s, t, kind="jsd",
                                                                     beta=bench.BETA),
             ("Liger", "jsd"): ImportError("liger-kernel not importable: stub")}
    out = io.StringIO()
    rep = bench.Report({}, None, out=out)
    args = types.SimpleNamespace(warmup_ms=0, rep_ms=0, verbose=True, seed=0, sample_rows=3)
    rows = bench.run_divergence([(n, v)], ["jsd"], impls, True, 1e12, args, lambda m: None,
                                emit=lambda r: rep.add("results", r), device="cpu")
    assert [(r["impl"], r.get("inplace")) for r in rows] == [
        ("torch eager", None), ("distill_kernels", None), ("Liger", None),
        ("distill_kernels", False), ("distill_kernels", True)]
    assert [r.get("verdict") for r in rows] == [None, "ok", None, "ok", "ok"]
    assert rows[1]["extra_bytes_per_row_excl_grad"] == 32  # the [N, V] bf16 gradient left out
    assert rows[1]["workspace_bytes_per_row"] == 0
    assert rows[1]["pct_floor"] == pytest.approx(100 * 3 * n * v * 2 / 1e12 * 1e3 / 0.5)
    lines = out.getvalue().splitlines()
    assert lines[1] == bench.DIVERGENCE_HEADER[0]
    for line in lines[3:]:
        assert line.count("|") == bench.DIVERGENCE_HEADER[0].count("|"), line
    assert lines[4].startswith("| distill_kernels | jsd | 16 × 300 | bf16 fwd+bwd | 0.500 ms |")
    assert lines[4].endswith("| 32 | 0 | " + f"{rows[1]['loss_err']:.1e} | "
                             f"{rows[1]['grad_err']:.1e} | ok |")


def test_past_the_deadline_baselines_are_skipped_and_this_crates_rows_still_run(monkeypatch):
    """--deadline (gpu-check's step limit minus 20 s): a time limit cuts the baselines, never
    this crate's rows, and the skipped baselines do not fail the run."""
    import distill_kernels.torch as dkt

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(bench, "bench_ms", lambda fn, *a, **kw: (fn(), 0.5)[1])
    monkeypatch.setattr(bench, "_events_median",
                        lambda fn, w, r, setup=None: (setup(), fn(), 0.5)[2])
    monkeypatch.setattr(bench, "extra_peak_bytes", lambda step: (step(), 0)[1])
    monkeypatch.setattr(bench, "_DEADLINE", time.time() - 1.0)
    calls = []

    def eager(s, t):
        calls.append("eager")
        return bench.eager_jsd(s, t)

    impls = {("torch eager", "jsd"): eager,
             ("distill_kernels", "jsd"): lambda s, t: dkt.divergence(s, t, kind="jsd",
                                                                     beta=bench.BETA)}
    args = types.SimpleNamespace(warmup_ms=0, rep_ms=0, verbose=False, seed=0, sample_rows=2)
    rows = bench.run_divergence([(8, 64)], ["jsd"], impls, False, 1e12, args, lambda m: None,
                                device="cpu")
    assert calls == []
    assert rows[0]["impl"] == "torch eager" and rows[0]["error"] == bench.SKIPPED_PAST_DEADLINE
    assert bench.row_failures("results", rows[0]) is None  # not this crate's: informational
    assert rows[1]["impl"] == "distill_kernels" and bench.row_failures("results", rows[1]) == []
    fused = bench._fused_impls(["distill"], device="cpu")
    frows = bench.run_fused([("tiny", 24, 16, 40)], {"torch eager": bench._fused_eager, **fused},
                            args, lambda m: None, device="cpu")
    skipped = [r for r in frows if r.get("error") == bench.SKIPPED_PAST_DEADLINE]
    assert [r["impl"] for r in skipped] == ["torch eager"]
    assert all(bench.row_failures("fused", r) == [] for r in frows if bench.is_ours(r))
    monkeypatch.setattr(bench, "_DEADLINE", None)
    assert not bench.past_deadline()


def test_every_kind_dtype_and_pass_on_cpu(monkeypatch):
    """run_divergence on CPU tensors for issue 3's other rows: reverse KL, f32 logits, forward
    only. torch eager (TRL's formulas, an independent computation) and this crate agree with the
    float64 reference within DESIGN.md's tolerances; forward-only rows have no gradient, a
    floor of 2 units and nothing of the gradient in their memory; the logits-buffer rows run
    with forward + backward only."""
    import distill_kernels.torch as dkt

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(bench, "bench_ms", lambda fn, *a, **kw: (fn(), 0.5)[1])
    monkeypatch.setattr(bench, "_events_median",
                        lambda fn, w, r, setup=None: (setup(), fn(), 0.5)[2])
    grad_seen = []

    def peak(step):
        out = step()
        grad_seen.append(out.requires_grad)
        return 1000

    monkeypatch.setattr(bench, "extra_peak_bytes", peak)
    kinds = ["forward_kl", "reverse_kl", "jsd"]
    impls = {}
    for kind in kinds:
        impls[("torch eager", kind)] = bench.EAGER[kind]
        impls[("distill_kernels", kind)] = (
            lambda s, t, kind=kind: dkt.divergence(s, t, kind=kind, beta=bench.BETA))
    args = types.SimpleNamespace(warmup_ms=0, rep_ms=0, verbose=True, seed=0, sample_rows=3)
    n, v, bw = 12, 257, 1e12
    rows = bench.run_divergence([(n, v)], kinds, impls, True, bw, args, lambda m: None,
                                device="cpu", dtypes=(torch.bfloat16, torch.float32),
                                passes=("fwd+bwd", "fwd"))
    plain = [r for r in rows if "inplace" not in r]
    assert len(plain) == 2 * 2 * len(impls) and all("error" not in r for r in rows), rows
    for r in plain:
        f32 = r["dtype"] == "float32"
        assert r["floor_ms"] == pytest.approx(
            (3 if r["pass"] == "fwd+bwd" else 2) * n * v * (4 if f32 else 2) / bw * 1e3)
        assert r["loss_err"] < (1e-5 if f32 else 1e-4), r
        if r["pass"] == "fwd":
            assert "grad_err" not in r and r["extra_bytes_per_row_excl_grad"] == 1000 / n, r
        else:
            assert r["grad_err"] < (1e-5 if f32 else 1e-2), r
            assert r["extra_bytes_per_row_excl_grad"] < 0, r  # the gradient left out
        if bench.is_ours(r):
            assert bench.row_failures("results", r) == [], r
    # forward-only calls build no graph
    assert grad_seen == [p == "fwd+bwd" for p in [r["pass"] for r in plain]]
    logits = [r for r in rows if "inplace" in r]
    assert sorted({(r["kind"], r["dtype"], r["pass"]) for r in logits}) == sorted(
        (k, d, "fwd+bwd") for k in kinds for d in ("bfloat16", "float32"))
    assert all(bench.row_failures("results", r) == [] for r in logits), logits
    text = "\n".join(bench.fmt_row(r) for r in rows)
    assert "| torch eager | reverse_kl | 12 × 257 | f32 fwd | 0.500 ms |" in text
    assert all(line.count("|") == bench.DIVERGENCE_HEADER[0].count("|")
               for line in text.splitlines())
