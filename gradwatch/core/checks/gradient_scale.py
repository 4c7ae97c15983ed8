"""Vanishing and exploding gradients across layers: the depth profile, norm growth and runaway updates.

Two views a practitioner uses, judged on every collected step and voted over a window:

- **Depth profile, like with like.** A layer's gradient RMS against its peers downstream: the same role in
  later blocks (``encoder.layer.#.attention.self.query``), or, for a layer with no peers, the output side of
  the network. Falling by orders of magnitude toward the input is vanishing; rising is exploding. This is
  relative, so a converged model (tiny gradients everywhere because the loss is ~0) is not called vanishing,
  and a role that is small by design in every block (attention queries and keys while attention is uniform,
  LayerScale-gated branches) is not compared with a differently-made layer.
- **Learning, under adaptive optimizers.** Adam and kin rescale each coordinate, so a small gradient is not a
  small update: there a layer vanishes only if its update ratio is also far below its reference's.
- **Trend over steps.** Gradient norms growing geometrically, growing far above their level in the first steps
  however slowly, or updates as large as the weights, are exploding; early layers whose updates are far below
  the output layers' are vanishing.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from gradwatch.core.checks.base import Check, CheckContext, EarlyLate, Episode, GradStep, decades_text, fmt, quiet, span

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
        self._norms = EarlyLate(self.t.window)  # the total norm: its first steps against its last
        self._burst_run = 0  # consecutive steps with the total norm burst_decades above its early median
        self._last_ur = np.full(len(self.names), np.nan)  # the latest update ratio measured per layer
        self._voters = {kind: self.voter(kind, kind) for kind in self.kinds}
        groups: dict[str, list[int]] = {}
        for i in np.flatnonzero(self.profile):
            groups.setdefault(ctx.roles[i], []).append(int(i))
        #: Roles held by two or more weight layers (input to output), and the layers without peers.
        self._groups = [np.asarray(m) for m in groups.values() if len(m) >= 2]
        self._single = np.zeros(len(self.names), dtype=bool)
        for members in groups.values():
            if len(members) == 1:
                self._single[members[0]] = True

    def on_grad(self, row: GradStep) -> None:
        if row.skipped or not row.finite:
            return
        t = self.t
        rms, ur = row.rms, row.update_ratio
        with quiet():
            self._last_ur = np.where(np.isfinite(ur), ur, self._last_ur)
        van, exp, ev = self._profile(rms, ur, row.present)
        trend = self._trend(row.grad_norm, row.present)
        if trend is not None:
            exp |= trend
        with quiet():
            exp |= self.profile & (rms > t.grad_rms_exploding)
            # Runaway updates: most weight layers update by more than their own size. The update ratio is measured
            # every `update_every` collected steps; the latest measurement stands for the steps in between, or the
            # condition could never hold on most of the window. One layer alone (an output layer's first step, or
            # the recurrent layer an explosion through time wrecked, which that check reports) is not a runaway.
            measured = self._last_ur[self.profile & row.present]
            measured = measured[np.isfinite(measured)]
            runaway = measured > t.update_ratio_exploding
            if len(measured) and 2 * int(runaway.sum()) > len(measured):
                exp |= self.profile & row.present & (self._last_ur > t.update_ratio_exploding)
        burst = np.flatnonzero(self.profile & row.present & np.isfinite(row.grad_norm))
        if self._burst_run:
            exp[burst] = True  # a burst step votes too, so the episode it opens is not closed by the next vote
        for kind, flags in (("vanishing", van), ("exploding", exp)):
            ep = self._voters[kind].vote(row.step, flags)
            if kind == "exploding" and ep is None and self._burst_run >= t.burst_steps and len(burst):
                # A burst does not wait for the window: the next step may already be inf.
                ep = self.ctx.ledger.open("exploding", "exploding", self.name, row.step - t.burst_steps + 1,
                                          burst, "critical")
            if ep is not None:
                self._describe(ep, ev)

    def _profile(self, rms: np.ndarray, ur: np.ndarray, present: np.ndarray):
        t = self.t
        n = len(self.names)
        van = np.zeros(n, dtype=bool)
        exp = np.zeros_like(van)
        usable = self.profile & present & np.isfinite(rms)
        idx = np.flatnonzero(usable)
        ev: dict = {}
        if len(idx) < 2:
            return van, exp, ev
        out = idx[-2:]
        ref_i = int(out[np.argmax(rms[out])])
        if rms[ref_i] <= 0:
            return van, exp, ev  # nothing flows at the output: converged or dead, not a depth profile
        # Each layer's reference: the largest of the last two of its peers in use, or, for a layer without peers,
        # the output side. The references themselves (and the output side) are not judged.
        ref_of = np.full(n, ref_i)
        body = self._single & usable
        body[out] = False
        for members in self._groups:
            live = members[usable[members]]
            if len(live) < 3:
                continue
            last = live[-2:]
            peer_ref = int(last[np.argmax(rms[last])])
            if rms[peer_ref] > 0:
                ref_of[live[:-2]] = peer_ref
                body[live[:-2]] = True
        with quiet():
            decades = np.log10(rms[ref_of] / rms)  # +inf where the gradient is exactly zero
            slow_ref = ur[ref_of] >= t.update_ratio_learning  # the reference still learns (not converged)
            slow = slow_ref & (ur < t.update_ratio_vanishing) & (decades >= t.slow_update_decades)
            van = body & ((decades >= t.vanishing_decades) | slow)
            exp = body & (decades <= -t.exploding_decades)
            if self.ctx.adaptive:
                # Adam and kin: a small gradient is not a small update. Vanishing only where the layer's updates
                # lag its reference's too (the latest measured ratios).
                lag = np.log10(self._last_ur[ref_of] / self._last_ur)
                van &= lag >= t.adaptive_update_decades
        ev = {"reference_of": ref_of, "decades": decades, "reference_update_ratio": float(ur[ref_i])}
        return van, exp, ev

    def _trend(self, gn: np.ndarray, present: np.ndarray) -> np.ndarray | None:
        t = self.t
        sel = self.profile & present & np.isfinite(gn)
        if not sel.any():
            self._burst_run = 0  # no measurable norm on this step: a burst must be seen on consecutive steps
            return None
        total = float(np.sqrt(np.sum(gn[sel] ** 2)))
        self._totals.append(total)
        # The level before: the median over the first steps, those of a burst left out (a burst must not raise
        # its own baseline; a divergence can start on step 2).
        early = self._norms.baseline()
        burst = early > 0 and math.log10(max(total, 1e-300) / early) >= t.burst_decades
        self._burst_run = self._burst_run + 1 if burst else 0
        self._norms.add(total, baseline=not burst)
        if self._norms.growth() >= t.sustained_growth_decades:
            return sel.copy()
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
        if "reference_of" not in ev:
            return  # no depth profile on this step: the episode keeps the evidence that showed it
        # Redone on every step the episode is open, over all its layers (a thousand in a deep model): array math,
        # then the per-layer dicts in one zip each.
        rms, ur, _ = self.ctx.recent_medians()
        layers = sorted(ep.layers)
        at = np.asarray(layers, dtype=np.int64)
        names = [self.names[li] for li in layers]
        ref_of = ev["reference_of"]
        refs = ref_of[at]
        with quiet():
            dec = np.log10(rms[refs] / rms[at])
        decades = dict(zip(names, dec.tolist()))
        # The layer farthest from its reference (the first of equals); one that is not finite is the farthest.
        worst = layers[int(np.argmax(np.where(np.isfinite(dec), np.abs(dec), np.inf)))]
        wname = self.names[worst]
        ref_i = int(ref_of[worst])
        ref_name, ref_med = self.names[ref_i], float(rms[ref_i])
        ep.evidence = {
            "layer_grad_rms": dict(zip(names, rms[at].tolist())),
            "layer_update_ratio": dict(zip(names, ur[at].tolist())),
            "reference_layer": ref_name, "reference_grad_rms": ref_med,
            "reference_update_ratio": float(ur[ref_i]),
            "reference_of": dict(zip(names, [self.names[r] for r in refs.tolist()])),
            "decades_from_reference": decades, "worst_layer": wname, "window_steps": self.t.window,
            "optimizer_adaptive": self.ctx.adaptive,
        }
        where = span(names)
        d = decades[wname]
        plural = "s" if len(names) > 1 else ""
        if ep.kind == "vanishing":
            ep.severity = "critical" if (not np.isfinite(d) or d >= self.CRITICAL_DECADES or rms[worst] == 0) \
                else "warning"
            side = "the output-side layer" if self._single[worst] else "its peer"
            ep.message = (f"Gradients vanish in {len(names)} early layer{plural} ({where}): "
                          f"gradient RMS {fmt(rms[worst])} at {wname} vs {fmt(ref_med)} at {side} "
                          f"{ref_name} ({decades_text(d)} lower)")
            if ur[worst] == 0:
                ep.message += "; its updates are below float32 resolution (update ratio 0)"
            elif np.isfinite(ur[worst]):
                ep.message += f"; update ratio {fmt(ur[worst])}"
            ep.message += "."
            return
        growth = self._growth_decades()
        ep.evidence["norm_growth_decades"] = growth
        sustained = self._norms.growth()
        if np.isfinite(sustained):
            ep.evidence["growth_since_first_steps_decades"] = sustained
        ep.severity = "critical" if (rms[worst] > self.t.grad_rms_exploding or ur[worst] > self.CRITICAL_UPDATE_RATIO
                                     or self._burst_run >= self.t.burst_steps) else "warning"
        parts = [f"gradient RMS {fmt(rms[worst])} at {wname}"]
        if np.isfinite(d) and d < 0:
            parts.append(f"{decades_text(-d)} above the output-side layer {ref_name}")
        if growth is not None and growth > self.SHOWN_GROWTH_DECADES:
            parts.append(f"total norm up {decades_text(growth)} over the last {len(self._totals)} steps")
        if self._burst_run >= self.t.burst_steps:
            parts.append(f"total norm {fmt(self._totals[-1])}, over {self.t.burst_decades:g} orders of magnitude "
                         f"above its median in the first steps, for {self._burst_run} steps in a row")
        if np.isfinite(sustained) and sustained >= self.t.sustained_growth_decades:
            parts.append(f"total norm {decades_text(sustained)} above its level in the first {self.t.window} "
                         "steps")
        if np.isfinite(ur[worst]) and ur[worst] > self.SHOWN_UPDATE_RATIO:
            parts.append(f"update ratio {fmt(ur[worst])}")
        ep.message = f"Gradients explode in {len(names)} layer{plural} ({where}): " + "; ".join(parts) + "."
