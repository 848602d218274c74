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

**Default server step (``server_lr=None``).** The average over all slots is a moving
average of past gradients. When slots refresh in rotation (each step replaces the ``m``
oldest of ``M`` slots, as when every worker starts its next job as soon as one lands and
jobs are served first-in first-out) every slot holds a gradient from one of the last
``P = ⌈M/m⌉`` iterates (``m = min_new``), so on a quadratic of curvature ``λ`` the step is
``x_{t+1} = x_t − (η·η_L·λ/P)·Σ_{k<P} (x_{t−k} − x*)``. Its characteristic polynomial
``z^P (z − 1) + (a/P)·Σ_{k<P} z^k`` (``a = η·η_L·λ``) has every root inside the unit circle iff
``a < c(P)/P``, with ``c(1) = 2`` (gradient descent), ``c(2) = 4``, ``c(3) = 4.5``,
``c(5) = 4.77``, ``c(20) = 4.92`` and ``c(P) → 4.93`` (`rotation_bound`, computed from the
polynomial's roots). Local SGD at ``η_L`` is itself stable only when ``η_L·λ < 2``, so the
server step ``η = min(1, c(P)/(2P))`` keeps ``η·η_L·λ < c(P)/P`` whenever the workers' own
training is stable: that is the default (`default_server_lr`; ``η = 1`` up to ``P = 2``, 0.48 at
``P = 5``, 0.123 at ``P = 20``). A user-given ``server_lr`` above it draws a warning when
the server learns ``M``. The rule is exact for zero-delay rotation; random refresh orders
average like an exponential window and are more stable, while arrival delays shift the
window into the past and lower the bound (``c(20)`` falls to 2.8 with a 4-step delay), so
it is a default, not a guarantee. (The paper's own step-size conditions scale ``η·η_L``
down with the delay bound in the same direction.)

**Slot age.** The paper bounds the delay of every row it averages. ``max_staleness``
(τ_max) bounds an upload's staleness at arrival; an upload over τ_max is still kept when
it is fresher than the worker's slot (or the slot is empty), since dropping it would
leave an even older row in the average (counted as ``kept_fresher_than_slot``). The age
``t − s`` of every slot used by a step is recorded (``stats["slot_age"]``, a histogram over
steps, reported by the simulator); ``max_slot_age`` optionally expires slots older than
the bound before a step (counted as ``expired_slots``).

Empty slots (option ``cs_init``, a design choice the paper leaves open):
``"available_only"`` divides by the number of filled slots until all M have
reported (FLGo's MIFA does the same), ``"zeros"`` counts empty slots as zero and
divides by M, ``"warm_start"`` expects `warm_start` to fill every slot at x_0
before the first upload (the paper-reproduction setting).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Hashable, Iterable

import numpy as np
import torch

from ..checks import non_negative_int, one_of, optional, positive_int, positive_number
from .server import Server, ServerConfig, Update, _bump, _norm

CS_INITS = ("available_only", "zeros", "warm_start")
_EXACT_UP_TO = 64   # c(P) is increasing in P: beyond this, c(64) is a (tight) lower bound


def _window_stable(a: float, period: int) -> bool:
    """Is ``x_{t+1} = x_t − (a/P)·Σ_{k<P} x_{t−k}`` stable (every root strictly inside |z| = 1)?"""
    coeffs = np.zeros(period + 1)
    coeffs[0], coeffs[1] = 1.0, -1.0
    coeffs[1:] += a / period
    return bool(np.max(np.abs(np.roots(coeffs))) < 1.0)


@functools.lru_cache(maxsize=None)
def rotation_bound(period: int) -> float:
    """``c(P)``: the P-step moving-average iteration is stable iff ``η·η_L·λ < c(P)/P``.

    Found by bisection on the roots of its characteristic polynomial (``c(1) = 2``,
    ``c(2) = 4``, ``c(20) ≈ 4.92``); for ``P > 64`` the value at 64 is returned, a lower
    bound since ``c`` increases with ``P`` (``c(64) ≈ 4.934``, ``c(∞) ≈ 4.935``).
    """
    positive_int("period (P)", period)
    p = min(period, _EXACT_UP_TO)
    lo, hi = 0.0, 8.0 / p
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _window_stable(mid, p) else (lo, mid)
    return lo * p


def refresh_period(num_workers: int, min_new: int) -> int:
    """``P = ⌈M/m⌉``: server steps between two refreshes of a slot when slots refresh in rotation."""
    return max(1, math.ceil(num_workers / min_new))


def default_server_lr(num_workers: int, min_new: int) -> float:
    """AFA-CS's default ``η = min(1, c(P)/(2P))`` (see the module docstring for the derivation)."""
    period = refresh_period(num_workers, min_new)
    # c(1) = 2 and c(2) = 4 exactly; the bisection lands a hair below them
    return min(1.0, round(rotation_bound(period) / (2 * period), 9))


@dataclass(frozen=True)
class MemoryConfig(ServerConfig):
    """Settings of a server with one memory slot per worker: how empty slots count (``cs_init``),
    how many new uploads trigger a step (``min_new``), how often the running sum is recomputed
    exactly (``resync_every`` steps) and the optional slot-age bound (``max_slot_age``)."""

    LATER: ClassVar[dict[str, Any]] = {**ServerConfig.LATER, "max_slot_age": None}

    cs_init: str = "available_only"
    min_new: int = 1
    resync_every: int = 100
    max_slot_age: int | None = None

    def validate(self) -> None:
        super().validate()
        one_of("cs_init", self.cs_init, CS_INITS)
        positive_int("min_new", self.min_new)
        positive_int("resync_every", self.resync_every)
        optional(non_negative_int, "max_slot_age", self.max_slot_age)


@dataclass(frozen=True)
class AFACSConfig(MemoryConfig):
    """AFA-CS's settings (those of every memory server); ``server_lr=None`` (the default) derives
    η from the federation: ``min(1, c(P)/(2P))`` with ``P = ⌈M/min_new⌉``."""

    server_lr: float | None = None  # type: ignore[assignment]

    def check_server_lr(self) -> None:
        optional(positive_number, "server_lr (η)", self.server_lr)


class MemoryServer(Server):
    """A server with one memory slot per worker and a consistent running sum."""

    Config = MemoryConfig

    def _reset(self) -> None:
        self.memory: dict[int, torch.Tensor] = {}   # worker -> latest remembered vector
        self.memory_version: dict[int, int] = {}    # worker -> base version of that vector
        self.running_sum = torch.zeros_like(self.x)
        self.new_arrivals = 0
        # (worker, base version, the slot's previous value and version) since the last step
        self.pending: list[tuple[int, int, torch.Tensor | None, int | None]] = []
        self.warm = self.settings.cs_init != "warm_start"

    def _slot_value(self, update: Update, g: torch.Tensor) -> torch.Tensor:
        """What the slot stores for an upload (AFA-CS: G itself)."""
        return g

    def _store(self, update: Update, g: torch.Tensor) -> bool:
        """Overwrite the worker's slot; False (nothing stored) when the slot value or the
        running sum would not be finite."""
        value = self._slot_value(update, g)
        old = self.memory.get(update.worker)
        total = self.running_sum + (value if old is None else value - old)
        if not (bool(torch.isfinite(value).all()) and bool(torch.isfinite(total).all())):
            return False
        self.running_sum = total
        self.pending.append((update.worker, update.base_version, old,
                             self.memory_version.get(update.worker)))
        self.memory[update.worker] = value
        self.memory_version[update.worker] = update.base_version
        return True

    def _keep_stale(self, update: Update) -> bool:
        """An upload over τ_max is kept when it is fresher than the worker's slot (or the slot is empty)."""
        bound = self.settings.max_slot_age
        if bound is not None and self.version - update.base_version > bound:
            return False
        slot = self.memory_version.get(update.worker)
        return slot is None or update.base_version > slot

    def _store_or_reject(self, update: Update, g: torch.Tensor) -> bool:
        if not self._store(update, g):
            self.reject("overflow", was_accepted=True)
            return False
        self.new_arrivals += 1
        return True

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
            if reason is None and not self._store(update, spec.flatten(update.delta)):
                reason = "overflow"
            if reason is not None:
                self.reject(reason)
        self.pending = []   # warm-start rows are not consumed uploads
        self.warm = True

    def _direction(self) -> torch.Tensor:
        filled = len(self.memory)
        denom = filled if self.settings.cs_init == "available_only" else self.num_workers
        return self.running_sum / denom if denom else torch.zeros_like(self.x)

    def _take_step(self, lr: float) -> bool:
        self._expire()
        stepped = self._guarded_step(lr)
        if stepped:
            self.pending = []
            self.new_arrivals = 0
            if self.version % self.settings.resync_every == 0:
                self.resync()
        return stepped

    def _expire(self) -> None:
        bound = self.settings.max_slot_age
        if bound is None:
            return
        old = [w for w, v in self.memory_version.items() if self.version - v > bound]
        for worker in old:
            del self.memory[worker], self.memory_version[worker]
        if old:
            _bump(self.stats, "expired_slots", len(old))
            self.pending = [p for p in self.pending if p[0] in self.memory]
            self.resync()

    def _pending_sizes(self) -> list[tuple[Hashable, float]]:
        return [(i, _norm(self.memory[p[0]])) for i, p in enumerate(self.pending)]

    def _discard(self, key: Hashable) -> None:
        worker, _, old, old_version = self.pending.pop(key)
        if old is None:
            del self.memory[worker], self.memory_version[worker]
        else:
            self.memory[worker], self.memory_version[worker] = old, int(old_version)
        self.new_arrivals -= 1
        self.resync()   # subtracting a huge slot from the sum would cancel every small one

    def _ready(self) -> bool:
        return self.new_arrivals >= self.settings.min_new

    def _before_commit(self) -> None:
        # staleness is recorded for the uploads this step consumes for the first time
        for worker, base, _, _ in self.pending:
            self._consumed(worker, base)
        ages = self.stats.setdefault("slot_age", {})
        if self.memory_version:
            counts = np.bincount(self.version - np.fromiter(self.memory_version.values(), dtype=np.int64))
            for age in np.flatnonzero(counts):
                _bump(ages, int(age), int(counts[age]))

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
            "pending": [[w, b] for w, b, _, _ in self.pending],
            "pending_old": [[o, v] for _, _, o, v in self.pending],
            "warm": self.warm,
        }

    def _load_extra_state(self, state: dict) -> None:
        workers = [int(w) for w in state["workers"]]
        self.memory = {w: state["memory"][k].clone() for k, w in enumerate(workers)}
        self.memory_version = {w: int(v) for w, v in zip(workers, state["memory_version"])}
        self.running_sum = state["running_sum"].clone()
        self.new_arrivals = int(state["new_arrivals"])
        olds = state.get("pending_old") or [[None, None]] * len(state["pending"])
        self.pending = [(int(w), int(b), None if o is None else o.clone(), None if v is None else int(v))
                        for (w, b), (o, v) in zip(state["pending"], olds)]
        self.warm = bool(state["warm"])


class AFACS(MemoryServer):
    """AFA-CS server: latest update per worker, average over all M, step ``η·η_L``.

    ``server_lr=None`` (default) derives η from M and ``min_new`` (`default_server_lr`).
    """

    name = "afa_cs"
    needs_warm_start = property(lambda self: self.settings.cs_init == "warm_start")

    Config = AFACSConfig

    def __init__(self, *, local_lr: float = 0.05, server_lr: float | None = None,
                 max_staleness: int | None = 10, stale_policy: str = "drop",
                 cs_init: str = "available_only", min_new: int = 1, resync_every: int = 100,
                 max_slot_age: int | None = None, max_update_norm: float | None = None):
        super().__init__(AFACSConfig(local_lr=local_lr, server_lr=server_lr, max_staleness=max_staleness,
                                     stale_policy=stale_policy, cs_init=cs_init, min_new=min_new,
                                     resync_every=resync_every, max_slot_age=max_slot_age,
                                     max_update_norm=max_update_norm))

    @property
    def server_step(self) -> float:
        """η in use: ``settings.server_lr``, or the derived default once ``init`` knows M."""
        if self.settings.server_lr is not None:
            return self.settings.server_lr
        if self.spec is None:
            raise RuntimeError("AFACS derives its server step from the number of workers: call .init first")
        return default_server_lr(self.num_workers, self.settings.min_new)

    def init(self, params, num_workers: int) -> "AFACS":
        super().init(params, num_workers)
        given, bound = self.settings.server_lr, default_server_lr(num_workers, self.settings.min_new)
        if given is not None and given > bound * (1 + 1e-9):
            period = refresh_period(num_workers, self.settings.min_new)
            warnings.warn(
                f"AFACS: server_lr η = {given:g} (η·η_L = {given * self.settings.local_lr:.4g}) is above the "
                f"rotating-memory bound η ≤ c(P)/(2P) = {bound:.4g} for M = {num_workers} workers and "
                f"min_new = {self.settings.min_new} (P = {period}, c(P) = {rotation_bound(period):.3f}): when "
                "slots refresh in rotation the memory average can oscillate and diverge even though local "
                "training at η_L is stable; leave server_lr=None for the derived default",
                UserWarning, stacklevel=2)
        return self

    def config(self) -> dict:
        out = super().config()
        if self.settings.server_lr is None and self.spec is not None:
            out["server_lr_derived"] = self.server_step
        return out

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        if not self.warm:
            raise RuntimeError("AFACS(cs_init='warm_start') needs warm_start(updates at x_0) "
                               "before the first upload")
        if not self._store_or_reject(update, g):
            return False
        if not self._ready():
            return False
        return self._take_step(self.server_step * self.settings.local_lr)
