"""Exceptions raised by gradwatch.

The tree::

    GradwatchError                  base of everything gradwatch raises on purpose
    ├── AttachError                 a model cannot be watched (already attached, no parameters, ...)
    ├── WatcherStateError           a call that does not fit the watcher's lifecycle
    ├── MonitoringError             an internal failure while watching, raised only under ``strict=True``
    └── LogError                    a run log that is missing or damaged

Bad arguments raise the builtin ``TypeError`` / ``ValueError`` with a message that says what was received
and what is accepted.
"""

from __future__ import annotations

__all__ = ["AttachError", "GradwatchError", "LogError", "MonitoringError", "WatcherStateError"]


class GradwatchError(Exception):
    """Base class of every error gradwatch raises on purpose."""


class AttachError(GradwatchError):
    """The model cannot be watched as asked (attached already, nothing to watch, ...)."""


class WatcherStateError(GradwatchError):
    """A call that does not fit the watcher's lifecycle."""


class MonitoringError(GradwatchError):
    """An internal failure while monitoring. Raised only with ``strict=True``; otherwise gradwatch warns once."""


class LogError(GradwatchError):
    """A gradwatch run log that is missing, empty or damaged."""
