"""Step-time overhead of each training-framework integration, against the same training without gradwatch.

Each case trains the same model twice per round, with and without gradwatch (rounds interleaved), and times every
optimizer step from the framework's own step events after a warm-up; the table gives the median step time of
each and the ratio. Cases: HF Trainer (BERT, 4 layers, hidden 128, from a config) with ``GradwatchCallback``;
Lightning (MLP) with its ``GradwatchCallback``; an accelerate loop with ``attach(model, accelerated_optimizer)``;
``torch.compile`` (the transformer encoder) with ``attach``; DDP and FSDP2 on 2 gloo processes (MLP, 6x512).

Run: python tests/benchmarks/overhead.py --frameworks [--rounds 3]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

WARMUP = 5


def _median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[WARMUP:])


def hf_trainer(rounds: int, steps: int) -> dict[str, float]:
    import torch
    import transformers
    from gradwatch.integrations.transformers import GradwatchCallback

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.t, self.times = None, []

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16 * steps

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, 1000, (64,), generator=g)
            return {"input_ids": ids, "labels": ids[0] % 2}

    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=64, num_labels=2)
    times: dict[str, list[float]] = {"plain": [], "gradwatch": []}
    for _ in range(rounds):
        for variant in times:
            torch.manual_seed(0)
            timer = Timer()
            callbacks = [timer] + ([GradwatchCallback(reporters=[])] if variant == "gradwatch" else [])
            args = transformers.TrainingArguments(
                output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, max_steps=steps, report_to=[],
                use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=25)
            transformers.Trainer(model=transformers.BertForSequenceClassification(cfg), args=args,
                                 train_dataset=Data(), callbacks=callbacks).train()
            times[variant].append(_median_after_warmup(timer.times))
    return {k: statistics.median(v) for k, v in times.items()}


def lightning(rounds: int, steps: int) -> dict[str, float]:
    import lightning.pytorch as L
    import torch
    from gradwatch.integrations.lightning import GradwatchCallback
    from torch import nn

    class Timer(L.Callback):
        def __init__(self):
            self.t, self.times = None, []

        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            self.times.append(time.perf_counter() - self.t)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(512, 512), nn.ReLU())],
                                     nn.Linear(512, 1))

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    x = torch.randn(64 * steps, 512)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=64)
    times: dict[str, list[float]] = {"plain": [], "gradwatch": []}
    for _ in range(rounds):
        for variant in times:
            torch.manual_seed(0)
            timer = Timer()
            callbacks = [timer] + ([GradwatchCallback(reporters=[])] if variant == "gradwatch" else [])
            L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, accelerator="cpu").fit(Module(), loader)
            times[variant].append(_median_after_warmup(timer.times))
    return {k: statistics.median(v) for k, v in times.items()}


def _loop(rounds: int, steps: int, make, attach_to) -> dict[str, float]:
    """A plain loop: ``make()`` -> (model, optimizer, step); ``attach_to(model, optimizer)`` -> watcher."""
    times: dict[str, list[float]] = {"plain": [], "gradwatch": []}
    for _ in range(rounds):
        for variant in times:
            model, opt, step = make()
            gw = attach_to(model, opt) if variant == "gradwatch" else None
            ts = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
            if gw is not None:
                gw.detach()
            times[variant].append(_median_after_warmup(ts))
    return {k: statistics.median(v) for k, v in times.items()}


def accelerate_loop(rounds: int, steps: int) -> dict[str, float]:
    import accelerate
    import torch
    from torch import nn

    import gradwatch

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(512, 512), nn.ReLU())], nn.Linear(512, 1))
        acc = accelerate.Accelerator(cpu=True)
        model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        x = torch.randn(64, 512)

        def step():
            opt.zero_grad()
            acc.backward(nn.functional.mse_loss(model(x), x[:, :1]))
            opt.step()
        return model, opt, step

    return _loop(rounds, steps, make, lambda m, o: gradwatch.attach(m, o, reporters=[]))


def compiled(rounds: int, steps: int) -> dict[str, float]:
    import torch
    from torch.nn import functional as F

    import gradwatch
    from tests.fixtures.models import TinyTransformer

    def make():
        torch.manual_seed(0)
        model = TinyTransformer(vocab=1000, d=128, layers=4)
        net = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = torch.randint(0, 1000, (32, 64)), torch.randint(0, 2, (32,))

        def step():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        make.net = net
        return model, opt, step

    return _loop(rounds, steps, make, lambda m, o: gradwatch.attach(make.net, o, reporters=[]))


def distributed_case(mode: str, rounds: int, steps: int) -> dict[str, float]:
    from tests.fixtures import distributed

    times: dict[str, list[float]] = {"plain": [], "gradwatch": []}
    for _ in range(rounds):
        for variant in times:
            options = {"reporters": []} if variant == "gradwatch" else None
            results = distributed.run(tempfile.mkdtemp(), mode, options=options, model_kind="wide", steps=steps)
            times[variant].append(statistics.median(
                [statistics.median(r["step_times"][WARMUP:]) for r in results]))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_frameworks(rounds: int, steps: int) -> list[tuple[str, dict[str, float]]]:
    steps = max(steps, 30)
    return [("HF Trainer, BERT 4x128 (GradwatchCallback)", hf_trainer(rounds, steps)),
            ("Lightning, MLP 8x512 (GradwatchCallback)", lightning(rounds, steps)),
            ("accelerate loop, MLP 8x512 (attach)", accelerate_loop(rounds, steps)),
            ("torch.compile, transformer 4x128 (attach)", compiled(rounds, steps)),
            ("DDP, 2 gloo processes, MLP 6x512", distributed_case("ddp", rounds, steps)),
            ("FSDP2, 2 gloo processes, MLP 6x512", distributed_case("fsdp2", rounds, steps))]
