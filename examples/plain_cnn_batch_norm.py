"""Classic case: a deep plain CNN (10 sigmoid convolutions, no normalization, no skip connections).

Each sigmoid passes back at most a quarter of the gradient, so the first convolutions learn nothing
(Glorot & Bengio 2010); batch normalization keeps every layer's input in the sigmoid's responsive range
(Ioffe & Szegedy 2015). gradwatch reports the vanishing convolutions and ranks its fixes (ReLU first,
batch norm and skip connections next); this example applies the batch-norm recommendation to the layers it
names, and the same network trains.

Run: python examples/plain_cnn_batch_norm.py
"""

import torch
from torch import nn

from _common import conclude, images, pick_fix, train


class PlainCNN(nn.Module):
    def __init__(self, depth=10, channels=8, batch_norm=()):
        super().__init__()
        convs = [nn.Conv2d(3, channels, 3, padding=1)] + [nn.Conv2d(channels, channels, 3, padding=1)
                                                          for _ in range(depth - 1)]
        self.convs = nn.ModuleList(convs)
        # BatchNorm2d after the convolutions named in `batch_norm` (what gradwatch's snippet does).
        self.norms = nn.ModuleDict({str(i): nn.BatchNorm2d(channels) for i in range(depth)
                                    if f"convs.{i}" in batch_norm})
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if str(i) in self.norms:
                x = self.norms[str(i)](x)
            x = torch.sigmoid(x)
        return self.fc(x.mean(dim=(2, 3)))


if __name__ == "__main__":
    data = images()
    torch.manual_seed(0)
    before = train(PlainCNN(), data, steps=150, lr=0.05, loss="ce", batch=32, title="10 plain sigmoid convolutions")
    rec = pick_fix(before.report, "batch_norm")

    torch.manual_seed(0)
    after = train(PlainCNN(batch_norm=rec.layers), data, steps=150, lr=0.05, loss="ce", batch=32,
                  title="the same network with BatchNorm2d after the named convolutions")
    conclude(before, after, gone="vanishing")
