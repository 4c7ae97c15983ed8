"""The whole Keras suite (tests/test_keras.py and the keras.applications suite) on the JAX and PyTorch
backends, each in its own process: the backend is fixed when keras is imported. The main run covers TensorFlow.
OpenVINO, which cannot train, gets a clear error at attach."""

from __future__ import annotations

import os
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
    assert " passed" in out.stdout and " failed" not in out.stdout, tail


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
