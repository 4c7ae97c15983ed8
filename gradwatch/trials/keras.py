"""Keras trials: the compiled model cloned (``keras.models.clone_model``) with each fix applied to the clone's
layer configs, its other layers' weights copied from the original, compiled with the same optimizer config and
loss, and fitted on the same data in the same order (``shuffle=False``) from the same random seed, watched by a
silent :class:`~gradwatch.KerasCallback`. The user's model is never fitted or changed."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch.core.report import Recommendation
from gradwatch.trials.result import TrialRun, final_loss

__all__ = ["trial_keras"]

_SATURATING = ("sigmoid", "tanh", "hard_sigmoid", "softsign")
#: ``keras.utils.set_random_seed`` before each run (Python's and NumPy's states are restored afterwards; the
#: backend's seed stays set).
SEED = 0


class NotApplicable(Exception):
    """The fix cannot be applied to this model mechanically; the message says why."""


@dataclass
class _Plan:
    """How to build one run's model: config changes per layer name, norms to insert after layers, layers whose
    weights start fresh (re-initialised), optimizer config changes, and the sentence for the report."""

    change: str
    configs: dict[str, dict[str, Any]]
    classes: dict[str, type] | None = None
    norm_after: tuple[str, ...] = ()
    norm: str = ""
    fresh: frozenset[str] = frozenset()
    optimizer: dict[str, Any] | None = None
    forget_bias: tuple[str, ...] = ()


def trial_keras(model: Any, x: Any = None, y: Any = None, *, epochs: int = 1, batch_size: int = 32,
                fixes: Any = None, top: int = 3, wandb_run: Any = None):
    import keras

    from gradwatch.trials.result import health_kinds
    from gradwatch.trials.runs import Progress, candidates, check_common, finish

    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        raise ValueError(f"trial() needs a compiled Keras model: call {model.name}.compile(optimizer=..., "
                         "loss=...) first, so each run trains with the same optimizer config and loss")
    if x is None or y is None:
        raise TypeError("trial(keras_model, x, y, ...) needs the training data x and y, as for fit()")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, received {name}={value!r}")
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"x and y must hold the same number of samples, at least one; received {n} and {len(y)}")
    wanted = check_common(fixes, top)
    sizes = [min(batch_size, n - k) for k in range(0, n, batch_size)]
    steps = epochs * len(sizes)
    weights = {layer.name: layer.get_weights() for layer in model.layers}

    progress = Progress(steps * (1 + (len(wanted) if wanted else top)), "gradwatch trial: baseline")
    saved = (random.getstate(), np.random.get_state())
    try:
        baseline = _fit(keras, model, _Plan("", {}), weights, x, y, epochs, batch_size, sizes, progress)
        runs: list[TrialRun] = []
        if health_kinds(baseline.report):
            for rec in candidates(baseline.report, wanted, top):
                progress.label(f"gradwatch trial: {rec.fix}")
                try:
                    plan = _plan(keras, model, rec)
                    run = _fit(keras, model, plan, weights, x, y, epochs, batch_size, sizes, progress)
                except NotApplicable as why:
                    runs.append(TrialRun(fix=rec.fix, layers=rec.layers, applied=False, reason=str(why)))
                    progress.advance(steps)
                    continue
                cured = math.isfinite(run.final_loss) and not run.findings
                runs.append(TrialRun(fix=rec.fix, layers=rec.layers, applied=True, change=plan.change, cured=cured,
                                     final_loss=run.final_loss, losses=run.losses, report=run.report))
    finally:
        progress.close()
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return finish("keras", steps, baseline, runs, wandb_run)


def _plan(keras, model, rec: Recommendation) -> _Plan:
    by_name = {layer.name: layer for layer in model.layers}
    missing = [n for n in rec.layers if n not in by_name]
    if missing:
        raise NotApplicable(f"the model has no layer named {', '.join(missing)}")
    named = [by_name[n] for n in rec.layers]
    fix = rec.fix

    def with_activation(act: str, init: str | None) -> dict[str, dict[str, Any]]:
        out = {}
        for layer in named:
            cfg = layer.get_config()
            if "activation" not in cfg:
                raise NotApplicable(f"{layer.name} ({type(layer).__name__}) has no activation argument; trial "
                                    "changes the activation of Dense and Conv layers")
            if fix == "relu" and cfg["activation"] not in _SATURATING:
                raise NotApplicable(f"the activation of {layer.name} is {cfg['activation']!r} (its own layer, or "
                                    "not saturating), which this fix does not replace")
            out[layer.name] = {"activation": act, **({"kernel_initializer": init} if init else {})}
        return out

    names = ", ".join(rec.layers[:6]) + (" ..." if len(rec.layers) > 6 else "")
    if fix in ("relu", "leaky_relu"):
        act = "relu" if fix == "relu" else "leaky_relu"
        return _Plan(f'activation="{act}", kernel_initializer="he_normal" in {names}',
                     with_activation(act, "he_normal"), fresh=frozenset(rec.layers))
    if fix in ("he_init", "xavier_init"):
        init = "he_normal" if fix == "he_init" else "glorot_uniform"
        for layer in named:
            if "kernel_initializer" not in layer.get_config():
                raise NotApplicable(f"{layer.name} ({type(layer).__name__}) has no kernel_initializer")
        return _Plan(f'kernel_initializer="{init}" in {names}',
                     {la.name: {"kernel_initializer": init} for la in named}, fresh=frozenset(rec.layers))
    if fix in ("batch_norm", "layer_norm"):
        if not isinstance(model, keras.Sequential):
            raise NotApplicable("trial inserts norm layers into keras.Sequential models; in a functional or "
                                "subclassed model add them by hand")
        for layer in named:
            if "activation" not in layer.get_config():
                raise NotApplicable(f"{layer.name} ({type(layer).__name__}) has no activation argument")
        return _Plan(f"{'BatchNormalization' if fix == 'batch_norm' else 'LayerNormalization'} after {names}, "
                     "before their activations", {}, norm_after=tuple(rec.layers), norm=fix)
    if fix == "gradient_clipping":
        max_norm = rec.settings.get("max_norm")
        if not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise NotApplicable("the recommendation carries no clipping norm")
        radial = tuple(rec.settings.get("orthogonal_recurrent", ()))
        change = f"optimizer clipnorm={max_norm:g}"
        if radial:
            change += f'; recurrent_initializer="orthogonal" in {", ".join(radial)}'
        return _Plan(change, {n: {"recurrent_initializer": "orthogonal"} for n in radial},
                     fresh=frozenset(radial), optimizer={"clipnorm": float(max_norm), "global_clipnorm": None})
    if fix == "lower_learning_rate":
        factor = rec.settings.get("factor")
        lr = model.optimizer.get_config().get("learning_rate")
        if not isinstance(factor, (int, float)) or not factor > 1:
            raise NotApplicable("the recommendation carries no learning-rate factor")
        if not isinstance(lr, (int, float)):
            raise NotApplicable("the learning rate is a schedule; scale it by hand")
        return _Plan(f"learning_rate {lr:g} -> {lr / factor:g}", {}, optimizer={"learning_rate": lr / factor})
    if fix == "gated_rnn":
        for layer in named:
            if type(layer).__name__ != "SimpleRNN":
                raise NotApplicable(f"{layer.name} is a {type(layer).__name__}; trial replaces SimpleRNN layers")
        keep = ("units", "return_sequences", "return_state", "go_backwards", "stateful", "unroll", "name",
                "dropout", "recurrent_dropout", "use_bias")
        configs = {la.name: {k: v for k, v in la.get_config().items() if k in keep} for la in named}
        for cfg in configs.values():
            cfg["unit_forget_bias"] = True
            cfg["replace"] = True
        return _Plan(f"SimpleRNN {names} -> LSTM of the same units", configs,
                     classes={n: keras.layers.LSTM for n in rec.layers}, fresh=frozenset(rec.layers))
    if fix == "forget_gate_bias":
        for layer in named:
            if type(layer).__name__ != "LSTM":
                raise NotApplicable(f"{layer.name} is a {type(layer).__name__}; the forget gate is an LSTM's")
        return _Plan(f"forget-gate bias 1 in {names}", {}, forget_bias=tuple(rec.layers))
    if fix == "skip_connections":
        raise NotApplicable("a skip connection changes the model's wiring; add it in the functional API by hand")
    raise NotApplicable(f"trial has no mechanical form of {fix!r} for Keras")


def _build(keras, model, plan: _Plan):
    def clone_layer(layer):
        cfg = layer.get_config()
        change = plan.configs.get(layer.name)
        cls = type(layer)
        if change is not None:
            if change.pop("replace", False):
                cfg = {}
            cfg.update(change)
            cls = (plan.classes or {}).get(layer.name, cls)
        if layer.name in plan.norm_after:
            cfg = dict(cfg, activation="linear")
        return cls.from_config(cfg)

    if not plan.norm_after:
        return keras.models.clone_model(model, clone_function=clone_layer)
    layers = []
    for layer in model.layers:
        layers.append(clone_layer(layer))
        if layer.name in plan.norm_after:
            norm = keras.layers.BatchNormalization() if plan.norm == "batch_norm" else \
                keras.layers.LayerNormalization()
            layers += [norm, keras.layers.Activation(layer.get_config()["activation"])]
    return keras.Sequential([keras.Input(tuple(model.inputs[0].shape[1:]))] + layers, name=model.name)


def _fit(keras, model, plan: _Plan, weights: dict, x, y, epochs: int, batch_size: int, sizes: list[int],
         progress) -> TrialRun:
    from gradwatch.integrations.keras import KerasCallback

    # Every run starts from the same random state: the fresh layers' draws and fit()'s are the same whatever the
    # runs before did, so a run is comparable and repeatable (a 30-layer He init draw can diverge where another
    # does not: measured on JAX).
    keras.utils.set_random_seed(SEED)
    # The change dicts are consumed while cloning: build from copies.
    plan = dataclasses.replace(plan, configs={k: dict(v) for k, v in plan.configs.items()})
    clone = _build(keras, model, plan)
    for layer in clone.layers:
        old = weights.get(layer.name)
        if old is None or layer.name in plan.fresh:
            continue
        if [w.shape for w in layer.get_weights()] == [np.shape(w) for w in old]:
            layer.set_weights(old)
    for name in plan.forget_bias:
        lstm = clone.get_layer(name)
        bias = lstm.cell.bias
        units = lstm.cell.units
        value = np.asarray(bias.numpy()).copy()
        value[units:2 * units] = 1.0  # gates i, f, c, o
        bias.assign(value)
    cfg = model.optimizer.get_config()
    if plan.optimizer:
        cfg.update(plan.optimizer)
    clone.compile(optimizer=type(model.optimizer).from_config(cfg), loss=model.loss)
    recorder = _BatchLoss(keras, sizes, progress)
    cb = KerasCallback(reporters=[])
    clone.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0, callbacks=[cb, recorder])
    losses = tuple(recorder.losses)
    return TrialRun(fix=None, losses=losses, final_loss=final_loss(losses), report=cb.report())


def _BatchLoss(keras, sizes: list[int], progress):  # noqa: N802 - a class made where keras is imported
    class BatchLoss(keras.callbacks.Callback):
        """Each batch's own loss: Keras logs the epoch's running mean (weighted by batch size), so batch k's
        loss is ``(mean_k * n_k - mean_(k-1) * n_(k-1)) / size_k``."""

        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._seen, self._sum = 0, 0.0

        def on_train_batch_end(self, batch, logs=None):
            mean = float((logs or {}).get("loss", math.nan))
            size = sizes[batch] if batch < len(sizes) else sizes[-1]
            total = mean * (self._seen + size)
            self.losses.append((total - self._sum) / size if math.isfinite(total) else mean)
            self._seen += size
            self._sum = total
            progress.advance()

    return BatchLoss()
