"""FedAvg with two-sided learning rates (the synchronous reference).

H. Yang, M. Fang, J. Liu. *Achieving Linear Speedup with Partial Worker
Participation in Non-IID Federated Learning.* ICLR 2021; B. McMahan et al.,
*Communication-Efficient Learning of Deep Networks from Decentralized Data*, 2017.

Each round the server samples a cohort, every member starts from the current
``x_t`` (no delay) and returns its raw displacement ``Δ_i = y_K − x_t``; then::

    x_{t+1} = x_t + η_s · Σ_i w_i Δ_i        (w_i = 1/m, or n_i/Σn with num_examples)

Uploads carry the normalised ``G_i = −Δ_i / (η_L·K_i)``, so the server recovers
``Δ_i = −η_L·K_i·G_i`` exactly. Plain FedAvg is ``η_s = 1``; AFA-CD with
``η = K`` and full participation is the same step (AFA-CD reduces to FedAvg in that case).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from ..checks import one_of, positive_int
from .afa_cd import WEIGHTINGS
from .server import Server, ServerConfig, Update, _norm


@dataclass(frozen=True)
class FedAvgConfig(ServerConfig):
    """FedAvg's settings: ``cohort_size`` workers per round and their ``weighting``. A
    synchronous round only accepts uploads computed on the current model, so the delay bound
    is fixed: ``max_staleness=0`` with ``stale_policy="drop"``."""

    max_staleness: int | None = 0
    cohort_size: int = 10
    weighting: str = "uniform"

    def validate(self) -> None:
        super().validate()
        if self.max_staleness != 0 or self.stale_policy != "drop":
            raise ValueError("FedAvg is synchronous: max_staleness must be 0 and stale_policy 'drop', "
                             f"got {self.max_staleness!r} and {self.stale_policy!r}")
        positive_int("cohort_size", self.cohort_size)
        one_of("weighting", self.weighting, WEIGHTINGS)


class FedAvg(Server):
    """Synchronous FedAvg: a round ends with `flush`, which averages the round's displacements."""

    name = "fedavg"
    synchronous = True

    Config = FedAvgConfig

    def __init__(self, *, local_lr: float = 0.05, server_lr: float = 1.0, cohort_size: int = 10,
                 weighting: str = "uniform",
                 max_update_norm: float | None = None):
        super().__init__(FedAvgConfig(local_lr=local_lr, server_lr=server_lr, cohort_size=cohort_size,
                                      weighting=weighting,
                                      max_update_norm=max_update_norm))

    def _reset(self) -> None:
        self.round: list[tuple[int, torch.Tensor, int, int]] = []  # (worker, K·G, base, n)

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        kg = update.local_steps * g
        if self._finite_or_reject(kg):   # K·G of a huge upload may overflow
            self.round.append((update.worker, kg, update.base_version, update.num_examples))
        return False

    def flush(self) -> bool:
        if not self.round:
            return False
        # x + η_s·mean(Δ) with Δ = −η_L·K·G
        stepped = self._guarded_step(self.settings.server_lr * self.settings.local_lr)
        self.round = []
        return stepped

    def _ready(self) -> bool:
        return bool(self.round)

    def _direction(self) -> torch.Tensor:
        if self.settings.weighting == "num_examples":
            total = float(sum(e[3] for e in self.round))
            weights = [e[3] / total for e in self.round]
        else:
            weights = [1.0 / len(self.round)] * len(self.round)
        direction = torch.zeros_like(self.x)
        for (_, kg, _, _), w in zip(self.round, weights):
            direction += w * kg
        return direction

    def _pending_sizes(self) -> list[tuple[Hashable, float]]:
        return [(i, _norm(e[1])) for i, e in enumerate(self.round)]

    def _discard(self, key: Hashable) -> None:
        del self.round[key]

    def _before_commit(self) -> None:
        for worker, _, base, _ in self.round:
            self._consumed(worker, base)

    def _extra_state(self) -> dict:
        return {"round": [list(e) for e in self.round]}

    def _load_extra_state(self, state: dict) -> None:
        self.round = [(int(w), g.clone(), int(b), int(n)) for w, g, b, n in state["round"]]
