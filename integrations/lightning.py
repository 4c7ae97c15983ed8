"""Lightning: a callback that judges the gradients Lightning hands the optimizer.

Works with ``lightning.pytorch`` and, when only that is installed, ``pytorch_lightning`` (never both: Lightning
refuses a callback from the other namespace).

Example:
    >>> from gradwatch.integrations.lightning import GradwatchCallback
    >>> GradwatchCallback(flush_every=0)
    Traceback (most recent call last):
    ...
    ValueError: flush_every must be an int >= 1, received flush_every=0
"""

from __future__ import annotations

import importlib.util
import math
import sys
from typing import Any

from gradwatch._optional import require
from gradwatch._watcher import Watcher, callback_report
from gradwatch.core.report import Report
from gradwatch.errors import WatcherStateError
from gradwatch.options import WatchOptions


def _namespace() -> str:
    """The Lightning the user trains with: the one already imported (Lightning refuses a callback from the other
    namespace), else ``lightning.pytorch`` if installed, else ``pytorch_lightning``."""
    if "lightning.pytorch" in sys.modules:
        return "lightning.pytorch"
    if "pytorch_lightning" in sys.modules:
        return "pytorch_lightning"
    return "lightning.pytorch" if importlib.util.find_spec("lightning") is not None else "pytorch_lightning"


pl = require(_namespace(), extra="lightning", feature="gradwatch.integrations.lightning")

from gradwatch.adapters.torch import TorchAdapter  # noqa: E402
from gradwatch.reporters.base import Flush, Reporter, flush_scalars  # noqa: E402

__all__ = ["GradwatchCallback"]


class GradwatchCallback(pl.Callback):
    """Watches a Lightning ``Trainer.fit``: ``Trainer(callbacks=[GradwatchCallback()])``.

    - Attaches in ``on_fit_start`` to the ``LightningModule`` and its (first) optimizer; detaches in
      ``on_fit_end``.
    - Reads the gradients in ``on_before_optimizer_step``: accumulated over ``accumulate_grad_batches``,
      unscaled under 16-bit AMP, before Lightning's ``gradient_clip_val`` clipping. The optimizer's own hooks then
      measure the update it applied, so ``optimizer.step(closure)`` (where the backward runs inside the step)
      is judged on this step's gradients, not the last one's.
    - Sends gradwatch's series (``gradwatch/grad_rms/<layer>``, ``gradwatch/update_ratio/<layer>``,
      ``gradwatch/health/*``) to the trainer's loggers every flush.
    - Reports (console, run log, loggers) on global rank zero only; every rank measures and judges.

    Args:
        log_metrics: Send the series to ``trainer.loggers``. Defaults to ``True``.
        **options: The options of :func:`gradwatch.attach` (``reporters``, ``every``, ``flush_every``, ...).
    """

    def __init__(self, *, log_metrics: bool = True, **options: Any) -> None:
        super().__init__()
        self.options = WatchOptions.parse(options, caller="GradwatchCallback()")
        self.log_metrics = bool(log_metrics)
        self._watcher: Watcher | None = None
        self._last: Report | None = None

    @property
    def watcher(self) -> Watcher | None:
        return self._watcher

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._watcher is not None:
            self._watcher.detach()
        mine = [cb for cb in trainer.callbacks if isinstance(cb, GradwatchCallback)]
        if len(mine) > 1:
            raise ValueError(f"{len(mine)} GradwatchCallbacks were passed to one Trainer (callbacks="
                             f"{[type(cb).__name__ for cb in trainer.callbacks]}); pass one.")
        optimizers = trainer.optimizers
        if not optimizers:
            raise WatcherStateError("GradwatchCallback found no optimizer on the Trainer at fit start: "
                                    "configure_optimizers() must return one.")
        options = self.options
        if self.log_metrics and trainer.is_global_zero and trainer.loggers:
            options = options.replace(reporters=(*options.reporters, _LoggerReporter(trainer)))
        self._watcher = Watcher(pl_module, TorchAdapter, options, optimizer=optimizers[0],
                                main_process=bool(trainer.is_global_zero))
        if len(optimizers) > 1:
            self._watcher.add_note(f"Lightning gave {len(optimizers)} optimizers; gradwatch watches the first "
                                   f"({type(optimizers[0]).__name__}).")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        watcher = self._watcher
        if watcher is not None and watcher.active and getattr(optimizer, "optimizer", optimizer) is \
                watcher.adapter.optimizer:
            watcher.adapter.guard(watcher.adapter.collect_gradients, "Lightning on_before_optimizer_step")()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._watcher is None:
            return
        self._watcher.detach()
        self._last = self._watcher.report()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_fit_end(trainer, pl_module)

    def report(self) -> Report:
        """The diagnosis of the ``fit()`` in progress, or of the last one once it ended."""
        needs = ("GradwatchCallback.report() needs a fit() first: pass the callback "
                 "to Trainer(callbacks=[cb]) and call trainer.fit(...).")
        return callback_report(self._watcher, self._last, needs)


class _LoggerReporter(Reporter):
    """gradwatch's per-flush series into the Lightning trainer's loggers (TensorBoard, CSV, W&B, ...)."""

    name = "lightning"

    def __init__(self, trainer) -> None:
        self._trainer = trainer

    def on_flush(self, flush: Flush) -> None:
        if flush.rows is None:
            return
        metrics = {f"gradwatch/{k}": v for k, v in flush_scalars(flush).items() if math.isfinite(v)}
        step = int(self._trainer.global_step)
        for logger in self._trainer.loggers:
            logger.log_metrics(metrics, step=step)
