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

Inputs are one tensor (features, or the packed ``(N, 2, L)`` token ids and masks of
`lifelong.continual.TextStream.to_benchmark`) or a dict of tensors (Hugging Face tokenized
batches: ``input_ids``, ``attention_mask``, ...), which the model receives as keywords. The model's
output is a logits tensor or a ``ModelOutput`` with ``.logits``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from ..checks import positive_int
from .params import Params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Inputs = Union[torch.Tensor, dict[str, torch.Tensor]]
_LABEL_KEYS = ("labels", "label")
_MASK = "attention_mask"


def num_samples(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def take(inputs: Inputs, index: torch.Tensor | slice) -> Inputs:
    """Rows ``index`` of a tensor or of every tensor of a dict; dict batches with an attention mask
    are cut to their longest sequence (padding only costs time)."""
    if not isinstance(inputs, Mapping):
        return inputs[index]
    out = {k: v[index] for k, v in inputs.items()}
    mask = out.get(_MASK)
    if mask is not None and mask.dim() == 2 and len(mask):
        width = max(int(mask.sum(1).max()), 1)
        full = mask.shape[1]
        out = {k: v[:, :width] if v.dim() >= 2 and v.shape[1] == full else v for k, v in out.items()}
    return out


def logits_of(output: Any) -> torch.Tensor:
    """The class scores of a model output: a tensor, or a ``ModelOutput``'s ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned {type(output).__name__} without logits; federated training needs "
                    "class scores of shape (batch, classes): give the model a classification head "
                    "(e.g. lifelong.continual.text_model.TextClassifier around a bare encoder)")


def forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return logits_of(out)


def _pad_stack(values: list[Any], key: str) -> torch.Tensor:
    tensors = [torch.as_tensor(v) for v in values]
    if len({tuple(t.shape) for t in tensors}) == 1:
        return torch.stack(tensors)
    if any(t.dim() != 1 for t in tensors):
        raise ValueError(f"dict samples: {key!r} has shapes that differ beyond the sequence length")
    out = torch.zeros(len(tensors), max(len(t) for t in tensors), dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, :len(t)] = t
    return out


def _dict_samples(items: list[Mapping]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tokenized dict samples (one dict per sample, with a ``label``/``labels`` entry), right-padded."""
    key = next((k for k in _LABEL_KEYS if k in items[0]), None)
    if key is None:
        raise ValueError(f"dict samples need a 'label' or 'labels' entry, got keys {sorted(items[0])}")
    names = [k for k in items[0] if k not in _LABEL_KEYS]
    for i, item in enumerate(items):
        if set(item) != set(items[0]):
            raise ValueError(f"sample {i} has keys {sorted(item)}, sample 0 has {sorted(items[0])}")
    inputs = {k: _pad_stack([it[k] for it in items], k) for k in names}
    if _MASK not in inputs and "input_ids" in inputs:
        inputs[_MASK] = _pad_stack([torch.ones(len(torch.as_tensor(it["input_ids"])), dtype=torch.long)
                                    for it in items], _MASK)
    return inputs, torch.as_tensor([int(it[key]) for it in items])


class WorkerCrash(RuntimeError):
    """Raised inside a job to simulate a worker that dies mid-update."""


def dataset_tensors(dataset: Dataset) -> tuple[Inputs, torch.Tensor]:
    """All inputs and labels of a map-style dataset as ``(inputs, labels)``.

    Samples are ``(x, y)`` pairs (``x`` a tensor or a dict of tensors) or tokenized dicts with a
    ``label``/``labels`` entry (a Hugging Face ``datasets.Dataset`` after ``set_format("torch")``);
    variable-length token sequences are right-padded with 0 and get an attention mask.
    """
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
    items = [dataset[i] for i in range(n)]
    if isinstance(items[0], Mapping):
        return _dict_samples(items)
    xs, ys = default_collate(items)
    return xs, torch.as_tensor(ys)


class LocalTrainer:
    """Runs jobs of any worker on one shared model instance."""

    def __init__(self, model: nn.Module, inputs: Inputs, labels: torch.Tensor, *,
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
        loss = self.loss_fn(forward(self.model, take(self.inputs, batch)), self.labels[batch])
        params = [p for _, p in self.trainable]
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, torch.Tensor], inputs: Inputs,
                 labels: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
        """(accuracy, mean loss) of the model with ``params`` on a labelled set."""
        correct, loss = self.predict(params, inputs, labels, batch_size)
        return float(correct.float().mean()), loss

    @torch.no_grad()
    def predict(self, params: Mapping[str, torch.Tensor], inputs: Inputs, labels: torch.Tensor,
                batch_size: int = 1024) -> tuple[torch.Tensor, float]:
        """(per-sample correctness, mean loss) of the model with ``params`` on a labelled set."""
        self.load(params)
        self.model.eval()
        hits, loss = [], 0.0
        for start in range(0, len(labels), batch_size):
            out = forward(self.model, take(inputs, slice(start, start + batch_size)))
            y = labels[start:start + batch_size]
            loss += float(self.loss_fn(out, y)) * len(y)
            hits.append(out.argmax(dim=-1) == y)
        return torch.cat(hits), loss / len(labels)
