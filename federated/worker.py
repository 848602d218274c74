"""The worker procedure shared by every algorithm (Anarchic Federated Learning,
Yang et al., ICML 2022, Algorithm 1, worker side).

A worker downloads ``(s, x_s)``, runs ``K`` plain SGD steps with step size ``η_L``
on minibatches of its own data and uploads the normalised update::

    G = (x_s − y_K) / (η_L · K)

(the model displacement per local step; equal to the mean of the K stochastic
gradients for plain SGD, and still defined for any other local optimiser).

`LocalTrainer` materialises workers one at a time on a single shared model: a
worker is only its data indices and a random seed, so a federation of 1,000
workers needs one model copy, not 1,000. Before every job the trainer restores
the trainable parameters to ``x_s`` and every buffer to its initial value, so a
job depends only on (x_s, data, seed) and never on the job that ran before.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from ._checks import positive_int
from .params import Params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class WorkerCrash(RuntimeError):
    """Raised inside a job to simulate a worker that dies mid-update."""


def dataset_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All inputs and labels of a map-style dataset of ``(x, y)`` pairs as two tensors."""
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            raise ValueError(f"expected a TensorDataset of (inputs, labels), got "
                             f"{len(dataset.tensors)} tensors")
        return dataset.tensors[0], dataset.tensors[1]
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError("the dataset must be map-style (define __len__ and __getitem__)") from exc
    if n == 0:
        raise ValueError("the dataset is empty")
    xs, ys = default_collate([dataset[i] for i in range(n)])
    return xs, torch.as_tensor(ys)


class LocalTrainer:
    """Runs jobs of any worker on one shared model instance."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                 batch_size: int = 32, loss_fn: LossFn = F.cross_entropy):
        positive_int("batch_size", batch_size)
        self.model = model
        self.inputs = inputs
        self.labels = labels
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # Buffers are not federated: every job starts from the model's initial buffers.
        self.initial_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self._buffers = dict(model.named_buffers())

    def load(self, params: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(params[name])
            for name, b in self._buffers.items():
                b.copy_(self.initial_buffers[name])

    def run(self, base: Mapping[str, torch.Tensor], indices: np.ndarray, steps: int,
            local_lr: float, seed: int, crash_after: int | None = None) -> tuple[Params, float]:
        """One job: K = ``steps`` SGD steps from ``base``; returns (G, mean training loss)."""
        if steps < 1:
            raise ValueError(f"local steps must be >= 1, got {steps}")
        if len(indices) == 0:
            raise ValueError("a worker without data cannot train; check the partition")
        rng = np.random.default_rng(seed)
        self.load(base)
        self.model.train()
        total = 0.0
        # Seed the CPU generator per job (dropout etc. reproducible whatever ran before) and
        # give the caller's RNG state back afterwards; torch.manual_seed would also touch CUDA.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            for k in range(steps):
                if crash_after is not None and k == crash_after:
                    raise WorkerCrash(f"worker crashed after {k} of {steps} local steps")
                total += self._sgd_step(indices, rng, local_lr)
        finally:
            generator.set_state(saved)
        scale = 1.0 / (local_lr * steps)
        with torch.no_grad():
            delta = {n: (base[n] - p.detach()) * scale for n, p in self.trainable}
        return delta, total / steps

    def _sgd_step(self, indices: np.ndarray, rng: np.random.Generator, lr: float) -> float:
        # a minibatch drawn without replacement from the worker's own samples
        batch = torch.from_numpy(indices[rng.permutation(len(indices))[:self.batch_size]])
        loss = self.loss_fn(self.model(self.inputs[batch]), self.labels[batch])
        params = [p for _, p in self.trainable]
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                 labels: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
        """(accuracy, mean loss) of the model with ``params`` on a labelled set."""
        self.load(params)
        self.model.eval()
        correct, loss = 0, 0.0
        for start in range(0, len(labels), batch_size):
            out = self.model(inputs[start:start + batch_size])
            y = labels[start:start + batch_size]
            loss += float(self.loss_fn(out, y)) * len(y)
            correct += int((out.argmax(dim=-1) == y).sum())
        return correct / len(labels), loss / len(labels)
