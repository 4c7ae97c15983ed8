"""Turn a bounded :class:`~gradwatch.core.stats.History` and the detector's verdicts into a :class:`Report`.

Shared by the live watcher and by :func:`gradwatch.load`, which rebuilds the same report from a run log: the
detector's verdicts travel as a :class:`Verdicts` record, so a log needs no detector to be read back.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from gradwatch.core.recommender import recommend
from gradwatch.core.report import Finding, LayerSummary, ParamSummary, Report
from gradwatch.core.stats import GRAD_MAX, GRAD_NORM, NONFINITE, History
from gradwatch.core.structure import Structure

__all__ = ["Verdicts", "build_report", "forward_fill"]

#: Points kept per layer in ``LayerSummary.grad_rms_trend`` (and in the plots drawn from a report).
TREND_POINTS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdicts:
    """What the detector concluded so far, in plain arrays: enough to summarise without the detector.

    Args:
        findings: Every finding so far, in order of first appearance.
        status: Per layer, the kind of an active health finding naming it, else ``"ok"``.
        grad_rms: Per layer, median gradient RMS over the recent window.
        update_ratio: Per layer, median update ratio over the recent window.
        window: The collected steps the detector's recent window spans.
        activations: Latest sampled activation figures per layer: ``"saturation"``, ``"dead"``, ``"rms"``.
    """

    findings: tuple[Finding, ...]
    status: tuple[str, ...]
    grad_rms: np.ndarray
    update_ratio: np.ndarray
    window: int
    activations: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"findings": [f.to_dict() for f in self.findings], "status": list(self.status),
                "grad_rms": _floats(self.grad_rms), "update_ratio": _floats(self.update_ratio),
                "window": self.window, "activations": {k: _floats(v) for k, v in self.activations.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Verdicts:
        return cls(findings=tuple(Finding.from_dict(f) for f in d["findings"]), status=tuple(d["status"]),
                   grad_rms=_array(d["grad_rms"]), update_ratio=_array(d["update_ratio"]), window=int(d["window"]),
                   activations={k: _array(v) for k, v in d.get("activations", {}).items()})


def _floats(a: np.ndarray) -> list:
    return [None if math.isnan(x) else (str(x) if math.isinf(x) else float(x)) for x in np.asarray(a, float)]


def _array(values: list) -> np.ndarray:
    return np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def build_report(*, framework: str, model_type: str, step: int, history: History | None,
                 verdicts: Verdicts | None, structure: Structure | None, notes: tuple[str, ...] = (),
                 monitoring: str = "on") -> Report:
    """The :class:`Report` for everything the history and the verdicts hold."""
    notes_l = list(notes)
    if history is None or verdicts is None or len(history) == 0:
        notes_l.append("No training step has been seen yet.")
        return Report(framework=framework, model_type=model_type, step=step, collected_steps=0,
                      structure=structure, notes=tuple(notes_l), monitoring=monitoring)
    table = history.table
    rows = history.layers()
    n = len(rows)
    pick = np.unique(np.linspace(0, n - 1, min(n, TREND_POINTS)).round().astype(int))
    trend_steps = tuple(int(s) for s in rows.steps[pick])
    values = history.values
    recent = values[-min(len(values), max(1, verdicts.window)):]
    numel = np.asarray(table.param_numel, dtype=np.float64)
    skipped = history.skipped_rows
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p_rms = np.nanmedian(recent[..., GRAD_NORM], axis=0) / np.sqrt(np.maximum(numel, 1))
        p_max = np.nanmax(recent[..., GRAD_MAX], axis=0)
        p_nf = np.nansum(values[..., NONFINITE] * (~skipped)[:, None], axis=0)
        weight_norm = _last_finite(rows.weight_norm)
        nonfinite_layer = np.nansum(np.where(rows.skipped[:, None], 0, rows.nonfinite), axis=0)
    ever = rows.present.any(axis=0)
    ur_filled = forward_fill(rows.update_ratio)
    acts = verdicts.activations
    layers = []
    for li, name in enumerate(table.layer_names):
        pidx = [i for i, lay in enumerate(table.param_layer) if lay == li]
        st = verdicts.status[li]
        if st == "ok" and not any(table.param_trainable[i] for i in pidx):
            st = "frozen"
        elif st == "ok" and not ever[li]:
            st = "no_grad"
        params = tuple(ParamSummary(name=table.param_names[i], role=table.param_roles[i],
                                    shape=table.param_shapes[i], trainable=table.param_trainable[i],
                                    grad_rms=float(p_rms[i]), grad_max=float(p_max[i]),
                                    nonfinite=int(p_nf[i])) for i in pidx)
        layers.append(LayerSummary(
            name=name, type=table.layer_types[li], index=li, status=st, grad_rms=float(verdicts.grad_rms[li]),
            grad_rms_trend=tuple(float(x) for x in rows.grad_rms[pick, li]),
            update_ratio_trend=tuple(float(x) for x in ur_filled[pick, li]),
            update_ratio=float(verdicts.update_ratio[li]), weight_norm=float(weight_norm[li]),
            nonfinite=int(nonfinite_layer[li]), saturation=_act(acts, "saturation", li),
            dead_fraction=_act(acts, "dead", li), activation_rms=_act(acts, "rms", li), params=params))
    findings = verdicts.findings
    if history.total_skipped:
        notes_l.append(f"{history.total_skipped} step(s) skipped by the loss scaler for overflow were not judged as "
                       "exploding (only a persistent run of skips is).")
    recs = recommend(findings, structure, tuple(layers), framework=framework) if findings else ()
    return Report(framework=framework, model_type=model_type, step=step, collected_steps=history.total_steps,
                  skipped_steps=history.total_skipped, layers=tuple(layers), findings=findings,
                  recommendations=recs, structure=structure, notes=tuple(notes_l), monitoring=monitoring,
                  trend_steps=trend_steps)


def forward_fill(a: np.ndarray) -> np.ndarray:
    """Each row takes the latest non-NaN value at or before it, per column (update ratios are measured on some
    steps only)."""
    idx = np.where(np.isnan(a), 0, np.arange(len(a))[:, None])
    np.maximum.accumulate(idx, axis=0, out=idx)
    return a[idx, np.arange(a.shape[1])[None, :]]


def _last_finite(a: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[1], np.nan)
    for i in range(a.shape[0] - 1, -1, -1):
        fill = np.isnan(out) & np.isfinite(a[i])
        out[fill] = a[i][fill]
        if not np.isnan(out).any():
            break
    return out


def _act(acts: dict[str, np.ndarray], key: str, li: int) -> float:
    arr = acts.get(key)
    return float(arr[li]) if arr is not None and li < len(arr) else math.nan
