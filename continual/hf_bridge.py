"""Hugging Face ``Trainer`` bridge for MIGU (imports transformers; loaded lazily).

``MIGUCallback`` attaches MIGU's forward hooks at ``on_train_begin``, masks the gradients in
``on_pre_optimizer_step`` and resets the magnitudes in ``on_optimizer_step``; gradient
accumulation is handled because the hooks sum over every micro-batch of the window and the mask
is built once at the optimizer step (migu.md §4).

Caveat (migu.md §4): ``on_pre_optimizer_step`` fires *after* the Trainer clipped the gradients, so
the clip norm is computed on unmasked gradients, unlike the reference (which masks, then clips).
For the reference's order set ``max_grad_norm=0`` in ``TrainingArguments`` or call
``migu.mask_gradients()`` in a ``Trainer.training_step`` override.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .migu import MIGU

__all__ = ["MIGUCallback"]


class MIGUCallback(TrainerCallback):
    """MIGU inside ``transformers.Trainer``; ``task_index`` is the 0-based index of the task this
    Trainer run trains (the Trainer has no task boundaries): masking happens from ``start_task`` on."""

    def __init__(self, migu: MIGU | None = None, task_index: int = 0, **options):
        self.migu = migu if migu is not None else MIGU(**options)
        self.task_index = task_index

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("MIGUCallback needs the model (the Trainer passes it as model=...)")
        self.migu.before_experience(model, self.task_index)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.migu.mask_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.migu.after_step()

    def on_train_end(self, args, state, control, **kwargs):
        self.migu.after_experience()
