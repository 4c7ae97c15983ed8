"""gradwatch quickstart: a deep sigmoid MLP (PyTorch default init) on synthetic data.

Its early layers receive gradients many orders of magnitude smaller than the output layer's (Glorot &
Bengio 2010): gradwatch reports the vanishing layers while training runs, and at the end a summary with
ranked fixes. Then ``gradwatch.trial`` tries the top fixes, each on a fresh copy of the model trained on the same
batches, and shows which one cures it.

Run: python examples/quickstart.py
"""


import torch
from torch import nn

import gradwatch


def make_data(n=2048, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    return x, y


def deep_mlp(act, depth=12, width=64, he=False):
    layers, d = [], 20
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if he:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def train(model, steps=300, lr=0.05):
    x, y = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with gradwatch.attach(model, opt) as gw:          # the one line gradwatch needs
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,))
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    # leaving the `with` block detached every hook and printed the summary
    return gw.report(), loss.item()


def batches(steps=300, seed=1):
    x, y = make_data()
    g = torch.Generator().manual_seed(seed)
    return [(x[i], y[i]) for i in (torch.randint(0, len(x), (128,), generator=g) for _ in range(steps))]


if __name__ == "__main__":
    torch.manual_seed(0)
    print("== 1. A deep sigmoid MLP, PyTorch default init ==")
    report, loss = train(deep_mlp(nn.Sigmoid))
    print(f"final loss {loss:.3f}; healthy: {report.healthy}")
    if report.recommendations:
        print("\n== 2. gradwatch.trial: the top fixes, each on a fresh model, the same batches ==")
        torch.manual_seed(0)
        result = gradwatch.trial(lambda: deep_mlp(nn.Sigmoid), batches(), nn.functional.mse_loss,
                                 lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9), steps=300)
        print(result)
        if result.best is None:
            raise SystemExit("no fix cured the model")
        print(f"\nbest fix: {result.best.fix} ({result.best.change}); healthy: {result.best.report.healthy}")
