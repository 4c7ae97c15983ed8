"""Classic case: a 30-layer ReLU MLP initialised at the Xavier/Glorot scale stalls (He et al. 2015, fig. 3).

Xavier's ``sqrt(2/(fan_in+fan_out))`` suits tanh; ReLU zeroes half its inputs, so each layer halves the signal's
variance and, going back, the gradient's: after 30 layers the first layers barely receive any. gradwatch reports
the vanishing layers and recommends He init (``sqrt(2/fan_in)``) for them; applying it, the same network trains.

Run: python examples/deep_relu_he_init.py
"""

import math

import torch
from torch import nn

from _common import conclude, first_fix, regression, train


def deep_relu_mlp(depth=30, width=64, d_in=20):
    layers, d = [], d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        nn.init.normal_(lin.weight, std=math.sqrt(2.0 / (d + width)))  # Xavier/Glorot scale
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


if __name__ == "__main__":
    data = regression()
    torch.manual_seed(0)
    before = train(deep_relu_mlp(), data, steps=300, lr=0.003, title="30 ReLU layers, Xavier init")
    rec = first_fix(before.report, "he_init")

    torch.manual_seed(0)
    model = deep_relu_mlp()
    for name in rec.layers:  # what the snippet says, on the layers gradwatch named
        layer = model.get_submodule(name)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    after = train(model, data, steps=300, lr=0.003, title="the same network, He init on those layers")
    conclude(before, after, gone="vanishing")
