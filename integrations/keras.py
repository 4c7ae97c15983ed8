"""Keras 3: a callback that judges the real training gradients of ``model.fit``.

Example:
    >>> import gradwatch
    >>> cb = gradwatch.KerasCallback(reporters=[], flush_every=10)
    >>> cb.options.flush_every
    10
"""

from __future__ import annotations

from typing import Any

from gradwatch._optional import require
from gradwatch._watcher import Watcher, callback_report
from gradwatch.adapters.keras_backends import keras_adapter
from gradwatch.core.report import Report
from gradwatch.options import WatchOptions
from gradwatch.reporters import ConsoleReporter

keras = require("keras", extra="tensorflow", feature="gradwatch.KerasCallback")

__all__ = ["KerasCallback", "attach_keras"]


def attach_keras(model: Any, optimizer: Any = None, **options: Any) -> Watcher:
    """``gradwatch.attach(keras_model)``: wrap the compiled model's optimizer now.

    Statistics are read on ``gw.report()``, ``gw.flush()`` and ``gw.detach()``; inside ``fit()`` prefer
    :class:`KerasCallback`, which also reads them every ``flush_every`` batches.
    """
    return Watcher.start(keras_adapter(), model, optimizer, options)


class KerasCallback(keras.callbacks.Callback):
    """Watches the gradients ``fit()`` really applies, batch by batch, with no extra forward/backward pass.

    Each ``fit()`` starts a fresh watch (as Keras' own callbacks reset in ``on_train_begin``) and ends it in
    ``on_train_end``, which removes every wrapper: the model saves, reloads and fits again as without it.
    Finding blocks are printed when the next epoch begins or training ends, never into the progress bar.

    Args:
        **options: The options of :class:`gradwatch.WatchOptions` (``reporters``, ``every``, ``flush_every``,
            ``update_every``, ``activation_every``, ``strict``, ``thresholds``, ``history``, ``log_dir``), the
            same as ``attach()``'s.

    Example:
        >>> cb = KerasCallback(every=0)
        Traceback (most recent call last):
        ...
        ValueError: every must be an int >= 1, received every=0
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = WatchOptions.parse(options, caller="KerasCallback()")
        self._watcher: Watcher | None = None
        self._last: Report | None = None
        self._epoch = 0
        self._first_epoch: int | None = None

    @property
    def watcher(self) -> Watcher | None:
        return self._watcher

    def _console_defer(self, on: bool) -> None:
        for r in self._watcher.reporters if self._watcher else ():
            if isinstance(r, ConsoleReporter):
                r.defer = on
                if not on:
                    r.release()

    def on_train_begin(self, logs=None) -> None:
        if self._watcher is not None:
            self._watcher.detach()
        self._epoch, self._first_epoch = 0, None
        # A subclassed model with its own train_step is built by fit()'s first step: watched from the next one.
        self._watcher = Watcher(self.model, keras_adapter(), self.options, extra={"defer_unbuilt": True})
        self._console_defer(True)

    def on_train_batch_end(self, batch, logs=None) -> None:
        if self._watcher is not None and self._watcher.active:
            per_epoch = (self.params or {}).get("steps")
            step = self._epoch * per_epoch + batch + 1 if per_epoch else None
            self._watcher.adapter.on_batch_end(batch, loss=(logs or {}).get("loss"), step=step)

    def on_epoch_begin(self, epoch, logs=None) -> None:
        if self._first_epoch is None:  # fit(initial_epoch=k) numbers epochs from k; steps count from this fit
            self._first_epoch = epoch
        self._epoch = epoch - self._first_epoch
        if self._watcher is not None and epoch > 0:
            for r in self._watcher.reporters:
                if isinstance(r, ConsoleReporter):
                    r.release()

    def on_epoch_end(self, epoch, logs=None) -> None:
        if self._watcher is not None:
            self._watcher.flush()

    def on_train_end(self, logs=None) -> None:
        if self._watcher is None:
            return
        self._console_defer(False)
        self._watcher.detach()
        self._last = self._watcher.report()

    def report(self) -> Report:
        """The diagnosis of the current ``fit()``, or of the last one once it ended."""
        needs = ("KerasCallback.report() needs a fit() first: pass the callback to "
                 "model.fit(..., callbacks=[cb]).")
        return callback_report(self._watcher, self._last, needs)
