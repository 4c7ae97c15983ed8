"""From findings and the model's structure to ranked, concrete fixes that name the user's own layers.

Each rule (:mod:`gradwatch.core.advice.rules`, one class per fix) needs both evidence from this run (a finding and
its numbers) and a structural fact (what the model is made of), and never proposes what the model already does.
A healthy model gets no recommendation. A new fix is a new rule class in ``DEFAULT_RULES``, a priority in
:class:`~gradwatch.core.advice.base.Priority` and a snippet method per framework.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch.core.advice.base import Candidate, Context, Rule
from gradwatch.core.advice.rules import DEFAULT_RULES, REFERENCES
from gradwatch.core.report import Finding, LayerSummary, Recommendation
from gradwatch.core.structure import Structure

__all__ = ["REFERENCES", "recommend"]

_ADVISED = ("vanishing", "exploding", "nonfinite", "dead_units", "saturation")


def recommend(findings: tuple[Finding, ...], structure: Structure | None, layers: tuple[LayerSummary, ...],
              *, framework: str, rules: Sequence[Rule] = DEFAULT_RULES) -> tuple[Recommendation, ...]:
    """Ranked recommendations for these findings on this model; empty when nothing is wrong.

    One recommendation per fix (the higher-priority candidate wins; on a tie, the earlier rule), highest first.
    """
    if not any(f.kind in _ADVISED for f in findings) or structure is None:
        return ()
    ctx = Context.build(findings, structure, layers, framework)
    for rule in rules:
        cand = rule.propose(ctx)
        if cand is not None:
            ctx.proposed.append(cand)
    best: dict[str, Candidate] = {}
    for c in ctx.proposed:
        if c.rec.fix not in best or c.priority > best[c.rec.fix].priority:
            best[c.rec.fix] = c
    ranked = sorted(best.values(), key=lambda c: -c.priority)
    return tuple(_with_rank(c.rec, i + 1) for i, c in enumerate(ranked))


def _with_rank(rec: Recommendation, rank: int) -> Recommendation:
    return Recommendation(fix=rec.fix, layers=rec.layers, reason=rec.reason, snippet=rec.snippet,
                          references=rec.references, rank=rank, addresses=rec.addresses, settings=rec.settings)
