"""The options every front end takes (``attach()``, ``KerasCallback``, the training-framework callbacks), parsed
and checked in one place, so no front end can drop or misread one."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch.core.checks import Thresholds
from gradwatch.reporters import REPORTER_NAMES, Reporter

__all__ = ["WatchOptions"]


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
        thresholds: Detector cut-offs. Defaults to :class:`~gradwatch.Thresholds`'s defaults.
        history: Rows of statistics kept (older ones are merged). Defaults to ``512``.
        log_dir: Directory for an append-only run log that ``gradwatch.load`` reads back. Defaults to ``None``.
        all_ranks: In a multi-process run (DDP, FSDP), report from every process instead of the main one only;
            each rank then writes its run log under ``log_dir/rank-<r>``. Every rank measures and judges either
            way, so ``report()`` works on each. Defaults to ``False``.
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
    all_ranks: bool = False

    ACCEPTED = ("reporters", "every", "flush_every", "update_every", "activation_every", "strict", "thresholds",
                "history", "log_dir", "all_ranks")

    @classmethod
    def parse(cls, options: dict[str, Any], *, extra: Sequence[str] = (), caller: str = "attach()") -> WatchOptions:
        unknown = sorted(set(options) - set(cls.ACCEPTED) - set(extra))
        if unknown:
            accepted = ", ".join(list(cls.ACCEPTED) + list(extra))
            raise TypeError(f"{caller} got unknown option(s) {', '.join(map(repr, unknown))}; accepted: {accepted}.")
        kw = {k: v for k, v in options.items() if k in cls.ACCEPTED}
        return cls(**kw)

    def replace(self, **changes: Any) -> WatchOptions:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The options as plain values (what reporters and run logs record)."""
        return {"every": self.every, "flush_every": self.flush_every, "update_every": self.update_every,
                "activation_every": self.activation_every, "strict": self.strict, "history": self.history,
                "log_dir": self.log_dir, "all_ranks": self.all_ranks}

    def __post_init__(self) -> None:
        _positive_int("every", self.every)
        _positive_int("flush_every", self.flush_every)
        _positive_int("update_every", self.update_every)
        _positive_int("activation_every", self.activation_every, minimum=0)
        _positive_int("history", self.history, minimum=8)
        for flag in ("strict", "all_ranks"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, received {flag}={getattr(self, flag)!r}")
        if self.thresholds is not None and not isinstance(self.thresholds, Thresholds):
            raise TypeError("thresholds must be a gradwatch.Thresholds or None, received "
                            f"{type(self.thresholds).__name__}")
        if self.log_dir is not None and not isinstance(self.log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike) or None, received {self.log_dir!r}")
        reporters = self.reporters
        if isinstance(reporters, (str, Reporter)) or not isinstance(reporters, (list, tuple)):
            raise TypeError("reporters must be a list such as ['console'] or ['console', 'wandb'] (or [] for "
                            f"silence), received reporters={reporters!r}")
        names = ", ".join(map(repr, REPORTER_NAMES))
        for r in reporters:
            if isinstance(r, str):
                if r not in REPORTER_NAMES:
                    raise ValueError(f"unknown reporter {r!r}; accepted names: {names}, or a gradwatch.Reporter "
                                     "instance")
            elif not isinstance(r, Reporter):
                raise TypeError(f"reporters must hold {names} or gradwatch.Reporter instances, received "
                                f"{type(r).__name__}")
        object.__setattr__(self, "reporters", tuple(reporters))
        if self.log_dir is not None:
            object.__setattr__(self, "log_dir", os.fspath(self.log_dir))
