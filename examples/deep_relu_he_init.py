"""Classic case: a 30-layer ReLU MLP initialised at the Xavier/Glorot scale stalls (He et al. 2015, fig. 3).

Xavier's ``sqrt(2/(fan_in+fan_out))`` suits tanh; ReLU zeroes half its inputs, so each layer halves the signal's
variance and, going back, the gradient's: after 30 layers the first layers barely receive any. gradwatch reports
the vanishing layers and recommends He init (``sqrt(2/fan_in)``) for them; applying it, the same network trains.

Run: python examples/deep_relu_he_init.py
"""

import math

from torch import nn

from _common import cure, regression


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
    cure(deep_relu_mlp, regression(), steps=300, lr=0.003, expected="he_init",
         title="30 ReLU layers, Xavier init")
