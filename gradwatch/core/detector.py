"""Turns per-layer gradient statistics into findings: which layers vanish or explode, since when, and the
numbers that show it. Numpy only.

The :class:`Detector` streams rows to its checks (:mod:`gradwatch.core.checks`, one class per finding family)
and keeps their episodes; it writes nothing itself. Any non-finite gradient on an applied step is reported at
once, naming the layer where it first appears in backward order. Steps a loss scaler skipped for overflow (AMP)
are not judged, unless they persist.

Published rules this improves on (each judges one probe batch per epoch with fixed cut-offs):
AUTOTRAINER (Zhang et al., ICSE 2021), DeepDiagnosis (Wardat et al., ICSE 2022) and TheDeepChecker
(Ben Braiek & Khomh, TOSEM 2023).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from gradwatch.core.checks import DEFAULT_CHECKS, Check, CheckContext, Episode, GradStep, Ledger, Thresholds
from gradwatch.core.checks.base import quiet
from gradwatch.core.checks.nonfinite import NonfiniteCheck
from gradwatch.core.kinds import HEALTH_KINDS
from gradwatch.core.report import Finding
from gradwatch.core.stats import ActivationRows, LayerRows
from gradwatch.core.structure import role_of

__all__ = ["ActivationRows", "Detector", "Thresholds"]


class Detector:
    """Streams per-layer rows to its checks and keeps the findings.

    Args:
        layer_names: The user's layer names, input to output.
        profile: Per layer, whether it takes part in the depth profile.
        thresholds: Cut-offs. Defaults to :class:`Thresholds`'s defaults.
        plain_recurrent: Per layer, whether it is a plain (ungated) recurrent layer, for which vanishing through
            time is judged at ``Thresholds.time_decades``. Defaults to every layer.
        gated_recurrent: Per layer, whether it is a gated recurrent layer (LSTM, GRU), judged through time at
            ``Thresholds.gated_time_decades``. Defaults to none.
        adaptive: Whether the optimizer rescales gradients per coordinate (Adam, RMSprop, ...): then a layer with a
            small gradient vanishes only if its updates are small too. Defaults to ``False``.
        trainable: Per layer, whether it has a trainable parameter. Defaults to every layer.
        checks: The check classes to run, in order. Defaults to
            :data:`~gradwatch.core.checks.DEFAULT_CHECKS`.
    """

    def __init__(self, layer_names: tuple[str, ...], profile: tuple[bool, ...],
                 thresholds: Thresholds | None = None, *, plain_recurrent: tuple[bool, ...] | None = None,
                 gated_recurrent: tuple[bool, ...] | None = None, adaptive: bool = False,
                 trainable: tuple[bool, ...] | None = None, checks: Sequence[type[Check]] | None = None) -> None:
        self.names = tuple(layer_names)
        self.t = thresholds or Thresholds()
        self.ledger = Ledger()
        n = len(self.names)

        def flags(values, default: bool) -> np.ndarray:
            return np.asarray(values if values is not None else [default] * n, dtype=bool)

        self.ctx = CheckContext(
            names=self.names, profile=flags(profile, True), plain_recurrent=flags(plain_recurrent, True),
            gated_recurrent=flags(gated_recurrent, False), trainable=flags(trainable, True),
            roles=tuple(role_of(name) for name in self.names), adaptive=adaptive,
            thresholds=self.t, ledger=self.ledger, recent=deque(maxlen=self.t.window))
        self.checks = [cls(self.ctx) for cls in (checks if checks is not None else DEFAULT_CHECKS)]
        self.last_step = 0

    def update(self, rows: LayerRows) -> list[Finding]:
        """Judge new gradient rows; return the findings that appeared for the first time."""
        with quiet():  # once for the whole batch of rows: the checks' own quiet() are then free
            finite = GradStep.finite_rows(rows)
            for check in self.checks:
                check.prepare(rows, finite)
            for row in GradStep.each(rows, finite):
                self.last_step = row.step
                if not row.skipped and row.finite:
                    self.ctx.recent.append(row)
                for check in self.checks:
                    check.on_grad(row)
            self.ledger.settle()  # the descriptions the checks deferred (Ledger.defer)
        return self._announce()

    def update_activations(self, acts: ActivationRows) -> list[Finding]:
        """Judge sampled activation rows (and RNN gradients through time); return new findings."""
        with quiet():
            for i in range(len(acts.steps)):
                if np.nansum(acts.nonfinite[i]) > 0:
                    continue  # inf/NaN activations say nothing about saturation or dead units; the non-finite check
                for check in self.checks:
                    check.on_activations(int(acts.steps[i]), acts, i)
        return self._announce()

    def note_activation_nonfinite(self, step: int, layer: int, activation: str | None = None) -> None:
        """Record the layer whose forward output first turned non-finite, and the activation it feeds (refines
        the non-finite origin)."""
        for check in self.checks:
            if isinstance(check, NonfiniteCheck):
                check.note_forward_origin(step, layer, activation)

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(self._finding(e) for e in self.ledger.episodes)

    def layer_status(self) -> list[str]:
        """Per layer: the kind of an active health finding that names it, else ``"ok"``."""
        status = ["ok"] * len(self.names)
        for e in self.ledger.episodes:
            if e.active and e.kind in HEALTH_KINDS:
                for li in e.layers:
                    if status[li] == "ok" or e.kind == "nonfinite":
                        status[li] = e.kind
        return status

    def recent_medians(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Median gradient RMS, update ratio and gradient norm per layer over the recent window."""
        return self.ctx.recent_medians()

    def _announce(self) -> list[Finding]:
        return [self._finding(e) for e in self.ledger.announce()]

    def _finding(self, e: Episode) -> Finding:
        layers = tuple(self.names[li] for li in sorted(e.layers))
        return Finding(kind=e.kind, layers=layers, step=int(e.first_step), last_step=int(e.last_step),
                       active=e.active, severity=e.severity, evidence=dict(e.evidence), message=e.message,
                       check=e.check)
