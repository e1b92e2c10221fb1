#!/usr/bin/env python3
"""Side by side: the same `dk bench` rows under several kernel variants, from the stdout of
each run (the tables gpu-check.sh prints one after another), so that a run's decision (which
variant should be the default) reads off one table.

usage: compare-variants.py divergence|attention NAME=FILE [NAME=FILE ...]

divergence: the fraction of the copy-bandwidth floor per (shape, dtype, kind, pass);
attention: the FLOP rate (TFLOP/s on CUDA, GFLOP/s on the CPU) per (shape, dtype, pass).
A row that failed its check shows its value with a '!' (never a winner). Files that do not
exist or hold no table are named and skipped. The last column names the best variant of the
row and its margin over the first variant given (the reference, normally the default).
"""

import re
import sys
from pathlib import Path

DIVERGENCE = re.compile(
    r"^(?P<shape>\d+x\d+)\s+(?P<dtype>bf16|f16|f32)\s+(?P<kind>\S+)\s+(?P<pass>fwd\+bwd|fwd)\s+"
    r"(?P<time>[\d.]+)\s+(?P<gbps>[\d.]+)\s+(?P<value>[\d.]+)%.*\s(?P<check>\S+)\s*$"
)
ATTENTION = re.compile(
    r"^(?P<shape>\S.*?)\s{2,}(?P<dtype>bf16|f16|f32)\s+(?P<pass>fwd\+bwd/a|fwd\+bwd|fwd)\s+"
    r"(?P<time>[\d.]+)\s+(?P<value>[\d.]+)\s.*\s(?P<check>\S+)\s*$"
)


def rows_of(kind: str, text: str):
    """{key: (value, ok)} of one run's table."""
    pattern = DIVERGENCE if kind == "divergence" else ATTENTION
    out = {}
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        if kind == "divergence":
            key = (m["shape"], m["dtype"], m["kind"], m["pass"])
        else:
            key = (m["shape"].strip(), m["dtype"], m["pass"])
        out[key] = (float(m["value"]), m["check"] == "ok")
    return out


def main(argv) -> int:
    if len(argv) < 3 or argv[1] not in ("divergence", "attention"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    kind = argv[1]
    runs = []
    for arg in argv[2:]:
        name, sep, path = arg.partition("=")
        if not sep:
            print(f"compare-variants: '{arg}' is not NAME=FILE", file=sys.stderr)
            return 2
        p = Path(path)
        rows = rows_of(kind, p.read_text(errors="replace")) if p.is_file() else {}
        if not rows:
            print(f"({name}: no {kind} table in {path})")
            continue
        runs.append((name, rows))
    if not runs:
        return 0
    keys = []
    for _, rows in runs:
        keys += [k for k in rows if k not in keys]
    unit = "% of floor" if kind == "divergence" else "FLOP rate (TFLOP/s CUDA, GFLOP/s CPU)"
    print(f"{kind}: {unit}, per variant ('!' = its check failed; best = highest passing)")
    head = ["shape", "dtype", "kind", "pass"] if kind == "divergence" else ["shape", "dtype", "pass"]
    widths = [max(len(h), *(len(k[i]) for k in keys)) for i, h in enumerate(head)]
    names = [n for n, _ in runs]
    colw = [max(len(n), 8) for n in names]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  "
          + "  ".join(n.rjust(w) for n, w in zip(names, colw)) + "  best")
    for k in keys:
        cells, best = [], None
        for (name, rows), w in zip(runs, colw):
            v = rows.get(k)
            if v is None:
                cells.append("-".rjust(w))
                continue
            value, ok = v
            text = (f"{value:.1f}" if value >= 10 else f"{value:.3g}") + ("" if ok else "!")
            cells.append(text.rjust(w))
            if ok and (best is None or value > best[1]):
                best = (name, value)
        ref = runs[0][1].get(k)
        if best is None:
            note = "none passed"
        elif ref is not None and ref[1] and ref[0] > 0:
            note = f"{best[0]} ({best[1] / ref[0]:.2f}x {names[0]})"
        else:
            note = best[0]
        print("  ".join(c.ljust(w) for c, w in zip(k, widths)) + "  " + "  ".join(cells) + "  " + note)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
