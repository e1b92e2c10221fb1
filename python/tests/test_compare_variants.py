"""scripts/compare-variants.py, which gpu-check.sh runs on the dk bench tables of a GPU run to
put the kernel variants side by side: it must read both table formats, mark failed checks and
never name a failed row the best."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare-variants.py"

DIV_A = """\
shape           dtype  kind        pass      time ms       GB/s  of floor  grad rel  grad abs  loss rel  check
4096x151936     bf16   forward_kl  fwd+bwd     1.700     2196.0     58.2%    1.6e-3    1.2e-9    2.0e-7  ok
4096x151936     bf16   jsd         fwd+bwd     2.400     1555.0     41.9%    1.6e-3    1.2e-9    2.0e-7  ok
"""
DIV_B = """\
shape           dtype  kind        pass      time ms       GB/s  of floor  grad rel  grad abs  loss rel  check
4096x151936     bf16   forward_kl  fwd+bwd     1.300     2872.0     75.0%    1.6e-3    1.2e-9    2.0e-7  ok
4096x151936     bf16   jsd         fwd+bwd     1.900     1964.0     60.0%    9.9e-1    1.2e-9    2.0e-7  FAILED
"""
ATT = """\
shape                    dtype  pass       time ms    TFLOP/s  vs FA2*  out rel   lse err   grad rel  same  check
phi4-mini 4x4096 24/8    bf16   fwd          1.900      434.0    1.36x    1.7e-3    5.1e-8         -   yes  ok
phi4-mini 4x4096 24/8    bf16   fwd+bwd      9.100      317.0    1.20x    1.7e-3    5.1e-8    1.7e-3   yes  ok
"""


def run(kind, **files):
    args = [f"{name}={path}" for name, path in files.items()]
    r = subprocess.run([sys.executable, str(SCRIPT), kind, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_divergence_side_by_side(tmp_path):
    a, b = tmp_path / "a.out", tmp_path / "b.out"
    a.write_text("dk bench ...\n" + DIV_A)
    b.write_text(DIV_B)
    out = run("divergence", default=a, persist=b, missing=tmp_path / "none.out")
    assert "(missing: no divergence table" in out
    fkl = next(line for line in out.splitlines() if "forward_kl" in line)
    assert "58.2" in fkl and "75.0" in fkl and "persist (1.29x default)" in fkl
    jsd = next(line for line in out.splitlines() if " jsd " in line)
    # The faster variant failed its check: shown with '!', never the best.
    assert "60.0!" in jsd and jsd.rstrip().endswith("default (1.00x default)")


def test_attention_rows_with_spaces_in_the_shape(tmp_path):
    a = tmp_path / "a.out"
    a.write_text(ATT)
    out = run("attention", default=a, again=a)
    rows = [line for line in out.splitlines() if line.startswith("phi4-mini")]
    assert len(rows) == 2 and "434.0" in rows[0] and "317.0" in rows[1]
