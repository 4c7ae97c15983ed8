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
