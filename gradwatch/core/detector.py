"""Turns per-layer gradient statistics into findings: which layers vanish or explode, since when, and the
numbers that show it. Numpy only.

Two views a practitioner uses, judged on every collected step and then smoothed over a window with
hysteresis, so that a finding neither flaps nor fires on one noisy step:

- **Depth profile.** Gradient RMS of each weight layer against the output side of the network. Falling by
  orders of magnitude toward the input is vanishing; rising is exploding. This is relative, so a converged
  model (tiny gradients everywhere because the loss is ~0) is not called vanishing.
- **Trend over steps.** Gradient norms growing geometrically, or updates as large as the weights, are
  exploding; early layers whose updates are far below the output layers' are vanishing.

Any non-finite gradient on an applied step is reported at once, naming the layer where it first appears in
backward order. Steps a loss scaler skipped for overflow (AMP) are not judged, unless they persist.

Published rules this improves on (each judges one probe batch per epoch with fixed cut-offs):
AUTOTRAINER (Zhang et al., ICSE 2021), DeepDiagnosis (Wardat et al., ICSE 2022) and TheDeepChecker
(Ben Braiek & Khomh, TOSEM 2023).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from gradwatch.core.report import Finding
from gradwatch.core.stats import LayerRows

__all__ = ["ActivationRows", "Detector", "Thresholds"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """The detector's cut-offs. Each default names where it comes from.

    Args:
        vanishing_decades: A weight layer whose gradient RMS is this many orders of magnitude below the
            output side vanishes. AUTOTRAINER flags a first/last-layer gradient-norm ratio below 1e-3.
        exploding_decades: A weight layer whose gradient RMS is this many orders of magnitude above the
            output side explodes. AUTOTRAINER uses a ratio of 70; a whole 1e3 keeps healthy deep nets silent.
        update_ratio_vanishing: An early layer's ``||dw||/||w||`` below this is too slow. TheDeepChecker
            calls log10 ratios below -4 too slow; Karpathy's rule of thumb puts healthy near 1e-3.
        update_ratio_learning: The output side counts as still learning (not converged) above this.
        update_ratio_exploding: Updates this large relative to the weights per step are runaway.
            TheDeepChecker calls log10 ratios above -1 too fast; 1.0 is ten times past that.
        growth_decades: Total gradient norm growing by this many orders of magnitude over ``trend_window``
            collected steps, rising on at least ``rising_fraction`` of them, is exploding. TheDeepChecker
            flags every ratio >= 2 over 5 steps (x32, 1.5 decades).
        trend_window: Steps the growth trend is judged over.
        rising_fraction: Fraction of step-to-step ratios that must be rising.
        grad_rms_exploding: Gradient RMS above this is exploding whatever the profile. TheDeepChecker: 1e6.
        window: Collected steps a finding is judged over.
        on_fraction: A finding starts when its condition held on this fraction of ``window``.
        off_fraction: It ends when its condition held on no more than this fraction of ``window``.
        skip_fraction: AMP overflow skips on this fraction of ``window`` steps is persistent, not calibration.
        saturation_fraction: Fraction of saturated sigmoid/tanh units that counts as saturation.
        dead_fraction: Fraction of ReLU units zero for a whole batch that counts as dead units.
        activation_window: Activation samples (taken every ``activation_every`` steps) a saturation or
            dead-unit finding is judged over.
        time_decades: Input gradient falling this many orders of magnitude from the last to the first
            time step is vanishing through time (Bengio et al. 1994); rising that much is exploding.
    """

    vanishing_decades: float = 3.0
    exploding_decades: float = 3.0
    update_ratio_vanishing: float = 1e-5
    update_ratio_learning: float = 1e-3
    update_ratio_exploding: float = 1.0
    growth_decades: float = 1.5
    trend_window: int = 6
    rising_fraction: float = 0.8
    grad_rms_exploding: float = 1e6
    window: int = 10
    on_fraction: float = 0.7
    off_fraction: float = 0.2
    skip_fraction: float = 0.8
    saturation_fraction: float = 0.5
    dead_fraction: float = 0.5
    time_decades: float = 2.0
    activation_window: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"Thresholds.window must be an int >= 2, received window={self.window!r}")
        if not 0 <= self.off_fraction < self.on_fraction <= 1:
            raise ValueError("Thresholds need 0 <= off_fraction < on_fraction <= 1, received "
                             f"off_fraction={self.off_fraction!r}, on_fraction={self.on_fraction!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationRows:
    """Sampled forward statistics per layer, shape ``(n_rows, n_layers)``; NaN where not applicable.

    ``saturation``: fraction of outputs of a sigmoid/tanh within 1% of its asymptotes. ``dead``: fraction of
    ReLU units that were zero for the whole batch. ``rms``: RMS of the layer's activation output.
    ``time_decades`` (``(n_rows, n_layers)``) is, for recurrent layers, log10 of the hidden-state gradient at
    the last time step over that at the first (positive: it vanishes toward the start of the sequence).
    """

    steps: np.ndarray
    saturation: np.ndarray
    dead: np.ndarray
    rms: np.ndarray
    nonfinite: np.ndarray
    time_decades: np.ndarray


@dataclass(slots=True)
class _Episode:
    kind: str
    first_step: int
    last_step: int
    layers: dict[int, int] = field(default_factory=dict)  # layer index -> first step
    evidence: dict = field(default_factory=dict)
    severity: str = "warning"
    message: str = ""
    active: bool = True
    announced: bool = False


class Detector:
    """Streams per-layer rows and keeps the findings.

    Args:
        layer_names: The user's layer names, input to output.
        profile: Per layer, whether it takes part in the depth profile.
        thresholds: Cut-offs. Defaults to :class:`Thresholds`'s defaults.
        plain_recurrent: Per layer, whether it is a plain (ungated) recurrent layer, for which vanishing through
            time is judged. Defaults to every layer.
    """

    HEALTH = ("vanishing", "exploding", "nonfinite")
    ACTIVATION = ("saturation", "dead_units")
    THROUGH_TIME = ("vanishing_time", "exploding_time")

    def __init__(self, layer_names: tuple[str, ...], profile: tuple[bool, ...],
                 thresholds: Thresholds | None = None, *, plain_recurrent: tuple[bool, ...] | None = None) -> None:
        self.names = tuple(layer_names)
        self.profile = np.asarray(profile, dtype=bool)
        # Vanishing through time is judged for plain RNN cells only: a gated cell's (LSTM/GRU) decay through
        # time is set by forget gates it learns, not fixed by its structure (Hochreiter & Schmidhuber 1997).
        self.plain_recurrent = np.asarray(plain_recurrent if plain_recurrent is not None
                                          else [True] * len(self.names), dtype=bool)
        self.t = thresholds or Thresholds()
        n = len(self.names)
        w = self.t.window
        # Activation statistics are sampled every few steps, so they are judged over fewer samples.
        self._votes: dict[str, deque[tuple[int, np.ndarray]]] = {
            kind: deque(maxlen=w if kind in self.HEALTH else self.t.activation_window)
            for kind in ("vanishing", "exploding", *self.ACTIVATION, *self.THROUGH_TIME)}
        self._skips: deque[bool] = deque(maxlen=w)
        self._finite_run = 0
        self._totals: deque[float] = deque(maxlen=self.t.trend_window)
        self._recent: deque[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = deque(maxlen=w)
        self._episodes: list[_Episode] = []
        self._open: dict[str, _Episode] = {}
        self.last_step = 0

    # -- public --------------------------------------------------------------------------------------------

    def update(self, rows: LayerRows) -> list[Finding]:
        """Judge new gradient rows; return the findings that appeared for the first time."""
        for i in range(len(rows)):
            self._judge_step(int(rows.steps[i]), rows, i)
        return self._announce()

    def update_activations(self, acts: ActivationRows) -> list[Finding]:
        """Judge sampled activation rows (and RNN gradients through time); return new findings."""
        for i in range(len(acts.steps)):
            self._judge_activations(int(acts.steps[i]), acts, i)
        return self._announce()

    def _announce(self) -> list[Finding]:
        new = [e for e in self._episodes if not e.announced]
        for e in new:
            e.announced = True
        return [self._finding(e) for e in new]

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(self._finding(e) for e in self._episodes)

    def layer_status(self) -> list[str]:
        """Per layer: the kind of an active health finding that names it, else ``"ok"``."""
        status = ["ok"] * len(self.names)
        for e in self._episodes:
            if e.active and e.kind.removesuffix("_time") in self.HEALTH:
                for li in e.layers:
                    if status[li] == "ok" or e.kind == "nonfinite":
                        status[li] = e.kind
        return status

    def recent_medians(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Median gradient RMS, update ratio and gradient norm per layer over the recent window."""
        n = len(self.names)
        if not self._recent:
            nan = np.full(n, np.nan)
            return nan, nan.copy(), nan.copy()
        stack = [np.stack([r[k] for r in self._recent]) for k in (1, 2, 3)]
        with _quiet():
            return tuple(np.nanmedian(s, axis=0) for s in stack)  # type: ignore[return-value]

    # -- gradients -----------------------------------------------------------------------------------------

    def _judge_step(self, step: int, rows: LayerRows, i: int) -> None:
        self.last_step = step
        skipped = bool(rows.skipped[i])
        self._skips.append(skipped)
        rms, ur, gn = rows.grad_rms[i], rows.update_ratio[i], rows.grad_norm[i]
        nonfinite = rows.nonfinite[i] > 0
        if skipped:
            self._judge_skips(step, rows, i)
            return
        if nonfinite.any() or not np.all(np.isfinite(rms[rows.present[i]])):
            self._finite_run = 0
            self._on_nonfinite(step, rows, i)
            return
        self._finite_run += 1
        if self._finite_run >= self.t.window:
            self._close("nonfinite", step)
        self._recent.append((step, rms, ur, gn))

        van, exp, ev = self._profile(rms, ur, rows.present[i])
        trend = self._trend(gn, rows.present[i])
        if trend is not None:
            exp |= trend
        with _quiet():
            exp |= self.profile & (rms > self.t.grad_rms_exploding)
            exp |= self.profile & (ur > self.t.update_ratio_exploding)
        self._vote("vanishing", step, van, ev)
        self._vote("exploding", step, exp, ev)

    def _profile(self, rms: np.ndarray, ur: np.ndarray, present: np.ndarray):
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
        with _quiet():
            decades = np.log10(ref / rms)  # +inf where the gradient is exactly zero
        body = np.zeros_like(van)
        body[idx] = True
        body[out] = False
        van = body & (decades >= self.t.vanishing_decades)
        exp = body & (decades <= -self.t.exploding_decades)
        # Updates far slower than the output side's, while the output side still learns.
        ur_ref = ur[ref_i]
        if np.isfinite(ur_ref) and ur_ref >= self.t.update_ratio_learning:
            with _quiet():
                van |= body & (ur < self.t.update_ratio_vanishing) & (decades >= 1.0)
        ev = {"reference_layer": self.names[ref_i], "reference_grad_rms": ref, "decades": decades,
              "reference_update_ratio": float(ur_ref)}
        return van, exp, ev

    def _trend(self, gn: np.ndarray, present: np.ndarray) -> np.ndarray | None:
        sel = self.profile & present & np.isfinite(gn)
        if not sel.any():
            return None
        total = float(np.sqrt(np.sum(gn[sel] ** 2)))
        self._totals.append(total)
        if len(self._totals) < self.t.trend_window or self._totals[0] <= 0:
            return None
        seq = np.asarray(self._totals)
        rising = np.mean(seq[1:] > seq[:-1])
        growth = math.log10(seq[-1] / seq[0]) if seq[-1] > 0 else -math.inf
        if rising >= self.t.rising_fraction and growth >= self.t.growth_decades:
            return sel.copy()
        return None

    def _vote(self, kind: str, step: int, flags: np.ndarray, ev: dict) -> None:
        votes = self._votes[kind]
        votes.append((step, flags))
        frac = np.sum([f for _, f in votes], axis=0) / votes.maxlen
        on = frac >= self.t.on_fraction
        ep = self._open.get(kind)
        if ep is None:
            if not on.any():
                return
            layers = np.flatnonzero(on)
            # The condition has held on most of the window: date the episode from where it started holding.
            first = next(s for s, f in votes if f[layers].any())
            ep = self._open_episode(kind, first, layers)
        else:
            for li in np.flatnonzero(on):
                ep.layers.setdefault(int(li), step)
            if not any(frac[li] > self.t.off_fraction for li in ep.layers):
                self._close(kind, step)
                return
        ep.last_step = step
        if kind in ("vanishing", "exploding"):
            self._describe_gradient(ep, ev)

    def _open_episode(self, kind: str, step: int, layers, severity: str = "warning") -> _Episode:
        ep = _Episode(kind=kind, first_step=step, last_step=step, severity=severity,
                      layers={int(li): step for li in layers})
        self._episodes.append(ep)
        self._open[kind] = ep
        return ep

    def _close(self, kind: str, step: int) -> None:
        ep = self._open.pop(kind, None)
        if ep is not None:
            ep.active = False
            ep.last_step = step

    def _describe_gradient(self, ep: _Episode, ev: dict) -> None:
        rms, ur, _ = self.recent_medians()
        layers = sorted(ep.layers)
        names = [self.names[li] for li in layers]
        ref_name = ev.get("reference_layer")
        ref_rms = ev.get("reference_grad_rms", float("nan"))
        with _quiet():
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
        span = _span(names)
        d = decades[wname]
        if ep.kind == "vanishing":
            ep.severity = "critical" if (not np.isfinite(d) or d >= 6 or rms[worst] == 0) else "warning"
            ep.message = (f"Gradients vanish in {len(names)} early layer{'s' if len(names) > 1 else ''} ({span}): "
                          f"gradient RMS {_fmt(rms[worst])} at {wname} vs {_fmt(ref_med)} at the output-side "
                          f"layer {ref_name} ({_dec(d)} lower)")
            if ur[worst] == 0:
                ep.message += "; its updates are below float32 resolution (update ratio 0)"
            elif np.isfinite(ur[worst]):
                ep.message += f"; update ratio {_fmt(ur[worst])}"
            ep.message += "."
        else:
            growth = self._growth_decades()
            ep.evidence["norm_growth_decades"] = growth
            ep.severity = "critical" if (rms[worst] > self.t.grad_rms_exploding or ur[worst] > 10) else "warning"
            parts = [f"gradient RMS {_fmt(rms[worst])} at {wname}"]
            if np.isfinite(d) and d < 0:
                parts.append(f"{_dec(-d)} above the output-side layer {ref_name}")
            if growth is not None and growth > 0.5:
                parts.append(f"total norm up {_dec(growth)} over the last {len(self._totals)} steps")
            if np.isfinite(ur[worst]) and ur[worst] > self.t.update_ratio_learning * 10:
                parts.append(f"update ratio {_fmt(ur[worst])}")
            ep.message = f"Gradients explode in {len(names)} layer{'s' if len(names) > 1 else ''} ({span}): " + \
                "; ".join(parts) + "."

    def _growth_decades(self) -> float | None:
        if len(self._totals) < 2 or self._totals[0] <= 0 or self._totals[-1] <= 0:
            return None
        return math.log10(self._totals[-1] / self._totals[0])

    # -- non-finite ----------------------------------------------------------------------------------------

    def _on_nonfinite(self, step: int, rows: LayerRows, i: int) -> None:
        counted = rows.nonfinite_measured[i]
        if counted and not (rows.nonfinite[i] > 0).any():
            self._on_overflow(step, rows, i)
            return
        bad = (rows.nonfinite[i] > 0) | (rows.present[i] & ~np.isfinite(rows.grad_rms[i]))
        bad_idx = np.flatnonzero(bad)
        origin = int(bad_idx[-1])  # backward runs output -> input: the last layer in forward order comes first
        ep = self._open.get("nonfinite")
        if ep is None:
            ep = self._open_episode("nonfinite", step, bad_idx, "critical")
            count = int(np.nansum(rows.nonfinite[i])) if counted else None
            overflow = [self.names[li] for li in bad_idx if counted and rows.nonfinite[i][li] == 0]
            all_layers = len(bad_idx) == int(rows.present[i].sum())
            ep.evidence = {
                "origin_layer": self.names[origin], "first_step": step, "nonfinite_values": count,
                "layers_affected": len(bad_idx), "overflowed_norm_layers": overflow,
                "nonfinite_per_layer": {self.names[li]: int(rows.nonfinite[i][li]) for li in bad_idx} if counted
                else "counted on detail steps (every update_every collected steps)",
            }
            where = (f"first appears in {self.names[origin]} (the layer nearest the output with non-finite "
                     f"gradients; backward carries it to the {len(bad_idx) - 1} layer(s) before it)")
            if all_layers:
                where += "; every layer is affected, so the loss or the output was likely already non-finite"
            what = f"{count} non-finite gradient values" if count is not None else "Non-finite gradients"
            ep.message = f"{what} at step {step}: it {where}."
        else:
            for li in bad_idx:
                ep.layers.setdefault(int(li), step)
        ep.last_step = step

    def _on_overflow(self, step: int, rows: LayerRows, i: int) -> None:
        """Every value is finite but the gradient norm overflows float32 (|g| beyond ~1e19): exploding, at once."""
        over = np.flatnonzero(rows.present[i] & ~np.isfinite(rows.grad_norm[i]))
        ep = self._open.get("exploding")
        if ep is None:
            ep = self._open_episode("exploding", step, over, "critical")
            gmax = {self.names[li]: float(rows.grad_max[i][li]) for li in over}
            worst = max(gmax, key=lambda k: gmax[k] if np.isfinite(gmax[k]) else math.inf)
            ep.evidence = {"overflow_step": step, "grad_max": gmax, "worst_layer": worst,
                           "layer_grad_rms": {self.names[li]: float(rows.grad_rms[i][li]) for li in over}}
            ep.message = (f"Gradients explode at step {step}: the gradient norm of {len(over)} layer(s) ({_span(list(gmax))}) "
                          f"overflows float32, with values up to {_fmt(gmax[worst])} in {worst}.")
        else:
            for li in over:
                ep.layers.setdefault(int(li), step)
        ep.last_step = step

    def _judge_skips(self, step: int, rows: LayerRows, i: int) -> None:
        w = self.t.window
        n_skip = sum(self._skips)
        if len(self._skips) < w or n_skip < self.t.skip_fraction * w:
            return
        ep = self._open.get("exploding")
        bad_idx = np.flatnonzero((rows.nonfinite[i] > 0) | (rows.present[i] & ~np.isfinite(rows.grad_rms[i])))
        if len(bad_idx) == 0:
            bad_idx = np.flatnonzero(self.profile)
        if ep is None:
            ep = self._open_episode("exploding", step, bad_idx, "critical")
        origin = self.names[int(bad_idx[-1])] if len(bad_idx) else None
        ep.last_step = step
        ep.evidence = {"amp_skipped_steps": n_skip, "window_steps": w, "origin_layer": origin}
        ep.message = (f"The loss scaler skipped {n_skip} of the last {w} steps for inf/NaN gradients: a persistent "
                      f"overflow, not the occasional scale calibration" +
                      (f"; non-finite values first appear in {origin}." if origin else "."))

    # -- activations ---------------------------------------------------------------------------------------

    def _judge_activations(self, step: int, acts: ActivationRows, i: int) -> None:
        if np.nansum(acts.nonfinite[i]) > 0:
            return  # inf/NaN activations say nothing about saturation or dead units; the non-finite finding does
        with _quiet():
            sat = acts.saturation[i] >= self.t.saturation_fraction
            dead = acts.dead[i] >= self.t.dead_fraction
        for kind, flags, values, what in (("saturation", sat, acts.saturation[i], "saturated"),
                                          ("dead_units", dead, acts.dead[i], "dead")):
            self._vote(kind, step, flags, {})
            ep = self._open.get(kind)
            if ep is None:
                continue
            layers = sorted(ep.layers)
            names = [self.names[li] for li in layers]
            frac = {self.names[li]: float(values[li]) for li in layers}
            ep.evidence = {"fraction": frac, "threshold": getattr(
                self.t, "saturation_fraction" if kind == "saturation" else "dead_fraction")}
            worst = max(frac, key=lambda k: frac[k] if np.isfinite(frac[k]) else -1)
            unit = "outputs within 1% of the activation's asymptotes" if kind == "saturation" else \
                "ReLU units zero for the whole batch"
            ep.message = (f"{len(names)} layer{'s' if len(names) > 1 else ''} ({_span(names)}) with {what} units: "
                          f"{frac[worst]:.0%} {unit} at {worst}.")
            ep.severity = "warning"
        self._judge_time(step, acts.time_decades[i])

    def _judge_time(self, step: int, dec: np.ndarray) -> None:
        with _quiet():
            flags = {"vanishing_time": self.plain_recurrent & (dec >= self.t.time_decades),
                     "exploding_time": dec <= -self.t.time_decades}
        for kind, f in flags.items():
            self._vote(kind, step, f, {})
            if kind == "exploding_time" and kind not in self._open:
                with _quiet():
                    extreme = dec <= -2 * self.t.time_decades
                if extreme.any():
                    # Four orders of magnitude through time is no noisy sample: one update of that size can
                    # wreck the recurrent weights before the next sample (Pascanu et al. 2013).
                    self._open_episode(kind, step, np.flatnonzero(extreme))
            ep = self._open.get(kind)
            if ep is None:
                continue
            # The evidence is the latest sample that shows it: a sample where the episode's condition no longer
            # holds (e.g. a saturated RNN whose explosion turned into decay) leaves the message as it was.
            layers = [li for li in sorted(ep.layers) if f[li]]
            if not layers:
                continue
            d = {self.names[li]: float(dec[li]) for li in layers if np.isfinite(dec[li]) or dec[li] == math.inf}
            ep.evidence = {"through_time": True, "time_decades": d, "threshold_decades": self.t.time_decades}
            names = ", ".join(self.names[li] for li in layers)
            worst = max(d.values(), key=abs) if d else float("nan")
            if kind == "vanishing_time":
                ep.severity = "critical" if worst >= 2 * self.t.time_decades else "warning"
                ep.message = (f"Gradients vanish through time in {names}: the gradient reaching the first time "
                              f"steps is {_dec(worst)} below the last step's, so early inputs barely train.")
            else:
                ep.severity = "critical"
                ep.message = (f"Gradients explode through time in {names}: the gradient reaching the first time "
                              f"steps is {_dec(-worst)} above the last step's.")

    def note_activation_nonfinite(self, step: int, layer: int) -> None:
        """Record the layer whose forward output first turned non-finite (refines the non-finite origin)."""
        ep = self._open.get("nonfinite")
        if ep is not None and "forward_origin_layer" not in ep.evidence:
            ep.evidence["forward_origin_layer"] = self.names[layer]
            ep.message += f" The forward pass first produced inf/NaN in {self.names[layer]} at step {step}."

    # -- out -----------------------------------------------------------------------------------------------

    def _finding(self, e: _Episode) -> Finding:
        layers = tuple(self.names[li] for li in sorted(e.layers))
        return Finding(kind=e.kind.removesuffix("_time"), layers=layers, step=int(e.first_step), last_step=int(e.last_step),
                       active=e.active, severity=e.severity, evidence=dict(e.evidence), message=e.message)


class _quiet(np.errstate):
    def __init__(self) -> None:
        super().__init__(all="ignore")

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._w.__exit__(*exc)


def _fmt(x: float) -> str:
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2g}" if x != 0 else "0"


def _dec(d: float) -> str:
    return "all the way to zero" if not math.isfinite(d) else f"{d:.1f} orders of magnitude"


def _span(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} … {names[-1]}"
