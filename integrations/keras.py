"""Keras 3: a callback that judges the real training gradients of ``model.fit``.

Example:
    >>> import gradwatch
    >>> cb = gradwatch.KerasCallback(reporters=[], flush_every=10)
    >>> cb.options.flush_every
    10
"""

from __future__ import annotations

import threading
from typing import Any

from gradwatch._optional import require
from gradwatch._watcher import Watcher, callback_report
from gradwatch.adapters.keras_backends import keras_adapter
from gradwatch.core.report import Report
from gradwatch.options import WatchOptions
from gradwatch.reporters import ConsoleReporter

keras = require("keras", extra="tensorflow", feature="gradwatch.KerasCallback")

__all__ = ["KerasCallback", "attach_keras"]

_LOSS_WAIT_S = 30.0  # how long a drain waits for a step's loss from Keras' worker thread before it goes without


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

    It keeps ``fit()``'s asynchronous dispatch: on JAX and torch, Keras runs the batch-end hooks in a worker thread
    unless a callback says they are not safe there, and a hook on ``fit()``'s thread would wait for every step
    (a no-op one cost a JAX SimpleRNN +5 to +7% a step, measured). Its ``on_train_batch_end`` only hands the loss
    over when it runs off ``fit()``'s thread; the batch is then handled when the next begins (or the epoch ends),
    on ``fit()``'s thread, and a flush waits for the losses still on their way. On ``fit()``'s thread (TensorFlow,
    or another callback keeps Keras synchronous) it handles the batch at once.

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
        self._fit_thread: int | None = None
        self._open: int | None = None  # the batch begun on fit()'s thread and not yet handled
        self._arrival = threading.Condition()  # guards _arrived and _in_flight; notified as a loss arrives
        self._arrived: dict[int, Any] = {}  # batch (of this epoch) -> its loss, from Keras' batch-end workers
        self._in_flight: dict[int, int] = {}  # step -> batch, of batches handled before their batch-end worker ran

    async_safe = True  # see the class docstring: off fit()'s thread, on_train_batch_end only hands over the loss

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
        self._fit_thread, self._open = threading.get_ident(), None
        self._arrived, self._in_flight = {}, {}
        # A subclassed model with its own train_step is built by fit()'s first step: watched from the next one.
        self._watcher = Watcher(self.model, keras_adapter(), self.options, extra={"in_fit": True})
        self._console_defer(True)
        self._watcher.adapter.loss_barrier = self._await_losses

    def _step_of(self, batch: int) -> int | None:
        per_epoch = (self.params or {}).get("steps")
        return self._epoch * per_epoch + batch + 1 if per_epoch else None

    def on_train_batch_begin(self, batch, logs=None) -> None:
        self._end_open(batch - 1)
        self._open = batch

    def on_train_batch_end(self, batch, logs=None) -> None:
        loss = (logs or {}).get("loss")
        if threading.get_ident() == self._fit_thread:
            self._open = None
            self._handle(batch, loss)
            return
        with self._arrival:  # a Keras worker thread: fit() may have gone on to the next batch
            self._arrived[batch] = loss
            self._arrival.notify_all()

    def _end_open(self, last: int) -> None:
        """Handle the batch begun last, which ended at ``last``, when its batch-end ran off fit()'s thread."""
        if self._open is None:
            return
        self._open = None
        with self._arrival:
            arrived = last in self._arrived
            loss = self._arrived.pop(last, None)
            step = self._step_of(last)
            if not arrived and step is not None:
                self._in_flight[step] = last
        self._handle(last, loss)

    def _handle(self, batch: int, loss: Any) -> None:
        if self._watcher is not None and self._watcher.active:
            self._watcher.adapter.on_batch_end(batch, loss=loss, step=self._step_of(batch))

    def _await_losses(self, upto: int) -> dict[int, Any]:
        """At a drain, on fit()'s thread: the losses of the steps up to ``upto`` handled before their batch-end
        worker ran (each reads its step's loss back as the step finishes, which the drain waits for anyway)."""
        with self._arrival:
            waiting = {s: b for s, b in self._in_flight.items() if s <= upto}
            self._arrival.wait_for(lambda: all(b in self._arrived for b in waiting.values()), timeout=_LOSS_WAIT_S)
            for s in waiting:
                del self._in_flight[s]
            return {s: self._arrived.pop(b) for s, b in waiting.items() if b in self._arrived}

    def on_epoch_begin(self, epoch, logs=None) -> None:
        if self._first_epoch is None:  # fit(initial_epoch=k) numbers epochs from k; steps count from this fit
            self._first_epoch = epoch
        self._epoch = epoch - self._first_epoch
        with self._arrival:  # batches number from 0 again; Keras waited for the last epoch's workers
            self._arrived.clear()
            self._in_flight.clear()
        if self._watcher is not None and epoch > 0:
            for r in self._watcher.reporters:
                if isinstance(r, ConsoleReporter):
                    r.release()

    def on_epoch_end(self, epoch, logs=None) -> None:
        # Keras has waited for every batch-end worker of the epoch: the last batch's end is in _arrived.
        with self._arrival:
            last = max(self._arrived, default=self._open)
        if last is not None:
            self._end_open(last)
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
