"""What every recommendation rule shares: the named priorities, the context it reads, the base class."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

from gradwatch.core.advice.keras_snippets import KerasSnippets
from gradwatch.core.advice.snippets import Snippets
from gradwatch.core.advice.torch_snippets import TorchSnippets
from gradwatch.core.report import Finding, LayerSummary, Recommendation
from gradwatch.core.structure import LayerInfo, Structure

__all__ = ["INIT_TOLERANCE", "Candidate", "Context", "Priority", "Rule", "finding_evidence"]

#: An initial weight spread off by this factor from its activation's scale, compounded over the stack's depth
#: by more than one order of magnitude, is called a mismatched init.
INIT_TOLERANCE = 0.8


class Priority:
    """How early a fix is proposed: the higher, the more directly it removes the measured cause.

    Plain ints (two fixes may share a rank), read by name. The order encodes root cause before symptom: an
    explosion that came first outranks what it caused; a structural cause (plain RNN cell, saturating
    activation, init scale) outranks a training-setup change; a bound on the step (clipping) comes last, as it
    treats the symptom.
    """

    EXPLOSION_THROUGH_TIME_FIRST = 101  # exploding through time before (or without) any vanishing
    FORWARD_OVERFLOW = 99  # an unbounded activation produced the first inf in the forward pass
    GATED_RNN = 100  # a plain RNN cell that cannot carry the gradient through time
    CLIP_RECURRENT = 97  # clipping for a recurrent model whose gradients blow up
    LOWER_LEARNING_RATE = 96  # a sane init that still explodes: the step size
    RELU_SATURATED = 95  # saturating activations, measured saturated
    XAVIER_INIT_TANH = 94  # a tanh stack started too small: the init is the cause, and the smaller change
    HE_INIT = 93  # a ReLU-family stack at the wrong init scale
    RELU = 90  # saturating activations, not (yet) saturated
    LOWER_LEARNING_RATE_RECURRENT = 90  # a recurrent model that explodes: clipping first
    LEAKY_RELU = 88  # dead ReLU units
    INIT = 85  # a saturating stack at the wrong init scale
    LOWER_LEARNING_RATE_DEAD = 84  # updates large enough to push units permanently negative
    NORMALIZATION = 80  # depth without normalization
    SKIP_CONNECTIONS = 75  # depth without skips
    CLIP_BOUND = 70  # clipping as a bound while the cause is fixed


@dataclass(frozen=True, slots=True)
class Candidate:
    priority: int
    rec: Recommendation


@dataclass
class Context:
    """Everything a rule reads: this run's findings split by family, the model's structure, the layer summaries,
    the snippet writer for the framework, and the candidates earlier rules proposed."""

    findings: tuple[Finding, ...]
    structure: Structure
    layers: tuple[LayerSummary, ...]
    snippets: Snippets
    proposed: list[Candidate] = field(default_factory=list)

    @classmethod
    def build(cls, findings: tuple[Finding, ...], structure: Structure, layers: tuple[LayerSummary, ...],
              framework: str) -> Context:
        snippets = KerasSnippets() if framework == "keras" else TorchSnippets()
        return cls(findings=findings, structure=structure, layers=layers, snippets=snippets)

    def _of(self, kind: str, through_time: bool | None = None) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind and (through_time is None or f.through_time == through_time)]

    @cached_property
    def vanishing(self) -> list[Finding]:
        """Vanishing across layers (not through time)."""
        return self._of("vanishing", False)

    @cached_property
    def vanishing_time(self) -> list[Finding]:
        return self._of("vanishing", True)

    @cached_property
    def exploding(self) -> list[Finding]:
        """Exploding across layers or steps (not through time)."""
        return self._of("exploding", False)

    @cached_property
    def exploding_time(self) -> list[Finding]:
        return self._of("exploding", True)

    @cached_property
    def nonfinite(self) -> list[Finding]:
        return self._of("nonfinite")

    @cached_property
    def saturation(self) -> list[Finding]:
        return self._of("saturation")

    @cached_property
    def dead(self) -> list[Finding]:
        return self._of("dead_units")

    @cached_property
    def weight_layers(self) -> list[LayerInfo]:
        return [la for la in self.structure.layers if la.profile]

    @cached_property
    def hidden(self) -> list[LayerInfo]:
        """Weight layers but the output one: its activation is the task's (softmax, sigmoid), not ours to change."""
        return self.weight_layers[:-1]

    @cached_property
    def by_name(self) -> dict[str, LayerSummary]:
        return {la.name: la for la in self.layers}

    @cached_property
    def init_mismatch(self) -> tuple[float, list[LayerInfo]] | None:
        """Geometric-mean ratio of weight std to the scale each layer's activation calls for, and the layers off
        by more than :data:`INIT_TOLERANCE`, when the mismatch compounds to over an order of magnitude over the
        depth; ``None`` otherwise."""
        ratios = []
        off = []
        for la in self.weight_layers:
            if la.kind not in ("dense", "conv") or la.weight_std is None or not la.fan_in:
                continue
            target = la.target_std
            if not math.isfinite(target) or target <= 0:
                continue
            r = la.weight_std / target
            ratios.append(r)
            if r < INIT_TOLERANCE or r > 1 / INIT_TOLERANCE:
                off.append(la)
        if len(ratios) < 2 or not off:
            return None
        gmean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        if abs(len(ratios) * math.log10(gmean)) < 1.0:
            return None
        return gmean, off

    def has(self, fix: str) -> bool:
        """Whether an earlier rule proposed ``fix``."""
        return any(c.rec.fix == fix for c in self.proposed)


class Rule:
    """One fix: when the run's evidence and the model's structure call for it, a ranked recommendation.

    A rule needs both evidence from this run (a finding and its numbers) and a structural fact, and never
    proposes what the model already does.
    """

    #: The fix it proposes.
    fix: ClassVar[str] = ""

    def propose(self, ctx: Context) -> Candidate | None:
        raise NotImplementedError


def finding_evidence(f: Finding) -> str:
    """The one clause of a finding's numbers a recommendation's reason starts from."""
    ev = f.evidence
    if f.kind == "vanishing" and "worst_layer" in ev:
        worst = ev["worst_layer"]
        d = ev.get("decades_from_reference", {}).get(worst, float("nan"))
        gap = "all the way to zero" if not math.isfinite(d) else f"{d:.1f} orders of magnitude"
        return (f"Gradient RMS at {worst} is {gap} below the output side ({ev.get('reference_layer')}), "
                f"vanishing in {len(f.layers)} layer(s) since step {f.step}.")
    if f.kind == "exploding" and "worst_layer" in ev:
        worst = ev["worst_layer"]
        return (f"Gradients explode in {len(f.layers)} layer(s) since step {f.step} "
                f"(gradient RMS {ev.get('layer_grad_rms', {}).get(worst, float('nan')):.2g} at {worst}).")
    if f.kind == "nonfinite":
        return (f"Non-finite gradients since step {f.step}, first in {ev.get('origin_layer')} "
                "(in backward order).")
    return f.message
