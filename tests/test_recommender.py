"""Recommender and structure on classic failure cases: the first fix is the one a practitioner would make,
naming the right layers; healthy models get none."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from tests.fixtures.models import (  # noqa: E402
    FunctionalTanhMLP,
    PlainCNN,
    SeqClassifier,
    SmallResNet,
    images,
    long_memory,
    mlp,
    seed,
    tabular,
    train,
)

pytestmark = pytest.mark.torch


def run(model, opt, data, steps, loss="mse", batch=64, **kw):
    gw = gradwatch.attach(model, opt, reporters=[], **kw)
    train(model, opt, data, steps, loss=loss, batch=batch)
    gw.detach()
    return gw.report()


def fixes(report):
    return [r.fix for r in report.recommendations]


def test_sigmoid_mlp_gets_relu_then_xavier():
    seed(0)
    model = mlp(10, act=nn.Sigmoid)
    report = run(model, torch.optim.SGD(model.parameters(), lr=0.1), tabular(), 60)
    assert fixes(report)[:2] == ["relu", "xavier_init"]
    relu = report.recommendations[0]
    assert relu.rank == 1 and relu.layers == tuple(str(i) for i in range(0, 20, 2))  # hidden layers, not the head
    assert "sigmoid" in relu.reason and "orders of magnitude" in relu.reason
    assert "nn.Sigmoid()   ->   nn.ReLU()" in relu.snippet and "kaiming_normal_" in relu.snippet
    assert relu.references and "Glorot" in relu.references[0]
    assert "batch_norm" in fixes(report) and "skip_connections" in fixes(report)
    assert report.to_dict()["recommendations"][0]["fix"] == "relu"


def test_relu_mlp_30_layers_xavier_init_gets_he_init():
    """He et al. 2015: a 30-layer ReLU net with Xavier-scaled init stalls."""
    seed(0)
    model = mlp(30, act=nn.ReLU, init="xavier")
    report = run(model, torch.optim.SGD(model.parameters(), lr=0.01), tabular(), 60)
    assert report.findings_of("vanishing")
    he = report.recommendations[0]
    assert he.fix == "he_init" and "0" in he.layers
    assert "He (sqrt(2/fan_in))" in he.reason and "kaiming_normal_" in he.snippet
    assert "relu" not in fixes(report)  # already ReLU


def test_deep_plain_cnn_gets_batch_norm_and_skips():
    seed(0)
    model = PlainCNN(depth=10)
    report = run(model, torch.optim.SGD(model.parameters(), lr=0.1), images(), 40, loss="ce", batch=32)
    got = fixes(report)
    assert "batch_norm" in got and "skip_connections" in got
    bn = next(r for r in report.recommendations if r.fix == "batch_norm")
    assert bn.layers[0] == "convs.0" and "BatchNorm2d" in bn.snippet


def test_tanh_rnn_long_memory_gets_gated_rnn():
    seed(0)
    model = SeqClassifier("rnn")
    report = run(model, torch.optim.SGD(model.parameters(), lr=0.05), long_memory(), 60, loss="ce")
    f = report.findings_of("vanishing")[0]
    assert f.evidence["through_time"] and f.evidence["time_decades"]["rnn"] > 2 and f.layers == ("rnn",)
    rec = report.recommendations[0]
    assert rec.fix == "gated_rnn" and rec.layers == ("rnn",) and "nn.LSTM" in rec.snippet


def test_rnn_spectral_radius_above_one_gets_gradient_clipping():
    seed(0)
    model = SeqClassifier("rnn", radius=3.0)
    report = run(model, torch.optim.SGD(model.parameters(), lr=0.05), long_memory(), 40, loss="ce")
    f = report.findings_of("exploding")[0]
    assert f.step == 1 and f.evidence["through_time"]
    rec = report.recommendations[0]
    assert rec.fix == "gradient_clipping" and rec.layers == ("rnn",)
    assert "spectral radius is 3.00" in rec.reason and "clip_grad_norm_" in rec.snippet


def test_huge_learning_rate_gets_lower_learning_rate():
    seed(0)
    model = mlp(6, act=nn.ReLU, init="he")
    report = run(model, torch.optim.SGD(model.parameters(), lr=3.0), tabular(), 30)
    rec = report.recommendations[0]
    assert rec.fix == "lower_learning_rate" and "param_groups" in rec.snippet
    assert "initialization is within range" in rec.reason


def test_functional_activations_are_seen_by_fx():
    seed(0)
    model = FunctionalTanhMLP()
    gw = gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.05), reporters=[])
    train(model, gw.adapter.optimizer, tabular(), 60)
    gw.detach()
    s = gw.report().structure
    assert s.traced
    assert s.layer("inp").activation == "tanh" and s.layer("inp").activation_source == "functional"
    assert s.layer("hidden.3").activation == "tanh" and s.layer("head").activation is None
    report = gw.report()
    if report.recommendations:
        # Its weights start at half the Xavier scale (std 0.5/sqrt(fan_in)): the init is the cause and the smaller
        # change, so xavier_init comes before swapping the activation (issue 11); the relu snippet still names the
        # functional call fx saw.
        fixes = [r.fix for r in report.recommendations]
        assert fixes[0] == "xavier_init" and "relu" in fixes
        relu = report.recommendations[fixes.index("relu")]
        assert "torch.tanh(x)" in relu.snippet


def test_structure_of_resnet_and_init_scales():
    seed(0)
    model = SmallResNet()
    report = run(model, torch.optim.SGD(model.parameters(), lr=0.05), images(), 5, loss="ce", batch=16)
    s = report.structure
    assert s.residual_adds == 3 and s.has_norm and "blocks.0.bn1" in s.norm_layers
    conv = s.layer("blocks.0.conv1")
    assert conv.kind == "conv" and conv.fan_in == 16 * 9 and conv.normalized and conv.activation == "relu"
    assert conv.he_std == pytest.approx((2 / (16 * 9)) ** 0.5)
    assert "blocks.0.conv1" in s.residual_layers
    assert report.recommendations == ()


def test_saturation_and_dead_units_are_measured():
    seed(0)
    sat = mlp(4, act=nn.Sigmoid, init="he", init_gain=8.0)  # huge pre-activations: sigmoid pinned at 0/1
    report = run(sat, torch.optim.SGD(sat.parameters(), lr=0.01), tabular(), 60, activation_every=5)
    assert report.layer("0").saturation > 0.5
    assert report.findings_of("saturation")
    seed(0)
    dead = mlp(4, act=nn.ReLU, init="he")
    with torch.no_grad():
        dead[2].bias.fill_(-100.0)  # every unit of layer 2 is negative for every input
    report = run(dead, torch.optim.SGD(dead.parameters(), lr=0.01), tabular(), 40, activation_every=5)
    assert report.layer("2").dead_fraction == 1.0
    (f,) = report.findings_of("dead_units")
    assert "2" in f.layers
    assert any(r.fix == "leaky_relu" for r in report.recommendations)


def test_units_that_fire_on_other_batches_are_not_dead():
    """Two inputs, A and -A, in batches of one kind each (A on odd steps, -A on even ones): every first-layer unit
    fires for exactly one of them, so each batch leaves about half the units at zero, and none is dead (plain
    measurement below). Zeros on one batch are no dead units."""
    seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1))
    nn.init.zeros_(model[0].bias)  # w.A + 0 and w.(-A) + 0 have opposite signs: each unit fires for one of them
    a = torch.zeros(64, 20)
    a[:, :10] = 1.0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gw = gradwatch.attach(model, opt, reporters=[], activation_every=5)
    per_batch, fired = [], torch.zeros(64, dtype=torch.bool)
    for step in range(1, 61):
        x = a if step % 2 else -a
        with torch.no_grad():
            on = (model[0](x) > 0).any(dim=0)
        per_batch.append(1 - on.float().mean().item())
        fired |= on
        opt.zero_grad()
        nn.functional.mse_loss(model(x), torch.ones(64, 1) * (step % 2)).backward()
        opt.step()
    gw.detach()
    assert min(per_batch) >= 0.3 and fired.all()  # the label: half at zero per batch, every unit alive
    report = gw.report()
    assert not report.findings_of("dead_units"), [str(f) for f in report.findings]
    assert report.layer("0").dead_fraction < 0.3


@pytest.mark.parametrize("make", [lambda: mlp(10, act=nn.ReLU, init="he"), lambda: SeqClassifier("lstm"),
                                  lambda: SeqClassifier("gru")])
def test_healthy_models_get_no_recommendation(make):
    seed(0)
    model = make()
    is_seq = isinstance(model, SeqClassifier)
    report = run(model, torch.optim.Adam(model.parameters(), lr=1e-3), long_memory() if is_seq else tabular(),
                 60, loss="ce" if is_seq else "mse")
    assert report.healthy and report.recommendations == (), [str(f) for f in report.findings]
