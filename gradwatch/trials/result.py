"""What a trial returns: one run per fix tried, next to the unchanged baseline; immutable, JSON-safe via
``to_dict()``, a table as ``str()``. Its formatting (the rich table, the loss plot, the W&B table) sits beside
it in this module, as the report's does."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gradwatch.core.kinds import HEALTH_KINDS
from gradwatch.core.report import Report

__all__ = ["TrialReport", "TrialRun", "final_loss"]

#: The final loss is the mean over the last tenth of the steps, and at least this many (one batch's loss is noise).
FINAL_WINDOW = 10


def final_loss(losses: tuple[float, ...]) -> float:
    """Mean loss over the last tenth of the steps (at least :data:`FINAL_WINDOW`, at most all); NaN if there are
    none, inf if one of them is not finite."""
    tail = losses[-max(FINAL_WINDOW, len(losses) // 10):]
    if not tail:
        return math.nan
    if not all(math.isfinite(v) for v in tail):
        return math.inf
    return sum(tail) / len(tail)


def health_kinds(report: Report | None) -> tuple[str, ...]:
    """The vanishing / exploding / non-finite / no-gradient findings of ``report``, in order, once each."""
    if report is None:
        return ()
    return tuple(dict.fromkeys(f.kind for f in report.findings if f.kind in HEALTH_KINDS))


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialRun:
    """One short training run: the baseline (``fix=None``) or the model with one fix applied.

    Args:
        fix: The fix tried (a :class:`~gradwatch.Recommendation` ``fix`` name); ``None`` for the baseline.
        layers: The user's layers it was applied to.
        applied: Whether the fix could be applied to this model mechanically. A run that was not applied did not
            train: ``reason`` says why, and the other figures are empty.
        reason: Why the fix was not applied; ``""`` when it was.
        change: What was changed, in one sentence (``"nn.Sigmoid -> nn.ReLU after 0, 2, 4; He init"``).
        cured: The baseline's vanishing / exploding / non-finite findings are gone, no new one appeared, and the
            loss stayed finite. ``False`` for the baseline and for runs not applied.
        final_loss: Mean training loss over the last tenth of the steps (at least :data:`FINAL_WINDOW`); inf if
            it diverged.
        losses: The training loss of every step.
        report: gradwatch's report on this run (silent while it ran).
    """

    fix: str | None
    layers: tuple[str, ...] = ()
    applied: bool = True
    reason: str = ""
    change: str = ""
    cured: bool = False
    final_loss: float = math.nan
    losses: tuple[float, ...] = ()
    report: Report | None = None

    @property
    def label(self) -> str:
        return "baseline (as given)" if self.fix is None else self.fix

    @property
    def findings(self) -> tuple[str, ...]:
        return health_kinds(self.report)

    def to_dict(self) -> dict[str, Any]:
        return {"fix": self.fix, "layers": list(self.layers), "applied": self.applied, "reason": self.reason,
                "change": self.change, "cured": self.cured, "final_loss": _num(self.final_loss),
                "losses": [_num(v) for v in self.losses], "findings": list(self.findings),
                "report": self.report.to_dict() if self.report is not None else None}


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialReport:
    """The outcome of :func:`gradwatch.trial`.

    Args:
        framework: ``"torch"`` or ``"keras"``.
        steps: Training steps per run (Keras: batches per run, ``epochs`` x batches per epoch).
        baseline: The unchanged model's run.
        runs: One run per fix tried, in the order tried (the recommendations' rank, or ``fixes=``).
        message: One sentence: what was found, and which fix cured it (or that none did, or that the baseline
            is healthy and there was nothing to fix).
    """

    framework: str
    steps: int
    baseline: TrialRun
    runs: tuple[TrialRun, ...]
    message: str

    @property
    def best(self) -> TrialRun | None:
        """The cured run with the lowest final loss; ``None`` when no run cured the model."""
        cured = [r for r in self.runs if r.cured]
        return min(cured, key=lambda r: r.final_loss) if cured else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"framework": self.framework, "steps": self.steps, "baseline": self.baseline.to_dict(),
                "runs": [r.to_dict() for r in self.runs], "best": best.fix if best is not None else None,
                "message": self.message}

    def rows(self) -> list[tuple[str, ...]]:
        """The table's rows: run, layers, applied, findings after, cured, final loss."""
        best = self.best
        out = []
        for r in (self.baseline, *self.runs):
            names = ", ".join(r.layers[:4]) + (f", ... ({len(r.layers)})" if len(r.layers) > 4 else "")
            if not r.applied:
                out.append((r.label, names, "no (below)", "", "", ""))
                continue
            mark = " (best)" if r is best else ""
            out.append((r.label + mark, names, "yes" if r.fix is not None else "",
                        ", ".join(r.findings) or "none", "yes" if r.cured else ("" if r.fix is None else "no"),
                        _fmt(r.final_loss)))
        return out

    HEADER = ("run", "layers", "applied", "findings", "cured", "final loss")

    def __str__(self) -> str:
        rows = [self.HEADER, *self.rows()]
        widths = [max(len(row[c]) for row in rows) for c in range(len(self.HEADER))]
        lines = [self.message, ""]
        for k, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += self.not_applied()
        return "\n".join(lines)

    def not_applied(self) -> list[str]:
        """One line per fix that could not be applied: why."""
        return [f"{r.fix} not applied: {r.reason}" for r in self.runs if not r.applied]

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title=f"gradwatch trial: {self.steps} steps per run", title_justify="left")
        for h in self.HEADER:
            table.add_column(h, justify="right" if h == "final loss" else "left")
        best = self.best
        for r, row in zip((self.baseline, *self.runs), self.rows()):
            table.add_row(*row, style="bold green" if r is best else ("dim" if not r.applied else None))
        return Group(table, *self.not_applied(), self.message)

    def plot(self, path: str | None = None):
        """The training loss of every run against the step (log scale); saved to ``path`` when given. Returns the
        matplotlib figure. Needs matplotlib (``pip install 'gradwatch[plot]'``)."""
        from gradwatch._optional import require

        require("matplotlib", extra="plot", feature="TrialReport.plot")
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        best = self.best
        for r in (self.baseline, *self.runs):
            if not r.applied or not r.losses:
                continue
            ys = _smooth([v if math.isfinite(v) else float("nan") for v in r.losses])
            ax.plot(range(1, len(ys) + 1), ys, label=r.label + (" (best)" if r is best else ""),
                    linewidth=2.2 if r is best else 1.2, color="black" if r.fix is None else None,
                    linestyle="--" if r.fix is None else "-")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean of {_window(len(self.baseline.losses))} steps)")
        if all(v > 0 for r in (self.baseline, *self.runs) for v in r.losses if math.isfinite(v)):
            ax.set_yscale("log")
        ax.set_title("gradwatch trial: " + (f"{best.fix} cures it" if best is not None else "no fix cured it"))
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
            plt.close(fig)
        return fig

    def wandb_table(self):
        """The runs as a ``wandb.Table`` (needs wandb)."""
        from gradwatch._optional import require

        wandb = require("wandb", extra="wandb", feature="TrialReport.wandb_table")
        table = wandb.Table(columns=["run", "layers", "applied", "reason", "findings", "cured", "final_loss"])
        for r in (self.baseline, *self.runs):
            table.add_data(r.label, ", ".join(r.layers), r.applied, r.reason, ", ".join(r.findings), r.cured,
                           r.final_loss if math.isfinite(r.final_loss) else None)
        return table


def _window(n: int) -> int:
    return max(1, n // 40)


def _smooth(ys: list[float]) -> list[float]:
    """The running mean over the previous ``_window`` steps: per-batch losses are too noisy to compare by eye."""
    w = _window(len(ys))
    out, acc = [], 0.0
    for k, v in enumerate(ys):
        acc += v
        if k >= w:
            acc -= ys[k - w]
        out.append(acc / min(k + 1, w))
    return out


def _num(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return ""
    return "diverged" if math.isinf(v) else f"{v:.4g}"
