"""MIFA: Memory-augmented Impatient Federated Averaging.

X. Gu, K. Huang, J. Zhang, L. Huang. *Fast Federated Learning in the Presence of
Arbitrary Device Unavailability.* NeurIPS 2021, arXiv:2106.04159.

Every round the available devices train from the current model and refresh their
memory slot with the *sum* of their K gradients ``U_i = (x_t − y_K)/η_L`` (no
division by K). The server then averages all remembered slots::

    x_{t+1} = x_t − η · η_L · (1/N) Σ_i U_i

Uploads carry ``G = U/K``, so the slot stores ``K·G``. As in FLGo's
implementation no step is taken until a fraction ``min_fraction`` of the devices
have a slot, and the average runs over the filled slots. ``η`` multiplies the
single learning rate of the paper (η = 1 is MIFA as published). ``cohort_size`` (default
None: every available device, as published) caps how many of the available devices train in a
round, drawn uniformly among them, so that MIFA can be compared at the same number of uploads
per step as the buffered methods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import fraction, optional, positive_int
from .afa_cs import MemoryConfig, MemoryServer
from .server import Update


@dataclass(frozen=True)
class MIFAConfig(MemoryConfig):
    """MIFA's settings: no step until a fraction ``min_fraction`` of the devices have a slot.
    MIFA is round-based and averages the filled slots, so ``max_staleness=0``,
    ``stale_policy="drop"``, ``cs_init="available_only"`` and ``min_new=1`` are fixed."""

    max_staleness: int | None = 0
    min_fraction: float = 1.0
    cohort_size: int | None = None

    def validate(self) -> None:
        super().validate()
        fixed = {"max_staleness": 0, "stale_policy": "drop", "cs_init": "available_only", "min_new": 1}
        wrong = {k: getattr(self, k) for k, v in fixed.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(f"MIFA fixes {fixed}; got {wrong}")
        fraction("min_fraction", self.min_fraction)
        optional(positive_int, "cohort_size", self.cohort_size)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out["cohort_size"] is None:   # the published rule: configs (and fingerprints) as before
            del out["cohort_size"]
        return out


class MIFA(MemoryServer):
    """MIFA server: round-based, memory of each device's latest gradient sum."""

    name = "mifa"
    synchronous = True
    needs_warm_start = False

    Config = MIFAConfig

    def __init__(self, *, local_lr: float = 0.05, server_lr: float = 1.0, min_fraction: float = 1.0,
                 resync_every: int = 100, cohort_size: int | None = None,
                 max_update_norm: float | None = None):
        super().__init__(MIFAConfig(local_lr=local_lr, server_lr=server_lr, min_fraction=min_fraction,
                                    resync_every=resync_every, cohort_size=cohort_size,
                                    max_update_norm=max_update_norm))

    def _needed(self) -> int:
        return max(1, math.ceil(self.settings.min_fraction * self.num_workers))

    def _slot_value(self, update: Update, g: torch.Tensor) -> torch.Tensor:
        return update.local_steps * g

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        self._store_or_reject(update, g)
        return False

    def _ready(self) -> bool:
        return len(self.memory) >= self._needed()

    def flush(self) -> bool:
        if not self._ready():
            # the round's uploads stay remembered; their staleness is recorded at the first step
            return False
        return self._take_step(self.settings.server_lr * self.settings.local_lr)

    def stall_note(self) -> str:
        missing = [w for w in range(self.num_workers) if w not in self.memory]
        if len(self.memory) >= self._needed():
            return ""
        names = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        return (f"MIFA takes no step until {self._needed()} of {self.num_workers} devices have a slot "
                f"(min_fraction={self.settings.min_fraction}); {len(self.memory)} have one, workers "
                f"{names} never delivered a valid upload (lower min_fraction)")
