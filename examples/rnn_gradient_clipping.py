"""Classic case: a tanh RNN whose recurrent weights have spectral radius 3 (Pascanu, Mikolov & Bengio 2013).

Going back through 30 time steps the gradient is multiplied by the recurrent matrix each step: it grows by
orders of magnitude, one update throws the weights far away and the cell saturates. gradwatch reports the
explosion through time from the first step and recommends gradient clipping, with a max-norm taken from the
gradient norms it observed, and (as the radius is above 1) starting the recurrence orthogonal. Applying both,
the task is learned.

Run: python examples/rnn_gradient_clipping.py
"""


import torch
from torch import nn

from _common import cure, long_memory


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
    cure(SeqClassifier, long_memory(length=30), steps=300, lr=0.02, loss="ce", expected="gradient_clipping",
         title="tanh RNN, spectral radius 3")
