"""Pictures of a report, with matplotlib (the ``plot`` extra).

- :func:`flow_figure`: the gradient-flow heatmap, layers from input (top) to output (bottom) against training
  steps, coloured by log10 gradient RMS, with the findings outlined.
- :func:`depth_figure`: the depth profile, gradient RMS per layer at a few steps (the picture of Glorot &
  Bengio 2010, figs. 6-7): a healthy network is flat, a vanishing one climbs from input to output.
- :func:`updates_figure`: per-layer update ratio ``||dw||/||w||`` over time, with the usual ~1e-3 guide line.

Figures are made with :class:`matplotlib.figure.Figure` on the Agg canvas, never through ``pyplot``, so plotting
touches no global state of the user's process (backend, open figures). Colours are ``cividis`` (designed for
colour-vision deficiency); layer labels are thinned to stay readable with hundreds of layers.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Literal

import numpy as np

from gradwatch._optional import require
from gradwatch.core.kinds import HEALTH_KINDS
from gradwatch.core.stats import TYPICAL_UPDATE_RATIO

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gradwatch.core.report import Report

__all__ = ["PLOT_KINDS", "depth_figure", "flow_figure", "plot_report", "updates_figure"]

PlotKind = Literal["all", "flow", "depth", "updates"]
PLOT_KINDS = ("all", "flow", "depth", "updates")
_CMAP = "cividis"
_MAX_LABELS = 40
_FINDING_COLOURS = {"vanishing": "#56B4E9", "exploding": "#E69F00", "nonfinite": "#D55E00",
                    "no_gradient": "#CC79A7"}  # Okabe-Ito


def _mpl():
    require("matplotlib", extra="plot", feature="gradwatch plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def _new_figure(width: float, height: float) -> Figure:
    figure_cls, canvas_cls = _mpl()
    fig = figure_cls(figsize=(width, height), dpi=110, layout="constrained")
    canvas_cls(fig)
    return fig


def _need_layers(report: Report) -> None:
    if not report.layers or not report.trend_steps:
        raise ValueError(f"this report has no measured step to plot (step {report.step}, "
                         f"{report.collected_steps} collected); train with gradwatch attached first")


def _label_layers(ax: Axes, report: Report, axis: str) -> None:
    n = len(report.layers)
    every = max(1, math.ceil(n / _MAX_LABELS))
    ticks = list(range(0, n, every))
    labels = [report.layers[i].name for i in ticks]
    size = 8 if n <= 20 else 6
    if axis == "y":
        ax.set_yticks(ticks, labels, fontsize=size)
    else:
        ax.set_xticks(ticks, labels, fontsize=size, rotation=60, ha="right")


def _flow_matrix(report: Report) -> np.ndarray:
    return np.asarray([la.grad_rms_trend for la in report.layers], dtype=np.float64)


def draw_flow(ax: Axes, report: Report) -> None:
    """Draw the gradient-flow heatmap on ``ax``."""
    _need_layers(report)
    m = _flow_matrix(report)
    steps = np.asarray(report.trend_steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.log10(np.where(np.isfinite(m) & (m > 0), m, np.nan))
    masked = np.ma.masked_invalid(logm)
    cmap = _matplotlib_cmap().with_extremes(bad="#dddddd")
    x_edges = _edges(steps)
    y_edges = np.arange(len(report.layers) + 1) - 0.5
    mesh = ax.pcolormesh(x_edges, y_edges, masked, cmap=cmap, shading="flat")
    ax.figure.colorbar(mesh, ax=ax, label="log10 gradient RMS", shrink=0.9, aspect=30)
    from matplotlib.patches import Patch, Rectangle

    extra = [Patch(facecolor="#dddddd", label="zero or no gradient")] if np.ma.getmaskarray(masked).any() else []
    bad = ~np.isfinite(m) & ~np.isnan(m)
    if bad.any():
        yi, xi = np.nonzero(bad)
        ax.scatter(steps[xi], yi, marker="x", color=_FINDING_COLOURS["nonfinite"], s=12, label="inf")
    index = {la.name: la.index for la in report.layers}
    for f in report.findings:
        if f.kind not in HEALTH_KINDS:
            continue
        rows = [index[name] for name in f.layers if name in index]
        if not rows:
            continue
        colour = _FINDING_COLOURS[f.kind]
        x0, x1 = f.step, max(f.last_step, f.step) if not f.active else x_edges[-1]
        ax.add_patch(Rectangle((x0, min(rows) - 0.5), max(x1 - x0, 0.5), max(rows) - min(rows) + 1,
                               fill=False, edgecolor=colour, linewidth=1.8, linestyle="--",
                               label=f"{f.kind} (step {f.step})"))
    ax.set_ylim(len(report.layers) - 0.5, -0.5)  # input at the top
    _label_layers(ax, report, "y")
    ax.set_xlabel("training step")
    ax.set_ylabel("layer (input → output)")
    ax.set_title(f"Gradient flow — {report.model_type} ({report.framework})", loc="left")
    handles = ax.get_legend_handles_labels()[0] + extra
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)


def draw_depth(ax: Axes, report: Report, points: int = 4) -> None:
    """Draw the depth profile on ``ax``: gradient RMS per layer at ``points`` steps spread over the run."""
    _need_layers(report)
    m = _flow_matrix(report)
    n_t = m.shape[1]
    picks = np.unique(np.linspace(0, n_t - 1, min(points, n_t)).round().astype(int))
    cmap = _matplotlib_cmap()
    x = np.arange(len(report.layers))
    for k, j in enumerate(picks):
        y = np.where(np.isfinite(m[:, j]) & (m[:, j] > 0), m[:, j], np.nan)
        colour = cmap(0.1 + 0.8 * k / max(1, len(picks) - 1))
        ax.plot(x, y, marker="o", markersize=3, color=colour, label=f"step {report.trend_steps[j]}")
    ax.set_yscale("log")
    _label_layers(ax, report, "x")
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("gradient RMS")
    ax.set_title("Depth profile: flat is healthy, a climb towards the output is vanishing", loc="left")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)


def draw_updates(ax: Axes, report: Report) -> None:
    """Draw per-layer update ratios over time on ``ax``, coloured by depth, with the 1e-3 guide line."""
    _need_layers(report)
    steps = np.asarray(report.trend_steps)
    cmap = _matplotlib_cmap()
    n = len(report.layers)
    drawn = 0
    for la in report.layers:
        y = np.asarray(la.update_ratio_trend or [math.nan] * len(steps), dtype=np.float64)
        y = np.where(np.isfinite(y) & (y > 0), y, np.nan)
        if np.isnan(y).all():
            continue
        ax.plot(steps, y, color=cmap(la.index / max(1, n - 1)), linewidth=1.0, alpha=0.85)
        drawn += 1
    ax.axhline(TYPICAL_UPDATE_RATIO, color="black", linestyle="--", linewidth=1,
               label=f"~{TYPICAL_UPDATE_RATIO:g} (a common healthy ratio)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("update ratio ||Δw|| / ||w||")
    ax.set_title("Update ratios per layer (dark: input side, light: output side)", loc="left")
    if not drawn:
        ax.text(0.5, 0.5, "no update ratio measured (needs an optimizer)", transform=ax.transAxes,
                ha="center", va="center", fontsize=9)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    ax.figure.colorbar(ScalarMappable(Normalize(0, max(1, n - 1)), cmap), ax=ax, label="layer index")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def _matplotlib_cmap():
    from matplotlib import colormaps

    return colormaps[_CMAP].copy()


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step so the heatmap's x axis is in steps, for unevenly spaced points too."""
    s = steps.astype(np.float64)
    if len(s) == 1:
        return np.asarray([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _height(report: Report) -> float:
    return float(np.clip(0.16 * len(report.layers) + 1.8, 3.5, 14.0))


def flow_figure(report: Report) -> Figure:
    """The gradient-flow heatmap as a matplotlib figure."""
    fig = _new_figure(10, _height(report))
    draw_flow(fig.add_subplot(), report)
    return fig


def depth_figure(report: Report) -> Figure:
    """The depth profile as a matplotlib figure."""
    fig = _new_figure(10, 4.5)
    draw_depth(fig.add_subplot(), report)
    return fig


def updates_figure(report: Report) -> Figure:
    """The update ratios as a matplotlib figure."""
    fig = _new_figure(10, 4.5)
    draw_updates(fig.add_subplot(), report)
    return fig


def all_figure(report: Report) -> Figure:
    """Heatmap, depth profile and update ratios in one figure."""
    h = _height(report)
    fig = _new_figure(11, h + 8)
    grid = fig.add_gridspec(3, 1, height_ratios=[h, 4, 4])
    draw_flow(fig.add_subplot(grid[0]), report)
    draw_depth(fig.add_subplot(grid[1]), report)
    draw_updates(fig.add_subplot(grid[2]), report)
    return fig


_FIGURES = {"all": all_figure, "flow": flow_figure, "depth": depth_figure, "updates": updates_figure}


def plot_report(report: Report, path: str | os.PathLike, *, kind: PlotKind = "all") -> str:
    """Save a picture of ``report`` to ``path`` (format from its suffix: .png, .svg, .pdf); returns the path.

    Args:
        report: The report to draw.
        path: Where to save.
        kind: ``"all"`` (three panels), ``"flow"``, ``"depth"`` or ``"updates"``. Defaults to ``"all"``.

    Raises:
        ValueError: ``kind`` is unknown, or the report has no measured step.
        ImportError: matplotlib is missing (``pip install 'gradwatch[plot]'``).
    """
    if kind not in _FIGURES:
        raise ValueError(f"unknown plot kind {kind!r}; accepted: {', '.join(PLOT_KINDS)}")
    fig = _FIGURES[kind](report)
    out = os.fspath(path)
    fig.savefig(out)
    return out
