"""Classic case: a tanh RNN whose recurrent weights have spectral radius 3 (Pascanu, Mikolov & Bengio 2013).

Going back through 30 time steps the gradient is multiplied by the recurrent matrix each step: it grows by
orders of magnitude, one update throws the weights far away and the cell saturates. gradwatch reports the
explosion through time from the first step and recommends gradient clipping, with a max-norm taken from the
gradient norms it observed, and (as the radius is above 1) starting the recurrence orthogonal. Applying both,
the task is learned.

Run: python examples/rnn_gradient_clipping.py
"""

import re

import torch
from torch import nn

from _common import accuracy, conclude, first_fix, long_memory, train


class SeqClassifier(nn.Module):
    def __init__(self, hidden=32, radius=3.0):
        super().__init__()
        self.rnn = nn.RNN(4, hidden, batch_first=True)
        with torch.no_grad():  # an orthogonal matrix times `radius`: spectral radius = radius
            q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
            self.rnn.weight_hh_l0.copy_(q * radius)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


if __name__ == "__main__":
    data = long_memory(length=30)
    torch.manual_seed(0)
    model = SeqClassifier()
    before = train(model, data, steps=300, lr=0.05, loss="ce", title="tanh RNN, spectral radius 3")
    rec = first_fix(before.report, "gradient_clipping")
    max_norm = float(re.search(r"max_norm=([0-9.e+-]+)", rec.snippet).group(1))
    acc_before = accuracy(model, data)

    torch.manual_seed(0)
    model = SeqClassifier()
    for name in rec.layers:  # the snippet's second half: start the recurrence at spectral radius 1
        nn.init.orthogonal_(model.get_submodule(name).weight_hh_l0)
    after = train(model, data, steps=300, lr=0.05, loss="ce", clip=max_norm,
                  title=f"clip_grad_norm_(max_norm={max_norm:g}), orthogonal recurrence")
    acc_after = accuracy(model, data)
    print(f"accuracy: {acc_before:.0%} before, {acc_after:.0%} after")
    conclude(before, after, gone="exploding", better=acc_after > acc_before + 0.2)
