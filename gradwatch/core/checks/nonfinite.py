"""Non-finite gradients, gradient norms that overflow float32, loss-scaler skips that persist, and gradients that
are exactly zero."""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from gradwatch.core.checks.base import Check, CheckContext, GradStep, fmt, span
from gradwatch.core.stats import LayerRows

__all__ = ["LossScaleCheck", "NoGradientCheck", "NonfiniteCheck"]


class NonfiniteCheck(Check):
    """``nonfinite`` at once, on any applied step with an inf/NaN gradient, naming the layer where it first
    appears in backward order (and, once activations were sampled, where the forward pass first produced it);
    ``exploding`` at once when every value is finite but a layer's gradient norm overflows float32.

    The finding closes after ``Thresholds.window`` finite steps in a row.
    """

    name = "nonfinite"
    kinds = ("nonfinite", "exploding")

    def __init__(self, ctx: CheckContext) -> None:
        super().__init__(ctx)
        self._finite_run = 0

    def on_grad(self, row: GradStep) -> None:
        if row.skipped:
            return
        if not row.finite:
            self._finite_run = 0
            if row.nonfinite_measured and not (row.nonfinite > 0).any():
                self._on_overflow(row)
            else:
                self._on_nonfinite(row)
            return
        self._finite_run += 1
        if self._finite_run >= self.t.window:
            self.ctx.ledger.close("nonfinite", row.step)

    def _on_nonfinite(self, row: GradStep) -> None:
        ledger, names = self.ctx.ledger, self.names
        counted = row.nonfinite_measured
        bad = (row.nonfinite > 0) | (row.present & ~np.isfinite(row.rms))
        bad_idx = np.flatnonzero(bad)
        origin = int(bad_idx[-1])  # backward runs output -> input: the last layer in forward order comes first
        ep = ledger.get("nonfinite")
        if ep is None:
            ep = ledger.open("nonfinite", "nonfinite", self.name, row.step, bad_idx, "critical")
            count = int(np.nansum(row.nonfinite)) if counted else None
            overflow = [names[li] for li in bad_idx if counted and row.nonfinite[li] == 0]
            all_layers = len(bad_idx) == int(row.present.sum())
            ep.evidence = {
                "origin_layer": names[origin], "first_step": row.step, "nonfinite_values": count,
                "layers_affected": len(bad_idx), "overflowed_norm_layers": overflow,
                "nonfinite_per_layer": {names[li]: int(row.nonfinite[li]) for li in bad_idx} if counted
                else "counted on detail steps (every update_every collected steps)",
            }
            where = (f"first appears in {names[origin]} (the layer nearest the output with non-finite "
                     f"gradients; backward carries it to the {len(bad_idx) - 1} layer(s) before it)")
            if all_layers:
                where += "; every layer is affected, so the loss or the output was likely already non-finite"
            what = f"{count} non-finite gradient values" if count is not None else "Non-finite gradients"
            ep.message = f"{what} at step {row.step}: it {where}."
        else:
            for li in bad_idx:
                ep.layers.setdefault(int(li), row.step)
        ep.last_step = row.step

    def _on_overflow(self, row: GradStep) -> None:
        """Every value is finite but the gradient norm overflows float32 (|g| beyond ~1e19): exploding, at once."""
        ledger, names = self.ctx.ledger, self.names
        over = np.flatnonzero(row.present & ~np.isfinite(row.grad_norm))
        ep = ledger.get("exploding")
        if ep is None:
            ep = ledger.open("exploding", "exploding", self.name, row.step, over, "critical")
            gmax = {names[li]: float(row.grad_max[li]) for li in over}
            worst = max(gmax, key=lambda k: gmax[k] if np.isfinite(gmax[k]) else math.inf)
            ep.evidence = {"overflow_step": row.step, "grad_max": gmax, "worst_layer": worst,
                           "layer_grad_rms": {names[li]: float(row.rms[li]) for li in over}}
            ep.message = (f"Gradients explode at step {row.step}: the gradient norm of {len(over)} layer(s) "
                          f"({span(list(gmax))}) overflows float32, with values up to {fmt(gmax[worst])} in "
                          f"{worst}.")
        else:
            for li in over:
                ep.layers.setdefault(int(li), row.step)
        ep.last_step = row.step

    def note_forward_origin(self, step: int, layer: int, activation: str | None = None) -> None:
        """Record the layer whose forward output first turned non-finite, and the activation it feeds (refines
        the origin: backward order names where the gradient first broke, this where the values were born)."""
        ep = self.ctx.ledger.get("nonfinite")
        if ep is not None and "forward_origin_layer" not in ep.evidence:
            ep.evidence["forward_origin_layer"] = self.names[layer]
            ep.evidence["forward_origin_step"] = step
            ep.evidence["forward_origin_activation"] = activation
            where = f"the {activation} after {self.names[layer]}" if activation else self.names[layer]
            ep.message += f" The forward pass first produced inf/NaN in {where} at step {step}."


class LossScaleCheck(Check):
    """``exploding`` when a loss scaler (AMP) skipped at least ``Thresholds.skip_fraction`` of the last
    ``Thresholds.window`` steps for overflow: a persistent overflow, not the occasional scale calibration."""

    name = "loss_scale"
    kinds = ("exploding",)

    def __init__(self, ctx: CheckContext) -> None:
        super().__init__(ctx)
        self._skips: deque[bool] = deque(maxlen=self.t.window)

    def on_grad(self, row: GradStep) -> None:
        self._skips.append(row.skipped)
        if not row.skipped:
            return
        w = self.t.window
        n_skip = sum(self._skips)
        if len(self._skips) < w or n_skip < self.t.skip_fraction * w:
            return
        ledger = self.ctx.ledger
        ep = ledger.get("exploding")
        bad_idx = np.flatnonzero((row.nonfinite > 0) | (row.present & ~np.isfinite(row.rms)))
        if len(bad_idx) == 0:
            bad_idx = np.flatnonzero(self.ctx.profile)
        if ep is None:
            ep = ledger.open("exploding", "exploding", self.name, row.step, bad_idx, "critical")
        origin = self.names[int(bad_idx[-1])] if len(bad_idx) else None
        ep.last_step = row.step
        ep.evidence = {"amp_skipped_steps": n_skip, "window_steps": w, "origin_layer": origin}
        ep.message = (f"The loss scaler skipped {n_skip} of the last {w} steps for inf/NaN gradients: a persistent "
                      "overflow, not the occasional scale calibration" +
                      (f"; non-finite values first appear in {origin}." if origin else "."))


class NoGradientCheck(Check):
    """``no_gradient``: trainable weight layers whose gradient is exactly zero on ``Thresholds.no_gradient_steps``
    applied steps in a row. Nothing reaches them, so they cannot learn at any learning rate: the loss does not
    depend on them (a softmax over a single output unit is constant, an output detached from the graph, a
    multiplication by a zero gate). Not a small gradient (that is ``vanishing``): none at all. Layers that get no
    gradient tensor at all (unused, frozen) are not judged."""

    name = "no_gradient"
    kinds = ("no_gradient",)

    def __init__(self, ctx: CheckContext) -> None:
        super().__init__(ctx)
        self._zero_run = np.zeros(len(self.names), dtype=np.int64)
        self._running = False  # whether any layer's run of zero gradients is under way

    def prepare(self, rows: LayerRows, finite: np.ndarray) -> None:
        zero = rows.present & (rows.grad_norm == 0) & self.ctx.trainable & self.ctx.profile
        self._zero, self._zero_any = zero, zero.any(axis=1).tolist()

    def on_grad(self, row: GradStep) -> None:
        if row.skipped or not row.finite:
            return
        ledger = self.ctx.ledger
        ep = ledger.get("no_gradient")
        if ep is None and not self._running and not self._zero_any[row.index]:
            return  # no run under way and none starts: every run stays 0
        zero = self._zero[row.index]
        self._zero_run = np.where(zero, self._zero_run + 1, 0)
        self._running = bool(self._zero_run.any())
        stuck = self._zero_run >= self.t.no_gradient_steps
        if ep is None:
            if not stuck.any():
                return
            first = row.step - self.t.no_gradient_steps + 1
            ep = ledger.open("no_gradient", "no_gradient", self.name, first, np.flatnonzero(stuck), "critical")
        elif not (self._zero_run[np.fromiter(ep.layers, dtype=np.int64, count=len(ep.layers))] > 0).any():
            ledger.close("no_gradient", row.step)
            return
        else:
            for li in np.flatnonzero(stuck).tolist():
                ep.layers.setdefault(li, row.step)
        ep.last_step = row.step
        layers = sorted(ep.layers)
        names = [self.names[li] for li in layers]
        every = int(np.sum(self.ctx.profile & self.ctx.trainable))
        everything = len(layers) >= every
        steps = int(self._zero_run[layers].min())
        ep.evidence = {"zero_gradient_steps": steps, "layers_without_gradient": len(names),
                       "all_weight_layers": everything}
        plural = "s" if len(names) > 1 else ""
        what = "any weight layer" if everything else f"{len(names)} layer{plural} ({span(names)})"
        ep.message = (f"No gradient reaches {what}: every gradient value was exactly 0 on the last "
                      f"{steps} steps, so {'the model' if everything else 'they'} cannot "
                      "learn at any learning rate. The loss does not depend on these weights: check the output and "
                      "loss (a softmax over a single unit is constant; a detached output or a zero gate blocks it).")
