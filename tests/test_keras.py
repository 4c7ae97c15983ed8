"""The Keras callback on real fit() runs: it judges the gradients fit() applies, and leaves no trace.

The suite runs on the backend Keras was imported with: TensorFlow in the main test run, JAX and PyTorch in their
own processes (``KERAS_BACKEND`` is fixed at import), started by ``tests/test_keras_backends.py``.
"""

from __future__ import annotations

import functools
import threading
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras", exc_type=ModuleNotFoundError)
BACKEND = keras.backend.backend()
pytest.importorskip({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(BACKEND, BACKEND),
                    exc_type=ModuleNotFoundError)

import gradwatch  # noqa: E402

pytestmark = pytest.mark.keras
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="a TensorFlow feature")


def adapter_class():
    """The adapter gradwatch uses on this backend."""
    from gradwatch.adapters.keras_backends import keras_adapter

    return keras_adapter()


def data(n=512, d=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    return x, (np.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype("float32")


def mlp(act, depth=10, init="glorot_uniform", width=64):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((20,))] + [keras.layers.Dense(width, activation=act, kernel_initializer=init)
                                                    for _ in range(depth)] + [keras.layers.Dense(1, name="head")])


def fit(model, cb, epochs=2, lr=0.1, opt=None):
    model.compile(optimizer=opt or keras.optimizers.SGD(lr), loss="mse")
    x, y = data()
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=[cb])
    return cb.report()


def test_sigmoid_mlp_vanishes_in_fit_and_relu_is_recommended():
    model = mlp("sigmoid")
    report = fit(model, gradwatch.KerasCallback(reporters=[]))
    assert report.framework == "keras" and report.step == 16  # 8 batches x 2 epochs, every one judged
    (f,) = report.findings_of("vanishing")
    assert f.step == 1 and f.layers[0] == model.layers[0].name and "head" not in f.layers
    rec = report.recommendations[0]
    assert rec.fix == "relu" and 'activation="relu"' in rec.snippet and "he_normal" in rec.snippet


def test_he_relu_mlp_is_healthy_in_fit():
    report = fit(mlp("relu", init="he_normal"), gradwatch.KerasCallback(reporters=[]), lr=0.005)
    assert report.healthy, [str(f) for f in report.findings]
    assert report.structure.layers[0].activation == "relu" and report.structure.layers[0].initializer == "HeNormal"


def test_detach_leaves_a_model_that_saves_loads_and_fits_again(tmp_path):
    model = mlp("tanh", depth=3)
    cb = gradwatch.KerasCallback(reporters=[])
    fit(model, cb, epochs=1)
    # Every wrapper is gone after fit(): the optimizer's apply, the model's train_step, the layers' call.
    assert "apply" not in model.optimizer.__dict__ and "train_step" not in model.__dict__
    assert not [layer.name for layer in model.layers if "call" in layer.__dict__]
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.models.load_model(path)
    x, y = data()
    np.testing.assert_allclose(again.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0), rtol=1e-6)
    again.fit(x, y, batch_size=64, epochs=1, verbose=0)  # fits without gradwatch
    report2 = fit(model, cb, epochs=1)  # the same callback serves a second fit()
    assert report2.step == 8


def test_internal_error_at_trace_time_warns_once_and_fit_goes_on(monkeypatch):
    import gradwatch.adapters.keras as adapter_module
    import gradwatch.adapters.keras_backends as backends_module

    def boom(*args):
        raise RuntimeError("internal bug")

    # Fails while fit() traces its train step (TensorFlow, JAX), or in its first sampled step (torch, eager).
    owner, name = {"tensorflow": (adapter_module, "_activation_stats"),
                   "jax": (backends_module, "_jax_activation_stats"),
                   "torch": (backends_module.KerasTorchAdapter, "_activation_stats")}[BACKEND]
    monkeypatch.setattr(owner, name, boom)
    model = mlp("sigmoid", depth=3)
    cb = gradwatch.KerasCallback(reporters=[])
    with pytest.warns(RuntimeWarning, match="turned monitoring off.*internal bug") as rec:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        x, y = data()
        history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[cb])
    assert len([w for w in rec if "gradwatch" in str(w.message)]) == 1
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    assert cb.report().monitoring.startswith("off")
    assert "apply" not in model.optimizer.__dict__ and "train_step" not in model.__dict__
    with pytest.raises(gradwatch.MonitoringError, match="internal bug"):
        fit(mlp("sigmoid", depth=3), gradwatch.KerasCallback(reporters=[], strict=True))


def test_internal_error_between_epochs_detaches_and_fit_goes_on(monkeypatch):
    def boom(self):
        raise RuntimeError("drain bug")

    monkeypatch.setattr(adapter_class(), "_drain_activations", boom)  # the first flush, at the end of epoch 1
    model = mlp("sigmoid", depth=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = data()
    with pytest.warns(RuntimeWarning, match="turned monitoring off.*drain bug"):
        history = model.fit(x, y, batch_size=64, epochs=3, verbose=0, callbacks=[gradwatch.KerasCallback(reporters=[])])
    # The wrappers went away mid-fit, and fit() ran its next epochs on a fresh train function.
    assert len(history.history["loss"]) == 3 and "train_step" not in model.__dict__


class DeepSigmoid(keras.Model):
    """A subclassed model with its own train_step: fit() builds it in its first step."""

    def __init__(self, manual_update=False):
        super().__init__()
        self.hidden = [keras.layers.Dense(64, activation="sigmoid", name=f"h{i}") for i in range(8)]
        self.head = keras.layers.Dense(1, name="head")
        self.manual_update = manual_update

    def call(self, x):
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)

    if BACKEND == "tensorflow":
        def train_step(self, batch):
            import tensorflow as tf

            x, y = batch
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            grads = tape.gradient(loss, self.trainable_variables)
            if self.manual_update:
                for g, v in zip(grads, self.trainable_variables):
                    v.assign_sub(0.1 * g)
            else:
                self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": loss}

    elif BACKEND == "torch":
        def train_step(self, batch):
            import torch

            x, y = batch
            self.zero_grad()
            loss = keras.ops.mean(keras.ops.square(self(x, training=True) - y))
            loss.backward()
            grads = [v.value.grad for v in self.trainable_variables]
            with torch.no_grad():
                if self.manual_update:
                    for g, v in zip(grads, self.trainable_variables):
                        v.assign(v.value - 0.1 * g)
                else:
                    self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": loss}

    else:  # JAX: the stateless train step of Keras' "customizing fit() with JAX" guide
        def train_step(self, state, batch):
            import jax

            trainable, non_trainable, optimizer_vars, metrics_vars = state
            x, y = batch

            def loss_fn(tv, ntv):
                pred, ntv = self.stateless_call(tv, ntv, x)
                return keras.ops.mean(keras.ops.square(pred - y)), ntv

            (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, non_trainable)
            if self.manual_update:
                trainable = [v - 0.1 * g for v, g in zip(trainable, grads)]
            else:
                trainable, optimizer_vars = self.optimizer.stateless_apply(optimizer_vars, grads, trainable)
            return {"loss": loss}, (trainable, non_trainable, optimizer_vars, metrics_vars)


def test_subclassed_model_with_custom_train_step():
    keras.utils.set_random_seed(0)
    model = DeepSigmoid()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x, y = data()
    cb = gradwatch.KerasCallback(reporters=[], activation_every=2)
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[cb])
    report = cb.report()
    first = 2 if BACKEND == "tensorflow" else 1  # fit() on JAX and torch builds the model before its first step
    if first == 2:  # unbuilt until its first step: watched from step 2, and the report says so
        assert any("watches from step 2" in n for n in report.notes)
    assert report.step == 16 and report.collected_steps == 17 - first
    assert [la.name for la in report.structure.layers] == [f"h{i}" for i in range(8)] + ["head"]
    f = report.findings_of("vanishing")[0]
    assert f.layers[0] == "h0" and f.step == first
    assert report.recommendations[0].fix == "relu" and np.isfinite(report.layer("h0").saturation)
    assert "train_step" not in model.__dict__ and "apply" not in model.optimizer.__dict__

    keras.utils.set_random_seed(0)
    manual = DeepSigmoid(manual_update=True)  # never calls the optimizer: gradwatch cannot see its updates
    manual(x[:1])
    manual.compile(optimizer=keras.optimizers.SGD(0.1))
    cb = gradwatch.KerasCallback(reporters=[])
    manual.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[cb])
    report = cb.report()
    assert report.collected_steps == 0 and any("apply() never ran" in n for n in report.notes)


def test_functional_model_with_skip_connections_and_a_frozen_layer():
    keras.utils.set_random_seed(0)
    inp = keras.Input((20,))
    x = keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal", name="stem")(inp)
    for i in range(4):
        y = keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal", name=f"b{i}a")(x)
        y = keras.layers.Dense(64, kernel_initializer="he_normal", name=f"b{i}b")(y)
        x = keras.layers.Activation("relu")(keras.layers.Add()([x, y]))
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(x))
    model.get_layer("b0a").trainable = False
    report = fit(model, gradwatch.KerasCallback(reporters=[]), opt=keras.optimizers.Adam(1e-3))
    assert report.healthy, [str(f) for f in report.findings]
    assert report.structure.residual_adds == 4
    assert report.layer("b0a").status == "frozen" and report.layer("b1a").status == "ok"
    assert report.structure.layer("b1a").activation == "relu" and report.structure.layer("b1b").activation is None


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"KerasCallback\(\) got unknown option\(s\) 'evry'"):
        gradwatch.KerasCallback(evry=2)
    with pytest.raises(ValueError, match=r"flush_every must be an int >= 1"):
        gradwatch.KerasCallback(flush_every=0)
    model = mlp("relu", depth=2)
    with pytest.raises(gradwatch.AttachError, match=r"not compiled: call model.compile"):
        gradwatch.attach(model)


def test_deep_relu_on_default_glorot_vanishes_and_he_normal_does_not():
    """Keras' Dense default is Glorot uniform: a 30-layer ReLU stack on it is a real He-init case."""
    model = mlp("relu", depth=30)
    glorot = fit(model, gradwatch.KerasCallback(reporters=[]), lr=0.01, epochs=4)
    (f,) = glorot.findings_of("vanishing")
    assert f.step == 1 and f.layers[0] == model.layers[0].name
    rec = glorot.recommendations[0]
    assert rec.fix == "he_init" and 'kernel_initializer="he_normal"' in rec.snippet and "head" not in rec.layers
    he = fit(mlp("relu", depth=30, init="he_normal"), gradwatch.KerasCallback(reporters=[]), lr=0.01, epochs=4)
    assert he.healthy, [str(f) for f in he.findings]


def test_huge_learning_rate_goes_nonfinite_with_its_origin():
    report = fit(mlp("relu", depth=6, init="he_normal"), gradwatch.KerasCallback(reporters=[]), lr=3.0)
    (f,) = report.findings_of("nonfinite")
    assert f.step <= 4 and f.severity == "critical"
    assert report.recommendations[0].fix == "lower_learning_rate"
    assert "learning_rate" in report.recommendations[0].snippet


@pytest.mark.parametrize("width, depth", [(64, 3), (160, 4)])
def test_nan_gradient_between_detail_steps_is_found_at_its_step_and_counted(width, depth):
    # Max |g| and the non-finite count are taken every update_every collected steps; a step whose gradient norm is
    # not finite is counted at once. A NaN input row at step 5 (batch 5 of the first epoch) makes every gradient NaN.
    # 3 layers of 64 (8.5k weights) measure without a cond on TensorFlow; 4 of 160 (80.8k) in their functional Ifs.
    x, y = data()
    x[4 * 64] = np.nan
    model = mlp("tanh", depth=depth, width=width)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    cb = gradwatch.KerasCallback(reporters=[])
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    (f,) = cb.report().findings_of("nonfinite")
    assert f.step == 5 and f.severity == "critical"
    n_weights = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert f.evidence["nonfinite_values"] == n_weights  # counted exactly, though step 5 is no detail step


def test_checkpoint_saved_mid_fit_loads_without_gradwatch(tmp_path):
    # On JAX gradwatch's ring lives among the optimizer's variables while it is attached; a checkpoint written then
    # (ModelCheckpoint, mid-fit) must hold the optimizer's own state only, and load into a model without gradwatch.
    path = str(tmp_path / "ckpt.weights.h5")
    model = mlp("relu", depth=3, init="he_normal")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x, y = data()
    saver = keras.callbacks.ModelCheckpoint(path, save_weights_only=True, save_freq=6)
    cb = gradwatch.KerasCallback(reporters=[])
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[cb, saver])
    assert cb.report().step == 8
    n_opt = len(model.optimizer.variables)  # after fit: gradwatch's ring variables are gone again
    fresh = mlp("relu", depth=3, init="he_normal")
    fresh.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    fresh.optimizer.build(fresh.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Skipping variable loading for optimizer ..." would be a warning
        fresh.load_weights(path)
    assert len(fresh.optimizer.variables) == n_opt
    assert int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 6  # the optimizer state came back


def test_small_cnn_with_batch_norm_is_healthy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16, 16, 3)).astype("float32")
    y = (x[:, :8, :, 0].mean(axis=(1, 2)) > 0).astype("int32")
    keras.utils.set_random_seed(0)
    layers = [keras.Input((16, 16, 3))]
    for _ in range(6):
        layers += [keras.layers.Conv2D(16, 3, padding="same", use_bias=False), keras.layers.BatchNormalization(),
                   keras.layers.ReLU()]
    model = keras.Sequential(layers + [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = gradwatch.KerasCallback(reporters=[])
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[cb])
    report = cb.report()
    assert report.healthy and report.step == 24, [str(f) for f in report.findings]
    conv = report.structure.layers[0]
    assert conv.kind == "conv" and conv.normalized and conv.activation == "relu"


@pytest.mark.parametrize("compile_kw", [{"jit_compile": True}, pytest.param({"steps_per_execution": 4}, marks=(
    pytest.mark.skipif(BACKEND == "torch", reason="Keras: steps_per_execution must be 1 on the torch backend")))])
def test_xla_and_steps_per_execution_see_every_step(compile_kw):
    model = mlp("sigmoid")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", **compile_kw)
    cb = gradwatch.KerasCallback(reporters=[])
    x, y = data()
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[cb])
    report = cb.report()
    assert report.step == report.collected_steps == 16
    assert report.findings_of("vanishing")[0].layers[0] == model.layers[0].name
    assert "apply" not in model.optimizer.__dict__


def test_mixed_precision_judges_unscaled_gradients_and_counts_skipped_steps():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mlp("sigmoid")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        cb = gradwatch.KerasCallback(reporters=[])
        x, y = data()
        model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[cb])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    report = cb.report()
    # The loss scale starts at 2**15 and halves on each overflow: the first steps are skipped, not exploding.
    assert report.step == 16 and 0 < report.skipped_steps < 16
    assert not report.findings_of("exploding") and not report.findings_of("nonfinite")
    # Unscaled: the output layer's gradient RMS is of the order of the float32 model's, not 2**15 times it.
    reference = fit(mlp("sigmoid"), gradwatch.KerasCallback(reporters=[]))
    # (Within 10x either way: the runs skip different steps; a scaled gradient would be about 3e4 times larger.)
    ratio = report.layer("head").grad_rms / reference.layer("head").grad_rms
    assert 0.1 < ratio < 10, ratio
    assert "apply" not in model.optimizer.__dict__ and "apply" not in model.optimizer.inner_optimizer.__dict__


MIRRORED = r"""
import os, json
os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np, keras, gradwatch

rng = np.random.default_rng(0)
x = rng.standard_normal((512, 20)).astype("float32")
y = (np.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype("float32")

def run(strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((20,))] + [keras.layers.Dense(64, activation="sigmoid")
                                 for _ in range(10)] + [keras.layers.Dense(1, name="head")])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    cb = gradwatch.KerasCallback(reporters=[], strict=True)
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    r = cb.report()
    return {"replicas": strategy.num_replicas_in_sync, "step": r.step, "collected": r.collected_steps,
            "findings": [[f.kind, f.step, f.layers[0]] for f in r.findings], "first_layer": model.layers[0].name,
            "fixes": [rec.fix for rec in r.recommendations],
            "head_trend": list(r.layer("head").grad_rms_trend), "wrapped": "apply" in model.optimizer.__dict__}

def run_rnn(strategy):  # activations and the time probe write per replica, inside tf.cond
    seq = (rng.standard_normal((256, 60, 4)) * 0.5).astype("float32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((60, 4)), keras.layers.SimpleRNN(32, name="rnn"),
                                  keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.Adam(0.001),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = gradwatch.KerasCallback(reporters=[], strict=True, activation_every=2)
    model.fit(seq, (seq[:, 0, 0] > 0).astype("int32"), batch_size=64, epochs=2, verbose=0, shuffle=False,
              callbacks=[cb])
    r = cb.report()
    f = r.findings_of("vanishing")
    return {"decades": f[0].evidence["time_decades"]["rnn"] if f else None,
            "fixes": [rec.fix for rec in r.recommendations], "saturation": r.layer("rnn").saturation}

strategies = [tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), tf.distribute.get_strategy()]
print(json.dumps([run(s) for s in strategies] + [run_rnn(s) for s in strategies]))
"""


@tf_only
def test_mirrored_strategy_reports_the_aggregated_gradients_once():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    mirrored, single, rnn_mirrored, rnn_single = json.loads(out.stdout.strip().splitlines()[-1])
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    assert mirrored["step"] == mirrored["collected"] == 16  # once per step, not once per replica
    assert mirrored["findings"][0][:2] == ["vanishing", 1] and mirrored["fixes"][0] == "relu"
    # The summed replica gradients are the global batch's gradient: the same figures as on one device.
    np.testing.assert_allclose(mirrored["head_trend"], single["head_trend"], rtol=1e-3)
    assert not mirrored["wrapped"]
    # Sampled forward figures come from the first replica's half of the batch: close to, not equal to, one device.
    assert rnn_mirrored["fixes"][0] == rnn_single["fixes"][0] == "gated_rnn"
    assert rnn_mirrored["decades"] > 2 and abs(rnn_mirrored["decades"] - rnn_single["decades"]) < 0.5
    assert abs(rnn_mirrored["saturation"] - rnn_single["saturation"]) < 0.1


def long_memory_fit(cell, callbacks, epochs=4, **compile_kw):
    """A recurrent classifier whose label is the sign of the first of 60 time steps."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, 60, 4)) * 0.5).astype("float32")
    y = (x[:, 0, 0] > 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((60, 4)), getattr(keras.layers, cell)(32, name="rnn"),
                              keras.layers.Dense(2, name="head")])
    model.compile(optimizer=keras.optimizers.Adam(0.001),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **compile_kw)
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks)
    return model, history.history["loss"]


@pytest.mark.parametrize("compile_kw", [{}, pytest.param({"jit_compile": True}, marks=pytest.mark.skipif(
    BACKEND == "torch", reason="torch backend: no activation sampling under jit_compile (tested below)"))])
def test_simple_rnn_on_long_memory_vanishes_through_time_and_gets_gated_rnn(compile_kw):
    cb = gradwatch.KerasCallback(reporters=[], activation_every=4)
    model, losses = long_memory_fit("SimpleRNN", [cb], **compile_kw)
    report = cb.report()
    # Measured in fit()'s own backward pass: the input gradient of the first time steps against the last ones.
    (f,) = report.findings_of("vanishing")
    assert f.layers == ("rnn",) and f.step == 1 and f.evidence["through_time"]
    assert f.evidence["time_decades"]["rnn"] > 2
    rec = report.recommendations[0]
    assert rec.fix == "gated_rnn" and rec.layers == ("rnn",) and "layers.LSTM(units)" in rec.snippet
    assert 0 <= report.layer("rnn").saturation < 0.5  # tanh outputs sampled, not saturated
    assert "call" not in model.get_layer("rnn").__dict__ and "train_step" not in model.__dict__
    # The probe is an identity with a zero side gradient: training is bit-for-bit the same without gradwatch.
    unwatched, plain = long_memory_fit("SimpleRNN", [], **compile_kw)
    assert losses == plain
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), unwatched.get_weights()))


@tf_only
def test_the_sampled_train_function_traces_a_recurrent_layer_once(monkeypatch):
    """The train function of sampled steps is traced knowing that its step is sampled: the recurrent layer runs
    with its time probes, with no cond whose other branch would trace the layer a second time, and the
    through-time figures still arrive."""
    calls: list[int] = []
    real = keras.layers.SimpleRNN.call

    @functools.wraps(real)  # Keras reads call()'s signature
    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.SimpleRNN, "call", counted)
    cb = gradwatch.KerasCallback(reporters=[], activation_every=4)
    long_memory_fit("SimpleRNN", [cb])
    assert len(calls) == 2  # the train function of sampled steps and the other one, one trace each
    (f,) = cb.report().findings_of("vanishing")
    assert f.step == 1 and f.evidence["through_time"] and f.evidence["time_decades"]["rnn"] > 2


@pytest.mark.skipif(BACKEND != "jax", reason="JAX: the figures of fit()'s jitted sampled steps are its outputs")
def test_jax_sampled_steps_return_their_figures_without_host_callbacks(monkeypatch):
    """A host callback in the jitted step held each sampled step back by about 5 ms: the activation and
    through-time figures now leave the step as outputs of its jitted function, read at the flush. With every
    ``jax.debug.callback`` failing, both still arrive, on the schedule, and monitoring stays on."""
    import jax

    def refused(*args, **kwargs):
        raise AssertionError("a host callback in fit()'s jitted step")

    monkeypatch.setattr(jax.debug, "callback", refused)
    cb = gradwatch.KerasCallback(reporters=[], activation_every=4)
    long_memory_fit("SimpleRNN", [cb])
    report = cb.report()
    assert report.monitoring == "detached"  # at the end of fit(), not "off" after an internal error
    (f,) = report.findings_of("vanishing")
    assert f.step == 1 and f.evidence["through_time"] and f.evidence["time_decades"]["rnn"] > 2
    assert 0 <= report.layer("rnn").saturation < 0.5

    keras.utils.set_random_seed(0)
    model = mlp("sigmoid", depth=3)
    sampled = gradwatch.KerasCallback(reporters=[], activation_every=2)
    report = fit(model, sampled, epochs=1)
    assert report.monitoring == "detached" and all(np.isfinite(report.layer(la.name).saturation)
                                             for la in model.layers if la.activation.__name__ == "sigmoid")

    # A loss scaler's skipped steps are told apart on the device too (an ordered callback cost every step ~8 ms),
    # in a first fit() and in a second one, whose optimizer counters carry the first's steps.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mlp("sigmoid")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        x, y = data()
        reports, applied = [], []
        for _ in range(2):
            cb = gradwatch.KerasCallback(reporters=[])
            before = int(model.optimizer.inner_optimizer.iterations.numpy())  # counts the applied steps only
            model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[cb])
            reports.append(cb.report())
            applied.append(int(model.optimizer.inner_optimizer.iterations.numpy()) - before)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    first, second = reports
    assert first.monitoring == second.monitoring == "detached"
    assert first.step == second.step == 16 and 0 < first.skipped_steps < 16
    assert [r.skipped_steps for r in reports] == [16 - n for n in applied]


@pytest.mark.skipif(BACKEND != "jax", reason="JAX: eager steps send their figures through a host callback")
def test_jax_eager_and_jitted_fits_sample_the_same_activations():
    """``run_eagerly`` steps are not jitted: there the figures still go through ``jax.debug.callback``. Both ways
    give the same saturation and RMS, layer by layer."""
    def sampled(eager: bool):
        keras.utils.set_random_seed(0)
        model = mlp("sigmoid", depth=3)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=eager)
        x, y = data()
        cb = gradwatch.KerasCallback(reporters=[], activation_every=2)
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[cb])
        report = cb.report()
        return [(la.saturation, la.activation_rms) for la in report.layers[:3]]

    eager, jitted = sampled(True), sampled(False)
    assert all(np.isfinite(v) for pair in jitted for v in pair)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5)


def test_simple_rnn_with_recurrent_radius_3_explodes_through_time_and_gets_clipping():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, 30, 4)) * 0.5).astype("float32")
    model = keras.Sequential([keras.Input((30, 4)), keras.layers.SimpleRNN(
        32, name="rnn", recurrent_initializer=keras.initializers.Orthogonal(gain=3.0)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = gradwatch.KerasCallback(reporters=[], activation_every=4)
    # Three epochs (six samples): on JAX (XLA's tanh) one early sample can read 1.6 decades through time where
    # TensorFlow's pinned units read inf, and the finding needs three samples in a row.
    model.fit(x, (x[:, 0, 0] > 0).astype("int32"), batch_size=64, epochs=3, verbose=0, callbacks=[cb])
    report = cb.report()
    assert report.structure.layer("rnn").recurrent_radius == pytest.approx(3.0, rel=1e-3)
    (f,) = report.findings_of("exploding")
    assert f.step == 1 and f.layers == ("rnn",) and f.evidence["time_decades"]["rnn"] < -2
    # One update later the tanh units are pinned at +-1 and the gradient through time is gone: both are shown.
    assert report.layer("rnn").saturation > 0.5 and report.findings_of("vanishing")
    rec = report.recommendations[0]
    assert rec.fix == "gradient_clipping" and "clipnorm=1" in rec.snippet and "orthogonal" in rec.snippet


def test_lstm_on_long_memory_is_healthy():
    cb = gradwatch.KerasCallback(reporters=[], activation_every=4)
    _, _ = long_memory_fit("LSTM", [cb])
    report = cb.report()
    assert report.healthy and report.step == 32, [str(f) for f in report.findings]
    assert report.structure.layers[0].recurrent_cell == "lstm"
    assert np.isfinite(report.layer("rnn").activation_rms)  # sampled, and judged healthy: a gated cell


def test_saturation_and_dead_units_are_sampled_in_fit():
    """Activations from Dense(activation=...) and from separate Activation / ReLU layers, sampled in fit()."""
    keras.utils.set_random_seed(0)
    big = keras.initializers.RandomNormal(stddev=2.0)  # pre-activations of std ~9: sigmoid pinned at 0 or 1
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="sigmoid", kernel_initializer=big,
                                                                     name="d0"),
                              keras.layers.Dense(64, kernel_initializer=big, name="d1"),
                              keras.layers.Activation("sigmoid"), keras.layers.Dense(1, name="head")])
    report = fit(model, gradwatch.KerasCallback(reporters=[], activation_every=2), lr=0.01)
    assert report.layer("d0").saturation > 0.5 and report.layer("d1").saturation > 0.5
    (f,) = report.findings_of("saturation")
    assert set(f.layers) == {"d0", "d1"}

    keras.utils.set_random_seed(0)
    dense = [keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal", name=f"d{i}")
             for i in range(4)]
    model = keras.Sequential([keras.Input((20,)), dense[0], dense[1],
                              keras.layers.Dense(64, kernel_initializer="he_normal", name="off",
                                                 bias_initializer=keras.initializers.Constant(-100.0)),
                              keras.layers.ReLU(), dense[2], keras.layers.Dense(1, name="head")])
    report = fit(model, gradwatch.KerasCallback(reporters=[], activation_every=2), lr=0.01)
    assert report.layer("off").dead_fraction == 1.0 and report.layer("d0").dead_fraction < 0.5
    (f,) = report.findings_of("dead_units")
    assert f.layers[0] == "off"  # and the ReLU after it, which only ever receives those zeros
    leaky = next(r for r in report.recommendations if r.fix == "leaky_relu")
    assert "off" in leaky.layers and "LeakyReLU" in leaky.snippet

def test_activations_are_sampled_on_step_one_and_every_activation_every_in_every_fit():
    """The sampled steps are picked outside the traced step (TensorFlow, JAX: one of two train functions), so they
    must follow the schedule exactly, also in a second fit() (the callback watches each fit() afresh)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    cb = gradwatch.KerasCallback(reporters=[], activation_every=4, flush_every=5)
    sampled = []

    class Spy(keras.callbacks.Callback):  # after gradwatch's callback: its watcher exists by then
        def on_train_begin(self, logs=None):
            adapter = cb.watcher.adapter
            if "drain" in adapter.__dict__:
                return
            drain = adapter.drain

            def spy():
                batch, acts = drain()
                if acts is not None:
                    sampled.extend(int(s) for s in acts.steps)
                return batch, acts

            adapter.drain = spy

    x, y = data()  # 512 rows: 8 batches of 64
    model.fit(x[:384], y[:384], batch_size=64, epochs=2, verbose=0, callbacks=[cb, Spy()])  # steps 1-12
    cb.report()
    assert sampled == [1, 4, 8, 12]
    model.fit(x[:384], y[:384], batch_size=64, epochs=1, verbose=0, callbacks=[cb, Spy()])  # steps 1-6 again
    report = cb.report()
    assert sampled == [1, 4, 8, 12, 1, 4] and report.step == 6
    assert np.isfinite(report.layer("hidden").saturation)


def test_keras_run_log_and_wandb(tmp_path):
    wandb = pytest.importorskip("wandb", exc_type=ModuleNotFoundError)
    from tests.fixtures.wandb_records import read_run

    run = wandb.init(project="gradwatch-tests", mode="offline", dir=tmp_path)
    try:
        model = mlp("sigmoid")
        cb = gradwatch.KerasCallback(reporters=["wandb"], log_dir=tmp_path / "log", flush_every=4)
        report = fit(model, cb)
    finally:
        run.finish()
    assert gradwatch.load(tmp_path / "log").to_dict() == report.to_dict()
    logged = read_run(tmp_path)
    first = model.layers[0].name
    assert any(f"gradwatch/grad_rms/{first}" in h for h in logged.history)
    assert [a.title for a in logged.alerts] == ["gradwatch: vanishing since step 1"]
    assert logged.summary["gradwatch/verdict"] == "problems: vanishing"


def test_every_measures_every_nth_step_of_fit():
    """KerasCallback(every=5) collects steps 1, 6, 11, 16 of a 16-step fit(), with the figures an every-step
    watch measures at those steps (gradwatch does not change training, so both runs train alike)."""
    full = fit(mlp("tanh", depth=4), gradwatch.KerasCallback(reporters=[]))
    sparse = fit(mlp("tanh", depth=4), gradwatch.KerasCallback(reporters=[], every=5))
    assert (full.step, full.collected_steps) == (16, 16)
    assert (sparse.step, sparse.collected_steps) == (16, 4)
    assert sparse.trend_steps == (1, 6, 11, 16)
    at = [full.trend_steps.index(s) for s in sparse.trend_steps]
    for a, b in zip(full.layers, sparse.layers):
        np.testing.assert_allclose([a.grad_rms_trend[i] for i in at], b.grad_rms_trend, rtol=1e-4)


def test_callback_keeps_fits_asynchronous_dispatch_and_records_the_same_steps_and_losses():
    """On JAX and torch Keras runs batch-end hooks in a worker thread unless a callback vetoes it; gradwatch does not
    (a hook on fit()'s thread waits for every step). Its batch-ends then run off fit()'s thread, and a fit with a
    flush every 7 steps (drains while losses are still on their way) records the same steps, figures and losses
    as a fit that another callback keeps synchronous. TensorFlow's Keras is always synchronous."""

    class Spy(gradwatch.KerasCallback):
        def on_train_begin(self, logs=None):
            self.threads = {"fit": threading.get_ident(), "batch_end": set()}
            super().on_train_begin(logs)

        def on_train_batch_end(self, batch, logs=None):
            self.threads["batch_end"].add(threading.get_ident())
            super().on_train_batch_end(batch, logs)

    class Veto(keras.callbacks.Callback):  # a batch-end hook not marked async-safe: Keras stays synchronous
        def on_train_batch_end(self, batch, logs=None):
            pass

    x, y = data(n=480)
    runs = {}
    for name, extra in (("async", []), ("sync", [Veto()])):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((20,)), keras.layers.Reshape((5, 4)), keras.layers.SimpleRNN(16),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        cb = Spy(reporters=[], flush_every=7)
        model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[cb, *extra])
        h = cb.watcher.history
        runs[name] = (cb.threads, h.steps, h.values, h.extra("loss"), cb.report())
    (t_async, *a, rep_a), (t_sync, *s, rep_s) = runs["async"], runs["sync"]
    assert t_sync["batch_end"] == {t_sync["fit"]}
    if BACKEND == "tensorflow":
        assert t_async["batch_end"] == {t_async["fit"]}
    else:
        assert t_async["fit"] not in t_async["batch_end"]
    assert rep_a.step == rep_s.step == 90 and a[0].tolist() == list(range(1, 91))
    assert np.isfinite(a[2]).all() and np.isfinite(s[2]).all()  # every step's loss, the last of each flush too
    for got, want in zip(a, s):
        np.testing.assert_array_equal(got, want)
    assert [f.kind for f in rep_a.findings] == [f.kind for f in rep_s.findings]


@tf_only
@pytest.mark.parametrize("width, ifs", [(64, 0), (160, 2)])
def test_measure_gates_are_functional_ifs_on_larger_models_and_none_on_small_ones(monkeypatch, width, ifs):
    """In a real fit(), what gradwatch takes on measure steps only (max |g|, the weights before the update, the update
    norms) is gated by functional If ops, which TensorFlow does not lower to Switch/Merge (whose branch not taken is
    still visited every step), from 2**16 weights up (4 layers of 160: 80.8k). A smaller model (4 layers of 64: 13.9k)
    has no If in its step: an If costs more a step than these ops on small tensors. Either way, what they gate
    arrives on the measure steps (1 and 11 of 16), NaN on the others."""
    import tensorflow as tf

    import gradwatch.adapters.keras as keras_adapter
    from gradwatch.core.stats import GRAD_MAX, GRAD_NORM, UPDATE_NORM

    made = []
    real = keras_adapter._functional_cond

    def recording(pred, true_fn, false_fn):
        graph = tf.compat.v1.get_default_graph()
        before = len(graph.get_operations())
        out = real(pred, true_fn, false_fn)
        made.extend(op for op in graph.get_operations()[before:] if op.type in ("If", "StatelessIf"))
        return out

    monkeypatch.setattr(keras_adapter, "_functional_cond", recording)
    cb = gradwatch.KerasCallback(reporters=[], activation_every=0)  # one train function, traced once
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,))] + [keras.layers.Dense(width, activation="tanh") for _ in range(4)]
                             + [keras.layers.Dense(1)])
    fit(model, cb, epochs=2)
    assert (sum(int(np.prod(w.shape)) for w in model.trainable_weights) >= 2 ** 16) == (ifs > 0)
    assert len(made) == ifs  # the weights before the update; max |g| and the update norms
    assert all(op.get_attr("_lower_using_switch_merge") is False for op in made)
    history = cb.watcher.history
    measured = np.isin(history.steps, [1, 11])
    values = history.values
    assert list(history.steps) == list(range(1, 17))
    assert np.isfinite(values[:, :, GRAD_NORM]).all()
    for col in (GRAD_MAX, UPDATE_NORM):
        assert np.isfinite(values[measured][:, :, col]).all() and (values[measured][:, :, col] > 0).all()
        assert np.isnan(values[~measured][:, :, col]).all()


def trace_marker(graphs: list):
    """An identity layer that appends the graph it is traced in to ``graphs``: one entry per trace of the train step
    it runs in (TensorFlow)."""
    import tensorflow as tf

    class TraceMarker(keras.layers.Layer):
        def call(self, x):
            graphs.append(tf.compat.v1.get_default_graph())
            return x

    return TraceMarker()


@tf_only
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_fit_traces_each_train_function_once_and_the_optimizer_is_as_without_gradwatch(policy):
    """fit() on TensorFlow builds the optimizer inside the first trace of its step, and tf.function traces a step
    that created variables a second time. gradwatch builds it before that trace, as the trace would: its two
    train functions (sampled steps, the others) are traced once each, and the trained weights and the optimizer's
    variables (paths and values, the loss scaler's included) are those of the same fit without gradwatch."""
    calls: list = []
    x, y = data(256)
    def run(callbacks):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((20,)), trace_marker(calls),
                                      keras.layers.Dense(32, activation="tanh", name="h"),
                                      keras.layers.Dense(1, name="out")], name="net")
            opt = keras.optimizers.Adam(1e-3, name="adam")
            if policy != "float32":
                opt = keras.optimizers.LossScaleOptimizer(opt, name="scaled")
            model.compile(optimizer=opt, loss="mse")
            calls.clear()
            model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=callbacks)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        return len(calls), model

    traces, plain = run([])
    assert traces == 2  # Keras alone: the one train function, traced twice (what this saves)
    for every, functions in ((25, 2), (0, 1)):
        cb = gradwatch.KerasCallback(reporters=[], activation_every=every)
        traces, model = run([cb])
        assert traces == functions, (every, traces)
        assert cb.report().collected_steps == 8
        assert [v.path for v in model.optimizer.variables] == [v.path for v in plain.optimizer.variables]
        for a, b in zip(model.optimizer.variables + model.weights, plain.optimizer.variables + plain.weights):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


@tf_only
@pytest.mark.parametrize("fails", [None, "in the user's layer", "in gradwatch"])
def test_the_other_train_function_is_traced_in_a_thread_during_the_first_step(monkeypatch, fails):
    """fit()'s first step runs the train function of sampled steps; the other one is traced in a thread while it
    runs, so the second step finds it traced (fit()'s start: the trace overlaps the runtime's work on the first
    step). Each function is traced once, and the weights and the report are those of the same fit whose second
    step traces its own function. A trace that fails in the thread, in a layer or inside gradwatch, is made again
    by the second step's call on fit()'s thread: no warning, monitoring stays on."""
    from gradwatch.adapters import keras as gk

    threads: list[str] = []
    ahead = "gradwatch-trace-ahead"

    class Marker(keras.layers.Layer):
        def call(self, x):
            threads.append(threading.current_thread().name)
            if fails == "in the user's layer" and threads[-1] == ahead:
                raise RuntimeError("a trace that fails in the thread")
            return x

    real = gk.KerasAdapter._measure_grads

    def measure(self, *args):
        if fails == "in gradwatch" and threading.current_thread().name == ahead:
            raise RuntimeError("internal bug in the thread")
        return real(self, *args)

    monkeypatch.setattr(gk.KerasAdapter, "_measure_grads", measure)

    def run():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((20,)), Marker(name="marker"),
                                  keras.layers.Dense(32, activation="tanh", name="t"),
                                  keras.layers.Dense(32, activation="sigmoid", name="s"),
                                  keras.layers.Dense(1, name="head")], name="net")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        cb = gradwatch.KerasCallback(reporters=[], activation_every=4)
        threads.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(*data(), batch_size=64, epochs=2, verbose=0, callbacks=[cb])
        assert not [w for w in caught if "gradwatch" in str(w.message)]
        return list(threads), model, cb.report()

    traced, model, report = run()
    main = threading.current_thread().name
    assert traced == ([main, ahead, main] if fails else [main, ahead])
    monkeypatch.setattr(gk._TraceAhead, "before", lambda self, fn, iterator: None)
    own, alone, expected = run()
    assert own == [main, main]
    assert report.collected_steps == 16 and np.isfinite(report.layer("s").saturation)
    assert report.to_dict() == expected.to_dict() and report.monitoring == "detached"
    for a, b in zip(model.weights, alone.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


@tf_only
@pytest.mark.parametrize("width, most", [(64, 17), (96, 21)])
def test_gradwatch_adds_few_graph_ops_a_weight_to_the_traced_step(width, most):
    """fit()'s start on TensorFlow is mostly tracing, at about 0.4 ms an op on the project's CPU: gradwatch's share
    of the traced train step, branch functions included, stays a few ops a weight. 10 layers of 96 (85.9k weights,
    measured in two conds): 19; 27.5 before its max |g| and update norms shared one cond. Of 64 (38.8k weights,
    no cond): 15.3."""
    graphs: list = []

    def ops(callbacks: list) -> tuple[int, int]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((20,)), trace_marker(graphs)] + [
            keras.layers.Dense(width, activation="tanh") for _ in range(10)] + [keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        x, y = data()
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=callbacks)
        graph = graphs[-1].as_graph_def()  # the last trace: Keras alone traces twice (the optimizer's build)
        return len(graph.node) + sum(len(f.node_def) for f in graph.library.function), len(model.trainable_weights)

    plain, weights = ops([])
    cb = gradwatch.KerasCallback(reporters=[], activation_every=0)  # one train function: every step's
    watched, _ = ops([cb])
    assert cb.report().collected_steps == 8
    per_weight = (watched - plain) / weights
    assert 10 < per_weight < most, per_weight


@tf_only
def test_a_train_step_of_the_users_builds_its_optimizer_itself():
    """A train_step of the user's may apply a part of the weights: its optimizer is left for it to build, with
    the variables it applies (here the head's only, as without gradwatch)."""

    class HeadOnly(keras.Sequential):
        def train_step(self, batch):
            import tensorflow as tf

            x, y = batch
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            head = self.layers[-1].trainable_variables
            self.optimizer.apply(tape.gradient(loss, head), head)
            return {"loss": loss}

    keras.utils.set_random_seed(0)
    model = HeadOnly([keras.Input((20,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y = data(256)
    cb = gradwatch.KerasCallback(reporters=[])
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[cb])
    slots = [v for v in model.optimizer.variables if v.path.endswith("_momentum")]
    assert len(slots) == 2  # the head's kernel and bias; built with every weight it would have four
    assert cb.report().collected_steps == 4


@pytest.mark.skipif(BACKEND != "torch", reason="the torch backend's jit_compile")
def test_torch_backend_jit_compile_judges_gradients_and_says_activations_are_off():
    cb = gradwatch.KerasCallback(reporters=[], activation_every=4)
    long_memory_fit("SimpleRNN", [cb], epochs=2, jit_compile=True)
    report = cb.report()
    assert report.step == report.collected_steps == 16
    assert any("not sampled under jit_compile=True" in n for n in report.notes)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX-only")
def test_jax_data_parallel_reports_each_step_once_with_the_global_gradient():
    import jax

    if len(jax.devices()) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2 (tests/test_keras_backends.py sets it)")
    x, y = data()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()[:2]))
    try:
        model = mlp("sigmoid")
        parallel = fit(model, gradwatch.KerasCallback(reporters=[]))
    finally:
        keras.distribution.set_distribution(None)
    single = fit(mlp("sigmoid"), gradwatch.KerasCallback(reporters=[]))
    assert parallel.step == parallel.collected_steps == 16  # once per step, not once per device

    def verdict(report):  # layers by position: the two models' auto-generated names differ
        where = {la.name: i for i, la in enumerate(report.layers)}
        return [(f.kind, f.step, [where[n] for n in f.layers]) for f in report.findings]

    assert verdict(parallel) == verdict(single) and verdict(single)
    np.testing.assert_allclose(parallel.layer("head").grad_rms_trend, single.layer("head").grad_rms_trend,
                               rtol=1e-3)  # the batch is split over the devices; the gradient is the global one


def test_keras_2_model_gets_a_clear_error():
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(4,))])
    with pytest.raises(TypeError, match=r"is a Keras 2 model .*gradwatch watches Keras 3 models"):
        gradwatch.attach(model)


def test_trial_cures_the_sigmoid_mlp_and_leaves_the_model_alone():
    """gradwatch.trial on a compiled Keras model: the clone with ReLU + He normal cures it; the model passed in is
    neither fitted nor changed."""
    model = mlp("sigmoid")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")  # at 0.1 the ReLU clone diverges (measured)
    before = [w.copy() for w in model.get_weights()]
    x, y = data()
    result = gradwatch.trial(model, x, y, epochs=4, batch_size=64)
    assert [np.array_equal(a, b) for a, b in zip(before, model.get_weights())] == [True] * len(before)
    assert int(model.optimizer.iterations) == 0
    base = result.baseline
    assert result.framework == "keras" and result.steps == 32 and len(base.losses) == 32
    assert "vanishing" in base.findings and base.report.recommendations[0].fix == "relu"
    first = result.runs[0]
    assert first.fix == "relu" and first.applied and first.cured and 'activation="relu"' in first.change
    assert first.final_loss < base.final_loss, str(result)
    best = result.best
    assert best is not None and best.cured and best.final_loss <= first.final_loss
    skip = [r for r in result.runs if r.fix == "skip_connections"]
    assert all(not r.applied and "wiring" in r.reason for r in skip)


def test_trial_cures_deep_relu_on_glorot_with_he_normal():
    model = mlp("relu", depth=30)
    model.compile(optimizer=keras.optimizers.SGD(0.003), loss="mse")  # at 0.01 He init diverges on JAX's draw
    x, y = data()
    result = gradwatch.trial(model, x, y, epochs=4, batch_size=64, top=2)
    assert "vanishing" in result.baseline.findings
    best = result.best
    assert best is not None and best.fix == "he_init" and best.final_loss < result.baseline.final_loss, str(result)
    assert result.runs[0].fix == "he_init"


def test_trial_of_an_uncompiled_model_says_so():
    with pytest.raises(ValueError, match="needs a compiled Keras model"):
        gradwatch.trial(mlp("sigmoid", depth=2), *data())
