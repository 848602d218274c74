"""Hugging Face ``Trainer`` route: the continual methods inside ``transformers.Trainer`` (loaded lazily).

* :class:`ContinualCallback` runs any :class:`~lifelong.continual.method.ContinualMethod` inside a
  ``Trainer``: ``before_experience`` at ``on_train_begin``, ``after_backward`` at
  ``on_pre_optimizer_step``, ``after_update`` at ``on_optimizer_step`` and ``after_experience``
  at ``on_train_end``. Gradient accumulation is handled: MIGU's hooks sum over every micro-batch
  of the window and the mask is built once at the optimizer step.
* :class:`ContinualTrainer` is a ``Trainer`` for one experience of a stream: it trains on the
  stream's seeded loader with the task-masked loss of :func:`~lifelong.continual.run_stream`.
  ``run_stream(..., engine="trainer")`` drives it through a whole stream, so the numbers equal
  the native loop's on the same config and seed (the optimizer, kept across experiences, the
  constant learning rate and the seeds are the same).

Order of operations: ``on_pre_optimizer_step`` fires *after* the Trainer clipped the gradients, so
with ``max_grad_norm > 0`` the clip norm is computed on unmasked gradients, unlike MIGU's reference
code (which masks, then clips). The stream route sets ``max_grad_norm=0``; with your own
``TrainingArguments`` set it to 0 as well, or call ``migu.mask_gradients()`` in a
``Trainer.training_step`` override, for the reference's order.
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from .loop import experience_seed, restrict_logits, set_candidates, shuffled_loader, unpack
from .method import ContinualMethod
from .migu import MIGU
from .runner import NativeEngine

__all__ = ["ContinualCallback", "ContinualTrainer", "MIGUCallback", "TrainerEngine"]


class ContinualCallback(TrainerCallback):
    """A continual method's hooks inside ``transformers.Trainer`` for experience ``task_index``.

    ``experiences`` (the stream's training experiences) is needed by methods that look at data
    across experiences (power-law rehearsal); MIGU and CLASSP work without it.
    """

    def __init__(self, method: ContinualMethod, task_index: int = 0, experiences: list | None = None):
        self.method = method
        self.task_index = task_index
        self.experiences = experiences

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError(f"{type(self).__name__} needs the model (the Trainer passes it as model=...)")
        self.method.before_experience(model, self.task_index)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.method.after_backward()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.method.after_update()

    def on_train_end(self, args, state, control, **kwargs):
        self.method.after_experience(self.task_index, self.experiences)


class MIGUCallback(ContinualCallback):
    """MIGU inside ``transformers.Trainer``; ``task_index`` is the 0-based index of the task this
    Trainer run trains (the Trainer has no task boundaries): masking happens from ``start_task`` on."""

    def __init__(self, migu: MIGU | None = None, task_index: int = 0, **options):
        super().__init__(migu if migu is not None else MIGU(**options), task_index)
        self.migu = self.method


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.steps, self.seconds, self._t0 = 0, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._t0
        self.steps += 1


class ContinualTrainer(Trainer):
    """``Trainer`` for one experience: a given (seeded) loader and the task-masked criterion.

    Args:
        train_loader: batches of ``(x, y)`` or ``(x, y, task)``.
        criterion: loss of (logits, targets); cross-entropy by default.
        masks, task: task-incremental class masks and the experience's task (see ``restrict_logits``).
    """

    def __init__(self, *args, train_loader: DataLoader, criterion: nn.Module | None = None,
                 masks: dict | None = None, task: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_loader = train_loader
        self.criterion = criterion or nn.CrossEntropyLoss()
        self.masks, self.task = masks, task

    def get_train_dataloader(self) -> DataLoader:
        return self.train_loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        x, y, t = unpack(inputs, self.args.device)
        logits = restrict_logits(model(x), t, self.masks, self.task)
        loss = self.criterion(logits, y)
        return (loss, logits) if return_outputs else loss


class TrainerEngine(NativeEngine):
    """``run_stream``'s engine that trains each experience with a :class:`ContinualTrainer`."""

    def __init__(self, *args, training_args: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.training_args = dict(training_args or {})
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
        self.prepare(i, train_exps)
        set_candidates(self.model, train_exps, self.masks, seen=i)
        data = self.method.train_dataset(i, train_exps)
        loader = shuffled_loader(data, self.batch_size, experience_seed(self.seed, i))
        steps, seconds = self.timer.steps, self.timer.seconds
        constant = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        with tempfile.TemporaryDirectory() as folder:
            trainer = ContinualTrainer(
                model=self.model, args=self._arguments(folder, i), optimizers=(self.optimizer, constant),
                callbacks=[ContinualCallback(self.method, i, train_exps), self.timer], train_loader=loader,
                criterion=self.criterion, masks=self.masks, task=i)
            trainer.remove_callback(PrinterCallback)  # run_stream reports through its own progress bar
            trainer.train()
        self.model.eval()
        return self.timer.steps - steps, self.timer.seconds - seconds
