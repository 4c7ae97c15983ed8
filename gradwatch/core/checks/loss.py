"""The training loss, where it is known: a run whose loss grows by an order of magnitude is diverging."""

from __future__ import annotations

import math

import numpy as np

from gradwatch.core.checks.base import Check, CheckContext, EarlyLate, GradStep, fmt

__all__ = ["LossCheck"]


class LossCheck(Check):
    """``exploding`` when the median loss over the last ``Thresholds.window`` steps is
    ``Thresholds.loss_growth_decades`` or more above its median over the first ``window`` steps, on most steps of
    the window. It needs the loss: :meth:`gradwatch.Watcher.log_loss` in a plain loop, the logs under Keras. A loss
    that is not positive (a log-likelihood, a GAN's) is not judged."""

    name = "loss"
    kinds = ("exploding",)

    def __init__(self, ctx: CheckContext) -> None:
        super().__init__(ctx)
        self._loss = EarlyLate(self.t.window)
        self._voter = self.voter("exploding:loss", "exploding")
        self._none = np.zeros(len(self.names), dtype=bool)  # the vote of a step whose loss did not grow (never written)

    def on_grad(self, row: GradStep) -> None:
        if row.skipped or not math.isfinite(row.loss):
            return
        self._loss.add(row.loss)
        growth = self._loss.growth()
        if growth >= self.t.loss_growth_decades:
            flags = self.ctx.profile & row.present
            ep = self._voter.vote(row.step, flags)
        else:
            ep = self._voter.vote(row.step, self._none, False)
        if ep is None or not math.isfinite(growth):
            return
        w = self.t.window
        early, late = self._loss.baseline(), float(np.median(self._loss.late))
        ep.severity = "critical"
        ep.evidence = {"loss_first_steps": early, "loss_recent": late, "loss_growth_decades": growth,
                       "window_steps": w}
        ep.message = (f"The training loss is diverging: its median went from {fmt(early)} over the first {w} steps "
                      f"to {fmt(late)} over the last {w} ({growth:.1f} orders of magnitude up), although every "
                      "gradient stayed finite.")
