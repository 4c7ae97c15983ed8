"""What every check shares: the rows it reads, the ledger of episodes, the hysteresis voter, the base class.

A check is one finding family (as Cockpit's quantities are one class each behind a small base). The detector
hands every check each gradient row and each activation sample; a check reads what it needs and opens,
extends, describes or closes episodes in the shared :class:`Ledger`. Most checks decide through a
:class:`Voter`: a per-layer condition must hold on most of a window before an episode opens, and almost never
before it closes, so findings neither flap nor fire on one noisy step.
"""

from __future__ import annotations

import math
import statistics
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from gradwatch.core.checks.thresholds import Thresholds
from gradwatch.core.stats import ActivationRows, LayerRows

__all__ = ["Check", "CheckContext", "EarlyLate", "Episode", "GradStep", "Ledger", "Voter", "quiet"]


@dataclass(frozen=True, slots=True)
class GradStep:
    """One collected step's per-layer gradient figures (arrays of ``n_layers``), as every check reads them.

    ``finite`` is whether every present gradient was finite (no non-finite value counted, every RMS finite);
    ``skipped`` whether a loss scaler skipped it; ``loss`` the training loss logged for the step (NaN where none
    was); ``index`` its place in the batch of rows the detector is judging (what :meth:`Check.prepare` saw).
    """

    step: int
    rms: np.ndarray
    update_ratio: np.ndarray
    grad_norm: np.ndarray
    grad_max: np.ndarray
    nonfinite: np.ndarray
    present: np.ndarray
    nonfinite_measured: bool
    skipped: bool
    loss: float = math.nan
    finite: bool = True
    index: int = 0

    @staticmethod
    def finite_rows(rows: LayerRows) -> np.ndarray:
        """Per row, whether no non-finite value was counted and every present layer's RMS is finite."""
        with np.errstate(invalid="ignore"):
            return ~(rows.nonfinite > 0).any(axis=1) & (np.isfinite(rows.grad_rms) | ~rows.present).all(axis=1)

    @classmethod
    def each(cls, rows: LayerRows, finite: np.ndarray) -> Iterator[GradStep]:
        """The rows one by one, ``index`` counting from 0 (``finite`` from :meth:`finite_rows`)."""
        rms, present, nonfinite = rows.grad_rms, rows.present, rows.nonfinite
        finite = finite.tolist()
        steps, skipped, measured = rows.steps.tolist(), rows.skipped.tolist(), rows.nonfinite_measured.tolist()
        loss = rows.loss.tolist() if rows.loss is not None else [math.nan] * len(steps)
        for i, step in enumerate(steps):
            yield cls(step=int(step), rms=rms[i], update_ratio=rows.update_ratio[i], grad_norm=rows.grad_norm[i],
                      grad_max=rows.grad_max[i], nonfinite=nonfinite[i], present=present[i],
                      nonfinite_measured=bool(measured[i]), skipped=bool(skipped[i]), loss=float(loss[i]),
                      finite=finite[i], index=i)


@dataclass(slots=True)
class Episode:
    """A finding while it is being judged: opened, extended to more layers, described, closed."""

    kind: str
    check: str
    first_step: int
    last_step: int
    layers: dict[int, int] = field(default_factory=dict)  # layer index -> first step
    evidence: dict = field(default_factory=dict)
    severity: str = "warning"
    message: str = ""
    active: bool = True
    announced: bool = False


class Ledger:
    """Every episode of a watch, at most one open per key (a key is a kind, or a kind with its scope)."""

    def __init__(self) -> None:
        self.episodes: list[Episode] = []
        self._open: dict[str, Episode] = {}
        self._deferred: dict[int, Callable[[], None]] = {}  # id(episode) -> its description, not yet written

    def get(self, key: str) -> Episode | None:
        """The open episode of ``key``, its deferred description (:meth:`defer`) written first."""
        ep = self._open.get(key)
        if ep is not None and self._deferred:
            self.settle(ep)
        return ep

    def peek(self, key: str) -> Episode | None:
        """The open episode of ``key`` as it stands, a deferred description left deferred: for a voter, which
        touches only the episode's layers and whether it is open."""
        return self._open.get(key)

    def defer(self, ep: Episode, describe: Callable[[], None]) -> None:
        """Leave ``ep``'s description (evidence, message, severity) to ``describe``, called when a check next gets
        the episode (:meth:`get`) or at :meth:`settle`; a later deferral of the episode replaces it. Describing a
        large episode costs (a thousand layers in a deep model) and a flush reads only the last description, so
        the check that writes it on every row defers it, with what it would be drawn from on that row."""
        self._deferred[id(ep)] = describe

    def settle(self, ep: Episode | None = None) -> None:
        """Write the deferred description of ``ep`` (of every episode when ``None``)."""
        if ep is None:
            pending, self._deferred = self._deferred, {}
            for describe in pending.values():
                describe()
        elif (describe := self._deferred.pop(id(ep), None)) is not None:
            describe()

    def open(self, key: str, kind: str, check: str, step: int, layers, severity: str = "warning") -> Episode:
        ep = Episode(kind=kind, check=check, first_step=step, last_step=step, severity=severity,
                     layers={int(li): step for li in layers})
        self.episodes.append(ep)
        self._open[key] = ep
        return ep

    def close(self, key: str, step: int) -> None:
        ep = self._open.pop(key, None)
        if ep is not None:
            ep.active = False
            ep.last_step = step

    def announce(self) -> list[Episode]:
        """The episodes not handed out yet, marked as handed out."""
        new = [e for e in self.episodes if not e.announced]
        for e in new:
            e.announced = True
        return new


class Voter:
    """Hysteresis over a window of per-layer flags for one ledger key.

    An episode opens for the layers whose condition held on at least ``on_fraction`` of the window, dated from
    the first vote in which it held, and closes once none of its layers held on more than ``off_fraction``.

    Args:
        ledger: Where the episode lives.
        key: Its ledger key.
        kind: The public finding kind.
        check: The name of the check that votes.
        window: Votes judged over.
        on_fraction: Share of the window that opens an episode.
        off_fraction: Share at or below which it closes.
    """

    def __init__(self, ledger: Ledger, key: str, kind: str, check: str, *, window: int, on_fraction: float,
                 off_fraction: float) -> None:
        self.ledger, self.key, self.kind, self.check = ledger, key, kind, check
        self.votes: deque[tuple[int, np.ndarray, bool]] = deque(maxlen=window)  # (step, flags, any flag set)
        self._count: np.ndarray | None = None  # per layer, how many votes in the window are set
        self._held = 0  # votes in the window with a flag set
        self.on_fraction, self.off_fraction = on_fraction, off_fraction

    def vote(self, step: int, flags: np.ndarray, held: bool | None = None) -> Episode | None:
        """Add one vote; return the episode that is open after it (``None`` when none is, or it just closed).
        ``held`` is ``flags.any()`` where the caller knows it already."""
        votes = self.votes
        held = bool(flags.any()) if held is None else held
        if len(votes) == votes.maxlen:
            _, gone, was_held = votes[0]
            if was_held:
                self._count -= gone
                self._held -= 1
        votes.append((step, flags, held))
        self._held += held
        ep = self.ledger.peek(self.key)
        if not self._held and ep is None:
            return None  # nothing set in the window: every count is 0
        if self._count is None:
            self._count = np.zeros(len(flags), dtype=np.int64)
        if held:
            self._count += flags
        frac = self._count / votes.maxlen
        on = frac >= self.on_fraction
        if ep is None:
            if not on.any():
                return None
            layers = np.flatnonzero(on)
            # The condition has held on most of the window: date the episode from where it started holding.
            first = next(s for s, f, _ in votes if f[layers].any())
            ep = self.ledger.open(self.key, self.kind, self.check, first, layers)
        else:
            held_layers = np.fromiter(ep.layers, dtype=np.int64, count=len(ep.layers))
            joined = on.copy()
            joined[held_layers] = False
            for li in np.flatnonzero(joined).tolist():  # layers that join the open episode, from this step
                ep.layers[li] = step
            if not (frac[held_layers] > self.off_fraction).any() and not (frac[joined] > self.off_fraction).any():
                self.ledger.close(self.key, step)
                return None
        ep.last_step = step
        return ep


class EarlyLate:
    """A series' median over its first ``window`` values against its median over its last ``window``: how far a
    run has moved from where it started, however slowly (the total gradient norm, the loss)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.early: list[float] = []
        self.late: deque[float] = deque(maxlen=window)
        self.seen = 0
        self._baseline: float | None = None  # the first window's median, kept until a value joins it

    def baseline(self) -> float:
        """The median of the first values (NaN before the first)."""
        if self._baseline is None:
            self._baseline = float(statistics.median(self.early)) if self.early else math.nan
        return self._baseline

    def add(self, value: float, *, baseline: bool = True) -> None:
        """Add a value; ``baseline=False`` keeps it out of the first window (a burst must not raise its own
        baseline)."""
        self.seen += 1
        if baseline and len(self.early) < self.window:
            self.early.append(value)
            self._baseline = None
        self.late.append(value)

    def growth(self) -> float:
        """log10 of the last window's median over the first's; NaN until the two windows are full and apart, or
        when either median is not positive."""
        if self.seen < 2 * self.window or not self.early:
            return math.nan
        early, late = self.baseline(), float(statistics.median(self.late))
        return math.log10(late / early) if early > 0 and late > 0 else math.nan


@dataclass(slots=True)
class CheckContext:
    """What the detector shares with its checks.

    Args:
        names: The user's layer names, input to output.
        profile: Per layer, whether it takes part in the depth profile.
        plain_recurrent: Per layer, whether it is a plain (ungated) recurrent layer.
        gated_recurrent: Per layer, whether it is a gated recurrent layer (LSTM, GRU).
        trainable: Per layer, whether it has a trainable parameter.
        roles: Per layer, its role (:func:`~gradwatch.core.structure.role_of`): the same layer in every block.
        adaptive: Whether the optimizer rescales gradients per coordinate (Adam, RMSprop, ...).
        thresholds: The cut-offs.
        ledger: The episodes.
        recent: The last ``window`` finite, applied steps.
    """

    names: tuple[str, ...]
    profile: np.ndarray
    plain_recurrent: np.ndarray
    gated_recurrent: np.ndarray
    trainable: np.ndarray
    roles: tuple[str, ...]
    adaptive: bool
    thresholds: Thresholds
    ledger: Ledger
    recent: deque[GradStep]

    def recent_medians(self, recent: Sequence[GradStep] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Median gradient RMS, update ratio and gradient norm per layer over the recent window (or over
        ``recent``, the window as it was on an earlier row)."""
        n = len(self.names)
        recent = self.recent if recent is None else recent
        if not recent:
            nan = np.full(n, np.nan)
            return nan, nan.copy(), nan.copy()
        # One (steps, 3 * n_layers) array and one columnwise median: the three figures side by side.
        stack = np.array([(r.rms, r.update_ratio, r.grad_norm) for r in recent], dtype=np.float64)
        rms, ur, gn = nanmedian0(stack.reshape(len(stack), 3 * n)).reshape(3, n)
        return rms, ur, gn


class Check:
    """One finding family. Override the hooks it needs; the others do nothing.

    Hooks run in the order of the detector's checks, for every row: :meth:`on_grad` for each collected step
    (skipped and non-finite ones included: a check looks at ``row.skipped`` and ``row.finite``), and
    :meth:`on_activations` for each activation sample whose outputs were all finite.
    """

    #: The check's name, carried by its findings as ``Finding.check``.
    name: ClassVar[str] = ""
    #: The public finding kinds it can raise.
    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: CheckContext) -> None:
        self.ctx = ctx
        self.t = ctx.thresholds
        self.names = ctx.names

    def voter(self, key: str, kind: str, window: int | None = None) -> Voter:
        t = self.t
        return Voter(self.ctx.ledger, key, kind, self.name, window=window or t.window, on_fraction=t.on_fraction,
                     off_fraction=t.off_fraction)

    def prepare(self, rows: LayerRows, finite: np.ndarray) -> None:
        """A batch of collected steps (``finite`` per row, as :attr:`GradStep.finite`), before any of them reaches
        :meth:`on_grad`: what does not depend on the verdicts of earlier rows is computed here for all rows at once
        (numpy over ``(n_rows, n_layers)``) and read back by ``row.index``. On a model of a few layers, per-row
        numpy calls cost more in call overhead than in math."""

    def on_grad(self, row: GradStep) -> None:
        """A collected step's gradients."""

    def on_activations(self, step: int, acts: ActivationRows, i: int) -> None:
        """Row ``i`` of an activation sample (taken at training step ``step``)."""


_QUIET = threading.local()


class quiet:
    """Silence numpy's floating-point warnings (NaN and inf are expected inputs here). Nested uses cost nothing:
    only the outermost enters ``np.errstate`` and ``warnings.catch_warnings`` (about 10 us each time), so the
    detector enters it once per flush and its checks' own ``with quiet()`` are free."""

    __slots__ = ("_outer", "_state", "_w")

    def __enter__(self):
        self._outer = not getattr(_QUIET, "depth", 0)
        _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
        if self._outer:
            self._w = warnings.catch_warnings()
            self._w.__enter__()
            warnings.simplefilter("ignore", RuntimeWarning)
            self._state = np.errstate(all="ignore")
            self._state.__enter__()
        return self

    def __exit__(self, *exc):
        _QUIET.depth -= 1
        if self._outer:
            self._state.__exit__(*exc)
            self._w.__exit__(*exc)


def nanmedian0(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian(a, axis=0)`` (NaN where a column holds no number), without numpy's masked-array path for small
    arrays, which cost a flush about 0.4 ms per call: sorted (NaN last), the middle one or two numbers averaged.

    Example:
        >>> nanmedian0(np.array([[1.0, np.nan, 5.0], [3.0, np.nan, np.nan], [2.0, np.nan, 7.0], [np.inf, 1.0, 6.0]]))
        array([2.5, 1. , 6. ])
    """
    s = np.sort(a, axis=0)
    n = (~np.isnan(s)).sum(axis=0)
    lo, hi = np.maximum(n - 1, 0) // 2, n // 2
    cols = np.arange(a.shape[1])
    with np.errstate(invalid="ignore"):
        med = (s[lo, cols] + s[np.minimum(hi, len(s) - 1), cols]) / 2
    return np.where(n > 0, med, np.nan)


def fmt(x: float) -> str:
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2g}" if x != 0 else "0"


def decades_text(d: float) -> str:
    return "all the way to zero" if not math.isfinite(d) else f"{d:.1f} orders of magnitude"


def span(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} … {names[-1]}"
