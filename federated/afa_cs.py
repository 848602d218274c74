"""AFA-CS: Anarchic Federated Averaging, cross-silo (with per-worker memory).

Haibo Yang, Xin Zhang, Prashant Khanduri, Jia Liu. *Anarchic Federated Learning.*
ICML 2022 (PMLR 162), arXiv:2108.09875 (early versions: AFedAvg-TSLR-CS).

The server remembers the latest normalised update ``H[i]`` of every worker and
keeps the running sum ``S = Σ_i H[i]``. When ``min_new`` new uploads have arrived::

    for j in A_t:  S ← S − H[j] + G_j ;  H[j] ← G_j
    x_{t+1} = x_t − η · η_L · S / M

Workers that did not report contribute their remembered (stale) update; this
SAG-style reuse removes AFA-CD's bias under non-uniform arrivals. A step costs
O(|A_t|·d) thanks to the running sum; ``resync_every`` recomputes ``S`` from the
slots to stop float round-off from accumulating.

Empty slots (option ``cs_init``, a design choice the paper leaves open):
``"available_only"`` divides by the number of filled slots until all M have
reported (FLGo's MIFA does the same), ``"zeros"`` counts empty slots as zero and
divides by M, ``"warm_start"`` expects `warm_start` to fill every slot at x_0
before the first upload (the paper-reproduction setting).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..checks import one_of, positive_int
from .server import Server, ServerConfig, Update

CS_INITS = ("available_only", "zeros", "warm_start")


@dataclass
class MemoryConfig(ServerConfig):
    """Settings of a server with one memory slot per worker: how empty slots count (``cs_init``),
    how many new uploads trigger a step (``min_new``) and how often the running sum is recomputed
    exactly (``resync_every`` steps)."""

    cs_init: str = "available_only"
    min_new: int = 1
    resync_every: int = 100

    def validate(self) -> None:
        super().validate()
        one_of("cs_init", self.cs_init, CS_INITS)
        positive_int("min_new", self.min_new)
        positive_int("resync_every", self.resync_every)


@dataclass
class AFACSConfig(MemoryConfig):
    """AFA-CS's settings (those of every memory server)."""


class MemoryServer(Server):
    """A server with one memory slot per worker and a consistent running sum."""

    Config = MemoryConfig

    def _reset(self) -> None:
        self.memory: dict[int, torch.Tensor] = {}   # worker -> latest remembered vector
        self.memory_version: dict[int, int] = {}    # worker -> base version of that vector
        self.running_sum = torch.zeros_like(self.x)
        self.new_arrivals = 0
        self.pending: list[tuple[int, int]] = []    # (worker, base version) since the last step
        self.warm = self.cs_init != "warm_start"

    def _slot_value(self, update: Update, g: torch.Tensor) -> torch.Tensor:
        """What the slot stores for an upload (AFA-CS: G itself)."""
        return g

    def _store(self, update: Update, g: torch.Tensor) -> None:
        value = self._slot_value(update, g)
        old = self.memory.get(update.worker)
        self.running_sum += value if old is None else value - old
        self.memory[update.worker] = value
        self.memory_version[update.worker] = update.base_version

    def _record(self, update: Update) -> None:
        self.pending.append((update.worker, update.base_version))
        self.new_arrivals += 1

    def warm_start(self, updates: Iterable[Update]) -> None:
        """Fill the slots with updates computed at ``x_0`` before the first step.

        Invalid uploads are rejected and counted; their slots stay empty (zero).
        """
        spec = self._spec()
        if self.version != 0:
            raise RuntimeError("warm_start must be called before the first server step")
        for update in updates:
            self.stats["received"] += 1
            reason = self._invalid(update, spec)
            if reason is not None:
                self.stats["rejected"][reason] = self.stats["rejected"].get(reason, 0) + 1
                continue
            self._store(update, spec.flatten(update.delta))
        self.warm = True

    def _direction(self) -> torch.Tensor:
        filled = len(self.memory)
        denom = filled if self.cs_init == "available_only" else self.num_workers
        return self.running_sum / denom

    def _take_step(self, lr: float) -> None:
        # staleness is recorded for the uploads this step consumes for the first time
        for worker, base in self.pending:
            self._consumed(worker, base)
        self._step(self._direction(), lr)
        self.pending = []
        self.new_arrivals = 0
        if self.version % self.resync_every == 0:
            self.resync()

    def resync(self) -> None:
        """Recompute ``S = Σ_i H[i]`` exactly from the slots."""
        total = torch.zeros_like(self.x)
        for worker in sorted(self.memory):
            total += self.memory[worker]
        self.running_sum = total

    def _extra_state(self) -> dict:
        workers = sorted(self.memory)
        return {
            "workers": workers,
            "memory": torch.stack([self.memory[w] for w in workers]) if workers else torch.zeros(0),
            "memory_version": [self.memory_version[w] for w in workers],
            "running_sum": self.running_sum.clone(),
            "new_arrivals": self.new_arrivals,
            "pending": [list(p) for p in self.pending],
            "warm": self.warm,
        }

    def _load_extra_state(self, state: dict) -> None:
        workers = [int(w) for w in state["workers"]]
        self.memory = {w: state["memory"][k].clone() for k, w in enumerate(workers)}
        self.memory_version = {w: int(v) for w, v in zip(workers, state["memory_version"])}
        self.running_sum = state["running_sum"].clone()
        self.new_arrivals = int(state["new_arrivals"])
        self.pending = [(int(w), int(b)) for w, b in state["pending"]]
        self.warm = bool(state["warm"])


class AFACS(MemoryServer):
    """AFA-CS server: latest update per worker, average over all M, step ``η·η_L``."""

    name = "afa_cs"
    needs_warm_start = property(lambda self: self.cs_init == "warm_start")

    Config = AFACSConfig

    def __init__(self, *, local_lr: float = 0.05, server_lr: float = 1.0,
                 max_staleness: int | None = 10, stale_policy: str = "drop",
                 cs_init: str = "available_only", min_new: int = 1, resync_every: int = 100):
        super().__init__(AFACSConfig(local_lr=local_lr, server_lr=server_lr, max_staleness=max_staleness,
                                     stale_policy=stale_policy, cs_init=cs_init, min_new=min_new,
                                     resync_every=resync_every))

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        if not self.warm:
            raise RuntimeError("AFACS(cs_init='warm_start') needs warm_start(updates at x_0) "
                               "before the first upload")
        self._store(update, g)
        self._record(update)
        if self.new_arrivals < self.min_new:
            return False
        self._take_step(self.server_lr * self.local_lr)
        return True
