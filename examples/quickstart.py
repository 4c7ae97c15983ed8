"""gradwatch quickstart: a deep sigmoid MLP (PyTorch default init) on synthetic data.

Its early layers receive gradients many orders of magnitude smaller than the output layer's (Glorot &
Bengio 2010): gradwatch reports the vanishing layers while training runs, and at the end a summary with
ranked fixes. Then the first fix (ReLU with He init) is applied and the same training is watched again.

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


if __name__ == "__main__":
    torch.manual_seed(0)
    print("== 1. A deep sigmoid MLP, PyTorch default init ==")
    report, loss = train(deep_mlp(nn.Sigmoid))
    print(f"final loss {loss:.3f}; healthy: {report.healthy}")
    first = report.recommendations[0] if report.recommendations else None
    if first is not None:
        print(f"\n== 2. Applying gradwatch's first recommendation: {first.fix} ==")
        torch.manual_seed(0)
        fixed, loss_fixed = train(deep_mlp(nn.ReLU, he=True), lr=0.01)
        print(f"final loss {loss_fixed:.3f} (was {loss:.3f}); healthy: {fixed.healthy}")
