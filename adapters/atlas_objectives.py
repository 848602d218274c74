"""The aTLAS training objectives (Zhang et al., NeurIPS 2024, §4): task addition and task negation."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["addition_loss", "negation_loss"]


def addition_loss(outputs: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Task addition: the summed cross-entropy over the tasks' (logits, labels) batches."""
    losses = [F.cross_entropy(logits, labels) for logits, labels in outputs]
    if not losses:
        raise ValueError("addition_loss needs at least one (logits, labels) pair")
    return torch.stack(losses).sum()


def negation_loss(target_logits: Tensor, target_labels: Tensor, control_logits: Tensor, control_labels: Tensor) -> Tensor:
    """Task negation: ``−CE`` on the task to forget plus ``CE`` on the control task."""
    return -F.cross_entropy(target_logits, target_labels) + F.cross_entropy(control_logits, control_labels)
