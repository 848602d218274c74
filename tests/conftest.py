"""Shared fixtures: small models of every shape the adapters must handle, and their inputs.

``MODELS`` maps a model kind to (factory, batch maker, output extractor). The contract suite runs
every registered adapter on every kind whose layers the adapter supports.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: LAPACK and BLAS with 2 threads on 2 shared cores run several times slower here.
torch.set_num_threads(1)


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


class CNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


@dataclass
class ModelKind:
    make: Callable[[], nn.Module]
    batches: Callable[[int], list[Any]]
    layer_types: tuple[type, ...]  # module types it contains besides the head


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = make()
        with torch.no_grad():  # non-trivial BatchNorm statistics and affines
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        return model.eval()

    return build


_MINILM: dict[str, nn.Module] = {}


def minilm() -> nn.Module:
    """One load of the real MiniLM per session; every test gets its own deep copy."""
    if "model" not in _MINILM:
        from lifelong.models import load_minilm

        _MINILM["model"], _MINILM["tokenizer"] = load_minilm()
    return copy.deepcopy(_MINILM["model"])


def minilm_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    minilm()
    tokenizer = _MINILM["tokenizer"]
    texts = [  # seed 0 and seed 1 see different sentences (calibration vs evaluation data)
        ["Continual learning keeps old skills while acquiring new ones.",
         "Adapters train a few parameters on top of a frozen model.",
         "The quick brown fox jumps over the lazy dog.",
         "Federated workers join whenever they like."],
        ["Return the absolute value of the argument.",
         "A river winds through the valley below the old mill.",
         "Merge the adapter into the base weights before export.",
         "Seven cats slept in the warm afternoon sun."],
    ][seed % 2]
    out = []
    for i in range(n):
        batch = tokenizer(texts[i % 4 :] + texts[: i % 4], padding=True, return_tensors="pt")
        out.append(dict(batch))
    return out


def llama() -> nn.Module:
    from lifelong.models import tiny_llama

    return tiny_llama(seed=0)


def _gen(shape: tuple[int, ...]) -> Callable[[int], list[torch.Tensor]]:
    def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*shape, generator=g) for _ in range(n)]

    return batches


def llama_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 7), generator=g)} for _ in range(n)]


MODELS: dict[str, ModelKind] = {
    "mlp": ModelKind(_seeded(MLP), _gen((4, 16)), (nn.Linear, nn.LayerNorm)),
    "cnn": ModelKind(_seeded(CNN), _gen((2, 3, 8, 8)), (nn.Conv2d, nn.BatchNorm2d)),
    "minilm": ModelKind(minilm, minilm_batches, (nn.Linear, nn.LayerNorm)),
    "llama": ModelKind(llama, llama_batches, (nn.Linear,)),
}


def run(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's main output tensor for a batch of any of the kinds above."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.fixture
def mlp() -> nn.Module:
    return MODELS["mlp"].make()


@pytest.fixture
def cnn() -> nn.Module:
    return MODELS["cnn"].make()
