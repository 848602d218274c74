"""MIGU inside a plain Avalanche strategy: ``Naive`` plus ``MIGUPlugin`` on split digits.

    python examples/migu_avalanche.py [--tasks 5] [--epochs 3] [--smoke]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import DataLoader

from lifelong.continual import AccuracyMatrix, MIGUPlugin, split_digits
from lifelong.models import digits_model


@torch.no_grad()
def accuracy(model: torch.nn.Module, experience) -> float:
    correct = total = 0
    for x, y, *_ in DataLoader(experience.dataset, batch_size=256):
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2 tasks, 1 epoch, for tests")
    args = parser.parse_args()
    tasks, epochs = (2, 1) if args.smoke else (args.tasks, args.epochs)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    stream = split_digits(n_tasks=tasks, task_incremental=True)
    model = digits_model("mlp", seed=0)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=epochs,
                     eval_mb_size=256, plugins=[MIGUPlugin(mask_ratio=0.7)],
                     evaluator=EvaluationPlugin(loggers=[]))
    matrix = AccuracyMatrix(tasks)
    for i, experience in enumerate(stream.train_stream):
        strategy.train(experience)
        model.eval()
        for j, test in enumerate(stream.test_stream):
            matrix.record(i, j, accuracy(model, test))
        print(f"after task {i + 1}: " + " ".join(f"{accuracy(model, t):.2f}" for t in stream.test_stream))
    print({k: round(float(v), 3) for k, v in matrix.summary().items()})


if __name__ == "__main__":
    main()
