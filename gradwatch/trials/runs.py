"""What the PyTorch and Keras trials share: argument checks, the fixes to try, the progress bar, the outcome."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, get_args

from gradwatch.core.kinds import HEALTH_KINDS, Fix
from gradwatch.core.report import Recommendation, Report
from gradwatch.trials.result import TrialReport, TrialRun, health_kinds

__all__ = ["DEFAULT_SETTINGS", "FIX_NAMES", "Progress", "candidates", "check_common", "finish"]

FIX_NAMES: tuple[str, ...] = get_args(Fix)
#: Settings for a fix named in ``fixes=`` that the baseline did not recommend (so carries no numbers of its own).
DEFAULT_SETTINGS = {"gradient_clipping": {"max_norm": 1.0}, "lower_learning_rate": {"factor": 10.0}}


# -- shared ----------------------------------------------------------------------------------------------------

def check_common(fixes: Any, top: Any) -> tuple[str, ...] | None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1 (how many recommendations to try), received top={top!r}")
    if fixes is None:
        return None
    if isinstance(fixes, str) or not isinstance(fixes, Sequence):
        raise TypeError(f"fixes must be a list of fix names such as ['relu', 'he_init'], or None; received "
                        f"fixes={fixes!r}")
    unknown = [f for f in fixes if f not in FIX_NAMES]
    if unknown:
        raise ValueError(f"unknown fix name(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(FIX_NAMES)}")
    if not fixes:
        raise ValueError("fixes is empty: name at least one fix, or pass fixes=None to try the recommendations")
    return tuple(dict.fromkeys(fixes))


def candidates(report: Report, fixes: tuple[str, ...] | None, top: int) -> list[Recommendation]:
    """The recommendations to try: the top ``top`` of the baseline's, or one per named fix (the baseline's own
    when it made it, else one on the layers of its findings, with default settings)."""
    if fixes is None:
        return list(report.recommendations[:top])
    made = {r.fix: r for r in report.recommendations}
    layers = tuple(dict.fromkeys(name for f in report.findings if f.kind in HEALTH_KINDS for name in f.layers))
    return [made.get(fix) or Recommendation(fix=fix, layers=layers, reason="named in fixes=",
                                            settings=dict(DEFAULT_SETTINGS.get(fix, {})))
            for fix in fixes]


def finish(framework: str, steps: int, baseline: TrialRun, runs: list[TrialRun], wandb_run: Any = None) -> TrialReport:
    kinds = health_kinds(baseline.report)
    if not kinds:
        message = (f"The model as given is healthy: no vanishing, exploding or non-finite gradients in {steps} "
                   "steps, so there is nothing to fix (only the baseline was trained).")
    else:
        report = TrialReport(framework=framework, steps=steps, baseline=baseline, runs=tuple(runs), message="")
        best = report.best
        found = " and ".join(kinds)
        if best is not None:
            message = (f"The baseline shows {found}. {best.fix} cures it: no such finding in its run, final loss "
                       f"{best.final_loss:.4g} against the baseline's {_loss(baseline.final_loss)}.")
        elif runs:
            message = f"The baseline shows {found}. None of the {len(runs)} fixes tried cured it."
        else:
            message = f"The baseline shows {found}, and gradwatch had no recommendation to try."
    result = TrialReport(framework=framework, steps=steps, baseline=baseline, runs=tuple(runs), message=message)
    _show(result, wandb_run)
    return result


def _loss(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else "divergence"


def _show(result: TrialReport, run: Any = None) -> None:
    """On a terminal, the table; with an active W&B run, the table in its summary and logged."""
    from rich.console import Console

    console = Console(stderr=False)
    if console.is_terminal:
        console.print(result)
    if run is None:
        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        table = result.wandb_table()
        run.summary["gradwatch/trial"] = table  # the run page shows it whatever the user logs next
        run.log({"gradwatch/trial": table}, commit=False)  # and it rides on the user's next row


class Progress:
    """rich's progress bar on a terminal, nothing otherwise."""

    def __init__(self, total: int, what: str) -> None:
        from rich.console import Console

        self._bar = None
        if Console(stderr=True).is_terminal:
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task(what, total=total)
            self._bar.start()

    def label(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


