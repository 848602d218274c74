"""FedAvg with two-sided learning rates (the synchronous reference).

H. Yang, M. Fang, J. Liu. *Achieving Linear Speedup with Partial Worker
Participation in Non-IID Federated Learning.* ICLR 2021; B. McMahan et al.,
*Communication-Efficient Learning of Deep Networks from Decentralized Data*, 2017.

Each round the server samples a cohort, every member starts from the current
``x_t`` (no delay) and returns its raw displacement ``Δ_i = y_K − x_t``; then::

    x_{t+1} = x_t + η_s · Σ_i w_i Δ_i        (w_i = 1/m, or n_i/Σn with num_examples)

Uploads carry the normalised ``G_i = −Δ_i / (η_L·K_i)``, so the server recovers
``Δ_i = −η_L·K_i·G_i`` exactly. Plain FedAvg is ``η_s = 1``; AFA-CD with
``η = K`` and full participation is the same step (anarchic_fl.md invariant 1).
"""
from __future__ import annotations

import torch

from .afa_cd import WEIGHTINGS
from .server import Server, Update


class FedAvg(Server):
    """Synchronous FedAvg: a round ends with `flush`, which averages the round's displacements."""

    name = "fedavg"
    synchronous = True

    def __init__(self, *, local_lr: float = 0.05, server_lr: float = 1.0, cohort_size: int = 10,
                 weighting: str = "uniform"):
        # A synchronous round only accepts uploads computed on the current model.
        super().__init__(local_lr=local_lr, server_lr=server_lr, max_staleness=0, stale_policy="drop")
        if not isinstance(cohort_size, int) or cohort_size < 1:
            raise ValueError(f"cohort_size must be an int >= 1, got {cohort_size!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.cohort_size = cohort_size
        self.weighting = weighting

    def config(self) -> dict:
        return {**super().config(), "cohort_size": self.cohort_size, "weighting": self.weighting}

    def _reset(self) -> None:
        self.round: list[tuple[int, torch.Tensor, int, int]] = []  # (worker, K·G, base, n)

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        self.round.append((update.worker, update.local_steps * g, update.base_version,
                           update.num_examples))
        return False

    def flush(self) -> bool:
        if not self.round:
            return False
        if self.weighting == "num_examples":
            total = float(sum(e[3] for e in self.round))
            weights = [e[3] / total for e in self.round]
        else:
            weights = [1.0 / len(self.round)] * len(self.round)
        direction = torch.zeros_like(self.x)
        for (worker, kg, base, _), w in zip(self.round, weights):
            direction += w * kg
            self._consumed(worker, base)
        # x + η_s·mean(Δ) with Δ = −η_L·K·G
        self._step(direction, self.server_lr * self.local_lr)
        self.round = []
        return True

    def _extra_state(self) -> dict:
        return {"round": [list(e) for e in self.round]}

    def _load_extra_state(self, state: dict) -> None:
        self.round = [(int(w), g.clone(), int(b), int(n)) for w, g, b, n in state["round"]]
