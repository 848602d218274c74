"""The native engine: a plain torch loop over one experience's batches.

Per batch: ``zero_grad`` → forward and loss (``Engine.step_loss``: the criterion, then every
``loss`` hook) → ``backward`` → ``after_backward`` hooks → ``optimizer.step()`` →
``after_step`` hooks. A method that trains experiences itself (``owns_loop``: KCL, GKCL) is
handed the experience instead.
"""

from __future__ import annotations

import time

from .base import Engine

__all__ = ["NativeEngine"]


class NativeEngine(Engine):
    """The plain torch loop (one experience at a time)."""

    def setup(self, train_exps: list) -> None:
        if self.owner is not None:
            self.owner.setup(self.model, train_exps, self.masks, self.device, self.seed)

    def train_experience(self, i: int, train_exps: list) -> tuple[int, float]:
        if self.owner is not None:
            return self.owner.train_experience(self.model, i, train_exps, self.epochs, self.batch_size, self.lr)
        ctx, data = self.start_experience(i, train_exps)
        steps, step_time = 0, 0.0
        if len(data):
            loader = self.loader(data, i)
            opt = ctx.optimizer
            self.model.train()
            for _ in range(self.epochs):
                for batch in loader:
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    self.step_loss(ctx, batch).backward()
                    if self.settings.fsdp:
                        self.sync_replicated()
                    self.hooks.call("after_backward", ctx)
                    opt.step()
                    ctx.step += 1
                    self.hooks.call("after_step", ctx)
                    step_time += time.perf_counter() - t0
                    steps += 1
        self.end_experience(ctx)
        return steps, step_time
