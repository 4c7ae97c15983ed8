"""Console output with rich: one block when a finding first appears, the summary (:mod:`gradwatch.core.text`)
when the watcher detaches. Plain text (no colour codes) when the output is not a terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from gradwatch.core.report import Finding, Report
from gradwatch.core.text import KIND_TITLE, finding_block, make_console, render, render_text, sparkline
from gradwatch.reporters.base import Reporter

__all__ = ["ConsoleReporter", "make_console", "render", "render_text", "sparkline"]


class ConsoleReporter(Reporter):
    """Prints a block when a finding first appears and the summary when the watcher detaches.

    Args:
        file: Where to print. Defaults to ``sys.stdout`` (looked up when printing).
        summary: Print the summary on detach. Defaults to ``True``.
        defer: Hold finding blocks until :meth:`release` (the Keras callback releases them between epochs, so
            they never cut into the progress bar). Defaults to ``False``.
    """

    name = "console"

    def __init__(self, *, file: IO[str] | None = None, summary: bool = True, defer: bool = False) -> None:
        self.file = file
        self.summary = summary
        self.defer = defer
        self._pending: list[RenderableType] = []

    def _console(self) -> Console:
        return make_console(self.file)

    def on_findings(self, findings: Sequence[Finding], flush) -> None:
        for f in findings:
            title = f"gradwatch: {KIND_TITLE.get(f.kind, f.kind)} at step {f.step}"
            body = Group(finding_block(f), Text("full diagnosis and fixes: print(gw.report()) or at detach()",
                                                 style="dim"))
            style = "red" if f.severity == "critical" else "yellow"
            self._pending.append(Panel(body, title=title, title_align="left", border_style=style, expand=False))
        if not self.defer:
            self.release()

    def release(self) -> None:
        """Print the finding blocks held back while ``defer`` is on."""
        if self._pending:
            console = self._console()
            for block in self._pending:
                console.print(block)
            self._pending.clear()

    def on_close(self, report: Report) -> None:
        self.release()
        if self.summary:
            self._console().print(render(report))
