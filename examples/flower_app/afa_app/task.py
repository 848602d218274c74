"""Model and data shared by the ServerApp and the ClientApp: digits, softmax regression."""
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def model_fn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(64, 10)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def data_fn(partition: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training split (first 1,400 digits) sorted by label and cut in contiguous blocks: non-IID."""
    x, y = _digits()
    order = np.argsort(y[:1400].numpy(), kind="stable")
    part = np.array_split(order, num_partitions)[partition]
    return x[part], y[part]


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    return x[1400:], y[1400:]
