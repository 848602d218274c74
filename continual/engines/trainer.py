"""The ``transformers.Trainer`` engine, and the continual hooks inside a Trainer of your own.

* ``run_stream(..., engine="trainer")`` trains each experience with a :class:`ContinualTrainer`:
  the engine's seeded loader, optimizer (kept across experiences as in the native loop), constant
  learning rate and loss (criterion, task masking and every method's ``loss`` hook), so the
  numbers equal the native loop's on the same config and seed.
* :class:`ContinualCallback` runs methods inside a ``Trainer`` you built yourself, for experience
  ``task_index``: ``before_experience`` at ``on_train_begin``, ``after_backward`` at
  ``on_pre_optimizer_step``, ``after_step`` at ``on_optimizer_step``, ``after_experience`` at
  ``on_train_end``. Train on ``callback.train_dataset(dataset)`` (rehearsal adds old samples; the
  callback refuses a Trainer whose data is not that set). A callback cannot change a loss: methods
  with a ``loss`` hook (EWC, LwF, O-LoRA) need ``ContinualTrainer`` or ``run_stream``.

Order of operations: ``on_pre_optimizer_step`` fires *after* the Trainer clipped the gradients, so
with ``max_grad_norm > 0`` the clip norm is computed on unmasked gradients, unlike MIGU's reference
code (which masks, then clips). The stream route sets ``max_grad_norm=0``.
"""

from __future__ import annotations

import tempfile
import time
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from ..hooks import Context, ContinualMethod, HookList
from ..loop import experience_seed
from .base import Engine

__all__ = ["ContinualCallback", "ContinualTrainer", "TrainerEngine"]


class _HookCallback(TrainerCallback):
    """Calls the step hooks of ``hooks`` with ``ctx`` from inside the Trainer's loop."""

    def __init__(self, hooks: HookList, ctx: Context | None = None):
        self.hooks, self.ctx = hooks, ctx

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.hooks.call("after_backward", self.ctx)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.ctx.step += 1
        self.hooks.call("after_step", self.ctx)


class ContinualCallback(_HookCallback):
    """Continual methods inside a ``transformers.Trainer`` of your own (see the module docstring).

    Args:
        methods: one method or a list, called in order.
        task_index: the 0-based index of the experience this Trainer run trains.
        experiences: the stream's training experiences (objects with ``.dataset``); None: the
            Trainer's own training set is experience ``task_index`` (earlier ones unknown).
    """

    def __init__(self, methods: ContinualMethod | list[ContinualMethod], task_index: int = 0,
                 experiences: list | None = None):
        methods = list(methods) if isinstance(methods, (list, tuple)) else [methods]
        with_loss = [m.name for m in methods if type(m).loss is not ContinualMethod.loss]
        if with_loss:
            raise ValueError(f"method(s) {with_loss} add to the loss, which a callback cannot do: train with "
                             "lifelong.continual.run_stream(..., engine='trainer') or ContinualTrainer(loss_fn=...)")
        super().__init__(HookList(methods))
        self.task_index, self.experiences = task_index, experiences
        self._dataset = None

    def _context(self, model: nn.Module, dataset) -> Context:
        experiences = self.experiences
        if experiences is None:
            experiences = [SimpleNamespace(dataset=None)] * self.task_index + [SimpleNamespace(dataset=dataset)]
        return Context(model=model, experience=self.task_index, experiences=experiences)

    @property
    def rehearses(self) -> bool:
        """Whether a method changes the training data (rehearsal)."""
        return any(type(m).train_dataset is not ContinualMethod.train_dataset for m in self.hooks.hooks)

    def train_dataset(self, dataset):
        """What the Trainer must train on for this experience: ``dataset`` plus what the methods add."""
        if self.rehearses and self.experiences is None:
            raise ValueError("a method that adds training data (rehearsal) needs experiences=[...] (the stream's "
                             "training experiences) to find earlier data")
        self._dataset = self.hooks.train_dataset(self._context(None, dataset)) if self.rehearses else dataset
        return self._dataset

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError(f"{type(self).__name__} needs the model (the Trainer passes it as model=...)")
        data = getattr(train_dataloader, "dataset", None)
        if self.rehearses and (self._dataset is None or data is not self._dataset):
            raise ValueError("this method adds training data: build the Trainer with "
                             "train_dataset=callback.train_dataset(your_dataset)")
        self.ctx = self._context(model, data)
        self.hooks.call("before_experience", self.ctx)

    def on_train_end(self, args, state, control, **kwargs):
        self.hooks.call("after_experience", self.ctx)


class ContinualTrainer(Trainer):
    """``Trainer`` for one experience: a given (seeded) loader and a loss function of a batch.

    Args:
        train_loader: batches of the stream (``(x, y)`` or ``(x, y, task)``).
        loss_fn: ``loss_fn(batch, model) -> loss``, ``model`` being the module the Trainer wrapped
            (run_stream passes its engine's ``step_loss``).
    """

    def __init__(self, *args, train_loader: DataLoader, loss_fn: Callable, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_loader, self.loss_fn = train_loader, loss_fn

    def get_train_dataloader(self) -> DataLoader:
        return self.train_loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.loss_fn(inputs, model)  # model: the Trainer's (possibly DDP-wrapped) module
        return (loss, None) if return_outputs else loss


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.steps, self.seconds, self._t0 = 0, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._t0
        self.steps += 1


class TrainerEngine(Engine):
    """``run_stream``'s engine that trains each experience with a :class:`ContinualTrainer`.

    Under ``torchrun`` the Trainer wraps the model in ``DistributedDataParallel`` itself; the engine
    hands it this process's rows of each global batch."""

    distributes = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.training_args = dict(self.settings.training_args or {})
        self.timer = _StepTimer()

    def _arguments(self, folder: str, i: int) -> TrainingArguments:
        options = {
            "output_dir": folder, "per_device_train_batch_size": self.batch_size, "num_train_epochs": self.epochs,
            "learning_rate": self.lr, "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 0.0,
            "logging_strategy": "no", "save_strategy": "no", "report_to": [], "disable_tqdm": True,
            "seed": experience_seed(self.seed, i), "remove_unused_columns": False,
            "use_cpu": self.device.type == "cpu",
        }
        return TrainingArguments(**{**options, **self.training_args})

    def train_experience(self, i: int, train_exps: list) -> tuple[int, float]:
        ctx, data = self.start_experience(i, train_exps)
        steps, seconds = self.timer.steps, self.timer.seconds
        if len(data):
            loader = self.loader(data, i)
            constant = torch.optim.lr_scheduler.LambdaLR(ctx.optimizer, lambda _: 1.0)
            with tempfile.TemporaryDirectory() as folder:
                trainer = ContinualTrainer(
                    model=self.model, args=self._arguments(folder, i), optimizers=(ctx.optimizer, constant),
                    callbacks=[_HookCallback(self.hooks, ctx), self.timer], train_loader=loader,
                    loss_fn=lambda batch, model: self.step_loss(ctx, batch, model))
                trainer.remove_callback(PrinterCallback)  # run_stream reports through its own progress bar
                trainer.train()
        self.end_experience(ctx)
        return self.timer.steps - steps, self.timer.seconds - seconds
