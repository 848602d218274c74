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

import torch

from .server import Server, StalenessWeight, Update, polynomial_staleness


class FedBuff(Server):
    """FedBuff server: buffer of ``K_b`` raw displacements, optional staleness weights."""

    name = "fedbuff"

    def __init__(self, *, local_lr: float = 0.05, server_lr: float = 1.0, buffer_size: int = 10,
                 max_staleness: int | None = None, stale_policy: str = "drop",
                 staleness_weight: StalenessWeight | None = polynomial_staleness(0.5)):
        super().__init__(local_lr=local_lr, server_lr=server_lr, max_staleness=max_staleness,
                         stale_policy=stale_policy, staleness_weight=staleness_weight)
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size (K_b) must be an int >= 1, got {buffer_size!r}")
        self.buffer_size = buffer_size

    def config(self) -> dict:
        return {**super().config(), "buffer_size": self.buffer_size}

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
