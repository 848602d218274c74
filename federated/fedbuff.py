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
from typing import Hashable

import torch

from ..checks import positive_int
from .server import Server, ServerConfig, StalenessWeight, Update, _bump, _norm, polynomial_staleness


@dataclass(frozen=True)
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
                 staleness_weight: StalenessWeight | None = polynomial_staleness(0.5),
                 max_update_norm: float | None = None):
        super().__init__(FedBuffConfig(local_lr=local_lr, server_lr=server_lr, buffer_size=buffer_size,
                                       max_staleness=max_staleness, stale_policy=stale_policy,
                                       staleness_weight=staleness_weight,
                                       max_update_norm=max_update_norm))

    def _reset(self) -> None:
        self.acc = torch.zeros_like(self.x)   # Σ s(τ)·Q·G  (= Σ s(τ)·Δ / η_L)
        self.entries: list[tuple[int, int, torch.Tensor]] = []   # (worker, τ, s(τ)·Q·G) in acc

    @property
    def count(self) -> int:
        return len(self.entries)

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        tau = self.version - update.base_version
        contribution = (self._weight(tau) * update.local_steps) * g
        total = self.acc + contribution
        if not self._finite_or_reject(contribution, total):
            return False
        self.acc = total
        self.entries.append((update.worker, tau, contribution))
        if not self._ready():
            return False
        stepped = self._guarded_step(self.settings.server_lr * self.settings.local_lr)
        if stepped:
            self._reset()
        return stepped

    def _ready(self) -> bool:
        return self.count >= self.settings.buffer_size

    def _direction(self) -> torch.Tensor:
        return self.acc / self.settings.buffer_size

    def _pending_sizes(self) -> list[tuple[Hashable, float]]:
        return [(i, _norm(e[2])) for i, e in enumerate(self.entries)]

    def _discard(self, key: Hashable) -> None:
        del self.entries[key]
        self.acc = torch.zeros_like(self.x)
        for _, _, c in self.entries:
            self.acc += c

    def _before_commit(self) -> None:
        # staleness as weighted: τ at arrival, when the displacement entered the accumulator
        for worker, tau, _ in self.entries:
            _bump(self.stats["staleness_consumed"], tau)
            _bump(self.stats["consumed_per_worker"], worker)

    def _extra_state(self) -> dict:
        return {"acc": self.acc.clone(), "entries": [[w, t, c.clone()] for w, t, c in self.entries]}

    def _load_extra_state(self, state: dict) -> None:
        if "entries" not in state:
            raise ValueError("this FedBuff state predates per-upload entries (count only); it cannot be "
                             "resumed: delete the checkpoint to start over")
        self.acc = state["acc"].clone()
        self.entries = [(int(w), int(t), c.clone()) for w, t, c in state["entries"]]
