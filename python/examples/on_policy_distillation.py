"""On-policy distillation with distill_kernels.torch, end to end on a toy language model.

Each step the student samples completions of random prompts; a frozen teacher scores every
sampled token; the loss is the JSD (beta 0.5) between their next-token distributions, computed
straight from hidden states and lm_head weights by ``fused_linear_divergence`` (the
``[tokens, V]`` logits never exist whole). Prompt positions are masked with ``ignore_index``,
and two micro-batches accumulate into one optimizer step with ``num_items`` = the step's
completion tokens, as a tensor (how Hugging Face's Trainer passes ``num_items_in_batch``), so
the step's loss is the mean over all its completion tokens whatever the split.

Here the teacher is another small network; in self-distillation it is the student's own
weights shown a privileged context (pass the same ``lm_head.weight`` as ``teacher_weight``).
From logits already computed, ``distill_kernels.torch.divergence(student_logits,
teacher_logits, ...)`` takes the same parameters.

Checks, and exits non-zero if one fails: on the first micro-batch, the loss and the gradients
of the student's hidden states and lm_head equal a plain-PyTorch JSD of the same tensors (with
beta 0.3 there, so that swapping the teacher's and the student's roles would show); at the end,
the divergence has fallen by a tenth (checked when ``--steps`` is at least 20: fewer steps are a
smoke run). Runs on CUDA when torch sees a GPU, else on the library's CPU backend (under a
minute); it prints the device first and ``ok`` at the end.

Usage: python python/examples/on_policy_distillation.py [--steps 40] [--device cpu|cuda]
(with the library built: ``cargo build --release`` and ``pip install ./python``, or
``DISTILL_KERNELS_LIB`` / ``PYTHONPATH=python`` from the checkout).
"""

from __future__ import annotations

import argparse
import sys

try:
    import torch
    from torch import nn
except ImportError:
    sys.exit("this example needs PyTorch (pip install torch); the numpy face needs only numpy")

import distill_kernels.torch as dkt

VOCAB, HIDDEN, PROMPT, COMPLETION, BATCH = 384, 48, 6, 10, 8


class TinyLM(nn.Module):
    """Each position's hidden state depends on its token and the mean of its prefix."""

    def __init__(self, seed: int, device: torch.device):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.5)
        self.mix = nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g) * 0.6)
        self.to(device)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed[tokens]
        steps = torch.arange(1, tokens.shape[1] + 1, device=tokens.device).view(1, -1, 1)
        prefix = e.cumsum(1) / steps
        return torch.tanh(prefix @ self.mix) + e

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, length: int, g: torch.Generator) -> torch.Tensor:
        seq = prompts
        for _ in range(length):
            logits = self.lm_head(self.hidden(seq)[:, -1])
            nxt = torch.multinomial(torch.softmax(logits.float(), -1).cpu(), 1, generator=g)
            seq = torch.cat([seq, nxt.to(seq.device)], 1)
        return seq


def reference_jsd(sh, w, th, tw, labels, num_items, beta=0.5):
    """The same loss in plain PyTorch (float64): mean over the counted tokens of
    beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q."""
    q = torch.log_softmax(sh.double() @ w.double().T, -1)
    p = torch.log_softmax(th.double() @ tw.double().T, -1)
    m = torch.logsumexp(torch.stack([p + torch.log(torch.tensor(beta, dtype=p.dtype)),
                                     q + torch.log(torch.tensor(1 - beta, dtype=p.dtype))]), 0)
    kl_pm = (p.exp() * (p - m)).sum(-1)
    kl_qm = (q.exp() * (q - m)).sum(-1)
    rows = beta * kl_pm + (1 - beta) * kl_qm
    return (rows * (labels != -100)).sum() / num_items


def micro_batch(student, teacher, seq):
    """(student hidden, teacher hidden, labels) over the next-token positions of ``seq``."""
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : PROMPT - 1] = -100  # predictions of prompt tokens do not count
    with torch.no_grad():
        th = teacher.hidden(inputs).reshape(-1, HIDDEN)
    sh = student.hidden(inputs).reshape(-1, HIDDEN)
    return sh, th, targets.reshape(-1)


def distillation_loss(student, teacher, seq, num_items, beta=0.5, parts=None):
    """The micro-batch's share of the step's mean JSD over completion tokens."""
    sh, th, labels = micro_batch(student, teacher, seq)
    w, tw = student.lm_head.weight, teacher.lm_head.weight
    if parts is not None:
        parts.update(sh=sh, th=th, labels=labels)
    return dkt.fused_linear_divergence(
        sh, w, th, tw, kind="jsd", beta=beta, labels=labels, num_items=num_items
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    print(f"device: {device} ({'CUDA kernels' if device.type == 'cuda' else 'the CPU backend'}), "
          f"{args.steps} steps")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    student, teacher = TinyLM(2, device), TinyLM(3, device).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=2e-2)
    history = []
    for step in range(args.steps):
        prompts = torch.randint(0, VOCAB, (2 * BATCH, PROMPT), generator=g).to(device)
        seqs = student.sample(prompts, COMPLETION, g).chunk(2)  # two micro-batches
        # The step's completion tokens, as a tensor: one compiled graph for any value, and no
        # host synchronisation.
        num_items = torch.tensor(float(2 * BATCH * COMPLETION), device=device)
        if step == 0 and not check_against_reference(student, teacher, seqs[0], num_items):
            return 1
        step_loss = 0.0
        for seq in seqs:
            loss = distillation_loss(student, teacher, seq, num_items)
            loss.backward()  # accumulates into the student's .grad
            step_loss += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(step_loss)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  JSD over completion tokens {step_loss:.4f}")

    k = max(1, min(5, len(history) // 4))
    first, last = sum(history[:k]) / k, sum(history[-k:]) / k
    print(f"mean JSD of the first {k} steps {first:.4f}, of the last {k} {last:.4f}")
    if args.steps >= 20 and not last < 0.9 * first:
        print("FAIL: the divergence did not fall", file=sys.stderr)
        return 1
    print("ok" if args.steps >= 20 else "ok (fewer than 20 steps: the fall was not checked)")
    return 0


def check_against_reference(student, teacher, seq, num_items) -> bool:
    """Loss and gradients (hidden states, lm_head) of one micro-batch against plain PyTorch in
    float64, on a forward of its own (each graph is backpropagated once)."""
    parts: dict = {}
    beta = 0.3  # not 0.5, where the JSD is symmetric in the two distributions
    loss = distillation_loss(student, teacher, seq, num_items, beta, parts)
    sh, w = parts["sh"], student.lm_head.weight
    got = torch.autograd.grad(loss, [sh, w])
    ref = reference_jsd(sh, w, parts["th"], teacher.lm_head.weight, parts["labels"], num_items,
                        beta)
    want = torch.autograd.grad(ref, [sh, w])
    # The CPU backend is exact f64 rounded once; cuBLAS products in float32 may round more.
    tol = 1e-5 if sh.device.type == "cpu" else 2e-3
    ok = abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    print(f"first micro-batch: loss {loss.item():.6f}, plain PyTorch {ref.item():.6f}")
    for name, a, b in zip(["hidden", "lm_head"], got, want):
        err = ((a.double() - b).norm() / b.norm()).item()
        ok = ok and err <= tol
        print(f"first micro-batch: gradient of {name}: relative error {err:.1e}")
    if not ok:
        print(f"FAIL: differs from plain PyTorch beyond {tol}", file=sys.stderr)
    return ok


if __name__ == "__main__":
    sys.exit(main())
