"""Adapter modes as hooks: how the adapter on the model changes from one experience to the next.

The model being trained holds the user's network as ``backbone`` (a text classifier's encoder, or
:class:`Backbone` around a tensor model). Each mode is a hook object of the same protocol as the
methods (:mod:`.hooks`) and the engines call it first, so an adapter's own training-time rules run
on every engine: after every backward the adapted model's ``after_backward()`` and after every
step its ``after_optimizer_step(optimizer)`` (LaMDA's column freezing). An adapter whose config has
``total_steps`` (LaMDA) gets the run's real step count when the user did not set it.

* ``shared``: one adapter trained through the whole stream.
* ``per_task``: one adapter per experience (``TaskRoutedModel``); test experience j runs adapter j
  (the task id is an oracle outside task-incremental streams; see ``task_inference``).
* ``sequential``: before experience t the previous adapter is merged into the base and a new one
  is made: a calibrated registry adapter (KORE / CorDA, calibrated on experiences < t) or any
  factory ``callable(model, t) -> model`` (a PEFT ``get_peft_model`` call, for example).
* ``incremental``: IncLoRA: a new LoRA-shaped adapter per experience, the earlier ones frozen and
  all of them active (no task id at test time).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from ..adapters.model import AdaptedModel, wrap
from ..adapters.registry import get_method, lora_shaped_methods
from ..adapters.routing import TaskRoutedModel
from .hooks import Context, ContinualMethod

__all__ = ["AdapterMode", "Backbone", "MODES", "adapted_model", "experience_index", "experience_steps", "make_mode",
           "osf_factory", "subspace_overlap"]


class Backbone(nn.Module):
    """Holds a tensor model as ``backbone`` so that its adapter can be put on or replaced."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.backbone(x, **kwargs)


def adapted_model(holder: nn.Module):
    """The :class:`~lifelong.adapters.model.AdaptedModel` inside ``holder`` (its backbone), or None."""
    backbone = getattr(holder, "backbone", None)
    return backbone if isinstance(backbone, AdaptedModel) else None


def _takes_total_steps(adapter: Any) -> bool:
    return isinstance(adapter, str) and "total_steps" in {f.name for f in fields(get_method(adapter).config_cls)}


class AdapterMode(ContinualMethod):
    """No adapter: every parameter trains (the hooks do nothing)."""

    name = "none"
    keeps_optimizer = True  # the trainable tensors stay the same from one experience to the next

    def __init__(self, holder: nn.Module, adapter: Any = None, options: dict | None = None,
                 steps: list[int] | None = None, **calibration: Any):
        self.holder, self.adapter = holder, adapter
        self.options = dict(options or {})
        self.steps = list(steps or [])  # optimizer steps of each experience (estimated before the run)
        self.calibration = calibration  # sequential mode: calibration_samples, batch_size, seed, as_inputs

    def build(self) -> None:
        """Put the first adapter structure in place (called once, before training)."""

    def options_for(self, total_steps: int) -> dict:
        """The adapter options, with LaMDA's ``total_steps`` filled in when left unset."""
        if _takes_total_steps(self.adapter) and self.options.get("total_steps") is None:
            return {**self.options, "total_steps": max(int(total_steps), 1)}
        return dict(self.options)

    # ---- the adapted model's own schedule, on every engine -------------------------------------
    def after_backward(self, ctx: Context) -> None:
        adapted = adapted_model(self.holder)
        if adapted is not None:
            adapted.after_backward()

    def after_step(self, ctx: Context) -> None:
        adapted = adapted_model(self.holder)
        if adapted is not None:
            adapted.after_optimizer_step(ctx.optimizer)

    # ---- evaluation and checkpoints ----------------------------------------------------------------
    def predict(self, x: Any, j: int) -> torch.Tensor | None:
        return self.holder(x)

    def metrics(self) -> dict:
        """Measurements of the adapters at the end of the run (``result.metrics``)."""
        return {}

    def structure(self) -> dict:
        """What must be rebuilt before a checkpoint's tensors can be loaded (plain values)."""
        return {}

    def rebuild(self, structure: dict, experiences: list) -> None:
        """Rebuild the structure a checkpoint was written with."""


class Shared(AdapterMode):
    name = "shared"

    def build(self) -> None:
        self.holder.backbone = wrap(self.holder.backbone, self.adapter,
                                             **self.options_for(sum(self.steps)))


class PerTask(AdapterMode):
    """One adapter per experience, routed by the experience index (or predicted, see task_inference)."""

    name = "per_task"
    keeps_optimizer = False
    inference = None  # a TaskInference when task_inference= is set (build_inference)

    def build(self) -> None:
        self.holder.backbone = TaskRoutedModel(self.holder.backbone, self.adapter)

    @property
    def router(self):
        return self.holder.backbone

    @property
    def task_router(self):
        """The task inference (``task_inference=...``), or None (the task id routes)."""
        return self.inference

    def build_inference(self, kind: str | None, classes: dict[int, list[int]], batch_size: int) -> None:
        if kind is not None:
            from .task_inference import TaskInference

            self.inference = TaskInference(self.holder, kind, classes)
            self.inference_batch = batch_size

    def before_experience(self, ctx: Context) -> None:
        i = ctx.experience
        if i not in self.router.tasks:
            self.router.add_task(i, **self.options_for(self.steps[i] if i < len(self.steps) else 1))
        self.router.set_task(i)
        if self.task_router is not None:
            self.task_router.reset_counts()

    def after_experience(self, ctx: Context) -> None:
        if self.task_router is not None:
            self.task_router.learn(ctx.experience, ctx.experiences[ctx.experience].dataset, self.inference_batch,
                                   ctx.device)

    def predict(self, x: Any, j: int) -> torch.Tensor | None:
        if self.task_router is not None:
            return self.task_router.route_and_run(x, true_task=j) if self.router.tasks else None
        return self.holder(x, task_id=j) if j in self.router.tasks else None

    def metrics(self) -> dict:
        if self.task_router is None:
            return {}
        return {"task_inference_accuracy": self.task_router.accuracy()}

    def memory(self) -> dict:
        """Every task's adapter is kept for inference."""
        return {"stored_adapter_floats": _adapter_floats(self.router)}

    def state_dict(self) -> dict:
        return {"router": self.task_router.router.state_dict()} if self.task_router is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.task_router is not None and state:
            self.task_router.router.load_state_dict(state["router"])

    def structure(self) -> dict:
        return {"tasks": [int(t) for t in self.router.tasks]}

    def rebuild(self, structure: dict, experiences: list) -> None:
        for task in structure["tasks"]:
            if task not in self.router.tasks:
                self.router.add_task(task, **self.options_for(self.steps[task] if task < len(self.steps) else 1))
        if structure["tasks"]:
            self.router.set_task(structure["tasks"][-1])


class Sequential(AdapterMode):
    """Merge the previous adapter, then a new one per experience (calibrated, or from a factory)."""

    name = "sequential"
    keeps_optimizer = False
    CALIBRATED = ("kore", "corda")

    def build(self) -> None:
        if not callable(self.adapter) and self.adapter not in self.CALIBRATED:
            raise ValueError(f"adapter_mode='sequential' needs a calibrated adapter ({', '.join(self.CALIBRATED)}) "
                             f"or a factory callable(model, experience) -> model, got {self.adapter!r}")
        self.first_calibration = self.options.pop("calibration", None)
        self.prepared = -1

    def before_experience(self, ctx: Context) -> None:
        if ctx.experience != self.prepared:
            self._next(ctx.experience, ctx.experiences)
            self.holder.to(ctx.device)

    def _next(self, index: int, experiences: list) -> None:
        backbone = _unload(self.holder.backbone)
        if callable(self.adapter):
            made = self.adapter(backbone, index)
            if not isinstance(made, nn.Module) or not any(p.requires_grad for p in made.parameters()):
                raise ValueError(f"the adapter factory returned {type(made).__name__} with no trainable parameter "
                                 f"for experience {index}; it must return the adapted model (e.g. get_peft_model(...))")
            self.holder.backbone = made
        else:
            if index == 0 and self.first_calibration is not None:
                calibration = self.first_calibration
            else:
                calibration = list(self._batches(experiences[:index] if index > 0 else experiences[:1]))
            self.holder.backbone = wrap(backbone, self.adapter, calibration=calibration, **self.options)
        self.prepared = index

    def _batches(self, experiences: list) -> Iterator[Any]:
        device = next(self.holder.parameters()).device
        samples, batch_size, seed = (self.calibration["calibration_samples"], self.calibration["batch_size"],
                                     self.calibration["seed"])
        as_inputs = self.calibration.get("as_inputs") or (lambda x: x)
        for j, exp in enumerate(experiences):
            data = exp.dataset
            g = torch.Generator().manual_seed(seed * 1_000_003 + j)
            picks = torch.randperm(len(data), generator=g)[:samples]
            for start in range(0, len(picks), batch_size):
                x = torch.stack([data[int(i)][0] for i in picks[start:start + batch_size]]).to(device)
                yield as_inputs(x)

    def structure(self) -> dict:
        return {"prepared": self.prepared}

    def rebuild(self, structure: dict, experiences: list) -> None:
        if structure["prepared"] >= 0:
            self._next(int(structure["prepared"]), experiences)


def _unload(backbone: nn.Module) -> nn.Module:
    """The plain model under an adapter, with the adapter merged in (ours, or a PEFT model's)."""
    if isinstance(backbone, AdaptedModel) or hasattr(backbone, "merge_and_unload"):
        return backbone.merge_and_unload()
    return backbone


class Incremental(AdapterMode):
    """IncLoRA: adapter ``exp_t`` added at experience t; earlier ones frozen; all active."""

    name = "incremental"
    keeps_optimizer = False

    def build(self) -> None:
        if self.adapter not in lora_shaped_methods():
            raise ValueError(f"adapter_mode='incremental' needs a LoRA-shaped adapter ({', '.join(lora_shaped_methods())}),"
                             f" got {self.adapter!r}")
        if "calibration" in self.options:
            raise ValueError("adapter_mode='incremental' adds a fresh adapter per experience; it takes no calibration")
        self.holder.backbone = AdaptedModel(self.holder.backbone)

    @property
    def names(self) -> list[str]:
        return [n for n in self.holder.backbone.peft_config if n.startswith("exp_")]

    def before_experience(self, ctx: Context) -> None:
        name = f"exp_{ctx.experience}"
        if name not in self.names:
            steps = self.steps[ctx.experience] if ctx.experience < len(self.steps) else 1
            self.holder.backbone.add_adapter(name, self.adapter, **self.options_for(steps))
        self.activate(name)

    def activate(self, trainable: str) -> None:
        """All adapters active, only ``trainable`` trains (the earlier ones stay bit-identical)."""
        adapted = self.holder.backbone
        order = sorted(self.names, key=experience_index)
        adapted.set_adapter(order)
        for layer in adapted.adapted_layers():
            for name, adapter in layer.adapters.items():
                adapter.set_trainable(name == trainable)

    def metrics(self) -> dict:
        names = sorted(self.names, key=experience_index)
        return {"subspace_overlap": subspace_overlap(self.holder, names[-1])} if names else {}

    def memory(self) -> dict:
        """Every experience's adapter stays (frozen and active)."""
        return {"stored_adapter_floats": _adapter_floats(self.holder.backbone)}

    def structure(self) -> dict:
        return {"adapters": self.names}

    def rebuild(self, structure: dict, experiences: list) -> None:
        for name in structure["adapters"]:
            i = experience_index(name)
            if name not in self.names:
                self.holder.backbone.add_adapter(name, self.adapter,
                                                 **self.options_for(self.steps[i] if i < len(self.steps) else 1))
        if structure["adapters"]:
            self.activate(structure["adapters"][-1])


def _adapter_floats(adapted) -> int:
    """Numbers held by all the adapters of an adapted model (what a per-task or incremental run keeps)."""
    return sum(p.numel() for layer in adapted.adapted_layers() for a in layer.adapters.values() for p in a.parameters())


def experience_index(name: str) -> int:
    """``exp_<t>`` → t (the incremental adapters' names)."""
    return int(name.split("_")[1])


@torch.no_grad()
def subspace_overlap(model: nn.Module, current: str) -> float:
    """Mean over adapted layers of ``Σ_{i<t} ‖A_i A_tᵀ‖²_F / (‖A_i‖²_F ‖A_t‖²_F)`` for the incremental
    adapters ``exp_i`` and ``current`` = ``exp_t`` (0: orthogonal subspaces; NaN for the first adapter)."""
    values = []
    for module in model.modules():
        adapters = getattr(module, "adapters", None)
        if not isinstance(adapters, nn.ModuleDict) or current not in adapters:
            continue
        a_t = adapters[current].lora_A.double()
        earlier = [adapters[n].lora_A.double() for n in adapters
                   if n.startswith("exp_") and experience_index(n) < experience_index(current)]
        if earlier:
            values.append(sum(float((a @ a_t.T).square().sum() / (a.square().sum() * a_t.square().sum()))
                              for a in earlier))
    return sum(values) / len(values) if values else math.nan


MODES: dict[str | None, type[AdapterMode]] = {None: AdapterMode, "shared": Shared, "per_task": PerTask,
                                               "sequential": Sequential, "incremental": Incremental}


def make_mode(mode: str | None, holder: nn.Module, adapter: Any, options: dict, steps: list[int],
              **settings: Any) -> AdapterMode:
    hook = MODES[mode](holder, adapter, options, steps, **settings)
    hook.build()
    return hook


def osf_factory(target_modules, num_tasks: int, first: float = 0.3, last: float = 0.7):
    """A sequential-mode factory for PEFT's OSF (orthogonal subspace fine-tuning): experience t gets
    ``get_peft_model(model, OSFConfig(target_modules, effective_rank=r_t))`` with the preserved
    fraction ``r_t`` rising linearly from ``first`` to ``last`` over the tasks, the schedule of PEFT's
    continual-learning example (0.3, 0.5, 0.7 for three tasks); between experiences the engine folds
    the update into the base (``merge_and_unload``)."""
    if not (0 < first <= last <= 1):
        raise ValueError(f"osf_factory: need 0 < first <= last <= 1, got first={first}, last={last}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"osf_factory: num_tasks must be a positive integer, got {num_tasks!r}")

    def factory(model: nn.Module, experience: int) -> nn.Module:
        from peft import OSFConfig, get_peft_model

        step = (last - first) / (num_tasks - 1) if num_tasks > 1 else 0.0
        rank = first + step * min(experience, num_tasks - 1)
        return get_peft_model(model, OSFConfig(target_modules=target_modules, effective_rank=rank))

    factory.__qualname__ = f"osf_factory({num_tasks} tasks, {first}-{last})"
    return factory


def experience_steps(sizes: list[int], epochs: int, batch_size: int) -> list[int]:
    """Optimizer steps of each experience: ``epochs · ⌈n / batch_size⌉``."""
    return [epochs * math.ceil(n / batch_size) for n in sizes]
