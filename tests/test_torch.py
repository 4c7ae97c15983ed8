"""The PyTorch adapter, detector and console on real models trained for real steps."""

from __future__ import annotations

import dataclasses
import io
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from tests.fixtures.models import (  # noqa: E402
    SeqClassifier,
    SmallResNet,
    TinyTransformer,
    images,
    long_memory,
    mlp,
    seed,
    tabular,
    tokens,
    train,
)

pytestmark = pytest.mark.torch


def watch(model, opt=None, steps=80, data=None, loss="mse", **kw):
    train_kw = {k: kw.pop(k) for k in ("batch", "accumulate", "scaler", "autocast") if k in kw}
    gw = gradwatch.attach(model, opt, reporters=kw.pop("reporters", []), scaler=train_kw.get("scaler"), **kw)
    train(model, opt, data or tabular(), steps, loss=loss, **train_kw)
    gw.detach()
    return gw.report()


def no_hooks(model: nn.Module) -> bool:
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks,
                  m._state_dict_hooks, m._load_state_dict_pre_hooks):
            if d:
                return False
        for p in m.parameters(recurse=False):
            if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
                return False
    return True


# -- detection -----------------------------------------------------------------------------------------------

def test_deep_sigmoid_mlp_vanishes_in_early_layers():
    seed(0)
    model = mlp(10, act=nn.Sigmoid)
    report = watch(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=60)
    assert not report.healthy
    (f,) = report.findings_of("vanishing")
    assert f.layers[0] == "0" and "20" not in f.layers  # early layers, not the output side
    assert f.step == 1 and f.active
    assert f.evidence["decades_from_reference"]["0"] > 5
    assert report.layer("0").status == "vanishing" and report.layer("20").status == "ok"
    assert re.search(r"Gradients vanish in \d+ early layers", f.message)


@pytest.mark.parametrize("opt", ["sgd", "adam", "none"])
def test_he_relu_mlp_is_healthy(opt):
    seed(0)
    model = mlp(10, act=nn.ReLU, init="he")
    optim = {"sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.01),
             "adam": lambda: torch.optim.Adam(model.parameters(), lr=1e-3), "none": lambda: None}[opt]()
    if optim is None:  # no optimizer: steps come from the end of each backward pass
        gw = gradwatch.attach(model, reporters=[])
        for _ in range(60):
            model.zero_grad()
            x, y = tabular()
            nn.functional.mse_loss(model(x[:64]), y[:64]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
        gw.detach()
        report = gw.report()
        assert report.step == 60
    else:
        report = watch(model, optim, steps=100)
    assert report.healthy and report.findings == () and report.recommendations == ()
    assert all(la.status == "ok" for la in report.layers)


def test_small_resnet_with_batchnorm_is_healthy():
    seed(0)
    model = SmallResNet()
    report = watch(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), steps=50, data=images(),
                   loss="ce", batch=32)
    assert report.healthy, [str(f) for f in report.findings]
    assert report.structure.has_norm and report.structure.residual_adds >= 3


def test_lstm_is_healthy():
    """An LSTM with forget-gate bias 1 on the 60-step memory task: its input gradient fades about 4 orders of
    magnitude through time at step 1 and 2 by step 60, and it learns (measured with plain autograd)."""
    seed(0)
    model = SeqClassifier("lstm", forget_bias=1.0)
    report = watch(model, torch.optim.Adam(model.parameters(), lr=3e-3), steps=60, data=long_memory(), loss="ce")
    assert report.healthy, [str(f) for f in report.findings]


def test_lstm_that_cannot_remember_vanishes_through_time_and_gets_forget_gate_bias():
    """Default init (forget-gate bias 0) on the same task at lr 1e-3: the gradient reaching t=0 is 1e-11 to 1e-8
    of the last step's from step 1 to 125, while the loss stays at chance (0.68-0.70; measured with plain autograd,
    seed 0). gradwatch calls it vanishing through time once that has persisted, and proposes opening the forget
    gates. (At lr 1e-2 the same LSTM opens its gates by step 50 and learns: that run stays silent, see
    examples/tanh_rnn_to_lstm.py.)"""
    seed(0)
    model = SeqClassifier("lstm")
    report = watch(model, torch.optim.Adam(model.parameters(), lr=1e-3), steps=125, data=long_memory(), loss="ce")
    (f,) = report.findings_of("vanishing")
    assert f.through_time and f.layers == ("rnn",) and f.evidence["time_decades"]["rnn"] >= 6
    assert report.recommendations[0].fix == "forget_gate_bias"
    assert "bias_ih" in report.recommendations[0].snippet


def test_pre_ln_transformer_is_healthy():
    seed(0)
    model = TinyTransformer()
    report = watch(model, torch.optim.Adam(model.parameters(), lr=1e-3), steps=60, data=tokens(), loss="ce",
                   batch=32)
    assert report.healthy, [str(f) for f in report.findings]


def test_huge_learning_rate_is_nonfinite_with_origin_layer():
    seed(0)
    model = mlp(6, act=nn.ReLU, init="he")
    report = watch(model, torch.optim.SGD(model.parameters(), lr=3.0), steps=40)
    (f,) = report.findings_of("nonfinite")
    assert f.severity == "critical" and f.step <= 5
    assert f.evidence["origin_layer"] in f.layers
    assert report.layer("0").nonfinite > 0  # counted on the detail steps


@pytest.mark.parametrize("case", ["sigmoid, SGD", "sigmoid, Adam", "init too large", "learning rate too high"])
def test_findings_do_not_depend_on_how_many_steps_a_flush_judges(case):
    """The detector prepares a flush's rows all at once (numpy over rows and layers), then votes row by row: the
    findings, with their evidence and messages, must be the same whether each flush judges 1 step or 25."""
    def run(flush_every):
        seed(0)
        if case.startswith("sigmoid"):
            model = mlp(10, act=nn.Sigmoid)
            opt = (torch.optim.SGD(model.parameters(), lr=0.1) if case.endswith("SGD")
                   else torch.optim.Adam(model.parameters(), lr=1e-3))
        else:
            model = mlp(10 if case == "init too large" else 6, act=nn.ReLU, init="he",
                        init_gain=2.5 if case == "init too large" else 1.0)
            opt = torch.optim.SGD(model.parameters(), lr=1e-6 if case == "init too large" else 3.0)
        report = watch(model, opt, steps=60, flush_every=flush_every, activation_every=0)
        return [repr(dataclasses.asdict(f)) for f in report.findings], [layer.status for layer in report.layers]

    one_by_one, in_batches = run(1), run(25)
    assert one_by_one[0], "each case finds something"
    assert in_batches == one_by_one


def test_far_too_large_init_explodes():
    """2.5x the He scale over 10 ReLU layers: gradients of 1e5..1e7 at step 1, overflowing float32 at step 2."""
    seed(0)
    model = mlp(10, act=nn.ReLU, init="he", init_gain=2.5)
    report = watch(model, torch.optim.SGD(model.parameters(), lr=1e-6), steps=40)
    first = report.findings[0]
    assert first.kind in ("exploding", "nonfinite") and first.step <= 3 and first.severity == "critical"
    assert first.layers[0] == "0" and len(first.layers) >= 8
    assert report.recommendations[0].fix == "he_init"  # the init is 2.5x too large for ReLU


def test_converged_model_is_not_vanishing():
    """Tiny gradients everywhere because the loss is ~0 is convergence, not vanishing."""
    seed(0)
    model = mlp(4, act=nn.ReLU, init="he", d_in=5)
    x = torch.randn(256, 5)
    with torch.no_grad():
        y = model(x)  # the model already fits its targets exactly: loss is 0
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.attach(model, opt, reporters=[])
    train(model, opt, (x + 1e-8 * torch.randn_like(x), y), 40)
    gw.detach()
    report = gw.report()
    assert max(la.grad_rms for la in report.layers) < 1e-4
    assert report.healthy


def test_finding_does_not_fire_on_one_noisy_step():
    seed(0)
    model = mlp(8, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.attach(model, opt, reporters=[])
    x, y = tabular()
    for step in range(60):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[:64]), y[:64]).backward()
        lr = 0.01
        if step == 20:  # one step with a 1e5x gradient in the first layer, measured but not applied (lr 0)
            model[0].weight.grad.mul_(1e5)
            lr = 0.0
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    gw.detach()
    rows = gw.history.layers()
    spike = rows.grad_rms[rows.steps == 21, 0][0]
    assert spike > 1e3 * rows.grad_rms[rows.steps == 20, 0][0]  # the spike was seen...
    assert gw.report().healthy  # ...and one step is no finding


# -- steps, AMP, accumulation, frozen, tied, compile -----------------------------------------------------------

def test_gradient_accumulation_counts_optimizer_steps():
    seed(0)
    model = mlp(3, act=nn.ReLU, init="he")
    report = watch(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=12, accumulate=4)
    assert report.step == 12 and report.collected_steps == 12


def test_every_collects_every_nth_step():
    seed(0)
    model = mlp(3, act=nn.ReLU, init="he")
    report = watch(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=30, every=5)
    assert report.step == 30 and report.collected_steps == 6


def test_grad_scaler_gradients_are_judged_unscaled():
    seed(0)
    model = mlp(6, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    report = watch(model, opt, steps=40, scaler=scaler, autocast=True)
    assert report.healthy, [str(f) for f in report.findings]
    # Reference: the same model's unscaled gradient RMS without a scaler is of the same order.
    seed(0)
    ref_model = mlp(6, act=nn.ReLU, init="he")
    ref = watch(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.01), steps=40, autocast=True)
    for la, lb in zip(report.layers, ref.layers):
        assert 0.1 < la.grad_rms / lb.grad_rms < 10
    assert "update" not in type(scaler).__dict__ or scaler.__dict__.get("update") is None


def test_grad_scaler_overflow_skips_are_not_exploding():
    """A scale far too large overflows on the first steps; the scaler backs off and skips them. Not exploding."""
    seed(0)
    model = mlp(4, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    report = watch(model, opt, steps=60, scaler=scaler)
    assert report.skipped_steps >= 1
    assert report.healthy, [str(f) for f in report.findings]
    assert any("skipped by the loss scaler" in n for n in report.notes)


def test_grad_scaler_persistent_overflow_is_exploding():
    seed(0)
    model = mlp(4, act=nn.ReLU, init="he")
    with torch.no_grad():
        model[0].weight.mul_(1e30)  # every step overflows: the scaler keeps skipping
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=10 ** 6)
    report = watch(model, opt, steps=30, scaler=scaler)
    assert report.skipped_steps >= 25
    (f,) = report.findings_of("exploding")
    assert f.evidence["amp_skipped_steps"] >= 8


def test_frozen_and_missing_gradients():
    seed(0)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
            self.unused = nn.Linear(3, 3)  # never called: no gradient, ever

        def forward(self, x):
            return self.body(x)

    model = Net()
    for p in model.body[0].parameters():
        p.requires_grad_(False)
    report = watch(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01), steps=30)
    assert report.layer("body.0").status == "frozen"
    assert report.layer("unused").status == "no_grad"
    assert report.healthy


class _EveryTensorKind(nn.Module):
    """Every case the CPU measurement treats apart: large tensors (measured in place), many small ones of one shape
    (packed into a buffer), a 0-d scale, an empty parameter, a branch used on odd steps only (two patterns of
    missing gradients) and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(64, 256)  # a 16K-element weight: measured where it is
        self.proj = nn.Linear(256, 16)
        self.small = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))  # packed: six 16x16 weights, 16 biases
        self.side = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.head = nn.Linear(16, 1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.empty = nn.Parameter(torch.zeros(0))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.proj(torch.relu(self.big(x))))
        for layer in self.small:
            h = h + torch.tanh(layer(h))
        if self.calls % 2:
            h = h + self.side(h)
        return self.head(self.frozen(h)) * self.scale + self.empty.sum()


def _reference_figures(model, opt):
    """Per step, per parameter name: ||g||, max|g|, and ||w|| and ||w_new - w|| of that step, measured by hooks
    registered before gradwatch's (so they see the same tensors), with plain per-tensor torch ops."""
    figures, before = [], {}

    def pre(*_):
        row = {}
        for name, p in model.named_parameters():
            g = p.grad
            row[name] = [float(g.norm()), float(g.abs().max()) if g.numel() else 0.0] if g is not None else None
            before[name] = p.detach().clone()
        figures.append(row)

    def post(*_):
        for name, p in model.named_parameters():
            if figures[-1][name] is not None:
                figures[-1][name] += [float(before[name].norm()), float((p.detach() - before[name]).norm())]

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    return figures


def test_figures_equal_plain_torch_on_every_kind_of_tensor():
    seed(0)
    model = _EveryTensorKind()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    reference = _reference_figures(model, opt)
    gw = gradwatch.attach(model, opt, reporters=[], update_every=3)
    train(model, opt, tabular(d=64), 12)
    gw.detach()
    hist, names = gw.history, gw.adapter.table.param_names
    assert list(hist.steps) == list(range(1, 13))
    values = hist.values
    measured_detail = 0
    for r, row in enumerate(reference):
        for j, name in enumerate(names):
            got = values[r, j]
            if row[name] is None:  # frozen, or the side branch on an even step: no gradient, no figure
                assert np.isnan(got).all(), (r + 1, name, got)
                continue
            np.testing.assert_allclose(got[0], row[name][0], rtol=1e-5, atol=1e-12, err_msg=f"{name} step {r + 1}")
            detail = r in (0, 3, 6, 9)  # collected steps 1, 4, 7, 10 with update_every=3
            assert np.isnan(got[1:]).all() != detail, (r + 1, name, got)
            if detail:
                measured_detail += 1
                np.testing.assert_allclose(got[[1, 3, 4]], np.asarray(row[name])[[1, 2, 3]], rtol=1e-5, atol=1e-12,
                                           err_msg=f"{name} step {r + 1}")
                assert got[2] == 0
    assert measured_detail > 40
    assert "side.weight" in names and np.isnan(values[1, names.index("side.weight"), 0])  # step 2: side unused


def test_activation_figures_equal_plain_torch_small_and_large():
    """On CPU an output under 8,192 values is measured through a NumPy view, a larger one by torch kernels: both
    must give the figures plain torch gives on the same forward (saturation, dead units, RMS), step by step."""
    from gradwatch.core.stats import DEAD_UNIT_SAMPLES, SATURATION_MARGIN

    seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 256), nn.Tanh(),  # batches of 64: 1,024 and
                          nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 1))  # 16,384
    with torch.no_grad():
        model[2].weight.mul_(8.0)  # saturates part of the wide tanh
        model[6].bias[:100].fill_(-50.0)  # 100 of the wide ReLU's units never fire
    outputs: list[dict[int, torch.Tensor]] = []
    taps = [model[i].register_forward_hook(lambda m, a, out, i=i: outputs[-1].__setitem__(i, out.detach().clone()))
            for i in (0, 2, 4, 6)]
    pre = model.register_forward_pre_hook(lambda m, a: outputs.append({}))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gw = gradwatch.attach(model, opt, reporters=[], activation_every=1, flush_every=1000)
    train(model, opt, tabular(), 8)
    acts = gw.adapter.drain()[1]
    gw.detach()
    for h in (*taps, pre):
        h.remove()
    names = gw.adapter.table.layer_names
    cut = {0: np.arctanh(1 - SATURATION_MARGIN), 2: np.arctanh(1 - SATURATION_MARGIN)}
    assert list(acts.steps) == list(range(2, 9))  # armed once the first step has built the layer table
    for r, step in enumerate(acts.steps):
        for i in (0, 2, 4, 6):
            x = outputs[step - 1][i].double()
            li = names.index(str(i))
            np.testing.assert_allclose(acts.rms[r, li], x.pow(2).mean().sqrt().item(), rtol=1e-5)
            if i in cut:
                assert acts.saturation[r, li] == (x.abs() > cut[i]).double().mean().item()
            else:
                window = [s for s in acts.steps if s <= step][-DEAD_UNIT_SAMPLES:]  # the last sampled batches
                fired = torch.stack([outputs[s - 1][i] > 0 for s in window]).any(dim=0).any(dim=0)
                want = (~fired).double().mean().item() if len(window) == DEAD_UNIT_SAMPLES else None
                assert (np.isnan(acts.dead[r, li]) if want is None else acts.dead[r, li] == want), (step, i)
    assert acts.dead[-1, names.index("6")] >= 100 / 256 and acts.saturation[-1, names.index("2")] > 0.05


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_update_norm_of_a_large_weight_is_estimated_from_a_sample_within_two_percent(optimizer):
    # On CPU a weight of 64K elements or more has its update norm estimated from every 7th cache line of it (each
    # row in the sample); its gradient norm, max |g| and weight norm stay exact, and so does every smaller tensor.
    seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "adam" else \
        torch.optim.SGD(model.parameters(), lr=0.05)
    reference = _reference_figures(model, opt)
    gw = gradwatch.attach(model, opt, reporters=[], update_every=3)
    train(model, opt, tabular(d=64), 12)
    gw.detach()
    names, values = gw.adapter.table.param_names, gw.history.values
    errors = []
    for r in (0, 3, 6, 9):  # the detail steps
        for j, name in enumerate(names):
            got, want = values[r, j], np.asarray(reference[r][name])
            np.testing.assert_allclose(got[[0, 1, 3]], want[[0, 1, 2]], rtol=1e-5, err_msg=f"{name} step {r + 1}")
            if name == "2.weight":  # 512 x 512: sampled
                errors.append(abs(got[4] / want[3] - 1))
            else:
                np.testing.assert_allclose(got[4], want[3], rtol=1e-5, err_msg=f"{name} step {r + 1}")
    assert 0 < max(errors) < 0.02, errors


def test_nonfinite_values_are_counted_exactly_in_packed_and_large_tensors():
    seed(0)
    model = _EveryTensorKind()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def poison(*_):
        if gw.step == 3:  # the 4th step, a detail step with update_every=3
            model.small[2].weight.grad[0, :3] = float("nan")  # a packed tensor: 3 NaN
            model.small[2].weight.grad[1, 0] = float("inf")   # and an inf
            model.big.weight.grad[5, 7] = float("-inf")       # a large one: 1

    opt.register_step_pre_hook(poison)
    gw = gradwatch.attach(model, opt, reporters=[], update_every=3)
    train(model, opt, tabular(d=64), 4)
    gw.detach()
    names, row = gw.adapter.table.param_names, gw.history.values[3]
    counts = {name: row[j, 2] for j, name in enumerate(names) if not np.isnan(row[j, 2])}
    assert counts.pop("small.2.weight") == 4 and counts.pop("big.weight") == 1
    assert set(counts.values()) == {0.0}, counts
    # A non-finite gradient's norm is +inf (NaN would read as "no gradient" in a row).
    assert np.isinf(row[names.index("small.2.weight"), 0]) and np.isinf(row[names.index("big.weight"), 0])


def test_nan_gradient_between_detail_steps_is_found_at_its_step_and_counted():
    # Max |g| and the count are taken every update_every collected steps; on CPU a step whose gradient norm is not
    # finite is counted at once (a NaN norm must not read as "no gradient").
    seed(0)
    model = mlp(4, act=nn.Tanh, init="xavier")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def poison(*_):
        if gw.step == 4:  # the 5th step; detail steps are 1, 11, 21 ...
            model[2].weight.grad[0, :2] = float("nan")

    opt.register_step_pre_hook(poison)
    gw = gradwatch.attach(model, opt, reporters=[])
    train(model, opt, tabular(), 8)
    gw.detach()
    (f,) = gw.report().findings_of("nonfinite")
    assert f.step == 5 and f.evidence["nonfinite_values"] == 2 and f.evidence["origin_layer"] == "2"


def test_tied_parameters_are_counted_once():
    seed(0)
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, nn.Flatten(), nn.Unflatten(1, (8, 16)), head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.attach(model, opt, reporters=[])
    x = torch.randint(0, 50, (32, 8))
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).reshape(-1, 50), x.reshape(-1)).backward()
        opt.step()
    gw.detach()
    table = gw.adapter.table
    assert table.param_names.count("0.weight") == 1 and "3.weight" not in table.param_names
    assert gw.report().step == 10


def test_params_added_to_optimizer_later():
    seed(0)
    model = mlp(3, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model[0].parameters(), lr=0.01)
    gw = gradwatch.attach(model, opt, reporters=[])
    train(model, opt, tabular(), 5)
    opt.add_param_group({"params": [p for m in list(model)[1:] for p in m.parameters()]})
    train(model, opt, tabular(), 5)
    gw.detach()
    assert gw.report().step == 10


def test_torch_compile_gives_same_findings():
    seed(0)
    eager = mlp(10, act=nn.Sigmoid)
    seed(0)
    compiled_base = mlp(10, act=nn.Sigmoid)
    compiled = torch.compile(compiled_base, backend="eager")
    r1 = watch(eager, torch.optim.SGD(eager.parameters(), lr=0.1), steps=30)
    r2 = watch(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), steps=30)
    assert [(f.kind, f.layers, f.step) for f in r1.findings] == [(f.kind, f.layers, f.step) for f in r2.findings]
    assert r2.layers[0].name == "0"  # the user's names, without torch.compile's _orig_mod prefix


# -- lifecycle -----------------------------------------------------------------------------------------------

def test_detach_leaves_no_hook_and_same_training():
    seed(0)
    model = mlp(4, act=nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_pre, n_post = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    with gradwatch.attach(model, opt, reporters=[], activation_every=2) as gw:
        train(model, opt, tabular(), 7)
    assert not gw.active and no_hooks(model)
    assert len(opt._optimizer_step_pre_hooks) == n_pre and len(opt._optimizer_step_post_hooks) == n_post
    # attach -> detach -> attach works, and training after detach equals training never watched
    gw2 = gradwatch.attach(model, opt, reporters=[])
    gw2.detach()
    model.load_state_dict(state)
    seed(0)
    twin = mlp(4, act=nn.Tanh)
    twin.load_state_dict(state)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.1)
    la = train(model, opt_a, tabular(), 5)
    lb = train(twin, opt_b, tabular(), 5)
    assert la == lb


def test_detach_on_exception_in_with_block():
    seed(0)
    model = mlp(2, act=nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(RuntimeError, match="user error"), gradwatch.attach(model, opt, reporters=[]):
        train(model, opt, tabular(), 2)
        raise RuntimeError("user error")
    assert no_hooks(model)
    gradwatch.attach(model, opt, reporters=[]).detach()  # no 'already attached'


def test_attach_twice_raises_and_points_to_detach():
    model = mlp(2)
    gw = gradwatch.attach(model, reporters=[])
    with pytest.raises(gradwatch.AttachError, match=r"already attached.*detach\(\)"):
        gradwatch.attach(model, reporters=[])
    gw.detach()
    gw.detach()  # repeatable


def test_scaler_wrapper_removed_on_detach():
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    gw = gradwatch.attach(model, opt, scaler=scaler, reporters=[])
    assert "update" in scaler.__dict__
    gw.detach()
    assert "update" not in scaler.__dict__


def test_report_any_time_and_after_detach():
    model = mlp(3, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.attach(model, opt, reporters=[])
    assert gw.report().step == 0 and gw.report().layers == ()
    train(model, opt, tabular(), 7)
    assert gw.report().step == 7  # flushes what is pending, mid-run
    gw.detach()
    d = gw.report().to_dict()
    import json

    again = gradwatch.Report.from_dict(json.loads(json.dumps(d)))
    assert again.step == 7 and [la.name for la in again.layers] == ["0", "2", "4", "6"]


def test_history_memory_is_bounded():
    model = mlp(2, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    gw = gradwatch.attach(model, opt, reporters=[], history=16, flush_every=7)
    train(model, opt, tabular(), 400, batch=8)
    gw.detach()
    hist = gw.history
    assert len(hist) <= 16 and hist.total_steps == 400
    assert hist.spans.sum() == 400 and hist.steps[0] == 1  # older steps merged, none lost
    assert gw.report().step == 400


def test_rare_flushes_keep_every_row_without_allocating_the_period_up_front():
    # 10**8 rows of the statistics ring up front would be gigabytes for this model: it starts small and doubles.
    model = mlp(2, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    gw = gradwatch.attach(model, opt, reporters=[], flush_every=10**8, strict=True)
    train(model, opt, tabular(), 300, batch=8)
    assert gw.adapter._ring.values.shape[0] == 512  # 64 rows, doubled to hold 300
    gw.detach()
    assert gw.active is False and gw.history.total_steps == 300 and gw.report().step == 300
    assert gw.history.steps[0] == 1


# -- fail-open and strict ------------------------------------------------------------------------------------

def _break_adapter(gw):
    def boom(*args):
        raise RuntimeError("internal bug")
    gw.adapter._grad_stats = boom


def test_internal_error_warns_once_and_training_goes_on():
    seed(0)
    model = mlp(3, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.attach(model, opt, reporters=[])
    _break_adapter(gw)
    with pytest.warns(RuntimeWarning, match="turned monitoring off.*internal bug") as rec:
        losses = train(model, opt, tabular(), 10)
    assert len([w for w in rec if "gradwatch" in str(w.message)]) == 1
    assert len(losses) == 10 and not gw.active and no_hooks(model)
    assert gw.report().monitoring.startswith("off")
    gw.detach()


def test_strict_raises():
    model = mlp(3, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.attach(model, opt, reporters=[], strict=True)
    _break_adapter(gw)
    with pytest.raises(gradwatch.MonitoringError, match="internal bug"):
        train(model, opt, tabular(), 2)
    gw.detach()


def test_failing_reporter_is_dropped_not_fatal():
    class Bad(gradwatch.Reporter):
        def on_flush(self, flush):
            raise ValueError("reporter bug")

    model = mlp(3, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match="dropped reporter Bad"):
        gw = gradwatch.attach(model, opt, reporters=[Bad()], flush_every=2)
        train(model, opt, tabular(), 6)
    gw.detach()
    assert gw.report().step == 6


# -- bad arguments -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, pattern", [
    (lambda m, o: gradwatch.attach("resnet"), TypeError, r"needs a torch.nn.Module or a keras.Model, received str"),
    (lambda m, o: gradwatch.attach(m, every=0), ValueError, r"every must be an int >= 1, received every=0"),
    (lambda m, o: gradwatch.attach(m, every=1.5), TypeError, r"every must be an int >= 1, received every=1.5"),
    (lambda m, o: gradwatch.attach(m, flush_every=-1), ValueError, r"flush_every must be an int >= 1"),
    (lambda m, o: gradwatch.attach(m, evry=3), TypeError, r"unknown option\(s\) 'evry'; accepted: reporters, every"),
    (lambda m, o: gradwatch.attach(m, reporters="console"), TypeError, r"reporters must be a list"),
    (lambda m, o: gradwatch.attach(m, reporters=["tb"]), ValueError, r"unknown reporter 'tb'.*'tensorboard'"),
    (lambda m, o: gradwatch.attach(m, strict="yes"), TypeError, r"strict must be True or False"),
    (lambda m, o: gradwatch.attach(m, "adam"), TypeError, r"optimizer must be a torch.optim.Optimizer"),
    (lambda m, o: gradwatch.attach(m, o), ValueError, r"holds none of the 4 parameters of Sequential"),
    (lambda m, o: gradwatch.attach(m, scaler=object()), TypeError, r"scaler must be a torch.amp.GradScaler"),
    (lambda m, o: gradwatch.attach(nn.ReLU()), gradwatch.AttachError, r"has no parameters"),
])
def test_bad_arguments_get_clear_errors(call, exc, pattern):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    other = torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.raises(exc, match=pattern):
        call(model, other)
    assert no_hooks(model)


# -- console -------------------------------------------------------------------------------------------------

def test_console_block_once_and_summary_at_detach():
    seed(0)
    model = mlp(10, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buf = io.StringIO()
    gw = gradwatch.attach(model, opt, reporters=[gradwatch.ConsoleReporter(file=buf)], flush_every=10)
    train(model, opt, tabular(), 50)
    mid = buf.getvalue()
    assert mid.count("gradwatch: vanishing gradients at step 1") == 1  # one block, not one per step
    gw.detach()
    out = buf.getvalue()
    assert "problems found: vanishing" in out and "Recommendations" in out and "1. relu" in out
    assert "\x1b[" not in out  # plain text when not a terminal
    table = out[out.index("Layers, input"):]
    assert table.index(" 0 ") < table.index(" 20 ")  # input to output
    assert str(gw.report()).startswith("gradwatch Sequential — step 50")


def test_silent_with_no_reporters(capsys):
    model = mlp(10, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.attach(model, opt, reporters=[]):
        train(model, opt, tabular(), 30)
    assert capsys.readouterr().out == ""


def test_no_warnings_on_a_healthy_run():
    model = mlp(3, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradwatch.attach(model, opt, reporters=[]):
            train(model, opt, tabular(), 30)
