"""Keras 3 adapter (TensorFlow backend): the gradients ``fit()`` really applies, batch by batch.

A Keras callback never sees gradients (keras-team/keras#115). ``fit()`` ends each train step with
``optimizer.apply(grads, trainable_variables)``; an instance-level wrapper of that method, installed before
``fit()`` traces its train function, is traced into the compiled step. It computes per-variable statistics in
the graph (the Python runs once, at trace time) and writes one row per step into a ``tf.Variable`` ring that
the callback reads every ``flush_every`` batches. No extra forward or backward pass.

With a ``LossScaleOptimizer`` the wrapper sits on the inner optimizer, which only sees unscaled gradients of
the steps actually applied.

Activations are sampled in ``fit()``'s own steps: an instance-level wrapper of ``model.train_step`` marks the
trace, and instance-level wrappers of the ``call`` of the layers that end in an activation add the saturation,
dead-unit, RMS and non-finite figures of their output. Sampled steps run a train function of their own, traced
with them (:meth:`KerasAdapter._dispatch`); the others run one traced without them, traced in a thread while the
first step runs (:class:`_TraceAhead`). With ``steps_per_execution >
1`` or ``run_eagerly`` one function picks sampled steps in a ``tf.cond``. For recurrent
layers an identity with a custom gradient on the layer's input reads the gradient of each time step's input in
the real backward pass (how fast it fades toward the start of the sequence). :meth:`KerasAdapter.uninstall`
removes every wrapper and resets the cached train function, so the model saves, reloads and fits again exactly
as without gradwatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.adapters.base import AHEAD, Adapter, Sink, keras2_message
from gradwatch.core.stats import (
    DEAD_UNIT_SAMPLES,
    SATURATION_MARGIN,
    STAT_NAMES,
    TIME_EDGE_DIVISOR,
    ActivationRows,
    ParamTable,
    StepBatch,
)
from gradwatch.core.structure import LayerInfo, Structure, adaptive_optimizer
from gradwatch.errors import AttachError

if TYPE_CHECKING:
    from gradwatch.options import WatchOptions

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
_INLINE_DETAIL = 1 << 16  # weights (elements) under which the traced step measures without a cond
_ACT_RING = 32  # activation samples the device holds between flushes
_DEAD_ACTS = ("relu", "relu6")
_ACT_COLS = 6  # saturation, dead, rms, non-finite, time decades at a recurrent layer's input, at its output
_TIME_IN, _TIME_OUT = 4, 5
# Saturation read from an activation's output: within SATURATION_MARGIN of an asymptote, the same cut as the
# PyTorch adapter's thresholds on the activation's input.
_SATURATION = {"sigmoid": (SATURATION_MARGIN, 1 - SATURATION_MARGIN),
               "tanh": (-1 + SATURATION_MARGIN, 1 - SATURATION_MARGIN)}


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
        every: Collect gradient statistics every N steps (steps 1, 1 + N, ...).
        update_every: Measure the update ratio every N steps (one copy of the weights on those steps).
        activation_every: Sample activations (and recurrent layers' gradients through time) on step 1 and every
            N steps; ``0`` turns sampling off.
    """

    framework = "keras"
    module = "keras"
    backend = "tensorflow"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        keras = sys.modules.get("keras")
        return keras is not None and isinstance(model, keras.Model)

    @classmethod
    def create(cls, sink: Sink, model: Any, optimizer: Any, options: WatchOptions, **extra: Any) -> KerasAdapter:
        """Install on ``model``; ``in_fit=True`` (the callback's, at ``fit()``'s start): see :meth:`install`."""
        if optimizer is not None and optimizer is not getattr(model, "optimizer", None):
            raise ValueError("For Keras, gradwatch watches the optimizer the model was compiled with; pass no "
                             f"optimizer (received {type(optimizer).__name__}) or compile the model with it.")
        adapter = cls(sink, model, every=options.every, update_every=options.update_every,
                      activation_every=options.activation_every)
        adapter.install(in_fit=bool(extra.get("in_fit", False)))
        return adapter

    def __init__(self, sink: Sink, model: Any, *, every: int = 1, update_every: int = 10,
                 activation_every: int = 25) -> None:
        super().__init__(sink)
        import keras

        backend = keras.backend.backend()
        if backend != getattr(self, "backend", "tensorflow"):
            raise AttachError(f"Keras runs on the {backend!r} backend, which cannot train (OpenVINO is "
                              "inference-only), so there are no gradients to watch. gradwatch serves the tensorflow, "
                              "jax and torch backends: set KERAS_BACKEND before importing keras.")
        if not isinstance(model, keras.Model):
            raise TypeError(keras2_message(model) or f"KerasAdapter needs a keras.Model, received "
                            f"{type(model).__name__}")
        self.model = model
        self.every = every
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
        self.activation_every = activation_every
        self._act_targets: list[_ActTarget] = []
        self._wrapped: list[Any] = []  # objects holding an instance-level gradwatch wrapper
        self._act_count = None
        self._read_acts = 0
        self._local = threading.local()  # .trace: (sample?, ring slot) while train_step is being traced
        self._ahead: _TraceAhead | None = None  # TensorFlow: the trace of the other train function, in a thread
        self._pending = False  # waiting for fit() to build the model
        self._batches = 0
        self._step_at_install = 0
        self._silent_noted = False
        self._losses: dict[int, Any] = {}  # step -> the loss fit() logged for it, until the next drain
        # Set by KerasCallback: at a drain, ``loss_barrier(last step)`` gives the losses of steps whose batch-end
        # ran in a Keras worker thread after the step was handled (fit()'s asynchronous dispatch).
        self.loss_barrier: Any = None

    @property
    def model_type(self) -> str:
        return type(self.model).__name__

    # -- install -------------------------------------------------------------------------------------------

    def install(self, *, in_fit: bool = False) -> None:
        """Wrap the optimizer's ``apply`` (before ``fit()`` traces) and build the table. Idempotent.

        Args:
            in_fit: For the callback: ``fit()`` has begun and is about to trace its first step. A model that
                ``fit()`` only builds in that step (a subclassed model with its own ``train_step``) is watched from
                the step after it is built; on TensorFlow the optimizer is built now (:meth:`_build_optimizer`).
        """
        self._install(in_fit)
        if getattr(self, "_sampled_fit", False) and self._installed_on is not None:
            self._dispatch()  # again on each install: compile() or fit() may have made a train function of its own

    def _install(self, in_fit: bool) -> None:
        model = self.model
        opt = getattr(model, "optimizer", None)
        if opt is None:
            raise AttachError(f"{type(model).__name__} is not compiled: call model.compile(optimizer=..., loss=...) "
                              "before fit() so gradwatch can watch the optimizer's gradients.")
        if not model.built or not model.weights:
            if in_fit:
                self._pending = True
                return
            raise AttachError(f"{type(model).__name__} is not built yet (it has no weights): call it on a batch "
                              "first, e.g. model(x[:1]), or give it a keras.Input.")
        if in_fit:
            self.guard(self._build_optimizer, "Keras optimizer build")(opt)
        inner = getattr(opt, "inner_optimizer", opt)  # LossScaleOptimizer: unscaled gradients, applied steps only
        if self._installed_on is inner and "apply" in inner.__dict__:
            return
        self._build_table()
        self._step_at_install = self._step
        self._make_rings()
        self._wrap_apply(inner, opt if inner is not opt else None)
        if self.activation_every and self._act_targets:
            self._install_activations()
        # fit() makes its train function before on_train_begin: re-make it so the traced step holds the wrapper.
        if getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)

    def _build_optimizer(self, opt: Any) -> None:
        """On TensorFlow, build the optimizer as ``fit()``'s first trace would, before that trace.

        Without a distribution strategy, ``fit()`` on TensorFlow builds the optimizer inside the first trace of
        its train step, and a ``tf.function`` whose first trace creates variables traces again: every train
        function ``fit()`` starts with is traced twice, gradwatch's two (:meth:`_dispatch`) included. Built here,
        from the variables Keras' own ``train_step`` passes and under the name scope its ``apply`` opens (the
        same variables, paths and values), each is traced once. Keras builds it so itself under a distribution
        strategy (``_symbolic_build``). Left to the trace when ``train_step`` is the user's (it may apply other
        variables, or another optimizer) or a layer is not built yet (its variables do not exist).
        """
        if self.backend != "tensorflow" or opt.built:  # the other backends' fit() builds it before callbacks run
            return
        from keras.src import backend
        from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

        model = self.model
        if "train_step" in model.__dict__ or type(model).train_step is not TensorFlowTrainer.train_step:
            return
        if not model.trainable_weights or not all(layer.built for layer in model._flatten_layers()):
            return
        with model.distribute_strategy.scope(), backend.name_scope(opt.name, caller=opt):
            opt.build(model.trainable_weights)
        opt.built = True

    def _make_rings(self) -> None:
        """The device variables one row per collected step goes into, read by :meth:`drain`."""
        import tensorflow as tf

        p = self._table.n_params
        with self.model.distribute_strategy.scope():
            agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
            # One spare row past the ring: steps that are not collected (``every`` > 1) write there, so the
            # write needs no cond (a mirrored variable takes no assignment inside one in replica context).
            self._acc = tf.Variable(tf.fill([_RING + 1, p, len(STAT_NAMES)], float("nan")), trainable=False,
                                    aggregation=agg, synchronization=tf.VariableSynchronization.ON_WRITE,
                                    name="gradwatch_stats")
            self._count = tf.Variable(tf.constant(self._read_applied, tf.int64), trainable=False, aggregation=agg,
                                      name="gradwatch_count")
            # The training step of each ring row, and (with a LossScaleOptimizer, which skips the inner apply on
            # overflow) every step the outer optimizer saw, so skipped steps are known and numbered truthfully.
            self._step_ring = tf.Variable(tf.zeros([_RING + 1], tf.int64), trainable=False, aggregation=agg,
                                          name="gradwatch_steps")
            self._total = tf.Variable(tf.constant(self._step, tf.int64), trainable=False, aggregation=agg,
                                      name="gradwatch_total")

    def _wrap_apply(self, inner: Any, outer: Any) -> None:
        """Instance wrappers of the optimizer's ``apply`` (and the loss-scale optimizer's outer one). They run at
        trace time; a failure there goes to the sink and the step is traced without gradwatch."""
        self._index = {id(v): i for i, v in enumerate(self._vars)}
        self._inner, self._outer = inner, outer
        self._wrap_inner_apply(inner, self._measure_grads, self._record, "Keras optimizer.apply")
        if outer is not None:
            outer_original = type(outer).apply
            total, adapter = self._total, self

            def outer_apply(grads, trainable_variables=None):
                if adapter.active:
                    total.assign_add(1)  # every step, applied or skipped for overflow
                return outer_original(outer, grads, trainable_variables)

            outer_apply.__gradwatch__ = True  # type: ignore[attr-defined]
            outer.apply = outer_apply
            self._wrapped.append(outer)
        self._installed_on = inner

    def _wrap_inner_apply(self, inner: Any, measure: Any, record: Any, where: str, after: Any = None) -> None:
        """The instance wrapper of ``inner.apply`` every backend uses: ``measure(grads, trainable_variables)``
        before the update (``None``: nothing to record), ``after()`` once it is applied, ``record(*state)`` then.
        Both are fail-open through :meth:`guard`."""
        original = type(inner).apply
        measure, record = self.guard(measure, where), self.guard(record, where)

        def apply(grads, trainable_variables=None):
            grads = list(grads)
            state = measure(grads, trainable_variables)
            result = original(inner, grads, trainable_variables)
            if after is not None:
                after()
            if state is not None:
                record(*state)
            return result

        apply.__gradwatch__ = True  # type: ignore[attr-defined]
        inner.apply = apply
        self._wrapped.append(inner)

    def _variables(self, trainable_variables: Any) -> list:
        """The variables an ``apply`` call updates (the optimizer's own when none are passed)."""
        return list(trainable_variables) if trainable_variables is not None else \
            list(self._inner._trainable_variables)

    def _measure_grads(self, grads: list, trainable_variables: Any):
        """In the traced step, before the update: this step's number and whether it is collected, the gradient
        norms, and on measure steps the weights before the update."""
        import tensorflow as tf

        variables = self._variables(trainable_variables)
        pos = [self._index.get(id(getattr(v, "_gradwatch_source", v))) for v in variables]
        # Under a distribution strategy, apply() runs per replica on the replica's own gradients; the optimizer
        # sums them later. Judge the summed gradient, once: one extra all-reduce on gradwatch's account.
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        stat_grads = grads
        if replicas > 1:
            present = [k for k, g in enumerate(grads) if g is not None]
            summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [tf.convert_to_tensor(grads[k]) for k in present])
            stat_grads = [None] * len(grads)
            for k, g in zip(present, summed):
                stat_grads[k] = g
        step_id = self._total + (0 if self._outer is not None else 1)  # the outer apply counted this step already
        collect = tf.equal((step_id - 1) % self.every, 0)  # steps 1, 1 + every, ... as in the PyTorch adapter
        # Max |g|, the non-finite count and the update ratio every `update_every` collected steps, as on PyTorch (an
        # inf/NaN gradient already shows in its L2 norm on every step).
        measure = tf.logical_and(collect, tf.equal(self._count % self.update_every, 0))
        watched = [(v, i) for v, i in zip(variables, pos) if i is not None]
        have = [(_dense32(g), i) for g, i in zip(stat_grads, pos) if i is not None and g is not None]
        nan = float("nan")
        k = len(have)

        def l2():  # one op per gradient: L2Loss is sum(g^2) / 2. A NaN norm is a gradient that is there and not
            # finite (NaN marks "no gradient" in a row): +inf.
            if not have:
                return tf.zeros([0])
            norms = tf.sqrt(2.0 * tf.stack([tf.nn.l2_loss(g) for g, _ in have]))
            return tf.where(tf.math.is_nan(norms), float("inf"), norms)

        # The weights before the update in a cond (kept functional: _functional_cond) on measure steps: a read,
        # which the optimizer's assignment then copies (copy-on-write). Made to wait for the norms, it held every
        # update back until the last gradient's norm was taken (+4.6% a step on a 20-layer MLP, measured). Outside
        # XLA the other branch gives one scalar for every weight; XLA wants both branches of one shape.
        weights = [v for v, _ in watched]
        xla = bool(getattr(self.model, "jit_compile", False))

        def unmeasured():
            if xla:
                return [tf.zeros(tf.shape(v), tf.float32) for v in weights]
            return [tf.zeros([])] * len(weights)

        # A small model's step runs no cond: its figures are taken on every step and masked to NaN where not due. In
        # fit() the two Ifs cost more than these ops on small tensors: a TensorFlow SimpleRNN (17.8k weights),
        # activation_every=0, +7.0% a step with them and +2.5% without (medians over 12 fresh copies). Taken alone,
        # on 2**16 weights, the ops cost 0.1 ms a step more than the Ifs; on 2**18, 0.4 ms.
        inline = sum(math.prod(v.shape) for v in weights) < _INLINE_DETAIL

        def gated(pred, true_fn, false_fn):  # true_fn's figures are NaN where pred is false
            return true_fn() if inline else _functional_cond(pred, true_fn, false_fn)

        norms = gated(collect, lambda: tf.where(collect, l2(), nan), lambda: tf.fill([k], nan)) \
            if self.every > 1 else l2()
        # A step with a non-finite gradient gets its max |g| and count at once, whatever the schedule.
        nonfinite = tf.logical_and(collect, tf.logical_not(tf.reduce_all(tf.math.is_finite(norms))))
        before = gated(measure, lambda: [tf.cast(v, tf.float32) for v in weights], unmeasured) if weights else []
        detail = tf.logical_or(measure, nonfinite)
        return step_id, collect, (norms, have, detail, gated), measure, watched, list(before)

    def _record(self, step_id, collect, stats, measure, watched, before) -> None:
        """In the traced step, after the update: on measure steps (and steps whose norms are not finite) max |g| and
        the non-finite count, on measure steps the update norms, in one cond; then the step's row into the ring (into
        the spare row when the step is not collected)."""
        import tensorflow as tf

        nan = float("nan")
        p = self._table.n_params
        norms, have, detail, gated = stats
        k = len(have)

        def measured():
            # A trace costs about 0.4 ms an op on this CPU (fit()'s start): few ops a tensor, reduction axes shared.
            axes: dict[int, Any] = {}

            def reduce(op, x):
                rank = x.shape.rank
                if rank is None:
                    return op(input=x, axis=tf.range(tf.rank(x)))
                if rank not in axes:
                    axes[rank] = tf.constant(list(range(rank)), tf.int32)
                return op(input=x, axis=axes[rank])

            peak = [reduce(tf.raw_ops.Max, tf.abs(g)) for g, _ in have]
            bad = [reduce(tf.raw_ops.Sum, tf.cast(tf.logical_not(tf.math.is_finite(g)), tf.float32)) for g, _ in have]
            maxima = tf.where(detail, tf.stack([tf.stack(peak), tf.stack(bad)], axis=1), nan) if have \
                else tf.zeros([0, 2])
            if not watched:
                return maxima, tf.zeros([0, 2])
            base = [tf.nn.l2_loss(b) for b in before]
            step = [tf.nn.l2_loss(tf.cast(v, tf.float32) - b) for (v, _), b in zip(watched, before)]
            updates = tf.sqrt(2.0 * tf.stack([tf.stack(base), tf.stack(step)], axis=1))
            return maxima, tf.where(measure, updates, nan)  # not a measure step: no weights before the update

        details, updates = gated(detail, measured, lambda: (tf.fill([k, 2], nan), tf.fill([len(watched), 2], nan)))
        row = _columns(tf.concat([norms[:, None], details], axis=1), [i for _, i in have], p, 3)
        row = tf.concat([row, _columns(updates, [i for _, i in watched], p, 2)], axis=1)
        count = self._count
        slot = [[tf.where(collect, count % _RING, tf.constant(_RING, tf.int64))]]
        _write(self._acc, slot, [row])
        _write(self._step_ring, slot, [step_id])
        count.assign_add(tf.cast(collect, tf.int64))
        if self._outer is None:
            self._total.assign_add(1)

    def _install_activations(self) -> None:
        """Wrap ``model.train_step`` (marks the trace, picks sampled steps) and the ``call`` of watched layers."""
        import tensorflow as tf

        model = self.model
        if "train_step" in model.__dict__:
            self._notes.append("Activations are not sampled: model.train_step is already replaced on the instance.")
            return
        n_layers = self._table.n_layers
        nan = float("nan")
        with model.distribute_strategy.scope():
            # Written inside tf.cond, where a mirrored variable would need a cross-replica merge: each replica
            # keeps its own copy (its share of the batch) and reading outside the step gives the first replica's.
            kw = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                      synchronization=tf.VariableSynchronization.ON_READ)
            ring = tf.Variable(tf.fill([_ACT_RING, n_layers, _ACT_COLS], nan), name="gradwatch_activations", **kw)
            steps = tf.Variable(tf.zeros([_ACT_RING], tf.int64), name="gradwatch_activation_steps", **kw)
            count = tf.Variable(tf.constant(self._read_acts, tf.int64), name="gradwatch_activation_count", **kw)
            for target in self._act_targets:
                if target.activation in _DEAD_ACTS and target.channels:
                    target.alive = tf.Variable(tf.zeros([DEAD_UNIT_SAMPLES, target.channels]),
                                               name="gradwatch_alive_units", **kw)
                    target.seen = tf.Variable(tf.constant(0, tf.int64), name="gradwatch_alive_seen", **kw)
        self._act_ring, self._act_steps, self._act_count = ring, steps, count
        total, every, adapter = self._total, self.activation_every, self
        original_step = model.train_step

        def begin_sample():
            """``(sample?, ring slot, step)``, or ``None`` in the train function of the steps not sampled."""
            chosen = getattr(adapter._local, "sampling", None)  # set by _dispatch while it traces a step
            if chosen is False:
                return None
            step = tf.cast(total.read_value(), tf.int64) + 1  # `total` counts the steps already finished
            # Without _dispatch (steps_per_execution > 1, run_eagerly) the step picks in the graph.
            sample = tf.constant(True) if chosen else tf.logical_or(tf.equal(step, 1), tf.equal(step % every, 0))
            return sample, count.read_value() % _ACT_RING, step

        begin_guarded = self.guard(begin_sample, "Keras train_step")

        targets = len(self._act_targets)
        write_all = self.guard(self._write_activations, "Keras activations")

        def train_step(*args, **kwargs):
            trace = begin_guarded()  # None when monitoring is off or the prologue failed
            # Per thread: MirroredStrategy traces each replica's step in a thread of its own.
            local = adapter._local
            local.trace, local.outputs, local.written = trace, {}, False
            local.targets = targets
            try:
                out = original_step(*args, **kwargs)
                if trace is not None and adapter.active and not local.written:
                    write_all(*trace, late=True)  # a watched layer did not run this step: the others' figures, now
            finally:
                local.trace, local.outputs = None, {}
            if trace is not None and adapter.active:
                count.assign_add(tf.cast(trace[0], tf.int64))
            return out

        self._wrap_step_and_layers(train_step, lambda target: self._wrap_call(target, ring))
        # The cond that picks sampled steps inside one traced step cost the steps not sampled +4 to +5% on a
        # 20-layer MLP (measured): there fit() runs one of two train functions instead (_dispatch).
        self._sampled_fit = (not model.run_eagerly and getattr(model, "steps_per_execution", 1) == 1
                             and hasattr(model, "_make_function"))

    def _dispatch(self) -> None:
        """``model.train_function`` made of two compiled steps, as Keras' own ``make_train_function`` makes one:
        traced with the activation hooks on steps 1 and every ``activation_every``, without them otherwise. The
        choice is made in Python from the count of steps run, so neither step holds a cond for it."""
        model, adapter, every = self.model, self, self.activation_every
        step_fn = model.train_step  # gradwatch's wrapper (instance attribute)

        def flagged(sampling: bool):
            def step(*args):  # traced in each replica's thread: the flag is thread-local
                adapter._local.sampling = sampling
                try:
                    return step_fn(*args)
                finally:
                    adapter._local.sampling = None
            return step

        plain, sampled = self._compile_step(flagged(False)), self._compile_step(flagged(True))
        self._dispatched = self._step

        def pick():
            adapter._dispatched += 1
            n = adapter._dispatched
            return sampled if adapter.active and (n == 1 or n % every == 0) else plain

        model.train_function = self._train_function(pick, (plain, sampled))

    def _compile_step(self, step: Any) -> Any:
        return self.model._make_function(step)

    def _train_function(self, pick: Any, pair: tuple[Any, Any]) -> Any:
        """What ``fit()`` calls on each step: the compiled step ``pick()`` chooses, of the two in ``pair``."""
        import tensorflow as tf

        if self.activation_every < 2 or tf.distribute.has_strategy() or \
                self.model.distribute_strategy is not tf.distribute.get_strategy():
            return lambda iterator: pick()(iterator)
        if self._ahead is not None:
            self._ahead.wait()
        self._ahead = ahead = _TraceAhead(self, pair)
        before = self.guard(ahead.before, "Keras trace ahead")

        def train_function(iterator):
            fn = pick()
            before(fn, iterator)
            return fn(iterator)

        return train_function

    def _wrap_step_and_layers(self, train_step: Any, make_call: Any) -> None:
        """Put ``train_step`` on the model instance and ``make_call(target)`` as the ``call`` of each watched
        layer's instance (every backend samples activations this way)."""
        model = self.model
        train_step.__gradwatch__ = True
        model.__dict__["train_step"] = train_step
        self._wrapped.append(model)
        for target in self._act_targets:
            if "call" in target.layer.__dict__:
                self._notes.append(f"Activations of {target.layer.name} are not sampled: its call() is already "
                                   "replaced on the instance.")
                continue
            target.layer.__dict__["call"] = make_call(target)
            self._wrapped.append(target.layer)

    def _wrap_call(self, target: _ActTarget, ring: Any):
        import tensorflow as tf

        original = target.layer.call
        adapter = self
        where = f"Keras activations of {target.layer.name}"

        def probed(args, kwargs, sample, slot):
            # The probe makes the backward pass compute the input's gradient at every time step, which a
            # first-layer RNN otherwise skips (+13% a step on a small SimpleRNN, measured): only sampled steps
            # take the probed branch; the others run the layer as it is. Under XLA a recurrent layer inside a
            # cond does not compile: there the probe runs on every step and only its record is sampled.
            if getattr(adapter.model, "jit_compile", False):
                return _probed_call(original, args, kwargs, target, ring, sample, slot, gate=True)
            return _cond(sample, lambda: _probed_call(original, args, kwargs, target, ring, sample, slot),
                         lambda: original(*args, **kwargs))

        probed = self.guard(probed, where)
        write_all = self.guard(self._write_activations, "Keras activations")

        def call(*args, **kwargs):
            local = adapter._local
            trace = getattr(local, "trace", None)
            if trace is None or not adapter.active:  # inference, evaluation, symbolic calls: untouched
                return original(*args, **kwargs)
            sample, slot, step = trace
            out = None
            if target.time and args and isinstance(args[0], tf.Tensor) and args[0].shape.rank == 3:
                out = probed(args, kwargs, sample, slot)  # None when it failed: the call goes on unprobed
            if out is None:
                out = original(*args, **kwargs)
            y = out[0] if isinstance(out, (list, tuple)) else out
            if isinstance(y, tf.Tensor) and y.dtype.is_floating and target.index not in local.outputs:
                local.outputs[target.index] = (target, y)
                if len(local.outputs) == local.targets and not local.written:
                    write_all(sample, slot, step)  # the last watched layer of the forward pass
            return out

        call.__gradwatch__ = True  # type: ignore[attr-defined]
        return call

    def _write_activations(self, sample, slot, step, late: bool = False) -> None:
        """In the traced step, once the watched layers have run: the activation sample's one write (:func:`_cond`). On
        sampled steps it writes the slot's step and every layer's figures (NaN for those that did not run). Run in
        the forward pass it also clears the slot's through-time columns, which the backward's probes then write;
        ``late`` (after the backward, when a watched layer did not run) it leaves them."""
        import tensorflow as tf

        local = self._local
        local.written = True
        items = list(local.outputs.values())
        ring, n_layers = self._act_ring, self._table.n_layers
        cols = _TIME_IN if late else _ACT_COLS

        def write():
            block = tf.fill([n_layers, cols], float("nan"))
            if items:
                figures = tf.concat([_activation_stats(y, target) for target, y in items], axis=0)
                block = tf.tensor_scatter_nd_update(block, [[t.index, k] for t, _ in items for k in range(4)],
                                                    figures)
            if late:
                _write(ring, [[slot, li, c] for li in range(n_layers) for c in range(cols)], tf.reshape(block, [-1]))
            else:
                _write(ring, [[slot]], [block])
            _write(self._act_steps, [[slot]], [step])
            return tf.constant(True)

        _cond(sample, write, lambda: tf.constant(False))

    def uninstall(self, keep: tuple[str, ...] = ()) -> None:
        """Remove every instance-level wrapper gradwatch put on the model, its layers and optimizers (all but the
        attributes named in ``keep``) and reset the cached train function."""
        if self._ahead is not None:  # no trace of the wrappers left running once they are gone
            self._ahead.wait()
            self._ahead = None
        removed = False
        for obj in self._wrapped:
            for attr in [a for a, f in obj.__dict__.items() if getattr(f, "__gradwatch__", False) and a not in keep]:
                del obj.__dict__[attr]
                removed = True
        if removed and getattr(self.model, "train_function", None) is not None:
            # A fresh, untraced train function without the wrappers. Not None: fit() calls train_function on
            # every step, and an internal error can detach gradwatch in the middle of a fit().
            self.model.make_train_function(force=True)
        self._wrapped.clear()
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
        self._vars = []
        infos, entries = [], []
        for layer, all_vars in layers:
            # A frozen layer's weights are listed (as frozen), its running statistics and seeds are not.
            params = [v for v in all_vars if getattr(v, "trainable", False) or id(v) in trainable_ids or
                      (not layer.trainable and _is_param(v))]
            if not params:
                continue
            kind = _KIND.get(type(layer).__name__, "dense" if any(len(v.shape) >= 2 for v in params) else "other")
            entries.append((layer.name, type(layer).__name__, kind,
                            [(v.path, v.path.rsplit("/", 1)[-1], tuple(v.shape), id(v) in trainable_ids)
                             for v in params]))
            self._vars.extend(params)
            infos.append((layer, kind))
        if not entries:
            raise AttachError(f"{type(model).__name__} has no trainable weights: there are no gradients to watch.")
        self._table = ParamTable.build(entries)
        self._structure = self._read_structure(infos)
        opt = getattr(model, "optimizer", None)
        name = type(getattr(opt, "inner_optimizer", opt)).__name__ if opt is not None else None
        self._structure = dataclasses.replace(self._structure, optimizer=name,
                                              adaptive_optimizer=adaptive_optimizer(name))

    def _read_structure(self, infos) -> Structure:
        model = self.model
        leaves = _leaves(model)
        order = {id(layer): k for k, layer in enumerate(leaves)}
        out = []
        self._act_targets = []
        for idx, (layer, kind) in enumerate(infos):
            tname = type(layer).__name__
            act = _act_name(getattr(layer, "activation", None))
            source = "argument" if act else None
            act_layer = layer if act else None
            normalized = False
            if kind not in ("norm",) and act is None:
                for nxt in leaves[order[id(layer)] + 1:order[id(layer)] + 5]:
                    nt = type(nxt).__name__
                    if nt in _ACT_LAYERS or nt == "Activation":
                        act = _ACT_LAYERS.get(nt) or _act_name(getattr(nxt, "activation", None))
                        source = "module"
                        act_layer = nxt
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
            recurrent = tname in ("SimpleRNN", "LSTM", "GRU")
            watched = act in _SATURATION or act in _DEAD_ACTS
            if recurrent or (watched and act_layer is not None):
                trainable = list(layer.trainable_weights)
                self._act_targets.append(_ActTarget(
                    layer=layer if recurrent else act_layer, index=idx, activation=act if watched else None,
                    channels_first=getattr(layer, "data_format", None) == "channels_first",
                    time=recurrent and bool(trainable), backwards=bool(getattr(layer, "go_backwards", False)),
                    anchor=min(trainable, key=lambda v: int(np.prod(v.shape))) if trainable else None,
                    channels=getattr(layer, "units", None) or getattr(layer, "filters", None)))
            out.append(LayerInfo(name=layer.name, type=tname, kind=kind, index=idx, fan_in=fan_in, fan_out=fan_out,
                                 activation=act, activation_source=source, weight_std=std, normalized=normalized,
                                 recurrent_cell=cell, recurrent_radius=radius,
                                 initializer=type(init).__name__ if init is not None else None))
        norm_layers = tuple(la.name for la in leaves if _KIND.get(type(la).__name__) == "norm")
        adds = sum(1 for la in leaves if type(la).__name__ == "Add")
        return Structure(framework="keras", model_type=type(model).__name__, layers=tuple(out),
                         norm_layers=norm_layers, residual_adds=adds, traced=True)

    # -- steps and drain -----------------------------------------------------------------------------------

    def on_batch_end(self, batch: int = 0, *, loss: Any = None, step: int | None = None) -> None:
        """Called by the callback after each batch (or each group of ``steps_per_execution`` batches).

        Args:
            batch: Keras' index, within the epoch, of the batch that just ended.
            loss: ``logs["loss"]`` as ``fit()`` passed it (its running mean over the epoch); read at the flush.
            step: The training step that batch ended (1-based, over all epochs), where the callback knows it.
        """
        self._batches += 1
        if loss is not None and step is not None:
            self._losses[step] = loss
        if self._pending:
            if not (self.model.built and self.model.weights):
                return
            # Built by its first step(s): wrap now; fit() re-traces its next step with the wrappers.
            self._pending = False
            self._step = batch + 1
            self._notes.append(f"{type(self.model).__name__} was built by fit()'s first step, so gradwatch watches "
                               f"from step {self._step + 1}; build it before fit() (model(x[:1])) to see step 1.")
            self.guard(self.install, "Keras install after the first step")()
            return
        if self._count is None:
            return
        self.sink.on_step(self._step + 1)

    def _read_rows(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        """The rows collected since the last drain: ``(values (n, P, 5), the step of each row, steps seen so
        far)``; steps seen but without a row were skipped by a loss scaler. ``None`` before any."""
        count = int(self._count.numpy())
        total = int(self._total.numpy())
        new = count - self._read_applied
        if new > _RING:
            self._notes.append(f"{new - _RING} steps were not read before the ring wrapped; use a smaller "
                               "flush_every.")
            self._read_applied = count - _RING
            new = _RING
        idx = [(self._read_applied + k) % _RING for k in range(new)]
        self._read_applied = count
        return self._acc.numpy()[idx].astype(np.float64), self._step_ring.numpy()[idx].astype(np.int64), total

    def drain(self) -> tuple[StepBatch | None, ActivationRows | None]:
        if self._count is None or self._table is None:
            return None, None
        read = self._read_rows()
        if read is None:
            return None, self._drain_activations()
        values, applied, total = read
        if total <= self._step:
            if total == self._step_at_install and self._batches >= 2 and not self._silent_noted:
                self._silent_noted = True
                self._notes.append(f"fit() ran {self._batches} batches but the optimizer's apply() never ran: a "
                                   "custom train_step that updates the weights itself (not through "
                                   "optimizer.apply or apply_gradients) cannot be watched.")
            return None, None
        # The collected steps (1, 1 + every, ...) since the last drain. Those a LossScaleOptimizer skipped for
        # overflow never reached the inner apply: rows of NaN, marked skipped.
        steps = np.arange(self._step + 1, total + 1, dtype=np.int64)
        steps = steps[(steps - 1) % self.every == 0]
        keep = (applied > self._step) & np.isin(applied, steps)
        full = np.full((len(steps), values.shape[1], values.shape[2]), np.nan)
        full[np.searchsorted(steps, applied[keep])] = values[keep]
        skipped = ~np.isin(steps, applied[keep])
        self._step = total
        if self.loss_barrier is not None:
            self._losses.update(self.loss_barrier(total))
        losses = np.asarray([float(np.asarray(self._losses[s])) if s in self._losses else np.nan for s in steps])
        self._losses = {s: v for s, v in self._losses.items() if s > total}
        extras = {"loss": losses} if np.isfinite(losses).any() else {}
        batch = StepBatch(steps=steps, values=full, skipped=skipped, extras=extras) if len(steps) else None
        return batch, self._drain_activations()

    def _drain_activations(self) -> ActivationRows | None:
        if self._act_count is None:
            return None
        count = int(self._act_count.numpy())
        new = count - self._read_acts
        if new <= 0:
            return None
        if new > _ACT_RING:
            self._notes.append(f"{new - _ACT_RING} activation samples were overwritten before a flush read them; "
                               "use a smaller flush_every or a larger activation_every.")
            self._read_acts, new = count - _ACT_RING, _ACT_RING
        idx = [(self._read_acts + k) % _ACT_RING for k in range(new)]
        values = self._act_ring.numpy()[idx].astype(np.float64)
        steps = self._act_steps.numpy()[idx].astype(np.int64)
        self._read_acts = count
        into, out = values[..., _TIME_IN], values[..., _TIME_OUT]
        # A layer that returns sequences: the fading through time it adds to what its output receives.
        with np.errstate(invalid="ignore"):
            time = np.where(np.isfinite(out) & np.isfinite(into), into - out, into)
        return ActivationRows(steps=steps, saturation=values[..., 0], dead=values[..., 1], rms=values[..., 2],
                              nonfinite=values[..., 3], time_decades=time)



class _TraceAhead:
    """TensorFlow: the second of ``fit()``'s two train functions, traced in a thread while its first step runs.

    The first step runs the train function of sampled steps (the other one where gradwatch starts on a step not
    sampled): TensorFlow traces it (Python, holding the GIL), then its runtime instantiates,
    optimises and runs it (C++, without the GIL). The other function was traced only at its own first step. Here
    the first step's function is traced first, on ``fit()``'s thread (``get_concrete_function``: the trace the call
    would make, which the call then finds), and the other's trace starts in a thread while the first step runs; the
    other's first step waits for it. The thread holds a copy of Keras' thread-local state (the dtype
    policy, the name-scope stack) and the ``tf.device`` scope of ``fit()``'s thread. Only for ``fit()``'s own
    ``tf.data`` iterator without a distribution strategy. Anything else, or an error in the thread (a guarded hook
    raises there, :data:`~gradwatch.adapters.base.AHEAD`), leaves the trace to the step's own call, as without this:
    an error is reported, or raised, from ``fit()``'s thread.
    """

    def __init__(self, adapter: KerasAdapter, pair: tuple[Any, Any]) -> None:
        self.adapter, self.pair = adapter, pair
        self.other: Any = None  # the train function the thread traces, once the first step has begun
        self.thread: threading.Thread | None = None

    def before(self, fn: Any, iterator: Any) -> None:
        """Before a step's train function ``fn`` runs on ``iterator``: on the first step, trace ``fn`` and start the
        thread on the other; later, wait for the thread before the other's first call."""
        if self.other is not None:
            if fn is self.other:
                self.wait()
            return
        self.other = self.pair[fn is self.pair[0]]
        import tensorflow as tf

        if not isinstance(iterator, tf.data.Iterator):
            return
        first, other = _traced(fn), _traced(self.other)
        if first is None or other is None:
            return
        try:
            first.get_concrete_function(iterator)
        except Exception:  # noqa: BLE001 - fn's own call traces it again and raises where it would without this
            return
        if not self.adapter.active:  # that trace turned monitoring off
            return
        from keras.src.backend.common import global_state
        from tensorflow.python.eager import context

        trackers = (global_state.GLOBAL_STATE_TRACKER, global_state.GLOBAL_SETTINGS_TRACKER)
        state = [{k: list(v) if isinstance(v, list) else v for k, v in vars(t).items()} for t in trackers]
        device = context.context().device_name  # fit() under a tf.device scope: the thread traces under it too

        def trace() -> None:
            for tracker, kept in zip(trackers, state):
                for k, v in kept.items():
                    setattr(tracker, k, v)
            AHEAD.on = True
            # A trace that fails is given up: the other's own call traces it again, and reports or raises there.
            with tf.device(device or None), contextlib.suppress(Exception):
                other.get_concrete_function(iterator)

        self.thread = threading.Thread(target=trace, name="gradwatch-trace-ahead", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Wait for the thread to end (it reports nothing itself: a hook failing there raises, :data:`AHEAD`)."""
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.join()


def _traced(train_function: Any) -> Any:
    """The ``tf.function`` that a TensorFlow train function made by Keras' ``_make_function`` calls on an iterator
    (``multi_step_on_iterator``, in its closure), or ``None``."""
    for cell in getattr(train_function, "__closure__", None) or ():
        fn = cell.cell_contents
        if getattr(getattr(fn, "python_function", None), "__name__", "") == "multi_step_on_iterator" and \
                hasattr(fn, "get_concrete_function"):
            return fn
    return None


@dataclass(eq=False)
class _ActTarget:
    """A layer whose output is sampled: the output of ``activation`` for table layer ``index``."""

    layer: Any
    index: int
    activation: str | None
    channels_first: bool = False
    time: bool = False  # a recurrent layer: also read its input gradient per time step
    backwards: bool = False  # go_backwards: the sequence is read from its end
    anchor: Any = None  # a trainable variable of the layer that ties the time probe into the backward pass
    channels: int | None = None  # output units of a ReLU-fed layer, for the dead-unit masks
    alive: Any = None  # (DEAD_UNIT_SAMPLES, channels) variable: which units fired in each recent sampled batch
    seen: Any = None  # sampled batches written to ``alive``


def _cond(sample, true_fn, false_fn) -> Any:
    """``tf.cond`` on whether the step is sampled, or the branch alone where that is known when tracing: the train
    function of sampled steps (:meth:`KerasAdapter._dispatch`) holds neither the cond nor a trace of the other
    branch (for a recurrent layer, a second trace of the layer)."""
    import tensorflow as tf

    known = tf.get_static_value(sample)
    if known is not None:
        return true_fn() if bool(known) else false_fn()
    return tf.cond(sample, true_fn, false_fn)


def _functional_cond(pred, true_fn, false_fn) -> Any:
    """``tf.cond`` kept a functional ``If`` op, which runs the branch taken and nothing of the other.

    Outside XLA, TensorFlow lowers every ``If`` of a ``tf.function`` to ``Switch``/``Merge`` by default, and then each
    op of the branch not taken is still visited on every step. gradwatch's branches hold a few ops per gradient or
    weight (max |g|, the weights before the update, the update norms): on a 20-layer Keras MLP (42 gradients) the
    lowered conds cost +5.5% a step against +1.1% kept functional (``fit()``, 14 epochs interleaved, with
    ``activation_every=0``). No gradient flows through these branches (they feed gradwatch's rings only). If this
    TensorFlow has no such attribute, the cond stays as TensorFlow makes it.
    """
    import tensorflow as tf

    if tf.executing_eagerly():  # no graph op to keep: the branch runs at once
        return tf.cond(pred, true_fn, false_fn)
    graph = tf.compat.v1.get_default_graph()
    made = len(graph.get_operations())
    out = tf.cond(pred, true_fn, false_fn)
    try:
        from tensorflow.core.framework import attr_value_pb2

        for op in graph.get_operations()[made:]:
            if op.type in ("If", "StatelessIf"):
                op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    except Exception:  # noqa: BLE001 - an internal attribute: without it, TensorFlow's default lowering
        pass
    return out


def _write(var, indices, updates) -> Any:
    """Scatter into a gradwatch variable (distributed variables take no scatter in a replica context)."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        return var.assign(tf.tensor_scatter_nd_update(var, indices, updates))
    return var.scatter_nd_update(indices, updates)


def _activation_stats(y, target: _ActTarget):
    """``[saturation, dead, rms, nonfinite]`` of one activation output, in the graph."""
    import tensorflow as tf

    y = tf.cast(y, tf.float32)
    nan = tf.constant(float("nan"))
    rms = tf.sqrt(tf.reduce_mean(tf.square(y)))
    nonfinite = tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(y)), tf.float32))
    act = target.activation
    sat = nan
    if act in _SATURATION:
        lo, hi = _SATURATION[act]
        sat = tf.reduce_mean(tf.cast(tf.logical_or(y < lo, y > hi), tf.float32))
    dead = nan
    rank = y.shape.rank
    if act in _DEAD_ACTS and rank is not None and rank >= 2:
        if target.channels_first and rank > 2:
            y = tf.transpose(y, [0] + list(range(2, rank)) + [1])
        units = tf.reshape(y, [-1, tf.shape(y)[-1]])
        fired = tf.reduce_any(units > 0, axis=0)
        if target.alive is not None and units.shape[-1] == target.channels:
            # Dead: fired on no input of the last DEAD_UNIT_SAMPLES sampled batches (not judged before that many).
            write = _write(target.alive, [[target.seen % DEAD_UNIT_SAMPLES]], [tf.cast(fired, tf.float32)])
            with tf.control_dependencies([write]):
                seen = target.seen.assign_add(1)
                ever = tf.reduce_max(target.alive.read_value(), axis=0)
            dead = tf.where(seen >= DEAD_UNIT_SAMPLES, tf.reduce_mean(1.0 - ever), nan)
        else:  # units unknown at install: the batch alone
            dead = tf.reduce_mean(tf.cast(tf.logical_not(fired), tf.float32))
    return tf.stack([sat, dead, rms, nonfinite])


def _probed_call(original, args, kwargs, target: _ActTarget, ring, sample, slot, gate: bool = False):
    """The recurrent layer's call with time probes on its input and, for ``return_sequences``, its output.

    Runs as a branch of :func:`_cond`, or with ``gate`` on every step (the probes then record on sampled steps only).
    The probes' gradients write to the ring through its handle as captured here: a gradient of a cond branch
    cannot capture the (eager) variable handle itself.
    """
    import tensorflow as tf

    handle = tf.compat.v1.get_default_graph().capture(ring.handle)
    out = original(_time_probe(args[0], target, handle, sample, slot, _TIME_IN, gate), *args[1:], **kwargs)
    y = out[0] if isinstance(out, (list, tuple)) else out
    if hasattr(y, "shape") and y.shape.rank == 3:
        # return_sequences: the loss reaches every time step of the output, so the profile the layer receives is
        # measured too, and only the fading the layer adds is judged.
        y = _time_probe(y, target, handle, sample, slot, _TIME_OUT, gate)
        out = [y, *out[1:]] if isinstance(out, list) else (y, *out[1:]) if isinstance(out, tuple) else y
    return out


def _time_probe(x, target: _ActTarget, handle, sample, slot, col: int, gate: bool):
    """``x`` (``(batch, time, features)``) unchanged, with a gradient that records, in column ``col``, how the
    loss gradient fades from the last time step to the first: log10(last / first), edges of 10% averaged.

    The identity also takes a (tiny) trainable variable of the layer, so the backward pass that ``fit()`` runs
    for the weights reaches it even when ``x`` is the model's input; its gradient to that variable is zero.
    """
    import tensorflow as tf

    anchor = tf.reshape(tf.cast(target.anchor.value, tf.float32), [-1])[:1]
    li = target.index

    def record(dy):
        per_t = tf.sqrt(tf.reduce_sum(tf.square(tf.cast(dy, tf.float32)), axis=[0, 2]))
        n = tf.shape(per_t)[0]
        edge = tf.maximum(1, n // TIME_EDGE_DIVISOR)
        first, last = tf.reduce_mean(per_t[:edge]), tf.reduce_mean(per_t[n - edge:])
        if target.backwards:
            first, last = last, first
        inf, nan = tf.constant(float("inf")), tf.constant(float("nan"))
        dec = tf.where(tf.logical_and(first > 0, last > 0), tf.math.log(last / first) / tf.math.log(10.0),
                       tf.where(last > 0, inf, nan))
        index = tf.reshape(tf.stack([tf.cast(slot, tf.int64), tf.constant(li, tf.int64), tf.constant(col, tf.int64)]),
                           [1, 3])
        # The raw op on the (replica-local) handle: no cross-replica merge, allowed inside a cond.
        op = tf.raw_ops.ResourceScatterNdUpdate(ref=handle, indices=index, updates=[tf.where(n >= 4, dec, nan)])
        with tf.control_dependencies([op]):
            return tf.constant(True)

    @tf.custom_gradient
    def probe(x, a):
        def grad(dy):
            done = tf.cond(sample, lambda: record(dy), lambda: tf.constant(False)) if gate else record(dy)
            with tf.control_dependencies([done]):
                return tf.identity(dy), tf.zeros_like(a)

        return tf.identity(x), grad

    return probe(x, anchor)


def _is_param(v) -> bool:
    return len(v.shape) >= 1 and "moving" not in v.path and "seed" not in v.path


def _dense32(g) -> Any:
    """A gradient as a float32 tensor (an ``IndexedSlices``' values: the rows it holds)."""
    import tensorflow as tf

    if isinstance(g, tf.IndexedSlices):
        g = g.values
    return g if g.dtype == tf.float32 else tf.cast(g, tf.float32)


def _columns(values, at: list[int], p: int, width: int) -> Any:
    """``(len(at), width)`` figures as the ``(p, width)`` columns of a row: NaN for the parameters not in ``at``."""
    import tensorflow as tf

    if values is None or not at:
        return tf.fill([p, width], float("nan"))
    if at == list(range(p)):
        return values
    return tf.tensor_scatter_nd_update(tf.fill([p, width], float("nan")), [[i] for i in at], values)
