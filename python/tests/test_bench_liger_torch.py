"""bench.py's Liger-Kernel call paths, on CPU: the calls it times compute this crate's quantity.

bench.py compares the fused linear JSD and the divergence with Liger-Kernel on a GPU. Its Liger
calls (LigerFusedLinearJSD with shift_labels, the chunked LigerFusedLinearJSDLoss with the hard
loss weighted 0, LigerJSD with our β) and its convention probe (``_liger_checked``) are checked
here on small CPU float32 problems against bench.py's own references, in a subprocess where
Triton runs its kernels through its interpreter (TRITON_INTERPRET=1, set only there, never in
this process).

Needs torch and liger-kernel (with triton); skipped otherwise, with the reason shown by
``pytest -rs`` (CI has neither). Also skipped where CUDA is available: there bench.py runs the
same probe on the GPU before timing each Liger variant.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: bench.py Liger checks skipped")
for _mod in ("liger_kernel", "triton"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed: bench.py Liger checks skipped",
                    allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("CUDA is available: bench.py probes the Liger conventions on the GPU itself",
                allow_module_level=True)

PY_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import bench

torch.manual_seed(0)
out = {}
n, h, v = 40, 24, 260
hs = torch.randn(n, h)
ws = torch.randn(v, h) * 0.4
ht = torch.randn(n, h)
wt = torch.randn(v, h) * 0.4
ref_loss, ref_gh, ref_gw = bench._fused_reference(hs, ws, ht, wt, chunk=16)

impls = bench._fused_impls([], device="cpu", compiled=False)
for name in (bench.LIGER_FUSED, bench.LIGER_CHUNKED, "distill_kernels"):
    fn = impls.get(name)
    if fn is None or isinstance(fn, Exception):
        out[name] = {"error": f"{type(fn).__name__}: {fn}"}
        continue
    a = hs.clone().requires_grad_(True)
    b = ws.clone().requires_grad_(True)
    loss = fn(a, b, ht, wt)
    loss.backward()
    out[name] = {"note": getattr(fn, "note", None),
                 "loss_err": abs(loss.item() - ref_loss) / abs(ref_loss),
                 "gh_err": bench.rel_err(a.grad, ref_gh), "gw_err": bench.rel_err(b.grad, ref_gw)}

# The calls bench.py used to make: the probe refuses or they fail.
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
from liger_kernel.transformers import LigerFusedLinearJSD

old = LigerFusedLinearJSDLoss(beta=bench.BETA, temperature=1.0, compiled=False, chunk_size=16)
probe = bench._fused_probe("cpu")
try:
    bench._liger_checked(
        lambda a, b, c, d: old(a, b, c, d, torch.zeros(a.shape[0], dtype=torch.long)), probe)
    out["old chunked call"] = "accepted"
except bench.ConventionError as e:
    out["old chunked call"] = "refused: " + str(e)
try:
    LigerFusedLinearJSD(jsd_beta=bench.BETA)(hs, ws, ht, wt)
    out["old fused call"] = "ran"
except TypeError as e:
    out["old fused call"] = "TypeError: " + str(e)

# A variant summing over rows is divided by N and says so.
good = impls[bench.LIGER_CHUNKED]
summed = bench._liger_checked(lambda a, b, c, d: good(a, b, c, d) * a.shape[0], probe)
a = hs.clone().requires_grad_(True)
loss = summed(a, ws, ht, wt)
loss.backward()
out["summed"] = {"note": getattr(summed, "note", None),
                 "loss_err": abs(loss.item() - ref_loss) / abs(ref_loss),
                 "gh_err": bench.rel_err(a.grad, ref_gh)}

# Divergence from logits: LigerJSD (and LigerKLDIVLoss, whose kernel Triton's interpreter may not
# run) against bench.py's float64 reference.
s = torch.randn(12, 300) * 2
t = torch.randn(12, 300) * 2
div = bench.make_impls(["forward_kl", "reverse_kl", "jsd"], device="cpu")
for kind in ("forward_kl", "reverse_kl", "jsd"):
    fn = div[("Liger", kind)]
    if isinstance(fn, Exception):
        out["Liger " + kind] = {"error": f"{type(fn).__name__}: {fn}"}
        continue
    rows = [0, 5, 11]
    rl, rg = bench.reference(s, t, kind, rows)
    x = s.clone().requires_grad_(True)
    loss = fn(x, t)
    loss.backward()
    out["Liger " + kind] = {"note": getattr(fn, "note", None),
                            "loss_err": abs(loss.item() - rl) / abs(rl),
                            "grad_err": bench.rel_err(x.grad[rows], rg)}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", SCRIPT, PY_DIR], env=env, capture_output=True,
                       text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, (
        f"check script failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# Failures of Triton's interpreter itself, not of Liger: numpy 2.4 refuses to turn 1-element
# arrays into Python scalars, which Triton 3.6's interpreter does (LigerJSD, LigerFusedLinearJSD);
# LigerKLDIVLoss's kernel calls .to on a Python float, which the interpreter does not support.
_INTERPRETER_LIMITS = ("only 0-dimensional arrays can be converted to Python scalars",
                       "'float' object has no attribute 'to'")


def _skip_on_interpreter_error(r, what):
    """Skips (with the reason) where Triton's interpreter, not Liger, failed to run a kernel, for
    the known interpreter limits above only; on a GPU bench.py runs the same probe through the
    compiled kernels."""
    err = r.get("error", "")
    if "InterpreterError" in err and any(m in err for m in _INTERPRETER_LIMITS):
        pytest.skip(f"Triton's interpreter cannot run {what}'s kernel: {err[:200]}")


@pytest.mark.parametrize("name", ["Liger LigerFusedLinearJSD",
                                  "Liger chunked LigerFusedLinearJSDLoss", "distill_kernels"])
def test_fused_variant_computes_our_jsd(result, name):
    r = result[name]
    if name.startswith("Liger"):
        _skip_on_interpreter_error(r, name)
    assert "error" not in r, r
    assert r["loss_err"] < 1e-5 and r["gh_err"] < 1e-4 and r["gw_err"] < 1e-4, r
    if name.startswith("Liger"):
        assert r["note"] == "convention checked", r


def test_old_calls_are_refused(result):
    assert result["old chunked call"].startswith("refused: not our quantity"), result
    assert "shift_labels" in result["old fused call"], result


def test_summed_variant_is_divided_by_n(result):
    r = result["summed"]
    assert r["note"] == "summed over rows: ÷ N", r
    assert r["loss_err"] < 1e-5 and r["gh_err"] < 1e-4, r


def test_liger_jsd_divergence(result):
    r = result["Liger jsd"]
    _skip_on_interpreter_error(r, "LigerJSD")
    assert "error" not in r, r
    assert r["note"] == "convention checked" and r["loss_err"] < 1e-5 and r["grad_err"] < 1e-4, r


def test_liger_reverse_kl_divergence(result):
    """LigerJSD(beta=1), bench.py's Liger call for the reverse KL, is KL(student ‖ teacher)."""
    r = result["Liger reverse_kl"]
    _skip_on_interpreter_error(r, "LigerJSD")
    assert "error" not in r, r
    assert r["note"] == "convention checked" and r["loss_err"] < 1e-5 and r["grad_err"] < 1e-4, r


def test_liger_kl_divergence(result):
    r = result["Liger forward_kl"]
    _skip_on_interpreter_error(r, "LigerKLDIVLoss")
    assert "error" not in r, r
    assert r["note"] == "convention checked" and r["loss_err"] < 1e-5 and r["grad_err"] < 1e-4, r
