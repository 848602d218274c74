"""LwF — Learning without Forgetting, through the loss hook (every engine).

Zhizhong Li and Derek Hoiem. *Learning without Forgetting.* ECCV 2016 / TPAMI 2017
(arXiv 1606.09282). The model after the previous experience is the teacher; on every batch of
the new experience the student's logits over the classes seen so far (``U``) are distilled:

    L(θ) + α · KL( softmax(z_prev[U] / T) ‖ softmax(z[U] / T) )          (batch mean)

as Avalanche's ``LwFPlugin`` computes it (``engine="avalanche"`` runs that plugin for ``lwf``),
with α = 1 and T = 2 by default. The teacher is not a copy of the model: only the trainable
tensors at the end of the previous experience are kept, and the teacher's logits come from
``torch.func.functional_call`` with them (the frozen tensors are shared). Avalanche's plugin,
on a single-head model, distils only the classes of task label 0; this one distils every class
seen so far, which is the same in class-incremental streams (all task labels 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ...checks import non_negative_number, positive_number
from ..hooks import Context, ContinualMethod, MethodConfig
from ..registry import ALL_MODES, register_method
from ..streams import experience_classes

__all__ = ["LwF", "LwFConfig"]


@dataclass
class LwFConfig(MethodConfig):
    """``alpha``: distillation weight α (≥ 0); ``temperature``: softmax temperature T (> 0)."""

    alpha: float = 1.0
    temperature: float = 2.0

    def validate(self) -> None:
        non_negative_number("lwf: alpha", self.alpha)
        positive_number("lwf: temperature", self.temperature)


@register_method("lwf", adapter_modes=ALL_MODES)
class LwF(ContinualMethod):
    """Learning without forgetting (see the module docstring)."""

    Config = LwFConfig
    avalanche_strategy = "lwf"

    def __init__(self, config: LwFConfig | None = None, **options):
        super().__init__(config, **options)
        self.teacher: dict[str, torch.Tensor] = {}
        self.old_classes: list[int] = []

    def avalanche_options(self) -> dict:
        return self.settings()

    def loss(self, ctx: Context, loss: torch.Tensor) -> torch.Tensor:
        if not self.teacher or not self.old_classes:
            return loss
        with torch.no_grad():
            previous = functional_call(ctx.model, self._teacher_for(ctx.model), (ctx.inputs,))
        seen = torch.tensor(self.old_classes, device=ctx.logits.device)
        t = self.temperature
        log_p = F.log_softmax(ctx.logits[:, seen] / t, dim=1)
        q = F.softmax(previous[:, seen] / t, dim=1)
        return loss + self.alpha * F.kl_div(log_p, q, reduction="batchmean")

    def _teacher_for(self, model) -> dict[str, torch.Tensor]:
        """The kept tensors that still exist in ``model`` with their shape (adapters may have changed)."""
        current = dict(model.named_parameters())
        return {n: v for n, v in self.teacher.items() if n in current and current[n].shape == v.shape}

    def after_experience(self, ctx: Context) -> None:
        self.teacher = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
        self.old_classes = sorted(set(self.old_classes) | set(experience_classes(ctx.experiences[ctx.experience])))

    def state_dict(self) -> dict:
        return {"teacher": self.teacher, "old_classes": list(self.old_classes)}

    def load_state_dict(self, state: dict) -> None:
        self.teacher, self.old_classes = dict(state["teacher"]), [int(c) for c in state["old_classes"]]

    def memory(self) -> dict:
        return {"stored_floats": sum(t.numel() for t in self.teacher.values())}
