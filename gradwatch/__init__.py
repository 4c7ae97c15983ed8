"""gradwatch: find vanishing and exploding gradients in PyTorch and Keras models, and say how to fix them.

Example:
    >>> import torch, gradwatch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
    >>> gw = gradwatch.attach(model, opt, reporters=[])
    >>> for _ in range(5):
    ...     opt.zero_grad(); model(torch.randn(32, 8)).pow(2).mean().backward(); opt.step()
    >>> gw.detach()
    >>> gw.report().healthy
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwatch._watcher import Watcher
from gradwatch.core.checks import Thresholds
from gradwatch.core.report import Finding, LayerSummary, ParamSummary, Recommendation, Report
from gradwatch.core.structure import LayerInfo, Structure
from gradwatch.errors import AttachError, GradwatchError, LogError, MonitoringError, WatcherStateError
from gradwatch.options import WatchOptions
from gradwatch.reporters import ConsoleReporter, Flush, Reporter, RunLogWriter, WatchInfo
from gradwatch.trials import TrialReport, TrialRun, trial

if TYPE_CHECKING:
    from gradwatch.integrations.keras import KerasCallback
    from gradwatch.reporters.wandb import WandbReporter

__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "ConsoleReporter",
    "Finding",
    "Flush",
    "GradwatchError",
    "KerasCallback",
    "LayerInfo",
    "LayerSummary",
    "LogError",
    "MonitoringError",
    "ParamSummary",
    "Recommendation",
    "Report",
    "Reporter",
    "RunLogWriter",
    "Structure",
    "Thresholds",
    "TrialReport",
    "TrialRun",
    "WandbReporter",
    "WatchInfo",
    "WatchOptions",
    "Watcher",
    "WatcherStateError",
    "__version__",
    "attach",
    "load",
    "trial",
]

#: Names loaded on first use (``__getattr__``), so that ``import gradwatch`` imports no framework (Keras, W&B).
_LAZY = ("KerasCallback", "WandbReporter")


def attach(model: Any, optimizer: Any = None, **options: Any) -> Watcher:
    """Watch a model's gradients. Returns a :class:`Watcher`; use it as a context manager to detach on exit.

    A plain training loop needs no other call: hooks count the steps and collect the statistics.

    Args:
        model: A ``torch.nn.Module`` (also ``torch.compile``d) or a ``keras.Model``.
        optimizer: PyTorch: the optimizer that trains ``model``, so gradwatch judges the gradients it really
            applies (after accumulation) and measures update ratios; a wrapper holding it as ``.optimizer``
            (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) is unwrapped. Keras:
            unused (the model's own optimizer is watched). Defaults to ``None``.
        **options: ``scaler`` (PyTorch: a ``torch.amp.GradScaler``, so gradients are judged unscaled) and the
            options of :class:`WatchOptions`: ``reporters``, ``every``, ``flush_every``, ``update_every``,
            ``activation_every``, ``strict``, ``thresholds``, ``history``, ``log_dir``, ``all_ranks``.

    Raises:
        TypeError: ``model`` is neither, an option is unknown, or an option has the wrong type.
        ValueError: An option's value is out of range, or the optimizer does not hold the model's parameters.
        AttachError: gradwatch is already attached to this model (call ``detach()`` first).

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Linear(3, 1)
        >>> gradwatch.attach(model, every=0)
        Traceback (most recent call last):
        ...
        ValueError: every must be an int >= 1, received every=0
    """
    from gradwatch.adapters import adapter_for

    return Watcher.start(adapter_for(model), model, optimizer, options)


def load(log_dir: Any) -> Report:
    """Read a run log written with ``attach(..., log_dir=...)`` back into a :class:`Report`.

    Raises:
        LogError: The directory holds no gradwatch log, or the log is damaged beyond its last good record.
    """
    from gradwatch.core.runlog import load_report

    return load_report(log_dir)


def __getattr__(name: str) -> Any:
    if name == "KerasCallback":
        from gradwatch.integrations.keras import KerasCallback

        return KerasCallback
    if name == "WandbReporter":
        from gradwatch.reporters.wandb import WandbReporter

        return WandbReporter
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
