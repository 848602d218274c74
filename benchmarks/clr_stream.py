"""Task-incremental split digits with a small CNN: CLR vs fine-tuning vs a frozen backbone.

CLR (Ge et al., ICCV 2023, arXiv 2307.11386) claims zero forgetting by construction at a small
per-task parameter cost. Stream: scikit-learn's 8×8 digits, 70/30 stratified split, 5 tasks of 2
classes ({0,1}, {2,3}, ...), task id given at test time. Anchor: a 3-conv CNN with BatchNorm,
briefly trained on task 0 (no download). Methods, each with one 2-way head per task:

- CLR: per task, 3×3 depthwise reprogramming after every conv + task BatchNorm + head
  (:class:`lifelong.adapters.clr.CLRModel`), anchor frozen; also CLR with shared frozen BN;
- fine-tune: the whole backbone trains on each task (shared), heads per task;
- frozen backbone: only the task heads train (linear probe on the anchor).

Reported: final average accuracy over the 5 tasks, average forgetting (max earlier accuracy minus
final, over tasks 0..3), BWT, and parameters added per task; mean over --seeds.

    python benchmarks/clr_stream.py [--epochs 15] [--seeds 0 1 2] [--out results/]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from lifelong.adapters.clr import CLRModel, clr_parameter_count

TASKS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return torch.relu(self.bn3(self.conv3(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MultiHead(nn.Module):
    """Shared backbone features and one head per task (fine-tune / frozen-backbone baselines)."""

    def __init__(self, anchor: Backbone, train_backbone: bool):
        super().__init__()
        self.backbone = copy.deepcopy(anchor)
        self.backbone.requires_grad_(train_backbone)
        self.train_backbone = train_backbone
        self.heads = nn.ModuleDict()

    def add_task(self, t: int) -> list[nn.Parameter]:
        self.heads[str(t)] = nn.Linear(32, 2)
        return list(self.heads[str(t)].parameters()) + (list(self.backbone.parameters()) if self.train_backbone else [])

    def forward(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        return self.heads[str(task_id)](self.backbone.features(x))

    def train(self, mode: bool = True) -> "MultiHead":
        super().train(mode)
        self.backbone.train(mode and self.train_backbone)  # a frozen backbone keeps its BN statistics
        return self


def split(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=digits.target, random_state=seed)
    out = []
    for classes in TASKS:
        parts = []
        for idx in (tr, te):
            mask = (y[idx] == classes[0]) | (y[idx] == classes[1])
            parts.append((x[idx][mask], (y[idx][mask] == classes[1]).long()))
        out.append(parts)
    return out


def fit(forward, params, x, y, epochs: int, lr: float, seed: int, extra=None) -> None:
    optimiser = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            optimiser.zero_grad()
            loss = F.cross_entropy(forward(x[idx]), y[idx])
            (loss + extra() if extra else loss).backward()
            optimiser.step()


@torch.no_grad()
def accuracy(forward, x, y) -> float:
    return float((forward(x).argmax(-1) == y).float().mean())


def run_clr(anchor, stream, epochs, seed, train_bn):
    model = CLRModel(copy.deepcopy(anchor), train_bn=train_bn)
    matrix = []
    for t, ((x, y), _) in enumerate(stream):
        model.add_task(t, num_classes=2)
        model.set_task(t)
        model.train()
        fit(lambda b: model(b, task_id=t), list(model.trainable_parameters()), x, y, epochs, 1e-2, seed,
            extra=model.regularization)
        model.eval()
        matrix.append([accuracy(lambda b, j=j: model(b, task_id=j), *stream[j][1]) if j <= t else float("nan")
                       for j in range(len(stream))])
    counts = clr_parameter_count(model, "task_0")
    return matrix, counts["clr"] + counts["head"] + (counts["bn_affine"] + counts["bn_stats"] if train_bn else 0)


def run_multihead(anchor, stream, epochs, seed, train_backbone):
    model = MultiHead(anchor, train_backbone)
    matrix = []
    for t, ((x, y), _) in enumerate(stream):
        params = model.add_task(t)
        model.train()
        fit(lambda b: model(b, t), params, x, y, epochs, 1e-3 if train_backbone else 1e-2, seed)
        model.eval()
        matrix.append([accuracy(lambda b, j=j: model(b, j), *stream[j][1]) if j <= t else float("nan")
                       for j in range(len(stream))])
    return matrix, 32 * 2 + 2


def metrics(matrix: list[list[float]]) -> tuple[float, float, float]:
    n = len(matrix)
    final = matrix[-1]
    forgetting = [max(matrix[i][j] for i in range(j, n - 1)) - final[j] for j in range(n - 1)]
    bwt = [final[j] - matrix[j][j] for j in range(n - 1)]
    return statistics.mean(final), statistics.mean(forgetting), statistics.mean(bwt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    methods = {
        "CLR (kernels + task BN + head)": lambda a, s, e, seed: run_clr(a, s, e, seed, train_bn=True),
        "CLR (kernels + head, shared BN)": lambda a, s, e, seed: run_clr(a, s, e, seed, train_bn=False),
        "fine-tune whole network (+ heads)": lambda a, s, e, seed: run_multihead(a, s, e, seed, True),
        "frozen backbone, heads only": lambda a, s, e, seed: run_multihead(a, s, e, seed, False),
    }
    scores = {m: [] for m in methods}
    added = {}
    for seed in tqdm(args.seeds, desc="seeds"):
        torch.manual_seed(seed)
        stream = split(seed)
        anchor = Backbone()
        anchor.train()
        fit(anchor, anchor.parameters(), *stream[0][0], epochs=5, lr=1e-2, seed=seed)  # brief pre-training on task 0
        anchor.eval()
        for name, run in methods.items():
            torch.manual_seed(seed)
            matrix, added[name] = run(anchor, stream, args.epochs, seed)
            scores[name].append(metrics(matrix))
            if name.startswith("CLR"):
                for j in range(len(matrix) - 1):  # zero forgetting must hold bit for bit
                    assert all(matrix[i][j] == matrix[j][j] for i in range(j, len(matrix))), (name, matrix)
    backbone = sum(p.numel() for n, p in Backbone().named_parameters() if not n.startswith("head"))
    lines = ["| method | final avg acc (%) | forgetting (pp) | BWT (pp) | params added / task |",
             "|---|---:|---:|---:|---:|"]
    for name, values in scores.items():
        acc, fgt, bwt = (statistics.mean(100 * v[i] for v in values) for i in range(3))
        std = statistics.pstdev(100 * v[0] for v in values)
        lines.append(f"| {name} | {acc:.2f} ± {std:.2f} | {fgt:.2f} | {bwt:.2f} | {added[name]:,d} "
                     f"({100 * added[name] / backbone:.1f}% of {backbone:,d}) |")
    table = "\n".join(lines)
    note = (f"5 tasks × 2 classes, {args.epochs} epochs per task, seeds {args.seeds}. CLR counts include BN "
            "affine + running statistics when BN is task-specific; fine-tuning adds only a head per task but "
            "overwrites the shared backbone.")
    print(table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clr_stream.md").write_text("# CLR on task-incremental split digits\n\n" + table + "\n\n" + note + "\n")


if __name__ == "__main__":
    main()
