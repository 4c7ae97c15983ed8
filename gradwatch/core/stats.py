"""Framework-neutral gradient statistics: what an adapter hands over, and the bounded history that keeps it.

An adapter keeps its statistics on the device and hands them over every ``flush_every`` steps as one
:class:`StepBatch`: per parameter tensor and per collected step, the gradient L2 norm, the largest
``|g|``, the number of non-finite gradient values, and (on the steps where it is measured) the weight norm
and the norm of the update the optimizer applied. Layer figures are derived from these, so per-parameter
detail (weight vs bias) stays available.

:class:`History` keeps the most recent steps at full resolution and merges older ones pairwise, so its memory
stays bounded however long training runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DEAD_UNIT_SAMPLES", "PROFILE_KINDS", "SATURATION_MARGIN", "STAT_NAMES", "TIME_EDGE_DIVISOR",
           "TYPICAL_UPDATE_RATIO", "ActivationRows", "History", "LayerRows", "ParamTable", "StepBatch", "param_role",
           "time_decades"]

#: The per-parameter statistics, in the order of ``StepBatch.values``'s last axis.
STAT_NAMES = ("grad_norm", "grad_max", "nonfinite", "weight_norm", "update_norm")
GRAD_NORM, GRAD_MAX, NONFINITE, WEIGHT_NORM, UPDATE_NORM = range(len(STAT_NAMES))

#: A sigmoid or tanh output within this distance of an asymptote (0 or 1; -1 or 1) counts as saturated: both
#: adapters measure saturation with this cut (sigmoid's derivative there is below 4% of its peak, tanh's 2%).
SATURATION_MARGIN = 0.01
#: The gradient through time is compared between the first and the last ``1/TIME_EDGE_DIVISOR`` of the time
#: steps (each edge averaged, at least one step), so one noisy step does not decide it.
TIME_EDGE_DIVISOR = 10
#: A ReLU unit is dead when it stayed at zero on every input of each of the last this-many sampled batches (so
#: its incoming weights got no gradient from any of them), not merely on one batch: a unit that fires for some
#: inputs is alive even if one batch holds none of them. Until that many batches were sampled it is not judged.
DEAD_UNIT_SAMPLES = 3
#: A steady per-step update ratio ``||dw||/||w||`` (Karpathy, CS231n notes: "somewhere around 1e-3").
TYPICAL_UPDATE_RATIO = 1e-3
#: Layer kinds whose gradients take part in the depth profile. Embedding tables receive gradients only in
#: the rows a batch uses and normalization gains scale differently, so neither is compared with the rest.
PROFILE_KINDS = frozenset({"dense", "conv", "recurrent", "attention"})


def param_role(short_name: str, ndim: int) -> str:
    """``"bias"``, ``"weight"`` or the parameter's own short name: the role shown per parameter in reports.

    Example:
        >>> param_role("bias", 1), param_role("kernel", 2), param_role("gamma", 1)
        ('bias', 'weight', 'gamma')
    """
    if "bias" in short_name:
        return "bias"
    if "weight" in short_name or ndim >= 2:
        return "weight"
    return short_name


def time_decades(per_step: np.ndarray) -> float:
    """log10 of the gradient norm at the last time steps over that at the first (see :data:`TIME_EDGE_DIVISOR`):
    positive when the gradient fades toward the start of the sequence; ``inf`` when nothing reaches the start,
    NaN for fewer than 4 steps or no gradient at all. The Keras adapter computes the same in its graph.

    Example:
        >>> round(time_decades(np.logspace(-3, 0, 20)), 2)
        2.84
    """
    g = np.asarray(per_step, dtype=np.float64)
    if len(g) < 4:
        return math.nan
    edge = max(1, len(g) // TIME_EDGE_DIVISOR)
    last, first = float(np.mean(g[-edge:])), float(np.mean(g[:edge]))
    if first > 0 and last > 0:
        return math.log10(last / first)
    return math.inf if last > 0 else math.nan


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamTable:
    """The watched parameter tensors, grouped by layer in input-to-output order.

    Args:
        layer_names: The user's own layer names, input to output.
        layer_types: The layer class names (``"Linear"``, ``"Dense"``, ...).
        param_names: Qualified parameter names, grouped by layer.
        param_layer: For each parameter, the index of its layer in ``layer_names``.
        param_roles: ``"weight"``, ``"bias"`` or another short role per parameter.
        param_numel: Element count per parameter.
        param_shapes: Shape per parameter.
        param_trainable: Whether the parameter was trainable when the table was built.
        profile: Per layer, whether it takes part in the depth profile (weight-bearing layers: dense,
            convolution, recurrent, attention; not embeddings or normalization).
    """

    layer_names: tuple[str, ...]
    layer_types: tuple[str, ...]
    param_names: tuple[str, ...]
    param_layer: tuple[int, ...]
    param_roles: tuple[str, ...]
    param_numel: tuple[int, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    param_trainable: tuple[bool, ...]
    profile: tuple[bool, ...]
    layer_starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.param_names)
        lengths = {len(self.param_layer), len(self.param_roles), len(self.param_numel),
                   len(self.param_shapes), len(self.param_trainable)}
        if lengths != {n}:
            raise ValueError(f"ParamTable fields must all have {n} entries, got lengths {sorted(lengths)}")
        if len(self.layer_types) != len(self.layer_names) or len(self.profile) != len(self.layer_names):
            raise ValueError("ParamTable: layer_types and profile must have one entry per layer")
        layers = np.asarray(self.param_layer, dtype=np.int64)
        if n and (np.any(np.diff(layers) < 0) or set(layers.tolist()) != set(range(len(self.layer_names)))):
            raise ValueError("ParamTable: parameters must be grouped by layer in layer order, every layer owning one")
        starts = np.flatnonzero(np.r_[True, np.diff(layers) != 0]) if n else np.zeros(0, dtype=np.int64)
        object.__setattr__(self, "layer_starts", starts)

    @classmethod
    def build(cls, layers: Sequence[tuple[str, str, str, Sequence[tuple[str, str, tuple[int, ...], bool]]]]
              ) -> ParamTable:
        """The table for ``layers``, input to output: each ``(name, type, kind, params)`` with ``params`` as
        ``(qualified name, short name, shape, trainable)``. Both adapters build their table with this.

        Example:
            >>> t = ParamTable.build([("fc", "Linear", "dense", [("fc.weight", "weight", (2, 3), True),
            ...                                                   ("fc.bias", "bias", (2,), True)])])
            >>> t.param_roles, t.param_numel, t.profile
            (('weight', 'bias'), (6, 2), (True,))
        """
        names, types, profile = [], [], []
        pnames, players, roles, numel, shapes, trainable = [], [], [], [], [], []
        for li, (name, type_, kind, params) in enumerate(layers):
            names.append(name)
            types.append(type_)
            profile.append(kind in PROFILE_KINDS)
            for qual, short, shape, train in params:
                shape = tuple(int(s) for s in shape)
                pnames.append(qual)
                players.append(li)
                roles.append(param_role(short, len(shape)))
                numel.append(math.prod(shape))
                shapes.append(shape)
                trainable.append(bool(train))
        return cls(layer_names=tuple(names), layer_types=tuple(types), param_names=tuple(pnames),
                   param_layer=tuple(players), param_roles=tuple(roles), param_numel=tuple(numel),
                   param_shapes=tuple(shapes), param_trainable=tuple(trainable), profile=tuple(profile))

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    @property
    def layer_trainable(self) -> tuple[bool, ...]:
        """Per layer, whether it holds a trainable parameter."""
        flags = [False] * self.n_layers
        for li, trainable in zip(self.param_layer, self.param_trainable):
            flags[li] |= trainable
        return tuple(flags)

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def to_dict(self) -> dict:
        return {
            "layer_names": list(self.layer_names), "layer_types": list(self.layer_types),
            "param_names": list(self.param_names), "param_layer": list(self.param_layer),
            "param_roles": list(self.param_roles), "param_numel": list(self.param_numel),
            "param_shapes": [list(s) for s in self.param_shapes],
            "param_trainable": list(self.param_trainable), "profile": list(self.profile),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ParamTable:
        return cls(
            layer_names=tuple(d["layer_names"]), layer_types=tuple(d["layer_types"]),
            param_names=tuple(d["param_names"]), param_layer=tuple(d["param_layer"]),
            param_roles=tuple(d["param_roles"]), param_numel=tuple(d["param_numel"]),
            param_shapes=tuple(tuple(s) for s in d["param_shapes"]),
            param_trainable=tuple(d["param_trainable"]), profile=tuple(d["profile"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StepBatch:
    """Statistics of consecutive collected steps, pulled from the device in one transfer.

    Args:
        steps: Training step of each row (1-based), shape ``(n,)``.
        values: Shape ``(n, n_params, 5)`` in :data:`STAT_NAMES` order. A parameter without a gradient on a
            step has NaN gradient figures; weight and update norms are NaN where not measured.
        skipped: Per row, ``True`` where a loss scaler skipped the step for an overflow (AMP).
        extras: Optional per-row series such as ``"loss"`` or ``"loss_scale"``, shape ``(n,)``.
    """

    steps: np.ndarray
    values: np.ndarray
    skipped: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.steps)
        if self.values.ndim != 3 or self.values.shape[0] != n or self.values.shape[2] != len(STAT_NAMES):
            raise ValueError(f"StepBatch.values must have shape (n_steps, n_params, {len(STAT_NAMES)}), "
                             f"got {self.values.shape} for {n} steps")
        if self.skipped.shape != (n,):
            raise ValueError(f"StepBatch.skipped must have shape ({n},), got {self.skipped.shape}")

    def __len__(self) -> int:
        return len(self.steps)

    def layers(self, table: ParamTable) -> LayerRows:
        """Aggregate the per-parameter rows to layers."""
        return LayerRows.from_values(self.steps, self.values, table, self.skipped, self.extras.get("loss"))


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerRows:
    """Per-layer statistics over rows (steps or merged groups of steps), all shape ``(n_rows, n_layers)``.

    ``grad_rms`` is the root mean square over every gradient element the layer received; ``update_ratio`` is
    ``||delta w|| / ||w||`` over the layer's parameters; ``present`` says whether the layer had any gradient;
    ``nonfinite_measured`` (per row) whether non-finite values were counted on that step; ``loss`` (per row, or
    ``None``) the training loss where the user logged it (:meth:`gradwatch.Watcher.log_loss`, the Keras logs).
    """

    steps: np.ndarray
    grad_norm: np.ndarray
    grad_rms: np.ndarray
    grad_max: np.ndarray
    nonfinite: np.ndarray
    weight_norm: np.ndarray
    update_ratio: np.ndarray
    present: np.ndarray
    skipped: np.ndarray
    nonfinite_measured: np.ndarray
    loss: np.ndarray | None = None

    @classmethod
    def from_values(cls, steps: np.ndarray, values: np.ndarray, table: ParamTable,
                    skipped: np.ndarray, loss: np.ndarray | None = None) -> LayerRows:
        v = values.astype(np.float64, copy=False)
        starts = table.layer_starts
        numel = np.asarray(table.param_numel, dtype=np.float64)
        gn = v[..., GRAD_NORM]
        present_p = ~np.isnan(gn)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            sq = np.where(present_p, gn * gn, 0.0)
            layer_sq = np.add.reduceat(sq, starts, axis=1)
            layer_numel = np.add.reduceat(present_p * numel, starts, axis=1)
            present = layer_numel > 0
            grad_norm = np.where(present, np.sqrt(layer_sq), np.nan)
            grad_rms = np.where(present, np.sqrt(layer_sq / np.maximum(layer_numel, 1.0)), np.nan)
            grad_max = np.fmax.reduceat(v[..., GRAD_MAX], starts, axis=1)
            nonfinite = np.add.reduceat(np.nan_to_num(v[..., NONFINITE], nan=0.0), starts, axis=1)
            nonfinite_measured = (~np.isnan(v[..., NONFINITE]) & present_p).any(axis=1)
            wn = v[..., WEIGHT_NORM]
            un = v[..., UPDATE_NORM]
            measured = ~np.isnan(un) & ~np.isnan(wn)
            w_sq = np.add.reduceat(np.where(measured, wn * wn, 0.0), starts, axis=1)
            u_sq = np.add.reduceat(np.where(measured, un * un, 0.0), starts, axis=1)
            any_measured = np.add.reduceat(measured, starts, axis=1) > 0
            update_ratio = np.where(any_measured & (w_sq > 0), np.sqrt(u_sq) / np.sqrt(w_sq), np.nan)
            all_w = np.add.reduceat(np.nan_to_num(wn * wn, nan=0.0), starts, axis=1)
            weight_norm = np.where(np.add.reduceat(~np.isnan(wn), starts, axis=1) > 0, np.sqrt(all_w), np.nan)
        return cls(steps=np.asarray(steps), grad_norm=grad_norm, grad_rms=grad_rms, grad_max=grad_max,
                   nonfinite=nonfinite, weight_norm=weight_norm, update_ratio=update_ratio, present=present,
                   skipped=np.asarray(skipped, dtype=bool), nonfinite_measured=nonfinite_measured,
                   loss=None if loss is None else np.asarray(loss, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationRows:
    """Sampled forward statistics per layer, shape ``(n_rows, n_layers)``; NaN where not applicable.

    ``saturation``: fraction of outputs of a sigmoid/tanh within :data:`SATURATION_MARGIN` of its asymptotes.
    ``dead``: fraction of ReLU units that stayed zero on every input of the last :data:`DEAD_UNIT_SAMPLES`
    sampled batches (NaN until that many were sampled). ``rms``: RMS of the layer's activation
    output. ``time_decades`` is, for recurrent layers, :func:`time_decades` of the gradient reaching each time
    step's input (positive: it vanishes toward the start of the sequence).
    """

    steps: np.ndarray
    saturation: np.ndarray
    dead: np.ndarray
    rms: np.ndarray
    nonfinite: np.ndarray
    time_decades: np.ndarray


class History:
    """Bounded record of every flushed step.

    The newest steps stay at full resolution. When ``capacity`` rows are held, the older half is merged
    pairwise (norms as root mean square over time, maxima as maxima, non-finite counts summed), so each row
    then stands for twice as many steps as before and memory never exceeds ``capacity`` rows.

    Args:
        table: The parameter table the rows refer to.
        capacity: Rows kept at most. Defaults to ``512``.
    """

    def __init__(self, table: ParamTable, *, capacity: int = 512) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 8:
            raise ValueError(f"History capacity must be an int >= 8, received capacity={capacity!r}")
        self.table = table
        self.capacity = capacity
        p = table.n_params
        self._values = np.full((capacity, p, len(STAT_NAMES)), np.nan, dtype=np.float32)
        self._steps = np.zeros(capacity, dtype=np.int64)
        self._span = np.zeros(capacity, dtype=np.int64)  # how many collected steps a row stands for
        self._skipped = np.zeros(capacity, dtype=np.int64)
        self._extras: dict[str, np.ndarray] = {}
        self._n = 0
        self.total_steps = 0
        self.total_skipped = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return int(self._values.nbytes + self._steps.nbytes * 3
                   + sum(a.nbytes for a in self._extras.values()))

    def extend(self, batch: StepBatch) -> None:
        for start in range(0, len(batch), max(1, self.capacity // 2)):
            self._extend(batch, slice(start, start + max(1, self.capacity // 2)))

    def _extend(self, batch: StepBatch, sl: slice) -> None:
        steps = batch.steps[sl]
        k = len(steps)
        if k == 0:
            return
        while self._n + k > self.capacity:
            before = self._n
            self._coarsen()
            if self._n == before:
                raise RuntimeError(f"History cannot make room for {k} rows at capacity {self.capacity}")
        i = self._n
        with np.errstate(over="ignore"):
            self._values[i:i + k] = batch.values[sl]
        self._steps[i:i + k] = steps
        self._span[i:i + k] = 1
        self._skipped[i:i + k] = batch.skipped[sl]
        for name, series in batch.extras.items():
            arr = self._extras.setdefault(name, np.full(self.capacity, np.nan, dtype=np.float64))
            arr[i:i + k] = series[sl]
        self._n += k
        self.total_steps += k
        self.total_skipped += int(np.count_nonzero(batch.skipped[sl]))

    def _coarsen(self) -> None:
        half = (self._n // 2) & ~1
        if half < 2:
            return
        a, b = slice(0, half, 2), slice(1, half, 2)
        va, vb = self._values[a].astype(np.float64), self._values[b].astype(np.float64)
        # Each side weighs as many steps as it already stands for, so a row is the RMS over all of its steps.
        wa, wb = self._span[a].astype(np.float64), self._span[b].astype(np.float64)
        merged = np.empty_like(va)
        with np.errstate(over="ignore", invalid="ignore"):
            for s in (GRAD_NORM, UPDATE_NORM):
                merged[..., s] = _rms_pair(va[..., s], vb[..., s], wa[:, None], wb[:, None])
            merged[..., GRAD_MAX] = np.fmax(va[..., GRAD_MAX], vb[..., GRAD_MAX])
            merged[..., NONFINITE] = np.nansum(np.stack([va[..., NONFINITE], vb[..., NONFINITE]]), axis=0)
            both_nan = np.isnan(va[..., NONFINITE]) & np.isnan(vb[..., NONFINITE])
            merged[..., NONFINITE][both_nan] = np.nan
            merged[..., WEIGHT_NORM] = np.where(np.isnan(vb[..., WEIGHT_NORM]), va[..., WEIGHT_NORM],
                                                vb[..., WEIGHT_NORM])
        m = half // 2
        rest = slice(half, self._n)
        n_rest = self._n - half
        self._values[:m] = merged
        self._values[m:m + n_rest] = self._values[rest].copy()
        self._steps[:m] = self._steps[a]
        self._steps[m:m + n_rest] = self._steps[rest].copy()
        self._span[:m] = self._span[a] + self._span[b]
        self._span[m:m + n_rest] = self._span[rest].copy()
        self._skipped[:m] = self._skipped[a] + self._skipped[b]
        self._skipped[m:m + n_rest] = self._skipped[rest].copy()
        for arr in self._extras.values():
            arr[:m] = _nanmean_pair(arr[a], arr[b], wa, wb)
            arr[m:m + n_rest] = arr[rest].copy()
        self._n = m + n_rest
        self._values[self._n:] = np.nan
        for arr in self._extras.values():
            arr[self._n:] = np.nan

    @property
    def steps(self) -> np.ndarray:
        return self._steps[:self._n].copy()

    @property
    def spans(self) -> np.ndarray:
        return self._span[:self._n].copy()

    @property
    def values(self) -> np.ndarray:
        return self._values[:self._n].astype(np.float64)

    def state(self) -> dict[str, np.ndarray]:
        """The rows held now, as plain arrays (what a run log stores); :meth:`from_state` rebuilds the history."""
        n = self._n
        out = {"values": self._values[:n].copy(), "steps": self._steps[:n].copy(), "span": self._span[:n].copy(),
               "skipped": self._skipped[:n].copy(),
               "totals": np.asarray([self.total_steps, self.total_skipped, self.capacity], dtype=np.int64)}
        out.update({f"extra_{k}": v[:n].copy() for k, v in self._extras.items()})
        return out

    @classmethod
    def from_state(cls, table: ParamTable, state: dict[str, np.ndarray]) -> History:
        total_steps, total_skipped, capacity = (int(x) for x in state["totals"])
        hist = cls(table, capacity=capacity)
        n = len(state["steps"])
        if n > capacity or state["values"].shape[1:] != hist._values.shape[1:]:
            raise ValueError(f"history state of shape {state['values'].shape} does not fit a table of "
                             f"{table.n_params} parameters at capacity {capacity}")
        hist._values[:n] = state["values"]
        hist._steps[:n] = state["steps"]
        hist._span[:n] = state["span"]
        hist._skipped[:n] = state["skipped"]
        for key, arr in state.items():
            if key.startswith("extra_"):
                hist._extras[key[6:]] = np.full(capacity, np.nan)
                hist._extras[key[6:]][:n] = arr
        hist._n = n
        hist.total_steps, hist.total_skipped = total_steps, total_skipped
        return hist

    @property
    def skipped_rows(self) -> np.ndarray:
        """Per row, whether any step it stands for was skipped by a loss scaler."""
        return self._skipped[:self._n] > 0

    def extra(self, name: str) -> np.ndarray | None:
        arr = self._extras.get(name)
        return None if arr is None else arr[:self._n].copy()

    def layers(self) -> LayerRows:
        """Per-layer statistics over the rows held now."""
        return LayerRows.from_values(self.steps, self.values, self.table, self._skipped[:self._n] > 0,
                                     self.extra("loss"))


def _nanmean_pair(a: np.ndarray, b: np.ndarray, wa: np.ndarray | float = 1.0,
                  wb: np.ndarray | float = 1.0) -> np.ndarray:
    """Weighted mean of two arrays, ignoring a NaN on one side; NaN where both are."""
    na, nb = ~np.isnan(a), ~np.isnan(b)
    weight = na * wa + nb * wb
    total = np.nan_to_num(a, nan=0.0, posinf=np.inf) * (na * wa) + np.nan_to_num(b, nan=0.0, posinf=np.inf) * (nb * wb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)


def _rms_pair(a: np.ndarray, b: np.ndarray, wa: np.ndarray | float = 1.0, wb: np.ndarray | float = 1.0) -> np.ndarray:
    """Root mean square of two arrays weighted by the steps each stands for, ignoring a NaN on one side."""
    return np.sqrt(_nanmean_pair(a * a, b * b, wa, wb))
