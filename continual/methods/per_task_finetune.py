"""Per-task fine-tuning: one model per experience, each trained from the initial weights — the reference
for what each task can reach alone.

Each experience starts from the weights the run started with (the pretrained model, or the
adapter's initial state), trains, and keeps its trained tensors; evaluation on experience j uses
experience j's tensors (so nothing is forgotten, and nothing transfers). What the run keeps is
one copy of the trainable tensors per experience (``memory()``); ``result.model`` predicts task j
with task j's tensors and saves them all.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..hooks import Context, ContinualMethod
from ..registry import register_method

__all__ = ["PerTaskFinetune"]


@register_method("per_task_finetune", engines=("native", "trainer"), adapter_modes=("none", "shared"), combines=False)
class PerTaskFinetune(ContinualMethod):
    """One set of trained tensors per experience (see the module docstring)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.initial: dict[str, torch.Tensor] = {}
        self.tasks: dict[int, dict[str, torch.Tensor]] = {}

    def before_experience(self, ctx: Context) -> None:
        trainable = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        if not self.initial:
            self.initial = {n: p.detach().clone() for n, p in trainable.items()}
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(self.initial[n])
        if ctx.optimizer is not None:  # a fresh start: no moments carried over from the previous task
            ctx.optimizer.state.clear()

    def after_experience(self, ctx: Context) -> None:
        self.tasks[ctx.experience] = {n: p.detach().clone() for n, p in ctx.model.named_parameters()
                                      if p.requires_grad}

    @contextmanager
    def evaluating(self, model: nn.Module, experience: int) -> Iterator[None]:
        if experience not in self.tasks:
            yield
            return
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.tasks[experience]}
        with torch.no_grad():
            for n, v in self.tasks[experience].items():
                params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    def task_states(self) -> dict[int, dict[str, torch.Tensor]]:
        return self.tasks

    def state_dict(self) -> dict:
        return {"initial": self.initial, "tasks": {str(k): v for k, v in self.tasks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.initial = dict(state["initial"])
        self.tasks = {int(k): dict(v) for k, v in state["tasks"].items()}

    def memory(self) -> dict:
        return {"stored_floats": sum(t.numel() for d in self.tasks.values() for t in d.values())}
