"""Vanishing and exploding gradients across layers: the depth profile, norm growth and runaway updates.

Two views a practitioner uses, judged on every collected step and voted over a window:

- **Depth profile.** Gradient RMS of each weight layer against the output side of the network. Falling by
  orders of magnitude toward the input is vanishing; rising is exploding. This is relative, so a converged
  model (tiny gradients everywhere because the loss is ~0) is not called vanishing.
- **Trend over steps.** Gradient norms growing geometrically, or updates as large as the weights, are
  exploding; early layers whose updates are far below the output layers' are vanishing.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from gradwatch.core.checks.base import Check, CheckContext, Episode, GradStep, decades_text, fmt, quiet, span

__all__ = ["GradientScaleCheck"]


class GradientScaleCheck(Check):
    """``vanishing`` and ``exploding`` from the depth profile, the norm trend and the update ratio.

    Severity: a vanishing finding is critical when its worst layer is ``CRITICAL_DECADES`` or more below the
    output side (or receives exactly zero); an exploding one when the worst layer's RMS passes
    ``Thresholds.grad_rms_exploding`` or its update ratio passes ``CRITICAL_UPDATE_RATIO``. A message quotes the
    norm growth once it passes ``SHOWN_GROWTH_DECADES`` and the update ratio once it passes
    ``SHOWN_UPDATE_RATIO``.
    """

    name = "gradient_scale"
    kinds = ("vanishing", "exploding")

    #: Orders of magnitude below the output side that make a vanishing finding critical (a millionth).
    CRITICAL_DECADES = 6.0
    #: Update ratio per step that makes an exploding finding critical (updates ten times the weights).
    CRITICAL_UPDATE_RATIO = 10.0
    #: Norm growth (decades over the trend window) worth quoting in an exploding message.
    SHOWN_GROWTH_DECADES = 0.5
    #: Update ratio worth quoting in an exploding message (ten times a steady 1e-3).
    SHOWN_UPDATE_RATIO = 1e-2

    def __init__(self, ctx: CheckContext) -> None:
        super().__init__(ctx)
        self.profile = ctx.profile
        self._totals: deque[float] = deque(maxlen=self.t.trend_window)
        self._voters = {kind: self.voter(kind, kind) for kind in self.kinds}

    def on_grad(self, row: GradStep) -> None:
        if row.skipped or not row.finite:
            return
        t = self.t
        rms, ur = row.rms, row.update_ratio
        van, exp, ev = self._profile(rms, ur, row.present)
        trend = self._trend(row.grad_norm, row.present)
        if trend is not None:
            exp |= trend
        with quiet():
            exp |= self.profile & (rms > t.grad_rms_exploding)
            exp |= self.profile & (ur > t.update_ratio_exploding)
        for kind, flags in (("vanishing", van), ("exploding", exp)):
            ep = self._voters[kind].vote(row.step, flags)
            if ep is not None:
                self._describe(ep, ev)

    def _profile(self, rms: np.ndarray, ur: np.ndarray, present: np.ndarray):
        t = self.t
        van = np.zeros(len(self.names), dtype=bool)
        exp = np.zeros_like(van)
        idx = np.flatnonzero(self.profile & present & np.isfinite(rms))
        ev: dict = {}
        if len(idx) < 2:
            return van, exp, ev
        out = idx[-2:]
        ref_i = int(out[np.argmax(rms[out])])
        ref = float(rms[ref_i])
        if ref <= 0:
            return van, exp, ev  # nothing flows at the output: converged or dead, not a depth profile
        with quiet():
            decades = np.log10(ref / rms)  # +inf where the gradient is exactly zero
        body = np.zeros_like(van)
        body[idx] = True
        body[out] = False
        van = body & (decades >= t.vanishing_decades)
        exp = body & (decades <= -t.exploding_decades)
        # Updates far slower than the output side's, while the output side still learns.
        ur_ref = ur[ref_i]
        if np.isfinite(ur_ref) and ur_ref >= t.update_ratio_learning:
            with quiet():
                van |= body & (ur < t.update_ratio_vanishing) & (decades >= t.slow_update_decades)
        ev = {"reference_layer": self.names[ref_i], "reference_grad_rms": ref, "decades": decades,
              "reference_update_ratio": float(ur_ref)}
        return van, exp, ev

    def _trend(self, gn: np.ndarray, present: np.ndarray) -> np.ndarray | None:
        t = self.t
        sel = self.profile & present & np.isfinite(gn)
        if not sel.any():
            return None
        total = float(np.sqrt(np.sum(gn[sel] ** 2)))
        self._totals.append(total)
        if len(self._totals) < t.trend_window or self._totals[0] <= 0:
            return None
        seq = np.asarray(self._totals)
        rising = np.mean(seq[1:] > seq[:-1])
        growth = math.log10(seq[-1] / seq[0]) if seq[-1] > 0 else -math.inf
        if rising >= t.rising_fraction and growth >= t.growth_decades:
            return sel.copy()
        return None

    def _growth_decades(self) -> float | None:
        if len(self._totals) < 2 or self._totals[0] <= 0 or self._totals[-1] <= 0:
            return None
        return math.log10(self._totals[-1] / self._totals[0])

    def _describe(self, ep: Episode, ev: dict) -> None:
        rms, ur, _ = self.ctx.recent_medians()
        layers = sorted(ep.layers)
        names = [self.names[li] for li in layers]
        ref_name = ev.get("reference_layer")
        ref_rms = ev.get("reference_grad_rms", float("nan"))
        with quiet():
            ref_i = self.names.index(ref_name) if ref_name in self.names else None
            ref_med = float(rms[ref_i]) if ref_i is not None else ref_rms
            decades = {self.names[li]: float(np.log10(ref_med / rms[li])) for li in layers}
        worst = max(layers, key=lambda li: abs(decades[self.names[li]]) if np.isfinite(decades[self.names[li]])
                    else math.inf)
        wname = self.names[worst]
        ep.evidence = {
            "layer_grad_rms": {self.names[li]: float(rms[li]) for li in layers},
            "layer_update_ratio": {self.names[li]: float(ur[li]) for li in layers},
            "reference_layer": ref_name, "reference_grad_rms": ref_med,
            "reference_update_ratio": ev.get("reference_update_ratio", float("nan")),
            "decades_from_reference": decades, "worst_layer": wname, "window_steps": self.t.window,
        }
        where = span(names)
        d = decades[wname]
        plural = "s" if len(names) > 1 else ""
        if ep.kind == "vanishing":
            ep.severity = "critical" if (not np.isfinite(d) or d >= self.CRITICAL_DECADES or rms[worst] == 0) \
                else "warning"
            ep.message = (f"Gradients vanish in {len(names)} early layer{plural} ({where}): "
                          f"gradient RMS {fmt(rms[worst])} at {wname} vs {fmt(ref_med)} at the output-side "
                          f"layer {ref_name} ({decades_text(d)} lower)")
            if ur[worst] == 0:
                ep.message += "; its updates are below float32 resolution (update ratio 0)"
            elif np.isfinite(ur[worst]):
                ep.message += f"; update ratio {fmt(ur[worst])}"
            ep.message += "."
            return
        growth = self._growth_decades()
        ep.evidence["norm_growth_decades"] = growth
        ep.severity = "critical" if (rms[worst] > self.t.grad_rms_exploding
                                     or ur[worst] > self.CRITICAL_UPDATE_RATIO) else "warning"
        parts = [f"gradient RMS {fmt(rms[worst])} at {wname}"]
        if np.isfinite(d) and d < 0:
            parts.append(f"{decades_text(-d)} above the output-side layer {ref_name}")
        if growth is not None and growth > self.SHOWN_GROWTH_DECADES:
            parts.append(f"total norm up {decades_text(growth)} over the last {len(self._totals)} steps")
        if np.isfinite(ur[worst]) and ur[worst] > self.SHOWN_UPDATE_RATIO:
            parts.append(f"update ratio {fmt(ur[worst])}")
        ep.message = f"Gradients explode in {len(names)} layer{plural} ({where}): " + "; ".join(parts) + "."
