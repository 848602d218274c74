"""Common server machinery shared by AFA-CD, AFA-CS and the baselines.

Every upload is an `Update`: the worker's normalised update
``G = (x_s − y_K) / (η_L · K)`` (Anarchic Federated Learning, Yang et al., ICML 2022,
Algorithm 1) on the trainable parameters, the version ``s`` of the model it started
from, and the number of local steps ``K`` it actually ran. The server

1. rejects malformed uploads (wrong keys, wrong shapes, non-float, NaN/inf,
   ``K < 1``, unknown worker, a version from the future, a norm over ``max_update_norm``)
   and counts them by reason,
2. computes the staleness ``τ = t − s`` against its own version ``t`` and applies
   the delay bound ``τ_max`` (the paper's bounded-delay assumption) with the policy
   ``"drop"`` (default: the update is discarded and counted), ``"accept"`` (no bound)
   or ``"clip"`` (accepted but counted as over the bound),
3. hands the flattened ``G`` to the algorithm's rule (`_accept`), which decides
   when to take a step ``x ← x − η · η_L · direction``,
4. checks the new model before committing a step: when it would hold a NaN or an infinity
   (uploads of huge but finite values overflow the sum), the largest pending upload is
   rejected (reason ``"overflow"``) and the step is recomputed without it.

Servers work on one flat vector of the trainable parameters; frozen weights and
buffers never reach them, so only what is trained is ever communicated.

Each server's settings are one frozen dataclass (`ServerConfig` and its subclasses),
validated once when it is made and read as ``server.settings.<name>``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Hashable, Mapping

import torch

from ..checks import non_negative_int, non_negative_number, one_of, optional, positive_int, positive_number
from .params import ParamSpec, Params, nbytes

STALE_POLICIES = ("drop", "accept", "clip")
StalenessWeight = Callable[[int], float]


@dataclass
class Update:
    """One upload from a worker. Integer fields are checked when it is made: ``worker`` and
    ``base_version`` are ints >= 0, ``local_steps`` and ``num_examples`` ints >= 1 (a bool is
    not a count)."""

    worker: int
    delta: Params            # G = (x_s − y_K) / (η_L · K), named like the trainable params
    base_version: int        # s: version of the global model the worker started from
    local_steps: int         # K actually executed
    num_examples: int = 1    # |local data|, only used by weighting="num_examples"

    def __post_init__(self) -> None:
        non_negative_int("Update.worker", self.worker)
        non_negative_int("Update.base_version", self.base_version)
        positive_int("Update.local_steps (K)", self.local_steps)
        positive_int("Update.num_examples", self.num_examples)
        if not isinstance(self.delta, Mapping):
            raise ValueError(f"Update.delta must be a dict of tensors named like the trainable parameters, "
                             f"got {type(self.delta).__name__}")

    @property
    def nbytes(self) -> int:
        return nbytes(self.delta)


def polynomial_staleness(exponent: float = 0.5) -> StalenessWeight:
    """FedAsync/FedBuff's ``s(τ) = (1 + τ)^(−a)``."""
    non_negative_number("staleness exponent", exponent)

    def weight(tau: int) -> float:
        return float((1.0 + tau) ** (-exponent))

    weight.describe = f"polynomial({exponent})"  # type: ignore[attr-defined]
    return weight


@dataclass(frozen=True)
class ServerConfig:
    """Settings every server understands.

    Attributes:
        local_lr: η_L, the workers' learning rate (uploads are normalised by it).
        server_lr: η, the server's learning rate; a step is ``x ← x − η · η_L · direction``.
        max_staleness: the delay bound τ_max, or None for no bound.
        stale_policy: what happens to an upload over the bound: ``"drop"``, ``"accept"``, ``"clip"``.
        staleness_weight: an optional discount ``s(τ)`` (e.g. `polynomial_staleness`).
        max_update_norm: reject an upload whose ``‖G‖₂`` exceeds this bound (None: no bound).
    """

    # settings added after checkpoints were written: left out of `to_dict` at their default,
    # so the fingerprints of earlier runs still match
    LATER: ClassVar[dict[str, Any]] = {"max_update_norm": None}

    local_lr: float = 0.05
    server_lr: float = 1.0
    max_staleness: int | None = 10
    stale_policy: str = "drop"
    staleness_weight: StalenessWeight | None = None
    max_update_norm: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting outside its allowed range (subclasses extend this)."""
        positive_number("local_lr (η_L)", self.local_lr)
        self.check_server_lr()
        optional(non_negative_int, "max_staleness", self.max_staleness)
        one_of("stale_policy", self.stale_policy, STALE_POLICIES)
        if self.staleness_weight is not None and not callable(self.staleness_weight):
            raise ValueError(f"staleness_weight must be a function of τ or None, got {self.staleness_weight!r}")
        optional(positive_number, "max_update_norm", self.max_update_norm)

    def check_server_lr(self) -> None:
        positive_number("server_lr (η)", self.server_lr)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; ``staleness_weight`` is written as its description."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if not (f.name in self.LATER and getattr(self, f.name) == self.LATER[f.name])}
        weight = out["staleness_weight"]
        out["staleness_weight"] = None if weight is None else getattr(weight, "describe", repr(weight))
        return out


def _new_stats() -> dict:
    return {
        "received": 0, "accepted": 0, "dropped_stale": 0, "over_bound_accepted": 0,
        "rejected": {}, "staleness_arrival": {}, "staleness_consumed": {},
        "consumed_per_worker": {},
    }


class Server:
    """Base class: holds ``x``, the version ``t`` and the upload statistics.

    Built from its settings, either as keywords (``AFACD(local_lr=0.05, buffer_size=10)``) or
    as a config object (``AFACD.from_config(AFACDConfig(...))``); ``server.settings`` is that
    config.
    """

    name = "server"
    Config: ClassVar[type[ServerConfig]] = ServerConfig
    synchronous = False  # round-based servers step in `flush`, asynchronous ones in `submit`
    needs_warm_start = False  # AFACS(cs_init="warm_start") wants one update per worker at x_0

    def __init__(self, config: ServerConfig | None = None, /, **options: Any):
        if config is None:
            config = self.Config(**options)
        elif options:
            raise TypeError(f"pass either a config or keyword settings to {type(self).__name__}, not both")
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.settings = config
        self.spec: ParamSpec | None = None
        self.num_workers = 0

    @classmethod
    def from_config(cls, config: ServerConfig) -> "Server":
        """The server with the settings of ``config`` (a ``cls.Config``)."""
        server = cls.__new__(cls)
        Server.__init__(server, config)
        return server

    @property
    def local_lr(self) -> float:
        """η_L: the step size the server asks its workers to use (read-only; see ``settings``)."""
        return self.settings.local_lr

    @property
    def server_step(self) -> float:
        """The server step size η in use (``settings.server_lr``; AFA-CS may derive it)."""
        return self.settings.server_lr

    # -- set-up ---------------------------------------------------------------------------
    def init(self, params: Mapping[str, torch.Tensor], num_workers: int) -> "Server":
        """Start from the global trainable params ``x_0`` (version 0) for ``num_workers`` workers."""
        positive_int("num_workers", num_workers)
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
        """The algorithm's name and its settings, JSON-ready (used to fingerprint checkpoints)."""
        return {"algorithm": self.name, **self.settings.to_dict()}

    def stall_note(self) -> str:
        """Why the server may be waiting (used in the simulator's no-progress error)."""
        return ""

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
            self.reject(reason)
            return False
        tau = self.version - update.base_version
        _bump(self.stats["staleness_arrival"], tau)
        if self.settings.max_staleness is not None and tau > self.settings.max_staleness:
            if self.settings.stale_policy == "drop":
                if not self._keep_stale(update):
                    self.stats["dropped_stale"] += 1
                    return False
                _bump(self.stats, "kept_fresher_than_slot")
            elif self.settings.stale_policy == "clip":
                self.stats["over_bound_accepted"] += 1
        self.stats["accepted"] += 1
        return self._accept(update, spec.flatten(update.delta))

    def reject(self, reason: str, *, was_accepted: bool = False) -> None:
        """Count an upload refused for ``reason`` (one that was counted accepted is taken back)."""
        _bump(self.stats["rejected"], reason)
        if was_accepted:
            self.stats["accepted"] -= 1

    def flush(self) -> bool:
        """End of a round for synchronous servers; asynchronous servers never step here."""
        return False

    def _keep_stale(self, update: Update) -> bool:
        """Memory servers keep an over-the-bound upload that is fresher than its slot."""
        return False

    def _invalid(self, update: Update, spec: ParamSpec) -> str | None:
        if not (0 <= update.worker < self.num_workers):
            return "unknown_worker"
        steps = update.local_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            return "local_steps"
        if update.base_version > self.version or update.base_version < 0:
            return "version"
        reason = spec.check(update.delta)
        if reason is None and self.settings.max_update_norm is not None:
            norm = math.sqrt(sum(float(t.double().square().sum()) for t in update.delta.values()))
            if not norm <= self.settings.max_update_norm:
                return "norm"
        return reason

    def _accept(self, update: Update, g: torch.Tensor) -> bool:
        raise NotImplementedError

    def _weight(self, tau: int) -> float:
        weight = self.settings.staleness_weight
        return 1.0 if weight is None else float(weight(tau))

    def _consumed(self, worker: int, base_version: int) -> None:
        _bump(self.stats["staleness_consumed"], self.version - base_version)
        _bump(self.stats["consumed_per_worker"], worker)

    # -- steps ----------------------------------------------------------------------------
    def _finite_or_reject(self, value: torch.Tensor, *others: torch.Tensor) -> bool:
        """False (and the upload counted as ``"overflow"``) when ``value`` or a sum it enters
        is not finite: a huge but finite upload must never reach the model."""
        if all(bool(torch.isfinite(t).all()) for t in (value, *others)):
            return True
        self.reject("overflow", was_accepted=True)
        return False

    def _guarded_step(self, lr: float) -> bool:
        """Take ``x ← x − lr · _direction()`` unless the new model would not be finite; then reject
        the largest pending upload (``_pending_sizes`` / ``_discard``) and try again while the
        server still has what it needs to step (``_ready``). True when a step was taken."""
        while True:
            new = self.x - lr * self._direction()
            if bool(torch.isfinite(new).all()):
                self._before_commit()
                self.x = new
                self.version += 1
                return True
            sizes = self._pending_sizes()
            if not sizes:
                raise FloatingPointError(
                    f"{self.name}: the global model would become non-finite at step {self.version + 1} even "
                    f"without this step's uploads (max |x| = {float(self.x.abs().max()):.3g}, step size "
                    f"{lr:.3g}); lower server_lr or set max_update_norm")
            worst = max(sizes, key=lambda item: item[1])[0]
            self._discard(worst)
            self.reject("overflow", was_accepted=True)
            if not self._ready():
                return False

    def _direction(self) -> torch.Tensor:
        """The update direction the next step applies (each server defines its own rule)."""
        raise NotImplementedError(f"{type(self).__name__} must define _direction()")

    def _pending_sizes(self) -> list[tuple[Hashable, float]]:
        """(key, size) of each upload that the next step would use for the first time."""
        return []

    def _discard(self, key: Hashable) -> None:
        """Drop the pending upload ``key`` that would make the step overflow (each server holds its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define _discard() to reject an overflowing upload")

    def _ready(self) -> bool:
        return True

    def _before_commit(self) -> None:
        """Bookkeeping of the uploads a step consumes (staleness histograms)."""

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


def _bump(counter: dict, key, amount: int = 1) -> None:
    counter[key] = counter.get(key, 0) + amount


def _norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v.double()))


def _copy(stats: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in stats.items()}
