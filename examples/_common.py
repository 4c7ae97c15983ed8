"""Shared by the classic-case examples: data, a plain training loop watched by gradwatch, and the before/after
verdict. Each example is ``python examples/<case>.py``; it exits with status 1 if the fix did not work."""

from __future__ import annotations

import sys

import torch
from torch.nn import functional as F

import gradwatch


def regression(n=2048, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]


def images(n=512, seed=0):
    """The class is whether the top half of the first channel is brighter than average."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return x, (x[:, 0, :8].mean(dim=(1, 2)) > 0).long()


def long_memory(n=512, length=60, seed=0):
    """The class is the sign of the first time step's input; the other 59 steps are noise (Bengio et al. 1994)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 4, generator=g) * 0.5
    return x, (x[:, 0, 0] > 0).long()


def batches(data, steps, batch=64, seed=1):
    """``steps`` random mini-batches of ``data``, drawn once: every run of the trial sees these, in this order."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    return [(x[i], y[i]) for i in (torch.randint(0, len(x), (batch,), generator=g) for _ in range(steps))]


def optimizer(name="sgd", lr=0.01):
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr)
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def cure(make_model, data, *, steps, lr, optimizer_name="sgd", loss="mse", batch=64, expected, title, top=3):
    """Train ``make_model()`` as it is, then each of gradwatch's top recommendations applied to a fresh copy,
    with ``gradwatch.trial``; print the table. Exits 1 unless a fix cured the model (its finding gone, a lower
    final loss than the sick run), or if the cure is not ``expected``."""
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
    torch.manual_seed(0)
    result = gradwatch.trial(make_model, batches(data, steps, batch), loss_fn, optimizer(optimizer_name, lr),
                             steps=steps, top=top)
    base = result.baseline
    recs = base.report.recommendations
    print(f"\n== {title} ==")
    print("gradwatch on the model as given: " + ("problems: " + ", ".join(base.findings) if base.findings
                                                 else "healthy"))
    for f in base.report.findings:
        print(f"  finding: {f}")
    print("\ngradwatch's recommendations, first to try first:")
    for rec in recs:
        print(f"  {rec.rank}. {rec.fix} ({', '.join(rec.layers[:5])}{', ...' if len(rec.layers) > 5 else ''})")
        if rec.rank == 1:
            print("     code:\n" + "\n".join("       " + line for line in rec.snippet.splitlines()))
    print(f"\ngradwatch.trial: each fix on a fresh model, {steps} steps, the same batches in the same order\n")
    print(result)
    best = result.best
    if best is None:
        print("\nNo fix cured it. NOT FIXED")
        sys.exit(1)
    rank = next(r.rank for r in recs if r.fix == best.fix)
    improved = best.final_loss < base.final_loss
    ok = improved and best.fix == expected
    print(f"\nBest fix: {best.fix}, recommendation {rank} ({best.change}).")
    print(f"After the fix: {', '.join(base.findings)} gone; training {'improved' if improved else 'did not improve'}"
          f". {'OK' if ok else 'NOT FIXED'}")
    if not ok:
        sys.exit(1)
    return result


@torch.no_grad()
def accuracy(model, data) -> float:
    x, y = data
    return float((model(x).argmax(dim=1) == y).float().mean())


