"""Hugging Face ``Trainer``: a ``TrainerCallback`` that judges the gradients Trainer really applies.

Example:
    >>> from gradwatch.integrations.transformers import GradwatchCallback
    >>> GradwatchCallback(every=0)
    Traceback (most recent call last):
    ...
    ValueError: every must be an int >= 1, received every=0
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

from gradwatch._optional import require
from gradwatch._watcher import Watcher, callback_report
from gradwatch.core.report import HEALTH_KINDS, Report
from gradwatch.errors import WatcherStateError
from gradwatch.options import WatchOptions
from gradwatch.reporters.base import block_of

transformers = require("transformers", extra="transformers", feature="gradwatch.integrations.transformers")
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import CallbackHandler  # noqa: E402

from gradwatch.adapters.torch import TorchAdapter  # noqa: E402

__all__ = ["GradwatchCallback"]


class GradwatchCallback(TrainerCallback):
    """Watches a ``transformers.Trainer`` run: ``Trainer(..., callbacks=[GradwatchCallback()])``.

    - Attaches in ``on_train_begin`` to the model and the optimizer Trainer built (accelerate's wrapper is
      unwrapped), and detaches in ``on_train_end``: each ``train()`` is one watch.
    - Judges the gradients the optimizer applies: accumulated over ``gradient_accumulation_steps``, unscaled
      under fp16, after Trainer's clipping. Steps the loss scaler skipped never reach the optimizer and are not
      counted. The pre-clip size is Trainer's own ``grad_norm`` (read from its logs): the report says how often
      clipping was active.
    - Adds gradwatch's verdict and a per-block gradient summary to Trainer's logs on every logging step, so
      every ``report_to`` backend (W&B, TensorBoard, MLflow, ...) and ``state.log_history`` show them:
      ``gradwatch/healthy``, ``gradwatch/active_findings``, ``gradwatch/vanishing_layers``,
      ``gradwatch/exploding_layers``, ``gradwatch/log10_grad_rms/<block>``.
    - Reports (console, run log) on the world's main process only; every process measures and judges.

    Args:
        **options: The options of :func:`gradwatch.attach` (``reporters``, ``every``, ``flush_every``, ...).

    Raises:
        ValueError: The callback was added to a Trainer twice, or two GradwatchCallbacks were added.
    """

    def __init__(self, **options: Any) -> None:
        self.options = WatchOptions.parse(options, caller="GradwatchCallback()")
        self._watcher: Watcher | None = None
        self._last: Report | None = None
        self._preclip: list[float] = []
        self._max_grad_norm = 0.0

    @property
    def watcher(self) -> Watcher | None:
        """The watcher of the ``train()`` in progress (``None`` before one)."""
        return self._watcher

    # -- Trainer events ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._go_first(inspect.currentframe())
        if self._watcher is not None:
            self._watcher.detach()
        if model is None or optimizer is None:
            raise WatcherStateError(f"GradwatchCallback needs the model and optimizer at on_train_begin; Trainer "
                                    f"passed model={type(model).__name__}, optimizer={type(optimizer).__name__}.")
        self._preclip = []
        self._max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        self._watcher = Watcher(model, TorchAdapter, self.options, optimizer=optimizer,
                                main_process=bool(state.is_world_process_zero))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._watcher is None or not self._watcher.active:
            return
        norm = logs.get("grad_norm")
        if isinstance(norm, (int, float)) and math.isfinite(norm):
            self._preclip.append(float(norm))
        if "loss" not in logs:
            return  # an evaluation or end-of-training log: gradient figures only on training logs
        self._watcher.flush()
        try:
            values = self.log_values()
        except Exception as exc:  # noqa: BLE001 - fail-open: Trainer's logging goes on without gradwatch's values
            self._watcher.on_error(exc, "GradwatchCallback.on_log")
            return
        logs.update(values)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs):
        if self._watcher is None:
            return
        note = self._clip_note()
        if note:
            self._watcher.add_note(note)
        self._watcher.detach()
        self._last = self._watcher.report()

    # -- public --------------------------------------------------------------------------------------------

    def report(self) -> Report:
        """The diagnosis of the ``train()`` in progress, or of the last one once it ended."""
        needs = ("GradwatchCallback.report() needs a train() first: pass the "
                 "callback to Trainer(..., callbacks=[cb]) and call trainer.train().")
        return callback_report(self._watcher, self._last, needs)

    def log_values(self) -> dict[str, float]:
        """What goes into Trainer's logs: the verdict, and per block the log10 of its gradient RMS over the
        detector's recent window (blocks as :func:`~gradwatch.reporters.base.block_of` groups layers)."""
        verdicts = self._watcher.verdicts() if self._watcher is not None else None
        if verdicts is None:
            return {}
        active = [f for f in verdicts.findings if f.active and f.kind in HEALTH_KINDS]
        out = {"gradwatch/healthy": float(not active), "gradwatch/active_findings": float(len(active))}
        for kind in ("vanishing", "exploding"):
            out[f"gradwatch/{kind}_layers"] = float(sum(s == kind for s in verdicts.status))
        names = self._watcher.adapter.table.layer_names
        blocks: dict[str, list[float]] = {}
        for name, rms in zip(names, verdicts.grad_rms):
            if np.isfinite(rms) and rms > 0:
                blocks.setdefault(block_of(name), []).append(float(rms) ** 2)
        for block, sq in blocks.items():
            out[f"gradwatch/log10_grad_rms/{block}"] = round(0.5 * math.log10(sum(sq) / len(sq)), 4)
        return out

    # -- internals -----------------------------------------------------------------------------------------

    def _clip_note(self) -> str | None:
        if self._max_grad_norm <= 0 or not self._preclip:
            return None
        pre = np.asarray(self._preclip)
        clipped = int(np.count_nonzero(pre > self._max_grad_norm))
        return (f"Trainer clipped gradients to max_grad_norm={self._max_grad_norm:g}: on {clipped} of {len(pre)} "
                f"logged steps the pre-clip norm was above it (median {np.median(pre):.3g}, max {pre.max():.3g}, "
                "last {:.3g}); gradwatch judged the clipped gradients the optimizer applied.".format(pre[-1]))

    def _go_first(self, frame) -> None:
        """Run before the other callbacks (the ``report_to`` ones come first by default), so the values this
        callback adds to ``logs`` reach them; and refuse a second GradwatchCallback on the same Trainer."""
        caller = frame.f_back.f_locals.get("self") if frame is not None and frame.f_back is not None else None
        if not isinstance(caller, CallbackHandler):
            return
        mine = [cb for cb in caller.callbacks if isinstance(cb, GradwatchCallback)]
        if len(mine) > 1:
            same = all(cb is self for cb in mine)
            raise ValueError(
                ("This GradwatchCallback was added to the Trainer twice" if same else
                 f"{len(mine)} GradwatchCallbacks were added to one Trainer") + " (callbacks="
                + repr([type(cb).__name__ for cb in caller.callbacks]) + "). Pass one: "
                "Trainer(..., callbacks=[GradwatchCallback()]).")
        callbacks = caller.callbacks
        i = next(i for i, cb in enumerate(callbacks) if cb is self)
        # Moving this callback from i to 0 shifts only the ones before it: the handler's loop, now at i, goes on
        # with the same next callback.
        callbacks.insert(0, callbacks.pop(i))
