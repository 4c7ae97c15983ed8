"""gradwatch's cost on a CUDA device, in fp32, fp16 with ``GradScaler`` and bf16 autocast, with every step run
under ``torch.cuda.set_sync_debug_mode("error")`` wherever gradwatch runs (outside flush steps): a sync on the hot
path raises instead of being timed.

Per model and precision: plain, the one-norm floor and gradwatch at its defaults, one copy of the model each,
taking turns step by step (tests/benchmarks/torch_cost.py); the figure is the amortised mean over whole periods of
gradwatch's schedules, median (min..max) over rounds, as a ratio to plain.

Run on a GPU machine: python tests/benchmarks/gpu.py [--rounds 3]. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

VARIANTS = ("plain", "floor", "gradwatch")


def cases(precision: str):
    import torch
    import transformers
    from torch import nn
    from torch.nn import functional as F

    from tests.benchmarks import torch_cost
    from tests.fixtures.cuda import make_step
    from tests.fixtures.models import mlp

    dev = torch.device("cuda")

    def build(name, model, batch, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        holder = {}

        def is_flush():  # strict only where gradwatch runs and the step is neither its first nor a flush
            gw = holder.get("watcher")
            return gw is None or gw.adapter._step == 0 or gw.adapter._step % 25 == 24

        inner = make_step(model, opt, batch, loss_fn, precision, scaler, is_flush=is_flush)

        def step():
            inner()
            torch.cuda.synchronize()  # the benchmark's clock, outside every strict section
        case = torch_cost.Case(f"{name}, {precision}", model, opt, step)
        case.scaler, case.holder, case.is_flush = scaler, holder, is_flush
        return case

    def gpt2():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=8192, n_positions=256, n_embd=512, n_layer=8, n_head=8)
        ids = torch.randint(0, 8192, (16, 256), device=dev)
        return build("GPT-2 8x512", transformers.GPT2LMHeadModel(cfg).to(dev), ids,
                     lambda m, b: m(input_ids=b, labels=b).loss)

    def mlp20():
        torch.manual_seed(0)
        m = mlp(20, width=1024, d_in=256, act=nn.Tanh, init="xavier").to(dev)
        batch = (torch.randn(256, 256, device=dev), torch.randn(256, 1, device=dev))
        return build("MLP 20x1024", m, batch, lambda m, b: F.mse_loss(m(b[0]).float(), b[1]))

    return {"gpt2": gpt2, "mlp": mlp20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("No CUDA device: nothing to measure (run this on a GPU machine).")
        return 0
    import gradwatch
    from tests.benchmarks import torch_cost
    from tests.fixtures.cuda import MODES, strict_optimizer_hooks

    def arm(variant, case, run):
        if variant != "gradwatch":
            return plain_arm(variant, case, run)
        gw = gradwatch.attach(case.model, case.optimizer, scaler=case.scaler, reporters=[])
        case.holder["watcher"] = gw
        restore = strict_optimizer_hooks(case.optimizer, case.is_flush)

        def stop():
            restore()
            gw.detach()
        return stop

    plain_arm = torch_cost._arm
    torch_cost._arm = arm
    print(f"| model | {' | '.join(VARIANTS[1:])} | plain ms/step |\n|---|---|---|---|")
    for precision in MODES:
        for make in cases(precision).values():
            got = torch_cost._interleaved(torch_cost._copies(make, VARIANTS), None, args.rounds)
            plain = got["plain"]["means"]
            cells = []
            for v in VARIANTS[1:]:
                r = [m / p - 1 for m, p in zip(got[v]["means"], plain)]
                cells.append(f"{statistics.median(r) * 100:+.1f}% ({min(r) * 100:+.1f}..{max(r) * 100:+.1f})")
            name = make().name
            print(f"| {name} | {' | '.join(cells)} | {statistics.median(plain) * 1e3:.2f} |", flush=True)
    print("No host-device sync on a non-flush step (set_sync_debug_mode('error') raised none).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
