"""The Keras callback on real fit() runs: it judges the gradients fit() applies, and leaves no trace."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", exc_type=ModuleNotFoundError)
pytest.importorskip("tensorflow", exc_type=ModuleNotFoundError)

import gradwatch  # noqa: E402

pytestmark = pytest.mark.keras


def data(n=512, d=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    return x, (np.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype("float32")


def mlp(act, depth=10, init="glorot_uniform"):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((20,))] + [keras.layers.Dense(64, activation=act, kernel_initializer=init)
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
    assert "apply" not in model.optimizer.__dict__  # the wrapper is gone after fit()
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.models.load_model(path)
    x, y = data()
    np.testing.assert_allclose(again.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0), rtol=1e-6)
    again.fit(x, y, batch_size=64, epochs=1, verbose=0)  # fits without gradwatch
    report2 = fit(model, cb, epochs=1)  # the same callback serves a second fit()
    assert report2.step == 8


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


@pytest.mark.parametrize("compile_kw", [{"jit_compile": True}, {"steps_per_execution": 4}])
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
    ratio = report.layer("head").grad_rms / reference.layer("head").grad_rms
    assert 0.3 < ratio < 3, ratio
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

print(json.dumps([run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])), run(tf.distribute.get_strategy())]))
"""


def test_mirrored_strategy_reports_the_aggregated_gradients_once():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    mirrored, single = json.loads(out.stdout.strip().splitlines()[-1])
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    assert mirrored["step"] == mirrored["collected"] == 16  # once per step, not once per replica
    assert mirrored["findings"][0][:2] == ["vanishing", 1] and mirrored["fixes"][0] == "relu"
    # The summed replica gradients are the global batch's gradient: the same figures as on one device.
    np.testing.assert_allclose(mirrored["head_trend"], single["head_trend"], rtol=1e-3)
    assert not mirrored["wrapped"]


def test_lstm_on_long_memory_is_healthy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, 60, 4)) * 0.5).astype("float32")
    y = (x[:, 0, 0] > 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((60, 4)), keras.layers.LSTM(32, name="rnn"), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = gradwatch.KerasCallback(reporters=[])
    model.fit(x, y, batch_size=64, epochs=4, verbose=0, callbacks=[cb])
    report = cb.report()
    assert report.healthy and report.step == 32
    assert report.structure.layers[0].recurrent_cell == "lstm"


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
