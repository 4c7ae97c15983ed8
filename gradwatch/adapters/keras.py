"""Keras 3 adapter (TensorFlow backend): the gradients ``fit()`` really applies, batch by batch.

A Keras callback never sees gradients (keras-team/keras#115). ``fit()`` ends each train step with
``optimizer.apply(grads, trainable_variables)``; an instance-level wrapper of that method, installed before
``fit()`` traces its train function, is traced into the compiled step. It computes per-variable statistics in
the graph (the Python runs once, at trace time) and writes one row per step into a ``tf.Variable`` ring that
the callback reads every ``flush_every`` batches. No extra forward or backward pass.

With a ``LossScaleOptimizer`` the wrapper sits on the inner optimizer, which only sees unscaled gradients of
the steps actually applied. :meth:`KerasAdapter.uninstall` removes the wrapper and resets the cached train
function, so the model saves, reloads and fits again exactly as without gradwatch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.adapters.base import Adapter, Sink
from gradwatch.core.detector import ActivationRows
from gradwatch.core.stats import STAT_NAMES, ParamTable, StepBatch
from gradwatch.core.structure import LayerInfo, Structure
from gradwatch.errors import AttachError

__all__ = ["KerasAdapter"]

_KIND = {"Dense": "dense", "EinsumDense": "dense", "Conv1D": "conv", "Conv2D": "conv", "Conv3D": "conv",
         "Conv1DTranspose": "conv", "Conv2DTranspose": "conv", "DepthwiseConv2D": "conv",
         "SeparableConv2D": "conv", "SimpleRNN": "recurrent", "LSTM": "recurrent", "GRU": "recurrent",
         "MultiHeadAttention": "attention", "Embedding": "embedding", "BatchNormalization": "norm",
         "LayerNormalization": "norm", "GroupNormalization": "norm", "UnitNormalization": "norm",
         "RMSNormalization": "norm"}
_ACT_LAYERS = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "PReLU": "prelu", "ELU": "elu", "Softmax": "softmax"}
_TRANSPARENT = {"Dropout", "Flatten", "Reshape", "MaxPooling1D", "MaxPooling2D", "AveragePooling2D",
                "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "SpatialDropout2D",
                "InputLayer"}
_RING = 256  # rows the device ring holds; the callback flushes long before it wraps


def _act_name(fn: Any) -> str | None:
    if fn is None:
        return None
    name = getattr(fn, "__name__", None) or type(fn).__name__
    name = name.lower()
    return None if name == "linear" else name


def _leaves(layer) -> list:
    import keras

    out = []
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        if isinstance(sub, keras.Model):
            out.extend(_leaves(sub))
        else:
            out.append(sub)
    return out


class KerasAdapter(Adapter):
    """Watches one compiled ``keras.Model``.

    Args:
        sink: The watcher.
        model: The model. It must be compiled before training starts (the optimizer is read then).
        update_every: Measure the update ratio every N steps (one copy of the weights on those steps).
    """

    framework = "keras"

    def __init__(self, sink: Sink, model: Any, *, update_every: int = 10) -> None:
        super().__init__(sink)
        import keras

        if not isinstance(model, keras.Model):
            raise TypeError(f"KerasAdapter needs a keras.Model, received {type(model).__name__}")
        self.model = model
        self.update_every = update_every
        self._table: ParamTable | None = None
        self._structure: Structure | None = None
        self._step = 0
        self._installed_on: Any = None
        self._outer: Any = None
        self._read_applied = 0
        self._acc = None
        self._count = None
        self._notes: list[str] = []

    @property
    def model_type(self) -> str:
        return type(self.model).__name__

    # -- install -------------------------------------------------------------------------------------------

    def install(self) -> None:
        """Wrap the optimizer's ``apply`` (before ``fit()`` traces) and build the table. Idempotent."""
        import keras
        import tensorflow as tf

        model = self.model
        opt = getattr(model, "optimizer", None)
        if opt is None:
            raise AttachError(f"{type(model).__name__} is not compiled: call model.compile(optimizer=..., loss=...) "
                              "before fit() so gradwatch can watch the optimizer's gradients.")
        if not model.built:
            raise AttachError(f"{type(model).__name__} is not built yet: build it (call it on data, or give it an "
                              "Input) before fit().")
        inner = getattr(opt, "inner_optimizer", opt)  # LossScaleOptimizer: unscaled gradients, applied steps only
        if self._installed_on is inner and "apply" in inner.__dict__:
            return
        outer = opt if inner is not opt else None
        self._build_table()
        p = self._table.n_params
        strategy = model.distribute_strategy
        with strategy.scope():
            agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
            self._acc = tf.Variable(tf.fill([_RING, p, len(STAT_NAMES)], float("nan")), trainable=False,
                                    aggregation=agg, synchronization=tf.VariableSynchronization.ON_WRITE,
                                    name="gradwatch_stats")
            self._count = tf.Variable(tf.constant(self._read_applied, tf.int64), trainable=False, aggregation=agg,
                                      name="gradwatch_count")
            # The training step of each ring row, and (with a LossScaleOptimizer, which skips the inner apply on
            # overflow) every step the outer optimizer saw, so skipped steps are known and numbered truthfully.
            self._step_ring = tf.Variable(tf.zeros([_RING], tf.int64), trainable=False, aggregation=agg,
                                          name="gradwatch_steps")
            self._total = tf.Variable(tf.constant(self._step, tf.int64), trainable=False, aggregation=agg,
                                      name="gradwatch_total")
        index = {id(v): i for i, v in enumerate(self._vars)}
        acc, count, every = self._acc, self._count, self.update_every
        step_ring, total = self._step_ring, self._total
        original = type(inner).apply
        nan = float("nan")

        def apply(grads, trainable_variables=None):
            variables = list(trainable_variables) if trainable_variables is not None else \
                list(inner._trainable_variables)
            grads = list(grads)
            pos = [index.get(id(getattr(v, "_gradwatch_source", v))) for v in variables]
            # Under a distribution strategy, apply() runs per replica on the replica's own gradients; the optimizer
            # sums them later. Judge the summed gradient, once: one extra all-reduce on gradwatch's account.
            ctx = tf.distribute.get_replica_context()
            replicas = ctx.num_replicas_in_sync if ctx is not None else 1
            stat_grads = grads
            if replicas > 1:
                present = [k for k, g in enumerate(grads) if g is not None]
                dense = [tf.convert_to_tensor(grads[k]) for k in present]
                summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, dense)
                stat_grads = [None] * len(grads)
                for k, g in zip(present, summed):
                    stat_grads[k] = g
            cols_g: list[Any] = [None] * p
            for g, v, i in zip(stat_grads, variables, pos):
                if i is None or g is None:
                    continue
                if isinstance(g, tf.IndexedSlices):
                    g = g.values
                g = tf.cast(g, tf.float32)
                finite = tf.math.is_finite(g)
                cols_g[i] = (tf.norm(tf.reshape(g, [-1])), tf.reduce_max(tf.abs(g)),
                             tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.float32)))
            # Update ratios every `every` steps: the weight copy and both norms run only on those steps. (The
            # copy's placeholder on other steps keeps the weight's shape: XLA wants both branches alike.)
            measure = tf.equal(count % every, 0)
            watched = [(v, i) for v, i in zip(variables, pos) if i is not None]
            before = [tf.cond(measure, lambda v=v: tf.identity(tf.cast(v, tf.float32)),
                              lambda v=v: tf.zeros(tf.shape(v), tf.float32)) for v, _ in watched]
            result = original(inner, grads, trainable_variables)
            rows = []
            nan_t = tf.constant(nan, tf.float32)

            def norms():
                return tf.stack([tf.stack([tf.norm(tf.reshape(b, [-1])),
                                           tf.norm(tf.reshape(tf.cast(v, tf.float32) - b, [-1]))])
                                 for (v, _), b in zip(watched, before)])

            measured = tf.cond(measure, norms, lambda: tf.fill([len(watched), 2], nan_t)) if watched else None
            wcols: list[Any] = [(nan_t, nan_t)] * p
            for k, (_, i) in enumerate(watched):
                wcols[i] = (measured[k, 0], measured[k, 1])
            for i in range(p):
                g = cols_g[i] if cols_g[i] is not None else (nan_t, nan_t, nan_t)
                rows.append(tf.stack([g[0], g[1], g[2], wcols[i][0], wcols[i][1]]))
            row = tf.stack(rows)
            slot = [[count % _RING]]
            step_id = total if outer is not None else count + 1
            if replicas > 1:  # mirrored variables take no scatter in a replica context; assign the whole ring
                acc.assign(tf.tensor_scatter_nd_update(acc, slot, [row]))
                step_ring.assign(tf.tensor_scatter_nd_update(step_ring, slot, [step_id]))
            else:
                acc.scatter_nd_update(slot, [row])
                step_ring.scatter_nd_update(slot, [step_id])
            count.assign_add(1)
            if outer is None:
                total.assign_add(1)
            return result

        apply.__gradwatch__ = True  # type: ignore[attr-defined]
        inner.apply = apply
        if outer is not None:
            outer_original = type(outer).apply

            def outer_apply(grads, trainable_variables=None):
                total.assign_add(1)  # every step, applied or skipped for overflow
                return outer_original(outer, grads, trainable_variables)

            outer_apply.__gradwatch__ = True  # type: ignore[attr-defined]
            outer.apply = outer_apply
        self._outer = outer
        self._installed_on = inner
        # fit() makes its train function before on_train_begin: re-make it so the traced step holds the wrapper.
        if getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)

    def uninstall(self) -> None:
        for opt in (self._installed_on, self._outer):
            if opt is not None and getattr(opt.__dict__.get("apply"), "__gradwatch__", False):
                del opt.__dict__["apply"]
                self.model.train_function = None  # drop the traced step that holds the wrapper
        self._installed_on = self._outer = None

    def detach(self) -> None:
        self.active = False
        self.uninstall()

    # -- table and structure -------------------------------------------------------------------------------

    def _build_table(self) -> None:
        model = self.model
        owned: dict[int, str] = {}
        layers = []
        for layer in _leaves(model):
            all_vars = [v for v in layer.weights if id(v) not in owned]
            for v in all_vars:
                owned[id(v)] = layer.name
            layers.append((layer, all_vars))
        trainable_ids = {id(v) for v in model.trainable_variables}
        names, types, profile = [], [], []
        pnames, players, roles, numel, shapes, trainable = [], [], [], [], [], []
        self._vars = []
        infos = []
        for layer, all_vars in layers:
            params = [v for v in all_vars if getattr(v, "trainable", False) or id(v) in trainable_ids or
                      (not layer.trainable and v in layer.weights and _is_param(v))]
            if not params:
                continue
            li = len(names)
            names.append(layer.name)
            types.append(type(layer).__name__)
            kind = _KIND.get(type(layer).__name__, "dense" if any(len(v.shape) >= 2 for v in params) else "other")
            profile.append(kind in ("dense", "conv", "recurrent", "attention"))
            for v in params:
                pnames.append(v.path)
                players.append(li)
                short = v.path.rsplit("/", 1)[-1]
                roles.append("bias" if "bias" in short else "weight" if len(v.shape) >= 2 else short)
                numel.append(int(np.prod(v.shape)) if len(v.shape) else 1)
                shapes.append(tuple(int(s) for s in v.shape))
                trainable.append(id(v) in trainable_ids)
                self._vars.append(v)
            infos.append((layer, kind))
        if not names:
            raise AttachError(f"{type(model).__name__} has no trainable weights: there are no gradients to watch.")
        self._table = ParamTable(layer_names=tuple(names), layer_types=tuple(types), param_names=tuple(pnames),
                                 param_layer=tuple(players), param_roles=tuple(roles), param_numel=tuple(numel),
                                 param_shapes=tuple(shapes), param_trainable=tuple(trainable),
                                 profile=tuple(profile))
        self._structure = self._read_structure(infos)

    def _read_structure(self, infos) -> Structure:
        model = self.model
        leaves = _leaves(model)
        order = {id(layer): k for k, layer in enumerate(leaves)}
        out = []
        for idx, (layer, kind) in enumerate(infos):
            tname = type(layer).__name__
            act = _act_name(getattr(layer, "activation", None))
            source = "argument" if act else None
            normalized = False
            if kind not in ("norm",) and act is None:
                for nxt in leaves[order[id(layer)] + 1:order[id(layer)] + 5]:
                    nt = type(nxt).__name__
                    if nt in _ACT_LAYERS or nt == "Activation":
                        act = _ACT_LAYERS.get(nt) or _act_name(getattr(nxt, "activation", None))
                        source = "module"
                        break
                    if _KIND.get(nt) == "norm":
                        normalized = True
                        continue
                    if nt not in _TRANSPARENT:
                        break
            kernel = getattr(layer, "kernel", None)
            if kernel is None and hasattr(layer, "cell"):
                kernel = getattr(layer.cell, "kernel", None)
            fan_in = fan_out = 0
            std = None
            if kernel is not None and len(kernel.shape) >= 2:
                shape = tuple(int(s) for s in kernel.shape)
                receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
                fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
                std = float(np.std(np.asarray(kernel)))
            cell = radius = None
            if tname in ("SimpleRNN", "LSTM", "GRU"):
                cell = {"LSTM": "lstm", "GRU": "gru"}.get(tname, f"rnn_{_act_name(layer.cell.activation) or 'linear'}")
                if tname == "SimpleRNN":
                    rk = np.asarray(layer.cell.recurrent_kernel)
                    radius = float(np.max(np.abs(np.linalg.eigvals(rk)))) if rk.shape[0] <= 1024 else None
                    act = _act_name(layer.cell.activation)
                else:
                    act = None
            init = getattr(layer, "kernel_initializer", None)
            out.append(LayerInfo(name=layer.name, type=tname, kind=kind, index=idx, fan_in=fan_in, fan_out=fan_out,
                                 activation=act, activation_source=source, weight_std=std, normalized=normalized,
                                 recurrent_cell=cell, recurrent_radius=radius,
                                 initializer=type(init).__name__ if init is not None else None))
        norm_layers = tuple(la.name for la in leaves if _KIND.get(type(la).__name__) == "norm")
        adds = sum(1 for la in leaves if type(la).__name__ == "Add")
        return Structure(framework="keras", model_type=type(model).__name__, layers=tuple(out),
                         norm_layers=norm_layers, residual_adds=adds, traced=True)

    # -- steps and drain -----------------------------------------------------------------------------------

    def on_batch_end(self) -> None:
        """Called by the callback after each batch (or each group of ``steps_per_execution`` batches)."""
        if self._count is None:
            return
        self.sink.on_step(self._step + 1)

    def drain(self) -> tuple[StepBatch | None, ActivationRows | None]:
        if self._count is None or self._table is None:
            return None, None
        count = int(self._count.numpy())
        total = int(self._total.numpy())
        new = count - self._read_applied
        if total <= self._step:
            return None, None
        if new > _RING:
            self._notes.append(f"{new - _RING} steps were not read before the ring wrapped; use a smaller "
                               "flush_every.")
            self._read_applied = count - _RING
            new = _RING
        idx = [(self._read_applied + k) % _RING for k in range(new)]
        values = self._acc.numpy()[idx].astype(np.float64)
        applied = self._step_ring.numpy()[idx].astype(np.int64)
        # Steps a LossScaleOptimizer skipped for overflow never reached the inner apply: rows of NaN, skipped.
        steps = np.arange(self._step + 1, total + 1, dtype=np.int64)
        keep = applied > self._step
        full = np.full((len(steps), values.shape[1], values.shape[2]), np.nan)
        full[applied[keep] - self._step - 1] = values[keep]
        skipped = ~np.isin(steps, applied[keep])
        self._read_applied = count
        self._step = total
        return StepBatch(steps=steps, values=full, skipped=skipped), None




def _is_param(v) -> bool:
    return len(v.shape) >= 1 and "moving" not in v.path and "seed" not in v.path

