"""Continual-learning metrics computed from the accuracy matrix.

``R[i, j]`` is the test accuracy on task j after training tasks 0..i (fractions in [0, 1]);
``b[j]`` is the accuracy on task j before any training. With T tasks (1-based maths):

* ACC  = (1/T) Σ_j R[T, j]                                  (Lopez-Paz & Ranzato, GEM, NeurIPS 2017)
* BWT  = (1/(T-1)) Σ_{j<T} (R[T, j] - R[j, j])              (same paper)
* FWT  = (1/(T-1)) Σ_{j≥2} (R[j-1, j] - b[j])               (same paper)
* f_j^k = max_{l ∈ j..k-1} R[l, j] - R[k, j];  F_k = mean_{j<k} f_j^k
  (Chaudhry et al., Riemannian Walk, ECCV 2018; the max starts at l = j so a pre-training
  accuracy never counts as "learned")
* A_k = mean_{j≤k} R[k, j]; average incremental accuracy = mean_k A_k (Rebuffi et al., iCaRL 2017);
  learning accuracy = mean_j R[j, j] (Riemer et al. 2019).

Averages over tasks are unweighted (macro over tasks). Undefined quantities (T = 1, missing
cells) are NaN, never 0. Per-task accuracy itself is torchmetrics' micro accuracy, never
Avalanche's pooled stream accuracy.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..checks import positive_int

__all__ = [
    "AccuracyMatrix",
    "accuracy",
    "average_accuracy",
    "average_accuracy_after",
    "average_forgetting",
    "forgetting_after",
    "backward_transfer",
    "forward_transfer",
    "average_incremental_accuracy",
    "learning_accuracy",
    "lower_triangle_accuracy",
    "avalanche_forgetting",
    "summarize",
]


def accuracy(logits_or_preds: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> float:
    """Micro accuracy (fraction correct) with torchmetrics; accepts logits ``(N, C)`` or labels ``(N,)``."""
    from torchmetrics.functional.classification import multiclass_accuracy

    if target.numel() == 0:
        raise ValueError("accuracy: empty target tensor (an experience's test set has no samples)")
    preds = logits_or_preds.argmax(dim=-1) if logits_or_preds.dim() == 2 else logits_or_preds
    if num_classes is None:
        num_classes = int(max(preds.max().item(), target.max().item())) + 1
        if logits_or_preds.dim() == 2:
            num_classes = max(num_classes, logits_or_preds.shape[-1])
    # average="micro" is the CL convention; torchmetrics' MulticlassAccuracy defaults to "macro".
    return float(multiclass_accuracy(preds.cpu(), target.cpu(), num_classes=num_classes, average="micro"))


class AccuracyMatrix:
    """T×T accuracy matrix plus the length-T vector of accuracies before training (NaN = unmeasured)."""

    def __init__(self, n_tasks: int):
        positive_int("AccuracyMatrix: n_tasks", n_tasks)
        self.n_tasks = n_tasks
        self._r = np.full((n_tasks, n_tasks), np.nan)
        self._b = np.full(n_tasks, np.nan)

    def _check(self, value: float, *indices: int) -> float:
        for idx in indices:
            if not 0 <= idx < self.n_tasks:
                raise IndexError(f"AccuracyMatrix: task index {idx} outside 0..{self.n_tasks - 1}")
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"AccuracyMatrix: accuracy must be a fraction in [0, 1], got {value}")
        return value

    def record(self, i: int, j: int, acc: float) -> None:
        """Accuracy on task ``j`` after training task ``i`` (0-based)."""
        self._r[i, j] = self._check(acc, i, j)

    def record_initial(self, j: int, acc: float) -> None:
        """Accuracy on task ``j`` before any training."""
        self._b[j] = self._check(acc, j)

    def as_array(self) -> np.ndarray:
        return self._r.copy()

    def initial(self) -> np.ndarray:
        return self._b.copy()

    @classmethod
    def from_array(cls, r, b=None) -> "AccuracyMatrix":
        r = np.asarray(r, dtype=float)
        if r.ndim != 2 or r.shape[0] != r.shape[1]:
            raise ValueError(f"AccuracyMatrix.from_array: need a square matrix, got shape {r.shape}")
        m = cls(r.shape[0])
        m._r = r.copy()
        if b is not None:
            b = np.asarray(b, dtype=float)
            if b.shape != (r.shape[0],):
                raise ValueError(f"AccuracyMatrix.from_array: b must have shape ({r.shape[0]},), got {b.shape}")
            m._b = b.copy()
        return m

    def summary(self) -> dict[str, float]:
        return summarize(self._r, self._b)


def _square(r) -> np.ndarray:
    r = np.asarray(r.as_array() if isinstance(r, AccuracyMatrix) else r, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"expected a non-empty square accuracy matrix, got shape {r.shape}")
    return r


def _mean(values) -> float:
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.isnan(values).any():
        return math.nan
    return float(values.mean())


def average_accuracy_after(r, k: int) -> float:
    """A_k (k 1-based): mean accuracy over tasks 1..k after training task k."""
    r = _square(r)
    return _mean(r[k - 1, :k])


def average_accuracy(r) -> float:
    """ACC = A_T."""
    r = _square(r)
    return average_accuracy_after(r, r.shape[0])


def forgetting_after(r, k: int) -> float:
    """Chaudhry's F_k (k 1-based): mean over j < k of max_{l ∈ j..k-1} R[l, j] - R[k, j]."""
    r = _square(r)
    if k < 2:
        return math.nan
    return _mean([r[j : k - 1, j].max() - r[k - 1, j] for j in range(k - 1)])


def average_forgetting(r) -> float:
    """F = F_T (Chaudhry, max-based)."""
    r = _square(r)
    return forgetting_after(r, r.shape[0])


def backward_transfer(r) -> float:
    r = _square(r)
    t = r.shape[0]
    if t < 2:
        return math.nan
    return _mean([r[t - 1, j] - r[j, j] for j in range(t - 1)])


def forward_transfer(r, b) -> float:
    r = _square(r)
    t = r.shape[0]
    if b is None or t < 2:
        return math.nan
    b = np.asarray(b, dtype=float)
    if b.shape != (t,):
        raise ValueError(f"forward_transfer: b must have shape ({t},), got {b.shape}")
    return _mean([r[j - 1, j] - b[j] for j in range(1, t)])


def average_incremental_accuracy(r) -> float:
    r = _square(r)
    return _mean([average_accuracy_after(r, k) for k in range(1, r.shape[0] + 1)])


def learning_accuracy(r) -> float:
    r = _square(r)
    return _mean(np.diag(r))


def lower_triangle_accuracy(r) -> float:
    """Díaz-Rodríguez et al. 2018: mean of R[i, j] over i ≥ j."""
    r = _square(r)
    return _mean(r[np.tril_indices(r.shape[0])])


def avalanche_forgetting(r) -> float:
    """Avalanche's StreamForgetting after the last task: mean_{j<T} (R[j, j] - R[T, j]) = -BWT."""
    bwt = backward_transfer(r)
    return -bwt if not math.isnan(bwt) else math.nan


def summarize(r, b=None) -> dict[str, float]:
    """Every scalar metric of one run (NaN where undefined)."""
    r = _square(r)
    return {
        "acc": average_accuracy(r),
        "forgetting": average_forgetting(r),
        "bwt": backward_transfer(r),
        "fwt": forward_transfer(r, b),
        "average_incremental_accuracy": average_incremental_accuracy(r),
        "learning_accuracy": learning_accuracy(r),
        "lower_triangle_accuracy": lower_triangle_accuracy(r),
        "avalanche_forgetting": avalanche_forgetting(r),
    }
