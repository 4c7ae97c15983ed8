"""The reporter interface: what each hook receives, and when.

A reporter gets everything it needs through its hook arguments (records, never the watcher), so reporters
live above the core and below the watcher, and a new one needs nothing but this module.

Timing, for every front end (PyTorch hooks, the Keras callback, the training-framework callbacks):

- :meth:`Reporter.on_attach` once, when the watch starts, before any training step.
- :meth:`Reporter.on_flush` after a flush pulled new gradient rows from the device: every ``flush_every``
  training steps, on :meth:`~gradwatch.Watcher.report` and at detach. The gradients it describes are the ones
  the optimizer applied (after gradient accumulation, unscaled when a loss scaler is given, after any clipping
  the user does before ``step()``).
- :meth:`Reporter.on_findings` right after the flush that first saw them (also a flush that brought only
  activation samples).
- :meth:`Reporter.on_close` once, at detach (also on ``with`` exit after an exception), with the final report.

A reporter's exception never reaches the user's training: the watcher warns once and drops that reporter
(unless ``strict=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gradwatch.core.report import Finding, Report
    from gradwatch.core.stats import History, LayerRows, ParamTable, StepBatch
    from gradwatch.core.structure import Structure
    from gradwatch.core.summarize import Verdicts

__all__ = ["Flush", "Reporter", "WatchInfo", "block_of", "flush_scalars", "verdict_text"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchInfo:
    """What a reporter learns when a watch starts.

    Args:
        framework: ``"torch"`` or ``"keras"``.
        model_type: The model's class name.
        options: The watch's options as plain values (``every``, ``flush_every``, ``history``, ...).
    """

    framework: str
    model_type: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Flush:
    """One flush: what it pulled from the device and what the detector concluded after it.

    Args:
        step: The last training step seen.
        table: The watched parameters and their layers.
        batch: The per-parameter rows this flush pulled (``None`` when it brought only activation samples).
        rows: ``batch`` aggregated to layers, or ``None`` likewise.
        history: The bounded history, this flush included.
        verdicts: The detector's conclusions so far.
        structure: The model structure the adapter read, or ``None``.
        notes: The adapter's caveats so far.
        monitoring: ``"on"``, or ``"off: <reason>"`` after an internal error.
        report: Builds the :class:`~gradwatch.Report` as of this flush (recommendations included); call it only
            when needed, it costs a summary.
    """

    step: int
    table: ParamTable
    batch: StepBatch | None
    rows: LayerRows | None
    history: History
    verdicts: Verdicts
    structure: Structure | None
    notes: tuple[str, ...]
    monitoring: str
    report: Callable[[], Report]


class Reporter:
    """Base class of reporters. Override the hooks you need; the others do nothing (see the module docs for
    when each runs)."""

    name = "reporter"

    def on_attach(self, info: WatchInfo) -> None:
        """The watch started (called once)."""

    def on_flush(self, flush: Flush) -> None:
        """New gradient rows were pulled from the device and judged."""

    def on_findings(self, findings: Sequence[Finding], flush: Flush) -> None:
        """Findings that appeared for the first time, with the flush that first saw them."""

    def on_close(self, report: Report) -> None:
        """The watch ended: the final report."""


def flush_scalars(flush: Flush) -> dict[str, float]:
    """The series every metrics backend (W&B, TensorBoard) gets per flush, keyed without a prefix:
    ``grad_rms/<layer>`` (RMS over the flush's steps), ``update_ratio/<layer>`` (the last one measured) and
    ``health/*`` (healthy, active findings, non-finite values, skipped steps)."""
    from gradwatch.core.report import HEALTH_KINDS
    from gradwatch.core.summarize import forward_fill

    rows = flush.rows
    out: dict[str, float] = {}
    if rows is None:
        return out
    with np.errstate(all="ignore"):
        sq = np.where(rows.present, rows.grad_rms ** 2, np.nan)
        counts = rows.present.sum(axis=0)
        rms = np.where(counts > 0, np.sqrt(np.nansum(sq, axis=0) / np.maximum(counts, 1)), np.nan)
        ur = forward_fill(rows.update_ratio)[-1]  # per layer, the last ratio measured in this flush
    for group, values in (("grad_rms", rms), ("update_ratio", ur)):
        for name, value in zip(flush.table.layer_names, values):
            if not math.isnan(value):
                out[f"{group}/{name}"] = float(value)
    active = [f for f in flush.verdicts.findings if f.active and f.kind in HEALTH_KINDS]
    out["health/healthy"] = float(not active)
    out["health/active_findings"] = float(len(active))
    out["health/nonfinite_values"] = float(np.nansum(rows.nonfinite))
    out["health/skipped_steps"] = float(np.count_nonzero(rows.skipped))
    return out


def verdict_text(report: Report) -> str:
    """``"healthy"``, or ``"problems: vanishing, exploding"``: the one-line verdict reporters show."""
    from gradwatch.core.report import HEALTH_KINDS

    kinds = list(dict.fromkeys(f.kind for f in report.findings if f.kind in HEALTH_KINDS))
    return "healthy" if report.healthy else "problems: " + ", ".join(kinds)


def block_of(layer: str) -> str:
    """The block a layer belongs to, for compact summaries: its name up to the first numeric part
    (``bert.encoder.layer.3.attention.self.query`` -> ``bert.encoder.layer.3``), else its first two parts
    (``bert.embeddings.word_embeddings`` -> ``bert.embeddings``).

    Example:
        >>> block_of("model.layers.11.mlp.up_proj"), block_of("classifier"), block_of("0")
        ('model.layers.11', 'classifier', '0')
    """
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2])
