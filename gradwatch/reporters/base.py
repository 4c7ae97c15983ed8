"""What a reporter receives from the watcher."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from gradwatch._watcher import Watcher
    from gradwatch.core.report import Finding, Report
    from gradwatch.core.stats import LayerRows

__all__ = ["Reporter"]


class Reporter:
    """Base class of reporters. Override the hooks you need; the others do nothing.

    A reporter's exception never reaches the user's training: the watcher warns once and drops that reporter
    (unless ``strict=True``).
    """

    name = "reporter"

    def on_attach(self, watcher: Watcher) -> None:
        """The watcher is attached (called once)."""

    def on_flush(self, watcher: Watcher, rows: LayerRows) -> None:
        """New steps were pulled from the device: ``rows`` holds their per-layer figures."""

    def on_findings(self, watcher: Watcher, findings: Sequence[Finding]) -> None:
        """Findings that appeared for the first time."""

    def on_close(self, watcher: Watcher, report: Report) -> None:
        """The watcher detached (also on ``with`` exit, also after an exception)."""
