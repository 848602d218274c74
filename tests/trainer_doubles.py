"""A tiny model and dataset in the shape the Hugging Face Trainer expects (dict items, a loss in the
output), for the tests of continual hooks inside a user's own Trainer."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """8 → 12 → 3 MLP returning ``{"loss", "logits"}`` as a transformers model does."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class DictData(torch.utils.data.Dataset):
    """``n`` seeded samples ``{"x": (8,), "labels": int in 0..2}``."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}
