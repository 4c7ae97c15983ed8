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

import functools
import itertools
import math
from collections import deque
from typing import NamedTuple

import numpy as np

from gradwatch.core.checks.base import Check, CheckContext, EarlyLate, Episode, GradStep, decades_text, fmt, quiet, span
from gradwatch.core.stats import LayerRows

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

    def prepare(self, rows: LayerRows, finite: np.ndarray) -> None:
        """The depth profile, the RMS ceiling and runaway updates of every row at once: none of them depends on an
        earlier row's verdict, only on the latest update ratio measured before it (carried forward here)."""
        t = self.t
        rms, ur, present = rows.grad_rms, rows.update_ratio, rows.present
        judged = ~rows.skipped & finite  # the rows on_grad looks at
        with quiet():
            last = _carry_forward(ur, np.isfinite(ur) & judged[:, None], self._last_ur)
            self._last_ur = last[-1]
            van, exp, ref_of, profiled = self._profile(rms, ur, present, last)
            exp |= self.profile & (rms > t.grad_rms_exploding)
            # Runaway updates: most weight layers update by more than their own size. The update ratio is measured
            # every `update_every` collected steps; the latest measurement stands for the steps in between, or the
            # condition could never hold on most of the window. One layer alone (an output layer's first step, or
            # the recurrent layer an explosion through time wrecked, which that check reports) is not a runaway.
            weights = self.profile & present
            measured = weights & np.isfinite(last)
            over = weights & (last > t.update_ratio_exploding)
            n_measured = measured.sum(axis=1)
            runaway = (n_measured > 0) & (2 * (measured & over).sum(axis=1) > n_measured)
            exp |= over & runaway[:, None]
            sel = weights & np.isfinite(rows.grad_norm)
        self._rows = (van, exp, van.any(axis=1).tolist(), exp.any(axis=1).tolist(), ref_of, profiled.tolist(), sel,
                      sel.any(axis=1).tolist())

    def on_grad(self, row: GradStep) -> None:
        if row.skipped or not row.finite:
            return
        t, i = self.t, row.index
        van, exp, van_any, exp_any, ref_of, profiled, sel, sel_any = self._rows
        refs = ref_of[i] if profiled[i] else None
        van, exp, exp_any = van[i], exp[i], exp_any[i]
        trend = self._trend(row.grad_norm, sel[i], sel_any[i])
        if trend is not None:
            exp, exp_any = exp | trend, True
        if self._burst_run and sel_any[i]:
            # a burst step votes too, so the episode it opens is not closed by the next vote
            exp, exp_any = exp | sel[i], True
        for kind, flags, held in (("vanishing", van, van_any[i]), ("exploding", exp, exp_any)):
            ep = self._voters[kind].vote(row.step, flags, held)
            if kind == "exploding" and ep is None and self._burst_run >= t.burst_steps and sel_any[i]:
                # A burst does not wait for the window: the next step may already be inf.
                ep = self.ctx.ledger.open("exploding", "exploding", self.name, row.step - t.burst_steps + 1,
                                          np.flatnonzero(sel[i]), "critical")
            if ep is not None and refs is not None:
                # Written when a check next gets the episode, or at the flush's end: what this row describes it
                # from is kept, so the description is the one this row would have written.
                self.ctx.ledger.defer(ep, functools.partial(self._describe, ep, refs, self._moment(kind, ep)))

    def _moment(self, kind: str, ep: Episode) -> _Moment:
        """What :meth:`_describe` reads of this row's state: the episode's layers, the window's rows and, for an
        exploding episode, the norm trend."""
        layers, recent = sorted(ep.layers), tuple(self.ctx.recent)
        if kind == "vanishing":
            return _Moment(layers, recent)
        return _Moment(layers, recent, self._growth_decades(), self._norms.growth(), self._burst_run,
                       self._totals[-1] if self._totals else math.nan, len(self._totals))

    def _profile(self, rms: np.ndarray, ur: np.ndarray, present: np.ndarray, last_ur: np.ndarray):
        """Per row (all arrays ``(n_rows, n_layers)``): the layers vanishing and exploding against their
        references, each layer's reference, and whether the row has a depth profile at all (two usable layers, a
        positive gradient at the output side)."""
        t = self.t
        n_rows, n = rms.shape
        r = np.arange(n_rows)
        usable = self.profile & present & np.isfinite(rms)
        # The output side: the larger of the last two usable layers (the first of equals).
        b, a = _last_two(usable)
        ref_i = np.where(rms[r, b] > rms[r, a], b, a)
        profiled = (usable.sum(axis=1) >= 2) & (rms[r, ref_i] > 0)  # else converged or dead: no depth profile
        # Each layer's reference: the largest of the last two of its peers in use, or, for a layer without peers,
        # the output side. The references themselves (and the output side) are not judged.
        ref_of = np.repeat(ref_i[:, None], n, axis=1)
        body = self._single & usable
        body[r, a] = body[r, b] = False
        for members in self._groups:
            live = usable[:, members]
            n_live = live.sum(axis=1)
            pb, pa = _last_two(live)
            pb, pa = members[pb], members[pa]
            peer_ref = np.where(rms[r, pb] > rms[r, pa], pb, pa)
            early = live & (np.cumsum(live, axis=1) <= (n_live - 2)[:, None])  # every live peer but the last two
            early &= ((n_live >= 3) & (rms[r, peer_ref] > 0))[:, None]
            ref_of[:, members] = np.where(early, peer_ref[:, None], ref_of[:, members])
            body[:, members] |= early
        body &= profiled[:, None]
        at = r[:, None], ref_of
        decades = np.log10(rms[at] / rms)  # +inf where the gradient is exactly zero
        slow_ref = ur[at] >= t.update_ratio_learning  # the reference still learns (not converged)
        slow = slow_ref & (ur < t.update_ratio_vanishing) & (decades >= t.slow_update_decades)
        van = body & ((decades >= t.vanishing_decades) | slow)
        exp = body & (decades <= -t.exploding_decades)
        if self.ctx.adaptive:
            # Adam and kin: a small gradient is not a small update. Vanishing only where the layer's updates lag
            # its reference's too (the latest measured ratios).
            van &= np.log10(last_ur[at] / last_ur) >= t.adaptive_update_decades
        return van, exp, ref_of, profiled

    def _trend(self, gn: np.ndarray, sel: np.ndarray, any_sel: bool) -> np.ndarray | None:
        """The layers whose norms count toward a growing total norm (``sel``: weight layers with a finite norm)
        when it grows, else ``None``."""
        t = self.t
        if not any_sel:
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
        seq = self._totals
        rising = sum(b > a for a, b in itertools.pairwise(seq)) / (len(seq) - 1) if len(seq) > 1 else math.nan
        growth = math.log10(seq[-1] / seq[0]) if seq[-1] > 0 else -math.inf
        if rising >= t.rising_fraction and growth >= t.growth_decades:
            return sel.copy()
        return None

    def _growth_decades(self) -> float | None:
        if len(self._totals) < 2 or self._totals[0] <= 0 or self._totals[-1] <= 0:
            return None
        return math.log10(self._totals[-1] / self._totals[0])

    def _describe(self, ep: Episode, ref_of: np.ndarray, moment: _Moment) -> None:
        """Rewrite the episode's evidence and message from the medians over ``moment``'s window; ``ref_of`` is that
        row's reference of each layer (a row without a depth profile leaves the evidence that showed it)."""
        # Over all the episode's layers (a thousand in a deep model): array math, then the per-layer dicts in one
        # zip each.
        rms, ur, _ = self.ctx.recent_medians(moment.recent)
        layers = moment.layers
        at = np.asarray(layers, dtype=np.int64)
        names = [self.names[li] for li in layers]
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
        growth, sustained, burst_run = moment.growth, moment.sustained, moment.burst_run
        ep.evidence["norm_growth_decades"] = growth
        if np.isfinite(sustained):
            ep.evidence["growth_since_first_steps_decades"] = sustained
        ep.severity = "critical" if (rms[worst] > self.t.grad_rms_exploding or ur[worst] > self.CRITICAL_UPDATE_RATIO
                                     or burst_run >= self.t.burst_steps) else "warning"
        parts = [f"gradient RMS {fmt(rms[worst])} at {wname}"]
        if np.isfinite(d) and d < 0:
            parts.append(f"{decades_text(-d)} above the output-side layer {ref_name}")
        if growth is not None and growth > self.SHOWN_GROWTH_DECADES:
            parts.append(f"total norm up {decades_text(growth)} over the last {moment.n_totals} steps")
        if burst_run >= self.t.burst_steps:
            parts.append(f"total norm {fmt(moment.last_total)}, over {self.t.burst_decades:g} orders of magnitude "
                         f"above its median in the first steps, for {burst_run} steps in a row")
        if np.isfinite(sustained) and sustained >= self.t.sustained_growth_decades:
            parts.append(f"total norm {decades_text(sustained)} above its level in the first {self.t.window} "
                         "steps")
        if np.isfinite(ur[worst]) and ur[worst] > self.SHOWN_UPDATE_RATIO:
            parts.append(f"update ratio {fmt(ur[worst])}")
        ep.message = f"Gradients explode in {len(names)} layer{plural} ({where}): " + "; ".join(parts) + "."


class _Moment(NamedTuple):
    """What a row leaves for :meth:`GradientScaleCheck._describe`: the episode's layers, the window's rows, and the
    total norm's trend (an exploding episode only)."""

    layers: list[int]
    recent: tuple[GradStep, ...]
    growth: float | None = None  # GradientScaleCheck._growth_decades()
    sustained: float = math.nan  # the total norm's last window over its first, in decades
    burst_run: int = 0
    last_total: float = math.nan
    n_totals: int = 0


def _last_two(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a boolean ``(n_rows, n)`` array, the columns of its last and second-to-last ``True`` (meaningless
    where a row has fewer)."""
    n = mask.shape[1]
    last = n - 1 - np.argmax(mask[:, ::-1], axis=1)
    rest = mask.copy()
    rest[np.arange(len(mask)), last] = False
    return last, n - 1 - np.argmax(rest[:, ::-1], axis=1)


def _carry_forward(values: np.ndarray, taken: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per row, each column's latest value where ``taken`` (this row's or an earlier row's), else ``before``.

    Example:
        >>> _carry_forward(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[True, False], [False, False]]),
        ...                np.array([0.0, 9.0]))
        array([[1., 9.],
               [1., 9.]])
    """
    at = np.where(taken, np.arange(len(values))[:, None], -1)
    np.maximum.accumulate(at, axis=0, out=at)
    return np.where(at >= 0, np.take_along_axis(values, np.maximum(at, 0), axis=0), before)
