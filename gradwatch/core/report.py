"""The results gradwatch hands to users: immutable, framework-neutral, JSON-serialisable via ``to_dict()``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from gradwatch.core.kinds import HEALTH_KINDS, FindingKind, Fix, LayerStatus, Severity
from gradwatch.core.structure import Structure

__all__ = [
    "HEALTH_KINDS",
    "Finding",
    "FindingKind",
    "Fix",
    "LayerSummary",
    "ParamSummary",
    "Recommendation",
    "Report",
    "Severity",
]

def _jsonable(value: Any) -> Any:
    """Plain JSON types only: tuples become lists, non-finite floats become strings ("nan", "inf")."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _jsonable(value.item())
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_jsonable(v) for k, v in value.items()}
    return value


class _Serialisable:
    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding(_Serialisable):
    """Something wrong with the gradients, with the numbers that show it.

    Args:
        kind: ``"vanishing"``, ``"exploding"``, ``"nonfinite"``, ``"saturation"`` or ``"dead_units"``.
        layers: The user's layer names concerned, input to output.
        step: The first training step (1-based) at which it was seen.
        last_step: The last step at which it still held.
        active: Whether it still held at the last judged step.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        evidence: The numbers that show it (plain floats, ints and strings).
        message: One human sentence.
        check: The name of the detector check that raised it (``"gradient_scale"``, ``"through_time"``, ...).
    """

    kind: FindingKind
    layers: tuple[str, ...]
    step: int
    last_step: int
    active: bool = True
    severity: Severity = "warning"
    evidence: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    check: str = ""

    @property
    def through_time(self) -> bool:
        """Whether it concerns the gradient through time of a recurrent layer (not across layers)."""
        return self.check == "through_time" or bool(self.evidence.get("through_time"))

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind} since step {self.step}: {self.message}"

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        d = _from_jsonable(dict(d))
        d["evidence"] = dict(d.get("evidence") or {})
        return cls(**d)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recommendation(_Serialisable):
    """A concrete change to the model or training setup, ranked, naming the user's layers.

    Args:
        fix: What to change, e.g. ``"relu"``, ``"he_init"``, ``"gradient_clipping"``.
        layers: The user's layers it concerns, input to output.
        reason: Which evidence and which structural fact led to it.
        snippet: Code for the user's framework.
        references: Papers behind the advice.
        rank: 1 for the first thing to try.
        addresses: The finding kinds it answers.
        settings: The fix's numbers, for code that applies it (``gradwatch.trial``): ``{"max_norm": 1.0}`` for
            ``gradient_clipping`` (and ``"orthogonal_recurrent"``: the recurrent layers to start at spectral
            radius 1), ``{"factor": 100.0}`` for ``lower_learning_rate`` (divide the learning rate by it).
    """

    fix: Fix
    layers: tuple[str, ...]
    reason: str
    snippet: str = ""
    references: tuple[str, ...] = ()
    rank: int = 0
    addresses: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.rank}. {self.fix}: {self.reason}"

    @classmethod
    def from_dict(cls, d: dict) -> Recommendation:
        return cls(**_from_jsonable(dict(d)))


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamSummary(_Serialisable):
    """One parameter tensor of a layer (weight, bias, ...)."""

    name: str
    role: str
    shape: tuple[int, ...]
    trainable: bool
    grad_rms: float
    grad_max: float
    nonfinite: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerSummary(_Serialisable):
    """One layer's figures over the run.

    Args:
        name: The user's layer name.
        type: Class name.
        index: Position from the input (0) to the output.
        status: ``"ok"``, ``"vanishing"``, ``"exploding"``, ``"nonfinite"``, ``"frozen"`` or ``"no_grad"``.
        grad_rms: Median gradient RMS over the most recent judged window.
        grad_rms_trend: Gradient RMS over the whole run, at most 64 points, oldest first (at ``trend_steps``).
        update_ratio_trend: The latest update ratio measured at each of those points.
        update_ratio: Median ``||delta w|| / ||w||`` over the recent window; ``nan`` when not measured.
        weight_norm: The latest weight norm measured.
        nonfinite: Non-finite gradient values seen on applied steps.
        saturation: Fraction of saturated activation units (sigmoid/tanh), where sampled.
        dead_fraction: Fraction of ReLU units at zero on every input of the last sampled batches, where sampled.
        activation_rms: RMS of the layer's output, where sampled.
        params: Per-parameter detail.
    """

    name: str
    type: str
    index: int
    status: LayerStatus
    grad_rms: float
    grad_rms_trend: tuple[float, ...]
    update_ratio: float
    weight_norm: float
    nonfinite: int
    saturation: float = float("nan")
    dead_fraction: float = float("nan")
    activation_rms: float = float("nan")
    update_ratio_trend: tuple[float, ...] = ()
    params: tuple[ParamSummary, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> LayerSummary:
        d = _from_jsonable(dict(d))
        d["params"] = tuple(ParamSummary(**p) for p in d.get("params", ()))
        return cls(**d)


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Everything gradwatch concluded about a run so far.

    Args:
        framework: ``"torch"`` or ``"keras"``.
        model_type: The model's class name.
        step: The last training step seen (1-based); ``0`` before the first.
        collected_steps: Steps whose gradients were measured (every ``every``-th step).
        skipped_steps: Steps a loss scaler skipped for overflow (AMP); not judged as exploding unless persistent.
        layers: Per-layer summaries, input to output.
        findings: What is wrong, in order of first appearance.
        recommendations: Ranked fixes; empty for a healthy model.
        structure: The model structure the adapter read.
        notes: Caveats about this report (what could not be measured, and why).
        monitoring: ``"on"``, ``"detached"`` or ``"off: <reason>"`` after an internal error.
        trend_steps: The steps of the points in each layer's ``grad_rms_trend``.
    """

    framework: str
    model_type: str
    step: int
    collected_steps: int
    skipped_steps: int = 0
    layers: tuple[LayerSummary, ...] = ()
    findings: tuple[Finding, ...] = ()
    recommendations: tuple[Recommendation, ...] = ()
    structure: Structure | None = None
    notes: tuple[str, ...] = ()
    monitoring: str = "on"
    trend_steps: tuple[int, ...] = ()

    @property
    def healthy(self) -> bool:
        """``True`` when there is no vanishing, exploding, non-finite or no-gradient finding."""
        return not any(f.kind in HEALTH_KINDS for f in self.findings)

    def findings_of(self, kind: str) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind == kind)

    def layer(self, name: str) -> LayerSummary:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in this report; layers are {[la.name for la in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        d["healthy"] = self.healthy
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        d = dict(d)
        d.pop("healthy", None)
        return cls(
            framework=d["framework"], model_type=d["model_type"], step=int(d["step"]),
            collected_steps=int(d["collected_steps"]), skipped_steps=int(d.get("skipped_steps", 0)),
            layers=tuple(LayerSummary.from_dict(x) for x in d.get("layers", ())),
            findings=tuple(Finding.from_dict(x) for x in d.get("findings", ())),
            recommendations=tuple(Recommendation.from_dict(x) for x in d.get("recommendations", ())),
            structure=Structure.from_dict(d["structure"]) if d.get("structure") else None,
            notes=tuple(d.get("notes", ())), monitoring=d.get("monitoring", "on"),
            trend_steps=tuple(int(s) for s in d.get("trend_steps", ())),
        )

    def __str__(self) -> str:
        from gradwatch.core.text import render_text

        return render_text(self)

    def plot(self, path: str, *, kind: str = "all") -> str:
        """Save a picture of this report to ``path`` (``kind``: ``"all"``, ``"flow"``, ``"depth"``, ``"updates"``;
        see :mod:`gradwatch.core.plots`). Needs the ``plot`` extra. Returns the path."""
        from gradwatch.core.plots import plot_report

        return plot_report(self, path, kind=kind)
