"""Shared by the classic-case examples: data, a plain training loop watched by gradwatch, and the before/after
verdict. Each example is ``python examples/<case>.py``; it exits with status 1 if the fix did not work."""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import nn
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


class Run(NamedTuple):
    report: gradwatch.Report
    loss_start: float  # on the whole data set, before training
    loss_end: float  # and after


def train(model, data, *, steps, lr, optimizer="sgd", loss="mse", batch=64, clip=None, title=""):
    """A plain PyTorch loop with gradwatch attached (silent while it runs)."""
    x, y = data
    g = torch.Generator().manual_seed(1)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    start = evaluate(model, data, loss)
    with gradwatch.attach(model, opt, reporters=[]) as gw:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            opt.zero_grad()
            out = model(x[idx])
            value = F.mse_loss(out, y[idx]) if loss == "mse" else F.cross_entropy(out, y[idx])
            value.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
            opt.step()
            losses.append(value.item())
    report = gw.report()
    end = evaluate(model, data, loss)
    print(f"\n== {title} ==")
    print(f"loss on the whole data set: {start:.3f} before training, {end:.3f} after {steps} steps; "
          f"gradwatch: {'healthy' if report.healthy else 'problems: ' + kinds(report)}")
    for f in report.findings:
        print(f"  finding: {f}")
    return Run(report, start, end)


@torch.no_grad()
def evaluate(model, data, loss="mse") -> float:
    x, y = data
    out = model(x)
    return float(F.mse_loss(out, y) if loss == "mse" else F.cross_entropy(out, y))


def kinds(report) -> str:
    return ", ".join(dict.fromkeys(f.kind for f in report.findings)) or "none"


def first_fix(report, expected: str):
    """The first recommendation, printed in full; exits if it is not the fix this case is about."""
    if not report.recommendations:
        sys.exit(f"gradwatch made no recommendation (findings: {kinds(report)})")
    rec = report.recommendations[0]
    print(f"\nFirst recommendation: {rec.fix} on {', '.join(rec.layers)}\n  why: {rec.reason}\n"
          f"  code:\n" + "\n".join("    " + line for line in rec.snippet.splitlines()))
    if rec.fix != expected:
        sys.exit(f"expected gradwatch's first recommendation to be {expected!r}, got {rec.fix!r}")
    return rec


def pick_fix(report, fix: str):
    """The recommendation ``fix`` from gradwatch's ranked list (printed); exits if gradwatch did not make it."""
    print("\ngradwatch's recommendations, first to try first:")
    for rec in report.recommendations:
        print(f"  {rec.rank}. {rec.fix} ({', '.join(rec.layers[:5])}{', ...' if len(rec.layers) > 5 else ''})")
    chosen = next((r for r in report.recommendations if r.fix == fix), None)
    if chosen is None:
        sys.exit(f"gradwatch did not recommend {fix!r}")
    code = "\n".join("    " + ln for ln in chosen.snippet.splitlines())
    print(f"\nApplying {fix}: {chosen.reason}\n  code:\n" + code)
    return chosen


@torch.no_grad()
def accuracy(model, data) -> float:
    x, y = data
    return float((model(x).argmax(dim=1) == y).float().mean())


def conclude(before: Run, after: Run, *, gone: str, better: bool | None = None) -> None:
    """Print the outcome; exit 1 unless the finding kind ``gone`` disappeared and training improved (by default:
    the fixed run's loss fell by at least 10% while the sick run's did not fall as far)."""
    if better is None:
        better = after.loss_end < 0.9 * after.loss_start and not before.loss_end < after.loss_end
    still = [f for f in after.report.findings if f.kind == gone]
    ok = not still and better
    print(f"\nAfter the fix: {gone} {'gone' if not still else 'still there'}; training "
          f"{'improved' if better else 'did not improve'}. {'OK' if ok else 'NOT FIXED'}")
    if not ok:
        sys.exit(1)
