"""The CUDA path: no host-device sync on any step but a flush, statistics on the device, AMP unscaled.

Skipped without a CUDA device (the project's CI machines have none); run on a GPU machine with
``python -m pytest -m gpu tests/test_gpu.py``. Each step runs under ``torch.cuda.set_sync_debug_mode("error")``
wherever gradwatch runs (tests/fixtures/cuda.py), so a ``.item()``, ``nonzero`` or device-to-host copy on the
hot path fails the test.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

import gradwatch  # noqa: E402
from tests.fixtures.cuda import MODES, make_step, strict_optimizer_hooks  # noqa: E402
from tests.fixtures.models import mlp  # noqa: E402

FLUSH = 25


@pytest.mark.parametrize("precision", MODES)
def test_no_sync_outside_flushes_and_findings_as_on_cpu(precision, dev="cuda"):
    torch.manual_seed(0)
    model = mlp(12, width=128, d_in=32, act=torch.nn.Sigmoid).to(dev)  # the classic vanishing case
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    x, y = torch.randn(64, 32, device=dev), torch.randn(64, 1, device=dev)
    gw = gradwatch.attach(model, opt, scaler=scaler, reporters=[], flush_every=FLUSH)
    done = [0]
    # The first step builds the layer table (index tensors copied to the device once); a flush step copies the
    # statistics to the host once. Every other step must not sync.
    is_flush = lambda: done[0] == 0 or (done[0] + 1) % FLUSH == 0  # noqa: E731
    restore = strict_optimizer_hooks(opt, is_flush)
    step = make_step(model, opt, (x, y), lambda m, b: torch.nn.functional.mse_loss(m(b[0]).float(), b[1]),
                     precision, scaler, is_flush=is_flush)
    for _ in range(3 * FLUSH):
        loss = step()
        gw.log_loss(loss)
        done[0] += 1
    restore()
    ring = gw.adapter._ring
    assert ring.values.device.type == torch.device(dev).type  # the statistics live on the device
    report = gw.report()
    gw.detach()
    assert report.step == report.collected_steps == 3 * FLUSH
    vanishing = [f for f in report.findings if f.kind == "vanishing"]
    assert vanishing and vanishing[0].layers[0] == "0", report
