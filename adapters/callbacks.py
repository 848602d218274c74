"""Hugging Face Trainer integration: a schedule callback and an adapter-aware ``Trainer``.

``Trainer(..., callbacks=[AdapterScheduleCallback(adapted_model)])`` calls
``after_backward`` after every micro-batch and ``after_optimizer_step`` after every optimizer
step, which is all LaMDA's PMB freezing needs; no patched Trainer (the reference's approach).

The plain ``Trainer`` trains an adapted model with default arguments (the model shows its base
model's ``forward`` signature, so columns and labels are found), but it saves any model it does
not know as a full state dict. :class:`AdapterTrainer` saves the way the Trainer saves a PEFT
model: ``save_model`` and every checkpoint hold the adapter only (the folder ``lifelong.load``
reads), resuming and ``load_best_model_at_end`` read it back in place, and the schedule callback
is added.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .model import AdaptedModel

TRAINING_ARGS_NAME = "training_args.bin"


class AdapterScheduleCallback(TrainerCallback):
    def __init__(self, model: AdaptedModel):
        self.model = model

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Schedules that need the run's length get it from the Trainer (LaMDA's total_steps)."""
        for config in self.model.configs.values():
            if getattr(config, "total_steps", 0) is None and state.max_steps > 0:
                config.total_steps = int(state.max_steps)
                config.grad_accum = int(args.gradient_accumulation_steps)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.after_backward()  # a micro-batch that did not end an accumulation cycle

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.after_backward()  # the micro-batch that ends the cycle

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.after_optimizer_step(kwargs.get("optimizer"))


def adapted_model(model: Any) -> AdaptedModel:
    """The :class:`AdaptedModel` inside ``model`` (DDP / FSDP / compiled wrappers are looked through)."""
    seen = model
    while not isinstance(seen, AdaptedModel):
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"AdapterTrainer needs a model made by lifelong.wrap, got {type(model).__name__}")
        seen = inner
    return seen


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` that saves and restores only the adapter(s) of a wrapped model."""

    def __init__(self, model: AdaptedModel | None = None, *args: Any, callbacks: list | None = None, **kwargs: Any):
        adapted = adapted_model(model)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, AdapterScheduleCallback) for c in callbacks):
            callbacks.append(AdapterScheduleCallback(adapted))
        super().__init__(model, *args, callbacks=callbacks, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every process takes part (sharded FSDP tensors are gathered); the main one writes."""
        self._save(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter(s) with ``save_pretrained`` (the model's full state dict is ignored)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        adapted_model(self.model).save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        adapted_model(model if model is not None else self.model).load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        adapted_model(self.model).load_adapter_weights(self.state.best_model_checkpoint)


__all__ = ["AdapterScheduleCallback", "AdapterTrainer", "adapted_model"]
