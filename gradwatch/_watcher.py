"""The Watcher: one per watched model. Counts steps through the adapter's hooks, flushes device stats every
``flush_every`` steps into a bounded history, runs the detector, feeds the reporters, and builds reports."""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from gradwatch.core.detector import ActivationRows, Detector, Thresholds
from gradwatch.core.report import Finding, Report
from gradwatch.core.stats import History, StepBatch
from gradwatch.core.summarize import Verdicts, build_report
from gradwatch.errors import AttachError, MonitoringError
from gradwatch.reporters.base import Reporter

__all__ = ["WatchOptions", "Watcher"]

log = logging.getLogger(__name__)

#: Models watched now, so a second attach raises instead of piling hooks up. Weak: it never keeps a model alive.
_ATTACHED: weakref.WeakKeyDictionary[Any, Watcher] = weakref.WeakKeyDictionary()


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, received {name}={value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, received {name}={value!r}")
    return int(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchOptions:
    """Keyword options of :func:`gradwatch.attach` and :class:`gradwatch.KerasCallback`.

    Args:
        reporters: Where findings and summaries go: ``"console"``, ``"wandb"`` or :class:`Reporter` instances.
            ``[]`` is silent. Defaults to ``("console",)``.
        every: Collect gradient statistics every N training steps. Defaults to ``1``.
        flush_every: Pull statistics from the device and judge them every N steps. Defaults to ``25``.
        update_every: Measure the update ratio ``||dw||/||w||`` every N collected steps (one copy of the
            parameters on those steps). Defaults to ``10``.
        activation_every: Sample activation statistics (saturation, dead units, RNN gradient through time)
            every N steps; ``0`` turns sampling off. Defaults to ``25``.
        strict: Raise :class:`~gradwatch.errors.MonitoringError` on an internal error instead of warning once
            and turning monitoring off. Defaults to ``False``.
        thresholds: Detector cut-offs. Defaults to :class:`~gradwatch.core.detector.Thresholds`'s defaults.
        history: Rows of statistics kept (older ones are merged). Defaults to ``512``.
        log_dir: Directory for an append-only run log that ``gradwatch.load`` reads back. Defaults to ``None``.
    """

    reporters: tuple[Any, ...] = ("console",)
    every: int = 1
    flush_every: int = 25
    update_every: int = 10
    activation_every: int = 25
    strict: bool = False
    thresholds: Thresholds | None = None
    history: int = 512
    log_dir: str | None = None

    ACCEPTED = ("reporters", "every", "flush_every", "update_every", "activation_every", "strict", "thresholds",
                "history", "log_dir")

    @classmethod
    def parse(cls, options: dict[str, Any], *, extra: Sequence[str] = (), caller: str = "attach()") -> WatchOptions:
        unknown = sorted(set(options) - set(cls.ACCEPTED) - set(extra))
        if unknown:
            accepted = ", ".join(list(cls.ACCEPTED) + list(extra))
            raise TypeError(f"{caller} got unknown option(s) {', '.join(map(repr, unknown))}; accepted: {accepted}.")
        kw = {k: v for k, v in options.items() if k in cls.ACCEPTED}
        return cls(**kw)

    def __post_init__(self) -> None:
        _positive_int("every", self.every)
        _positive_int("flush_every", self.flush_every)
        _positive_int("update_every", self.update_every)
        _positive_int("activation_every", self.activation_every, minimum=0)
        _positive_int("history", self.history, minimum=8)
        if not isinstance(self.strict, bool):
            raise TypeError(f"strict must be True or False, received strict={self.strict!r}")
        if self.thresholds is not None and not isinstance(self.thresholds, Thresholds):
            raise TypeError("thresholds must be a gradwatch.Thresholds or None, received "
                            f"{type(self.thresholds).__name__}")
        if self.log_dir is not None and not isinstance(self.log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike) or None, received {self.log_dir!r}")
        reporters = self.reporters
        if isinstance(reporters, (str, Reporter)) or not isinstance(reporters, (list, tuple)):
            raise TypeError("reporters must be a list such as ['console'] or ['console', 'wandb'] (or [] for "
                            f"silence), received reporters={reporters!r}")
        for r in reporters:
            if isinstance(r, str):
                if r not in ("console", "wandb"):
                    raise ValueError(f"unknown reporter {r!r}; accepted names: 'console', 'wandb', or a "
                                     "gradwatch.Reporter instance")
            elif not isinstance(r, Reporter):
                raise TypeError(f"reporters must hold 'console', 'wandb' or gradwatch.Reporter instances, received "
                                f"{type(r).__name__}")
        object.__setattr__(self, "reporters", tuple(reporters))
        if self.log_dir is not None:
            object.__setattr__(self, "log_dir", os.fspath(self.log_dir))


def _make_reporters(options: WatchOptions) -> list[Reporter]:
    out: list[Reporter] = []
    for r in options.reporters:
        if r == "console":
            from gradwatch.reporters.console import ConsoleReporter

            out.append(ConsoleReporter())
        elif r == "wandb":
            from gradwatch.integrations.wandb import WandbReporter

            out.append(WandbReporter())
        else:
            out.append(r)
    if options.log_dir is not None:
        from gradwatch.core.runlog import RunLogWriter

        out.append(RunLogWriter(options.log_dir))
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

    def __init__(self, model: Any, make_adapter, options: WatchOptions) -> None:
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
        self._last_batch: StepBatch | None = None
        self._closing = False
        self.reporters = _make_reporters(options)
        self.adapter = make_adapter(self)
        _ATTACHED[model] = self
        for r in list(self.reporters):
            self._call(r, "on_attach", self)

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

    @property
    def findings(self) -> tuple[Finding, ...]:
        self.flush()
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

    @property
    def last_batch(self) -> StepBatch | None:
        """The per-parameter statistics pulled by the latest flush (what ``on_flush`` reporters were given, before
        aggregation to layers); ``None`` when that flush found no new step."""
        return self._last_batch

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
                plain = None
                if structure is not None and len(structure.layers) == table.n_layers:
                    plain = tuple((la.recurrent_cell or "").startswith("rnn") for la in structure.layers)
                self._detector = Detector(table.layer_names, table.profile, self.options.thresholds,
                                          plain_recurrent=plain)
            new: list[Finding] = []
            rows = None
            self._last_batch = batch if batch is not None and len(batch) else None
            if self._last_batch is not None:
                self._history.extend(batch)
                rows = batch.layers(table)
                new += self._detector.update(rows)
            if acts is not None and len(acts.steps):
                self._keep_acts(acts)
                new += self._detector.update_activations(acts)
        except MonitoringError:
            raise
        except Exception as exc:  # noqa: BLE001 - fail-open
            self.on_error(exc, "flush")
            return
        if rows is not None:
            for r in list(self.reporters):
                self._call(r, "on_flush", self, rows)
        if new:
            for r in list(self.reporters):
                self._call(r, "on_findings", self, new)

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
            self._call(r, "on_close", self, report)

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
        for i in range(len(acts.steps)):
            if nonfinite[i].any() and self._detector is not None:
                self._detector.note_activation_nonfinite(int(acts.steps[i]), int(np.flatnonzero(nonfinite[i])[0]))

    def _build_report(self) -> Report:
        adapter = self.adapter
        return build_report(framework=adapter.framework, model_type=adapter.model_type, step=adapter.step,
                            history=self._history, verdicts=self.verdicts(), structure=adapter.structure,
                            notes=tuple(adapter.notes()), monitoring=self.monitoring)
