"""Task-agnostic inference for per-task adapters: route each sample to the adapter of its task by content.

With one adapter per experience, the task id picks the adapter — an oracle that class- and
domain-incremental evaluation does not have. ``run_stream(..., adapter_mode="per_task",
task_inference=...)`` predicts each test sample's task instead:

* ``"prototype"`` (default choice): the frozen base model's features (a text classifier's
  mean-pooled last hidden state, with every adapter disabled) of each experience's training inputs
  are averaged into one prototype per task (streamed sums, no sample kept); a test sample goes to
  the task of the nearest prototype by cosine similarity — the nearest-class-mean rule of iCaRL
  (Rebuffi et al., CVPR 2017) applied to tasks. It costs one frozen forward per sample and does not
  depend on how well each adapter learned; tasks drawn from different sources (news vs reviews)
  form separate clusters in a pretrained encoder's feature space.
* ``"confidence"``: every trained adapter scores the sample over its own task's classes and the most
  confident one (largest softmax probability) wins; it needs one forward per task and adapters that
  are calibrated, which fine-tuned classifiers often are not (they are confidently wrong on other
  tasks' inputs).

The fraction of test samples routed to their own experience in the final evaluation is reported as
``result.metrics["task_inference_accuracy"]``; ``result.model.predict(texts)`` routes the same way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from lifelong.adapters.routing import PrototypeRouter, confidence_route

__all__ = ["TaskInference"]


class TaskInference:
    """Routes samples between the per-task adapters of ``holder.backbone`` (a ``TaskRoutedModel``).

    Args:
        holder: the classifier holding the routed model as ``backbone``.
        kind: ``"prototype"`` or ``"confidence"``.
        classes: experience → its classes (the confidence rule scores each adapter on them).
    """

    def __init__(self, holder: nn.Module, kind: str, classes: dict[int, list[int]] | None = None):
        self.holder, self.kind, self.classes = holder, kind, dict(classes or {})
        self.router = PrototypeRouter()
        self.correct = self.total = 0

    @classmethod
    def for_model(cls, holder: nn.Module, router: PrototypeRouter) -> "TaskInference":
        out = cls(holder, "prototype")
        out.router = router
        return out

    @property
    def routed(self):
        return self.holder.backbone

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base model's features of ``x`` (every adapter disabled)."""
        with self.routed.disable_adapter():
            if hasattr(self.holder, "features"):
                return self.holder.features(x).float()
            return self.routed(x).flatten(1).float()

    @torch.no_grad()
    def learn(self, experience: int, dataset, batch_size: int, device: torch.device) -> None:
        """Add experience ``experience``'s training inputs to its prototype."""
        if self.kind != "prototype":
            return
        was_training = self.holder.training
        self.holder.eval()
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            self.router.update(experience, self.features(batch[0].to(device)))
        self.holder.train(was_training)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted task of each sample (a LongTensor of task ids)."""
        if self.kind == "prototype":
            return self.router.route(self.features(x))
        tasks = [t for t in self.routed.tasks if t in self.classes]
        scores = [self.holder(x, task_id=t)[:, self.classes[t]] for t in tasks]
        return torch.tensor(tasks, device=x.device)[confidence_route(scores).to(x.device)]

    @torch.no_grad()
    def route_and_run(self, x: torch.Tensor, true_task: int | None = None) -> torch.Tensor:
        """Logits of ``x``, each sample run with the adapter of its predicted task; with ``true_task``
        the routing is counted for ``task_inference_accuracy``."""
        tasks = self.route(x).to(x.device)
        if true_task is not None:
            self.correct += int((tasks == true_task).sum())
            self.total += len(tasks)
        out = None
        for task in tasks.unique().tolist():  # each group of samples runs with its task's adapter
            rows = (tasks == task).nonzero().squeeze(1)
            logits = self.holder(x[rows], task_id=int(task))
            if out is None:
                out = logits.new_full((len(x), *logits.shape[1:]), float("-inf"))
            out[rows] = logits
        return out

    def reset_counts(self) -> None:
        self.correct = self.total = 0

    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")
