"""Classic case: a sound network (ReLU, He init) trained with a learning rate 100x too high.

The first updates overshoot, the weights and gradients grow step after step and turn inf/NaN within a few
steps. gradwatch reports where the non-finite values first appear and, seeing that the initialization is
within range, recommends a lower learning rate by a factor taken from the observed update ratios. With the
learning rate divided by that factor, the same network trains.

Run: python examples/huge_lr_lower_lr.py
"""


from torch import nn

from _common import cure, regression


def relu_mlp(depth=6, width=64, d_in=20):
    layers, d = [], d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


if __name__ == "__main__":
    lr = 3.0
    cure(relu_mlp, regression(), steps=100, lr=lr, expected="lower_learning_rate",
         title=f"6 ReLU layers, He init, lr={lr}")
