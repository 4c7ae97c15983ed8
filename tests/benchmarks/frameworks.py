"""Step-time overhead of each training-framework integration, against the same training without gradwatch.

Each case trains the same model three times per round: plain, plain again (the harness's own noise) and with
gradwatch, in an order that rotates from round to round, and times every optimizer step from the framework's own
step events after a warm-up. A run's figure is its median step time (the every-step path; the periodic steps
are in tests/benchmarks/torch_cost.py's amortised means); the table gives plain's median over rounds and each
variant's ratio to plain in the same round: median (min..max) over rounds. Beside them, the time spent inside
gradwatch's own hooks per step (:class:`_Inside`), as a share of plain's step: whole runs one after another differ
by more than gradwatch costs on a shared machine, and this figure does not depend on them.

Cases: HF Trainer (BERT, 4 layers, hidden 128, from a config) with ``GradwatchCallback``; Lightning (MLP) with its
``GradwatchCallback``; an accelerate loop with ``attach(model, accelerated_optimizer)``; ``torch.compile`` (the
transformer encoder) with ``attach``; DDP and FSDP2 on 2 gloo processes (MLP, 6x512).

Run: python tests/benchmarks/overhead.py --frameworks [--rounds 5]
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

WARMUP = 5


VARIANTS = ("plain", "plain, again", "gradwatch")


class _Inside:
    """Wall time spent inside gradwatch during training. Every hook and callback gradwatch installs is made by
    ``Adapter.guard``; timing the functions it returns (outermost calls only) times all of gradwatch's work, flushes
    included, in this process."""

    def __init__(self) -> None:
        self.total, self._depth, self._installed = 0.0, 0, False

    def install(self) -> None:
        if self._installed:
            return
        from gradwatch.adapters.base import Adapter

        original, meter = Adapter.guard, self

        def guard(adapter, fn, where):
            inner = original(adapter, fn, where)

            def timed(*args, **kwargs):
                if meter._depth:
                    return inner(*args, **kwargs)
                meter._depth += 1
                t0 = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    meter.total += time.perf_counter() - t0
                    meter._depth -= 1

            timed.__name__ = inner.__name__
            return timed

        Adapter.guard = guard
        self._installed = True


INSIDE = _Inside()


class _Steps:
    """One run's step times (``begin``/``end`` around each step) and the time spent inside gradwatch meanwhile."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.inside: list[tuple[float, float]] = []
        self._t = self._inside = 0.0

    def begin(self) -> None:
        self._t = time.perf_counter()
        self._inside = INSIDE.total

    def end(self) -> None:
        self.times.append(time.perf_counter() - self._t)
        self.inside.append((self._inside, INSIDE.total))

    def figures(self) -> tuple[float, float]:
        """The median step time after the warm-up, and the mean time inside gradwatch per step over those steps
        (from the first one's start to the last one's end: every step's hooks and the flushes between)."""
        kept = self.inside[WARMUP:]
        return statistics.median(self.times[WARMUP:]), (kept[-1][1] - kept[0][0]) / len(kept)


def _rounds(rounds: int, run) -> dict[str, list[float]]:
    """``run(variant)`` -> that run's :meth:`_Steps.figures`, for each variant in each round (the order rotating);
    ``"inside"`` holds gradwatch's time inside its hooks per step."""
    INSIDE.install()
    times: dict[str, list[float]] = {v: [] for v in (*VARIANTS, "inside")}
    for r in range(rounds):
        k = r % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:
            median, inside = run(variant)
            times[variant].append(median)
            if variant == "gradwatch":
                times["inside"].append(inside)
    return times


def hf_trainer(rounds: int, steps: int) -> dict[str, list[float]]:
    import torch
    import transformers
    from gradwatch.integrations.transformers import GradwatchCallback

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.steps = _Steps()

        def on_step_begin(self, *a, **k):
            self.steps.begin()

        def on_step_end(self, *a, **k):
            self.steps.end()

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16 * steps

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, 1000, (64,), generator=g)
            return {"input_ids": ids, "labels": ids[0] % 2}

    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=64, num_labels=2)

    def run(variant: str) -> tuple[float, float]:
        torch.manual_seed(0)
        timer = Timer()
        callbacks = [timer] + ([GradwatchCallback(reporters=[])] if variant == "gradwatch" else [])
        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, max_steps=steps, report_to=[],
            use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=25)
        transformers.Trainer(model=transformers.BertForSequenceClassification(cfg), args=args,
                             train_dataset=Data(), callbacks=callbacks).train()
        return timer.steps.figures()

    return _rounds(rounds, run)


def lightning(rounds: int, steps: int) -> dict[str, list[float]]:
    import lightning.pytorch as L
    import torch
    from gradwatch.integrations.lightning import GradwatchCallback
    from torch import nn

    class Timer(L.Callback):
        def __init__(self):
            self.steps = _Steps()

        def on_train_batch_start(self, *a):
            self.steps.begin()

        def on_train_batch_end(self, *a):
            self.steps.end()

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

    def run(variant: str) -> tuple[float, float]:
        torch.manual_seed(0)
        timer = Timer()
        callbacks = [timer] + ([GradwatchCallback(reporters=[])] if variant == "gradwatch" else [])
        L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, accelerator="cpu").fit(Module(), loader)
        return timer.steps.figures()

    return _rounds(rounds, run)


def _loop(rounds: int, steps: int, make, attach_to) -> dict[str, list[float]]:
    """A plain loop: ``make()`` -> (model, optimizer, step); ``attach_to(model, optimizer)`` -> watcher."""

    def run(variant: str) -> tuple[float, float]:
        model, opt, step = make()
        gw = attach_to(model, opt) if variant == "gradwatch" else None
        steps_ = _Steps()
        for _ in range(steps):
            steps_.begin()
            step()
            steps_.end()
        if gw is not None:
            gw.detach()
        return steps_.figures()

    return _rounds(rounds, run)


def accelerate_loop(rounds: int, steps: int) -> dict[str, list[float]]:
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


def compiled(rounds: int, steps: int) -> dict[str, list[float]]:
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


def distributed_case(mode: str, rounds: int, steps: int) -> dict[str, list[float]]:
    from tests.fixtures import distributed

    def run(variant: str) -> tuple[float, float]:
        options = {"reporters": []} if variant == "gradwatch" else None
        results = distributed.run(tempfile.mkdtemp(), mode, options=options, model_kind="wide", steps=steps)
        # gradwatch runs in the worker processes, where the hooks are not timed
        return statistics.median([statistics.median(r["step_times"][WARMUP:]) for r in results]), math.nan

    return _rounds(rounds, run)


def bench_frameworks(rounds: int, steps: int) -> list[tuple[str, dict[str, list[float]]]]:
    steps = max(steps, 30)
    return [("HF Trainer, BERT 4x128 (GradwatchCallback)", hf_trainer(rounds, steps)),
            ("Lightning, MLP 8x512 (GradwatchCallback)", lightning(rounds, steps)),
            ("accelerate loop, MLP 8x512 (attach)", accelerate_loop(rounds, steps)),
            ("torch.compile, transformer 4x128 (attach)", compiled(rounds, steps)),
            ("DDP, 2 gloo processes, MLP 6x512", distributed_case("ddp", rounds, steps)),
            ("FSDP2, 2 gloo processes, MLP 6x512", distributed_case("fsdp2", rounds, steps))]


def table(rows: list[tuple[str, dict[str, list[float]]]]) -> str:
    """Plain's median step time over rounds, each other variant's ratio to plain in the same round, and the time
    gradwatch's own hooks took per step, as a share of plain's step in the same round."""
    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):+.1f}% ({min(values):+.1f}..{max(values):+.1f})"

    lines = ["| case | plain (ms/step) | plain, again | gradwatch | inside gradwatch (ms/step; share of plain) |",
             "|---|---|---|---|---|"]
    for name, times in rows:
        plain = times["plain"]
        cells = [spread([(t / p - 1) * 100 for t, p in zip(times[v], plain)]) for v in VARIANTS[1:]]
        inside = times["inside"]
        if all(math.isfinite(x) for x in inside):
            share = [x / p * 100 for x, p in zip(inside, plain)]
            cells.append(f"{statistics.median(inside) * 1e3:.2f}; {statistics.median(share):.1f}% "
                         f"({min(share):.1f}..{max(share):.1f}%)")
        else:
            cells.append("not timed (worker processes)")
        lines.append(f"| {name} | {statistics.median(plain) * 1e3:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
