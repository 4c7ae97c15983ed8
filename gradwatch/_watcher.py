"""The Watcher: one per watched model. Counts steps through the adapter's hooks, flushes device stats every
``flush_every`` steps into a bounded history, runs the detector, feeds the reporters, and builds reports."""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from typing import Any

import numpy as np

from gradwatch.adapters.base import Adapter
from gradwatch.core.detector import Detector
from gradwatch.core.report import Finding, Report
from gradwatch.core.stats import ActivationRows, History
from gradwatch.core.summarize import Verdicts, build_report
from gradwatch.errors import AttachError, MonitoringError
from gradwatch.options import WatchOptions
from gradwatch.reporters import Flush, Reporter, RunLogWriter, WatchInfo, make_reporter

# WatchOptions lives in gradwatch.options; this path keeps working
__all__ = ["WatchOptions", "Watcher", "callback_report"]

log = logging.getLogger(__name__)

#: Models watched now, so a second attach raises instead of piling hooks up. Weak: it never keeps a model alive.
_ATTACHED: weakref.WeakKeyDictionary[Any, Watcher] = weakref.WeakKeyDictionary()


def _make_reporters(options: WatchOptions, rank: int, world: int) -> list[Reporter]:
    """The reporters of this process: all of them on the main one; on the others none, unless ``all_ranks``
    (then each rank's run log goes to its own ``log_dir/rank-<r>``, so no file is written by two processes)."""
    if rank != 0 and not options.all_ranks:
        return []
    out = [make_reporter(r) if isinstance(r, str) else r for r in options.reporters]
    if options.log_dir is not None:
        log_dir = os.path.join(options.log_dir, f"rank-{rank}") if options.all_ranks and world > 1 else \
            options.log_dir
        out.append(RunLogWriter(log_dir))
    return out


class Watcher:
    """Watches one model's gradients. Made by :func:`gradwatch.attach` or :class:`gradwatch.KerasCallback`.

    A plain training loop needs no call: hooks count steps and collect statistics. Use :meth:`report` for the
    diagnosis so far, :meth:`detach` (or a ``with`` block) to remove every hook.

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradwatch.attach(model, opt, reporters=[]) as gw:
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
        >>> gw.report().step
        3
    """

    def __init__(self, model: Any, adapter: type[Adapter], options: WatchOptions, *, optimizer: Any = None,
                 extra: dict[str, Any] | None = None, main_process: bool | None = None) -> None:
        if model in _ATTACHED:
            raise AttachError(f"gradwatch is already attached to this {type(model).__name__}. Call detach() on the "
                              "watcher you have (or leave its `with` block) before attaching again.")
        self.options = options
        self._model_ref = weakref.ref(model)
        self._error: str | None = None
        self._warned = False
        self._detached = False
        self._history: History | None = None
        self._detector: Detector | None = None
        self._since_flush = 0
        self._last_acts: dict[str, np.ndarray] = {}
        self._closing = False
        self._notes: list[str] = []
        rank, world = adapter.process_rank()
        if main_process is not None:  # the training framework knows best (Trainer, Lightning)
            rank = 0 if main_process else max(rank, 1)
        self.rank, self.world_size = rank, world
        self.reporters = _make_reporters(options, rank, world)
        self.adapter = adapter.create(self, model, optimizer, options, **(extra or {}))
        _ATTACHED[model] = self
        info = WatchInfo(framework=self.adapter.framework, model_type=self.adapter.model_type,
                         options=options.as_dict())
        for r in list(self.reporters):
            self._call(r, "on_attach", info)

    @classmethod
    def start(cls, adapter: type[Adapter], model: Any, optimizer: Any, options: dict[str, Any], *,
              caller: str = "attach()", main_process: bool | None = None) -> Watcher:
        """Parse ``options`` (those of :class:`WatchOptions` plus the adapter's ``extra_options``) and watch."""
        options = dict(options)
        extra = {k: options.pop(k) for k in adapter.extra_options if k in options}
        opts = WatchOptions.parse(options, extra=adapter.extra_options, caller=caller)
        return cls(model, adapter, opts, optimizer=optimizer, extra=extra, main_process=main_process)

    def add_note(self, note: str) -> None:
        """A caveat for the report, from a front end (a training-framework callback) rather than the adapter."""
        if note not in self._notes:
            self._notes.append(note)

    # -- sink ----------------------------------------------------------------------------------------------

    def on_step(self, step: int) -> None:
        self._since_flush += 1
        if self._since_flush >= self.options.flush_every:
            self.flush()

    def on_error(self, exc: BaseException, where: str) -> None:
        if self.options.strict:
            raise MonitoringError(f"gradwatch failed in {where}: {type(exc).__name__}: {exc}") from exc
        self._error = f"{where}: {type(exc).__name__}: {exc}"
        if not self._warned:
            self._warned = True
            warnings.warn(f"gradwatch turned monitoring off after an internal error in {where} "
                          f"({type(exc).__name__}: {exc}). Training goes on unaffected; pass strict=True to raise "
                          "instead.", RuntimeWarning, stacklevel=2)
        log.debug("gradwatch internal error", exc_info=exc)
        try:
            self.adapter.detach()
        except Exception:  # noqa: BLE001 - already failing open
            log.debug("detach after error failed", exc_info=True)

    # -- public --------------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Training steps seen so far."""
        return self.adapter.step

    @property
    def active(self) -> bool:
        """Whether hooks are installed and monitoring runs."""
        return not self._detached and self._error is None

    def log_loss(self, loss: Any) -> None:
        """Give gradwatch the training loss of the step in progress, so a diverging loss is found even while the
        gradients stay bounded (a softmax keeps them bounded while the logits blow up). Optional; call it once per
        step, before ``optimizer.step()`` (after it, the value counts for the next step). A tensor stays on the
        device: this adds no sync.

        Example:
            >>> import torch, gradwatch
            >>> model = torch.nn.Linear(4, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> with gradwatch.attach(model, opt, reporters=[]) as gw:
            ...     loss = model(torch.randn(8, 4)).pow(2).mean()
            ...     loss.backward(); gw.log_loss(loss); opt.step()
            >>> gw.history.extra("loss").shape
            (1,)
        """
        if not self.active:
            return
        try:
            self.adapter.log_loss(loss)
        except Exception as exc:  # noqa: BLE001 - fail-open
            self.on_error(exc, "log_loss")

    @property
    def findings(self) -> tuple[Finding, ...]:
        """The findings judged so far, without pulling new steps from the device (:meth:`report` does that)."""
        return self._detector.findings if self._detector else ()

    @property
    def history(self) -> History | None:
        """The bounded per-step statistics history (``None`` before the first step)."""
        return self._history

    def verdicts(self) -> Verdicts | None:
        """The detector's conclusions so far as plain arrays (``None`` before the first flushed step)."""
        det = self._detector
        if det is None:
            return None
        rms, ur, _ = det.recent_medians()
        return Verdicts(findings=det.findings, status=tuple(det.layer_status()), grad_rms=rms, update_ratio=ur,
                        window=det.t.window, activations=dict(self._last_acts))

    @property
    def monitoring(self) -> str:
        """``"on"``, ``"detached"``, or ``"off: <reason>"`` after an internal error."""
        if self._error is not None:
            return f"off: {self._error}"
        return "detached" if self._detached else "on"

    def flush(self) -> None:
        """Pull collected statistics from the device, judge them and feed the reporters."""
        if self._error is not None and self._history is None:
            return
        self._since_flush = 0
        try:
            batch, acts = self.adapter.drain()
            table = self.adapter.table
            if table is None:
                return
            if self._history is None:
                self._history = History(table, capacity=self.options.history)
                structure = self.adapter.structure
                plain = gated = None
                if structure is not None and len(structure.layers) == table.n_layers:
                    cells = [la.recurrent_cell or "" for la in structure.layers]
                    plain = tuple(c.startswith("rnn") for c in cells)
                    gated = tuple(c in ("lstm", "gru") for c in cells)
                self._detector = Detector(table.layer_names, table.profile, self.options.thresholds,
                                          plain_recurrent=plain, gated_recurrent=gated,
                                          adaptive=bool(structure is not None and structure.adaptive_optimizer),
                                          trainable=table.layer_trainable)
            new: list[Finding] = []
            rows = None
            batch = batch if batch is not None and len(batch) else None
            if batch is not None:
                self._history.extend(batch)
                rows = batch.layers(table)
                new += self._detector.update(rows)
            if acts is not None and len(acts.steps):
                self._keep_acts(acts)
                new += self._detector.update_activations(acts)
            if rows is None and not new:
                return
            adapter = self.adapter
            event = Flush(step=adapter.step, table=table, batch=batch, rows=rows, history=self._history,
                          verdicts=self.verdicts(), structure=adapter.structure, notes=self._all_notes(),
                          monitoring=self.monitoring, report=self._build_report)
        except MonitoringError:
            raise
        except Exception as exc:  # noqa: BLE001 - fail-open
            self.on_error(exc, "flush")
            return
        if rows is not None:
            for r in list(self.reporters):
                self._call(r, "on_flush", event)
        if new:
            for r in list(self.reporters):
                self._call(r, "on_findings", new, event)

    def report(self, *, flush: bool = True) -> Report:
        """Everything seen so far, as a :class:`~gradwatch.Report`. Works after :meth:`detach` too.

        Args:
            flush: Pull the steps still on the device first (reporters pass ``False`` from inside a flush).
                Defaults to ``True``.
        """
        if flush and not self._detached:
            self.flush()
        return self._build_report()

    def detach(self) -> None:
        """Remove every hook and wrapper, print the summary (console reporter), close reporters. Repeatable."""
        if self._detached:
            return
        self.flush()
        self._detached = True
        try:
            self.adapter.detach()
        finally:
            model = self._model_ref()
            if model is not None and _ATTACHED.get(model) is self:
                del _ATTACHED[model]
        report = self._build_report()
        for r in list(self.reporters):
            self._call(r, "on_close", report)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "detached" if self._detached else ("off" if self._error else "attached")
        return f"<gradwatch.Watcher {self.adapter.framework}:{self.adapter.model_type} step={self.step} {state}>"

    # -- internals -----------------------------------------------------------------------------------------

    def _call(self, reporter: Reporter, hook: str, *args) -> None:
        try:
            getattr(reporter, hook)(*args)
        except Exception as exc:  # noqa: BLE001 - a reporter never stops training
            if self.options.strict:
                raise MonitoringError(f"reporter {type(reporter).__name__}.{hook} failed: {exc}") from exc
            warnings.warn(f"gradwatch dropped reporter {type(reporter).__name__} after an error in {hook} "
                          f"({type(exc).__name__}: {exc}); training goes on.", RuntimeWarning, stacklevel=3)
            if reporter in self.reporters:
                self.reporters.remove(reporter)

    def _keep_acts(self, acts: ActivationRows) -> None:
        for key in ("saturation", "dead", "rms"):
            arr = getattr(acts, key)
            prev = self._last_acts.get(key)
            last = arr[-1].copy()
            if prev is not None:
                last = np.where(np.isnan(last), prev, last)
            self._last_acts[key] = last
        nonfinite = np.nan_to_num(acts.nonfinite, nan=0.0) > 0
        structure = self.adapter.structure
        for i in range(len(acts.steps)):
            if nonfinite[i].any() and self._detector is not None:
                li = int(np.flatnonzero(nonfinite[i])[0])
                act = structure.layers[li].activation if structure is not None and li < len(structure.layers) \
                    else None
                self._detector.note_activation_nonfinite(int(acts.steps[i]), li, activation=act)

    def _build_report(self) -> Report:
        adapter = self.adapter
        return build_report(framework=adapter.framework, model_type=adapter.model_type, step=adapter.step,
                            history=self._history, verdicts=self.verdicts(), structure=adapter.structure,
                            notes=self._all_notes(), monitoring=self.monitoring)

    def _all_notes(self) -> tuple[str, ...]:
        return tuple(self.adapter.notes()) + tuple(self._notes)


def callback_report(watcher: Watcher | None, last: Report | None, needs: str) -> Report:
    """A training-framework callback's ``report()``: the run in progress, else the last one that ended, else a
    :class:`~gradwatch.errors.WatcherStateError` saying what is needed first (``needs``)."""
    if watcher is not None and watcher.active:
        return watcher.report()
    if last is not None:
        return last
    from gradwatch.errors import WatcherStateError

    raise WatcherStateError(needs)
