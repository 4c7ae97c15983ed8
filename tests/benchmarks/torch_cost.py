"""What gradwatch costs a PyTorch training loop, against no monitoring, the one-norm floor and the peers.

Per model, one identical copy per variant (same seed and weights, its own optimizer), all in one process, taking
turns step by step (the order rotating) so that the machine's slow spells hit every variant alike:

- ``plain``: no monitoring;
- ``floor``: one ``torch._foreach_norm`` over all gradients per step, kept on the device (an optimizer pre-hook);
  the least any every-step gradient monitor can cost;
- ``gradwatch``: ``gradwatch.attach(model, opt, reporters=[])`` at its defaults (every=1: every step's
  gradients, the update ratio every 10th, activations every 25th, a flush every 25th);
- ``wandb.watch``: ``run.watch(model, log="gradients", log_freq=1)`` and ``log_freq=100`` (offline run);
- ``Lightning grad_norm``: ``lightning.pytorch.utilities.grad_norm(model, norm_type=2)`` every step, as a
  LightningModule's ``on_before_optimizer_step`` would call it (its tensors not synced).

The figure per variant is the amortised mean: the mean step time over the whole ``PERIOD`` (two periods of
gradwatch's schedules, one of ``log_freq=100``), after the first step; the heaviest single step is beside it.
Over rounds: the median ratio to ``plain`` of the same round, with its min and max. The first step after attach
(the layer table, the structure read) is reported apart, as the attach cost.

Scale rows: the attach cost and the step overhead of a 1,000-layer model, and the resident memory of a long run
(RSS after 2,000 and after 20,000 steps with gradwatch at its defaults).

Run: python tests/benchmarks/overhead.py --torch [--rounds 5]
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

PERIOD = 100  # steps: whole periods of update_every x activation_every x flush_every (50) and of log_freq=100

VARIANTS = ("plain", "floor", "gradwatch", "wandb.watch freq=1", "wandb.watch freq=100", "Lightning grad_norm")


@dataclass
class Case:
    name: str
    model: object
    optimizer: object
    step: Callable[[], None]


def cases() -> dict[str, Callable[[], Case]]:
    import torch
    from torch import nn
    from torch.nn import functional as F

    from tests.fixtures.models import SeqClassifier, SmallResNet, TinyTransformer, mlp

    def trainer(name, model, opt, batch, loss):
        def step():
            opt.zero_grad(set_to_none=True)
            loss(model, batch).backward()
            opt.step()
        return Case(name, model, opt, step)

    def mlp20():
        torch.manual_seed(0)
        m = mlp(20, width=512, d_in=64, act=nn.Tanh, init="xavier")
        batch = (torch.randn(64, 64), torch.randn(64, 1))
        return trainer("MLP 20x512 tanh, SGD", m, torch.optim.SGD(m.parameters(), lr=1e-3), batch,
                       lambda m, b: F.mse_loss(m(b[0]), b[1]))

    def resnet():
        torch.manual_seed(0)
        m = SmallResNet(c=32, blocks=3)
        batch = (torch.randn(32, 3, 32, 32), torch.randint(0, 2, (32,)))
        return trainer("ResNet, 3 blocks, Adam", m, torch.optim.Adam(m.parameters(), lr=1e-4), batch,
                       lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    def transformer():
        torch.manual_seed(0)
        m = TinyTransformer(vocab=1000, d=128, layers=4)
        batch = (torch.randint(0, 1000, (32, 64)), torch.randint(0, 2, (32,)))
        return trainer("Transformer encoder, 4 layers, AdamW", m, torch.optim.AdamW(m.parameters(), lr=1e-4),
                       batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    def lstm():
        torch.manual_seed(0)
        m = SeqClassifier("lstm", hidden=128, d_in=32)
        m.rnn = nn.LSTM(32, 128, num_layers=2, batch_first=True)
        batch = (torch.randn(32, 50, 32), torch.randint(0, 2, (32,)))
        return trainer("LSTM, 2 layers, Adam", m, torch.optim.Adam(m.parameters(), lr=1e-4), batch,
                       lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    def gpt2():
        import transformers

        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=128, n_layer=4, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        m = transformers.GPT2LMHeadModel(cfg)
        ids = torch.randint(0, 1000, (16, 64))
        return trainer("GPT-2 (transformers), 4x128, AdamW", m, torch.optim.AdamW(m.parameters(), lr=1e-4),
                       ids, lambda m, b: m(input_ids=b, labels=b).loss)

    return {"mlp": mlp20, "resnet": resnet, "transformer": transformer, "lstm": lstm, "gpt2": gpt2}


def _arm(variant: str, case: Case, run):
    """Start monitoring ``case`` as ``variant``; returns the function that stops it."""
    import torch

    model, opt = case.model, case.optimizer
    if variant == "plain":
        return lambda: None
    if variant == "floor":
        params = [p for p in model.parameters() if p.requires_grad]
        kept = []

        def pre(*_):
            kept.append(torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None], 2)))
            if len(kept) > 25:
                torch.stack(kept).cpu()
                kept.clear()

        h = opt.register_step_pre_hook(pre)
        return h.remove
    if variant == "gradwatch":
        import gradwatch

        return gradwatch.attach(model, opt, reporters=[]).detach
    if variant.startswith("wandb.watch"):
        run.watch(model, log="gradients", log_freq=int(variant.rsplit("=", 1)[1]))
        return lambda: run.unwatch(model)
    if variant == "Lightning grad_norm":
        from lightning.pytorch.utilities import grad_norm

        logged = []

        def norms(*_):
            logged.append(grad_norm(model, norm_type=2))
            if len(logged) > 25:
                logged.clear()

        h = opt.register_step_pre_hook(norms)
        return h.remove
    raise ValueError(variant)


def _copies(make: Callable[[], Case], variants: tuple[str, ...]) -> dict[str, Case]:
    """One identical case per variant (same seed, same weights): the variants then take turns step by step, so
    a slow spell of the machine hits them all alike."""
    return {v: make() for v in variants}


def _interleaved(cases_: dict[str, Case], run, rounds: int) -> dict[str, dict]:
    """Arm every variant, time its first step (attach cost), then ``rounds`` x ``PERIOD`` steps, one step of each
    variant in turn (the order rotating). Per variant: first-step time, per-round mean and heaviest step."""
    out: dict[str, dict] = {}
    stops = {}
    for case in cases_.values():
        for _ in range(3):
            case.step()  # warm the model and optimizer state before anything is attached
    for v, case in cases_.items():
        t = time.perf_counter()
        stops[v] = _arm(v, case, run)
        case.step()
        out[v] = {"first": time.perf_counter() - t, "means": [], "heaviest": []}
    names = list(cases_)
    for r in range(rounds):
        times: dict[str, list[float]] = {v: [] for v in names}
        for k in range(PERIOD):
            shift = (r * PERIOD + k) % len(names)
            for v in names[shift:] + names[:shift]:
                t = time.perf_counter()
                cases_[v].step()
                times[v].append(time.perf_counter() - t)
        for v in names:
            out[v]["means"].append(statistics.fmean(times[v]))
            out[v]["heaviest"].append(max(times[v]))
    for stop in stops.values():
        stop()
    return out


def bench(rounds: int, only: str = "") -> list[dict]:
    import torch
    import wandb

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run = wandb.init(mode="offline", dir=tempfile.mkdtemp(), project="gradwatch-bench")
    rows = []
    for key, make in cases().items():
        if only and only.lower() not in key:
            continue
        got = _interleaved(_copies(make, VARIANTS), run, rounds)
        plain = got["plain"]["means"]
        ratios = {v: [m / p - 1 for m, p in zip(got[v]["means"], plain)] for v in VARIANTS[1:]}
        rows.append({"model": make().name, "plain_ms": statistics.median(plain) * 1e3,
                     "overhead": {v: (statistics.median(x), min(x), max(x)) for v, x in ratios.items()},
                     "heaviest_ms": {v: statistics.median(got[v]["heaviest"]) * 1e3 for v in VARIANTS},
                     "attach_ms": (got["gradwatch"]["first"] - statistics.median(plain)) * 1e3})
        gc.collect()
    run.finish()
    return rows


def _deep(layers: int) -> Case:
    import torch
    from torch import nn

    torch.manual_seed(0)
    mods = []
    for _ in range(layers // 2):
        mods += [nn.Linear(64, 64), nn.LayerNorm(64)]
    model = nn.Sequential(*mods, nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(32, 64), torch.randn(32, 1)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return Case(f"{layers + 1}-layer MLP (Linear+LayerNorm), Adam", model, opt, step)


def deep_model(rounds: int, layers: int = 1000) -> dict:
    """A 1,000-layer model: ``attach()`` itself, ``attach()`` plus the first step's layer table and structure
    read, and the amortised step overhead."""
    import gradwatch

    got = _interleaved(_copies(lambda: _deep(layers), ("plain", "gradwatch")), None, rounds)
    plain = got["plain"]["means"]
    ratios = [m / p - 1 for m, p in zip(got["gradwatch"]["means"], plain)]
    case = _deep(layers)
    for _ in range(3):
        case.step()
    attach = []
    for _ in range(3):
        t = time.perf_counter()
        gw = gradwatch.attach(case.model, case.optimizer, reporters=[])
        attach.append(time.perf_counter() - t)
        gw.detach()
    return {"model": case.name, "attach_s": statistics.median(attach),
            "first_s": got["gradwatch"]["first"] - statistics.median(plain),
            "overhead": (statistics.median(ratios), min(ratios), max(ratios))}


def memory(steps: int = 20_000) -> dict:
    """RSS of a long watched run: after 2,000 steps and after ``steps`` (O(layers) state: it must stay flat)."""
    import torch
    from torch import nn

    import gradwatch

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 16), torch.randn(16, 1)
    gw = gradwatch.attach(model, opt, reporters=[])
    marks = {}
    for i in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        gw.log_loss(loss)
        if i in (2000, steps):
            gc.collect()
            marks[i] = rss_mb()
    gw.detach()
    return {"steps": steps, "rss_2k_mb": marks[2000], "rss_end_mb": marks[steps]}


def pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def table(rows: list[dict]) -> str:
    head = "| model | plain ms/step | " + " | ".join(VARIANTS[1:]) + " | gradwatch heaviest step | attach + 1st step |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = [f"{pct(m)} ({pct(lo)}..{pct(hi)})" for m, lo, hi in (r["overhead"][v] for v in VARIANTS[1:])]
        lines.append(f"| {r['model']} | {r['plain_ms']:.2f} | " + " | ".join(cells) +
                     f" | {r['heaviest_ms']['gradwatch']:.1f} ms (plain {r['heaviest_ms']['plain']:.1f}) | "
                     f"{r['attach_ms']:.0f} ms |")
    return "\n".join(lines)


def main(rounds: int, only: str = "", scale: bool = True) -> None:
    print(f"PyTorch, amortised mean over {PERIOD}-step periods; median ({'min..max'}) over {rounds} rounds, "
          "ratio to plain of the same round")
    print(table(bench(rounds, only)))
    if not scale:
        return
    deep = deep_model(rounds)
    first = deep["first_s"]
    mem = memory()
    m, lo, hi = deep["overhead"]
    print(f"\n| scale | figure |\n|---|---|\n| {deep['model']}: attach() | {deep['attach_s'] * 1e3:.0f} ms |\n"
          f"| {deep['model']}: attach() + first-step table build | {first * 1e3:.0f} ms |\n"
          f"| {deep['model']}: step overhead | {pct(m)} ({pct(lo)}..{pct(hi)}) |\n"
          f"| RSS, tiny MLP, after 2,000 / {mem['steps']:,} steps | {mem['rss_2k_mb']:.1f} / "
          f"{mem['rss_end_mb']:.1f} MB ({mem['rss_end_mb'] - mem['rss_2k_mb']:+.1f} MB) |")
