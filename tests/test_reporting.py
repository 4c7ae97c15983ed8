"""The run log, `gradwatch.load`, the `gradwatch` command and the plots, on real training runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)

import gradwatch  # noqa: E402
from tests.fixtures.models import mlp, seed, tabular, train  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]


def sick_run(log_dir, steps=60, detach=True, **kw):
    """A deep sigmoid MLP (vanishing from step 1), watched with a run log."""
    seed(0)
    model = mlp(depth=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.attach(model, opt, reporters=kw.pop("reporters", []), log_dir=log_dir, **kw)
    train(model, opt, tabular(), steps)
    if detach:
        gw.detach()
    return gw


def segments(d) -> list[Path]:
    return sorted(Path(d).glob("segment-*.gwlog"))


# -- run log -------------------------------------------------------------------------------------------------


def test_load_gives_back_the_final_report(tmp_path):
    gw = sick_run(tmp_path, steps=60)
    loaded = gradwatch.load(tmp_path)
    assert loaded.to_dict() == gw.report().to_dict()
    assert [f.kind for f in loaded.findings] == ["vanishing"]
    assert loaded.recommendations[0].fix == "relu"


def test_load_while_training_rebuilds_the_report_from_the_last_flush(tmp_path):
    gw = sick_run(tmp_path, steps=60, detach=False, flush_every=20)
    live = gw.report()  # flushes: the log now holds all 60 steps
    loaded = gradwatch.load(tmp_path)
    assert loaded.step == live.step == 60
    assert loaded.monitoring == "interrupted at step 60"
    assert any("without a final report" in n for n in loaded.notes)
    assert [(f.kind, f.layers, f.step) for f in loaded.findings] == [(f.kind, f.layers, f.step)
                                                                    for f in live.findings]
    assert [r.fix for r in loaded.recommendations] == [r.fix for r in live.recommendations]
    np.testing.assert_allclose([la.grad_rms for la in loaded.layers], [la.grad_rms for la in live.layers])
    np.testing.assert_allclose([la.grad_rms_trend for la in loaded.layers], [la.grad_rms_trend for la in live.layers])
    gw.detach()


def test_a_truncated_log_loses_at_most_the_last_flush(tmp_path):
    gw = sick_run(tmp_path, steps=60, detach=False, flush_every=20)
    gw.flush()
    seg = segments(tmp_path)[-1]
    size_at_60 = seg.stat().st_size
    gw.detach()  # appends the final report
    with open(seg, "r+b") as f:  # a crash in the middle of writing the step-60 flush
        f.truncate(size_at_60 - 100)
    loaded = gradwatch.load(tmp_path)
    assert loaded.step == 40
    assert loaded.collected_steps == 40
    assert any("damaged" in n and "cut short" in n for n in loaded.notes)
    assert [f.kind for f in loaded.findings] == ["vanishing"]


def test_a_damaged_or_missing_log_gives_a_clear_error(tmp_path):
    with pytest.raises(gradwatch.LogError, match="does not exist"):
        gradwatch.load(tmp_path / "nope")
    with pytest.raises(gradwatch.LogError, match="holds no gradwatch run log"):
        gradwatch.load(tmp_path)
    sick_run(tmp_path, steps=30)
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[20] ^= 0xFF  # inside the header record: its checksum fails
    seg.write_bytes(bytes(data))
    with pytest.raises(gradwatch.LogError, match="damaged beyond repair.*checksum"):
        gradwatch.load(tmp_path)


def test_a_long_run_keeps_the_log_bounded(tmp_path):
    max_bytes = 1 << 16
    seed(0)
    model = mlp(depth=4, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sizes = []
    gw = gradwatch.attach(model, opt, reporters=[gradwatch.RunLogWriter(tmp_path, max_bytes=max_bytes)], flush_every=10,
                          history=16)
    train(model, opt, tabular(), 600, on_step=lambda i: sizes.append(sum(p.stat().st_size
                                                                           for p in segments(tmp_path))))
    gw.detach()
    assert len(segments(tmp_path)) == 1
    assert segments(tmp_path)[0].name != "segment-000001.gwlog"  # it did rotate
    assert max(sizes) < max_bytes + 16 * 1024, max(sizes)  # one full segment, one starting, a small snapshot
    loaded = gradwatch.load(tmp_path)
    assert loaded.to_dict() == gw.report().to_dict()
    # Without the final record, the rebuilt history still spans the whole run.
    seg = segments(tmp_path)[0]
    records_end = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(records_end - 10)
    rebuilt = gradwatch.load(tmp_path)
    assert rebuilt.collected_steps == 600
    assert rebuilt.trend_steps[0] == 1


def test_a_new_watch_replaces_the_old_log(tmp_path):
    sick_run(tmp_path, steps=30)
    sick_run(tmp_path, steps=45)
    assert gradwatch.load(tmp_path).step == 45
    (tmp_path / "keep.txt").write_text("user file")
    sick_run(tmp_path, steps=20)
    assert (tmp_path / "keep.txt").read_text() == "user file"


def test_log_dir_must_be_a_path():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match="log_dir must be a path"):
        gradwatch.attach(model, log_dir=3)


# -- the gradwatch command -------------------------------------------------------------------------------------


def gradwatch_cmd(*args):
    return subprocess.run([sys.executable, "-m", "gradwatch", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "120"})


def test_cli_report_json_and_plot(tmp_path):
    gw = sick_run(tmp_path / "log", steps=60)
    out = gradwatch_cmd("report", tmp_path / "log")
    assert out.returncode == 0, out.stderr
    assert "problems found: vanishing" in out.stdout
    assert "1. relu" in out.stdout
    as_json = gradwatch_cmd("report", tmp_path / "log", "--json")
    assert json.loads(as_json.stdout) == json.loads(json.dumps(gw.report().to_dict()))
    png = tmp_path / "flow.png"
    plotted = gradwatch_cmd("report", tmp_path / "log", "--plot", png, "--kind", "flow")
    assert plotted.returncode == 0, plotted.stderr
    assert png.stat().st_size > 10_000


def test_cli_errors(tmp_path):
    missing = gradwatch_cmd("report", tmp_path / "nope")
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    usage = gradwatch_cmd("nonsense")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    sick_run(tmp_path / "log", steps=30)
    bad_kind = gradwatch_cmd("report", tmp_path / "log", "--plot", tmp_path / "x.png", "--kind", "pie")
    assert bad_kind.returncode == 2 and "invalid choice" in bad_kind.stderr


# -- plots ---------------------------------------------------------------------------------------------------------


def _pixels(path):
    image = pytest.importorskip("matplotlib.image")
    return image.imread(path)


@pytest.mark.parametrize("kind", ["all", "flow", "depth", "updates"])
def test_plots_are_drawn(tmp_path, kind):
    report = sick_run(None, steps=60).report()
    path = report.plot(tmp_path / f"{kind}.png", kind=kind)
    px = _pixels(path)
    assert px.shape[0] > 300 and px.shape[1] > 600
    assert px[..., :3].std() > 0.05  # not a blank canvas


def test_flow_heatmap_shows_the_vanishing_rows(tmp_path):
    """The heatmap's colours follow log10 gradient RMS: the first layer's row is darker (cividis: low = dark)
    than the last layer's."""
    from gradwatch.core.plots import flow_figure

    report = sick_run(None, steps=60).report()
    fig = flow_figure(report)
    ax = fig.axes[0]
    mesh = ax.collections[0]
    values = np.asarray(mesh.get_array()).reshape(len(report.layers), -1)
    assert values[0].mean() < values[-1].mean() - 5  # about 10 decades between them
    assert any(p.get_label().startswith("vanishing") for p in ax.patches)


def test_plot_200_layers_thins_labels(tmp_path):
    seed(0)
    model = mlp(depth=199, width=8, act=torch.nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, reporters=[]) as gw:
        train(model, opt, tabular(), 12, batch=16)
    from gradwatch.core.plots import flow_figure

    fig = flow_figure(gw.report())
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(gw.report().layers) == 200
    assert 20 <= len(labels) <= 40
    path = gw.report().plot(tmp_path / "big.png", kind="flow")
    assert _pixels(path)[..., :3].std() > 0.05


def test_plot_errors(tmp_path):
    model = torch.nn.Linear(2, 1)
    gw = gradwatch.attach(model, reporters=[])
    gw.detach()
    with pytest.raises(ValueError, match="no measured step"):
        gw.report().plot(tmp_path / "x.png")
    report = sick_run(None, steps=10).report()
    with pytest.raises(ValueError, match="unknown plot kind 'pie'; accepted: all, flow, depth, updates"):
        report.plot(tmp_path / "x.png", kind="pie")
