"""gradwatch inside the frameworks people train with: accelerate, HF Trainer, Lightning, closures, TensorBoard.

Every test trains a real model through the real framework and compares what gradwatch recorded with the
gradients read by a plain callback of that framework at the same moment.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from tests.fixtures.models import mlp, seed, tabular, train  # noqa: E402

pytestmark = pytest.mark.torch


def layer_norms(model: nn.Module) -> dict[str, float]:
    """Per module that owns parameters: the L2 norm of all its gradients, as gradwatch's layers group them."""
    out = {}
    for name, module in model.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            out[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    return out


def recorded(gw) -> tuple[list[str], np.ndarray]:
    """gradwatch's per-step, per-layer gradient norms (rows of collected steps)."""
    return list(gw.adapter.table.layer_names), gw.history.layers().grad_norm


def assert_same_norms(gw, reference: list[dict[str, float]]) -> None:
    names, norms = recorded(gw)
    assert norms.shape[0] == len(reference) > 0
    for row, ref in zip(norms, reference):
        got = dict(zip(names, row))
        for name, value in ref.items():
            assert got[name] == pytest.approx(value, rel=1e-4), name


def optimizer_hooks(opt) -> int:
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def tb_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``, read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


# -- wrapped optimizers and closures ---------------------------------------------------------------------------

def test_accelerate_optimizer_is_unwrapped_and_judged_at_sync_steps():
    accelerate = pytest.importorskip("accelerate")
    seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 1))
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    inner = opt.optimizer
    gw = gradwatch.attach(model, opt, reporters=[])
    x, y = tabular(128)
    ref = []
    for i in range(16):
        with acc.accumulate(model):
            loss = nn.functional.mse_loss(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
            acc.backward(loss)
            if acc.sync_gradients:
                ref.append(layer_norms(model))
            opt.step()
            opt.zero_grad()
    assert optimizer_hooks(inner) == 2
    gw.detach()
    assert gw.step == 8  # optimizer steps, not micro-batches
    assert_same_norms(gw, ref)
    assert np.isfinite(gw.history.layers().update_ratio[0]).all()  # a plain step(): snapshot in the pre-hook
    assert optimizer_hooks(inner) == 0


def test_closure_step_judges_this_steps_gradients_and_update():
    seed(0)
    model = mlp(3, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = tabular(256)
    ref: list[dict[str, float]] = []
    gw = gradwatch.attach(model, opt, reporters=[], update_every=1)
    for i in range(10):
        def closure(i=i):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16])
            loss.backward()
            ref.append(layer_norms(model))
            return loss
        opt.step(closure)
    gw.detach()
    assert_same_norms(gw, ref)  # step 1 too: the pre-hook alone would have seen no gradient at all
    ratio = gw.history.layers().update_ratio[1:]  # step 1 builds the table after its closure: no snapshot before
    assert np.isfinite(ratio).all() and (ratio > 0).all()


def test_lbfgs_closure_steps_are_counted_and_judged():
    seed(0)
    model = mlp(3, act=nn.Tanh, init="xavier")
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    x, y = tabular(128)
    last: list[dict[str, float]] = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        last[:] = [layer_norms(model)]
        return loss

    with gradwatch.attach(model, opt, reporters=[]) as gw:
        ref = []
        for _ in range(6):
            opt.step(closure)
            ref.append(last[0])  # the gradients left by the step's last closure call
    assert gw.step == 6
    assert_same_norms(gw, ref)
    assert gw.report().healthy


def test_optimizer_that_cannot_be_unwrapped_gets_a_clear_error():
    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    model = nn.Linear(4, 1)
    with pytest.raises(TypeError, match=r"received Wrapper -> str, which holds no torch.optim.Optimizer"):
        gradwatch.attach(model, Wrapper("sgd"), reporters=[])


# -- Hugging Face Trainer ----------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16, vocab: int = 100) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, length), generator=g)
        self.y = (self.x[:, 0] > vocab // 2).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 256) -> None:
        self.x, self.y = tabular(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _RegressionModel(nn.Module):
    """A plain module Trainer can train: returns ``{"loss": ...}``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def _tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=2,
                logging_steps=2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class _PreStep(transformers.TrainerCallback):
    """The reference: the gradients Trainer hands the optimizer, read in its own on_pre_optimizer_step."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append(layer_norms(model))


def test_hf_trainer_callback_judges_applied_gradients_and_fills_every_report_to_backend(tmp_path, monkeypatch):
    from gradwatch.integrations.transformers import GradwatchCallback

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    seed(0)
    model = _tiny_bert()
    cb, ref = GradwatchCallback(reporters=[]), _PreStep()
    args = _args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.5, report_to=["tensorboard"])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[ref, cb])
    trainer.train()

    report = cb.report()
    assert report.step == trainer.state.global_step == 8
    assert_same_norms(cb.watcher, ref.norms)  # accumulated and clipped, as the optimizer applied them
    assert report.healthy
    assert any("max_grad_norm=0.5" in n and "pre-clip norm" in n for n in report.notes)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["gradwatch/healthy"] == 1.0 for h in logged)
    assert {"gradwatch/log10_grad_rms/bert.encoder.layer.0", "gradwatch/log10_grad_rms/classifier"} <= set(logged[0])
    # Trainer's own TensorBoard callback wrote gradwatch's values: this callback ran before it.
    scalars = tb_scalars(str(tmp_path / "tb"))
    assert [s for s, _ in scalars["train/gradwatch/healthy"]] == [h["step"] for h in logged]
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks][0] == "GradwatchCallback"
    assert optimizer_hooks(trainer.optimizer.optimizer) == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_hf_trainer_finds_a_vanishing_model_and_logs_it(tmp_path):
    from gradwatch.integrations.transformers import GradwatchCallback

    seed(0)
    model = _RegressionModel(mlp(10, act=nn.Sigmoid, init="default"))
    cb = GradwatchCallback(reporters=[], flush_every=10)
    args = _args(tmp_path, per_device_train_batch_size=32, num_train_epochs=8, learning_rate=0.05,
                 optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=8)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows())
    trainer.add_callback(cb)
    trainer.train()
    report = cb.report()
    vanishing = [f for f in report.findings if f.kind == "vanishing"]
    assert vanishing and vanishing[0].layers[0] == "net.0"
    assert report.recommendations[0].fix == "relu"
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["gradwatch/healthy"] == 0.0 and last["gradwatch/vanishing_layers"] >= 3


def test_hf_trainer_callback_added_twice_is_refused(tmp_path):
    from gradwatch.integrations.transformers import GradwatchCallback

    cb = GradwatchCallback(reporters=[])
    trainer = transformers.Trainer(model=_tiny_bert(), args=_args(tmp_path), train_dataset=_Tokens(),
                                   callbacks=[cb, cb])
    with pytest.raises(ValueError, match="added to the Trainer twice"):
        trainer.train()
    with pytest.raises(gradwatch.WatcherStateError, match="needs a train"):
        GradwatchCallback().report()


# -- Lightning ---------------------------------------------------------------------------------------------------

L = pytest.importorskip("lightning.pytorch")


class _LitRegressor(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _BeforeStep(L.Callback):
    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(layer_norms(pl_module))


def _loader(n: int = 256, batch: int = 16):
    x, y = tabular(n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _lightning(tmp_path, callbacks, **kw):
    return L.Trainer(callbacks=callbacks, logger=L.loggers.CSVLogger(str(tmp_path)), enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                     log_every_n_steps=1, **kw)


def test_lightning_callback_reads_accumulated_unclipped_gradients_of_this_step(tmp_path):
    from gradwatch.integrations.lightning import GradwatchCallback

    seed(0)
    module = _LitRegressor(mlp(3, act=nn.Tanh, init="xavier"))
    cb, ref = GradwatchCallback(reporters=[], flush_every=4), _BeforeStep()
    trainer = _lightning(tmp_path, [ref, cb], max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.1)
    trainer.fit(module, _loader())
    assert trainer.global_step == cb.report().step == 16
    assert_same_norms(cb.watcher, ref.norms)
    assert max(ref.norms[3].values()) > 0.1  # so clipping changed what the optimizer applied, not what was judged
    rows = cb.watcher.history.layers()
    assert np.isfinite(rows.update_ratio).any()  # the update of a closure step is measured too
    metrics = glob.glob(str(tmp_path / "**" / "metrics.csv"), recursive=True)
    with open(metrics[0]) as fh:
        header = fh.readline().strip().split(",")
    assert "gradwatch/grad_rms/net.0" in header and "gradwatch/health/healthy" in header
    assert optimizer_hooks(trainer.optimizers[0]) == 0


def test_lightning_finds_vanishing_sigmoid_stack(tmp_path):
    from gradwatch.integrations.lightning import GradwatchCallback

    seed(0)
    module = _LitRegressor(mlp(10, act=nn.Sigmoid, init="default"), lr=0.05)
    cb = GradwatchCallback(reporters=[], log_metrics=False)
    _lightning(tmp_path, [cb], max_epochs=12).fit(module, _loader(batch=32))
    report = cb.report()
    assert any(f.kind == "vanishing" and f.layers[0] == "net.0" for f in report.findings)
    assert report.recommendations[0].fix == "relu"


def test_plain_attach_inside_lightning_reads_closure_gradients(tmp_path):
    """No gradwatch callback: attach() to the module and its raw optimizer; Lightning steps with a closure."""
    seed(0)
    module = _LitRegressor(mlp(3, act=nn.ReLU, init="he"))
    ref = _BeforeStep()
    watchers = []

    class Attach(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            watchers.append(gradwatch.attach(pl_module, trainer.optimizers[0], reporters=[]))

    _lightning(tmp_path, [ref, Attach()], max_epochs=1).fit(module, _loader())
    watchers[0].detach()
    assert_same_norms(watchers[0], ref.norms)


# -- TensorBoard ---------------------------------------------------------------------------------------------------

def test_tensorboard_reporter_writes_series_findings_and_flow_image(tmp_path):
    pytest.importorskip("matplotlib")
    from gradwatch.integrations.tensorboard import TensorBoardReporter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed(0)
    model = mlp(10, act=nn.Sigmoid, init="default")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tb = TensorBoardReporter(log_dir=tmp_path / "tb", image_every=2)
    with gradwatch.attach(model, opt, reporters=[tb], flush_every=20):
        train(model, opt, tabular(), 80)
    scalars = tb_scalars(str(tmp_path / "tb"))
    assert [s for s, _ in scalars["gradwatch/grad_rms/0"]] == [20, 40, 60, 80]
    first, last = scalars["gradwatch/grad_rms/0"][-1][1], scalars["gradwatch/grad_rms/18"][-1][1]
    assert first < last / 100  # the vanishing gradient, as a series
    assert scalars["gradwatch/health/healthy"][-1][1] == 0.0
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    acc = EventAccumulator(path, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("gradwatch/findings")]
    assert "| vanishing |" in texts[-1] and "| relu |" in texts[-1]
    summary = acc.Tensors("gradwatch/summary")[-1].tensor_proto.string_val[0].decode()
    assert "vanishing" in summary
    images = acc.Images("gradwatch/flow")
    assert len(images) >= 2 and images[-1].encoded_image_string.startswith(b"\x89PNG")


def test_tensorboard_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seed(0)
    model = mlp(3, act=nn.ReLU, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.attach(model, opt, reporters=["tensorboard"], flush_every=10):
        train(model, opt, tabular(), 20)
    (run,) = glob.glob(str(tmp_path / "runs" / "*_gradwatch"))
    assert tb_scalars(run)["gradwatch/health/healthy"] == [(10, 1.0), (20, 1.0)]


# -- torch.compile -------------------------------------------------------------------------------------------------

class _Net(nn.Module):
    """A user-defined module (``model.compile()`` compiles its ``forward``; torch's own containers are skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(6, act=nn.Sigmoid, init="default")

    def forward(self, x):
        return self.body(x)


def _compile_run(how: str):
    """Train the same model for 40 steps with gradwatch attached ``how``; dynamo's own counters, the findings."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cnt = CompileCounter()
    gw, net = None, model
    if how.startswith("attach, "):
        gw = gradwatch.attach(model, opt, reporters=[])
    if "torch.compile(model)" in how:
        net = torch.compile(model, backend=cnt)
    elif "model.compile()" in how:
        model.compile(backend=cnt)
    if how.endswith(", attach"):
        gw = gradwatch.attach(net, opt, reporters=[])
    train(net, opt, tabular(), 40)
    report = gw.report() if gw is not None else None
    if gw is not None:
        gw.detach()
    return (cnt.frame_count, dict(counters["stats"]), sum(counters["graph_break"].values())), report


@pytest.mark.parametrize("how", ["attach, torch.compile(model)", "torch.compile(model), attach",
                                 "attach, model.compile()", "model.compile(), attach"])
def test_torch_compile_no_graph_break_or_recompile_and_eager_findings(how):
    plain = how.replace("attach, ", "").replace(", attach", "")
    baseline, _ = _compile_run(plain)
    counts, report = _compile_run(how)
    assert baseline[0] == 1 and counts == baseline  # frames compiled, graphs captured, 0 graph breaks
    torch._dynamo.reset()
    seed(0)
    eager_model = _Net()
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.05)
    with gradwatch.attach(eager_model, eager_opt, reporters=[]) as eager:
        train(eager_model, eager_opt, tabular(), 40)
    assert [(f.kind, f.layers, f.step) for f in report.findings] == \
        [(f.kind, f.layers, f.step) for f in eager.report().findings]
    assert report.findings and report.layers[0].name == "body.0"
    assert any("activations are not sampled" in n for n in report.notes)  # said, not silently skipped


PL_NAMESPACE = """
import pytorch_lightning as pl, torch, gradwatch
from torch import nn
from gradwatch.integrations.lightning import GradwatchCallback
class M(pl.LightningModule):
    def __init__(self):
        super().__init__(); self.net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 1))
    def training_step(self, batch, i):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)
x = torch.randn(64, 8)
cb = GradwatchCallback(reporters=[])
pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False, enable_checkpointing=False,
           enable_model_summary=False, accelerator="cpu").fit(M(), torch.utils.data.DataLoader(
               torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=16))
print("steps", cb.report().step, type(cb).__mro__[1].__module__)
"""


def test_lightning_callback_follows_the_pytorch_lightning_namespace_when_that_is_imported():
    import subprocess
    import sys

    pytest.importorskip("pytorch_lightning")
    out = subprocess.run([sys.executable, "-c", PL_NAMESPACE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps 4 pytorch_lightning." in out.stdout, out.stdout
