"""(c) Binary weights trained by BSO in a plain PyTorch loop (no spikes, no time steps).

    python examples/plain_pytorch_bso.py [--epochs 5]

A small ReLU network on the embedded digits; bso.convert gives its hidden layers +-1 weights (the
first conv and the classifier stay full precision) and bso.CaseOptimizer sends them to BSO
(paper Eq. 11-12: momentum M, flip where W * M > gamma) and the rest to Adam. The loop is the usual
zero_grad / backward / step. Measured test accuracy: 92.8% after 1 epoch (the run
tests/test_examples.py makes; it asserts >= 88%), 96.4% after 2, 97.8% after 5.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import bso
from bso.data.digits import digits_datasets


def relu_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 16, 128, bias=False),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = [(model(x).argmax(1) == y) for x, y in loader]
    return float(torch.cat(hits).float().mean())


def main(epochs: int = 5, seed: int = 0) -> float:
    torch.manual_seed(seed)
    train_set, test_set = digits_datasets()
    train = DataLoader(train_set, batch_size=32, shuffle=True)
    test = DataLoader(test_set, batch_size=256)

    model = bso.convert(relu_net())  # no neurons: only the +-1 weights change
    optimizer = bso.CaseOptimizer(
        model,
        binary=lambda p: bso.BSO(p, gamma=1e-6, beta=0.99),
        full_precision=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    for epoch in range(epochs):
        model.train()
        flips = 0
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            flips += int(optimizer.step().sum())  # flips per +-1 weight
        acc = accuracy(model, test)
        print(f"epoch {epoch}: test accuracy {acc:.3f}, {flips} sign flips")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    main(args.epochs)
