"""Classic case: a deep plain CNN (10 sigmoid convolutions, no normalization, no skip connections).

Each sigmoid passes back at most a quarter of the gradient, so the first convolutions learn nothing
(Glorot & Bengio 2010); batch normalization keeps every layer's input in the sigmoid's responsive range
(Ioffe & Szegedy 2015). gradwatch reports the vanishing convolutions and ranks its fixes (ReLU first,
batch norm and skip connections next). ``gradwatch.trial`` tries each: the ReLU cannot be applied mechanically
(the sigmoid is ``torch.sigmoid`` in ``forward``), and it says so; BatchNorm2d after the named convolutions
cures the network.

Run: python examples/plain_cnn_batch_norm.py
"""

import torch
from torch import nn

from _common import cure, images


class PlainCNN(nn.Module):
    def __init__(self, depth=10, channels=8):
        super().__init__()
        convs = [nn.Conv2d(3, channels, 3, padding=1)] + [nn.Conv2d(channels, channels, 3, padding=1)
                                                          for _ in range(depth - 1)]
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        for conv in self.convs:
            x = torch.sigmoid(conv(x))  # a function call: gradwatch.trial cannot swap it for a ReLU
        return self.fc(x.mean(dim=(2, 3)))


if __name__ == "__main__":
    cure(PlainCNN, images(), steps=150, lr=0.05, loss="ce", batch=32, expected="batch_norm",
         title="10 plain sigmoid convolutions")
