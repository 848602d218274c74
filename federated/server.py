"""Common server machinery shared by AFA-CD, AFA-CS and the baselines.

Every upload is an `Update`: the worker's normalised update
``G = (x_s − y_K) / (η_L · K)`` (Anarchic Federated Learning, Yang et al., ICML 2022,
Algorithm 1) on the trainable parameters, the version ``s`` of the model it started
from, and the number of local steps ``K`` it actually ran. The server

1. rejects malformed uploads (wrong keys, wrong shapes, non-float, NaN/inf,
   ``K < 1``, unknown worker, a version from the future) and counts them by reason,
2. computes the staleness ``τ = t − s`` against its own version ``t`` and applies
   the delay bound ``τ_max`` (the paper's bounded-delay assumption) with the policy
   ``"drop"`` (default: the update is discarded and counted), ``"accept"`` (no bound)
   or ``"clip"`` (accepted but counted as over the bound),
3. hands the flattened ``G`` to the algorithm's rule (`_accept`), which decides
   when to take a step ``x ← x − η · η_L · direction``.

Servers work on one flat vector of the trainable parameters; frozen weights and
buffers never reach them, so only what is trained is ever communicated.

Each server's settings are a dataclass (`ServerConfig` and its subclasses) validated on
construction; the server exposes every setting as an attribute, and assigning one
re-validates the whole config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch

from ..checks import non_negative_int, non_negative_number, one_of, optional, positive_int, positive_number
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
    non_negative_number("staleness exponent", exponent)

    def weight(tau: int) -> float:
        return float((1.0 + tau) ** (-exponent))

    weight.describe = f"polynomial({exponent})"  # type: ignore[attr-defined]
    return weight


@dataclass
class ServerConfig:
    """Settings every server understands.

    Attributes:
        local_lr: η_L, the workers' learning rate (uploads are normalised by it).
        server_lr: η, the server's learning rate; a step is ``x ← x − η · η_L · direction``.
        max_staleness: the delay bound τ_max, or None for no bound.
        stale_policy: what happens to an upload over the bound: ``"drop"``, ``"accept"``, ``"clip"``.
        staleness_weight: an optional discount ``s(τ)`` (e.g. `polynomial_staleness`).
    """

    local_lr: float = 0.05
    server_lr: float = 1.0
    max_staleness: int | None = 10
    stale_policy: str = "drop"
    staleness_weight: StalenessWeight | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting outside its allowed range (subclasses extend this)."""
        positive_number("local_lr (η_L)", self.local_lr)
        positive_number("server_lr (η)", self.server_lr)
        optional(non_negative_int, "max_staleness", self.max_staleness)
        one_of("stale_policy", self.stale_policy, STALE_POLICIES)
        if self.staleness_weight is not None and not callable(self.staleness_weight):
            raise ValueError(f"staleness_weight must be a function of τ or None, got {self.staleness_weight!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; ``staleness_weight`` is written as its description."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        weight = out["staleness_weight"]
        out["staleness_weight"] = None if weight is None else getattr(weight, "describe", repr(weight))
        return out


class _Setting:
    """A server attribute backed by a field of the server's config; assigning re-validates."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, server: "Server | None", owner: type | None = None) -> Any:
        if server is None:
            return self
        return getattr(server.settings, self.name)

    def __set__(self, server: "Server", value: Any) -> None:
        server.settings = dataclasses.replace(server.settings, **{self.name: value})


def _expose_settings(cls: type) -> None:
    for f in dataclasses.fields(cls.Config):
        if not isinstance(cls.__dict__.get(f.name), _Setting) and not any(
                isinstance(base.__dict__.get(f.name), _Setting) for base in cls.__mro__[1:]):
            setting = _Setting()
            setting.__set_name__(cls, f.name)
            setattr(cls, f.name, setting)


def _new_stats() -> dict:
    return {
        "received": 0, "accepted": 0, "dropped_stale": 0, "over_bound_accepted": 0,
        "rejected": {}, "staleness_arrival": {}, "staleness_consumed": {},
        "consumed_per_worker": {},
    }


class Server:
    """Base class: holds ``x``, the version ``t`` and the upload statistics.

    Built from its settings, either as keywords (``AFACD(local_lr=0.05, buffer_size=10)``) or
    as a config object (``AFACD.from_config(AFACDConfig(...))``).
    """

    name = "server"
    Config: ClassVar[type[ServerConfig]] = ServerConfig
    synchronous = False  # round-based servers step in `flush`, asynchronous ones in `submit`
    needs_warm_start = False  # AFACS(cs_init="warm_start") wants one update per worker at x_0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _expose_settings(cls)

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


_expose_settings(Server)


def _bump(counter: dict, key) -> None:
    counter[key] = counter.get(key, 0) + 1


def _copy(stats: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in stats.items()}
