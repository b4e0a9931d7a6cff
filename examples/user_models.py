#!/usr/bin/env python
"""Two MNIST models written the way users write them, not the way this project's examples are: PyTorch's own
examples/mnist network (conv, max pool, dropout, ``log_softmax`` output, NLL loss, Adadelta) and a small
Transformer built from ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside: sequence-first attention,
size arithmetic under a dynamic batch). Each is trained on MNIST images 0..7,999 and saved with
``torch.export.save`` and a dynamic batch, as docs/cli.md asks a user to (docs/zoo.md, "Models written as users
write them", has what the CLI does with them).

  .venv/bin/python examples/user_models.py --mnist ../shared/data/mnist --out /tmp/user_models
"""
from __future__ import annotations

import argparse
import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PytorchExampleNet(nn.Module):
    """github.com/pytorch/examples, mnist/main.py's Net."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.fc1(torch.flatten(self.dropout1(x), 1)))
        return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)


class EncoderNet(nn.Module):
    """7×7 patches, a learnt position embedding, two pre-norm nn.TransformerEncoderLayers, mean over tokens."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 32, 7, 7)
        self.pos = nn.Parameter(torch.zeros(1, 16, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.enc(t).mean(1))


def mnist(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The t10k release files, normalised as mnist:DIR reads them (mean 0.1307, std 0.3081)."""
    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(os.path.join(folder, name)) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)
    x = read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255
    y = read("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return torch.from_numpy((x - 0.1307) / 0.3081), torch.from_numpy(y)


def train(model: nn.Module, opt, loss, x, y, epochs: int) -> nn.Module:
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", default="../shared/data/mnist")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    x, y = mnist(args.mnist)
    train_x, train_y, test_x, test_y = x[:8000], y[:8000], x[8000:], y[8000:]
    torch.manual_seed(0)
    a = PytorchExampleNet()
    b = EncoderNet()
    models = {"pytorch_example": train(a, torch.optim.Adadelta(a.parameters(), lr=1.0), F.nll_loss,
                                       train_x, train_y, 1),
              "encoder": train(b, torch.optim.AdamW(b.parameters(), 2e-3), F.cross_entropy, train_x, train_y, 15)}
    for name, m in models.items():
        with torch.no_grad():
            acc = float((m(test_x).argmax(1) == test_y).float().mean())
        ep = torch.export.export(m, (train_x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        torch.export.save(ep, os.path.join(args.out, f"{name}.pt2"))
        print(f"{name}: test accuracy (images 8000..9999) {100 * acc:.2f}% -> {args.out}/{name}.pt2")


if __name__ == "__main__":
    main()
