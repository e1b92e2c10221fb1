#!/usr/bin/env python3
"""What rounding the chunk logits to bf16 would cost the fused linear divergence (cuda/FUSED.md).

The fused operation writes each chunk's student and teacher logits in f32. This script measures,
on the CPU with numpy and a float64 reference, the JSD loss and logit-gradient errors that bf16
logits (what Liger's fused-linear losses use) and f32 logits give, for a student and teacher
that share the weight (self-distillation) with teacher hidden states close to or far from the
student's. Run: python3 scripts/bf16-logits-error.py [--rows N] [--hidden H] [--vocab V]
"""
import argparse

import numpy as np


def round_bf16(x):
    """Round to the nearest bf16 (ties to even), returned as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def jsd(zs, zt, beta=0.5):
    """Per-row JSD loss and its gradient w.r.t. the student logits, in float64."""
    zs = zs - zs.max(1, keepdims=True)
    zt = zt - zt.max(1, keepdims=True)
    q = np.exp(zs)
    q /= q.sum(1, keepdims=True)
    p = np.exp(zt)
    p /= p.sum(1, keepdims=True)
    m = beta * p + (1 - beta) * q
    lq = np.log(q / m)
    loss = (beta * p * np.log(p / m) + (1 - beta) * q * lq).sum(1)
    grad = (1 - beta) * q * (lq - (q * lq).sum(1, keepdims=True))
    return loss, grad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    print(f"rows {a.rows}, hidden {a.hidden}, vocab {a.vocab}; JSD beta 0.5; errors against float64")
    print("| logit std | teacher hidden | loss mean | logits | loss rel. error | grad rel. norm error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for logit_std in (1.0, 3.0):
        w = round_bf16(rng.standard_normal((a.vocab, a.hidden)) * logit_std / np.sqrt(a.hidden))
        hs = round_bf16(rng.standard_normal((a.rows, a.hidden)))
        for noise, label in ((0.05, "student + 5 % noise"), (1.0, "independent")):
            if noise < 1.0:
                ht = round_bf16(hs + noise * rng.standard_normal(hs.shape))
            else:
                ht = round_bf16(rng.standard_normal(hs.shape))
            zs = hs.astype(np.float64) @ w.T.astype(np.float64)
            zt = ht.astype(np.float64) @ w.T.astype(np.float64)
            ref_loss, ref_grad = jsd(zs, zt)
            for name, rnd in (("f32", lambda z: z.astype(np.float32)), ("bf16", round_bf16)):
                loss, grad = jsd(rnd(zs).astype(np.float64), rnd(zt).astype(np.float64))
                le = np.abs(loss - ref_loss).sum() / np.abs(ref_loss).sum()
                ge = np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad)
                print(f"| {zs.std():.2f} | {label} | {ref_loss.mean():.3g} | {name} | {le:.1e} | {ge:.1e} |")


if __name__ == "__main__":
    main()
