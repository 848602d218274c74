"""Common server machinery shared by AFA-CD, AFA-CS and the baselines.

Every upload is an `Update`: the worker's normalised update
``G = (x_s − y_K) / (η_L · K)`` (anarchic_fl.md §4) on the trainable parameters,
the version ``s`` of the model it started from, and the number of local steps
``K`` it actually ran. The server

1. rejects malformed uploads (wrong keys, wrong shapes, non-float, NaN/inf,
   ``K < 1``, unknown worker, a version from the future) and counts them by reason,
2. computes the staleness ``τ = t − s`` against its own version ``t`` and applies
   the delay bound ``τ_max`` with the policy ``"drop"`` (default: the update is
   discarded and counted), ``"accept"`` (no bound) or ``"clip"`` (accepted but
   counted as over the bound) (§7),
3. hands the flattened ``G`` to the algorithm's rule (`_accept`), which decides
   when to take a step ``x ← x − η · η_L · direction``.

Servers work on one flat vector of the trainable parameters; frozen weights and
buffers never reach them (invariant 11).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .params import ParamSpec, Params, nbytes

STALE_POLICIES = ("drop", "accept", "clip")
StalenessWeight = Callable[[int], float]


@dataclass
class Update:
    """One upload from a worker."""

    worker: int
    delta: Params            # G = (x_s − y_K) / (η_L · K), named like the trainable params
    base_version: int        # s: version of the global model the worker started from
    local_steps: int         # K actually executed
    num_examples: int = 1    # |local data|, only used by weighting="num_examples"

    @property
    def nbytes(self) -> int:
        return nbytes(self.delta)


def polynomial_staleness(exponent: float = 0.5) -> StalenessWeight:
    """FedAsync/FedBuff's ``s(τ) = (1 + τ)^(−a)``."""
    if exponent < 0:
        raise ValueError(f"staleness exponent must be >= 0, got {exponent}")

    def weight(tau: int) -> float:
        return float((1.0 + tau) ** (-exponent))

    weight.describe = f"polynomial({exponent})"  # type: ignore[attr-defined]
    return weight


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _new_stats() -> dict:
    return {
        "received": 0, "accepted": 0, "dropped_stale": 0, "over_bound_accepted": 0,
        "rejected": {}, "staleness_arrival": {}, "staleness_consumed": {},
        "consumed_per_worker": {},
    }


class Server:
    """Base class: holds ``x``, the version ``t`` and the upload statistics."""

    name = "server"
    synchronous = False  # round-based servers step in `flush`, asynchronous ones in `submit`
    needs_warm_start = False  # AFACS(cs_init="warm_start") wants one update per worker at x_0

    def __init__(self, *, local_lr: float, server_lr: float, max_staleness: int | None,
                 stale_policy: str = "drop", staleness_weight: StalenessWeight | None = None):
        _check_positive("local_lr (η_L)", local_lr)
        _check_positive("server_lr (η)", server_lr)
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 0):
            raise ValueError(f"max_staleness must be an int >= 0 or None, got {max_staleness!r}")
        if stale_policy not in STALE_POLICIES:
            raise ValueError(f"stale_policy must be one of {STALE_POLICIES}, got {stale_policy!r}")
        self.local_lr = float(local_lr)
        self.server_lr = float(server_lr)
        self.max_staleness = max_staleness
        self.stale_policy = stale_policy
        self.staleness_weight = staleness_weight
        self.spec: ParamSpec | None = None
        self.num_workers = 0

    # -- set-up ---------------------------------------------------------------------------
    def init(self, params: Mapping[str, torch.Tensor], num_workers: int) -> "Server":
        """Start from the global trainable params ``x_0`` (version 0) for ``num_workers`` workers."""
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        self.spec = ParamSpec.of(params)
        self.num_workers = num_workers
        self.x = self.spec.flatten(params).clone()
        self.version = 0
        self.stats = _new_stats()
        self._reset()
        return self

    def _reset(self) -> None:
        """Subclasses initialise their own state here."""

    def config(self) -> dict:
        weight = self.staleness_weight
        return {
            "algorithm": self.name, "local_lr": self.local_lr, "server_lr": self.server_lr,
            "max_staleness": self.max_staleness, "stale_policy": self.stale_policy,
            "staleness_weight": None if weight is None else getattr(weight, "describe", repr(weight)),
        }

    # -- the global model -----------------------------------------------------------------
    @property
    def params(self) -> Params:
        """The current global trainable parameters ``x_t`` as a named dict (copies)."""
        return self._spec().unflatten(self.x)

    def _spec(self) -> ParamSpec:
        if self.spec is None:
            raise RuntimeError(f"{type(self).__name__} is not initialised: call .init(params, num_workers)")
        return self.spec

    # -- uploads --------------------------------------------------------------------------
    def submit(self, update: Update) -> bool:
        """Receive one upload. Returns True when it made the server take a step."""
        spec = self._spec()
        self.stats["received"] += 1
        reason = self._invalid(update, spec)
        if reason is not None:
            _bump(self.stats["rejected"], reason)
            return False
        tau = self.version - update.base_version
        _bump(self.stats["staleness_arrival"], tau)
        if self.max_staleness is not None and tau > self.max_staleness:
            if self.stale_policy == "drop":
                self.stats["dropped_stale"] += 1
                return False
            if self.stale_policy == "clip":
                self.stats["over_bound_accepted"] += 1
        self.stats["accepted"] += 1
        return self._accept(update, spec.flatten(update.delta))

    def flush(self) -> bool:
        """End of a round for synchronous servers; asynchronous servers never step here."""
        return False

    def _invalid(self, update: Update, spec: ParamSpec) -> str | None:
        if not (0 <= update.worker < self.num_workers):
            return "unknown_worker"
        if not isinstance(update.local_steps, int) or update.local_steps < 1:
            return "local_steps"
        if update.base_version > self.version or update.base_version < 0:
            return "version"
        return spec.check(update.delta)

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        raise NotImplementedError

    def _weight(self, tau: int) -> float:
        return 1.0 if self.staleness_weight is None else float(self.staleness_weight(tau))

    def _consumed(self, worker: int, base_version: int) -> None:
        _bump(self.stats["staleness_consumed"], self.version - base_version)
        _bump(self.stats["consumed_per_worker"], worker)

    def _step(self, direction: torch.Tensor, lr: float) -> None:
        """``x ← x − lr · direction``; one server step, the version advances."""
        self.x = self.x - lr * direction
        self.version += 1

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"x": self.x.clone(), "version": self.version, "stats": _copy(self.stats),
                "extra": self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        spec = self._spec()
        if tuple(state["x"].shape) != (spec.numel,):
            raise ValueError(f"server state has {tuple(state['x'].shape)} parameters, "
                             f"this server has ({spec.numel},)")
        self.x = state["x"].clone()
        self.version = int(state["version"])
        self.stats = _copy(state["stats"])
        self._load_extra_state(state["extra"])

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass


def _bump(counter: dict, key) -> None:
    counter[key] = counter.get(key, 0) + 1


def _copy(stats: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in stats.items()}
