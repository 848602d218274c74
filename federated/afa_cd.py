"""AFA-CD: Anarchic Federated Averaging, cross-device.

Haibo Yang, Xin Zhang, Prashant Khanduri, Jia Liu. *Anarchic Federated Learning.*
ICML 2022 (PMLR 162), arXiv:2108.09875 (early versions: AFedAvg-TSLR-CD).

Workers choose when to take part and how many local steps K to run; each upload
is the normalised update ``G_j = (x_{s_j} − y_K) / (η_L·K)`` computed on a possibly
stale model ``x_{s_j}``. The server waits for ``m`` uploads, averages them with
uniform weights and takes one two-sided step::

    G_t     = (1/m) Σ_{j∈B} G_j
    x_{t+1} = x_t − η · η_L · G_t

No staleness discount (uploads with τ ≤ τ_max are used as they are); the options
``weighting="num_examples"`` and ``staleness_weight`` are deviations from the paper
kept for ablations. With ``distinct_per_step=True`` a worker occupies at most one
slot of the buffer (its newest upload replaces the older one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from ..checks import one_of, positive_int
from .server import Server, ServerConfig, StalenessWeight, Update, _norm

WEIGHTINGS = ("uniform", "num_examples")


@dataclass(frozen=True)
class AFACDConfig(ServerConfig):
    """AFA-CD's settings: ``buffer_size`` m uploads per step, their ``weighting``, and whether a
    worker holds at most one slot of the buffer (``distinct_per_step``)."""

    buffer_size: int = 10
    weighting: str = "uniform"
    distinct_per_step: bool = False

    def validate(self) -> None:
        super().validate()
        positive_int("buffer_size (m)", self.buffer_size)
        one_of("weighting", self.weighting, WEIGHTINGS)
        if not isinstance(self.distinct_per_step, bool):
            raise ValueError(f"distinct_per_step must be True or False, got {self.distinct_per_step!r}")


class AFACD(Server):
    """AFA-CD server: buffer of ``m`` uploads, uniform average, step ``η·η_L``."""

    name = "afa_cd"

    Config = AFACDConfig

    def __init__(self, *, local_lr: float = 0.05, server_lr: float = 1.0, buffer_size: int = 10,
                 max_staleness: int | None = 10, stale_policy: str = "drop",
                 weighting: str = "uniform", distinct_per_step: bool = False,
                 staleness_weight: StalenessWeight | None = None,
                 max_update_norm: float | None = None):
        super().__init__(AFACDConfig(local_lr=local_lr, server_lr=server_lr, buffer_size=buffer_size,
                                     max_staleness=max_staleness, stale_policy=stale_policy,
                                     weighting=weighting, distinct_per_step=distinct_per_step,
                                     staleness_weight=staleness_weight,
                                     max_update_norm=max_update_norm))

    def _reset(self) -> None:
        # entries: (worker, G, base_version, num_examples)
        self.buffer: list[tuple[int, torch.Tensor, int, int]] = []

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        entry = (update.worker, g, update.base_version, update.num_examples)
        if self.settings.distinct_per_step:
            self.buffer = [e for e in self.buffer if e[0] != update.worker]
        self.buffer.append(entry)
        if not self._ready():
            return False
        stepped = self._guarded_step(self.settings.server_lr * self.settings.local_lr)
        if stepped:
            self.buffer = []
        return stepped

    def _ready(self) -> bool:
        return len(self.buffer) >= self.settings.buffer_size

    def _direction(self) -> torch.Tensor:
        if self.settings.weighting == "num_examples":
            total = float(sum(e[3] for e in self.buffer))
            weights = [e[3] / total for e in self.buffer]
        else:
            weights = [1.0 / len(self.buffer)] * len(self.buffer)
        out = torch.zeros_like(self.x)
        for (_, g, base, _), w in zip(self.buffer, weights):
            out += (w * self._weight(self.version - base)) * g
        return out

    def _pending_sizes(self) -> list[tuple[Hashable, float]]:
        return [(i, _norm(e[1])) for i, e in enumerate(self.buffer)]

    def _discard(self, key: Hashable) -> None:
        del self.buffer[key]

    def _before_commit(self) -> None:
        for worker, _, base, _ in self.buffer:
            self._consumed(worker, base)

    def _extra_state(self) -> dict:
        return {"buffer": [list(e) for e in self.buffer]}

    def _load_extra_state(self, state: dict) -> None:
        self.buffer = [(int(w), g.clone(), int(b), int(n)) for w, g, b, n in state["buffer"]]
