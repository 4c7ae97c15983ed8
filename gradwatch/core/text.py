"""The human summary of a report, with rich: verdict, findings, ranked recommendations, per-layer table.

What ``str(report)`` returns and what the console reporter prints; it sits beside the results (as torchinfo's
formatting beside its statistics), which know nothing of it. Plain text (no colour codes) off a terminal.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from rich import box
from rich.console import Console, Group, RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from gradwatch.core.kinds import HEALTH_KINDS

if TYPE_CHECKING:
    from gradwatch.core.report import Finding, Report

__all__ = ["KIND_TITLE", "finding_block", "make_console", "render", "render_text", "sparkline"]

_BARS = "▁▂▃▄▅▆▇█"
_STATUS_STYLE = {"ok": "green", "vanishing": "bold yellow", "exploding": "bold red", "nonfinite": "bold red",
                 "no_gradient": "bold red", "frozen": "dim", "no_grad": "dim"}
KIND_TITLE = {"vanishing": "vanishing gradients", "exploding": "exploding gradients",
               "nonfinite": "non-finite gradients", "no_gradient": "no gradient at all",
               "saturation": "saturated activations",
               "dead_units": "dead ReLU units"}
_MAX_ROWS = 60


def sparkline(values: Sequence[float], lo: float, hi: float, width: int = 24) -> str:
    """Log-scale sparkline of ``values`` between ``lo`` and ``hi`` (log10 units); ``!`` marks inf/NaN.

    Example:
        >>> sparkline([1e-8, 1e-4, 1.0], -8, 0, width=3)
        '▁▅█'
    """
    if not values:
        return ""
    n = len(values)
    idx = [min(n - 1, int(round(i * (n - 1) / max(1, width - 1)))) for i in range(min(width, n))]
    out = []
    for i in idx:
        v = values[i]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(" ")
        elif not math.isfinite(v):
            out.append("!")
        elif v <= 0:
            out.append(_BARS[0])
        else:
            x = (math.log10(v) - lo) / (hi - lo) if hi > lo else 0.5
            out.append(_BARS[max(0, min(len(_BARS) - 1, int(x * (len(_BARS) - 1) + 0.5)))])
    return "".join(out)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1e}" if x != 0 else "0"


def _layer_table(report: Report) -> Table:
    finite = [v for la in report.layers for v in la.grad_rms_trend
              if isinstance(v, float) and math.isfinite(v) and v > 0]
    lo = math.log10(min(finite)) if finite else -8.0
    hi = math.log10(max(finite)) if finite else 0.0
    steps = report.trend_steps
    span = f"steps {steps[0]}–{steps[-1]}" if steps else "over the run"
    table = Table(box=box.SIMPLE_HEAD, title=f"Layers, input → output ({report.model_type}, {report.framework})",
                  title_justify="left", pad_edge=False)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("layer", overflow="fold")
    table.add_column("type", style="dim", overflow="fold")
    table.add_column(f"grad RMS, {span} (log)", no_wrap=True)
    table.add_column("grad RMS", justify="right", no_wrap=True)
    table.add_column("update ratio", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    rows = list(report.layers)
    if len(rows) > _MAX_ROWS:
        keep = {la.index for la in rows if la.status not in ("ok",)}
        keep |= {la.index for la in rows[:_MAX_ROWS // 2]} | {la.index for la in rows[-_MAX_ROWS // 2:]}
    else:
        keep = {la.index for la in rows}
    gap = False
    for la in rows:
        if la.index not in keep:
            if not gap:
                table.add_row("…", f"({len(rows) - len(keep)} healthy layers not shown)", "", "", "", "", "")
            gap = True
            continue
        gap = False
        table.add_row(str(la.index), la.name, la.type, sparkline(la.grad_rms_trend, lo, hi), _fmt(la.grad_rms),
                      _fmt(la.update_ratio), Text(la.status, style=_STATUS_STYLE.get(la.status, "")))
    return table


def finding_block(f: Finding) -> RenderableType:
    state = "" if f.active else f" (resolved by step {f.last_step})"
    style = "red" if f.severity == "critical" else "yellow"
    return Text.assemble((f"● {f.kind}", f"bold {style}"), f" [{f.severity}] since step {f.step}{state}: ",
                         f.message)


def render(report: Report) -> RenderableType:
    """The summary as a rich renderable: verdict, findings, ranked recommendations, per-layer table."""
    parts: list[RenderableType] = []
    if not report.layers:
        parts.append(Text(f"gradwatch: {report.model_type} — no training step seen yet.", style="dim"))
        return Group(*parts)
    verdict = "healthy" if report.healthy else "problems found: " + ", ".join(
        dict.fromkeys(f.kind for f in report.findings if f.kind in HEALTH_KINDS))
    head = Text.assemble(("gradwatch ", "bold"), f"{report.model_type} — step {report.step}, "
                         f"{report.collected_steps} measured — ",
                         (verdict, "bold green" if report.healthy else "bold red"))
    parts.append(head)
    if report.findings:
        parts.append(Text("Findings", style="bold"))
        parts.extend(finding_block(f) for f in report.findings)
    if report.recommendations:
        parts.append(Text("\nRecommendations (first to try first)", style="bold"))
        for rec in report.recommendations:
            parts.append(Text.assemble((f"{rec.rank}. {rec.fix}", "bold cyan"), f"  ({', '.join(rec.layers[:6])}"
                                       f"{', …' if len(rec.layers) > 6 else ''})"))
            parts.append(Text("   " + rec.reason))
            if rec.snippet:
                parts.append(Syntax(rec.snippet, "python", theme="ansi_dark", padding=(0, 3),
                                    background_color="default"))
            if rec.references:
                parts.append(Text("   see: " + "; ".join(rec.references), style="dim"))
    parts.append(_layer_table(report))
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    if report.monitoring.startswith("off"):
        parts.append(Text(f"monitoring {report.monitoring}", style="bold red"))
    return Group(*parts)


def render_text(report: Report, *, width: int = 120) -> str:
    """The summary as plain text (what ``str(report)`` returns)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None, no_color=True,
                      highlight=False, soft_wrap=False)
    console.print(render(report))
    return buf.getvalue().rstrip() + "\n"


def make_console(file: IO[str] | None = None) -> Console:
    """A rich console on ``file`` (default ``sys.stdout``); 120 columns when it is not a terminal."""
    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console = Console(file=file or sys.stdout, highlight=False, soft_wrap=False, width=120)
    return console
