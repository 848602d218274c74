"""Experience replay with a fixed-size, experience-balanced buffer (every engine).

Chaudhry et al. *On Tiny Episodic Memories in Continual Learning* (arXiv 1902.10486); the buffer
policy is Avalanche's ``ExperienceBalancedBuffer``: after experience t the ``mem_size`` slots are
split equally over the t+1 experiences seen (the first ``mem_size mod (t+1)`` get one more), each
keeping a seeded random subset of its training samples (a shrinking experience drops from the end
of its subset). The next experience trains on its own data concatenated with the buffer.

``engine="avalanche"`` runs Avalanche's ``Replay`` strategy instead, whose data loader pairs each
current mini-batch with a buffer mini-batch; here the buffer samples are shuffled into the
experience's data, so a step sees fewer replayed samples when the buffer is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import ConcatDataset, Subset

from ...checks import non_negative_int, positive_int
from ..hooks import Context, ContinualMethod, MethodConfig
from ..registry import ALL_MODES, register_method

__all__ = ["Replay", "ReplayConfig"]


@dataclass
class ReplayConfig(MethodConfig):
    """``mem_size``: samples kept in all; ``seed``: picks which samples."""

    mem_size: int = 200
    seed: int = 0

    def validate(self) -> None:
        positive_int("replay: mem_size", self.mem_size)
        non_negative_int("replay: seed", self.seed)


@register_method("replay", shards=True, adapter_modes=ALL_MODES)
class Replay(ContinualMethod):
    """A balanced replay buffer (see the module docstring)."""

    Config = ReplayConfig
    avalanche_strategy = "replay"

    def __init__(self, config: ReplayConfig | None = None, **options):
        super().__init__(config, **options)
        self.buffer: list[list[int]] = []  # per seen experience: indices into its training set

    def avalanche_options(self) -> dict:
        return {"mem_size": self.mem_size}

    def train_dataset(self, ctx: Context):
        parts = [Subset(ctx.experiences[j].dataset, idx) for j, idx in enumerate(self.buffer) if idx]
        return ConcatDataset([ctx.dataset, *parts]) if parts else ctx.dataset

    def after_experience(self, ctx: Context) -> None:
        size = len(ctx.experiences[ctx.experience].dataset)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.experience)
        self.buffer.append(torch.randperm(size, generator=g).tolist())
        n = len(self.buffer)
        quota = [self.mem_size // n + (1 if j < self.mem_size % n else 0) for j in range(n)]
        self.buffer = [idx[:q] for idx, q in zip(self.buffer, quota)]

    def state_dict(self) -> dict:
        return {"buffer": [list(idx) for idx in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = [[int(i) for i in idx] for idx in state["buffer"]]

    def memory(self) -> dict:
        return {"replay_samples": sum(len(idx) for idx in self.buffer)}
