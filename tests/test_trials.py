"""``gradwatch.trial`` on real PyTorch training: the fixes run as short experiments, and the one that cures the
model is shown; fixes that cannot be applied mechanically say why; a healthy model trains the baseline only.

The six classic cases (examples/) show trial curing each one; tests/test_examples.py runs them. The Keras form
runs in tests/test_keras.py, on every backend.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import gradwatch  # noqa: E402
from tests.fixtures.models import FunctionalTanhMLP, mlp, tabular  # noqa: E402
from tests.fixtures.wandb_records import read_run  # noqa: E402


def batches(n=40, batch=64, seed=1):
    x, y = tabular()
    g = torch.Generator().manual_seed(seed)
    return [(x[i], y[i]) for i in (torch.randint(0, len(x), (batch,), generator=g) for _ in range(n))]


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def sigmoid_mlp():
    return mlp(depth=10, act=nn.Sigmoid)


def test_sigmoid_mlp_relu_cures_it_and_nothing_of_the_users_changes(tmp_path):
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    result = gradwatch.trial(sigmoid_mlp, batches(), F.mse_loss, sgd(0.02), steps=150)
    assert torch.equal(torch.random.get_rng_state(), before)  # the random state is left as it was found
    base = result.baseline
    assert base.fix is None and "vanishing" in base.findings and len(base.losses) == 150
    recs = base.report.recommendations
    assert [r.fix for r in result.runs] == [r.fix for r in recs[:3]] and recs[0].fix == "relu"
    relu = result.runs[0]
    assert relu.applied and relu.cured and relu.findings == () and "nn.ReLU" in relu.change
    assert relu.final_loss < base.final_loss
    best = result.best
    assert best is not None and best.cured and best.final_loss == min(r.final_loss for r in result.runs if r.cured)
    assert best.fix in str(result) and "cures it" in result.message
    # Every run saw the same batches in the same order: the first step's loss of an untouched model is the same.
    assert all(len(r.losses) == 150 for r in result.runs if r.applied)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["best"] == best.fix and d["runs"][0]["fix"] == "relu" and d["baseline"]["report"]["findings"]
    fig_path = tmp_path / "trial.png"
    result.plot(str(fig_path))
    assert fig_path.stat().st_size > 10_000


def test_same_batches_and_random_state_for_every_run():
    """A fix that changes nothing before step 1 (clipping at a norm never reached) gives the baseline's losses
    exactly: same init, same batches, same order."""
    torch.manual_seed(0)
    result = gradwatch.trial(sigmoid_mlp, batches(), F.mse_loss, sgd(0.05), steps=30,
                             fixes=["gradient_clipping"])
    (clip,) = result.runs
    assert clip.applied and clip.losses[0] == result.baseline.losses[0]


def test_a_functional_activation_is_not_applicable_and_says_why():
    torch.manual_seed(0)
    result = gradwatch.trial(lambda: FunctionalTanhMLP(depth=12), batches(), F.mse_loss, sgd(0.05), steps=60,
                             fixes=["relu", "he_init"])
    assert "vanishing" in result.baseline.findings, result.baseline.report
    relu, he = result.runs
    assert not relu.applied and relu.losses == () and not relu.cured
    assert "function call in forward()" in relu.reason and "torch.sigmoid(x)" in relu.reason
    assert he.applied and "He (kaiming_normal_) init" in he.change
    assert "relu not applied: the activation after" in str(result)


def test_a_healthy_model_trains_the_baseline_only():
    torch.manual_seed(0)
    result = gradwatch.trial(lambda: mlp(depth=4, act=nn.ReLU, init="he"), batches(), F.mse_loss, sgd(0.01),
                             steps=60)
    assert result.runs == () and result.best is None and result.baseline.report.healthy
    assert "nothing to fix" in result.message and len(result.baseline.losses) == 60


def test_a_fix_that_breaks_training_is_reported_not_faked():
    """The forward unpacks nn.RNN's hidden state as a tensor; nn.LSTM's is a tuple, so the swapped model fails."""

    class UsesHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(4, 16, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            _, h = self.rnn(x)
            return self.head(h[-1])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, 4, generator=g) * 0.5
    data = [(x, (x[:, 0, 0] > 0).long())]
    torch.manual_seed(0)
    result = gradwatch.trial(UsesHidden, data, F.cross_entropy, lambda p: torch.optim.Adam(p, lr=0.01), steps=40,
                             fixes=["gated_rnn"])
    if not result.baseline.findings:
        pytest.skip("the baseline learned: nothing was tried")
    (run,) = result.runs
    assert not run.applied and run.reason.startswith("training with the fix failed (")


@pytest.mark.parametrize("call, match", [
    (lambda: gradwatch.trial(nn.Linear(2, 2), [], F.mse_loss, sgd(0.1)), "make_model must be a function"),
    (lambda: gradwatch.trial(sigmoid_mlp, [], F.mse_loss, sgd(0.1)), "batches is empty"),
    (lambda: gradwatch.trial(sigmoid_mlp, iter(batches()), F.mse_loss, sgd(0.1)), "an iterator can be read only"),
    (lambda: gradwatch.trial(sigmoid_mlp, [torch.ones(2)], F.mse_loss, sgd(0.1)), "an \\(input, target\\) pair"),
    (lambda: gradwatch.trial(sigmoid_mlp, batches(2), "mse", sgd(0.1)), "loss_fn must be a function"),
    (lambda: gradwatch.trial(sigmoid_mlp, batches(2), F.mse_loss, sgd(0.1), steps=0), "steps must be an int >= 1"),
    (lambda: gradwatch.trial(sigmoid_mlp, batches(2), F.mse_loss, sgd(0.1), fixes=["relu", "magic"]),
     "unknown fix name\\(s\\) 'magic'; accepted: relu, he_init"),
    (lambda: gradwatch.trial(sigmoid_mlp, batches(2), F.mse_loss, sgd(0.1), top=0), "top must be an int >= 1"),
    (lambda: gradwatch.trial(42, [], F.mse_loss, sgd(0.1)), "received int"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_make_model_returning_the_same_instance_twice():
    model = sigmoid_mlp()
    with pytest.raises(ValueError, match="returned the same model instance twice"):
        gradwatch.trial(lambda: model, batches(), F.mse_loss, sgd(0.05), steps=30)


def test_the_table_reaches_an_active_wandb_run(tmp_path):
    import wandb

    run = wandb.init(project="gradwatch-tests", mode="offline", dir=tmp_path)
    try:
        torch.manual_seed(0)
        result = gradwatch.trial(sigmoid_mlp, batches(), F.mse_loss, sgd(0.05), steps=60, fixes=["relu"],
                                 wandb_run=run)
        run.log({"user/metric": 1.0})
    finally:
        run.finish()
    logged = read_run(tmp_path)
    table = logged.table_rows(logged.summary["gradwatch/trial"])
    assert [r[0] for r in table] == ["baseline (as given)", "relu"]
    assert table[1][5] == result.runs[0].cured
