"""FedBuff: buffered asynchronous aggregation.

J. Nguyen, K. Malik, H. Zhan, A. Yousefpour, M. Rabbat, M. Malek, D. Huba.
*Federated Learning with Buffered Asynchronous Aggregation.* AISTATS 2022
(PMLR 151), arXiv:2106.06639.

Workers train asynchronously from whatever version they downloaded and return the
raw displacement ``Δ = x_download − y_Q``. The server accumulates staleness-weighted
displacements and steps when ``K_b`` have arrived::

    acc ← acc + s(τ)·Δ            (s(τ) = 1/√(1+τ) by default)
    x   ← x − η_g · acc / K_b      (divided by K_b even with staleness weights)

Uploads carry ``G = Δ / (η_L·Q)``, so ``Δ = η_L·Q·G`` is recovered exactly. Unlike
AFA-CD there is no 1/K normalisation: a worker that runs more steps moves the
model further.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checks import positive_int
from .server import Server, ServerConfig, StalenessWeight, Update, polynomial_staleness


@dataclass
class FedBuffConfig(ServerConfig):
    """FedBuff's settings: ``buffer_size`` K_b displacements per step, no delay bound and the
    paper's ``s(τ) = 1/√(1+τ)`` staleness weight by default."""

    max_staleness: int | None = None
    staleness_weight: StalenessWeight | None = field(default_factory=lambda: polynomial_staleness(0.5))
    buffer_size: int = 10

    def validate(self) -> None:
        super().validate()
        positive_int("buffer_size (K_b)", self.buffer_size)


class FedBuff(Server):
    """FedBuff server: buffer of ``K_b`` raw displacements, optional staleness weights."""

    name = "fedbuff"

    Config = FedBuffConfig

    def __init__(self, *, local_lr: float = 0.05, server_lr: float = 1.0, buffer_size: int = 10,
                 max_staleness: int | None = None, stale_policy: str = "drop",
                 staleness_weight: StalenessWeight | None = polynomial_staleness(0.5)):
        super().__init__(FedBuffConfig(local_lr=local_lr, server_lr=server_lr, buffer_size=buffer_size,
                                       max_staleness=max_staleness, stale_policy=stale_policy,
                                       staleness_weight=staleness_weight))

    def _reset(self) -> None:
        self.acc = torch.zeros_like(self.x)   # Σ s(τ)·Q·G  (= Σ s(τ)·Δ / η_L)
        self.count = 0

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        tau = self.version - update.base_version
        self.acc += (self._weight(tau) * update.local_steps) * g
        self.count += 1
        self._consumed(update.worker, update.base_version)
        if self.count < self.buffer_size:
            return False
        self._step(self.acc / self.buffer_size, self.server_lr * self.local_lr)
        self._reset()
        return True

    def _extra_state(self) -> dict:
        return {"acc": self.acc.clone(), "count": self.count}

    def _load_extra_state(self, state: dict) -> None:
        self.acc = state["acc"].clone()
        self.count = int(state["count"])
