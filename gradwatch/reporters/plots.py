"""Pictures of a report: moved to :mod:`gradwatch.core.plots` (beside the results); this path keeps working."""

from gradwatch.core.plots import PLOT_KINDS, depth_figure, flow_figure, plot_report, updates_figure

__all__ = ["PLOT_KINDS", "depth_figure", "flow_figure", "plot_report", "updates_figure"]
