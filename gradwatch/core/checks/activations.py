"""What the sampled forward pass shows: saturated sigmoid/tanh units, dead ReLU units, and recurrent layers whose
gradient vanishes or explodes through time."""

from __future__ import annotations

import math

import numpy as np

from gradwatch.core.checks.base import Check, CheckContext, decades_text, quiet, span
from gradwatch.core.stats import DEAD_UNIT_SAMPLES, SATURATION_MARGIN, ActivationRows

__all__ = ["DeadUnitsCheck", "SaturationCheck", "ThroughTimeCheck"]


class _FractionCheck(Check):
    """A per-layer fraction of units from the activation samples, voted over ``Thresholds.activation_window``."""

    kind = ""
    field = ""
    threshold_name = ""
    adjective = ""
    unit = ""

    def __init__(self, ctx: CheckContext) -> None:
        super().__init__(ctx)
        self._voter = self.voter(self.kind, self.kind, window=self.t.activation_window)

    def on_activations(self, step: int, acts: ActivationRows, i: int) -> None:
        values = getattr(acts, self.field)[i]
        threshold = getattr(self.t, self.threshold_name)
        with quiet():
            flags = values >= threshold
        ep = self._voter.vote(step, flags)
        if ep is None:
            return
        names = [self.names[li] for li in sorted(ep.layers)]
        frac = {self.names[li]: float(values[li]) for li in sorted(ep.layers)}
        ep.evidence = {"fraction": frac, "threshold": threshold}
        worst = max(frac, key=lambda k: frac[k] if np.isfinite(frac[k]) else -1)
        ep.message = (f"{len(names)} layer{'s' if len(names) > 1 else ''} ({span(names)}) with {self.adjective} "
                      f"units: {frac[worst]:.0%} {self.unit} at {worst}.")
        ep.severity = "warning"


class SaturationCheck(_FractionCheck):
    """``saturation``: at least ``Thresholds.saturation_fraction`` of a sigmoid/tanh layer's outputs within
    :data:`~gradwatch.core.stats.SATURATION_MARGIN` of the asymptotes, on most recent samples."""

    name = "saturation"
    kinds = ("saturation",)
    kind, field, threshold_name, adjective = "saturation", "saturation", "saturation_fraction", "saturated"
    unit = f"outputs within {SATURATION_MARGIN:.0%} of the activation's asymptotes"


class DeadUnitsCheck(_FractionCheck):
    """``dead_units``: at least ``Thresholds.dead_fraction`` of a ReLU layer's units at zero on every input of the
    last :data:`~gradwatch.core.stats.DEAD_UNIT_SAMPLES` sampled batches, on most recent samples."""

    name = "dead_units"
    kinds = ("dead_units",)
    kind, field, threshold_name, adjective = "dead_units", "dead", "dead_fraction", "dead"
    unit = (f"ReLU units at zero on every input of the last {DEAD_UNIT_SAMPLES} sampled batches (so their incoming "
            "weights got no gradient from any of them)")


class ThroughTimeCheck(Check):
    """``vanishing`` / ``exploding`` through time in recurrent layers, from the gradient reaching each time
    step's input: falling ``Thresholds.time_decades`` from the last step to the first is vanishing for a plain RNN
    cell; a gated cell (LSTM, GRU) fades by design while its forget gates learn what to keep (Hochreiter &
    Schmidhuber 1997), so it is vanishing only past ``Thresholds.gated_time_decades``, on most samples of the
    window. Rising ``time_decades`` is exploding. Its findings carry ``check == "through_time"``."""

    name = "through_time"
    kinds = ("vanishing", "exploding")

    def __init__(self, ctx: CheckContext) -> None:
        super().__init__(ctx)
        w = self.t.activation_window
        # Plain cells and gated cells vanish by different cut-offs over different windows: two voters.
        self._voters = {"vanishing": self.voter("vanishing:time", "vanishing", window=w),
                        "exploding": self.voter("exploding:time", "exploding", window=w),
                        "gated": self.voter("vanishing:time:gated", "vanishing", window=self.t.gated_time_window)}

    def on_activations(self, step: int, acts: ActivationRows, i: int) -> None:
        t = self.t
        dec = acts.time_decades[i]
        with quiet():
            flags = {"vanishing": self.ctx.plain_recurrent & (dec >= t.time_decades),
                     "exploding": dec <= -t.time_decades,
                     "gated": self.ctx.gated_recurrent & (dec >= t.gated_time_decades)}
        cutoff = {"vanishing": t.time_decades, "exploding": t.time_decades, "gated": t.gated_time_decades}
        ledger = self.ctx.ledger
        for which, f in flags.items():
            voter = self._voters[which]
            kind, key = voter.kind, voter.key
            ep = voter.vote(step, f)
            if kind == "exploding" and ep is None and ledger.get(key) is None:
                with quiet():
                    extreme = dec <= -t.time_extreme_factor * t.time_decades
                if extreme.any():
                    ep = ledger.open(key, kind, self.name, step, np.flatnonzero(extreme))
            if ep is None:
                continue
            # The evidence is the latest sample that shows it: a sample where the episode's condition no longer
            # holds (e.g. a saturated RNN whose explosion turned into decay) leaves the message as it was.
            layers = [li for li in sorted(ep.layers) if f[li]]
            if not layers:
                continue
            d = {self.names[li]: float(dec[li]) for li in layers if np.isfinite(dec[li]) or dec[li] == math.inf}
            ep.evidence = {"through_time": True, "time_decades": d, "threshold_decades": cutoff[which]}
            names = ", ".join(self.names[li] for li in layers)
            worst = max(d.values(), key=abs) if d else float("nan")
            if kind == "vanishing":
                ep.evidence["gated"] = [self.names[li] for li in layers if self.ctx.gated_recurrent[li]]
                ep.severity = "critical" if worst >= t.time_extreme_factor * t.time_decades else "warning"
                ep.message = (f"Gradients vanish through time in {names}: the gradient reaching the first time "
                              f"steps is {decades_text(worst)} below the last step's, so early inputs barely train.")
            else:
                ep.severity = "critical"
                ep.message = (f"Gradients explode through time in {names}: the gradient reaching the first time "
                              f"steps is {decades_text(-worst)} above the last step's.")
