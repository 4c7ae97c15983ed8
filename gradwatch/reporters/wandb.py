"""Weights & Biases: send gradwatch's diagnosis to the active run, cheaply.

``wandb.watch(log="gradients")`` logs a histogram per tensor that users must read themselves. The
:class:`WandbReporter` logs what gradwatch concluded, and the few series that show it:

- ``gradwatch/grad_rms/<layer>`` and ``gradwatch/update_ratio/<layer>`` once per flush, with
  ``gradwatch/health/*`` (healthy, active findings, non-finite values), all against ``gradwatch/step`` (the
  training step) set with ``define_metric``. One ``run.log(..., commit=False)`` per flush: the values ride on the
  user's next ``wandb.log`` row, and the user's own step is never advanced or skipped. If the user logs less
  often than gradwatch flushes, a row keeps gradwatch's latest flush; pass ``commit=True`` when nothing else
  logs to the run, so gradwatch's rows are committed themselves.
- ``run.alert`` once per new health finding (``ERROR`` for critical, ``WARN`` otherwise), and ``INFO`` for
  saturation or dead units.
- ``gradwatch/findings`` and ``gradwatch/recommendations`` tables (fix, layers, reason, snippet), and
  ``run.summary`` entries with the verdict, so the diagnosis sits on top of the run page.
- The gradient-flow heatmap as ``gradwatch/flow`` (a ``wandb.Image``, every ``image_every`` flushes and at the
  end; needs matplotlib) and a ``wandb.plot.line_series`` of per-layer gradient RMS at the end.

W&B errors never stop training: the watcher drops a reporter that raises and warns once.

Example:
    >>> import gradwatch
    >>> from gradwatch import WandbReporter
    >>> WandbReporter(image_every=0)
    Traceback (most recent call last):
    ...
    ValueError: image_every must be an int >= 1, received image_every=0
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradwatch._optional import require
from gradwatch.core.report import HEALTH_KINDS, Finding, Report
from gradwatch.reporters.base import Flush, Reporter, WatchInfo, flush_scalars, verdict_text

__all__ = ["WandbReporter"]

log = logging.getLogger(__name__)

_MAX_SERIES = 20
_INT_KEYS = ("health/healthy", "health/active_findings", "health/skipped_steps")


class WandbReporter(Reporter):
    """Logs gradwatch's series, findings, recommendations and plots to a W&B run.

    Select it with ``reporters=[..., "wandb"]`` (uses the active ``wandb.run``) or pass an instance.

    Args:
        run: The run to log to. Defaults to the active ``wandb.run`` when the watch starts.
        prefix: Key prefix. Defaults to ``"gradwatch"``.
        image_every: Log the gradient-flow heatmap every N flushes (and at the end). Defaults to ``10``.
        alerts: Send ``run.alert`` for new findings. Defaults to ``True``.
        commit: Commit gradwatch's rows itself (only when nothing else calls ``wandb.log``). Defaults to
            ``False``.

    Raises:
        ImportError: wandb is not installed (``pip install 'gradwatch[wandb]'``).
        RuntimeError: No run was given and none is active: call ``wandb.init()`` first.
    """

    name = "wandb"

    def __init__(self, run: Any = None, *, prefix: str = "gradwatch", image_every: int = 10, alerts: bool = True,
                 commit: bool = False) -> None:
        if isinstance(image_every, bool) or not isinstance(image_every, int) or image_every < 1:
            raise ValueError(f"image_every must be an int >= 1, received image_every={image_every!r}")
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty string without '/', received prefix={prefix!r}")
        self._wandb = require("wandb", extra="wandb", feature="WandbReporter")
        self._run = run
        if run is None and self._wandb.run is None:
            raise RuntimeError("WandbReporter needs an active W&B run: call wandb.init(...) before "
                               "gradwatch.attach(...) / model.fit(...), or pass WandbReporter(run=...).")
        self.prefix = prefix
        self.image_every = image_every
        self.alerts = alerts
        self.commit = commit
        self._flushes = 0
        self._alerted: set[tuple[str, tuple[str, ...], int]] = set()
        self._no_images = False

    @property
    def run(self) -> Any:
        return self._run if self._run is not None else self._wandb.run

    def _key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def _log(self, data: dict[str, Any]) -> None:
        self.run.log(data, commit=self.commit)

    # -- reporter hooks -------------------------------------------------------------------------------------

    def on_attach(self, info: WatchInfo) -> None:
        run = self.run
        if run is None:
            raise RuntimeError("the W&B run ended before gradwatch started: call wandb.init(...) first")
        step = self._key("step")
        run.define_metric(step, hidden=True)
        for group in ("grad_rms", "update_ratio", "health", "flow"):
            run.define_metric(self._key(group, "*"), step_metric=step)
        run.define_metric(self._key("flow"), step_metric=step)
        run.config.update({self._key("options"): {"every": info.options.get("every"),
                                                 "flush_every": info.options.get("flush_every"),
                                                 "framework": info.framework,
                                                 "model": info.model_type}}, allow_val_change=True)

    def on_flush(self, flush: Flush) -> None:
        rows = flush.rows
        if rows is None:
            return
        self._flushes += 1
        data: dict[str, Any] = {self._key("step"): int(rows.steps[-1])}
        for key, value in flush_scalars(flush).items():
            data[self._key(key)] = int(value) if key in _INT_KEYS else value
        if self._flushes % self.image_every == 0:
            self._add_flow_image(data, flush.report())
        self._log(data)

    def on_findings(self, findings: Sequence[Finding], flush: Flush) -> None:
        report = flush.report()
        if self.alerts:
            for f in findings:
                key = (f.kind, f.layers, f.step)
                if key in self._alerted:
                    continue
                self._alerted.add(key)
                self.run.alert(title=f"gradwatch: {f.kind} since step {f.step}", text=_alert_text(f, report),
                               level=self._level(f), wait_duration=0)
        self._log_diagnosis(report, step=flush.step)

    def on_close(self, report: Report) -> None:
        if self.run is None or not report.layers:
            return
        extra: dict[str, Any] = {}
        self._add_flow_image(extra, report)
        series = _line_series(self._wandb, report)
        if series is not None:
            extra[self._key("grad_rms_by_layer")] = series
        self._log_diagnosis(report, step=report.step, extra=extra)

    # -- pieces ----------------------------------------------------------------------------------------------

    def _level(self, f: Finding):
        levels = self._wandb.AlertLevel
        if f.kind not in HEALTH_KINDS:
            return levels.INFO
        return levels.ERROR if f.severity == "critical" else levels.WARN

    def _log_diagnosis(self, report: Report, step: int, extra: dict[str, Any] | None = None) -> None:
        """The findings and recommendations tables (plus ``extra``) in one log call, and the summary."""
        data = self._tables(report)
        data[self._key("step")] = step
        data.update(extra or {})
        self._log(data)
        self._summary(report)

    def _tables(self, report: Report) -> dict[str, Any]:
        wandb = self._wandb
        findings = wandb.Table(columns=["kind", "severity", "since_step", "active", "layers", "message"],
                               data=[[f.kind, f.severity, f.step, f.active, ", ".join(f.layers), f.message]
                                     for f in report.findings])
        recs = wandb.Table(columns=["rank", "fix", "layers", "reason", "snippet", "references"],
                           data=[[r.rank, r.fix, ", ".join(r.layers), r.reason, r.snippet, "; ".join(r.references)]
                                 for r in report.recommendations])
        return {self._key("findings"): findings, self._key("recommendations"): recs}

    def _summary(self, report: Report) -> None:
        summary = self.run.summary
        summary[self._key("verdict")] = verdict_text(report)
        summary[self._key("healthy")] = report.healthy
        summary[self._key("findings_count")] = len(report.findings)
        if report.recommendations:
            first = report.recommendations[0]
            summary[self._key("first_fix")] = f"{first.fix} ({', '.join(first.layers[:4])}): {first.reason}"

    def _add_flow_image(self, data: dict[str, Any], report: Report) -> None:
        if self._no_images or not report.trend_steps:
            return
        try:
            from gradwatch.core.plots import flow_figure

            fig = flow_figure(report)
        except ImportError:
            self._no_images = True
            log.info("gradwatch: matplotlib is missing, so no gradient-flow image goes to W&B "
                     "(pip install 'gradwatch[plot]')")
            return
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        buf.seek(0)
        from PIL import Image  # matplotlib depends on pillow

        data[self._key("flow")] = self._wandb.Image(Image.open(buf), caption=_caption(report))


def _alert_text(f: Finding, report: Report) -> str:
    recs = [r for r in report.recommendations if f.kind in r.addresses] or list(report.recommendations)
    text = f"{f.message}\nLayers: {', '.join(f.layers[:8])}{', …' if len(f.layers) > 8 else ''}"
    if recs:
        text += f"\nFirst fix to try: {recs[0].fix} — {recs[0].reason}"
    return text


def _caption(report: Report) -> str:
    return f"{report.model_type}, step {report.step}: {verdict_text(report)}"


def _line_series(wandb, report: Report):
    """Per-layer gradient RMS over the run as one chart; at most ``_MAX_SERIES`` layers (evenly spaced, plus the
    layers a finding names) so the chart stays readable."""
    layers = [la for la in report.layers if any(math.isfinite(v) and v > 0 for v in la.grad_rms_trend)]
    if not layers or not report.trend_steps:
        return None
    named = {n for f in report.findings for n in f.layers}
    pick = {layers[i].name for i in np.unique(np.linspace(0, len(layers) - 1, min(len(layers), _MAX_SERIES))
                                              .round().astype(int))}
    flagged = [la.name for la in layers if la.name in named and la.name not in pick][:_MAX_SERIES // 2]
    chosen = [la for la in layers if la.name in pick or la.name in flagged]
    ys = [[v if math.isfinite(v) else None for v in la.grad_rms_trend] for la in chosen]
    return wandb.plot.line_series(xs=list(report.trend_steps), ys=ys, keys=[la.name for la in chosen],
                                  title="gradwatch: gradient RMS per layer", xname="step")
