"""The whole Keras suite (tests/test_keras.py and the keras.applications suite) on the JAX and PyTorch
backends, each in its own process: the backend is fixed when keras is imported. The main run covers TensorFlow.
OpenVINO, which cannot train, gets a clear error at attach."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("keras", exc_type=ModuleNotFoundError)

pytestmark = [pytest.mark.keras, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
    if backend == "jax":  # two CPU devices for keras.distribution.DataParallel
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    return env


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_suite_passes_on_backend(backend):
    pytest.importorskip(backend)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          os.path.join(ROOT, "tests", "test_keras.py"),
                          os.path.join(ROOT, "tests", "test_real_architectures_keras.py")],
                         cwd=ROOT, env=_env(backend), capture_output=True, text=True, timeout=2400)
    tail = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail  # 5 (no tests collected) fails too
    summary = out.stdout.strip().splitlines()[-1]  # "N passed, M skipped ... in Ts"
    assert re.search(r"\d+ passed", summary) and not re.search(r"\d+ (failed|error)", summary), tail


PARITY = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np, keras, gradwatch
from tests.test_real_architectures_keras import same_init

rng = np.random.default_rng(0)
x = rng.standard_normal((512, 20)).astype("float32")
y = (np.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype("float32")
seq = (rng.standard_normal((256, 60, 4)) * 0.5).astype("float32")
out = {{}}
for name, layers, data, loss, opt in [
        ("sigmoid_mlp", [keras.Input((20,))] + [keras.layers.Dense(64, activation="sigmoid") for _ in range(10)]
         + [keras.layers.Dense(1)], (x, y), "mse", keras.optimizers.SGD(0.1)),
        ("simple_rnn", [keras.Input((60, 4)), keras.layers.SimpleRNN(32), keras.layers.Dense(2)],
         (seq, (seq[:, 0, 0] > 0).astype("int32")), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
         keras.optimizers.Adam(1e-3))]:
    model = same_init(keras.Sequential(layers))
    model.compile(optimizer=opt, loss=loss)
    cb = gradwatch.KerasCallback(reporters=[], activation_every=4)
    model.fit(*data, batch_size=64, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    r = cb.report()
    where = {{la.name: i for i, la in enumerate(r.layers)}}
    out[name] = {{"step": r.step, "findings": [[f.kind, f.step, [where[n] for n in f.layers]] for f in r.findings],
                 "fixes": [rec.fix for rec in r.recommendations],
                 "rms": [list(la.grad_rms_trend) for la in r.layers],
                 "update_ratio": [la.update_ratio for la in r.layers],
                 "saturation": [la.saturation for la in r.layers]}}
print(json.dumps(out))
"""


def test_same_model_and_data_give_the_same_verdicts_and_figures_on_every_backend():
    """The same weights (drawn with NumPy) and batches on TensorFlow, JAX and torch: the same findings and fixes,
    and per-layer figures equal to float error."""
    import json

    import numpy as np

    runs = {}
    for backend in ("tensorflow", "jax", "torch"):
        pytest.importorskip(backend)
        out = subprocess.run([sys.executable, "-c", PARITY.format(root=ROOT)], cwd=ROOT, env=_env(backend),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    tf = runs["tensorflow"]
    assert tf["sigmoid_mlp"]["findings"][0][0] == "vanishing" and tf["sigmoid_mlp"]["fixes"][0] == "relu"
    assert tf["simple_rnn"]["fixes"][0] == "gated_rnn"
    for backend in ("jax", "torch"):
        for case, ref in tf.items():
            got = runs[backend][case]
            assert got["step"] == ref["step"] and got["findings"] == ref["findings"], (backend, case)
            assert got["fixes"] == ref["fixes"], (backend, case)
            np.testing.assert_allclose(np.asarray(got["rms"], float), np.asarray(ref["rms"], float), rtol=1e-3,
                                       err_msg=f"{backend} {case}")
            np.testing.assert_allclose(np.asarray(got["update_ratio"], float),
                                       np.asarray(ref["update_ratio"], float), rtol=1e-3)
            np.testing.assert_allclose(np.asarray(got["saturation"], float), np.asarray(ref["saturation"], float),
                                       atol=1e-3)


OPENVINO = """
import keras, gradwatch
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
try:
    gradwatch.attach(model)
except gradwatch.AttachError as exc:
    print("AttachError:", exc)
"""


def test_openvino_backend_gets_a_clear_error_at_attach():
    pytest.importorskip("openvino")
    out = subprocess.run([sys.executable, "-c", OPENVINO], cwd=ROOT, env=_env("openvino"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "AttachError: Keras runs on the 'openvino' backend, which cannot train" in out.stdout, out.stdout
