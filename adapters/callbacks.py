"""A Hugging Face ``TrainerCallback`` that drives adapters' training-time schedules.

``Trainer(..., callbacks=[AdapterScheduleCallback(adapted_model)])`` calls
``after_backward`` after every micro-batch and ``after_optimizer_step`` after every optimizer
step, which is all LaMDA's PMB freezing needs; no patched Trainer (the reference's approach).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .model import AdaptedModel


class AdapterScheduleCallback(TrainerCallback):
    def __init__(self, model: AdaptedModel):
        self.model = model

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.after_backward()  # a micro-batch that did not end an accumulation cycle

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.after_backward()  # the micro-batch that ends the cycle

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.after_optimizer_step(kwargs.get("optimizer"))
