"""The real-architecture suite on Keras 3: ``keras.applications`` models with ``weights=None`` at a small input
size, gated recurrent layers, and a broken regression CNN, each through a real ``fit()`` with gradwatch's callback.

Labels come from plain Keras measurements of the same run (``model.evaluate`` before training, ``fit()``'s
history), never from gradwatch's output. Runs on the backend Keras was imported with (TensorFlow here, JAX and
PyTorch from ``tests/test_keras_backends.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", exc_type=ModuleNotFoundError)
pytest.importorskip(keras.backend.backend(), exc_type=ModuleNotFoundError)  # tensorflow, jax or torch

import gradwatch  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.slow]


def _images(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 32, 32, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int32")
    x[..., 0] += (y[:, None, None] * 2 - 1) * 0.5  # a strong, learnable signal in the first channel
    return x, y


def same_init(model, seed=0):
    """Keras' default initializers (Glorot-uniform kernels, orthogonal recurrent kernels, zero biases with an LSTM's
    unit forget bias), drawn with NumPy: the same weights on every backend, whose own random streams differ."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            shape, name = tuple(w.shape), w.path.rsplit("/", 1)[-1]
            if name == "recurrent_kernel":
                q, r = np.linalg.qr(rng.standard_normal((shape[1], shape[0])))
                value = (q * np.sign(np.diag(r))).T[: shape[0], : shape[1]]
            elif name == "kernel":
                receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
                limit = np.sqrt(6.0 / ((shape[-2] + shape[-1]) * receptive))
                value = rng.uniform(-limit, limit, shape)
            elif name == "bias" and type(layer).__name__ == "LSTM":
                value = np.zeros(shape)
                value[shape[0] // 4: shape[0] // 2] = 1.0  # unit_forget_bias
            else:
                value = np.asarray(w)
            values.append(np.asarray(value, dtype="float32"))
        layer.set_weights(values)
    return model


def _fit(model, x, y, opt, loss, *, epochs, batch_size):
    model.compile(optimizer=opt, loss=loss)
    before = float(model.evaluate(x, y, batch_size=batch_size, verbose=0))
    cb = gradwatch.KerasCallback(reporters=[])
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False,
                        callbacks=[cb]).history["loss"]  # no shuffle: the same batches on every backend
    return cb.report(), before, history


APPS = [  # (application, optimizer): each model's usual recipe, SGD with momentum or Adam (ConvNeXt)
    ("MobileNetV2", "sgd"), ("EfficientNetB0", "sgd"), ("ResNet50V2", "sgd"), ("ConvNeXtTiny", "adam"),
]


@pytest.mark.parametrize("name, opt", APPS, ids=[a for a, _ in APPS])
def test_keras_applications_train_and_get_no_finding(name, opt):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=2,
                                              classifier_activation=None)
    optimizer = keras.optimizers.Adam(1e-3) if opt == "adam" else keras.optimizers.SGD(0.01, momentum=0.9)
    x, y = _images()
    report, _, history = _fit(model, x, y, optimizer,
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True), epochs=3, batch_size=32)
    assert history[-1] < 0.5 * history[0] and np.isfinite(history).all(), history  # the label: it learns
    assert report.collected_steps == 24 and not report.findings, [str(f) for f in report.findings]


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_keras_gated_rnn_on_a_memory_task_is_healthy(cell):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, 30, 4)) * 0.5).astype("float32")
    y = (x[:, 0, 0] > 0).astype("int32")
    model = same_init(keras.Sequential([keras.Input((30, 4)), getattr(keras.layers, cell)(32, name="rnn"),
                                        keras.layers.Dense(2)]))
    report, before, history = _fit(model, x, y, keras.optimizers.Adam(5e-3),
                                   keras.losses.SparseCategoricalCrossentropy(from_logits=True), epochs=25,
                                   batch_size=64)
    # The label: it learns to remember step 1. (Its best epoch: the backends, identical for some epochs from the same
    # weights, then part by float error. At lr 1e-2 the torch backend's LSTM came down to 0.754 of its first loss
    # only, 2026-12-07, the same with and without gradwatch; at 5e-3 every backend reads 0.34-0.54.)
    assert min(history) < 0.7 * before, (before, history)
    assert not report.findings, [str(f) for f in report.findings]


def _regression_cnn():
    return same_init(keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
                             keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.Flatten(),
                             keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)]))


def test_keras_regression_cnn_with_a_too_high_learning_rate_explodes():
    """Adam at lr 0.1: the first update is already too large (the loss goes from 0.04 to ~1.7e4 over the first
    epoch, with no NaN); at lr 1e-3 the same CNN learns and gradwatch is silent."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16, 16, 1)).astype("float32")
    y = x.mean(axis=(1, 2, 3))[:, None] * 3
    keras.utils.set_random_seed(0)
    report, before, history = _fit(_regression_cnn(), x, y, keras.optimizers.Adam(0.1), "mse", epochs=2,
                                   batch_size=16)
    assert history[0] >= 100 * before and np.isfinite(history).all(), (before, history)  # the label
    (f, *_) = [f for f in report.findings if f.kind in ("exploding", "nonfinite", "vanishing")]
    assert f.kind == "exploding" and f.step <= 3
    assert report.recommendations[0].fix == "lower_learning_rate"

    keras.utils.set_random_seed(0)
    report, before, history = _fit(_regression_cnn(), x, y, keras.optimizers.Adam(1e-3), "mse", epochs=2,
                                   batch_size=16)
    assert history[-1] < 0.5 * before  # the label: it learns
    assert not report.findings, [str(f) for f in report.findings]
