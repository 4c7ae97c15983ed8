"""The adapter protocol: what every framework adapter declares and provides to the watcher.

An adapter turns framework tensors into :class:`~gradwatch.core.stats.StepBatch` records and a neutral
:class:`~gradwatch.core.structure.Structure`, nothing more: judging and reporting happen in the core.

Every front end (``attach()``, ``KerasCallback``, the training-framework callbacks) makes its adapter the same
way, ``cls.create(sink, model, optimizer, options)`` with the one parsed :class:`~gradwatch.options.WatchOptions`,
so an option cannot be dropped by one front end and kept by another.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from gradwatch.core.stats import ActivationRows, ParamTable, StepBatch
from gradwatch.core.structure import Structure

if TYPE_CHECKING:
    from gradwatch.options import WatchOptions

__all__ = ["Adapter", "Sink", "keras2_message"]

#: ``.on`` in a thread of gradwatch's own that traces ahead of a step (``keras._TraceAhead``): a guarded hook that
#: fails there raises, abandoning that trace, instead of turning monitoring off from the thread; the step's own
#: trace, on the training thread, meets the error again and reports it.
AHEAD = threading.local()


class Sink(Protocol):
    """The watcher, as an adapter sees it."""

    def on_step(self, step: int) -> None:
        """A training step is complete (called once per step, cheaply)."""

    def on_error(self, exc: BaseException, where: str) -> None:
        """An internal failure inside a hook: warn once and stop, or raise under ``strict``."""


class Adapter(ABC):
    """Collects gradient statistics of one model on its device and hands them over on :meth:`drain`.

    A subclass declares ``framework`` and ``module`` (the framework's top-level module, which must already be in
    ``sys.modules`` for it to be tried), the ``attach()`` options it takes beyond
    :class:`~gradwatch.options.WatchOptions` in ``extra_options``, and implements :meth:`accepts` and
    :meth:`create`. Every option of ``WatchOptions`` that concerns collection (``every``, ``update_every``,
    ``activation_every``) must be honoured by :meth:`create`.
    """

    framework: ClassVar[str] = ""
    module: ClassVar[str] = ""
    extra_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    @classmethod
    @abstractmethod
    def accepts(cls, model: Any) -> bool:
        """Whether this adapter watches ``model`` (imports nothing: the framework is in ``sys.modules``)."""

    @classmethod
    @abstractmethod
    def create(cls, sink: Sink, model: Any, optimizer: Any, options: WatchOptions, **extra: Any) -> Adapter:
        """The adapter for ``model``, installed and collecting.

        Args:
            sink: The watcher.
            model: The model, already accepted by :meth:`accepts`.
            optimizer: What the user passed as the optimizer (``None`` if nothing).
            options: The watch's parsed options.
            **extra: The values of ``extra_options`` the user gave, and front-end internals.
        """

    @property
    @abstractmethod
    def model_type(self) -> str:
        """The model's class name."""

    # Subclasses fill these as they learn the model; the properties below read them.
    _table: ParamTable | None = None
    _structure: Structure | None = None
    _step: int = 0
    _notes: list[str]

    @property
    def table(self) -> ParamTable | None:
        """The watched parameters, or ``None`` until known (a model whose first forward has not run)."""
        return self._table

    @property
    def structure(self) -> Structure | None:
        """The model's structure, or ``None`` until known."""
        return self._structure

    @property
    def step(self) -> int:
        """Training steps seen so far."""
        return self._step

    @abstractmethod
    def drain(self) -> tuple[StepBatch | None, ActivationRows | None]:
        """Pull everything collected since the last drain to the host (one transfer) and reset."""

    @abstractmethod
    def detach(self) -> None:
        """Remove every hook and wrapper. Repeatable."""

    def log_loss(self, loss: Any) -> None:  # noqa: B027 - a hook with a do-nothing default, not abstract
        """Keep the training loss of the step in progress (for the loss check). Adapters that read it themselves
        (Keras, from ``fit()``'s logs) ignore it."""

    @classmethod
    def process_rank(cls) -> tuple[int, int]:
        """``(rank, world_size)`` of this process in a multi-process run; ``(0, 1)`` when there is none. Read from
        the launcher's ``RANK``/``WORLD_SIZE`` here; adapters ask their framework first."""
        try:
            return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            return 0, 1

    def notes(self) -> tuple[str, ...]:
        """Caveats for the report: what this adapter could not measure, and why."""
        return tuple(getattr(self, "_notes", ()))

    def guard(self, fn: Callable, where: str) -> Callable:
        """Wrap a hook so that an internal error goes to the sink instead of the user's training."""
        sink = self.sink

        def guarded(*args, **kwargs):
            if not self.active:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - fail-open is the point
                if getattr(AHEAD, "on", False):
                    raise
                sink.on_error(exc, where)
            return None

        guarded.__name__ = f"gradwatch_{where}"
        return guarded

    active: bool = True


def keras2_message(model: Any) -> str | None:
    """What to tell a user who passed a Keras 2 model (``tf_keras``, or ``tf.keras`` under
    ``TF_USE_LEGACY_KERAS=1``), or ``None`` for anything else."""
    keras2 = ("tf_keras.", "keras.engine.", "keras.src.engine.")
    if not any(c.__module__.startswith(keras2) for c in type(model).__mro__):
        return None
    return (f"{type(model).__module__}.{type(model).__name__} is a Keras 2 model (tf_keras, or tf.keras with "
            "TF_USE_LEGACY_KERAS=1); gradwatch watches Keras 3 models. Build it with `import keras` (Keras 3, "
            "keras>=3.0) and unset TF_USE_LEGACY_KERAS, or watch a PyTorch model.")
