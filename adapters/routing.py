"""Per-task adapter routing: one adapter per task, a batch routed by task id.

Task-incremental learning with any registry adapter: :class:`TaskRoutedModel` keeps one adapter
per task (named ``task_<id>``) on a shared frozen base and runs ``forward(..., task_id=...)`` with
that task's adapter. ``task_id`` is one id for the whole batch or one id per sample (a 1-D integer
tensor or a list); a mixed batch is split by task, each part runs with its own adapter, and the
outputs are put back in the original order. When task heads differ in size, the last axis is
padded with ``-inf`` (``pad_value``) so that ``argmax`` and cross-entropy over a task's own classes
are unchanged.

Routing switches which adapter runs without touching ``requires_grad``: the trainable task is
the one chosen with :meth:`set_task` (only its tensors train), so training task t can never move
another task's tensors. A forward without ``task_id`` uses the task chosen by :meth:`set_task`, or
the only task; with several tasks and none chosen it is an error.

Task inference (when no task id is known at test time, e.g. ``task_inference=`` of a continual
run): :class:`PrototypeRouter` predicts each sample's task as the nearest task prototype (the
mean of the frozen base's features on that task's training data) by cosine similarity, and
:func:`confidence_route` picks the task whose own adapter is most confident. Both only return
task predictions; feeding them to ``forward(..., task_id=...)`` is the caller's step.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import CONFIG_FILE, AdaptedModel

PREFIX = "task_"
ROUTER_KEYS = ("task_ids", "sums", "counts")


class TaskRoutedModel(AdaptedModel):
    """An :class:`AdaptedModel` with one adapter per task and task-id routing in ``forward``.

    ``method`` and ``options`` are the defaults for :meth:`add_task`; a call may override options,
    and one naming another method starts from no default options.
    """

    def __init__(self, model: nn.Module, method: str | None = None, pad_value: float = float("-inf"), **options: Any):
        super().__init__(model)
        self.default_method = method
        self.default_options = options
        self.pad_value = pad_value
        self.task_ids: dict[str, Any] = {}
        self.current_task: Any = None

    # ---- tasks -----------------------------------------------------------------------------
    @staticmethod
    def adapter_name(task_id: Any) -> str:
        if isinstance(task_id, Tensor) and task_id.numel() == 1:
            task_id = int(task_id)
        if isinstance(task_id, bool) or not isinstance(task_id, (int, str)):
            raise TypeError(f"a task id is an int or a str, got {task_id!r}")
        return f"{PREFIX}{task_id}"

    @property
    def tasks(self) -> list[Any]:
        return list(self.task_ids.values())

    def add_task(self, task_id: Any, method: str | None = None, **options: Any) -> str:
        """Add an adapter for ``task_id`` (inactive unless it is the first); returns its name."""
        defaults = self.default_options if method in (None, self.default_method) else {}
        method = method or self.default_method
        if method is None:
            raise ValueError("add_task needs an adapter method (here or in TaskRoutedModel(model, method, ...))")
        name = self.adapter_name(task_id)
        self.add_adapter(name, method, **{**defaults, **options})
        self.task_ids[name] = task_id
        return name

    def set_task(self, task_id: Any) -> None:
        """Make ``task_id`` the task that trains and that a forward without ``task_id`` runs."""
        name = self._known(task_id)
        self.set_adapter(name)
        self.current_task = self.task_ids[name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        removed = self.task_ids.pop(adapter_name, None)
        if removed is not None and removed == self.current_task:
            self.current_task = None

    def _known(self, task_id: Any) -> str:
        name = self.adapter_name(task_id)
        if name not in self.task_ids:
            raise ValueError(f"task {task_id!r} was never added; tasks: {self.tasks}")
        return name

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, *args: Any, task_id: Any = None, **kwargs: Any) -> Any:
        if any(layer.merged for layer in self.adapted_layers()):
            raise RuntimeError("unmerge() before routing by task")
        ids = self._resolve(task_id)
        if isinstance(ids, str):
            with self._routed(ids):
                return self.base_model(*args, **kwargs)
        return self._mixed(ids, args, kwargs)

    def _resolve(self, task_id: Any) -> str | list[str]:
        """One adapter name, or one per sample."""
        if task_id is None:
            if self.current_task is not None:
                return self.adapter_name(self.current_task)
            if len(self.task_ids) == 1:
                return next(iter(self.task_ids))
            raise ValueError(
                f"this model holds {len(self.task_ids)} tasks {self.tasks}: pass task_id= (one id or one per sample) "
                "or choose one with set_task"
            )
        if isinstance(task_id, Tensor) and task_id.dim() == 0:
            task_id = int(task_id)
        if isinstance(task_id, (int, str)) and not isinstance(task_id, bool):
            return self._known(task_id)
        if isinstance(task_id, Tensor):
            if task_id.dim() != 1 or task_id.is_floating_point():
                raise ValueError(f"per-sample task ids must be a 1-D integer tensor, got shape {tuple(task_id.shape)} {task_id.dtype}")
            task_id = task_id.tolist()
        if not isinstance(task_id, (list, tuple)) or not task_id:
            raise TypeError(f"task_id must be an int/str or a non-empty sequence of them, got {task_id!r}")
        names = [self._known(t) for t in task_id]
        return names[0] if len(set(names)) == 1 else names

    @contextlib.contextmanager
    def _routed(self, name: str) -> Iterator[None]:
        """Run ``name``'s adapter (and its saved modules) without changing what trains."""
        layers, saved = list(self.adapted_layers()), list(self.saved_modules())
        before = ([layer.active for layer in layers], [m.active for m in saved])
        for layer in layers:
            layer.active = [name] if name in layer.adapters else []
        for module in saved:
            module.active = name
        try:
            yield
        finally:
            for layer, active in zip(layers, before[0]):
                layer.active = active
            for module, active in zip(saved, before[1]):
                module.active = active

    def _mixed(self, names: list[str], args: tuple, kwargs: dict) -> Tensor:
        batch = len(names)
        order, pieces = [], []
        for name in dict.fromkeys(names):  # tasks in order of first appearance
            index = torch.tensor([i for i, n in enumerate(names) if n == name])
            sub_args = tuple(_take(a, index, batch) for a in args)
            sub_kwargs = {k: _take(v, index, batch) for k, v in kwargs.items()}
            with self._routed(name):
                out = self.base_model(*sub_args, **sub_kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(f"a batch with mixed task ids needs a model returning a tensor, got {type(out).__name__}")
            order.append(index)
            pieces.append(out)
        width = max(p.shape[-1] for p in pieces)
        if any(p.shape[1:-1] != pieces[0].shape[1:-1] for p in pieces):
            raise ValueError(f"task outputs differ beyond the last axis: {[tuple(p.shape) for p in pieces]}")
        pieces = [F.pad(p, (0, width - p.shape[-1]), value=self.pad_value) for p in pieces]
        inverse = torch.argsort(torch.cat(order)).to(pieces[0].device)
        return torch.cat(pieces)[inverse]

    # ---- save / load ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False, **defaults: Any) -> "TaskRoutedModel":
        """Rebuild the tasks saved by ``save_pretrained`` (one sub-folder ``task_<id>`` per task)."""
        folders = sorted(p for p in Path(directory).iterdir() if p.name.startswith(PREFIX) and (p / CONFIG_FILE).is_file())
        if not folders:
            raise FileNotFoundError(f"no task adapters (sub-folders {PREFIX}<id>) in {str(directory)!r}")
        routed = cls(model, **defaults)
        for folder in folders:
            routed.load_adapter(folder, folder.name, is_trainable=is_trainable)
            suffix = folder.name[len(PREFIX):]
            routed.task_ids[folder.name] = int(suffix) if suffix.lstrip("-").isdigit() else suffix
        return routed


def _take(value: Any, index: Tensor, batch: int) -> Any:
    """The rows ``index`` of a batch-first tensor (or of each tensor in a dict); others as they are."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, dict):
        return {k: _take(v, index, batch) for k, v in value.items()}
    return value


# ---- task inference ------------------------------------------------------------------------------

class PrototypeRouter:
    """Nearest-prototype task inference: ``route(features)`` gives each row's most likely task.

    Why prototypes: the frozen base model's mean-pooled features of different tasks (different
    domains, topics and vocabularies) form separated clusters, and the nearest class mean is the
    standard prototype classifier for such clusters in continual learning (Rebuffi et al.,
    "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017, with tasks in place of
    classes). It needs nothing but the base's features: no adapter runs, nothing trains, and the
    earlier tasks' data is not kept. Cosine rather than Euclidean distance, because the norm of a
    mean-pooled feature varies with the text (length, frequent tokens) while its direction carries
    the topic, and sentence encoders such as MiniLM are trained for cosine similarity.

    ``update(task_id, features)`` adds a batch of one task's features to that task's running sum
    and count (float64, streamed; no sample is stored); the prototype is ``sum / count``.
    ``route`` compares L2-normalised rows with L2-normalised prototypes in float64; a tie (e.g. an
    all-zero row) goes to the task updated first. Task ids are ints (as :class:`TaskRoutedModel`'s
    numbered tasks); ``tasks`` lists them in the order they were first updated.
    """

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._sums: list[Tensor] = []
        self._counts: list[int] = []

    @property
    def tasks(self) -> list[int]:
        return list(self._ids)

    @property
    def width(self) -> int | None:
        """The feature width D fixed by the first update (None before it)."""
        return int(self._sums[0].shape[0]) if self._sums else None

    @property
    def prototypes(self) -> Tensor:
        """``(T, D)`` float64 task means, rows in the order of :attr:`tasks`."""
        if not self._ids:
            raise RuntimeError("PrototypeRouter has no task yet: call update(task_id, features) first")
        return torch.stack(self._sums) / torch.tensor(self._counts, dtype=torch.float64).unsqueeze(1)

    def update(self, task_id: int, features: Tensor) -> None:
        """Add ``features`` (``(N, D)``, N ≥ 1) of task ``task_id`` to its prototype."""
        if isinstance(task_id, Tensor) and task_id.numel() == 1 and not task_id.is_floating_point():
            task_id = int(task_id)
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TypeError(f"PrototypeRouter task ids are ints, got {task_id!r}")
        rows = self._checked(features, "update")
        if task_id not in self._ids:
            self._ids.append(task_id)
            self._sums.append(torch.zeros(rows.shape[1], dtype=torch.float64))
            self._counts.append(0)
        i = self._ids.index(task_id)
        self._sums[i] = self._sums[i] + rows.sum(dim=0)
        self._counts[i] += rows.shape[0]

    def route(self, features: Tensor) -> Tensor:
        """The task id of the nearest prototype (cosine similarity) of each row: ``(N,)`` int64."""
        if not self._ids:
            raise RuntimeError("PrototypeRouter.route() before any task: call update(task_id, features) first")
        rows = F.normalize(self._checked(features, "route"), dim=1)
        similarity = rows @ F.normalize(self.prototypes, dim=1).T
        ids = torch.tensor(self._ids, dtype=torch.long)
        return ids[similarity.argmax(dim=1)].to(features.device)

    def _checked(self, features: Tensor, where: str) -> Tensor:
        """``features`` as a float64 CPU matrix, after checking its shape, width and values."""
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] == 0:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"PrototypeRouter.{where}: features must be a (N, D) tensor with N >= 1, got {shape}")
        if self.width is not None and features.shape[1] != self.width:
            raise ValueError(f"PrototypeRouter.{where}: features have width {features.shape[1]}, the prototypes "
                             f"{self.width} (use the same feature extractor for every task)")
        rows = features.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows)).any(dim=1).nonzero()[0])
            raise ValueError(f"PrototypeRouter.{where}: features hold non-finite values (first in row {bad})")
        return rows

    def state_dict(self) -> dict[str, Tensor]:
        """``task_ids`` (T,) int64, ``sums`` (T, D) float64 and ``counts`` (T,) int64."""
        width = self.width or 0
        sums = torch.stack(self._sums) if self._sums else torch.zeros(0, width, dtype=torch.float64)
        return {"task_ids": torch.tensor(self._ids, dtype=torch.long), "sums": sums.clone(),
                "counts": torch.tensor(self._counts, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace this router's tasks with those of a :meth:`state_dict`."""
        if not isinstance(state, dict) or set(state) != set(ROUTER_KEYS):
            raise ValueError(f"PrototypeRouter state must have the keys {list(ROUTER_KEYS)}, "
                             f"got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        ids, sums, counts = (state[k] for k in ROUTER_KEYS)
        t = ids.shape[0] if ids.dim() == 1 else -1
        if sums.dim() != 2 or sums.shape[0] != t or counts.shape != (t,) or len(set(ids.tolist())) != t:
            raise ValueError(f"PrototypeRouter state is inconsistent: task_ids {tuple(ids.shape)}, sums "
                             f"{tuple(sums.shape)}, counts {tuple(counts.shape)} (one distinct id, row and count "
                             "per task)")
        if t and (bool((counts <= 0).any()) or not bool(torch.isfinite(sums).all())):
            raise ValueError("PrototypeRouter state has a task with no samples or non-finite sums")
        self._ids = [int(i) for i in ids]
        self._sums = [row.to("cpu", torch.float64).clone() for row in sums]
        self._counts = [int(c) for c in counts]


def confidence_route(logits_per_task: list[Tensor]) -> Tensor:
    """Per sample, the index of the task whose adapter is most confident: ``(N,)`` int64.

    ``logits_per_task[t]`` is ``(N, C_t)``: the logits of every sample under task t's adapter and
    head. Confidence is the maximum softmax probability over the task's own classes (computed in
    float64); ties go to the lowest task index. ``-inf`` entries (padding) are allowed, NaN, +inf
    and rows without a finite entry are not.
    """
    if not isinstance(logits_per_task, (list, tuple)) or not logits_per_task:
        raise ValueError("confidence_route: pass a non-empty list of (N, C_t) logit tensors, one per task")
    n = None
    confidence = []
    for t, logits in enumerate(logits_per_task):
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] == 0:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"confidence_route: task {t}'s logits must be (N, C) with C >= 1, got {shape}")
        n = logits.shape[0] if n is None else n
        if logits.shape[0] != n:
            raise ValueError(f"confidence_route: task {t} has {logits.shape[0]} rows, task 0 has {n}")
        values = logits.detach().double()
        bad = torch.isnan(values) | (values == math.inf)
        if bool(bad.any()) or not bool(torch.isfinite(values).any(dim=1).all()):
            raise ValueError(f"confidence_route: task {t}'s logits hold NaN or +inf, or a row with no finite value")
        confidence.append(values.softmax(dim=1).amax(dim=1))
    return torch.stack(confidence).argmax(dim=0).to(logits_per_task[0].device)
