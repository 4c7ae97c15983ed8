"""The W&B reporter on real offline runs, read back from the run files wandb wrote (no mocks of wandb)."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
wandb = pytest.importorskip("wandb", exc_type=ModuleNotFoundError)

import gradwatch  # noqa: E402
from tests.fixtures.models import mlp, seed, tabular, train  # noqa: E402
from tests.fixtures.wandb_records import read_run  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.wandb]


def watched_run(tmp_path, act=torch.nn.Sigmoid, steps=100, init=None, **kw):
    """The user's loop logs its own metric at its own step (2 per training step); gradwatch rides along."""
    run = wandb.init(project="gradwatch-tests", mode="offline", dir=tmp_path)
    try:
        seed(0)
        model = mlp(depth=12, act=act, init=init)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gw = gradwatch.attach(model, opt, reporters=["wandb"], **kw)
        train(model, opt, tabular(), steps, on_step=lambda i: run.log({"train/loss_seen": i}, step=2 * i))
        gw.detach()
    finally:
        run.finish()
    return gw, read_run(tmp_path)


def gradwatch_rows(run):
    return [h for h in run.history if "gradwatch/step" in h]


def test_vanishing_run_page(tmp_path):
    gw, run = watched_run(tmp_path)
    report = gw.report()
    # The user's steps are exactly the user's: gradwatch never committed a row of its own.
    assert [h["_step"] for h in run.history] == [2 * i for i in range(100)]
    assert [h["train/loss_seen"] for h in run.history] == list(range(100))
    # Per-layer series once per flush (25 steps), on gradwatch's own step axis.
    rows = gradwatch_rows(run)
    flushes = [h for h in rows if "gradwatch/grad_rms/0" in h]
    assert [h["gradwatch/step"] for h in flushes] == [25, 50, 75, 100]
    first, last = report.layers[0].name, report.layers[-1].name
    for h in flushes:
        assert h[f"gradwatch/grad_rms/{first}"] < 1e-6 * h[f"gradwatch/grad_rms/{last}"]
        assert h["gradwatch/health/healthy"] == 0
    assert any(f"gradwatch/update_ratio/{last}" in h for h in flushes)
    globs = {m.glob_name: m.step_metric for m in run.metrics if m.glob_name}
    assert globs["gradwatch/grad_rms/*"] == "gradwatch/step"
    # One alert for the one finding.
    assert [(a.title, a.level) for a in run.alerts] == [("gradwatch: vanishing since step 1", "ERROR")]
    assert "First fix to try: relu" in run.alerts[0].text
    # Tables and summary carry the diagnosis.
    table = [h for h in rows if "gradwatch/recommendations" in h][-1]
    recs = run.table_rows(table["gradwatch/recommendations"])
    assert recs[0][:2] == [1, "relu"]
    assert "nn.ReLU()" in recs[0][4]
    findings = run.table_rows(table["gradwatch/findings"])
    assert findings[0][0] == "vanishing"
    assert run.summary["gradwatch/verdict"] == "problems: vanishing"
    assert run.summary["gradwatch/healthy"] is False
    assert run.summary["gradwatch/first_fix"].startswith("relu (")
    # The heatmap and the per-layer chart, at the end.
    image = run.summary["gradwatch/flow"]
    assert image["_type"] == "image-file" and (run.dir / "files" / image["path"]).stat().st_size > 10_000
    assert run.summary["gradwatch/grad_rms_by_layer_table"]["nrows"] > 0


def test_healthy_run_page(tmp_path):
    gw, run = watched_run(tmp_path, act=torch.nn.ReLU, init="he", steps=60)
    assert gw.report().healthy
    assert run.alerts == []
    assert run.summary["gradwatch/verdict"] == "healthy"
    assert all(h["gradwatch/health/healthy"] == 1 for h in gradwatch_rows(run) if "gradwatch/health/healthy" in h)


def test_wandb_errors_never_stop_training(tmp_path):
    run = wandb.init(project="gradwatch-tests", mode="offline", dir=tmp_path)
    seed(0)
    model = mlp(depth=4, act=torch.nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gw = gradwatch.attach(model, opt, reporters=["wandb"], flush_every=10)
    train(model, opt, tabular(), 10)
    run.finish()  # the run ends under gradwatch's feet
    with pytest.warns(RuntimeWarning, match="dropped reporter WandbReporter"):
        losses = train(model, opt, tabular(), 30)
    assert len(losses) == 30 and gw.active
    gw.detach()
    assert gw.report().step == 40


def test_wandb_needs_an_active_run():
    assert wandb.run is None
    model = torch.nn.Linear(3, 1)
    with pytest.raises(RuntimeError, match=r"call wandb.init\(...\) before gradwatch.attach"):
        gradwatch.attach(model, reporters=["wandb"])
    gradwatch.attach(model, reporters=[]).detach()  # nothing was left attached by the failed call


def test_missing_wandb_names_the_extra():
    code = ("import sys; sys.modules['wandb'] = None\n"
            "import torch, gradwatch\n"
            "try:\n    gradwatch.attach(torch.nn.Linear(2, 1), reporters=['wandb'])\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'gradwatch[wandb]'" in out.stdout
