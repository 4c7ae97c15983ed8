"""Every reporter, and the names ``reporters=[...]`` accepts.

- ``"console"``: :class:`ConsoleReporter` (rich), a block per new finding and the summary at detach.
- ``"wandb"``: :class:`~gradwatch.reporters.wandb.WandbReporter`, to the active Weights & Biases run (also
  ``gradwatch.integrations.wandb.WandbReporter``).
- ``"tensorboard"``: :class:`~gradwatch.reporters.tensorboard.TensorBoardReporter`, an event file under ``runs/``
  (also ``gradwatch.integrations.tensorboard.TensorBoardReporter(log_dir=...)``).
- ``log_dir=``: :class:`RunLogWriter`, the append-only run log that :func:`gradwatch.load` reads.

The interface each one implements, and when each hook runs, is :mod:`gradwatch.reporters.base`.
"""

from __future__ import annotations

from gradwatch.reporters.base import Flush, Reporter, WatchInfo
from gradwatch.reporters.console import ConsoleReporter
from gradwatch.reporters.runlog import RunLogWriter

__all__ = ["REPORTER_NAMES", "ConsoleReporter", "Flush", "Reporter", "RunLogWriter", "WatchInfo", "make_reporter"]

#: The names ``reporters=[...]`` accepts.
REPORTER_NAMES = ("console", "wandb", "tensorboard")


def make_reporter(name: str) -> Reporter:
    """The reporter a name in ``reporters=[...]`` stands for (made when the watch starts)."""
    if name == "console":
        return ConsoleReporter()
    if name == "wandb":
        from gradwatch.reporters.wandb import WandbReporter

        return WandbReporter()
    if name == "tensorboard":
        from gradwatch.reporters.tensorboard import TensorBoardReporter

        return TensorBoardReporter()
    raise ValueError(f"unknown reporter {name!r}; accepted names: {', '.join(map(repr, REPORTER_NAMES))}, or a "
                     "gradwatch.Reporter instance")
